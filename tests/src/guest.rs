//! The guest test suite: runs every case of `nvaio_tests::cases` on each controller that
//! `ci/qemu-run` bound to vfio-pci, printing `ok   NAME` or `FAIL NAME: why` per test and a
//! closing `N passed, N failed` line. Exits 1 if anything failed.
//!
//! Reads from the environment (set by ci/qemu-run): `NVAIO_DEVICES` (PCI addresses), and per
//! controller i `NVAIO_DEVi_LBA`, `NVAIO_DEVi_NNS`, `NVAIO_DEVi_SIZE`, `NVAIO_DEVi_SERIAL`.
//! An optional first argument runs only the cases whose name contains it.

use nvaio_tests::cases::{run_all, Target};
use nvaio_tests::{irq_cases, mode_cases};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn main() {
    let filter = std::env::args().nth(1);
    let devices = env("NVAIO_DEVICES").unwrap_or_default();
    let (mut passed, mut failed) = (0, 0);
    if devices.split_whitespace().next().is_none() {
        println!("FAIL setup: NVAIO_DEVICES is empty: no controller is bound to vfio-pci");
        failed += 1;
    }
    for (i, bdf) in devices.split_whitespace().enumerate() {
        let prefix = format!("dev{i}/");
        match nvaio::file::controller(bdf) {
            Ok(ctrl) => {
                let t = Target {
                    ctrl,
                    expect_lba: env(&format!("NVAIO_DEV{i}_LBA")).and_then(|v| v.parse().ok()),
                    expect_namespaces: env(&format!("NVAIO_DEV{i}_NNS"))
                        .and_then(|v| v.parse().ok()),
                    expect_size: env(&format!("NVAIO_DEV{i}_SIZE")).and_then(|v| v.parse().ok()),
                    expect_serial: env(&format!("NVAIO_DEV{i}_SERIAL")),
                };
                for run in [run_all, irq_cases::run_all, mode_cases::run_all] {
                    let (p, f) = run(&prefix, &t, filter.as_deref());
                    passed += p;
                    failed += f;
                }
            }
            Err(e) => {
                println!("FAIL {prefix}open: {e}");
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
