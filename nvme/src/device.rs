//! The hardware seam: everything the driver needs from a controller, and nothing more.
//!
//! The driver reaches hardware only through [`Device`]. [`crate::vfio`] implements it for a PCI
//! function opened through VFIO; [`crate::emu`] implements it with an in-process emulated
//! controller, so the same driver code runs under fault injection, fuzzing and CPU-cost benches
//! on a machine without an IOMMU.

use std::io;
use std::sync::Arc;

use nvaio_dma::DmaMapper;
use vmm_sys_util::eventfd::EventFd;

/// A controller's register window, DMA mapping and interrupts.
pub trait Device: Send + Sync {
    /// A short name for messages: the PCI address, or "emulated".
    fn name(&self) -> &str;

    /// Reads the 32-bit register at byte offset `off` of BAR0. A device that is gone reads as
    /// all ones.
    fn read32(&self, off: usize) -> u32;

    /// Writes the 32-bit register at byte offset `off` of BAR0. Doorbells are written here.
    fn write32(&self, off: usize, value: u32);

    /// Reads a 64-bit register (CAP) as two 32-bit halves, low first.
    fn read64(&self, off: usize) -> u64 {
        u64::from(self.read32(off)) | u64::from(self.read32(off + 4)) << 32
    }

    /// Writes a 64-bit register (ASQ, ACQ) as two 32-bit halves, low first.
    fn write64(&self, off: usize, value: u64) {
        self.write32(off, value as u32);
        self.write32(off + 4, (value >> 32) as u32);
    }

    /// Size of BAR0 in bytes; the driver checks every doorbell it will use fits inside.
    fn bar_len(&self) -> usize;

    /// Maps memory for the device's DMA.
    fn dma_mapper(&self) -> Arc<dyn DmaMapper>;

    /// How many MSI-X vectors the device offers (0: polling only).
    fn interrupt_vectors(&self) -> u32 {
        0
    }

    /// Routes MSI-X vectors `0..nvec` to fresh eventfds, one per vector.
    fn enable_interrupts(&self, nvec: u32) -> io::Result<Vec<EventFd>> {
        let _ = nvec;
        Err(io::Error::new(io::ErrorKind::Unsupported, "this device has no interrupts"))
    }

    /// Stops interrupt delivery.
    fn disable_interrupts(&self) {}
}
