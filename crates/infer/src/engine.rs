//! One thread per loaded model, and the async handle that talks to it.
//!
//! ```text
//!  EngineHandle (Clone) ──Command──▶ engine thread (owns Model + KV cache)
//!        ▲                                │ prefill, then one forward per token
//!        └──── TokenStream ◀──StreamEvent─┘ bounded channel; a dropped stream
//!                                           stops generation at the next token
//! ```
//!
//! The forward pass is CPU-bound, so it never runs on the async runtime. The thread
//! keeps the token ids its KV cache holds; a request whose prompt starts with them (the
//! next turn of the same chat) only prefills the new tokens.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kith_types::{ChatMessage, SamplingParams};
use tokio::sync::mpsc;

use crate::error::GenerateError;
use crate::loader::{LoadedModel, ModelInfo};
use crate::model::{Model, Step};
use crate::sampler::Sampler;
use crate::template::ChatTemplate;
use crate::text::TextAssembler;
use crate::tokenizer::Tokenizer;
use crate::weights::Settled;

/// Requests that may wait for the engine thread.
const QUEUE_DEPTH: usize = 16;
/// Events buffered between the engine thread and a slow reader.
const STREAM_DEPTH: usize = 64;

/// What to generate from.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Prompt {
    /// A conversation, rendered with the model's chat template plus a generation prompt.
    Chat(Vec<ChatMessage>),
    /// Raw text, tokenized as llama.cpp's `/completion` does (BOS added if the model wants it,
    /// special-token spellings parsed).
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// One generation request.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GenerateRequest {
    /// The input.
    pub prompt: Prompt,
    /// Sampling and stopping.
    pub params: SamplingParams,
    /// Also report the `n` most likely tokens (with log-probabilities) at each step.
    pub top_logprobs: usize,
    /// Keep generating through end-of-generation tokens (for benchmarks).
    pub ignore_eog: bool,
    /// Reuse the KV cache of the longest prefix shared with the previous request (default).
    /// Off, the whole prompt is recomputed, as llama-server's `cache_prompt: false`.
    pub cache_prompt: bool,
    /// Tokens of the answer generated already (elsewhere, by the same model): generation
    /// continues after them as if it had produced them itself. They count towards
    /// `max_tokens`; their text is not sent again.
    pub continue_from: Vec<u32>,
    /// Run behind everything else: a queued request that is not in the background (the
    /// machine owner's) goes first, and one arriving mid-generation runs between two
    /// tokens of this one, which then resumes (its cache recomputed). Friends' requests.
    pub background: bool,
}

impl GenerateRequest {
    /// A request with the given prompt and parameters.
    pub fn new(prompt: Prompt, params: SamplingParams) -> Self {
        Self {
            prompt,
            params,
            top_logprobs: 0,
            ignore_eog: false,
            cache_prompt: true,
            continue_from: Vec::new(),
            background: false,
        }
    }
}

/// One generated token.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TokenEvent {
    /// The token id.
    pub id: u32,
    /// Text that became visible with this token (may be empty: a partial character, a
    /// possible stop string, or an end-of-generation token).
    pub text: String,
    /// The most likely tokens at this step and their log-probabilities (full softmax over
    /// the raw logits), when asked for.
    pub top_logprobs: Vec<(u32, f32)>,
}

impl TokenEvent {
    /// A token and its visible text (for streams relayed from elsewhere).
    pub fn new(id: u32, text: impl Into<String>) -> Self {
        Self { id, text: text.into(), top_logprobs: Vec::new() }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// The model produced an end-of-generation token.
    EndOfGeneration,
    /// `max_tokens` were generated.
    MaxTokens,
    /// A stop string appeared (it is not part of the text).
    StopString,
    /// The context window is full.
    ContextFull,
    /// The reader went away.
    Cancelled,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Of those, how many were reused from the KV cache instead of recomputed.
    pub cached_tokens: usize,
    /// Tokens generated (an end-of-generation token included).
    pub completion_tokens: usize,
}

impl Usage {
    /// Counts with nothing cached.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self { prompt_tokens, cached_tokens: 0, completion_tokens }
    }
}

/// Timings of one request.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct Timings {
    /// Waiting in the queue before the engine started.
    pub queued: Duration,
    /// Processing the prompt's new tokens.
    pub prefill: Duration,
    /// From the start of processing to the first generated token.
    pub first_token: Duration,
    /// Generating after the first token.
    pub decode: Duration,
}

impl Timings {
    /// Timings measured elsewhere.
    pub fn new(queued: Duration, prefill: Duration, first_token: Duration, decode: Duration) -> Self {
        Self { queued, prefill, first_token, decode }
    }
}

/// The end of a stream.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Completion {
    /// Text still held back when generation ended (an incomplete character, say).
    pub text: String,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// Token counts.
    pub usage: Usage,
    /// Timings.
    pub timings: Timings,
}

impl Completion {
    /// The end of a stream relayed from elsewhere.
    pub fn new(text: impl Into<String>, stop_reason: StopReason, usage: Usage, timings: Timings) -> Self {
        Self { text: text.into(), stop_reason, usage, timings }
    }
}

/// What a [`TokenStream`] yields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StreamEvent {
    /// A token and the text it made visible.
    Token(TokenEvent),
    /// Generation ended; always the last event.
    Done(Completion),
}

impl StreamEvent {
    /// The text this event adds to the output.
    pub fn text(&self) -> &str {
        match self {
            Self::Token(token) => &token.text,
            Self::Done(done) => &done.text,
        }
    }
}

/// The events of one generation. Dropping it cancels the generation.
#[derive(Debug)]
#[must_use = "dropping the stream cancels the generation"]
pub struct TokenStream {
    rx: mpsc::Receiver<Result<StreamEvent, GenerateError>>,
}

impl TokenStream {
    /// A stream fed by the returned sender (for generations relayed from elsewhere).
    pub fn channel() -> (mpsc::Sender<Result<StreamEvent, GenerateError>>, TokenStream) {
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        (tx, TokenStream { rx })
    }

    /// The next event, or `None` after [`StreamEvent::Done`] or an error.
    ///
    /// Cancel-safe: dropping the future loses no event.
    pub async fn next(&mut self) -> Option<Result<StreamEvent, GenerateError>> {
        self.rx.recv().await
    }

    /// The next event, blocking the current thread. Do not call from async code.
    pub fn blocking_next(&mut self) -> Option<Result<StreamEvent, GenerateError>> {
        self.rx.blocking_recv()
    }
}

enum Command {
    Generate { request: GenerateRequest, events: mpsc::Sender<Result<StreamEvent, GenerateError>>, queued_at: Instant },
}

impl Command {
    fn background(&self) -> bool {
        let Command::Generate { request, .. } = self;
        request.background
    }
}

/// Commands received and not yet run, the owner's first.
#[derive(Default)]
struct Waiting(std::collections::VecDeque<Command>);

impl Waiting {
    /// Takes whatever arrived since, without blocking.
    fn collect(&mut self, commands: &mut mpsc::Receiver<Command>) {
        while let Ok(command) = commands.try_recv() {
            self.0.push_back(command);
        }
    }

    /// The next command: the first foreground one, else the oldest.
    fn next(&mut self) -> Option<Command> {
        let at = self.0.iter().position(|c| !c.background()).unwrap_or(0);
        self.0.remove(at)
    }

    /// The next foreground command, if one waits.
    fn next_foreground(&mut self) -> Option<Command> {
        let at = self.0.iter().position(|c| !c.background())?;
        self.0.remove(at)
    }
}

/// A cloneable handle to a model's engine thread.
#[derive(Clone)]
#[must_use = "dropping every handle stops the engine thread"]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    info: Arc<ModelInfo>,
    tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
    /// Decode speed of the last generation long enough to measure (f32 tok/s bits).
    speed: Arc<AtomicU32>,
    /// Set when an owner's (foreground) request was queued: a background forward pass
    /// steps aside at its next layer.
    owner_waiting: Arc<AtomicBool>,
    weights: Arc<Settled>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle").field("model", &self.info.path).finish_non_exhaustive()
    }
}

/// A forward pass allocates and frees buffers of up to a few MB for every matrix (a
/// 512-token prompt on SmolLM2: about 2,000 of them). glibc's defaults give such buffers
/// fresh pages from the kernel each time, through `mmap` or after trimming its heaps, and
/// each page is faulted in and zeroed again: a quarter of the prompt time at 2 threads
/// (pp512 on SmolLM2, 2 threads: 375-386 → 475-497 tok/s). Keeping up to 64 MB of freed
/// memory per heap, and serving requests below 32 MB from the heaps, lets the next pass reuse
/// the same pages. Set once, after the weights are loaded (their temporary buffers were
/// returned as usual).
///
/// Loading leaves freed memory between live blocks (the GGUF header's strings, the
/// tokenizer's construction): it is handed back to the kernel first (about 8 MiB for
/// SmolLM2), so that it does not count in the process's memory for as long as it runs.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        #[allow(unsafe_code)]
        // SAFETY: malloc_trim only returns free pages of glibc's heaps to the kernel; it is
        // safe to call at any time, from any thread.
        unsafe {
            libc::malloc_trim(0);
        }
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            #[allow(unsafe_code)]
            // SAFETY: mallopt only changes glibc's allocation thresholds; it is safe to call
            // at any time, from any thread.
            let set = unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                    && libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20) == 1
            };
            if !set {
                tracing::debug!("glibc refused the allocation thresholds; keeping its defaults");
            }
        });
    }
}

impl EngineHandle {
    /// Starts the engine thread that owns `model`.
    pub fn spawn(model: LoadedModel) -> std::io::Result<Self> {
        keep_freed_memory();
        let (commands, rx) = mpsc::channel(QUEUE_DEPTH);
        let LoadedModel { model, tokenizer, template, info } = model;
        let weights = model.settled.clone();
        let speed = Arc::new(AtomicU32::new(0));
        let owner_waiting = Arc::new(AtomicBool::new(false));
        let mut engine = Engine {
            model,
            tokenizer: tokenizer.clone(),
            template: template.clone(),
            cached: Vec::new(),
            speed: speed.clone(),
            aside: None,
            owner_waiting: owner_waiting.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("kith-engine-{}", info.architecture))
            .spawn(move || engine.run(rx))?;
        Ok(Self {
            commands,
            info,
            tokenizer,
            template,
            thread: Arc::new(Mutex::new(Some(thread))),
            speed,
            owner_waiting,
            weights,
        })
    }

    /// Blocks up to `timeout` until the weights are in their final pages (on Linux they
    /// move into huge pages in the background after loading, which makes decoding faster),
    /// and says whether they are. Generation does not need to wait; benchmarks do.
    pub fn wait_for_weights(&self, timeout: Duration) -> bool {
        self.weights.wait(timeout)
    }

    /// Facts about the model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Decode tokens per second of the last generation of 8 tokens or more (0 before).
    pub fn decode_speed(&self) -> f64 {
        f64::from(f32::from_bits(self.speed.load(Ordering::Relaxed)))
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The model's chat template.
    pub fn chat_template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Queues a request and returns its event stream.
    ///
    /// Cancel-safe: if the future is dropped before it resolves, nothing was queued.
    pub async fn generate(&self, request: GenerateRequest) -> Result<TokenStream, GenerateError> {
        // Refuse bad parameters here, before the request waits in the queue.
        Sampler::new(request.params.clone())?;
        let (events, rx) = mpsc::channel(STREAM_DEPTH);
        let foreground = !request.background;
        self.commands
            .send(Command::Generate { request, events, queued_at: Instant::now() })
            .await
            .map_err(|_| GenerateError::EngineStopped)?;
        // After the send: the engine clears the flag before it looks for commands, so
        // this one is either seen there or flagged (at worst a pause finds nothing).
        if foreground {
            self.owner_waiting.store(true, Ordering::SeqCst);
        }
        Ok(TokenStream { rx })
    }

    /// Stops the engine thread once queued requests are done, and waits for it.
    /// Other clones of this handle get [`GenerateError::EngineStopped`] afterwards.
    pub async fn shutdown(self) {
        let thread = self.thread.lock().ok().and_then(|mut slot| slot.take());
        drop(self.commands);
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Owned by the engine thread.
struct Engine {
    model: Model,
    tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
    /// Token ids whose keys and values are in the model's KV cache, in order.
    cached: Vec<u32>,
    speed: Arc<AtomicU32>,
    /// The foreground cache and its ids while a background generation has the model's,
    /// and the other way round (so both keep their prefixes).
    aside: Option<(crate::model::KvCaches, Vec<u32>)>,
    owner_waiting: Arc<AtomicBool>,
}

impl Engine {
    fn run(&mut self, mut commands: mpsc::Receiver<Command>) {
        // The forward pass runs on a worker of the engine's own rayon pool, so the
        // parallel kernels inside it fork from a worker (cheap) rather than inject work
        // from an outside thread and sleep on a latch for every matrix product. That
        // worker is this thread, always: passes on whichever worker took each request
        // left their buffers in that thread's malloc arena, so that every worker's arena
        // came to hold a copy (peak memory at 2 threads from run to run: SmolLM2 141 or
        // 153 MiB, Gemma 292 or 313; now 141-142 and 292-294). Rayon keeps this thread's
        // registration (a few KiB) after the pool is dropped.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(crate::thread_count())
            .use_current_thread()
            .thread_name(|idx| format!("kith-worker-{idx}"))
            .build();
        let mut waiting = Waiting::default();
        loop {
            self.collect(&mut waiting, &mut commands);
            let command = match waiting.next() {
                Some(command) => command,
                None => match commands.blocking_recv() {
                    Some(command) => command,
                    None => break,
                },
            };
            match &pool {
                Ok(pool) => pool.install(|| self.run_one(command, &mut commands, &mut waiting)),
                Err(_) => self.run_one(command, &mut commands, &mut waiting),
            }
        }
        tracing::debug!("engine thread exiting");
    }

    fn run_one(&mut self, command: Command, commands: &mut mpsc::Receiver<Command>, waiting: &mut Waiting) {
        let Command::Generate { request, events, queued_at } = command;
        let queued = queued_at.elapsed();
        if let Err(err) = self.generate(request, &events, queued, commands, waiting) {
            if matches!(err, GenerateError::Candle(_)) {
                tracing::error!(error = %err, "forward pass failed; KV cache reset");
                self.reset_cache();
            }
            let _ = events.blocking_send(Err(err));
        }
    }

    /// Takes the commands sent since, without blocking.
    fn collect(&self, waiting: &mut Waiting, commands: &mut mpsc::Receiver<Command>) {
        self.owner_waiting.store(false, Ordering::SeqCst);
        waiting.collect(commands);
    }

    /// Runs the foreground commands waiting now (in the middle of a background pass).
    fn run_foreground(&mut self, commands: &mut mpsc::Receiver<Command>, waiting: &mut Waiting) {
        self.collect(waiting, commands);
        while let Some(command) = waiting.next_foreground() {
            self.run_one(command, commands, waiting);
            self.collect(waiting, commands);
        }
    }

    /// One forward pass of `tokens`. A background one steps aside between two layers
    /// when the owner's requests arrive: they run on their own cache, then this pass
    /// picks up at the layer it reached, its cache untouched. `None`: the stream was
    /// closed meanwhile.
    fn forward(
        &mut self,
        tokens: &[u32],
        logits: bool,
        background: bool,
        events: &mpsc::Sender<Result<StreamEvent, GenerateError>>,
        commands: &mut mpsc::Receiver<Command>,
        waiting: &mut Waiting,
    ) -> Result<Option<Vec<f32>>, GenerateError> {
        if !background {
            return Ok(Some(self.model.forward(tokens, logits)?));
        }
        let mut pass = self.model.begin(tokens, logits)?;
        loop {
            let owner_waiting = &self.owner_waiting;
            match self.model.resume(pass, || owner_waiting.load(Ordering::SeqCst))? {
                Step::Done(logits) => return Ok(Some(logits)),
                Step::Paused(paused) => {
                    self.swap_aside();
                    self.run_foreground(commands, waiting);
                    self.swap_aside();
                    if events.is_closed() {
                        return Ok(None);
                    }
                    pass = paused;
                }
            }
        }
    }

    /// Swaps the model's KV cache (and its ids) with the one set aside.
    fn swap_aside(&mut self) {
        let (mut caches, mut ids) = self.aside.take().unwrap_or_else(|| (self.model.empty_caches(), Vec::new()));
        self.model.swap_caches(&mut caches);
        std::mem::swap(&mut self.cached, &mut ids);
        self.aside = Some((caches, ids));
    }

    fn reset_cache(&mut self) {
        self.model.truncate_cache(0);
        self.cached.clear();
    }

    fn prompt_ids(&self, prompt: Prompt) -> Result<Vec<u32>, GenerateError> {
        let ids = match prompt {
            Prompt::Chat(messages) => {
                let text = self.template.render(&messages, true)?;
                self.tokenizer.encode(&text, true, true).map_err(GenerateError::Tokenizer)?
            }
            Prompt::Text(text) => self.tokenizer.encode(&text, true, true).map_err(GenerateError::Tokenizer)?,
            Prompt::Tokens(ids) => ids,
        };
        let vocab = self.tokenizer.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(GenerateError::InvalidParams(format!(
                "token id {bad} is outside the {vocab}-token vocabulary"
            )));
        }
        Ok(ids)
    }

    fn generate(
        &mut self,
        request: GenerateRequest,
        events: &mpsc::Sender<Result<StreamEvent, GenerateError>>,
        queued: Duration,
        commands: &mut mpsc::Receiver<Command>,
        waiting: &mut Waiting,
    ) -> Result<(), GenerateError> {
        let started = Instant::now();
        let mut sampler = Sampler::new(request.params)?;
        let mut prompt = self.prompt_ids(request.prompt)?;
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let prompt_tokens = prompt.len();
        let continued = request.continue_from;
        if let Some(bad) = continued.iter().find(|&&id| id as usize >= self.tokenizer.vocab_size()) {
            return Err(GenerateError::InvalidParams(format!(
                "token id {bad} to continue from is outside the vocabulary"
            )));
        }
        prompt.extend_from_slice(&continued);
        let context_length = self.model.context_length;
        if prompt.len() >= context_length {
            return Err(GenerateError::ContextOverflow { prompt_tokens: prompt.len(), context_length });
        }

        // Reuse the longest cached prefix, but always run at least the last prompt token
        // to get fresh logits.
        let common = if request.cache_prompt {
            self.cached.iter().zip(&prompt).take_while(|(a, b)| a == b).count().min(prompt.len() - 1)
        } else {
            0
        };
        self.model.truncate_cache(common);
        self.cached.truncate(common);
        let mut logits = Vec::new();
        let rest = &prompt[common..];
        for batch in self.model.prompt_batches(rest.len()) {
            if events.is_closed() {
                return Ok(());
            }
            // Only the prompt's last micro-batch needs logits.
            let last = batch.end == rest.len();
            match self.forward(&rest[batch.clone()], last, request.background, events, commands, waiting)? {
                Some(batch_logits) => logits = batch_logits,
                None => return Ok(()),
            }
            self.cached.extend_from_slice(&rest[batch]);
        }
        let prefill = started.elapsed();
        tracing::debug!(
            prompt_tokens = prompt.len(),
            cached_tokens = common,
            prefill_ms = prefill.as_millis() as u64,
            "prefill done"
        );

        let params = sampler.params().clone();
        let mut usage = Usage { prompt_tokens, cached_tokens: common.min(prompt_tokens), completion_tokens: 0 };
        let mut history = prompt;
        let mut text = TextAssembler::new(&params.stop);
        // The text of the tokens continued from was shown already; what they left held
        // back (half a character, a possible stop string) is still held back.
        for &id in &continued {
            let _ = text.push(self.tokenizer.token_bytes(id));
        }
        let mut first_token = None;
        let stop_reason = loop {
            let top_logprobs = top_logprobs(&logits, request.top_logprobs);
            let id = sampler.sample(&mut logits, &history);
            first_token.get_or_insert_with(|| started.elapsed());
            usage.completion_tokens += 1;
            if !request.ignore_eog && self.tokenizer.is_eog(id) {
                let event = TokenEvent { id, text: String::new(), top_logprobs };
                if events.blocking_send(Ok(StreamEvent::Token(event))).is_err() {
                    break StopReason::Cancelled;
                }
                break StopReason::EndOfGeneration;
            }
            let step = text.push(self.tokenizer.token_bytes(id));
            history.push(id);
            let event = TokenEvent { id, text: step.delta, top_logprobs };
            if events.blocking_send(Ok(StreamEvent::Token(event))).is_err() {
                break StopReason::Cancelled;
            }
            if step.stopped {
                break StopReason::StopString;
            }
            if usage.completion_tokens + continued.len() >= params.max_tokens {
                break StopReason::MaxTokens;
            }
            if self.model.cache_len() + 1 >= context_length {
                break StopReason::ContextFull;
            }
            match self.forward(&[id], true, request.background, events, commands, waiting)? {
                Some(next) => logits = next,
                None => break StopReason::Cancelled,
            }
            self.cached.push(id);
        };
        let first_token = first_token.unwrap_or_default();
        let timings = Timings { queued, prefill, first_token, decode: started.elapsed().saturating_sub(first_token) };
        if usage.completion_tokens >= 8 && !timings.decode.is_zero() {
            let speed = (usage.completion_tokens - 1) as f64 / timings.decode.as_secs_f64();
            self.speed.store((speed as f32).to_bits(), Ordering::Relaxed);
        }
        tracing::debug!(
            completion_tokens = usage.completion_tokens,
            decode_ms = timings.decode.as_millis() as u64,
            reason = ?stop_reason,
            "generation done"
        );
        let done = Completion { text: text.finish(), stop_reason, usage, timings };
        let _ = events.blocking_send(Ok(StreamEvent::Done(done)));
        Ok(())
    }
}

/// The `n` most likely tokens with their log-probabilities under a full softmax.
fn top_logprobs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 || logits.is_empty() {
        return Vec::new();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32 + max;
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(ids.len());
    ids.select_nth_unstable_by(n - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    ids.truncate(n);
    ids.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    ids.into_iter().map(|id| (id, logits[id as usize] - log_sum)).collect()
}
