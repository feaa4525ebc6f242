//! Model configuration: Hugging Face `config.json` for Mistral/Llama decoders, built-in
//! presets with their sources, and exact parameter counting.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Architectures vramcal's decoder implements (the `architectures` field of `config.json`).
pub const SUPPORTED_ARCHITECTURES: [&str; 2] = ["MistralForCausalLM", "LlamaForCausalLM"];

fn default_rope_theta() -> f64 {
    10_000.0
}

/// A Mistral/Llama-style decoder configuration, field names as in Hugging Face `config.json`
/// (transformers' `MistralConfig` / `LlamaConfig`).
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
    /// RoPE scaling as in config.json (Llama 3.1 and later); recorded, not applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
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
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
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
            out.push(p(format!("{pre}.self_attn.q_proj.weight"), vec![q, h]));
            out.push(p(format!("{pre}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push(p(format!("{pre}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push(p(format!("{pre}.self_attn.o_proj.weight"), vec![h, q]));
            out.push(p(format!("{pre}.post_attention_layernorm.weight"), vec![h]));
            out.push(p(format!("{pre}.mlp.gate_proj.weight"), vec![i, h]));
            out.push(p(format!("{pre}.mlp.up_proj.weight"), vec![i, h]));
            out.push(p(format!("{pre}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(p("model.norm.weight".into(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(p("lm_head.weight".into(), vec![self.vocab_size, h]));
        }
        out
    }

    /// Closed-form parameter count, or `None` on overflow:
    /// `V·h (embed) + L·(h·q + 2·h·kv + q·h + 3·h·i + 2·h) + h + (untied ? V·h : 0)`
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
        let layer = attn.checked_add(mlp)?.checked_add(h.checked_mul(2)?)?;
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
        let cfg: ModelConfig = serde_json::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
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
/// a model id (`org/name`) already in the Hugging Face cache (`HF_HOME`, offline).
///
/// # Errors
/// [`Error::UnknownModel`] when nothing matches; the errors of
/// [`ModelConfig::from_json_file`] when a file is found but bad.
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
    if path.exists() {
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
        let label = dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| name.to_string());
        return Ok(ResolvedModel {
            name: label,
            config,
            source: ConfigSource::File(file),
        });
    }
    if looks_like_path {
        return Err(Error::io(
            path,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    if name.contains('/') {
        if let Some(file) = hf_cache_file(name, "config.json") {
            let config = ModelConfig::from_json_file(&file)?;
            return Ok(ResolvedModel {
                name: name.to_string(),
                config,
                source: ConfigSource::File(file),
            });
        }
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

/// Finds `filename` of model `model_id` in the local Hugging Face cache (no network).
pub fn hf_cache_file(model_id: &str, filename: &str) -> Option<PathBuf> {
    hf_hub::Cache::from_env()
        .model(model_id.to_string())
        .get(filename)
}
