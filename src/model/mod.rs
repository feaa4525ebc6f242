//! The trainable Mistral/Llama-style decoder, with full fine-tuning, LoRA, a 4-bit (NF4)
//! frozen base, and activation checkpointing.
//!
//! Layout and names follow transformers' `modeling_mistral.py` / `modeling_llama.py` so that
//! weights map by path (`model.layers.0.self_attn.q_proj.weight`); LoRA adapters use PEFT's
//! names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`). RMSNorm, RoPE,
//! attention, the SwiGLU gate and the LM head with its loss are vramcal's fused ops
//! ([`crate::ops`]), which keep for backward only what PyTorch's SDPA path keeps (candle 0.11's
//! own fused `softmax_last_dim`, `rms_norm` and `rotary_emb::rope` silently detach, so they are
//! not used for anything that needs a gradient). `tests/gradients.rs` checks every trainable
//! tensor against finite differences; `tests/ops.rs` each op against its composed form.

pub mod linear;
pub mod moe;
pub mod nf4;
pub mod save;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::ops;
use crate::spec::{Adaptation, Attention, Checkpointing, Quant, Target, TrainSpec};
use crate::weights::WeightSource;
use linear::{frozen_linear, linear, FrozenRef, LoraAdapter, Param, Weight};
pub use linear::{ForwardCtx, Linear};
use nf4::Nf4Tensor;

/// One decoder layer (HF names).
#[derive(Debug)]
pub struct Layer {
    /// RMSNorm before attention, `(hidden,)`.
    pub input_layernorm: Param,
    /// Query projection `(heads·head_dim, hidden)`.
    pub q_proj: Linear,
    /// Key projection `(kv_heads·head_dim, hidden)`.
    pub k_proj: Linear,
    /// Value projection `(kv_heads·head_dim, hidden)`.
    pub v_proj: Linear,
    /// Output projection `(hidden, heads·head_dim)`.
    pub o_proj: Linear,
    /// RMSNorm before the MLP, `(hidden,)`.
    pub post_attention_layernorm: Param,
    /// The MLP: a dense SwiGLU, or Mixtral's mixture of experts.
    pub mlp: Mlp,
}

/// A decoder layer's MLP.
#[derive(Debug)]
pub enum Mlp {
    /// SwiGLU (`modeling_llama.py` `LlamaMLP`).
    Dense {
        /// Gate `(intermediate, hidden)`.
        gate_proj: Linear,
        /// Up `(intermediate, hidden)`.
        up_proj: Linear,
        /// Down `(hidden, intermediate)`.
        down_proj: Linear,
    },
    /// Mixtral's sparse mixture of experts ([`moe::MoeBlock`]).
    Moe(moe::MoeBlock),
}

impl Layer {
    /// The linear module for `t`; `None` for `gate_proj`/`up_proj`/`down_proj` of a
    /// mixture-of-experts layer, which has none.
    pub fn linear(&self, t: Target) -> Option<&Linear> {
        match (t, &self.mlp) {
            (Target::QProj, _) => Some(&self.q_proj),
            (Target::KProj, _) => Some(&self.k_proj),
            (Target::VProj, _) => Some(&self.v_proj),
            (Target::OProj, _) => Some(&self.o_proj),
            (Target::GateProj, Mlp::Dense { gate_proj, .. }) => Some(gate_proj),
            (Target::UpProj, Mlp::Dense { up_proj, .. }) => Some(up_proj),
            (Target::DownProj, Mlp::Dense { down_proj, .. }) => Some(down_proj),
            (_, Mlp::Moe(_)) => None,
        }
    }

    /// Every linear module of the layer with its path inside the layer (HF names; a mixture
    /// of experts' router `mlp.gate` and experts `mlp.experts.{e}.{gate,up,down}_proj`, the
    /// rows of the checkpoint's 3-D tensors [`moe`] splits them into).
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut v: Vec<(String, &Linear)> = Target::ALL[..4]
            .iter()
            .filter_map(|&t| Some((t.path().to_string(), self.linear(t)?)))
            .collect();
        match &self.mlp {
            Mlp::Dense { .. } => v.extend(
                Target::ALL[4..]
                    .iter()
                    .filter_map(|&t| Some((t.path().to_string(), self.linear(t)?))),
            ),
            Mlp::Moe(m) => {
                v.push(("mlp.gate".into(), &m.gate));
                for (e, x) in m.experts.iter().enumerate() {
                    v.push((format!("mlp.experts.{e}.gate_proj"), &x.gate));
                    v.push((format!("mlp.experts.{e}.up_proj"), &x.up));
                    v.push((format!("mlp.experts.{e}.down_proj"), &x.down));
                }
            }
        }
        v
    }
}

/// The decoder: embedding, `L` layers, final norm, LM head (tied or not).
#[derive(Debug)]
pub struct Decoder {
    cfg: ModelConfig,
    dtype: DType,
    /// The dtype matrix products, attention and the activations between them run in: the
    /// weights' dtype, or autocast's.
    compute: DType,
    device: Device,
    adaptation: Adaptation,
    attention: Attention,
    /// Token embedding `model.embed_tokens.weight`, `(vocab, hidden)`.
    pub embed_tokens: Param,
    /// Decoder layers `model.layers.N`.
    pub layers: Vec<Layer>,
    /// Final RMSNorm `model.norm.weight`, `(hidden,)`.
    pub norm: Param,
    /// Untied LM head `lm_head.weight`, `(vocab, hidden)`; `None` when tied to the embedding.
    pub lm_head: Option<Param>,
    /// LoRA on `lm_head` (PEFT's `lm_head` target, a LoRA `Linear` on the head, tied or not):
    /// `lora_A` `(r, hidden)`, `lora_B` `(vocab, r)`.
    pub lm_head_lora: Option<LoraAdapter>,
    /// LoRA on `embed_tokens` (PEFT's LoRA `Embedding`): `lora_embedding_A` `(r, vocab)`,
    /// `lora_embedding_B` `(hidden, r)` ([`LoraAdapter::embedding`]).
    pub embed_lora: Option<LoraAdapter>,
}

/// The dtypes a decoder is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recipe {
    /// The weights' (embedding, norms, linear weights as loaded) and residual stream's dtype.
    pub weights: DType,
    /// The dtype of matrix products, attention and RoPE (autocast's; `weights` without it).
    pub compute: DType,
    /// LoRA adapters' dtype (fp32 under the `+amp` recipes, PEFT's `autocast_adapter_dtype`).
    pub adapters: DType,
}

impl Recipe {
    /// Everything in `dtype`, no autocast.
    pub fn plain(dtype: DType) -> Self {
        Recipe {
            weights: dtype,
            compute: dtype,
            adapters: dtype,
        }
    }
}

/// A tensor the decoder stores ([`Decoder::stored_tensors`]).
#[derive(Debug, Clone)]
pub struct StoredTensor {
    /// Its decoder layer; `None` for the embedding, final norm, head and their adapters.
    pub layer: Option<usize>,
    /// A name for messages (HF's or PEFT's).
    pub name: String,
    /// The tensor (a trainable one's [`Var`] tensor: the same storage).
    pub tensor: Tensor,
    /// Whether it trains.
    pub trainable: bool,
}

/// A module of the root (outside the decoder layers), as [`SegmentHooks`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootPart {
    /// The embedding and its adapter.
    Embedding,
    /// The final norm, the LM head (or the tied embedding) and the head's adapter.
    Head,
}

/// Called around each checkpointed segment of layers (a simulated FSDP rank gathers the
/// segment's parameters before it runs and frees them, and reduce-scatters their gradients,
/// after: `crate::measure::fsdp`), and around the root's modules (a simulated ZeRO-3 rank
/// gathers and releases them too: `crate::measure::zero3`).
pub trait SegmentHooks {
    /// The root's `part` is about to run: its forward (`backward` false), or its backward (the
    /// head's from the loss; the embedding's, recomputed at the end of backward when it
    /// trains). Nothing by default.
    ///
    /// # Errors
    /// The hook's own.
    fn before_root(&mut self, part: RootPart, backward: bool) -> Result<()> {
        let _ = (part, backward);
        Ok(())
    }

    /// The root's `part` has run; in backward `grads` as in [`SegmentHooks::after`]. Nothing by
    /// default.
    ///
    /// # Errors
    /// The hook's own.
    fn after_root(&mut self, part: RootPart, grads: Option<&mut [Option<Tensor>]>) -> Result<()> {
        let _ = (part, grads);
        Ok(())
    }

    /// Layers `first..first + n` are about to run: their forward (`backward` false), or their
    /// recomputation and backward.
    ///
    /// # Errors
    /// The hook's own.
    fn before(&mut self, first: usize, n: usize, backward: bool) -> Result<()>;

    /// Layers `first..first + n` have run, and in backward their graph and candle's
    /// `GradStore` are gone: `grads[i]` is the gradient so far of
    /// [`Decoder::trainable_vars`]'s i-th tensor, which the hook may take.
    ///
    /// # Errors
    /// The hook's own.
    fn after(&mut self, first: usize, n: usize, grads: Option<&mut [Option<Tensor>]>)
        -> Result<()>;
}

/// What a training forward pass leaves for [`Decoder::backward`].
pub struct TrainForward {
    /// The loss (scalar, f32; f64 for f64 models), with its graph.
    pub loss: Tensor,
    ctx: ForwardCtx,
    input_ids: Tensor,
    /// Checkpointed segments: (first layer, layer count, saved input `(b, s, hidden)`).
    segments: Vec<(usize, usize, Tensor)>,
    /// The leaf that the head's graph starts from, under checkpointing.
    head_input: Option<Var>,
}

struct Loader<'a> {
    src: &'a mut dyn WeightSource,
    dtype: DType,
    device: &'a Device,
}

impl Loader<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.src.tensor(name, shape, dtype, self.device)
    }

    fn param(&mut self, name: &str, shape: &[usize], trainable: bool) -> Result<Param> {
        let t = self.tensor(name, shape, self.dtype)?;
        Ok(if trainable {
            Param::Trainable(Var::from_tensor(&t)?)
        } else {
            Param::Frozen(t)
        })
    }
}

impl Decoder {
    /// Builds a decoder for full fine-tuning, taking every parameter from `src` in the order
    /// of [`ModelConfig::param_shapes`].
    ///
    /// # Errors
    /// The source's errors ([`Error::MissingTensor`], [`Error::WeightShape`],
    /// [`Error::Weights`]) and [`Error::Candle`].
    pub fn new(
        cfg: &ModelConfig,
        src: &mut dyn WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::with_adaptation(cfg, src, dtype, device, &Adaptation::default())
    }

    /// Builds a decoder for `ad`: full fine-tuning, or a frozen base (NF4-quantized linear
    /// layers with [`Quant::Nf4`]; embeddings, norms and `lm_head` stay in the compute dtype,
    /// as in QLoRA) with LoRA adapters on the target modules.
    ///
    /// # Errors
    /// As [`Decoder::new`]; [`Error::InvalidValue`] for an invalid adaptation.
    pub fn with_adaptation(
        cfg: &ModelConfig,
        src: &mut dyn WeightSource,
        dtype: DType,
        device: &Device,
        ad: &Adaptation,
    ) -> Result<Self> {
        Self::with_recipe(cfg, src, device, ad, Recipe::plain(dtype))
    }

    /// Builds the decoder of `spec`: its weights' dtype, autocast's compute dtype where its
    /// precision recipe names one, and its adapters' dtype ([`TrainSpec::compute_dtype`],
    /// [`TrainSpec::adapter_dtype`]).
    ///
    /// # Errors
    /// As [`Decoder::with_adaptation`].
    pub fn for_spec(
        cfg: &ModelConfig,
        src: &mut dyn WeightSource,
        device: &Device,
        spec: &TrainSpec,
    ) -> Result<Self> {
        let recipe = Recipe {
            weights: spec.dtype,
            compute: spec.compute_dtype(),
            adapters: spec.adapter_dtype(),
        };
        Self::with_recipe(cfg, src, device, &spec.adaptation, recipe)
    }

    /// Builds a decoder for `ad` with the dtypes of `recipe`. Under autocast
    /// (`recipe.compute` ≠ `recipe.weights`) the embedding, the norms and the residual stream
    /// stay in the weights' dtype; every linear layer casts its input, weight, bias and
    /// adapters to the compute dtype per use (a frozen weight inside its op, forward and
    /// backward, kept nowhere; a trained one as a graph node, kept for backward) and outputs
    /// in it; RoPE and attention run in it; its outputs are cast back to the weights' dtype
    /// for the residual adds; the LM head casts the normed hidden states and its weight.
    /// NF4 weights dequantize to the compute dtype.
    ///
    /// # Errors
    /// As [`Decoder::with_adaptation`]; [`Error::InvalidValue`] for a compute dtype NF4
    /// cannot dequantize into.
    pub fn with_recipe(
        cfg: &ModelConfig,
        src: &mut dyn WeightSource,
        device: &Device,
        ad: &Adaptation,
        recipe: Recipe,
    ) -> Result<Self> {
        let Recipe {
            weights: dtype,
            compute,
            adapters,
        } = recipe;
        ad.validate(compute)?;
        let full = ad.lora.is_none();
        let h = cfg.hidden_size;
        let q = cfg.num_attention_heads * cfg.head_dim();
        let kv = cfg.kv_heads() * cfg.head_dim();
        let i = cfg.intermediate_size;
        let mut ld = Loader { src, dtype, device };
        // PEFT's `modules_to_save`: the module trained whole beside the adapters.
        let (save_head, save_embed) = ad
            .lora
            .as_ref()
            .map_or((false, false), |l| (l.save_lm_head, l.save_embed_tokens));
        let tied = cfg.tie_word_embeddings;
        // A tied model whose embedding or head alone is saved keeps the other on the frozen
        // original: one trainable copy (`Var::from_tensor` copies), as PEFT's wrapper does.
        let (embed_tokens, tied_head) = if tied && (save_head || save_embed) && !full {
            let t = ld.tensor("model.embed_tokens.weight", &[cfg.vocab_size, h], dtype)?;
            let copy = || -> Result<Param> { Ok(Param::Trainable(Var::from_tensor(&t)?)) };
            match (save_embed, save_head) {
                (true, true) => (copy()?, Some(copy()?)),
                (true, false) => (copy()?, Some(Param::Frozen(t.clone()))),
                _ => (Param::Frozen(t.clone()), Some(copy()?)),
            }
        } else {
            let e = ld.param(
                "model.embed_tokens.weight",
                &[cfg.vocab_size, h],
                full || save_embed,
            )?;
            (e, None)
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut lin = |t: Target, out: usize, inp: usize| -> Result<Linear> {
                let name = format!("{p}.{}.weight", t.path());
                let weight = match (full, ad.quant) {
                    (true, _) => Weight::Trainable(Var::from_tensor(&ld.tensor(
                        &name,
                        &[out, inp],
                        dtype,
                    )?)?),
                    (false, Quant::None) => Weight::Frozen(ld.tensor(&name, &[out, inp], dtype)?),
                    (false, Quant::Nf4 { double }) => {
                        let w = ld.tensor(&name, &[out, inp], DType::F32)?;
                        let v = w.flatten_all()?.to_vec1::<f32>()?;
                        drop(w);
                        Weight::Nf4(Arc::new(Nf4Tensor::quantize(&v, &[out, inp], double)?))
                    }
                };
                let lora = match &ad.lora {
                    Some(c) if c.targets.contains(&t) => {
                        let seed = ad
                            .seed
                            .wrapping_mul(1_000_003)
                            .wrapping_add((l * 8 + t as usize) as u64);
                        Some(LoraAdapter::new(out, inp, c, adapters, device, seed)?)
                    }
                    _ => None,
                };
                let has_bias = match t {
                    Target::QProj | Target::KProj | Target::VProj => cfg.qkv_bias(),
                    Target::OProj => cfg.o_bias(),
                    _ => false,
                };
                let bias = if has_bias {
                    Some(ld.param(&format!("{p}.{}.bias", t.path()), &[out], full)?)
                } else {
                    None
                };
                Ok(Linear {
                    weight,
                    lora,
                    bias,
                    out,
                    inp,
                    dtype: compute,
                })
            };
            let q_proj = lin(Target::QProj, q, h)?;
            let k_proj = lin(Target::KProj, kv, h)?;
            let v_proj = lin(Target::VProj, kv, h)?;
            let o_proj = lin(Target::OProj, h, q)?;
            let mlp = match cfg.moe() {
                None => Mlp::Dense {
                    gate_proj: lin(Target::GateProj, i, h)?,
                    up_proj: lin(Target::UpProj, i, h)?,
                    down_proj: lin(Target::DownProj, h, i)?,
                },
                Some(m) => {
                    // Frozen under LoRA and QLoRA alike (bitsandbytes quantizes nn.Linear
                    // layers only; the router and the 3-D experts are neither).
                    let dense = |w: Tensor| -> Result<Weight> {
                        Ok(if full {
                            Weight::Trainable(Var::from_tensor(&w)?)
                        } else {
                            Weight::Frozen(w)
                        })
                    };
                    // The experts compute in the weights' dtype (transformers' `grouped_mm` is
                    // outside autocast), the router in autocast's.
                    let plain = |weight: Weight, out: usize, inp: usize| Linear {
                        weight,
                        lora: None,
                        bias: None,
                        out,
                        inp,
                        dtype,
                    };
                    let e = m.experts;
                    // PEFT's `all-linear` on Mixtral adapts the router and the experts too
                    // (`ParamWrapper`s: no dropout, which the spec refuses).
                    let adapted = ad.lora.as_ref().filter(|c| c.experts_adapted(cfg));
                    let seed = |k: usize| {
                        ad.seed
                            .wrapping_mul(1_000_003)
                            .wrapping_add(0x4D6F_4500_0000 + (l * 4096 + k) as u64)
                    };
                    let router = ld.tensor(&format!("{p}.mlp.gate.weight"), &[e, h], dtype)?;
                    let gate = Linear {
                        dtype: compute,
                        lora: match adapted {
                            Some(c) => Some(LoraAdapter::new(e, h, c, adapters, device, seed(0))?),
                            None => None,
                        },
                        ..plain(dense(router)?, e, h)
                    };
                    let gu = ld.tensor(
                        &format!("{p}.mlp.experts.gate_up_proj"),
                        &[e, 2 * i, h],
                        dtype,
                    )?;
                    let dn = ld.tensor(&format!("{p}.mlp.experts.down_proj"), &[e, h, i], dtype)?;
                    let mut experts = Vec::with_capacity(e);
                    for x in 0..e {
                        let g = gu.get(x)?;
                        let (down_lora, gate_up_lora) = match adapted {
                            Some(c) => (
                                Some(LoraAdapter::new(
                                    h,
                                    i,
                                    c,
                                    adapters,
                                    device,
                                    seed(1 + 2 * x),
                                )?),
                                Some(moe::GateUpLora::new(
                                    h,
                                    i,
                                    c,
                                    adapters,
                                    device,
                                    seed(2 + 2 * x),
                                )?),
                            ),
                            None => (None, None),
                        };
                        experts.push(moe::Expert {
                            gate: plain(dense(g.narrow(0, 0, i)?.contiguous()?)?, i, h),
                            up: plain(dense(g.narrow(0, i, i)?.contiguous()?)?, i, h),
                            down: Linear {
                                lora: down_lora,
                                ..plain(dense(dn.get(x)?.contiguous()?)?, h, i)
                            },
                            gate_up_lora,
                        });
                    }
                    Mlp::Moe(moe::MoeBlock {
                        gate,
                        experts,
                        top_k: m.top_k,
                    })
                }
            };
            let input_layernorm = ld.param(&format!("{p}.input_layernorm.weight"), &[h], full)?;
            let post_attention_layernorm =
                ld.param(&format!("{p}.post_attention_layernorm.weight"), &[h], full)?;
            layers.push(Layer {
                input_layernorm,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                post_attention_layernorm,
                mlp,
            });
        }
        let norm = ld.param("model.norm.weight", &[h], full)?;
        let lm_head = if tied {
            tied_head
        } else {
            Some(ld.param("lm_head.weight", &[cfg.vocab_size, h], full || save_head)?)
        };
        // Seeds past every layer adapter's (l·8 + target < 8·L).
        let top_seed = |k: u64| {
            ad.seed
                .wrapping_mul(1_000_003)
                .wrapping_add((cfg.num_hidden_layers * 8) as u64 + k)
        };
        let (lm_head_lora, embed_lora) = match &ad.lora {
            Some(c) => (
                if c.lm_head {
                    Some(LoraAdapter::new(
                        cfg.vocab_size,
                        h,
                        c,
                        adapters,
                        device,
                        top_seed(0),
                    )?)
                } else {
                    None
                },
                if c.embed_tokens {
                    Some(LoraAdapter::embedding(
                        cfg.vocab_size,
                        h,
                        c,
                        adapters,
                        device,
                        top_seed(1),
                    )?)
                } else {
                    None
                },
            ),
            None => (None, None),
        };
        Ok(Decoder {
            cfg: cfg.clone(),
            dtype,
            compute,
            device: device.clone(),
            adaptation: ad.clone(),
            attention: Attention::default(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            lm_head_lora,
            embed_lora,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The weights' dtype (and the residual stream's).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype matrix products and attention run in (autocast's, or the weights').
    pub fn compute_dtype(&self) -> DType {
        self.compute
    }

    /// The device holding the parameters.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The adaptation the model was built with.
    pub fn adaptation(&self) -> &Adaptation {
        &self.adaptation
    }

    /// What attention keeps for backward (default [`Attention::Sdpa`]).
    pub fn attention(&self) -> Attention {
        self.attention
    }

    /// Sets what attention keeps for backward.
    pub fn set_attention(&mut self, a: Attention) {
        self.attention = a;
    }

    /// Trainable tensors with their names, in a fixed order: HF names for full fine-tuning
    /// ([`ModelConfig::param_shapes`] order), PEFT names for LoRA adapters (`lora_A` then
    /// `lora_B` of each adapted module, layer by layer).
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        fn param(out: &mut Vec<(String, Var)>, name: String, p: &Param) {
            if let Param::Trainable(v) = p {
                out.push((name, v.clone()));
            }
        }
        fn lin(out: &mut Vec<(String, Var)>, layer: &str, path: &str, l: &Linear) {
            if let Weight::Trainable(v) = &l.weight {
                out.push((format!("{layer}.{path}.weight"), v.clone()));
            }
            if let Some(Param::Trainable(v)) = &l.bias {
                out.push((format!("{layer}.{path}.bias"), v.clone()));
            }
            if let Some(a) = &l.lora {
                let base = format!("base_model.model.{layer}.{path}");
                out.push((format!("{base}.lora_A.weight"), a.a.clone()));
                out.push((format!("{base}.lora_B.weight"), a.b.clone()));
            }
        }
        let mut out = Vec::new();
        param(
            &mut out,
            "model.embed_tokens.weight".into(),
            &self.embed_tokens,
        );
        if let Some(a) = &self.embed_lora {
            // PEFT keeps an embedding adapter's tensors in ParameterDicts: no `.weight`.
            let base = "base_model.model.model.embed_tokens";
            out.push((format!("{base}.lora_embedding_A"), a.a.clone()));
            out.push((format!("{base}.lora_embedding_B"), a.b.clone()));
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            param(
                &mut out,
                format!("{p}.input_layernorm.weight"),
                &layer.input_layernorm,
            );
            let linears = layer.linears();
            for (path, l) in &linears[..4] {
                lin(&mut out, &p, path, l);
            }
            param(
                &mut out,
                format!("{p}.post_attention_layernorm.weight"),
                &layer.post_attention_layernorm,
            );
            for (path, l) in &linears[4..] {
                lin(&mut out, &p, path, l);
            }
            if let Mlp::Moe(m) = &layer.mlp {
                // Each expert's share of PEFT's `gate_up_proj` adapter (`save_trained` writes
                // them as PEFT's stacked tensors).
                for (e, x) in m.experts.iter().enumerate() {
                    if let Some(g) = &x.gate_up_lora {
                        let base = format!("base_model.model.{p}.mlp.experts.{e}");
                        out.push((format!("{base}.gate_up_proj.lora_A.weight"), g.a.clone()));
                        out.push((format!("{base}.gate_proj.lora_B.weight"), g.b_gate.clone()));
                        out.push((format!("{base}.up_proj.lora_B.weight"), g.b_up.clone()));
                    }
                }
            }
        }
        param(&mut out, "model.norm.weight".into(), &self.norm);
        if let Some(h) = &self.lm_head {
            param(&mut out, "lm_head.weight".into(), h);
        }
        if let Some(a) = &self.lm_head_lora {
            out.push(("base_model.model.lm_head.lora_A.weight".into(), a.a.clone()));
            out.push(("base_model.model.lm_head.lora_B.weight".into(), a.b.clone()));
        }
        out
    }

    /// Every stored tensor, in a fixed order (the embedding and norms, the final norm and the
    /// head, each layer's linear weights, the adapters, then a mixture of experts' adapter
    /// shares of `gate_up_proj`): its layer (`None` for the embedding, final
    /// norm and head), name, and whether it trains; `vars`-index order of trainables follows
    /// [`Decoder::trainable_vars`] through the names.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for an NF4 weight (stored packed, not as one tensor).
    pub fn stored_tensors(&self) -> Result<Vec<StoredTensor>> {
        let mut out = Vec::new();
        let mut param = |layer: Option<usize>, name: String, p: &Param| {
            out.push(StoredTensor {
                layer,
                name,
                tensor: p.tensor().clone(),
                trainable: p.var().is_some(),
            })
        };
        param(None, "model.embed_tokens.weight".into(), &self.embed_tokens);
        let mut adapters: Vec<(Option<usize>, String, &LoraAdapter)> = Vec::new();
        if let Some(a) = &self.embed_lora {
            adapters.push((
                None,
                "base_model.model.model.embed_tokens.lora_embedding".into(),
                a,
            ));
        }
        let mut linears: Vec<(usize, String, &Linear)> = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            param(
                Some(l),
                format!("{p}.input_layernorm.weight"),
                &layer.input_layernorm,
            );
            param(
                Some(l),
                format!("{p}.post_attention_layernorm.weight"),
                &layer.post_attention_layernorm,
            );
            for (path, lin) in layer.linears() {
                linears.push((l, format!("{p}.{path}"), lin));
            }
        }
        param(None, "model.norm.weight".into(), &self.norm);
        if let Some(h) = &self.lm_head {
            param(None, "lm_head.weight".into(), h);
        }
        if let Some(a) = &self.lm_head_lora {
            adapters.push((None, "base_model.model.lm_head".into(), a));
        }
        for (l, name, lin) in linears {
            let (tensor, trainable) = match &lin.weight {
                Weight::Trainable(v) => (v.as_tensor().clone(), true),
                Weight::Frozen(t) => (t.clone(), false),
                Weight::Nf4(_) => {
                    return Err(Error::invalid(
                        "weight",
                        &name,
                        "an NF4 weight is stored packed, not as one tensor",
                    ))
                }
            };
            out.push(StoredTensor {
                layer: Some(l),
                name: format!("{name}.weight"),
                tensor,
                trainable,
            });
            if let Some(b) = &lin.bias {
                out.push(StoredTensor {
                    layer: Some(l),
                    name: format!("{name}.bias"),
                    tensor: b.tensor().clone(),
                    trainable: b.var().is_some(),
                });
            }
            if let Some(a) = &lin.lora {
                adapters.push((Some(l), format!("base_model.model.{name}"), a));
            }
        }
        for (layer, name, a) in adapters {
            for (suffix, v) in [("lora_A", &a.a), ("lora_B", &a.b)] {
                out.push(StoredTensor {
                    layer,
                    name: format!("{name}.{suffix}"),
                    tensor: v.as_tensor().clone(),
                    trainable: true,
                });
            }
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let Mlp::Moe(m) = &layer.mlp else { continue };
            for (e, x) in m.experts.iter().enumerate() {
                let Some(g) = &x.gate_up_lora else { continue };
                let base = format!("base_model.model.model.layers.{l}.mlp.experts.{e}");
                for (name, v) in [
                    ("gate_up_proj.lora_A", &g.a),
                    ("gate_proj.lora_B", &g.b_gate),
                    ("up_proj.lora_B", &g.b_up),
                ] {
                    out.push(StoredTensor {
                        layer: Some(l),
                        name: format!("{base}.{name}"),
                        tensor: v.as_tensor().clone(),
                        trainable: true,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Total parameters, PEFT's way: base parameters (counted unquantized) plus adapters.
    pub fn param_count(&self) -> u64 {
        let adapters: u64 = self
            .adapters()
            .map(|a| (a.a.elem_count() + a.b.elem_count()) as u64)
            .sum::<u64>()
            + self
                .gate_up_adapters()
                .map(|g| g.elem_count() as u64)
                .sum::<u64>();
        let saved = self
            .adaptation
            .lora
            .as_ref()
            .map_or(0, |l| l.saved_param_count(&self.cfg));
        self.cfg.param_count() + adapters + saved
    }

    /// Parameters that receive gradients and optimizer states.
    pub fn trainable_count(&self) -> u64 {
        self.trainable_vars()
            .iter()
            .map(|(_, v)| v.elem_count() as u64)
            .sum()
    }

    /// PEFT's `print_trainable_parameters` line.
    pub fn trainable_summary(&self) -> String {
        let (t, a) = (self.trainable_count(), self.param_count());
        format!(
            "trainable params: {t} || all params: {a} || trainable%: {:.4}",
            100.0 * t as f64 / a as f64
        )
    }

    /// Every adapter on a linear module: the layers' (a mixture of experts' router and
    /// `down_proj` shares included), then `lm_head`'s and `embed_tokens`'; the experts'
    /// `gate_up_proj` shares are [`Decoder::gate_up_adapters`].
    fn adapters(&self) -> impl Iterator<Item = &LoraAdapter> {
        self.layers
            .iter()
            .flat_map(|l| {
                l.linears()
                    .into_iter()
                    .filter_map(|(_, lin)| lin.lora.as_ref())
            })
            .chain(self.lm_head_lora.as_ref())
            .chain(self.embed_lora.as_ref())
    }

    /// Each expert's share of PEFT's `gate_up_proj` adapter (`all-linear` on Mixtral), layer by
    /// layer.
    fn gate_up_adapters(&self) -> impl Iterator<Item = &moe::GateUpLora> {
        self.layers.iter().flat_map(|l| match &l.mlp {
            Mlp::Moe(m) => m
                .experts
                .iter()
                .filter_map(|x| x.gate_up_lora.as_ref())
                .collect::<Vec<_>>(),
            Mlp::Dense { .. } => Vec::new(),
        })
    }

    /// Bytes held by all parameters as stored (NF4 weights at their packed size).
    pub fn param_bytes(&self) -> u64 {
        let mut b = self.embed_tokens.bytes()
            + self.norm.bytes()
            + self.lm_head.as_ref().map_or(0, Param::bytes);
        for l in &self.layers {
            b += l.input_layernorm.bytes() + l.post_attention_layernorm.bytes();
            for (_, lin) in l.linears() {
                b += lin.weight_bytes() + lin.bias.as_ref().map_or(0, Param::bytes);
            }
        }
        for a in self.adapters() {
            b += ((a.a.elem_count() + a.b.elem_count()) * a.a.dtype().size_in_bytes()) as u64;
        }
        for g in self.gate_up_adapters() {
            b += (g.elem_count() * g.a.dtype().size_in_bytes()) as u64;
        }
        b
    }

    /// Forward pass without dropout: token ids `(batch, seq)` (u32) → logits
    /// `(batch, seq, vocab)` in the compute dtype (the model's, or autocast's).
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for an empty input; [`Error::Candle`] otherwise (e.g. ids
    /// outside the vocabulary).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.logits(&self.hidden(input_ids)?)
    }

    /// The last layer's output `(batch, seq, hidden)` without dropout.
    fn hidden(&self, input_ids: &Tensor) -> Result<Tensor> {
        let ctx = ForwardCtx {
            train: false,
            seed: 0,
        };
        let aux = self.aux(input_ids)?;
        let mut x = self.embed(input_ids)?;
        for (l, layer) in self.layers.iter().enumerate() {
            x = self.layer_forward(l, layer, &x, &aux, ctx)?;
        }
        Ok(x)
    }

    /// Mean next-token cross-entropy (nats) of `targets` given `input_ids` (both
    /// `(batch, seq)`), without dropout and without checkpointing.
    ///
    /// # Errors
    /// As [`Decoder::forward`].
    pub fn loss(&self, input_ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let ctx = ForwardCtx {
            train: false,
            seed: 0,
        };
        self.head_loss(&self.hidden(input_ids)?, targets, ctx)
    }

    /// Training forward pass: the loss, keeping for backward what `ckpt` allows (everything,
    /// or only every `K`-th layer's input). `ctx` decides dropout.
    ///
    /// # Errors
    /// As [`Decoder::forward`]; [`Error::InvalidValue`] for a checkpoint interval out of range.
    pub fn forward_train(
        &self,
        input_ids: &Tensor,
        targets: &Tensor,
        ckpt: Checkpointing,
        ctx: ForwardCtx,
    ) -> Result<TrainForward> {
        self.forward_train_with(input_ids, targets, ckpt, ctx, None)
    }

    /// [`Decoder::forward_train`], calling `hooks` around each checkpointed segment and around
    /// the embedding and the head ([`SegmentHooks::before_root`]).
    ///
    /// # Errors
    /// As [`Decoder::forward_train`]; [`Error::InvalidValue`] for hooks without checkpointing;
    /// the hooks' errors.
    pub fn forward_train_with(
        &self,
        input_ids: &Tensor,
        targets: &Tensor,
        ckpt: Checkpointing,
        ctx: ForwardCtx,
        mut hooks: Option<&mut dyn SegmentHooks>,
    ) -> Result<TrainForward> {
        ckpt.validate(self.layers.len())?;
        if hooks.is_some() && ckpt == Checkpointing::None {
            return Err(Error::invalid(
                "--checkpointing",
                "none",
                "segment hooks run around checkpointed segments",
            ));
        }
        let aux = self.aux(input_ids)?;
        let k = match ckpt {
            Checkpointing::None => {
                let mut x = self.embed(input_ids)?;
                for (l, layer) in self.layers.iter().enumerate() {
                    x = self.layer_forward(l, layer, &x, &aux, ctx)?;
                }
                let loss = self.head_loss(&x, targets, ctx)?;
                return Ok(TrainForward {
                    loss,
                    ctx,
                    input_ids: input_ids.clone(),
                    segments: vec![],
                    head_input: None,
                });
            }
            Checkpointing::Every(k) => k,
        };
        // Checkpointed: run each segment of k layers keeping only its input; the segment's
        // graph is dropped as soon as its output is detached.
        if let Some(h) = hooks.as_mut() {
            h.before_root(RootPart::Embedding, false)?;
        }
        let mut x = self.embed(input_ids)?.detach();
        if let Some(h) = hooks.as_mut() {
            h.after_root(RootPart::Embedding, None)?;
        }
        let mut segments = Vec::new();
        let mut first = 0;
        while first < self.layers.len() {
            let n = k.min(self.layers.len() - first);
            let input = x.clone();
            if let Some(h) = hooks.as_mut() {
                h.before(first, n, false)?;
            }
            for l in first..first + n {
                x = self.layer_forward(l, &self.layers[l], &x, &aux, ctx)?;
            }
            x = x.detach();
            if let Some(h) = hooks.as_mut() {
                h.after(first, n, None)?;
            }
            segments.push((first, n, input));
            first += n;
        }
        let head_input = Var::from_tensor(&x)?;
        drop(x);
        if let Some(h) = hooks.as_mut() {
            h.before_root(RootPart::Head, false)?;
        }
        let loss = self.head_loss(head_input.as_tensor(), targets, ctx)?;
        if let Some(h) = hooks.as_mut() {
            h.after_root(RootPart::Head, None)?;
        }
        Ok(TrainForward {
            loss,
            ctx,
            input_ids: input_ids.clone(),
            segments,
            head_input: Some(head_input),
        })
    }

    /// Backward pass: the gradients of [`Decoder::trainable_vars`], in that order, detached;
    /// candle's `GradStore` and the graph are dropped. Under checkpointing each segment is
    /// recomputed from its saved input and backpropagated through `sum(y · g)` with `g` the
    /// gradient of its output, chaining input gradients down to the embedding.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] if a trainable tensor received no gradient; [`Error::Candle`].
    pub fn backward(&self, f: TrainForward) -> Result<Vec<Tensor>> {
        let vars = self.trainable_vars();
        self.backward_with(f, None)?
            .into_iter()
            .zip(&vars)
            .map(|(g, (name, v))| match g {
                Some(g) => Ok(g),
                // An expert no token was routed to (or its adapter share): zeros, as
                // transformers 5's 3-D expert parameter gets them in its dense gradient
                // (`grouped_mm`), which AdamW then steps whole.
                None if name.contains(".mlp.experts.") => Ok(v.zeros_like()?),
                None => Err(Error::invalid(
                    "gradient",
                    name,
                    "trainable tensor received no gradient",
                )),
            })
            .collect()
    }

    /// [`Decoder::backward`], calling `hooks` around each checkpointed segment (which may take
    /// its gradients) and around the head's backward and the embedding's (when it trains);
    /// the gradients left, `None` where none arrived or a hook took it.
    ///
    /// # Errors
    /// As [`Decoder::backward`], without the check that every tensor got a gradient; the
    /// hooks' errors.
    pub fn backward_with(
        &self,
        f: TrainForward,
        mut hooks: Option<&mut dyn SegmentHooks>,
    ) -> Result<Vec<Option<Tensor>>> {
        let vars = self.trainable_vars();
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        fn collect(
            vars: &[(String, Var)],
            grads: &mut [Option<Tensor>],
            store: &candle_core::backprop::GradStore,
        ) -> Result<()> {
            for (i, (_, v)) in vars.iter().enumerate() {
                if let Some(g) = store.get(v) {
                    let g = g.detach();
                    grads[i] = Some(match grads[i].take() {
                        Some(acc) => (acc + g)?,
                        None => g,
                    });
                }
            }
            Ok(())
        }
        let TrainForward {
            loss,
            ctx,
            input_ids,
            segments,
            head_input,
        } = f;
        if head_input.is_some() {
            if let Some(h) = hooks.as_mut() {
                h.before_root(RootPart::Head, true)?;
            }
        }
        let store = loss.backward()?;
        drop(loss);
        collect(&vars, &mut grads, &store)?;
        if let Some(hv) = head_input {
            let mut g = store
                .get(&hv)
                .ok_or_else(|| {
                    Error::invalid(
                        "gradient",
                        "head input",
                        "no gradient reached the last layer",
                    )
                })?
                .detach();
            drop(store);
            drop(hv);
            if let Some(h) = hooks.as_mut() {
                h.after_root(RootPart::Head, Some(&mut grads))?;
            }
            let aux = self.aux(&input_ids)?;
            for (first, n, input) in segments.into_iter().rev() {
                if let Some(h) = hooks.as_mut() {
                    h.before(first, n, true)?;
                }
                // The segment's graph and GradStore are dropped at the end of this block.
                g = {
                    let xv = Var::from_tensor(&input)?;
                    drop(input);
                    let mut y = xv.as_tensor().clone();
                    for l in first..first + n {
                        y = self.layer_forward(l, &self.layers[l], &y, &aux, ctx)?;
                    }
                    let s = (y * &g)?.sum_all()?;
                    let st = s.backward()?;
                    drop(s);
                    collect(&vars, &mut grads, &st)?;
                    st.get(&xv)
                        .ok_or_else(|| {
                            Error::invalid(
                                "gradient",
                                format!("layer {first}"),
                                "no gradient reached the input",
                            )
                        })?
                        .detach()
                };
                if let Some(h) = hooks.as_mut() {
                    h.after(first, n, Some(&mut grads))?;
                }
            }
            if self.embedding_trains() {
                if let Some(h) = hooks.as_mut() {
                    h.before_root(RootPart::Embedding, true)?;
                }
                let e = self.embed(&input_ids)?;
                let st = (e * &g)?.sum_all()?.backward()?;
                collect(&vars, &mut grads, &st)?;
                drop(st);
                if let Some(h) = hooks.as_mut() {
                    h.after_root(RootPart::Embedding, Some(&mut grads))?;
                }
            }
        } else {
            drop(store);
        }
        Ok(grads)
    }

    /// Whether the embedding or its adapter trains (its backward runs at the end).
    pub fn embedding_trains(&self) -> bool {
        matches!(self.embed_tokens, Param::Trainable(_)) || self.embed_lora.is_some()
    }

    fn aux(&self, input_ids: &Tensor) -> Result<Aux> {
        let (b, s) = input_ids.dims2()?;
        if s == 0 || b == 0 {
            return Err(Error::invalid(
                "input shape",
                format!("({b}, {s})"),
                "batch and seq must be positive",
            ));
        }
        Ok(Aux {
            rope: Rope::new(&self.cfg, s, self.compute, &self.device)?,
            mask: causal_mask(s, self.cfg.sliding_window, &self.device)?
                .to_dtype(ops::compute_dtype(self.compute))?,
        })
    }

    /// `(batch, seq)` → `(batch, seq, hidden)`. A frozen embedding's output carries no graph.
    /// With an adapter, PEFT's LoRA `Embedding`: `E[id] + (alpha/r)·A[:, id]ᵀ·Bᵀ`, the product
    /// in the compute dtype and cast back.
    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let ids = input_ids.flatten_all()?;
        let h = self.cfg.hidden_size;
        let x = self.embed_tokens.tensor().index_select(&ids, 0)?; // (N, h)
        let x = match self.embed_tokens {
            Param::Trainable(_) => x,
            Param::Frozen(_) => x.detach(),
        };
        let x = match &self.embed_lora {
            None => x,
            Some(l) => {
                let ea = l.a.index_select(&ids, 1)?; // (r, N)
                let d = linear::cast(&ea.t()?, self.compute)?
                    .matmul(&linear::cast(&l.b, self.compute)?.t()?)?; // (N, h)
                (x + linear::cast(&(d * l.scale)?, self.dtype)?)?
            }
        };
        Ok(x.reshape((b, s, h))?)
    }

    /// Final norm, LM head and mean cross-entropy of `targets` `(b, s)` for hidden states
    /// `x` `(b, s, hidden)`, fused ([`ops::lm_head_cross_entropy`]): the logits are formed
    /// chunk by chunk and never kept.
    ///
    /// With an adapter on `lm_head` (PEFT's LoRA `Linear`): `u = (alpha/r)·dropout(x)·Aᵀ`
    /// `(N, r)` joins the normed states as `[x | u]` and the fused head adds `u·Bᵀ` to each
    /// chunk's logits ([`ops::lm_head_lora_cross_entropy`]).
    fn head_loss(&self, x: &Tensor, targets: &Tensor, ctx: ForwardCtx) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let x = ops::rms_norm(x, self.norm.tensor(), self.cfg.rms_norm_eps)?;
        let w = self.lm_head.as_ref().unwrap_or(&self.embed_tokens).tensor();
        // Under autocast the head's product runs in the compute dtype: both operands cast
        // (kept by the fused op as its inputs).
        let x = linear::cast(&x.reshape((b * s, h))?, self.compute)?;
        let w = linear::cast(w, self.compute)?;
        let targets = targets.flatten_all()?;
        let Some(l) = &self.lm_head_lora else {
            return ops::lm_head_cross_entropy(&x, &w, &targets);
        };
        let xd = if ctx.train && l.dropout > 0.0 {
            linear::dropout(
                &x,
                l.dropout,
                // Past every layer module's salt (l·8 + target < 8·L).
                ctx.seed
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add((self.layers.len() * 8) as u64),
            )?
        } else {
            x.clone()
        };
        let u = (linear(&xd, &linear::cast(&l.a, self.compute)?)? * l.scale)?; // (N, r)
        let xu = Tensor::cat(&[&x, &u], 1)?; // (N, h + r)
        ops::lm_head_lora_cross_entropy(&xu, &w, &linear::cast(&l.b, self.compute)?, &targets)
    }

    /// Final norm and LM head: `(b, s, hidden)` → logits `(b, s, vocab)`.
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let x = linear::cast(
            &ops::rms_norm(x, self.norm.tensor(), self.cfg.rms_norm_eps)?,
            self.compute,
        )?;
        let logits = match self.lm_head.as_ref().unwrap_or(&self.embed_tokens) {
            Param::Trainable(w) => linear(&x, &linear::cast(w, self.compute)?)?,
            Param::Frozen(w) => frozen_linear(
                &x,
                &FrozenRef::Dense(linear::cast(w, self.compute)?),
                self.cfg.vocab_size,
            )?,
        };
        match &self.lm_head_lora {
            None => Ok(logits),
            Some(l) => {
                let u = linear(&x, &linear::cast(&l.a, self.compute)?)?;
                let d = linear(&u, &linear::cast(&l.b, self.compute)?)?;
                Ok((logits + (d * l.scale)?)?)
            }
        }
    }

    fn layer_forward(
        &self,
        li: usize,
        l: &Layer,
        x: &Tensor,
        aux: &Aux,
        ctx: ForwardCtx,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let eps = cfg.rms_norm_eps;
        let salt = |t: Target| (li * 8 + t as usize) as u64;

        // --- attention block ---
        let xn = ops::rms_norm(x, l.input_layernorm.tensor(), eps)?; // (b, s, hidden)
                                                                     // (b, s, heads·hd) -> views (b, heads, s, hd); RoPE writes contiguous outputs.
        let q = l
            .q_proj
            .forward(&xn, ctx, salt(Target::QProj))?
            .reshape((b, s, nh, hd))?
            .transpose(1, 2)?;
        let k = l
            .k_proj
            .forward(&xn, ctx, salt(Target::KProj))?
            .reshape((b, s, nkv, hd))?
            .transpose(1, 2)?;
        let v = l
            .v_proj
            .forward(&xn, ctx, salt(Target::VProj))?
            .reshape((b, s, nkv, hd))?
            .transpose(1, 2)?; // (b, kv_heads, s, hd)
        let q = ops::rope(&q, &aux.rope.cos, &aux.rope.sin)?; // (b, heads, s, hd)
        let k = ops::rope(&k, &aux.rope.cos, &aux.rope.sin)?; // (b, kv_heads, s, hd)
        let scale = 1.0 / (hd as f64).sqrt();
        let eager = self.attention == Attention::Eager;
        let ctx_v = ops::attention(&q, &k, &v, &aux.mask, scale, eager)?; // (b, s, heads·hd)
                                                                          // Under autocast the projection's output is cast back to the residual stream's dtype
                                                                          // (a copy the add keeps; PyTorch's mixed-dtype add makes none).
        let o = l.o_proj.forward(&ctx_v, ctx, salt(Target::OProj))?;
        let x = (x + linear::cast(&o, x.dtype())?)?;

        // --- MLP block: SwiGLU, or a mixture of SwiGLU experts ---
        let xn = ops::rms_norm(&x, l.post_attention_layernorm.tensor(), eps)?;
        let y = match &l.mlp {
            Mlp::Dense {
                gate_proj,
                up_proj,
                down_proj,
            } => {
                let gate = gate_proj.forward(&xn, ctx, salt(Target::GateProj))?; // (b, s, i)
                let up = up_proj.forward(&xn, ctx, salt(Target::UpProj))?; // (b, s, i)
                down_proj.forward(&ops::swiglu(&gate, &up)?, ctx, salt(Target::DownProj))?
            }
            Mlp::Moe(m) => {
                let h = cfg.hidden_size;
                m.forward(&xn.reshape((b * s, h))?, ctx, salt(Target::GateProj))?
                    .reshape((b, s, h))?
            }
        }; // (b, s, hidden)
        Ok((&x + linear::cast(&y, x.dtype())?)?)
    }
}

/// Per-pass constants: RoPE tables and the attention mask.
struct Aux {
    rope: Rope,
    mask: Tensor,
}

/// Additive attention mask `(1, 1, seq, seq)`: 0 where query `i` may see key `j` (`j ≤ i`
/// and, with a sliding window `w`, `i − j < w`, as transformers' Mistral mask), −∞ elsewhere.
fn causal_mask(s: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; s * s];
    for i in 0..s {
        for j in 0..s {
            let visible = j <= i && window.is_none_or(|w| i - j < w);
            if !visible {
                m[i * s + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Tensor::from_vec(m, (1, 1, s, s), device)?)
}

/// Rotary position embedding tables (Su et al. 2021, RoFormer), in transformers' layout
/// (`rotate_half`, pairs `(i, i + head_dim/2)`).
struct Rope {
    cos: Tensor, // (1, 1, seq, head_dim)
    sin: Tensor, // (1, 1, seq, head_dim)
}

impl Rope {
    fn new(cfg: &ModelConfig, s: usize, dtype: DType, device: &Device) -> Result<Self> {
        let hd = cfg.head_dim();
        let half = hd / 2;
        let inv_freq = cfg.inv_freq(); // rope_scaling applied
        let mut cos = vec![0f64; s * hd];
        let mut sin = vec![0f64; s * hd];
        for p in 0..s {
            for i in 0..half {
                let inv_freq = inv_freq[i];
                // transformers computes the angles in f32.
                let a = (p as f32 * inv_freq as f32) as f64;
                for k in [i, i + half] {
                    cos[p * hd + k] = a.cos();
                    sin[p * hd + k] = a.sin();
                }
            }
        }
        let mk = |v: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (1, 1, s, hd), device)?.to_dtype(dtype)?)
        };
        Ok(Rope {
            cos: mk(cos)?,
            sin: mk(sin)?,
        })
    }
}

/// Mean cross-entropy (nats) of `logits` `(batch, seq, vocab)` against `targets`
/// `(batch, seq)` (u32), computed in f32 (f64 for f64 logits) with a stable log-softmax.
///
/// # Errors
/// [`Error::Candle`] on mismatched shapes or targets outside the vocabulary.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    let logits = logits
        .reshape((b * s, v))?
        .to_dtype(ops::compute_dtype(logits.dtype()))?;
    let max = logits.max_keepdim(1)?.detach();
    let shifted = logits.broadcast_sub(&max)?; // (b·s, vocab)
    let lse = shifted.exp()?.sum_keepdim(1)?.log()?; // (b·s, 1)
    let picked = shifted.gather(&targets.reshape((b * s, 1))?.contiguous()?, 1)?; // (b·s, 1)
    Ok((lse - picked)?.mean_all()?)
}
