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
            shapes.push((dtype, n, k, n * k / dtype.block_size() * dtype.type_size()));
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
