//! An in-process emulated controller for the tools' host tests: the real driver and AIO layer
//! run against it, so the commands' I/O paths are tested without VFIO.

use std::sync::Arc;

use nvaio_nvme::emu::{EmuConfig, EmuNamespace, EmulatedController};
use nvaio_nvme::Controller;

pub const MODEL: &str = "nvaio tools test";
pub const SERIAL: &str = "TOOLS0001";

/// Two namespaces: 64 MiB of 512-byte blocks and 1 GiB of 4 KiB blocks (memory for the second
/// is only touched where a test writes).
pub fn config() -> EmuConfig {
    EmuConfig {
        model: MODEL.into(),
        serial: SERIAL.into(),
        mdts: 5,
        namespaces: vec![
            EmuNamespace { blocks: 131_072, lba_shift: 9 },
            EmuNamespace { blocks: 262_144, lba_shift: 12 },
        ],
        ..EmuConfig::default()
    }
}

pub fn controller(cfg: EmuConfig) -> (Arc<EmulatedController>, Arc<Controller>) {
    let emu = EmulatedController::new(cfg);
    let ctrl = Controller::new(emu.clone()).expect("the emulated controller comes up");
    (emu, ctrl)
}
