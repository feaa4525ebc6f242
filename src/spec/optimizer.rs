//! The optimizer's hyper-parameters (AdamW, Loshchilov & Hutter 2019, "Decoupled Weight Decay
//! Regularization", Algorithm 2), with Hugging Face `TrainingArguments`' defaults.

use crate::error::{Error, Result};

/// AdamW hyper-parameters. Defaults are Hugging Face `TrainingArguments`' (lr 5e-5,
/// betas (0.9, 0.999), eps 1e-8, weight decay 0).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay β1.
    pub beta1: f64,
    /// Second-moment decay β2.
    pub beta2: f64,
    /// ε added to √v̂.
    pub eps: f64,
    /// Decoupled weight decay λ.
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// Checks the ranges: finite non-negative learning rate and weight decay, betas in
    /// [0, 1), positive eps (as `torch.optim.AdamW` requires).
    ///
    /// # Errors
    /// [`Error::InvalidValue`] naming the option.
    pub fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(Error::invalid(
                "--lr",
                self.lr,
                "must be finite and non-negative",
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::invalid(
                "--weight-decay",
                self.weight_decay,
                "must be finite and non-negative",
            ));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::invalid(name, b, "must be in [0, 1)"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::invalid("eps", self.eps, "must be positive"));
        }
        Ok(())
    }
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 5e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Which optimizer trains, by Hugging Face `TrainingArguments.optim` name (transformers
/// `training_args.py` `OptimizerNames`; `../shared/cases/README.md`, column `optimizer`). What
/// each keeps and allocates while stepping is the estimator's (`src/estimate/torch.rs`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub enum Optimizer {
    /// `adamw_torch`: `torch.optim.AdamW` with torch's default implementation (foreach on
    /// CUDA tensors, one tensor at a time on the CPU); vramcal's own step trains with this.
    #[default]
    AdamwTorch,
    /// `adamw_torch_fused`: `torch.optim.AdamW(fused=True)`.
    AdamwTorchFused,
    /// `adamw_bnb_8bit`: bitsandbytes' `AdamW8bit` (blockwise 8-bit states).
    AdamwBnb8bit,
    /// `paged_adamw_8bit`: bitsandbytes' `PagedAdamW8bit` (8-bit states in CUDA unified memory).
    PagedAdamw8bit,
    /// `paged_adamw_32bit`: bitsandbytes' `PagedAdamW32bit` (fp32 states in unified memory).
    PagedAdamw32bit,
    /// `adafactor`: transformers' `Adafactor` (factored second moments).
    Adafactor,
    /// `sgd`: `torch.optim.SGD` as the Trainer builds it (momentum 0: no state).
    Sgd,
}

impl Optimizer {
    /// Every optimizer, in the order of `../shared/cases/README.md`.
    pub const ALL: [Optimizer; 7] = [
        Optimizer::AdamwTorch,
        Optimizer::AdamwTorchFused,
        Optimizer::AdamwBnb8bit,
        Optimizer::PagedAdamw8bit,
        Optimizer::PagedAdamw32bit,
        Optimizer::Adafactor,
        Optimizer::Sgd,
    ];

    /// Short names accepted beside the HF ones (those of vramcal's issue tracker and CLI
    /// habits), each for exactly one optimizer.
    pub const ALIASES: [(&'static str, Optimizer); 4] = [
        ("adamw", Optimizer::AdamwTorch),
        ("adamw-8bit", Optimizer::AdamwBnb8bit),
        ("paged-adamw-8bit", Optimizer::PagedAdamw8bit),
        ("paged-adamw-32bit", Optimizer::PagedAdamw32bit),
    ];

    /// The HF `optim` name, e.g. `adamw_torch_fused`.
    pub fn name(self) -> &'static str {
        match self {
            Optimizer::AdamwTorch => "adamw_torch",
            Optimizer::AdamwTorchFused => "adamw_torch_fused",
            Optimizer::AdamwBnb8bit => "adamw_bnb_8bit",
            Optimizer::PagedAdamw8bit => "paged_adamw_8bit",
            Optimizer::PagedAdamw32bit => "paged_adamw_32bit",
            Optimizer::Adafactor => "adafactor",
            Optimizer::Sgd => "sgd",
        }
    }
}

impl std::str::FromStr for Optimizer {
    type Err = Error;

    /// Parses an HF `optim` name of [`Optimizer::ALL`] or one of [`Optimizer::ALIASES`],
    /// exactly.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for anything else, listing the accepted names.
    fn from_str(s: &str) -> Result<Self> {
        Optimizer::ALL
            .into_iter()
            .find(|o| o.name() == s)
            .or_else(|| {
                Optimizer::ALIASES
                    .iter()
                    .find(|(a, _)| *a == s)
                    .map(|(_, o)| *o)
            })
            .ok_or_else(|| {
                let names: Vec<&str> = Optimizer::ALL.iter().map(|o| o.name()).collect();
                let aliases: Vec<&str> = Optimizer::ALIASES.iter().map(|(a, _)| *a).collect();
                Error::invalid(
                    "--optimizer",
                    s,
                    format!(
                        "expected one of {} (or {})",
                        names.join(", "),
                        aliases.join(", ")
                    ),
                )
            })
    }
}

impl std::fmt::Display for Optimizer {
    /// The HF name [`std::str::FromStr`] reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which of torch's AdamW implementations steps `adamw_torch` (torch's `AdamW` documentation,
/// "Algorithm implementations": for-loop, foreach, fused; `adamw_torch_fused` is the fused
/// one). They differ in the step's transient memory only (`torch/optim/adam.py`, torch 2.15,
/// whose `Adam` torch's `AdamW` subclasses: `_single_tensor_adam` makes `exp_avg_sq.sqrt()`
/// and its division by the bias correction out of place, two buffers of one tensor at a time;
/// `_multi_tensor_adam`'s `_foreach_sqrt` one buffer of every tensor of the group at once).
/// torch ≥ 2.0 picks foreach for CUDA tensors and for-loop for CPU tensors unless `foreach=`
/// says otherwise; torch 1.x always picked for-loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TorchAdamw {
    /// `_single_tensor_adam` (`foreach=False`; torch 1.x's only step; CPU tensors' default).
    ForLoop,
    /// `_multi_tensor_adam` (`foreach=True`; CUDA tensors' default since torch 2.0).
    Foreach,
}

impl TorchAdamw {
    /// CLI and reference-row label: `for-loop` or `foreach`.
    pub fn label(self) -> &'static str {
        match self {
            TorchAdamw::ForLoop => "for-loop",
            TorchAdamw::Foreach => "foreach",
        }
    }
}

impl std::str::FromStr for TorchAdamw {
    type Err = Error;

    /// Parses `for-loop` or `foreach`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for anything else.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "for-loop" => Ok(TorchAdamw::ForLoop),
            "foreach" => Ok(TorchAdamw::Foreach),
            _ => Err(Error::invalid(
                "--torch-adamw",
                s,
                "expected for-loop or foreach (torch's AdamW implementations; the fused one is --optimizer adamw_torch_fused)",
            )),
        }
    }
}

impl std::fmt::Display for TorchAdamw {
    /// The label [`std::str::FromStr`] reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}
