//! The fused attention's CPU kernel: FlashAttention's blocking (Dao et al. 2022; Dao 2023,
//! FlashAttention-2, Algorithms 1 and 2) without its online rescaling. Queries go in blocks of
//! [`BQ`] rows; a block sees only the keys its rows may see (causal and sliding-window blocks
//! skip the rest), forms its scores and probabilities in a `BQ × seq` scratch buffer that stays
//! in cache, and never materializes `(batch, heads, seq, seq)`. Backward recomputes each block's
//! probabilities from `q`, `k` and the mask. Work is split by (sequence, query head) across
//! candle's thread pool; each head accumulates its own `dK`, `dV` partials, summed per K/V head
//! afterwards, so no two threads write the same memory.
//!
//! Computes in f32 for f32, bf16 and f16 tensors (f64 and eager attention take the composed
//! path of [`super::attention`]). Every buffer is allocated before the threads start and the
//! products are [`super::cpu_matmul`]'s, which allocate nothing: the measured peak does not
//! depend on how the threads interleave.

use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

use super::cpu_matmul::{matmul, View};

/// Query rows per block.
pub const BQ: usize = 64;

/// Whether the kernel takes these inputs: CPU tensors in f32, bf16 or f16 with an f32 additive
/// mask `(1, 1, s, s)` and a whole number of query heads per K/V head.
pub(super) fn eligible(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> bool {
    let (Ok((b, nh, s, hd)), Ok((kb, nkv, ks, khd))) = (q.dims4(), k.dims4()) else {
        return false;
    };
    (kb, ks, khd) == (b, s, hd)
        && v.dims() == [b, nkv, s, hd]
        && q.device().is_cpu()
        && matches!(q.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && mask.dtype() == DType::F32
        && mask.dims() == [1, 1, s, s]
        && nkv > 0
        && nh % nkv == 0
}

/// An f32 contiguous copy of a tensor (the tensor itself when it already is one) whose
/// elements [`slice`] borrows.
fn host(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F32)?.contiguous()
}

/// Borrows a contiguous f32 CPU tensor's elements for the rest of the enclosing block.
macro_rules! slice {
    ($t:expr => $name:ident) => {
        let guard = $t.storage_and_layout();
        let $name: &[f32] = match &*guard.0 {
            Storage::Cpu(c) => {
                let (a, b) = guard
                    .1
                    .contiguous_offsets()
                    .ok_or_else(|| candle_core::Error::Msg("attention: strided".into()))?;
                &c.as_slice::<f32>()?[a..b]
            }
            _ => candle_core::bail!("attention: not on the CPU"),
        };
    };
}

/// Shapes and per-row visible key ranges of one call.
struct Dims {
    b: usize,
    nh: usize,
    nkv: usize,
    s: usize,
    hd: usize,
    scale: f32,
    /// `[lo, hi)` of the keys a block of rows may see (the union over its rows).
    blocks: Vec<(usize, usize)>,
}

impl Dims {
    fn new(q: &Tensor, k: &Tensor, mask: &[f32], scale: f64) -> candle_core::Result<Self> {
        let (b, nh, s, hd) = q.dims4()?;
        let nkv = k.dim(1)?;
        let row = |i: usize| -> (usize, usize) {
            let r = &mask[i * s..(i + 1) * s];
            match r.iter().position(|x| *x != f32::NEG_INFINITY) {
                None => (0, 0),
                Some(lo) => {
                    let hi = s - r
                        .iter()
                        .rev()
                        .position(|x| *x != f32::NEG_INFINITY)
                        .unwrap_or(0);
                    (lo, hi)
                }
            }
        };
        let blocks = (0..s)
            .step_by(BQ)
            .map(|r0| {
                (r0..(r0 + BQ).min(s))
                    .map(row)
                    .filter(|(lo, hi)| hi > lo)
                    .fold((s, 0), |(a, b), (lo, hi)| (a.min(lo), b.max(hi)))
            })
            .map(|(lo, hi)| if hi > lo { (lo, hi) } else { (0, 0) })
            .collect();
        Ok(Dims {
            b,
            nh,
            nkv,
            s,
            hd,
            scale: scale as f32,
            blocks,
        })
    }

    /// The query blocks that see at least one key: `(first row, rows, first key, keys)`.
    /// Rows of the other blocks see no key; their outputs and gradients stay zero.
    fn visible_blocks(&self) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
        self.blocks
            .iter()
            .enumerate()
            .map(|(blk, &(klo, khi))| {
                let r0 = blk * BQ;
                (r0, BQ.min(self.s - r0), klo, khi - klo)
            })
            .filter(|&(_, _, _, nk)| nk > 0)
    }

    /// Offset of head `h`'s `(s, hd)` rows for sequence `bi` in a `(b, heads, s, hd)` buffer.
    fn at(&self, bi: usize, h: usize, heads: usize) -> usize {
        (bi * heads + h) * self.s * self.hd
    }
}

/// Softmax of `scale·S + mask` over each row of a block's scores, in place: `p` holds
/// `rows × nk` scores (row-major), `mask` the block's first row of the `(s, s)` mask from
/// column `klo`. A row that sees no key gets zeros.
fn softmax(p: &mut [f32], nk: usize, mask: &[f32], s: usize, scale: f32) {
    for (i, row) in p.chunks_exact_mut(nk).enumerate() {
        let m = &mask[i * s..i * s + nk];
        let mut max = f32::NEG_INFINITY;
        for (x, m) in row.iter_mut().zip(m) {
            *x = *x * scale + m;
            max = max.max(*x);
        }
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        let mut sum = 0f32;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

/// Recomputes one block's probabilities into `p` (`rows × nk`): `softmax(scale·Q·Kᵀ + mask)`.
#[allow(clippy::too_many_arguments)]
fn block_probs(
    d: &Dims,
    qh: &[f32],
    kt: &[f32],
    mask: &[f32],
    r0: usize,
    rows: usize,
    (klo, nk): (usize, usize),
    p: &mut [f32],
) {
    let (s, hd) = (d.s, d.hd);
    matmul(
        rows,
        nk,
        hd,
        View {
            data: &qh[r0 * hd..],
            rs: hd,
            cs: 1,
        },
        View {
            data: &kt[klo..],
            rs: s,
            cs: 1,
        },
        p,
        nk,
        false,
    );
    softmax(&mut p[..rows * nk], nk, &mask[r0 * s + klo..], s, d.scale);
}

/// `softmax(q·kᵀ·scale + mask)·v` for `q` `(b, heads, s, hd)`, `k`, `v` `(b, kv_heads, s, hd)`
/// and an f32 additive `mask` `(1, 1, s, s)` → `(b, s, heads·hd)` in `q`'s dtype.
///
/// # Errors
/// [`candle_core::Error`] on shapes the caller should have refused ([`eligible`]).
pub(super) fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    super::cpu_kernels::count(super::cpu_kernels::Kernel::Attention);
    let dt = q.dtype();
    let (q, v) = (host(q)?, host(v)?);
    let kt = host(&k.transpose(2, 3)?)?; // (b, kv_heads, hd, s)
    let mask = mask.contiguous()?;
    slice!(mask => m);
    let d = Dims::new(&q, k, m, scale)?;
    slice!(q => qs);
    slice!(kt => kts);
    slice!(v => vs);
    let (s, hd, rep) = (d.s, d.hd, d.nh / d.nkv);
    let mut out = vec![0f32; d.b * d.nh * s * hd];
    let mut scratch = vec![0f32; d.b * d.nh * BQ * s];
    out.par_chunks_mut(s * hd)
        .zip(scratch.par_chunks_mut(BQ * s))
        .enumerate()
        .for_each(|(t, (o, p))| {
            let (bi, h) = (t / d.nh, t % d.nh);
            let g = h / rep;
            let qh = &qs[d.at(bi, h, d.nh)..];
            let kt = &kts[d.at(bi, g, d.nkv)..];
            let vh = &vs[d.at(bi, g, d.nkv)..];
            for (r0, rows, klo, nk) in d.visible_blocks() {
                block_probs(&d, qh, kt, m, r0, rows, (klo, nk), p);
                matmul(
                    rows,
                    hd,
                    nk,
                    View {
                        data: p,
                        rs: nk,
                        cs: 1,
                    },
                    View {
                        data: &vh[klo * hd..],
                        rs: hd,
                        cs: 1,
                    },
                    &mut o[r0 * hd..],
                    hd,
                    false,
                );
            }
        });
    drop(scratch);
    Tensor::from_vec(out, (d.b, d.nh, s, hd), q.device())?
        .to_dtype(dt)?
        .transpose(1, 2)?
        .reshape((d.b, s, d.nh * hd))
}

/// Gradients `(dq, dk, dv)` of the blocked forward (`forward` in this file) given its output `out` and the output gradient `g`
/// (both `(b, s, heads·hd)`), in the inputs' dtype and shapes: with `P` recomputed,
/// `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − rowsum(dO ⊙ O))·scale`, `dQ = dS·K`,
/// `dK = dSᵀ·Q` (FlashAttention-2, Algorithm 2).
///
/// # Errors
/// As the forward.
#[allow(clippy::type_complexity)]
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    out: &Tensor,
    g: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    super::cpu_kernels::count(super::cpu_kernels::Kernel::Attention);
    let dt = q.dtype();
    let (b, nh, s, hd) = q.dims4()?;
    let heads = |t: &Tensor| -> candle_core::Result<Tensor> {
        // (b, s, heads·hd) -> (b, heads, s, hd)
        host(&t.reshape((b, s, nh, hd))?.transpose(1, 2)?)
    };
    let (d_o, o) = (heads(g)?, heads(out)?);
    let (qf, kf) = (host(q)?, host(k)?);
    let kt = host(&k.transpose(2, 3)?)?;
    let vt = host(&v.transpose(2, 3)?)?;
    let mask = mask.contiguous()?;
    slice!(mask => m);
    let d = Dims::new(q, k, m, scale)?;
    slice!(qf => qs);
    slice!(kf => ks);
    slice!(kt => kts);
    slice!(vt => vts);
    slice!(d_o => dos);
    slice!(o => os);
    let rep = nh / d.nkv;
    let n = b * nh * s * hd;
    let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let mut scratch = vec![0f32; b * nh * 2 * BQ * s];
    dq.par_chunks_mut(s * hd)
        .zip(dk.par_chunks_mut(s * hd))
        .zip(dv.par_chunks_mut(s * hd))
        .zip(scratch.par_chunks_mut(2 * BQ * s))
        .enumerate()
        .for_each(|(t, (((dq, dk), dv), buf))| {
            let (bi, h) = (t / nh, t % nh);
            let gkv = h / rep;
            let (p, dp) = buf.split_at_mut(BQ * s);
            let at = d.at(bi, h, nh);
            let (qh, doh, oh) = (&qs[at..], &dos[at..], &os[at..]);
            let kv = d.at(bi, gkv, d.nkv);
            let (kh, kt, vt) = (&ks[kv..], &kts[kv..], &vts[kv..]);
            for (r0, rows, klo, nk) in d.visible_blocks() {
                block_probs(&d, qh, kt, m, r0, rows, (klo, nk), p);
                let do_blk = View {
                    data: &doh[r0 * hd..],
                    rs: hd,
                    cs: 1,
                };
                // dV[klo..khi] += Pᵀ·dO
                matmul(
                    nk,
                    hd,
                    rows,
                    View {
                        data: p,
                        rs: 1,
                        cs: nk,
                    },
                    do_blk,
                    &mut dv[klo * hd..],
                    hd,
                    true,
                );
                // dP = dO·Vᵀ
                matmul(
                    rows,
                    nk,
                    hd,
                    do_blk,
                    View {
                        data: &vt[klo..],
                        rs: s,
                        cs: 1,
                    },
                    dp,
                    nk,
                    false,
                );
                // dS = P ⊙ (dP − rowsum(dO ⊙ O))·scale, in dp
                for i in 0..rows {
                    let r = (r0 + i) * hd;
                    let row: f32 = doh[r..r + hd]
                        .iter()
                        .zip(&oh[r..r + hd])
                        .map(|(a, b)| a * b)
                        .sum();
                    let (pr, dr) = (&p[i * nk..(i + 1) * nk], &mut dp[i * nk..(i + 1) * nk]);
                    for (dr, pr) in dr.iter_mut().zip(pr) {
                        *dr = pr * (*dr - row) * d.scale;
                    }
                }
                // dQ = dS·K
                matmul(
                    rows,
                    hd,
                    nk,
                    View {
                        data: dp,
                        rs: nk,
                        cs: 1,
                    },
                    View {
                        data: &kh[klo * hd..],
                        rs: hd,
                        cs: 1,
                    },
                    &mut dq[r0 * hd..],
                    hd,
                    false,
                );
                // dK[klo..khi] += dSᵀ·Q
                matmul(
                    nk,
                    hd,
                    rows,
                    View {
                        data: dp,
                        rs: 1,
                        cs: nk,
                    },
                    View {
                        data: &qh[r0 * hd..],
                        rs: hd,
                        cs: 1,
                    },
                    &mut dk[klo * hd..],
                    hd,
                    true,
                );
            }
        });
    drop(scratch);
    let dev = q.device();
    let dq = Tensor::from_vec(dq, (b, nh, s, hd), dev)?.to_dtype(dt)?;
    // Each query head's partials, summed over the heads sharing a K/V head.
    let per_kv = |x: Vec<f32>| -> candle_core::Result<Tensor> {
        Tensor::from_vec(x, (b, d.nkv, rep, s, hd), dev)?
            .sum(2)?
            .to_dtype(dt)
    };
    let dk = per_kv(dk)?;
    let dv = per_kv(dv)?;
    Ok((dq, dk, dv))
}
