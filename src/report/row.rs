//! One measured point as one CSV row. Column names come from the field names; sizes end in
//! `_bytes`, times in `_seconds`. Documented in docs/csv-schema.md.

use serde::{Deserialize, Serialize};

use crate::measure::Measurement;
use crate::spec::TrainSpec;

/// Outcome of a measured point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// All phases ran.
    Ok,
    /// Ran out of memory (device OOM or `--budget`).
    Oom,
    /// Failed for another reason; see `message`.
    Error,
}

/// Context of a row that the measurement itself does not know.
#[derive(Debug, Clone)]
pub struct RowContext {
    /// The command line that produced the row.
    pub command: String,
    /// Model name.
    pub model: String,
    /// Weights description (`random(seed=0)`, `gguf:file.gguf`, …).
    pub weights: String,
    /// Device requested (used when the measurement failed before the probe named it).
    pub device: String,
    /// The `--budget` cap on allocated bytes, if any.
    pub budget_bytes: Option<u64>,
    /// Model FLOPs per token of this configuration ([`crate::throughput::model_flops_per_token`]).
    pub model_flops_per_token: Option<f64>,
    /// The simulated data-parallel rank, if any (`--shard`, `--world-size`, `--rank`).
    pub sharding: Option<crate::spec::Sharding>,
    /// Whether the model is a mixture of experts, whose `all-linear` rows record the word
    /// ([`crate::spec::LoraConfig::targets_label`]).
    pub moe: bool,
}

/// One CSV row. Phase columns are `<phase>_peak_bytes` (highest allocated bytes during the
/// phase) and `<phase>_end_bytes` (allocated bytes at its end). Empty cells mean "not
/// measured" (a phase not reached, a counter the device lacks, an option not used).
#[allow(missing_docs)]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub tool_version: String,
    pub utc_time: String,
    pub host: String,
    pub device: String,
    pub command: String,
    pub model: String,
    pub weights: String,
    pub params: u64,
    pub trainable_params: u64,
    pub dtype: String,
    pub optimizer: String,
    pub optimizer_state_dtype: String,
    #[serde(default)]
    pub precision: String,
    #[serde(default)]
    pub momentum: Option<f64>,
    pub method: String,
    pub lora_r: Option<u32>,
    pub lora_alpha: Option<f64>,
    pub lora_dropout: Option<f64>,
    pub lora_targets: String,
    #[serde(default)]
    pub modules_to_save: String,
    pub quant: String,
    pub checkpointing: String,
    #[serde(default)]
    pub attention: String,
    pub batch: usize,
    pub seq: usize,
    pub micro_batch: usize,
    pub accumulate: usize,
    pub save: String,
    /// A simulated data-parallel rank's scheme (`ddp`, `zero1`, `zero2`, `fsdp`); empty: one
    /// device.
    #[serde(default)]
    pub shard: String,
    #[serde(default)]
    pub world_size: Option<usize>,
    #[serde(default)]
    pub rank: Option<usize>,
    pub budget_bytes: Option<u64>,
    pub baseline_bytes: Option<u64>,
    pub param_bytes: Option<u64>,
    pub grad_bytes: Option<u64>,
    pub optimizer_state_bytes: Option<u64>,
    pub load_peak_bytes: Option<u64>,
    pub load_end_bytes: Option<u64>,
    pub optimizer_init_peak_bytes: Option<u64>,
    pub optimizer_init_end_bytes: Option<u64>,
    pub step1_forward_peak_bytes: Option<u64>,
    pub step1_forward_end_bytes: Option<u64>,
    pub step1_backward_peak_bytes: Option<u64>,
    pub step1_backward_end_bytes: Option<u64>,
    pub step1_optimizer_step_peak_bytes: Option<u64>,
    pub step1_optimizer_step_end_bytes: Option<u64>,
    pub step2_forward_peak_bytes: Option<u64>,
    pub step2_forward_end_bytes: Option<u64>,
    pub step2_backward_peak_bytes: Option<u64>,
    pub step2_backward_end_bytes: Option<u64>,
    pub step2_optimizer_step_peak_bytes: Option<u64>,
    pub step2_optimizer_step_end_bytes: Option<u64>,
    pub save_peak_bytes: Option<u64>,
    pub saved_file_bytes: Option<u64>,
    pub peak_bytes: Option<u64>,
    pub peak_phase: String,
    pub peak_reserved_bytes: Option<u64>,
    pub peak_device_bytes: Option<u64>,
    #[serde(default)]
    pub memory_counter: String,
    pub step1_seconds: Option<f64>,
    pub step2_seconds: Option<f64>,
    pub timed_steps: usize,
    pub step_seconds_median: Option<f64>,
    pub tokens_per_second: Option<f64>,
    /// Wall time of the point's measuring process, from its start to its exit (loading,
    /// optimizer initialization, every step, the save), timed by the parent; empty in rows
    /// written before the column existed and in rows measured in parallel (`sweep --jobs`).
    #[serde(default)]
    pub point_seconds: Option<f64>,
    pub model_flops_per_token: Option<f64>,
    pub loss_step1: Option<f64>,
    pub loss_step2: Option<f64>,
    pub status: Option<Status>,
    pub message: String,
}

impl Row {
    /// Builds the row for `m` measured with `spec`.
    pub fn new(
        ctx: &RowContext,
        spec: &TrainSpec,
        m: &Measurement,
        status: Status,
        message: &str,
    ) -> Row {
        let ph = |name: &str| m.phase(name);
        let peak = |name: &str| ph(name).map(|p| p.peak_allocated_bytes);
        let end = |name: &str| ph(name).map(|p| p.end_allocated_bytes);
        let measured = !m.phases.is_empty();
        let lora = spec.adaptation.lora.as_ref();
        let (peak_phase, peak_bytes) = match m.peak() {
            Some((n, b)) => (n.to_string(), Some(b)),
            None => (String::new(), None),
        };
        let reserved = m.phases.iter().filter_map(|p| p.peak_reserved_bytes).max();
        let device_used = m.phases.iter().filter_map(|p| p.end_device_bytes).max();
        Row {
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            utc_time: chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            host: host_name(),
            device: if m.device.is_empty() {
                ctx.device.clone()
            } else {
                m.device.clone()
            },
            command: ctx.command.clone(),
            model: ctx.model.clone(),
            weights: ctx.weights.clone(),
            params: m.params,
            trainable_params: m.trainable_params,
            dtype: spec.dtype.as_str().to_string(),
            optimizer: spec.optimizer.name().into(),
            optimizer_state_dtype: spec.state_dtype.as_str().to_string(),
            precision: spec
                .precision
                .map(|p| p.name().to_string())
                .unwrap_or_default(),
            momentum: (spec.optimizer == crate::spec::Optimizer::Sgd).then_some(spec.momentum),
            method: spec.adaptation.method().into(),
            lora_r: lora.map(|l| l.r as u32),
            lora_alpha: lora.map(|l| l.alpha),
            lora_dropout: lora.map(|l| l.dropout),
            lora_targets: lora.map(|l| l.targets_label(ctx.moe)).unwrap_or_default(),
            modules_to_save: lora.map(|l| l.saved_names().join(";")).unwrap_or_default(),
            quant: spec.adaptation.quant.label().into(),
            checkpointing: spec.checkpointing.label(),
            attention: spec.attention.label().to_string(),
            batch: spec.batch * spec.accumulate,
            seq: spec.seq,
            micro_batch: spec.batch,
            accumulate: spec.accumulate,
            save: spec.save.label().into(),
            shard: ctx
                .sharding
                .map(|s| s.shard.label().to_string())
                .unwrap_or_default(),
            world_size: ctx.sharding.map(|s| s.gpus),
            rank: ctx.sharding.map(|s| s.rank),
            budget_bytes: ctx.budget_bytes,
            baseline_bytes: measured.then_some(m.baseline_bytes),
            param_bytes: ph("load").map(|_| m.param_bytes),
            grad_bytes: ph("step1_backward").map(|_| m.grad_bytes),
            optimizer_state_bytes: ph("step1_optimizer_step").map(|_| m.optimizer_state_bytes),
            load_peak_bytes: peak("load"),
            load_end_bytes: end("load"),
            optimizer_init_peak_bytes: peak("optimizer_init"),
            optimizer_init_end_bytes: end("optimizer_init"),
            step1_forward_peak_bytes: peak("step1_forward"),
            step1_forward_end_bytes: end("step1_forward"),
            step1_backward_peak_bytes: peak("step1_backward"),
            step1_backward_end_bytes: end("step1_backward"),
            step1_optimizer_step_peak_bytes: peak("step1_optimizer_step"),
            step1_optimizer_step_end_bytes: end("step1_optimizer_step"),
            step2_forward_peak_bytes: peak("step2_forward"),
            step2_forward_end_bytes: end("step2_forward"),
            step2_backward_peak_bytes: peak("step2_backward"),
            step2_backward_end_bytes: end("step2_backward"),
            step2_optimizer_step_peak_bytes: peak("step2_optimizer_step"),
            step2_optimizer_step_end_bytes: end("step2_optimizer_step"),
            save_peak_bytes: peak("save"),
            saved_file_bytes: m.saved_bytes,
            peak_bytes,
            peak_phase,
            peak_reserved_bytes: reserved,
            peak_device_bytes: device_used,
            memory_counter: m.counter.clone(),
            step1_seconds: m.step_seconds.first().copied(),
            step2_seconds: m.step_seconds.get(1).copied(),
            timed_steps: m.step_seconds.len().saturating_sub(2),
            step_seconds_median: crate::measure::step::median_step_seconds(m),
            tokens_per_second: crate::measure::step::median_step_seconds(m)
                .map(|s| spec.tokens() as f64 / s),
            point_seconds: None,
            model_flops_per_token: ctx.model_flops_per_token,
            loss_step1: m.losses.first().copied(),
            loss_step2: m.losses.get(1).copied(),
            status: Some(status),
            message: message.to_string(),
        }
    }

    /// The CSV header, from the field names.
    pub fn header() -> Vec<String> {
        let mut w = csv::WriterBuilder::new()
            .has_headers(true)
            .from_writer(vec![]);
        // Serializing a default row makes the csv crate emit the header.
        w.serialize(Row::default()).expect("in-memory write");
        let bytes = w.into_inner().expect("in-memory flush");
        let text = String::from_utf8(bytes).expect("utf8");
        let first = text.lines().next().unwrap_or_default().to_string();
        csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(first.as_bytes())
            .records()
            .next()
            .and_then(|r| r.ok())
            .map(|r| r.iter().map(String::from).collect())
            .unwrap_or_default()
    }
}

/// This machine's host name, for a row's `host` column (empty in the browser build, which
/// measures nothing).
fn host_name() -> String {
    #[cfg(not(target_arch = "wasm32"))]
    return gethostname::gethostname().to_string_lossy().into_owned();
    #[cfg(target_arch = "wasm32")]
    String::new()
}
