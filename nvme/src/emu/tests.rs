//! Tests of the emulated controller, driven through a tiny test-only host: queues in DMA
//! regions, registers and doorbells through the [`Device`] seam, completions read by phase.

use std::sync::Arc;

use nvaio_dma::{DmaRegion, PAGE_SIZE};

use super::*;
use crate::spec::cmd::{admin, cns, feature, log_page, nvm, Cqe, Sqe};
use crate::spec::identify::{IdentifyController, IdentifyNamespace, IDENTIFY_LEN};
use crate::spec::regs::{aqa, doorbell_offset, Cap, Cc, SHN_NORMAL, SHST_COMPLETE};
use crate::spec::status::{command_specific as cs, media};

const PAGE: u64 = PAGE_SIZE as u64;

/// One queue pair as a host sees it.
struct Queue {
    qid: u16,
    sq: DmaRegion,
    cq: DmaRegion,
    sq_size: u32,
    cq_size: u32,
    tail: u32,
    head: u32,
    phase: bool,
    next_cid: u16,
    dstrd: u8,
}

impl Queue {
    fn new(emu: &EmulatedController, qid: u16, sq_size: u32, cq_size: u32) -> Self {
        let dstrd = Cap(emu.read64(offset::CAP)).dstrd();
        Queue {
            qid,
            sq: DmaRegion::alloc(emu.dma_mapper(), sq_size as usize * 64).unwrap(),
            cq: DmaRegion::alloc(emu.dma_mapper(), cq_size as usize * 16).unwrap(),
            sq_size,
            cq_size,
            tail: 0,
            head: 0,
            phase: true,
            next_cid: 1,
            dstrd,
        }
    }

    /// Writes `sqe` at the tail (its CID as given) without ringing.
    fn push_raw(&mut self, sqe: Sqe) {
        for (i, w) in sqe.to_words().iter().enumerate() {
            self.sq.write_u32(self.tail as usize * 64 + 4 * i, *w);
        }
        self.tail = (self.tail + 1) % self.sq_size;
    }

    /// Writes `sqe` with a fresh CID and returns the CID.
    fn push(&mut self, mut sqe: Sqe) -> u16 {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1).max(1);
        sqe.set_cid(cid);
        self.push_raw(sqe);
        cid
    }

    fn ring(&self, emu: &EmulatedController) {
        emu.write32(doorbell_offset(self.qid, false, self.dstrd), self.tail);
    }

    /// The entry at the head, phase tag ignored.
    fn peek(&self) -> Cqe {
        let off = self.head as usize * 16;
        Cqe::from_words([
            self.cq.read_u32(off),
            self.cq.read_u32(off + 4),
            self.cq.read_u32(off + 8),
            self.cq.read_u32(off + 12),
        ])
    }

    /// The next new completion, if any (head doorbell not written).
    fn poll(&mut self) -> Option<Cqe> {
        let cqe = self.peek();
        if cqe.phase() != self.phase {
            return None;
        }
        self.head += 1;
        if self.head == self.cq_size {
            self.head = 0;
            self.phase = !self.phase;
        }
        Some(cqe)
    }

    fn ack(&self, emu: &EmulatedController) {
        emu.write32(doorbell_offset(self.qid, true, self.dstrd), self.head);
    }

    /// Every new completion, then one head doorbell write if there were any.
    fn drain(&mut self, emu: &EmulatedController) -> Vec<Cqe> {
        let mut v = Vec::new();
        while let Some(c) = self.poll() {
            v.push(c);
        }
        if !v.is_empty() {
            self.ack(emu);
        }
        v
    }

    /// Submits one command and returns its only completion.
    fn run(&mut self, emu: &EmulatedController, sqe: Sqe) -> Cqe {
        let cid = self.push(sqe);
        self.ring(emu);
        let c = self.drain(emu);
        assert_eq!(c.len(), 1, "expected one completion, got {c:?}");
        assert_eq!(c[0].cid, cid);
        assert_eq!(c[0].sq_id, self.qid);
        c[0]
    }
}

/// An enabled controller with an admin queue pair.
struct Host {
    emu: Arc<EmulatedController>,
    admin: Queue,
}

fn cc_enable() -> Cc {
    Cc::default().with_en(true).with_iosqes(6).with_iocqes(4)
}

impl Host {
    fn new(cfg: EmuConfig) -> Self {
        let emu = EmulatedController::new(cfg);
        let admin = Queue::new(&emu, 0, 32, 32);
        emu.write32(offset::AQA, aqa(31, 31));
        emu.write64(offset::ASQ, admin.sq.iova());
        emu.write64(offset::ACQ, admin.cq.iova());
        emu.write32(offset::CC, cc_enable().0);
        let host = Host { emu, admin };
        for _ in 0..100 {
            if Csts(host.emu.read32(offset::CSTS)).rdy() {
                return host;
            }
        }
        panic!("controller never became ready");
    }

    fn ready() -> Self {
        Host::new(EmuConfig::default())
    }

    fn admin(&mut self, sqe: Sqe) -> Cqe {
        self.admin.run(&self.emu, sqe)
    }

    fn create_cq(&mut self, qid: u16, size: u32, base: u64, cdw11: u32) -> Cqe {
        let mut sqe = Sqe::new(admin::CREATE_IO_CQ, 0);
        sqe.prp1 = base;
        sqe.cdw10 = u32::from(qid) | (size - 1) << 16;
        sqe.cdw11 = cdw11;
        self.admin(sqe)
    }

    fn create_sq(&mut self, qid: u16, size: u32, base: u64, cqid: u16) -> Cqe {
        let mut sqe = Sqe::new(admin::CREATE_IO_SQ, 0);
        sqe.prp1 = base;
        sqe.cdw10 = u32::from(qid) | (size - 1) << 16;
        sqe.cdw11 = 1 | u32::from(cqid) << 16;
        self.admin(sqe)
    }

    fn delete(&mut self, opcode: u8, qid: u16) -> Cqe {
        let mut sqe = Sqe::new(opcode, 0);
        sqe.cdw10 = u32::from(qid);
        self.admin(sqe)
    }

    /// Creates I/O queue pair `qid` with the given sizes.
    fn io_queue(&mut self, qid: u16, sq_size: u32, cq_size: u32) -> Queue {
        let q = Queue::new(&self.emu, qid, sq_size, cq_size);
        assert_ok(self.create_cq(qid, cq_size, q.cq.iova(), 1));
        assert_ok(self.create_sq(qid, sq_size, q.sq.iova(), qid));
        q
    }

    fn identify(&mut self, cns: u32, nsid: u32) -> (Cqe, Box<[u8; IDENTIFY_LEN]>) {
        let buf = DmaRegion::alloc(self.emu.dma_mapper(), IDENTIFY_LEN).unwrap();
        let mut sqe = Sqe::new(admin::IDENTIFY, nsid);
        sqe.prp1 = buf.iova();
        sqe.cdw10 = cns;
        let cqe = self.admin(sqe);
        let mut page = Box::new([0u8; IDENTIFY_LEN]);
        buf.read_bytes(0, &mut page[..]);
        (cqe, page)
    }

    fn csts(&self) -> Csts {
        self.emu.csts()
    }
}

fn assert_ok(c: Cqe) {
    assert!(c.status().is_success(), "command failed: {} ({c:?})", c.status());
}

fn assert_status(c: Cqe, sct_: u8, sc: u8) {
    assert_eq!(c.status().code(), (sct_, sc), "got {} ({c:?})", c.status());
}

fn rw(opcode: u8, nsid: u32, slba: u64, blocks: u32, prp1: u64, prp2: u64) -> Sqe {
    let mut sqe = Sqe::new(opcode, nsid);
    sqe.cdw10 = slba as u32;
    sqe.cdw11 = (slba >> 32) as u32;
    sqe.cdw12 = blocks - 1;
    sqe.prp1 = prp1;
    sqe.prp2 = prp2;
    sqe
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
}

fn get_features(host: &mut Host, fid: u32, sel: u32) -> Cqe {
    let mut sqe = Sqe::new(admin::GET_FEATURES, 0);
    sqe.cdw10 = fid | sel << 8;
    host.admin(sqe)
}

fn set_features(host: &mut Host, cdw10: u32, cdw11: u32) -> Cqe {
    let mut sqe = Sqe::new(admin::SET_FEATURES, 0);
    sqe.cdw10 = cdw10;
    sqe.cdw11 = cdw11;
    host.admin(sqe)
}

fn abort(host: &mut Host, sqid: u16, cid: u16) -> Cqe {
    let mut sqe = Sqe::new(admin::ABORT, 0);
    sqe.cdw10 = u32::from(sqid) | u32::from(cid) << 16;
    host.admin(sqe)
}

// ---- registers and the enable handshake ----

#[test]
fn capabilities_and_version() {
    let cfg = EmuConfig { mqes_z: 255, dstrd: 2, cap_to: 7, max_ioqpairs: 3, ..Default::default() };
    let emu = EmulatedController::new(cfg);
    let cap = Cap(emu.read64(offset::CAP));
    assert_eq!(cap.mqes_z(), 255);
    assert!(cap.cqr());
    assert_eq!(cap.to(), 7);
    assert_eq!(cap.dstrd(), 2);
    assert_eq!(cap.css() & 1, 1);
    assert_eq!((cap.mpsmin(), cap.mpsmax()), (0, 0));
    assert!(!cap.nssrs());
    assert_eq!(emu.read32(offset::VS), 0x0001_0400);
    // Four queues (admin + 3), two doorbells each, 16 bytes apart.
    assert_eq!(emu.bar_len(), 0x1000 + 4 * 2 * 16);
    assert_eq!(emu.name(), "emulated");
    assert_eq!(emu.read32(offset::CSTS), 0);
    // Outside the BAR, unaligned: 0 and counted.
    assert_eq!(emu.read32(emu.bar_len()), 0);
    assert_eq!(emu.read32(offset::CC + 1), 0);
    assert_eq!(emu.stats().bad_register_accesses, 2);
    // Doorbells read as 0.
    assert_eq!(emu.read32(doorbell_offset(1, true, 2)), 0);
}

#[test]
fn enable_validates_configuration() {
    let emu = EmulatedController::new(EmuConfig::default());
    let q = Queue::new(&emu, 0, 8, 8);
    emu.write64(offset::ASQ, q.sq.iova());
    emu.write64(offset::ACQ, q.cq.iova());
    assert_eq!(emu.read64(offset::ASQ), q.sq.iova());
    assert_eq!(emu.read64(offset::ACQ), q.cq.iova());

    let bad = [
        (aqa(0, 7), cc_enable()),                // 1-entry admin SQ
        (aqa(7, 0), cc_enable()),                // 1-entry admin CQ
        (aqa(7, 7), cc_enable().with_mps(1)),    // 8 KiB pages
        (aqa(7, 7), cc_enable().with_iosqes(7)), // 128-byte SQEs
        (aqa(7, 7), cc_enable().with_iocqes(5)), // 32-byte CQEs
        (aqa(7, 7), cc_enable().with_css(1)),    // another command set
        (aqa(7, 7), cc_enable().with_ams(1)),    // WRR arbitration
    ];
    for (a, cc) in bad {
        emu.write32(offset::AQA, a);
        emu.write32(offset::CC, cc.0);
        let csts = Csts(emu.read32(offset::CSTS));
        assert!(csts.cfs() && !csts.rdy(), "{cc:?} {a:#x} gave {csts:?}");
        // Clearing EN clears the fatal status.
        emu.write32(offset::CC, 0);
        assert_eq!(emu.read32(offset::CSTS), 0);
    }

    // Misaligned admin queue base.
    emu.write32(offset::AQA, aqa(7, 7));
    emu.write64(offset::ASQ, q.sq.iova() + 64);
    emu.write32(offset::CC, cc_enable().0);
    assert!(Csts(emu.read32(offset::CSTS)).cfs());
    emu.write32(offset::CC, 0);

    // Good configuration.
    emu.write64(offset::ASQ, q.sq.iova());
    emu.write32(offset::CC, cc_enable().0);
    assert_eq!(Csts(emu.read32(offset::CSTS)), Csts(1));
    assert_eq!(emu.read32(offset::CC), cc_enable().0);
    // Admin queue registers are frozen while enabled.
    emu.write32(offset::AQA, aqa(3, 3));
    assert_eq!(emu.read32(offset::AQA), aqa(7, 7));
}

#[test]
fn ready_and_shutdown_wait_for_csts_reads() {
    let cfg = EmuConfig { ready_delay_reads: 3, ..Default::default() };
    let emu = EmulatedController::new(cfg);
    let q = Queue::new(&emu, 0, 8, 8);
    emu.write32(offset::AQA, aqa(7, 7));
    emu.write64(offset::ASQ, q.sq.iova());
    emu.write64(offset::ACQ, q.cq.iova());
    emu.write32(offset::CC, cc_enable().0);
    let reads: Vec<bool> = (0..5).map(|_| Csts(emu.read32(offset::CSTS)).rdy()).collect();
    assert_eq!(reads, [false, false, false, true, true]);

    // Shutdown: "occurring" for three reads, then "complete".
    emu.write32(offset::CC, cc_enable().with_shn(SHN_NORMAL).0);
    let shst: Vec<u32> = (0..5).map(|_| Csts(emu.read32(offset::CSTS)).shst()).collect();
    assert_eq!(shst, [1, 1, 1, 2, 2]);

    // Disable: RDY drops after three reads too.
    emu.write32(offset::CC, 0);
    let reads: Vec<bool> = (0..5).map(|_| Csts(emu.read32(offset::CSTS)).rdy()).collect();
    assert_eq!(reads, [true, true, true, false, false]);
    // SHN cleared: SHST back to normal.
    assert_eq!(emu.csts().shst(), 0);
}

#[test]
fn shutdown_stops_processing_and_reset_drops_queues() {
    let mut host = Host::ready();
    let mut q = host.io_queue(1, 8, 8);
    let buf = DmaRegion::alloc(host.emu.dma_mapper(), PAGE_SIZE).unwrap();

    host.emu.write32(offset::CC, cc_enable().with_shn(SHN_NORMAL).0);
    assert_eq!(host.csts().shst(), SHST_COMPLETE);
    assert!(host.csts().rdy());
    q.push(rw(nvm::READ, 1, 0, 1, buf.iova(), 0));
    q.ring(&host.emu);
    assert!(q.poll().is_none(), "a shut-down controller must not process commands");
    assert_eq!(host.emu.stats().ignored_doorbells, 1);

    // Reset and re-enable: the I/O queues are gone, the data is not.
    host.emu.namespace_write(1, 0, b"kept");
    host.emu.write32(offset::CC, 0);
    assert_eq!(host.csts(), Csts(0));
    host.admin = Queue::new(&host.emu, 0, 32, 32);
    host.emu.write64(offset::ASQ, host.admin.sq.iova());
    host.emu.write64(offset::ACQ, host.admin.cq.iova());
    host.emu.write32(offset::CC, cc_enable().0);
    assert!(host.csts().rdy());
    assert_eq!(host.emu.namespace_read(1, 0, 4), b"kept");
    // Deleting the old queue: it does not exist any more.
    assert_status(host.delete(admin::DELETE_IO_SQ, 1), sct::COMMAND_SPECIFIC, cs::INVALID_QUEUE_ID);
    // Ringing it is a fatal host error.
    q.ring(&host.emu);
    assert!(host.csts().cfs());
}

// ---- identify ----

#[test]
fn identify_controller_and_namespaces() {
    let cfg = EmuConfig {
        serial: "SER123".into(),
        mdts: 6,
        acl_z: 2,
        aerl_z: 1,
        namespaces: vec![
            EmuNamespace { blocks: 2048, lba_shift: 9 },
            EmuNamespace { blocks: 256, lba_shift: 12 },
        ],
        ..Default::default()
    };
    let mut host = Host::new(cfg);

    let (cqe, page) = host.identify(cns::CONTROLLER, 0);
    assert_ok(cqe);
    let id = IdentifyController::parse(&page);
    assert_eq!(id.serial, "SER123");
    assert_eq!(id.model, "nvaio emulated controller");
    assert_eq!(id.firmware, "1.0");
    assert_eq!(id.mdts, 6);
    assert_eq!(id.max_transfer(4096), Some(256 * 1024));
    assert_eq!(id.ver, 0x0001_0400);
    assert_eq!((id.acl_z, id.aerl_z), (2, 1));
    assert_eq!((id.sqes, id.cqes), (0x66, 0x44));
    assert_eq!(id.nn, 2);
    assert_eq!(id.oncs, 0x000c);
    assert!(id.has_write_cache());
    assert_eq!(id.subnqn, "nqn.2024-01.io.nvaio:emulated:SER123");
    assert_eq!(page[111], 1);

    let (cqe, page) = host.identify(cns::NAMESPACE, 2);
    assert_ok(cqe);
    let ns = IdentifyNamespace::parse(&page);
    assert_eq!((ns.nsze, ns.ncap, ns.nuse), (256, 256, 256));
    assert_eq!(ns.block_size(), Some(4096));
    assert_eq!(page[33] & 7, 1, "deallocated blocks read as zeroes");
    let (_, page) = host.identify(cns::NAMESPACE, 1);
    assert_eq!(IdentifyNamespace::parse(&page).block_size(), Some(512));

    let (cqe, page) = host.identify(cns::ACTIVE_NAMESPACES, 0);
    assert_ok(cqe);
    assert_eq!(&page[..12], &[1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    let (_, page) = host.identify(cns::ACTIVE_NAMESPACES, 1);
    assert_eq!(&page[..8], &[2, 0, 0, 0, 0, 0, 0, 0]);

    for nsid in [0, 3, u32::MAX] {
        let (cqe, _) = host.identify(cns::NAMESPACE, nsid);
        assert_status(cqe, sct::GENERIC, generic::INVALID_NAMESPACE);
        assert!(cqe.status().dnr());
    }
    let (cqe, _) = host.identify(cns::ACTIVE_NAMESPACES, 0xffff_fffe);
    assert_status(cqe, sct::GENERIC, generic::INVALID_NAMESPACE);
    let (cqe, _) = host.identify(0x10, 0);
    assert_status(cqe, sct::GENERIC, generic::INVALID_FIELD);
}

#[test]
fn identify_into_two_pages() {
    let mut host = Host::ready();
    let buf = DmaRegion::alloc(host.emu.dma_mapper(), 3 * PAGE_SIZE).unwrap();
    // PRP1 at an offset: the page spans into a second page named by PRP2.
    let mut sqe = Sqe::new(admin::IDENTIFY, 0);
    sqe.prp1 = buf.iova() + 0x400;
    sqe.prp2 = buf.iova() + 2 * PAGE;
    sqe.cdw10 = cns::CONTROLLER;
    assert_ok(host.admin(sqe));
    let mut page = [0u8; IDENTIFY_LEN];
    buf.read_bytes(0x400, &mut page[..PAGE_SIZE - 0x400]);
    buf.read_bytes(2 * PAGE_SIZE, &mut page[PAGE_SIZE - 0x400..]);
    assert_eq!(IdentifyController::parse(&page).model, "nvaio emulated controller");
    // The page in between was not touched.
    assert_eq!(buf.read_u64(PAGE_SIZE + 8), 0);

    // A PSDT other than PRPs is refused.
    sqe.cdw0 |= 1 << 14;
    assert_status(host.admin(sqe), sct::GENERIC, generic::INVALID_FIELD);
    // So is a fused operation.
    sqe.cdw0 = u32::from(admin::IDENTIFY) | 1 << 8;
    assert_status(host.admin(sqe), sct::GENERIC, generic::INVALID_FIELD);
    // An unknown admin opcode.
    assert_status(host.admin(Sqe::new(0x7f, 0)), sct::GENERIC, generic::INVALID_OPCODE);
}

// ---- queue management ----

#[test]
fn queue_creation_and_deletion_errors() {
    let cfg = EmuConfig { mqes_z: 63, max_ioqpairs: 4, msix_vectors: 2, ..Default::default() };
    let mut host = Host::new(cfg);
    let mem = DmaRegion::alloc(host.emu.dma_mapper(), 4 * PAGE_SIZE).unwrap();
    let base = mem.iova();
    let qid_err = (sct::COMMAND_SPECIFIC, cs::INVALID_QUEUE_ID);

    let c = host.create_cq(0, 8, base, 1);
    assert_eq!(c.status().code(), qid_err);
    let c = host.create_cq(5, 8, base, 1);
    assert_eq!(c.status().code(), qid_err);
    assert_status(host.create_cq(1, 65, base, 1), sct::COMMAND_SPECIFIC, cs::INVALID_QUEUE_SIZE);
    assert_status(host.create_cq(1, 1, base, 1), sct::COMMAND_SPECIFIC, cs::INVALID_QUEUE_SIZE);
    // Not physically contiguous.
    assert_status(host.create_cq(1, 8, base, 0), sct::GENERIC, generic::INVALID_FIELD);
    assert_status(host.create_cq(1, 8, base + 16, 1), sct::GENERIC, generic::PRP_OFFSET_INVALID);
    // Interrupts enabled on a vector the controller does not have.
    let iv = |v: u32| 1 | 2 | v << 16;
    assert_status(
        host.create_cq(1, 8, base, iv(2)),
        sct::COMMAND_SPECIFIC,
        cs::INVALID_INTERRUPT_VECTOR,
    );
    assert_ok(host.create_cq(1, 64, base, iv(1)));
    assert_eq!(host.create_cq(1, 8, base + PAGE, 1).status().code(), qid_err);

    // Submission queues.
    let cq_err = (sct::COMMAND_SPECIFIC, cs::COMPLETION_QUEUE_INVALID);
    assert_eq!(host.create_sq(1, 8, base + 2 * PAGE, 2).status().code(), cq_err);
    assert_eq!(host.create_sq(1, 8, base + 2 * PAGE, 0).status().code(), cq_err);
    assert_eq!(host.create_sq(0, 8, base + 2 * PAGE, 1).status().code(), qid_err);
    assert_status(
        host.create_sq(1, 100, base + 2 * PAGE, 1),
        sct::COMMAND_SPECIFIC,
        cs::INVALID_QUEUE_SIZE,
    );
    assert_status(host.create_sq(1, 8, base + 8, 1), sct::GENERIC, generic::PRP_OFFSET_INVALID);
    let mut sqe = Sqe::new(admin::CREATE_IO_SQ, 0);
    sqe.prp1 = base + 2 * PAGE;
    sqe.cdw10 = 1 | 7 << 16;
    sqe.cdw11 = 1 << 16; // PC clear
    assert_status(host.admin(sqe), sct::GENERIC, generic::INVALID_FIELD);
    assert_ok(host.create_sq(1, 8, base + 2 * PAGE, 1));
    // A second SQ on the same CQ.
    assert_ok(host.create_sq(2, 8, base + 3 * PAGE, 1));

    // Deletion: the CQ still has SQs.
    assert_status(
        host.delete(admin::DELETE_IO_CQ, 1),
        sct::COMMAND_SPECIFIC,
        cs::INVALID_QUEUE_DELETION,
    );
    assert_eq!(host.delete(admin::DELETE_IO_SQ, 0).status().code(), qid_err);
    assert_eq!(host.delete(admin::DELETE_IO_SQ, 3).status().code(), qid_err);
    assert_eq!(host.delete(admin::DELETE_IO_CQ, 0).status().code(), qid_err);
    assert_ok(host.delete(admin::DELETE_IO_SQ, 1));
    assert_ok(host.delete(admin::DELETE_IO_SQ, 2));
    assert_ok(host.delete(admin::DELETE_IO_CQ, 1));
    assert_eq!(host.delete(admin::DELETE_IO_CQ, 1).status().code(), qid_err);
}

#[test]
fn number_of_queues_feature() {
    let cfg = EmuConfig { max_ioqpairs: 4, ..Default::default() };
    let mut host = Host::new(cfg);
    // Default: everything the controller has.
    assert_eq!(get_features(&mut host, feature::NUMBER_OF_QUEUES, 0).dw0, 0x0003_0003);
    // Ask for 8 SQs and 2 CQs: capped at 4, and 2.
    let c = set_features(&mut host, feature::NUMBER_OF_QUEUES, 7 | 1 << 16);
    assert_ok(c);
    assert_eq!(c.dw0, 0x0001_0003);
    assert_eq!(get_features(&mut host, feature::NUMBER_OF_QUEUES, 0).dw0, 0x0001_0003);
    assert_eq!(get_features(&mut host, feature::NUMBER_OF_QUEUES, 1).dw0, 0x0003_0003);
    assert_status(
        set_features(&mut host, feature::NUMBER_OF_QUEUES, 0xffff),
        sct::GENERIC,
        generic::INVALID_FIELD,
    );
    let mem = DmaRegion::alloc(host.emu.dma_mapper(), PAGE_SIZE).unwrap();
    assert_status(host.create_cq(3, 8, mem.iova(), 1), sct::COMMAND_SPECIFIC, cs::INVALID_QUEUE_ID);
    assert_ok(host.create_cq(2, 8, mem.iova(), 1));
    // Too late once a queue exists.
    assert_status(
        set_features(&mut host, feature::NUMBER_OF_QUEUES, 1 | 1 << 16),
        sct::GENERIC,
        generic::COMMAND_SEQUENCE_ERROR,
    );
}

#[test]
fn other_features() {
    let mut host = Host::ready();
    assert_ok(set_features(&mut host, feature::INTERRUPT_COALESCING, 0x0a04));
    assert_eq!(get_features(&mut host, feature::INTERRUPT_COALESCING, 0).dw0, 0x0a04);
    assert_eq!(get_features(&mut host, feature::INTERRUPT_COALESCING, 1).dw0, 0);
    assert_ok(set_features(&mut host, feature::ASYNC_EVENT_CONFIG, 0x1ff));
    assert_eq!(get_features(&mut host, feature::ASYNC_EVENT_CONFIG, 0).dw0, 0x1ff);
    assert_eq!(get_features(&mut host, feature::VOLATILE_WRITE_CACHE, 0).dw0, 1);
    assert_ok(set_features(&mut host, feature::VOLATILE_WRITE_CACHE, 0));
    assert_eq!(get_features(&mut host, feature::VOLATILE_WRITE_CACHE, 0).dw0, 0);
    assert_eq!(get_features(&mut host, feature::ASYNC_EVENT_CONFIG, 3).dw0, 1 << 2);
    assert_status(
        set_features(&mut host, feature::ASYNC_EVENT_CONFIG | 1 << 31, 0),
        sct::COMMAND_SPECIFIC,
        cs::FEATURE_NOT_SAVEABLE,
    );
    assert_status(set_features(&mut host, 0x7e, 0), sct::GENERIC, generic::INVALID_FIELD);
    assert_status(get_features(&mut host, 0x7e, 0), sct::GENERIC, generic::INVALID_FIELD);
    assert_status(
        get_features(&mut host, feature::ASYNC_EVENT_CONFIG, 4),
        sct::GENERIC,
        generic::INVALID_FIELD,
    );

    let mut host = Host::new(EmuConfig { vwc: false, ..Default::default() });
    assert_status(
        get_features(&mut host, feature::VOLATILE_WRITE_CACHE, 0),
        sct::GENERIC,
        generic::INVALID_FIELD,
    );
    let (_, page) = host.identify(cns::CONTROLLER, 0);
    assert!(!IdentifyController::parse(&page).has_write_cache());
}

// ---- data transfer ----

/// Writes `data` at block `slba` with the given PRPs, then reads it back through other
/// buffers and directly, and checks both.
fn write_then_check(host: &Host, q: &mut Queue, slba: u64, prp1: u64, prp2: u64, data: &[u8]) {
    let blocks = (data.len() / 512) as u32;
    assert_ok(q.run(&host.emu, rw(nvm::WRITE, 1, slba, blocks, prp1, prp2)));
    assert_eq!(host.emu.namespace_read(1, slba * 512, data.len()), data);
}

#[test]
fn read_write_prp1_only_and_prp1_prp2() {
    let mut host = Host::ready();
    let mut q = host.io_queue(1, 16, 16);
    let buf = DmaRegion::alloc(host.emu.dma_mapper(), 3 * PAGE_SIZE).unwrap();

    // One page, PRP1 only; PRP2 garbage is ignored.
    let data = pattern(4096, 1);
    buf.write_bytes(0, &data);
    write_then_check(&host, &mut q, 8, buf.iova(), 0xdead_beef, &data);

    // 1 KiB at a dword offset that stays within the page.
    let small = pattern(1024, 2);
    buf.write_bytes(0x204, &small);
    write_then_check(&host, &mut q, 100, buf.iova() + 0x204, 0, &small);

    // Two pages at an offset: PRP1 then PRP2 = the (non-adjacent) page holding the rest.
    let two = pattern(4096, 3);
    buf.write_bytes(0xe00, &two[..0x200]);
    buf.write_bytes(2 * PAGE_SIZE, &two[0x200..]);
    write_then_check(&host, &mut q, 200, buf.iova() + 0xe00, buf.iova() + 2 * PAGE, &two);

    // Read back into fresh memory the same two ways.
    let out = DmaRegion::alloc(host.emu.dma_mapper(), 2 * PAGE_SIZE).unwrap();
    assert_ok(q.run(&host.emu, rw(nvm::READ, 1, 8, 8, out.iova(), 0)));
    let mut got = vec![0u8; 4096];
    out.read_bytes(0, &mut got);
    assert_eq!(got, data);
    // Fua is accepted.
    let mut sqe = rw(nvm::READ, 1, 200, 8, out.iova() + 0x800, out.iova() + PAGE);
    sqe.cdw12 |= crate::spec::cmd::RW_FUA;
    assert_ok(q.run(&host.emu, sqe));
    out.read_bytes(0x800, &mut got);
    assert_eq!(got, two);
    let stats = host.emu.stats();
    assert_eq!((stats.io(nvm::WRITE), stats.io(nvm::READ)), (3, 2));
}

#[test]
fn read_write_prp_list_with_offset_and_chaining() {
    let mut host = Host::ready(); // MDTS 5: 128 KiB
    let mut q = host.io_queue(1, 16, 16);
    let data_pages = DmaRegion::alloc(host.emu.dma_mapper(), 8 * PAGE_SIZE).unwrap();
    let lists = DmaRegion::alloc(host.emu.dma_mapper(), 2 * PAGE_SIZE).unwrap();
    let page = |i: u64| data_pages.iova() + i * PAGE;

    // 5 pages, PRP1 at offset 0x100, so 6 pages touched: PRP1 + a list of 5 at offset 0x40.
    let data = pattern(5 * 4096, 7);
    let first = 4096 - 0x100;
    data_pages.write_bytes(0x100, &data[..first]);
    let order = [3u64, 1, 6, 2, 5];
    for (i, p) in order.iter().enumerate() {
        lists.write_u64(0x40 + 8 * i, page(*p));
        let start = first + i * 4096;
        let end = (start + 4096).min(data.len());
        data_pages.write_bytes(*p as usize * PAGE_SIZE, &data[start..end]);
    }
    write_then_check(&host, &mut q, 1000, page(0) + 0x100, lists.iova() + 0x40, &data);

    // The same transfer with a list that starts three entries before the end of its page and
    // chains to a second list page.
    for (i, p) in order.iter().take(2).enumerate() {
        lists.write_u64(0xfe8 + 8 * i, page(*p));
    }
    lists.write_u64(0xff8, lists.iova() + PAGE);
    for (i, p) in order.iter().skip(2).enumerate() {
        lists.write_u64(PAGE_SIZE + 8 * i, page(*p));
    }
    write_then_check(&host, &mut q, 2000, page(0) + 0x100, lists.iova() + 0xfe8, &data);

    // Read it back through the chained list into zeroed pages.
    data_pages.zero(0, 8 * PAGE_SIZE);
    let sqe = rw(nvm::READ, 1, 2000, 40, page(0) + 0x100, lists.iova() + 0xfe8);
    assert_ok(q.run(&host.emu, sqe));
    let mut got = vec![0u8; data.len()];
    data_pages.read_bytes(0x100, &mut got[..first]);
    for (i, p) in order.iter().enumerate() {
        let start = first + i * 4096;
        let end = (start + 4096).min(data.len());
        data_pages.read_bytes(*p as usize * PAGE_SIZE, &mut got[start..end]);
    }
    assert_eq!(got, data);

    // A chain pointer that is not page aligned.
    lists.write_u64(0xff8, lists.iova() + PAGE + 8);
    let sqe = rw(nvm::READ, 1, 2000, 40, page(0) + 0x100, lists.iova() + 0xfe8);
    assert_status(q.run(&host.emu, sqe), sct::GENERIC, generic::PRP_OFFSET_INVALID);
    // A data entry that is not page aligned.
    lists.write_u64(0x48, page(1) + 0x10);
    let sqe = rw(nvm::READ, 1, 1000, 40, page(0) + 0x100, lists.iova() + 0x40);
    assert_status(q.run(&host.emu, sqe), sct::GENERIC, generic::PRP_OFFSET_INVALID);
}

#[test]
fn large_transfer_chains_full_list_pages() {
    // No MDTS: 2 MiB + 12 KiB needs 515 pages: PRP1, then 511 list entries + a chain pointer in
    // the first list page, then 3 in the second.
    let cfg = EmuConfig { mdts: 0, ..Default::default() };
    let mut host = Host::new(cfg);
    let mut q = host.io_queue(1, 4, 4);
    let pages = 515usize;
    // Data pages are reused round robin to keep locked memory small: each holds one fill byte.
    let ring = DmaRegion::alloc(host.emu.dma_mapper(), 8 * PAGE_SIZE).unwrap();
    for i in 0..8 {
        ring.write_bytes(i * PAGE_SIZE, &[i as u8 + 1; PAGE_SIZE]);
    }
    let lists = DmaRegion::alloc(host.emu.dma_mapper(), 2 * PAGE_SIZE).unwrap();
    let page_of = |n: usize| ring.iova() + (n % 8) as u64 * PAGE;
    for n in 1..512 {
        lists.write_u64((n - 1) * 8, page_of(n));
    }
    lists.write_u64(511 * 8, lists.iova() + PAGE);
    for n in 512..pages {
        lists.write_u64(PAGE_SIZE + (n - 512) * 8, page_of(n));
    }
    let blocks = (pages * 8) as u32;
    let sqe = rw(nvm::WRITE, 1, 0, blocks, page_of(0), lists.iova());
    assert_ok(q.run(&host.emu, sqe));
    for n in [0usize, 1, 7, 8, 510, 511, 512, 513, 514] {
        let got = host.emu.namespace_read(1, (n * PAGE_SIZE) as u64, PAGE_SIZE);
        assert!(got.iter().all(|&b| b == (n % 8) as u8 + 1), "page {n}");
    }
    // One more page than the lists describe is not readable: the second list page's next
    // entry is zero, which is page aligned but not mapped.
    let sqe = rw(nvm::WRITE, 1, 0, blocks + 8, page_of(0), lists.iova());
    assert_status(q.run(&host.emu, sqe), sct::GENERIC, generic::DATA_TRANSFER_ERROR);
}

#[test]
fn io_command_errors() {
    let cfg = EmuConfig { mdts: 1, ..Default::default() }; // 8 KiB
    let mut host = Host::new(cfg);
    let mut q = host.io_queue(1, 32, 32);
    let buf = DmaRegion::alloc(host.emu.dma_mapper(), 4 * PAGE_SIZE).unwrap();
    let b = buf.iova();
    let blocks = 131_072u64;
    let check = |q: &mut Queue, sqe: Sqe, sc: u8| {
        let c = q.run(&host.emu, sqe);
        assert_status(c, sct::GENERIC, sc);
    };

    check(&mut q, rw(nvm::READ, 0, 0, 1, b, 0), generic::INVALID_NAMESPACE);
    check(&mut q, rw(nvm::READ, 2, 0, 1, b, 0), generic::INVALID_NAMESPACE);
    check(&mut q, rw(nvm::WRITE, u32::MAX, 0, 1, b, 0), generic::INVALID_NAMESPACE);
    check(&mut q, rw(nvm::READ, 1, blocks, 1, b, 0), generic::LBA_OUT_OF_RANGE);
    check(&mut q, rw(nvm::READ, 1, blocks - 1, 2, b, 0), generic::LBA_OUT_OF_RANGE);
    check(&mut q, rw(nvm::READ, 1, u64::MAX, 1, b, 0), generic::LBA_OUT_OF_RANGE);
    assert_ok(q.run(&host.emu, rw(nvm::READ, 1, blocks - 1, 1, b, 0)));
    // 8 KiB is fine, 8.5 KiB exceeds MDTS.
    assert_ok(q.run(&host.emu, rw(nvm::READ, 1, 0, 16, b, b + PAGE)));
    check(&mut q, rw(nvm::READ, 1, 0, 17, b, b + PAGE), generic::INVALID_FIELD);
    // PRP1 not dword aligned; PRP2 with an offset.
    check(&mut q, rw(nvm::READ, 1, 0, 1, b + 2, 0), generic::PRP_OFFSET_INVALID);
    check(&mut q, rw(nvm::READ, 1, 0, 16, b, b + PAGE + 4), generic::PRP_OFFSET_INVALID);
    // Memory the IOMMU does not map: IOVA 0, and past the end of the buffer.
    let faults = host.emu.iommu().faults();
    check(&mut q, rw(nvm::READ, 1, 0, 1, 0, 0), generic::DATA_TRANSFER_ERROR);
    check(
        &mut q,
        rw(nvm::WRITE, 1, 0, 16, b + 3 * PAGE, b + 4 * PAGE),
        generic::DATA_TRANSFER_ERROR,
    );
    assert_eq!(host.emu.iommu().faults(), faults + 2);
    assert_eq!(host.emu.stats().iommu_faults, faults + 2);
    // Unknown opcode; SGL.
    check(&mut q, Sqe::new(0x7c, 1), generic::INVALID_OPCODE);
    let mut sgl = rw(nvm::READ, 1, 0, 1, b, 0);
    sgl.cdw0 |= 1 << 14;
    check(&mut q, sgl, generic::INVALID_FIELD);
}

#[test]
fn flush_write_zeroes_and_deallocate() {
    let mut host = Host::ready();
    let mut q = host.io_queue(1, 16, 16);
    host.emu.namespace_write(1, 0, &[0xaa; 64 * 512]);

    let mut flush = Sqe::new(nvm::FLUSH, 1);
    assert_ok(q.run(&host.emu, flush));
    flush.nsid = u32::MAX;
    assert_ok(q.run(&host.emu, flush));
    flush.nsid = 0;
    assert_status(q.run(&host.emu, flush), sct::GENERIC, generic::INVALID_NAMESPACE);

    // Write Zeroes blocks 2..5.
    let wz = rw(nvm::WRITE_ZEROES, 1, 2, 3, 0, 0);
    assert_ok(q.run(&host.emu, wz));
    let ns = host.emu.namespace_read(1, 0, 64 * 512);
    assert!(ns[..1024].iter().all(|&b| b == 0xaa));
    assert!(ns[1024..2560].iter().all(|&b| b == 0));
    assert!(ns[2560..].iter().all(|&b| b == 0xaa));
    let wz = rw(nvm::WRITE_ZEROES, 1, 131_071, 2, 0, 0);
    assert_status(q.run(&host.emu, wz), sct::GENERIC, generic::LBA_OUT_OF_RANGE);

    // Dataset Management, deallocate two ranges: blocks 10..12 and 40..41 (and an empty one).
    let ranges = DmaRegion::alloc(host.emu.dma_mapper(), PAGE_SIZE).unwrap();
    let range = |i: usize, nlb: u32, slba: u64| {
        ranges.write_u32(i * 16 + 4, nlb);
        ranges.write_u64(i * 16 + 8, slba);
    };
    range(0, 2, 10);
    range(1, 0, 0);
    range(2, 1, 40);
    let mut dsm = Sqe::new(nvm::DATASET_MANAGEMENT, 1);
    dsm.prp1 = ranges.iova();
    dsm.cdw10 = 2;
    dsm.cdw11 = 0; // hints only: nothing happens
    assert_ok(q.run(&host.emu, dsm));
    assert!(host.emu.namespace_read(1, 10 * 512, 512).iter().all(|&b| b == 0xaa));
    dsm.cdw11 = 1 << 2;
    assert_ok(q.run(&host.emu, dsm));
    let ns = host.emu.namespace_read(1, 0, 64 * 512);
    assert!(ns[9 * 512..10 * 512].iter().all(|&b| b == 0xaa));
    assert!(ns[10 * 512..12 * 512].iter().all(|&b| b == 0));
    assert!(ns[12 * 512..40 * 512].iter().all(|&b| b == 0xaa));
    assert!(ns[40 * 512..41 * 512].iter().all(|&b| b == 0));
    assert!(ns[41 * 512..].iter().all(|&b| b == 0xaa));
    // A range out of bounds fails the command and deallocates nothing.
    range(0, 2, 20);
    range(1, 5, 131_070);
    dsm.cdw10 = 1;
    assert_status(q.run(&host.emu, dsm), sct::GENERIC, generic::LBA_OUT_OF_RANGE);
    assert!(host.emu.namespace_read(1, 20 * 512, 1024).iter().all(|&b| b == 0xaa));
}

// ---- queues: batching, backpressure, phase, CIDs, doorbell checks ----

#[test]
fn one_doorbell_processes_a_batch() {
    let mut host = Host::ready();
    let mut q = host.io_queue(1, 16, 16);
    let buf = DmaRegion::alloc(host.emu.dma_mapper(), PAGE_SIZE).unwrap();
    let before = host.emu.stats();
    let cids: Vec<u16> = (0..8).map(|i| q.push(rw(nvm::READ, 1, i, 1, buf.iova(), 0))).collect();
    q.ring(&host.emu);
    let done = q.drain(&host.emu);
    assert_eq!(done.iter().map(|c| c.cid).collect::<Vec<_>>(), cids);
    // SQ head as seen by each completion: the controller fetched one more each time.
    assert_eq!(done.iter().map(|c| c.sq_head).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
    assert!(done.iter().all(|c| c.status().is_success() && c.sq_id == 1 && c.phase()));
    let after = host.emu.stats();
    assert_eq!(after.sq_doorbells[1] - before.sq_doorbells[1], 1);
    assert_eq!(after.cq_doorbells[1] - before.cq_doorbells[1], 1);
    assert_eq!(after.io(nvm::READ) - before.io(nvm::READ), 8);
    assert_eq!(after.completions_posted - before.completions_posted, 8);
    assert_eq!(after.doorbell_writes() - before.doorbell_writes(), 2);
}

#[test]
fn full_completion_queue_holds_completions_back() {
    let mut host = Host::ready();
    // CQ of 4 entries holds 3 completions at a time; SQ of 16.
    let mut q = host.io_queue(1, 16, 4);
    let buf = DmaRegion::alloc(host.emu.dma_mapper(), PAGE_SIZE).unwrap();
    let mut expected = Vec::new();
    let mut seen = Vec::new();
    let mut phases = Vec::new();
    // 50 commands in rounds of 10: far more than either queue holds, so both wrap many times.
    for round in 0..5 {
        for i in 0..10 {
            expected.push(q.push(rw(nvm::READ, 1, round * 10 + i, 1, buf.iova(), 0)));
        }
        q.ring(&host.emu);
        loop {
            let mut got = Vec::new();
            while let Some(c) = q.poll() {
                phases.push(c.phase());
                got.push(c);
            }
            if got.is_empty() {
                break;
            }
            // Never more than the queue can hold between head doorbells.
            assert!(got.len() <= 3, "{} completions in a 4-entry queue", got.len());
            seen.extend(got.iter().map(|c| c.cid));
            q.ack(&host.emu);
        }
    }
    assert_eq!(seen, expected);
    // The phase tag flipped every 4 entries.
    assert_eq!(phases.len(), 50);
    for (i, p) in phases.iter().enumerate() {
        assert_eq!(*p, (i / 4) % 2 == 0, "entry {i}");
    }
    assert!(!host.csts().cfs());
}

#[test]
fn doorbell_values_are_checked() {
    // A tail at or beyond the queue size.
    let mut host = Host::ready();
    let q = host.io_queue(1, 8, 8);
    host.emu.write32(doorbell_offset(1, false, 0), 8);
    assert!(host.csts().cfs());
    // Nothing is processed any more, until a reset.
    host.emu.write32(doorbell_offset(1, false, 0), 1);
    assert_eq!(host.emu.stats().io_commands.iter().sum::<u64>(), 0);
    assert_eq!(host.emu.stats().ignored_doorbells, 1);
    drop(q);

    // A completion queue head that passes the posted entries.
    let mut host = Host::ready();
    let mut q = host.io_queue(1, 8, 8);
    let buf = DmaRegion::alloc(host.emu.dma_mapper(), PAGE_SIZE).unwrap();
    q.push(rw(nvm::READ, 1, 0, 1, buf.iova(), 0));
    q.ring(&host.emu);
    host.emu.write32(doorbell_offset(1, true, 0), 2);
    assert!(host.csts().cfs());

    // A queue that does not exist.
    let host = Host::ready();
    host.emu.write32(doorbell_offset(3, false, 0), 1);
    assert!(host.csts().cfs());
    // A CQ head beyond the size.
    let host = Host::ready();
    host.emu.write32(doorbell_offset(0, true, 0), 32);
    assert!(host.csts().cfs());
}

#[test]
fn wider_doorbell_stride() {
    let cfg = EmuConfig { dstrd: 3, max_ioqpairs: 2, ..Default::default() };
    let mut host = Host::new(cfg);
    let mut q = host.io_queue(2, 8, 8);
    let buf = DmaRegion::alloc(host.emu.dma_mapper(), PAGE_SIZE).unwrap();
    assert_ok(q.run(&host.emu, rw(nvm::READ, 1, 0, 1, buf.iova(), 0)));
    assert_eq!(host.emu.stats().sq_doorbells, vec![2, 0, 1]);
    // Between two doorbells: reserved, ignored, counted.
    host.emu.write32(doorbell_offset(2, false, 3) + 4, 1);
    assert!(!host.csts().cfs());
    assert_eq!(host.emu.stats().bad_register_accesses, 1);
}

#[test]
fn command_id_conflict() {
    let mut host = Host::ready();
    let mut q = host.io_queue(1, 8, 8);
    let buf = DmaRegion::alloc(host.emu.dma_mapper(), PAGE_SIZE).unwrap();
    host.emu.inject(FaultRule::new(FaultAction::Hold).qid(1).times(1));
    let mut sqe = rw(nvm::READ, 1, 0, 1, buf.iova(), 0);
    sqe.set_cid(42);
    q.push_raw(sqe);
    q.ring(&host.emu);
    assert!(q.poll().is_none());
    // The same CID again while the first is outstanding.
    q.push_raw(sqe);
    q.ring(&host.emu);
    let c = q.drain(&host.emu);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].cid, 42);
    assert_status(c[0], sct::GENERIC, generic::CID_CONFLICT);
    assert_eq!(host.emu.stats().cid_conflicts, 1);
    // Releasing completes the original; then the CID is free again.
    assert_eq!(host.emu.release_held(), 1);
    let c = q.drain(&host.emu);
    assert_eq!(c.len(), 1);
    assert_ok(c[0]);
    q.push_raw(sqe);
    q.ring(&host.emu);
    assert_ok(q.drain(&host.emu)[0]);
}

// ---- faults ----

#[test]
fn fault_fail_matches_by_lba_opcode_and_count() {
    let mut host = Host::ready();
    let mut q = host.io_queue(1, 16, 16);
    let buf = DmaRegion::alloc(host.emu.dma_mapper(), PAGE_SIZE).unwrap();
    let media_error = Status::new(sct::MEDIA, media::UNRECOVERED_READ_ERROR).with_dnr();
    host.emu.inject(
        FaultRule::new(FaultAction::Fail(media_error))
            .qid(1)
            .opcode(nvm::READ)
            .nsid(1)
            .lbas(100..108)
            .times(2),
    );
    let read = |slba| rw(nvm::READ, 1, slba, 4, buf.iova(), 0);
    // Blocks 96..100 do not overlap, 104..108 do, as does 98..102.
    assert_ok(q.run(&host.emu, read(96)));
    assert_ok(q.run(&host.emu, rw(nvm::WRITE, 1, 104, 4, buf.iova(), 0)));
    let c = q.run(&host.emu, read(104));
    assert_eq!(c.status(), media_error);
    assert_eq!(q.run(&host.emu, read(98)).status(), media_error);
    // The rule is spent.
    assert_ok(q.run(&host.emu, read(104)));
    assert_eq!(host.emu.stats().faults_fired, 2);
}

#[test]
fn fault_hold_release_abort_and_queue_deletion() {
    let mut host = Host::ready();
    let mut q = host.io_queue(1, 16, 16);
    let buf = DmaRegion::alloc(host.emu.dma_mapper(), PAGE_SIZE).unwrap();
    buf.write_bytes(0, &[0x5a; 512]);
    host.emu.inject(FaultRule::new(FaultAction::Hold).qid(1));

    // Held commands are not executed until released.
    let w = q.push(rw(nvm::WRITE, 1, 7, 1, buf.iova(), 0));
    let r = q.push(rw(nvm::READ, 1, 8, 1, buf.iova(), 0));
    q.ring(&host.emu);
    assert!(q.poll().is_none());
    assert_eq!(host.emu.held(), 2);
    assert_eq!(host.emu.namespace_read(1, 7 * 512, 1), [0]);
    host.emu.clear_faults();
    assert_eq!(host.emu.release_held(), 2);
    let done = q.drain(&host.emu);
    assert_eq!(done.iter().map(|c| c.cid).collect::<Vec<_>>(), [w, r]);
    assert!(done.iter().all(|c| c.status().is_success()));
    assert_eq!(host.emu.namespace_read(1, 7 * 512, 512), [0x5a; 512]);
    assert_eq!(host.emu.release_held(), 0);

    // Abort takes a held command.
    host.emu.inject(FaultRule::new(FaultAction::Hold).qid(1).times(2));
    let a = q.push(rw(nvm::WRITE, 1, 9, 1, buf.iova(), 0));
    let b = q.push(rw(nvm::WRITE, 1, 10, 1, buf.iova(), 0));
    q.ring(&host.emu);
    let c = abort(&mut host, 1, a);
    assert_ok(c);
    assert_eq!(c.dw0 & 1, 0, "aborted");
    let done = q.drain(&host.emu);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].cid, a);
    assert_status(done[0], sct::GENERIC, generic::ABORT_REQUESTED);
    assert_eq!(host.emu.namespace_read(1, 9 * 512, 1), [0]);
    // Aborting something not outstanding: not aborted.
    assert_eq!(abort(&mut host, 1, a).dw0 & 1, 1);
    assert_eq!(abort(&mut host, 5, b).dw0 & 1, 1);

    // Deleting the SQ completes the other held command with SQ Deleted.
    assert_ok(host.delete(admin::DELETE_IO_SQ, 1));
    let done = q.drain(&host.emu);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].cid, b);
    assert_status(done[0], sct::GENERIC, generic::SQ_DELETED);
    assert_eq!(host.emu.held(), 0);
}

#[test]
fn fault_hold_is_dropped_by_reset() {
    let mut host = Host::ready();
    let mut q = host.io_queue(1, 8, 8);
    let buf = DmaRegion::alloc(host.emu.dma_mapper(), PAGE_SIZE).unwrap();
    host.emu.inject(FaultRule::new(FaultAction::Hold).opcode(nvm::WRITE));
    q.push(rw(nvm::WRITE, 1, 0, 1, buf.iova(), 0));
    q.ring(&host.emu);
    assert_eq!(host.emu.held(), 1);
    host.emu.write32(offset::CC, 0);
    assert_eq!(host.emu.held(), 0);
    assert_eq!(host.emu.release_held(), 0);
    assert!(q.poll().is_none());
}

#[test]
fn aborts_declined_and_limited() {
    // QEMU 7.2 behaviour: never aborts.
    let cfg = EmuConfig { decline_aborts: true, ..Default::default() };
    let mut host = Host::new(cfg);
    let mut q = host.io_queue(1, 8, 8);
    let buf = DmaRegion::alloc(host.emu.dma_mapper(), PAGE_SIZE).unwrap();
    host.emu.inject(FaultRule::new(FaultAction::Hold).qid(1));
    let cid = q.push(rw(nvm::READ, 1, 0, 1, buf.iova(), 0));
    q.ring(&host.emu);
    let c = abort(&mut host, 1, cid);
    assert_ok(c);
    assert_eq!(c.dw0 & 1, 1);
    assert_eq!(host.emu.held(), 1);
    assert!(q.poll().is_none());

    // Abort Command Limit: ACL 1 (two outstanding). Hold Aborts to keep them outstanding.
    let cfg = EmuConfig { acl_z: 1, ..Default::default() };
    let mut host = Host::new(cfg);
    host.emu.inject(FaultRule::new(FaultAction::Hold).qid(0).opcode(admin::ABORT));
    let mut sqe = Sqe::new(admin::ABORT, 0);
    sqe.cdw10 = 1 | 77 << 16;
    host.admin.push(sqe);
    host.admin.push(sqe);
    host.admin.ring(&host.emu);
    assert!(host.admin.poll().is_none());
    host.emu.clear_faults();
    let c = host.admin(sqe);
    assert_status(c, sct::COMMAND_SPECIFIC, cs::ABORT_LIMIT_EXCEEDED);
    // Released, the held aborts find nothing to abort.
    assert_eq!(host.emu.release_held(), 2);
    let done = host.admin.drain(&host.emu);
    assert!(done.iter().all(|c| c.status().is_success() && c.dw0 & 1 == 1));
}

#[test]
fn fault_drop_is_lost_and_not_abortable() {
    let mut host = Host::ready();
    let mut q = host.io_queue(1, 8, 8);
    let buf = DmaRegion::alloc(host.emu.dma_mapper(), PAGE_SIZE).unwrap();
    buf.write_bytes(0, &[1; 512]);
    host.emu.inject(FaultRule::new(FaultAction::Drop).times(1));
    let lost = q.push(rw(nvm::WRITE, 1, 3, 1, buf.iova(), 0));
    q.ring(&host.emu);
    assert!(q.poll().is_none());
    assert_eq!(host.emu.held(), 0);
    assert_eq!(host.emu.namespace_read(1, 3 * 512, 1), [0], "a lost write is not performed");
    assert_eq!(abort(&mut host, 1, lost).dw0 & 1, 1);
    // The controller forgot the CID: reusing it is no conflict.
    let mut sqe = rw(nvm::WRITE, 1, 3, 1, buf.iova(), 0);
    sqe.set_cid(lost);
    q.push_raw(sqe);
    q.ring(&host.emu);
    assert_ok(q.drain(&host.emu)[0]);
}

#[test]
fn fault_wrong_cid_duplicate_and_wrong_phase() {
    let mut host = Host::ready();
    let mut q = host.io_queue(1, 8, 8);
    let buf = DmaRegion::alloc(host.emu.dma_mapper(), PAGE_SIZE).unwrap();

    host.emu.inject(FaultRule::new(FaultAction::WrongCid(0xbad)).times(1));
    let cid = q.push(rw(nvm::READ, 1, 0, 1, buf.iova(), 0));
    q.ring(&host.emu);
    let done = q.drain(&host.emu);
    assert_eq!(done.len(), 1);
    assert_ne!(cid, 0xbad);
    assert_eq!(done[0].cid, 0xbad);

    host.emu.inject(FaultRule::new(FaultAction::Duplicate).times(1));
    let cid = q.push(rw(nvm::READ, 1, 0, 1, buf.iova(), 0));
    q.ring(&host.emu);
    let done = q.drain(&host.emu);
    assert_eq!(done.iter().map(|c| c.cid).collect::<Vec<_>>(), [cid, cid]);
    // The CID is free after the first copy: reusing it works.
    let mut sqe = rw(nvm::READ, 1, 0, 1, buf.iova(), 0);
    sqe.set_cid(cid);
    q.push_raw(sqe);
    q.ring(&host.emu);
    assert_ok(q.drain(&host.emu)[0]);

    // Wrong phase: the entry is written but the host cannot tell it is new.
    host.emu.inject(FaultRule::new(FaultAction::WrongPhase).times(1));
    let cid = q.push(rw(nvm::READ, 1, 0, 1, buf.iova(), 0));
    q.ring(&host.emu);
    assert!(q.poll().is_none());
    let raw = q.peek();
    assert_eq!(raw.cid, cid);
    assert_eq!(raw.phase(), !q.phase);
    assert_eq!(host.emu.stats().faults_fired, 3);
}

#[test]
fn fault_corrupt_data_inverts_reads_only() {
    let mut host = Host::ready();
    let mut q = host.io_queue(1, 8, 8);
    let buf = DmaRegion::alloc(host.emu.dma_mapper(), PAGE_SIZE).unwrap();
    host.emu.inject(FaultRule::new(FaultAction::CorruptData).qid(1));
    let data = pattern(1024, 9);
    buf.write_bytes(0, &data);
    assert_ok(q.run(&host.emu, rw(nvm::WRITE, 1, 0, 2, buf.iova(), 0)));
    assert_eq!(host.emu.namespace_read(1, 0, 1024), data, "writes are stored intact");
    buf.zero(0, PAGE_SIZE);
    assert_ok(q.run(&host.emu, rw(nvm::READ, 1, 0, 2, buf.iova(), 0)));
    let mut got = vec![0u8; 1024];
    buf.read_bytes(0, &mut got);
    assert_eq!(got, data.iter().map(|b| !b).collect::<Vec<_>>());
    assert_eq!(host.emu.namespace_read(1, 0, 1024), data, "the stored data is untouched");
}

#[test]
fn fault_fatal_stops_until_reset() {
    let mut host = Host::ready();
    let mut q = host.io_queue(1, 8, 8);
    let buf = DmaRegion::alloc(host.emu.dma_mapper(), PAGE_SIZE).unwrap();
    host.emu.inject(FaultRule::new(FaultAction::Fatal).opcode(nvm::FLUSH).times(1));
    q.push(rw(nvm::READ, 1, 0, 1, buf.iova(), 0));
    q.push(Sqe::new(nvm::FLUSH, 1));
    q.push(rw(nvm::READ, 1, 0, 1, buf.iova(), 0));
    q.ring(&host.emu);
    // The read before the flush completed, nothing after.
    let done = q.drain(&host.emu);
    assert_eq!(done.len(), 1);
    assert!(host.csts().cfs());
    assert!(host.csts().rdy());
    assert_eq!(host.emu.stats().io(nvm::READ), 1);
    // Admin commands are not processed either.
    host.admin.push(Sqe::new(admin::GET_FEATURES, 0));
    host.admin.ring(&host.emu);
    assert!(host.admin.poll().is_none());
    // Reset clears it.
    host.emu.write32(offset::CC, 0);
    assert_eq!(host.csts(), Csts(0));
}

#[test]
fn fault_vanish_reads_all_ones() {
    let mut host = Host::ready();
    let mut q = host.io_queue(1, 8, 8);
    let buf = DmaRegion::alloc(host.emu.dma_mapper(), PAGE_SIZE).unwrap();
    host.emu.inject(FaultRule::new(FaultAction::Vanish).qid(1).opcode(nvm::WRITE));
    assert_ok(q.run(&host.emu, rw(nvm::READ, 1, 0, 1, buf.iova(), 0)));
    q.push(rw(nvm::WRITE, 1, 0, 1, buf.iova(), 0));
    q.ring(&host.emu);
    assert!(q.poll().is_none());
    assert_eq!(host.emu.read32(offset::CSTS), u32::MAX);
    assert_eq!(host.emu.read64(offset::CAP), u64::MAX);
    assert!(host.csts().is_gone());
    // Nothing brings it back.
    host.emu.write32(offset::CC, 0);
    assert_eq!(host.emu.read32(offset::CC), u32::MAX);
    assert_eq!(host.emu.release_held(), 0);
}

// ---- asynchronous events and log pages ----

#[test]
fn async_event_requests() {
    let cfg = EmuConfig { aerl_z: 1, ..Default::default() };
    let mut host = Host::new(cfg);
    // Two may be outstanding; the third is refused.
    let first = host.admin.push(Sqe::new(admin::ASYNC_EVENT_REQUEST, 0));
    let second = host.admin.push(Sqe::new(admin::ASYNC_EVENT_REQUEST, 0));
    host.admin.ring(&host.emu);
    assert!(host.admin.poll().is_none());
    let c = host.admin(Sqe::new(admin::ASYNC_EVENT_REQUEST, 0));
    assert_status(c, sct::COMMAND_SPECIFIC, cs::ASYNC_EVENT_LIMIT_EXCEEDED);

    // SMART / health critical warning: type 1, info 0x01, log page 02h.
    assert!(host.emu.raise_event(1, 0x01, 2));
    let done = host.admin.drain(&host.emu);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].cid, first);
    assert_eq!(done[0].dw0, 0x0002_0101);
    assert!(host.emu.raise_event(0, 0x02, 1));
    assert_eq!(host.admin.drain(&host.emu)[0].cid, second);

    // With none outstanding the event waits for the next request.
    assert!(!host.emu.raise_event(2, 0x00, 3));
    let c = host.admin(Sqe::new(admin::ASYNC_EVENT_REQUEST, 0));
    assert_ok(c);
    assert_eq!(c.dw0, 0x0003_0002);
    // A reset drops outstanding requests.
    host.admin.push(Sqe::new(admin::ASYNC_EVENT_REQUEST, 0));
    host.admin.ring(&host.emu);
    host.emu.write32(offset::CC, 0);
    assert!(!host.emu.raise_event(0, 0, 1));
}

#[test]
fn log_pages() {
    let mut host = Host::ready();
    let mut q = host.io_queue(1, 8, 8);
    let buf = DmaRegion::alloc(host.emu.dma_mapper(), 2 * PAGE_SIZE).unwrap();
    assert_ok(q.run(&host.emu, rw(nvm::WRITE, 1, 0, 8, buf.iova(), 0)));
    assert_ok(q.run(&host.emu, rw(nvm::READ, 1, 0, 2, buf.iova(), 0)));
    let bad = q.run(&host.emu, rw(nvm::READ, 1, 1 << 40, 1, buf.iova(), 0));
    assert_status(bad, sct::GENERIC, generic::LBA_OUT_OF_RANGE);

    let get = |host: &mut Host, lid: u8, nsid: u32, len: u32, off: u64| {
        let mut sqe = Sqe::new(admin::GET_LOG_PAGE, nsid);
        sqe.prp1 = buf.iova();
        sqe.prp2 = buf.iova() + PAGE;
        sqe.cdw10 = u32::from(lid) | (len / 4 - 1) << 16;
        sqe.cdw12 = off as u32;
        sqe.cdw13 = (off >> 32) as u32;
        buf.zero(0, 2 * PAGE_SIZE);
        host.admin(sqe)
    };

    // Error log: the newest entry is the failed read.
    assert_ok(get(&mut host, log_page::ERROR_INFORMATION, 0, 4096, 0));
    assert_eq!(buf.read_u64(0), 1, "error count");
    assert_eq!(buf.read_u32(8) & 0xffff, 1, "SQ ID");
    assert_eq!(buf.read_u32(8) >> 16, u32::from(bad.cid));
    assert_eq!((buf.read_u32(12) & 0xffff) >> 1, u32::from(bad.status().0));
    assert_eq!(buf.read_u64(16), 1 << 40, "LBA");
    assert_eq!(buf.read_u32(24), 1, "NSID");
    assert_eq!(buf.read_u64(64), 0, "only one entry");

    // SMART: 4 KiB written, 1 KiB read, one command each, one error.
    assert_ok(get(&mut host, log_page::SMART_HEALTH, u32::MAX, 512, 0));
    assert_eq!(buf.read_u32(0) >> 8 & 0xffff, 313);
    assert_eq!(buf.read_u64(32), 1, "data units read (thousands of 512 B, rounded up)");
    assert_eq!(buf.read_u64(48), 1);
    assert_eq!(buf.read_u64(64), 1, "host reads");
    assert_eq!(buf.read_u64(80), 1, "host writes");
    assert_eq!(buf.read_u64(176), 1, "error entries");
    // Offset and partial reads.
    assert_ok(get(&mut host, log_page::SMART_HEALTH, 0, 16, 64));
    assert_eq!(buf.read_u64(0), 1);
    assert_eq!(buf.read_u64(16), 0, "only 16 bytes were transferred");

    let gen = (sct::GENERIC, generic::INVALID_FIELD);
    assert_eq!(get(&mut host, log_page::SMART_HEALTH, 1, 512, 0).status().code(), gen);
    assert_eq!(get(&mut host, log_page::SMART_HEALTH, 0, 8192, 0).status().code(), gen);
    assert_eq!(get(&mut host, log_page::SMART_HEALTH, 0, 16, 2).status().code(), gen);
    assert_eq!(get(&mut host, log_page::SMART_HEALTH, 0, 16, 512).status().code(), gen);
    assert_status(get(&mut host, 0x70, 0, 16, 0), sct::COMMAND_SPECIFIC, cs::INVALID_LOG_PAGE);
}

// ---- interrupts and the IOMMU ----

#[test]
fn interrupts_signal_eventfds() {
    let emu = EmulatedController::new(EmuConfig::default());
    assert_eq!(emu.interrupt_vectors(), 0);
    assert_eq!(emu.enable_interrupts(1).unwrap_err().kind(), std::io::ErrorKind::Unsupported);

    let cfg = EmuConfig { msix_vectors: 4, ..Default::default() };
    let mut host = Host::new(cfg);
    assert_eq!(host.emu.interrupt_vectors(), 4);
    assert!(host.emu.enable_interrupts(5).is_err());
    let fds = host.emu.enable_interrupts(3).unwrap();
    assert_eq!(fds.len(), 3);

    // An admin command signals vector 0.
    assert_ok(get_features(&mut host, feature::NUMBER_OF_QUEUES, 0));
    assert_eq!(fds[0].read().unwrap(), 1);

    // A CQ on vector 2, and one with interrupts disabled.
    let q = Queue::new(&host.emu, 1, 8, 8);
    assert_ok(host.create_cq(1, 8, q.cq.iova(), 1 | 2 | 2 << 16));
    assert_ok(host.create_sq(1, 8, q.sq.iova(), 1));
    let mut q = q;
    let quiet = Queue::new(&host.emu, 2, 8, 8);
    assert_ok(host.create_cq(2, 8, quiet.cq.iova(), 1));
    assert_ok(host.create_sq(2, 8, quiet.sq.iova(), 2));
    let mut quiet = quiet;
    let _ = fds[0].read();

    let buf = DmaRegion::alloc(host.emu.dma_mapper(), PAGE_SIZE).unwrap();
    for i in 0..3 {
        q.push(rw(nvm::READ, 1, i, 1, buf.iova(), 0));
    }
    q.ring(&host.emu);
    // One signal for the batch.
    assert_eq!(fds[2].read().unwrap(), 1);
    assert_eq!(q.drain(&host.emu).len(), 3);
    assert_ok(quiet.run(&host.emu, rw(nvm::READ, 1, 0, 1, buf.iova(), 0)));
    for fd in &fds {
        assert!(fd.read().is_err(), "no other vector fired");
    }
    host.emu.disable_interrupts();
    assert_ok(q.run(&host.emu, rw(nvm::READ, 1, 0, 1, buf.iova(), 0)));
    assert!(fds[2].read().is_err());
}

#[test]
fn queue_memory_faults_are_fatal_and_mappings_are_released() {
    let mut host = Host::ready();
    let iommu = host.emu.iommu().clone();
    let mut q = host.io_queue(1, 8, 8);
    // Replace the completion queue memory behind the controller's back: the old IOVA is
    // unmapped, so posting the completion faults.
    let before = iommu.mappings();
    q.cq = DmaRegion::alloc(host.emu.dma_mapper(), PAGE_SIZE).unwrap();
    assert_eq!(iommu.mappings(), before);
    q.push(Sqe::new(nvm::FLUSH, 1));
    q.ring(&host.emu);
    assert!(host.csts().cfs());
    assert_eq!(host.emu.stats().io(nvm::FLUSH), 1);
    drop(q);
    drop(host);
    assert_eq!(iommu.mappings(), 0, "every DMA region was unmapped");

    // The same with the submission queue: the fetch faults.
    let mut host = Host::ready();
    let mut q = host.io_queue(1, 8, 8);
    q.sq = DmaRegion::alloc(host.emu.dma_mapper(), PAGE_SIZE).unwrap();
    q.push(Sqe::new(nvm::FLUSH, 1));
    q.ring(&host.emu);
    assert!(host.csts().cfs());
    assert_eq!(host.emu.stats().io(nvm::FLUSH), 0);

    // Admin queues at the very top of the address space: enabling works (the addresses are
    // aligned), the first fetch faults instead of overflowing.
    let emu = EmulatedController::new(EmuConfig::default());
    emu.write32(offset::AQA, aqa(63, 63));
    emu.write64(offset::ASQ, !0xfffu64);
    emu.write64(offset::ACQ, !0xfffu64);
    emu.write32(offset::CC, cc_enable().0);
    assert!(emu.csts().rdy());
    emu.write32(doorbell_offset(0, false, 0), 63);
    assert!(emu.csts().cfs());
}
