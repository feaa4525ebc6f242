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

/// A precision recipe: which dtype the weights are kept in, whether autocast computes in 16
/// bits, and whether an fp32 master copy is kept (`../shared/cases/README.md`, "precision").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Precision {
    /// `fp32`: weights, gradients and compute in fp32.
    Fp32,
    /// `bf16`: everything in bf16, no autocast, no fp32 copy (`model.to(torch.bfloat16)`).
    Bf16,
    /// `fp16`: as `bf16` in fp16.
    Fp16,
    /// `amp-bf16`: fp32 weights and gradients, autocast to bf16 (HF Trainer `bf16=True` on a
    /// model loaded in fp32).
    AmpBf16,
    /// `amp-fp16`: as `amp-bf16` in fp16.
    AmpFp16,
    /// `bf16+amp`: bf16 weights as loaded, autocast on; PEFT keeps LoRA adapters in fp32.
    Bf16Amp,
    /// `fp16+amp`: as `bf16+amp` in fp16.
    Fp16Amp,
    /// `bf16-master`: bf16 weights and compute plus an fp32 master copy of the trainable
    /// weights in the optimizer (DeepSpeed `bf16` with ZeRO, Megatron).
    Bf16Master,
    /// `fp16-master`: as `bf16-master` in fp16 (DeepSpeed `fp16`, apex O2).
    Fp16Master,
}

impl Precision {
    /// Every recipe, in the order of `../shared/cases/README.md`.
    pub const ALL: [Precision; 9] = [
        Precision::Fp32,
        Precision::Bf16,
        Precision::Fp16,
        Precision::AmpBf16,
        Precision::AmpFp16,
        Precision::Bf16Amp,
        Precision::Fp16Amp,
        Precision::Bf16Master,
        Precision::Fp16Master,
    ];

    /// The recipe's name, e.g. `amp-bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
            Precision::AmpBf16 => "amp-bf16",
            Precision::AmpFp16 => "amp-fp16",
            Precision::Bf16Amp => "bf16+amp",
            Precision::Fp16Amp => "fp16+amp",
            Precision::Bf16Master => "bf16-master",
            Precision::Fp16Master => "fp16-master",
        }
    }

    /// The dtype the (frozen and trainable) weights are stored in.
    pub fn weights(self) -> DType {
        match self {
            Precision::Fp32 | Precision::AmpBf16 | Precision::AmpFp16 => DType::F32,
            Precision::Bf16 | Precision::Bf16Amp | Precision::Bf16Master => DType::BF16,
            Precision::Fp16 | Precision::Fp16Amp | Precision::Fp16Master => DType::F16,
        }
    }

    /// The dtype autocast computes matrix products in, where autocast is on.
    pub fn autocast(self) -> Option<DType> {
        match self {
            Precision::AmpBf16 | Precision::Bf16Amp => Some(DType::BF16),
            Precision::AmpFp16 | Precision::Fp16Amp => Some(DType::F16),
            _ => None,
        }
    }

    /// Whether LoRA adapters are kept in fp32 over 16-bit weights (PEFT's
    /// `autocast_adapter_dtype=True`, its default, under the `+amp` recipes).
    pub fn fp32_adapters(self) -> bool {
        matches!(self, Precision::Bf16Amp | Precision::Fp16Amp)
    }

    /// Whether the optimizer keeps an fp32 master copy of the trainable weights.
    pub fn master_weights(self) -> bool {
        matches!(self, Precision::Bf16Master | Precision::Fp16Master)
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;

    /// Parses a recipe name of [`Precision::ALL`], exactly.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for anything else.
    fn from_str(s: &str) -> Result<Self> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Precision::ALL.iter().map(|p| p.name()).collect();
                Error::invalid(
                    "--precision",
                    s,
                    format!("expected one of {}", names.join(", ")),
                )
            })
    }
}

impl std::fmt::Display for Precision {
    /// The name [`std::str::FromStr`] reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
