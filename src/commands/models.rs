//! `vramcal models`: the presets with exact parameter counts.

use std::process::ExitCode;

use crate::config::presets;

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Prints the presets (name, parameters, layers, hidden, heads/kv, vocab, source).
///
/// # Errors
/// JSON serialization errors only.
pub fn run(json: bool) -> anyhow::Result<ExitCode> {
    let ps = presets();
    if json {
        let v: Vec<_> = ps
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name, "hf_id": p.hf_id, "source": p.source,
                    "params": p.config.param_count(), "config": p.config,
                })
            })
            .collect();
        crate::export::emit(&format!("{}\n", serde_json::to_string_pretty(&v)?))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut text = format!(
        "{:<17} {:>15} {:>6} {:>6} {:>9} {:>7}  source\n",
        "preset", "params", "layers", "hidden", "heads/kv", "vocab"
    );
    for p in &ps {
        let c = &p.config;
        text += &format!(
            "{:<17} {:>15} {:>6} {:>6} {:>9} {:>7}  {}\n",
            p.name,
            thousands(c.param_count()),
            c.num_hidden_layers,
            c.hidden_size,
            format!("{}/{}", c.num_attention_heads, c.kv_heads()),
            c.vocab_size,
            p.source
        );
    }
    crate::export::emit(&text)?;
    Ok(ExitCode::SUCCESS)
}
