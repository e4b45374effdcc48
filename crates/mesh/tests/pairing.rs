//! Real libp2p nodes on loopback: pairing, deny by default, quotas, removal.
//!
//! The serving side here is a counter that streams numbered tokens (the engine-backed
//! side is tested in `tests/e2e/mesh.rs` with real models).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kith_mesh::wire::{AdvertModel, Done, InferRequest, ToClient, VERSION};
use kith_mesh::{FriendUpdate, Identity, Mesh, MeshConfig, MeshError, MeshState, ServeJob};
use kith_types::{ChatMessage, SamplingParams};
use tokio::sync::mpsc;

fn config() -> MeshConfig {
    MeshConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("must succeed")],
        mdns: false,
        relay_server: false,
        ..MeshConfig::default()
    }
}

fn offer() -> kith_mesh::OfferFn {
    Arc::new(|| {
        vec![AdvertModel {
            name: "counter".into(),
            device: "cpu".into(),
            tokens_per_s: 100.0,
            queued: 0,
            context_length: 2048,
        }]
    })
}

/// Streams `max_tokens` tokens, one every `step`; counts jobs that ended early.
fn serve(mut jobs: mpsc::Receiver<ServeJob>, step: Duration) -> Arc<std::sync::Mutex<Vec<Instant>>> {
    let stopped = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = stopped.clone();
    tokio::spawn(async move {
        while let Some(job) = jobs.recv().await {
            let log = log.clone();
            tokio::spawn(async move {
                let start = job.request.continue_ids.len();
                for i in start..job.request.params.max_tokens {
                    tokio::time::sleep(step).await;
                    if job.events.send(ToClient::Token { id: i as u32, text: format!("{i} ") }).await.is_err() {
                        log.lock().expect("must succeed").push(Instant::now());
                        return;
                    }
                }
                let done = Done {
                    text: String::new(),
                    stop_reason: "length".into(),
                    prompt_tokens: 3,
                    completion_tokens: (job.request.params.max_tokens - start) as u64,
                    first_token_ms: 0.0,
                    decode_ms: 0.0,
                };
                let _ = job.events.send(ToClient::Done(done)).await;
            });
        }
    });
    stopped
}

async fn node(name: &str, step: Duration) -> (Mesh, Arc<std::sync::Mutex<Vec<Instant>>>) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("KITH_LOG"))
        .with_test_writer()
        .try_init();
    let state = MeshState { name: name.into(), ..MeshState::default() };
    let (mesh, jobs) = Mesh::start(Identity::generate(), state, config(), offer()).await.expect("must succeed");
    let stopped = serve(jobs, step);
    (mesh, stopped)
}

fn request(max_tokens: usize) -> InferRequest {
    let mut params = SamplingParams::greedy();
    params.max_tokens = max_tokens;
    InferRequest {
        version: VERSION,
        request_id: "t".into(),
        model: "counter".into(),
        messages: vec![ChatMessage::user("count")],
        params,
        continue_ids: Vec::new(),
    }
}

async fn collect(mesh: &Mesh, peer: kith_mesh::PeerId, request: InferRequest) -> Result<String, MeshError> {
    let mut offload = mesh.infer(peer, request).await?;
    let mut text = String::new();
    while let Some(event) = offload.next().await {
        match event? {
            ToClient::Token { text: t, .. } => text.push_str(&t),
            ToClient::Done(_) => break,
            ToClient::Error(_) => unreachable!("errors come as Err"),
        }
    }
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_offload_and_refusals() {
    let (a, _) = node("alice", Duration::from_millis(1)).await;
    let (b, b_stopped) = node("bob", Duration::from_millis(20)).await;

    // An untrusted node cannot use B: its connection is closed after the handshake.
    let (d, _) = node("mallory", Duration::from_millis(1)).await;
    let invite = b.invite();
    let friend = a.accept(&invite.encode()).await.expect("must succeed");
    assert_eq!(friend.name, "bob");
    assert_eq!(friend.peer_id, b.peer_id());
    let seen_by_b = b.find("alice").expect("must succeed");
    assert_eq!(seen_by_b.peer_id, a.peer_id());
    // The inviter saves where the accepter listens (told while it was still a stranger),
    // so that it can dial it after a restart.
    let mut saved = Vec::new();
    for _ in 0..50 {
        saved = b.find("alice").expect("must succeed").addrs;
        if !saved.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a_listens: Vec<String> = a.listen_addrs().iter().map(|m| m.to_string()).collect();
    assert!(saved.iter().any(|s| a_listens.contains(s)), "saved {saved:?}, A listens on {a_listens:?}");
    assert!(b.state().invites.iter().all(|i| i.used));
    assert_eq!(a.find(&b.device_id().to_string()).expect("must succeed").name, "bob");

    // With no open invite, D's connection is denied before any stream: it cannot infer.
    let denied_before = b.denied_connections();
    let served_before = b.served_jobs();
    let err = d.infer(b.peer_id(), request(3)).await.expect_err("must fail");
    assert!(matches!(err, MeshError::NoFriend(_)), "D does not even list B: {err}");
    let opened = d.probe_infer(b.peer_id(), b.listen_addrs(), request(3)).await;
    assert!(matches!(opened, Err(MeshError::Unreachable { .. })), "a stranger's stream must not open: {opened:?}");
    assert!(b.denied_connections() > denied_before, "the gate closed D's connection");
    assert_eq!(b.served_jobs(), served_before, "no job ran for D");

    // A offloads to B.
    b.refresh().await;
    a.refresh().await;
    let candidates = a.candidates("counter");
    assert_eq!(candidates.len(), 1);
    assert_eq!(candidates[0].name, "bob");
    assert_eq!(collect(&a, b.peer_id(), request(4)).await.expect("must succeed"), "0 1 2 3 ");
    let mut cont = request(4);
    cont.continue_ids = vec![0, 1];
    assert_eq!(collect(&a, b.peer_id(), cont).await.expect("must succeed"), "2 3 ", "continues after the given tokens");
    let usage = b.state().used_on(&a.peer_id(), kith_mesh::now_s() / 86_400);
    assert_eq!((usage.requests, usage.tokens_in, usage.tokens_out), (2, 6, 6));

    // A model B does not offer A.
    b.set("alice", FriendUpdate { models: Some(vec!["other".into()]), ..Default::default() }).expect("must succeed");
    let err = collect(&a, b.peer_id(), request(2)).await.expect_err("must fail");
    assert!(matches!(&err, MeshError::Remote { error, .. } if error.code == "model"), "{err}");
    b.set("alice", FriendUpdate { models: Some(vec!["*".into()]), ..Default::default() }).expect("must succeed");

    // The daily token quota: the request that crosses it is cut short, the next refused.
    b.set("alice", FriendUpdate { tokens_per_day: Some(16), ..Default::default() }).expect("must succeed");
    assert_eq!(
        collect(&a, b.peer_id(), request(50)).await.expect("must succeed"),
        "0 1 2 3 ",
        "capped at the 4 tokens left"
    );
    let err = collect(&a, b.peer_id(), request(5)).await.expect_err("must fail");
    match &err {
        MeshError::Remote { error, .. } => {
            assert_eq!(error.code, "quota");
            assert!(error.message.contains("daily token quota of 16 tokens"), "{}", error.message);
        }
        other => panic!("expected a quota refusal, got {other}"),
    }
    b.set("alice", FriendUpdate { tokens_per_day: Some(0), ..Default::default() }).expect("must succeed");

    // Removing A cancels A's running job on B within a second.
    let mut running = a.infer(b.peer_id(), request(10_000)).await.expect("must succeed");
    assert!(matches!(running.next().await, Some(Ok(ToClient::Token { .. }))));
    let removed_at = Instant::now();
    b.remove("alice").expect("must succeed");
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(2), running.next()).await {
            Ok(Some(Ok(ToClient::Token { .. }))) => continue,
            Ok(other) => break other,
            Err(_) => panic!("the stream did not end after removal"),
        }
    };
    assert!(matches!(ended, Some(Err(_))), "the stream ends with an error: {ended:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopped = b_stopped.lock().expect("must succeed").last().copied().expect("the serving job stopped");
    assert!(stopped.duration_since(removed_at) < Duration::from_secs(1), "{:?}", stopped.duration_since(removed_at));
    assert!(b.find("alice").is_err());
    // A's requests are now refused at the gate.
    let again = collect(&a, b.peer_id(), request(2)).await.expect_err("must fail");
    assert!(matches!(again, MeshError::Unreachable { .. }), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_expired_and_guessed_invites_are_refused_and_rate_limited() {
    let (a, _) = node("alice", Duration::from_millis(1)).await;
    let (b, _) = node("bob", Duration::from_millis(1)).await;
    let (d, _) = node("mallory", Duration::from_millis(1)).await;
    let expired = b.invite_for(Duration::ZERO);
    let good = b.invite();
    let open = b.invite(); // keeps pairing open, so that every attempt reaches the checks
    let err = a.accept(&expired.encode()).await.expect_err("must fail");
    assert!(err.to_string().contains("expired"), "{err}");
    assert!(b.find("alice").is_err() && a.find("bob").is_err());

    a.accept(&good.encode()).await.expect("must succeed");
    // Replayed by another node: refused, and B does not trust it.
    let err = d.accept(&good.encode()).await.expect_err("must fail");
    assert!(err.to_string().contains("used already"), "{err}");
    assert!(b.find("mallory").is_err() && d.find("bob").is_err());
    // While an invite is open a stranger may connect, but only to pair.
    let probe = d.probe_infer(b.peer_id(), b.listen_addrs(), request(3)).await;
    assert!(probe.is_err(), "{probe:?}");
    assert_eq!(b.served_jobs(), 0);

    // Guessed codes: B's peer id with made-up secrets; after 5 failures a minute, pairing pauses.
    let mut seen = Vec::new();
    for _ in 0..4 {
        let guess = kith_mesh::InviteCode::new(b.peer_id(), b.listen_addrs(), kith_mesh::now_s() + 60);
        seen.push(d.accept(&guess.encode()).await.expect_err("must fail").to_string());
    }
    assert!(seen[3].contains("too many failed pairing attempts"), "{seen:#?}");
    // Even the right code is refused while pairing is paused.
    let err = d.accept(&open.encode()).await.expect_err("must fail");
    assert!(err.to_string().contains("too many"), "{err}");
    assert!(b.find("mallory").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_pairs_and_offloads_and_unknown_versions_are_refused() {
    let quic = || MeshConfig {
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("must succeed")],
        mdns: false,
        relay_server: false,
        ..MeshConfig::default()
    };
    let start = |name: &str| {
        let state = MeshState { name: name.into(), ..MeshState::default() };
        Mesh::start(Identity::generate(), state, quic(), offer())
    };
    let (a, _a_jobs) = start("alice").await.expect("must succeed");
    let (b, b_jobs) = start("bob").await.expect("must succeed");
    let _ = serve(b_jobs, Duration::from_millis(1));
    assert!(b.listen_addrs().iter().all(|addr| addr.to_string().contains("/quic-v1")));
    a.accept(&b.invite().encode()).await.expect("pairs over QUIC");
    assert_eq!(collect(&a, b.peer_id(), request(3)).await.expect("must succeed"), "0 1 2 ");

    let mut future = request(3);
    future.version = 2;
    let err = collect(&a, b.peer_id(), future).await.expect_err("must fail");
    assert!(matches!(&err, MeshError::Remote { error, .. } if error.code == "version"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_quota_holds() {
    let (a, _) = node("alice", Duration::from_millis(1)).await;
    let (b, _) = node("bob", Duration::from_millis(20)).await;
    a.accept(&b.invite().encode()).await.expect("must succeed");
    b.set("alice", FriendUpdate { max_concurrent: Some(1), ..Default::default() }).expect("must succeed");
    let mut first = a.infer(b.peer_id(), request(1000)).await.expect("must succeed");
    assert!(matches!(first.next().await, Some(Ok(ToClient::Token { .. }))));
    let err = collect(&a, b.peer_id(), request(2)).await.expect_err("must fail");
    match &err {
        MeshError::Remote { error, .. } => {
            assert_eq!(error.code, "quota");
            assert!(error.message.contains("at most 1 at a time"), "{}", error.message);
        }
        other => panic!("expected a concurrency refusal, got {other}"),
    }
    first.cancel().await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(collect(&a, b.peer_id(), request(2)).await.expect("a place again"), "0 1 ");
}

/// A burst of requests opened at once all get answered: streams the serving side drops
/// unread (libp2p-stream keeps one waiting inbound stream) are sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_requests_is_all_answered() {
    let (a, _) = node("alice", Duration::from_millis(1)).await;
    let (b, _) = node("bob", Duration::from_millis(1)).await;
    a.accept(&b.invite().encode()).await.expect("pairs");
    b.set("alice", FriendUpdate { max_concurrent: Some(128), tokens_per_day: Some(0), ..Default::default() })
        .expect("limits");
    for round in 0..5 {
        let burst: Vec<_> = (0..64)
            .map(|_| {
                let a = a.clone();
                let peer = b.peer_id();
                tokio::spawn(async move { collect(&a, peer, request(4)).await })
            })
            .collect();
        for answer in futures_util::future::join_all(burst).await {
            let answer = answer.expect("task").unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(answer, "0 1 2 3 ");
        }
    }
}
