//! The node's mesh membership: its identity and trust list kept sealed in the vault, and
//! the native API under `/api/peers` that `kith peers …` and the desktop app use.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use kith_mesh::{FriendUpdate, Identity, Mesh, MeshConfig, MeshState};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::{ApiError, AppState, JsonBody};
use crate::node::{Node, NodeError};

/// The sealed setting holding the node's Ed25519 key.
const IDENTITY_SETTING: &str = "mesh.identity";
/// The sealed setting holding the trust list, open invites and usage ledger.
const STATE_SETTING: &str = "mesh.state";

impl Node {
    /// Joins the mesh with the identity and trust list sealed in this node's vault
    /// (created on first use), named `name` (kept from last time when `None`). Friends'
    /// jobs run on this node's engines from now on; changes to the trust list, invites
    /// and ledger are saved to the vault as they happen.
    pub async fn join_mesh(&self, config: MeshConfig, name: Option<&str>) -> Result<Mesh, NodeError> {
        let memory = self.memory().ok_or(NodeError::NoMemory)?;
        let identity = match memory.store.setting(IDENTITY_SETTING).await? {
            Some(bytes) => Identity::from_bytes(&bytes).map_err(|e| NodeError::MeshState(e.to_string()))?,
            None => {
                let identity = Identity::generate();
                memory.store.set_setting(IDENTITY_SETTING, &identity.to_bytes()).await?;
                identity
            }
        };
        let mut state: MeshState = match memory.store.setting(STATE_SETTING).await? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| NodeError::MeshState(format!("the saved trust list does not parse: {e}")))?,
            None => MeshState::default(),
        };
        if let Some(name) = name {
            state.name = name.to_owned();
        } else if state.name.is_empty() {
            state.name = default_name();
        }
        let (mesh, jobs) = Mesh::start(identity, state, config, self.offer()).await?;
        self.attach_mesh(mesh.clone(), jobs);
        // Save every change; the last one once more at shutdown.
        let mut saved = mesh.saved();
        let node = self.clone();
        tokio::spawn(async move {
            loop {
                let stopping = tokio::select! {
                    changed = saved.changed() => changed.is_err(),
                    () = node.stopping() => true,
                };
                let state = saved.borrow_and_update().clone();
                if let Some(memory) = node.memory() {
                    match serde_json::to_vec(&state) {
                        Ok(json) => {
                            if let Err(e) = memory.store.set_setting(STATE_SETTING, &json).await {
                                tracing::error!(error = %e, "saving the trust list failed");
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "serializing the trust list failed"),
                    }
                }
                if stopping {
                    return;
                }
            }
        });
        Ok(mesh)
    }
}

fn default_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "kith".to_owned())
}

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/peers", get(list_peers))
        .route("/api/peers/invite", post(invite))
        .route("/api/peers/accept", post(accept))
        .route("/api/peers/usage", get(usage))
        .route("/api/peers/{who}", axum::routing::patch(update_peer).delete(remove_peer))
}

fn mesh(state: &AppState) -> Result<Mesh, ApiError> {
    state.node.mesh().cloned().ok_or_else(|| ApiError::from(NodeError::NoMesh))
}

/// This node on the mesh.
#[derive(Serialize, ToSchema)]
pub(crate) struct MeshIdentity {
    name: String,
    peer_id: String,
    /// The human-checkable id friends compare when pairing.
    device_id: String,
    /// Multiaddrs it listens on.
    listen: Vec<String>,
}

/// What a friend offers this node.
#[derive(Serialize, ToSchema)]
pub(crate) struct Offer {
    model: String,
    device: String,
    tokens_per_s: f64,
    queued: u32,
}

/// A friend on the trust list, with live connection facts.
#[derive(Serialize, ToSchema)]
pub(crate) struct PeerItem {
    name: String,
    peer_id: String,
    device_id: String,
    /// Models they may use here (`null`: all).
    models: Option<Vec<String>>,
    /// Tokens per day they may use here (`null`: no limit).
    tokens_per_day: Option<u64>,
    max_concurrent: u32,
    /// Whether this node sends its own requests to them.
    offload_to: bool,
    connected: bool,
    /// `direct`, `relayed` or `hole-punched`.
    path: Option<String>,
    rtt_ms: Option<f64>,
    offers: Vec<Offer>,
}

impl From<kith_mesh::PeerView> for PeerItem {
    fn from(v: kith_mesh::PeerView) -> Self {
        Self {
            name: v.friend.name,
            peer_id: v.friend.peer_id.to_string(),
            device_id: v.device_id,
            models: v.friend.models,
            tokens_per_day: v.friend.tokens_per_day,
            max_concurrent: v.friend.max_concurrent,
            offload_to: v.friend.offload_to,
            connected: v.connected,
            path: v.path.map(|p| p.as_str().to_owned()),
            rtt_ms: v.rtt_ms,
            offers: v
                .offers
                .into_iter()
                .map(|o| Offer { model: o.name, device: o.device, tokens_per_s: o.tokens_per_s, queued: o.queued })
                .collect(),
        }
    }
}

/// This node and its friends.
#[derive(Serialize, ToSchema)]
pub(crate) struct PeerList {
    node: MeshIdentity,
    peers: Vec<PeerItem>,
}

/// This node's mesh identity and its trust list.
#[utoipa::path(get, path = "/api/peers", responses((status = 200, body = PeerList), (status = 400, body = crate::native::ErrorBody)))]
pub(crate) async fn list_peers(State(state): State<AppState>) -> Result<axum::Json<PeerList>, ApiError> {
    let mesh = mesh(&state)?;
    if mesh.adverts_stale() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), mesh.refresh()).await;
    }
    let node = MeshIdentity {
        name: mesh.state().name,
        peer_id: mesh.peer_id().to_string(),
        device_id: mesh.device_id().to_string(),
        listen: mesh.listen_addrs().iter().map(ToString::to_string).collect(),
    };
    Ok(axum::Json(PeerList { node, peers: mesh.peers().into_iter().map(PeerItem::from).collect() }))
}

/// Options of a new invite.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct InviteRequest {
    /// Seconds it stays valid (default 24 hours, at most 7 days).
    ttl_s: Option<u64>,
}

/// A new one-time invite.
#[derive(Serialize, ToSchema)]
pub(crate) struct InviteView {
    /// Give this to the friend (`kith peers accept CODE`); it works once.
    code: String,
    /// Unix seconds.
    expires: u64,
    /// This node's device id, for the friend to check.
    device_id: String,
}

/// Makes a one-time invite.
#[utoipa::path(post, path = "/api/peers/invite", request_body = InviteRequest, responses((status = 200, body = InviteView), (status = 400, body = crate::native::ErrorBody)))]
pub(crate) async fn invite(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<InviteRequest>,
) -> Result<axum::Json<InviteView>, ApiError> {
    let mesh = mesh(&state)?;
    let code = match request.ttl_s {
        Some(ttl) => mesh.invite_for(std::time::Duration::from_secs(ttl.clamp(60, 7 * 86_400))),
        None => mesh.invite(),
    };
    Ok(axum::Json(InviteView { code: code.encode(), expires: code.expires, device_id: mesh.device_id().to_string() }))
}

/// An invite code to accept.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AcceptRequest {
    code: String,
}

/// Pairs with the node that made the invite; both add each other to their trust lists.
#[utoipa::path(post, path = "/api/peers/accept", request_body = AcceptRequest, responses((status = 200, body = PeerItem), (status = 400, body = crate::native::ErrorBody)))]
pub(crate) async fn accept(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<AcceptRequest>,
) -> Result<axum::Json<PeerItem>, ApiError> {
    let mesh = mesh(&state)?;
    let friend = mesh.accept(&request.code).await.map_err(NodeError::from)?;
    let view = mesh.peers().into_iter().find(|p| p.friend.peer_id == friend.peer_id);
    view.map(|v| axum::Json(PeerItem::from(v)))
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "paired, then lost"))
}

/// A change to a friend's policy; absent fields stay as they are.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PeerUpdate {
    name: Option<String>,
    /// Models they may use here (`["*"]`: all, `[]`: none).
    models: Option<Vec<String>>,
    /// Tokens per day (`0`: no limit).
    tokens_per_day: Option<u64>,
    max_concurrent: Option<u32>,
    offload_to: Option<bool>,
}

/// Changes a friend's name, models, quotas or whether to offload to them.
#[utoipa::path(patch, path = "/api/peers/{who}", params(("who" = String, Path, description = "name, peer id or device id")), request_body = PeerUpdate, responses((status = 200, body = PeerItem), (status = 404, body = crate::native::ErrorBody)))]
pub(crate) async fn update_peer(
    State(state): State<AppState>,
    Path(who): Path<String>,
    JsonBody(update): JsonBody<PeerUpdate>,
) -> Result<axum::Json<PeerItem>, ApiError> {
    let mesh = mesh(&state)?;
    let update = FriendUpdate {
        name: update.name,
        models: update.models,
        tokens_per_day: update.tokens_per_day,
        max_concurrent: update.max_concurrent,
        offload_to: update.offload_to,
    };
    let friend = mesh.set(&who, update).map_err(NodeError::from)?;
    let view = mesh.peers().into_iter().find(|p| p.friend.peer_id == friend.peer_id);
    view.map(|v| axum::Json(PeerItem::from(v)))
        .ok_or_else(|| ApiError::from(NodeError::from(kith_mesh::MeshError::NoFriend(who))))
}

/// A removed friend.
#[derive(Serialize, ToSchema)]
pub(crate) struct RemovedPeer {
    name: String,
    peer_id: String,
}

/// Removes a friend: their connections close and their running jobs stop at once.
#[utoipa::path(delete, path = "/api/peers/{who}", params(("who" = String, Path, description = "name, peer id or device id")), responses((status = 200, body = RemovedPeer), (status = 404, body = crate::native::ErrorBody)))]
pub(crate) async fn remove_peer(
    State(state): State<AppState>,
    Path(who): Path<String>,
) -> Result<axum::Json<RemovedPeer>, ApiError> {
    let friend = mesh(&state)?.remove(&who).map_err(NodeError::from)?;
    Ok(axum::Json(RemovedPeer { name: friend.name, peer_id: friend.peer_id.to_string() }))
}

/// One day of a friend's use of this node.
#[derive(Serialize, ToSchema)]
pub(crate) struct UsageDay {
    /// `YYYY-MM-DD` (UTC).
    date: String,
    requests: u64,
    tokens_in: u64,
    tokens_out: u64,
}

/// A friend's use of this node, by day (counts only: prompts are never kept).
#[derive(Serialize, ToSchema)]
pub(crate) struct PeerUsage {
    name: String,
    peer_id: String,
    /// Their daily quota (`null`: none).
    tokens_per_day: Option<u64>,
    days: Vec<UsageDay>,
}

/// The usage ledger: what each friend used here, per day.
#[utoipa::path(get, path = "/api/peers/usage", responses((status = 200, body = Vec<PeerUsage>), (status = 400, body = crate::native::ErrorBody)))]
pub(crate) async fn usage(State(state): State<AppState>) -> Result<axum::Json<Vec<PeerUsage>>, ApiError> {
    let mesh_state = mesh(&state)?.state();
    let out = mesh_state
        .friends
        .iter()
        .map(|f| PeerUsage {
            name: f.name.clone(),
            peer_id: f.peer_id.to_string(),
            tokens_per_day: f.tokens_per_day,
            days: mesh_state
                .usage
                .get(&f.peer_id.to_string())
                .map(|days| {
                    days.iter()
                        .map(|d| UsageDay {
                            date: date(d.day),
                            requests: d.requests,
                            tokens_in: d.tokens_in,
                            tokens_out: d.tokens_out,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    Ok(axum::Json(out))
}

/// `YYYY-MM-DD` of a day number since the Unix epoch (civil-from-days).
fn date(days: u64) -> String {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates() {
        assert_eq!(super::date(0), "1970-01-01");
        assert_eq!(super::date(20_417), "2025-11-25");
        assert_eq!(super::date(11_016), "2000-02-29");
    }
}
