//! The local HTTP API: middleware that every request passes (Host, CORS, token, body
//! size) and the routes.
//!
//! Order of checks, before any handler runs:
//! 1. `Host` must name this machine's loopback (`localhost`, `127.0.0.1`, `[::1]`, any
//!    port): a web page that rebinds its DNS name to 127.0.0.1 still sends its own name
//!    and is refused (403).
//! 2. A browser `Origin`, when present, must be the app's own (`ApiConfig::allowed_origins`);
//!    preflight `OPTIONS` requests for it are answered here (403 for others).
//! 3. `Authorization: Bearer <token>` must carry the node's token (401).
//! 4. Bodies over `max_body_bytes` are refused (413) while being read.
//!
//! Errors are OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`.

use std::future::Future;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use crate::node::{Node, NodeError};
use crate::token::ApiToken;

/// Limits and origins of the API.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: usize,
    /// Largest number of texts in one embeddings request.
    pub max_embedding_inputs: usize,
    /// Browser origins allowed to call the API (the desktop app's own).
    pub allowed_origins: Vec<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_tokens: 4096,
            max_embedding_inputs: 256,
            allowed_origins: vec!["tauri://localhost".into(), "http://tauri.localhost".into()],
        }
    }
}

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) node: Node,
    pub(crate) token: ApiToken,
    pub(crate) config: ApiConfig,
}

/// The API's routes behind its checks.
pub fn router(node: Node, token: ApiToken, config: ApiConfig) -> Router {
    let max_body = config.max_body_bytes;
    let state = AppState { node, token, config };
    Router::new()
        .merge(crate::openai::routes())
        .merge(crate::native::routes())
        .merge(crate::peers::routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "no such endpoint") })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves, then waits for the
/// connections in flight (streams end as the node shuts down).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Token events are small writes: send each at once instead of waiting for an ACK.
    let listener = listener.tap_io(|stream| {
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "TCP_NODELAY not set");
        }
    });
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    if !host_is_loopback(headers) {
        return ApiError::new(StatusCode::FORBIDDEN, "permission_error", "the Host header must be a loopback name")
            .into_response();
    }
    let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()).map(str::to_owned);
    if let Some(origin) = &origin
        && !state.config.allowed_origins.iter().any(|allowed| allowed == origin)
    {
        return ApiError::new(StatusCode::FORBIDDEN, "permission_error", "this origin may not use the API")
            .into_response();
    }
    if request.method() == Method::OPTIONS && origin.is_some() {
        let mut response = StatusCode::NO_CONTENT.into_response();
        add_cors(response.headers_mut(), origin.as_deref());
        return response;
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if !presented.is_some_and(|token| state.token.matches(token)) {
        let mut response = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing or wrong API token: send `Authorization: Bearer <token>` (`kith token` prints it)",
        )
        .into_response();
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    let mut response = next.run(request).await;
    add_cors(response.headers_mut(), origin.as_deref());
    response
}

fn add_cors(headers: &mut HeaderMap, origin: Option<&str>) {
    let Some(origin) = origin.and_then(|o| HeaderValue::from_str(o).ok()) else { return };
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization, content-type"));
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, DELETE, OPTIONS"));
}

/// `localhost`, `127.0.0.1` or `[::1]`, with or without a port.
fn host_is_loopback(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else { return false };
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inside, port)) if port.is_empty() || port.starts_with(':') => inside,
            _ => return false,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    matches!(name.to_ascii_lowercase().as_str(), "localhost" | "127.0.0.1" | "::1")
}

/// An error in OpenAI's shape.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, message: message.into(), param: None, code: None }
    }

    #[cfg(test)]
    pub(crate) fn param(&self) -> Option<&'static str> {
        self.param
    }

    pub(crate) fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self { param: Some(param), ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message) }
    }
}

impl From<NodeError> for ApiError {
    fn from(err: NodeError) -> Self {
        match &err {
            NodeError::UnknownModel { .. } => Self {
                code: Some("model_not_found"),
                param: Some("model"),
                ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", err.to_string())
            },
            NodeError::Busy(_) => Self {
                code: Some("busy"),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", err.to_string())
            },
            NodeError::ShuttingDown => Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", err.to_string()),
            NodeError::NoMemory => Self {
                param: Some("model"),
                ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", err.to_string())
            },
            NodeError::NoConversation(_) => Self {
                code: Some("conversation_not_found"),
                ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", err.to_string())
            },
            NodeError::LocalOnly { .. } => Self {
                code: Some("local_only"),
                param: Some("model"),
                ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", err.to_string())
            },
            NodeError::NoCandidate(_) | NodeError::NoMemoryItem(_) => Self {
                code: Some("not_found"),
                ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", err.to_string())
            },
            NodeError::EmptyMemory => Self {
                param: Some("text"),
                ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", err.to_string())
            },
            NodeError::NotInCatalog { .. } => Self {
                code: Some("model_not_found"),
                param: Some("name"),
                ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", err.to_string())
            },
            NodeError::ModelInUse(_) | NodeError::PullInProgress(_) => Self {
                code: Some("conflict"),
                ..Self::new(StatusCode::CONFLICT, "invalid_request_error", err.to_string())
            },
            NodeError::NoModelStore => Self::new(StatusCode::NOT_FOUND, "invalid_request_error", err.to_string()),
            NodeError::NoEmbedder => Self {
                param: Some("model"),
                ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", err.to_string())
            },
            NodeError::Generate(kith_infer::GenerateError::InvalidParams(_))
            | NodeError::Generate(kith_infer::GenerateError::EmptyPrompt)
            | NodeError::Generate(kith_infer::GenerateError::Template(_)) => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", err.to_string())
            }
            NodeError::Generate(kith_infer::GenerateError::ContextOverflow { .. }) => Self {
                code: Some("context_length_exceeded"),
                param: Some("messages"),
                ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", err.to_string())
            },
            NodeError::NoMesh => Self {
                code: Some("mesh_off"),
                ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", err.to_string())
            },
            NodeError::Mesh(mesh) => match mesh {
                kith_mesh::MeshError::NoFriend(_) => Self {
                    code: Some("not_found"),
                    ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", err.to_string())
                },
                kith_mesh::MeshError::NameTaken(_) => Self {
                    code: Some("conflict"),
                    ..Self::new(StatusCode::CONFLICT, "invalid_request_error", err.to_string())
                },
                kith_mesh::MeshError::Unreachable { .. }
                | kith_mesh::MeshError::Remote { .. }
                | kith_mesh::MeshError::Frame { .. } => Self {
                    code: Some("peer_failed"),
                    ..Self::new(StatusCode::BAD_GATEWAY, "server_error", err.to_string())
                },
                _ => Self {
                    code: Some("pairing_failed"),
                    ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", err.to_string())
                },
            },
            NodeError::Generate(kith_infer::GenerateError::Remote(_)) => Self {
                code: Some("peer_failed"),
                ..Self::new(StatusCode::BAD_GATEWAY, "server_error", err.to_string())
            },
            _ => {
                tracing::error!(error = %err, "request failed");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", err.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code }
        });
        (self.status, axum::Json(body)).into_response()
    }
}

/// A JSON body whose rejections are OpenAI-shaped (413 when too large, 400 when malformed).
pub(crate) struct JsonBody<T>(pub(crate) T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", "the request body is too large")
            } else {
                ApiError::new(rejection.status(), "invalid_request_error", rejection.body_text())
            }
        })?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", format!("invalid JSON body: {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_str(value).expect("header"));
        headers
    }

    #[test]
    fn only_loopback_hosts_pass() {
        for ok in ["localhost", "localhost:7878", "127.0.0.1:7878", "[::1]:7878", "[::1]", "LOCALHOST:1"] {
            assert!(host_is_loopback(&host(ok)), "{ok}");
        }
        for bad in ["evil.example", "evil.example:7878", "127.0.0.1.evil.example", "[::1]x", "192.168.1.2:7878", ""] {
            assert!(!host_is_loopback(&host(bad)), "{bad}");
        }
        assert!(!host_is_loopback(&HeaderMap::new()));
    }
}
