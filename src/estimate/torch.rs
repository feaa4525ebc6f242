//! What PyTorch + transformers keep for the same decoder (`torch-sdpa`, `torch-eager`), per
//! token and layer, from transformers' `modeling_llama.py` / `modeling_mistral.py` and the
//! saved tensors of the autograd functions involved:
//!
//! * `LlamaRMSNorm` upcasts to fp32: `pow` saves the fp32 input (4h bytes), the weight product
//!   saves the normalized model-dtype tensor (d·h), and the next linear saves its input (d·h);
//! * `q_proj`/`k_proj`/`v_proj` share their input; RoPE (`q·cos + rotate_half(q)·sin`) saves
//!   `q`, `rotate_half(q)` and the same for `k` (2·d·(q + kv));
//! * SDPA (flash/memory-efficient) saves `q`, `k`, `v`, the output and a per-row fp32
//!   log-sum-exp (d·(2q + 2kv) + 4·heads); eager attention instead keeps the fp32 softmax
//!   output and its model-dtype cast (6 bytes per score) and the inputs of both matmuls;
//! * the SwiGLU MLP saves `gate` (SiLU's input), `silu(gate)` and `up` (the product's inputs)
//!   and the product (`down_proj`'s input): 4·d·i;
//! * the head keeps the model-dtype logits, their fp32 upcast and log-softmax output
//!   (transformers' `ForCausalLMLoss` upcasts): (d + 8)·V per token;
//! * with gradient checkpointing (non-reentrant), each layer keeps only its input (d·h) and one
//!   layer is recomputed at a time.
//!
//! Weights, gradients and AdamW states follow the dtypes of the spec (no fp32 master copy),
//! and backward's transient is one fp32 gradient of the logits.

use candle_core::DType;

use super::{weight_bytes, Term, Terms};
use crate::config::ModelConfig;
use crate::spec::Checkpointing;
use crate::spec::{target_shape, TrainSpec};

/// Saved bytes of one layer for `spec` (all tokens of the micro-batch).
pub fn layer_bytes(cfg: &ModelConfig, spec: &TrainSpec, eager: bool) -> u64 {
    let d = spec.dtype.size_in_bytes() as u64;
    let n = (spec.batch * spec.seq) as u64;
    let h = cfg.hidden_size as u64;
    let q = target_shape(cfg, crate::spec::Target::QProj).0 as u64;
    let kv = target_shape(cfg, crate::spec::Target::KProj).0 as u64;
    let i = cfg.intermediate_size as u64;
    let heads = cfg.num_attention_heads as u64;
    let norm = if spec.dtype == DType::F32 {
        2 * d * h
    } else {
        (4 + 2 * d) * h
    };
    let rope = 2 * d * (q + kv);
    let attn = if eager {
        // q·kᵀ inputs (q, k), fp32 softmax output + cast (6 bytes per score), probs·v inputs.
        d * (q + 2 * kv) + 6 * heads * spec.seq as u64 + d * q
    } else {
        d * (2 * q + 2 * kv) + 4 * heads
    };
    let mut per_token = 2 * norm + rope + attn + d * q + d * h + 4 * d * i;
    if let Some(l) = &spec.adaptation.lora {
        // PEFT's adapter path keeps x·Aᵀ (and the dropout output when dropout > 0).
        for &t in &l.targets {
            let (_, inp) = target_shape(cfg, t);
            per_token += d * l.r as u64 + if l.dropout > 0.0 { d * inp as u64 } else { 0 };
        }
    }
    per_token * n
}

/// The static part and the terms for the torch profiles.
pub fn terms(cfg: &ModelConfig, spec: &TrainSpec, eager: bool) -> Terms {
    let d = spec.dtype.size_in_bytes() as u64;
    let n = (spec.batch * spec.seq) as u64;
    let l = cfg.num_hidden_layers as u64;
    let t = spec.trainable_params(cfg);
    let layer = layer_bytes(cfg, spec, eager);
    let (act, ckpt) = match spec.checkpointing {
        Checkpointing::None => (l * layer, 0),
        Checkpointing::Every(k) => (
            (k as u64).min(l) * layer,
            l.div_ceil(k as u64) * n * cfg.hidden_size as u64 * d,
        ),
    };
    // Logits (model dtype), fp32 upcast, log-softmax (fp32); backward's fp32 logits gradient.
    let head = n * cfg.vocab_size as u64 * (d + 8) + n * cfg.vocab_size as u64 * 4;
    Terms {
        weights: weight_bytes(cfg, spec),
        gradients: t * d,
        optimizer_states: 2 * t * spec.state_dtype.size_in_bytes() as u64,
        terms: Term::ALL.map(|term| match term {
            Term::Activations => act as f64,
            Term::CheckpointInputs => ckpt as f64,
            Term::LogitsAndLoss => head as f64,
            Term::GradientsLive => (t * d) as f64,
            Term::Constant => 1.0,
            Term::AttentionScores
            | Term::LargestTrainable
            | Term::AttentionTransient
            | Term::CpuBf16MatmulWidening
            | Term::CpuAttentionTransient => 0.0,
        }),
        checkpointed: ckpt > 0,
        two_moments: false,
    }
}
