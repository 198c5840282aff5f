//! `snapshot:TEMPLATE`: a guest disk as a copy-on-write of a template.
//!
//! `add` attaches the template read-only to a loop device, a fresh sparse
//! store to another, and builds the dm `snapshot` device
//! `blkbackd-<domid>-<devid>` over them; each piece is recorded in the
//! backend directory (dom0's, the guest cannot write it) as soon as it
//! exists, so `remove` undoes exactly what was made even after a failed or
//! interrupted `add`. A store file that a crash left unrecorded (or a host
//! that went down with the vbd) is recognised at the next `add` of that
//! number: no vbd in Xenstore records it, so it is replaced ([`fresh_store`]).
#![forbid(unsafe_code)]

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use xenstore::{Client, Xs};

use super::{env_dir, remove_dm, vbd_ids, HotplugError};
use crate::disk::dm::{self, Control, DevRef, Table, Target};
use crate::disk::loopdev::{self, LoopOptions};
use crate::disk::{self, DiskId};
use crate::xenbus::key::DM_NAME;

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
        if let Some(id) = xs
            .try_read_text(&format!("{be}/{key}"))
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

/// The stores the vbds in Xenstore record (`blkbackd-cow-file`): each path,
/// with the (st_dev, inode) it names now, if any.
async fn claimed_stores(xs: &Client) -> Result<Vec<(String, Option<(u64, u64)>)>, HotplugError> {
    let keys: Vec<String> = crate::xenbus::scan(xs)
        .await?
        .into_iter()
        .map(|(d, v)| crate::xenbus::node(&crate::xenbus::backend_path(d, v), COW_FILE))
        .collect();
    let values = futures_util::future::join_all(keys.iter().map(|k| xs.try_read_text(k))).await;
    let mut out = Vec::new();
    for v in values {
        if let Some(p) = v? {
            let id = std::fs::symlink_metadata(&p)
                .ok()
                .map(|m| (m.dev(), m.ino()));
            out.push((p, id));
        }
    }
    Ok(out)
}

/// Creates the store `path`, sparse, of `len` bytes. A file already there
/// is a store left behind (a crash between its creation and its record in
/// Xenstore, or a host that went down with the vbd) unless `claimed` says a
/// vbd in Xenstore records it: a stale one is removed and made afresh, a
/// claimed one is refused and left as it is.
pub(super) fn fresh_store(
    path: &Path,
    len: u64,
    claimed: impl Fn(&std::fs::Metadata) -> bool,
) -> Result<std::fs::File, HotplugError> {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(m) if claimed(&m) => {
            return Err(HotplugError::File(
                format!("creating {shown}"),
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a vbd in Xenstore records it as its store; left as it is",
                ),
            ))
        }
        Ok(_) => {
            tracing::warn!("removing {shown}: a store no vbd claims (left by a crash)");
            std::fs::remove_file(path).map_err(io(format!("removing the stale {shown}")))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(HotplugError::File(format!("looking up {shown}"), e)),
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .map_err(io(format!("creating {shown}")))?;
    if let Err(e) = f.set_len(len) {
        let _ = std::fs::remove_file(path);
        return Err(HotplugError::File(format!("sizing {shown}"), e));
    }
    Ok(f)
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
    // Nothing may be recorded yet: undoing a failure would remove what an
    // earlier add of this vbd made, and may still be serving.
    for key in [ORIGIN, COW, COW_FILE, DM_NAME] {
        if xs.try_read_text(&format!("{be}/{key}")).await?.is_some() {
            return Err(HotplugError::AlreadyMade {
                be: be.to_owned(),
                key,
            });
        }
    }
    let cow_dir = env_dir("BLKBACKD_COW_DIR", "/var/lib/blkbackd/cow");
    let cow_file = cow_dir.join(format!("{domid}-{devid}.cow"));
    let claims = claimed_stores(xs).await?;
    let claimed = |m: &std::fs::Metadata| {
        claims
            .iter()
            .any(|(p, id)| Path::new(p) == cow_file || *id == Some((m.dev(), m.ino())))
    };
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
        std::fs::create_dir_all(&cow_dir).map_err(io(format!("making {}", cow_dir.display())))?;
        let f = fresh_store(&cow_file, size + size / 8 + (1 << 20), claimed)?;
        xs.write(&format!("{be}/{COW_FILE}"), cow_file.display().to_string())
            .await?;
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
        if let Some(v) = xs.try_read_text(&format!("{be}/{key}")).await? {
            if let Some(id) = parse_id(&v) {
                // Released only if it is still the device we made.
                loopdev::release_by_id(id)?;
            }
            xs.rm(&format!("{be}/{key}")).await?;
        }
    }
    if let Some(f) = xs.try_read_text(&format!("{be}/{COW_FILE}")).await? {
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
/// `error` over the same size, so nothing more reaches the storage. Acts
/// only on the disk the vbd published (dev_t and diskseq), addressed by its
/// UUID: a device re-created under the vbd's name is refused, untouched.
pub async fn revoke(xs: &Client, domid: u16, devid: u32) -> Result<String, HotplugError> {
    let name = dm::vbd_name(domid, devid, None)?;
    let be = crate::xenbus::backend_path(crate::xen::DomId(domid), devid);
    let published = super::published_id(xs, &be)
        .await?
        .ok_or(HotplugError::Params(
            name.clone(),
            "its vbd published no disk",
        ))?;
    let ctl = Control::open()?;
    let (id, _) = dm::bind(&ctl, &name, published)?;
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

    #[test]
    fn a_stale_store_is_made_afresh_and_a_claimed_one_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("3-51712.cow");
        // None there: made.
        let f = fresh_store(&path, 1 << 20, |_| false).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 1 << 20);
        drop(f);
        // Left by a crash, claimed by no vbd: replaced by an empty one.
        std::fs::write(&path, b"old data").unwrap();
        let held = std::fs::File::open(&path).unwrap(); // its inode stays taken
        let old = held.metadata().unwrap().ino();
        let f = fresh_store(&path, 1 << 20, |_| false).unwrap();
        let m = f.metadata().unwrap();
        assert_ne!(m.ino(), old);
        assert_eq!(m.len(), 1 << 20);
        assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
        // Claimed by a vbd: refused, untouched.
        std::fs::write(&path, b"live data").unwrap();
        let live = std::fs::metadata(&path).unwrap().ino();
        let e = fresh_store(&path, 1 << 20, |m| m.ino() == live).unwrap_err();
        assert!(e.to_string().contains("records it as its store"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"live data");
    }
}
