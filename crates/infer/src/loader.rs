//! Opening a model file: header, tokenizer and template first (cheap), weights on demand.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;

use crate::error::LoadError;
use crate::gguf::GgufFile;
use crate::model::{Config, Model};
use crate::template::{CHATML_TEMPLATE, ChatTemplate, TemplateSource};
use crate::tokenizer::Tokenizer;

/// Default cap on the context window, so a 128k-token model does not reserve memory
/// for contexts nobody uses; raise it with [`LoadOptions::context_length`].
pub const DEFAULT_CONTEXT_CAP: usize = 8192;

/// Where the forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DeviceKind {
    /// The CPU (always available).
    #[default]
    Cpu,
    /// The first CUDA GPU (needs the `cuda` feature).
    Cuda,
    /// The Apple GPU (needs the `metal` feature).
    Metal,
}

impl FromStr for DeviceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            "metal" => Ok(Self::Metal),
            other => Err(format!("unknown device {other:?} (expected cpu, cuda or metal)")),
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Metal => "metal",
        })
    }
}

impl DeviceKind {
    fn device(self) -> Result<Device, LoadError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda if cfg!(feature = "cuda") => {
                Device::new_cuda(0).map_err(|err| LoadError::Device(format!("cuda: {err}")))
            }
            Self::Metal if cfg!(feature = "metal") => {
                Device::new_metal(0).map_err(|err| LoadError::Device(format!("metal: {err}")))
            }
            Self::Cuda => {
                Err(LoadError::Device("cuda is not compiled into this build; rebuild with `--features cuda`".into()))
            }
            Self::Metal => {
                Err(LoadError::Device("metal is not compiled into this build; rebuild with `--features metal`".into()))
            }
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct LoadOptions {
    /// Compute device.
    pub device: DeviceKind,
    /// Context window to allocate for; defaults to the model's, capped at [`DEFAULT_CONTEXT_CAP`].
    pub context_length: Option<usize>,
    /// A Hugging Face `tokenizer.json` to use instead of the GGUF's vocabulary.
    pub tokenizer_json: Option<PathBuf>,
    /// A built-in chat template (`chatml`, `gemma`) to use instead of the model's own.
    pub template: Option<String>,
}

/// Facts about a loaded model, for logs, `kith models`, and API responses.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ModelInfo {
    /// The GGUF file.
    pub path: PathBuf,
    /// `general.architecture`.
    pub architecture: String,
    /// `general.name`, if present.
    pub name: Option<String>,
    /// Total parameters (elements of all tensors).
    pub n_params: u64,
    /// Context window allocated for.
    pub context_length: usize,
    /// Context window the model was trained for.
    pub train_context_length: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Where it runs.
    pub device: DeviceKind,
    /// Where the chat template came from.
    pub template_source: TemplateSource,
    /// Time to open the file: header, tokenizer and chat template.
    pub open_time: Duration,
    /// Time to read the weights.
    pub load_time: Duration,
}

/// A model file with its header parsed, tokenizer and template built, weights not yet read.
pub struct ModelFile {
    gguf: GgufFile,
    config: Config,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    options: LoadOptions,
    open_time: Duration,
}

impl ModelFile {
    /// Parses and validates the header of `path`, builds its tokenizer and chat template.
    pub fn open(path: &Path, options: &LoadOptions) -> Result<Self, LoadError> {
        let started = Instant::now();
        let mut gguf = GgufFile::open(path)?;
        let mut tokenizer = Tokenizer::from_gguf(&gguf)?;
        if let Some(json) = &options.tokenizer_json {
            tokenizer = Tokenizer::from_tokenizer_json(json, &tokenizer)?;
        }
        let config = Config::from_gguf(&gguf, tokenizer.vocab_size())?;
        // Templates need the spelling of BOS/EOS, which control tokens do not decode to.
        let vocab = gguf.array("tokenizer.ggml.tokens")?;
        let token_name = |id: Option<u32>| -> String {
            id.and_then(|id| vocab.and_then(|v| v.get(id as usize)))
                .and_then(|value| value.to_string().ok().cloned())
                .unwrap_or_default()
        };
        let bos = token_name(tokenizer.bos_id());
        let eos = token_name(gguf.opt_u64("tokenizer.ggml.eos_token_id")?.map(|id| id as u32));
        let strip_bos = tokenizer.adds_bos();
        let template = match (&options.template, gguf.opt_string("tokenizer.chat_template")) {
            (Some(name), _) => ChatTemplate::builtin(name, &bos, &eos, strip_bos)?,
            (None, Some(text)) => ChatTemplate::new(text, TemplateSource::Model, &bos, &eos, strip_bos)?,
            (None, None) => ChatTemplate::new(CHATML_TEMPLATE, TemplateSource::ChatMlFallback, &bos, &eos, strip_bos)?,
        };
        gguf.drop_arrays();
        Ok(Self { gguf, config, tokenizer, template, options: options.clone(), open_time: started.elapsed() })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template.
    pub fn chat_template(&self) -> &ChatTemplate {
        &self.template
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> &str {
        self.gguf.opt_string("general.architecture").unwrap_or("unknown")
    }

    /// Reads the weights onto the chosen device.
    pub fn load(mut self) -> Result<LoadedModel, LoadError> {
        let started = Instant::now();
        let device_kind = self.options.device;
        let device = device_kind.device()?;
        let context_length =
            self.options.context_length.unwrap_or_else(|| self.config.train_context.min(DEFAULT_CONTEXT_CAP)).max(16);
        let n_params = self.n_params();
        let architecture = self.architecture().to_owned();
        let name = self.gguf.opt_string("general.name").map(str::to_owned);
        let config = self.config.clone();
        let train_context_length = config.train_context;
        let model = Model::load(&mut self.gguf, config, context_length, &device)?;
        let info = ModelInfo {
            path: self.gguf.path.clone(),
            architecture,
            name,
            n_params,
            context_length,
            train_context_length,
            vocab_size: self.tokenizer.vocab_size(),
            device: device_kind,
            template_source: self.template.source(),
            open_time: self.open_time,
            load_time: started.elapsed(),
        };
        tracing::info!(
            model = %info.path.display(),
            arch = %info.architecture,
            n_params = info.n_params,
            context = info.context_length,
            device = %info.device,
            elapsed_ms = info.load_time.as_millis() as u64,
            "model loaded"
        );
        Ok(LoadedModel {
            model,
            tokenizer: Arc::new(self.tokenizer),
            template: Arc::new(self.template),
            info: Arc::new(info),
        })
    }

    fn n_params(&self) -> u64 {
        self.gguf.total_elements()
    }
}

/// A model in memory, ready to be handed to an engine thread.
pub struct LoadedModel {
    pub(crate) model: Model,
    pub(crate) tokenizer: Arc<Tokenizer>,
    pub(crate) template: Arc<ChatTemplate>,
    pub(crate) info: Arc<ModelInfo>,
}

impl LoadedModel {
    /// Facts about the model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Opens and loads `path` in one step.
    pub fn load(path: &Path, options: &LoadOptions) -> Result<Self, LoadError> {
        ModelFile::open(path, options)?.load()
    }
}
