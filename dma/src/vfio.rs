//! Opening a PCI function through VFIO: container, group, device, BAR0, MSI-X and DMA mapping.
//!
//! [`VfioPci::open`] first checks, one by one, everything that commonly goes wrong on a host
//! (wrong driver, IOMMU off, a shared IOMMU group, permissions, the locked-memory limit) and
//! turns each into an [`OpenError`] that says what to do; only then does it talk to VFIO. The
//! IOMMU type is type1v2; the IOVA space comes from the kernel's list of usable ranges.

use std::fs::{self, OpenOptions};
use std::io;
use std::mem::{size_of, ManuallyDrop};
use std::ops::Range;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_info, vfio_irq_set, VFIO_BASE, VFIO_IOMMU_INFO_CAPS,
    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps, VfioRegionInfoCap};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::iova::{usable_from_reserved, IovaAllocator};
use crate::sysfs::{self, AddressError, GroupBlocker};
use crate::{DmaError, DmaMapper, Mmio, PAGE_SIZE};

/// The smallest locked-memory limit `open` accepts: queues and bounce buffers are locked, and
/// the kernel counts VFIO's pinning against the same limit.
pub const MIN_MEMLOCK: u64 = 64 << 20;

/// IOVA space assumed when the kernel does not report one: 39 address bits (the smallest Intel
/// VT-d width) from 1 MiB up, minus the x86 MSI window.
const FALLBACK_APERTURE: Range<u64> = 0x10_0000..1 << 39;

/// Writes here are interrupts on x86, never memory.
const X86_MSI_WINDOW: Range<u64> = 0xfee0_0000..0xfef0_0000;

/// The PCI command register and the bits we set in it.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;

/// `CAP_IPC_LOCK` exempts a process from the locked-memory limit, for mlock and VFIO pinning.
const CAP_IPC_LOCK: u32 = 14;

/// `_IO(VFIO_TYPE, VFIO_BASE + n)`: VFIO ioctls carry no size or direction in their number.
const fn vfio_ioctl(n: u32) -> libc::c_ulong {
    ((VFIO_TYPE as libc::c_ulong) << 8) | (VFIO_BASE + n) as libc::c_ulong
}
const VFIO_DEVICE_SET_IRQS: libc::c_ulong = vfio_ioctl(10);
const VFIO_IOMMU_GET_INFO: libc::c_ulong = vfio_ioctl(12);

const _: () = assert!(size_of::<vfio_irq_set>() == 20);
const _: () = assert!(size_of::<vfio_iommu_type1_info>() == 24);

/// Why a PCI function could not be opened. Each message names the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    BadAddress(#[from] AddressError),
    #[error("there is no PCI device {bdf}: check the address with lspci -D or nvaio list")]
    NoDevice { bdf: String },
    #[error(
        "/dev/vfio/vfio does not exist, so the vfio-pci module is not loaded or there is no \
         IOMMU: run modprobe vfio-pci, and boot with intel_iommu=on (Intel) or amd_iommu=on (AMD)"
    )]
    NoVfio,
    #[error(
        "{bdf} is bound to {}, not vfio-pci: run nvaio bind {bdf}",
        .driver.as_deref().unwrap_or("no driver")
    )]
    WrongDriver { bdf: String, driver: Option<String> },
    #[error(
        "{bdf} has no IOMMU group, so the IOMMU is off: boot with intel_iommu=on (Intel) or \
         amd_iommu=on (AMD)"
    )]
    NoIommuGroup { bdf: String },
    #[error(
        "IOMMU group {group} of {bdf} also holds {}, and VFIO hands out whole groups only: bind \
         those to vfio-pci as well, unbind them, or move {bdf} to a slot with its own group",
        blockers_text(.others)
    )]
    GroupShared { bdf: String, group: u32, others: Vec<GroupBlocker> },
    #[error("no permission on {}: run as root or give your user that file", .path.display())]
    GroupPermission {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} is already opened by another process (VFIO allows one owner): stop it, or close the \
         other handle to {bdf} first", .path.display()
    )]
    GroupBusy {
        path: PathBuf,
        bdf: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "the locked-memory limit is {limit_kib} KiB, too small for DMA memory: raise it with \
         ulimit -l (or LimitMEMLOCK=infinity for a service) to at least {} KiB",
        MIN_MEMLOCK / 1024
    )]
    MemlockLimit {
        limit_kib: u64,
        #[source]
        source: Option<io::Error>,
    },
    #[error(
        "BAR0 of {bdf} cannot be mmap'd through VFIO (region flags {flags:#x}, size {size:#x}): \
         the device's registers must be a memory BAR that vfio-pci lets user space map"
    )]
    BarNotMappable { bdf: String, flags: u32, size: u64 },
    #[error("VFIO refused to set up the device ({0}): dmesg may tell why")]
    Vfio(#[from] vfio_ioctls::VfioError),
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn blockers_text(others: &[GroupBlocker]) -> String {
    let parts: Vec<String> =
        others.iter().map(|o| format!("{} (bound to {})", o.device, o.driver)).collect();
    parts.join(", ")
}

/// Why MSI-X could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    #[error(
        "{bdf} has {available} MSI-X vectors and {requested} were asked for: ask for 1 to \
         {available}, or poll"
    )]
    Vectors { bdf: String, requested: u32, available: u32 },
    #[error("cannot create an eventfd for MSI-X ({0}): raise the open-file limit (ulimit -n)")]
    EventFd(#[source] io::Error),
    #[error("VFIO_DEVICE_SET_IRQS for {count} MSI-X vectors of {bdf} failed ({source}): dmesg may tell why")]
    SetIrqs {
        bdf: String,
        count: u32,
        #[source]
        source: io::Error,
    },
}

/// The DMA mapper of one container: IOVAs come from the usable ranges, mappings go to the IOMMU.
struct VfioDmaMapper {
    /// Shared so that the container stays open as long as any region mapped through it lives.
    container: Arc<VfioContainer>,
    iova: Mutex<IovaAllocator>,
    /// Set once the device is closed: the kernel has then torn down the IOMMU domain with every
    /// mapping in it, so an unmap has nothing left to do and would only fail.
    detached: AtomicBool,
    /// The fork generation of the process that made the mappings: in a child they are the
    /// parent's, and unmapping them would pull memory from under the parent's device.
    fork_gen: u64,
}

impl VfioDmaMapper {
    fn allocator(&self) -> MutexGuard<'_, IovaAllocator> {
        // The allocator never panics half-way through an update, so a poisoned lock still
        // guards a consistent allocator.
        self.iova.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Turns a vfio-ioctls error into an `io::Error`, keeping the errno where it has one.
fn io_error(e: vfio_ioctls::VfioError) -> io::Error {
    use vfio_ioctls::VfioError as E;
    match e {
        E::IommuDmaMap(s) | E::IommuDmaUnmap(s) => io::Error::from_raw_os_error(s.errno()),
        other => io::Error::other(other),
    }
}

impl DmaMapper for VfioDmaMapper {
    unsafe fn map(&self, vaddr: *mut u8, len: usize) -> Result<u64, DmaError> {
        if self.detached.load(Ordering::Acquire) {
            let source = io::Error::from_raw_os_error(libc::ENODEV);
            return Err(DmaError::Map { iova: 0, len, source });
        }
        let iova = self.allocator().alloc(len as u64).ok_or(DmaError::IovaExhausted { len })?;
        // SAFETY: the caller upholds `DmaMapper::map`'s contract, which is the contract of
        // `vfio_dma_map`: the range stays mapped and is reached only through raw pointers until
        // `unmap` is called with this IOVA and length.
        match unsafe { self.container.vfio_dma_map(iova, len, vaddr) } {
            Ok(()) => Ok(iova),
            Err(e) => {
                self.allocator().free(iova, len as u64);
                Err(DmaError::Map { iova, len, source: io_error(e) })
            }
        }
    }

    fn unmap(&self, iova: u64, len: usize) {
        if crate::fork::forked_since(self.fork_gen) {
            return;
        }
        if !self.detached.load(Ordering::Acquire) {
            if let Err(e) = self.container.vfio_dma_unmap(iova, len) {
                // The IOVA stays allocated: the IOMMU may still translate it, so it must not be
                // handed out again.
                tracing::warn!(iova, len, error = %io_error(e), "VFIO DMA unmap failed");
                return;
            }
        }
        self.allocator().free(iova, len as u64);
    }
}

/// A PCI function opened through VFIO: its BAR0 registers, MSI-X and a DMA mapper.
pub struct VfioPci {
    bdf: String,
    /// BAR0. Dropped by hand before `device`: the mapping holds a reference to the device file,
    /// and the group cannot be released while it is open.
    bar0: ManuallyDrop<Mmio>,
    /// Dropped by hand after BAR0 and MSI-X.
    device: ManuallyDrop<VfioDevice>,
    mapper: Arc<VfioDmaMapper>,
    iova_ranges: Vec<Range<u64>>,
    /// Number of MSI-X vectors currently routed to eventfds (0: MSI-X off).
    msix_enabled: Mutex<u32>,
}

/// What the checks before opening found.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    bdf: String,
    sysfs: PathBuf,
    group: u32,
    group_path: PathBuf,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> OpenError {
    let what = what.into();
    move |source| OpenError::Io { what, source }
}

/// The checks of [`VfioPci::open`] that only read files under `root`.
fn preflight(root: &Path, bdf: &str) -> Result<Target, OpenError> {
    let bdf = sysfs::parse_bdf(bdf)?;
    let dir = sysfs::device_dir(root, &bdf);
    if !dir.exists() {
        return Err(OpenError::NoDevice { bdf });
    }
    if !root.join("dev/vfio/vfio").exists() {
        return Err(OpenError::NoVfio);
    }

    let driver = sysfs::driver(root, &bdf).map_err(io_err(format!("read the driver of {bdf}")))?;
    if driver.as_deref() != Some(sysfs::VFIO_DRIVER) {
        return Err(OpenError::WrongDriver { bdf, driver });
    }

    let group = sysfs::iommu_group(root, &bdf)
        .map_err(io_err(format!("read the IOMMU group of {bdf}")))?
        .ok_or_else(|| OpenError::NoIommuGroup { bdf: bdf.clone() })?;
    let others = sysfs::group_blockers(root, group, &bdf)
        .map_err(io_err(format!("list IOMMU group {group}")))?;
    if !others.is_empty() {
        return Err(OpenError::GroupShared { bdf, group, others });
    }

    Ok(Target { sysfs: dir, group_path: root.join("dev/vfio").join(group.to_string()), group, bdf })
}

/// The error for a failed open of a group file.
fn group_open_error(path: &Path, bdf: &str, source: io::Error) -> OpenError {
    let path = path.to_path_buf();
    match source.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => OpenError::GroupPermission { path, source },
        Some(libc::EBUSY) => OpenError::GroupBusy { path, bdf: bdf.to_string(), source },
        _ => OpenError::Io { what: format!("open {}", path.display()), source },
    }
}

/// Whether the `CapEff` line of `/proc/self/status` includes `CAP_IPC_LOCK`.
fn has_cap_ipc_lock(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Judges a locked-memory limit in bytes (`None`: unlimited).
fn memlock_verdict(limit: Option<u64>, cap_ipc_lock: bool) -> Result<(), OpenError> {
    match limit {
        Some(l) if l < MIN_MEMLOCK && !cap_ipc_lock => {
            Err(OpenError::MemlockLimit { limit_kib: l / 1024, source: None })
        }
        _ => Ok(()),
    }
}

/// Checks that this process can lock enough memory for DMA.
fn check_memlock() -> Result<(), OpenError> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one `rlimit` into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return Err(io_err("read the locked-memory limit")(io::Error::last_os_error()));
    }
    let limit = (lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur);
    let cap = fs::read_to_string("/proc/self/status").is_ok_and(|s| has_cap_ipc_lock(&s));
    memlock_verdict(limit, cap)?;

    // The limit may be fine while the memory already locked leaves no room: lock one page.
    let probe = || -> io::Result<()> {
        // SAFETY: a fresh anonymous mapping touches no existing memory; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `p` is the page mapped above, ours alone.
        let r = unsafe { libc::mlock(p, PAGE_SIZE) };
        let err = io::Error::last_os_error();
        // SAFETY: as above; unmapping also unlocks it.
        unsafe { libc::munmap(p, PAGE_SIZE) };
        if r == 0 {
            Ok(())
        } else {
            Err(err)
        }
    };
    probe().map_err(|source| OpenError::MemlockLimit {
        limit_kib: limit.map_or(u64::MAX, |l| l / 1024),
        source: Some(source),
    })
}

/// Reads `VFIO_IOMMU_GET_INFO` with its capability chain, growing the buffer to the size the
/// kernel asks for.
fn iommu_info(fd: RawFd) -> io::Result<Vec<u8>> {
    let mut argsz = size_of::<vfio_iommu_type1_info>();
    for _ in 0..4 {
        // u64 words keep the buffer aligned for the structures inside it.
        let mut buf = vec![0u64; argsz.div_ceil(8)];
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&(argsz as u32).to_ne_bytes());
        buf[0] = u64::from_ne_bytes(head);
        // SAFETY: `buf` holds at least `argsz` writable bytes, which is all the kernel writes.
        if unsafe { libc::ioctl(fd, VFIO_IOMMU_GET_INFO, buf.as_mut_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let wanted = u32::from_ne_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
        if wanted <= argsz {
            bytes.truncate(argsz);
            return Ok(bytes);
        }
        argsz = wanted;
    }
    Err(io::Error::other("VFIO_IOMMU_GET_INFO kept asking for a larger buffer"))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off.checked_add(4)?)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(off..off.checked_add(8)?)?.try_into().ok()?))
}

/// The usable IOVA ranges (end exclusive) in a `vfio_iommu_type1_info` with its capability
/// chain, or `None` if it has no IOVA-range capability. Offsets are bounds-checked: a malformed
/// chain ends the walk instead of reading past the buffer.
fn parse_iova_ranges(info: &[u8]) -> Option<Vec<Range<u64>>> {
    let flags = u32_at(info, 4)?;
    let mut off = u32_at(info, 16)? as usize;
    if flags & VFIO_IOMMU_INFO_CAPS == 0 {
        return None;
    }
    // Each header is {id: u16, version: u16, next: u32}; `next` is an offset from the start.
    for _ in 0..64 {
        if off < size_of::<vfio_iommu_type1_info>() {
            return None;
        }
        let id = u32_at(info, off)? & 0xffff;
        let next = u32_at(info, off + 4)? as usize;
        if id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
            let n = u32_at(info, off + 8)? as usize;
            let mut ranges = Vec::with_capacity(n.min(64));
            for i in 0..n {
                let at = off + 16 + i * 16;
                // The kernel's ends are inclusive.
                let (start, last) = (u64_at(info, at)?, u64_at(info, at + 8)?);
                if start <= last {
                    ranges.push(start..last.saturating_add(1));
                }
            }
            return Some(ranges);
        }
        if next <= off {
            return None;
        }
        off = next;
    }
    None
}

/// The IOVA ranges the container's IOMMU accepts.
fn usable_iova(container: &VfioContainer) -> Result<Vec<Range<u64>>, OpenError> {
    let info = iommu_info(container.as_raw_fd())
        .map_err(io_err("query the IOMMU (VFIO_IOMMU_GET_INFO)"))?;
    Ok(parse_iova_ranges(&info).unwrap_or_else(|| {
        tracing::debug!("the IOMMU reports no IOVA ranges; assuming 39 bits minus the MSI window");
        usable_from_reserved(FALLBACK_APERTURE, &[X86_MSI_WINDOW])
    }))
}

/// Calls `VFIO_DEVICE_SET_IRQS` with a list of eventfds (or none).
fn set_irqs(fd: RawFd, index: u32, flags: u32, count: u32, fds: &[RawFd]) -> io::Result<()> {
    let header = size_of::<vfio_irq_set>() / 4;
    let argsz = ((header + fds.len()) * 4) as u32;
    // {argsz, flags, index, start, count} then the eventfds as 32-bit integers.
    let mut buf: Vec<u32> = vec![argsz, flags, index, 0, count];
    buf.extend(fds.iter().map(|&f| f as u32));
    // SAFETY: `buf` is a complete `vfio_irq_set` of `argsz` bytes; the kernel only reads it.
    if unsafe { libc::ioctl(fd, VFIO_DEVICE_SET_IRQS, buf.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets memory space and bus mastering in the command register, and disables INTx: nvaio uses
/// MSI-X or polls.
fn enable_command(device: &VfioDevice, bdf: &str) -> Result<(), OpenError> {
    let at = device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX) + PCI_COMMAND;
    let fd = device.as_raw_fd();
    let what = || format!("access the PCI command register of {bdf}");
    let rw = |write: Option<u16>| -> io::Result<u16> {
        let mut v = write.unwrap_or(0).to_le_bytes();
        let p = v.as_mut_ptr().cast::<libc::c_void>();
        // SAFETY: `v` is 2 bytes, readable and writable, and is the only memory the call uses.
        let n = unsafe {
            match write {
                Some(_) => libc::pwrite(fd, p, 2, at as libc::off_t),
                None => libc::pread(fd, p, 2, at as libc::off_t),
            }
        };
        match n {
            2 => Ok(u16::from_le_bytes(v)),
            n if n < 0 => Err(io::Error::last_os_error()),
            _ => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
        }
    };

    let cmd = rw(None).map_err(io_err(what()))?;
    let want = cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE;
    rw(Some(want)).map_err(io_err(what()))?;
    let now = rw(None).map_err(io_err(what()))?;
    let needed = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
    if now & needed != needed {
        let e = io::Error::other(format!(
            "command register reads {now:#06x} after writing {want:#06x}"
        ));
        return Err(io_err(format!("enable memory space and bus mastering on {bdf}"))(e));
    }
    Ok(())
}

/// Maps BAR0 for register access.
fn map_bar0(device: &VfioDevice, bdf: &str) -> Result<Mmio, OpenError> {
    let index = VFIO_PCI_BAR0_REGION_INDEX;
    let flags = device.get_region_flags(index);
    let size = device.get_region_size(index);
    let not_mappable = || OpenError::BarNotMappable { bdf: bdf.to_string(), flags, size };
    if flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || size == 0 {
        return Err(not_mappable());
    }

    // Kernels that cannot let user space map the MSI-X table allow only the listed areas of the
    // BAR; map the one holding the registers and doorbells, which starts at 0. Accesses past it
    // then read as all ones instead of faulting.
    let caps = device.get_region_caps(index);
    let mut len = size;
    if !caps.contains(&VfioRegionInfoCap::MsixMappable) {
        let sparse = caps.iter().find_map(|c| match c {
            VfioRegionInfoCap::SparseMmap(s) => Some(s),
            _ => None,
        });
        if let Some(s) = sparse {
            let first = s.areas.iter().find(|a| a.offset == 0 && a.size > 0);
            len = first.ok_or_else(not_mappable)?.size;
            tracing::warn!(bdf, len, size, "only part of BAR0 can be mapped (MSI-X table inside)");
        }
    }
    let len = usize::try_from(len).map_err(|_| not_mappable())?;

    // SAFETY: a new shared mapping of the device file at the offset VFIO gave for BAR0, at an
    // address of the kernel's choosing; the result is checked before use.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            device.as_raw_fd(),
            device.get_region_offset(index) as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(
            io_err(format!("mmap BAR0 of {bdf} ({len} bytes)"))(io::Error::last_os_error()),
        );
    }
    // A child process must not reach the doorbells (see `crate::fork`). Failure only loses that.
    // SAFETY: advice on the mapping just made.
    unsafe { libc::madvise(ptr, len, libc::MADV_DONTFORK) };
    let ptr = NonNull::new(ptr.cast::<u8>()).expect("mmap returned a null mapping");
    // SAFETY: `ptr..ptr+len` is the BAR mapping made above; nothing else refers to it, and the
    // Mmio unmaps it on drop.
    Ok(unsafe { Mmio::from_raw(ptr, len, true) })
}

impl VfioPci {
    /// Opens the PCI function `bdf` (`0000:00:04.0`, or `00:04.0` for domain 0000), which must
    /// be bound to vfio-pci.
    pub fn open(bdf: &str) -> Result<VfioPci, OpenError> {
        let target = preflight(Path::new("/"), bdf)?;
        let bdf = target.bdf;
        // Opened and closed again only to turn a failure into a clear error before VFIO opens
        // it for real (its own error would lose the reason).
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target.group_path)
            .map_err(|e| group_open_error(&target.group_path, &bdf, e))?;
        check_memlock()?;

        let container = Arc::new(VfioContainer::new(None)?);
        let ops: Arc<dyn VfioOps> = container.clone();
        // Adds the group to the container and sets the IOMMU type (type1v2) on the way.
        let device = VfioDevice::new(&target.sysfs, ops, false)?;

        let iova_ranges = usable_iova(&container)?;
        let allocator = IovaAllocator::new(&iova_ranges);
        tracing::debug!(bdf, ?iova_ranges, "VFIO container ready");

        enable_command(&device, &bdf)?;

        let bar0 = map_bar0(&device, &bdf)?;

        let mapper = Arc::new(VfioDmaMapper {
            container,
            iova: Mutex::new(allocator),
            detached: AtomicBool::new(false),
            fork_gen: crate::fork::generation(),
        });
        Ok(VfioPci {
            bdf,
            bar0: ManuallyDrop::new(bar0),
            device: ManuallyDrop::new(device),
            mapper,
            iova_ranges,
            msix_enabled: Mutex::new(0),
        })
    }

    /// The PCI address, in sysfs form (`0000:00:04.0`).
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    /// The BAR0 register window.
    pub fn bar0(&self) -> &Mmio {
        &self.bar0
    }

    /// The mapper that gives DMA memory an IOVA in this device's IOMMU domain. Regions mapped
    /// through it should be dropped before the `VfioPci`; any still alive then lose their IOMMU
    /// mapping when the device closes, and their own unmap is skipped.
    pub fn dma_mapper(&self) -> Arc<dyn DmaMapper> {
        self.mapper.clone()
    }

    /// The IOVA ranges the IOMMU accepts (end exclusive), as reported by the kernel.
    pub fn iova_ranges(&self) -> &[Range<u64>] {
        &self.iova_ranges
    }

    /// Number of MSI-X vectors the device has (0 if it has no MSI-X).
    pub fn msix_vectors(&self) -> u32 {
        self.device.get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX).map_or(0, |irq| irq.count)
    }

    fn msix_state(&self) -> MutexGuard<'_, u32> {
        self.msix_enabled.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enables MSI-X vectors `0..nvec` and returns one non-blocking eventfd per vector, which
    /// the kernel signals when the vector fires. A set enabled earlier is disabled first (the
    /// kernel cannot resize a live one), so its eventfds go quiet.
    pub fn enable_msix(&self, nvec: u32) -> Result<Vec<EventFd>, VfioError> {
        let available = self.msix_vectors();
        if nvec == 0 || nvec > available {
            return Err(VfioError::Vectors { bdf: self.bdf.clone(), requested: nvec, available });
        }
        let fds = (0..nvec)
            .map(|_| EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VfioError::EventFd)?;
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();

        let mut enabled = self.msix_state();
        if *enabled != 0 {
            self.disable_locked(&mut enabled);
        }
        let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        set_irqs(self.device.as_raw_fd(), VFIO_PCI_MSIX_IRQ_INDEX, flags, nvec, &raw)
            .map_err(|source| VfioError::SetIrqs { bdf: self.bdf.clone(), count: nvec, source })?;
        *enabled = nvec;
        Ok(fds)
    }

    /// Disables MSI-X if it is enabled. Failure is logged: there is nothing else to do.
    pub fn disable_msix(&self) {
        let mut enabled = self.msix_state();
        self.disable_locked(&mut enabled);
    }

    fn disable_locked(&self, enabled: &mut u32) {
        if *enabled == 0 {
            return;
        }
        let flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
        if let Err(e) = set_irqs(self.device.as_raw_fd(), VFIO_PCI_MSIX_IRQ_INDEX, flags, 0, &[]) {
            tracing::warn!(bdf = %self.bdf, error = %e, "disabling MSI-X failed");
        }
        *enabled = 0;
    }
}

impl Drop for VfioPci {
    fn drop(&mut self) {
        if crate::fork::forked_since(self.mapper.fork_gen) {
            // In a forked child every teardown step below would act on the parent's device
            // (disable its MSI-X, take its group out of the container): leak instead.
            return;
        }
        // The order matters. BAR0 first: its mapping keeps the device file open, and a device
        // still open keeps the group from leaving the container. MSI-X next, while the device
        // is open. Then the device, which takes the group out of the container; the kernel
        // then tears down the IOMMU domain and every mapping in it. The container itself closes
        // when the mapper's last user drops it. No reset: vfio-pci resets the function when
        // the last user closes it, if the function supports one.
        //
        // SAFETY: `bar0` is not used again; `self` is being dropped.
        unsafe { ManuallyDrop::drop(&mut self.bar0) };
        self.disable_msix();
        // SAFETY: as above, for `device`; the BAR mapping is gone, so the file really closes.
        unsafe { ManuallyDrop::drop(&mut self.device) };
        self.mapper.detached.store(true, Ordering::Release);
    }
}

impl std::fmt::Debug for VfioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPci")
            .field("bdf", &self.bdf)
            .field("bar0_len", &self.bar0.len())
            .field("iova_ranges", &self.iova_ranges)
            .finish()
    }
}

#[cfg(test)]
// IOVA windows are lists of ranges, and a list of one window is the common case.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::sysfs::fake::FakeRoot;
    use crate::sysfs::NVME_CLASS;

    const BDF: &str = "0000:00:04.0";

    fn vfio_tree() -> FakeRoot {
        let r = FakeRoot::new("vfio");
        r.file("dev/vfio/vfio", "");
        r.file("dev/vfio/7", "");
        r.pci(BDF, NVME_CLASS, Some("vfio-pci"), Some(7));
        r
    }

    #[test]
    fn preflight_accepts_a_ready_device() {
        let r = vfio_tree();
        let t = preflight(r.path(), "00:04.0").unwrap();
        assert_eq!(
            t,
            Target {
                bdf: BDF.into(),
                sysfs: r.path().join("sys/bus/pci/devices").join(BDF),
                group: 7,
                group_path: r.path().join("dev/vfio/7"),
            }
        );
    }

    #[test]
    fn preflight_errors_in_order() {
        let r = vfio_tree();
        let e = preflight(r.path(), "0000:00:04").unwrap_err();
        assert!(matches!(e, OpenError::BadAddress(_)));
        let e = preflight(r.path(), "00:09.0").unwrap_err();
        assert!(matches!(&e, OpenError::NoDevice { bdf } if bdf == "0000:00:09.0"));

        r.set_driver(BDF, Some("nvme"));
        let e = preflight(r.path(), BDF).unwrap_err();
        assert!(matches!(&e, OpenError::WrongDriver { driver: Some(d), .. } if d == "nvme"));
        assert_eq!(
            e.to_string(),
            "0000:00:04.0 is bound to nvme, not vfio-pci: run nvaio bind 0000:00:04.0"
        );
        r.set_driver(BDF, None);
        let e = preflight(r.path(), BDF).unwrap_err();
        assert!(e.to_string().contains("bound to no driver"), "{e}");

        // /dev/vfio/vfio is checked before the driver.
        fs::remove_file(r.path().join("dev/vfio/vfio")).unwrap();
        let e = preflight(r.path(), BDF).unwrap_err();
        assert!(matches!(e, OpenError::NoVfio));
        let msg = e.to_string();
        assert!(msg.contains("modprobe vfio-pci") && msg.contains("intel_iommu=on"), "{msg}");
    }

    #[test]
    fn preflight_needs_an_iommu_group_of_our_own() {
        let r = vfio_tree();
        r.pci("0000:00:05.0", NVME_CLASS, Some("vfio-pci"), None);
        let e = preflight(r.path(), "00:05.0").unwrap_err();
        assert!(matches!(e, OpenError::NoIommuGroup { .. }));
        assert!(e.to_string().contains("amd_iommu=on"));

        r.pci("0000:00:04.1", 0x02_0000, Some("e1000e"), Some(7));
        r.pci("0000:00:1c.0", 0x06_0400, Some("pcieport"), Some(7));
        let e = preflight(r.path(), BDF).unwrap_err();
        match &e {
            OpenError::GroupShared { group: 7, others, .. } => {
                assert_eq!(others.len(), 1);
                assert_eq!(others[0].device, "0000:00:04.1");
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("0000:00:04.1 (bound to e1000e)"), "{e}");
        r.set_driver("0000:00:04.1", None);
        preflight(r.path(), BDF).unwrap();
    }

    #[test]
    fn group_open_errors_keep_the_errno() {
        use std::error::Error;
        let p = Path::new("/dev/vfio/7");
        for errno in [libc::EACCES, libc::EPERM] {
            let e = group_open_error(p, BDF, io::Error::from_raw_os_error(errno));
            assert_eq!(
                e.to_string(),
                "no permission on /dev/vfio/7: run as root or give your user that file"
            );
            let src = e.source().unwrap().downcast_ref::<io::Error>().unwrap();
            assert_eq!(src.raw_os_error(), Some(errno));
        }
        let e = group_open_error(p, BDF, io::Error::from_raw_os_error(libc::EBUSY));
        assert!(matches!(e, OpenError::GroupBusy { .. }));
        assert!(e.to_string().contains("already opened by another process"));
        let e = group_open_error(p, BDF, io::Error::from_raw_os_error(libc::ENOENT));
        assert!(
            matches!(&e, OpenError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOENT))
        );
    }

    #[test]
    fn memlock_rules() {
        assert!(memlock_verdict(None, false).is_ok());
        assert!(memlock_verdict(Some(MIN_MEMLOCK), false).is_ok());
        assert!(memlock_verdict(Some(8 << 20), true).is_ok());
        let e = memlock_verdict(Some(8 << 20), false).unwrap_err();
        assert!(matches!(e, OpenError::MemlockLimit { limit_kib: 8192, .. }));
        assert_eq!(
            e.to_string(),
            "the locked-memory limit is 8192 KiB, too small for DMA memory: raise it with ulimit \
             -l (or LimitMEMLOCK=infinity for a service) to at least 65536 KiB"
        );
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert!(has_cap_ipc_lock(status));
        assert!(!has_cap_ipc_lock("CapEff:\t0000000000000000\n"));
        assert!(!has_cap_ipc_lock("CapEff:\t0000000000004000x\n"));
        assert!(has_cap_ipc_lock("CapEff:\t0000000000004000\n"));
        assert!(!has_cap_ipc_lock(""));
    }

    /// Builds a `vfio_iommu_type1_info` buffer with the given capabilities, each as (id, body).
    fn info(caps: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![0u8; 24];
        b[4..8].copy_from_slice(&(VFIO_IOMMU_INFO_CAPS | 1).to_ne_bytes());
        let mut prev_next: Option<usize> = None;
        for (id, body) in caps {
            let off = b.len();
            match prev_next {
                Some(at) => b[at..at + 4].copy_from_slice(&(off as u32).to_ne_bytes()),
                None => b[16..20].copy_from_slice(&(off as u32).to_ne_bytes()),
            }
            b.extend_from_slice(&id.to_ne_bytes());
            b.extend_from_slice(&1u16.to_ne_bytes());
            prev_next = Some(b.len());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(body);
        }
        let len = b.len() as u32;
        b[..4].copy_from_slice(&len.to_ne_bytes());
        b
    }

    fn iova_cap(ranges: &[(u64, u64)]) -> (u16, Vec<u8>) {
        let mut body = Vec::new();
        body.extend_from_slice(&(ranges.len() as u32).to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        for &(s, e) in ranges {
            body.extend_from_slice(&s.to_ne_bytes());
            body.extend_from_slice(&e.to_ne_bytes());
        }
        (VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16, body)
    }

    #[test]
    fn iova_ranges_from_the_capability_chain() {
        // What a q35 guest with a 39-bit vIOMMU reports: everything but the MSI window.
        let caps = [
            (3u16, vec![0u8; 8]), // VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL first
            iova_cap(&[(0, 0xfedf_ffff), (0xfef0_0000, 0x7f_ffff_ffff)]),
        ];
        assert_eq!(
            parse_iova_ranges(&info(&caps)),
            Some(vec![0..0xfee0_0000, 0xfef0_0000..0x80_0000_0000])
        );
        // An end at u64::MAX saturates instead of wrapping.
        assert_eq!(
            parse_iova_ranges(&info(&[iova_cap(&[(0x1000, u64::MAX)])])),
            Some(vec![0x1000..u64::MAX])
        );
    }

    #[test]
    fn iova_ranges_absent_or_malformed() {
        assert_eq!(parse_iova_ranges(&info(&[])), None);
        assert_eq!(parse_iova_ranges(&info(&[(3, vec![0u8; 8])])), None);
        let mut no_caps_flag = info(&[iova_cap(&[(0, 0xffff_ffff)])]);
        no_caps_flag[4..8].copy_from_slice(&1u32.to_ne_bytes());
        assert_eq!(parse_iova_ranges(&no_caps_flag), None);
        // A count running past the buffer.
        let mut b = info(&[iova_cap(&[(0, 0xffff_ffff)])]);
        b[24 + 8..24 + 12].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(parse_iova_ranges(&b), None);
        // A chain pointing back at itself, and one pointing past the end.
        let mut b = info(&[(3, vec![0u8; 8])]);
        b[24 + 4..24 + 8].copy_from_slice(&24u32.to_ne_bytes());
        assert_eq!(parse_iova_ranges(&b), None);
        b[24 + 4..24 + 8].copy_from_slice(&4000u32.to_ne_bytes());
        assert_eq!(parse_iova_ranges(&b), None);
        assert_eq!(parse_iova_ranges(&[0u8; 10]), None);
    }

    #[test]
    fn fallback_space_skips_the_msi_window() {
        let r = usable_from_reserved(FALLBACK_APERTURE, &[X86_MSI_WINDOW]);
        assert_eq!(r, vec![0x10_0000..0xfee0_0000, 0xfef0_0000..1 << 39]);
    }

    #[test]
    fn ioctl_numbers() {
        // _IO(';', 100 + n), as in <linux/vfio.h>.
        assert_eq!(VFIO_DEVICE_SET_IRQS, 0x3b6e);
        assert_eq!(VFIO_IOMMU_GET_INFO, 0x3b70);
    }

    #[test]
    fn open_without_vfio_fails_cleanly() {
        // On a machine without VFIO this must be an error, not a panic.
        if Path::new("/dev/vfio/vfio").exists() {
            return;
        }
        let e = VfioPci::open("0000:00:04.0").unwrap_err();
        assert!(matches!(e, OpenError::NoDevice { .. } | OpenError::NoVfio), "{e:?}");
    }
}
