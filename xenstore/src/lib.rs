//! Xenstore for blkbackd: the wire protocol of `xen/io/xs_wire.h`, an async
//! client, and an embedded server with xenstored's semantics.
//!
//! - [`wire`]: framing, operations, error names, path rules, permission strings.
//! - [`client`]: a tokio client for xenstored's socket, the xenbus device, or an
//!   embedded server; pipelined requests, watch streams, retried transactions.
//! - [`server`]: the embedded server that stands in for xenstored when there is
//!   no Xen (blkbackd's embedded default and its tests).
//! - [`conformance`]: a behaviour check that runs against any Xenstore, ours or
//!   the C xenstored, so both are held to the same expectations.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod conformance;
pub mod server;
pub mod wire;

pub use client::{Client, Endpoint, Error, Transaction, Watch, WatchEvent, Xs};
pub use server::{Quotas, Server};
pub use wire::{Access, DomId, ErrorCode, Op, Perm};
