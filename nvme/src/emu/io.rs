//! NVM command set I/O commands: Read, Write, Flush, Write Zeroes, Dataset Management.

use super::{generic_err, prp, Outcome, State};
use crate::spec::cmd::{nvm, Sqe};
use crate::spec::status::{generic, sct};
use crate::spec::Status;

/// Dataset Management CDW11 bit 2: Attribute – Deallocate.
const DSM_AD: u32 = 1 << 2;
/// Bytes in one Dataset Management range.
const DSM_RANGE_LEN: usize = 16;

fn transfer_error() -> Status {
    Status::new(sct::GENERIC, generic::DATA_TRANSFER_ERROR)
}

impl State {
    pub(super) fn io_command(&mut self, sqe: &Sqe, corrupt: bool) -> Outcome {
        let r = match sqe.opcode() {
            nvm::READ => self.read_write(sqe, false, corrupt),
            nvm::WRITE => self.read_write(sqe, true, false),
            nvm::FLUSH => self.flush(sqe),
            nvm::WRITE_ZEROES => self.write_zeroes(sqe),
            nvm::DATASET_MANAGEMENT => self.dataset_management(sqe),
            _ => Err(generic_err(generic::INVALID_OPCODE)),
        };
        match r {
            Ok(()) => Outcome::ok(0),
            Err(s) => s.into(),
        }
    }

    /// The index of namespace `nsid`, or Invalid Namespace.
    pub(super) fn namespace_index(&self, nsid: u32) -> Result<usize, Status> {
        match nsid.checked_sub(1) {
            Some(i) if (i as usize) < self.namespaces.len() => Ok(i as usize),
            _ => Err(generic_err(generic::INVALID_NAMESPACE)),
        }
    }

    /// Checks `slba..slba + nlb` against namespace `ns` and returns its byte range.
    fn block_range(&self, ns: usize, slba: u64, nlb: u64) -> Result<(usize, usize), Status> {
        let geo = self.cfg.namespaces[ns];
        match slba.checked_add(nlb) {
            Some(end) if end <= geo.blocks => {
                // In range of a namespace held in memory, so the byte offsets fit a usize.
                Ok(((slba << geo.lba_shift) as usize, (nlb << geo.lba_shift) as usize))
            }
            _ => Err(generic_err(generic::LBA_OUT_OF_RANGE)),
        }
    }

    fn read_write(&mut self, sqe: &Sqe, write: bool, corrupt: bool) -> Result<(), Status> {
        let ns = self.namespace_index(sqe.nsid)?;
        let nlb = u64::from(sqe.nlb_z()) + 1;
        let len = (nlb << self.cfg.namespaces[ns].lba_shift) as usize;
        if self.max_transfer().is_some_and(|max| len > max) {
            return Err(generic_err(generic::INVALID_FIELD));
        }
        let (start, len) = self.block_range(ns, sqe.slba(), nlb)?;
        let mut segs = std::mem::take(&mut self.segs);
        let r = prp::segments(&self.iommu, sqe.prp1, sqe.prp2, len, &mut segs)
            .and_then(|()| self.transfer(ns, start, &segs, write, corrupt));
        self.segs = segs;
        r?;
        if write {
            self.health.write_commands += 1;
            self.health.bytes_written += len as u64;
        } else {
            self.health.read_commands += 1;
            self.health.bytes_read += len as u64;
        }
        Ok(())
    }

    /// Moves data between namespace `ns` at byte `start` and the host pieces `segs`.
    fn transfer(
        &mut self,
        ns: usize,
        start: usize,
        segs: &[(u64, usize)],
        write: bool,
        corrupt: bool,
    ) -> Result<(), Status> {
        let data = &mut self.namespaces[ns];
        let mut pos = start;
        for &(iova, n) in segs {
            let blocks = &mut data[pos..pos + n];
            let r = if write {
                self.iommu.read(iova, blocks)
            } else if corrupt {
                let flipped: Vec<u8> = blocks.iter().map(|b| !b).collect();
                self.iommu.write(iova, &flipped)
            } else {
                self.iommu.write(iova, blocks)
            };
            r.map_err(|_| transfer_error())?;
            pos += n;
        }
        Ok(())
    }

    fn flush(&mut self, sqe: &Sqe) -> Result<(), Status> {
        // NSID FFFFFFFFh flushes every namespace; Identify Controller advertises it with a
        // volatile write cache only.
        if sqe.nsid == u32::MAX && self.cfg.vwc {
            return Ok(());
        }
        self.namespace_index(sqe.nsid).map(|_| ())
    }

    fn write_zeroes(&mut self, sqe: &Sqe) -> Result<(), Status> {
        let ns = self.namespace_index(sqe.nsid)?;
        let nlb = u64::from(sqe.nlb_z()) + 1;
        let (start, len) = self.block_range(ns, sqe.slba(), nlb)?;
        self.namespaces[ns][start..start + len].fill(0);
        Ok(())
    }

    fn dataset_management(&mut self, sqe: &Sqe) -> Result<(), Status> {
        let ns = self.namespace_index(sqe.nsid)?;
        let count = (sqe.cdw10 & 0xff) as usize + 1;
        let mut ranges = vec![0u8; count * DSM_RANGE_LEN];
        let mut segs = std::mem::take(&mut self.segs);
        let r = prp::segments(&self.iommu, sqe.prp1, sqe.prp2, ranges.len(), &mut segs);
        let r = r.and_then(|()| {
            let mut pos = 0;
            for &(iova, n) in &segs {
                self.iommu.read(iova, &mut ranges[pos..pos + n]).map_err(|_| transfer_error())?;
                pos += n;
            }
            Ok(())
        });
        self.segs = segs;
        r?;
        if sqe.cdw11 & DSM_AD == 0 {
            // Only hints: nothing to do.
            return Ok(());
        }
        // Check every range before touching any.
        let mut zero = Vec::with_capacity(count);
        for range in ranges.chunks_exact(DSM_RANGE_LEN) {
            let nlb = u64::from(u32::from_le_bytes(range[4..8].try_into().expect("4 bytes")));
            let slba = u64::from_le_bytes(range[8..16].try_into().expect("8 bytes"));
            if nlb != 0 {
                zero.push(self.block_range(ns, slba, nlb)?);
            }
        }
        // Deallocated blocks read as zeroes (Identify Namespace DLFEAT says so).
        for (start, len) in zero {
            self.namespaces[ns][start..start + len].fill(0);
        }
        Ok(())
    }
}
