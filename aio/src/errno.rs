//! The one place NVMe completion status becomes an errno, as an application sees it in
//! `io_event.res`. The mapping follows what Linux reports for the same status through its block
//! layer (nvme_error_status() then blk_status_to_errno()), so code written against the kernel
//! sees the same values.

use nvaio_nvme::spec::status::{command_specific, generic, media, sct};
use nvaio_nvme::spec::Status;

/// The errno (positive) for a failed NVMe status.
pub fn status_to_errno(status: Status) -> i32 {
    match status.code() {
        (sct::GENERIC, generic::SUCCESS) => 0,
        // BLK_STS_NOTSUPP: the command or one of its fields is not supported.
        (sct::GENERIC, generic::INVALID_OPCODE) | (sct::GENERIC, generic::INVALID_FIELD) => {
            libc::EOPNOTSUPP
        }
        // BLK_STS_TARGET: addressed outside the namespace or a missing namespace.
        (sct::GENERIC, generic::LBA_OUT_OF_RANGE)
        | (sct::GENERIC, generic::INVALID_NAMESPACE)
        | (sct::GENERIC, generic::CAPACITY_EXCEEDED) => libc::EREMOTEIO,
        // BLK_STS_MEDIUM: the data could not be read or written.
        (sct::MEDIA, media::UNRECOVERED_READ_ERROR) | (sct::MEDIA, media::WRITE_FAULT) => {
            libc::ENODATA
        }
        // BLK_STS_PROTECTION.
        (sct::MEDIA, 0x82..=0x84) => libc::EILSEQ,
        // BLK_STS_NEXUS (reservation conflict).
        (sct::GENERIC, 0x83) => libc::EBADE,
        (sct::COMMAND_SPECIFIC, command_specific::ATTEMPTED_WRITE_TO_READ_ONLY) => libc::EROFS,
        (sct::MEDIA, media::ACCESS_DENIED) => libc::EACCES,
        // Aborted commands: the caller asked for it (io_cancel) or the queue went away.
        (sct::GENERIC, generic::ABORT_REQUESTED) | (sct::GENERIC, generic::SQ_DELETED) => {
            libc::ECANCELED
        }
        _ => libc::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping() {
        assert_eq!(status_to_errno(Status::SUCCESS), 0);
        assert_eq!(status_to_errno(Status::new(sct::MEDIA, 0x81).with_dnr()), libc::ENODATA);
        assert_eq!(status_to_errno(Status::new(sct::GENERIC, 0x80)), libc::EREMOTEIO);
        assert_eq!(status_to_errno(Status::new(sct::GENERIC, 0x02)), libc::EOPNOTSUPP);
        assert_eq!(status_to_errno(Status::new(sct::GENERIC, 0x07)), libc::ECANCELED);
        assert_eq!(status_to_errno(Status::new(sct::GENERIC, 0x06)), libc::EIO);
        assert_eq!(status_to_errno(Status::new(sct::VENDOR, 0x12)), libc::EIO);
    }
}
