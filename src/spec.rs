//! The training setup to measure (`TrainSpec`) and the one place that rejects bad sizes.

use candle_core::DType;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::optim::AdamWConfig;

/// Parses a dtype name: `f32`, `bf16`, `f16` or `f64`.
///
/// # Errors
/// [`Error::InvalidValue`] for anything else.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        "f64" | "float64" => Ok(DType::F64),
        _ => Err(Error::invalid("dtype", s, "expected f32, bf16, f16 or f64")),
    }
}

/// Short name of a dtype as used in CSV rows (`f32`, `bf16`, …).
pub fn dtype_name(d: DType) -> &'static str {
    d.as_str()
}

/// One training configuration to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSpec {
    /// Sequences per step (micro-batch).
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Weight and compute dtype.
    pub dtype: DType,
    /// AdamW moment dtype.
    pub state_dtype: DType,
    /// AdamW hyper-parameters.
    pub adamw: AdamWConfig,
    /// Allow `seq` above `max_position_embeddings`.
    pub allow_longer: bool,
    /// Seed of the random token batches.
    pub data_seed: u64,
}

impl TrainSpec {
    /// A spec with default dtype f32, f32 AdamW states and default hyper-parameters.
    pub fn new(batch: usize, seq: usize) -> Self {
        TrainSpec {
            batch,
            seq,
            dtype: DType::F32,
            state_dtype: DType::F32,
            adamw: AdamWConfig::default(),
            allow_longer: false,
            data_seed: 0,
        }
    }

    /// Tokens per step (`batch · seq`).
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }

    /// Checks the spec against the model: positive sizes, `seq ≤ max_position_embeddings`
    /// (unless `allow_longer`), and sizes whose byte counts fit in 64 bits.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] or [`Error::SeqTooLong`].
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        if self.batch == 0 {
            return Err(Error::invalid("--batch", 0, "must be at least 1"));
        }
        if self.seq == 0 {
            return Err(Error::invalid("--seq", 0, "must be at least 1"));
        }
        if self.seq > cfg.max_position_embeddings && !self.allow_longer {
            return Err(Error::SeqTooLong {
                seq: self.seq,
                max: cfg.max_position_embeddings,
            });
        }
        if !matches!(
            self.dtype,
            DType::F32 | DType::BF16 | DType::F16 | DType::F64
        ) {
            return Err(Error::invalid(
                "--dtype",
                self.dtype.as_str(),
                "expected f32, bf16, f16 or f64",
            ));
        }
        if self.min_bytes(cfg).is_none() {
            return Err(Error::invalid(
                "sizes",
                format!("batch {} × seq {}", self.batch, self.seq),
                "the memory this needs overflows 64 bits",
            ));
        }
        Ok(())
    }

    /// A lower bound of the peak (bytes) that no implementation can go below: weights,
    /// gradients and AdamW states, plus f32 logits `(batch, seq, vocab)`. `None` on overflow.
    pub fn min_bytes(&self, cfg: &ModelConfig) -> Option<u64> {
        let n = cfg.checked_param_count()?;
        let w = self.dtype.size_in_bytes() as u64;
        let s = self.state_dtype.size_in_bytes() as u64;
        let per_param = w.checked_mul(2)?.checked_add(s.checked_mul(2)?)?;
        let logits = (self.batch as u64)
            .checked_mul(self.seq as u64)?
            .checked_mul(cfg.vocab_size as u64)?
            .checked_mul(4)?;
        n.checked_mul(per_param)?.checked_add(logits)
    }
}

/// Physical memory of this machine in bytes (`MemTotal` of `/proc/meminfo`), if known.
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Formats bytes as GiB (2^30 bytes) with two decimals, for display only.
pub fn gib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / (1u64 << 30) as f64)
}
