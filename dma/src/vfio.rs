//! VFIO: placeholder replaced by the dma helper.
