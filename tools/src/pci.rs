//! `nvaio list`, `nvaio bind` and `nvaio unbind`: the PCI side, through sysfs.

use std::fmt::Write as _;
use std::path::Path;

use nvaio_dma::sysfs::{self, NvmeFunction};
use serde_json::{json, Value};

use crate::error::{Context as _, Result};

/// The NVMe controllers under `root`, as a table or as JSON.
pub fn list(root: &Path, as_json: bool) -> Result<String> {
    let found = sysfs::list_nvme(root).with_context(|| {
        format!("cannot list PCI devices in {}", root.join("sys/bus/pci").display())
    })?;
    Ok(if as_json {
        let all: Vec<Value> = found.iter().map(to_json).collect();
        format!("{:#}\n", Value::Array(all))
    } else {
        table(&found)
    })
}

fn to_json(f: &NvmeFunction) -> Value {
    json!({
        "address": f.bdf,
        "vendor": format!("{:04x}", f.vendor),
        "device": format!("{:04x}", f.device),
        "driver": f.driver,
        "iommu_group": f.iommu_group,
        "numa_node": f.numa_node,
        "block_devices": f.block_devices,
    })
}

fn table(found: &[NvmeFunction]) -> String {
    if found.is_empty() {
        return "no NVMe controller found on the PCI bus\n".to_string();
    }
    let rows: Vec<[String; 6]> = found
        .iter()
        .map(|f| {
            [
                f.bdf.clone(),
                format!("{:04x}:{:04x}", f.vendor, f.device),
                f.driver.clone().unwrap_or_else(|| "none".into()),
                f.iommu_group.map_or_else(|| "none".into(), |g| g.to_string()),
                f.numa_node.map_or_else(|| "-".into(), |n| n.to_string()),
                if f.block_devices.is_empty() { "-".into() } else { f.block_devices.join(" ") },
            ]
        })
        .collect();
    let header = ["ADDRESS", "VENDOR:DEVICE", "DRIVER", "IOMMU GROUP", "NUMA", "BLOCK DEVICES"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

/// Hands the controller at `addr` to vfio-pci.
pub fn bind(root: &Path, addr: &str) -> Result<String> {
    let bdf = sysfs::parse_bdf(addr)?;
    let before = sysfs::driver(root, &bdf).ok().flatten();
    sysfs::bind_vfio(root, &bdf)?;
    Ok(match before.as_deref() {
        Some(sysfs::VFIO_DRIVER) => format!("{bdf}: already on vfio-pci\n"),
        Some(d) => format!("{bdf}: moved from {d} to vfio-pci\n"),
        None => format!("{bdf}: bound to vfio-pci\n"),
    })
}

/// Gives the controller at `addr` back to the kernel's nvme driver.
pub fn unbind(root: &Path, addr: &str) -> Result<String> {
    let bdf = sysfs::parse_bdf(addr)?;
    let before = sysfs::driver(root, &bdf).ok().flatten();
    sysfs::unbind_vfio(root, &bdf)?;
    // The nvme driver probes in the background, so its block devices may not exist yet.
    Ok(match before.as_deref() {
        Some(sysfs::NVME_DRIVER) => format!("{bdf}: already on nvme\n"),
        _ => format!("{bdf}: back on nvme\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A throw-away folder laid out like the parts of sysfs that `list` reads.
    struct Tree(PathBuf);

    impl Tree {
        fn new(tag: &str) -> Tree {
            // Tests run in parallel: every tree gets its own folder.
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let pid = std::process::id();
            let dir = std::env::temp_dir().join(format!("nvaio-tools-{pid}-{tag}-{n}"));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("sys/bus/pci/devices")).unwrap();
            Tree(dir)
        }

        fn write(&self, rel: &str, text: &str) {
            let p = self.0.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }

        fn link(&self, rel: &str, target: &str) {
            let p = self.0.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            symlink(target, p).unwrap();
        }

        fn device(&self, bdf: &str, class: &str, driver: Option<&str>, group: Option<u32>) {
            let dev = format!("sys/bus/pci/devices/{bdf}");
            self.write(&format!("{dev}/class"), class);
            self.write(&format!("{dev}/vendor"), "0x1b36\n");
            self.write(&format!("{dev}/device"), "0x0010\n");
            if let Some(d) = driver {
                fs::create_dir_all(self.0.join(format!("sys/bus/pci/drivers/{d}"))).unwrap();
                self.link(&format!("{dev}/driver"), &format!("../../drivers/{d}"));
            }
            if let Some(g) = group {
                fs::create_dir_all(self.0.join(format!("sys/kernel/iommu_groups/{g}"))).unwrap();
                self.link(
                    &format!("{dev}/iommu_group"),
                    &format!("../../../../kernel/iommu_groups/{g}"),
                );
            }
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn sample() -> Tree {
        let t = Tree::new("list");
        t.device("0000:00:05.0", "0x010802\n", Some("vfio-pci"), Some(4));
        t.device("0000:00:04.0", "0x010802\n", Some("nvme"), Some(3));
        t.write("sys/bus/pci/devices/0000:00:04.0/numa_node", "0\n");
        fs::create_dir_all(t.0.join("sys/bus/pci/devices/0000:00:04.0/nvme/nvme0/nvme0n1"))
            .unwrap();
        t.device("0000:00:02.0", "0x030000\n", Some("bochs-drm"), Some(1));
        t.device("0000:00:06.0", "0x010802\n", None, None);
        t
    }

    #[test]
    fn lists_as_a_table() {
        let t = sample();
        let out = list(&t.0, false).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert!(lines[0].starts_with("ADDRESS "));
        let cells: Vec<Vec<&str>> =
            lines[1..].iter().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(cells[0], ["0000:00:04.0", "1b36:0010", "nvme", "3", "0", "nvme0n1"]);
        assert_eq!(cells[1], ["0000:00:05.0", "1b36:0010", "vfio-pci", "4", "-", "-"]);
        assert_eq!(cells[2], ["0000:00:06.0", "1b36:0010", "none", "none", "-", "-"]);
        // Columns line up.
        let col = lines[0].find("DRIVER").unwrap();
        assert!(lines[1..].iter().all(|l| l[col..].starts_with(char::is_alphabetic)));
    }

    #[test]
    fn lists_as_json() {
        let t = sample();
        let v: Value = serde_json::from_str(&list(&t.0, true).unwrap()).unwrap();
        let a = v.as_array().unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(a[0]["address"], "0000:00:04.0");
        assert_eq!(a[0]["vendor"], "1b36");
        assert_eq!(a[0]["driver"], "nvme");
        assert_eq!(a[0]["iommu_group"], 3);
        assert_eq!(a[0]["block_devices"], json!(["nvme0n1"]));
        assert_eq!(a[2]["driver"], Value::Null);
        assert_eq!(a[2]["iommu_group"], Value::Null);
    }

    #[test]
    fn empty_and_missing() {
        let t = Tree::new("empty");
        assert!(list(&t.0, false).unwrap().starts_with("no NVMe controller"));
        assert_eq!(list(&t.0, true).unwrap().trim(), "[]");
        let e = list(&t.0.join("nowhere"), false).unwrap_err().to_string();
        assert!(e.contains("cannot list PCI devices") && e.contains("No such file"), "{e}");
    }

    #[test]
    fn bind_refuses_bad_addresses_and_mounted_namespaces() {
        let t = sample();
        let e = bind(&t.0, "00:04").unwrap_err().to_string();
        assert!(e.contains("not a PCI address"), "{e}");
        let e = bind(&t.0, "00:02.0").unwrap_err().to_string();
        assert!(e.contains("not an NVMe controller"), "{e}");
        t.write("sys/block/nvme0n1/dev", "259:0\n");
        t.write("proc/mounts", "/dev/nvme0n1 /data ext4 rw 0 0\n");
        let e = bind(&t.0, "00:04.0").unwrap_err().to_string();
        assert!(e.contains("/dev/nvme0n1") && e.contains("/data"), "{e}");
        assert_eq!(bind(&t.0, "0000:00:05.0").unwrap(), "0000:00:05.0: already on vfio-pci\n");
        let e = unbind(&t.0, "00:02.0").unwrap_err().to_string();
        assert!(e.contains("not an NVMe controller"), "{e}");
    }
}
