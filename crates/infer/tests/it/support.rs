//! Finding the real models and the llama.cpp reference fixtures.

use std::path::PathBuf;
use std::sync::Mutex;

use kith_infer::{LoadOptions, LoadedModel, ModelFile};

/// The pulled GGUF of a catalog model; panics with the pull command when it is missing.
pub(crate) fn model_path(name: &str) -> PathBuf {
    let catalog = kith_models::Catalog::builtin().expect("built-in catalog parses");
    let store = kith_models::Store::from_env().expect("model store");
    let entry = catalog.get(name).expect("model in catalog");
    match store.installed_path(entry) {
        Some(path) => path,
        None => panic!("model {name} is not pulled; run `cargo run -p kith-cli -- models pull {name}` first"),
    }
}

/// Opens a catalog model's header, tokenizer and template (no weights).
pub(crate) fn open(name: &str, template: Option<&str>) -> ModelFile {
    let mut options = LoadOptions::default();
    options.template = template.map(str::to_owned);
    ModelFile::open(&model_path(name), &options).expect("model opens")
}

/// Loads a catalog model's weights.
pub(crate) fn load(name: &str, template: Option<&str>) -> LoadedModel {
    open(name, template).load().expect("model loads")
}

/// Reference outputs recorded with llama.cpp (see `tests/fixtures/README.md`).
pub(crate) fn read_fixture(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// Tests that run a model take turns: the machine has two cores, and two models
/// decoding at once would only make each slower.
pub(crate) fn model_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A panicking test poisons the lock; the next test can still run.
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The directory of a pulled multi-file catalog model (e.g. `minilm-l6`).
pub(crate) fn model_dir(name: &str) -> PathBuf {
    let path = model_path(name);
    path.parent().map(PathBuf::from).expect("model files live in a directory")
}
