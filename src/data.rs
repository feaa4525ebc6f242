//! Sequence lengths from a data set (`--seq-lengths FILE`) and the micro-batches they form:
//! packed rows, padding to the batch's longest sequence or to `--seq`, or padding-free
//! concatenation. What memory depends on is the largest micro-batch the data can form; what
//! time depends on is the tokens processed per epoch.
//!
//! The collators modelled are transformers' (`DataCollatorWithPadding` with `padding="longest"`
//! or `"max_length"`, truncation to `max_length`; `DataCollatorWithFlattening` for padding-free
//! batches, whose `position_ids` restart at every sequence) and TRL's packing into rows of
//! `max_seq_length` tokens.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// How sequences become micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batching {
    /// Concatenated and cut into rows of `--seq` tokens (`--packing`).
    Packed,
    /// Each micro-batch padded to its longest sequence (`--padding longest`, the default).
    PadLongest,
    /// Every sequence padded to `--seq` (`--padding max`).
    PadMax,
    /// A micro-batch's sequences concatenated into one row without padding (`--padding-free`).
    PaddingFree,
}

impl Batching {
    /// The option that selects it.
    pub fn label(self) -> &'static str {
        match self {
            Batching::Packed => "--packing",
            Batching::PadLongest => "--padding longest",
            Batching::PadMax => "--padding max",
            Batching::PaddingFree => "--padding-free",
        }
    }
}

/// The `--padding` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// To the micro-batch's longest sequence.
    Longest,
    /// To `--seq` (`max_length`).
    Max,
}

impl std::str::FromStr for Padding {
    type Err = Error;

    /// Parses `longest` or `max`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for anything else.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "longest" => Ok(Padding::Longest),
            "max" => Ok(Padding::Max),
            _ => Err(Error::invalid("--padding", s, "expected longest or max")),
        }
    }
}

/// The token counts of a data set's sequences, as read from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Lengths {
    /// The file read.
    pub path: PathBuf,
    /// One count per sequence (tokens), in file order.
    pub tokens: Vec<usize>,
}

/// A line of `path` that is not a length.
fn bad_line(path: &Path, line: usize, reason: impl Into<String>) -> Error {
    Error::Csv {
        path: path.to_path_buf(),
        reason: format!("line {line}: {}", reason.into()),
    }
}

impl Lengths {
    /// Reads `path`: one token count per line, or JSON Lines whose objects carry an integer
    /// `length` field; a final empty line is allowed. Every count must be positive and, unless
    /// `allow_longer`, at most `max_positions` (the model's `max_position_embeddings`).
    ///
    /// # Errors
    /// [`Error::Io`] if unreadable; [`Error::Csv`] naming the file and line for text that is not
    /// UTF-8, an empty file, an empty line, a count that is not a positive integer, an object
    /// without an integer `length`, or a count above `max_positions`.
    pub fn read(path: &Path, max_positions: usize, allow_longer: bool) -> Result<Self> {
        let bytes = crate::input::read_capped(path)?;
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            let line = bytes[..e.valid_up_to()]
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                + 1;
            bad_line(path, line, "not UTF-8 text")
        })?;
        let body = text.strip_suffix('\n').unwrap_or(text);
        if body.trim().is_empty() {
            return Err(Error::Csv {
                path: path.to_path_buf(),
                reason: "no sequence lengths (the file is empty)".into(),
            });
        }
        let mut tokens = Vec::new();
        for (i, raw) in body.split('\n').enumerate() {
            let line = i + 1;
            let l = raw.trim_end_matches('\r').trim();
            if l.is_empty() {
                return Err(bad_line(path, line, "empty line: expected a token count"));
            }
            let n = if l.starts_with('{') {
                let v: serde_json::Value = serde_json::from_str(l)
                    .map_err(|e| bad_line(path, line, format!("not a JSON object: {e}")))?;
                v.get("length")
                    .and_then(serde_json::Value::as_u64)
                    .ok_or_else(|| {
                        bad_line(
                            path,
                            line,
                            "the object has no \"length\" field holding a positive integer (the token count)",
                        )
                    })?
            } else {
                l.parse::<u64>().map_err(|_| {
                    bad_line(
                        path,
                        line,
                        format!("{l:?} is not a token count (a positive integer)"),
                    )
                })?
            };
            if n == 0 {
                return Err(bad_line(path, line, "a sequence of 0 tokens"));
            }
            let n = usize::try_from(n)
                .ok()
                .filter(|n| allow_longer || *n <= max_positions)
                .ok_or_else(|| {
                    bad_line(
                        path,
                        line,
                        format!(
                            "{n} tokens is above the model's max_position_embeddings = {max_positions} (--allow-longer permits it)"
                        ),
                    )
                })?;
            tokens.push(n);
        }
        Ok(Lengths {
            path: path.to_path_buf(),
            tokens,
        })
    }

    /// The longest sequence (tokens).
    pub fn longest(&self) -> usize {
        self.tokens.iter().copied().max().unwrap_or(0)
    }

    /// All tokens of the data set.
    pub fn total(&self) -> u64 {
        self.tokens.iter().map(|&t| t as u64).sum()
    }

    /// The largest micro-batch of `batch` sequences the data can form under `batching`, as
    /// `(sequences, tokens per sequence)`; `max_length` is `--seq` where given (the row length
    /// for packing, the padding length for `max`, the truncation length otherwise). A data set
    /// smaller than `batch` forms micro-batches of all its sequences (or packed rows) at most.
    ///
    /// * packed: `(min(batch, rows), max_length)`, `rows = ⌈all tokens / max_length⌉`;
    /// * padded to `max`: `(min(batch, n), max_length)`;
    /// * padded to the longest: `(min(batch, n), min(longest, max_length))`: any sampler, random
    ///   or length-grouped, puts the longest sequence in some micro-batch (transformers'
    ///   `LengthGroupedSampler` puts it in the first, on purpose);
    /// * padding-free: `(1, Σ of the batch longest)`, each truncated to `max_length`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] when packing or `max` padding lacks `max_length`.
    pub fn worst_batch(
        &self,
        batch: usize,
        max_length: Option<usize>,
        batching: Batching,
    ) -> Result<(usize, usize)> {
        let need = |what: Batching| match max_length {
            None => Err(Error::invalid(
                what.label(),
                "without --seq",
                "needs --seq (the row length for packing, the padded length for max)",
            )),
            Some(0) => Err(Error::invalid("--seq", 0, "must be at least 1")),
            Some(m) => Ok(m),
        };
        let cap = |t: usize| max_length.map_or(t, |m| t.min(m));
        let n = self.tokens.len().max(1);
        Ok(match batching {
            Batching::Packed => {
                let row = need(batching)?;
                let rows = self.total().div_ceil(row as u64).max(1);
                (batch.min(usize::try_from(rows).unwrap_or(usize::MAX)), row)
            }
            Batching::PadMax => (batch.min(n), need(batching)?),
            Batching::PadLongest => (batch.min(n), cap(self.longest())),
            Batching::PaddingFree => {
                let mut t: Vec<usize> = self.tokens.iter().map(|&x| cap(x)).collect();
                t.sort_unstable_by(|a, b| b.cmp(a));
                (1, t.iter().take(batch).sum())
            }
        })
    }
}

/// The order a padded-to-longest epoch draws its sequences in (`plan --sampler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sampler {
    /// A uniform shuffle (torch's `RandomSampler`, the Trainer's default).
    #[default]
    Random,
    /// transformers' `LengthGroupedSampler` (`group_by_length=True`): mega-batches of
    /// `min(n / (4·batch), 50)` micro-batches from a shuffle, each sorted longest first, the
    /// longest sequence moved to the first (`trainer_pt_utils.py`,
    /// `get_length_grouped_indices`).
    LengthGrouped,
}

impl std::str::FromStr for Sampler {
    type Err = Error;

    /// Parses `random` or `length-grouped`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for anything else.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "random" => Ok(Sampler::Random),
            "length-grouped" => Ok(Sampler::LengthGrouped),
            _ => Err(Error::invalid(
                "--sampler",
                s,
                "expected random or length-grouped",
            )),
        }
    }
}

impl Sampler {
    /// The CLI name.
    pub fn label(self) -> &'static str {
        match self {
            Sampler::Random => "random",
            Sampler::LengthGrouped => "length-grouped",
        }
    }
}

/// One epoch of a data set under a batching: what it trains and what the device computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Epoch {
    /// Sequences in the data set.
    pub sequences: u64,
    /// Tokens of the data (each sequence truncated to `--seq` where the batching truncates).
    pub real_tokens: u64,
    /// Tokens the device computes: real tokens plus padding.
    pub processed_tokens: u64,
    /// Micro-batches (forward/backward passes).
    pub micro_batches: u64,
    /// Optimizer steps (`ceil(micro_batches / accumulate)`, as the Trainer counts them).
    pub optimizer_steps: u64,
}

impl Lengths {
    /// One epoch of micro-batches of `batch` sequences under `batching`, `accumulate`
    /// micro-batches per optimizer step; `max_length` is `--seq` where given. Padding to the
    /// longest depends on which sequences share a micro-batch: `sampler` orders them, with a
    /// shuffle seeded by `seed` (one epoch, not an expectation).
    ///
    /// * packed: all tokens cut into rows of `max_length`, the last row padded;
    /// * padded to `max`: every sequence `max_length` tokens, truncated to it;
    /// * padded to the longest: each micro-batch `size × its longest`, truncated;
    /// * padding-free: the real tokens (truncated), no padding.
    ///
    /// # Errors
    /// As [`Lengths::worst_batch`]; zero `batch` or `accumulate`.
    pub fn epoch(
        &self,
        batch: usize,
        accumulate: usize,
        max_length: Option<usize>,
        batching: Batching,
        sampler: Sampler,
        seed: u64,
    ) -> Result<Epoch> {
        if batch == 0 {
            return Err(Error::invalid("--batch", batch, "must be at least 1"));
        }
        if accumulate == 0 {
            return Err(Error::invalid(
                "--accumulate",
                accumulate,
                "must be at least 1",
            ));
        }
        if max_length == Some(0) {
            return Err(Error::invalid("--seq", 0, "must be at least 1"));
        }
        // Checks that packing and max padding have --seq.
        self.worst_batch(batch, max_length, batching)?;
        let cap = |t: usize| max_length.map_or(t, |m| t.min(m)) as u64;
        let n = self.tokens.len() as u64;
        let b = batch as u64;
        let truncated: u64 = self.tokens.iter().map(|&t| cap(t)).sum();
        let (real, processed, micro) = match batching {
            Batching::Packed => {
                let row = max_length.expect("checked") as u64;
                let rows = self.total().div_ceil(row);
                (self.total(), rows * row, rows.div_ceil(b))
            }
            Batching::PadMax => (
                truncated,
                n * max_length.expect("checked") as u64,
                n.div_ceil(b),
            ),
            Batching::PaddingFree => (truncated, truncated, n.div_ceil(b)),
            Batching::PadLongest => {
                let order = self.order(batch, sampler, seed);
                let padded = order
                    .chunks(batch)
                    .map(|c| {
                        c.len() as u64 * c.iter().map(|&i| cap(self.tokens[i])).max().unwrap_or(0)
                    })
                    .sum();
                (truncated, padded, n.div_ceil(b))
            }
        };
        Ok(Epoch {
            sequences: n,
            real_tokens: real,
            processed_tokens: processed,
            micro_batches: micro,
            optimizer_steps: micro.div_ceil(accumulate as u64),
        })
    }

    /// The indices of one epoch in `sampler`'s order.
    fn order(&self, batch: usize, sampler: Sampler, seed: u64) -> Vec<usize> {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let n = self.tokens.len();
        let mut idx: Vec<usize> = (0..n).collect();
        idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        if sampler == Sampler::Random {
            return idx;
        }
        let mult = (n / batch.saturating_mul(4)).clamp(1, 50);
        let mut megas: Vec<Vec<usize>> = idx
            .chunks(mult.saturating_mul(batch))
            .map(|m| {
                let mut m = m.to_vec();
                m.sort_by(|&a, &b| self.tokens[b].cmp(&self.tokens[a]));
                m
            })
            .collect();
        // The mega-batch holding the longest sequence gives its first to the first.
        if let Some(max_idx) =
            (0..megas.len()).max_by_key(|&k| (self.tokens[megas[k][0]], usize::MAX - k))
        {
            let first = megas[max_idx][0];
            megas[max_idx][0] = megas[0][0];
            megas[0][0] = first;
        }
        megas.concat()
    }
}

/// The largest micro-batch of a data set under a batching, which `estimate` estimates.
#[derive(Debug, Clone, PartialEq)]
pub struct WorstBatch {
    /// The lengths read.
    pub lengths: Lengths,
    /// How they are batched.
    pub batching: Batching,
    /// Sequences in the largest micro-batch.
    pub batch: usize,
    /// Tokens per sequence in it.
    pub seq: usize,
}

impl WorstBatch {
    /// One line saying where the micro-batch comes from.
    pub fn describe(&self) -> String {
        let n = self.lengths.tokens.len();
        format!(
            "data {}: {n} sequences, longest {} tokens, mean {:.0}; {}: largest micro-batch {} × {} tokens",
            self.lengths.path.display(),
            self.lengths.longest(),
            self.lengths.total() as f64 / n.max(1) as f64,
            self.batching.label(),
            self.batch,
            self.seq
        )
    }

    /// The same as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "seq_lengths": self.lengths.path,
            "sequences": self.lengths.tokens.len(),
            "longest_tokens": self.lengths.longest(),
            "total_tokens": self.lengths.total(),
            "batching": self.batching.label(),
            "worst_micro_batch": self.batch,
            "worst_seq": self.seq,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lengths(t: &[usize]) -> Lengths {
        Lengths {
            path: "l.txt".into(),
            tokens: t.to_vec(),
        }
    }

    /// The largest micro-batch of each batching, by hand: lengths 120, 340, 812, 77 in
    /// micro-batches of 2.
    #[test]
    fn worst_batches() {
        let l = lengths(&[120, 340, 812, 77]);
        let w = |m: Option<usize>, b: Batching| l.worst_batch(2, m, b).unwrap();
        assert_eq!(w(None, Batching::PadLongest), (2, 812));
        assert_eq!(w(Some(512), Batching::PadLongest), (2, 512)); // truncated
        assert_eq!(w(Some(1024), Batching::PadMax), (2, 1024));
        // 1349 tokens fill one row of 2048: a micro-batch of one row.
        assert_eq!(w(Some(2048), Batching::Packed), (1, 2048));
        assert_eq!(w(None, Batching::PaddingFree), (1, 812 + 340));
        assert_eq!(w(Some(300), Batching::PaddingFree), (1, 600));
        assert!(l.worst_batch(2, None, Batching::Packed).is_err());
        assert!(l.worst_batch(2, None, Batching::PadMax).is_err());
        assert_eq!(l.total(), 1349);
        // Four sequences form micro-batches of four at most; 1349 tokens, three rows of 512.
        assert_eq!(
            l.worst_batch(8, None, Batching::PadLongest).unwrap(),
            (4, 812)
        );
        assert_eq!(
            l.worst_batch(8, Some(512), Batching::PadMax).unwrap(),
            (4, 512)
        );
        assert_eq!(
            l.worst_batch(8, Some(512), Batching::Packed).unwrap(),
            (3, 512)
        );
    }

    /// One epoch of each batching, by hand: lengths 120, 340, 812, 77 in micro-batches of 2,
    /// 2 micro-batches per optimizer step.
    #[test]
    fn epochs_by_hand() {
        let l = lengths(&[120, 340, 812, 77]);
        let e = |m: Option<usize>, b: Batching, s: Sampler| l.epoch(2, 2, m, b, s, 7).unwrap();
        let max = e(Some(512), Batching::PadMax, Sampler::Random);
        assert_eq!(
            (
                max.real_tokens,
                max.processed_tokens,
                max.micro_batches,
                max.optimizer_steps
            ),
            (120 + 340 + 512 + 77, 4 * 512, 2, 1)
        );
        // 1349 tokens in rows of 512: 3 rows, the last padded; 2 micro-batches.
        let packed = e(Some(512), Batching::Packed, Sampler::Random);
        assert_eq!(
            (
                packed.real_tokens,
                packed.processed_tokens,
                packed.micro_batches
            ),
            (1349, 3 * 512, 2)
        );
        let free = e(Some(512), Batching::PaddingFree, Sampler::Random);
        assert_eq!(free.processed_tokens, 120 + 340 + 512 + 77);
        // Padded to the longest: whatever the pairing, the 812 (truncated to 512) pads its
        // partner, and the other pair pads to its longer one.
        let longest = e(Some(512), Batching::PadLongest, Sampler::Random);
        let pairings = [
            2 * 512 + 2 * 340, // 812 with 120 or 77; 340 with the other
            2 * 512 + 2 * 120, // 812 with 340; 120 with 77
        ];
        assert!(
            pairings.contains(&longest.processed_tokens),
            "{}",
            longest.processed_tokens
        );
        assert!(l
            .epoch(0, 1, Some(512), Batching::PadMax, Sampler::Random, 0)
            .is_err());
    }

    /// Length-grouped sampling pads less than a shuffle over many sequences, puts the longest
    /// sequence in the first micro-batch, and keeps every sequence once.
    #[test]
    fn length_grouped_pads_less() {
        let t: Vec<usize> = (0..1000).map(|i| 1 + (i * 7919) % 997).collect();
        let l = lengths(&t);
        let random = l
            .epoch(8, 1, None, Batching::PadLongest, Sampler::Random, 3)
            .unwrap();
        let grouped = l
            .epoch(8, 1, None, Batching::PadLongest, Sampler::LengthGrouped, 3)
            .unwrap();
        assert_eq!(random.real_tokens, grouped.real_tokens);
        assert!(
            grouped.processed_tokens < random.processed_tokens,
            "{grouped:?} vs {random:?}"
        );
        let order = l.order(8, Sampler::LengthGrouped, 3);
        assert_eq!(l.tokens[order[0]], l.longest());
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
    }
}
