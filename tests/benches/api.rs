//! Streaming through the HTTP API against the engine itself:
//! `cargo bench -p kith-tests --bench api` (KITH_THREADS to set threads).
//!
//! The same greedy chat request (SmolLM2, up to 128 tokens) runs 11 times directly on an
//! `EngineHandle` and 11 times as a streamed `/v1/chat/completions` on a node (its own
//! engine, same weights), alternating. Reported: median decode tok/s (tokens after the
//! first, over the time from the first token to the last, as each client sees them), time
//! to first token, the median of the per-pair ratios (robust to the machine's drift), and
//! the time from the last token to the end of the stream (the engine's `Done`; the HTTP
//! finish chunk, `[DONE]` and the body's end). A third series calls the node in-process
//! (its engine without HTTP) to tell HTTP costs from engine differences.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kith_infer::{EngineHandle, GenerateRequest, LoadOptions, LoadedModel, Prompt, StreamEvent};
use kith_node::api::{self, ApiConfig};
use kith_node::{ApiToken, NodeBuilder};
use kith_types::{ChatMessage, SamplingParams};

const QUESTION: &str = "Write a detailed story about a lighthouse keeper and a storm.";
const MAX_TOKENS: usize = 128;
const RUNS: usize = 11;

struct Run {
    first_token: Duration,
    tokens: usize,
    /// From the first token to the last one.
    decode: Duration,
    /// From the last token to the end of the stream (`Done`, or the body's end).
    tail: Duration,
}

impl Run {
    fn rate(&self) -> f64 {
        (self.tokens.saturating_sub(1)) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

fn load() -> LoadedModel {
    let catalog = kith_models::Catalog::builtin().expect("catalog");
    let store = kith_models::Store::from_env().expect("store");
    let path = store.installed_path(catalog.get("smollm2-135m").expect("entry")).expect("smollm2-135m is pulled");
    LoadedModel::load(&path, &LoadOptions::default()).expect("loads")
}

fn request() -> GenerateRequest {
    let mut params = SamplingParams::greedy();
    params.max_tokens = MAX_TOKENS;
    // The prompt prefix is cached after the warm-up, on both sides alike.
    GenerateRequest::new(Prompt::Chat(vec![ChatMessage::user(QUESTION)]), params)
}

async fn direct(engine: &EngineHandle) -> Run {
    let started = Instant::now();
    let stream = engine.generate(request()).await.expect("generate");
    collect(started, stream).await
}

async fn through_node(node: &kith_node::Node) -> Run {
    let started = Instant::now();
    let generation = node.generate("smollm2-135m", request(), kith_types::Privacy::LocalOnly).await.expect("generate");
    collect(started, generation.stream).await
}

async fn collect(started: Instant, mut stream: kith_infer::TokenStream) -> Run {
    let mut first = None;
    let mut last = Duration::ZERO;
    let mut tokens = 0;
    while let Some(event) = stream.next().await {
        match event.expect("event") {
            StreamEvent::Token(_) => {
                tokens += 1;
                last = started.elapsed();
                first.get_or_insert(last);
            }
            StreamEvent::Done(_) => break,
            _ => {}
        }
    }
    let first_token = first.expect("a token");
    Run { first_token, tokens, decode: last - first_token, tail: started.elapsed() - last }
}

async fn over_http(client: &reqwest::Client, url: &str, token: &str) -> Run {
    let body = serde_json::json!({
        "messages": [{ "role": "user", "content": QUESTION }],
        "temperature": 0, "max_tokens": MAX_TOKENS, "stream": true,
    });
    let started = Instant::now();
    let response = client.post(url).bearer_auth(token).json(&body).send().await.expect("send");
    let mut bytes = response.bytes_stream();
    let mut first = None;
    let mut last = Duration::ZERO;
    let mut tokens = 0;
    let mut pending = String::new();
    while let Some(chunk) = bytes.next().await {
        pending.push_str(&String::from_utf8_lossy(&chunk.expect("bytes")));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            // One SSE event per token that shows text (a token that completes no
            // character shows none, as in the direct count below it still counts there).
            if event.contains("\"content\":\"") && !event.contains("\"role\"") {
                tokens += 1;
                last = started.elapsed();
                first.get_or_insert(last);
            }
        }
    }
    let first_token = first.expect("a token");
    Run { first_token, tokens, decode: last - first_token, tail: started.elapsed() - last }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = ApiToken::load_or_create(dir.path()).expect("token");
        let node = NodeBuilder::new().model("smollm2-135m", load()).build().expect("node");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/v1/chat/completions", listener.local_addr().expect("address"));
        let router = api::router(node.clone(), token.clone(), ApiConfig::default());
        let stopping = node.clone();
        let server = tokio::spawn(api::serve(listener, router, async move { stopping.stopping().await }));
        let engine = EngineHandle::spawn(load()).expect("engine");
        let client = reqwest::Client::new();

        // Warm-up: weights paged in, caches sized.
        direct(&engine).await;
        over_http(&client, &url, token.as_str()).await;
        let (mut engine_runs, mut http_runs, mut node_runs) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..RUNS {
            engine_runs.push(direct(&engine).await);
            http_runs.push(over_http(&client, &url, token.as_str()).await);
            node_runs.push(through_node(&node).await);
        }
        println!(
            "decode through Node::generate in-process (same engine as HTTP, no HTTP): {:.1} tok/s",
            median(node_runs.iter().map(Run::rate).collect())
        );
        let rate = |runs: &[Run]| median(runs.iter().map(Run::rate).collect());
        let ttft = |runs: &[Run]| median(runs.iter().map(|r| r.first_token.as_secs_f64() * 1e3).collect());
        println!(
            "tokens per answer: engine {}, HTTP stream {} (text-bearing events)",
            engine_runs[0].tokens, http_runs[0].tokens
        );
        println!(
            "decode: engine {:.1} tok/s, HTTP stream {:.1} tok/s (ratio {:.3})",
            rate(&engine_runs),
            rate(&http_runs),
            rate(&http_runs) / rate(&engine_runs)
        );
        let ratios: Vec<f64> = engine_runs.iter().zip(&http_runs).map(|(e, h)| h.rate() / e.rate()).collect();
        println!("median per-pair ratio HTTP ÷ engine: {:.3}", median(ratios));
        let tail = |runs: &[Run]| median(runs.iter().map(|r| r.tail.as_secs_f64() * 1e3).collect());
        println!(
            "after the last token: engine Done in {:.2} ms, HTTP body ends in {:.2} ms",
            tail(&engine_runs),
            tail(&http_runs)
        );
        println!(
            "time to first token: engine {:.2} ms, HTTP stream {:.2} ms (added {:.2} ms)",
            ttft(&engine_runs),
            ttft(&http_runs),
            ttft(&http_runs) - ttft(&engine_runs)
        );
        engine.shutdown().await;
        node.shutdown().await;
        let _ = server.await;
    });
}
