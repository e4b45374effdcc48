//! Every architecture Kith claims loads and runs, on tiny GGUF files written here.

use kith_infer::{EngineHandle, GenerateRequest, LoadOptions, LoadedModel, Prompt, StreamEvent};
use kith_types::SamplingParams;

use crate::tiny::Tiny;

/// Greedy ids for `prompt` on a fresh engine, through the same path the CLI uses.
pub(crate) fn greedy(model: LoadedModel, prompts: &[Vec<u32>], n_tokens: usize) -> Vec<Vec<u32>> {
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let engine = EngineHandle::spawn(model).expect("engine");
    let outputs = runtime.block_on(async {
        let mut outputs = Vec::new();
        for prompt in prompts {
            let mut params = SamplingParams::greedy();
            params.max_tokens = n_tokens;
            let mut request = GenerateRequest::new(Prompt::Tokens(prompt.clone()), params);
            request.ignore_eog = true;
            let mut stream = engine.generate(request).await.expect("queued");
            let mut ids = Vec::new();
            while let Some(event) = stream.next().await {
                if let StreamEvent::Token(token) = event.expect("generates") {
                    ids.push(token.id);
                }
            }
            outputs.push(ids);
        }
        outputs
    });
    runtime.block_on(engine.shutdown());
    outputs
}

fn check_architecture(arch: &'static str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(format!("tiny-{arch}.gguf"));
    Tiny::new(arch).write(&path);
    let model = LoadedModel::load(&path, &LoadOptions::default()).expect("tiny model loads");
    assert_eq!(model.info().architecture, arch);
    assert_eq!(model.info().context_length, 256, "context comes from metadata");
    let prompt: Vec<u32> = (10..40).collect();
    let runs = greedy(model, &[prompt.clone(), prompt], 12);
    assert_eq!(runs[0].len(), 12, "{arch}: generated every token");
    assert_eq!(runs[0], runs[1], "{arch}: greedy decoding is deterministic (second run reuses the cache)");
    // Random weights still give an input-dependent output: the model is really computing.
    let model = LoadedModel::load(&path, &LoadOptions::default()).expect("loads again");
    let other: Vec<u32> = (100..130).collect();
    let other_run = greedy(model, &[other], 12);
    assert_ne!(runs[0], other_run[0], "{arch}: output depends on the prompt");
}

#[test]
fn llama_loads_and_runs() {
    check_architecture("llama");
}

#[test]
fn qwen2_loads_and_runs() {
    check_architecture("qwen2");
}

#[test]
fn qwen3_loads_and_runs() {
    check_architecture("qwen3");
}

#[test]
fn phi3_loads_and_runs() {
    check_architecture("phi3");
}

#[test]
fn gemma3_loads_and_runs() {
    check_architecture("gemma3");
}

/// Continuing from a cached prefix gives the same tokens as a fresh engine that computes
/// everything, across the sliding window. (The tiny files' f32 weights and short batches
/// use kernels whose arithmetic does not depend on the batch; with K-quants or 64+-row
/// batches the last bits may move, as in llama.cpp.)
#[test]
fn prefix_cache_gives_the_same_tokens_as_a_fresh_run() {
    for arch in ["llama", "gemma3"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tiny.gguf");
        Tiny::new(arch).write(&path);
        let load = || LoadedModel::load(&path, &LoadOptions::default()).expect("loads");
        let first: Vec<u32> = (10..30).collect();
        let mut second = first.clone();
        second.extend(50..70);
        // Engine A sees `first`, then `second` (which starts with `first`): a cache hit.
        let cached = greedy(load(), &[first, second.clone()], 16);
        // Engine B sees only `second`.
        let fresh = greedy(load(), &[second], 16);
        assert_eq!(cached[1], fresh[0], "{arch}: cached continuation differs from a fresh run");
    }
}

/// The SentencePiece path (phi3's vocabulary) tokenizes and decodes.
#[test]
fn sentencepiece_vocabulary_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tiny.gguf");
    Tiny::new("phi3").write(&path);
    let file = kith_infer::ModelFile::open(&path, &LoadOptions::default()).expect("opens");
    let tokenizer = file.tokenizer();
    let ids = tokenizer.encode("hello world", true, true).expect("encodes");
    assert_eq!(ids[0], tokenizer.bos_id().expect("bos"), "llama vocabularies add BOS");
    assert_eq!(tokenizer.decode(&ids[1..]), " hello world", "space prefix, byte fallback for unknown pieces");
}
