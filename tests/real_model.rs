//! The real SmolLM2-135M-Instruct GGUF (fetched by `scripts/fetch-smollm2.sh`): vramcal's
//! trainable decoder against candle-transformers' `quantized_llama` on the same file, and the
//! loss on English text tokenized with the GGUF's own tokenizer.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use vramcal::model::Decoder;
use vramcal::weights::gguf::{read_content, GgufWeights};
use vramcal::weights::tokenizer::{encode, tokenizer_from_gguf};

const TEXT: &str = "The capital of France is Paris. It is famous for the Eiffel Tower, \
the Louvre museum and its cafes. Every year, millions of tourists visit the city.";

fn load(path: &std::path::Path) -> (Decoder, tokenizers::Tokenizer) {
    let mut w = GgufWeights::open(path).unwrap();
    let cfg = w.config().unwrap();
    let tok = tokenizer_from_gguf(w.metadata(), path).unwrap();
    let m = Decoder::new(&cfg, &mut w, DType::F32, &Device::Cpu).unwrap();
    (m, tok)
}

/// Logits of every position, vramcal (whole sequence at once, transformers' RoPE layout on
/// un-permuted weights) vs `quantized_llama` (token by token with its KV cache, llama.cpp's
/// interleaved RoPE on the GGUF's permuted weights), both on dequantized f32 weights.
#[test]
fn logits_match_quantized_llama() {
    let Some(path) = common::smollm2_gguf() else {
        return;
    };
    // Make quantized_llama use dequantized f32 matmuls (not Q8 activations), so the two models
    // compute the same function and differ only by rounding.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let (ours, tok) = load(&path);
    let ids = encode(&tok, TEXT).unwrap();
    let ids = &ids[..16];
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let our_logits = ours.forward(&x).unwrap().squeeze(0).unwrap(); // (seq, vocab)

    let (content, mut reader) = read_content(&path).unwrap();
    let mut reference = ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap();
    let mut worst: f32 = 0.0;
    let mut scale: f32 = 0.0;
    for (pos, &id) in ids.iter().enumerate() {
        let xi = Tensor::new(&[id], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let r = reference.forward(&xi, pos).unwrap().squeeze(0).unwrap(); // (vocab,)
        let o = our_logits.i(pos).unwrap();
        let d = (&o - &r)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let s = r
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        worst = worst.max(d);
        scale = scale.max(s);
        let (oa, ra) = (
            o.argmax(0).unwrap().to_scalar::<u32>().unwrap(),
            r.argmax(0).unwrap().to_scalar::<u32>().unwrap(),
        );
        assert_eq!(oa, ra, "argmax differs at position {pos}");
    }
    eprintln!("max |logit difference| = {worst:e} (max |logit| = {scale})");
    // Stated tolerance: 1e-3 absolute on logits of magnitude ~20 (f32 rounding of different
    // summation orders over 30 layers).
    assert!(worst < 1e-3, "max |logit difference| {worst} exceeds 1e-3");
}

/// Next-token loss on English text is far below a uniform guess, ln(49152) ≈ 10.8.
#[test]
fn loss_on_english_text_is_low() {
    let Some(path) = common::smollm2_gguf() else {
        return;
    };
    let (m, tok) = load(&path);
    let ids = encode(&tok, TEXT).unwrap();
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        TEXT,
        "tokenizer round trip"
    );
    assert!(ids.len() > 20, "{} tokens", ids.len());
    let n = ids.len();
    let x = Tensor::new(&ids[..n - 1], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let y = Tensor::new(&ids[1..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let loss = m.loss(&x, &y).unwrap().to_scalar::<f32>().unwrap();
    eprintln!(
        "loss on {} tokens of English text: {loss:.4} nats (uniform: {:.4})",
        n - 1,
        (49152f32).ln()
    );
    assert!(loss < 4.0, "loss {loss}");
    // Shuffled tokens are much less predictable: the model uses the order.
    let mut shuffled = ids.clone();
    shuffled.reverse();
    let xs = Tensor::new(&shuffled[..n - 1], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let ys = Tensor::new(&shuffled[1..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let rev = m.loss(&xs, &ys).unwrap().to_scalar::<f32>().unwrap();
    assert!(rev > loss + 2.0, "reversed text loss {rev} vs {loss}");
}
