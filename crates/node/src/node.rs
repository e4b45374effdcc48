//! The node: models behind bounded queues, the embedder, and ordered shutdown.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kith_infer::{Embedder, EngineHandle, GenerateError, GenerateRequest, LoadedModel, TokenStream};
use kith_types::Privacy;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// Requests that may wait or run on one model at a time, by default.
pub const DEFAULT_QUEUE_PER_MODEL: usize = 16;

/// Why the node refused or failed a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// No loaded model has this name.
    #[error("model {name:?} is not loaded here (loaded: {loaded})")]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// The names that are loaded.
        loaded: String,
    },
    /// The model's queue is full; try again later.
    #[error("model {0:?} is busy: its queue is full, try again shortly")]
    Busy(String),
    /// The node is shutting down.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// No embedding model is loaded.
    #[error("no embedding model is loaded (kith models pull minilm-l6)")]
    NoEmbedder,
    /// Generation failed.
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// Embedding failed.
    #[error(transparent)]
    Embed(#[from] kith_infer::EmbedError),
    /// The node has no unlocked vault.
    #[error("this node has no memory (no vault was unlocked when it started)")]
    NoMemory,
    /// No such conversation.
    #[error("no conversation {0}")]
    NoConversation(i64),
    /// The memory store failed.
    #[error(transparent)]
    Store(#[from] kith_memory::StoreError),
    /// The model is not on this machine and the conversation may not leave it.
    #[error("model {model:?} is not on this machine, and this conversation is local-only")]
    LocalOnly {
        /// The model asked for.
        model: String,
    },
    /// No memory suggestion has this id.
    #[error("no memory suggestion {0} waiting for review")]
    NoCandidate(i64),
    /// A memory must have some text.
    #[error("a memory needs some text")]
    EmptyMemory,
    /// No memory has this id.
    #[error("no memory {0}")]
    NoMemoryItem(i64),
    /// The catalog has no model by this name.
    #[error("unknown model {name:?}; known models: {known}")]
    NotInCatalog {
        /// The name asked for.
        name: String,
        /// The catalog's names.
        known: String,
    },
    /// The model is loaded (or being pulled) and cannot be removed now.
    #[error("model {0:?} is in use by this node")]
    ModelInUse(String),
    /// The model is being pulled already.
    #[error("model {0:?} is being pulled already")]
    PullInProgress(String),
    /// This node has no model directory.
    #[error("this node manages no model directory")]
    NoModelStore,
    /// The built-in catalog did not load.
    #[error(transparent)]
    Catalog(#[from] kith_models::CatalogError),
    /// A pull or remove failed.
    #[error(transparent)]
    Models(#[from] kith_models::PullError),
    /// This node is not on a mesh.
    #[error("this node has no mesh (start it with kith serve and a vault)")]
    NoMesh,
    /// The mesh identity or trust list saved in the vault is damaged.
    #[error("the mesh state in the vault is damaged: {0}")]
    MeshState(String),
    /// A mesh operation failed.
    #[error(transparent)]
    Mesh(#[from] kith_mesh::MeshError),
    /// An engine thread could not start.
    #[error("starting the engine for {name}: {source}")]
    Spawn {
        /// The model.
        name: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Where a request runs, decided per request by [`Node::route`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Route {
    /// On this machine's engine.
    Local,
    /// On a trusted friend's node.
    Peer {
        /// The friend's peer id.
        peer: kith_mesh::PeerId,
        /// Their name on this node's trust list.
        name: String,
    },
}

impl Route {
    /// `local`, or the friend's name.
    pub fn as_str(&self) -> &str {
        match self {
            Route::Local => "local",
            Route::Peer { name, .. } => name,
        }
    }
}

/// When a request for a model loaded here may still run on a friend's node (only ever
/// under `friends-allowed`). A model not loaded here goes to a friend under either.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Offload {
    /// Only models not loaded here go to friends.
    #[default]
    WhenMissing,
    /// Also when a friend offering the model has nothing queued and advertises at least
    /// [`FASTER`] times this node's measured decode speed for it, or when this node's
    /// queue for it is full.
    WhenFaster,
}

/// How much faster a friend must be for [`Offload::WhenFaster`] to prefer it.
pub const FASTER: f64 = 1.5;

impl Offload {
    /// `when-missing` or `when-faster`.
    pub fn as_str(self) -> &'static str {
        match self {
            Offload::WhenMissing => "when-missing",
            Offload::WhenFaster => "when-faster",
        }
    }

    /// Whether a model loaded here goes to `friend` instead: `local_speed` is this node's
    /// measured decode speed for it (0 before it has run), `local_full` whether its queue
    /// here is full.
    pub fn prefers(self, friend: &kith_mesh::Candidate, local_speed: f64, local_full: bool) -> bool {
        self == Offload::WhenFaster
            && friend.queued == 0
            && (local_full || (local_speed > 0.0 && friend.tokens_per_s >= FASTER * local_speed))
    }
}

impl std::fmt::Display for Offload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Offload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "when-missing" => Ok(Offload::WhenMissing),
            "when-faster" => Ok(Offload::WhenFaster),
            other => Err(format!("unknown offload policy {other:?} (when-missing or when-faster)")),
        }
    }
}

/// Assembles a [`Node`].
pub struct NodeBuilder {
    models: Vec<(String, LoadedModel)>,
    embedder: Option<(String, Embedder)>,
    memory: Option<(kith_memory::MemoryStore, kith_memory::RecallIndex)>,
    queue_per_model: usize,
    privacy: Privacy,
    offload: Offload,
    model_store: Option<(kith_models::Store, kith_models::PullOptions)>,
}

impl Default for NodeBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeBuilder {
    /// An empty node.
    pub fn new() -> Self {
        Self {
            models: Vec::new(),
            embedder: None,
            memory: None,
            queue_per_model: DEFAULT_QUEUE_PER_MODEL,
            privacy: Privacy::default(),
            offload: Offload::default(),
            model_store: None,
        }
    }

    /// Serves `model` under `name`; the first model added is the default.
    pub fn model(mut self, name: impl Into<String>, model: LoadedModel) -> Self {
        self.models.push((name.into(), model));
        self
    }

    /// Serves embeddings with `embedder` under `name`.
    pub fn embedder(mut self, name: impl Into<String>, embedder: Embedder) -> Self {
        self.embedder = Some((name.into(), embedder));
        self
    }

    /// Serves chat turns with this unlocked store and its recall index.
    pub fn memory(mut self, store: kith_memory::MemoryStore, index: kith_memory::RecallIndex) -> Self {
        self.memory = Some((store, index));
        self
    }

    /// How many requests may run or wait on one model before more are refused as busy.
    pub fn queue_per_model(mut self, requests: usize) -> Self {
        self.queue_per_model = requests.max(1);
        self
    }

    /// The privacy mode of new conversations and of requests that name none.
    pub fn privacy(mut self, privacy: Privacy) -> Self {
        self.privacy = privacy;
        self
    }

    /// When a model loaded here may still run on a friend's node.
    pub fn offload(mut self, offload: Offload) -> Self {
        self.offload = offload;
        self
    }

    /// Lists, pulls and removes models in this directory (the native API's `/api/models`).
    pub fn model_store(mut self, store: kith_models::Store, options: kith_models::PullOptions) -> Self {
        self.model_store = Some((store, options));
        self
    }

    /// Starts one engine thread per model.
    pub fn build(self) -> Result<Node, NodeError> {
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut models = Vec::with_capacity(self.models.len());
        for (name, model) in self.models {
            let engine =
                EngineHandle::spawn(model).map_err(|source| NodeError::Spawn { name: name.clone(), source })?;
            tracing::info!(model = %name, "engine started");
            models.push(ModelSlot {
                name,
                info: engine.info().clone(),
                engine: std::sync::Mutex::new(Some(engine)),
                queue: Arc::new(Semaphore::new(self.queue_per_model)),
                friends: Arc::new(Semaphore::new(self.queue_per_model)),
                created,
            });
        }
        let (stopping, _) = watch::channel(false);
        Ok(Node {
            inner: Arc::new(Inner {
                models,
                embedder: self.embedder.map(|(name, e)| (name, Arc::new(e))),
                memory: std::sync::Mutex::new(self.memory.map(|(store, index)| {
                    Arc::new(crate::turn::NodeMemory { store, index: tokio::sync::Mutex::new(index) })
                })),
                queue_per_model: self.queue_per_model,
                privacy: self.privacy,
                offload: self.offload,
                model_store: self.model_store,
                pulling: std::sync::Mutex::new(std::collections::HashSet::new()),
                started: Instant::now(),
                stopping,
                mesh: std::sync::OnceLock::new(),
            }),
        })
    }
}

struct ModelSlot {
    name: String,
    /// Taken out at shutdown, so that the last sender to the engine thread goes away.
    engine: std::sync::Mutex<Option<EngineHandle>>,
    info: kith_infer::ModelInfo,
    queue: Arc<Semaphore>,
    /// Places for friends' requests, apart from the owner's: friends never fill the
    /// owner's queue, and their generations yield to the owner's between two layers.
    friends: Arc<Semaphore>,
    created: u64,
}

impl ModelSlot {
    fn engine(&self) -> Option<EngineHandle> {
        self.engine.lock().ok().and_then(|engine| engine.clone())
    }
}

pub(crate) struct Inner {
    models: Vec<ModelSlot>,
    embedder: Option<(String, Arc<Embedder>)>,
    /// Taken out (and closed) at shutdown.
    memory: std::sync::Mutex<Option<Arc<crate::turn::NodeMemory>>>,
    queue_per_model: usize,
    /// For new conversations and requests that name none.
    privacy: Privacy,
    offload: Offload,
    pub(crate) model_store: Option<(kith_models::Store, kith_models::PullOptions)>,
    /// Models being pulled now.
    pub(crate) pulling: std::sync::Mutex<std::collections::HashSet<String>>,
    started: Instant,
    /// Becomes true when shutdown begins: streams end, new requests are refused.
    stopping: watch::Sender<bool>,
    /// The mesh, once attached.
    mesh: std::sync::OnceLock<kith_mesh::Mesh>,
}

/// The running node; clones share it.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("models", &self.inner.models.len()).finish_non_exhaustive()
    }
}

/// A generation the node accepted: its route and its token stream. Holding it holds a
/// place in the model's queue.
#[derive(Debug)]
pub struct Generation {
    /// Where it runs.
    pub route: Route,
    /// The model's name.
    pub model: String,
    /// The tokens.
    pub stream: TokenStream,
    parts: crate::offload::RanOnParts,
    _place: Option<OwnedSemaphorePermit>,
}

impl Generation {
    pub(crate) fn relayed(route: Route, model: String, stream: TokenStream, parts: crate::offload::RanOnParts) -> Self {
        Self { route, model, stream, parts, _place: None }
    }

    /// Where the parts of the answer ran so far, in order: one name (`local` or a
    /// friend's), or more when a friend failed mid-answer and another part took over.
    pub fn ran_on(&self) -> Vec<String> {
        self.parts.names()
    }

    pub(crate) fn parts(&self) -> crate::offload::RanOnParts {
        self.parts.clone()
    }
}

/// One loaded model, as the API lists it.
#[derive(Debug, Clone)]
pub struct ModelStatus {
    /// The name requests use.
    pub name: String,
    /// Unix seconds since it was loaded.
    pub created: u64,
    /// Context window in tokens.
    pub context_length: usize,
    /// `cpu`, `cuda` or `metal`.
    pub device: String,
    /// Requests running or waiting.
    pub queued: usize,
    /// Whether it is an embedding model.
    pub embedding: bool,
}

/// The node's state, for status pages.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    /// Loaded models, the embedding model last.
    pub models: Vec<ModelStatus>,
    /// Seconds since the node started.
    pub uptime_s: u64,
    /// Whether shutdown has begun.
    pub stopping: bool,
}

impl Node {
    /// The default model's name (the first added), if any.
    pub fn default_model(&self) -> Option<&str> {
        self.inner.models.first().map(|m| m.name.as_str())
    }

    /// The embedding model's name, if one is loaded.
    pub fn embedding_model(&self) -> Option<&str> {
        self.inner.embedder.as_ref().map(|(name, _)| name.as_str())
    }

    /// Models and queues.
    pub fn status(&self) -> NodeStatus {
        let mut models: Vec<ModelStatus> = self
            .inner
            .models
            .iter()
            .map(|m| ModelStatus {
                name: m.name.clone(),
                created: m.created,
                context_length: m.info.context_length,
                device: m.info.device.to_string(),
                queued: 2 * self.inner.queue_per_model - m.queue.available_permits() - m.friends.available_permits(),
                embedding: false,
            })
            .collect();
        if let Some((name, _)) = &self.inner.embedder {
            let created = models.first().map_or(0, |m| m.created);
            models.push(ModelStatus {
                name: name.clone(),
                created,
                context_length: 0,
                device: "cpu".into(),
                queued: 0,
                embedding: true,
            });
        }
        NodeStatus { models, uptime_s: self.inner.started.elapsed().as_secs(), stopping: *self.inner.stopping.borrow() }
    }

    /// The privacy mode of new conversations and of requests that name none.
    pub fn default_privacy(&self) -> Privacy {
        self.inner.privacy
    }

    /// When a model loaded here may still run on a friend's node.
    pub fn offload_policy(&self) -> Offload {
        self.inner.offload
    }

    /// Decides where a request for `model` runs under `privacy`: this machine when the
    /// model is loaded here (unless the [`Offload`] policy prefers a friend); otherwise,
    /// if the privacy mode allows it, the best friend offering it (from their last
    /// adverts); otherwise an error that names the privacy mode when that is what keeps
    /// it here.
    pub fn route(&self, model: &str, privacy: Privacy) -> Result<Route, NodeError> {
        if let Some(slot) = self.inner.models.iter().find(|m| m.name == model) {
            if privacy == Privacy::FriendsAllowed
                && self.inner.offload != Offload::WhenMissing
                && let Some(friend) = self.mesh().and_then(|mesh| mesh.candidates(model).into_iter().next())
            {
                let speed = slot.engine().map_or(0.0, |e| e.decode_speed());
                let full = slot.queue.available_permits() == 0;
                if self.inner.offload.prefers(&friend, speed, full) {
                    tracing::debug!(model, friend = %friend.name, local_speed = speed, local_full = full, "offloading a local model");
                    return Ok(Route::Peer { peer: friend.peer, name: friend.name });
                }
            }
            return Ok(Route::Local);
        }
        match privacy {
            Privacy::LocalOnly => Err(NodeError::LocalOnly { model: model.to_owned() }),
            Privacy::FriendsAllowed => {
                let best = self.mesh().and_then(|mesh| mesh.candidates(model).into_iter().next());
                best.map(|c| Route::Peer { peer: c.peer, name: c.name }).ok_or_else(|| self.unknown_model(model))
            }
        }
    }

    /// [`route`](Self::route), asking friends what they offer first when that is stale
    /// and the model is not here; `peer` forces a friend (by name, peer id or device id).
    pub async fn route_fresh(&self, model: &str, privacy: Privacy, peer: Option<&str>) -> Result<Route, NodeError> {
        if let Some(who) = peer {
            if privacy == Privacy::LocalOnly {
                return Err(NodeError::LocalOnly { model: model.to_owned() });
            }
            let mesh = self.mesh().ok_or(NodeError::NoMesh)?;
            let friend = mesh.find(who)?;
            return Ok(Route::Peer { peer: friend.peer_id, name: friend.name });
        }
        let stale = self.mesh().is_some_and(|m| m.adverts_stale());
        match self.route(model, privacy) {
            Err(NodeError::UnknownModel { .. }) if stale => {
                if let Some(mesh) = self.mesh() {
                    mesh.refresh().await;
                }
                self.route(model, privacy)
            }
            // Full here: a friend may take it under `when-faster`, if it still offers it.
            Ok(Route::Local)
                if stale
                    && privacy == Privacy::FriendsAllowed
                    && self.inner.offload == Offload::WhenFaster
                    && self.inner.models.iter().any(|m| m.name == model && m.queue.available_permits() == 0) =>
            {
                if let Some(mesh) = self.mesh() {
                    mesh.refresh().await;
                }
                self.route(model, privacy)
            }
            other => other,
        }
    }

    pub(crate) fn unknown_model(&self, model: &str) -> NodeError {
        NodeError::UnknownModel {
            name: model.to_owned(),
            loaded: self.inner.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", "),
        }
    }

    /// Whether `model` is loaded here.
    pub fn is_loaded(&self, model: &str) -> bool {
        self.inner.models.iter().any(|m| m.name == model)
            || self.inner.embedder.as_ref().is_some_and(|(name, _)| name == model)
    }

    /// Starts a generation on `model` where [`route`](Self::route) sends it, or refuses at
    /// once when that model's queue is full.
    pub async fn generate(
        &self,
        model: &str,
        request: GenerateRequest,
        privacy: Privacy,
    ) -> Result<Generation, NodeError> {
        self.generate_on(model, request, privacy, None).await
    }

    /// [`generate`](Self::generate), on the friend `peer` if given.
    pub async fn generate_on(
        &self,
        model: &str,
        request: GenerateRequest,
        privacy: Privacy,
        peer: Option<&str>,
    ) -> Result<Generation, NodeError> {
        if *self.inner.stopping.borrow() {
            return Err(NodeError::ShuttingDown);
        }
        let route = self.route_fresh(model, privacy, peer).await?;
        self.generate_routed(model, request, route).await
    }

    /// A generation where `route` says.
    pub(crate) async fn generate_routed(
        &self,
        model: &str,
        request: GenerateRequest,
        route: Route,
    ) -> Result<Generation, NodeError> {
        if *self.inner.stopping.borrow() {
            return Err(NodeError::ShuttingDown);
        }
        match route {
            Route::Local => self.generate_local(model, request).await,
            route => self.offload(model, request, route),
        }
    }

    /// A generation on this machine's engine for `model`.
    pub(crate) async fn generate_local(&self, model: &str, request: GenerateRequest) -> Result<Generation, NodeError> {
        self.generate_in(model, request, false).await
    }

    /// A friend's generation: in the friends' own queue, in the background (the owner's
    /// requests run first, and between its tokens).
    pub(crate) async fn generate_for_friend(
        &self,
        model: &str,
        mut request: GenerateRequest,
    ) -> Result<Generation, NodeError> {
        if *self.inner.stopping.borrow() {
            return Err(NodeError::ShuttingDown);
        }
        request.background = true;
        self.generate_in(model, request, true).await
    }

    async fn generate_in(&self, model: &str, request: GenerateRequest, friend: bool) -> Result<Generation, NodeError> {
        let slot = self.inner.models.iter().find(|m| m.name == model).ok_or_else(|| self.unknown_model(model))?;
        let queue = if friend { &slot.friends } else { &slot.queue };
        let place = queue.clone().try_acquire_owned().map_err(|_| NodeError::Busy(slot.name.clone()))?;
        let engine = slot.engine().ok_or(NodeError::ShuttingDown)?;
        let stream = engine.generate(request).await?;
        Ok(Generation {
            route: Route::Local,
            model: slot.name.clone(),
            stream,
            parts: crate::offload::RanOnParts::one("local"),
            _place: Some(place),
        })
    }

    pub(crate) fn set_mesh(&self, mesh: kith_mesh::Mesh) -> Result<(), kith_mesh::Mesh> {
        self.inner.mesh.set(mesh)
    }

    /// The mesh, if this node joined one.
    pub fn mesh(&self) -> Option<&kith_mesh::Mesh> {
        self.inner.mesh.get()
    }

    pub(crate) fn downgrade(&self) -> std::sync::Weak<Inner> {
        Arc::downgrade(&self.inner)
    }

    pub(crate) fn upgrade(inner: &std::sync::Weak<Inner>) -> Option<Node> {
        inner.upgrade().map(|inner| Node { inner })
    }

    pub(crate) fn model_store(&self) -> Option<&(kith_models::Store, kith_models::PullOptions)> {
        self.inner.model_store.as_ref()
    }

    pub(crate) fn pulling(&self) -> &std::sync::Mutex<std::collections::HashSet<String>> {
        &self.inner.pulling
    }

    pub(crate) fn memory(&self) -> Option<Arc<crate::turn::NodeMemory>> {
        self.inner.memory.lock().ok().and_then(|memory| memory.clone())
    }

    /// Whether the node has an unlocked vault (chat turns with memory).
    pub fn has_memory(&self) -> bool {
        self.memory().is_some()
    }

    /// How many tokens `messages` make as a prompt for `model` (chat template applied).
    pub fn chat_prompt_tokens(&self, model: &str, messages: &[kith_types::ChatMessage]) -> Result<usize, NodeError> {
        let engine = self.engine_handle(model)?;
        let text = engine.chat_template().render(messages, true)?;
        let ids = engine.tokenizer().encode(&text, true, true).map_err(kith_infer::GenerateError::Tokenizer)?;
        Ok(ids.len())
    }

    pub(crate) fn engine_handle(&self, model: &str) -> Result<EngineHandle, NodeError> {
        let slot = self.inner.models.iter().find(|m| m.name == model).ok_or_else(|| self.unknown_model(model))?;
        slot.engine().ok_or(NodeError::ShuttingDown)
    }

    /// Unit-length sentence vectors, computed off the async threads.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, NodeError> {
        if *self.inner.stopping.borrow() {
            return Err(NodeError::ShuttingDown);
        }
        let (_, embedder) = self.inner.embedder.as_ref().ok_or(NodeError::NoEmbedder)?;
        let embedder = embedder.clone();
        match tokio::task::spawn_blocking(move || embedder.embed(&texts)).await {
            Ok(result) => Ok(result?),
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }

    /// Tokens of `text` for the embedding model (usage counts).
    pub fn embedding_tokens(&self, text: &str) -> usize {
        self.inner.embedder.as_ref().and_then(|(_, e)| e.token_ids(text).ok()).map_or(0, |ids| ids.len())
    }

    /// Resolves when shutdown begins (streams use it to end early and cleanly).
    pub async fn stopping(&self) {
        let mut rx = self.inner.stopping.subscribe();
        let _ = rx.wait_for(|stopping| *stopping).await;
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        *self.inner.stopping.borrow()
    }

    /// Begins shutdown: new requests are refused and streams in flight end.
    pub fn begin_shutdown(&self) {
        self.inner.stopping.send_replace(true);
    }

    /// Shuts down in order: refuse new requests, end the streams in flight, then stop
    /// every engine (each finishes what it is computing first).
    pub async fn shutdown(self) {
        self.begin_shutdown();
        if let Some(mesh) = self.mesh() {
            mesh.shutdown();
        }
        for slot in &self.inner.models {
            // Wait until every place in the queues is given back (streams ended).
            let _ = slot.queue.acquire_many(self.inner.queue_per_model as u32).await;
            let _ = slot.friends.acquire_many(self.inner.queue_per_model as u32).await;
            let engine = slot.engine.lock().ok().and_then(|mut engine| engine.take());
            if let Some(engine) = engine {
                engine.shutdown().await;
            }
            tracing::info!(model = %slot.name, "engine stopped");
        }
        // Every exchange is saved (turns hold their queue place until then): close the vault.
        let memory = self.inner.memory.lock().ok().and_then(|mut memory| memory.take());
        if let Some(memory) = memory {
            match Arc::try_unwrap(memory) {
                Ok(memory) => memory.store.close().await,
                Err(_) => tracing::warn!("the memory store is still in use; it closes when released"),
            }
            tracing::info!("vault closed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn friend(tokens_per_s: f64, queued: u32) -> kith_mesh::Candidate {
        kith_mesh::Candidate {
            peer: kith_mesh::PeerId::random(),
            name: "bob".into(),
            tokens_per_s,
            queued,
            rtt: None,
            context_length: 8192,
        }
    }

    #[test]
    fn when_faster_prefers_a_free_friend_that_is_much_faster_or_a_full_queue_here() {
        let faster = Offload::WhenFaster;
        assert!(faster.prefers(&friend(300.0, 0), 100.0, false), "3x faster and idle");
        assert!(faster.prefers(&friend(150.0, 0), 100.0, false), "exactly 1.5x");
        assert!(!faster.prefers(&friend(140.0, 0), 100.0, false), "not fast enough");
        assert!(!faster.prefers(&friend(300.0, 1), 100.0, false), "the friend has a queue");
        assert!(!faster.prefers(&friend(300.0, 0), 0.0, false), "not measured here yet: run here");
        assert!(faster.prefers(&friend(10.0, 0), 100.0, true), "full here: any free friend");
        assert!(!faster.prefers(&friend(10.0, 2), 100.0, true), "full there too");
        for (speed, full) in [(100.0, false), (100.0, true), (0.0, true)] {
            assert!(!Offload::WhenMissing.prefers(&friend(1000.0, 0), speed, full));
        }
        assert_eq!("when-faster".parse::<Offload>(), Ok(Offload::WhenFaster));
        assert!("always".parse::<Offload>().expect_err("unknown").contains("when-missing or when-faster"));
    }
}
