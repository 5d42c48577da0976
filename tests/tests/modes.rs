//! The completion-mode cases (polled, interrupt, hybrid) on the emulated controller, with more,
//! as many, and fewer MSI-X vectors than I/O queues.

use std::sync::Arc;

use nvaio_nvme::emu::{EmuConfig, EmulatedController};
use nvaio_nvme::{Controller, Device};
use nvaio_tests::cases::Target;

#[test]
fn mode_cases_on_emulated_vector_layouts() {
    for (vectors, queues) in [(2u32, 8u16), (17, 16), (1, 4)] {
        let cfg = EmuConfig { msix_vectors: vectors, max_ioqpairs: queues, ..Default::default() };
        let emu = EmulatedController::new(cfg);
        let dev: Arc<dyn Device> = emu;
        let ctrl = Controller::new(dev).unwrap();
        assert!(ctrl.interrupt_vectors() > 0, "{vectors} vectors offered, none enabled");
        let t = Target::new(ctrl);
        let prefix = format!("emu-{vectors}v{queues}q/");
        let (passed, failed) = nvaio_tests::mode_cases::run_all(&prefix, &t, None);
        assert_eq!(failed, 0, "{failed} mode cases failed with {vectors} vectors, {queues} queues");
        assert!(passed >= 10, "only {passed} ran");
    }
}
