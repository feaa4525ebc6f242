//! AdamW's update on the CPU in place: three streaming passes over contiguous storage (first
//! moment, second moment, parameter), split across candle's thread pool, with no temporary
//! buffer. The arithmetic is `torch.optim.AdamW`'s single-tensor update (torch 2.x
//! `torch/optim/adamw.py`, `_single_tensor_adamw`) in f32, as [`super::AdamW`]'s chunked path
//! computes it:
//!
//! * `m ← β1·m + (1 − β1)·g`
//! * `v ← β2·v + (1 − β2)·g²`
//! * `p ← p·(1 − lr·λ) − lr · (m / bc1) / (√(v / bc2) + ε)`, `bc_i = 1 − β_i^t`
//!
//! with the scalar products rounded as the chunked path rounds them, so both give the same bits
//! with f32 states. With 16-bit states the parameter is updated from the stored (rounded)
//! moments, as `torch.optim.AdamW` does with bf16 states; the chunked path uses them unrounded.
//!
//! Parameters, gradients and states may each be f32, bf16 or f16 (rounded on store); other
//! dtypes, strided storage and other devices are left to the chunked path (`Ok(false)` from
//! [`step`]).

use candle_core::{CpuStorage, DType, Layout, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// Elements per parallel task: large enough to amortize scheduling, small enough to balance.
const TASK_ELEMS: usize = 1 << 16;

/// A storage element read and written as f32.
trait Elem: Copy + Send + Sync {
    fn get(self) -> f32;
    fn put(x: f32) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[inline(always)]
    fn put(x: f32) -> Self {
        x
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn put(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn put(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// The whole contiguous extent of a layout, or `None` when strided.
fn range(l: &Layout) -> Option<std::ops::Range<usize>> {
    l.contiguous_offsets().map(|(a, b)| a..b)
}

/// `dst ← a·dst + b·f(src)` element-wise, in parallel chunks.
fn moment<D: Elem, S: Elem>(dst: &mut [D], src: &[S], a: f32, b: f32, square: bool) {
    dst.par_chunks_mut(TASK_ELEMS)
        .zip(src.par_chunks(TASK_ELEMS))
        .for_each(|(d, s)| {
            for (d, s) in d.iter_mut().zip(s) {
                let g = s.get();
                let g = if square { g * g } else { g };
                *d = D::put(d.get() * a + g * b);
            }
        });
}

/// `p ← p·decay − lr·(m/bc1)/(√(v/bc2) + ε)` element-wise, in parallel chunks.
fn update<P: Elem, S: Elem>(p: &mut [P], m: &[S], v: &[S], k: &Consts) {
    p.par_chunks_mut(TASK_ELEMS)
        .zip(m.par_chunks(TASK_ELEMS).zip(v.par_chunks(TASK_ELEMS)))
        .for_each(|(p, (m, v))| {
            for ((p, m), v) in p.iter_mut().zip(m).zip(v) {
                let denom = (v.get() * k.inv_bc2).sqrt() + k.eps;
                *p = P::put(p.get() * k.decay - (m.get() * k.inv_bc1) / denom * k.lr);
            }
        });
}

/// The step's scalars, computed in f64 and rounded to f32 as candle's `affine` (which the
/// chunked path's scalar products go through) rounds them: both paths give the same bits.
struct Consts {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    inv_bc1: f32,
    inv_bc2: f32,
    eps: f32,
    lr: f32,
    decay: f32,
}

/// `m` or `v` (dst) updated from the gradient (src).
struct Moment<'a> {
    k: &'a Consts,
    second: bool,
}

/// The parameter (dst) updated from `m` and `v` (srcs).
struct Update<'a> {
    k: &'a Consts,
}

/// Dispatches a (dst, src) storage pair to `$f::<D, S>` for f32, bf16 and f16 elements.
macro_rules! pair {
    ($dst:expr, $src:expr, |$d:ident, $s:ident| $body:expr) => {
        match ($dst, $src) {
            (CpuStorage::F32($d), CpuStorage::F32($s)) => $body,
            (CpuStorage::F32($d), CpuStorage::BF16($s)) => $body,
            (CpuStorage::F32($d), CpuStorage::F16($s)) => $body,
            (CpuStorage::BF16($d), CpuStorage::F32($s)) => $body,
            (CpuStorage::BF16($d), CpuStorage::BF16($s)) => $body,
            (CpuStorage::BF16($d), CpuStorage::F16($s)) => $body,
            (CpuStorage::F16($d), CpuStorage::F32($s)) => $body,
            (CpuStorage::F16($d), CpuStorage::BF16($s)) => $body,
            (CpuStorage::F16($d), CpuStorage::F16($s)) => $body,
            _ => candle_core::bail!("adamw: unsupported dtypes"),
        }
    };
}

impl candle_core::InplaceOp2 for Moment<'_> {
    fn name(&self) -> &'static str {
        "vramcal-adamw-moment"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let (Some(dr), Some(sr)) = (range(dst_l), range(src_l)) else {
            candle_core::bail!("adamw: strided storage")
        };
        let (a, b, sq) = if self.second {
            (self.k.beta2, self.k.one_minus_beta2, true)
        } else {
            (self.k.beta1, self.k.one_minus_beta1, false)
        };
        pair!(dst, src, |d, s| moment(
            &mut d[dr.clone()],
            &s[sr.clone()],
            a,
            b,
            sq
        ));
        Ok(())
    }
}

impl candle_core::InplaceOp3 for Update<'_> {
    fn name(&self) -> &'static str {
        "vramcal-adamw-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        m_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        let (Some(pr), Some(mr), Some(vr)) = (range(dst_l), range(m_l), range(v_l)) else {
            candle_core::bail!("adamw: strided storage")
        };
        let v = match (m, v) {
            (CpuStorage::F32(_), CpuStorage::F32(v)) => CpuStorageSlice::F32(&v[vr]),
            (CpuStorage::BF16(_), CpuStorage::BF16(v)) => CpuStorageSlice::BF16(&v[vr]),
            (CpuStorage::F16(_), CpuStorage::F16(v)) => CpuStorageSlice::F16(&v[vr]),
            _ => candle_core::bail!("adamw: moments of different dtypes"),
        };
        pair!(dst, m, |p, m| {
            let m = &m[mr.clone()];
            match v {
                CpuStorageSlice::F32(v) => update(&mut p[pr.clone()], cast(m)?, v, self.k),
                CpuStorageSlice::BF16(v) => update(&mut p[pr.clone()], cast(m)?, v, self.k),
                CpuStorageSlice::F16(v) => update(&mut p[pr.clone()], cast(m)?, v, self.k),
            }
        });
        Ok(())
    }
}

/// `v` as a slice of its element type.
#[derive(Clone, Copy)]
enum CpuStorageSlice<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

/// `m` seen as `v`'s element type (they were checked to match).
fn cast<A: 'static, B: 'static>(a: &[A]) -> candle_core::Result<&[B]> {
    if std::any::TypeId::of::<A>() == std::any::TypeId::of::<B>() {
        // SAFETY: A and B are the same type.
        Ok(unsafe { std::slice::from_raw_parts(a.as_ptr().cast::<B>(), a.len()) })
    } else {
        candle_core::bail!("adamw: moments of different dtypes")
    }
}

/// Whether the in-place path can take these tensors: on the CPU, f32/bf16/f16, contiguous.
fn eligible(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| {
        t.device().is_cpu()
            && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
            && t.is_contiguous()
    })
}

/// One AdamW update of `p` in place from its gradient `g` and moments `m`, `v`, with bias
/// corrections `bc1`, `bc2` of this step. Returns `Ok(false)`, touching nothing, where the
/// tensors are not all contiguous f32/bf16/f16 CPU tensors.
///
/// # Errors
/// [`candle_core::Error`] on mismatched shapes.
pub(super) fn step(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    cfg: &super::AdamWConfig,
    bc1: f64,
    bc2: f64,
) -> candle_core::Result<bool> {
    if !eligible(&[p, g, m, v]) || m.dtype() != v.dtype() {
        return Ok(false);
    }
    for t in [g, m, v] {
        if t.shape() != p.shape() {
            candle_core::bail!(
                "adamw: shape {:?} for a {:?} parameter",
                t.shape(),
                p.shape()
            );
        }
    }
    let k = Consts {
        beta1: cfg.beta1 as f32,
        one_minus_beta1: (1.0 - cfg.beta1) as f32,
        beta2: cfg.beta2 as f32,
        one_minus_beta2: (1.0 - cfg.beta2) as f32,
        inv_bc1: (1.0 / bc1) as f32,
        inv_bc2: (1.0 / bc2) as f32,
        eps: cfg.eps as f32,
        lr: cfg.lr as f32,
        decay: (1.0 - cfg.lr * cfg.weight_decay) as f32,
    };
    m.inplace_op2(
        g,
        &Moment {
            k: &k,
            second: false,
        },
    )?;
    v.inplace_op2(
        g,
        &Moment {
            k: &k,
            second: true,
        },
    )?;
    p.inplace_op3(m, v, &Update { k: &k })?;
    Ok(true)
}
