//! `snapshot:TEMPLATE`: a guest disk as a copy-on-write of a template.
//!
//! `add` attaches the template read-only to a loop device, a fresh sparse
//! store to another, and builds the dm `snapshot` device
//! `blkbackd-<domid>-<devid>` over them; each piece is recorded in the
//! backend directory (dom0's, the guest cannot write it) as soon as it
//! exists, so `remove` undoes exactly what was made even after a failed or
//! interrupted `add`.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use xenstore::{Client, Xs};

use super::{env_dir, read_opt, remove_dm, vbd_ids, HotplugError, DM_NAME};
use crate::disk::dm::{self, Control, DevId, DevRef, Table, Target};
use crate::disk::loopdev::{self, LoopOptions};
use crate::disk::{self, DiskId};

/// The template's loop device, `%x:%x:%llx` (dev_t and diskseq).
pub(super) const ORIGIN: &str = "blkbackd-origin";
/// The store's loop device, as [`ORIGIN`].
pub(super) const COW: &str = "blkbackd-cow";
/// The store file's path.
pub(super) const COW_FILE: &str = "blkbackd-cow-file";

/// The image of template `template`.
pub(super) fn template_path(template: &str) -> PathBuf {
    env_dir("BLKBACKD_TEMPLATES", "/var/lib/blkbackd/templates").join(format!("{template}.img"))
}

fn id_value(id: DiskId) -> String {
    format!("{}:{}", id.physical_device(), id.diskseq_hex())
}

/// A recorded loop device's identity.
pub(super) fn parse_id(v: &str) -> Option<DiskId> {
    let (phys, seq) = v.rsplit_once(':')?;
    let (major, minor) = disk::parse_physical_device(phys.as_bytes()).ok()?;
    let diskseq = disk::parse_diskseq(seq.as_bytes()).ok()?;
    Some(DiskId {
        major,
        minor,
        diskseq,
    })
}

/// The loop devices a snapshot disk's `add` recorded in `be`.
pub(super) async fn recorded_loops(xs: &Client, be: &str) -> Result<Vec<DiskId>, HotplugError> {
    let mut out = Vec::new();
    for key in [ORIGIN, COW] {
        if let Some(id) = read_opt(xs, &format!("{be}/{key}"))
            .await?
            .as_deref()
            .and_then(parse_id)
        {
            out.push(id);
        }
    }
    Ok(out)
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> HotplugError {
    move |e| HotplugError::File(what, e)
}

/// Builds the snapshot disk; returns its identity.
pub(super) async fn add(
    xs: &Client,
    be: &str,
    template: &str,
    writable: bool,
) -> Result<DiskId, HotplugError> {
    let (domid, devid) = vbd_ids(be)?;
    let name = dm::vbd_name(domid, devid, None)?;
    let tmpl = template_path(template);
    let size = std::fs::metadata(&tmpl)
        .map_err(io(format!("template {}", tmpl.display())))?
        .len();
    if size < 4096 || size % 512 != 0 {
        return Err(HotplugError::Params(
            template.to_owned(),
            "the template image must be a whole number of sectors, at least 4 KiB",
        ));
    }
    let made = async {
        let origin = loopdev::attach(
            &tmpl,
            &LoopOptions {
                read_only: true,
                ..LoopOptions::default()
            },
        )?
        .keep();
        xs.write(&format!("{be}/{ORIGIN}"), id_value(origin))
            .await?;
        // The store: sparse, room for every chunk to change plus metadata.
        let cow_dir = env_dir("BLKBACKD_COW_DIR", "/var/lib/blkbackd/cow");
        std::fs::create_dir_all(&cow_dir).map_err(io(format!("making {}", cow_dir.display())))?;
        let cow_file = cow_dir.join(format!("{domid}-{devid}.cow"));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&cow_file)
            .map_err(io(format!("creating {}", cow_file.display())))?;
        xs.write(&format!("{be}/{COW_FILE}"), cow_file.display().to_string())
            .await?;
        f.set_len(size + size / 8 + (1 << 20))
            .map_err(io(format!("sizing {}", cow_file.display())))?;
        drop(f);
        let cow = loopdev::attach(&cow_file, &LoopOptions::default())?.keep();
        xs.write(&format!("{be}/{COW}"), id_value(cow)).await?;
        let ctl = Control::open()?;
        let table = Table::single(
            size / 512,
            Target::Snapshot {
                origin: DevRef {
                    major: origin.major,
                    minor: origin.minor,
                },
                cow: DevRef {
                    major: cow.major,
                    minor: cow.minor,
                },
                persistent: true,
                chunk: 16,
            },
        );
        xs.write(&format!("{be}/{DM_NAME}"), &name).await?;
        let d = dm::create_disk(&ctl, &name, &table, !writable)?;
        Ok::<DiskId, HotplugError>(d.id)
    }
    .await;
    if made.is_err() {
        if let Err(e) = remove(xs, be).await {
            tracing::warn!(backend = be, "undoing a failed snapshot add: {e}");
        }
    }
    made
}

/// Removes the dm device (deferred if still open), releases both loop
/// devices, deletes the store: whatever of it exists.
pub(super) async fn remove(xs: &Client, be: &str) -> Result<(), HotplugError> {
    remove_dm(xs, be).await?;
    for key in [COW, ORIGIN] {
        if let Some(v) = read_opt(xs, &format!("{be}/{key}")).await? {
            if let Some(id) = parse_id(&v) {
                // Released only if it is still the device we made.
                loopdev::release_by_id(id)?;
            }
            xs.rm(&format!("{be}/{key}")).await?;
        }
    }
    if let Some(f) = read_opt(xs, &format!("{be}/{COW_FILE}")).await? {
        let p = Path::new(&f);
        let cow_dir = env_dir("BLKBACKD_COW_DIR", "/var/lib/blkbackd/cow");
        // Only ever a file we made, in our store directory.
        if p.parent() == Some(cow_dir.as_path()) && f.ends_with(".cow") {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(HotplugError::File(format!("removing {f}"), e)),
            }
        }
        xs.rm(&format!("{be}/{COW_FILE}")).await?;
    }
    Ok(())
}

/// Revokes the dm disk of a vbd (`blkbackd revoke`): its table becomes
/// `error` over the same size, so nothing more reaches the storage.
pub fn revoke(domid: u16, devid: u32) -> Result<String, HotplugError> {
    let name = dm::vbd_name(domid, devid, None)?;
    let ctl = Control::open()?;
    let id = DevId::Name(name.clone());
    let info = ctl.info(&id)?;
    if !info.uuid.starts_with(dm::UUID_PREFIX) {
        return Err(HotplugError::Params(name, "not a device blkbackd made"));
    }
    let sectors: u64 = ctl.table_lines(&id, true)?.iter().map(|l| l.1).sum();
    dm::revoke(&ctl, &id, sectors)?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_identities_round_trip_and_bad_ones_are_ignored() {
        let id = DiskId {
            major: 7,
            minor: 12,
            diskseq: 0x2a,
        };
        assert_eq!(id_value(id), "7:c:2a");
        assert_eq!(parse_id("7:c:2a"), Some(id));
        for bad in ["", "7:c", "7:c:", "x:c:2a", "7:c:02a"] {
            assert_eq!(parse_id(bad), None, "{bad:?}");
        }
        assert_eq!(vbd_ids("backend/vbd/3/51712").unwrap(), (3, 51712));
        assert!(vbd_ids("backend/vbd/x/51712").is_err());
    }
}
