//! Model configuration: Hugging Face `config.json` for Mistral/Llama decoders, built-in
//! presets with their sources, and exact parameter counting.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Architectures vramcal reads from `config.json` (its `architectures` field). Its decoder and
/// estimator implement the first three; `MixtralForCausalLM` is read, checked and counted, and
/// refused by [`crate::spec::TrainSpec::validate`] until its experts are modelled.
pub const SUPPORTED_ARCHITECTURES: [&str; 4] = [
    "MistralForCausalLM",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "MixtralForCausalLM",
];

fn default_rope_theta() -> f64 {
    10_000.0
}

/// A Mistral/Llama/Qwen2-style decoder configuration, field names as in Hugging Face
/// `config.json` (transformers' `MistralConfig` / `LlamaConfig` / `Qwen2Config`). Qwen2 is
/// Llama's layout with biases on `q_proj`, `k_proj` and `v_proj` (`modeling_qwen2.py`,
/// `Qwen2Attention`), implied by its architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Model classes, e.g. `["MistralForCausalLM"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Width of the residual stream (`hidden`).
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP (`gate_proj`/`up_proj` outputs).
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); defaults to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Vocabulary size (rows of `embed_tokens`).
    pub vocab_size: usize,
    /// Epsilon inside RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Longest context the model was trained for (tokens).
    pub max_position_embeddings: usize,
    /// Mistral's sliding attention window (tokens), if any.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// RoPE scaling as in config.json: `{"rope_type": "llama3", …}` (Llama 3.1 and later) or
    /// `{"rope_type": "linear", "factor": F}`, applied to the RoPE frequencies
    /// ([`ModelConfig::inv_freq`]); other kinds are refused by [`ModelConfig::validate`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// Llama's `attention_bias`: biases on `q_proj`, `k_proj`, `v_proj` and `o_proj`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attention_bias: bool,
    /// Llama's `mlp_bias` (biases on the MLP's projections): no released model of these
    /// architectures sets it, and vramcal refuses it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mlp_bias: bool,
    /// Mixtral's experts per layer (`num_local_experts`, `MixtralConfig`); `None` for a dense
    /// MLP. Only `MixtralForCausalLM` has experts ([`ModelConfig::moe`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_local_experts: Option<usize>,
    /// Mixtral's experts each token is routed to (`num_experts_per_tok`, the router's top-k).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts_per_tok: Option<usize>,
}

/// A sparse mixture-of-experts MLP (Mixtral's `MixtralSparseMoeBlock`, transformers 5
/// `modeling_mixtral.py`): a router `mlp.gate` `(E, h)` picks the top `k` of `E` SwiGLU experts
/// per token, whose weights are kept as two 3-D tensors, `mlp.experts.gate_up_proj`
/// `(E, 2·i, h)` and `mlp.experts.down_proj` `(E, h, i)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moe {
    /// Experts per layer, `E`.
    pub experts: usize,
    /// Experts per token, `k`.
    pub top_k: usize,
}

/// RoPE frequency scaling ([`ModelConfig::rope_scaling`]), as transformers'
/// `modeling_rope_utils.py` computes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Every frequency divided by `factor` (`_compute_linear_scaling_rope_parameters`).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's (`_compute_llama3_parameters`): wavelengths above
    /// `original_max_position_embeddings / low_freq_factor` divided by `factor`, below
    /// `… / high_freq_factor` kept, and interpolated between.
    Llama3 {
        /// The divisor of the low frequencies.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings` (tokens).
        original_max_position_embeddings: f64,
    },
}

/// One trainable tensor of the decoder: its Hugging Face name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamShape {
    /// HF path, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Shape, e.g. `[out_features, in_features]` for a linear weight.
    pub shape: Vec<usize>,
}

impl ParamShape {
    /// Number of elements (u64: a vocabulary × hidden table passes 2^32 in 32-bit builds).
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// The most decoder layers a config may have. The largest public decoders have about 130
/// (Llama 3.1 405B: 126); the per-tensor parameter list ([`ModelConfig::param_shapes`]) is
/// built for every layer, so a config with millions would exhaust memory before any size check.
pub const MAX_LAYERS: usize = 4096;

impl ModelConfig {
    /// Key/value heads, resolving the default.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Whether `q_proj`, `k_proj` and `v_proj` have biases: Qwen2's architecture (always), or
    /// Llama's `attention_bias`.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || self.architectures.iter().any(|a| a == "Qwen2ForCausalLM")
    }

    /// Whether `o_proj` has a bias (Llama's `attention_bias`; never Qwen2's, whose
    /// `Qwen2Attention` ignores the key).
    pub fn o_bias(&self) -> bool {
        self.attention_bias && !self.architectures.iter().any(|a| a == "Qwen2ForCausalLM")
    }

    /// The mixture of experts of a `MixtralForCausalLM` config; `None` for the dense
    /// architectures (whose `num_local_experts` [`ModelConfig::validate`] refuses).
    pub fn moe(&self) -> Option<Moe> {
        if !self.architectures.iter().any(|a| a == "MixtralForCausalLM") {
            return None;
        }
        Some(Moe {
            experts: self.num_local_experts.unwrap_or(0),
            top_k: self.num_experts_per_tok.unwrap_or(0),
        })
    }

    /// The RoPE scaling of `rope_scaling`, if any.
    ///
    /// # Errors
    /// A description of what is wrong: a kind other than `linear` or `llama3` (`default` is
    /// none), a missing or non-positive number.
    pub fn rope_scaling_kind(&self) -> std::result::Result<Option<RopeScaling>, String> {
        let Some(v) = &self.rope_scaling else {
            return Ok(None);
        };
        if v.is_null() {
            return Ok(None);
        }
        let kind = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(|k| k.as_str())
            .ok_or("rope_scaling has no rope_type")?;
        let num = |k: &str| -> std::result::Result<f64, String> {
            v.get(k)
                .and_then(serde_json::Value::as_f64)
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or(format!("rope_scaling.{k} must be a positive number"))
        };
        match kind {
            "default" => Ok(None),
            "linear" => Ok(Some(RopeScaling::Linear {
                factor: num("factor")?,
            })),
            "llama3" => {
                let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
                if high <= low {
                    return Err(format!(
                        "rope_scaling.high_freq_factor = {high} must exceed low_freq_factor = {low}"
                    ));
                }
                Ok(Some(RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                }))
            }
            other => Err(format!(
                "rope_scaling type {other:?} is not modelled (vramcal applies linear and llama3)"
            )),
        }
    }

    /// The RoPE inverse frequencies `θ^(−2i/head_dim)` for `i` in `0..head_dim/2`, scaled as
    /// `rope_scaling` says (transformers `modeling_rope_utils.py`, `_compute_default_rope_parameters`,
    /// `_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`). A `rope_scaling`
    /// that [`ModelConfig::validate`] refuses is ignored here.
    pub fn inv_freq(&self) -> Vec<f64> {
        let hd = self.head_dim();
        let base: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / hd as f64))
            .collect();
        match self.rope_scaling_kind().ok().flatten() {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            }) => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// Per-head width, resolving the default.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Checks sizes: all positive, at most [`MAX_LAYERS`] layers, heads divisible by key/value
    /// heads, even head width (RoPE), and a parameter count that fits in `u64`.
    ///
    /// # Errors
    /// [`Error::Config`] naming `path` and the offending field.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Error::Config {
            path: path.to_path_buf(),
            reason,
        };
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(bad(format!("{name} must be positive, got 0")));
            }
        }
        if self.num_hidden_layers > MAX_LAYERS {
            return Err(bad(format!(
                "num_hidden_layers = {} is beyond what vramcal models (at most {MAX_LAYERS}; the \
                 largest public decoders have about 130)",
                self.num_hidden_layers
            )));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(bad(format!(
                "num_attention_heads = {} is not a multiple of num_key_value_heads = {}",
                self.num_attention_heads,
                self.kv_heads()
            )));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(bad(format!(
                "hidden_size = {} is not a multiple of num_attention_heads = {} (and no head_dim given)",
                self.hidden_size, self.num_attention_heads
            )));
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim = {hd} must be positive and even (RoPE rotates pairs)"
            )));
        }
        if self.sliding_window == Some(0) {
            return Err(bad("sliding_window must be positive when present".into()));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(bad(format!(
                "rms_norm_eps = {} must be positive",
                self.rms_norm_eps
            )));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(bad(format!(
                "rope_theta = {} must be positive",
                self.rope_theta
            )));
        }
        match self.moe() {
            Some(Moe { experts, top_k }) => {
                if self.num_local_experts.is_none() || self.num_experts_per_tok.is_none() {
                    return Err(bad(
                        "MixtralForCausalLM needs num_local_experts and num_experts_per_tok".into(),
                    ));
                }
                if experts == 0 {
                    return Err(bad("num_local_experts must be positive, got 0".into()));
                }
                if top_k == 0 || top_k > experts {
                    return Err(bad(format!(
                        "num_experts_per_tok = {top_k} must be between 1 and num_local_experts = {experts}"
                    )));
                }
            }
            None => {
                if self.num_local_experts.is_some() || self.num_experts_per_tok.is_some() {
                    return Err(bad(format!(
                        "num_local_experts/num_experts_per_tok are read only for MixtralForCausalLM, not {:?}",
                        self.architectures
                    )));
                }
            }
        }
        if self.mlp_bias {
            return Err(bad(
                "mlp_bias = true is not modelled (no released Llama, Mistral or Qwen2 model sets it)"
                    .into(),
            ));
        }
        self.rope_scaling_kind().map_err(bad)?;
        if self.checked_param_count().is_none() {
            return Err(bad(
                "sizes are so large that the parameter count overflows".into()
            ));
        }
        Ok(())
    }

    /// Every trainable tensor with its HF name and shape, in load order.
    ///
    /// This list is the single source of truth for the model's parameters: the decoder is built
    /// from it and [`ModelConfig::param_count`] sums it.
    pub fn param_shapes(&self) -> Vec<ParamShape> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim();
        let kv = self.kv_heads() * self.head_dim();
        let i = self.intermediate_size;
        let p = |name: String, shape: Vec<usize>| ParamShape { name, shape };
        let mut out = vec![p(
            "model.embed_tokens.weight".into(),
            vec![self.vocab_size, h],
        )];
        for l in 0..self.num_hidden_layers {
            let pre = format!("model.layers.{l}");
            out.push(p(format!("{pre}.input_layernorm.weight"), vec![h]));
            for (m, o, i) in [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h)] {
                out.push(p(format!("{pre}.self_attn.{m}.weight"), vec![o, i]));
                if self.qkv_bias() {
                    out.push(p(format!("{pre}.self_attn.{m}.bias"), vec![o]));
                }
            }
            out.push(p(format!("{pre}.self_attn.o_proj.weight"), vec![h, q]));
            if self.o_bias() {
                out.push(p(format!("{pre}.self_attn.o_proj.bias"), vec![h]));
            }
            out.push(p(format!("{pre}.post_attention_layernorm.weight"), vec![h]));
            match self.moe() {
                // transformers 5's names (`MixtralTopKRouter`, `MixtralExperts`).
                Some(Moe { experts: e, .. }) => {
                    out.push(p(format!("{pre}.mlp.gate.weight"), vec![e, h]));
                    out.push(p(
                        format!("{pre}.mlp.experts.gate_up_proj"),
                        vec![e, 2 * i, h],
                    ));
                    out.push(p(format!("{pre}.mlp.experts.down_proj"), vec![e, h, i]));
                }
                None => {
                    out.push(p(format!("{pre}.mlp.gate_proj.weight"), vec![i, h]));
                    out.push(p(format!("{pre}.mlp.up_proj.weight"), vec![i, h]));
                    out.push(p(format!("{pre}.mlp.down_proj.weight"), vec![h, i]));
                }
            }
        }
        out.push(p("model.norm.weight".into(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(p("lm_head.weight".into(), vec![self.vocab_size, h]));
        }
        out
    }

    /// Closed-form parameter count, or `None` on overflow:
    /// `V·h (embed) + L·(h·q + 2·h·kv + q·h + 3·h·i + 2·h + biases) + h + (untied ? V·h : 0)`,
    /// with Mixtral's `E·3·h·i + E·h` (experts and router) in place of `3·h·i`,
    /// biases `q + 2·kv` with q/k/v biases (Qwen2) and `h` more with `o_proj`'s
    /// with `q = heads·head_dim`, `kv = kv_heads·head_dim` (the shapes of transformers'
    /// `modeling_mistral.py` / `modeling_llama.py`).
    pub fn checked_param_count(&self) -> Option<u64> {
        let h = self.hidden_size as u64;
        let hd = self.head_dim() as u64;
        let q = (self.num_attention_heads as u64).checked_mul(hd)?;
        let kv = (self.kv_heads() as u64).checked_mul(hd)?;
        let i = self.intermediate_size as u64;
        let v = self.vocab_size as u64;
        let embed = v.checked_mul(h)?;
        let attn = h
            .checked_mul(q)?
            .checked_mul(2)?
            .checked_add(h.checked_mul(kv)?.checked_mul(2)?)?;
        let mlp = h.checked_mul(i)?.checked_mul(3)?;
        // Mixtral: E experts of the same SwiGLU and the router's (E, h).
        let mlp = match self.moe() {
            Some(Moe { experts, .. }) => {
                let e = experts as u64;
                mlp.checked_mul(e)?.checked_add(e.checked_mul(h)?)?
            }
            None => mlp,
        };
        let biases = if self.qkv_bias() {
            q.checked_add(kv.checked_mul(2)?)?
        } else {
            0
        } + if self.o_bias() { h } else { 0 };
        let layer = attn
            .checked_add(mlp)?
            .checked_add(h.checked_mul(2)?)?
            .checked_add(biases)?;
        let layers = layer.checked_mul(self.num_hidden_layers as u64)?;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed.checked_add(layers)?.checked_add(h)?.checked_add(head)
    }

    /// Total parameter count (see [`ModelConfig::checked_param_count`]); saturates on overflow,
    /// which [`ModelConfig::validate`] rules out.
    ///
    /// ```
    /// let mistral = vramcal::config::preset("mistral-7b-v0.1").unwrap().config;
    /// assert_eq!(mistral.param_count(), 7_241_732_096);
    /// ```
    pub fn param_count(&self) -> u64 {
        self.checked_param_count().unwrap_or(u64::MAX)
    }

    /// Parses a `config.json` file.
    ///
    /// # Errors
    /// [`Error::Io`] if unreadable, [`Error::Config`] if it is not JSON or lacks a field or has
    /// a bad size, [`Error::UnknownArchitecture`] if `architectures` names no supported class.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = crate::input::read_text_capped(path)?;
        Self::from_json_str(&text, path)
    }

    /// Parses `config.json` text; `path` is used in error messages.
    ///
    /// # Errors
    /// As [`ModelConfig::from_json_file`], except I/O.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        // Another architecture is named as such before its fields are read (a BERT config
        // lacks fields a decoder's has: that is not what is wrong with it).
        if let Some(found) = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v.get("architectures").cloned())
            .and_then(|a| serde_json::from_value::<Vec<String>>(a).ok())
            .filter(|a| {
                !a.is_empty()
                    && !a
                        .iter()
                        .any(|x| SUPPORTED_ARCHITECTURES.contains(&x.as_str()))
            })
        {
            return Err(Error::UnknownArchitecture {
                path: path.to_path_buf(),
                found,
            });
        }
        let mut cfg: ModelConfig = serde_json::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        // Qwen2's configs carry a `sliding_window` that applies only with `use_sliding_window`
        // (false by default and in every released Qwen2/2.5 model: `Qwen2Config`,
        // `modeling_qwen2.py`); where it is true, only the layers from `max_window_layers` on
        // slide, which vramcal does not model.
        let raw: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
        let bad = |reason: String| Error::Config {
            path: path.to_path_buf(),
            reason,
        };
        let use_window =
            match raw.get("use_sliding_window") {
                None | Some(serde_json::Value::Null) => None,
                Some(v) => Some(v.as_bool().ok_or_else(|| {
                    bad(format!("use_sliding_window = {v} must be true or false"))
                })?),
            };
        // Without `architectures`, transformers goes by `model_type`.
        if cfg.architectures.is_empty() {
            match raw.get("model_type").and_then(serde_json::Value::as_str) {
                None => {}
                Some("llama") => cfg.architectures = vec!["LlamaForCausalLM".into()],
                Some("mistral") => cfg.architectures = vec!["MistralForCausalLM".into()],
                Some("qwen2") => cfg.architectures = vec!["Qwen2ForCausalLM".into()],
                Some("mixtral") => cfg.architectures = vec!["MixtralForCausalLM".into()],
                Some(other) => {
                    return Err(Error::UnknownArchitecture {
                        path: path.to_path_buf(),
                        found: vec![format!("model_type {other}")],
                    })
                }
            }
        }
        // Mixtral's load-balancing loss keeps every layer's router logits and adds an
        // auxiliary loss; its router jitter multiplies the hidden states by noise in training.
        // Neither is modelled; both are off in the released configs.
        match raw.get("output_router_logits") {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => {}
            Some(serde_json::Value::Bool(true)) => {
                return Err(bad(
                    "output_router_logits = true (Mixtral's load-balancing loss) is not modelled; the released configs set it false".into(),
                ))
            }
            Some(v) => {
                return Err(bad(format!(
                    "output_router_logits = {v} must be true or false"
                )))
            }
        }
        if let Some(j) = raw.get("router_jitter_noise").filter(|v| !v.is_null()) {
            if j.as_f64() != Some(0.0) {
                return Err(bad(format!(
                    "router_jitter_noise = {j} is not modelled (0 in the released Mixtral configs)"
                )));
            }
        }
        if cfg.architectures.iter().any(|a| a == "Qwen2ForCausalLM") {
            if use_window == Some(true) {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    reason: "use_sliding_window = true is not modelled (Qwen2 slides only the layers from max_window_layers on)".into(),
                });
            }
            cfg.sliding_window = None;
        } else if use_window == Some(false) {
            cfg.sliding_window = None;
        }
        if !cfg.architectures.is_empty()
            && !cfg
                .architectures
                .iter()
                .any(|a| SUPPORTED_ARCHITECTURES.contains(&a.as_str()))
        {
            return Err(Error::UnknownArchitecture {
                path: path.to_path_buf(),
                found: cfg.architectures.clone(),
            });
        }
        cfg.validate(path)?;
        Ok(cfg)
    }
}

/// A built-in model configuration and where it was copied from.
#[derive(Debug, Clone)]
pub struct Preset {
    /// Short name used on the command line, e.g. `smollm2-135m`.
    pub name: &'static str,
    /// Hugging Face model id whose `config.json` the preset copies.
    pub hf_id: &'static str,
    /// Where the values come from.
    pub source: &'static str,
    /// The configuration.
    pub config: ModelConfig,
}

/// All built-in presets, smallest test config last.
///
/// Each configuration is a struct literal with the field names of Hugging Face `config.json`,
/// so that it reads line by line against the file named in the comment above it (and in
/// `source`). `head_dim: None` means `hidden_size / num_attention_heads`.
pub fn presets() -> Vec<Preset> {
    vec![
        Preset {
            name: "mistral-7b-v0.1",
            hf_id: "mistralai/Mistral-7B-v0.1",
            source: "huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json",
            // mistralai/Mistral-7B-v0.1 config.json
            config: ModelConfig {
                architectures: vec!["MistralForCausalLM".into()],
                hidden_size: 4096,
                intermediate_size: 14336,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                num_key_value_heads: Some(8),
                head_dim: None,
                vocab_size: 32000,
                rms_norm_eps: 1e-5,
                rope_theta: 10000.0,
                max_position_embeddings: 32768,
                sliding_window: Some(4096),
                tie_word_embeddings: false,
                rope_scaling: None,
                attention_bias: false,
                mlp_bias: false,
                num_local_experts: None,
                num_experts_per_tok: None,
            },
        },
        Preset {
            name: "llama-2-7b",
            hf_id: "meta-llama/Llama-2-7b-hf",
            source: "huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json",
            // meta-llama/Llama-2-7b-hf config.json
            config: ModelConfig {
                architectures: vec!["LlamaForCausalLM".into()],
                hidden_size: 4096,
                intermediate_size: 11008,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                num_key_value_heads: Some(32),
                head_dim: None,
                vocab_size: 32000,
                rms_norm_eps: 1e-5,
                rope_theta: 10000.0,
                max_position_embeddings: 4096,
                sliding_window: None,
                tie_word_embeddings: false,
                rope_scaling: None,
                attention_bias: false,
                mlp_bias: false,
                num_local_experts: None,
                num_experts_per_tok: None,
            },
        },
        Preset {
            name: "llama-3-8b",
            hf_id: "meta-llama/Meta-Llama-3-8B",
            source: "huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json",
            // meta-llama/Meta-Llama-3-8B config.json
            config: ModelConfig {
                architectures: vec!["LlamaForCausalLM".into()],
                hidden_size: 4096,
                intermediate_size: 14336,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                num_key_value_heads: Some(8),
                head_dim: None,
                vocab_size: 128256,
                rms_norm_eps: 1e-5,
                rope_theta: 500000.0,
                max_position_embeddings: 8192,
                sliding_window: None,
                tie_word_embeddings: false,
                rope_scaling: None,
                attention_bias: false,
                mlp_bias: false,
                num_local_experts: None,
                num_experts_per_tok: None,
            },
        },
        Preset {
            name: "llama-3.1-8b",
            hf_id: "meta-llama/Llama-3.1-8B",
            source: "huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json",
            // meta-llama/Llama-3.1-8B config.json
            config: ModelConfig {
                architectures: vec!["LlamaForCausalLM".into()],
                hidden_size: 4096,
                intermediate_size: 14336,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                num_key_value_heads: Some(8),
                head_dim: None,
                vocab_size: 128256,
                rms_norm_eps: 1e-5,
                rope_theta: 500000.0,
                max_position_embeddings: 131072,
                sliding_window: None,
                tie_word_embeddings: false,
                rope_scaling: Some(serde_json::json!({
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                    "rope_type": "llama3"
                })),
                attention_bias: false,
                mlp_bias: false,
                num_local_experts: None,
                num_experts_per_tok: None,
            },
        },
        Preset {
            name: "mistral-nemo-12b",
            hf_id: "mistralai/Mistral-Nemo-Base-2407",
            source: "huggingface.co/mistralai/Mistral-Nemo-Base-2407/blob/main/config.json",
            // mistralai/Mistral-Nemo-Base-2407 config.json; head_dim 128, not hidden / heads = 160
            config: ModelConfig {
                architectures: vec!["MistralForCausalLM".into()],
                hidden_size: 5120,
                intermediate_size: 14336,
                num_hidden_layers: 40,
                num_attention_heads: 32,
                num_key_value_heads: Some(8),
                head_dim: Some(128),
                vocab_size: 131072,
                rms_norm_eps: 1e-5,
                rope_theta: 1000000.0,
                max_position_embeddings: 1024000,
                sliding_window: None,
                tie_word_embeddings: false,
                rope_scaling: None,
                attention_bias: false,
                mlp_bias: false,
                num_local_experts: None,
                num_experts_per_tok: None,
            },
        },
        Preset {
            name: "mixtral-8x7b-v0.1",
            hf_id: "mistralai/Mixtral-8x7B-v0.1",
            source: "huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json",
            // mistralai/Mixtral-8x7B-v0.1 config.json (output_router_logits false,
            // sliding_window null)
            config: ModelConfig {
                architectures: vec!["MixtralForCausalLM".into()],
                hidden_size: 4096,
                intermediate_size: 14336,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                num_key_value_heads: Some(8),
                head_dim: None,
                vocab_size: 32000,
                rms_norm_eps: 1e-5,
                rope_theta: 1000000.0,
                max_position_embeddings: 32768,
                sliding_window: None,
                tie_word_embeddings: false,
                rope_scaling: None,
                attention_bias: false,
                mlp_bias: false,
                num_local_experts: Some(8),
                num_experts_per_tok: Some(2),
            },
        },
        Preset {
            name: "qwen1.5-7b",
            hf_id: "Qwen/Qwen1.5-7B",
            source: "huggingface.co/Qwen/Qwen1.5-7B/blob/main/config.json",
            // Qwen/Qwen1.5-7B config.json (its sliding_window applies only with use_sliding_window, false)
            config: ModelConfig {
                architectures: vec!["Qwen2ForCausalLM".into()],
                hidden_size: 4096,
                intermediate_size: 11008,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                num_key_value_heads: Some(32),
                head_dim: None,
                vocab_size: 151936,
                rms_norm_eps: 1e-6,
                rope_theta: 1000000.0,
                max_position_embeddings: 32768,
                sliding_window: None,
                tie_word_embeddings: false,
                rope_scaling: None,
                attention_bias: false,
                mlp_bias: false,
                num_local_experts: None,
                num_experts_per_tok: None,
            },
        },
        Preset {
            name: "qwen2-7b",
            hf_id: "Qwen/Qwen2-7B",
            source: "huggingface.co/Qwen/Qwen2-7B/blob/main/config.json",
            // Qwen/Qwen2-7B config.json (its sliding_window applies only with use_sliding_window, false)
            config: ModelConfig {
                architectures: vec!["Qwen2ForCausalLM".into()],
                hidden_size: 3584,
                intermediate_size: 18944,
                num_hidden_layers: 28,
                num_attention_heads: 28,
                num_key_value_heads: Some(4),
                head_dim: None,
                vocab_size: 152064,
                rms_norm_eps: 1e-6,
                rope_theta: 1000000.0,
                max_position_embeddings: 131072,
                sliding_window: None,
                tie_word_embeddings: false,
                rope_scaling: None,
                attention_bias: false,
                mlp_bias: false,
                num_local_experts: None,
                num_experts_per_tok: None,
            },
        },
        Preset {
            name: "qwen2.5-0.5b",
            hf_id: "Qwen/Qwen2.5-0.5B",
            source: "huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json",
            // Qwen/Qwen2.5-0.5B config.json (its sliding_window applies only with use_sliding_window, false)
            config: ModelConfig {
                architectures: vec!["Qwen2ForCausalLM".into()],
                hidden_size: 896,
                intermediate_size: 4864,
                num_hidden_layers: 24,
                num_attention_heads: 14,
                num_key_value_heads: Some(2),
                head_dim: None,
                vocab_size: 151936,
                rms_norm_eps: 1e-6,
                rope_theta: 1000000.0,
                max_position_embeddings: 32768,
                sliding_window: None,
                tie_word_embeddings: true,
                rope_scaling: None,
                attention_bias: false,
                mlp_bias: false,
                num_local_experts: None,
                num_experts_per_tok: None,
            },
        },
        Preset {
            name: "qwen2.5-7b",
            hf_id: "Qwen/Qwen2.5-7B",
            source: "huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json",
            // Qwen/Qwen2.5-7B config.json (its sliding_window applies only with use_sliding_window, false)
            config: ModelConfig {
                architectures: vec!["Qwen2ForCausalLM".into()],
                hidden_size: 3584,
                intermediate_size: 18944,
                num_hidden_layers: 28,
                num_attention_heads: 28,
                num_key_value_heads: Some(4),
                head_dim: None,
                vocab_size: 152064,
                rms_norm_eps: 1e-6,
                rope_theta: 1000000.0,
                max_position_embeddings: 131072,
                sliding_window: None,
                tie_word_embeddings: false,
                rope_scaling: None,
                attention_bias: false,
                mlp_bias: false,
                num_local_experts: None,
                num_experts_per_tok: None,
            },
        },
        Preset {
            name: "tinyllama-1.1b",
            hf_id: "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
            source: "huggingface.co/TinyLlama/TinyLlama-1.1B-Chat-v1.0/blob/main/config.json",
            // TinyLlama/TinyLlama-1.1B-Chat-v1.0 config.json
            config: ModelConfig {
                architectures: vec!["LlamaForCausalLM".into()],
                hidden_size: 2048,
                intermediate_size: 5632,
                num_hidden_layers: 22,
                num_attention_heads: 32,
                num_key_value_heads: Some(4),
                head_dim: None,
                vocab_size: 32000,
                rms_norm_eps: 1e-5,
                rope_theta: 10000.0,
                max_position_embeddings: 2048,
                sliding_window: None,
                tie_word_embeddings: false,
                rope_scaling: None,
                attention_bias: false,
                mlp_bias: false,
                num_local_experts: None,
                num_experts_per_tok: None,
            },
        },
        Preset {
            name: "smollm2-135m",
            hf_id: "HuggingFaceTB/SmolLM2-135M",
            source: "huggingface.co/HuggingFaceTB/SmolLM2-135M/blob/main/config.json",
            // HuggingFaceTB/SmolLM2-135M config.json
            config: ModelConfig {
                architectures: vec!["LlamaForCausalLM".into()],
                hidden_size: 576,
                intermediate_size: 1536,
                num_hidden_layers: 30,
                num_attention_heads: 9,
                num_key_value_heads: Some(3),
                head_dim: None,
                vocab_size: 49152,
                rms_norm_eps: 1e-5,
                rope_theta: 100000.0,
                max_position_embeddings: 8192,
                sliding_window: None,
                tie_word_embeddings: true,
                rope_scaling: None,
                attention_bias: false,
                mlp_bias: false,
                num_local_experts: None,
                num_experts_per_tok: None,
            },
        },
        Preset {
            name: "smollm2-360m",
            hf_id: "HuggingFaceTB/SmolLM2-360M",
            source: "huggingface.co/HuggingFaceTB/SmolLM2-360M/blob/main/config.json",
            // HuggingFaceTB/SmolLM2-360M config.json
            config: ModelConfig {
                architectures: vec!["LlamaForCausalLM".into()],
                hidden_size: 960,
                intermediate_size: 2560,
                num_hidden_layers: 32,
                num_attention_heads: 15,
                num_key_value_heads: Some(5),
                head_dim: None,
                vocab_size: 49152,
                rms_norm_eps: 1e-5,
                rope_theta: 100000.0,
                max_position_embeddings: 8192,
                sliding_window: None,
                tie_word_embeddings: true,
                rope_scaling: None,
                attention_bias: false,
                mlp_bias: false,
                num_local_experts: None,
                num_experts_per_tok: None,
            },
        },
        Preset {
            name: "mixtral-mini",
            hf_id: "",
            source: "vramcal's reference config (Mixtral-shaped, 4 layers, 8 experts top-2, GQA 4:1, untied)",
            // No config.json: Mixtral-8x7B-v0.1's layout scaled down as mistral-mini scales
            // Mistral-7B's (head_dim 64, intermediate 3.5 × hidden, 32000-token vocabulary, its
            // 8 experts routed top-2, no sliding window), for the PyTorch CPU reference grid and
            // vramcal's own step on two CPU cores.
            config: ModelConfig {
                architectures: vec!["MixtralForCausalLM".into()],
                hidden_size: 256,
                intermediate_size: 896,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                num_key_value_heads: Some(1),
                head_dim: None,
                vocab_size: 32000,
                rms_norm_eps: 1e-5,
                rope_theta: 1000000.0,
                max_position_embeddings: 32768,
                sliding_window: None,
                tie_word_embeddings: false,
                rope_scaling: None,
                attention_bias: false,
                mlp_bias: false,
                num_local_experts: Some(8),
                num_experts_per_tok: Some(2),
            },
        },
        Preset {
            name: "mistral-mini",
            hf_id: "",
            source: "vramcal's reference config (Mistral-shaped, 6 layers, GQA 4:1, sliding window 128, untied)",
            // No config.json: Mistral-7B-v0.1's layout scaled down (head_dim 64, intermediate
            // 3.5 × hidden, its 32000-token vocabulary), the Mistral-shaped model of the PyTorch CPU reference grid
            // (results/torch-cpu/), small enough to train on two CPU cores; its sliding window is
            // shorter than the grid's longest sequences.
            config: ModelConfig {
                architectures: vec!["MistralForCausalLM".into()],
                hidden_size: 512,
                intermediate_size: 1792,
                num_hidden_layers: 6,
                num_attention_heads: 8,
                num_key_value_heads: Some(2),
                head_dim: None,
                vocab_size: 32000,
                rms_norm_eps: 1e-5,
                rope_theta: 10000.0,
                max_position_embeddings: 32768,
                sliding_window: Some(128),
                tie_word_embeddings: false,
                rope_scaling: None,
                attention_bias: false,
                mlp_bias: false,
                num_local_experts: None,
                num_experts_per_tok: None,
            },
        },
        Preset {
            name: "tiny",
            hf_id: "",
            source: "vramcal's own test config (2 layers, GQA 4:2, sliding window 6, untied)",
            // No config.json: vramcal's own test config, small enough for every test to run.
            config: ModelConfig {
                architectures: vec!["MistralForCausalLM".into()],
                hidden_size: 32,
                intermediate_size: 48,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: Some(2),
                head_dim: None,
                vocab_size: 96,
                rms_norm_eps: 1e-5,
                rope_theta: 10000.0,
                max_position_embeddings: 64,
                sliding_window: Some(6),
                tie_word_embeddings: false,
                rope_scaling: None,
                attention_bias: false,
                mlp_bias: false,
                num_local_experts: None,
                num_experts_per_tok: None,
            },
        },
    ]
}

/// Looks up a preset by name.
pub fn preset(name: &str) -> Option<Preset> {
    presets().into_iter().find(|p| p.name == name)
}

/// Where a resolved model configuration came from.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigSource {
    /// A built-in preset.
    Preset(&'static str),
    /// A `config.json` file (given directly, in a folder, or found in the HF cache).
    File(PathBuf),
}

/// A model name resolved to its configuration.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// Name used in tables and CSV rows (preset name, folder name or model id).
    pub name: String,
    /// The configuration.
    pub config: ModelConfig,
    /// Where it came from.
    pub source: ConfigSource,
}

/// Resolves `--model`: a preset name, a path to `config.json` or to a folder holding one, or
/// a Hugging Face model id (`org/name`), whose `config.json` (a few KB, no weights) is read from
/// the local cache or downloaded into it ([`crate::hub`]; `HF_HUB_OFFLINE=1`: the cache only).
///
/// # Errors
/// [`Error::UnknownModel`] when nothing matches; [`Error::Hub`] when the Hub cannot give the
/// id's `config.json`; the errors of [`ModelConfig::from_json_file`] when a file is found but
/// bad.
pub fn resolve_model(name: &str) -> Result<ResolvedModel> {
    if let Some(p) = preset(name) {
        return Ok(ResolvedModel {
            name: p.name.to_string(),
            config: p.config,
            source: ConfigSource::Preset(p.name),
        });
    }
    let path = Path::new(name);
    let looks_like_path = name.starts_with('.')
        || name.starts_with('/')
        || name.starts_with('~')
        || name.ends_with(".json");
    if crate::input::exists(path) {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let config = ModelConfig::from_json_file(&file)?;
        let dir = if path.is_dir() {
            path
        } else {
            path.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
        };
        // The folder's name; in the browser build, which has no file system to canonicalize
        // in, the name as given.
        let label = dir
            .canonicalize()
            .ok()
            .or_else(|| cfg!(target_arch = "wasm32").then(|| dir.to_path_buf()))
            .and_then(|d| d.file_name().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| name.to_string());
        return Ok(ResolvedModel {
            name: label,
            config,
            source: ConfigSource::File(file),
        });
    }
    if looks_like_path {
        return Err(Error::invalid(
            "--model",
            name,
            "file or folder not found (and not a preset or an org/name model id)",
        ));
    }
    #[cfg(target_arch = "wasm32")]
    if name.contains('/') {
        return Err(Error::invalid(
            "--model",
            name,
            "a Hugging Face model id needs the command-line tool or the Python package, which fetch its config.json; here, paste the model's config.json",
        ));
    }
    #[cfg(not(target_arch = "wasm32"))]
    if name.contains('/') {
        let file = crate::hub::Hub::from_env().file(name, "config.json")?;
        let config = ModelConfig::from_json_file(&file)?;
        return Ok(ResolvedModel {
            name: name.to_string(),
            config,
            source: ConfigSource::File(file),
        });
    }
    Err(Error::UnknownModel {
        name: name.to_string(),
        known: presets()
            .iter()
            .map(|p| p.name)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama 3.1's RoPE scaling against values computed from transformers'
    /// `_compute_llama3_parameters` by hand: head_dim 8 and θ = 10⁴ give frequencies 1, 0.1,
    /// 0.01, 0.001 (wavelengths 6.3, 63, 628, 6283); with an original context of 1000, factor 8,
    /// low 1 and high 4, the first two are kept (< 250), the last divided by 8 (> 1000), and
    /// 0.01 interpolated: s = (1000/628.3 − 1)/3 = 0.19717, (1 − s)·0.01/8 + s·0.01.
    #[test]
    fn llama3_rope_scaling_matches_transformers_formula() {
        let mut c = preset("tiny").unwrap().config;
        c.rope_scaling = Some(serde_json::json!({
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 1000
        }));
        let want = [1.0, 0.1, 0.002_975_352_506_846_947, 0.000_125];
        for (got, want) in c.inv_freq().iter().zip(want) {
            assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
        }
        c.rope_scaling = Some(serde_json::json!({"rope_type": "linear", "factor": 2.0}));
        assert_eq!(c.inv_freq()[1], 0.05);
        c.rope_scaling = Some(serde_json::json!({"rope_type": "yarn", "factor": 4.0}));
        let e = c
            .validate(Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"yarn\" is not modelled"), "{e}");
        c.rope_scaling = Some(serde_json::json!({"rope_type": "llama3", "factor": 8.0}));
        let e = c
            .validate(Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_scaling.low_freq_factor"), "{e}");
        c.rope_scaling = None;
        c.mlp_bias = true;
        let e = c
            .validate(Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mlp_bias"), "{e}");
    }

    /// Qwen2's `config.json`: the architecture gives q/k/v biases, and a `sliding_window`
    /// with `use_sliding_window: false` is no window.
    #[test]
    fn qwen2_config_json_is_read_as_qwen2() {
        let text = r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
            "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0, "max_position_embeddings": 32768, "sliding_window": 32768,
            "use_sliding_window": false, "max_window_layers": 21, "tie_word_embeddings": true}"#;
        let c = ModelConfig::from_json_str(text, Path::new("config.json")).unwrap();
        assert!(c.qkv_bias() && !c.o_bias());
        assert_eq!(c.sliding_window, None);
        assert_eq!(
            c.param_count(),
            preset("qwen2.5-0.5b").unwrap().config.param_count()
        );
        assert_eq!(c.param_count(), 494_032_768);
        // Without the key (transformers' default, false) no window either; true is refused.
        let absent = text.replace("\"use_sliding_window\": false,", "");
        let c = ModelConfig::from_json_str(&absent, Path::new("config.json")).unwrap();
        assert_eq!(c.sliding_window, None);
        let on = text.replace(
            "\"use_sliding_window\": false",
            "\"use_sliding_window\": true",
        );
        let e = ModelConfig::from_json_str(&on, Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("use_sliding_window = true is not modelled"),
            "{e}"
        );
        let yes = text.replace(
            "\"use_sliding_window\": false",
            "\"use_sliding_window\": \"yes\"",
        );
        let e = ModelConfig::from_json_str(&yes, Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be true or false"), "{e}");
        // Without `architectures`, `model_type` names it, as in transformers; an unknown one is
        // refused. Qwen2 ignores `attention_bias` (no o_proj bias).
        let by_type = text.replace(
            "\"architectures\": [\"Qwen2ForCausalLM\"]",
            "\"model_type\": \"qwen2\", \"attention_bias\": true",
        );
        let c = ModelConfig::from_json_str(&by_type, Path::new("config.json")).unwrap();
        assert!(c.qkv_bias() && !c.o_bias());
        assert_eq!(c.param_count(), 494_032_768);
        let gemma = by_type.replace("\"qwen2\"", "\"gemma\"");
        let e = ModelConfig::from_json_str(&gemma, Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unsupported architecture") && e.contains("gemma"),
            "{e}"
        );
    }
}
