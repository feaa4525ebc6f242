//! The LM head fused with the cross-entropy loss, in chunks of tokens, so that the full
//! `(tokens, vocab)` logits and their gradient never exist (the largest tensors of a step for
//! large vocabularies: 128k for Llama 3). The approach of Liger Kernel's fused linear
//! cross-entropy (Hsu et al. 2024, arXiv:2410.10989), written with candle operations.

use candle_core::{Tensor, D};

use super::{attach, compute_dtype, cpu_kernels, kernels};
use crate::error::Result;

/// Tokens per chunk: each chunk's logits are `(CE_CHUNK_TOKENS, vocab)` in f32.
pub const CE_CHUNK_TOKENS: usize = 256;

fn chunks(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n)
        .step_by(CE_CHUNK_TOKENS)
        .map(move |r| (r, CE_CHUNK_TOKENS.min(n - r)))
}

/// Logits of rows `[r, r + len)` in the compute dtype: `x·wᵀ` formed in the model dtype.
fn chunk_logits(x: &Tensor, w: &Tensor, r: usize, len: usize) -> candle_core::Result<Tensor> {
    x.narrow(0, r, len)?
        .matmul(&w.t()?)?
        .to_dtype(compute_dtype(x.dtype()))
}

/// Mean next-token cross-entropy (nats) of `targets` `(N,)` (u32) under logits `x·wᵀ`, for
/// `x` `(N, hidden)` (the final-norm output) and the LM-head weight `w` `(vocab, hidden)`:
/// a scalar in f32 (f64 for f64), with a stable log-softmax per row.
///
/// Keeps `x` and `w` for backward; the logits are recomputed chunk by chunk there:
/// `G = (softmax(logits) − onehot(targets)) · g / N`, `dx = G·w`, `dw = Gᵀ·x`.
///
/// # Errors
/// [`crate::Error::Candle`] on mismatched shapes or targets outside the vocabulary.
pub fn lm_head_cross_entropy(x: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, _) = x.dims2()?;
    let f = compute_dtype(x.dtype());
    let (xd, wd) = (x.detach(), w.detach());
    let targets = targets.reshape((n, 1))?.contiguous()?;
    let mut total = Tensor::zeros((), f, x.device())?;
    for (r, len) in chunks(n) {
        let logits = chunk_logits(&xd, &wd, r, len)?;
        let tch = targets.narrow(0, r, len)?;
        let fast = match kernels::ce_loss(&logits, &tch)? {
            Some(rows) => Some(rows),
            None => cpu_kernels::ce_loss(&logits, &tch)?,
        };
        if let Some(rows) = fast {
            total = (total + rows.sum_all()?)?;
            continue;
        }
        let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?;
        drop(logits);
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let picked = shifted.gather(&targets.narrow(0, r, len)?, D::Minus1)?;
        total = (total + (lse - picked)?.sum_all()?)?;
    }
    let loss = (total / n as f64)?;
    Ok(attach(
        "vramcal-lm-head-cross-entropy",
        &[x, w],
        loss,
        Box::new(move |inp, _res, g| {
            let (x, w) = (inp[0].detach(), inp[1].detach());
            let dt = x.dtype();
            let scale = (g.detach().to_dtype(f)? / n as f64)?;
            let want_w = inp[1].track_op();
            let mut dx = Vec::new();
            let mut dw: Option<Tensor> = None;
            for (r, len) in chunks(n) {
                let logits = chunk_logits(&x, &w, r, len)?;
                let tch = targets.narrow(0, r, len)?;
                let fast = match kernels::ce_grad(&logits, &tch, &scale, dt)? {
                    Some(gch) => Some(gch),
                    None => cpu_kernels::ce_grad(&logits, &tch, &scale, dt)?,
                };
                let gch = match fast {
                    Some(gch) => gch,
                    None => {
                        let p = candle_nn::ops::softmax_last_dim(&logits)?;
                        drop(logits);
                        let minus_one = Tensor::ones((len, 1), f, x.device())?.neg()?;
                        p.scatter_add(&tch, &minus_one, D::Minus1)?
                            .broadcast_mul(&scale)?
                            .to_dtype(dt)?
                    }
                }; // (len, vocab)
                dx.push(gch.matmul(&w)?);
                if want_w {
                    let part = gch.t()?.matmul(&x.narrow(0, r, len)?)?.to_dtype(f)?;
                    dw = Some(match dw.take() {
                        Some(acc) => (acc + part)?,
                        None => part,
                    });
                }
            }
            let dx = Tensor::cat(&dx, 0)?;
            Ok(vec![
                Some(dx),
                dw.map(|t| t.to_dtype(w.dtype())).transpose()?,
            ])
        }),
    )?)
}
