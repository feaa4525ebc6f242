//! Gradients of the trainable decoder: finite differences in f64 on the `tiny` config (every
//! parameter tensor), every parameter receives a gradient (f32 and bf16), names and shapes
//! match the config's parameter table; each for the Mistral/Llama layout, Qwen2's (biases on
//! `q_proj`/`k_proj`/`v_proj`) and Llama's `attention_bias` with Llama 3.1's RoPE scaling.

use candle_core::{DType, Device, Tensor, Var};
use vramcal::config::{preset, ModelConfig};
use vramcal::measure::step::random_batch;
use vramcal::model::Decoder;
use vramcal::spec::TrainSpec;
use vramcal::weights::RandomWeights;

/// The `tiny` config in each architecture vramcal builds: as is (Mistral), as Qwen2, and as
/// Llama with `attention_bias` and Llama 3.1's `rope_scaling` (an original context of 1000 tokens,
/// which puts the four frequencies of head_dim 8 in all three of its bands).
fn configs() -> Vec<(&'static str, ModelConfig)> {
    let tiny = preset("tiny").unwrap().config;
    let qwen2 = ModelConfig {
        architectures: vec!["Qwen2ForCausalLM".into()],
        ..tiny.clone()
    };
    let llama31 = ModelConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        attention_bias: true,
        rope_scaling: Some(serde_json::json!({
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 1000
        })),
        ..tiny.clone()
    };
    for c in [&qwen2, &llama31] {
        c.validate(std::path::Path::new("test")).unwrap();
    }
    vec![
        ("tiny", tiny),
        ("tiny-qwen2", qwen2),
        ("tiny-llama3.1", llama31),
    ]
}

fn model(cfg: &ModelConfig, dtype: DType) -> Decoder {
    Decoder::new(cfg, &mut RandomWeights::new(7), dtype, &Device::Cpu).unwrap()
}

fn tiny_model(dtype: DType) -> Decoder {
    model(&preset("tiny").unwrap().config, dtype)
}

fn tiny_batch(batch: usize, seq: usize) -> (Tensor, Tensor) {
    let spec = TrainSpec::new(batch, seq);
    random_batch(
        &spec,
        preset("tiny").unwrap().config.vocab_size,
        1,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn names_and_shapes_match_param_table() {
    for (what, cfg) in configs() {
        let m = model(&cfg, DType::F32);
        let table = m.config().param_shapes();
        let vars = m.trainable_vars();
        assert_eq!(vars.len(), table.len(), "{what}");
        for ((name, v), p) in vars.iter().zip(&table) {
            assert_eq!(name, &p.name, "{what}");
            assert_eq!(v.dims(), p.shape.as_slice(), "{what} {name}");
        }
        let summed: u64 = table.iter().map(|p| p.numel()).sum();
        assert_eq!(summed, cfg.param_count(), "{what}: closed form vs table");
        assert_eq!(m.param_bytes(), m.config().param_count() * 4, "{what}");
    }
    // The biases are there: Qwen2's on q/k/v, Llama's attention_bias on o_proj too.
    let names =
        |c: &ModelConfig| -> Vec<String> { c.param_shapes().into_iter().map(|p| p.name).collect() };
    let cs = configs();
    assert!(!names(&cs[0].1).iter().any(|n| n.ends_with(".bias")));
    let q: Vec<String> = names(&cs[1].1)
        .into_iter()
        .filter(|n| n.ends_with(".bias"))
        .collect();
    assert_eq!(q.len(), 3 * cs[1].1.num_hidden_layers, "{q:?}");
    assert!(!q.iter().any(|n| n.contains("o_proj")));
    let l = names(&cs[2].1)
        .into_iter()
        .filter(|n| n.ends_with(".bias"))
        .count();
    assert_eq!(l, 4 * cs[2].1.num_hidden_layers);
}

fn loss_f64(m: &Decoder, x: &Tensor, y: &Tensor) -> f64 {
    m.loss(x, y).unwrap().to_scalar::<f64>().unwrap()
}

/// Central finite differences in f64 against backprop, for up to 24 elements of every tensor
/// (spread over the tensor), seq 8 > sliding window 6 so the window mask is exercised.
#[test]
fn finite_difference_gradients_f64_every_tensor() {
    for (what, cfg) in configs() {
        eprintln!("{what}");
        finite_differences(&model(&cfg, DType::F64));
    }
}

fn finite_differences(m: &Decoder) {
    let (x, y) = tiny_batch(2, 8);
    let loss = m.loss(&x, &y).unwrap();
    let grads = loss.backward().unwrap();
    let h = 1e-5;
    let mut checked = 0;
    let mut worst: f64 = 0.0;
    for (name, var) in m.trainable_vars() {
        // A tensor the loss did not use has no gradient in candle's graph: a mixture of
        // experts' expert that no token was routed to (the routing of near-equal router
        // logits can follow the threads' summation order). Its gradient is zero, which the
        // finite differences below must then find too.
        let g: Vec<f64> = match grads.get(&var) {
            Some(g) => g.flatten_all().unwrap().to_vec1().unwrap(),
            None => {
                assert!(name.contains(".experts."), "{name} has no gradient");
                vec![0.0; var.elem_count()]
            }
        };
        let base: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
        let n = base.len();
        let k = n.min(24);
        for j in 0..k {
            let idx = j * n / k;
            let set = |v: &Var, delta: f64| {
                let mut w = base.clone();
                w[idx] += delta;
                v.set(&Tensor::from_vec(w, v.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            };
            set(&var, h);
            let lp = loss_f64(m, &x, &y);
            set(&var, -h);
            let lm = loss_f64(m, &x, &y);
            set(&var, 0.0);
            let fd = (lp - lm) / (2.0 * h);
            let err = (fd - g[idx]).abs();
            let tol = 1e-8 + 1e-5 * fd.abs().max(g[idx].abs());
            assert!(
                err <= tol,
                "{name}[{idx}]: finite difference {fd:e} vs backprop {:e}",
                g[idx]
            );
            worst = worst.max(err);
            checked += 1;
        }
    }
    eprintln!("checked {checked} elements, worst absolute error {worst:e}");
    assert!(checked > 400);
}

fn assert_all_get_gradients(dtype: DType) {
    for (_, cfg) in configs() {
        all_get_gradients(&model(&cfg, dtype), dtype);
    }
}

fn all_get_gradients(m: &Decoder, dtype: DType) {
    let (x, y) = tiny_batch(2, 12);
    let loss = m.loss(&x, &y).unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in m.trainable_vars() {
        let g = grads
            .get(&var)
            .unwrap_or_else(|| panic!("{name}: no gradient ({dtype:?})"));
        let norm = g
            .to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            norm.is_finite() && norm > 0.0,
            "{name}: gradient norm {norm} ({dtype:?})"
        );
    }
}

#[test]
fn every_parameter_gets_a_gradient_f32() {
    assert_all_get_gradients(DType::F32);
}

#[test]
fn every_parameter_gets_a_gradient_bf16() {
    assert_all_get_gradients(DType::BF16);
}

#[test]
fn bf16_loss_close_to_f32() {
    let (x, y) = tiny_batch(2, 12);
    let l32 = tiny_model(DType::F32)
        .loss(&x, &y)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let l16 = tiny_model(DType::BF16)
        .loss(&x, &y)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((l32 - l16).abs() < 0.02 * l32, "f32 {l32} vs bf16 {l16}");
}

/// The gradients of `spec`'s decoder (built as `measure` builds it) over one batch, by name,
/// as f64, with checkpointing `ckpt`.
fn spec_grads(
    cfg: &ModelConfig,
    spec: &TrainSpec,
    ckpt: vramcal::spec::Checkpointing,
) -> Vec<(String, DType, Vec<f64>)> {
    let m = Decoder::for_spec(cfg, &mut RandomWeights::new(7), &Device::Cpu, spec).unwrap();
    let (x, y) = tiny_batch(2, 12);
    let ctx = vramcal::model::ForwardCtx {
        train: false,
        seed: 0,
    };
    let grads = m
        .backward(m.forward_train(&x, &y, ckpt, ctx).unwrap())
        .unwrap();
    m.trainable_vars()
        .into_iter()
        .zip(grads)
        .map(|((name, v), g)| {
            assert_eq!(g.dtype(), v.dtype(), "{name}: gradient dtype");
            let vals = g
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            (name, v.dtype(), vals)
        })
        .collect()
}

/// Autocast trains fp32 weights (fp32 adapters under `+amp`) with 16-bit products: every
/// gradient is in the trainable tensor's dtype and within a 16-bit rounding distance of the
/// same model's gradient computed all in f32 (relative L2 error below 5 % in bf16, 1 % in f16),
/// with and without checkpointing, for full fine-tuning and LoRA, in each architecture.
#[test]
fn autocast_gradients_are_close_to_f32() {
    use vramcal::spec::{Adaptation, Checkpointing, LoraConfig, Precision, Quant};
    let lora = Adaptation {
        lora: Some(
            "r=4,alpha=8,targets=all-linear"
                .parse::<LoraConfig>()
                .unwrap(),
        ),
        quant: Quant::None,
        seed: 3,
    };
    for (arch, cfg) in configs() {
        for (precision, ad, ckpt, tol) in [
            (
                Precision::AmpBf16,
                Adaptation::default(),
                Checkpointing::None,
                0.05,
            ),
            (
                Precision::AmpFp16,
                Adaptation::default(),
                Checkpointing::Every(1),
                0.01,
            ),
            (Precision::AmpBf16, lora.clone(), Checkpointing::None, 0.05),
            (
                Precision::Bf16Amp,
                lora.clone(),
                Checkpointing::Every(1),
                0.05,
            ),
        ] {
            let mut amp = TrainSpec::new(2, 12);
            amp.adaptation = ad.clone();
            amp.precision = Some(precision);
            amp.dtype = precision.weights();
            // The reference: the same random weights, everything stored and computed in f32.
            let mut reference = TrainSpec::new(2, 12);
            reference.adaptation = ad.clone();
            let got = spec_grads(&cfg, &amp, ckpt);
            let want = spec_grads(&cfg, &reference, Checkpointing::None);
            assert_eq!(got.len(), want.len());
            let mut largest = 0f64;
            for ((name, dtype, g), (_, _, w)) in got.iter().zip(&want) {
                let trainable = if ad.lora.is_some() {
                    amp.adapter_dtype()
                } else {
                    amp.dtype
                };
                assert_eq!(*dtype, trainable, "{arch} {precision} {name}");
                let diff: f64 = g.iter().zip(w).map(|(a, b)| (a - b).powi(2)).sum();
                let norm: f64 = w.iter().map(|b| b * b).sum();
                // LoRA's B starts at zero, so A's gradient is zero too: compare absolutely.
                let rel = if norm > 0.0 {
                    (diff / norm).sqrt()
                } else {
                    diff.sqrt()
                };
                assert!(
                    rel < tol,
                    "{arch} {precision} {name}: relative error {rel:.4} (tolerance {tol})"
                );
                largest = largest.max(rel);
            }
            // 16-bit products round: a recipe that left everything in f32 would be exact.
            assert!(
                largest > 1e-5,
                "{arch} {precision}: autocast changed nothing"
            );
        }
    }
}

/// `tiny` as a Mixtral model: 4 SwiGLU experts routed top-2 (`modeling_mixtral.py`).
fn tiny_mixtral() -> ModelConfig {
    let c = ModelConfig {
        architectures: vec!["MixtralForCausalLM".into()],
        num_local_experts: Some(4),
        num_experts_per_tok: Some(2),
        ..preset("tiny").unwrap().config
    };
    c.validate(std::path::Path::new("test")).unwrap();
    c
}

/// The mixture-of-experts block: its trainable tensors (the router as `mlp.gate.weight`, each
/// expert's rows of the checkpoint's 3-D tensors as its own tensor) add up to the closed-form
/// count and bytes; every tensor's gradient matches central finite differences in f64 (the
/// routing weights' path through the softmax included; the batch routes tokens to every
/// expert); full fine-tuning saves the checkpoint's 3-D tensors, which load back to the same
/// loss.
#[test]
fn mixture_of_experts_gradients_counts_and_saved_tensors() {
    let cfg = tiny_mixtral();
    let m = model(&cfg, DType::F64);
    let vars = m.trainable_vars();
    let total: u64 = vars.iter().map(|(_, v)| v.elem_count() as u64).sum();
    assert_eq!(total, cfg.param_count());
    assert_eq!(m.param_bytes(), cfg.param_count() * 8);
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"model.layers.1.mlp.gate.weight"));
    assert!(names.contains(&"model.layers.1.mlp.experts.3.down_proj.weight"));
    assert!(!names.iter().any(|n| n.contains("mlp.gate_proj")));
    // Every table tensor outside the experts has its var, same name and shape.
    let table = cfg.param_shapes();
    for p in table.iter().filter(|p| !p.name.contains(".mlp.experts.")) {
        let (_, v) = vars.iter().find(|(n, _)| n == &p.name).unwrap();
        assert_eq!(v.dims(), p.shape.as_slice(), "{}", p.name);
    }
    finite_differences(&m);

    // The saved file holds the 3-D tensors; a model loaded from it computes the same loss.
    let dir = tempfile::tempdir().unwrap();
    let m32 = model(&cfg, DType::F32);
    m32.save_trained(dir.path(), "tiny-mixtral").unwrap();
    let file = dir.path().join("model.safetensors");
    let saved = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    for p in &table {
        assert_eq!(saved[&p.name].dims(), p.shape.as_slice(), "{}", p.name);
    }
    assert_eq!(saved.len(), table.len());
    let mut src = vramcal::weights::open_source(&vramcal::spec::WeightsSpec::Safetensors(
        dir.path().to_path_buf(),
    ))
    .unwrap();
    let back = Decoder::new(&cfg, src.as_mut(), DType::F32, &Device::Cpu).unwrap();
    let (x, y) = tiny_batch(2, 8);
    let l = |d: &Decoder| d.loss(&x, &y).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(l(&m32), l(&back));

    // The Hub's Mixtral checkpoints keep transformers 4's names (`block_sparse_moe`, per-expert
    // `w1` gate, `w3` up, `w2` down): the same model, checked and loaded from them.
    let mut v4 = std::collections::HashMap::new();
    for (name, t) in &saved {
        let Some((layer, rest)) = name.split_once(".mlp.") else {
            v4.insert(name.clone(), t.clone());
            continue;
        };
        let moe = format!("{layer}.block_sparse_moe");
        let i = cfg.intermediate_size;
        match rest {
            "gate.weight" => {
                v4.insert(format!("{moe}.gate.weight"), t.clone());
            }
            "experts.gate_up_proj" => {
                for e in 0..4 {
                    let x = t.get(e).unwrap();
                    v4.insert(
                        format!("{moe}.experts.{e}.w1.weight"),
                        x.narrow(0, 0, i).unwrap(),
                    );
                    v4.insert(
                        format!("{moe}.experts.{e}.w3.weight"),
                        x.narrow(0, i, i).unwrap(),
                    );
                }
            }
            _ => {
                for e in 0..4 {
                    v4.insert(format!("{moe}.experts.{e}.w2.weight"), t.get(e).unwrap());
                }
            }
        }
    }
    let dir4 = tempfile::tempdir().unwrap();
    let file4 = dir4.path().join("model.safetensors");
    candle_core::safetensors::save(&v4, &file4).unwrap();
    let spec4 = vramcal::spec::WeightsSpec::Safetensors(dir4.path().to_path_buf());
    let mut src = vramcal::weights::open_source(&spec4).unwrap();
    vramcal::weights::check_all(src.as_mut(), &cfg, &file4).unwrap();
    let hub = Decoder::new(&cfg, src.as_mut(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(l(&hub), l(&m32));
    // Both layouts in one file: refused, not one read and the other ignored.
    let mut both = v4.clone();
    both.insert(
        "model.layers.0.mlp.experts.gate_up_proj".into(),
        saved["model.layers.0.mlp.experts.gate_up_proj"].clone(),
    );
    let dirb = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&both, dirb.path().join("model.safetensors")).unwrap();
    let mut src = vramcal::weights::open_source(&vramcal::spec::WeightsSpec::Safetensors(
        dirb.path().to_path_buf(),
    ))
    .unwrap();
    let e = Decoder::new(&cfg, src.as_mut(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Mixtral layouts; keep one"), "{e}");

    // transformers' `gate_up_proj[e]` is `[gate; up]` (`chunk(2)`): a file whose gate rows are
    // 1 and up rows 2 loads as such.
    let mut tensors = saved.clone();
    let (e, i, h) = (4, cfg.intermediate_size, cfg.hidden_size);
    let rows: Vec<f32> = (0..e * 2 * i * h)
        .map(|j| if (j / h) % (2 * i) < i { 1.0 } else { 2.0 })
        .collect();
    tensors.insert(
        "model.layers.0.mlp.experts.gate_up_proj".into(),
        Tensor::from_vec(rows, (e, 2 * i, h), &Device::Cpu).unwrap(),
    );
    let dir2 = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&tensors, dir2.path().join("model.safetensors")).unwrap();
    let mut src = vramcal::weights::open_source(&vramcal::spec::WeightsSpec::Safetensors(
        dir2.path().to_path_buf(),
    ))
    .unwrap();
    let pattern = Decoder::new(&cfg, src.as_mut(), DType::F32, &Device::Cpu).unwrap();
    let vars = pattern.trainable_vars();
    let mean = |name: &str| -> f32 {
        let (_, v) = vars.iter().find(|(n, _)| n == name).unwrap();
        v.mean_all().unwrap().to_scalar::<f32>().unwrap()
    };
    assert_eq!(mean("model.layers.0.mlp.experts.2.gate_proj.weight"), 1.0);
    assert_eq!(mean("model.layers.0.mlp.experts.2.up_proj.weight"), 2.0);

    // The training path (`Decoder::backward`): checkpointed recomputation routes the same
    // tokens and gives the same gradients, to f32 rounding.
    let ctx = vramcal::model::ForwardCtx {
        train: true,
        seed: 3,
    };
    let run = |c| {
        let f = m32.forward_train(&x, &y, c, ctx).unwrap();
        m32.backward(f).unwrap()
    };
    let plain = run(vramcal::spec::Checkpointing::None);
    let ckpt = run(vramcal::spec::Checkpointing::Every(1));
    for (a, b) in plain.iter().zip(&ckpt) {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= 1e-5, "checkpointed gradient differs by {d}");
    }

    // LoRA on the attention: the router and experts frozen (their products through the
    // frozen-weight op, on each expert's rows of the gathered tokens), B = 0: the same loss.
    let ad = vramcal::spec::Adaptation {
        lora: Some("r=4,alpha=8,targets=attn".parse().unwrap()),
        quant: vramcal::spec::Quant::None,
        seed: 0,
    };
    let lora = Decoder::with_adaptation(
        &cfg,
        &mut RandomWeights::new(7),
        DType::F32,
        &Device::Cpu,
        &ad,
    )
    .unwrap();
    assert_eq!(
        lora.trainable_count(),
        2 * 4 * (2 * (32 + 32) + 2 * (32 + 16))
    );
    assert_eq!(l(&lora), l(&m32));
}

/// PEFT's `all-linear` on Mixtral in vramcal's step: the router's adapter and each expert's
/// share of PEFT's `gate_up_proj` (rank and alpha doubled) and `down_proj` adapters count what
/// PEFT counts (`lora_param_count`: PEFT 0.21.2's trainable parameters); with random `B` every
/// adapter's gradient matches central finite differences in f64; the saved adapter holds PEFT's
/// stacked tensors (`mlp.experts.base_layer.lora_A.weight` `(2r·E, h)`, …) and loads back into a
/// fresh model to the same loss; the merged model (`W + s·B·A`, the experts' rows of the
/// checkpoint's 3-D tensors) computes the same loss without adapters.
#[test]
fn mixture_of_experts_all_linear_lora() {
    let cfg = tiny_mixtral();
    let lora: vramcal::spec::LoraConfig = "r=2,alpha=8,targets=all-linear".parse().unwrap();
    let ad = vramcal::spec::Adaptation {
        lora: Some(lora.clone()),
        quant: vramcal::spec::Quant::None,
        seed: 4,
    };
    let build = |dtype: DType, seed: u64| {
        Decoder::with_adaptation(
            &cfg,
            &mut RandomWeights::new(7),
            dtype,
            &Device::Cpu,
            &vramcal::spec::Adaptation { seed, ..ad.clone() },
        )
        .unwrap()
    };
    let m = build(DType::F64, 4);
    assert_eq!(
        m.trainable_count(),
        vramcal::spec::lora_param_count(&cfg, &lora)
    );
    // (h, i, E, r) = (32, 48, 4, 2) per layer: attention r·(in + out), the router r·(h + E),
    // gate_up 2r·E·(h + 2i), down r·E·(i + h).
    let (h, i, e, r) = (32, 48, 4, 2);
    let attn = r * (h + 32) + 2 * r * (h + 16) + r * (32 + h);
    assert_eq!(
        m.trainable_count() as usize,
        2 * (attn + r * (h + e) + 2 * r * e * (h + 2 * i) + r * e * (i + h))
    );
    for (name, v) in m.trainable_vars() {
        if name.contains("lora_B") {
            let t = Tensor::randn(0f64, 0.05, v.shape(), &Device::Cpu).unwrap();
            v.set(&t).unwrap();
        }
    }
    finite_differences(&m);

    // Saved as PEFT saves it; loaded back into a model with other random adapters.
    let m32 = build(DType::F32, 4);
    for (name, v) in m32.trainable_vars() {
        if name.contains("lora_B") {
            let t = Tensor::randn(0f32, 0.05, v.shape(), &Device::Cpu).unwrap();
            v.set(&t).unwrap();
        }
    }
    let (x, y) = tiny_batch(2, 8);
    let l = |d: &Decoder| d.loss(&x, &y).unwrap().to_scalar::<f32>().unwrap();
    let dir = tempfile::tempdir().unwrap();
    m32.save_trained(dir.path(), "tiny-mixtral").unwrap();
    let saved =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let base = "base_model.model.model.layers.1.mlp";
    for (name, shape) in [
        (format!("{base}.gate.lora_A.weight"), vec![r, h]),
        (format!("{base}.gate.lora_B.weight"), vec![e, r]),
        (
            format!("{base}.experts.base_layer.lora_A.weight"),
            vec![2 * r * e, h],
        ),
        (
            format!("{base}.experts.base_layer.lora_B.weight"),
            vec![2 * i, 2 * r * e],
        ),
        (format!("{base}.experts.lora_A.weight"), vec![r * e, i]),
        (format!("{base}.experts.lora_B.weight"), vec![h, r * e]),
    ] {
        assert_eq!(saved[&name].dims(), shape.as_slice(), "{name}");
    }
    assert!(
        !saved.keys().any(|k| k.contains("experts.0.")),
        "{:?}",
        saved.keys()
    );
    // PEFT's interleaved columns: expert 1's B, column ρ, is column ρ·E + 1 of the stack.
    let vars = m32.trainable_vars();
    let var = |n: &str| vars.iter().find(|(k, _)| k == n).unwrap().1.clone();
    let b1 = var(&format!("{base}.experts.1.down_proj.lora_B.weight"));
    let stacked = &saved[&format!("{base}.experts.lora_B.weight")];
    for rho in 0..r {
        let col = |t: &Tensor, c: usize| -> Vec<f32> {
            t.narrow(1, c, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_eq!(col(stacked, rho * e + 1), col(b1.as_tensor(), rho));
    }
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["rank_pattern"][r".*\.gate_up_proj"], 4);
    assert_eq!(config["alpha_pattern"][r".*\.gate_up_proj"], 16.0);
    assert_eq!(
        config["target_parameters"],
        serde_json::json!(["gate.weight", "down_proj", "gate_up_proj"])
    );
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "k_proj", "v_proj", "o_proj"])
    );
    let fresh = build(DType::F32, 9);
    assert_ne!(l(&fresh), l(&m32));
    fresh.load_adapter(dir.path()).unwrap();
    assert_eq!(l(&fresh), l(&m32));

    // Merged: the same loss from the plain model, to f32 rounding.
    let mut merged = build(DType::F32, 9);
    merged.load_adapter(dir.path()).unwrap();
    let mdir = tempfile::tempdir().unwrap();
    merged.merge_and_save(mdir.path()).unwrap();
    let mut src = vramcal::weights::open_source(&vramcal::spec::WeightsSpec::Safetensors(
        mdir.path().to_path_buf(),
    ))
    .unwrap();
    let plain = Decoder::new(&cfg, src.as_mut(), DType::F32, &Device::Cpu).unwrap();
    assert!(
        (l(&plain) - l(&m32)).abs() < 1e-5,
        "{} vs {}",
        l(&plain),
        l(&m32)
    );
}
