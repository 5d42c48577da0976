//! Physical Region Page entries (Base Specification 2.0, §4.1.1, figures 87 and 88).
//!
//! A transfer is described by the pages it touches. PRP1 points at the first byte, which may
//! sit at any dword-aligned offset in its page; every later page starts at offset 0. Two pages
//! fit in PRP1 and PRP2; more need a PRP list, whose IOVA goes in PRP2.
//!
//! nvaio never chains list pages: it caps each command at [`MAX_COMMAND_BYTES`], so one list
//! page (512 entries) always suffices. That cap is a choice, not a limit of the spec.

use nvaio_dma::PAGE_SIZE;

/// Entries in one PRP list page.
pub const PRP_LIST_ENTRIES: usize = PAGE_SIZE / 8;

/// The largest transfer nvaio puts in one command, whatever MDTS allows: 1 MiB spans at most
/// 257 pages with an offset, which keeps the PRP list to a single page.
pub const MAX_COMMAND_BYTES: usize = 1 << 20;

/// Number of memory pages a transfer of `len` bytes starting at `offset` in its first page
/// touches.
pub fn pages_spanned(offset: usize, len: usize) -> usize {
    (offset % PAGE_SIZE + len).div_ceil(PAGE_SIZE)
}

/// Whether a transfer over that many pages needs a PRP list.
pub fn needs_list(pages: usize) -> bool {
    pages > 2
}

/// Why a PRP description could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrpError {
    #[error("PRP offset {0:#x} is not dword aligned")]
    Unaligned(usize),
    #[error("a transfer over {0} pages needs more than one PRP list page")]
    TooLong(usize),
    #[error("a page address {0:#x} is not page aligned")]
    PageUnaligned(u64),
    #[error("the transfer needs a PRP list but none was given")]
    NoList,
}

/// Fills PRP1 and PRP2 for a transfer of `len` bytes whose first byte is at `offset` within
/// `pages[0]`, and `pages[1..]` follow. `pages` holds page-aligned IOVAs, one per page spanned.
/// When a list is needed, its entries are handed to `write_list(index, iova)` and `list_iova`
/// (the IOVA of a page-aligned list page) goes in PRP2.
pub fn build(
    pages: &[u64],
    offset: usize,
    len: usize,
    list_iova: Option<u64>,
    mut write_list: impl FnMut(usize, u64),
) -> Result<(u64, u64), PrpError> {
    if !offset.is_multiple_of(4) || offset >= PAGE_SIZE {
        return Err(PrpError::Unaligned(offset));
    }
    let n = pages_spanned(offset, len).max(1);
    if pages.len() < n {
        return Err(PrpError::TooLong(n));
    }
    if let Some(&bad) = pages[..n].iter().find(|&&p| p % PAGE_SIZE as u64 != 0) {
        return Err(PrpError::PageUnaligned(bad));
    }
    let prp1 = pages[0] + offset as u64;
    match n {
        1 => Ok((prp1, 0)),
        2 => Ok((prp1, pages[1])),
        _ => {
            if n - 1 > PRP_LIST_ENTRIES {
                return Err(PrpError::TooLong(n));
            }
            let list = list_iova.ok_or(PrpError::NoList)?;
            if list % PAGE_SIZE as u64 != 0 {
                return Err(PrpError::PageUnaligned(list));
            }
            for (i, &p) in pages[1..n].iter().enumerate() {
                write_list(i, p);
            }
            Ok((prp1, list))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE as u64;

    #[test]
    fn spans() {
        assert_eq!(pages_spanned(0, 4096), 1);
        assert_eq!(pages_spanned(0, 4097), 2);
        assert_eq!(pages_spanned(4092, 8), 2);
        assert_eq!(pages_spanned(512, 8192), 3);
        assert_eq!(pages_spanned(0, 1 << 20), 256);
        assert_eq!(pages_spanned(4, 1 << 20), 257);
        assert!(pages_spanned(4, MAX_COMMAND_BYTES) - 1 <= PRP_LIST_ENTRIES);
    }

    #[test]
    fn one_and_two_pages() {
        let none = |_: usize, _: u64| panic!("no list expected");
        assert_eq!(build(&[10 * P], 0, 4096, None, none), Ok((10 * P, 0)));
        assert_eq!(build(&[10 * P], 512, 512, None, none), Ok((10 * P + 512, 0)));
        assert_eq!(build(&[10 * P, 20 * P], 512, 4096, None, none), Ok((10 * P + 512, 20 * P)));
        assert_eq!(build(&[10 * P], 2, 4, None, none), Err(PrpError::Unaligned(2)));
        assert_eq!(
            build(&[10 * P + 8], 0, 4, None, none),
            Err(PrpError::PageUnaligned(10 * P + 8))
        );
    }

    #[test]
    fn list() {
        let pages: Vec<u64> = (1..=5).map(|i| i * 100 * P).collect();
        let mut seen = Vec::new();
        let r = build(&pages, 8, 4 * 4096, Some(7 * P), |i, p| seen.push((i, p)));
        assert_eq!(r, Ok((100 * P + 8, 7 * P)));
        assert_eq!(seen, vec![(0, 200 * P), (1, 300 * P), (2, 400 * P), (3, 500 * P)]);
        assert_eq!(build(&pages, 0, 3 * 4096, None, |_, _| {}), Err(PrpError::NoList));
        assert_eq!(build(&pages[..2], 0, 3 * 4096, Some(P), |_, _| {}), Err(PrpError::TooLong(3)));
    }
}
