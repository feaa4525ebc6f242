//! LoRA, NF4/QLoRA, activation checkpointing, gradient accumulation and adapter files.

use candle_core::{DType, Device, Tensor, Var};
use vramcal::config::preset;
use vramcal::measure::step::random_batch;
use vramcal::model::nf4::Nf4Tensor;
use vramcal::model::{Decoder, ForwardCtx};
use vramcal::spec::LoraConfig;
use vramcal::spec::TrainSpec;
use vramcal::spec::{Adaptation, Checkpointing, Quant};
use vramcal::weights::{MapWeights, RandomWeights};

fn cfg() -> vramcal::config::ModelConfig {
    preset("tiny").unwrap().config
}

fn lora(spec: &str) -> Adaptation {
    Adaptation {
        lora: Some(spec.parse::<LoraConfig>().unwrap()),
        quant: Quant::None,
        seed: 5,
    }
}

fn qlora(spec: &str) -> Adaptation {
    Adaptation {
        lora: Some(spec.parse::<LoraConfig>().unwrap()),
        quant: Quant::Nf4 { double: false },
        seed: 5,
    }
}

fn model(ad: &Adaptation, dtype: DType) -> Decoder {
    Decoder::with_adaptation(&cfg(), &mut RandomWeights::new(11), dtype, &Device::Cpu, ad).unwrap()
}

/// `m`'s adapter saved into a fresh folder: the folder, its `adapter_config.json` and its
/// `adapter_model.safetensors` tensors.
fn saved_adapter(
    m: &Decoder,
) -> (
    tempfile::TempDir,
    serde_json::Value,
    std::collections::HashMap<String, Tensor>,
) {
    let dir = tempfile::tempdir().unwrap();
    m.save_trained(dir.path(), "tiny").unwrap();
    let cfg_json = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let st =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    (dir, cfg_json, st)
}

/// The model of [`model`] (same base weights) with other adapter initializations (seed 99).
fn reseeded(ad: &Adaptation) -> Decoder {
    model(
        &Adaptation {
            seed: 99,
            ..ad.clone()
        },
        DType::F32,
    )
}

fn batch(b: usize, s: usize, step: u64) -> (Tensor, Tensor) {
    random_batch(&TrainSpec::new(b, s), cfg().vocab_size, step, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Gives every `lora_B` (and every embedding adapter's `lora_embedding_A`, which PEFT starts
/// at zero instead) random values so adapter gradients are not trivially zero.
fn randomize_b(m: &Decoder) {
    for (name, v) in m.trainable_vars() {
        if name.ends_with("lora_B.weight") || name.ends_with("lora_embedding_A") {
            let r = Tensor::randn(0f32, 0.05, v.shape(), &Device::Cpu)
                .unwrap()
                .to_dtype(v.dtype())
                .unwrap();
            v.set(&r).unwrap();
        }
    }
}

const CTX: ForwardCtx = ForwardCtx {
    train: true,
    seed: 3,
};

#[test]
fn lora_with_zero_b_gives_base_logits() {
    let base = model(&Adaptation::default(), DType::F32);
    // PEFT's initialization makes every adapter a no-op: `B = 0` for linears (the head's
    // too), `A = 0` for the embedding's.
    let ad = model(
        &lora("r=4,alpha=8,targets=all-linear,lm_head,embed_tokens"),
        DType::F32,
    );
    let (x, _) = batch(2, 10, 1);
    assert_eq!(
        max_abs_diff(&base.forward(&x).unwrap(), &ad.forward(&x).unwrap()),
        0.0
    );
}

#[test]
fn peft_counts_and_names() {
    let m = model(&lora("r=4,alpha=8,targets=q_proj,v_proj"), DType::F32);
    let c = cfg();
    // q: (128→... ) tiny: q (32, 32), v (16, 32): r·(in+out) per module per layer.
    let want = 2 * (4 * (32 + 32) + 4 * (32 + 16));
    assert_eq!(m.trainable_count(), want as u64);
    assert_eq!(m.param_count(), c.param_count() + want as u64);
    let names: Vec<String> = m.trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names[0],
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    );
    assert_eq!(
        names[1],
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    );
    assert_eq!(names.len(), 8);
    assert!(m.trainable_summary().starts_with(&format!(
        "trainable params: {want} || all params: {}",
        c.param_count() + want as u64
    )));
}

#[test]
fn one_step_changes_only_adapters() {
    for ad in [
        lora("r=4,alpha=8,targets=all-linear"),
        qlora("r=4,alpha=8,targets=attn"),
    ] {
        let m = model(&ad, DType::F32);
        let frozen_before = m.forward(&batch(1, 6, 9).0).unwrap(); // logits depend on all weights
        let embed_before = m.embed_tokens.tensor().copy().unwrap();
        let norm_before = m.norm.tensor().copy().unwrap();
        let q_before = m.layers[1]
            .q_proj
            .dense_weight(&Device::Cpu)
            .unwrap()
            .copy()
            .unwrap();
        let a_before = m.layers[1]
            .q_proj
            .lora
            .as_ref()
            .unwrap()
            .a
            .as_tensor()
            .copy()
            .unwrap();
        let vars: Vec<Var> = m.trainable_vars().into_iter().map(|(_, v)| v).collect();
        let mut opt = vramcal::optim::AdamW::new(vars, Default::default(), DType::F32).unwrap();
        let (x, y) = batch(2, 8, 1);
        let g = m
            .backward(m.forward_train(&x, &y, Checkpointing::None, CTX).unwrap())
            .unwrap();
        opt.step(&g).unwrap();
        assert_eq!(max_abs_diff(&embed_before, m.embed_tokens.tensor()), 0.0);
        assert_eq!(max_abs_diff(&norm_before, m.norm.tensor()), 0.0);
        assert_eq!(
            max_abs_diff(
                &q_before,
                &m.layers[1].q_proj.dense_weight(&Device::Cpu).unwrap()
            ),
            0.0
        );
        let l = m.layers[1].q_proj.lora.as_ref().unwrap();
        assert!(
            max_abs_diff(&a_before, l.a.as_tensor()) == 0.0,
            "A gets zero gradient while B = 0"
        );
        assert!(
            l.b.as_tensor()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0,
            "B moved"
        );
        // With B moved, the output changed.
        assert!(max_abs_diff(&frozen_before, &m.forward(&batch(1, 6, 9).0).unwrap()) > 0.0);
    }
}

/// Finite differences in f64 for every adapter tensor (frozen base, B randomized).
#[test]
fn adapter_gradients_match_finite_differences() {
    let m = model(
        &lora("r=3,alpha=6,targets=all-linear,lm_head,embed_tokens"),
        DType::F64,
    );
    randomize_b(&m);
    let (x, y) = batch(2, 8, 2);
    let ctx = ForwardCtx {
        train: false,
        seed: 0,
    };
    let grads = m
        .backward(m.forward_train(&x, &y, Checkpointing::None, ctx).unwrap())
        .unwrap();
    let loss = |m: &Decoder| m.loss(&x, &y).unwrap().to_scalar::<f64>().unwrap();
    let h = 1e-5;
    let mut checked = 0;
    for ((name, v), g) in m.trainable_vars().into_iter().zip(&grads) {
        let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = v.flatten_all().unwrap().to_vec1().unwrap();
        let n = base.len();
        for j in 0..n.min(6) {
            let idx = j * n / n.min(6);
            let set = |d: f64| {
                let mut w = base.clone();
                w[idx] += d;
                v.set(&Tensor::from_vec(w, v.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            };
            set(h);
            let lp = loss(&m);
            set(-h);
            let lm = loss(&m);
            set(0.0);
            let fd = (lp - lm) / (2.0 * h);
            assert!(
                (fd - g[idx]).abs() <= 1e-8 + 1e-5 * fd.abs().max(g[idx].abs()),
                "{name}[{idx}]: {fd:e} vs {:e}",
                g[idx]
            );
            checked += 1;
        }
    }
    assert!(checked >= 170, "{checked}");
}

fn grads_with(m: &Decoder, ckpt: Checkpointing, x: &Tensor, y: &Tensor) -> (f64, Vec<Tensor>) {
    let f = m.forward_train(x, y, ckpt, CTX).unwrap();
    let loss = f.loss.to_scalar::<f32>().unwrap() as f64;
    (loss, m.backward(f).unwrap())
}

/// Checkpointing gives the same loss and gradients as plain backward (max abs diff ≤ 1e-5 in
/// f32), for full fine-tuning, LoRA with dropout (masks must be reproduced on recompute) and
/// QLoRA, for every layer and for segments of two.
#[test]
fn checkpointing_preserves_loss_and_gradients() {
    let cases = [
        ("full", Adaptation::default()),
        ("lora", lora("r=4,alpha=8,dropout=0.2,targets=all-linear")),
        (
            "lora+head+embed",
            lora("r=4,alpha=8,dropout=0.2,targets=q_proj,lm_head,embed_tokens"),
        ),
        ("qlora", qlora("r=4,alpha=8,targets=q,k,v,o,down")),
    ];
    for (label, ad) in cases {
        let m = model(&ad, DType::F32);
        randomize_b(&m);
        let (x, y) = batch(2, 12, 4);
        let (l0, g0) = grads_with(&m, Checkpointing::None, &x, &y);
        for ckpt in [Checkpointing::Every(1), Checkpointing::Every(2)] {
            let (l1, g1) = grads_with(&m, ckpt, &x, &y);
            assert!(
                (l0 - l1).abs() <= 1e-6,
                "{label} {ckpt:?}: loss {l0} vs {l1}"
            );
            let worst = g0
                .iter()
                .zip(&g1)
                .map(|(a, b)| max_abs_diff(a, b))
                .fold(0.0, f64::max);
            assert!(
                worst <= 1e-5,
                "{label} {ckpt:?}: max abs gradient difference {worst:e}"
            );
        }
    }
}

/// Summed gradients over two micro-batches equal twice the gradient of the joined batch
/// (each micro-batch loss is a mean over its own tokens).
#[test]
fn accumulation_matches_the_joined_batch() {
    let m = model(&Adaptation::default(), DType::F64);
    let (x, y) = batch(4, 6, 7);
    let ctx = ForwardCtx {
        train: false,
        seed: 0,
    };
    let full = m
        .backward(m.forward_train(&x, &y, Checkpointing::None, ctx).unwrap())
        .unwrap();
    let half = |i: usize| {
        let (xi, yi) = (
            x.narrow(0, 2 * i, 2).unwrap(),
            y.narrow(0, 2 * i, 2).unwrap(),
        );
        m.backward(m.forward_train(&xi, &yi, Checkpointing::None, ctx).unwrap())
            .unwrap()
    };
    let (a, b) = (half(0), half(1));
    for ((f, a), b) in full.iter().zip(&a).zip(&b) {
        let sum = (a + b).unwrap();
        assert!(max_abs_diff(&(f * 2.0).unwrap(), &sum) < 1e-12);
    }
}

#[test]
fn nf4_round_trip_within_code_spacing() {
    let w = Tensor::randn(0f32, 0.02, (48, 40), &Device::Cpu).unwrap();
    let v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    for double in [false, true] {
        let q = Nf4Tensor::quantize(&v, &[48, 40], double).unwrap();
        let back = q.dequantize_f32();
        let bound = q.max_rounding_error();
        let worst = v
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= bound * 1.000_001,
            "double={double}: {worst} > {bound}"
        );
        assert!(worst > 0.0);
        // 0.5 byte per value plus the block constants.
        let n = v.len() as u64;
        let consts = if double { 30 + 4 } else { 30 * 4 };
        assert_eq!(q.bytes(), n / 2 + consts, "double={double}");
    }
}

/// QLoRA's forward equals a LoRA forward on the dequantized weights.
#[test]
fn qlora_forward_matches_dequantized_weights() {
    let q = model(&qlora("r=4,alpha=8,targets=all-linear"), DType::F32);
    randomize_b(&q);
    // Build the same model with dense frozen weights equal to the dequantized ones.
    let mut tensors = std::collections::HashMap::new();
    tensors.insert(
        "model.embed_tokens.weight".to_string(),
        q.embed_tokens.tensor().clone(),
    );
    tensors.insert("model.norm.weight".to_string(), q.norm.tensor().clone());
    if let Some(h) = &q.lm_head {
        tensors.insert("lm_head.weight".to_string(), h.tensor().clone());
    }
    for (l, layer) in q.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        tensors.insert(
            format!("{p}.input_layernorm.weight"),
            layer.input_layernorm.tensor().clone(),
        );
        tensors.insert(
            format!("{p}.post_attention_layernorm.weight"),
            layer.post_attention_layernorm.tensor().clone(),
        );
        for t in vramcal::spec::Target::ALL {
            tensors.insert(
                format!("{p}.{}.weight", t.path()),
                layer.linear(t).unwrap().dense_weight(&Device::Cpu).unwrap(),
            );
        }
    }
    let ad = lora("r=4,alpha=8,targets=all-linear");
    let d = Decoder::with_adaptation(
        &cfg(),
        &mut MapWeights {
            tensors,
            path: "mem".into(),
        },
        DType::F32,
        &Device::Cpu,
        &ad,
    )
    .unwrap();
    for ((_, a), (_, b)) in q.trainable_vars().into_iter().zip(d.trainable_vars()) {
        b.set(a.as_tensor()).unwrap();
    }
    let (x, _) = batch(2, 10, 3);
    let diff = max_abs_diff(&q.forward(&x).unwrap(), &d.forward(&x).unwrap());
    assert!(diff <= 1e-5, "{diff}");
}

#[test]
fn adapter_files_load_back_and_reproduce_logits() {
    let ad = lora("r=4,alpha=16,dropout=0.1,targets=q_proj,v_proj,down,lm_head,embed_tokens");
    let m = model(&ad, DType::F32);
    randomize_b(&m);
    let (dir, cfg_json, st) = saved_adapter(&m);
    assert_eq!(cfg_json["peft_type"], "LORA");
    assert_eq!(cfg_json["r"], 4);
    assert_eq!(cfg_json["lora_alpha"], 16.0);
    assert_eq!(
        cfg_json["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj", "lm_head", "embed_tokens"])
    );
    assert_eq!(st.len(), 2 * 3 * 2 + 4);
    // PEFT's names and shapes for the head's LoRA `Linear` and the embedding's adapter.
    for (name, dims) in [
        ("base_model.model.lm_head.lora_A.weight", [4, 32]),
        ("base_model.model.lm_head.lora_B.weight", [96, 4]),
        (
            "base_model.model.model.embed_tokens.lora_embedding_A",
            [4, 96],
        ),
        (
            "base_model.model.model.embed_tokens.lora_embedding_B",
            [32, 4],
        ),
    ] {
        assert_eq!(st[name].dims(), &dims, "{name}");
    }
    let a = &st["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"];
    assert_eq!(a.dims(), &[4, 48]);
    assert_eq!(a.dtype(), DType::F32);
    assert_eq!(
        st["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].dims(),
        &[16, 4]
    );

    // A fresh model (other adapter init) with the files loaded gives the same logits.
    let fresh = reseeded(&ad);
    let (x, _) = batch(2, 10, 5);
    assert!(max_abs_diff(&m.forward(&x).unwrap(), &fresh.forward(&x).unwrap()) > 0.0);
    fresh.load_adapter(dir.path()).unwrap();
    assert_eq!(
        max_abs_diff(&m.forward(&x).unwrap(), &fresh.forward(&x).unwrap()),
        0.0
    );

    // A model with another rank refuses the files.
    let other = model(
        &lora("r=2,alpha=16,targets=q_proj,v_proj,down,lm_head,embed_tokens"),
        DType::F32,
    );
    assert!(other
        .load_adapter(dir.path())
        .unwrap_err()
        .to_string()
        .contains("r=2"));
}

/// PEFT's `modules_to_save`: the saved modules train (a tied model's head and embedding come
/// apart, one copy), the adapter file carries them under PEFT's names with
/// `adapter_config.json` listing them, a fresh model loads them back exactly, and a file without
/// them is refused by a model that saves them.
#[test]
fn modules_to_save_train_save_and_load_back() {
    let base = model(&lora("r=4,targets=q_proj,v_proj"), DType::F32);
    let plain = tempfile::tempdir().unwrap();
    base.save_trained(plain.path(), "tiny").unwrap();
    for saved in ["lm_head", "embed_tokens", "lm_head,embed_tokens"] {
        let ad = lora(&format!(
            "r=4,targets=q_proj,v_proj,modules_to_save={saved}"
        ));
        let m = model(&ad, DType::F32);
        let n = saved.split(',').count() as u64;
        assert_eq!(m.trainable_count(), base.trainable_count() + n * 96 * 32);
        // `tiny` is untied: the saved modules themselves train, no copy.
        assert_eq!(m.param_bytes(), base.param_bytes());
        let names: Vec<String> = m.trainable_vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names.contains(&"lm_head.weight".into()),
            saved.contains("lm_head")
        );
        let (x, y) = batch(2, 10, 3);
        let grads = m
            .backward(m.forward_train(&x, &y, Checkpointing::None, CTX).unwrap())
            .unwrap();
        assert_eq!(grads.len(), names.len());
        randomize_b(&m);
        let (dir, cfg_json, st) = saved_adapter(&m);
        assert_eq!(
            cfg_json["modules_to_save"],
            serde_json::json!(saved.split(',').collect::<Vec<_>>())
        );
        for (module, file) in [
            ("lm_head", "base_model.model.lm_head.weight"),
            ("embed_tokens", "base_model.model.model.embed_tokens.weight"),
        ] {
            assert_eq!(st.contains_key(file), saved.contains(module), "{file}");
        }
        let fresh = reseeded(&ad);
        fresh.load_adapter(dir.path()).unwrap();
        for ((name, a), (_, b)) in m.trainable_vars().into_iter().zip(fresh.trainable_vars()) {
            assert_eq!(max_abs_diff(a.as_tensor(), b.as_tensor()), 0.0, "{name}");
        }
        let (x, _) = batch(2, 10, 5);
        assert!(max_abs_diff(&m.forward(&x).unwrap(), &fresh.forward(&x).unwrap()) <= 1e-6);
        let e = fresh.load_adapter(plain.path()).unwrap_err().to_string();
        assert!(
            e.contains(
                "adapter is LORA r=4 alpha=8 targets=[\"q_proj\", \"v_proj\"] modules_to_save=[]"
            ),
            "{e}"
        );
    }
    // A merged save of the untied model writes the trained modules as the model's own.
    let ad = lora("r=4,targets=q_proj,v_proj,modules_to_save=lm_head,embed_tokens");
    let mut m = model(&ad, DType::F32);
    randomize_b(&m);
    let (x, _) = batch(2, 10, 7);
    let before = m.forward(&x).unwrap();
    let dir = tempfile::tempdir().unwrap();
    m.merge_and_save(dir.path()).unwrap();
    let merged = Decoder::new(
        &cfg(),
        &mut vramcal::weights::SafetensorsWeights::open(&dir.path().join("model.safetensors"))
            .unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(max_abs_diff(&before, &merged.forward(&x).unwrap()) <= 1e-5);
    // On a tied model one (V, h) copy is added, whichever modules are saved.
    let mut tied = preset("qwen2.5-0.5b").unwrap().config;
    tied.num_hidden_layers = 1;
    tied.vocab_size = 64;
    tied.hidden_size = 16;
    tied.intermediate_size = 32;
    tied.num_attention_heads = 2;
    tied.num_key_value_heads = Some(1);
    let build = |spec: &str| {
        Decoder::with_adaptation(
            &tied,
            &mut RandomWeights::new(1),
            DType::F32,
            &Device::Cpu,
            &lora(spec),
        )
        .unwrap()
    };
    let one = build("r=2,targets=q").param_bytes();
    for saved in ["lm_head", "embed_tokens", "lm_head,embed_tokens"] {
        let m = build(&format!("r=2,targets=q,modules_to_save={saved}"));
        assert_eq!(m.param_bytes(), one + 64 * 16 * 4, "{saved}");
    }
}

/// Merged saves load back as the same model, for the Mistral layout and for Qwen2's (whose
/// q/k/v biases the merged file must carry).
#[test]
fn merged_save_equals_base_plus_adapters() {
    let qwen2 = vramcal::config::ModelConfig {
        architectures: vec!["Qwen2ForCausalLM".into()],
        ..cfg()
    };
    for (c, ad) in [
        (cfg(), lora("r=4,alpha=8,targets=all-linear")),
        (
            cfg(),
            lora("r=4,alpha=8,targets=q_proj,lm_head,embed_tokens"),
        ),
        (cfg(), qlora("r=4,alpha=8,targets=all-linear")),
        (qwen2.clone(), lora("r=4,alpha=8,targets=all-linear")),
        (qwen2, Adaptation::default()),
    ] {
        let mut m = Decoder::with_adaptation(
            &c,
            &mut RandomWeights::new(11),
            DType::F32,
            &Device::Cpu,
            &ad,
        )
        .unwrap();
        randomize_b(&m);
        let (x, _) = batch(2, 10, 6);
        let before = m.forward(&x).unwrap();
        let dir = tempfile::tempdir().unwrap();
        m.merge_and_save(dir.path()).unwrap();
        let mut src =
            vramcal::weights::SafetensorsWeights::open(&dir.path().join("model.safetensors"))
                .unwrap();
        let merged = Decoder::new(&c, &mut src, DType::F32, &Device::Cpu).unwrap();
        let diff = max_abs_diff(&before, &merged.forward(&x).unwrap());
        assert!(diff < 1e-5, "{diff}");
        // The model itself now holds the merged weights and no adapters.
        if ad.lora.is_some() {
            assert_eq!(m.trainable_count(), 0);
        }
        assert!(max_abs_diff(&before, &m.forward(&x).unwrap()) < 1e-5);
    }
}

/// Under autocast an NF4 base dequantizes to the compute dtype (bf16); a merged save still
/// writes every tensor in the weights' dtype (f32).
#[test]
fn merged_save_under_autocast_keeps_the_weights_dtype() {
    use vramcal::model::Recipe;
    let mut m = Decoder::with_recipe(
        &cfg(),
        &mut RandomWeights::new(11),
        &Device::Cpu,
        &qlora("r=4,alpha=8,targets=all-linear"),
        Recipe {
            weights: DType::F32,
            compute: DType::BF16,
            adapters: DType::F32,
        },
    )
    .unwrap();
    randomize_b(&m);
    let dir = tempfile::tempdir().unwrap();
    m.merge_and_save(dir.path()).unwrap();
    let st =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(!st.is_empty());
    for (name, t) in &st {
        assert_eq!(t.dtype(), DType::F32, "{name}");
    }
}

/// An adapter on `lm_head` or `embed_tokens` of a model whose head is tied to the embedding
/// cannot be merged without changing the other: refused, and nothing is written.
#[test]
fn merging_a_tied_head_or_embedding_adapter_is_refused() {
    let tied = vramcal::config::ModelConfig {
        tie_word_embeddings: true,
        ..cfg()
    };
    for (targets, top) in [
        ("q_proj,lm_head", 4 * (32 + 96)),
        ("q_proj,embed_tokens", 4 * (96 + 32)),
    ] {
        let mut m = Decoder::with_adaptation(
            &tied,
            &mut RandomWeights::new(11),
            DType::F32,
            &Device::Cpu,
            &lora(&format!("r=4,alpha=8,targets={targets}")),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("merged");
        let e = m.merge_and_save(&out).unwrap_err().to_string();
        assert!(e.contains("tied to embed_tokens"), "{e}");
        assert!(!out.exists());
        // Nothing was merged away: q_proj's adapters in two layers, r·(in + out) each, and the
        // top-level one.
        assert_eq!(m.trainable_count(), 2 * 4 * (32 + 32) + top);
    }
}

#[test]
fn bad_peft_settings_are_rejected() {
    for (spec, needle) in [
        ("r=0", "rank must be at least 1"),
        ("alpha=0", "must be positive"),
        ("alpha=-2", "must be positive"),
        ("dropout=1", "[0, 1)"),
        ("dropout=-0.1", "[0, 1)"),
        ("targets=q_proj,head", "unknown target"),
        ("rank=abc", "positive integer"),
        ("beta=3", "unknown key"),
    ] {
        let e = spec.parse::<LoraConfig>().unwrap_err().to_string();
        assert!(e.contains(needle), "{spec}: {e}");
    }
    assert!("every:0"
        .parse::<Checkpointing>()
        .unwrap_err()
        .to_string()
        .contains("at least 1"));
    assert!("every:3"
        .parse::<Checkpointing>()
        .unwrap()
        .validate(2)
        .unwrap_err()
        .to_string()
        .contains("between 1 and"));
    let nf4_f64 = qlora("r=2").validate(DType::F64).unwrap_err().to_string();
    assert!(nf4_f64.contains("f32, bf16, f16"), "{nf4_f64}");
    let nf4_full = Adaptation {
        lora: None,
        quant: Quant::Nf4 { double: false },
        seed: 0,
    }
    .validate(DType::F32);
    assert!(nf4_full.unwrap_err().to_string().contains("qlora"));
}

/// PEFT's own adapter on transformers' own Mixtral (`tests/data/peft-mixtral-all-linear`, made
/// by `scripts/peft_moe_fixture.py` with torch 2.15, transformers 5.24, PEFT 0.21.2:
/// `all-linear`, so the router and the experts' 3-D `gate_up_proj`/`down_proj` are adapted
/// through `ParamWrapper`s, every adapter tensor random): vramcal loads the base and the adapter
/// into its own step and computes PEFT's loss on the same tokens (fp32, to 1e-5), and not the
/// loss without the adapter; saved again, the adapter holds the file's tensors.
#[test]
fn peft_mixtral_all_linear_adapter_gives_peft_loss() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/peft-mixtral-all-linear");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let cfg = vramcal::config::ModelConfig::from_json_file(&dir.join("config.json")).unwrap();
    let ad = Adaptation {
        lora: Some("r=2,alpha=8,dropout=0,targets=all-linear".parse().unwrap()),
        quant: Quant::None,
        seed: 1,
    };
    let mut src =
        vramcal::weights::open_source(&vramcal::spec::WeightsSpec::Safetensors(dir.clone()))
            .unwrap();
    let m = Decoder::with_adaptation(&cfg, src.as_mut(), DType::F32, &Device::Cpu, &ad).unwrap();
    let ids = |key: &str| -> Tensor {
        let rows: Vec<Vec<u32>> = serde_json::from_value(expected[key].clone()).unwrap();
        let (b, s) = (rows.len(), rows[0].len());
        Tensor::from_vec(rows.concat(), (b, s), &Device::Cpu).unwrap()
    };
    let (x, y) = (ids("input_ids"), ids("targets"));
    let loss = |m: &Decoder| m.loss(&x, &y).unwrap().to_scalar::<f32>().unwrap() as f64;
    let peft = expected["loss"].as_f64().unwrap();
    let without = expected["loss_without_adapter"].as_f64().unwrap();
    // B = 0 as vramcal initializes it: the base model's loss.
    assert!(
        (loss(&m) - without).abs() < 1e-5,
        "{} vs {without}",
        loss(&m)
    );
    m.load_adapter(&dir).unwrap();
    assert!(
        (loss(&m) - peft).abs() < 1e-5,
        "{} vs PEFT's {peft}",
        loss(&m)
    );
    assert!((peft - without).abs() > 1e-3);
    // A model without the experts' adapters refuses the file, naming what differs.
    let attn = Decoder::with_adaptation(
        &cfg,
        vramcal::weights::open_source(&vramcal::spec::WeightsSpec::Safetensors(dir.clone()))
            .unwrap()
            .as_mut(),
        DType::F32,
        &Device::Cpu,
        &Adaptation {
            lora: Some("r=2,alpha=8,targets=attn".parse().unwrap()),
            ..ad.clone()
        },
    )
    .unwrap();
    let e = attn.load_adapter(&dir).unwrap_err().to_string();
    assert!(e.contains("target_parameters={\"down_proj\""), "{e}");
    // A config PEFT could have written for other scalings is refused: another module's alpha
    // pattern, rsLoRA.
    for (key, value) in [
        (
            "alpha_pattern",
            serde_json::json!({r".*\.gate_up_proj": 16, r".*\.q_proj": 1000}),
        ),
        ("use_rslora", serde_json::json!(true)),
    ] {
        let edited = tempfile::tempdir().unwrap();
        for f in ["adapter_model.safetensors", "adapter_config.json"] {
            std::fs::copy(dir.join(f), edited.path().join(f)).unwrap();
        }
        let path = edited.path().join("adapter_config.json");
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        c[key] = value;
        std::fs::write(&path, c.to_string()).unwrap();
        let e = m.load_adapter(edited.path()).unwrap_err().to_string();
        assert!(
            e.contains(if key == "use_rslora" {
                "use_rslora is true"
            } else {
                "q_proj"
            }),
            "{e}"
        );
    }
    // Saved again: PEFT's tensors, bit for bit.
    let out = tempfile::tempdir().unwrap();
    m.save_trained(out.path(), "peft-mixtral").unwrap();
    let a =
        candle_core::safetensors::load(out.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let b = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    assert_eq!(a.len(), b.len());
    for (name, t) in &b {
        assert_eq!(max_abs_diff(&a[name], t), 0.0, "{name}");
    }
}
