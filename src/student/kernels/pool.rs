//! Spreading work over candle's CPU thread pool: work items are ranges of rows, each
//! writing only its own part of a shared output buffer.

use std::ops::Range;

/// Runs `work` over `items` split into ranges, one per pool thread, and returns when all
/// are done.
pub fn for_each_range(items: usize, work: impl Fn(Range<usize>) + Sync) {
    candle_core::utils::barrier_pool().execute_chunked(items, work);
}

/// The `len` values at `start` of the `T` buffer at address `base`, for a pool work item
/// that owns exactly that part of a buffer shared by all items.
///
/// # Safety
/// No other item may touch the range while the returned slice lives, and the buffer (at
/// least `start + len` values) must outlive it: true inside [`for_each_range`], which returns
/// when all items are done.
pub unsafe fn item_slice<'a, T>(base: usize, start: usize, len: usize) -> &'a mut [T] {
    // SAFETY: the range lies inside the live buffer and is this item's alone (see above).
    unsafe { std::slice::from_raw_parts_mut((base as *mut T).add(start), len) }
}
