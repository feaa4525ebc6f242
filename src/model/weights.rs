//! Where parameters come from: random initialization, Hugging Face safetensors (single file or
//! sharded), a model in the Hugging Face cache, or a GGUF file (see [`super::gguf`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::Normal;

use crate::error::{candle_msg, Error, Result};

/// A provider of named parameter tensors.
pub trait WeightSource {
    /// Returns tensor `name` (HF path) with `shape`, converted to `dtype` on `device`.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] if absent, [`Error::WeightShape`] if the stored shape differs,
    /// [`Error::Weights`] if the stored data is unreadable.
    fn tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor>;

    /// Checks, without reading the data, that tensor `name` exists with `shape` and that its
    /// data lies within the file. The default (random weights) accepts everything.
    ///
    /// # Errors
    /// As [`WeightSource::tensor`].
    fn check(&mut self, name: &str, shape: &[usize]) -> Result<()> {
        let _ = (name, shape);
        Ok(())
    }

    /// Names of the tensors the source holds, where it can list them (empty otherwise).
    fn names(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Checks every parameter of `cfg` against `src` before anything is loaded, so bad weights
/// are reported before a measurement starts.
///
/// # Errors
/// The first [`Error::MissingTensor`], [`Error::WeightShape`] or [`Error::Weights`].
pub fn check_all(
    src: &mut dyn WeightSource,
    cfg: &crate::config::ModelConfig,
    path: &Path,
) -> Result<()> {
    let shapes = cfg.param_shapes();
    for p in &shapes {
        src.check(&p.name, &p.shape)?;
    }
    // Model tensors the config does not describe mean the config does not match the weights
    // (more layers, an untied head); RoPE buffers some exports keep are harmless.
    let expected: std::collections::HashSet<&str> =
        shapes.iter().map(|p| p.name.as_str()).collect();
    let mut extra: Vec<String> = src
        .names()
        .into_iter()
        .filter(|n| {
            (n.starts_with("model.") || n.starts_with("lm_head.")) && !n.contains("rotary_emb")
        })
        .filter(|n| !expected.contains(n.as_str()))
        .collect();
    extra.sort();
    if let Some(first) = extra.first() {
        return Err(Error::Weights {
            path: path.to_path_buf(),
            reason: format!(
                "{} tensor(s) the model config does not describe, e.g. {first}: do the weights belong to another config?",
                extra.len()
            ),
        });
    }
    Ok(())
}

/// The `--weights` argument, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightsSpec {
    /// Random initialization (normal, std 0.02 as transformers' `initializer_range`; norms 1).
    Random {
        /// RNG seed.
        seed: u64,
    },
    /// A folder with `model.safetensors` or `model.safetensors.index.json` (HF layout).
    Safetensors(PathBuf),
    /// A single `.safetensors` file.
    SafetensorsFile(PathBuf),
    /// A GGUF file (llama architecture), dequantized.
    Gguf(PathBuf),
    /// A model id resolved in the local Hugging Face cache (offline).
    HfCache(String),
}

impl WeightsSpec {
    /// Parses `random`, `hf:<org/name>`, a `.gguf` file, a `.safetensors` file or a folder.
    ///
    /// # Errors
    /// [`Error::Weights`] if a path does not exist or is of an unknown kind.
    pub fn parse(s: &str, seed: u64) -> Result<Self> {
        if s == "random" {
            return Ok(WeightsSpec::Random { seed });
        }
        if let Some(id) = s.strip_prefix("hf:") {
            return Ok(WeightsSpec::HfCache(id.to_string()));
        }
        let p = PathBuf::from(s);
        if !p.exists() {
            return Err(Error::Weights {
                path: p,
                reason: "no such file or folder (expected `random`, `hf:<model-id>`, a .gguf or .safetensors file, or a folder of safetensors)".into(),
            });
        }
        if p.is_dir() {
            return Ok(WeightsSpec::Safetensors(p));
        }
        match p.extension().and_then(|e| e.to_str()) {
            Some("gguf") => Ok(WeightsSpec::Gguf(p)),
            Some("safetensors") => Ok(WeightsSpec::SafetensorsFile(p)),
            _ => Err(Error::Weights {
                path: p,
                reason: "unknown weights file type (expected .gguf or .safetensors)".into(),
            }),
        }
    }

    /// Short description for tables and CSV rows.
    pub fn describe(&self) -> String {
        match self {
            WeightsSpec::Random { seed } => format!("random(seed={seed})"),
            WeightsSpec::Safetensors(p) | WeightsSpec::SafetensorsFile(p) => {
                format!("safetensors:{}", file_label(p))
            }
            WeightsSpec::Gguf(p) => format!("gguf:{}", file_label(p)),
            WeightsSpec::HfCache(id) => format!("hf:{id}"),
        }
    }
}

fn file_label(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Random weights: linear and embedding matrices ~ N(0, 0.02²), norm weights 1.
///
/// On the CPU the values come from a seeded host generator, in the target dtype directly. On a
/// GPU they are drawn on the device (cuRAND, seeded once with the same seed, then cast from f32):
/// a 7B model would otherwise spend about a minute in a single-threaded host generator per
/// measured point. The same seed gives the same weights on one device kind, not across them.
pub struct RandomWeights {
    rng: StdRng,
    seed: u64,
    device_seeded: bool,
    std: f64,
}

impl RandomWeights {
    /// Seeded random source with transformers' default `initializer_range` 0.02.
    pub fn new(seed: u64) -> Self {
        RandomWeights {
            rng: StdRng::seed_from_u64(seed),
            seed,
            device_seeded: false,
            std: 0.02,
        }
    }
}

impl WeightSource for RandomWeights {
    fn tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if shape.len() == 1 && name.ends_with("norm.weight") {
            return Ok(Tensor::ones(shape, dtype, device)?);
        }
        if !device.is_cpu() {
            if !self.device_seeded {
                device.set_seed(self.seed)?;
                self.device_seeded = true;
            }
            return Ok(Tensor::randn(0f32, self.std as f32, shape, device)?.to_dtype(dtype)?);
        }
        let dist = Normal::new(0.0f64, self.std).expect("std is positive");
        // Generate directly in the target dtype: no transient f32 copy of half weights.
        let t = match dtype {
            DType::F64 => {
                let v: Vec<f64> = (0..n).map(|_| self.rng.sample(dist)).collect();
                Tensor::from_vec(v, shape, device)?
            }
            DType::BF16 => {
                let v: Vec<half::bf16> = (0..n)
                    .map(|_| half::bf16::from_f64(self.rng.sample(dist)))
                    .collect();
                Tensor::from_vec(v, shape, device)?
            }
            DType::F16 => {
                let v: Vec<half::f16> = (0..n)
                    .map(|_| half::f16::from_f64(self.rng.sample(dist)))
                    .collect();
                Tensor::from_vec(v, shape, device)?
            }
            _ => {
                let v: Vec<f32> = (0..n).map(|_| self.rng.sample(dist) as f32).collect();
                Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?
            }
        };
        Ok(t)
    }
}

/// Weights from an in-memory map (tests, conversions).
pub struct MapWeights {
    /// Tensors by HF name.
    pub tensors: HashMap<String, Tensor>,
    /// Label for error messages.
    pub path: PathBuf,
}

impl WeightSource for MapWeights {
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn check(&mut self, name: &str, shape: &[usize]) -> Result<()> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.into(),
        })?;
        check_shape(&self.path, name, shape, t.dims())
    }

    fn tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                name: name.into(),
            })?;
        check_shape(&self.path, name, shape, t.dims())?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}

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

impl WeightSource for SafetensorsWeights {
    fn names(&self) -> Vec<String> {
        self.files.keys().cloned().collect()
    }

    fn check(&mut self, name: &str, shape: &[usize]) -> Result<()> {
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

    fn tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.check(name, shape)?;
        let t = self.st.load(name, device).map_err(|e| Error::Weights {
            path: self.files.get(name).cloned().unwrap_or_default(),
            reason: format!("{name}: {}", candle_msg(&e)),
        })?;
        Ok(t.to_dtype(dtype)?)
    }
}

/// Checks a stored shape against the config's.
///
/// # Errors
/// [`Error::WeightShape`].
pub fn check_shape(path: &Path, name: &str, expected: &[usize], found: &[usize]) -> Result<()> {
    if expected != found {
        return Err(Error::WeightShape {
            path: path.to_path_buf(),
            name: name.into(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        });
    }
    Ok(())
}

/// Opens the weight source for `spec`.
///
/// # Errors
/// As the sources' constructors; [`Error::Weights`] when an `hf:` model is not in the cache.
pub fn open_source(spec: &WeightsSpec) -> Result<Box<dyn WeightSource>> {
    Ok(match spec {
        WeightsSpec::Random { seed } => Box::new(RandomWeights::new(*seed)),
        WeightsSpec::Safetensors(p) | WeightsSpec::SafetensorsFile(p) => {
            Box::new(SafetensorsWeights::open(p)?)
        }
        WeightsSpec::Gguf(p) => Box::new(super::gguf::GgufWeights::open(p)?),
        WeightsSpec::HfCache(id) => {
            let dir = hf_cache_dir(id)?;
            Box::new(SafetensorsWeights::open(&dir)?)
        }
    })
}

/// The snapshot folder of model `id` in the Hugging Face cache rooted at `hub` (the folder
/// holding `models--org--name`).
///
/// # Errors
/// [`Error::Weights`] when the model has no cached `config.json` and safetensors.
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
            reason: format!("model {id} is in the local Hugging Face cache without model.safetensors or model.safetensors.index.json (vramcal does not download)"),
        }),
        _ => Err(Error::Weights {
            path,
            reason: format!("model {id} is not in the local Hugging Face cache (config.json and safetensors needed; vramcal does not download)"),
        }),
    }
}

/// The snapshot folder of model `id` in the local Hugging Face cache.
///
/// # Errors
/// [`Error::Weights`] when the model has no cached `config.json` and safetensors.
pub fn hf_cache_dir(id: &str) -> Result<PathBuf> {
    hf_cache_dir_in(hf_hub::Cache::from_env().path(), id)
}
