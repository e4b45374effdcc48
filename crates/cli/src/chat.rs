//! `kith ask` and `kith chat`: streaming answers to the terminal.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use kith_infer::{
    Completion, EngineHandle, GenerateError, GenerateRequest, LoadOptions, LoadedModel, Prompt, StreamEvent,
};
use kith_memory::Vault;
use kith_models::{ModelEntry, ModelKind};
use kith_node::{ChatTurn, Node, NodeBuilder};
use kith_types::{ChatMessage, SamplingParams};
use tokio::sync::mpsc;

use crate::cli::{AskArgs, ChatArgs, ModelArgs};
use crate::models;
use crate::remote::Remote;

/// Exit code after Ctrl-C, as shells expect.
const EXIT_INTERRUPTED: u8 = 130;

pub(crate) async fn load_engine(args: &ModelArgs) -> Result<(EngineHandle, Option<ModelEntry>)> {
    let (loaded, entry) = load_model(args).await?;
    let engine = EngineHandle::spawn(loaded).context("starting the engine thread")?;
    Ok((engine, entry))
}

/// Resolves (pulling if needed) and loads a model, off the async threads.
pub(crate) async fn load_model(args: &ModelArgs) -> Result<(LoadedModel, Option<ModelEntry>)> {
    let (path, entry) = models::resolve(args)?;
    let mut options = LoadOptions::default();
    options.device = args.device;
    options.context_length = args.context;
    options.template = args.template.clone();
    let shown = path.display().to_string();
    let loaded = tokio::task::spawn_blocking(move || LoadedModel::load(&path, &options))
        .await
        .context("model loading thread failed")?
        .with_context(|| format!("loading model {shown}"))?;
    Ok((loaded, entry))
}

fn warn_if_base(entry: Option<&ModelEntry>, raw: bool) {
    if let Some(entry) = entry
        && entry.kind == ModelKind::Base
        && !raw
    {
        eprintln!(
            "note: {} is a base model, not instruction-tuned: it continues text rather than answering (try --raw)",
            entry.name
        );
    }
}

/// How an answer ended: its statistics, or cancelled.
enum Ending {
    /// From the engine (here or in an in-process node): counts and timings.
    Engine(Completion),
    /// From a running node's API: counts only.
    Usage { prompt: u64, completion: u64 },
    /// Ctrl-C (or the stream ended early).
    Cancelled,
}

/// Streams text to stdout as it comes.
struct Printer {
    answer: String,
    stdout: std::io::Stdout,
}

impl Printer {
    fn new() -> Self {
        Self { answer: String::new(), stdout: std::io::stdout() }
    }

    fn print(&mut self, text: &str) -> Result<()> {
        if !text.is_empty() {
            self.answer.push_str(text);
            self.stdout.write_all(text.as_bytes()).context("writing to stdout")?;
            self.stdout.flush().context("writing to stdout")?;
        }
        Ok(())
    }

    fn cancelled(&mut self) -> Ending {
        let _ = self.stdout.flush();
        eprintln!("\n[cancelled]");
        Ending::Cancelled
    }
}

/// Engine events: from the engine directly, or from a node's chat turn.
trait Events {
    async fn next_event(&mut self) -> Option<Result<StreamEvent, GenerateError>>;
}

impl Events for kith_infer::TokenStream {
    async fn next_event(&mut self) -> Option<Result<StreamEvent, GenerateError>> {
        self.next().await
    }
}

impl Events for mpsc::Receiver<Result<StreamEvent, GenerateError>> {
    async fn next_event(&mut self) -> Option<Result<StreamEvent, GenerateError>> {
        self.recv().await
    }
}

/// Streams engine events until done or Ctrl-C.
async fn print_events(events: &mut impl Events, printer: &mut Printer) -> Result<Ending> {
    loop {
        let event = tokio::select! {
            biased;
            _ = tokio::signal::ctrl_c() => return Ok(printer.cancelled()),
            event = events.next_event() => event,
        };
        let Some(event) = event else { return Ok(Ending::Cancelled) };
        let event = event?;
        printer.print(event.text())?;
        if let StreamEvent::Done(done) = event {
            return Ok(Ending::Engine(done));
        }
    }
}

/// What a running node said about an answer besides its text.
#[derive(Default)]
struct RemoteAnswer {
    conversation: Option<i64>,
    ran_on: Option<String>,
}

/// Streams a chat completion from a running node until `[DONE]` or Ctrl-C.
async fn print_remote(
    remote: &Remote,
    body: &serde_json::Value,
    printer: &mut Printer,
) -> Result<(Ending, RemoteAnswer)> {
    let mut events = remote.events("/v1/chat/completions", body).await?;
    let mut said = RemoteAnswer::default();
    let mut usage = None;
    loop {
        let event = tokio::select! {
            biased;
            _ = tokio::signal::ctrl_c() => return Ok((printer.cancelled(), said)),
            event = events.next() => event?,
        };
        let Some(chunk) = event else {
            let ending = usage.map_or(Ending::Cancelled, |(prompt, completion)| Ending::Usage { prompt, completion });
            return Ok((ending, said));
        };
        if let Some(error) = chunk["error"]["message"].as_str() {
            anyhow::bail!("the node: {error}");
        }
        // The last chunk says where every part ran, if a friend failed mid-answer.
        if let Some(ran_on) = chunk["kith"]["ran_on"].as_str() {
            said.ran_on = Some(ran_on.to_owned());
            said.conversation = chunk["kith"]["conversation"].as_i64();
        }
        if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str() {
            printer.print(text)?;
        }
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            usage = Some((u["prompt_tokens"].as_u64().unwrap_or(0), u["completion_tokens"].as_u64().unwrap_or(0)));
        }
    }
}

fn print_stats(ending: &Ending, ran_on: &str) {
    match ending {
        Ending::Engine(done) => {
            let usage = done.usage;
            let timings = done.timings;
            let new_prompt = usage.prompt_tokens - usage.cached_tokens;
            let prefill_rate = new_prompt as f64 / timings.prefill.as_secs_f64().max(1e-9);
            let decoded = usage.completion_tokens.saturating_sub(1);
            let decode_rate = decoded as f64 / timings.decode.as_secs_f64().max(1e-9);
            eprintln!(
                "[prompt {} tokens ({} cached) at {:.1} tok/s, first token {:.0} ms, {} tokens at {:.1} tok/s, stop: {:?}, ran on {ran_on}]",
                usage.prompt_tokens,
                usage.cached_tokens,
                prefill_rate,
                timings.first_token.as_secs_f64() * 1000.0,
                usage.completion_tokens,
                decode_rate,
                done.stop_reason
            );
        }
        Ending::Usage { prompt, completion } => {
            eprintln!("[prompt {prompt} tokens, {completion} tokens, ran on {ran_on}]");
        }
        Ending::Cancelled => {}
    }
}

/// The request body of a chat completion for a running node.
fn completion_body(model: &str, messages: &[ChatMessage], params: &SamplingParams) -> serde_json::Value {
    let mut body = serde_json::json!({
        "model": model,
        "messages": messages,
        "stream": true,
        "stream_options": { "include_usage": true },
        "temperature": params.temperature,
        "max_tokens": params.max_tokens,
        "seed": params.seed,
    });
    if params.temperature > 0.0 {
        body["top_p"] = params.top_p.into();
    }
    if !params.stop.is_empty() {
        body["stop"] = params.stop.clone().into();
    }
    body
}

/// The node running in `home` if it serves `model` (with a note when it serves others).
async fn remote_for(model: &str) -> Result<Option<Remote>> {
    let home = kith_models::Store::from_env()?.home().to_owned();
    let Some(remote) = crate::remote::connect(&home).await? else { return Ok(None) };
    if remote.chat_models().iter().any(|m| m == model) || remote.friend_offers(model).await {
        return Ok(Some(remote));
    }
    eprintln!(
        "note: the node running at {} serves {}, not {model}; loading {model} here",
        remote.url(),
        remote.chat_models().join(", ")
    );
    Ok(None)
}

pub(crate) async fn ask(args: AskArgs) -> Result<ExitCode> {
    let mut prompt = args.prompt.join(" ");
    if prompt == "-" {
        prompt.clear();
        std::io::stdin().lock().read_line(&mut prompt).context("reading the prompt from stdin")?;
        let rest: Vec<String> = std::io::stdin().lock().lines().map_while(Result::ok).collect();
        for line in rest {
            prompt.push('\n');
            prompt.push_str(&line);
        }
    }
    let mut messages = Vec::new();
    if let Some(system) = args.system.clone() {
        messages.push(ChatMessage::system(system));
    }
    messages.push(ChatMessage::user(prompt.clone()));
    let params = args.sampling.params();
    let mut printer = Printer::new();
    let remote = match &args.peer {
        Some(peer) if args.raw => bail!("--peer sends chat messages; it cannot be combined with --raw ({peer})"),
        Some(_) => {
            let home = kith_models::Store::from_env()?.home().to_owned();
            let remote = crate::remote::connect(&home).await?;
            Some(remote.context("--peer needs a running node (`kith serve` with a vault), which holds the mesh")?)
        }
        None if args.raw => None,
        None => remote_for(&args.model.model).await?,
    };
    let (ending, ran_on) = match remote {
        Some(remote) => {
            let mut body = completion_body(&args.model.model, &messages, &params);
            if let Some(peer) = &args.peer {
                body["kith"] = serde_json::json!({ "peer": peer });
            }
            let (ending, said) = print_remote(&remote, &body, &mut printer).await?;
            let ran_on = format!("{} (through the node at {})", said.ran_on.as_deref().unwrap_or("?"), remote.url());
            (ending, ran_on)
        }
        None => {
            let (engine, entry) = load_engine(&args.model).await?;
            warn_if_base(entry.as_ref(), args.raw);
            let request_prompt = if args.raw { Prompt::Text(prompt) } else { Prompt::Chat(messages) };
            let mut stream = engine.generate(GenerateRequest::new(request_prompt, params)).await?;
            let ending = print_events(&mut stream, &mut printer).await?;
            drop(stream);
            engine.shutdown().await;
            (ending, "local".to_owned())
        }
    };
    if !printer.answer.ends_with('\n') {
        println!();
    }
    if args.stats {
        print_stats(&ending, &ran_on);
    }
    Ok(if matches!(ending, Ending::Cancelled) { ExitCode::from(EXIT_INTERRUPTED) } else { ExitCode::SUCCESS })
}

const CHAT_HELP: &str = "commands: /reset starts a new conversation, /exit (or Ctrl-D) quits; Ctrl-C stops an answer";

/// Where `kith chat` sends its turns.
enum Backend {
    /// No vault, or `--no-save`: the engine here, the history kept by the session.
    Engine(EngineHandle),
    /// The vault opened here: an in-process node (recall, suggestions, saving).
    Node { node: Node, model: String },
    /// A running node: `kith/<model>` when it has a vault and saving is wanted (the node
    /// keeps the history), else plain `<model>` with the history kept by the session.
    Remote { remote: Remote, model: String, memory: bool },
}

impl Backend {
    /// Whether the conversation lives in the vault (so the session keeps no history).
    fn saves(&self) -> bool {
        match self {
            Backend::Engine(_) => false,
            Backend::Node { .. } => true,
            Backend::Remote { memory, .. } => *memory,
        }
    }

    async fn open(args: &ChatArgs) -> Result<Self> {
        let home = kith_models::Store::from_env()?.home().to_owned();
        let remote = match &args.peer {
            Some(_) => Some(
                crate::remote::connect(&home)
                    .await?
                    .context("--peer needs a running node (`kith serve` with a vault), which holds the mesh")?,
            ),
            None => remote_for(&args.model.model).await?,
        };
        if let Some(remote) = remote {
            let memory = remote.has_memory() && !args.no_save;
            if !memory && args.resume.is_some() {
                anyhow::bail!("the node running at {} has no vault: nothing to resume", remote.url());
            }
            if let Some(id) = args.resume {
                let detail = remote.get(&format!("/api/conversations/{id}")).await?;
                let count = detail["messages"].as_array().map_or(0, Vec::len);
                eprintln!("[resuming conversation {id}: {count} earlier messages]");
            }
            eprintln!(
                "kith chat with {} through the node at {}{}. {CHAT_HELP}",
                args.model.model,
                remote.url(),
                if memory { " (saved encrypted, with memory)" } else { "" }
            );
            return Ok(Backend::Remote { remote, model: args.model.model.clone(), memory });
        }
        let vault = Vault::new(&home);
        let save = !args.no_save && vault.exists();
        if !save && args.resume.is_some() {
            anyhow::bail!("no vault in {}: nothing to resume", home.display());
        }
        if !args.no_save && !vault.exists() {
            eprintln!("[not saved: no vault yet; `kith vault init` keeps conversations, encrypted]");
        }
        let (loaded, entry) = load_model(&args.model).await?;
        warn_if_base(entry.as_ref(), false);
        let info = loaded.info().clone();
        let name = entry.map_or_else(|| args.model.model.clone(), |e| e.name);
        eprintln!(
            "kith chat with {} ({}, {} context tokens on {}). {CHAT_HELP}",
            info.name.as_deref().unwrap_or(&name),
            info.architecture,
            info.context_length,
            info.device
        );
        if !save {
            return Ok(Backend::Engine(EngineHandle::spawn(loaded).context("starting the engine thread")?));
        }
        let store = crate::vault::open_store(&home, args.passphrase_file.as_deref()).await?;
        let items = store.recall_items().await?;
        for damaged in &items.damaged {
            eprintln!("warning: not recalled: {damaged}");
        }
        let mut builder =
            NodeBuilder::new().model(name.clone(), loaded).memory(store, kith_memory::RecallIndex::build(items.items));
        match crate::memory::load_embedder(false) {
            Ok(Some(embedder)) => builder = builder.embedder(crate::memory::EMBEDDING_MODEL, embedder),
            Ok(None) => {}
            Err(err) => eprintln!("warning: memories will be recalled by words only: {err:#}"),
        }
        let node = builder.build()?;
        if let Some(id) = args.resume {
            let (_, count) = node
                .conversation(id)
                .await?
                .with_context(|| format!("no conversation {id} (see `kith memory chats`)"))?;
            eprintln!("[resuming conversation {id}: {count} earlier messages]");
        }
        Ok(Backend::Node { node, model: name })
    }

    async fn close(self) {
        match self {
            Backend::Engine(engine) => engine.shutdown().await,
            Backend::Node { node, .. } => node.shutdown().await,
            Backend::Remote { .. } => {}
        }
    }
}

pub(crate) async fn chat(args: ChatArgs) -> Result<ExitCode> {
    let backend = Backend::open(&args).await?;
    let mut lines = spawn_line_reader();
    let system: Vec<ChatMessage> = args.system.iter().map(|s| ChatMessage::system(s.clone())).collect();
    // The history the session keeps when the vault does not.
    let mut history = system.clone();
    let mut conversation = args.resume;
    let params = args.sampling.params();
    loop {
        print!(">>> ");
        std::io::stdout().flush().context("writing to stdout")?;
        let line = tokio::select! {
            biased;
            _ = tokio::signal::ctrl_c() => { println!(); break; }
            line = lines.recv() => line,
        };
        let Some(line) = line else {
            println!();
            break;
        };
        let input = line.trim();
        match input {
            "" => continue,
            "/exit" | "/quit" | "/bye" => break,
            "/reset" => {
                history.clone_from(&system);
                if let Some(id) = conversation.take() {
                    eprintln!("[conversation {id} is saved; continue it with `kith chat --resume {id}`]");
                }
                eprintln!("[new conversation]");
                continue;
            }
            "/help" | "/?" => {
                eprintln!("{CHAT_HELP}");
                continue;
            }
            _ => {}
        }
        let mut printer = Printer::new();
        let result = async {
            match &backend {
                Backend::Engine(engine) => {
                    history.push(ChatMessage::user(input));
                    let request = GenerateRequest::new(Prompt::Chat(history.clone()), params.clone());
                    let mut stream = engine.generate(request).await?;
                    let ending = print_events(&mut stream, &mut printer).await?;
                    anyhow::Ok((ending, "local".to_owned()))
                }
                Backend::Node { node, model } => {
                    let turn = ChatTurn {
                        model: Some(model.clone()),
                        conversation,
                        system: args.system.clone(),
                        message: input.to_owned(),
                        params: params.clone(),
                        privacy: args.privacy,
                        peer: None,
                    };
                    let mut turn = node.chat_turn(turn).await?;
                    conversation = Some(turn.conversation);
                    let ending = print_events(&mut turn.events, &mut printer).await?;
                    if !matches!(ending, Ending::Cancelled) {
                        // The channel closes once the exchange is saved.
                        while turn.events.recv().await.is_some() {}
                    }
                    Ok((ending, turn.route.as_str().to_owned()))
                }
                Backend::Remote { remote, model, memory } => {
                    let body = if *memory {
                        let mut messages = system.clone();
                        messages.push(ChatMessage::user(input));
                        let mut body = completion_body(&format!("kith/{model}"), &messages, &params);
                        body["kith"] = serde_json::json!({ "conversation": conversation, "privacy": args.privacy });
                        body
                    } else {
                        history.push(ChatMessage::user(input));
                        completion_body(model, &history, &params)
                    };
                    let mut body = body;
                    if let Some(peer) = &args.peer {
                        if !body["kith"].is_object() {
                            body["kith"] = serde_json::json!({});
                        }
                        body["kith"]["peer"] = peer.clone().into();
                    }
                    let (ending, said) = print_remote(remote, &body, &mut printer).await?;
                    if said.conversation.is_some() {
                        conversation = said.conversation;
                    }
                    let ran_on = format!("{} (through the node)", said.ran_on.as_deref().unwrap_or("?"));
                    Ok((ending, ran_on))
                }
            }
        }
        .await;
        match result {
            Ok((ending, ran_on)) => {
                if !printer.answer.ends_with('\n') {
                    println!();
                }
                if !backend.saves() {
                    history.push(ChatMessage::assistant(printer.answer));
                }
                if args.stats {
                    print_stats(&ending, &ran_on);
                }
            }
            Err(err) => {
                if !backend.saves() {
                    history.pop();
                }
                eprintln!("error: {err:#}");
                eprintln!("(use /reset to start over)");
            }
        }
    }
    backend.close().await;
    if let Some(id) = conversation {
        eprintln!("[saved as conversation {id}; continue with `kith chat --resume {id}`]");
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads stdin on its own thread so the async side can wait for a line or Ctrl-C.
fn spawn_line_reader() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}
