//! What PyTorch + transformers + PEFT keep for the same decoder (`torch-sdpa`, `torch-eager`),
//! tensor by tensor: the tensors autograd saves for backward in transformers 5's
//! `modeling_llama.py` / `modeling_mistral.py` (and `integrations/sdpa_attention.py`), PEFT's
//! `tuners/lora/layer.py` and torch's autograd formulas (`tools/autograd/derivatives.yaml`),
//! each storage once. They were read off real runs: `scripts/torch_reference.py` records the
//! bytes autograd saves (`saved_activation_bytes`, one storage counted once) and the exact peaks
//! on the CPU, and `tests/torch_table.rs` holds [`saved_bytes`] to that column.
//!
//! Autograd saves a tensor only where a gradient needs it: a frozen linear layer (LoRA's base)
//! keeps no input, `x·cos` keeps only `cos`, a layer whose input needs no gradient (LoRA's first
//! layer, unless checkpointing calls `enable_input_require_grads`) keeps nothing before its
//! first adapter. Symbols: `N = batch·seq`, `h` hidden, `q = heads·head_dim`,
//! `kv = kv_heads·head_dim`, `i` intermediate, `V` vocabulary, `d` the weights' bytes, `a` the
//! compute dtype's (autocast's where on), `r` the residual stream's (fp32 under `amp-*`, else
//! `d`).
//!
//! The step's peak is the largest of (step 2, gradients set to `None` by `zero_grad`):
//! * the head's backward: weights, optimizer states, every saved tensor, and three `(N, V)`
//!   fp32 buffers: the saved log-softmax output, the gradient out of `nll_loss` and the one out
//!   of `log_softmax` (transformers' `ForCausalLMLoss` upcasts the logits);
//! * a recomputed layer's backward under checkpointing, the gradients built up;
//! * the end of backward: all gradients, and for a tied, trained embedding its two gradient
//!   contributions being summed (two more `(V, h)` tensors);
//! * the optimizer step ([`optimizer`]);
//! * loading: the weights, and for a tied head the `(V, h)` head transformers builds before
//!   tying it (a model built from its config, as the reference script does).

use candle_core::DType;

use super::table::{t, Kind, SavedTensor};
use super::{weight_bytes, Term, Terms};
use crate::config::ModelConfig;
use crate::spec::{target_shape, Attention, Checkpointing, Loss, Optimizer, Target, TrainSpec};

/// The dtypes of a step: weights, compute (autocast's or the weights'), residual stream.
#[derive(Debug, Clone, Copy)]
pub struct Dtypes {
    /// Bytes per weight.
    pub d: u64,
    /// Bytes per element of matrix products' inputs and outputs.
    pub a: u64,
    /// Bytes per element of the residual stream and RMSNorm outputs.
    pub r: u64,
    /// Whether autocast is on.
    pub amp: bool,
}

/// The dtypes of `spec` (its precision recipe where named).
pub fn dtypes(spec: &TrainSpec) -> Dtypes {
    let d = spec.dtype.size_in_bytes() as u64;
    match spec.precision.and_then(|p| p.autocast()) {
        Some(c) => Dtypes {
            d,
            a: c.size_in_bytes() as u64,
            r: d.max(4),
            amp: true,
        },
        None => Dtypes {
            d,
            a: d,
            r: d,
            amp: false,
        },
    }
}

/// Whether `eager` attention runs for `spec` under `profile`'s default.
fn eager(spec: &TrainSpec, profile_eager: bool) -> bool {
    match spec.attention {
        Attention::Eager => true,
        Attention::FlashAttention2 => false,
        Attention::Sdpa => profile_eager,
    }
}

/// Whether transformers materialises an attention mask: a sliding window that the sequence
/// reaches (`masking_utils`: the causal mask is skipped only while `kv_length < window`), for
/// SDPA and eager; never for flash-attention-2.
fn has_mask(cfg: &ModelConfig, spec: &TrainSpec) -> bool {
    spec.attention != Attention::FlashAttention2
        && cfg.sliding_window.is_some_and(|w| spec.seq >= w)
}

/// The tensors one decoder layer saves for backward (all tokens of the micro-batch).
/// `input_grad`: whether the layer's input needs a gradient (false only for LoRA's first layer
/// without checkpointing).
pub fn layer(
    cfg: &ModelConfig,
    spec: &TrainSpec,
    profile_eager: bool,
    input_grad: bool,
) -> Vec<SavedTensor> {
    let Dtypes { a, r, amp, .. } = dtypes(spec);
    let n = spec.batch as u64 * spec.seq as u64;
    let (b, s) = (spec.batch as u64, spec.seq as u64);
    let h = cfg.hidden_size as u64;
    let i = cfg.intermediate_size as u64;
    let heads = cfg.num_attention_heads as u64;
    let q = target_shape(cfg, Target::QProj).0 as u64;
    let kv = target_shape(cfg, Target::KProj).0 as u64;
    let full = spec.adaptation.lora.is_none();
    let lora = spec.adaptation.lora.as_ref();
    let targeted = |x: Target| lora.is_some_and(|l| l.layer_targets(cfg).contains(&x));
    let trains = |x: Target| full || targeted(x);
    let dropout = lora.is_some_and(|l| l.dropout > 0.0);
    let rank = lora.map_or(0, |l| l.r as u64);
    let eager = eager(spec, profile_eager);
    let mask = has_mask(cfg, spec);
    let attn_grad = input_grad
        || full
        || [Target::QProj, Target::KProj, Target::VProj]
            .iter()
            .any(|&x| targeted(x));
    let post_grad = attn_grad || targeted(Target::OProj);
    let quantized = spec.adaptation.quant != crate::spec::Quant::None;
    let mut v = Vec::new();
    let norm = |v: &mut Vec<SavedTensor>, name: &str, grad: bool| {
        if grad {
            // `hidden_states.to(float32)` (the input itself in fp32) saved by `pow`, and
            // `rsqrt(variance + eps)` by the product.
            v.push(t(format!("{name}.x_fp32"), "(N, h)", n * h, 4));
            v.push(t(format!("{name}.rsqrt"), "(N, 1)", n, 4));
        }
        if full {
            // `weight · normed` keeps `normed` for the weight's gradient.
            v.push(t(format!("{name}.normed"), "(N, h)", n * h, r));
        }
    };
    // A group of linears reading the same input `x` of width `width`: which copies are kept.
    let linears = |v: &mut Vec<SavedTensor>, group: &[Target], width: u64, grad: bool| {
        let mut shared = false;
        for &x in group {
            let (out, inp) = target_shape(cfg, x);
            let (out, inp) = (out as u64, inp as u64);
            if targeted(x) {
                if dropout {
                    // PEFT's dropout: its output (read by lora_A) and its mask where the input
                    // needs a gradient.
                    v.push(t(
                        format!("{}.lora_dropout", x.name()),
                        "(N, in)",
                        n * inp,
                        a,
                    ));
                    if grad {
                        v.push(t(
                            format!("{}.dropout_mask", x.name()),
                            "(N, in)",
                            n * inp,
                            a,
                        ));
                    }
                } else if amp {
                    v.push(t(
                        format!("{}.lora_A.input_cast", x.name()),
                        "(N, in)",
                        n * inp,
                        a,
                    ));
                } else {
                    shared = true;
                }
                v.push(t(
                    format!("{}.lora_B.input", x.name()),
                    "(N, r)",
                    n * rank,
                    a,
                ));
                if amp {
                    // `B`'s copy is kept for its input's gradient; `A`'s only where the layer's
                    // input needs one.
                    let (adapters, shape) = if grad {
                        (rank * (inp + out), "(r, in + out)")
                    } else {
                        (rank * out, "(out, r)")
                    };
                    v.push(t(
                        format!("{}.lora_AB.weight_cast", x.name()),
                        shape,
                        adapters,
                        a,
                    ));
                }
            } else if full {
                // o_proj and down_proj read tensors already in the compute dtype (attention's
                // output, the MLP's product): autocast makes no copy of them.
                if amp && !matches!(x, Target::OProj | Target::DownProj) {
                    v.push(t(format!("{}.input_cast", x.name()), "(N, in)", n * inp, a));
                } else {
                    shared = true;
                }
            }
            if amp && (full || grad) && !quantized {
                // autocast's 16-bit copy of the weight, kept by the product for the input's
                // gradient (and, trained, cached for the forward); bitsandbytes' 4-bit
                // weights are dequantized inside its own product instead.
                v.push(t(
                    format!("{}.weight_cast", x.name()),
                    "(out, in)",
                    out * inp,
                    a,
                ));
            }
        }
        if shared {
            v.push(t("input", "(N, in)", n * width, r));
        }
    };
    norm(&mut v, "input_layernorm", input_grad);
    linears(
        &mut v,
        &[Target::QProj, Target::KProj, Target::VProj],
        h,
        input_grad,
    );
    if attn_grad {
        let kv_kept = if mask && heads != cfg.kv_heads() as u64 {
            q
        } else {
            kv
        };
        // Which of q, k, v need a gradient (a LoRA first layer: only the adapted ones).
        let needs = |x: Target| input_grad || full || targeted(x);
        let (gq, gk, gv) = (
            needs(Target::QProj),
            needs(Target::KProj),
            needs(Target::VProj),
        );
        if eager {
            // `q·kᵀ` keeps each operand for the other's gradient; `probs·v` keeps `v` for the
            // probabilities' gradient and the probabilities for `v`'s; softmax keeps its fp32
            // output where its input needs a gradient.
            if gk {
                v.push(t("self_attn.q", "(N, q)", n * q, a));
            }
            if gq {
                v.push(t("self_attn.k", "(N, q) repeated", n * q, a));
            }
            if gq || gk {
                v.push(t("self_attn.v", "(N, q) repeated", n * q, a));
            }
            let scores = b * heads * s * s;
            let mut kept = 0;
            // In fp32 the probabilities are the softmax output itself.
            if gq || gk || (a == 4 && gv) {
                v.push(t("self_attn.probs_fp32", "(b, heads, s, s)", scores, 4));
                kept += 1;
            }
            if a != 4 && gv {
                v.push(t("self_attn.probs", "(b, heads, s, s)", scores, a));
                kept += 1;
            }
            v.iter_mut()
                .rev()
                .take(kept)
                .for_each(|x| x.kind = Kind::AttentionScores);
        } else {
            v.push(t("self_attn.q", "(N, q)", n * q, a));
            v.push(t("self_attn.k", "(N, kv or q repeated)", n * kv_kept, a));
            v.push(t("self_attn.v", "(N, kv or q repeated)", n * kv_kept, a));
            v.push(t("self_attn.out", "(N, q)", n * q, a));
            v.push(t("self_attn.logsumexp", "(b, heads, s)", b * heads * s, 4));
            if mask {
                v.push(t("self_attn.mask", "(b, 1, s, s)", b * s * s, a));
            }
        }
    }
    // o_proj reads the attention output: SDPA's is a view of its saved output; eager's is a
    // contiguous copy.
    if eager && attn_grad && trains(Target::OProj) && !dropout {
        v.push(t("o_proj.input", "(N, q)", n * q, a));
    }
    linears(&mut v, &[Target::OProj], q, attn_grad);
    if v.last().is_some_and(|x| x.name == "input") {
        // SDPA's output is already kept.
        v.pop();
    }
    norm(&mut v, "post_attention_layernorm", post_grad);
    match cfg.moe() {
        Some(m) => moe_block(&mut v, cfg, spec, m, post_grad),
        None => {
            linears(&mut v, &[Target::GateProj, Target::UpProj], h, post_grad);
            // SiLU keeps `gate`; the product keeps `silu(gate)` and `up`. bitsandbytes' 4-bit product
            // runs outside autocast and returns its input's dtype (the fp32 residual stream's).
            let m = if quantized { r } else { a };
            v.push(t("mlp.gate", "(N, i)", n * i, m));
            v.push(t("mlp.silu", "(N, i)", n * i, m));
            v.push(t("mlp.up", "(N, i)", n * i, m));
            linears(&mut v, &[Target::DownProj], i, true);
            if let Some(x) = v.iter_mut().rev().find(|x| x.name == "input") {
                // down_proj's input is the product, not yet kept by anything.
                x.name = "down_proj.input".into();
                x.elem_bytes = a;
            }
        }
    }
    for x in &mut v {
        if x.name == "input" {
            x.name = "linear.input".into();
        }
    }
    v
}

/// What a Mixtral sparse mixture-of-experts block saves for backward (transformers 5.24
/// `models/mixtral/modeling_mixtral.py` `MixtralTopKRouter` and `integrations/moe.py`
/// `grouped_mm_experts_forward`, its default experts implementation; PEFT 0.21.2's
/// `ParamWrapper` for the expert tensors under `all-linear`), `S = N·k` token–expert pairs, `E`
/// experts, `e` the experts' dtype (the weights': `grouped_mm` is outside autocast and casts
/// its input to the weight's dtype; fp32 under QLoRA, where `prepare_model_for_kbit_training`
/// casts every parameter bitsandbytes left unquantized to fp32). Read off
/// `saved_tensors_hooks` on `mixtral-mini` (`results/torch-cpu/mixtral-mini.csv`):
/// * the router: its input where its weight trains, the fp32 softmax `(N, E)`, the top-k
///   indices `(N, k)` int64, their sum `(N, 1)` and the normalised weights `(N, k)` (fp32);
/// * the sort: the gather indices `perm // k` and `perm`, the inverse permutation (each `(S,)`
///   int64) and the `(E,)` int32 group offsets;
/// * the experts: the gathered input `(S, h)` and the SwiGLU product `(S, i)` where the expert
///   weights train, the `gate_up` output `(S, 2i)` (SiLU and the product keep views of it),
///   `silu(gate)` `(S, i)`, the routing weights `(S, 1)` fp32 and the `down` output `(S, h)`
///   (kept for the routing weights' gradient);
/// * under autocast the router's 16-bit weight copy `(E, h)` (and its LoRA factors' copies);
/// * under `all-linear`: the adapted weights `W + s·B·A` PEFT forms on every forward, a whole
///   expert stack each (`(E, 2i, h)` and `(E, h, i)`, kept by `grouped_mm` for its input's
///   gradient), the router's `(E, h)`, and on the CPU with 16-bit adapters the router factors'
///   fp32 copies (PEFT's `Linear.get_delta_weight`).
fn moe_block(
    v: &mut Vec<SavedTensor>,
    cfg: &ModelConfig,
    spec: &TrainSpec,
    m: crate::config::Moe,
    grad: bool,
) {
    if !grad {
        return;
    }
    let Dtypes { a, r, amp, .. } = dtypes(spec);
    let n = spec.batch as u64 * spec.seq as u64;
    let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    let (experts, k) = (m.experts as u64, m.top_k as u64);
    let s = n * k;
    let lora = spec.adaptation.lora.as_ref();
    let adapted = lora.is_some_and(|l| l.experts_adapted(cfg));
    let trains = lora.is_none() || adapted;
    let e = expert_bytes(spec);
    if trains {
        // The router's product keeps its input for the weight's gradient (autocast's copy).
        let (name, bytes) = if amp {
            ("mlp.gate.input_cast", a)
        } else {
            ("linear.input", r)
        };
        v.push(t(name, "(N, h)", n * h, bytes));
    }
    let router_factors = lora.map_or(0, |l| l.r as u64 * (h + experts));
    if amp {
        // autocast's copy of the router's weight (of `W + s·B·A` under `all-linear`), kept for
        // the input's gradient, and of the router's LoRA factors.
        v.push(t("mlp.gate.weight_cast", "(E, h)", experts * h, a));
        if adapted {
            v.push(t(
                "mlp.gate.lora_AB.weight_cast",
                "(r, h + E)",
                router_factors,
                a,
            ));
        }
    } else if adapted {
        v.push(t("mlp.gate.weight_lora", "(E, h)", experts * h, e));
        if spec.torch_cpu && spec.adapter_dtype().size_in_bytes() < 4 {
            // PEFT's `Linear.get_delta_weight` computes a 16-bit `B·A` in fp32 on the CPU.
            v.push(t("mlp.gate.lora_AB.fp32", "(r, h + E)", router_factors, 4));
        }
    }
    v.push(t("mlp.gate.probs", "(N, E) fp32", n * experts, 4));
    v.push(t("mlp.gate.top_k_index", "(N, k) int64", n * k, 8));
    v.push(t("mlp.gate.top_k_sum", "(N, 1) fp32", n, 4));
    v.push(t("mlp.gate.top_k_weights", "(N, k) fp32", n * k, 4));
    v.push(t("mlp.experts.perm", "2 × (S,) int64", 2 * s, 8));
    v.push(t("mlp.experts.offsets", "(E,) int32", experts, 4));
    if trains {
        v.push(t("mlp.experts.gathered", "(S, h)", s * h, e));
    }
    if adapted {
        v.push(t(
            "mlp.experts.gate_up_proj_lora",
            "(E, 2i, h)",
            experts * 2 * i * h,
            e,
        ));
        v.push(t(
            "mlp.experts.down_proj_lora",
            "(E, h, i)",
            experts * h * i,
            e,
        ));
    }
    v.push(t("mlp.experts.gate_up", "(S, 2i)", s * 2 * i, e));
    v.push(t("mlp.experts.silu", "(S, i)", s * i, e));
    if trains {
        v.push(t("mlp.experts.down_proj.input", "(S, i)", s * i, e));
    }
    v.push(t("mlp.experts.routing_weights", "(S, 1) fp32", s, 4));
    v.push(t("mlp.experts.down", "(S, h)", s * h, e));
    v.push(t("mlp.experts.inv_perm", "(S,) int64", s, 8));
}

/// The transient of a mixture-of-experts block's backward under PEFT's `all-linear` (bytes):
/// `grouped_mm`'s backward builds the gradient of the adapted `gate_up` stack `W + s·B·A`
/// (`(E, 2i, h)` in the experts' dtype) after the `down` stack's `(E, h, i)` node has run and
/// freed its saved copy, so a layer's backward holds `E·h·i` elements beyond its saved
/// tensors (measured: `results/torch-cpu/mixtral-mini.csv`, the checkpointed rows whose peak
/// is a recomputed layer's backward). 0 without adapted experts (full fine-tuning's expert
/// gradients are parameter gradients, counted as such).
pub fn moe_backward(cfg: &ModelConfig, spec: &TrainSpec) -> u64 {
    let adapted = spec
        .adaptation
        .lora
        .as_ref()
        .is_some_and(|l| l.experts_adapted(cfg));
    match cfg.moe() {
        Some(m) if adapted => {
            (m.experts as u64 * cfg.hidden_size as u64 * cfg.intermediate_size as u64)
                * expert_bytes(spec)
        }
        _ => 0,
    }
}

/// Bytes per element of a mixture of experts' tensors: the weights' (`grouped_mm` runs outside
/// autocast in the weights' dtype), fp32 under QLoRA (`prepare_model_for_kbit_training` casts
/// the parameters bitsandbytes left unquantized, the experts among them, to fp32).
fn expert_bytes(spec: &TrainSpec) -> u64 {
    if spec.adaptation.quant == crate::spec::Quant::None {
        dtypes(spec).d
    } else {
        4
    }
}

/// The tensors the head and the loss save: the final norm, `lm_head`'s input (trained), the
/// embedding's token ids (trained), RoPE's `cos` and `sin` (shared by all layers), the labels and
/// the fp32 log-softmax output. With Liger's fused linear cross-entropy (`--loss
/// fused-linear-ce`) no logits, labels or head input are saved: the function computes the
/// head input's gradient `(N, h)` (and a trained head's `(V, h)` weight gradient) in forward and
/// saves those (liger-kernel 0.8.5 `ops/fused_linear_cross_entropy.py`,
/// `fused_linear_cross_entropy_forward`: `grad_input = zeros_like(_input)`, `grad_weight =
/// zeros_like(weight)`).
pub fn head(cfg: &ModelConfig, spec: &TrainSpec) -> Vec<SavedTensor> {
    let Dtypes { d, a, r, amp } = dtypes(spec);
    let n = spec.batch as u64 * spec.seq as u64;
    let (h, vocab) = (cfg.hidden_size as u64, cfg.vocab_size as u64);
    let full = spec.adaptation.lora.is_none();
    let liger = spec.loss == Loss::FusedLinearCe;
    let idle = layers_idle(spec);
    let mut v = if idle {
        vec![]
    } else {
        vec![
            t("norm.x_fp32", "(N, h)", n * h, 4),
            t("norm.rsqrt", "(N, 1)", n, 4),
        ]
    };
    if !liger {
        v.push(t("loss.labels", "(N,) int64", n, 8));
        v.push(t("loss.log_softmax", "(N, V) fp32", n * vocab, 4));
    }
    if spec.checkpointing == Checkpointing::None && !idle {
        // RoPE's `cos` and `sin`, computed once per forward and kept by every layer's products
        // (recomputed inside each checkpointed layer instead).
        let cos_sin = 2 * (spec.seq as u64 * cfg.head_dim() as u64);
        v.push(t("rotary.cos_sin", "2 × (s, head_dim)", cos_sin, r));
    }
    if full {
        v.push(t("norm.normed", "(N, h)", n * h, r));
    }
    // A trained head keeps its input for the weight's gradient, a trained embedding its ids
    // (full fine-tuning, or PEFT's `modules_to_save` copies).
    if spec.head_trained() && !liger {
        v.push(t("lm_head.input", "(N, h)", n * h, a));
    }
    if spec.embed_trained() {
        v.push(t("embed_tokens.ids", "(N,) int64", n, 8));
    }
    if amp {
        // autocast's copy of the head weight, kept for the input's gradient (Liger: cached by
        // autocast for the trained head, made per chunk for a frozen one).
        v.push(t("lm_head.weight_cast", "(V, h)", vocab * h, a));
    }
    if let Some(l) = spec.adaptation.lora.as_ref() {
        let rank = l.r as u64;
        if l.lm_head {
            // PEFT's LoRA Linear on the head: `lora_A` keeps its input, `lora_B` its (N, r)
            // input; the frozen base keeps nothing.
            v.push(t("lm_head.lora_A.input", "(N, h)", n * h, a));
            v.push(t("lm_head.lora_B.input", "(N, r)", n * rank, a));
            if l.dropout > 0.0 {
                v.push(t("lm_head.lora_dropout.mask", "(N, h) bool", n * h, 1));
            }
        }
        if l.embed_tokens {
            // PEFT's LoRA Embedding: `F.embedding(ids, A.T)` keeps the ids, `@ B.T` its (N, r)
            // input.
            v.push(t("embed_tokens.lora.ids", "(N,) int64", n, 8));
            v.push(t("embed_tokens.lora_B.input", "(N, r)", n * rank, a));
        }
    }
    if liger {
        v.push(t("lce.grad_input", "(N, h)", n * h, r));
        if spec.head_trained() {
            v.push(t("lce.grad_weight", "(V, h)", vocab * h, d));
        }
    }
    v
}

/// Tokens per chunk of Liger's fused linear cross-entropy: `min(next_power_of_2(⌈N / ⌈V /
/// h⌉⌉), N)` (`chunk_mem_const` 1, its default), so a chunk's logits are about the size of the
/// `(N, h)` input.
pub fn liger_chunk_tokens(cfg: &ModelConfig, spec: &TrainSpec) -> u64 {
    let n = spec.batch as u64 * spec.seq as u64;
    let inc = (cfg.vocab_size as u64)
        .div_ceil(cfg.hidden_size as u64)
        .max(1);
    n.div_ceil(inc).next_power_of_two().min(n)
}

/// Bytes autograd saves in a forward of `spec` (what `scripts/torch_reference.py` records as
/// `saved_activation_bytes`): every layer's table, or under checkpointing the layers' inputs,
/// and the head's.
pub fn saved_bytes(cfg: &ModelConfig, spec: &TrainSpec, profile_eager: bool) -> u64 {
    let sum = |v: Vec<SavedTensor>| v.iter().map(SavedTensor::bytes).sum::<u64>();
    let head = sum(head(cfg, spec));
    let (layers, _, ckpt) = layer_terms(cfg, spec, profile_eager);
    head + if ckpt > 0 { ckpt } else { layers }
}

/// LoRA on `lm_head` alone without checkpointing: no layer holds an adapter or needs its input's
/// gradient, so autograd saves nothing in the layers, nor for the final norm (its weight and
/// input need none) or RoPE (measured: `results/torch-cpu/mistral-mini-lm-head-only.csv`, 15 %
/// over with every layer counted).
fn layers_idle(spec: &TrainSpec) -> bool {
    spec.checkpointing == Checkpointing::None
        && spec
            .adaptation
            .lora
            .as_ref()
            .is_some_and(|l| l.targets.is_empty() && !l.embed_tokens && !l.save_embed_tokens)
}

/// (saved bytes of the layers kept at once, the attention scores among them, checkpointed layer
/// inputs).
fn layer_terms(cfg: &ModelConfig, spec: &TrainSpec, profile_eager: bool) -> (u64, u64, u64) {
    // (all bytes, attention-score bytes) of one layer.
    let sums = |input_grad: bool| {
        let v = layer(cfg, spec, profile_eager, input_grad);
        let all: u64 = v.iter().map(SavedTensor::bytes).sum();
        let scores: u64 = v
            .iter()
            .filter(|x| x.kind == Kind::AttentionScores)
            .map(SavedTensor::bytes)
            .sum();
        (all, scores)
    };
    let l = cfg.num_hidden_layers as u64;
    let n = spec.batch as u64 * spec.seq as u64;
    // LoRA's first layer sees an input that needs no gradient, unless an adapter on the
    // embedding gives it one.
    let full = spec
        .adaptation
        .lora
        .as_ref()
        .is_none_or(|l| l.embed_tokens || l.save_embed_tokens);
    if layers_idle(spec) {
        return (0, 0, 0);
    }
    let (rest, rest_scores) = sums(true);
    match spec.checkpointing {
        Checkpointing::None if full => (l * rest, l * rest_scores, 0),
        Checkpointing::None => {
            let (first, first_scores) = sums(false);
            (
                first + (l - 1) * rest,
                first_scores + (l - 1) * rest_scores,
                0,
            )
        }
        // Each segment's input (the residual stream) kept; one segment recomputed at a time
        // (`enable_input_require_grads` makes LoRA's first input need a gradient).
        Checkpointing::Every(k) => {
            let k = (k as u64).min(l);
            (
                k * rest,
                k * rest_scores,
                l.div_ceil(k) * n * cfg.hidden_size as u64 * dtypes(spec).r,
            )
        }
    }
}

/// autocast's 16-bit copies among the saved tensors (bytes), `(weight copies, input copies)`,
/// for the layers kept at once (all without checkpointing, one segment with it) and the head:
/// the `*.weight_cast` and `*.input_cast` entries of [`layer`] and [`head`]. `None` without
/// autocast. The copies are part of the saved activations; this says how much of them autocast
/// adds (torch casts each product's operands per use; trained leaf weights' copies are cached
/// for the forward, `aten/src/ATen/autocast_mode.cpp` `cached_cast`).
pub fn autocast_copies(
    cfg: &ModelConfig,
    spec: &TrainSpec,
    profile_eager: bool,
) -> Option<(u64, u64)> {
    if !dtypes(spec).amp {
        return None;
    }
    let split = |v: &[SavedTensor]| {
        let sum = |suffix: &str| {
            v.iter()
                .filter(|x| x.name.ends_with(suffix))
                .map(SavedTensor::bytes)
                .sum::<u64>()
        };
        (sum("weight_cast"), sum("input_cast"))
    };
    let l = cfg.num_hidden_layers as u64;
    let layers = match spec.checkpointing {
        Checkpointing::None => l,
        Checkpointing::Every(k) => (k as u64).min(l),
    };
    let (lw, li) = split(&layer(cfg, spec, profile_eager, true));
    let (hw, hi) = split(&head(cfg, spec));
    Some((layers * lw + hw, layers * li + hi))
}

/// The optimizer's states (bytes) for `spec`'s trainable tensors: torch's AdamW two moments in
/// the state dtype; bitsandbytes' 8-bit optimizers one byte per moment and an f32 absmax per
/// 256 values for tensors of 4096 elements or more, fp32 moments below
/// (`bitsandbytes/optim/optimizer.py`, `min_8bit_size`); paged ones none on CUDA (unified
/// memory, outside `torch.cuda.max_memory_allocated`), the non-paged states on the CPU; SGD
/// (momentum 0) none; Adafactor factored second moments (a row and a column vector per matrix,
/// transformers' `Adafactor` without first moment); an fp32 master copy with master-weight
/// recipes; SGD with momentum one buffer per trainable parameter in the state dtype.
pub fn optimizer_states(cfg: &ModelConfig, spec: &TrainSpec) -> u64 {
    if spec.optimizer == Optimizer::Adafactor && spec.adaptation.lora.is_none() {
        // transformers' Adafactor factors a tensor over its last two dimensions: a row state
        // `shape[:-1]` and a column state `shape[:-2] + shape[-1:]`
        // (`transformers/optimization.py`, `Adafactor._get_options` and `step`), so a 3-D
        // expert stack `(E, a, b)` keeps `E·a + E·b`, as `E` matrices `(a, b)` would, not one
        // `(E, a·b)` matrix's `E + a·b` (measured: `results/torch-cpu-optimizers/mixtral-mini-optimizers.csv`).
        let tensors: Vec<(u64, u64)> = cfg
            .param_shapes()
            .iter()
            .flat_map(|p| match p.shape.as_slice() {
                &[e, a, b] => vec![(a as u64, b as u64); e],
                _ => vec![as_matrix(p)],
            })
            .collect();
        return optimizer_states_of(spec, &tensors);
    }
    optimizer_states_of(spec, &trainable_tensors(cfg, spec))
}

/// [`optimizer_states`] of `tensors` (`(rows, cols)` each) as `spec`'s optimizer keeps them:
/// per tensor for 8-bit AdamW's threshold and Adafactor's factored moments.
pub(crate) fn optimizer_states_of(spec: &TrainSpec, tensors: &[(u64, u64)]) -> u64 {
    let sd = spec.state_dtype.size_in_bytes() as u64;
    let t: u64 = tensors.iter().map(|(o, i)| o * i).sum();
    let eight = |n: u64| {
        if n >= 4096 {
            2 * (n + n.div_ceil(256) * 4)
        } else {
            2 * 4 * n
        }
    };
    let master = if spec.precision.is_some_and(|p| p.master_weights()) {
        4 * t
    } else {
        0
    };
    master
        + match spec.optimizer {
            Optimizer::AdamwTorch | Optimizer::AdamwTorchFused => 2 * t * sd,
            Optimizer::AdamwBnb8bit => tensors.iter().map(|(o, i)| eight(o * i)).sum(),
            Optimizer::PagedAdamw8bit if spec.torch_cpu => {
                tensors.iter().map(|(o, i)| eight(o * i)).sum()
            }
            Optimizer::PagedAdamw32bit if spec.torch_cpu => 2 * t * 4,
            // torch's momentum buffer: a clone of the gradient, then updated in place.
            Optimizer::Sgd if spec.momentum > 0.0 => t * sd,
            Optimizer::PagedAdamw8bit | Optimizer::PagedAdamw32bit | Optimizer::Sgd => 0,
            Optimizer::Adafactor => tensors
                .iter()
                .map(|&(o, i)| if i > 1 { 4 * (o + i) } else { 4 * o })
                .sum(),
        }
}

/// The optimizer step's transient beyond weights, gradients and states (bytes): torch's
/// AdamW foreach (CUDA's default) one buffer of every trainable tensor (`_foreach_sqrt` of the
/// second moments), for-loop (the CPU's default, torch 1.x; [`TrainSpec::torch_adamw_for_loop`])
/// two buffers of the largest (`sqrt` and the division by the bias correction,
/// `torch/optim/adam.py` `_single_tensor_adam`, torch 2.15); fused and
/// SGD none; bitsandbytes on the CPU (its non-CUDA fallback) fp32 copies of the largest tensor,
/// five for 8-bit states and three for 32-bit, none on CUDA; transformers' Adafactor two fp32
/// tensors of the largest (`update = grad**2 + eps` alive while `_approx_sq_grad` builds the
/// new update; `transformers/optimization.py`, `Adafactor.step`), and with 16-bit parameters
/// two more, its fp32 copies of the gradient and the parameter (measured for fp32:
/// `results/torch-cpu/`).
pub fn optimizer(cfg: &ModelConfig, spec: &TrainSpec) -> u64 {
    let sd = spec.state_dtype.size_in_bytes() as u64;
    let tensors = trainable_tensors(cfg, spec);
    let largest = tensors.iter().map(|(o, i)| o * i).max().unwrap_or(0);
    let all: u64 = tensors.iter().map(|(o, i)| o * i).sum();
    match spec.optimizer {
        Optimizer::AdamwTorch if spec.torch_adamw_for_loop() => 2 * largest * sd,
        Optimizer::AdamwTorch => all * sd,
        Optimizer::AdamwTorchFused | Optimizer::Sgd => 0,
        // bitsandbytes' CPU kernels step a 16-bit tensor through an fp32 copy of it
        // (`backends/cpu/ops.py`: `p_fp32 = p.data.float()`, a view for fp32): one more
        // (measured: `results/torch-cpu-optimizers/mixtral-mini-optimizers.csv`'s bf16 8-bit rows, 7.6 %
        // under without it).
        Optimizer::AdamwBnb8bit | Optimizer::PagedAdamw8bit if spec.torch_cpu => {
            (5 + widened_16bit(spec)) * largest * 4
        }
        Optimizer::PagedAdamw32bit if spec.torch_cpu => (3 + widened_16bit(spec)) * largest * 4,
        Optimizer::AdamwBnb8bit | Optimizer::PagedAdamw8bit | Optimizer::PagedAdamw32bit => 0,
        Optimizer::Adafactor => {
            // The tensors it steps: fp32 master copies, and PEFT's fp32 adapters, need no copy.
            let stepped_fp32 = gradient_dtype(spec) == candle_core::DType::F32
                || spec.precision.is_some_and(|p| p.master_weights());
            let widened = if stepped_fp32 { 0 } else { 2 };
            (2 + widened) * largest * 4
        }
    }
}

/// What [`optimizer_states`] counts for `spec`, in words.
pub fn states_formula(spec: &TrainSpec) -> String {
    let master = if spec.precision.is_some_and(|p| p.master_weights()) {
        "fp32 master copy + "
    } else {
        ""
    };
    let states = match spec.optimizer {
        Optimizer::AdamwTorch | Optimizer::AdamwTorchFused => {
            "2 moments × trainable params × state dtype"
        }
        Optimizer::AdamwBnb8bit => "2 × (1 B + 4 B / 256) per trainable param (fp32 below 4096)",
        Optimizer::PagedAdamw8bit | Optimizer::PagedAdamw32bit if spec.torch_cpu => {
            "bitsandbytes non-paged on the CPU"
        }
        Optimizer::PagedAdamw8bit | Optimizer::PagedAdamw32bit => {
            "paged: in CUDA unified memory, outside the allocator's counters"
        }
        Optimizer::Adafactor => "fp32 row and column second moments per matrix",
        Optimizer::Sgd if spec.momentum > 0.0 => "momentum buffer: trainable params × state dtype",
        Optimizer::Sgd => "none (momentum 0)",
    };
    format!("{master}{states}")
}

/// What [`optimizer`] counts for `spec`, in words.
pub fn optimizer_formula(spec: &TrainSpec) -> &'static str {
    match spec.optimizer {
        Optimizer::AdamwTorch if spec.torch_adamw_for_loop() => {
            "torch AdamW for-loop (one tensor at a time): 2 × largest trainable tensor"
        }
        Optimizer::AdamwTorch => "torch AdamW foreach: one buffer per trainable tensor",
        Optimizer::AdamwTorchFused => "fused AdamW: none",
        Optimizer::Sgd => "SGD (momentum 0): none",
        Optimizer::AdamwBnb8bit | Optimizer::PagedAdamw8bit if spec.torch_cpu => {
            "bitsandbytes 8-bit on the CPU: 5 fp32 copies of the largest trainable tensor"
        }
        Optimizer::PagedAdamw32bit if spec.torch_cpu => {
            "bitsandbytes 32-bit on the CPU: 3 fp32 copies of the largest trainable tensor"
        }
        Optimizer::AdamwBnb8bit | Optimizer::PagedAdamw8bit | Optimizer::PagedAdamw32bit => {
            "bitsandbytes fused kernel: none"
        }
        Optimizer::Adafactor => "Adafactor: grad² and the new update in fp32 (with 16-bit weights also fp32 gradient and parameter copies) of the largest trainable tensor",
    }
}

/// [`trainable_tensors`] as vramcal's own step holds them (`src/model/moe.rs`): a mixture of
/// experts' 3-D tensors split into one matrix per expert (`gate_up_proj`'s into gate and up,
/// `(i, h)` each; `down_proj`'s `(h, i)`), and under `all-linear` each expert's adapter share
/// (`A_e` `(2r, h)`, the gate's and the up projection's rows of `B_e` `(i, 2r)` each,
/// `down_proj`'s `(r, i)` and `(h, r)`) in place of PEFT's stacked factors: the tensors
/// 8-bit AdamW's threshold and Adafactor's factoring see.
pub(crate) fn own_trainable_tensors(cfg: &ModelConfig, spec: &TrainSpec) -> Vec<(u64, u64)> {
    let Some(m) = cfg.moe() else {
        return trainable_tensors(cfg, spec);
    };
    let (e, h, i) = (
        m.experts as u64,
        cfg.hidden_size as u64,
        cfg.intermediate_size as u64,
    );
    match &spec.adaptation.lora {
        None => cfg
            .param_shapes()
            .iter()
            .flat_map(|p| {
                if p.name.ends_with(".mlp.experts.gate_up_proj") {
                    vec![(i, h); 2 * e as usize]
                } else if p.name.ends_with(".mlp.experts.down_proj") {
                    vec![(h, i); e as usize]
                } else {
                    vec![as_matrix(p)]
                }
            })
            .collect(),
        Some(l) if l.experts_adapted(cfg) => {
            let r = l.r as u64;
            let mut v = Vec::new();
            for _ in 0..cfg.num_hidden_layers {
                for x in l.layer_targets(cfg) {
                    let (o, i) = target_shape(cfg, x);
                    v.push((r, i as u64));
                    v.push((o as u64, r));
                }
                // The router's A `(r, h)` and B `(E, r)`, then each expert's share.
                v.push((r, h));
                v.push((e, r));
                for _ in 0..e {
                    v.extend([(2 * r, h), (i, 2 * r), (i, 2 * r), (r, i), (h, r)]);
                }
            }
            v.extend(top_level_adapters(cfg, l));
            v
        }
        Some(_) => trainable_tensors(cfg, spec),
    }
}

/// `p` as a matrix: its first dimension's rows, the rest's elements as columns (a vector as
/// `(n, 1)`).
fn as_matrix(p: &crate::config::ParamShape) -> (u64, u64) {
    let rows = *p.shape.first().unwrap_or(&1) as u64;
    (rows, p.numel() / rows.max(1))
}

/// `(rows, cols)` of every trainable tensor (vectors as `(n, 1)`): all parameters for full
/// fine-tuning (a tied head once), the A and B of every adapter for LoRA.
pub(crate) fn trainable_tensors(cfg: &ModelConfig, spec: &TrainSpec) -> Vec<(u64, u64)> {
    match &spec.adaptation.lora {
        None => cfg.param_shapes().iter().map(as_matrix).collect(),
        Some(l) => {
            let mut v = Vec::new();
            for _ in 0..cfg.num_hidden_layers {
                for x in l.layer_targets(cfg) {
                    let (o, i) = target_shape(cfg, x);
                    v.push((l.r as u64, i as u64));
                    v.push((o as u64, l.r as u64));
                }
                v.extend(crate::spec::expert_adapter_shapes(cfg, l));
            }
            v.extend(top_level_adapters(cfg, l));
            v
        }
    }
}

/// `(rows, cols)` of `l`'s tensors outside the layers: `lm_head`'s adapter, `embed_tokens`'
/// (PEFT's `lora_embedding_A` `(r, V)` and `lora_embedding_B` `(h, r)`), the `modules_to_save`
/// copies `(V, h)`.
fn top_level_adapters(cfg: &ModelConfig, l: &crate::spec::LoraConfig) -> Vec<(u64, u64)> {
    let (vocab, h, r) = (cfg.vocab_size as u64, cfg.hidden_size as u64, l.r as u64);
    let mut v = Vec::new();
    if l.lm_head {
        v.push((r, h));
        v.push((vocab, r));
    }
    if l.embed_tokens {
        v.push((r, vocab));
        v.push((h, r));
    }
    for _ in l.saved_names() {
        v.push((vocab, h));
    }
    v
}

/// Weight bytes as PyTorch holds them: [`weight_bytes`], except for QLoRA, where
/// `peft.prepare_model_for_kbit_training` casts every parameter bitsandbytes left unquantized
/// (embeddings, head, norms) to fp32, and on the CPU with fp32 weights the checkpoint's
/// tensors stay in memory whole: transformers 5 reads a safetensors file into one buffer, and
/// the unquantized parameters are views of it (measured: `results/torch-cpu/`).
pub fn weights(cfg: &ModelConfig, spec: &TrainSpec) -> u64 {
    let base = weight_bytes(cfg, spec) + saved_copies(cfg, spec);
    if spec.adaptation.quant == crate::spec::Quant::None {
        return base;
    }
    let d = spec.dtype.size_in_bytes() as u64;
    let unquantized: u64 = cfg
        .param_shapes()
        .iter()
        .filter(|p| !p.name.ends_with("_proj.weight"))
        .map(|p| p.numel())
        .sum();
    let quantized = cfg.param_count() - unquantized;
    // Mixtral's experts are stored per expert in the checkpoint (transformers 5 saves the
    // original layout) and stacked into new tensors on loading: their file copies stay too.
    let experts: u64 = cfg
        .param_shapes()
        .iter()
        .filter(|p| p.name.contains(".mlp.experts."))
        .map(|p| p.numel())
        .sum();
    let retained = if spec.torch_cpu && d == 4 {
        (quantized + experts) * 4
    } else {
        0
    };
    base + unquantized * 4 - unquantized * d + retained
}

/// Peak of loading (bytes): the weights without LoRA's adapters (PEFT adds them after loading),
/// and for a tied head the untied `(V, h)` head
/// transformers allocates before tying it when it builds the model from its config (as the
/// reference script does; QLoRA's models are read from a checkpoint).
pub fn load_bytes(cfg: &ModelConfig, spec: &TrainSpec) -> u64 {
    let tied = if cfg.tie_word_embeddings && spec.adaptation.quant == crate::spec::Quant::None {
        (cfg.vocab_size as u64 * cfg.hidden_size as u64) * dtypes(spec).d
    } else {
        0
    };
    // PEFT adds the adapters, and the `modules_to_save` copies, after loading.
    let adapters = spec.adaptation.lora.as_ref().map_or(0, |l| {
        crate::spec::lora_param_count(cfg, l) * spec.adapter_dtype().size_in_bytes() as u64
    }) + saved_copies(cfg, spec);
    weights(cfg, spec) - adapters + tied
}

/// The cuBLAS workspaces PyTorch allocates on CUDA through its caching allocator (bytes): one
/// per (cuBLAS handle, stream), and handles are per thread, so two in training, the forward's
/// (the Python thread) and autograd's backward thread's; each of PyTorch's default size,
/// 32 MiB on compute capability 9.0 (`4096 * 8` KiB; `aten/src/ATen/cuda/CublasHandlePool.cpp`,
/// `parseChosenWorkspaceSize`, torch 2.4 and later), 8.125 MiB on earlier GPUs (`4096 * 2 + 16
/// * 8` KiB). vramcal counts the 32 MiB size whatever the GPU: on a pre-Hopper card it
/// over-counts by 48 MiB. Set otherwise by `CUBLAS_WORKSPACE_CONFIG`, which vramcal does not read.
pub const CUBLAS_WORKSPACES: u64 = 2 * 32 * 1024 * 1024;

/// How [`CUBLAS_WORKSPACES`] is counted, as the itemized estimate shows it.
pub const CUBLAS_WORKSPACES_FORMULA: &str =
    "2 threads (forward, autograd's backward) × 32 MiB (PyTorch's default on sm90; 8.125 MiB before)";

/// The static part and the terms for the torch profiles (`profile_eager`: the `torch-eager`
/// profile, eager attention unless the spec names flash-attention-2).
pub fn terms(cfg: &ModelConfig, spec: &TrainSpec, profile_eager: bool) -> Terms {
    let d = dtypes(spec).d;
    let grad_bytes = gradient_dtype(spec).size_in_bytes() as u64;
    let n = spec.batch as u64 * spec.seq as u64;
    let vocab = cfg.vocab_size as u64;
    let t = spec.trainable_params(cfg);
    let (layers, scores, ckpt) = layer_terms(cfg, spec, profile_eager);
    let head_saved: u64 = head(cfg, spec).iter().map(SavedTensor::bytes).sum();
    // transformers' loss: the log-softmax output is saved (in `head_saved`); with it the
    // gradients out of nll_loss and log_softmax. Liger's: one chunk of logits in the head
    // input's dtype, turned into its gradient in place.
    let logits = match spec.loss {
        Loss::Transformers => 2 * n * vocab * 4,
        Loss::FusedLinearCe => liger_chunk_tokens(cfg, spec) * vocab * dtypes(spec).r,
    };
    let gradients = t * grad_bytes;
    let tied = if cfg.tie_word_embeddings && spec.adaptation.lora.is_none() {
        2 * (cfg.vocab_size as u64 * cfg.hidden_size as u64) * d
    } else {
        0
    };
    Terms {
        weights: weights(cfg, spec),
        gradients,
        optimizer_states: optimizer_states(cfg, spec),
        terms: Term::ALL.map(|term| match term {
            Term::Activations => (layers - scores) as f64,
            Term::AttentionScores => scores as f64,
            Term::CheckpointInputs => ckpt as f64,
            // The head's saved tensors, alive until the head's backward, with checkpointing too.
            Term::LogitsAndLoss => (head_saved + logits) as f64,
            Term::GradientsLive => (gradients * if spec.accumulate > 1 { 2 } else { 1 }) as f64,
            Term::LargestTrainable => tied as f64,
            Term::Constant => 1.0,
            Term::AttentionTransient
            | Term::CpuBf16MatmulWidening
            | Term::CpuAttentionTransient => 0.0,
        }),
        checkpointed: ckpt > 0,
        two_moments: true,
        torch: true,
        step_transient: optimizer(cfg, spec),
        accumulating: spec.accumulate > 1,
        workspace: if spec.torch_cpu { 0 } else { CUBLAS_WORKSPACES },
        head_static: 0,
        layer_static: moe_backward(cfg, spec),
        backward_static: 0,
        end_static: 0,
    }
}

/// Bytes of PEFT's `modules_to_save` copies (`ModulesToSaveWrapper` deep-copies the module and
/// keeps the original frozen beside it, tied or not): `V·h` each, in the weights' dtype, fp32
/// under QLoRA (`prepare_model_for_kbit_training` has cast the unquantized modules to fp32
/// before PEFT copies them).
pub fn saved_copies(cfg: &ModelConfig, spec: &TrainSpec) -> u64 {
    let Some(l) = spec.adaptation.lora.as_ref() else {
        return 0;
    };
    let d = if spec.adaptation.quant == crate::spec::Quant::None {
        spec.dtype.size_in_bytes() as u64
    } else {
        4
    };
    l.saved_param_count(cfg) * d
}

/// 1 where the optimizer steps 16-bit tensors (no fp32 master copy, 16-bit trainables), 0 where
/// it steps fp32 ones.
fn widened_16bit(spec: &TrainSpec) -> u64 {
    let fp32 =
        gradient_dtype(spec) == DType::F32 || spec.precision.is_some_and(|p| p.master_weights());
    u64::from(!fp32)
}

/// The dtype of gradients for `spec` under the torch profiles (fp32 adapters' under `+amp`).
pub fn gradient_dtype(spec: &TrainSpec) -> DType {
    spec.trainable_dtype()
}

/// DDP's bucket limit for broadcasting rank 0's state at construction (bytes):
/// `torch/nn/parallel/distributed.py`, `_DEFAULT_BUCKET_CAP_MB`-independent
/// `broadcast_bucket_size = int(250 * 1024 * 1024)`.
pub const DDP_BROADCAST_BUCKET: u64 = 250 * 1024 * 1024;

/// The transient of DDP's construction beyond the model (bytes): `_sync_module_states` →
/// `broadcast_coalesced` (`torch/csrc/distributed/c10d/comm.cpp`) broadcasts the parameters in
/// flat copies of buckets (`compute_bucket_assignment_by_size` closes a bucket once it reaches
/// [`DDP_BROADCAST_BUCKET`]) with at most two in flight, so the largest sum of two consecutive
/// buckets is alive at once (a bucket of a single tensor is broadcast in place). Tensors in the module's order (per decoder layer the attention's
/// projections, the MLP's, then the two norms, as transformers' Llama/Mistral/Qwen2 define
/// them; PEFT's A and B after each adapted weight, in the adapters' dtype; NF4 weights at their
/// packed size), one bucket type for all (torch buckets each dtype apart: mixed-dtype QLoRA
/// models are approximated).
pub fn ddp_broadcast_transient(cfg: &ModelConfig, spec: &TrainSpec) -> u64 {
    let buckets = ddp_broadcast_buckets(cfg, spec);
    match buckets.len() {
        0 => 0,
        1 => buckets[0],
        _ => buckets.windows(2).map(|w| w[0] + w[1]).max().unwrap_or(0),
    }
}

/// The flat copies DDP's construction broadcast makes, in order (bytes; 0 for a bucket of one
/// tensor, broadcast in place): see [`ddp_broadcast_transient`], which holds two consecutive
/// ones at a time.
pub fn ddp_broadcast_buckets(cfg: &ModelConfig, spec: &TrainSpec) -> Vec<u64> {
    let d = spec.dtype.size_in_bytes() as u64;
    let ad = spec.trainable_dtype().size_in_bytes() as u64;
    let nf4 = spec.adaptation.quant != crate::spec::Quant::None;
    let lora = spec.adaptation.lora.as_ref();
    let targets: Vec<&str> = lora
        .map(|l| l.layer_targets(cfg).iter().map(|t| t.name()).collect())
        .unwrap_or_default();
    // Module order inside a layer: self_attn, mlp, input_layernorm, post_attention_layernorm.
    let rank = |name: &str| -> u8 {
        if name.contains(".self_attn.") {
            0
        } else if name.contains(".mlp.") {
            1
        } else if name.contains(".input_layernorm.") {
            2
        } else {
            3
        }
    };
    let mut shapes = cfg.param_shapes();
    shapes.sort_by_key(|p| {
        let layer = p
            .name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        match layer {
            // The embedding first, the layers in order, the final norm and head last.
            None if p.name.starts_with("model.embed_tokens") => (0, 0, 0),
            None => (2, 0, 0),
            Some(l) => (1, l, rank(&p.name)),
        }
    });
    let mut tensors: Vec<u64> = Vec::new();
    for p in &shapes {
        let n = p.numel();
        let quantized = nf4 && p.name.ends_with("_proj.weight");
        tensors.push(if quantized {
            n.div_ceil(2) + n.div_ceil(64) * 4
        } else {
            n * d
        });
        if let Some(l) = lora {
            let module = p.name.trim_end_matches(".weight");
            let adapted = p.name.ends_with(".weight")
                && targets.iter().any(|t| module.ends_with(&format!(".{t}")));
            if adapted && p.shape.len() == 2 {
                let (o, i) = (p.shape[0] as u64, p.shape[1] as u64);
                tensors.push(l.r as u64 * i * ad);
                tensors.push(o * l.r as u64 * ad);
            }
        }
    }
    // (bytes, tensors) per bucket; a bucket of one tensor is broadcast in place
    // (`flatten_dense_tensors` returns a view of a single tensor): no copy.
    let mut buckets = Vec::new();
    let mut open = (0u64, 0usize);
    for b in tensors {
        open = (open.0 + b, open.1 + 1);
        if open.0 >= DDP_BROADCAST_BUCKET {
            buckets.push(open);
            open = (0, 0);
        }
    }
    if open.1 > 0 {
        buckets.push(open);
    }
    buckets
        .into_iter()
        .map(|(b, n)| if n > 1 { b } else { 0 })
        .collect()
}
