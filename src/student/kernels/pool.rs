//! The model's worker threads, and spreading a product's work over them: work items are
//! ranges of rows, each writing only its own part of a shared output buffer.
//!
//! Built for machines that are doing other things too (an IDE, a browser, a compiler): work
//! is handed out in small pieces that whichever thread is running claims, so a worker the OS
//! has descheduled holds back at most the one piece it is in; and nobody spins for long. A
//! thread waiting for work or for the last piece spins a few microseconds (decoding hands out
//! work every ten or so) and then sleeps, which leaves its core to the descheduled worker
//! instead of burning it. A caller never waits for a worker that has not joined the job.

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::hint::spin_loop;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicUsize, Ordering::*};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// Pieces per thread a job is cut into: small enough that a descheduled worker holds back
/// little, large enough that claiming them costs nothing beside the work.
const PIECES_PER_THREAD: usize = 8;

/// How long an idle worker spins before it sleeps: longer than the gaps between one
/// decoding step's products, so a running model's workers do not sleep between them.
const WORKER_SPIN: Duration = Duration::from_micros(50);

/// How long the caller spins for the last pieces before it sleeps: long enough for a
/// running worker to finish a piece, short enough that a descheduled one gets the core.
const CALLER_SPIN: Duration = Duration::from_micros(10);

static THREADS: OnceLock<usize> = OnceLock::new();
static POOL: OnceLock<Pool> = OnceLock::new();

thread_local! {
    /// Whether this thread is running a job's pieces: a worker, or a caller inside
    /// [`for_each_range`]. A job started from there runs inline.
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

/// Sets the number of threads products use, the caller included (0: one per physical
/// core). Only the first call before the first product counts.
pub fn set_threads(threads: usize) {
    let threads = if threads == 0 {
        candle_core::utils::get_num_threads()
    } else {
        threads
    };
    let _ = THREADS.set(threads.max(1));
}

/// The threads products run on, the caller included.
pub fn threads() -> usize {
    *THREADS.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

/// Runs `work` over `items` cut into pieces that the caller and the workers claim, and
/// returns when all are done. A panic in any piece is raised here, on the caller's thread,
/// once every piece has returned: the pool keeps working after it.
pub fn for_each_range(items: usize, work: impl Fn(Range<usize>) + Sync) {
    if items == 0 {
        return;
    }
    let pool = POOL.get_or_init(|| Pool::new(threads() - 1));
    if pool.workers.is_empty() || IN_JOB.with(Cell::get) {
        work(0..items);
        return;
    }
    let _one_job = pool.caller.lock().unwrap_or_else(PoisonError::into_inner);
    let shared = pool.shared;
    let piece = items.div_ceil((pool.workers.len() + 1) * PIECES_PER_THREAD);
    let work: &(dyn Fn(Range<usize>) + Sync) = &work;
    // SAFETY: no worker is inside a job (the last caller waited for them to leave), so
    // nothing reads the job while it is written; `work` outlives the job, which is closed
    // and left by every worker before this function returns.
    unsafe {
        *shared.job.get() = Job {
            work: std::mem::transmute::<
                *const (dyn Fn(Range<usize>) + Sync + '_),
                *const (dyn Fn(Range<usize>) + Sync + 'static),
            >(work),
            items,
            piece,
        };
    }
    *shared.caller.lock().unwrap_or_else(PoisonError::into_inner) = Some(std::thread::current());
    shared.cursor.store(0, Relaxed);
    shared.done.store(0, Relaxed);
    // Odd: open. The stores above are published by this one.
    shared.generation.fetch_add(1, SeqCst);
    for worker in &pool.workers {
        worker.unpark();
    }
    IN_JOB.with(|j| j.set(true));
    // SAFETY: the job was just written and stays until it is closed below.
    unsafe { shared.run_pieces() };
    IN_JOB.with(|j| j.set(false));
    wait_until(CALLER_SPIN, || shared.done.load(Acquire) == items);
    // Even: closed. A worker that joins from now on sees it and leaves without reading the
    // job; one that joined before is waited for.
    shared.generation.fetch_add(1, SeqCst);
    wait_until(CALLER_SPIN, || shared.inside.load(SeqCst) == 0);
    let panic = shared
        .panic
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some(panic) = panic {
        resume_unwind(panic);
    }
}

/// The worker threads and what they share with callers.
struct Pool {
    workers: Vec<Thread>,
    shared: &'static Shared,
    /// One job at a time.
    caller: Mutex<()>,
}

/// A job as the caller hands it out.
struct Job {
    work: *const (dyn Fn(Range<usize>) + Sync),
    items: usize,
    piece: usize,
}

struct Shared {
    /// Odd while a job is open; bumped when one opens and when it closes.
    generation: AtomicUsize,
    /// Written by the caller only while no worker is inside (see [`for_each_range`]).
    job: UnsafeCell<Job>,
    /// The next item to claim.
    cursor: AtomicUsize,
    /// Items done.
    done: AtomicUsize,
    /// Workers that have joined the current job and not left it.
    inside: AtomicUsize,
    /// The latest caller: woken when the last piece is done and when the last worker
    /// leaves. Not part of the job, because a worker that finds the job closed wakes it too
    /// and must not read the job then (waking a later caller for nothing is harmless).
    caller: Mutex<Option<Thread>>,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `job` is written only by the caller holding `Pool::caller` while no worker is
// inside, and read only by threads inside the open job (see `for_each_range`); its `work`
// is `Sync`.
unsafe impl Sync for Shared {}

impl Pool {
    fn new(workers: usize) -> Self {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            generation: AtomicUsize::new(0),
            job: UnsafeCell::new(Job {
                work: &|_| {},
                items: 0,
                piece: 1,
            }),
            cursor: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            inside: AtomicUsize::new(0),
            caller: Mutex::new(None),
            panic: Mutex::new(None),
        }));
        let workers = (0..workers)
            .map(|i| {
                std::thread::Builder::new()
                    .name(format!("duet-model-{i}"))
                    .spawn(move || shared.serve())
                    .expect("cannot start the model's worker threads")
                    .thread()
                    .clone()
            })
            .collect();
        Self {
            workers,
            shared,
            caller: Mutex::new(()),
        }
    }
}

impl Shared {
    /// A worker's life: wait for a job it has not joined, join it, claim pieces, leave.
    fn serve(&self) {
        IN_JOB.with(|j| j.set(true));
        let mut joined = 0;
        loop {
            let mut open = 0;
            wait_until(WORKER_SPIN, || {
                open = self.generation.load(Acquire);
                open % 2 == 1 && open != joined
            });
            joined = open;
            self.inside.fetch_add(1, SeqCst);
            // The job may have closed between the two loads: then the caller may already
            // be writing the next one, and this worker must not read it.
            if self.generation.load(SeqCst) == open {
                // SAFETY: the job is open and cannot close while this worker is inside.
                unsafe { self.run_pieces() };
            }
            if self.inside.fetch_sub(1, SeqCst) == 1 {
                self.wake_caller();
            }
        }
    }

    /// Claims and runs pieces until none is left; wakes the caller after the last one.
    ///
    /// # Safety
    /// The job must be open and stay so (the caller, or a worker counted `inside`).
    unsafe fn run_pieces(&self) {
        // SAFETY: the job stays as it is while open (see above).
        let job = unsafe { &*self.job.get() };
        loop {
            let start = self.cursor.fetch_add(job.piece, Relaxed);
            if start >= job.items {
                return;
            }
            let end = job.items.min(start + job.piece);
            // SAFETY: `work` outlives the open job.
            let work = unsafe { &*job.work };
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| work(start..end))) {
                self.panic
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_or_insert(panic);
            }
            if self.done.fetch_add(end - start, AcqRel) + (end - start) == job.items {
                self.wake_caller();
            }
        }
    }

    fn wake_caller(&self) {
        let caller = self.caller.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(caller) = &*caller {
            caller.unpark();
        }
    }
}

/// Spins until `ready` or for `spin`, then sleeps until woken, checking `ready` each time.
fn wait_until(spin: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    let mut spins = 0u32;
    while !ready() {
        spins += 1;
        // Reading the clock costs more than a spin: every 64th.
        if !spins.is_multiple_of(64) || start.elapsed() < spin {
            spin_loop();
        } else {
            std::thread::park();
        }
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
    use std::sync::atomic::Ordering;

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

    #[test]
    fn every_item_runs_once_over_many_jobs_from_several_callers() {
        // Jobs of every size back to back (workers join late, leave early, sleep and wake),
        // from three threads at once (they take turns).
        std::thread::scope(|scope| {
            for caller in 0..3 {
                scope.spawn(move || {
                    for job in 0..300 {
                        let items = 1 + (job * 7 + caller) % 97;
                        let runs: Vec<AtomicUsize> =
                            (0..items).map(|_| AtomicUsize::new(0)).collect();
                        for_each_range(items, |range| {
                            for i in range {
                                runs[i].fetch_add(1, Ordering::Relaxed);
                            }
                        });
                        assert!(runs.iter().all(|r| r.load(Ordering::Relaxed) == 1));
                        if job % 50 == 0 {
                            // Long enough for the workers to fall asleep.
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn a_job_started_inside_a_job_runs_inline() {
        let done = AtomicUsize::new(0);
        for_each_range(8, |outer| {
            for _ in outer {
                for_each_range(4, |inner| {
                    done.fetch_add(inner.len(), Ordering::Relaxed);
                });
            }
        });
        assert_eq!(done.into_inner(), 32);
    }
}
