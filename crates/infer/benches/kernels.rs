//! Speed of the engine's own weight kernels on the catalog models' real matrices:
//! `cargo bench -p kith-infer --bench kernels` (threads: `KITH_THREADS`, default one per
//! core; `KITH_BENCH_MODELS=smollm2-135m` for one model). Needs the models pulled.
//!
//! - decode pass: every matrix of the model in layer order (the output projection last),
//!   one activation row each, as one generated token multiplies them: milliseconds per
//!   pass and weight bytes read per second. The whole model is read, so this is the
//!   memory-bound part of decoding.
//! - per kind of matrix (every layer's copy): one row against each copy (decode, in cache
//!   when the copies fit), and a 512-row prompt micro-batch, as rows per second through
//!   all the copies and multiply-adds per second.
//!
//! - attention: one layer's attention of 80 new queries over a 1,000-position cache (turn 10
//!   of a chat), with each model's heads: the multiply-adds of Q·K and of the weighted V per
//!   second.
//!
//! The kernels run inside a rayon pool, as the engine runs them.

use std::collections::BTreeMap;
use std::time::Instant;

use kith_infer::kernels::Weights;

/// Deterministic activations in [-1, 1), a few of them large as real ones are.
fn activations(len: usize) -> Vec<f32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|i| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let v = ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            if i % 97 == 0 { v * 8.0 } else { v }
        })
        .collect()
}

/// Median of `runs` timings of `f`, in seconds, after one warm-up call.
fn median_secs(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// The model's matrices in the order a forward pass multiplies them, the output last.
fn matrices(path: &std::path::Path, layers: usize) -> Vec<(String, Weights)> {
    let suffixes = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];
    let names = (0..layers).flat_map(|l| suffixes.map(|s| format!("blk.{l}.{s}.weight")));
    let names: Vec<String> = names.chain(["token_embd.weight".to_owned()]).collect();
    let weights = Weights::read(path, &names).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    names.into_iter().zip(weights).collect()
}

fn decode_pass(all: &[(String, Weights)]) {
    let inputs: BTreeMap<usize, Vec<f32>> =
        all.iter().map(|(_, w)| (w.summary().2, activations(w.summary().2))).collect();
    let bytes: usize = all.iter().map(|(_, w)| w.summary().3).sum();
    let secs = median_secs(9, || {
        for (_, w) in all {
            std::hint::black_box(w.matmul(&inputs[&w.summary().2], 1).expect("own kernel"));
        }
    });
    println!(
        "decode pass    {:>6.2} ms  {:>6.2} GB/s  ({:.1} MB of weights)",
        secs * 1e3,
        bytes as f64 / secs / 1e9,
        bytes as f64 / 1e6
    );
}

fn per_kind(all: &[(String, Weights)]) {
    // Kinds: the tensor's name without its layer, and its type (a model may mix types).
    let mut kinds: BTreeMap<(String, String), Vec<&Weights>> = BTreeMap::new();
    for (name, w) in all {
        let kind = name.split('.').rev().nth(1).unwrap_or(name).to_owned();
        kinds.entry((kind, w.summary().0.to_owned())).or_default().push(w);
    }
    for ((kind, dtype), copies) in kinds {
        let (_, n, k, bytes) = copies[0].summary();
        let one = activations(k);
        let decode = median_secs(9, || {
            for w in &copies {
                std::hint::black_box(w.matmul(&one, 1).expect("own kernel"));
            }
        });
        print!(
            "{kind:<12} {dtype:<5} {n:>6}x{k:<5} x{:<3} decode {:>7.1} us {:>6.2} GB/s",
            copies.len(),
            decode / copies.len() as f64 * 1e6,
            (bytes * copies.len()) as f64 / decode / 1e9
        );
        if kind != "token_embd" {
            let rows = 512;
            let x = activations(rows * k);
            let secs = median_secs(3, || {
                for w in &copies {
                    std::hint::black_box(w.matmul(&x, rows).expect("own kernel"));
                }
            });
            let macs = (rows * n * k * copies.len()) as f64;
            print!("   prompt {:>6.0} rows/s {:>6.1} GMAC/s", rows as f64 / secs, macs / secs / 1e9);
        }
        println!();
    }
}

fn attention(n_head: usize, n_kv: usize, head_dim: usize, window: Option<usize>) {
    let (len, seq) = (1000, 80);
    let layer = kith_infer::kernels::Attention::new(n_head, n_kv, head_dim, len, window);
    let queries = activations(seq * n_head * head_dim);
    let secs = median_secs(9, || {
        std::hint::black_box(layer.run(&queries));
    });
    // Each query sees the cached positions before it and itself: Q·K and P·V.
    let visible: usize = (0..seq).map(|i| (len - seq + i + 1).min(window.unwrap_or(len))).sum();
    let macs = (2 * visible * n_head * head_dim) as f64;
    let seen = window.map_or(String::new(), |w| format!(" (window {w})"));
    println!(
        "attention      {seq} queries over {len} positions{seen}, {n_head} heads ({n_kv} K/V) of {head_dim}: {:>6.3} ms {:>6.1} GMAC/s",
        secs * 1e3,
        macs / secs / 1e9
    );
}

fn main() {
    if let Ok(threads) = std::env::var("KITH_THREADS") {
        #[allow(unsafe_code)]
        // SAFETY: first thing in main, no other thread exists yet.
        unsafe {
            std::env::set_var("RAYON_NUM_THREADS", threads)
        };
    }
    let models = std::env::var("KITH_BENCH_MODELS").unwrap_or_else(|_| "smollm2-135m,gemma3-270m".into());
    let catalog = kith_models::Catalog::builtin().expect("catalog");
    let store = kith_models::Store::from_env().expect("model store");
    // As the engine does: the kernels fork from a worker of the pool, not from outside it.
    let pool = rayon::ThreadPoolBuilder::new().build().expect("thread pool");
    println!("{} threads", pool.current_num_threads());
    pool.install(|| {
        for model in models.split(',') {
            let entry = catalog.get(model).unwrap_or_else(|| panic!("{model} is not in the catalog"));
            let path = store
                .installed_path(entry)
                .unwrap_or_else(|| panic!("{model} is not pulled (`kith models pull {model}`)"));
            let layers = if model.starts_with("gemma") { 18 } else { 30 };
            println!("{model}");
            let all = matrices(&path, layers);
            decode_pass(&all);
            if model.starts_with("gemma") {
                // Its global layers, and the sliding-window ones (five in six).
                attention(4, 1, 256, None);
                attention(4, 1, 256, Some(512));
            } else {
                attention(9, 3, 64, None)
            }
            if std::env::var("KITH_BENCH_DECODE_ONLY").is_err() {
                per_kind(&all);
            }
        }
    });
}
