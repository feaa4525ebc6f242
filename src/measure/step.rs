//! The measuring protocol: load → optimizer init → step 1 → step 2, each step being forward
//! (with loss), backward and the AdamW update. The probe's peak is reset at the start of every
//! phase and read, after synchronizing the device, at its end. Step 1 is where the optimizer
//! states are first allocated; step 2 is the steady state that tables use.
//!
//! What is alive when, as a real trainer does it:
//! * after `forward`: weights (+ states from step 2 on) and the graph of saved activations,
//!   logits and loss;
//! * during `backward`: the graph plus gradients as they are built; at its end only the
//!   parameters' gradients are kept (detached) and candle's `GradStore` is dropped, since it
//!   also holds gradients of constants (mask, RoPE tables) that keep the graph alive;
//! * `optimizer_step`: the update, then the gradients are freed (PyTorch's
//!   `zero_grad(set_to_none=True)`).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::config::ResolvedModel;
use crate::error::{Error, Result};
use crate::measure::probe::MemoryProbe;
use crate::model::weights::{open_source, WeightsSpec};
use crate::model::Decoder;
use crate::optim::AdamW;
use crate::spec::TrainSpec;

/// Everything needed to measure one point.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The model and its configuration.
    pub model: ResolvedModel,
    /// Where the weights come from.
    pub weights: WeightsSpec,
    /// Batch, sequence, dtypes, optimizer.
    pub spec: TrainSpec,
    /// Device to run on.
    pub device: Device,
}

/// Memory and time of one phase.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PhaseRecord {
    /// Phase name: `load`, `optimizer_init`, `step1_forward`, …
    pub name: String,
    /// Highest allocated bytes during the phase.
    pub peak_allocated_bytes: u64,
    /// Allocated bytes at the end of the phase.
    pub end_allocated_bytes: u64,
    /// Highest reserved bytes during the phase (CUDA only).
    pub peak_reserved_bytes: Option<u64>,
    /// Driver-reported used bytes at the end of the phase (CUDA only).
    pub end_device_bytes: Option<u64>,
    /// Wall time of the phase (seconds).
    pub seconds: f64,
}

/// The result of measuring one point; filled phase by phase so that an error keeps what was
/// measured before it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Measurement {
    /// Device name from the probe.
    pub device: String,
    /// Allocated bytes before loading (the process's own baseline).
    pub baseline_bytes: u64,
    /// Parameters of the model.
    pub params: u64,
    /// Parameters that receive gradients and optimizer states.
    pub trainable_params: u64,
    /// Bytes of the parameters as loaded.
    pub param_bytes: u64,
    /// Bytes of the parameters' gradients (measured from the tensors, step 1).
    pub grad_bytes: u64,
    /// Bytes of the AdamW states after step 1.
    pub optimizer_state_bytes: u64,
    /// Weight and compute dtype actually used.
    pub dtype: String,
    /// AdamW state dtype actually used.
    pub state_dtype: String,
    /// Phases in order.
    pub phases: Vec<PhaseRecord>,
    /// Loss (nats) of each completed step.
    pub losses: Vec<f64>,
    /// Forward + backward + optimizer seconds of each completed step.
    pub step_seconds: Vec<f64>,
}

impl Measurement {
    /// The phase named `name`, if measured.
    pub fn phase(&self, name: &str) -> Option<&PhaseRecord> {
        self.phases.iter().find(|p| p.name == name)
    }

    /// Highest peak over all phases and the phase holding it.
    pub fn peak(&self) -> Option<(&str, u64)> {
        self.phases
            .iter()
            .max_by_key(|p| p.peak_allocated_bytes)
            .map(|p| (p.name.as_str(), p.peak_allocated_bytes))
    }
}

fn phase<T>(
    probe: &dyn MemoryProbe,
    out: &mut Measurement,
    name: &str,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    probe.synchronize()?;
    probe.reset_peak()?;
    let t0 = Instant::now();
    let r = f()?;
    probe.synchronize()?;
    let seconds = t0.elapsed().as_secs_f64();
    let rd = probe.read()?;
    out.phases.push(PhaseRecord {
        name: name.to_string(),
        peak_allocated_bytes: rd.peak_allocated_bytes,
        end_allocated_bytes: rd.allocated_bytes,
        peak_reserved_bytes: rd.peak_reserved_bytes,
        end_device_bytes: rd.device_used_bytes,
        seconds,
    });
    Ok(r)
}

/// A random batch: inputs `(batch, seq)` and next-token targets `(batch, seq)` (u32), cut from
/// `batch` random sequences of `seq + 1` tokens.
///
/// # Errors
/// [`Error::Candle`].
pub fn random_batch(
    spec: &TrainSpec,
    vocab: usize,
    step: u64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut rng = StdRng::seed_from_u64(spec.data_seed.wrapping_mul(1_000_003).wrapping_add(step));
    let n = spec.batch * (spec.seq + 1);
    let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
    let all = Tensor::from_vec(ids, (spec.batch, spec.seq + 1), device)?;
    Ok((
        all.narrow(1, 0, spec.seq)?.contiguous()?,
        all.narrow(1, 1, spec.seq)?.contiguous()?,
    ))
}

/// Backward pass from `loss`, keeping only the parameters' gradients (detached, in
/// [`Decoder::named_vars`] order) and dropping candle's `GradStore` and the graph.
///
/// # Errors
/// [`Error::InvalidValue`] if a parameter received no gradient; [`Error::Candle`].
pub fn param_grads(model: &Decoder, loss: Tensor) -> Result<Vec<Tensor>> {
    let store = loss.backward()?;
    let mut grads = Vec::new();
    for (name, v) in model.named_vars() {
        let g = store
            .get(v)
            .ok_or_else(|| Error::invalid("gradient", &name, "parameter received no gradient"))?;
        grads.push(g.detach());
    }
    drop(store);
    drop(loss);
    Ok(grads)
}

/// Runs the protocol for `setup`, recording into `out` as it goes.
///
/// # Errors
/// [`Error::InvalidValue`]/[`Error::SeqTooLong`] from validation (before anything runs),
/// weight-loading errors in `load`, [`Error::Candle`] from the step. On error `out` keeps the
/// phases completed so far.
pub fn measure(setup: &Setup, probe: &dyn MemoryProbe, out: &mut Measurement) -> Result<()> {
    let cfg = &setup.model.config;
    let spec = &setup.spec;
    spec.validate(cfg)?;
    out.device = probe.device_name();
    out.params = cfg.param_count();
    out.trainable_params = cfg.param_count();
    out.dtype = spec.dtype.as_str().to_string();
    out.state_dtype = spec.state_dtype.as_str().to_string();
    probe.synchronize()?;
    out.baseline_bytes = probe.read()?.allocated_bytes;

    let model = phase(probe, out, "load", || {
        let mut src = open_source(&setup.weights)?;
        Decoder::new(cfg, src.as_mut(), spec.dtype, &setup.device)
    })?;
    out.param_bytes = model.param_bytes();
    let vars: Vec<_> = model
        .named_vars()
        .into_iter()
        .map(|(_, v)| v.clone())
        .collect();
    let mut opt = phase(probe, out, "optimizer_init", || {
        AdamW::new(vars, spec.adamw, spec.state_dtype)
    })?;

    for step in 1..=2u64 {
        let (inputs, targets) = random_batch(spec, cfg.vocab_size, step, &setup.device)?;
        let loss = phase(probe, out, &format!("step{step}_forward"), || {
            model.loss(&inputs, &targets)
        })?;
        let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !loss_value.is_finite() {
            return Err(Error::invalid(
                "loss",
                loss_value,
                "the forward pass produced a non-finite loss",
            ));
        }
        let grads = phase(probe, out, &format!("step{step}_backward"), || {
            let store = loss.backward()?;
            let mut grads = Vec::new();
            for (name, v) in model.named_vars() {
                let g = store.get(v).ok_or_else(|| {
                    Error::invalid("gradient", &name, "parameter received no gradient")
                })?;
                grads.push(g.detach());
            }
            drop(store);
            drop(loss);
            Ok(grads)
        })?;
        if step == 1 {
            out.grad_bytes = grads
                .iter()
                .map(|g| (g.elem_count() * g.dtype().size_in_bytes()) as u64)
                .sum();
        }
        phase(probe, out, &format!("step{step}_optimizer_step"), || {
            opt.step(&grads)?;
            drop(grads);
            Ok(())
        })?;
        if step == 1 {
            out.optimizer_state_bytes = opt.state_bytes();
        }
        let n = out.phases.len();
        out.step_seconds
            .push(out.phases[n - 3..].iter().map(|p| p.seconds).sum());
        out.losses.push(loss_value);
    }
    Ok(())
}
