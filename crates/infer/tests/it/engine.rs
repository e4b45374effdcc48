//! The engine thread: streaming, cancellation, stop strings, context limits, prefix reuse.

use kith_infer::{
    Completion, EngineHandle, GenerateError, GenerateRequest, LoadOptions, LoadedModel, Prompt, StopReason, StreamEvent,
};
use kith_types::{ChatMessage, SamplingParams};

use crate::support::{load, model_lock};
use crate::tiny::Tiny;

struct Output {
    ids: Vec<u32>,
    text: String,
    done: Completion,
}

async fn collect(engine: &EngineHandle, request: GenerateRequest) -> Result<Output, GenerateError> {
    let mut stream = engine.generate(request).await?;
    let mut ids = Vec::new();
    let mut text = String::new();
    while let Some(event) = stream.next().await {
        let event = event?;
        text.push_str(event.text());
        match event {
            StreamEvent::Token(token) => ids.push(token.id),
            StreamEvent::Done(done) => return Ok(Output { ids, text, done }),
            _ => {}
        }
    }
    panic!("stream ended without Done");
}

fn tiny_engine(dir: &tempfile::TempDir) -> EngineHandle {
    let path = dir.path().join("tiny.gguf");
    Tiny::new("llama").write(&path);
    EngineHandle::spawn(LoadedModel::load(&path, &LoadOptions::default()).expect("loads")).expect("engine")
}

fn greedy(max_tokens: usize) -> SamplingParams {
    let mut params = SamplingParams::greedy();
    params.max_tokens = max_tokens;
    params
}

fn tokens(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    let mut request = GenerateRequest::new(Prompt::Tokens(prompt), greedy(max_tokens));
    request.ignore_eog = true;
    request
}

#[tokio::test]
async fn dropping_the_stream_stops_generation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prompt: Vec<u32> = (10..20).collect();
    // What 200 greedy tokens look like, from an engine of its own.
    let reference = tiny_engine(&dir);
    let full = collect(&reference, tokens(prompt.clone(), 200)).await.expect("full run");
    assert_eq!(full.ids.len(), 200);
    reference.shutdown().await;

    let engine = tiny_engine(&dir);
    let mut stream = engine.generate(tokens(prompt.clone(), 200)).await.expect("queued");
    let first = stream.next().await.expect("an event").expect("ok");
    assert!(matches!(first, StreamEvent::Token(_)));
    drop(stream);
    // Had the dropped generation gone on, the cache would now hold the prompt and its
    // 200 tokens, and this probe would find 160 of them cached. Before the drop the
    // engine may run ahead by at most the stream's buffer (64 events).
    let mut probe = prompt.clone();
    probe.extend_from_slice(&full.ids[..150]);
    let after = collect(&engine, tokens(probe, 1)).await.expect("probe");
    assert!(
        after.done.usage.cached_tokens <= prompt.len() + 66,
        "cache holds {} tokens: the dropped generation kept running",
        after.done.usage.cached_tokens
    );
    engine.shutdown().await;
}

#[tokio::test]
async fn prompt_longer_than_the_context_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = tiny_engine(&dir);
    let prompt: Vec<u32> = (0..300).map(|i| 10 + i % 200).collect();
    match collect(&engine, tokens(prompt, 4)).await {
        Err(GenerateError::ContextOverflow { prompt_tokens: 300, context_length: 256 }) => {}
        other => panic!("expected ContextOverflow, got {:?}", other.err()),
    }
    // The engine is still usable afterwards.
    let ok = collect(&engine, tokens(vec![10, 11, 12], 2)).await.expect("still works");
    assert_eq!(ok.ids.len(), 2);
    engine.shutdown().await;
}

#[tokio::test]
async fn generation_stops_when_the_context_is_full() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = tiny_engine(&dir);
    let prompt: Vec<u32> = (0..250).map(|i| 10 + i % 200).collect();
    let out = collect(&engine, tokens(prompt, 100)).await.expect("runs");
    assert_eq!(out.done.stop_reason, StopReason::ContextFull);
    assert!(out.ids.len() < 10, "{} tokens generated past a 256-token context", out.ids.len());
    engine.shutdown().await;
}

#[tokio::test]
async fn out_of_vocabulary_ids_and_empty_prompts_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = tiny_engine(&dir);
    assert!(matches!(collect(&engine, tokens(vec![1, 999_999], 2)).await, Err(GenerateError::InvalidParams(_))));
    assert!(matches!(collect(&engine, tokens(vec![], 2)).await, Err(GenerateError::EmptyPrompt)));
    let mut bad = greedy(4);
    bad.temperature = f32::NAN;
    assert!(matches!(
        engine.generate(GenerateRequest::new(Prompt::Tokens(vec![1]), bad)).await,
        Err(GenerateError::InvalidParams(_))
    ));
    engine.shutdown().await;
}

#[tokio::test]
async fn stop_string_ends_generation_without_being_emitted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = tiny_engine(&dir);
    let prompt: Vec<u32> = (10..20).collect();
    let full = collect(&engine, tokens(prompt.clone(), 40)).await.expect("runs");
    // Pick a stop string from the middle of the greedy output.
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() > 12, "tiny model produced too little text: {:?}", full.text);
    let stop: String = chars[8..11].iter().collect();
    let mut request = tokens(prompt, 40);
    request.params.stop = vec![stop.clone()];
    let out = collect(&engine, request).await.expect("runs");
    assert_eq!(out.done.stop_reason, StopReason::StopString);
    let expected_prefix = &full.text[..full.text.find(&stop).expect("stop occurs")];
    assert_eq!(out.text, expected_prefix);
    engine.shutdown().await;
}

/// On the real default model: a second chat turn reuses the first turn's cache, and the
/// streamed text equals the decoded tokens.
// The lock only makes model tests take turns across test threads; this test's runtime is
// single-threaded, so holding it across awaits cannot deadlock.
#[allow(clippy::await_holding_lock)]
#[tokio::test]
async fn multi_turn_chat_reuses_the_kv_cache() {
    let engine = {
        let _turn = model_lock();
        EngineHandle::spawn(load("smollm2-135m", None)).expect("engine")
    };
    let _turn = model_lock();
    let mut history = vec![ChatMessage::user("Name a colour.")];
    let first =
        collect(&engine, GenerateRequest::new(Prompt::Chat(history.clone()), greedy(16))).await.expect("turn 1");
    assert_eq!(first.done.usage.cached_tokens, 0);
    let visible: Vec<u32> = first.ids.iter().copied().filter(|&id| !engine.tokenizer().is_eog(id)).collect();
    assert_eq!(first.text, engine.tokenizer().decode(&visible), "streamed deltas add up to the decoded tokens");
    history.push(ChatMessage::assistant(first.text.clone()));
    history.push(ChatMessage::user("And another one?"));
    let second =
        collect(&engine, GenerateRequest::new(Prompt::Chat(history.clone()), greedy(16))).await.expect("turn 2");
    assert!(
        second.done.usage.cached_tokens >= first.done.usage.prompt_tokens,
        "turn 2 reused {} tokens; turn 1's prompt alone had {}",
        second.done.usage.cached_tokens,
        first.done.usage.prompt_tokens
    );
    // With `cache_prompt` off the same prompt is recomputed from scratch, to the same tokens.
    let mut fresh = GenerateRequest::new(Prompt::Chat(history), greedy(16));
    fresh.cache_prompt = false;
    let again = collect(&engine, fresh).await.expect("turn 2 again");
    assert_eq!(again.done.usage.cached_tokens, 0);
    assert_eq!(again.ids, second.ids);
    engine.shutdown().await;
}

#[tokio::test]
async fn a_generation_continues_from_tokens_made_elsewhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prompt: Vec<u32> = (10..20).collect();
    let engine = tiny_engine(&dir);
    let full = collect(&engine, tokens(prompt.clone(), 40)).await.expect("full run");
    // A fresh engine (nothing cached) picks up after 15 of those tokens.
    let other = tiny_engine(&dir);
    let mut request = tokens(prompt, 40);
    request.continue_from = full.ids[..15].to_vec();
    let rest = collect(&other, request).await.expect("continued");
    assert_eq!(rest.ids, full.ids[15..], "the continuation is the same greedy tail");
    assert_eq!(rest.done.usage.completion_tokens, 25, "max_tokens counts the tokens continued from");
    assert_eq!(rest.done.usage.prompt_tokens, 10);
    let mut bad = tokens(vec![1, 2], 4);
    bad.continue_from = vec![u32::MAX];
    assert!(matches!(collect(&other, bad).await, Err(GenerateError::InvalidParams(_))));
    engine.shutdown().await;
    other.shutdown().await;
}

#[tokio::test]
async fn the_owners_request_runs_between_tokens_of_a_background_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prompt: Vec<u32> = (10..20).collect();
    let engine = tiny_engine(&dir);
    let alone = collect(&engine, tokens(prompt.clone(), 200)).await.expect("reference");
    assert_eq!(alone.ids.len(), 200);
    let owner_alone = collect(&engine, tokens(vec![30, 31, 32], 5)).await.expect("owner reference");

    let mut background = tokens(prompt, 200);
    background.background = true;
    let mut friend = engine.generate(background).await.expect("queued");
    let mut ids = Vec::new();
    let mut owner = None;
    let mut done_at = None;
    while let Some(event) = friend.next().await {
        match event.expect("ok") {
            StreamEvent::Token(t) => {
                ids.push(t.id);
                if ids.len() == 1 {
                    // The friend's generation is running: the owner asks now.
                    let engine = engine.clone();
                    owner = Some(tokio::spawn(async move {
                        let out = collect(&engine, tokens(vec![30, 31, 32], 5)).await.expect("owner");
                        (out, std::time::Instant::now())
                    }));
                }
            }
            StreamEvent::Done(d) => {
                assert_eq!(d.usage.completion_tokens, 200);
                done_at = Some(std::time::Instant::now());
            }
            _ => {}
        }
    }
    let (owner, owner_at) = owner.expect("asked").await.expect("owner task");
    assert_eq!(owner.ids, owner_alone.ids, "the owner's answer is as if alone");
    assert_eq!(ids, alone.ids, "the background answer resumed exactly");
    assert!(owner_at < done_at.expect("done"), "the owner did not wait for the background answer to end");
    // It waited at most a token or two, not the rest of the background answer.
    assert!(
        owner.done.timings.queued * 4 < alone.done.timings.decode,
        "owner queued {:?}; the background answer takes {:?}",
        owner.done.timings.queued,
        alone.done.timings.decode
    );
    engine.shutdown().await;
}

/// On the real default model: the owner's request arriving during a friend's long
/// prefill runs between two layers of it, not after it, and neither answer changes.
#[allow(clippy::await_holding_lock)]
#[tokio::test]
async fn the_owners_request_steps_in_during_a_background_prefill() {
    let _turn = model_lock();
    let engine = EngineHandle::spawn(load("smollm2-135m", None)).expect("engine");
    let long: Vec<u32> = (100..1600).collect();
    let background = |prompt: Vec<u32>| {
        let mut request = tokens(prompt, 4);
        request.cache_prompt = false;
        request.background = true;
        request
    };
    let owner_request = || {
        let mut request = tokens(vec![1, 504, 3458, 282], 3);
        request.cache_prompt = false;
        request
    };
    let alone = collect(&engine, background(long.clone())).await.expect("reference");
    let prefill = alone.done.timings.prefill;
    let owner_alone = collect(&engine, owner_request()).await.expect("owner reference");

    let friend = {
        let engine = engine.clone();
        let request = background(long);
        tokio::spawn(async move {
            let out = collect(&engine, request).await.expect("friend");
            (out, std::time::Instant::now())
        })
    };
    // Well inside the friend's prefill.
    let wait = prefill / 4;
    tokio::task::spawn_blocking(move || std::thread::sleep(wait)).await.expect("slept");
    let owner = collect(&engine, owner_request()).await.expect("owner");
    let owner_at = std::time::Instant::now();
    let (friend, friend_at) = friend.await.expect("friend task");

    assert_eq!(owner.ids, owner_alone.ids, "the owner's answer is as if alone");
    assert_eq!(friend.ids, alone.ids, "the friend's answer resumed exactly");
    assert!(owner_at < friend_at, "the owner finished first");
    assert!(
        owner.done.timings.queued * 4 < prefill,
        "owner queued {:?} behind a prefill of {prefill:?}",
        owner.done.timings.queued
    );
    engine.shutdown().await;
}
