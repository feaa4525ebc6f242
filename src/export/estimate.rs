//! `vramcal estimate`'s answer as text (the itemized table, reference formulas, the verdict
//! and the changes that make it fit) and as JSON.

use crate::estimate::multi::Placement;
use crate::estimate::references::Reference;
use crate::estimate::Estimate;
use crate::size::gib;
use crate::spec::{Offload, Profile, Sharding, TrainSpec};

/// What `vramcal estimate` answers for one configuration.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The model's name (preset, config path or Hub id).
    pub model: String,
    /// Its configuration.
    pub model_config: crate::config::ModelConfig,
    /// The configuration estimated.
    pub spec: TrainSpec,
    /// The stack it is estimated for.
    pub profile: Profile,
    /// Where the coefficients come from (`uncalibrated` or the table's path).
    pub coefficients: String,
    /// The itemized estimate (per GPU under `sharding`).
    pub estimate: Estimate,
    /// Published rules of thumb for the same configuration.
    pub references: Vec<Reference>,
    /// The memory to fit in: its name (a GPU or `--budget`) and bytes.
    pub budget: Option<(String, u64)>,
    /// Changes that would make it fit, with their estimates (empty when it fits).
    pub fixes: Vec<(String, Estimate)>,
    /// Data-parallel sharding and GPUs (`--shard`, `--gpus`).
    pub sharding: Option<Sharding>,
    /// Layers placed on devices (`--device-map`).
    pub device_map: Option<Vec<Placement>>,
    /// The largest micro-batch of `--seq-lengths`, where given.
    pub data: Option<crate::data::WorstBatch>,
    /// Measured rows of this configuration, and the files searched (`--measured`).
    pub measured: crate::calibrate::compare::MeasuredRows,
}

/// The answer as pretty-printed JSON (one object, trailing newline).
///
/// # Errors
/// JSON serialization errors.
pub fn json(x: &Answer) -> anyhow::Result<String> {
    let e = &x.estimate;
    let v = serde_json::json!({
        "profile": x.profile.name(),
        "stack": x.profile.stack(),
        "model": x.model,
        "method": x.spec.adaptation.method(),
        "quant": x.spec.adaptation.quant.label(),
        "lora": x.spec.adaptation.lora.as_ref().map(|l| serde_json::json!({
            "r": l.r,
            "alpha": l.alpha,
            "dropout": l.dropout,
            "targets": l.target_names(),
            "all_linear": l.all_linear,
            "modules_to_save": l.saved_names(),
        })),
        "checkpointing": x.spec.checkpointing.label(),
        "dtype": x.spec.dtype.as_str(),
        "precision": x.spec.precision.map(|p| p.to_string()),
        "optimizer": x.spec.optimizer.to_string(),
        // The implementation of torch's AdamW counted (`--torch-adamw`, else torch's default
        // for the device); null where torch's AdamW does not step (another optimizer, the
        // candle profile).
        "torch_adamw": (x.profile != Profile::Candle
            && x.spec.optimizer == crate::spec::Optimizer::AdamwTorch)
            .then(|| if x.spec.torch_adamw_for_loop() { "for-loop" } else { "foreach" }),
        "loss": x.spec.loss.label(),
        "trainable_params": x.spec.trainable_params(&x.model_config),
        "micro_batch": x.spec.batch,
        "accumulate": x.spec.accumulate,
        "seq": x.spec.seq,
        "estimate": e,
        "references": x.references,
        "budget": x.budget.as_ref().map(|(n, b)| serde_json::json!({"name": n, "bytes": b, "needed_bytes": e.needed_bytes(), "fits": e.needed_bytes() <= *b})),
        "alternatives": x.fixes.iter().map(|(n, f)| serde_json::json!({"change": n, "peak_bytes": f.peak_bytes, "reserved_bytes": f.reserved_bytes})).collect::<Vec<_>>(),
        "sharding": x.sharding.map(|s| serde_json::json!({
            "shard": s.shard,
            "gpus": s.gpus,
            "offload": s.offload,
            "reduce_bucket_elements": (s.deepspeed() && (x.profile != Profile::Candle || s.shard == crate::spec::Shard::Zero3)).then_some(s.reduce_bucket_elements),
            "gpus_per_node": s.gpus_per_node,
            "host_bytes_per_rank": e.host_bytes_per_rank,
            "host_bytes_per_node": e.host_bytes_per_rank.map(|h| h * s.gpus_per_node as u64),
        })),
        "device_map": x.device_map,
        "data": x.data.as_ref().map(crate::data::WorstBatch::json),
        "autocast": autocast(x).map(|(w, i)| serde_json::json!({"weight_copies_bytes": w, "input_copies_bytes": i})),
        "measured": x.measured.rows,
        "measured_search": (x.measured.files > 0).then(|| serde_json::json!({
            "files": x.measured.files,
            "other_stack_files": x.measured.other_stack,
        })),
    });
    Ok(format!("{}\n", serde_json::to_string_pretty(&v)?))
}

/// The answer as the text `vramcal estimate` prints: the stack, the configuration, the items
/// (bytes and GiB = 2^30 bytes), reference formulas, the verdict and the fixes.
pub fn text(x: &Answer) -> String {
    let mut t = header(x);
    t += &items(&x.estimate);
    if let Some((w, i)) = autocast(x) {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        t += &format!(
            "autocast ({}): of the saved activations, 16-bit weight copies {w} bytes ({:.2} GiB) and 16-bit input copies {i} bytes ({:.2} GiB), kept for backward{}\n",
            x.spec.precision.map_or(String::new(), |p| p.to_string()),
            gib(w),
            gib(i),
            match x.estimate.peak_phase.as_str() {
                "optimizer_step" => " (freed before the peak, at the optimizer step)",
                _ => "",
            }
        );
    }
    if let Some(s) = &x.sharding {
        t += &format!(
            "(per GPU: {} over {} data-parallel GPU{}; activations per GPU{})\n",
            s.shard,
            s.gpus,
            if s.gpus == 1 { "" } else { "s" },
            match s.offload {
                Offload::None => String::new(),
                o => format!("; --offload {o}"),
            }
        );
        if let Some(h) = x.estimate.host_bytes_per_rank {
            t += &format!(
                "host RAM for the offloaded state: {h} bytes ({} GiB) per rank, {} bytes ({} GiB) per node of {} GPU{}\n",
                gib(h),
                h * s.gpus_per_node as u64,
                gib(h * s.gpus_per_node as u64),
                s.gpus_per_node,
                if s.gpus_per_node == 1 { "" } else { "s" }
            );
        }
    }
    if let Some(map) = &x.device_map {
        t += &device_map(map);
    }
    t += &references(x);
    t += &measured(x);
    if let Some((name, b)) = &x.budget {
        t += &verdict(x, name, *b);
    }
    t
}

/// The `--measured` rows of this configuration beside the estimate, each with the estimate's
/// error against it where it ran on the estimate's kind of device; a line saying none matched
/// where files were given.
fn measured(x: &Answer) -> String {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let m = &x.measured;
    let mut t = String::new();
    if m.files > 0 && m.rows.is_empty() {
        t += &format!(
            "measured: no row of this configuration in the {} file{} given{}\n",
            m.files,
            if m.files == 1 { "" } else { "s" },
            match (m.other_stack, x.profile) {
                (0, _) => String::new(),
                (n, Profile::Candle) => format!(
                    " ({n} file{} of reference rows, which --profile candle does not search)",
                    if n == 1 { "" } else { "s" }
                ),
                (n, _) => format!(
                    " ({n} file{} of vramcal's own rows, which only --profile candle searches)",
                    if n == 1 { "" } else { "s" }
                ),
            }
        );
    }
    for r in &m.rows {
        let off = match r.relative_error {
            Some(e) => format!(
                "the estimate ({} bytes, {}) is {:.1} % {} it",
                r.predicted_bytes,
                r.counter,
                100.0 * e.abs(),
                if e >= 0.0 { "over" } else { "under" }
            ),
            None => "on another kind of device than the estimate's (the CPU and a GPU run other kernels): not compared".into(),
        };
        t += &format!(
            "measured ({}, {} on {}): {} bytes ({:.2} GiB); {off}\n",
            r.id,
            r.counter,
            r.device,
            r.peak_bytes,
            gib(r.peak_bytes),
        );
    }
    t
}

/// autocast's 16-bit copies among the saved tensors, `(weights, inputs)` bytes, for the torch
/// profiles under an autocast recipe ([`crate::estimate::torch::autocast_copies`]).
fn autocast(x: &Answer) -> Option<(u64, u64)> {
    match x.profile {
        Profile::Candle => None,
        p => crate::estimate::torch::autocast_copies(
            &x.model_config,
            &x.spec,
            p == Profile::TorchEager,
        ),
    }
}

/// The first two lines: the stack the number is for, and the configuration.
fn header(x: &Answer) -> String {
    let spec = &x.spec;
    let lora = super::lora_suffix(spec);
    let mut t = format!(
        "vramcal estimate for {} (--profile {}; {})\n",
        x.profile.stack(),
        x.profile.name(),
        if x.profile == Profile::Candle {
            "the default, torch-sdpa, predicts a PyTorch + transformers run"
        } else {
            "--profile candle predicts vramcal's own step"
        }
    );
    let dtype = match spec.precision {
        Some(p) => format!("precision {p} (weights {})", spec.dtype.as_str()),
        None => format!("dtype {}", spec.dtype.as_str()),
    };
    let mut states = match spec.optimizer {
        crate::spec::Optimizer::AdamwTorch => format!("AdamW states {}", spec.state_dtype.as_str()),
        crate::spec::Optimizer::Sgd if spec.momentum > 0.0 => {
            format!("optimizer sgd (momentum {})", spec.momentum)
        }
        o => format!("optimizer {o}"),
    };
    if spec.loss != crate::spec::Loss::Transformers {
        states += &format!(" | loss {}", spec.loss);
    }
    t += &format!(
        "{} | {}{lora} ({} trainable params) | quant {} | checkpointing {} | {dtype} | {states} | micro-batch {} x accumulate {} x seq {} | coefficients {}\n",
        x.model,
        spec.adaptation.method(),
        spec.trainable_params(&x.model_config),
        spec.adaptation.quant.label(),
        spec.checkpointing.label(),
        spec.batch,
        spec.accumulate,
        spec.seq,
        x.coefficients
    );
    if let Some(d) = &x.data {
        t += &d.describe();
        t += "\n";
    }
    t
}

/// The items and the predicted peak, one per line.
fn items(e: &Estimate) -> String {
    let mut t = String::new();
    t += &format!("{:<32} {:>16} {:>9}  formula\n", "item", "bytes", "GiB");
    for i in &e.items {
        t += &format!(
            "{:<32} {:>16} {:>9}  {}\n",
            i.name,
            i.bytes,
            gib(i.bytes),
            i.formula
        );
    }
    t += &format!(
        "{:<32} {:>16} {:>9}  in {}\n",
        "peak (predicted)",
        e.peak_bytes,
        gib(e.peak_bytes),
        e.peak_phase
    );
    if let Some(r) = e.reserved_bytes {
        t += &format!(
            "{:<32} {:>16} {:>9}  allocated + the caching allocator's cached blocks (fitted)\n",
            "peak reserved (predicted)",
            r,
            gib(r)
        );
    }
    t
}

/// Which layers go on which device, one line per device.
fn device_map(map: &[Placement]) -> String {
    let mut t = String::from("device map (weights only, layers in order):\n");
    let mut dev = usize::MAX;
    for p in map {
        if p.device != dev {
            dev = p.device;
            let on: Vec<&str> = map
                .iter()
                .filter(|q| q.device == dev)
                .map(|q| q.module.as_str())
                .collect();
            let bytes: u64 = map
                .iter()
                .filter(|q| q.device == dev)
                .map(|q| q.bytes)
                .sum();
            t += &format!(
                "  device {dev}: {} .. {} ({} modules, {} GiB)\n",
                on[0],
                on[on.len() - 1],
                on.len(),
                gib(bytes)
            );
        }
    }
    t
}

/// The reference formulas beside vramcal's estimate.
fn references(x: &Answer) -> String {
    let mut t = String::new();
    // Under data parallelism the formulas still describe the whole model on one GPU: no
    // comparison with the per-GPU peak.
    let sharded = x.sharding.is_some();
    t += if sharded {
        "reference formulas (GiB = 2^30 bytes; the whole model on one GPU, not per GPU):\n"
    } else {
        "reference formulas (GiB = 2^30 bytes):\n"
    };
    for r in &x.references {
        let vs = if sharded {
            String::new()
        } else {
            format!(
                "  {:+.1} % vs vramcal",
                100.0 * (r.bytes as f64 - x.estimate.peak_bytes as f64)
                    / x.estimate.peak_bytes as f64
            )
        };
        t += &format!(
            "  {:<26} {:>16} {:>9}{vs}  [{}]\n",
            r.name,
            r.bytes,
            gib(r.bytes),
            r.source
        );
    }
    t
}

/// Whether it fits `b` bytes of `name`, and if not, the fixes that fit (least memory saved
/// first).
fn verdict(x: &Answer, name: &str, b: u64) -> String {
    let mut t = String::new();
    let need = x.estimate.needed_bytes();
    let of = if x.estimate.reserved_bytes.is_some() {
        " (predicted reserved peak)"
    } else {
        ""
    };
    if need <= b {
        t += &format!(
            "verdict: fits in {name} ({} GiB): headroom {} GiB{of}\n",
            gib(b),
            gib(b - need)
        );
    } else {
        t += &format!(
            "verdict: does NOT fit in {name} ({} GiB): {} GiB over{of}\n",
            gib(b),
            gib(need - b)
        );
        let mut fit: Vec<&(String, Estimate)> = x
            .fixes
            .iter()
            .filter(|(_, x)| x.needed_bytes() <= b)
            .collect();
        fit.sort_by_key(|(_, x)| std::cmp::Reverse(x.needed_bytes()));
        if fit.is_empty() {
            t += "  no single change makes it fit (each tried alone and with checkpointing: a smaller micro-batch, 16-bit AdamW states, 8-bit or paged AdamW (PyTorch), LoRA, QLoRA, LoRA on fewer modules; ZeRO-2/3 over up to 8 GPUs; ZeRO-Offload on one GPU)\n";
        } else {
            t += "  changes that make it fit (least memory saved first):\n";
            for (n, x) in fit {
                t += &format!("    {n}: {} GiB\n", gib(x.needed_bytes()));
            }
        }
    }
    t
}
