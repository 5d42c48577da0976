//! The NVMe driver of nvaio: spec types, controller bring-up, admin commands and I/O queue pairs.
//!
//! Written against the NVM Express Base Specification 2.0 and the NVM Command Set Specification
//! 1.0. This crate holds no unsafe code: hardware is reached through the [`Device`] trait, whose
//! implementations live in [`vfio`] (a real controller) and [`emu`] (an in-process one).

#![forbid(unsafe_code)]

pub mod controller;
pub mod device;
pub mod emu;
pub mod prp;
pub mod queue;
pub mod spec;
pub mod vfio;

pub use controller::{Controller, ControllerError, Namespace};
pub use device::Device;
pub use queue::{Completion, QueuePair};
