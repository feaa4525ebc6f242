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
//!   `zero_grad(set_to_none=True)`);
//! * `save` (optional): the trained tensors or the merged model written to disk.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::config::ResolvedModel;
use crate::error::{Error, Result};
use crate::measure::fsdp::FsdpRank;
use crate::measure::probe::MemoryProbe;
use crate::measure::sharded::Rank;
use crate::measure::zero3::Zero3Rank;
use crate::model::{Decoder, ForwardCtx};
use crate::spec::SaveMode;
use crate::spec::TrainSpec;
use crate::spec::WeightsSpec;
use crate::spec::{Shard, Sharding};
use crate::weights::open_source;

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
    /// A simulated data-parallel rank (`--shard`, `--world-size`, `--rank`;
    /// [`crate::measure::sharded`]); `None`: one device.
    pub sharding: Option<Sharding>,
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
    /// The counter `allocated` comes from ([`MemoryProbe::counter`]).
    #[serde(default)]
    pub counter: String,
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
    /// Bytes written by the `save` phase, if it ran.
    pub saved_bytes: Option<u64>,
}

/// Median of the steady-state step times (step 2 and any extra timed steps), seconds.
pub fn median_step_seconds(m: &Measurement) -> Option<f64> {
    let mut t: Vec<f64> = m.step_seconds.iter().skip(1).copied().collect();
    if t.is_empty() {
        return None;
    }
    t.sort_by(f64::total_cmp);
    let n = t.len();
    Some(if n % 2 == 1 {
        t[n / 2]
    } else {
        (t[n / 2 - 1] + t[n / 2]) / 2.0
    })
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

/// What the protocol reports as it goes (for a parent process streaming a child's progress).
pub enum Event<'a> {
    /// A phase is starting.
    Started(&'a str),
    /// A phase ended; the measurement so far.
    Finished(&'a Measurement),
}

/// Options of a measurement beyond its [`Setup`].
#[derive(Default)]
pub struct Options<'a> {
    /// Folder the `save` phase writes into (default: a temporary folder, removed afterwards).
    pub save_dir: Option<&'a Path>,
    /// Extra steps after step 2, timed only (no phase records), for the median step time.
    pub timed_steps: usize,
    /// Called at each phase start and end.
    pub on_event: Option<&'a mut dyn FnMut(Event<'_>)>,
}

/// Test hook: `VRAMCAL_FAULT=panic:<phase>` makes the protocol panic when `<phase>` starts,
/// so tests can check that a crashing point is recorded and a sweep goes on.
fn injected_fault(name: &str) {
    if let Ok(f) = std::env::var("VRAMCAL_FAULT") {
        if f.strip_prefix("panic:") == Some(name) {
            panic!("fault injected by VRAMCAL_FAULT at {name}");
        }
    }
}

fn phase<T>(
    probe: &dyn MemoryProbe,
    out: &mut Measurement,
    ev: &mut Option<&mut dyn FnMut(Event<'_>)>,
    name: &str,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    if let Some(cb) = ev.as_mut() {
        cb(Event::Started(name));
    }
    injected_fault(name);
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
    if let Some(cb) = ev.as_mut() {
        cb(Event::Finished(out));
    }
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

/// Backward pass from `loss` of a plain [`Decoder::loss`], keeping only the trainable
/// tensors' gradients (detached, in [`Decoder::trainable_vars`] order) and dropping candle's
/// `GradStore` and the graph.
///
/// # Errors
/// [`Error::InvalidValue`] if a trainable tensor received no gradient; [`Error::Candle`].
pub fn param_grads(model: &Decoder, loss: Tensor) -> Result<Vec<Tensor>> {
    let store = loss.backward()?;
    drop(loss);
    model
        .trainable_vars()
        .iter()
        .map(|(name, v)| {
            store
                .get(v)
                .map(|g| g.detach())
                .ok_or_else(|| Error::invalid("gradient", name, "parameter received no gradient"))
        })
        .collect()
}

/// Adds `g` into `acc` tensor by tensor, in place (as PyTorch accumulates into `.grad`): the
/// transient is one tensor-sized sum at a time.
fn accumulate_into(acc: &[Tensor], g: Vec<Tensor>) -> Result<()> {
    for (a, g) in acc.iter().zip(g) {
        let sum = (a + &g)?;
        drop(g);
        a.slice_set(&sum, 0, 0)?;
    }
    Ok(())
}

/// A simulated rank that gathers its parameters around the modules that use them.
// One value per measurement, on the stack: boxing it would add a counted allocation.
#[allow(clippy::large_enum_variant)]
enum Gathering {
    /// FSDP2 ([`crate::measure::fsdp`]).
    Fsdp(FsdpRank),
    /// DeepSpeed ZeRO-3 ([`crate::measure::zero3`]).
    Zero3(Zero3Rank),
}

/// The training forward pass; on a simulated FSDP rank with the root gathered first and each
/// layer gathered around its forward, on a ZeRO-3 rank each module gathered around its own.
fn forward(
    model: &Decoder,
    gathering: Option<&mut Gathering>,
    inputs: &Tensor,
    targets: &Tensor,
    spec: &TrainSpec,
    ctx: ForwardCtx,
) -> Result<crate::model::TrainForward> {
    match gathering {
        Some(Gathering::Fsdp(f)) => {
            f.gather_root()?;
            model.forward_train_with(inputs, targets, spec.checkpointing, ctx, Some(f))
        }
        Some(Gathering::Zero3(z)) => {
            model.forward_train_with(inputs, targets, spec.checkpointing, ctx, Some(&mut *z))
        }
        None => model.forward_train(inputs, targets, spec.checkpointing, ctx),
    }
}

/// One micro-batch's backward, its gradients added to the step's `grads` ([`gather_grads`]);
/// on a simulated FSDP rank each layer's gradients reduce-scattered as its backward ends and
/// the sharded ones taken into `grads` at the last micro-batch; on a ZeRO-3 rank each module's
/// gradients put in its bucket, reduced into its flat partition (`grads` left empty: the step
/// takes them there).
fn backward(
    model: &Decoder,
    gathering: Option<&mut Gathering>,
    rank: Option<&Rank>,
    fwd: crate::model::TrainForward,
    grads: &mut Option<Vec<Tensor>>,
    last: bool,
) -> Result<()> {
    match gathering {
        Some(Gathering::Fsdp(f)) => {
            let left = model.backward_with(fwd, Some(&mut *f))?;
            f.finish_backward(left)?;
            if last {
                *grads = Some(f.take_grads()?);
            }
        }
        Some(Gathering::Zero3(z)) => {
            let left = model.backward_with(fwd, Some(&mut *z))?;
            z.finish_backward(left)?;
            *grads = Some(Vec::new());
        }
        None => {
            let g = model.backward(fwd)?;
            *grads = Some(gather_grads(rank, grads.take(), g, last)?);
        }
    }
    Ok(())
}

/// One micro-batch's gradients `g` (one per trainable tensor) added to those of the step so
/// far (`acc`). On a simulated rank, at the last micro-batch DDP all-reduces them in its
/// buckets (the earlier ones run under `no_sync`, as the HF Trainer's accumulation does), and
/// ZeRO-2 reduce-scatters every micro-batch's into its partition, which then holds the step's
/// gradients.
fn gather_grads(
    rank: Option<&Rank>,
    acc: Option<Vec<Tensor>>,
    g: Vec<Tensor>,
    last: bool,
) -> Result<Vec<Tensor>> {
    match rank {
        Some(r) if r.scatters_in_backward() => r.reduce_scatter(g, acc),
        _ => {
            let mut sum = match acc {
                None => g,
                Some(acc) => {
                    accumulate_into(&acc, g)?;
                    acc
                }
            };
            if let (Some(r), true) = (rank, last) {
                r.all_reduce(&mut sum)?;
            }
            Ok(sum)
        }
    }
}

/// The optimizer step from the step's `grads`, which are then freed (PyTorch's
/// `zero_grad(set_to_none=True)`). On a ZeRO rank `opt` steps the partition `opt_vars`: ZeRO-1
/// first reduce-scatters the full gradients into it (ZeRO-2 did in backward), and the stepped
/// partition is copied back into the parameters `vars` (the all-gather). A ZeRO-3 rank steps
/// its partitions from its flat gradient partition ([`Zero3Rank::begin_step`]).
fn apply_step(
    rank: Option<&Rank>,
    gathering: Option<&mut Gathering>,
    opt: &mut dyn crate::optim::Optim,
    grads: Vec<Tensor>,
    vars: &[candle_core::Var],
    opt_vars: &[candle_core::Var],
) -> Result<()> {
    if let Some(Gathering::Zero3(z)) = gathering {
        let grads = z.begin_step()?;
        opt.step(&grads)?;
        drop(grads);
        return z.end_step();
    }
    let grads = match rank {
        Some(r) if r.scatters_at_step() => r.reduce_scatter(grads, None)?,
        _ => grads,
    };
    opt.step(&grads)?;
    drop(grads);
    if let Some(r) = rank {
        r.all_gather(vars, opt_vars)?;
    }
    Ok(())
}

/// Merges the records from index `from` on into one record per name of `names`, in that
/// order: highest peak, last end, summed time (the micro-batches of one step).
fn merge_phases(out: &mut Measurement, from: usize, names: &[String]) {
    let recs: Vec<PhaseRecord> = out.phases.drain(from..).collect();
    for name in names {
        let same: Vec<&PhaseRecord> = recs.iter().filter(|p| &p.name == name).collect();
        out.phases.push(PhaseRecord {
            name: name.clone(),
            peak_allocated_bytes: same
                .iter()
                .map(|p| p.peak_allocated_bytes)
                .max()
                .unwrap_or(0),
            end_allocated_bytes: same.last().map_or(0, |p| p.end_allocated_bytes),
            peak_reserved_bytes: same.iter().filter_map(|p| p.peak_reserved_bytes).max(),
            end_device_bytes: same.last().and_then(|p| p.end_device_bytes),
            seconds: same.iter().map(|p| p.seconds).sum(),
        });
    }
}

/// Runs the protocol for `setup`, recording into `out` as it goes.
///
/// Each step runs `accumulate` micro-batches (forward, backward, gradients summed in place),
/// then one AdamW update; the `forward` and `backward` records of a step cover all its
/// micro-batches (highest peak, summed time). With [`SaveMode`] other than `None`, a `save`
/// phase follows step 2, writing into `save_dir` (a temporary folder, removed afterwards,
/// when `None`).
///
/// # Errors
/// [`Error::InvalidValue`]/[`Error::SeqTooLong`] from validation (before anything runs),
/// weight-loading errors in `load`, [`Error::Candle`] from the step, [`Error::Io`] from the
/// save. On error `out` keeps the phases completed so far.
pub fn measure(setup: &Setup, probe: &dyn MemoryProbe, out: &mut Measurement) -> Result<()> {
    measure_with(setup, probe, out, Options::default())
}

/// [`measure`] with [`Options`].
///
/// # Errors
/// As [`measure`].
pub fn measure_with(
    setup: &Setup,
    probe: &dyn MemoryProbe,
    out: &mut Measurement,
    opts: Options<'_>,
) -> Result<()> {
    let Options {
        save_dir,
        timed_steps,
        on_event: mut ev,
    } = opts;
    let cfg = &setup.model.config;
    let spec = &setup.spec;
    spec.validate(cfg)?;
    out.device = probe.device_name();
    out.counter = probe.counter().to_string();
    out.dtype = spec.dtype.as_str().to_string();
    out.state_dtype = spec.state_dtype.as_str().to_string();
    out.trainable_params = spec.trainable_params(cfg);
    out.params = cfg.param_count()
        + if spec.adaptation.lora.is_some() {
            out.trainable_params
        } else {
            0
        };
    if setup.device.is_cpu() {
        crate::measure::alloc::warm_cpu_threads();
    }
    probe.synchronize()?;
    out.baseline_bytes = probe.begin()?;

    let mut model = phase(probe, out, &mut ev, "load", || {
        let mut src = open_source(&setup.weights)?;
        Decoder::for_spec(cfg, src.as_mut(), &setup.device, spec)
    })?;
    model.set_attention(spec.attention);
    out.params = model.param_count();
    out.trainable_params = model.trainable_count();
    out.param_bytes = model.param_bytes();
    let vars: Vec<_> = model.trainable_vars().into_iter().map(|(_, v)| v).collect();
    let gathering_sharding = setup.sharding.filter(|s| s.shard.shards_parameters());
    let mut rank = setup
        .sharding
        .filter(|s| !s.shard.shards_parameters())
        .map(|s| Rank::new(s, &vars))
        .transpose()?;
    let mut gathering: Option<Gathering> = None;
    // A simulated rank: DDP's buckets are made at wrapping, ZeRO's partition with the
    // optimizer, FSDP's shards by `fully_shard`, ZeRO-3's partitions and buffers at its
    // initialization; all here.
    let (mut opt, opt_vars) = phase(probe, out, &mut ev, "optimizer_init", || {
        let ov = match (rank.as_mut(), gathering_sharding) {
            (_, Some(s)) if s.shard == Shard::Zero3 => {
                let z = Zero3Rank::new(&s, &model)?;
                let ov = z.optimizer_vars();
                gathering = Some(Gathering::Zero3(z));
                ov
            }
            (_, Some(s)) => {
                let f = FsdpRank::new(&s, &model)?;
                let ov = f.optimizer_vars();
                gathering = Some(Gathering::Fsdp(f));
                ov
            }
            (Some(r), None) => {
                r.broadcast(
                    &crate::estimate::torch::ddp_broadcast_buckets(cfg, spec),
                    &setup.device,
                )?;
                r.wrap(&vars)?;
                r.optimizer_vars(&vars)?
            }
            (None, None) => vars.clone(),
        };
        Ok((crate::optim::build(ov.clone(), spec)?, ov))
    })?;
    let rank = rank;

    for step in 1..=2u64 {
        let first = out.phases.len();
        let mut grads: Option<Vec<Tensor>> = None;
        for micro in 0..spec.accumulate as u64 {
            let batch_id = (step - 1) * spec.accumulate as u64 + micro;
            let (inputs, targets) =
                random_batch(spec, cfg.vocab_size, batch_id + 1, &setup.device)?;
            let ctx = ForwardCtx {
                train: true,
                seed: spec.data_seed ^ (batch_id << 20),
            };
            let fwd = phase(probe, out, &mut ev, &format!("step{step}_forward"), || {
                forward(&model, gathering.as_mut(), &inputs, &targets, spec, ctx)
            })?;
            let loss_value = fwd.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !loss_value.is_finite() {
                return Err(Error::invalid(
                    "loss",
                    loss_value,
                    "the forward pass produced a non-finite loss",
                ));
            }
            if micro == 0 {
                out.losses.push(loss_value);
            }
            let last = micro + 1 == spec.accumulate as u64;
            phase(probe, out, &mut ev, &format!("step{step}_backward"), || {
                backward(
                    &model,
                    gathering.as_mut(),
                    rank.as_ref(),
                    fwd,
                    &mut grads,
                    last,
                )
            })?;
        }
        merge_phases(
            out,
            first,
            &[
                format!("step{step}_forward"),
                format!("step{step}_backward"),
            ],
        );
        let grads = grads.expect("accumulate >= 1");
        if step == 1 {
            // The gradients as a one-device step holds them (under ZeRO-2 this rank keeps
            // only its partition of them by now).
            out.grad_bytes = vars
                .iter()
                .map(|v| (v.elem_count() * v.dtype().size_in_bytes()) as u64)
                .sum();
        }
        phase(
            probe,
            out,
            &mut ev,
            &format!("step{step}_optimizer_step"),
            || {
                apply_step(
                    rank.as_ref(),
                    gathering.as_mut(),
                    opt.as_mut(),
                    grads,
                    &vars,
                    &opt_vars,
                )
            },
        )?;
        if step == 1 {
            out.optimizer_state_bytes = opt.state_bytes();
        }
        let n = out.phases.len();
        out.step_seconds
            .push(out.phases[n - 3..].iter().map(|p| p.seconds).sum());
    }

    for extra in 0..timed_steps as u64 {
        let t0 = Instant::now();
        let mut grads: Option<Vec<Tensor>> = None;
        for micro in 0..spec.accumulate as u64 {
            let batch_id = (2 + extra) * spec.accumulate as u64 + micro;
            let (inputs, targets) =
                random_batch(spec, cfg.vocab_size, batch_id + 1, &setup.device)?;
            let ctx = ForwardCtx {
                train: true,
                seed: spec.data_seed ^ (batch_id << 20),
            };
            let fwd = forward(&model, gathering.as_mut(), &inputs, &targets, spec, ctx)?;
            let last = micro + 1 == spec.accumulate as u64;
            backward(
                &model,
                gathering.as_mut(),
                rank.as_ref(),
                fwd,
                &mut grads,
                last,
            )?;
        }
        apply_step(
            rank.as_ref(),
            gathering.as_mut(),
            opt.as_mut(),
            grads.expect("accumulate >= 1"),
            &vars,
            &opt_vars,
        )?;
        probe.synchronize()?;
        out.step_seconds.push(t0.elapsed().as_secs_f64());
    }

    if spec.save != SaveMode::None {
        let tmp;
        let dir = match save_dir {
            Some(d) => d,
            None => {
                tmp = std::env::temp_dir().join(format!("vramcal-save-{}", std::process::id()));
                tmp.as_path()
            }
        };
        let written = phase(probe, out, &mut ev, "save", || match spec.save {
            SaveMode::Merged => model.merge_and_save(dir),
            _ => model.save_trained(dir, &setup.model.name),
        });
        if save_dir.is_none() {
            let _ = std::fs::remove_dir_all(dir);
        }
        out.saved_bytes = Some(written?);
    }
    Ok(())
}
