//! `nvaio read` and `nvaio write`: moving blocks between a namespace and a file through the AIO
//! interface, one chunk at a time.

use std::io::{self, Read, Write};

use nvaio::{Context, IoEvent, Iocb};

use crate::error::{Context as _, Error, Result};
use crate::target::{check_event, AlignedBuf, Target, EVENT_WAIT};

/// Bytes per request (rounded down to whole blocks, at least one block).
pub const CHUNK: u64 = 1 << 20;

fn chunk_blocks(block_size: u64) -> u64 {
    (CHUNK / block_size).max(1)
}

/// Submits one iocb and waits, bounded, for its event.
fn transfer(
    ctx: &mut Context,
    iocb: &Iocb,
    expected: u64,
    what: &str,
    lba: u64,
    blocks: u64,
) -> Result<()> {
    // SAFETY: the callers declare the buffer before the context, so even when this returns
    // early (a failed or late event) the context is dropped first, waiting for the request.
    #[allow(unsafe_code)]
    unsafe { ctx.submit(&[iocb]) }
        .map_err(|e| Error::msg(format!("cannot submit the {what} of LBA {lba}: {e}")))?;
    let mut ev = [IoEvent::default()];
    let got = ctx
        .get_events(1, &mut ev, Some(EVENT_WAIT))
        .map_err(|e| Error::msg(format!("waiting for the {what} of LBA {lba}: {e}")))?;
    if got == 0 {
        return Err(Error::msg(format!(
            "the {what} of LBA {lba} did not complete within {} s",
            EVENT_WAIT.as_secs()
        )));
    }
    check_event(&ev[0], expected, what, lba, blocks)
}

/// Checks that `count` blocks from `lba` lie inside the namespace.
fn check_range(t: &Target, lba: u64, count: u64) -> Result<()> {
    let inside = matches!(lba.checked_add(count), Some(end) if end <= t.ns.blocks);
    if !inside {
        return Err(Error::msg(format!(
            "LBA {lba} + {count} block{} runs past the end of namespace {} ({} blocks of {} bytes, \
             last LBA {})",
            if count == 1 { "" } else { "s" },
            t.ns.nsid,
            t.ns.blocks,
            t.ns.block_size,
            t.ns.blocks.saturating_sub(1)
        )));
    }
    Ok(())
}

/// Reads `count` blocks from `lba` into `out`; returns the bytes read.
pub fn read(t: &Target, lba: u64, count: u64, out: &mut dyn Write, out_name: &str) -> Result<u64> {
    if count == 0 {
        return Err(Error::msg("--count must be at least 1 block"));
    }
    check_range(t, lba, count)?;
    let bs = t.block_size();
    let per = chunk_blocks(bs).min(count);
    // Declared before the context so it is dropped after it: the context's drop waits for
    // anything still in flight, which may be writing into this buffer.
    let mut buf = AlignedBuf::new((per * bs) as usize, 4096)?;
    let mut ctx = Context::setup(1).map_err(|e| Error::msg(format!("io_setup: {e}")))?;
    let mut done = 0;
    while done < count {
        let blocks = per.min(count - done);
        let at = lba + done;
        let len = blocks * bs;
        let iocb = Iocb::pread(t.fd, buf.ptr(), len as usize, (at * bs) as i64);
        transfer(&mut ctx, &iocb, len, "read", at, blocks)?;
        out.write_all(&buf.as_slice()[..len as usize])
            .with_context(|| format!("cannot write to {out_name}"))?;
        done += blocks;
    }
    out.flush().with_context(|| format!("cannot write to {out_name}"))?;
    ctx.destroy();
    Ok(count * bs)
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn fill(input: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn not_whole_blocks(name: &str, len: u64, bs: u64) -> Error {
    Error::msg(format!(
        "{name} is {len} bytes, not a multiple of the {bs}-byte block size: pad it to whole \
         blocks, or pass --pad to fill the last block with zeros"
    ))
}

/// What [`write`] did.
#[derive(Debug, PartialEq, Eq)]
pub struct Written {
    /// Bytes taken from the input.
    pub input_bytes: u64,
    /// Blocks written (the last one zero-padded if the input ended inside it).
    pub blocks: u64,
}

/// Writes `input` to the namespace from `lba` on, then flushes the controller's write cache.
///
/// The input must be whole blocks unless `pad` is set, in which case the last partial block is
/// completed with zeros. `len` is the input's size when known up front (a regular file): the
/// range and the block multiple are then checked before anything is written. Otherwise (a pipe,
/// a device) they are checked chunk by chunk: an input longer than the rest of the namespace is
/// written up to the namespace's last block, flushed, and then reported as an error that says
/// how much was written; any other error after earlier chunks were written also flushes those
/// first and says so.
pub fn write(
    t: &Target,
    lba: u64,
    input: &mut dyn Read,
    name: &str,
    len: Option<u64>,
    pad: bool,
) -> Result<Written> {
    let bs = t.block_size();
    match len {
        Some(len) => {
            if len == 0 {
                return Err(Error::msg(format!("{name} is empty: nothing to write")));
            }
            if !len.is_multiple_of(bs) && !pad {
                return Err(not_whole_blocks(name, len, bs));
            }
            check_range(t, lba, len.div_ceil(bs))?;
        }
        // At least the first block must be inside, whatever the input's length.
        None => check_range(t, lba, 1)?,
    }
    let per = chunk_blocks(bs);
    // Declared before the context so it is dropped after it (see `read`).
    let mut buf = AlignedBuf::new((per * bs) as usize, 4096)?;
    let mut ctx = Context::setup(1).map_err(|e| Error::msg(format!("io_setup: {e}")))?;
    let mut w = Written { input_bytes: 0, blocks: 0 };
    let outcome = write_chunks(t, lba, input, name, pad, &mut buf, &mut ctx, &mut w);
    if w.blocks == 0 {
        // Nothing reached the namespace: no flush needed.
        outcome?;
        return Err(Error::msg(format!("{name} is empty: nothing to write")));
    }
    // Make the data durable: without this it may sit in a volatile write cache. Done whatever
    // stopped the loop, so what was written is never left unflushed.
    let flush = transfer(&mut ctx, &Iocb::fsync(t.fd), 0, "flush", lba, w.blocks);
    let blocks = plural(w.blocks, "block");
    match (outcome, flush) {
        (Ok(Fit::All), Ok(())) => {
            ctx.destroy();
            Ok(w)
        }
        (Ok(Fit::All), Err(f)) => Err(f),
        (Ok(Fit::TooLong), flushed) => Err(Error::msg(format!(
            "{name} is longer than namespace {nsid}: wrote its first {bytes} bytes ({blocks}, LBA \
             {lba} to {last}, the namespace's end){how}; the rest of {name} was not written",
            nsid = t.ns.nsid,
            bytes = w.blocks * bs,
            last = lba + w.blocks - 1,
            how = match flushed {
                Ok(()) => " and flushed them".to_string(),
                Err(f) => format!(", but then {f}"),
            },
        ))),
        (Err(e), flushed) => Err(Error::msg(format!(
            "{e} ({blocks} from LBA {lba} were written before that{how})",
            how = match flushed {
                Ok(()) => ", and flushed".to_string(),
                Err(f) => format!("; then {f}"),
            },
        ))),
    }
}

/// Whether the input fitted in the namespace.
enum Fit {
    All,
    /// The namespace ended before the input: written up to its last block.
    TooLong,
}

fn plural(n: u64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// The loop of [`write`]: fills the buffer from `input` and writes it, chunk after chunk, counting
/// into `w` what reached the namespace. Stops at the end of the input, or at the end of the
/// namespace (writing as much as fits first).
#[allow(clippy::too_many_arguments)]
fn write_chunks(
    t: &Target,
    lba: u64,
    input: &mut dyn Read,
    name: &str,
    pad: bool,
    buf: &mut AlignedBuf,
    ctx: &mut Context,
    w: &mut Written,
) -> Result<Fit> {
    let bs = t.block_size();
    let chunk = buf.as_slice().len();
    let mut read_total = 0u64;
    loop {
        let n = fill(input, buf.as_mut_slice()).with_context(|| format!("cannot read {name}"))?;
        if n == 0 {
            return Ok(Fit::All);
        }
        read_total += n as u64;
        let at = lba + w.blocks;
        // Checked before the block multiple: a pipe longer than the namespace is "too long"
        // whether or not its last piece is a whole block.
        let room = t.ns.blocks.saturating_sub(at);
        let mut len = n as u64;
        if len.div_ceil(bs) > room {
            if room > 0 {
                let fit = room * bs;
                let iocb = Iocb::pwrite(t.fd, buf.ptr(), fit as usize, (at * bs) as i64);
                transfer(ctx, &iocb, fit, "write", at, room)?;
                w.blocks += room;
                w.input_bytes += fit;
            }
            return Ok(Fit::TooLong);
        }
        if !len.is_multiple_of(bs) {
            if !pad {
                return Err(not_whole_blocks(name, read_total, bs));
            }
            let padded = len.next_multiple_of(bs);
            buf.as_mut_slice()[n..padded as usize].fill(0);
            len = padded;
        }
        let blocks = len / bs;
        let iocb = Iocb::pwrite(t.fd, buf.ptr(), len as usize, (at * bs) as i64);
        transfer(ctx, &iocb, len, "write", at, blocks)?;
        w.blocks += blocks;
        w.input_bytes += n as u64;
        if n < chunk {
            // A short fill means the input ended (fill only stops early at end of input).
            return Ok(Fit::All);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdev;
    use nvaio::Access;
    use nvaio_nvme::emu::{FaultAction, FaultRule};
    use nvaio_nvme::spec::status::{media, sct};
    use nvaio_nvme::spec::Status;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn write_then_read_back() {
        let (emu, ctrl) = testdev::controller(testdev::config());
        let t = Target::on(ctrl, "emu", 1, Access::ReadWrite).unwrap();
        // 2.5 chunks, so the last request is partial.
        let data = pattern((CHUNK * 5 / 2) as usize, 3);
        let w = write(&t, 100, &mut &data[..], "in", Some(data.len() as u64), false).unwrap();
        assert_eq!(w, Written { input_bytes: data.len() as u64, blocks: data.len() as u64 / 512 });
        assert_eq!(emu.namespace_read(1, 100 * 512, data.len()), data);

        let mut out = Vec::new();
        let n = read(&t, 100, w.blocks, &mut out, "out").unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(out, data);

        // One block at the very end is fine, one more is not.
        let last = t.ns.blocks - 1;
        read(&t, last, 1, &mut Vec::new(), "out").unwrap();
        let e = read(&t, last, 2, &mut Vec::new(), "out").unwrap_err().to_string();
        assert!(e.contains("runs past the end") && e.contains(&format!("last LBA {last}")), "{e}");
        assert!(read(&t, u64::MAX, 2, &mut Vec::new(), "out").is_err());
        assert!(read(&t, 0, 0, &mut Vec::new(), "out")
            .unwrap_err()
            .to_string()
            .contains("--count"));
    }

    #[test]
    fn partial_blocks_need_pad() {
        let (emu, ctrl) = testdev::controller(testdev::config());
        let t = Target::on(ctrl, "emu", 1, Access::ReadWrite).unwrap();
        emu.namespace_write(1, 0, &[0xff; 1024]);
        let data = pattern(700, 9);
        // Known length: refused before anything is written.
        let e = write(&t, 0, &mut &data[..], "in.bin", Some(700), false).unwrap_err().to_string();
        assert!(e.contains("in.bin is 700 bytes") && e.contains("--pad"), "{e}");
        assert_eq!(emu.namespace_read(1, 0, 1024), vec![0xff; 1024]);
        // Unknown length (a pipe): refused when the short chunk shows up.
        let e = write(&t, 0, &mut &data[..], "stdin", None, false).unwrap_err().to_string();
        assert!(e.contains("stdin is 700 bytes"), "{e}");
        // Padded: the rest of block 1 becomes zeros.
        let w = write(&t, 0, &mut &data[..], "stdin", None, true).unwrap();
        assert_eq!(w, Written { input_bytes: 700, blocks: 2 });
        let got = emu.namespace_read(1, 0, 1024);
        assert_eq!(&got[..700], &data[..]);
        assert!(got[700..].iter().all(|&b| b == 0));

        let e = write(&t, 0, &mut &[][..], "empty", None, false).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let end = t.ns.blocks - 1;
        let e = write(&t, end, &mut &data[..], "in", Some(700), true).unwrap_err().to_string();
        assert!(e.contains("runs past the end"), "{e}");
    }

    #[test]
    fn unknown_length_input_longer_than_the_namespace() {
        use nvaio_nvme::spec::cmd::nvm;
        let (emu, ctrl) = testdev::controller(testdev::config());
        let t = Target::on(ctrl, "emu", 1, Access::ReadWrite).unwrap();
        let blocks = t.ns.blocks;
        // 3000 blocks before the end: not a multiple of the chunk, so the last request is cut.
        let lba = blocks - 3000;
        emu.namespace_write(1, (lba - 1) * 512, &[0x11; 512]);
        let flushes = emu.stats().io(nvm::FLUSH);
        let e = write(&t, lba, &mut io::repeat(0xab), "/dev/zero", None, false)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "/dev/zero is longer than namespace 1: wrote its first {} bytes (3000 blocks, \
                 LBA {lba} to {}, the namespace's end) and flushed them; the rest of /dev/zero \
                 was not written",
                3000 * 512,
                blocks - 1
            )
        );
        assert_eq!(emu.stats().io(nvm::FLUSH), flushes + 1, "what was written is flushed");
        assert!(emu.namespace_read(1, lba * 512, 3000 * 512).iter().all(|&b| b == 0xab));
        assert_eq!(emu.namespace_read(1, (lba - 1) * 512, 512), vec![0x11; 512]);

        // Exactly as long as the rest of the namespace (a whole number of chunks): no error.
        let lba = blocks - 2 * chunk_blocks(512);
        let data = pattern((blocks - lba) as usize * 512, 5);
        let w = write(&t, lba, &mut &data[..], "stdin", None, false).unwrap();
        assert_eq!(w, Written { input_bytes: data.len() as u64, blocks: blocks - lba });
        assert_eq!(emu.namespace_read(1, lba * 512, data.len()), data);
        // One block more than fits, unpadded and partial: still "longer", the fitting part written.
        let mut more = data.clone();
        more.extend_from_slice(&[1; 100]);
        let e = write(&t, lba, &mut &more[..], "stdin", None, false).unwrap_err().to_string();
        assert!(e.starts_with("stdin is longer than namespace 1"), "{e}");
        // Starting on the last block, and past it.
        let e = write(&t, blocks - 1, &mut io::repeat(0), "p", None, false).unwrap_err();
        assert!(e.to_string().contains("wrote its first 512 bytes (1 block,"), "{e}");
        let e = write(&t, blocks, &mut io::repeat(0), "p", None, false).unwrap_err().to_string();
        assert!(e.contains("runs past the end"), "{e}");

        // Another error after earlier chunks were written: those are flushed, and it says so.
        let flushes = emu.stats().io(nvm::FLUSH);
        let odd = pattern(CHUNK as usize + 700, 1);
        let e = write(&t, 0, &mut &odd[..], "stdin", None, false).unwrap_err().to_string();
        assert!(e.starts_with(&format!("stdin is {} bytes", odd.len())), "{e}");
        assert!(
            e.ends_with("(2048 blocks from LBA 0 were written before that, and flushed)"),
            "{e}"
        );
        assert_eq!(emu.stats().io(nvm::FLUSH), flushes + 1);
    }

    #[test]
    fn device_errors_name_the_lba_and_errno() {
        let (emu, ctrl) = testdev::controller(testdev::config());
        let t = Target::on(ctrl, "emu", 1, Access::ReadWrite).unwrap();
        // An unrecovered read error on LBA 3000: the AIO layer reports it as ENODATA.
        let status = Status::new(sct::MEDIA, media::UNRECOVERED_READ_ERROR).with_dnr();
        emu.inject(FaultRule::new(FaultAction::Fail(status)).lbas(3000..3001));
        let per = chunk_blocks(512);
        let e = read(&t, 2048, 4096, &mut Vec::new(), "out").unwrap_err().to_string();
        let nodata = std::io::Error::from_raw_os_error(libc::ENODATA);
        assert_eq!(e, format!("read of {per} blocks at LBA 2048 failed: {nodata}"));
        let mut out = Vec::new();
        read(&t, 0, 2048, &mut out, "out").unwrap();
        assert_eq!(out.len(), 2048 * 512);
    }
}
