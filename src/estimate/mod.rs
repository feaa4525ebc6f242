//! The analytic estimator: predicts the peak allocated memory of a training step, itemized
//! (weights, gradients, optimizer states, saved activations, logits and loss, backward
//! transient, fixed overhead), from the model config and the training setup.
//!
//! Profiles:
//! * `candle`: what vramcal's own model keeps, from the saved-tensor table in [`table`], with
//!   coefficients that `vramcal calibrate` fits to vramcal's measurements;
//! * `torch-sdpa`, `torch-eager`: what PyTorch + transformers keep for the same decoder (see
//!   [`torch`]); eager attention also keeps the `(batch, heads, seq, seq)` probabilities.

pub mod advice;
pub mod bounds;
pub mod multi;
pub mod references;
pub mod table;
pub mod torch;

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::spec::TrainSpec;
use crate::spec::{Checkpointing, Profile, Quant, Shard, Sharding};

/// The terms whose coefficients calibration fits (bytes; `constant` is 1):
/// * `activations`: saved tensors of the kept layers other than attention scores;
/// * `attention_scores`: the `(batch, heads, seq, seq)` tensors of the kept layers (none for
///   `candle`, whose fused attention recomputes them; the `torch-eager` profile keeps them);
/// * `checkpoint_inputs`: saved layer inputs under checkpointing;
/// * `logits_and_loss`: the head's logits: for `candle` one `(min(N, 256), V)` chunk of the
///   fused LM head (its kept `(N, h)` tensors count with the activations); for the torch
///   profiles the `(N, V)` logits and the loss's intermediates (backward adds their gradients);
/// * `gradients_live`: gradients of the trainable parameters;
/// * `largest_trainable`: bytes of the largest trainable tensor (gradient-accumulation
///   transients such as a tied embedding's two gradient contributions; counted, not fitted, for
///   `candle`: [`crate::calibrate::fixed_coefficients`]);
/// * `attention_transient`: one layer's attention scores in the compute dtype (the fused
///   attention's scores and probabilities, formed one layer at a time), where the attention
///   forms them whole: on CUDA, and on the CPU for `--attention eager` or f64;
/// * `constant`: fixed overhead;
/// * `cpu_bf16_matmul_widening`: `candle` in bf16 on the CPU only: candle 0.11's CPU matmul has
///   no bf16 kernel and widens both operands' whole storages and its output to f32 for each
///   product (`candle-core` 0.11.1 `src/cpu_backend/mod.rs`, `CpuStorage::matmul`); the largest
///   such transient is the LM head's (see [`bf16_matmul_widening`]), counted beyond the two
///   f32 logits chunks that `logits_and_loss` counts, at the head's moment only; in f32 and
///   f16 with a trained head, the f32 sum of its weight gradient over the logits chunks (see
///   [`head_weight_grad_f32`]). Zero off the CPU (cuBLAS has bf16 kernels; the CUDA tables
///   were fitted without it) and for the torch profiles;
/// * `cpu_attention_transient`: `candle` on the CPU with SDPA attention in f32, bf16 or f16:
///   the buffers of the CPU attention kernel's backward (`src/ops/cpu_attention.rs`, see
///   [`cpu_attention_transient`]), which never forms the `(batch, heads, seq, seq)` scores;
///   zero elsewhere, where `attention_transient` counts instead.
///
/// The peak of backward is the largest of three [`Moment`]s: the head's backward (its logits
/// chunk or logits, the LM head's gradient), a layer's backward once the gradients have built
/// up (with its attention transient), and the very end (all gradients, a tied embedding's two
/// gradient contributions being summed). `constant` counts at all three; `checkpoint_inputs` at
/// the head's and a layer's (each segment's input is freed once it is recomputed: none is left at
/// the end of backward, where a checkpointed full fine-tuning step of vramcal's peaks).
/// The activations are alive at all three without checkpointing (candle keeps the whole graph
/// until backward ends), and only in a layer's backward with it (the head's graph is freed
/// before the layers are recomputed; one segment's graph is alive then, and freed before the
/// end). The torch profiles without checkpointing sum every term instead (their uncalibrated
/// model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Term {
    /// `activations` (bytes).
    Activations,
    /// `attention_scores` (bytes).
    AttentionScores,
    /// `checkpoint_inputs` (bytes).
    CheckpointInputs,
    /// `logits_and_loss` (bytes).
    LogitsAndLoss,
    /// `gradients_live` (bytes; counted, coefficient 1).
    GradientsLive,
    /// `largest_trainable` (bytes).
    LargestTrainable,
    /// `attention_transient` (bytes; counted for `candle`, coefficient 4).
    AttentionTransient,
    /// `constant` (the value is 1; its coefficient is bytes).
    Constant,
    /// `cpu_bf16_matmul_widening` (bytes).
    CpuBf16MatmulWidening,
    /// `cpu_attention_transient` (bytes; counted for `candle`, coefficient 1).
    CpuAttentionTransient,
}

impl Term {
    /// Every term, in the order of calibration tables and of the `[f64; N_TERMS]` arrays
    /// ([`Term::index`]).
    pub const ALL: [Term; N_TERMS] = [
        Term::Activations,
        Term::AttentionScores,
        Term::CheckpointInputs,
        Term::LogitsAndLoss,
        Term::GradientsLive,
        Term::LargestTrainable,
        Term::AttentionTransient,
        Term::Constant,
        Term::CpuBf16MatmulWidening,
        Term::CpuAttentionTransient,
    ];

    /// Position in [`Term::ALL`] and in every `[f64; N_TERMS]` of this module.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Name in calibration tables, e.g. `gradients_live`.
    pub fn name(self) -> &'static str {
        match self {
            Term::Activations => "activations",
            Term::AttentionScores => "attention_scores",
            Term::CheckpointInputs => "checkpoint_inputs",
            Term::LogitsAndLoss => "logits_and_loss",
            Term::GradientsLive => "gradients_live",
            Term::LargestTrainable => "largest_trainable",
            Term::AttentionTransient => "attention_transient",
            Term::Constant => "constant",
            Term::CpuBf16MatmulWidening => "cpu_bf16_matmul_widening",
            Term::CpuAttentionTransient => "cpu_attention_transient",
        }
    }

    /// The term named `name` in a calibration table, if any.
    pub fn from_name(name: &str) -> Option<Term> {
        Term::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The unit of the term's value: `bytes`, or `1` for [`Term::Constant`].
    pub fn unit(self) -> &'static str {
        match self {
            Term::Constant => "1",
            _ => "bytes",
        }
    }

    /// The unit of the term's coefficient, as calibration tables write it: `bytes` for
    /// [`Term::Constant`], else `bytes per byte of the term`.
    pub fn coefficient_unit(self) -> &'static str {
        match self {
            Term::Constant => "bytes",
            _ => "bytes per byte of the term",
        }
    }

    /// The line of an itemized estimate: what it is, and the formula its value comes from.
    pub fn item(self) -> (&'static str, &'static str) {
        match self {
            Term::Activations => (
                "saved activations (layers)",
                "saved-tensor table without scores × layers kept",
            ),
            Term::AttentionScores => (
                "saved attention scores",
                "(S2) entries of the table × layers kept",
            ),
            Term::CheckpointInputs => (
                "checkpointed layer inputs",
                "candle: (⌈L/K⌉ + 1) · N · h · dtype; torch: ⌈L/K⌉ · N · h · dtype",
            ),
            Term::LogitsAndLoss => (
                "logits and loss",
                "candle: one (min(N, 256), V) logits chunk; torch: (N, V) logits, loss intermediates (Liger: the head input's gradient, one chunk of logits)",
            ),
            Term::GradientsLive => ("gradients (alive in backward)", "trainable params × dtype"),
            Term::LargestTrainable => ("gradient transient", "largest trainable tensor × dtype"),
            Term::AttentionTransient => (
                "attention transient",
                "one layer's (b, heads, s, s) in the compute dtype",
            ),
            Term::Constant => ("fixed overhead (fitted)", "constant"),
            Term::CpuBf16MatmulWidening => (
                "LM head f32 transients (CPU)",
                "bf16: the head's products widened to f32, max(4·(N·h + V·h + c·V) + 2·c·V, 10·c·V + 4·V·h + 6·c·h [, 10·c·V + 4·N·h + 6·V·h (+2·V·h) trained]), beyond 2 logits chunks; f32/f16 with a trained head: its weight gradient summed over chunks in f32, 12·V·h (one chunk: the GradStore's zeroed buffer, the part and the sum, 12·V·h beyond 2 logits chunks in full fine-tuning, else 4·V·h; f16 6·V·h), beyond the gradient",
            ),
            Term::CpuAttentionTransient => (
                "attention transient (CPU kernel)",
                "4·b·s·(hd·(5·heads + 2·kv_heads [+ heads + kv_heads in 16-bit]) + 2·64·heads)",
            ),
        }
    }

    /// The coefficient that is counted, not fitted, for `profile` (see
    /// [`crate::calibrate::fixed_coefficients`] for why), or `None` where calibration fits it.
    pub fn counted(self, profile: Profile) -> Option<f64> {
        match (self, profile) {
            (Term::GradientsLive, _) => Some(1.0),
            (Term::LargestTrainable, Profile::Candle) => Some(1.0),
            (Term::AttentionTransient, Profile::Candle) => Some(4.0),
            (Term::CpuAttentionTransient, Profile::Candle) => Some(1.0),
            _ => None,
        }
    }

    /// Whether this term is alive at moment `m`; `moments` is false where every term counts
    /// at once (see [`Term`]).
    pub fn alive_at(self, m: Moment, checkpointed: bool, moments: bool) -> bool {
        if !(checkpointed || moments) {
            return true;
        }
        match self {
            Term::Activations | Term::AttentionScores => !checkpointed || m == Moment::Layer,
            Term::CheckpointInputs => m != Moment::End,
            Term::Constant => true,
            Term::CpuBf16MatmulWidening | Term::LogitsAndLoss => m == Moment::Head,
            Term::GradientsLive => m != Moment::Head,
            Term::LargestTrainable => m != Moment::Layer,
            Term::AttentionTransient | Term::CpuAttentionTransient => m == Moment::Layer,
        }
    }
}

/// How many terms there are.
pub const N_TERMS: usize = 10;

/// A moment of backward that may hold the peak (see [`Term`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moment {
    /// The head's backward.
    Head,
    /// A layer's (or recomputed segment's) backward, the gradients built up.
    Layer,
    /// The end of backward.
    End,
    /// The optimizer step (torch profiles only, in calibration: weights, gradients, states and
    /// the step's transient are counted; of the fitted terms only `constant` is alive, the
    /// CUDA libraries' workspaces allocated since step 1).
    Step,
}

/// The three moments, in order.
pub const MOMENTS: [Moment; 3] = [Moment::Head, Moment::Layer, Moment::End];

/// Coefficients of [`Term`] for one profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Coefficients {
    /// Profile they belong to.
    pub profile: Profile,
    /// One per term, in [`Term`] order.
    pub values: [f64; N_TERMS],
    /// Where they come from (`uncalibrated` or the calibration file).
    pub source: String,
    /// Whether they describe vramcal's step on the CPU (a table fitted to `device=cpu` rows),
    /// where its CPU kernels run: the `candle` attention transient is then the CPU attention
    /// kernel's ([`Term`]). `false` for the uncalibrated coefficients and CUDA tables.
    pub cpu: bool,
    /// The caching allocator's reserve beyond the allocated peak, where a table fitted on
    /// rows with a `peak_reserved_bytes` column gives it; `None` otherwise (the uncalibrated
    /// coefficients and CPU tables: no reserved figure is predicted).
    pub reserved: Option<Reserved>,
}

/// What PyTorch's CUDA caching allocator reserves beyond the allocated peak
/// (`torch.cuda.max_memory_reserved` − `max_memory_allocated`), as fractions of the peak's
/// parts. The allocator caches freed blocks in segments (2 MiB for requests up to 1 MiB, 20 MiB
/// up to 10 MiB, larger requests rounded to 2 MiB; `c10/cuda/CUDACachingAllocator.cpp`) and
/// hands a cached block only to a request that fits in it, so blocks freed while a step runs
/// (a recomputed layer's tensors, the logits, the optimizer's temporaries) leave reserved but
/// unallocated memory behind when later requests are larger or differently sized. Tensors
/// allocated once and kept (saved activations without checkpointing) fragment less. Both
/// fractions are fitted by `vramcal calibrate` on measured reserved peaks; nothing here is
/// counted from first principles.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reserved {
    /// Reserved bytes per byte of the peak's transient part ([`ReservedBasis::transient`]).
    pub transient: f64,
    /// Reserved bytes per byte of the peak's kept activations ([`ReservedBasis::kept`]).
    pub kept: f64,
}

/// The parts of a predicted peak that the caching allocator's reserve grows with ([`Reserved`]).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct ReservedBasis {
    /// Bytes allocated and freed again within the step and alive at the peak: the logits and
    /// the loss's buffers, the attention and gradient transients, under checkpointing the
    /// recomputed layer's saved tensors, at the optimizer step its temporaries.
    pub transient: f64,
    /// Saved activations kept from the forward to the backward without checkpointing.
    pub kept: f64,
}

impl ReservedBasis {
    /// The reserve predicted over the allocated peak (bytes) under `r`.
    pub fn extra(&self, r: &Reserved) -> f64 {
        r.transient * self.transient + r.kept * self.kept
    }
}

impl Coefficients {
    /// First-principles coefficients, counted rather than fitted: every kept tensor once and
    /// the gradients at the end of backward; for `candle` also its transients as its ops make
    /// them: two chunk-sized buffers in the fused LM head's backward (the chunk's logits and
    /// their gradient, `src/ops/cpu_kernels.rs` `ce_grad` or the CUDA kernel; the composed
    /// form elsewhere holds three), one copy of the largest trainable tensor being summed, four
    /// `(batch, heads, seq, seq)` buffers in the fused attention's backward. The torch profiles
    /// count every saved tensor, the loss's fp32 buffers and a tied embedding's gradient sum
    /// ([`torch`]), and no fixed overhead.
    pub fn uncalibrated(profile: Profile) -> Self {
        let values = match profile {
            Profile::Candle => [1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 4.0, 0.0, 1.0, 1.0],
            _ => [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0],
        };
        Coefficients {
            profile,
            values,
            source: "uncalibrated".into(),
            cpu: false,
            reserved: None,
        }
    }
}

/// One line of an itemized estimate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Item {
    /// What it is.
    pub name: String,
    /// Bytes.
    pub bytes: u64,
    /// How it was computed.
    pub formula: String,
}

/// An itemized estimate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    /// Profile used.
    pub profile: Profile,
    /// Items; their sum is `peak_bytes` when the peak is in backward.
    pub items: Vec<Item>,
    /// Predicted peak allocated bytes.
    pub peak_bytes: u64,
    /// Predicted peak reserved bytes (CUDA's caching allocator: `peak_bytes` plus the cached
    /// blocks, [`Reserved`]), where the coefficients model it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_bytes: Option<u64>,
    /// Phase predicted to hold the peak.
    pub peak_phase: String,
    /// Source of the coefficients.
    pub coefficients: String,
    /// Host RAM per rank for what `--offload` moves off the GPU (bytes; see
    /// [`multi::Sharded::host_bytes`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_bytes_per_rank: Option<u64>,
}

impl Estimate {
    /// The memory the configuration needs on the card (bytes): the predicted reserved peak
    /// where the coefficients model it (what must fit for the allocator not to fail), else the
    /// allocated peak.
    pub fn needed_bytes(&self) -> u64 {
        self.reserved_bytes.unwrap_or(self.peak_bytes)
    }
}

/// The exact static part and the calibrated terms of a point.
#[derive(Debug, Clone, PartialEq)]
pub struct Terms {
    /// Parameter bytes as stored.
    pub weights: u64,
    /// Gradient bytes (trainable parameters, model dtype).
    pub gradients: u64,
    /// AdamW state bytes.
    pub optimizer_states: u64,
    /// The calibrated terms, in [`Term`] order (bytes; `constant` is 1).
    pub terms: [f64; N_TERMS],
    /// Whether checkpointing is on (it changes which terms are alive when; see [`Term`]).
    pub checkpointed: bool,
    /// Whether the head and the gradients peak at separate moments without checkpointing too
    /// (`candle`); see [`Term`].
    pub two_moments: bool,
    /// The torch profiles' moments ([`torch`]): no gradient exists yet at a layer's backward
    /// without checkpointing (the first layer's backward holds only the head's), and the
    /// largest-trainable transient (a tied embedding's two gradient contributions) is alive at
    /// the end of backward only, and no saved tensor is left by then.
    pub torch: bool,
    /// The optimizer step's transient (bytes) for the torch profiles ([`torch::optimizer`]):
    /// with the gradients, what the [`Moment::Step`] adds to weights and states. 0 for
    /// `candle`, whose calibration has no such moment.
    pub step_transient: u64,
    /// Whether gradients are accumulated over micro-batches (`accumulate > 1`).
    pub accumulating: bool,
    /// Counted buffers alive from the first product to the end of the step (bytes): for the
    /// torch profiles on CUDA the cuBLAS workspaces ([`torch::CUBLAS_WORKSPACES`]); 0 on the
    /// CPU and for `candle`.
    pub workspace: u64,
    /// Bytes counted, not fitted, alive at the head's backward only ([`Moment::Head`]): under
    /// checkpointing in vramcal's step, the fused head's kept casts and `lm_head` adapter path
    /// ([`table::head_side`]); 0 otherwise (without checkpointing they count with the
    /// activations) and for the torch profiles.
    pub head_static: u64,
    /// Bytes counted, not fitted, alive at a layer's backward only ([`Moment::Layer`]): for the
    /// torch profiles, the gradient of PEFT's adapted expert stack ([`torch::moe_backward`]);
    /// 0 otherwise.
    pub layer_static: u64,
    /// Bytes counted, not fitted, alive at every moment of backward: DDP's gradient buckets or
    /// DeepSpeed's reduce bucket ([`multi::Sharded::reduce_bucket`]) and FSDP2's root and
    /// reduce-scatter buffers ([`multi::Sharded::fsdp_root`]); 0 otherwise.
    pub backward_static: u64,
    /// Bytes counted, not fitted, alive at the end of backward only ([`Moment::End`]): in
    /// vramcal's step, a `modules_to_save` embedding's `(V, h)` gradient being summed into a
    /// zeroed one by candle's `GradStore` when the head is not trained too (with a trained head
    /// `largest_trainable` counts that size at every moment); 0 otherwise.
    pub end_static: u64,
}

impl Terms {
    /// The design row of this point at moment `m`: the terms alive then, zeros elsewhere.
    pub fn design(&self, m: Moment) -> [f64; N_TERMS] {
        let mut row = self.terms;
        if m == Moment::Step {
            return Term::ALL.map(|t| if t == Term::Constant { 1.0 } else { 0.0 });
        }
        for (i, v) in row.iter_mut().enumerate() {
            let term = Term::ALL[i];
            let torch_dead = self.torch
                && match term {
                    // Gradients of earlier micro-batches are alive throughout the next.
                    Term::GradientsLive => {
                        m == Moment::Layer && !self.checkpointed && !self.accumulating
                    }
                    Term::LargestTrainable => m != Moment::End,
                    // Autograd frees each saved tensor as its node runs.
                    Term::Activations | Term::AttentionScores | Term::CheckpointInputs => {
                        m == Moment::End
                    }
                    _ => false,
                };
            // Accumulated gradients of earlier micro-batches are alive at every moment.
            let torch_alive = self.torch && self.accumulating && term == Term::GradientsLive;
            if torch_dead || !(torch_alive || term.alive_at(m, self.checkpointed, self.two_moments))
            {
                *v = 0.0;
            }
        }
        row
    }

    /// The parts of the peak at backward moment `m` under coefficients `c` that the caching
    /// allocator's reserve grows with ([`ReservedBasis`]).
    pub fn reserved_basis(&self, m: Moment, c: &[f64; N_TERMS]) -> ReservedBasis {
        let row = self.design(m);
        let part =
            |terms: &[Term]| -> f64 { terms.iter().map(|t| row[t.index()] * c[t.index()]).sum() };
        let saved = part(&[Term::Activations, Term::AttentionScores]);
        let passing = part(&[
            Term::LogitsAndLoss,
            Term::LargestTrainable,
            Term::AttentionTransient,
            Term::CpuBf16MatmulWidening,
            Term::CpuAttentionTransient,
        ]);
        if self.checkpointed {
            ReservedBasis {
                transient: passing + saved,
                kept: 0.0,
            }
        } else {
            ReservedBasis {
                transient: passing,
                kept: saved,
            }
        }
    }

    /// The bytes counted, not fitted, that moment `m` of backward holds
    /// ([`Terms::head_static`] at the head's, [`Terms::layer_static`] at a layer's,
    /// [`Terms::backward_static`] at each).
    pub fn static_at(&self, m: Moment) -> u64 {
        match m {
            Moment::Head => self.head_static + self.backward_static,
            Moment::Layer => self.layer_static + self.backward_static,
            Moment::End => self.end_static + self.backward_static,
            Moment::Step => 0,
        }
    }

    /// The moment that holds the peak under coefficients `c` (the first of equal ones).
    pub fn peak_moment(&self, c: &[f64; N_TERMS]) -> Moment {
        let dot = |r: [f64; N_TERMS]| r.iter().zip(c).map(|(x, k)| x * k).sum::<f64>();
        let mut best = (Moment::Head, f64::NEG_INFINITY);
        for m in MOMENTS {
            let v = dot(self.design(m)) + self.static_at(m) as f64;
            if v > best.1 {
                best = (m, v);
            }
        }
        best.0
    }
}

/// Parameter bytes as stored: the model dtype, NF4 linear weights at 0.5 byte plus block
/// constants, LoRA adapters in theirs ([`TrainSpec::adapter_dtype`]: fp32 under `+amp`).
pub fn weight_bytes(cfg: &ModelConfig, spec: &TrainSpec) -> u64 {
    let d = spec.dtype.size_in_bytes() as u64;
    let adapters = spec
        .adaptation
        .lora
        .as_ref()
        .map_or(0, |l| crate::spec::lora_param_count(cfg, l));
    let mut bytes = adapters * spec.adapter_dtype().size_in_bytes() as u64;
    for p in cfg.param_shapes() {
        let numel = p.numel();
        let quantized =
            p.name.ends_with("_proj.weight") && matches!(spec.adaptation.quant, Quant::Nf4 { .. });
        bytes += match (quantized, spec.adaptation.quant) {
            (true, Quant::Nf4 { double }) => {
                let blocks = numel.div_ceil(64);
                let scales = if double {
                    blocks + blocks.div_ceil(256) * 4
                } else {
                    blocks * 4
                };
                numel.div_ceil(2) + scales
            }
            _ => numel * d,
        };
    }
    bytes
}

/// Refuses `modules_to_save` where the estimate is not modelled: the `candle` profile under
/// autocast (checked on a new-user trial: `amp-bf16` 3–5 % under, the saved head's bf16
/// gradient and its cast not counted), and the torch profiles' QLoRA over 16-bit weights
/// (`prepare_model_for_kbit_training` makes the copies fp32, with fp32 gradients and states,
/// where the profiles count the adapters' dtype).
///
/// # Errors
/// [`Error::InvalidValue`] naming the combination and what is estimated instead.
pub fn check_saved_modules(spec: &TrainSpec, profile: Profile) -> Result<()> {
    let Some(l) = spec.adaptation.lora.as_ref().filter(|l| l.saves_modules()) else {
        return Ok(());
    };
    let saved = l.saved_names().join(",");
    let autocast = spec.precision.and_then(|p| p.autocast()).is_some();
    if profile == Profile::Candle && autocast {
        return Err(Error::invalid(
            "--lora modules_to_save",
            saved,
            "vramcal's own step under autocast with modules_to_save is not modelled yet (its estimate came out 3-5 % under): estimate the PyTorch run with --profile torch-sdpa, or measure it (vramcal measure)",
        ));
    }
    if profile != Profile::Candle
        && spec.adaptation.quant != Quant::None
        && spec.dtype != candle_core::DType::F32
    {
        return Err(Error::invalid(
            "--lora modules_to_save",
            saved,
            "QLoRA over 16-bit weights with modules_to_save is not modelled yet (prepare_model_for_kbit_training makes the copies fp32, with fp32 gradients and states): estimate with --precision fp32 or amp-bf16, which PEFT's QLoRA recipes load",
        ));
    }
    Ok(())
}

/// Bytes of the `modules_to_save` copies vramcal's step holds beyond [`weight_bytes`]: on a
/// tied model one `(V, h)` copy in the weights' dtype (the saved module trains a copy while
/// the other keeps the frozen original; `Decoder::with_recipe`); on an untied model none (the
/// saved module itself trains, where PEFT keeps a frozen original beside its copy).
pub fn candle_saved_copies(cfg: &ModelConfig, spec: &TrainSpec) -> u64 {
    let saves = spec
        .adaptation
        .lora
        .as_ref()
        .is_some_and(|l| l.saves_modules());
    if saves && cfg.tie_word_embeddings {
        (cfg.vocab_size as u64 * cfg.hidden_size as u64) * spec.dtype.size_in_bytes() as u64
    } else {
        0
    }
}

/// The static part and the terms of `spec` for the `candle` profile.
pub fn candle_terms(cfg: &ModelConfig, spec: &TrainSpec, cpu: bool) -> Terms {
    let d = spec.dtype.size_in_bytes() as u64;
    // Gradients are in the trainable tensors' dtype (fp32 adapters under `+amp`).
    let gd = spec.trainable_dtype().size_in_bytes() as u64;
    let t = spec.trainable_params(cfg);
    let layer = table::layer(cfg, spec);
    let scores: u64 = layer
        .iter()
        .filter(|x| x.kind == table::Kind::AttentionScores)
        .map(|x| x.bytes())
        .sum();
    let other: u64 = layer
        .iter()
        .filter(|x| x.kind == table::Kind::Activation)
        .map(|x| x.bytes())
        .sum();
    // The head's kept (N, h) tensors count with the activations; the logits exist only one
    // chunk at a time, which stops growing at CE_CHUNK_TOKENS tokens.
    let head_kept: u64 = table::head(cfg, spec).iter().map(|x| x.bytes()).sum();
    let head = table::logits_chunk(cfg, spec);
    let l = cfg.num_hidden_layers as u64;
    let n = spec.batch as u64 * spec.seq as u64;
    // LoRA on `lm_head` alone: no layer holds a trainable tensor or receives a gradient, so
    // without checkpointing the layers keep nothing (and run no backward); under checkpointing
    // `Decoder::backward` still recomputes every segment from a leaf.
    let layers_idle = spec
        .adaptation
        .lora
        .as_ref()
        .is_some_and(|l| l.targets.is_empty() && !l.embed_tokens && !l.save_embed_tokens);
    let (kept, ckpt) = match spec.checkpointing {
        Checkpointing::None if layers_idle => (0, 0),
        Checkpointing::None => (l, 0),
        // One segment of k layers recomputed at a time; every segment's input kept, plus the
        // leaf copy of the last hidden state.
        Checkpointing::Every(k) => {
            let k = (k as u64).min(l);
            (k, (l.div_ceil(k) + 1) * n * cfg.hidden_size as u64 * d)
        }
    };
    // The head's own transient beyond the logits chunks (CPU: widened products, f32 sums).
    let widening = match spec.compute_dtype() {
        _ if !cpu => 0,
        candle_core::DType::BF16 => {
            bf16_matmul_widening(cfg, spec).saturating_sub(2 * head)
                + head_adapter_grad_sum(cfg, spec)
        }
        _ => head_weight_grad_f32(cfg, spec) + head_adapter_grad_sum(cfg, spec),
    };
    let saved_head = saved_head_backward(cfg, spec).saturating_sub(2 * head + widening);
    Terms {
        weights: weight_bytes(cfg, spec) + candle_saved_copies(cfg, spec),
        gradients: t * gd,
        // vramcal's optimizers keep what PyTorch's keep, in the same layouts (`src/optim/`):
        // AdamW's two moments, 8-bit blockwise moments, Adafactor's factored second moments,
        // SGD's momentum, and an fp32 master copy under `*-master`, per tensor as vramcal's
        // step holds them (a mixture of experts' tensors and adapter shares per expert).
        optimizer_states: torch::optimizer_states_of(
            spec,
            &torch::own_trainable_tensors(cfg, spec),
        ),
        terms: Term::ALL.map(|term| match term {
            Term::Activations => (kept * other + if ckpt > 0 { 0 } else { head_kept }) as f64,
            Term::AttentionScores => (kept * scores) as f64,
            Term::CheckpointInputs => ckpt as f64,
            Term::LogitsAndLoss => head as f64,
            // With gradient accumulation the sum of earlier micro-batches' gradients is alive
            // while the next micro-batch builds its own.
            Term::GradientsLive => (t * gd * if spec.accumulate > 1 { 2 } else { 1 }) as f64,
            // Under checkpointing `Decoder::backward` sums a tied embedding's gradient from its
            // own pass into the head's: two extra copies at the end instead of one. An untied
            // model makes no such sum: one, as without checkpointing (measured: `mistral-mini`
            // full fine-tuning at 1 × 64 with checkpointing peaked one `(V, h)` above its
            // weights, gradients and states; counted with two it was 6.5 % over).
            // A saved embedding alone is summed at the end of backward only
            // (`Terms::end_static`): the term keeps the adapters' largest.
            Term::LargestTrainable => {
                (largest_at_every_moment(cfg, spec)
                    * match (
                        ckpt > 0 && spec.adaptation.lora.is_none(),
                        cfg.tie_word_embeddings,
                    ) {
                        (true, true) => 2,
                        _ => 1,
                    }) as f64
            }
            Term::AttentionTransient | Term::CpuAttentionTransient if kept == 0 => 0.0,
            Term::AttentionTransient if cpu && cpu_attention_kernel(spec) => 0.0,
            Term::AttentionTransient => table::attention_scores(cfg, spec) as f64,
            Term::Constant => 1.0,
            // The head's other chunk buffers are not alive during its widened products:
            // the term is what the widening adds beyond the two logits chunks.
            Term::CpuBf16MatmulWidening => widening as f64,
            Term::CpuAttentionTransient if cpu && cpu_attention_kernel(spec) => {
                cpu_attention_transient(cfg, spec) as f64
            }
            Term::CpuAttentionTransient => 0.0,
        }),
        checkpointed: ckpt > 0,
        two_moments: true,
        torch: false,
        step_transient: 0,
        accumulating: spec.accumulate > 1,
        workspace: 0,
        head_static: if ckpt > 0 {
            table::head_side(cfg, spec).iter().map(|x| x.bytes()).sum()
        } else {
            0
        } + saved_head
            // With gradient accumulation the sum of the earlier micro-batches' gradients is
            // alive at the next one's head too (measured: `mixtral-mini` all-linear LoRA at
            // 1 × 64, accumulate 2, peaks at the head 5.6 MB, its gradients, above accumulate
            // 1; 1.8 % under before).
            + if spec.accumulate > 1 { t * gd } else { 0 },
        layer_static: 0,
        backward_static: 0,
        end_static: (saved_embed_only(spec)
            * (cfg.vocab_size as u64 * cfg.hidden_size as u64)
            * gd),
    }
}

/// [`largest_trainable`] without a `modules_to_save` embedding whose head is not trained
/// ([`saved_embed_only`]).
fn largest_at_every_moment(cfg: &ModelConfig, spec: &TrainSpec) -> u64 {
    if saved_embed_only(spec) == 0 {
        return largest_trainable(cfg, spec);
    }
    let mut s = spec.clone();
    if let Some(l) = s.adaptation.lora.as_mut() {
        l.save_embed_tokens = false;
    }
    largest_trainable(cfg, &s)
}

/// 1 when PEFT's `modules_to_save` names `embed_tokens` but not `lm_head` (the head untrained),
/// else 0: the embedding copy's gradient is then summed at the end of backward only.
fn saved_embed_only(spec: &TrainSpec) -> u64 {
    spec.adaptation
        .lora
        .as_ref()
        .is_some_and(|l| l.save_embed_tokens && !l.save_lm_head) as u64
}

/// What a `modules_to_save` head holds at the end of the head's backward in vramcal's step
/// beyond the sum that `largest_trainable` counts (bytes): its weight gradient `dw` `(V, h)` as
/// the fused head returns it and candle's `GradStore` summing it into a zeroed `(V, h)`
/// (`or_insert` + `add`), `2·V·h` in the gradients' dtype. The chunk buffers are gone by then,
/// so the head's moment counts only what this exceeds them by (`candle_terms`). Full
/// fine-tuning holds the same but peaks later, with every gradient built (its head moment is
/// left to the calibration, as before); zero without a saved head. Measured:
/// `results/cpu/smollm2-135m-modules-to-save.csv`.
pub fn saved_head_backward(cfg: &ModelConfig, spec: &TrainSpec) -> u64 {
    if !spec
        .adaptation
        .lora
        .as_ref()
        .is_some_and(|l| l.save_lm_head)
    {
        return 0;
    }
    2 * (cfg.vocab_size as u64 * cfg.hidden_size as u64)
        * spec.trainable_dtype().size_in_bytes() as u64
}

/// Whether vramcal's CPU attention kernel runs for `spec` on the CPU: SDPA attention in f32,
/// bf16 or f16 (`src/ops/cpu_attention.rs`, `eligible`).
pub fn cpu_attention_kernel(spec: &TrainSpec) -> bool {
    spec.attention == crate::spec::Attention::Sdpa
        && matches!(
            spec.compute_dtype(),
            candle_core::DType::F32 | candle_core::DType::BF16 | candle_core::DType::F16
        )
}

/// The buffers of one layer's attention backward on the CPU kernel (bytes,
/// `src/ops/cpu_attention.rs`, `backward`), all alive while its threads run: f32 copies of
/// the output gradient and the output in `(b, heads, s, hd)` layout, `Kᵀ` and `Vᵀ`
/// `(b, kv_heads, hd, s)`, the per-query-head `dQ`, `dK`, `dV` partials `(b, heads, s, hd)`,
/// and two `BQ × s` scratch blocks per (sequence, head), `BQ` = 64; in 16-bit dtypes also f32
/// copies of `q` and `k`.
pub fn cpu_attention_transient(cfg: &ModelConfig, spec: &TrainSpec) -> u64 {
    let (b, s) = (spec.batch as u64, spec.seq as u64);
    let (nh, nkv, hd) = (
        cfg.num_attention_heads as u64,
        cfg.kv_heads() as u64,
        cfg.head_dim() as u64,
    );
    let widen = if spec.compute_dtype() == candle_core::DType::F32 {
        0
    } else {
        nh + nkv
    };
    4 * b
        * s
        * (hd * (5 * nh + 2 * nkv + widen) + nh * 2 * crate::ops::CPU_ATTENTION_BLOCK_ROWS as u64)
}

/// The f32 copies candle 0.11's CPU matmul makes of a bf16 product (bytes): both operands'
/// whole storages and the output widened to f32, and the output narrowed back to bf16
/// (`candle-core` 0.11.1 `src/cpu_backend/mod.rs`, `CpuStorage::matmul`). The largest product
/// of a step is the fused LM head's backward (`src/ops/loss.rs`), the largest of: recomputing
/// a chunk of `c = min(N, 256)` rows of logits from the `(N, h)` hidden states (a view: all
/// `N·h` widened) and the `(V, h)` head weight, `4·(N·h + V·h + c·V) + 2·c·V`; the chunk's
/// input gradient `G·w` with its f32 logits and bf16 gradient `G` alive,
/// `10·c·V + 4·V·h + 6·c·h`; and, when the head is trained, its weight gradient `Gᵀ·x` (see the
/// comment in the body). Zero for other dtypes.
pub fn bf16_matmul_widening(cfg: &ModelConfig, spec: &TrainSpec) -> u64 {
    if spec.compute_dtype() != candle_core::DType::BF16 {
        return 0;
    }
    let (h, v) = (cfg.hidden_size as u64, cfg.vocab_size as u64);
    let n = spec.batch as u64 * spec.seq as u64;
    let c = n.min(crate::ops::CE_CHUNK_TOKENS as u64);
    // `x·wᵀ` for a chunk (forward and backward) and `G·w` (backward): the f32 copies of both
    // operands and of the output, and the bf16 output.
    let recompute = 4 * (n * h + v * h + c * v) + 2 * c * v;
    // `G·w` for a chunk's input gradient, with the chunk's f32 logits and its bf16 gradient
    // `G` still alive: the logits and `G` (4·c·V + 2·c·V), `G` and `w` widened (4·c·V + 4·V·h),
    // the f32 and bf16 outputs (6·c·h).
    let input_grad = 10 * c * v + 4 * v * h + 6 * c * h;
    if !spec.head_trained() {
        return recompute.max(input_grad);
    }
    // `Gᵀ·x` when the head is trained (a `modules_to_save` head under LoRA), the chunk's f32
    // logits and bf16 `G` alive (6·c·V): `Gᵀ`
    // and the hidden states widened (4·c·V + 4·N·h), the `(V, h)` output in f32 and bf16
    // (6·V·h); from the second chunk on, the f32 sum of the earlier chunks' parts (4·V·h) is
    // alive too, and the largest moment is the sum `a + part` (`accumulate`; the product's
    // bf16 output is freed before it since the thirteenth session, when it stayed alive in
    // the same statement): the old and new f32 sums and the part (12·V·h), the logits and `G`
    // (6·c·V). The sum's bf16 copy and candle's `GradStore` come after the chunk buffers are
    // freed: the `largest_trainable` that the head's moment counts is taken off here (found
    // with an allocation probe in the fused head's backward on
    // `results/cpu/smollm2-135m-modules-to-save.csv`'s bf16 rows: 233.2 MB at 1 × 128, 472.4 MB
    // at 1 × 512 for smollm2-135m with the bf16 output alive, 415.8 MB without).
    //
    // Full fine-tuning under checkpointing counts the same moments, the largest chunk after
    // the first of `l₂` tokens (a probe at a simulated ZeRO-3 rank's head, which holds its
    // peak: 415.8 MB for smollm2-135m at 1 × 512; its one-device row, −2.0 % with the fitted
    // count, is −0.5 %). Without checkpointing it keeps the count the CPU table was fitted
    // with, `10·c·V + 4·N·h + 6·V·h` and `2·V·h` more from the second chunk on: there the
    // probe's count puts the one-device seq-512 rows 2.3–3.1 % over (another head-moment term
    // of the uncheckpointed step is counted high; not traced yet, docs/roadmap.md).
    //
    // Under checkpointing a tied embedding's `largest_trainable` counts two `(V, h)` copies
    // (its own pass summed into the head's at the end of backward, `terms`), which the head's
    // moment does not hold beside these buffers: both are taken off. Found with an allocation
    // probe on vramcal's simulated FSDP ranks of smollm2-135m
    // (`results/cpu/smollm2-135m-sharded.csv`), whose peak is that moment (one-device rows
    // peak at the end of backward).
    let chunks = n.div_ceil(c.max(1));
    let l2 = n.saturating_sub(c).min(c);
    if spec.adaptation.lora.is_none() {
        // Under checkpointing the chunks' own moments, as for a saved head; without it the
        // count the table was fitted with (see above).
        let weight_grad = if chunks > 1 && spec.checkpointing != Checkpointing::None {
            (10 * l2 * v + 4 * n * h + 10 * v * h)
                .max(6 * l2 * v + 12 * v * h)
                .max(10 * c * v + 4 * n * h + 6 * v * h)
        } else {
            10 * c * v + 4 * n * h + 6 * v * h + if chunks > 1 { 2 * v * h } else { 0 }
        };
        // The two copies are of the trainable dtype (f32 under autocast).
        let td = spec.trainable_dtype().size_in_bytes() as u64;
        let ckpt = spec.checkpointing != Checkpointing::None;
        let copies = match (ckpt, cfg.tie_word_embeddings) {
            (true, true) => 2 * td * v * h,
            // An untied head's one copy likewise (`largest_trainable` counts one): measured on
            // `mistral-mini` bf16 full fine-tuning at 1 × 256 under checkpointing with SGD,
            // Adafactor and 8-bit AdamW, whose small states leave the peak at the head's
            // moment, 8–11 % over with it counted.
            (true, false) => td * v * h,
            (false, _) => 0,
        };
        // Under autocast (f32 weights, bf16 products) candle's `GradStore` receives the head's
        // weight gradient twice once the chunks are freed: the bf16 cast's (its sum, 2·V·h,
        // stays) and, through the cast's backward, the f32 weight's: the gradient in f32, a
        // zeroed buffer and their sum (12·V·h), 14·V·h in all (a probe at a simulated ZeRO-3
        // rank's head: 396.4 MB for smollm2-135m at 1 × 64, `amp-bf16`, 2.65 % under before).
        let chain = if ckpt && td == 4 { 14 * v * h } else { 0 };
        return recompute
            .max(input_grad)
            .max(weight_grad)
            .max(chain)
            .saturating_sub(copies);
    }
    let weight_grad = if chunks > 1 {
        (10 * c * v + 4 * n * h + 10 * v * h).max(6 * c * v + 12 * v * h)
    } else {
        10 * c * v + 4 * n * h + 6 * v * h
    };
    recompute
        .max(input_grad)
        .max(weight_grad.saturating_sub(2 * v * h))
}

/// The f32 buffers of a trained LM head's weight gradient in the fused head's backward beyond
/// the gradient itself (bytes), for f32 and f16 (`src/ops/loss.rs`: each chunk's part `Gᵀ·x`
/// is converted to f32 and added to the f32 sum of the earlier chunks'): with more than one
/// chunk, the sum, the part and the new sum, `12·V·h`, beside the second chunk's logits and
/// `G` (counted beyond the two full chunks the head's moment counts: less `8·(c − l₂)·V` for a
/// second chunk of `l₂ < c` tokens), less the gradient in the model dtype
/// (`largest_trainable`); with one chunk in f32, candle's `GradStore` receiving the gradient
/// (candle-core 0.11.1 `backprop.rs`, a custom op's argument: `or_insert` makes a zeroed
/// `(V, h)` and `add` a new sum beside the part), the same `12·V·h` once the chunk's buffers
/// are freed, so beyond the two `(c, V)` f32 logits chunks the head's moment counts, and at
/// least the part (under full fine-tuning: a `modules_to_save` head's is counted by
/// [`saved_head_backward`], LoRA's the part only); in f16, the part in f32
/// and the f16 gradient beside it, or the `GradStore`'s three f16 buffers (`6·V·h`), less the
/// same.
/// Zero without a trained head, and in bf16 ([`bf16_matmul_widening`] counts its own). Found on
/// the held-out f16 full fine-tuning row at seq 512 of `results/cpu/smollm2-135m-optimizers.csv`
/// (3.5 % under without it), whose peak is the head's backward: f16 gradients leave the end of
/// backward lower than in f32.
pub fn head_weight_grad_f32(cfg: &ModelConfig, spec: &TrainSpec) -> u64 {
    let d = spec.compute_dtype().size_in_bytes() as u64;
    if !spec.head_trained() || spec.compute_dtype() == candle_core::DType::BF16 || d > 4 {
        return 0;
    }
    let vh = cfg.vocab_size as u64 * cfg.hidden_size as u64;
    let n = spec.batch as u64 * spec.seq as u64;
    let chunks = n.div_ceil((crate::ops::CE_CHUNK_TOKENS as u64).min(n).max(1));
    // A `modules_to_save` head's `GradStore` sum is [`saved_head_backward`]'s. The
    // `GradStore`'s three buffers come after the chunk's buffers are freed: beyond the two
    // logits chunks the head's moment counts (`logits_and_loss`), or the part beside them.
    // From the second chunk on, the three sums are alive beside that chunk's logits and `G`
    // (`l2` tokens: the largest chunk after the first), not beside two full chunks.
    let c = n.min(crate::ops::CE_CHUNK_TOKENS as u64);
    let l2 = n.saturating_sub(c).min(c);
    let v = cfg.vocab_size as u64;
    let part = if d == 2 { 6 * vh } else { 4 * vh };
    let total = if chunks > 1 {
        (12 * vh).saturating_sub(8 * (c - l2) * v).max(part)
    } else if d == 4 && spec.adaptation.lora.is_none() {
        (12 * vh).saturating_sub(8 * c * v).max(part)
    } else {
        part
    };
    // `largest_trainable` counts a tied embedding's gradient twice under checkpointing (its
    // own pass summed into the head's at the end, `terms`): both copies are taken off. Found
    // with an allocation probe on vramcal's simulated FSDP ranks of smollm2-135m
    // (`results/cpu/smollm2-135m-sharded.csv`), the only rows whose peak is that head moment:
    // the sum, the part and the new sum, `12·V·h`, and two logits chunks, nothing else.
    let copies = if spec.checkpointing != Checkpointing::None
        && spec.adaptation.lora.is_none()
        && cfg.tie_word_embeddings
    {
        2
    } else {
        1
    };
    // Under autocast (f32 weights, f16 products) the `GradStore` chain of the f16 cast's
    // gradient and the f32 weight's, 14·V·h (as `bf16_matmul_widening` counts it in bf16);
    // the copies are of the trainable dtype.
    let td = spec.trainable_dtype().size_in_bytes() as u64;
    let chain = if spec.checkpointing != Checkpointing::None
        && spec.adaptation.lora.is_none()
        && d == 2
        && td == 4
    {
        14 * vh
    } else {
        0
    };
    total.max(chain).saturating_sub(copies * td * vh)
}

/// The f32 running sum of an `lm_head` adapter's `lora_B` gradient in the fused head's backward
/// beyond the gradient itself (bytes, `src/ops/loss.rs`: each chunk's part `Gᵀ·u` `(V, r)` is
/// converted to f32 and added to the sum of the earlier chunks'): with more than one chunk the
/// part and the new sum beside the old, `2·4·V·r`; nothing with one chunk or without the
/// adapter. Found on `results/cpu/smollm2-135m-lm-head-embed.csv`'s `lm_head`-only QLoRA row at
/// 1 × 512 (2.7 % under without it), whose peak is the head's backward.
pub fn head_adapter_grad_sum(cfg: &ModelConfig, spec: &TrainSpec) -> u64 {
    let Some(l) = spec.adaptation.lora.as_ref().filter(|l| l.lm_head) else {
        return 0;
    };
    let n = spec.batch as u64 * spec.seq as u64;
    if n <= crate::ops::CE_CHUNK_TOKENS as u64 {
        return 0;
    }
    2 * 4 * (cfg.vocab_size as u64 * l.r as u64)
}

/// The optimizer step's transient beyond weights, gradients and states (bytes).
///
/// vramcal's (`candle` profile, `src/optim/`): on the CPU every optimizer updates in place,
/// with no temporary but Adafactor's f32 column sums of one matrix (4 bytes × the most
/// columns of a trainable matrix). On other devices: AdamW's chunked path about ten f32
/// buffers of one chunk (at most 2^18 elements); SGD about four f32 copies of the largest
/// trainable tensor and Adafactor about five (candle operations on whole tensors), plus one
/// copy in the weights' dtype, and one more under master weights (the cast back). These
/// device counts are from the code, not yet measured.
///
/// PyTorch's (torch profiles): `gradients` bytes, about one parameter-sized buffer per tensor
/// group (foreach AdamW); the torch profiles use [`torch::optimizer`] instead.
pub fn optimizer_transient(
    cfg: &ModelConfig,
    spec: &TrainSpec,
    profile: Profile,
    gradients: u64,
    cpu: bool,
) -> u64 {
    use crate::spec::Optimizer;
    if profile != Profile::Candle {
        return gradients;
    }
    let d = spec.trainable_dtype().size_in_bytes() as u64;
    let largest = largest_trainable(cfg, spec) / d;
    if cpu {
        return match spec.optimizer {
            Optimizer::Adafactor => 4 * most_trainable_columns(cfg, spec),
            _ => 0,
        };
    }
    let master = if spec.precision.is_some_and(|p| p.master_weights()) {
        largest * d
    } else {
        0
    };
    master
        + match spec.optimizer {
            Optimizer::Sgd => largest * (4 * 4 + d),
            Optimizer::Adafactor => largest * (5 * 4 + d),
            _ => 10 * 4 * largest.min(1 << 18),
        }
}

/// The most columns of a trainable matrix (the adapters' A and B under LoRA).
fn most_trainable_columns(cfg: &ModelConfig, spec: &TrainSpec) -> u64 {
    torch::own_trainable_tensors(cfg, spec)
        .iter()
        .filter(|(_, cols)| *cols > 1)
        .map(|(_, cols)| *cols)
        .max()
        .unwrap_or(0)
}

/// Bytes of the largest trainable tensor (in the trainable tensors' dtype).
pub fn largest_trainable(cfg: &ModelConfig, spec: &TrainSpec) -> u64 {
    let d = spec.trainable_dtype().size_in_bytes() as u64;
    let elems = match &spec.adaptation.lora {
        // vramcal's step splits a mixture of experts' 3-D tensors into one matrix per expert
        // (and `gate_up_proj`'s into gate and up).
        None => cfg
            .param_shapes()
            .iter()
            .map(|p| {
                let n = p.numel();
                let e = cfg.moe().map_or(1, |m| m.experts as u64);
                if p.name.ends_with(".mlp.experts.gate_up_proj") {
                    n / (2 * e)
                } else if p.name.ends_with(".mlp.experts.down_proj") {
                    n / e
                } else {
                    n
                }
            })
            .max()
            .unwrap_or(0),
        Some(l) => {
            // On a mixture of experts under `all-linear`, each expert's share of PEFT's
            // `gate_up_proj` adapter: `A_e` `(2r, h)`, `B_e`'s gate and up rows `(i, 2r)` each
            // (`src/model/moe.rs`, `GateUpLora`).
            let experts = if l.experts_adapted(cfg) {
                2 * (l.r * cfg.hidden_size.max(cfg.intermediate_size)) as u64
            } else {
                0
            };
            let layers = l
                .layer_targets(cfg)
                .iter()
                .map(|&t| {
                    let (o, i) = crate::spec::target_shape(cfg, t);
                    (l.r * o.max(i)) as u64
                })
                .max()
                .unwrap_or(0)
                .max(experts);
            // `lm_head`'s `B` `(V, r)` and `embed_tokens`' `A` `(r, V)`.
            let top = if l.top_level() {
                (l.r * cfg.vocab_size.max(cfg.hidden_size)) as u64
            } else {
                0
            };
            // A `modules_to_save` copy, `(V, h)`.
            let saved = if l.saves_modules() {
                cfg.vocab_size as u64 * cfg.hidden_size as u64
            } else {
                0
            };
            layers.max(top).max(saved)
        }
    };
    elems * d
}

/// The static part and the terms of `spec` for `profile`.
pub fn terms(cfg: &ModelConfig, spec: &TrainSpec, profile: Profile, cpu: bool) -> Terms {
    match profile {
        Profile::Candle => candle_terms(cfg, spec, cpu),
        Profile::TorchSdpa => torch::terms(cfg, spec, false),
        Profile::TorchEager => torch::terms(cfg, spec, true),
    }
}

/// Predicted peak of step 2's backward with coefficients `c` (see [`Term`]).
pub fn predicted_backward_peak(t: &Terms, c: &Coefficients) -> f64 {
    let m = t.peak_moment(&c.values);
    let row = t.design(m);
    (t.weights + t.optimizer_states + t.workspace + t.static_at(m)) as f64
        + row.iter().zip(c.values).map(|(x, k)| x * k).sum::<f64>()
}

/// The items of what data-parallel training holds through backward beyond its shards (see
/// [`multi::Sharded`]): DDP's or DeepSpeed's gradient buckets, FSDP2's root and reduce-scatter
/// buffers, ZeRO-3's persistent 16-bit gradient partition.
fn backward_items(s: &Sharding, m: &multi::Sharded, profile: Profile) -> Vec<Item> {
    let mut v = Vec::new();
    match s.shard {
        Shard::Ddp => v.push(Item {
            name: "gradient buckets (DDP)".into(),
            bytes: m.reduce_bucket,
            formula: "a copy of every trainable gradient in DDP's 25 MiB buckets (gradient_as_bucket_view=False, torch's default)".into(),
        }),
        Shard::Fsdp if profile == Profile::Candle => v.push(Item {
            name: "FSDP root, unsharded".into(),
            bytes: m.fsdp_root,
            formula: "embedding, final norm and head (and their adapters) gathered from forward to the end of backward (FSDP2 keeps the root unsharded)".into(),
        }),
        Shard::Fsdp => v.push(Item {
            name: "FSDP root, unsharded".into(),
            bytes: m.fsdp_root,
            formula: "embedding, final norm and head gathered from forward to the end of backward (FSDP2 keeps the root unsharded), with their gradients when trained; one layer's unsharded gradients and reduce-scatter input, the previous layer's reduce-scatter input, the next layer's parameters prefetched".into(),
        }),
        _ => v.push(Item {
            name: "gradient reduce bucket (DeepSpeed)".into(),
            bytes: m.reduce_bucket,
            formula: format!(
                "reduce_bucket_size ({}) × gradient dtype, through backward",
                s.reduce_bucket_elements
            ),
        }),
    }
    if m.grad_partition > 0 {
        v.push(Item {
            name: "gradient partition (ZeRO-3)".into(),
            bytes: m.grad_partition,
            formula: "the flat gradient partition, from initialization on: ⌈numel / GPUs⌉ elements of each trainable tensor × dtype".into(),
        });
    }
    if m.gradients_persistent && profile != Profile::Candle {
        v.push(Item {
            name: "gradients (ZeRO-3 partition)".into(),
            bytes: m.gradients,
            formula: "DeepSpeed ZeRO-3's flat 16-bit gradient partition, allocated at the start: trainable params × dtype / GPUs".into(),
        });
    }
    v
}

/// Estimates the peak of a training step of `spec` on `cfg`.
///
/// # Errors
/// [`Error::InvalidValue`] when the coefficients belong to another profile, or the spec is
/// invalid for the model.
pub fn estimate(
    cfg: &ModelConfig,
    spec: &TrainSpec,
    profile: Profile,
    c: &Coefficients,
) -> Result<Estimate> {
    estimate_sharded(cfg, spec, profile, c, None)
}

/// [`estimate`] per GPU under `sharding` (scheme, data-parallel GPUs, offload; see
/// [`multi::shard`]); activations stay per GPU (each GPU runs its own micro-batch). The torch
/// profiles add what DDP, DeepSpeed's ZeRO and FSDP2 allocate beyond the shards.
///
/// # Errors
/// As [`estimate`]; [`Error::InvalidValue`] for a sharding [`Sharding::validate`] refuses or an
/// offload [`multi::shard`] refuses.
pub fn estimate_sharded(
    cfg: &ModelConfig,
    spec: &TrainSpec,
    profile: Profile,
    c: &Coefficients,
    sharding: Option<Sharding>,
) -> Result<Estimate> {
    if c.profile != profile {
        return Err(Error::invalid(
            "--calibration",
            &c.source,
            format!(
                "has coefficients for profile {}, not {}",
                c.profile.name(),
                profile.name()
            ),
        ));
    }
    spec.validate(cfg)?;
    check_saved_modules(spec, profile)?;
    // A torch table fitted on PyTorch's CPU rows describes PyTorch on the CPU.
    let cpu_spec;
    let spec = if profile != Profile::Candle && c.cpu && !spec.torch_cpu {
        cpu_spec = TrainSpec {
            torch_cpu: true,
            ..spec.clone()
        };
        &cpu_spec
    } else {
        spec
    };
    let mut t = terms(cfg, spec, profile, c.cpu);
    // The share of the optimizer states this GPU steps (1 without sharding).
    let mut state_share = 1.0;
    // Gradient bytes on the GPU at the step, and what they are.
    let mut step_gradients = (t.gradients, "trainable params × dtype".to_string());
    let mut host_bytes = None;
    let mut sharded_transient = None;
    let mut static_items: Vec<Item> = Vec::new();
    // vramcal's FSDP rank: what a layer's backward holds beyond the rest, and what the
    // reduce-scatter after backward holds.
    let mut head_extra = 0;
    let mut layer_extra = 0;
    let mut end_extra = 0;
    let mut scatter_items: Vec<(String, u64, String)> = Vec::new();
    let full_gradients = t.gradients;
    if let Some(s) = &sharding {
        let m = multi::shard(
            cfg,
            spec,
            s,
            profile != Profile::Candle,
            t.weights,
            t.gradients,
            t.optimizer_states,
        )?;
        t.weights = m.weights;
        state_share = m.optimizer_states as f64 / t.optimizer_states.max(1) as f64;
        t.optimizer_states = m.optimizer_states;
        t.terms[Term::GradientsLive.index()] *= m.gradients as f64 / t.gradients.max(1) as f64;
        t.gradients = m.gradients;
        t.backward_static = m.reduce_bucket + m.fsdp_root + m.grad_partition;
        t.head_static += m.head_extra;
        if profile == Profile::Candle && spec.accumulate > 1 {
            // The earlier micro-batches' sum at the head's moment is the rank's: the full
            // gradients (DDP, ZeRO-1), the partition or shards they are summed into (ZeRO-2,
            // FSDP), none beyond ZeRO-3's gradient partition, counted from the start.
            let earlier = match s.shard {
                Shard::Ddp | Shard::Zero1 => m.gradients,
                Shard::Zero2 | Shard::Fsdp => m.step_gradients,
                Shard::Zero3 => 0,
            };
            t.head_static = t.head_static.saturating_sub(full_gradients) + earlier;
        }
        head_extra = m.head_extra;
        t.layer_static += m.layer_extra;
        t.end_static += m.end_extra;
        end_extra = m.end_extra;
        layer_extra = m.layer_extra;
        scatter_items = m.scatter.clone();
        if let (Some(a), true) = (m.accumulated_gradients, spec.accumulate > 1) {
            // vramcal's ZeRO-2 and FSDP ranks sum earlier micro-batches' gradients into their
            // partition or shards: those, not a second set of full gradients, are alive while
            // the next micro-batch builds its own.
            t.terms[Term::GradientsLive.index()] = a as f64;
        }
        if m.gradients_persistent {
            // Held whole from the start: counted, not a backward-time term.
            t.backward_static += m.gradients;
            t.terms[Term::GradientsLive.index()] = 0.0;
        }
        static_items = backward_items(s, &m, profile);
        sharded_transient = m.step_transient;
        if s.offload != crate::spec::Offload::None {
            host_bytes = Some(m.host_bytes);
        }
        step_gradients = (
            m.step_gradients,
            if m.host_step {
                "none: the step runs on the host (offload)".into()
            } else if profile != Profile::Candle && s.deepspeed() {
                match s.shard {
                    Shard::Zero3 => "DeepSpeed ZeRO-3: the 16-bit gradient partition, the reduce bucket and one sub-group (≤ 1e9 elements) in fp32".into(),
                    _ => "DeepSpeed's flat fp32 gradient partition: 4 B × trainable params / GPUs".into(),
                }
            } else if s.shard == Shard::Ddp && profile != Profile::Candle {
                "trainable params × dtype, and DDP's bucket copy of them".into()
            } else if s.shard == Shard::Ddp {
                "trainable params × dtype, and the DDP buckets' copy of them".into()
            } else if s.shard == Shard::Zero1 {
                "trainable params × dtype, and this rank's partition of them filled from them (the reduce-scatter at the step)".into()
            } else if s.shard == Shard::Zero2 {
                "this rank's partition of the gradients: trainable params × dtype / GPUs".into()
            } else {
                "trainable params × dtype / GPUs".into()
            },
        );
    }
    let bwd = predicted_backward_peak(&t, c);
    let bwd_basis = t.reserved_basis(t.peak_moment(&c.values), &c.values);
    let opt_transient = match profile {
        _ if sharded_transient.is_some() => sharded_transient.unwrap_or(0),
        Profile::Candle => optimizer_transient(cfg, spec, profile, t.gradients, c.cpu),
        // Each GPU steps its own partition of the states (ZeRO): its transient shrinks with it.
        _ => (t.step_transient as f64 * state_share).round() as u64,
    };
    // The torch profiles' fitted constant (CUDA workspaces) is alive at the step too.
    let step_constant = if t.torch {
        c.values[Term::Constant.index()]
    } else {
        0.0
    };
    let opt = (t.weights + step_gradients.0 + t.optimizer_states + opt_transient + t.workspace)
        as f64
        + step_constant;
    // Held at every moment of the step.
    let held = vec![
        Item {
            name: "weights".into(),
            bytes: t.weights,
            formula: if profile != Profile::Candle
                && cfg.moe().is_some()
                && spec.adaptation.quant != Quant::None
            {
                "params × dtype; NF4 (0.5 B + block scales) for the attention's linear layers only: bitsandbytes leaves Mixtral's router and experts unquantized and prepare_model_for_kbit_training makes them fp32".into()
            } else {
                "params × dtype (NF4: 0.5 B + block scales)".into()
            },
        },
        Item {
            name: match spec.optimizer {
                crate::spec::Optimizer::AdamwTorch
                    if !spec.precision.is_some_and(|p| p.master_weights()) =>
                {
                    "optimizer states (AdamW m, v)".into()
                }
                o => format!("optimizer states ({o})"),
            },
            bytes: t.optimizer_states,
            formula: match sharding {
                Some(Sharding { offload: o, .. }) if o != crate::spec::Offload::None => {
                    format!("none on the GPU (--offload {o}): in host RAM, counted below")
                }
                Some(s)
                    if profile != Profile::Candle
                        && s.deepspeed()
                        && matches!(
                            spec.optimizer,
                            crate::spec::Optimizer::AdamwTorch
                                | crate::spec::Optimizer::AdamwTorchFused
                        ) =>
                {
                    "DeepSpeed: an fp32 partition of the weights + 2 fp32 moments, 12 B × trainable params / GPUs".into()
                }
                Some(s) if profile != Profile::Candle && s.deepspeed() && !spec.precision.is_some_and(|p| p.master_weights()) => {
                    format!("{} / GPUs + DeepSpeed's fp32 partition of the weights (4 B × trainable params / GPUs)", torch::states_formula(spec))
                }
                Some(s) if s.shard == Shard::Ddp => torch::states_formula(spec),
                Some(s) if profile == Profile::Candle && matches!(s.shard, Shard::Zero1 | Shard::Zero2) => format!(
                    "{} for this rank's partition (trainable params / GPUs), and the optimizer's copy of the partition's weights (trainable params × dtype / GPUs)",
                    torch::states_formula(spec)
                ),
                Some(_) => format!("{} / GPUs", torch::states_formula(spec)),
                None => torch::states_formula(spec),
            },
        },
    ];
    let held = {
        let mut held = held;
        if let Some(s) = sharding.filter(|s| s.shard.shards_parameters()) {
            held[0].formula = match s.offload {
                crate::spec::Offload::OptimizerParams => {
                    "one gathered layer (params × dtype); the partitions in host RAM".into()
                }
                // vramcal's FSDP rank: the shards only; the gathered layers and the root count
                // at the moments that hold them.
                _ if profile == Profile::Candle && s.shard == Shard::Fsdp => {
                    "every tensor's shard: ⌈rows / GPUs⌉ rows × dtype (padded)".into()
                }
                // vramcal's ZeRO-3 rank: the gathered parameters count at their moments.
                _ if profile == Profile::Candle && s.shard == Shard::Zero3 => {
                    "every tensor's partition: ⌈numel / GPUs⌉ × dtype".into()
                }
                // DeepSpeed ZeRO-3 under PyTorch: likewise, its schedule's gathered parameters
                // at their moments.
                _ if s.shard == Shard::Zero3 && spec.adaptation.quant == Quant::None => {
                    "params × dtype / GPUs".into()
                }
                _ => format!("{} / GPUs + one gathered layer", held[0].formula),
            };
        }
        if t.workspace > 0 {
            held.push(Item {
                name: "cuBLAS workspaces (CUDA)".into(),
                bytes: t.workspace,
                formula: torch::CUBLAS_WORKSPACES_FORMULA.into(),
            });
        }
        held
    };
    let mut items = held.clone();
    let moment = t.peak_moment(&c.values);
    let mut own = t.static_at(moment).saturating_sub(t.backward_static);
    // vramcal's FSDP rank, and ZeRO-3 (both profiles): what the head's backward, a layer's and
    // the end of backward hold beyond the rest, itemized apart from the one-device step's own
    // statics (FSDP has nothing at the head's).
    let zero3 = sharding.is_some_and(|s| s.shard == Shard::Zero3);
    let sharded_extras = if zero3 {
        [
            (
                Moment::Head,
                head_extra,
                "gathered parameters (ZeRO-3)",
                "the parameters DeepSpeed's schedule holds whole at the head's backward: those used again within stage3_max_reuse_distance (1e9 elements) and those of at most 1e5 elements stay gathered from step 2 on (params × dtype)",
            ),
            (
                Moment::Layer,
                layer_extra,
                if profile == Profile::Candle {
                    "gathered parameters and a layer's gradients (ZeRO-3)"
                } else {
                    "gathered parameters (ZeRO-3, a layer's backward)"
                },
                if profile == Profile::Candle {
                    "the parameters held whole at a layer's backward (the most over the layers: params × dtype) and the layer's whole gradients before they are copied into the bucket"
                } else {
                    "the parameters held whole at a layer's backward (the most over the layers: params × dtype)"
                },
            ),
            (
                Moment::End,
                end_extra,
                "gathered parameters (ZeRO-3, end of backward)",
                "the parameters held whole at the end of backward, the embedding's backward when it trains (params × dtype)",
            ),
        ]
    } else {
        [
            (Moment::Head, 0, "", ""),
            (
            Moment::Layer,
            layer_extra,
            "gathered layers and a layer's gradients (FSDP)",
            "the layer backpropagated and the next one prefetched, gathered (2 × one layer's params × dtype); its unsharded gradients; the previous layer's reduce-scatter input (padded to ⌈rows / GPUs⌉ · GPUs rows)",
        ),
        (
            Moment::End,
            end_extra,
            "reduce-scatter input (last layer, FSDP)",
            "the last layer's gradients copied into one flat buffer (padded to ⌈rows / GPUs⌉ · GPUs rows), kept until the root's reduce-scatter begins",
        ),
        ]
    };
    for (at, bytes, name, formula) in sharded_extras {
        if moment == at && bytes > 0 {
            own = own.saturating_sub(bytes);
            items.push(Item {
                name: name.into(),
                bytes,
                formula: formula.into(),
            });
        }
    }
    if own > 0 {
        items.push(match moment {
            Moment::Layer => Item {
                name: "expert gradient (layer backward)".into(),
                bytes: own,
                formula: "PEFT all-linear on a mixture of experts: E · h · i × experts' dtype beyond the layer's saved tensors, counted".into(),
            },
            _ => Item {
                name: "head casts and adapter (checkpointed)".into(),
                bytes: own,
                formula: "the fused head's kept autocast casts and lm_head adapter path (saved-tensor table), counted".into(),
            },
        });
    }
    items.extend(static_items.iter().filter(|i| i.bytes > 0).cloned());
    let row = t.design(moment);
    for term in Term::ALL {
        let i = term.index();
        let (name, f) = term.item();
        let b = row[i] * c.values[i];
        if b > 0.0 {
            // Sharded gradients: the term's bytes are this GPU's share.
            let per_gpu = term == Term::GradientsLive && t.gradients < full_gradients;
            // `terms` counts a tied embedding's gradient twice under checkpointing in full
            // fine-tuning (its own pass summed into the head's at the end of backward).
            let twice = term == Term::LargestTrainable
                && profile == Profile::Candle
                && t.checkpointed
                && spec.adaptation.lora.is_none()
                && cfg.tie_word_embeddings;
            items.push(Item {
                name: name.into(),
                bytes: b.round() as u64,
                formula: format!(
                    "{:.3} × {f}{}{}",
                    c.values[i],
                    if twice {
                        " × 2 (a tied embedding's own pass and the head's, summed at the end of backward)"
                    } else {
                        ""
                    },
                    match sharding.map(|s| s.shard) {
                        _ if !per_gpu => "",
                        // vramcal's FSDP rank holds the root's gradients whole until the end
                        // of backward.
                        Some(Shard::Fsdp) if profile == Profile::Candle => {
                            ": the layers' sharded (⌈rows / GPUs⌉ rows of each), the root's (embedding, final norm, head) unsharded"
                        }
                        _ => " / GPUs",
                    }
                ),
            });
        }
    }
    // vramcal's ZeRO-2 rank once backward has returned (its graph freed): the full gradients
    // and the partition they are reduce-scattered into.
    let scatter = if scatter_items.is_empty() {
        0.0
    } else {
        (t.weights + t.optimizer_states + t.workspace) as f64
            + scatter_items.iter().map(|i| i.1 as f64).sum::<f64>()
    };
    let (peak, phase, basis) = if scatter > bwd && scatter >= opt {
        items = held.clone();
        items.extend(scatter_items.iter().map(|(name, bytes, formula)| Item {
            name: name.clone(),
            bytes: *bytes,
            formula: formula.clone(),
        }));
        (scatter, "backward", ReservedBasis::default())
    } else if bwd >= opt {
        (bwd, "backward", bwd_basis)
    } else {
        // The items that add up at the optimizer step.
        items = held;
        items.extend([
            Item {
                name: "gradients".into(),
                bytes: step_gradients.0,
                formula: step_gradients.1,
            },
            Item {
                name: "optimizer step transient".into(),
                bytes: opt_transient,
                formula: match (profile, sharding) {
                    (Profile::Candle, _) => {
                        "10 f32 buffers of one update chunk (≤ 2^18 elements)".into()
                    }
                    (_, Some(s)) if s.offload != crate::spec::Offload::None => {
                        "none on the GPU: the step runs on the host".into()
                    }
                    (_, Some(s))
                        if s.deepspeed()
                            && sharded_transient.is_some()
                            && spec.optimizer == crate::spec::Optimizer::AdamwTorch =>
                    {
                        let of = if s.shard == Shard::Zero3 {
                            "of one sub-group of DeepSpeed's partition (≤ 1e9 elements)"
                        } else {
                            "of DeepSpeed's partition"
                        };
                        if spec.torch_adamw_for_loop() {
                            format!("torch AdamW for-loop: two fp32 buffers {of}")
                        } else {
                            format!("torch AdamW foreach: one fp32 buffer {of}")
                        }
                    }
                    _ => torch::optimizer_formula(spec).into(),
                },
            },
        ]);
        if step_constant > 0.0 {
            let (name, f) = Term::Constant.item();
            items.push(Item {
                name: name.into(),
                bytes: step_constant.round() as u64,
                formula: f.into(),
            });
        }
        let basis = ReservedBasis {
            transient: opt_transient as f64,
            kept: 0.0,
        };
        (opt, "optimizer_step", basis)
    };
    // Loading (torch profiles): the weights and a tied head's untied copy; under DDP, also its
    // construction's broadcast of the parameters.
    let load_bytes = match profile {
        Profile::Candle => 0,
        // Every rank loads the whole model where it will train, except that ZeRO-3 and FSDP
        // on a GPU shard it from the host (or the meta device) first.
        _ if sharding.is_some_and(|s| s.shard.shards_parameters()) && !spec.torch_cpu => 0,
        _ => torch::load_bytes(cfg, spec),
    };
    let load_items = vec![Item {
        name: "weights while loading".into(),
        bytes: load_bytes,
        formula: "params × dtype, plus a tied head's (V, h) before tying".into(),
    }];
    let (load, load_items) = match sharding {
        Some(s) if s.shard == Shard::Ddp && profile != Profile::Candle => {
            let broadcast = torch::ddp_broadcast_transient(cfg, spec);
            let wrap = vec![
                Item {
                    name: "weights".into(),
                    bytes: t.weights,
                    formula: "params × dtype (NF4: 0.5 B + block scales)".into(),
                },
                Item {
                    name: "DDP's parameter broadcast (wrapping)".into(),
                    bytes: broadcast,
                    formula: "two consecutive ≥ 250 MiB flat buckets of the parameters (broadcast_coalesced, two in flight)".into(),
                },
            ];
            if t.weights + broadcast > load_bytes {
                (t.weights + broadcast, wrap)
            } else {
                (load_bytes, load_items)
            }
        }
        _ => (load_bytes, load_items),
    };
    let (peak, phase, basis) = if load as f64 > peak {
        items = load_items;
        (load as f64, "load", ReservedBasis::default())
    } else {
        (peak, phase, basis)
    };
    let peak_bytes = peak.round() as u64;
    Ok(Estimate {
        profile,
        items,
        peak_bytes,
        reserved_bytes: c
            .reserved
            .as_ref()
            .map(|r| peak_bytes + basis.extra(r).round() as u64),
        peak_phase: phase.into(),
        coefficients: c.source.clone(),
        host_bytes_per_rank: host_bytes,
    })
}
