//! blkbackd: a userspace Xen block backend.
//!
//! Layout (see `DESIGN.md` in the project notes): `abi` (blkif structs), `ring`
//! (the shared-ring engine), `xen` (grants and event channels), `io` (I/O
//! engines), `disk` (diskseq, loop, device-mapper), `vbd` (one device's xenbus
//! state machine), `daemon`, `hotplug` and `sim` arrive issue by issue. Today:
//! the demo of the embedded default and the signal handling the commands share.
#![deny(unsafe_code)]

/// The git commit this binary was built from (see `build.rs`).
pub const BUILD_COMMIT: &str = env!("BLKBACKD_COMMIT");

pub mod abi;
pub mod attach;
pub mod bench;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod disk;
pub mod dmcheck;
pub mod hotplug;
pub mod io;
pub mod metrics;
pub mod ring;
pub mod signals;
pub mod sim;
pub mod status;
pub mod vbd;
pub mod xen;
