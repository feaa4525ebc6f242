//! Fused operations with their own backward: what each keeps for backward is decided here, not
//! by candle's graph (which keeps every intermediate of a composed op alive until backward).
//!
//! Each op computes its output with ordinary candle operations on detached inputs (no graph),
//! then joins the graph as one node whose inputs are the op's inputs: the node keeps those
//! inputs (which the graph holds anyway) and nothing else, and its backward recomputes what it
//! needs. This works on every device candle supports. On a CUDA device, in f32 or bf16, the
//! ops run the kernels of `kernels/fused.cu` (`src/ops/kernels.rs`) instead of several candle
//! operations: the same values in one pass, without the intermediate tensors.
//!
//! | op | keeps for backward | recomputes |
//! |---|---|---|
//! | [`rms_norm`] | input `x`, weight | `1/rms(x)` |
//! | [`rope`] | nothing (its input is the projection's output, already kept) | — |
//! | [`swiglu`] | gate and up projections | `silu(gate)`, `sigmoid(gate)` |
//! | [`attention`] | `q`, `k`, `v`, output | scores and probabilities (as FlashAttention) |
//! | [`lm_head_cross_entropy`] | normed hidden states, LM-head weight | logits, chunk by chunk |
//! | [`dropout`] | nothing (its input is kept by the frozen product) | the mask, from its seed |
//!
//! When no input tracks gradients (inference, frozen paths) the output is returned as is.

mod attention;
mod cpu_attention;
mod cpu_kernels;
mod cpu_matmul;
mod dropout;
mod kernels;
mod loss;
mod norm;
mod rope;
mod swiglu;

pub use attention::attention;
pub use cpu_attention::{backward as cpu_attention_backward, BQ as CPU_ATTENTION_BLOCK_ROWS};
pub use cpu_kernels::{calls as cpu_kernel_calls, Kernel as CpuKernel};
pub use dropout::dropout;
pub use kernels::launches as kernel_launches;
pub use loss::{lm_head_cross_entropy, lm_head_lora_cross_entropy, CE_CHUNK_TOKENS};
pub use norm::rms_norm;
pub use rope::rope;
pub use swiglu::swiglu;

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

/// Backward of a fused op: (inputs, output, output gradient) → one gradient per input
/// (`None` where an input needs none).
type Backward = Box<
    dyn Fn(&[&Tensor], &Tensor, &Tensor) -> candle_core::Result<Vec<Option<Tensor>>> + Send + Sync,
>;

/// A precomputed output joining the graph with its backward.
struct Attached {
    name: &'static str,
    out: Mutex<Option<Tensor>>,
    bwd: Backward,
}

impl Attached {
    fn take(&self) -> candle_core::Result<Tensor> {
        self.out
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused op: poisoned lock".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("fused op {} ran twice", self.name)))
    }

    fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self.take()?;
        let exact = {
            let (st, l) = out.storage_and_layout();
            match &*st {
                candle_core::Storage::Cpu(c) => {
                    l.is_contiguous() && l.start_offset() == 0 && c_len(c) == l.shape().elem_count()
                }
                _ => candle_core::bail!("fused op {}: output is not on the CPU", self.name),
            }
        };
        // The storage is cloned whole: give it one that is exactly the output.
        cpu_copy(&if exact { out } else { out.copy()? })
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let mut out = self.take()?;
        {
            let (_, l) = out.storage_and_layout();
            if !l.is_contiguous() || l.start_offset() != 0 {
                // try_clone copies the whole buffer: give it one that is exactly the output.
                out = out.copy()?;
            }
        }
        let (st, l) = out.storage_and_layout();
        match &*st {
            candle_core::Storage::Cuda(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            _ => candle_core::bail!("fused op {}: output is not on a CUDA device", self.name),
        }
    }
}

fn c_len(c: &CpuStorage) -> usize {
    match c {
        CpuStorage::F32(v) => v.len(),
        CpuStorage::F64(v) => v.len(),
        CpuStorage::BF16(v) => v.len(),
        CpuStorage::F16(v) => v.len(),
        CpuStorage::U32(v) => v.len(),
        CpuStorage::U8(v) => v.len(),
        CpuStorage::I64(v) => v.len(),
        _ => usize::MAX,
    }
}

fn cpu_copy(t: &Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        candle_core::Storage::Cpu(c) => Ok((c.clone(), l.shape().clone())),
        _ => candle_core::bail!("fused op: output is not on the CPU"),
    }
}

impl CustomOp1 for Attached {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(&self, a: &Tensor, res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok((self.bwd)(&[a], res, g)?.into_iter().next().flatten())
    }
}

impl CustomOp2 for Attached {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let mut v = (self.bwd)(&[a, b], res, g)?.into_iter();
        Ok((v.next().flatten(), v.next().flatten()))
    }
}

impl CustomOp3 for Attached {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut v = (self.bwd)(&[a, b, c], res, g)?.into_iter();
        Ok((v.next().flatten(), v.next().flatten(), v.next().flatten()))
    }
}

/// Joins `out` (computed without a graph from `inputs`) to the graph with backward `bwd`.
/// Returns `out` itself when no input tracks gradients.
fn attach(
    name: &'static str,
    inputs: &[&Tensor],
    out: Tensor,
    bwd: Backward,
) -> candle_core::Result<Tensor> {
    if !inputs.iter().any(|t| t.track_op()) {
        return Ok(out);
    }
    let op = Attached {
        name,
        out: Mutex::new(Some(out)),
        bwd,
    };
    match inputs {
        [a] => a.apply_op1(op),
        [a, b] => a.apply_op2(b, op),
        [a, b, c] => a.apply_op3(b, c, op),
        _ => candle_core::bail!("fused op {name}: 1 to 3 inputs"),
    }
}

/// The dtype fused ops compute statistics and softmax in: f64 for f64, f32 otherwise (as
/// transformers upcasts half types).
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}
