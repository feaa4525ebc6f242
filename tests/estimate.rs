//! The estimator: its saved-tensor table against a measured layer, exact parameter bytes,
//! calibration round trip, and bad input.

use candle_core::{DType, Device};
use vramcal::config::{preset, ModelConfig};
use vramcal::estimate::{estimate, table, weight_bytes, Coefficients};
use vramcal::measure::step::random_batch;
use vramcal::measure::{alloc, CountingAlloc};
use vramcal::model::{Decoder, ForwardCtx};
use vramcal::spec::LoraConfig;
use vramcal::spec::Profile;
use vramcal::spec::TrainSpec;
use vramcal::spec::{Adaptation, Attention, Checkpointing, Quant};
use vramcal::weights::RandomWeights;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cfg(layers: usize) -> ModelConfig {
    let mut c = preset("tiny").unwrap().config;
    c.hidden_size = 256;
    c.intermediate_size = 512;
    c.num_attention_heads = 4;
    c.num_key_value_heads = Some(2);
    c.vocab_size = 512;
    c.num_hidden_layers = layers;
    c.max_position_embeddings = 512;
    c.sliding_window = None;
    c
}

fn spec(dtype: DType, ad: Adaptation) -> TrainSpec {
    let mut s = TrainSpec::new(2, 96);
    s.dtype = dtype;
    s.adaptation = ad;
    s
}

/// Bytes the forward graph keeps: allocated after the forward minus before it. gemm keeps
/// thread-local packing buffers that each rayon thread allocates on its first large matmul, so
/// the forward is warmed up several times and the smallest of several readings is taken.
fn forward_kept(c: &ModelConfig, s: &TrainSpec) -> u64 {
    let mut m = Decoder::for_spec(c, &mut RandomWeights::new(0), &Device::Cpu, s).unwrap();
    m.set_attention(s.attention);
    let (x, y) = random_batch(s, c.vocab_size, 1, &Device::Cpu).unwrap();
    let ctx = ForwardCtx {
        train: true,
        seed: 1,
    };
    for _ in 0..3 {
        drop(m.forward_train(&x, &y, Checkpointing::None, ctx).unwrap());
    }
    (0..4)
        .map(|_| {
            let before = alloc::current_bytes();
            let f = m.forward_train(&x, &y, Checkpointing::None, ctx).unwrap();
            let after = alloc::current_bytes();
            drop(f);
            after - before
        })
        .min()
        .unwrap()
}

/// The table's bytes for one layer match the measured difference between a 2-layer and a
/// 1-layer model within 1 % (f32 and bf16, full and LoRA with dropout, sdpa and eager
/// attention).
#[test]
fn saved_tensor_table_matches_a_measured_layer() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // One matmul thread: gemm's thread-local workspace is then allocated once, in the warm-up,
    // instead of whenever another rayon thread first picks up a large matmul.
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let lora = || Adaptation {
        lora: Some(
            "r=8,alpha=16,dropout=0.1,targets=all-linear"
                .parse::<LoraConfig>()
                .unwrap(),
        ),
        quant: Quant::None,
        seed: 0,
    };
    // Qwen2's layout: biases on q/k/v (their products are kept too); with Llama's
    // attention_bias on o_proj as well.
    let qwen2 = |layers: usize| ModelConfig {
        architectures: vec!["Qwen2ForCausalLM".into()],
        ..cfg(layers)
    };
    let biased = |layers: usize| ModelConfig {
        attention_bias: true,
        ..cfg(layers)
    };
    // Mixtral's mixture of experts: 4 experts routed top-2; LoRA on the attention, or PEFT's
    // all-linear (the router and each expert's share of the 3-D tensors' adapters, no dropout:
    // PEFT refuses it there).
    let mixtral = |layers: usize| ModelConfig {
        architectures: vec!["MixtralForCausalLM".into()],
        num_local_experts: Some(4),
        num_experts_per_tok: Some(2),
        ..cfg(layers)
    };
    let lora_attn = || Adaptation {
        lora: Some(
            "r=8,alpha=16,dropout=0.1,targets=attn"
                .parse::<LoraConfig>()
                .unwrap(),
        ),
        quant: Quant::None,
        seed: 0,
    };
    let lora_moe = || Adaptation {
        lora: Some(
            "r=8,alpha=16,targets=all-linear"
                .parse::<LoraConfig>()
                .unwrap(),
        ),
        quant: Quant::None,
        seed: 0,
    };
    let plain: fn(usize) -> ModelConfig = cfg;
    let archs: [(&str, &dyn Fn(usize) -> ModelConfig); 4] = [
        ("llama", &plain),
        ("qwen2", &qwen2),
        ("attention_bias", &biased),
        ("mixtral", &mixtral),
    ];
    use vramcal::spec::Precision;
    for (arch, dtype, ad, attention, precision) in [
        (0, DType::F32, Adaptation::default(), Attention::Sdpa, None),
        // Autocast: fp32 weights and residual stream, bf16/f16 products and attention.
        (
            0,
            DType::F32,
            Adaptation::default(),
            Attention::Sdpa,
            Some(Precision::AmpBf16),
        ),
        (
            0,
            DType::F32,
            lora(),
            Attention::Sdpa,
            Some(Precision::AmpBf16),
        ),
        (
            1,
            DType::F32,
            Adaptation::default(),
            Attention::Sdpa,
            Some(Precision::AmpFp16),
        ),
        // bf16 weights with fp32 adapters cast per use.
        (
            0,
            DType::BF16,
            lora(),
            Attention::Sdpa,
            Some(Precision::Bf16Amp),
        ),
        (0, DType::BF16, Adaptation::default(), Attention::Sdpa, None),
        (0, DType::F32, lora(), Attention::Sdpa, None),
        (
            0,
            DType::BF16,
            Adaptation::default(),
            Attention::Eager,
            None,
        ),
        (1, DType::F32, Adaptation::default(), Attention::Sdpa, None),
        (1, DType::F32, lora(), Attention::Sdpa, None),
        (2, DType::BF16, Adaptation::default(), Attention::Sdpa, None),
        (3, DType::F32, Adaptation::default(), Attention::Sdpa, None),
        (3, DType::BF16, Adaptation::default(), Attention::Sdpa, None),
        (3, DType::F32, lora_attn(), Attention::Sdpa, None),
        (
            3,
            DType::F32,
            Adaptation::default(),
            Attention::Sdpa,
            Some(Precision::AmpBf16),
        ),
        (
            3,
            DType::F32,
            lora_attn(),
            Attention::Sdpa,
            Some(Precision::AmpBf16),
        ),
        (3, DType::F32, lora_moe(), Attention::Sdpa, None),
        (3, DType::BF16, lora_moe(), Attention::Sdpa, None),
        // bf16 experts with fp32 adapters cast per use; autocast's bf16 router.
        (
            3,
            DType::BF16,
            lora_moe(),
            Attention::Sdpa,
            Some(Precision::Bf16Amp),
        ),
        (
            3,
            DType::F32,
            lora_moe(),
            Attention::Sdpa,
            Some(Precision::AmpBf16),
        ),
    ] {
        let (arch, cfg) = archs[arch];
        let mut s = spec(dtype, ad);
        s.attention = attention;
        s.precision = precision;
        let measured = forward_kept(&cfg(2), &s) as f64 - forward_kept(&cfg(1), &s) as f64;
        let predicted: u64 = table::layer(&cfg(1), &s).iter().map(|t| t.bytes()).sum();
        let err = (predicted as f64 - measured) / measured;
        eprintln!(
            "{arch} {dtype:?} {precision:?} {} {attention:?}: table {predicted} vs measured {measured} ({:+.2} %)",
            s.adaptation.method(),
            100.0 * err
        );
        assert!(
            err.abs() < 0.01,
            "{dtype:?} {}: {:+.2} %",
            s.adaptation.method(),
            100.0 * err
        );
    }
}

/// The head's table entries for LoRA on `lm_head` and `embed_tokens` (PEFT's `Embedding`)
/// match what the forward graph measurably keeps for them within 1 %: the difference between
/// a model with those adapters and the same model without, with dropout, in f32, bf16 and
/// under autocast (fp32 adapters over bf16 weights too).
#[test]
fn top_level_adapter_table_matches_measured() {
    use vramcal::spec::Precision;
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    std::env::set_var("RAYON_NUM_THREADS", "1");
    // An embedding adapter makes the first layer's input need a gradient, and candle then keeps
    // there what it keeps in every other layer (the norm's output for the frozen products, the
    // dropout masks, frozen projections' outputs). With adapters on every product that reads
    // the first norm's output and no dropout, the first layer keeps that anyway, so the
    // difference is the adapter's own tensors; dropout is tested on `lm_head`, which does
    // not touch the first layer.
    let ad = |targets: &str, dropout: f64| Adaptation {
        lora: Some(
            format!("r=8,alpha=16,dropout={dropout},targets={targets}")
                .parse::<LoraConfig>()
                .unwrap(),
        ),
        quant: Quant::None,
        seed: 0,
    };
    for (dtype, precision) in [
        (DType::F32, None),
        (DType::BF16, None),
        (DType::F32, Some(Precision::AmpBf16)),
        (DType::BF16, Some(Precision::Bf16Amp)),
    ] {
        for (top, dropout) in [
            ("lm_head", 0.1),
            ("embed_tokens", 0.0),
            ("lm_head,embed_tokens", 0.0),
        ] {
            let layers = "q_proj,k_proj,v_proj,gate_proj,up_proj";
            // 4 × 128 tokens: the graph's few KB of bookkeeping stay well under 1 %.
            let mut with = spec(dtype, ad(&format!("{layers},{top}"), dropout));
            (with.precision, with.batch, with.seq) = (precision, 4, 128);
            let mut without = spec(dtype, ad(layers, dropout));
            (without.precision, without.batch, without.seq) = (precision, 4, 128);
            let c = cfg(1);
            let measured = forward_kept(&c, &with) as f64 - forward_kept(&c, &without) as f64;
            let head =
                |s: &TrainSpec| -> u64 { table::head(&c, s).iter().map(|t| t.bytes()).sum() };
            // Under autocast the first layer's products read casts of the norm's output, so
            // without a gradient into that layer nothing keeps the output itself; with one,
            // the casts keep it, as in every other layer.
            let first_layer = if top.contains("embed_tokens") && with.compute_dtype() != dtype {
                (with.batch * with.seq * c.hidden_size * dtype.size_in_bytes()) as u64
            } else {
                0
            };
            let predicted = (head(&with) - head(&without) + first_layer) as f64;
            let err = (predicted - measured) / measured;
            eprintln!(
                "{dtype:?} {precision:?} {top}: table {predicted} vs measured {measured} ({:+.2} %)",
                100.0 * err
            );
            assert!(
                err.abs() < 0.01,
                "{dtype:?} {precision:?} {top}: {:+.2} %",
                100.0 * err
            );
        }
    }
}

/// Parameter bytes are exact for every method.
#[test]
fn parameter_bytes_are_exact() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (dtype, ad) in [
        (DType::F32, Adaptation::default()),
        (DType::BF16, Adaptation::default()),
        (
            DType::F32,
            Adaptation {
                lora: Some("r=4,targets=attn".parse::<LoraConfig>().unwrap()),
                quant: Quant::None,
                seed: 0,
            },
        ),
        (
            DType::BF16,
            Adaptation {
                lora: Some(LoraConfig::default()),
                quant: Quant::Nf4 { double: false },
                seed: 0,
            },
        ),
        (
            DType::F32,
            Adaptation {
                lora: Some(LoraConfig::default()),
                quant: Quant::Nf4 { double: true },
                seed: 0,
            },
        ),
    ] {
        let c = cfg(2);
        let s = spec(dtype, ad);
        let m = Decoder::with_adaptation(
            &c,
            &mut RandomWeights::new(0),
            dtype,
            &Device::Cpu,
            &s.adaptation,
        )
        .unwrap();
        assert_eq!(
            weight_bytes(&c, &s),
            m.param_bytes(),
            "{dtype:?} {}",
            s.adaptation.method()
        );
        let e = estimate(
            &c,
            &s,
            Profile::Candle,
            &Coefficients::uncalibrated(Profile::Candle),
        )
        .unwrap();
        assert_eq!(e.items[0].bytes, m.param_bytes());
    }
}

/// Estimates behave: more tokens cost more, checkpointing and LoRA cost less, and the torch
/// profiles' eager attention costs more than SDPA at long sequences.
#[test]
fn estimates_move_the_right_way() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = preset("mistral-7b-v0.1").unwrap().config;
    let u = |p| Coefficients::uncalibrated(p);
    let mut s = TrainSpec::new(1, 1024);
    s.dtype = DType::BF16;
    let base = estimate(&c, &s, Profile::Candle, &u(Profile::Candle))
        .unwrap()
        .peak_bytes;
    let mut longer = s.clone();
    longer.seq = 2048;
    assert!(
        estimate(&c, &longer, Profile::Candle, &u(Profile::Candle))
            .unwrap()
            .peak_bytes
            > base
    );
    let mut ck = s.clone();
    ck.checkpointing = Checkpointing::Every(1);
    assert!(
        estimate(&c, &ck, Profile::Candle, &u(Profile::Candle))
            .unwrap()
            .peak_bytes
            < base
    );
    let mut lo = s.clone();
    lo.adaptation = Adaptation {
        lora: Some(LoraConfig::default()),
        quant: Quant::None,
        seed: 0,
    };
    assert!(
        estimate(&c, &lo, Profile::Candle, &u(Profile::Candle))
            .unwrap()
            .peak_bytes
            < base
    );
    // LoRA: full fine-tuning's peak is the optimizer step, the same for both attentions.
    let lo_longer = TrainSpec {
        adaptation: lo.adaptation.clone(),
        ..longer.clone()
    };
    let sdpa = estimate(&c, &lo_longer, Profile::TorchSdpa, &u(Profile::TorchSdpa))
        .unwrap()
        .peak_bytes;
    let eager = estimate(&c, &lo_longer, Profile::TorchEager, &u(Profile::TorchEager))
        .unwrap()
        .peak_bytes;
    assert!(eager > sdpa);
    // The other profile's coefficients are refused.
    assert!(estimate(&c, &s, Profile::TorchSdpa, &u(Profile::Candle)).is_err());
}

#[test]
fn sharding_divides_what_it_should() {
    use vramcal::estimate::multi::{device_map, parse_max_memory, shard};
    use vramcal::spec::{Shard, Sharding};
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = preset("llama-3-8b").unwrap().config;
    let mut s = TrainSpec::new(1, 1024);
    s.dtype = DType::BF16;
    let (w, g, st) = (16_060_522_496u64, 16_060_522_496u64, 64_242_089_984u64);
    // vramcal's own ZeRO-1/2 rank (`measure --shard`): the states of its partition and the
    // optimizer's copy of the partition's weights; the full gradients through backward, and
    // its gradient partition beside them at the reduce-scatter (ZeRO-1: at the step; ZeRO-2:
    // at the end of backward, then alone at the step).
    let z1 = shard(&c, &s, &Sharding::new(Shard::Zero1, 8), false, w, g, st).unwrap();
    assert_eq!(
        (z1.weights, z1.gradients, z1.optimizer_states),
        (w, g, st / 8 + w / 8)
    );
    assert_eq!((z1.step_gradients, z1.end_gradients), (g + g / 8, 0));
    let z2 = shard(&c, &s, &Sharding::new(Shard::Zero2, 8), false, w, g, st).unwrap();
    assert_eq!(
        (z2.weights, z2.gradients, z2.optimizer_states),
        (w, g, st / 8 + w / 8)
    );
    assert_eq!((z2.step_gradients, z2.end_gradients), (g / 8, g / 8));
    // The last of 3 ranks holds the shorter partition.
    let last = Sharding {
        rank: 2,
        ..Sharding::new(Shard::Zero2, 3)
    };
    let n = g / 2;
    let z2_last = shard(&c, &s, &last, false, w, g, st).unwrap();
    assert_eq!(z2_last.end_gradients, 2 * (n - 2 * n.div_ceil(3)));
    // vramcal's own ZeRO-3 rank: every tensor's flat partition, the norms (4096 elements, under
    // DeepSpeed's 1e5 persistence threshold) whole through backward; the flat gradient partition and the
    // 5e8-element bucket; at the head's backward only the head gathered (its 525M elements,
    // forward and backward, reach DeepSpeed's 1e9 reuse distance before layer 31's
    // recomputation), at a layer's backward that layer and its whole gradients.
    // (The whole-model bytes w, g, st are llama-3-8b's in bf16: 2 bytes per gradient.)
    let z3 = shard(&c, &s, &Sharding::new(Shard::Zero3, 8), false, w, g, st).unwrap();
    let layer = 2 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336) as u64;
    let parts: u64 = c
        .param_shapes()
        .iter()
        .map(|p| 2 * p.numel().div_ceil(8))
        .sum();
    let norms = 65 * 4096 * 2;
    assert_eq!(z3.weights, parts);
    assert_eq!(
        (z3.grad_partition, z3.reduce_bucket),
        (parts, 1_000_000_000)
    );
    assert_eq!(z3.head_extra, 2 * 128_256 * 4096 + norms);
    // (the layer's gradients include its two norms')
    assert_eq!(z3.layer_extra, 2 * layer + 2 * 2 * 4096 + norms);
    // Mistral-7B's head (32000 × 4096) leaves the last two layers within the distance.
    let m = preset("mistral-7b-v0.1").unwrap().config;
    let mz = shard(&m, &s, &Sharding::new(Shard::Zero3, 8), false, w, g, st).unwrap();
    assert_eq!(mz.head_extra, 2 * layer + 2 * 32_000 * 4096 + norms);
    assert_eq!(z3.optimizer_states, st / (g / 2) * (parts / 2));
    // The torch profiles' DeepSpeed ZeRO-3: the parameters divided by 8, and what the same
    // schedule gathers beside the norms (without checkpointing: no recomputation in the trace).
    let z3t = shard(&c, &s, &Sharding::new(Shard::Zero3, 8), true, w, g, st).unwrap();
    assert_eq!(z3t.weights, w / 8);
    assert_eq!(
        (z3t.head_extra, z3t.layer_extra),
        (2 * 128_256 * 4096 + norms, layer + norms)
    );
    let mzt = shard(&m, &s, &Sharding::new(Shard::Zero3, 8), true, w, g, st).unwrap();
    assert_eq!(mzt.head_extra, 2 * layer + 2 * 32_000 * 4096 + norms);
    assert!(shard(&c, &s, &Sharding::new(Shard::Zero3, 0), false, w, g, st).is_err());
    // LoRA: only adapters are sharded as gradients and states; the estimate drops per GPU.
    let mut lo = s.clone();
    lo.adaptation = Adaptation {
        lora: Some(LoraConfig::default()),
        quant: Quant::None,
        seed: 0,
    };
    let u = Coefficients::uncalibrated(Profile::Candle);
    let one = vramcal::estimate::estimate_sharded(&c, &s, Profile::Candle, &u, None)
        .unwrap()
        .peak_bytes;
    let eight = vramcal::estimate::estimate_sharded(
        &c,
        &s,
        Profile::Candle,
        &u,
        Some(Sharding::new(Shard::Zero3, 8)),
    )
    .unwrap()
    .peak_bytes;
    assert!(eight < one);

    // Device map: every module once, in order, within each budget; too little memory fails.
    let budgets = parse_max_memory("0=10GiB,1=10GiB").unwrap();
    let map = device_map(&c, &s, &budgets).unwrap();
    assert_eq!(map.len(), 1 + 32 + 1);
    assert!(map.windows(2).all(|p| p[0].device <= p[1].device));
    for (d, b) in budgets.iter().enumerate() {
        assert!(
            map.iter()
                .filter(|p| p.device == d)
                .map(|p| p.bytes)
                .sum::<u64>()
                <= *b
        );
    }
    assert_eq!(
        map.iter().map(|p| p.bytes).sum::<u64>(),
        weight_bytes(&c, &s)
    );
    assert!(device_map(&c, &s, &parse_max_memory("0=5GiB,1=5GiB").unwrap()).is_err());
    assert!(parse_max_memory("1=8GiB").is_err());
    assert!(parse_max_memory("0=8").is_err());
}

/// `cpu_attention_transient` is what the CPU attention kernel's backward allocates: its peak
/// above what was allocated before it, within 2 % (f32 and bf16, GQA, a sequence that is not
/// a whole number of query blocks). The rest is rayon's own bookkeeping while the threads run
/// (here about 13 KB with one thread, 20 KB with two, the same on every run), which the
/// calibrated `constant` absorbs.
#[test]
fn cpu_attention_transient_matches_the_kernel() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = cfg(1);
    let (nh, nkv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
    for dtype in [DType::F32, DType::BF16] {
        let s = spec(dtype, Adaptation::default());
        let (b, n) = (s.batch, s.seq);
        let t = |shape: &[usize]| {
            candle_core::Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        // As the model passes them: q, k contiguous (RoPE's outputs), v a transposed view.
        let (q, k) = (t(&[b, nh, n, hd]), t(&[b, nkv, n, hd]));
        let v = t(&[b, n, nkv, hd]).transpose(1, 2).unwrap();
        let (out, g) = (t(&[b, n, nh * hd]), t(&[b, n, nh * hd]));
        let mut m = vec![0f32; n * n];
        for i in 0..n {
            for j in i + 1..n {
                m[i * n + j] = f32::NEG_INFINITY;
            }
        }
        let mask = candle_core::Tensor::from_vec(m, (1, 1, n, n), &Device::Cpu).unwrap();
        let scale = 1.0 / (hd as f64).sqrt();
        let before = alloc::current_bytes();
        alloc::reset_peak();
        let grads =
            vramcal::ops::cpu_attention_backward(&q, &k, &v, &mask, scale, &out, &g).unwrap();
        let measured = alloc::peak_bytes() - before;
        drop(grads);
        let predicted = vramcal::estimate::cpu_attention_transient(&c, &s);
        let err = (predicted as f64 - measured as f64) / measured as f64;
        eprintln!(
            "{dtype:?}: predicted {predicted}, measured {measured} ({:+.3} %)",
            100.0 * err
        );
        assert!(err.abs() < 0.02, "{dtype:?}: {:+.3} %", 100.0 * err);
    }
}

/// Liger's chunk of tokens, against the example in its source (liger-kernel 0.8.5
/// `ops/fused_linear_cross_entropy.py`: "BT = 4096*4, V = 32000, H = 4096 ==> inc_factor = 8,
/// chunk_size = 2048"), and a batch smaller than one chunk.
#[test]
fn liger_chunks_match_its_source() {
    let cfg = vramcal::config::preset("mistral-7b-v0.1").unwrap().config;
    let spec = vramcal::spec::TrainSpec::new(4, 4096);
    assert_eq!(
        vramcal::estimate::torch::liger_chunk_tokens(&cfg, &spec),
        2048
    );
    let small = vramcal::spec::TrainSpec::new(1, 100);
    assert_eq!(
        vramcal::estimate::torch::liger_chunk_tokens(&cfg, &small),
        16
    );
    let tiny_batch = vramcal::spec::TrainSpec::new(1, 3);
    assert_eq!(
        vramcal::estimate::torch::liger_chunk_tokens(&cfg, &tiny_batch),
        1
    );
}

/// DeepSpeed's own buffers under ZeRO (torch profiles): the reduce bucket through backward, the
/// flat fp32 gradient partition at the step, and ZeRO-Offload's host RAM; FSDP has neither
/// DeepSpeed buffer; vramcal's own step (candle profile) none.
#[test]
fn deepspeed_buffers_and_offload() {
    use vramcal::estimate::multi::shard;
    use vramcal::estimate::{estimate_sharded, Coefficients};
    use vramcal::spec::{Offload, Precision, Shard, Sharding};
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = preset("llama-2-7b").unwrap().config;
    let mut s = TrainSpec::new(1, 1024);
    s.dtype = DType::F16;
    s.state_dtype = DType::F32;
    s.precision = Some(Precision::Fp16Master);
    s.checkpointing = vramcal::spec::Checkpointing::Every(1);
    let n = s.trainable_params(&c);
    let (w, g, st) = (2 * n, 2 * n, 12 * n);
    let z2 = shard(&c, &s, &Sharding::new(Shard::Zero2, 8), true, w, g, st).unwrap();
    assert_eq!(z2.reduce_bucket, 500_000_000 * 2);
    assert_eq!(z2.step_gradients, 4 * n.div_ceil(8));
    assert_eq!((z2.host_bytes, z2.host_step), (0, false));
    // DeepSpeed steps fp32 partitions: an fp32 copy of the weights and two fp32 moments.
    assert_eq!(z2.optimizer_states, 12 * n.div_ceil(8));
    assert_eq!(z2.step_transient, Some(4 * n.div_ceil(8)));
    // Stage 1 keeps the bucket too, and frees the other ranks' gradients before its step.
    let z1 = shard(&c, &s, &Sharding::new(Shard::Zero1, 8), true, w, g, st).unwrap();
    assert_eq!(
        (z1.gradients, z1.reduce_bucket, z1.step_gradients),
        (g, 1_000_000_000, 4 * n.div_ceil(8))
    );
    // Stage 3 keeps its 16-bit partition and bucket at the step, one fp32 sub-group (≤ 1e9
    // elements) beside them.
    let z3 = shard(&c, &s, &Sharding::new(Shard::Zero3, 8), true, w, g, st).unwrap();
    assert_eq!(
        z3.step_gradients,
        1_000_000_000 + g.div_ceil(8) + 4 * n.div_ceil(8).min(1_000_000_000)
    );
    let big = shard(&c, &s, &Sharding::new(Shard::Zero3, 2), true, w, g, st).unwrap();
    assert_eq!(
        big.step_gradients,
        1_000_000_000 + g.div_ceil(2) + 4 * 1_000_000_000
    );
    // A bucket whose bytes overflow is refused, never wrapped.
    let huge = Sharding {
        reduce_bucket_elements: u64::MAX,
        ..Sharding::new(Shard::Zero2, 8)
    };
    assert!(shard(&c, &s, &huge, true, w, g, st).is_err());
    let f = shard(&c, &s, &Sharding::new(Shard::Fsdp, 8), true, w, g, st).unwrap();
    assert_eq!((f.reduce_bucket, f.step_gradients), (0, g.div_ceil(8)));
    // DDP shards nothing and keeps a bucket copy of every gradient, beside them at the step.
    let d = shard(&c, &s, &Sharding::new(Shard::Ddp, 8), true, w, g, st).unwrap();
    assert_eq!(
        (d.weights, d.gradients, d.optimizer_states, d.reduce_bucket),
        (w, g, st, g)
    );
    assert_eq!(d.step_gradients, 2 * g);
    // FSDP keeps its root (embedding, norm, head) unsharded through backward, with gradients.
    let h = (c.hidden_size * c.vocab_size) as u64;
    assert!(f.fsdp_root >= 2 * 2 * h, "{}", f.fsdp_root);
    assert_eq!(z2.fsdp_root, 0);
    // Without DeepSpeed's terms (vramcal's own step) ZeRO-2 is the plain partition.
    let plain = shard(&c, &s, &Sharding::new(Shard::Zero2, 8), false, w, g, st).unwrap();
    assert_eq!(
        (plain.reduce_bucket, plain.step_gradients),
        (0, g.div_ceil(8))
    );
    // ZeRO-Offload: no states or gradients on the GPU, 4 + 8 + 4 bytes per trainable
    // parameter of the rank's partition on the host; parameters too under ZeRO-3.
    let off = Sharding {
        offload: Offload::Optimizer,
        ..Sharding::new(Shard::Zero2, 8)
    };
    let o = shard(&c, &s, &off, true, w, g, st).unwrap();
    assert_eq!(
        (o.gradients, o.optimizer_states, o.step_gradients),
        (0, 0, 0)
    );
    assert_eq!(o.host_bytes, 16 * n.div_ceil(8));
    let op = Sharding {
        offload: Offload::OptimizerParams,
        ..Sharding::new(Shard::Zero3, 8)
    };
    let p = shard(&c, &s, &op, true, w, g, st).unwrap();
    assert_eq!(p.host_bytes, 16 * n.div_ceil(8) + w.div_ceil(8));
    assert!(
        p.weights < w / 8,
        "only the gathered layer stays on the GPU"
    );
    // What no stack runs is refused.
    for bad in [
        Sharding {
            offload: Offload::OptimizerParams,
            ..Sharding::new(Shard::Zero2, 8)
        },
        Sharding {
            offload: Offload::Optimizer,
            ..Sharding::new(Shard::Fsdp, 8)
        },
        Sharding::new(Shard::Zero2, 1),
        Sharding {
            gpus_per_node: 9,
            ..Sharding::new(Shard::Zero2, 8)
        },
    ] {
        assert!(shard(&c, &s, &bad, true, w, g, st).is_err(), "{bad:?}");
    }
    let mut eight_bit = s.clone();
    eight_bit.optimizer = vramcal::spec::Optimizer::AdamwBnb8bit;
    assert!(shard(&c, &eight_bit, &off, true, w, g, st).is_err());

    // The estimate: the step holds the fp32 partition, not the 16-bit one; offload moves the
    // peak into backward and reports the host RAM.
    let u = Coefficients::uncalibrated(Profile::TorchSdpa);
    let e = estimate_sharded(
        &c,
        &s,
        Profile::TorchSdpa,
        &u,
        Some(Sharding::new(Shard::Zero2, 8)),
    )
    .unwrap();
    assert_eq!(e.peak_phase, "optimizer_step");
    let item = |e: &vramcal::estimate::Estimate, name: &str| {
        e.items.iter().find(|i| i.name == name).map(|i| i.bytes)
    };
    assert_eq!(item(&e, "gradients"), Some(4 * n.div_ceil(8)));
    assert_eq!(e.items.iter().map(|i| i.bytes).sum::<u64>(), e.peak_bytes);
    assert_eq!(e.host_bytes_per_rank, None);
    let o = estimate_sharded(&c, &s, Profile::TorchSdpa, &u, Some(off)).unwrap();
    assert_eq!(o.peak_phase, "backward");
    assert_eq!(o.host_bytes_per_rank, Some(16 * n.div_ceil(8)));
    assert_eq!(
        item(&o, "gradient reduce bucket (DeepSpeed)"),
        Some(1_000_000_000)
    );
    assert!(o.peak_bytes < e.peak_bytes);
    // ZeRO-3's flat 16-bit gradient partition is held from the start: in backward too, once.
    let mut long = s.clone();
    long.checkpointing = vramcal::spec::Checkpointing::None;
    long.seq = 4096;
    let z3 = estimate_sharded(
        &c,
        &long,
        Profile::TorchSdpa,
        &u,
        Some(Sharding::new(Shard::Zero3, 8)),
    )
    .unwrap();
    assert_eq!(z3.peak_phase, "backward");
    assert_eq!(
        item(&z3, "gradients (ZeRO-3 partition)"),
        Some(g.div_ceil(8))
    );
    assert_eq!(item(&z3, "gradients (alive in backward)"), None);
    assert_eq!(z3.items.iter().map(|i| i.bytes).sum::<u64>(), z3.peak_bytes);
}
