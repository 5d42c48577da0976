//! Shared test cases for nvaio's integration tests; see `cases`.

pub mod cases;
pub mod conformance;
pub mod irq_cases;
pub mod mode_cases;
