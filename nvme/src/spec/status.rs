//! Completion status (Base Specification 2.0, §4.6.1, figures 92-96).

/// The 15-bit status field of a CQE, without the phase tag. Unknown codes stay representable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Status(pub u16);

/// Status Code Type values.
pub mod sct {
    pub const GENERIC: u8 = 0;
    pub const COMMAND_SPECIFIC: u8 = 1;
    pub const MEDIA: u8 = 2;
    pub const PATH: u8 = 3;
    pub const VENDOR: u8 = 7;
}

/// Generic command status codes (figure 94).
pub mod generic {
    pub const SUCCESS: u8 = 0x00;
    pub const INVALID_OPCODE: u8 = 0x01;
    pub const INVALID_FIELD: u8 = 0x02;
    pub const CID_CONFLICT: u8 = 0x03;
    pub const DATA_TRANSFER_ERROR: u8 = 0x04;
    pub const POWER_LOSS_ABORT: u8 = 0x05;
    pub const INTERNAL_ERROR: u8 = 0x06;
    pub const ABORT_REQUESTED: u8 = 0x07;
    pub const SQ_DELETED: u8 = 0x08;
    pub const INVALID_NAMESPACE: u8 = 0x0b;
    pub const COMMAND_SEQUENCE_ERROR: u8 = 0x0c;
    pub const PRP_OFFSET_INVALID: u8 = 0x13;
    pub const NS_NOT_READY: u8 = 0x82;
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;
    pub const CAPACITY_EXCEEDED: u8 = 0x81;
}

/// Command specific status codes used by nvaio (figure 95).
pub mod command_specific {
    pub const COMPLETION_QUEUE_INVALID: u8 = 0x00;
    pub const INVALID_QUEUE_ID: u8 = 0x01;
    pub const INVALID_QUEUE_SIZE: u8 = 0x02;
    pub const ABORT_LIMIT_EXCEEDED: u8 = 0x03;
    pub const ASYNC_EVENT_LIMIT_EXCEEDED: u8 = 0x05;
    pub const INVALID_INTERRUPT_VECTOR: u8 = 0x08;
    pub const INVALID_LOG_PAGE: u8 = 0x09;
    pub const INVALID_QUEUE_DELETION: u8 = 0x0c;
    pub const FEATURE_NOT_SAVEABLE: u8 = 0x0d;
    pub const ATTEMPTED_WRITE_TO_READ_ONLY: u8 = 0x82;
}

/// Media and data integrity errors (figure 96).
pub mod media {
    pub const WRITE_FAULT: u8 = 0x80;
    pub const UNRECOVERED_READ_ERROR: u8 = 0x81;
    pub const ACCESS_DENIED: u8 = 0x86;
}

impl Status {
    pub const SUCCESS: Status = Status(0);

    /// Builds a status from its type and code (DNR and More clear).
    pub const fn new(sct: u8, sc: u8) -> Status {
        Status(((sct as u16 & 7) << 8) | sc as u16)
    }

    /// Status Code.
    pub fn sc(self) -> u8 {
        self.0 as u8
    }
    /// Status Code Type.
    pub fn sct(self) -> u8 {
        (self.0 >> 8 & 7) as u8
    }
    /// Command Retry Delay index.
    pub fn crd(self) -> u8 {
        (self.0 >> 11 & 3) as u8
    }
    /// More: further information in the Error Information log page.
    pub fn more(self) -> bool {
        self.0 >> 13 & 1 == 1
    }
    /// Do Not Retry: the same command would fail again.
    pub fn dnr(self) -> bool {
        self.0 >> 14 & 1 == 1
    }
    pub fn with_dnr(self) -> Status {
        Status(self.0 | 1 << 14)
    }
    pub fn is_success(self) -> bool {
        self.sct() == sct::GENERIC && self.sc() == generic::SUCCESS
    }
    /// Type and code only, for comparisons that must ignore DNR, More and CRD.
    pub fn code(self) -> (u8, u8) {
        (self.sct(), self.sc())
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.code() {
            (sct::GENERIC, generic::SUCCESS) => "success",
            (sct::GENERIC, generic::INVALID_OPCODE) => "invalid opcode",
            (sct::GENERIC, generic::INVALID_FIELD) => "invalid field in command",
            (sct::GENERIC, generic::CID_CONFLICT) => "command ID conflict",
            (sct::GENERIC, generic::DATA_TRANSFER_ERROR) => "data transfer error",
            (sct::GENERIC, generic::INTERNAL_ERROR) => "internal error",
            (sct::GENERIC, generic::ABORT_REQUESTED) => "aborted as requested",
            (sct::GENERIC, generic::SQ_DELETED) => "aborted by queue deletion",
            (sct::GENERIC, generic::INVALID_NAMESPACE) => "invalid namespace or format",
            (sct::GENERIC, generic::PRP_OFFSET_INVALID) => "PRP offset invalid",
            (sct::GENERIC, generic::LBA_OUT_OF_RANGE) => "LBA out of range",
            (sct::GENERIC, generic::CAPACITY_EXCEEDED) => "capacity exceeded",
            (sct::GENERIC, generic::NS_NOT_READY) => "namespace not ready",
            (sct::COMMAND_SPECIFIC, command_specific::INVALID_QUEUE_ID) => "invalid queue ID",
            (sct::COMMAND_SPECIFIC, command_specific::INVALID_QUEUE_SIZE) => "invalid queue size",
            (sct::COMMAND_SPECIFIC, command_specific::ABORT_LIMIT_EXCEEDED) => {
                "abort limit exceeded"
            }
            (sct::COMMAND_SPECIFIC, command_specific::ATTEMPTED_WRITE_TO_READ_ONLY) => {
                "write to read-only range"
            }
            (sct::MEDIA, media::WRITE_FAULT) => "write fault",
            (sct::MEDIA, media::UNRECOVERED_READ_ERROR) => "unrecovered read error",
            (sct::MEDIA, media::ACCESS_DENIED) => "access denied",
            _ => "",
        };
        if name.is_empty() {
            write!(f, "status SCT {:#x} SC {:#04x}", self.sct(), self.sc())
        } else {
            write!(f, "{name} (SCT {:#x} SC {:#04x})", self.sct(), self.sc())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields() {
        // SCT 2 (media), SC 0x81, DNR set: the unrecovered read error QEMU reports for blkdebug.
        let s = Status(0x4281);
        assert_eq!(s.sct(), sct::MEDIA);
        assert_eq!(s.sc(), media::UNRECOVERED_READ_ERROR);
        assert!(s.dnr());
        assert!(!s.more());
        assert!(!s.is_success());
        assert_eq!(Status::new(sct::MEDIA, 0x81).with_dnr(), s);
        assert!(Status::SUCCESS.is_success());
        assert_eq!(Status(0x1800).crd(), 3);
        assert!(s.to_string().starts_with("unrecovered read error"));
        assert_eq!(Status::new(5, 0x42).to_string(), "status SCT 0x5 SC 0x42");
    }
}
