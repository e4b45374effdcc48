//! The engine's weight kernels on their own, for `cargo bench -p kith-infer --bench
//! kernels`: not part of the engine's API, and not stable.

use std::path::Path;

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
    /// Reads tensor `name` of the GGUF file at `path`.
    pub fn read(path: &Path, name: &str) -> Result<Self, LoadError> {
        let mut gguf = GgufFile::open(path)?;
        let malformed = |reason: String| LoadError::Malformed { path: path.to_owned(), reason };
        let Some((dtype, dims)) = gguf.tensor_shape(name) else {
            return Err(malformed(format!("no tensor {name}")));
        };
        let [n, k] = dims[..] else {
            return Err(malformed(format!("tensor {name} has shape {dims:?}, not a matrix")));
        };
        let bytes = n * k / dtype.block_size() * dtype.type_size();
        let arena = Arena::new(bytes + ALIGN);
        let linear = Linear::read(&mut gguf, name, &dims, &Device::Cpu, &arena)?;
        Ok(Self { linear, summary: (format!("{dtype:?}"), n, k, bytes) })
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
