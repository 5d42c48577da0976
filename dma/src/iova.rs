//! IOVA allocator: hands out device addresses inside the windows the IOMMU accepts.
//!
//! The IOMMU translates only some IOVA ranges: the kernel reports the usable ones (VFIO's
//! `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`), and on x86 it always carves the MSI window
//! `0xfee00000..0xfef00000` out of them because writes there are interrupts, not memory. The
//! allocator keeps a free list sorted by address, takes the first range that fits, and merges a
//! freed range with its neighbours so the space does not fragment over time.
//!
//! Nothing below [`IovaAllocator::MIN_IOVA`] (1 MiB) is ever handed out: IOVA 0 and low addresses
//! are what a zeroed or truncated pointer in a command would name, and such a command must fault
//! in the IOMMU instead of reaching memory we mapped.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;

/// Why a range given back to [`IovaAllocator::free`] was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FreeError {
    /// The range does not match a live allocation (never allocated, freed twice, or freed with
    /// a different length).
    NotAllocated,
    /// The rounded length overflows.
    BadLength,
}

/// First-fit allocator of page-aligned IOVA ranges.
#[derive(Debug, Clone)]
pub struct IovaAllocator {
    /// The usable windows after clipping and page alignment: sorted, disjoint, not adjacent.
    usable: Vec<Range<u64>>,
    /// Free space: sorted by address, disjoint, never adjacent (adjacent ranges are merged), each
    /// inside one usable window.
    free: Vec<Range<u64>>,
    /// Live allocations, start to rounded length, so a bad `free` is caught instead of handing
    /// the same addresses out twice.
    live: BTreeMap<u64, u64>,
}

/// Rounds `len` up to whole pages; a zero length counts as one page. `None` on overflow.
fn round_len(len: u64) -> Option<u64> {
    let len = len.max(1);
    len.checked_add(PAGE - 1).map(|l| l & !(PAGE - 1))
}

impl IovaAllocator {
    /// The lowest IOVA ever handed out (1 MiB).
    pub const MIN_IOVA: u64 = 0x10_0000;

    /// An allocator over `usable`, the IOVA windows the IOMMU accepts (end exclusive, in any
    /// order, overlaps allowed). Each window is clipped to start at [`Self::MIN_IOVA`] or above
    /// and shrunk to whole pages, so no allocation touches an address outside it.
    pub fn new(usable: &[Range<u64>]) -> Self {
        let mut windows: Vec<Range<u64>> = usable
            .iter()
            .filter_map(|r| {
                let start = r.start.max(Self::MIN_IOVA).checked_add(PAGE - 1)? & !(PAGE - 1);
                let end = r.end & !(PAGE - 1);
                (start < end).then_some(start..end)
            })
            .collect();
        windows.sort_by_key(|r| r.start);

        let mut merged: Vec<Range<u64>> = Vec::with_capacity(windows.len());
        for w in windows {
            match merged.last_mut() {
                Some(last) if w.start <= last.end => last.end = last.end.max(w.end),
                _ => merged.push(w),
            }
        }
        IovaAllocator { free: merged.clone(), usable: merged, live: BTreeMap::new() }
    }

    /// The windows allocations come from, after clipping below 1 MiB and page alignment.
    pub fn usable(&self) -> &[Range<u64>] {
        &self.usable
    }

    /// Allocates `len` bytes (rounded up to whole pages) and returns a page-aligned IOVA, or
    /// `None` if no free range is large enough.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        let len = round_len(len)?;
        let idx = self.free.iter().position(|r| r.end - r.start >= len)?;
        let start = self.free[idx].start;
        if self.free[idx].end - start == len {
            self.free.remove(idx);
        } else {
            self.free[idx].start = start + len;
        }
        self.live.insert(start, len);
        Some(start)
    }

    /// Gives back a range returned by [`Self::alloc`] with the same `len`.
    ///
    /// A range that is not a live allocation (freed twice, never allocated, another length) is
    /// refused with a warning and the allocator stays as it was; debug builds also panic, since
    /// it means a bookkeeping bug in the caller.
    pub fn free(&mut self, iova: u64, len: u64) {
        if let Err(e) = self.try_free(iova, len) {
            tracing::warn!(iova, len, error = ?e, "ignoring a bad IOVA free");
            debug_assert!(false, "bad IOVA free of {len:#x} bytes at {iova:#x}: {e:?}");
        }
    }

    /// [`Self::free`] without the logging: reports a bad range instead.
    fn try_free(&mut self, iova: u64, len: u64) -> Result<(), FreeError> {
        let len = round_len(len).ok_or(FreeError::BadLength)?;
        if self.live.get(&iova) != Some(&len) {
            return Err(FreeError::NotAllocated);
        }
        let end = iova.checked_add(len).ok_or(FreeError::BadLength)?;

        // Index of the first free range after the one being returned.
        let idx = self.free.partition_point(|r| r.start < iova);
        // With the live map consistent these cannot overlap; checked anyway so that a broken
        // invariant shows up as a refused free rather than as addresses handed out twice.
        let overlaps_prev = idx > 0 && self.free[idx - 1].end > iova;
        let overlaps_next = idx < self.free.len() && self.free[idx].start < end;
        if overlaps_prev || overlaps_next {
            return Err(FreeError::NotAllocated);
        }
        self.live.remove(&iova);

        let joins_prev = idx > 0 && self.free[idx - 1].end == iova;
        let joins_next = idx < self.free.len() && self.free[idx].start == end;
        match (joins_prev, joins_next) {
            (true, true) => {
                self.free[idx - 1].end = self.free[idx].end;
                self.free.remove(idx);
            }
            (true, false) => self.free[idx - 1].end = end,
            (false, true) => self.free[idx].start = iova,
            (false, false) => self.free.insert(idx, iova..end),
        }
        Ok(())
    }

    /// Bytes not currently allocated.
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(|r| r.end - r.start).sum()
    }

    /// The free list, for tests and diagnostics.
    #[cfg(test)]
    fn free_ranges(&self) -> &[Range<u64>] {
        &self.free
    }
}

/// The parts of `aperture` not covered by any of `reserved` (end exclusive), sorted by address.
///
/// Use it where the IOMMU reports an aperture and a list of holes rather than usable windows.
pub fn usable_from_reserved(aperture: Range<u64>, reserved: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut holes: Vec<Range<u64>> = reserved.iter().filter(|r| r.start < r.end).cloned().collect();
    holes.sort_by_key(|r| r.start);

    let mut out = Vec::new();
    let mut cursor = aperture.start;
    for hole in holes {
        if cursor >= aperture.end {
            break;
        }
        if hole.end <= cursor {
            continue;
        }
        if hole.start > cursor {
            out.push(cursor..hole.start.min(aperture.end));
        }
        cursor = cursor.max(hole.end);
    }
    if cursor < aperture.end {
        out.push(cursor..aperture.end);
    }
    out
}

#[cfg(test)]
// IOVA windows are lists of ranges, and a list of one window is the common case.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    const MSI: Range<u64> = 0xfee0_0000..0xfef0_0000;

    fn x86_space(bits: u32) -> Vec<Range<u64>> {
        usable_from_reserved(0..(1u64 << bits), &[MSI])
    }

    #[test]
    fn never_below_one_mib() {
        let mut a = IovaAllocator::new(&[0..0x20_0000]);
        assert_eq!(a.usable(), &[0x10_0000..0x20_0000]);
        assert_eq!(a.alloc(1), Some(0x10_0000));
        let mut tiny = IovaAllocator::new(&[0..0x10_0000]);
        assert_eq!(tiny.alloc(1), None);
        assert_eq!(tiny.free_bytes(), 0);
    }

    #[test]
    fn lengths_round_to_pages_and_addresses_are_aligned() {
        // A window that starts and ends off page boundaries shrinks to whole pages.
        let mut a = IovaAllocator::new(&[0x10_0123..0x10_5fff]);
        assert_eq!(a.usable(), &[0x10_1000..0x10_5000]);
        assert_eq!(a.alloc(1), Some(0x10_1000));
        assert_eq!(a.alloc(4096), Some(0x10_2000));
        assert_eq!(a.alloc(4097), Some(0x10_3000));
        assert_eq!(a.alloc(1), None);
        assert_eq!(a.free_bytes(), 0);
        for len in [0, 1, 4095, 4096] {
            a.free(0x10_1000, len);
            assert_eq!(a.alloc(len), Some(0x10_1000));
        }
        assert_eq!(a.alloc(u64::MAX), None);
    }

    #[test]
    fn reuse_after_free() {
        let mut a = IovaAllocator::new(&x86_space(39));
        let x = a.alloc(0x1000).unwrap();
        let y = a.alloc(0x1000).unwrap();
        assert_ne!(x, y);
        a.free(x, 0x1000);
        assert_eq!(a.alloc(0x1000), Some(x), "first fit reuses the lowest free range");
    }

    #[test]
    fn coalescing_restores_one_range() {
        let window = 0x10_0000..0x20_0000;
        let mut a = IovaAllocator::new(std::slice::from_ref(&window));
        let total = a.free_bytes();
        let ids: Vec<u64> = (0..8).map(|_| a.alloc(0x2000).unwrap()).collect();
        // Free in an order that exercises joining on the left, on the right and on both sides.
        for &i in &[1, 3, 2, 0, 6, 4, 7, 5] {
            a.free(ids[i], 0x2000);
        }
        assert_eq!(a.free_ranges(), &[window]);
        assert_eq!(a.free_bytes(), total);
        // The whole window can be had again in one piece.
        assert_eq!(a.alloc(total), Some(0x10_0000));
    }

    #[test]
    fn reserved_holes_are_respected() {
        for bits in [39, 48] {
            let usable = x86_space(bits);
            assert_eq!(usable, vec![0..MSI.start, MSI.end..(1u64 << bits)]);
            let mut a = IovaAllocator::new(&usable);
            // Fill everything below the MSI window, then ask for more than what is left there.
            let below = MSI.start - IovaAllocator::MIN_IOVA;
            assert_eq!(a.alloc(below - 0x1000), Some(IovaAllocator::MIN_IOVA));
            let next = a.alloc(0x2000).unwrap();
            assert_eq!(next, MSI.end, "an allocation that does not fit must skip the hole");
            assert_eq!(a.alloc(0x1000), Some(MSI.start - 0x1000), "the page below it still fits");
        }
    }

    #[test]
    fn adjacent_windows_do_not_merge_across_a_hole() {
        let a =
            IovaAllocator::new(&[0x20_0000..0x30_0000, 0x30_0000..0x40_0000, 0x50_0000..0x60_0000]);
        assert_eq!(a.usable(), &[0x20_0000..0x40_0000, 0x50_0000..0x60_0000]);
        let mut a = a;
        assert_eq!(a.alloc(0x20_0000), Some(0x20_0000));
        assert_eq!(a.alloc(0x10_0001), None);
        assert_eq!(a.alloc(0x10_0000), Some(0x50_0000));
    }

    #[test]
    fn exhaustion_returns_none() {
        let mut a = IovaAllocator::new(&[0x10_0000..0x10_4000]);
        for i in 0..4 {
            assert_eq!(a.alloc(0x1000), Some(0x10_0000 + i * 0x1000));
        }
        assert_eq!(a.alloc(0x1000), None);
        assert_eq!(a.free_bytes(), 0);
        a.free(0x10_2000, 0x1000);
        assert_eq!(a.alloc(0x2000), None, "one free page is not two");
        assert_eq!(a.alloc(0x1000), Some(0x10_2000));
        assert_eq!(IovaAllocator::new(&[]).alloc(1), None);
    }

    #[test]
    fn bad_frees_leave_the_allocator_intact() {
        let mut a = IovaAllocator::new(&[0x10_0000..0x20_0000]);
        let x = a.alloc(0x3000).unwrap();
        let before = a.clone();
        // Never allocated, freed with another length, inside an allocation, in free space.
        assert_eq!(a.try_free(0x18_0000, 0x1000), Err(FreeError::NotAllocated));
        assert_eq!(a.try_free(x, 0x1000), Err(FreeError::NotAllocated));
        assert_eq!(a.try_free(x + 0x1000, 0x1000), Err(FreeError::NotAllocated));
        assert_eq!(a.try_free(0, u64::MAX), Err(FreeError::BadLength));
        assert_eq!(a.free_ranges(), before.free_ranges());
        assert_eq!(a.try_free(x, 0x3000), Ok(()));
        // A double free.
        assert_eq!(a.try_free(x, 0x3000), Err(FreeError::NotAllocated));
        assert_eq!(a.free_ranges(), &[0x10_0000..0x20_0000]);
    }

    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "bad IOVA free"))]
    fn bad_free_asserts_in_debug_builds() {
        let mut a = IovaAllocator::new(&[0x10_0000..0x20_0000]);
        a.free(0x10_0000, 0x1000);
        assert_eq!(a.free_bytes(), 0x10_0000);
    }

    #[test]
    fn usable_from_reserved_cases() {
        let ap = 0x1000..0x10000;
        assert_eq!(usable_from_reserved(ap.clone(), &[]), vec![ap.clone()]);
        // Holes out of order, overlapping each other, touching and past the ends, and empty.
        let holes = [0x8000..0x9000, 0x0..0x2000, 0x8800..0xa000, 0xa000..0xb000, 0x5..0x5];
        assert_eq!(usable_from_reserved(ap.clone(), &holes), vec![0x2000..0x8000, 0xb000..0x10000]);
        assert_eq!(usable_from_reserved(ap.clone(), &[0xf000..0x20000]), vec![0x1000..0xf000]);
        assert_eq!(usable_from_reserved(ap.clone(), &[0..u64::MAX]), vec![]);
        assert_eq!(usable_from_reserved(0x10..0x10, &[]), vec![]);
        assert_eq!(usable_from_reserved(ap, &[0x20000..0x30000]), vec![0x1000..0x10000]);
    }

    /// A small xorshift64 generator: reproducible and needs no crate.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn randomized_against_a_model() {
        // A small space with holes, so exhaustion and the holes both come up often.
        let usable = usable_from_reserved(
            0..0x80_0000,
            &[0x20_0000..0x20_3000, 0x40_0000..0x48_0000, 0x7f_f000..0x80_0000],
        );
        for seed in [0x9e37_79b9_7f4a_7c15u64, 1, 0xdead_beef] {
            let mut rng = XorShift(seed);
            let mut a = IovaAllocator::new(&usable);
            let total = a.free_bytes();
            let mut live: Vec<(u64, u64)> = Vec::new();

            for _ in 0..5000 {
                if live.is_empty() || rng.below(100) < 55 {
                    let len = match rng.below(10) {
                        0 => rng.below(0x40_0000) + 1,
                        1..=3 => 0x1000,
                        _ => rng.below(0x20_000) + 1,
                    };
                    let rounded = round_len(len).unwrap();
                    match a.alloc(len) {
                        Some(iova) => {
                            assert_eq!(iova % PAGE, 0);
                            assert!(iova >= IovaAllocator::MIN_IOVA);
                            assert!(
                                usable.iter().any(|w| w.start <= iova && iova + rounded <= w.end),
                                "{iova:#x}+{rounded:#x} leaves the usable windows"
                            );
                            for &(s, l) in &live {
                                assert!(iova + rounded <= s || s + l <= iova, "overlap");
                            }
                            live.push((iova, rounded));
                        }
                        None => {
                            // First fit must find any range that is large enough.
                            assert!(a.free_ranges().iter().all(|r| r.end - r.start < rounded));
                        }
                    }
                } else {
                    let (iova, len) = live.swap_remove(rng.below(live.len() as u64) as usize);
                    a.free(iova, len);
                }
                let used: u64 = live.iter().map(|&(_, l)| l).sum();
                assert_eq!(a.free_bytes() + used, total);
                // The free list stays sorted and coalesced.
                assert!(a.free_ranges().windows(2).all(|w| w[0].end < w[1].start));
            }
            for (iova, len) in live.drain(..) {
                a.free(iova, len);
            }
            assert_eq!(a.free_ranges(), a.usable());
        }
    }
}
