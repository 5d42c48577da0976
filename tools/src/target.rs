//! Opening a namespace for I/O, and the buffers I/O goes through.

use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nvaio::{Access, IoEvent};
use nvaio_dma::sysfs;
use nvaio_nvme::{Controller, Namespace};

use crate::error::{Error, Result};

/// How long the tools wait for one completion. Longer than the context's own command timeout
/// (30 s), so a stuck command normally comes back as an -ETIMEDOUT event first and this is only
/// a backstop.
pub const EVENT_WAIT: Duration = Duration::from_secs(45);

/// Brings up the controller at `addr` through VFIO.
pub fn controller(addr: &str) -> Result<(String, Arc<Controller>)> {
    let bdf = nvme_address(Path::new("/"), addr)?;
    let ctrl = nvaio::file::controller(&bdf)?;
    Ok((bdf, ctrl))
}

/// The normalised address of `addr`, refused when sysfs under `root` says that PCI function is
/// not an NVMe controller: opening it would otherwise fail with advice to bind it to vfio-pci,
/// which `nvaio bind` then refuses. Other problems (no such device, unreadable sysfs) are left
/// to the open, which names them.
fn nvme_address(root: &Path, addr: &str) -> Result<String> {
    let bdf = sysfs::parse_bdf(addr)?;
    match sysfs::require_nvme(root, &bdf) {
        Err(e @ sysfs::BindError::NotNvme { .. }) => Err(e.into()),
        _ => Ok(bdf),
    }
}

/// An open namespace: an nvaio descriptor, closed on drop.
pub struct Target {
    pub fd: RawFd,
    pub ns: Namespace,
    /// The PCI address (or another name for an emulated controller).
    pub name: String,
}

impl Target {
    /// Opens namespace `nsid` of the controller at `addr`.
    pub fn open(addr: &str, nsid: u32, access: Access) -> Result<Target> {
        let (bdf, ctrl) = controller(addr)?;
        Target::on(ctrl, &bdf, nsid, access)
    }

    /// Opens namespace `nsid` of a controller already brought up.
    pub fn on(ctrl: Arc<Controller>, name: &str, nsid: u32, access: Access) -> Result<Target> {
        let fd = nvaio::open_on(ctrl, nsid, access)?;
        let ns = match nvaio::file::lookup(fd) {
            Some(f) => f.ns.clone(),
            None => {
                let _ = nvaio::close(fd);
                return Err(Error::msg(format!("descriptor {fd} vanished right after opening")));
            }
        };
        Ok(Target { fd, ns, name: name.to_string() })
    }

    pub fn block_size(&self) -> u64 {
        u64::from(self.ns.block_size)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = nvaio::close(self.fd);
    }
}

/// Heap memory starting on an `align` boundary, zero-filled.
///
/// I/O buffers are handed to the AIO layer as raw pointers taken with [`AlignedBuf::ptr`]; while
/// a request is in flight nothing else touches them, and a buffer must outlive the context that
/// has requests on it (declare it first, so it is dropped after the context).
pub struct AlignedBuf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize, align: usize) -> Result<AlignedBuf> {
        debug_assert!(align.is_power_of_two());
        let total = len
            .checked_add(align)
            .ok_or_else(|| Error::msg(format!("a buffer of {len} bytes is too large")))?;
        let mut raw = Vec::new();
        raw.try_reserve_exact(total).map_err(|_| {
            Error::msg(format!(
                "cannot allocate {} for I/O buffers",
                crate::units::human_bytes(total as u64)
            ))
        })?;
        raw.resize(total, 0);
        let off = (align - raw.as_ptr() as usize % align) % align;
        Ok(AlignedBuf { raw, off, len })
    }

    /// The start of the buffer, for an iocb.
    pub fn ptr(&mut self) -> *mut u8 {
        self.raw[self.off..].as_mut_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

/// What an event's `res` means for a request that expected `expected` bytes: `Ok` when all of
/// them moved, else the errno (or a short count) in words, naming the LBA.
pub fn check_event(ev: &IoEvent, expected: u64, what: &str, lba: u64, blocks: u64) -> Result<()> {
    if ev.res < 0 {
        let errno = ev.res.checked_neg().and_then(|e| i32::try_from(e).ok()).unwrap_or(libc::EIO);
        let err = std::io::Error::from_raw_os_error(errno);
        return Err(Error::msg(format!(
            "{what} of {blocks} block{} at LBA {lba} failed: {err}",
            if blocks == 1 { "" } else { "s" }
        )));
    }
    if ev.res as u64 != expected {
        return Err(Error::msg(format!(
            "short {what} at LBA {lba}: {} of {expected} bytes moved",
            ev.res
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned() {
        for align in [512, 4096, 65536] {
            let mut b = AlignedBuf::new(1000, align).unwrap();
            assert_eq!(b.ptr() as usize % align, 0);
            assert_eq!(b.as_slice().len(), 1000);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice()[999] = 7;
            assert_eq!(b.as_slice()[999], 7);
        }
        assert!(AlignedBuf::new(usize::MAX, 4096).is_err());
    }

    #[test]
    fn only_nvme_functions_are_opened() {
        let root = std::env::temp_dir().join(format!("nvaio-tools-class-{}", std::process::id()));
        let dev = |bdf: &str, class: &str| {
            let d = root.join("sys/bus/pci/devices").join(bdf);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("class"), class).unwrap();
        };
        dev("0000:00:1f.0", "0x060100\n");
        dev("0000:00:10.0", "0x010802\n");
        let e = nvme_address(&root, "00:1f.0").unwrap_err().to_string();
        assert!(e.starts_with("0000:00:1f.0 is not an NVMe controller"), "{e}");
        assert!(e.contains("0x060100") && !e.contains("nvaio bind"), "{e}");
        assert_eq!(nvme_address(&root, "00:10.0").unwrap(), "0000:00:10.0");
        // Absent: left to the open, which says there is no such device.
        assert_eq!(nvme_address(&root, "00:11.0").unwrap(), "0000:00:11.0");
        assert!(nvme_address(&root, "zz").is_err());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn events() {
        let ev = |res| IoEvent { res, ..Default::default() };
        assert!(check_event(&ev(4096), 4096, "read", 8, 8).is_ok());
        let e = check_event(&ev(-i64::from(libc::EIO)), 4096, "read", 8, 8).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "read of 8 blocks at LBA 8 failed: {}",
                std::io::Error::from_raw_os_error(libc::EIO)
            )
        );
        let e = check_event(&ev(-i64::from(libc::ETIMEDOUT)), 512, "write", 3, 1).unwrap_err();
        assert!(e.to_string().starts_with("write of 1 block at LBA 3 failed: "), "{e}");
        assert!(e.to_string().contains("timed out"), "{e}");
        let e = check_event(&ev(512), 4096, "read", 0, 8).unwrap_err();
        assert!(e.to_string().contains("512 of 4096"));
        assert!(check_event(&ev(i64::MIN), 1, "read", 0, 1).is_err());
    }
}
