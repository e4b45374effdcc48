//! A chat turn with memory: the conversation from the vault, recalled memories in the
//! prompt, the exchange saved (encrypted) when the answer ends.
//!
//! Order of a turn: "remember that …" is saved as a memory first; the conversation's
//! earlier messages are loaded; memories that match the new message (by meaning and by
//! words) are put in a system message, each with its id, between clear markers; the
//! oldest turns are dropped until the prompt and the answer fit the context window (the
//! new message is never cut: if it alone does not fit, the turn is refused); the answer
//! streams to the caller while a task collects it; when it ends (or is cut short by
//! shutdown or a client that went away, then marked `interrupted`) both messages are
//! saved, embedded and indexed.

use std::sync::Arc;

use kith_infer::{GenerateError, GenerateRequest, Prompt, StreamEvent};
use kith_memory::{
    ConversationMeta, ItemKind, ItemRef, MemoryStore, MessageBody, MessageStats, QuantizedVector, RanOn, RecallIndex,
    RecallItem,
};
use kith_types::{ChatMessage, Privacy, Role, SamplingParams};
use tokio::sync::{Mutex, mpsc};

use crate::node::{Node, NodeError, Route};

/// Memories put in a prompt at most.
const RECALLED: usize = 3;
/// Blended recall score a memory needs to be put in a prompt.
const MIN_RECALL_SCORE: f32 = 0.3;
/// Marks the memory block in the system message.
pub const MEMORY_OPEN: &str = "<kith-memories>";
/// Ends the memory block.
pub const MEMORY_CLOSE: &str = "</kith-memories>";

/// The unlocked vault the node serves: the store and its recall index.
pub(crate) struct NodeMemory {
    pub(crate) store: MemoryStore,
    pub(crate) index: Mutex<RecallIndex>,
}

/// One user message to answer with memory.
#[derive(Debug, Clone)]
pub struct ChatTurn {
    /// The model (default: the node's first).
    pub model: Option<String>,
    /// Continue this conversation; `None` starts a new one.
    pub conversation: Option<i64>,
    /// A system message for this turn.
    pub system: Option<String>,
    /// The user's new message.
    pub message: String,
    /// Sampling.
    pub params: SamplingParams,
    /// Where this conversation may run from now on (default: as saved, or the node's
    /// default for a new conversation).
    pub privacy: Option<Privacy>,
    /// Run this turn on this friend (name, peer id or device id).
    pub peer: Option<String>,
}

/// A memory put in the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Recalled {
    /// Its id.
    pub id: i64,
    /// Its text.
    pub text: String,
    /// Its recall score.
    pub score: f32,
}

/// An accepted turn: where it runs, what the model sees, and its events.
#[derive(Debug)]
pub struct Turn {
    /// The conversation (created for a new one).
    pub conversation: i64,
    /// The model.
    pub model: String,
    /// Where it runs.
    pub route: Route,
    /// The messages the model is given, memory block included.
    pub prompt: Vec<ChatMessage>,
    /// Memories put in the prompt.
    pub recalled: Vec<Recalled>,
    /// A memory saved from "remember that …".
    pub remembered: Option<i64>,
    /// Earlier messages left out to fit the context window.
    pub dropped: usize,
    /// The conversation's privacy mode.
    pub privacy: Privacy,
    /// Facts in the message suggested as memories, new ones only (queued for review with
    /// the exchange).
    pub suggested: Vec<String>,
    /// The answer's events. The channel closes once the exchange is saved, so a caller
    /// that waits for the close can read the conversation back.
    pub events: mpsc::Receiver<Result<StreamEvent, GenerateError>>,
    /// Where the parts of the answer ran (more than one when a friend failed mid-answer).
    pub parts: crate::offload::RanOnParts,
}

/// The fact in "remember that X" / "remember: X" (optionally after "please"), if the
/// message is one.
pub fn remember_request(message: &str) -> Option<&str> {
    let trimmed = message.trim();
    let lower = trimmed.to_lowercase();
    for prefix in ["please remember that ", "remember that ", "please remember: ", "remember: "] {
        if lower.starts_with(prefix) && lower.is_char_boundary(prefix.len()) && trimmed.is_char_boundary(prefix.len()) {
            let fact = trimmed[prefix.len()..].trim().trim_end_matches(['.', '!']).trim();
            return (!fact.is_empty()).then_some(fact);
        }
    }
    None
}

impl Node {
    /// Answers `turn` with the vault's memory (see the module docs).
    pub async fn chat_turn(&self, turn: ChatTurn) -> Result<Turn, NodeError> {
        let memory = self.memory().ok_or(NodeError::NoMemory)?;
        let model = match &turn.model {
            Some(name) => name.clone(),
            None => self
                .default_model()
                .ok_or_else(|| NodeError::UnknownModel { name: String::new(), loaded: String::new() })?
                .to_owned(),
        };
        if turn.message.trim().is_empty() {
            return Err(NodeError::Generate(GenerateError::EmptyPrompt));
        }

        // A conversation to continue must exist before anything is saved, and the route
        // must be allowed by its privacy mode.
        let saved = match turn.conversation {
            Some(id) => Some(memory.store.conversation(id).await?.ok_or(NodeError::NoConversation(id))?),
            None => None,
        };
        let privacy =
            turn.privacy.or_else(|| saved.as_ref().map(|c| c.meta.privacy)).unwrap_or_else(|| self.default_privacy());
        let route = self.route_fresh(&model, privacy, turn.peer.as_deref()).await?;
        let context = self.context_for(&model, &route)?;

        // "Remember that …": saved now, found by the recall below like any memory.
        let mut remembered = None;
        if let Some(fact) = remember_request(&turn.message) {
            let id = memory.store.add_memory(fact, None, false).await?;
            remembered = Some(self.index_memory(&memory, id, fact).await?.id);
        }
        let suggested = new_suggestions(&memory, crate::extract::extract_candidates(&turn.message)).await?;

        // The conversation so far.
        let conversation = match saved {
            Some(saved) => {
                if saved.meta.privacy != privacy {
                    let mut meta = saved.meta;
                    meta.privacy = privacy;
                    memory.store.set_conversation_meta(saved.id, &meta).await?;
                }
                saved.id
            }
            None => {
                let title: String = turn.message.chars().take(60).collect();
                let mut meta = ConversationMeta::new(title, model.clone());
                meta.privacy = privacy;
                memory.store.create_conversation(&meta).await?
            }
        };
        let earlier = memory.store.messages(conversation).await?;
        if let Some(damaged) = earlier.damaged.first() {
            tracing::warn!(error = %damaged, "a damaged message is left out of the prompt");
        }
        let history: Vec<ChatMessage> = earlier
            .items
            .iter()
            .map(|m| {
                let role = match m.body.role.as_str() {
                    "assistant" => Role::Assistant,
                    "system" => Role::System,
                    _ => Role::User,
                };
                ChatMessage::new(role, m.body.content.clone())
            })
            .collect();

        // Memories that match the new message.
        let query_vector = self.embed_optional(&turn.message).await?;
        let recalled: Vec<Recalled> = memory
            .index
            .lock()
            .await
            .recall(&turn.message, query_vector.as_deref(), 16)
            .iter()
            .filter(|hit| hit.item.kind == ItemKind::Memory && hit.score >= MIN_RECALL_SCORE)
            .take(RECALLED)
            .map(|hit| Recalled { id: hit.item.id, text: hit.text.clone(), score: hit.score })
            .collect();

        let system = system_message(turn.system.as_deref(), &recalled);
        let (prompt, dropped) = fit(&context, system, history, &turn.message, turn.params.max_tokens)?;
        let request = GenerateRequest::new(Prompt::Chat(prompt.clone()), turn.params.clone());
        let generation = self.generate_routed(&model, request, route).await?;
        let route = generation.route.clone();
        let parts = generation.parts();

        let (tx, events) = mpsc::channel(64);
        let node = self.clone();
        let exchange =
            Exchange { conversation, question: turn.message.clone(), remembered, suggested: suggested.clone() };
        tokio::spawn(async move {
            collect_and_save(node, memory, generation, exchange, tx).await;
        });
        Ok(Turn {
            conversation,
            model,
            route,
            prompt,
            recalled,
            remembered,
            dropped,
            privacy,
            suggested,
            events,
            parts,
        })
    }

    async fn embed_optional(&self, text: &str) -> Result<Option<Vec<f32>>, NodeError> {
        if self.embedding_model().is_none() {
            return Ok(None);
        }
        Ok(self.embed(vec![text.to_owned()]).await?.pop())
    }
}

fn system_message(system: Option<&str>, recalled: &[Recalled]) -> Option<String> {
    let mut text = system.unwrap_or_default().trim().to_owned();
    if !recalled.is_empty() {
        if !text.is_empty() {
            text.push_str("\n\n");
        }
        text.push_str(
            "What you remember about the user (from Kith's memory, in the user's own words; each has an id):\n",
        );
        text.push_str(MEMORY_OPEN);
        text.push('\n');
        for memory in recalled {
            text.push_str(&format!("[memory {}] {}\n", memory.id, memory.text));
        }
        text.push_str(MEMORY_CLOSE);
    }
    (!text.is_empty()).then_some(text)
}

/// The prompt: system, as many of the latest earlier messages as fit with `max_tokens`
/// of answer, and the new message; how many earlier messages were left out.
/// How a prompt is measured against the context window of the model that will run it.
enum Context {
    /// Loaded here: its own template and tokenizer count exactly.
    Engine(kith_infer::EngineHandle),
    /// On a friend's node: estimated from the text (3 characters per token, on the safe
    /// side for English and code) against the context length they advertise.
    Estimate(usize),
}

impl Node {
    fn context_for(&self, model: &str, route: &Route) -> Result<Context, NodeError> {
        match route {
            Route::Local => Ok(Context::Engine(self.engine_handle(model)?)),
            Route::Peer { .. } => {
                let advertised = self
                    .mesh()
                    .and_then(|mesh| mesh.candidates(model).iter().map(|c| c.context_length).filter(|&n| n > 0).min());
                Ok(Context::Estimate(advertised.map_or(2048, |n| n as usize)))
            }
        }
    }
}

fn fit(
    context: &Context,
    system: Option<String>,
    history: Vec<ChatMessage>,
    message: &str,
    max_tokens: usize,
) -> Result<(Vec<ChatMessage>, usize), NodeError> {
    let (context_length, engine) = match context {
        Context::Engine(engine) => (engine.info().context_length, Some(engine)),
        Context::Estimate(n) => (*n, None),
    };
    let context = context_length;
    let build = |keep_from: usize| {
        let mut messages = Vec::with_capacity(history.len() + 2);
        if let Some(system) = &system {
            messages.push(ChatMessage::system(system.clone()));
        }
        messages.extend(history[keep_from..].iter().cloned());
        messages.push(ChatMessage::user(message));
        messages
    };
    let tokens = |messages: &[ChatMessage]| -> Result<usize, NodeError> {
        let Some(engine) = engine else {
            return Ok(messages.iter().map(|m| m.content.chars().count() / 3 + 8).sum());
        };
        let text = engine.chat_template().render(messages, true)?;
        Ok(engine.tokenizer().encode(&text, true, true).map_err(GenerateError::Tokenizer)?.len())
    };
    let budget = context.saturating_sub(max_tokens.min(context / 2));
    let mut keep_from = 0;
    loop {
        let messages = build(keep_from);
        let count = tokens(&messages)?;
        if count <= budget {
            return Ok((messages, keep_from));
        }
        if keep_from >= history.len() {
            return Err(NodeError::Generate(GenerateError::ContextOverflow {
                prompt_tokens: count,
                context_length: context,
            }));
        }
        // Drop the oldest turn (a user message and its answer).
        keep_from = (keep_from + 2).min(history.len());
    }
}

/// What a turn saves besides the answer.
struct Exchange {
    conversation: i64,
    question: String,
    /// A memory told in the question ("remember that …").
    remembered: Option<i64>,
    /// Suggested memories found in the question.
    suggested: Vec<String>,
}

/// Forwards the answer to the caller and saves the exchange when it ends.
async fn collect_and_save(
    node: Node,
    memory: Arc<NodeMemory>,
    mut generation: crate::node::Generation,
    exchange: Exchange,
    tx: mpsc::Sender<Result<StreamEvent, GenerateError>>,
) {
    let Exchange { conversation, question, remembered, suggested } = exchange;
    let mut answer = String::new();
    let mut stats = MessageStats::default();
    let mut interrupted = true;
    loop {
        let event = tokio::select! {
            event = generation.stream.next() => event,
            () = node.stopping() => None,
        };
        match event {
            Some(Ok(event)) => {
                answer.push_str(event.text());
                let done = match &event {
                    StreamEvent::Done(done) => Some(done.clone()),
                    _ => None,
                };
                if tx.send(Ok(event)).await.is_err() {
                    break; // the caller went away
                }
                if let Some(done) = done {
                    stats = MessageStats {
                        prompt_tokens: done.usage.prompt_tokens as i64,
                        output_tokens: done.usage.completion_tokens as i64,
                        duration_ms: (done.timings.prefill + done.timings.decode).as_millis() as i64,
                    };
                    interrupted = false;
                    break;
                }
            }
            Some(Err(err)) => {
                let _ = tx.send(Err(err)).await;
                if answer.is_empty() {
                    return; // nothing to save
                }
                break;
            }
            None => break,
        }
    }
    let route = RanOn::from_parts(generation.ran_on());
    let user = MessageBody { role: "user".into(), content: question, ran_on: None, interrupted: false };
    let reply = MessageBody { role: "assistant".into(), content: answer, ran_on: Some(route), interrupted };
    let texts = [user.content.clone(), reply.content.clone()];
    let saved = memory.store.add_messages(conversation, &[(user, MessageStats::default()), (reply, stats)]).await;
    let ids = match saved {
        Ok(ids) => ids,
        Err(err) => {
            tracing::error!(error = %err, conversation, "saving the exchange failed");
            return;
        }
    };
    // A memory told in this message came from it.
    if let (Some(memory_id), Some(&message_id)) = (remembered, ids.first())
        && let Err(err) = memory.store.set_memory_source(memory_id, message_id).await
    {
        tracing::warn!(error = %err, "linking a memory to its message failed");
    }
    queue_suggestions(&memory, suggested, ids.first().copied()).await;
    let vectors = if node.embedding_model().is_some() { node.embed(texts.to_vec()).await.ok() } else { None };
    let mut index = memory.index.lock().await;
    for (i, (id, text)) in ids.iter().zip(texts).enumerate() {
        let item = ItemRef { kind: ItemKind::Message, id: *id };
        let vector = vectors.as_ref().and_then(|v| v.get(i));
        if let Some(vector) = vector
            && let Err(err) = memory.store.set_embedding(item, vector).await
        {
            tracing::warn!(error = %err, "saving an embedding failed");
        }
        index.insert(RecallItem {
            item,
            conversation_id: Some(conversation),
            created_at: crate::memory::now_ms(),
            role: Some(if i == 0 { "user" } else { "assistant" }.into()),
            text,
            embedding: vector.map(|v| QuantizedVector::quantize(v)),
        });
    }
    tracing::debug!(conversation, interrupted, "exchange saved");
    // The caller's events end only now: an answer that has ended is on disk.
    drop(tx);
    // `generation` (and its place in the queue) is released only now, so a shutdown
    // waits for the exchange to be on disk.
    drop(generation);
}

/// The suggestions that are neither remembered already nor waiting for review.
async fn new_suggestions(memory: &NodeMemory, suggested: Vec<String>) -> Result<Vec<String>, NodeError> {
    if suggested.is_empty() {
        return Ok(suggested);
    }
    let waiting: Vec<String> = memory.store.candidates().await?.items.into_iter().map(|c| c.text).collect();
    let index = memory.index.lock().await;
    Ok(suggested
        .into_iter()
        .filter(|s| !index.has_memory_text(s) && !waiting.iter().any(|w| w.eq_ignore_ascii_case(s)))
        .collect())
}

/// Puts suggestions in the review queue, linked to the message they came from.
async fn queue_suggestions(memory: &NodeMemory, suggested: Vec<String>, source: Option<i64>) {
    if suggested.is_empty() {
        return;
    }
    match memory.store.add_candidates(source, &suggested).await {
        Ok(ids) => tracing::info!(suggestions = ids.len(), "memories suggested for review"),
        Err(err) => tracing::warn!(error = %err, "queueing suggested memories failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remember_requests_are_recognised() {
        assert_eq!(remember_request("Remember that my cat is called Miso."), Some("my cat is called Miso"));
        assert_eq!(remember_request("Please remember that I prefer tea"), Some("I prefer tea"));
        assert_eq!(remember_request("remember: I prefer metric units"), Some("I prefer metric units"));
        assert_eq!(remember_request("Do you remember my cat?"), None);
        assert_eq!(remember_request("remember that"), None);
        assert_eq!(remember_request("remember when we went to Paris?"), None);
        assert_eq!(remember_request("Remember: thät ü"), Some("thät ü"));
    }

    #[test]
    fn memories_are_delimited_with_their_ids() {
        let recalled = [Recalled { id: 7, text: "my cat is called Miso".into(), score: 0.8 }];
        let text = system_message(Some("Be brief."), &recalled).expect("system");
        assert!(text.starts_with("Be brief.\n\n"));
        assert!(text.contains("<kith-memories>\n[memory 7] my cat is called Miso\n</kith-memories>"), "{text}");
        assert_eq!(system_message(None, &[]), None);
    }
}
