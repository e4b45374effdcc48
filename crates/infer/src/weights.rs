//! Where the quantized weights live on the CPU: one arena per model, filled straight from
//! the GGUF file (the engine's block types are GGUF's bytes as they are), then moved into
//! transparent huge pages in the background where the kernel offers them.
//!
//! Why: decoding reads every weight once per token, and with 4 KiB pages a 100 MB model
//! costs ~25,000 TLB misses per token, each a page walk (two-dimensional in a virtual
//! machine). On this project's 2-core virtual machine, decoding SmolLM2 at one thread
//! went from 43 to 82 tokens/s with the weights in 2 MiB pages. One arena rather than a
//! buffer per matrix, because most matrices are smaller than a huge page. (llama.cpp maps
//! the file: page-cache pages, 4 KiB.)
//!
//! Why in the background: a fresh huge page can be slow to arrive (on that machine, whose
//! host takes back free memory in 8 MiB blocks, faulting in 246 MB of huge pages took
//! 0.4-0.8 s against 0.1 s in small pages), and that would delay the first token. The file
//! is read into small pages; then a thread asks the kernel to collapse the arena, 2 MiB at
//! a time (`MADV_COLLAPSE`, Linux 6.1+; older kernels leave it to `khugepaged`). The
//! contents never change, so the engine reads the weights meanwhile.

use std::io::Read;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

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
    settled: Arc<Settled>,
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
        let settled = Arc::new(Settled { done: Mutex::new(false), changed: Condvar::new() });
        Arc::new(Self { _buffer: buffer, base, capacity, used: AtomicUsize::new(0), settled })
    }

    /// Reads `count` blocks of type `B` from `reader` into the arena. An error (a short
    /// file) leaves the arena usable; the region it reserved stays unused.
    pub(crate) fn read<B: RawBlock>(
        self: &Arc<Self>,
        mut reader: impl Read,
        count: usize,
    ) -> std::io::Result<Blocks<B>> {
        self.fill(count, |blocks: &mut [B]| reader.read_exact(as_bytes_mut(blocks)))
    }

    /// Reserves `count` blocks of type `B` (zeroed) and has `write` fill them; an error
    /// leaves the arena usable, the region it reserved unused.
    pub(crate) fn fill<B: RawBlock>(
        self: &Arc<Self>,
        count: usize,
        write: impl FnOnce(&mut [B]) -> std::io::Result<()>,
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
        populate(region);
        // SAFETY: the region is aligned to ALIGN ≥ align_of::<B>(), holds `count` blocks'
        // bytes, and every bit pattern is a valid B (RawBlock's contract).
        #[allow(unsafe_code)]
        let blocks = unsafe { std::slice::from_raw_parts_mut(region.as_mut_ptr().cast::<B>(), count) };
        write(blocks)?;
        Ok(Blocks { arena: self.clone(), start, len: count, block: PhantomData })
    }

    /// Once every matrix is read: moves the arena into huge pages on a thread of its own
    /// (see the module's documentation) and returns what says when that is done. The
    /// thread stops early when the arena is dropped.
    pub(crate) fn settle(self: &Arc<Self>) -> Arc<Settled> {
        let settled = self.settled.clone();
        #[cfg(target_os = "linux")]
        {
            let arena = Arc::downgrade(self);
            let spawned = std::thread::Builder::new().name("kith-weights".into()).spawn(move || {
                // Only on otherwise idle processor time: never in the way of generation.
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: changes this thread's scheduling policy only.
                #[allow(unsafe_code)]
                if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
                    tracing::debug!(error = %std::io::Error::last_os_error(), "weights thread at normal priority");
                }
                collapse(&arena);
                if let Some(arena) = arena.upgrade() {
                    arena.settled.set();
                }
            });
            if spawned.is_err() {
                tracing::debug!("no thread to move the weights into huge pages; they stay in small pages");
                settled.set();
            }
        }
        #[cfg(not(target_os = "linux"))]
        settled.set();
        settled
    }
}

/// The bytes of `blocks`, to be filled as they are.
pub(crate) fn as_bytes_mut<B: RawBlock>(blocks: &mut [B]) -> &mut [u8] {
    // SAFETY: RawBlock types have no padding and accept every bit pattern, so their memory
    // is plain bytes both ways.
    #[allow(unsafe_code)]
    unsafe {
        std::slice::from_raw_parts_mut(blocks.as_mut_ptr().cast::<u8>(), size_of_val(blocks))
    }
}

/// Faults in the pages of `region` by one call, before a read fills it, rather than one
/// page fault at a time inside the read (SmolLM2: ~24,000 of them; reading its weights took
/// 68-75 ms before, 59-65 after, interleaved). Older kernels refuse it (`EINVAL`): the read
/// then faults the pages in as before.
fn populate(region: &mut [u8]) {
    #[cfg(target_os = "linux")]
    {
        /// `MADV_POPULATE_WRITE` (Linux 5.14), not in every libc's headers.
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        const PAGE: usize = 4096;
        let address = region.as_mut_ptr() as usize;
        let start = address / PAGE * PAGE;
        let end = (address + region.len()).next_multiple_of(PAGE);
        // SAFETY: the pages from `start` to `end` hold `region` and, at its two ends, parts
        // of the same allocation (the arena over-allocates by a huge page); populating a page
        // never changes its contents.
        #[allow(unsafe_code)]
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, MADV_POPULATE_WRITE)
        };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = region;
}

/// Collapses the used part of the arena into huge pages, one at a time, while it lives.
#[cfg(target_os = "linux")]
fn collapse(arena: &std::sync::Weak<Arena>) {
    /// `MADV_COLLAPSE` (Linux 6.1), not in every libc's headers.
    const MADV_COLLAPSE: libc::c_int = 25;
    let advise = |arena: &Arena, offset: usize, len: usize, advice: libc::c_int| {
        // SAFETY: offset..offset + len lies inside the arena's allocation (page-aligned at
        // `base`); madvise only changes how the kernel backs those pages, never their
        // contents.
        #[allow(unsafe_code)]
        let result = unsafe { libc::madvise(arena.base.add(offset).cast(), len, advice) };
        if result == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    };
    let Some(first) = arena.upgrade() else { return };
    let used = first.used.load(Ordering::Acquire);
    if let Err(error) = advise(&first, 0, used.max(1), libc::MADV_HUGEPAGE) {
        tracing::debug!(%error, "no huge pages for the weights");
        return;
    }
    drop(first);
    let started = std::time::Instant::now();
    // Whole huge pages only: the partial last one stays in small pages.
    for offset in (0..used / HUGE_PAGE).map(|page| page * HUGE_PAGE) {
        let Some(arena) = arena.upgrade() else { return };
        if let Err(error) = advise(&arena, offset, HUGE_PAGE, MADV_COLLAPSE) {
            // EINVAL before Linux 6.1; khugepaged collapses the pages in its own time.
            tracing::debug!(%error, "weights left to khugepaged");
            return;
        }
    }
    tracing::debug!(mib = used >> 20, elapsed_ms = started.elapsed().as_millis() as u64, "weights in huge pages");
}

/// Whether a model's weights have reached their final pages.
pub(crate) struct Settled {
    done: Mutex<bool>,
    changed: Condvar,
}

impl Settled {
    fn set(&self) {
        *self.done.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        self.changed.notify_all();
    }

    /// Waits up to `timeout` for the weights to settle; whether they have.
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        let done = self.done.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (done, _) = self
            .changed
            .wait_timeout_while(done, timeout, |done| !*done)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *done
    }
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

    /// The background move to huge pages finishes, leaves the contents as they were and,
    /// where the kernel can collapse pages (transparent huge pages on, Linux 6.1+), puts
    /// the arena's whole huge pages in huge pages.
    #[test]
    fn settling_keeps_the_contents() {
        let bytes: Vec<u8> = (0..6 * HUGE_PAGE).map(|i| (i * 7 % 251) as u8).collect();
        let arena = Arena::new(bytes.len() + ALIGN);
        let blocks: Blocks<Pair> = arena.read(&bytes[..], bytes.len() / 3).expect("fits");
        assert!(arena.settle().wait(Duration::from_secs(120)), "the weights thread finishes");
        assert!(blocks.iter().flat_map(|pair| pair.0).eq(bytes.iter().copied()));
        #[cfg(target_os = "linux")]
        if collapse_supported() {
            assert!(huge_kib_at(arena.base as usize) >= 5 * (HUGE_PAGE >> 10), "collapsed into huge pages");
        }
    }

    /// Transparent huge pages are on (`always` or `madvise`) and the kernel is 6.1 or later.
    #[cfg(target_os = "linux")]
    fn collapse_supported() -> bool {
        let enabled = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut version = release.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
        let (major, minor) = (version.next().unwrap_or(0), version.next().unwrap_or(0));
        !enabled.contains("[never]") && (major, minor) >= (6, 1)
    }

    /// `AnonHugePages` of the mapping that holds `address`, in KiB.
    #[cfg(target_os = "linux")]
    fn huge_kib_at(address: usize) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((start, end)) = range.split_once('-')
                && let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16))
            {
                inside = (start..end).contains(&address);
            } else if inside && let Some(kib) = line.strip_prefix("AnonHugePages:") {
                return kib.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            }
        }
        0
    }
}
