//! nvaio-conformance: the differential conformance suite (see `nvaio_tests::conformance`).
//!
//! Runs in a ci/qemu-run guest with one controller on the kernel's nvme driver and one, configured
//! the same way, bound to vfio-pci:
//!
//! ```text
//! ci/qemu-run --nvme driver=kernel,serial=k0 --nvme driver=vfio,serial=v0 -- nvaio-conformance
//! ```
//!
//! Uses namespace 1 of the first of each (`NVAIO_KDEV0_BLOCK`, `NVAIO_DEVICES`), and runs nvaio
//! twice on the vfio one: through its C ABI and through its Rust API. Arguments: `-v` prints
//! every step's outcome on every side; any other argument runs only the cases whose name contains
//! it. Prints one line per case, then `conformance: ...` (totals, then how much of the table each
//! nvaio backend could express) and `N passed, N failed`; exits 1 if any difference is
//! unexplained or any case could not be compared.

use nvaio_tests::conformance::{run_suite, Backend, CAbi, KernelAio, RustApi};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn fail(why: String) -> ! {
    println!("FAIL conf/setup: {why}");
    println!("conformance: 0 cases, 0 differ on purpose, 1 unexplained, 0 not compared");
    println!("0 passed, 1 failed");
    std::process::exit(1);
}

fn main() {
    let mut filter = None;
    let mut verbose = false;
    for a in std::env::args().skip(1) {
        if a == "-v" {
            verbose = true;
        } else {
            filter = Some(a);
        }
    }
    let Some(block) =
        env("NVAIO_KDEV0_BLOCK").and_then(|b| b.split_whitespace().next().map(String::from))
    else {
        fail("NVAIO_KDEV0_BLOCK is empty: no controller is left on the kernel's nvme driver".into())
    };
    let Some(bdf) =
        env("NVAIO_DEVICES").and_then(|b| b.split_whitespace().next().map(String::from))
    else {
        fail("NVAIO_DEVICES is empty: no controller is bound to vfio-pci".into())
    };

    // The kernel hands out AIO request slots per CPU; one CPU makes its answers repeatable.
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread (inherited by later ones).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }

    let mut kernel = KernelAio::open(&block).unwrap_or_else(|e| fail(e));
    // Both nvaio backends share the controller: nvaio_open finds the one brought up here.
    let ctrl = nvaio::file::controller(&bdf).unwrap_or_else(|e| fail(format!("{bdf}: {e}")));
    let mut c_abi = CAbi::open(&bdf).unwrap_or_else(|e| fail(format!("{bdf}: {e}")));
    let mut rust_api = RustApi::open(ctrl).unwrap_or_else(|e| fail(e));
    let (kg, ng) = (kernel.geometry(), c_abi.geometry());
    if kg != ng || rust_api.geometry() != ng {
        fail(format!(
            "the two namespaces differ: {} has {} B blocks and {} B, {bdf} nsid 1 has {} B blocks and {} B",
            kernel.path(),
            kg.0,
            kg.1,
            ng.0,
            ng.1
        ));
    }
    let cpus = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    println!(
        "conformance: kernel AIO on {} vs nvaio on {bdf} nsid 1: {} B blocks, {} B; possible CPUs {}",
        kernel.path(),
        kg.0,
        kg.1,
        cpus.trim()
    );
    let sum = run_suite(&mut kernel, &mut [&mut c_abi, &mut rust_api], filter.as_deref(), verbose);
    drop(rust_api);
    drop(c_abi);
    drop(kernel);
    std::process::exit(if sum.unexplained == 0 && sum.not_compared == 0 { 0 } else { 1 });
}
