//! Weight, compute and optimizer-state dtypes by name (`f32`, `bf16`, `f16`, `f64`), as
//! `--dtype`, `--optimizer-state-dtype` and the CSV's `dtype` columns write them.

use candle_core::DType;

use crate::error::{Error, Result};

/// Parses a dtype name: `f32`, `bf16`, `f16` or `f64` (also `fp32`, `float32`, `bfloat16`,
/// `fp16`, `float16`, `float64`, any case).
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

/// Short name of a dtype as used in CSV rows (`f32`, `bf16`, …); [`parse_dtype`] reads it back.
pub fn dtype_name(d: DType) -> &'static str {
    d.as_str()
}
