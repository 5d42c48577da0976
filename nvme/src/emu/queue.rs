//! Queue state, command ID tracking and completion posting.

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};

use super::State;
use crate::spec::cmd::{Cqe, Sqe};
use crate::spec::status::generic;
use crate::spec::Status;

/// The set of command IDs outstanding in one submission queue: 65536 bits.
pub(super) struct CidSet(Box<[u64; 1024]>);

impl CidSet {
    pub(super) fn new() -> Self {
        CidSet(Box::new([0; 1024]))
    }

    /// Adds `cid`; false if it was already there.
    pub(super) fn insert(&mut self, cid: u16) -> bool {
        let (w, b) = (usize::from(cid >> 6), cid & 63);
        let was = self.0[w] >> b & 1 == 1;
        self.0[w] |= 1 << b;
        !was
    }

    pub(super) fn remove(&mut self, cid: u16) {
        self.0[usize::from(cid >> 6)] &= !(1 << (cid & 63));
    }
}

/// A submission queue.
pub(super) struct Sq {
    pub(super) base: u64,
    /// Entries (one-based).
    pub(super) size: u32,
    pub(super) head: u32,
    pub(super) tail: u32,
    pub(super) cqid: u16,
    /// Command IDs fetched and not yet completed (held commands, outstanding Asynchronous
    /// Event Requests, and completions waiting for room in the completion queue).
    pub(super) cids: CidSet,
}

impl Sq {
    pub(super) fn new(base: u64, size: u32, cqid: u16) -> Self {
        Sq { base, size, head: 0, tail: 0, cqid, cids: CidSet::new() }
    }
}

/// A completion queue.
pub(super) struct Cq {
    pub(super) base: u64,
    pub(super) size: u32,
    pub(super) head: u32,
    pub(super) tail: u32,
    /// The phase tag the next posted entry carries; starts at 1.
    pub(super) phase: bool,
    pub(super) ien: bool,
    pub(super) iv: u16,
    /// Submission queues that post here.
    pub(super) sqs: u16,
    /// Completions waiting for room, in order.
    pub(super) backlog: VecDeque<Pending>,
}

impl Cq {
    pub(super) fn new(base: u64, size: u32, ien: bool, iv: u16) -> Self {
        Cq { base, size, head: 0, tail: 0, phase: true, ien, iv, sqs: 0, backlog: VecDeque::new() }
    }

    /// Entries posted and not yet consumed by a head doorbell write.
    pub(super) fn used(&self) -> u32 {
        (self.tail + self.size - self.head) % self.size
    }

    /// Full: one slot always stays empty so that head == tail means empty.
    fn is_full(&self) -> bool {
        self.used() == self.size - 1
    }
}

/// A completion on its way to a completion queue.
#[derive(Clone, Copy, Debug)]
pub(super) struct Pending {
    pub(super) sqid: u16,
    /// The CID the entry reports (a [`super::FaultAction::WrongCid`] makes it differ).
    pub(super) cid: u16,
    pub(super) status: Status,
    pub(super) dw0: u32,
    /// The CID to retire from the submission queue's outstanding set once posted.
    pub(super) release: Option<u16>,
    /// Post with the phase tag inverted (a hostile fault).
    pub(super) flip_phase: bool,
    /// For the error log: the command's namespace and first LBA.
    pub(super) nsid: u32,
    pub(super) lba: u64,
}

impl Pending {
    pub(super) fn new(sqid: u16, cid: u16, status: Status, dw0: u32) -> Self {
        Pending { sqid, cid, status, dw0, release: Some(cid), flip_phase: false, nsid: 0, lba: 0 }
    }

    /// Does not retire the CID (a conflict report, a duplicate, a bogus CID).
    pub(super) fn keep_cid(self) -> Self {
        Pending { release: None, ..self }
    }

    /// Records the command's namespace and LBA for the error log.
    pub(super) fn about(self, sqe: &Sqe) -> Self {
        Pending { nsid: sqe.nsid, lba: sqe.slba(), ..self }
    }
}

impl State {
    /// Queues a completion for the submission queue's completion queue and posts what fits.
    /// A completion for a queue that no longer exists is dropped.
    pub(super) fn complete(&mut self, p: Pending) {
        if !p.status.is_success()
            && !matches!(p.status.sc(), generic::ABORT_REQUESTED | generic::SQ_DELETED)
        {
            self.log_error(&p);
        }
        let Some(cqid) = self.sqs[usize::from(p.sqid)].as_ref().map(|sq| sq.cqid) else {
            return;
        };
        let Some(cq) = self.cqs[usize::from(cqid)].as_mut() else {
            return;
        };
        cq.backlog.push_back(p);
        self.flush_cq(cqid);
    }

    /// Posts waiting completions of queue `cqid` while it has room.
    pub(super) fn flush_cq(&mut self, cqid: u16) {
        while self.processing() {
            let Some(cq) = self.cqs[usize::from(cqid)].as_mut() else {
                return;
            };
            if cq.is_full() {
                return;
            }
            let Some(p) = cq.backlog.pop_front() else {
                return;
            };
            let sq = self.sqs[usize::from(p.sqid)].as_mut();
            let cqe = Cqe {
                dw0: p.dw0,
                dw1: 0,
                sq_head: sq.as_ref().map_or(0, |sq| sq.head as u16),
                sq_id: p.sqid,
                cid: p.cid,
                status_phase: p.status.0 << 1 | u16::from(cq.phase ^ p.flip_phase),
            };
            let w = cqe.to_words();
            let mut head = [0u8; 12];
            for (dst, word) in head.chunks_exact_mut(4).zip(&w[..3]) {
                dst.copy_from_slice(&word.to_le_bytes());
            }
            let addr = cq.base.wrapping_add(u64::from(cq.tail) * 16);
            let ok = self.iommu.write(addr, &head).is_ok() && {
                // The host polls the dword holding the phase tag: it must not become visible
                // before the rest of the entry.
                fence(Ordering::Release);
                self.iommu.write_u32(addr.wrapping_add(12), w[3]).is_ok()
            };
            if !ok {
                self.set_fatal("completion queue entry write faulted");
                return;
            }
            cq.tail += 1;
            if cq.tail == cq.size {
                cq.tail = 0;
                cq.phase = !cq.phase;
            }
            if let (Some(cid), Some(sq)) = (p.release, sq) {
                sq.cids.remove(cid);
            }
            self.stats.completions_posted += 1;
            if cq.ien && !self.irq_pending.contains(&cq.iv) {
                self.irq_pending.push(cq.iv);
            }
        }
    }
}
