//! `kith serve` and `kith token`: the node headless, with its local HTTP API.

use std::process::ExitCode;

use anyhow::{Context, Result};
use kith_models::Store;
use kith_node::api::{self, ApiConfig};
use kith_node::{ApiToken, NodeBuilder, NodeFile};

use crate::cli::ServeArgs;

pub(crate) fn token() -> Result<ExitCode> {
    let home = Store::from_env()?.home().to_owned();
    let token = ApiToken::load_or_create(&home).context("reading the API token")?;
    println!("{}", token.as_str());
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn run(args: ServeArgs) -> Result<ExitCode> {
    let home = Store::from_env()?.home().to_owned();
    let token = ApiToken::load_or_create(&home).context("reading the API token")?;
    if let Some(running) = crate::remote::connect(&home).await? {
        anyhow::bail!(
            "a node is already running for {} at {}; stop it first (one node per data directory)",
            home.display(),
            running.url()
        );
    }
    let (model, entry) = crate::chat::load_model(&args.model).await?;
    let name = entry.map_or_else(|| args.model.model.clone(), |e| e.name);
    let mut builder = NodeBuilder::new()
        .model(name.clone(), model)
        .queue_per_model(args.queue)
        .privacy(args.privacy)
        .offload(args.offload)
        .model_store(Store::new(home.clone()), kith_models::PullOptions::from_env());
    if let Some(embedder) = crate::memory::load_embedder(true)? {
        builder = builder.embedder(crate::memory::EMBEDDING_MODEL, embedder);
    }
    let memory = !args.no_memory && kith_memory::Vault::new(&home).exists();
    if memory {
        let store = crate::vault::open_store(&home, args.passphrase_file.as_deref()).await?;
        let items = store.recall_items().await?;
        for damaged in &items.damaged {
            eprintln!("warning: not recalled: {damaged}");
        }
        let index = kith_memory::RecallIndex::build(items.items);
        eprintln!("Vault unlocked: {} memories and messages to recall from.", index.len());
        builder = builder.memory(store, index);
    }
    let node = builder.build()?;
    let mesh = if memory && !args.no_mesh {
        let listen = args
            .mesh_listen
            .iter()
            .map(|a| a.parse().with_context(|| format!("--mesh-listen {a:?} is not a multiaddr")))
            .collect::<Result<Vec<_>>>()?;
        let config = kith_mesh::MeshConfig { listen, mdns: !args.no_mdns, ..kith_mesh::MeshConfig::default() };
        let mesh = node.join_mesh(config, args.name.as_deref()).await.context("joining the mesh")?;
        Some(mesh)
    } else {
        None
    };

    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let address = listener.local_addr().context("reading the bound address")?;
    if !address.ip().is_loopback() {
        eprintln!("warning: listening on {address}, which is not loopback; requests must still name localhost in Host");
    }
    // `kith ask`, `kith memory …`, `kith models …` find the node through this file
    // (written before the address is printed, so that whoever reads that can use it).
    let published = NodeFile::publish(&home, address).context("writing node.json")?;
    let config = ApiConfig { max_body_bytes: args.max_body, max_tokens: args.max_tokens, ..ApiConfig::default() };
    let router = api::router(node.clone(), token, config);
    eprintln!("Kith is serving {name} on http://{address} (OpenAI-compatible API at http://{address}/v1).");
    if memory {
        eprintln!(
            "Use model \"kith/{name}\" for chats with memory, saved encrypted (plain \"{name}\" stores nothing)."
        );
    }
    eprintln!(
        "Requests need `Authorization: Bearer $(kith token)`; the token is in {}.",
        ApiToken::path(&home).display()
    );
    match &mesh {
        Some(mesh) => {
            let friends = mesh.state().friends.len();
            eprintln!(
                "Mesh: device id {} on {}; {friends} friend(s). `kith peers invite` pairs a new one.",
                mesh.device_id(),
                mesh.listen_addrs().iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            );
        }
        None if memory => eprintln!("Mesh: off (--no-mesh)."),
        None => eprintln!("Mesh: off (it needs the vault, which holds this node's identity and trust list)."),
    }
    tracing::info!(%address, model = %name, "listening");

    let stopping = node.clone();
    api::serve(listener, router, async move {
        shutdown_signal().await;
        eprintln!("Shutting down: ending streams in flight…");
        stopping.begin_shutdown();
    })
    .await
    .context("serving the API")?;
    drop(published);
    node.shutdown().await;
    eprintln!("Stopped.");
    Ok(ExitCode::SUCCESS)
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(err) => {
                tracing::warn!(error = %err, "no SIGTERM handler; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
