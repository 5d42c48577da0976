//! Controller bring-up, admin commands, I/O queue creation and shutdown.
//!
//! Initialisation follows Base Specification 2.0 §3.5.1: disable and wait for CSTS.RDY = 0,
//! program the admin queue, enable and wait for CSTS.RDY = 1, identify, negotiate the number of
//! queues. Every wait is bounded by CAP.TO; every register read is checked for the all-ones
//! pattern of a device that has gone away and for CSTS.CFS.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvaio_dma::{DmaError, DmaRegion, PAGE_SIZE};

use crate::prp::MAX_COMMAND_BYTES;
use crate::queue::{QueuePair, MAX_QUEUE_ENTRIES};
use crate::spec::cmd::{admin, cns, feature};
use crate::spec::identify::{IdentifyController, IdentifyNamespace, IDENTIFY_LEN};
use crate::spec::regs::{self, offset, Cap, Cc, Csts, Version};
use crate::spec::{Cqe, Sqe, Status};
use crate::Device;

/// Entries in the admin queues: few admin commands are ever outstanding at once.
const ADMIN_ENTRIES: u16 = 32;

/// Why the controller or one of its admin commands failed.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("{dev}: the device no longer responds (registers read all ones)")]
    Gone { dev: String },
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
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions { io_queues: 64, admin_timeout: Duration::from_secs(10) }
    }
}

/// An enabled controller. Dropping the last handle shuts it down (CC.SHN).
pub struct Controller {
    dev: Arc<dyn Device>,
    cap: Cap,
    version: Version,
    identify: IdentifyController,
    namespaces: Vec<Namespace>,
    admin: Mutex<QueuePair>,
    /// Which I/O queue IDs (1..=granted) are in use.
    qids: Mutex<Vec<bool>>,
    granted: u16,
    max_transfer: usize,
    opts: ControllerOptions,
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

        let mut ctrl = Controller {
            dev,
            cap,
            version,
            identify: IdentifyController::default(),
            namespaces: Vec::new(),
            admin: Mutex::new(admin),
            qids: Mutex::new(Vec::new()),
            granted: 0,
            max_transfer: PAGE_SIZE,
            opts,
        };

        // Identify Controller (step 6).
        let page = DmaRegion::alloc(ctrl.dev.dma_mapper(), IDENTIFY_LEN)?;
        let mut sqe = Sqe::new(admin::IDENTIFY, 0);
        sqe.cdw10 = cns::CONTROLLER;
        ctrl.admin_command(sqe, Some(&page), "Identify Controller")?;
        let mut buf = [0u8; IDENTIFY_LEN];
        page.read_bytes(0, &mut buf);
        ctrl.identify = IdentifyController::parse(&buf);
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
        tracing::debug!(
            dev = ctrl.dev.name(),
            model = %ctrl.identify.model,
            queues = ctrl.granted,
            namespaces = ctrl.namespaces.len(),
            "controller ready"
        );
        Ok(Arc::new(ctrl))
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
        let csts = Csts(self.dev.read32(offset::CSTS));
        if csts.is_gone() {
            Err(ControllerError::Gone { dev: self.dev.name().into() })
        } else if csts.cfs() {
            Err(ControllerError::Fatal { dev: self.dev.name().into() })
        } else {
            Ok(())
        }
    }

    /// Runs one admin command to completion, with `data` (at most one page) as its buffer.
    /// Bounded by the admin timeout; a command that times out keeps its slot, so a late
    /// completion cannot be mistaken for a later command's.
    pub fn admin_command(
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
        let mut q = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let slot = q.submit(&mut sqe).ok_or(ControllerError::Timeout {
            dev: dev(),
            what: "a free admin queue slot",
            ms: 0,
        })?;
        q.ring();
        let deadline = Instant::now() + self.opts.admin_timeout;
        let mut result = None;
        let mut spins = 0u32;
        loop {
            q.poll(usize::MAX, |c| {
                if c.slot == slot {
                    result = Some(c.cqe);
                }
            });
            if let Some(cqe) = result {
                let status = cqe.status();
                return if status.is_success() {
                    Ok(cqe)
                } else {
                    Err(ControllerError::Command { dev: dev(), what, status })
                };
            }
            if Instant::now() >= deadline {
                self.health()?;
                return Err(ControllerError::Timeout {
                    dev: dev(),
                    what,
                    ms: self.opts.admin_timeout.as_millis() as u64,
                });
            }
            spins += 1;
            if spins > 1000 {
                // Admin commands are rare; after a short spin, stop burning the CPU.
                std::thread::sleep(Duration::from_micros(100));
                if spins % 1024 == 0 {
                    self.health()?;
                }
            }
        }
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

    /// As [`Controller::create_queue_pair`]; with `vector`, the CQ raises that MSI-X vector.
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
        let ok = self.delete_queue(admin::DELETE_IO_SQ, qid)
            && self.delete_queue(admin::DELETE_IO_CQ, qid);
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
        self.shutdown();
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
