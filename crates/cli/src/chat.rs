//! `kith ask` and `kith chat`: streaming answers to the terminal.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use anyhow::{Context, Result};
use kith_infer::{Completion, EngineHandle, GenerateRequest, LoadOptions, LoadedModel, Prompt, StreamEvent};
use kith_memory::{ConversationMeta, ItemKind, ItemRef, MemoryStore, MessageBody, MessageStats, RanOn, Vault};
use kith_models::{ModelEntry, ModelKind};
use kith_types::ChatMessage;
use tokio::sync::mpsc;

use crate::cli::{AskArgs, ChatArgs, ModelArgs};
use crate::models;

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

/// Streams one answer to stdout. Returns the text and the completion, or `None` for the
/// completion when Ctrl-C cancelled it.
async fn stream_answer(engine: &EngineHandle, request: GenerateRequest) -> Result<(String, Option<Completion>)> {
    let mut stream = engine.generate(request).await?;
    let mut answer = String::new();
    let mut stdout = std::io::stdout();
    loop {
        let event = tokio::select! {
            biased;
            _ = tokio::signal::ctrl_c() => {
                drop(stream);
                let _ = stdout.flush();
                eprintln!("\n[cancelled]");
                return Ok((answer, None));
            }
            event = stream.next() => event,
        };
        let Some(event) = event else { return Ok((answer, None)) };
        let event = event?;
        let text = event.text();
        if !text.is_empty() {
            answer.push_str(text);
            stdout.write_all(text.as_bytes()).context("writing to stdout")?;
            stdout.flush().context("writing to stdout")?;
        }
        if let StreamEvent::Done(done) = event {
            return Ok((answer, Some(done)));
        }
    }
}

fn print_stats(done: &Completion) {
    let usage = done.usage;
    let timings = done.timings;
    let new_prompt = usage.prompt_tokens - usage.cached_tokens;
    let prefill_rate = new_prompt as f64 / timings.prefill.as_secs_f64().max(1e-9);
    let decoded = usage.completion_tokens.saturating_sub(1);
    let decode_rate = decoded as f64 / timings.decode.as_secs_f64().max(1e-9);
    eprintln!(
        "[prompt {} tokens ({} cached) at {:.1} tok/s, first token {:.0} ms, {} tokens at {:.1} tok/s, stop: {:?}]",
        usage.prompt_tokens,
        usage.cached_tokens,
        prefill_rate,
        timings.first_token.as_secs_f64() * 1000.0,
        usage.completion_tokens,
        decode_rate,
        done.stop_reason
    );
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
    let (engine, entry) = load_engine(&args.model).await?;
    warn_if_base(entry.as_ref(), args.raw);
    let request_prompt = if args.raw {
        Prompt::Text(prompt)
    } else {
        let mut messages = Vec::new();
        if let Some(system) = args.system {
            messages.push(ChatMessage::system(system));
        }
        messages.push(ChatMessage::user(prompt));
        Prompt::Chat(messages)
    };
    let (answer, done) = stream_answer(&engine, GenerateRequest::new(request_prompt, args.sampling.params())).await?;
    if !answer.ends_with('\n') {
        println!();
    }
    engine.shutdown().await;
    match done {
        Some(done) => {
            if args.stats {
                print_stats(&done);
            }
            Ok(ExitCode::SUCCESS)
        }
        None => Ok(ExitCode::from(EXIT_INTERRUPTED)),
    }
}

const CHAT_HELP: &str = "commands: /reset forgets the conversation, /exit (or Ctrl-D) quits; Ctrl-C stops an answer";

pub(crate) async fn chat(args: ChatArgs) -> Result<ExitCode> {
    let (engine, entry) = load_engine(&args.model).await?;
    warn_if_base(entry.as_ref(), false);
    let info = engine.info();
    eprintln!(
        "kith chat with {} ({}, {} context tokens on {}). {CHAT_HELP}",
        info.name.as_deref().unwrap_or(&args.model.model),
        info.architecture,
        info.context_length,
        info.device
    );
    let model_name = info.name.clone().unwrap_or_else(|| args.model.model.clone());
    let mut saved = SavedChat::open(&args, model_name).await?;
    let mut lines = spawn_line_reader();
    let mut history: Vec<ChatMessage> = args.system.iter().map(|s| ChatMessage::system(s.clone())).collect();
    if let Some(saved) = &saved {
        history.extend(saved.history.iter().cloned());
    }
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
                history.retain(|m| m.role == kith_types::Role::System);
                if let Some(saved) = &mut saved {
                    saved.conversation = None;
                }
                eprintln!("[conversation cleared]");
                continue;
            }
            "/help" | "/?" => {
                eprintln!("{CHAT_HELP}");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::user(input));
        let request = GenerateRequest::new(Prompt::Chat(history.clone()), params.clone());
        match stream_answer(&engine, request).await {
            Ok((answer, done)) => {
                if !answer.ends_with('\n') {
                    println!();
                }
                if let Some(saved) = &mut saved
                    && let Err(err) = saved.save_turn(input, &answer, done.as_ref()).await
                {
                    eprintln!("warning: this turn was not saved: {err:#}");
                }
                history.push(ChatMessage::assistant(answer));
                if let (true, Some(done)) = (args.stats, done) {
                    print_stats(&done);
                }
            }
            Err(err) => {
                history.pop();
                eprintln!("error: {err:#}");
                eprintln!("(use /reset to start over)");
            }
        }
    }
    engine.shutdown().await;
    if let Some(saved) = saved {
        if let Some(id) = saved.conversation {
            eprintln!("[saved as conversation {id}; continue with `kith chat --resume {id}`]");
        }
        saved.store.close().await;
    }
    Ok(ExitCode::SUCCESS)
}

/// A chat saved in the encrypted memory store: the conversation is created with its first
/// turn, and each turn (question and answer) is written in one transaction once answered.
struct SavedChat {
    store: MemoryStore,
    /// Embeds each saved message for recall, when the embedding model is pulled.
    embedder: Option<kith_infer::Embedder>,
    conversation: Option<i64>,
    model: String,
    /// Earlier turns of a resumed conversation.
    history: Vec<ChatMessage>,
}

impl SavedChat {
    /// The store when there is a vault and saving is wanted; `None` (with a note) otherwise.
    async fn open(args: &ChatArgs, model: String) -> Result<Option<Self>> {
        let home = kith_models::Store::from_env()?.home().to_owned();
        let vault = Vault::new(&home);
        if args.no_save {
            return Ok(None);
        }
        if !vault.exists() {
            if args.resume.is_some() {
                anyhow::bail!("no vault in {}: nothing to resume", home.display());
            }
            eprintln!("[not saved: no vault yet; `kith vault init` keeps conversations, encrypted]");
            return Ok(None);
        }
        let store = crate::vault::open_store(&home, args.passphrase_file.as_deref()).await?;
        let mut history = Vec::new();
        if let Some(id) = args.resume {
            let messages = store.messages(id).await?;
            if let Some(damaged) = messages.damaged.first() {
                anyhow::bail!("conversation {id} cannot be resumed: {damaged}");
            }
            if messages.items.is_empty() && store.conversation(id).await?.is_none() {
                anyhow::bail!("no conversation {id} (see `kith memory chats`)");
            }
            for message in messages.items {
                history.push(match message.body.role.as_str() {
                    "assistant" => ChatMessage::assistant(message.body.content),
                    "system" => ChatMessage::system(message.body.content),
                    _ => ChatMessage::user(message.body.content),
                });
            }
            eprintln!("[resuming conversation {id}: {} earlier messages]", history.len());
        }
        let embedder = crate::memory::load_embedder(false).unwrap_or_else(|err| {
            eprintln!("warning: saved messages will be searchable by words only: {err:#}");
            None
        });
        Ok(Some(Self { store, embedder, conversation: args.resume, model, history }))
    }

    async fn save_turn(&mut self, question: &str, answer: &str, done: Option<&Completion>) -> Result<()> {
        let id = match self.conversation {
            Some(id) => id,
            None => {
                let title: String = question.chars().take(60).collect();
                let id = self.store.create_conversation(&ConversationMeta { title, model: self.model.clone() }).await?;
                self.conversation = Some(id);
                id
            }
        };
        let stats = done.map_or(MessageStats::default(), |done| MessageStats {
            prompt_tokens: done.usage.prompt_tokens as i64,
            output_tokens: done.usage.completion_tokens as i64,
            duration_ms: (done.timings.prefill + done.timings.decode).as_millis() as i64,
        });
        let user = MessageBody { role: "user".into(), content: question.into(), ran_on: None, interrupted: false };
        let reply = MessageBody {
            role: "assistant".into(),
            content: answer.into(),
            ran_on: Some(RanOn::Local),
            interrupted: false,
        };
        let ids = self.store.add_messages(id, &[(user, MessageStats::default()), (reply, stats)]).await?;
        if let Some(embedder) = &self.embedder {
            // The turn is saved; without vectors it is still found by its words (and
            // `kith memory search` embeds it later).
            let embedded = async {
                let vectors = embedder.embed(&[question, answer])?;
                let pairs: Vec<(ItemRef, Vec<f32>)> =
                    ids.iter().map(|&id| ItemRef { kind: ItemKind::Message, id }).zip(vectors).collect();
                self.store.set_embeddings(&pairs).await?;
                anyhow::Ok(())
            };
            if let Err(err) = embedded.await {
                eprintln!("warning: this turn is saved but not embedded for search: {err:#}");
            }
        }
        Ok(())
    }
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
