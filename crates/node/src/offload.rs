//! The node on the mesh: friends' jobs run on this node's engines, and this node's
//! requests run on friends' nodes, falling over to another friend (or to this machine)
//! mid-stream without losing what was generated.
//!
//! ```text
//!  Node::generate ─▶ Route::Peer ─▶ relay task ── Mesh::infer(peer) ─▶ friend's node
//!        ▲                             │ tokens kept; on failure: next friend or local,
//!        └──── TokenStream ◀───────────┘ continuing after them (continue_ids)
//! ```
//!
//! Friends' prompts and outputs are never stored or logged here: only counts (the mesh's
//! ledger) and ids.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kith_infer::{
    Completion, GenerateError, GenerateRequest, Prompt, StopReason, StreamEvent, Timings, TokenEvent, Usage,
};
use kith_mesh::wire::{AdvertModel, Done, InferRequest, ToClient, VERSION, WireError};
use kith_mesh::{Mesh, OfferFn, PeerId, ServeJob};
use tokio::sync::mpsc;

use crate::node::{Generation, Node, NodeError, Route};

/// Where the parts of one answer ran, in order (`local` or a friend's name).
#[derive(Debug, Clone, Default)]
pub struct RanOnParts(Arc<Mutex<Vec<String>>>);

impl RanOnParts {
    pub(crate) fn one(name: &str) -> Self {
        Self(Arc::new(Mutex::new(vec![name.to_owned()])))
    }

    fn push(&self, name: &str) {
        if let Ok(mut parts) = self.0.lock()
            && parts.last().is_none_or(|last| last != name)
        {
            parts.push(name.to_owned());
        }
    }

    /// The parts so far.
    pub fn names(&self) -> Vec<String> {
        self.0.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

pub(crate) fn stop_reason_wire(reason: &StopReason) -> &'static str {
    match reason {
        StopReason::EndOfGeneration => "eog",
        StopReason::MaxTokens => "length",
        StopReason::StopString => "stop",
        StopReason::ContextFull => "context_full",
        _ => "cancelled",
    }
}

fn stop_reason_from_wire(reason: &str) -> StopReason {
    match reason {
        "eog" => StopReason::EndOfGeneration,
        "length" => StopReason::MaxTokens,
        "stop" => StopReason::StopString,
        "context_full" => StopReason::ContextFull,
        _ => StopReason::Cancelled,
    }
}

impl Node {
    /// Joins the mesh: friends' jobs from `jobs` run on this node's engines, and
    /// requests for models this node lacks may go to friends.
    pub fn attach_mesh(&self, mesh: Mesh, mut jobs: mpsc::Receiver<ServeJob>) {
        if self.set_mesh(mesh).is_err() {
            tracing::warn!("a mesh is attached already");
            return;
        }
        let node = self.clone();
        tokio::spawn(async move {
            while let Some(job) = jobs.recv().await {
                tokio::spawn(serve_job(node.clone(), job));
            }
        });
    }

    /// What this node offers friends, for [`Mesh::start`]: every loaded model, its device,
    /// measured speed and queue. Holds the node weakly.
    pub fn offer(&self) -> OfferFn {
        let node = self.downgrade();
        Arc::new(move || {
            let Some(node) = crate::node::Node::upgrade(&node) else { return Vec::new() };
            node.status()
                .models
                .into_iter()
                .filter(|m| !m.embedding)
                .map(|m| AdvertModel {
                    tokens_per_s: node.engine_handle(&m.name).map_or(0.0, |e| e.decode_speed()),
                    name: m.name,
                    device: m.device,
                    queued: m.queued as u32,
                    context_length: m.context_length as u32,
                })
                .collect()
        })
    }

    /// Sends `request` to a friend (`route` is [`Route::Peer`]) and relays the answer,
    /// falling over to the next friend or to this machine if that friend fails.
    pub(crate) fn offload(&self, model: &str, request: GenerateRequest, route: Route) -> Result<Generation, NodeError> {
        let Route::Peer { peer, name } = &route else { return Err(self.unknown_model(model)) };
        let mut request = request;
        let Prompt::Chat(messages) = std::mem::replace(&mut request.prompt, Prompt::Tokens(Vec::new())) else {
            return Err(NodeError::Generate(GenerateError::InvalidParams(
                "only chat requests can run on a friend's node".into(),
            )));
        };
        let mesh = self.mesh().ok_or_else(|| self.unknown_model(model))?.clone();
        let (tx, stream) = kith_infer::TokenStream::channel();
        let parts = RanOnParts::default();
        let relay =
            Relay { node: self.clone(), mesh, model: model.to_owned(), messages, request, parts: parts.clone(), tx };
        tokio::spawn(relay.run(*peer, name.clone()));
        Ok(Generation::relayed(route, model.to_owned(), stream, parts))
    }
}

struct Relay {
    node: Node,
    mesh: Mesh,
    model: String,
    messages: Vec<kith_types::ChatMessage>,
    /// Sampling, stopping and the tokens generated so far (`continue_from`).
    request: GenerateRequest,
    parts: RanOnParts,
    tx: mpsc::Sender<Result<StreamEvent, GenerateError>>,
}

enum Part {
    /// The answer is complete (or the reader went away).
    Finished,
    /// This part failed; try elsewhere.
    Failed(String),
}

impl Relay {
    async fn run(mut self, first: PeerId, name: String) {
        let started = Instant::now();
        let request_id = format!("{:016x}", rand_u64());
        let mut tried = vec![first];
        let mut next = Some((first, name));
        loop {
            let outcome = match next.take() {
                Some((peer, name)) => self.on_peer(peer, &name, &request_id, started).await,
                None => self.on_local(started).await,
            };
            let reason = match outcome {
                Part::Finished => return,
                Part::Failed(reason) => reason,
            };
            // Another friend that offers the model, then this machine, then give up.
            if let Some(c) = self.mesh.candidates(&self.model).into_iter().find(|c| !tried.contains(&c.peer)) {
                tracing::warn!(request = %request_id, error = %reason, next = %c.name, "offload failed; trying another friend");
                tried.push(c.peer);
                next = Some((c.peer, c.name));
            } else if self.node.is_loaded(&self.model) && self.parts.names().last().is_none_or(|p| p != "local") {
                tracing::warn!(request = %request_id, error = %reason, "offload failed; continuing on this machine");
            } else {
                let _ = self.tx.send(Err(GenerateError::Remote(reason))).await;
                return;
            }
        }
    }

    async fn on_peer(&mut self, peer: PeerId, name: &str, request_id: &str, started: Instant) -> Part {
        let request = InferRequest {
            version: VERSION,
            request_id: request_id.to_owned(),
            model: self.model.clone(),
            messages: self.messages.clone(),
            params: self.request.params.clone(),
            continue_ids: self.request.continue_from.clone(),
        };
        let mut offload = match self.mesh.infer(peer, request).await {
            Ok(offload) => offload,
            Err(e) => return Part::Failed(e.to_string()),
        };
        self.parts.push(name);
        loop {
            let event = tokio::select! {
                event = offload.next() => event,
                () = self.tx.closed() => {
                    offload.cancel().await;
                    return Part::Finished;
                }
            };
            match event {
                Some(Ok(ToClient::Token { id, text })) => {
                    self.request.continue_from.push(id);
                    if self.tx.send(Ok(StreamEvent::Token(TokenEvent::new(id, text)))).await.is_err() {
                        offload.cancel().await;
                        return Part::Finished;
                    }
                }
                Some(Ok(ToClient::Done(done))) => {
                    let first = started.elapsed().saturating_sub(Duration::from_secs_f64(done.decode_ms / 1000.0));
                    let timings = Timings::new(
                        Duration::ZERO,
                        Duration::from_secs_f64(done.first_token_ms / 1000.0),
                        first,
                        Duration::from_secs_f64(done.decode_ms / 1000.0),
                    );
                    let usage = Usage::new(done.prompt_tokens as usize, self.request.continue_from.len());
                    let end = Completion::new(done.text, stop_reason_from_wire(&done.stop_reason), usage, timings);
                    let _ = self.tx.send(Ok(StreamEvent::Done(end))).await;
                    return Part::Finished;
                }
                Some(Ok(ToClient::Error(e))) => return Part::Failed(e.message),
                Some(Err(e)) => return Part::Failed(e.to_string()),
                None => return Part::Failed(format!("{name} ended the answer early")),
            }
        }
    }

    async fn on_local(&mut self, started: Instant) -> Part {
        self.parts.push("local");
        let mut request = self.request.clone();
        request.prompt = Prompt::Chat(self.messages.clone());
        let already = request.continue_from.len();
        let mut generation = match self.node.generate_local(&self.model, request).await {
            Ok(generation) => generation,
            Err(e) => return Part::Failed(e.to_string()),
        };
        loop {
            let event = tokio::select! {
                event = generation.stream.next() => event,
                () = self.tx.closed() => return Part::Finished,
            };
            match event {
                Some(Ok(StreamEvent::Done(done))) => {
                    let usage = Usage::new(done.usage.prompt_tokens, already + done.usage.completion_tokens);
                    let t = done.timings;
                    let timings =
                        Timings::new(t.queued, t.prefill, started.elapsed().saturating_sub(t.decode), t.decode);
                    let end = Completion::new(done.text, done.stop_reason, usage, timings);
                    let _ = self.tx.send(Ok(StreamEvent::Done(end))).await;
                    return Part::Finished;
                }
                Some(Ok(event)) => {
                    if self.tx.send(Ok(event)).await.is_err() {
                        return Part::Finished;
                    }
                }
                Some(Err(e)) => {
                    let _ = self.tx.send(Err(e)).await;
                    return Part::Finished;
                }
                None => return Part::Failed("the local engine stopped".into()),
            }
        }
    }
}

fn rand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    u64::from_le_bytes(bytes)
}

/// Runs a friend's job on this node's engine and streams the answer back. Nothing of
/// the request or the answer is stored or logged.
async fn serve_job(node: Node, job: ServeJob) {
    let started = Instant::now();
    let refuse = |code: &str, message: String| ToClient::Error(WireError::new(code, message));
    let (friend, events) = (job.friend.clone(), job.events.clone());
    let request = job.request.clone();
    // The prompt counts against the friend's quota: one longer than what is left is
    // refused before it runs, and what it leaves bounds the answer.
    let prompt_tokens = match node.chat_prompt_tokens(&request.model, &request.messages) {
        Ok(n) => n as u64,
        Err(e) => {
            let code = if matches!(e, NodeError::UnknownModel { .. }) { "model" } else { "bad_request" };
            let _ = events.send(refuse(code, e.to_string())).await;
            return;
        }
    };
    let mut params = request.params;
    if let Some(left) = job.tokens_left {
        if prompt_tokens >= left {
            let message = format!(
                "this prompt of {prompt_tokens} tokens does not fit in the {left} tokens left of your daily token quota on this node; it resets at 00:00 UTC"
            );
            let _ = events.send(refuse("quota", message)).await;
            return;
        }
        let answer_budget = (left - prompt_tokens) as usize + request.continue_ids.len();
        params.max_tokens = params.max_tokens.min(answer_budget.max(1));
    }
    let mut generate = GenerateRequest::new(Prompt::Chat(request.messages), params);
    generate.continue_from = request.continue_ids;
    let generation = node.generate_for_friend(&request.model, generate).await;
    if generation.is_ok() {
        job.count_prompt(prompt_tokens);
    }
    let mut generation = match generation {
        Ok(generation) => generation,
        Err(NodeError::Busy(model)) => {
            let _ = events.send(refuse("busy", format!("{model} is busy on this node; try again shortly"))).await;
            return;
        }
        Err(e @ NodeError::UnknownModel { .. }) => {
            let _ = events.send(refuse("model", e.to_string())).await;
            return;
        }
        Err(e) => {
            let _ = events.send(refuse("failed", e.to_string())).await;
            return;
        }
    };
    tracing::debug!(%friend, request = %request.request_id, "friend's job started");
    loop {
        let event = tokio::select! {
            event = generation.stream.next() => event,
            () = events.closed() => return, // the friend went away: dropping the stream stops the engine
        };
        let message = match event {
            Some(Ok(StreamEvent::Token(token))) => ToClient::Token { id: token.id, text: token.text },
            Some(Ok(StreamEvent::Done(done))) => ToClient::Done(Done {
                text: done.text,
                stop_reason: stop_reason_wire(&done.stop_reason).to_owned(),
                prompt_tokens: done.usage.prompt_tokens as u64,
                completion_tokens: done.usage.completion_tokens as u64,
                first_token_ms: done.timings.first_token.as_secs_f64() * 1000.0,
                decode_ms: done.timings.decode.as_secs_f64() * 1000.0,
            }),
            Some(Ok(_)) => continue,
            Some(Err(e)) => refuse("failed", e.to_string()),
            None => refuse("failed", "the engine stopped".into()),
        };
        let last = !matches!(message, ToClient::Token { .. });
        if events.send(message).await.is_err() || last {
            break;
        }
    }
    tracing::debug!(%friend, elapsed_ms = started.elapsed().as_millis() as u64, "friend's job ended");
}
