//! Driver-level cases for interrupts and asynchronous events, on any controller with MSI-X:
//! QEMU's NVMe through VFIO in the guest, the emulated controller on the host. They use the
//! queue pairs and notifiers of `nvaio_nvme` directly, below the AIO context.
//!
//! In the guest they learn the device's `msix_qsize` from `NVAIO_DEV<i>_MSIX` (ci/qemu-run sets
//! it), matching the controller by `NVAIO_DEV<i>_ADDR`.

use std::time::{Duration, Instant};

use nvaio_dma::DmaRegion;
use nvaio_nvme::controller::{event_type, AsyncEventKind};
use nvaio_nvme::queue::Notifier;
use nvaio_nvme::spec::cmd::{admin, nvm};
use nvaio_nvme::spec::{Cqe, Sqe};
use nvaio_nvme::QueuePair;

use crate::cases::{block_size, readable};
use crate::cases::{Case, CaseResult, Target};

/// Every case, in the order they run.
pub fn all() -> Vec<Case> {
    vec![
        Case { name: "irq/vectors_enabled", run: vectors_enabled },
        Case { name: "irq/every_queue_completes_through_its_notifier", run: every_queue },
        Case { name: "irq/sleeping_waiter_is_woken_by_the_interrupt", run: sleeping_waiter },
        Case { name: "irq/async_event_requests_outstanding", run: aers_outstanding },
        Case { name: "irq/async_event_temperature_threshold", run: temperature_event },
    ]
}

/// Runs every case of [`all`], printing `ok   NAME` or `FAIL NAME: why`; returns (passed,
/// failed). `filter` keeps the cases whose name contains it.
pub fn run_all(prefix: &str, t: &Target, filter: Option<&str>) -> (usize, usize) {
    crate::cases::run_cases(all(), prefix, t, filter)
}

macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// `NVAIO_DEV<i>_<key>` for the controller under test, if ci/qemu-run described it.
fn guest_env(t: &Target, key: &str) -> Option<String> {
    let addr = t.ctrl.device().name().to_string();
    (0..32).find_map(|i| {
        let this = std::env::var(format!("NVAIO_DEV{i}_ADDR")).ok()?;
        if this == addr {
            std::env::var(format!("NVAIO_DEV{i}_{key}")).ok()
        } else {
            None
        }
    })
}

/// A one-command read or write of `blocks` blocks at `lba` of namespace 1, data in `buf`.
fn rw_sqe(opcode: u8, buf: &DmaRegion, lba: u64, blocks: u16) -> Sqe {
    let mut sqe = Sqe::new(opcode, 1);
    sqe.prp1 = buf.iova();
    sqe.cdw10 = lba as u32;
    sqe.cdw11 = (lba >> 32) as u32;
    sqe.cdw12 = u32::from(blocks - 1);
    sqe
}

/// Reaps one completion the way an interrupt-mode waiter does: drain, poll, then sleep on the
/// notifier. Counts the sleeps in `sleeps`.
pub fn wait_one(
    qp: &mut QueuePair,
    n: &Notifier,
    limit: Duration,
    sleeps: &mut u32,
) -> Result<Cqe, String> {
    let deadline = Instant::now() + limit;
    loop {
        n.drain();
        let mut got = None;
        qp.poll(1, |c| got = Some(c.cqe));
        if let Some(cqe) = got {
            return Ok(cqe);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        check!(
            !left.is_zero(),
            "queue {} (vector {}): no completion within {limit:?}",
            qp.qid(),
            n.vector()
        );
        *sleeps += 1;
        readable(n.fd(), left.as_millis().clamp(1, i32::MAX as u128) as i32);
    }
}

/// Submits one command and waits for it through the notifier; fails on an error status.
fn run_cmd(qp: &mut QueuePair, n: &Notifier, mut sqe: Sqe, sleeps: &mut u32) -> CaseResult {
    qp.submit(&mut sqe).ok_or("no free slot in a fresh queue")?;
    qp.ring();
    let cqe = wait_one(qp, n, Duration::from_secs(10), sleeps)?;
    check!(cqe.status().is_success(), "queue {}: {}", qp.qid(), cqe.status());
    Ok(())
}

fn vectors_enabled(t: &Target) -> CaseResult {
    let vectors = usize::from(t.ctrl.interrupt_vectors());
    check!(vectors >= 1, "no MSI-X vectors enabled");
    let granted = usize::from(t.ctrl.io_queues_granted());
    if let Some(msix) = guest_env(t, "MSIX").and_then(|v| v.parse::<usize>().ok()) {
        let want = msix.min(granted + 1);
        check!(
            vectors == want,
            "{vectors} vectors enabled; msix_qsize {msix} and {granted} queues"
        );
    }
    Ok(())
}

/// Creates as many interrupt-driven queue pairs as the controller grants (up to 16), writes
/// and reads back a block on each, waiting only through notifiers. With msix_qsize below the
/// queue count this runs queues on shared vectors and their relays.
fn every_queue(t: &Target) -> CaseResult {
    let bs = block_size(t, 1)? as usize;
    let count = usize::from(t.ctrl.io_queues_granted()).min(16);
    let mut queues = Vec::new();
    for _ in 0..count {
        match t.ctrl.create_queue_pair_irq(16) {
            Ok(q) => queues.push(q),
            // Other cases' queues may hold some queue IDs; what is left is enough.
            Err(nvaio_nvme::ControllerError::NoQueues { .. }) if !queues.is_empty() => break,
            Err(e) => return Err(format!("create_queue_pair_irq: {e}")),
        }
    }
    let relayed = queues.iter().filter(|(_, n)| n.is_relayed()).count();
    let mapper = t.ctrl.device().dma_mapper();
    let buf = DmaRegion::alloc(mapper, 4096).map_err(|e| e.to_string())?;
    let blocks = (4096 / bs).max(1) as u16;
    let mut sleeps = 0;
    let base = 16u64 << 20;
    for (i, (qp, n)) in queues.iter_mut().enumerate() {
        let lba = (base + (i * 4096) as u64) / bs as u64;
        let fill = [0x30 + i as u8; 4096];
        buf.write_bytes(0, &fill);
        run_cmd(qp, n, rw_sqe(nvm::WRITE, &buf, lba, blocks), &mut sleeps)?;
        buf.zero(0, 4096);
        run_cmd(qp, n, rw_sqe(nvm::READ, &buf, lba, blocks), &mut sleeps)?;
        let mut back = [0u8; 4096];
        buf.read_bytes(0, &mut back);
        check!(back == fill, "queue {} (vector {}): data read back differs", qp.qid(), n.vector());
    }
    println!(
        "     {} queues on {} vectors ({relayed} relayed), {sleeps} sleeps",
        queues.len(),
        t.ctrl.interrupt_vectors()
    );
    Ok(())
}

/// QD1 reads that always sleep before looking: every completion must arrive by interrupt, and
/// the waiting costs far less CPU than the wall time it takes.
fn sleeping_waiter(t: &Target) -> CaseResult {
    let bs = block_size(t, 1)? as usize;
    let (mut qp, n) = t.ctrl.create_queue_pair_irq(16).map_err(|e| e.to_string())?;
    let mapper = t.ctrl.device().dma_mapper();
    let buf = DmaRegion::alloc(mapper, 4096).map_err(|e| e.to_string())?;
    let rounds = 200;
    let cpu0 = thread_cpu();
    let start = Instant::now();
    for i in 0..rounds {
        n.drain();
        let mut sqe = rw_sqe(nvm::READ, &buf, i as u64, 1);
        qp.submit(&mut sqe).ok_or("no free slot")?;
        qp.ring();
        // Sleep first: on a real device the interrupt, not a poll, ends the wait.
        check!(readable(n.fd(), 10_000), "read {i}: no interrupt within 10 s (block size {bs})");
        let mut sleeps = 0;
        let cqe = wait_one(&mut qp, &n, Duration::from_secs(10), &mut sleeps)?;
        check!(cqe.status().is_success(), "read {i}: {}", cqe.status());
    }
    let wall = start.elapsed();
    let cpu = thread_cpu() - cpu0;
    println!("     {rounds} interrupt-driven reads in {wall:?}, {cpu:?} of CPU");
    Ok(())
}

/// User plus system CPU time of the calling thread.
pub fn thread_cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid value to be overwritten.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage into `ru`, which outlives the call.
    let r = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    if r != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn aers_outstanding(t: &Target) -> CaseResult {
    let aerl = usize::from(t.ctrl.identify().aerl_z) + 1;
    let want = aerl.min(4);
    let have = t.ctrl.async_requests_outstanding();
    check!(have == want, "{have} asynchronous event requests outstanding, expected {want}");
    Ok(())
}

/// Feature 04h, Temperature Threshold (Set Features, Base Specification 2.0).
const FEATURE_TEMPERATURE_THRESHOLD: u32 = 0x04;

/// Lowers the composite temperature's over-threshold below the current temperature: the
/// controller reports a SMART / health temperature event, which must surface through
/// `take_async_events` (with interrupts, without anyone polling). Restores the threshold.
fn temperature_event(t: &Target) -> CaseResult {
    let ctrl = &t.ctrl;
    if ctrl.async_requests_outstanding() == 0 {
        return Err("no asynchronous event request outstanding".into());
    }
    ctrl.take_async_events();
    let mut get = Sqe::new(admin::GET_FEATURES, 0);
    get.cdw10 = FEATURE_TEMPERATURE_THRESHOLD;
    let old = match ctrl.admin_command(get, None, "Get Features (Temperature Threshold)") {
        Ok(cqe) => cqe.dw0 & 0xffff,
        // Optional on real devices; QEMU has it.
        Err(e) => return Err(format!("{e}")),
    };
    let set_threshold = |kelvin: u32| -> Result<(), String> {
        let mut set = Sqe::new(admin::SET_FEATURES, 0);
        set.cdw10 = FEATURE_TEMPERATURE_THRESHOLD;
        // TMPTH (15:0), TMPSEL 0 = composite (19:16), THSEL 0 = over temperature (21:20).
        set.cdw11 = kelvin & 0xffff;
        ctrl.admin_command(set, None, "Set Features (Temperature Threshold)")
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    // 200 K (-73 °C): any running device is hotter.
    set_threshold(200)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut events = Vec::new();
    while events.is_empty() && Instant::now() < deadline {
        if ctrl.interrupt_vectors() == 0 {
            ctrl.poll_admin();
        }
        events = ctrl.take_async_events();
        std::thread::sleep(Duration::from_millis(10));
    }
    let restored = set_threshold(old);
    check!(!events.is_empty(), "no asynchronous event within 5 s of lowering the threshold");
    restored?;
    let ev = &events[0];
    println!("     event: {ev}");
    check!(ev.event_type == event_type::SMART_HEALTH, "event type {}", ev.event_type);
    check!(ev.info == 1, "event information {} (1 is temperature)", ev.info);
    match ev.kind {
        AsyncEventKind::SmartCriticalWarning(w) => {
            check!(w & 0x02 != 0, "critical warning {w:#04x} lacks the temperature bit")
        }
        ref k => return Err(format!("event kind {k:?}")),
    }
    // Re-armed: the requests are all outstanding again.
    let want = (usize::from(ctrl.identify().aerl_z) + 1).min(4);
    check!(
        ctrl.async_requests_outstanding() == want,
        "{} requests outstanding after the event",
        ctrl.async_requests_outstanding()
    );
    Ok(())
}
