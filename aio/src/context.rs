//! An AIO context: what `io_setup` creates.
//!
//! A context owns one NVMe I/O queue pair per controller it has talked to, a bounce-page pool
//! per queue pair, a fixed table of requests and the event ring. Everything on the per-I/O path
//! (`submit` to `get_events`) works on that owned state through `&mut self`: no lock, no heap
//! allocation once warmed up, no system call while polling, one SQ doorbell per queue per
//! `submit` call and one CQ doorbell per reaping pass.
//!
//! One iocb becomes one request; a request becomes one NVMe command per `max_transfer` bytes
//! (MDTS, capped at 1 MiB). Requests that cannot get a queue slot or bounce pages right away
//! wait, in order, in their queue's pending list and are issued as completions free resources.
//!
//! Every request has a deadline (`ContextOptions::command_timeout`). A request past it completes
//! with -ETIMEDOUT; the commands it left with the device keep their slots and bounce pages until
//! the device answers, so a late answer can neither complete another command nor write into
//! memory that was reused. A controller found gone or fatally failed fails all its I/O with -EIO.
//!
//! Data moves through the queue's bounce pages, or straight to and from the application's memory
//! when it lies in a buffer registered with [`Context::register_buffer`]. Iocbs on descriptors
//! nvaio does not own go to a kernel AIO context (`crate::kernel`) and come back through the same
//! ring. How a waiting `get_events` learns of completions is the context's [`CompletionMode`]:
//! spinning on the completion queues, or sleeping on their MSI-X notifiers (`crate::wait`), the
//! waiting thread itself reaping when it wakes.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvaio_dma::PAGE_SIZE;
use nvaio_nvme::prp;
use nvaio_nvme::spec::cmd::{nvm, RW_FUA};
use nvaio_nvme::spec::Sqe;
use nvaio_nvme::{Controller, QueuePair};

use crate::abi::{self, opcode, rwf, IoEvent, Iocb};
use crate::errno::status_to_errno;
use crate::file::{self, NvmeFile};
use crate::kernel::{self, KernelAio};
use crate::limits::{self, Slots};
use crate::pool::{PageId, PagePool};
use crate::ring::Ring;
use crate::wait::{CompletionMode, HybridSpin, Waiter};

/// An errno, as the kernel's AIO calls return them (positive here; the C ABI negates).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

impl std::error::Error for Errno {}

/// Tunables of a context.
#[derive(Clone, Debug)]
pub struct ContextOptions {
    /// Entries of each NVMe queue pair the context creates (clamped to the controller's limit).
    /// By default, enough for every request of the context, up to 1024.
    pub queue_entries: Option<u16>,
    /// How long a request may take before it fails with -ETIMEDOUT.
    pub command_timeout: Duration,
    /// Bounce memory allocated per queue pair up front, and the most it may grow to.
    pub bounce_initial: usize,
    pub bounce_max: usize,
    /// How completions are noticed: polling, interrupts, or a short adaptive spin and then
    /// interrupts. Without MSI-X (or where enabling it failed) queues fall back to polling.
    pub mode: CompletionMode,
}

/// The default completion mode: `NVAIO_MODE` (`polled`, `interrupt` or `hybrid`) if set, so
/// that an application using the C ABI can choose without code changes; else polled.
fn mode_from_env() -> CompletionMode {
    match std::env::var("NVAIO_MODE") {
        Ok(v) => v.parse().unwrap_or_else(|e| {
            tracing::warn!("NVAIO_MODE: {e}; using polled mode");
            CompletionMode::Polled
        }),
        Err(_) => CompletionMode::Polled,
    }
}

impl Default for ContextOptions {
    fn default() -> Self {
        ContextOptions {
            queue_entries: None,
            command_timeout: Duration::from_secs(30),
            bounce_initial: 2 << 20,
            bounce_max: 64 << 20,
            mode: mode_from_env(),
        }
    }
}

const NONE: u32 = u32::MAX;

/// How often a waiting context checks request deadlines and controller health.
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_millis(5);

/// How far one pass of issuing got.
enum Issue {
    /// Nothing left pending.
    Empty,
    /// Out of queue slots or bounce pages: the rest waits for completions.
    Blocked,
    /// This request ended before reaching the device and must be completed with this result.
    Failed(u32, i64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    /// IOCB_CMD_POLL: answered at submission (a block device has no poll method).
    Poll,
    /// A request on a descriptor nvaio does not own, handed to the kernel's AIO.
    Kernel,
}

/// One iocb in flight.
struct Request {
    obj: u64,
    data: u64,
    kind: Kind,
    queue: u16,
    nsid: u32,
    block_shift: u32,
    fua: bool,
    /// RWF_NOWAIT: fail with -EAGAIN rather than wait for queue slots or bounce pages.
    nowait: bool,
    /// Whether this request has been counted in `ContextStats::waits`.
    waited: bool,
    /// Byte position on the namespace.
    pos: u64,
    total: usize,
    /// Bytes handed to commands so far.
    issued: usize,
    /// Commands with the device.
    outstanding: u32,
    /// Negative errno once any command failed.
    res: i64,
    resfd: RawFd,
    deadline: Instant,
    /// The application's buffer as (address, length) pieces; capacity is kept across reuse.
    segs: Vec<(u64, usize)>,
    active: bool,
}

/// One NVMe command in flight, indexed by its queue slot.
struct Cmd {
    /// The request it serves, or NONE once the request has completed without it (timeout).
    req: u32,
    /// Byte offset of this command's data within the request.
    offset: usize,
    len: usize,
    /// Offset of the first byte in the first page.
    page_off: usize,
    /// Data pages, then the PRP list page if one was needed. With `direct`, only the list page.
    pages: Vec<PageId>,
    /// The data is in the application's registered memory: nothing to copy back.
    direct: bool,
    busy: bool,
}

struct Queue {
    ctrl: Arc<Controller>,
    qp: QueuePair,
    pool: PagePool,
    cmds: Vec<Cmd>,
    pending: VecDeque<u32>,
    max_transfer: usize,
    /// Scratch space for one command's page IOVAs, allocated once.
    iovas: Vec<u64>,
    /// Set once the controller was found gone or fatally failed: all I/O fails with EIO.
    dead: bool,
}

/// Application memory registered for zero-copy I/O (see [`Context::register_buffer`]),
/// mapped for DMA on the controller of each queue pair of the context.
struct Registered {
    addr: u64,
    len: usize,
    /// The page-aligned hull that is mapped.
    base: u64,
    hull: usize,
    /// Per queue index: the mapper and the IOVA of `base`.
    maps: Vec<Option<(Arc<dyn nvaio_dma::DmaMapper>, u64)>>,
}

impl Registered {
    /// The IOVA of `addr` on queue `q`'s controller, if `addr..addr+len` lies in this buffer.
    #[inline]
    fn iova_for(&self, q: usize, addr: u64, len: usize) -> Option<u64> {
        if addr < self.addr || addr + len as u64 > self.addr + self.len as u64 {
            return None;
        }
        let (_, iova) = self.maps.get(q)?.as_ref()?;
        Some(iova + (addr - self.base))
    }

    fn map_for(&mut self, q: usize, ctrl: &Controller) -> Result<(), Errno> {
        let mapper = ctrl.device().dma_mapper();
        // SAFETY: `register_buffer`'s caller promised the memory stays allocated until it is
        // unregistered or the context dropped, which is when this mapping is undone.
        let iova = unsafe { mapper.map(self.base as *mut u8, self.hull) }.map_err(|e| {
            tracing::warn!("cannot map a registered buffer: {e}");
            Errno(libc::ENOMEM)
        })?;
        if self.maps.len() <= q {
            self.maps.resize_with(q + 1, || None);
        }
        self.maps[q] = Some((mapper, iova));
        Ok(())
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        for (mapper, iova) in self.maps.iter().flatten() {
            mapper.unmap(*iova, self.hull);
        }
    }
}

/// Counters for one context.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContextStats {
    pub submitted: u64,
    pub completed: u64,
    pub commands: u64,
    pub timeouts: u64,
    /// Requests that had to wait for queue slots or bounce pages.
    pub waits: u64,
    /// NVMe Abort commands sent for io_cancel.
    pub aborts_sent: u64,
    /// Commands whose data moved straight to or from registered memory.
    pub zero_copy: u64,
}

/// An AIO context. Not shareable between threads (`&mut self`), which is what lets the I/O path
/// run without locks; each thread that does I/O uses its own context, as with the kernel's AIO
/// the fastest way to use it is.
pub struct Context {
    ring: Ring,
    /// Request slots, counted as fs/aio.c counts them.
    slots: Slots,
    /// This context's share of the system-wide aio-max-nr.
    _reservation: limits::Reservation,
    /// The kernel AIO context for descriptors nvaio does not own, made on first use.
    kernel: Option<KernelAio>,
    kernel_in_flight: u32,
    /// The nr_events the application asked for (sizes the NVMe queues).
    max_reqs: u32,
    reqs: Vec<Request>,
    free_reqs: Vec<u32>,
    in_flight: u32,
    queues: Vec<Queue>,
    /// Buffers registered for zero-copy I/O.
    registered: Vec<Registered>,
    /// Descriptors seen recently: (fd, file, queue index).
    files: Vec<(RawFd, Arc<NvmeFile>, u16)>,
    epoch: u64,
    opts: ContextOptions,
    /// Interrupt and hybrid modes: sleeps on the queue notifiers and `ctx_event`.
    waiter: Option<Waiter>,
    /// An eventfd of the context's own, in the waiter: signalled by the kernel when a request
    /// handed to its AIO completes, and by `submit` when it leaves events in the ring, so the
    /// notification descriptor sees every event.
    ctx_event: Option<vmm_sys_util::eventfd::EventFd>,
    /// Notifiers of the interrupt-driven queue pairs, kept as long as their queues.
    notifiers: Vec<nvaio_nvme::queue::Notifier>,
    /// Queue pairs that fell back to polling (no interrupts): waiting must spin for them.
    polled_queues: usize,
    spin: HybridSpin,
    polls_since_check: u32,
    next_expiry_check: Instant,
    /// The fork generation the context was made in; in a forked child it is unusable (its
    /// queues and memory are the parent's), as a kernel AIO context is.
    fork_gen: u64,
    stats: ContextStats,
}

impl Context {
    /// `io_setup`: a context for at least `nr_events` requests in flight. As with the kernel,
    /// the ring is sized from `max(nr_events, 4 * CPUs) * 2`, so more usually fit.
    ///
    /// Errors: EINVAL if `nr_events` is 0 or its ring would exceed 256 MiB; EAGAIN if it exceeds
    /// `/proc/sys/fs/aio-max-nr`, alone or with the other contexts of this process; ENOMEM if
    /// memory cannot be had.
    pub fn setup(nr_events: u32) -> Result<Context, Errno> {
        Self::with_options(nr_events, ContextOptions::default())
    }

    pub fn with_options(nr_events: u32, opts: ContextOptions) -> Result<Context, Errno> {
        let cpus = limits::possible_cpus();
        let (nr, reservation) = limits::setup(nr_events, cpus)?;
        let (waiter, ctx_event) = if opts.mode.uses_interrupts() {
            let fail = |e: std::io::Error| Errno(e.raw_os_error().unwrap_or(libc::ENOMEM));
            let mut w = Waiter::new().map_err(fail)?;
            let ev = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(fail)?;
            w.add(std::os::fd::AsRawFd::as_raw_fd(&ev)).map_err(fail)?;
            (Some(w), Some(ev))
        } else {
            (None, None)
        };
        let ring = Ring::new(nr).map_err(|_| Errno(libc::ENOMEM))?;
        let max_reqs = nr_events;
        // The slot accounting never lets more than nr - 1 requests be in flight or unreaped.
        let table = nr - 1;
        let mut reqs = Vec::new();
        reqs.try_reserve_exact(table as usize).map_err(|_| Errno(libc::ENOMEM))?;
        reqs.extend((0..table).map(|_| Request {
            obj: 0,
            data: 0,
            kind: Kind::Read,
            queue: 0,
            nsid: 0,
            block_shift: 9,
            fua: false,
            nowait: false,
            waited: false,
            pos: 0,
            total: 0,
            issued: 0,
            outstanding: 0,
            res: 0,
            resfd: -1,
            deadline: Instant::now(),
            segs: Vec::with_capacity(1),
            active: false,
        }));
        Ok(Context {
            ring,
            slots: Slots::new(nr, cpus),
            _reservation: reservation,
            kernel: None,
            kernel_in_flight: 0,
            max_reqs,
            reqs,
            free_reqs: (0..table).rev().collect(),
            in_flight: 0,
            queues: Vec::new(),
            registered: Vec::new(),
            files: Vec::new(),
            epoch: file::EPOCH.load(Ordering::Acquire),
            opts,
            waiter,
            ctx_event,
            notifiers: Vec::new(),
            polled_queues: 0,
            spin: HybridSpin::default(),
            polls_since_check: 0,
            next_expiry_check: Instant::now(),
            fork_gen: nvaio_dma::fork::generation(),
            stats: ContextStats::default(),
        })
    }

    /// The `aio_context_t` value: the address of the event ring.
    pub fn id(&self) -> u64 {
        self.ring.addr()
    }

    /// Slots of the event ring (`aio_ring.nr`): sized as the kernel sizes it for the same
    /// `nr_events`.
    pub fn ring_entries(&self) -> u32 {
        self.ring.nr()
    }

    /// Requests submitted and not yet completed.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    pub fn stats(&self) -> ContextStats {
        self.stats
    }

    /// The context's notification descriptor, in interrupt and hybrid modes: an epoll
    /// descriptor that becomes readable when events may be waiting, for the application's own
    /// epoll set or poll(2). Call `get_events` when it fires (that also resets it).
    pub fn notification_fd(&self) -> Option<RawFd> {
        self.waiter.as_ref().map(Waiter::fd)
    }

    /// Whether this process is a child forked after the context was made: the context is then
    /// the parent's, and every call on it fails with EINVAL (as with the kernel's AIO, whose
    /// contexts a child does not inherit). Dropping it touches nothing.
    pub fn forked(&self) -> bool {
        nvaio_dma::fork::forked_since(self.fork_gen)
    }

    /// The completion mode this context was set up with.
    pub fn mode(&self) -> CompletionMode {
        self.opts.mode
    }

    /// What the controllers behind this context's queues reported through Asynchronous Event
    /// Requests since the last call (SMART warnings, namespace changes). Each event is also
    /// logged when it arrives.
    pub fn take_async_events(&self) -> Vec<nvaio_nvme::controller::AsyncEvent> {
        self.queues.iter().flat_map(|q| q.ctrl.take_async_events()).collect()
    }

    /// The NVMe queue statistics of each queue pair this context created.
    pub fn queue_stats(&self) -> Vec<nvaio_nvme::queue::QueueStats> {
        self.queues.iter().map(|q| q.qp.stats()).collect()
    }

    /// Finds the namespace and queue for a descriptor, creating the queue pair on the first
    /// use of a controller. Only a miss touches the global table (a read lock).
    fn resolve(&mut self, fd: RawFd) -> Result<usize, Errno> {
        let epoch = file::EPOCH.load(Ordering::Acquire);
        if epoch != self.epoch {
            self.files.clear();
            self.epoch = epoch;
        }
        if let Some(i) = self.files.iter().position(|(f, _, _)| *f == fd) {
            return Ok(i);
        }
        let nf = file::lookup(fd).ok_or(Errno(libc::EBADF))?;
        let q = match self.queues.iter().position(|q| Arc::ptr_eq(&q.ctrl, &nf.ctrl)) {
            Some(q) => q,
            None => self.add_queue(&nf.ctrl)?,
        };
        self.files.push((fd, nf, q as u16));
        Ok(self.files.len() - 1)
    }

    fn add_queue(&mut self, ctrl: &Arc<Controller>) -> Result<usize, Errno> {
        let entries = self
            .opts
            .queue_entries
            .unwrap_or_else(|| (self.max_reqs.min(1023) + 1) as u16)
            .clamp(2, ctrl.max_queue_entries());
        let create_failed = |e: nvaio_nvme::ControllerError| {
            tracing::warn!("cannot create an I/O queue pair: {e}");
            Errno(match e {
                // Every I/O queue the controller granted is taken by other contexts.
                nvaio_nvme::ControllerError::NoQueues { .. } => libc::EBUSY,
                // The descriptor's controller belongs to the parent of this forked process.
                nvaio_nvme::ControllerError::Forked { .. } => libc::EBADF,
                nvaio_nvme::ControllerError::Dma(_) => libc::ENOMEM,
                _ => libc::EIO,
            })
        };
        let mut irq_qp = None;
        if let Some(w) = self.waiter.as_mut() {
            match ctrl.create_queue_pair_irq(entries) {
                Ok((qp, notifier)) => {
                    w.add(notifier.fd())
                        .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::ENOMEM)))?;
                    self.notifiers.push(notifier);
                    irq_qp = Some(qp);
                }
                Err(nvaio_nvme::ControllerError::NoInterrupts { dev, why }) => {
                    tracing::warn!("{dev}: no interrupts ({why}); this queue pair is polled");
                }
                Err(e) => return Err(create_failed(e)),
            }
        }
        let qp = match irq_qp {
            Some(qp) => qp,
            None => {
                if self.waiter.is_some() {
                    self.polled_queues += 1;
                }
                ctrl.create_queue_pair(entries).map_err(create_failed)?
            }
        };
        let pool = PagePool::new(
            ctrl.device().dma_mapper(),
            self.opts.bounce_initial,
            self.opts.bounce_max,
        )
        .map_err(|e| {
            tracing::warn!("cannot allocate bounce memory: {e}");
            Errno(libc::ENOMEM)
        })?;
        let max_transfer = ctrl.max_transfer();
        let max_pages = prp::pages_spanned(PAGE_SIZE - 4, max_transfer) + 1;
        let cmds = (0..qp.entries())
            .map(|_| Cmd {
                req: NONE,
                offset: 0,
                len: 0,
                page_off: 0,
                pages: Vec::with_capacity(max_pages),
                direct: false,
                busy: false,
            })
            .collect();
        self.queues.push(Queue {
            ctrl: ctrl.clone(),
            qp,
            pool,
            cmds,
            pending: VecDeque::with_capacity(self.max_reqs as usize),
            max_transfer,
            iovas: Vec::with_capacity(max_pages),
            dead: false,
        });
        let q = self.queues.len() - 1;
        let ctrl = self.queues[q].ctrl.clone();
        for b in &mut self.registered {
            b.map_for(q, &ctrl)?;
        }
        Ok(q)
    }

    /// Registers `len` bytes at `addr` for zero-copy I/O: reads and writes whose buffer lies
    /// entirely inside it move data straight between the device and this memory, with no bounce
    /// copy. The memory is mapped for DMA (and so pinned) on every controller the context uses.
    /// Vectored requests, and buffers outside registered memory, still go through bounce pages.
    ///
    /// Errors: EINVAL for an empty or wrapping range or one overlapping a registered buffer;
    /// ENOMEM if the IOMMU mapping fails (locked-memory limit, IOVA space).
    ///
    /// # Safety
    /// The memory must stay allocated and mapped in this process until
    /// [`Context::unregister_buffer`] or until the context is dropped. The device writes it
    /// during reads into it, as the kernel does with O_DIRECT.
    pub unsafe fn register_buffer(&mut self, addr: *mut u8, len: usize) -> Result<(), Errno> {
        if self.forked() {
            return Err(Errno(libc::EINVAL));
        }
        let addr = addr as u64;
        let end = addr.checked_add(len as u64).ok_or(Errno(libc::EINVAL))?;
        if len == 0 || self.registered.iter().any(|b| addr < b.addr + b.len as u64 && b.addr < end)
        {
            return Err(Errno(libc::EINVAL));
        }
        let page = PAGE_SIZE as u64;
        let base = addr & !(page - 1);
        let hull = (end.div_ceil(page) * page - base) as usize;
        let mut b = Registered { addr, len, base, hull, maps: Vec::new() };
        for q in 0..self.queues.len() {
            let ctrl = self.queues[q].ctrl.clone();
            b.map_for(q, &ctrl)?;
        }
        self.registered.push(b);
        Ok(())
    }

    /// Undoes [`Context::register_buffer`] for the buffer registered at `addr`.
    ///
    /// Errors: EINVAL if nothing is registered there; EBUSY while requests are in flight (any of
    /// them could be using it).
    pub fn unregister_buffer(&mut self, addr: *mut u8) -> Result<(), Errno> {
        let i = self
            .registered
            .iter()
            .position(|b| b.addr == addr as u64)
            .ok_or(Errno(libc::EINVAL))?;
        if self.in_flight > 0 {
            return Err(Errno(libc::EBUSY));
        }
        self.registered.remove(i);
        Ok(())
    }

    /// `io_submit`: queues the iocbs in order and returns how many were queued. If the first
    /// one fails, its errno is returned; a later failure stops the batch there and the count so
    /// far is returned. Queued requests complete through the ring, errors detected after
    /// queueing (device errors, misaligned I/O) as events with a negative `res`.
    ///
    /// Errors: EAGAIN when the context already holds `nr_events` requests (in flight or
    /// unreaped); EBADF for a descriptor nvaio does not own, or a read on a write-only one (and
    /// the reverse); EINVAL for an unknown opcode, a reserved field that is not zero, a negative
    /// offset, or too many iovecs; EOPNOTSUPP for unknown `aio_rw_flags`.
    ///
    /// # Safety
    /// Each iocb's buffer (and, for the vectored opcodes, its iovec array, read here) must be
    /// valid for the transfer it describes, and a read's buffer must not be otherwise accessed,
    /// until the request's event has been delivered or the context dropped (dropping waits for
    /// requests in flight): the device and nvaio write and read it in the meantime, exactly as
    /// the kernel does with the buffers of its AIO. This is the contract of `io_submit(2)`.
    pub unsafe fn submit(&mut self, iocbs: &[&Iocb]) -> Result<usize, Errno> {
        // SAFETY: the caller's promise is the same contract.
        match unsafe { self.submit_partial(iocbs) } {
            (0, Some(e)) => Err(e),
            (queued, _) => Ok(queued),
        }
    }

    /// As [`Context::submit`], but also says why the batch stopped early: the count queued, and
    /// the errno of the iocb that was refused, if one was (the iocbs after it were not looked
    /// at). The C ABI uses it to store `aio_key` exactly where the kernel would.
    ///
    /// # Safety
    /// As for [`Context::submit`].
    pub unsafe fn submit_partial(&mut self, iocbs: &[&Iocb]) -> (usize, Option<Errno>) {
        if self.forked() {
            return (0, Some(Errno(libc::EINVAL)));
        }
        let now = Instant::now();
        let mut queued = 0;
        let mut refused = None;
        for iocb in iocbs {
            match self.submit_one(iocb, now) {
                Ok(()) => queued += 1,
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        // One doorbell per queue for the whole batch.
        for q in 0..self.queues.len() {
            self.issue(q);
            self.queues[q].qp.ring();
        }
        // Events completed inside submit (POLL, errors reported as events) must show on the
        // notification descriptor too.
        if let Some(ev) = &self.ctx_event {
            if self.ring.pending() > 0 {
                let _ = ev.write(1);
            }
        }
        (queued, refused)
    }

    fn submit_one(&mut self, iocb: &Iocb, now: Instant) -> Result<(), Errno> {
        // The checks run in the order of io_submit_one() in fs/aio.c, so that an iocb with
        // several faults gets the same errno as from the kernel.
        if iocb.aio_reserved2 != 0 || (iocb.aio_nbytes as i64) < 0 {
            return Err(Errno(libc::EINVAL));
        }
        let Some(&r) = self.free_reqs.last() else {
            return Err(Errno(libc::EAGAIN));
        };
        if !self.slots.take(self.ring.head(), self.ring.tail()) {
            return Err(Errno(libc::EAGAIN));
        }
        match self.prepare(r, iocb, now) {
            Ok(()) => {
                self.free_reqs.pop();
                Ok(())
            }
            Err(e) => {
                // A request that failed to start gives its slot straight back.
                self.slots.put(1);
                Err(e)
            }
        }
    }

    /// Validates `iocb` and turns it into request `r` (not yet taken off the free list).
    /// Errors here are io_submit's; problems found later become events.
    fn prepare(&mut self, r: u32, iocb: &Iocb, now: Instant) -> Result<(), Errno> {
        let fd = iocb.aio_fildes as i32;
        let fi = match self.resolve(fd) {
            Ok(fi) => Some(fi),
            Err(e) if e.0 == libc::EBADF && kernel::is_open_fd(fd) => None,
            Err(e) => return Err(e),
        };
        // The kernel holds a reference to the eventfd until the event is posted, so closing
        // the number meanwhile (and reusing it for a file) changes nothing. nvaio holds a
        // duplicate for the same reason, and closes it after signalling.
        let resfd = if iocb.aio_flags & abi::IOCB_FLAG_RESFD != 0 {
            let efd = iocb.aio_resfd as RawFd;
            kernel::check_eventfd(efd)?;
            kernel::dup_cloexec(efd)?
        } else {
            -1
        };
        let result = match fi {
            None => self.prepare_kernel(r, iocb, resfd, now),
            Some(fi) => self.prepare_nvme(r, iocb, fi, resfd, now),
        };
        if result.is_err() && resfd >= 0 {
            kernel::close(resfd);
        }
        result
    }

    /// The part of `prepare` for a namespace of nvaio's; `resfd` is owned by the request once
    /// this succeeds.
    fn prepare_nvme(
        &mut self,
        r: u32,
        iocb: &Iocb,
        fi: usize,
        resfd: RawFd,
        now: Instant,
    ) -> Result<(), Errno> {
        let (access, nsid, block_size, size, q) = {
            let (_, f, q) = &self.files[fi];
            (f.access, f.ns.nsid, f.ns.block_size, f.ns.size_bytes(), *q)
        };
        let kind = match iocb.aio_lio_opcode {
            opcode::PREAD | opcode::PREADV => Kind::Read,
            opcode::PWRITE | opcode::PWRITEV => Kind::Write,
            opcode::FSYNC | opcode::FDSYNC => Kind::Flush,
            opcode::POLL => Kind::Poll,
            _ => return Err(Errno(libc::EINVAL)),
        };

        let req = &mut self.reqs[r as usize];
        req.segs.clear();
        let mut total = 0usize;
        match kind {
            Kind::Read | Kind::Write => {
                // aio_prep_rw: priority, then flags; then the access mode.
                if iocb.aio_flags & abi::IOCB_FLAG_IOPRIO != 0 {
                    check_ioprio(iocb.aio_reqprio)?;
                }
                if iocb.aio_rw_flags & !rwf::SUPPORTED != 0 {
                    return Err(Errno(libc::EOPNOTSUPP));
                }
                let allowed =
                    if kind == Kind::Read { access.can_read() } else { access.can_write() };
                if !allowed {
                    return Err(Errno(libc::EBADF));
                }
                total = import_buffer(iocb, &mut req.segs)?;
                // rw_verify_area: a negative position, or one that overflows with the count.
                if iocb.aio_offset < 0 || iocb.aio_offset.checked_add(total as i64).is_none() {
                    return Err(Errno(libc::EINVAL));
                }
            }
            Kind::Flush => {
                if iocb.aio_buf != 0
                    || iocb.aio_offset != 0
                    || iocb.aio_nbytes != 0
                    || iocb.aio_rw_flags != 0
                {
                    return Err(Errno(libc::EINVAL));
                }
            }
            Kind::Poll | Kind::Kernel => {}
        }
        if kind == Kind::Poll {
            // aio_poll on a block device: no poll method, so the default mask answers at once;
            // a request for none of those events is refused.
            if iocb.aio_buf > u64::from(u16::MAX)
                || iocb.aio_offset != 0
                || iocb.aio_nbytes != 0
                || iocb.aio_rw_flags != 0
            {
                return Err(Errno(libc::EINVAL));
            }
            let wanted = iocb.aio_buf as i64 | i64::from(libc::POLLERR | libc::POLLHUP);
            let default =
                i64::from(libc::POLLIN | libc::POLLOUT | libc::POLLRDNORM | libc::POLLWRNORM);
            let mask = wanted & default;
            if mask == 0 {
                return Err(Errno(libc::EINVAL));
            }
            self.start(r, iocb, Kind::Poll, resfd, now);
            self.finish(r, mask);
            return Ok(());
        }

        self.start(r, iocb, kind, resfd, now);
        let req = &mut self.reqs[r as usize];
        req.queue = q;
        req.nsid = nsid;
        req.block_shift = block_size.trailing_zeros();
        req.fua = iocb.aio_rw_flags & (rwf::DSYNC | rwf::SYNC) != 0;
        req.nowait = iocb.aio_rw_flags & rwf::NOWAIT != 0;
        req.pos = iocb.aio_offset.max(0) as u64;
        req.total = total;
        if kind != Kind::Flush {
            if let Some(res) = block_device_check(req, kind, u64::from(block_size), size) {
                self.finish(r, res);
                return Ok(());
            }
        }
        let queue = &mut self.queues[usize::from(q)];
        if queue.dead {
            self.finish(r, -i64::from(libc::EIO));
            return Ok(());
        }
        if self.reqs[r as usize].nowait && !queue.pending.is_empty() {
            // Others already wait for resources, so this one would too.
            self.finish(r, -i64::from(libc::EAGAIN));
            return Ok(());
        }
        queue.pending.push_back(r);
        Ok(())
    }

    /// Marks request `r` in flight for `iocb`.
    fn start(&mut self, r: u32, iocb: &Iocb, kind: Kind, resfd: RawFd, now: Instant) {
        let req = &mut self.reqs[r as usize];
        req.obj = iocb as *const Iocb as u64;
        req.data = iocb.aio_data;
        req.kind = kind;
        req.issued = 0;
        req.outstanding = 0;
        req.res = 0;
        req.waited = false;
        req.resfd = resfd;
        req.deadline = now + self.opts.command_timeout;
        req.active = true;
        self.in_flight += 1;
        self.stats.submitted += 1;
    }

    /// Hands an iocb on a descriptor nvaio does not own to the kernel's AIO.
    fn prepare_kernel(
        &mut self,
        r: u32,
        iocb: &Iocb,
        resfd: RawFd,
        now: Instant,
    ) -> Result<(), Errno> {
        if self.kernel.is_none() {
            self.kernel = Some(KernelAio::new(self.reqs.len() as u32)?);
        }
        let kernel = self.kernel.as_mut().expect("just created");
        match &self.ctx_event {
            // Interrupt and hybrid modes sleep on the context's eventfd: the kernel signals it,
            // and nvaio signals the application's own eventfd when it posts the event.
            Some(ev) => {
                let mut copy = *iocb;
                copy.aio_flags |= abi::IOCB_FLAG_RESFD;
                copy.aio_resfd = std::os::fd::AsRawFd::as_raw_fd(ev) as u32;
                kernel.submit(r, &copy)?;
                self.start(r, iocb, Kind::Kernel, resfd, now);
            }
            // Polled mode reads the kernel's ring; the kernel signals the application's eventfd
            // (and holds its own reference to it), so nvaio's duplicate is not needed.
            None => {
                kernel.submit(r, iocb)?;
                if resfd >= 0 {
                    kernel::close(resfd);
                }
                self.start(r, iocb, Kind::Kernel, -1, now);
            }
        }
        // The kernel enforces its own limits on kernel requests; nvaio's deadline does not apply.
        self.reqs[r as usize].deadline = now + Duration::from_secs(u64::from(u32::MAX));
        self.kernel_in_flight += 1;
        Ok(())
    }

    /// Turns pending requests of queue `q` into commands while slots and pages last.
    fn issue(&mut self, q: usize) {
        loop {
            match self.issue_some(q) {
                Issue::Blocked | Issue::Empty => return,
                // A request that failed before reaching the device completes here, outside the
                // borrow of the queue.
                Issue::Failed(r, res) => self.finish(r, res),
            }
        }
    }

    fn issue_some(&mut self, q: usize) -> Issue {
        let Queue { qp, pool, cmds, pending, max_transfer, iovas, .. } = &mut self.queues[q];
        let registered = &self.registered;
        while let Some(&r) = pending.front() {
            let req = &mut self.reqs[r as usize];
            loop {
                let flush = req.kind == Kind::Flush;
                if (flush && req.outstanding > 0) || (!flush && req.issued >= req.total) {
                    break;
                }
                // Out of queue slots or bounce pages: the request waits for completions, or,
                // with RWF_NOWAIT and nothing sent yet, fails with -EAGAIN as the block layer
                // does when it cannot get a tag at once.
                macro_rules! blocked {
                    () => {{
                        if !req.waited {
                            req.waited = true;
                            self.stats.waits += 1;
                        }
                        if req.nowait && req.issued == 0 {
                            pending.pop_front();
                            return Issue::Failed(r, -i64::from(libc::EAGAIN));
                        }
                        return Issue::Blocked;
                    }};
                }
                let Some(slot) = qp.next_slot() else { blocked!() };
                let mut sqe;
                // Where the data lives for the device: bounce pages, or the application's own
                // registered memory (then only a PRP list page, if any, comes from the pool).
                let mut direct = None;
                let mut pages_needed = 0;
                let (len, page_off) = if flush {
                    sqe = Sqe::new(nvm::FLUSH, req.nsid);
                    (0, 0)
                } else {
                    let len = (req.total - req.issued).min(*max_transfer);
                    let addr = segment_addr(&req.segs, req.issued);
                    // Mirror the buffer's offset within its page (dword aligned): registered
                    // memory is used in place, and bounce pages keep the same PRP shapes.
                    let page_off = (addr as usize) & (PAGE_SIZE - 1) & !3;
                    let n = prp::pages_spanned(page_off, len);
                    if req.segs.len() == 1 && !registered.is_empty() {
                        direct = registered.iter().find_map(|b| b.iova_for(q, addr, len));
                    }
                    pages_needed = usize::from(prp::needs_list(n));
                    if direct.is_none() {
                        pages_needed += n;
                    }
                    if !pool.reserve(pages_needed) {
                        blocked!()
                    }
                    let opc = if req.kind == Kind::Read { nvm::READ } else { nvm::WRITE };
                    sqe = Sqe::new(opc, req.nsid);
                    let slba = (req.pos + req.issued as u64) >> req.block_shift;
                    sqe.cdw10 = slba as u32;
                    sqe.cdw11 = (slba >> 32) as u32;
                    let nlb_z = (len >> req.block_shift) as u32 - 1;
                    sqe.cdw12 = nlb_z | if req.fua { RW_FUA } else { 0 };
                    (len, page_off)
                };
                let cmd = &mut cmds[usize::from(slot)];
                cmd.pages.clear();
                cmd.direct = direct.is_some();
                self.stats.zero_copy += u64::from(cmd.direct);
                if !flush {
                    for _ in 0..pages_needed {
                        // `reserve` guaranteed these.
                        cmd.pages.push(pool.take().expect("reserved page"));
                    }
                    let n = prp::pages_spanned(page_off, len);
                    iovas.clear();
                    let list = match direct {
                        Some(iova) => {
                            let first = iova & !(PAGE_SIZE as u64 - 1);
                            iovas.extend((0..n as u64).map(|i| first + i * PAGE_SIZE as u64));
                            cmd.pages.first().copied()
                        }
                        None => {
                            if req.kind == Kind::Write {
                                copy_segments(
                                    pool, &cmd.pages, page_off, &req.segs, req.issued, len, true,
                                );
                            }
                            iovas.extend(cmd.pages[..n].iter().map(|&p| pool.iova(p)));
                            prp::needs_list(n).then(|| cmd.pages[n])
                        }
                    };
                    let list_iova = list.map(|l| pool.iova(l));
                    let built = prp::build(iovas, page_off, len, list_iova, |i, iova| {
                        if let Some(l) = list {
                            pool.write_u64(l, i * 8, iova);
                        }
                    });
                    match built {
                        Ok((prp1, prp2)) => {
                            sqe.prp1 = prp1;
                            sqe.prp2 = prp2;
                        }
                        Err(e) => {
                            // Unreachable by construction (dword-aligned offsets, page-aligned
                            // pages, commands within one list page); if it ever happens it
                            // fails the request, not the process.
                            tracing::error!("PRP construction failed: {e}");
                            for &p in cmd.pages.iter() {
                                pool.put(p);
                            }
                            cmd.pages.clear();
                            req.res = -i64::from(libc::EIO);
                            req.issued = req.total;
                            if req.outstanding == 0 {
                                pending.pop_front();
                                return Issue::Failed(r, -i64::from(libc::EIO));
                            }
                            break;
                        }
                    }
                }
                cmd.req = r;
                cmd.offset = req.issued;
                cmd.len = len;
                cmd.page_off = page_off;
                cmd.busy = true;
                let submitted = qp.submit(&mut sqe);
                debug_assert_eq!(submitted, Some(slot));
                req.issued += len;
                req.outstanding += 1;
                self.stats.commands += 1;
                if flush {
                    break;
                }
            }
            pending.pop_front();
        }
        Issue::Empty
    }

    /// Reaps every queue's completions, issues what waits, and rings doorbells.
    fn poll_queues(&mut self) -> usize {
        let mut reaped = 0;
        if self.kernel_in_flight > 0 {
            reaped += self.poll_kernel();
        }
        for q in 0..self.queues.len() {
            reaped += self.reap(q);
            if !self.queues[q].pending.is_empty() {
                self.issue(q);
                self.queues[q].qp.ring();
            }
        }
        reaped
    }

    fn reap(&mut self, q: usize) -> usize {
        let mut done = [NONE; 64];
        let mut total = 0;
        loop {
            let mut n = 0;
            let Queue { qp, pool, cmds, .. } = &mut self.queues[q];
            let reqs = &mut self.reqs;
            let reaped = qp.poll(done.len(), |c| {
                let cmd = &mut cmds[usize::from(c.slot)];
                let status = c.cqe.status();
                if cmd.req != NONE {
                    let req = &mut reqs[cmd.req as usize];
                    if !status.is_success() {
                        if req.res >= 0 {
                            req.res = -i64::from(status_to_errno(status));
                        }
                    } else if req.kind == Kind::Read && req.res >= 0 && !cmd.direct {
                        copy_segments(
                            pool,
                            &cmd.pages,
                            cmd.page_off,
                            &req.segs,
                            cmd.offset,
                            cmd.len,
                            false,
                        );
                    }
                    req.outstanding -= 1;
                    let fully_issued =
                        if req.kind == Kind::Flush { true } else { req.issued >= req.total };
                    if req.outstanding == 0 && fully_issued {
                        done[n] = cmd.req;
                        n += 1;
                    }
                }
                for &p in &cmd.pages {
                    pool.put(p);
                }
                cmd.pages.clear();
                cmd.req = NONE;
                cmd.busy = false;
            });
            for &r in &done[..n] {
                let res = {
                    let req = &self.reqs[r as usize];
                    if req.res < 0 {
                        req.res
                    } else {
                        req.total as i64
                    }
                };
                self.finish(r, res);
            }
            total += reaped;
            if reaped < done.len() {
                return total;
            }
        }
    }

    /// Completes request `r` with `res`: posts the event, signals its eventfd, frees it.
    fn finish(&mut self, r: u32, res: i64) {
        self.finish2(r, res, 0);
    }

    fn finish2(&mut self, r: u32, res: i64, res2: i64) {
        let req = &mut self.reqs[r as usize];
        debug_assert!(req.active);
        req.active = false;
        let ev = IoEvent { data: req.data, obj: req.obj, res, res2 };
        let resfd = req.resfd;
        if req.kind == Kind::Kernel {
            self.kernel_in_flight -= 1;
        }
        if !self.ring.push(ev) {
            // Only possible if the application wrote a bogus head into the ring.
            tracing::warn!("event ring full: the application corrupted aio_ring.head");
        }
        self.slots.completed(self.ring.head(), self.ring.tail());
        if resfd >= 0 {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a local to the request's own duplicate of the
            // application's eventfd, which it then closes.
            unsafe { libc::write(resfd, (&one as *const u64).cast(), 8) };
            kernel::close(resfd);
        }
        self.in_flight -= 1;
        self.stats.completed += 1;
        self.free_reqs.push(r);
    }

    /// Moves completed kernel requests' events into this context's ring, all of them: a batch
    /// at a time, so none is ever taken from the kernel's ring without being posted.
    fn poll_kernel(&mut self) -> usize {
        const BATCH: usize = 32;
        let mut total = 0;
        loop {
            let Some(kernel) = self.kernel.as_mut() else { return total };
            let mut done = [(0u32, 0i64, 0i64); BATCH];
            let mut n = 0;
            kernel.reap(BATCH, |r, res, res2| {
                done[n] = (r, res, res2);
                n += 1;
            });
            for &(r, res, res2) in &done[..n] {
                let known = (r as usize) < self.reqs.len()
                    && self.reqs[r as usize].active
                    && self.reqs[r as usize].kind == Kind::Kernel;
                if known {
                    self.finish2(r, res, res2);
                } else {
                    tracing::warn!(request = r, "kernel AIO event for no request of nvaio's");
                }
            }
            total += n;
            if n < BATCH {
                return total;
            }
        }
    }

    /// `io_getevents`: waits until at least `min_nr` events are available (or `timeout`
    /// passes), then moves up to `out.len()` of them into `out` and returns how many.
    /// `timeout` None waits without limit; `Some(ZERO)` does not wait.
    ///
    /// Errors: EINVAL if `min_nr > out.len()`.
    pub fn get_events(
        &mut self,
        min_nr: usize,
        out: &mut [IoEvent],
        timeout: Option<Duration>,
    ) -> Result<usize, Errno> {
        if min_nr > out.len() || self.forked() {
            return Err(Errno(libc::EINVAL));
        }
        // A timeout too long to add to the clock is no limit at all.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut got = 0;
        loop {
            let mut now_check = None;
            if self.in_flight > 0 {
                self.poll_queues();
                // Deadlines and health are checked even by callers that never wait (min_nr 0),
                // so a hung command times out for them too.
                now_check = self.tick();
            }
            got += self.ring.pop_into(&mut out[got..]);
            // As fs/aio.c: done once min_nr events are in hand (at once for min_nr 0), taking
            // whatever else was already there up to nr.
            let timed_out = got < min_nr && {
                if now_check.is_none() {
                    now_check = self.tick();
                }
                deadline.is_some_and(|d| now_check.unwrap_or_else(Instant::now) >= d)
            };
            if got >= min_nr || timed_out {
                if got == 0 {
                    // Returning empty-handed: consume pending notifier signals, so the
                    // notification descriptor goes quiet, taking anything that completed
                    // meanwhile. While events flow this is skipped: it costs a system call.
                    got += self.rearm_and_poll(&mut out[got..]);
                }
                return Ok(got);
            }
            // Polled mode spins, whether or not anything is in flight: that is what it is for.
            // So does a context that has a polled queue with requests on it.
            if self.waiter.is_none() || (self.polled_queues > 0 && self.in_flight > 0) {
                std::hint::spin_loop();
                continue;
            }
            self.sleep_until_completion(deadline);
        }
    }

    /// Consumes pending notifier signals (so the notification descriptor goes quiet), then polls
    /// once more for what completed meanwhile.
    fn rearm_and_poll(&mut self, out: &mut [IoEvent]) -> usize {
        let Some(w) = &self.waiter else { return 0 };
        w.drain();
        if self.in_flight > 0 {
            self.poll_queues();
        }
        self.ring.pop_into(out)
    }

    /// Interrupt and hybrid modes: sleeps until a notifier fires, the deadline passes, or it is
    /// time to check request deadlines. Hybrid mode spins for its adaptive budget first.
    fn sleep_until_completion(&mut self, deadline: Option<Instant>) {
        let start = Instant::now();
        if self.opts.mode == CompletionMode::Hybrid && self.in_flight > 0 {
            let mut spin = std::mem::take(&mut self.spin);
            let caught = spin.spin(|| self.poll_queues() > 0);
            self.spin = spin;
            if caught {
                return;
            }
        }
        // No need to look again: the queues were polled just before, and anything completing
        // since left an unconsumed signal that ends this wait at once (see `crate::wait`).
        let now = Instant::now();
        let mut limit = deadline.map(|d| d.saturating_duration_since(now));
        if self.in_flight > 0 {
            // Wake up in time to fail requests past their deadline.
            let check = self.next_expiry_check.saturating_duration_since(now);
            limit = Some(limit.map_or(check, |l| l.min(check)));
        }
        if let Some(w) = &self.waiter {
            // An interrupted or failed wait just means another round.
            let _ = w.wait(limit);
        }
        // Check deadlines on the next round, since time passed while asleep.
        self.polls_since_check = 255;
        if self.opts.mode == CompletionMode::Hybrid && self.in_flight > 0 {
            self.spin.record(start.elapsed(), false);
        }
    }

    /// Every so often while waiting, checks deadlines and controller health. Returns the
    /// current time when it read the clock.
    fn tick(&mut self) -> Option<Instant> {
        self.polls_since_check += 1;
        if self.polls_since_check < 256 {
            return None;
        }
        self.polls_since_check = 0;
        let now = Instant::now();
        if now >= self.next_expiry_check {
            // Deadlines are seconds long; looking every few milliseconds is plenty, and keeps the
            // scan of the request table and the CSTS read off the polling loop.
            self.next_expiry_check = now + EXPIRY_CHECK_INTERVAL;
            self.expire(now);
        }
        Some(now)
    }

    fn expire(&mut self, now: Instant) {
        for q in 0..self.queues.len() {
            if !self.queues[q].dead {
                if let Err(e) = self.queues[q].ctrl.health() {
                    tracing::warn!("{e}; failing its I/O");
                    self.queues[q].dead = true;
                    self.fail_queue(q, -i64::from(libc::EIO));
                }
            }
        }
        for r in 0..self.reqs.len() as u32 {
            let req = &self.reqs[r as usize];
            if req.active && req.kind != Kind::Kernel && req.deadline <= now {
                let q = usize::from(req.queue);
                self.stats.timeouts += 1;
                self.detach(q, r);
                self.finish(r, -i64::from(libc::ETIMEDOUT));
            }
        }
    }

    /// Separates request `r` from its commands and from the pending list: the commands keep
    /// their slots and pages until the device answers, but no longer refer to the request.
    fn detach(&mut self, q: usize, r: u32) {
        let queue = &mut self.queues[q];
        for cmd in queue.cmds.iter_mut() {
            if cmd.busy && cmd.req == r {
                cmd.req = NONE;
            }
        }
        queue.pending.retain(|&p| p != r);
    }

    fn fail_queue(&mut self, q: usize, res: i64) {
        for r in 0..self.reqs.len() as u32 {
            let req = &self.reqs[r as usize];
            if req.active && req.kind != Kind::Kernel && usize::from(req.queue) == q {
                self.detach(q, r);
                self.finish(r, res);
            }
        }
    }

    /// `io_cancel`: starts cancelling the request submitted with the iocb at `iocb`.
    ///
    /// As in Linux 6.1, the outcome always arrives through the ring, and `Err(EINPROGRESS)`
    /// says cancellation has started. Parts of the request not yet given to the device are
    /// dropped at once; each command the device holds gets an NVMe Abort. The event then has
    /// `res` = -ECANCELED if anything was dropped or aborted, and the request's real result if
    /// the controller declined every Abort and completed the commands (a controller may decline
    /// any Abort; QEMU 7.2's always does). The kernel itself cannot cancel block I/O at all and
    /// answers EINVAL there: this is where nvaio differs on purpose.
    ///
    /// Errors: EINPROGRESS (cancellation started; not a failure); EINVAL if no request of this
    /// context was submitted with that iocb or it has already completed.
    pub fn cancel(&mut self, iocb: *const Iocb) -> Result<(), Errno> {
        if self.forked() {
            return Err(Errno(libc::EINVAL));
        }
        let obj = iocb as u64;
        let r = self
            .reqs
            .iter()
            .position(|req| req.active && req.obj == obj)
            .ok_or(Errno(libc::EINVAL))? as u32;
        if self.reqs[r as usize].kind == Kind::Kernel {
            return match self.kernel.as_mut() {
                Some(k) => k.cancel(r).and(Err(Errno(libc::EINPROGRESS))),
                None => Err(Errno(libc::EINVAL)),
            };
        }
        let q = usize::from(self.reqs[r as usize].queue);
        let queue = &mut self.queues[q];
        let req = &mut self.reqs[r as usize];
        let unissued = req.kind != Kind::Flush && req.issued < req.total
            || req.kind == Kind::Flush && req.outstanding == 0;
        if unissued {
            queue.pending.retain(|&p| p != r);
            req.issued = req.total;
            if req.res >= 0 {
                req.res = -i64::from(libc::ECANCELED);
            }
        }
        if req.outstanding == 0 {
            let res = req.res;
            self.finish(r, res);
            return Err(Errno(libc::EINPROGRESS));
        }
        // Abort every command of the request the device holds. Their completions (aborted or
        // not) arrive on the I/O queue and finish the request as usual.
        let qid = queue.qp.qid();
        for slot in 0..queue.cmds.len() {
            let cmd = &queue.cmds[slot];
            if !(cmd.busy && cmd.req == r) {
                continue;
            }
            let Some(cid) = queue.qp.cid_of(slot as u16) else { continue };
            match queue.ctrl.abort(qid, cid) {
                Ok(aborted) => {
                    tracing::debug!(qid, cid, aborted, "abort");
                    self.stats.aborts_sent += 1;
                }
                Err(e) => tracing::warn!("abort of command {cid} on queue {qid}: {e}"),
            }
        }
        Err(Errno(libc::EINPROGRESS))
    }

    /// `io_destroy`: waits for requests in flight (each bounded by the command timeout) and
    /// releases everything: the queue pairs are deleted from their controllers.
    pub fn destroy(mut self) {
        self.drain();
    }

    fn drain(&mut self) {
        while self.in_flight > 0 {
            self.poll_queues();
            // Deadlines and health are checked inside; every request ends by its deadline.
            self.tick();
            std::hint::spin_loop();
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        if self.forked() {
            // The queues and their memory are the parent's: leave the device alone. The
            // controller and DMA mappings skip their teardown in a child as well.
            return;
        }
        self.drain();
    }
}

/// The highest user address plus one on x86-64 with 4-level paging (TASK_SIZE_MAX): a buffer
/// reaching past it fails access_ok() in the kernel, which answers EFAULT.
const TASK_SIZE: u64 = (1 << 47) - 4096;

/// The DMA alignment the kernel's nvme driver asks of each buffer piece (dword).
const DMA_ALIGN_MASK: u64 = 3;

/// Reads the buffer description of a read or write iocb into `segs` and returns its length,
/// as aio_setup_rw() and import_iovec() do: lengths are cut at MAX_RW_COUNT, and ranges the
/// kernel would not accept as user memory are EFAULT. Memory that is merely unmapped cannot be
/// checked without touching it; the kernel would report it as an -EFAULT event, nvaio faults
/// (a documented difference).
fn import_buffer(iocb: &Iocb, segs: &mut Vec<(u64, usize)>) -> Result<usize, Errno> {
    let user_range = |addr: u64, len: u64| len <= TASK_SIZE && addr <= TASK_SIZE - len;
    match iocb.aio_lio_opcode {
        opcode::PREAD | opcode::PWRITE => {
            let len = iocb.aio_nbytes.min(abi::MAX_RW_COUNT);
            if !user_range(iocb.aio_buf, len) {
                return Err(Errno(libc::EFAULT));
            }
            segs.push((iocb.aio_buf, len as usize));
            Ok(len as usize)
        }
        _ => {
            let count = iocb.aio_nbytes;
            if count > abi::UIO_MAXIOV {
                return Err(Errno(libc::EINVAL));
            }
            if count == 0 {
                return Ok(0);
            }
            let bytes = count * std::mem::size_of::<libc::iovec>() as u64;
            if iocb.aio_buf == 0 || !user_range(iocb.aio_buf, bytes) {
                return Err(Errno(libc::EFAULT));
            }
            let iov = iocb.aio_buf as *const libc::iovec;
            let mut total: u64 = 0;
            for i in 0..count as usize {
                // SAFETY: the application promises `aio_nbytes` iovecs at `aio_buf`, as with
                // the kernel; the range was checked to be user memory above.
                let v = unsafe { iov.add(i).read_unaligned() };
                let len = v.iov_len as u64;
                if (len as i64) < 0 {
                    return Err(Errno(libc::EINVAL));
                }
                if !user_range(v.iov_base as u64, len) {
                    return Err(Errno(libc::EFAULT));
                }
                let len = len.min(abi::MAX_RW_COUNT - total);
                // Empty pieces stay: the kernel's alignment check looks at their address too.
                segs.push((v.iov_base as u64, len as usize));
                total += len;
            }
            Ok(total as usize)
        }
    }
}

/// What block/fops.c does before any I/O for a block device opened with O_DIRECT: the end of
/// the device, then alignment. Returns the event result when the request ends here.
fn block_device_check(req: &mut Request, kind: Kind, block: u64, size: u64) -> Option<i64> {
    let count = req.total as u64;
    match kind {
        Kind::Read => {
            if req.pos + count > size {
                if req.pos >= size {
                    return Some(0);
                }
                req.total = (size - req.pos) as usize;
                trim_segments(&mut req.segs, req.total);
            }
            if req.total == 0 {
                return Some(0);
            }
        }
        Kind::Write => {
            if count == 0 {
                return Some(0);
            }
            if req.pos >= size {
                return Some(-i64::from(libc::ENOSPC));
            }
            if req.pos + count > size {
                req.total = (size - req.pos) as usize;
                trim_segments(&mut req.segs, req.total);
            }
        }
        _ => return None,
    }
    // blkdev_dio_unaligned(): the position, and every piece's address and length.
    let unaligned = req.pos & (block - 1) != 0
        || req.segs.iter().any(|&(a, l)| a & DMA_ALIGN_MASK != 0 || l as u64 & (block - 1) != 0);
    if unaligned {
        return Some(-i64::from(libc::EINVAL));
    }
    // A null page faults in the kernel's direct I/O (an -EFAULT event); nvaio checks it rather
    // than crash.
    if req.segs.iter().any(|&(a, l)| l > 0 && a < 4096) {
        return Some(-i64::from(libc::EFAULT));
    }
    None
}

/// ioprio_check_cap(): the priority classes the kernel accepts for IOCB_FLAG_IOPRIO. As Linux
/// 6.1 reads the value, the class is bits 15:13 and the level bits 2:0; bits 12:3 are ignored,
/// so a level never exceeds 7. Class NONE takes only level 0, RT needs CAP_SYS_ADMIN or
/// CAP_SYS_NICE, classes 4 to 7 do not exist.
fn check_ioprio(prio: i16) -> Result<(), Errno> {
    const NONE: i32 = 0;
    const RT: i32 = 1;
    const BE: i32 = 2;
    const IDLE: i32 = 3;
    let prio = i32::from(prio);
    let class = (prio >> 13) & 7;
    let level = prio & 7;
    match class {
        // CAP_SYS_ADMIN (21) or CAP_SYS_NICE (23).
        RT if !has_capability(21) && !has_capability(23) => Err(Errno(libc::EPERM)),
        RT | BE | IDLE => Ok(()),
        NONE if level == 0 => Ok(()),
        _ => Err(Errno(libc::EINVAL)),
    }
}

/// Whether this thread has capability `cap` in its effective set (capget(2)).
fn has_capability(cap: u32) -> bool {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header { version: 0x2008_0522, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with version 3 writes two Data records into the array we pass.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    r == 0 && data[(cap / 32) as usize].effective & (1 << (cap % 32)) != 0
}

/// The address of byte `at` of a request's buffer.
fn segment_addr(segs: &[(u64, usize)], mut at: usize) -> u64 {
    for &(addr, len) in segs {
        if at < len {
            return addr + at as u64;
        }
        at -= len;
    }
    0
}

/// Shortens a buffer description to `total` bytes.
fn trim_segments(segs: &mut Vec<(u64, usize)>, total: usize) {
    let mut left = total;
    let mut keep = 0;
    for seg in segs.iter_mut() {
        if left == 0 {
            break;
        }
        seg.1 = seg.1.min(left);
        left -= seg.1;
        keep += 1;
    }
    segs.truncate(keep);
}

/// Copies `len` bytes between request bytes `offset..` of the application's buffer and the
/// command's bounce pages (starting `page_off` into the first page). `into_pages` selects the
/// direction: true for writes, false for reads.
fn copy_segments(
    pool: &PagePool,
    pages: &[PageId],
    page_off: usize,
    segs: &[(u64, usize)],
    offset: usize,
    len: usize,
    into_pages: bool,
) {
    let mut skip = offset;
    let mut done = 0;
    for &(addr, seg_len) in segs {
        if done == len {
            break;
        }
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let mut user = addr + skip as u64;
        let mut avail = (seg_len - skip).min(len - done);
        skip = 0;
        while avail > 0 {
            let pos = page_off + done;
            let (page, in_page) = (pages[pos / PAGE_SIZE], pos % PAGE_SIZE);
            let n = avail.min(PAGE_SIZE - in_page);
            // SAFETY: the application promised the buffer valid for the request's lifetime, as
            // with the kernel's AIO (a wild pointer faults, as it would in libaio).
            unsafe {
                if into_pages {
                    pool.copy_in(page, in_page, user as *const u8, n)
                } else {
                    pool.copy_out(page, in_page, user as *mut u8, n)
                }
            }
            user += n as u64;
            avail -= n;
            done += n;
        }
    }
}

// A context moves between threads (the C ABI keeps contexts in a shared registry); it is never
// used by two at once.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<Context>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments() {
        let segs = vec![(1000u64, 10usize), (5000, 20), (9000, 5)];
        assert_eq!(segment_addr(&segs, 0), 1000);
        assert_eq!(segment_addr(&segs, 9), 1009);
        assert_eq!(segment_addr(&segs, 10), 5000);
        assert_eq!(segment_addr(&segs, 31), 9001);
        let mut t = segs.clone();
        trim_segments(&mut t, 15);
        assert_eq!(t, vec![(1000, 10), (5000, 5)]);
    }
}
