//! The event ring: a `struct aio_ring` header followed by `io_event` slots, in memory the
//! application can read directly (libaio and fio reap from it without a system call when
//! `head != tail`).
//!
//! nvaio writes events at `tail`; whoever reaps (nvaio's `get_events`, or the application)
//! advances `head`. The application can write `head` at any time, so every read of it is reduced
//! modulo `nr` before use, as fs/aio.c does: a wild value costs events, never memory safety.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::abi::{
    AioRingHeader, IoEvent, AIO_RING_COMPAT_FEATURES, AIO_RING_INCOMPAT_FEATURES, AIO_RING_MAGIC,
};

const HEADER: usize = std::mem::size_of::<AioRingHeader>();
const EVENT: usize = std::mem::size_of::<IoEvent>();

pub struct Ring {
    ptr: NonNull<u8>,
    len: usize,
    nr: u32,
}

// SAFETY: the ring is plain memory owned by this struct; concurrent readers in the application
// only use atomic loads of head/tail and read events behind them, as with the kernel's ring.
unsafe impl Send for Ring {}

impl Ring {
    /// Maps a ring of `nr` slots (see `limits::setup` for how many), page-rounded.
    pub fn new(nr: u32) -> std::io::Result<Ring> {
        let want = HEADER + nr as usize * EVENT;
        let len = want.div_ceil(4096) * 4096;
        let ptr = nvaio_dma::region::map_anonymous(len)?;
        let nr = ((len - HEADER) / EVENT) as u32;
        let header = AioRingHeader {
            id: 0,
            nr,
            head: 0,
            tail: 0,
            magic: AIO_RING_MAGIC,
            compat_features: AIO_RING_COMPAT_FEATURES,
            incompat_features: AIO_RING_INCOMPAT_FEATURES,
            header_length: HEADER as u32,
        };
        // SAFETY: the mapping is at least one page, page aligned, and nobody else has it yet.
        unsafe { ptr.as_ptr().cast::<AioRingHeader>().write(header) };
        Ok(Ring { ptr, len, nr })
    }

    /// The ring's address: what `io_setup` stores in the `aio_context_t`.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Slots in the ring; at most `nr - 1` events are ever waiting.
    pub fn nr(&self) -> u32 {
        self.nr
    }

    fn word(&self, index: usize) -> &AtomicU32 {
        // SAFETY: index < 8 words of the header, 4-aligned (page-aligned base), living as long
        // as `self`. The application may write these words concurrently; atomics make that
        // defined.
        unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().cast::<u32>().add(index)) }
    }

    pub fn head(&self) -> u32 {
        // Acquire pairs with the application's store after it has copied the events out.
        self.word(2).load(Ordering::Acquire) % self.nr
    }

    pub fn tail(&self) -> u32 {
        self.word(3).load(Ordering::Relaxed) % self.nr
    }

    /// Events waiting to be reaped.
    pub fn pending(&self) -> u32 {
        (self.tail() + self.nr - self.head()) % self.nr
    }

    /// Posts one event. Returns false if the ring is full, which the context's accounting
    /// rules out unless the application corrupted `head`.
    #[inline]
    pub fn push(&mut self, ev: IoEvent) -> bool {
        let tail = self.tail();
        let next = if tail + 1 == self.nr { 0 } else { tail + 1 };
        if next == self.head() {
            return false;
        }
        // SAFETY: tail < nr, so the slot lies inside the mapping; event slots are 8-aligned.
        unsafe {
            self.ptr
                .as_ptr()
                .add(HEADER + tail as usize * EVENT)
                .cast::<IoEvent>()
                .write_volatile(ev)
        };
        // Release: the event is visible before the tail that announces it.
        self.word(3).store(next, Ordering::Release);
        true
    }

    /// Moves up to `out.len()` events into `out`; returns how many.
    #[inline]
    pub fn pop_into(&mut self, out: &mut [IoEvent]) -> usize {
        let mut head = self.head();
        // Acquire: pairs with the Release in `push`.
        let tail = self.word(3).load(Ordering::Acquire) % self.nr;
        let mut n = 0;
        while head != tail && n < out.len() {
            // SAFETY: head < nr, inside the mapping.
            out[n] = unsafe {
                self.ptr
                    .as_ptr()
                    .add(HEADER + head as usize * EVENT)
                    .cast::<IoEvent>()
                    .read_volatile()
            };
            n += 1;
            head = if head + 1 == self.nr { 0 } else { head + 1 };
        }
        if n > 0 {
            self.word(2).store(head, Ordering::Release);
        }
        n
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: our own mapping. An application still reading the ring after io_destroy is
        // using a destroyed context, exactly as with the kernel's ring.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_wrap() {
        let mut ring = Ring::new(127).unwrap();
        // One page: (4096 - 32) / 32 = 127 slots.
        assert_eq!(ring.nr(), 127);
        // SAFETY: reading the header we just wrote, no concurrent writer in this test.
        let h = unsafe { (ring.addr() as *const AioRingHeader).read() };
        assert_eq!(h.magic, AIO_RING_MAGIC);
        assert_eq!(h.nr, 127);
        assert_eq!(h.header_length, 32);
        let mut out = [IoEvent::default(); 8];
        for round in 0..100u64 {
            for i in 0..5 {
                assert!(ring.push(IoEvent { data: round * 10 + i, ..Default::default() }));
            }
            assert_eq!(ring.pending(), 5);
            assert_eq!(ring.pop_into(&mut out), 5);
            assert_eq!(out[4].data, round * 10 + 4);
        }
        for i in 0..126 {
            assert!(ring.push(IoEvent { data: i, ..Default::default() }));
        }
        assert!(!ring.push(IoEvent::default()), "a full ring refuses events");
        // A wild head written by the application is reduced modulo nr.
        ring.word(2).store(127 * 3 + 1, Ordering::Relaxed);
        assert_eq!(ring.head(), 1);
    }
}
