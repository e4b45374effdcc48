//! End to end: a real node with the real SmolLM2 and MiniLM on 127.0.0.1, driven over
//! HTTP as any OpenAI client would.

mod api;
mod memory;
mod mesh;
mod models;
mod review;
mod support;
