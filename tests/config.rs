//! Model configs: presets' parameter counts, parsing and rejection of bad configs.

use std::path::Path;

use vramcal::config::{preset, presets, resolve_model, ModelConfig};
use vramcal::Error;

/// Independent closed form, written out per term from transformers' module shapes.
fn closed_form(c: &ModelConfig) -> u64 {
    let (h, i, l, v) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.num_hidden_layers as u64,
        c.vocab_size as u64,
    );
    let hd = c.head_dim() as u64;
    let q = c.num_attention_heads as u64 * hd;
    let kv = c.kv_heads() as u64 * hd;
    // Biases: Qwen2's on q, k, v (`modeling_qwen2.py`); Llama's `attention_bias` on o too.
    let qwen2 = c.architectures.iter().any(|a| a == "Qwen2ForCausalLM");
    let qkv_bias = if qwen2 || c.attention_bias {
        q + 2 * kv
    } else {
        0
    };
    let o_bias = if c.attention_bias { h } else { 0 };
    // Mixtral (`modeling_mixtral.py`, transformers 5): E experts' `gate_up_proj` (E, 2i, h)
    // and `down_proj` (E, h, i), and the router `gate` (E, h), in place of one SwiGLU.
    let mlp = if c.architectures.iter().any(|a| a == "MixtralForCausalLM") {
        let e = c.num_local_experts.unwrap() as u64;
        e * 2 * i * h + e * h * i + e * h
    } else {
        h * i * 3
    };
    let per_layer = h * q + h * kv + h * kv + q * h + mlp + 2 * h + qkv_bias + o_bias;
    v * h + l * per_layer + h + if c.tie_word_embeddings { 0 } else { v * h }
}

#[test]
fn preset_param_counts_match_closed_form_and_shapes() {
    for p in presets() {
        let from_shapes: u64 = p.config.param_shapes().iter().map(|s| s.numel()).sum();
        assert_eq!(p.config.param_count(), closed_form(&p.config), "{}", p.name);
        assert_eq!(from_shapes, p.config.param_count(), "{}", p.name);
    }
}

#[test]
fn published_counts() {
    // The counts of the models' own cards and config.json files (issue "The recipes and
    // models people fine-tune").
    for (name, want) in [
        ("qwen2.5-7b", 7_615_616_512u64),
        ("qwen2-7b", 7_615_616_512),
        ("qwen2.5-0.5b", 494_032_768),
        ("qwen1.5-7b", 7_721_324_544),
        ("llama-3.1-8b", 8_030_261_248),
        ("mistral-nemo-12b", 12_247_782_400),
        ("mixtral-8x7b-v0.1", 46_702_792_704),
    ] {
        assert_eq!(preset(name).unwrap().config.param_count(), want, "{name}");
    }
    assert_eq!(
        preset("mistral-7b-v0.1").unwrap().config.param_count(),
        7_241_732_096
    );
    assert_eq!(
        preset("smollm2-135m").unwrap().config.param_count(),
        134_515_008
    );
    assert_eq!(
        preset("smollm2-360m").unwrap().config.param_count(),
        361_821_120
    );
    assert_eq!(
        preset("llama-2-7b").unwrap().config.param_count(),
        6_738_415_616
    );
    assert_eq!(
        preset("llama-3-8b").unwrap().config.param_count(),
        8_030_261_248
    );
    assert_eq!(
        preset("tinyllama-1.1b").unwrap().config.param_count(),
        1_100_048_384
    );
}

const SMOLLM2_JSON: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
  "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
  "vocab_size": 49152, "rms_norm_eps": 1e-05, "rope_theta": 100000,
  "max_position_embeddings": 8192, "tie_word_embeddings": true, "torch_dtype": "bfloat16"
}"#;

#[test]
fn parses_hf_config_json_with_integer_theta() {
    let c = ModelConfig::from_json_str(SMOLLM2_JSON, Path::new("config.json")).unwrap();
    assert_eq!(c, preset("smollm2-135m").unwrap().config);
}

fn parse_err(text: &str) -> Error {
    ModelConfig::from_json_str(text, Path::new("cfg/config.json")).unwrap_err()
}

#[test]
fn rejects_bad_configs_with_the_file_named() {
    let e = parse_err("{ not json");
    assert!(matches!(e, Error::Config { .. }), "{e}");
    assert!(e.to_string().contains("cfg/config.json"));

    let e = parse_err(&SMOLLM2_JSON.replace("\"hidden_size\": 576,", ""));
    assert!(e.to_string().contains("hidden_size"), "{e}");

    let e = parse_err(&SMOLLM2_JSON.replace("LlamaForCausalLM", "GPT2LMHeadModel"));
    assert!(matches!(e, Error::UnknownArchitecture { .. }), "{e}");

    let e =
        parse_err(&SMOLLM2_JSON.replace("\"num_hidden_layers\": 30", "\"num_hidden_layers\": 0"));
    assert!(
        e.to_string().contains("num_hidden_layers must be positive"),
        "{e}"
    );

    // A hundred million layers: refused at once, before the per-layer tensor list is built
    // (which would fill the machine's memory).
    let e = parse_err(&SMOLLM2_JSON.replace(
        "\"num_hidden_layers\": 30",
        "\"num_hidden_layers\": 100000000",
    ));
    assert!(e.to_string().contains("at most 4096"), "{e}");

    let e = parse_err(
        &SMOLLM2_JSON.replace("\"num_key_value_heads\": 3", "\"num_key_value_heads\": 4"),
    );
    assert!(e.to_string().contains("not a multiple"), "{e}");

    let e = parse_err(&SMOLLM2_JSON.replace(
        "\"vocab_size\": 49152",
        "\"vocab_size\": 18446744073709551615",
    ));
    assert!(e.to_string().contains("overflows"), "{e}");

    let e = parse_err(&SMOLLM2_JSON.replace("\"hidden_size\": 576", "\"hidden_size\": -5"));
    assert!(matches!(e, Error::Config { .. }), "{e}");
}

/// mistralai/Mixtral-8x7B-v0.1's config.json, as published.
const MIXTRAL_JSON: &str = r#"{
  "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
  "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
  "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
  "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
  "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": false,
  "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02,
  "sliding_window": null, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.36.0.dev0", "use_cache": true, "vocab_size": 32000
}"#;

/// Mixtral's config.json reads as the preset; its mixture of experts is checked: zero experts,
/// a top-k above the experts, missing expert counts, expert counts on a dense architecture,
/// the load-balancing loss and router jitter (not modelled) are refused, naming the field.
#[test]
fn mixtral_configs_are_read_and_checked() {
    let c = ModelConfig::from_json_str(MIXTRAL_JSON, Path::new("config.json")).unwrap();
    assert_eq!(c, preset("mixtral-8x7b-v0.1").unwrap().config);
    let moe = c.moe().unwrap();
    assert_eq!((moe.experts, moe.top_k), (8, 2));
    assert!(preset("mistral-7b-v0.1").unwrap().config.moe().is_none());
    for (from, to, needle) in [
        (
            r#""num_experts_per_tok": 2"#,
            r#""num_experts_per_tok": 9"#,
            "num_experts_per_tok = 9 must be between 1 and num_local_experts = 8",
        ),
        (
            r#""num_experts_per_tok": 2"#,
            r#""num_experts_per_tok": 0"#,
            "num_experts_per_tok = 0",
        ),
        (
            r#""num_local_experts": 8"#,
            r#""num_local_experts": 0"#,
            "num_local_experts must be positive",
        ),
        (
            r#""num_local_experts": 8,"#,
            r#""#,
            "needs num_local_experts and num_experts_per_tok",
        ),
        (
            r#""output_router_logits": false"#,
            r#""output_router_logits": true"#,
            "output_router_logits = true",
        ),
        (
            r#""router_aux_loss_coef": 0.02"#,
            r#""router_jitter_noise": 0.01"#,
            "router_jitter_noise = 0.01 is not modelled",
        ),
        (
            r#""architectures": ["MixtralForCausalLM"]"#,
            r#""architectures": ["MistralForCausalLM"]"#,
            "read only for MixtralForCausalLM",
        ),
    ] {
        let text = MIXTRAL_JSON.replace(from, to);
        assert_ne!(text, MIXTRAL_JSON, "{from}");
        let e = parse_err(&text);
        assert!(e.to_string().contains(needle), "{from} -> {to}: {e}");
        assert!(e.to_string().contains("cfg/config.json"), "{e}");
    }
    // Without `architectures`, `model_type` names it.
    let c = ModelConfig::from_json_str(
        &MIXTRAL_JSON.replace(r#""architectures": ["MixtralForCausalLM"],"#, ""),
        Path::new("config.json"),
    )
    .unwrap();
    assert!(c.moe().is_some());
}

#[test]
fn unknown_model_lists_presets() {
    let e = resolve_model("no-such-model").unwrap_err();
    assert!(e.to_string().contains("smollm2-135m"), "{e}");
}
