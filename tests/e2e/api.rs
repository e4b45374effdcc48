//! The OpenAI-compatible API over real HTTP.

use std::time::Duration;

use futures_util::StreamExt;
use kith_infer::{EngineHandle, GenerateRequest, Prompt, StreamEvent};
use kith_node::api::ApiConfig;
use kith_types::{ChatMessage, SamplingParams};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Sse, TestNode, load_smollm};

/// The engine's own greedy answer, straight from an `EngineHandle`.
async fn direct(engine: &EngineHandle, question: &str, max_tokens: usize) -> (String, usize) {
    let mut params = SamplingParams::greedy();
    params.max_tokens = max_tokens;
    let request = GenerateRequest::new(Prompt::Chat(vec![ChatMessage::user(question)]), params);
    let mut stream = engine.generate(request).await.expect("generate");
    let mut text = String::new();
    while let Some(event) = stream.next().await {
        let event = event.expect("event");
        text.push_str(event.text());
        if let StreamEvent::Done(done) = event {
            return (text, done.usage.completion_tokens);
        }
    }
    panic!("stream ended without Done");
}

fn chat_body(question: &str, max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": "smollm2-135m",
        "messages": [{ "role": "user", "content": question }],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": { "include_usage": true },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_equal_the_engine_and_stream_correctly() {
    let node = TestNode::start(4, ApiConfig::default()).await;
    let engine = EngineHandle::spawn(load_smollm()).expect("engine");
    let question = "Name three colours of the rainbow.";

    // Fresh caches on both sides: the same arithmetic, the same tokens.
    let (expected, expected_tokens) = direct(&engine, question, 24).await;
    let response = node.post("/v1/chat/completions").json(&chat_body(question, 24, false)).send().await.expect("send");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-kith-ran-on"], "local");
    let answer: Value = response.json().await.expect("JSON");
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
    assert_eq!(answer["choices"][0]["message"]["content"], expected.as_str());
    assert_eq!(answer["usage"]["completion_tokens"], expected_tokens);
    assert_eq!(
        answer["usage"]["total_tokens"].as_u64(),
        Some(answer["usage"]["prompt_tokens"].as_u64().expect("prompt tokens") + expected_tokens as u64)
    );
    assert_eq!(answer["kith"]["ran_on"], "local");

    // Second round: both reuse the cached prompt prefix the same way.
    let (expected, expected_tokens) = direct(&engine, question, 24).await;
    let response = node.post("/v1/chat/completions").json(&chat_body(question, 24, true)).send().await.expect("send");
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().expect("type").starts_with("text/event-stream"));
    let sse = Sse::parse(&response.text().await.expect("body"));
    assert!(sse.done, "ends with [DONE]");
    assert_eq!(sse.chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(sse.chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let ids: std::collections::HashSet<&str> = sse.chunks.iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(ids.len(), 1, "one id for the whole stream");
    assert_eq!(sse.text(), expected);
    assert!(sse.finish_reason().is_some());
    let usage = &sse.chunks.last().expect("usage chunk")["usage"];
    assert_eq!(usage["completion_tokens"], expected_tokens);
    assert!(usage["prompt_tokens_details"]["cached_tokens"].as_u64() > Some(0), "{usage}");

    engine.shutdown().await;
    node.stop().await;
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn floats(value: &Value) -> Vec<f64> {
    value.as_array().expect("array").iter().map(|v| v.as_f64().expect("number")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_put_similar_sentences_closer() {
    let node = TestNode::start(4, ApiConfig::default()).await;
    let input = ["My cat is called Miso.", "What is the name of my cat?", "The train leaves at seven."];
    let response = node.post("/v1/embeddings").json(&json!({ "model": "minilm-l6", "input": input })).send().await;
    let body: Value = response.expect("send").json().await.expect("JSON");
    let vectors: Vec<Vec<f64>> =
        body["data"].as_array().expect("data").iter().map(|d| floats(&d["embedding"])).collect();
    assert_eq!(vectors.len(), 3);
    assert_eq!(vectors[0].len(), 384);
    assert!(cosine(&vectors[0], &vectors[1]) > cosine(&vectors[0], &vectors[2]) + 0.2, "{body}");
    assert!(body["usage"]["prompt_tokens"].as_u64() > Some(10));

    // base64 (what OpenAI's SDKs ask for by default) carries the same floats.
    let response = node
        .post("/v1/embeddings")
        .json(&json!({ "input": input[0], "encoding_format": "base64" }))
        .send()
        .await
        .expect("send");
    let body: Value = response.json().await.expect("JSON");
    let encoded = body["data"][0]["embedding"].as_str().expect("base64 string");
    let decoded = decode_base64(encoded);
    let from_base64: Vec<f64> =
        decoded.chunks_exact(4).map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))).collect();
    assert_eq!(from_base64.len(), 384);
    let worst = from_base64.iter().zip(&vectors[0]).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-6, "{worst}");
    node.stop().await;
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    for quad in text.as_bytes().chunks(4) {
        let digits: Vec<u8> = quad.iter().filter(|&&c| c != b'=').map(|&c| value(c)).collect();
        let n = digits.iter().fold(0u32, |acc, &d| (acc << 6) | u32::from(d)) << (6 * (4 - digits.len()));
        out.extend_from_slice(&n.to_be_bytes()[1..digits.len()]);
    }
    out
}

/// A raw HTTP/1.1 request, so that the Host header is exactly what we write.
async fn raw(address: std::net::SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
}

fn error_of(body: &Value) -> (&str, Option<&str>) {
    (body["error"]["type"].as_str().expect("OpenAI error shape"), body["error"]["param"].as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_checked_before_it_runs() {
    let config = ApiConfig { max_body_bytes: 4096, max_tokens: 64, ..ApiConfig::default() };
    let node = TestNode::start(4, config).await;
    let body = chat_body("Hi", 8, false);

    let none = node.client.post(node.url("/v1/chat/completions")).json(&body).send().await.expect("send");
    assert_eq!(none.status(), 401);
    assert_eq!(none.headers()["www-authenticate"], "Bearer");
    assert_eq!(error_of(&none.json().await.expect("JSON")).0, "invalid_request_error");
    let wrong = node.client.get(node.url("/v1/models")).bearer_auth("kith_0000").send().await.expect("send");
    assert_eq!(wrong.status(), 401);

    let token = &node.token;
    let rebound = raw(
        node.address,
        &format!("GET /v1/models HTTP/1.1\r\nHost: evil.example:7878\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(rebound.starts_with("HTTP/1.1 403"), "{rebound}");
    let loopback = raw(
        node.address,
        &format!(
            "GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(loopback.starts_with("HTTP/1.1 200"), "{loopback}");

    let huge = json!({ "messages": [{ "role": "user", "content": "x".repeat(5000) }] });
    let too_large = node.post("/v1/chat/completions").json(&huge).send().await.expect("send");
    assert_eq!(too_large.status(), 413);
    assert_eq!(error_of(&too_large.json().await.expect("JSON")).0, "invalid_request_error");

    let greedy = node.post("/v1/chat/completions").json(&chat_body("Hi", 65, false)).send().await.expect("send");
    assert_eq!(greedy.status(), 400);
    assert_eq!(error_of(&greedy.json().await.expect("JSON")), ("invalid_request_error", Some("max_tokens")));

    let mut unknown = chat_body("Hi", 8, false);
    unknown["model"] = json!("gpt-17");
    let unknown = node.post("/v1/chat/completions").json(&unknown).send().await.expect("send");
    assert_eq!(unknown.status(), 404);
    let unknown: Value = unknown.json().await.expect("JSON");
    assert_eq!(unknown["error"]["code"], "model_not_found");

    let garbled = node.post("/v1/chat/completions").body("{not json").send().await.expect("send");
    assert_eq!(garbled.status(), 400);

    let origin = node.client.get(node.url("/v1/models")).bearer_auth(token).header("Origin", "https://evil.example");
    assert_eq!(origin.send().await.expect("send").status(), 403);
    let preflight = node
        .client
        .request(reqwest::Method::OPTIONS, node.url("/v1/chat/completions"))
        .header("Origin", "tauri://localhost")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .expect("send");
    assert_eq!(preflight.status(), 204);
    assert_eq!(preflight.headers()["access-control-allow-origin"], "tauri://localhost");

    let models: Value = node
        .client
        .get(node.url("/v1/models"))
        .bearer_auth(token)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("JSON");
    let names: Vec<&str> = models["data"].as_array().expect("data").iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(names, ["smollm2-135m", "minilm-l6"]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_concurrent_streams_are_served_or_refused_cleanly() {
    let node = TestNode::start(8, ApiConfig::default()).await;
    let clients = (0..30).map(|i| {
        let request = node.post("/v1/chat/completions").json(&chat_body(&format!("Count to {i}."), 8, true));
        async move {
            let response = request.send().await.expect("send");
            let status = response.status().as_u16();
            let body = response.text().await.expect("body");
            (status, body)
        }
    });
    let results = tokio::time::timeout(Duration::from_secs(600), futures_util::future::join_all(clients))
        .await
        .expect("no deadlock: every client gets an answer");
    let mut served = 0;
    for (status, body) in &results {
        match status {
            200 => {
                let sse = Sse::parse(body);
                assert!(sse.done && sse.finish_reason().is_some(), "complete stream: {body}");
                served += 1;
            }
            429 => {
                let error: Value = serde_json::from_str(body).expect("JSON error");
                assert_eq!(error["error"]["type"], "rate_limit_error");
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!(served >= 8, "at least a full queue is served ({served} of 30)");
    assert_eq!(node.node.status().models[0].queued, 0, "every place in the queue is given back");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_stream_ends_it_cleanly() {
    let node = TestNode::start(4, ApiConfig::default()).await;
    let response = node
        .post("/v1/chat/completions")
        .json(&chat_body("Tell me a very long story about a lighthouse.", 400, true))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut text = String::new();
    // Read until some content has arrived, then shut down.
    while !text.contains("\"content\":\"") || text.matches("data: ").count() < 3 {
        let bytes = body.next().await.expect("more events").expect("bytes");
        text.push_str(&String::from_utf8_lossy(&bytes));
    }
    let stopping = node.node.clone();
    let shutdown = tokio::spawn(async move { stopping.shutdown().await });
    while let Some(bytes) = tokio::time::timeout(Duration::from_secs(60), body.next()).await.expect("stream ends") {
        text.push_str(&String::from_utf8_lossy(&bytes.expect("bytes")));
    }
    let sse = Sse::parse(&text);
    assert!(sse.done, "[DONE] after an interruption");
    assert_eq!(sse.finish_reason().as_deref(), Some("interrupted"));
    tokio::time::timeout(Duration::from_secs(60), shutdown).await.expect("shutdown finishes").expect("task");
    let refused = node.post("/v1/chat/completions").json(&chat_body("Hi", 4, false)).send().await;
    assert!(refused.is_err() || refused.is_ok_and(|r| r.status() == 503), "nothing served after shutdown");
    node.server.await.expect("server task").expect("server ran");
}

/// Runs one of the official SDK scripts against a live node; returns its JSON report.
async fn run_sdk(program: &str, script: &str, dir: Option<&std::path::Path>) -> Value {
    let node = TestNode::start(4, ApiConfig::default()).await;
    let mut script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/sdk").join(script);
    if let Some(dir) = dir {
        // ES modules resolve packages from the script's own folder.
        let copy = dir.join(script.file_name().expect("file name"));
        std::fs::copy(&script, &copy).expect("copy the script next to node_modules");
        script = copy;
    }
    let mut command = tokio::process::Command::new(program);
    command
        .arg(&script)
        .env("KITH_BASE_URL", node.url("/v1"))
        .env("KITH_TOKEN", &node.token)
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL");
    let output = tokio::time::timeout(Duration::from_secs(300), command.output())
        .await
        .expect("the SDK script finishes")
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    node.stop().await;
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)))
}

fn check_sdk_report(report: &Value) {
    assert_eq!(report["models"], json!(["smollm2-135m", "minilm-l6"]), "{report}");
    assert!(!report["text"].as_str().expect("text").is_empty(), "{report}");
    assert!(report["usage"].as_u64() > Some(0), "{report}");
    assert!(!report["streamed"].as_str().expect("streamed").is_empty(), "{report}");
    assert!(report["finish"].is_string(), "{report}");
    assert_eq!(report["dims"], 384, "{report}");
    assert_eq!(report["error"]["status"], 400, "{report}");
}

/// `KITH_TEST_PYTHON`: a Python with the `openai` package (tests/run.sh makes one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_works_unmodified() {
    let python = std::env::var("KITH_TEST_PYTHON")
        .expect("KITH_TEST_PYTHON names a Python with the openai package (tests/run.sh sets it up)");
    let report = run_sdk(&python, "openai_sdk.py", None).await;
    check_sdk_report(&report);
    assert_eq!(report["error"]["class"], "BadRequestError");
}

/// `KITH_TEST_JS`: a directory with `node_modules/openai` (tests/run.sh makes one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_js_sdk_works_unmodified() {
    let dir = std::env::var("KITH_TEST_JS")
        .expect("KITH_TEST_JS names a directory with node_modules/openai (tests/run.sh sets it up)");
    let report = run_sdk("node", "openai_sdk.mjs", Some(std::path::Path::new(&dir))).await;
    check_sdk_report(&report);
    assert_eq!(report["error"]["class"], "BadRequestError");
}
