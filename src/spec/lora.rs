//! LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3):
//! `y = W0·x + (alpha / r)·B·A·x` with `A` `(r, in)` Kaiming-uniform and `B` `(out, r)` zero,
//! the base `W0` frozen. Names and defaults follow PEFT's `LoraConfig`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A linear module of the decoder layer that LoRA can adapt (HF names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// `self_attn.q_proj`
    QProj,
    /// `self_attn.k_proj`
    KProj,
    /// `self_attn.v_proj`
    VProj,
    /// `self_attn.o_proj`
    OProj,
    /// `mlp.gate_proj`
    GateProj,
    /// `mlp.up_proj`
    UpProj,
    /// `mlp.down_proj`
    DownProj,
}

impl Target {
    /// All seven, in layer order.
    pub const ALL: [Target; 7] = [
        Target::QProj,
        Target::KProj,
        Target::VProj,
        Target::OProj,
        Target::GateProj,
        Target::UpProj,
        Target::DownProj,
    ];

    /// HF module name, e.g. `q_proj`.
    pub fn name(self) -> &'static str {
        match self {
            Target::QProj => "q_proj",
            Target::KProj => "k_proj",
            Target::VProj => "v_proj",
            Target::OProj => "o_proj",
            Target::GateProj => "gate_proj",
            Target::UpProj => "up_proj",
            Target::DownProj => "down_proj",
        }
    }

    /// Path inside a decoder layer, e.g. `self_attn.q_proj`.
    pub fn path(self) -> &'static str {
        match self {
            Target::QProj => "self_attn.q_proj",
            Target::KProj => "self_attn.k_proj",
            Target::VProj => "self_attn.v_proj",
            Target::OProj => "self_attn.o_proj",
            Target::GateProj => "mlp.gate_proj",
            Target::UpProj => "mlp.up_proj",
            Target::DownProj => "mlp.down_proj",
        }
    }

    fn parse_group(s: &str) -> Option<Vec<Target>> {
        let one = |t| Some(vec![t]);
        match s {
            "q" | "q_proj" => one(Target::QProj),
            "k" | "k_proj" => one(Target::KProj),
            "v" | "v_proj" => one(Target::VProj),
            "o" | "o_proj" => one(Target::OProj),
            "gate" | "gate_proj" => one(Target::GateProj),
            "up" | "up_proj" => one(Target::UpProj),
            "down" | "down_proj" => one(Target::DownProj),
            "attn" => Some(Target::ALL[..4].to_vec()),
            "mlp" => Some(Target::ALL[4..].to_vec()),
            _ => None,
        }
    }
}

/// The largest LoRA rank accepted: 2^20, above every layer width, so that parameter and byte
/// counts stay far inside 64 bits.
pub const MAX_RANK: usize = 1 << 20;

/// LoRA hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank `r`.
    pub r: usize,
    /// Scaling numerator `alpha` (the update is scaled by `alpha / r`).
    pub alpha: f64,
    /// Dropout probability on the adapter input, in [0, 1).
    pub dropout: f64,
    /// Adapted modules of every decoder layer, sorted, no duplicates.
    pub targets: Vec<Target>,
    /// An adapter on `lm_head` (PEFT: a LoRA `Linear`; `all-linear` leaves it out).
    #[serde(default)]
    pub lm_head: bool,
    /// An adapter on `embed_tokens` (PEFT's LoRA `Embedding`: `A` `(r, V)` used as an embedding
    /// table, `B` `(h, r)` a linear).
    #[serde(default)]
    pub embed_tokens: bool,
    /// The targets were given as PEFT's `all-linear` (`targets` then holds all seven). On a
    /// dense model that is exactly the seven `*_proj`; on a Mixtral model, which has no
    /// `gate_proj`/`up_proj`/`down_proj` modules, it is `q/k/v/o_proj` plus the router
    /// `mlp.gate.weight` and both expert tensors (PEFT 0.21
    /// `utils/transformers_weight_conversion.py`, `_convert_peft_config_moe`; see
    /// [`LoraConfig::experts_adapted`]).
    #[serde(default)]
    pub all_linear: bool,
    /// PEFT's `modules_to_save` on `lm_head`: a trainable full copy of the head, `(V, h)`,
    /// with its own gradient and optimizer states (PEFT 0.21.2 `utils/other.py`,
    /// `ModulesToSaveWrapper`: the original stays frozen beside the copy, tied or not).
    #[serde(default)]
    pub save_lm_head: bool,
    /// PEFT's `modules_to_save` on `embed_tokens`: a trainable full copy of the embedding
    /// table, `(V, h)`, as [`LoraConfig::save_lm_head`].
    #[serde(default)]
    pub save_embed_tokens: bool,
}

impl Default for LoraConfig {
    /// PEFT's defaults: r 8, alpha 8, dropout 0, targets `q_proj,v_proj` (its Llama default).
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec![Target::QProj, Target::VProj],
            lm_head: false,
            embed_tokens: false,
            all_linear: false,
            save_lm_head: false,
            save_embed_tokens: false,
        }
    }
}

impl LoraConfig {
    /// Checks the ranges.
    ///
    /// # Errors
    /// [`Error::InvalidValue`].
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::invalid("--lora r", 0, "rank must be at least 1"));
        }
        if self.r > MAX_RANK {
            return Err(Error::invalid(
                "--lora r",
                self.r,
                format!("rank must be at most {MAX_RANK} (wider than any layer it adapts)"),
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::invalid(
                "--lora alpha",
                self.alpha,
                "must be positive",
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid(
                "--lora dropout",
                self.dropout,
                "must be in [0, 1)",
            ));
        }
        if self.targets.is_empty() && !self.lm_head && !self.embed_tokens {
            return Err(Error::invalid(
                "--lora targets",
                "",
                "at least one target module is needed",
            ));
        }
        for (name, adapted, saved) in [
            ("lm_head", self.lm_head, self.save_lm_head),
            ("embed_tokens", self.embed_tokens, self.save_embed_tokens),
        ] {
            if adapted && saved {
                return Err(Error::invalid(
                    "--lora modules_to_save",
                    name,
                    format!("{name} is both a LoRA target and in modules_to_save: PEFT trains a module one way; keep it in one list"),
                ));
            }
        }
        Ok(())
    }

    /// `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Targets as `q_proj;v_proj` (the CSV's `lora_targets` of vramcal's own rows), `lm_head`
    /// and `embed_tokens` last; `all-linear` as its seven names, as rows of dense models have
    /// always listed it (`sweep --resume` matches them), but as the word on a mixture of
    /// experts (`moe`), which has no `gate_proj`/`up_proj`/`down_proj` modules and whose
    /// router and experts PEFT adapts under it.
    pub fn targets_label(&self, moe: bool) -> String {
        self.names_with_all_linear(moe && self.all_linear).join(";")
    }

    /// A short description for tables: `r16 all-linear` (the seven layer modules, however
    /// given), `r8 q_proj,v_proj,lm_head`.
    pub fn short_label(&self) -> String {
        let names = self.names_with_all_linear(self.targets == Target::ALL);
        let mut s = format!("r{} {}", self.r, names.join(","));
        if self.saves_modules() {
            s.push_str(&format!(" +full {}", self.saved_names().join(",")));
        }
        s
    }

    /// Whether PEFT's `modules_to_save` names a module ([`LoraConfig::save_lm_head`],
    /// [`LoraConfig::save_embed_tokens`]).
    pub fn saves_modules(&self) -> bool {
        self.save_lm_head || self.save_embed_tokens
    }

    /// The `modules_to_save` names, `lm_head` before `embed_tokens` (the CSV's
    /// `modules_to_save`, `;`-joined).
    pub fn saved_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.save_lm_head {
            v.push("lm_head");
        }
        if self.save_embed_tokens {
            v.push("embed_tokens");
        }
        v
    }

    /// Parameters of the `modules_to_save` copies: `V·h` each.
    pub fn saved_param_count(&self, cfg: &crate::config::ModelConfig) -> u64 {
        (self.save_lm_head as u64 + self.save_embed_tokens as u64)
            * (cfg.vocab_size as u64 * cfg.hidden_size as u64)
    }

    /// [`LoraConfig::target_names`], with `all-linear` in place of the seven where given so
    /// (what [`fmt::Display`] writes: on a Mixtral model `all-linear` adapts modules that have
    /// no `*_proj` name).
    fn label_names(&self) -> Vec<&'static str> {
        self.names_with_all_linear(self.all_linear)
    }

    /// [`LoraConfig::target_names`], the seven layer modules written `all-linear` where `all`.
    fn names_with_all_linear(&self, all: bool) -> Vec<&'static str> {
        if !all {
            return self.target_names();
        }
        let mut v = vec!["all-linear"];
        v.extend(self.target_names().into_iter().skip(Target::ALL.len()));
        v
    }

    /// The decoder layers' targeted `*_proj` modules of `cfg`: [`LoraConfig::targets`], but for
    /// a mixture-of-experts model only the attention's (its MLP is a router and 3-D expert
    /// tensors, adapted under `all-linear`: [`LoraConfig::experts_adapted`]).
    pub fn layer_targets(&self, cfg: &crate::config::ModelConfig) -> Vec<Target> {
        let moe = cfg.moe().is_some();
        self.targets
            .iter()
            .copied()
            .filter(|t| !moe || Target::ALL[..4].contains(t))
            .collect()
    }

    /// Whether PEFT adapts a mixture-of-experts block of `cfg`: `all-linear` on a Mixtral model
    /// targets the router `mlp.gate.weight` (LoRA `A` `(r, h)`, `B` `(E, r)`) and, through
    /// `target_parameters`, `mlp.experts.gate_up_proj` at rank and alpha doubled (`w1` and `w3`
    /// fused: `A` `(2r·E, h)`, `B` `(2i, 2r·E)`) and `mlp.experts.down_proj` (`A` `(r·E, i)`,
    /// `B` `(h, r·E)`) (PEFT 0.21.2 `tuners/lora/layer.py` `ParamWrapper`; measured:
    /// `results/torch-cpu/mixtral-mini.csv`'s trainable counts).
    pub fn experts_adapted(&self, cfg: &crate::config::ModelConfig) -> bool {
        self.all_linear && cfg.moe().is_some()
    }

    /// Every target's HF name: the layers' in layer order, then `lm_head`, `embed_tokens`.
    pub fn target_names(&self) -> Vec<&'static str> {
        let mut v: Vec<&str> = self.targets.iter().map(|t| t.name()).collect();
        if self.lm_head {
            v.push("lm_head");
        }
        if self.embed_tokens {
            v.push("embed_tokens");
        }
        v
    }

    /// Whether an adapter sits outside the decoder layers (`lm_head`, `embed_tokens`).
    pub fn top_level(&self) -> bool {
        self.lm_head || self.embed_tokens
    }
}

impl fmt::Display for LoraConfig {
    /// `r=…,alpha=…,dropout=…,targets=…[,modules_to_save=…]`, which [`FromStr`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // f64's Display writes every digit (1e-300 as 300 of them); the exponent form reads
        // back the same.
        let short = |x: f64| {
            let s = x.to_string();
            if s.len() > 24 {
                format!("{x:e}")
            } else {
                s
            }
        };
        write!(
            f,
            "r={},alpha={},dropout={},targets={}",
            self.r,
            short(self.alpha),
            short(self.dropout),
            self.label_names().join(",")
        )?;
        if self.saves_modules() {
            write!(f, ",modules_to_save={}", self.saved_names().join(","))?;
        }
        Ok(())
    }
}

impl FromStr for LoraConfig {
    type Err = Error;

    /// Parses `r=16,alpha=32,dropout=0.0,targets=q_proj,k_proj,v_proj,o_proj`. Items without
    /// `=` continue the previous key's list (so `targets=q_proj,v_proj` works unquoted).
    /// Targets are `q,k,v,o,gate,up,down` (with or without `_proj`), `attn`, `mlp`,
    /// `all-linear`, `lm_head` or `embed_tokens`. `modules_to_save=lm_head,embed_tokens` (PEFT's
    /// name) trains full copies of those modules beside the adapters. Unset keys keep PEFT's
    /// defaults.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for unknown keys, targets or modules to save, rank 0, alpha ≤ 0,
    /// dropout outside [0, 1), no targets, or a module both adapted and saved.
    fn from_str(spec: &str) -> Result<Self> {
        let mut c = LoraConfig::default();
        let mut targets: Option<Vec<Target>> = None;
        // The words of `targets` as given, for its errors.
        let mut target_words: Vec<&str> = Vec::new();
        let mut last_key = String::new();
        let mut seen: Vec<String> = Vec::new();
        if spec.split(',').all(|x| x.trim().is_empty()) {
            return Err(Error::invalid(
                "--lora",
                spec,
                "is empty (e.g. r=16,alpha=32,targets=q_proj,v_proj)",
            ));
        }
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.trim().to_string(), v.trim()),
                None if last_key == "targets" || last_key == "modules_to_save" => {
                    (last_key.clone(), item)
                }
                None => {
                    return Err(Error::invalid(
                        "--lora",
                        spec,
                        format!("expected key=value, got {item:?}"),
                    ))
                }
            };
            let num = |v: &str| -> Result<f64> {
                v.parse::<f64>()
                    .map_err(|_| Error::invalid(format!("--lora {key}"), v, "expected a number"))
            };
            let canonical = match key.as_str() {
                "rank" => "r",
                "lora_alpha" => "alpha",
                "lora_dropout" => "dropout",
                "target_modules" => "targets",
                k => k,
            }
            .to_string();
            if canonical != "targets" && canonical != "modules_to_save" && seen.contains(&canonical)
            {
                return Err(Error::invalid(
                    "--lora",
                    spec,
                    format!("{canonical} is given twice"),
                ));
            }
            seen.push(canonical.clone());
            match key.as_str() {
                "r" | "rank" => {
                    c.r = value.parse().map_err(|_| {
                        Error::invalid("--lora r", value, "expected a positive integer")
                    })?
                }
                "alpha" | "lora_alpha" => c.alpha = num(value)?,
                "dropout" | "lora_dropout" => c.dropout = num(value)?,
                "targets" | "target_modules" => {
                    target_words.push(value);
                    let list = targets.get_or_insert_with(Vec::new);
                    match value {
                        "lm_head" => c.lm_head = true,
                        "embed_tokens" => c.embed_tokens = true,
                        "all-linear" => {
                            c.all_linear = true;
                            list.extend(Target::ALL);
                        }
                        _ => list.extend(Target::parse_group(value).ok_or_else(|| {
                            Error::invalid(
                                "--lora targets",
                                value,
                                "unknown target (expected q,k,v,o,gate,up,down, *_proj, attn, mlp, all-linear, lm_head or embed_tokens)",
                            )
                        })?),
                    }
                }
                "modules_to_save" => match value {
                    "lm_head" => c.save_lm_head = true,
                    "embed_tokens" => c.save_embed_tokens = true,
                    _ => {
                        return Err(Error::invalid(
                            "--lora modules_to_save",
                            value,
                            "unknown module (expected lm_head or embed_tokens)",
                        ))
                    }
                },
                _ => {
                    return Err(Error::invalid(
                        "--lora",
                        key,
                        "unknown key (expected r, alpha, dropout, targets, modules_to_save, or PEFT's rank, lora_alpha, lora_dropout, target_modules)",
                    ))
                }
            }
            last_key = canonical;
        }
        if let Some(t) = &targets {
            if c.all_linear && t.len() > Target::ALL.len() {
                return Err(Error::invalid(
                    "--lora targets",
                    target_words.join(","),
                    "all-linear already names every linear module of the layers: add only lm_head or embed_tokens to it",
                ));
            }
        }
        if let Some(mut t) = targets {
            t.sort();
            t.dedup();
            c.targets = t;
        }
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `lm_head` and `embed_tokens` are targets of their own (PEFT's names), listed after the
    /// layers' in labels, and may be the only targets; PEFT's `all-linear` leaves the head out.
    #[test]
    fn top_level_targets() {
        let l: LoraConfig = "r=4,targets=embed_tokens,q,lm_head".parse().unwrap();
        assert!(l.lm_head && l.embed_tokens);
        assert_eq!(l.targets, vec![Target::QProj]);
        assert_eq!(l.targets_label(false), "q_proj;lm_head;embed_tokens");
        assert_eq!(l.targets_label(true), "q_proj;lm_head;embed_tokens");
        assert_eq!(l.to_string().parse::<LoraConfig>().unwrap(), l);
        let only: LoraConfig = "targets=lm_head".parse().unwrap();
        assert!(only.targets.is_empty() && only.top_level());
        let all: LoraConfig = "targets=all-linear".parse().unwrap();
        assert!(!all.top_level());
        assert!("targets=head".parse::<LoraConfig>().is_err());
    }

    /// `all-linear` is kept as given (the label the reference rows use) and reads back; on a
    /// Mixtral model it adapts the attention, the router and the experts: 1,405,184 parameters
    /// for `mixtral-mini` at r 8, as PEFT 0.21.2 counts them (`trainable_params` of
    /// `results/torch-cpu/mixtral-mini.csv`; `gate_up_proj`'s adapter at doubled rank, without
    /// which it would be 880,896).
    #[test]
    fn all_linear_on_a_mixture_of_experts() {
        let all: LoraConfig = "r=8,targets=all-linear,lm_head".parse().unwrap();
        assert!(all.all_linear && all.lm_head);
        assert_eq!(all.targets, Target::ALL.to_vec());
        // Rows of dense models list the seven (as before `all-linear` was kept); those of a
        // mixture of experts, which has no gate/up/down modules, the word; Display keeps it.
        assert_eq!(
            all.targets_label(false),
            "q_proj;k_proj;v_proj;o_proj;gate_proj;up_proj;down_proj;lm_head"
        );
        assert_eq!(all.targets_label(true), "all-linear;lm_head");
        assert!(all.to_string().ends_with("targets=all-linear,lm_head"));
        assert_eq!(all.to_string().parse::<LoraConfig>().unwrap(), all);
        // all-linear with another layer module: refused (on Mixtral it would hide a
        // gate/up/down that does not exist), in either order.
        for bad in [
            "targets=all-linear,gate",
            "targets=mlp,all-linear",
            "targets=q,all-linear",
        ] {
            let e = bad.parse::<LoraConfig>().unwrap_err().to_string();
            assert!(
                e.contains("already names every linear module"),
                "{bad}: {e}"
            );
        }
        let listed: LoraConfig = "r=8,targets=q,k,v,o,gate,up,down".parse().unwrap();
        assert!(!listed.all_linear);
        let moe = crate::config::preset("mixtral-mini").unwrap().config;
        let dense = crate::config::preset("mistral-mini").unwrap().config;
        assert!(all.experts_adapted(&moe) && !all.experts_adapted(&dense));
        assert!(!listed.experts_adapted(&moe));
        assert_eq!(all.layer_targets(&moe), Target::ALL[..4].to_vec());
        assert_eq!(all.layer_targets(&dense), Target::ALL.to_vec());
        let count = |l: &LoraConfig| crate::spec::lora_param_count(&moe, l);
        let head = 8 * (32000 + 256);
        assert_eq!(count(&all) - head, 1_405_184);
        // q/k/v/o alone: 4 layers × 8 × ((256 + 256) · 2 + (256 + 64) · 2).
        let attn: LoraConfig = "r=8,targets=attn".parse().unwrap();
        assert_eq!(count(&attn), 4 * 8 * (2 * 512 + 2 * 320));
    }

    /// Adapter parameters as PEFT counts them: `lm_head` A `(r, h)` + B `(V, r)`,
    /// `embed_tokens` A `(r, V)` + B `(h, r)`.
    #[test]
    fn top_level_parameter_counts() {
        let cfg = crate::config::preset("mistral-7b-v0.1").unwrap().config;
        let count = |s: &str| crate::spec::lora_param_count(&cfg, &s.parse().unwrap());
        assert_eq!(count("r=16,targets=lm_head"), 16 * (4096 + 32000));
        assert_eq!(count("r=16,targets=embed_tokens"), 16 * (32000 + 4096));
        assert_eq!(
            count("r=16,targets=q,lm_head"),
            count("r=16,targets=q") + 16 * (4096 + 32000)
        );
    }

    /// PEFT's `modules_to_save`: listed after the targets, read back from `Display`, counted as
    /// `V·h` trainable parameters each beside the adapters; a module both adapted and saved,
    /// or an unknown one, is refused.
    #[test]
    fn modules_to_save() {
        let l: LoraConfig = "r=8,targets=q,v,modules_to_save=lm_head,embed_tokens"
            .parse()
            .unwrap();
        assert!(l.save_lm_head && l.save_embed_tokens && !l.top_level());
        assert_eq!(l.targets, vec![Target::QProj, Target::VProj]);
        assert_eq!(l.saved_names(), vec!["lm_head", "embed_tokens"]);
        assert_eq!(l.to_string().parse::<LoraConfig>().unwrap(), l);
        assert_eq!(
            l.short_label(),
            "r8 q_proj,v_proj +full lm_head,embed_tokens"
        );
        // The key may come first, and the targets list continue after it.
        let m: LoraConfig = "modules_to_save=embed_tokens,targets=q,v".parse().unwrap();
        assert!(m.save_embed_tokens && !m.save_lm_head);
        let cfg = crate::config::preset("smollm2-135m").unwrap().config;
        assert_eq!(l.saved_param_count(&cfg), 2 * 49152 * 576);
        assert_eq!(m.saved_param_count(&cfg), 49152 * 576);
        for (bad, says) in [
            (
                "targets=q,lm_head,modules_to_save=lm_head",
                "both a LoRA target",
            ),
            (
                "modules_to_save=embed_tokens,targets=q,embed_tokens",
                "both a LoRA target",
            ),
            ("targets=q,modules_to_save=norm", "unknown module"),
            ("targets=q,modules_to_save=", "unknown module"),
        ] {
            let e = bad.parse::<LoraConfig>().unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
