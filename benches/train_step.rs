//! One training step (forward, loss, backward, AdamW) of smollm2-135m at batch 1 × seq 256,
//! f32, random weights: with the counting allocator counting, and with counting switched off
//! (same binary, `vramcal::measure::alloc::set_counting(false)`), to measure its overhead.
//!
//! Run: `cargo bench --bench train_step` (about 5 minutes on 2 cores).

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion};
use vramcal::config::preset;
use vramcal::measure::step::{param_grads, random_batch};
use vramcal::measure::{alloc, CountingAlloc};
use vramcal::model::Decoder;
use vramcal::optim::AdamW;
use vramcal::spec::TrainSpec;
use vramcal::weights::RandomWeights;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn bench(c: &mut Criterion) {
    let cfg = preset("smollm2-135m").unwrap().config;
    let spec = TrainSpec::new(1, 256);
    let model = Decoder::new(&cfg, &mut RandomWeights::new(0), spec.dtype, &Device::Cpu).unwrap();
    let vars = model
        .trainable_vars()
        .into_iter()
        .map(|(_, v)| v.clone())
        .collect();
    let mut opt = AdamW::new(vars, spec.adamw, spec.state_dtype).unwrap();
    let (x, y) = random_batch(&spec, cfg.vocab_size, 1, &Device::Cpu).unwrap();
    let mut step = || {
        let loss = model.loss(&x, &y).unwrap();
        let grads = param_grads(&model, loss).unwrap();
        opt.step(&grads).unwrap();
    };
    step(); // allocate optimizer states outside the timed region
    let mut g = c.benchmark_group("train_step_smollm2-135m_b1_s256_f32");
    g.sample_size(10);
    g.measurement_time(std::time::Duration::from_secs(30));
    // Interleaved, so that an order effect (the machine warming up, the allocator's arenas
    // growing) is not mistaken for the counter's cost.
    for round in 1..=2 {
        alloc::set_counting(false);
        g.bench_function(format!("counting_allocator_off_{round}"), |b| {
            b.iter(&mut step)
        });
        alloc::set_counting(true);
        alloc::reset_peak();
        g.bench_function(format!("counting_allocator_on_{round}"), |b| {
            b.iter(&mut step)
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
