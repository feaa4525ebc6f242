//! Where parameters come from: random initialization, Hugging Face safetensors (single file or
//! sharded), a model in the Hugging Face cache, or a GGUF file; and the tokenizer a GGUF file
//! carries. The sources implement [`WeightSource`] ([`source`]); [`open_source`] picks one for
//! a parsed `--weights` ([`crate::spec::WeightsSpec`]). Imports run one way: `source` ←
//! `safetensors`, `gguf` ← this module.

pub mod gguf;
pub mod safetensors;
pub mod source;
pub mod tokenizer;

use std::path::Path;

pub use gguf::GgufWeights;
pub use safetensors::{hf_cache_dir, hf_cache_dir_in, SafetensorsWeights};
pub use source::{check_shape, MapWeights, RandomWeights, WeightSource};

use crate::error::{Error, Result};
use crate::spec::WeightsSpec;

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
        WeightsSpec::Gguf(p) => Box::new(GgufWeights::open(p)?),
        WeightsSpec::HfCache(id) => {
            let dir = hf_cache_dir(id)?;
            Box::new(SafetensorsWeights::open(&dir)?)
        }
    })
}
