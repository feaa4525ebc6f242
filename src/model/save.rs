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
    /// The base model's name or path; `null` where PEFT was not told one.
    pub base_model_name_or_path: Option<String>,
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
    /// Parameters adapted directly (PEFT's `ParamWrapper`): on Mixtral under `all-linear` the
    /// router `gate.weight` and the experts' `gate_up_proj`, `down_proj`; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_parameters: Option<Vec<String>>,
    /// Per-module ranks: `{".*\\.gate_up_proj": 2r}` on Mixtral under `all-linear` (`w1` and
    /// `w3` fused, PEFT's `utils/transformers_weight_conversion.py`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank_pattern: Option<std::collections::BTreeMap<String, usize>>,
    /// Per-module alphas, `{".*\\.gate_up_proj": 2α}` likewise; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha_pattern: Option<std::collections::BTreeMap<String, f64>>,
    /// PEFT's rank-stabilised scaling (`α/√r`), which vramcal does not train: read to refuse it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_rslora: Option<bool>,
    /// PEFT's DoRA, which vramcal does not train: read to refuse it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_dora: Option<bool>,
}

/// PEFT's regex for the fused expert tensor whose rank and alpha it doubles.
const GATE_UP_PATTERN: &str = r".*\.gate_up_proj";

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
        if self.adaptation().lora.is_some() {
            // A mixture of experts' adapter shares as PEFT's stacked `ParamWrapper` tensors.
            for (li, layer) in self.layers.iter().enumerate() {
                if let Mlp::Moe(m) = &layer.mlp {
                    let p = format!("model.layers.{li}");
                    let Some(stacked) = expert_adapter_tensors(&p, m)? else {
                        continue;
                    };
                    let per_expert = format!("base_model.model.{p}.mlp.experts.");
                    tensors.retain(|n, _| !n.starts_with(&per_expert));
                    tensors.extend(stacked);
                }
            }
        }
        let file = match &self.adaptation().lora {
            Some(l) => {
                let experts = l.experts_adapted(&self.cfg);
                let cfg = AdapterConfig {
                    peft_type: "LORA".into(),
                    task_type: "CAUSAL_LM".into(),
                    base_model_name_or_path: Some(base_model.into()),
                    r: l.r,
                    lora_alpha: l.alpha,
                    lora_dropout: l.dropout,
                    target_modules: peft_target_modules(l, &self.cfg),
                    bias: "none".into(),
                    fan_in_fan_out: false,
                    inference_mode: true,
                    modules_to_save: l
                        .saves_modules()
                        .then(|| l.saved_names().iter().map(|t| t.to_string()).collect()),
                    target_parameters: experts.then(|| {
                        ["gate.weight", "down_proj", "gate_up_proj"]
                            .map(String::from)
                            .to_vec()
                    }),
                    rank_pattern: experts.then(|| [(GATE_UP_PATTERN.to_string(), 2 * l.r)].into()),
                    alpha_pattern: experts
                        .then(|| [(GATE_UP_PATTERN.to_string(), 2.0 * l.alpha)].into()),
                    use_rslora: None,
                    use_dora: None,
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
            if let Mlp::Moe(m) = &mut layer.mlp {
                // The router's and experts' adapters (`all-linear`) merged in place into their
                // frozen matrices, as above, and dropped; the file's 3-D tensors are then
                // stacked copies of the experts' matrices (safetensors stores each tensor
                // whole), so the experts are held twice until the file is written, where the
                // dense layers are written from views.
                merge_moe_in_place(m)?;
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
        let targets = peft_target_modules(l, &self.cfg);
        let saved: Vec<String> = l.saved_names().iter().map(|t| t.to_string()).collect();
        // PEFT keeps the user's order, or a set's (resolved `all-linear`): compared as sets.
        let set =
            |v: &[String]| -> std::collections::BTreeSet<String> { v.iter().cloned().collect() };
        let file_saved = cfg.modules_to_save.clone().unwrap_or_default();
        // On Mixtral under `all-linear`: the router and the experts as `target_parameters`, the
        // fused `gate_up_proj` at rank and alpha doubled.
        let experts = l.experts_adapted(&self.cfg);
        let file_params = set(cfg.target_parameters.as_deref().unwrap_or_default());
        let params = if experts {
            set(&["gate.weight", "down_proj", "gate_up_proj"].map(String::from))
        } else {
            Default::default()
        };
        // Exactly those patterns, or none: any other would scale a module vramcal scales as
        // α/r.
        let (ranks, alphas) = (
            cfg.rank_pattern.clone().unwrap_or_default(),
            cfg.alpha_pattern.clone().unwrap_or_default(),
        );
        let patterns_ok = if experts {
            ranks == [(GATE_UP_PATTERN.to_string(), 2 * l.r)].into()
                && alphas == [(GATE_UP_PATTERN.to_string(), 2.0 * l.alpha)].into()
        } else {
            ranks.is_empty() && alphas.is_empty()
        };
        for (key, on) in [("use_rslora", cfg.use_rslora), ("use_dora", cfg.use_dora)] {
            if on == Some(true) {
                return Err(st_err(
                    &cfg_path,
                    format!("{key} is true: vramcal trains plain LoRA (scaling α/r, no magnitude vector)"),
                ));
            }
        }
        if cfg.r != l.r
            || cfg.lora_alpha != l.alpha
            || set(&cfg.target_modules) != set(&targets)
            || set(&file_saved) != set(&saved)
            || file_params != params
            || !patterns_ok
            || cfg.peft_type != "LORA"
        {
            return Err(st_err(
                &cfg_path,
                format!(
                    "adapter is {} r={} alpha={} targets={:?} modules_to_save={file_saved:?}{}, the model has r={} alpha={} targets={targets:?} modules_to_save={saved:?}{}",
                    cfg.peft_type,
                    cfg.r,
                    cfg.lora_alpha,
                    cfg.target_modules,
                    if file_params.is_empty()
                        && cfg.rank_pattern.as_ref().is_none_or(|p| p.is_empty())
                        && cfg.alpha_pattern.as_ref().is_none_or(|p| p.is_empty())
                    {
                        String::new()
                    } else {
                        format!(
                            " target_parameters={file_params:?} rank_pattern={:?} alpha_pattern={:?}",
                            cfg.rank_pattern.clone().unwrap_or_default(),
                            cfg.alpha_pattern.clone().unwrap_or_default()
                        )
                    },
                    l.r,
                    l.alpha,
                    if experts {
                        format!(
                            " target_parameters={params:?} (gate_up_proj at r={} alpha={})",
                            2 * l.r,
                            2.0 * l.alpha
                        )
                    } else {
                        String::new()
                    },
                ),
            ));
        }
        let file = dir.join("adapter_model.safetensors");
        let mut tensors =
            candle_core::safetensors::load(&file, self.device()).map_err(|e| st_err(&file, e))?;
        // A mixture of experts' stacked adapter tensors, split into the experts' shares.
        for (li, layer) in self.layers.iter().enumerate() {
            if let Mlp::Moe(m) = &layer.mlp {
                let p = format!("model.layers.{li}");
                if m.experts.iter().any(|x| x.gate_up_lora.is_some()) {
                    let shares = expert_adapter_shares(&p, m, &tensors, &file)?;
                    tensors.extend(shares);
                }
            }
        }
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

/// PEFT's `target_modules` for `l` on `cfg`: the adapted module names in vramcal's order; on a
/// mixture of experts under `all-linear`, the attention's (and `lm_head`/`embed_tokens`), the
/// router and experts being `target_parameters` (as PEFT 0.21.2 writes them).
fn peft_target_modules(
    l: &crate::spec::LoraConfig,
    cfg: &crate::config::ModelConfig,
) -> Vec<String> {
    if !l.experts_adapted(cfg) {
        return l.target_names().iter().map(|t| t.to_string()).collect();
    }
    let mut v: Vec<String> = l
        .layer_targets(cfg)
        .iter()
        .map(|t| t.name().to_string())
        .collect();
    if l.lm_head {
        v.push("lm_head".into());
    }
    if l.embed_tokens {
        v.push("embed_tokens".into());
    }
    v
}

/// A mixture-of-experts block's adapter shares (`all-linear`) as PEFT's `ParamWrapper` tensors
/// (PEFT 0.21.2 `tuners/lora/layer.py`; the `down_proj` wrapper wraps the `gate_up_proj` one,
/// hence `base_layer`): `{p}.mlp.experts.base_layer.lora_A.weight` `(2r·E, h)` (expert `e`'s
/// `A` in rows `e·2r..`), `…base_layer.lora_B.weight` `(2i, 2r·E)` (expert `e`'s `[B_gate;
/// B_up]` in columns `ρ·E + e`), `{p}.mlp.experts.lora_A.weight` `(r·E, i)` and
/// `…lora_B.weight` `(h, r·E)` likewise; `None` when the block has no adapters.
fn expert_adapter_tensors(p: &str, m: &MoeBlock) -> Result<Option<Vec<(String, Tensor)>>> {
    let mut a_gu = Vec::new();
    let mut b_gu = Vec::new();
    let mut a_d = Vec::new();
    let mut b_d = Vec::new();
    for x in &m.experts {
        let (Some(g), Some(d)) = (&x.gate_up_lora, &x.down.lora) else {
            return Ok(None);
        };
        a_gu.push(g.a.as_tensor().clone());
        b_gu.push(Tensor::cat(&[g.b_gate.as_tensor(), g.b_up.as_tensor()], 0)?);
        a_d.push(d.a.as_tensor().clone());
        b_d.push(d.b.as_tensor().clone());
    }
    // (out, rank, E) flattened: column ρ·E + e.
    let interleave = |b: &[Tensor]| -> Result<Tensor> {
        let s = Tensor::stack(b, 2)?;
        let (o, r, e) = s.dims3()?;
        Ok(s.reshape((o, r * e))?)
    };
    let base = format!("base_model.model.{p}.mlp.experts");
    Ok(Some(vec![
        (
            format!("{base}.base_layer.lora_A.weight"),
            Tensor::cat(&a_gu, 0)?,
        ),
        (
            format!("{base}.base_layer.lora_B.weight"),
            interleave(&b_gu)?,
        ),
        (format!("{base}.lora_A.weight"), Tensor::cat(&a_d, 0)?),
        (format!("{base}.lora_B.weight"), interleave(&b_d)?),
    ]))
}

/// The inverse of [`expert_adapter_tensors`]: PEFT's stacked tensors of block `p` in `file`'s
/// `tensors`, split into the experts' shares under [`Decoder::trainable_vars`]' names.
///
/// # Errors
/// [`Error::MissingTensor`] / [`Error::WeightShape`] for a missing or mis-shaped tensor.
fn expert_adapter_shares(
    p: &str,
    m: &MoeBlock,
    tensors: &HashMap<String, Tensor>,
    file: &Path,
) -> Result<Vec<(String, Tensor)>> {
    let e = m.experts.len();
    let Some((g, d)) = m
        .experts
        .first()
        .and_then(|x| Some((x.gate_up_lora.as_ref()?, x.down.lora.as_ref()?)))
    else {
        return Ok(Vec::new());
    };
    let (r2, h) = g.a.dims2()?;
    let i = g.b_gate.dims2()?.0;
    let (r, _) = d.a.dims2()?;
    let base = format!("base_model.model.{p}.mlp.experts");
    let get = |name: String, shape: &[usize]| -> Result<Tensor> {
        let t = tensors.get(&name).ok_or_else(|| Error::MissingTensor {
            path: file.to_path_buf(),
            name: name.clone(),
        })?;
        crate::weights::check_shape(file, &name, shape, t.dims())?;
        Ok(t.clone())
    };
    let a_gu = get(format!("{base}.base_layer.lora_A.weight"), &[r2 * e, h])?;
    let b_gu = get(format!("{base}.base_layer.lora_B.weight"), &[2 * i, r2 * e])?.reshape((
        2 * i,
        r2,
        e,
    ))?;
    let a_d = get(format!("{base}.lora_A.weight"), &[r * e, i])?;
    let b_d = get(format!("{base}.lora_B.weight"), &[h, r * e])?.reshape((h, r, e))?;
    let mut out = Vec::with_capacity(5 * e);
    for x in 0..e {
        let b = b_gu.narrow(2, x, 1)?.squeeze(2)?.contiguous()?; // (2i, 2r)
        let at = format!("{base}.{x}");
        out.push((
            format!("{at}.gate_up_proj.lora_A.weight"),
            a_gu.narrow(0, x * r2, r2)?.contiguous()?,
        ));
        out.push((
            format!("{at}.gate_proj.lora_B.weight"),
            b.narrow(0, 0, i)?.contiguous()?,
        ));
        out.push((
            format!("{at}.up_proj.lora_B.weight"),
            b.narrow(0, i, i)?.contiguous()?,
        ));
        out.push((
            format!("{at}.down_proj.lora_A.weight"),
            a_d.narrow(0, x * r, r)?.contiguous()?,
        ));
        out.push((
            format!("{at}.down_proj.lora_B.weight"),
            b_d.narrow(2, x, 1)?.squeeze(2)?.contiguous()?,
        ));
    }
    Ok(out)
}

/// Merges a mixture-of-experts block's adapters (`all-linear`) into their frozen matrices in
/// place (`W ← W + s·B·A`, in the weight's dtype) and drops them.
///
/// # Errors
/// [`Error::Candle`].
fn merge_moe_in_place(m: &mut MoeBlock) -> Result<()> {
    fn merge(w: &super::linear::Linear, delta: Tensor) -> Result<()> {
        if let super::linear::Weight::Frozen(t) = &w.weight {
            let merged = (t + delta.to_dtype(t.dtype())?)?;
            t.slice_set(&merged, 0, 0)?;
        }
        Ok(())
    }
    if let Some(a) = m.gate.lora.take() {
        merge(&m.gate, (a.b.matmul(a.a.as_tensor())? * a.scale)?)?;
    }
    for x in &mut m.experts {
        if let Some(g) = x.gate_up_lora.take() {
            merge(&x.gate, (g.b_gate.matmul(g.a.as_tensor())? * g.scale)?)?;
            merge(&x.up, (g.b_up.matmul(g.a.as_tensor())? * g.scale)?)?;
        }
        if let Some(a) = x.down.lora.take() {
            merge(&x.down, (a.b.matmul(a.a.as_tensor())? * a.scale)?)?;
        }
    }
    Ok(())
}

/// A mixture-of-experts block's tensors with the checkpoint's names and shapes, any adapter
/// (`all-linear`) merged in (`W + s·B·A`): the router `{p}.mlp.gate.weight` `(E, h)`,
/// `{p}.mlp.experts.gate_up_proj` `(E, 2i, h)` (each expert's
/// gate rows, then its up rows) and `{p}.mlp.experts.down_proj` `(E, h, i)`.
fn moe_tensors(p: &str, m: &MoeBlock, device: &Device) -> Result<Vec<(String, Tensor)>> {
    // `W + s·B·A` in the weight's dtype where an adapter is present (`all-linear`).
    let merged = |lin: &super::linear::Linear, delta: Option<Tensor>| -> Result<Tensor> {
        let w = lin.dense_weight(device)?;
        Ok(match delta {
            Some(d) => (&w + d.to_dtype(w.dtype())?)?,
            None => w,
        })
    };
    let delta = |lin: &super::linear::Linear| -> Result<Option<Tensor>> {
        lin.lora
            .as_ref()
            .map(|a| Ok((a.b.matmul(a.a.as_tensor())? * a.scale)?))
            .transpose()
    };
    let mut gate_up = Vec::with_capacity(m.experts.len());
    let mut down = Vec::with_capacity(m.experts.len());
    for x in &m.experts {
        let (dg, du) = match &x.gate_up_lora {
            Some(g) => (
                Some((g.b_gate.matmul(g.a.as_tensor())? * g.scale)?),
                Some((g.b_up.matmul(g.a.as_tensor())? * g.scale)?),
            ),
            None => (None, None),
        };
        gate_up.push(Tensor::cat(&[merged(&x.gate, dg)?, merged(&x.up, du)?], 0)?);
        down.push(merged(&x.down, delta(&x.down)?)?);
    }
    Ok(vec![
        (
            format!("{p}.mlp.gate.weight"),
            merged(&m.gate, delta(&m.gate)?)?,
        ),
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
