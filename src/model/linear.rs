//! Linear layers of the decoder: trainable, frozen (dense or NF4) and LoRA-adapted.
//!
//! A frozen weight must not get a gradient: candle's backward computes gradients for *both*
//! matmul operands even when one is a constant, and keeps them in the `GradStore`, so a plain
//! `x·Wᵀ` with a frozen `W` would cost a full weight-sized gradient per layer. vramcal applies
//! frozen weights through [`FrozenMatmul`], a custom op that holds `W` and whose backward
//! returns only the input gradient `grad·W` (what PyTorch does for `requires_grad=False`).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::nf4::Nf4Tensor;
use crate::error::Result;

/// A frozen weight as the op sees it.
#[derive(Debug, Clone)]
pub enum FrozenRef {
    /// Dense `(out, in)` in the compute dtype.
    Dense(Tensor),
    /// Dense `(out, in)` in another dtype (fp32 weights under autocast), cast to this dtype on
    /// every use, forward and backward (a transient copy, never kept).
    Cast(Tensor, DType),
    /// NF4, dequantized to this dtype on every use (a transient copy).
    Nf4(Arc<Nf4Tensor>, DType),
}

impl FrozenRef {
    fn dense(&self, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            FrozenRef::Dense(t) => Ok(t.clone()),
            FrozenRef::Cast(t, dt) => t.to_dtype(*dt),
            FrozenRef::Nf4(q, dt) => q
                .dequantize(*dt, device)
                .map_err(|e| candle_core::Error::Msg(e.to_string())),
        }
    }
}

/// `x·Wᵀ` for a frozen `W` `(out, in)` and `x` `(rows, in)`; backward gives `grad·W` for `x`
/// and nothing for `W`.
pub struct FrozenMatmul(pub FrozenRef);

fn frozen_fwd<S: BackendStorage>(
    x: &S,
    l: &Layout,
    w: &Tensor,
    pick: impl Fn(&Storage) -> Option<&S>,
) -> candle_core::Result<(S, Shape)> {
    let (rows, k) = l.shape().dims2()?;
    let (n, k2) = w.dims2()?;
    if k != k2 {
        candle_core::bail!("frozen-linear: input has {k} features, weight expects {k2}")
    }
    let wt = w.t()?;
    let (ws, wl) = wt.storage_and_layout();
    let Some(wst) = pick(&ws) else {
        candle_core::bail!("frozen-linear: weight on another device than the input")
    };
    let out = x.matmul(wst, (1, rows, n, k), l, wl)?;
    Ok((out, Shape::from((rows, n))))
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = self.0.dense(&Device::Cpu)?;
        frozen_fwd(x, l, &w, |s| match s {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let w = self.0.dense(&Device::Cuda(x.device().clone()))?;
        frozen_fwd(x, l, &w, |s| match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let w = self.0.dense(grad.device())?;
        Ok(Some(grad.matmul(&w)?))
    }
}

/// `x·Wᵀ` for `x` `(…, in)` and a trainable `W` `(out, in)` → `(…, out)`.
///
/// # Errors
/// [`crate::error::Error::Candle`] on shape mismatch.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (out, inp) = w.dims2()?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, inp))?.matmul(&w.t()?)?;
    let mut shape = dims[..dims.len() - 1].to_vec();
    shape.push(out);
    Ok(y.reshape(shape)?)
}

/// `x·Wᵀ` through [`FrozenMatmul`]: `x` `(…, in)` → `(…, out)`, no gradient for `W`.
///
/// # Errors
/// [`crate::error::Error::Candle`] on shape mismatch.
pub fn frozen_linear(x: &Tensor, w: &FrozenRef, out: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inp = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x
        .reshape((rows, inp))?
        .contiguous()?
        .apply_op1(FrozenMatmul(w.clone()))?;
    let mut shape = dims[..dims.len() - 1].to_vec();
    shape.push(out);
    Ok(y.reshape(shape)?)
}

/// A parameter that is either trained or frozen (norms, embeddings).
#[derive(Debug, Clone)]
pub enum Param {
    /// Receives gradients and optimizer states.
    Trainable(Var),
    /// Fixed.
    Frozen(Tensor),
}

impl Param {
    /// The tensor.
    pub fn tensor(&self) -> &Tensor {
        match self {
            Param::Trainable(v) => v.as_tensor(),
            Param::Frozen(t) => t,
        }
    }

    /// The variable, if trainable.
    pub fn var(&self) -> Option<&Var> {
        match self {
            Param::Trainable(v) => Some(v),
            Param::Frozen(_) => None,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        let t = self.tensor();
        (t.elem_count() * t.dtype().size_in_bytes()) as u64
    }
}

/// The base weight of a linear layer.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Trained (full fine-tuning).
    Trainable(Var),
    /// Frozen, dense, in the weights' dtype (cast per use under autocast).
    Frozen(Tensor),
    /// Frozen, NF4-quantized; dequantized per use.
    Nf4(Arc<Nf4Tensor>),
}

/// A LoRA adapter on one linear layer.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `lora_A`, `(r, in)`, Kaiming-uniform.
    pub a: Var,
    /// `lora_B`, `(out, r)`, zero.
    pub b: Var,
    /// `alpha / r`.
    pub scale: f64,
    /// Dropout on the adapter input.
    pub dropout: f64,
}

/// A fresh `lora_A` `(r, inp)`: `U(−1/√inp, 1/√inp)`, PyTorch's `kaiming_uniform_(a=√5)`, as
/// PEFT initializes it, from `seed`.
///
/// # Errors
/// [`crate::error::Error::Candle`].
pub fn kaiming_a(r: usize, inp: usize, dtype: DType, device: &Device, seed: u64) -> Result<Var> {
    let mut rng = StdRng::seed_from_u64(seed);
    let bound = 1.0 / (inp as f64).sqrt();
    let a: Vec<f64> = (0..r * inp)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    Ok(Var::from_tensor(
        &Tensor::from_vec(a, (r, inp), device)?.to_dtype(dtype)?,
    )?)
}

impl LoraAdapter {
    /// A fresh adapter: `A ~ U(−1/√in, 1/√in)` (PyTorch's `kaiming_uniform_(a=√5)`, as PEFT
    /// initializes it), `B = 0`.
    ///
    /// # Errors
    /// [`crate::error::Error::Candle`].
    pub fn new(
        out: usize,
        inp: usize,
        cfg: &crate::spec::LoraConfig,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        Ok(LoraAdapter {
            a: kaiming_a(cfg.r, inp, dtype, device, seed)?,
            b: Var::zeros((out, cfg.r), dtype, device)?,
            scale: cfg.scale(),
            dropout: cfg.dropout,
        })
    }

    /// A fresh adapter on the token embedding, PEFT's LoRA `Embedding`:
    /// `lora_embedding_A` `(r, vocab)` zero, used as an embedding table (`A[:, id]`), and
    /// `lora_embedding_B` `(hidden, r)` standard normal (PEFT's `reset_lora_parameters`
    /// initializes an embedding adapter the other way round from a linear one). No dropout:
    /// PEFT's `Embedding` applies none.
    ///
    /// # Errors
    /// [`crate::error::Error::Candle`].
    pub fn embedding(
        vocab: usize,
        hidden: usize,
        cfg: &crate::spec::LoraConfig,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        // Box–Muller from uniforms: N(0, 1).
        let b: Vec<f64> = (0..hidden * cfg.r)
            .map(|_| {
                let (u1, u2): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
                (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            })
            .collect();
        let b = Tensor::from_vec(b, (hidden, cfg.r), device)?.to_dtype(dtype)?;
        Ok(LoraAdapter {
            a: Var::zeros((cfg.r, vocab), dtype, device)?,
            b: Var::from_tensor(&b)?,
            scale: cfg.scale(),
            dropout: 0.0,
        })
    }
}

/// Context of one forward pass: whether dropout is active and the seed its masks derive from
/// (so recomputation under checkpointing reproduces them).
#[derive(Debug, Clone, Copy)]
pub struct ForwardCtx {
    /// Apply dropout.
    pub train: bool,
    /// Base seed of this pass's dropout masks.
    pub seed: u64,
}

/// Inverted dropout with a reproducible mask: keeps each element with probability `1 − p`
/// and scales it by `1 / (1 − p)`; the fused op [`crate::ops::dropout`], which keeps no mask.
///
/// # Errors
/// [`crate::error::Error::Candle`].
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    crate::ops::dropout(x, p, seed)
}

/// A linear layer `(in → out)`: base weight plus an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The base weight `(out, in)`.
    pub weight: Weight,
    /// The adapter, if this module is a LoRA target.
    pub lora: Option<LoraAdapter>,
    /// The bias `(out,)`, where the architecture has one (Qwen2's `q_proj`/`k_proj`/`v_proj`):
    /// trained with full fine-tuning, frozen under LoRA (PEFT's `bias="none"`).
    pub bias: Option<Param>,
    /// Output features.
    pub out: usize,
    /// Input features.
    pub inp: usize,
    /// Compute dtype: the product's inputs, weight and adapters are cast to it where they are
    /// stored in another (autocast), and its output is in it.
    pub dtype: DType,
}

/// `t` in `dtype`: a cast copy that joins the graph where `t` differs (autocast casts an
/// operand per use), `t` itself where it does not.
///
/// # Errors
/// [`crate::error::Error::Candle`].
pub fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(if t.dtype() == dtype {
        t.clone()
    } else {
        t.to_dtype(dtype)?
    })
}

impl Linear {
    /// `x` `(…, in)` → `(…, out)`; `salt` distinguishes this module's dropout mask.
    ///
    /// # Errors
    /// [`crate::error::Error::Candle`].
    pub fn forward(&self, x: &Tensor, ctx: ForwardCtx, salt: u64) -> Result<Tensor> {
        // Under autocast each use casts its input (and a trained weight) to the compute dtype,
        // as PyTorch's autocast does for `F.linear`; the graph keeps the copies as the
        // product's operands.
        let x = &cast(x, self.dtype)?;
        let base = match &self.weight {
            Weight::Trainable(w) => linear(x, &cast(w, self.dtype)?)?,
            Weight::Frozen(w) if w.dtype() != self.dtype => {
                frozen_linear(x, &FrozenRef::Cast(w.clone(), self.dtype), self.out)?
            }
            Weight::Frozen(w) => frozen_linear(x, &FrozenRef::Dense(w.clone()), self.out)?,
            Weight::Nf4(q) => frozen_linear(x, &FrozenRef::Nf4(q.clone(), self.dtype), self.out)?,
        };
        // The graph keeps the product as the add's operand: one more `(…, out)` tensor than
        // PyTorch's `addmm` (`src/estimate/table.rs` counts it).
        let base = match &self.bias {
            Some(b) => base.broadcast_add(&cast(b.tensor(), self.dtype)?)?,
            None => base,
        };
        let Some(l) = &self.lora else { return Ok(base) };
        let xd = if ctx.train && l.dropout > 0.0 {
            dropout(
                x,
                l.dropout,
                ctx.seed
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add(salt),
            )?
        } else {
            x.clone()
        };
        let h = linear(&xd, &cast(&l.a, self.dtype)?)?; // (…, r)
        let d = linear(&h, &cast(&l.b, self.dtype)?)?; // (…, out)
        Ok((base + (d * l.scale)?)?)
    }

    /// The base weight as a dense tensor as stored (dequantized to the compute dtype for NF4).
    ///
    /// # Errors
    /// [`crate::error::Error::Candle`].
    pub fn dense_weight(&self, device: &Device) -> Result<Tensor> {
        Ok(match &self.weight {
            Weight::Trainable(v) => v.as_tensor().clone(),
            Weight::Frozen(t) => t.clone(),
            Weight::Nf4(q) => q.dequantize(self.dtype, device)?,
        })
    }

    /// Bytes of the base weight as stored.
    pub fn weight_bytes(&self) -> u64 {
        match &self.weight {
            Weight::Trainable(v) => (v.elem_count() * v.dtype().size_in_bytes()) as u64,
            Weight::Frozen(t) => (t.elem_count() * t.dtype().size_in_bytes()) as u64,
            Weight::Nf4(q) => q.bytes(),
        }
    }
}
