//! `kith bench`: the same measurements every run, comparable with `llama-bench`.
//!
//! - pp128 / pp512: prompt processing of 128 and 512 tokens, from an empty cache.
//! - tg128: 128 generated tokens (greedy, end-of-generation ignored) after a short prompt.
//! - multi-turn: 10-turn chats; time to first token of turn 1 and turn 10, the latter
//!   reusing the KV cache of the earlier turns (medians over `--repetitions` chats, each
//!   with its own system message, so that no chat starts from another's cache).
//! - peak RSS of the process (VmHWM) through the prompt and generation runs (what
//!   `llama-bench` runs), and again after the chat.
//!
//! Each speed is the median of `--repetitions` runs after one warm-up.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kith_infer::{EngineHandle, GenerateRequest, Prompt, StreamEvent};
use kith_types::{ChatMessage, SamplingParams};
use serde::Serialize;

use crate::chat::load_engine;
use crate::cli::BenchArgs;

/// Plain English prose, tokenized and cut to the lengths the benchmark needs.
const PROSE: &str = "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his father had taught him. \
There were one hundred and twelve of them, worn smooth in the middle by a century of boots. At the top he trimmed the wick, \
polished the great lens with a soft cloth, and watched the ships move slowly along the horizon. Some nights the fog rolled in so \
thick that the beam seemed to stop a few yards from the glass, and he would sound the horn until morning. He kept a journal of \
the weather, the ships, and the birds that rested on the railing during storms: gulls, terns, once an exhausted owl that stayed \
for three days. ";

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    architecture: String,
    n_params: u64,
    device: String,
    threads: usize,
    repetitions: usize,
    open_ms: f64,
    load_ms: f64,
    pp128_tok_s: f64,
    pp512_tok_s: f64,
    tg128_tok_s: f64,
    ttft_turn1_ms: f64,
    ttft_turn10_ms: f64,
    ttft_ratio: f64,
    turn10_prompt_tokens: usize,
    turn10_cached_tokens: usize,
    /// Peak resident memory through the prompt and generation runs (what `llama-bench`
    /// runs).
    peak_rss_mib: Option<f64>,
    /// Peak resident memory once the 10-turn chat (about 1,000 tokens of context) has run.
    peak_rss_chat_mib: Option<f64>,
}

pub(crate) async fn run(args: BenchArgs) -> Result<ExitCode> {
    if args.repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    let (engine, _) = load_engine(&args.model).await?;
    let info = engine.info().clone();
    let pool = token_pool(&engine, 512 + 64 + 8 * args.repetitions)?;
    let mut offset = 0usize;
    let mut next_prompt = |len: usize| {
        // A new offset each time, so no run can reuse another's cache.
        offset += 1;
        pool[offset..offset + len].to_vec()
    };

    // Warm-up: fault pages in; then let the weights reach huge pages (a second or so after
    // loading, in the background), so that every figure is the steady state's.
    run_once(&engine, next_prompt(32), 8).await?;
    let settling = engine.clone();
    tokio::task::spawn_blocking(move || settling.wait_for_weights(Duration::from_secs(30))).await?;

    let mut pp128 = Vec::new();
    let mut pp512 = Vec::new();
    let mut tg128 = Vec::new();
    for _ in 0..args.repetitions {
        let run = run_once(&engine, next_prompt(128), 1).await?;
        pp128.push(128.0 / run.prefill.as_secs_f64());
        let run = run_once(&engine, next_prompt(512), 1).await?;
        pp512.push(512.0 / run.prefill.as_secs_f64());
        let run = run_once(&engine, next_prompt(16), 128).await?;
        tg128.push((run.generated - 1) as f64 / run.decode.as_secs_f64());
    }
    let peak_rss = peak_rss_mib();
    let (mut turn1, mut turn10) = (Vec::new(), Vec::new());
    let mut last = None;
    for chat in 1..=args.repetitions {
        let turns = multi_turn(&engine, chat).await?;
        let (Some(first), Some(tenth)) = (turns.first(), turns.last()) else {
            bail!("the multi-turn run produced no turns");
        };
        turn1.push(first.ttft.as_secs_f64() * 1000.0);
        turn10.push(tenth.ttft.as_secs_f64() * 1000.0);
        last = Some((tenth.prompt_tokens, tenth.cached_tokens));
    }
    let (turn10_prompt_tokens, turn10_cached_tokens) = last.unwrap_or_default();
    let (ttft_turn1_ms, ttft_turn10_ms) = (median(&mut turn1), median(&mut turn10));
    let report = Report {
        model: info.name.clone().unwrap_or_else(|| args.model.model.clone()),
        architecture: info.architecture.clone(),
        n_params: info.n_params,
        device: info.device.to_string(),
        threads: kith_infer::thread_count(),
        repetitions: args.repetitions,
        open_ms: info.open_time.as_secs_f64() * 1000.0,
        load_ms: info.load_time.as_secs_f64() * 1000.0,
        pp128_tok_s: median(&mut pp128),
        pp512_tok_s: median(&mut pp512),
        tg128_tok_s: median(&mut tg128),
        ttft_turn1_ms,
        ttft_turn10_ms,
        ttft_ratio: ttft_turn10_ms / ttft_turn1_ms,
        turn10_prompt_tokens,
        turn10_cached_tokens,
        peak_rss_mib: peak_rss,
        peak_rss_chat_mib: peak_rss_mib(),
    };
    engine.shutdown().await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(r: &Report) {
    println!("model      {} ({}, {:.1}M parameters)", r.model, r.architecture, r.n_params as f64 / 1e6);
    println!("device     {}, {} threads, median of {} runs", r.device, r.threads, r.repetitions);
    println!("open       {:>8.1} ms  (header, tokenizer, template)", r.open_ms);
    println!("load       {:>8.1} ms  (weights)", r.load_ms);
    println!("pp128      {:>8.1} tok/s", r.pp128_tok_s);
    println!("pp512      {:>8.1} tok/s", r.pp512_tok_s);
    println!("tg128      {:>8.1} tok/s", r.tg128_tok_s);
    println!("ttft t1    {:>8.1} ms", r.ttft_turn1_ms);
    println!(
        "ttft t10   {:>8.1} ms  ({:.2}x turn 1; prompt {} tokens, {} from cache)",
        r.ttft_turn10_ms, r.ttft_ratio, r.turn10_prompt_tokens, r.turn10_cached_tokens
    );
    match (r.peak_rss_mib, r.peak_rss_chat_mib) {
        (Some(rss), Some(chat)) => println!("peak RSS   {rss:>8.1} MiB  (after the chat: {chat:.1} MiB)"),
        _ => println!("peak RSS        n/a"),
    }
}

struct Run {
    prefill: Duration,
    decode: Duration,
    ttft: Duration,
    generated: usize,
    prompt_tokens: usize,
    cached_tokens: usize,
}

async fn run_once(engine: &EngineHandle, prompt: Vec<u32>, max_tokens: usize) -> Result<Run> {
    let mut params = SamplingParams::greedy();
    params.max_tokens = max_tokens;
    let mut request = GenerateRequest::new(Prompt::Tokens(prompt), params);
    request.ignore_eog = true;
    finish(engine, request).await
}

async fn finish(engine: &EngineHandle, request: GenerateRequest) -> Result<Run> {
    let mut stream = engine.generate(request).await?;
    while let Some(event) = stream.next().await {
        if let StreamEvent::Done(done) = event? {
            return Ok(Run {
                prefill: done.timings.prefill,
                decode: done.timings.decode,
                ttft: done.timings.first_token,
                generated: done.usage.completion_tokens,
                prompt_tokens: done.usage.prompt_tokens,
                cached_tokens: done.usage.cached_tokens,
            });
        }
    }
    bail!("the stream ended without a completion")
}

/// The 10-turn conversation number `chat`, with short greedy answers; returns one run per
/// turn.
async fn multi_turn(engine: &EngineHandle, chat: usize) -> Result<Vec<Run>> {
    // The number comes first: this chat shares almost nothing with the previous one's cache.
    let mut history = vec![ChatMessage::system(format!("Conversation {chat}: you are a helpful assistant."))];
    let mut runs = Vec::new();
    for turn in 1..=10 {
        history.push(ChatMessage::user(format!(
            "Here is note number {turn} from the lighthouse journal. Summarise it in one sentence: {}",
            &PROSE[..200]
        )));
        let mut params = SamplingParams::greedy();
        params.max_tokens = 24;
        let mut stream = engine.generate(GenerateRequest::new(Prompt::Chat(history.clone()), params)).await?;
        let mut answer = String::new();
        let mut run = None;
        while let Some(event) = stream.next().await {
            let event = event?;
            answer.push_str(event.text());
            if let StreamEvent::Done(done) = event {
                run = Some(Run {
                    prefill: done.timings.prefill,
                    decode: done.timings.decode,
                    ttft: done.timings.first_token,
                    generated: done.usage.completion_tokens,
                    prompt_tokens: done.usage.prompt_tokens,
                    cached_tokens: done.usage.cached_tokens,
                });
            }
        }
        runs.push(run.context("the stream ended without a completion")?);
        history.push(ChatMessage::assistant(answer));
    }
    Ok(runs)
}

fn token_pool(engine: &EngineHandle, len: usize) -> Result<Vec<u32>> {
    let mut text = String::new();
    let mut ids = Vec::new();
    while ids.len() < len {
        text.push_str(PROSE);
        // Control tokens parsed, as chats are (the prose has none): a literal encoding would
        // build a second tokenizer that nothing else uses, and count it in the peak memory.
        ids = engine.tokenizer().encode(&text, false, true).map_err(anyhow::Error::msg)?;
    }
    Ok(ids)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
