//! Bounce pages: DMA memory that application data is copied through.
//!
//! Application buffers can sit anywhere, and mapping them into the IOMMU per I/O would cost a
//! system call each. Instead every queue pair owns a pool of 4 KiB DMA pages: a write copies the
//! data into pool pages before it is submitted, a read copies it out once it completes. PRP
//! entries name single pages, so a command's pages need not be contiguous, and taking a page is
//! a pop from a stack: no lock and no allocation on the I/O path.
//!
//! The pool grows by whole arenas when it runs dry, up to a limit; past the limit commands wait
//! for pages to come back (see the context's pending queue). Growth is a system call, so it
//! happens while a workload warms up, not in its steady state.

use std::sync::Arc;

use nvaio_dma::{DmaError, DmaMapper, DmaRegion, PAGE_SIZE};

/// Pages per arena: 2 MiB.
const ARENA_PAGES: usize = 512;

/// A page of the pool: arena index in the high bits, page index in the low.
pub type PageId = u32;
const PAGE_BITS: u32 = 9;

pub struct PagePool {
    mapper: Arc<dyn DmaMapper>,
    arenas: Vec<DmaRegion>,
    free: Vec<PageId>,
    max_arenas: usize,
}

impl PagePool {
    /// A pool holding at most `max_bytes` (at least one arena), with `initial_bytes` allocated now.
    pub fn new(
        mapper: Arc<dyn DmaMapper>,
        initial_bytes: usize,
        max_bytes: usize,
    ) -> Result<PagePool, DmaError> {
        let arena_bytes = ARENA_PAGES * PAGE_SIZE;
        let max_arenas = max_bytes.div_ceil(arena_bytes).max(1);
        let mut pool = PagePool { mapper, arenas: Vec::new(), free: Vec::new(), max_arenas };
        let initial = initial_bytes.div_ceil(arena_bytes).clamp(1, max_arenas);
        for _ in 0..initial {
            pool.grow()?;
        }
        Ok(pool)
    }

    fn grow(&mut self) -> Result<(), DmaError> {
        let arena = DmaRegion::alloc(self.mapper.clone(), ARENA_PAGES * PAGE_SIZE)?;
        let a = self.arenas.len() as u32;
        self.arenas.push(arena);
        self.free.reserve(self.arenas.len() * ARENA_PAGES - self.free.len());
        self.free.extend((0..ARENA_PAGES as u32).rev().map(|p| a << PAGE_BITS | p));
        Ok(())
    }

    /// Whether `n` pages can be had now, growing the pool if it is allowed to.
    pub fn reserve(&mut self, n: usize) -> bool {
        while self.free.len() < n {
            if self.arenas.len() >= self.max_arenas {
                return false;
            }
            if let Err(e) = self.grow() {
                tracing::warn!("bounce pool cannot grow: {e}");
                return false;
            }
        }
        true
    }

    /// Takes one page; call [`PagePool::reserve`] first.
    #[inline]
    pub fn take(&mut self) -> Option<PageId> {
        self.free.pop()
    }

    /// Returns a page.
    #[inline]
    pub fn put(&mut self, page: PageId) {
        self.free.push(page);
    }

    #[inline]
    fn locate(&self, page: PageId) -> (&DmaRegion, usize) {
        let arena = &self.arenas[(page >> PAGE_BITS) as usize];
        (arena, (page as usize & (ARENA_PAGES - 1)) * PAGE_SIZE)
    }

    /// The device's address of a page.
    #[inline]
    pub fn iova(&self, page: PageId) -> u64 {
        let (arena, off) = self.locate(page);
        arena.iova() + off as u64
    }

    /// Copies `len` bytes from raw memory into `page` at byte `off`.
    ///
    /// # Safety
    /// `src..src+len` must be readable.
    #[inline]
    pub unsafe fn copy_in(&self, page: PageId, off: usize, src: *const u8, len: usize) {
        debug_assert!(off + len <= PAGE_SIZE);
        let (arena, base) = self.locate(page);
        // SAFETY: the caller vouches for the source; the region checks the destination.
        unsafe { arena.write_from_raw(base + off, src, len) }
    }

    /// Copies `len` bytes from `page` at byte `off` into raw memory.
    ///
    /// # Safety
    /// `dst..dst+len` must be writable.
    #[inline]
    pub unsafe fn copy_out(&self, page: PageId, off: usize, dst: *mut u8, len: usize) {
        debug_assert!(off + len <= PAGE_SIZE);
        let (arena, base) = self.locate(page);
        // SAFETY: the caller vouches for the destination; the region checks the source.
        unsafe { arena.read_to_raw(base + off, dst, len) }
    }

    /// Writes one little-endian u64 at byte `off` of `page` (PRP list entries).
    #[inline]
    pub fn write_u64(&self, page: PageId, off: usize, value: u64) {
        let (arena, base) = self.locate(page);
        arena.write_u64(base + off, value);
    }
}
