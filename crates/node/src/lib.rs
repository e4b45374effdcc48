//! The Kith node: the one service that owns the loaded models, the unlocked vault and
//! the mesh, and the local HTTP API in front of it.
//!
//! - [`NodeBuilder`] takes loaded models and the embedding model, starts one engine
//!   thread per model and returns a [`Node`], a cheap handle shared by every caller.
//!   Each model has a bounded queue: a request that finds it full is refused at once
//!   ([`NodeError::Busy`]) instead of waiting unboundedly. [`Node::shutdown`] stops it
//!   in order: new requests are refused, streams in flight end, engines stop.
//! - Every generation gets a [`Route`] (this machine, or a friend's node over the mesh)
//!   that is reported with the answer, with where each part ran after a failover
//!   ([`RanOnParts`]), so "where did this run" is always known.
//! - [`api::router`] is the HTTP API: an OpenAI-compatible `/v1` (models, chat
//!   completions with SSE streaming, embeddings). It is bound to loopback by the caller,
//!   and checks a bearer token ([`ApiToken`]), the `Host` header (DNS rebinding) and
//!   body sizes before any handler runs.
//!
//! Prompts and outputs are never logged: logs carry ids, counts and timings.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod api;
mod discovery;
mod extract;
mod memory;
mod models;
mod native;
mod node;
mod offload;
mod openai;
mod peers;
mod token;
mod turn;

pub use discovery::{NodeFile, Published};
pub use extract::extract_candidates;
pub use memory::{Review, SavedMemory};
pub use models::{ModelListing, PullUpdate};
pub use native::NativeApi;
pub use node::{
    DEFAULT_QUEUE_PER_MODEL, FASTER, Generation, ModelStatus, Node, NodeBuilder, NodeError, NodeStatus, Offload, Route,
};
pub use offload::RanOnParts;
pub use token::ApiToken;
pub use turn::{ChatTurn, MEMORY_CLOSE, MEMORY_OPEN, Recalled, Turn, remember_request};
