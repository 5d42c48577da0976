//! Shared test cases for nvaio's integration tests; see `cases`.

pub mod cases;
pub mod conformance;
pub mod irq_cases;
pub mod mode_cases;

use nvaio::{Context, Errno, Iocb};

/// [`Context::submit`] for the tests. Every test keeps its buffers alive until it has reaped
/// the events of the requests that use them, or until the context is dropped (which waits for
/// requests in flight), and declares buffers before contexts so they are dropped after them.
pub trait SubmitForTests {
    fn submit_io(&mut self, iocbs: &[&Iocb]) -> Result<usize, Errno>;
}

impl SubmitForTests for Context {
    fn submit_io(&mut self, iocbs: &[&Iocb]) -> Result<usize, Errno> {
        // SAFETY: the buffer discipline of the tests, described above.
        unsafe { self.submit(iocbs) }
    }
}
