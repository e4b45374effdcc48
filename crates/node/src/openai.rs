//! OpenAI-compatible endpoints: `GET /v1/models`, `POST /v1/chat/completions` (SSE
//! streaming or one JSON answer), `POST /v1/embeddings`.
//!
//! Chat completions are stateless: the messages go to the model exactly as given, nothing
//! is stored or injected, so the output is the engine's own for that prompt. Each answer
//! says where it ran: the `x-kith-ran-on` header and a `kith.ran_on` field.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::stream::{self, Stream};
use kith_infer::{Completion, GenerateRequest, Prompt, StopReason, StreamEvent};
use kith_types::{ChatMessage, Privacy, Role, SamplingParams};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{ApiError, AppState, JsonBody};
use crate::node::{Generation, Node};

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    let mut bytes = [0u8; 12];
    let _ = getrandom::fill(&mut bytes);
    format!("{prefix}-{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

async fn models(State(state): State<AppState>) -> Response {
    let data: Vec<Value> = state
        .node
        .status()
        .models
        .iter()
        .map(|m| json!({ "id": m.name, "object": "model", "created": m.created, "owned_by": "kith" }))
        .collect();
    axum::Json(json!({ "object": "list", "data": data })).into_response()
}

#[derive(Debug, Deserialize)]
struct ChatCompletionRequest {
    model: Option<String>,
    messages: Vec<InMessage>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    stop: Option<Stop>,
    seed: Option<u64>,
    n: Option<u64>,
    /// Kith's extension: `{"conversation": ID}` continues a saved conversation (with a
    /// `kith/` model); `{"privacy": "local-only"}` keeps this request (and, with a `kith/`
    /// model, its conversation from now on) on this machine; `{"peer": NAME}` runs it on
    /// that friend's node.
    kith: Option<KithExtension>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KithExtension {
    conversation: Option<i64>,
    privacy: Option<Privacy>,
    /// Run on this friend (name, peer id or device id).
    peer: Option<String>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

impl ChatCompletionRequest {
    /// The engine request, or a 400 naming the offending parameter.
    fn to_engine(&self, max_tokens_limit: usize) -> Result<GenerateRequest, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("n", "only n = 1 is supported"));
        }
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, message) in self.messages.iter().enumerate() {
            let role = match message.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => {
                    return Err(ApiError::invalid(
                        "messages",
                        format!("messages[{i}]: role {other:?} is not supported"),
                    ));
                }
            };
            let content = match &message.content {
                None => String::new(),
                Some(Content::Text(text)) => text.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    "messages",
                                    format!("messages[{i}]: content part {kind:?} is not supported (text only)"),
                                ));
                            }
                        }
                    }
                    text
                }
            };
            messages.push(ChatMessage::new(role, content));
        }

        let mut params = SamplingParams::default();
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::invalid("temperature", "temperature must be between 0 and 2"));
            }
            params.temperature = t;
        }
        if params.temperature == 0.0 {
            params = SamplingParams::greedy();
        }
        if let Some(p) = self.top_p {
            if !(0.0..=1.0).contains(&p) || p == 0.0 {
                return Err(ApiError::invalid("top_p", "top_p must be in (0, 1]"));
            }
            params.top_p = p;
        }
        let asked = self.max_completion_tokens.or(self.max_tokens);
        params.max_tokens = match asked {
            Some(0) => return Err(ApiError::invalid("max_tokens", "max_tokens must be at least 1")),
            Some(n) if n > max_tokens_limit as u64 => {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!("max_tokens is {n}; this node allows at most {max_tokens_limit}"),
                ));
            }
            Some(n) => n as usize,
            None => max_tokens_limit.min(SamplingParams::default().max_tokens),
        };
        params.stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(list)) if list.len() > 4 => {
                return Err(ApiError::invalid("stop", "at most 4 stop sequences"));
            }
            Some(Stop::Many(list)) => list.clone(),
        };
        if params.stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid("stop", "stop sequences must not be empty"));
        }
        if let Some(seed) = self.seed {
            params.seed = seed;
        }
        Ok(GenerateRequest::new(Prompt::Chat(messages), params))
    }
}

fn finish_reason(reason: &StopReason) -> &'static str {
    match reason {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        _ => "stop",
    }
}

fn usage_json(done: &Completion) -> Value {
    json!({
        "prompt_tokens": done.usage.prompt_tokens,
        "completion_tokens": done.usage.completion_tokens,
        "total_tokens": done.usage.prompt_tokens + done.usage.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": done.usage.cached_tokens },
    })
}

async fn chat_completions(State(state): State<AppState>, JsonBody(body): JsonBody<ChatCompletionRequest>) -> Response {
    match chat(state, body).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    }
}

async fn chat(state: AppState, body: ChatCompletionRequest) -> Result<Response, ApiError> {
    let request = body.to_engine(state.config.max_tokens)?;
    let asked = body.model.clone().unwrap_or_default();
    let (answer, mut first) = match asked.strip_prefix(KITH_PREFIX) {
        Some(model) => with_memory(&state, &body, model, request).await?,
        None => {
            let model = match asked.as_str() {
                "" => state.node.default_model().ok_or_else(|| ApiError::invalid("model", "no model is loaded"))?,
                name => name,
            }
            .to_owned();
            let privacy = body.kith.as_ref().and_then(|k| k.privacy).unwrap_or_else(|| state.node.default_privacy());
            let peer = body.kith.as_ref().and_then(|k| k.peer.as_deref());
            let generation = state.node.generate_on(&model, request, privacy, peer).await?;
            let route = generation.route.as_str().to_owned();
            let kith = json!({ "ran_on": route, "privacy": privacy });
            let parts = generation.parts();
            let answer = Answer { model, kith, route, parts, source: Source::Engine(generation) };
            (answer, None)
        }
    };
    let mut answer = answer;
    // The first event decides the status: a prompt that does not fit is a 400, not a
    // stream that breaks after its headers.
    let first = match first.take() {
        Some(event) => event,
        None => match answer.source.next().await {
            Some(Ok(event)) => event,
            Some(Err(err)) => return Err(crate::node::NodeError::Generate(err).into()),
            None => return Err(crate::node::NodeError::Generate(kith_infer::GenerateError::EngineStopped).into()),
        },
    };
    let id = request_id("chatcmpl");
    let ran_on = HeaderValue::from_str(&answer.route).unwrap_or(HeaderValue::from_static("local"));
    let mut response = if body.stream {
        let include_usage = body.stream_options.as_ref().is_some_and(|o| o.include_usage);
        Sse::new(sse_events(state.node.clone(), answer, first, id, include_usage)).into_response()
    } else {
        one_answer(state.node.clone(), answer, first, id).await?.into_response()
    };
    response.headers_mut().insert("x-kith-ran-on", ran_on);
    Ok(response)
}

/// Models named `kith/<model>` opt in to Kith's memory: the last message is the user's new
/// one, a system message (if any) is kept, earlier messages come from the vault.
const KITH_PREFIX: &str = "kith/";

async fn with_memory(
    state: &AppState,
    body: &ChatCompletionRequest,
    model: &str,
    request: GenerateRequest,
) -> Result<(Answer, Option<StreamEvent>), ApiError> {
    let Prompt::Chat(messages) = request.prompt else {
        return Err(ApiError::invalid("messages", "chat messages expected"));
    };
    let last = messages.last().filter(|m| m.role == Role::User).ok_or_else(|| {
        ApiError::invalid("messages", "with a kith/ model the last message must be the user's new message")
    })?;
    let system = messages.iter().find(|m| m.role == Role::System).map(|m| m.content.clone());
    let turn = crate::turn::ChatTurn {
        model: (!model.is_empty()).then(|| model.to_owned()),
        conversation: body.kith.as_ref().and_then(|k| k.conversation),
        system,
        message: last.content.clone(),
        params: request.params,
        privacy: body.kith.as_ref().and_then(|k| k.privacy),
        peer: body.kith.as_ref().and_then(|k| k.peer.clone()),
    };
    let turn = state.node.chat_turn(turn).await?;
    let recalled: Vec<Value> =
        turn.recalled.iter().map(|m| json!({ "id": m.id, "text": m.text, "score": m.score })).collect();
    let kith = json!({
        "ran_on": turn.route.as_str(),
        "conversation": turn.conversation,
        "recalled": recalled,
        "remembered": turn.remembered,
        "dropped_messages": turn.dropped,
        "privacy": turn.privacy,
        "suggested_memories": turn.suggested,
    });
    let answer = Answer {
        model: format!("{KITH_PREFIX}{}", turn.model),
        route: turn.route.as_str().to_owned(),
        kith,
        parts: turn.parts,
        source: Source::Turn(turn.events),
    };
    Ok((answer, None))
}

/// Where an answer's events come from: the engine directly (stateless), or a chat turn's
/// task (which saves the exchange).
enum Source {
    Engine(Generation),
    Turn(tokio::sync::mpsc::Receiver<Result<StreamEvent, kith_infer::GenerateError>>),
}

impl Source {
    async fn next(&mut self) -> Option<Result<StreamEvent, kith_infer::GenerateError>> {
        match self {
            Source::Engine(generation) => generation.stream.next().await,
            Source::Turn(events) => events.recv().await,
        }
    }

    /// After the last event: waits until a chat turn's exchange is saved (its channel
    /// closes), so the answer's end means the conversation can be read back.
    async fn settle(&mut self) {
        if let Source::Turn(events) = self {
            while events.recv().await.is_some() {}
        }
    }
}

/// What an answer reports besides its text: model, and Kith's extension object.
struct Answer {
    source: Source,
    model: String,
    route: String,
    kith: Value,
    parts: crate::offload::RanOnParts,
}

impl Answer {
    /// At the end: when a friend failed mid-answer, says where each part ran.
    fn note_parts(&mut self) {
        let parts = self.parts.names();
        if parts.len() > 1 {
            self.kith["ran_on"] = json!(parts.join(", then "));
            self.kith["ran_on_parts"] = json!(parts);
        }
    }
}

/// Collects a whole answer (non-streaming).
async fn one_answer(
    node: Node,
    mut answer: Answer,
    first: StreamEvent,
    id: String,
) -> Result<axum::Json<Value>, ApiError> {
    let mut text = first.text().to_owned();
    let mut done = match first {
        StreamEvent::Done(done) => Some(done),
        _ => None,
    };
    while done.is_none() {
        let event = tokio::select! {
            event = answer.source.next() => event,
            () = node.stopping() => return Err(crate::node::NodeError::ShuttingDown.into()),
        };
        match event {
            Some(Ok(StreamEvent::Done(end))) => {
                text.push_str(&end.text);
                done = Some(end);
            }
            Some(Ok(event)) => text.push_str(event.text()),
            Some(Err(err)) => return Err(crate::node::NodeError::Generate(err).into()),
            None => return Err(crate::node::NodeError::ShuttingDown.into()),
        }
    }
    let done = done.ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "no end"))?;
    answer.source.settle().await;
    answer.note_parts();
    Ok(axum::Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": now(),
        "model": answer.model,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": text },
            "logprobs": null,
            "finish_reason": finish_reason(&done.stop_reason),
        }],
        "usage": usage_json(&done),
        "kith": answer.kith,
    })))
}

/// State of an SSE answer between events.
struct SseState {
    node: Node,
    answer: Answer,
    pending: Option<StreamEvent>,
    id: String,
    created: u64,
    include_usage: bool,
    phase: Phase,
    /// A content chunk's JSON around its escaped text, rendered once per stream: each
    /// token then costs one string escape, not a JSON tree.
    content_prefix: String,
    content_suffix: String,
}

#[derive(PartialEq)]
enum Phase {
    Role,
    Tokens,
    Usage(Value),
    Done,
    Finished,
}

impl SseState {
    fn content_chunk(&self, text: &str) -> Event {
        let escaped = serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned());
        let mut data = String::with_capacity(self.content_prefix.len() + escaped.len() + self.content_suffix.len());
        data.push_str(&self.content_prefix);
        data.push_str(&escaped);
        data.push_str(&self.content_suffix);
        Event::default().data(data)
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Event {
        let chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.answer.model,
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
            "kith": self.answer.kith,
        });
        Event::default().data(chunk.to_string())
    }
}

/// The SSE events of a streamed answer: a role chunk, one chunk per text delta, a final
/// chunk with the finish reason, a usage chunk when asked, then `[DONE]`. If the node
/// shuts down mid-answer the stream ends with finish reason `"interrupted"` and `[DONE]`.
fn sse_events(
    node: Node,
    answer: Answer,
    first: StreamEvent,
    id: String,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let created = now();
    let (content_prefix, content_suffix) = content_affixes(&id, created, &answer.kith, &answer.model);
    let state = SseState {
        node,
        answer,
        pending: Some(first),
        id,
        created,
        include_usage,
        phase: Phase::Role,
        content_prefix,
        content_suffix,
    };
    stream::unfold(state, |mut state| async move {
        loop {
            match std::mem::replace(&mut state.phase, Phase::Tokens) {
                Phase::Role => {
                    let event = state.chunk(json!({ "role": "assistant", "content": "" }), None);
                    return Some((Ok(event), state));
                }
                Phase::Tokens => {}
                Phase::Usage(usage) => {
                    state.phase = Phase::Done;
                    let chunk = json!({
                        "id": state.id, "object": "chat.completion.chunk", "created": state.created,
                        "model": state.answer.model, "choices": [], "usage": usage,
                    });
                    return Some((Ok(Event::default().data(chunk.to_string())), state));
                }
                Phase::Done => {
                    state.phase = Phase::Finished;
                    state.answer.source.settle().await;
                    return Some((Ok(Event::default().data("[DONE]")), state));
                }
                Phase::Finished => return None,
            }
            let event = match state.pending.take() {
                Some(event) => Some(Ok(event)),
                None => next_or_stop(&state.node, &mut state.answer.source).await,
            };
            match event {
                Some(Ok(StreamEvent::Done(done))) => {
                    let mut out = Vec::new();
                    if !done.text.is_empty() {
                        out.push(state.content_chunk(&done.text));
                    }
                    state.answer.note_parts();
                    out.push(state.chunk(json!({}), Some(finish_reason(&done.stop_reason))));
                    state.phase = if state.include_usage { Phase::Usage(usage_json(&done)) } else { Phase::Done };
                    tracing::debug!(
                        prompt_tokens = done.usage.prompt_tokens,
                        completion_tokens = done.usage.completion_tokens,
                        "streamed answer done"
                    );
                    // One SSE event per poll: emit the text (if any) now and the finish next.
                    if out.len() == 2 {
                        let mut rest = done.clone();
                        rest.text.clear();
                        state.pending = Some(StreamEvent::Done(rest));
                        state.phase = Phase::Tokens;
                        let first = out.remove(0);
                        return Some((Ok(first), state));
                    }
                    return Some((Ok(out.remove(0)), state));
                }
                Some(Ok(event)) => {
                    if event.text().is_empty() {
                        continue;
                    }
                    let chunk = state.content_chunk(event.text());
                    return Some((Ok(chunk), state));
                }
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "stream failed");
                    state.phase = Phase::Done;
                    let error = json!({ "error": { "message": err.to_string(), "type": "server_error", "param": null, "code": null } });
                    return Some((Ok(Event::default().data(error.to_string())), state));
                }
                None => {
                    // Shutdown (or the engine stopped): end cleanly.
                    state.phase = Phase::Done;
                    return Some((Ok(state.chunk(json!({}), Some("interrupted"))), state));
                }
            }
        }
    })
}

/// The JSON of a content chunk before and after its escaped text: the fields and order
/// `SseState::chunk` renders (serde_json writes keys sorted).
fn content_affixes(id: &str, created: u64, kith: &Value, model: &str) -> (String, String) {
    let prefix = r#"{"choices":[{"delta":{"content":"#.to_owned();
    let suffix = format!(
        r#"}},"finish_reason":null,"index":0,"logprobs":null}}],"created":{created},"id":{},"kith":{},"model":{},"object":"chat.completion.chunk"}}"#,
        json!(id),
        kith,
        json!(model),
    );
    (prefix, suffix)
}

/// The next engine event, or `None` as soon as the node begins shutting down.
async fn next_or_stop(node: &Node, source: &mut Source) -> Option<Result<StreamEvent, kith_infer::GenerateError>> {
    if node.is_stopping() {
        return None;
    }
    tokio::select! {
        event = source.next() => event,
        () = node.stopping() => None,
    }
}

#[derive(Debug, Deserialize)]
struct EmbeddingsRequest {
    input: Input,
    model: Option<String>,
    encoding_format: Option<String>,
    dimensions: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
}

async fn embeddings(State(state): State<AppState>, JsonBody(body): JsonBody<EmbeddingsRequest>) -> Response {
    match embed(state, body).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    }
}

async fn embed(state: AppState, body: EmbeddingsRequest) -> Result<Response, ApiError> {
    let name = state.node.embedding_model().ok_or(crate::node::NodeError::NoEmbedder)?.to_owned();
    if let Some(asked) = body.model.as_deref().filter(|m| !m.is_empty() && *m != name) {
        return Err(ApiError::invalid("model", format!("embedding model {asked:?} is not loaded (loaded: {name})")));
    }
    let texts = match body.input {
        Input::One(text) => vec![text],
        Input::Many(texts) => texts,
    };
    if texts.is_empty() || texts.len() > state.config.max_embedding_inputs {
        return Err(ApiError::invalid(
            "input",
            format!("input must hold 1 to {} texts", state.config.max_embedding_inputs),
        ));
    }
    let base64 = match body.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(ApiError::invalid("encoding_format", format!("unknown encoding {other:?}"))),
    };
    if body.dimensions.is_some() {
        return Err(ApiError::invalid("dimensions", "this model has a fixed size; leave dimensions out"));
    }
    let tokens: usize = texts.iter().map(|t| state.node.embedding_tokens(t)).sum();
    let vectors = state.node.embed(texts).await?;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = if base64 {
                Value::String(base64_f32(vector))
            } else {
                Value::Array(vector.iter().map(|&v| json!(v)).collect())
            };
            json!({ "object": "embedding", "index": index, "embedding": embedding })
        })
        .collect();
    Ok(axum::Json(json!({
        "object": "list",
        "data": data,
        "model": name,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    }))
    .into_response())
}

/// Little-endian f32s in standard base64 (what OpenAI's SDKs ask for by default).
fn base64_f32(vector: &[f32]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= chunk.len() { TABLE[(n >> shift) as usize & 63] as char } else { '=' });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_content_chunks_equal_the_generic_ones() {
        let created = 1_700_000_000u64;
        let (id, model) = ("chatcmpl-1", "m\"odel");
        let kith = json!({ "ran_on": "local", "conversation": 4 });
        let (prefix, suffix) = content_affixes(id, created, &kith, model);
        for text in ["hello", "quote \" and \\ and \n", "é東🙂"] {
            let fast = format!("{prefix}{}{suffix}", serde_json::to_string(text).expect("json"));
            let generic = json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{ "index": 0, "delta": { "content": text }, "logprobs": null, "finish_reason": null }],
                "kith": kith,
            });
            assert_eq!(serde_json::from_str::<Value>(&fast).expect("valid JSON"), generic);
            assert_eq!(fast, generic.to_string(), "byte for byte");
        }
    }

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(base64_f32(&[]), "");
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, -2.5]), "AACAPwAAIMA=");
    }

    fn request(json: Value) -> ChatCompletionRequest {
        serde_json::from_value(json).expect("request parses")
    }

    #[test]
    fn parameters_map_and_limits_are_enforced() {
        let ok = request(json!({
            "model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "temperature": 0, "max_tokens": 7, "stop": "x", "seed": 3
        }));
        let engine = ok.to_engine(100).expect("valid");
        assert!(engine.params.is_greedy());
        assert_eq!(
            (engine.params.max_tokens, engine.params.seed, engine.params.stop.clone()),
            (7, 3, vec!["x".into()])
        );
        match &engine.prompt {
            Prompt::Chat(messages) => assert_eq!(messages[1].content, "hi"),
            other => panic!("{other:?}"),
        }
        let cases = [
            (json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": 101}), "max_tokens"),
            (json!({"messages": [{"role": "user", "content": "a"}], "n": 2}), "n"),
            (json!({"messages": []}), "messages"),
            (json!({"messages": [{"role": "tool", "content": "a"}]}), "messages"),
            (json!({"messages": [{"role": "user", "content": "a"}], "temperature": 3}), "temperature"),
            (json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), "messages"),
            (json!({"messages": [{"role": "user", "content": "a"}], "stop": ["a","b","c","d","e"]}), "stop"),
        ];
        for (body, param) in cases {
            let err = request(body.clone()).to_engine(100).expect_err("invalid");
            assert_eq!(err.param(), Some(param), "{body}");
        }
    }
}
