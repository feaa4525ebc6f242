//! Saving what was trained: PEFT adapter files for LoRA (`adapter_model.safetensors`,
//! `adapter_config.json`), `model.safetensors` with HF names for full fine-tuning, and the
//! merged model (`W + (alpha/r)·B·A`, dequantizing an NF4 base) — where users report running
//! out of memory after training.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::linear::{Param, Weight};
use super::moe::MoeBlock;
use super::{Decoder, Mlp};
use crate::error::{Error, Result};
use crate::spec::Target;

/// PEFT's `adapter_config.json` (the keys PEFT writes for a LoRA adapter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Always `LORA`.
    pub peft_type: String,
    /// Always `CAUSAL_LM`.
    pub task_type: String,
    /// The base model's name or path.
    pub base_model_name_or_path: String,
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub lora_alpha: f64,
    /// Dropout.
    pub lora_dropout: f64,
    /// Adapted module names, e.g. `["q_proj", "v_proj"]`.
    pub target_modules: Vec<String>,
    /// Bias handling (`none`).
    pub bias: String,
    /// Whether weights are stored transposed (`false`).
    pub fan_in_fan_out: bool,
    /// Saved for inference (`true`).
    pub inference_mode: bool,
    /// Modules trained whole beside the adapters (`lm_head`, `embed_tokens`); `null` for none,
    /// as PEFT writes it.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

fn st_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        reason: e.to_string().lines().next().unwrap_or_default().to_string(),
    }
}

impl Decoder {
    /// Writes the trained tensors into `dir`: for LoRA, `adapter_model.safetensors` (PEFT
    /// names) and `adapter_config.json`; for full fine-tuning, `model.safetensors` (HF names).
    /// Returns the bytes written.
    ///
    /// # Errors
    /// [`Error::Io`] if `dir` cannot be written; [`Error::Weights`] if serialization fails.
    pub fn save_trained(&self, dir: &Path, base_model: &str) -> Result<u64> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut tensors: HashMap<String, Tensor> = self
            .trainable_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        if self.adaptation().lora.is_none() {
            // A mixture of experts' per-expert tensors as the checkpoint's 3-D ones.
            for (li, layer) in self.layers.iter().enumerate() {
                if let Mlp::Moe(m) = &layer.mlp {
                    let p = format!("model.layers.{li}");
                    tensors.retain(|n, _| !n.starts_with(&format!("{p}.mlp.experts.")));
                    tensors.extend(moe_tensors(&p, m, self.device())?);
                }
            }
        }
        let file = match &self.adaptation().lora {
            Some(l) => {
                let cfg = AdapterConfig {
                    peft_type: "LORA".into(),
                    task_type: "CAUSAL_LM".into(),
                    base_model_name_or_path: base_model.into(),
                    r: l.r,
                    lora_alpha: l.alpha,
                    lora_dropout: l.dropout,
                    target_modules: l.target_names().iter().map(|t| t.to_string()).collect(),
                    bias: "none".into(),
                    fan_in_fan_out: false,
                    inference_mode: true,
                    modules_to_save: l
                        .saves_modules()
                        .then(|| l.saved_names().iter().map(|t| t.to_string()).collect()),
                };
                tensors = tensors
                    .into_iter()
                    .map(|(n, t)| (adapter_file_name(&n), t))
                    .collect();
                let cfg_path = dir.join("adapter_config.json");
                let text = serde_json::to_string_pretty(&cfg).map_err(|e| st_err(&cfg_path, e))?;
                std::fs::write(&cfg_path, text).map_err(|e| Error::io(&cfg_path, e))?;
                dir.join("adapter_model.safetensors")
            }
            None => dir.join("model.safetensors"),
        };
        candle_core::safetensors::save(&tensors, &file).map_err(|e| st_err(&file, e))?;
        dir_bytes(dir)
    }

    /// Merges every adapter into its base weight (`W ← W + (alpha/r)·B·A`; an NF4 base is
    /// dequantized to the compute dtype first), drops the adapters, and writes the whole model
    /// as `model.safetensors` (HF names) into `dir`. Dense bases are merged in place, as PEFT's
    /// `merge_and_unload` does. Returns the bytes written.
    ///
    /// # Errors
    /// [`Error::Io`]/[`Error::Weights`] on write failure; [`Error::Candle`].
    pub fn merge_and_save(&mut self, dir: &Path) -> Result<u64> {
        let copies = self
            .adaptation()
            .lora
            .as_ref()
            .is_some_and(|l| l.saves_modules());
        if ((self.lm_head_lora.is_some() || self.embed_lora.is_some()) && self.lm_head.is_none())
            || (copies && self.cfg.tie_word_embeddings)
        {
            return Err(Error::invalid(
                "--save",
                "merged",
                "an lm_head or embed_tokens adapter on a model whose head is tied to embed_tokens cannot be merged without changing the other too; save the adapter (--save adapter)",
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let device = self.device().clone();
        // Every tensor of the file in the weights' dtype: an NF4 base dequantizes to the compute
        // dtype, which differs under autocast.
        let wd = self.dtype();
        // The top-level adapters, merged in place into their frozen bases.
        let merge_into = |p: &Param, delta: Tensor| -> Result<()> {
            let w = p.tensor();
            let merged = (w + delta.to_dtype(w.dtype())?)?;
            w.slice_set(&merged, 0, 0)?;
            Ok(())
        };
        if let Some(a) = self.embed_lora.take() {
            // ΔE = (alpha/r)·(B·A)ᵀ, (vocab, hidden).
            let delta = (a.b.matmul(a.a.as_tensor())?.t()? * a.scale)?;
            merge_into(&self.embed_tokens, delta)?;
        }
        if let (Some(a), Some(h)) = (self.lm_head_lora.take(), &self.lm_head) {
            let delta = (a.b.matmul(a.a.as_tensor())? * a.scale)?; // (vocab, hidden)
            merge_into(h, delta)?;
        }
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let param = |p: &Param| p.tensor().clone();
        tensors.insert(
            "model.embed_tokens.weight".into(),
            param(&self.embed_tokens),
        );
        tensors.insert("model.norm.weight".into(), param(&self.norm));
        if let Some(h) = &self.lm_head {
            tensors.insert("lm_head.weight".into(), param(h));
        }
        for (li, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{li}");
            tensors.insert(
                format!("{p}.input_layernorm.weight"),
                param(&layer.input_layernorm),
            );
            tensors.insert(
                format!("{p}.post_attention_layernorm.weight"),
                param(&layer.post_attention_layernorm),
            );
            for t in Target::ALL {
                let lin = match (t, &mut layer.mlp) {
                    (Target::QProj, _) => &mut layer.q_proj,
                    (Target::KProj, _) => &mut layer.k_proj,
                    (Target::VProj, _) => &mut layer.v_proj,
                    (Target::OProj, _) => &mut layer.o_proj,
                    (Target::GateProj, Mlp::Dense { gate_proj, .. }) => gate_proj,
                    (Target::UpProj, Mlp::Dense { up_proj, .. }) => up_proj,
                    (Target::DownProj, Mlp::Dense { down_proj, .. }) => down_proj,
                    (_, Mlp::Moe(_)) => continue,
                };
                let w = match (lin.lora.take(), &lin.weight) {
                    (None, _) => lin.dense_weight(&device)?,
                    (Some(a), _) => {
                        let delta = (a.b.matmul(a.a.as_tensor())? * a.scale)?; // (out, in)
                        match &lin.weight {
                            Weight::Frozen(w) => {
                                let merged = (w + delta.to_dtype(w.dtype())?)?;
                                w.slice_set(&merged, 0, 0)?;
                                w.clone()
                            }
                            _ => {
                                let dense = lin.dense_weight(&device)?;
                                let merged = (dense + delta.to_dtype(lin.dtype)?)?;
                                lin.weight = Weight::Frozen(merged.clone());
                                merged
                            }
                        }
                    }
                };
                tensors.insert(format!("{p}.{}.weight", t.path()), w.to_dtype(wd)?);
                if let Some(b) = &lin.bias {
                    tensors.insert(format!("{p}.{}.bias", t.path()), param(b));
                }
            }
            if let Mlp::Moe(m) = &layer.mlp {
                // No adapters in a mixture of experts: its tensors as they are.
                for (name, t) in moe_tensors(&p, m, &device)? {
                    tensors.insert(name, t.to_dtype(wd)?);
                }
            }
        }
        let file = dir.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &file).map_err(|e| st_err(&file, e))?;
        dir_bytes(dir)
    }

    /// Loads PEFT adapter files from `dir` into this model's adapters.
    ///
    /// # Errors
    /// [`Error::Weights`] if the config disagrees with the model's LoRA settings (rank,
    /// alpha, targets) or the model has no adapters; [`Error::MissingTensor`] /
    /// [`Error::WeightShape`] for missing or mis-shaped tensors; [`Error::Io`].
    pub fn load_adapter(&self, dir: &Path) -> Result<AdapterConfig> {
        let cfg_path = dir.join("adapter_config.json");
        let text = crate::input::read_text_capped(&cfg_path)?;
        let cfg: AdapterConfig = serde_json::from_str(&text).map_err(|e| st_err(&cfg_path, e))?;
        let Some(l) = &self.adaptation().lora else {
            return Err(st_err(
                &cfg_path,
                "the model has no LoRA adapters to load into",
            ));
        };
        let targets: Vec<String> = l.target_names().iter().map(|t| t.to_string()).collect();
        let saved: Vec<String> = l.saved_names().iter().map(|t| t.to_string()).collect();
        // PEFT keeps the user's order: compared as sets.
        let mut file_saved = cfg.modules_to_save.clone().unwrap_or_default();
        file_saved.sort();
        file_saved.dedup();
        let mut saved = saved;
        saved.sort();
        if cfg.r != l.r
            || cfg.lora_alpha != l.alpha
            || cfg.target_modules != targets
            || file_saved != saved
            || cfg.peft_type != "LORA"
        {
            return Err(st_err(
                &cfg_path,
                format!(
                    "adapter is {} r={} alpha={} targets={:?} modules_to_save={file_saved:?}, the model has r={} alpha={} targets={targets:?} modules_to_save={saved:?}",
                    cfg.peft_type, cfg.r, cfg.lora_alpha, cfg.target_modules, l.r, l.alpha
                ),
            ));
        }
        let file = dir.join("adapter_model.safetensors");
        let tensors =
            candle_core::safetensors::load(&file, self.device()).map_err(|e| st_err(&file, e))?;
        for (name, var) in self.trainable_vars() {
            let name = adapter_file_name(&name);
            let t = tensors.get(&name).ok_or_else(|| Error::MissingTensor {
                path: file.clone(),
                name: name.clone(),
            })?;
            crate::weights::check_shape(&file, &name, var.dims(), t.dims())?;
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        Ok(cfg)
    }
}

/// The name of a LoRA model's trainable tensor in PEFT's `adapter_model.safetensors`: the
/// adapters' as they are; a `modules_to_save` copy after its module
/// (`base_model.model.lm_head.weight`: PEFT's `get_peft_model_state_dict` drops the wrapper's
/// `modules_to_save.default`).
fn adapter_file_name(name: &str) -> String {
    match name {
        "model.embed_tokens.weight" | "lm_head.weight" => format!("base_model.model.{name}"),
        _ => name.to_string(),
    }
}

/// A mixture-of-experts block's tensors with the checkpoint's names and shapes: the router
/// `{p}.mlp.gate.weight` `(E, h)`, `{p}.mlp.experts.gate_up_proj` `(E, 2i, h)` (each expert's
/// gate rows, then its up rows) and `{p}.mlp.experts.down_proj` `(E, h, i)`.
fn moe_tensors(p: &str, m: &MoeBlock, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let mut gate_up = Vec::with_capacity(m.experts.len());
    let mut down = Vec::with_capacity(m.experts.len());
    for x in &m.experts {
        gate_up.push(Tensor::cat(
            &[x.gate.dense_weight(device)?, x.up.dense_weight(device)?],
            0,
        )?);
        down.push(x.down.dense_weight(device)?);
    }
    Ok(vec![
        (format!("{p}.mlp.gate.weight"), m.gate.dense_weight(device)?),
        (
            format!("{p}.mlp.experts.gate_up_proj"),
            Tensor::stack(&gate_up, 0)?,
        ),
        (
            format!("{p}.mlp.experts.down_proj"),
            Tensor::stack(&down, 0)?,
        ),
    ])
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        total += e.metadata().map_err(|err| Error::io(e.path(), err))?.len();
    }
    Ok(total)
}
