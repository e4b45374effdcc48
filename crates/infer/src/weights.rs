//! Where the quantized weights live on the CPU: one arena per model, filled straight from
//! the GGUF file (the engine's block types are GGUF's bytes as they are), in transparent
//! huge pages where the kernel offers them.
//!
//! Why: decoding reads every weight once per token, so it is bound by memory bandwidth,
//! and with 4 KiB pages a 100 MB model costs ~25,000 TLB misses per token. One
//! sequential read of 178 MB on this project's 2-core machine: 10.6 GB/s in 4 KiB pages,
//! 12.5 GB/s in 2 MiB pages. One arena rather than a buffer per matrix, because most
//! matrices are smaller than a huge page. (llama.cpp maps the file: page-cache pages,
//! 4 KiB.)

use std::io::Read;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

// Blocks are read in place: their f16 fields are GGUF's little-endian bytes.
const _: () = assert!(cfg!(target_endian = "little"), "GGUF weights are read in place: little-endian hosts only");

/// A weight block type whose in-memory layout is GGUF's on-disk layout.
///
/// # Safety
/// Implementors are `repr(C)`, without padding, made only of integers, byte arrays and
/// `f16` (every bit pattern valid), with an alignment of at most [`ALIGN`].
#[allow(unsafe_code)]
pub(crate) unsafe trait RawBlock: Copy + Send + Sync + 'static {}

/// Alignment of every matrix in the arena: a cache line.
pub(crate) const ALIGN: usize = 64;
/// Transparent huge page size on x86-64 and most aarch64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// Memory for a model's weight matrices, filled once by [`Arena::read`]. Each region is
/// written before its [`Blocks`] exist and never again, so the blocks are plain shared
/// data.
pub(crate) struct Arena {
    /// Owns the memory; accessed only through `base` after construction.
    _buffer: Vec<u64>,
    base: *mut u8,
    capacity: usize,
    used: AtomicUsize,
}

// SAFETY: `base` points into `_buffer`, owned by the arena. The only writes go through
// `read`, into a region reserved by an atomic bump of `used` that no `Blocks` covers yet;
// afterwards the region is only read.
#[allow(unsafe_code)]
unsafe impl Send for Arena {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for Arena {}

impl Arena {
    /// Room for `capacity` bytes of matrices (plus [`ALIGN`] per matrix, which the caller
    /// includes). Untouched pages cost nothing: the allocation is zeroed lazily.
    pub(crate) fn new(capacity: usize) -> Arc<Self> {
        // Over-allocate by a huge page so the arena can start on a huge-page boundary.
        let mut buffer = vec![0u64; (capacity + HUGE_PAGE).div_ceil(8)];
        let start = buffer.as_mut_ptr().cast::<u8>();
        let skip = start.align_offset(HUGE_PAGE).min(HUGE_PAGE);
        // SAFETY: `skip` < HUGE_PAGE, inside the allocation of capacity + HUGE_PAGE bytes.
        #[allow(unsafe_code)]
        let base = unsafe { start.add(skip) };
        advise_huge_pages(base, capacity);
        // Fault the pages in on every thread of the pool: a fresh huge page can take
        // milliseconds to arrive in a virtual machine, and the file is read in order.
        // SAFETY: base..base + capacity lies inside the allocation, and no `Blocks` exist yet.
        #[allow(unsafe_code)]
        let region = unsafe { std::slice::from_raw_parts_mut(base, capacity) };
        region.par_chunks_mut(HUGE_PAGE).for_each(|page| page[0] = 0);
        Arc::new(Self { _buffer: buffer, base, capacity, used: AtomicUsize::new(0) })
    }

    /// Reads `count` blocks of type `B` from `reader` into the arena. An error (a short
    /// file) leaves the arena usable; the region it reserved stays unused.
    pub(crate) fn read<B: RawBlock>(
        self: &Arc<Self>,
        mut reader: impl Read,
        count: usize,
    ) -> std::io::Result<Blocks<B>> {
        let bytes = count
            .checked_mul(size_of::<B>())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "weight matrix too large"))?;
        let reserve = |used: usize| {
            let start = used.next_multiple_of(ALIGN);
            start.checked_add(bytes).filter(|&end| end <= self.capacity)
        };
        let used = self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, reserve).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::OutOfMemory, "weight arena sized too small for the model")
        })?;
        let start = used.next_multiple_of(ALIGN);
        // SAFETY: start..start + bytes lies inside the arena (checked by `reserve`) and was
        // just reserved by this call alone: nothing else reads or writes it yet.
        #[allow(unsafe_code)]
        let region = unsafe { std::slice::from_raw_parts_mut(self.base.add(start), bytes) };
        reader.read_exact(region)?;
        Ok(Blocks { arena: self.clone(), start, len: count, block: PhantomData })
    }
}

/// Asks the kernel to back `len` bytes at `base` (a huge-page boundary) with huge pages
/// when they are first touched. Advice only: without transparent huge pages, or off
/// Linux, the memory is the same in 4 KiB pages.
fn advise_huge_pages(base: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: madvise only changes how the kernel backs this range of our own
        // allocation (`base` is page-aligned; the kernel rounds a partial last page up,
        // and the allocation's mapping is whole pages).
        #[allow(unsafe_code)]
        let result = unsafe { libc::madvise(base.cast(), len, libc::MADV_HUGEPAGE) };
        if result != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "no huge pages for the weights");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (base, len);
}

/// A matrix's blocks in an [`Arena`], which they keep alive.
pub(crate) struct Blocks<B> {
    arena: Arc<Arena>,
    start: usize,
    len: usize,
    block: PhantomData<B>,
}

impl<B: RawBlock> Deref for Blocks<B> {
    type Target = [B];

    fn deref(&self) -> &[B] {
        // SAFETY: the region was filled by `Arena::read` and is never written again; it is
        // aligned to ALIGN ≥ align_of::<B>() (RawBlock's contract) and every bit pattern is
        // a valid B; the arena outlives `self`.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(self.arena.base.add(self.start).cast::<B>(), self.len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq)]
    #[repr(C)]
    struct Pair([u8; 3]);
    // SAFETY: a byte array.
    #[allow(unsafe_code)]
    unsafe impl RawBlock for Pair {}

    #[test]
    fn regions_are_aligned_filled_and_bounded() {
        let arena = Arena::new(2 * ALIGN + 6);
        let a: Blocks<Pair> = arena.read(&[1u8, 2, 3, 4, 5, 6][..], 2).expect("fits");
        let b: Blocks<Pair> = arena.read(&[7u8, 8, 9][..], 1).expect("fits");
        assert_eq!(&*a, &[Pair([1, 2, 3]), Pair([4, 5, 6])]);
        assert_eq!(&*b, &[Pair([7, 8, 9])]);
        assert_eq!(b.start, ALIGN);
        // A short reader is an error and the arena stays usable.
        assert!(arena.read::<Pair>(&[1u8][..], 1).is_err());
        assert!(arena.read::<Pair>(&[0u8; 300][..], 100).is_err_and(|e| e.kind() == std::io::ErrorKind::OutOfMemory));
        assert_eq!(&*a, &[Pair([1, 2, 3]), Pair([4, 5, 6])]);
    }
}
