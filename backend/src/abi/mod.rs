//! Wire and kernel ABI definitions: no logic.
//!
//! - [`blkif`]: `xen/io/blkif.h` and `xen/io/ring.h` (requests, responses, the
//!   shared-ring header, ops, statuses, the three request layouts).
//! - [`sys`]: the v1 grant-table entry, `/dev/xen/gntdev` and `/dev/xen/evtchn`
//!   ioctl structs and numbers, and the xenbus states.
//!
//! The `#[repr(C)]` structs exist to pin layouts: the offsets the ring engine
//! reads come from them via `offset_of!`, compile-time assertions pin them to the
//! headers' values, and a test compiles a C program against Debian's
//! `libxen-dev` headers to compare every size and offset. Nothing ever points a
//! Rust reference of these types at guest memory: requests are copied out as bytes.
#![forbid(unsafe_code)]

pub mod blkif;
pub mod sys;
