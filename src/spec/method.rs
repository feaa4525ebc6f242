//! How the base model is adapted: full fine-tuning, LoRA (Hu et al. 2021) or QLoRA (Dettmers et
//! al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs": LoRA on an NF4 base), and the base's
//! quantization.

use std::fmt;
use std::str::FromStr;

use candle_core::DType;
use serde::{Deserialize, Serialize};

use super::lora::LoraConfig;
use crate::error::{Error, Result};

/// The fine-tuning method: what `--method` and the CSV's `method` column name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Method {
    /// Every parameter trained.
    Full,
    /// LoRA adapters on a frozen base in the compute dtype.
    Lora,
    /// LoRA adapters on a frozen NF4 base.
    Qlora,
}

impl Method {
    /// All three.
    pub const ALL: [Method; 3] = [Method::Full, Method::Lora, Method::Qlora];

    /// Label: `full`, `lora` or `qlora`.
    pub fn label(self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::Lora => "lora",
            Method::Qlora => "qlora",
        }
    }
}

impl FromStr for Method {
    type Err = Error;

    /// Parses `full`, `lora` or `qlora`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for anything else.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(Method::Full),
            "lora" => Ok(Method::Lora),
            "qlora" => Ok(Method::Qlora),
            _ => Err(Error::invalid(
                "--method",
                s,
                "expected full, lora or qlora",
            )),
        }
    }
}

impl fmt::Display for Method {
    /// The label [`FromStr`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Quantization of the frozen base's linear weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Quant {
    /// None: base weights in the compute dtype.
    #[default]
    None,
    /// NF4 with one f32 absmax per 64 values; `double` quantizes the absmax values too.
    Nf4 {
        /// Double quantization of the absmax values.
        double: bool,
    },
}

impl Quant {
    /// CSV label: `none`, `nf4` or `nf4-dq`.
    pub fn label(self) -> &'static str {
        match self {
            Quant::None => "none",
            Quant::Nf4 { double: false } => "nf4",
            Quant::Nf4 { double: true } => "nf4-dq",
        }
    }
}

/// How the base model is adapted: full fine-tuning (no LoRA), LoRA, or QLoRA (LoRA + NF4).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Adaptation {
    /// LoRA settings; `None` for full fine-tuning.
    pub lora: Option<LoraConfig>,
    /// Quantization of the frozen base (only with LoRA).
    pub quant: Quant,
    /// Seed of the adapters' initialization.
    pub seed: u64,
}

impl Adaptation {
    /// The method this adaptation is.
    pub fn kind(&self) -> Method {
        match (&self.lora, self.quant) {
            (None, _) => Method::Full,
            (Some(_), Quant::None) => Method::Lora,
            (Some(_), Quant::Nf4 { .. }) => Method::Qlora,
        }
    }

    /// CSV label of the method: `full`, `lora` or `qlora`.
    pub fn method(&self) -> &'static str {
        self.kind().label()
    }

    /// Checks the combination.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for a quantized base without LoRA (a 4-bit base cannot be
    /// trained) or NF4 with a compute dtype it cannot dequantize into.
    pub fn validate(&self, dtype: DType) -> Result<()> {
        if let Some(l) = &self.lora {
            l.validate()?;
        }
        if let Quant::Nf4 { .. } = self.quant {
            if self.lora.is_none() {
                return Err(Error::invalid(
                    "--quant",
                    self.quant.label(),
                    "a quantized base is frozen: use it with LoRA (--method qlora)",
                ));
            }
            check_quant_dtype(dtype)?;
        }
        Ok(())
    }
}

/// Checks that NF4 can dequantize into `dtype`.
///
/// # Errors
/// [`Error::InvalidValue`] for a dtype other than f32, bf16 or f16.
pub fn check_quant_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 => Ok(()),
        d => Err(Error::invalid(
            "--dtype",
            d.as_str(),
            "NF4 dequantizes into a 16- or 32-bit float compute dtype (f32, bf16, f16)",
        )),
    }
}

impl FromStr for Quant {
    type Err = Error;

    /// Parses `none`, `nf4` or `nf4-dq` (NF4 with double quantization).
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for anything else.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Quant::None),
            "nf4" => Ok(Quant::Nf4 { double: false }),
            "nf4-dq" => Ok(Quant::Nf4 { double: true }),
            _ => Err(Error::invalid("--quant", s, "expected none, nf4 or nf4-dq")),
        }
    }
}

impl fmt::Display for Quant {
    /// The CSV label: `none`, `nf4` or `nf4-dq` ([`FromStr`] reads it back).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}
