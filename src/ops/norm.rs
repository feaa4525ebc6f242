//! Fused RMSNorm (Zhang & Sennrich 2019; transformers' `LlamaRMSNorm`).

use candle_core::{Tensor, D};

use super::{attach, compute_dtype, cpu_kernels, kernels};
use crate::error::Result;

/// `w · x / sqrt(mean(x²) + eps)` over the last axis, statistics in f32 (f64 for f64), the
/// product with `w` in the model dtype, as transformers computes it. `x` `(…, hidden)`, `w`
/// `(hidden,)` → `(…, hidden)`.
///
/// Keeps `x` and `w` for backward; the inverse RMS is recomputed. With `n = x / rms(x)` and
/// `dn = g · w`: `dx = (dn − n · mean(dn · n)) / rms(x)`, `dw = Σ_rows g · n`.
///
/// # Errors
/// [`crate::Error::Candle`] on shape mismatch.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let (xd, wd) = (x.detach(), w.detach());
    let fast = match kernels::rms_norm(&xd, &wd, eps)? {
        Some(out) => Some(out),
        None => cpu_kernels::rms_norm(&xd, &wd, eps)?,
    };
    let out = match fast {
        Some(out) => out,
        None => normed(&xd, eps)?
            .0
            .to_dtype(x.dtype())?
            .broadcast_mul(&wd)?,
    };
    Ok(attach(
        "vramcal-rms-norm",
        &[x, w],
        out,
        Box::new(move |inp, _res, g| {
            let (x, w) = (inp[0].detach(), inp[1].detach());
            let want_w = inp[1].track_op();
            let fast = match kernels::rms_norm_bwd(&x, &w, &g.detach(), eps, want_w)? {
                Some(r) => Some(r),
                None => cpu_kernels::rms_norm_bwd(&x, &w, &g.detach(), eps, want_w)?,
            };
            if let Some((dx, dw)) = fast {
                return Ok(vec![
                    Some(dx),
                    dw.map(|t| t.to_dtype(w.dtype())).transpose()?,
                ]);
            }
            let f = compute_dtype(x.dtype());
            let (n, inv) = normed(&x, eps)?;
            let gf = g.detach().to_dtype(f)?;
            let dn = gf.broadcast_mul(&w.to_dtype(f)?)?;
            let proj = (&dn * &n)?.mean_keepdim(D::Minus1)?;
            let dx = (dn - n.broadcast_mul(&proj)?)?.broadcast_mul(&inv)?;
            let dx = dx.to_dtype(x.dtype())?;
            let dw = if inp[1].track_op() {
                // n rounded to the model dtype, as in the forward product.
                let nd = n.to_dtype(x.dtype())?.to_dtype(f)?;
                let rows = gf.elem_count() / gf.dim(D::Minus1)?;
                let h = gf.dim(D::Minus1)?;
                Some((gf * nd)?.reshape((rows, h))?.sum(0)?.to_dtype(w.dtype())?)
            } else {
                None
            };
            Ok(vec![Some(dx), dw])
        }),
    )?)
}

/// `(x / rms(x), 1 / rms(x))` in the compute dtype.
fn normed(x: &Tensor, eps: f64) -> candle_core::Result<(Tensor, Tensor)> {
    let xf = x.to_dtype(compute_dtype(x.dtype()))?;
    let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?; // (…, 1)
    Ok((xf.broadcast_mul(&inv)?, inv))
}
