//! PCI and NVMe discovery through sysfs, and moving a controller between the kernel's `nvme`
//! driver and `vfio-pci`.
//!
//! Every function takes the filesystem root it reads under (`/` on a real system) so tests can
//! build a fake tree in a temporary folder; [`host`] has the same functions rooted at `/`.
//! Paths read: `sys/bus/pci/devices/<bdf>/{class,vendor,device,driver,iommu_group,numa_node,
//! driver_override,nvme/}`, `sys/bus/pci/drivers{,_probe}`, `sys/kernel/iommu_groups/<n>/devices`,
//! `sys/block/<disk>/{dev,holders,<partition>}`, `proc/self/mountinfo` (or `proc/mounts`),
//! `proc/swaps` and, to find who holds a VFIO group or a namespace open, `proc/<pid>/{fd,comm}`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// PCI class code of an NVMe controller: mass storage (01), non-volatile memory (08), NVMe (02).
pub const NVME_CLASS: u32 = 0x01_0802;

/// The driver that hands a device to user space.
pub const VFIO_DRIVER: &str = "vfio-pci";

/// The kernel's NVMe driver.
pub const NVME_DRIVER: &str = "nvme";

/// A PCI address that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not a PCI address: give it as DDDD:BB:DD.F or BB:DD.F in hex, like \
     0000:00:04.0 (lspci -D or nvaio list shows them)"
)]
pub struct AddressError {
    /// What was given.
    pub input: String,
}

/// Parses a PCI address (`DDDD:BB:DD.F`, or `BB:DD.F` meaning domain 0000) into the form sysfs
/// uses: lower-case hex with a domain of at least four digits, like `0000:00:04.0`.
pub fn parse_bdf(input: &str) -> Result<String, AddressError> {
    let err = || AddressError { input: input.to_string() };
    let hex = |s: &str, min: usize, max: usize| -> Option<u32> {
        let ok = (min..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit());
        ok.then(|| u32::from_str_radix(s, 16).ok()).flatten()
    };

    let s = input.trim();
    let (rest, func) = s.rsplit_once('.').ok_or_else(err)?;
    let parts: Vec<&str> = rest.split(':').collect();
    let (domain, bus, dev) = match parts.as_slice() {
        [bus, dev] => (0, *bus, *dev),
        // Domains past 0xffff exist (Intel VMD numbers its domains from 0x10000).
        [domain, bus, dev] => (hex(domain, 4, 8).ok_or_else(err)?, *bus, *dev),
        _ => return Err(err()),
    };
    let bus = hex(bus, 2, 2).ok_or_else(err)?;
    let dev = hex(dev, 2, 2).filter(|&d| d < 32).ok_or_else(err)?;
    let func = hex(func, 1, 1).filter(|&f| f < 8).ok_or_else(err)?;
    Ok(format!("{domain:04x}:{bus:02x}:{dev:02x}.{func:x}"))
}

/// One NVMe controller found on the PCI bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeFunction {
    /// PCI address, like `0000:00:04.0`.
    pub bdf: String,
    /// PCI vendor ID.
    pub vendor: u16,
    /// PCI device ID.
    pub device: u16,
    /// The bound driver (`nvme`, `vfio-pci`), or `None` if no driver has it.
    pub driver: Option<String>,
    /// The IOMMU group, or `None` when the IOMMU is off.
    pub iommu_group: Option<u32>,
    /// Block devices of its namespaces (`nvme0n1`, ...) while the `nvme` driver has it.
    pub block_devices: Vec<String>,
    /// NUMA node of the slot, or `None` if the platform does not say.
    pub numa_node: Option<i32>,
}

/// A block device of a controller that is in use, so the controller must not leave the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountUse {
    /// The block device, like `/dev/nvme0n1p1`.
    pub device: String,
    /// Where it is mounted, or `[swap]` for active swap.
    pub mount_point: String,
}

/// Why a controller could not be moved between drivers.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(transparent)]
    BadAddress(#[from] AddressError),
    #[error("there is no PCI device {bdf}: check the address with lspci -D or nvaio list")]
    NoDevice { bdf: String },
    #[error(
        "{bdf} is not an NVMe controller (its PCI class is {class:#08x}, not 0x010802), so nvaio \
         leaves it alone: check the address with nvaio list"
    )]
    NotNvme { bdf: String, class: u32 },
    #[error(
        "{bdf} cannot leave the kernel because {device} is mounted on {mount_point}: unmount it \
         first"
    )]
    Mounted { bdf: String, device: String, mount_point: String },
    #[error(
        "{bdf} cannot leave the kernel because {device} is active swap: run swapoff {device} first"
    )]
    Swap { bdf: String, device: String },
    #[error(
        "{bdf} cannot leave the kernel because {device} is in use by {holder} (LVM, RAID or \
         dm-crypt): stop that user first"
    )]
    Held { bdf: String, device: String, holder: String },
    #[error(
        "{bdf} cannot leave the kernel because {device} is open in process {pid} ({comm}): stop \
         that process first"
    )]
    Open { bdf: String, device: String, pid: u32, comm: String },
    #[error(
        "the vfio-pci driver is not loaded: run modprobe vfio-pci (and boot with intel_iommu=on \
         or amd_iommu=on so there is an IOMMU)"
    )]
    VfioNotLoaded,
    #[error(
        "{bdf} has no IOMMU group, so the IOMMU is off and vfio-pci would refuse it: boot with \
         intel_iommu=on (Intel) or amd_iommu=on (AMD)"
    )]
    NoIommuGroup { bdf: String },
    #[error(
        "{bdf} is bound to {}, not vfio-pci, so there is nothing to unbind: leave it or run nvaio \
         bind {bdf}", .driver.as_deref().unwrap_or("no driver")
    )]
    NotOnVfio { bdf: String, driver: Option<String> },
    #[error(
        "{bdf} is in use through /dev/vfio/{group} by process {pid} ({comm}): stop that process \
         before unbinding, or the kernel waits for it"
    )]
    VfioInUse { bdf: String, group: u32, pid: u32, comm: String },
    #[error("cannot write {value:?} to {}: {source} (run as root)", .path.display())]
    Write { path: PathBuf, value: String, source: io::Error },
    #[error("cannot read {}: {source}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "after probing, {bdf} is bound to {} instead of {expected}: dmesg tells why the driver \
         refused it", .found.as_deref().unwrap_or("no driver")
    )]
    NotBound { bdf: String, expected: &'static str, found: Option<String> },
}

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> BindError + '_ {
    move |source| BindError::Read { path: path.to_path_buf(), source }
}

/// The sysfs folder of a PCI function.
pub fn device_dir(root: &Path, bdf: &str) -> PathBuf {
    root.join("sys/bus/pci/devices").join(bdf)
}

/// Reads a small sysfs attribute, trimmed; `None` if it does not exist.
fn read_attr(path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn parse_hex(s: &str) -> Option<u32> {
    u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// The last component of a symlink's target (how sysfs names a driver or a group), or `None`
/// if there is no such link.
fn link_name(path: &Path) -> io::Result<Option<String>> {
    match fs::read_link(path) {
        Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The PCI class code (24 bits) of a device, if it has a `class` file.
pub fn class(root: &Path, bdf: &str) -> io::Result<Option<u32>> {
    Ok(read_attr(&device_dir(root, bdf).join("class"))?.and_then(|s| parse_hex(&s)))
}

/// The driver bound to a PCI function, or `None`.
pub fn driver(root: &Path, bdf: &str) -> io::Result<Option<String>> {
    link_name(&device_dir(root, bdf).join("driver"))
}

/// The IOMMU group of a PCI function, or `None` when it has none (the IOMMU is off).
pub fn iommu_group(root: &Path, bdf: &str) -> io::Result<Option<u32>> {
    Ok(link_name(&device_dir(root, bdf).join("iommu_group"))?.and_then(|n| n.parse().ok()))
}

/// Another device of an IOMMU group that keeps the group from being handed to user space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupBlocker {
    /// Its device name (a PCI address for PCI devices).
    pub device: String,
    /// The driver it is bound to.
    pub driver: String,
}

/// The members of IOMMU group `group` other than `bdf` that are bound to a kernel driver.
///
/// VFIO hands out a group only when every member is on vfio-pci (or a stub driver) or on no
/// driver; the kernel exempts bridges, whose driver does no DMA, and so does this check.
pub fn group_blockers(root: &Path, group: u32, bdf: &str) -> io::Result<Vec<GroupBlocker>> {
    let dir = root.join("sys/kernel/iommu_groups").join(group.to_string()).join("devices");
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name == bdf {
            continue;
        }
        let Some(driver) = link_name(&dir.join(&name).join("driver"))? else {
            continue;
        };
        if driver == VFIO_DRIVER || driver == "pci-stub" {
            continue;
        }
        let class = read_attr(&dir.join(&name).join("class"))?.and_then(|s| parse_hex(&s));
        // PCI-to-PCI (0x0604), CardBus (0x0607) and semi-transparent (0x0609) bridges.
        if matches!(class.map(|c| c >> 8), Some(0x0604 | 0x0607 | 0x0609)) {
            continue;
        }
        out.push(GroupBlocker { device: name, driver });
    }
    out.sort_by(|a, b| a.device.cmp(&b.device));
    Ok(out)
}

/// Whether `name` is `prefix` followed by one or more digits.
fn digits_after<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = name.strip_prefix(prefix)?;
    (!rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit())).then_some(rest)
}

/// Splits `s` after its leading decimal digits; `None` if it does not start with one.
fn split_digits(s: &str) -> Option<(&str, &str)> {
    let n = s.bytes().take_while(u8::is_ascii_digit).count();
    (n > 0).then(|| s.split_at(n))
}

/// The block device of a namespace entry in a controller's sysfs folder: `nvme0n1` as is, and a
/// multipath path device `nvme0c1n1` (subsystem 0, controller 1, namespace 1) as its head
/// `nvme0n1`, which is what user space sees.
fn namespace_disk(entry: &str) -> Option<String> {
    let (subsys, rest) = split_digits(entry.strip_prefix("nvme")?)?;
    let rest = match rest.strip_prefix('c') {
        Some(ctrl) => split_digits(ctrl)?.1,
        None => rest,
    };
    let (ns, tail) = split_digits(rest.strip_prefix('n')?)?;
    tail.is_empty().then(|| format!("nvme{subsys}n{ns}"))
}

/// The block devices (`nvme0n1`, ...) of the namespaces of the controller at `bdf`; empty when
/// the kernel's nvme driver does not have it.
pub fn block_devices(root: &Path, bdf: &str) -> io::Result<Vec<String>> {
    let ctrl_parent = device_dir(root, bdf).join("nvme");
    let ctrls = match fs::read_dir(&ctrl_parent) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut disks = Vec::new();
    for ctrl in ctrls {
        let ctrl = ctrl?;
        if digits_after(&ctrl.file_name().to_string_lossy(), "nvme").is_none() {
            continue;
        }
        for ns in fs::read_dir(ctrl.path())? {
            if let Some(disk) = namespace_disk(&ns?.file_name().to_string_lossy()) {
                disks.push(disk);
            }
        }
    }
    disks.sort_by_key(|d| natural_key(d));
    disks.dedup();
    Ok(disks)
}

/// Sort key that orders `nvme2n1` before `nvme10n1`.
fn natural_key(s: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
        } else {
            if !num.is_empty() {
                out.push((std::mem::take(&mut text), num.parse().unwrap_or(u64::MAX)));
                num.clear();
            }
            text.push(c);
        }
    }
    out.push((text, num.parse().unwrap_or(0)));
    out
}

/// A block device of the controller: a namespace or one of its partitions.
struct Disk {
    name: String,
    /// `major:minor`, if sysfs says.
    devnum: Option<String>,
    /// Folder under `sys/block`.
    dir: PathBuf,
}

/// The namespaces of the controller and their partitions.
fn disks_and_partitions(root: &Path, bdf: &str) -> io::Result<Vec<Disk>> {
    let mut out = Vec::new();
    for disk in block_devices(root, bdf)? {
        let dir = root.join("sys/block").join(&disk);
        let devnum = read_attr(&dir.join("dev"))?;
        let mut parts = Vec::new();
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries {
                let name = e?.file_name().to_string_lossy().into_owned();
                if digits_after(&name, &format!("{disk}p")).is_some() {
                    let pdir = dir.join(&name);
                    parts.push(Disk { devnum: read_attr(&pdir.join("dev"))?, name, dir: pdir });
                }
            }
        }
        parts.sort_by_key(|p| natural_key(&p.name));
        out.push(Disk { name: disk, devnum, dir });
        out.extend(parts);
    }
    Ok(out)
}

/// Undoes the octal escapes (`\040` for a space) of `/proc/mounts` and `mountinfo`.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One mounted filesystem: its source, its device number if known, and where it is mounted.
struct MountEntry {
    source: String,
    devnum: Option<String>,
    mount_point: String,
}

/// The mount table: `proc/self/mountinfo` (it has device numbers, so `/dev/root` and other
/// aliases are recognised), else `proc/mounts`.
fn mount_table(root: &Path) -> Result<Vec<MountEntry>, BindError> {
    let info = root.join("proc/self/mountinfo");
    if let Some(text) = read_attr(&info).map_err(read_err(&info))? {
        let mut out = Vec::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let Some(sep) = fields.iter().position(|&f| f == "-") else {
                continue;
            };
            if fields.len() < 5 || fields.len() < sep + 3 {
                continue;
            }
            out.push(MountEntry {
                devnum: Some(fields[2].to_string()),
                mount_point: unescape(fields[4]),
                source: unescape(fields[sep + 2]),
            });
        }
        return Ok(out);
    }
    let mounts = root.join("proc/mounts");
    let text = fs::read_to_string(&mounts).map_err(read_err(&mounts))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            let source = unescape(f.next()?);
            let mount_point = unescape(f.next()?);
            Some(MountEntry { source, devnum: None, mount_point })
        })
        .collect())
}

/// Mounted filesystems and active swap on the namespaces (or their partitions) of the
/// controller at `bdf`.
pub fn mounted_namespaces(root: &Path, bdf: &str) -> io::Result<Vec<MountUse>> {
    uses(root, bdf).map_err(|e| match e {
        BindError::Read { source, .. } => source,
        other => io::Error::new(io::ErrorKind::InvalidInput, other.to_string()),
    })
}

fn uses(root: &Path, bdf: &str) -> Result<Vec<MountUse>, BindError> {
    let bdf = parse_bdf(bdf)?;
    let disks = disks_and_partitions(root, &bdf).map_err(read_err(&device_dir(root, &bdf)))?;
    if disks.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for m in mount_table(root)? {
        let by_name = m.source.strip_prefix("/dev/");
        let hit = disks.iter().find(|d| {
            by_name == Some(d.name.as_str()) || (d.devnum.is_some() && d.devnum == m.devnum)
        });
        if let Some(d) = hit {
            out.push(MountUse { device: format!("/dev/{}", d.name), mount_point: m.mount_point });
        }
    }
    let swaps = root.join("proc/swaps");
    if let Some(text) = read_attr(&swaps).map_err(read_err(&swaps))? {
        for line in text.lines().skip(1) {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            let name = unescape(name);
            if disks.iter().any(|d| name.strip_prefix("/dev/") == Some(d.name.as_str())) {
                out.push(MountUse { device: name, mount_point: "[swap]".to_string() });
            }
        }
    }
    Ok(out)
}

/// The first block device of the controller that another block device (device-mapper, md) is
/// built on, with that holder.
fn held_disk(root: &Path, bdf: &str) -> Result<Option<(String, String)>, BindError> {
    let disks = disks_and_partitions(root, bdf).map_err(read_err(&device_dir(root, bdf)))?;
    for d in disks {
        let holders = d.dir.join("holders");
        let Ok(entries) = fs::read_dir(&holders) else {
            continue;
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        if let Some(h) = names.into_iter().next() {
            return Ok(Some((format!("/dev/{}", d.name), h)));
        }
    }
    Ok(None)
}

/// The controller character devices (`nvme0`) the kernel's nvme driver made for `bdf`.
fn controller_devices(root: &Path, bdf: &str) -> io::Result<Vec<String>> {
    let entries = match fs::read_dir(device_dir(root, bdf).join("nvme")) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in entries {
        let name = e?.file_name().to_string_lossy().into_owned();
        if digits_after(&name, "nvme").is_some() {
            out.push(name);
        }
    }
    out.sort_by_key(|n| natural_key(n));
    Ok(out)
}

/// The first process (lowest pid) with a descriptor open on one of `targets`, as (target, pid,
/// command name). Processes whose descriptors cannot be read (gone, or not ours) are skipped.
fn fd_user(root: &Path, targets: &[PathBuf]) -> Option<(PathBuf, u32, String)> {
    if targets.is_empty() {
        return None;
    }
    let procs = fs::read_dir(root.join("proc")).ok()?;
    let mut pids: Vec<u32> = procs
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let dir = root.join("proc").join(pid.to_string());
        let Ok(fds) = fs::read_dir(dir.join("fd")) else {
            continue;
        };
        let hit = fds
            .filter_map(|e| e.ok())
            .filter_map(|fd| fs::read_link(fd.path()).ok())
            .find(|link| targets.contains(link));
        if let Some(target) = hit {
            let comm = read_attr(&dir.join("comm")).ok().flatten().unwrap_or_default();
            return Some((target, pid, comm));
        }
    }
    None
}

/// A process that has a block device of the controller (namespace or partition) or its
/// controller character device open, as (device, pid, command name).
fn open_device(root: &Path, bdf: &str) -> Result<Option<(String, u32, String)>, BindError> {
    let dir = device_dir(root, bdf);
    let mut names = controller_devices(root, bdf).map_err(read_err(&dir))?;
    names.extend(
        disks_and_partitions(root, bdf).map_err(read_err(&dir))?.into_iter().map(|d| d.name),
    );
    let targets: Vec<PathBuf> = names.iter().map(|n| Path::new("/dev").join(n)).collect();
    Ok(fd_user(root, &targets).map(|(t, pid, comm)| (t.display().to_string(), pid, comm)))
}

/// Every NVMe controller on the PCI bus, sorted by address.
pub fn list_nvme(root: &Path) -> io::Result<Vec<NvmeFunction>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(root.join("sys/bus/pci/devices"))? {
        let bdf = entry?.file_name().to_string_lossy().into_owned();
        if class(root, &bdf)? != Some(NVME_CLASS) {
            continue;
        }
        let dir = device_dir(root, &bdf);
        let id = |file: &str| -> io::Result<u16> {
            Ok(read_attr(&dir.join(file))?.and_then(|s| parse_hex(&s)).unwrap_or(0xffff) as u16)
        };
        let driver = driver(root, &bdf)?;
        let block_devices = if driver.as_deref() == Some(NVME_DRIVER) {
            block_devices(root, &bdf)?
        } else {
            Vec::new()
        };
        let numa_node = read_attr(&dir.join("numa_node"))?
            .and_then(|s| s.parse::<i32>().ok())
            .filter(|&n| n >= 0);
        out.push(NvmeFunction {
            vendor: id("vendor")?,
            device: id("device")?,
            driver,
            iommu_group: iommu_group(root, &bdf)?,
            block_devices,
            numa_node,
            bdf,
        });
    }
    out.sort_by(|a, b| a.bdf.cmp(&b.bdf));
    Ok(out)
}

/// Writes `value` to a sysfs attribute that must already exist.
fn write_attr(path: &Path, value: &str) -> Result<(), BindError> {
    use std::io::Write;
    let write = || -> io::Result<()> {
        // No O_CREAT: a missing attribute is an error, not a new file.
        let mut f = fs::OpenOptions::new().write(true).truncate(true).open(path)?;
        f.write_all(value.as_bytes())
    };
    write().map_err(|source| BindError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

/// Checks that `bdf` names an NVMe controller and returns its normalised address.
fn existing_nvme(root: &Path, bdf: &str) -> Result<String, BindError> {
    let bdf = parse_bdf(bdf)?;
    let dir = device_dir(root, &bdf);
    if !dir.exists() {
        return Err(BindError::NoDevice { bdf });
    }
    let class = class(root, &bdf).map_err(read_err(&dir))?.unwrap_or(0);
    if class != NVME_CLASS {
        return Err(BindError::NotNvme { bdf, class });
    }
    Ok(bdf)
}

/// Checks that `bdf` names an existing NVMe controller (PCI class 0x010802) and returns its
/// normalised address. For callers about to open a controller: a wrong address is then named as
/// such ([`BindError::NotNvme`], [`BindError::NoDevice`]) instead of as a driver to change.
pub fn require_nvme(root: &Path, bdf: &str) -> Result<String, BindError> {
    existing_nvme(root, bdf)
}

/// What [`bind_vfio`] found before changing anything.
#[derive(Debug, PartialEq, Eq)]
enum BindPlan {
    /// Already on vfio-pci.
    Nothing,
    /// Detach from the current driver (if any) and probe with vfio-pci.
    Rebind { bdf: String, current: Option<String> },
}

/// The checks of [`bind_vfio`]: a refusal here leaves the system untouched.
fn bind_checks(root: &Path, bdf: &str) -> Result<BindPlan, BindError> {
    let bdf = existing_nvme(root, bdf)?;
    let current = driver(root, &bdf).map_err(read_err(&device_dir(root, &bdf)))?;
    if current.as_deref() == Some(VFIO_DRIVER) {
        return Ok(BindPlan::Nothing);
    }
    if let Some(u) = uses(root, &bdf)?.into_iter().next() {
        return Err(if u.mount_point == "[swap]" {
            BindError::Swap { bdf, device: u.device }
        } else {
            BindError::Mounted { bdf, device: u.device, mount_point: u.mount_point }
        });
    }
    if let Some((device, holder)) = held_disk(root, &bdf)? {
        return Err(BindError::Held { bdf, device, holder });
    }
    // A process reading the namespace (even `sleep < /dev/nvme0n1`) would lose it mid-way.
    if let Some((device, pid, comm)) = open_device(root, &bdf)? {
        return Err(BindError::Open { bdf, device, pid, comm });
    }
    if !root.join("sys/bus/pci/drivers").join(VFIO_DRIVER).is_dir() {
        return Err(BindError::VfioNotLoaded);
    }
    if iommu_group(root, &bdf).map_err(read_err(&device_dir(root, &bdf)))?.is_none() {
        return Err(BindError::NoIommuGroup { bdf });
    }
    Ok(BindPlan::Rebind { bdf, current })
}

/// Checks that `bdf` ended up on `expected`.
fn verify_driver(root: &Path, bdf: &str, expected: &'static str) -> Result<(), BindError> {
    let found = driver(root, bdf).map_err(read_err(&device_dir(root, bdf)))?;
    if found.as_deref() == Some(expected) {
        Ok(())
    } else {
        Err(BindError::NotBound { bdf: bdf.to_string(), expected, found })
    }
}

/// Hands the NVMe controller at `bdf` to vfio-pci, so nvaio can open it.
///
/// Refuses, changing nothing, if a namespace or partition of it is mounted, active swap, or
/// under device-mapper or md, if a process has one of them or the controller's character device
/// (`/dev/nvme0`) open, if vfio-pci is not loaded, or if the device has no IOMMU group.
/// Then detaches it from its driver, sets `driver_override` to vfio-pci, asks the kernel to probe
/// it, and checks the result; if vfio-pci did not take it, it is offered back to the kernel's
/// drivers before the error is returned. Succeeds without doing anything if it is already on
/// vfio-pci.
pub fn bind_vfio(root: &Path, bdf: &str) -> Result<(), BindError> {
    let BindPlan::Rebind { bdf, current } = bind_checks(root, bdf)? else {
        return Ok(());
    };
    let dir = device_dir(root, &bdf);
    if current.is_some() {
        write_attr(&dir.join("driver/unbind"), &bdf)?;
    }
    write_attr(&dir.join("driver_override"), VFIO_DRIVER)?;
    write_attr(&root.join("sys/bus/pci/drivers_probe"), &bdf)?;
    let verdict = verify_driver(root, &bdf, VFIO_DRIVER);
    if verdict.is_err() && current.is_some() {
        // vfio-pci refused it: give it back to its driver rather than leave it with none.
        let give_back = write_attr(&dir.join("driver_override"), "\n")
            .and_then(|()| write_attr(&root.join("sys/bus/pci/drivers_probe"), &bdf));
        if let Err(e) = give_back {
            tracing::warn!(bdf, error = %e, "cannot give the device back to its driver");
        }
    }
    verdict
}

/// A process that has `/dev/vfio/<group>` open, as (pid, command name).
fn vfio_group_user(root: &Path, group: u32) -> Option<(u32, String)> {
    let target = PathBuf::from(format!("/dev/vfio/{group}"));
    fd_user(root, &[target]).map(|(_, pid, comm)| (pid, comm))
}

/// The checks of [`unbind_vfio`]: returns the normalised address, and whether it is on
/// vfio-pci (false: already released, only `driver_override` may need clearing).
fn unbind_checks(root: &Path, bdf: &str) -> Result<(String, bool), BindError> {
    let bdf = existing_nvme(root, bdf)?;
    let dir = device_dir(root, &bdf);
    let current = driver(root, &bdf).map_err(read_err(&dir))?;
    match current.as_deref() {
        Some(VFIO_DRIVER) => {}
        None | Some(NVME_DRIVER) => return Ok((bdf, false)),
        Some(_) => return Err(BindError::NotOnVfio { bdf, driver: current }),
    }
    // Unbinding a device whose group is open blocks until the holder lets go: refuse instead.
    if let Some(group) = iommu_group(root, &bdf).map_err(read_err(&dir))? {
        if let Some((pid, comm)) = vfio_group_user(root, group) {
            return Err(BindError::VfioInUse { bdf, group, pid, comm });
        }
    }
    Ok((bdf, true))
}

/// Gives the NVMe controller at `bdf` back to the kernel's nvme driver.
///
/// Refuses if a process has its VFIO group open. Detaches it from vfio-pci, clears
/// `driver_override`, asks the kernel to probe it, and checks that nvme took it. A controller
/// already on nvme only gets its `driver_override` cleared.
pub fn unbind_vfio(root: &Path, bdf: &str) -> Result<(), BindError> {
    let (bdf, on_vfio) = unbind_checks(root, bdf)?;
    let dir = device_dir(root, &bdf);
    if on_vfio {
        write_attr(&dir.join("driver/unbind"), &bdf)?;
    }
    write_attr(&dir.join("driver_override"), "\n")?;
    if driver(root, &bdf).map_err(read_err(&dir))?.is_none() {
        write_attr(&root.join("sys/bus/pci/drivers_probe"), &bdf)?;
    }
    verify_driver(root, &bdf, NVME_DRIVER)
}

/// The same functions on the running system (root `/`).
pub mod host {
    use super::*;

    const ROOT: &str = "/";

    /// [`super::list_nvme`] on this system.
    pub fn list_nvme() -> io::Result<Vec<NvmeFunction>> {
        super::list_nvme(Path::new(ROOT))
    }

    /// [`super::bind_vfio`] on this system.
    pub fn bind_vfio(bdf: &str) -> Result<(), BindError> {
        super::bind_vfio(Path::new(ROOT), bdf)
    }

    /// [`super::unbind_vfio`] on this system.
    pub fn unbind_vfio(bdf: &str) -> Result<(), BindError> {
        super::unbind_vfio(Path::new(ROOT), bdf)
    }

    /// [`super::require_nvme`] on this system.
    pub fn require_nvme(bdf: &str) -> Result<String, BindError> {
        super::require_nvme(Path::new(ROOT), bdf)
    }

    /// [`super::mounted_namespaces`] on this system.
    pub fn mounted_namespaces(bdf: &str) -> io::Result<Vec<MountUse>> {
        super::mounted_namespaces(Path::new(ROOT), bdf)
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! Fake sysfs trees for tests.

    use super::*;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A temporary folder holding a fake root, removed on drop.
    pub struct FakeRoot(pub PathBuf);

    impl FakeRoot {
        pub fn new(tag: &str) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "nvaio-dma-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            let r = FakeRoot(dir);
            r.mkdir("sys/bus/pci/drivers/nvme");
            r.file("sys/bus/pci/drivers/nvme/unbind", "");
            r.file("sys/bus/pci/drivers_probe", "");
            r.file("proc/mounts", "");
            r
        }

        pub fn path(&self) -> &Path {
            &self.0
        }

        pub fn mkdir(&self, rel: &str) {
            fs::create_dir_all(self.0.join(rel)).unwrap();
        }

        pub fn file(&self, rel: &str, text: &str) {
            let p = self.0.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }

        pub fn read(&self, rel: &str) -> String {
            fs::read_to_string(self.0.join(rel)).unwrap()
        }

        pub fn link(&self, rel: &str, target: &str) {
            let p = self.0.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            let _ = fs::remove_file(&p);
            symlink(target, p).unwrap();
        }

        /// A PCI function with a class, an optional driver and an optional IOMMU group, linked
        /// into its group like sysfs does.
        pub fn pci(&self, bdf: &str, class: u32, driver: Option<&str>, group: Option<u32>) {
            // Laid out as sysfs does it: the device lives under sys/devices and the bus lists it
            // through a symlink, so relative links resolve as they do on a real system.
            self.mkdir(&format!("sys/devices/pci0000:00/{bdf}"));
            self.link(
                &format!("sys/bus/pci/devices/{bdf}"),
                &format!("../../../devices/pci0000:00/{bdf}"),
            );
            let dev = format!("sys/bus/pci/devices/{bdf}");
            self.file(&format!("{dev}/class"), &format!("{class:#08x}\n"));
            self.file(&format!("{dev}/vendor"), "0x1b36\n");
            self.file(&format!("{dev}/device"), "0x0010\n");
            self.file(&format!("{dev}/driver_override"), "(null)\n");
            self.set_driver(bdf, driver);
            if let Some(g) = group {
                self.mkdir(&format!("sys/kernel/iommu_groups/{g}/devices"));
                self.link(
                    &format!("{dev}/iommu_group"),
                    &format!("../../../kernel/iommu_groups/{g}"),
                );
                self.link(
                    &format!("sys/kernel/iommu_groups/{g}/devices/{bdf}"),
                    &format!("../../../../bus/pci/devices/{bdf}"),
                );
            }
        }

        pub fn set_driver(&self, bdf: &str, driver: Option<&str>) {
            let link = format!("sys/bus/pci/devices/{bdf}/driver");
            let _ = fs::remove_file(self.0.join(&link));
            if let Some(d) = driver {
                self.mkdir(&format!("sys/bus/pci/drivers/{d}"));
                self.file(&format!("sys/bus/pci/drivers/{d}/unbind"), "");
                self.link(&link, &format!("../../../bus/pci/drivers/{d}"));
            }
        }

        /// Namespace `disk` (like `nvme0n1`) of controller `ctrl` (like `nvme0`) at `bdf`, with
        /// device number `devnum` and the given partitions.
        pub fn namespace(
            &self,
            bdf: &str,
            ctrl: &str,
            entry: &str,
            disk: &str,
            devnum: &str,
            parts: &[&str],
        ) {
            self.mkdir(&format!("sys/bus/pci/devices/{bdf}/nvme/{ctrl}/{entry}"));
            self.file(&format!("sys/block/{disk}/dev"), &format!("{devnum}\n"));
            self.mkdir(&format!("sys/block/{disk}/holders"));
            for (i, p) in parts.iter().enumerate() {
                let (maj, min) = devnum.split_once(':').unwrap();
                let min: u32 = min.parse().unwrap();
                self.file(
                    &format!("sys/block/{disk}/{p}/dev"),
                    &format!("{maj}:{}\n", min + 1 + i as u32),
                );
                self.mkdir(&format!("sys/block/{disk}/{p}/holders"));
            }
        }
    }

    impl Drop for FakeRoot {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeRoot;
    use super::*;

    const BDF: &str = "0000:00:04.0";

    #[test]
    fn addresses() {
        assert_eq!(parse_bdf("0000:00:04.0").unwrap(), "0000:00:04.0");
        assert_eq!(parse_bdf("00:04.0").unwrap(), "0000:00:04.0");
        assert_eq!(parse_bdf(" 0000:AF:1F.7\n").unwrap(), "0000:af:1f.7");
        assert_eq!(parse_bdf("10000:e1:00.0").unwrap(), "10000:e1:00.0");
        for bad in [
            "",
            "04.0",
            "0:00:04.0",
            "0000:0:04.0",
            "0000:00:20.0",
            "0000:00:04.8",
            "0000:00:04",
            "0000:00:04.0.1",
            "0000:00:0g.0",
            "x0000:00:04.0",
            "0000:00:04.-1",
            "0000:00:+4.0",
            "1:2:3:4.0",
            "/sys/bus/pci/devices/0000:00:04.0",
        ] {
            let e = parse_bdf(bad).unwrap_err();
            assert_eq!(e.input, bad);
            assert!(e.to_string().contains("0000:00:04.0"), "{e}");
        }
    }

    #[test]
    fn namespace_entries() {
        assert_eq!(namespace_disk("nvme0n1").as_deref(), Some("nvme0n1"));
        assert_eq!(namespace_disk("nvme12n34").as_deref(), Some("nvme12n34"));
        assert_eq!(namespace_disk("nvme0c1n2").as_deref(), Some("nvme0n2"));
        for not in [
            "nvme0",
            "nvme0n",
            "nvmen1",
            "nvme0c1",
            "nvme0cn1",
            "nvme0n1p1",
            "ng0n1",
            "power",
            "nvme0x1",
        ] {
            assert_eq!(namespace_disk(not), None, "{not}");
        }
    }

    fn two_controllers() -> FakeRoot {
        let r = FakeRoot::new("sysfs");
        r.pci(BDF, NVME_CLASS, Some("nvme"), Some(3));
        r.file(&format!("sys/bus/pci/devices/{BDF}/numa_node"), "-1\n");
        r.namespace(BDF, "nvme0", "nvme0n1", "nvme0n1", "259:0", &["nvme0n1p1", "nvme0n1p2"]);
        r.namespace(BDF, "nvme0", "nvme0n2", "nvme0n2", "259:5", &[]);
        r.file(&format!("sys/bus/pci/devices/{BDF}/nvme/nvme0/serial"), "s\n");
        r.pci("0000:00:05.0", NVME_CLASS, Some("vfio-pci"), Some(4));
        r.file("sys/bus/pci/devices/0000:00:05.0/numa_node", "1\n");
        r.pci("0000:00:02.0", 0x03_0000, Some("bochs-drm"), Some(1));
        r.pci("0000:00:06.0", NVME_CLASS, None, None);
        r
    }

    #[test]
    fn lists_nvme_controllers() {
        let r = two_controllers();
        let list = list_nvme(r.path()).unwrap();
        let bdfs: Vec<&str> = list.iter().map(|f| f.bdf.as_str()).collect();
        assert_eq!(bdfs, ["0000:00:04.0", "0000:00:05.0", "0000:00:06.0"]);
        assert_eq!(
            list[0],
            NvmeFunction {
                bdf: BDF.into(),
                vendor: 0x1b36,
                device: 0x0010,
                driver: Some("nvme".into()),
                iommu_group: Some(3),
                block_devices: vec!["nvme0n1".into(), "nvme0n2".into()],
                numa_node: None,
            }
        );
        assert_eq!(list[1].driver.as_deref(), Some("vfio-pci"));
        assert_eq!(list[1].numa_node, Some(1));
        assert!(list[1].block_devices.is_empty());
        assert_eq!(list[2].driver, None);
        assert_eq!(list[2].iommu_group, None);
    }

    #[test]
    fn multipath_namespaces_map_to_their_head() {
        let r = FakeRoot::new("sysfs");
        r.pci(BDF, NVME_CLASS, Some("nvme"), Some(3));
        r.namespace(BDF, "nvme1", "nvme0c1n1", "nvme0n1", "259:0", &[]);
        assert_eq!(block_devices(r.path(), BDF).unwrap(), ["nvme0n1"]);
    }

    #[test]
    fn mounts_by_name_and_by_device_number() {
        let r = two_controllers();
        assert!(mounted_namespaces(r.path(), BDF).unwrap().is_empty());

        r.file(
            "proc/mounts",
            "/dev/nvme0n1p2 /mnt/my\\040data ext4 rw 0 0\n/dev/sda1 / ext4 rw 0 0\n",
        );
        assert_eq!(
            mounted_namespaces(r.path(), BDF).unwrap(),
            [MountUse { device: "/dev/nvme0n1p2".into(), mount_point: "/mnt/my data".into() }]
        );
        // mountinfo wins over mounts, and matches an alias like /dev/root by number.
        r.file(
            "proc/self/mountinfo",
            "22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw\n\
             23 22 0:5 / /proc rw - proc proc rw\n",
        );
        assert_eq!(
            mounted_namespaces(r.path(), BDF).unwrap(),
            [MountUse { device: "/dev/nvme0n1p1".into(), mount_point: "/".into() }]
        );
        assert!(mounted_namespaces(r.path(), "0000:00:05.0").unwrap().is_empty());
    }

    #[test]
    fn bind_refuses_mounted_swap_and_held() {
        let r = two_controllers();
        r.file("proc/mounts", "/dev/nvme0n2 /srv xfs rw 0 0\n");
        let e = bind_vfio(r.path(), BDF).unwrap_err();
        assert!(
            matches!(&e, BindError::Mounted { device, mount_point, .. }
            if device == "/dev/nvme0n2" && mount_point == "/srv"),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(msg.contains("/dev/nvme0n2") && msg.contains("/srv") && msg.contains("unmount"));

        r.file("proc/mounts", "");
        r.file("proc/swaps", "Filename Type Size Used Priority\n/dev/nvme0n1p1 partition 1 0 -2\n");
        let e = bind_vfio(r.path(), BDF).unwrap_err();
        assert!(
            matches!(&e, BindError::Swap { device, .. } if device == "/dev/nvme0n1p1"),
            "{e:?}"
        );

        r.file("proc/swaps", "Filename Type Size Used Priority\n");
        r.mkdir("sys/block/nvme0n1/nvme0n1p2/holders/dm-0");
        let e = bind_vfio(r.path(), BDF).unwrap_err();
        assert!(
            matches!(&e, BindError::Held { device, holder, .. }
            if device == "/dev/nvme0n1p2" && holder == "dm-0"),
            "{e:?}"
        );
        // Nothing was written.
        assert_eq!(r.read("sys/bus/pci/drivers/nvme/unbind"), "");
        assert_eq!(r.read("sys/bus/pci/drivers_probe"), "");
    }

    #[test]
    fn bind_refuses_open_namespaces_partitions_and_controller() {
        let r = two_controllers();
        r.mkdir("sys/bus/pci/drivers/vfio-pci");
        // Unrelated descriptors, a process without readable fds, and a non-pid entry.
        r.link("proc/1/fd/0", "/dev/null");
        r.link("proc/1/fd/1", "/dev/nvme1n1");
        r.link("proc/1/fd/2", "/dev/nvme0n10");
        r.file("proc/1/comm", "init\n");
        r.mkdir("proc/2");
        r.link("proc/self/fd/0", "/dev/nvme0n1");
        for (dev, pid, comm) in [
            ("/dev/nvme0n2", 700, "sleep"),
            ("/dev/nvme0n1p2", 81, "dd"),
            ("/dev/nvme0", 9, "nvme"),
        ] {
            r.link(&format!("proc/{pid}/fd/3"), "/dev/pts/0");
            r.link(&format!("proc/{pid}/fd/4"), dev);
            r.file(&format!("proc/{pid}/comm"), &format!("{comm}\n"));
            let e = bind_vfio(r.path(), BDF).unwrap_err();
            assert!(
                matches!(&e, BindError::Open { device, pid: p, comm: c, .. }
                if device == dev && *p == pid && c == comm),
                "{e:?}"
            );
            let msg = e.to_string();
            assert!(msg.contains(dev) && msg.contains(&pid.to_string()) && msg.contains(comm));
            fs::remove_dir_all(r.path().join(format!("proc/{pid}"))).unwrap();
        }
        // Nothing was written.
        assert_eq!(r.read("sys/bus/pci/drivers/nvme/unbind"), "");
        assert_eq!(r.read("sys/bus/pci/drivers_probe"), "");
        // Without those, the checks pass.
        fs::remove_file(r.path().join("proc/self/fd/0")).unwrap();
        assert!(matches!(bind_checks(r.path(), BDF), Ok(BindPlan::Rebind { .. })));
    }

    #[test]
    fn bind_checks_address_class_and_vfio_presence() {
        let r = two_controllers();
        assert!(matches!(bind_vfio(r.path(), "00:04"), Err(BindError::BadAddress(_))));
        assert!(matches!(bind_vfio(r.path(), "00:09.0"), Err(BindError::NoDevice { .. })));
        let e = bind_vfio(r.path(), "00:02.0").unwrap_err();
        assert!(matches!(e, BindError::NotNvme { class: 0x03_0000, .. }), "{e:?}");
        // Already on vfio-pci: nothing to do.
        assert_eq!(bind_checks(r.path(), "00:05.0").unwrap(), BindPlan::Nothing);
        bind_vfio(r.path(), "00:05.0").unwrap();

        // A controller without an IOMMU group.
        let e = bind_vfio(r.path(), "00:06.0").unwrap_err();
        assert!(matches!(e, BindError::NoIommuGroup { .. }), "{e:?}");
        assert!(e.to_string().contains("intel_iommu=on"));

        fs::remove_dir_all(r.path().join("sys/bus/pci/drivers/vfio-pci")).unwrap();
        let e = bind_vfio(r.path(), BDF).unwrap_err();
        assert!(matches!(e, BindError::VfioNotLoaded));
        assert!(e.to_string().contains("modprobe vfio-pci"));
    }

    #[test]
    fn require_nvme_names_the_class() {
        let r = two_controllers();
        assert_eq!(require_nvme(r.path(), "00:04.0").unwrap(), BDF);
        let e = require_nvme(r.path(), "00:02.0").unwrap_err();
        assert!(matches!(e, BindError::NotNvme { class: 0x03_0000, .. }), "{e:?}");
        assert!(e.to_string().contains("is not an NVMe controller"), "{e}");
        let e = require_nvme(r.path(), "00:1f.0").unwrap_err();
        assert!(matches!(e, BindError::NoDevice { .. }), "{e:?}");
    }

    #[test]
    fn bind_writes_the_sysfs_sequence() {
        let r = two_controllers();
        assert_eq!(
            bind_checks(r.path(), "00:04.0").unwrap(),
            BindPlan::Rebind { bdf: BDF.into(), current: Some("nvme".into()) }
        );
        // No kernel reacts to the writes in a fake tree, so the final check reports the device
        // still on nvme; the writes themselves are what is checked here.
        let e = bind_vfio(r.path(), "00:04.0").unwrap_err();
        assert!(
            matches!(&e, BindError::NotBound { expected: "vfio-pci", found: Some(d), .. } if d == "nvme")
        );
        assert!(e.to_string().contains("dmesg"));
        assert_eq!(r.read("sys/bus/pci/drivers/nvme/unbind"), BDF);
        assert_eq!(r.read("sys/bus/pci/drivers_probe"), BDF);
        // After the failed check the override was cleared again, to give the device back.
        assert_eq!(r.read(&format!("sys/bus/pci/devices/{BDF}/driver_override")), "\n");

        // What the kernel would have done makes the check pass.
        r.set_driver(BDF, Some("vfio-pci"));
        verify_driver(r.path(), BDF, VFIO_DRIVER).unwrap();
    }

    #[test]
    fn bind_reports_a_missing_attribute() {
        let r = two_controllers();
        fs::remove_file(r.path().join("sys/bus/pci/drivers_probe")).unwrap();
        let e = bind_vfio(r.path(), BDF).unwrap_err();
        match e {
            BindError::Write { path, value, source } => {
                assert!(path.ends_with("sys/bus/pci/drivers_probe"));
                assert_eq!(value, BDF);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unbind_sequence_and_checks() {
        let r = two_controllers();
        let vdev = "0000:00:05.0";
        // Another process holding the group open.
        r.file("proc/77/comm", "spdk_tgt\n");
        r.link("proc/77/fd/9", "/dev/vfio/4");
        r.link("proc/78/fd/9", "/dev/vfio/40");
        let e = unbind_vfio(r.path(), vdev).unwrap_err();
        assert!(
            matches!(&e, BindError::VfioInUse { group: 4, pid: 77, comm, .. } if comm == "spdk_tgt")
        );
        fs::remove_dir_all(r.path().join("proc/77")).unwrap();

        let e = unbind_vfio(r.path(), vdev).unwrap_err();
        assert!(
            matches!(&e, BindError::NotBound { expected: "nvme", found: Some(d), .. } if d == "vfio-pci")
        );
        assert_eq!(r.read("sys/bus/pci/drivers/vfio-pci/unbind"), vdev);
        assert_eq!(r.read(&format!("sys/bus/pci/devices/{vdev}/driver_override")), "\n");
        // The device still looks bound in the fake tree, so no probe was asked for.
        assert_eq!(r.read("sys/bus/pci/drivers_probe"), "");

        // Once vfio-pci lets go, the probe is asked for.
        r.set_driver(vdev, None);
        let e = unbind_vfio(r.path(), vdev).unwrap_err();
        assert!(matches!(e, BindError::NotBound { found: None, .. }));
        assert_eq!(r.read("sys/bus/pci/drivers_probe"), vdev);

        // Already on nvme: only driver_override is cleared.
        unbind_vfio(r.path(), BDF).unwrap();
        // On some other driver: refused.
        r.pci("0000:00:07.0", NVME_CLASS, Some("pci-stub"), None);
        assert!(matches!(unbind_vfio(r.path(), "00:07.0"), Err(BindError::NotOnVfio { .. })));
    }

    #[test]
    fn group_blockers_skip_self_free_vfio_and_bridges() {
        let r = FakeRoot::new("sysfs");
        r.pci(BDF, NVME_CLASS, Some("vfio-pci"), Some(9));
        r.pci("0000:00:1c.0", 0x06_0400, Some("pcieport"), Some(9));
        r.pci("0000:00:1f.0", 0x06_0100, Some("lpc_ich"), Some(9));
        r.pci("0000:00:1f.2", 0x01_0601, Some("ahci"), Some(9));
        r.pci("0000:00:1f.3", 0x0c_0500, None, Some(9));
        r.pci("0000:00:1f.4", 0x0c_0500, Some("vfio-pci"), Some(9));
        let b = group_blockers(r.path(), 9, BDF).unwrap();
        assert_eq!(
            b,
            [
                GroupBlocker { device: "0000:00:1f.0".into(), driver: "lpc_ich".into() },
                GroupBlocker { device: "0000:00:1f.2".into(), driver: "ahci".into() },
            ]
        );
    }

    #[test]
    fn unescapes_mount_fields() {
        assert_eq!(unescape("/a\\040b\\011c\\134d"), "/a b\tc\\d");
        assert_eq!(unescape("/x\\04"), "/x\\04");
        assert_eq!(unescape("\\777"), "\\777");
    }
}
