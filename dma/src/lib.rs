//! Hardware access for nvaio: the only crate of the workspace that touches raw device memory.
//!
//! - [`region`]: DMA memory (anonymous, locked) and the [`DmaMapper`] seam that gives it an IOVA.
//! - [`iova`]: the IOVA allocator used by mappers.
//! - [`mmio`]: a mapped register window (a BAR), reached only through volatile accessors.
//! - [`vfio`]: opening a PCI function through VFIO (container, group, device, BAR0, MSI-X).
//!
//! Memory the device can read or write is never reached through a Rust reference: the device
//! may change it at any time, which would break the aliasing rules references promise. Every
//! access goes through the volatile helpers here.

pub mod fork;
pub mod iova;
pub mod mmio;
pub mod region;
pub mod soft;
pub mod sysfs;
pub mod vfio;

pub use iova::IovaAllocator;
pub use mmio::Mmio;
pub use region::{DmaError, DmaMapper, DmaRegion, PAGE_SIZE};
