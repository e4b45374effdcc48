//! Talking to a running node (`kith serve`, later the desktop app) over its local API,
//! the way the `ollama` CLI talks to its server: found through `node.json` in the data
//! directory, authenticated with the API token. With no node answering, commands work
//! in-process as before; `--no-node` (KITH_NO_NODE=1) forces that.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use kith_node::NodeFile;
use serde_json::Value;

static IN_PROCESS: AtomicBool = AtomicBool::new(false);

/// Never use a running node (`--no-node`).
pub(crate) fn force_in_process() {
    IN_PROCESS.store(true, Ordering::Relaxed);
}

/// A running node's API.
pub(crate) struct Remote {
    url: String,
    token: String,
    http: reqwest::Client,
    /// `/api/status` as it answered.
    status: Value,
}

/// The running node announced in `home`, if one answers; `None` when there is none (or
/// only a stale announcement).
pub(crate) async fn connect(home: &Path) -> Result<Option<Remote>> {
    if IN_PROCESS.load(Ordering::Relaxed) {
        return Ok(None);
    }
    let Some(file) = NodeFile::read(home) else { return Ok(None) };
    let token = match std::fs::read_to_string(kith_node::ApiToken::path(home)) {
        Ok(token) => token.trim().to_owned(),
        Err(err) => {
            tracing::warn!(error = %err, "a node is announced but its token is unreadable; working in-process");
            return Ok(None);
        }
    };
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .no_proxy()
        .build()
        .context("building the HTTP client")?;
    let mut remote = Remote { url: file.url, token, http, status: Value::Null };
    match remote.http.get(format!("{}/api/status", remote.url)).bearer_auth(&remote.token).send().await {
        Ok(response) => {
            remote.status = remote.json(response).await.context("asking the running node for its status")?;
            tracing::info!(url = %remote.url, "using the running node");
            Ok(Some(remote))
        }
        Err(err) => {
            tracing::debug!(error = %err, url = %remote.url, "the announced node does not answer; working in-process");
            Ok(None)
        }
    }
}

impl Remote {
    /// Where it listens.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Whether it has an unlocked vault.
    pub(crate) fn has_memory(&self) -> bool {
        self.status["memory"].as_bool().unwrap_or(false)
    }

    /// The chat models it has loaded.
    pub(crate) fn chat_models(&self) -> Vec<String> {
        self.status["models"]
            .as_array()
            .map(|models| {
                models
                    .iter()
                    .filter(|m| !m["embedding"].as_bool().unwrap_or(false))
                    .filter_map(|m| m["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether a friend of the node offers `model` (the node then offloads to them).
    pub(crate) async fn friend_offers(&self, model: &str) -> bool {
        let Ok(list) = self.get("/api/peers").await else { return false };
        list["peers"].as_array().into_iter().flatten().any(|peer| {
            peer["offload_to"].as_bool().unwrap_or(false)
                && peer["offers"].as_array().into_iter().flatten().any(|o| o["model"].as_str() == Some(model))
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.url)).bearer_auth(&self.token)
    }

    /// A JSON answer, or the node's error message.
    async fn json(&self, response: reqwest::Response) -> Result<Value> {
        let status = response.status();
        let body: Value = response.json().await.with_context(|| format!("reading the node's answer ({status})"))?;
        if !status.is_success() {
            let message = body["error"]["message"].as_str().unwrap_or("no message");
            bail!("{message} (node at {}: {status})", self.url);
        }
        Ok(body)
    }

    pub(crate) async fn get(&self, path: &str) -> Result<Value> {
        let response = self.request(reqwest::Method::GET, path).send().await.context("calling the running node")?;
        self.json(response).await
    }

    pub(crate) async fn send(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.context("calling the running node")?;
        self.json(response).await
    }

    /// Every item of a paginated list.
    pub(crate) async fn all_pages(&self, path: &str) -> Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut offset = 0;
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let page = self.get(&format!("{path}{sep}offset={offset}&limit=500")).await?;
            for damaged in page["damaged"].as_array().into_iter().flatten() {
                eprintln!("warning: {}", damaged.as_str().unwrap_or_default());
            }
            items.extend(page["items"].as_array().cloned().unwrap_or_default());
            match page["next_offset"].as_u64() {
                Some(next) => offset = next,
                None => return Ok(items),
            }
        }
    }

    /// Server-sent events of a POST, as JSON values (ends at `[DONE]` or the stream's end).
    pub(crate) async fn events(&self, path: &str, body: &Value) -> Result<Events> {
        let response =
            self.request(reqwest::Method::POST, path).json(body).send().await.context("calling the running node")?;
        if !response.status().is_success() {
            self.json(response).await?;
            bail!("the node refused the request");
        }
        Ok(Events {
            stream: Box::pin(response.bytes_stream().map(|chunk| chunk.map(|b| b.to_vec()))),
            buffer: Vec::new(),
        })
    }
}

type ByteStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Vec<u8>>> + Send>>;

/// An SSE stream being read.
pub(crate) struct Events {
    stream: ByteStream,
    buffer: Vec<u8>,
}

impl Events {
    /// The next event's data as JSON; `None` at `[DONE]` or the end.
    pub(crate) async fn next(&mut self) -> Result<Option<Value>> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&frame);
                let data: String = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect::<Vec<_>>()
                    .join("\n");
                if data.is_empty() {
                    continue; // a comment or keep-alive
                }
                if data == "[DONE]" {
                    return Ok(None);
                }
                return serde_json::from_str(&data).map(Some).context("reading an event from the node");
            }
            match self.stream.next().await {
                Some(chunk) => self.buffer.extend_from_slice(&chunk.context("reading the node's stream")?),
                None => return Ok(None),
            }
        }
    }
}
