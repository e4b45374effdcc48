//! all-MiniLM-L6-v2 through candle's BERT against sentence-transformers' own vectors
//! (`tests/fixtures/minilm-reference.json`, written by `minilm_reference.py`).

use kith_infer::{EmbedError, Embedder};

use crate::support::{model_dir, read_fixture};

fn embedder() -> Embedder {
    Embedder::load(&model_dir("minilm-l6")).expect("MiniLM loads")
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn vectors_match_sentence_transformers() {
    let fixture = read_fixture("minilm-reference.json");
    let cases = fixture["cases"].as_array().expect("cases");
    let embedder = embedder();
    assert_eq!(embedder.dim(), 384);
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().expect("text")).collect();
    // All at once: batching and padding must not change any vector.
    let vectors = embedder.embed(&texts).expect("embeds");
    assert_eq!(vectors.len(), cases.len());
    for ((case, text), vector) in cases.iter().zip(&texts).zip(&vectors) {
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).expect("ids");
        assert_eq!(embedder.token_ids(text).expect("tokenizes"), ids, "token ids of {text:?}");
        let expected: Vec<f32> = serde_json::from_value(case["vector"].clone()).expect("vector");
        assert_eq!(vector.len(), expected.len());
        let worst = vector.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "{text:?}: largest difference from sentence-transformers {worst}");
        let norm = dot(vector, vector).sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{text:?} is not unit length ({norm})");
    }
    // Alone, a text gets the same vector as in the padded batch.
    let alone = embedder.embed_one(texts[0]).expect("embeds");
    let worst = alone.iter().zip(&vectors[0]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-6, "batching changed a vector by {worst}");
}

#[test]
fn closest_sentence_is_the_related_one() {
    let embedder = embedder();
    let query = embedder.embed_one("What is my daughter's name?").expect("embeds");
    let candidates = ["I prefer metric units.", "My daughter is called Ada.", "The train leaves at seven."];
    let vectors = embedder.embed(&candidates).expect("embeds");
    let best = (0..candidates.len())
        .max_by(|&a, &b| dot(&query, &vectors[a]).total_cmp(&dot(&query, &vectors[b])))
        .expect("candidates");
    assert_eq!(candidates[best], "My daughter is called Ada.");
}

#[test]
fn broken_model_directories_are_refused_clearly() {
    let source = model_dir("minilm-l6");
    let dir = tempfile::tempdir().expect("tempdir");

    // Nothing there.
    let err = Embedder::load(dir.path()).expect_err("empty dir");
    assert!(matches!(err, EmbedError::Io { .. }), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");

    // A config that is not BERT's.
    std::fs::write(dir.path().join("config.json"), br#"{"hidden_size": "big"}"#).expect("write");
    let err = Embedder::load(dir.path()).expect_err("bad config");
    assert!(matches!(err, EmbedError::Config { .. }), "{err}");

    // Truncated weights.
    std::fs::copy(source.join("config.json"), dir.path().join("config.json")).expect("copy");
    std::fs::copy(source.join("tokenizer.json"), dir.path().join("tokenizer.json")).expect("copy");
    let weights = std::fs::read(source.join("model.safetensors")).expect("read");
    std::fs::write(dir.path().join("model.safetensors"), &weights[..weights.len() / 2]).expect("write");
    let err = Embedder::load(dir.path()).expect_err("truncated weights");
    assert!(matches!(err, EmbedError::Weights(_)), "{err}");

    // A hostile header claiming a huge tensor.
    let header =
        br#"{"embeddings.word_embeddings.weight":{"dtype":"F32","shape":[4000000000,384],"data_offsets":[0,16]}}"#;
    let mut hostile = (header.len() as u64).to_le_bytes().to_vec();
    hostile.extend_from_slice(header);
    hostile.extend_from_slice(&[0u8; 16]);
    std::fs::write(dir.path().join("model.safetensors"), hostile).expect("write");
    let err = Embedder::load(dir.path()).expect_err("hostile header");
    assert!(matches!(err, EmbedError::Weights(_)), "{err}");

    // A tokenizer that is not JSON.
    std::fs::write(dir.path().join("model.safetensors"), &weights).expect("write");
    std::fs::write(dir.path().join("tokenizer.json"), b"not json").expect("write");
    let err = Embedder::load(dir.path()).expect_err("bad tokenizer");
    assert!(matches!(err, EmbedError::Tokenizer(_)), "{err}");
}
