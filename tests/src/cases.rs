//! Test cases that run the whole stack (AIO context, driver, device) against any controller:
//! QEMU's emulated NVMe through VFIO in the guest, and nvaio's in-process emulated controller on
//! the host. Each case returns `Err(reason)` on the first wrong value it sees.

use crate::SubmitForTests;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use nvaio::{Access, Context, ContextOptions, IoEvent, Iocb};
use nvaio_nvme::Controller;

pub type CaseResult = Result<(), String>;

/// What a case gets: a running controller and what the environment promises about it.
pub struct Target {
    pub ctrl: Arc<Controller>,
    /// Expected logical block size of namespace 1, if known.
    pub expect_lba: Option<u32>,
    /// Expected namespace count, if known.
    pub expect_namespaces: Option<usize>,
    /// Expected size of each namespace in bytes, if known.
    pub expect_size: Option<u64>,
    /// Expected serial number, if known.
    pub expect_serial: Option<String>,
}

impl Target {
    /// A target with nothing known in advance about the controller.
    pub fn new(ctrl: Arc<Controller>) -> Target {
        Target {
            ctrl,
            expect_lba: None,
            expect_namespaces: None,
            expect_size: None,
            expect_serial: None,
        }
    }
}

/// Whether `fd` becomes readable within `ms` milliseconds.
pub fn readable(fd: RawFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    r == 1 && pfd.revents & libc::POLLIN != 0
}

pub struct Case {
    pub name: &'static str,
    pub run: fn(&Target) -> CaseResult,
}

/// Every case, in the order they run.
pub fn all() -> Vec<Case> {
    vec![
        Case { name: "identify", run: identify },
        Case { name: "write_read_sizes_aligned", run: |t| write_read_sizes(t, 0) },
        Case { name: "write_read_sizes_unaligned_4", run: |t| write_read_sizes(t, 4) },
        Case { name: "write_read_sizes_unaligned_1000", run: |t| write_read_sizes(t, 1000) },
        Case { name: "byte_misaligned_buffer_is_einval", run: byte_misaligned },
        Case { name: "phase_wrap_many_ios", run: phase_wrap },
        Case { name: "vectored_io", run: vectored },
        Case { name: "fsync_and_fdsync", run: fsync },
        Case { name: "end_of_namespace", run: end_of_namespace },
        Case { name: "misaligned_is_einval_event", run: misaligned },
        Case { name: "bad_descriptor_and_access_mode", run: access_modes },
        Case { name: "context_full_is_eagain", run: context_full },
        Case { name: "namespaces_are_isolated", run: namespaces_isolated },
        Case { name: "resfd_signalled_per_completion", run: resfd },
    ]
}

macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// A heap buffer with a chosen misalignment from a 4 KiB boundary.
struct Buf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl Buf {
    fn new(len: usize, misalign: usize) -> Buf {
        let raw = vec![0u8; len + 8192 + misalign];
        let base = raw.as_ptr() as usize;
        let off = (4096 - base % 4096) % 4096 + misalign;
        Buf { raw, off, len }
    }
    fn ptr(&mut self) -> *mut u8 {
        self.raw[self.off..].as_mut_ptr()
    }
    fn bytes(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

/// Deterministic bytes for (seed, position), so any block tells where it came from.
pub fn pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

fn open(t: &Target, nsid: u32, access: Access) -> Result<RawFd, String> {
    nvaio::open_on(t.ctrl.clone(), nsid, access).map_err(|e| format!("open nsid {nsid}: {e}"))
}

struct Fd(RawFd);
impl Drop for Fd {
    fn drop(&mut self) {
        let _ = nvaio::close(self.0);
    }
}

/// Submits one iocb and waits (bounded) for its event.
fn run_one(ctx: &mut Context, iocb: &Iocb) -> Result<IoEvent, String> {
    let n = ctx.submit_io(&[iocb]).map_err(|e| format!("io_submit: {e}"))?;
    check!(n == 1, "io_submit queued {n}, expected 1");
    wait_events(ctx, 1).map(|v| v[0])
}

/// Waits (60 s at most, 5 s per io_getevents) for `n` events.
pub fn wait_events(ctx: &mut Context, n: usize) -> Result<Vec<IoEvent>, String> {
    let mut out = vec![IoEvent::default(); n];
    let mut got = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while got < n {
        got += ctx
            .get_events(1, &mut out[got..], Some(Duration::from_secs(5)))
            .map_err(|e| format!("io_getevents: {e}"))?;
        check!(std::time::Instant::now() < deadline, "only {got} of {n} events within 60 s");
    }
    Ok(out)
}

/// The block size of namespace `nsid`.
pub fn block_size(t: &Target, nsid: u32) -> Result<u32, String> {
    t.ctrl.namespace(nsid).map(|n| n.block_size).ok_or(format!("no namespace {nsid}"))
}

fn identify(t: &Target) -> CaseResult {
    let id = t.ctrl.identify();
    check!(!id.model.is_empty(), "empty model number");
    if let Some(serial) = &t.expect_serial {
        check!(&id.serial == serial, "serial {:?}, expected {serial:?}", id.serial);
    }
    let nss = t.ctrl.namespaces();
    check!(!nss.is_empty(), "no namespaces");
    if let Some(n) = t.expect_namespaces {
        check!(nss.len() == n, "{} namespaces, expected {n}", nss.len());
    }
    for ns in nss {
        if let Some(lba) = t.expect_lba {
            check!(
                ns.block_size == lba,
                "nsid {} block size {}, expected {lba}",
                ns.nsid,
                ns.block_size
            );
        }
        if let Some(size) = t.expect_size {
            check!(
                ns.size_bytes() == size,
                "nsid {} is {} bytes, expected {size}",
                ns.nsid,
                ns.size_bytes()
            );
        }
    }
    check!(t.ctrl.max_transfer() >= 4096, "max transfer {}", t.ctrl.max_transfer());
    check!(t.ctrl.io_queues_granted() >= 1, "no I/O queues granted");
    Ok(())
}

/// Writes then reads back transfers from one block to several times the max transfer size.
fn write_read_sizes(t: &Target, misalign: usize) -> CaseResult {
    let bs = block_size(t, 1)? as usize;
    let mdts = t.ctrl.max_transfer();
    let fd = Fd(open(t, 1, Access::ReadWrite)?);
    let mut ctx = Context::setup(64).map_err(|e| e.to_string())?;
    let sizes = [bs, 3 * bs, 4096, mdts, mdts + bs, 3 * mdts + 2 * bs];
    let mut pos = 0u64;
    for (i, &len) in sizes.iter().enumerate() {
        let mut w = Buf::new(len, misalign);
        pattern(w.bytes_mut(), (misalign * 100 + i) as u64);
        let ev = run_one(&mut ctx, &Iocb::pwrite(fd.0, w.ptr(), len, pos as i64).with_data(7))?;
        check!(ev.res == len as i64, "write of {len} at {pos}: res {}", ev.res);
        check!(ev.data == 7, "write event data {}", ev.data);
        let mut r = Buf::new(len, misalign);
        let iocb = Iocb::pread(fd.0, r.ptr(), len, pos as i64).with_data(8);
        let ev = run_one(&mut ctx, &iocb)?;
        check!(ev.res == len as i64, "read of {len} at {pos}: res {}", ev.res);
        check!(ev.obj == &iocb as *const Iocb as u64, "event obj is not the iocb's address");
        if let Some(at) = r.bytes().iter().zip(w.bytes()).position(|(a, b)| a != b) {
            return Err(format!(
                "read of {len} at {pos} (misalign {misalign}) differs at byte {at}"
            ));
        }
        pos += len as u64;
    }
    Ok(())
}

/// Many more I/Os than the queue has entries, with several in flight: the CQ phase wraps.
fn phase_wrap(t: &Target) -> CaseResult {
    let bs = block_size(t, 1)? as usize;
    let fd = Fd(open(t, 1, Access::ReadWrite)?);
    let opts = ContextOptions { queue_entries: Some(8), ..Default::default() };
    let mut ctx = Context::with_options(32, opts).map_err(|e| e.to_string())?;
    let count = 200usize;
    let base = 1u64 << 20;
    let mut bufs: Vec<Buf> = (0..count).map(|_| Buf::new(bs, 0)).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        pattern(b.bytes_mut(), 5000 + i as u64);
    }
    // Write in batches of 16 (more than the queue's 7 usable slots: the rest waits in order).
    for batch in (0..count).collect::<Vec<_>>().chunks(16) {
        let iocbs: Vec<Iocb> = batch
            .iter()
            .map(|&i| {
                Iocb::pwrite(fd.0, bufs[i].ptr(), bs, (base + (i * bs) as u64) as i64)
                    .with_data(i as u64)
            })
            .collect();
        let refs: Vec<&Iocb> = iocbs.iter().collect();
        let n = ctx.submit_io(&refs).map_err(|e| format!("io_submit: {e}"))?;
        check!(n == batch.len(), "queued {n} of {}", batch.len());
        for ev in wait_events(&mut ctx, n)? {
            check!(ev.res == bs as i64, "write {} res {}", ev.data, ev.res);
        }
    }
    for batch in (0..count).collect::<Vec<_>>().chunks(16) {
        let mut reads: Vec<Buf> = batch.iter().map(|_| Buf::new(bs, 0)).collect();
        let iocbs: Vec<Iocb> = batch
            .iter()
            .zip(reads.iter_mut())
            .map(|(&i, r)| {
                Iocb::pread(fd.0, r.ptr(), bs, (base + (i * bs) as u64) as i64).with_data(i as u64)
            })
            .collect();
        let refs: Vec<&Iocb> = iocbs.iter().collect();
        let n = ctx.submit_io(&refs).map_err(|e| format!("io_submit: {e}"))?;
        check!(n == batch.len(), "queued {n} of {}", batch.len());
        for ev in wait_events(&mut ctx, n)? {
            check!(ev.res == bs as i64, "read {} res {}", ev.data, ev.res);
        }
        for (k, &i) in batch.iter().enumerate() {
            check!(reads[k].bytes() == bufs[i].bytes(), "block {i} read back wrong");
        }
    }
    let stats = ctx.queue_stats();
    check!(stats.len() == 1, "{} queues", stats.len());
    check!(stats[0].completed >= 2 * count as u64, "only {} completions", stats[0].completed);
    check!(stats[0].bogus_cids == 0, "{} bogus CIDs", stats[0].bogus_cids);
    // Batches of 16 on a queue with 7 usable slots: requests had to wait, and were counted.
    check!(ctx.stats().waits > 0, "no request counted as waiting for a queue slot");
    Ok(())
}

fn vectored(t: &Target) -> CaseResult {
    let bs = block_size(t, 1)? as usize;
    let fd = Fd(open(t, 1, Access::ReadWrite)?);
    let mut ctx = Context::setup(8).map_err(|e| e.to_string())?;
    // Pieces of whole blocks (the kernel's direct I/O requires each piece to be), at buffers
    // that are dword- but not page-aligned.
    let lens = [bs, 2 * bs, 4 * bs, bs];
    let total: usize = lens.iter().sum();
    let mut ws: Vec<Buf> = lens.iter().map(|&l| Buf::new(l, 12)).collect();
    for (i, w) in ws.iter_mut().enumerate() {
        pattern(w.bytes_mut(), 900 + i as u64);
    }
    let wv: Vec<libc::iovec> =
        ws.iter_mut().map(|w| libc::iovec { iov_base: w.ptr().cast(), iov_len: w.len }).collect();
    let pos = 3u64 << 20;
    let ev = run_one(&mut ctx, &Iocb::pwritev(fd.0, wv.as_ptr(), wv.len(), pos as i64))?;
    check!(ev.res == total as i64, "pwritev res {}, expected {total}", ev.res);
    // Read it back as one flat buffer, then vectored with different cuts.
    let mut flat = Buf::new(total, 0);
    let ev = run_one(&mut ctx, &Iocb::pread(fd.0, flat.ptr(), total, pos as i64))?;
    check!(ev.res == total as i64, "pread res {}", ev.res);
    let expect: Vec<u8> = ws.iter().flat_map(|w| w.bytes().to_vec()).collect();
    check!(flat.bytes() == &expect[..], "pwritev data read back wrong");
    let cuts = [5 * bs, 3 * bs];
    let mut rs: Vec<Buf> = cuts.iter().map(|&l| Buf::new(l, 0)).collect();
    let rv: Vec<libc::iovec> =
        rs.iter_mut().map(|r| libc::iovec { iov_base: r.ptr().cast(), iov_len: r.len }).collect();
    let ev = run_one(&mut ctx, &Iocb::preadv(fd.0, rv.as_ptr(), rv.len(), pos as i64))?;
    check!(ev.res == total as i64, "preadv res {}", ev.res);
    let got: Vec<u8> = rs.iter().flat_map(|r| r.bytes().to_vec()).collect();
    check!(got == expect, "preadv data wrong");
    Ok(())
}

fn fsync(t: &Target) -> CaseResult {
    let fd = Fd(open(t, 1, Access::ReadWrite)?);
    let mut ctx = Context::setup(4).map_err(|e| e.to_string())?;
    let ev = run_one(&mut ctx, &Iocb::fsync(fd.0).with_data(11))?;
    check!(ev.res == 0 && ev.data == 11, "fsync event {ev:?}");
    let ev = run_one(&mut ctx, &Iocb::fdsync(fd.0).with_data(12))?;
    check!(ev.res == 0 && ev.data == 12, "fdsync event {ev:?}");
    Ok(())
}

fn end_of_namespace(t: &Target) -> CaseResult {
    let bs = block_size(t, 1)? as usize;
    let size = t.ctrl.namespace(1).map(|n| n.size_bytes()).unwrap_or(0);
    let fd = Fd(open(t, 1, Access::ReadWrite)?);
    let mut ctx = Context::setup(4).map_err(|e| e.to_string())?;
    let mut b = Buf::new(4 * bs, 0);
    pattern(b.bytes_mut(), 77);
    // A write straddling the end is cut short at the end, as on a block device.
    let at = size - 2 * bs as u64;
    let ev = run_one(&mut ctx, &Iocb::pwrite(fd.0, b.ptr(), 4 * bs, at as i64))?;
    check!(ev.res == 2 * bs as i64, "write over the end: res {}", ev.res);
    let mut r = Buf::new(4 * bs, 0);
    let ev = run_one(&mut ctx, &Iocb::pread(fd.0, r.ptr(), 4 * bs, at as i64))?;
    check!(ev.res == 2 * bs as i64, "read over the end: res {}", ev.res);
    check!(r.bytes()[..2 * bs] == b.bytes()[..2 * bs], "data at the end read back wrong");
    let ev = run_one(&mut ctx, &Iocb::pread(fd.0, r.ptr(), bs, size as i64))?;
    check!(ev.res == 0, "read at the end: res {}", ev.res);
    let ev = run_one(&mut ctx, &Iocb::pwrite(fd.0, b.ptr(), bs, size as i64))?;
    check!(ev.res == -(libc::ENOSPC as i64), "write at the end: res {}", ev.res);
    let ev = run_one(&mut ctx, &Iocb::pread(fd.0, r.ptr(), 0, 0))?;
    check!(ev.res == 0, "zero-length read: res {}", ev.res);
    Ok(())
}

fn misaligned(t: &Target) -> CaseResult {
    let bs = block_size(t, 1)? as usize;
    let fd = Fd(open(t, 1, Access::ReadWrite)?);
    let mut ctx = Context::setup(4).map_err(|e| e.to_string())?;
    let mut b = Buf::new(2 * bs, 0);
    let ev = run_one(&mut ctx, &Iocb::pread(fd.0, b.ptr(), bs, 1))?;
    check!(ev.res == -(libc::EINVAL as i64), "offset 1: res {}", ev.res);
    let ev = run_one(&mut ctx, &Iocb::pread(fd.0, b.ptr(), bs + 1, 0))?;
    check!(ev.res == -(libc::EINVAL as i64), "length bs+1: res {}", ev.res);
    Ok(())
}

fn access_modes(t: &Target) -> CaseResult {
    let bs = block_size(t, 1)? as usize;
    let mut ctx = Context::setup(4).map_err(|e| e.to_string())?;
    let mut b = Buf::new(bs, 0);
    // A descriptor nvaio does not own.
    let err = ctx.submit_io(&[&Iocb::pread(9999, b.ptr(), bs, 0)]);
    check!(err == Err(nvaio::Errno(libc::EBADF)), "unknown fd: {err:?}");
    let ro = Fd(open(t, 1, Access::ReadOnly)?);
    let err = ctx.submit_io(&[&Iocb::pwrite(ro.0, b.ptr(), bs, 0)]);
    check!(err == Err(nvaio::Errno(libc::EBADF)), "write on read-only fd: {err:?}");
    let ev = run_one(&mut ctx, &Iocb::pread(ro.0, b.ptr(), bs, 0))?;
    check!(ev.res == bs as i64, "read on read-only fd: res {}", ev.res);
    let wo = Fd(open(t, 1, Access::WriteOnly)?);
    let err = ctx.submit_io(&[&Iocb::pread(wo.0, b.ptr(), bs, 0)]);
    check!(err == Err(nvaio::Errno(libc::EBADF)), "read on write-only fd: {err:?}");
    let bad = Iocb { aio_lio_opcode: 42, aio_fildes: ro.0 as u32, ..Default::default() };
    check!(ctx.submit_io(&[&bad]) == Err(nvaio::Errno(libc::EINVAL)), "unknown opcode accepted");
    let reserved = Iocb { aio_reserved2: 1, ..Iocb::pread(ro.0, b.ptr(), bs, 0) };
    check!(
        ctx.submit_io(&[&reserved]) == Err(nvaio::Errno(libc::EINVAL)),
        "reserved field accepted"
    );
    // A good iocb followed by a bad one: the count of those queued is returned.
    let good = Iocb::pread(ro.0, b.ptr(), bs, 0);
    let n = ctx.submit_io(&[&good, &bad]);
    check!(n == Ok(1), "good+bad batch returned {n:?}");
    let ev = wait_events(&mut ctx, 1)?;
    check!(ev[0].res == bs as i64, "batched read res {}", ev[0].res);
    Ok(())
}

fn context_full(t: &Target) -> CaseResult {
    let bs = block_size(t, 1)? as usize;
    let fd = Fd(open(t, 1, Access::ReadWrite)?);
    let mut ctx = Context::setup(4).map_err(|e| e.to_string())?;
    let mut b = Buf::new(bs, 0);
    let iocbs: Vec<Iocb> =
        (0..1000).map(|i| Iocb::pread(fd.0, b.ptr(), bs, (i * bs) as i64)).collect();
    // As with the kernel, io_setup(4) holds more than 4 (the ring is sized for at least twice
    // that); keep submitting until the context says EAGAIN.
    let mut queued = 0;
    let err = loop {
        match ctx.submit_io(&[&iocbs[queued]]) {
            Ok(1) => queued += 1,
            Ok(n) => return Err(format!("io_submit of one returned {n}")),
            Err(e) => break e,
        }
        check!(queued < 1000, "a context of 4 took 1000 requests");
    };
    check!(err == nvaio::Errno(libc::EAGAIN), "a full context gave {err:?}");
    check!(queued >= 4, "a context of 4 queued only {queued}");
    let evs = wait_events(&mut ctx, queued)?;
    check!(evs.iter().all(|e| e.res == bs as i64), "events {evs:?}");
    let n = ctx.submit_io(&[&iocbs[0]]).map_err(|e| e.to_string())?;
    check!(n == 1, "after reaping, queued {n}");
    wait_events(&mut ctx, 1)?;
    let mut none = [IoEvent::default(); 2];
    let got = ctx.get_events(0, &mut none, Some(Duration::ZERO)).map_err(|e| e.to_string())?;
    check!(got == 0, "{got} stray events");
    check!(
        ctx.get_events(3, &mut none, None) == Err(nvaio::Errno(libc::EINVAL)),
        "min_nr > nr accepted"
    );
    Ok(())
}

/// A buffer that is not dword aligned: the kernel's direct I/O refuses it with an -EINVAL event.
fn byte_misaligned(t: &Target) -> CaseResult {
    let bs = block_size(t, 1)? as usize;
    let fd = Fd(open(t, 1, Access::ReadWrite)?);
    let mut ctx = Context::setup(4).map_err(|e| e.to_string())?;
    let mut b = Buf::new(bs, 4093);
    let ev = run_one(&mut ctx, &Iocb::pwrite(fd.0, b.ptr(), bs, 0))?;
    check!(ev.res == -(libc::EINVAL as i64), "write from an odd address: res {}", ev.res);
    let ev = run_one(&mut ctx, &Iocb::pread(fd.0, b.ptr(), bs, 0))?;
    check!(ev.res == -(libc::EINVAL as i64), "read to an odd address: res {}", ev.res);
    Ok(())
}

fn namespaces_isolated(t: &Target) -> CaseResult {
    let nss: Vec<u32> = t.ctrl.namespaces().iter().map(|n| n.nsid).collect();
    if nss.len() < 2 {
        return Ok(());
    }
    let mut ctx = Context::setup(8).map_err(|e| e.to_string())?;
    let fds: Vec<Fd> =
        nss.iter().map(|&n| open(t, n, Access::ReadWrite).map(Fd)).collect::<Result<_, _>>()?;
    let mut written = Vec::new();
    for (i, fd) in fds.iter().enumerate() {
        let bs = block_size(t, nss[i])? as usize;
        let mut w = Buf::new(bs, 0);
        pattern(w.bytes_mut(), 31337 + i as u64);
        let ev = run_one(&mut ctx, &Iocb::pwrite(fd.0, w.ptr(), bs, 0))?;
        check!(ev.res == bs as i64, "write to nsid {}: {}", nss[i], ev.res);
        written.push(w);
    }
    for (i, fd) in fds.iter().enumerate() {
        let bs = block_size(t, nss[i])? as usize;
        let mut r = Buf::new(bs, 0);
        let ev = run_one(&mut ctx, &Iocb::pread(fd.0, r.ptr(), bs, 0))?;
        check!(ev.res == bs as i64, "read from nsid {}: {}", nss[i], ev.res);
        check!(r.bytes() == written[i].bytes(), "nsid {} holds another namespace's data", nss[i]);
    }
    Ok(())
}

fn resfd(t: &Target) -> CaseResult {
    let bs = block_size(t, 1)? as usize;
    let fd = Fd(open(t, 1, Access::ReadWrite)?);
    let mut ctx = Context::setup(16).map_err(|e| e.to_string())?;
    // SAFETY: plain eventfd creation; checked below.
    let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    check!(efd >= 0, "eventfd failed");
    let mut bufs: Vec<Buf> = (0..10).map(|_| Buf::new(bs, 0)).collect();
    let iocbs: Vec<Iocb> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| Iocb::pread(fd.0, b.ptr(), bs, (i * bs) as i64).with_eventfd(efd))
        .collect();
    let refs: Vec<&Iocb> = iocbs.iter().collect();
    let n = ctx.submit_io(&refs).map_err(|e| e.to_string())?;
    wait_events(&mut ctx, n)?;
    let mut count = 0u64;
    // SAFETY: reads 8 bytes into a local from our own eventfd.
    let r = unsafe { libc::read(efd, (&mut count as *mut u64).cast(), 8) };
    // SAFETY: closing our own eventfd.
    unsafe { libc::close(efd) };
    check!(r == 8, "eventfd read returned {r}");
    check!(count == 10, "eventfd counted {count} completions, expected 10");
    Ok(())
}

/// Runs every case, printing one line each; returns (passed, failed).
pub fn run_all(prefix: &str, t: &Target, filter: Option<&str>) -> (usize, usize) {
    run_cases(all(), prefix, t, filter)
}

/// Runs `cases` (those whose name contains `filter`, if given), printing `ok   NAME` or
/// `FAIL NAME: why` for each; a panicking case fails alone. Returns (passed, failed).
pub fn run_cases(
    cases: Vec<Case>,
    prefix: &str,
    t: &Target,
    filter: Option<&str>,
) -> (usize, usize) {
    let (mut passed, mut failed) = (0, 0);
    for case in cases {
        if filter.is_some_and(|f| !case.name.contains(f)) {
            continue;
        }
        let name = format!("{prefix}{}", case.name);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (case.run)(t))) {
            Ok(Ok(())) => {
                println!("ok   {name}");
                passed += 1;
            }
            Ok(Err(why)) => {
                println!("FAIL {name}: {why}");
                failed += 1;
            }
            Err(_) => {
                println!("FAIL {name}: panicked");
                failed += 1;
            }
        }
    }
    (passed, failed)
}
