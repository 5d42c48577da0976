//! Fault injection: rules that make the emulated controller misbehave on purpose.
//!
//! A driver must survive a misbehaving device by failing the affected I/O, never the process.
//! Each [`FaultRule`] picks commands (by queue, opcode, namespace, LBA range) and says what the
//! controller does to them instead of its normal work ([`FaultAction`]).

use std::ops::Range;

use super::queue::Pending;
use super::{Held, State};
use crate::spec::cmd::{nvm, Sqe};
use crate::spec::Status;

/// What a matching command suffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Complete at once with this status, without executing the command (for example a media
    /// error: `Status::new(sct::MEDIA, media::UNRECOVERED_READ_ERROR).with_dnr()`).
    Fail(Status),
    /// Keep the command outstanding, unexecuted, until
    /// [`release_held`](super::EmulatedController::release_held) executes and completes it, an
    /// Abort takes it (Abort Requested), its submission queue is deleted (SQ Deleted), or the
    /// controller is reset (it then never completes).
    Hold,
    /// Lose the command: it is never executed nor completed, and an Abort does not find it.
    Drop,
    /// Execute the command but complete it under this bogus CID; the real CID never completes.
    WrongCid(u16),
    /// Execute the command and post its completion twice.
    Duplicate,
    /// Execute the command; a Read returns its data with every byte inverted.
    CorruptData,
    /// Set CSTS.CFS and stop processing until a reset; the command never completes.
    Fatal,
    /// Surprise removal: from now on registers read all ones and nothing is processed.
    Vanish,
    /// Execute the command and post its completion with the wrong phase tag, so the host
    /// cannot see it (and the queue looks stuck at that entry).
    WrongPhase,
}

/// Which commands a fault applies to, and how often. Criteria left `None` match everything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRule {
    /// Queue ID: 0 for admin commands.
    pub qid: Option<u16>,
    pub opcode: Option<u8>,
    pub nsid: Option<u32>,
    /// Matches NVM Read, Write and Write Zeroes commands whose block range overlaps this one;
    /// no other command matches a rule that sets it.
    pub lbas: Option<Range<u64>>,
    /// How many more times the rule fires; `None` for always.
    pub count: Option<u32>,
    pub action: FaultAction,
}

impl FaultRule {
    /// A rule that applies `action` to every command, forever.
    pub fn new(action: FaultAction) -> Self {
        FaultRule { qid: None, opcode: None, nsid: None, lbas: None, count: None, action }
    }

    /// Only commands submitted to queue `qid` (0: admin).
    pub fn qid(self, qid: u16) -> Self {
        FaultRule { qid: Some(qid), ..self }
    }

    /// Only commands with this opcode.
    pub fn opcode(self, opcode: u8) -> Self {
        FaultRule { opcode: Some(opcode), ..self }
    }

    /// Only commands for this namespace.
    pub fn nsid(self, nsid: u32) -> Self {
        FaultRule { nsid: Some(nsid), ..self }
    }

    /// Only reads, writes and write-zeroes touching a block in `lbas`.
    pub fn lbas(self, lbas: Range<u64>) -> Self {
        FaultRule { lbas: Some(lbas), ..self }
    }

    /// Fires `n` times, then never again.
    pub fn times(self, n: u32) -> Self {
        FaultRule { count: Some(n), ..self }
    }

    fn matches(&self, sqid: u16, sqe: &Sqe) -> bool {
        if self.count == Some(0)
            || self.qid.is_some_and(|q| q != sqid)
            || self.opcode.is_some_and(|o| o != sqe.opcode())
            || self.nsid.is_some_and(|n| n != sqe.nsid)
        {
            return false;
        }
        match &self.lbas {
            None => true,
            Some(r) => {
                let has_lbas = matches!(sqe.opcode(), nvm::READ | nvm::WRITE | nvm::WRITE_ZEROES);
                let start = sqe.slba();
                let end = start.saturating_add(u64::from(sqe.nlb_z()) + 1);
                sqid != 0 && has_lbas && start < r.end && r.start < end
            }
        }
    }
}

impl State {
    /// The action of the first rule matching the command, consuming one firing of it.
    pub(super) fn match_fault(&mut self, sqid: u16, sqe: &Sqe) -> Option<FaultAction> {
        if self.rules.is_empty() {
            return None;
        }
        let rule = self.rules.iter_mut().find(|r| r.matches(sqid, sqe))?;
        if let Some(n) = rule.count.as_mut() {
            *n -= 1;
        }
        Some(rule.action)
    }

    /// Does to a fetched command (CID already recorded as outstanding) what `action` says.
    pub(super) fn apply_fault(&mut self, action: FaultAction, sqid: u16, sqe: Sqe) {
        let cid = sqe.cid();
        // The execution-based faults below only alter what a completion looks like, so a
        // command that stays outstanding (an Asynchronous Event Request) is left alone.
        let run = |st: &mut State, corrupt| match st.execute(sqid, &sqe, corrupt) {
            super::Outcome::Done(status, dw0) => {
                Some(Pending::new(sqid, cid, status, dw0).about(&sqe))
            }
            super::Outcome::Deferred => None,
        };
        match action {
            FaultAction::Fail(status) => {
                self.complete(Pending::new(sqid, cid, status, 0).about(&sqe));
            }
            FaultAction::Hold => self.held.push(Held { sqid, sqe }),
            FaultAction::Drop => self.forget_cid(sqid, cid),
            FaultAction::WrongCid(bogus) => {
                if let Some(p) = run(self, false) {
                    self.forget_cid(sqid, cid);
                    self.complete(Pending { cid: bogus, ..p }.keep_cid());
                }
            }
            FaultAction::Duplicate => {
                if let Some(p) = run(self, false) {
                    self.complete(p);
                    self.complete(p.keep_cid());
                }
            }
            FaultAction::CorruptData => {
                if let Some(p) = run(self, true) {
                    self.complete(p);
                }
            }
            FaultAction::Fatal => self.set_fatal("injected fatal fault"),
            FaultAction::Vanish => self.vanished = true,
            FaultAction::WrongPhase => {
                if let Some(p) = run(self, false) {
                    self.complete(Pending { flip_phase: true, ..p });
                }
            }
        }
    }

    /// The controller no longer knows the command: its CID is free again.
    fn forget_cid(&mut self, sqid: u16, cid: u16) {
        if let Some(sq) = self.sqs[usize::from(sqid)].as_mut() {
            sq.cids.remove(cid);
        }
    }
}
