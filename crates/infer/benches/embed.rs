//! MiniLM embedding speed: `cargo bench -p kith-infer --bench embed` (threads: KITH_THREADS
//! or RAYON_NUM_THREADS, default one per core). Needs `kith models pull minilm-l6`.
//!
//! Embeds the 512 sentences of `sentences.txt` (5 to 60 words, 15 on average) three
//! times and reports the best sentences/s; then the latency of embedding one short
//! query, as recall does before searching. `embed_st.py` measures sentence-transformers
//! on the same sentences for comparison.

use std::time::{Duration, Instant};

fn main() {
    if let Ok(threads) = std::env::var("KITH_THREADS") {
        // Before candle reads it on first use (same as `kith -t`).
        #[allow(unsafe_code)]
        // SAFETY: first thing in main, no other thread exists yet.
        unsafe {
            std::env::set_var("RAYON_NUM_THREADS", threads)
        };
    }
    let catalog = kith_models::Catalog::builtin().expect("catalog");
    let store = kith_models::Store::from_env().expect("model store");
    let entry = catalog.get("minilm-l6").expect("minilm-l6 in the catalog");
    let path = store.installed_path(entry).expect("minilm-l6 is pulled (`kith models pull minilm-l6`)");
    let started = Instant::now();
    let embedder = kith_infer::Embedder::load(path.parent().expect("model dir")).expect("MiniLM loads");
    println!("load: {:.0} ms", started.elapsed().as_secs_f64() * 1e3);

    let text = include_str!("sentences.txt");
    let sentences: Vec<&str> = text.lines().collect();
    embedder.embed(&sentences[..32]).expect("warm-up");
    let mut best = f64::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        let vectors = embedder.embed(&sentences).expect("embeds");
        assert_eq!(vectors.len(), sentences.len());
        best = best.min(started.elapsed().as_secs_f64());
    }
    println!(
        "batch: {} sentences in {best:.2} s = {:.0} sentences/s on {} threads",
        sentences.len(),
        sentences.len() as f64 / best,
        kith_infer::thread_count()
    );

    let mut times: Vec<Duration> = (0..200)
        .map(|i| {
            let query = ["what is my daughter's name?", "when does the train leave", "wifi password"][i % 3];
            let started = Instant::now();
            embedder.embed_one(query).expect("embeds");
            started.elapsed()
        })
        .collect();
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("one query: p50 {:.1} ms, p99 {:.1} ms", ms(times[100]), ms(times[198]));
}
