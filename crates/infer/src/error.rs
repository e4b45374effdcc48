//! Errors of the engine, split by operation: loading a model, or generating with one.

use std::path::PathBuf;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file could not be opened or read.
    #[error("reading model file {path}")]
    Io {
        /// The model file.
        path: PathBuf,
        /// The underlying IO error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the GGUF magic bytes.
    #[error("{path} is not a GGUF file (magic bytes {found:02x?}, expected \"GGUF\")")]
    NotGguf {
        /// The model file.
        path: PathBuf,
        /// The first bytes found.
        found: Vec<u8>,
    },
    /// The file ends before the data its header describes.
    #[error("{path} is truncated: the header describes {expected} bytes but the file has {actual}")]
    Truncated {
        /// The model file.
        path: PathBuf,
        /// Bytes the header needs.
        expected: u64,
        /// Bytes in the file.
        actual: u64,
    },
    /// The header or metadata is inconsistent or out of bounds.
    #[error("malformed GGUF {path}: {reason}")]
    Malformed {
        /// The model file.
        path: PathBuf,
        /// What is wrong, in words.
        reason: String,
    },
    /// The file declares an architecture this engine has no code for.
    #[error("unsupported model architecture {architecture:?} in {path} (supported: {supported})")]
    UnsupportedArchitecture {
        /// The model file.
        path: PathBuf,
        /// `general.architecture` from the file.
        architecture: String,
        /// Comma-separated list of supported architectures.
        supported: String,
    },
    /// The tokenizer could not be built.
    #[error("building the tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be compiled.
    #[error("compiling the chat template: {0}")]
    Template(String),
    /// The requested device is not available in this build or on this machine.
    #[error("device {0}")]
    Device(String),
    /// The tensor library failed while loading weights.
    #[error("loading weights")]
    Candle(#[from] candle_core::Error),
}

/// Why a generation request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerateError {
    /// The prompt (plus requested tokens) does not fit the context window.
    #[error(
        "the prompt has {prompt_tokens} tokens but the context window holds {context_length}; shorten the conversation"
    )]
    ContextOverflow {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// The model's context length as loaded.
        context_length: usize,
    },
    /// The prompt is empty after tokenization.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The chat template failed to render these messages.
    #[error("rendering the chat template: {0}")]
    Template(String),
    /// Sampling parameters are out of range.
    #[error("invalid sampling parameters: {0}")]
    InvalidParams(String),
    /// The tokenizer failed on the input.
    #[error("tokenizing the prompt: {0}")]
    Tokenizer(String),
    /// The engine thread is gone (the model was unloaded or panicked).
    #[error("the engine for this model has stopped")]
    EngineStopped,
    /// The forward pass failed.
    #[error("running the model")]
    Candle(#[from] candle_core::Error),
    /// The generation ran on a friend's node, which refused or failed it.
    #[error("{0}")]
    Remote(String),
}
