//! `kith models …` and finding the model a command asked for.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use kith_models::{Catalog, ModelEntry, PullEvent, PullOptions, Store};

use crate::cli::{ModelArgs, ModelsArgs, ModelsCommand, looks_like_path};
use crate::progress::PullProgress;

pub(crate) async fn run(args: ModelsArgs) -> Result<ExitCode> {
    let catalog = Catalog::builtin()?;
    let store = Store::from_env()?;
    let through_node = match &args.command {
        ModelsCommand::List | ModelsCommand::Rm { .. } | ModelsCommand::Pull { source: None, .. } => true,
        ModelsCommand::Pull { source: Some(_), .. } | ModelsCommand::Path { .. } => false,
    };
    if through_node && let Some(remote) = crate::remote::connect(store.home()).await? {
        return through(&remote, args.command).await;
    }
    match args.command {
        ModelsCommand::List => {
            println!("{:<14} {:<10} {:>9}  {:<10} DESCRIPTION", "NAME", "KIND", "SIZE", "INSTALLED");
            for entry in catalog.models() {
                let installed = if store.installed_path(entry).is_some() { "yes" } else { "-" };
                let name = if entry.default { format!("{} *", entry.name) } else { entry.name.clone() };
                println!(
                    "{:<14} {:<10} {:>9}  {:<10} {}",
                    name,
                    entry.kind.as_str(),
                    human_size(entry.total_size()),
                    installed,
                    entry.description
                );
            }
            println!("\n* default model. Models live in {}", store.home().join("models").display());
        }
        ModelsCommand::Pull { name, source } => {
            let entry = lookup(&catalog, &name)?;
            if let Some(path) = store.installed_path(entry) {
                eprintln!("{name} is already installed");
                println!("{}", path.display());
            } else {
                let path = pull(&store, entry, source)?;
                println!("{}", path.display());
            }
        }
        ModelsCommand::Rm { name } => {
            let entry = lookup(&catalog, &name)?;
            if store.remove(entry)? {
                eprintln!("removed {name}");
            } else {
                eprintln!("{name} was not installed");
            }
        }
        ModelsCommand::Path { name } => {
            let entry = lookup(&catalog, &name)?;
            match store.installed_path(entry) {
                Some(path) => println!("{}", path.display()),
                None => bail!("{name} is not installed; run `kith models pull {name}`"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `kith models list|pull|rm` through a running node.
async fn through(remote: &crate::remote::Remote, command: ModelsCommand) -> Result<ExitCode> {
    match command {
        ModelsCommand::List => {
            let models = remote.get("/api/models").await?;
            println!("{:<14} {:<10} {:>9}  {:<10} {:<7} DESCRIPTION", "NAME", "KIND", "SIZE", "INSTALLED", "LOADED");
            for model in models.as_array().into_iter().flatten() {
                let name = model["name"].as_str().unwrap_or_default();
                let name = if model["default"].as_bool() == Some(true) { format!("{name} *") } else { name.to_owned() };
                let yes = |key: &str| if model[key].as_bool() == Some(true) { "yes" } else { "-" };
                let installed = if model["pulling"].as_bool() == Some(true) { "pulling" } else { yes("installed") };
                println!(
                    "{:<14} {:<10} {:>9}  {:<10} {:<7} {}",
                    name,
                    model["kind"].as_str().unwrap_or_default(),
                    human_size(model["size"].as_u64().unwrap_or(0)),
                    installed,
                    yes("loaded"),
                    model["description"].as_str().unwrap_or_default()
                );
            }
            println!("\n* default model. Listed by the running node at {}.", remote.url());
        }
        ModelsCommand::Pull { name, .. } => {
            let mut events = remote.events("/api/models/pull", &serde_json::json!({ "name": name })).await?;
            let mut progress = PullProgress::default();
            let mut size = 0;
            while let Some(event) = events.next().await? {
                let text = |key: &str| event[key].as_str().unwrap_or_default().to_owned();
                let update = match event["event"].as_str().unwrap_or_default() {
                    "source" => PullEvent::SourceStarted { source: text("source") },
                    "source_failed" => PullEvent::SourceFailed { source: text("source"), reason: text("reason") },
                    "downloading" => PullEvent::Downloading { what: text("what") },
                    "file" => {
                        size = event["size"].as_u64().unwrap_or(0);
                        PullEvent::FileStarted { file: text("file"), size }
                    }
                    "progress" => PullEvent::FileProgress { done: event["done"].as_u64().unwrap_or(0).min(size) },
                    "file_done" => PullEvent::FileDone { file: text("file") },
                    "done" => {
                        println!("{}", text("path"));
                        return Ok(ExitCode::SUCCESS);
                    }
                    "failed" => bail!("pulling model {name}: {}", text("error")),
                    _ => continue,
                };
                progress.on_event(update);
            }
            bail!("the node's pull stream ended without a result");
        }
        ModelsCommand::Rm { name } => {
            let removed = remote.send(reqwest::Method::DELETE, &format!("/api/models/{name}"), None).await?;
            if removed["removed"].as_bool() == Some(true) {
                eprintln!("removed {name}");
            } else {
                eprintln!("{name} was not installed");
            }
        }
        ModelsCommand::Path { .. } => bail!("`kith models path` reads the model directory directly"),
    }
    Ok(ExitCode::SUCCESS)
}

fn lookup<'a>(catalog: &'a Catalog, name: &str) -> Result<&'a ModelEntry> {
    catalog.get(name).with_context(|| format!("unknown model {name:?}; known models: {}", catalog.names()))
}

fn pull(store: &Store, entry: &ModelEntry, source: Option<kith_models::SourceKind>) -> Result<PathBuf> {
    let mut progress = PullProgress::default();
    let mut options = PullOptions::from_env();
    options.source = source;
    eprintln!("{} ({}) is not installed; pulling {}", entry.name, entry.description, human_size(entry.total_size()));
    let path = store
        .pull(entry, &options, &mut |event| progress.on_event(event))
        .with_context(|| format!("pulling model {}", entry.name))?;
    Ok(path)
}

/// The GGUF file a command should load: a path as given, or a catalog model (pulled on
/// first use). Also returns the catalog entry, if any.
pub(crate) fn resolve(args: &ModelArgs) -> Result<(PathBuf, Option<ModelEntry>)> {
    if let Some(path) = looks_like_path(&args.model) {
        if !path.is_file() {
            bail!("model file {} does not exist", path.display());
        }
        return Ok((path, None));
    }
    let catalog = Catalog::builtin()?;
    let store = Store::from_env()?;
    let entry = lookup(&catalog, &args.model)?.clone();
    if entry.kind == kith_models::ModelKind::Embedding {
        bail!("{} is an embedding model; it cannot generate text", entry.name);
    }
    let path = match store.installed_path(&entry) {
        Some(path) => path,
        None => pull(&store, &entry, args.source)?,
    };
    Ok((path, Some(entry)))
}

pub(crate) fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}
