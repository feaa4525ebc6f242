//! The trainable Mistral/Llama-style decoder.
//!
//! Layout and names follow transformers' `modeling_mistral.py` / `modeling_llama.py` so that
//! weights map by path (`model.layers.0.self_attn.q_proj.weight`). Everything is built from
//! candle operations that have a backward pass: candle 0.11's fused `softmax_last_dim`,
//! `rms_norm` and `rotary_emb::rope` silently detach (no gradient), so they are not used here.
//! `tests/gradients.rs` checks every parameter against finite differences.

pub mod gguf;
pub mod weights;

use candle_core::{DType, Device, Module, Tensor, Var, D};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
pub use weights::{WeightSource, WeightsSpec};

/// One decoder layer's parameters (HF names).
#[derive(Debug)]
pub struct Layer {
    /// RMSNorm before attention, `(hidden,)`.
    pub input_layernorm: Var,
    /// Query projection, `(heads·head_dim, hidden)`.
    pub q_proj: Var,
    /// Key projection, `(kv_heads·head_dim, hidden)`.
    pub k_proj: Var,
    /// Value projection, `(kv_heads·head_dim, hidden)`.
    pub v_proj: Var,
    /// Output projection, `(hidden, heads·head_dim)`.
    pub o_proj: Var,
    /// RMSNorm before the MLP, `(hidden,)`.
    pub post_attention_layernorm: Var,
    /// SwiGLU gate, `(intermediate, hidden)`.
    pub gate_proj: Var,
    /// SwiGLU up, `(intermediate, hidden)`.
    pub up_proj: Var,
    /// SwiGLU down, `(hidden, intermediate)`.
    pub down_proj: Var,
}

/// The decoder: embedding, `L` layers, final norm, LM head (tied or not).
#[derive(Debug)]
pub struct Decoder {
    cfg: ModelConfig,
    dtype: DType,
    device: Device,
    /// Token embedding `model.embed_tokens.weight`, `(vocab, hidden)`.
    pub embed_tokens: Var,
    /// Decoder layers `model.layers.N`.
    pub layers: Vec<Layer>,
    /// Final RMSNorm `model.norm.weight`, `(hidden,)`.
    pub norm: Var,
    /// Untied LM head `lm_head.weight`, `(vocab, hidden)`; `None` when tied to the embedding.
    pub lm_head: Option<Var>,
}

/// A parameter path prefix, in the style of candle's `VarBuilder::pp`.
struct Path<'a> {
    prefix: String,
    src: &'a mut dyn WeightSource,
    dtype: DType,
    device: &'a Device,
}

impl<'a> Path<'a> {
    fn pp(&mut self, name: &str) -> Path<'_> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Path {
            prefix,
            src: &mut *self.src,
            dtype: self.dtype,
            device: self.device,
        }
    }

    fn var(&mut self, shape: &[usize]) -> Result<Var> {
        let name = format!("{}.weight", self.prefix);
        let t = self.src.tensor(&name, shape, self.dtype, self.device)?;
        Ok(Var::from_tensor(&t)?)
    }
}

impl Decoder {
    /// Builds the decoder, taking every parameter from `src` in the order of
    /// [`ModelConfig::param_shapes`].
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
        let h = cfg.hidden_size;
        let q = cfg.num_attention_heads * cfg.head_dim();
        let kv = cfg.kv_heads() * cfg.head_dim();
        let i = cfg.intermediate_size;
        let mut root = Path {
            prefix: String::new(),
            src,
            dtype,
            device,
        };
        let mut model = root.pp("model");
        let embed_tokens = model.pp("embed_tokens").var(&[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let mut lp = model.pp(&format!("layers.{l}"));
            let input_layernorm = lp.pp("input_layernorm").var(&[h])?;
            let mut attn = lp.pp("self_attn");
            let q_proj = attn.pp("q_proj").var(&[q, h])?;
            let k_proj = attn.pp("k_proj").var(&[kv, h])?;
            let v_proj = attn.pp("v_proj").var(&[kv, h])?;
            let o_proj = attn.pp("o_proj").var(&[h, q])?;
            let post_attention_layernorm = lp.pp("post_attention_layernorm").var(&[h])?;
            let mut mlp = lp.pp("mlp");
            let gate_proj = mlp.pp("gate_proj").var(&[i, h])?;
            let up_proj = mlp.pp("up_proj").var(&[i, h])?;
            let down_proj = mlp.pp("down_proj").var(&[h, i])?;
            layers.push(Layer {
                input_layernorm,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                post_attention_layernorm,
                gate_proj,
                up_proj,
                down_proj,
            });
        }
        let norm = model.pp("norm").var(&[h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(root.pp("lm_head").var(&[cfg.vocab_size, h])?)
        };
        Ok(Decoder {
            cfg: cfg.clone(),
            dtype,
            device: device.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Weight and compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device holding the parameters.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// All trainable parameters with their HF names, in [`ModelConfig::param_shapes`] order.
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed_tokens)];
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                &layer.input_layernorm,
            ));
            out.push((format!("{p}.self_attn.q_proj.weight"), &layer.q_proj));
            out.push((format!("{p}.self_attn.k_proj.weight"), &layer.k_proj));
            out.push((format!("{p}.self_attn.v_proj.weight"), &layer.v_proj));
            out.push((format!("{p}.self_attn.o_proj.weight"), &layer.o_proj));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                &layer.post_attention_layernorm,
            ));
            out.push((format!("{p}.mlp.gate_proj.weight"), &layer.gate_proj));
            out.push((format!("{p}.mlp.up_proj.weight"), &layer.up_proj));
            out.push((format!("{p}.mlp.down_proj.weight"), &layer.down_proj));
        }
        out.push(("model.norm.weight".to_string(), &self.norm));
        if let Some(w) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), w));
        }
        out
    }

    /// Bytes held by the parameters (elements × dtype size).
    pub fn param_bytes(&self) -> u64 {
        self.named_vars()
            .iter()
            .map(|(_, v)| (v.elem_count() * v.dtype().size_in_bytes()) as u64)
            .sum()
    }

    /// Forward pass: token ids `(batch, seq)` (u32) to logits `(batch, seq, vocab)` in the
    /// model dtype.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for a sequence of length 0; [`Error::Candle`] otherwise (e.g.
    /// token ids outside the vocabulary).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        if s == 0 || b == 0 {
            return Err(Error::invalid(
                "input shape",
                format!("({b}, {s})"),
                "batch and seq must be positive",
            ));
        }
        let h = self.cfg.hidden_size;
        let rope = Rope::new(&self.cfg, s, self.dtype, &self.device)?;
        let mask = causal_mask(s, self.cfg.sliding_window, &self.device)?
            .to_dtype(softmax_dtype(self.dtype))?;
        // (batch·seq,) -> (batch·seq, hidden) -> (batch, seq, hidden)
        let mut x = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, s, h))?;
        for layer in &self.layers {
            x = self.layer_forward(layer, &x, &rope, &mask)?;
        }
        let x = rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        // (batch·seq, hidden) x (hidden, vocab) -> (batch, seq, vocab)
        let logits = linear(&x, head)?;
        Ok(logits)
    }

    /// Mean next-token cross-entropy (nats) of `targets` `(batch, seq)` given `input_ids`
    /// `(batch, seq)`: the forward pass plus [`cross_entropy`]. Returns a scalar in f32 (f64
    /// for an f64 model).
    ///
    /// # Errors
    /// As [`Decoder::forward`]; [`Error::Candle`] on mismatched shapes.
    pub fn loss(&self, input_ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let logits = self.forward(input_ids)?;
        cross_entropy(&logits, targets)
    }

    fn layer_forward(&self, l: &Layer, x: &Tensor, rope: &Rope, mask: &Tensor) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let eps = cfg.rms_norm_eps;

        // --- attention block ---
        let xn = rms_norm(x, &l.input_layernorm, eps)?; // (b, s, hidden)
                                                        // (b, s, heads·hd) -> (b, heads, s, hd)
        let q = linear(&xn, &l.q_proj)?
            .reshape((b, s, nh, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = linear(&xn, &l.k_proj)?
            .reshape((b, s, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = linear(&xn, &l.v_proj)?
            .reshape((b, s, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = rope.apply(&q)?; // (b, heads, s, hd)
        let k = rope.apply(&k)?; // (b, kv_heads, s, hd)
                                 // Grouped-query attention without repeating K/V: the `rep` query heads that share a
                                 // K/V head are stacked along the row axis, (b, kv_heads, rep·s, hd).
        let rep = nh / nkv;
        let qg = q.reshape((b, nkv, rep * s, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        // (b, kv_heads, rep·s, s) -> (b, heads, s, s)
        let scores = (qg.matmul(&k.t()?)? * scale)?.reshape((b, nh, s, s))?;
        let scores = scores
            .to_dtype(softmax_dtype(self.dtype))?
            .broadcast_add(mask)?;
        let probs = softmax_last_dim(&scores)?.to_dtype(self.dtype)?; // (b, heads, s, s)
                                                                      // (b, kv_heads, rep·s, s) x (b, kv_heads, s, hd) -> (b, heads, s, hd)
        let ctx = probs
            .reshape((b, nkv, rep * s, s))?
            .matmul(&v)?
            .reshape((b, nh, s, hd))?;
        let ctx = ctx.transpose(1, 2)?.reshape((b, s, nh * hd))?; // (b, s, heads·hd)
        let x = (x + linear(&ctx, &l.o_proj)?)?;

        // --- SwiGLU MLP block ---
        let xn = rms_norm(&x, &l.post_attention_layernorm, eps)?;
        let gate = linear(&xn, &l.gate_proj)?.silu()?; // (b, s, intermediate)
        let up = linear(&xn, &l.up_proj)?; // (b, s, intermediate)
        let y = linear(&(gate * up)?, &l.down_proj)?; // (b, s, hidden)
        Ok((x + y)?)
    }
}

/// Dtype used for softmax, RMSNorm statistics and the loss: f32 for half types (as
/// transformers upcasts), the model dtype otherwise.
fn softmax_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// `x · Wᵀ` for `x` `(…, in)` and `W` `(out, in)` → `(…, out)`.
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (out, inp) = w.dims2()?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, inp))?.matmul(&w.t()?)?;
    let mut shape = dims[..dims.len() - 1].to_vec();
    shape.push(out);
    Ok(y.reshape(shape)?)
}

/// RMSNorm (Zhang & Sennrich 2019; transformers' `LlamaRMSNorm`): statistics in f32,
/// `w · x / sqrt(mean(x²) + eps)`. `x` `(…, hidden)`, `w` `(hidden,)`.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(softmax_dtype(dt))?;
    let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?; // (…, 1)
    let y = xf.broadcast_mul(&inv)?.to_dtype(dt)?;
    Ok(y.broadcast_mul(w)?)
}

/// Softmax over the last axis, composed of differentiable ops. The row maximum is detached
/// (subtracting a constant does not change the result or its gradient).
fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

/// Additive attention mask `(1, 1, seq, seq)` in f32/f64-compatible form: 0 where query `i`
/// may see key `j` (`j ≤ i` and, with a sliding window `w`, `i − j < w`, as transformers'
/// Mistral mask), −∞ elsewhere.
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
        let mut cos = vec![0f64; s * hd];
        let mut sin = vec![0f64; s * hd];
        for p in 0..s {
            for i in 0..half {
                let inv_freq = 1.0 / cfg.rope_theta.powf((2 * i) as f64 / hd as f64);
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

    /// `x` `(b, heads, s, hd)` → `x·cos + rotate_half(x)·sin`.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let hd = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
        let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(&self.cos)? + rot.broadcast_mul(&self.sin)?)?)
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
        .to_dtype(softmax_dtype(logits.dtype()))?;
    let max = logits.max_keepdim(1)?.detach();
    let shifted = logits.broadcast_sub(&max)?; // (b·s, vocab)
    let lse = shifted.exp()?.sum_keepdim(1)?.log()?; // (b·s, 1)
    let picked = shifted.gather(&targets.reshape((b * s, 1))?.contiguous()?, 1)?; // (b·s, 1)
    Ok((lse - picked)?.mean_all()?)
}

/// Plain forward without a graph, for comparisons: same as [`Decoder::forward`] but usable
/// as a candle [`Module`].
impl Module for Decoder {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        Decoder::forward(self, xs).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}
