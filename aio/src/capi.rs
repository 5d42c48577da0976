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
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use crate::abi::{AioRingHeader, IoEvent, Iocb};
use crate::context::{Context, Errno};

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
/// Returns 0, or: -EFAULT if `ctxp` is NULL; -EINVAL if `*ctxp` is not 0, `maxevents` is not
/// positive or is larger than the kernel allows; -EAGAIN or -ENOMEM as `Context::setup`
/// reports (system-wide event limit, memory).
///
/// # Safety
/// `ctxp` is NULL or points to a writable `io_context_t`.
#[no_mangle]
pub unsafe extern "C" fn io_setup(maxevents: c_int, ctxp: *mut IoContextT) -> c_int {
    guarded(|| {
        if ctxp.is_null() {
            return -libc::EFAULT;
        }
        // SAFETY: non-null, and the caller promises it points to an io_context_t.
        if !unsafe { ctxp.read() }.is_null() || maxevents <= 0 {
            return -libc::EINVAL;
        }
        let ctx = match Context::setup(maxevents as u32) {
            Ok(ctx) => ctx,
            Err(e) => return neg(e),
        };
        let id = ctx.id();
        // SAFETY: the ring was just mapped and starts with its header; nobody but this thread
        // knows its address yet.
        let ring_nr = unsafe { (id as *const AioRingHeader).read() }.nr;
        let slot = Arc::new(Slot { ctx: Mutex::new(Some(ctx)), ring_nr });
        REGISTRY.write().unwrap_or_else(|e| e.into_inner()).insert(id, slot);
        // SAFETY: checked non-null above; the caller promises it is writable.
        unsafe { ctxp.write(id as IoContextT) };
        0
    })
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

/// `io_submit`: queues `nr` requests and returns how many were queued. Each iocb's `key` is set
/// to 0 first, as the kernel sets it to KIOCB_KEY. If the first request is refused its error
/// is returned; a later refusal ends the batch and the count so far is returned. `nr` larger
/// than the ring is clamped to the ring's size, as the kernel does. Errors found after queueing
/// arrive as events with a negative `res`.
///
/// Returns the number queued, or: -EINVAL if `nr` is negative, `ctx` is not a live context, or
/// the first iocb is invalid (opcode, reserved fields, offset); -EFAULT if `ios` is NULL with
/// `nr` > 0 or `ios[0]` is NULL or not 8-byte aligned (a later such entry ends the batch);
/// -EAGAIN when the context is full; -EBADF for a namespace opened without the access the
/// request needs; -EOPNOTSUPP for unknown `aio_rw_flags`; -EIO after a panic inside nvaio.
/// An iocb on a descriptor nvaio does not own goes to the kernel's AIO, and the kernel's
/// io_submit errors come back for it (-EBADF for a descriptor that is not open, -EINVAL for
/// misaligned O_DIRECT, ...).
///
/// # Safety
/// `ios` points to `nr` iocb pointers, each to a `struct iocb` that stays valid and unmodified
/// until its event has been reaped, and whose buffers stay valid that long, exactly as with the
/// kernel.
#[no_mangle]
pub unsafe extern "C" fn io_submit(ctx: IoContextT, nr: c_long, ios: *mut *mut Iocb) -> c_int {
    guarded(|| {
        if nr < 0 {
            return -libc::EINVAL;
        }
        let Some(slot) = lookup(ctx as u64) else { return -libc::EINVAL };
        if nr == 0 {
            return 0;
        }
        if ios.is_null() || !ios.is_aligned() {
            return -libc::EFAULT;
        }
        let nr = (nr as u64).min(u64::from(slot.ring_nr)) as usize;
        // Usable entries: up to the first NULL or misaligned pointer, which the kernel's copy
        // would fault on. Each gets its key written before anything reads it.
        let mut usable = 0;
        while usable < nr {
            // SAFETY: usable < nr, and the caller promises nr readable entries.
            let p = unsafe { ios.add(usable).read() };
            if p.is_null() || !p.is_aligned() {
                break;
            }
            // SAFETY: non-null and aligned; the caller promises a writable struct iocb.
            unsafe { std::ptr::addr_of_mut!((*p).aio_key).write(0) };
            usable += 1;
        }
        if usable == 0 {
            return -libc::EFAULT;
        }
        // SAFETY: the first `usable` entries are non-null, aligned pointers to iocbs the caller
        // keeps valid and unmodified during the call; `*mut Iocb` and `&Iocb` have the same
        // layout. The context records each iocb's address as the event's `obj`, which is why
        // the caller's own iocbs are passed, not copies.
        let iocbs: &[&Iocb] = unsafe { std::slice::from_raw_parts(ios.cast::<&Iocb>(), usable) };
        let mut guard = match lock(&slot) {
            Ok(g) => g,
            Err(e) => return neg(e),
        };
        let Some(context) = guard.as_mut() else { return -libc::EINVAL };
        match context.submit(iocbs) {
            // At most ring_nr (a u32 below 2^23): fits.
            Ok(n) => n as c_int,
            Err(e) => neg(e),
        }
    })
}

/// How `io_getevents` waits between passes. Passes with requests in flight spin at first (an
/// NVMe completion is microseconds away), then yield, then sleep briefly, so that a long wait
/// costs little CPU; with nothing in flight only another thread's submission can produce an
/// event, so it sleeps from the start, longer the longer the wait.
struct Backoff {
    start: Option<Instant>,
    idle_sleep: Duration,
}

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
        Backoff { start: None, idle_sleep: Self::IDLE_MIN }
    }

    /// Waits a little; never past `deadline`.
    fn wait(&mut self, in_flight: bool, now: Instant, deadline: Option<Instant>) {
        let start = *self.start.get_or_insert(now);
        let left = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(now));
        if !in_flight {
            std::thread::sleep(self.idle_sleep.min(left));
            self.idle_sleep = (self.idle_sleep * 2).min(Self::IDLE_MAX);
            return;
        }
        self.idle_sleep = Self::IDLE_MIN;
        let waited = now - start;
        if waited < Self::SPIN {
            std::hint::spin_loop();
        } else if waited < Self::YIELD {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Self::BUSY_SLEEP.min(left));
        }
    }
}

/// `io_getevents`: waits until at least `min_nr` events are available or `timeout` has passed,
/// and moves up to `nr` of them into `events`. `timeout` is relative; NULL waits without limit,
/// a zero timeout does not wait. With `nr` 0 the call only advances the context: nvaio polls
/// its queues and posts finished requests to the ring, which is how a program that reaps the
/// ring in user space gets it filled (with the kernel, interrupts fill it and the call does
/// nothing).
///
/// Returns the number of events stored (fewer than `min_nr` if the timeout passed), or:
/// -EINVAL if `ctx` is not a live context, `min_nr` or `nr` is negative, `min_nr` > `nr`, or
/// the timeout has a negative `tv_sec` or a `tv_nsec` outside 0..1e9; -EFAULT if `events` is
/// NULL with `nr` > 0; -EIO after a panic inside nvaio. If the context is destroyed by another
/// thread during the wait, the events already stored are returned, or -EINVAL if none.
///
/// # Safety
/// `events` points to `nr` writable `struct io_event`s; `timeout` is NULL or points to a
/// `struct timespec`.
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
        let timeout = if timeout.is_null() {
            None
        } else {
            // SAFETY: non-null; the caller promises a struct timespec.
            let ts = unsafe { timeout.read() };
            if ts.tv_sec < 0 || !(0..1_000_000_000).contains(&ts.tv_nsec) {
                return -libc::EINVAL;
            }
            Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
        };
        if events.is_null() && nr > 0 {
            return -libc::EFAULT;
        }
        // Events accumulate over passes, as in the kernel, so nr may exceed the ring's size; the
        // bound only keeps the count representable in the int returned.
        let nr = nr.min(c_int::MAX as c_long) as usize;
        let min_nr = (min_nr as usize).min(nr);
        // A deadline too far away to represent is no deadline.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let zero_timeout = timeout == Some(Duration::ZERO);

        // Events pass through this buffer, then are copied bytewise into the caller's array:
        // no reference to the caller's memory is formed, and it need not be aligned.
        let mut batch = [IoEvent::default(); 64];
        let mut got = 0;
        let mut backoff = Backoff::new();
        loop {
            let want = (nr - got).min(batch.len());
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
                context
                    .get_events(need, &mut batch[..want], Some(Duration::ZERO))
                    .map(|n| (n, context.in_flight() > 0))
            };
            let (n, in_flight) = match pass {
                Ok(p) => p,
                Err(e) => return if got > 0 { got as c_int } else { neg(e) },
            };
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
            if got >= min_nr || zero_timeout {
                return got as c_int;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return got as c_int;
            }
            if n > 0 {
                // Progress: keep polling eagerly.
                backoff = Backoff::new();
            }
            backoff.wait(in_flight, now, deadline);
        }
    })
}

/// `io_cancel`: starts cancelling the request submitted with `iocb`. As with Linux since 4.19,
/// `evt` is not written: the outcome always arrives as an event through the ring.
///
/// Returns -EINPROGRESS when cancellation has started (the usual outcome, not a failure), or:
/// -EINVAL if `ctx` is not a live context, `iocb->key` is not 0 (the iocb was never submitted),
/// no request of this context was submitted with `iocb` or it has already completed, or it went
/// to the kernel's AIO, which cannot cancel file or block I/O; -EFAULT if `iocb` is NULL; -EIO
/// after a panic inside nvaio. For a request on a kernel descriptor the kernel's answer is
/// returned as is.
///
/// # Safety
/// `iocb` is NULL or points to a readable `struct iocb`.
#[no_mangle]
pub unsafe extern "C" fn io_cancel(ctx: IoContextT, iocb: *mut Iocb, evt: *mut IoEvent) -> c_int {
    let _ = evt;
    guarded(|| {
        let Some(slot) = lookup(ctx as u64) else { return -libc::EINVAL };
        if iocb.is_null() {
            return -libc::EFAULT;
        }
        // SAFETY: non-null; the caller promises a readable struct iocb. Read without forming a
        // reference: the iocb may be in use by the context.
        let key = unsafe { std::ptr::addr_of!((*iocb).aio_key).read_unaligned() };
        if key != 0 {
            return -libc::EINVAL;
        }
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
    guarded(|| {
        let Some(slot) = lookup(ctx as u64) else { return -libc::EINVAL };
        let mut guard = match lock(&slot) {
            Ok(g) => g,
            Err(e) => return neg(e),
        };
        let Some(context) = guard.as_mut() else { return -libc::EINVAL };
        // SAFETY: the caller's promise above is register_buffer's contract.
        match unsafe { context.register_buffer(buf.cast(), len) } {
            Ok(()) => 0,
            Err(e) => neg(e),
        }
    })
}

/// `nvaio_unregister_buffer`: undoes `nvaio_register_buffer` for the buffer registered at
/// `buf`. Returns 0, or -EINVAL (not a live context, nothing registered there), -EBUSY (I/O in
/// flight on the context), -EIO after a panic inside nvaio.
#[no_mangle]
pub extern "C" fn nvaio_unregister_buffer(ctx: IoContextT, buf: *mut c_void) -> c_int {
    guarded(|| {
        let Some(slot) = lookup(ctx as u64) else { return -libc::EINVAL };
        let mut guard = match lock(&slot) {
            Ok(g) => g,
            Err(e) => return neg(e),
        };
        let Some(context) = guard.as_mut() else { return -libc::EINVAL };
        match context.unregister_buffer(buf.cast()) {
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
            let mut used = NonNull::<IoContext>::dangling().as_ptr();
            assert_eq!(io_setup(8, &mut used), -libc::EINVAL, "*ctxp must be 0");
        }
        assert!(ctx.is_null(), "a failed io_setup leaves *ctxp alone");
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
            assert_eq!(io_getevents(bogus, 0, 1, ev.as_mut_ptr(), null_mut()), -libc::EINVAL);
            assert_eq!(io_cancel(bogus, &mut iocb, ev.as_mut_ptr()), -libc::EINVAL);
        }
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
            // Descriptor -1 is nobody's: refused, after the key was cleared as the kernel does.
            assert_eq!(io_submit(ctx, 1, list.as_mut_ptr()), -libc::EBADF);
        }
        assert_eq!(iocb.aio_key, 0);
        assert_eq!(io_destroy(ctx), 0);
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
            assert_eq!(io_getevents(ctx, 0, 1, e, &mut ts(0, 1_000_000_000)), -libc::EINVAL);
            assert_eq!(io_getevents(ctx, 0, 1, e, &mut ts(0, -1)), -libc::EINVAL);
            assert_eq!(io_getevents(ctx, 0, 1, e, &mut ts(-1, 0)), -libc::EINVAL);
            assert_eq!(io_getevents(ctx, 0, 1, null_mut(), &mut ts(0, 0)), -libc::EFAULT);
            // Nothing in flight: a zero timeout returns at once, min_nr 0 too, nr 0 as well.
            assert_eq!(io_getevents(ctx, 1, 4, e, &mut ts(0, 0)), 0);
            assert_eq!(io_getevents(ctx, 0, 4, e, null_mut()), 0);
            assert_eq!(io_getevents(ctx, 0, 0, null_mut(), &mut ts(0, 0)), 0);
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
