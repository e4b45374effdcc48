//! Three real nodes on loopback with real models: offload to the friend that has the
//! model, token for token, and failover mid-answer when that friend dies.

use std::time::Duration;

use kith_infer::{GenerateRequest, LoadOptions, LoadedModel, Prompt, StreamEvent};
use kith_mesh::{Identity, Mesh, MeshConfig, MeshState};
use kith_node::{ChatTurn, Node, NodeBuilder, Offload, Route};
use kith_types::{ChatMessage, Privacy, SamplingParams};

use crate::support::{load_smollm, model_path, open_store};

const GEMMA: &str = "gemma3-270m";

fn load_gemma() -> LoadedModel {
    LoadedModel::load(&model_path(GEMMA), &LoadOptions::default()).expect("Gemma loads")
}

fn config() -> MeshConfig {
    MeshConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
        mdns: false,
        relay_server: false,
        ..MeshConfig::default()
    }
}

async fn join(node: &Node, name: &str) -> Mesh {
    let state = MeshState { name: name.into(), ..MeshState::default() };
    let (mesh, jobs) = Mesh::start(Identity::generate(), state, config(), node.offer()).await.expect("mesh");
    node.attach_mesh(mesh.clone(), jobs);
    mesh
}

fn greedy(max_tokens: usize) -> SamplingParams {
    let mut params = SamplingParams::greedy();
    params.max_tokens = max_tokens;
    params
}

async fn collect(node: &Node, model: &str, messages: Vec<ChatMessage>, privacy: Privacy) -> (Route, Vec<u32>, String) {
    let request = GenerateRequest::new(Prompt::Chat(messages), greedy(24));
    let mut generation = node.generate(model, request, privacy).await.expect("generation");
    let (mut ids, mut text) = (Vec::new(), String::new());
    while let Some(event) = generation.stream.next().await {
        let event = event.expect("event");
        text.push_str(event.text());
        match event {
            StreamEvent::Token(t) => ids.push(t.id),
            StreamEvent::Done(_) => break,
            _ => {}
        }
    }
    (generation.route, ids, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offload_matches_the_friends_own_output_and_fails_over_mid_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(dir.path()).await;
    let items = store.recall_items().await.expect("items");
    let a = NodeBuilder::new()
        .model("smollm2-135m", load_smollm())
        .memory(store, kith_memory::RecallIndex::build(items.items))
        .build()
        .expect("A");
    let b = NodeBuilder::new().model(GEMMA, load_gemma()).build().expect("B");
    let c = NodeBuilder::new().model(GEMMA, load_gemma()).build().expect("C");
    let (a_mesh, b_mesh, c_mesh) = (join(&a, "alice").await, join(&b, "bob").await, join(&c, "carol").await);

    // A model A lacks and has no friend for: a clear refusal.
    let none = a.generate(GEMMA, GenerateRequest::new(Prompt::Chat(vec![]), greedy(1)), Privacy::FriendsAllowed).await;
    assert!(none.expect_err("no friend has it").to_string().contains("not loaded here"));

    // Only B has Gemma: A's greedy answer is B's own, token for token.
    a_mesh.accept(&b_mesh.invite().encode()).await.expect("A pairs with B");
    let question = vec![ChatMessage::user("The three primary colors are")];
    let (route, ids, text) = collect(&a, GEMMA, question.clone(), Privacy::FriendsAllowed).await;
    assert_eq!(route.as_str(), "bob");
    let (local, b_ids, b_text) = collect(&b, GEMMA, question.clone(), Privacy::LocalOnly).await;
    assert_eq!(local, Route::Local);
    assert_eq!(ids, b_ids, "offloaded greedy tokens equal B's own");
    assert_eq!(text, b_text);
    assert!(!ids.is_empty());
    // Local-only never leaves A.
    let refused = a.generate(GEMMA, GenerateRequest::new(Prompt::Chat(question), greedy(4)), Privacy::LocalOnly).await;
    assert!(refused.expect_err("local-only").to_string().contains("local-only"));

    // C has Gemma too. A chat turn on B; B dies after a few tokens; C finishes it.
    a_mesh.accept(&c_mesh.invite().encode()).await.expect("A pairs with C");
    a_mesh.refresh().await;
    let params = greedy(40);
    let turn = ChatTurn {
        model: Some(GEMMA.into()),
        conversation: None,
        system: None,
        message: "Write a short story about a lighthouse keeper.".into(),
        params,
        privacy: None,
        peer: Some("bob".into()),
    };
    let mut turn = a.chat_turn(turn).await.expect("turn");
    assert_eq!(turn.route.as_str(), "bob");
    let mut answer = String::new();
    let mut tokens = 0;
    let mut done = false;
    while let Some(event) = tokio::time::timeout(Duration::from_secs(60), turn.events.recv()).await.expect("no stall") {
        let event = event.expect("the answer continues without an error");
        answer.push_str(event.text());
        match event {
            StreamEvent::Token(_) => {
                tokens += 1;
                if tokens == 5 {
                    b_mesh.shutdown(); // B dies mid-answer
                }
            }
            StreamEvent::Done(end) => {
                done = true;
                assert_eq!(end.usage.completion_tokens, tokens);
            }
            _ => {}
        }
    }
    assert!(done && tokens > 5, "the answer completed ({tokens} tokens)");
    assert_eq!(turn.parts.names(), ["bob", "carol"]);
    // The text is continuous: exactly C's own greedy answer to the same prompt.
    let request = GenerateRequest::new(Prompt::Chat(turn.prompt.clone()), greedy(40));
    let mut reference = c.generate(GEMMA, request, Privacy::LocalOnly).await.expect("C alone");
    let mut expected = String::new();
    while let Some(event) = reference.stream.next().await {
        expected.push_str(event.expect("event").text());
    }
    drop(reference); // gives its place in C's queue back
    assert_eq!(answer, expected, "one uninterrupted answer");

    // The vault recorded the exchange once, marked with where each part ran.
    let store = open_store(dir.path()).await;
    let messages = store.messages(turn.conversation).await.expect("messages").items;
    assert_eq!(messages.len(), 2, "question and answer, once");
    assert_eq!(messages[1].body.content, answer);
    assert_eq!(messages[1].body.ran_on, Some(kith_memory::RanOn::Parts(vec!["bob".into(), "carol".into()])));
    store.close().await;

    // Nothing of A's prompts was kept on C: its ledger has counts only.
    let ledger = serde_json::to_string(&c_mesh.state()).expect("json");
    assert!(!ledger.contains("lighthouse") && !ledger.contains("primary"));
    assert!(c_mesh.state().used_on(&a_mesh.peer_id(), kith_mesh::now_s() / 86_400).tokens_out > 0);
    for node in [a, b, c] {
        node.shutdown().await;
    }
}

/// Under `when-faster`, a request for a model A has but whose queue is full goes to a
/// friend that has it (the same greedy tokens as the friend's own); `local-only` still
/// keeps it home (busy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_goes_to_a_friend_when_faster_is_allowed() {
    let a = NodeBuilder::new()
        .model("smollm2-135m", load_smollm())
        .queue_per_model(1)
        .offload(Offload::WhenFaster)
        .build()
        .expect("A");
    let b = NodeBuilder::new().model("smollm2-135m", load_smollm()).build().expect("B");
    let (a_mesh, b_mesh) = (join(&a, "alice").await, join(&b, "bob").await);
    a_mesh.accept(&b_mesh.invite().encode()).await.expect("A pairs with B");
    a_mesh.refresh().await;

    // A's one place is taken by an answer nobody reads yet.
    let question = vec![ChatMessage::user("Name three rivers.")];
    let long = GenerateRequest::new(Prompt::Chat(vec![ChatMessage::user("Count to a hundred.")]), greedy(200));
    let held = a.generate("smollm2-135m", long, Privacy::FriendsAllowed).await.expect("first");
    assert_eq!(held.route, Route::Local, "a free place here and no speed measured: local");

    let (route, ids, _) = collect(&a, "smollm2-135m", question.clone(), Privacy::FriendsAllowed).await;
    assert_eq!(route.as_str(), "bob", "A's queue is full: B takes it");
    let (_, b_ids, _) = collect(&b, "smollm2-135m", question.clone(), Privacy::LocalOnly).await;
    assert_eq!(ids, b_ids);
    let refused =
        a.generate("smollm2-135m", GenerateRequest::new(Prompt::Chat(question), greedy(4)), Privacy::LocalOnly);
    assert!(refused.await.expect_err("local-only and full").to_string().contains("busy"));
    drop(held);
    for node in [a, b] {
        node.shutdown().await;
    }
}

/// A friend's prompt counts against their quota: one that does not fit in what is left is
/// refused before it runs, naming the quota; a request cancelled after its first token
/// still counts its prompt in the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_count_against_the_quota_even_when_cancelled() {
    let a = NodeBuilder::new().build().expect("A, no model");
    let b = NodeBuilder::new().model("smollm2-135m", load_smollm()).build().expect("B");
    let (a_mesh, b_mesh) = (join(&a, "alice").await, join(&b, "bob").await);
    a_mesh.accept(&b_mesh.invite().encode()).await.expect("A pairs with B");
    let limit = |tokens| kith_mesh::FriendUpdate { tokens_per_day: Some(tokens), ..Default::default() };
    let today = kith_mesh::now_s() / 86_400;
    let question = vec![ChatMessage::user("Tell me about the history of the printing press in Europe.")];
    let prompt_tokens = b.chat_prompt_tokens("smollm2-135m", &question).expect("count");

    b_mesh.set("alice", limit(prompt_tokens as u64)).expect("quota");
    let request = GenerateRequest::new(Prompt::Chat(question.clone()), greedy(8));
    let generation = a.generate("smollm2-135m", request, Privacy::FriendsAllowed).await.expect("routed to B");
    let mut stream = generation.stream;
    let refused = stream.next().await.expect("an event").expect_err("over quota");
    assert!(refused.to_string().contains("does not fit in the"), "{refused}");
    assert!(refused.to_string().contains("daily token quota"), "{refused}");
    let after_refusal = b_mesh.state().used_on(&a_mesh.peer_id(), today);
    assert_eq!(after_refusal.tokens_in + after_refusal.tokens_out, 0, "nothing ran");

    b_mesh.set("alice", limit(100_000)).expect("quota");
    let request = GenerateRequest::new(Prompt::Chat(question), greedy(200));
    let mut generation = a.generate("smollm2-135m", request, Privacy::FriendsAllowed).await.expect("routed to B");
    assert!(matches!(generation.stream.next().await, Some(Ok(StreamEvent::Token(_)))));
    drop(generation); // cancelled after one token
    let mut used = b_mesh.state().used_on(&a_mesh.peer_id(), today);
    for _ in 0..50 {
        if used.requests > after_refusal.requests {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        used = b_mesh.state().used_on(&a_mesh.peer_id(), today);
    }
    assert_eq!(used.tokens_in, prompt_tokens as u64, "the cancelled request's prompt counts");
    assert!(used.tokens_out >= 1 && used.tokens_out < 200, "{used:?}");
    for node in [a, b] {
        node.shutdown().await;
    }
}
