//! vramcal's chunked AdamW against candle-nn's reference AdamW on random data.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use vramcal::optim::{AdamW, AdamWConfig};

#[test]
fn matches_candle_nn_adamw() {
    let dev = Device::Cpu;
    let cfg = AdamWConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let shapes: [&[usize]; 3] = [&[37, 11], &[5], &[300, 7]];
    let init: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(0f32, 1.0, *s, &dev).unwrap())
        .collect();
    let ours: Vec<Var> = init
        .iter()
        .map(|t| Var::from_tensor(&t.copy().unwrap()).unwrap())
        .collect();
    let theirs: Vec<Var> = init
        .iter()
        .map(|t| Var::from_tensor(&t.copy().unwrap()).unwrap())
        .collect();
    let mut a = AdamW::new(ours.clone(), cfg, DType::F32).unwrap();
    a.chunk_elems = 64; // force many chunks, including partial ones
    let mut b = candle_nn::AdamW::new(
        theirs.clone(),
        candle_nn::ParamsAdamW {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        },
    )
    .unwrap();
    for _ in 0..5 {
        let grads: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::randn(0f32, 1.0, *s, &dev).unwrap())
            .collect();
        a.step(&grads).unwrap();
        // candle-nn takes a GradStore; build one from a loss whose gradient is `grads`.
        let loss = theirs
            .iter()
            .zip(&grads)
            .map(|(v, g)| (v.as_tensor() * g).unwrap().sum_all().unwrap())
            .reduce(|x, y| (x + y).unwrap())
            .unwrap();
        b.backward_step(&loss).unwrap();
    }
    for (x, y) in ours.iter().zip(&theirs) {
        let d = (x.as_tensor() - y.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6, "max abs difference {d}");
    }
    assert_eq!(a.state_bytes(), 2 * (37 * 11 + 5 + 300 * 7) * 4);
}

#[test]
fn rejects_bad_hyper_parameters() {
    let v = vec![Var::zeros(3, DType::F32, &Device::Cpu).unwrap()];
    let bad = AdamWConfig {
        beta1: 1.0,
        ..Default::default()
    };
    assert!(AdamW::new(v.clone(), bad, DType::F32).is_err());
    assert!(AdamW::new(v, AdamWConfig::default(), DType::U32).is_err());
}
