//! Device-mapper: the `/dev/mapper/control` ioctls, the tables we build, and
//! table swaps that never leave a device suspended or half swapped.
//!
//! Deliberate choices:
//! - No libdevmapper (nor the `devicemapper` crate over it): it brings a C
//!   library, bindgen and pkg-config into the build and onto every dom0,
//!   where one self-contained binary needs none.
//! - No udev: libdevmapper waits for udev cookies, which never come on dom0s
//!   without udev (our VM tests); nodes are opened by dev_t (`disk::node_for`,
//!   `mknodat` when devtmpfs has none).
//! - Our own dm ioctls: the `linux/dm-ioctl.h` ABI (DM 4.x) of the ten
//!   commands we use is small and stable, built with byte offsets (see
//!   `reference/diskseq-dm.md`, section 5) and checked against the headers by
//!   `tests/disk_abi.rs`.
//!
//! Names are `blkbackd-<domid>-<devid>[-role]`, UUIDs `BLKBACKD-` plus a
//! unique part, both checked before any ioctl. A dm disk becomes openable
//! after its first table load: [`create_disk`] creates, loads, resumes, opens
//! the node by the dev_t create returned, reads its diskseq, and checks by
//! UUID that the dev_t still carries our UUID.
//!
//! One file per seam, re-exported here: `name` (names, UUIDs and their
//! checks), `key` (crypt keys), `table` (the table model and spec parser),
//! `ioctl` (the `struct dm_ioctl` encoding), `control` (the control device),
//! `swap` (table swaps, revocation), `bind` (acting only on the published
//! disk), `create` (making a disk, thin volumes), `reconcile` (start-up
//! clean-up) and [`pool`] (thin-pool health). No unsafe in any of them: the
//! one ioctl call is `disk::sys::dm_ioctl`.
#![forbid(unsafe_code)]

use std::io;

use super::{sys, DiskError, DiskId};

/// A device-mapper failure.
#[derive(Debug, thiserror::Error)]
pub enum DmError {
    /// A name or UUID the kernel would refuse or that could escape /dev/mapper.
    #[error("device-mapper {what} {value:?} is not allowed: {why}")]
    BadName {
        /// "name" or "uuid".
        what: &'static str,
        /// The value.
        value: String,
        /// Why.
        why: &'static str,
    },
    /// A table spec that cannot be loaded.
    #[error("bad table spec, line {line}: {why}")]
    BadSpec {
        /// 1-based line.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// An ioctl failed.
    #[error("{op} on {dev}: {source}")]
    Ioctl {
        /// The command.
        op: &'static str,
        /// The device.
        dev: String,
        /// The error.
        source: io::Error,
    },
    /// A table swap failed and was rolled back: the old table is live.
    #[error("table swap of {dev} failed at {step} and was rolled back: {source}")]
    SwapRolledBack {
        /// The device.
        dev: String,
        /// load, suspend or resume.
        step: &'static str,
        /// The failure.
        source: Box<DmError>,
    },
    /// The device we opened does not carry our UUID (someone replaced it).
    #[error("{dev} is not the device {uuid} we created")]
    NotOurs {
        /// The dev_t opened.
        dev: String,
        /// The UUID expected.
        uuid: String,
    },
    /// The device under a vbd's name is not the disk the vbd published (it
    /// was removed and another made under that name, or the name was never
    /// that disk's): nothing is done to it.
    #[error("{name} is now {found}, not the disk {published} its vbd published: it was replaced; refusing to act on it")]
    Replaced {
        /// The dm name.
        name: String,
        /// What the vbd published (`major:minor diskseq`).
        published: DiskId,
        /// What carries the name now.
        found: String,
    },
    /// Opening the new device failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
}

mod bind;
mod control;
mod create;
mod ioctl;
mod key;
mod name;
pub mod pool;
mod reconcile;
mod swap;
mod table;

pub use bind::{bind, check_published};
pub use control::{Control, CONTROL};
pub use create::{create_disk, thin_target, thin_volume_of, DmDisk};
pub(crate) use ioctl::decode_dev;
pub use ioctl::Info;
pub use key::Key;
pub use name::{
    new_uuid, validate_name, validate_uuid, vbd_name, DevId, NAME_LEN, UUID_LEN, UUID_PREFIX,
};
pub use reconcile::reconcile;
pub use swap::{revoke, swap_table, DmOps};
pub use table::{DevRef, Line, Table, Target};

#[cfg(test)]
mod tests;
