//! The weight-source trait and the sources that need no file: seeded random weights
//! (transformers' `initializer_range` 0.02) and an in-memory map (tests, conversions).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::Normal;

use crate::error::{Error, Result};

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
