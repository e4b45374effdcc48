//! The config file: `KITH_CONFIG`, else `<config dir>/kith/config.toml`
//! (`~/.config/kith/config.toml` on Linux). Every setting in it is also a flag and a
//! `KITH_*` variable; a flag or variable wins over the file, the file over the default.
//!
//! ```toml
//! threads = 2
//! model = "smollm2-135m"
//! device = "cpu"
//! context = 4096
//!
//! [serve]
//! listen = "127.0.0.1:7878"
//! queue = 16
//! max_tokens = 4096
//! max_body = 1048576
//! no_memory = false
//! privacy = "friends-allowed"
//! offload = "when-missing"
//! no_mesh = false
//! mesh_listen = ["/ip4/0.0.0.0/tcp/4790", "/ip4/0.0.0.0/udp/4790/quic-v1"]
//! no_mdns = false
//! name = "bobs-gpu-box"
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::ArgMatches;
use clap::parser::ValueSource;
use serde::{Deserialize, Serialize};

use crate::cli::{ModelArgs, ServeArgs};

/// What the file may set.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    pub(crate) threads: Option<usize>,
    pub(crate) model: Option<String>,
    pub(crate) device: Option<String>,
    pub(crate) context: Option<usize>,
    #[serde(default)]
    pub(crate) serve: ServeSection,
}

/// `[serve]`.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServeSection {
    pub(crate) listen: Option<std::net::SocketAddr>,
    pub(crate) queue: Option<usize>,
    pub(crate) max_tokens: Option<usize>,
    pub(crate) max_body: Option<usize>,
    pub(crate) no_memory: Option<bool>,
    pub(crate) privacy: Option<kith_types::Privacy>,
    pub(crate) offload: Option<kith_node::Offload>,
    pub(crate) no_mesh: Option<bool>,
    pub(crate) mesh_listen: Option<Vec<String>>,
    pub(crate) no_mdns: Option<bool>,
    pub(crate) name: Option<String>,
}

/// Where the config file is looked for.
pub(crate) fn path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KITH_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    directories::ProjectDirs::from("", "", "kith").map(|dirs| dirs.config_dir().join("config.toml"))
}

/// The file's settings (empty when there is no file); a malformed file is an error
/// naming it.
pub(crate) fn load() -> Result<FileConfig> {
    let Some(path) = path() else { return Ok(FileConfig::default()) };
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("reading the config file {}", path.display())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(FileConfig::default()),
        Err(err) => Err(err).with_context(|| format!("reading the config file {}", path.display())),
    }
}

/// Whether `id` was left at its default (so the file may set it).
fn unset(matches: &ArgMatches, id: &str) -> bool {
    matches.try_contains_id(id).is_ok()
        && !matches!(matches.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
}

/// Applies the file to model arguments left at their defaults.
pub(crate) fn apply_model(file: &FileConfig, args: &mut ModelArgs, matches: &ArgMatches) -> Result<()> {
    if let Some(model) = &file.model
        && unset(matches, "model")
    {
        args.model = model.clone();
    }
    if let Some(device) = &file.device
        && unset(matches, "device")
    {
        args.device = device.parse().map_err(|e| anyhow::anyhow!("config file: device {device:?}: {e}"))?;
    }
    if file.context.is_some() && unset(matches, "context") {
        args.context = file.context;
    }
    Ok(())
}

/// Applies the file to `kith serve`'s arguments left at their defaults.
pub(crate) fn apply_serve(file: &FileConfig, args: &mut ServeArgs, matches: &ArgMatches) -> Result<()> {
    apply_model(file, &mut args.model, matches)?;
    let serve = &file.serve;
    if let Some(listen) = serve.listen
        && unset(matches, "listen")
    {
        args.listen = listen;
    }
    if let Some(queue) = serve.queue
        && unset(matches, "queue")
    {
        args.queue = queue;
    }
    if let Some(max_tokens) = serve.max_tokens
        && unset(matches, "max_tokens")
    {
        args.max_tokens = max_tokens;
    }
    if let Some(max_body) = serve.max_body
        && unset(matches, "max_body")
    {
        args.max_body = max_body;
    }
    if let Some(no_memory) = serve.no_memory
        && unset(matches, "no_memory")
    {
        args.no_memory = no_memory;
    }
    if let Some(privacy) = serve.privacy
        && unset(matches, "privacy")
    {
        args.privacy = privacy;
    }
    if let Some(offload) = serve.offload
        && unset(matches, "offload")
    {
        args.offload = offload;
    }
    if let Some(no_mesh) = serve.no_mesh
        && unset(matches, "no_mesh")
    {
        args.no_mesh = no_mesh;
    }
    if let Some(mesh_listen) = &serve.mesh_listen
        && unset(matches, "mesh_listen")
    {
        args.mesh_listen = mesh_listen.clone();
    }
    if let Some(no_mdns) = serve.no_mdns
        && unset(matches, "no_mdns")
    {
        args.no_mdns = no_mdns;
    }
    if let Some(name) = &serve.name
        && unset(matches, "name")
    {
        args.name = Some(name.clone());
    }
    Ok(())
}

/// `kith config`: the settings `kith serve` would run with, and where each came from.
pub(crate) fn show(threads: Option<usize>, threads_source: &str) -> Result<std::process::ExitCode> {
    use clap::{CommandFactory, FromArgMatches};
    let file = load()?;
    let matches = crate::cli::Cli::command()
        .try_get_matches_from(["kith", "serve"])
        .context("reading settings from the environment")?;
    let (_, serve_matches) = matches.subcommand().context("serve")?;
    let mut args = ServeArgs::from_arg_matches(serve_matches).context("reading settings")?;
    apply_serve(&file, &mut args, serve_matches)?;
    let source = |id: &str, in_file: bool| match serve_matches.value_source(id) {
        Some(ValueSource::EnvVariable) => "environment",
        _ if in_file => "config file",
        _ => "default",
    };
    let shown = path().map_or_else(|| "(no config directory)".to_owned(), |p| p.display().to_string());
    let exists = path().is_some_and(|p| p.is_file());
    println!("# config file: {shown}{}", if exists { "" } else { " (absent)" });
    let threads = threads.or(file.threads);
    let threads_source =
        if file.threads.is_some() && threads_source == "default" { "config file" } else { threads_source };
    match threads {
        Some(n) => println!("threads = {n}  # {threads_source}"),
        None => println!("# threads: one per physical core  # default"),
    }
    println!("model = {:?}  # {}", args.model.model, source("model", file.model.is_some()));
    println!("device = \"{}\"  # {}", args.model.device, source("device", file.device.is_some()));
    match args.model.context {
        Some(n) => println!("context = {n}  # {}", source("context", file.context.is_some())),
        None => println!("# context: the model's, at most 8192  # default"),
    }
    println!("\n[serve]");
    println!("listen = \"{}\"  # {}", args.listen, source("listen", file.serve.listen.is_some()));
    println!("queue = {}  # {}", args.queue, source("queue", file.serve.queue.is_some()));
    println!("max_tokens = {}  # {}", args.max_tokens, source("max_tokens", file.serve.max_tokens.is_some()));
    println!("max_body = {}  # {}", args.max_body, source("max_body", file.serve.max_body.is_some()));
    println!("no_memory = {}  # {}", args.no_memory, source("no_memory", file.serve.no_memory.is_some()));
    println!("privacy = \"{}\"  # {}", args.privacy, source("privacy", file.serve.privacy.is_some()));
    println!("offload = \"{}\"  # {}", args.offload, source("offload", file.serve.offload.is_some()));
    println!("no_mesh = {}  # {}", args.no_mesh, source("no_mesh", file.serve.no_mesh.is_some()));
    println!("mesh_listen = {:?}  # {}", args.mesh_listen, source("mesh_listen", file.serve.mesh_listen.is_some()));
    println!("no_mdns = {}  # {}", args.no_mdns, source("no_mdns", file.serve.no_mdns.is_some()));
    match &args.name {
        Some(name) => println!("name = {name:?}  # {}", source("name", file.serve.name.is_some())),
        None => println!("# name: the host name  # default"),
    }
    Ok(std::process::ExitCode::SUCCESS)
}
