//! A mapped register window: a PCI BAR mmap'd from the VFIO device file.
//!
//! Registers change under our feet and reads can have side effects, so every access is a single
//! volatile load or store of the register's width; nothing is ever cached or merged.

use std::ptr::NonNull;

/// A register window of `len` bytes. Offsets past the end read as all ones (what PCI returns for
/// a device that is gone) and writes there are dropped, so a bad offset never touches other memory.
pub struct Mmio {
    ptr: NonNull<u8>,
    len: usize,
    /// Whether `drop` must munmap the window (false for windows borrowed from elsewhere).
    owned: bool,
}

// SAFETY: the window is device memory reached only through volatile accesses of register width;
// the device, not Rust, defines what concurrent accesses mean.
unsafe impl Send for Mmio {}
// SAFETY: as above.
unsafe impl Sync for Mmio {}

impl Mmio {
    /// Wraps a window mapped by the caller.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be a mapping of device registers (or memory standing in for them) that
    /// stays valid for the life of the `Mmio`, and that nothing reaches through a Rust reference.
    /// If `owned`, it must come from `mmap` and is unmapped on drop.
    pub unsafe fn from_raw(ptr: NonNull<u8>, len: usize, owned: bool) -> Self {
        Mmio { ptr, len, owned }
    }

    /// Length of the window in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length window.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    fn fits(&self, off: usize, width: usize) -> bool {
        off.is_multiple_of(width) && off.checked_add(width).is_some_and(|end| end <= self.len)
    }

    /// Reads the 32-bit register at `off`.
    #[inline]
    pub fn read32(&self, off: usize) -> u32 {
        if !self.fits(off, 4) {
            return u32::MAX;
        }
        // SAFETY: in bounds and aligned (checked); volatile because registers change on their own.
        u32::from_le(unsafe { self.ptr.as_ptr().add(off).cast::<u32>().read_volatile() })
    }

    /// Writes the 32-bit register at `off`.
    #[inline]
    pub fn write32(&self, off: usize, value: u32) {
        if !self.fits(off, 4) {
            return;
        }
        // SAFETY: in bounds and aligned (checked); volatile because the write has side effects.
        unsafe { self.ptr.as_ptr().add(off).cast::<u32>().write_volatile(value.to_le()) }
    }

    /// Reads a 64-bit register as two 32-bit halves, low first (NVMe 2.0 §3.1.2 allows it, and
    /// some bridges do not forward 64-bit reads).
    #[inline]
    pub fn read64(&self, off: usize) -> u64 {
        let lo = self.read32(off) as u64;
        let hi = self.read32(off + 4) as u64;
        lo | (hi << 32)
    }

    /// Writes a 64-bit register as two 32-bit halves, low first.
    #[inline]
    pub fn write64(&self, off: usize, value: u64) {
        self.write32(off, value as u32);
        self.write32(off + 4, (value >> 32) as u32);
    }
}

impl Drop for Mmio {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: an owned window came from mmap (see `from_raw`) and is ours alone.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}
