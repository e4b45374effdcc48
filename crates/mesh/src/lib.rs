//! Kith's mesh: a node's identity, pairing with friends through one-time invites, the
//! trust list with per-friend quotas, and inference offload over encrypted libp2p
//! streams (`/kith/infer/1`).
//!
//! - [`Identity`] is the node's Ed25519 key; [`DeviceId`] its human-checkable form.
//! - [`InviteCode`] is what `kith peers invite` prints; the accepter proves the secret
//!   with an HMAC over a fresh nonce, so the secret never crosses the wire.
//! - [`Mesh`] runs the swarm (TCP + Noise + Yamux, QUIC, identify, ping, mDNS, relay v2,
//!   DCUtR). Connections from peers not on the trust list are closed right after the
//!   handshake (the one exception: while an invite is open, strangers may pair and
//!   nothing else). Friends' requests reach the node as [`ServeJob`]s after their quota
//!   is checked; their prompts are never stored or logged, only counted in the ledger.
//! - [`wire`] holds the length-delimited frames, checked for size before allocation.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod gate;
mod identity;
mod invite;
mod mesh;
mod trust;
pub mod wire;

pub use identity::{BadIdentity, DeviceId, Identity};
pub use invite::{BadCode, InviteCode, PendingInvite};
pub use libp2p::{Multiaddr, PeerId};
pub use mesh::{
    Candidate, INFER_PROTOCOL, Mesh, MeshConfig, MeshError, OfferFn, Offload, PAIR_PROTOCOL, Path, PeerView,
    RemoteError, STATUS_PROTOCOL, ServeJob, now_s,
};
pub use trust::{DEFAULT_CONCURRENT, DEFAULT_TOKENS_PER_DAY, DayUsage, Friend, FriendUpdate, MeshState};
