//! Weight files: safetensors (single and sharded) round trips, and clear errors for truncated
//! or wrong-shaped files.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use vramcal::config::preset;
use vramcal::model::Decoder;
use vramcal::spec::WeightsSpec;
use vramcal::weights::{open_source, RandomWeights};
use vramcal::Error;

fn tiny_tensors() -> (Decoder, HashMap<String, Tensor>) {
    let cfg = preset("tiny").unwrap().config;
    let m = Decoder::new(&cfg, &mut RandomWeights::new(3), DType::F32, &Device::Cpu).unwrap();
    let map = m
        .trainable_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    (m, map)
}

fn logits(m: &Decoder) -> Vec<f32> {
    let x = Tensor::new(&[[1u32, 5, 9, 2, 77, 3]], &Device::Cpu).unwrap();
    m.forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn load(spec: &WeightsSpec) -> vramcal::Result<Decoder> {
    let cfg = preset("tiny").unwrap().config;
    let mut src = open_source(spec)?;
    Decoder::new(&cfg, src.as_mut(), DType::F32, &Device::Cpu)
}

fn write_config(dir: &Path) {
    let cfg = preset("tiny").unwrap().config;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
}

#[test]
fn safetensors_single_and_sharded_round_trip() {
    let (m, map) = tiny_tensors();
    let want = logits(&m);
    let dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&map, dir.path().join("model.safetensors")).unwrap();
    write_config(dir.path());
    let got = load(&WeightsSpec::Safetensors(dir.path().to_path_buf())).unwrap();
    assert_eq!(logits(&got), want);

    let sharded = tempfile::tempdir().unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut index = serde_json::Map::new();
    for (i, (k, v)) in map.iter().enumerate() {
        let file = if i % 2 == 0 {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        if i % 2 == 0 {
            a.insert(k.clone(), v.clone())
        } else {
            b.insert(k.clone(), v.clone())
        };
        index.insert(k.clone(), serde_json::Value::String(file.into()));
    }
    candle_core::safetensors::save(&a, sharded.path().join("model-00001-of-00002.safetensors"))
        .unwrap();
    candle_core::safetensors::save(&b, sharded.path().join("model-00002-of-00002.safetensors"))
        .unwrap();
    std::fs::write(
        sharded.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": index}).to_string(),
    )
    .unwrap();
    let got = load(&WeightsSpec::Safetensors(sharded.path().to_path_buf())).unwrap();
    assert_eq!(logits(&got), want);
}

#[test]
fn truncated_safetensors_is_reported_with_its_path() {
    let (_, map) = tiny_tensors();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("model.safetensors");
    candle_core::safetensors::save(&map, &f).unwrap();
    let len = std::fs::metadata(&f).unwrap().len();
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..(len / 2) as usize]).unwrap();
    let e = load(&WeightsSpec::Safetensors(dir.path().to_path_buf()))
        .err()
        .unwrap();
    assert!(matches!(e, Error::Weights { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn wrong_shape_and_missing_tensor_are_reported() {
    let (_, mut map) = tiny_tensors();
    let dir = tempfile::tempdir().unwrap();
    map.insert(
        "model.layers.1.self_attn.q_proj.weight".into(),
        Tensor::zeros((16, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&map, dir.path().join("model.safetensors")).unwrap();
    let e = load(&WeightsSpec::Safetensors(dir.path().to_path_buf()))
        .err()
        .unwrap();
    assert!(matches!(e, Error::WeightShape { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("model.layers.1.self_attn.q_proj.weight"),
        "{e}"
    );

    map.remove("model.norm.weight");
    map.insert(
        "model.layers.1.self_attn.q_proj.weight".into(),
        Tensor::zeros((32, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&map, dir.path().join("model.safetensors")).unwrap();
    let e = load(&WeightsSpec::Safetensors(dir.path().to_path_buf()))
        .err()
        .unwrap();
    assert!(matches!(e, Error::MissingTensor { .. }), "{e}");
}

#[test]
fn integer_weights_are_refused_before_loading() {
    let (_, mut map) = tiny_tensors();
    let dir = tempfile::tempdir().unwrap();
    map.insert(
        "model.norm.weight".into(),
        Tensor::zeros(32, DType::U32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&map, dir.path().join("model.safetensors")).unwrap();
    let e = load(&WeightsSpec::Safetensors(dir.path().to_path_buf()))
        .err()
        .unwrap();
    assert!(matches!(e, Error::Weights { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("model.norm.weight: stored as U32, not a floating-point type"),
        "{e}"
    );
}

#[test]
fn gguf_qk_unpermute_inverts_llama_cpp_permutation() {
    // llama.cpp: w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2).reshape(w.shape)
    let (heads, hd, cols) = (3, 8, 5);
    let hf = Tensor::arange(0f32, (heads * hd * cols) as f32, &Device::Cpu)
        .unwrap()
        .reshape((heads * hd, cols))
        .unwrap();
    let gguf = hf
        .reshape((heads, 2, hd / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((heads * hd, cols))
        .unwrap();
    let back = vramcal::weights::gguf::unpermute_qk(&gguf, heads).unwrap();
    let d: Vec<f32> = (back - &hf)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(d.iter().all(|&x| x == 0.0));
}

#[test]
fn not_a_gguf_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("broken.gguf");
    std::fs::write(&f, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let e = load(&WeightsSpec::Gguf(f)).err().unwrap();
    assert!(matches!(e, Error::Weights { .. }), "{e}");
    assert!(e.to_string().contains("broken.gguf"), "{e}");
}

/// A model in a Hugging Face cache layout (`$HF_HOME/hub/models--org--name/snapshots/<rev>/`)
/// is found offline by id, for the config (`--model org/name`) and the weights (`hf:org/name`).
#[test]
fn hf_cache_model_is_found_offline() {
    let (m, map) = tiny_tensors();
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--acme--tiny-test");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    write_config(&snap);
    candle_core::safetensors::save(&map, snap.join("model.safetensors")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vramcal"))
        .env("HF_HOME", home.path())
        .args([
            "measure",
            "--model",
            "acme/tiny-test",
            "--weights",
            "hf:acme/tiny-test",
            "--batch",
            "1",
            "--seq",
            "6",
            "--json",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(row["model"], "acme/tiny-test");
    assert_eq!(row["weights"], "hf:acme/tiny-test");
    assert_eq!(row["params"], 21664);
    // And the same weights load back through the library path.
    let dir =
        vramcal::weights::hf_cache_dir_in(&home.path().join("hub"), "acme/tiny-test").unwrap();
    let got = load(&WeightsSpec::Safetensors(dir)).unwrap();
    assert_eq!(logits(&got), logits(&m));
    // An id that is not cached says so, offline (tests/hub.rs fetches from a local Hub).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vramcal"))
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .args([
            "measure",
            "--model",
            "tiny",
            "--weights",
            "hf:acme/absent",
            "--batch",
            "1",
            "--seq",
            "6",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not in the local cache") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}
