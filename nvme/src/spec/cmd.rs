//! Submission and completion queue entries (Base Specification 2.0, §4.2 and §4.6) and opcodes.

/// A 64-byte Submission Queue Entry (figure 88). Built in ordinary memory, then copied into the
/// submission queue word by word with [`Sqe::to_words`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sqe {
    /// Opcode (bits 7:0), fused operation (9:8), PRP-or-SGL (15:14), command identifier (31:16).
    pub cdw0: u32,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    /// Metadata pointer.
    pub mptr: u64,
    /// Data pointer: PRP entry 1.
    pub prp1: u64,
    /// Data pointer: PRP entry 2, or the address of a PRP list.
    pub prp2: u64,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
}

const _: () = assert!(std::mem::size_of::<Sqe>() == 64);

impl Sqe {
    /// An entry with the given opcode and namespace, everything else zero.
    pub fn new(opcode: u8, nsid: u32) -> Self {
        Sqe { cdw0: u32::from(opcode), nsid, ..Default::default() }
    }

    pub fn opcode(&self) -> u8 {
        self.cdw0 as u8
    }

    pub fn cid(&self) -> u16 {
        (self.cdw0 >> 16) as u16
    }

    pub fn set_cid(&mut self, cid: u16) {
        self.cdw0 = self.cdw0 & 0xffff | u32::from(cid) << 16;
    }

    /// PSDT (bits 15:14 of CDW0): 0 means PRPs, which is all nvaio uses.
    pub fn psdt(&self) -> u8 {
        (self.cdw0 >> 14 & 3) as u8
    }

    /// The entry as sixteen little-endian dwords, in queue order.
    pub fn to_words(&self) -> [u32; 16] {
        [
            self.cdw0,
            self.nsid,
            self.cdw2,
            self.cdw3,
            self.mptr as u32,
            (self.mptr >> 32) as u32,
            self.prp1 as u32,
            (self.prp1 >> 32) as u32,
            self.prp2 as u32,
            (self.prp2 >> 32) as u32,
            self.cdw10,
            self.cdw11,
            self.cdw12,
            self.cdw13,
            self.cdw14,
            self.cdw15,
        ]
    }

    /// The inverse of [`Sqe::to_words`]; the emulated controller uses it to fetch commands.
    pub fn from_words(w: [u32; 16]) -> Self {
        Sqe {
            cdw0: w[0],
            nsid: w[1],
            cdw2: w[2],
            cdw3: w[3],
            mptr: u64::from(w[4]) | u64::from(w[5]) << 32,
            prp1: u64::from(w[6]) | u64::from(w[7]) << 32,
            prp2: u64::from(w[8]) | u64::from(w[9]) << 32,
            cdw10: w[10],
            cdw11: w[11],
            cdw12: w[12],
            cdw13: w[13],
            cdw14: w[14],
            cdw15: w[15],
        }
    }

    /// Starting LBA of an NVM read/write/compare (CDW10-11).
    pub fn slba(&self) -> u64 {
        u64::from(self.cdw10) | u64::from(self.cdw11) << 32
    }

    /// Number of logical blocks of an NVM read/write, zero-based (CDW12 bits 15:0).
    pub fn nlb_z(&self) -> u16 {
        self.cdw12 as u16
    }
}

/// A 16-byte Completion Queue Entry (figure 89).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cqe {
    /// Command specific (DW0).
    pub dw0: u32,
    pub dw1: u32,
    /// Where the controller's SQ head stood when it posted this entry.
    pub sq_head: u16,
    pub sq_id: u16,
    pub cid: u16,
    /// Phase tag (bit 0) and status field (bits 15:1).
    pub status_phase: u16,
}

const _: () = assert!(std::mem::size_of::<Cqe>() == 16);

impl Cqe {
    pub fn from_words(w: [u32; 4]) -> Self {
        Cqe {
            dw0: w[0],
            dw1: w[1],
            sq_head: w[2] as u16,
            sq_id: (w[2] >> 16) as u16,
            cid: w[3] as u16,
            status_phase: (w[3] >> 16) as u16,
        }
    }

    pub fn to_words(&self) -> [u32; 4] {
        [
            self.dw0,
            self.dw1,
            u32::from(self.sq_head) | u32::from(self.sq_id) << 16,
            u32::from(self.cid) | u32::from(self.status_phase) << 16,
        ]
    }

    pub fn phase(&self) -> bool {
        self.status_phase & 1 == 1
    }

    pub fn status(&self) -> super::Status {
        super::Status(self.status_phase >> 1)
    }
}

/// Admin command opcodes (figure 138). An open set: any byte is representable.
pub mod admin {
    pub const DELETE_IO_SQ: u8 = 0x00;
    pub const CREATE_IO_SQ: u8 = 0x01;
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const DELETE_IO_CQ: u8 = 0x04;
    pub const CREATE_IO_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0c;
}

/// NVM command set I/O opcodes (NVM Command Set Specification 1.0, figure 18).
pub mod nvm {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Identify CNS values (figure 273).
pub mod cns {
    pub const NAMESPACE: u32 = 0x00;
    pub const CONTROLLER: u32 = 0x01;
    pub const ACTIVE_NAMESPACES: u32 = 0x02;
}

/// Feature identifiers (figure 317).
pub mod feature {
    pub const VOLATILE_WRITE_CACHE: u32 = 0x06;
    pub const NUMBER_OF_QUEUES: u32 = 0x07;
    pub const INTERRUPT_COALESCING: u32 = 0x08;
    pub const ASYNC_EVENT_CONFIG: u32 = 0x0b;
}

/// Log page identifiers (Base Specification 2.0, §5.16).
pub mod log_page {
    pub const ERROR_INFORMATION: u8 = 0x01;
    pub const SMART_HEALTH: u8 = 0x02;
}

/// CDW12 bit 30 of a read or write: Force Unit Access.
pub const RW_FUA: u32 = 1 << 30;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqe_layout() {
        let mut sqe = Sqe::new(nvm::READ, 1);
        sqe.set_cid(0xbeef);
        sqe.prp1 = 0x1122_3344_5566_7788;
        sqe.prp2 = 0x99aa_bbcc_ddee_ff00;
        sqe.cdw10 = 10;
        sqe.cdw11 = 11;
        sqe.cdw12 = 7;
        let w = sqe.to_words();
        assert_eq!(w[0], 0xbeef_0002);
        assert_eq!(w[1], 1);
        assert_eq!(w[6], 0x5566_7788);
        assert_eq!(w[7], 0x1122_3344);
        assert_eq!(w[8], 0xddee_ff00);
        assert_eq!(w[9], 0x99aa_bbcc);
        assert_eq!(w[10], 10);
        assert_eq!(w[12], 7);
        assert_eq!(Sqe::from_words(w), sqe);
        assert_eq!(sqe.cid(), 0xbeef);
        assert_eq!(sqe.opcode(), nvm::READ);
        assert_eq!(sqe.slba(), 11 << 32 | 10);
        assert_eq!(sqe.nlb_z(), 7);
        // Field offsets per figure 88: PRP1 at byte 24, CDW10 at byte 40.
        assert_eq!(std::mem::offset_of!(Sqe, mptr), 16);
        assert_eq!(std::mem::offset_of!(Sqe, prp1), 24);
        assert_eq!(std::mem::offset_of!(Sqe, prp2), 32);
        assert_eq!(std::mem::offset_of!(Sqe, cdw10), 40);
        assert_eq!(std::mem::offset_of!(Sqe, cdw15), 60);
    }

    #[test]
    fn cqe_layout() {
        let w = [0xdead_beef, 0, 0x0003_0010, 0x0005_1234];
        let cqe = Cqe::from_words(w);
        assert_eq!(cqe.dw0, 0xdead_beef);
        assert_eq!(cqe.sq_head, 0x10);
        assert_eq!(cqe.sq_id, 3);
        assert_eq!(cqe.cid, 0x1234);
        assert!(cqe.phase());
        assert_eq!(cqe.status().0, 2);
        assert_eq!(cqe.to_words(), w);
        assert_eq!(std::mem::offset_of!(Cqe, sq_head), 8);
        assert_eq!(std::mem::offset_of!(Cqe, cid), 12);
        assert_eq!(std::mem::offset_of!(Cqe, status_phase), 14);
    }
}
