//! AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", Algorithm 2;
//! the update of `torch.optim.AdamW`) with a chosen state dtype, updating parameters and
//! states in place, chunk by chunk.
//!
//! Memory: the first and second moments `m`, `v` are allocated lazily at the first step (as
//! PyTorch does), each the parameter's shape in the state dtype. On the CPU the update runs in
//! place over the storage (`src/optim/cpu.rs`: three streaming passes, no temporary buffer). Elsewhere it
//! runs over row chunks of at most [`AdamW::chunk_elems`] elements with candle operations, so
//! its transient is about ten chunk-sized f32 buffers (≈ 10 MiB at the default 2^18 elements),
//! independent of the parameter size; PyTorch's foreach AdamW instead allocates about one
//! parameter-sized buffer per tensor group.
//! candle-nn's `AdamW` allocates about 13 parameter-sized temporaries per tensor, which is why
//! vramcal does not use it.
//!
//! The other optimizers of vramcal's step ([`build`]): 8-bit AdamW ([`AdamW8bit`]), Adafactor
//! ([`Adafactor`]), SGD ([`Sgd`]), and fp32 master weights around any of them ([`Master`]).

mod adafactor;
mod adam8bit;
mod cpu;
mod host;
mod master;
mod sgd;

pub use adafactor::Adafactor;
pub use adam8bit::{dynamic_map, AdamW8bit, BLOCK as BLOCK_8BIT, MIN_8BIT_SIZE};
pub use master::Master;
pub use sgd::Sgd;

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::spec::{AdamWConfig, Optimizer, TrainSpec};

/// An optimizer of vramcal's training step: updates its parameters in place from one gradient
/// per parameter.
pub trait Optim {
    /// One update with `grads[i]` the gradient of the i-th parameter (same shape).
    ///
    /// # Errors
    /// [`Error::InvalidValue`] if the number of gradients differs from the parameters;
    /// [`Error::Candle`] on shape or dtype mismatch.
    fn step(&mut self, grads: &[Tensor]) -> Result<()>;

    /// Bytes the optimizer holds now: its states, and master copies where it keeps them.
    fn state_bytes(&self) -> u64;

    /// Steps taken.
    fn steps(&self) -> usize;
}

/// One gradient per parameter, or an error.
fn check_grads(grads: &[Tensor], params: usize) -> Result<()> {
    if grads.len() != params {
        return Err(Error::invalid(
            "gradients",
            grads.len(),
            format!("expected one per parameter ({params})"),
        ));
    }
    Ok(())
}

/// The optimizer `spec` names over `vars`: `adamw_torch` and `adamw_torch_fused` (the same
/// update: vramcal's AdamW has no foreach/fused split), `adamw_bnb_8bit`, `adafactor`, `sgd`
/// (with `spec.momentum`); under a master-weight recipe stepping fp32 copies ([`Master`]).
///
/// # Errors
/// [`Error::InvalidValue`] for the paged optimizers (an estimator option: vramcal's step has no
/// unified memory) or bad hyper-parameters.
pub fn build(vars: Vec<Var>, spec: &TrainSpec) -> Result<Box<dyn Optim>> {
    let spec = spec.clone();
    let make = move |vars: Vec<Var>| -> Result<Box<dyn Optim>> {
        Ok(match spec.optimizer {
            Optimizer::AdamwTorch | Optimizer::AdamwTorchFused => {
                Box::new(AdamW::new(vars, spec.adamw, spec.state_dtype)?)
            }
            Optimizer::AdamwBnb8bit => Box::new(AdamW8bit::new(vars, spec.adamw)?),
            Optimizer::Adafactor => Box::new(Adafactor::new(
                vars,
                spec.adamw.lr,
                spec.adamw.weight_decay,
            )?),
            Optimizer::Sgd => Box::new(Sgd::new(
                vars,
                spec.adamw.lr,
                spec.adamw.weight_decay,
                spec.momentum,
                spec.state_dtype,
            )?),
            o @ (Optimizer::PagedAdamw8bit | Optimizer::PagedAdamw32bit) => {
                return Err(Error::invalid(
                    "--optimizer",
                    o,
                    "paged optimizers keep their states in CUDA unified memory, which vramcal's step does not use: estimate them with --profile torch-sdpa",
                ))
            }
        })
    };
    if spec.precision.is_some_and(|p| p.master_weights()) {
        Ok(Box::new(Master::new(vars, make)?))
    } else {
        make(vars)
    }
}

impl Optim for AdamW {
    fn step(&mut self, grads: &[Tensor]) -> Result<()> {
        AdamW::step(self, grads)
    }

    fn state_bytes(&self) -> u64 {
        AdamW::state_bytes(self)
    }

    fn steps(&self) -> usize {
        AdamW::steps(self)
    }
}

/// AdamW over a list of parameters.
pub struct AdamW {
    cfg: AdamWConfig,
    state_dtype: DType,
    vars: Vec<Var>,
    m: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
    t: usize,
    /// Largest number of elements updated at once by the chunked path (default 2^18).
    pub chunk_elems: usize,
    /// Update contiguous f32/bf16/f16 CPU tensors in place, with no temporary buffer
    /// (default `true`); `false` sends them through the chunked path other devices take.
    pub in_place: bool,
}

impl AdamW {
    /// Creates the optimizer; allocates nothing (states appear at the first step).
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for a non-float state dtype or out-of-range hyper-parameters.
    pub fn new(vars: Vec<Var>, cfg: AdamWConfig, state_dtype: DType) -> Result<Self> {
        if !state_dtype.is_float() {
            return Err(Error::invalid(
                "optimizer state dtype",
                format!("{state_dtype:?}"),
                "must be a float type",
            ));
        }
        cfg.validate()?;
        let n = vars.len();
        Ok(AdamW {
            cfg,
            state_dtype,
            vars,
            m: vec![None; n],
            v: vec![None; n],
            t: 0,
            chunk_elems: 1 << 18,
            in_place: true,
        })
    }

    /// Bytes held by the moment estimates now (0 before the first step).
    pub fn state_bytes(&self) -> u64 {
        self.m
            .iter()
            .chain(self.v.iter())
            .flatten()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum()
    }

    /// Steps taken.
    pub fn steps(&self) -> usize {
        self.t
    }

    /// One update with `grads[i]` the gradient of the i-th parameter (same shape).
    ///
    /// # Errors
    /// [`Error::InvalidValue`] if the number of gradients differs from the parameters;
    /// [`Error::Candle`] on shape or dtype mismatch.
    pub fn step(&mut self, grads: &[Tensor]) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(Error::invalid(
                "gradients",
                grads.len(),
                format!("expected one per parameter ({})", self.vars.len()),
            ));
        }
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, (var, g)) in self.vars.iter().zip(grads).enumerate() {
            if self.m[i].is_none() {
                self.m[i] = Some(Tensor::zeros(var.shape(), self.state_dtype, var.device())?);
                self.v[i] = Some(Tensor::zeros(var.shape(), self.state_dtype, var.device())?);
            }
            let (m, v) = (
                self.m[i].as_ref().expect("set"),
                self.v[i].as_ref().expect("set"),
            );
            if self.in_place && cpu::step(var.as_tensor(), g, m, v, &c, bc1, bc2)? {
                continue;
            }
            let pd = var.dtype();
            let cd = if pd == DType::F64 || self.state_dtype == DType::F64 {
                DType::F64
            } else {
                DType::F32
            };
            let dims = var.dims();
            let rows = if dims.is_empty() { 1 } else { dims[0] };
            let row_len = var.elem_count() / rows.max(1);
            let chunk_rows = (self.chunk_elems / row_len.max(1)).max(1);
            let mut r0 = 0;
            while r0 < rows {
                let n = chunk_rows.min(rows - r0);
                let p_c = var.narrow(0, r0, n)?.to_dtype(cd)?;
                let g_c = g.narrow(0, r0, n)?.to_dtype(cd)?;
                let m_c = m.narrow(0, r0, n)?.to_dtype(cd)?;
                let v_c = v.narrow(0, r0, n)?.to_dtype(cd)?;
                let m_new = ((m_c * c.beta1)? + (&g_c * (1.0 - c.beta1))?)?;
                let v_new = ((v_c * c.beta2)? + (g_c.sqr()? * (1.0 - c.beta2))?)?;
                let denom = ((&v_new / bc2)?.sqrt()? + c.eps)?;
                let update = ((&m_new / bc1)? / denom)?;
                let p_new = ((p_c * (1.0 - c.lr * c.weight_decay))? - (update * c.lr)?)?;
                m.slice_set(&m_new.to_dtype(self.state_dtype)?, 0, r0)?;
                v.slice_set(&v_new.to_dtype(self.state_dtype)?, 0, r0)?;
                var.slice_set(&p_new.to_dtype(pd)?, 0, r0)?;
                r0 += n;
            }
        }
        Ok(())
    }
}
