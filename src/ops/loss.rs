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

/// Logits of rows `[r, r + len)` in the compute dtype: `x·wᵀ` formed in the model dtype, plus
/// `x_lr·bᵀ` where the head has a low-rank term (`x`'s last `r` columns meet `b` `(vocab, r)`,
/// its first `hidden` columns `w`).
fn chunk_logits(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    r: usize,
    len: usize,
) -> candle_core::Result<Tensor> {
    let xc = x.narrow(0, r, len)?;
    let logits = match b {
        None => xc.matmul(&w.t()?)?,
        Some(b) => {
            let (h, rank) = (w.dim(1)?, b.dim(1)?);
            let base = xc.narrow(1, 0, h)?.contiguous()?.matmul(&w.t()?)?;
            let delta = xc.narrow(1, h, rank)?.contiguous()?.matmul(&b.t()?)?;
            if base.device().is_cpu() {
                // In place: the sum would be a third chunk-sized buffer beside both products.
                base.inplace_op2(&delta, &AddAssign)?;
                base
            } else {
                (base + delta)?
            }
        }
    };
    logits.to_dtype(compute_dtype(x.dtype()))
}

/// `a += b` on the CPU for two contiguous tensors of one dtype and size (each element rounded
/// once to the dtype, as candle's `add` rounds).
struct AddAssign;

impl candle_core::InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "vramcal-add-assign"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage as C;
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("add-assign: operands must be contiguous")
        };
        if a1 - a0 != b1 - b0 {
            candle_core::bail!("add-assign: {} and {} elements", a1 - a0, b1 - b0)
        }
        fn add<T: Copy>(a: &mut [T], b: &[T], f: impl Fn(T, T) -> T) {
            a.iter_mut().zip(b).for_each(|(x, y)| *x = f(*x, *y));
        }
        match (s1, s2) {
            (C::F32(a), C::F32(b)) => add(&mut a[a0..a1], &b[b0..b1], |x, y| x + y),
            (C::F64(a), C::F64(b)) => add(&mut a[a0..a1], &b[b0..b1], |x, y| x + y),
            (C::BF16(a), C::BF16(b)) => add(&mut a[a0..a1], &b[b0..b1], |x, y| x + y),
            (C::F16(a), C::F16(b)) => add(&mut a[a0..a1], &b[b0..b1], |x, y| x + y),
            _ => candle_core::bail!("add-assign: operands of different or integer dtypes"),
        }
        Ok(())
    }
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
    head_cross_entropy(x, w, None, targets)
}

/// [`lm_head_cross_entropy`] for a head with a LoRA adapter (PEFT's `lm_head` target): logits
/// `x·wᵀ + u·bᵀ` for `xu = [x | u]` `(N, hidden + r)`, where `u` `(N, r)` is the adapter's
/// scaled `(alpha/r)·lora_A(dropout(x))` and `b` `(vocab, r)` is `lora_B`. Keeps `xu`, `w`
/// and `b`; backward recomputes each chunk's logits and gives `dxu = [G·w | G·b]`,
/// `dw = Gᵀ·x`, `db = Gᵀ·u`. (Three inputs: candle's custom ops take at most three, so `x` and
/// `u` travel as one tensor.)
///
/// # Errors
/// [`crate::Error::Candle`] on mismatched shapes or targets outside the vocabulary.
pub fn lm_head_lora_cross_entropy(
    xu: &Tensor,
    w: &Tensor,
    b: &Tensor,
    targets: &Tensor,
) -> Result<Tensor> {
    head_cross_entropy(xu, w, Some(b), targets)
}

fn head_cross_entropy(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    targets: &Tensor,
) -> Result<Tensor> {
    let (n, cols) = x.dims2()?;
    let (_, h) = w.dims2()?;
    let rank = match b {
        Some(b) => b.dims2()?.1,
        None => 0,
    };
    if cols != h + rank {
        return Err(candle_core::Error::Msg(format!(
            "lm head: input has {cols} columns, weight and adapter expect {h} + {rank}"
        ))
        .into());
    }
    let f = compute_dtype(x.dtype());
    let (xd, wd, bd) = (x.detach(), w.detach(), b.map(Tensor::detach));
    let targets = targets.reshape((n, 1))?.contiguous()?;
    let mut total = Tensor::zeros((), f, x.device())?;
    for (r, len) in chunks(n) {
        let logits = chunk_logits(&xd, &wd, bd.as_ref(), r, len)?;
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
    let inputs: Vec<&Tensor> = match b {
        Some(b) => vec![x, w, b],
        None => vec![x, w],
    };
    Ok(attach(
        "vramcal-lm-head-cross-entropy",
        &inputs,
        loss,
        Box::new(move |inp, _res, g| {
            let (x, w) = (inp[0].detach(), inp[1].detach());
            let b = inp.get(2).map(|b| b.detach());
            let dt = x.dtype();
            let scale = (g.detach().to_dtype(f)? / n as f64)?;
            let want_w = inp[1].track_op();
            let want_b = inp.get(2).is_some_and(|b| b.track_op());
            let mut dx = Vec::new();
            let mut dw: Option<Tensor> = None;
            let mut db: Option<Tensor> = None;
            let accumulate = |acc: &mut Option<Tensor>, part: Tensor| -> candle_core::Result<()> {
                *acc = Some(match acc.take() {
                    Some(a) => (a + part)?,
                    None => part,
                });
                Ok(())
            };
            for (r, len) in chunks(n) {
                let logits = chunk_logits(&x, &w, b.as_ref(), r, len)?;
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
                let xc = x.narrow(0, r, len)?;
                match &b {
                    None => dx.push(gch.matmul(&w)?),
                    Some(b) => {
                        dx.push(Tensor::cat(&[gch.matmul(&w)?, gch.matmul(b)?], 1)?);
                        if want_b {
                            let u = xc.narrow(1, h, rank)?.contiguous()?;
                            // One statement per part: the product in the model dtype is
                            // freed before the sum (as one statement it stayed alive beside
                            // the old and new sums).
                            let part = gch.t()?.matmul(&u)?.to_dtype(f)?;
                            accumulate(&mut db, part)?;
                        }
                    }
                }
                if want_w {
                    let xh = if rank > 0 {
                        xc.narrow(1, 0, h)?.contiguous()?
                    } else {
                        xc
                    };
                    let part = gch.t()?.matmul(&xh)?.to_dtype(f)?;
                    accumulate(&mut dw, part)?;
                }
            }
            let dx = Tensor::cat(&dx, 0)?;
            let mut out = vec![Some(dx), dw.map(|t| t.to_dtype(w.dtype())).transpose()?];
            if let Some(b) = &b {
                out.push(db.map(|t| t.to_dtype(b.dtype())).transpose()?);
            }
            Ok(out)
        }),
    )?)
}
