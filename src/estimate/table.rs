//! The saved-tensor table of vramcal's own model (the `candle` profile): every tensor the
//! forward graph keeps alive until backward, per decoder layer and for the head, derived op by
//! op from `Decoder::layer_forward` in `src/model/mod.rs` (in the spirit of llm.c's table of
//! activation sizes). candle keeps every intermediate of the graph while the loss is alive, so
//! the table lists each op's output; views (reshape, transpose, narrow) cost nothing, and a cast
//! to the same dtype is free. When the model changes, this table changes in the same commit;
//! `tests/estimate.rs` holds it against a measured layer.
//!
//! Symbols: `N = batch·seq` tokens, `h` hidden, `q = heads·head_dim`, `kv = kv_heads·head_dim`,
//! `i` intermediate, `V` vocabulary, `S2 = batch·heads·seq²` attention scores, `r` LoRA rank.

use candle_core::DType;

use crate::config::ModelConfig;
use crate::model::lora::Target;
use crate::spec::{target_shape, TrainSpec};

/// One kept tensor of the forward graph.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedTensor {
    /// What it is, e.g. `input_layernorm.x_sq`.
    pub name: String,
    /// Shape in symbols, e.g. `(N, h)`.
    pub shape: &'static str,
    /// Elements.
    pub elems: u64,
    /// Bytes per element.
    pub elem_bytes: u64,
}

impl SavedTensor {
    /// Bytes.
    pub fn bytes(&self) -> u64 {
        self.elems * self.elem_bytes
    }
}

fn t(name: impl Into<String>, shape: &'static str, elems: u64, elem_bytes: u64) -> SavedTensor {
    SavedTensor {
        name: name.into(),
        shape,
        elems,
        elem_bytes,
    }
}

/// RMSNorm's kept tensors for `(N, h)` input (statistics in f32).
fn rms_norm(out: &mut Vec<SavedTensor>, p: &str, n: u64, h: u64, d: u64, cast: bool) {
    if cast {
        out.push(t(format!("{p}.x_f32"), "(N, h)", n * h, 4)); // x.to_dtype(f32)
    }
    out.push(t(format!("{p}.x_sq"), "(N, h)", n * h, 4)); // x²
    out.push(t(format!("{p}.stats"), "(N, 1)", 4 * n, 4)); // mean, +eps, sqrt, recip
    out.push(t(format!("{p}.x_normed"), "(N, h)", n * h, 4)); // x · inv
    if cast {
        out.push(t(format!("{p}.normed_cast"), "(N, h)", n * h, d)); // back to the model dtype
    }
    out.push(t(format!("{p}.out"), "(N, h)", n * h, d)); // · weight
}

/// A linear layer's kept tensors: its output, plus LoRA's adapter path and dropout copies.
#[allow(clippy::too_many_arguments)]
fn linear(
    out: &mut Vec<SavedTensor>,
    p: &str,
    shape: &'static str,
    n: u64,
    o: u64,
    inp: u64,
    d: u64,
    spec: &TrainSpec,
    t_: Target,
) {
    out.push(t(format!("{p}.out"), shape, n * o, d));
    if let Some(l) = &spec.adaptation.lora {
        if l.targets.contains(&t_) {
            if l.dropout > 0.0 {
                out.push(t(format!("{p}.lora_dropout_mask"), "(N, in)", n * inp, d));
                out.push(t(format!("{p}.lora_dropout_out"), "(N, in)", n * inp, d));
            }
            let r = l.r as u64;
            out.push(t(format!("{p}.lora_a_out"), "(N, r)", n * r, d)); // x·Aᵀ
            out.push(t(format!("{p}.lora_b_out"), shape, n * o, d)); // ·Bᵀ
            out.push(t(format!("{p}.lora_scaled"), shape, n * o, d)); // · alpha/r
            out.push(t(format!("{p}.lora_sum"), shape, n * o, d)); // base + delta
        }
    }
}

/// Kept tensors of one decoder layer for `spec` (micro-batch × seq tokens).
pub fn layer(cfg: &ModelConfig, spec: &TrainSpec) -> Vec<SavedTensor> {
    let d = spec.dtype.size_in_bytes() as u64;
    let cast = spec.dtype != DType::F32 && spec.dtype != DType::F64;
    let f = if spec.dtype == DType::F64 { 8 } else { 4 }; // softmax dtype
    let n = (spec.batch * spec.seq) as u64;
    let h = cfg.hidden_size as u64;
    let (qd, _) = target_shape(cfg, Target::QProj);
    let (kvd, _) = target_shape(cfg, Target::KProj);
    let (q, kv, i) = (qd as u64, kvd as u64, cfg.intermediate_size as u64);
    let s2 = (spec.batch * cfg.num_attention_heads * spec.seq * spec.seq) as u64;
    let mut v = Vec::new();
    rms_norm(&mut v, "input_layernorm", n, h, d, cast);
    linear(&mut v, "q_proj", "(N, q)", n, q, h, d, spec, Target::QProj);
    v.push(t("q.contiguous", "(N, q)", n * q, d)); // (b, s, H, hd) -> (b, H, s, hd)
    linear(
        &mut v,
        "k_proj",
        "(N, kv)",
        n,
        kv,
        h,
        d,
        spec,
        Target::KProj,
    );
    v.push(t("k.contiguous", "(N, kv)", n * kv, d));
    linear(
        &mut v,
        "v_proj",
        "(N, kv)",
        n,
        kv,
        h,
        d,
        spec,
        Target::VProj,
    );
    v.push(t("v.contiguous", "(N, kv)", n * kv, d));
    // RoPE: neg of half, cat, ·cos, ·sin, sum.
    v.push(t("rope_q", "4.5·(N, q)", 9 * n * q / 2, d));
    v.push(t("rope_k", "4.5·(N, kv)", 9 * n * kv / 2, d));
    v.push(t("scores", "(S2)", s2, d)); // q·kᵀ
    v.push(t("scores_scaled", "(S2)", s2, d)); // · 1/√hd
    if cast {
        v.push(t("scores_f32", "(S2)", s2, f));
    }
    v.push(t("scores_masked", "(S2)", s2, f)); // + mask
    v.push(t("scores_shifted", "(S2)", s2, f)); // − row max
    v.push(t("scores_exp", "(S2)", s2, f));
    v.push(t("probs", "(S2)", s2, f)); // / row sum
    if cast {
        v.push(t("probs_cast", "(S2)", s2, d));
    }
    v.push(t(
        "softmax_stats",
        "(b, H, s, 1)",
        2 * s2 / spec.seq as u64,
        f,
    ));
    v.push(t("attn_out", "(N, q)", n * q, d)); // probs·v
    v.push(t("attn_out.contiguous", "(N, q)", n * q, d)); // (b, H, s, hd) -> (b, s, q)
    linear(&mut v, "o_proj", "(N, h)", n, h, q, d, spec, Target::OProj);
    v.push(t("residual_attn", "(N, h)", n * h, d));
    rms_norm(&mut v, "post_attention_layernorm", n, h, d, cast);
    linear(
        &mut v,
        "gate_proj",
        "(N, i)",
        n,
        i,
        h,
        d,
        spec,
        Target::GateProj,
    );
    v.push(t("silu", "(N, i)", n * i, d));
    linear(
        &mut v,
        "up_proj",
        "(N, i)",
        n,
        i,
        h,
        d,
        spec,
        Target::UpProj,
    );
    v.push(t("gate_x_up", "(N, i)", n * i, d));
    linear(
        &mut v,
        "down_proj",
        "(N, h)",
        n,
        h,
        i,
        d,
        spec,
        Target::DownProj,
    );
    v.push(t("residual_mlp", "(N, h)", n * h, d));
    v
}

/// Kept tensors of the embedding, final norm, LM head and loss.
pub fn head(cfg: &ModelConfig, spec: &TrainSpec) -> Vec<SavedTensor> {
    let d = spec.dtype.size_in_bytes() as u64;
    let cast = spec.dtype != DType::F32 && spec.dtype != DType::F64;
    let f = if spec.dtype == DType::F64 { 8 } else { 4 };
    let n = (spec.batch * spec.seq) as u64;
    let (h, vcb) = (cfg.hidden_size as u64, cfg.vocab_size as u64);
    let mut v = vec![t("embed_out", "(N, h)", n * h, d)];
    rms_norm(&mut v, "norm", n, h, d, cast);
    v.push(t("logits", "(N, V)", n * vcb, d));
    if cast {
        v.push(t("logits_f32", "(N, V)", n * vcb, f));
    }
    v.push(t("logits_shifted", "(N, V)", n * vcb, f)); // − row max
    v.push(t("logits_exp", "(N, V)", n * vcb, f));
    v.push(t("loss_stats", "(N, 1)", 4 * n, f));
    v
}
