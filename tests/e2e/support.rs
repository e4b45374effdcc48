//! A node on a loopback port, and an HTTP client that speaks to it.

use std::net::SocketAddr;
use std::path::PathBuf;

use kith_infer::{Embedder, LoadOptions, LoadedModel};
use kith_node::api::{self, ApiConfig};
use kith_node::{ApiToken, Node, NodeBuilder};

/// A pulled catalog model's first file; panics with the pull command when missing.
pub(crate) fn model_path(name: &str) -> PathBuf {
    let catalog = kith_models::Catalog::builtin().expect("catalog");
    let store = kith_models::Store::from_env().expect("model store");
    let entry = catalog.get(name).expect("catalog entry");
    store
        .installed_path(entry)
        .unwrap_or_else(|| panic!("{name} is not pulled; run `cargo run -p kith-cli -- models pull {name}`"))
}

pub(crate) fn load_smollm() -> LoadedModel {
    LoadedModel::load(&model_path("smollm2-135m"), &LoadOptions::default()).expect("SmolLM2 loads")
}

/// A running node and what a client needs to reach it.
pub(crate) struct TestNode {
    pub(crate) node: Node,
    pub(crate) address: SocketAddr,
    pub(crate) token: String,
    pub(crate) client: reqwest::Client,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// The passphrase of test vaults.
pub(crate) const PASSPHRASE: &str = "e2e secret";

/// Opens (creating on first use) the vault and memory store in `dir`.
pub(crate) async fn open_store(dir: &std::path::Path) -> kith_memory::MemoryStore {
    use kith_memory::secrecy::SecretString;
    let vault = kith_memory::Vault::new(dir).with_work_factor(4);
    let passphrase = SecretString::from(PASSPHRASE.to_owned());
    let key = if vault.exists() { vault.unlock(&passphrase) } else { vault.init(&passphrase, &[]) }.expect("vault");
    kith_memory::MemoryStore::open(dir, &key).await.expect("store")
}

impl TestNode {
    /// SmolLM2 and MiniLM behind the API, with a queue of `queue` per model.
    pub(crate) async fn start(queue: usize, config: ApiConfig) -> Self {
        Self::start_with(queue, config, false).await
    }

    /// As `start`, with a vault in the node's data directory when `memory`.
    pub(crate) async fn start_with(queue: usize, config: ApiConfig, memory: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = ApiToken::load_or_create(dir.path()).expect("token");
        let minilm = model_path("minilm-l6");
        let embedder = Embedder::load(minilm.parent().expect("dir")).expect("MiniLM loads");
        let mut builder = NodeBuilder::new()
            .model("smollm2-135m", load_smollm())
            .embedder("minilm-l6", embedder)
            .queue_per_model(queue);
        if memory {
            let store = open_store(dir.path()).await;
            let items = store.recall_items().await.expect("recall items");
            builder = builder.memory(store, kith_memory::RecallIndex::build(items.items));
        }
        let node = builder.build().expect("node starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let router = api::router(node.clone(), token.clone(), config);
        let stopping = node.clone();
        let server = tokio::spawn(api::serve(listener, router, async move { stopping.stopping().await }));
        Self { node, address, token: token.as_str().to_owned(), client: reqwest::Client::new(), dir, server }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub(crate) fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path)).bearer_auth(&self.token)
    }

    /// Shuts the node down and waits for the server to stop; returns the data directory
    /// (deleted when dropped).
    pub(crate) async fn stop(self) -> tempfile::TempDir {
        self.node.clone().shutdown().await;
        self.server.await.expect("server task").expect("server ran");
        self.dir
    }
}

/// One parsed SSE stream: the JSON of each `data:` event, and whether `[DONE]` ended it.
#[derive(Debug)]
pub(crate) struct Sse {
    pub(crate) chunks: Vec<serde_json::Value>,
    pub(crate) done: bool,
}

impl Sse {
    /// Parses a whole `text/event-stream` body strictly: every event is `data: ...`
    /// followed by a blank line, and nothing follows `[DONE]`.
    pub(crate) fn parse(body: &str) -> Self {
        let mut chunks = Vec::new();
        let mut done = false;
        assert!(body.ends_with("\n\n"), "the stream ends with a complete event: {body:?}");
        for event in body.split("\n\n").filter(|e| !e.is_empty()) {
            assert!(!done, "nothing may follow [DONE]: {event:?}");
            let data = event.strip_prefix("data: ").unwrap_or_else(|| panic!("not a data event: {event:?}"));
            assert!(!data.contains('\n'), "one line per event: {event:?}");
            if data == "[DONE]" {
                done = true;
            } else {
                chunks.push(serde_json::from_str(data).unwrap_or_else(|e| panic!("{data:?}: {e}")));
            }
        }
        Self { chunks, done }
    }

    /// The concatenated `delta.content` of every chunk.
    pub(crate) fn text(&self) -> String {
        self.chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect()
    }

    /// The last non-null finish reason.
    pub(crate) fn finish_reason(&self) -> Option<String> {
        self.chunks.iter().rev().find_map(|c| c["choices"][0]["finish_reason"].as_str()).map(str::to_owned)
    }
}
