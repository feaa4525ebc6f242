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
