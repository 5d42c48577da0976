//! The kernel's AIO, for iocbs that name descriptors nvaio does not own.
//!
//! One nvaio context serves an application whose files sit partly on nvaio namespaces and
//! partly on ordinary file systems. Requests on ordinary descriptors go to a kernel AIO context
//! that the nvaio context creates on first use. Each is submitted as a copy whose `aio_data`
//! holds nvaio's request index; its event is read straight from the kernel's ring (mapped in
//! this process; no system call) and reposted to nvaio's ring with the application's own `data`
//! and `obj`, so the application sees one stream of events.

use std::io;

use crate::abi::{AioRingHeader, IoEvent, Iocb, AIO_RING_MAGIC};
use crate::context::Errno;

pub struct KernelAio {
    ctx: u64,
    /// Copies of the submitted iocbs, indexed by nvaio request; their addresses are what the
    /// kernel sees, so the vector is never resized.
    iocbs: Vec<Iocb>,
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

impl KernelAio {
    /// A kernel context able to hold `requests` requests.
    pub fn new(requests: u32) -> Result<KernelAio, Errno> {
        let mut ctx: u64 = 0;
        // SAFETY: io_setup writes the context id to the u64 we pass.
        let r = unsafe { libc::syscall(libc::SYS_io_setup, requests as libc::c_long, &mut ctx) };
        if r < 0 {
            return Err(Errno(errno()));
        }
        Ok(KernelAio { ctx, iocbs: vec![Iocb::default(); requests as usize] })
    }

    /// Submits a copy of `iocb` for nvaio request `r`. Errors are the kernel's.
    pub fn submit(&mut self, r: u32, iocb: &Iocb) -> Result<(), Errno> {
        let slot = &mut self.iocbs[r as usize];
        *slot = *iocb;
        slot.aio_data = u64::from(r);
        let mut list = [slot as *mut Iocb];
        // SAFETY: one valid iocb pointer; the copy stays at this address until its event is
        // reaped (the vector never reallocates).
        let n = unsafe {
            libc::syscall(libc::SYS_io_submit, self.ctx, 1 as libc::c_long, list.as_mut_ptr())
        };
        match n {
            1 => Ok(()),
            n if n < 0 => Err(Errno(errno())),
            _ => Err(Errno(libc::EAGAIN)),
        }
    }

    /// Cancels nvaio request `r` (io_cancel on its copy). The kernel decides: block and file
    /// I/O cannot be cancelled (EINVAL); a POLL can (EINPROGRESS).
    pub fn cancel(&mut self, r: u32) -> Result<(), Errno> {
        let mut ev = IoEvent::default();
        let iocb = &mut self.iocbs[r as usize] as *mut Iocb;
        // SAFETY: the iocb copy and the event are valid for the call.
        let n = unsafe { libc::syscall(libc::SYS_io_cancel, self.ctx, iocb, &mut ev) };
        if n < 0 {
            Err(Errno(errno()))
        } else {
            Ok(())
        }
    }

    fn header(&self) -> *mut AioRingHeader {
        self.ctx as *mut AioRingHeader
    }

    /// Reads up to `max` completed events from the kernel's ring in user space, as libaio does,
    /// calling `f(request, res, res2)` for each; the rest stay in the ring for the next call.
    /// Falls back to io_getevents if the ring is not the layout this code knows.
    pub fn reap(&mut self, max: usize, mut f: impl FnMut(u32, i64, i64)) -> usize {
        let h = self.header();
        // SAFETY: the context id is the address of the kernel's ring, mapped in this process
        // for the context's life; its header is read and written with volatile accesses
        // because the kernel writes it concurrently.
        let (nr, magic, incompat, hlen) = unsafe {
            (
                std::ptr::addr_of!((*h).nr).read_volatile(),
                std::ptr::addr_of!((*h).magic).read_volatile(),
                std::ptr::addr_of!((*h).incompat_features).read_volatile(),
                std::ptr::addr_of!((*h).header_length).read_volatile(),
            )
        };
        if magic != AIO_RING_MAGIC || incompat != 0 || nr == 0 {
            return self.reap_syscall(max, f);
        }
        let mut n = 0;
        while n < max {
            // SAFETY: as above.
            let (head, tail) = unsafe {
                (
                    std::ptr::addr_of!((*h).head).read_volatile() % nr,
                    std::ptr::addr_of!((*h).tail).read_volatile() % nr,
                )
            };
            if head == tail {
                return n;
            }
            // The tail read must come before the event reads it announces.
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            let at = self.ctx as usize + hlen as usize + head as usize * 32;
            // SAFETY: head < nr, so the event lies inside the ring the kernel mapped.
            let ev = unsafe { (at as *const IoEvent).read_volatile() };
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            // SAFETY: advancing head is how user space consumes events (libaio does the same).
            unsafe { std::ptr::addr_of_mut!((*h).head).write_volatile((head + 1) % nr) };
            f(ev.data as u32, ev.res, ev.res2);
            n += 1;
        }
        n
    }

    fn reap_syscall(&mut self, max: usize, mut f: impl FnMut(u32, i64, i64)) -> usize {
        let mut evs = [IoEvent::default(); 16];
        let want = max.min(evs.len()) as libc::c_long;
        let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: the event array and timespec are valid for the call.
        let n = unsafe {
            libc::syscall(
                libc::SYS_io_getevents,
                self.ctx,
                0 as libc::c_long,
                want,
                evs.as_mut_ptr(),
                &zero,
            )
        };
        for ev in evs.iter().take(n.max(0) as usize) {
            f(ev.data as u32, ev.res, ev.res2);
        }
        n.max(0) as usize
    }
}

impl Drop for KernelAio {
    fn drop(&mut self) {
        // io_destroy waits for the kernel's requests in flight.
        // SAFETY: our own context id.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.ctx) };
    }
}

/// Whether `fd` is an open descriptor of this process.
pub fn is_open_fd(fd: i32) -> bool {
    // SAFETY: F_GETFD only inspects the descriptor table.
    fd >= 0 && unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0
}

/// Whether `fd` is an eventfd (EBADF if it is not open, EINVAL if it is something else), as
/// the kernel checks IOCB_FLAG_RESFD.
pub fn check_eventfd(fd: i32) -> Result<(), Errno> {
    if !is_open_fd(fd) {
        return Err(Errno(libc::EBADF));
    }
    // nvaio reserves namespace descriptors with eventfds, but they are not eventfds to the
    // application.
    if crate::file::is_nvaio_fd(fd) {
        return Err(Errno(libc::EINVAL));
    }
    match std::fs::read_link(format!("/proc/self/fd/{fd}")) {
        Ok(target) if target.as_os_str() == "anon_inode:[eventfd]" => Ok(()),
        _ => Err(Errno(libc::EINVAL)),
    }
}

/// A close-on-exec duplicate of `fd`.
pub fn dup_cloexec(fd: i32) -> Result<i32, Errno> {
    // SAFETY: F_DUPFD_CLOEXEC reads no memory; failure is reported.
    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if d < 0 {
        Err(Errno(errno()))
    } else {
        Ok(d)
    }
}

/// Closes a descriptor nvaio owns.
pub fn close(fd: i32) {
    // SAFETY: the caller owns `fd` and does not use it again.
    unsafe { libc::close(fd) };
}
