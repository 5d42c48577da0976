//! Controller registers (Base Specification 2.0, §3.1, figure 33 onwards).

/// Register offsets in BAR0.
pub mod offset {
    /// Controller Capabilities, 64 bits.
    pub const CAP: usize = 0x00;
    /// Version.
    pub const VS: usize = 0x08;
    /// Interrupt Mask Set / Clear (pin-based and MSI only; unused with MSI-X).
    pub const INTMS: usize = 0x0c;
    pub const INTMC: usize = 0x10;
    /// Controller Configuration.
    pub const CC: usize = 0x14;
    /// Controller Status.
    pub const CSTS: usize = 0x1c;
    /// NVM Subsystem Reset.
    pub const NSSR: usize = 0x20;
    /// Admin Queue Attributes.
    pub const AQA: usize = 0x24;
    /// Admin Submission Queue base address, 64 bits.
    pub const ASQ: usize = 0x28;
    /// Admin Completion Queue base address, 64 bits.
    pub const ACQ: usize = 0x30;
    /// First doorbell (SQ 0 tail); the others follow at a stride of 4 << CAP.DSTRD.
    pub const DOORBELLS: usize = 0x1000;
}

/// CAP: Controller Capabilities (§3.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// Maximum Queue Entries Supported, zero-based: a queue may hold `mqes_z() + 1` entries.
    pub fn mqes_z(self) -> u16 {
        self.0 as u16
    }
    /// Contiguous Queues Required.
    pub fn cqr(self) -> bool {
        self.0 >> 16 & 1 == 1
    }
    /// Timeout for CSTS.RDY transitions, in units of 500 ms.
    pub fn to(self) -> u8 {
        (self.0 >> 24) as u8
    }
    /// Doorbell stride: doorbells sit `4 << dstrd` bytes apart.
    pub fn dstrd(self) -> u8 {
        (self.0 >> 32 & 0xf) as u8
    }
    /// NVM Subsystem Reset Supported.
    pub fn nssrs(self) -> bool {
        self.0 >> 36 & 1 == 1
    }
    /// Command Sets Supported (bit 0: NVM command set).
    pub fn css(self) -> u8 {
        (self.0 >> 37) as u8
    }
    /// Memory Page Size Minimum, as a power of two above 4 KiB (page = 4096 << mpsmin).
    pub fn mpsmin(self) -> u8 {
        (self.0 >> 48 & 0xf) as u8
    }
    /// Memory Page Size Maximum, same encoding.
    pub fn mpsmax(self) -> u8 {
        (self.0 >> 52 & 0xf) as u8
    }
    /// The RDY transition timeout in milliseconds (at least 500 ms, even when TO reads 0).
    pub fn timeout_ms(self) -> u64 {
        u64::from(self.to().max(1)) * 500
    }
}

/// VS: Version (§3.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version(pub u32);

impl Version {
    pub fn major(self) -> u16 {
        (self.0 >> 16) as u16
    }
    pub fn minor(self) -> u8 {
        (self.0 >> 8) as u8
    }
    pub fn tertiary(self) -> u8 {
        self.0 as u8
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major(), self.minor(), self.tertiary())
    }
}

/// CC: Controller Configuration (§3.1.5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cc(pub u32);

/// CC.SHN values.
pub const SHN_NONE: u32 = 0;
pub const SHN_NORMAL: u32 = 1;
pub const SHN_ABRUPT: u32 = 2;

impl Cc {
    pub fn en(self) -> bool {
        self.0 & 1 == 1
    }
    pub fn with_en(self, en: bool) -> Self {
        Cc(self.0 & !1 | en as u32)
    }
    /// I/O Command Set Selected (0: NVM).
    pub fn with_css(self, css: u32) -> Self {
        Cc(self.0 & !(0x7 << 4) | (css & 0x7) << 4)
    }
    /// Memory Page Size: 4096 << mps.
    pub fn mps(self) -> u32 {
        self.0 >> 7 & 0xf
    }
    pub fn with_mps(self, mps: u32) -> Self {
        Cc(self.0 & !(0xf << 7) | (mps & 0xf) << 7)
    }
    /// Arbitration Mechanism Selected (0: round robin).
    pub fn with_ams(self, ams: u32) -> Self {
        Cc(self.0 & !(0x7 << 11) | (ams & 0x7) << 11)
    }
    pub fn shn(self) -> u32 {
        self.0 >> 14 & 0x3
    }
    pub fn with_shn(self, shn: u32) -> Self {
        Cc(self.0 & !(0x3 << 14) | (shn & 0x3) << 14)
    }
    /// I/O Submission Queue Entry Size, as a power of two (6: 64 bytes).
    pub fn iosqes(self) -> u32 {
        self.0 >> 16 & 0xf
    }
    pub fn with_iosqes(self, v: u32) -> Self {
        Cc(self.0 & !(0xf << 16) | (v & 0xf) << 16)
    }
    /// I/O Completion Queue Entry Size, as a power of two (4: 16 bytes).
    pub fn iocqes(self) -> u32 {
        self.0 >> 20 & 0xf
    }
    pub fn with_iocqes(self, v: u32) -> Self {
        Cc(self.0 & !(0xf << 20) | (v & 0xf) << 20)
    }
}

/// CSTS: Controller Status (§3.1.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Csts(pub u32);

/// CSTS.SHST values.
pub const SHST_NORMAL: u32 = 0;
pub const SHST_OCCURRING: u32 = 1;
pub const SHST_COMPLETE: u32 = 2;

impl Csts {
    pub fn rdy(self) -> bool {
        self.0 & 1 == 1
    }
    /// Controller Fatal Status: the controller cannot go on without a reset.
    pub fn cfs(self) -> bool {
        self.0 >> 1 & 1 == 1
    }
    pub fn shst(self) -> u32 {
        self.0 >> 2 & 0x3
    }
    /// All ones is what a read returns once the device has left the bus (surprise removal,
    /// or a function-level failure): every field would be nonsense.
    pub fn is_gone(self) -> bool {
        self.0 == u32::MAX
    }
}

/// AQA: Admin Queue Attributes (§3.1.8); both sizes are zero-based.
pub fn aqa(asqs_z: u16, acqs_z: u16) -> u32 {
    u32::from(asqs_z & 0xfff) | u32::from(acqs_z & 0xfff) << 16
}

/// Byte offset in BAR0 of a queue's doorbell (§3.1.24, §3.1.25).
pub fn doorbell_offset(qid: u16, completion: bool, dstrd: u8) -> usize {
    offset::DOORBELLS + (2 * qid as usize + completion as usize) * (4usize << dstrd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_fields() {
        // MQES 2047, CQR, TO 15, DSTRD 0, CSS NVM, MPSMIN 0, MPSMAX 4: QEMU 7.2's value.
        let cap = Cap(0x0040_0020_0f01_07ff);
        assert_eq!(cap.mqes_z(), 2047);
        assert!(cap.cqr());
        assert_eq!(cap.to(), 15);
        assert_eq!(cap.timeout_ms(), 7500);
        assert_eq!(cap.dstrd(), 0);
        assert_eq!(cap.css() & 1, 1);
        assert_eq!(cap.mpsmin(), 0);
        assert_eq!(cap.mpsmax(), 4);
        assert_eq!(Cap(3 << 32).dstrd(), 3);
        assert_eq!(Cap(0).timeout_ms(), 500);
    }

    #[test]
    fn cc_fields_round_trip() {
        let cc = Cc::default().with_en(true).with_css(0).with_mps(0).with_iosqes(6).with_iocqes(4);
        assert_eq!(cc.0, 0x0046_0001);
        assert_eq!(cc.iosqes(), 6);
        assert_eq!(cc.iocqes(), 4);
        let cc = cc.with_shn(SHN_NORMAL);
        assert_eq!(cc.shn(), SHN_NORMAL);
        assert_eq!(cc.0 >> 14 & 3, 1);
        assert!(!cc.with_en(false).en());
        assert_eq!(Cc(0).with_mps(2).mps(), 2);
    }

    #[test]
    fn csts_and_doorbells() {
        assert!(Csts(1).rdy());
        assert!(Csts(2).cfs());
        assert_eq!(Csts(SHST_COMPLETE << 2).shst(), SHST_COMPLETE);
        assert!(Csts(u32::MAX).is_gone());
        assert_eq!(doorbell_offset(0, false, 0), 0x1000);
        assert_eq!(doorbell_offset(0, true, 0), 0x1004);
        assert_eq!(doorbell_offset(3, true, 0), 0x101c);
        assert_eq!(doorbell_offset(1, false, 2), 0x1000 + 2 * 16);
        assert_eq!(aqa(31, 31), 0x001f_001f);
        assert_eq!(Version(0x0001_0400).to_string(), "1.4.0");
    }
}
