//! blkbackd: a userspace Xen block backend.
//!
//! Layout, from the wire inwards (the README's module table says more):
//! `abi` (blkif, grant-table, gntdev and evtchn definitions), `ring` (the
//! shared ring, both ends; requests copied out, then validated), `xen` (the
//! hypervisor seam: guest memory, grants, event channels; real and
//! simulated), `io` (the `Disk` trait, bounce pools, the io_uring and
//! blocking engines), `disk` (disks named by dev_t and diskseq, loop and
//! device-mapper devices), `xenbus` (the Xenstore contract of a vbd: paths,
//! keys, the published disk, the toolstack's steps), `vbd` (one device: the
//! xenbus state machine and the lifecycle carrying it out, its queues'
//! serving loop, I/O limits and fair share), `daemon` (every vbd of
//! `backend/vbd`, handover on stop), `hotplug` (the libxl block script and
//! reconciliation of what it made), `status` and `metrics` (what an operator
//! reads), `config`, `bench`, and `sim` with `demo` (the embedded default).
//! Imports run one way, from the wire inwards; none go back.
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
pub mod rbd;
pub mod ring;
pub mod signals;
pub mod sim;
pub mod status;
pub mod vbd;
pub mod xen;
pub mod xenbus;
