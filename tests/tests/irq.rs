//! Interrupt-driven queues and asynchronous events against the in-process emulated controller,
//! which signals an eventfd per MSI-X vector as a VFIO device does.
//!
//! Every test takes one lock: the thread-leak test counts the process's interrupt threads, and
//! the tests are quick enough to run one at a time.

use nvaio_tests::cases::readable;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nvaio::wait::Waiter;
use nvaio_dma::DmaRegion;
use nvaio_nvme::controller::{event_type, AsyncEventKind, ControllerOptions};
use nvaio_nvme::emu::{EmuConfig, EmulatedController, FaultAction, FaultRule};
use nvaio_nvme::queue::Notifier;
use nvaio_nvme::spec::cmd::{admin, nvm};
use nvaio_nvme::spec::{Cqe, Sqe};
use nvaio_nvme::{Controller, ControllerError, Device, QueuePair};
use nvaio_tests::cases::Target;
use nvaio_tests::irq_cases;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn controller(cfg: EmuConfig) -> (Arc<EmulatedController>, Arc<Controller>) {
    controller_with(cfg, ControllerOptions::default())
}

fn controller_with(
    cfg: EmuConfig,
    opts: ControllerOptions,
) -> (Arc<EmulatedController>, Arc<Controller>) {
    let emu = EmulatedController::new(cfg);
    let dev: Arc<dyn Device> = emu.clone();
    let ctrl = Controller::with_options(dev, opts).expect("the emulated controller comes up");
    (emu, ctrl)
}

fn irq_config(vectors: u32, queues: u16) -> EmuConfig {
    EmuConfig { msix_vectors: vectors, max_ioqpairs: queues, ..EmuConfig::default() }
}

/// A one-block read of namespace 1 into `buf`.
fn read_sqe(buf: &DmaRegion, lba: u64) -> Sqe {
    let mut sqe = Sqe::new(nvm::READ, 1);
    sqe.prp1 = buf.iova();
    sqe.cdw10 = lba as u32;
    sqe.cdw11 = (lba >> 32) as u32;
    sqe
}

fn dma_page(ctrl: &Controller) -> DmaRegion {
    DmaRegion::alloc(ctrl.device().dma_mapper(), 4096).unwrap()
}

/// Reaps one completion from `qp` the way an interrupt-mode context waits (see
/// [`irq_cases::wait_one`]).
fn wait_one(qp: &mut QueuePair, n: &Notifier, limit: Duration) -> Result<Cqe, String> {
    irq_cases::wait_one(qp, n, limit, &mut 0)
}

/// Threads of this process whose name starts with `nvaio-` (the interrupt threads).
fn irq_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("nvaio-"))
        .count()
}

/// Waits (up to 2 s) for `irq_threads()` to reach `n`: a new thread names itself only once it
/// runs. Returns the last count seen.
fn irq_threads_become(n: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let now = irq_threads();
        if now == n || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Reads on every queue and checks each completion arrives through its notifier, with the data.
fn read_on_each(emu: &EmulatedController, ctrl: &Controller, queues: &mut [(QueuePair, Notifier)]) {
    let buf = dma_page(ctrl);
    for (i, (qp, n)) in queues.iter_mut().enumerate() {
        let lba = 100 + i as u64;
        emu.namespace_write(1, lba * 512, &[i as u8 + 1; 512]);
        let mut sqe = read_sqe(&buf, lba);
        qp.submit(&mut sqe).unwrap();
        qp.ring();
        assert!(readable(n.fd(), 5000), "queue {}: its notifier never fired", qp.qid());
        let cqe = wait_one(qp, n, Duration::from_secs(5)).unwrap();
        assert!(cqe.status().is_success(), "queue {}: {}", qp.qid(), cqe.status());
        let mut data = [0u8; 512];
        buf.read_bytes(0, &mut data);
        assert!(data.iter().all(|&b| b == i as u8 + 1), "queue {}: wrong data", qp.qid());
    }
}

#[test]
fn each_queue_gets_a_vector_of_its_own_when_there_are_enough() {
    let _g = serial();
    let (emu, ctrl) = controller(irq_config(5, 4));
    assert_eq!(ctrl.interrupt_vectors(), 5, "4 I/O queues and the admin queue");
    let mut queues: Vec<_> = (0..4).map(|_| ctrl.create_queue_pair_irq(16).unwrap()).collect();
    let mut vectors: Vec<u16> = queues.iter().map(|(_, n)| n.vector()).collect();
    vectors.sort_unstable();
    assert_eq!(vectors, [1, 2, 3, 4]);
    for (qp, n) in &queues {
        assert!(!n.is_relayed());
        assert_eq!(qp.vector(), Some(n.vector()));
    }
    read_on_each(&emu, &ctrl, &mut queues);
    // A queue's vector is free again once it is gone.
    let (qp, n) = queues.remove(1);
    let freed = n.vector();
    drop((qp, n));
    let (_qp, n) = ctrl.create_queue_pair_irq(16).unwrap();
    assert_eq!(n.vector(), freed);
    assert!(!n.is_relayed());
}

#[test]
fn queues_share_a_vector_through_its_relay() {
    let _g = serial();
    // msix_qsize 2: vector 0 for the admin queue, vector 1 for all four I/O queues.
    let (emu, ctrl) = controller(irq_config(2, 4));
    assert_eq!(ctrl.interrupt_vectors(), 2);
    let mut queues: Vec<_> = (0..4).map(|_| ctrl.create_queue_pair_irq(16).unwrap()).collect();
    for (_, n) in &queues {
        assert_eq!(n.vector(), 1);
        assert!(n.is_relayed());
    }
    read_on_each(&emu, &ctrl, &mut queues);
}

#[test]
fn with_one_vector_queues_share_the_admin_vector() {
    let _g = serial();
    let (emu, ctrl) = controller(irq_config(1, 2));
    let mut queues: Vec<_> = (0..2).map(|_| ctrl.create_queue_pair_irq(16).unwrap()).collect();
    for (_, n) in &queues {
        assert_eq!(n.vector(), 0);
        assert!(n.is_relayed());
    }
    read_on_each(&emu, &ctrl, &mut queues);
}

#[test]
fn some_direct_vectors_and_a_shared_pool() {
    let _g = serial();
    // 3 vectors, 8 queues: vector 1 goes to the first queue, vector 2 is shared by the rest.
    let (emu, ctrl) = controller(irq_config(3, 8));
    let mut queues: Vec<_> = (0..8).map(|_| ctrl.create_queue_pair_irq(16).unwrap()).collect();
    let direct: Vec<u16> =
        queues.iter().filter(|(_, n)| !n.is_relayed()).map(|(_, n)| n.vector()).collect();
    assert_eq!(direct, [1]);
    assert!(queues.iter().filter(|(_, n)| n.is_relayed()).all(|(_, n)| n.vector() == 2));
    read_on_each(&emu, &ctrl, &mut queues);
}

/// A sleeping waiter is woken by a completion that arrives later, on every kind of vector.
#[test]
fn a_late_completion_wakes_the_sleeper() {
    let _g = serial();
    for (vectors, queues) in [(5, 4), (2, 4), (1, 4)] {
        let (emu, ctrl) = controller(irq_config(vectors, queues));
        let (mut qp, n) = ctrl.create_queue_pair_irq(16).unwrap();
        emu.inject(FaultRule::new(FaultAction::Hold).qid(qp.qid()).opcode(nvm::READ));
        let buf = dma_page(&ctrl);
        qp.submit(&mut read_sqe(&buf, 1)).unwrap();
        qp.ring();
        assert_eq!(emu.held(), 1);
        n.drain();
        assert_eq!(qp.poll(1, |_| {}), 0);
        let releaser = {
            let emu = emu.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                emu.release_held()
            })
        };
        // On a shared vector a spurious wake-up may come first (the admin queue's own
        // completions on vector 0, say): the waiter then finds nothing and sleeps again. A lost
        // wake-up would show as a wait running into the 10 s limit.
        let start = Instant::now();
        let cqe = wait_one(&mut qp, &n, Duration::from_secs(10)).unwrap();
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(50), "{vectors} vectors: completed too early");
        assert!(took < Duration::from_secs(3), "{vectors} vectors: woken only after {took:?}");
        assert_eq!(releaser.join().unwrap(), 1);
        assert!(cqe.status().is_success());
    }
}

/// The waiting protocol of an interrupt-mode context, with nvaio's `Waiter` over several
/// queues that share one vector, while another thread completes commands at odd moments: no
/// wake-up may be lost (a lost one shows as a wait running into its timeout).
#[test]
fn no_wakeup_is_lost_with_a_waiter_over_shared_queues() {
    let _g = serial();
    let (emu, ctrl) = controller(irq_config(2, 3));
    let mut queues: Vec<_> = (0..3).map(|_| ctrl.create_queue_pair_irq(64).unwrap()).collect();
    let mut waiter = Waiter::new().unwrap();
    for (qp, n) in &queues {
        waiter.add(n.fd()).unwrap();
        emu.inject(FaultRule::new(FaultAction::Hold).qid(qp.qid()).opcode(nvm::READ));
    }
    let buf = dma_page(&ctrl);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let releaser = {
        let (emu, stop) = (emu.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut x = 1u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                std::thread::sleep(Duration::from_micros(x >> 54));
                emu.release_held();
            }
        })
    };
    let rounds = 300;
    let mut completed = 0;
    let mut sleeps = 0;
    for round in 0..rounds {
        let (qp, _) = &mut queues[round % 3];
        qp.submit(&mut read_sqe(&buf, round as u64)).unwrap();
        qp.ring();
        let mut done = 0;
        while done == 0 {
            waiter.drain();
            for (qp, _) in queues.iter_mut() {
                done += qp.poll(usize::MAX, |c| assert!(c.cqe.status().is_success()));
            }
            if done == 0 {
                sleeps += 1;
                assert!(waiter.wait(Some(Duration::from_secs(5))).unwrap(), "a lost wake-up");
            }
        }
        completed += done;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    releaser.join().unwrap();
    assert_eq!(completed, rounds);
    assert!(sleeps > 0, "the test never slept, so it tested nothing");
}

#[test]
fn without_vectors_interrupt_queues_are_refused() {
    let _g = serial();
    let (_emu, ctrl) = controller(EmuConfig::default());
    assert_eq!(ctrl.interrupt_vectors(), 0);
    match ctrl.create_queue_pair_irq(16) {
        Err(ControllerError::NoInterrupts { why, .. }) => {
            assert!(why.contains("no MSI-X"), "{why}")
        }
        other => panic!("expected NoInterrupts, got {:?}", other.map(|_| ())),
    }
    // A polled queue still works.
    ctrl.create_queue_pair(16).unwrap();
    // Interrupts turned off by the options.
    let opts = ControllerOptions { interrupts: false, ..ControllerOptions::default() };
    let (_emu, ctrl) = controller_with(irq_config(4, 2), opts);
    assert_eq!(ctrl.interrupt_vectors(), 0);
    assert!(matches!(ctrl.create_queue_pair_irq(16), Err(ControllerError::NoInterrupts { .. })));
}

#[test]
fn async_events_are_reported_and_the_requests_rearmed_without_interrupts() {
    let _g = serial();
    let (emu, ctrl) = controller(EmuConfig::default());
    // AERL is 3 (zero-based): four requests stay outstanding.
    assert_eq!(ctrl.async_requests_outstanding(), 4);
    assert_eq!(emu.stats().admin(admin::ASYNC_EVENT_REQUEST), 4);
    let logs = emu.stats().admin(admin::GET_LOG_PAGE);

    // SMART / health, temperature: nothing happens until someone reaps the admin queue.
    assert!(emu.raise_event(1, 1, 2), "an AER was outstanding");
    assert!(ctrl.take_async_events().is_empty());
    assert_eq!(ctrl.poll_admin(), 1);
    let evs = ctrl.take_async_events();
    assert_eq!(evs.len(), 1);
    assert_eq!((evs[0].event_type, evs[0].info, evs[0].log_page), (event_type::SMART_HEALTH, 1, 2));
    assert!(matches!(evs[0].kind, AsyncEventKind::SmartCriticalWarning(_)), "{:?}", evs[0]);
    assert_eq!(emu.stats().admin(admin::GET_LOG_PAGE), logs + 1, "the SMART log was read");
    assert_eq!(ctrl.async_requests_outstanding(), 4, "re-armed");

    // Again: any admin command hands the completion over (here, creating a queue pair).
    assert!(emu.raise_event(1, 0, 2));
    let _qp = ctrl.create_queue_pair(16).unwrap();
    let evs = ctrl.take_async_events();
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0].info, 0);

    // A namespace attribute notice whose log the emulator cannot serve: reported as unknown.
    assert!(emu.raise_event(2, 0, 4));
    assert_eq!(ctrl.poll_admin(), 1);
    let evs = ctrl.take_async_events();
    assert_eq!(evs[0].kind, AsyncEventKind::NamespaceAttributeChanged(vec![]));
    assert_eq!(ctrl.async_requests_outstanding(), 4);
    assert_eq!(emu.stats().admin(admin::ASYNC_EVENT_REQUEST), 7);
    assert_eq!(ctrl.async_events_dropped(), 0);
}

#[test]
fn events_queued_in_the_controller_come_out_one_request_at_a_time() {
    let _g = serial();
    let cfg = EmuConfig { aerl_z: 0, ..EmuConfig::default() };
    let (emu, ctrl) = controller(cfg);
    assert_eq!(ctrl.async_requests_outstanding(), 1);
    assert!(emu.raise_event(1, 0, 2));
    // No request outstanding for these two: the controller keeps them for the next ones.
    assert!(!emu.raise_event(1, 1, 2));
    assert!(!emu.raise_event(1, 2, 2));
    assert_eq!(ctrl.poll_admin(), 3, "each re-armed request is answered at once");
    let infos: Vec<u8> = ctrl.take_async_events().iter().map(|e| e.info).collect();
    assert_eq!(infos, [0, 1, 2]);
    assert_eq!(ctrl.async_requests_outstanding(), 1);
}

#[test]
fn with_interrupts_the_admin_reaper_reports_events_by_itself() {
    let _g = serial();
    let (emu, ctrl) = controller(irq_config(2, 2));
    for info in [0u8, 1] {
        assert!(emu.raise_event(1, info, 2), "re-armed after the previous event");
        let deadline = Instant::now() + Duration::from_secs(5);
        let evs = loop {
            let evs = ctrl.take_async_events();
            if !evs.is_empty() || Instant::now() > deadline {
                break evs;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(evs.len(), 1, "event {info} not reported by the reaper within 5 s");
        assert_eq!(evs[0].info, info);
    }
}

#[test]
fn events_can_be_turned_off() {
    let _g = serial();
    let opts = ControllerOptions { async_events: false, ..ControllerOptions::default() };
    let (emu, ctrl) = controller_with(EmuConfig::default(), opts);
    assert_eq!(ctrl.async_requests_outstanding(), 0);
    assert!(!emu.raise_event(1, 0, 2));
    assert_eq!(ctrl.poll_admin(), 0);
}

#[test]
fn dropping_the_controller_joins_its_threads() {
    let _g = serial();
    let before = irq_threads();
    let (emu, ctrl) = controller(irq_config(3, 8));
    let queues: Vec<_> = (0..4).map(|_| ctrl.create_queue_pair_irq(16).unwrap()).collect();
    // The admin reaper, and the relay of shared vector 2.
    assert_eq!(irq_threads_become(before + 2), before + 2);
    drop(queues);
    let start = Instant::now();
    drop(ctrl);
    assert!(start.elapsed() < Duration::from_secs(3), "drop took {:?}", start.elapsed());
    assert_eq!(irq_threads(), before, "interrupt threads outlived their controller");
    // The controller was shut down and disabled.
    assert!(!emu.csts().rdy());
}

/// The guest's driver-level interrupt cases, on the emulated controller (which has no
/// Temperature Threshold feature, so that case is the guest's alone).
#[test]
fn guest_irq_cases_on_the_emulated_controller() {
    let _g = serial();
    for (vectors, queues) in [(2, 8), (17, 16), (1, 4)] {
        let (_emu, ctrl) = controller(irq_config(vectors, queues));
        let t = Target::new(ctrl);
        let cases =
            irq_cases::all().into_iter().filter(|c| !c.name.contains("temperature")).collect();
        let (passed, failed) = nvaio_tests::cases::run_cases(cases, "emu/", &t, None);
        assert_eq!(failed, 0, "{vectors} vectors: {failed} cases failed (see FAIL lines above)");
        assert_eq!(passed, 4);
    }
}
