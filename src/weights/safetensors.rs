//! Hugging Face safetensors (a single file, or a folder with `model.safetensors` or a sharded
//! `model.safetensors.index.json`), memory-mapped, and models in the local Hugging Face cache
//! (hf-hub's cache layout; [`hf_cache_dir`] downloads what is missing, [`crate::hub`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::source::{check_shape, WeightSource};
use crate::error::{candle_msg, Error, Result};

/// Safetensors in Hugging Face layout, memory-mapped.
pub struct SafetensorsWeights {
    st: MmapedSafetensors,
    path: PathBuf,
    /// Tensor name → file, for error messages.
    files: HashMap<String, PathBuf>,
}

impl SafetensorsWeights {
    /// Opens a single `.safetensors` file, or a folder with `model.safetensors` or
    /// `model.safetensors.index.json` (sharded).
    ///
    /// # Errors
    /// [`Error::Weights`] when files are missing, the index is malformed, or a file's header
    /// is truncated or invalid.
    pub fn open(path: &Path) -> Result<Self> {
        let files: Vec<PathBuf> = if path.is_file() {
            vec![path.to_path_buf()]
        } else if path.join("model.safetensors.index.json").is_file() {
            let idx = path.join("model.safetensors.index.json");
            let text = crate::input::read_text_capped(&idx)?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Weights {
                path: idx.clone(),
                reason: format!("malformed index: {e}"),
            })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Weights {
                    path: idx.clone(),
                    reason: "index has no `weight_map` object".into(),
                })?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|f| path.join(f)).collect()
        } else if path.join("model.safetensors").is_file() {
            vec![path.join("model.safetensors")]
        } else {
            return Err(Error::Weights {
                path: path.to_path_buf(),
                reason: "folder has neither model.safetensors nor model.safetensors.index.json"
                    .into(),
            });
        };
        let mut by_name = HashMap::new();
        for f in &files {
            if !f.is_file() {
                return Err(Error::Weights {
                    path: f.clone(),
                    reason: "shard listed in the index is missing".into(),
                });
            }
            // Validate each file's header and data length up front, so a truncated file is
            // reported with its name before any tensor is built.
            // SAFETY: the file is only read; vramcal does not modify it while mapped.
            let one = unsafe { MmapedSafetensors::new(f) }.map_err(|e| Error::Weights {
                path: f.clone(),
                reason: format!("not a valid safetensors file: {}", candle_msg(&e)),
            })?;
            for (name, _) in one.tensors() {
                by_name.insert(name, f.clone());
            }
        }
        // SAFETY: as above.
        let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| Error::Weights {
            path: path.to_path_buf(),
            reason: format!("not a valid safetensors file: {}", candle_msg(&e)),
        })?;
        Ok(SafetensorsWeights {
            st,
            path: path.to_path_buf(),
            files: by_name,
        })
    }
}

/// Mixtral's checkpoints on the Hub keep transformers 4's layout, which transformers 5 converts
/// on loading (`conversion_mapping.py`, `mixtral`): `block_sparse_moe.gate.weight` is
/// `mlp.gate.weight`; `block_sparse_moe.experts.{e}.w1.weight` (gate) and `w3` (up), each
/// `(i, h)`, stack into `mlp.experts.gate_up_proj` `(E, 2i, h)`; `w2` `(h, i)` into
/// `mlp.experts.down_proj` `(E, h, i)`. The v4 parts of the v5 tensor `name`, or `None` for
/// any other name.
fn v4_parts(name: &str, shape: &[usize]) -> Option<Vec<(String, Vec<usize>)>> {
    let (layer, rest) = name.split_once(".mlp.")?;
    let moe = format!("{layer}.block_sparse_moe");
    match (rest, shape) {
        ("gate.weight", _) => Some(vec![(format!("{moe}.gate.weight"), shape.to_vec())]),
        ("experts.gate_up_proj", &[e, two_i, h]) => Some(
            (0..e)
                .flat_map(|x| {
                    ["w1", "w3"]
                        .map(|w| (format!("{moe}.experts.{x}.{w}.weight"), vec![two_i / 2, h]))
                })
                .collect(),
        ),
        ("experts.down_proj", &[e, h, i]) => Some(
            (0..e)
                .map(|x| (format!("{moe}.experts.{x}.w2.weight"), vec![h, i]))
                .collect(),
        ),
        _ => None,
    }
}

/// The v5 name a v4 Mixtral tensor becomes ([`v4_parts`]), or the name itself.
fn v5_name(name: &str) -> String {
    let Some((layer, rest)) = name.split_once(".block_sparse_moe.") else {
        return name.to_string();
    };
    if rest == "gate.weight" {
        return format!("{layer}.mlp.gate.weight");
    }
    match rest.rsplit('.').nth(1) {
        Some("w1" | "w3") => format!("{layer}.mlp.experts.gate_up_proj"),
        Some("w2") => format!("{layer}.mlp.experts.down_proj"),
        _ => name.to_string(),
    }
}

impl SafetensorsWeights {
    /// Checks one stored tensor: present, floating point, of `shape`.
    fn check_stored(&self, name: &str, shape: &[usize]) -> Result<()> {
        let file = self.files.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.into(),
        })?;
        // Headers and data extents were validated when the files were opened.
        let view = self.st.get(name).map_err(|e| Error::Weights {
            path: file.clone(),
            reason: format!("{name}: {}", candle_msg(&e)),
        })?;
        // Weights are floating point; an integer tensor would load, convert and train to NaN.
        let stored = format!("{:?}", view.dtype());
        if !matches!(stored.as_str(), "F16" | "BF16" | "F32" | "F64") {
            return Err(Error::Weights {
                path: file.clone(),
                reason: format!("{name}: stored as {stored}, not a floating-point type"),
            });
        }
        check_shape(file, name, shape, view.shape())
    }

    /// The stored tensor `name`, in `dtype` on `device`.
    fn load_stored(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.check_stored(name, shape)?;
        let t = self.st.load(name, device).map_err(|e| Error::Weights {
            path: self.files.get(name).cloned().unwrap_or_default(),
            reason: format!("{name}: {}", candle_msg(&e)),
        })?;
        Ok(t.to_dtype(dtype)?)
    }

    /// The v4 parts of `name` where the file holds them instead of `name` ([`v4_parts`]).
    fn v4(&self, name: &str, shape: &[usize]) -> Option<Vec<(String, Vec<usize>)>> {
        if self.files.contains_key(name) {
            return None;
        }
        v4_parts(name, shape).filter(|p| self.files.contains_key(&p[0].0))
    }

    /// Refuses a file that holds `name` in both Mixtral layouts (the v5 tensor and any of its
    /// v4 parts): one would be read and the other ignored without a word.
    fn one_layout(&self, name: &str, shape: &[usize]) -> Result<()> {
        if !self.files.contains_key(name) {
            return Ok(());
        }
        let both = v4_parts(name, shape)
            .unwrap_or_default()
            .into_iter()
            .find(|(n, _)| self.files.contains_key(n));
        match both {
            Some((n, _)) => Err(Error::Weights {
                path: self.files.get(name).cloned().unwrap_or_default(),
                reason: format!(
                    "holds {name} and {n}: the same weights in transformers 5's and 4's Mixtral layouts; keep one"
                ),
            }),
            None => Ok(()),
        }
    }
}

impl WeightSource for SafetensorsWeights {
    /// The stored names, a Mixtral checkpoint's v4 names as the v5 tensors they make.
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.files.keys().map(|n| v5_name(n)).collect();
        v.sort();
        v.dedup();
        v
    }

    fn check(&mut self, name: &str, shape: &[usize]) -> Result<()> {
        self.one_layout(name, shape)?;
        match self.v4(name, shape) {
            Some(parts) => parts
                .iter()
                .try_for_each(|(n, sh)| self.check_stored(n, sh)),
            None => self.check_stored(name, shape),
        }
    }

    fn tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.one_layout(name, shape)?;
        let Some(parts) = self.v4(name, shape) else {
            return self.load_stored(name, shape, dtype, device);
        };
        let mut loaded = Vec::with_capacity(parts.len());
        for (n, sh) in &parts {
            loaded.push(self.load_stored(n, sh, dtype, device)?);
        }
        Ok(match *shape {
            // `[w1; w3]` per expert, then the experts stacked.
            [e, _, _] if parts.len() == 2 * e => {
                let experts: Vec<Tensor> = loaded
                    .chunks(2)
                    .map(|p| Tensor::cat(p, 0))
                    .collect::<candle_core::Result<_>>()?;
                Tensor::stack(&experts, 0)?
            }
            [_, _, _] => Tensor::stack(&loaded, 0)?,
            _ => loaded.remove(0),
        })
    }
}

/// The snapshot folder of model `id` in the Hugging Face cache rooted at `hub` (the folder
/// holding `models--org--name`).
///
/// # Errors
/// [`Error::Weights`] when the model has no cached `config.json` and safetensors.
#[cfg(not(target_arch = "wasm32"))]
pub fn hf_cache_dir_in(hub: &Path, id: &str) -> Result<PathBuf> {
    let cache = hf_hub::Cache::new(hub.to_path_buf());
    let repo = cache.model(id.to_string());
    let cfg = repo.get("config.json");
    let st = repo
        .get("model.safetensors.index.json")
        .or_else(|| repo.get("model.safetensors"));
    let path = hub.join(format!("models--{}", id.replace('/', "--")));
    match (cfg, st) {
        (Some(c), Some(_)) => Ok(c.parent().map(Path::to_path_buf).unwrap_or_default()),
        (Some(_), None) => Err(Error::Weights {
            path,
            reason: format!("model {id} is in the local Hugging Face cache without model.safetensors or model.safetensors.index.json"),
        }),
        _ => Err(Error::Weights {
            path,
            reason: format!("model {id} is not in the local Hugging Face cache (config.json and safetensors needed)"),
        }),
    }
}

/// The snapshot folder of model `id` with its `config.json` and safetensors, fetched from the
/// Hugging Face Hub into the local cache where they are not there yet ([`crate::hub`]): the
/// config, then `model.safetensors.index.json` and every shard its `weight_map` names, or else
/// `model.safetensors`. With `HF_HUB_OFFLINE=1` the cache only.
///
/// # Errors
/// [`Error::Hub`] for what the Hub cannot give (the id, a gated repository without a token, a
/// cut transfer, offline and not cached); [`Error::Weights`] for an index that is not JSON or
/// names a shard outside the repository, or a repository without safetensors.
#[cfg(not(target_arch = "wasm32"))]
pub fn hf_cache_dir(id: &str) -> Result<PathBuf> {
    let hub = crate::hub::Hub::from_env();
    let config = hub.file(id, "config.json")?;
    let snapshot = config.parent().map(Path::to_path_buf).unwrap_or_default();
    // What the cache has is used without asking the Hub (a single file, or an index whose
    // shards are fetched below only where missing).
    let cached_index = hub.cached(id, "model.safetensors.index.json");
    if cached_index.is_none() && hub.cached(id, "model.safetensors").is_some() {
        return hf_cache_dir_in(hub.cache_dir(), id);
    }
    let index = match cached_index {
        Some(p) => Some(p),
        None => hub.optional_file(id, "model.safetensors.index.json")?,
    };
    let Some(index) = index else {
        return match hub.optional_file(id, "model.safetensors")? {
            Some(_) => hf_cache_dir_in(hub.cache_dir(), id),
            // Offline and not cached: the Hub's one line naming HF_HUB_OFFLINE.
            None if hub.offline() => hub.file(id, "model.safetensors").map(|_| snapshot),
            None => Err(Error::Weights {
                path: snapshot,
                reason: format!("model {id} has neither model.safetensors nor model.safetensors.index.json on the Hub (vramcal reads safetensors weights)"),
            }),
        };
    };
    let text = crate::input::read_text_capped(&index)?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Weights {
        path: index.clone(),
        reason: format!("not JSON: {e}"),
    })?;
    let mut shards: Vec<String> = v["weight_map"]
        .as_object()
        .ok_or_else(|| Error::Weights {
            path: index.clone(),
            reason: "no weight_map object".into(),
        })?
        .values()
        .filter_map(|f| f.as_str().map(String::from))
        .collect();
    shards.sort();
    shards.dedup();
    for f in &shards {
        let plain =
            !f.is_empty() && !f.contains(['/', '\\']) && f != ".." && f.ends_with(".safetensors");
        if !plain {
            return Err(Error::Weights {
                path: index.clone(),
                reason: format!(
                    "weight_map names {f:?}, not a .safetensors file of the repository"
                ),
            });
        }
        hub.file(id, f)?;
    }
    hf_cache_dir_in(hub.cache_dir(), id)
}

/// The browser build (`web/`) reads no weights and has no Hugging Face cache.
///
/// # Errors
/// Always [`Error::Weights`].
#[cfg(target_arch = "wasm32")]
pub fn hf_cache_dir_in(hub: &Path, id: &str) -> Result<PathBuf> {
    hf_cache_dir(id).map(|_| hub.to_path_buf())
}

/// The browser build (`web/`) reads no weights and has no Hugging Face cache.
///
/// # Errors
/// Always [`Error::Weights`].
#[cfg(target_arch = "wasm32")]
pub fn hf_cache_dir(id: &str) -> Result<PathBuf> {
    Err(Error::Weights {
        path: PathBuf::from(id),
        reason: "the browser build reads no weights".into(),
    })
}
