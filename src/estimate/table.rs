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

use crate::config::ModelConfig;
use crate::spec::Attention;
use crate::spec::Target;
use crate::spec::{target_shape, TrainSpec};

/// Which estimator term a kept tensor counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An activation ([`crate::estimate::Term::Activations`]).
    Activation,
    /// `(batch, heads, seq, seq)` attention probabilities
    /// ([`crate::estimate::Term::AttentionScores`]).
    AttentionScores,
}

/// One kept tensor of the forward graph.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedTensor {
    /// What it is, e.g. `input_layernorm.x_sq`.
    pub name: String,
    /// Shape in symbols, e.g. `(N, h)`.
    pub shape: &'static str,
    /// The term it counts in.
    pub kind: Kind,
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

/// An activation named `name` of `elems` elements of `elem_bytes` bytes, shape `shape`.
pub(crate) fn t(
    name: impl Into<String>,
    shape: &'static str,
    elems: u64,
    elem_bytes: u64,
) -> SavedTensor {
    SavedTensor {
        name: name.into(),
        shape,
        kind: Kind::Activation,
        elems,
        elem_bytes,
    }
}

/// Bytes per element of a step's tensors: `w` the weights' and residual stream's dtype, `c`
/// the compute dtype of products and attention (autocast's, else `w`), `a` LoRA adapters'.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    w: u64,
    c: u64,
    a: u64,
}

impl Sizes {
    fn of(spec: &TrainSpec) -> Self {
        Sizes {
            w: spec.dtype.size_in_bytes() as u64,
            c: spec.compute_dtype().size_in_bytes() as u64,
            a: spec.adapter_dtype().size_in_bytes() as u64,
        }
    }

    /// Whether autocast casts between the stored and the compute dtype.
    fn casts(self, spec: &TrainSpec) -> bool {
        spec.compute_dtype() != spec.dtype
    }
}

/// A linear layer's kept tensors: its output (with a bias also the product before it, the
/// add's operand: `src/model/linear.rs`), plus LoRA's adapter path and dropout copies; under
/// autocast the cast copies of its input (where `cast_input`: an input in the residual
/// stream's dtype), of a trained weight, of the bias and of the adapters. A frozen weight's
/// cast is made inside its op and kept nowhere.
#[allow(clippy::too_many_arguments)]
fn linear(
    out: &mut Vec<SavedTensor>,
    cfg: &ModelConfig,
    p: &str,
    shape: &'static str,
    n: u64,
    o: u64,
    inp: u64,
    spec: &TrainSpec,
    t_: Target,
    cast_input: bool,
) {
    let z = Sizes::of(spec);
    let d = z.c;
    let bias = match t_ {
        Target::QProj | Target::KProj | Target::VProj => cfg.qkv_bias(),
        Target::OProj => cfg.o_bias(),
        _ => false,
    };
    if z.casts(spec) {
        if cast_input {
            out.push(t(format!("{p}.input_cast"), "(N, in)", n * inp, d));
        }
        if spec.adaptation.lora.is_none() {
            out.push(t(format!("{p}.weight_cast"), "(out, in)", o * inp, d));
        }
        if bias {
            out.push(t(format!("{p}.bias_cast"), "(out)", o, d));
        }
    }
    if bias {
        out.push(t(format!("{p}.product"), shape, n * o, d));
    }
    out.push(t(format!("{p}.out"), shape, n * o, d));
    if let Some(l) = &spec.adaptation.lora {
        if l.targets.contains(&t_) {
            let r = l.r as u64;
            if z.a != z.c {
                out.push(t(format!("{p}.lora_A_cast"), "(r, in)", r * inp, d));
                out.push(t(format!("{p}.lora_B_cast"), "(out, r)", o * r, d));
            }
            if l.dropout > 0.0 {
                // The fused dropout keeps no mask (`src/ops/dropout.rs`).
                out.push(t(format!("{p}.lora_dropout_out"), "(N, in)", n * inp, d));
            }
            out.push(t(format!("{p}.lora_a_out"), "(N, r)", n * r, d)); // x·Aᵀ
            out.push(t(format!("{p}.lora_b_out"), shape, n * o, d)); // ·Bᵀ
            out.push(t(format!("{p}.lora_scaled"), shape, n * o, d)); // · alpha/r
            out.push(t(format!("{p}.lora_sum"), shape, n * o, d)); // base + delta
        }
    }
}

/// Kept tensors of one decoder layer for `spec` (micro-batch × seq tokens). The fused ops
/// (`src/ops/`) keep their inputs, which are other ops' outputs listed here, and nothing else;
/// a residual add keeps both its inputs. Under autocast the norms and the residual stream are
/// in the weights' dtype, products and attention in the compute dtype, and the two output
/// projections' outputs are cast back for the residual adds.
pub fn layer(cfg: &ModelConfig, spec: &TrainSpec) -> Vec<SavedTensor> {
    let z = Sizes::of(spec);
    let (w, d) = (z.w, z.c);
    let n = spec.batch as u64 * spec.seq as u64;
    let h = cfg.hidden_size as u64;
    let (qd, _) = target_shape(cfg, Target::QProj);
    let (kvd, _) = target_shape(cfg, Target::KProj);
    let (q, kv, i) = (qd as u64, kvd as u64, cfg.intermediate_size as u64);
    let casts = z.casts(spec);
    let mut v = Vec::new();
    let lin = |v: &mut Vec<SavedTensor>, p: &str, shape, o, inp, t_, cast_input| {
        linear(v, cfg, p, shape, n, o, inp, spec, t_, cast_input)
    };
    v.push(t("input_layernorm.out", "(N, h)", n * h, w)); // fused; keeps its input x
    lin(&mut v, "q_proj", "(N, q)", q, h, Target::QProj, true);
    lin(&mut v, "k_proj", "(N, kv)", kv, h, Target::KProj, true);
    lin(&mut v, "v_proj", "(N, kv)", kv, h, Target::VProj, true); // kept by attention
    v.push(t("rope_q", "(N, q)", n * q, d)); // fused; kept by attention
    v.push(t("rope_k", "(N, kv)", n * kv, d));
    if spec.attention == Attention::Eager {
        let s2 =
            spec.batch as u64 * cfg.num_attention_heads as u64 * spec.seq as u64 * spec.seq as u64;
        // --attention eager keeps them
        v.push(SavedTensor {
            kind: Kind::AttentionScores,
            ..t("attention.probs", "(S2)", s2, d)
        });
    }
    v.push(t("attention.out", "(N, q)", n * q, d)); // fused, (b, s, heads·hd)
    lin(&mut v, "o_proj", "(N, h)", h, q, Target::OProj, false);
    if casts {
        v.push(t("o_proj.out_cast", "(N, h)", n * h, w));
    }
    v.push(t("residual_attn", "(N, h)", n * h, w));
    v.push(t("post_attention_layernorm.out", "(N, h)", n * h, w));
    match cfg.moe() {
        None => {
            lin(&mut v, "gate_proj", "(N, i)", i, h, Target::GateProj, true);
            lin(&mut v, "up_proj", "(N, i)", i, h, Target::UpProj, true);
            v.push(t("swiglu.out", "(N, i)", n * i, d)); // fused; keeps gate and up
            lin(&mut v, "down_proj", "(N, h)", h, i, Target::DownProj, false);
        }
        Some(m) => moe(&mut v, cfg, spec, m),
    }
    if casts && cfg.moe().is_none() {
        v.push(t("down_proj.out_cast", "(N, h)", n * h, w));
    }
    v.push(t("residual_mlp", "(N, h)", n * h, w));
    v
}

/// Kept tensors of a mixture-of-experts block (`src/model/moe.rs`), `S = N·k` (token, expert)
/// pairs, `E` experts, the experts in the weights' dtype `w` (outside autocast), the router in
/// the compute dtype `c`, routing and the weighted sum in `f` (f32; f64 for f64 models): under
/// autocast the router input's copy (and full fine-tuning's copy of the router's weight); the
/// router's logits `(N, E)`, their `f` copy (from a 16-bit compute dtype) and the composed
/// softmax's tensors (the shifted logits, their exponentials and the probabilities `(N, E)`,
/// the row max and sum `(N, 1)`); the chosen experts `(N, k)` and the sorted pairs' token and
/// weight indices `(S,)` (u32); the top-k probabilities, their sum and the renormalised
/// weights, the weights sorted `(S, 1)`; the gathered tokens `(S, h)`; per expert its rows of
/// the gate, up, SwiGLU and down outputs (`3·S·i + S·h` together); the concatenated outputs
/// `(S, h)` (and their `f` copy), weighted `(S, h)`; the zero init and the `index_add` sum
/// `(N, h)` in `f`, and its cast to the residual stream's dtype where that differs.
fn moe(v: &mut Vec<SavedTensor>, cfg: &ModelConfig, spec: &TrainSpec, m: crate::config::Moe) {
    let z = Sizes::of(spec);
    let (w, c) = (z.w, z.c);
    let f = crate::ops::compute_dtype(spec.compute_dtype()).size_in_bytes() as u64;
    let n = spec.batch as u64 * spec.seq as u64;
    let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    let (e, k) = (m.experts as u64, m.top_k as u64);
    let s = n * k;
    if z.casts(spec) {
        v.push(t("mlp.gate.input_cast", "(N, h)", n * h, c));
        if spec.adaptation.lora.is_none() {
            v.push(t("mlp.gate.weight_cast", "(E, h)", e * h, c));
        }
    }
    v.push(t("mlp.gate.out", "(N, E)", n * e, c));
    if f != c {
        v.push(t("mlp.gate.logits_f32", "(N, E)", n * e, f));
    }
    v.push(t("mlp.router.max", "(N, 1)", n, f));
    v.push(t("mlp.router.shifted", "(N, E)", n * e, f));
    v.push(t("mlp.router.exp", "(N, E)", n * e, f));
    v.push(t("mlp.router.sum", "(N, 1)", n, f));
    v.push(t("mlp.router.probs", "(N, E)", n * e, f));
    v.push(t("mlp.router.chosen", "(N, k) u32", n * k, 4));
    v.push(t("mlp.router.top", "(N, k)", n * k, f));
    v.push(t("mlp.router.top_sum", "(N, 1)", n, f));
    v.push(t("mlp.router.weights", "(N, k)", n * k, f));
    let adapted = spec
        .adaptation
        .lora
        .as_ref()
        .filter(|l| l.experts_adapted(cfg));
    if let Some(l) = adapted {
        // The router's adapter (a LoRA `Linear` in the compute dtype, no dropout).
        let r = l.r as u64;
        if z.a != c {
            v.push(t("mlp.gate.lora_A_cast", "(r, h)", r * h, c));
            v.push(t("mlp.gate.lora_B_cast", "(E, r)", e * r, c));
        }
        v.push(t("mlp.gate.lora_a_out", "(N, r)", n * r, c));
        v.push(t(
            "mlp.gate.lora_b_out_scaled_sum",
            "3 × (N, E)",
            3 * n * e,
            c,
        ));
    }
    v.push(t("mlp.experts.pairs", "2 × (S,) u32", 2 * s, 4));
    v.push(t("mlp.experts.sorted_weights", "(S, 1)", s, f));
    v.push(t("mlp.experts.gathered", "(S, h)", s * h, w));
    v.push(t("mlp.experts.gate_up_swiglu", "3 × (S, i)", 3 * s * i, w));
    v.push(t("mlp.experts.down", "(S, h)", s * h, w));
    if let Some(l) = adapted {
        // Each expert's share of PEFT's `gate_up_proj` and `down_proj` adapters, in the
        // experts' dtype (`src/model/moe.rs`): the shared `x·A_eᵀ` `(c, 2r)`, the gate's and the
        // up projection's `·B_eᵀ`, scaled and summed `(c, i)` each; `down_proj`'s `(c, r)` and
        // its three `(c, h)`; summed over the experts' rows, `c` makes `S`. The adapters' cast
        // copies where they are stored in another dtype.
        let r = l.r as u64;
        if z.a != w {
            v.push(t(
                "mlp.experts.lora_casts",
                "E × (2r·h + 2·i·2r + r·i + h·r)",
                e * (2 * r * h + 4 * r * i + r * i + h * r),
                w,
            ));
        }
        v.push(t("mlp.experts.gate_up_lora_a_out", "(S, 2r)", s * 2 * r, w));
        v.push(t(
            "mlp.experts.gate_up_lora_b_out_scaled_sum",
            "6 × (S, i)",
            6 * s * i,
            w,
        ));
        v.push(t("mlp.experts.down_lora_a_out", "(S, r)", s * r, w));
        v.push(t(
            "mlp.experts.down_lora_b_out_scaled_sum",
            "3 × (S, h)",
            3 * s * h,
            w,
        ));
    }
    v.push(t("mlp.experts.cat", "(S, h)", s * h, w));
    if f != w {
        v.push(t("mlp.experts.cat_f32", "(S, h)", s * h, f));
    }
    v.push(t("mlp.experts.weighted", "(S, h)", s * h, f));
    v.push(t("mlp.experts.zero", "(N, h)", n * h, f));
    v.push(t("mlp.experts.sum", "(N, h)", n * h, f));
    if f != w {
        v.push(t("mlp.out_cast", "(N, h)", n * h, w));
    }
}

/// Kept tensors of the embedding, final norm and the fused LM head with its loss (which keeps
/// the norm's output and the weight; the logits exist only chunk by chunk).
pub fn head(cfg: &ModelConfig, spec: &TrainSpec) -> Vec<SavedTensor> {
    let z = Sizes::of(spec);
    let n = spec.batch as u64 * spec.seq as u64;
    let h = cfg.hidden_size as u64;
    let mut v = vec![
        t("embed_out", "(N, h)", n * h, z.w),
        t("norm.out", "(N, h)", n * h, z.w),
    ];
    if let Some(l) = spec.adaptation.lora.as_ref().filter(|l| l.embed_tokens) {
        // PEFT's LoRA `Embedding` (`Decoder::embed`): the gathered columns of `A`, their product
        // with `Bᵀ` in the compute dtype and scaled, cast back, and the frozen lookup the add
        // keeps beside its sum (`embed_out`).
        let r = l.r as u64;
        v.push(t(
            "embed_tokens.lora_embedding_A_rows",
            "(r, N)",
            r * n,
            z.a,
        ));
        if z.a != z.c {
            v.push(t("embed_tokens.lora_A_rows_cast", "(N, r)", n * r, z.c));
            v.push(t("embed_tokens.lora_B_cast", "(h, r)", h * r, z.c));
        }
        v.push(t("embed_tokens.lora_b_out", "(N, h)", n * h, z.c));
        v.push(t("embed_tokens.lora_scaled", "(N, h)", n * h, z.c));
        if z.casts(spec) {
            v.push(t("embed_tokens.lora_cast", "(N, h)", n * h, z.w));
        }
        v.push(t("embed_tokens.base", "(N, h)", n * h, z.w));
    }
    v.extend(head_side(cfg, spec));
    v
}

/// The part of [`head`] that the fused head's graph keeps beyond the normed states: autocast's
/// casts of its operands and the `lm_head` adapter's path. Under checkpointing it is alive
/// from the head's forward to the end of the head's backward only (the `candle` profile counts
/// it there, [`super::Terms::head_static`]); the normed states themselves are left to the
/// calibration, as before these existed.
pub fn head_side(cfg: &ModelConfig, spec: &TrainSpec) -> Vec<SavedTensor> {
    let z = Sizes::of(spec);
    let n = spec.batch as u64 * spec.seq as u64;
    let (h, vocab) = (cfg.hidden_size as u64, cfg.vocab_size as u64);
    let mut v = Vec::new();
    if z.casts(spec) {
        // Autocast: the head's operands cast to the compute dtype, kept by the fused head.
        v.push(t("norm.out_cast", "(N, h)", n * h, z.c));
        v.push(t("lm_head.weight_cast", "(V, h)", vocab * h, z.c));
    }
    if let Some(l) = spec.adaptation.lora.as_ref().filter(|l| l.lm_head) {
        // LoRA on the head (`Decoder::head_loss`): `u = (alpha/r)·dropout(x)·Aᵀ` joins the
        // normed states as `[x | u]`, which the fused head keeps; `B` meets `u` chunk by chunk.
        let r = l.r as u64;
        if z.a != z.c {
            v.push(t("lm_head.lora_A_cast", "(r, h)", r * h, z.c));
            v.push(t("lm_head.lora_B_cast", "(V, r)", vocab * r, z.c));
        }
        if l.dropout > 0.0 {
            v.push(t("lm_head.lora_dropout_out", "(N, h)", n * h, z.c));
        }
        v.push(t("lm_head.lora_a_out", "(N, r)", n * r, z.c));
        v.push(t("lm_head.lora_scaled", "(N, r)", n * r, z.c));
        v.push(t(
            "lm_head.input_with_adapter",
            "(N, h + r)",
            n * (h + r),
            z.c,
        ));
    }
    v
}

/// The unit of the fused LM head's transient (bytes): half of what its backward holds per chunk
/// of `c = min(N, CE_CHUNK_TOKENS)` rows, the chunk's logits in the compute dtype and their
/// gradient `G` (`src/ops/loss.rs`): `c·V·(f + g)/2`, with `f` the compute dtype's size and
/// `g` = `f` except in f16, whose `G` stays f16 (`g` = 2). In bf16, `G` is bf16 too, but the
/// widened products count from this same two-f32-chunk base ([`super::bf16_matmul_widening`]),
/// so `g` = `f` there. (Measured: f16 LoRA/QLoRA rows of `results/cpu/smollm2-135m-optimizers.csv`
/// were 2.3–3.6 % over with `g` = `f`.) The fitted coefficient is about 2: forward and backward
/// each hold about two units.
pub fn logits_chunk(cfg: &ModelConfig, spec: &TrainSpec) -> u64 {
    let f = crate::ops::compute_dtype(spec.compute_dtype()).size_in_bytes() as u64;
    let g = if spec.compute_dtype() == candle_core::DType::F16 {
        2
    } else {
        f
    };
    let rows = (spec.batch * spec.seq).min(crate::ops::CE_CHUNK_TOKENS) as u64;
    rows * cfg.vocab_size as u64 * (f + g) / 2
}

/// Bytes of one `(batch, heads, seq, seq)` tensor in the compute dtype: the fused attention
/// forms its scores and probabilities one layer at a time (forward, and again in backward).
pub fn attention_scores(cfg: &ModelConfig, spec: &TrainSpec) -> u64 {
    let f = crate::ops::compute_dtype(spec.compute_dtype()).size_in_bytes() as u64;
    spec.batch as u64 * cfg.num_attention_heads as u64 * spec.seq as u64 * spec.seq as u64 * f
}
