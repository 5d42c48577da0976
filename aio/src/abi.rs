//! The kernel's AIO structures, bit for bit (include/uapi/linux/aio_abi.h, fs/aio.c).
//!
//! Applications hand nvaio the same `struct iocb` they give the kernel and get back the same
//! `struct io_event`, through a ring with the kernel's `struct aio_ring` header, so libaio-style
//! user-space reaping works unchanged. Layouts here are for 64-bit little-endian Linux.

/// `aio_lio_opcode` values (enum in aio_abi.h).
pub mod opcode {
    pub const PREAD: u16 = 0;
    pub const PWRITE: u16 = 1;
    pub const FSYNC: u16 = 2;
    pub const FDSYNC: u16 = 3;
    pub const POLL: u16 = 5;
    pub const NOOP: u16 = 6;
    pub const PREADV: u16 = 7;
    pub const PWRITEV: u16 = 8;
}

/// `aio_flags` bits.
pub const IOCB_FLAG_RESFD: u32 = 1 << 0;
pub const IOCB_FLAG_IOPRIO: u32 = 1 << 1;

/// `aio_rw_flags` bits (the RWF_* of preadv2/pwritev2).
pub mod rwf {
    pub const HIPRI: u32 = 0x01;
    pub const DSYNC: u32 = 0x02;
    pub const SYNC: u32 = 0x04;
    pub const NOWAIT: u32 = 0x08;
    pub const APPEND: u32 = 0x10;
    /// Every flag a 6.1 kernel knows.
    pub const SUPPORTED: u32 = HIPRI | DSYNC | SYNC | NOWAIT | APPEND;
}

/// `struct iocb`: one I/O request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Iocb {
    /// Returned unchanged in `io_event.data`.
    pub aio_data: u64,
    /// Set by the kernel to KIOCB_KEY (0) on submission; must be zero.
    pub aio_key: u32,
    pub aio_rw_flags: u32,
    pub aio_lio_opcode: u16,
    pub aio_reqprio: i16,
    pub aio_fildes: u32,
    /// Buffer address, or the address of an `iovec` array for the vectored opcodes.
    pub aio_buf: u64,
    /// Byte count, or the number of `iovec`s for the vectored opcodes.
    pub aio_nbytes: u64,
    pub aio_offset: i64,
    /// Reserved: must be zero.
    pub aio_reserved2: u64,
    pub aio_flags: u32,
    /// An eventfd signalled on completion when `IOCB_FLAG_RESFD` is set.
    pub aio_resfd: u32,
}

const _: () = assert!(std::mem::size_of::<Iocb>() == 64);
const _: () = assert!(std::mem::offset_of!(Iocb, aio_lio_opcode) == 16);
const _: () = assert!(std::mem::offset_of!(Iocb, aio_fildes) == 20);
const _: () = assert!(std::mem::offset_of!(Iocb, aio_buf) == 24);
const _: () = assert!(std::mem::offset_of!(Iocb, aio_offset) == 40);
const _: () = assert!(std::mem::offset_of!(Iocb, aio_flags) == 56);

impl Iocb {
    fn rw(opcode: u16, fd: i32, buf: u64, nbytes: u64, offset: i64) -> Iocb {
        Iocb {
            aio_lio_opcode: opcode,
            aio_fildes: fd as u32,
            aio_buf: buf,
            aio_nbytes: nbytes,
            aio_offset: offset,
            ..Default::default()
        }
    }

    /// A read of `len` bytes at `offset` into `buf`, like libaio's `io_prep_pread`.
    pub fn pread(fd: i32, buf: *mut u8, len: usize, offset: i64) -> Iocb {
        Iocb::rw(opcode::PREAD, fd, buf as u64, len as u64, offset)
    }

    /// A write of `len` bytes from `buf` at `offset`, like `io_prep_pwrite`.
    pub fn pwrite(fd: i32, buf: *const u8, len: usize, offset: i64) -> Iocb {
        Iocb::rw(opcode::PWRITE, fd, buf as u64, len as u64, offset)
    }

    /// A vectored read, like `io_prep_preadv`. The `iovec`s must stay valid until submitted.
    pub fn preadv(fd: i32, iov: *const libc::iovec, count: usize, offset: i64) -> Iocb {
        Iocb::rw(opcode::PREADV, fd, iov as u64, count as u64, offset)
    }

    /// A vectored write, like `io_prep_pwritev`.
    pub fn pwritev(fd: i32, iov: *const libc::iovec, count: usize, offset: i64) -> Iocb {
        Iocb::rw(opcode::PWRITEV, fd, iov as u64, count as u64, offset)
    }

    /// An fsync, like `io_prep_fsync`.
    pub fn fsync(fd: i32) -> Iocb {
        Iocb::rw(opcode::FSYNC, fd, 0, 0, 0)
    }

    /// An fdatasync, like `io_prep_fdsync`.
    pub fn fdsync(fd: i32) -> Iocb {
        Iocb::rw(opcode::FDSYNC, fd, 0, 0, 0)
    }

    /// Sets `aio_data`, returned in the completion's `data`.
    pub fn with_data(mut self, data: u64) -> Iocb {
        self.aio_data = data;
        self
    }

    /// Asks for `eventfd` to be signalled on completion, like `io_set_eventfd`.
    pub fn with_eventfd(mut self, eventfd: i32) -> Iocb {
        self.aio_flags |= IOCB_FLAG_RESFD;
        self.aio_resfd = eventfd as u32;
        self
    }
}

/// `struct io_event`: one completion.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoEvent {
    /// The iocb's `aio_data`.
    pub data: u64,
    /// The address of the iocb.
    pub obj: u64,
    /// Bytes transferred, or a negative errno.
    pub res: i64,
    /// Secondary result: always 0 for block I/O.
    pub res2: i64,
}

const _: () = assert!(std::mem::size_of::<IoEvent>() == 32);

/// `struct aio_ring`: the header of the event ring that `io_setup` returns the address of.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AioRingHeader {
    /// Kernel-internal ring id; nvaio stores 0.
    pub id: u32,
    /// Number of io_event slots after the header.
    pub nr: u32,
    /// Next event to read, written by whoever reaps (nvaio or the application).
    pub head: u32,
    /// Next event to write, written by nvaio.
    pub tail: u32,
    pub magic: u32,
    pub compat_features: u32,
    pub incompat_features: u32,
    /// Size of this header: events start at this offset.
    pub header_length: u32,
}

const _: () = assert!(std::mem::size_of::<AioRingHeader>() == 32);

/// `aio_ring.magic`.
pub const AIO_RING_MAGIC: u32 = 0xa10a_10a1;
/// `aio_ring.compat_features`.
pub const AIO_RING_COMPAT_FEATURES: u32 = 1;
/// `aio_ring.incompat_features`.
pub const AIO_RING_INCOMPAT_FEATURES: u32 = 0;

/// The most `iovec`s one vectored request may carry (UIO_MAXIOV).
pub const UIO_MAXIOV: u64 = 1024;

/// The largest byte count one read or write transfers (MAX_RW_COUNT: INT_MAX rounded down to a
/// page); larger requests are truncated to it, as the kernel does.
pub const MAX_RW_COUNT: u64 = (i32::MAX as u64) & !4095;
