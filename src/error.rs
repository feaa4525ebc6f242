//! The library's typed error.
//!
//! Every fallible public function in vramcal returns [`Result<T>`]; the binary adds context
//! with `anyhow` and prints one line.

use std::path::PathBuf;

/// Errors returned by the vramcal library.
///
/// Variants carry structured fields (the file, the value, the limit) so callers can act on
/// them; `Display` gives one clear line naming the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration file could not be read or parsed.
    #[error("{path}: malformed model config: {reason}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The config names an architecture vramcal does not implement.
    #[error("{path}: unsupported architecture {found:?} (supported: MistralForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM)")]
    UnknownArchitecture {
        /// The config file.
        path: PathBuf,
        /// The `architectures` entries found.
        found: Vec<String>,
    },
    /// No preset, file or cached model matches this name.
    #[error("unknown model {name:?}: not a preset ({known}), a config.json path, or a Hugging Face model id (org/name)")]
    UnknownModel {
        /// What the user asked for.
        name: String,
        /// Comma-separated preset names.
        known: String,
    },
    /// The Hugging Face Hub could not give a file of a model.
    #[error("{id} on {endpoint}: {reason}")]
    Hub {
        /// The model id.
        id: String,
        /// The endpoint (`HF_ENDPOINT`).
        endpoint: String,
        /// What went wrong and what to do.
        reason: String,
    },
    /// A size, count or option value is invalid (zero, overflowing, out of range).
    #[error("invalid {what} = {value}: {reason}")]
    InvalidValue {
        /// Which quantity.
        what: String,
        /// The value given.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// The requested sequence is longer than the model's trained context.
    #[error("--seq {seq} exceeds max_position_embeddings = {max} of the model (pass --allow-longer to measure anyway)")]
    SeqTooLong {
        /// Requested sequence length (tokens).
        seq: usize,
        /// The config's `max_position_embeddings`.
        max: usize,
    },
    /// A weights file is unreadable, truncated or inconsistent.
    #[error("{path}: bad weights: {reason}")]
    Weights {
        /// The weights file or folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A weight tensor has another shape than the config implies.
    #[error("{path}: tensor {name} has shape {found:?}, the config implies {expected:?}")]
    WeightShape {
        /// The weights file.
        path: PathBuf,
        /// HF name of the tensor.
        name: String,
        /// Shape implied by the config.
        expected: Vec<usize>,
        /// Shape found in the file.
        found: Vec<usize>,
    },
    /// A weight tensor the config needs is absent from the file.
    #[error("{path}: missing tensor {name}")]
    MissingTensor {
        /// The weights file or folder.
        path: PathBuf,
        /// HF name of the tensor.
        name: String,
    },
    /// An I/O error on a named file.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error (part of the message, so not repeated as a source).
        err: std::io::Error,
    },
    /// A results CSV could not be read or written, or has another schema.
    #[error("{path}: {reason}")]
    Csv {
        /// The CSV file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A reference row (a measured PyTorch run) names a value outside the format's vocabulary.
    #[error("row {id}: {reason}")]
    ReferenceRow {
        /// The row's `id`.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// A cell of a reference file (`../shared/cases/README.md`) outside its column's vocabulary.
    #[error("{}:{} (row {:?}): column {} = {:?}: {}", .path.display(), .cell.line, .cell.id, .cell.column, .cell.value, .cell.reason)]
    ReferenceCell {
        /// The reference file.
        path: PathBuf,
        /// Where in it, and what is wrong.
        cell: Box<Cell>,
    },
    /// The memory probe is not usable (e.g. the counting allocator is not installed).
    #[error("memory probe unavailable: {reason}")]
    Probe {
        /// Why.
        reason: String,
    },
    /// The device is not available in this build or on this machine.
    #[error("device {device}: {reason}")]
    Device {
        /// The requested device, e.g. `cuda:0`.
        device: String,
        /// Why it cannot be used and what to do.
        reason: String,
    },
    /// A tensor operation failed inside candle.
    #[error("tensor operation failed: {}", candle_msg(.0))]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

/// A candle error's message without the backtrace candle appends when `RUST_BACKTRACE` is set.
pub fn candle_msg(e: &candle_core::Error) -> String {
    e.to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `Result` with vramcal's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::InvalidValue`].
    pub fn invalid(
        what: impl Into<String>,
        value: impl ToString,
        reason: impl Into<String>,
    ) -> Self {
        Error::InvalidValue {
            what: what.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }
}

/// A cell of a reference file: where it is and why it is refused ([`Error::ReferenceCell`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    /// Line in the file (1 is the header).
    pub line: usize,
    /// The row's `id`.
    pub id: String,
    /// The column.
    pub column: String,
    /// The value found.
    pub value: String,
    /// What the column accepts, or why the value is refused.
    pub reason: String,
}
