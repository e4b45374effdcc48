//! Plain data shared by every Kith crate: chat messages, roles and sampling parameters.
//!
//! Nothing here does IO or async work. Types that cross a boundary (HTTP, mesh wire,
//! desktop) derive `serde`; everything else stays in the crates that own it.
//!
//! ```
//! use kith_types::{ChatMessage, SamplingParams};
//! let turn = vec![ChatMessage::system("Be brief."), ChatMessage::user("Hi")];
//! let params = SamplingParams::greedy();
//! assert_eq!(turn.len(), 2);
//! assert!(params.is_greedy());
//! ```
#![deny(missing_docs, unreachable_pub)]

use serde::{Deserialize, Serialize};

/// Who wrote a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the whole conversation.
    System,
    /// The person talking to the assistant.
    User,
    /// The model's own earlier replies.
    Assistant,
}

impl Role {
    /// The lowercase name chat templates expect (`system`, `user`, `assistant`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who wrote it.
    pub role: Role,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and text.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into() }
    }
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }
    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// How the next token is chosen from the model's logits.
///
/// The filters apply in llama.cpp's order: repetition penalty, top-k, top-p, min-p,
/// then temperature. A temperature of zero (or `top_k == 1`) means greedy decoding,
/// which is deterministic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct SamplingParams {
    /// Softmax temperature; `0.0` is greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; `0` disables the filter.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability adds up to `p`; `1.0` disables it.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the best token's; `0.0` disables it.
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of recently seen tokens by this; `1.0` disables it.
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    pub repeat_last_n: usize,
    /// Seed for the random choice; the same seed and inputs give the same output.
    pub seed: u64,
    /// Stop after this many generated tokens.
    pub max_tokens: usize,
    /// Stop when the output contains one of these strings (the stop string is not emitted).
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
            max_tokens: 512,
            stop: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: 1, top_p: 1.0, min_p: 0.0, ..Self::default() }
    }

    /// Whether this configuration always picks the most likely token.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }
}

/// Where a conversation's turns may run: the per-conversation privacy mode.
///
/// `FriendsAllowed` permits offloading to a trusted friend's node, which still needs a
/// friend the user allowed offloading to (the mesh's trust list); `LocalOnly` keeps every
/// turn on this machine, and a turn that cannot run here fails rather than leave it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Privacy {
    /// Only this machine.
    LocalOnly,
    /// This machine or a trusted friend's node.
    #[default]
    FriendsAllowed,
}

impl Privacy {
    /// `local-only` or `friends-allowed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Privacy::LocalOnly => "local-only",
            Privacy::FriendsAllowed => "friends-allowed",
        }
    }
}

impl std::fmt::Display for Privacy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Privacy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local-only" | "local" => Ok(Privacy::LocalOnly),
            "friends-allowed" | "friends" => Ok(Privacy::FriendsAllowed),
            other => Err(format!("unknown privacy mode {other:?} (local-only or friends-allowed)")),
        }
    }
}
