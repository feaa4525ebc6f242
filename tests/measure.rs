//! The measuring protocol with the counting allocator installed in this test binary.

mod common;

use candle_core::Device;
use vramcal::config::{preset, resolve_model};
use vramcal::measure::{alloc, measure, CountingAlloc, HostProbe, Measurement, Setup};
use vramcal::spec::LoraConfig;
use vramcal::spec::TrainSpec;
use vramcal::spec::WeightsSpec;
use vramcal::spec::{partition_len, Shard, Sharding};
use vramcal::spec::{Adaptation, Checkpointing, Quant};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Runs `f` on this binary's one measuring thread, one call at a time. Tests share one
/// allocator, so measurements must not overlap; and they run on one long-lived thread because
/// a measurement allocates gemm's packing buffer on its calling thread
/// (`alloc::warm_cpu_threads`), which a test thread frees when it ends, possibly in the middle
/// of the next test's measurement.
fn on_measuring_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::sync::{mpsc, Mutex, OnceLock};
    type Job = Box<dyn FnOnce() + Send>;
    static JOBS: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let jobs = JOBS.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::spawn(move || {
            for job in rx {
                job();
            }
        });
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    jobs.lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(Box::new(move || {
            let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        }))
        .unwrap();
    match rx.recv().unwrap() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

fn run(model: &str, weights: WeightsSpec, batch: usize, seq: usize) -> Measurement {
    run_spec(model, weights, TrainSpec::new(batch, seq))
}

fn run_spec(model: &str, weights: WeightsSpec, spec: TrainSpec) -> Measurement {
    run_rank(model, weights, spec, None)
}

/// [`run_spec`] as a simulated data-parallel rank (`measure --shard`), or one device (`None`).
fn run_rank(
    model: &str,
    weights: WeightsSpec,
    spec: TrainSpec,
    sharding: Option<Sharding>,
) -> Measurement {
    let model = model.to_string();
    on_measuring_thread(move || {
        let setup = Setup {
            model: resolve_model(&model).unwrap(),
            weights,
            spec,
            device: Device::Cpu,
            sharding,
        };
        let mut m = Measurement::default();
        measure(&setup, &HostProbe::new().unwrap(), &mut m).unwrap();
        m
    })
}

/// A 10,000,000-byte vector moves the live count by exactly that much. Other threads of the
/// test harness may free memory in the same window (a finished test thread frees its
/// thread-local matmul buffers), so the window is retried until one is undisturbed.
#[test]
fn counting_allocator_is_exact() {
    on_measuring_thread(|| {
        let mut deltas = Vec::new();
        for _ in 0..20 {
            alloc::reset_peak();
            let before = alloc::current_bytes();
            let v = std::hint::black_box(vec![0u8; 10_000_000]);
            let during = alloc::current_bytes();
            let peak = alloc::peak_bytes();
            drop(v);
            let after = alloc::current_bytes();
            assert!(peak >= during);
            deltas.push((during as i64 - before as i64, during as i64 - after as i64));
            if deltas.last() == Some(&(10_000_000, 10_000_000)) {
                return;
            }
        }
        panic!("no undisturbed window: {deltas:?}");
    })
}

/// Peak ≥ weights + gradients + AdamW states, each computed in bytes from the config, and the
/// recorded component bytes equal those figures exactly.
fn check_lower_bound(model: &str, m: &Measurement) {
    let n = preset(model).unwrap().config.param_count();
    let (w, g, s) = (4 * n, 4 * n, 8 * n);
    assert_eq!(m.param_bytes, w);
    assert_eq!(m.grad_bytes, g);
    assert_eq!(m.optimizer_state_bytes, s);
    let (_, peak) = m.peak().unwrap();
    assert!(
        peak >= w + g + s,
        "peak {peak} < weights+grads+states {}",
        w + g + s
    );
    // After step 1's update: weights and states alive, gradients freed.
    let end = m.phase("step1_optimizer_step").unwrap().end_allocated_bytes;
    assert!(end >= w + s, "end of step 1 {end}");
    if g > 64 << 20 {
        // (Only meaningful when gradients outweigh the matmul workspace, i.e. not for `tiny`.)
        assert!(end < w + s + g, "gradients still alive after step 1: {end}");
    }
    // Step 2's forward holds activations on top of weights and states.
    let fwd = m.phase("step2_forward").unwrap();
    assert!(fwd.end_allocated_bytes > end);
    assert_eq!(m.losses.len(), 2);
    assert!(m.losses.iter().all(|l| l.is_finite()));
}

#[test]
fn tiny_peak_is_at_least_weights_grads_states() {
    let m = run("tiny", WeightsSpec::Random { seed: 0 }, 2, 16);
    check_lower_bound("tiny", &m);
    let names: Vec<_> = m.phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "load",
            "optimizer_init",
            "step1_forward",
            "step1_backward",
            "step1_optimizer_step",
            "step2_forward",
            "step2_backward",
            "step2_optimizer_step"
        ]
    );
    // The optimizer is created lazily: no states before step 1.
    let init = m.phase("optimizer_init").unwrap();
    assert!(init.end_allocated_bytes - m.phase("load").unwrap().end_allocated_bytes < 4096);
}

#[test]
fn smollm2_activations_grow_with_tokens() {
    let small = run("smollm2-135m", WeightsSpec::Random { seed: 0 }, 1, 16);
    check_lower_bound("smollm2-135m", &small);
    let big = run("smollm2-135m", WeightsSpec::Random { seed: 0 }, 2, 16);
    let act = |m: &Measurement| {
        m.phase("step2_forward").unwrap().end_allocated_bytes
            - m.phase("step1_optimizer_step").unwrap().end_allocated_bytes
    };
    let (a1, a2) = (act(&small), act(&big));
    // Twice the tokens: activations and logits roughly double.
    assert!(
        a2 as f64 > 1.8 * a1 as f64 && (a2 as f64) < 2.2 * a1 as f64,
        "{a1} vs {a2}"
    );
}

#[test]
fn real_gguf_measures() {
    let Some(path) = common::smollm2_gguf() else {
        return;
    };
    let m = run("smollm2-135m", WeightsSpec::Gguf(path), 1, 16);
    check_lower_bound("smollm2-135m", &m);
}

fn smollm2_spec(method: &str, batch: usize, seq: usize) -> TrainSpec {
    let mut spec = TrainSpec::new(batch, seq);
    spec.adaptation = match method {
        "lora" => Adaptation {
            lora: Some(LoraConfig::default()),
            quant: Quant::None,
            seed: 0,
        },
        "qlora" => Adaptation {
            lora: Some(LoraConfig::default()),
            quant: Quant::Nf4 { double: false },
            seed: 0,
        },
        _ => Adaptation::default(),
    };
    spec
}

/// Checkpointing lowers the measured peak where activations dominate, for every method.
#[test]
fn checkpointing_lowers_the_peak() {
    for method in ["full", "lora", "qlora"] {
        let plain = run_spec(
            "smollm2-135m",
            WeightsSpec::Random { seed: 0 },
            smollm2_spec(method, 1, 96),
        );
        let mut spec = smollm2_spec(method, 1, 96);
        spec.checkpointing = Checkpointing::Every(1);
        let ckpt = run_spec("smollm2-135m", WeightsSpec::Random { seed: 0 }, spec);
        let (p0, p1) = (plain.peak().unwrap().1, ckpt.peak().unwrap().1);
        assert!(p1 < p0, "{method}: checkpointed peak {p1} not below {p0}");
        // Same computation: same loss.
        assert!(
            (plain.losses[1] - ckpt.losses[1]).abs() < 1e-4,
            "{method}: {:?} vs {:?}",
            plain.losses,
            ckpt.losses
        );
    }
}

/// LoRA: no gradients or states for the base; QLoRA: 0.5 byte plus block constants per
/// quantized parameter, measured at the end of `load`.
#[test]
fn lora_and_qlora_memory() {
    let cfg = preset("smollm2-135m").unwrap().config;
    // Warm-up: the first NF4 quantization starts the thread pool's workers, whose thread-local
    // buffers (about 3 MiB) would otherwise count in the first measured load only.
    run_spec(
        "smollm2-135m",
        WeightsSpec::Random { seed: 0 },
        smollm2_spec("qlora", 1, 16),
    );
    let linear: u64 = 30 * (576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536);
    let load = |m: &Measurement| m.phase("load").unwrap().end_allocated_bytes as f64;
    // Another test thread of this process ending between the two loads frees its thread-local
    // matmul buffers (MiBs) inside the window: the pair is measured again, at most three times,
    // until one window is undisturbed.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let lora = run_spec(
            "smollm2-135m",
            WeightsSpec::Random { seed: 0 },
            smollm2_spec("lora", 1, 16),
        );
        let qlora = run_spec(
            "smollm2-135m",
            WeightsSpec::Random { seed: 0 },
            smollm2_spec("qlora", 1, 16),
        );
        let t = lora.trainable_params;
        assert_eq!(t, 30 * 8 * ((576 + 576) + (576 + 192)));
        assert_eq!(lora.grad_bytes, 4 * t);
        assert_eq!(lora.optimizer_state_bytes, 8 * t);
        // The load-end difference is the linear weights: 4 bytes (f32) vs NF4's 0.5 + 4/64.
        let per_param = (load(&lora) - load(&qlora)) / linear as f64;
        seen.push(per_param);
        if (per_param - (4.0 - 0.5625)).abs() < 0.01 {
            break;
        }
    }
    let last = *seen.last().unwrap();
    assert!(
        (last - (4.0 - 0.5625)).abs() < 0.01,
        "bytes per parameter: {seen:?}"
    );
    let _ = cfg;
}

/// With gradient accumulation the peak follows the micro-batch, not the whole batch.
#[test]
fn accumulation_peak_follows_the_micro_batch() {
    let one = run_spec(
        "smollm2-135m",
        WeightsSpec::Random { seed: 0 },
        smollm2_spec("lora", 1, 64),
    );
    let mut acc = smollm2_spec("lora", 1, 64);
    acc.accumulate = 3;
    let three = run_spec("smollm2-135m", WeightsSpec::Random { seed: 0 }, acc);
    let big = run_spec(
        "smollm2-135m",
        WeightsSpec::Random { seed: 0 },
        smollm2_spec("lora", 3, 64),
    );
    let (p1, p3, pb) = (
        one.peak().unwrap().1,
        three.peak().unwrap().1,
        big.peak().unwrap().1,
    );
    assert!(
        (p3 as f64) < 1.05 * p1 as f64,
        "accumulate 3: {p3} vs micro-batch alone {p1}"
    );
    assert!(
        p3 < pb,
        "accumulate 3 × 1 ({p3}) should be below batch 3 ({pb})"
    );
    assert!(three.step_seconds[1] > one.step_seconds[1]);
}

/// A simulated data-parallel rank holds its share, to the byte: DDP's buckets a copy of every
/// gradient; a ZeRO rank the optimizer's copy of its partition of the weights, the states of
/// that partition, and (ZeRO-2) only its partition of the gradients once backward has ended.
/// The rank runs the one-device step's arithmetic: step 1's loss is the same, and DDP's
/// all-reduce of equal gradients changes nothing.
#[test]
fn simulated_ranks_hold_their_share() {
    let spec = TrainSpec::new(1, 16);
    let run = |s: Option<Sharding>| {
        run_rank(
            "mistral-mini",
            WeightsSpec::Random { seed: 0 },
            spec.clone(),
            s,
        )
    };
    let rank = |shard, n, r| {
        Some(Sharding {
            rank: r,
            ..Sharding::new(shard, n)
        })
    };
    let one = run(None);
    let ddp = run(rank(Shard::Ddp, 4, 0));
    let z1 = run(rank(Shard::Zero1, 4, 0));
    let z2 = run(rank(Shard::Zero2, 4, 0));
    let z2_last = run(rank(Shard::Zero2, 3, 2));
    let t = one.trainable_params;
    let (p, last) = (partition_len(t, 4, 0), partition_len(t, 3, 2));
    assert!(last < partition_len(t, 3, 0), "{t} elements over 3 ranks");
    let end = |m: &Measurement, phase: &str| m.phase(phase).unwrap().end_allocated_bytes as i64;
    let diff = |a: &Measurement, b: &Measurement, phase: &str| end(a, phase) - end(b, phase);
    // Equal up to candle's bookkeeping of the tensors that differ (each one's shape, layout
    // and storage handle: a few hundred bytes) and what the harness's other test threads hold
    // at that moment (the counter is the process's): 64 KiB, against partitions of 13 MB.
    let near = |got: i64, want: i64| {
        assert!((got - want).abs() <= 64 << 10, "{got} B, counted {want} B");
    };
    // f32 weights, gradients and AdamW moments: 4 bytes per element each.
    near(diff(&ddp, &one, "optimizer_init"), 4 * t as i64);
    near(diff(&z1, &one, "optimizer_init"), 4 * p as i64);
    near(diff(&z2_last, &one, "optimizer_init"), 4 * last as i64);
    assert_eq!(one.optimizer_state_bytes, 8 * t);
    for (m, n) in [(&z1, p), (&z2, p), (&z2_last, last)] {
        assert_eq!(m.optimizer_state_bytes, 8 * n);
    }
    // After backward: the one-device step holds weights, states and gradients; ZeRO-2 the
    // weights, its partition's copy, states and gradients.
    near(
        diff(&one, &z2, "step2_backward"),
        (8 * t + 4 * t) as i64 - (4 * p + 8 * p + 4 * p) as i64,
    );
    // ZeRO-1 keeps the full gradients to the step, which frees them with the partition's.
    near(
        diff(&one, &z1, "step2_backward"),
        (8 * t) as i64 - (4 * p + 8 * p) as i64,
    );
    near(
        diff(&one, &z1, "step2_optimizer_step"),
        (8 * t) as i64 - (4 * p + 8 * p) as i64,
    );
    assert_eq!(one.losses, ddp.losses);
    for m in [&z1, &z2, &z2_last] {
        assert_eq!(m.losses[0], one.losses[0]);
    }
}

/// A simulated FSDP rank (`measure --shard fsdp`, checkpointing every layer) holds its shard
/// of every tensor (`⌈rows/N⌉` rows, padded) once `fully_shard` has run, and AdamW's states
/// for the trainable shards only; its step 1 computes the one-device loss (the gathered
/// parameters are the whole model's), and the last rank allocates as much as the first.
#[test]
fn simulated_fsdp_rank_holds_its_shards() {
    let mut spec = TrainSpec::new(1, 16);
    spec.checkpointing = Checkpointing::Every(1);
    let run_on = |model: &str, s: Option<Sharding>| {
        run_rank(model, WeightsSpec::Random { seed: 0 }, spec.clone(), s)
    };
    let run = |s: Option<Sharding>| run_on("mistral-mini", s);
    let one = run(None);
    let n = 4;
    let first = run(Some(Sharding::new(Shard::Fsdp, n)));
    let last = run(Some(Sharding {
        rank: n - 1,
        ..Sharding::new(Shard::Fsdp, n)
    }));
    let cfg = resolve_model("mistral-mini").unwrap().config;
    // Every tensor (f32, full fine-tuning) trains: ⌈rows/N⌉ · cols elements each.
    let padded: u64 = cfg
        .param_shapes()
        .iter()
        .map(|p| {
            let rows = p.shape[0] as u64;
            rows.div_ceil(n as u64) * (p.numel() / rows)
        })
        .sum();
    let end = |m: &Measurement, phase: &str| m.phase(phase).unwrap().end_allocated_bytes as i64;
    for m in [&first, &last] {
        assert_eq!(m.optimizer_state_bytes, 8 * padded);
        // After `fully_shard` the rank holds its shards instead of the whole model, up to
        // candle's bookkeeping of the shard tensors (a few hundred bytes each) and the
        // harness's other threads (64 KiB, against 160 MB).
        let got = end(m, "optimizer_init") - end(&one, "optimizer_init");
        let want = 4 * padded as i64 - 4 * one.params as i64;
        assert!((got - want).abs() <= 64 << 10, "{got} B, counted {want} B");
        assert_eq!(m.losses[0], one.losses[0]);
    }
    assert!(
        (end(&first, "step2_optimizer_step") - end(&last, "step2_optimizer_step")).abs()
            <= 64 << 10
    );
    // A rank past some tensors' last rows holds padding only for them, and still runs.
    let wide = 64;
    let tiny = resolve_model("tiny").unwrap().config;
    assert!(tiny.param_shapes().iter().any(|p| p.shape[0] < wide));
    let past = run_on(
        "tiny",
        Some(Sharding {
            rank: wide - 1,
            ..Sharding::new(Shard::Fsdp, wide)
        }),
    );
    assert_eq!(past.losses[0], run_on("tiny", None).losses[0]);
}

/// A simulated ZeRO-3 rank (`measure --shard zero3`, checkpointing every layer) holds its flat
/// partition of every tensor (`⌈numel/N⌉` elements, padded), the flat gradient partition and
/// the bucket once initialized, AdamW's states for its partition only; on step 1 (the trace
/// being recorded) it releases every module after use, and from step 2 on keeps the whole of
/// this small model gathered (each parameter is used again within 1e9 elements). Its step 1
/// computes the one-device loss, and a bucket small enough to be reduced many times in
/// backward gives the same step-2 loss as one reduced once.
#[test]
fn simulated_zero3_rank_holds_its_partitions() {
    let mut spec = TrainSpec::new(1, 16);
    spec.checkpointing = Checkpointing::Every(1);
    let run = |s: Option<Sharding>| {
        run_rank(
            "mistral-mini",
            WeightsSpec::Random { seed: 0 },
            spec.clone(),
            s,
        )
    };
    let n = 4;
    let bucket = 1u64 << 22;
    let sharding = |rank: usize, bucket: u64| Sharding {
        rank,
        reduce_bucket_elements: bucket,
        ..Sharding::new(Shard::Zero3, n)
    };
    let one = run(None);
    let first = run(Some(sharding(0, bucket)));
    let last = run(Some(sharding(n - 1, bucket)));
    let small = run(Some(sharding(0, 1 << 16)));
    let cfg = resolve_model("mistral-mini").unwrap().config;
    let padded: u64 = cfg
        .param_shapes()
        .iter()
        .map(|p| p.numel().div_ceil(n as u64))
        .sum();
    let end = |m: &Measurement, phase: &str| m.phase(phase).unwrap().end_allocated_bytes as i64;
    let params = one.params as i64;
    for m in [&first, &last] {
        assert_eq!(m.optimizer_state_bytes, 8 * padded);
        // Partitions, gradient partition and bucket instead of the whole model (f32), up to
        // candle's bookkeeping and the harness's other threads (64 KiB, against 100 MB).
        let got = end(m, "optimizer_init") - end(&one, "optimizer_init");
        let want = 8 * padded as i64 + 4 * bucket as i64 - 4 * params;
        assert!((got - want).abs() <= 64 << 10, "{got} B, counted {want} B");
        // Step 1 releases every module after its forward; step 2 keeps them all, and the
        // states exist from step 1's update on.
        let kept = end(m, "step2_forward") - end(m, "step1_forward");
        let want = 4 * params + 8 * padded as i64;
        assert!(
            (kept - want).abs() <= 64 << 10,
            "{kept} B, counted {want} B"
        );
        assert_eq!(m.losses[0], one.losses[0]);
    }
    assert_eq!(small.losses, first.losses);
    // mistral-mini's tensors all have a multiple of 4 rows, so a ZeRO-3 rank's flat partition
    // of each is the FSDP rank's rows: both ranks step the same elements with the same reduced
    // gradients, and step 2's loss is the same to the bit (a gradient lost, doubled or put at
    // the wrong offset would change it).
    assert!(cfg.param_shapes().iter().all(|p| p.shape[0] % n == 0));
    for (rank, z) in [(0, &first), (n - 1, &last)] {
        let f = run(Some(Sharding {
            rank,
            ..Sharding::new(Shard::Fsdp, n)
        }));
        assert_eq!(z.losses, f.losses, "rank {rank}");
    }
}
