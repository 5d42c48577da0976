//! NVMe data structures, as laid out by the NVM Express Base Specification 2.0 and the NVM
//! Command Set Specification 1.0.
//!
//! Plain data and bit arithmetic only: no unsafe and no I/O. Fields the specification defines as
//! zero-based ("0's based") carry a `_z` suffix so nobody forgets the +1.

pub mod cmd;
pub mod identify;
pub mod regs;
pub mod status;

pub use cmd::{Cqe, Sqe};
pub use status::Status;
