//! Opening GGUF files defensively.
//!
//! candle's reader already caps string and array lengths; on top of that this module
//! checks the magic bytes first (so a wrong file gets a precise error), checks every
//! tensor's shape for overflow and that its bytes lie inside the file, before any
//! tensor data is allocated.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};

use crate::error::LoadError;

/// Largest tensor dimension accepted; real models stay far below (262144-token vocabularies).
const MAX_DIM: u64 = 1 << 28;

/// A parsed, validated GGUF header with the file it came from.
pub(crate) struct GgufFile {
    pub(crate) path: PathBuf,
    content: Content,
    reader: Positioned,
}

/// A buffered file that keeps its own position: candle's parser asks for it before every
/// string of the header (through a `BufReader` alone, one `lseek` system call each: about
/// 100,000 for a vocabulary with its merges, a third of SmolLM2's open time).
struct Positioned {
    inner: BufReader<File>,
    pos: u64,
}

impl Read for Positioned {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Positioned {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.pos = self.inner.seek(to)?;
        Ok(self.pos)
    }

    fn stream_position(&mut self) -> std::io::Result<u64> {
        Ok(self.pos)
    }
}

impl GgufFile {
    /// Opens `path`, parses the header and validates every tensor's extent.
    pub(crate) fn open(path: &Path) -> Result<Self, LoadError> {
        let io_err = |source| LoadError::Io { path: path.to_owned(), source };
        let mut file = File::open(path).map_err(io_err)?;
        let file_size = file.metadata().map_err(io_err)?.len();
        let mut magic = [0u8; 4];
        let n_read = read_up_to(&mut file, &mut magic).map_err(io_err)?;
        if n_read < 4 || &magic != b"GGUF" {
            return Err(LoadError::NotGguf { path: path.to_owned(), found: magic[..n_read].to_vec() });
        }
        let file = File::open(path).map_err(io_err)?;
        let mut reader = Positioned { inner: BufReader::new(file), pos: 0 };
        let content = Content::read(&mut reader).map_err(|err| classify_header_error(path, file_size, err))?;
        let gguf = Self { path: path.to_owned(), content, reader };
        gguf.validate_tensors(file_size)?;
        Ok(gguf)
    }

    fn malformed(&self, reason: impl Into<String>) -> LoadError {
        LoadError::Malformed { path: self.path.clone(), reason: reason.into() }
    }

    fn validate_tensors(&self, file_size: u64) -> Result<(), LoadError> {
        let mut end_of_data = self.content.tensor_data_offset;
        for (name, info) in &self.content.tensor_infos {
            let mut n_elems: u64 = 1;
            for &dim in info.shape.dims() {
                let dim = dim as u64;
                if dim == 0 || dim > MAX_DIM {
                    return Err(self.malformed(format!("tensor {name} has dimension {dim}, outside 1..={MAX_DIM}")));
                }
                n_elems = n_elems
                    .checked_mul(dim)
                    .ok_or_else(|| self.malformed(format!("tensor {name} shape {:?} overflows", info.shape.dims())))?;
            }
            let block = info.ggml_dtype.block_size() as u64;
            if !n_elems.is_multiple_of(block) {
                return Err(self.malformed(format!(
                    "tensor {name} has {n_elems} elements, not a multiple of its {:?} block size {block}",
                    info.ggml_dtype
                )));
            }
            let n_bytes = n_elems / block * info.ggml_dtype.type_size() as u64;
            let end = self
                .content
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|start| start.checked_add(n_bytes))
                .ok_or_else(|| self.malformed(format!("tensor {name} offset {} overflows", info.offset)))?;
            end_of_data = end_of_data.max(end);
        }
        if end_of_data > file_size {
            return Err(LoadError::Truncated { path: self.path.clone(), expected: end_of_data, actual: file_size });
        }
        Ok(())
    }

    /// Elements in all tensors: the parameter count.
    pub(crate) fn total_elements(&self) -> u64 {
        self.content.tensor_infos.values().map(|info| info.shape.elem_count() as u64).sum()
    }

    pub(crate) fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads tensor `name`, checking that it has the shape the architecture expects.
    pub(crate) fn tensor(&mut self, name: &str, expected: &[usize], device: &Device) -> Result<QTensor, LoadError> {
        self.checked(name, expected)?;
        Ok(self.content.tensor(&mut self.reader, name, device)?)
    }

    /// Bytes of the matrices Kith's own kernels take (Q4_1, Q8_0, Q5_0, Q4_K, Q6_K), each
    /// counted with `align` bytes of room for its alignment.
    pub(crate) fn own_kernel_bytes(&self, align: usize) -> usize {
        use GgmlDType::{Q4_1, Q4K, Q5_0, Q6K, Q8_0};
        let own =
            self.content.tensor_infos.values().filter(|info| matches!(info.ggml_dtype, Q4_1 | Q8_0 | Q5_0 | Q4K | Q6K));
        // Sizes were checked against the file size when it was opened: the sum fits.
        own.map(|info| {
            let row_len = info.shape.dims().last().copied().unwrap_or(1).max(1);
            let rows = crate::quant::stored_rows(info.ggml_dtype, info.shape.elem_count() / row_len);
            rows * row_len / info.ggml_dtype.block_size() * info.ggml_dtype.type_size() + align
        })
        .sum()
    }

    /// The type and shape (rows first, as candle orders them) of tensor `name`.
    pub(crate) fn tensor_shape(&self, name: &str) -> Option<(GgmlDType, Vec<usize>)> {
        self.content.tensor_infos.get(name).map(|info| (info.ggml_dtype, info.shape.dims().to_vec()))
    }

    /// The type of tensor `name`, after checking its shape.
    pub(crate) fn tensor_type(&self, name: &str, expected: &[usize]) -> Result<GgmlDType, LoadError> {
        Ok(self.checked(name, expected)?.0)
    }

    /// A reader of tensor `name`'s raw bytes (its extent was checked when the file was
    /// opened), for tensors converted a piece at a time.
    pub(crate) fn raw_tensor(&mut self, name: &str, expected: &[usize]) -> Result<impl Read + '_, LoadError> {
        let (_, start, len) = self.checked(name, expected)?;
        let io_err = |source| LoadError::Io { path: self.path.clone(), source };
        self.reader.seek(SeekFrom::Start(start)).map_err(io_err)?;
        Ok((&mut self.reader).take(len))
    }

    /// The type, first byte and length of tensor `name`, or why it cannot be read with
    /// shape `expected`.
    fn checked(&self, name: &str, expected: &[usize]) -> Result<(GgmlDType, u64, u64), LoadError> {
        let info =
            self.content.tensor_infos.get(name).ok_or_else(|| self.malformed(format!("missing tensor {name}")))?;
        if info.shape.dims() != expected {
            return Err(self.malformed(format!(
                "tensor {name} has shape {:?}, the model's metadata implies {expected:?}",
                info.shape.dims()
            )));
        }
        let dtype = info.ggml_dtype;
        let len = (info.shape.elem_count() / dtype.block_size() * dtype.type_size()) as u64;
        Ok((dtype, self.content.tensor_data_offset + info.offset, len))
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub(crate) fn string(&self, key: &str) -> Result<&str, LoadError> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => {
                Err(self.malformed(format!("metadata {key} should be a string, found {:?}", other.value_type())))
            }
            None => Err(self.malformed(format!("missing metadata {key}"))),
        }
    }

    pub(crate) fn opt_string(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// An unsigned integer of any width, as llama.cpp accepts.
    pub(crate) fn opt_u64(&self, key: &str) -> Result<Option<u64>, LoadError> {
        let value = match self.get(key) {
            None => return Ok(None),
            Some(value) => value,
        };
        let n = match value {
            Value::U8(v) => Some(u64::from(*v)),
            Value::U16(v) => Some(u64::from(*v)),
            Value::U32(v) => Some(u64::from(*v)),
            Value::U64(v) => Some(*v),
            Value::I8(v) => u64::try_from(*v).ok(),
            Value::I16(v) => u64::try_from(*v).ok(),
            Value::I32(v) => u64::try_from(*v).ok(),
            Value::I64(v) => u64::try_from(*v).ok(),
            _ => None,
        };
        n.map(Some).ok_or_else(|| self.malformed(format!("metadata {key} should be a non-negative integer")))
    }

    pub(crate) fn usize(&self, key: &str) -> Result<usize, LoadError> {
        let n = self.opt_u64(key)?.ok_or_else(|| self.malformed(format!("missing metadata {key}")))?;
        usize::try_from(n).map_err(|_| self.malformed(format!("metadata {key} = {n} is too large")))
    }

    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>, LoadError> {
        match self.opt_u64(key)? {
            None => Ok(None),
            Some(n) => {
                usize::try_from(n).map(Some).map_err(|_| self.malformed(format!("metadata {key} = {n} is too large")))
            }
        }
    }

    pub(crate) fn opt_f32(&self, key: &str) -> Option<f32> {
        match self.get(key) {
            Some(Value::F32(v)) => Some(*v),
            Some(Value::F64(v)) => Some(*v as f32),
            _ => None,
        }
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(Value::Bool(v)) => Some(*v),
            _ => None,
        }
    }

    /// Forgets the metadata arrays (the vocabulary, its scores, types and merges), once
    /// the tokenizer is built from them: for a 262k-token vocabulary they hold tens of MB.
    /// [`GgufFile::array`] finds none of them afterwards.
    pub(crate) fn drop_arrays(&mut self) {
        self.content.metadata.retain(|_, value| !matches!(value, Value::Array(_)));
    }

    pub(crate) fn array(&self, key: &str) -> Result<Option<&Vec<Value>>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(_) => Err(self.malformed(format!("metadata {key} should be an array"))),
        }
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// candle reports a short header as an IO "unexpected end of file"; name that truncation.
fn classify_header_error(path: &Path, file_size: u64, err: candle_core::Error) -> LoadError {
    let text = err.to_string();
    if text.contains("failed to fill whole buffer") || text.contains("UnexpectedEof") || text.contains("remaining") {
        LoadError::Malformed {
            path: path.to_owned(),
            reason: format!("header is cut short or claims more than the file's {file_size} bytes ({text})"),
        }
    } else {
        LoadError::Malformed { path: path.to_owned(), reason: text }
    }
}
