//! `nvaio`: find NVMe controllers, hand them to vfio-pci and back, and identify, read, write and
//! benchmark them through nvaio's userspace driver and its Linux-AIO interface.
//!
//! Every failure ends the program with one line, `nvaio: <message>`, on stderr and exit status
//! 1 (a benchmark that saw I/O errors prints its report first).

// The only unsafe call is registering benchmark buffers for zero-copy I/O (bench.rs).
#![deny(unsafe_code)]

mod bench;
mod blockio;
mod error;
mod histogram;
mod identify;
mod pci;
mod target;
#[cfg(test)]
mod testdev;
mod units;

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nvaio::wait::CompletionMode;
use nvaio::Access;

use crate::error::{Context as _, Error, Result};
use crate::target::Target;

const AFTER_HELP: &str = "\
Device commands (identify, read, write, bench) open the controller through VFIO: bind it to \
vfio-pci first (nvaio bind ADDR), and run as root or with access to /dev/vfio/<group> and a \
locked-memory limit (ulimit -l) large enough for DMA buffers.

Examples:
  nvaio list
  nvaio bind 0000:01:00.0
  nvaio identify 01:00.0
  nvaio read 01:00.0 --lba 0 --count 8 --output first-4k.bin
  nvaio write 01:00.0 --lba 2048 --input image.bin
  nvaio bench 01:00.0 --rw randread --bs 4k --qd 32 --duration 10
  nvaio unbind 0000:01:00.0";

/// Userspace NVMe driver tool: list, bind, identify, read, write and benchmark NVMe controllers.
#[derive(Parser, Debug)]
#[command(name = "nvaio", version, after_help = AFTER_HELP)]
struct Cli {
    /// Log driver activity to stderr at debug level (RUST_LOG overrides)
    #[arg(short, long, global = true)]
    verbose: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List NVMe controllers: address, IDs, driver, IOMMU group, block devices
    List {
        /// Print a JSON array instead of a table
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        root: Root,
    },
    /// Hand a controller to vfio-pci so nvaio can use it
    ///
    /// Refused, changing nothing, while any of its namespaces or partitions is mounted, active
    /// swap, used by LVM, RAID or dm-crypt, or open in a process (as is the controller's
    /// /dev/nvmeN); the message names the device and the mount point or process.
    Bind {
        /// PCI address, like 0000:01:00.0 or 01:00.0
        addr: String,
        #[command(flatten)]
        root: Root,
    },
    /// Give a controller back to the kernel's nvme driver
    ///
    /// Refused while a process holds its VFIO group open.
    Unbind {
        /// PCI address, like 0000:01:00.0 or 01:00.0
        addr: String,
        #[command(flatten)]
        root: Root,
    },
    /// Print what a controller reports about itself and its namespaces
    ///
    /// Brings the controller up through VFIO (it must be bound to vfio-pci) and prints its
    /// model, serial number, firmware, version, vendor, transfer and queue limits, and every
    /// active namespace with its block size and capacity.
    Identify {
        /// PCI address of a controller bound to vfio-pci
        addr: String,
        /// Print one JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Read blocks from a namespace to a file or stdout
    Read(ReadArgs),
    /// Write a file to a namespace, then flush the write cache
    ///
    /// A regular file that does not fit from --lba to the namespace's end is refused before
    /// anything is written. Other input (stdin, a pipe, a device) is written until it ends; if
    /// the namespace ends first, everything up to its last block is written and flushed, and
    /// the command fails saying how many bytes were written.
    Write(WriteArgs),
    /// Measure IOPS, bandwidth, latency and CPU cost at a fixed queue depth
    ///
    /// Keeps --qd requests of --bs bytes in flight on one AIO context for --duration seconds
    /// (after --warmup), then reports IOPS, MiB/s and MB/s, latency percentiles in
    /// microseconds, the process's CPU time and IOPS per CPU-second, and the number of failed
    /// I/Os. Exits with status 1 if any I/O failed.
    Bench(BenchArgs),
}

/// Where sysfs and procfs are found (for tests against a fake tree).
#[derive(Args, Debug)]
struct Root {
    #[arg(long, hide = true, default_value = "/", value_name = "DIR")]
    sysfs_root: PathBuf,
}

#[derive(Args, Debug)]
struct ReadArgs {
    /// PCI address of a controller bound to vfio-pci
    addr: String,
    /// Namespace ID
    #[arg(long, default_value_t = 1, value_name = "N")]
    nsid: u32,
    /// First logical block to read
    #[arg(long, value_name = "L")]
    lba: u64,
    /// Number of logical blocks to read
    #[arg(long, value_name = "C")]
    count: u64,
    /// File to write the blocks to (default: stdout, which must not be a terminal)
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct WriteArgs {
    /// PCI address of a controller bound to vfio-pci
    addr: String,
    /// Namespace ID
    #[arg(long, default_value_t = 1, value_name = "N")]
    nsid: u32,
    /// First logical block to write
    #[arg(long, value_name = "L")]
    lba: u64,
    /// File to write, or - for stdin; whole blocks only, unless --pad is given
    #[arg(short, long, value_name = "FILE")]
    input: PathBuf,
    /// Fill the last block with zeros when the input ends inside it
    #[arg(long)]
    pad: bool,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// PCI address of a controller bound to vfio-pci
    addr: String,
    /// Namespace ID
    #[arg(long, default_value_t = 1, value_name = "N")]
    nsid: u32,
    /// Access pattern (write patterns overwrite the region's data)
    #[arg(long, value_enum, default_value = "randread")]
    rw: bench::Pattern,
    /// Bytes per I/O (k, m, g suffixes are powers of 1024); a multiple of the block size
    #[arg(long, default_value = "4k", value_parser = units::parse_nonzero_size, value_name = "SIZE")]
    bs: u64,
    /// Requests kept in flight
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=65536), value_name = "N")]
    qd: u32,
    /// Seconds to measure (fractions allowed)
    #[arg(long, default_value = "5", value_parser = units::parse_positive_secs, value_name = "SECS")]
    duration: Duration,
    /// Seconds to run before measuring (fractions allowed, 0 for none)
    #[arg(long, default_value = "0.5", value_parser = units::parse_secs, value_name = "SECS")]
    warmup: Duration,
    /// Bytes of the namespace to use, from its start (default: all of it)
    #[arg(long, value_parser = units::parse_nonzero_size, value_name = "SIZE")]
    size: Option<u64>,
    /// How completions are noticed: polled (spin), interrupt (sleep on MSI-X), hybrid (spin
    /// briefly, then sleep)
    #[arg(long, default_value = "polled", value_name = "MODE")]
    mode: CompletionMode,
    /// Run once in each mode (polled, interrupt, hybrid) and print them side by side
    #[arg(long, conflicts_with = "mode")]
    modes: bool,
    /// Register the I/O buffers with the context: data moves without bounce copies
    #[arg(long)]
    zero_copy: bool,
    /// Print one JSON object instead of text (an array of them with --modes)
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_exit(e),
    };
    init_logging(cli.verbose);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_quiet() => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("nvaio: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version go to stdout with status 0; a usage error becomes one `nvaio:` line.
fn clap_exit(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        _ => {
            eprintln!("nvaio: {}", usage_error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The first line of clap's message without its `error: ` prefix, plus where help is.
fn usage_error_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let first = rendered.lines().next().unwrap_or("invalid arguments");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    format!("{first} (see nvaio --help)")
}

fn init_logging(verbose: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(s) if !s.is_empty() => EnvFilter::new(s),
        _ => EnvFilter::new(if verbose { "debug" } else { "warn" }),
    };
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Writes to stdout; a closed pipe ends the program quietly.
fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).context("cannot write to stdout")?;
    out.flush().context("cannot write to stdout")
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::List { json, root } => emit(&pci::list(&root.sysfs_root, json)?),
        Command::Bind { addr, root } => emit(&pci::bind(&root.sysfs_root, &addr)?),
        Command::Unbind { addr, root } => emit(&pci::unbind(&root.sysfs_root, &addr)?),
        Command::Identify { addr, json } => {
            let (bdf, ctrl) = target::controller(&addr)?;
            if json {
                emit(&format!("{:#}\n", identify::json(&bdf, &ctrl)))
            } else {
                emit(&identify::text(&bdf, &ctrl))
            }
        }
        Command::Read(a) => read(a),
        Command::Write(a) => write(a),
        Command::Bench(a) => bench(a),
    }
}

fn read(a: ReadArgs) -> Result<()> {
    let mut file;
    let mut stdout;
    let (out, name): (&mut dyn Write, String) = match &a.output {
        Some(path) if path != Path::new("-") => {
            file =
                File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
            (&mut file, path.display().to_string())
        }
        _ => {
            stdout = std::io::stdout().lock();
            if stdout.is_terminal() {
                return Err(Error::msg(
                    "not writing binary blocks to a terminal: give --output FILE or redirect stdout",
                ));
            }
            (&mut stdout, "stdout".to_string())
        }
    };
    let t = Target::open(&a.addr, a.nsid, Access::ReadOnly)?;
    let bytes = blockio::read(&t, a.lba, a.count, out, &name)?;
    if a.output.is_some() && name != "stdout" {
        eprintln!(
            "read {} block{} ({bytes} bytes) from LBA {} of {} nsid {} to {name}",
            a.count,
            if a.count == 1 { "" } else { "s" },
            a.lba,
            t.name,
            a.nsid
        );
    }
    Ok(())
}

fn write(a: WriteArgs) -> Result<()> {
    let mut file;
    let mut stdin;
    let (input, name, len): (&mut dyn Read, String, Option<u64>) = if a.input == Path::new("-") {
        stdin = std::io::stdin().lock();
        (&mut stdin, "stdin".to_string(), None)
    } else {
        let name = a.input.display().to_string();
        file = File::open(&a.input).with_context(|| format!("cannot open {name}"))?;
        let meta = file.metadata().with_context(|| format!("cannot stat {name}"))?;
        // Only a regular file's length is known in advance (not a pipe's or a device's).
        let len = meta.is_file().then_some(meta.len());
        (&mut file, name, len)
    };
    let t = Target::open(&a.addr, a.nsid, Access::WriteOnly)?;
    let w = blockio::write(&t, a.lba, input, &name, len, a.pad)?;
    let padded = w.blocks * t.block_size() - w.input_bytes;
    emit(&format!(
        "wrote {} block{} ({} bytes{}) from {name} to LBA {} of {} nsid {}, flushed\n",
        w.blocks,
        if w.blocks == 1 { "" } else { "s" },
        w.input_bytes,
        if padded > 0 { format!(" + {padded} zeros") } else { String::new() },
        a.lba,
        t.name,
        a.nsid
    ))
}

fn bench(a: BenchArgs) -> Result<()> {
    let params = bench::Params {
        pattern: a.rw,
        bs: a.bs,
        qd: a.qd,
        duration: a.duration,
        warmup: a.warmup,
        size: a.size,
        mode: a.mode,
        zero_copy: a.zero_copy,
    };
    let access = if a.rw.is_write() { Access::ReadWrite } else { Access::ReadOnly };
    let t = Target::open(&a.addr, a.nsid, access)?;
    let header = bench::describe(&t, &params)?;
    if !a.json {
        emit(&format!("{header}\n"))?;
    }
    let modes: Vec<CompletionMode> =
        if a.modes { CompletionMode::ALL.to_vec() } else { vec![a.mode] };
    let mut reports = Vec::new();
    for mode in modes {
        let report = bench::run(&t, &bench::Params { mode, ..params.clone() })?;
        if !a.json && !a.modes {
            emit(&report.text())?;
        }
        reports.push(report);
    }
    if a.json {
        let v: Vec<_> = reports.iter().map(|r| r.json()).collect();
        let out = if a.modes { serde_json::Value::Array(v) } else { v[0].clone() };
        emit(&format!("{out}\n"))?;
    } else if a.modes {
        emit(&bench::side_by_side(&reports))?;
    }
    let errors: u64 = reports.iter().map(|r| r.errors).sum();
    if errors > 0 {
        let first = reports.iter().find_map(|r| r.first_error_text()).unwrap_or_default();
        return Err(Error::msg(format!(
            "{errors} I/O error{} during the benchmark (first: {first})",
            if errors == 1 { "" } else { "s" },
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("nvaio").chain(args.iter().copied()))
    }

    #[test]
    fn bench_defaults_and_suffixes() {
        let Command::Bench(b) = parse(&["bench", "00:04.0"]).unwrap().command else { panic!() };
        assert_eq!((b.nsid, b.rw, b.bs, b.qd), (1, bench::Pattern::Randread, 4096, 32));
        assert_eq!(
            (b.duration, b.warmup, b.size, b.json),
            (Duration::from_secs(5), Duration::from_millis(500), None, false)
        );

        let Command::Bench(b) = parse(&[
            "-v",
            "bench",
            "00:04.0",
            "--rw",
            "write",
            "--bs",
            "1m",
            "--qd",
            "4",
            "--duration",
            "0.25",
            "--warmup",
            "0",
            "--size",
            "2G",
            "--json",
            "--nsid",
            "2",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!((b.nsid, b.rw, b.bs, b.qd), (2, bench::Pattern::Write, 1 << 20, 4));
        assert_eq!(
            (b.duration, b.warmup, b.size, b.json),
            (Duration::from_millis(250), Duration::ZERO, Some(2 << 30), true)
        );
    }

    #[test]
    fn bad_arguments_are_one_line_errors() {
        for args in [
            &["bench", "x", "--bs", "4q"][..],
            &["bench", "x", "--bs", "0"],
            &["bench", "x", "--qd", "0"],
            &["bench", "x", "--duration", "0"],
            &["bench", "x", "--duration", "-1"],
            &["bench", "x", "--rw", "trim"],
            &["read", "x", "--lba", "1"],
            &["read", "x", "--lba", "-1", "--count", "1"],
            &["frobnicate"],
        ] {
            let e = parse(args).unwrap_err();
            let line = usage_error_line(&e);
            assert!(!line.contains('\n') && !line.starts_with("error"), "{args:?}: {line}");
        }
        let e = parse(&["bench", "x", "--bs", "4q"]).unwrap_err();
        assert!(usage_error_line(&e).contains("unknown suffix"), "{}", usage_error_line(&e));
    }

    #[test]
    fn read_write_defaults() {
        let Command::Read(r) =
            parse(&["read", "0000:00:04.0", "--lba", "7", "--count", "2"]).unwrap().command
        else {
            panic!()
        };
        assert_eq!((r.nsid, r.lba, r.count, r.output), (1, 7, 2, None));
        let Command::Write(w) =
            parse(&["write", "00:04.0", "--lba", "0", "-i", "-", "--pad"]).unwrap().command
        else {
            panic!()
        };
        assert_eq!((w.nsid, w.input, w.pad), (1, PathBuf::from("-"), true));
        assert!(parse(&["write", "00:04.0", "--lba", "0"]).is_err());
    }
}
