//! The native API under `/api/`, for the desktop app and scripts: node status,
//! conversations (with their privacy mode), memories, memory search, the review queue of
//! suggested memories, models (list, pull with streamed progress, remove) and the mesh's
//! peers (`/api/peers`: invite, accept, list, set, remove, usage), described
//! at `/api/openapi.json`.
//!
//! Lists are paginated with `offset` and `limit` (at most 500) and return `next_offset`
//! while more remain. Ids are the vault's row ids: stable for the life of a row.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kith_types::Privacy;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::api::{ApiError, AppState, JsonBody};
use crate::node::NodeError;

const MAX_PAGE: usize = 500;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/status", get(status))
        .route("/api/conversations", get(list_conversations))
        .route("/api/conversations/{id}", get(get_conversation).delete(delete_conversation).patch(update_conversation))
        .route("/api/memories", get(list_memories).post(add_memory))
        .route("/api/memories/search", get(search_memories))
        .route("/api/memories/review", get(review_queue))
        .route("/api/memories/review/{id}", axum::routing::post(review))
        .route("/api/memories/{id}", axum::routing::delete(forget_memory))
        .route("/api/models", get(list_models))
        .route("/api/models/pull", axum::routing::post(pull_model))
        .route("/api/models/{name}", axum::routing::delete(remove_model))
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
        update_conversation,
        list_memories,
        add_memory,
        search_memories,
        forget_memory,
        review_queue,
        review,
        list_models,
        pull_model,
        remove_model,
        crate::peers::list_peers,
        crate::peers::invite,
        crate::peers::accept,
        crate::peers::update_peer,
        crate::peers::remove_peer,
        crate::peers::usage
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
        ConversationUpdate,
        CandidateView,
        CandidatePage,
        ReviewDecision,
        Reviewed,
        crate::models::ModelListing,
        crate::models::PullUpdate,
        PullRequest,
        Removed,
        crate::peers::MeshIdentity,
        crate::peers::Offer,
        crate::peers::PeerItem,
        crate::peers::PeerList,
        crate::peers::InviteRequest,
        crate::peers::InviteView,
        crate::peers::AcceptRequest,
        crate::peers::PeerUpdate,
        crate::peers::RemovedPeer,
        crate::peers::UsageDay,
        crate::peers::PeerUsage,
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
pub(crate) struct ErrorBody {
    error: ErrorDetail,
}

/// The error itself.
#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorDetail {
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
    /// `cpu`, `cuda` or `metal`.
    device: String,
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
                device: m.device,
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
    /// `local-only` or `friends-allowed`.
    privacy: String,
}

impl From<kith_memory::Conversation> for ConversationSummary {
    fn from(c: kith_memory::Conversation) -> Self {
        Self {
            id: c.id,
            title: c.meta.title,
            model: c.meta.model,
            created_at: c.created_at,
            updated_at: c.updated_at,
            privacy: c.meta.privacy.as_str().to_owned(),
        }
    }
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
    let items = listing.items.into_iter().map(ConversationSummary::from).collect();
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
    /// Memories that came from its messages (a UI offers to forget them with it).
    memory_ids: Vec<i64>,
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
    let memory_ids = memory.store.conversation_memories(id).await.map_err(NodeError::from)?;
    Ok(axum::Json(ConversationDetail {
        conversation: conversation.into(),
        memory_ids,
        messages: messages
            .items
            .into_iter()
            .map(|m| MessageView {
                id: m.id,
                role: m.body.role,
                content: m.body.content,
                ran_on: m.body.ran_on.map(|r| r.to_string()),
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
    let memories_deleted = state.node.delete_conversation(id, options.with_memories.unwrap_or(false)).await?;
    Ok(axum::Json(Deleted { deleted: true, memories_deleted }))
}

/// What to change in a conversation.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ConversationUpdate {
    /// `local-only` (every turn stays on this machine) or `friends-allowed`.
    #[schema(value_type = String)]
    privacy: Privacy,
}

/// Changes a conversation's privacy mode; takes effect from its next turn.
#[utoipa::path(patch, path = "/api/conversations/{id}", params(("id" = i64, Path)), request_body = ConversationUpdate, responses((status = 200, body = ConversationSummary), (status = 404, body = ErrorBody)))]
async fn update_conversation(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    JsonBody(update): JsonBody<ConversationUpdate>,
) -> Result<axum::Json<ConversationSummary>, ApiError> {
    state.node.set_privacy(id, update.privacy).await?;
    let memory = memory(&state)?;
    let conversation =
        memory.store.conversation(id).await.map_err(NodeError::from)?.ok_or(NodeError::NoConversation(id))?;
    Ok(axum::Json(conversation.into()))
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
    let saved = state.node.add_memory(&new.text, new.pinned).await?;
    let view = MemoryView {
        id: saved.id,
        text: new.text.trim().to_owned(),
        pinned: new.pinned,
        created_at: saved.created_at,
        source_message_id: None,
    };
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

/// Forgets a memory.
#[utoipa::path(delete, path = "/api/memories/{id}", params(("id" = i64, Path)), responses((status = 200, body = Deleted), (status = 404, body = ErrorBody)))]
async fn forget_memory(State(state): State<AppState>, Path(id): Path<i64>) -> Result<axum::Json<Deleted>, ApiError> {
    state.node.forget_memory(id).await?;
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

/// A suggested memory waiting for review.
#[derive(Serialize, ToSchema)]
struct CandidateView {
    /// The suggestion's id (not a memory id).
    id: i64,
    text: String,
    created_at: i64,
    /// The message it was found in.
    source_message_id: Option<i64>,
}

/// A page of suggestions, oldest first.
#[derive(Serialize, ToSchema)]
struct CandidatePage {
    items: Vec<CandidateView>,
    next_offset: Option<usize>,
    damaged: Vec<String>,
}

/// Memories the node suggested after chat turns, waiting for the user to keep, edit or
/// discard them (never recalled before that).
#[utoipa::path(get, path = "/api/memories/review", params(Page), responses((status = 200, body = CandidatePage)))]
async fn review_queue(
    State(state): State<AppState>,
    Query(page): Query<Page>,
) -> Result<axum::Json<CandidatePage>, ApiError> {
    let listing = state.node.review_queue().await?;
    let items = listing
        .items
        .into_iter()
        .map(|c| CandidateView {
            id: c.id,
            text: c.text,
            created_at: c.created_at,
            source_message_id: c.source_message_id,
        })
        .collect();
    let (items, next_offset) = page.cut(items);
    Ok(axum::Json(CandidatePage {
        items,
        next_offset,
        damaged: listing.damaged.iter().map(ToString::to_string).collect(),
    }))
}

/// The decision on a suggestion.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ReviewDecision {
    /// `keep`, `edit` (with `text`) or `discard`.
    action: String,
    /// The memory's text for `edit`.
    text: Option<String>,
}

/// What a review did.
#[derive(Serialize, ToSchema)]
struct Reviewed {
    /// The memory kept, or none when discarded.
    memory_id: Option<i64>,
}

/// Keeps (as suggested or edited) or discards a suggested memory.
#[utoipa::path(post, path = "/api/memories/review/{id}", params(("id" = i64, Path)), request_body = ReviewDecision, responses((status = 200, body = Reviewed), (status = 404, body = ErrorBody), (status = 400, body = ErrorBody)))]
async fn review(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    JsonBody(decision): JsonBody<ReviewDecision>,
) -> Result<axum::Json<Reviewed>, ApiError> {
    let decision = match (decision.action.as_str(), decision.text) {
        ("keep", None) => crate::Review::Keep,
        ("edit", Some(text)) => crate::Review::Edit(text),
        ("discard", None) => crate::Review::Discard,
        ("edit", None) => return Err(ApiError::invalid("text", "`edit` needs the memory's new `text`")),
        ("keep" | "discard", Some(_)) => {
            return Err(ApiError::invalid("text", "`text` goes only with `edit`"));
        }
        _ => return Err(ApiError::invalid("action", "action must be keep, edit or discard")),
    };
    let kept = state.node.review(id, decision).await?;
    Ok(axum::Json(Reviewed { memory_id: kept.map(|m| m.id) }))
}

/// The model catalog with what is installed, loaded and being pulled.
#[utoipa::path(get, path = "/api/models", responses((status = 200, body = [crate::models::ModelListing])))]
async fn list_models(State(state): State<AppState>) -> Result<axum::Json<Vec<crate::models::ModelListing>>, ApiError> {
    Ok(axum::Json(state.node.models()?))
}

/// A model to pull.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PullRequest {
    /// Catalog name.
    name: String,
}

/// Pulls a catalog model: a stream of server-sent events, each a JSON `PullUpdate`
/// (`source`, `downloading`, `file`, `progress` {done, total}, `file_done`), ending with
/// `done` or `failed`. The pull goes on if the client disconnects.
#[utoipa::path(post, path = "/api/models/pull", request_body = PullRequest, responses((status = 200, description = "text/event-stream of PullUpdate", body = crate::models::PullUpdate), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn pull_model(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<PullRequest>,
) -> Result<Response, ApiError> {
    let updates = state.node.pull_model(&request.name)?;
    let events = futures_util::stream::unfold(updates, |mut updates| async move {
        let update = updates.recv().await?;
        let event = Event::default().json_data(&update).unwrap_or_else(|_| Event::default().data("{}"));
        Some((Ok::<_, std::convert::Infallible>(event), updates))
    });
    Ok(Sse::new(events).into_response())
}

/// What a removal did.
#[derive(Serialize, ToSchema)]
struct Removed {
    /// Whether files were there to delete.
    removed: bool,
}

/// Deletes an installed model's files (refused while it is loaded or being pulled).
#[utoipa::path(delete, path = "/api/models/{name}", params(("name" = String, Path)), responses((status = 200, body = Removed), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn remove_model(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<axum::Json<Removed>, ApiError> {
    Ok(axum::Json(Removed { removed: state.node.remove_model(&name)? }))
}
