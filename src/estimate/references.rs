//! Reference formulas people use, printed beside vramcal's estimate (each with its source).

use crate::config::ModelConfig;
use crate::spec::TrainSpec;

/// A reference estimate of the peak.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Reference {
    /// Name of the formula.
    pub name: &'static str,
    /// Where it comes from.
    pub source: &'static str,
    /// Predicted bytes.
    pub bytes: u64,
    /// The formula.
    pub formula: String,
}

/// The project seed's rule of thumb: 2 bytes per parameter of weights, 8 bytes per trainable
/// parameter of AdamW states, and `batch·seq·hidden·layers·2` bytes of activations.
pub fn seed_rule(cfg: &ModelConfig, spec: &TrainSpec) -> Reference {
    let (b, s, h, l) = (
        spec.batch as u64,
        spec.seq as u64,
        cfg.hidden_size as u64,
        cfg.num_hidden_layers as u64,
    );
    let bytes = 2 * cfg.param_count() + 8 * spec.trainable_params(cfg) + b * s * h * l * 2;
    Reference {
        name: "rule of thumb",
        source: "vramcal's seed: 2 B/param weights, 8 B/param AdamW, b·s·h·L·2 B activations",
        bytes,
        formula: "2·P + 8·P_trainable + 2·b·s·h·L".into(),
    }
}

/// Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
/// eq. 1 and §4.1): activations `s·b·h·L·(34 + 5·a·s/h)` bytes (16-bit, no parallelism),
/// `2·s·b·h·L` with full recomputation; plus 16-bit weights and gradients and fp32 AdamW
/// states (2 + 2 + 8 bytes per trainable parameter; frozen parameters 2 bytes).
pub fn korthikanti(cfg: &ModelConfig, spec: &TrainSpec) -> Reference {
    let (b, s, h, l, a) = (
        spec.batch as f64,
        spec.seq as f64,
        cfg.hidden_size as f64,
        cfg.num_hidden_layers as f64,
        cfg.num_attention_heads as f64,
    );
    let act = match spec.checkpointing {
        crate::spec::Checkpointing::None => s * b * h * l * (34.0 + 5.0 * a * s / h),
        crate::spec::Checkpointing::Every(_) => 2.0 * s * b * h * l,
    };
    let p = cfg.param_count() as f64;
    let t = spec.trainable_params(cfg) as f64;
    let bytes = 2.0 * p + 10.0 * t + act;
    Reference {
        name: "Korthikanti et al. 2022",
        source: "arXiv:2205.05198, eq. 1 (activations) and §4.1 (full recompute)",
        bytes: bytes as u64,
        formula: "2·P + 10·P_trainable + s·b·h·L·(34 + 5·a·s/h)".into(),
    }
}
