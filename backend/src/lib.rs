//! blkbackd: a userspace Xen block backend.
//!
//! Layout, from the wire inwards (the README's module table says more):
//! `abi` (blkif, grant-table, gntdev and evtchn definitions), `ring` (the
//! shared ring, both ends; requests copied out, then validated), `xen` (the
//! hypervisor seam: guest memory, grants, event channels; real and
//! simulated), `io` (the `Disk` trait, bounce pools, the io_uring and
//! blocking engines), `disk` (disks named by dev_t and diskseq, loop and
//! device-mapper devices), `vbd` (one device: its xenbus lifecycle, its
//! queues' serving loop, I/O limits and fair share), `daemon` (every vbd of
//! `backend/vbd`, handover on stop), `hotplug` (the libxl block script),
//! `status` and `metrics` (what an operator reads), `config`, `bench`, and
//! `sim` with `demo` (the embedded default).
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
pub mod xenbus;
