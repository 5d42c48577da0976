//! [`Device`] for a real controller opened through VFIO.

use std::io;
use std::sync::Arc;

use nvaio_dma::vfio::{OpenError, VfioPci};
use nvaio_dma::DmaMapper;
use vmm_sys_util::eventfd::EventFd;

use crate::Device;

/// A PCI NVMe controller bound to vfio-pci.
pub struct VfioDevice {
    pci: VfioPci,
    mapper: Arc<dyn DmaMapper>,
}

impl VfioDevice {
    /// Opens the controller at PCI address `bdf` (e.g. `0000:00:04.0`).
    pub fn open(bdf: &str) -> Result<Arc<VfioDevice>, OpenError> {
        let pci = VfioPci::open(bdf)?;
        let mapper = pci.dma_mapper();
        Ok(Arc::new(VfioDevice { pci, mapper }))
    }
}

impl Device for VfioDevice {
    fn name(&self) -> &str {
        self.pci.bdf()
    }

    #[inline]
    fn read32(&self, off: usize) -> u32 {
        self.pci.bar0().read32(off)
    }

    #[inline]
    fn write32(&self, off: usize, value: u32) {
        self.pci.bar0().write32(off, value)
    }

    fn bar_len(&self) -> usize {
        self.pci.bar0().len()
    }

    fn dma_mapper(&self) -> Arc<dyn DmaMapper> {
        self.mapper.clone()
    }

    fn interrupt_vectors(&self) -> u32 {
        self.pci.msix_vectors()
    }

    fn enable_interrupts(&self, nvec: u32) -> io::Result<Vec<EventFd>> {
        self.pci.enable_msix(nvec).map_err(|e| {
            // Keep the errno of a failed ioctl; describe the rest.
            let errno = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<io::Error>())
                .and_then(io::Error::raw_os_error);
            match errno {
                Some(code) => io::Error::new(io::Error::from_raw_os_error(code).kind(), e),
                None => io::Error::other(e),
            }
        })
    }

    fn disable_interrupts(&self) {
        self.pci.disable_msix()
    }
}
