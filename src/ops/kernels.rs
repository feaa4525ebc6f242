//! The CUDA kernels of `kernels/fused.cu`, for the fused ops on a CUDA device in f32 or bf16.
//!
//! Each function here returns `Ok(None)` when its inputs cannot go to a kernel (a CPU tensor,
//! another dtype, a build without the `cuda` feature, a hidden size beyond the kernel's shared
//! memory): the op then computes the same thing with candle operations. A kernel computes what
//! those operations compute, rounding to the tensor dtype at the same points, in one pass and
//! without their intermediate tensors. They run as candle custom ops (`CustomOp2`/`CustomOp3`,
//! `InplaceOp3`) on detached tensors, so they never join the graph themselves: the fused op's
//! [`super::attach`] does.
//!
//! `tests/cuda.rs` checks each against the CPU on a GPU; without one it is compiled only.

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Tensor};

/// Kernel launches made by this process (see [`launches`]).
static LAUNCHES: AtomicUsize = AtomicUsize::new(0);

/// How many of vramcal's CUDA kernels this process has launched: lets a test tell a fused op
/// that ran its kernels from one that fell back to candle operations.
pub fn launches() -> usize {
    LAUNCHES.load(Ordering::Relaxed)
}

/// The largest hidden size whose per-column RMSNorm weight-gradient accumulators (f32) fit in a
/// block's default 48 KiB of shared memory, beside the 1 KiB the block reductions may use.
const RMS_NORM_MAX_HIDDEN: usize = (48 - 1) * 1024 / 4;

/// Whether `ts` can go to the kernels: all on one CUDA device, all f32 or all bf16.
fn eligible(ts: &[&Tensor]) -> bool {
    cfg!(feature = "cuda")
        && ts.iter().all(|t| {
            t.device().is_cuda()
                && t.device().same_device(ts[0].device())
                && t.dtype() == ts[0].dtype()
                && matches!(t.dtype(), DType::F32 | DType::BF16)
        })
}

/// Whether `targets` are u32 on `logits`' CUDA device.
fn targets_ok(logits: &Tensor, targets: &Tensor) -> bool {
    targets.dtype() == DType::U32 && targets.device().same_device(logits.device())
}

/// A kernel launch with its scalar arguments; the tensors are the custom op's operands.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum Kernel {
    /// (x `(rows, h)`, w `(h,)`) → out `(rows, h)`.
    RmsNormFwd { eps: f32 },
    /// (x, w, g) → dx `(rows, h)`.
    RmsNormBwdX { eps: f32 },
    /// In place on dw `(h,)` f32, with (x, g).
    RmsNormBwdW { eps: f32 },
    /// (gate, up) → out.
    SwigluFwd,
    /// (gate, up, g) → the gradient to the gate (`which` 0) or to up (1).
    SwigluBwd { which: i32 },
    /// (x `(b, heads, s, hd)` any strides, cos, sin `(s, hd)`) → `(b, heads, s, hd)`.
    Rope { backward: bool },
    /// (scores `(rows, s)`, mask `(s, s)` f32) → probabilities `(rows, s)` f32.
    AttentionSoftmax { scale: f32 },
    /// (logits `(rows, vocab)` f32, targets `(rows,)` u32) → loss `(rows,)` f32.
    CeLoss,
    /// (logits, targets, scale `()` f32) → gradient to the logits `(rows, vocab)` in `dtype`.
    CeGrad { dtype: DType },
}

impl Kernel {
    fn name(&self) -> &'static str {
        match self {
            Kernel::RmsNormFwd { .. } => "rms_norm_fwd",
            Kernel::RmsNormBwdX { .. } => "rms_norm_bwd_x",
            Kernel::RmsNormBwdW { .. } => "rms_norm_bwd_w",
            Kernel::SwigluFwd => "swiglu_fwd",
            Kernel::SwigluBwd { .. } => "swiglu_bwd",
            Kernel::Rope { .. } => "rope",
            Kernel::AttentionSoftmax { .. } => "attention_softmax",
            Kernel::CeLoss => "ce_loss",
            Kernel::CeGrad { .. } => "ce_grad",
        }
    }
}

/// RMSNorm forward (see [`super::rms_norm`]): x `(…, h)`, w `(h,)` → `(…, h)`.
///
/// # Errors
/// Kernel load or launch failures, as [`candle_core::Error`].
pub(super) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Option<Tensor>> {
    if !eligible(&[x, w]) || w.dims() != [x.dim(candle_core::D::Minus1)?] {
        return Ok(None);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let kernel = Kernel::RmsNormFwd { eps: eps as f32 };
    x.apply_op2_no_bwd(&w, &kernel).map(Some)
}

/// RMSNorm backward: (dx `(…, h)`, dw `(h,)` f32 when `want_w`) from x, w and the output
/// gradient `g`.
///
/// # Errors
/// Kernel load or launch failures, as [`candle_core::Error`].
pub(super) fn rms_norm_bwd(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
    want_w: bool,
) -> candle_core::Result<Option<(Tensor, Option<Tensor>)>> {
    let h = x.dim(candle_core::D::Minus1)?;
    if !eligible(&[x, w, g]) || h > RMS_NORM_MAX_HIDDEN || w.dims() != [h] || g.shape() != x.shape()
    {
        return Ok(None);
    }
    let (x, w, g) = (x.contiguous()?, w.contiguous()?, g.contiguous()?);
    let eps = eps as f32;
    let dx = x.apply_op3_no_bwd(&w, &g, &Kernel::RmsNormBwdX { eps })?;
    let dw = if want_w {
        let dw = Tensor::zeros(h, DType::F32, x.device())?;
        dw.inplace_op3(&x, &g, &Kernel::RmsNormBwdW { eps })?;
        Some(dw)
    } else {
        None
    };
    Ok(Some((dx, dw)))
}

/// SwiGLU forward (see [`super::swiglu`]): `silu(gate)·up`.
///
/// # Errors
/// Kernel load or launch failures, as [`candle_core::Error`].
pub(super) fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !eligible(&[gate, up]) || gate.shape() != up.shape() {
        return Ok(None);
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    gate.apply_op2_no_bwd(&up, &Kernel::SwigluFwd).map(Some)
}

/// SwiGLU backward: (gradient to the gate, gradient to up when `want_up`).
///
/// # Errors
/// Kernel load or launch failures, as [`candle_core::Error`].
pub(super) fn swiglu_bwd(
    gate: &Tensor,
    up: &Tensor,
    g: &Tensor,
    want_up: bool,
) -> candle_core::Result<Option<(Tensor, Option<Tensor>)>> {
    if !eligible(&[gate, up, g]) || gate.shape() != up.shape() || gate.shape() != g.shape() {
        return Ok(None);
    }
    let (gate, up, g) = (gate.contiguous()?, up.contiguous()?, g.contiguous()?);
    let d_gate = gate.apply_op3_no_bwd(&up, &g, &Kernel::SwigluBwd { which: 0 })?;
    let d_up = if want_up {
        Some(gate.apply_op3_no_bwd(&up, &g, &Kernel::SwigluBwd { which: 1 })?)
    } else {
        None
    };
    Ok(Some((d_gate, d_up)))
}

/// RoPE (see [`super::rope`]) or, with `backward`, its transpose: x `(b, heads, s, hd)` with
/// any strides, cos and sin `(1, 1, s, hd)` → a contiguous `(b, heads, s, hd)`.
///
/// # Errors
/// Kernel load or launch failures, as [`candle_core::Error`].
pub(super) fn rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    backward: bool,
) -> candle_core::Result<Option<Tensor>> {
    if !eligible(&[x, cos, sin]) || x.rank() != 4 || x.dim(3)? % 2 != 0 {
        return Ok(None);
    }
    let (_, _, s, hd) = x.dims4()?;
    let table = |t: &Tensor| t.contiguous()?.reshape((s, hd));
    let (cos, sin) = (table(cos)?, table(sin)?);
    x.apply_op3_no_bwd(&cos, &sin, &Kernel::Rope { backward })
        .map(Some)
}

/// Attention probabilities (see [`super::attention`]): `softmax(scores·scale + mask)` per row
/// for scores `(b, heads, s, s)` in the model dtype and an additive f32 mask `(1, 1, s, s)` →
/// `(b, heads, s, s)` f32.
///
/// # Errors
/// Kernel load or launch failures, as [`candle_core::Error`].
pub(super) fn attention_probs(
    scores: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> candle_core::Result<Option<Tensor>> {
    if !eligible(&[scores]) || !mask.device().is_cuda() || mask.dtype() != DType::F32 {
        return Ok(None);
    }
    let (b, nh, s, s2) = scores.dims4()?;
    if s != s2 || mask.elem_count() != s * s {
        return Ok(None);
    }
    let scores = scores.contiguous()?.reshape((b * nh * s, s))?;
    let mask = mask.contiguous()?.reshape((s, s))?;
    // The scale as the CPU's `scores * scale` applies it: converted to the scores' dtype.
    let scale = match scores.dtype() {
        DType::BF16 => half::bf16::from_f64(scale).to_f32(),
        _ => scale as f32,
    };
    let kernel = Kernel::AttentionSoftmax { scale };
    scores
        .apply_op2_no_bwd(&mask, &kernel)?
        .reshape((b, nh, s, s))
        .map(Some)
}

/// Cross-entropy per row of f32 logits `(rows, vocab)` against u32 targets `(rows,)` (or
/// `(rows, 1)`) → `(rows,)` f32 nats.
///
/// # Errors
/// Kernel load or launch failures, as [`candle_core::Error`].
pub(super) fn ce_loss(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !cfg!(feature = "cuda")
        || !logits.device().is_cuda()
        || logits.dtype() != DType::F32
        || !targets_ok(logits, targets)
    {
        return Ok(None);
    }
    let targets = targets.flatten_all()?.contiguous()?;
    let logits = logits.contiguous()?;
    logits.apply_op2_no_bwd(&targets, &Kernel::CeLoss).map(Some)
}

/// Cross-entropy gradient to f32 logits `(rows, vocab)`: `(softmax − onehot(targets))·scale`
/// in `dtype` (f32 or bf16), `scale` a `()` f32 tensor on the device.
///
/// # Errors
/// Kernel load or launch failures, as [`candle_core::Error`].
pub(super) fn ce_grad(
    logits: &Tensor,
    targets: &Tensor,
    scale: &Tensor,
    dtype: DType,
) -> candle_core::Result<Option<Tensor>> {
    if !cfg!(feature = "cuda")
        || !logits.device().is_cuda()
        || logits.dtype() != DType::F32
        || scale.dtype() != DType::F32
        || !scale.device().same_device(logits.device())
        || !targets_ok(logits, targets)
        || !matches!(dtype, DType::F32 | DType::BF16)
    {
        return Ok(None);
    }
    let targets = targets.flatten_all()?.contiguous()?;
    let (logits, scale) = (logits.contiguous()?, scale.contiguous()?);
    logits
        .apply_op3_no_bwd(&targets, &scale, &Kernel::CeGrad { dtype })
        .map(Some)
}

fn cpu_only(k: &Kernel) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "vramcal kernel {} runs on CUDA only; the CPU computes the fused op with candle operations",
        k.name()
    ))
}

impl candle_core::CustomOp2 for Kernel {
    fn name(&self) -> &'static str {
        Kernel::name(self)
    }
    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        Err(cpu_only(self))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        imp::launch(self, &[(s1, l1), (s2, l2)])
    }
}

impl candle_core::CustomOp3 for Kernel {
    fn name(&self) -> &'static str {
        Kernel::name(self)
    }
    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        Err(cpu_only(self))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CudaStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        imp::launch(self, &[(s1, l1), (s2, l2), (s3, l3)])
    }
}

impl candle_core::InplaceOp3 for Kernel {
    fn name(&self) -> &'static str {
        Kernel::name(self)
    }
    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        Err(cpu_only(self))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CudaStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        imp::launch_in_place(self, (s1, l1), &[(s2, l2), (s3, l3)])
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::Kernel;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape};
    use half::bf16;

    mod ptx {
        include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
    }

    /// The name candle's device caches the loaded module under.
    const MODULE: &str = "vramcal_fused";
    /// Threads per block of the row kernels (a multiple of 32).
    const ROW_THREADS: u32 = 256;
    /// Threads per block of the elementwise kernels.
    const ELEM_THREADS: u32 = 256;
    /// Blocks at most (the kernels stride over the rest).
    const MAX_BLOCKS: usize = 65_535;
    /// Blocks of the RMSNorm weight-gradient kernel at most (a few per SM of a large GPU).
    const DW_BLOCKS: u32 = 512;

    fn rows_cfg(rows: usize, shared_mem_bytes: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.clamp(1, MAX_BLOCKS) as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes,
        }
    }

    fn elems_cfg(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(ELEM_THREADS as usize).clamp(1, MAX_BLOCKS);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (ELEM_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn suffix(dt: DType) -> Result<&'static str> {
        Ok(match dt {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            other => bail!("vramcal kernels: no {other:?} kernel"),
        })
    }

    /// A contiguous storage's elements from its layout's offset on.
    fn view<'a, T: CudaDType + DeviceRepr>(
        s: &'a CudaStorage,
        l: &Layout,
    ) -> Result<CudaView<'a, T>> {
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
            None => bail!("vramcal kernels: input is not contiguous"),
        }
    }

    fn int(v: usize, what: &str) -> Result<i32> {
        i32::try_from(v).map_err(|_| {
            candle_core::Error::Msg(format!("vramcal kernels: {what} {v} exceeds i32"))
        })
    }

    /// Runs `k` on `inputs`; returns the new output storage and its shape.
    pub(super) fn launch(
        k: &Kernel,
        inputs: &[(&CudaStorage, &Layout)],
    ) -> Result<(CudaStorage, Shape)> {
        super::LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dt = inputs[0].0.dtype();
        match (k, dt) {
            (Kernel::CeLoss, _) => ce_loss(inputs),
            (Kernel::CeGrad { dtype: DType::F32 }, _) => ce_grad::<f32>(inputs, DType::F32),
            (Kernel::CeGrad { dtype: DType::BF16 }, _) => ce_grad::<bf16>(inputs, DType::BF16),
            (_, DType::F32) => typed::<f32>(k, inputs),
            (_, DType::BF16) => typed::<bf16>(k, inputs),
            (_, other) => bail!("vramcal kernel {}: no {other:?} kernel", k.name()),
        }
    }

    /// Runs `k` writing into `out` (the RMSNorm weight gradient).
    pub(super) fn launch_in_place(
        k: &Kernel,
        out: (&mut CudaStorage, &Layout),
        inputs: &[(&CudaStorage, &Layout)],
    ) -> Result<()> {
        super::LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match inputs[0].0.dtype() {
            DType::F32 => rms_norm_dw::<f32>(k, out, inputs),
            DType::BF16 => rms_norm_dw::<bf16>(k, out, inputs),
            other => bail!("vramcal kernel {}: no {other:?} kernel", k.name()),
        }
    }

    fn rms_norm_dw<T: CudaDType + DeviceRepr>(
        k: &Kernel,
        (dw, dwl): (&mut CudaStorage, &Layout),
        inputs: &[(&CudaStorage, &Layout)],
    ) -> Result<()> {
        let Kernel::RmsNormBwdW { eps } = *k else {
            bail!("vramcal kernel {}: not an in-place kernel", k.name())
        };
        let (x, xl) = inputs[0];
        let dev = x.device().clone();
        let h = *xl.dims().last().unwrap_or(&1);
        let n = xl.shape().elem_count();
        if dwl.shape().elem_count() != h || dwl.start_offset() != 0 {
            bail!("vramcal kernel rms_norm_bwd_w: dw must be a fresh ({h},) tensor");
        }
        if n == 0 {
            return Ok(());
        }
        let f = dev.get_or_load_custom_func(
            &format!("rms_norm_bwd_w_{}", suffix(x.dtype())?),
            MODULE,
            ptx::FUSED,
        )?;
        let xv = view::<T>(x, xl)?;
        let gv = view::<T>(inputs[1].0, inputs[1].1)?;
        let dw = dw.as_cuda_slice_mut::<f32>()?;
        let (rows, hh) = (int(n / h, "rows")?, int(h, "hidden size")?);
        let mut b = f.builder();
        b.arg(&xv);
        b.arg(&gv);
        b.arg(dw);
        b.arg(&rows);
        b.arg(&hh);
        b.arg(&eps);
        // Fewer blocks than rows: each block adds once per column, so fewer atomics.
        let mut cfg = rows_cfg(n / h, (h * 4) as u32);
        cfg.grid_dim.0 = cfg.grid_dim.0.min(DW_BLOCKS);
        // SAFETY: arguments match the kernel's signature in kernels/fused.cu.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }

    fn typed<T: CudaDType + DeviceRepr>(
        k: &Kernel,
        inputs: &[(&CudaStorage, &Layout)],
    ) -> Result<(CudaStorage, Shape)> {
        let (x, xl) = inputs[0];
        let dev: CudaDevice = x.device().clone();
        let shape = xl.shape().clone();
        let n = shape.elem_count();
        let f = dev.get_or_load_custom_func(
            &format!("{}_{}", k.name(), suffix(x.dtype())?),
            MODULE,
            ptx::FUSED,
        )?;
        match *k {
            Kernel::RmsNormFwd { eps } | Kernel::RmsNormBwdX { eps } => {
                let h = *shape.dims().last().unwrap_or(&1);
                // SAFETY: every element is written by the kernel before it is read.
                let out = unsafe { dev.alloc::<T>(n)? };
                if n > 0 {
                    let xv = view::<T>(x, xl)?;
                    let wv = view::<T>(inputs[1].0, inputs[1].1)?;
                    let (rows, hh) = (int(n / h, "rows")?, int(h, "hidden size")?);
                    let mut b = f.builder();
                    b.arg(&xv);
                    b.arg(&wv);
                    let gv;
                    if let Kernel::RmsNormBwdX { .. } = k {
                        gv = view::<T>(inputs[2].0, inputs[2].1)?;
                        b.arg(&gv);
                    }
                    b.arg(&out);
                    b.arg(&rows);
                    b.arg(&hh);
                    b.arg(&eps);
                    // SAFETY: arguments match the kernel's signature in kernels/fused.cu.
                    unsafe { b.launch(rows_cfg(n / h, 0)) }.w()?;
                }
                Ok((T::wrap_cuda_slice(out, dev), shape))
            }
            Kernel::SwigluFwd | Kernel::SwigluBwd { .. } => {
                // SAFETY: every element is written by the kernel before it is read.
                let out = unsafe { dev.alloc::<T>(n)? };
                if n > 0 {
                    let gate = view::<T>(x, xl)?;
                    let up = view::<T>(inputs[1].0, inputs[1].1)?;
                    let mut b = f.builder();
                    b.arg(&gate);
                    b.arg(&up);
                    let (gv, which);
                    if let Kernel::SwigluBwd { which: w } = *k {
                        gv = view::<T>(inputs[2].0, inputs[2].1)?;
                        which = w;
                        b.arg(&gv);
                    } else {
                        which = 0;
                    }
                    b.arg(&out);
                    b.arg(&n);
                    if let Kernel::SwigluBwd { .. } = k {
                        b.arg(&which);
                    }
                    // SAFETY: arguments match the kernel's signature in kernels/fused.cu.
                    unsafe { b.launch(elems_cfg(n)) }.w()?;
                }
                Ok((T::wrap_cuda_slice(out, dev), shape))
            }
            Kernel::Rope { backward } => {
                let dims = shape.dims();
                let st = xl.stride();
                if dims.len() != 4 || st.len() != 4 {
                    bail!("vramcal kernel rope: expects (b, heads, s, hd), got {shape:?}");
                }
                // SAFETY: every element is written by the kernel before it is read.
                let out = unsafe { dev.alloc::<T>(n)? };
                if n > 0 {
                    let xv = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
                    let cos = view::<T>(inputs[1].0, inputs[1].1)?;
                    let sin = view::<T>(inputs[2].0, inputs[2].1)?;
                    let (b_, h_, s_, d_) = (
                        int(dims[0], "batch")?,
                        int(dims[1], "heads")?,
                        int(dims[2], "sequence")?,
                        int(dims[3], "head size")?,
                    );
                    let (st0, st1, st2, st3) = (st[0], st[1], st[2], st[3]);
                    let backward = backward as i32;
                    let mut b = f.builder();
                    b.arg(&xv);
                    b.arg(&cos);
                    b.arg(&sin);
                    b.arg(&out);
                    b.arg(&b_);
                    b.arg(&h_);
                    b.arg(&s_);
                    b.arg(&d_);
                    b.arg(&st0);
                    b.arg(&st1);
                    b.arg(&st2);
                    b.arg(&st3);
                    b.arg(&backward);
                    // SAFETY: arguments match the kernel's signature in kernels/fused.cu.
                    unsafe { b.launch(elems_cfg(n)) }.w()?;
                }
                Ok((T::wrap_cuda_slice(out, dev), shape))
            }
            Kernel::AttentionSoftmax { scale } => {
                let (rows, s) = xl.shape().dims2()?;
                // SAFETY: every element is written by the kernel before it is read.
                let out = unsafe { dev.alloc::<f32>(n)? };
                if n > 0 {
                    let sv = view::<T>(x, xl)?;
                    let mv = view::<f32>(inputs[1].0, inputs[1].1)?;
                    let (rr, ss) = (int(rows, "rows")?, int(s, "sequence")?);
                    let mut b = f.builder();
                    b.arg(&sv);
                    b.arg(&mv);
                    b.arg(&out);
                    b.arg(&rr);
                    b.arg(&ss);
                    b.arg(&scale);
                    // SAFETY: arguments match the kernel's signature in kernels/fused.cu.
                    unsafe { b.launch(rows_cfg(rows, 0)) }.w()?;
                }
                Ok((f32::wrap_cuda_slice(out, dev), shape))
            }
            Kernel::RmsNormBwdW { .. } | Kernel::CeLoss | Kernel::CeGrad { .. } => {
                bail!(
                    "vramcal kernel {}: launched through the wrong path",
                    k.name()
                )
            }
        }
    }

    fn ce_loss(inputs: &[(&CudaStorage, &Layout)]) -> Result<(CudaStorage, Shape)> {
        let (l, ll) = inputs[0];
        let dev = l.device().clone();
        let (rows, vocab) = ll.shape().dims2()?;
        if inputs[1].1.shape().elem_count() != rows {
            bail!(
                "vramcal kernel ce_loss: {rows} rows of logits, {:?} targets",
                inputs[1].1.shape()
            );
        }
        // SAFETY: every element is written by the kernel before it is read.
        let out = unsafe { dev.alloc::<f32>(rows)? };
        if rows > 0 {
            let f = dev.get_or_load_custom_func("ce_loss_f32", MODULE, ptx::FUSED)?;
            let lv = view::<f32>(l, ll)?;
            let tv = view::<u32>(inputs[1].0, inputs[1].1)?;
            let (rr, vv) = (int(rows, "rows")?, int(vocab, "vocabulary")?);
            let mut b = f.builder();
            b.arg(&lv);
            b.arg(&tv);
            b.arg(&out);
            b.arg(&rr);
            b.arg(&vv);
            // SAFETY: arguments match the kernel's signature in kernels/fused.cu.
            unsafe { b.launch(rows_cfg(rows, 0)) }.w()?;
        }
        Ok((f32::wrap_cuda_slice(out, dev), Shape::from(rows)))
    }

    fn ce_grad<T: CudaDType + DeviceRepr>(
        inputs: &[(&CudaStorage, &Layout)],
        dtype: DType,
    ) -> Result<(CudaStorage, Shape)> {
        let (l, ll) = inputs[0];
        let dev = l.device().clone();
        let (rows, vocab) = ll.shape().dims2()?;
        if inputs[1].1.shape().elem_count() != rows || inputs[2].1.shape().elem_count() != 1 {
            bail!(
                "vramcal kernel ce_grad: {rows} rows of logits, {:?} targets, scale {:?}",
                inputs[1].1.shape(),
                inputs[2].1.shape()
            );
        }
        let n = rows * vocab;
        // SAFETY: every element is written by the kernel before it is read.
        let out = unsafe { dev.alloc::<T>(n)? };
        if n > 0 {
            let name = format!("ce_grad_{}", suffix(dtype)?);
            let f = dev.get_or_load_custom_func(&name, MODULE, ptx::FUSED)?;
            let lv = view::<f32>(l, ll)?;
            let tv = view::<u32>(inputs[1].0, inputs[1].1)?;
            let sv = view::<f32>(inputs[2].0, inputs[2].1)?;
            let (rr, vv) = (int(rows, "rows")?, int(vocab, "vocabulary")?);
            let mut b = f.builder();
            b.arg(&lv);
            b.arg(&tv);
            b.arg(&sv);
            b.arg(&out);
            b.arg(&rr);
            b.arg(&vv);
            // SAFETY: arguments match the kernel's signature in kernels/fused.cu.
            unsafe { b.launch(rows_cfg(rows, 0)) }.w()?;
        }
        Ok((T::wrap_cuda_slice(out, dev), ll.shape().clone()))
    }
}
