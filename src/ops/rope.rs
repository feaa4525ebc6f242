//! Fused rotary position embedding (Su et al. 2021, RoFormer; transformers' `rotate_half`
//! layout, pairs `(i, i + head_dim/2)`).

use candle_core::{Tensor, D};

use super::{attach, cpu_kernels, kernels};
use crate::error::Result;

/// `x·cos + rotate_half(x)·sin` for `x` `(b, heads, s, head_dim)` (any strides) and tables
/// `cos`, `sin` `(1, 1, s, head_dim)` in `x`'s dtype → a contiguous `(b, heads, s, head_dim)`.
///
/// Keeps nothing for backward beyond the tables: the map is a rotation, so
/// `dx = g·cos + rotate_halfᵀ(g·sin)` with `rotate_halfᵀ([a, b]) = [b, −a]`.
///
/// # Errors
/// [`crate::Error::Candle`] on shape mismatch.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let xd = x.detach();
    let fast = match kernels::rope(&xd, cos, sin, false)? {
        Some(out) => Some(out),
        None => cpu_kernels::rope(&xd, cos, sin, false)?,
    };
    let out = match fast {
        Some(out) => out,
        None => apply(&xd, cos, sin)?,
    };
    let (c, s) = (cos.clone(), sin.clone());
    Ok(attach(
        "vramcal-rope",
        &[x],
        out,
        Box::new(move |_inp, _res, g| {
            let g = g.detach();
            let fast = match kernels::rope(&g, &c, &s, true)? {
                Some(dx) => Some(dx),
                None => cpu_kernels::rope(&g, &c, &s, true)?,
            };
            if let Some(dx) = fast {
                return Ok(vec![Some(dx)]);
            }
            let hd = g.dim(D::Minus1)?;
            let gs = g.broadcast_mul(&s)?;
            let a = gs.narrow(D::Minus1, 0, hd / 2)?;
            let b = gs.narrow(D::Minus1, hd / 2, hd / 2)?;
            let rot_t = Tensor::cat(&[&b, &a.neg()?], D::Minus1)?;
            Ok(vec![Some((g.broadcast_mul(&c)? + rot_t)?)])
        }),
    )?)
}

/// The forward map (also the composed reference in tests).
fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
}
