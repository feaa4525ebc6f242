//! Fused SwiGLU gate (Shazeer 2020, "GLU Variants Improve Transformer"; transformers'
//! `MistralMLP`: `down(silu(gate(x)) · up(x))`).

use candle_core::Tensor;

use super::{attach, compute_dtype, cpu_kernels, kernels};
use crate::error::Result;

/// `silu(gate) · up`, elementwise; both `(…, intermediate)` → `(…, intermediate)`.
///
/// Keeps `gate` and `up` (the projections' outputs) for backward; `silu` and `sigmoid` are
/// recomputed: `d_up = g · silu(gate)`, `d_gate = g · up · σ(gate) · (1 + gate · (1 − σ(gate)))`.
///
/// # Errors
/// [`crate::Error::Candle`] on shape mismatch.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (gd, ud) = (gate.detach(), up.detach());
    let fast = match kernels::swiglu(&gd, &ud)? {
        Some(out) => Some(out),
        None => cpu_kernels::swiglu(&gd, &ud)?,
    };
    let out = match fast {
        Some(out) => out,
        None => (gd.silu()? * ud)?,
    };
    Ok(attach(
        "vramcal-swiglu",
        &[gate, up],
        out,
        Box::new(|inp, _res, g| {
            let dt = inp[0].dtype();
            let (gd, ud) = (inp[0].detach(), inp[1].detach());
            let want_up = inp[1].track_op();
            let fast = match kernels::swiglu_bwd(&gd, &ud, &g.detach(), want_up)? {
                Some(r) => Some(r),
                None => cpu_kernels::swiglu_bwd(&gd, &ud, &g.detach(), want_up)?,
            };
            if let Some((d_gate, d_up)) = fast {
                return Ok(vec![Some(d_gate), d_up]);
            }
            let f = compute_dtype(dt);
            let gate = inp[0].detach().to_dtype(f)?;
            let up = inp[1].detach().to_dtype(f)?;
            let g = g.detach().to_dtype(f)?;
            let sig = (gate.neg()?.exp()? + 1.0)?.recip()?;
            let d_up = if inp[1].track_op() {
                Some((&g * (&gate * &sig)?)?.to_dtype(inp[1].dtype())?)
            } else {
                None
            };
            // σ(x)·(1 + x·(1 − σ(x)))
            let dsilu = (&sig * ((&gate * (1.0 - &sig)?)? + 1.0)?)?;
            let d_gate = ((g * up)? * dsilu)?.to_dtype(dt)?;
            Ok(vec![Some(d_gate), d_up])
        }),
    )?)
}
