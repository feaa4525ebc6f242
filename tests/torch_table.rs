//! The torch profiles' saved-tensor table (`src/estimate/torch.rs`) against what autograd really
//! saved: every successful row of `results/torch-cpu/` records the bytes PyTorch's
//! `saved_tensors_hooks` saw in step 2's forward (`saved_activation_bytes`, each storage once,
//! parameters left out), and the table must give the same bytes for the row's configuration.

mod common;

use std::path::Path;

use vramcal::calibrate::reference::read_references;
use vramcal::estimate::torch::saved_bytes;

/// Each row's table total within 0.1 % of autograd's saved bytes (what is left is the loss's
/// scalars and bitsandbytes' quantization state, a few KB), and most rows exact to 1 KiB.
#[test]
fn the_saved_tensor_table_matches_autograd() {
    let mut rows = 0;
    let mut exact = 0;
    let mut worst = (0.0f64, String::new());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for f in common::torch_cpu_files().iter().map(|f| root.join(f)) {
        let mut r = csv::Reader::from_path(&f).unwrap();
        let saved: std::collections::HashMap<String, u64> = r
            .deserialize::<std::collections::HashMap<String, String>>()
            .map(Result::unwrap)
            .filter_map(|m| Some((m["id"].clone(), m["saved_activation_bytes"].parse().ok()?)))
            .collect();
        for p in read_references(&f).unwrap() {
            if !p.usable {
                continue;
            }
            let cfg = vramcal::config::preset(&p.model).unwrap().config;
            let eager = p.spec.attention == vramcal::spec::Attention::Eager;
            let want = saved[&p.id] as f64;
            let got = saved_bytes(&cfg, &p.spec, eager) as f64;
            let e = (got - want).abs() / want;
            rows += 1;
            if (got - want).abs() <= 1024.0 {
                exact += 1;
            }
            if e > worst.0 {
                worst = (e, format!("{}: table {got} B, autograd {want} B", p.id));
            }
        }
    }
    assert!(rows >= 200, "{rows} rows");
    assert!(
        worst.0 <= 0.001,
        "worst {:.4} %: {}",
        100.0 * worst.0,
        worst.1
    );
    assert!(exact * 10 >= rows * 9, "{exact} of {rows} exact to 1 KiB");
}

/// The trainable parameters of every row that records them (`trainable_params`, what the
/// optimizer steps as PEFT built the model) are the estimator's count exactly: full
/// fine-tuning's parameters, LoRA's adapters, and a Mixtral model's router and expert adapters
/// under `all-linear` (`gate_up_proj` at doubled rank).
#[test]
fn trainable_parameters_are_pefts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut rows = 0;
    let mut moe = 0;
    for f in common::torch_cpu_files().iter().map(|f| root.join(f)) {
        let mut r = csv::Reader::from_path(&f).unwrap();
        let counts: std::collections::HashMap<String, u64> = r
            .deserialize::<std::collections::HashMap<String, String>>()
            .map(Result::unwrap)
            .filter_map(|m| Some((m["id"].clone(), m.get("trainable_params")?.parse().ok()?)))
            .collect();
        for p in read_references(&f).unwrap() {
            let Some(&want) = counts.get(&p.id) else {
                continue;
            };
            let cfg = vramcal::config::preset(&p.model).unwrap().config;
            assert_eq!(p.spec.trainable_params(&cfg), want, "{}", p.id);
            rows += 1;
            moe += usize::from(cfg.moe().is_some() && p.spec.adaptation.lora.is_some());
        }
    }
    assert!(
        rows >= 78 && moe >= 50,
        "{rows} rows, {moe} of them LoRA on a MoE model"
    );
}
