//! The engine's weight kernels on their own, for `cargo bench -p kith-infer --bench
//! kernels`: not part of the engine's API, and not stable.

use std::path::Path;
use std::time::Duration;

use candle_core::Device;

use crate::error::LoadError;
use crate::gguf::GgufFile;
use crate::model::Linear;
use crate::weights::{ALIGN, Arena};

/// One weight matrix of a GGUF file, as the engine holds it on the CPU.
pub struct Weights {
    linear: Linear,
    /// Type name, rows, row length, bytes in the file.
    summary: (String, usize, usize, usize),
}

impl Weights {
    /// Reads the tensors `names` of the GGUF file at `path` into one arena, as a model's
    /// matrices are, and waits until they are in their final pages.
    pub fn read(path: &Path, names: &[String]) -> Result<Vec<Self>, LoadError> {
        let mut gguf = GgufFile::open(path)?;
        let malformed = |reason: String| LoadError::Malformed { path: path.to_owned(), reason };
        let mut shapes = Vec::new();
        for name in names {
            let Some((dtype, dims)) = gguf.tensor_shape(name) else {
                return Err(malformed(format!("no tensor {name}")));
            };
            let [n, k] = dims[..] else {
                return Err(malformed(format!("tensor {name} has shape {dims:?}, not a matrix")));
            };
            let rows = crate::quant::stored_rows(dtype, n);
            shapes.push((dtype, n, k, rows * k / dtype.block_size() * dtype.type_size()));
        }
        let arena = Arena::new(shapes.iter().map(|(.., bytes)| bytes + ALIGN).sum());
        let mut all = Vec::new();
        for (name, (dtype, n, k, bytes)) in names.iter().zip(shapes) {
            let linear = Linear::read(&mut gguf, name, &[n, k], &Device::Cpu, &arena)?;
            all.push(Self { linear, summary: (format!("{dtype:?}"), n, k, bytes) });
        }
        arena.settle().wait(Duration::from_secs(60));
        Ok(all)
    }

    /// Type name, rows (outputs), row length (inputs), bytes.
    pub fn summary(&self) -> (&str, usize, usize, usize) {
        let (dtype, n, k, bytes) = &self.summary;
        (dtype, *n, *k, *bytes)
    }

    /// `x` (`m` rows of the row length) times the transposed matrix: `m` rows of outputs;
    /// `None` when the engine leaves this type to candle.
    pub fn matmul(&self, x: &[f32], m: usize) -> Option<Vec<f32>> {
        self.linear.host_matmul(x, m)
    }
}

/// One layer's attention on the CPU: a KV cache of `len` positions, and the queries of the
/// last `seq` of them attending over it, as a prompt continuation over a cached chat runs.
pub struct Attention {
    cache: crate::attention::HostKvCache,
    shape: crate::attention::AttentionShape,
    len: usize,
}

impl Attention {
    /// `n_head` query heads sharing `n_kv` K/V heads of `head_dim`, `len` cached positions of
    /// deterministic keys and values, each query seeing the last `window` keys up to its own
    /// (all of them without one).
    pub fn new(n_head: usize, n_kv: usize, head_dim: usize, len: usize, window: Option<usize>) -> Self {
        let mut cache = crate::attention::HostKvCache::new(n_kv, head_dim, len);
        let value = |i: usize| ((i.wrapping_mul(2_654_435_761)) % 1_000) as f32 / 500.0 - 1.0;
        let keys: Vec<f32> = (0..len * n_kv * head_dim).map(value).collect();
        let values: Vec<f32> = (0..len * n_kv * head_dim).map(|i| value(i + 17)).collect();
        cache.append(&keys, &values);
        let shape = crate::attention::AttentionShape {
            n_head,
            n_kv,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            scale_q_first: false,
            window,
        };
        Self { cache, shape, len }
    }

    /// The attention of `queries` (`[seq][n_head][head_dim]`) at the cache's last positions.
    pub fn run(&self, queries: &[f32]) -> Vec<f32> {
        let seq = queries.len() / (self.shape.n_head * self.shape.head_dim);
        crate::attention::attend(&self.cache, queries, self.len - seq.min(self.len), &self.shape)
    }
}
