//! Integration tests of the engine: real weights against llama.cpp's outputs, and small
//! GGUF files the tests write themselves.

mod archs;
mod embed;
mod engine;
mod fixtures;
mod hostile;
mod support;
mod tiny;
