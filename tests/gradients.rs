//! Gradients of the trainable decoder: finite differences in f64 on the `tiny` config (every
//! parameter tensor), every parameter receives a gradient (f32 and bf16), names and shapes
//! match the config's parameter table.

use candle_core::{DType, Device, Tensor, Var};
use vramcal::config::preset;
use vramcal::measure::step::random_batch;
use vramcal::model::Decoder;
use vramcal::spec::TrainSpec;
use vramcal::weights::RandomWeights;

fn tiny_model(dtype: DType) -> Decoder {
    let cfg = preset("tiny").unwrap().config;
    Decoder::new(&cfg, &mut RandomWeights::new(7), dtype, &Device::Cpu).unwrap()
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
    let m = tiny_model(DType::F32);
    let table = m.config().param_shapes();
    let vars = m.trainable_vars();
    assert_eq!(vars.len(), table.len());
    for ((name, v), p) in vars.iter().zip(&table) {
        assert_eq!(name, &p.name);
        assert_eq!(v.dims(), p.shape.as_slice(), "{name}");
    }
    assert_eq!(m.param_bytes(), m.config().param_count() * 4);
}

fn loss_f64(m: &Decoder, x: &Tensor, y: &Tensor) -> f64 {
    m.loss(x, y).unwrap().to_scalar::<f64>().unwrap()
}

/// Central finite differences in f64 against backprop, for up to 24 elements of every tensor
/// (spread over the tensor), seq 8 > sliding window 6 so the window mask is exercised.
#[test]
fn finite_difference_gradients_f64_every_tensor() {
    let m = tiny_model(DType::F64);
    let (x, y) = tiny_batch(2, 8);
    let loss = m.loss(&x, &y).unwrap();
    let grads = loss.backward().unwrap();
    let h = 1e-5;
    let mut checked = 0;
    let mut worst: f64 = 0.0;
    for (name, var) in m.trainable_vars() {
        let g = grads
            .get(&var)
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
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
            let lp = loss_f64(&m, &x, &y);
            set(&var, -h);
            let lm = loss_f64(&m, &x, &y);
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
    let m = tiny_model(dtype);
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
