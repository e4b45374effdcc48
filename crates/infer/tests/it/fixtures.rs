//! Tokenizer, chat template and greedy decoding against llama.cpp's own outputs on the
//! same GGUF files (`tests/fixtures/`, recorded with llama-server; see its README).

use kith_infer::{EngineHandle, GenerateRequest, Prompt, StopReason, StreamEvent};
use kith_types::{ChatMessage, Role, SamplingParams};
use serde_json::Value;

use crate::support::{load, model_lock, open, read_fixture};

/// The near-tie tolerance: at a step whose top-1/top-2 log-probability gap in
/// llama.cpp is below this, a second implementation may pick the other token. Tokens and
/// top-2 ranks must be identical up to the first such step.
const NEAR_TIE_NATS: f64 = 0.05;

/// Kith computes llama.cpp's logits bit for bit (the same kernels' arithmetic, see
/// `numerics.rs`); the log-probabilities still differ slightly because llama-server
/// normalises them its own way in f32 (exp, sum, divide, log) over the whole vocabulary
/// (measured: at most 0.0016 nats over all 751 steps). A difference above this bound
/// means different logits.
const LOGPROB_TOLERANCE_NATS: f64 = 0.005;

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().expect("array of ids").iter().map(|v| v.as_u64().expect("id") as u32).collect()
}

fn messages(value: &Value) -> Vec<ChatMessage> {
    value
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            let role = match m["role"].as_str().expect("role") {
                "system" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => panic!("unexpected role {other}"),
            };
            ChatMessage::new(role, m["content"].as_str().expect("content"))
        })
        .collect()
}

fn check_tokenizer(model: &str, fixture: &str) {
    let file = open(model, None);
    let tokenizer = file.tokenizer();
    let fixture = read_fixture(fixture);
    let mut failures = Vec::new();
    let cases = fixture["cases"].as_array().expect("cases");
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let got = tokenizer.encode(text, false, true).expect("encodes");
        if got != ids(&case["ids"]) {
            failures.push(format!("{text:?}\n   want {:?}\n    got {got:?}", ids(&case["ids"])));
        }
        if let Some(literal) = case.get("ids_parse_special_false") {
            let got = tokenizer.encode(text, false, false).expect("encodes");
            if got != ids(literal) {
                failures.push(format!("{text:?} (parse_special=false)\n   want {:?}\n    got {got:?}", ids(literal)));
            }
        }
        // Decoding gives the text back, byte for byte (control tokens decode to nothing,
        // so texts that contain them are left out).
        if case.get("ids_parse_special_false").is_none() {
            let decoded = tokenizer.decode(&ids(&case["ids"]));
            if decoded != text {
                failures.push(format!("{text:?} decodes to {decoded:?}"));
            }
        }
    }
    let example = &fixture["add_special_true_example"];
    let got = tokenizer.encode(example["text"].as_str().expect("text"), true, true).expect("encodes");
    assert_eq!(got, ids(&example["ids"]), "add_special=true example");
    let mut eog = ids(&fixture["eos_ids"]);
    eog.sort_unstable();
    assert_eq!(tokenizer.eog_ids(), eog, "end-of-generation ids");
    assert_eq!(tokenizer.bos_id(), Some(fixture["bos_id"].as_u64().expect("bos") as u32));
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from llama.cpp:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// A `tokenizer.json` beside the model is used instead of the GGUF's vocabulary: the
/// SmolLM2 tokenizer, exported and loaded back that way, gives the same ids and text.
#[test]
fn tokenizer_json_beside_the_model_is_used() {
    let exported = open("smollm2-135m", None).tokenizer().to_tokenizer_json().expect("exports");
    let dir = tempfile::tempdir().expect("tempdir");
    let json_path = dir.path().join("tokenizer.json");
    std::fs::write(&json_path, exported).expect("write tokenizer.json");
    let mut options = kith_infer::LoadOptions::default();
    options.tokenizer_json = Some(json_path.clone());
    let file = kith_infer::ModelFile::open(&crate::support::model_path("smollm2-135m"), &options).expect("opens");
    let fixture = read_fixture("tokenizer-smollm2.json");
    for case in fixture["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let got = file.tokenizer().encode(text, false, true).expect("encodes");
        assert_eq!(got, ids(&case["ids"]), "{text:?}");
        if case.get("ids_parse_special_false").is_none() {
            assert_eq!(file.tokenizer().decode(&got), text);
        }
    }
    // A broken tokenizer.json is a clear load error.
    std::fs::write(&json_path, "{ not json").expect("write");
    let err =
        kith_infer::ModelFile::open(&crate::support::model_path("smollm2-135m"), &options).err().expect("refused");
    assert!(matches!(err, kith_infer::LoadError::Tokenizer(_)), "{err}");
}

#[test]
fn smollm2_tokenizer_matches_llama_cpp() {
    check_tokenizer("smollm2-135m", "tokenizer-smollm2.json");
}

#[test]
fn gemma3_tokenizer_matches_llama_cpp() {
    check_tokenizer("gemma3-270m", "tokenizer-gemma3.json");
}

fn check_templates(model: &str, template: Option<&str>, fixture: &str) {
    let file = open(model, template);
    let fixture = read_fixture(fixture);
    for case in fixture["cases"].as_array().expect("cases") {
        let rendered = file
            .chat_template()
            .render(&messages(&case["messages"]), case["add_generation_prompt"].as_bool().expect("flag"))
            .expect("renders");
        assert_eq!(rendered, case["rendered"].as_str().expect("rendered"), "messages: {}", case["messages"]);
    }
}

#[test]
fn smollm2_own_template_matches_llama_cpp() {
    check_templates("smollm2-135m", None, "chat-template-smollm2.json");
}

#[test]
fn gemma3_chatml_fallback_matches_llama_cpp() {
    check_templates("gemma3-270m", None, "chat-template-gemma3.json");
}

#[test]
fn gemma3_builtin_gemma_template_matches_llama_cpp() {
    check_templates("gemma3-270m", Some("gemma"), "chat-template-gemma3-gemma-format.json");
}

fn check_greedy(model: &str, template: Option<&str>, fixture: &str) {
    let _turn = model_lock();
    let loaded = load(model, template);
    let data = read_fixture(fixture);
    let file = open(model, template);
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let engine = EngineHandle::spawn(loaded).expect("engine thread");
    let mut lines = Vec::new();
    let mut worst = 0f64;
    let mut failed = false;
    for (case_idx, case) in data["cases"].as_array().expect("cases").iter().enumerate() {
        // The prompt Kith builds is the one llama.cpp was given.
        let rendered = file.chat_template().render(&messages(&case["messages"]), true).expect("renders");
        assert_eq!(rendered, case["rendered_prompt"].as_str().expect("prompt"), "case {case_idx}: rendered prompt");
        let prompt_ids = file.tokenizer().encode(&rendered, true, true).expect("encodes");
        assert_eq!(prompt_ids, ids(&case["prompt_ids"]), "case {case_idx}: prompt ids");

        let want = ids(&case["greedy_ids"]);
        let want_top2: Vec<Vec<u32>> = case["top2_ids"].as_array().expect("top2").iter().map(ids).collect();
        let want_logprobs: Vec<Vec<f64>> = case["top2_logprobs"]
            .as_array()
            .expect("logprobs")
            .iter()
            .map(|pair| pair.as_array().expect("pair").iter().map(|v| v.as_f64().expect("f64")).collect())
            .collect();
        let mut params = SamplingParams::greedy();
        params.max_tokens = want.len();
        let mut request = GenerateRequest::new(Prompt::Chat(messages(&case["messages"])), params);
        request.top_logprobs = 8;
        // As the fixtures were made: every prompt computed from scratch (`cache_prompt: false`).
        request.cache_prompt = false;
        let (got, got_top2, stop) = runtime.block_on(async {
            let mut stream = engine.generate(request).await.expect("queued");
            let mut got = Vec::new();
            let mut got_top2 = Vec::new();
            let mut stop = None;
            while let Some(event) = stream.next().await {
                match event.expect("generates") {
                    StreamEvent::Token(token) => {
                        got.push(token.id);
                        got_top2.push(token.top_logprobs.clone());
                    }
                    StreamEvent::Done(done) => stop = Some(done.stop_reason),
                    _ => {}
                }
            }
            (got, got_top2, stop)
        });
        // Up to llama.cpp's first near-tie: the same token, the same second choice and the
        // same log-probabilities. Past it the comparison goes on to report how far the two
        // agree; a parting there is allowed, a difference in log-probabilities is not.
        let strict_until = want_logprobs.iter().position(|lp| lp[0] - lp[1] < NEAR_TIE_NATS).unwrap_or(want.len());
        let mut matched = 0;
        let mut failure = None;
        for step in 0..want.len().min(got.len()) {
            let ours = &got_top2[step];
            let strict = step < strict_until;
            if got[step] != want[step] {
                if strict {
                    failure = Some(format!("step {step}: token {}, llama.cpp {}", got[step], want[step]));
                }
                break;
            }
            // The chosen token at every compared step; the second choice before the first
            // near-tie.
            let ranks = if strict { 2 } else { 1 };
            for rank in 0..ranks {
                let diff = (f64::from(ours[rank].1) - want_logprobs[step][rank]).abs();
                if rank == 0 {
                    worst = worst.max(diff);
                }
                if ours[rank].0 != want_top2[step][rank] || diff > LOGPROB_TOLERANCE_NATS {
                    failure = Some(format!(
                        "step {step}: top-2 ours {:?}, llama.cpp {:?} {:?}",
                        &ours[..2],
                        want_top2[step],
                        want_logprobs[step]
                    ));
                }
            }
            if failure.is_some() {
                break;
            }
            matched += 1;
        }
        if failure.is_none() && matched == want.len() {
            // Agreed to the end: the stop must agree too.
            let want_stop =
                if case["stop_type"] == "eos" { StopReason::EndOfGeneration } else { StopReason::MaxTokens };
            if stop != Some(want_stop.clone()) {
                failure = Some(format!("stop reason {stop:?}, llama.cpp {want_stop:?}"));
            }
        }
        if matched < strict_until.min(want.len()) && failure.is_none() {
            failure = Some(format!("only {matched} tokens before llama.cpp's first near-tie at step {strict_until}"));
        }
        lines.push(format!(
            "case {case_idx}: {matched:>2}/{} identical; first llama.cpp near-tie (<{NEAR_TIE_NATS}) at step {}{}",
            want.len(),
            if strict_until < want.len() { strict_until.to_string() } else { "-".into() },
            failure.as_deref().map(|f| format!("  FAILED: {f}")).unwrap_or_default()
        ));
        failed |= failure.is_some();
    }
    eprintln!("{fixture}: largest |Δ logprob| of the chosen token {worst:.4} nats\n  {}", lines.join("\n  "));
    assert!(!failed, "{fixture} differs from llama.cpp:\n  {}", lines.join("\n  "));
    runtime.block_on(engine.shutdown());
}

#[test]
fn smollm2_greedy_matches_llama_cpp() {
    check_greedy("smollm2-135m", None, "greedy-smollm2.json");
}

#[test]
fn gemma3_greedy_matches_llama_cpp() {
    check_greedy("gemma3-270m", None, "greedy-gemma3.json");
}

#[test]
fn gemma3_greedy_with_gemma_template_matches_llama_cpp() {
    check_greedy("gemma3-270m", Some("gemma"), "greedy-gemma3-gemma-format.json");
}
