//! nvaio: the Linux asynchronous I/O interface on a userspace NVMe driver.
//!
//! An application opens an NVMe namespace with [`open`] (the controller is bound to vfio-pci)
//! and gets a descriptor. It then uses a [`Context`] exactly as it would use the kernel's AIO
//! context: [`Context::setup`] is `io_setup`, [`Context::submit`] is `io_submit` with the
//! kernel's [`Iocb`] layout, [`Context::get_events`] is `io_getevents` with the kernel's
//! [`IoEvent`] layout, and the context's id is the address of a ring with the kernel's
//! `struct aio_ring` header.
//!
//! I/O goes from the application straight to the controller's queues: no system call while
//! polling, no lock, no allocation per request. Data moves through DMA bounce pages.

pub mod abi;
pub mod capi;
pub mod context;
pub mod errno;
pub mod file;
mod kernel;
pub mod limits;
mod pool;
mod ring;
pub mod wait;

pub use abi::{IoEvent, Iocb};
pub use context::{Context, ContextOptions, ContextStats, Errno};
pub use file::{close, open, open_on, Access, NvmeFile, OpenError};
