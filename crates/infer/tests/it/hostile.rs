//! Bad model files: each gets a precise error, never a panic or a huge allocation.

use std::io::Write;
use std::path::Path;

use kith_infer::{LoadError, LoadOptions, LoadedModel, ModelFile};

use crate::tiny::Tiny;

fn open(path: &Path) -> Result<ModelFile, LoadError> {
    ModelFile::open(path, &LoadOptions::default())
}

fn tiny_bytes(arch: &'static str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tiny.gguf");
    Tiny::new(arch).write(&path);
    std::fs::read(&path).expect("read tiny")
}

fn write(dir: &Path, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join("bad.gguf");
    std::fs::File::create(&path).and_then(|mut f| f.write_all(bytes)).expect("write");
    path
}

/// A GGUF header with the given metadata and tensor-info bytes, written by hand so the
/// tests can say things a real writer never would.
fn header(n_tensors: u64, n_kv: u64, body: &[u8]) -> Vec<u8> {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(n_tensors.to_le_bytes());
    bytes.extend(n_kv.to_le_bytes());
    bytes.extend(body);
    bytes
}

fn gguf_string(s: &str) -> Vec<u8> {
    let mut bytes = (s.len() as u64).to_le_bytes().to_vec();
    bytes.extend(s.as_bytes());
    bytes
}

fn kv_string(key: &str, value: &str) -> Vec<u8> {
    let mut bytes = gguf_string(key);
    bytes.extend(8u32.to_le_bytes());
    bytes.extend(gguf_string(value));
    bytes
}

#[test]
fn truncated_tensor_data_is_reported_with_sizes() {
    let bytes = tiny_bytes("llama");
    let dir = tempfile::tempdir().expect("tempdir");
    let cut = bytes.len() * 3 / 4;
    let path = write(dir.path(), &bytes[..cut]);
    match open(&path) {
        Err(LoadError::Truncated { expected, actual, .. }) => {
            assert_eq!(actual, cut as u64);
            assert!(expected > actual);
        }
        other => panic!("expected Truncated, got {other:?}", other = other.err()),
    }
}

#[test]
fn truncated_header_is_malformed() {
    let bytes = tiny_bytes("llama");
    let dir = tempfile::tempdir().expect("tempdir");
    for cut in [5, 24, 100, 2000] {
        let path = write(dir.path(), &bytes[..cut]);
        let err = open(&path).err().expect("refused");
        assert!(matches!(err, LoadError::Malformed { .. } | LoadError::Truncated { .. }), "cut at {cut}: {err}");
    }
}

#[test]
fn wrong_magic_and_empty_files_are_not_gguf() {
    let dir = tempfile::tempdir().expect("tempdir");
    for bytes in [&b"GGML\x03\x00\x00\x00"[..], b"", b"<html>not a model</html>"] {
        let path = write(dir.path(), bytes);
        assert!(matches!(open(&path), Err(LoadError::NotGguf { .. })), "{bytes:?}");
    }
}

#[test]
fn missing_file_is_an_io_error() {
    assert!(matches!(open(Path::new("/nonexistent/model.gguf")), Err(LoadError::Io { .. })));
}

#[test]
fn absurd_tensor_shape_is_refused_before_allocating() {
    let mut body = kv_string("general.architecture", "llama");
    body.extend(gguf_string("token_embd.weight"));
    body.extend(2u32.to_le_bytes()); // dimensions
    body.extend((1u64 << 40).to_le_bytes());
    body.extend((1u64 << 40).to_le_bytes());
    body.extend(0u32.to_le_bytes()); // F32
    body.extend(0u64.to_le_bytes()); // offset
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), &header(1, 1, &body));
    let err = open(&path).err().expect("refused");
    assert!(matches!(err, LoadError::Malformed { .. }), "{err}");
    assert!(err.to_string().contains("token_embd.weight"), "{err}");
}

#[test]
fn tensor_beyond_end_of_file_is_truncation() {
    let mut body = kv_string("general.architecture", "llama");
    body.extend(gguf_string("token_embd.weight"));
    body.extend(1u32.to_le_bytes());
    body.extend(1024u64.to_le_bytes());
    body.extend(0u32.to_le_bytes());
    body.extend((1u64 << 30).to_le_bytes()); // far past the end
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), &header(1, 1, &body));
    assert!(matches!(open(&path), Err(LoadError::Truncated { .. })));
}

#[test]
fn huge_counts_and_lengths_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 2^60 tensors in a tiny file.
    let path = write(dir.path(), &header(1 << 60, 0, &[]));
    assert!(matches!(open(&path), Err(LoadError::Malformed { .. })));
    // A metadata string claiming 2^50 bytes.
    let mut body = (1u64 << 50).to_le_bytes().to_vec();
    body.extend(b"key");
    let path = write(dir.path(), &header(0, 1, &body));
    assert!(matches!(open(&path), Err(LoadError::Malformed { .. })));
    // An array claiming 2^29 u32 values.
    let mut body = gguf_string("tokenizer.ggml.tokens");
    body.extend(9u32.to_le_bytes()); // array
    body.extend(4u32.to_le_bytes()); // of u32
    body.extend((1u64 << 29).to_le_bytes());
    let path = write(dir.path(), &header(0, 1, &body));
    assert!(matches!(open(&path), Err(LoadError::Malformed { .. })));
}

#[test]
fn unknown_architecture_is_named() {
    let mut bytes = tiny_bytes("llama");
    // Same length, other name: "llama" → "mamba" in the architecture value only.
    let needle = b"\x05\x00\x00\x00\x00\x00\x00\x00llama";
    let at = bytes.windows(needle.len()).position(|w| w == needle).expect("architecture value");
    bytes[at + 8..at + 13].copy_from_slice(b"mamba");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), &bytes);
    match open(&path) {
        Err(LoadError::UnsupportedArchitecture { architecture, .. }) => assert_eq!(architecture, "mamba"),
        other => panic!("expected UnsupportedArchitecture, got {:?}", other.err()),
    }
}

#[test]
fn corrupted_metadata_value_gives_a_clear_error() {
    let mut bytes = tiny_bytes("llama");
    // The block count becomes 2^31: more layers than any model, refused before loading.
    let key = b"llama.block_count";
    let at = bytes.windows(key.len()).position(|w| w == key).expect("block_count key") + key.len();
    bytes[at + 4..at + 8].copy_from_slice(&(1u32 << 31).to_le_bytes());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), &bytes);
    let err = open(&path).err().expect("refused");
    assert!(err.to_string().contains("block_count"), "{err}");
}

#[test]
fn tensor_with_wrong_shape_is_refused_at_load() {
    let mut bytes = tiny_bytes("llama");
    // Claim a feed-forward width the tensors do not have.
    let key = b"llama.feed_forward_length";
    let at = bytes.windows(key.len()).position(|w| w == key).expect("ff key") + key.len();
    bytes[at + 4..at + 8].copy_from_slice(&256u32.to_le_bytes());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), &bytes);
    let err = LoadedModel::load(&path, &LoadOptions::default()).err().expect("refused");
    assert!(matches!(err, LoadError::Malformed { .. }), "{err}");
    assert!(err.to_string().contains("shape"), "{err}");
}
