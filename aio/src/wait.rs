//! Waiting for completions without spinning: a context's completion mode, the [`Waiter`] that
//! sleeps on queue notifiers, and the adaptive spin of hybrid mode.
//!
//! # Who reaps
//! The thread that waits is the thread that reaps. A context owns its queue pairs and is used
//! through `&mut self`, so `io_getevents` itself drains the completion queues when it wakes:
//! completions never cross threads, and nothing on the I/O path takes a lock. The only threads
//! involved live in the driver (`nvaio_nvme::controller`): a relay per shared MSI-X vector, which
//! only turns one interrupt into wake-ups, and the admin reaper.
//!
//! # The waiting protocol
//! Each interrupt-driven queue pair comes with a notifier, an eventfd that becomes readable
//! after its completion queue raised an interrupt. A context registers all of them with one
//! [`Waiter`] and waits like this:
//!
//! 1. poll the completion queues and take what is there;
//! 2. only if that found nothing, [`Waiter::wait`] with what is left of the timeout.
//!
//! The notifiers are watched edge-triggered: every signal of a notifier since the waiter last
//! looked is a readiness event, and [`Waiter::wait`] consumes those events as it returns. A
//! completion posted after the last wait therefore makes the next wait return at once instead
//! of sleeping through it: no wake-up is lost, and the worst case is one spurious round. Nobody
//! reads the eventfds, so a sleep costs one system call (`epoll_pwait2`), not one per notifier.
//! [`Waiter::drain`] consumes pending events without sleeping.
//!
//! The waiter's epoll descriptor ([`Waiter::fd`]) is readable exactly when some notifier is,
//! which makes it the context's notification descriptor: an application adds it to its own
//! epoll set and calls `io_getevents` when it fires.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::str::FromStr;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// How a context learns that commands completed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CompletionMode {
    /// Completion queues without interrupts; `io_getevents` spins on them. Lowest latency, one
    /// busy CPU per waiting thread.
    #[default]
    Polled,
    /// Completion queues raise MSI-X interrupts; `io_getevents` sleeps in the kernel until one
    /// fires.
    Interrupt,
    /// Interrupts as above, but `io_getevents` first spins for a short, adaptive time (see
    /// [`HybridSpin`]) and only then sleeps.
    Hybrid,
}

impl CompletionMode {
    /// Every mode, in the order `nvaio bench --modes` reports them.
    pub const ALL: [CompletionMode; 3] =
        [CompletionMode::Polled, CompletionMode::Interrupt, CompletionMode::Hybrid];

    /// The name [`FromStr`] accepts.
    pub fn as_str(self) -> &'static str {
        match self {
            CompletionMode::Polled => "polled",
            CompletionMode::Interrupt => "interrupt",
            CompletionMode::Hybrid => "hybrid",
        }
    }

    /// Whether queues in this mode are created with interrupts enabled.
    pub fn uses_interrupts(self) -> bool {
        self != CompletionMode::Polled
    }
}

impl std::fmt::Display for CompletionMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A completion mode name that is none of `polled`, `interrupt`, `hybrid`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseModeError(pub String);

impl std::fmt::Display for ParseModeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unknown completion mode '{}' (polled, interrupt or hybrid)", self.0)
    }
}

impl std::error::Error for ParseModeError {}

impl FromStr for CompletionMode {
    type Err = ParseModeError;

    /// Parses `polled`, `interrupt` or `hybrid`, ignoring ASCII case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CompletionMode::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| ParseModeError(s.to_string()))
    }
}

/// Events one epoll call collects; more simply take another call.
const EVENTS_PER_WAIT: usize = 16;

/// Sleeps until one of a set of eventfds is signalled. See the [module docs](self) for the
/// protocol that makes this race-free.
pub struct Waiter {
    epoll: Epoll,
    /// Our own duplicates of the registered descriptors: they stay valid whatever the caller
    /// does with the originals.
    fds: Vec<File>,
}

impl Waiter {
    /// An empty waiter (its [`Waiter::wait`] only times out).
    ///
    /// Errors: those of `epoll_create1` (EMFILE, ENFILE, ENOMEM).
    pub fn new() -> io::Result<Waiter> {
        Ok(Waiter { epoll: Epoll::new()?, fds: Vec::new() })
    }

    /// Watches `fd`, a non-blocking eventfd (a queue's notifier): each signal of it from now on
    /// wakes the waiter once (edge-triggered). The waiter keeps its own duplicate, so `fd` may
    /// be closed afterwards.
    ///
    /// Errors: EBADF if `fd` is not open; EINVAL if it is blocking (draining it could block);
    /// EMFILE; those of `epoll_ctl`.
    pub fn add(&mut self, fd: RawFd) -> io::Result<()> {
        // SAFETY: fcntl with F_DUPFD_CLOEXEC reads no memory; a bad fd is reported as EBADF.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` is a descriptor fcntl just created for us, owned by nothing else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(dup) });
        // SAFETY: as above; F_GETFL reads no memory.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        if flags & libc::O_NONBLOCK == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let token = self.fds.len() as u64;
        self.epoll.ctl(
            ControlOperation::Add,
            file.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, token),
        )?;
        self.fds.push(file);
        Ok(())
    }

    /// How many descriptors are watched.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Consumes the signals that arrived since the last wait, without sleeping; returns how many
    /// descriptors had fired (0: none).
    pub fn drain(&self) -> u64 {
        let mut total = 0;
        loop {
            let n = self.collect(Some(Duration::ZERO)).unwrap_or(0);
            total += n as u64;
            if n < EVENTS_PER_WAIT {
                return total;
            }
        }
    }

    /// Sleeps until a watched descriptor is signalled (`Ok(true)`) or `timeout` passes
    /// (`Ok(false)`); `None` waits without limit, `Some(ZERO)` only looks. The signals it
    /// reports are consumed. A signal handler does not cut the wait short: it resumes with the
    /// time that is left.
    ///
    /// Errors: those of epoll_pwait2(2) other than EINTR.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        Ok(self.collect(timeout)? > 0)
    }

    /// One epoll_pwait2 (epoll_wait on kernels before 5.11), retried on EINTR with the time
    /// left; returns how many events it consumed.
    fn collect(&self, timeout: Option<Duration>) -> io::Result<usize> {
        // A timeout too large to add to the clock is no limit at all.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let ts = left.map(|l| libc::timespec {
                tv_sec: l.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: l.subsec_nanos() as libc::c_long,
            });
            let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
            // SAFETY: the event array and timespec outlive the call; a null signal mask leaves
            // the thread's mask alone.
            let mut r = unsafe {
                libc::syscall(
                    libc::SYS_epoll_pwait2,
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    EVENTS_PER_WAIT as libc::c_int,
                    ts_ptr,
                    std::ptr::null::<libc::sigset_t>(),
                    0usize,
                )
            } as i64;
            if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                // Millisecond resolution, rounded up so a short timeout is not a busy loop.
                let ms = left
                    .map_or(-1, |l| l.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32);
                // SAFETY: as above.
                r = unsafe {
                    libc::epoll_wait(
                        self.epoll.as_raw_fd(),
                        events.as_mut_ptr(),
                        EVENTS_PER_WAIT as libc::c_int,
                        ms,
                    )
                } as i64;
            }
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// The epoll descriptor: readable while signals wait to be consumed. This is the per-context
    /// notification descriptor an application may add to its own epoll set or poll(2); it
    /// closes with the waiter.
    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl AsRawFd for Waiter {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter").field("epoll", &self.fd()).field("fds", &self.fds.len()).finish()
    }
}

/// The spin budget of hybrid mode: how long `io_getevents` polls before it sleeps.
///
/// The policy. Every wait for a completion (with commands in flight) reports how long it took,
/// and whether the spin caught the completion, to [`HybridSpin::record`]. An exponentially
/// weighted moving average (weight 1/8, samples clamped to four times the cap so one long idle
/// stretch cannot dominate) estimates the completion latency. Then:
/// - a wait the spin caught, or one that ended within the cap (a longer spin would have caught
///   it), sets the budget to twice the average, at most the cap: spinning that long catches most
///   completions of a device this fast, and twice the average leaves room for jitter;
/// - a wait that outlasted the cap (the spin was pure loss, and a longer one would not have
///   helped) halves the budget; below half a microsecond it becomes zero, and the context
///   then sleeps at once, as in interrupt mode, until completions speed up again.
///
/// So on a device answering in 10 µs the context spins about 20 µs and rarely sleeps; on one
/// answering in a millisecond it stops spinning after a handful of waits.
#[derive(Clone, Debug)]
pub struct HybridSpin {
    cap_ns: u64,
    ewma_ns: u64,
    budget_ns: u64,
    samples: u64,
}

/// Below this a spin budget is not worth the clock reads: it becomes zero.
const MIN_SPIN_NS: u64 = 500;

impl HybridSpin {
    /// The default cap on one spin.
    pub const DEFAULT_CAP: Duration = Duration::from_micros(50);

    /// A policy whose spins never exceed `cap`. It starts by spinning the whole cap, until the
    /// first waits tell it better.
    pub fn new(cap: Duration) -> HybridSpin {
        let cap_ns = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        HybridSpin { cap_ns, ewma_ns: 0, budget_ns: cap_ns, samples: 0 }
    }

    /// How long to spin before sleeping, now.
    pub fn budget(&self) -> Duration {
        Duration::from_nanos(self.budget_ns)
    }

    /// The completion latency estimate (zero before the first sample).
    pub fn average(&self) -> Duration {
        Duration::from_nanos(self.ewma_ns)
    }

    /// Reports one wait: `waited` from its start until a completion was found, and whether the
    /// spin found it (`false`: the waiter had to sleep). Report only waits with commands in
    /// flight; waits with nothing to wait for say nothing about the device.
    pub fn record(&mut self, waited: Duration, caught_spinning: bool) {
        let ns = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        let sample = ns.min(self.cap_ns.saturating_mul(4));
        self.ewma_ns =
            if self.samples == 0 { sample } else { self.ewma_ns - self.ewma_ns / 8 + sample / 8 };
        self.samples += 1;
        if caught_spinning || sample <= self.cap_ns {
            self.budget_ns = self.ewma_ns.saturating_mul(2).min(self.cap_ns);
        } else {
            self.budget_ns /= 2;
        }
        if self.budget_ns < MIN_SPIN_NS {
            self.budget_ns = 0;
        }
    }

    /// Spins for at most the current budget, calling `poll` until it returns true (something
    /// completed). A successful spin is recorded here; after a fruitless one the caller sleeps
    /// and then calls [`HybridSpin::record`] with the whole wait and `false`. Returns whether
    /// `poll` succeeded.
    pub fn spin(&mut self, mut poll: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        let budget = self.budget();
        loop {
            if poll() {
                self.record(start.elapsed(), true);
                return true;
            }
            if start.elapsed() >= budget {
                return false;
            }
            std::hint::spin_loop();
        }
    }
}

impl Default for HybridSpin {
    fn default() -> Self {
        HybridSpin::new(HybridSpin::DEFAULT_CAP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn mode_names_round_trip() {
        for m in CompletionMode::ALL {
            assert_eq!(m.as_str().parse::<CompletionMode>(), Ok(m));
            assert_eq!(m.to_string(), m.as_str());
        }
        assert_eq!("Interrupt".parse::<CompletionMode>(), Ok(CompletionMode::Interrupt));
        assert!("spin".parse::<CompletionMode>().is_err());
        assert_eq!(CompletionMode::default(), CompletionMode::Polled);
        assert!(!CompletionMode::Polled.uses_interrupts());
        assert!(CompletionMode::Hybrid.uses_interrupts());
    }

    #[test]
    fn an_eventfd_written_by_another_thread_wakes_the_waiter() {
        let mut w = Waiter::new().unwrap();
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        let b = EventFd::new(EFD_NONBLOCK).unwrap();
        w.add(a.as_raw_fd()).unwrap();
        w.add(b.as_raw_fd()).unwrap();
        assert_eq!(w.len(), 2);
        let writer = b.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            writer.write(3).unwrap();
        });
        let start = Instant::now();
        assert!(w.wait(Some(Duration::from_secs(10))).unwrap(), "woken, not timed out");
        assert!(start.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
        // The wait consumed the signal: the next one times out, until a new signal.
        assert!(!w.wait(Some(Duration::ZERO)).unwrap());
        b.write(1).unwrap();
        a.write(1).unwrap();
        assert_eq!(w.drain(), 2, "both descriptors fired");
        assert_eq!(w.drain(), 0);
        assert!(!w.wait(Some(Duration::ZERO)).unwrap());
    }

    #[test]
    fn the_timeout_is_honoured() {
        let mut w = Waiter::new().unwrap();
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        w.add(a.as_raw_fd()).unwrap();
        let start = Instant::now();
        assert!(!w.wait(Some(Duration::from_millis(100))).unwrap());
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(100), "returned early after {took:?}");
        assert!(took < Duration::from_secs(2), "overslept: {took:?}");
        // An empty waiter only times out.
        let empty = Waiter::new().unwrap();
        assert!(empty.is_empty());
        assert!(!empty.wait(Some(Duration::from_millis(1))).unwrap());
    }

    #[test]
    fn the_waiter_keeps_its_own_descriptor() {
        let mut w = Waiter::new().unwrap();
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        let writer = a.try_clone().unwrap();
        w.add(a.as_raw_fd()).unwrap();
        drop(a);
        writer.write(1).unwrap();
        assert!(w.wait(Some(Duration::ZERO)).unwrap());
        writer.write(1).unwrap();
        assert_eq!(w.drain(), 1);
    }

    #[test]
    fn blocking_and_closed_descriptors_are_refused() {
        let mut w = Waiter::new().unwrap();
        let blocking = EventFd::new(0).unwrap();
        let e = w.add(blocking.as_raw_fd()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        let e = w.add(-1).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        assert!(w.is_empty());
    }

    #[test]
    fn the_epoll_fd_is_a_notification_fd() {
        let mut w = Waiter::new().unwrap();
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        w.add(a.as_raw_fd()).unwrap();
        let readable = |fd: RawFd| {
            let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd, no timeout.
            let r = unsafe { libc::poll(&mut pfd, 1, 0) };
            r == 1 && pfd.revents & libc::POLLIN != 0
        };
        assert!(!readable(w.fd()));
        a.write(1).unwrap();
        assert!(readable(w.fd()));
        w.drain();
        assert!(!readable(w.fd()));
    }

    #[test]
    fn hybrid_spin_follows_a_fast_device() {
        let mut h = HybridSpin::default();
        assert_eq!(h.budget(), HybridSpin::DEFAULT_CAP, "starts optimistic");
        for _ in 0..50 {
            h.record(Duration::from_micros(10), true);
        }
        let b = h.budget();
        assert!(b >= Duration::from_micros(18) && b <= Duration::from_micros(22), "{b:?}");
        assert!(h.average() >= Duration::from_micros(9), "{:?}", h.average());
        // Latencies near the cap: the budget is capped.
        for _ in 0..50 {
            h.record(Duration::from_micros(40), true);
        }
        assert_eq!(h.budget(), HybridSpin::DEFAULT_CAP);
    }

    #[test]
    fn hybrid_spin_stops_spinning_on_a_slow_device_and_recovers() {
        let mut h = HybridSpin::default();
        let mut budgets = Vec::new();
        for _ in 0..10 {
            h.record(Duration::from_millis(1), false);
            budgets.push(h.budget());
        }
        assert!(budgets.windows(2).all(|w| w[1] <= w[0]), "only shrinks: {budgets:?}");
        assert_eq!(h.budget(), Duration::ZERO, "{budgets:?}");
        // One idle stretch does not poison the estimate for long.
        h.record(Duration::from_secs(2), false);
        assert!(h.average() <= HybridSpin::DEFAULT_CAP * 4);
        // A wait that a spin would have caught brings spinning back at once.
        h.record(Duration::from_micros(20), false);
        assert!(h.budget() > Duration::ZERO);
        for _ in 0..60 {
            h.record(Duration::from_micros(5), true);
        }
        assert!(h.budget() <= Duration::from_micros(12), "{:?}", h.budget());
    }

    #[test]
    fn hybrid_spin_spins_only_its_budget() {
        let mut h = HybridSpin::new(Duration::from_micros(200));
        let start = Instant::now();
        assert!(!h.spin(|| false));
        let took = start.elapsed();
        assert!(took >= Duration::from_micros(200), "{took:?}");
        let mut n = 0;
        assert!(h.spin(|| {
            n += 1;
            n == 3
        }));
        assert!(h.average() < Duration::from_millis(100));
        let mut zero = HybridSpin::new(Duration::ZERO);
        assert!(!zero.spin(|| false));
    }
}
