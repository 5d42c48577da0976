//! The whole stack (AIO context, driver) against nvaio's in-process emulated controller: the
//! shared cases on several device configurations, then misbehaving devices. Runs on any host.

use nvaio_tests::SubmitForTests;
use std::sync::Arc;
use std::time::Duration;

use nvaio::{Access, Context, ContextOptions, IoEvent, Iocb};
use nvaio_nvme::emu::{EmuConfig, EmuNamespace, EmulatedController, FaultAction, FaultRule};
use nvaio_nvme::spec::cmd::nvm;
use nvaio_nvme::spec::status::{sct, Status};
use nvaio_nvme::{Controller, Device};
use nvaio_tests::cases::{run_all, Target};

fn controller(cfg: EmuConfig) -> (Arc<EmulatedController>, Arc<Controller>) {
    let emu = EmulatedController::new(cfg);
    let dev: Arc<dyn Device> = emu.clone();
    let ctrl = Controller::new(dev).expect("the emulated controller comes up");
    (emu, ctrl)
}

fn run_cases(cfg: EmuConfig) {
    let lba = 1u32 << cfg.namespaces[0].lba_shift;
    let nns = cfg.namespaces.len();
    let size = cfg.namespaces[0].bytes();
    let serial = cfg.serial.clone();
    let (_emu, ctrl) = controller(cfg);
    let t = Target {
        ctrl,
        expect_lba: Some(lba),
        expect_namespaces: Some(nns),
        expect_size: Some(size),
        expect_serial: Some(serial),
    };
    let (passed, failed) = run_all("emu/", &t, None);
    assert_eq!(failed, 0, "{failed} shared cases failed (see the FAIL lines above)");
    assert!(passed >= 10, "only {passed} cases ran");
}

#[test]
fn cases_512b_mdts5() {
    run_cases(EmuConfig::default());
}

#[test]
fn cases_4k_mdts3_two_namespaces() {
    run_cases(EmuConfig {
        mdts: 3,
        namespaces: vec![
            EmuNamespace { blocks: 16384, lba_shift: 12 },
            EmuNamespace { blocks: 16384, lba_shift: 12 },
        ],
        ..EmuConfig::default()
    });
}

#[test]
fn cases_unlimited_mdts_slow_ready_wide_doorbells() {
    run_cases(EmuConfig {
        mdts: 0,
        dstrd: 2,
        ready_delay_reads: 5,
        mqes_z: 63,
        namespaces: vec![EmuNamespace { blocks: 32768, lba_shift: 12 }],
        ..EmuConfig::default()
    });
}

/// A context with one namespace open read-write and a short command timeout.
struct Rig {
    emu: Arc<EmulatedController>,
    ctrl: Arc<Controller>,
    fd: i32,
    ctx: Context,
    buf: Vec<u8>,
}

impl Rig {
    fn new(cfg: EmuConfig, timeout: Duration) -> Rig {
        let (emu, ctrl) = controller(cfg);
        let fd = nvaio::open_on(ctrl.clone(), 1, Access::ReadWrite).unwrap();
        let opts = ContextOptions { command_timeout: timeout, ..Default::default() };
        let ctx = Context::with_options(16, opts).unwrap();
        Rig { emu, ctrl, fd, ctx, buf: vec![0u8; 1 << 20] }
    }

    fn read_iocb(&mut self, lba: u64) -> Iocb {
        Iocb::pread(self.fd, self.buf.as_mut_ptr(), 512, (lba * 512) as i64)
    }

    fn wait(&mut self, n: usize, limit: Duration) -> Vec<IoEvent> {
        let mut out = vec![IoEvent::default(); n];
        let got = self.ctx.get_events(n, &mut out, Some(limit)).unwrap();
        out.truncate(got);
        out
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = nvaio::close(self.fd);
    }
}

#[test]
fn media_error_fails_only_that_read_with_enodata() {
    let mut rig = Rig::new(EmuConfig::default(), Duration::from_secs(10));
    let status = Status::new(sct::MEDIA, 0x81).with_dnr();
    rig.emu.inject(FaultRule::new(FaultAction::Fail(status)).opcode(nvm::READ).lbas(100..101));
    let bad = rig.read_iocb(100);
    let good = rig.read_iocb(300);
    assert_eq!(rig.ctx.submit_io(&[&bad, &good]), Ok(2));
    let mut evs = rig.wait(2, Duration::from_secs(5));
    evs.sort_by_key(|e| e.obj != &bad as *const Iocb as u64);
    assert_eq!(evs.len(), 2);
    assert_eq!(evs[0].res, -i64::from(libc::ENODATA));
    assert_eq!(evs[1].res, 512);
}

#[test]
fn lost_command_times_out_and_the_queue_goes_on() {
    let mut rig = Rig::new(EmuConfig::default(), Duration::from_millis(200));
    rig.emu.inject(FaultRule::new(FaultAction::Drop).opcode(nvm::READ).times(1));
    let lost = rig.read_iocb(5);
    assert_eq!(rig.ctx.submit_io(&[&lost]), Ok(1));
    let evs = rig.wait(1, Duration::from_secs(5));
    assert_eq!(evs.len(), 1, "the lost read must complete by its deadline");
    assert_eq!(evs[0].res, -i64::from(libc::ETIMEDOUT));
    assert_eq!(rig.ctx.stats().timeouts, 1);
    // The next read works; the lost command keeps its slot, which nothing reuses.
    let next = rig.read_iocb(6);
    assert_eq!(rig.ctx.submit_io(&[&next]), Ok(1));
    let evs = rig.wait(1, Duration::from_secs(5));
    assert_eq!(evs[0].res, 512);
}

#[test]
fn bogus_and_duplicate_completions_are_counted_not_delivered() {
    let mut rig = Rig::new(EmuConfig::default(), Duration::from_millis(300));
    rig.emu.inject(FaultRule::new(FaultAction::Duplicate).opcode(nvm::READ).times(1));
    let a = rig.read_iocb(1);
    assert_eq!(rig.ctx.submit_io(&[&a]), Ok(1));
    let evs = rig.wait(1, Duration::from_secs(5));
    assert_eq!(evs[0].res, 512);
    rig.emu.inject(FaultRule::new(FaultAction::WrongCid(0x0abc)).opcode(nvm::READ).times(1));
    let b = rig.read_iocb(2);
    assert_eq!(rig.ctx.submit_io(&[&b]), Ok(1));
    let evs = rig.wait(1, Duration::from_secs(5));
    assert_eq!(evs[0].res, -i64::from(libc::ETIMEDOUT));
    // Exactly one event per request: nothing extra appears.
    let c = rig.read_iocb(3);
    assert_eq!(rig.ctx.submit_io(&[&c]), Ok(1));
    let evs = rig.wait(4, Duration::from_millis(500));
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].obj, &c as *const Iocb as u64);
    let qs = rig.ctx.queue_stats();
    assert_eq!(qs[0].bogus_cids, 2, "the duplicate and the invented CID");
}

#[test]
fn cancel_of_a_held_command_aborts_it() {
    let mut rig = Rig::new(EmuConfig::default(), Duration::from_secs(10));
    rig.emu.inject(FaultRule::new(FaultAction::Hold).opcode(nvm::READ));
    let a = rig.read_iocb(7);
    assert_eq!(rig.ctx.submit_io(&[&a]), Ok(1));
    assert_eq!(rig.emu.held(), 1);
    assert_eq!(rig.ctx.cancel(&a), Err(nvaio::Errno(libc::EINPROGRESS)));
    let evs = rig.wait(1, Duration::from_secs(5));
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].res, -i64::from(libc::ECANCELED));
    assert_eq!(evs[0].obj, &a as *const Iocb as u64);
    assert_eq!(rig.ctx.stats().aborts_sent, 1);
    // Not in flight any more.
    assert_eq!(rig.ctx.cancel(&a), Err(nvaio::Errno(libc::EINVAL)));
}

#[test]
fn cancel_declined_by_the_controller_delivers_the_real_result() {
    let cfg = EmuConfig { decline_aborts: true, ..EmuConfig::default() };
    let mut rig = Rig::new(cfg, Duration::from_secs(10));
    rig.emu.namespace_write(1, 8 * 512, &[0x5a; 512]);
    rig.emu.inject(FaultRule::new(FaultAction::Hold).opcode(nvm::READ));
    let a = rig.read_iocb(8);
    assert_eq!(rig.ctx.submit_io(&[&a]), Ok(1));
    assert_eq!(rig.ctx.cancel(&a), Err(nvaio::Errno(libc::EINPROGRESS)));
    assert_eq!(rig.emu.release_held(), 1);
    let evs = rig.wait(1, Duration::from_secs(5));
    assert_eq!(evs[0].res, 512);
    assert!(rig.buf[..512].iter().all(|&b| b == 0x5a));
}

#[test]
fn a_vanished_controller_fails_io_with_eio_before_the_timeout() {
    let mut rig = Rig::new(EmuConfig::default(), Duration::from_secs(60));
    rig.emu.inject(FaultRule::new(FaultAction::Vanish).opcode(nvm::READ));
    let a = rig.read_iocb(9);
    assert_eq!(rig.ctx.submit_io(&[&a]), Ok(1));
    let evs = rig.wait(1, Duration::from_secs(5));
    assert_eq!(evs.len(), 1, "no event within 5 s of the device vanishing");
    assert_eq!(evs[0].res, -i64::from(libc::EIO));
    // Later I/O on the dead controller fails at once, as an event.
    let b = rig.read_iocb(10);
    assert_eq!(rig.ctx.submit_io(&[&b]), Ok(1));
    let evs = rig.wait(1, Duration::from_secs(1));
    assert_eq!(evs[0].res, -i64::from(libc::EIO));
    assert!(rig.ctrl.health().is_err());
}

#[test]
fn a_fatal_controller_fails_io_with_eio() {
    let mut rig = Rig::new(EmuConfig::default(), Duration::from_secs(60));
    // qid 1: opcode 0x01 on the admin queue would be Create I/O SQ.
    rig.emu.inject(FaultRule::new(FaultAction::Fatal).qid(1).opcode(nvm::WRITE));
    let data = vec![1u8; 512];
    let w = Iocb::pwrite(rig.fd, data.as_ptr(), 512, 0);
    assert_eq!(rig.ctx.submit_io(&[&w]), Ok(1));
    let evs = rig.wait(1, Duration::from_secs(5));
    assert_eq!(evs[0].res, -i64::from(libc::EIO));
}

#[test]
fn one_doorbell_per_submit_batch() {
    let mut rig = Rig::new(EmuConfig::default(), Duration::from_secs(10));
    let before = rig.emu.stats().sq_doorbells[1];
    let base = rig.buf.as_mut_ptr();
    let iocbs: Vec<Iocb> = (0..12)
        .map(|i| Iocb::pread(rig.fd, base.wrapping_add(i * 512), 512, (i * 512) as i64))
        .collect();
    let refs: Vec<&Iocb> = iocbs.iter().collect();
    assert_eq!(rig.ctx.submit_io(&refs), Ok(12));
    assert_eq!(rig.emu.stats().sq_doorbells[1] - before, 1, "12 reads, one SQ doorbell");
    let evs = rig.wait(12, Duration::from_secs(5));
    assert_eq!(evs.len(), 12);
    assert!(evs.iter().all(|e| e.res == 512));
}

#[test]
fn a_controller_that_never_gets_ready_is_a_timeout_error() {
    let cfg = EmuConfig { ready_delay_reads: u32::MAX, cap_to: 1, ..EmuConfig::default() };
    let emu = EmulatedController::new(cfg);
    let dev: Arc<dyn Device> = emu;
    let start = std::time::Instant::now();
    let err = Controller::new(dev).expect_err("never ready");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn data_written_reaches_the_medium_at_the_right_place() {
    let cfg = EmuConfig {
        mdts: 1,
        namespaces: vec![EmuNamespace { blocks: 8192, lba_shift: 12 }],
        ..EmuConfig::default()
    };
    let (emu, ctrl) = controller(cfg);
    let fd = nvaio::open_on(ctrl, 1, Access::ReadWrite).unwrap();
    let mut ctx = Context::setup(8).unwrap();
    // 40 KiB through 8 KiB commands, from a buffer 4 bytes past a page boundary.
    let mut raw = vec![0u8; 48 << 10];
    let off = (4096 - raw.as_ptr() as usize % 4096) % 4096 + 4;
    let data: Vec<u8> = (0..40 << 10).map(|i: u32| (i * 7 % 251) as u8).collect();
    raw[off..off + data.len()].copy_from_slice(&data);
    let w = Iocb::pwrite(fd, raw[off..].as_ptr(), data.len(), 3 * 4096);
    assert_eq!(ctx.submit_io(&[&w]), Ok(1));
    let mut ev = [IoEvent::default()];
    assert_eq!(ctx.get_events(1, &mut ev, Some(Duration::from_secs(5))), Ok(1));
    assert_eq!(ev[0].res, data.len() as i64);
    assert_eq!(emu.namespace_read(1, 3 * 4096, data.len()), data);
    assert_eq!(emu.stats().io(nvm::WRITE), 5, "40 KiB in 8 KiB commands");
    nvaio::close(fd).unwrap();
}

#[test]
fn nowait_fails_with_eagain_instead_of_waiting() {
    let (emu, ctrl) = controller(EmuConfig::default());
    let fd = nvaio::open_on(ctrl, 1, Access::ReadWrite).unwrap();
    // A queue of 2 entries has one usable slot.
    let opts = ContextOptions { queue_entries: Some(2), ..Default::default() };
    let mut ctx = Context::with_options(8, opts).unwrap();
    emu.inject(FaultRule::new(FaultAction::Hold).qid(1).opcode(nvm::READ));
    let mut buf = vec![0u8; 4096];
    let first = Iocb::pread(fd, buf.as_mut_ptr(), 512, 0);
    let mut second = Iocb::pread(fd, buf[1024..].as_mut_ptr(), 512, 512);
    second.aio_rw_flags = nvaio::abi::rwf::NOWAIT;
    assert_eq!(ctx.submit_io(&[&first, &second]), Ok(2));
    let mut ev = [IoEvent::default(); 2];
    assert_eq!(ctx.get_events(1, &mut ev, Some(Duration::from_secs(2))), Ok(1));
    assert_eq!(ev[0].obj, &second as *const Iocb as u64);
    assert_eq!(ev[0].res, -i64::from(libc::EAGAIN));
    emu.clear_faults();
    assert_eq!(emu.release_held(), 1);
    assert_eq!(ctx.get_events(1, &mut ev, Some(Duration::from_secs(2))), Ok(1));
    assert_eq!(ev[0].res, 512);
    nvaio::close(fd).unwrap();
}

#[test]
fn submit_time_checks_match_the_kernel() {
    let (_emu, ctrl) = controller(EmuConfig::default());
    let fd = nvaio::open_on(ctrl, 1, Access::ReadWrite).unwrap();
    let mut ctx = Context::setup(8).unwrap();
    let mut buf = vec![0u8; 4096];
    let base = Iocb::pread(fd, buf.as_mut_ptr(), 512, 0);
    let einval = Err(nvaio::Errno(libc::EINVAL));
    // POLL on a block device answers at once with the default mask bits asked for.
    let poll =
        Iocb { aio_lio_opcode: nvaio::abi::opcode::POLL, aio_buf: libc::POLLIN as u64, ..base };
    let poll = Iocb { aio_nbytes: 0, ..poll };
    assert_eq!(ctx.submit_io(&[&poll]), Ok(1));
    let mut ev = [IoEvent::default(); 1];
    assert_eq!(ctx.get_events(1, &mut ev, Some(Duration::from_secs(1))), Ok(1));
    assert_eq!(ev[0].res, i64::from(libc::POLLIN));
    let poll_pri = Iocb { aio_buf: libc::POLLPRI as u64, ..poll };
    assert_eq!(ctx.submit_io(&[&poll_pri]), einval);
    // NOOP is not an operation the kernel's AIO performs.
    let noop = Iocb { aio_lio_opcode: nvaio::abi::opcode::NOOP, ..base };
    assert_eq!(ctx.submit_io(&[&noop]), einval);
    // fsync takes no buffer, offset, length or flags.
    let fsync = Iocb { aio_offset: 512, ..Iocb::fsync(fd) };
    assert_eq!(ctx.submit_io(&[&fsync]), einval);
    // Unknown rw flags: EOPNOTSUPP; bad priorities: EINVAL.
    let flags = Iocb { aio_rw_flags: 0x100, ..base };
    assert_eq!(ctx.submit_io(&[&flags]), Err(nvaio::Errno(libc::EOPNOTSUPP)));
    let prio = Iocb { aio_flags: nvaio::abi::IOCB_FLAG_IOPRIO, aio_reqprio: 5 << 13, ..base };
    assert_eq!(ctx.submit_io(&[&prio]), einval);
    let prio_ok = Iocb { aio_reqprio: (2 << 13) | 3, ..prio };
    assert_eq!(ctx.submit_io(&[&prio_ok]), Ok(1));
    assert_eq!(ctx.get_events(1, &mut ev, Some(Duration::from_secs(1))), Ok(1));
    // A result eventfd that is not an eventfd, or not open.
    let not_efd = Iocb { aio_flags: nvaio::abi::IOCB_FLAG_RESFD, aio_resfd: 1, ..base };
    assert_eq!(ctx.submit_io(&[&not_efd]), einval);
    let closed = Iocb { aio_resfd: 9999, ..not_efd };
    assert_eq!(ctx.submit_io(&[&closed]), Err(nvaio::Errno(libc::EBADF)));
    // Negative sizes and offsets, kernel addresses.
    let neg = Iocb { aio_nbytes: u64::MAX, ..base };
    assert_eq!(ctx.submit_io(&[&neg]), einval);
    let neg_off = Iocb { aio_offset: -512, ..base };
    assert_eq!(ctx.submit_io(&[&neg_off]), einval);
    let kaddr = Iocb { aio_buf: 0xffff_8000_0000_0000, ..base };
    assert_eq!(ctx.submit_io(&[&kaddr]), Err(nvaio::Errno(libc::EFAULT)));
    nvaio::close(fd).unwrap();
}

#[test]
fn one_context_serves_a_namespace_and_a_regular_file() {
    let (emu, ctrl) = controller(EmuConfig::default());
    let fd = nvaio::open_on(ctrl, 1, Access::ReadWrite).unwrap();
    emu.namespace_write(1, 0, &[0xab; 512]);
    let path = std::env::temp_dir().join(format!("nvaio-mixed-{}", std::process::id()));
    std::fs::write(&path, [0xcd; 512]).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let ffd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let mut ctx = Context::setup(8).unwrap();
    let mut a = vec![0u8; 512];
    let mut b = vec![0u8; 512];
    let on_nvme = Iocb::pread(fd, a.as_mut_ptr(), 512, 0).with_data(1);
    let on_file = Iocb::pread(ffd, b.as_mut_ptr(), 512, 0).with_data(2);
    assert_eq!(ctx.submit_io(&[&on_nvme, &on_file]), Ok(2));
    let mut evs = [IoEvent::default(); 2];
    let mut got = 0;
    while got < 2 {
        got += ctx.get_events(1, &mut evs[got..], Some(Duration::from_secs(5))).unwrap();
    }
    evs.sort_by_key(|e| e.data);
    assert_eq!((evs[0].data, evs[0].res), (1, 512));
    assert_eq!((evs[1].data, evs[1].res), (2, 512));
    assert_eq!(evs[1].obj, &on_file as *const Iocb as u64);
    assert!(a.iter().all(|&x| x == 0xab));
    assert!(b.iter().all(|&x| x == 0xcd));
    // The kernel's own checks apply to the file: writing a read-only file is EBADF.
    let w = Iocb::pwrite(ffd, a.as_ptr(), 512, 0);
    assert_eq!(ctx.submit_io(&[&w]), Err(nvaio::Errno(libc::EBADF)));
    drop(file);
    let _ = std::fs::remove_file(path);
    nvaio::close(fd).unwrap();
}

#[test]
fn registered_buffers_move_data_without_bounce_copies() {
    let cfg = EmuConfig { mdts: 2, ..EmuConfig::default() };
    let (emu, ctrl) = controller(cfg);
    let fd = nvaio::open_on(ctrl, 1, Access::ReadWrite).unwrap();
    let mut ctx = Context::setup(8).unwrap();
    let mut mem = vec![0u8; 256 << 10];
    // Register all but the first 4 bytes, so transfers start off a page boundary too.
    let base = mem.as_mut_ptr().wrapping_add(4);
    // SAFETY: `mem` outlives the registration (unregistered below, before it is dropped).
    unsafe { ctx.register_buffer(base, mem.len() - 4) }.unwrap();
    let data: Vec<u8> = (0..100 << 10).map(|i: u32| (i % 241) as u8).collect();
    mem[4..4 + data.len()].copy_from_slice(&data);
    // 100 KiB through 16 KiB commands (MDTS 2): PRP lists in registered memory.
    let w = Iocb::pwrite(fd, base, data.len(), 8192);
    assert_eq!(ctx.submit_io(&[&w]), Ok(1));
    let mut ev = [IoEvent::default()];
    assert_eq!(ctx.get_events(1, &mut ev, Some(Duration::from_secs(5))), Ok(1));
    assert_eq!(ev[0].res, data.len() as i64);
    assert_eq!(emu.namespace_read(1, 8192, data.len()), data);
    mem[4..4 + data.len()].fill(0);
    let r = Iocb::pread(fd, base, data.len(), 8192);
    assert_eq!(ctx.submit_io(&[&r]), Ok(1));
    assert_eq!(ctx.get_events(1, &mut ev, Some(Duration::from_secs(5))), Ok(1));
    assert_eq!(ev[0].res, data.len() as i64);
    assert_eq!(&mem[4..4 + data.len()], &data[..]);
    assert_eq!(ctx.stats().zero_copy, 14, "7 commands each way, all direct");
    // A buffer outside the registered range still works, through bounce pages.
    let mut other = vec![0u8; 4096];
    let r = Iocb::pread(fd, other.as_mut_ptr(), 4096, 8192);
    assert_eq!(ctx.submit_io(&[&r]), Ok(1));
    assert_eq!(ctx.get_events(1, &mut ev, Some(Duration::from_secs(5))), Ok(1));
    assert_eq!(&other[..], &data[..4096]);
    assert_eq!(ctx.stats().zero_copy, 14);
    assert_eq!(ctx.unregister_buffer(base), Ok(()));
    assert_eq!(ctx.unregister_buffer(base), Err(nvaio::Errno(libc::EINVAL)));
    nvaio::close(fd).unwrap();
}

#[test]
fn many_kernel_requests_in_one_context_all_complete() {
    // More completions than one reaping pass takes from the kernel's ring.
    let path = std::env::temp_dir().join(format!("nvaio-many-{}", std::process::id()));
    std::fs::write(&path, vec![0x5a; 512 * 200]).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let ffd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let mut bufs = vec![0u8; 512 * 200];
    let mut ctx = Context::setup(256).unwrap();
    let iocbs: Vec<Iocb> = (0..200)
        .map(|i| Iocb::pread(ffd, bufs[i * 512..].as_mut_ptr(), 512, (i * 512) as i64))
        .collect();
    let refs: Vec<&Iocb> = iocbs.iter().collect();
    assert_eq!(ctx.submit_io(&refs), Ok(200));
    let mut evs = vec![IoEvent::default(); 200];
    let mut got = 0;
    while got < 200 {
        let n = ctx.get_events(1, &mut evs[got..], Some(Duration::from_secs(5))).unwrap();
        assert!(n > 0, "only {got} of 200 events");
        got += n;
    }
    assert!(evs.iter().all(|e| e.res == 512));
    assert_eq!(ctx.in_flight(), 0);
    assert!(bufs.iter().all(|&b| b == 0x5a));
    drop(ctx);
    drop(file);
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_forked_child_cannot_use_the_parents_context_and_leaves_it_alone() {
    let (_emu, ctrl) = controller(EmuConfig::default());
    let fd = nvaio::open_on(ctrl.clone(), 1, Access::ReadWrite).unwrap();
    let mut buf = vec![0u8; 512];
    let mut ctx = Context::setup(8).unwrap();
    let iocb = Iocb::pread(fd, buf.as_mut_ptr(), 512, 0);
    assert_eq!(ctx.submit_io(&[&iocb]), Ok(1));
    let mut ev = [IoEvent::default()];
    assert_eq!(ctx.get_events(1, &mut ev, Some(Duration::from_secs(5))), Ok(1));
    // SAFETY: the child runs only the checks below and leaves with _exit, without unwinding
    // or running the parent's destructors twice.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let mut code = 0;
        if ctx.submit_io(&[&iocb]) != Err(nvaio::Errno(libc::EINVAL)) {
            code |= 1;
        }
        if ctx.get_events(0, &mut ev, Some(Duration::ZERO)) != Err(nvaio::Errno(libc::EINVAL)) {
            code |= 2;
        }
        if !ctrl.forked() || ctrl.health().is_ok() {
            code |= 4;
        }
        // Dropping in the child must not touch the (parent's) device.
        drop(ctx);
        // SAFETY: leaves the child at once.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: reaps our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "child saw a usable context (bits: 1 submit, 2 getevents, 4 controller)"
    );
    // The parent goes on as before.
    assert!(!ctrl.forked());
    assert_eq!(ctx.submit_io(&[&iocb]), Ok(1));
    assert_eq!(ctx.get_events(1, &mut ev, Some(Duration::from_secs(5))), Ok(1));
    assert_eq!(ev[0].res, 512);
    drop(ctx);
    nvaio::close(fd).unwrap();
}
