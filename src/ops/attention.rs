//! Fused scaled-dot-product attention with grouped-query heads (Vaswani et al. 2017; GQA:
//! Ainslie et al. 2023), keeping for backward what PyTorch's SDPA / FlashAttention keep
//! (Dao et al. 2022, Algorithm 2): `q`, `k`, `v` and the output; the probabilities are
//! recomputed in backward instead of saved.

use candle_core::{Tensor, D};

use super::{attach, compute_dtype, cpu_attention, kernels};
use crate::error::Result;

/// `softmax(q·kᵀ·scale + mask)·v` for `q` `(b, heads, s, hd)`, `k` and `v`
/// `(b, kv_heads, s, hd)` (any strides), `mask` `(1, 1, s, s)` additive in the compute dtype
/// → `(b, s, heads·hd)` in the model dtype, ready for `o_proj`. The `heads / kv_heads` query
/// heads sharing a K/V head are stacked along the row axis, so K and V are never repeated.
/// On the CPU in f32, bf16 and f16 without `keep_probs` it runs `src/ops/cpu_attention.rs`'s blocked
/// kernel (scores and softmax in f32, key blocks a query block cannot see skipped, no
/// `(b, heads, s, s)` tensor). Elsewhere the scores are formed in the model dtype and the
/// softmax taken in f32 (f64 for f64), as transformers' eager attention does.
///
/// With `keep_probs` (`--attention eager`, as transformers' eager attention) the probabilities
/// are kept for backward in the model dtype, `(b, heads, s, s)` per layer, instead of being
/// recomputed.
///
/// Backward (with `P` recomputed or kept, `dO` the output gradient, `O` the output):
/// `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − rowsum(dO ⊙ O))`, `dQ = dS·K·scale`,
/// `dK = dSᵀ·Q·scale`, in the compute dtype.
///
/// # Errors
/// [`crate::Error::Candle`] on shape mismatch.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    keep_probs: bool,
) -> Result<Tensor> {
    let (b, nh, s, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    let dt = q.dtype();
    if !keep_probs && cpu_attention::eligible(q, k, v, mask) {
        let out = cpu_attention::forward(&q.detach(), &k.detach(), &v.detach(), mask, scale)?;
        let mask = mask.clone();
        return Ok(attach(
            "vramcal-attention",
            &[q, k, v],
            out,
            Box::new(move |inp, res, g| {
                let (dq, dk, dv) = cpu_attention::backward(
                    &inp[0].detach(),
                    &inp[1].detach(),
                    &inp[2].detach(),
                    &mask,
                    scale,
                    &res.detach(),
                    &g.detach(),
                )?;
                Ok(vec![Some(dq), Some(dk), Some(dv)])
            }),
        )?);
    }
    let p = probs(&q.detach(), &k.detach(), mask, scale)?.to_dtype(dt)?;
    let out = p
        .matmul(&v.detach().contiguous()?)? // (b, kv_heads, rep·s, hd)
        .reshape((b, nh, s, hd))?
        .transpose(1, 2)?
        .reshape((b, s, nh * hd))?;
    let kept = if keep_probs && (q.track_op() || k.track_op() || v.track_op()) {
        Some(p)
    } else {
        drop(p);
        None
    };
    let mask = mask.clone();
    Ok(attach(
        "vramcal-attention",
        &[q, k, v],
        out,
        Box::new(move |inp, res, g| {
            let f = compute_dtype(dt);
            let (q, k, v) = (inp[0].detach(), inp[1].detach(), inp[2].detach());
            let rep = nh / nkv;
            let grouped = |t: &Tensor| -> candle_core::Result<Tensor> {
                // (b, s, heads·hd) -> (b, kv_heads, rep·s, hd) in f
                t.detach()
                    .reshape((b, s, nh, hd))?
                    .transpose(1, 2)?
                    .to_dtype(f)?
                    .contiguous()?
                    .reshape((b, nkv, rep * s, hd))
            };
            let p = match &kept {
                Some(p) => p.to_dtype(f)?,
                None => probs(&q, &k, &mask, scale)?, // (b, kv_heads, rep·s, s)
            };
            let d_o = grouped(g)?;
            let d_v = p.t()?.matmul(&d_o)?; // (b, kv_heads, s, hd)
            let d_p = d_o.matmul(&v.to_dtype(f)?.contiguous()?.t()?)?;
            let row = (&d_o * grouped(res)?)?.sum_keepdim(D::Minus1)?; // (b, kv_heads, rep·s, 1)
            drop(d_o);
            let d_s = (p * d_p.broadcast_sub(&row)?)?;
            drop(d_p);
            let qg = q
                .to_dtype(f)?
                .contiguous()?
                .reshape((b, nkv, rep * s, hd))?;
            let d_q = (d_s.matmul(&k.to_dtype(f)?.contiguous()?)? * scale)?
                .reshape((b, nh, s, hd))?
                .to_dtype(dt)?;
            let d_k = (d_s.t()?.matmul(&qg)? * scale)?.to_dtype(dt)?;
            Ok(vec![Some(d_q), Some(d_k), Some(d_v.to_dtype(dt)?)])
        }),
    )?)
}

/// Attention probabilities `(b, kv_heads, rep·s, s)` in the compute dtype.
fn probs(q: &Tensor, k: &Tensor, mask: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (b, nh, s, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    let rep = nh / nkv;
    let qg = q.contiguous()?.reshape((b, nkv, rep * s, hd))?;
    let scores = qg.matmul(&k.contiguous()?.t()?)?.reshape((b, nh, s, s))?;
    if let Some(p) = kernels::attention_probs(&scores, mask, scale)? {
        return p.reshape((b, nkv, rep * s, s));
    }
    let scores = (scores * scale)?
        .to_dtype(compute_dtype(q.dtype()))?
        .broadcast_add(mask)?;
    candle_nn::ops::softmax_last_dim(&scores)?.reshape((b, nkv, rep * s, s))
}
