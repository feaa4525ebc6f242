//! Bounds of vramcal's own peak that need no calibration: what a point needs at the least,
//! used to refuse a point that cannot fit in this machine before it runs.

use crate::config::ModelConfig;
use crate::spec::{lora_param_count, Attention, Checkpointing, Quant, TrainSpec};

/// A lower bound of vramcal's peak (bytes): the base weights (NF4 linear weights at half a
/// byte), gradients and AdamW states of the trainable parameters, one f32 chunk of the LM
/// head's logits `(min(tokens, 256), vocab)`, one `(tokens, hidden)` tensor per layer (per
/// checkpointed segment), and with `--attention eager` the kept `(micro-batch, heads, seq,
/// seq)` probabilities. `None` on overflow.
pub fn min_bytes(cfg: &ModelConfig, spec: &TrainSpec) -> Option<u64> {
    let n = cfg.checked_param_count()?;
    let w = spec.dtype.size_in_bytes() as u64;
    let s = spec.state_dtype.size_in_bytes() as u64;
    let base = match spec.adaptation.quant {
        Quant::None => n.checked_mul(w)?,
        Quant::Nf4 { .. } => n.checked_mul(w)? / 4,
    };
    let t = match &spec.adaptation.lora {
        Some(l) => lora_param_count(cfg, l),
        None => n,
    };
    let per_trainable = w.checked_add(s.checked_mul(2)?)?;
    // The fused LM head forms its logits one chunk of tokens at a time.
    let tokens = (spec.batch as u64).checked_mul(spec.seq as u64)?;
    let logits = tokens
        .min(crate::ops::CE_CHUNK_TOKENS as u64)
        .checked_mul(cfg.vocab_size as u64)?
        .checked_mul(4)?;
    // `--attention eager` keeps (batch, heads, seq, seq) probabilities per kept layer.
    let probs = if spec.attention == Attention::Eager {
        let layers = match spec.checkpointing {
            Checkpointing::None => cfg.num_hidden_layers,
            Checkpointing::Every(k) => k.min(cfg.num_hidden_layers),
        } as u64;
        (spec.batch as u64)
            .checked_mul(cfg.num_attention_heads as u64)?
            .checked_mul((spec.seq as u64).checked_mul(spec.seq as u64)?)?
            .checked_mul(spec.compute_dtype().size_in_bytes() as u64)?
            .checked_mul(layers)?
    } else {
        0
    };
    // At least one (tokens, hidden) tensor per layer stays alive for backward (its residual
    // output), or per checkpointed segment input.
    let kept_hidden = match spec.checkpointing {
        Checkpointing::None => cfg.num_hidden_layers + 1,
        Checkpointing::Every(k) => cfg.num_hidden_layers.div_ceil(k.max(1)) + 1,
    } as u64;
    let hidden = tokens
        .checked_mul(cfg.hidden_size as u64)?
        .checked_mul(w)?
        .checked_mul(kept_hidden)?;
    base.checked_add(t.checked_mul(per_trainable)?)?
        .checked_add(logits)?
        .checked_add(probs)?
        .checked_add(hidden)
}
