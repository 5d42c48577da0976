//! The C ABI: libaio's functions, with libaio's names, signatures and return convention, over
//! nvaio's [`Context`]. The header is `aio/include/nvaio.h`.
//!
//! A C program written for libaio moves to nvaio by including `nvaio.h` instead of `libaio.h`,
//! linking `libnvaio` instead of `-laio`, and opening its device with [`nvaio_open`]. Like
//! libaio, every call returns a negative errno on failure (never -1 with `errno` set).
//!
//! # Contexts and threads
//!
//! An `io_context_t` is the address of the context's event ring, as with the kernel, so code
//! that casts it to `struct aio_ring *` and reaps events in user space keeps working. A global
//! registry maps that value to the [`Context`]. The kernel lets several threads use one
//! context; nvaio's [`Context`] takes `&mut self`, so each context sits behind a mutex taken for
//! one step of a call at a time (uncontended, that is one atomic operation). Threads sharing a
//! context therefore serialize; one context per thread is the fast way, as with the kernel.
//! `io_getevents` never holds the mutex while it waits: it makes non-blocking passes, each
//! taking the mutex, until it has `min_nr` events or the timeout has passed.
//!
//! # Matching the kernel
//! Arguments are read as fs/aio.c reads them, in its order, and `ci/conformance` compares every
//! entry point with the kernel's system calls: `maxevents` is unsigned, a timespec is not
//! validated (a negative one waits for ever), a signal ends a wait with -EINTR, `aio_key` is
//! stored exactly where the kernel stores it, io_cancel reads the key before it looks for the
//! context. Each function's documentation says how.
//!
//! # Panics
//!
//! No panic crosses into C: every entry point runs under `catch_unwind` and turns a panic into
//! -EIO. A context whose mutex was poisoned by such a panic may be half-updated, so it refuses
//! further use with -EIO; `io_destroy` unregisters it without draining it and leaks its memory
//! rather than hand bounce pages back while the device may still write them.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::ffi::{c_char, c_int, c_long, c_uint, CStr, CString};
use std::os::fd::RawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use crate::abi::{AioRingHeader, IoEvent, Iocb};
use crate::context::{Context, Errno};
use crate::wait::CompletionMode;

/// The opaque type `io_context_t` points to. C code never dereferences it as this type; ring
/// readers cast it to `struct aio_ring *`.
#[repr(C)]
pub struct IoContext {
    _opaque: [u8; 0],
}

/// libaio's `io_context_t`.
pub type IoContextT = *mut IoContext;

/// One registered context. `ctx` becomes `None` when `io_destroy` takes the context out, so a
/// thread still holding this slot sees -EINVAL from then on.
struct Slot {
    ctx: Mutex<Option<Context>>,
    /// Slots of the event ring, read from its header right after setup (before the application
    /// could write it). `io_submit` clamps `nr` to it, as fs/aio.c clamps to `ctx->nr_events`.
    ring_nr: u32,
}

/// The registry. Lookups take a read lock only on a thread's first call with a given context:
/// each thread keeps its last lookup in [`CACHE`], valid while [`GENERATION`] has not moved.
/// That makes the usual call cost one plain atomic load of a rarely written word instead of a
/// read-modify-write of the lock word that every thread shares, which is the cost a fixed
/// lock-free table would also have removed, without that table's fixed capacity or the need to
/// reclaim entries while another thread reads them (here `Arc` does that). A `BTreeMap`
/// because it can be built in a `static` without lazy initialisation.
static REGISTRY: RwLock<BTreeMap<u64, Arc<Slot>>> = RwLock::new(BTreeMap::new());

/// Bumped by every `io_destroy`, which invalidates every thread's cached lookup (the ring
/// address of a destroyed context may come back for a new one).
static GENERATION: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread's last lookup: (generation, id, slot).
    static CACHE: RefCell<Option<(u64, u64, Arc<Slot>)>> = const { RefCell::new(None) };
    /// The message of this thread's last failed `nvaio_open`, for [`nvaio_last_error`].
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

fn lookup(id: u64) -> Option<Arc<Slot>> {
    // Acquire pairs with the Release bump in io_destroy: a thread that sees the new generation
    // also sees the entry removed from the map.
    let generation = GENERATION.load(Ordering::Acquire);
    let cached = CACHE.with(|c| match &*c.borrow() {
        Some((g, i, slot)) if *g == generation && *i == id => Some(slot.clone()),
        _ => None,
    });
    if cached.is_some() {
        return cached;
    }
    let slot = REGISTRY.read().unwrap_or_else(|e| e.into_inner()).get(&id).cloned()?;
    CACHE.with(|c| *c.borrow_mut() = Some((generation, id, slot.clone())));
    Some(slot)
}

/// Locks a slot's context. Err(EINVAL) once destroyed, Err(EIO) if a panic poisoned it.
fn lock(slot: &Slot) -> Result<MutexGuard<'_, Option<Context>>, Errno> {
    let guard = slot.ctx.lock().map_err(|_| Errno(libc::EIO))?;
    if guard.is_none() {
        return Err(Errno(libc::EINVAL));
    }
    Ok(guard)
}

/// Runs an entry point's body, turning a panic into -EIO.
fn guarded(body: impl FnOnce() -> c_int) -> c_int {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(-libc::EIO)
}

fn neg(e: Errno) -> c_int {
    -e.0
}

fn set_last_error(msg: String) {
    // A message with a NUL in it is cut there rather than dropped.
    let msg = CString::new(msg).unwrap_or_else(|e| {
        let end = e.nul_position();
        let mut bytes = e.into_vec();
        bytes.truncate(end);
        CString::new(bytes).unwrap_or_default()
    });
    LAST_ERROR.with(|l| *l.borrow_mut() = Some(msg));
}

/// `io_setup`: creates a context for up to `maxevents` requests in flight and stores its id in
/// `*ctxp`, which must be 0 on entry.
///
/// As with the kernel, whose `nr_events` is unsigned and to which libaio passes the `int`
/// unchanged, `maxevents` is read as an unsigned count: a negative value is a very large one
/// (-1 is 4294967295: -EINVAL, too large for a ring; `INT_MIN` is 2^31, which the kernel's
/// doubling wraps to 0: -EAGAIN).
///
/// Returns 0, or: -EFAULT if `ctxp` is NULL; -EINVAL if `*ctxp` is not 0, `maxevents` is 0 or
/// its ring would be larger than the kernel allows; -EAGAIN if it exceeds
/// `/proc/sys/fs/aio-max-nr` (alone or with the process's other contexts); -ENOMEM.
///
/// # Safety
/// `ctxp` is NULL or points to a writable `io_context_t` (alignment is not required).
#[no_mangle]
pub unsafe extern "C" fn io_setup(maxevents: c_int, ctxp: *mut IoContextT) -> c_int {
    guarded(|| {
        // fs/aio.c: get_user(*ctxp) first (EFAULT), then a non-zero *ctxp or nr_events 0.
        if ctxp.is_null() {
            return -libc::EFAULT;
        }
        // SAFETY: non-null, and the caller promises it points to an io_context_t.
        let current = unsafe { ctxp.read_unaligned() };
        let nr_events = maxevents as u32;
        if !current.is_null() || nr_events == 0 {
            return -libc::EINVAL;
        }
        let ctx = match Context::setup(nr_events) {
            Ok(ctx) => ctx,
            Err(e) => return neg(e),
        };
        // SAFETY: checked non-null above; the caller promises it is writable.
        unsafe { ctxp.write_unaligned(register(ctx)) };
        0
    })
}

/// Makes `ctx` reachable through the C ABI and returns its `io_context_t`.
fn register(ctx: Context) -> IoContextT {
    let id = ctx.id();
    let ring_nr = ctx.ring_entries();
    let slot = Arc::new(Slot { ctx: Mutex::new(Some(ctx)), ring_nr });
    REGISTRY.write().unwrap_or_else(|e| e.into_inner()).insert(id, slot);
    id as IoContextT
}

/// `io_queue_init`: libaio's other name for [`io_setup`]; same arguments, same errors.
///
/// # Safety
/// As [`io_setup`].
#[no_mangle]
pub unsafe extern "C" fn io_queue_init(maxevents: c_int, ctxp: *mut IoContextT) -> c_int {
    // SAFETY: same contract as io_setup, forwarded unchanged.
    unsafe { io_setup(maxevents, ctxp) }
}

/// `io_destroy`: waits for the context's requests in flight (each bounded by the command
/// timeout), releases the context and its queue pairs. Later calls with `ctx` fail with
/// -EINVAL. Events not reaped are dropped.
///
/// Returns 0, or: -EINVAL if `ctx` is not a live context; -EIO if nvaio had panicked inside
/// this context (it is then unregistered and leaked, not drained).
#[no_mangle]
pub extern "C" fn io_destroy(ctx: IoContextT) -> c_int {
    guarded(|| {
        let id = ctx as u64;
        let slot = {
            let mut map = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
            let Some(slot) = map.remove(&id) else { return -libc::EINVAL };
            // Release, while the entry is already gone from the map: see `lookup`.
            GENERATION.fetch_add(1, Ordering::Release);
            slot
        };
        let (taken, poisoned) = match slot.ctx.lock() {
            Ok(mut g) => (g.take(), false),
            Err(e) => (e.into_inner().take(), true),
        };
        match taken {
            Some(ctx) if poisoned => {
                tracing::error!(
                    "io_destroy: context {id:#x} was left inconsistent by a panic; leaking it"
                );
                std::mem::forget(ctx);
                -libc::EIO
            }
            // Drained outside the slot's mutex: other threads holding the slot get -EINVAL
            // at once instead of waiting for the drain.
            Some(ctx) => {
                ctx.destroy();
                0
            }
            // Another io_destroy of the same context won the race for it.
            None => -libc::EINVAL,
        }
    })
}

/// `io_queue_release`: libaio's other name for [`io_destroy`]; same errors.
#[no_mangle]
pub extern "C" fn io_queue_release(ctx: IoContextT) -> c_int {
    io_destroy(ctx)
}

/// `io_submit`: queues `nr` requests and returns how many were queued. If the first request is
/// refused its error is returned; a later refusal ends the batch and the count so far is
/// returned. `nr` larger than the ring is clamped to the ring's size, as the kernel does. Errors
/// found after queueing arrive as events with a negative `res`.
///
/// Each iocb's `key` is set to 0 (the kernel's KIOCB_KEY) exactly when the kernel would store
/// it: fs/aio.c stores it once an iocb has passed the reserved-field and size checks, got a
/// request slot, and named an open descriptor (and, with IOCB_FLAG_RESFD, an eventfd). So every
/// queued iocb has key 0; a refused iocb has key 0 if it was refused after that point (opcode,
/// flags, access mode, buffer, offset...) and keeps its key if refused before it (reserved
/// field, negative size, -EAGAIN, bad descriptor or eventfd); iocbs after a refused one, or
/// after a NULL entry, are not touched.
///
/// Returns the number queued, or: -EINVAL if `nr` is negative, `ctx` is not a live context, or
/// the first iocb is invalid (opcode, reserved fields, offset); -EFAULT if `ios` is NULL with
/// `nr` > 0 or `ios[0]` is NULL (a NULL later on ends the batch: the count so far is returned),
/// and also for an iocb pointer that is not 8-byte aligned, which the kernel would accept (see
/// below); -EAGAIN when the context is full; -EBADF for a descriptor that is not open, or a
/// namespace opened without the access the request needs; -EOPNOTSUPP for unknown
/// `aio_rw_flags`; -EIO after a panic inside nvaio. An iocb on a descriptor nvaio does not own
/// goes to the kernel's AIO, and the kernel's io_submit errors come back for it (-EINVAL for
/// misaligned O_DIRECT, ...). `nr` 0 returns 0 without looking at `ios`.
///
/// Unlike the kernel, nvaio refuses an iocb at an address that is not 8-byte aligned (as a
/// fault): the event's `obj` and io_cancel identify a request by its iocb's address, and the
/// context reads iocbs in place.
///
/// # Safety
/// `ios` points to `nr` iocb pointers (alignment is not required), each to a `struct iocb` that
/// stays valid and unmodified until its event has been reaped, and whose buffers stay valid that
/// long, exactly as with the kernel.
#[no_mangle]
pub unsafe extern "C" fn io_submit(ctx: IoContextT, nr: c_long, ios: *mut *mut Iocb) -> c_int {
    guarded(|| {
        // fs/aio.c's order: nr < 0, then the context, then the entries one by one.
        if nr < 0 {
            return -libc::EINVAL;
        }
        let Some(slot) = lookup(ctx as u64) else { return -libc::EINVAL };
        if nr == 0 {
            return 0;
        }
        if ios.is_null() {
            return -libc::EFAULT;
        }
        let nr = (nr as u64).min(u64::from(slot.ring_nr)) as usize;
        let mut guard = match lock(&slot) {
            Ok(g) => g,
            Err(e) => return neg(e),
        };
        let Some(context) = guard.as_mut() else { return -libc::EINVAL };
        // At most ring_nr (a u32 below 2^23): fits.
        let count = |queued: usize, e: Errno| if queued > 0 { queued as c_int } else { neg(e) };
        let mut queued = 0;
        // The iocbs go to the context a chunk at a time: each chunk's keys are stored before
        // the context can complete any of its requests (as the kernel stores them before
        // starting the I/O), and the old keys are kept here, on the stack, to put back where
        // the kernel would not have written.
        while queued < nr {
            let mut ptrs = [std::ptr::null::<Iocb>(); SUBMIT_CHUNK];
            let mut keys = [0u32; SUBMIT_CHUNK];
            let mut len = 0;
            let mut fault = false;
            while len < SUBMIT_CHUNK && queued + len < nr {
                // SAFETY: queued + len < nr, and the caller promises nr readable entries;
                // read_unaligned because the array need not be aligned.
                let p = unsafe { ios.add(queued + len).read_unaligned() };
                if p.is_null() || !p.is_aligned() {
                    // The kernel's copy_from_user faults on NULL: -EFAULT for this entry.
                    fault = true;
                    break;
                }
                // SAFETY: non-null and aligned; the caller promises a writable struct iocb.
                unsafe {
                    let key = std::ptr::addr_of_mut!((*p).aio_key);
                    keys[len] = key.read();
                    key.write(0);
                }
                ptrs[len] = p;
                len += 1;
            }
            if len == 0 {
                return count(queued, Errno(libc::EFAULT));
            }
            // SAFETY: the first `len` entries are non-null, aligned pointers to iocbs the caller
            // keeps valid and unmodified during the call; `*const Iocb` and `&Iocb` have the same
            // layout. The context records each iocb's address as the event's `obj`, which is
            // why the caller's own iocbs are passed, not copies.
            let iocbs: &[&Iocb] = unsafe { std::slice::from_raw_parts(ptrs.as_ptr().cast(), len) };
            let (n, refused) = submit_chunk(context, iocbs);
            queued += n;
            if let Some(e) = refused {
                let restore_refused = !reaches_key_store(iocbs[n], e);
                // In reverse, so that an iocb listed twice ends with the key it had before its
                // first listing.
                for k in (n + 1..len).rev().chain(restore_refused.then_some(n)) {
                    // SAFETY: an aligned, writable iocb of this chunk (see above).
                    unsafe { std::ptr::addr_of_mut!((*ptrs[k].cast_mut()).aio_key).write(keys[k]) };
                }
                return count(queued, e);
            }
            if fault {
                // The entry after this chunk is NULL: the kernel stops there.
                return queued as c_int;
            }
        }
        queued as c_int
    })
}

/// Iocbs [`io_submit`] hands to the context per call (and whose keys it keeps on the stack).
const SUBMIT_CHUNK: usize = 64;

/// Submits `iocbs` and returns how many were queued and, if one was refused, why.
fn submit_chunk(context: &mut Context, iocbs: &[&Iocb]) -> (usize, Option<Errno>) {
    // SAFETY: io_submit's caller takes on io_submit(2)'s contract for the buffers, which is
    // submit_partial's.
    unsafe { context.submit_partial(iocbs) }
}

/// Whether the kernel, refusing `iocb` with `e`, had already stored its `aio_key`. In
/// io_submit_one() and __io_submit_one() the order is: reserved field and size checks (EINVAL),
/// a request slot (EAGAIN), fget of the descriptor (EBADF), the IOCB_FLAG_RESFD eventfd
/// (EBADF, EINVAL), then the key is stored, then everything else is checked. The context checks
/// in the same order, so the iocb's own fields tell which side of the store a refusal was on.
fn reaches_key_store(iocb: &Iocb, e: Errno) -> bool {
    if iocb.aio_reserved2 != 0 || (iocb.aio_nbytes as i64) < 0 || e.0 == libc::EAGAIN {
        return false;
    }
    // The context's own test: a namespace of nvaio's, or any descriptor open in this process
    // (then the kernel's AIO takes the request).
    let fd = iocb.aio_fildes as i32;
    if !crate::file::is_nvaio_fd(fd) && !crate::kernel::is_open_fd(fd) {
        return false;
    }
    iocb.aio_flags & crate::abi::IOCB_FLAG_RESFD == 0
        || crate::kernel::check_eventfd(iocb.aio_resfd as i32).is_ok()
}

/// How `io_getevents` waits between passes. In polled mode, passes with requests in flight spin
/// at first (an NVMe completion is microseconds away), then yield, then sleep briefly, so that a
/// long wait costs little CPU; with nothing in flight only another thread's submission can
/// produce an event, so it sleeps from the start, longer the longer the wait. In interrupt and
/// hybrid modes it sleeps on the context's notification descriptor instead, which an interrupt
/// (or a submission that completed at once) makes readable; hybrid mode spins first, as polled
/// mode does. Each pass resets the notifiers before it looks, so a completion after the look
/// leaves the descriptor readable and the sleep returns at once: no wake-up is lost. Sleeps on it
/// are bounded by [`Backoff::IDLE_MAX`] all the same, so that request deadlines keep being
/// checked.
///
/// # Signals
/// The kernel's io_getevents sleeps interruptibly: a signal whose handler runs ends the wait, and
/// the call returns the events it has, or -EINTR if none, whatever SA_RESTART says. nvaio does
/// the same in user space. Past the first spin, the wait holds back the thread's signals (all
/// but those a fault raises synchronously: SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP, SIGSYS) and
/// does all its sleeping and yielding in `ppoll` with the thread's own mask: a pending signal's
/// handler runs there and `ppoll` fails with EINTR. A signal that arrives while the wait is not
/// in `ppoll` stays pending until the next one, so none goes unnoticed, not even in a wait with
/// no end. The thread's mask is restored before the call returns (which delivers anything still
/// pending). The exception is the first spin, at most [`Backoff::SPIN`] with requests in flight:
/// signals are not held back then, so one arriving in that window runs its handler without
/// ending the wait, which then ends with the requests (each has a deadline).
struct Backoff {
    start: Option<Instant>,
    idle_sleep: Duration,
    /// The thread's signal mask from before the wait held signals back.
    saved_mask: Option<libc::sigset_t>,
}

/// A signal handler ran while [`Backoff`] waited.
struct Interrupted;

/// Signals raised by a fault in the thread itself: never held back, they must reach their
/// handler at once (the kernel kills a thread that faults with them blocked).
const SYNCHRONOUS_SIGNALS: [c_int; 6] =
    [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE, libc::SIGTRAP, libc::SIGSYS];

impl Backoff {
    /// Spin this long after the first empty pass.
    const SPIN: Duration = Duration::from_micros(200);
    /// Then yield until this much time has passed, then sleep [`Self::BUSY_SLEEP`] per pass.
    const YIELD: Duration = Duration::from_millis(2);
    const BUSY_SLEEP: Duration = Duration::from_micros(50);
    /// With nothing in flight: sleeps start here and double up to [`Self::IDLE_MAX`].
    const IDLE_MIN: Duration = Duration::from_micros(100);
    const IDLE_MAX: Duration = Duration::from_millis(10);

    fn new() -> Backoff {
        Backoff { start: None, idle_sleep: Self::IDLE_MIN, saved_mask: None }
    }

    /// After progress: spin and sleep briefly again. Signals stay held back.
    fn restart(&mut self) {
        self.start = None;
        self.idle_sleep = Self::IDLE_MIN;
    }

    /// Waits a little; never past `deadline`. `notify` is the context's notification descriptor
    /// and whether to spin before sleeping on it (hybrid mode). Err if a signal handler ran
    /// meanwhile.
    fn wait(
        &mut self,
        in_flight: bool,
        notify: Option<(RawFd, bool)>,
        now: Instant,
        deadline: Option<Instant>,
    ) -> Result<(), Interrupted> {
        let start = *self.start.get_or_insert(now);
        let waited = now - start;
        let spin = notify.is_none_or(|(_, hybrid)| hybrid);
        if in_flight && spin && waited < Self::SPIN {
            std::hint::spin_loop();
            return Ok(());
        }
        let left = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(now));
        if let Some((fd, _)) = notify {
            return self.sleep_on(Some(fd), Self::IDLE_MAX.min(left));
        }
        let nap = if !in_flight {
            let nap = self.idle_sleep;
            self.idle_sleep = (nap * 2).min(Self::IDLE_MAX);
            nap
        } else {
            self.idle_sleep = Self::IDLE_MIN;
            if waited < Self::YIELD {
                std::thread::yield_now();
                Duration::ZERO
            } else {
                Self::BUSY_SLEEP
            }
        };
        self.sleep_on(None, nap.min(left))
    }

    /// Lets in the signals held back so far, without sleeping. Err if a handler ran.
    fn let_signals_in(&mut self) -> Result<(), Interrupted> {
        if self.saved_mask.is_none() {
            return Ok(());
        }
        self.sleep_on(None, Duration::ZERO)
    }

    /// Sleeps for `d` (zero: not at all), or until `fd` is readable, with the thread's own
    /// signal mask, holding signals back from now on outside such sleeps. Err if a signal
    /// handler ran.
    fn sleep_on(&mut self, fd: Option<RawFd>, d: Duration) -> Result<(), Interrupted> {
        let mask = self.hold_signals();
        let ts = libc::timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        };
        let mut pfd = libc::pollfd { fd: fd.unwrap_or(-1), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd (or none), the timeout and the mask are locals. A descriptor closed
        // meanwhile by another thread's io_destroy only makes ppoll return early; the next pass
        // then finds the context gone.
        let r = unsafe { libc::ppoll(&mut pfd, libc::nfds_t::from(fd.is_some()), &ts, &mask) };
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            return Err(Interrupted);
        }
        Ok(())
    }

    /// Blocks the thread's signals but the synchronous ones, once; returns the mask from before.
    fn hold_signals(&mut self) -> libc::sigset_t {
        if let Some(mask) = self.saved_mask {
            return mask;
        }
        // SAFETY: sigset_t is plain data, initialised by sigfillset and pthread_sigmask; the
        // calls take pointers to locals.
        let old = unsafe {
            let mut held: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut held);
            for sig in SYNCHRONOUS_SIGNALS {
                libc::sigdelset(&mut held, sig);
            }
            let mut old: libc::sigset_t = std::mem::zeroed();
            // Cannot fail with these arguments; should it, `old` is the mask as it was, read
            // back, and ppoll keeps to it.
            if libc::pthread_sigmask(libc::SIG_BLOCK, &held, &mut old) != 0 {
                libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut old);
            }
            old
        };
        self.saved_mask = Some(old);
        old
    }
}

impl Drop for Backoff {
    fn drop(&mut self) {
        if let Some(mask) = self.saved_mask.take() {
            // SAFETY: restores the thread's mask from a local copy.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &mask, std::ptr::null_mut()) };
        }
    }
}

/// How long `io_getevents` may wait, from its timeout as fs/aio.c reads it: without any check.
/// ktime_set() makes `tv_sec * 1e9 + tv_nsec` nanoseconds of it (a `tv_sec` from KTIME_SEC_MAX
/// on is KTIME_MAX, no limit); 0 is one look without waiting; a negative relative time, added to
/// the clock by hrtimer's ktime_add_safe(), saturates to the end of time, as does a sum that
/// overflows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Limit {
    NoWait,
    Until(Instant),
    Forever,
}

fn limit_of(timeout: Option<libc::timespec>, now: Instant) -> Limit {
    const NSEC_PER_SEC: i64 = 1_000_000_000;
    const KTIME_SEC_MAX: i64 = i64::MAX / NSEC_PER_SEC;
    let Some(ts) = timeout else { return Limit::Forever };
    let ns = if ts.tv_sec >= KTIME_SEC_MAX {
        i64::MAX
    } else {
        // The kernel's arithmetic, overflow included.
        ts.tv_sec.wrapping_mul(NSEC_PER_SEC).wrapping_add(ts.tv_nsec)
    };
    match ns {
        0 => Limit::NoWait,
        ns if ns < 0 || ns == i64::MAX => Limit::Forever,
        ns => now.checked_add(Duration::from_nanos(ns as u64)).map_or(Limit::Forever, Limit::Until),
    }
}

/// Whether the event ring at `id` holds events. The caller holds the context's mutex, so the
/// ring is mapped.
fn ring_holds_events(id: u64, nr: u32) -> bool {
    let header = id as *const AioRingHeader;
    // SAFETY: a live context's ring header, aligned (page-aligned ring); head and tail are read
    // volatile because the application may write head at any time.
    let (head, tail) = unsafe {
        (
            std::ptr::addr_of!((*header).head).read_volatile(),
            std::ptr::addr_of!((*header).tail).read_volatile(),
        )
    };
    nr != 0 && head % nr != tail % nr
}

/// `io_getevents`: waits until at least `min_nr` events are available or the timeout has passed,
/// and moves up to `nr` of them into `events`. With `nr` 0 the call only advances the context:
/// nvaio polls its queues and posts finished requests to the ring, which is how a program that
/// reaps the ring in user space gets it filled (with the kernel, interrupts fill it and the call
/// does nothing).
///
/// `timeout` is relative and, as with the kernel, not validated (see [`Limit`]): it is taken as
/// `tv_sec * 1e9 + tv_nsec` nanoseconds. NULL waits without limit; a total of 0 does not wait
/// ({0, 0}, and {1, -1000000000} too); a negative total waits without limit ({0, -1} and
/// {-1, 0}: until a signal); {0, 1000000000} waits one second and {1, -999000000} one
/// millisecond. `min_nr` 0 returns after one pass whatever the timeout.
///
/// A signal whose handler runs during the wait ends it, as with the kernel: the call returns the
/// events already stored, or -EINTR if none, whatever SA_RESTART says (see [`Backoff`] for how,
/// and for its one window of 200 µs).
///
/// Returns the number of events stored (fewer than `min_nr` if the timeout passed or a signal
/// came), or: -EINVAL if `ctx` is not a live context, `min_nr` or `nr` is negative, or
/// `min_nr` > `nr`; -EINTR; -EFAULT if `events` is NULL with `nr` > 0, once there is an event
/// to store (it stays in the ring; until then the call waits, or returns 0, as usual), as the
/// kernel's copy to NULL fails; -EIO after a panic inside nvaio. If the context is destroyed by
/// another thread during the wait, the events already stored are returned, or -EINVAL if none.
///
/// # Safety
/// `events` is NULL or points to `nr` writable `struct io_event`s (alignment is not required);
/// `timeout` is NULL or points to a `struct timespec`.
#[no_mangle]
pub unsafe extern "C" fn io_getevents(
    ctx: IoContextT,
    min_nr: c_long,
    nr: c_long,
    events: *mut IoEvent,
    timeout: *mut libc::timespec,
) -> c_int {
    guarded(|| {
        let Some(slot) = lookup(ctx as u64) else { return -libc::EINVAL };
        if min_nr < 0 || nr < 0 || min_nr > nr {
            return -libc::EINVAL;
        }
        // SAFETY: non-null; the caller promises a struct timespec.
        let ts = (!timeout.is_null()).then(|| unsafe { timeout.read_unaligned() });
        let limit = limit_of(ts, Instant::now());
        let deadline = match limit {
            Limit::Until(d) => Some(d),
            Limit::NoWait | Limit::Forever => None,
        };
        // Nowhere to store events: take none, and fail once one is there (fs/aio.c's
        // copy_to_user fails, leaving it in the ring).
        let no_room = events.is_null() && nr > 0;
        // Events accumulate over passes, as in the kernel, so nr may exceed the ring's size; the
        // bound only keeps the count representable in the int returned.
        let nr = nr.min(c_int::MAX as c_long) as usize;
        let min_nr = (min_nr as usize).min(nr);

        // Events pass through this buffer, then are copied bytewise into the caller's array:
        // no reference to the caller's memory is formed, and it need not be aligned.
        let mut batch = [IoEvent::default(); 64];
        let mut got = 0;
        let mut backoff = Backoff::new();
        loop {
            let want = if no_room { 0 } else { (nr - got).min(batch.len()) };
            let pass = {
                let mut guard = match lock(&slot) {
                    Ok(g) => g,
                    Err(e) => return if got > 0 { got as c_int } else { neg(e) },
                };
                let Some(context) = guard.as_mut() else { return -libc::EINVAL };
                // Asking for at least one event (when more are needed) lets the context run
                // its periodic deadline and health checks on an empty pass; Some(ZERO) keeps
                // the pass from waiting, so the mutex is never held across a wait.
                let need = usize::from(got < min_nr).min(want);
                context.get_events(need, &mut batch[..want], Some(Duration::ZERO)).map(|n| {
                    let fault = no_room && ring_holds_events(ctx as u64, slot.ring_nr);
                    let notify = context
                        .notification_fd()
                        .map(|fd| (fd, context.mode() == CompletionMode::Hybrid));
                    (n, context.in_flight() > 0, notify, fault)
                })
            };
            let (n, in_flight, notify, fault) = match pass {
                Ok(p) => p,
                Err(e) => return if got > 0 { got as c_int } else { neg(e) },
            };
            if fault {
                return -libc::EFAULT;
            }
            if n > 0 {
                // SAFETY: got + n <= nr, and the caller promises nr writable io_events at
                // `events`; the source is our own buffer, so they do not overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        batch.as_ptr().cast::<u8>(),
                        events.add(got).cast::<u8>(),
                        n * std::mem::size_of::<IoEvent>(),
                    )
                };
                got += n;
                // A full batch means more may be ready: take them before deciding anything.
                if n == want && got < nr {
                    continue;
                }
            }
            if got >= min_nr || limit == Limit::NoWait {
                return got as c_int;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                // As the kernel: nothing, and a signal came meanwhile, is -EINTR.
                if got == 0 && backoff.let_signals_in().is_err() {
                    return -libc::EINTR;
                }
                return got as c_int;
            }
            if n > 0 {
                // Progress: keep polling eagerly.
                backoff.restart();
            }
            if backoff.wait(in_flight, notify, now, deadline).is_err() {
                return if got > 0 { got as c_int } else { -libc::EINTR };
            }
        }
    })
}

/// `io_cancel`: starts cancelling the request submitted with `iocb`. As with Linux since 4.19,
/// `evt` is not written: the outcome always arrives as an event through the ring.
///
/// The checks come in fs/aio.c's order: the iocb's key is read first (-EFAULT for NULL) and must
/// be 0, the KIOCB_KEY io_submit stores (-EINVAL otherwise), and only then is the context looked
/// up, so a NULL `iocb` is -EFAULT even on a context that does not exist.
///
/// Returns -EINPROGRESS when cancellation has started (the usual outcome, not a failure), or:
/// -EFAULT if `iocb` is NULL; -EINVAL if `iocb->key` is not 0, `ctx` is not a live context, no
/// request of this context was submitted with `iocb` or it has already completed, or it went to
/// the kernel's AIO, which cannot cancel file or block I/O; -EIO after a panic inside nvaio. For
/// a request on a kernel descriptor the kernel's answer is returned as is.
///
/// # Safety
/// `iocb` is NULL or points to a readable `struct iocb` (alignment is not required).
#[no_mangle]
pub unsafe extern "C" fn io_cancel(ctx: IoContextT, iocb: *mut Iocb, evt: *mut IoEvent) -> c_int {
    let _ = evt;
    guarded(|| {
        if iocb.is_null() {
            return -libc::EFAULT;
        }
        // SAFETY: non-null; the caller promises a readable struct iocb. Read without forming a
        // reference: the iocb may be in use by the context.
        let key = unsafe { std::ptr::addr_of!((*iocb).aio_key).read_unaligned() };
        if key != 0 {
            return -libc::EINVAL;
        }
        let Some(slot) = lookup(ctx as u64) else { return -libc::EINVAL };
        let mut guard = match lock(&slot) {
            Ok(g) => g,
            Err(e) => return neg(e),
        };
        let Some(context) = guard.as_mut() else { return -libc::EINVAL };
        match context.cancel(iocb) {
            // Context::cancel always reports a started cancellation as EINPROGRESS; should it
            // ever finish one synchronously, 0 is what the kernel used to return for that.
            Ok(()) => 0,
            Err(e) => neg(e),
        }
    })
}

/// `nvaio_register_buffer`: registers `len` bytes at `buf` with context `ctx` for zero-copy
/// I/O: reads and writes whose buffer lies inside it skip the bounce copy. Returns 0, or
/// -EINVAL (not a live context; empty, wrapping or overlapping range), -ENOMEM (the IOMMU
/// mapping failed: locked-memory limit or IOVA space), -EIO after a panic inside nvaio.
///
/// # Safety
/// The memory must stay allocated until `nvaio_unregister_buffer` or `io_destroy`.
#[no_mangle]
pub unsafe extern "C" fn nvaio_register_buffer(
    ctx: IoContextT,
    buf: *mut c_void,
    len: usize,
) -> c_int {
    with_context(ctx, |context| {
        // SAFETY: the caller's promise above is register_buffer's contract.
        unsafe { context.register_buffer(buf.cast(), len) }
    })
}

/// `nvaio_unregister_buffer`: undoes `nvaio_register_buffer` for the buffer registered at
/// `buf`. Returns 0, or -EINVAL (not a live context, nothing registered there), -EBUSY (I/O in
/// flight on the context), -EIO after a panic inside nvaio.
#[no_mangle]
pub extern "C" fn nvaio_unregister_buffer(ctx: IoContextT, buf: *mut c_void) -> c_int {
    with_context(ctx, |context| context.unregister_buffer(buf.cast()))
}

/// Runs `f` on the live context `ctx` under its lock: 0 for `Ok`, the negative errno
/// otherwise; -EINVAL if `ctx` is not a live context, -EIO after a panic.
fn with_context(ctx: IoContextT, f: impl FnOnce(&mut Context) -> Result<(), Errno>) -> c_int {
    guarded(|| {
        let Some(slot) = lookup(ctx as u64) else { return -libc::EINVAL };
        let mut guard = match lock(&slot) {
            Ok(g) => g,
            Err(e) => return neg(e),
        };
        let Some(context) = guard.as_mut() else { return -libc::EINVAL };
        match f(context) {
            Ok(()) => 0,
            Err(e) => neg(e),
        }
    })
}

/// `nvaio_open`: opens namespace `nsid` of the NVMe controller at PCI address `pci_addr`
/// (`0000:00:10.0`, or `00:10.0`), which must be bound to vfio-pci, with `O_RDONLY`,
/// `O_WRONLY` or `O_RDWR`. Returns a descriptor for iocbs' `aio_fildes`, or a negative errno,
/// and then [`nvaio_last_error`] says what went wrong and how to fix it:
/// -EFAULT if `pci_addr` is NULL; -EINVAL for a name that is not UTF-8 or bad flags; -ENODEV
/// if the controller cannot be opened through VFIO (not bound to vfio-pci, no permission, no
/// IOMMU group, locked-memory limit); -EIO if it fails to come up; -ENXIO if it has no usable
/// namespace `nsid`; -EMFILE (or what eventfd said) if no descriptor is left; -EIO after a
/// panic inside nvaio.
///
/// # Safety
/// `pci_addr` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn nvaio_open(pci_addr: *const c_char, nsid: c_uint, flags: c_int) -> c_int {
    guarded(|| {
        if pci_addr.is_null() {
            set_last_error("nvaio_open: the PCI address is NULL".into());
            return -libc::EFAULT;
        }
        // SAFETY: non-null; the caller promises a NUL-terminated string.
        let addr = unsafe { CStr::from_ptr(pci_addr) };
        let Ok(addr) = addr.to_str() else {
            set_last_error(format!("nvaio_open: the PCI address {addr:?} is not UTF-8"));
            return -libc::EINVAL;
        };
        match crate::file::open(addr, nsid, flags) {
            Ok(fd) => fd,
            Err(e) => {
                // The whole chain: the outer message names the step, the sources the cause.
                let mut msg = format!("nvaio_open({addr}, nsid {nsid}): {e}");
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    msg.push_str(&format!(": {s}"));
                    source = s.source();
                }
                set_last_error(msg);
                -e.errno()
            }
        }
    })
}

/// `nvaio_close`: closes a descriptor from [`nvaio_open`]. Requests already submitted on it
/// still complete. Returns 0, or -EBADF if nvaio does not own `fd`, -EIO after a panic.
#[no_mangle]
pub extern "C" fn nvaio_close(fd: c_int) -> c_int {
    guarded(|| match crate::file::close(fd) {
        Ok(()) => 0,
        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
    })
}

/// `nvaio_last_error`: a description of this thread's last failed `nvaio_open`, naming the
/// cause and, where nvaio knows it, the fix; an empty string if there was none. The pointer
/// stays valid until this thread's next failing `nvaio_open` or the thread's end. Never NULL.
#[no_mangle]
pub extern "C" fn nvaio_last_error() -> *const c_char {
    catch_unwind(|| LAST_ERROR.with(|l| l.borrow().as_ref().map_or(c"".as_ptr(), |m| m.as_ptr())))
        .unwrap_or(c"".as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr::{null_mut, NonNull};

    fn setup(n: c_int) -> IoContextT {
        let mut ctx: IoContextT = null_mut();
        // SAFETY: a valid pointer to a local.
        assert_eq!(unsafe { io_setup(n, &mut ctx) }, 0);
        assert!(!ctx.is_null());
        ctx
    }

    fn ts(sec: i64, nsec: i64) -> libc::timespec {
        libc::timespec { tv_sec: sec, tv_nsec: nsec }
    }

    #[test]
    fn setup_arguments() {
        let mut ctx: IoContextT = null_mut();
        // SAFETY: valid pointers to locals, or NULL, which io_setup checks.
        unsafe {
            assert_eq!(io_setup(0, &mut ctx), -libc::EINVAL);
            assert_eq!(io_setup(-5, &mut ctx), -libc::EINVAL);
            assert_eq!(io_setup(8, std::ptr::null_mut()), -libc::EFAULT);
            assert_eq!(io_setup(0, std::ptr::null_mut()), -libc::EFAULT, "ctxp is read first");
            let mut used = NonNull::<IoContext>::dangling().as_ptr();
            assert_eq!(io_setup(8, &mut used), -libc::EINVAL, "*ctxp must be 0");
            // maxevents is the kernel's unsigned nr_events: 2^31 doubles to 0 (EAGAIN), -1 is
            // far too large a ring (EINVAL).
            assert_eq!(io_setup(c_int::MIN, &mut ctx), -libc::EAGAIN);
            assert_eq!(io_setup(-1, &mut ctx), -libc::EINVAL);
        }
        assert!(ctx.is_null(), "a failed io_setup leaves *ctxp alone");
        // *ctxp need not be aligned.
        let mut bytes = [0u8; 16];
        let ctxp = bytes[1..].as_mut_ptr().cast::<IoContextT>();
        // SAFETY: 8 writable bytes at ctxp, zero.
        let ctx = unsafe {
            assert_eq!(io_setup(4, ctxp), 0);
            ctxp.read_unaligned()
        };
        assert_eq!(io_destroy(ctx), 0);
    }

    #[test]
    fn setup_destroy_round_trip() {
        let ctx = setup(16);
        // The id is the ring: its header is readable through it, as libaio-style code does.
        // SAFETY: a live context's ring, read-only.
        let header = unsafe { (ctx as *const AioRingHeader).read() };
        assert_eq!(header.magic, crate::abi::AIO_RING_MAGIC);
        assert!(header.nr > 16);
        assert_eq!(header.head, header.tail);
        assert_eq!(io_destroy(ctx), 0);
        assert_eq!(io_destroy(ctx), -libc::EINVAL, "a destroyed context is gone");
        let mut ev = [IoEvent::default(); 1];
        // SAFETY: valid pointers; the context is unknown, which is checked first.
        unsafe {
            assert_eq!(io_submit(ctx, 0, null_mut()), -libc::EINVAL);
            assert_eq!(io_getevents(ctx, 0, 1, ev.as_mut_ptr(), &mut ts(0, 0)), -libc::EINVAL);
        }
        let ctx = setup(4);
        assert_eq!(io_queue_release(ctx), 0);
        let mut ctx: IoContextT = null_mut();
        // SAFETY: valid pointer to a local.
        assert_eq!(unsafe { io_queue_init(4, &mut ctx) }, 0);
        assert_eq!(io_destroy(ctx), 0);
    }

    #[test]
    fn unknown_context() {
        let bogus = 0x1234_5000 as IoContextT;
        let mut iocb = Iocb::default();
        let mut list = [&mut iocb as *mut Iocb];
        let mut ev = [IoEvent::default(); 1];
        // SAFETY: valid pointers to locals; the context is unknown, which every call checks.
        unsafe {
            assert_eq!(io_submit(bogus, 1, list.as_mut_ptr()), -libc::EINVAL);
            assert_eq!(io_submit(bogus, 0, null_mut()), -libc::EINVAL);
            assert_eq!(io_submit(bogus, -1, null_mut()), -libc::EINVAL);
            assert_eq!(io_getevents(bogus, 0, 1, ev.as_mut_ptr(), null_mut()), -libc::EINVAL);
            assert_eq!(io_getevents(bogus, -1, 1, ev.as_mut_ptr(), null_mut()), -libc::EINVAL);
            assert_eq!(io_cancel(bogus, &mut iocb, ev.as_mut_ptr()), -libc::EINVAL);
            // io_cancel reads the key before it looks for the context.
            assert_eq!(io_cancel(bogus, null_mut(), ev.as_mut_ptr()), -libc::EFAULT);
        }
        assert_eq!(iocb.aio_key, 0, "nothing was submitted");
        assert_eq!(io_destroy(bogus), -libc::EINVAL);
        assert_eq!(io_destroy(null_mut()), -libc::EINVAL);
    }

    #[test]
    fn submit_arguments() {
        let ctx = setup(4);
        let mut iocb = Iocb::pread(-1, null_mut(), 512, 0);
        iocb.aio_key = 77;
        let mut list = [&mut iocb as *mut Iocb];
        // SAFETY: valid pointers to locals or NULL, which io_submit checks.
        unsafe {
            assert_eq!(io_submit(ctx, -1, list.as_mut_ptr()), -libc::EINVAL);
            assert_eq!(io_submit(ctx, 0, null_mut()), 0);
            assert_eq!(io_submit(ctx, 1, null_mut()), -libc::EFAULT);
            let mut nulls = [null_mut::<Iocb>(); 2];
            assert_eq!(io_submit(ctx, 2, nulls.as_mut_ptr()), -libc::EFAULT);
            // Descriptor -1 is nobody's: refused by fget, before the kernel stores the key.
            assert_eq!(io_submit(ctx, 1, list.as_mut_ptr()), -libc::EBADF);
        }
        assert_eq!(iocb.aio_key, 77);
        assert_eq!(io_destroy(ctx), 0);
    }

    /// Submits `iocbs` (by index into `all`, NULL for None) and returns the result and every
    /// iocb's key afterwards.
    fn submit_keys(ctx: IoContextT, all: &mut [Iocb], list: &[Option<usize>]) -> (c_int, Vec<u32>) {
        let base = all.as_mut_ptr();
        // SAFETY: indexes into `all`.
        let mut ptrs: Vec<*mut Iocb> =
            list.iter().map(|i| i.map_or(null_mut(), |i| unsafe { base.add(i) })).collect();
        // SAFETY: valid iocbs (or NULL) whose buffers outlive the requests (the caller reaps).
        let r = unsafe { io_submit(ctx, ptrs.len() as c_long, ptrs.as_mut_ptr()) };
        (r, all.iter().map(|i| i.aio_key).collect())
    }

    /// Reaps `n` events.
    fn reap(ctx: IoContextT, n: usize) -> Vec<IoEvent> {
        let mut ev = vec![IoEvent::default(); n.max(1)];
        // SAFETY: room for n events.
        let got =
            unsafe { io_getevents(ctx, n as c_long, n as c_long, ev.as_mut_ptr(), &mut ts(5, 0)) };
        assert_eq!(got, n as c_int);
        ev.truncate(n);
        ev
    }

    #[test]
    fn submit_stores_the_key_where_the_kernel_does() {
        let (_emu, fd) = emulated();
        let ctx = setup(1);
        let mut buf = vec![0u8; 4096];
        let b = buf.as_mut_ptr();
        let efd = {
            // SAFETY: plain eventfd creation.
            unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) }
        };
        let keyed = |iocb: Iocb, key: u32| Iocb { aio_key: key, ..iocb };
        let rd = |key| keyed(Iocb::pread(fd, b, 512, 0), key);
        let mut all = vec![
            rd(0x10),
            rd(0x11),
            Iocb { aio_reserved2: 1, ..rd(0x12) },
            Iocb { aio_lio_opcode: 42, ..rd(0x13) },
            Iocb { aio_flags: crate::abi::IOCB_FLAG_RESFD, aio_resfd: fd as u32, ..rd(0x14) },
            Iocb { aio_flags: crate::abi::IOCB_FLAG_RESFD, aio_resfd: efd as u32, ..rd(0x15) },
            keyed(Iocb::pread(-1, b, 512, 0), 0x16),
            Iocb { aio_nbytes: 1 << 63, ..rd(0x17) },
            Iocb { aio_rw_flags: 0x100, ..rd(0x18) },
        ];
        // A queued iocb gets key 0; the rest of a batch after a refusal is not touched; an iocb
        // refused before fget (reserved field) keeps its key.
        let (r, keys) = submit_keys(ctx, &mut all, &[Some(0), Some(2), Some(1)]);
        assert_eq!(r, 1);
        assert_eq!(keys[..3], [0, 0x11, 0x12]);
        reap(ctx, 1);
        // Refusals after fget and the eventfd check store the key; those before do not.
        let cases = [
            (3, -libc::EINVAL, 0),
            (4, -libc::EINVAL, 0x14),
            (6, -libc::EBADF, 0x16),
            (7, -libc::EINVAL, 0x17),
            (8, -libc::EOPNOTSUPP, 0),
        ];
        for (i, err, key) in cases {
            let (r, keys) = submit_keys(ctx, &mut all, &[Some(i)]);
            assert_eq!((r, keys[i]), (err, key), "iocb {i}");
        }
        // A full context is refused before fget: -EAGAIN keeps the key. Context of 1 request:
        // fill it (a valid eventfd is fine too), then one more.
        let mut queued = 0;
        loop {
            all[5].aio_key = 0x15;
            let (r, keys) = submit_keys(ctx, &mut all, &[Some(5)]);
            if r == 1 {
                assert_eq!(keys[5], 0);
                queued += 1;
                assert!(queued < 1000, "the context never filled");
                continue;
            }
            assert_eq!((r, keys[5]), (-libc::EAGAIN, 0x15));
            break;
        }
        reap(ctx, queued);
        // A NULL entry ends the batch: the count so far, later entries untouched.
        all[0].aio_key = 0x20;
        all[1].aio_key = 0x21;
        let (r, keys) = submit_keys(ctx, &mut all, &[Some(0), None, Some(1)]);
        assert_eq!((r, keys[0], keys[1]), (1, 0, 0x21));
        reap(ctx, 1);
        // The same iocb twice, then a refusal: it ends with key 0 (it was queued).
        all[0].aio_key = 0x30;
        let (r, keys) = submit_keys(ctx, &mut all, &[Some(0), Some(2), Some(0)]);
        assert_eq!((r, keys[0]), (1, 0));
        reap(ctx, 1);
        // A misaligned array of pointers is read as the kernel reads it.
        let mut raw = [0u8; 8 * 2 + 1];
        let ptrs = raw[1..].as_mut_ptr().cast::<*mut Iocb>();
        // SAFETY: room for two unaligned pointers; the iocbs are valid and outlive the requests.
        unsafe {
            ptrs.write_unaligned(&mut all[0]);
            ptrs.add(1).write_unaligned(&mut all[1]);
            assert_eq!(io_submit(ctx, 2, ptrs), 2);
        }
        let mut objs: Vec<u64> = reap(ctx, 2).iter().map(|e| e.obj).collect();
        objs.sort();
        assert_eq!(objs, [&all[0] as *const Iocb as u64, &all[1] as *const Iocb as u64]);
        assert_eq!(io_destroy(ctx), 0);
        // SAFETY: our own eventfd.
        unsafe { libc::close(efd) };
        drop(buf);
        assert_eq!(nvaio_close(fd), 0);
    }

    #[test]
    fn getevents_arguments() {
        let ctx = setup(4);
        let mut ev = [IoEvent::default(); 4];
        let e = ev.as_mut_ptr();
        // SAFETY: valid pointers to locals or NULL, which io_getevents checks.
        unsafe {
            assert_eq!(io_getevents(ctx, 2, 1, e, &mut ts(0, 0)), -libc::EINVAL);
            assert_eq!(io_getevents(ctx, -1, 1, e, &mut ts(0, 0)), -libc::EINVAL);
            assert_eq!(io_getevents(ctx, 0, -1, e, &mut ts(0, 0)), -libc::EINVAL);
            assert_eq!(io_getevents(ctx, -2, -1, e, &mut ts(0, 0)), -libc::EINVAL);
            // Nothing in flight: a zero timeout returns at once, min_nr 0 too, nr 0 as well.
            assert_eq!(io_getevents(ctx, 1, 4, e, &mut ts(0, 0)), 0);
            assert_eq!(io_getevents(ctx, 0, 4, e, null_mut()), 0);
            assert_eq!(io_getevents(ctx, 0, 0, null_mut(), &mut ts(0, 0)), 0);
            // NULL events with an empty ring: nothing to copy, so no fault (as the kernel).
            assert_eq!(io_getevents(ctx, 0, 1, null_mut(), &mut ts(0, 0)), 0);
            assert_eq!(io_getevents(ctx, 1, 1, null_mut(), &mut ts(0, 1_000_000)), 0);
            // A short timeout is honoured, and waiting with nothing in flight sleeps.
            let start = Instant::now();
            let cpu0 = cpu_time();
            assert_eq!(io_getevents(ctx, 1, 4, e, &mut ts(0, 50_000_000)), 0);
            let waited = start.elapsed();
            assert!(waited >= Duration::from_millis(50), "{waited:?}");
            assert!(cpu_time() - cpu0 < Duration::from_millis(25), "an idle wait spun");
            // A huge timeout that cannot be represented is accepted (and not waited for here).
            assert_eq!(io_getevents(ctx, 0, 4, e, &mut ts(i64::MAX, 0)), 0);
        }
        assert_eq!(io_destroy(ctx), 0);
    }

    #[test]
    fn timeouts_are_read_as_the_kernel_reads_them() {
        let now = Instant::now();
        let limit = |s, ns| limit_of(Some(ts(s, ns)), now);
        let after = |ns| Limit::Until(now + Duration::from_nanos(ns));
        assert_eq!(limit_of(None, now), Limit::Forever);
        assert_eq!(limit(0, 0), Limit::NoWait);
        assert_eq!(limit(1, -1_000_000_000), Limit::NoWait);
        assert_eq!(limit(0, 1_000_000_000), after(1_000_000_000));
        assert_eq!(limit(1, -999_000_000), after(1_000_000));
        assert_eq!(limit(2, 5), after(2_000_000_005));
        assert_eq!(limit(0, -1), Limit::Forever);
        assert_eq!(limit(-1, 0), Limit::Forever);
        assert_eq!(limit(i64::MAX, 0), Limit::Forever);
        assert_eq!(limit(i64::MAX / 1_000_000_000, 0), Limit::Forever, "KTIME_SEC_MAX");
        // i64::MIN * 1e9 wraps to 0 in the kernel's arithmetic: no wait.
        assert_eq!(limit(i64::MIN, 0), Limit::NoWait);
        assert_eq!(limit(-1_000_000, 0), Limit::Forever);

        let ctx = setup(4);
        let mut ev = [IoEvent::default(); 4];
        let e = ev.as_mut_ptr();
        // SAFETY: valid pointers to locals.
        unsafe {
            // Malformed but not waited for: min_nr 0, or a total of 0.
            let start = Instant::now();
            assert_eq!(io_getevents(ctx, 0, 1, e, &mut ts(0, -1)), 0);
            assert_eq!(io_getevents(ctx, 1, 1, e, &mut ts(1, -1_000_000_000)), 0);
            // One millisecond.
            assert_eq!(io_getevents(ctx, 1, 1, e, &mut ts(1, -999_000_000)), 0);
            assert!(start.elapsed() < Duration::from_millis(500), "{:?}", start.elapsed());
        }
        assert_eq!(io_destroy(ctx), 0);
    }

    extern "C" fn ignore_signal(_: c_int) {}

    /// This thread's signal mask.
    fn signal_mask() -> Vec<c_int> {
        // SAFETY: reads the mask into a local.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set);
            (1..65).filter(|&s| libc::sigismember(&set, s) == 1).collect()
        }
    }

    #[test]
    fn a_signal_ends_a_wait_without_end() {
        // SIGUSR2 with a handler that does nothing, sent to this thread only, with SA_RESTART
        // (which io_getevents ignores, as the kernel does).
        // SAFETY: installs a handler that does nothing.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = ignore_signal as extern "C" fn(c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut());
        }
        let (emu, fd) = emulated();
        let ctx = setup(4);
        let mut ev = [IoEvent::default(); 4];
        let e = ev.as_mut_ptr();
        let mask = signal_mask();
        // SAFETY: pthread_self of this thread, signalled while it lives (it joins below).
        let me = unsafe { libc::pthread_self() };
        let kick = |after: Duration| {
            std::thread::spawn(move || {
                std::thread::sleep(after);
                // SAFETY: the test thread is alive: it joins this thread before leaving.
                unsafe { libc::pthread_kill(me, libc::SIGUSR2) };
            })
        };
        for (sec, nsec) in [(0, -1), (-1, 0)] {
            let k = kick(Duration::from_millis(100));
            let start = Instant::now();
            // SAFETY: valid pointers to locals.
            let r = unsafe { io_getevents(ctx, 1, 4, e, &mut ts(sec, nsec)) };
            k.join().unwrap();
            assert_eq!(r, -libc::EINTR, "{{{sec}, {nsec}}}");
            assert!(start.elapsed() >= Duration::from_millis(100));
            assert_eq!(signal_mask(), mask, "the thread's signal mask is restored");
        }
        // NULL waits without limit too.
        let k = kick(Duration::from_millis(50));
        // SAFETY: valid pointers to locals.
        assert_eq!(unsafe { io_getevents(ctx, 1, 4, e, null_mut()) }, -libc::EINTR);
        k.join().unwrap();
        // With a request in flight the device holds: the signal ends the wait all the same,
        // however long the spin before it, and a signal with events already in hand returns them.
        use nvaio_nvme::emu::{FaultAction, FaultRule};
        let read = nvaio_nvme::spec::cmd::nvm::READ;
        emu.inject(FaultRule::new(FaultAction::Hold).opcode(read).nsid(1).times(1));
        let mut buf = vec![0u8; 1024];
        let mut held = Iocb::pread(fd, buf.as_mut_ptr(), 512, 0);
        let mut quick = Iocb::pread(fd, buf[512..].as_mut_ptr(), 512, 512);
        let mut list = [&mut held as *mut Iocb, &mut quick as *mut Iocb];
        // SAFETY: valid iocbs whose buffer outlives the requests (reaped below).
        assert_eq!(unsafe { io_submit(ctx, 2, list.as_mut_ptr()) }, 2);
        let k = kick(Duration::from_millis(100));
        // SAFETY: valid pointers to locals.
        let r = unsafe { io_getevents(ctx, 2, 4, e, null_mut()) };
        k.join().unwrap();
        assert_eq!(r, 1, "the quick read's event, then the signal");
        assert_eq!(ev[0].obj, &quick as *const Iocb as u64);
        assert_eq!(signal_mask(), mask);
        // SAFETY: a valid iocb.
        assert_eq!(unsafe { io_cancel(ctx, &mut held, null_mut()) }, -libc::EINPROGRESS);
        reap(ctx, 1);
        assert_eq!(io_destroy(ctx), 0);
        drop(buf);
        assert_eq!(nvaio_close(fd), 0);
    }

    #[test]
    fn null_events_fault_once_there_is_an_event() {
        let (_emu, fd) = emulated();
        let ctx = setup(4);
        let mut buf = vec![0u8; 512];
        let mut iocb = Iocb::pread(fd, buf.as_mut_ptr(), 512, 0).with_data(5);
        let mut list = [&mut iocb as *mut Iocb];
        // SAFETY: a valid iocb whose buffer outlives the request; NULL events, which
        // io_getevents must not write.
        unsafe {
            assert_eq!(io_submit(ctx, 1, list.as_mut_ptr()), 1);
            assert_eq!(io_getevents(ctx, 1, 1, null_mut(), &mut ts(5, 0)), -libc::EFAULT);
            assert_eq!(io_getevents(ctx, 0, 1, null_mut(), &mut ts(0, 0)), -libc::EFAULT);
        }
        // The event stayed in the ring.
        let evs = reap(ctx, 1);
        assert_eq!((evs[0].data, evs[0].res), (5, 512));
        assert_eq!(io_destroy(ctx), 0);
        drop(buf);
        assert_eq!(nvaio_close(fd), 0);
    }

    #[test]
    fn interrupt_mode_sleeps_on_the_notification_descriptor() {
        use crate::context::ContextOptions;
        use nvaio_nvme::emu::{EmuConfig, EmulatedController, FaultAction, FaultRule};
        let emu = EmulatedController::new(EmuConfig { msix_vectors: 2, ..Default::default() });
        let dev: Arc<dyn nvaio_nvme::Device> = emu.clone();
        let ctrl = nvaio_nvme::Controller::new(dev).expect("the emulated controller comes up");
        let fd = crate::file::open_on(ctrl, 1, crate::file::Access::ReadWrite).unwrap();
        for mode in [CompletionMode::Interrupt, CompletionMode::Hybrid] {
            let opts = ContextOptions { mode, ..Default::default() };
            let ctx = register(Context::with_options(4, opts).unwrap());
            {
                let slot = lookup(ctx as u64).unwrap();
                let guard = lock(&slot).unwrap();
                assert!(guard.as_ref().unwrap().notification_fd().is_some(), "{mode}");
            }
            let mut buf = vec![0u8; 512];
            let mut iocb = Iocb::pread(fd, buf.as_mut_ptr(), 512, 0).with_data(3);
            let mut list = [&mut iocb as *mut Iocb];
            let mut ev = [IoEvent::default(); 2];
            // SAFETY: a valid iocb whose buffer outlives the request, room for 2 events.
            unsafe {
                // The interrupt wakes the wait at once (the bounded sleep alone would take up
                // to 10 ms a round).
                let start = Instant::now();
                for _ in 0..20 {
                    assert_eq!(io_submit(ctx, 1, list.as_mut_ptr()), 1);
                    assert_eq!(io_getevents(ctx, 1, 2, ev.as_mut_ptr(), &mut ts(5, 0)), 1);
                    assert_eq!((ev[0].data, ev[0].res), (3, 512), "{mode}");
                }
                let took = start.elapsed();
                assert!(took < Duration::from_millis(100), "{mode}: 20 reads took {took:?}");
                // A read the device holds: the wait sleeps (little CPU) until the timeout.
                let read = nvaio_nvme::spec::cmd::nvm::READ;
                emu.inject(FaultRule::new(FaultAction::Hold).opcode(read).nsid(1).times(1));
                assert_eq!(io_submit(ctx, 1, list.as_mut_ptr()), 1);
                let cpu0 = cpu_time();
                assert_eq!(io_getevents(ctx, 1, 2, ev.as_mut_ptr(), &mut ts(0, 100_000_000)), 0);
                let cpu = cpu_time() - cpu0;
                assert!(
                    cpu < Duration::from_millis(8),
                    "{mode}: a wait on the descriptor spun ({cpu:?})"
                );
                assert_eq!(io_cancel(ctx, &mut iocb, null_mut()), -libc::EINPROGRESS);
                assert_eq!(io_getevents(ctx, 1, 2, ev.as_mut_ptr(), &mut ts(5, 0)), 1);
            }
            assert_eq!(io_destroy(ctx), 0);
            drop(buf);
        }
        assert_eq!(nvaio_close(fd), 0);
    }

    /// CPU time of this thread.
    fn cpu_time() -> Duration {
        let mut t = ts(0, 0);
        // SAFETY: a valid pointer to a local.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
    }

    #[test]
    fn cancel_arguments() {
        let ctx = setup(4);
        let mut iocb = Iocb::default();
        // SAFETY: valid pointers to locals or NULL, which io_cancel checks.
        unsafe {
            assert_eq!(io_cancel(ctx, null_mut(), null_mut()), -libc::EFAULT);
            assert_eq!(io_cancel(ctx, &mut iocb, null_mut()), -libc::EINVAL, "not submitted");
            iocb.aio_key = 1;
            assert_eq!(io_cancel(ctx, &mut iocb, null_mut()), -libc::EINVAL);
            // The key is read where it is, aligned or not.
            let mut raw = [0u8; 65];
            let odd = raw[1..].as_mut_ptr().cast::<Iocb>();
            assert_eq!(io_cancel(ctx, odd, null_mut()), -libc::EINVAL);
        }
        assert_eq!(io_destroy(ctx), 0);
    }

    #[test]
    fn open_errors() {
        // SAFETY: NULL and a valid C string.
        unsafe {
            assert_eq!(nvaio_open(std::ptr::null(), 1, libc::O_RDWR), -libc::EFAULT);
            let r = nvaio_open(c"0000:ff:1f.7".as_ptr(), 1, libc::O_RDWR);
            assert!(r < 0, "{r}");
            let msg = CStr::from_ptr(nvaio_last_error()).to_string_lossy().into_owned();
            assert!(msg.contains("0000:ff:1f.7"), "{msg}");
            assert_eq!(nvaio_open(c"0000:ff:1f.7".as_ptr(), 1, 3), -libc::EINVAL, "bad flags");
        }
        assert_eq!(nvaio_close(-1), -libc::EBADF);
    }

    /// A namespace of nvaio's emulated controller, opened read-write: a real descriptor the C
    /// ABI can be driven with on any host.
    fn emulated() -> (Arc<nvaio_nvme::emu::EmulatedController>, c_int) {
        use nvaio_nvme::emu::{EmuConfig, EmulatedController};
        let emu = EmulatedController::new(EmuConfig::default());
        let dev: Arc<dyn nvaio_nvme::Device> = emu.clone();
        let ctrl = nvaio_nvme::Controller::new(dev).expect("the emulated controller comes up");
        let fd = crate::file::open_on(ctrl, 1, crate::file::Access::ReadWrite).unwrap();
        (emu, fd)
    }

    #[test]
    fn many_requests_through_the_c_abi() {
        const N: usize = 200;
        let (_emu, fd) = emulated();
        let ctx = setup(N as c_int);
        let wbuf: Vec<u8> = (0..N * 512).map(|i| (i * 7 + i / 512) as u8).collect();
        let mut rbuf = vec![0u8; N * 512];
        let mut iocbs: Vec<Iocb> = (0..N)
            .map(|i| {
                Iocb::pwrite(fd, wbuf[i * 512..].as_ptr(), 512, (i * 512) as i64)
                    .with_data(i as u64)
            })
            .collect();
        let mut events = vec![IoEvent::default(); N];
        for round in 0..2 {
            let mut list: Vec<*mut Iocb> = iocbs.iter_mut().map(|i| i as *mut Iocb).collect();
            // SAFETY: N valid iocbs whose buffers outlive the events, and room for N events.
            unsafe {
                assert_eq!(io_submit(ctx, N as c_long, list.as_mut_ptr()), N as c_int);
                // More than one internal batch of events in one call.
                let got =
                    io_getevents(ctx, N as c_long, N as c_long, events.as_mut_ptr(), null_mut());
                assert_eq!(got, N as c_int);
            }
            let mut seen = [false; N];
            for ev in &events {
                let i = ev.data as usize;
                assert!(!std::mem::replace(&mut seen[i], true), "event {i} twice");
                assert_eq!(ev.obj, &iocbs[i] as *const Iocb as u64);
                assert_eq!(ev.res, 512, "round {round} request {i}");
            }
            // Round 1 reads back what round 0 wrote.
            for (i, iocb) in iocbs.iter_mut().enumerate() {
                *iocb = Iocb::pread(fd, rbuf[i * 512..].as_mut_ptr(), 512, (i * 512) as i64)
                    .with_data(i as u64);
            }
        }
        assert!(rbuf == wbuf, "the data read back differs");
        // A completed request cannot be cancelled.
        // SAFETY: a valid iocb.
        assert_eq!(unsafe { io_cancel(ctx, &mut iocbs[0], null_mut()) }, -libc::EINVAL);
        assert_eq!(io_destroy(ctx), 0);
        assert_eq!(nvaio_close(fd), 0);
        assert_eq!(nvaio_close(fd), -libc::EBADF);
    }

    #[test]
    fn timeout_with_io_in_flight_then_cancel() {
        use nvaio_nvme::emu::{FaultAction, FaultRule};
        let (emu, fd) = emulated();
        // The read only: admin commands (the queue pair's creation) carry no nsid.
        let read = nvaio_nvme::spec::cmd::nvm::READ;
        emu.inject(FaultRule::new(FaultAction::Hold).opcode(read).nsid(1).times(1));
        let ctx = setup(4);
        let mut buf = vec![0u8; 512];
        let mut iocb = Iocb::pread(fd, buf.as_mut_ptr(), 512, 0).with_data(9);
        let mut list = [&mut iocb as *mut Iocb];
        let mut ev = [IoEvent::default(); 2];
        // SAFETY: valid iocb, buffer and event array, all outliving the request.
        unsafe {
            assert_eq!(io_submit(ctx, 1, list.as_mut_ptr()), 1);
            // The device holds the read: the wait ends with the timeout and no event.
            let start = Instant::now();
            assert_eq!(io_getevents(ctx, 1, 2, ev.as_mut_ptr(), &mut ts(0, 30_000_000)), 0);
            assert!(start.elapsed() >= Duration::from_millis(30));
            assert_eq!(io_cancel(ctx, &mut iocb, ev.as_mut_ptr()), -libc::EINPROGRESS);
            assert_eq!(io_getevents(ctx, 1, 2, ev.as_mut_ptr(), &mut ts(5, 0)), 1);
        }
        assert_eq!(ev[0].data, 9);
        assert_eq!(ev[0].obj, &iocb as *const Iocb as u64);
        assert_eq!(ev[0].res, -i64::from(libc::ECANCELED));
        assert_eq!(io_destroy(ctx), 0);
        assert_eq!(nvaio_close(fd), 0);
    }

    #[test]
    fn one_context_shared_by_threads() {
        // Threads submit on one context and reap whatever events come; together they must see
        // each request exactly once.
        const THREADS: usize = 4;
        const EACH: usize = 100;
        let (_emu, fd) = emulated();
        let ctx = setup((THREADS * 8) as c_int) as usize;
        let reaped = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let reaped = reaped.clone();
                std::thread::spawn(move || {
                    let ctx = ctx as IoContextT;
                    let mut buf = vec![0u8; 512];
                    let mut iocbs: Vec<Iocb> = (0..EACH)
                        .map(|i| {
                            Iocb::pread(fd, buf.as_mut_ptr(), 512, 0)
                                .with_data((t * EACH + i) as u64)
                        })
                        .collect();
                    let deadline = Instant::now() + Duration::from_secs(20);
                    // Takes whatever events are there (any thread's), waiting up to 1 ms.
                    let reap = || {
                        let mut ev = [IoEvent::default(); 8];
                        // SAFETY: room for 8 events.
                        let n = unsafe {
                            io_getevents(ctx, 0, 8, ev.as_mut_ptr(), &mut ts(0, 1_000_000))
                        };
                        assert!(n >= 0, "{n}");
                        reaped
                            .lock()
                            .unwrap()
                            .extend(ev[..n as usize].iter().map(|e| (e.data, e.res)));
                    };
                    let mut next = 0;
                    while next < EACH && Instant::now() < deadline {
                        let mut one = [&mut iocbs[next] as *mut Iocb];
                        // SAFETY: a valid iocb; it and its buffer live until every request of
                        // every thread has been reaped (the loop below).
                        match unsafe { io_submit(ctx, 1, one.as_mut_ptr()) } {
                            1 => next += 1,
                            r => assert_eq!(r, -libc::EAGAIN, "the context is full at most"),
                        }
                        reap();
                    }
                    while reaped.lock().unwrap().len() < THREADS * EACH && Instant::now() < deadline
                    {
                        reap();
                    }
                    drop(buf);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut all = reaped.lock().unwrap().clone();
        all.sort();
        assert_eq!(all.len(), THREADS * EACH);
        for (i, (data, res)) in all.iter().enumerate() {
            assert_eq!((*data, *res), (i as u64, 512));
        }
        assert_eq!(io_destroy(ctx as IoContextT), 0);
        assert_eq!(nvaio_close(fd), 0);
    }

    #[test]
    fn contexts_from_many_threads() {
        // Threads set up, use and destroy contexts concurrently; ids may be reused after a
        // destroy, which the per-thread lookup cache must not confuse.
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    for _ in 0..50 {
                        let ctx = setup(2);
                        let mut ev = [IoEvent::default(); 2];
                        // SAFETY: valid pointers to locals.
                        let r = unsafe { io_getevents(ctx, 0, 2, ev.as_mut_ptr(), null_mut()) };
                        assert_eq!(r, 0);
                        assert_eq!(io_destroy(ctx), 0);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
