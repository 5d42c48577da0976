//! What happens to nvaio across `fork()`.
//!
//! A child process gets copies of the parent's descriptors for the VFIO container, group and
//! device, but the controller, its queues and its DMA mappings stay the parent's. Anything the
//! child did with them (ring a doorbell, unmap an IOVA, take the group out of the container,
//! shut the controller down, even on drop) would happen to the parent's live device. So:
//!
//! - DMA memory, event rings and BAR0 are mapped `MADV_DONTFORK`: the child does not have them
//!   at all (touching them faults instead of silently sharing pages with a device);
//! - every object that owns device state records the fork generation it was made in, and in a
//!   child refuses to be used (EINVAL at the AIO layer) and is leaked, never torn down, on drop.
//!
//! As with the kernel's AIO, whose contexts a child does not inherit, a child that wants nvaio
//! opens the controller itself (which the parent must have closed: a VFIO group is opened by
//! one process at a time).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

static GENERATION: AtomicU64 = AtomicU64::new(0);
static REGISTER: Once = Once::new();

extern "C" fn in_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// The current fork generation: how many forks separate this process from the one that first
/// asked. Record it when creating an object that owns device state.
pub fn generation() -> u64 {
    REGISTER.call_once(|| {
        // SAFETY: registers a handler that only bumps an atomic, which is async-signal-safe as
        // a child handler must be; the return value only says whether memory ran out.
        let r = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        if r != 0 {
            tracing::warn!("pthread_atfork failed ({r}): nvaio cannot detect fork()");
        }
    });
    GENERATION.load(Ordering::Relaxed)
}

/// Whether this process is a child forked after generation `recorded` was read: an object
/// made then belongs to the parent's device and must not be touched.
#[inline]
pub fn forked_since(recorded: u64) -> bool {
    GENERATION.load(Ordering::Relaxed) != recorded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_sees_a_new_generation() {
        let before = generation();
        assert!(!forked_since(before));
        let mut pipe = [0i32; 2];
        // SAFETY: creating a pipe into a local array.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: the child only evaluates an atomic load, writes a byte and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let byte = [forked_since(before) as u8];
            // SAFETY: writes one byte from a local and exits without unwinding.
            unsafe {
                libc::write(pipe[1], byte.as_ptr().cast(), 1);
                libc::_exit(0);
            }
        }
        let mut byte = [9u8];
        // SAFETY: reads one byte into a local; then reaps the child.
        unsafe {
            libc::read(pipe[0], byte.as_mut_ptr().cast(), 1);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
            libc::close(pipe[0]);
            libc::close(pipe[1]);
        }
        assert_eq!(byte[0], 1, "the child saw no fork");
        assert!(!forked_since(before), "the parent saw a fork");
    }
}
