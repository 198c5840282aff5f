//! The Xenstore contract of a vbd, in one place: where libxl puts the
//! backend and frontend directories and the keys in them ([`key`]), the one
//! scan of every vbd dom0 serves ([`scan`]), the disk the block script
//! publishes ([`Published`]: written by `hotplug add`, read by the lifecycle,
//! `hotplug remove`, reconciliation and `status`), and libxl's own steps for
//! a vbd ([`toolstack`]: what `attach`, the demo and the tests do).
//!
//! Everything else names a vbd's directories through these functions.
#![forbid(unsafe_code)]

pub mod published;
pub mod toolstack;

use std::collections::BTreeSet;

use xenstore::{wire, Client, Xs};

use crate::xen::DomId;
pub use published::Published;

/// Where libxl puts the vbds dom0 serves.
pub const VBD_ROOT: &str = "/local/domain/0/backend/vbd";

/// A vbd: its frontend's domain and its device id.
pub type VbdId = (DomId, u32);

/// The keys of the backend directory (written by libxl, the block script
/// and the backend) and of the frontend's, by who writes them.
pub mod key {
    // libxl, in the backend directory.
    /// The disk as the guest's configuration names it.
    pub const PARAMS: &str = "params";
    /// `r` or `w`.
    pub const MODE: &str = "mode";
    /// `0` once the toolstack removes the device.
    pub const ONLINE: &str = "online";
    /// The frontend's directory.
    pub const FRONTEND: &str = "frontend";
    /// The frontend's domain.
    pub const FRONTEND_ID: &str = "frontend-id";
    /// `disk` or `cdrom`.
    pub const DEVICE_TYPE: &str = "device-type";
    /// libxl's `no-discard` writes 0.
    pub const DISCARD_ENABLE: &str = "discard-enable";
    // The block script.
    /// The published block device, `%x:%x`.
    pub const PHYSICAL_DEVICE: &str = "physical-device";
    /// Its disk sequence number, `%llx`.
    pub const DISKSEQ: &str = "diskseq";
    /// The path the block device was found at (for people).
    pub const PHYSICAL_DEVICE_PATH: &str = "physical-device-path";
    /// A regular file served directly.
    pub const PHYSICAL_FILE: &str = "physical-file";
    /// Its identity, `%x:%x[:%x]`.
    pub const FILE_ID: &str = "file-id";
    /// A Ceph RBD image served through librbd, `POOL/IMAGE[@SNAP]`.
    pub const RBD_IMAGE: &str = "rbd-image";
    /// Its id (what a deleted and recreated image does not keep).
    pub const RBD_IMAGE_ID: &str = "rbd-image-id";
    /// The librbd client (`client.INSTANCE`) of the daemon holding the
    /// image's lock for this vbd: the next daemon breaks that lock, and no
    /// other, if its holder died without letting go.
    pub const RBD_LOCK_OWNER: &str = "rbd-lock-owner";
    /// `connected` or `error`.
    pub const HOTPLUG_STATUS: &str = "hotplug-status";
    /// Why the block script failed.
    pub const HOTPLUG_ERROR: &str = "hotplug-error";
    /// The dm device the block script made for the vbd.
    pub const DM_NAME: &str = "blkbackd-dm";
    // Both ends.
    /// The xenbus state.
    pub const STATE: &str = "state";
    // The backend.
    /// Why the device failed (`xenbus_dev_fatal`).
    pub const ERROR: &str = "error";
    /// `1` once the disk is open.
    pub const OPENED: &str = "opened";
    /// The disk's size in 512-byte sectors.
    pub const SECTORS: &str = "sectors";
}

/// `/local/domain/<domid>`.
pub fn domain_home(domid: DomId) -> String {
    format!("/local/domain/{}", domid.0)
}

/// The backend directory of a vbd.
pub fn backend_path(domid: DomId, devid: u32) -> String {
    format!("{VBD_ROOT}/{}/{devid}", domid.0)
}

/// The backend directory relative to dom0's home, as libxl passes it to
/// block scripts in `XENBUS_PATH`.
pub fn backend_rel(domid: DomId, devid: u32) -> String {
    format!("backend/vbd/{}/{devid}", domid.0)
}

/// The frontend directory of a vbd.
pub fn frontend_path(domid: DomId, devid: u32) -> String {
    format!("{}/device/vbd/{devid}", domain_home(domid))
}

/// `dir/key`.
pub fn node(dir: &str, key: &str) -> String {
    format!("{dir}/{key}")
}

/// The vbd a backend directory names (absolute or relative): its last two
/// components, decimal.
pub fn vbd_of(be: &str) -> Option<VbdId> {
    let mut it = be.rsplit('/');
    let devid = it.next().and_then(decimal_u32)?;
    let domid = it.next().and_then(DomId::parse)?;
    Some((domid, devid))
}

fn decimal_u32(s: &str) -> Option<u32> {
    wire::parse_decimal(s).and_then(|n| u32::try_from(n).ok())
}

/// The vbds that exist now below [`VBD_ROOT`], in order. Names that are not
/// decimal ids are skipped (debug level: anyone with dom0's rights can
/// write them, and they name nothing to serve).
pub async fn scan(xs: &Client) -> Result<BTreeSet<VbdId>, xenstore::Error> {
    let mut out = BTreeSet::new();
    let domids = match xs.directory(VBD_ROOT).await {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(out),
        Err(e) => return Err(e),
    };
    let domids: Vec<(String, DomId)> = domids
        .into_iter()
        .filter_map(|d| match DomId::parse(&d) {
            Some(id) => Some((d, id)),
            None => {
                tracing::debug!("ignoring {VBD_ROOT}/{d}: not a domid");
                None
            }
        })
        .collect();
    // One request per domain, all in flight at once: a scan costs one
    // round trip however many domains there are.
    let paths: Vec<String> = domids
        .iter()
        .map(|(d, _)| format!("{VBD_ROOT}/{d}"))
        .collect();
    let listings = futures_util::future::join_all(paths.iter().map(|p| xs.directory(p))).await;
    for ((d, domid), listing) in domids.into_iter().zip(listings) {
        let devids = match listing {
            Ok(v) => v,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        for v in devids {
            match decimal_u32(&v) {
                Some(devid) => {
                    out.insert((domid, devid));
                }
                None => tracing::debug!("ignoring {VBD_ROOT}/{d}/{v}: not a device id"),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_their_inverse() {
        let (d, v) = (DomId(7), 51712);
        assert_eq!(backend_path(d, v), "/local/domain/0/backend/vbd/7/51712");
        assert_eq!(backend_rel(d, v), "backend/vbd/7/51712");
        assert_eq!(frontend_path(d, v), "/local/domain/7/device/vbd/51712");
        assert_eq!(vbd_of(&backend_path(d, v)), Some((d, v)));
        assert_eq!(vbd_of(&backend_rel(d, v)), Some((d, v)));
        for bad in [
            "",
            "backend/vbd/x/51712",
            "backend/vbd/3/-1",
            "backend/vbd/3/5171299999999",
            "51712",
        ] {
            assert_eq!(vbd_of(bad), None, "{bad:?}");
        }
    }
}
