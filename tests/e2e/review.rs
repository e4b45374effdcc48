//! Suggested memories (found in what the user says, reviewed before they are recalled)
//! and per-conversation privacy modes, over the HTTP API of a real node.

use kith_node::api::ApiConfig;
use serde_json::{Value, json};

use crate::support::TestNode;

impl TestNode {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.client.request(method, self.url(path)).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    }

    /// A non-streaming `kith/` turn; the answer comes back once the exchange is saved.
    async fn say(&self, message: &str, kith: Value) -> (u16, Value) {
        let body = json!({
            "model": "kith/smollm2-135m",
            "messages": [{ "role": "user", "content": message }],
            "max_tokens": 4,
            "temperature": 0,
            "kith": kith,
        });
        self.call(reqwest::Method::POST, "/v1/chat/completions", Some(body)).await
    }
}

use reqwest::Method;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn facts_the_user_states_wait_for_review_then_are_recalled() {
    let node = TestNode::start_with(4, ApiConfig::default(), true).await;
    let (status, reply) = node.say("My name is Ada and I live in Lyon. What is two plus two?", json!({})).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["kith"]["suggested_memories"], json!(["My name is Ada", "I live in Lyon"]));
    let conversation = reply["kith"]["conversation"].as_i64().expect("conversation");

    // Waiting, linked to the user's message, and not memories yet (so not recalled).
    let (_, queue) = node.call(Method::GET, "/api/memories/review", None).await;
    let items = queue["items"].as_array().expect("items").clone();
    assert_eq!(
        items.iter().map(|c| c["text"].clone()).collect::<Vec<_>>(),
        [json!("My name is Ada"), json!("I live in Lyon")]
    );
    let (_, detail) = node.call(Method::GET, &format!("/api/conversations/{conversation}"), None).await;
    let user_message = detail["messages"][0]["id"].clone();
    assert!(items.iter().all(|c| c["source_message_id"] == user_message), "{items:?} vs {user_message}");
    let (_, memories) = node.call(Method::GET, "/api/memories", None).await;
    assert_eq!(memories["items"], json!([]));
    let (_, before) = node.say("Where do I live?", json!({})).await;
    assert_eq!(before["kith"]["recalled"], json!([]), "suggestions are not recalled before review");

    // Keep one as suggested, edit the other.
    let (ada, lyon) = (items[0]["id"].as_i64().expect("id"), items[1]["id"].as_i64().expect("id"));
    let (status, kept) =
        node.call(Method::POST, &format!("/api/memories/review/{ada}"), Some(json!({"action": "keep"}))).await;
    assert_eq!(status, 200, "{kept}");
    let edit = json!({"action": "edit", "text": "I live in Lyon, France"});
    let (status, edited) = node.call(Method::POST, &format!("/api/memories/review/{lyon}"), Some(edit)).await;
    assert_eq!(status, 200, "{edited}");
    let (_, memories) = node.call(Method::GET, "/api/memories", None).await;
    let texts: Vec<&Value> = memories["items"].as_array().expect("items").iter().map(|m| &m["text"]).collect();
    assert_eq!(texts, [&json!("My name is Ada"), &json!("I live in Lyon, France")]);
    assert!(memories["items"].as_array().expect("items").iter().all(|m| m["source_message_id"] == user_message));

    // Kept memories are recalled at once.
    let (_, after) = node.say("Where do I live?", json!({})).await;
    let recalled: Vec<i64> =
        after["kith"]["recalled"].as_array().expect("recalled").iter().filter_map(|m| m["id"].as_i64()).collect();
    assert!(recalled.contains(&edited["memory_id"].as_i64().expect("id")), "{after}");

    // Bad decisions are refused and change nothing.
    for (id, body, code) in [
        (ada, json!({"action": "keep"}), 404),
        (9999, json!({"action": "discard"}), 404),
        (ada, json!({"action": "maybe"}), 400),
        (ada, json!({"action": "edit"}), 400),
        (ada, json!({"action": "keep", "text": "x"}), 400),
        (ada, json!({"action": "edit", "text": "   "}), 400),
    ] {
        let (status, error) = node.call(Method::POST, &format!("/api/memories/review/{id}"), Some(body.clone())).await;
        assert_eq!(status, code, "{body} → {error}");
        assert!(error["error"]["message"].is_string(), "{error}");
    }

    // What is already remembered is not suggested again; a discarded suggestion is gone.
    let (_, again) = node.say("My name is Ada. I prefer tea.", json!({})).await;
    assert_eq!(again["kith"]["suggested_memories"], json!(["I prefer tea"]));
    let (_, queue) = node.call(Method::GET, "/api/memories/review", None).await;
    let items = queue["items"].as_array().expect("items").clone();
    assert_eq!(items.len(), 1, "only the new fact waits: {items:?}");
    assert_eq!(items[0]["text"], "I prefer tea");
    let tea = items[0]["id"].as_i64().expect("id");
    let (status, discarded) =
        node.call(Method::POST, &format!("/api/memories/review/{tea}"), Some(json!({"action": "discard"}))).await;
    assert_eq!((status, discarded["memory_id"].clone()), (200, Value::Null));
    let (_, queue) = node.call(Method::GET, "/api/memories/review", None).await;
    assert_eq!(queue["items"], json!([]));

    // Deleting the conversation offers its memories (the UI reads memory_ids) and takes
    // them when asked.
    let (_, detail) = node.call(Method::GET, &format!("/api/conversations/{conversation}"), None).await;
    assert_eq!(detail["memory_ids"].as_array().map(Vec::len), Some(2), "{detail}");
    let (status, deleted) =
        node.call(Method::DELETE, &format!("/api/conversations/{conversation}?with_memories=true"), None).await;
    assert_eq!((status, deleted["memories_deleted"].as_u64()), (200, Some(2)), "{deleted}");
    let (_, memories) = node.call(Method::GET, "/api/memories", None).await;
    assert_eq!(memories["items"], json!([]));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privacy_modes_are_kept_per_conversation_and_decide_the_route() {
    let node = TestNode::start_with(4, ApiConfig::default(), true).await;
    // New conversations take the node's default; a request may set the mode.
    let (status, open) = node.say("Hello", json!({})).await;
    assert_eq!(status, 200, "{open}");
    assert_eq!(
        (open["kith"]["privacy"].as_str(), open["kith"]["ran_on"].as_str()),
        (Some("friends-allowed"), Some("local"))
    );
    let (_, private) = node.say("Hello", json!({"privacy": "local-only"})).await;
    assert_eq!(private["kith"]["privacy"], "local-only");
    let private_id = private["kith"]["conversation"].as_i64().expect("id");
    let open_id = open["kith"]["conversation"].as_i64().expect("id");

    // Saved with the conversation: later turns keep it without saying it again.
    let (_, next) = node.say("Again", json!({"conversation": private_id})).await;
    assert_eq!(next["kith"]["privacy"], "local-only");
    let (_, list) = node.call(Method::GET, "/api/conversations", None).await;
    let mode =
        |id: i64| list["items"].as_array().expect("items").iter().find(|c| c["id"] == id).map(|c| c["privacy"].clone());
    assert_eq!((mode(private_id), mode(open_id)), (Some(json!("local-only")), Some(json!("friends-allowed"))));

    // PATCH changes it; bad values and unknown conversations are refused.
    let (status, patched) = node
        .call(Method::PATCH, &format!("/api/conversations/{open_id}"), Some(json!({"privacy": "local-only"})))
        .await;
    assert_eq!((status, patched["privacy"].as_str()), (200, Some("local-only")), "{patched}");
    let (status, _) =
        node.call(Method::PATCH, &format!("/api/conversations/{open_id}"), Some(json!({"privacy": "public"}))).await;
    assert_eq!(status, 400);
    let (status, _) = node.call(Method::PATCH, "/api/conversations/999", Some(json!({"privacy": "local-only"}))).await;
    assert_eq!(status, 404);

    // A model this machine does not have: local-only names the reason.
    let gemma = |privacy: &str| {
        json!({
            "model": "gemma3-270m",
            "messages": [{ "role": "user", "content": "Hi" }],
            "max_tokens": 2,
            "kith": { "privacy": privacy },
        })
    };
    let (status, refused) = node.call(Method::POST, "/v1/chat/completions", Some(gemma("local-only"))).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (400, Some("local_only")), "{refused}");
    let mut remembered = gemma("local-only");
    remembered["model"] = json!("kith/gemma3-270m");
    remembered["kith"]["conversation"] = json!(private_id);
    let (status, refused) = node.call(Method::POST, "/v1/chat/completions", Some(remembered)).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (400, Some("local_only")), "{refused}");
    let (status, missing) = node.call(Method::POST, "/v1/chat/completions", Some(gemma("friends-allowed"))).await;
    assert_eq!((status, missing["error"]["code"].as_str()), (404, Some("model_not_found")), "{missing}");
    let (status, stateless) = node
        .call(
            Method::POST,
            "/v1/chat/completions",
            Some(json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "kith": {"privacy": "local-only"}})),
        )
        .await;
    assert_eq!((status, stateless["kith"]["privacy"].as_str()), (200, Some("local-only")), "{stateless}");
    let (status, unknown) = node
        .call(
            Method::POST,
            "/v1/chat/completions",
            Some(json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "kith": {"privacy": "nowhere"}})),
        )
        .await;
    assert_eq!(status, 400, "{unknown}");
    node.stop().await;
}
