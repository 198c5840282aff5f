//! The sharing check: a disk goes to one writing VM at most.
//!
//! As the stock `block` script does, `add` refuses storage that another vbd
//! already uses when either of them writes it, unless both vbds belong to the
//! same VM. A vbd writes unless its `mode` is `r`: a vbd without `mode` is
//! served writable, so it counts as a writer.
//!
//! Storage is compared by identity, never by the text of `params` (which
//! spells one file many ways: `/a/./x.img`, a symlinked directory, a hard
//! link, the loop device it is attached to):
//! - a block device by its dev_t (`st_rdev`);
//! - a file by its file system's dev_t and its inode; a loop device also
//!   counts as its backing file (`LOOP_GET_STATUS64`), so `file:X`,
//!   `direct:X` and `phy:/dev/loopN` over X are one disk;
//! - a thin volume by its pool (its dm name, and its dev_t when
//!   device-mapper can say) and its thin id; a dm device whose table is one
//!   `thin` target also counts as that volume;
//! - a snapshot disk reads its template (a file, shared read-only by every
//!   snapshot of it) and writes its own store.
//!
//! What another vbd uses is taken from what its block script published,
//! which names the storage actually in use: `physical-device` (checked
//! against `diskseq` when there is one: a number that now belongs to another
//! disk means the published one is gone), `physical-file` with `file-id`, a
//! snapshot's recorded loop devices and store. A vbd that published nothing
//! (its script has not run yet, or is another script still running) is
//! judged by its `params`, looked up with `stat` (no file is opened; a loop
//! device is, read-only, for its backing file). A vbd whose `add` failed
//! (`hotplug-status = error`) undid everything and uses nothing. When another
//! vbd's storage cannot be determined, `add` is refused rather than risk it.
//!
//! The same VM: the same domain, or two domains with the same `vm` node
//! (`/local/domain/<domid>/vm`, `/vm/<uuid>`: written by the toolstack where
//! the guest cannot write; a live migration's receiving domain has its
//! sender's), a stub domain counting as the VM of its `target`. A domain
//! without a `vm` node is no other domain's twin (the stock script takes a
//! missing one for a match, for a race of xend's; we fail closed).
//!
//! `add` runs the check under the host's hotplug lock ([`super::HostLock`]),
//! held until its result is written, so two `add`s cannot both pass it.
#![forbid(unsafe_code)]

use std::fmt;
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use xenstore::{Client, Xs};

use super::snapshot::{self, COW, COW_FILE, ORIGIN};
use super::{vbd_ids, HotplugError, Params};
use crate::disk::{self, dm, loopdev, sys, FileId};
use crate::xenbus;

/// One piece of storage, by identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Storage {
    /// A block device, by dev_t.
    Device {
        /// Major.
        major: u32,
        /// Minor.
        minor: u32,
    },
    /// A file: its file system's dev_t and its inode.
    File {
        /// `st_dev` as (major, minor).
        dev: (u32, u32),
        /// `st_ino`.
        ino: u64,
    },
    /// A thin volume, its pool named.
    ThinByName {
        /// The pool's dm name.
        pool: String,
        /// The thin id.
        id: u32,
    },
    /// A Ceph RBD image or one of its snapshots (read-only: a snapshot
    /// conflicts with nothing), by pool, namespace and names.
    Rbd(crate::rbd::Spec),
    /// A thin volume, its pool by dev_t.
    ThinByDev {
        /// The pool's dev_t.
        pool: (u32, u32),
        /// The thin id.
        id: u32,
    },
}

impl fmt::Display for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Storage::Device { major, minor } => write!(f, "block device {major}:{minor}"),
            Storage::File { dev, ino } => {
                write!(f, "the file with inode {ino} on device {}:{}", dev.0, dev.1)
            }
            Storage::ThinByName { pool, id } => write!(f, "thin volume {id} of pool {pool}"),
            Storage::Rbd(spec) if spec.snap.is_some() => write!(f, "RBD snapshot {spec}"),
            Storage::Rbd(spec) => write!(f, "RBD image {spec}"),
            Storage::ThinByDev { pool, id } => {
                write!(f, "thin volume {id} of pool {}:{}", pool.0, pool.1)
            }
        }
    }
}

/// The storage a vbd uses, each with whether the vbd writes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Uses(Vec<(Storage, bool)>);

impl Uses {
    /// Adds `storage`, written or only read.
    pub(super) fn add(&mut self, storage: Storage, writes: bool) {
        self.0.push((storage, writes));
    }

    fn add_all(&mut self, storage: Vec<Storage>, writes: bool) {
        for s in storage {
            self.add(s, writes);
        }
    }

    /// The first storage both use where one of them writes.
    fn conflict(&self, other: &Uses) -> Option<&Storage> {
        self.0
            .iter()
            .find(|(s, w)| other.0.iter().any(|(t, v)| s == t && (*w || *v)))
            .map(|(s, _)| s)
    }
}

/// A vbd, as the check sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Vbd {
    /// Its frontend's domain (from the backend path).
    pub domid: String,
    /// The VM it belongs to (`vm` of its domain, or of its domain's target).
    pub vm: Option<String>,
    /// `params`, for messages.
    pub params: Option<String>,
    /// `mode` as written, for messages.
    pub mode: Option<String>,
    /// What it uses.
    pub uses: Uses,
}

fn same_vm(a: &Vbd, b: &Vbd) -> bool {
    a.domid == b.domid || (a.vm.is_some() && a.vm == b.vm)
}

/// The first of `others` that `me` may not share storage with, and the
/// storage: one they both use, one of them writing, in different VMs.
pub(super) fn first_conflict<'a>(me: &Vbd, others: &'a [Vbd]) -> Option<(&'a Vbd, Storage)> {
    others
        .iter()
        .filter(|o| !same_vm(me, o))
        .find_map(|o| me.uses.conflict(&o.uses).map(|s| (o, s.clone())))
}

/// An RBD image or snapshot, by pool, namespace and names.
pub(super) fn rbd(spec: &crate::rbd::Spec) -> Storage {
    Storage::Rbd(spec.clone())
}

/// A file, by the metadata of an open fd or of a `stat`.
pub(super) fn file(meta: &Metadata) -> Storage {
    Storage::File {
        dev: sys::split_dev(meta.dev()),
        ino: meta.ino(),
    }
}

/// What block device `major:minor` holds: itself, for a loop device its
/// backing file (read from `dev`, the device opened), for a dm thin device
/// its volume.
pub(super) fn device(dev: Option<&File>, major: u32, minor: u32) -> io::Result<Vec<Storage>> {
    let mut out = vec![Storage::Device { major, minor }];
    if let (true, Some(dev)) = (major == loopdev::LOOP_MAJOR, dev) {
        if let Some((dev, ino)) = loopdev::backing_of(dev)? {
            out.push(Storage::File { dev, ino });
        }
    }
    if let Some((pool, id)) = dm::thin_volume_of(major, minor) {
        out.push(Storage::ThinByDev { pool, id });
    }
    Ok(out)
}

/// Thin volume `id` of `pool`: by name, and by the pool's dev_t when
/// device-mapper can say.
pub(super) fn thin(pool: &str, id: u32) -> Vec<Storage> {
    let mut out = vec![Storage::ThinByName {
        pool: pool.to_owned(),
        id,
    }];
    let info = dm::Control::open().and_then(|c| c.info(&dm::DevId::Name(pool.to_owned())));
    if let Ok(info) = info {
        out.push(Storage::ThinByDev {
            pool: (info.major, info.minor),
            id,
        });
    }
    out
}

/// What a published block device holds now; nothing if it is gone. It is
/// opened (read-only) only to check its `diskseq` or to ask a loop device
/// for its backing file.
fn published_device(major: u32, minor: u32, diskseq: Option<u64>) -> Result<Vec<Storage>, String> {
    if diskseq.is_none() && major != loopdev::LOOP_MAJOR {
        return device(None, major, minor).map_err(|e| format!("{major}:{minor}: {e}"));
    }
    match disk::open_published(major, minor, diskseq) {
        Ok(Some(f)) => device(Some(&f), major, minor).map_err(|e| format!("{major}:{minor}: {e}")),
        Ok(None) => Ok(Vec::new()),
        Err(e) => Err(e.to_string()),
    }
}

/// `stat` (or `lstat`): `None` when the path names nothing.
fn stat(path: &Path, follow: bool) -> Result<Option<Metadata>, String> {
    let m = if follow {
        std::fs::metadata(path)
    } else {
        std::fs::symlink_metadata(path)
    };
    match m {
        Ok(m) => Ok(Some(m)),
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            Ok(None)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// What `params` names now, looked up with `stat`, without opening anything
/// but a loop device (read-only, for its backing file). Thin volumes are
/// added by the caller.
pub(super) fn declared(params: &Params, writes: bool) -> Result<Uses, String> {
    let mut uses = Uses::default();
    match params {
        Params::Block(p) => {
            if let Some(m) = stat(p, true)?.filter(|m| m.file_type().is_block_device()) {
                let (major, minor) = sys::split_dev(m.rdev());
                uses.add_all(published_device(major, minor, None)?, writes);
            }
        }
        Params::File(p) | Params::Direct(p) => {
            let follow = matches!(params, Params::File(_));
            if let Some(m) = stat(p, follow)?.filter(|m| m.file_type().is_file()) {
                uses.add(file(&m), writes);
            }
        }
        Params::Snapshot(t) => {
            if let Some(m) = stat(&snapshot::template_path(t), true)?.filter(|m| m.is_file()) {
                uses.add(file(&m), false);
            }
        }
        Params::Rbd(spec) => uses.add(rbd(spec), writes && spec.snap.is_none()),
        Params::Thin { .. } => {}
    }
    Ok(uses)
}

/// What a vbd's backend keys (see [`KEYS`]) say it uses.
fn uses_of(k: &[Option<String>]) -> Result<Uses, String> {
    let [params, mode, _status, phys, seq, pfile, fid, origin, cow, cow_file] = k else {
        return Err("internal: wrong key count".into());
    };
    let writes = mode.as_deref() != Some("r");
    let params = params.as_deref().and_then(|p| Params::parse(p).ok());
    let mut uses = Uses::default();
    let mut published = false;
    if let Some(Ok((major, minor))) = phys
        .as_deref()
        .map(|p| disk::parse_physical_device(p.as_bytes()))
    {
        let seq = seq
            .as_deref()
            .and_then(|s| disk::parse_diskseq(s.as_bytes()).ok());
        uses.add_all(published_device(major, minor, seq)?, writes);
        published = true;
    }
    if let (Some(_), Some(Ok(id))) = (pfile, fid.as_deref().map(|f| FileId::parse(f.as_bytes()))) {
        uses.add(
            Storage::File {
                dev: sys::split_dev(id.dev),
                ino: id.ino,
            },
            writes,
        );
        published = true;
    }
    // A snapshot: the template read, the store written, whatever the mode.
    for (v, w) in [(origin, false), (cow, true)] {
        if let Some(id) = v.as_deref().and_then(snapshot::parse_id) {
            uses.add_all(published_device(id.major, id.minor, Some(id.diskseq))?, w);
        }
    }
    if let Some(f) = cow_file {
        if let Some(m) = stat(Path::new(f), false)?.filter(|m| m.is_file()) {
            uses.add(file(&m), true);
        }
    }
    // A thin volume is named only by `params` (the dm device published is
    // this vbd's own).
    if let Some(Params::Thin { pool, id, .. }) = &params {
        uses.add_all(thin(pool, *id), writes);
    }
    if !published {
        if let Some(p) = &params {
            for (s, w) in declared(p, writes)?.0 {
                uses.add(s, w);
            }
        }
    }
    Ok(uses)
}

/// The backend keys read for each other vbd, in the order [`uses_of`] takes.
const KEYS: [&str; 10] = [
    "params",
    "mode",
    "hotplug-status",
    "physical-device",
    "diskseq",
    "physical-file",
    "file-id",
    ORIGIN,
    COW,
    COW_FILE,
];

/// The VM `domid` belongs to: the `vm` node of its `target` if it is a stub
/// domain, else its own.
async fn vm_of(xs: &Client, domid: &str) -> Result<Option<String>, HotplugError> {
    let target = xs
        .try_read_text(&format!("/local/domain/{domid}/target"))
        .await?
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()));
    let of = target.as_deref().unwrap_or(domid);
    Ok(xs
        .try_read_text(&format!("/local/domain/{of}/vm"))
        .await?
        .filter(|v| !v.is_empty()))
}

/// Refuses `uses` (the disk of the vbd at `be`, `params` = `raw`) if another
/// vbd of another VM uses any of it, either of them writing.
pub(super) async fn check(
    xs: &Client,
    be: &str,
    raw: &str,
    uses: Uses,
    writable: bool,
) -> Result<(), HotplugError> {
    let me_abs = xs.get_domain_path(xenstore::DomId::DOM0).await? + "/" + be;
    let (my_domid, _) = vbd_ids(be)?;
    // Every request in flight at once (a dom0 with many guests must not pay
    // a round trip per vbd): the vbds, then their keys.
    let mut others = Vec::new();
    for (domid, devid) in xenbus::scan(xs).await? {
        let other = xenbus::backend_path(domid, devid);
        if other != me_abs && other != be {
            others.push((domid.0.to_string(), other));
        }
    }
    let paths: Vec<String> = others
        .iter()
        .flat_map(|(_, o)| KEYS.map(|k| format!("{o}/{k}")))
        .collect();
    let values = futures_util::future::join_all(paths.iter().map(|k| xs.try_read_text(k)))
        .await
        .into_iter()
        .collect::<Result<Vec<Option<String>>, xenstore::Error>>()?;
    let my_domid = my_domid.to_string();
    let mut domains: Vec<&str> = others.iter().map(|(d, _)| d.as_str()).collect();
    domains.push(&my_domid);
    domains.sort_unstable();
    domains.dedup();
    let vms = futures_util::future::join_all(domains.iter().map(|d| vm_of(xs, d)))
        .await
        .into_iter()
        .collect::<Result<Vec<Option<String>>, HotplugError>>()?;
    let vm = |d: &str| domains.binary_search(&d).ok().and_then(|i| vms[i].clone());
    let mut judged = Vec::new();
    for ((domid, path), k) in others.iter().zip(values.chunks(KEYS.len())) {
        if k[2].as_deref() == Some("error") {
            continue; // its add failed and undid what it made
        }
        let uses = uses_of(k).map_err(|why| HotplugError::Undetermined {
            vbd: path.clone(),
            why,
        })?;
        judged.push(Vbd {
            domid: domid.clone(),
            vm: vm(domid),
            params: k[0].clone(),
            mode: k[1].clone(),
            uses,
        });
    }
    let me = Vbd {
        vm: vm(&my_domid),
        domid: my_domid,
        params: Some(raw.to_owned()),
        mode: None,
        uses,
    };
    match first_conflict(&me, &judged) {
        None => Ok(()),
        Some((o, storage)) => Err(HotplugError::Shared {
            what: raw.to_owned(),
            domid: o.domid.clone(),
            theirs: format!(
                "{}, {}",
                o.params.as_deref().unwrap_or("no params"),
                match &o.mode {
                    Some(m) => format!("mode {m}"),
                    None => "no mode: a writer".into(),
                }
            ),
            storage: storage.to_string(),
            want: if writable { "write" } else { "read" },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vbd(domid: &str, vm: Option<&str>, uses: &[(Storage, bool)]) -> Vbd {
        Vbd {
            domid: domid.into(),
            vm: vm.map(Into::into),
            params: None,
            mode: None,
            uses: Uses(uses.to_vec()),
        }
    }

    fn file(ino: u64) -> Storage {
        Storage::File { dev: (254, 0), ino }
    }

    #[test]
    fn an_rbd_image_has_one_writer_and_its_snapshots_share_with_anyone() {
        let spec = |s: &str| crate::rbd::Spec::parse(s).unwrap();
        let uses = |p: &str, w: bool| {
            let params = Params::parse(&format!("rbd:{p}")).unwrap();
            declared(&params, w).unwrap().0
        };
        let writer = vbd("2", None, &uses("vms/db", true));
        // The same image written by another VM: refused.
        let other = vbd("3", None, &uses("vms/db", true));
        assert_eq!(
            first_conflict(&other, std::slice::from_ref(&writer)).map(|f| f.1),
            Some(rbd(&spec("vms/db")))
        );
        // Read by another: refused too (it would read under a writer).
        let reader = vbd("3", None, &uses("vms/db", false));
        assert!(first_conflict(&reader, std::slice::from_ref(&writer)).is_some());
        // Written by another VM, none of these conflicts with `w`.
        let free = |w: &Vbd, others: &[&str]| {
            for p in others {
                let o = vbd("3", None, &uses(p, true));
                assert!(first_conflict(&o, std::slice::from_ref(w)).is_none(), "{p}");
            }
        };
        // A snapshot of it (read-only whatever the mode), another image, the
        // same name in another pool or in a namespace of the pool.
        free(
            &writer,
            &["vms/db@nightly", "vms/web", "other/db", "vms/tenant1/db"],
        );
        // A namespace is part of the image's identity.
        let in_ns = vbd("4", None, &uses("vms/tenant1/db", true));
        let reader = vbd("5", None, &uses("vms/tenant1/db", false));
        assert_eq!(
            first_conflict(&reader, std::slice::from_ref(&in_ns)).map(|f| f.1.to_string()),
            Some("RBD image vms/tenant1/db".to_string())
        );
        free(
            &in_ns,
            &["vms/db", "vms/tenant2/db", "vms/tenant1/db@nightly"],
        );
    }

    #[test]
    fn a_writer_excludes_every_other_vm_and_readers_share() {
        let dev = Storage::Device { major: 7, minor: 3 };
        for (mine, theirs, conflict) in [
            (true, true, true),
            (true, false, true),
            (false, true, true),
            (false, false, false),
        ] {
            let me = vbd("2", Some("/vm/a"), &[(file(12), mine)]);
            let other = vbd(
                "3",
                Some("/vm/b"),
                &[(dev.clone(), theirs), (file(12), theirs)],
            );
            let found = first_conflict(&me, std::slice::from_ref(&other));
            assert_eq!(
                found.map(|f| f.1),
                conflict.then(|| file(12)),
                "{mine} {theirs}"
            );
        }
        // Other storage, other inode, other file system: no conflict.
        let me = vbd("2", None, &[(file(12), true)]);
        let others = [
            vbd("3", None, &[(file(13), true)]),
            vbd(
                "4",
                None,
                &[(
                    Storage::File {
                        dev: (8, 1),
                        ino: 12,
                    },
                    true,
                )],
            ),
            vbd(
                "5",
                None,
                &[(
                    Storage::Device {
                        major: 7,
                        minor: 12,
                    },
                    true,
                )],
            ),
        ];
        assert_eq!(first_conflict(&me, &others), None);
    }

    #[test]
    fn the_same_vm_may_share_and_an_unknown_vm_is_nobodys_twin() {
        let me = vbd("2", Some("/vm/a"), &[(file(1), true)]);
        let same_domain = vbd("2", None, &[(file(1), true)]);
        let migrating = vbd("9", Some("/vm/a"), &[(file(1), true)]);
        assert_eq!(first_conflict(&me, &[same_domain, migrating]), None);
        let unknown = vbd("3", None, &[(file(1), false)]);
        assert!(first_conflict(&me, &[unknown]).is_some());
        let me = vbd("2", None, &[(file(1), true)]);
        let unknown = vbd("3", None, &[(file(1), false)]);
        assert!(first_conflict(&me, &[unknown]).is_some());
    }

    #[test]
    fn a_snapshot_template_is_shared_read_only() {
        // Two snapshots of one template, each writing its own store.
        let a = vbd("2", None, &[(file(1), false), (file(10), true)]);
        let b = vbd("3", None, &[(file(1), false), (file(11), true)]);
        assert_eq!(first_conflict(&a, std::slice::from_ref(&b)), None);
        // The template itself given to a writer.
        let w = vbd("4", None, &[(file(1), true)]);
        assert_eq!(first_conflict(&w, &[a, b]).map(|f| f.1), Some(file(1)));
    }

    #[test]
    fn a_vbd_is_a_writer_unless_its_mode_is_r() {
        let keys = |mode: Option<&str>| {
            let mut k: Vec<Option<String>> = vec![None; KEYS.len()];
            k[0] = Some("thin:pool0/7:1G".into());
            k[1] = mode.map(Into::into);
            k
        };
        let writes = |mode| {
            let u = uses_of(&keys(mode)).unwrap();
            assert!(!u.0.is_empty());
            u.0.iter().all(|(_, w)| *w)
        };
        assert!(!writes(Some("r")));
        assert!(writes(Some("w")));
        assert!(writes(None));
        assert!(writes(Some("w!")));
        assert!(writes(Some("")));
    }

    #[test]
    fn a_vbd_that_published_nothing_is_judged_by_its_params() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.img");
        std::fs::write(&img, [0u8; 512]).unwrap();
        let m = std::fs::metadata(&img).unwrap();
        let mut k: Vec<Option<String>> = vec![None; KEYS.len()];
        k[0] = Some(format!("file:{}/./a.img", dir.path().display()));
        assert_eq!(uses_of(&k).unwrap(), Uses(vec![(super::file(&m), true)]));
        // A path that names nothing uses nothing; an unparsable one neither.
        k[0] = Some(format!("direct:{}/b.img", dir.path().display()));
        assert_eq!(uses_of(&k).unwrap(), Uses::default());
        k[0] = Some("nonsense".into());
        assert_eq!(uses_of(&k).unwrap(), Uses::default());
        // Published: the file-id, not what the path names now.
        k[0] = Some(format!("direct:{}/a.img", dir.path().display()));
        k[5] = Some(img.display().to_string());
        k[6] = Some("803:1a2b:7".into());
        assert_eq!(
            uses_of(&k).unwrap(),
            Uses(vec![(
                Storage::File {
                    dev: (8, 3),
                    ino: 0x1a2b
                },
                true
            )])
        );
    }

    #[test]
    fn messages_name_the_storage() {
        assert_eq!(
            Storage::Device { major: 7, minor: 3 }.to_string(),
            "block device 7:3"
        );
        assert_eq!(
            file(12).to_string(),
            "the file with inode 12 on device 254:0"
        );
        assert_eq!(thin("p0", 7)[0].to_string(), "thin volume 7 of pool p0");
    }
}
