//! The measuring protocol with the counting allocator installed in this test binary.

mod common;

use candle_core::Device;
use vramcal::config::{preset, resolve_model};
use vramcal::measure::{alloc, measure, CountingAlloc, HostProbe, Measurement, Setup};
use vramcal::model::weights::WeightsSpec;
use vramcal::spec::TrainSpec;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

// Tests in this binary share one allocator: run the measuring ones one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(model: &str, weights: WeightsSpec, batch: usize, seq: usize) -> Measurement {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let setup = Setup {
        model: resolve_model(model).unwrap(),
        weights,
        spec: TrainSpec::new(batch, seq),
        device: Device::Cpu,
    };
    let mut m = Measurement::default();
    measure(&setup, &HostProbe::new().unwrap(), &mut m).unwrap();
    m
}

#[test]
fn counting_allocator_is_exact() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    alloc::reset_peak();
    let before = alloc::current_bytes();
    let v = vec![0u8; 10_000_000];
    let during = alloc::current_bytes();
    let peak = alloc::peak_bytes();
    drop(v);
    let after = alloc::current_bytes();
    // Other threads of the test harness may allocate a little meanwhile.
    assert!(
        (during - before).abs_diff(10_000_000) < 64 * 1024,
        "{}",
        during - before
    );
    assert!(peak >= during);
    assert!(after < during && during - after >= 10_000_000 - 64 * 1024);
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
