//! `nvaio bench`: keeps `qd` requests in flight on one AIO context for a while and reports
//! IOPS, bandwidth, latency percentiles and CPU cost.
//!
//! Everything the timed loop touches is allocated before it starts: one buffer per in-flight
//! slot (carved from one aligned allocation), one iocb per slot whose `aio_data` is the slot
//! index, the event array, the free-slot stack and the latency histogram. Per I/O the loop only
//! writes an offset and a timestamp, and reads the clock once per batch of completions.

use std::time::{Duration, Instant};

use clap::ValueEnum;
use nvaio::wait::CompletionMode;
use nvaio::{Context, ContextOptions, IoEvent, Iocb};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::histogram::Histogram;
use crate::target::{AlignedBuf, Target, EVENT_WAIT};
use crate::units::human_bytes;

/// Most iocbs handed to one `submit` call.
const BATCH: usize = 64;

/// Most memory the slot buffers may take.
const MAX_BUFFERS: u64 = 4 << 30;

/// Slot buffers start on page boundaries.
const SLOT_ALIGN: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Pattern {
    /// Sequential reads, wrapping around at the end of the region.
    Read,
    /// Sequential writes, wrapping around at the end of the region.
    Write,
    /// Reads at random block-size-aligned offsets.
    Randread,
    /// Writes at random block-size-aligned offsets.
    Randwrite,
}

impl Pattern {
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::Randread => "randread",
            Pattern::Randwrite => "randwrite",
        }
    }

    pub fn is_write(self) -> bool {
        matches!(self, Pattern::Write | Pattern::Randwrite)
    }

    fn is_random(self) -> bool {
        matches!(self, Pattern::Randread | Pattern::Randwrite)
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Params {
    pub pattern: Pattern,
    /// Bytes per I/O.
    pub bs: u64,
    pub qd: u32,
    pub duration: Duration,
    pub warmup: Duration,
    /// Bytes of the namespace to use, from offset 0; `None` for all of it.
    pub size: Option<u64>,
    /// How the context learns of completions.
    pub mode: CompletionMode,
    /// Register the I/O buffers with the context, so data moves without bounce copies.
    pub zero_copy: bool,
}

/// The checked layout of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan {
    bs: u64,
    /// Bytes used, a multiple of `bs`.
    region: u64,
    /// `region / bs`: how many distinct offsets there are.
    slots_in_region: u64,
    /// Distance between two slot buffers.
    stride: u64,
}

fn plan(p: &Params, block_size: u64, ns_bytes: u64) -> Result<Plan> {
    let bs = p.bs;
    if bs == 0 || !bs.is_multiple_of(block_size) {
        return Err(Error::msg(format!(
            "--bs {bs} is not a multiple of the namespace's {block_size}-byte block size"
        )));
    }
    if bs > nvaio::abi::MAX_RW_COUNT {
        return Err(Error::msg(format!(
            "--bs {} is larger than one request can be (2 GiB)",
            human_bytes(bs)
        )));
    }
    if p.qd == 0 {
        return Err(Error::msg("--qd must be at least 1"));
    }
    let size = p.size.unwrap_or(ns_bytes);
    if size > ns_bytes {
        return Err(Error::msg(format!(
            "--size {} is larger than the namespace ({})",
            human_bytes(size),
            human_bytes(ns_bytes)
        )));
    }
    let region = size / bs * bs;
    if region == 0 {
        return Err(Error::msg(format!(
            "the region ({}) is smaller than one I/O of --bs {}",
            human_bytes(size),
            human_bytes(bs)
        )));
    }
    let stride = bs.next_multiple_of(SLOT_ALIGN);
    let memory = stride.saturating_mul(u64::from(p.qd));
    if memory > MAX_BUFFERS {
        return Err(Error::msg(format!(
            "--qd {} × --bs {} needs {} of buffers; keep it within {}",
            p.qd,
            human_bytes(bs),
            human_bytes(memory),
            human_bytes(MAX_BUFFERS)
        )));
    }
    Ok(Plan { bs, region, slots_in_region: region / bs, stride })
}

/// xorshift64*: cheap, and random enough to spread offsets.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng((t ^ u64::from(std::process::id()).rotate_left(32)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (multiply-high, no division).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// Where the next I/O goes.
struct Offsets {
    random: bool,
    rng: Rng,
    next: u64,
    plan: Plan,
}

impl Offsets {
    fn next(&mut self) -> u64 {
        if self.random {
            self.rng.below(self.plan.slots_in_region) * self.plan.bs
        } else {
            let at = self.next;
            self.next += self.plan.bs;
            if self.next >= self.plan.region {
                self.next = 0;
            }
            at
        }
    }
}

/// Process CPU time (user, system) so far.
fn cpu_times() -> (Duration, Duration) {
    use nix::sys::resource::{getrusage, UsageWho};
    use nix::sys::time::TimeValLike;
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let d = |t: nix::sys::time::TimeVal| {
                Duration::from_micros(t.num_microseconds().max(0) as u64)
            };
            (d(u.user_time()), d(u.system_time()))
        }
        // getrusage(RUSAGE_SELF) only fails for a bad pointer; report zero rather than abort.
        Err(_) => (Duration::ZERO, Duration::ZERO),
    }
}

/// The first failed I/O of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirstError {
    /// `res` of its event: a negative errno, or a short byte count.
    pub res: i64,
    pub offset: u64,
}

/// The results of a run.
#[derive(Debug)]
pub struct Report {
    pub device: String,
    pub nsid: u32,
    pub block_size: u64,
    pub pattern: Pattern,
    pub bs: u64,
    pub qd: u32,
    pub region: u64,
    pub warmup: Duration,
    /// The measured window (the requested duration, give or take one completion).
    pub elapsed: Duration,
    /// I/Os completed in the measured window.
    pub ios: u64,
    pub latency_ns: Histogram,
    pub cpu_user: Duration,
    pub cpu_sys: Duration,
    /// Failed I/Os in the whole run (warmup and drain included).
    pub errors: u64,
    pub first_error: Option<FirstError>,
    /// Requests that waited for queue slots or bounce pages in the AIO layer.
    pub queue_waits: u64,
    pub mode: CompletionMode,
    /// Commands whose data moved without a bounce copy.
    pub zero_copy_commands: u64,
}

impl Report {
    pub fn iops(&self) -> f64 {
        per_sec(self.ios as f64, self.elapsed)
    }

    pub fn bytes(&self) -> u64 {
        self.ios * self.bs
    }

    pub fn mib_per_s(&self) -> f64 {
        per_sec(self.bytes() as f64 / (1u64 << 20) as f64, self.elapsed)
    }

    pub fn mb_per_s(&self) -> f64 {
        per_sec(self.bytes() as f64 / 1e6, self.elapsed)
    }

    pub fn cpu(&self) -> Duration {
        self.cpu_user + self.cpu_sys
    }

    pub fn iops_per_cpu_sec(&self) -> f64 {
        per_sec(self.ios as f64, self.cpu())
    }

    fn us(&self, ns: u64) -> f64 {
        ns as f64 / 1000.0
    }

    pub fn latency_us(&self) -> [(&'static str, f64); 7] {
        let h = &self.latency_ns;
        [
            ("min", self.us(h.min())),
            ("mean", h.mean() / 1000.0),
            ("p50", self.us(h.percentile(50.0))),
            ("p90", self.us(h.percentile(90.0))),
            ("p99", self.us(h.percentile(99.0))),
            ("p99.9", self.us(h.percentile(99.9))),
            ("max", self.us(h.max())),
        ]
    }

    pub fn first_error_text(&self) -> Option<String> {
        self.first_error.as_ref().map(|f| {
            let what = if f.res < 0 {
                let errno =
                    f.res.checked_neg().and_then(|e| i32::try_from(e).ok()).unwrap_or(libc::EIO);
                std::io::Error::from_raw_os_error(errno).to_string()
            } else {
                format!("short transfer of {} bytes", f.res)
            };
            format!("{what} at LBA {} (byte offset {})", f.offset / self.block_size, f.offset)
        })
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        let secs = self.elapsed.as_secs_f64();
        s += &format!("  ios:        {} in {secs:.2} s\n", self.ios);
        s += &format!("  iops:       {:.0}\n", self.iops());
        s +=
            &format!("  bandwidth:  {:.2} MiB/s ({:.2} MB/s)\n", self.mib_per_s(), self.mb_per_s());
        s += "  latency us:";
        for (name, v) in self.latency_us() {
            s += &format!(" {name} {v:.1}");
        }
        s += "\n";
        let cpu = self.cpu().as_secs_f64();
        s += &format!(
            "  cpu:        {cpu:.2} s (user {:.2}, sys {:.2}), {:.0}% of one CPU, {:.0} IOPS per CPU-second\n",
            self.cpu_user.as_secs_f64(),
            self.cpu_sys.as_secs_f64(),
            if secs > 0.0 { cpu / secs * 100.0 } else { 0.0 },
            self.iops_per_cpu_sec()
        );
        s += &format!("  queue waits: {}\n", self.queue_waits);
        s += &format!(
            "  mode:       {}{}\n",
            self.mode,
            if self.zero_copy_commands > 0 { ", zero-copy" } else { "" }
        );
        s += &format!("  errors:     {}", self.errors);
        if let Some(first) = self.first_error_text() {
            s += &format!(" (first: {first})");
        }
        s += "\n";
        s
    }

    pub fn json(&self) -> Value {
        let lat: serde_json::Map<String, Value> = self
            .latency_us()
            .iter()
            .map(|(k, v)| (k.replace('.', "_"), json!(round3(*v))))
            .collect();
        json!({
            "device": self.device,
            "nsid": self.nsid,
            "block_size": self.block_size,
            "rw": self.pattern.name(),
            "bs": self.bs,
            "qd": self.qd,
            "size": self.region,
            "warmup_s": self.warmup.as_secs_f64(),
            "duration_s": round3(self.elapsed.as_secs_f64()),
            "ios": self.ios,
            "bytes": self.bytes(),
            "iops": round3(self.iops()),
            "mib_per_s": round3(self.mib_per_s()),
            "mb_per_s": round3(self.mb_per_s()),
            "latency_us": Value::Object(lat),
            "cpu_user_s": round3(self.cpu_user.as_secs_f64()),
            "cpu_sys_s": round3(self.cpu_sys.as_secs_f64()),
            "cpu_s": round3(self.cpu().as_secs_f64()),
            "iops_per_cpu_s": round3(self.iops_per_cpu_sec()),
            "queue_waits": self.queue_waits,
            "mode": self.mode.as_str(),
            "zero_copy_commands": self.zero_copy_commands,
            "errors": self.errors,
            "first_error": self.first_error_text(),
        })
    }
}

/// Reports of the same run in several completion modes, one row each.
pub fn side_by_side(reports: &[Report]) -> String {
    let mut s = String::from(
        "  mode        iops      p50     p90     p99   p99.9      max  cpu%  cpu-us/io\n",
    );
    for r in reports {
        let lat = r.latency_us();
        let wall = r.elapsed.as_secs_f64();
        let cpu = r.cpu().as_secs_f64();
        let cpu_pct = if wall > 0.0 { 100.0 * cpu / wall } else { 0.0 };
        let per_io = if r.ios > 0 { cpu * 1e6 / r.ios as f64 } else { 0.0 };
        s += &format!(
            "  {:<9} {:>7.0} {:>8.1} {:>7.1} {:>7.1} {:>7.1} {:>8.1} {:>5.0} {:>10.1}\n",
            r.mode.as_str(),
            r.iops(),
            lat[2].1,
            lat[3].1,
            lat[4].1,
            lat[5].1,
            lat[6].1,
            cpu_pct,
            per_io
        );
    }
    s += "  (latency in microseconds; cpu% of one CPU over the measured window)\n";
    s
}

fn per_sec(x: f64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        x / s
    } else {
        0.0
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One line saying what is about to run; fails as [`run`] would on parameters that do not
/// fit the namespace.
pub fn describe(t: &Target, p: &Params) -> Result<String> {
    let plan = plan(p, t.block_size(), t.ns.size_bytes())?;
    Ok(format!(
        "bench {} nsid {}: {}, bs {}, qd {}, {:.1} s after {:.1} s warmup, region {} of {} \
         ({}-byte blocks)",
        t.name,
        t.ns.nsid,
        p.pattern.name(),
        human_bytes(plan.bs),
        p.qd,
        p.duration.as_secs_f64(),
        p.warmup.as_secs_f64(),
        human_bytes(plan.region),
        human_bytes(t.ns.size_bytes()),
        t.ns.block_size
    ))
}

/// Runs the benchmark on an open namespace.
pub fn run(t: &Target, p: &Params) -> Result<Report> {
    let plan = plan(p, t.block_size(), t.ns.size_bytes())?;
    let qd = p.qd as usize;

    // Declared before the context so they are dropped after it: the context's drop waits for
    // requests still in flight, which point into these buffers.
    let mut buffers =
        AlignedBuf::new((plan.stride * u64::from(p.qd)) as usize, SLOT_ALIGN as usize)?;
    if p.pattern.is_write() {
        // Incompressible bytes, written once.
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for chunk in buffers.as_mut_slice().chunks_mut(8) {
            let b = rng.next().to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
    let base = buffers.ptr();
    let mut iocbs: Vec<Iocb> = (0..qd)
        .map(|slot| {
            let buf = base.wrapping_add(slot * plan.stride as usize);
            let iocb = if p.pattern.is_write() {
                Iocb::pwrite(t.fd, buf, plan.bs as usize, 0)
            } else {
                Iocb::pread(t.fd, buf, plan.bs as usize, 0)
            };
            iocb.with_data(slot as u64)
        })
        .collect();
    let mut started = vec![Instant::now(); qd];
    let mut free: Vec<u32> = (0..p.qd).rev().collect();
    // Which slots have a request out, so a stray or repeated event cannot corrupt `free`.
    let mut busy = vec![false; qd];
    let mut events = vec![IoEvent::default(); qd];
    let mut hist = Histogram::new();
    let mut offsets = Offsets { random: p.pattern.is_random(), rng: Rng::seeded(), next: 0, plan };
    let opts = ContextOptions { mode: p.mode, ..ContextOptions::default() };
    let mut ctx = Context::with_options(p.qd, opts)
        .map_err(|e| Error::msg(format!("io_setup({}): {e}", p.qd)))?;
    if p.zero_copy {
        let len = buffers.as_mut_slice().len();
        // SAFETY: `buffers` is declared before the context, so it is dropped after it: the
        // registration (undone when the context drops) never outlives the memory.
        #[allow(unsafe_code)]
        unsafe { ctx.register_buffer(base, len) }
            .map_err(|e| Error::msg(format!("cannot register the I/O buffers: {e}")))?;
    }

    let mut ios = 0u64;
    let mut errors = 0u64;
    let mut first_error = None;

    let t0 = Instant::now();
    let measure_from = t0 + p.warmup;
    let stop_at = measure_from + p.duration;
    let mut window: Option<(Instant, (Duration, Duration))> = None;
    let mut finished: Option<(Instant, (Duration, Duration))> = None;
    let mut last_progress = t0;

    loop {
        let now = Instant::now();
        if window.is_none() && now >= measure_from {
            window = Some((now, cpu_times()));
        }
        if finished.is_none() && now >= stop_at {
            finished = Some((now, cpu_times()));
        }
        let in_flight = qd - free.len();
        if finished.is_some() && in_flight == 0 {
            break;
        }

        // Refill every free slot, up to BATCH iocbs per submit call.
        if finished.is_none() {
            while !free.is_empty() {
                let n = free.len().min(BATCH);
                let top = free.len();
                for &slot in &free[top - n..] {
                    iocbs[slot as usize].aio_offset = offsets.next() as i64;
                    started[slot as usize] = now;
                }
                let mut batch: [&Iocb; BATCH] = [&iocbs[0]; BATCH];
                for (k, &slot) in free[top - n..].iter().rev().enumerate() {
                    batch[k] = &iocbs[slot as usize];
                }
                // The batch lists the free stack from its top down, so the queued prefix is the
                // top of the stack.
                // SAFETY: `buffers` is declared before the context and so outlives every
                // request (dropping the context waits for those in flight).
                #[allow(unsafe_code)]
                let submitted = unsafe { ctx.submit(&batch[..n]) };
                match submitted {
                    Ok(queued) => {
                        let queued = queued.min(n);
                        for &slot in &free[top - queued..] {
                            busy[slot as usize] = true;
                        }
                        free.truncate(top - queued);
                        if queued < n {
                            break;
                        }
                    }
                    Err(e) if e.0 == libc::EAGAIN => break,
                    Err(e) => return Err(Error::msg(format!("io_submit failed: {e}"))),
                }
            }
        }

        let got = ctx
            .get_events(1, &mut events, Some(Duration::from_millis(100)))
            .map_err(|e| Error::msg(format!("io_getevents failed: {e}")))?;
        let done = Instant::now();
        if got == 0 {
            if qd - free.len() > 0 && done.duration_since(last_progress) > EVENT_WAIT {
                return Err(Error::msg(format!(
                    "no I/O completed for {} s with {} in flight: the controller stopped \
                     answering",
                    EVENT_WAIT.as_secs(),
                    qd - free.len()
                )));
            }
            continue;
        }
        last_progress = done;
        let counting = window.is_some() && finished.is_none();
        for ev in &events[..got] {
            let slot = ev.data as usize;
            if slot >= qd || !busy[slot] {
                // Not a request of ours that is out: the AIO layer misreported something.
                return Err(Error::msg(format!(
                    "an event came back for aio_data {}, which has no request in flight",
                    ev.data
                )));
            }
            busy[slot] = false;
            if ev.res == plan.bs as i64 {
                if counting {
                    hist.record(done.duration_since(started[slot]).as_nanos() as u64);
                    ios += 1;
                }
            } else {
                errors += 1;
                if first_error.is_none() {
                    first_error =
                        Some(FirstError { res: ev.res, offset: iocbs[slot].aio_offset as u64 });
                }
            }
            free.push(slot as u32);
        }
    }

    let queue_waits = ctx.stats().waits;
    let zero_copy_commands = ctx.stats().zero_copy;
    ctx.destroy();
    let (start, cpu0) = window.unwrap_or((stop_at, cpu_times()));
    let (end, cpu1) = finished.unwrap_or((start, cpu0));
    Ok(Report {
        device: t.name.clone(),
        nsid: t.ns.nsid,
        block_size: t.block_size(),
        pattern: p.pattern,
        bs: plan.bs,
        qd: p.qd,
        region: plan.region,
        warmup: p.warmup,
        elapsed: end.saturating_duration_since(start),
        ios,
        latency_ns: hist,
        cpu_user: cpu1.0.saturating_sub(cpu0.0),
        cpu_sys: cpu1.1.saturating_sub(cpu0.1),
        errors,
        first_error,
        queue_waits,
        mode: p.mode,
        zero_copy_commands,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdev;
    use nvaio::Access;
    use nvaio_nvme::emu::{FaultAction, FaultRule};
    use nvaio_nvme::spec::status::{media, sct};
    use nvaio_nvme::spec::Status;

    fn params(pattern: Pattern) -> Params {
        Params {
            pattern,
            bs: 4096,
            qd: 8,
            duration: Duration::from_millis(200),
            warmup: Duration::from_millis(20),
            size: None,
            mode: CompletionMode::Polled,
            zero_copy: false,
        }
    }

    #[test]
    fn plans() {
        let ns = 64 << 20;
        let p = params(Pattern::Randread);
        assert_eq!(
            plan(&p, 512, ns).unwrap(),
            Plan { bs: 4096, region: ns, slots_in_region: ns / 4096, stride: 4096 }
        );
        let odd = Params { bs: 1536, size: Some(10_000), ..p.clone() };
        assert_eq!(
            plan(&odd, 512, ns).unwrap(),
            Plan { bs: 1536, region: 9216, slots_in_region: 6, stride: 4096 }
        );
        let e = |p: Params, block| plan(&p, block, ns).unwrap_err().to_string();
        assert!(e(Params { bs: 1000, ..p.clone() }, 512).contains("not a multiple"));
        assert!(e(Params { bs: 512, ..p.clone() }, 4096).contains("4096-byte block size"));
        assert!(e(Params { size: Some(ns + 1), ..p.clone() }, 512)
            .contains("larger than the namespace"));
        assert!(e(Params { size: Some(100), ..p.clone() }, 512).contains("smaller than one I/O"));
        assert!(e(Params { qd: 0, ..p.clone() }, 512).contains("--qd"));
        assert!(e(Params { qd: 4096, bs: 4 << 20, ..p.clone() }, 512).contains("of buffers"));
    }

    #[test]
    fn offsets_stay_aligned_and_inside() {
        let plan = Plan { bs: 4096, region: 40960, slots_in_region: 10, stride: 4096 };
        let mut o = Offsets { random: true, rng: Rng(12345), next: 0, plan };
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            let at = o.next();
            assert_eq!(at % 4096, 0);
            assert!(at < 40960);
            seen[(at / 4096) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
        let mut o = Offsets { random: false, rng: Rng(1), next: 0, plan };
        let seq: Vec<u64> = (0..12).map(|_| o.next() / 4096).collect();
        assert_eq!(seq, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]);
    }

    #[test]
    fn runs_every_pattern_on_the_emulator() {
        let (emu, ctrl) = testdev::controller(testdev::config());
        let t = Target::on(ctrl, "emu", 1, Access::ReadWrite).unwrap();
        let odd = Params { bs: 1000, ..params(Pattern::Read) };
        assert!(describe(&t, &odd).unwrap_err().to_string().contains("--bs 1000"));
        for pattern in [Pattern::Randread, Pattern::Read, Pattern::Randwrite, Pattern::Write] {
            let p = Params { size: Some((1 << 20) + 100), ..params(pattern) };
            let line = describe(&t, &p).unwrap();
            assert!(line.contains(&format!("{}, bs 4 KiB, qd 8,", pattern.name())), "{line}");
            assert!(line.contains("region 1 MiB of 64 MiB (512-byte blocks)"), "{line}");
            let r = run(&t, &p).unwrap();
            assert_eq!(r.errors, 0, "{pattern:?}");
            assert!(r.ios > 0, "{pattern:?}");
            assert_eq!(r.latency_ns.count(), r.ios);
            let secs = r.elapsed.as_secs_f64();
            // The window is measured between the loop passes that crossed its ends.
            assert!((0.1..1.0).contains(&secs), "{secs}");
            assert!(r.iops() > 0.0 && r.mib_per_s() > 0.0);
            let lat = r.latency_us();
            let ordered: Vec<f64> = lat.iter().filter(|l| l.0 != "mean").map(|l| l.1).collect();
            assert!(ordered.windows(2).all(|w| w[0] <= w[1]), "{lat:?}");
            let j = r.json();
            assert_eq!(j["rw"], pattern.name());
            assert_eq!(j["errors"], 0);
            assert!(j["latency_us"]["p99_9"].as_f64().unwrap() > 0.0);
            assert!(r.text().contains("errors:     0\n"));
        }
        // Writes stayed inside the 1 MiB region.
        assert!(emu.namespace_read(1, 1 << 20, 4096).iter().all(|&b| b == 0));
        assert!(emu.namespace_read(1, 0, 4096).iter().any(|&b| b != 0));
    }

    #[test]
    fn counts_errors() {
        let (emu, ctrl) = testdev::controller(testdev::config());
        let t = Target::on(ctrl, "emu", 1, Access::ReadWrite).unwrap();
        let status = Status::new(sct::MEDIA, media::UNRECOVERED_READ_ERROR).with_dnr();
        emu.inject(FaultRule::new(FaultAction::Fail(status)).lbas(0..8).times(3));
        let p = Params { size: Some(8 * 4096), qd: 2, ..params(Pattern::Read) };
        let r = run(&t, &p).unwrap();
        assert_eq!(r.errors, 3);
        assert_eq!(r.first_error.as_ref().unwrap().offset, 0);
        let text = r.first_error_text().unwrap();
        assert!(text.contains("No data available") && text.contains("LBA 0"), "{text}");
        assert!(r.ios > 0);
    }

    #[test]
    fn zero_copy_and_modes_side_by_side() {
        let cfg = nvaio_nvme::emu::EmuConfig { msix_vectors: 4, ..testdev::config() };
        let (_emu, ctrl) = testdev::controller(cfg);
        let t = Target::on(ctrl, "emu", 1, Access::ReadWrite).unwrap();
        let mut reports = Vec::new();
        for mode in CompletionMode::ALL {
            let p = Params { mode, zero_copy: true, qd: 1, ..params(Pattern::Randread) };
            let r = run(&t, &p).unwrap();
            assert_eq!(r.errors, 0, "{mode}");
            assert!(r.ios > 0, "{mode}");
            assert_eq!(r.mode, mode);
            // Every command of the run went straight to the registered buffers.
            assert!(r.zero_copy_commands >= r.ios, "{mode}: {} of {}", r.zero_copy_commands, r.ios);
            assert_eq!(r.json()["mode"], mode.as_str());
            reports.push(r);
        }
        let table = side_by_side(&reports);
        assert_eq!(table.lines().count(), 5, "{table}");
        for mode in CompletionMode::ALL {
            assert!(table.contains(&format!("  {mode} ")), "{table}");
        }
    }
}
