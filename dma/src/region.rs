//! DMA memory: page-aligned, locked, anonymous memory with an IO virtual address.
//!
//! A [`DmaRegion`] is memory the device may read or write at any moment. It is therefore never
//! handed out as a slice: callers copy in and out with the volatile helpers below, or pass the
//! IOVA to the device. The region is unmapped from the IOMMU before its memory is released, so
//! a late DMA from a misbehaving device faults in the IOMMU instead of corrupting freed memory.

use std::ptr::NonNull;
use std::sync::Arc;

/// The page size nvaio uses for DMA memory and for NVMe's memory page size (CC.MPS = 0).
pub const PAGE_SIZE: usize = 4096;

/// Why DMA memory could not be had.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    #[error("cannot allocate {len} bytes of DMA memory: {source}")]
    Alloc { len: usize, source: std::io::Error },
    #[error(
        "cannot lock {len} bytes of DMA memory in RAM ({source}); raise the locked-memory \
         limit (ulimit -l, or LimitMEMLOCK= for a service)"
    )]
    Lock { len: usize, source: std::io::Error },
    #[error("the IOVA space has no free range of {len} bytes")]
    IovaExhausted { len: usize },
    #[error("cannot map {len} bytes at IOVA {iova:#x} for DMA: {source}")]
    Map { iova: u64, len: usize, source: std::io::Error },
}

/// Gives memory an address the device can use (an IOVA), and takes it away again.
///
/// VFIO implements it with the IOMMU; the in-process emulated controller implements it with a
/// table it consults on every access, which makes it an IOMMU of its own.
pub trait DmaMapper: Send + Sync {
    /// Maps `len` bytes at `vaddr` for device access and returns the IOVA chosen for them.
    ///
    /// # Safety
    /// Until [`DmaMapper::unmap`] is called with the returned IOVA and the same `len`, the range
    /// `vaddr..vaddr + len` must stay mapped, and it may be reached only through raw pointers
    /// with volatile or atomic accesses (or system calls that take raw pointers): the device
    /// writes it concurrently, so no Rust reference to it may exist.
    unsafe fn map(&self, vaddr: *mut u8, len: usize) -> Result<u64, DmaError>;

    /// Removes a mapping made by [`DmaMapper::map`]. Failure is logged, not returned: the caller
    /// is releasing the memory and has nothing better to do.
    fn unmap(&self, iova: u64, len: usize);
}

/// Maps `len` bytes of fresh, zeroed, populated anonymous memory (page aligned), not inherited
/// by `fork()`. The caller owns the mapping and releases it with `munmap`.
pub fn map_anonymous(len: usize) -> std::io::Result<NonNull<u8>> {
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches no
    // existing memory; the result is checked before use.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // Not inherited by fork(): the pages belong to a device and an event ring of this process
    // (see `crate::fork`). Failure only loses that protection.
    // SAFETY: advice on the mapping just made.
    unsafe { libc::madvise(addr, len, libc::MADV_DONTFORK) };
    NonNull::new(addr.cast::<u8>()).ok_or_else(|| std::io::Error::other("mmap returned null"))
}

/// Page-aligned, locked memory mapped for DMA.
pub struct DmaRegion {
    ptr: NonNull<u8>,
    len: usize,
    iova: u64,
    mapper: Arc<dyn DmaMapper>,
}

// SAFETY: the region owns its mapping; all access is through raw-pointer volatile operations
// whose synchronisation is the caller's business, exactly as for memory shared with a device.
unsafe impl Send for DmaRegion {}
// SAFETY: as above; `&DmaRegion` exposes no reference into the memory itself.
unsafe impl Sync for DmaRegion {}

impl DmaRegion {
    /// Allocates `len` bytes (rounded up to whole pages), zeroed, locked in RAM, and maps them.
    pub fn alloc(mapper: Arc<dyn DmaMapper>, len: usize) -> Result<Self, DmaError> {
        let len = len.max(1).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let ptr = map_anonymous(len).map_err(|source| DmaError::Alloc { len, source })?;
        let release = |ptr: NonNull<u8>| {
            // SAFETY: `ptr..ptr+len` is the mapping made above and nothing else refers to it.
            unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
        };
        // Locked so the kernel never moves or swaps a page the device is pointed at. VFIO pins the
        // pages anyway; locking here makes a low RLIMIT_MEMLOCK fail with a clear message.
        // SAFETY: the range is our own mapping.
        if unsafe { libc::mlock(ptr.as_ptr().cast(), len) } != 0 {
            let source = std::io::Error::last_os_error();
            release(ptr);
            return Err(DmaError::Lock { len, source });
        }
        // SAFETY: the mapping stays alive until `drop`, which unmaps the IOVA first; the region
        // never creates references into it (see the module docs).
        let iova = match unsafe { mapper.map(ptr.as_ptr(), len) } {
            Ok(iova) => iova,
            Err(e) => {
                release(ptr);
                return Err(e);
            }
        };
        Ok(DmaRegion { ptr, len, iova, mapper })
    }

    /// Length in bytes (a multiple of [`PAGE_SIZE`]).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a region holds at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The device's address of byte 0.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// The CPU's address of byte 0. Use it only for raw-pointer volatile access.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    #[inline]
    fn check(&self, off: usize, len: usize) {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len),
            "DMA access {off:#x}+{len:#x} outside a region of {:#x} bytes",
            self.len
        );
    }

    /// Reads a little-endian `u32` at byte offset `off` (4-byte aligned).
    #[inline]
    pub fn read_u32(&self, off: usize) -> u32 {
        self.check(off, 4);
        debug_assert_eq!(off % 4, 0);
        // SAFETY: in bounds (checked), aligned, and volatile because the device writes it.
        u32::from_le(unsafe { self.ptr.as_ptr().add(off).cast::<u32>().read_volatile() })
    }

    /// Writes a little-endian `u32` at byte offset `off` (4-byte aligned).
    #[inline]
    pub fn write_u32(&self, off: usize, value: u32) {
        self.check(off, 4);
        debug_assert_eq!(off % 4, 0);
        // SAFETY: in bounds (checked), aligned, and volatile because the device reads it.
        unsafe { self.ptr.as_ptr().add(off).cast::<u32>().write_volatile(value.to_le()) }
    }

    /// Reads a little-endian `u64` at byte offset `off` (8-byte aligned).
    #[inline]
    pub fn read_u64(&self, off: usize) -> u64 {
        self.check(off, 8);
        debug_assert_eq!(off % 8, 0);
        // SAFETY: in bounds (checked), aligned, volatile.
        u64::from_le(unsafe { self.ptr.as_ptr().add(off).cast::<u64>().read_volatile() })
    }

    /// Writes a little-endian `u64` at byte offset `off` (8-byte aligned).
    #[inline]
    pub fn write_u64(&self, off: usize, value: u64) {
        self.check(off, 8);
        debug_assert_eq!(off % 8, 0);
        // SAFETY: in bounds (checked), aligned, volatile.
        unsafe { self.ptr.as_ptr().add(off).cast::<u64>().write_volatile(value.to_le()) }
    }

    /// Copies `src` into the region at `off`.
    pub fn write_bytes(&self, off: usize, src: &[u8]) {
        self.check(off, src.len());
        // SAFETY: destination in bounds (checked); the source is ordinary memory.
        unsafe { volatile_copy(src.as_ptr(), self.ptr.as_ptr().add(off), src.len()) }
    }

    /// Copies from the region at `off` into `dst`.
    pub fn read_bytes(&self, off: usize, dst: &mut [u8]) {
        self.check(off, dst.len());
        // SAFETY: source in bounds (checked); the destination is ordinary memory.
        unsafe { volatile_copy(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len()) }
    }

    /// Copies `len` bytes from raw memory at `src` into the region at `off`.
    ///
    /// # Safety
    /// `src..src+len` must be readable for the duration of the call.
    pub unsafe fn write_from_raw(&self, off: usize, src: *const u8, len: usize) {
        self.check(off, len);
        // SAFETY: destination checked; source validity is the caller's promise.
        unsafe { volatile_copy(src, self.ptr.as_ptr().add(off), len) }
    }

    /// Copies `len` bytes from the region at `off` to raw memory at `dst`.
    ///
    /// # Safety
    /// `dst..dst+len` must be writable for the duration of the call and not overlap the region.
    pub unsafe fn read_to_raw(&self, off: usize, dst: *mut u8, len: usize) {
        self.check(off, len);
        // SAFETY: source checked; destination validity is the caller's promise.
        unsafe { volatile_copy(self.ptr.as_ptr().add(off), dst, len) }
    }

    /// Fills `len` bytes at `off` with zeroes.
    pub fn zero(&self, off: usize, len: usize) {
        self.check(off, len);
        for i in 0..len {
            // SAFETY: in bounds (checked above).
            unsafe { self.ptr.as_ptr().add(off + i).write_volatile(0) }
        }
    }
}

/// Copies between DMA memory and ordinary memory without creating references to either.
///
/// Bulk data moves in 16-byte (SSE2, on x86-64) or 8-byte volatile accesses where both sides
/// are equally aligned; the compiler may not merge or elide volatile accesses, which is what
/// memory shared with a device needs. Wide accesses matter: this copy is on the I/O path of every
/// bounce-buffered request.
///
/// # Safety
/// `src..src+len` readable, `dst..dst+len` writable, and the two ranges do not overlap.
pub unsafe fn volatile_copy(src: *const u8, dst: *mut u8, len: usize) {
    let mut i = 0;
    let same = |m: usize| (src as usize) % m == (dst as usize) % m;
    #[cfg(target_arch = "x86_64")]
    if same(16) && len >= 64 {
        use core::arch::x86_64::__m128i;
        while i < len && !(src as usize + i).is_multiple_of(16) {
            // SAFETY: i < len, within both ranges per the caller's promise.
            unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
            i += 1;
        }
        while i + 64 <= len {
            // SAFETY: both pointers are 16-aligned here and the 64 bytes lie within both
            // ranges; SSE2 is part of the x86-64 baseline.
            unsafe {
                let s = src.add(i).cast::<__m128i>();
                let d = dst.add(i).cast::<__m128i>();
                let (a, b, c, e) = (
                    s.read_volatile(),
                    s.add(1).read_volatile(),
                    s.add(2).read_volatile(),
                    s.add(3).read_volatile(),
                );
                d.write_volatile(a);
                d.add(1).write_volatile(b);
                d.add(2).write_volatile(c);
                d.add(3).write_volatile(e);
            }
            i += 64;
        }
    }
    if same(8) {
        while i < len && !(src as usize + i).is_multiple_of(8) {
            // SAFETY: i < len, within both ranges per the caller's promise.
            unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
            i += 1;
        }
        while i + 8 <= len {
            // SAFETY: both pointers are 8-aligned here and the 8 bytes lie within both ranges.
            unsafe {
                dst.add(i).cast::<u64>().write_volatile(src.add(i).cast::<u64>().read_volatile())
            };
            i += 8;
        }
    }
    while i < len {
        // SAFETY: i < len, within both ranges.
        unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
        i += 1;
    }
}

impl Drop for DmaRegion {
    fn drop(&mut self) {
        // Unmap from the IOMMU first: after this the device cannot reach the pages.
        self.mapper.unmap(self.iova, self.len);
        // SAFETY: our own mapping, no longer reachable by the device or by any other owner.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl std::fmt::Debug for DmaRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaRegion").field("iova", &self.iova).field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::volatile_copy;

    #[test]
    fn copies_every_alignment_and_length() {
        let src: Vec<u8> = (0..300u32).map(|i| (i * 13 + 7) as u8).collect();
        for s_off in 0..17 {
            for d_off in 0..17 {
                for len in [0, 1, 7, 8, 15, 16, 63, 64, 65, 127, 200, 270] {
                    let mut dst = vec![0u8; 300];
                    // SAFETY: both ranges lie inside their vectors and do not overlap.
                    unsafe { volatile_copy(src[s_off..].as_ptr(), dst[d_off..].as_mut_ptr(), len) };
                    assert_eq!(&dst[d_off..d_off + len], &src[s_off..s_off + len]);
                    assert!(dst[..d_off].iter().all(|&b| b == 0));
                    assert!(dst[d_off + len..].iter().all(|&b| b == 0));
                }
            }
        }
    }
}
