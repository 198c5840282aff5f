//! The hypervisor seam: grant access and event channels.
//!
//! `mem` is the accessor for memory shared with guests. The traits here are
//! implemented twice: `dev` over Linux's `/dev/xen/gntdev` and
//! `/dev/xen/evtchn`, and `sim` over files and unix sockets for the embedded
//! default. The protocol engine only sees the traits.

pub mod mem;
