//! A software IOMMU: the [`DmaMapper`] of the in-process emulated controller.
//!
//! VFIO hands memory to the hardware IOMMU; [`SoftIommu`] keeps the translation table itself and
//! gives the emulated device safe [`SoftIommu::read`] and [`SoftIommu::write`] calls that go
//! through it. Every access is translated and bounds-checked the way an IOMMU would: the whole
//! range must lie inside one live mapping, otherwise the access is refused, counted, and reported
//! as a [`Fault`]. An emulated device therefore cannot touch memory the driver did not map, or
//! memory the driver has already unmapped, which is exactly the class of bug it exists to catch.
//!
//! IOVAs come from an [`IovaAllocator`] over `1 MiB..256 TiB`, so IOVA 0 and other small values a
//! zeroed or truncated pointer would name are never valid.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};

use crate::iova::IovaAllocator;
use crate::region::{volatile_copy, DmaError, DmaMapper};

/// The top of the IOVA space handed out (48 bits, what x86 IOMMUs translate).
const IOVA_END: u64 = 1 << 48;

/// An access the IOMMU refused: the range is not inside one live mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("IOMMU fault: {len} bytes at IOVA {iova:#x} are not inside one mapping")]
pub struct Fault {
    /// The first IOVA of the refused access.
    pub iova: u64,
    /// Its length in bytes.
    pub len: usize,
}

/// One live mapping: `len` bytes of host memory at `vaddr`.
#[derive(Clone, Copy, Debug)]
struct Mapping {
    /// Host address, kept as an integer so the table is `Send + Sync` without ceremony; it is
    /// turned back into a pointer only to copy, under the table's read lock.
    vaddr: usize,
    len: usize,
}

/// A software IOMMU: a table from IOVA to host memory, consulted on every device access.
pub struct SoftIommu {
    /// Live mappings keyed by their first IOVA. Disjoint, since the allocator never hands out
    /// the same IOVA twice. Readers copy while holding the read lock, so `unmap` (a writer)
    /// cannot return while a copy from the mapping is in flight.
    table: RwLock<BTreeMap<u64, Mapping>>,
    iova: Mutex<IovaAllocator>,
    faults: AtomicU64,
}

impl Default for SoftIommu {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for SoftIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftIommu")
            .field("mappings", &self.mappings())
            .field("faults", &self.faults())
            .finish()
    }
}

impl SoftIommu {
    /// An IOMMU with no mappings.
    pub fn new() -> Self {
        SoftIommu {
            table: RwLock::new(BTreeMap::new()),
            iova: Mutex::new(IovaAllocator::new(std::slice::from_ref(
                &(IovaAllocator::MIN_IOVA..IOVA_END),
            ))),
            faults: AtomicU64::new(0),
        }
    }

    /// How many accesses were refused since creation.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    /// How many mappings are live (a test for leaked DMA memory checks it returns to zero).
    pub fn mappings(&self) -> usize {
        self.table.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether `iova..iova + len` lies inside one live mapping.
    pub fn is_mapped(&self, iova: u64, len: usize) -> bool {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        Self::translate(&table, iova, len).is_some()
    }

    /// The host address of `iova`, if `iova..iova + len` lies inside one mapping.
    fn translate(table: &BTreeMap<u64, Mapping>, iova: u64, len: usize) -> Option<usize> {
        let (&start, m) = table.range(..=iova).next_back()?;
        let off = iova - start;
        let end = off.checked_add(len as u64)?;
        if end > m.len as u64 {
            return None;
        }
        // `off < m.len`, which fits a usize.
        Some(m.vaddr + off as usize)
    }

    fn fault(&self, iova: u64, len: usize) -> Fault {
        self.faults.fetch_add(1, Ordering::Relaxed);
        Fault { iova, len }
    }

    /// Copies `dst.len()` bytes of device memory at `iova` into `dst` (a device DMA read).
    ///
    /// An empty `dst` always succeeds: it touches nothing.
    pub fn read(&self, iova: u64, dst: &mut [u8]) -> Result<(), Fault> {
        if dst.is_empty() {
            return Ok(());
        }
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        let Some(src) = Self::translate(&table, iova, dst.len()) else {
            return Err(self.fault(iova, dst.len()));
        };
        // SAFETY: `src..src + dst.len()` lies inside a live mapping (checked above), which the
        // mapper's caller promised stays allocated until `unmap`; `unmap` needs the write lock,
        // which cannot be taken while we hold the read lock. `dst` is ordinary memory behind a
        // unique reference, so it cannot overlap mapped memory (no references to that exist,
        // per the `map` contract).
        unsafe { volatile_copy(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies `src` into device memory at `iova` (a device DMA write).
    ///
    /// An empty `src` always succeeds.
    pub fn write(&self, iova: u64, src: &[u8]) -> Result<(), Fault> {
        if src.is_empty() {
            return Ok(());
        }
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        let Some(dst) = Self::translate(&table, iova, src.len()) else {
            return Err(self.fault(iova, src.len()));
        };
        // SAFETY: as in `read`: the destination lies inside a mapping that stays alive while
        // the read lock is held, and `src`, a shared reference to ordinary memory, cannot
        // overlap memory no reference may point into.
        unsafe { volatile_copy(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    /// Reads a little-endian `u32` at `iova`.
    pub fn read_u32(&self, iova: u64) -> Result<u32, Fault> {
        let mut b = [0u8; 4];
        self.read(iova, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes a little-endian `u32` at `iova`.
    pub fn write_u32(&self, iova: u64, value: u32) -> Result<(), Fault> {
        self.write(iova, &value.to_le_bytes())
    }

    /// Reads a little-endian `u64` at `iova`.
    pub fn read_u64(&self, iova: u64) -> Result<u64, Fault> {
        let mut b = [0u8; 8];
        self.read(iova, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a little-endian `u64` at `iova`.
    pub fn write_u64(&self, iova: u64, value: u64) -> Result<(), Fault> {
        self.write(iova, &value.to_le_bytes())
    }
}

impl DmaMapper for SoftIommu {
    unsafe fn map(&self, vaddr: *mut u8, len: usize) -> Result<u64, DmaError> {
        let iova = self
            .iova
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .alloc(len as u64)
            .ok_or(DmaError::IovaExhausted { len })?;
        let mapping = Mapping { vaddr: vaddr as usize, len };
        self.table.write().unwrap_or_else(PoisonError::into_inner).insert(iova, mapping);
        Ok(iova)
    }

    fn unmap(&self, iova: u64, len: usize) {
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        match table.get(&iova) {
            Some(m) if m.len == len => {
                table.remove(&iova);
                drop(table);
                self.iova.lock().unwrap_or_else(PoisonError::into_inner).free(iova, len as u64);
            }
            _ => tracing::warn!(iova, len, "soft IOMMU: unmap of a range that is not a mapping"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::region::{DmaRegion, PAGE_SIZE};

    fn iommu() -> Arc<SoftIommu> {
        Arc::new(SoftIommu::new())
    }

    #[test]
    fn round_trip_through_a_region() {
        let mmu = iommu();
        let region = DmaRegion::alloc(mmu.clone(), 2 * PAGE_SIZE).unwrap();
        assert!(region.iova() >= IovaAllocator::MIN_IOVA);
        assert_eq!(region.iova() % PAGE_SIZE as u64, 0);
        assert_eq!(mmu.mappings(), 1);

        // Device writes, CPU reads.
        mmu.write(region.iova() + 100, b"hello device").unwrap();
        let mut got = [0u8; 12];
        region.read_bytes(100, &mut got);
        assert_eq!(&got, b"hello device");

        // CPU writes, device reads, across the page boundary inside the one mapping.
        region.write_bytes(PAGE_SIZE - 3, &[1, 2, 3, 4, 5, 6]);
        let mut got = [0u8; 6];
        mmu.read(region.iova() + PAGE_SIZE as u64 - 3, &mut got).unwrap();
        assert_eq!(got, [1, 2, 3, 4, 5, 6]);

        region.write_u32(8, 0xdead_beef);
        assert_eq!(mmu.read_u32(region.iova() + 8).unwrap(), 0xdead_beef);
        mmu.write_u64(region.iova() + 16, 0x0123_4567_89ab_cdef).unwrap();
        assert_eq!(region.read_u64(16), 0x0123_4567_89ab_cdef);
        mmu.write_u32(region.iova() + 24, 7).unwrap();
        assert_eq!(mmu.read_u64(region.iova() + 24).unwrap(), 7);
        assert_eq!(mmu.faults(), 0);
        assert!(mmu.is_mapped(region.iova(), 2 * PAGE_SIZE));
        assert!(!mmu.is_mapped(region.iova(), 2 * PAGE_SIZE + 1));
    }

    #[test]
    fn accesses_outside_one_mapping_fault() {
        let mmu = iommu();
        let a = DmaRegion::alloc(mmu.clone(), PAGE_SIZE).unwrap();
        let b = DmaRegion::alloc(mmu.clone(), PAGE_SIZE).unwrap();
        let mut buf = [0u8; 16];

        // Below every mapping, and IOVA 0.
        assert_eq!(mmu.read(0, &mut buf), Err(Fault { iova: 0, len: 16 }));
        assert!(mmu.read(a.iova() - 8, &mut buf).is_err());
        // Running off the end of a mapping, even when the next IOVA is mapped too: an access
        // must lie inside one mapping.
        let end = a.iova() + PAGE_SIZE as u64;
        assert_eq!(b.iova(), end, "first fit puts the second region right after the first");
        assert!(mmu.read(end - 8, &mut buf).is_err());
        assert!(mmu.write(end - 8, &buf).is_err());
        // Overflowing the address space.
        assert!(mmu.read(u64::MAX - 3, &mut buf).is_err());
        assert_eq!(mmu.faults(), 5);

        // Nothing was written by the refused write.
        let mut got = [0xffu8; 8];
        a.read_bytes(PAGE_SIZE - 8, &mut got);
        assert_eq!(got, [0; 8]);

        // Empty accesses touch nothing and never fault.
        assert!(mmu.read(0, &mut []).is_ok());
        assert!(mmu.write(0, &[]).is_ok());
        assert_eq!(mmu.faults(), 5);
    }

    #[test]
    fn unmap_revokes_access_and_frees_the_iova() {
        let mmu = iommu();
        let region = DmaRegion::alloc(mmu.clone(), PAGE_SIZE).unwrap();
        let iova = region.iova();
        assert!(mmu.write_u32(iova, 1).is_ok());
        drop(region);
        assert_eq!(mmu.mappings(), 0);
        assert_eq!(mmu.read_u32(iova), Err(Fault { iova, len: 4 }));
        assert_eq!(mmu.faults(), 1);

        // The IOVA is handed out again.
        let again = DmaRegion::alloc(mmu.clone(), PAGE_SIZE).unwrap();
        assert_eq!(again.iova(), iova);
        assert_eq!(mmu.read_u32(iova), Ok(0));

        // A bogus unmap is ignored.
        mmu.unmap(iova + PAGE_SIZE as u64, PAGE_SIZE);
        mmu.unmap(iova, 3 * PAGE_SIZE);
        assert_eq!(mmu.mappings(), 1);
    }

    #[test]
    fn concurrent_access_and_unmap() {
        let mmu = iommu();
        let keep = DmaRegion::alloc(mmu.clone(), PAGE_SIZE).unwrap();
        let keep_iova = keep.iova();
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..2000u32 {
                    mmu.write_u32(keep_iova + 4 * u64::from(i % 1024), i).unwrap();
                }
            });
            s.spawn(|| {
                for _ in 0..200 {
                    let r = DmaRegion::alloc(mmu.clone(), 4 * PAGE_SIZE).unwrap();
                    let iova = r.iova();
                    mmu.write(iova, &[7u8; 64]).unwrap();
                    drop(r);
                    assert!(mmu.read_u32(iova).is_err());
                }
            });
        });
        assert_eq!(mmu.mappings(), 1);
        assert_eq!(keep.read_u32(4 * (1999 % 1024)), 1999);
    }
}
