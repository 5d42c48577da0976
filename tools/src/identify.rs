//! `nvaio identify`: what the controller and its namespaces say about themselves.

use std::fmt::Write as _;

use nvaio_nvme::{Controller, Namespace};
use serde_json::{json, Value};

use crate::units::human_bytes;

/// MDTS in bytes: 2^mdts pages of the controller's minimum page size; `None` means no limit.
pub fn mdts_bytes(ctrl: &Controller) -> Option<u64> {
    let mdts = ctrl.identify().mdts;
    let page = 4096u64 << ctrl.cap().mpsmin();
    (mdts != 0).then(|| page.checked_shl(u32::from(mdts)).unwrap_or(u64::MAX))
}

/// A namespace's size for people: MiB below a GiB, GiB from there.
fn ns_size(ns: &Namespace) -> String {
    let bytes = ns.size_bytes();
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

pub fn text(addr: &str, ctrl: &Controller) -> String {
    let id = ctrl.identify();
    let mut o = String::new();
    let mut field = |name: &str, value: &dyn std::fmt::Display| {
        let _ = writeln!(o, "{:<19}{value}", format!("{name}:"));
    };
    field("model", &id.model);
    field("serial", &id.serial);
    field("firmware", &id.firmware);
    field("address", &addr);
    field("version", &ctrl.version());
    field("vendor id", &format_args!("{:#06x} (subsystem {:#06x})", id.vid, id.ssvid));
    field("controller id", &id.cntlid);
    let mdts = match mdts_bytes(ctrl) {
        Some(b) => format!("{} ({} per command)", id.mdts, human_bytes(b)),
        None => "0 (no limit)".to_string(),
    };
    field("mdts", &mdts);
    field(
        "max transfer",
        &format_args!("{} bytes per command as nvaio uses it", ctrl.max_transfer()),
    );
    field("namespaces", &format_args!("{} (nn), {} active", id.nn, ctrl.namespaces().len()));
    field("io queues granted", &ctrl.io_queues_granted());
    field("max queue entries", &ctrl.max_queue_entries());
    field("write cache", &if id.vwc & 1 != 0 { "present" } else { "none" });
    field("oncs", &format_args!("{:#06x}", id.oncs));
    for ns in ctrl.namespaces() {
        let _ = writeln!(
            o,
            "namespace {}: block size {}, blocks {}, size {}",
            ns.nsid,
            ns.block_size,
            ns.blocks,
            ns_size(ns)
        );
    }
    o
}

pub fn json(addr: &str, ctrl: &Controller) -> Value {
    let id = ctrl.identify();
    let namespaces: Vec<Value> = ctrl
        .namespaces()
        .iter()
        .map(|ns| {
            json!({
                "nsid": ns.nsid,
                "block_size": ns.block_size,
                "blocks": ns.blocks,
                "size_bytes": ns.size_bytes(),
            })
        })
        .collect();
    json!({
        "address": addr,
        "model": id.model,
        "serial": id.serial,
        "firmware": id.firmware,
        "version": ctrl.version().to_string(),
        "vendor_id": id.vid,
        "subsystem_vendor_id": id.ssvid,
        "controller_id": id.cntlid,
        "mdts": id.mdts,
        "mdts_bytes": mdts_bytes(ctrl),
        "max_transfer_bytes": ctrl.max_transfer(),
        "nn": id.nn,
        "io_queues_granted": ctrl.io_queues_granted(),
        "max_queue_entries": ctrl.max_queue_entries(),
        "volatile_write_cache": id.vwc & 1 != 0,
        "oncs": id.oncs,
        "subnqn": id.subnqn,
        "namespaces": namespaces,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdev;

    #[test]
    fn describes_an_emulated_controller() {
        let (_emu, ctrl) = testdev::controller(testdev::config());
        let t = text("emu", &ctrl);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], format!("{:<19}{}", "model:", testdev::MODEL));
        assert!(lines[1].starts_with("serial:") && lines[1].ends_with(testdev::SERIAL));
        assert!(t.contains("version:           1.4.0"), "{t}");
        // mdts 5 with 4 KiB pages: 128 KiB.
        assert!(t.contains("mdts:              5 (128 KiB per command)"), "{t}");
        assert!(t.contains("max transfer:      131072 bytes"), "{t}");
        assert!(t.contains("namespace 1: block size 512, blocks 131072, size 64.0 MiB"), "{t}");
        assert!(t.contains("namespace 2: block size 4096, blocks 262144, size 1.00 GiB"), "{t}");

        let j = json("emu", &ctrl);
        assert_eq!(j["model"], testdev::MODEL);
        assert_eq!(j["mdts_bytes"], 131072);
        assert_eq!(j["namespaces"][1]["nsid"], 2);
        assert_eq!(j["namespaces"][1]["size_bytes"], 1u64 << 30);
    }
}
