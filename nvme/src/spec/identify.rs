//! Identify data structures (Base Specification 2.0, §5.17.2; NVM Command Set 1.0, §4.1.5).
//!
//! Both pages are 4096 bytes. They are parsed from a byte copy with explicit offsets, so a
//! device that fills them with garbage yields odd values, never undefined behaviour.

/// Size of every Identify data structure.
pub const IDENTIFY_LEN: usize = 4096;

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}
fn ascii(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end_matches([' ', '\0']).to_string()
}

/// The fields of Identify Controller (CNS 01h, figure 275) that nvaio uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentifyController {
    /// PCI Vendor ID (bytes 1:0).
    pub vid: u16,
    /// PCI Subsystem Vendor ID (bytes 3:2).
    pub ssvid: u16,
    /// Serial Number (bytes 23:04), trailing spaces removed.
    pub serial: String,
    /// Model Number (bytes 63:24).
    pub model: String,
    /// Firmware Revision (bytes 71:64).
    pub firmware: String,
    /// Maximum Data Transfer Size (byte 77): 2^mdts memory pages; 0 means no limit.
    pub mdts: u8,
    /// Controller ID (bytes 79:78).
    pub cntlid: u16,
    /// Version (bytes 83:80).
    pub ver: u32,
    /// Optional Admin Command Support (bytes 257:256).
    pub oacs: u16,
    /// Abort Command Limit, zero-based (byte 258).
    pub acl_z: u8,
    /// Asynchronous Event Request Limit, zero-based (byte 259).
    pub aerl_z: u8,
    /// Submission Queue Entry Size (byte 512): required (3:0) and maximum (7:4), powers of two.
    pub sqes: u8,
    /// Completion Queue Entry Size (byte 513).
    pub cqes: u8,
    /// Number of Namespaces: the largest valid NSID (bytes 519:516).
    pub nn: u32,
    /// Optional NVM Command Support (bytes 521:520).
    pub oncs: u16,
    /// Volatile Write Cache (byte 525, bit 0: present).
    pub vwc: u8,
    /// NVM Subsystem NVMe Qualified Name (bytes 1023:768).
    pub subnqn: String,
}

impl IdentifyController {
    pub fn parse(b: &[u8; IDENTIFY_LEN]) -> Self {
        IdentifyController {
            vid: le16(b, 0),
            ssvid: le16(b, 2),
            serial: ascii(&b[4..24]),
            model: ascii(&b[24..64]),
            firmware: ascii(&b[64..72]),
            mdts: b[77],
            cntlid: le16(b, 78),
            ver: le32(b, 80),
            oacs: le16(b, 256),
            acl_z: b[258],
            aerl_z: b[259],
            sqes: b[512],
            cqes: b[513],
            nn: le32(b, 516),
            oncs: le16(b, 520),
            vwc: b[525],
            subnqn: ascii(&b[768..1024]),
        }
    }

    /// Writes these fields into an Identify Controller page (used by the emulated controller).
    pub fn encode(&self, b: &mut [u8; IDENTIFY_LEN]) {
        fn put_ascii(dst: &mut [u8], s: &str) {
            dst.fill(b' ');
            let n = s.len().min(dst.len());
            dst[..n].copy_from_slice(&s.as_bytes()[..n]);
        }
        b[0..2].copy_from_slice(&self.vid.to_le_bytes());
        b[2..4].copy_from_slice(&self.ssvid.to_le_bytes());
        put_ascii(&mut b[4..24], &self.serial);
        put_ascii(&mut b[24..64], &self.model);
        put_ascii(&mut b[64..72], &self.firmware);
        b[77] = self.mdts;
        b[78..80].copy_from_slice(&self.cntlid.to_le_bytes());
        b[80..84].copy_from_slice(&self.ver.to_le_bytes());
        b[256..258].copy_from_slice(&self.oacs.to_le_bytes());
        b[258] = self.acl_z;
        b[259] = self.aerl_z;
        b[512] = self.sqes;
        b[513] = self.cqes;
        b[516..520].copy_from_slice(&self.nn.to_le_bytes());
        b[520..522].copy_from_slice(&self.oncs.to_le_bytes());
        b[525] = self.vwc;
        let n = self.subnqn.len().min(256);
        b[768..1024].fill(0);
        b[768..768 + n].copy_from_slice(&self.subnqn.as_bytes()[..n]);
    }

    /// The largest transfer in bytes for one command, or None when the controller sets no limit.
    /// MDTS counts in units of the minimum memory page size (CAP.MPSMIN); nvaio runs with 4 KiB.
    pub fn max_transfer(&self, min_page: usize) -> Option<usize> {
        if self.mdts == 0 {
            None
        } else {
            min_page.checked_shl(u32::from(self.mdts))
        }
    }

    /// Whether the controller has a volatile write cache (so Flush does real work).
    pub fn has_write_cache(&self) -> bool {
        self.vwc & 1 == 1
    }
}

/// One LBA Format descriptor (NVM Command Set 1.0, figure 116).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbaFormat {
    /// Metadata bytes per block.
    pub ms: u16,
    /// LBA data size as a power of two (9: 512 bytes, 12: 4 KiB). Below 9 the format is unusable.
    pub lbads: u8,
    /// Relative performance (0 best).
    pub rp: u8,
}

impl LbaFormat {
    pub fn parse(v: u32) -> Self {
        LbaFormat { ms: v as u16, lbads: (v >> 16) as u8, rp: (v >> 24 & 3) as u8 }
    }
    pub fn encode(&self) -> u32 {
        u32::from(self.ms) | u32::from(self.lbads) << 16 | u32::from(self.rp & 3) << 24
    }
}

/// The fields of Identify Namespace (CNS 00h; NVM Command Set 1.0, figure 114) nvaio uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentifyNamespace {
    /// Namespace Size in logical blocks (bytes 7:0).
    pub nsze: u64,
    /// Namespace Capacity (bytes 15:8).
    pub ncap: u64,
    /// Namespace Utilization (bytes 23:16).
    pub nuse: u64,
    /// Namespace Features (byte 24).
    pub nsfeat: u8,
    /// Number of LBA Formats, zero-based (byte 25).
    pub nlbaf_z: u8,
    /// Formatted LBA Size (byte 26): format index in bits 3:0 (low) and 6:5 (high).
    pub flbas: u8,
    /// Namespace Optimal I/O Boundary in blocks (bytes 47:46), 0 if none reported.
    pub noiob: u16,
    /// LBA Format descriptors (bytes 191:128 hold the first 16).
    pub lbaf: Vec<LbaFormat>,
}

impl IdentifyNamespace {
    pub fn parse(b: &[u8; IDENTIFY_LEN]) -> Self {
        let nlbaf_z = b[25];
        // Up to 64 formats (bytes 128 onward, 4 bytes each); clamp what the device claims.
        let count = (usize::from(nlbaf_z) + 1).min(64);
        let lbaf = (0..count).map(|i| LbaFormat::parse(le32(b, 128 + 4 * i))).collect();
        IdentifyNamespace {
            nsze: le64(b, 0),
            ncap: le64(b, 8),
            nuse: le64(b, 16),
            nsfeat: b[24],
            nlbaf_z,
            flbas: b[26],
            noiob: le16(b, 46),
            lbaf,
        }
    }

    pub fn encode(&self, b: &mut [u8; IDENTIFY_LEN]) {
        b[0..8].copy_from_slice(&self.nsze.to_le_bytes());
        b[8..16].copy_from_slice(&self.ncap.to_le_bytes());
        b[16..24].copy_from_slice(&self.nuse.to_le_bytes());
        b[24] = self.nsfeat;
        b[25] = self.nlbaf_z;
        b[26] = self.flbas;
        b[46..48].copy_from_slice(&self.noiob.to_le_bytes());
        for (i, f) in self.lbaf.iter().take(64).enumerate() {
            b[128 + 4 * i..132 + 4 * i].copy_from_slice(&f.encode().to_le_bytes());
        }
    }

    /// Index of the format in use.
    pub fn format_index(&self) -> usize {
        usize::from(self.flbas & 0xf) | usize::from(self.flbas >> 5 & 3) << 4
    }

    /// The format in use, if the index names a descriptor the device reported.
    pub fn format(&self) -> Option<LbaFormat> {
        self.lbaf.get(self.format_index()).copied()
    }

    /// Logical block size in bytes, if the format is one nvaio can use (512 B to 64 KiB).
    pub fn block_size(&self) -> Option<u32> {
        let f = self.format()?;
        (9..=16).contains(&f.lbads).then(|| 1u32 << f.lbads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_round_trip_and_offsets() {
        let id = IdentifyController {
            vid: 0x1b36,
            ssvid: 0x1af4,
            serial: "nvaio0".into(),
            model: "QEMU NVMe Ctrl".into(),
            firmware: "7.2".into(),
            mdts: 7,
            cntlid: 0,
            ver: 0x0001_0400,
            oacs: 0x000a,
            acl_z: 3,
            aerl_z: 3,
            sqes: 0x66,
            cqes: 0x44,
            nn: 256,
            oncs: 0x015d,
            vwc: 7,
            subnqn: "nqn.2019-08.org.qemu:nvaio0".into(),
        };
        let mut page = [0u8; IDENTIFY_LEN];
        id.encode(&mut page);
        assert_eq!(&page[0..2], &[0x36, 0x1b]);
        assert_eq!(&page[4..10], b"nvaio0");
        assert_eq!(page[10], b' ');
        assert_eq!(&page[24..38], b"QEMU NVMe Ctrl");
        assert_eq!(page[77], 7);
        assert_eq!(page[512], 0x66);
        assert_eq!(&page[516..520], &256u32.to_le_bytes());
        assert_eq!(IdentifyController::parse(&page), id);
        assert_eq!(id.max_transfer(4096), Some(512 * 1024));
        assert!(id.has_write_cache());
        let unlimited = IdentifyController { mdts: 0, ..id };
        assert_eq!(unlimited.max_transfer(4096), None);
    }

    #[test]
    fn namespace_formats() {
        let ns = IdentifyNamespace {
            nsze: 131072,
            ncap: 131072,
            nuse: 131072,
            nsfeat: 0,
            nlbaf_z: 1,
            flbas: 1,
            noiob: 0,
            lbaf: vec![LbaFormat { ms: 0, lbads: 9, rp: 0 }, LbaFormat { ms: 0, lbads: 12, rp: 0 }],
        };
        let mut page = [0u8; IDENTIFY_LEN];
        ns.encode(&mut page);
        assert_eq!(&page[0..8], &131072u64.to_le_bytes());
        assert_eq!(page[26], 1);
        // LBAF1 at byte 132: LBADS in its third byte.
        assert_eq!(page[134], 12);
        let parsed = IdentifyNamespace::parse(&page);
        assert_eq!(parsed, ns);
        assert_eq!(parsed.block_size(), Some(4096));
        let bad = IdentifyNamespace { flbas: 5, ..ns.clone() };
        assert_eq!(bad.block_size(), None);
        let high = IdentifyNamespace { flbas: 0x20, ..ns };
        assert_eq!(high.format_index(), 16);
    }
}
