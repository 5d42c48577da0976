//! Admin commands: Identify, Get Log Page, Set/Get Features, queue management, Abort and
//! Asynchronous Event Request.

use super::queue::{Cq, Pending, Sq};
use super::{generic_err, prp, specific_err, Outcome, State};
use crate::spec::cmd::{admin, cns, feature, log_page, Sqe};
use crate::spec::identify::{IdentifyController, IdentifyNamespace, LbaFormat, IDENTIFY_LEN};
use crate::spec::status::{command_specific as cs, generic, sct};
use crate::spec::Status;

/// Error Information log entries kept (Identify Controller ELPE + 1); 64 of 64 bytes fill the
/// 4 KiB a Get Log Page may return.
const ERROR_LOG_ENTRIES: usize = 64;
/// The most a Get Log Page returns.
const MAX_LOG_LEN: usize = 4096;
/// SMART / Health Information is 512 bytes.
const SMART_LEN: usize = 512;

/// One Error Information log entry (Base Specification 2.0, §5.16.1.2).
#[derive(Clone, Copy, Debug)]
pub(super) struct ErrorEntry {
    count: u64,
    sqid: u16,
    cid: u16,
    status: Status,
    nsid: u32,
    lba: u64,
}

impl ErrorEntry {
    fn encode(&self, b: &mut [u8]) {
        b[0..8].copy_from_slice(&self.count.to_le_bytes());
        b[8..10].copy_from_slice(&self.sqid.to_le_bytes());
        b[10..12].copy_from_slice(&self.cid.to_le_bytes());
        // Status field: status in bits 15:1, the phase tag (bit 0) is not recorded.
        b[12..14].copy_from_slice(&(self.status.0 << 1).to_le_bytes());
        // Parameter Error Location: not reported.
        b[14..16].copy_from_slice(&0xffffu16.to_le_bytes());
        b[16..24].copy_from_slice(&self.lba.to_le_bytes());
        b[24..28].copy_from_slice(&self.nsid.to_le_bytes());
    }
}

/// Writes `v` as a 128-bit little-endian counter of the SMART log.
fn put_u128(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 16].copy_from_slice(&u128::from(v).to_le_bytes());
}

impl State {
    pub(super) fn log_error(&mut self, p: &Pending) {
        self.error_count += 1;
        let entry = ErrorEntry {
            count: self.error_count,
            sqid: p.sqid,
            cid: p.cid,
            status: p.status,
            nsid: p.nsid,
            lba: p.lba,
        };
        if self.error_log.len() == ERROR_LOG_ENTRIES {
            self.error_log.pop_back();
        }
        self.error_log.push_front(entry);
    }

    /// The largest data transfer of one command, or `None` when MDTS sets no limit.
    pub(super) fn max_transfer(&self) -> Option<usize> {
        // Beyond 2^40 pages the limit is academic: treat it as none rather than overflow.
        match self.cfg.mdts {
            0 | 40.. => None,
            m => Some(4096usize << m),
        }
    }

    pub(super) fn admin_command(&mut self, sqe: &Sqe) -> Outcome {
        let r = match sqe.opcode() {
            admin::IDENTIFY => self.identify(sqe),
            admin::GET_LOG_PAGE => self.get_log_page(sqe),
            admin::SET_FEATURES => self.set_features(sqe),
            admin::GET_FEATURES => self.get_features(sqe),
            admin::CREATE_IO_CQ => self.create_cq(sqe),
            admin::CREATE_IO_SQ => self.create_sq(sqe),
            admin::DELETE_IO_CQ => self.delete_cq(sqe),
            admin::DELETE_IO_SQ => self.delete_sq(sqe),
            admin::ABORT => self.abort(sqe),
            admin::ASYNC_EVENT_REQUEST => return self.async_event_request(sqe),
            _ => Err(generic_err(generic::INVALID_OPCODE)),
        };
        match r {
            Ok(dw0) => Outcome::ok(dw0),
            Err(s) => s.into(),
        }
    }

    /// Copies `data` to the host buffer the command's PRPs describe.
    fn dma_out(&mut self, sqe: &Sqe, data: &[u8]) -> Result<(), Status> {
        if self.max_transfer().is_some_and(|max| data.len() > max) {
            return Err(generic_err(generic::INVALID_FIELD));
        }
        let mut segs = std::mem::take(&mut self.segs);
        let r = prp::segments(&self.iommu, sqe.prp1, sqe.prp2, data.len(), &mut segs);
        let r = r.and_then(|()| {
            let mut pos = 0;
            for &(iova, n) in &segs {
                self.iommu
                    .write(iova, &data[pos..pos + n])
                    .map_err(|_| Status::new(sct::GENERIC, generic::DATA_TRANSFER_ERROR))?;
                pos += n;
            }
            Ok(())
        });
        self.segs = segs;
        r
    }

    fn identify(&mut self, sqe: &Sqe) -> Result<u32, Status> {
        let mut page = [0u8; IDENTIFY_LEN];
        match sqe.cdw10 & 0xff {
            cns::NAMESPACE => {
                let ns = self.namespace_index(sqe.nsid)?;
                let geo = self.cfg.namespaces[ns];
                IdentifyNamespace {
                    nsze: geo.blocks,
                    ncap: geo.blocks,
                    nuse: geo.blocks,
                    nsfeat: 0,
                    nlbaf_z: 0,
                    flbas: 0,
                    noiob: 0,
                    lbaf: vec![LbaFormat { ms: 0, lbads: geo.lba_shift, rp: 0 }],
                }
                .encode(&mut page);
                // DLFEAT: deallocated blocks read as zeroes (bits 2:0 = 001b), and Write
                // Zeroes may deallocate (bit 3).
                page[33] = 0x09;
            }
            cns::CONTROLLER => {
                let c = &self.cfg;
                IdentifyController {
                    vid: 0,
                    ssvid: 0,
                    serial: c.serial.clone(),
                    model: c.model.clone(),
                    firmware: c.firmware.clone(),
                    mdts: c.mdts,
                    cntlid: 0,
                    ver: 0x0001_0400,
                    oacs: 0,
                    acl_z: c.acl_z,
                    aerl_z: c.aerl_z,
                    sqes: 0x66,
                    cqes: 0x44,
                    nn: c.namespaces.len() as u32,
                    // Dataset Management (bit 2) and Write Zeroes (bit 3).
                    oncs: 0x000c,
                    // Present, and Flush accepts NSID FFFFFFFFh (bits 2:1 = 11b).
                    vwc: if c.vwc { 0x07 } else { 0 },
                    subnqn: format!("nqn.2024-01.io.nvaio:emulated:{}", c.serial),
                }
                .encode(&mut page);
                // CNTRLTYPE: I/O controller.
                page[111] = 1;
                // ELPE, zero-based.
                page[262] = (ERROR_LOG_ENTRIES - 1) as u8;
            }
            cns::ACTIVE_NAMESPACES => {
                if sqe.nsid >= 0xffff_fffe {
                    return Err(generic_err(generic::INVALID_NAMESPACE));
                }
                let active = (1..=self.namespaces.len() as u32).filter(|&n| n > sqe.nsid);
                for (slot, nsid) in page.chunks_exact_mut(4).zip(active) {
                    slot.copy_from_slice(&nsid.to_le_bytes());
                }
            }
            _ => return Err(generic_err(generic::INVALID_FIELD)),
        }
        self.dma_out(sqe, &page)?;
        Ok(0)
    }

    fn get_log_page(&mut self, sqe: &Sqe) -> Result<u32, Status> {
        let lid = sqe.cdw10 as u8;
        let numd = u64::from(sqe.cdw10 >> 16) | u64::from(sqe.cdw11 & 0xffff) << 16;
        let len = (numd + 1) * 4;
        let offset = u64::from(sqe.cdw12) | u64::from(sqe.cdw13) << 32;
        if len > MAX_LOG_LEN as u64 || offset % 4 != 0 {
            return Err(generic_err(generic::INVALID_FIELD));
        }
        let mut page = vec![0u8; MAX_LOG_LEN];
        let page_len = match lid {
            log_page::ERROR_INFORMATION => {
                for (b, e) in page.chunks_exact_mut(64).zip(&self.error_log) {
                    e.encode(b);
                }
                ERROR_LOG_ENTRIES * 64
            }
            log_page::SMART_HEALTH => {
                // Controller-wide only (LPA bit 0 clear).
                if sqe.nsid != 0 && sqe.nsid != u32::MAX {
                    return Err(generic_err(generic::INVALID_FIELD));
                }
                self.smart(&mut page[..SMART_LEN]);
                SMART_LEN
            }
            _ => return Err(specific_err(cs::INVALID_LOG_PAGE)),
        };
        if offset >= page_len as u64 {
            return Err(generic_err(generic::INVALID_FIELD));
        }
        let offset = offset as usize;
        let len = len as usize;
        let mut data = vec![0u8; len];
        let n = len.min(page_len - offset);
        data[..n].copy_from_slice(&page[offset..offset + n]);
        self.dma_out(sqe, &data)?;
        Ok(0)
    }

    /// SMART / Health Information (§5.16.1.3), with the counters the emulator keeps.
    fn smart(&self, b: &mut [u8]) {
        // Composite temperature 313 K (40 °C), spare 100 % above a 10 % threshold.
        b[1..3].copy_from_slice(&313u16.to_le_bytes());
        b[3] = 100;
        b[4] = 10;
        // Data units are thousands of 512-byte units, rounded up.
        let units = |bytes: u64| bytes.div_ceil(512).div_ceil(1000);
        put_u128(b, 32, units(self.health.bytes_read));
        put_u128(b, 48, units(self.health.bytes_written));
        put_u128(b, 64, self.health.read_commands);
        put_u128(b, 80, self.health.write_commands);
        put_u128(b, 112, 1);
        put_u128(b, 176, self.error_count);
    }

    fn set_features(&mut self, sqe: &Sqe) -> Result<u32, Status> {
        if sqe.cdw10 >> 31 == 1 {
            return Err(specific_err(cs::FEATURE_NOT_SAVEABLE));
        }
        match sqe.cdw10 & 0xff {
            feature::NUMBER_OF_QUEUES => {
                let nsqr_z = sqe.cdw11 & 0xffff;
                let ncqr_z = sqe.cdw11 >> 16;
                if nsqr_z == 0xffff || ncqr_z == 0xffff {
                    return Err(generic_err(generic::INVALID_FIELD));
                }
                // Every I/O submission queue needs an I/O completion queue: checking CQs suffices.
                if self.cqs[1..].iter().any(Option::is_some) {
                    return Err(generic_err(generic::COMMAND_SEQUENCE_ERROR));
                }
                let max = u32::from(self.cfg.max_ioqpairs);
                self.granted = ((nsqr_z + 1).min(max) as u16, (ncqr_z + 1).min(max) as u16);
                Ok(self.queues_dw0())
            }
            feature::INTERRUPT_COALESCING => {
                self.features.coalescing = sqe.cdw11 & 0xffff;
                Ok(0)
            }
            feature::ASYNC_EVENT_CONFIG => {
                self.features.async_event_config = sqe.cdw11;
                Ok(0)
            }
            feature::VOLATILE_WRITE_CACHE if self.cfg.vwc => {
                self.features.write_cache = sqe.cdw11 & 1 == 1;
                Ok(0)
            }
            _ => Err(generic_err(generic::INVALID_FIELD)),
        }
    }

    /// Number of Queues DW0: allocated submission (15:0) and completion (31:16) queues,
    /// zero-based.
    fn queues_dw0(&self) -> u32 {
        u32::from(self.granted.0 - 1) | u32::from(self.granted.1 - 1) << 16
    }

    fn get_features(&mut self, sqe: &Sqe) -> Result<u32, Status> {
        let fid = sqe.cdw10 & 0xff;
        let known = matches!(
            fid,
            feature::NUMBER_OF_QUEUES | feature::INTERRUPT_COALESCING | feature::ASYNC_EVENT_CONFIG
        ) || (fid == feature::VOLATILE_WRITE_CACHE && self.cfg.vwc);
        if !known {
            return Err(generic_err(generic::INVALID_FIELD));
        }
        let max = self.cfg.max_ioqpairs;
        match sqe.cdw10 >> 8 & 7 {
            // Current.
            0 => Ok(match fid {
                feature::NUMBER_OF_QUEUES => self.queues_dw0(),
                feature::INTERRUPT_COALESCING => self.features.coalescing,
                feature::ASYNC_EVENT_CONFIG => self.features.async_event_config,
                _ => u32::from(self.features.write_cache),
            }),
            // Default, and saved (nothing is ever saved, so the default).
            1 | 2 => Ok(match fid {
                feature::NUMBER_OF_QUEUES => u32::from(max - 1) | u32::from(max - 1) << 16,
                feature::VOLATILE_WRITE_CACHE => u32::from(self.cfg.vwc),
                _ => 0,
            }),
            // Supported capabilities: changeable (bit 2), neither saveable nor per-namespace.
            3 => Ok(1 << 2),
            _ => Err(generic_err(generic::INVALID_FIELD)),
        }
    }

    /// Checks a queue size (CDW10 bits 31:16, zero-based) against CAP.MQES.
    fn queue_size(&self, sqe: &Sqe) -> Result<u32, Status> {
        let qsize_z = sqe.cdw10 >> 16;
        if qsize_z == 0 || qsize_z > u32::from(self.cfg.mqes_z) {
            return Err(specific_err(cs::INVALID_QUEUE_SIZE));
        }
        Ok(qsize_z + 1)
    }

    /// Checks the contiguous queue base in PRP1: physically contiguous (CDW11 bit 0) and page
    /// aligned.
    fn queue_base(sqe: &Sqe) -> Result<u64, Status> {
        if sqe.cdw11 & 1 == 0 {
            // CAP.CQR is set: only physically contiguous queues.
            return Err(generic_err(generic::INVALID_FIELD));
        }
        if sqe.prp1 & 0xfff != 0 {
            return Err(generic_err(generic::PRP_OFFSET_INVALID));
        }
        Ok(sqe.prp1)
    }

    fn create_cq(&mut self, sqe: &Sqe) -> Result<u32, Status> {
        let qid = (sqe.cdw10 & 0xffff) as u16;
        if qid == 0 || qid > self.granted.1 || self.cqs[usize::from(qid)].is_some() {
            return Err(specific_err(cs::INVALID_QUEUE_ID));
        }
        let size = self.queue_size(sqe)?;
        let ien = sqe.cdw11 >> 1 & 1 == 1;
        let iv = (sqe.cdw11 >> 16) as u16;
        let vectors = self.cfg.msix_vectors.max(1);
        if ien && u32::from(iv) >= vectors {
            return Err(specific_err(cs::INVALID_INTERRUPT_VECTOR));
        }
        let base = Self::queue_base(sqe)?;
        self.cqs[usize::from(qid)] = Some(Cq::new(base, size, ien, iv));
        Ok(0)
    }

    fn create_sq(&mut self, sqe: &Sqe) -> Result<u32, Status> {
        let qid = (sqe.cdw10 & 0xffff) as u16;
        if qid == 0 || qid > self.granted.0 || self.sqs[usize::from(qid)].is_some() {
            return Err(specific_err(cs::INVALID_QUEUE_ID));
        }
        let cqid = (sqe.cdw11 >> 16) as u16;
        let cq_exists = cqid != 0 && self.cqs.get(usize::from(cqid)).is_some_and(Option::is_some);
        if !cq_exists {
            return Err(specific_err(cs::COMPLETION_QUEUE_INVALID));
        }
        let size = self.queue_size(sqe)?;
        let base = Self::queue_base(sqe)?;
        self.sqs[usize::from(qid)] = Some(Sq::new(base, size, cqid));
        if let Some(cq) = self.cqs[usize::from(cqid)].as_mut() {
            cq.sqs += 1;
        }
        Ok(0)
    }

    fn delete_sq(&mut self, sqe: &Sqe) -> Result<u32, Status> {
        let qid = (sqe.cdw10 & 0xffff) as u16;
        if qid == 0 || !matches!(self.sqs.get(usize::from(qid)), Some(Some(_))) {
            return Err(specific_err(cs::INVALID_QUEUE_ID));
        }
        // Commands still held in the queue complete as aborted by the deletion.
        let (gone, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.held).into_iter().partition(|h| h.sqid == qid);
        self.held = kept;
        for h in gone {
            let status = Status::new(sct::GENERIC, generic::SQ_DELETED);
            self.complete(Pending::new(qid, h.sqe.cid(), status, 0).about(&h.sqe));
        }
        if let Some(sq) = self.sqs[usize::from(qid)].take() {
            if let Some(cq) = self.cqs[usize::from(sq.cqid)].as_mut() {
                cq.sqs -= 1;
            }
        }
        Ok(0)
    }

    fn delete_cq(&mut self, sqe: &Sqe) -> Result<u32, Status> {
        let qid = (sqe.cdw10 & 0xffff) as u16;
        let cq = match self.cqs.get(usize::from(qid)) {
            Some(Some(cq)) if qid != 0 => cq,
            _ => return Err(specific_err(cs::INVALID_QUEUE_ID)),
        };
        if cq.sqs > 0 {
            return Err(specific_err(cs::INVALID_QUEUE_DELETION));
        }
        self.cqs[usize::from(qid)] = None;
        Ok(0)
    }

    /// Abort (§5.1): DW0 bit 0 is 0 if the command was aborted, 1 if not.
    fn abort(&mut self, sqe: &Sqe) -> Result<u32, Status> {
        let sqid = (sqe.cdw10 & 0xffff) as u16;
        let cid = (sqe.cdw10 >> 16) as u16;
        let outstanding =
            self.held.iter().filter(|h| h.sqid == 0 && h.sqe.opcode() == admin::ABORT).count();
        if outstanding > usize::from(self.cfg.acl_z) {
            return Err(specific_err(cs::ABORT_LIMIT_EXCEEDED));
        }
        if self.cfg.decline_aborts {
            return Ok(1);
        }
        let Some(i) = self.held.iter().position(|h| h.sqid == sqid && h.sqe.cid() == cid) else {
            return Ok(1);
        };
        let h = self.held.remove(i);
        let status = Status::new(sct::GENERIC, generic::ABORT_REQUESTED);
        self.complete(Pending::new(sqid, cid, status, 0).about(&h.sqe));
        Ok(0)
    }

    fn async_event_request(&mut self, sqe: &Sqe) -> Outcome {
        if self.aers.len() > usize::from(self.cfg.aerl_z) {
            return specific_err(cs::ASYNC_EVENT_LIMIT_EXCEEDED).into();
        }
        match self.events.pop_front() {
            Some(dw0) => Outcome::ok(dw0),
            None => {
                self.aers.push_back(sqe.cid());
                Outcome::Deferred
            }
        }
    }
}
