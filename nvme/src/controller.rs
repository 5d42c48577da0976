//! Controller bring-up, admin commands, I/O queue creation, interrupts, asynchronous events and
//! shutdown.
//!
//! Initialisation follows Base Specification 2.0 §3.5.1: disable and wait for CSTS.RDY = 0,
//! program the admin queue, enable and wait for CSTS.RDY = 1, identify, negotiate the number of
//! queues. Every wait is bounded by CAP.TO; every register read is checked for the all-ones
//! pattern of a device that has gone away and for CSTS.CFS.
//!
//! # Interrupts
//! When the device has MSI-X vectors (and [`ControllerOptions::interrupts`] is on), bring-up
//! enables `nvec = min(vectors, granted I/O queues + 1)` of them through
//! [`Device::enable_interrupts`], each delivered to an eventfd. Doing it at bring-up rather than
//! on the first interrupt-driven queue keeps the admin queue's completions (Asynchronous Event
//! Requests above all) interrupt-driven from the start, and VFIO cannot add vectors to a live
//! MSI-X set without tearing it down.
//!
//! Vector 0 belongs to the admin queue (the admin completion queue always raises vector 0).
//! I/O queues made by [`Controller::create_queue_pair_irq`] get vectors from 1 up:
//! - with at least as many I/O vectors as granted queues, every queue has a vector of its own;
//! - with fewer, the top quarter of the I/O vectors (at least one) is a shared pool and the rest
//!   are given out one queue each, to whichever queue is created while one is free; once all are
//!   taken, new queues go to the least-loaded shared vector;
//! - with a single vector, every I/O queue shares vector 0 with the admin queue.
//!
//! A queue with a vector of its own waits on a duplicate of the vector's eventfd: no thread is
//! involved between the interrupt and the waiter. On a shared vector, one small relay thread per
//! vector blocks on the vector's eventfd and, when it fires, signals the private eventfd of every
//! queue on that vector; the waiters then look at their completion queues, and those with
//! nothing new simply wait again. Whether a vector is shared is decided when it is assigned, not
//! when a second queue arrives: a queue already reading the vector's eventfd directly could
//! consume a wake-up meant for the newcomer, so a direct vector is never shared later.
//!
//! Completions themselves are never reaped on these threads: the owner of a queue pair (the AIO
//! context, single-threaded by construction) drains its notifier, polls its completion queue and
//! only then sleeps. A completion cannot be lost between the poll and the sleep because the
//! eventfd stays readable until drained.
//!
//! # Asynchronous events
//! After bring-up the controller keeps `min(AERL + 1, 4)` Asynchronous Event Requests
//! outstanding (§5.2) with SMART / health critical warnings and, where OAES says so, namespace
//! attribute notices enabled. An AER completes whenever the controller has something to say, so
//! any reaping of the admin completion queue sets AER completions aside rather than dropping
//! them. They are then processed: the log page the event names is read (RAE clear, which
//! acknowledges the event and lets the controller report that type again), the event is logged
//! at warn level and kept for [`Controller::take_async_events`], and the request is re-armed.
//! With interrupts, the admin reaper thread (which blocks on vector 0, and also relays vector 0
//! to I/O queues when it is shared) does this as soon as the event arrives; without, every admin
//! command and every [`Controller::poll_admin`] does.
//!
//! Every thread waits with a timeout and watches a stop eventfd, so dropping the controller
//! joins them within a bounded time (one admin command at worst).

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvaio_dma::{DmaError, DmaRegion, PAGE_SIZE};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::prp::MAX_COMMAND_BYTES;
use crate::queue::{Notifier, QueuePair, MAX_QUEUE_ENTRIES};
use crate::spec::cmd::{admin, cns, feature, log_page};
use crate::spec::identify::{IdentifyController, IdentifyNamespace, IDENTIFY_LEN};
use crate::spec::regs::{self, offset, Cap, Cc, Csts, Version};
use crate::spec::status::{command_specific, generic, sct};
use crate::spec::{Cqe, Sqe, Status};
use crate::Device;

/// Entries in the admin queues: few admin commands are ever outstanding at once (the
/// Asynchronous Event Requests take up to [`MAX_AERS`] slots for good).
const ADMIN_ENTRIES: u16 = 32;

/// The most Asynchronous Event Requests kept outstanding.
const MAX_AERS: usize = 4;

/// Asynchronous events kept for [`Controller::take_async_events`]; older ones are dropped (and
/// counted) when nobody collects them.
const MAX_STORED_EVENTS: usize = 256;

/// Consecutive failed Asynchronous Event Requests after which they are no longer re-armed.
const AER_FAILURE_LIMIT: u32 = 8;

/// How long the interrupt threads sleep at most before looking at the stop flag (and, for the
/// admin reaper, at the admin completion queue: a safety net should an interrupt go missing).
const IRQ_THREAD_TICK_MS: i32 = 1000;

/// The MSI-X table holds at most 2048 vectors (PCI Local Bus 3.0, §6.8.2).
const MAX_MSIX_VECTORS: u32 = 2048;

/// Asynchronous Event Configuration (Feature 0Bh, CDW11): bits 5:0 enable an event for each
/// SMART / Health Critical Warning bit, bit 8 Namespace Attribute Notices.
const AEC_SMART_CRITICAL_WARNINGS: u32 = 0x3f;
const AEC_NAMESPACE_ATTRIBUTE: u32 = 1 << 8;

/// OAES (Identify Controller bytes 95:92), bit 8: Namespace Attribute Notices supported.
const OAES_OFFSET: usize = 92;
const OAES_NAMESPACE_ATTRIBUTE: u32 = 1 << 8;

/// Log page identifiers not (yet) among `spec::cmd::log_page`.
const LOG_CHANGED_NAMESPACE_LIST: u8 = 0x04;

/// Bytes read from the log page an event names: the whole SMART / Health log, the whole Changed
/// Namespace List, and otherwise a small prefix (any read with RAE clear acknowledges the event,
/// and 64 bytes lies within every log page).
const SMART_LOG_LEN: usize = 512;
const CHANGED_NS_LOG_LEN: usize = 4096;
const OTHER_LOG_LEN: usize = 64;

/// Why the controller or one of its admin commands failed.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("{dev}: the device no longer responds (registers read all ones)")]
    Gone { dev: String },
    #[error(
        "{dev}: this controller was opened before fork(); a child process must open it itself"
    )]
    Forked { dev: String },
    #[error("{dev}: the controller reports a fatal status (CSTS.CFS); it needs a reset")]
    Fatal { dev: String },
    #[error("{dev}: timed out after {ms} ms waiting for {what}")]
    Timeout { dev: String, what: &'static str, ms: u64 },
    #[error("{dev}: {what} failed: {status}")]
    Command { dev: String, what: &'static str, status: Status },
    #[error("{dev}: unsupported controller: {why}")]
    Unsupported { dev: String, why: String },
    #[error("{dev}: no I/O queue is left (the controller granted {granted})")]
    NoQueues { dev: String, granted: u16 },
    /// Interrupts are not available: the device has no MSI-X vectors, enabling them failed, or
    /// they were turned off in [`ControllerOptions`]. Callers fall back to polled queues.
    #[error("{dev}: no interrupts: {why}")]
    NoInterrupts { dev: String, why: String },
    #[error("DMA memory for the controller: {0}")]
    Dma(#[from] DmaError),
}

/// A namespace the driver can do I/O on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub nsid: u32,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Size in logical blocks.
    pub blocks: u64,
    pub identify: IdentifyNamespace,
}

impl Namespace {
    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.blocks * u64::from(self.block_size)
    }
}

/// Tunables of the bring-up.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// I/O queue pairs to ask for with Set Features (Number of Queues).
    pub io_queues: u16,
    /// Bound on each admin command.
    pub admin_timeout: Duration,
    /// Enable MSI-X at bring-up when the device has vectors (see the [module docs](self)).
    /// Without it only polled queues can be created.
    pub interrupts: bool,
    /// Keep Asynchronous Event Requests outstanding and report what they return.
    pub async_events: bool,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            io_queues: 64,
            admin_timeout: Duration::from_secs(10),
            interrupts: true,
            async_events: true,
        }
    }
}

/// Asynchronous Event Type values (AER completion DW0 bits 2:0; Base Specification 2.0,
/// figure 150).
pub mod event_type {
    pub const ERROR: u8 = 0;
    pub const SMART_HEALTH: u8 = 1;
    pub const NOTICE: u8 = 2;
    pub const IO_COMMAND_SPECIFIC: u8 = 6;
    pub const VENDOR_SPECIFIC: u8 = 7;
}

/// One asynchronous event the controller reported, as [`Controller::take_async_events`] returns
/// it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AsyncEvent {
    /// Asynchronous Event Type (DW0 bits 2:0), one of [`event_type`].
    pub event_type: u8,
    /// Asynchronous Event Information (DW0 bits 15:8): what happened, per type.
    pub info: u8,
    /// Log Page Identifier (DW0 bits 23:16): the log page that tells more (read, and thereby
    /// acknowledged, before the event is reported).
    pub log_page: u8,
    pub kind: AsyncEventKind,
}

/// What an [`AsyncEvent`] means for the user of the controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AsyncEventKind {
    /// SMART / Health status: the Critical Warning byte of the SMART / Health log (bit 0 spare
    /// below threshold, 1 temperature, 2 reliability degraded, 3 read-only, 4 volatile memory
    /// backup failed, 5 persistent memory region unreliable). When the log cannot be read, the
    /// bit the event information names.
    SmartCriticalWarning(u8),
    /// Notice, Namespace Attribute Changed: the namespaces of the Changed Namespace List log.
    /// Empty when the list is unknown (the log could not be read, or more than 1024 changed):
    /// treat every namespace as changed.
    NamespaceAttributeChanged(Vec<u32>),
    /// Error status: a host or controller error not tied to a command (see `info`).
    Error,
    /// Any other notice, I/O command set specific or vendor specific event.
    Other,
}

impl AsyncEvent {
    /// Decodes an AER completion's DW0, with the start of the log page it names if it was read.
    pub fn decode(dw0: u32, log: Option<&[u8]>) -> AsyncEvent {
        let event_type = (dw0 & 7) as u8;
        let info = (dw0 >> 8) as u8;
        let log_page = (dw0 >> 16) as u8;
        let kind = match (event_type, info) {
            (event_type::SMART_HEALTH, _) => {
                // Without the log, the information code names one warning.
                let fallback = match info {
                    0 => 1 << 2,
                    1 => 1 << 1,
                    2 => 1 << 0,
                    _ => 0,
                };
                let from_log = log.filter(|_| log_page == log_page::SMART_HEALTH);
                AsyncEventKind::SmartCriticalWarning(
                    from_log.and_then(|l| l.first().copied()).unwrap_or(fallback),
                )
            }
            (event_type::NOTICE, 0) => {
                let list = log
                    .filter(|_| log_page == LOG_CHANGED_NAMESPACE_LIST)
                    .map(changed_namespaces)
                    .unwrap_or_default();
                AsyncEventKind::NamespaceAttributeChanged(list)
            }
            (event_type::ERROR, _) => AsyncEventKind::Error,
            _ => AsyncEventKind::Other,
        };
        AsyncEvent { event_type, info, log_page, kind }
    }

    /// What the type and information codes say (Base Specification 2.0, §5.2).
    pub fn description(&self) -> &'static str {
        match (self.event_type, self.info) {
            (event_type::ERROR, 0) => "write to an invalid doorbell register",
            (event_type::ERROR, 1) => "invalid doorbell write value",
            (event_type::ERROR, 2) => "diagnostic failure",
            (event_type::ERROR, 3) => "persistent internal error",
            (event_type::ERROR, 4) => "transient internal error",
            (event_type::ERROR, 5) => "firmware image load error",
            (event_type::ERROR, _) => "error status",
            (event_type::SMART_HEALTH, 0) => "NVM subsystem reliability degraded",
            (event_type::SMART_HEALTH, 1) => "temperature threshold crossed",
            (event_type::SMART_HEALTH, 2) => "spare below threshold",
            (event_type::SMART_HEALTH, _) => "SMART / health status",
            (event_type::NOTICE, 0) => "namespace attribute changed",
            (event_type::NOTICE, 1) => "firmware activation starting",
            (event_type::NOTICE, 2) => "telemetry log changed",
            (event_type::NOTICE, 3) => "asymmetric namespace access change",
            (event_type::NOTICE, 4) => "predictable latency event aggregate log change",
            (event_type::NOTICE, 5) => "LBA status information alert",
            (event_type::NOTICE, 6) => "endurance group event aggregate log change",
            (event_type::NOTICE, 7) => "normal NVM subsystem shutdown",
            (event_type::NOTICE, _) => "notice",
            (event_type::IO_COMMAND_SPECIFIC, _) => "I/O command set specific status",
            (event_type::VENDOR_SPECIFIC, _) => "vendor specific event",
            _ => "event of a reserved type",
        }
    }
}

impl std::fmt::Display for AsyncEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (type {}, information {:#04x}, log page {:#04x})",
            self.description(),
            self.event_type,
            self.info,
            self.log_page
        )?;
        match &self.kind {
            AsyncEventKind::SmartCriticalWarning(w) => write!(f, ", critical warning {w:#04x}"),
            AsyncEventKind::NamespaceAttributeChanged(l) if l.is_empty() => {
                write!(f, ", changed namespaces unknown")
            }
            AsyncEventKind::NamespaceAttributeChanged(l) => write!(f, ", namespaces {l:?}"),
            AsyncEventKind::Error | AsyncEventKind::Other => Ok(()),
        }
    }
}

/// The NSIDs of a Changed Namespace List log (§5.16.1.5): up to 1024, zero-terminated; a first
/// entry of FFFFFFFFh means more than 1024 changed, returned as an empty (unknown) list.
fn changed_namespaces(log: &[u8]) -> Vec<u32> {
    let mut list: Vec<u32> = log
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .take_while(|&n| n != 0)
        .collect();
    if list.first() == Some(&u32::MAX) {
        list.clear();
    }
    list
}

/// Locks a mutex, going on with the data if another thread panicked while holding it: every
/// structure behind these locks stays consistent between statements.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Checks CSTS for a device that is gone or fatally failed.
fn check_health(dev: &dyn Device) -> Result<(), ControllerError> {
    let csts = Csts(dev.read32(offset::CSTS));
    if csts.is_gone() {
        Err(ControllerError::Gone { dev: dev.name().into() })
    } else if csts.cfs() {
        Err(ControllerError::Fatal { dev: dev.name().into() })
    } else {
        Ok(())
    }
}

/// An enabled controller. Dropping the last handle shuts it down (CC.SHN).
pub struct Controller {
    dev: Arc<dyn Device>,
    cap: Cap,
    version: Version,
    identify: IdentifyController,
    namespaces: Vec<Namespace>,
    /// The admin queue and the asynchronous event state, shared with the admin reaper thread.
    admin: Arc<Admin>,
    /// Which I/O queue IDs (1..=granted) are in use.
    qids: Mutex<Vec<bool>>,
    granted: u16,
    max_transfer: usize,
    opts: ControllerOptions,
    /// MSI-X vectors and their threads, when interrupts are on.
    irq: Option<Irq>,
    /// Why `irq` is `None`.
    irq_unavailable: String,
    /// The fork generation this controller was brought up in (see `nvaio_dma::fork`): in a
    /// child process it is the parent's, and must not be touched.
    fork_gen: u64,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("dev", &self.dev.name())
            .field("model", &self.identify.model)
            .field("serial", &self.identify.serial)
            .finish()
    }
}

impl Controller {
    /// Resets and enables the controller behind `dev`, identifies it and its namespaces.
    pub fn new(dev: Arc<dyn Device>) -> Result<Arc<Controller>, ControllerError> {
        Self::with_options(dev, ControllerOptions::default())
    }

    pub fn with_options(
        dev: Arc<dyn Device>,
        opts: ControllerOptions,
    ) -> Result<Arc<Controller>, ControllerError> {
        let name = dev.name().to_string();
        let cap = Cap(dev.read64(offset::CAP));
        if cap.0 == u64::MAX {
            return Err(ControllerError::Gone { dev: name });
        }
        let unsupported = |why: String| ControllerError::Unsupported { dev: name.clone(), why };
        if cap.css() & 1 == 0 {
            return Err(unsupported("it does not support the NVM command set".into()));
        }
        if cap.mpsmin() != 0 {
            return Err(unsupported(format!(
                "its smallest memory page is {} bytes; nvaio uses 4096",
                4096u64 << cap.mpsmin()
            )));
        }
        let admin_entries = ADMIN_ENTRIES.min(cap.mqes_z().saturating_add(1)).max(2);
        // Doorbells of the admin queue and of every I/O queue we might create must lie in BAR0.
        let doorbells_needed = regs::doorbell_offset(opts.io_queues, true, cap.dstrd()) + 4;
        let io_queue_limit = if doorbells_needed <= dev.bar_len() {
            opts.io_queues
        } else {
            let stride = 4usize << cap.dstrd();
            let fit = dev.bar_len().saturating_sub(offset::DOORBELLS) / (2 * stride);
            if fit < 2 {
                return Err(unsupported(format!(
                    "BAR0 is {} bytes, too small for its doorbells",
                    dev.bar_len()
                )));
            }
            (fit - 1).min(usize::from(u16::MAX)) as u16
        };

        // Disable, then wait for RDY = 0 (§3.5.1 step 1). A controller left enabled by a
        // previous owner holds queues that point at memory we no longer own.
        let cc = Cc(dev.read32(offset::CC));
        if cc.en() {
            dev.write32(offset::CC, cc.with_en(false).0);
        }
        wait_ready(&*dev, cap, false)?;

        // The admin queue (steps 2-3).
        let admin = QueuePair::new(dev.clone(), 0, admin_entries, cap.dstrd())?;
        dev.write32(offset::AQA, regs::aqa(admin_entries - 1, admin_entries - 1));
        dev.write64(offset::ASQ, admin.sq_iova());
        dev.write64(offset::ACQ, admin.cq_iova());

        // Enable with 4 KiB pages, round robin, 64-byte SQEs and 16-byte CQEs (steps 4-5).
        let cc = Cc::default().with_css(0).with_mps(0).with_ams(0).with_iosqes(6).with_iocqes(4);
        dev.write32(offset::CC, cc.0);
        dev.write32(offset::CC, cc.with_en(true).0);
        wait_ready(&*dev, cap, true)?;
        let version = Version(dev.read32(offset::VS));

        let admin = Arc::new(Admin::new(dev.clone(), admin, opts.admin_timeout));
        let mut ctrl = Controller {
            dev,
            cap,
            version,
            identify: IdentifyController::default(),
            namespaces: Vec::new(),
            admin,
            qids: Mutex::new(Vec::new()),
            granted: 0,
            max_transfer: PAGE_SIZE,
            opts,
            irq: None,
            irq_unavailable: String::new(),
            fork_gen: nvaio_dma::fork::generation(),
        };

        // Identify Controller (step 6).
        let page = DmaRegion::alloc(ctrl.dev.dma_mapper(), IDENTIFY_LEN)?;
        let mut sqe = Sqe::new(admin::IDENTIFY, 0);
        sqe.cdw10 = cns::CONTROLLER;
        ctrl.admin_command(sqe, Some(&page), "Identify Controller")?;
        let mut buf = [0u8; IDENTIFY_LEN];
        page.read_bytes(0, &mut buf);
        ctrl.identify = IdentifyController::parse(&buf);
        let oaes = u32::from_le_bytes([
            buf[OAES_OFFSET],
            buf[OAES_OFFSET + 1],
            buf[OAES_OFFSET + 2],
            buf[OAES_OFFSET + 3],
        ]);
        if ctrl.identify.sqes & 0xf > 6 || ctrl.identify.cqes & 0xf > 4 {
            return Err(unsupported(format!(
                "it requires SQ/CQ entry sizes 2^{}/2^{}",
                ctrl.identify.sqes & 0xf,
                ctrl.identify.cqes & 0xf
            )));
        }
        ctrl.max_transfer =
            ctrl.identify.max_transfer(PAGE_SIZE).unwrap_or(usize::MAX).min(MAX_COMMAND_BYTES);

        // Number of Queues (step 8): both counts are zero-based in CDW11 and in the reply.
        let want = io_queue_limit.max(1) - 1;
        let mut sqe = Sqe::new(admin::SET_FEATURES, 0);
        sqe.cdw10 = feature::NUMBER_OF_QUEUES;
        sqe.cdw11 = u32::from(want) | u32::from(want) << 16;
        let cqe = ctrl.admin_command(sqe, None, "Set Features (Number of Queues)")?;
        let nsqa = (cqe.dw0 & 0xffff) as u16;
        let ncqa = (cqe.dw0 >> 16) as u16;
        ctrl.granted = nsqa.min(ncqa).saturating_add(1).min(io_queue_limit);
        ctrl.qids = Mutex::new(vec![false; usize::from(ctrl.granted)]);

        // Active namespaces and their formats (step 7).
        ctrl.namespaces = ctrl.scan_namespaces(&page)?;

        // Interrupts, before the event requests so that the admin reaper sees their answers.
        // Neither is needed to do I/O: a failure leaves the controller polled, and says so.
        if !ctrl.opts.interrupts {
            ctrl.irq_unavailable = "interrupts are turned off in the controller options".into();
        } else {
            match Irq::start(&ctrl.dev, ctrl.granted, &ctrl.admin) {
                Ok(irq) => ctrl.irq = Some(irq),
                Err(why) => ctrl.irq_unavailable = why,
            }
        }

        // Asynchronous events (§5.2), configured with Set Features (Asynchronous Event
        // Configuration).
        if ctrl.opts.async_events {
            ctrl.enable_async_events(oaes);
        }
        tracing::debug!(
            dev = ctrl.dev.name(),
            model = %ctrl.identify.model,
            queues = ctrl.granted,
            namespaces = ctrl.namespaces.len(),
            vectors = ctrl.interrupt_vectors(),
            "controller ready"
        );
        Ok(Arc::new(ctrl))
    }

    /// Enables the asynchronous events nvaio reports and arms the requests that carry them.
    /// Failures are logged, not fatal: the controller works without events.
    fn enable_async_events(&self, oaes: u32) {
        let mut aec = AEC_SMART_CRITICAL_WARNINGS;
        if oaes & OAES_NAMESPACE_ATTRIBUTE != 0 {
            aec |= AEC_NAMESPACE_ATTRIBUTE;
        }
        let mut sqe = Sqe::new(admin::SET_FEATURES, 0);
        sqe.cdw10 = feature::ASYNC_EVENT_CONFIG;
        sqe.cdw11 = aec;
        if let Err(e) = self.admin.command(sqe, None, "Set Features (Asynchronous Event Config)") {
            // Events enabled by default (error status ones always are) still arrive.
            tracing::warn!("{e}; only the controller's default asynchronous events are reported");
        }
        let target = (usize::from(self.identify.aerl_z) + 1).min(MAX_AERS);
        lock(&self.admin.q).aer_target = target;
        self.admin.arm();
        self.admin.service();
    }

    fn scan_namespaces(&self, page: &DmaRegion) -> Result<Vec<Namespace>, ControllerError> {
        let mut sqe = Sqe::new(admin::IDENTIFY, 0);
        sqe.cdw10 = cns::ACTIVE_NAMESPACES;
        self.admin_command(sqe, Some(page), "Identify Active Namespace List")?;
        let mut list = [0u8; IDENTIFY_LEN];
        page.read_bytes(0, &mut list);
        let mut nsids: Vec<u32> = list
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .take_while(|&n| n != 0)
            .collect();
        // The list is sorted ascending per spec; a device that says otherwise is not trusted.
        nsids.sort_unstable();
        nsids.dedup();
        let mut out = Vec::new();
        for nsid in nsids {
            let mut sqe = Sqe::new(admin::IDENTIFY, nsid);
            sqe.cdw10 = cns::NAMESPACE;
            self.admin_command(sqe, Some(page), "Identify Namespace")?;
            let mut buf = [0u8; IDENTIFY_LEN];
            page.read_bytes(0, &mut buf);
            let id = IdentifyNamespace::parse(&buf);
            let usable = id.format().filter(|f| f.ms == 0).and(id.block_size());
            match usable {
                Some(block_size) if id.nsze > 0 => {
                    out.push(Namespace { nsid, block_size, blocks: id.nsze, identify: id })
                }
                _ => tracing::warn!(
                    dev = self.dev.name(),
                    nsid,
                    "namespace skipped: its LBA format (with metadata or outside 512 B-64 KiB) \
                     is not supported"
                ),
            }
        }
        Ok(out)
    }

    pub fn device(&self) -> &Arc<dyn Device> {
        &self.dev
    }

    pub fn cap(&self) -> Cap {
        self.cap
    }

    pub fn version(&self) -> Version {
        self.version
    }

    pub fn identify(&self) -> &IdentifyController {
        &self.identify
    }

    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }

    pub fn namespace(&self, nsid: u32) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.nsid == nsid)
    }

    /// The largest transfer in one command: MDTS, capped at [`MAX_COMMAND_BYTES`].
    pub fn max_transfer(&self) -> usize {
        self.max_transfer
    }

    /// I/O queue pairs granted by the controller.
    pub fn io_queues_granted(&self) -> u16 {
        self.granted
    }

    /// The largest queue the controller accepts (CAP.MQES + 1), capped at what nvaio supports.
    pub fn max_queue_entries(&self) -> u16 {
        self.cap.mqes_z().saturating_add(1).min(MAX_QUEUE_ENTRIES)
    }

    /// Checks CSTS for a device that is gone or fatally failed.
    pub fn health(&self) -> Result<(), ControllerError> {
        if self.forked() {
            return Err(ControllerError::Forked { dev: self.dev.name().into() });
        }
        check_health(&*self.dev)
    }

    /// Runs one admin command to completion, with `data` (at most one page) as its buffer.
    /// Bounded by the admin timeout; a command that times out keeps its slot, so a late
    /// completion cannot be mistaken for a later command's. Asynchronous Event Request
    /// completions reaped on the way are processed before this returns.
    pub fn admin_command(
        &self,
        sqe: Sqe,
        data: Option<&DmaRegion>,
        what: &'static str,
    ) -> Result<Cqe, ControllerError> {
        if self.forked() {
            return Err(ControllerError::Forked { dev: self.dev.name().into() });
        }
        let r = self.admin.command(sqe, data, what);
        self.admin.service();
        r
    }

    /// Reaps the admin completion queue without submitting anything and processes the
    /// asynchronous events found (reading their log pages, re-arming the requests). Returns how
    /// many events were processed. With interrupts the admin reaper thread does this by itself;
    /// without, call it now and then (any admin command does it too).
    pub fn poll_admin(&self) -> usize {
        if self.forked() {
            return 0;
        }
        self.admin.poll();
        self.admin.service()
    }

    /// Whether this process is a child forked after the controller came up: then it belongs
    /// to the parent, and every operation on it fails with [`ControllerError::Forked`].
    pub fn forked(&self) -> bool {
        nvaio_dma::fork::forked_since(self.fork_gen)
    }

    /// Takes the asynchronous events reported since the last call, oldest first.
    pub fn take_async_events(&self) -> Vec<AsyncEvent> {
        lock(&self.admin.events).drain(..).collect()
    }

    /// Events dropped because more than 256 were waiting for [`Controller::take_async_events`].
    pub fn async_events_dropped(&self) -> u64 {
        self.admin.events_dropped.load(Ordering::Relaxed)
    }

    /// Asynchronous Event Requests outstanding with the controller right now.
    pub fn async_requests_outstanding(&self) -> usize {
        lock(&self.admin.q).aer_slots.len()
    }

    /// Asks the controller to abort command `cid` of submission queue `sqid` (§5.1). Returns
    /// whether the controller says it aborted it (CQE DW0 bit 0 clear). Either way the command
    /// itself still completes on its own queue: with Abort Requested status if it was aborted,
    /// normally otherwise. A controller may decline any abort (QEMU 7.2's always does), and one
    /// that has more aborts outstanding than its Abort Command Limit fails this with status
    /// Abort Command Limit Exceeded, reported here as an error.
    pub fn abort(&self, sqid: u16, cid: u16) -> Result<bool, ControllerError> {
        let mut sqe = Sqe::new(admin::ABORT, 0);
        sqe.cdw10 = u32::from(cid) << 16 | u32::from(sqid);
        let cqe = self.admin_command(sqe, None, "Abort")?;
        Ok(cqe.dw0 & 1 == 0)
    }

    /// Creates an I/O queue pair of `entries` entries (clamped to what the controller allows),
    /// polled (no interrupts). Dropping the pair deletes it from the controller.
    pub fn create_queue_pair(self: &Arc<Self>, entries: u16) -> Result<QueuePair, ControllerError> {
        self.create_queue_pair_with(entries, None)
    }

    /// MSI-X vectors enabled (vector 0 being the admin queue's); 0 when the controller is
    /// polled only.
    pub fn interrupt_vectors(&self) -> u16 {
        self.irq.as_ref().map_or(0, |irq| irq.nvec)
    }

    /// Creates an I/O queue pair whose completion queue raises an MSI-X vector, and the
    /// [`Notifier`] its owner waits on. The vector is chosen as the [module docs](self)
    /// describe; dropping the pair gives it back.
    ///
    /// Fails with [`ControllerError::NoInterrupts`] when the controller runs without interrupts
    /// (no MSI-X on the device, enabling failed, or turned off): fall back to
    /// [`Controller::create_queue_pair`] and poll.
    pub fn create_queue_pair_irq(
        self: &Arc<Self>,
        entries: u16,
    ) -> Result<(QueuePair, Notifier), ControllerError> {
        let dev = || self.dev.name().to_string();
        let Some(irq) = self.irq.as_ref() else {
            return Err(ControllerError::NoInterrupts {
                dev: dev(),
                why: self.irq_unavailable.clone(),
            });
        };
        let slot = irq.reserve().map_err(|e| ControllerError::NoInterrupts {
            dev: dev(),
            why: format!("no eventfd for a queue notifier: {e}"),
        })?;
        let vector = slot.vector;
        let qp = match self.create_queue_pair_with(entries, Some(vector)) {
            Ok(qp) => qp,
            Err(e) => {
                irq.unreserve(vector);
                return Err(e);
            }
        };
        // From here on, dropping `qp` deletes the queue and releases the vector (through
        // `delete_queue_pair`), so every failure below just returns.
        let notifier = irq.commit(slot, qp.qid()).map_err(|e| ControllerError::NoInterrupts {
            dev: dev(),
            why: format!("cannot start the relay thread of vector {vector}: {e}"),
        })?;
        Ok((qp, notifier))
    }

    /// As [`Controller::create_queue_pair`]; with `vector`, the CQ raises that MSI-X vector.
    /// The vector is not accounted for: [`Controller::create_queue_pair_irq`] is the way to get
    /// interrupt-driven queues that share vectors correctly.
    pub fn create_queue_pair_with(
        self: &Arc<Self>,
        entries: u16,
        vector: Option<u16>,
    ) -> Result<QueuePair, ControllerError> {
        let entries = entries.clamp(2, self.max_queue_entries());
        let qid = {
            let mut qids = self.qids.lock().unwrap_or_else(|e| e.into_inner());
            let free = qids.iter().position(|used| !used).ok_or(ControllerError::NoQueues {
                dev: self.dev.name().into(),
                granted: self.granted,
            })?;
            qids[free] = true;
            free as u16 + 1
        };
        let release = |e| {
            self.qids.lock().unwrap_or_else(|e| e.into_inner())[usize::from(qid) - 1] = false;
            e
        };
        let mut qp = QueuePair::new(self.dev.clone(), qid, entries, self.cap.dstrd())
            .map_err(|e| release(e.into()))?;

        // Create I/O Completion Queue (§5.4): CDW10 QSIZE (zero-based) | QID; CDW11 IV | IEN | PC.
        let mut sqe = Sqe::new(admin::CREATE_IO_CQ, 0);
        sqe.prp1 = qp.cq_iova();
        sqe.cdw10 = u32::from(entries - 1) << 16 | u32::from(qid);
        sqe.cdw11 = match vector {
            Some(iv) => u32::from(iv) << 16 | 0b11,
            None => 0b01,
        };
        self.admin_command(sqe, None, "Create I/O Completion Queue").map_err(release)?;

        // Create I/O Submission Queue (§5.5): CDW11 CQID | QPRIO (0) | PC.
        let mut sqe = Sqe::new(admin::CREATE_IO_SQ, 0);
        sqe.prp1 = qp.sq_iova();
        sqe.cdw10 = u32::from(entries - 1) << 16 | u32::from(qid);
        sqe.cdw11 = u32::from(qid) << 16 | 0b1;
        if let Err(e) = self.admin_command(sqe, None, "Create I/O Submission Queue") {
            self.delete_queue(admin::DELETE_IO_CQ, qid);
            return Err(release(e));
        }
        qp.vector = vector;
        qp.owner = Some(self.clone());
        Ok(qp)
    }

    fn delete_queue(&self, opcode: u8, qid: u16) -> bool {
        let mut sqe = Sqe::new(opcode, 0);
        sqe.cdw10 = u32::from(qid);
        let what = if opcode == admin::DELETE_IO_SQ { "Delete I/O SQ" } else { "Delete I/O CQ" };
        match self.admin_command(sqe, None, what) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!("{e}");
                false
            }
        }
    }

    /// Deletes I/O queue pair `qid` (SQ first, as §5.6 requires) and frees its ID. Called when
    /// a [`QueuePair`] is dropped. If deletion fails the ID stays reserved: the controller may
    /// still think the queue exists, and its memory is released anyway only because the
    /// controller is then beyond use (gone, fatal or timing out).
    pub(crate) fn delete_queue_pair(&self, qid: u16) {
        if self.forked() {
            return;
        }
        let ok = self.delete_queue(admin::DELETE_IO_SQ, qid)
            && self.delete_queue(admin::DELETE_IO_CQ, qid);
        // The vector goes back even if deletion failed: were the old CQ still to raise it, the
        // next queue on it would only see spurious wake-ups.
        if let Some(irq) = &self.irq {
            irq.release(qid);
        }
        if ok {
            if let Some(used) =
                self.qids.lock().unwrap_or_else(|e| e.into_inner()).get_mut(usize::from(qid) - 1)
            {
                *used = false;
            }
        }
    }

    /// Normal shutdown (§3.6.1): CC.SHN = 01b, wait for CSTS.SHST = complete, then disable.
    fn shutdown(&self) {
        let dev = &*self.dev;
        let csts = Csts(dev.read32(offset::CSTS));
        if csts.is_gone() {
            return;
        }
        let cc = Cc(dev.read32(offset::CC));
        dev.write32(offset::CC, cc.with_shn(regs::SHN_NORMAL).0);
        let deadline = Instant::now() + Duration::from_millis(self.cap.timeout_ms());
        loop {
            let csts = Csts(dev.read32(offset::CSTS));
            if csts.is_gone() || csts.shst() == regs::SHST_COMPLETE {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(dev = dev.name(), "shutdown did not complete in time");
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let cc = Cc(dev.read32(offset::CC));
        dev.write32(offset::CC, cc.with_shn(regs::SHN_NONE).with_en(false).0);
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if nvaio_dma::fork::forked_since(self.fork_gen) {
            // A forked child: the controller and its threads are the parent's (the threads do
            // not even exist here). Touch nothing, join nothing.
            if let Some(irq) = self.irq.take() {
                std::mem::forget(irq);
            }
            return;
        }
        // Threads first: they must not touch the admin queue of a controller shutting down.
        // They hold no reference to the Controller, so this never runs on one of them.
        if let Some(irq) = &self.irq {
            irq.stop();
        }
        self.shutdown();
        if self.irq.is_some() {
            self.dev.disable_interrupts();
        }
    }
}

/// The admin queue pair and what goes with it: the outstanding Asynchronous Event Requests and
/// the events they brought. Shared (through an `Arc`) by the [`Controller`] and its admin reaper
/// thread; it holds no reference back to the controller, so the controller's drop can stop and
/// join that thread.
struct Admin {
    dev: Arc<dyn Device>,
    timeout: Duration,
    q: Mutex<AdminQueue>,
    /// `AdminQueue::aer_done.len()`, readable without the queue lock.
    pending: AtomicUsize,
    /// Held by whoever processes AER completions, so that one event is never processed twice
    /// and log pages are read one at a time.
    servicing: Mutex<()>,
    events: Mutex<VecDeque<AsyncEvent>>,
    events_dropped: AtomicU64,
}

struct AdminQueue {
    qp: QueuePair,
    /// Slots holding an outstanding Asynchronous Event Request.
    aer_slots: Vec<u16>,
    /// AER completions reaped by whoever polled, waiting to be processed.
    aer_done: Vec<Cqe>,
    /// How many requests to keep outstanding (0 until armed; lowered when the controller says
    /// there are too many, or after repeated failures).
    aer_target: usize,
    aer_failures: u32,
}

impl AdminQueue {
    /// Reaps the admin completion queue: returns the completion of slot `mine`, sets AER
    /// completions aside, and drops anything else (the late answer of a command that timed out,
    /// whose slot is free again now).
    fn reap(&mut self, mine: Option<u16>) -> Option<Cqe> {
        let AdminQueue { qp, aer_slots, aer_done, .. } = self;
        let mut result = None;
        qp.poll(usize::MAX, |c| {
            if Some(c.slot) == mine {
                result = Some(c.cqe);
            } else if let Some(i) = aer_slots.iter().position(|&s| s == c.slot) {
                aer_slots.swap_remove(i);
                aer_done.push(c.cqe);
            } else {
                tracing::debug!(cid = c.cqe.cid, "late completion of an admin command dropped");
            }
        });
        result
    }
}

impl Admin {
    fn new(dev: Arc<dyn Device>, qp: QueuePair, timeout: Duration) -> Admin {
        Admin {
            dev,
            timeout,
            q: Mutex::new(AdminQueue {
                qp,
                aer_slots: Vec::new(),
                aer_done: Vec::new(),
                aer_target: 0,
                aer_failures: 0,
            }),
            pending: AtomicUsize::new(0),
            servicing: Mutex::new(()),
            events: Mutex::new(VecDeque::new()),
            events_dropped: AtomicU64::new(0),
        }
    }

    /// Reaps under the lock and publishes how many AER completions wait.
    fn reap(&self, q: &mut AdminQueue, mine: Option<u16>) -> Option<Cqe> {
        let r = q.reap(mine);
        self.pending.store(q.aer_done.len(), Ordering::Release);
        r
    }

    /// Runs one admin command to completion (see [`Controller::admin_command`]), without
    /// processing the AER completions it may reap.
    fn command(
        &self,
        mut sqe: Sqe,
        data: Option<&DmaRegion>,
        what: &'static str,
    ) -> Result<Cqe, ControllerError> {
        if let Some(d) = data {
            sqe.prp1 = d.iova();
            if d.len() > PAGE_SIZE {
                sqe.prp2 = d.iova() + PAGE_SIZE as u64;
            }
        }
        let dev = || self.dev.name().to_string();
        let mut q = lock(&self.q);
        let slot = q.qp.submit(&mut sqe).ok_or(ControllerError::Timeout {
            dev: dev(),
            what: "a free admin queue slot",
            ms: 0,
        })?;
        q.qp.ring();
        let deadline = Instant::now() + self.timeout;
        let mut spins = 0u32;
        loop {
            if let Some(cqe) = self.reap(&mut q, Some(slot)) {
                let status = cqe.status();
                return if status.is_success() {
                    Ok(cqe)
                } else {
                    Err(ControllerError::Command { dev: dev(), what, status })
                };
            }
            if Instant::now() >= deadline {
                check_health(&*self.dev)?;
                return Err(ControllerError::Timeout {
                    dev: dev(),
                    what,
                    ms: self.timeout.as_millis() as u64,
                });
            }
            spins += 1;
            if spins > 1000 {
                // Admin commands are rare; after a short spin, stop burning the CPU.
                std::thread::sleep(Duration::from_micros(100));
                if spins.is_multiple_of(1024) {
                    check_health(&*self.dev)?;
                }
            }
        }
    }

    /// Reaps whatever the admin completion queue holds, without waiting.
    fn poll(&self) {
        let mut q = lock(&self.q);
        self.reap(&mut q, None);
    }

    /// Submits Asynchronous Event Requests until `aer_target` are outstanding. A controller with
    /// an event already waiting answers at once, so the queue is reaped straight after.
    fn arm(&self) {
        let mut q = lock(&self.q);
        while q.aer_slots.len() < q.aer_target {
            let mut sqe = Sqe::new(admin::ASYNC_EVENT_REQUEST, 0);
            match q.qp.submit(&mut sqe) {
                Some(slot) => q.aer_slots.push(slot),
                // Every slot busy with commands that timed out: try again next time.
                None => break,
            }
        }
        q.qp.ring();
        self.reap(&mut q, None);
    }

    /// Processes the AER completions set aside so far, and any that arrive meanwhile. Returns
    /// how many events were reported. If another thread is already at it, returns 0 at once:
    /// that thread sees the completions this one set aside (it looks again after letting go).
    fn service(&self) -> usize {
        let mut handled = 0;
        loop {
            if self.pending.load(Ordering::Acquire) == 0 {
                return handled;
            }
            let _busy = match self.servicing.try_lock() {
                Ok(g) => g,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => return handled,
            };
            loop {
                let batch = {
                    let mut q = lock(&self.q);
                    let batch = std::mem::take(&mut q.aer_done);
                    self.pending.store(0, Ordering::Release);
                    batch
                };
                if batch.is_empty() {
                    break;
                }
                for cqe in batch {
                    handled += usize::from(self.handle(cqe));
                }
            }
            // Completions set aside by a thread that found `servicing` taken after this loop's
            // last look are seen by the check at the top.
        }
    }

    /// Handles one AER completion; returns whether it reported an event.
    fn handle(&self, cqe: Cqe) -> bool {
        let status = cqe.status();
        if !status.is_success() {
            self.failed(status);
            self.arm();
            return false;
        }
        lock(&self.q).aer_failures = 0;
        let event = self.read_event(cqe.dw0);
        tracing::warn!(dev = self.dev.name(), "asynchronous event: {event}");
        {
            let mut events = lock(&self.events);
            if events.len() == MAX_STORED_EVENTS {
                events.pop_front();
                self.events_dropped.fetch_add(1, Ordering::Relaxed);
            }
            events.push_back(event);
        }
        self.arm();
        true
    }

    /// Decides what a failed Asynchronous Event Request means for the ones kept outstanding.
    fn failed(&self, status: Status) {
        let dev = self.dev.name();
        let mut q = lock(&self.q);
        match status.code() {
            (sct::COMMAND_SPECIFIC, command_specific::ASYNC_EVENT_LIMIT_EXCEEDED) => {
                // The controller holds fewer than AERL + 1 says: keep what it accepted.
                q.aer_target = q.aer_slots.len();
                tracing::debug!(dev, kept = q.aer_target, "asynchronous event request limit");
            }
            (sct::GENERIC, generic::ABORT_REQUESTED | generic::SQ_DELETED) => {
                // Someone aborted it on purpose: do not put it back.
                q.aer_target = q.aer_target.saturating_sub(1);
            }
            _ => {
                q.aer_failures += 1;
                if q.aer_failures >= AER_FAILURE_LIMIT {
                    q.aer_target = q.aer_slots.len();
                    tracing::warn!(
                        dev,
                        %status,
                        "asynchronous event requests keep failing; no longer re-armed"
                    );
                } else {
                    tracing::debug!(dev, %status, "asynchronous event request failed");
                }
            }
        }
    }

    /// Decodes an event and reads (so acknowledges) the log page it names.
    fn read_event(&self, dw0: u32) -> AsyncEvent {
        let lid = (dw0 >> 16) as u8;
        let len = match lid {
            0 => 0,
            log_page::SMART_HEALTH => SMART_LOG_LEN,
            LOG_CHANGED_NAMESPACE_LIST => CHANGED_NS_LOG_LEN,
            _ => OTHER_LOG_LEN,
        };
        let log = (len > 0).then(|| self.read_log(lid, len)).flatten();
        AsyncEvent::decode(dw0, log.as_deref())
    }

    /// Get Log Page (§5.16) of the first `len` bytes (a multiple of 4, at most a page) of log
    /// `lid`, controller-wide (NSID FFFFFFFFh), with Retain Asynchronous Event clear.
    fn read_log(&self, lid: u8, len: usize) -> Option<Vec<u8>> {
        let page = match DmaRegion::alloc(self.dev.dma_mapper(), PAGE_SIZE) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(dev = self.dev.name(), lid, "no memory to read a log page: {e}");
                return None;
            }
        };
        let numd_z = (len / 4 - 1) as u32;
        let mut sqe = Sqe::new(admin::GET_LOG_PAGE, u32::MAX);
        // CDW10: LID (7:0), LSP 0, RAE (15) clear, NUMDL (31:16); CDW11: NUMDU (15:0).
        sqe.cdw10 = u32::from(lid) | (numd_z & 0xffff) << 16;
        sqe.cdw11 = numd_z >> 16;
        match self.command(sqe, Some(&page), "Get Log Page (asynchronous event)") {
            Ok(_) => {
                let mut buf = vec![0u8; len];
                page.read_bytes(0, &mut buf);
                Some(buf)
            }
            Err(e) => {
                tracing::warn!(lid, "{e}");
                None
            }
        }
    }
}

/// The stop signal of the interrupt threads: a flag, and an eventfd in every thread's epoll set
/// that is written once and never read, so it wakes them all and keeps them awake.
struct Stop {
    flag: AtomicBool,
    fd: EventFd,
}

/// One MSI-X vector.
struct Vector {
    index: u16,
    /// Where VFIO (or the emulated controller) signals the vector.
    fd: EventFd,
    /// For a shared vector: the private eventfd of each queue on it, by queue ID.
    relay: Mutex<Vec<(u16, EventFd)>>,
}

impl Vector {
    /// Wakes every queue on this vector. A full eventfd counter (never in practice) already
    /// means "readable", so a failed write loses nothing.
    fn forward(&self) {
        for (_, fd) in lock(&self.relay).iter() {
            let _ = fd.write(1);
        }
    }
}

/// Vector bookkeeping, under `Irq::table`.
struct IrqTable {
    /// Queues (and reservations) per vector.
    load: Vec<u32>,
    /// The vector of each interrupt-driven queue, by queue ID.
    of_qid: Vec<Option<u16>>,
    /// Whether the vector's relay thread runs (vector 0's is the admin reaper, always running).
    relay_running: Vec<bool>,
}

/// A vector picked for a queue not created yet, and the notifier ends made for it.
struct VectorSlot {
    vector: u16,
    notifier: EventFd,
    /// The relay's end of a relayed notifier.
    relay_end: Option<EventFd>,
}

/// The controller's MSI-X vectors and the threads that serve them.
struct Irq {
    nvec: u16,
    /// Vectors 1..=direct go to one queue each; direct+1..nvec are shared.
    direct: u16,
    vectors: Vec<Arc<Vector>>,
    table: Mutex<IrqTable>,
    stop: Arc<Stop>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// How many of `io_vectors` vectors (1..=io_vectors) are given to one queue each when
/// `granted` queues may exist; the others form the shared pool. See the module docs.
fn direct_vectors(io_vectors: u16, granted: u16) -> u16 {
    if io_vectors >= granted {
        io_vectors
    } else {
        io_vectors.saturating_sub((io_vectors / 4).max(1))
    }
}

impl Irq {
    /// Enables MSI-X and starts the admin reaper. Errors say why interrupts are unavailable.
    fn start(dev: &Arc<dyn Device>, granted: u16, admin: &Arc<Admin>) -> Result<Irq, String> {
        let available = dev.interrupt_vectors();
        if available == 0 {
            return Err("the device has no MSI-X vectors".into());
        }
        let nvec = available.min(u32::from(granted) + 1).min(MAX_MSIX_VECTORS);
        let fds = dev.enable_interrupts(nvec).map_err(|e| {
            let why = format!("enabling {nvec} MSI-X vectors failed: {e}");
            tracing::warn!(dev = dev.name(), "{why}; the controller is polled only");
            why
        })?;
        let fail = |why: String| {
            dev.disable_interrupts();
            tracing::warn!(dev = dev.name(), "{why}; the controller is polled only");
            why
        };
        if fds.len() != nvec as usize {
            return Err(fail(format!("asked for {nvec} MSI-X eventfds, got {}", fds.len())));
        }
        let nvec = nvec as u16;
        let vectors: Vec<Arc<Vector>> = fds
            .into_iter()
            .enumerate()
            .map(|(i, fd)| Arc::new(Vector { index: i as u16, fd, relay: Mutex::new(Vec::new()) }))
            .collect();
        let stop = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| fail(format!("cannot create the stop eventfd: {e}")))?;
        let irq = Irq {
            nvec,
            direct: direct_vectors(nvec - 1, granted),
            table: Mutex::new(IrqTable {
                load: vec![0; usize::from(nvec)],
                of_qid: vec![None; usize::from(granted) + 1],
                relay_running: (0..nvec).map(|v| v == 0).collect(),
            }),
            vectors,
            stop: Arc::new(Stop { flag: AtomicBool::new(false), fd: stop }),
            threads: Mutex::new(Vec::new()),
        };
        irq.spawn(0, Some(admin.clone()))
            .map_err(|e| fail(format!("cannot start the admin interrupt thread: {e}")))?;
        tracing::debug!(
            dev = dev.name(),
            vectors = nvec,
            direct = irq.direct,
            shared = nvec - 1 - irq.direct,
            "MSI-X enabled"
        );
        Ok(irq)
    }

    /// Starts the thread that serves vector `v`: the admin reaper for vector 0, a relay for a
    /// shared I/O vector.
    fn spawn(&self, v: u16, admin: Option<Arc<Admin>>) -> io::Result<()> {
        let vector = self.vectors[usize::from(v)].clone();
        let stop = self.stop.clone();
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            vector.fd.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )?;
        epoll.ctl(ControlOperation::Add, stop.fd.as_raw_fd(), EpollEvent::new(EventSet::IN, 1))?;
        let name = if v == 0 { "nvaio-admin-irq".to_string() } else { format!("nvaio-irq-{v}") };
        let handle = std::thread::Builder::new()
            .name(name)
            .stack_size(256 << 10)
            .spawn(move || irq_thread(&vector, &stop, &epoll, admin.as_deref()))?;
        lock(&self.threads).push(handle);
        Ok(())
    }

    /// Picks the vector for a queue about to be created and makes its notifier.
    fn reserve(&self) -> io::Result<VectorSlot> {
        let mut t = lock(&self.table);
        let direct = (1..=self.direct).find(|&v| t.load[usize::from(v)] == 0);
        let vector = direct.unwrap_or_else(|| {
            // The least-loaded shared vector; vector 0 (relayed by the admin reaper) when there
            // is no shared pool.
            (self.direct + 1..self.nvec).min_by_key(|&v| t.load[usize::from(v)]).unwrap_or(0)
        });
        let v = &self.vectors[usize::from(vector)];
        let (notifier, relay_end) = if direct.is_some() {
            (v.fd.try_clone()?, None)
        } else {
            let fd = EventFd::new(EFD_NONBLOCK)?;
            let end = fd.try_clone()?;
            (fd, Some(end))
        };
        t.load[usize::from(vector)] += 1;
        Ok(VectorSlot { vector, notifier, relay_end })
    }

    /// Gives back a reservation whose queue could not be created.
    fn unreserve(&self, vector: u16) {
        let mut t = lock(&self.table);
        let load = &mut t.load[usize::from(vector)];
        *load = load.saturating_sub(1);
    }

    /// Records queue `qid` on its reserved vector, wires the relay and starts the vector's
    /// relay thread if it is the first queue there. On error the caller drops the queue, which
    /// calls [`Irq::release`].
    fn commit(&self, slot: VectorSlot, qid: u16) -> io::Result<Notifier> {
        let v = slot.vector;
        let need_thread = {
            let mut t = lock(&self.table);
            if let Some(e) = t.of_qid.get_mut(usize::from(qid)) {
                *e = Some(v);
            }
            let start = slot.relay_end.is_some() && !t.relay_running[usize::from(v)];
            if start {
                t.relay_running[usize::from(v)] = true;
            }
            start
        };
        let relayed = slot.relay_end.is_some();
        if let Some(end) = slot.relay_end {
            lock(&self.vectors[usize::from(v)].relay).push((qid, end));
        }
        if need_thread {
            if let Err(e) = self.spawn(v, None) {
                lock(&self.table).relay_running[usize::from(v)] = false;
                return Err(e);
            }
        }
        Ok(Notifier::new(slot.notifier, v, relayed))
    }

    /// Takes queue `qid` off its vector.
    fn release(&self, qid: u16) {
        let vector = {
            let mut t = lock(&self.table);
            let Some(v) = t.of_qid.get_mut(usize::from(qid)).and_then(Option::take) else {
                return;
            };
            let load = &mut t.load[usize::from(v)];
            *load = load.saturating_sub(1);
            v
        };
        lock(&self.vectors[usize::from(vector)].relay).retain(|(q, _)| *q != qid);
    }

    /// Stops and joins every thread. Each returns within one tick of its epoll wait, or after
    /// the admin command it is running (bounded by the admin timeout).
    fn stop(&self) {
        self.stop.flag.store(true, Ordering::Release);
        if let Err(e) = self.stop.fd.write(1) {
            tracing::debug!("cannot signal the interrupt threads to stop ({e}); they will notice");
        }
        for t in lock(&self.threads).drain(..) {
            if t.join().is_err() {
                tracing::warn!("an interrupt thread panicked");
            }
        }
    }
}

/// The body of an interrupt thread: waits for vector `vector` to fire, then wakes the queues
/// relayed from it and, for the admin reaper (`admin` set), processes admin completions.
fn irq_thread(vector: &Vector, stop: &Stop, epoll: &Epoll, admin: Option<&Admin>) {
    let mut events = [EpollEvent::default(); 2];
    let mut warned = false;
    loop {
        let r = epoll.wait(IRQ_THREAD_TICK_MS, &mut events);
        if stop.flag.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = r {
            if e.kind() != io::ErrorKind::Interrupted {
                if !warned {
                    tracing::warn!(vector = vector.index, "waiting for an interrupt failed: {e}");
                    warned = true;
                }
                // Do not spin on a persistent error; the tick still bounds shutdown.
                std::thread::sleep(Duration::from_millis(IRQ_THREAD_TICK_MS as u64));
            }
            continue;
        }
        // Reading resets the counter; EAGAIN means this was a tick or the stop signal.
        if vector.fd.read().is_ok() {
            vector.forward();
        }
        if let Some(admin) = admin {
            admin.poll();
            admin.service();
        }
    }
}

/// Waits, bounded by CAP.TO, for CSTS.RDY to equal `ready`.
fn wait_ready(dev: &dyn Device, cap: Cap, ready: bool) -> Result<(), ControllerError> {
    let ms = cap.timeout_ms();
    let deadline = Instant::now() + Duration::from_millis(ms);
    let mut spins = 0u32;
    loop {
        let csts = Csts(dev.read32(offset::CSTS));
        if csts.is_gone() {
            return Err(ControllerError::Gone { dev: dev.name().into() });
        }
        if csts.rdy() == ready {
            return Ok(());
        }
        // A fatal status while enabling will never clear by itself; while disabling it may.
        if ready && csts.cfs() {
            return Err(ControllerError::Fatal { dev: dev.name().into() });
        }
        if Instant::now() >= deadline {
            let what = if ready { "CSTS.RDY to become 1" } else { "CSTS.RDY to become 0" };
            return Err(ControllerError::Timeout { dev: dev.name().into(), what, ms });
        }
        spins += 1;
        if spins > 100 {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_layout() {
        // Enough vectors: every queue has its own.
        assert_eq!(direct_vectors(64, 64), 64);
        assert_eq!(direct_vectors(8, 4), 8);
        // One I/O vector for several queues: it is the shared pool.
        assert_eq!(direct_vectors(1, 8), 0);
        // A quarter (at least one) is shared.
        assert_eq!(direct_vectors(2, 8), 1);
        assert_eq!(direct_vectors(7, 8), 6);
        assert_eq!(direct_vectors(32, 64), 24);
        // No I/O vector at all: everything shares vector 0.
        assert_eq!(direct_vectors(0, 8), 0);
    }

    #[test]
    fn smart_event_takes_the_warning_from_the_log() {
        // Type 1 (SMART / health), information 1 (temperature), log page 02h.
        let dw0 = 1 | 1 << 8 | 2 << 16;
        let mut log = [0u8; 512];
        log[0] = 0x03;
        let ev = AsyncEvent::decode(dw0, Some(&log));
        assert_eq!(
            ev,
            AsyncEvent {
                event_type: event_type::SMART_HEALTH,
                info: 1,
                log_page: 2,
                kind: AsyncEventKind::SmartCriticalWarning(0x03)
            }
        );
        assert_eq!(ev.description(), "temperature threshold crossed");
        assert!(ev.to_string().contains("critical warning 0x03"), "{ev}");
        // Without the log, the bit the information code names.
        let ev = AsyncEvent::decode(dw0, None);
        assert_eq!(ev.kind, AsyncEventKind::SmartCriticalWarning(0x02));
        let spare = AsyncEvent::decode(1 | 2 << 8 | 2 << 16, None);
        assert_eq!(spare.kind, AsyncEventKind::SmartCriticalWarning(0x01));
    }

    #[test]
    fn namespace_change_lists_the_log() {
        let dw0 = 2 | 4 << 16;
        let mut log = [0u8; 4096];
        log[0..4].copy_from_slice(&3u32.to_le_bytes());
        log[4..8].copy_from_slice(&7u32.to_le_bytes());
        let ev = AsyncEvent::decode(dw0, Some(&log));
        assert_eq!(ev.kind, AsyncEventKind::NamespaceAttributeChanged(vec![3, 7]));
        assert_eq!(ev.description(), "namespace attribute changed");
        // More than 1024 changed, or no log: unknown, so empty.
        log[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let ev = AsyncEvent::decode(dw0, Some(&log));
        assert_eq!(ev.kind, AsyncEventKind::NamespaceAttributeChanged(vec![]));
        assert!(ev.to_string().contains("unknown"), "{ev}");
        assert_eq!(
            AsyncEvent::decode(dw0, None).kind,
            AsyncEventKind::NamespaceAttributeChanged(vec![])
        );
    }

    #[test]
    fn other_events() {
        let ev = AsyncEvent::decode(1 << 8 | 1 << 16, None);
        assert_eq!((ev.event_type, ev.kind.clone()), (event_type::ERROR, AsyncEventKind::Error));
        assert_eq!(ev.description(), "invalid doorbell write value");
        let ev = AsyncEvent::decode(2 | 1 << 8 | 3 << 16, None);
        assert_eq!(ev.kind, AsyncEventKind::Other);
        assert_eq!(ev.description(), "firmware activation starting");
        let ev = AsyncEvent::decode(7 | 0xff << 24, None);
        assert_eq!(ev.description(), "vendor specific event");
        assert_eq!(AsyncEvent::decode(4, None).description(), "event of a reserved type");
    }
}
