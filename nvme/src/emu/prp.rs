//! Walking a command's PRPs (Base Specification 2.0, §4.1.1) into IOVA segments, strictly.

use nvaio_dma::soft::SoftIommu;

use super::generic_err;
use crate::spec::status::generic;
use crate::spec::Status;

const PAGE: u64 = 4096;
/// PRP entries in a full list page.
const ENTRIES_PER_PAGE: usize = (PAGE / 8) as usize;

fn offset_invalid() -> Status {
    generic_err(generic::PRP_OFFSET_INVALID)
}

fn transfer_error() -> Status {
    Status::new(crate::spec::status::sct::GENERIC, generic::DATA_TRANSFER_ERROR)
}

/// Fills `out` with the `(iova, len)` pieces a transfer of `len` bytes described by `prp1` and
/// `prp2` covers, in order. Each piece lies inside one 4 KiB page.
///
/// Errors: PRP Offset Invalid when PRP1 is not dword aligned, when PRP2 names a second page at
/// a non-zero offset, when a PRP list pointer is not qword aligned, when a list entry or a
/// chained list pointer is not page aligned; Data Transfer Error when a PRP list cannot be read
/// through the IOMMU.
pub(super) fn segments(
    iommu: &SoftIommu,
    prp1: u64,
    prp2: u64,
    len: usize,
    out: &mut Vec<(u64, usize)>,
) -> Result<(), Status> {
    out.clear();
    if len == 0 {
        return Ok(());
    }
    if prp1 & 3 != 0 {
        return Err(offset_invalid());
    }
    let first = len.min((PAGE - prp1 % PAGE) as usize);
    out.push((prp1, first));
    let mut left = len - first;
    if left == 0 {
        // PRP2 is reserved and ignored.
        return Ok(());
    }
    if left <= PAGE as usize {
        // PRP2 is the second (and last) page.
        if prp2 & (PAGE - 1) != 0 {
            return Err(offset_invalid());
        }
        out.push((prp2, left));
        return Ok(());
    }

    // PRP2 points to a PRP list, possibly at an offset into its page. Entries are qwords: a
    // list that starts at an offset that is not a multiple of 8 would straddle its page.
    if prp2 & 7 != 0 {
        return Err(offset_invalid());
    }
    let mut list = prp2;
    let mut entries = [0u8; PAGE as usize];
    loop {
        let needed = left.div_ceil(PAGE as usize);
        let slots = ((PAGE - list % PAGE) / 8) as usize;
        // With more entries needed than slots in this page, the last slot chains onward.
        let chains = needed > slots;
        let count = if chains { slots } else { needed };
        let bytes = &mut entries[..count * 8];
        iommu.read(list, bytes).map_err(|_| transfer_error())?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(e.try_into().expect("8-byte chunk"));
            if entry & (PAGE - 1) != 0 {
                return Err(offset_invalid());
            }
            if chains && i == count - 1 {
                list = entry;
            } else {
                let n = left.min(PAGE as usize);
                out.push((entry, n));
                left -= n;
            }
        }
        if left == 0 {
            return Ok(());
        }
        debug_assert!(chains && count <= ENTRIES_PER_PAGE);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use nvaio_dma::DmaRegion;

    use super::*;

    fn code(r: Result<(), Status>) -> (u8, u8) {
        r.expect_err("expected an error").code()
    }

    #[test]
    fn shapes() {
        let mmu = Arc::new(SoftIommu::new());
        let lists = DmaRegion::alloc(mmu.clone(), 2 * PAGE as usize).unwrap();
        let mut out = Vec::new();
        let p = |n: u64| 0x4000_0000 + n * PAGE;

        // Within PRP1's page: PRP2 ignored even if garbage.
        segments(&mmu, p(0) + 8, 0xdead, 100, &mut out).unwrap();
        assert_eq!(out, vec![(p(0) + 8, 100)]);
        // Exactly one more page.
        segments(&mmu, p(0) + 0x800, p(7), 4096, &mut out).unwrap();
        assert_eq!(out, vec![(p(0) + 0x800, 0x800), (p(7), 0x800)]);
        assert_eq!(code(segments(&mmu, p(0) + 0x800, p(7) + 8, 4096, &mut out)), (0, 0x13));
        assert_eq!(code(segments(&mmu, p(0) + 2, p(7), 16, &mut out)), (0, 0x13));

        // A list at the end of a page that chains: 0xff0 leaves room for two entries, one data
        // entry and one pointer to the next list page.
        let l = lists.iova();
        lists.write_u64(0xff0, p(1));
        lists.write_u64(0xff8, l + PAGE);
        lists.write_u64(0x1000, p(2));
        lists.write_u64(0x1008, p(3));
        segments(&mmu, p(0), l + 0xff0, 4 * 4096 - 10, &mut out).unwrap();
        assert_eq!(out, vec![(p(0), 4096), (p(1), 4096), (p(2), 4096), (p(3), 4086)]);
        // Exactly the slots available: no chaining, the last slot is data.
        lists.write_u64(0xff8, p(9));
        segments(&mmu, p(0), l + 0xff0, 3 * 4096, &mut out).unwrap();
        assert_eq!(out, vec![(p(0), 4096), (p(1), 4096), (p(9), 4096)]);

        // Misaligned list pointer, list entry, chain pointer.
        assert_eq!(code(segments(&mmu, p(0), l + 0xff4, 3 * 4096, &mut out)), (0, 0x13));
        lists.write_u64(0xff8, p(9) + 0x200);
        assert_eq!(code(segments(&mmu, p(0), l + 0xff0, 3 * 4096, &mut out)), (0, 0x13));
        lists.write_u64(0xff8, l + PAGE + 8);
        assert_eq!(code(segments(&mmu, p(0), l + 0xff0, 4 * 4096, &mut out)), (0, 0x13));
        // A list the IOMMU does not map.
        assert_eq!(code(segments(&mmu, p(0), 0x1000, 3 * 4096, &mut out)), (0, 0x04));
        assert_eq!(mmu.faults(), 1);
    }
}
