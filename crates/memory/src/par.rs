//! Data-parallel helpers on scoped std threads (no thread pool to keep alive: the work
//! is a few bursts at unlock).

use std::ops::Range;

/// Below this many items one thread is faster than starting others.
const MIN_PER_THREAD: usize = 2_048;

/// `items.iter().map(f).collect()`, on up to every core, in order.
pub(crate) fn map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    ranges(items.len(), |range| items[range].iter().map(&f).collect::<Vec<R>>()).into_iter().flatten().collect()
}

/// Splits `0..len` into one contiguous range per core (one range when `len` is small)
/// and runs `f` on each; the results in range order.
pub(crate) fn ranges<R: Send>(len: usize, f: impl Fn(Range<usize>) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, usize::from).min(len / MIN_PER_THREAD).max(1);
    if threads == 1 {
        return vec![f(0..len)];
    }
    let chunk = len.div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let workers: Vec<_> =
            (0..len).step_by(chunk).map(|start| scope.spawn(move || f(start..(start + chunk).min(len)))).collect();
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn keeps_order_at_every_size() {
        for n in [0, 1, 2_047, 2_048, 10_000, 100_003] {
            let items: Vec<usize> = (0..n).collect();
            assert_eq!(super::map(&items, |x| x * 2), items.iter().map(|x| x * 2).collect::<Vec<_>>());
        }
    }
}
