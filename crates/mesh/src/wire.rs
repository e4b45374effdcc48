//! Frames on a mesh stream: a 4-byte big-endian length, then that many bytes of JSON.
//!
//! The length is checked against [`MAX_FRAME`] before anything is allocated, and a
//! frame that does not parse as the expected message is an error, never a panic: the
//! fuzz target in `fuzz/` feeds [`decode`] arbitrary bytes.

use futures_util::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use kith_types::{ChatMessage, SamplingParams};
use serde::{Deserialize, Serialize};

/// The largest frame either side accepts (a long conversation fits many times over).
pub const MAX_FRAME: usize = 1 << 20;
/// The version of the messages below; the protocol name carries it too.
pub const VERSION: u32 = 1;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The announced length is over [`MAX_FRAME`].
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The bytes are not the expected message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended or failed.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
}

/// What a requester sends on `/kith/infer/1`: one request, then optionally a cancel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToServer {
    /// Generate a chat answer.
    Infer(InferRequest),
    /// Stop generating (closing the stream does the same).
    Cancel,
}

/// One offloaded generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferRequest {
    /// Message version ([`VERSION`]).
    pub version: u32,
    /// The requester's id for it (for logs on both sides; never the content).
    pub request_id: String,
    /// The model, by catalog name.
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Sampling and stopping; `max_tokens` counts `continue_ids` too.
    pub params: SamplingParams,
    /// Tokens of the answer generated elsewhere already: the server continues after them.
    #[serde(default)]
    pub continue_ids: Vec<u32>,
}

/// What a server sends back: tokens, then exactly one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToClient {
    /// One generated token and the text it made visible.
    Token {
        /// The token id (same model, same tokenizer, so it can be continued from).
        id: u32,
        /// Visible text.
        text: String,
    },
    /// The generation ended.
    Done(Done),
    /// The request was refused or failed.
    Error(WireError),
}

/// The end of an offloaded generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Done {
    /// Text still held back at the end.
    pub text: String,
    /// `stop`, `length`, `context_full` or `cancelled`.
    pub stop_reason: String,
    /// Prompt tokens the server processed.
    pub prompt_tokens: u64,
    /// Tokens generated, `continue_ids` not included.
    pub completion_tokens: u64,
    /// Milliseconds from receiving the request to the first token.
    pub first_token_ms: f64,
    /// Milliseconds from the first to the last token.
    pub decode_ms: f64,
}

/// A refusal or failure, with a stable code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireError {
    /// `quota`, `busy`, `model`, `version`, `bad_request`, `not_trusted`, `failed`.
    pub code: String,
    /// For people.
    pub message: String,
}

impl WireError {
    /// An error with this code and message.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self { code: code.to_owned(), message: message.into() }
    }
}

/// A node's offer to its friends, on `/kith/status/1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Advert {
    /// Message version.
    pub version: u32,
    /// The node's name.
    pub name: String,
    /// The models this friend may use there.
    pub models: Vec<AdvertModel>,
}

/// One model in an [`Advert`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdvertModel {
    /// Catalog name.
    pub name: String,
    /// `cpu`, `cuda` or `metal`.
    pub device: String,
    /// Measured decode speed (0 until measured).
    pub tokens_per_s: f64,
    /// Requests running or waiting.
    pub queued: u32,
    /// Context window in tokens.
    pub context_length: u32,
}

/// Pairing, on `/kith/pair/1`: the inviter's challenge, the accepter's proof, the answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Pairing {
    /// Inviter → accepter: a fresh nonce to prove the secret against.
    Challenge {
        /// 32 random bytes, hex.
        nonce: String,
    },
    /// Accepter → inviter.
    Proof {
        /// Which invite (hex of its public id).
        invite: String,
        /// HMAC-SHA256 over the context, hex.
        proof: String,
        /// The accepter's node name.
        name: String,
    },
    /// Inviter → accepter: paired; the inviter's proof that it holds the secret too.
    Welcome {
        /// The inviter's node name.
        name: String,
        /// HMAC-SHA256 over the inviter's context, hex.
        proof: String,
    },
    /// Inviter → accepter: refused.
    Refused(WireError),
}

/// Parses one frame's payload.
pub fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(payload).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Reads one frame; `Ok(None)` when the stream ended cleanly before it.
pub async fn read<T: serde::de::DeserializeOwned>(io: &mut (impl AsyncRead + Unpin)) -> Result<Option<T>, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        let n = io.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into())) };
        }
        got += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await?;
    decode(&payload).map(Some)
}

/// Writes one frame and flushes it.
pub async fn write<T: Serialize>(io: &mut (impl AsyncWrite + Unpin), message: &T) -> Result<(), FrameError> {
    let payload = serde_json::to_vec(message).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if payload.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(payload.len()));
    }
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge(payload.len()))?;
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&payload);
    io.write_all(&frame).await?;
    io.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::io::Cursor;

    fn block<F: std::future::Future>(f: F) -> F::Output {
        futures_util::FutureExt::now_or_never(f).expect("cursor futures are ready")
    }

    #[test]
    fn round_trip() {
        let request = ToServer::Infer(InferRequest {
            version: VERSION,
            request_id: "r1".into(),
            model: "gemma3-270m".into(),
            messages: vec![ChatMessage::user("hi")],
            params: SamplingParams::greedy(),
            continue_ids: vec![1, 2],
        });
        let mut buf = Cursor::new(Vec::new());
        block(write(&mut buf, &request)).expect("must succeed");
        block(write(&mut buf, &ToServer::Cancel)).expect("must succeed");
        buf.set_position(0);
        assert_eq!(block(read::<ToServer>(&mut buf)).expect("must succeed"), Some(request));
        assert_eq!(block(read::<ToServer>(&mut buf)).expect("must succeed"), Some(ToServer::Cancel));
        assert_eq!(block(read::<ToServer>(&mut buf)).expect("must succeed"), None);
    }

    #[test]
    fn oversized_length_is_refused_before_reading() {
        let mut bytes = u32::MAX.to_be_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let err = block(read::<ToServer>(&mut Cursor::new(bytes))).expect_err("must fail");
        assert!(matches!(err, FrameError::TooLarge(n) if n == u32::MAX as usize), "{err}");
    }

    #[test]
    fn truncated_and_malformed_frames_are_errors() {
        let err = block(read::<ToServer>(&mut Cursor::new(vec![0, 0]))).expect_err("must fail");
        assert!(matches!(err, FrameError::Io(_)), "{err}");
        let mut bytes = 10u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert!(matches!(block(read::<ToServer>(&mut Cursor::new(bytes))), Err(FrameError::Io(_))));
        for junk in [&b"{\"type\":\"infer\"}"[..], b"[1,2]", b"\xff\xfe", b"{\"type\":\"nope\"}"] {
            let mut bytes = (junk.len() as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(junk);
            let err = block(read::<ToServer>(&mut Cursor::new(bytes))).expect_err("must fail");
            assert!(matches!(err, FrameError::Malformed(_)), "{err}");
        }
    }
}
