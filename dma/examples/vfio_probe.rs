//! Opens an NVMe controller through VFIO and exercises the hardware-access layer, for checking
//! a machine (or a QEMU guest) by hand.
//!
//! ```text
//! vfio_probe BDF            open, print CAP, VS and the IOVA ranges, map 64 KiB, enable 2 MSI-X
//! vfio_probe --identify BDF enable the controller, run Identify Controller through the admin
//!                           queue (DMA through the IOMMU, completion signalled on MSI-X vector 0)
//! vfio_probe --twice BDF    open the same device twice; the second open must fail
//! vfio_probe --list         list the NVMe controllers
//! vfio_probe --mounts BDF   list mounted namespaces of a controller
//! vfio_probe --bind BDF     hand a controller to vfio-pci
//! vfio_probe --unbind BDF   give it back to the nvme driver
//! ```
//!
//! Exits 0 on success and 1 with the error (and its causes) on stderr otherwise.

use std::error::Error;
use std::os::unix::io::AsRawFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nvaio_dma::sysfs::host;
use nvaio_dma::vfio::VfioPci;
use nvaio_dma::DmaRegion;

fn probe(bdf: &str) -> Result<(), Box<dyn Error>> {
    let pci = VfioPci::open(bdf)?;
    let bar = pci.bar0();
    println!("device {} BAR0 {} bytes", pci.bdf(), bar.len());
    let cap = bar.read64(0);
    println!(
        "CAP {cap:#018x} (MQES {}, TO {}, DSTRD {})",
        (cap & 0xffff) + 1,
        (cap >> 24) & 0xff,
        (cap >> 32) & 0xf
    );
    let vs = bar.read32(8);
    println!("VS {vs:#010x} (NVMe {}.{}.{})", vs >> 16, (vs >> 8) & 0xff, vs & 0xff);
    for r in pci.iova_ranges() {
        println!("IOVA range {:#x}..{:#x}", r.start, r.end);
    }

    let region = DmaRegion::alloc(pci.dma_mapper(), 64 << 10)?;
    println!("DMA region {} bytes at IOVA {:#x}", region.len(), region.iova());
    region.write_u64(0, 0x1122_3344_5566_7788);
    assert_eq!(region.read_u64(0), 0x1122_3344_5566_7788);

    println!("MSI-X vectors {}", pci.msix_vectors());
    let fds = pci.enable_msix(2)?;
    println!("MSI-X enabled: {} eventfds", fds.len());
    // Nothing has fired: the controller is disabled, so the non-blocking reads find nothing.
    for (i, fd) in fds.iter().enumerate() {
        let pending = fd.read().is_ok();
        println!("vector {i} pending {pending}");
    }
    pci.disable_msix();
    drop(region);
    println!("ok");
    Ok(())
}

/// Waits until `cond` holds, checking every millisecond, for at most `limit`.
fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

/// A minimal bring-up, enough to prove that DMA and MSI-X work: admin queues of two entries,
/// one Identify Controller, then the controller is disabled again.
fn identify(bdf: &str) -> Result<(), Box<dyn Error>> {
    const CC: usize = 0x14;
    const CSTS: usize = 0x1c;
    const AQA: usize = 0x24;
    const ASQ: usize = 0x28;
    const ACQ: usize = 0x30;

    let pci = VfioPci::open(bdf)?;
    let bar = pci.bar0();
    let cap = bar.read64(0);
    let timeout = Duration::from_millis(500 * ((cap >> 24) & 0xff).max(1));
    let cq_doorbell = 0x1000 + (4 << ((cap >> 32) & 0xf)) as usize;

    bar.write32(CC, 0);
    if !wait_for(timeout, || bar.read32(CSTS) & 1 == 0) {
        return Err("the controller did not become not-ready".into());
    }
    let mapper = pci.dma_mapper();
    let sq = DmaRegion::alloc(mapper.clone(), 4096)?;
    let cq = DmaRegion::alloc(mapper.clone(), 4096)?;
    let data = DmaRegion::alloc(mapper, 4096)?;
    println!("SQ at IOVA {:#x}, CQ at {:#x}, data at {:#x}", sq.iova(), cq.iova(), data.iova());
    let fds = pci.enable_msix(1)?;

    bar.write32(AQA, 1 | (1 << 16));
    bar.write64(ASQ, sq.iova());
    bar.write64(ACQ, cq.iova());
    bar.write32(CC, 1 | (6 << 16) | (4 << 20));
    if !wait_for(timeout, || bar.read32(CSTS) & 3 == 1) {
        return Err(
            format!("the controller did not become ready (CSTS {:#x})", bar.read32(CSTS)).into()
        );
    }

    // Identify (opcode 6), command ID 0x1234, CNS 1 (controller), data into `data`.
    sq.write_u32(0, 0x06 | (0x1234 << 16));
    sq.write_u64(24, data.iova());
    sq.write_u32(40, 1);
    bar.write32(0x1000, 1);

    let mut pfd = libc::pollfd { fd: fds[0].as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    if n != 1 {
        return Err(format!("no MSI-X interrupt within {timeout:?} (poll returned {n})").into());
    }
    println!("MSI-X vector 0 fired ({} event)", fds[0].read()?);
    let dw3 = cq.read_u32(12);
    let (cid, phase, status) = (dw3 & 0xffff, (dw3 >> 16) & 1, dw3 >> 17);
    println!("completion: CID {cid:#x}, phase {phase}, status {status:#x}");
    if cid != 0x1234 || phase != 1 || status != 0 {
        return Err("unexpected completion".into());
    }
    bar.write32(cq_doorbell, 1);

    let mut text = [0u8; 60];
    data.read_bytes(4, &mut text);
    let serial = String::from_utf8_lossy(&text[..20]).trim().to_string();
    let model = String::from_utf8_lossy(&text[20..]).trim().to_string();
    println!("model {model:?}, serial {serial:?}, VID {:#06x}", data.read_u32(0) & 0xffff);

    bar.write32(CC, 0);
    if !wait_for(timeout, || bar.read32(CSTS) & 1 == 0) {
        return Err("the controller did not shut down".into());
    }
    // Regions may outlive the device: the mapper skips unmapping what the kernel already tore
    // down when the device closed.
    drop(fds);
    drop(pci);
    drop((sq, cq, data));
    println!("ok");
    Ok(())
}

fn twice(bdf: &str) -> Result<(), Box<dyn Error>> {
    let _first = VfioPci::open(bdf)?;
    println!("first open ok");
    match VfioPci::open(bdf) {
        Ok(_) => Err("the second open succeeded".into()),
        Err(e) => {
            report(&e);
            println!("second open refused, as it should be");
            Ok(())
        }
    }
}

fn report(e: &dyn Error) {
    eprintln!("error: {e}");
    let mut cause = e.source();
    while let Some(c) = cause {
        eprintln!("  caused by: {c}");
        cause = c.source();
    }
}

fn run(args: &[String]) -> Result<(), Box<dyn Error>> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["--list"] => {
            for f in host::list_nvme()? {
                println!(
                    "{} {:04x}:{:04x} driver={} group={} numa={} disks={}",
                    f.bdf,
                    f.vendor,
                    f.device,
                    f.driver.as_deref().unwrap_or("-"),
                    f.iommu_group.map_or("-".to_string(), |g| g.to_string()),
                    f.numa_node.map_or("-".to_string(), |n| n.to_string()),
                    f.block_devices.join(",")
                );
            }
            Ok(())
        }
        ["--mounts", bdf] => {
            for m in host::mounted_namespaces(bdf)? {
                println!("{} on {}", m.device, m.mount_point);
            }
            Ok(())
        }
        ["--bind", bdf] => Ok(host::bind_vfio(bdf)?),
        ["--unbind", bdf] => Ok(host::unbind_vfio(bdf)?),
        ["--twice", bdf] => twice(bdf),
        ["--identify", bdf] => identify(bdf),
        [bdf] if !bdf.starts_with('-') => probe(bdf),
        _ => Err("usage: vfio_probe BDF | --identify BDF | --twice BDF | --list | --mounts BDF | --bind BDF | \
                  --unbind BDF"
            .into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&*e);
            ExitCode::FAILURE
        }
    }
}
