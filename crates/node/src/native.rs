//! The native API under `/api/`, for the desktop app and scripts: node status,
//! conversations, memories and memory search, described at `/api/openapi.json`.
//!
//! Lists are paginated with `offset` and `limit` (at most 500) and return `next_offset`
//! while more remain. Ids are the vault's row ids: stable for the life of a row.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kith_memory::{ItemKind, ItemRef, QuantizedVector, RecallItem};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::api::{ApiError, AppState, JsonBody};
use crate::node::NodeError;

const MAX_PAGE: usize = 500;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/status", get(status))
        .route("/api/conversations", get(list_conversations))
        .route("/api/conversations/{id}", get(get_conversation).delete(delete_conversation))
        .route("/api/memories", get(list_memories).post(add_memory))
        .route("/api/memories/search", get(search_memories))
        .route("/api/memories/{id}", axum::routing::delete(forget_memory))
        .route("/api/openapi.json", get(openapi))
}

/// The OpenAPI description of the native API.
#[derive(OpenApi)]
#[openapi(
    info(title = "Kith native API", description = "The local API of a Kith node (bearer token required)."),
    paths(
        status,
        list_conversations,
        get_conversation,
        delete_conversation,
        list_memories,
        add_memory,
        search_memories,
        forget_memory
    ),
    components(schemas(
        Status,
        ModelState,
        ConversationSummary,
        ConversationPage,
        ConversationDetail,
        MessageView,
        MemoryView,
        MemoryPage,
        NewMemory,
        SearchHit,
        Deleted,
        ErrorBody,
        ErrorDetail
    ))
)]
pub struct NativeApi;

async fn openapi() -> Response {
    match NativeApi::openapi().to_json() {
        Ok(json) => ([(axum::http::header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(err) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", err.to_string()).into_response(),
    }
}

/// OpenAI-shaped error body (every error of the API).
#[derive(Serialize, ToSchema)]
struct ErrorBody {
    error: ErrorDetail,
}

/// The error itself.
#[derive(Serialize, ToSchema)]
struct ErrorDetail {
    message: String,
    #[serde(rename = "type")]
    kind: String,
    param: Option<String>,
    code: Option<String>,
}

/// A loaded model.
#[derive(Serialize, ToSchema)]
struct ModelState {
    name: String,
    context_length: usize,
    /// Requests running or waiting on it.
    queued: usize,
    embedding: bool,
}

/// The node's state.
#[derive(Serialize, ToSchema)]
struct Status {
    models: Vec<ModelState>,
    uptime_s: u64,
    /// Whether a vault is unlocked (conversations, memories, `kith/` models).
    memory: bool,
    stopping: bool,
}

/// Node status: models, queues, memory.
#[utoipa::path(get, path = "/api/status", responses((status = 200, body = Status)))]
async fn status(State(state): State<AppState>) -> axum::Json<Status> {
    let status = state.node.status();
    axum::Json(Status {
        models: status
            .models
            .into_iter()
            .map(|m| ModelState {
                name: m.name,
                context_length: m.context_length,
                queued: m.queued,
                embedding: m.embedding,
            })
            .collect(),
        uptime_s: status.uptime_s,
        memory: state.node.has_memory(),
        stopping: status.stopping,
    })
}

/// `offset` and `limit`.
#[derive(Deserialize, IntoParams)]
struct Page {
    /// Items to skip.
    offset: Option<usize>,
    /// Items to return (default 50, at most 500).
    limit: Option<usize>,
}

impl Page {
    fn cut<T>(&self, items: Vec<T>) -> (Vec<T>, Option<usize>) {
        let offset = self.offset.unwrap_or(0);
        let limit = self.limit.unwrap_or(50).clamp(1, MAX_PAGE);
        let total = items.len();
        let page: Vec<T> = items.into_iter().skip(offset).take(limit).collect();
        let next = (offset + limit < total).then_some(offset + limit);
        (page, next)
    }
}

/// A conversation in a list.
#[derive(Serialize, ToSchema)]
struct ConversationSummary {
    id: i64,
    title: String,
    model: String,
    /// Unix milliseconds.
    created_at: i64,
    /// Unix milliseconds of the last message.
    updated_at: i64,
}

/// A page of conversations, most recently updated first.
#[derive(Serialize, ToSchema)]
struct ConversationPage {
    items: Vec<ConversationSummary>,
    next_offset: Option<usize>,
    /// Rows that did not decrypt (named, not shown).
    damaged: Vec<String>,
}

fn memory(state: &AppState) -> Result<std::sync::Arc<crate::turn::NodeMemory>, ApiError> {
    state.node.memory().ok_or_else(|| ApiError::from(NodeError::NoMemory))
}

/// Saved conversations.
#[utoipa::path(get, path = "/api/conversations", params(Page), responses((status = 200, body = ConversationPage), (status = 400, body = ErrorBody)))]
async fn list_conversations(
    State(state): State<AppState>,
    Query(page): Query<Page>,
) -> Result<axum::Json<ConversationPage>, ApiError> {
    let memory = memory(&state)?;
    let listing = memory.store.conversations().await.map_err(NodeError::from)?;
    let items = listing
        .items
        .into_iter()
        .map(|c| ConversationSummary {
            id: c.id,
            title: c.meta.title,
            model: c.meta.model,
            created_at: c.created_at,
            updated_at: c.updated_at,
        })
        .collect();
    let (items, next_offset) = page.cut(items);
    Ok(axum::Json(ConversationPage {
        items,
        next_offset,
        damaged: listing.damaged.iter().map(ToString::to_string).collect(),
    }))
}

/// A stored message.
#[derive(Serialize, ToSchema)]
struct MessageView {
    id: i64,
    role: String,
    content: String,
    /// `local`, or the peer that ran a reply.
    ran_on: Option<String>,
    /// The reply was cut short.
    interrupted: bool,
    created_at: i64,
    prompt_tokens: i64,
    output_tokens: i64,
    duration_ms: i64,
}

/// A conversation with its messages.
#[derive(Serialize, ToSchema)]
struct ConversationDetail {
    conversation: ConversationSummary,
    messages: Vec<MessageView>,
    damaged: Vec<String>,
}

/// One conversation and its messages in order.
#[utoipa::path(get, path = "/api/conversations/{id}", params(("id" = i64, Path)), responses((status = 200, body = ConversationDetail), (status = 404, body = ErrorBody)))]
async fn get_conversation(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<axum::Json<ConversationDetail>, ApiError> {
    let memory = memory(&state)?;
    let conversation =
        memory.store.conversation(id).await.map_err(NodeError::from)?.ok_or(NodeError::NoConversation(id))?;
    let messages = memory.store.messages(id).await.map_err(NodeError::from)?;
    Ok(axum::Json(ConversationDetail {
        conversation: ConversationSummary {
            id,
            title: conversation.meta.title,
            model: conversation.meta.model,
            created_at: conversation.created_at,
            updated_at: conversation.updated_at,
        },
        messages: messages
            .items
            .into_iter()
            .map(|m| MessageView {
                id: m.id,
                role: m.body.role,
                content: m.body.content,
                ran_on: m.body.ran_on.map(|r| match r {
                    kith_memory::RanOn::Local => "local".to_owned(),
                    kith_memory::RanOn::Peer(peer) => peer,
                }),
                interrupted: m.body.interrupted,
                created_at: m.created_at,
                prompt_tokens: m.stats.prompt_tokens,
                output_tokens: m.stats.output_tokens,
                duration_ms: m.stats.duration_ms,
            })
            .collect(),
        damaged: messages.damaged.iter().map(ToString::to_string).collect(),
    }))
}

/// `with_memories`.
#[derive(Deserialize, IntoParams)]
struct DeleteOptions {
    /// Also forget the memories that came from this conversation.
    with_memories: Option<bool>,
}

/// What a delete removed.
#[derive(Serialize, ToSchema)]
struct Deleted {
    deleted: bool,
    memories_deleted: u64,
}

/// Deletes a conversation (and, if asked, the memories it produced).
#[utoipa::path(delete, path = "/api/conversations/{id}", params(("id" = i64, Path), DeleteOptions), responses((status = 200, body = Deleted), (status = 404, body = ErrorBody)))]
async fn delete_conversation(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Query(options): Query<DeleteOptions>,
) -> Result<axum::Json<Deleted>, ApiError> {
    let memory = memory(&state)?;
    let memories_deleted = if options.with_memories.unwrap_or(false) {
        memory.store.forget_conversation_memories(id).await.map_err(NodeError::from)?
    } else {
        0
    };
    if !memory.store.delete_conversation(id).await.map_err(NodeError::from)? {
        return Err(NodeError::NoConversation(id).into());
    }
    let mut index = memory.index.lock().await;
    index.remove_conversation(id);
    if memories_deleted > 0 {
        // Rebuild the memory side of the index from what remains.
        let remaining = memory.store.recall_items().await.map_err(NodeError::from)?;
        *index = kith_memory::RecallIndex::build(remaining.items);
    }
    Ok(axum::Json(Deleted { deleted: true, memories_deleted }))
}

/// A memory.
#[derive(Serialize, ToSchema)]
struct MemoryView {
    id: i64,
    text: String,
    pinned: bool,
    created_at: i64,
    source_message_id: Option<i64>,
}

/// A page of memories, oldest first.
#[derive(Serialize, ToSchema)]
struct MemoryPage {
    items: Vec<MemoryView>,
    next_offset: Option<usize>,
    damaged: Vec<String>,
}

/// Long-term memories.
#[utoipa::path(get, path = "/api/memories", params(Page), responses((status = 200, body = MemoryPage)))]
async fn list_memories(
    State(state): State<AppState>,
    Query(page): Query<Page>,
) -> Result<axum::Json<MemoryPage>, ApiError> {
    let memory = memory(&state)?;
    let listing = memory.store.memories().await.map_err(NodeError::from)?;
    let items = listing
        .items
        .into_iter()
        .map(|m| MemoryView {
            id: m.id,
            text: m.text,
            pinned: m.pinned,
            created_at: m.created_at,
            source_message_id: m.source_message_id,
        })
        .collect();
    let (items, next_offset) = page.cut(items);
    Ok(axum::Json(MemoryPage {
        items,
        next_offset,
        damaged: listing.damaged.iter().map(ToString::to_string).collect(),
    }))
}

/// A memory to save.
#[derive(Deserialize, ToSchema)]
struct NewMemory {
    text: String,
    #[serde(default)]
    pinned: bool,
}

/// Saves a memory (embedded for recall when the embedding model is loaded).
#[utoipa::path(post, path = "/api/memories", request_body = NewMemory, responses((status = 201, body = MemoryView), (status = 400, body = ErrorBody)))]
async fn add_memory(State(state): State<AppState>, JsonBody(new): JsonBody<NewMemory>) -> Result<Response, ApiError> {
    let memory = memory(&state)?;
    let text = new.text.trim().to_owned();
    if text.is_empty() {
        return Err(ApiError::invalid("text", "a memory needs some text"));
    }
    let id = memory.store.add_memory(&text, None, new.pinned).await.map_err(NodeError::from)?;
    let vector =
        if state.node.embedding_model().is_some() { state.node.embed(vec![text.clone()]).await?.pop() } else { None };
    let item = ItemRef { kind: ItemKind::Memory, id };
    if let Some(vector) = &vector {
        memory.store.set_embedding(item, vector).await.map_err(NodeError::from)?;
    }
    let created_at =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    memory.index.lock().await.insert(RecallItem {
        item,
        conversation_id: None,
        created_at,
        role: None,
        text: text.clone(),
        embedding: vector.as_deref().map(QuantizedVector::quantize),
    });
    let view = MemoryView { id, text, pinned: new.pinned, created_at, source_message_id: None };
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

/// Forgets a memory.
#[utoipa::path(delete, path = "/api/memories/{id}", params(("id" = i64, Path)), responses((status = 200, body = Deleted), (status = 404, body = ErrorBody)))]
async fn forget_memory(State(state): State<AppState>, Path(id): Path<i64>) -> Result<axum::Json<Deleted>, ApiError> {
    let memory = memory(&state)?;
    if !memory.store.forget_memory(id).await.map_err(NodeError::from)? {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("no memory {id}")));
    }
    memory.index.lock().await.remove(ItemRef { kind: ItemKind::Memory, id });
    Ok(axum::Json(Deleted { deleted: true, memories_deleted: 1 }))
}

/// `q` and `k`.
#[derive(Deserialize, IntoParams)]
struct SearchQuery {
    /// What to look for.
    q: String,
    /// How many results (default 10, at most 100).
    k: Option<usize>,
}

/// A recalled memory or message.
#[derive(Serialize, ToSchema)]
struct SearchHit {
    /// `memory` or `message`.
    kind: String,
    id: i64,
    conversation_id: Option<i64>,
    role: Option<String>,
    text: String,
    /// 0..1: 0.7 × meaning + 0.3 × words (words only without the embedding model).
    score: f32,
    semantic: Option<f32>,
    keyword: f32,
}

/// Searches memories and messages by meaning and by words.
#[utoipa::path(get, path = "/api/memories/search", params(SearchQuery), responses((status = 200, body = [SearchHit])))]
async fn search_memories(
    State(state): State<AppState>,
    Query(query): Query<SearchQuery>,
) -> Result<axum::Json<Vec<SearchHit>>, ApiError> {
    let memory = memory(&state)?;
    let k = query.k.unwrap_or(10).clamp(1, 100);
    let vector = if state.node.embedding_model().is_some() {
        state.node.embed(vec![query.q.clone()]).await?.pop()
    } else {
        None
    };
    let hits = memory.index.lock().await.recall(&query.q, vector.as_deref(), k);
    Ok(axum::Json(
        hits.iter()
            .map(|h| SearchHit {
                kind: h.item.kind.as_str().to_owned(),
                id: h.item.id,
                conversation_id: h.conversation_id,
                role: h.role.clone(),
                text: h.text.clone(),
                score: h.score,
                semantic: h.semantic,
                keyword: h.keyword,
            })
            .collect(),
    ))
}
