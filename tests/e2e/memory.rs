//! Chat turns with memory: told in one conversation, recalled in the next, saved encrypted.

use std::time::Duration;

use futures_util::StreamExt;
use kith_infer::StreamEvent;
use kith_node::api::ApiConfig;
use kith_node::{ChatTurn, MEMORY_CLOSE, MEMORY_OPEN, Turn};
use kith_types::{Role, SamplingParams};
use serde_json::{Value, json};

use crate::support::{Sse, TestNode, open_store};

fn turn(message: &str, conversation: Option<i64>) -> ChatTurn {
    let mut params = SamplingParams::greedy();
    params.max_tokens = 12;
    ChatTurn { model: None, conversation, system: None, message: message.into(), params, privacy: None, peer: None }
}

/// The answer's text; returns once the channel closes, i.e. once the exchange is saved.
async fn drain(turn: &mut Turn) -> String {
    let mut text = String::new();
    let mut done = false;
    while let Some(event) = turn.events.recv().await {
        let event = event.expect("event");
        text.push_str(event.text());
        done |= matches!(event, StreamEvent::Done(_));
    }
    assert!(done, "the answer ended with Done");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_told_in_one_conversation_is_in_the_next_prompt() {
    let node = TestNode::start_with(4, ApiConfig::default(), true).await;

    let mut first = node.node.chat_turn(turn("Remember that my cat is called Miso.", None)).await.expect("turn 1");
    let miso = first.remembered.expect("saved as a memory");
    drain(&mut first).await;

    let mut second = node.node.chat_turn(turn("What is my cat called?", None)).await.expect("turn 2");
    assert_ne!(second.conversation, first.conversation, "a fresh conversation");
    assert_eq!(second.recalled.iter().map(|m| m.id).collect::<Vec<_>>(), [miso], "{:?}", second.recalled);
    let system = &second.prompt[0];
    assert_eq!(system.role, Role::System);
    assert!(
        system.content.contains(&format!("{MEMORY_OPEN}\n[memory {miso}] my cat is called Miso\n{MEMORY_CLOSE}")),
        "the model sees the memory, delimited, with its id:\n{}",
        system.content
    );
    assert_eq!(second.prompt.last().map(|m| m.content.as_str()), Some("What is my cat called?"));
    let answer = drain(&mut second).await;

    // A third turn continues conversation 2: its history is the saved exchange.
    let mut third = node.node.chat_turn(turn("And my dog?", Some(second.conversation))).await.expect("turn 3");
    let texts: Vec<&str> = third.prompt.iter().map(|m| m.content.as_str()).collect();
    assert!(texts.contains(&"What is my cat called?") && texts.contains(&answer.as_str()), "{texts:?}");
    drain(&mut third).await;

    let conversation = second.conversation;
    let dir = node.stop().await;
    let dir = dir.path();
    // Everything is in the vault, encrypted, and reads back.
    let store = open_store(dir).await;
    let saved = store.messages(conversation).await.expect("messages");
    assert!(saved.damaged.is_empty());
    let roles: Vec<&str> = saved.items.iter().map(|m| m.body.role.as_str()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert_eq!(saved.items[1].body.content, answer);
    assert!(!saved.items[1].body.interrupted);
    let memories = store.memories().await.expect("memories");
    assert_eq!(memories.items[0].text, "my cat is called Miso");
    assert!(memories.items[0].embedding.is_some());
    // The memory points at the message that told it: deleting that conversation can take it.
    let told = store.messages(first.conversation).await.expect("messages");
    assert_eq!(memories.items[0].source_message_id, Some(told.items[0].id));
    assert_eq!(store.forget_conversation_memories(first.conversation).await.expect("forget"), 1);
    let bytes = std::fs::read(dir.join("memory.db")).expect("database");
    assert!(!bytes.windows(4).any(|w| w == b"Miso"), "nothing readable on disk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kith_models_over_http_keep_conversations() {
    let node = TestNode::start_with(4, ApiConfig::default(), true).await;
    let ask = |message: &str, stream: bool, conversation: Option<i64>| {
        let mut body = json!({
            "model": "kith/smollm2-135m",
            "messages": [{ "role": "system", "content": "Be brief." }, { "role": "user", "content": message }],
            "temperature": 0, "max_tokens": 8, "stream": stream,
        });
        if let Some(id) = conversation {
            body["kith"] = json!({ "conversation": id });
        }
        node.post("/v1/chat/completions").json(&body).send()
    };
    let told: Value =
        ask("Remember that my dog is called Rex.", false, None).await.expect("send").json().await.expect("JSON");
    assert!(told["kith"]["remembered"].is_number(), "{told}");
    assert_eq!(told["model"], "kith/smollm2-135m");

    let response = ask("What is my dog called?", true, None).await.expect("send");
    assert_eq!(response.status(), 200);
    let sse = Sse::parse(&response.text().await.expect("body"));
    assert!(sse.done);
    let kith = &sse.chunks[0]["kith"];
    assert_eq!(kith["recalled"][0]["text"], "my dog is called Rex", "{kith}");
    let conversation = kith["conversation"].as_i64().expect("conversation id");
    assert_ne!(Some(conversation), told["kith"]["conversation"].as_i64());

    let next: Value = ask("Thanks!", false, Some(conversation)).await.expect("send").json().await.expect("JSON");
    assert_eq!(next["kith"]["conversation"], conversation, "{next}");
    let missing = ask("Hello?", false, Some(9999)).await.expect("send");
    assert_eq!(missing.status(), 404);

    // A stateless request stores nothing: the vault gains no conversation.
    let plain = json!({ "messages": [{ "role": "user", "content": "Hi" }], "max_tokens": 4 });
    assert_eq!(node.post("/v1/chat/completions").json(&plain).send().await.expect("send").status(), 200);
    let dir = node.stop().await;
    let store = open_store(dir.path()).await;
    assert_eq!(store.conversations().await.expect("list").items.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_answer_saves_the_partial_exchange_marked() {
    let node = TestNode::start_with(4, ApiConfig::default(), true).await;
    let body = json!({
        "model": "kith/smollm2-135m",
        "messages": [{ "role": "user", "content": "Tell me a very long story about a lighthouse." }],
        "temperature": 0, "max_tokens": 400, "stream": true,
    });
    let response = node.post("/v1/chat/completions").json(&body).send().await.expect("send");
    let mut bytes = response.bytes_stream();
    let mut text = String::new();
    while text.matches("\"content\":\"").count() < 4 {
        text.push_str(&String::from_utf8_lossy(&bytes.next().await.expect("more").expect("bytes")));
    }
    let stopping = node.node.clone();
    let shutdown = tokio::spawn(async move { stopping.shutdown().await });
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), bytes.next()).await.expect("stream ends") {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("bytes")));
    }
    let sse = Sse::parse(&text);
    assert!(sse.done);
    assert_eq!(sse.finish_reason().as_deref(), Some("interrupted"));
    let conversation = sse.chunks[0]["kith"]["conversation"].as_i64().expect("conversation");
    tokio::time::timeout(Duration::from_secs(60), shutdown).await.expect("shutdown ends").expect("task");
    node.server.await.expect("server").expect("served");

    let store = open_store(node.dir.path()).await;
    let saved = store.messages(conversation).await.expect("messages");
    assert_eq!(saved.items.len(), 2, "the partial exchange is saved");
    let reply = &saved.items[1].body;
    assert!(reply.interrupted, "and marked as interrupted");
    assert!(!reply.content.is_empty());
    assert!(
        sse.text().starts_with(&reply.content) || reply.content.starts_with(&sse.text()),
        "{} / {}",
        sse.text(),
        reply.content
    );
    assert_eq!(store.integrity_check().await.expect("check"), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_native_api_lists_searches_and_deletes() {
    let node = TestNode::start_with(4, ApiConfig::default(), true).await;
    let get = |path: &str| node.client.get(node.url(path)).bearer_auth(&node.token).send();
    let delete = |path: &str| node.client.delete(node.url(path)).bearer_auth(&node.token).send();

    let created = node.post("/api/memories").json(&json!({ "text": "my cat is called Miso", "pinned": true })).send();
    let created = created.await.expect("send");
    assert_eq!(created.status(), 201);
    let memory: Value = created.json().await.expect("JSON");
    let miso = memory["id"].as_i64().expect("id");
    let empty = node.post("/api/memories").json(&json!({ "text": "  " })).send().await.expect("send");
    assert_eq!(empty.status(), 400);

    let chat = json!({
        "model": "kith/smollm2-135m", "messages": [{ "role": "user", "content": "What is my cat called?" }],
        "temperature": 0, "max_tokens": 6,
    });
    let answer: Value =
        node.post("/v1/chat/completions").json(&chat).send().await.expect("send").json().await.expect("JSON");
    assert_eq!(answer["kith"]["recalled"][0]["id"], miso, "{answer}");
    let conversation = answer["kith"]["conversation"].as_i64().expect("conversation");

    let status: Value = get("/api/status").await.expect("send").json().await.expect("JSON");
    assert_eq!(status["memory"], true);
    assert_eq!(status["models"].as_array().map(Vec::len), Some(2));
    let smollm = &status["models"][0];
    assert_eq!(
        (smollm["name"].as_str(), smollm["device"].as_str(), smollm["queued"].as_u64()),
        (Some("smollm2-135m"), Some("cpu"), Some(0))
    );

    let page: Value = get("/api/conversations?limit=1").await.expect("send").json().await.expect("JSON");
    assert_eq!(page["items"][0]["id"], conversation);
    assert_eq!(page["next_offset"], Value::Null);
    let detail: Value =
        get(&format!("/api/conversations/{conversation}")).await.expect("send").json().await.expect("JSON");
    let roles: Vec<&str> =
        detail["messages"].as_array().expect("messages").iter().filter_map(|m| m["role"].as_str()).collect();
    assert_eq!(roles, ["user", "assistant"]);
    assert_eq!(detail["messages"][1]["ran_on"], "local");

    let hits: Value = get("/api/memories/search?q=what%20is%20my%20cat%20called&k=3")
        .await
        .expect("send")
        .json()
        .await
        .expect("JSON");
    // The answer has ended, so the exchange is saved and indexed: the question itself is
    // now the best match for itself, and the memory is among the hits.
    let hits = hits.as_array().expect("hits");
    assert_eq!((hits[0]["kind"].as_str(), hits[0]["text"].as_str()), (Some("message"), Some("What is my cat called?")));
    assert!(hits.iter().any(|h| h["kind"] == "memory" && h["id"] == miso), "{hits:?}");
    let memories: Value = get("/api/memories").await.expect("send").json().await.expect("JSON");
    assert_eq!(memories["items"][0]["pinned"], true);

    assert_eq!(delete(&format!("/api/memories/{miso}")).await.expect("send").status(), 200);
    assert_eq!(delete(&format!("/api/memories/{miso}")).await.expect("send").status(), 404);
    let hits: Value = get("/api/memories/search?q=cat").await.expect("send").json().await.expect("JSON");
    assert!(hits.as_array().expect("hits").iter().all(|h| h["kind"] != "memory"), "{hits}");
    let deleted: Value = delete(&format!("/api/conversations/{conversation}?with_memories=true"))
        .await
        .expect("send")
        .json()
        .await
        .expect("JSON");
    assert_eq!(deleted["deleted"], true);
    assert_eq!(get(&format!("/api/conversations/{conversation}")).await.expect("send").status(), 404);
    assert_eq!(delete(&format!("/api/conversations/{conversation}")).await.expect("send").status(), 404);

    let spec: Value = get("/api/openapi.json").await.expect("send").json().await.expect("JSON");
    assert!(spec["paths"]["/api/conversations/{id}"]["delete"].is_object(), "{spec}");
    assert!(spec["components"]["schemas"]["SearchHit"].is_object());
    // Every route of the native API is described.
    for (path, method) in [
        ("/api/status", "get"),
        ("/api/conversations", "get"),
        ("/api/conversations/{id}", "get"),
        ("/api/conversations/{id}", "patch"),
        ("/api/memories", "get"),
        ("/api/memories", "post"),
        ("/api/memories/{id}", "delete"),
        ("/api/memories/search", "get"),
        ("/api/memories/review", "get"),
        ("/api/memories/review/{id}", "post"),
        ("/api/models", "get"),
        ("/api/models/pull", "post"),
        ("/api/models/{name}", "delete"),
    ] {
        assert!(spec["paths"][path][method].is_object(), "{method} {path} is not in the OpenAPI document");
    }
    assert!(spec["components"]["schemas"]["PullUpdate"].is_object(), "{}", spec["components"]["schemas"]);
    let anonymous = node.client.get(node.url("/api/status")).send().await.expect("send");
    assert_eq!(anonymous.status(), 401);
    node.stop().await;

    // A node without a vault says so.
    let bare = TestNode::start(4, ApiConfig::default()).await;
    let refused = bare.client.get(bare.url("/api/conversations")).bearer_auth(&bare.token).send().await.expect("send");
    assert_eq!(refused.status(), 400);
    let error: Value = refused.json().await.expect("JSON");
    assert!(error["error"]["message"].as_str().is_some_and(|m| m.contains("no memory")), "{error}");
    bare.stop().await;
}
