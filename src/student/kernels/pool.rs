//! Spreading work over candle's CPU thread pool: work items are ranges of rows, each
//! writing only its own part of a shared output buffer.

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::{Mutex, PoisonError};

/// Runs `work` over `items` split into ranges, one per pool thread, and returns when all
/// are done. A panic in any range is raised here, on the caller's thread, once every range
/// has returned: letting it unwind through the pool would poison the pool's own lock and
/// break every product after it, so the engine could not recover.
pub fn for_each_range(items: usize, work: impl Fn(Range<usize>) + Sync) {
    let panicked = Mutex::new(None);
    candle_core::utils::barrier_pool().execute_chunked(items, |range| {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| work(range))) {
            panicked
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert(panic);
        }
    });
    if let Some(panic) = panicked
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
    {
        resume_unwind(panic);
    }
}

/// The `len` values at `start` of the `T` buffer at address `base`, for a pool work item
/// that owns exactly that part of a buffer shared by all items.
///
/// # Safety
/// No other item may touch the range while the returned slice lives, and the buffer (at
/// least `start + len` values) must outlive it: true inside [`for_each_range`], which returns
/// when all items are done.
pub(crate) unsafe fn item_slice<'a, T>(base: usize, start: usize, len: usize) -> &'a mut [T] {
    // SAFETY: the range lies inside the live buffer and is this item's alone (see above).
    unsafe { std::slice::from_raw_parts_mut((base as *mut T).add(start), len) }
}

/// A per-thread buffer of `Self` values, reused from product to product: products run for
/// every layer of every token, and a fresh allocation each time would be one per layer.
pub trait ThreadBuffer: Sized + Copy + Default + 'static {
    fn with_buffer<R>(work: impl FnOnce(&mut Vec<Self>) -> R) -> R;

    /// Frees this thread's buffer (the model is being unloaded).
    fn release() {
        Self::with_buffer(|buffer| *buffer = Vec::new());
    }
}

/// Implements [`ThreadBuffer`] for `$t` with a `thread_local!` of its own.
macro_rules! thread_buffer {
    ($t:ty) => {
        impl $crate::student::kernels::pool::ThreadBuffer for $t {
            fn with_buffer<R>(work: impl FnOnce(&mut Vec<Self>) -> R) -> R {
                thread_local! {
                    static BUFFER: std::cell::RefCell<Vec<$t>> =
                        const { std::cell::RefCell::new(Vec::new()) };
                }
                BUFFER.with(|cell| work(&mut cell.borrow_mut()))
            }
        }
    };
}
pub(crate) use thread_buffer;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_panic_in_one_range_reaches_the_caller_and_the_pool_works_after() {
        let caught = catch_unwind(|| {
            for_each_range(64, |range| {
                if range.contains(&63) {
                    panic!("a range failed");
                }
            })
        });
        assert!(caught.is_err());
        let done = AtomicUsize::new(0);
        for_each_range(64, |range| {
            done.fetch_add(range.len(), Ordering::Relaxed);
        });
        assert_eq!(done.into_inner(), 64);
    }
}
