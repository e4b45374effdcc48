//! Offload over the mesh on loopback: `cargo bench -p kith-tests --bench mesh`
//! (KITH_THREADS to set threads).
//!
//! Node B serves SmolLM2; node A has no model and is B's friend. The same greedy chat
//! request (up to 128 tokens) runs 11 times on B itself and 11 times from A through the
//! mesh (warm connection), alternating. Reported: median decode tok/s (first token to
//! last, as each side receives them), time to first token, and the per-pair ratios.
//!
//! Then owner priority: B's owner asks a short question while idle (11 times), and again
//! while 16 friend streams run on B; reported: the owner's median time to first token
//! under that load ÷ idle.

use std::time::{Duration, Instant};

use kith_infer::{GenerateRequest, LoadOptions, LoadedModel, Prompt, StreamEvent, TokenStream};
use kith_mesh::{Identity, Mesh, MeshConfig, MeshState};
use kith_node::{Node, NodeBuilder};
use kith_types::{ChatMessage, Privacy, SamplingParams};

const MODEL: &str = "smollm2-135m";
const QUESTION: &str = "Write a detailed story about a lighthouse keeper and a storm.";
const RUNS: usize = 11;

fn load() -> LoadedModel {
    let catalog = kith_models::Catalog::builtin().expect("catalog");
    let store = kith_models::Store::from_env().expect("store");
    let path = store.installed_path(catalog.get(MODEL).expect("entry")).expect("smollm2-135m is pulled");
    LoadedModel::load(&path, &LoadOptions::default()).expect("loads")
}

fn request(question: &str, max_tokens: usize) -> GenerateRequest {
    let mut params = SamplingParams::greedy();
    params.max_tokens = max_tokens;
    GenerateRequest::new(Prompt::Chat(vec![ChatMessage::user(question)]), params)
}

struct Run {
    first_token: Duration,
    tokens: usize,
    decode: Duration,
}

impl Run {
    fn rate(&self) -> f64 {
        self.tokens.saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

async fn collect(started: Instant, mut stream: TokenStream, stop_after_first: bool) -> Run {
    let (mut first, mut last, mut tokens) = (None, Duration::ZERO, 0);
    while let Some(event) = stream.next().await {
        match event.expect("event") {
            StreamEvent::Token(_) => {
                tokens += 1;
                last = started.elapsed();
                first.get_or_insert(last);
                if stop_after_first {
                    break;
                }
            }
            StreamEvent::Done(_) => break,
            _ => {}
        }
    }
    let first = first.unwrap_or_default();
    Run { first_token: first, tokens, decode: last.saturating_sub(first) }
}

async fn run(node: &Node, question: &str, max_tokens: usize, privacy: Privacy, first_only: bool) -> Run {
    let started = Instant::now();
    let generation = node.generate(MODEL, request(question, max_tokens), privacy).await.expect("generate");
    collect(started, generation.stream, first_only).await
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

async fn join(node: &Node, name: &str) -> Mesh {
    let config = MeshConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
        mdns: false,
        relay_server: false,
        ..MeshConfig::default()
    };
    let state = MeshState { name: name.into(), ..MeshState::default() };
    let (mesh, jobs) = Mesh::start(Identity::generate(), state, config, node.offer()).await.expect("mesh");
    node.attach_mesh(mesh.clone(), jobs);
    mesh
}

fn main() {
    // KITH_LOG=kith_mesh=debug (say) shows the mesh at work.
    if let Ok(filter) = std::env::var("KITH_LOG") {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let b = NodeBuilder::new().model(MODEL, load()).build().expect("B");
        let a = NodeBuilder::new().build().expect("A");
        let (a_mesh, b_mesh) = (join(&a, "alice").await, join(&b, "bob").await);
        a_mesh.accept(&b_mesh.invite().encode()).await.expect("pair");
        b_mesh.set("alice", kith_mesh::FriendUpdate { tokens_per_day: Some(0), max_concurrent: Some(32), ..Default::default() }).expect("no quota");
        a_mesh.refresh().await;
        // Warm-up: connection, caches, both paths.
        run(&b, QUESTION, 128, Privacy::LocalOnly, false).await;
        run(&a, QUESTION, 128, Privacy::FriendsAllowed, false).await;

        let (mut local, mut offloaded) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            local.push(run(&b, QUESTION, 128, Privacy::LocalOnly, false).await);
            offloaded.push(run(&a, QUESTION, 128, Privacy::FriendsAllowed, false).await);
        }
        let rate = |runs: &[Run]| median(runs.iter().map(Run::rate).collect());
        let ttft = |runs: &[Run]| median(runs.iter().map(|r| r.first_token.as_secs_f64() * 1000.0).collect());
        let pair_ratio = median(local.iter().zip(&offloaded).map(|(l, o)| o.rate() / l.rate()).collect());
        let pair_ttft = median(
            local.iter().zip(&offloaded).map(|(l, o)| (o.first_token.as_secs_f64() - l.first_token.as_secs_f64()) * 1000.0).collect(),
        );
        println!("threads: {}, tokens per answer: {}", kith_infer::thread_count(), local[0].tokens);
        println!("local on B:      decode {:6.1} tok/s, first token {:6.2} ms", rate(&local), ttft(&local));
        println!("A through mesh:  decode {:6.1} tok/s, first token {:6.2} ms", rate(&offloaded), ttft(&offloaded));
        println!("per-pair median: offloaded ÷ local decode {pair_ratio:.3}, added first-token time {pair_ttft:+.2} ms");

        // Owner priority under 16 friend streams.
        let short = "Say hello.";
        let mut idle = Vec::new();
        for _ in 0..RUNS {
            idle.push(run(&b, short, 1, Privacy::LocalOnly, true).await.first_token.as_secs_f64() * 1000.0);
        }
        let mut friends = Vec::new();
        for i in 0..16 {
            let a = a.clone();
            friends.push(tokio::spawn(async move {
                let question = format!("{QUESTION} Part {i}.");
                run(&a, &question, 400, Privacy::FriendsAllowed, false).await.tokens
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut loaded = Vec::new();
        for _ in 0..RUNS {
            loaded.push(run(&b, short, 1, Privacy::LocalOnly, true).await.first_token.as_secs_f64() * 1000.0);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let served: Vec<usize> = futures_util::future::join_all(friends).await.into_iter().map(|r| r.expect("friend task")).collect();
        let (idle, loaded) = (median(idle), median(loaded));
        println!(
            "owner first token: idle {idle:.2} ms, with 16 friend streams {loaded:.2} ms ({:.2}x); friend streams served: {} of 16 ({} tokens each at least)",
            loaded / idle,
            served.iter().filter(|&&t| t > 0).count(),
            served.iter().min().copied().unwrap_or(0)
        );
        for node in [a, b] {
            node.shutdown().await;
        }
    });
}
