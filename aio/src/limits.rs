//! How many requests a context takes, computed as Linux 6.1's fs/aio.c does, so that an
//! application sees EAGAIN from nvaio exactly where it would from the kernel.
//!
//! The kernel sizes the ring from `max(nr_events, 4 * possible CPUs) * 2 + 2` events rounded up
//! to whole pages, and hands out request slots from a global counter in per-CPU batches
//! (`req_batch`); slots come back lazily, when a later completion or a failed allocation notices
//! that events have left the ring. [`Slots`] follows that bookkeeping for one CPU, which is what a
//! single submitting thread sees.

use std::sync::Mutex;

use crate::context::Errno;

/// Bytes of `struct aio_ring` and of `struct io_event`.
const HEADER: u64 = 32;
const EVENT: u64 = 32;
const PAGE: u64 = 4096;

/// Number of possible CPUs, as the kernel counts them (`/sys/devices/system/cpu/possible`).
pub fn possible_cpus() -> u32 {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| parse_cpu_list(s.trim()))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32))
}

/// Counts the CPUs in a list like `0-3,8,10-11`.
fn parse_cpu_list(s: &str) -> Option<u32> {
    let mut n = 0;
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => n += b.parse::<u32>().ok()?.checked_sub(a.parse::<u32>().ok()?)? + 1,
            None => {
                part.parse::<u32>().ok()?;
                n += 1;
            }
        }
    }
    (n > 0).then_some(n)
}

/// The system-wide limit on requested events (`/proc/sys/fs/aio-max-nr`, 65536 by default).
pub fn aio_max_nr() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/aio-max-nr")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65536)
}

/// Events requested by every live nvaio context, counted against `aio_max_nr` like the kernel's
/// `aio_nr`. (The kernel's own count of other processes' contexts is not visible from here.)
static AIO_NR: Mutex<u64> = Mutex::new(0);

/// A reservation of `nr_events` against the system-wide limit, released on drop.
#[derive(Debug)]
pub struct Reservation(u64);

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut nr = AIO_NR.lock().unwrap_or_else(|e| e.into_inner());
        *nr = nr.saturating_sub(self.0);
    }
}

/// The geometry `io_setup(nr_events)` gets: ring slots, or the kernel's error.
///
/// Errors: EINVAL for 0 or a ring above 256 MiB of events; EAGAIN when `nr_events` exceeds
/// `aio_max_nr` or the events of all contexts would.
pub fn setup(nr_events: u32, cpus: u32) -> Result<(u32, Reservation), Errno> {
    if nr_events == 0 {
        return Err(Errno(libc::EINVAL));
    }
    // The kernel doubles in 32-bit unsigned arithmetic; keep its wrap-around.
    let doubled = nr_events.max(cpus.saturating_mul(4)).wrapping_mul(2);
    if u64::from(doubled) > 0x1000_0000 / EVENT {
        return Err(Errno(libc::EINVAL));
    }
    let max = aio_max_nr();
    if doubled == 0 || u64::from(nr_events) > max {
        return Err(Errno(libc::EAGAIN));
    }
    {
        let mut total = AIO_NR.lock().unwrap_or_else(|e| e.into_inner());
        if *total + u64::from(nr_events) > max {
            return Err(Errno(libc::EAGAIN));
        }
        *total += u64::from(nr_events);
    }
    let reservation = Reservation(u64::from(nr_events));
    // "1 is required, 2 for good luck" (aio_setup_ring), then whole pages.
    let bytes = HEADER + EVENT * (u64::from(doubled) + 2);
    let nr = (bytes.div_ceil(PAGE) * PAGE - HEADER) / EVENT;
    Ok((nr as u32, reservation))
}

/// Request-slot bookkeeping of one context (reqs_available, req_batch, completed_events).
#[derive(Clone, Debug)]
pub struct Slots {
    /// This CPU's cached slots.
    local: u32,
    /// The context-wide counter.
    global: u32,
    batch: u32,
    /// Events completed whose slots have not been handed back yet.
    completed: u32,
    nr: u32,
}

impl Slots {
    pub fn new(nr: u32, cpus: u32) -> Slots {
        let batch = ((nr - 1) / (cpus.max(1) * 4)).max(1);
        Slots { local: 0, global: nr - 1, batch, completed: 0, nr }
    }

    fn get(&mut self) -> bool {
        if self.local == 0 {
            if self.global < self.batch {
                return false;
            }
            self.global -= self.batch;
            self.local += self.batch;
        }
        self.local -= 1;
        true
    }

    /// Takes a slot for a new request (aio_get_req); `head` and `tail` are the ring's.
    pub fn take(&mut self, head: u32, tail: u32) -> bool {
        if self.get() {
            return true;
        }
        if self.completed > 0 {
            self.refill(head, tail);
        }
        self.get()
    }

    /// Gives back `n` slots (put_reqs_available).
    pub fn put(&mut self, n: u32) {
        self.local += n;
        while self.local >= 2 * self.batch {
            self.local -= self.batch;
            self.global += self.batch;
        }
    }

    /// Accounts for an event just posted; `tail` is the ring's new tail (aio_complete).
    pub fn completed(&mut self, head: u32, tail: u32) {
        self.completed += 1;
        if self.completed > 1 {
            self.refill(head, tail);
        }
    }

    /// Hands back the slots of events that have left the ring (refill_reqs_available).
    fn refill(&mut self, head: u32, tail: u32) {
        let head = head % self.nr;
        let in_ring = if head <= tail { tail - head } else { self.nr - (head - tail) };
        let gone = self.completed.saturating_sub(in_ring);
        if gone > 0 {
            self.completed -= gone;
            self.put(gone);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1"), Some(2));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn ring_sizes_match_the_kernel_formula() {
        // 2 CPUs: max(4, 8) * 2 + 2 = 18 events, one page: (4096 - 32) / 32 = 127 slots.
        assert_eq!(setup(4, 2).unwrap().0, 127);
        // 128 requested: 258 events = 8288 bytes, 3 pages: (12288 - 32) / 32 = 383.
        assert_eq!(setup(128, 2).unwrap().0, 383);
        assert_eq!(setup(0, 2).unwrap_err(), Errno(libc::EINVAL));
        assert_eq!(setup(5_000_000, 2).unwrap_err(), Errno(libc::EINVAL));
        let max = aio_max_nr();
        if max < 4_000_000 {
            assert_eq!(setup(max as u32 + 1, 2).unwrap_err(), Errno(libc::EAGAIN));
        }
    }

    #[test]
    fn slots_follow_the_batches() {
        // nr 127 with 2 CPUs: batch (126 / 8) = 15, so 8 batches = 120 slots before EAGAIN.
        let mut s = Slots::new(127, 2);
        let taken = (0..200).take_while(|_| s.take(0, 0)).count();
        assert_eq!(taken, 120);
        // Three events completed and still in the ring: nothing comes back.
        let mut tail = 0;
        for _ in 0..3 {
            tail += 1;
            s.completed(0, tail);
        }
        assert!(!s.take(0, tail));
        // The application reaped them: the next attempt refills from the ring position.
        assert!(s.take(3, tail));
        assert!(s.take(3, tail));
        assert!(s.take(3, tail));
        assert!(!s.take(3, tail));
    }
}
