//! An in-process emulated NVMe controller behind the [`Device`] seam.
//!
//! [`EmulatedController`] lets the real driver run without hardware: in host tests, under fault
//! injection and fuzzing, and in CPU-cost benchmarks. It aims to be a strict NVMe 2.0 controller
//! for the subset nvaio uses, so that a driver bug shows up here as an error status or a fatal
//! controller status instead of as silent success. With fault rules installed it turns hostile
//! on purpose (see [`FaultRule`]).
//!
//! # What is emulated
//! - Registers (Base Specification 2.0, §3.1): CAP (MQES, CQR = 1, TO, DSTRD, CSS = NVM,
//!   MPSMIN = MPSMAX = 0, i.e. 4 KiB pages only), VS 1.4.0, CC, CSTS, AQA, ASQ, ACQ and the
//!   doorbells. CC.EN 0 → 1 checks the configuration (AQA sizes of at least two entries,
//!   page-aligned ASQ and ACQ, MPS 0, CSS 0, AMS 0, IOSQES 6, IOCQES 4) and raises CSTS.CFS
//!   instead of RDY if it is wrong. CC.EN 1 → 0 is a controller reset: every queue, held
//!   command and outstanding Asynchronous Event Request is dropped; namespace data, fault rules
//!   and statistics are kept. CC.SHN reports CSTS.SHST = complete, after which nothing is
//!   processed until a reset. [`EmuConfig::ready_delay_reads`] delays RDY and SHST changes by a
//!   number of CSTS reads, to exercise the driver's bounded waits.
//! - Admin commands: Identify (CNS 00h, 01h, 02h), Get Log Page (Error Information, SMART /
//!   Health), Set and Get Features (Number of Queues, Interrupt Coalescing, Asynchronous Event
//!   Configuration, Volatile Write Cache), Create and Delete I/O Completion and Submission Queue
//!   (physically contiguous only), Abort and Asynchronous Event Request.
//! - NVM commands: Read, Write, Flush, Write Zeroes and Dataset Management (deallocate zero
//!   fills). Namespaces are in-memory byte vectors.
//! - Data pointers: PRPs only, checked strictly (§4.1.1): PRP1 dword-aligned; PRP2 page-aligned
//!   when it names the second page; a PRP list may start at a qword-aligned offset, its entries
//!   must be page-aligned, and the last entry of a full list page chains to the next list page,
//!   which must be page-aligned. Every byte moves through a [`SoftIommu`], so an access outside
//!   the driver's mappings fails the command with Data Transfer Error.
//! - MSI-X, optionally: with [`EmuConfig::msix_vectors`] > 0, [`Device::enable_interrupts`]
//!   hands out eventfds, and a completion queue created with IEN signals its vector's eventfd
//!   once per register write (or helper call) that posted to it. Coalescing is accepted and
//!   ignored.
//!
//! # The synchronous model
//! There is no device thread. A write to a submission queue tail doorbell fetches and executes
//! every new entry inside that [`Device::write32`] call and posts the completions before it
//! returns. When a completion queue is full, completions wait inside the controller (in order)
//! and are posted by the head doorbell write that frees room. The controller state sits behind
//! one mutex, taken once per register access.
//!
//! Doorbell writes are checked: a doorbell of a queue that does not exist, a tail at or beyond
//! the queue size, or a completion queue head that passes entries not yet posted is treated as
//! a fatal host error and sets CSTS.CFS (a real controller may instead raise an "Invalid
//! Doorbell" asynchronous event; CFS makes the bug impossible to miss). A DMA fault while
//! fetching a submission entry or posting a completion entry is fatal the same way. Doorbell
//! writes while the controller is not ready (disabled, not yet showing RDY, shut down, or
//! failed) are ignored and counted. Reads of a doorbell return 0.
//!
//! # What is not emulated
//! SGLs (PSDT ≠ 0 is Invalid Field), fused operations, metadata, protection information, the
//! Controller Memory Buffer and Persistent Memory Region, memory page sizes other than 4 KiB,
//! command sets other than NVM, namespace management and attachment, firmware, power states,
//! NVM subsystem reset, saving features, keep-alive, weighted round robin arbitration, and
//! pin-based or MSI interrupts. Commands complete in submission order within each queue, never
//! concurrently.

mod admin;
mod fault;
mod io;
mod prp;
mod queue;
mod regs;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::io as stdio;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use nvaio_dma::soft::SoftIommu;
use nvaio_dma::DmaMapper;
use vmm_sys_util::eventfd::EventFd;

use crate::device::Device;
use crate::spec::cmd::Sqe;
use crate::spec::regs::{offset, Csts};
use crate::spec::status::{generic, sct};
use crate::spec::Status;

pub use fault::{FaultAction, FaultRule};

use queue::{Cq, Pending, Sq};

/// One emulated namespace: `blocks` logical blocks of `1 << lba_shift` bytes, held in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmuNamespace {
    pub blocks: u64,
    /// Logical block size as a power of two, 9 (512 B) to 16 (64 KiB).
    pub lba_shift: u8,
}

impl EmuNamespace {
    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.blocks << self.lba_shift
    }
}

/// What the emulated controller reports and how it behaves.
#[derive(Clone, Debug)]
pub struct EmuConfig {
    /// Serial number (Identify Controller bytes 23:4).
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// Maximum Data Transfer Size: 4 KiB << mdts per command, 0 for no limit.
    pub mdts: u8,
    /// Maximum Queue Entries Supported, zero-based (CAP.MQES), at least 1.
    pub mqes_z: u16,
    /// Doorbell stride (CAP.DSTRD): doorbells sit `4 << dstrd` bytes apart.
    pub dstrd: u8,
    /// CAP.TO, the RDY transition timeout the controller advertises, in 500 ms units.
    pub cap_to: u8,
    /// How many I/O queue pairs the controller offers (1 to 65535).
    pub max_ioqpairs: u16,
    /// The namespaces, NSID 1 upwards.
    pub namespaces: Vec<EmuNamespace>,
    /// Whether a volatile write cache is reported (Flush then accepts NSID FFFFFFFFh).
    pub vwc: bool,
    /// Abort Command Limit, zero-based.
    pub acl_z: u8,
    /// Asynchronous Event Request Limit, zero-based.
    pub aerl_z: u8,
    /// MSI-X vectors offered; 0 means polling only.
    pub msix_vectors: u32,
    /// Behave like QEMU 7.2: every Abort completes with DW0 bit 0 set ("not aborted").
    pub decline_aborts: bool,
    /// CSTS.RDY and CSTS.SHST change only after this many further CSTS reads.
    pub ready_delay_reads: u32,
}

impl Default for EmuConfig {
    fn default() -> Self {
        EmuConfig {
            serial: "NVAIOEMU0001".into(),
            model: "nvaio emulated controller".into(),
            firmware: "1.0".into(),
            mdts: 5,
            mqes_z: 1023,
            dstrd: 0,
            cap_to: 4,
            max_ioqpairs: 16,
            // 64 MiB of 512-byte blocks.
            namespaces: vec![EmuNamespace { blocks: 131_072, lba_shift: 9 }],
            vwc: true,
            acl_z: 3,
            aerl_z: 3,
            msix_vectors: 0,
            decline_aborts: false,
            ready_delay_reads: 0,
        }
    }
}

/// Counters kept by the emulated controller, as returned by [`EmulatedController::stats`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmuStats {
    /// Admin commands fetched, indexed by opcode (256 entries).
    pub admin_commands: Vec<u64>,
    /// I/O commands fetched, indexed by opcode (256 entries).
    pub io_commands: Vec<u64>,
    /// Submission queue tail doorbell writes, indexed by queue ID (`max_ioqpairs + 1` entries).
    pub sq_doorbells: Vec<u64>,
    /// Completion queue head doorbell writes, indexed by queue ID.
    pub cq_doorbells: Vec<u64>,
    /// Doorbell writes ignored because the controller was not ready.
    pub ignored_doorbells: u64,
    /// Completion entries written to completion queues (duplicates included).
    pub completions_posted: u64,
    /// Commands completed with Command ID Conflict.
    pub cid_conflicts: u64,
    /// Times a fault rule fired.
    pub faults_fired: u64,
    /// Accesses refused by the soft IOMMU (commands' data and queue memory).
    pub iommu_faults: u64,
    /// Register accesses outside BAR0, unaligned, or to a register that was not writable then.
    pub bad_register_accesses: u64,
    /// Eventfd signals sent.
    pub interrupts: u64,
}

impl EmuStats {
    fn new(queues: usize) -> Self {
        EmuStats {
            admin_commands: vec![0; 256],
            io_commands: vec![0; 256],
            sq_doorbells: vec![0; queues],
            cq_doorbells: vec![0; queues],
            ignored_doorbells: 0,
            completions_posted: 0,
            cid_conflicts: 0,
            faults_fired: 0,
            iommu_faults: 0,
            bad_register_accesses: 0,
            interrupts: 0,
        }
    }

    /// Admin commands fetched with `opcode`.
    pub fn admin(&self, opcode: u8) -> u64 {
        self.admin_commands[usize::from(opcode)]
    }

    /// I/O commands fetched with `opcode`, all queues together.
    pub fn io(&self, opcode: u8) -> u64 {
        self.io_commands[usize::from(opcode)]
    }

    /// All doorbell writes that reached an existing queue, submission and completion.
    pub fn doorbell_writes(&self) -> u64 {
        self.sq_doorbells.iter().chain(&self.cq_doorbells).sum()
    }
}

/// A value of CSTS that changes only after some reads (see [`EmuConfig::ready_delay_reads`]).
#[derive(Clone, Copy, Debug)]
struct Delayed<T: Copy> {
    visible: T,
    target: T,
    reads_left: u32,
}

impl<T: Copy> Delayed<T> {
    fn new(v: T) -> Self {
        Delayed { visible: v, target: v, reads_left: 0 }
    }

    fn set(&mut self, target: T, delay: u32) {
        self.target = target;
        self.reads_left = delay;
        if delay == 0 {
            self.visible = target;
        }
    }

    fn on_read(&mut self) {
        if self.reads_left > 0 {
            self.reads_left -= 1;
            if self.reads_left == 0 {
                self.visible = self.target;
            }
        }
    }
}

/// The result of executing a command.
enum Outcome {
    /// Post a completion with this status and DW0.
    Done(Status, u32),
    /// The command stays outstanding (an Asynchronous Event Request).
    Deferred,
}

impl Outcome {
    fn ok(dw0: u32) -> Self {
        Outcome::Done(Status::SUCCESS, dw0)
    }
}

impl From<Status> for Outcome {
    fn from(s: Status) -> Self {
        Outcome::Done(s, 0)
    }
}

/// A generic command status with DNR set: the same command would fail again.
fn generic_err(sc: u8) -> Status {
    Status::new(sct::GENERIC, sc).with_dnr()
}

/// A command specific status with DNR set.
fn specific_err(sc: u8) -> Status {
    Status::new(sct::COMMAND_SPECIFIC, sc).with_dnr()
}

/// A command a fault rule holds back.
#[derive(Clone, Debug)]
struct Held {
    sqid: u16,
    sqe: Sqe,
}

/// Feature values (current).
#[derive(Clone, Copy, Debug, Default)]
struct Features {
    coalescing: u32,
    async_event_config: u32,
    write_cache: bool,
}

/// SMART / Health counters.
#[derive(Clone, Copy, Debug, Default)]
struct Health {
    bytes_read: u64,
    bytes_written: u64,
    read_commands: u64,
    write_commands: u64,
}

/// The whole device-side state, behind the controller's mutex.
struct State {
    cfg: EmuConfig,
    iommu: Arc<SoftIommu>,

    cc: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    rdy: Delayed<bool>,
    shst: Delayed<u32>,
    /// CSTS.CFS: a bad configuration at enable, a host protocol error, or a `Fatal` fault.
    cfs: bool,
    /// CC.EN was set with a valid configuration: the admin queue exists.
    enabled: bool,
    /// A shutdown was notified: nothing is processed until a reset.
    shut_down: bool,
    /// Surprise removal: registers read all ones, nothing is processed, for good.
    vanished: bool,

    /// Queues by ID; index 0 is the admin queue pair.
    sqs: Vec<Option<Sq>>,
    cqs: Vec<Option<Cq>>,
    /// Allocated I/O submission and completion queue counts (one-based).
    granted: (u16, u16),
    features: Features,

    namespaces: Vec<Vec<u8>>,

    /// Outstanding Asynchronous Event Requests, by CID, oldest first.
    aers: VecDeque<u16>,
    /// Events raised with no request outstanding: the DW0 to complete the next request with.
    events: VecDeque<u32>,
    held: Vec<Held>,
    rules: Vec<FaultRule>,

    /// Error Information log entries, newest first, and the running error count.
    error_log: VecDeque<admin::ErrorEntry>,
    error_count: u64,
    health: Health,
    stats: EmuStats,

    irqs: Vec<EventFd>,
    /// Vectors to signal once the current register access or helper call is done.
    irq_pending: Vec<u16>,
    /// Scratch list of PRP segments, kept to avoid an allocation per command.
    segs: Vec<(u64, usize)>,
}

/// The in-process emulated NVMe controller. See the [module documentation](self).
pub struct EmulatedController {
    state: Mutex<State>,
    iommu: Arc<SoftIommu>,
    bar_len: usize,
    /// Mirrors `State::vanished` so a vanished device's registers read without the lock.
    vanished: AtomicBool,
}

impl std::fmt::Debug for EmulatedController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatedController").field("bar_len", &self.bar_len).finish()
    }
}

impl EmulatedController {
    /// Creates a disabled controller (CC.EN = 0) with zero-filled namespaces.
    ///
    /// # Panics
    /// If the configuration is unusable: no I/O queue pairs, MQES below 1, a doorbell stride
    /// above 15, a namespace with no blocks, or a block size outside 512 B to 64 KiB. These are
    /// mistakes in the test that builds the controller, not device input.
    pub fn new(cfg: EmuConfig) -> Arc<Self> {
        assert!(cfg.max_ioqpairs >= 1, "the emulated controller needs at least one I/O queue");
        assert!(cfg.mqes_z >= 1, "MQES must allow queues of at least two entries");
        assert!(cfg.dstrd <= 15, "CAP.DSTRD is a 4-bit field");
        for ns in &cfg.namespaces {
            assert!(ns.blocks > 0, "an emulated namespace needs at least one block");
            assert!((9..=16).contains(&ns.lba_shift), "block size must be 512 B to 64 KiB");
        }
        let queues = usize::from(cfg.max_ioqpairs) + 1;
        let bar_len = offset::DOORBELLS + queues * 2 * (4usize << cfg.dstrd);
        let iommu = Arc::new(SoftIommu::new());
        let namespaces = cfg
            .namespaces
            .iter()
            .map(|ns| {
                let len = usize::try_from(ns.bytes()).expect("namespace larger than memory");
                vec![0u8; len]
            })
            .collect();
        let state = State {
            iommu: iommu.clone(),
            cc: 0,
            aqa: 0,
            asq: 0,
            acq: 0,
            rdy: Delayed::new(false),
            shst: Delayed::new(crate::spec::regs::SHST_NORMAL),
            cfs: false,
            enabled: false,
            shut_down: false,
            vanished: false,
            sqs: (0..queues).map(|_| None).collect(),
            cqs: (0..queues).map(|_| None).collect(),
            granted: (cfg.max_ioqpairs, cfg.max_ioqpairs),
            features: Features { write_cache: cfg.vwc, ..Features::default() },
            namespaces,
            aers: VecDeque::new(),
            events: VecDeque::new(),
            held: Vec::new(),
            rules: Vec::new(),
            error_log: VecDeque::new(),
            error_count: 0,
            health: Health::default(),
            stats: EmuStats::new(queues),
            irqs: Vec::new(),
            irq_pending: Vec::new(),
            segs: Vec::new(),
            cfg,
        };
        Arc::new(EmulatedController {
            state: Mutex::new(state),
            iommu,
            bar_len,
            vanished: AtomicBool::new(false),
        })
    }

    /// The soft IOMMU every DMA of this controller goes through.
    pub fn iommu(&self) -> &Arc<SoftIommu> {
        &self.iommu
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic inside the emulator (a bug in it) must not wedge every later test access.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the state, then delivers the interrupts it raised.
    fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut st = self.lock();
        let r = f(&mut st);
        st.signal_interrupts();
        if st.vanished {
            self.vanished.store(true, Ordering::Relaxed);
        }
        r
    }

    /// The current CSTS, read without side effects (no ready-delay countdown).
    pub fn csts(&self) -> Csts {
        if self.vanished.load(Ordering::Relaxed) {
            return Csts(u32::MAX);
        }
        Csts(self.lock().csts_value())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> EmuStats {
        let mut s = self.lock().stats.clone();
        s.iommu_faults = self.iommu.faults();
        s
    }

    /// Reads namespace `nsid` directly, bypassing the queues.
    ///
    /// # Panics
    /// If the namespace does not exist or the range runs past its end.
    pub fn namespace_read(&self, nsid: u32, byte_off: u64, len: usize) -> Vec<u8> {
        let st = self.lock();
        let (i, range) = st.namespace_range(nsid, byte_off, len);
        st.namespaces[i][range].to_vec()
    }

    /// Writes namespace `nsid` directly, bypassing the queues.
    ///
    /// # Panics
    /// If the namespace does not exist or the range runs past its end.
    pub fn namespace_write(&self, nsid: u32, byte_off: u64, data: &[u8]) {
        let mut st = self.lock();
        let (i, range) = st.namespace_range(nsid, byte_off, data.len());
        st.namespaces[i][range].copy_from_slice(data);
    }

    /// Installs a fault rule. Rules are tried in the order installed; the first that matches a
    /// command (and has firings left) decides what happens to it.
    pub fn inject(&self, rule: FaultRule) {
        self.lock().rules.push(rule);
    }

    /// Removes every fault rule. Commands already held stay held.
    pub fn clear_faults(&self) {
        self.lock().rules.clear();
    }

    /// How many commands are currently held by [`FaultAction::Hold`].
    pub fn held(&self) -> usize {
        self.lock().held.len()
    }

    /// Executes and completes every held command, oldest first, as if it had just been
    /// fetched (its own result decides the status). Returns how many were released. Nothing
    /// happens while the controller is failed, shut down or gone.
    pub fn release_held(&self) -> usize {
        self.with_state(|st| {
            if !st.processing() {
                return 0;
            }
            let held = std::mem::take(&mut st.held);
            let n = held.len();
            for h in held {
                st.execute_and_complete(h.sqid, &h.sqe, false);
            }
            n
        })
    }

    /// Raises an asynchronous event: completes the oldest outstanding Asynchronous Event
    /// Request with DW0 = `event_type` (bits 2:0) | `info` << 8 | `log_page` << 16, or queues
    /// the event for the next request. Returns whether a request was completed now.
    pub fn raise_event(&self, event_type: u8, info: u8, log_page: u8) -> bool {
        let dw0 = u32::from(event_type & 7) | u32::from(info) << 8 | u32::from(log_page) << 16;
        self.with_state(|st| st.raise_event(dw0))
    }
}

impl Device for EmulatedController {
    fn name(&self) -> &str {
        "emulated"
    }

    fn read32(&self, off: usize) -> u32 {
        if self.vanished.load(Ordering::Relaxed) {
            return u32::MAX;
        }
        let bar_len = self.bar_len;
        self.with_state(|st| st.read_reg(off, bar_len))
    }

    fn write32(&self, off: usize, value: u32) {
        if self.vanished.load(Ordering::Relaxed) {
            return;
        }
        let bar_len = self.bar_len;
        self.with_state(|st| st.write_reg(off, value, bar_len));
    }

    fn bar_len(&self) -> usize {
        self.bar_len
    }

    fn dma_mapper(&self) -> Arc<dyn DmaMapper> {
        self.iommu.clone()
    }

    fn interrupt_vectors(&self) -> u32 {
        self.lock().cfg.msix_vectors
    }

    fn enable_interrupts(&self, nvec: u32) -> stdio::Result<Vec<EventFd>> {
        let mut st = self.lock();
        let max = st.cfg.msix_vectors;
        if max == 0 {
            return Err(stdio::Error::new(
                stdio::ErrorKind::Unsupported,
                "the emulated controller was configured without MSI-X vectors",
            ));
        }
        if nvec == 0 || nvec > max {
            return Err(stdio::Error::new(
                stdio::ErrorKind::InvalidInput,
                format!("{nvec} vectors requested, the emulated controller has {max}"),
            ));
        }
        let mut ours = Vec::with_capacity(nvec as usize);
        let mut theirs = Vec::with_capacity(nvec as usize);
        for _ in 0..nvec {
            let fd = EventFd::new(libc::EFD_NONBLOCK)?;
            theirs.push(fd.try_clone()?);
            ours.push(fd);
        }
        st.irqs = ours;
        Ok(theirs)
    }

    fn disable_interrupts(&self) {
        self.lock().irqs.clear();
    }
}

impl State {
    /// Whether commands are fetched and completions posted right now.
    fn processing(&self) -> bool {
        self.enabled && self.rdy.visible && !self.cfs && !self.shut_down && !self.vanished
    }

    /// Stops everything until a reset: CSTS.CFS.
    fn set_fatal(&mut self, why: &str) {
        if !self.cfs {
            tracing::debug!(why, "emulated controller: fatal status");
        }
        self.cfs = true;
    }

    fn csts_value(&self) -> u32 {
        u32::from(self.rdy.visible) | u32::from(self.cfs) << 1 | (self.shst.visible & 3) << 2
    }

    /// Index and byte range of namespace `nsid` at `byte_off..byte_off + len`, for the test
    /// helpers.
    fn namespace_range(&self, nsid: u32, byte_off: u64, len: usize) -> (usize, Range<usize>) {
        let i = nsid
            .checked_sub(1)
            .map(|i| i as usize)
            .filter(|&i| i < self.namespaces.len())
            .unwrap_or_else(|| panic!("no emulated namespace {nsid}"));
        let size = self.namespaces[i].len();
        let range = usize::try_from(byte_off)
            .ok()
            .and_then(|s| Some(s..s.checked_add(len)?))
            .filter(|r| r.end <= size)
            .unwrap_or_else(|| {
                panic!("{len} bytes at {byte_off:#x} run past the end of namespace {nsid}")
            });
        (i, range)
    }

    /// Sends the eventfd signals collected while posting.
    fn signal_interrupts(&mut self) {
        for v in self.irq_pending.drain(..) {
            if let Some(fd) = self.irqs.get(usize::from(v)) {
                // A full eventfd counter (never in practice) only loses a wakeup that is
                // already pending, so the error is of no consequence.
                let _ = fd.write(1);
                self.stats.interrupts += 1;
            }
        }
    }

    /// Controller reset (CC.EN 1 → 0): everything but namespace data, rules and counters.
    fn reset(&mut self) {
        for q in self.sqs.iter_mut() {
            *q = None;
        }
        for q in self.cqs.iter_mut() {
            *q = None;
        }
        self.enabled = false;
        self.cfs = false;
        self.shut_down = false;
        self.granted = (self.cfg.max_ioqpairs, self.cfg.max_ioqpairs);
        self.features = Features { write_cache: self.cfg.vwc, ..Features::default() };
        self.aers.clear();
        self.events.clear();
        self.held.clear();
    }

    /// Fetches and executes every entry between the head and the tail of submission queue
    /// `qid`.
    fn process_sq(&mut self, qid: u16) {
        while self.processing() {
            let Some(sq) = self.sqs[usize::from(qid)].as_mut() else {
                return;
            };
            if sq.head == sq.tail {
                return;
            }
            // Wrapping: a base near the top of the address space simply faults in the IOMMU.
            let addr = sq.base.wrapping_add(u64::from(sq.head) * 64);
            sq.head = (sq.head + 1) % sq.size;
            let mut raw = [0u8; 64];
            if self.iommu.read(addr, &mut raw).is_err() {
                self.set_fatal("submission queue entry fetch faulted");
                return;
            }
            let mut words = [0u32; 16];
            for (w, b) in words.iter_mut().zip(raw.chunks_exact(4)) {
                *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            self.submit(qid, Sqe::from_words(words));
        }
    }

    /// Handles one fetched command: CID check, fault rules, execution, completion.
    fn submit(&mut self, sqid: u16, sqe: Sqe) {
        let op = usize::from(sqe.opcode());
        if sqid == 0 {
            self.stats.admin_commands[op] += 1;
        } else {
            self.stats.io_commands[op] += 1;
        }
        let cid = sqe.cid();
        let fresh = match self.sqs[usize::from(sqid)].as_mut() {
            Some(sq) => sq.cids.insert(cid),
            None => return,
        };
        if !fresh {
            self.stats.cid_conflicts += 1;
            let status = generic_err(generic::CID_CONFLICT);
            self.complete(Pending::new(sqid, cid, status, 0).keep_cid());
            return;
        }
        match self.match_fault(sqid, &sqe) {
            Some(action) => {
                self.stats.faults_fired += 1;
                self.apply_fault(action, sqid, sqe);
            }
            None => self.execute_and_complete(sqid, &sqe, false),
        }
    }

    /// Executes a command and posts its completion (unless it stays outstanding).
    fn execute_and_complete(&mut self, sqid: u16, sqe: &Sqe, corrupt: bool) {
        if let Outcome::Done(status, dw0) = self.execute(sqid, sqe, corrupt) {
            self.complete(Pending::new(sqid, sqe.cid(), status, dw0).about(sqe));
        }
    }

    fn execute(&mut self, sqid: u16, sqe: &Sqe, corrupt: bool) -> Outcome {
        // Fused operations (CDW0 bits 9:8) and SGLs (PSDT, bits 15:14) are not supported.
        if sqe.psdt() != 0 || sqe.cdw0 >> 8 & 3 != 0 {
            return generic_err(generic::INVALID_FIELD).into();
        }
        if sqid == 0 {
            self.admin_command(sqe)
        } else {
            self.io_command(sqe, corrupt)
        }
    }

    fn raise_event(&mut self, dw0: u32) -> bool {
        if self.processing() {
            if let Some(cid) = self.aers.pop_front() {
                self.complete(Pending::new(0, cid, Status::SUCCESS, dw0));
                return true;
            }
        }
        // Keep a bounded number: a real controller coalesces events of the same type.
        if self.events.len() < 64 {
            self.events.push_back(dw0);
        }
        false
    }
}
