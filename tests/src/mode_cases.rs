//! AIO-level cases for the completion modes (polled, interrupt, hybrid), for the guest and the
//! emulated controller: data integrity in each mode, the CPU an idle `io_getevents` costs in
//! each, RESFD signalled once per completion, the notification descriptor, and more contexts
//! than MSI-X vectors.
//!
//! Written against `ContextOptions::mode` (a [`CompletionMode`]) and
//! `Context::notification_fd() -> Option<RawFd>` (Some in interrupt and hybrid mode).
//!
//! The idle-wait cases measure CPU time, not wall time: `getrusage(RUSAGE_THREAD)` around a 2 s
//! `io_getevents` that can only time out. They are not timing tests: the thresholds (under 1 %
//! sleeping, over 25 % spinning) are far apart, and the wall time only has to be about right.

use crate::SubmitForTests;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use nvaio::wait::CompletionMode;
use nvaio::{Access, Context, ContextOptions, IoEvent, Iocb};

use crate::cases::{block_size, readable, run_cases, wait_events};
use crate::cases::{Case, CaseResult, Target};
use crate::irq_cases::thread_cpu;

use CompletionMode::{Hybrid, Interrupt, Polled};

/// Every case, in the order they run.
pub fn all() -> Vec<Case> {
    vec![
        Case { name: "modes/polled/write_read", run: |t| write_read(t, Polled) },
        Case { name: "modes/interrupt/write_read", run: |t| write_read(t, Interrupt) },
        Case { name: "modes/hybrid/write_read", run: |t| write_read(t, Hybrid) },
        Case { name: "modes/interrupt/idle_wait_sleeps", run: |t| idle_sleeps(t, Interrupt) },
        Case { name: "modes/hybrid/idle_wait_sleeps", run: |t| idle_sleeps(t, Hybrid) },
        Case { name: "modes/polled/idle_wait_spins", run: idle_spins },
        Case { name: "modes/interrupt/resfd_once_per_completion", run: |t| resfd(t, Interrupt) },
        Case { name: "modes/hybrid/resfd_once_per_completion", run: |t| resfd(t, Hybrid) },
        Case { name: "modes/polled/no_notification_fd", run: no_notification_fd },
        Case { name: "modes/interrupt/notification_fd", run: |t| notification_fd(t, Interrupt) },
        Case { name: "modes/hybrid/notification_fd", run: |t| notification_fd(t, Hybrid) },
        Case {
            name: "modes/interrupt/notification_fd_sees_submit_time_events",
            run: submit_time_event,
        },
        Case { name: "modes/interrupt/contexts_in_threads", run: |t| threads(t, Interrupt) },
        Case { name: "modes/hybrid/contexts_in_threads", run: |t| threads(t, Hybrid) },
    ]
}

/// Runs every case of [`all`], printing one line each; returns (passed, failed).
pub fn run_all(prefix: &str, t: &Target, filter: Option<&str>) -> (usize, usize) {
    run_cases(all(), prefix, t, filter)
}

macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// How long the idle-wait cases wait.
const IDLE_WAIT: Duration = Duration::from_secs(2);

/// A page-aligned heap buffer.
struct Buf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl Buf {
    fn new(len: usize) -> Buf {
        let raw = vec![0u8; len + 4096];
        let off = (4096 - raw.as_ptr() as usize % 4096) % 4096;
        Buf { raw, off, len }
    }
    fn ptr(&mut self) -> *mut u8 {
        self.raw[self.off..].as_mut_ptr()
    }
    fn bytes(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }
    fn fill(&mut self, seed: u64) {
        let mut x = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
        for b in &mut self.raw[self.off..self.off + self.len] {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            *b = (x >> 32) as u8;
        }
    }
}

/// An nvaio descriptor, closed on drop.
struct Fd(RawFd);

impl Fd {
    fn open(t: &Target) -> Result<Fd, String> {
        nvaio::open_on(t.ctrl.clone(), 1, Access::ReadWrite)
            .map(Fd)
            .map_err(|e| format!("open nsid 1: {e}"))
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        let _ = nvaio::close(self.0);
    }
}

fn context(mode: CompletionMode, nr: u32) -> Result<Context, String> {
    let opts = ContextOptions { mode, ..ContextOptions::default() };
    Context::with_options(nr, opts).map_err(|e| format!("io_setup ({mode}): {e}"))
}

fn submit_all(ctx: &mut Context, iocbs: &[Iocb]) -> Result<(), String> {
    let refs: Vec<&Iocb> = iocbs.iter().collect();
    let n = ctx.submit_io(&refs).map_err(|e| format!("io_submit: {e}"))?;
    check!(n == iocbs.len(), "io_submit queued {n} of {}", iocbs.len());
    Ok(())
}

/// Writes then reads back single requests of several sizes, then 32 at once.
fn write_read(t: &Target, mode: CompletionMode) -> CaseResult {
    let bs = block_size(t, 1)? as usize;
    let mdts = t.ctrl.max_transfer();
    let fd = Fd::open(t)?;
    let mut ctx = context(mode, 64)?;
    let base = match mode {
        Polled => 32u64 << 20,
        Interrupt => 40 << 20,
        Hybrid => 48 << 20,
    };
    let mut pos = base;
    for (i, len) in [bs, 4096, 3 * bs, mdts, 3 * mdts + 2 * bs].into_iter().enumerate() {
        let mut w = Buf::new(len);
        w.fill(i as u64 + 17);
        submit_all(&mut ctx, &[Iocb::pwrite(fd.0, w.ptr(), len, pos as i64)])?;
        let ev = wait_events(&mut ctx, 1)?;
        check!(ev[0].res == len as i64, "write of {len} at {pos}: res {}", ev[0].res);
        let mut r = Buf::new(len);
        submit_all(&mut ctx, &[Iocb::pread(fd.0, r.ptr(), len, pos as i64)])?;
        let ev = wait_events(&mut ctx, 1)?;
        check!(ev[0].res == len as i64, "read of {len} at {pos}: res {}", ev[0].res);
        check!(r.bytes() == w.bytes(), "read of {len} at {pos} differs from what was written");
        pos += len.next_multiple_of(4096) as u64;
    }
    // 32 in flight at once.
    let count = 32;
    let mut ws: Vec<Buf> = (0..count).map(|_| Buf::new(4096)).collect();
    for (i, w) in ws.iter_mut().enumerate() {
        w.fill(1000 + i as u64);
    }
    let iocbs: Vec<Iocb> = ws
        .iter_mut()
        .enumerate()
        .map(|(i, w)| Iocb::pwrite(fd.0, w.ptr(), 4096, (pos + i as u64 * 4096) as i64))
        .collect();
    submit_all(&mut ctx, &iocbs)?;
    for ev in wait_events(&mut ctx, count)? {
        check!(ev.res == 4096, "batched write: res {}", ev.res);
    }
    let mut rs: Vec<Buf> = (0..count).map(|_| Buf::new(4096)).collect();
    let iocbs: Vec<Iocb> = rs
        .iter_mut()
        .enumerate()
        .map(|(i, r)| {
            Iocb::pread(fd.0, r.ptr(), 4096, (pos + i as u64 * 4096) as i64).with_data(i as u64)
        })
        .collect();
    submit_all(&mut ctx, &iocbs)?;
    for ev in wait_events(&mut ctx, count)? {
        check!(ev.res == 4096, "batched read {}: res {}", ev.data, ev.res);
    }
    for i in 0..count {
        check!(rs[i].bytes() == ws[i].bytes(), "batched block {i} read back wrong");
    }
    Ok(())
}

/// A context that has done I/O (so it has its queue) and now waits `IDLE_WAIT` in
/// io_getevents with nothing in flight. Returns the CPU time and wall time of the wait.
fn idle_wait(t: &Target, mode: CompletionMode) -> Result<(Duration, Duration), String> {
    let fd = Fd::open(t)?;
    let mut ctx = context(mode, 8)?;
    let mut b = Buf::new(4096);
    submit_all(&mut ctx, &[Iocb::pread(fd.0, b.ptr(), 4096, 0)])?;
    wait_events(&mut ctx, 1)?;
    check!(ctx.in_flight() == 0, "{} requests still in flight", ctx.in_flight());
    let mut out = [IoEvent::default(); 1];
    let cpu0 = thread_cpu();
    let start = Instant::now();
    let n =
        ctx.get_events(1, &mut out, Some(IDLE_WAIT)).map_err(|e| format!("io_getevents: {e}"))?;
    let wall = start.elapsed();
    let cpu = thread_cpu() - cpu0;
    check!(n == 0, "an idle context returned {n} events");
    check!(wall >= IDLE_WAIT - Duration::from_millis(50), "returned after {wall:?}");
    println!("     {mode}: idle io_getevents of {wall:?} used {cpu:?} of CPU");
    Ok((cpu, wall))
}

/// Interrupt and hybrid mode sleep in the kernel: under 1 % of a CPU.
fn idle_sleeps(t: &Target, mode: CompletionMode) -> CaseResult {
    let (cpu, wall) = idle_wait(t, mode)?;
    check!(cpu < wall / 100, "{mode}: {cpu:?} of CPU in {wall:?} of idle waiting (limit 1 %)");
    Ok(())
}

/// Polled mode spins: a whole CPU where it has one to itself. The bound is a quarter, because a
/// spinner on a busy host (CI machines run builds beside the tests) gets only its share of a
/// CPU; sleeping, by contrast, costs well under 1 % whatever the load.
fn idle_spins(t: &Target) -> CaseResult {
    let (cpu, wall) = idle_wait(t, Polled)?;
    check!(cpu > wall / 4, "polled: only {cpu:?} of CPU in {wall:?} of waiting (expected > 25 %)");
    Ok(())
}

fn read_eventfd(efd: RawFd) -> u64 {
    let mut count = 0u64;
    // SAFETY: reads at most 8 bytes into a local from our own non-blocking eventfd.
    let r = unsafe { libc::read(efd, (&mut count as *mut u64).cast(), 8) };
    if r == 8 {
        count
    } else {
        0
    }
}

/// Each completion signals its RESFD eventfd exactly once, and nothing signals it later.
fn resfd(t: &Target, mode: CompletionMode) -> CaseResult {
    let fd = Fd::open(t)?;
    let mut ctx = context(mode, 64)?;
    // SAFETY: plain eventfd creation; checked below.
    let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    check!(efd >= 0, "eventfd failed");
    let result = (|| {
        let count = 48;
        let mut bufs: Vec<Buf> = (0..count).map(|_| Buf::new(4096)).collect();
        let mut signalled = 0u64;
        for round in 0..3 {
            let iocbs: Vec<Iocb> = bufs
                .iter_mut()
                .enumerate()
                .map(|(i, b)| {
                    Iocb::pread(fd.0, b.ptr(), 4096, ((round * count + i) * 4096) as i64)
                        .with_eventfd(efd)
                })
                .collect();
            submit_all(&mut ctx, &iocbs)?;
            wait_events(&mut ctx, count)?;
            signalled += read_eventfd(efd);
        }
        std::thread::sleep(Duration::from_millis(50));
        signalled += read_eventfd(efd);
        check!(signalled == 3 * count as u64, "RESFD counted {signalled}, expected {}", 3 * count);
        Ok(())
    })();
    // SAFETY: closing our own eventfd.
    unsafe { libc::close(efd) };
    result
}

fn no_notification_fd(_t: &Target) -> CaseResult {
    let ctx = context(Polled, 8)?;
    check!(ctx.notification_fd().is_none(), "a polled context has a notification fd");
    Ok(())
}

/// The notification fd becomes readable when I/O completes, in poll(2) and in the
/// application's own epoll set, and stops being readable once io_getevents has run.
fn notification_fd(t: &Target, mode: CompletionMode) -> CaseResult {
    let fd = Fd::open(t)?;
    let mut ctx = context(mode, 16)?;
    let nfd = ctx.notification_fd().ok_or("no notification fd in an interrupt mode")?;
    check!(!readable(nfd, 0), "readable before any I/O");
    let mut b = Buf::new(4096);
    // poll(2). On a shared vector the fd may also fire for another queue's interrupt (a
    // spurious wake-up: io_getevents then finds nothing), so wait until the event is in hand.
    submit_all(&mut ctx, &[Iocb::pread(fd.0, b.ptr(), 4096, 8192)])?;
    let mut out = [IoEvent::default(); 4];
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut n = 0;
    while n == 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        check!(!left.is_zero(), "no event within 5 s of submitting a read");
        if !readable(nfd, left.as_millis().max(1) as i32) {
            continue;
        }
        n = ctx.get_events(0, &mut out, Some(Duration::ZERO)).map_err(|e| e.to_string())?;
    }
    check!(n == 1, "io_getevents after the fd fired returned {n} events");
    check!(out[0].res == 4096, "read res {}", out[0].res);
    // Once io_getevents has drained it, the fd is quiet again (a spurious wake-up from a shared
    // vector may still slip in between: allow a few rounds).
    let mut quiet = false;
    for _ in 0..5 {
        ctx.get_events(0, &mut out, Some(Duration::ZERO)).map_err(|e| e.to_string())?;
        if !readable(nfd, 20) {
            quiet = true;
            break;
        }
    }
    check!(quiet, "still readable after io_getevents reaped everything");
    // epoll(7), as an event loop would use it.
    // SAFETY: plain epoll creation; checked below.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    check!(ep >= 0, "epoll_create1 failed");
    let result = (|| {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: 7 };
        // SAFETY: valid epoll fd, descriptor and event.
        let r = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, nfd, &mut ev) };
        check!(r == 0, "epoll_ctl: {}", std::io::Error::last_os_error());
        let iocbs: Vec<Iocb> = (0..4).map(|i| Iocb::pread(fd.0, b.ptr(), 4096, i * 4096)).collect();
        submit_all(&mut ctx, &iocbs)?;
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while got < 4 && Instant::now() < deadline {
            let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 2];
            // SAFETY: valid epoll fd and event array of the given length.
            let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 2, 5000) };
            check!(n >= 0, "epoll_wait: {}", std::io::Error::last_os_error());
            check!(n > 0, "epoll_wait timed out with {got} of 4 events reaped");
            let tok = evs[0].u64;
            check!(tok == 7, "epoll returned token {tok}");
            got += ctx.get_events(0, &mut out, Some(Duration::ZERO)).map_err(|e| e.to_string())?;
        }
        check!(got == 4, "{got} of 4 events through epoll");
        Ok(())
    })();
    // SAFETY: closing our own epoll fd.
    unsafe { libc::close(ep) };
    result
}

/// One context per thread, more contexts than MSI-X vectors when the device has few: every
/// queue completes, whatever vector it shares.
fn threads(t: &Target, mode: CompletionMode) -> CaseResult {
    let contexts = usize::from(t.ctrl.io_queues_granted()).min(8);
    let results: Vec<CaseResult> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..contexts)
            .map(|k| {
                s.spawn(move || -> CaseResult {
                    let fd = Fd::open(t)?;
                    let mut ctx = context(mode, 16)?;
                    let base = (56u64 << 20) + (k as u64) * (1 << 20);
                    for i in 0..40u64 {
                        let off = base + i * 4096;
                        let mut w = Buf::new(4096);
                        w.fill(k as u64 * 1000 + i);
                        submit_all(&mut ctx, &[Iocb::pwrite(fd.0, w.ptr(), 4096, off as i64)])?;
                        let ev = wait_events(&mut ctx, 1)?;
                        check!(ev[0].res == 4096, "context {k}: write res {}", ev[0].res);
                        let mut r = Buf::new(4096);
                        submit_all(&mut ctx, &[Iocb::pread(fd.0, r.ptr(), 4096, off as i64)])?;
                        let ev = wait_events(&mut ctx, 1)?;
                        check!(ev[0].res == 4096, "context {k}: read res {}", ev[0].res);
                        check!(r.bytes() == w.bytes(), "context {k}: block {i} read back wrong");
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(Err("panicked".into()))).collect()
    });
    for (k, r) in results.into_iter().enumerate() {
        r.map_err(|e| format!("context {k} of {contexts}: {e}"))?;
    }
    Ok(())
}

/// An event completed inside io_submit (here a read of a length that is not a multiple of the
/// block size: -EINVAL as an event, no command reaches the device) must make the notification
/// fd readable too, or an event loop waiting on it would never learn of it.
fn submit_time_event(t: &Target) -> CaseResult {
    let bs = block_size(t, 1)? as usize;
    let fd = Fd::open(t)?;
    let mut ctx = context(Interrupt, 16)?;
    let nfd = ctx.notification_fd().ok_or("no notification fd in interrupt mode")?;
    let mut b = Buf::new(4096);
    // A valid read first, so the context has its queue, then a bad one.
    submit_all(&mut ctx, &[Iocb::pread(fd.0, b.ptr(), bs, 0)])?;
    wait_events(&mut ctx, 1)?;
    let mut out = [IoEvent::default(); 2];
    ctx.get_events(0, &mut out, Some(Duration::ZERO)).map_err(|e| e.to_string())?;
    submit_all(&mut ctx, &[Iocb::pread(fd.0, b.ptr(), bs - 1, 0)])?;
    check!(readable(nfd, 2000), "an event completed at submission left the fd unreadable");
    let n = ctx.get_events(1, &mut out, Some(Duration::from_secs(1))).map_err(|e| e.to_string())?;
    check!(n == 1, "{n} events");
    check!(out[0].res == -i64::from(libc::EINVAL), "res {}", out[0].res);
    Ok(())
}
