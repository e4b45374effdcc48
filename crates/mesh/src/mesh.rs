//! The running mesh: the libp2p swarm on its own task, the stream protocols, pairing,
//! serving friends' requests and sending ours.
//!
//! ```text
//!  Mesh (Clone) ──SwarmCommand──▶ swarm task (dials, disconnects, events)
//!     │ libp2p_stream::Control ─▶ /kith/infer/1, /kith/status/1, /kith/pair/1
//!     └ serve: ServeJob ──mpsc──▶ the node (runs it on its engine, streams ToClient back)
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{AsyncReadExt, StreamExt};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Stream, StreamProtocol, connection_limits, dcutr, identify, mdns, noise, ping, relay, tcp, yamux,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;

use crate::gate::{Admission, Gate};
use crate::invite::{InviteCode, hex, unhex};
use crate::trust::{Friend, FriendUpdate, MeshState};
use crate::wire::{self, Advert, AdvertModel, FrameError, InferRequest, Pairing, ToClient, ToServer, WireError};
use crate::{DeviceId, Identity};

/// Streams of offloaded generations.
pub const INFER_PROTOCOL: StreamProtocol = StreamProtocol::new("/kith/infer/1");
/// What a node offers a friend.
pub const STATUS_PROTOCOL: StreamProtocol = StreamProtocol::new("/kith/status/1");
/// Pairing with an invite.
pub const PAIR_PROTOCOL: StreamProtocol = StreamProtocol::new("/kith/pair/1");

/// Time a peer has to send its first frame.
const FIRST_FRAME: Duration = Duration::from_secs(10);
/// Time to open a stream (dialling included).
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for one try at opening a stream on an established connection.
const OPEN_ATTEMPT: Duration = Duration::from_secs(2);
/// Tries at opening a stream.
const OPEN_ATTEMPTS: u32 = 3;
/// Failed pairing attempts tolerated per minute before pairing pauses for a minute.
const PAIR_FAILURES_PER_MINUTE: usize = 5;
/// Adverts older than this are refreshed before routing.
const ADVERT_TTL: Duration = Duration::from_secs(30);
/// Addresses saved per friend from what it says it listens on.
const MAX_SAVED_ADDRS: usize = 8;

/// How the mesh listens and behaves.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Addresses to listen on (TCP and QUIC).
    pub listen: Vec<Multiaddr>,
    /// Find trusted peers' addresses on the local network with mDNS.
    pub mdns: bool,
    /// Relay for friends (circuit relay v2; only trusted peers can connect at all).
    pub relay_server: bool,
    /// How long a new invite stays valid.
    pub invite_ttl: Duration,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/0.0.0.0/tcp/0".parse().expect("valid multiaddr"),
                "/ip4/0.0.0.0/udp/0/quic-v1".parse().expect("valid multiaddr"),
            ],
            mdns: true,
            relay_server: true,
            invite_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// Why a mesh operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// The swarm could not be built or could not listen.
    #[error("starting the mesh: {0}")]
    Start(String),
    /// The invite code did not parse.
    #[error(transparent)]
    BadCode(#[from] crate::invite::BadCode),
    /// The inviter refused the invite.
    #[error("the inviter refused: {0}")]
    Refused(String),
    /// The inviter did not prove it knows the secret.
    #[error("the inviter's answer did not check out: not pairing")]
    BadWelcome,
    /// No friend by this name, peer id or device id.
    #[error("no friend {0:?} (kith peers list)")]
    NoFriend(String),
    /// This node may not send requests to that friend.
    #[error("offloading to {0} is turned off (kith peers set {0} --offload on)")]
    OffloadOff(String),
    /// The name is taken.
    #[error("a friend is already called {0:?}")]
    NameTaken(String),
    /// A stream could not be opened.
    #[error("cannot reach {peer}: {reason}")]
    Unreachable {
        /// The friend.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The peer answered with an error.
    #[error("{peer} refused: {error}")]
    Remote {
        /// The friend.
        peer: String,
        /// What it said.
        error: RemoteError,
    },
    /// A frame failed.
    #[error("{peer}: {source}")]
    Frame {
        /// The friend.
        peer: String,
        /// The frame error.
        source: FrameError,
    },
    /// The mesh has stopped.
    #[error("the mesh has stopped")]
    Stopped,
}

/// A peer's error answer, with its stable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({code})")]
pub struct RemoteError {
    /// `quota`, `busy`, `model`, `version`, `bad_request`, `failed`.
    pub code: String,
    /// For people.
    pub message: String,
}

/// A job a friend asked this node to run. Send [`ToClient`] events on `events` (tokens,
/// then one `Done` or `Error`); when sending fails the friend went away: stop.
#[derive(Debug)]
pub struct ServeJob {
    /// The friend's name here (for logs: never log the request's content).
    pub friend: String,
    /// The request (`max_tokens` already capped to what is left of the quota).
    pub request: InferRequest,
    /// Where the answer goes.
    pub events: mpsc::Sender<ToClient>,
    /// Tokens (in and out) left of the friend's daily quota here before this request;
    /// `None` without a quota. A prompt longer than this should be refused.
    pub tokens_left: Option<u64>,
    prompt_tokens: Arc<std::sync::atomic::AtomicU64>,
}

impl ServeJob {
    /// Tells the ledger this request's prompt tokens once it runs, so that they count
    /// even if the friend cancels before the `Done` that carries them.
    pub fn count_prompt(&self, tokens: u64) {
        self.prompt_tokens.store(tokens, Ordering::Relaxed);
    }
}

/// What the node offers (all models); the mesh filters it per friend.
pub type OfferFn = Arc<dyn Fn() -> Vec<AdvertModel> + Send + Sync>;

/// How a connection to a peer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Path {
    /// A direct connection.
    Direct,
    /// Through a friend's relay.
    Relayed,
    /// Direct, after hole punching through a relay.
    HolePunched,
}

impl Path {
    /// `direct`, `relayed` or `hole-punched`.
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Relayed => "relayed",
            Path::HolePunched => "hole-punched",
        }
    }
}

/// A friend as `kith peers list` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct PeerView {
    /// The trust list entry.
    #[serde(flatten)]
    pub friend: Friend,
    /// Their device id.
    pub device_id: String,
    /// Whether a connection is open.
    pub connected: bool,
    /// How it runs, when connected.
    pub path: Option<Path>,
    /// Round-trip time of the last ping.
    pub rtt_ms: Option<f64>,
    /// What they offer this node (after the last status query).
    pub offers: Vec<AdvertModel>,
}

/// A friend that can run a model, as routing sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The friend's peer id.
    pub peer: PeerId,
    /// Their name here.
    pub name: String,
    /// Advertised decode speed.
    pub tokens_per_s: f64,
    /// Their queue for the model.
    pub queued: u32,
    /// Last ping.
    pub rtt: Option<Duration>,
    /// The model's context window there.
    pub context_length: u32,
}

enum SwarmCommand {
    /// Learn the addresses and dial if not connected; `known` is told once the
    /// addresses are in (so that a stream opened next can use them).
    Dial {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        known: Option<oneshot::Sender<()>>,
    },
    Disconnect(PeerId),
    /// A peer became a friend: reserve a relay slot on it if it relays.
    Trusted(PeerId),
}

#[derive(Default)]
struct Live {
    /// Open connections, direct and through a relay.
    direct: std::collections::HashSet<libp2p::swarm::ConnectionId>,
    relayed: std::collections::HashSet<libp2p::swarm::ConnectionId>,
    /// A hole was punched since the last relayed connection: the direct ones run
    /// through it (they may reconnect after hole punching's simultaneous dials race).
    punched: bool,
    rtt: Option<Duration>,
    advert: Option<(Instant, Advert)>,
    /// Why the last dial failed, until the next attempt.
    dial_error: Option<String>,
}

impl Live {
    fn connected(&self) -> bool {
        !self.direct.is_empty() || !self.relayed.is_empty()
    }

    /// The best path open now.
    fn path(&self) -> Option<Path> {
        if !self.direct.is_empty() {
            Some(if self.punched { Path::HolePunched } else { Path::Direct })
        } else if !self.relayed.is_empty() {
            Some(Path::Relayed)
        } else {
            None
        }
    }
}

struct Inner {
    identity: Identity,
    config: MeshConfig,
    state: Mutex<MeshState>,
    saved: watch::Sender<MeshState>,
    admission: Arc<RwLock<Admission>>,
    denied: Arc<AtomicU64>,
    served: AtomicU64,
    commands: mpsc::UnboundedSender<SwarmCommand>,
    control: Mutex<libp2p_stream::Control>,
    listen: watch::Receiver<Vec<Multiaddr>>,
    live: Mutex<HashMap<PeerId, Live>>,
    /// Bumped whenever a connection is established (after every behaviour saw it).
    connections: watch::Sender<u64>,
    jobs: Mutex<HashMap<PeerId, Vec<AbortHandle>>>,
    pair_failures: Mutex<VecDeque<Instant>>,
    serve: mpsc::Sender<ServeJob>,
    offer: OfferFn,
    tasks: Mutex<Vec<AbortHandle>>,
}

/// The running mesh; clones share it. Dropping the last clone does not stop it: call
/// [`Mesh::shutdown`].
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").field("peer_id", &self.inner.identity.peer_id()).finish_non_exhaustive()
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    gate: Gate,
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    relay_client: relay::client::Behaviour,
    relay: Toggle<relay::Behaviour>,
    dcutr: dcutr::Behaviour,
    stream: libp2p_stream::Behaviour,
}

/// Unix seconds now.
pub fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn today() -> u64 {
    now_s() / 86_400
}

impl Mesh {
    /// Starts the mesh with `identity` and the saved `state`, listening as `config` says.
    /// Friends' jobs arrive on the returned receiver; `offer` says what the node serves.
    /// Returns once it listens.
    pub async fn start(
        identity: Identity,
        state: MeshState,
        config: MeshConfig,
        offer: OfferFn,
    ) -> Result<(Mesh, mpsc::Receiver<ServeJob>), MeshError> {
        let start = |e: &dyn std::fmt::Display| MeshError::Start(e.to_string());
        let admission = Arc::new(RwLock::new(Admission {
            trusted: state.friends.iter().map(|f| f.peer_id).collect(),
            pairing_open: has_open_invite(&state, now_s()),
            joining: Default::default(),
        }));
        let denied = Arc::new(AtomicU64::new(0));
        let local = identity.peer_id();
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_pending_incoming(Some(64))
            .with_max_established_incoming(Some(128))
            .with_max_established_per_peer(Some(4));
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(identity.keypair())
            .with_tokio()
            .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
            .map_err(|e| start(&e))?
            .with_quic()
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| start(&e))?
            .with_behaviour(|key, relay_client| {
                Ok(Behaviour {
                    gate: Gate { admission: admission.clone(), denied: denied.clone() },
                    limits: connection_limits::Behaviour::new(limits),
                    identify: identify::Behaviour::new(identify::Config::new("/kith/id/1".into(), key.public())),
                    ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(15))),
                    mdns: Toggle::from(if config.mdns {
                        match mdns::tokio::Behaviour::new(mdns::Config::default(), local) {
                            Ok(m) => Some(m),
                            Err(e) => {
                                tracing::warn!(error = %e, "mDNS is off: it could not start");
                                None
                            }
                        }
                    } else {
                        None
                    }),
                    relay_client,
                    relay: Toggle::from(config.relay_server.then(|| relay::Behaviour::new(local, relay_config()))),
                    dcutr: dcutr::Behaviour::new(local),
                    stream: libp2p_stream::Behaviour::new(),
                })
            })
            .map_err(|e| start(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
            .build();
        for addr in &config.listen {
            swarm.listen_on(addr.clone()).map_err(|e| MeshError::Start(format!("listening on {addr}: {e}")))?;
        }
        for friend in &state.friends {
            for addr in &friend.addrs {
                if let Ok(addr) = addr.parse() {
                    swarm.add_peer_address(friend.peer_id, addr);
                }
            }
        }
        let mut control = swarm.behaviour().stream.new_control();
        let incoming = |control: &mut libp2p_stream::Control, p| control.accept(p).map_err(|e| start(&e));
        let infer = incoming(&mut control, INFER_PROTOCOL)?;
        let status = incoming(&mut control, STATUS_PROTOCOL)?;
        let pair = incoming(&mut control, PAIR_PROTOCOL)?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (listen_tx, mut listen) = watch::channel(Vec::new());
        let (serve_tx, serve_rx) = mpsc::channel(64);
        let (saved, _) = watch::channel(state.clone());
        let mesh = Mesh {
            inner: Arc::new(Inner {
                identity,
                config,
                state: Mutex::new(state),
                saved,
                admission,
                denied,
                served: AtomicU64::new(0),
                commands,
                control: Mutex::new(control),
                listen: listen.clone(),
                live: Mutex::new(HashMap::new()),
                connections: watch::channel(0).0,
                jobs: Mutex::new(HashMap::new()),
                pair_failures: Mutex::new(VecDeque::new()),
                serve: serve_tx,
                offer,
                tasks: Mutex::new(Vec::new()),
            }),
        };
        let weak = Arc::downgrade(&mesh.inner);
        let tasks = vec![
            tokio::spawn(run_swarm(swarm, command_rx, listen_tx, weak.clone())).abort_handle(),
            tokio::spawn(accept_loop(infer, weak.clone(), |mesh, peer, stream| mesh.serve_infer(peer, stream)))
                .abort_handle(),
            tokio::spawn(accept_loop(status, weak.clone(), |mesh, peer, stream| mesh.serve_status(peer, stream)))
                .abort_handle(),
            tokio::spawn(accept_loop(pair, weak, |mesh, peer, stream| mesh.serve_pairing(peer, stream))).abort_handle(),
        ];
        if let Ok(mut t) = mesh.inner.tasks.lock() {
            t.extend(tasks);
        }
        let listening = tokio::time::timeout(OPEN_TIMEOUT, listen.wait_for(|addrs| !addrs.is_empty())).await;
        if !matches!(listening, Ok(Ok(_))) {
            return Err(MeshError::Start("no listen address came up".into()));
        }
        mesh.dial_friends();
        tracing::info!(peer_id = %mesh.peer_id(), device_id = %mesh.device_id(), "mesh started");
        Ok((mesh, serve_rx))
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.inner.identity.peer_id()
    }

    /// This node's device id.
    pub fn device_id(&self) -> DeviceId {
        self.inner.identity.device_id()
    }

    /// The addresses it listens on now.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.inner.listen.borrow().clone()
    }

    /// The state to persist; changes whenever the trust list, invites or ledger change.
    pub fn saved(&self) -> watch::Receiver<MeshState> {
        self.inner.saved.subscribe()
    }

    /// A copy of the current state.
    pub fn state(&self) -> MeshState {
        self.inner.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Connections closed because the peer was not trusted, since start.
    pub fn denied_connections(&self) -> u64 {
        self.inner.denied.load(Ordering::Relaxed)
    }

    /// Friends' jobs handed to the node, since start.
    pub fn served_jobs(&self) -> u64 {
        self.inner.served.load(Ordering::Relaxed)
    }

    /// Sets this node's name (shown to friends when pairing).
    pub fn set_name(&self, name: &str) {
        self.update(|s| s.name = name.to_owned());
    }

    fn update<T>(&self, change: impl FnOnce(&mut MeshState) -> T) -> T {
        update(&self.inner, change)
    }

    /// Makes a one-time invite valid for the configured time.
    pub fn invite(&self) -> InviteCode {
        self.invite_for(self.inner.config.invite_ttl)
    }

    /// Makes a one-time invite valid for `ttl`.
    pub fn invite_for(&self, ttl: Duration) -> InviteCode {
        let mut addrs = self.listen_addrs();
        // Addresses others can reach first: loopback only helps on this machine.
        addrs.sort_by_key(|a| (is_loopback(a), a.iter().any(|p| matches!(p, Protocol::P2pCircuit))));
        let code = InviteCode::new(self.peer_id(), addrs, now_s() + ttl.as_secs());
        let pending = code.pending();
        self.update(|s| {
            s.prune_invites(now_s());
            s.invites.push(pending);
        });
        tracing::info!(invite = %code.id(), expires = code.expires, "invite created");
        code
    }

    /// Pairs with the node that made `code`: proves the secret, and both sides add each
    /// other to their trust lists. Returns the new friend.
    pub async fn accept(&self, code: &str) -> Result<Friend, MeshError> {
        let code = InviteCode::decode(code)?;
        let inviter = code.inviter;
        if let Ok(mut a) = self.inner.admission.write() {
            a.joining.insert(inviter);
        }
        let result = self.pair_with(&code).await;
        if let Ok(mut a) = self.inner.admission.write() {
            a.joining.remove(&inviter);
        }
        // A connection left from a refused attempt serves nothing (the inviter is not
        // trusted here) and closes when idle.
        result
    }

    async fn pair_with(&self, code: &InviteCode) -> Result<Friend, MeshError> {
        let inviter = code.inviter;
        self.learn(inviter, code.addrs.clone()).await;
        let mut attempt = 1;
        let (mut stream, challenge) = loop {
            let mut stream = self.open(inviter, PAIR_PROTOCOL).await?;
            let first = tokio::time::timeout(FIRST_FRAME, wire::read::<Pairing>(&mut stream)).await;
            if matches!(&first, Ok(first) if dropped_unanswered(first)) && try_again(&mut attempt).await {
                continue;
            }
            break (stream, first);
        };
        let Pairing::Challenge { nonce } = answer(challenge, &inviter)? else {
            return Err(MeshError::Refused("unexpected answer".into()));
        };
        let nonce = unhex(&nonce).unwrap_or_default();
        let me = self.peer_id();
        let proof = Pairing::Proof { invite: code.id(), proof: code.proof(&me, &nonce), name: self.state().name };
        wire::write(&mut stream, &proof)
            .await
            .map_err(|source| MeshError::Frame { peer: inviter.to_string(), source })?;
        let Pairing::Welcome { name, proof } = read_answer(&mut stream, &inviter).await? else {
            return Err(MeshError::Refused("unexpected answer".into()));
        };
        if !code.verify_welcome(&me, &nonce, &proof) {
            return Err(MeshError::BadWelcome);
        }
        let addrs = code.addrs.iter().map(|a| a.to_string()).collect();
        let friend = self.update(|s| {
            s.friends.retain(|f| f.peer_id != inviter);
            let mut friend = Friend::new(s.free_name(&name), inviter, now_s());
            friend.addrs = addrs;
            s.friends.push(friend.clone());
            friend
        });
        tracing::info!(friend = %friend.name, device_id = %friend.device_id(), "paired");
        self.refresh_soon(friend.peer_id);
        Ok(friend)
    }

    /// The trust list with live connection facts.
    pub fn peers(&self) -> Vec<PeerView> {
        let state = self.state();
        let live = self.inner.live.lock();
        state
            .friends
            .into_iter()
            .map(|friend| {
                let l = live.as_ref().ok().and_then(|l| l.get(&friend.peer_id));
                PeerView {
                    device_id: friend.device_id().to_string(),
                    connected: l.is_some_and(Live::connected),
                    path: l.and_then(Live::path),
                    rtt_ms: l.and_then(|l| l.rtt).map(|d| d.as_secs_f64() * 1000.0),
                    offers: l.and_then(|l| l.advert.as_ref()).map(|(_, a)| a.models.clone()).unwrap_or_default(),
                    friend,
                }
            })
            .collect()
    }

    /// Finds a friend by name, peer id or device id.
    pub fn find(&self, who: &str) -> Result<Friend, MeshError> {
        self.state().find(who).cloned().ok_or_else(|| MeshError::NoFriend(who.to_owned()))
    }

    /// Changes a friend's policy.
    pub fn set(&self, who: &str, update: FriendUpdate) -> Result<Friend, MeshError> {
        let friend = self.find(who)?;
        if let Some(name) = &update.name
            && self.state().friends.iter().any(|f| &f.name == name && f.peer_id != friend.peer_id)
        {
            return Err(MeshError::NameTaken(name.clone()));
        }
        Ok(self.update(|s| {
            let Some(f) = s.friends.iter_mut().find(|f| f.peer_id == friend.peer_id) else { return friend };
            update.apply(f);
            f.clone()
        }))
    }

    /// Removes a friend: their connections close and their running jobs stop now.
    pub fn remove(&self, who: &str) -> Result<Friend, MeshError> {
        let friend = self.find(who)?;
        self.update(|s| s.friends.retain(|f| f.peer_id != friend.peer_id));
        let jobs = self.inner.jobs.lock().ok().and_then(|mut j| j.remove(&friend.peer_id)).unwrap_or_default();
        for job in &jobs {
            job.abort();
        }
        let _ = self.inner.commands.send(SwarmCommand::Disconnect(friend.peer_id));
        if let Ok(mut live) = self.inner.live.lock() {
            live.remove(&friend.peer_id);
        }
        tracing::info!(friend = %friend.name, cancelled = jobs.len(), "friend removed");
        Ok(friend)
    }

    /// Friends that offer `model` and accept this node's requests, best first (shortest
    /// queue, then fastest, then nearest). Uses cached adverts; see [`refresh`](Self::refresh).
    pub fn candidates(&self, model: &str) -> Vec<Candidate> {
        let state = self.state();
        let Ok(live) = self.inner.live.lock() else { return Vec::new() };
        let mut out: Vec<Candidate> = state
            .friends
            .iter()
            .filter(|f| f.offload_to)
            .filter_map(|f| {
                let l = live.get(&f.peer_id)?;
                let (_, advert) = l.advert.as_ref()?;
                let m = advert.models.iter().find(|m| m.name == model)?;
                Some(Candidate {
                    peer: f.peer_id,
                    name: f.name.clone(),
                    tokens_per_s: m.tokens_per_s,
                    queued: m.queued,
                    rtt: l.rtt,
                    context_length: m.context_length,
                })
            })
            .collect();
        out.sort_by(|a, b| {
            a.queued
                .cmp(&b.queued)
                .then(b.tokens_per_s.total_cmp(&a.tokens_per_s))
                .then(a.rtt.unwrap_or(Duration::MAX).cmp(&b.rtt.unwrap_or(Duration::MAX)))
        });
        out
    }

    /// Whether any advert is older than the cache keeps them (or missing).
    pub fn adverts_stale(&self) -> bool {
        let state = self.state();
        let Ok(live) = self.inner.live.lock() else { return true };
        state.friends.iter().filter(|f| f.offload_to).any(|f| {
            live.get(&f.peer_id).and_then(|l| l.advert.as_ref()).is_none_or(|(at, _)| at.elapsed() > ADVERT_TTL)
        })
    }

    /// Asks every friend this node may offload to what they offer now (in parallel).
    pub async fn refresh(&self) {
        let friends: Vec<Friend> = self.state().friends.into_iter().filter(|f| f.offload_to).collect();
        let asks = friends.iter().map(|f| async move {
            let result = tokio::time::timeout(OPEN_TIMEOUT, self.query_status(f.peer_id)).await;
            match result {
                Ok(Ok(advert)) => {
                    if let Ok(mut live) = self.inner.live.lock() {
                        live.entry(f.peer_id).or_default().advert = Some((Instant::now(), advert));
                    }
                }
                Ok(Err(e)) => tracing::debug!(friend = %f.name, error = %e, "status query failed"),
                Err(_) => tracing::debug!(friend = %f.name, "status query timed out"),
            }
        });
        futures_util::future::join_all(asks).await;
    }

    /// [`refresh`](Self::refresh) in the background (after pairing: the new friend's
    /// offer is known by the time anyone asks).
    fn refresh_soon(&self, friend: PeerId) {
        let _ = self.inner.commands.send(SwarmCommand::Trusted(friend));
        let mesh = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            mesh.refresh().await;
        });
    }

    async fn query_status(&self, peer: PeerId) -> Result<Advert, MeshError> {
        let mut attempt = 1;
        loop {
            let mut stream = self.open(peer, STATUS_PROTOCOL).await?;
            let answer = wire::read::<Advert>(&mut stream).await;
            if dropped_unanswered(&answer) && try_again(&mut attempt).await {
                continue;
            }
            return match answer {
                Ok(Some(advert)) => Ok(advert),
                Ok(None) => Err(MeshError::Unreachable { peer: peer.to_string(), reason: "no status".into() }),
                Err(source) => Err(MeshError::Frame { peer: peer.to_string(), source }),
            };
        }
    }

    /// Sends `request` to the friend `peer` and returns the stream of its answer.
    /// Dropping the returned stream cancels the generation there.
    pub async fn infer(&self, peer: PeerId, request: InferRequest) -> Result<Offload, MeshError> {
        let friend = self.state().friend(&peer).cloned().ok_or_else(|| MeshError::NoFriend(peer.to_string()))?;
        if !friend.offload_to {
            return Err(MeshError::OffloadOff(friend.name));
        }
        let (read, write) = self.send_infer(peer, &friend.name, &request).await?;
        let retry = Some((self.clone(), peer, request));
        Ok(Offload { friend: friend.name, read, write: Some(write), done: false, retry, attempt: 1 })
    }

    /// Opens an inference stream to `peer` and sends `request` on it.
    async fn send_infer(
        &self,
        peer: PeerId,
        name: &str,
        request: &InferRequest,
    ) -> Result<(futures_util::io::ReadHalf<Stream>, futures_util::io::WriteHalf<Stream>), MeshError> {
        let mut attempt = 1;
        loop {
            let mut stream = self.open(peer, INFER_PROTOCOL).await?;
            match wire::write(&mut stream, &ToServer::Infer(request.clone())).await {
                Ok(()) => return Ok(stream.split()),
                // Dropped unread (see `dropped_unanswered`): again.
                Err(FrameError::Io(_)) if try_again(&mut attempt).await => {}
                Err(source) => return Err(MeshError::Frame { peer: name.to_owned(), source }),
            }
        }
    }

    /// Tries the inference protocol against any peer, trusted or not, as a stranger
    /// would: for tests of deny-by-default. Succeeds only if the peer answered.
    #[doc(hidden)]
    pub async fn probe_infer(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: InferRequest,
    ) -> Result<ToClient, MeshError> {
        if let Ok(mut a) = self.inner.admission.write() {
            a.joining.insert(peer);
        }
        self.learn(peer, addrs).await;
        let result = async {
            let mut stream = self.open(peer, INFER_PROTOCOL).await?;
            let frame = |source| MeshError::Frame { peer: peer.to_string(), source };
            wire::write(&mut stream, &ToServer::Infer(request)).await.map_err(frame)?;
            wire::read::<ToClient>(&mut stream).await.map_err(frame)?.ok_or(MeshError::Frame {
                peer: peer.to_string(),
                source: FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()),
            })
        }
        .await;
        if let Ok(mut a) = self.inner.admission.write() {
            a.joining.remove(&peer);
        }
        result
    }

    fn is_connected(&self, peer: &PeerId) -> bool {
        self.inner.live.lock().is_ok_and(|live| live.get(peer).is_some_and(Live::connected))
    }

    /// Waits until a connection to `peer` is up (dialling its known addresses), so that
    /// a stream is opened on an established connection: libp2p-stream loses a request
    /// made while a connection is half set up.
    async fn connect(&self, peer: PeerId, deadline: tokio::time::Instant) -> Result<(), MeshError> {
        let mut established = self.inner.connections.subscribe();
        if let Ok(mut live) = self.inner.live.lock() {
            live.entry(peer).or_default().dial_error = None;
        }
        loop {
            if self.is_connected(&peer) {
                return Ok(());
            }
            let failed = self.inner.live.lock().ok().and_then(|l| l.get(&peer).and_then(|l| l.dial_error.clone()));
            if let Some(reason) = failed {
                return Err(MeshError::Unreachable { peer: self.name_of(&peer), reason });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(MeshError::Unreachable { peer: self.name_of(&peer), reason: "no connection".into() });
            }
            // (Re)dial: a connection that was closing when we last asked may be gone now.
            let _ = self.inner.commands.send(SwarmCommand::Dial { peer, addrs: Vec::new(), known: None });
            let tick = (tokio::time::Instant::now() + Duration::from_millis(500)).min(deadline);
            if let Ok(Err(_)) = tokio::time::timeout_at(tick, established.changed()).await {
                return Err(MeshError::Stopped);
            }
        }
    }

    async fn open(&self, peer: PeerId, protocol: StreamProtocol) -> Result<Stream, MeshError> {
        let mut control = self.inner.control.lock().map_err(|_| MeshError::Stopped)?.clone();
        let deadline = tokio::time::Instant::now() + OPEN_TIMEOUT;
        let mut attempts = 0;
        loop {
            attempts += 1;
            self.connect(peer, deadline).await?;
            let attempt = (tokio::time::Instant::now() + OPEN_ATTEMPT).min(deadline);
            let reason = match tokio::time::timeout_at(attempt, control.open_stream(peer, protocol.clone())).await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(libp2p_stream::OpenStreamError::Io(e))) => e.to_string(),
                Ok(Err(e)) => return Err(MeshError::Unreachable { peer: self.name_of(&peer), reason: e.to_string() }),
                Err(_) => "timed out".to_owned(),
            };
            // The connection it picked was closing (the peer hung up an earlier exchange,
            // or refused us): again, on a new connection.
            if attempts >= OPEN_ATTEMPTS || tokio::time::Instant::now() >= deadline {
                return Err(MeshError::Unreachable { peer: self.name_of(&peer), reason });
            }
            tracing::debug!(%peer, error = %reason, "opening a stream failed; retrying");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Gives the swarm `addrs` for `peer` (and dials), waiting until they are in.
    async fn learn(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let (known, added) = oneshot::channel();
        if self.inner.commands.send(SwarmCommand::Dial { peer, addrs, known: Some(known) }).is_ok() {
            let _ = added.await;
        }
    }

    fn name_of(&self, peer: &PeerId) -> String {
        self.state().friend(peer).map_or_else(|| peer.to_string(), |f| f.name.clone())
    }

    fn dial_friends(&self) {
        for friend in self.state().friends {
            let addrs = friend.addrs.iter().filter_map(|a| a.parse().ok()).collect();
            let _ = self.inner.commands.send(SwarmCommand::Dial { peer: friend.peer_id, addrs, known: None });
        }
    }

    /// Stops the swarm and every stream task.
    pub fn shutdown(&self) {
        if let Ok(tasks) = self.inner.tasks.lock() {
            for t in tasks.iter() {
                t.abort();
            }
        }
        if let Ok(jobs) = self.inner.jobs.lock() {
            for job in jobs.values().flatten() {
                job.abort();
            }
        }
    }

    // ---- serving -------------------------------------------------------------------

    async fn serve_status(self, peer: PeerId, mut stream: Stream) {
        let Some(friend) = self.state().friend(&peer).cloned() else { return };
        let models = (self.inner.offer)().into_iter().filter(|m| friend.may_use(&m.name)).collect();
        let advert = Advert { version: wire::VERSION, name: self.state().name, models };
        if let Err(e) = wire::write(&mut stream, &advert).await {
            tracing::debug!(friend = %friend.name, error = %e, "sending status failed");
        }
    }

    async fn serve_pairing(self, peer: PeerId, mut stream: Stream) {
        let outcome = self.pairing(peer, &mut stream).await;
        let reply = match outcome {
            Ok(welcome) => welcome,
            Err(refusal) => {
                tracing::info!(%peer, reason = %refusal.message, "pairing refused");
                Pairing::Refused(refusal)
            }
        };
        // A refused accepter closes its connection; one that does not is bounded by the
        // connection limits and the idle timeout, and can reach nothing but pairing.
        let _ = wire::write(&mut stream, &reply).await;
        let _ = futures_util::AsyncWriteExt::close(&mut stream).await;
    }

    async fn pairing(&self, peer: PeerId, stream: &mut Stream) -> Result<Pairing, WireError> {
        if self.state().friend(&peer).is_some() {
            return Err(WireError::new("paired", "already paired"));
        }
        if self.pairing_paused() {
            return Err(WireError::new("rate_limited", "too many failed pairing attempts: try again in a minute"));
        }
        let mut nonce = [0u8; 32];
        getrandom::fill(&mut nonce).map_err(|_| WireError::new("failed", "no randomness"))?;
        wire::write(stream, &Pairing::Challenge { nonce: hex(&nonce) })
            .await
            .map_err(|e| WireError::new("failed", e.to_string()))?;
        let (invite, proof, name) = match tokio::time::timeout(FIRST_FRAME, wire::read::<Pairing>(stream)).await {
            Ok(Ok(Some(Pairing::Proof { invite, proof, name }))) => (invite, proof, name),
            _ => {
                self.pair_failed();
                return Err(WireError::new("bad_request", "expected a proof"));
            }
        };
        let me = self.peer_id();
        let now = now_s();
        let verdict = self.update(|s| {
            let Some(pending) = s.invites.iter_mut().find(|i| i.id == invite) else {
                return Err(WireError::new("invalid", "this invite is not valid here"));
            };
            if !pending.verify(&me, &peer, &nonce, &proof) {
                return Err(WireError::new("invalid", "this invite is not valid here"));
            }
            if pending.used {
                return Err(WireError::new("used", "this invite was used already: ask for a new one"));
            }
            if pending.expires <= now {
                return Err(WireError::new("expired", "this invite has expired: ask for a new one"));
            }
            pending.used = true;
            let welcome = pending.welcome(&me, &peer, &nonce);
            let friend = Friend::new(s.free_name(&name), peer, now);
            s.friends.push(friend.clone());
            Ok((friend, welcome))
        });
        match verdict {
            Ok((friend, proof)) => {
                tracing::info!(friend = %friend.name, device_id = %friend.device_id(), "paired");
                self.refresh_soon(friend.peer_id);
                Ok(Pairing::Welcome { name: self.state().name, proof })
            }
            Err(e) => {
                self.pair_failed();
                Err(e)
            }
        }
    }

    fn pairing_paused(&self) -> bool {
        let Ok(mut failures) = self.inner.pair_failures.lock() else { return true };
        while failures.front().is_some_and(|t| t.elapsed() > Duration::from_secs(60)) {
            failures.pop_front();
        }
        failures.len() >= PAIR_FAILURES_PER_MINUTE
    }

    fn pair_failed(&self) {
        if let Ok(mut failures) = self.inner.pair_failures.lock() {
            failures.push_back(Instant::now());
        }
    }

    async fn serve_infer(self, peer: PeerId, stream: Stream) {
        let Some(friend) = self.state().friend(&peer).cloned() else {
            // Only reachable while an invite is open (the gate admitted an unknown peer to
            // pair): the stream is dropped unread.
            tracing::info!(%peer, "inference stream from a peer not on the trust list refused");
            return;
        };
        let (reader, writer) = stream.split();
        // Registered before it runs, so that its own concurrency check counts it.
        let (go, ready) = oneshot::channel::<()>();
        let mesh = self.clone();
        let handle = tokio::spawn(async move {
            if ready.await.is_ok() {
                mesh.run_job(friend, reader, writer).await;
            }
        });
        if let Ok(mut jobs) = self.inner.jobs.lock() {
            let list = jobs.entry(peer).or_default();
            list.retain(|h| !h.is_finished());
            list.push(handle.abort_handle());
        }
        let _ = go.send(());
        let _ = handle.await;
    }

    fn running_jobs(&self, peer: &PeerId) -> usize {
        self.inner
            .jobs
            .lock()
            .map_or(0, |jobs| jobs.get(peer).map_or(0, |l| l.iter().filter(|h| !h.is_finished()).count()))
    }

    async fn run_job(
        self,
        friend: Friend,
        mut reader: futures_util::io::ReadHalf<Stream>,
        mut writer: futures_util::io::WriteHalf<Stream>,
    ) {
        let request = match tokio::time::timeout(FIRST_FRAME, wire::read::<ToServer>(&mut reader)).await {
            Ok(Ok(Some(ToServer::Infer(request)))) => request,
            Ok(Ok(Some(ToServer::Cancel) | None)) => return,
            Ok(Err(e)) => {
                let _ = wire::write(&mut writer, &ToClient::Error(WireError::new("bad_request", e.to_string()))).await;
                return;
            }
            Err(_) => return,
        };
        let refuse = |code: &str, message: String| ToClient::Error(WireError::new(code, message));
        let day = today();
        let refusal = if request.version != wire::VERSION {
            Some(refuse(
                "version",
                format!("message version {} is not supported (this node speaks 1)", request.version),
            ))
        } else if !friend.may_use(&request.model) {
            Some(refuse("model", format!("you may not use {:?} on this node", request.model)))
        } else if self.running_jobs(&friend.peer_id) > friend.max_concurrent as usize {
            Some(refuse(
                "quota",
                format!("concurrent request quota reached: at most {} at a time on this node", friend.max_concurrent),
            ))
        } else if let Some(limit) = friend.tokens_per_day
            && {
                let used = self.state().used_on(&friend.peer_id, day);
                used.tokens_in + used.tokens_out >= limit
            }
        {
            Some(refuse(
                "quota",
                format!("daily token quota of {limit} tokens used up on this node; it resets at 00:00 UTC"),
            ))
        } else {
            None
        };
        if let Some(refusal) = refusal {
            tracing::info!(friend = %friend.name, request = %request.request_id, "friend's request refused");
            let _ = wire::write(&mut writer, &refusal).await;
            return;
        }
        let mut request = request;
        let tokens_left = friend.tokens_per_day.map(|limit| {
            let used = self.state().used_on(&friend.peer_id, day);
            limit.saturating_sub(used.tokens_in + used.tokens_out)
        });
        if let Some(left) = tokens_left {
            let budget = left as usize + request.continue_ids.len();
            request.params.max_tokens = request.params.max_tokens.min(budget);
        }
        let request_id = request.request_id.clone();
        let (events, mut rx) = mpsc::channel(64);
        let prompt_tokens = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let job = ServeJob {
            friend: friend.name.clone(),
            request,
            events,
            tokens_left,
            prompt_tokens: prompt_tokens.clone(),
        };
        if self.inner.serve.send(job).await.is_err() {
            let _ = wire::write(&mut writer, &refuse("failed", "this node is shutting down".into())).await;
            return;
        }
        self.inner.served.fetch_add(1, Ordering::Relaxed);
        tracing::info!(friend = %friend.name, request = %request_id, "serving a friend's request");
        let mut tokens_out = 0u64;
        let mut tokens_in = 0u64;
        let mut cancel = Box::pin(wire::read::<ToServer>(&mut reader));
        loop {
            tokio::select! {
                event = rx.recv() => {
                    let Some(event) = event else { break };
                    let last = !matches!(event, ToClient::Token { .. });
                    match &event {
                        ToClient::Token { .. } => tokens_out += 1,
                        ToClient::Done(done) => {
                            tokens_in = done.prompt_tokens;
                            tokens_out = done.completion_tokens;
                        }
                        ToClient::Error(_) => {}
                    }
                    if wire::write(&mut writer, &event).await.is_err() || last {
                        break;
                    }
                }
                // A cancel frame, the end of the stream or a broken one: stop either way.
                _ = &mut cancel => break,
            }
        }
        drop(rx);
        if tokens_in == 0 {
            // Cancelled (or failed) before the end: the prompt still ran.
            tokens_in = prompt_tokens.load(Ordering::Relaxed);
        }
        self.update(|s| s.record(&friend.peer_id, day, tokens_in, tokens_out));
        tracing::info!(friend = %friend.name, request = %request_id, tokens_in, tokens_out, "friend's request ended");
    }
}

/// Relaying for friends (only they can connect at all): circuits long and large enough
/// for an answer, a handful per friend.
fn relay_config() -> relay::Config {
    relay::Config {
        max_circuit_duration: Duration::from_secs(3600),
        max_circuit_bytes: 1 << 30,
        max_circuits_per_peer: 8,
        ..relay::Config::default()
    }
}

/// The protocol of a relay v2 server.
const RELAY_HOP: StreamProtocol = StreamProtocol::new("/libp2p/circuit/relay/0.2.0/hop");

/// The inviter's next pairing message; a refusal, silence or a closed stream is an error.
/// Tries at a request whose stream the peer dropped before answering anything.
const UNANSWERED_ATTEMPTS: u32 = 3;
const UNANSWERED_BACKOFF: Duration = Duration::from_millis(50);

/// Whether a stream ended (or broke) before its first frame. libp2p-stream drops an
/// inbound stream when the previous one has not been taken yet (its accept channel holds
/// one), so a burst of requests can lose some before the peer saw them: the peer never
/// read them, and sending again is safe.
fn dropped_unanswered<T>(first: &Result<Option<T>, FrameError>) -> bool {
    matches!(first, Ok(None) | Err(FrameError::Io(_)))
}

/// Whether attempt number `attempt` at a request dropped unanswered may be followed by
/// another; if so, counts it and waits a little longer each time first.
async fn try_again(attempt: &mut u32) -> bool {
    if *attempt >= UNANSWERED_ATTEMPTS {
        return false;
    }
    *attempt += 1;
    tokio::time::sleep(UNANSWERED_BACKOFF * *attempt).await;
    true
}

async fn read_answer(stream: &mut Stream, inviter: &PeerId) -> Result<Pairing, MeshError> {
    answer(tokio::time::timeout(FIRST_FRAME, wire::read::<Pairing>(stream)).await, inviter)
}

/// An inviter's answer, read within [`FIRST_FRAME`].
fn answer(
    read: Result<Result<Option<Pairing>, FrameError>, tokio::time::error::Elapsed>,
    inviter: &PeerId,
) -> Result<Pairing, MeshError> {
    match read {
        Ok(Ok(Some(Pairing::Refused(e)))) => Err(MeshError::Refused(e.message)),
        Ok(Ok(Some(answer))) => Ok(answer),
        Ok(Ok(None)) => Err(MeshError::Refused("the inviter closed the stream".into())),
        Ok(Err(source)) => Err(MeshError::Frame { peer: inviter.to_string(), source }),
        Err(_) => Err(MeshError::Refused("no answer".into())),
    }
}

fn has_open_invite(state: &MeshState, now: u64) -> bool {
    state.invites.iter().any(|i| !i.used && i.expires > now)
}

fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

/// An answer streaming back from a friend. Dropping it cancels the generation there.
pub struct Offload {
    friend: String,
    read: futures_util::io::ReadHalf<Stream>,
    write: Option<futures_util::io::WriteHalf<Stream>>,
    done: bool,
    /// To send the request again while nothing has been answered (see
    /// [`dropped_unanswered`]); gone after the first frame.
    retry: Option<(Mesh, PeerId, InferRequest)>,
    attempt: u32,
}

impl std::fmt::Debug for Offload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offload").field("friend", &self.friend).finish_non_exhaustive()
    }
}

impl Offload {
    /// The friend's name.
    pub fn friend(&self) -> &str {
        &self.friend
    }

    /// The next event: tokens, then `Done`; a refusal or a broken stream is an error.
    /// `None` after `Done`.
    pub async fn next(&mut self) -> Option<Result<ToClient, MeshError>> {
        if self.done {
            return None;
        }
        let mut event = wire::read::<ToClient>(&mut self.read).await;
        while dropped_unanswered(&event) && self.retry.is_some() && try_again(&mut self.attempt).await {
            let Some((mesh, peer, request)) = &self.retry else { break };
            tracing::debug!(friend = %self.friend, attempt = self.attempt, "request dropped unanswered; sending it again");
            match mesh.send_infer(*peer, &self.friend, request).await {
                Ok((read, write)) => {
                    (self.read, self.write) = (read, Some(write));
                    event = wire::read::<ToClient>(&mut self.read).await;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        self.retry = None;
        let peer = self.friend.clone();
        match event {
            Ok(Some(ToClient::Error(e))) => {
                self.done = true;
                Some(Err(MeshError::Remote { peer, error: RemoteError { code: e.code, message: e.message } }))
            }
            Ok(Some(event)) => {
                self.done = matches!(event, ToClient::Done(_));
                Some(Ok(event))
            }
            Ok(None) => {
                self.done = true;
                Some(Err(MeshError::Frame { peer, source: FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()) }))
            }
            Err(source) => {
                self.done = true;
                Some(Err(MeshError::Frame { peer, source }))
            }
        }
    }

    /// Asks the friend to stop.
    pub async fn cancel(&mut self) {
        if let Some(mut write) = self.write.take() {
            let _ = wire::write(&mut write, &ToServer::Cancel).await;
            let _ = futures_util::AsyncWriteExt::close(&mut write).await;
        }
        self.done = true;
    }
}

async fn accept_loop<F, Fut>(mut incoming: libp2p_stream::IncomingStreams, mesh: std::sync::Weak<Inner>, handle: F)
where
    F: Fn(Mesh, PeerId, Stream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    while let Some((peer, stream)) = incoming.next().await {
        let Some(inner) = mesh.upgrade() else { return };
        tokio::spawn(handle(Mesh { inner }, peer, stream));
    }
}

/// Changes the mesh state, updates admission from it and hands the new state to whoever
/// saves it.
fn update<T>(inner: &Inner, change: impl FnOnce(&mut MeshState) -> T) -> T {
    let (out, snapshot) = {
        let mut state = match inner.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let out = change(&mut state);
        (out, state.clone())
    };
    if let Ok(mut admission) = inner.admission.write() {
        admission.trusted = snapshot.friends.iter().map(|f| f.peer_id).collect();
        admission.pairing_open = has_open_invite(&snapshot, now_s());
    }
    inner.saved.send_replace(snapshot);
    out
}

/// Friends' relays: the address each was dialled at, which relay, and which hold a slot
/// for us; and over which transports each was reached or tried.
#[derive(Default)]
struct Relays {
    dialed: HashMap<PeerId, Multiaddr>,
    capable: std::collections::HashSet<PeerId>,
    reserved: std::collections::HashSet<PeerId>,
    transports: std::collections::HashSet<(PeerId, Transport)>,
    /// Relayed connections to each friend, closed once a hole is punched.
    circuits: HashMap<PeerId, Vec<libp2p::swarm::ConnectionId>>,
    /// Transports on which a peer has told us our outside address.
    outside: std::collections::HashSet<Transport>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Transport {
    Tcp,
    Quic,
}

impl Transport {
    fn of(addr: &Multiaddr) -> Option<Self> {
        if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
            None
        } else if addr.iter().any(|p| matches!(p, Protocol::QuicV1)) {
            Some(Self::Quic)
        } else if addr.iter().any(|p| matches!(p, Protocol::Tcp(_))) {
            Some(Self::Tcp)
        } else {
            None
        }
    }
}

/// Saves where a friend says it listens (at most [`MAX_SAVED_ADDRS`]), so that after a
/// restart this node can dial it whichever side made the invite.
fn save_addrs(inner: &Inner, peer: PeerId, listen_addrs: &[Multiaddr]) {
    let mut sorted = listen_addrs.to_vec();
    sorted.sort_by_key(|a| (is_loopback(a), a.iter().any(|p| matches!(p, Protocol::P2pCircuit))));
    let addrs: Vec<String> = sorted.iter().take(MAX_SAVED_ADDRS).map(|a| a.to_string()).collect();
    let unchanged = inner.state.lock().is_ok_and(|s| {
        s.friends.iter().find(|f| f.peer_id == peer).is_none_or(|f| f.addrs == addrs || addrs.is_empty())
    });
    if !unchanged {
        update(inner, |s| {
            if let Some(friend) = s.friends.iter_mut().find(|f| f.peer_id == peer) {
                friend.addrs = addrs;
            }
        });
    }
}

/// Connects to the relay `peer` over each transport it listens on and we have not used
/// with it yet (once each): hole punching can only meet on a transport both sides know
/// their outside address for, and a node learns that address (identify's observed one)
/// only from a connection over that transport.
fn observe_on_every_transport(
    swarm: &mut libp2p::Swarm<Behaviour>,
    relays: &mut Relays,
    peer: PeerId,
    listen_addrs: &[Multiaddr],
) {
    if !relays.capable.contains(&peer) {
        return;
    }
    for transport in [Transport::Tcp, Transport::Quic] {
        if relays.transports.contains(&(peer, transport)) {
            continue;
        }
        let addrs: Vec<Multiaddr> =
            listen_addrs.iter().filter(|a| Transport::of(a) == Some(transport) && !is_loopback(a)).cloned().collect();
        if addrs.is_empty() {
            continue;
        }
        relays.transports.insert((peer, transport));
        tracing::debug!(relay = %peer, ?transport, "connecting over another transport to learn our address on it");
        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
            .build();
        let _ = swarm.dial(opts);
    }
}

/// Opens a new relayed connection to each friend reachable only through a relay. DCUtR
/// takes both sides' outside addresses once, when a relayed connection opens, and retries
/// with those: after this node learns its address on another transport, only a new
/// relayed connection lets hole punching try it (the old one is closed on success).
fn punch_again(swarm: &mut libp2p::Swarm<Behaviour>, relays: &Relays) {
    let Some((relay, addr)) = relays.dialed.iter().find(|(peer, _)| relays.capable.contains(peer)) else {
        return;
    };
    let through: Vec<PeerId> = relays
        .circuits
        .iter()
        .filter(|(friend, ids)| !ids.is_empty() && *friend != relay)
        .map(|(friend, _)| *friend)
        .collect();
    for friend in through {
        let circuit = addr
            .clone()
            .with_p2p(*relay)
            .unwrap_or_else(|addr| addr)
            .with(Protocol::P2pCircuit)
            .with(Protocol::P2p(friend));
        tracing::info!(peer = %friend, %circuit, "new outside address: through the relay again to punch a hole with it");
        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(friend)
            .addresses(vec![circuit])
            .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
            .build();
        let _ = swarm.dial(opts);
    }
}

/// Reserves a slot on `peer` if it is a trusted relay we dialled, so that friends who
/// cannot reach this node directly can through it (and then try hole punching).
fn reserve(swarm: &mut libp2p::Swarm<Behaviour>, relays: &mut Relays, peer: PeerId) {
    if !relays.capable.contains(&peer) || relays.reserved.contains(&peer) {
        return;
    }
    let Some(addr) = relays.dialed.get(&peer) else { return };
    let circuit = addr.clone().with_p2p(peer).unwrap_or_else(|addr| addr).with(Protocol::P2pCircuit);
    match swarm.listen_on(circuit.clone()) {
        Ok(_) => {
            tracing::info!(relay = %peer, %circuit, "asking a friend for a relay slot");
            relays.reserved.insert(peer);
        }
        Err(e) => tracing::debug!(relay = %peer, error = %e, "no relay slot"),
    }
}

async fn run_swarm(
    mut swarm: libp2p::Swarm<Behaviour>,
    mut commands: mpsc::UnboundedReceiver<SwarmCommand>,
    listen: watch::Sender<Vec<Multiaddr>>,
    mesh: std::sync::Weak<Inner>,
) {
    // Where peers were reached or said they listen (the swarm keeps no address book).
    let mut book: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
    let mut relays = Relays::default();
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None => return,
                Some(SwarmCommand::Dial { peer, addrs, known }) => {
                    let known_addrs = book.entry(peer).or_default();
                    for addr in addrs {
                        if !known_addrs.contains(&addr) {
                            swarm.add_peer_address(peer, addr.clone());
                            known_addrs.push(addr);
                        }
                    }
                    if let Some(known) = known {
                        let _ = known.send(());
                    }
                    if !swarm.is_connected(&peer) {
                        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer).addresses(known_addrs.clone()).build();
                        if let Err(e) = swarm.dial(opts)
                            && !matches!(e, libp2p::swarm::DialError::DialPeerConditionFalse(_))
                            && let Some(inner) = mesh.upgrade()
                        {
                            tracing::debug!(%peer, error = %e, "dial failed");
                            if let Ok(mut live) = inner.live.lock() {
                                live.entry(peer).or_default().dial_error = Some(e.to_string());
                            }
                            inner.connections.send_modify(|n| *n += 1);
                        }
                    }
                }
                Some(SwarmCommand::Disconnect(peer)) => {
                    let _ = swarm.disconnect_peer_id(peer);
                }
                Some(SwarmCommand::Trusted(peer)) => {
                    reserve(&mut swarm, &mut relays, peer);
                    // What it said it listens on while still a stranger (pairing).
                    if let (Some(inner), Some(addrs)) = (mesh.upgrade(), book.get(&peer)) {
                        save_addrs(&inner, peer, addrs);
                        observe_on_every_transport(&mut swarm, &mut relays, peer, addrs);
                    }
                }
            },
            event = swarm.select_next_some() => {
                let Some(inner) = mesh.upgrade() else { return };
                on_event(&mut swarm, event, &inner, &listen, &mut book, &mut relays);
            }
        }
    }
}

fn on_event(
    swarm: &mut libp2p::Swarm<Behaviour>,
    event: SwarmEvent<BehaviourEvent>,
    inner: &Inner,
    listen: &watch::Sender<Vec<Multiaddr>>,
    book: &mut HashMap<PeerId, Vec<Multiaddr>>,
    relays: &mut Relays,
) {
    let mut remember = |peer: PeerId, addr: Multiaddr| {
        let known = book.entry(peer).or_default();
        if !known.contains(&addr) {
            known.push(addr);
        }
    };
    let trusted = |peer: &PeerId| inner.admission.read().is_ok_and(|a| a.trusted.contains(peer));
    let with_live = |peer: PeerId, f: &mut dyn FnMut(&mut Live)| {
        if let Ok(mut live) = inner.live.lock() {
            f(live.entry(peer).or_default());
        }
    };
    match event {
        SwarmEvent::NewListenAddr { address, .. } => {
            tracing::info!(%address, "mesh listening");
            // A relay serves only once it has an external address: friends that reach this
            // node at one of its own addresses (not loopback, not a circuit) may use it.
            if inner.config.relay_server
                && !is_loopback(&address)
                && !address.iter().any(|p| matches!(p, Protocol::P2pCircuit))
            {
                swarm.add_external_address(address.clone());
            }
            listen.send_modify(|addrs| addrs.push(address));
        }
        SwarmEvent::NewExternalAddrCandidate { address } => {
            // What a peer sees of this node (identify): hole punching's candidates.
            tracing::info!(%address, "outside address seen by a peer");
            if let Some(transport) = Transport::of(&address)
                && relays.outside.insert(transport)
            {
                punch_again(swarm, relays);
            }
        }
        SwarmEvent::ExpiredListenAddr { address, .. } => listen.send_modify(|addrs| addrs.retain(|a| *a != address)),
        SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, .. } => {
            let relayed = endpoint.is_relayed();
            if relayed {
                relays.circuits.entry(peer_id).or_default().push(connection_id);
            }
            if endpoint.is_dialer() && !relayed {
                // An address that reaches this peer from here: where to ask for a relay slot.
                relays.dialed.insert(peer_id, endpoint.get_remote_address().clone());
            }
            if let Some(transport) = Transport::of(endpoint.get_remote_address()) {
                relays.transports.insert((peer_id, transport));
            }
            tracing::debug!(peer = %peer_id, relayed, "connected");
            with_live(peer_id, &mut |l| {
                if relayed {
                    l.relayed.insert(connection_id);
                    l.punched = false;
                } else {
                    l.direct.insert(connection_id);
                }
            });
            inner.connections.send_modify(|n| *n += 1);
        }
        SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. }
            if !swarm.is_connected(&peer) && !matches!(error, libp2p::swarm::DialError::DialPeerConditionFalse(_)) =>
        {
            tracing::debug!(%peer, error = %error, "dial failed");
            with_live(peer, &mut |l| l.dial_error = Some(error.to_string()));
            inner.connections.send_modify(|n| *n += 1);
        }
        SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, cause, .. } => {
            with_live(peer_id, &mut |l| {
                l.direct.remove(&connection_id);
                l.relayed.remove(&connection_id);
            });
            if num_established > 0 {
                tracing::debug!(peer = %peer_id, num_established, ?cause, "one connection closed");
                return;
            }
            tracing::debug!(peer = %peer_id, ?cause, "disconnected");
            // Its relay slot (if any) went with the connection.
            relays.reserved.remove(&peer_id);
            relays.transports.retain(|(peer, _)| *peer != peer_id);
            relays.circuits.remove(&peer_id);
            if !trusted(&peer_id) {
                book.remove(&peer_id);
            }
        }
        SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, result: Ok(rtt), .. })) => {
            with_live(peer, &mut |l| l.rtt = Some(rtt));
        }
        SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }))
            if trusted(&peer_id) =>
        {
            for addr in &info.listen_addrs {
                swarm.add_peer_address(peer_id, addr.clone());
                remember(peer_id, addr.clone());
            }
            tracing::debug!(peer = %peer_id, protocols = ?info.protocols, "identified a friend");
            save_addrs(inner, peer_id, &info.listen_addrs);
            if info.protocols.contains(&RELAY_HOP) {
                relays.capable.insert(peer_id);
            }
            reserve(swarm, relays, peer_id);
            observe_on_every_transport(swarm, relays, peer_id, &info.listen_addrs);
        }
        SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
            // Not trusted (yet): remember whether it relays and where it listens, for when
            // pairing succeeds (only the swarm's own book: nothing is dialled or saved).
            tracing::debug!(peer = %peer_id, protocols = ?info.protocols, "identified a stranger");
            for addr in info.listen_addrs.into_iter().take(MAX_SAVED_ADDRS) {
                remember(peer_id, addr);
            }
            if info.protocols.contains(&RELAY_HOP) {
                relays.capable.insert(peer_id);
            }
        }
        SwarmEvent::Behaviour(BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
            relay_peer_id,
            ..
        })) => {
            tracing::info!(relay = %relay_peer_id, "relay slot reserved");
        }
        SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
            for (peer, addr) in found {
                // mDNS only finds addresses of peers already trusted; strangers are ignored.
                if trusted(&peer) {
                    swarm.add_peer_address(peer, addr.clone());
                    remember(peer, addr.clone());
                    if !swarm.is_connected(&peer) {
                        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer).addresses(vec![addr]).build();
                        let _ = swarm.dial(opts);
                    }
                }
            }
        }
        SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event { remote_peer_id, result })) => match result {
            Ok(_) => {
                tracing::info!(peer = %remote_peer_id, "hole punched: direct connection");
                with_live(remote_peer_id, &mut |l| l.punched = true);
                // Streams go over the direct connection from now on: the relay's is closed.
                for circuit in relays.circuits.remove(&remote_peer_id).unwrap_or_default() {
                    swarm.close_connection(circuit);
                }
            }
            Err(e) => tracing::info!(peer = %remote_peer_id, error = %e, "hole punching failed; staying relayed"),
        },
        _ => {}
    }
}
