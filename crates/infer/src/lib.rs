//! Kith's inference engine: quantized GGUF models on candle.
//!
//! [`ModelFile::open`] parses and checks a GGUF header and builds the model's
//! [`Tokenizer`] and [`ChatTemplate`]; [`ModelFile::load`] reads the weights into a
//! [`LoadedModel`]; [`EngineHandle::spawn`] gives the model its own thread and returns
//! the handle that async code uses to [`generate`](EngineHandle::generate) a
//! [`TokenStream`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use kith_infer::{EngineHandle, GenerateRequest, LoadOptions, LoadedModel, Prompt, StreamEvent};
//! use kith_types::{ChatMessage, SamplingParams};
//!
//! let model = LoadedModel::load("model.gguf".as_ref(), &LoadOptions::default())?;
//! let engine = EngineHandle::spawn(model)?;
//! let request = GenerateRequest::new(Prompt::Chat(vec![ChatMessage::user("Hi!")]), SamplingParams::greedy());
//! let mut stream = engine.generate(request).await?;
//! while let Some(event) = stream.next().await {
//!     let event = event?;
//!     print!("{}", event.text());
//!     if let StreamEvent::Done(done) = event {
//!         eprintln!("\n{:?}", done.stop_reason);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! This crate never opens a socket and never logs prompt or output text.
#![deny(missing_docs, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod attention;
mod embed;
mod engine;
mod error;
mod gguf;
#[doc(hidden)]
pub mod kernels;
mod loader;
mod model;
mod numerics;
mod quant;
mod sampler;
mod spm;
mod template;
mod text;
mod tokenizer;
mod weights;

pub use embed::{EmbedError, Embedder, MAX_EMBED_TOKENS};
pub use engine::{
    Completion, EngineHandle, GenerateRequest, Prompt, StopReason, StreamEvent, Timings, TokenEvent, TokenStream, Usage,
};
pub use error::{GenerateError, LoadError};
pub use loader::{DEFAULT_CONTEXT_CAP, DeviceKind, LoadOptions, LoadedModel, ModelFile, ModelInfo};
pub use model::SUPPORTED_ARCHITECTURES;
pub use sampler::Sampler;
pub use template::{ChatTemplate, TemplateSource};
pub use tokenizer::Tokenizer;

/// Threads candle uses for the forward pass (set `--threads` / `RAYON_NUM_THREADS` before the first model loads).
pub fn thread_count() -> usize {
    candle_core::utils::get_num_threads()
}
