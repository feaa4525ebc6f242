//! A Hugging Face `tokenizers` tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata
//! (byte-level BPE, `tokenizer.ggml.model = "gpt2"`, as SmolLM2 and Llama 3 use).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{PreTokenizerWrapper, Tokenizer};

use crate::error::{Error, Result};

fn strings(md: &HashMap<String, Value>, path: &Path, key: &str) -> Result<Vec<String>> {
    let bad = |reason: String| Error::Weights {
        path: path.to_path_buf(),
        reason: format!("{key}: {reason}"),
    };
    let v = md.get(key).ok_or_else(|| bad("missing".into()))?;
    v.to_vec()
        .map_err(|e| bad(e.to_string()))?
        .iter()
        .map(|x| x.to_string().cloned().map_err(|e| bad(e.to_string())))
        .collect()
}

/// Builds the tokenizer from GGUF metadata: BPE vocabulary `tokenizer.ggml.tokens` (id =
/// position), merges `tokenizer.ggml.merges`, byte-level pre-tokenization with individual
/// digits (SmolLM2's `tokenizer.json`), no BOS added.
///
/// # Errors
/// [`Error::Weights`] when the metadata is missing, not byte-level BPE, or inconsistent.
pub fn tokenizer_from_gguf(md: &HashMap<String, Value>, path: &Path) -> Result<Tokenizer> {
    let model = md
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if model != "gpt2" {
        return Err(Error::Weights {
            path: path.to_path_buf(),
            reason: format!(
                "tokenizer.ggml.model = {model:?}: only byte-level BPE (\"gpt2\") is supported"
            ),
        });
    }
    let tokens = strings(md, path, "tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings(md, path, "tokenizer.ggml.merges")?
        .into_iter()
        .filter_map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| Error::Weights {
            path: path.to_path_buf(),
            reason: format!("cannot build BPE tokenizer: {e}"),
        })?;
    let mut tok = Tokenizer::new(bpe);
    let pre = Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ]);
    tok.with_pre_tokenizer(Some(pre));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tok)
}

/// Encodes `text` to token ids with `tok` (no special tokens added).
///
/// # Errors
/// [`Error::InvalidValue`] if the tokenizer fails.
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tok
        .encode(text, false)
        .map_err(|e| Error::invalid("text", text, format!("tokenizer failed: {e}")))?;
    Ok(enc.get_ids().to_vec())
}
