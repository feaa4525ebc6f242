//! Mutable access to CPU tensors' storage, for optimizers that update a parameter and several
//! states in one pass (8-bit AdamW, Adafactor, SGD with momentum, master weights).
//!
//! candle hands out a tensor's storage mutably only inside an in-place op
//! (`Tensor::inplace_op1`), which takes the storage's write lock. [`with_mut`] runs a closure
//! there; nesting calls on distinct tensors gives simultaneous mutable access to each, with
//! candle's own locks (never two on one storage: that would wait forever, so callers pass
//! tensors they created separately).

use std::sync::Mutex;

use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor};
use half::{bf16, f16};

/// A closure to run on a storage, and what it returned.
struct WithMut<F, R> {
    f: Mutex<Option<F>>,
    out: Mutex<Option<R>>,
}

impl<F, R> InplaceOp1 for WithMut<F, R>
where
    F: FnOnce(&mut CpuStorage, &Layout) -> candle_core::Result<R>,
{
    fn name(&self) -> &'static str {
        "vramcal-optimizer-update"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let f = self
            .f
            .lock()
            .map_err(|_| candle_core::Error::Msg("optimizer: poisoned lock".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("optimizer: update ran twice".into()))?;
        let r = f(s, l)?;
        *self
            .out
            .lock()
            .map_err(|_| candle_core::Error::Msg("optimizer: poisoned lock".into()))? = Some(r);
        Ok(())
    }
}

/// Runs `f` on the storage and layout of the CPU tensor `t`, holding its write lock.
///
/// # Errors
/// `f`'s errors; candle's for a tensor not on the CPU.
pub(crate) fn with_mut<R>(
    t: &Tensor,
    f: impl FnOnce(&mut CpuStorage, &Layout) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let op = WithMut {
        f: Mutex::new(Some(f)),
        out: Mutex::new(None),
    };
    t.inplace_op1(&op)?;
    let out = op
        .out
        .into_inner()
        .map_err(|_| candle_core::Error::Msg("optimizer: poisoned lock".into()))?;
    out.ok_or_else(|| candle_core::Error::Msg("optimizer: update did not run".into()))
}

/// The contiguous extent of a layout.
///
/// # Errors
/// A strided layout.
pub(crate) fn extent(l: &Layout) -> candle_core::Result<std::ops::Range<usize>> {
    l.contiguous_offsets()
        .map(|(a, b)| a..b)
        .ok_or_else(|| candle_core::Error::Msg("optimizer: strided storage".into()))
}

/// A float storage's elements, read as f32.
#[derive(Clone, Copy)]
pub(crate) enum Floats<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

impl<'a> Floats<'a> {
    /// The elements of `l` in `s`.
    ///
    /// # Errors
    /// A strided layout or a storage that is not f32, bf16 or f16.
    pub(crate) fn of(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<Self> {
        let r = extent(l)?;
        Ok(match s {
            CpuStorage::F32(v) => Floats::F32(&v[r]),
            CpuStorage::BF16(v) => Floats::BF16(&v[r]),
            CpuStorage::F16(v) => Floats::F16(&v[r]),
            _ => candle_core::bail!("optimizer: expected f32, bf16 or f16 storage"),
        })
    }

    /// Number of elements.
    pub(crate) fn len(&self) -> usize {
        match self {
            Floats::F32(v) => v.len(),
            Floats::BF16(v) => v.len(),
            Floats::F16(v) => v.len(),
        }
    }

    /// Element `i` as f32.
    #[inline(always)]
    pub(crate) fn get(&self, i: usize) -> f32 {
        match self {
            Floats::F32(v) => v[i],
            Floats::BF16(v) => v[i].to_f32(),
            Floats::F16(v) => v[i].to_f32(),
        }
    }
}

/// A float storage's elements, written from f32 (rounded to nearest even on store).
pub(crate) enum FloatsMut<'a> {
    F32(&'a mut [f32]),
    BF16(&'a mut [bf16]),
    F16(&'a mut [f16]),
}

impl<'a> FloatsMut<'a> {
    /// The elements of `l` in `s`.
    ///
    /// # Errors
    /// A strided layout or a storage that is not f32, bf16 or f16.
    pub(crate) fn of(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<Self> {
        let r = extent(l)?;
        Ok(match s {
            CpuStorage::F32(v) => FloatsMut::F32(&mut v[r]),
            CpuStorage::BF16(v) => FloatsMut::BF16(&mut v[r]),
            CpuStorage::F16(v) => FloatsMut::F16(&mut v[r]),
            _ => candle_core::bail!("optimizer: expected f32, bf16 or f16 storage"),
        })
    }

    /// Number of elements.
    pub(crate) fn len(&self) -> usize {
        match self {
            FloatsMut::F32(v) => v.len(),
            FloatsMut::BF16(v) => v.len(),
            FloatsMut::F16(v) => v.len(),
        }
    }

    /// Element `i` as f32.
    #[inline(always)]
    pub(crate) fn get(&self, i: usize) -> f32 {
        match self {
            FloatsMut::F32(v) => v[i],
            FloatsMut::BF16(v) => v[i].to_f32(),
            FloatsMut::F16(v) => v[i].to_f32(),
        }
    }

    /// Sets element `i` from `x`.
    #[inline(always)]
    pub(crate) fn set(&mut self, i: usize, x: f32) {
        match self {
            FloatsMut::F32(v) => v[i] = x,
            FloatsMut::BF16(v) => v[i] = bf16::from_f32(x),
            FloatsMut::F16(v) => v[i] = f16::from_f32(x),
        }
    }
}

/// Whether the in-place CPU paths can take these tensors: on the CPU, f32/bf16/f16,
/// contiguous.
pub(crate) fn eligible(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| {
        t.device().is_cpu()
            && matches!(
                t.dtype(),
                candle_core::DType::F32 | candle_core::DType::BF16 | candle_core::DType::F16
            )
            && t.is_contiguous()
    })
}

/// Runs `f` on the elements of the CPU tensor `g` (read) and `p` (written).
///
/// # Errors
/// As [`with_mut`] and [`Floats::of`]; different element counts.
pub(crate) fn update_from(
    p: &Tensor,
    g: &Tensor,
    f: impl FnOnce(&mut FloatsMut<'_>, Floats<'_>) -> candle_core::Result<()>,
) -> candle_core::Result<()> {
    let (gs, gl) = g.storage_and_layout();
    let candle_core::Storage::Cpu(gs) = &*gs else {
        candle_core::bail!("optimizer: gradient not on the CPU")
    };
    let gv = Floats::of(gs, gl)?;
    with_mut(p, |ps, pl| {
        let mut pv = FloatsMut::of(ps, pl)?;
        if pv.len() != gv.len() {
            candle_core::bail!(
                "optimizer: {} gradient elements for {} parameter elements",
                gv.len(),
                pv.len()
            )
        }
        f(&mut pv, gv)
    })
}
