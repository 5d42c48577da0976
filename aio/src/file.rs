//! Namespaces opened as AIO file descriptors.
//!
//! An iocb names its target by descriptor number. Opening a namespace reserves a real descriptor
//! from the kernel (an empty memfd named after the namespace), so the number never collides with the
//! application's other files, and records which controller and namespace it stands for.
//!
//! Controllers are shared: every namespace of one PCI function goes through one [`Controller`],
//! brought up on the first open and shut down when the last descriptor and context let go.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use nvaio_nvme::vfio::VfioDevice;
use nvaio_nvme::{Controller, Namespace};

/// What a descriptor may do, from the open flags' access mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    WriteOnly,
    ReadWrite,
}

impl Access {
    /// From `O_RDONLY` / `O_WRONLY` / `O_RDWR`.
    pub fn from_flags(flags: i32) -> io::Result<Access> {
        match flags & libc::O_ACCMODE {
            libc::O_RDONLY => Ok(Access::ReadOnly),
            libc::O_WRONLY => Ok(Access::WriteOnly),
            libc::O_RDWR => Ok(Access::ReadWrite),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    pub fn can_read(self) -> bool {
        self != Access::WriteOnly
    }

    pub fn can_write(self) -> bool {
        self != Access::ReadOnly
    }
}

/// An open namespace.
#[derive(Debug)]
pub struct NvmeFile {
    pub fd: RawFd,
    pub ctrl: Arc<Controller>,
    pub ns: Namespace,
    pub access: Access,
}

static FILES: RwLock<Option<HashMap<RawFd, Arc<NvmeFile>>>> = RwLock::new(None);
static CONTROLLERS: Mutex<Option<HashMap<String, Weak<Controller>>>> = Mutex::new(None);
/// Bumped whenever a descriptor is closed, so contexts drop their cached lookups.
pub(crate) static EPOCH: AtomicU64 = AtomicU64::new(0);

/// Why a namespace could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Vfio(#[from] nvaio_dma::vfio::OpenError),
    #[error(transparent)]
    Controller(#[from] nvaio_nvme::ControllerError),
    #[error("{dev} has no usable namespace {nsid} (active and usable: {active:?})")]
    NoNamespace { dev: String, nsid: u32, active: Vec<u32> },
    #[error("{0}")]
    NotNvme(String),
    #[error("invalid open flags {0:#x}: the access mode must be O_RDONLY, O_WRONLY or O_RDWR")]
    Flags(i32),
    #[error("cannot reserve a descriptor: {0}")]
    Descriptor(#[source] io::Error),
}

impl OpenError {
    /// The errno a C caller sees.
    pub fn errno(&self) -> i32 {
        match self {
            OpenError::Vfio(_) | OpenError::NotNvme(_) => libc::ENODEV,
            OpenError::Controller(_) => libc::EIO,
            OpenError::NoNamespace { .. } => libc::ENXIO,
            OpenError::Flags(_) => libc::EINVAL,
            OpenError::Descriptor(e) => e.raw_os_error().unwrap_or(libc::EMFILE),
        }
    }
}

/// The controller at PCI address `bdf`, brought up now or shared with earlier opens.
pub fn controller(bdf: &str) -> Result<Arc<Controller>, OpenError> {
    let mut map = CONTROLLERS.lock().unwrap_or_else(|e| e.into_inner());
    let map = map.get_or_insert_with(HashMap::new);
    // One spelling per controller ("00:04.0", " 0000:00:04.0\n", upper case all name one).
    let key = nvaio_dma::sysfs::parse_bdf(bdf)
        .map_err(|e| OpenError::Vfio(nvaio_dma::vfio::OpenError::from(e)))?;
    if let Some(ctrl) = map.get(&key).and_then(Weak::upgrade) {
        if ctrl.forked() {
            return Err(nvaio_nvme::ControllerError::Forked { dev: key }.into());
        }
        return Ok(ctrl);
    }
    // Something that is not an NVMe controller is said to be so, not advised to be bound.
    if let Err(e) = nvaio_dma::sysfs::host::require_nvme(&key) {
        return Err(OpenError::NotNvme(e.to_string()));
    }
    let dev = VfioDevice::open(&key)?;
    let ctrl = Controller::new(dev)?;
    map.insert(key, Arc::downgrade(&ctrl));
    Ok(ctrl)
}

/// Opens namespace `nsid` of the controller at `bdf` with `O_RDONLY`, `O_WRONLY` or `O_RDWR`
/// and returns a descriptor for iocbs' `aio_fildes`.
pub fn open(bdf: &str, nsid: u32, flags: i32) -> Result<RawFd, OpenError> {
    let access = Access::from_flags(flags).map_err(|_| OpenError::Flags(flags))?;
    open_on(controller(bdf)?, nsid, access)
}

/// Opens namespace `nsid` of an already running controller (for example an emulated one).
pub fn open_on(ctrl: Arc<Controller>, nsid: u32, access: Access) -> Result<RawFd, OpenError> {
    let ns = ctrl.namespace(nsid).cloned().ok_or_else(|| OpenError::NoNamespace {
        dev: ctrl.device().name().to_string(),
        nsid,
        active: ctrl.namespaces().iter().map(|n| n.nsid).collect(),
    })?;
    if ctrl.forked() {
        return Err(nvaio_nvme::ControllerError::Forked { dev: ctrl.device().name().into() }.into());
    }
    // The descriptor number is reserved with an empty memfd named after the namespace, so that
    // /proc/PID/fd says what it is, and a kernel read of it (say, through a dup) finds nothing
    // rather than blocking.
    let name = std::ffi::CString::new(format!("nvaio:{}:ns{nsid}", ctrl.device().name()))
        .unwrap_or_else(|_| c"nvaio".into());
    // SAFETY: a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(OpenError::Descriptor(io::Error::last_os_error()));
    }
    let file = Arc::new(NvmeFile { fd, ctrl, ns, access });
    FILES
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(fd, file);
    Ok(fd)
}

/// Closes a descriptor returned by [`open`]. I/O already submitted on it still completes.
/// Fails with EBADF for a descriptor nvaio does not own.
pub fn close(fd: RawFd) -> io::Result<()> {
    let removed =
        FILES.write().unwrap_or_else(|e| e.into_inner()).as_mut().and_then(|m| m.remove(&fd));
    match removed {
        Some(_) => {
            EPOCH.fetch_add(1, Ordering::Release);
            // SAFETY: the descriptor was reserved by `open_on` and is ours to close.
            unsafe { libc::close(fd) };
            Ok(())
        }
        None => Err(io::Error::from_raw_os_error(libc::EBADF)),
    }
}

/// The namespace behind a descriptor, if nvaio owns it.
pub fn lookup(fd: RawFd) -> Option<Arc<NvmeFile>> {
    FILES.read().unwrap_or_else(|e| e.into_inner()).as_ref()?.get(&fd).cloned()
}

/// Whether nvaio owns this descriptor.
pub fn is_nvaio_fd(fd: RawFd) -> bool {
    lookup(fd).is_some()
}
