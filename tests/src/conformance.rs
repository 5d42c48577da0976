//! The differential conformance suite: one table of cases, each a sequence of AIO calls with
//! their arguments, run against the kernel's AIO on a namespace held by the kernel's nvme driver
//! and against nvaio on an identically configured controller bound to vfio-pci. Every step's
//! outcome (return value or errno, events with res, res2, data and obj, data read back, event
//! ring header fields, iocb keys) is recorded on each and compared with the kernel's.
//!
//! nvaio runs the table twice: through its C ABI ([`CAbi`]: the `extern "C"` functions a C
//! program links in place of libaio, with libaio's argument types, so that every call the
//! kernel is given can be given to nvaio too), and through its Rust API ([`RustApi`]:
//! `nvaio::Context`, which the C ABI wraps, and which waits for events its own way).
//!
//! The reference is Linux 6.1 (fs/aio.c, block/fops.c) as the guest runs it: the kernel's answer
//! is the ground truth, whatever older man pages say. Where nvaio differs on purpose, the case says
//! so and why; a declared difference that does not show up fails too, so the table stays true.
//!
//! Both runs of a case use the same iocb, iovec and buffer memory, so an event's `obj` (the iocb's
//! address) is compared as is; it is printed as `#i` for the case's iocb `i` and `F` for the
//! copies used to fill a context. Events are compared as a set wherever completion order is not
//! defined.
//!
//! Some steps pass what the Rust API cannot express (a negative `nr`, a non-zero or NULL `ctxp`,
//! a NULL iocb pointer, a raw timespec, a context that was destroyed, an iocb's key read back):
//! the Rust API run marks them `n/a` and the C ABI run compares them. A case any of whose steps
//! no nvaio backend could express would count as `not compared`, neither passed nor failed.

use crate::cases::pattern;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvaio::abi::{opcode, rwf, AioRingHeader, IOCB_FLAG_IOPRIO, IOCB_FLAG_RESFD};
use nvaio::capi::{self, IoContextT};
use nvaio::{Access, Context, IoEvent, Iocb};
use nvaio_nvme::Controller;

// ---------------------------------------------------------------------------------------------
// The table's vocabulary

/// A size or position. Offsets of the `B`, `L` and `LB` forms are relative to the case's own
/// region of the namespace; `End` forms count from the end of the namespace; `Abs` is taken as is.
#[derive(Clone, Copy, Debug)]
pub enum Sz {
    /// Bytes.
    B(i64),
    /// Logical blocks.
    L(i64),
    /// Logical blocks plus bytes.
    LB(i64, i64),
    /// The end of the namespace plus this many logical blocks.
    End(i64),
    /// The end of the namespace plus logical blocks plus bytes.
    EndB(i64, i64),
    /// An absolute value, not relative to anything.
    Abs(i64),
}

/// A descriptor, by role. `Rw`, `Ro` and `Wo` are each backend's own namespace descriptors;
/// the others are the same kernel descriptors for both.
#[derive(Clone, Copy, Debug)]
pub enum Fd {
    Rw,
    Ro,
    Wo,
    /// A descriptor number that is not open.
    Closed,
    /// A regular file.
    File,
    /// One of the case's eventfds (0..3), fresh for each backend's run.
    Efd(u8),
}

/// One iovec of a vectored request: `len` bytes at offset `off` of buffer `buf`.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    pub buf: u8,
    pub off: Sz,
    pub len: Sz,
}

/// What `aio_buf` points at.
#[derive(Clone, Copy, Debug)]
pub enum Mem {
    /// Zero.
    Null,
    /// Byte `off` of buffer `buf` (0..8, 1 MiB each, page aligned).
    At(u8, Sz),
    /// An iovec array.
    Iov(&'static [Seg]),
    /// An iovec array of `n` copies of one segment.
    IovRep(u16, Seg),
    /// A page of this process that is mapped PROT_NONE.
    Unmapped,
    /// A page of zeroes mapped PROT_READ.
    ReadOnly,
    /// A literal value.
    Raw(u64),
}

/// An iocb template. `len` is `aio_nbytes` (the iovec count for the vectored opcodes).
#[derive(Clone, Copy, Debug)]
pub struct Io {
    pub op: u16,
    pub fd: Fd,
    pub mem: Mem,
    pub len: Sz,
    pub off: Sz,
    pub rw_flags: u32,
    pub flags: u32,
    pub resfd: Option<Fd>,
    pub reqprio: i16,
    pub reserved2: u64,
    pub key: u32,
    /// `aio_data`; by default 0xda7a0000 + the iocb's index.
    pub data: Option<u64>,
}

const IO: Io = Io {
    op: opcode::PREAD,
    fd: Fd::Rw,
    mem: Mem::At(0, Sz::B(0)),
    len: Sz::L(1),
    off: Sz::L(0),
    rw_flags: 0,
    flags: 0,
    resfd: None,
    reqprio: 0,
    reserved2: 0,
    key: 0,
    data: None,
};

/// `len` bytes read at `off` into buffer `buf`.
pub const fn rd(buf: u8, len: Sz, off: Sz) -> Io {
    Io { op: opcode::PREAD, mem: Mem::At(buf, Sz::B(0)), len, off, ..IO }
}

/// `len` bytes written at `off` from buffer `buf`.
pub const fn wr(buf: u8, len: Sz, off: Sz) -> Io {
    Io { op: opcode::PWRITE, mem: Mem::At(buf, Sz::B(0)), len, off, ..IO }
}

pub const fn readv(segs: &'static [Seg], off: Sz) -> Io {
    Io { op: opcode::PREADV, mem: Mem::Iov(segs), len: Sz::Abs(segs.len() as i64), off, ..IO }
}

pub const fn writev(segs: &'static [Seg], off: Sz) -> Io {
    Io { op: opcode::PWRITEV, mem: Mem::Iov(segs), len: Sz::Abs(segs.len() as i64), off, ..IO }
}

/// An iocb with every field but the opcode and descriptor zero, as io_prep_fsync makes it.
pub const fn bare(op: u16) -> Io {
    Io { op, mem: Mem::Null, len: Sz::Abs(0), off: Sz::Abs(0), ..IO }
}

pub const fn seg(buf: u8, off: Sz, len: Sz) -> Seg {
    Seg { buf, off, len }
}

impl Io {
    pub const fn on(mut self, fd: Fd) -> Io {
        self.fd = fd;
        self
    }
    pub const fn op(mut self, op: u16) -> Io {
        self.op = op;
        self
    }
    pub const fn mem(mut self, mem: Mem) -> Io {
        self.mem = mem;
        self
    }
    pub const fn len(mut self, len: Sz) -> Io {
        self.len = len;
        self
    }
    pub const fn off(mut self, off: Sz) -> Io {
        self.off = off;
        self
    }
    pub const fn rwf(mut self, f: u32) -> Io {
        self.rw_flags = f;
        self
    }
    pub const fn flags(mut self, f: u32) -> Io {
        self.flags = f;
        self
    }
    /// Sets IOCB_FLAG_RESFD with `aio_resfd` = `fd`.
    pub const fn resfd(mut self, fd: Fd) -> Io {
        self.flags |= IOCB_FLAG_RESFD;
        self.resfd = Some(fd);
        self
    }
    /// Sets `aio_resfd` without IOCB_FLAG_RESFD.
    pub const fn resfd_only(mut self, fd: Fd) -> Io {
        self.resfd = Some(fd);
        self
    }
    /// Sets IOCB_FLAG_IOPRIO with `aio_reqprio` = `p`.
    pub const fn prio(mut self, p: i16) -> Io {
        self.flags |= IOCB_FLAG_IOPRIO;
        self.reqprio = p;
        self
    }
    /// Sets `aio_reqprio` without IOCB_FLAG_IOPRIO.
    pub const fn reqprio(mut self, p: i16) -> Io {
        self.reqprio = p;
        self
    }
    pub const fn reserved2(mut self, v: u64) -> Io {
        self.reserved2 = v;
        self
    }
    pub const fn key(mut self, k: u32) -> Io {
        self.key = k;
        self
    }
    pub const fn data(mut self, d: u64) -> Io {
        self.data = Some(d);
        self
    }
}

/// An io_getevents timeout.
#[derive(Clone, Copy, Debug)]
pub enum Tmo {
    /// NULL: wait until `min_nr` events are there.
    Null,
    /// {0, 0}: do not wait.
    Zero,
    Ms(u64),
    /// A timespec as given, valid or not: {tv_sec, tv_nsec}.
    Raw(i64, i64),
}

/// How an io_getevents return value is compared.
#[derive(Clone, Copy, Debug)]
pub enum Count {
    /// The value and the events themselves.
    Exact,
    /// Only that it lies within [min_nr, nr]; the events join those of the next `Reap`.
    Between,
}

/// One step of a case. Contexts are named by slot (0..4), iocbs by index into the case's table,
/// buffers by number (0..8).
#[derive(Debug)]
pub enum Step {
    /// io_setup(nr) into a slot; records the result.
    Setup(u8, u32),
    /// io_setup with `*ctxp` not zero (C ABI only).
    SetupCtxNotZero(u32),
    /// io_setup with `ctxp` NULL (C ABI only).
    SetupNullCtxp(u32),
    /// The ring header of a slot's context (magic, nr, head, tail, header_length, features).
    Ring(u8),
    /// io_submit of these iocbs, in order.
    Submit(u8, &'static [u8]),
    /// io_submit with an explicit `nr` (C ABI only when it does not match the list).
    SubmitNr(u8, i64, &'static [u8]),
    /// io_submit of an array holding a NULL iocb pointer (C ABI only).
    SubmitNullIocb(u8),
    /// io_getevents.
    GetEvents { ctx: u8, min: i64, nr: i64, tmo: Tmo, count: Count },
    /// io_getevents with `events` NULL (C ABI only when `nr` > 0).
    GetEventsNull { ctx: u8, min: i64, nr: i64, tmo: Tmo },
    /// Reaps every event still owed (bounded) and records them as a set.
    Reap(u8),
    /// Submits copies of an iocb one per io_submit until one fails.
    Fill(u8, u8),
    /// Submits this many copies of an iocb in one io_submit.
    FillBatch(u8, u8, u16),
    /// io_cancel of an iocb.
    Cancel(u8, u8),
    /// io_cancel with `iocb` NULL (C ABI only).
    CancelNull(u8),
    /// io_destroy.
    Destroy(u8),
    /// Fills a buffer with bytes derived from a seed.
    Pattern(u8, u64),
    /// Records what the first bytes of a buffer hold: zero, a copy of another buffer, or a hash.
    Check(u8, Sz),
    /// Reads (without blocking) and records an eventfd's counter.
    Eventfd(u8),
    /// Records iocb `i`'s `aio_key` as it is in memory now (io_submit stores KIOCB_KEY, 0, there).
    Key(u8),
    /// Waits (bounded) until a slot's ring holds `n` events (0: every event owed). With `poke`,
    /// calls
    /// io_getevents(ctx, 0, 0, .., {0, 0}) between looks; without, makes no AIO call at all.
    WaitRing { ctx: u8, n: u32, poke: bool },
    /// Takes the events out of the ring directly, as libaio-style user-space reaping does, and
    /// stores head = tail.
    UserReap(u8),
    /// Writes /proc/sys/fs/aio-max-nr (restored after each run).
    AioMaxNr(u64),
    /// A step whose outcome differs on purpose (the case's `expect_difference` says why); it must
    /// differ, or the case fails.
    Differs(&'static Step),
    /// A step that may differ as a consequence of a declared difference.
    MayDiffer(&'static Step),
    /// Run on the kernel only: on nvaio it would fault the process, on purpose (a bad pointer a
    /// library cannot check without touching it).
    KernelOnly(&'static Step),
}

pub struct Case {
    pub name: &'static str,
    pub iocbs: &'static [Io],
    pub steps: &'static [Step],
    /// Why nvaio differs from the kernel here, when it does on purpose.
    pub expect_difference: Option<&'static str>,
}

// ---------------------------------------------------------------------------------------------
// The table

use Step::*;
use Sz::*;

const NOWAIT_CANCEL: &str = "the kernel cannot cancel block I/O (io_cancel gives EINVAL: only \
     requests with a cancel callback, i.e. IOCB_CMD_POLL, are cancellable); nvaio starts the \
     cancellation and answers -EINPROGRESS, and the event then carries -ECANCELED or, if the \
     controller declined the NVMe Abort, the request's own result";

const BAD_POINTER: &str = "a buffer the process cannot access that way (unmapped, or read-only \
     for a read): the kernel's get_user_pages fails and the request completes with -EFAULT; a \
     library cannot check a user-space pointer without touching it, so nvaio faults like any \
     library function given a bad pointer (not run on nvaio)";

const BE: i16 = 2 << 13;
const RT: i16 = 1 << 13;
const IDLE: i16 = 3 << 13;
const POLLIN_OUT: u64 = (libc::POLLIN | libc::POLLOUT) as u64;
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;

pub static CASES: &[Case] = &[
    // ----- io_setup
    Case { name: "setup_nr_zero", iocbs: &[], steps: &[Setup(0, 0)], expect_difference: None },
    Case {
        name: "setup_ctx_not_zero",
        iocbs: &[],
        steps: &[SetupCtxNotZero(8)],
        expect_difference: None,
    },
    Case {
        name: "setup_ctxp_null",
        iocbs: &[],
        steps: &[SetupNullCtxp(8), SetupNullCtxp(0)],
        expect_difference: None,
    },
    Case {
        name: "ring_header_nr_1",
        iocbs: &[],
        steps: &[Setup(0, 1), Ring(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "ring_header_nr_8",
        iocbs: &[],
        steps: &[Setup(0, 8), Ring(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "ring_header_nr_126",
        iocbs: &[],
        steps: &[Setup(0, 126), Ring(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "ring_header_nr_128",
        iocbs: &[],
        steps: &[Setup(0, 128), Ring(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "ring_header_nr_1000",
        iocbs: &[],
        steps: &[Setup(0, 1000), Ring(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "ring_header_nr_4096",
        iocbs: &[],
        steps: &[Setup(0, 4096), Ring(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "setup_nr_65536_is_aio_max_nr",
        iocbs: &[],
        steps: &[Setup(0, 65536), Ring(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "setup_nr_above_aio_max_nr",
        iocbs: &[],
        steps: &[Setup(0, 65537)],
        expect_difference: None,
    },
    Case {
        name: "setup_nr_2pow31_overflows",
        iocbs: &[],
        steps: &[Setup(0, 0x8000_0000)],
        expect_difference: None,
    },
    Case {
        name: "setup_nr_u32_max",
        iocbs: &[],
        steps: &[Setup(0, u32::MAX)],
        expect_difference: None,
    },
    Case {
        name: "setup_system_wide_aio_max_nr",
        iocbs: &[],
        steps: &[
            AioMaxNr(100),
            Setup(0, 101),
            Setup(0, 60),
            Setup(1, 60),
            Destroy(0),
            Setup(1, 60),
            Destroy(1),
        ],
        expect_difference: None,
    },
    // ----- io_destroy
    Case {
        name: "destroy_waits_for_in_flight_writes",
        iocbs: &[
            wr(0, L(8), L(0)),
            wr(1, L(8), L(8)),
            wr(2, L(8), L(16)),
            wr(3, L(8), L(24)),
            rd(4, L(32), L(0)),
        ],
        steps: &[
            Pattern(0, 1),
            Pattern(1, 2),
            Pattern(2, 3),
            Pattern(3, 4),
            Setup(0, 8),
            Submit(0, &[0, 1, 2, 3]),
            Destroy(0),
            Setup(1, 4),
            Submit(1, &[4]),
            Reap(1),
            Check(4, L(8)),
            Destroy(1),
        ],
        expect_difference: None,
    },
    Case {
        name: "calls_on_destroyed_context",
        iocbs: &[rd(0, L(1), L(0))],
        steps: &[
            Setup(0, 4),
            Destroy(0),
            Submit(0, &[0]),
            GetEvents { ctx: 0, min: 0, nr: 1, tmo: Tmo::Zero, count: Count::Exact },
            Cancel(0, 0),
            Destroy(0),
        ],
        expect_difference: None,
    },
    // ----- io_submit: counts and single defects
    Case {
        name: "submit_nr_zero",
        iocbs: &[],
        steps: &[
            Setup(0, 4),
            Submit(0, &[]),
            GetEvents { ctx: 0, min: 0, nr: 4, tmo: Tmo::Zero, count: Count::Exact },
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "submit_nr_negative",
        iocbs: &[rd(0, L(1), L(0))],
        steps: &[Setup(0, 4), SubmitNr(0, -1, &[0]), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "submit_null_iocb_pointer",
        iocbs: &[],
        steps: &[Setup(0, 4), SubmitNullIocb(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "submit_batch_returns_count_before_error",
        iocbs: &[rd(0, L(1), L(0)), rd(1, L(1), L(1)).on(Fd::Closed), rd(2, L(1), L(2))],
        steps: &[Setup(0, 8), Submit(0, &[0, 1, 2]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "submit_batch_first_fails",
        iocbs: &[rd(0, L(1), L(0)).on(Fd::Closed), rd(1, L(1), L(1))],
        steps: &[
            Setup(0, 8),
            Submit(0, &[0, 1]),
            GetEvents { ctx: 0, min: 1, nr: 4, tmo: Tmo::Ms(200), count: Count::Exact },
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "submit_reserved2_set",
        iocbs: &[rd(0, L(1), L(0)).reserved2(1)],
        steps: &[Setup(0, 4), Submit(0, &[0]), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "submit_unknown_opcodes",
        iocbs: &[
            rd(0, L(1), L(0)).op(4),
            rd(0, L(1), L(0)).op(9),
            rd(0, L(1), L(0)).op(0xffff),
            rd(0, L(1), L(0)).op(opcode::NOOP),
        ],
        steps: &[
            Setup(0, 4),
            Submit(0, &[0]),
            Submit(0, &[1]),
            Submit(0, &[2]),
            Submit(0, &[3]),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "submit_closed_fd",
        iocbs: &[rd(0, L(1), L(0)).on(Fd::Closed), wr(0, L(1), L(0)).on(Fd::Closed)],
        steps: &[Setup(0, 4), Submit(0, &[0]), Submit(0, &[1]), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "submit_read_on_write_only_fd",
        iocbs: &[
            rd(0, L(1), L(0)).on(Fd::Wo),
            readv(&[seg(0, B(0), L(1))], L(0)).on(Fd::Wo),
            wr(0, L(1), L(0)).on(Fd::Wo),
        ],
        steps: &[
            Setup(0, 4),
            Submit(0, &[0]),
            Submit(0, &[1]),
            Submit(0, &[2]),
            Reap(0),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "submit_write_on_read_only_fd",
        iocbs: &[
            wr(0, L(1), L(0)).on(Fd::Ro),
            writev(&[seg(0, B(0), L(1))], L(0)).on(Fd::Ro),
            rd(0, L(1), L(0)).on(Fd::Ro),
        ],
        steps: &[
            Setup(0, 4),
            Submit(0, &[0]),
            Submit(0, &[1]),
            Submit(0, &[2]),
            Reap(0),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "submit_negative_offset",
        iocbs: &[rd(0, L(1), Abs(-4096)), wr(0, L(1), Abs(-4096))],
        steps: &[Setup(0, 4), Submit(0, &[0]), Submit(0, &[1]), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "submit_offset_near_i64_max",
        iocbs: &[rd(0, L(1), Abs(i64::MAX & !0xfff)), wr(0, L(1), Abs(i64::MAX & !0xfff))],
        steps: &[Setup(0, 4), Submit(0, &[0]), Submit(0, &[1]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        // pos + count past i64::MAX: rw_verify_area's overflow check.
        name: "submit_offset_plus_size_overflows",
        iocbs: &[rd(0, B(8192), Abs(i64::MAX & !0xfff)), wr(0, B(8192), Abs(i64::MAX & !0xfff))],
        steps: &[Setup(0, 4), Submit(0, &[0]), Submit(0, &[1]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        // aio_nbytes with the top bit set (negative as ssize_t), at the last block so that a
        // request that gets through is cut to one block.
        name: "submit_nbytes_negative",
        iocbs: &[rd(0, Abs(i64::MIN), End(-1))],
        steps: &[Setup(0, 4), Submit(0, &[0]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "submit_nbytes_huge_is_truncated",
        iocbs: &[wr(0, L(1), End(-1)), rd(1, Abs(1 << 40), End(-1)), rd(2, Abs(i64::MAX), End(-1))],
        steps: &[
            Pattern(0, 11),
            Setup(0, 4),
            Submit(0, &[0]),
            Reap(0),
            Submit(0, &[1, 2]),
            Reap(0),
            Check(1, L(1)),
            Check(2, L(1)),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "submit_zero_length",
        iocbs: &[
            rd(0, B(0), L(0)),
            wr(0, B(0), L(0)),
            readv(&[], L(0)),
            writev(&[], L(0)),
            readv(&[seg(0, B(0), B(0)), seg(1, B(1), B(0))], L(0)),
        ],
        steps: &[Setup(0, 8), Submit(0, &[0, 1, 2, 3, 4]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "zero_length_at_misaligned_offset_or_buffer",
        iocbs: &[
            rd(0, B(0), B(1)),
            wr(0, B(0), B(1)),
            rd(0, B(0), L(0)).mem(Mem::At(0, B(1))),
            wr(0, B(0), L(0)).mem(Mem::At(0, B(3))),
        ],
        steps: &[Setup(0, 8), Submit(0, &[0, 1, 2, 3]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "iovec_zero_length_segment_at_odd_address",
        iocbs: &[
            writev(&[seg(0, B(0), L(1)), seg(1, B(1), B(0)), seg(2, B(0), L(1))], L(0)),
            readv(&[seg(3, B(0), L(1)), seg(4, B(3), B(0)), seg(5, B(0), L(1))], L(0)),
        ],
        steps: &[
            Pattern(0, 141),
            Pattern(2, 142),
            Setup(0, 4),
            Submit(0, &[0]),
            Reap(0),
            Submit(0, &[1]),
            Reap(0),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "submit_iovec_count_1024_and_1025",
        iocbs: &[
            rd(0, Abs(1024), End(-1024))
                .op(opcode::PREADV)
                .mem(Mem::IovRep(1024, seg(0, B(0), L(1)))),
            rd(0, Abs(1025), End(-1025))
                .op(opcode::PREADV)
                .mem(Mem::IovRep(1025, seg(0, B(0), L(1)))),
        ],
        steps: &[Setup(0, 4), Submit(0, &[0]), Submit(0, &[1]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "submit_iovec_negative_length",
        iocbs: &[readv(&[seg(0, B(0), L(1)), seg(1, B(0), Abs(-1))], L(0))],
        steps: &[Setup(0, 4), Submit(0, &[0]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "submit_unknown_aio_flags_bits",
        iocbs: &[rd(0, L(1), L(0)).flags(1 << 2), rd(1, L(1), L(0)).flags(1 << 31)],
        steps: &[Setup(0, 4), Submit(0, &[0, 1]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "submit_aio_key_not_zero",
        iocbs: &[rd(0, L(1), L(0)).key(0x1234)],
        steps: &[Setup(0, 4), Submit(0, &[0]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "submit_stores_aio_key",
        iocbs: &[rd(0, L(1), L(0)).key(0x1234), rd(1, L(1), L(0)).key(0x99).on(Fd::Closed)],
        steps: &[
            Setup(0, 4),
            Submit(0, &[0]),
            Key(0),
            Reap(0),
            Submit(0, &[1]),
            Key(1),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "submit_aio_key_where_the_batch_stops",
        iocbs: &[
            rd(0, L(1), L(0)).key(0x11),
            rd(1, L(1), L(1)).key(0x22).reserved2(1),
            rd(2, L(1), L(2)).key(0x33),
        ],
        steps: &[Setup(0, 4), Submit(0, &[0, 1, 2]), Key(0), Key(1), Key(2), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        // fs/aio.c stores the key after fget and the IOCB_FLAG_RESFD eventfd, before the rest.
        name: "submit_aio_key_by_refusal",
        iocbs: &[
            rd(0, L(1), L(0)).key(0x44).op(42),
            rd(0, L(1), L(0)).key(0x55).resfd(Fd::File),
            rd(0, L(1), L(0)).key(0x66).resfd(Fd::Closed),
            wr(0, L(1), L(0)).key(0x77).on(Fd::Ro),
            rd(0, L(1), L(0)).key(0x88).rwf(0x100),
            rd(0, Abs(i64::MIN), L(0)).key(0x99),
            rd(0, L(1), Abs(-4096)).key(0xaa),
            rd(0, L(1), L(0)).key(0xbb).prio(i16::MIN),
        ],
        steps: &[
            Setup(0, 4),
            Submit(0, &[0]),
            Key(0),
            Submit(0, &[1]),
            Key(1),
            Submit(0, &[2]),
            Key(2),
            Submit(0, &[3]),
            Key(3),
            Submit(0, &[4]),
            Key(4),
            Submit(0, &[5]),
            Key(5),
            Submit(0, &[6]),
            Key(6),
            Submit(0, &[7]),
            Key(7),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "submit_aio_key_on_a_full_context",
        iocbs: &[rd(0, L(1), L(0)), rd(1, L(1), L(1)).key(0xcc)],
        steps: &[Setup(0, 1), Fill(0, 0), Submit(0, &[1]), Key(1), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        // [#0, NULL]: the count so far.
        name: "submit_null_after_a_valid_iocb",
        iocbs: &[rd(0, L(1), L(0)).key(0x12)],
        steps: &[Setup(0, 4), SubmitNr(0, 2, &[0]), Key(0), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "submit_same_iocb_twice_in_a_batch",
        iocbs: &[rd(0, L(1), L(0))],
        steps: &[Setup(0, 4), Submit(0, &[0, 0]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "two_contexts_keep_their_own_events",
        iocbs: &[rd(0, L(1), L(0)), rd(1, L(1), L(1)), rd(2, L(1), L(2))],
        steps: &[
            Setup(0, 4),
            Setup(1, 4),
            Submit(0, &[0]),
            Submit(1, &[1, 2]),
            Reap(0),
            Reap(1),
            Ring(0),
            Ring(1),
            Destroy(0),
            Destroy(1),
        ],
        expect_difference: None,
    },
    Case {
        name: "iovec_array_null",
        iocbs: &[
            readv(&[], L(0)).mem(Mem::Null).len(Abs(1)),
            writev(&[], L(0)).mem(Mem::Null).len(Abs(2)),
        ],
        steps: &[Setup(0, 4), Submit(0, &[0]), Submit(0, &[1]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "submit_aio_data_all_bits",
        iocbs: &[rd(0, L(1), L(0)).data(u64::MAX), rd(1, L(1), L(1)).data(0)],
        steps: &[Setup(0, 4), Submit(0, &[0, 1]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    // ----- a full context
    Case {
        name: "full_context_eagain_then_free_after_reaping",
        iocbs: &[rd(0, L(1), L(0))],
        steps: &[Setup(0, 1), Fill(0, 0), Reap(0), Submit(0, &[0]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "full_context_freed_by_user_space_reaping",
        iocbs: &[rd(0, L(1), L(0))],
        steps: &[
            Setup(0, 1),
            Fill(0, 0),
            WaitRing { ctx: 0, n: 0, poke: true },
            UserReap(0),
            Submit(0, &[0]),
            Reap(0),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "full_context_one_batch_is_cut",
        iocbs: &[rd(0, L(1), L(0))],
        steps: &[Setup(0, 1), FillBatch(0, 0, 4096), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    // ----- which check comes first (fs/aio.c's order)
    Case {
        name: "order_reserved2_before_full_context",
        iocbs: &[rd(0, L(1), L(0)), rd(0, L(1), L(0)).reserved2(1)],
        steps: &[Setup(0, 1), Fill(0, 0), Submit(0, &[1]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "order_negative_nbytes_before_full_context",
        iocbs: &[rd(0, L(1), L(0)), rd(0, Abs(i64::MIN), End(-1))],
        steps: &[Setup(0, 1), Fill(0, 0), Submit(0, &[1]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "order_full_context_before_bad_fd",
        iocbs: &[rd(0, L(1), L(0)), rd(0, L(1), L(0)).on(Fd::Closed).op(42)],
        steps: &[Setup(0, 1), Fill(0, 0), Submit(0, &[1]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "order_bad_fd_before_opcode",
        iocbs: &[rd(0, L(1), L(0)).on(Fd::Closed).op(42)],
        steps: &[Setup(0, 4), Submit(0, &[0]), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "order_bad_fd_before_resfd",
        iocbs: &[rd(0, L(1), L(0)).on(Fd::Closed).resfd(Fd::File)],
        steps: &[Setup(0, 4), Submit(0, &[0]), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "order_resfd_before_opcode",
        iocbs: &[rd(0, L(1), L(0)).op(42).resfd(Fd::Closed)],
        steps: &[Setup(0, 4), Submit(0, &[0]), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "order_opcode_before_rw_flags",
        iocbs: &[rd(0, L(1), L(0)).op(42).rwf(0x100)],
        steps: &[Setup(0, 4), Submit(0, &[0]), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "order_ioprio_before_rw_flags",
        iocbs: &[rd(0, L(1), L(0)).prio(i16::MIN).rwf(0x100)],
        steps: &[Setup(0, 4), Submit(0, &[0]), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "order_rw_flags_before_access_mode",
        iocbs: &[wr(0, L(1), L(0)).on(Fd::Ro).rwf(0x100)],
        steps: &[Setup(0, 4), Submit(0, &[0]), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "order_ioprio_before_access_mode",
        iocbs: &[wr(0, L(1), L(0)).on(Fd::Ro).prio(i16::MIN)],
        steps: &[Setup(0, 4), Submit(0, &[0]), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "order_access_mode_before_offset",
        iocbs: &[wr(0, L(1), Abs(-4096)).on(Fd::Ro)],
        steps: &[Setup(0, 4), Submit(0, &[0]), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "order_access_mode_before_iovec_count",
        iocbs: &[rd(0, Abs(1025), L(0))
            .op(opcode::PREADV)
            .mem(Mem::IovRep(1025, seg(0, B(0), L(1))))
            .on(Fd::Wo)],
        steps: &[Setup(0, 4), Submit(0, &[0]), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "order_iovec_count_before_offset",
        iocbs: &[rd(0, Abs(1025), Abs(-4096))
            .op(opcode::PREADV)
            .mem(Mem::IovRep(1025, seg(0, B(0), L(1))))],
        steps: &[Setup(0, 4), Submit(0, &[0]), Destroy(0)],
        expect_difference: None,
    },
    // ----- opcodes
    Case {
        name: "pwrite_pread_roundtrip",
        iocbs: &[wr(0, L(4), L(0)), rd(1, L(4), L(0))],
        steps: &[
            Pattern(0, 21),
            Setup(0, 4),
            Submit(0, &[0]),
            Reap(0),
            Submit(0, &[1]),
            Reap(0),
            Check(1, L(4)),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "pwritev_preadv_roundtrip",
        iocbs: &[
            writev(&[seg(0, B(0), L(1)), seg(1, L(1), L(2)), seg(2, B(0), L(1))], L(0)),
            readv(&[seg(3, B(0), L(3)), seg(3, L(3), L(1))], L(0)),
            rd(4, L(1), L(1)),
            wr(1, L(2), L(1)),
        ],
        steps: &[
            Pattern(0, 31),
            Pattern(1, 32),
            Pattern(2, 33),
            Setup(0, 4),
            Submit(0, &[0]),
            Reap(0),
            Submit(0, &[1]),
            Reap(0),
            Check(3, L(4)),
            Submit(0, &[2]),
            Reap(0),
            Check(4, L(1)),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "transfer_of_1mib",
        iocbs: &[wr(0, B(1 << 20), L(0)), rd(1, B(1 << 20), L(0))],
        steps: &[
            Pattern(0, 41),
            Setup(0, 4),
            Submit(0, &[0]),
            Reap(0),
            Submit(0, &[1]),
            Reap(0),
            Check(1, B(1 << 20)),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "transfer_of_1mib_through_a_buffer_at_512",
        iocbs: &[wr(0, B(1 << 20), L(0)).mem(Mem::At(0, B(512))), rd(1, B(1 << 20), L(0))],
        steps: &[
            Pattern(0, 42),
            Setup(0, 4),
            Submit(0, &[0]),
            Reap(0),
            Submit(0, &[1]),
            Reap(0),
            Check(1, B(1 << 20)),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "batch_of_8_writes_then_8_reads",
        iocbs: &[
            wr(0, L(2), L(0)),
            wr(0, L(2), L(2)),
            wr(0, L(2), L(4)),
            wr(0, L(2), L(6)),
            wr(0, L(2), L(8)),
            wr(0, L(2), L(10)),
            wr(0, L(2), L(12)),
            wr(0, L(2), L(14)),
            rd(1, L(2), L(14)),
            rd(2, L(2), L(12)),
            rd(3, L(2), L(10)),
            rd(4, L(2), L(8)),
            rd(5, L(2), L(6)),
            rd(6, L(2), L(4)),
            rd(7, L(2), L(2)),
            rd(1, L(2), L(0)),
        ],
        steps: &[
            Pattern(0, 51),
            Setup(0, 16),
            Submit(0, &[0, 1, 2, 3, 4, 5, 6, 7]),
            Reap(0),
            Submit(0, &[8, 9, 10, 11, 12, 13, 14, 15]),
            Reap(0),
            Check(1, L(2)),
            Check(7, L(2)),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "fsync_and_fdsync",
        iocbs: &[
            bare(opcode::FSYNC),
            bare(opcode::FDSYNC),
            bare(opcode::FSYNC).on(Fd::Ro),
            bare(opcode::FDSYNC).on(Fd::Wo),
        ],
        steps: &[Setup(0, 8), Submit(0, &[0, 1, 2, 3]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "fsync_with_fields_set",
        iocbs: &[
            bare(opcode::FSYNC).len(Abs(512)),
            bare(opcode::FSYNC).off(Abs(4096)),
            bare(opcode::FSYNC).mem(Mem::At(0, B(0))),
            bare(opcode::FDSYNC).rwf(rwf::DSYNC),
            bare(opcode::FDSYNC).rwf(0x100),
            bare(opcode::FSYNC).prio(BE | 8),
        ],
        steps: &[
            Setup(0, 8),
            Submit(0, &[0]),
            Submit(0, &[1]),
            Submit(0, &[2]),
            Submit(0, &[3]),
            Submit(0, &[4]),
            Submit(0, &[5]),
            Reap(0),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "poll_on_block_device",
        iocbs: &[
            bare(opcode::POLL).mem(Mem::Raw(POLLIN_OUT)),
            bare(opcode::POLL).mem(Mem::Raw(libc::POLLIN as u64)),
            bare(opcode::POLL).mem(Mem::Raw(libc::POLLOUT as u64)).resfd(Fd::Efd(0)),
            bare(opcode::POLL).mem(Mem::Raw(libc::POLLIN as u64)).prio(i16::MIN),
            bare(opcode::POLL).mem(Mem::Raw(libc::POLLPRI as u64)),
            bare(opcode::POLL).mem(Mem::Raw(POLLIN_OUT)).on(Fd::Ro),
        ],
        steps: &[
            Setup(0, 8),
            Submit(0, &[0]),
            Submit(0, &[1]),
            Submit(0, &[2]),
            Submit(0, &[3]),
            Submit(0, &[4]),
            Submit(0, &[5]),
            Reap(0),
            Eventfd(0),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "poll_bad_arguments",
        iocbs: &[
            bare(opcode::POLL),
            bare(opcode::POLL).mem(Mem::Raw(0x1_0000)),
            bare(opcode::POLL).mem(Mem::Raw(POLLIN_OUT)).len(Abs(1)),
            bare(opcode::POLL).mem(Mem::Raw(POLLIN_OUT)).off(Abs(1)),
            bare(opcode::POLL).mem(Mem::Raw(POLLIN_OUT)).rwf(rwf::HIPRI),
        ],
        steps: &[
            Setup(0, 4),
            Submit(0, &[0]),
            Submit(0, &[1]),
            Submit(0, &[2]),
            Submit(0, &[3]),
            Submit(0, &[4]),
            Reap(0),
            Destroy(0),
        ],
        expect_difference: None,
    },
    // ----- aio_rw_flags
    Case {
        name: "rw_flags_known",
        iocbs: &[
            wr(0, L(1), L(0)).rwf(rwf::DSYNC),
            wr(0, L(1), L(1)).rwf(rwf::SYNC),
            wr(0, L(1), L(2)).rwf(rwf::HIPRI),
            wr(0, L(1), L(3)).rwf(rwf::NOWAIT),
            rd(1, L(4), L(0)).rwf(rwf::HIPRI),
            rd(2, L(4), L(0)).rwf(rwf::NOWAIT),
            rd(3, L(4), L(0)).rwf(rwf::DSYNC | rwf::SYNC),
        ],
        steps: &[
            Pattern(0, 61),
            Setup(0, 8),
            Submit(0, &[0]),
            Submit(0, &[1]),
            Submit(0, &[2]),
            Submit(0, &[3]),
            Reap(0),
            Submit(0, &[4]),
            Submit(0, &[5]),
            Submit(0, &[6]),
            Reap(0),
            Check(1, L(4)),
            Check(2, L(4)),
            Check(3, L(4)),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "rw_flags_append_on_block_device",
        iocbs: &[wr(0, L(1), L(1)).rwf(rwf::APPEND), rd(1, L(2), L(0))],
        steps: &[
            Pattern(0, 71),
            Setup(0, 4),
            Submit(0, &[0]),
            Reap(0),
            Submit(0, &[1]),
            Reap(0),
            Check(1, L(2)),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "rw_flags_unknown",
        iocbs: &[
            rd(0, L(1), L(0)).rwf(0x20),
            wr(0, L(1), L(0)).rwf(0x8000_0000),
            rd(0, L(1), L(0)).rwf(rwf::HIPRI | 0x40),
        ],
        steps: &[Setup(0, 4), Submit(0, &[0]), Submit(0, &[1]), Submit(0, &[2]), Destroy(0)],
        expect_difference: None,
    },
    // ----- IOCB_FLAG_RESFD
    Case {
        name: "resfd_signalled_once_per_completion",
        iocbs: &[
            rd(0, L(1), L(0)).resfd(Fd::Efd(0)),
            rd(1, L(1), L(1)).resfd(Fd::Efd(0)),
            rd(2, L(1), L(2)).resfd(Fd::Efd(0)),
            rd(3, L(1), L(3)).resfd(Fd::Efd(1)),
            rd(4, L(1), L(4)),
        ],
        steps: &[
            Setup(0, 8),
            Submit(0, &[0, 1, 2, 3, 4]),
            Reap(0),
            Eventfd(0),
            Eventfd(1),
            Eventfd(0),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "resfd_signalled_for_an_error_event",
        iocbs: &[rd(0, L(1), B(1)).resfd(Fd::Efd(0))],
        steps: &[Setup(0, 4), Submit(0, &[0]), Reap(0), Eventfd(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "resfd_not_signalled_for_a_submit_error",
        iocbs: &[rd(0, L(1), L(0)).rwf(0x100).resfd(Fd::Efd(0))],
        steps: &[Setup(0, 4), Submit(0, &[0]), Eventfd(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "resfd_not_an_eventfd",
        iocbs: &[rd(0, L(1), L(0)).resfd(Fd::File), rd(0, L(1), L(0)).resfd(Fd::Closed)],
        steps: &[Setup(0, 4), Submit(0, &[0]), Submit(0, &[1]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "resfd_ignored_without_the_flag",
        iocbs: &[rd(0, L(1), L(0)).resfd_only(Fd::Closed), rd(1, L(1), L(1)).resfd_only(Fd::File)],
        steps: &[Setup(0, 4), Submit(0, &[0, 1]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "resfd_is_the_namespace_descriptor",
        iocbs: &[rd(0, L(1), L(0)).resfd(Fd::Rw)],
        steps: &[Setup(0, 4), Submit(0, &[0]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    // ----- IOCB_FLAG_IOPRIO
    Case {
        name: "ioprio_valid",
        iocbs: &[
            rd(0, L(1), L(0)).prio(BE | 4),
            rd(1, L(1), L(0)).prio(BE | 7),
            rd(2, L(1), L(0)).prio(RT),
            rd(3, L(1), L(0)).prio(IDLE),
            rd(4, L(1), L(0)).prio(0),
        ],
        steps: &[Setup(0, 8), Submit(0, &[0, 1, 2, 3, 4]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "ioprio_invalid",
        iocbs: &[
            rd(0, L(1), L(0)).prio(i16::MIN),
            rd(0, L(1), L(0)).prio(1),
            rd(0, L(1), L(0)).prio(5 << 13),
            rd(0, L(1), L(0)).prio(7 << 13 | 1),
            wr(0, L(1), L(0)).prio(-1),
        ],
        steps: &[
            Setup(0, 4),
            Submit(0, &[0]),
            Submit(0, &[1]),
            Submit(0, &[2]),
            Submit(0, &[3]),
            Submit(0, &[4]),
            Reap(0),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        // Bits 3..12 of the priority data: above the 3-bit level.
        name: "ioprio_data_above_the_level_bits",
        iocbs: &[
            rd(0, L(1), L(0)).prio(BE | 8),
            rd(1, L(1), L(0)).prio(RT | 8),
            rd(2, L(1), L(0)).prio(IDLE | 8),
            rd(3, L(1), L(0)).prio(8),
            rd(4, L(1), L(0)).prio(BE | 0x1fff),
            rd(5, L(1), L(0)).prio(IDLE | 7),
        ],
        steps: &[
            Setup(0, 8),
            Submit(0, &[0]),
            Submit(0, &[1]),
            Submit(0, &[2]),
            Submit(0, &[3]),
            Submit(0, &[4]),
            Submit(0, &[5]),
            Reap(0),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "ioprio_ignored_without_the_flag",
        iocbs: &[rd(0, L(1), L(0)).reqprio(BE | 8)],
        steps: &[Setup(0, 4), Submit(0, &[0]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    // ----- the end of the namespace
    Case {
        name: "end_last_block_write_read",
        iocbs: &[wr(0, L(1), End(-1)), rd(1, L(1), End(-1))],
        steps: &[
            Pattern(0, 81),
            Setup(0, 4),
            Submit(0, &[0]),
            Reap(0),
            Submit(0, &[1]),
            Reap(0),
            Check(1, L(1)),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "end_read_across_at_past",
        iocbs: &[
            rd(0, L(4), End(-1)),
            rd(1, L(1), End(0)),
            rd(2, L(1), End(8)),
            rd(3, L(1), End(1 << 30)),
        ],
        steps: &[Setup(0, 8), Submit(0, &[0, 1, 2, 3]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "end_write_across_at_past",
        iocbs: &[
            wr(0, L(4), End(-2)),
            wr(0, L(1), End(0)),
            wr(0, L(1), End(8)),
            rd(1, L(2), End(-2)),
        ],
        steps: &[
            Pattern(0, 91),
            Setup(0, 8),
            Submit(0, &[0, 1, 2]),
            Reap(0),
            Submit(0, &[3]),
            Reap(0),
            Check(1, L(2)),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "end_zero_length_write_at_end",
        iocbs: &[wr(0, B(0), End(0)), rd(0, B(0), End(0))],
        steps: &[Setup(0, 4), Submit(0, &[0, 1]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "end_misaligned_offset_past_end",
        iocbs: &[
            rd(0, L(1), EndB(1, 1)),
            wr(0, L(1), EndB(1, 1)),
            rd(0, L(1), End(0)).mem(Mem::At(0, B(1))),
            wr(0, L(1), End(0)).mem(Mem::At(0, B(1))),
            rd(0, L(2), End(-1)).mem(Mem::At(0, B(1))),
        ],
        steps: &[Setup(0, 8), Submit(0, &[0, 1, 2, 3, 4]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "end_misaligned_length_across_end",
        iocbs: &[wr(0, LB(2, 1), End(-1)), rd(1, LB(2, 1), End(-1))],
        steps: &[
            Pattern(0, 101),
            Setup(0, 4),
            Submit(0, &[0]),
            Reap(0),
            Submit(0, &[1]),
            Reap(0),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "end_preadv_across",
        iocbs: &[wr(0, L(1), End(-1)), readv(&[seg(1, B(0), L(2)), seg(2, B(0), L(2))], End(-1))],
        steps: &[
            Pattern(0, 111),
            Setup(0, 4),
            Submit(0, &[0]),
            Reap(0),
            Submit(0, &[1]),
            Reap(0),
            Check(1, L(1)),
            Check(2, L(1)),
            Destroy(0),
        ],
        expect_difference: None,
    },
    // ----- misaligned O_DIRECT: errors as events
    Case {
        name: "misaligned_offset_is_an_event",
        iocbs: &[rd(0, L(1), B(1)), wr(0, L(1), B(1)), rd(0, L(1), B(512)), rd(0, L(1), LB(1, -1))],
        steps: &[Setup(0, 8), Submit(0, &[0, 1, 2, 3]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "misaligned_length_is_an_event",
        iocbs: &[
            rd(0, LB(1, 1), L(0)),
            wr(0, LB(1, -1), L(0)),
            rd(0, B(512), L(0)),
            rd(0, B(1), L(0)),
        ],
        steps: &[Setup(0, 8), Submit(0, &[0, 1, 2, 3]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "buffer_odd_address",
        iocbs: &[rd(0, L(1), L(0)).mem(Mem::At(0, B(1))), wr(0, L(1), L(0)).mem(Mem::At(0, B(3)))],
        steps: &[Setup(0, 4), Submit(0, &[0, 1]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "buffer_dword_and_sector_aligned_addresses",
        iocbs: &[
            wr(0, L(2), L(0)),
            rd(1, L(2), L(0)).mem(Mem::At(1, B(4))),
            rd(2, L(2), L(0)).mem(Mem::At(2, B(512))),
            rd(3, L(2), L(0)).mem(Mem::At(3, B(2048))),
        ],
        steps: &[
            Pattern(0, 121),
            Setup(0, 8),
            Submit(0, &[0]),
            Reap(0),
            Submit(0, &[1, 2, 3]),
            Reap(0),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "iovec_segment_not_whole_blocks",
        iocbs: &[
            readv(&[seg(0, B(0), B(256)), seg(1, B(0), LB(1, -256))], L(0)),
            writev(&[seg(0, B(0), LB(1, -256)), seg(1, B(0), B(256))], L(0)),
        ],
        steps: &[Setup(0, 4), Submit(0, &[0, 1]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "iovec_segment_odd_address",
        iocbs: &[readv(&[seg(0, B(1), L(1))], L(0))],
        steps: &[Setup(0, 4), Submit(0, &[0]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    // ----- io_getevents
    Case {
        name: "getevents_min_nr_above_nr",
        iocbs: &[],
        steps: &[
            Setup(0, 4),
            GetEvents { ctx: 0, min: 2, nr: 1, tmo: Tmo::Zero, count: Count::Exact },
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "getevents_negative_min_nr_and_nr",
        iocbs: &[],
        steps: &[
            Setup(0, 4),
            GetEvents { ctx: 0, min: -1, nr: 1, tmo: Tmo::Zero, count: Count::Exact },
            GetEvents { ctx: 0, min: 0, nr: -1, tmo: Tmo::Zero, count: Count::Exact },
            GetEvents { ctx: 0, min: -2, nr: -1, tmo: Tmo::Zero, count: Count::Exact },
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "getevents_zero_timeout_does_not_wait",
        iocbs: &[],
        steps: &[
            Setup(0, 4),
            GetEvents { ctx: 0, min: 1, nr: 4, tmo: Tmo::Zero, count: Count::Exact },
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "getevents_timeout_expires",
        iocbs: &[],
        steps: &[
            Setup(0, 4),
            GetEvents { ctx: 0, min: 1, nr: 4, tmo: Tmo::Ms(150), count: Count::Exact },
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "getevents_null_timeout_returns_once_min_nr_are_there",
        iocbs: &[rd(0, L(1), L(0)), rd(1, L(1), L(1))],
        steps: &[
            Setup(0, 4),
            Submit(0, &[0, 1]),
            GetEvents { ctx: 0, min: 2, nr: 4, tmo: Tmo::Null, count: Count::Exact },
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "getevents_returns_between_min_nr_and_nr",
        iocbs: &[rd(0, L(1), L(0)), rd(1, L(1), L(1)), rd(2, L(1), L(2)), rd(3, L(1), L(3))],
        steps: &[
            Setup(0, 8),
            Submit(0, &[0, 1, 2, 3]),
            GetEvents { ctx: 0, min: 2, nr: 3, tmo: Tmo::Ms(5000), count: Count::Between },
            Reap(0),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "getevents_fewer_than_min_nr_when_the_timeout_passes",
        iocbs: &[rd(0, L(1), L(0))],
        steps: &[
            Setup(0, 4),
            Submit(0, &[0]),
            GetEvents { ctx: 0, min: 2, nr: 4, tmo: Tmo::Ms(300), count: Count::Exact },
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "getevents_min_nr_zero_and_nr_zero",
        iocbs: &[rd(0, L(1), L(0))],
        steps: &[
            Setup(0, 4),
            GetEvents { ctx: 0, min: 0, nr: 0, tmo: Tmo::Null, count: Count::Exact },
            GetEvents { ctx: 0, min: 0, nr: 4, tmo: Tmo::Null, count: Count::Exact },
            Submit(0, &[0]),
            GetEvents { ctx: 0, min: 0, nr: 4, tmo: Tmo::Null, count: Count::Between },
            Reap(0),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "getevents_nr_far_above_the_ring",
        iocbs: &[rd(0, L(1), L(0)), rd(1, L(1), L(1))],
        steps: &[
            Setup(0, 4),
            Submit(0, &[0, 1]),
            GetEvents { ctx: 0, min: 2, nr: 100_000, tmo: Tmo::Ms(5000), count: Count::Exact },
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "getevents_malformed_timeouts",
        iocbs: &[],
        steps: &[
            Setup(0, 4),
            GetEvents {
                ctx: 0,
                min: 1,
                nr: 1,
                tmo: Tmo::Raw(0, 1_000_000_000),
                count: Count::Exact,
            },
            GetEvents { ctx: 0, min: 1, nr: 1, tmo: Tmo::Raw(0, -1), count: Count::Exact },
            GetEvents { ctx: 0, min: 1, nr: 1, tmo: Tmo::Raw(-1, 0), count: Count::Exact },
            GetEvents {
                ctx: 0,
                min: 1,
                nr: 1,
                tmo: Tmo::Raw(1, -999_000_000),
                count: Count::Exact,
            },
            GetEvents { ctx: 0, min: 0, nr: 1, tmo: Tmo::Raw(0, -1), count: Count::Exact },
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        // The kernel reads no timespec field alone: it makes nanoseconds of tv_sec * 1e9 +
        // tv_nsec in 64-bit arithmetic that wraps (i64::MIN seconds is 0 ns: no wait), with
        // tv_sec from KTIME_SEC_MAX on meaning no limit.
        name: "getevents_timeouts_at_the_limits",
        iocbs: &[],
        steps: &[
            Setup(0, 4),
            GetEvents { ctx: 0, min: 1, nr: 1, tmo: Tmo::Raw(i64::MIN, 0), count: Count::Exact },
            GetEvents { ctx: 0, min: 1, nr: 1, tmo: Tmo::Raw(0, 1), count: Count::Exact },
            GetEvents { ctx: 0, min: 0, nr: 1, tmo: Tmo::Raw(i64::MAX, 0), count: Count::Exact },
            GetEvents { ctx: 0, min: 1, nr: 1, tmo: Tmo::Raw(i64::MAX, 0), count: Count::Exact },
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        // Nothing is copied to a NULL array until there is an event to copy; then EFAULT, and
        // the event stays in the ring.
        name: "getevents_null_array",
        iocbs: &[rd(0, L(1), L(0))],
        steps: &[
            Setup(0, 4),
            GetEventsNull { ctx: 0, min: 0, nr: 1, tmo: Tmo::Zero },
            GetEventsNull { ctx: 0, min: 1, nr: 1, tmo: Tmo::Ms(100) },
            GetEventsNull { ctx: 0, min: 0, nr: 0, tmo: Tmo::Zero },
            Submit(0, &[0]),
            GetEventsNull { ctx: 0, min: 1, nr: 1, tmo: Tmo::Ms(5000) },
            Reap(0),
            Destroy(0),
        ],
        expect_difference: None,
    },
    // ----- io_cancel
    Case {
        // The key is read (EFAULT) before the context is looked up.
        name: "cancel_null_iocb",
        iocbs: &[],
        steps: &[Setup(0, 4), CancelNull(0), Destroy(0), CancelNull(0)],
        expect_difference: None,
    },
    Case {
        name: "cancel_in_flight_read",
        iocbs: &[rd(0, B(1 << 20), L(0))],
        steps: &[
            Setup(0, 4),
            Submit(0, &[0]),
            Differs(&Cancel(0, 0)),
            MayDiffer(&Reap(0)),
            Destroy(0),
        ],
        expect_difference: Some(NOWAIT_CANCEL),
    },
    Case {
        name: "cancel_in_flight_fsync",
        iocbs: &[bare(opcode::FSYNC)],
        steps: &[
            Setup(0, 4),
            Submit(0, &[0]),
            Differs(&Cancel(0, 0)),
            MayDiffer(&Reap(0)),
            Destroy(0),
        ],
        expect_difference: Some(NOWAIT_CANCEL),
    },
    Case {
        name: "cancel_after_reaping",
        iocbs: &[rd(0, L(1), L(0))],
        steps: &[Setup(0, 4), Submit(0, &[0]), Reap(0), Cancel(0, 0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "cancel_completed_but_not_reaped",
        iocbs: &[rd(0, L(1), L(0))],
        steps: &[
            Setup(0, 4),
            Submit(0, &[0]),
            WaitRing { ctx: 0, n: 1, poke: true },
            Cancel(0, 0),
            Reap(0),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "cancel_never_submitted",
        iocbs: &[rd(0, L(1), L(0))],
        steps: &[Setup(0, 4), Cancel(0, 0), Destroy(0)],
        expect_difference: None,
    },
    // ----- the event ring in user space
    Case {
        name: "ring_head_and_tail_after_reaping",
        iocbs: &[rd(0, L(1), L(0)), rd(1, L(1), L(1)), rd(2, L(1), L(2))],
        steps: &[Setup(0, 8), Submit(0, &[0, 1, 2]), Reap(0), Ring(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "ring_reaped_from_user_space",
        iocbs: &[rd(0, L(1), L(0)).data(7), rd(1, L(1), L(1)).data(8)],
        steps: &[
            Setup(0, 8),
            Submit(0, &[0, 1]),
            WaitRing { ctx: 0, n: 2, poke: true },
            UserReap(0),
            GetEvents { ctx: 0, min: 0, nr: 4, tmo: Tmo::Zero, count: Count::Exact },
            Ring(0),
            Destroy(0),
        ],
        expect_difference: None,
    },
    Case {
        name: "ring_filled_without_any_call",
        iocbs: &[rd(0, L(1), L(0))],
        steps: &[
            Setup(0, 4),
            Submit(0, &[0]),
            Differs(&WaitRing { ctx: 0, n: 1, poke: false }),
            Reap(0),
            Destroy(0),
        ],
        expect_difference: Some(
            "nvaio has no kernel thread behind the ring: a polled userspace driver posts \
             completions when the application calls in (io_getevents, even with min_nr 0, is \
             enough; libaio's reaping falls back to it when the ring is empty), never on its own",
        ),
    },
    // ----- bad pointers
    Case {
        name: "buffer_read_only_mapping",
        iocbs: &[
            wr(0, L(2), L(0)).mem(Mem::ReadOnly),
            rd(1, L(2), L(0)),
            rd(0, L(1), L(0)).mem(Mem::ReadOnly),
        ],
        steps: &[
            Pattern(1, 151),
            Setup(0, 4),
            Submit(0, &[0]),
            Reap(0),
            Submit(0, &[1]),
            Reap(0),
            Check(1, L(2)),
            KernelOnly(&Submit(0, &[2])),
            KernelOnly(&Reap(0)),
            Destroy(0),
        ],
        expect_difference: Some(BAD_POINTER),
    },
    Case {
        name: "buffer_unmapped",
        iocbs: &[rd(0, L(1), L(0)).mem(Mem::Unmapped), wr(0, L(1), L(1)).mem(Mem::Unmapped)],
        steps: &[Setup(0, 4), KernelOnly(&Submit(0, &[0, 1])), KernelOnly(&Reap(0)), Destroy(0)],
        expect_difference: Some(BAD_POINTER),
    },
    // ----- last: what can exhaust memory or crash nvaio if it does not check
    Case {
        name: "setup_nr_above_the_ring_limit",
        iocbs: &[],
        steps: &[Setup(0, 4_194_305)],
        expect_difference: None,
    },
    Case {
        name: "buffer_in_the_kernel_half",
        iocbs: &[
            rd(0, L(1), L(0)).mem(Mem::Raw(KERNEL_HALF)),
            wr(0, L(1), L(0)).mem(Mem::Raw(KERNEL_HALF)),
        ],
        steps: &[Setup(0, 4), Submit(0, &[0]), Submit(0, &[1]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "buffer_null",
        iocbs: &[rd(0, L(1), L(0)).mem(Mem::Null), wr(0, L(1), L(0)).mem(Mem::Null)],
        steps: &[Setup(0, 4), Submit(0, &[0]), Submit(0, &[1]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
    Case {
        name: "iovec_array_in_the_kernel_half",
        iocbs: &[readv(&[], L(0)).mem(Mem::Raw(KERNEL_HALF)).len(Abs(1))],
        steps: &[Setup(0, 4), Submit(0, &[0]), Reap(0), Destroy(0)],
        expect_difference: None,
    },
];

// ---------------------------------------------------------------------------------------------
// Backends

/// Why a call has no result to compare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fail {
    Errno(i32),
    /// The backend's API cannot express the call.
    NotExpressible(&'static str),
}

pub type Out<T> = Result<T, Fail>;

/// The AIO calls with the kernel's argument types, so that one runner drives every backend.
pub trait Backend {
    fn label(&self) -> &'static str;
    /// The namespace descriptor for `Rw`, `Ro` or `Wo`.
    fn fd(&self, access: Access) -> RawFd;
    /// Bytes of a logical block and of the namespace.
    fn geometry(&self) -> (u32, u64);
    /// io_setup with `*ctxp` = `ctx_in` on entry, or `ctxp` NULL for None.
    fn setup(&mut self, nr: u32, ctx_in: Option<u64>) -> Out<u64>;
    /// # Safety
    /// `iocbpp` points at `nr` (if positive) iocb pointers, each NULL or valid.
    unsafe fn submit(&mut self, ctx: u64, nr: i64, iocbpp: *const *mut Iocb) -> Out<i64>;
    /// # Safety
    /// `out` is NULL or has room for `nr` events (if positive).
    unsafe fn get_events(
        &mut self,
        ctx: u64,
        min: i64,
        nr: i64,
        out: *mut IoEvent,
        tmo: Tmo,
    ) -> Out<i64>;
    /// # Safety
    /// `iocb` is NULL or an iocb of the case's arena.
    unsafe fn cancel(&mut self, ctx: u64, iocb: *mut Iocb) -> Out<()>;
    fn destroy(&mut self, ctx: u64) -> Out<()>;
    /// Whether io_submit may write the iocbs' `aio_key`, as the kernel does.
    fn writes_aio_key(&self) -> bool {
        true
    }
}

/// How long an io_getevents with a raw timespec may block before a signal ends it.
const ALARM: Duration = Duration::from_millis(1500);

extern "C" fn on_alarm(_sig: libc::c_int) {}

/// A one-shot SIGALRM aimed at the calling thread, disarmed on drop. Its handler does nothing and
/// does not restart system calls, so a call blocked in this thread returns EINTR. The timer is
/// thread-directed (SIGEV_THREAD_ID): a process-wide alarm may be taken by any thread that does
/// not block it at that moment (the watchdog, the driver's threads), and the blocked call would
/// sleep on.
struct Alarm(Option<libc::timer_t>);

impl Alarm {
    fn arm(after: Duration) -> Alarm {
        // SAFETY: installs a handler that does nothing, then creates and arms a timer; every
        // call takes pointers to locals only.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_alarm as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut());
            let mut sev: libc::sigevent = std::mem::zeroed();
            sev.sigev_notify = libc::SIGEV_THREAD_ID;
            sev.sigev_signo = libc::SIGALRM;
            sev.sigev_notify_thread_id = libc::gettid();
            let mut timer: libc::timer_t = std::ptr::null_mut();
            if libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut timer) != 0 {
                return Alarm(None);
            }
            let its = libc::itimerspec {
                it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
                it_value: libc::timespec {
                    tv_sec: after.as_secs() as libc::time_t,
                    tv_nsec: after.subsec_nanos() as libc::c_long,
                },
            };
            libc::timer_settime(timer, 0, &its, std::ptr::null_mut());
            Alarm(Some(timer))
        }
    }

    /// Arms an alarm for a raw timespec (which may mean no limit), none for the others.
    fn for_timeout(tmo: Tmo) -> Alarm {
        match tmo {
            Tmo::Raw(..) => Alarm::arm(ALARM),
            _ => Alarm(None),
        }
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            // SAFETY: our own timer.
            unsafe { libc::timer_delete(t) };
        }
    }
}

/// The timespec io_getevents is given for `tmo`, or None for NULL.
fn timespec_of(tmo: Tmo) -> Option<libc::timespec> {
    match tmo {
        Tmo::Null => None,
        Tmo::Zero => Some(libc::timespec { tv_sec: 0, tv_nsec: 0 }),
        Tmo::Ms(ms) => Some(libc::timespec {
            tv_sec: (ms / 1000) as libc::time_t,
            tv_nsec: ((ms % 1000) * 1_000_000) as libc::c_long,
        }),
        Tmo::Raw(s, ns) => {
            Some(libc::timespec { tv_sec: s as libc::time_t, tv_nsec: ns as libc::c_long })
        }
    }
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn sys(r: libc::c_long) -> Out<i64> {
    if r < 0 {
        Err(Fail::Errno(last_errno()))
    } else {
        Ok(r)
    }
}

/// The kernel's AIO on a block device opened with O_DIRECT.
pub struct KernelAio {
    path: String,
    rw: RawFd,
    ro: RawFd,
    wo: RawFd,
    block: u32,
    size: u64,
}

impl KernelAio {
    pub fn open(path: &str) -> Result<KernelAio, String> {
        let open = |mode: i32| -> Result<RawFd, String> {
            let c = std::ffi::CString::new(path).map_err(|e| e.to_string())?;
            // SAFETY: a NUL-terminated path; the result is checked.
            let fd = unsafe { libc::open(c.as_ptr(), mode | libc::O_DIRECT | libc::O_CLOEXEC) };
            if fd < 0 {
                Err(format!("open {path}: {}", std::io::Error::last_os_error()))
            } else {
                Ok(fd)
            }
        };
        let (rw, ro, wo) = (open(libc::O_RDWR)?, open(libc::O_RDONLY)?, open(libc::O_WRONLY)?);
        let mut size = 0u64;
        let mut block: libc::c_int = 0;
        // SAFETY: BLKGETSIZE64 writes a u64 and BLKSSZGET an int, both locals.
        let (a, b) = unsafe {
            (
                libc::ioctl(rw, 0x8008_1272, &mut size as *mut u64),
                libc::ioctl(rw, 0x1268, &mut block as *mut libc::c_int),
            )
        };
        if a < 0 || b < 0 {
            return Err(format!("{path}: BLKGETSIZE64/BLKSSZGET failed"));
        }
        Ok(KernelAio { path: path.to_string(), rw, ro, wo, block: block as u32, size })
    }

    pub fn path(&self) -> &str {
        &self.path
    }
}

impl Backend for KernelAio {
    fn label(&self) -> &'static str {
        "kernel"
    }
    fn fd(&self, access: Access) -> RawFd {
        match access {
            Access::ReadWrite => self.rw,
            Access::ReadOnly => self.ro,
            Access::WriteOnly => self.wo,
        }
    }
    fn geometry(&self) -> (u32, u64) {
        (self.block, self.size)
    }
    fn setup(&mut self, nr: u32, ctx_in: Option<u64>) -> Out<u64> {
        let mut id = ctx_in.unwrap_or(0);
        let p = if ctx_in.is_some() { &mut id as *mut u64 } else { std::ptr::null_mut() };
        // SAFETY: io_setup writes the context id into a local u64, or is given NULL.
        sys(unsafe { libc::syscall(libc::SYS_io_setup, nr as libc::c_ulong, p) })?;
        Ok(id)
    }
    unsafe fn submit(&mut self, ctx: u64, nr: i64, iocbpp: *const *mut Iocb) -> Out<i64> {
        // SAFETY: the caller guarantees the array; the kernel checks every pointer it reads.
        sys(unsafe { libc::syscall(libc::SYS_io_submit, ctx, nr, iocbpp) })
    }
    unsafe fn get_events(
        &mut self,
        ctx: u64,
        min: i64,
        nr: i64,
        out: *mut IoEvent,
        tmo: Tmo,
    ) -> Out<i64> {
        let ts = timespec_of(tmo);
        let tp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // A raw timespec may make the kernel wait for ever (a negative relative time saturates
        // to the largest expiry in hrtimer's ktime_add_safe): a signal ends the wait after
        // ALARM, and io_getevents then returns EINTR.
        let _alarm = Alarm::for_timeout(tmo);
        // SAFETY: the caller guarantees room for `nr` events; the timespec is a local or NULL.
        sys(unsafe { libc::syscall(libc::SYS_io_getevents, ctx, min, nr, out, tp) })
    }
    unsafe fn cancel(&mut self, ctx: u64, iocb: *mut Iocb) -> Out<()> {
        let mut result = IoEvent::default();
        // SAFETY: the kernel reads the iocb's key (any address is checked) and may write a local.
        sys(unsafe { libc::syscall(libc::SYS_io_cancel, ctx, iocb, &mut result as *mut IoEvent) })?;
        Ok(())
    }
    fn destroy(&mut self, ctx: u64) -> Out<()> {
        // SAFETY: no pointers.
        sys(unsafe { libc::syscall(libc::SYS_io_destroy, ctx) })?;
        Ok(())
    }
}

impl Drop for KernelAio {
    fn drop(&mut self) {
        for fd in [self.rw, self.ro, self.wo] {
            // SAFETY: our own descriptors.
            unsafe { libc::close(fd) };
        }
    }
}

/// A C ABI return value: a count, or a negative errno.
fn cret(r: libc::c_int) -> Out<i64> {
    if r < 0 {
        Err(Fail::Errno(-r))
    } else {
        Ok(i64::from(r))
    }
}

/// nvaio through its C ABI: the `extern "C"` functions of `nvaio::capi` (what a C program
/// links in place of libaio), called with libaio's argument types. The namespaces are opened
/// with `nvaio_open`, as a C program opens them.
pub struct CAbi {
    rw: RawFd,
    ro: RawFd,
    wo: RawFd,
    geometry: (u32, u64),
}

impl CAbi {
    /// Opens namespace 1 of the controller at PCI address `bdf` (bound to vfio-pci; brought up
    /// now or shared with an earlier open in this process) for reading and writing, reading only
    /// and writing only.
    pub fn open(bdf: &str) -> Result<CAbi, String> {
        let addr = std::ffi::CString::new(bdf).map_err(|e| e.to_string())?;
        let open = |flags: i32| -> Result<RawFd, String> {
            // SAFETY: a NUL-terminated string.
            let fd = unsafe { capi::nvaio_open(addr.as_ptr(), 1, flags) };
            if fd < 0 {
                // SAFETY: nvaio_last_error returns a NUL-terminated string, never NULL.
                let why = unsafe { std::ffi::CStr::from_ptr(capi::nvaio_last_error()) };
                return Err(format!("nvaio_open: {}: {}", errno_name(-fd), why.to_string_lossy()));
            }
            Ok(fd)
        };
        let (rw, ro, wo) = (open(libc::O_RDWR)?, open(libc::O_RDONLY)?, open(libc::O_WRONLY)?);
        let f = nvaio::file::lookup(rw).ok_or("nvaio_open returned an unknown descriptor")?;
        Ok(CAbi { rw, ro, wo, geometry: (f.ns.block_size, f.ns.size_bytes()) })
    }
}

impl Backend for CAbi {
    fn label(&self) -> &'static str {
        "nvaio C ABI"
    }
    fn fd(&self, access: Access) -> RawFd {
        match access {
            Access::ReadWrite => self.rw,
            Access::ReadOnly => self.ro,
            Access::WriteOnly => self.wo,
        }
    }
    fn geometry(&self) -> (u32, u64) {
        self.geometry
    }
    fn setup(&mut self, nr: u32, ctx_in: Option<u64>) -> Out<u64> {
        let mut ctx = ctx_in.unwrap_or(0) as IoContextT;
        let p = if ctx_in.is_some() { &mut ctx as *mut IoContextT } else { std::ptr::null_mut() };
        // libaio's `int maxevents`, which it hands to the kernel's unsigned nr_events as is: the
        // same bits.
        // SAFETY: a local io_context_t, or NULL.
        cret(unsafe { capi::io_setup(nr as libc::c_int, p) })?;
        Ok(ctx as u64)
    }
    unsafe fn submit(&mut self, ctx: u64, nr: i64, iocbpp: *const *mut Iocb) -> Out<i64> {
        // SAFETY: the caller guarantees `nr` pointers, each NULL or a valid iocb.
        cret(unsafe { capi::io_submit(ctx as IoContextT, nr, iocbpp.cast_mut()) })
    }
    unsafe fn get_events(
        &mut self,
        ctx: u64,
        min: i64,
        nr: i64,
        out: *mut IoEvent,
        tmo: Tmo,
    ) -> Out<i64> {
        let mut ts = timespec_of(tmo);
        let tp = ts.as_mut().map_or(std::ptr::null_mut(), |t| t as *mut libc::timespec);
        // As for the kernel: a raw timespec may mean no limit, which only a signal ends.
        let _alarm = Alarm::for_timeout(tmo);
        // SAFETY: the caller guarantees room for `nr` events (or NULL); the timespec is a local
        // or NULL.
        cret(unsafe { capi::io_getevents(ctx as IoContextT, min, nr, out, tp) })
    }
    unsafe fn cancel(&mut self, ctx: u64, iocb: *mut Iocb) -> Out<()> {
        let mut result = IoEvent::default();
        // SAFETY: `iocb` is NULL or an arena iocb; `result` is a local.
        cret(unsafe { capi::io_cancel(ctx as IoContextT, iocb, &mut result) })?;
        Ok(())
    }
    fn destroy(&mut self, ctx: u64) -> Out<()> {
        cret(capi::io_destroy(ctx as IoContextT))?;
        Ok(())
    }
}

impl Drop for CAbi {
    fn drop(&mut self) {
        for fd in [self.rw, self.ro, self.wo] {
            capi::nvaio_close(fd);
        }
    }
}

const NEEDS_C_ABI: &str = "the Rust API cannot express this call (the C ABI run compares it)";
const DESTROYED: &str =
    "the Rust API consumes a Context in destroy(): a destroyed context can only be named again \
     through the C ABI (whose run compares it)";
const NULL_IOCB: &str =
    "the Rust API's cancel identifies a request by address and never reads the iocb, so it has \
     no key to fault on (the C ABI run compares it)";

/// nvaio through its Rust API, `nvaio::Context`.
pub struct RustApi {
    ctrl: Arc<Controller>,
    rw: RawFd,
    ro: RawFd,
    wo: RawFd,
    contexts: Vec<(u64, Context)>,
    destroyed: HashSet<u64>,
}

impl RustApi {
    pub fn open(ctrl: Arc<Controller>) -> Result<RustApi, String> {
        let open = |a| nvaio::open_on(ctrl.clone(), 1, a).map_err(|e| format!("nvaio open: {e}"));
        let (rw, ro, wo) =
            (open(Access::ReadWrite)?, open(Access::ReadOnly)?, open(Access::WriteOnly)?);
        Ok(RustApi { ctrl, rw, ro, wo, contexts: Vec::new(), destroyed: HashSet::new() })
    }

    fn ctx(&mut self, id: u64) -> Out<&mut Context> {
        match self.contexts.iter_mut().find(|(i, _)| *i == id) {
            Some((_, c)) => Ok(c),
            None if self.destroyed.contains(&id) => Err(Fail::NotExpressible(DESTROYED)),
            None => Err(Fail::NotExpressible(NEEDS_C_ABI)),
        }
    }

    /// The Rust API takes iocbs by shared reference, so it cannot store `aio_key`.
    const KEY: &'static str = "the Rust API takes iocbs by shared reference and cannot store \
         aio_key (the C ABI run compares it)";
}

fn errno(e: nvaio::Errno) -> Fail {
    Fail::Errno(e.0)
}

impl Backend for RustApi {
    fn label(&self) -> &'static str {
        "nvaio Rust API"
    }
    fn fd(&self, access: Access) -> RawFd {
        match access {
            Access::ReadWrite => self.rw,
            Access::ReadOnly => self.ro,
            Access::WriteOnly => self.wo,
        }
    }
    fn geometry(&self) -> (u32, u64) {
        self.ctrl.namespace(1).map_or((0, 0), |n| (n.block_size, n.size_bytes()))
    }
    fn setup(&mut self, nr: u32, ctx_in: Option<u64>) -> Out<u64> {
        if ctx_in != Some(0) {
            return Err(Fail::NotExpressible(NEEDS_C_ABI));
        }
        let c = Context::setup(nr).map_err(errno)?;
        let id = c.id();
        self.destroyed.remove(&id);
        self.contexts.push((id, c));
        Ok(id)
    }
    unsafe fn submit(&mut self, ctx: u64, nr: i64, iocbpp: *const *mut Iocb) -> Out<i64> {
        if nr < 0 {
            return Err(Fail::NotExpressible(NEEDS_C_ABI));
        }
        let mut refs: Vec<&Iocb> = Vec::with_capacity(nr as usize);
        for i in 0..nr as usize {
            // SAFETY: the caller guarantees `nr` pointers.
            let p = unsafe { *iocbpp.add(i) };
            if p.is_null() {
                return Err(Fail::NotExpressible(NEEDS_C_ABI));
            }
            // SAFETY: non-null pointers in the array are valid iocbs of the case's arena, not
            // written while these references live.
            refs.push(unsafe { &*p });
        }
        let c = self.ctx(ctx)?;
        // SAFETY: the case's arena holds every buffer and iovec for the whole case, past the
        // destruction of its contexts.
        unsafe { c.submit(&refs) }.map(|n| n as i64).map_err(errno)
    }
    unsafe fn get_events(
        &mut self,
        ctx: u64,
        min: i64,
        nr: i64,
        out: *mut IoEvent,
        tmo: Tmo,
    ) -> Out<i64> {
        let timeout = match tmo {
            Tmo::Null => None,
            Tmo::Zero => Some(Duration::ZERO),
            Tmo::Ms(ms) => Some(Duration::from_millis(ms)),
            Tmo::Raw(..) => return Err(Fail::NotExpressible(NEEDS_C_ABI)),
        };
        if min < 0 || nr < 0 || (out.is_null() && nr > 0) {
            return Err(Fail::NotExpressible(NEEDS_C_ABI));
        }
        let out = if nr == 0 {
            &mut [][..]
        } else {
            // SAFETY: the caller guarantees room for `nr` events at a non-null `out`.
            unsafe { std::slice::from_raw_parts_mut(out, nr as usize) }
        };
        let c = self.ctx(ctx)?;
        c.get_events(min as usize, out, timeout).map(|n| n as i64).map_err(errno)
    }
    unsafe fn cancel(&mut self, ctx: u64, iocb: *mut Iocb) -> Out<()> {
        if iocb.is_null() {
            return Err(Fail::NotExpressible(NULL_IOCB));
        }
        self.ctx(ctx)?.cancel(iocb).map_err(errno)
    }
    fn writes_aio_key(&self) -> bool {
        false
    }
    fn destroy(&mut self, ctx: u64) -> Out<()> {
        match self.contexts.iter().position(|(i, _)| *i == ctx) {
            Some(k) => {
                let (id, c) = self.contexts.swap_remove(k);
                c.destroy();
                self.destroyed.insert(id);
                Ok(())
            }
            None if self.destroyed.contains(&ctx) => Err(Fail::NotExpressible(DESTROYED)),
            None => Err(Fail::NotExpressible(NEEDS_C_ABI)),
        }
    }
}

impl Drop for RustApi {
    fn drop(&mut self) {
        for (_, c) in self.contexts.drain(..) {
            c.destroy();
        }
        for fd in [self.rw, self.ro, self.wo] {
            let _ = nvaio::close(fd);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Memory shared by both runs of a case

const NBUF: usize = 8;
const BUF_STRIDE: usize = 2 << 20;
const BUF_LEN: usize = (1 << 20) + 8192;
const FILL_MAX: usize = 4096;
/// The part of the namespace each case may use, from (index + 1) * REGION.
const REGION: u64 = 1 << 20;

/// An anonymous mapping, unmapped on drop.
struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(len: usize, prot: i32) -> Map {
        // SAFETY: a fresh anonymous mapping; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(p != libc::MAP_FAILED, "mmap of {len} bytes failed");
        Map { ptr: p.cast(), len }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our own mapping, with no references into it left.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Where a case's iocbs, iovecs and buffers live: the same addresses for both backends.
struct Arena {
    iocbs: Map,
    fill: Map,
    bufs: Map,
    guard: Map,
    read_only: Map,
    iovs: Vec<Vec<libc::iovec>>,
}

impl Arena {
    fn new() -> Arena {
        let isz = std::mem::size_of::<Iocb>();
        Arena {
            iocbs: Map::new(64 * isz, libc::PROT_READ | libc::PROT_WRITE),
            fill: Map::new(FILL_MAX * isz, libc::PROT_READ | libc::PROT_WRITE),
            bufs: Map::new(NBUF * BUF_STRIDE, libc::PROT_READ | libc::PROT_WRITE),
            guard: Map::new(4096, libc::PROT_NONE),
            read_only: Map::new(64 << 10, libc::PROT_READ),
            iovs: Vec::new(),
        }
    }
    fn iocb(&self, i: usize) -> *mut Iocb {
        assert!(i < 64);
        // SAFETY: within the mapping of 64 iocbs.
        unsafe { self.iocbs.ptr.cast::<Iocb>().add(i) }
    }
    fn fill(&self, i: usize) -> *mut Iocb {
        assert!(i < FILL_MAX);
        // SAFETY: within the mapping of FILL_MAX iocbs.
        unsafe { self.fill.ptr.cast::<Iocb>().add(i) }
    }
    fn buf(&self, b: u8) -> *mut u8 {
        assert!((b as usize) < NBUF);
        // SAFETY: within the buffer mapping.
        unsafe { self.bufs.ptr.add(b as usize * BUF_STRIDE) }
    }
    fn buf_bytes(&self, b: u8, len: usize) -> &[u8] {
        // SAFETY: len is clamped to the buffer; no I/O is in flight when buffers are inspected
        // (steps run one at a time and every Check follows a Reap).
        unsafe { std::slice::from_raw_parts(self.buf(b), len.min(BUF_LEN)) }
    }
    /// Fills buffer `b` with the bytes of `seed`.
    fn pattern_into(&self, b: u8, seed: u64) {
        // SAFETY: the whole of buffer `b`, idle (no I/O in flight, no other slice of it alive).
        pattern(unsafe { std::slice::from_raw_parts_mut(self.buf(b), BUF_LEN) }, seed);
    }
    fn clear_bufs(&self) {
        // SAFETY: the whole buffer mapping, idle between runs.
        unsafe { std::ptr::write_bytes(self.bufs.ptr, 0, NBUF * BUF_STRIDE) };
    }
    /// Describes an event's obj: `#i`, `F`, or the address.
    fn obj_name(&self, obj: u64) -> String {
        let isz = std::mem::size_of::<Iocb>() as u64;
        let index = |base: u64, n: u64| {
            let k = obj.wrapping_sub(base) / isz;
            (obj >= base && k < n && base + k * isz == obj).then_some(k)
        };
        if let Some(k) = index(self.iocbs.ptr as u64, 64) {
            format!("#{k}")
        } else if index(self.fill.ptr as u64, FILL_MAX as u64).is_some() {
            "F".to_string()
        } else {
            format!("{obj:#x}")
        }
    }
}

/// Sizes that depend on the device and the case.
#[derive(Clone, Copy)]
struct Geom {
    bs: i64,
    size: i64,
    base: i64,
}

impl Geom {
    fn len(&self, s: Sz) -> i64 {
        match s {
            B(b) => b,
            L(l) => l * self.bs,
            LB(l, b) => l * self.bs + b,
            End(l) => self.size + l * self.bs,
            EndB(l, b) => self.size + l * self.bs + b,
            Abs(a) => a,
        }
    }
    fn off(&self, s: Sz) -> i64 {
        match s {
            B(_) | L(_) | LB(..) => self.base + self.len(s),
            _ => self.len(s),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Observations

/// What one step showed on one backend. `key` is compared; `note` is shown, not compared.
#[derive(Clone, Debug, Default)]
struct Obs {
    key: String,
    note: String,
    na: Option<&'static str>,
}

impl Obs {
    fn key(key: impl Into<String>) -> Obs {
        Obs { key: key.into(), ..Default::default() }
    }
    fn with_note(mut self, note: impl Into<String>) -> Obs {
        self.note = note.into();
        self
    }
    fn show(&self) -> String {
        let mut s = match self.na {
            Some(why) => format!("n/a ({why})"),
            None => self.key.clone(),
        };
        if !self.note.is_empty() {
            let _ = write!(s, " [{}]", self.note);
        }
        s
    }
}

pub fn errno_name(e: i32) -> String {
    let n = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EFAULT => "EFAULT",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::EMFILE => "EMFILE",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::ENOSYS => "ENOSYS",
        libc::ETIME => "ETIME",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::ECANCELED => "ECANCELED",
        _ => return format!("errno {e}"),
    };
    n.to_string()
}

fn res_name(res: i64) -> String {
    if res < 0 && res > -4096 {
        format!("-{}", errno_name(-res as i32))
    } else {
        res.to_string()
    }
}

fn out_name<T: std::fmt::Display>(r: &Out<T>) -> String {
    match r {
        Ok(v) => format!("ret {v}"),
        Err(Fail::Errno(e)) => format!("err {}", errno_name(*e)),
        Err(Fail::NotExpressible(_)) => "n/a".into(),
    }
}

fn obs_of<T: std::fmt::Display>(r: &Out<T>) -> Obs {
    match r {
        Err(Fail::NotExpressible(why)) => Obs { na: Some(why), ..Default::default() },
        _ => Obs::key(out_name(r)),
    }
}

/// Events as a set: sorted, fill copies grouped.
fn events_name(arena: &Arena, evs: &[IoEvent]) -> String {
    let mut fill: Vec<String> = Vec::new();
    let mut own: Vec<(String, String)> = Vec::new();
    for e in evs {
        let obj = arena.obj_name(e.obj);
        let body = format!("data={:#x} res={} res2={}", e.data, res_name(e.res), e.res2);
        if obj == "F" {
            fill.push(format!("res={} res2={}", res_name(e.res), e.res2));
        } else {
            own.push((obj, body));
        }
    }
    own.sort();
    fill.sort();
    let mut parts: Vec<String> = own.into_iter().map(|(o, b)| format!("{o} {b}")).collect();
    let mut i = 0;
    while i < fill.len() {
        let j = fill[i..].iter().position(|x| *x != fill[i]).map_or(fill.len(), |k| i + k);
        parts.push(format!("F x{} {}", j - i, fill[i]));
        i = j;
    }
    format!("{{{}}}", parts.join(", "))
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

// ---------------------------------------------------------------------------------------------
// Watchdog and crash guard: no step may hang the suite or take it down without a verdict.

/// What to print if the process faults or hangs now: both texts are formatted before every
/// step, so that the signal handler only writes bytes and exits (no allocation, no formatting).
static GUARD_MSG: Mutex<(Vec<u8>, Vec<u8>)> = Mutex::new((Vec::new(), Vec::new()));
static DEADLINE_MS: AtomicU64 = AtomicU64::new(u64::MAX);
static WATCHDOG_STARTED: AtomicBool = AtomicBool::new(false);

fn now_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

fn emergency_exit(crashed: bool) -> ! {
    if let Ok(m) = GUARD_MSG.try_lock() {
        let text = if crashed { &m.0 } else { &m.1 };
        // SAFETY: write(2) of bytes that live in the static; async-signal-safe.
        unsafe { libc::write(1, text.as_ptr().cast(), text.len()) };
    }
    // SAFETY: _exit is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(1) }
}

extern "C" fn on_fault(_sig: libc::c_int) {
    emergency_exit(true);
}

fn start_guards() {
    if WATCHDOG_STARTED.swap(true, Ordering::SeqCst) {
        return;
    }
    now_ms();
    std::thread::spawn(|| loop {
        std::thread::sleep(Duration::from_millis(200));
        if now_ms() > DEADLINE_MS.load(Ordering::SeqCst) {
            emergency_exit(false);
        }
    });
    for sig in [libc::SIGSEGV, libc::SIGBUS] {
        // SAFETY: installs a handler that only formats into a preallocated string, writes and
        // exits; sa_flags without SA_RESTART is irrelevant for faults.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_fault as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn arm(limit: Duration, msg: String) {
    if let Ok(mut m) = GUARD_MSG.lock() {
        m.0 = msg.replace("{what}", "crashed (SIGSEGV or SIGBUS)").into_bytes();
        m.1 = msg.replace("{what}", "hung (no answer within the step's time limit)").into_bytes();
    }
    DEADLINE_MS.store(now_ms() + limit.as_millis() as u64, Ordering::SeqCst);
}

fn disarm() {
    DEADLINE_MS.store(u64::MAX, Ordering::SeqCst);
}

// ---------------------------------------------------------------------------------------------
// Running one case on one backend

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Empty,
    Live(u64),
    Dead(u64),
}

#[derive(Clone)]
struct Slot {
    state: SlotState,
    nr: u32,
    /// Events owed: accepted requests not yet reaped.
    owed: usize,
    /// Events already taken by a `Count::Between` io_getevents, reported with the next Reap.
    got: Vec<IoEvent>,
}

const EMPTY_SLOT: Slot = Slot { state: SlotState::Empty, nr: 0, owed: 0, got: Vec::new() };

struct Run<'a> {
    be: &'a mut dyn Backend,
    arena: &'a Arena,
    case: &'a Case,
    g: Geom,
    slots: [Slot; 4],
    efds: [RawFd; 3],
    file_fd: RawFd,
    closed_fd: RawFd,
    aio_max_nr: Option<String>,
}

const AIO_MAX_NR: &str = "/proc/sys/fs/aio-max-nr";

impl Run<'_> {
    fn fd_of(&self, fd: Fd) -> RawFd {
        match fd {
            Fd::Rw => self.be.fd(Access::ReadWrite),
            Fd::Ro => self.be.fd(Access::ReadOnly),
            Fd::Wo => self.be.fd(Access::WriteOnly),
            Fd::Closed => self.closed_fd,
            Fd::File => self.file_fd,
            Fd::Efd(k) => self.efds[k as usize % 3],
        }
    }

    /// Writes iocb `i` of the case into `dst`, with this backend's descriptors.
    fn build(&self, io: &Io, i: usize, dst: *mut Iocb) {
        let g = &self.g;
        let buf = match io.mem {
            Mem::Null => 0,
            Mem::At(b, off) => self.arena.buf(b) as u64 + g.len(off) as u64,
            Mem::Iov(_) | Mem::IovRep(..) => self.arena.iovs[i].as_ptr() as u64,
            Mem::Unmapped => self.arena.guard.ptr as u64,
            Mem::ReadOnly => self.arena.read_only.ptr as u64,
            Mem::Raw(v) => v,
        };
        let iocb = Iocb {
            aio_data: io.data.unwrap_or(0xda7a_0000 + i as u64),
            aio_key: io.key,
            aio_rw_flags: io.rw_flags,
            aio_lio_opcode: io.op,
            aio_reqprio: io.reqprio,
            aio_fildes: self.fd_of(io.fd) as u32,
            aio_buf: buf,
            aio_nbytes: g.len(io.len) as u64,
            aio_offset: g.off(io.off),
            aio_reserved2: io.reserved2,
            aio_flags: io.flags,
            aio_resfd: io.resfd.map_or(0, |f| self.fd_of(f) as u32),
        };
        // SAFETY: `dst` is a slot of the arena's iocb mappings; nothing refers to it now.
        unsafe { dst.write(iocb) };
    }

    fn ctx_id(&self, slot: u8) -> Option<u64> {
        match self.slots[slot as usize].state {
            SlotState::Live(id) | SlotState::Dead(id) => Some(id),
            SlotState::Empty => None,
        }
    }

    fn ring(&self, slot: u8) -> Option<*mut AioRingHeader> {
        match self.slots[slot as usize].state {
            SlotState::Live(id) => Some(id as *mut AioRingHeader),
            _ => None,
        }
    }

    fn header(&self, slot: u8) -> Option<AioRingHeader> {
        // SAFETY: a live context's id is the address of its mapped ring header (both backends);
        // volatile because the producer may write it concurrently.
        self.ring(slot).map(|p| unsafe { p.read_volatile() })
    }

    /// Runs one step and records what it showed.
    fn step(&mut self, step: &Step) -> Obs {
        match step {
            Differs(s) | MayDiffer(s) | KernelOnly(s) => self.step(s),
            Setup(slot, nr) => {
                let r = self.be.setup(*nr, Some(0));
                if let Ok(id) = r {
                    let s = &mut self.slots[*slot as usize];
                    if let SlotState::Live(old) = s.state {
                        // A slot reused while live: keep the context reachable for cleanup.
                        let _ = self.be.destroy(old);
                    }
                    *s = Slot { state: SlotState::Live(id), nr: *nr, owed: 0, got: Vec::new() };
                    return Obs::key("ret 0");
                }
                obs_of(&r)
            }
            SetupCtxNotZero(nr) | SetupNullCtxp(nr) => {
                let ctx_in = if matches!(step, SetupNullCtxp(_)) { None } else { Some(0x1234) };
                let r = self.be.setup(*nr, ctx_in);
                if let Ok(id) = r {
                    let _ = self.be.destroy(id);
                    return Obs::key("ret 0");
                }
                obs_of(&r)
            }
            Ring(slot) => match self.header(*slot) {
                None => Obs::key("no live context"),
                Some(h) => Obs::key(format!(
                    "magic={:#x} nr={} head={} tail={} header_length={} compat={} incompat={}",
                    h.magic,
                    h.nr,
                    h.head,
                    h.tail,
                    h.header_length,
                    h.compat_features,
                    h.incompat_features
                ))
                .with_note(format!("id={:#x}", h.id)),
            },
            Submit(slot, list) => self.submit(*slot, list.len() as i64, list, false),
            SubmitNr(slot, nr, list) => self.submit(*slot, *nr, list, false),
            SubmitNullIocb(slot) => self.submit(*slot, 1, &[], true),
            GetEvents { ctx, min, nr, tmo, count } => {
                self.get_events(*ctx, *min, *nr, *tmo, *count, false)
            }
            GetEventsNull { ctx, min, nr, tmo } => {
                self.get_events(*ctx, *min, *nr, *tmo, Count::Exact, true)
            }
            Reap(slot) => self.reap(*slot),
            Fill(slot, io) => self.fill(*slot, *io, None),
            FillBatch(slot, io, n) => self.fill(*slot, *io, Some(*n as usize)),
            Cancel(..) | CancelNull(_) => {
                let (slot, iocb) = match step {
                    Cancel(slot, i) => (slot, self.arena.iocb(*i as usize)),
                    CancelNull(slot) => (slot, std::ptr::null_mut()),
                    _ => unreachable!(),
                };
                let Some(id) = self.ctx_id(*slot) else { return Obs::key("no context") };
                // SAFETY: an arena iocb or NULL; the backends only read its key or compare its
                // address.
                let r = unsafe { self.be.cancel(id, iocb) };
                match r {
                    Ok(()) => Obs::key("ret 0"),
                    Err(_) => obs_of(&r.map(|_| 0)),
                }
            }
            Destroy(slot) => {
                let Some(id) = self.ctx_id(*slot) else { return Obs::key("no context") };
                let r = self.be.destroy(id);
                let s = &mut self.slots[*slot as usize];
                if r.is_ok() {
                    *s = Slot { state: SlotState::Dead(id), ..EMPTY_SLOT };
                    return Obs::key("ret 0");
                }
                obs_of(&r.map(|_| 0))
            }
            Pattern(b, seed) => {
                self.arena.pattern_into(*b, *seed);
                Obs::key("done")
            }
            Check(b, len) => {
                let n = self.g.len(*len).max(0) as usize;
                let mine = self.arena.buf_bytes(*b, n);
                if mine.iter().all(|&x| x == 0) {
                    return Obs::key(format!("B{b}[..{n}] is zero"));
                }
                for other in 0..NBUF as u8 {
                    if other != *b && self.arena.buf_bytes(other, n) == mine {
                        return Obs::key(format!("B{b}[..{n}] = B{other}[..{n}]"));
                    }
                }
                Obs::key(format!("B{b}[..{n}] hash {:016x}", fnv(mine)))
            }
            Eventfd(k) => {
                let mut v = 0u64;
                // SAFETY: reads 8 bytes into a local from our own non-blocking eventfd.
                let r = unsafe {
                    libc::read(self.efds[*k as usize % 3], (&mut v as *mut u64).cast(), 8)
                };
                if r == 8 {
                    Obs::key(format!("eventfd {k} counted {v}"))
                } else if last_errno() == libc::EAGAIN {
                    Obs::key(format!("eventfd {k} counted 0"))
                } else {
                    Obs::key(format!("eventfd {k} read failed: {}", errno_name(last_errno())))
                }
            }
            WaitRing { ctx, n, poke } => self.wait_ring(*ctx, *n, *poke),
            Key(i) => {
                if !self.be.writes_aio_key() {
                    return Obs { na: Some(RustApi::KEY), ..Default::default() };
                }
                // SAFETY: an arena iocb, not in use by any call now.
                let key = unsafe { (*self.arena.iocb(*i as usize)).aio_key };
                Obs::key(format!("aio_key {key:#x}"))
            }
            UserReap(slot) => self.user_reap(*slot),
            AioMaxNr(v) => {
                if self.aio_max_nr.is_none() {
                    self.aio_max_nr = std::fs::read_to_string(AIO_MAX_NR).ok();
                }
                match std::fs::write(AIO_MAX_NR, format!("{v}\n")) {
                    Ok(()) => Obs::key("set"),
                    Err(e) => Obs::key(format!("cannot set: {e}")),
                }
            }
        }
    }

    fn submit(&mut self, slot: u8, nr: i64, list: &[u8], null: bool) -> Obs {
        let Some(id) = self.ctx_id(slot) else { return Obs::key("no context") };
        let mut ptrs: Vec<*mut Iocb> = list.iter().map(|&i| self.arena.iocb(i as usize)).collect();
        if null {
            ptrs.push(std::ptr::null_mut());
        }
        while (ptrs.len() as i64) < nr {
            ptrs.push(std::ptr::null_mut());
        }
        // SAFETY: `ptrs` holds at least `nr` pointers, each NULL or an arena iocb.
        let r = unsafe { self.be.submit(id, nr, ptrs.as_ptr()) };
        if let Ok(n) = r {
            self.slots[slot as usize].owed += n as usize;
        }
        obs_of(&r)
    }

    /// io_getevents into an array, or into NULL with `null`.
    fn get_events(
        &mut self,
        slot: u8,
        min: i64,
        nr: i64,
        tmo: Tmo,
        count: Count,
        null: bool,
    ) -> Obs {
        let Some(id) = self.ctx_id(slot) else { return Obs::key("no context") };
        let mut out = vec![IoEvent::default(); nr.clamp(1, 1 << 20) as usize];
        let p = if null { std::ptr::null_mut() } else { out.as_mut_ptr() };
        let t0 = Instant::now();
        // SAFETY: `out` has room for `nr` events whenever nr is positive and below the clamp;
        // or NULL, which the backends are given as is.
        let r = unsafe { self.be.get_events(id, min, nr, p, tmo) };
        let took = t0.elapsed();
        let mut obs = obs_of(&r);
        let n = match r {
            Ok(n) => n,
            // Only a wait that a signal ended says anything about time.
            Err(Fail::Errno(libc::EINTR)) => {
                let _ = write!(
                    obs.key,
                    ", after about {:.1} s",
                    (took.as_secs_f64() * 2.0).round() / 2.0
                );
                return obs;
            }
            Err(_) => return obs,
        };
        let evs = &out[..n as usize];
        let s = &mut self.slots[slot as usize];
        s.owed = s.owed.saturating_sub(n as usize);
        match count {
            Count::Exact => obs.key = format!("ret {n} {}", events_name(self.arena, evs)),
            Count::Between => {
                s.got.extend_from_slice(evs);
                obs.key = if n >= min && n <= nr {
                    format!("ret in [{min}, {nr}]")
                } else {
                    format!("ret {n}")
                };
                obs.note = format!("ret {n}");
            }
        }
        // How long it waited, where the contract says.
        let timing = match tmo {
            Tmo::Zero => Some(if took < Duration::from_millis(500) {
                "at once".to_string()
            } else {
                format!("after {took:.1?}")
            }),
            Tmo::Ms(ms) if n < min => Some(if took >= Duration::from_millis(ms * 9 / 10) {
                "after the timeout".to_string()
            } else {
                format!("before the timeout ({took:.1?})")
            }),
            Tmo::Raw(..) => Some(if took < Duration::from_millis(200) {
                "at once".to_string()
            } else {
                format!("after about {:.1} s", (took.as_secs_f64() * 2.0).round() / 2.0)
            }),
            Tmo::Null if min == 0 => Some(if took < Duration::from_millis(500) {
                "at once".to_string()
            } else {
                format!("after {took:.1?}")
            }),
            _ => None,
        };
        if let Some(t) = timing {
            let _ = write!(obs.key, ", {t}");
        }
        obs
    }

    fn reap(&mut self, slot: u8) -> Obs {
        let Some(id) = self.ctx_id(slot) else { return Obs::key("no context") };
        let mut evs = std::mem::take(&mut self.slots[slot as usize].got);
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut out = vec![IoEvent::default(); 256];
        let mut err = None;
        while self.slots[slot as usize].owed > 0 && Instant::now() < deadline {
            // SAFETY: `out` has room for 256 events.
            match unsafe { self.be.get_events(id, 1, 256, out.as_mut_ptr(), Tmo::Ms(1000)) } {
                Ok(n) => {
                    evs.extend_from_slice(&out[..n as usize]);
                    let s = &mut self.slots[slot as usize];
                    s.owed = s.owed.saturating_sub(n as usize);
                }
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        // Anything beyond what was owed (there should be nothing) shows up too.
        // SAFETY: as above.
        if let Ok(n) = unsafe { self.be.get_events(id, 0, 256, out.as_mut_ptr(), Tmo::Zero) } {
            evs.extend_from_slice(&out[..n as usize]);
        }
        let owed = self.slots[slot as usize].owed;
        let mut key = format!("{} events {}", evs.len(), events_name(self.arena, &evs));
        if owed > 0 {
            let _ = write!(key, "; {owed} still owed after 15 s");
        }
        if let Some(e) = err {
            let _ = write!(key, "; io_getevents: {}", out_name::<i64>(&Err(e)));
        }
        self.slots[slot as usize].owed = 0;
        Obs::key(key)
    }

    fn fill(&mut self, slot: u8, io: u8, batch: Option<usize>) -> Obs {
        let Some(id) = self.ctx_id(slot) else { return Obs::key("no context") };
        let tpl = self.case.iocbs[io as usize];
        for k in 0..FILL_MAX {
            self.build(&tpl, io as usize, self.arena.fill(k));
            // SAFETY: just written above; a distinct data per copy.
            unsafe { (*self.arena.fill(k)).aio_data = 0xf111_0000 + k as u64 };
        }
        let nr = self.slots[slot as usize].nr as i64;
        let ring_nr = self.header(slot).map_or(0, |h| h.nr as i64);
        let (n, err) = match batch {
            Some(count) => {
                let ptrs: Vec<*mut Iocb> = (0..count).map(|k| self.arena.fill(k)).collect();
                // SAFETY: `count` valid iocb pointers.
                match unsafe { self.be.submit(id, count as i64, ptrs.as_ptr()) } {
                    Ok(n) => (n, None),
                    Err(e) => (0, Some(e)),
                }
            }
            None => {
                let mut n = 0i64;
                let mut err = None;
                while (n as usize) < FILL_MAX {
                    let p = self.arena.fill(n as usize);
                    // SAFETY: one valid iocb pointer.
                    match unsafe { self.be.submit(id, 1, &p) } {
                        Ok(1) => n += 1,
                        Ok(x) => {
                            err = Some(Fail::Errno(-(x as i32)));
                            break;
                        }
                        Err(e) => {
                            err = Some(e);
                            break;
                        }
                    }
                }
                (n, err)
            }
        };
        self.slots[slot as usize].owed += n as usize;
        let note = format!("queued {n}, ring nr {ring_nr}, nr_events {nr}");
        let within = n >= nr && n < ring_nr;
        let key = match (batch, &err) {
            (None, Some(Fail::Errno(libc::EAGAIN))) if within => {
                "EAGAIN after between nr_events and ring nr - 1 requests".to_string()
            }
            (Some(count), None) if within && (n as usize) < count => {
                "returned a count between nr_events and ring nr - 1".to_string()
            }
            (_, e) => format!(
                "queued {n}, then {}",
                e.as_ref().map_or("nothing".into(), |e| out_name::<i64>(&Err(e.clone())))
            ),
        };
        Obs::key(key).with_note(note)
    }

    fn wait_ring(&mut self, slot: u8, n: u32, poke: bool) -> Obs {
        let Some(id) = self.ctx_id(slot) else { return Obs::key("no context") };
        let deadline = Instant::now() + Duration::from_secs(3);
        let n = if n == 0 { self.slots[slot as usize].owed as u32 } else { n };
        loop {
            if poke {
                let mut none = [IoEvent::default(); 1];
                // SAFETY: nr 0: nothing is written to `none`.
                let _ = unsafe { self.be.get_events(id, 0, 0, none.as_mut_ptr(), Tmo::Zero) };
            }
            let Some(h) = self.header(slot) else { return Obs::key("no live context") };
            let held = if h.nr == 0 { 0 } else { (h.tail + h.nr - h.head % h.nr) % h.nr };
            if held >= n {
                return Obs::key(format!("ring holds {n} events"));
            }
            if Instant::now() >= deadline {
                return Obs::key(format!("ring holds {held} of {n} events after 3 s"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn user_reap(&mut self, slot: u8) -> Obs {
        let Some(p) = self.ring(slot) else { return Obs::key("no live context") };
        // SAFETY: a live ring; header words are read and written the way libaio does it.
        let h = unsafe { p.read_volatile() };
        if h.nr == 0 || h.header_length as usize != std::mem::size_of::<AioRingHeader>() {
            return Obs::key(format!(
                "unusable ring header nr={} header_length={}",
                h.nr, h.header_length
            ));
        }
        let (mut head, tail) = (h.head % h.nr, h.tail % h.nr);
        let mut evs = Vec::new();
        while head != tail {
            // SAFETY: head < nr: an event slot inside the ring mapping.
            let ev = unsafe {
                p.cast::<u8>()
                    .add(h.header_length as usize)
                    .cast::<IoEvent>()
                    .add(head as usize)
                    .read_volatile()
            };
            evs.push(ev);
            head = (head + 1) % h.nr;
        }
        // SAFETY: the head word of the live ring header.
        unsafe { std::ptr::addr_of_mut!((*p).head).write_volatile(head) };
        let s = &mut self.slots[slot as usize];
        s.owed = s.owed.saturating_sub(evs.len());
        Obs::key(format!("{} events {}", evs.len(), events_name(self.arena, &evs)))
    }

    /// Destroys what the case left, restores aio-max-nr.
    fn cleanup(&mut self) {
        for k in 0..self.slots.len() {
            if let SlotState::Live(id) = self.slots[k].state {
                let _ = self.be.destroy(id);
            }
        }
        if let Some(v) = self.aio_max_nr.take() {
            let _ = std::fs::write(AIO_MAX_NR, v);
        }
        for fd in self.efds {
            // SAFETY: our own eventfds.
            unsafe { libc::close(fd) };
        }
    }
}

const AFTER_NA: &str = "follows an io_submit or io_getevents this backend could not express";

/// Whether a step may queue requests or take events.
fn changes_events(step: &Step) -> bool {
    match step {
        Differs(s) | MayDiffer(s) | KernelOnly(s) => changes_events(s),
        Submit(..) | SubmitNr(..) | SubmitNullIocb(_) | GetEvents { .. } | GetEventsNull { .. } => {
            true
        }
        Reap(_) | Fill(..) | FillBatch(..) => true,
        _ => false,
    }
}

/// Runs a case on one backend and returns one observation per step.
fn run_case(
    be: &mut dyn Backend,
    case: &Case,
    index: usize,
    arena: &mut Arena,
    shared: &Shared,
    guard: &dyn Fn(&str, usize) -> String,
) -> Vec<Obs> {
    let (bs, size) = be.geometry();
    let regions = (size / REGION).saturating_sub(3).max(1);
    let base = ((index as u64 % regions) + 1) * REGION;
    let g = Geom { bs: bs as i64, size: size as i64, base: base as i64 };
    arena.clear_bufs();
    // Iovec arrays at stable addresses (rebuilt in place: their contents do not depend on the
    // backend).
    arena.iovs = case
        .iocbs
        .iter()
        .map(|io| {
            let one = |s: &Seg| libc::iovec {
                iov_base: (arena.buf(s.buf) as u64 + g.len(s.off) as u64) as *mut libc::c_void,
                iov_len: g.len(s.len) as usize,
            };
            match io.mem {
                Mem::Iov(segs) => segs.iter().map(one).collect(),
                Mem::IovRep(n, s) => vec![one(&s); n as usize],
                _ => Vec::new(),
            }
        })
        .collect();
    let efds = [0; 3].map(|_| {
        // SAFETY: plain eventfd creation.
        unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) }
    });
    let mut run = Run {
        be,
        arena,
        case,
        g,
        slots: [EMPTY_SLOT; 4],
        efds,
        file_fd: shared.file_fd,
        closed_fd: shared.closed_fd,
        aio_max_nr: None,
    };
    for (i, io) in case.iocbs.iter().enumerate() {
        run.build(io, i, run.arena.iocb(i));
    }
    let mut obs = Vec::with_capacity(case.steps.len());
    // Once a call that could have changed a context's requests or events could not be expressed,
    // the backend's state no longer follows the kernel's: the rest of its run is not compared.
    let mut lost = false;
    for (k, step) in case.steps.iter().enumerate() {
        let kernel_only = matches!(step, KernelOnly(_));
        if kernel_only && run.be.label() != "kernel" {
            obs.push(Obs::key("not run: it would fault the process"));
            continue;
        }
        if lost {
            obs.push(Obs { na: Some(AFTER_NA), ..Default::default() });
            continue;
        }
        arm(Duration::from_secs(40), guard(run.be.label(), k));
        let o = run.step(step);
        disarm();
        lost = o.na.is_some() && changes_events(step);
        obs.push(o);
    }
    arm(Duration::from_secs(60), guard(run.be.label(), usize::MAX));
    run.cleanup();
    disarm();
    obs
}

/// Descriptors both backends share.
pub struct Shared {
    pub file_fd: RawFd,
    pub closed_fd: RawFd,
}

impl Shared {
    pub fn new() -> Result<Shared, String> {
        let dir = std::env::temp_dir();
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("nvaio-conformance-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let _ = std::fs::remove_file(&path);
        let file_fd = std::os::fd::IntoRawFd::into_raw_fd(file);
        // A descriptor number that is not open: well above anything this process opens.
        let closed_fd = 1000;
        // SAFETY: F_GETFD on a number; no pointers.
        if unsafe { libc::fcntl(closed_fd, libc::F_GETFD) } >= 0 {
            return Err(format!("descriptor {closed_fd} is open; the suite needs it closed"));
        }
        Ok(Shared { file_fd, closed_fd })
    }
}

// ---------------------------------------------------------------------------------------------
// Comparing and reporting

fn step_name(s: &Step) -> String {
    match s {
        Differs(s) | MayDiffer(s) | KernelOnly(s) => step_name(s),
        Setup(c, nr) => format!("io_setup({nr}) -> ctx{c}"),
        SetupCtxNotZero(nr) => format!("io_setup({nr}) with *ctxp != 0"),
        SetupNullCtxp(nr) => format!("io_setup({nr}, NULL)"),
        Ring(c) => format!("ring header of ctx{c}"),
        Submit(c, l) => format!("io_submit(ctx{c}, {}, {l:?})", l.len()),
        SubmitNr(c, nr, l) => format!("io_submit(ctx{c}, {nr}, {l:?})"),
        SubmitNullIocb(c) => format!("io_submit(ctx{c}, 1, [NULL])"),
        GetEvents { ctx, min, nr, tmo, .. } => {
            format!("io_getevents(ctx{ctx}, {min}, {nr}, {tmo:?})")
        }
        GetEventsNull { ctx, min, nr, tmo } => {
            format!("io_getevents(ctx{ctx}, {min}, {nr}, NULL, {tmo:?})")
        }
        Reap(c) => format!("reap ctx{c}"),
        Fill(c, i) => format!("fill ctx{c} with #{i} one by one"),
        FillBatch(c, i, n) => format!("io_submit(ctx{c}, {n} copies of #{i})"),
        Cancel(c, i) => format!("io_cancel(ctx{c}, #{i})"),
        CancelNull(c) => format!("io_cancel(ctx{c}, NULL)"),
        Destroy(c) => format!("io_destroy(ctx{c})"),
        Pattern(b, s) => format!("pattern B{b} seed {s}"),
        Check(b, _) => format!("check B{b}"),
        Eventfd(k) => format!("read eventfd {k}"),
        Key(i) => format!("aio_key of #{i}"),
        WaitRing { ctx, n, poke } => format!(
            "wait for {n} events in ctx{ctx}'s ring{}",
            if *poke { " (poking)" } else { " (no calls)" }
        ),
        UserReap(c) => format!("reap ctx{c}'s ring from user space"),
        AioMaxNr(v) => format!("aio-max-nr = {v}"),
    }
}

/// How one nvaio backend's run of a case compared with the kernel's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Same,
    OnPurpose(&'static str),
    /// Every step it could express agreed (or differed as declared); these steps it could not
    /// express, with the kernel's answers.
    InPart(Vec<String>),
    Fail(String),
}

/// Compares one nvaio backend's run of a case (`n`) with the kernel's (`k`).
fn judge(case: &Case, k: &[Obs], n: &[Obs]) -> Verdict {
    let declared = case.steps.iter().any(|s| matches!(s, Differs(_) | KernelOnly(_)));
    if declared != case.expect_difference.is_some() {
        return Verdict::Fail(
            "the table is inconsistent: a declared difference needs both a reason and a Differs \
             step"
                .into(),
        );
    }
    let mut unexplained = Vec::new();
    let mut declared_compared = false;
    let mut declared_seen = false;
    let mut na = Vec::new();
    for (i, step) in case.steps.iter().enumerate() {
        let must = matches!(step, Differs(_) | KernelOnly(_));
        let may = matches!(step, MayDiffer(_));
        if n[i].na.is_some() {
            na.push(format!("step {i} {}: kernel {}", step_name(step), k[i].show()));
            continue;
        }
        declared_compared |= must;
        if k[i].key == n[i].key {
            continue;
        }
        if must {
            declared_seen = true;
        } else if !may {
            unexplained.push(format!(
                "step {i} {}: kernel {} nvaio {}",
                step_name(step),
                k[i].show(),
                n[i].show()
            ));
        }
    }
    if !unexplained.is_empty() {
        return Verdict::Fail(unexplained.join("; "));
    }
    // A declared difference must show wherever it could be compared.
    if declared_compared && !declared_seen {
        return Verdict::Fail("declared to differ on purpose, but kernel and nvaio agreed".into());
    }
    if !na.is_empty() {
        return Verdict::InPart(na);
    }
    match case.expect_difference {
        Some(why) => Verdict::OnPurpose(why),
        None => Verdict::Same,
    }
}

/// Totals of a suite run.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub cases: usize,
    pub on_purpose: usize,
    pub unexplained: usize,
    /// Cases with a step that no nvaio backend could express.
    pub not_compared: usize,
    /// Per nvaio backend: its label and the cases it compared only in part.
    pub in_part: Vec<(&'static str, usize)>,
    /// Per backend, the kernel's first: its label and the time its runs took.
    pub time: Vec<(&'static str, Duration)>,
}

impl Summary {
    pub fn passed(&self) -> usize {
        self.cases - self.failed()
    }

    /// Cases with an unexplained difference, or not compared at all.
    pub fn failed(&self) -> usize {
        self.unexplained + self.not_compared
    }

    /// The totals line (ci/conformance reads it).
    pub fn line(&self) -> String {
        format!(
            "conformance: {} cases, {} differ on purpose, {} unexplained, {} not compared",
            self.cases, self.on_purpose, self.unexplained, self.not_compared
        )
    }
}

/// Runs every case (or those whose name contains `filter`) on the kernel and on each nvaio
/// backend, comparing each with the kernel, and prints one line per case and the summary lines.
/// A case passes if no backend differs without a declared reason and every step was compared on
/// at least one nvaio backend. With `verbose`, prints every step's observations too.
pub fn run_suite(
    kernel: &mut dyn Backend,
    nvaio: &mut [&mut dyn Backend],
    filter: Option<&str>,
    verbose: bool,
) -> Summary {
    start_guards();
    let labels: Vec<&'static str> = nvaio.iter().map(|b| b.label()).collect();
    let shared = match Shared::new() {
        Ok(s) => s,
        Err(e) => {
            println!("FAIL conf/setup: {e}");
            return Summary { cases: 1, unexplained: 1, ..Default::default() };
        }
    };
    let mut arena = Arena::new();
    let selected: Vec<(usize, &Case)> = CASES
        .iter()
        .enumerate()
        .filter(|(_, c)| match filter {
            Some(f) => c.name.contains(f),
            None => true,
        })
        .collect();
    let total = selected.len();
    let mut sum = Summary {
        in_part: labels.iter().map(|&l| (l, 0)).collect(),
        time: std::iter::once(kernel.label())
            .chain(labels.iter().copied())
            .map(|l| (l, Duration::ZERO))
            .collect(),
        ..Default::default()
    };
    for (done, &(index, case)) in selected.iter().enumerate() {
        let pre = sum.clone();
        let guard = |be: &str, step: usize| {
            let at = if step == usize::MAX {
                "cleanup".to_string()
            } else {
                format!("step {step} {}", step_name(&case.steps[step]))
            };
            let failed = pre.unexplained + 1 + (total - done - 1);
            let totals = Summary { cases: total, unexplained: failed, ..pre.clone() };
            format!(
                "FAIL conf/{}: {be} {{what}} in {at}\nconformance: aborted after {done} of {total} \
                 cases ({} not run)\n{}\n{} passed, {} failed\n",
                case.name,
                total - done - 1,
                totals.line(),
                pre.passed(),
                failed
            )
        };
        let mut timed = |b: usize, be: &mut dyn Backend| {
            let t0 = Instant::now();
            let obs = run_case(be, case, index, &mut arena, &shared, &guard);
            sum.time[b].1 += t0.elapsed();
            obs
        };
        let k = timed(0, kernel);
        let runs: Vec<Vec<Obs>> =
            nvaio.iter_mut().enumerate().map(|(b, be)| timed(b + 1, &mut **be)).collect();
        if verbose {
            for (i, step) in case.steps.iter().enumerate() {
                println!("     {}[{i}] {}", case.name, step_name(step));
                println!("        {:<15} {}", "kernel:", k[i].show());
                for (label, n) in labels.iter().zip(&runs) {
                    println!("        {:<15} {}", format!("{label}:"), n[i].show());
                }
            }
        }
        sum.cases += 1;
        let verdicts: Vec<Verdict> = runs.iter().map(|n| judge(case, &k, n)).collect();
        let failures: Vec<String> = labels
            .iter()
            .zip(&verdicts)
            .filter_map(|(label, v)| match v {
                Verdict::Fail(what) => Some(format!("[{label}] {what}")),
                _ => None,
            })
            .collect();
        // Steps no backend could express.
        let uncovered: Vec<String> = case
            .steps
            .iter()
            .enumerate()
            .filter(|&(i, _)| runs.iter().all(|n| n[i].na.is_some()))
            .map(|(i, step)| format!("step {i} {}: kernel {}", step_name(step), k[i].show()))
            .collect();
        let partial: Vec<String> = labels
            .iter()
            .zip(&verdicts)
            .enumerate()
            .filter_map(|(b, (label, v))| match v {
                Verdict::InPart(steps) => {
                    sum.in_part[b].1 += 1;
                    Some(format!("{label}: {} of {} steps", steps.len(), case.steps.len()))
                }
                _ => None,
            })
            .collect();
        let part_note = if partial.is_empty() {
            String::new()
        } else {
            format!(" [not expressible: {}]", partial.join(", "))
        };
        if !failures.is_empty() {
            sum.unexplained += 1;
            println!("FAIL conf/{}: {}", case.name, failures.join("; "));
        } else if !uncovered.is_empty() {
            sum.not_compared += 1;
            println!(
                "n/a  conf/{}: no nvaio backend can express {}",
                case.name,
                uncovered.join("; ")
            );
        } else if let Some(why) = case.expect_difference {
            sum.on_purpose += 1;
            println!("ok   conf/{} (differs on purpose: {why}){part_note}", case.name);
        } else {
            println!("ok   conf/{}{part_note}", case.name);
        }
    }
    println!("{}", sum.line());
    let coverage: Vec<String> = sum
        .in_part
        .iter()
        .map(|(label, part)| {
            format!("{label} every step of {} cases, {part} in part", sum.cases - part)
        })
        .collect();
    println!("conformance: compared with the kernel: {}", coverage.join("; "));
    let time: Vec<String> =
        sum.time.iter().map(|(label, t)| format!("{label} {:.1} s", t.as_secs_f64())).collect();
    println!("conformance: time per backend: {}", time.join(", "));
    println!("{} passed, {} failed", sum.passed(), sum.failed());
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        let mut names = HashSet::new();
        for c in CASES {
            assert!(names.insert(c.name), "duplicate case {}", c.name);
            assert!(c.iocbs.len() <= 64, "{}: too many iocbs", c.name);
            let declared = c.steps.iter().any(|s| matches!(s, Differs(_) | KernelOnly(_)));
            assert_eq!(
                declared,
                c.expect_difference.is_some(),
                "{}: reason and Differs steps disagree",
                c.name
            );
            for s in c.steps {
                let s = match s {
                    Differs(s) | MayDiffer(s) | KernelOnly(s) => s,
                    s => s,
                };
                let idx: &[u8] = match s {
                    Submit(_, l) | SubmitNr(_, _, l) => l,
                    Fill(_, i) | FillBatch(_, i, _) | Cancel(_, i) => std::slice::from_ref(i),
                    _ => &[],
                };
                for &i in idx {
                    assert!((i as usize) < c.iocbs.len(), "{}: iocb #{i} not in the table", c.name);
                }
            }
        }
    }

    #[test]
    fn judging() {
        let case = &CASES.iter().find(|c| c.name == "cancel_in_flight_read").unwrap();
        let same: Vec<Obs> = case.steps.iter().map(|_| Obs::key("x")).collect();
        assert!(
            matches!(judge(case, &same, &same), Verdict::Fail(_)),
            "a declared difference must show"
        );
        let mut other = same.clone();
        other[2] = Obs::key("y");
        assert!(matches!(judge(case, &same, &other), Verdict::OnPurpose(_)));
        other[4] = Obs::key("z");
        assert!(
            matches!(judge(case, &same, &other), Verdict::Fail(_)),
            "undeclared steps must match"
        );
        // A declared step that could not be expressed neither shows nor fails the difference.
        let mut na = same.clone();
        na[2] = Obs { na: Some("why"), ..Default::default() };
        assert!(matches!(judge(case, &same, &na), Verdict::InPart(v) if v.len() == 1));
        let plain = &CASES.iter().find(|c| c.name == "submit_nr_negative").unwrap();
        let k: Vec<Obs> = plain.steps.iter().map(|_| Obs::key("x")).collect();
        assert_eq!(judge(plain, &k, &k), Verdict::Same);
    }
}
