//! The training-setup vocabulary, in one place: every option a user names (method, LoRA,
//! quantization, dtypes, optimizer, checkpointing, attention, save, device, weights, estimate
//! profile, sharding) is a type here with one `FromStr`/`Display` pair, and [`TrainSpec`] is
//! one configuration to measure or estimate, with the one place that rejects bad sizes.
//!
//! `model/`, `measure/`, `estimate/` and the commands import their vocabulary from here; this
//! module imports only [`crate::config`] (model sizes) and [`crate::error`].

pub mod attention;
pub mod axis;
pub mod checkpointing;
pub mod device;
pub mod lora;
pub mod loss;
pub mod method;
pub mod optimizer;
pub mod precision;
pub mod profile;
pub mod save;
pub mod shard;
pub mod weights;
pub mod zero3;

use candle_core::DType;

pub use attention::Attention;
pub use axis::Axis;
pub use checkpointing::Checkpointing;
pub use device::DeviceChoice;
pub use lora::{LoraConfig, Target};
pub use loss::Loss;
pub use method::{check_quant_dtype, Adaptation, Method, Quant};
pub use optimizer::{AdamWConfig, Optimizer, TorchAdamw};
pub use precision::{dtype_name, parse_dtype, Precision};
pub use profile::Profile;
pub use save::SaveMode;
pub use shard::{partition_len, Offload, Shard, Sharding, DEEPSPEED_REDUCE_BUCKET_SIZE};
pub use weights::WeightsSpec;

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// `(out, in)` of LoRA target `t` in a layer of `cfg`.
pub fn target_shape(cfg: &ModelConfig, t: Target) -> (usize, usize) {
    let h = cfg.hidden_size;
    let q = cfg.num_attention_heads * cfg.head_dim();
    let kv = cfg.kv_heads() * cfg.head_dim();
    let i = cfg.intermediate_size;
    match t {
        Target::QProj => (q, h),
        Target::KProj | Target::VProj => (kv, h),
        Target::OProj => (h, q),
        Target::GateProj | Target::UpProj => (i, h),
        Target::DownProj => (h, i),
    }
}

/// LoRA parameters `L · Σ_targets r·(in + out)` (PEFT's count), with a Mixtral model's
/// router and expert adapters under `all-linear` ([`expert_adapter_shapes`]).
pub fn lora_param_count(cfg: &ModelConfig, lora: &LoraConfig) -> u64 {
    let per_layer: u64 = lora
        .layer_targets(cfg)
        .iter()
        .map(|&t| {
            let (o, i) = target_shape(cfg, t);
            (lora.r * (i + o)) as u64
        })
        .sum::<u64>()
        + expert_adapter_shapes(cfg, lora)
            .iter()
            .map(|(o, i)| o * i)
            .sum::<u64>();
    let (v, h) = (cfg.vocab_size as u64, cfg.hidden_size as u64);
    // lm_head: A (r, h), B (V, r); embed_tokens: A (r, V), B (h, r).
    let top = (lora.lm_head as u64 + lora.embed_tokens as u64) * lora.r as u64 * (v + h);
    per_layer * cfg.num_hidden_layers as u64 + top
}

/// `(rows, cols)` of the LoRA factors PEFT puts on one mixture-of-experts block under
/// `all-linear` ([`LoraConfig::experts_adapted`]), in order: the router's `A` `(r, h)` and `B`
/// `(E, r)`, `gate_up_proj`'s `A` `(2r·E, h)` and `B` `(2i, 2r·E)`, `down_proj`'s `A` `(r·E, i)`
/// and `B` `(h, r·E)`; none otherwise.
pub fn expert_adapter_shapes(cfg: &ModelConfig, lora: &LoraConfig) -> Vec<(u64, u64)> {
    let Some(m) = cfg.moe().filter(|_| lora.experts_adapted(cfg)) else {
        return Vec::new();
    };
    let (r, e) = (lora.r as u64, m.experts as u64);
    let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    vec![
        (r, h),
        (e, r),
        (2 * r * e, h),
        (2 * i, 2 * r * e),
        (r * e, i),
        (h, r * e),
    ]
}

/// One training configuration to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSpec {
    /// Sequences per step (micro-batch).
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Weight and compute dtype.
    pub dtype: DType,
    /// AdamW moment dtype.
    pub state_dtype: DType,
    /// AdamW hyper-parameters.
    pub adamw: AdamWConfig,
    /// Allow `seq` above `max_position_embeddings`.
    pub allow_longer: bool,
    /// Seed of the random token batches.
    pub data_seed: u64,
    /// Full fine-tuning, LoRA or QLoRA.
    pub adaptation: Adaptation,
    /// Activation checkpointing.
    pub checkpointing: Checkpointing,
    /// What attention keeps for backward (`sdpa` or `eager`).
    pub attention: Attention,
    /// Micro-batches per optimizer step (gradient accumulation); `batch` is the micro-batch.
    pub accumulate: usize,
    /// What the `save` phase writes after step 2.
    pub save: SaveMode,
    /// The optimizer (HF `optim` name).
    pub optimizer: Optimizer,
    /// SGD's momentum μ (`torch.optim.SGD`, dampening 0); 0, the Trainer's `optim=sgd`, keeps
    /// no state. Used by `sgd` only.
    pub momentum: f64,
    /// The loss implementation (torch profiles; vramcal's own step has its own chunked head).
    pub loss: Loss,
    /// The precision recipe where one is named (reference rows); `None`: everything in
    /// `dtype`, states in `state_dtype`, no autocast.
    pub precision: Option<Precision>,
    /// Whether PyTorch runs on the CPU (torch profiles: its AdamW then steps one tensor at a
    /// time instead of foreach); `false` for CUDA.
    pub torch_cpu: bool,
    /// Which implementation of torch's AdamW steps `adamw_torch` (torch profiles); `None`:
    /// torch ≥ 2.0's choice for the device ([`TrainSpec::torch_adamw_for_loop`]).
    pub torch_adamw: Option<TorchAdamw>,
}

impl TrainSpec {
    /// A spec with default dtype f32, f32 AdamW states and default hyper-parameters.
    pub fn new(batch: usize, seq: usize) -> Self {
        TrainSpec {
            batch,
            seq,
            dtype: DType::F32,
            state_dtype: DType::F32,
            adamw: AdamWConfig::default(),
            allow_longer: false,
            data_seed: 0,
            adaptation: Adaptation::default(),
            checkpointing: Checkpointing::None,
            attention: Attention::Sdpa,
            accumulate: 1,
            save: SaveMode::None,
            optimizer: Optimizer::AdamwTorch,
            momentum: 0.0,
            loss: Loss::Transformers,
            precision: None,
            torch_cpu: false,
            torch_adamw: None,
        }
    }

    /// Whether torch's AdamW steps one tensor at a time (`_single_tensor_adam`): as
    /// `torch_adamw` says, else torch ≥ 2.0's default, for-loop on the CPU and foreach on CUDA.
    pub fn torch_adamw_for_loop(&self) -> bool {
        match self.torch_adamw {
            Some(TorchAdamw::ForLoop) => true,
            Some(TorchAdamw::Foreach) => false,
            None => self.torch_cpu,
        }
    }

    /// Tokens per optimizer step (`micro-batch · accumulate · seq`).
    pub fn tokens(&self) -> usize {
        self.batch * self.accumulate * self.seq
    }

    /// The dtype matrix products run in: autocast's under an autocast recipe
    /// ([`Precision::autocast`]), else the weights' (`dtype`).
    pub fn compute_dtype(&self) -> DType {
        self.precision
            .and_then(|p| p.autocast())
            .unwrap_or(self.dtype)
    }

    /// The dtype LoRA adapters (and so their gradients) are kept in: fp32 over 16-bit weights
    /// under the `+amp` recipes (PEFT's `autocast_adapter_dtype=True`,
    /// [`Precision::fp32_adapters`]), else the weights'.
    pub fn adapter_dtype(&self) -> DType {
        if self.precision.is_some_and(|p| p.fp32_adapters()) {
            DType::F32
        } else {
            self.dtype
        }
    }

    /// The dtype of the trainable tensors and their gradients: the adapters' under LoRA, the
    /// weights' for full fine-tuning.
    pub fn trainable_dtype(&self) -> DType {
        if self.adaptation.lora.is_some() {
            self.adapter_dtype()
        } else {
            self.dtype
        }
    }

    /// The method for tables: `full`, or `lora`/`qlora` with rank and targets
    /// ([`LoraConfig::short_label`]), and `×N` where gradients accumulate over N micro-batches.
    pub fn method_label(&self) -> String {
        let mut s = match &self.adaptation.lora {
            None => "full".to_string(),
            Some(l) => format!("{} {}", self.adaptation.method(), l.short_label()),
        };
        if self.accumulate > 1 {
            s.push_str(&format!(" ×{}", self.accumulate));
        }
        s
    }

    /// Parameters that get gradients and AdamW states.
    pub fn trainable_params(&self, cfg: &ModelConfig) -> u64 {
        match &self.adaptation.lora {
            Some(l) => lora_param_count(cfg, l) + l.saved_param_count(cfg),
            None => cfg.param_count(),
        }
    }

    /// Whether the LM head's weight is trained (full fine-tuning, or PEFT's `modules_to_save`
    /// naming `lm_head`).
    pub fn head_trained(&self) -> bool {
        self.adaptation.lora.as_ref().is_none_or(|l| l.save_lm_head)
    }

    /// Whether the embedding table is trained (full fine-tuning, or PEFT's `modules_to_save`
    /// naming `embed_tokens`).
    pub fn embed_trained(&self) -> bool {
        self.adaptation
            .lora
            .as_ref()
            .is_none_or(|l| l.save_embed_tokens)
    }

    /// Checks the spec against the model: positive sizes, `seq ≤ max_position_embeddings`
    /// (unless `allow_longer`), and sizes whose byte counts fit in 64 bits.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] or [`Error::SeqTooLong`].
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        if self.batch == 0 {
            return Err(Error::invalid("--batch", 0, "must be at least 1"));
        }
        if self.seq == 0 {
            return Err(Error::invalid("--seq", 0, "must be at least 1"));
        }
        if let Some(l) = self
            .adaptation
            .lora
            .as_ref()
            .filter(|l| l.experts_adapted(cfg) && l.dropout > 0.0)
        {
            return Err(Error::invalid(
                "--lora dropout",
                l.dropout,
                "PEFT cannot apply dropout to the adapted parameters all-linear targets on Mixtral (ParamWrapper raises for lora_dropout != 0): use dropout=0",
            ));
        }
        if let (Some(_), Some(l)) = (cfg.moe(), &self.adaptation.lora) {
            let mlp: Vec<&str> = l
                .targets
                .iter()
                .filter(|t| !Target::ALL[..4].contains(t))
                .map(|t| t.name())
                .collect();
            if !l.all_linear && !mlp.is_empty() {
                return Err(Error::invalid(
                    "--lora targets",
                    mlp.join(","),
                    "a Mixtral model has no gate_proj/up_proj/down_proj modules: its experts are the 3-D parameters mlp.experts.gate_up_proj and down_proj, which PEFT adapts (with the router mlp.gate) under all-linear; target q/k/v/o_proj, lm_head, embed_tokens or all-linear",
                ));
            }
        }
        if self.seq > cfg.max_position_embeddings && !self.allow_longer {
            return Err(Error::SeqTooLong {
                seq: self.seq,
                max: cfg.max_position_embeddings,
            });
        }
        if self.accumulate == 0 {
            return Err(Error::invalid("--accumulate", 0, "must be at least 1"));
        }
        self.adamw.validate()?;
        if !self.state_dtype.is_float() {
            return Err(Error::invalid(
                "--optimizer-state-dtype",
                self.state_dtype.as_str(),
                "must be a float type",
            ));
        }
        self.adaptation.validate(self.dtype)?;
        if self.save == SaveMode::Merged
            && cfg.tie_word_embeddings
            && self
                .adaptation
                .lora
                .as_ref()
                .is_some_and(|l| l.top_level() || l.saves_modules())
        {
            return Err(Error::invalid(
                "--save",
                "merged",
                "an lm_head or embed_tokens adapter on a model whose head is tied to embed_tokens cannot be merged without changing the other too (nor a modules_to_save copy, which unties them); save the adapter (--save adapter)",
            ));
        }
        if self.precision.is_some_and(|p| p.fp32_adapters())
            && self
                .adaptation
                .lora
                .as_ref()
                .is_some_and(|l| l.saves_modules())
        {
            return Err(Error::invalid(
                "--lora modules_to_save",
                self.adaptation.lora.as_ref().map_or(String::new(), |l| l.saved_names().join(",")),
                "under a +amp recipe PEFT keeps the adapters in fp32 and the saved copies in the 16-bit weights' dtype, which vramcal does not model yet: use bf16/fp16 or amp-bf16/amp-fp16",
            ));
        }
        self.checkpointing.validate(cfg.num_hidden_layers)?;
        if !matches!(
            self.dtype,
            DType::F32 | DType::BF16 | DType::F16 | DType::F64
        ) {
            return Err(Error::invalid(
                "--dtype",
                self.dtype.as_str(),
                "expected f32, bf16, f16 or f64",
            ));
        }
        if !self.byte_counts_fit(cfg) {
            return Err(Error::invalid(
                "sizes",
                format!("batch {} × seq {}", self.batch, self.seq),
                "the memory this needs overflows 64 bits",
            ));
        }
        Ok(())
    }

    /// Whether the largest byte counts this spec can lead to fit in 64 bits, with every element
    /// taken at 8 bytes: parameters with a gradient and two optimizer states, `(tokens, hidden)`
    /// tensors for every layer, the logits, and the `(batch, heads, seq, seq)` scores of every
    /// layer (kept by eager attention, formed one layer at a time by vramcal's own step; the
    /// torch-eager profile keeps them whatever `--attention` says).
    fn byte_counts_fit(&self, cfg: &ModelConfig) -> bool {
        let (b, s, l) = (
            self.batch as u64,
            self.seq as u64,
            cfg.num_hidden_layers as u64 + 2,
        );
        let fits = || -> Option<()> {
            cfg.checked_param_count()?.checked_mul(32)?;
            let tokens = b.checked_mul(s)?.checked_mul(8)?;
            tokens.checked_mul(cfg.hidden_size as u64)?.checked_mul(l)?;
            tokens.checked_mul(cfg.vocab_size as u64)?;
            b.checked_mul(cfg.num_attention_heads as u64)?
                .checked_mul(s.checked_mul(s)?)?
                .checked_mul(8)?
                .checked_mul(l)?;
            Some(())
        };
        fits().is_some()
    }
}
