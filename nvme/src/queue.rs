//! A submission/completion queue pair (Base Specification 2.0, §3.3 and §4.1).
//!
//! One owner drives a queue pair through `&mut self`: it is never shared between threads, so
//! the per-command path takes no lock. The owner builds SQEs, [`QueuePair::submit`]s them (this
//! writes the entry but rings nothing), then [`QueuePair::ring`]s the SQ tail doorbell once for
//! the whole batch. [`QueuePair::poll`] reaps completions and writes the CQ head doorbell once.
//!
//! Command identifiers carry a slot index and a generation: a stale or invented CID from the
//! device is recognised and dropped (and counted) instead of completing the wrong command.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use nvaio_dma::{DmaError, DmaRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::spec::regs::doorbell_offset;
use crate::spec::{Cqe, Sqe};
use crate::Device;

/// Size of one SQE and one CQE in bytes.
pub const SQE_SIZE: usize = 64;
pub const CQE_SIZE: usize = 16;

/// The most entries nvaio puts in one queue: 12 bits of the CID address a slot, 4 count
/// generations.
pub const MAX_QUEUE_ENTRIES: u16 = 4096;
const SLOT_BITS: u32 = 12;
const SLOT_MASK: u16 = (1 << SLOT_BITS) - 1;

/// One reaped completion.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    /// The slot [`QueuePair::submit`] returned for the command.
    pub slot: u16,
    pub cqe: Cqe,
}

/// Counters of device misbehaviour seen on this queue pair. Never reset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub submitted: u64,
    pub completed: u64,
    pub sq_doorbells: u64,
    pub cq_doorbells: u64,
    /// Completions naming a CID that is not outstanding (stale, duplicated or invented).
    pub bogus_cids: u64,
    /// Completions whose SQ ID is not this queue's.
    pub wrong_sq_id: u64,
}

/// A queue pair: `entries` SQEs and `entries` CQEs in DMA memory, plus the doorbells.
pub struct QueuePair {
    dev: Arc<dyn Device>,
    qid: u16,
    entries: u16,
    sq: DmaRegion,
    cq: DmaRegion,
    sq_doorbell: usize,
    cq_doorbell: usize,
    sq_tail: u16,
    /// The tail value last written to the doorbell, so `ring` writes only when it moved.
    rung_tail: u16,
    cq_head: u16,
    /// The phase value that marks a new CQE; flips each time the head wraps.
    phase: bool,
    /// Free slots, used as a stack (LIFO keeps the hot slots' state in cache).
    free: Vec<u16>,
    /// Per slot: generation (bits 15:12 of the CID) and whether it is outstanding.
    generation: Vec<u8>,
    busy: Vec<bool>,
    stats: QueueStats,
    /// The MSI-X vector the completion queue raises, if it was created with interrupts.
    pub(crate) vector: Option<u16>,
    /// Set when the controller owns this queue pair and must delete it on drop.
    pub(crate) owner: Option<Arc<crate::Controller>>,
}

impl QueuePair {
    /// Allocates the rings for queue `qid` with `entries` entries (2..=4096).
    ///
    /// The caller creates the queues on the controller (Create I/O CQ/SQ, or AQA/ASQ/ACQ for the
    /// admin pair) with [`QueuePair::sq_iova`] and [`QueuePair::cq_iova`].
    pub fn new(
        dev: Arc<dyn Device>,
        qid: u16,
        entries: u16,
        dstrd: u8,
    ) -> Result<QueuePair, DmaError> {
        let entries = entries.clamp(2, MAX_QUEUE_ENTRIES);
        let mapper = dev.dma_mapper();
        let sq = DmaRegion::alloc(mapper.clone(), usize::from(entries) * SQE_SIZE)?;
        let cq = DmaRegion::alloc(mapper, usize::from(entries) * CQE_SIZE)?;
        // At most entries - 1 commands are outstanding: a full queue has tail + 1 == head, and
        // bounding CIDs by that keeps both the SQ and the CQ from ever overflowing.
        let slots = entries - 1;
        Ok(QueuePair {
            sq_doorbell: doorbell_offset(qid, false, dstrd),
            cq_doorbell: doorbell_offset(qid, true, dstrd),
            dev,
            qid,
            entries,
            sq,
            cq,
            sq_tail: 0,
            rung_tail: 0,
            cq_head: 0,
            phase: true,
            free: (0..slots).rev().collect(),
            generation: vec![0; usize::from(slots)],
            busy: vec![false; usize::from(slots)],
            stats: QueueStats::default(),
            vector: None,
            owner: None,
        })
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// The MSI-X vector the completion queue raises; `None` for a polled queue.
    pub fn vector(&self) -> Option<u16> {
        self.vector
    }

    /// Number of entries in each ring.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    pub fn sq_iova(&self) -> u64 {
        self.sq.iova()
    }

    pub fn cq_iova(&self) -> u64 {
        self.cq.iova()
    }

    /// How many more commands can be submitted before some complete.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Commands submitted and not yet completed (including ones the device never answers).
    pub fn outstanding(&self) -> usize {
        self.generation.len() - self.free.len()
    }

    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// The slot the next [`QueuePair::submit`] will use, so a caller can prepare its own
    /// per-command state under that index first. `None` when every slot is outstanding.
    #[inline]
    pub fn next_slot(&self) -> Option<u16> {
        self.free.last().copied()
    }

    /// Writes `sqe` into the next SQ entry with a fresh CID and returns its slot, or `None` when
    /// every slot is outstanding. Nothing reaches the device until [`QueuePair::ring`].
    #[inline]
    pub fn submit(&mut self, sqe: &mut Sqe) -> Option<u16> {
        let slot = self.free.pop()?;
        let s = usize::from(slot);
        self.busy[s] = true;
        let cid = u16::from(self.generation[s]) << SLOT_BITS | slot;
        sqe.set_cid(cid);
        let base = usize::from(self.sq_tail) * SQE_SIZE;
        for (i, w) in sqe.to_words().into_iter().enumerate() {
            self.sq.write_u32(base + 4 * i, w);
        }
        self.sq_tail = if self.sq_tail + 1 == self.entries { 0 } else { self.sq_tail + 1 };
        self.stats.submitted += 1;
        Some(slot)
    }

    /// Tells the device about every entry submitted since the last ring: one doorbell write per
    /// batch, none when nothing was submitted.
    #[inline]
    pub fn ring(&mut self) {
        if self.sq_tail == self.rung_tail {
            return;
        }
        // The SQEs must be visible in memory before the device learns of them through the
        // doorbell; this orders the entry stores before the MMIO store.
        fence(Ordering::Release);
        self.dev.write32(self.sq_doorbell, u32::from(self.sq_tail));
        self.rung_tail = self.sq_tail;
        self.stats.sq_doorbells += 1;
    }

    /// Reaps up to `max` new completions, calling `f` for each, then writes the CQ head
    /// doorbell once. Returns how many were reaped (bogus entries included, since they too
    /// consume CQ space).
    #[inline]
    pub fn poll(&mut self, max: usize, mut f: impl FnMut(Completion)) -> usize {
        let mut reaped = 0;
        while reaped < max {
            let base = usize::from(self.cq_head) * CQE_SIZE;
            let dw3 = self.cq.read_u32(base + 12);
            if (dw3 >> 16 & 1 == 1) != self.phase {
                break;
            }
            // The phase bit says the entry is complete; the rest of it must not be read before
            // the phase word (the device writes the entry, then the phase, in one 16-byte write
            // that the CPU may observe in pieces only if we let loads pass each other).
            fence(Ordering::Acquire);
            let cqe = Cqe::from_words([
                self.cq.read_u32(base),
                self.cq.read_u32(base + 4),
                self.cq.read_u32(base + 8),
                dw3,
            ]);
            self.cq_head += 1;
            if self.cq_head == self.entries {
                self.cq_head = 0;
                self.phase = !self.phase;
            }
            reaped += 1;
            if cqe.sq_id != self.qid {
                self.stats.wrong_sq_id += 1;
                continue;
            }
            match self.release(cqe.cid) {
                Some(slot) => {
                    self.stats.completed += 1;
                    f(Completion { slot, cqe });
                }
                None => {
                    self.stats.bogus_cids += 1;
                    tracing::debug!(qid = self.qid, cid = cqe.cid, "completion for unknown CID");
                }
            }
        }
        if reaped > 0 {
            self.dev.write32(self.cq_doorbell, u32::from(self.cq_head));
            self.stats.cq_doorbells += 1;
        }
        reaped
    }

    /// Whether a new completion is waiting, without consuming it.
    pub fn has_completion(&self) -> bool {
        let dw3 = self.cq.read_u32(usize::from(self.cq_head) * CQE_SIZE + 12);
        (dw3 >> 16 & 1 == 1) == self.phase
    }

    /// The CID the device was given for an outstanding slot (for Abort).
    pub fn cid_of(&self, slot: u16) -> Option<u16> {
        let s = usize::from(slot);
        (s < self.busy.len() && self.busy[s])
            .then(|| u16::from(self.generation[s]) << SLOT_BITS | slot)
    }

    /// Turns a device-reported CID back into an outstanding slot, freeing it.
    fn release(&mut self, cid: u16) -> Option<u16> {
        let slot = cid & SLOT_MASK;
        let s = usize::from(slot);
        if s >= self.busy.len()
            || !self.busy[s]
            || u16::from(self.generation[s]) != cid >> SLOT_BITS
        {
            return None;
        }
        self.busy[s] = false;
        self.generation[s] = (self.generation[s] + 1) & 0xf;
        self.free.push(slot);
        Some(slot)
    }

    /// Forgets every outstanding command, as after a controller reset (the device has dropped
    /// them), and rewinds the rings to their initial state.
    pub fn reset_state(&mut self) {
        for s in 0..self.busy.len() {
            if self.busy[s] {
                self.busy[s] = false;
                self.generation[s] = (self.generation[s] + 1) & 0xf;
                self.free.push(s as u16);
            }
        }
        self.sq_tail = 0;
        self.rung_tail = 0;
        self.cq_head = 0;
        self.phase = true;
        self.cq.zero(0, self.cq.len());
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        if let Some(ctrl) = self.owner.take() {
            ctrl.delete_queue_pair(self.qid);
        }
    }
}

/// The wake-up side of an interrupt-driven queue pair (see
/// [`Controller::create_queue_pair_irq`](crate::Controller::create_queue_pair_irq)).
///
/// A non-blocking eventfd that becomes readable after the queue's completion queue raised its
/// MSI-X vector. It is either a duplicate of the vector's own eventfd (the queue has the vector
/// to itself) or a private eventfd that the vector's relay thread signals (the vector is shared,
/// and every queue on it is woken). Either way it only says "look at the completion queue":
/// it may fire with nothing new there (a shared vector, a completion already reaped), and the
/// counter tells nothing about how many completions arrived.
///
/// The owner of the queue pair waits on [`Notifier::fd`] (epoll, poll) and, before polling the
/// completion queue, calls [`Notifier::drain`]: a completion that lands after the drain leaves
/// the fd readable, so the next wait returns at once instead of missing it.
pub struct Notifier {
    fd: EventFd,
    vector: u16,
    relayed: bool,
}

impl Notifier {
    pub(crate) fn new(fd: EventFd, vector: u16, relayed: bool) -> Self {
        Notifier { fd, vector, relayed }
    }

    /// The eventfd to wait on for readability. It stays open while the `Notifier` lives.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Resets the eventfd with one non-blocking read and returns the count it held (0 when
    /// nothing had fired). Never blocks.
    pub fn drain(&self) -> u64 {
        match self.fd.read() {
            Ok(n) => n,
            // EAGAIN: nothing fired. Any other error cannot happen on an eventfd we created;
            // reporting "nothing" makes the caller poll its queue and wait again, which is safe.
            Err(e) => {
                if e.kind() != io::ErrorKind::WouldBlock {
                    tracing::debug!(error = %e, "reading a queue notifier failed");
                }
                0
            }
        }
    }

    /// Signals the notifier by hand, as an interrupt would (for tests, or to wake a waiter).
    pub fn notify(&self) -> io::Result<()> {
        self.fd.write(1)
    }

    /// The MSI-X vector behind this notifier.
    pub fn vector(&self) -> u16 {
        self.vector
    }

    /// Whether the vector is shared and a relay thread forwards its interrupts here (one
    /// thread hop more than a vector of its own).
    pub fn is_relayed(&self) -> bool {
        self.relayed
    }
}

impl AsRawFd for Notifier {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("fd", &self.fd.as_raw_fd())
            .field("vector", &self.vector)
            .field("relayed", &self.relayed)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cid_encoding() {
        assert_eq!(SLOT_MASK, 0x0fff);
        let cid = 5u16 << SLOT_BITS | 17;
        assert_eq!(cid & SLOT_MASK, 17);
        assert_eq!(cid >> SLOT_BITS, 5);
    }

    #[test]
    fn notifier_counts_and_drains() {
        let n = Notifier::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), 3, true);
        assert_eq!(n.drain(), 0, "nothing fired yet, and drain must not block");
        n.notify().unwrap();
        n.notify().unwrap();
        assert_eq!(n.drain(), 2);
        assert_eq!(n.drain(), 0);
        assert_eq!(n.vector(), 3);
        assert!(n.is_relayed());
    }
}
