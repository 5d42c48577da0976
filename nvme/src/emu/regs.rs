//! Register reads and writes: CAP, VS, CC, CSTS, AQA, ASQ, ACQ and the doorbells.

use super::queue::{Cq, Sq};
use super::State;
use crate::spec::regs::{offset, Cc, SHN_NONE, SHST_COMPLETE, SHST_NORMAL, SHST_OCCURRING};

/// NVMe 1.4.0: what the emulated subset corresponds to in VS terms.
const VERSION: u32 = 0x0001_0400;

impl State {
    fn cap(&self) -> u64 {
        let c = &self.cfg;
        // MQES, CQR (bit 16), TO (31:24), DSTRD (35:32), CSS bit 37 (NVM command set);
        // MPSMIN and MPSMAX stay 0 (4 KiB).
        u64::from(c.mqes_z)
            | 1 << 16
            | u64::from(c.cap_to) << 24
            | u64::from(c.dstrd) << 32
            | 1 << 37
    }

    /// Whether `off..off + 4` is a register access the BAR answers.
    fn check_access(&mut self, off: usize, bar_len: usize) -> bool {
        let ok = off & 3 == 0 && off.checked_add(4).is_some_and(|end| end <= bar_len);
        if !ok {
            self.stats.bad_register_accesses += 1;
        }
        ok
    }

    pub(super) fn read_reg(&mut self, off: usize, bar_len: usize) -> u32 {
        if !self.check_access(off, bar_len) {
            return 0;
        }
        match off {
            offset::CAP => self.cap() as u32,
            o if o == offset::CAP + 4 => (self.cap() >> 32) as u32,
            offset::VS => VERSION,
            offset::CC => self.cc,
            offset::CSTS => {
                let v = self.csts_value();
                self.rdy.on_read();
                self.shst.on_read();
                v
            }
            offset::AQA => self.aqa,
            offset::ASQ => self.asq as u32,
            o if o == offset::ASQ + 4 => (self.asq >> 32) as u32,
            offset::ACQ => self.acq as u32,
            o if o == offset::ACQ + 4 => (self.acq >> 32) as u32,
            // INTMS, INTMC, NSSR, the optional registers and the doorbells read as 0.
            _ => 0,
        }
    }

    pub(super) fn write_reg(&mut self, off: usize, value: u32, bar_len: usize) {
        if !self.check_access(off, bar_len) {
            return;
        }
        if off >= offset::DOORBELLS {
            self.write_doorbell(off - offset::DOORBELLS, value);
            return;
        }
        let admin_regs = off == offset::AQA || (offset::ASQ..offset::ACQ + 8).contains(&off);
        if admin_regs && Cc(self.cc).en() {
            // The admin queue registers may change only while the controller is disabled.
            self.stats.bad_register_accesses += 1;
            return;
        }
        match off {
            offset::CC => self.write_cc(value),
            offset::AQA => self.aqa = value,
            offset::ASQ => self.asq = self.asq & !0xffff_ffff | u64::from(value),
            o if o == offset::ASQ + 4 => {
                self.asq = self.asq & 0xffff_ffff | u64::from(value) << 32;
            }
            offset::ACQ => self.acq = self.acq & !0xffff_ffff | u64::from(value),
            o if o == offset::ACQ + 4 => {
                self.acq = self.acq & 0xffff_ffff | u64::from(value) << 32;
            }
            // INTMS and INTMC only matter for pin-based and MSI interrupts; NSSR is not
            // supported (CAP.NSSRS = 0); everything else is read-only or reserved.
            _ => {}
        }
    }

    fn write_cc(&mut self, value: u32) {
        let old = Cc(self.cc);
        let new = Cc(value);
        self.cc = value;
        let delay = self.cfg.ready_delay_reads;

        if old.en() && !new.en() {
            self.reset();
            self.rdy.set(false, delay);
        } else if !old.en() && new.en() {
            self.shut_down = false;
            match self.enable() {
                Ok(()) => self.rdy.set(true, delay),
                Err(why) => self.set_fatal(why),
            }
        }

        if old.shn() == SHN_NONE && new.shn() != SHN_NONE {
            // Normal and abrupt shutdown look the same here: nothing is in flight, since every
            // command completes inside the doorbell write that submitted it.
            self.shut_down = true;
            if delay > 0 {
                self.shst.set(SHST_OCCURRING, 0);
            }
            self.shst.set(SHST_COMPLETE, delay);
        } else if new.shn() == SHN_NONE && old.shn() != SHN_NONE {
            self.shst.set(SHST_NORMAL, 0);
        }
    }

    /// CC.EN 0 → 1: checks the configuration and creates the admin queue pair.
    fn enable(&mut self) -> Result<(), &'static str> {
        let cc = Cc(self.cc);
        let asqs_z = self.aqa & 0xfff;
        let acqs_z = self.aqa >> 16 & 0xfff;
        if asqs_z == 0 || acqs_z == 0 {
            return Err("admin queues need at least two entries");
        }
        if self.asq & 0xfff != 0 || self.acq & 0xfff != 0 {
            return Err("admin queue base not page aligned");
        }
        if cc.mps() != 0 {
            return Err("memory page size other than 4 KiB");
        }
        if cc.0 >> 4 & 7 != 0 || cc.0 >> 11 & 7 != 0 {
            return Err("command set or arbitration mechanism not supported");
        }
        if cc.iosqes() != 6 || cc.iocqes() != 4 {
            return Err("I/O queue entry sizes must be 64 and 16 bytes");
        }
        let mut cq = Cq::new(self.acq, acqs_z + 1, true, 0);
        cq.sqs = 1;
        self.cqs[0] = Some(cq);
        self.sqs[0] = Some(Sq::new(self.asq, asqs_z + 1, 0));
        self.enabled = true;
        Ok(())
    }

    /// A write to the doorbell at byte `rel` past the first doorbell.
    fn write_doorbell(&mut self, rel: usize, value: u32) {
        let stride = 4usize << self.cfg.dstrd;
        if rel & (stride - 1) != 0 {
            // Between doorbells when the stride is wider than 4 bytes: reserved.
            self.stats.bad_register_accesses += 1;
            return;
        }
        let index = rel / stride;
        let qid = index / 2;
        let completion = index % 2 == 1;
        if !self.processing() {
            self.stats.ignored_doorbells += 1;
            return;
        }
        // `qid` is within the queue tables: the BAR ends after the last doorbell.
        let (counts, exists) = if completion {
            (&mut self.stats.cq_doorbells, self.cqs[qid].is_some())
        } else {
            (&mut self.stats.sq_doorbells, self.sqs[qid].is_some())
        };
        if !exists {
            self.set_fatal("doorbell write to a queue that does not exist");
            return;
        }
        counts[qid] += 1;
        let qid = qid as u16;
        if completion {
            self.ring_cq(qid, value);
        } else {
            self.ring_sq(qid, value);
        }
    }

    fn ring_sq(&mut self, qid: u16, tail: u32) {
        let Some(sq) = self.sqs[usize::from(qid)].as_mut() else {
            return;
        };
        if tail >= sq.size {
            self.set_fatal("submission queue tail beyond the queue size");
            return;
        }
        sq.tail = tail;
        self.process_sq(qid);
    }

    fn ring_cq(&mut self, qid: u16, head: u32) {
        let Some(cq) = self.cqs[usize::from(qid)].as_mut() else {
            return;
        };
        if head >= cq.size {
            self.set_fatal("completion queue head beyond the queue size");
            return;
        }
        let consumed = (head + cq.size - cq.head) % cq.size;
        if consumed > cq.used() {
            self.set_fatal("completion queue head passes entries not yet posted");
            return;
        }
        cq.head = head;
        self.flush_cq(qid);
    }
}
