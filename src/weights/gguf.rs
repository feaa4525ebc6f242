//! GGUF files (llama architecture): model config from metadata and dequantized weights in
//! Hugging Face layout.
//!
//! llama.cpp's `convert_hf_to_gguf.py` permutes the rows of `q_proj` and `k_proj` so that
//! RoPE pairs are adjacent (`permute(w, n_head)`: reshape `(n_head, 2, head_dim/2, in)`,
//! swap axes 1 and 2). vramcal's RoPE uses transformers' `rotate_half` layout, so the loader
//! applies the inverse permutation.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

use super::source::{check_shape, WeightSource};
use crate::config::ModelConfig;
use crate::error::{candle_msg, Error, Result};

/// An open GGUF file.
pub struct GgufWeights {
    content: Content,
    reader: BufReader<File>,
    path: PathBuf,
    n_head: usize,
    n_kv_head: usize,
    file_len: u64,
}

/// Reads a GGUF header (metadata and tensor table).
///
/// # Errors
/// [`Error::Io`] if unreadable, [`Error::Weights`] if it is not a valid GGUF file.
pub fn read_content(path: &Path) -> Result<(Content, BufReader<File>)> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(f);
    let content = Content::read(&mut reader).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        reason: format!("not a valid GGUF file: {}", candle_msg(&e)),
    })?;
    Ok((content, reader))
}

fn md<'a>(c: &'a Content, path: &Path, key: &str) -> Result<&'a Value> {
    c.metadata.get(key).ok_or_else(|| Error::Weights {
        path: path.to_path_buf(),
        reason: format!("metadata key {key} is missing"),
    })
}

fn md_usize(c: &Content, path: &Path, key: &str) -> Result<usize> {
    let v = md(c, path, key)?;
    v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))
        .map_err(|e| Error::Weights {
            path: path.to_path_buf(),
            reason: format!("metadata key {key}: {}", candle_msg(&e)),
        })
}

/// Builds the model configuration from a GGUF file's `llama.*` metadata.
///
/// # Errors
/// [`Error::UnknownArchitecture`] if `general.architecture` is not `llama` (or `mistral`),
/// [`Error::Weights`] for missing keys, [`Error::Config`] for invalid sizes.
pub fn config_from_gguf(c: &Content, path: &Path) -> Result<ModelConfig> {
    let arch = md(c, path, "general.architecture")?
        .to_string()
        .map_err(|e| Error::Weights {
            path: path.to_path_buf(),
            reason: format!("general.architecture: {}", candle_msg(&e)),
        })?
        .clone();
    if arch != "llama" && arch != "mistral" {
        return Err(Error::UnknownArchitecture {
            path: path.to_path_buf(),
            found: vec![format!("gguf:{arch}")],
        });
    }
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = md_usize(c, path, &k("embedding_length"))?;
    let heads = md_usize(c, path, &k("attention.head_count"))?;
    let rope_dim = md_usize(c, path, &k("rope.dimension_count")).ok();
    let vocab = match c.tensor_infos.get("token_embd.weight") {
        Some(t) => t.shape.dims()[0],
        None => {
            return Err(Error::MissingTensor {
                path: path.to_path_buf(),
                name: "token_embd.weight".into(),
            })
        }
    };
    let head_dim = match rope_dim {
        Some(d) if heads > 0 && d != hidden / heads => Some(d),
        _ => None,
    };
    let cfg = ModelConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        hidden_size: hidden,
        intermediate_size: md_usize(c, path, &k("feed_forward_length"))?,
        num_hidden_layers: md_usize(c, path, &k("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: Some(
            md_usize(c, path, &k("attention.head_count_kv")).unwrap_or(heads),
        ),
        head_dim,
        vocab_size: vocab,
        rms_norm_eps: md(c, path, &k("attention.layer_norm_rms_epsilon")).and_then(|v| {
            v.to_f32().map_err(|e| Error::Weights {
                path: path.to_path_buf(),
                reason: candle_msg(&e),
            })
        })? as f64,
        rope_theta: md(c, path, &k("rope.freq_base"))
            .ok()
            .and_then(|v| v.to_f32().ok())
            .map(|x| x as f64)
            .unwrap_or(10_000.0),
        max_position_embeddings: md_usize(c, path, &k("context_length"))?,
        sliding_window: None,
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        rope_scaling: None,
        attention_bias: false,
        mlp_bias: false,
        num_local_experts: None,
        num_experts_per_tok: None,
    };
    cfg.validate(path)?;
    Ok(cfg)
}

impl GgufWeights {
    /// Opens a GGUF file and reads its header.
    ///
    /// # Errors
    /// As [`read_content`] and [`config_from_gguf`].
    pub fn open(path: &Path) -> Result<Self> {
        let (content, reader) = read_content(path)?;
        let cfg = config_from_gguf(&content, path)?;
        let file_len = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len();
        Ok(GgufWeights {
            file_len,
            content,
            reader,
            path: path.to_path_buf(),
            n_head: cfg.num_attention_heads,
            n_kv_head: cfg.kv_heads(),
        })
    }

    /// The config implied by the file's metadata.
    ///
    /// # Errors
    /// As [`config_from_gguf`].
    pub fn config(&self) -> Result<ModelConfig> {
        config_from_gguf(&self.content, &self.path)
    }

    /// The file's metadata (tokenizer, architecture keys).
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }
}

/// Maps a Hugging Face parameter name to its GGUF name, e.g.
/// `model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight`.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let g = match tail {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.weight"))
}

/// Inverse of llama.cpp's Q/K row permutation: `w` `(heads·head_dim, in)` in GGUF order →
/// transformers' order.
///
/// # Errors
/// [`Error::Candle`] if the rows are not divisible into `heads` even halves.
pub fn unpermute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / heads;
    Ok(w.reshape((heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

impl GgufWeights {
    fn info(&self, name: &str) -> Result<(String, &candle_core::quantized::gguf_file::TensorInfo)> {
        let g = gguf_name(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.into(),
        })?;
        let info = self
            .content
            .tensor_infos
            .get(&g)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                name: format!("{name} (GGUF {g})"),
            })?;
        Ok((g, info))
    }
}

impl WeightSource for GgufWeights {
    fn check(&mut self, name: &str, shape: &[usize]) -> Result<()> {
        let (g, info) = self.info(name)?;
        check_shape(&self.path, name, shape, info.shape.dims())?;
        let n = info.shape.elem_count();
        let bs = info.ggml_dtype.block_size();
        let bytes = (n / bs * info.ggml_dtype.type_size()) as u64;
        let end = self
            .content
            .tensor_data_offset
            .saturating_add(info.offset)
            .saturating_add(bytes);
        if !n.is_multiple_of(bs) || end > self.file_len {
            return Err(Error::Weights {
                path: self.path.clone(),
                reason: format!(
                    "{g}: data ends at byte {end}, past the end of the file ({} bytes): truncated?",
                    self.file_len
                ),
            });
        }
        Ok(())
    }

    fn tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.check(name, shape)?;
        let (g, _) = self.info(name)?;
        let q = self
            .content
            .tensor(&mut self.reader, &g, &Device::Cpu)
            .map_err(|e| Error::Weights {
                path: self.path.clone(),
                reason: format!("{g}: {}", candle_msg(&e)),
            })?;
        let mut t = q.dequantize(&Device::Cpu)?; // f32, (out, in)
        if g.ends_with("attn_q.weight") {
            t = unpermute_qk(&t, self.n_head)?;
        } else if g.ends_with("attn_k.weight") {
            t = unpermute_qk(&t, self.n_kv_head)?;
        }
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}
