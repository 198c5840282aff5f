//! The libxl block-script contract: `blkbackd hotplug add|remove`, run as
//! `/etc/xen/scripts/block-blkbackd` with `XENBUS_PATH` set to the vbd's
//! backend directory (relative to dom0's home, as libxl passes it).
//!
//! `add` turns `params` into a block device, publishes it by identity
//! (`physical-device` as `%x:%x`, `diskseq` as `%llx`, `physical-device-path`)
//! and then `hotplug-status = connected`; on any failure it undoes what it made,
//! writes `hotplug-error` and `hotplug-status = error`, and exits non-zero
//! (libxl judges by the exit status alone). `remove` undoes exactly what `add`
//! made, is idempotent, and is safe when `add` never finished.
//!
//! `params` grammar:
//! - `/dev/...` or `phy:/dev/...`: an existing block device, served as is;
//! - `file:/path/to/image`: a regular file, attached to a loop device;
//! - `direct:/path/to/image`: a regular file served directly by the daemon
//!   (no loop device; no root needed), published as `physical-file` and
//!   `file-id` (`%x:%x[:%x]`: the file system's device, the inode and its
//!   generation), which the daemon checks on the fd it opens;
//! - `snapshot:TEMPLATE`: a copy-on-write disk over the template image
//!   `$BLKBACKD_TEMPLATES/TEMPLATE.img` (default `/var/lib/blkbackd/templates`):
//!   the template on a read-only loop device, a fresh sparse store in
//!   `$BLKBACKD_COW_DIR` (default `/var/lib/blkbackd/cow`) on another, and a
//!   dm `snapshot` device `blkbackd-<domid>-<devid>`; `remove` deletes all
//!   three, so the guest's changes live as long as the vbd;
//! - `thin:POOL/ID:SIZE`: thin volume `ID` (decimal, below 2^24) of the
//!   existing dm thin pool `POOL`, created in the pool if it is not there yet
//!   (`create_thin`), activated as the dm `thin` device
//!   `blkbackd-<domid>-<devid>` of `SIZE` bytes (a multiple of 512, with an
//!   optional K, M, G or T suffix: a thin volume has no size of its own);
//!   `remove` deactivates it and keeps the volume's data;
//! - `rbd:POOL/IMAGE[@SNAP]`: a Ceph RBD image, served by the daemon through
//!   librbd (`rbd/`). `add` opens it (the cluster reached with the `[rbd]`
//!   settings of the configuration file named by `$BLKBACKD_CONFIG`, default
//!   `/etc/blkbackd/blkbackd.toml` if it exists) to check that it is there,
//!   that nobody else holds its lock if it is to be written, and to read its
//!   id, then publishes `rbd-image` and `rbd-image-id`; the daemon serves only
//!   an image with that id. A snapshot is served read-only (mode `r`; `w` is
//!   refused). `remove` has nothing to undo: the daemon's close releases the
//!   lock.
//!
//! Every path is typed before it is opened (a FIFO or a character device is
//! refused without being opened). `add` refuses storage another VM's vbd
//! uses when either writes it, comparing identities, not `params` text
//! (`hotplug/sharing.rs`), and holds the host's [`HostLock`] from that check until
//! its result is written.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use xenstore::{Client, Xs};

use crate::disk::loopdev::{self, LoopOptions};
use crate::disk::{self, DiskId, FileId};
pub use crate::xenbus::Published;
use crate::xenbus::{self, key, node, published::Nodes};

/// What `params` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Params {
    /// An existing block device.
    Block(PathBuf),
    /// A file, through a loop device.
    File(PathBuf),
    /// A file served directly.
    Direct(PathBuf),
    /// A copy-on-write snapshot of a template (device-mapper).
    Snapshot(String),
    /// A Ceph RBD image.
    Rbd(crate::rbd::Spec),
    /// A thin volume (device-mapper).
    Thin {
        /// The pool's dm name.
        pool: String,
        /// The volume's thin id in the pool.
        id: u32,
        /// Its size in 512-byte sectors.
        sectors: u64,
    },
}

/// A hotplug failure, written to `hotplug-error`.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// `params` does not follow the grammar.
    #[error("params {0:?} is not understood: {1}")]
    Params(String, &'static str),
    /// `mode` is neither `r` nor `w`.
    #[error("mode {0:?} is neither r nor w")]
    Mode(String),
    /// Another domain uses the disk in a conflicting mode.
    #[error(
        "{what} is already in use by domain {domid} ({theirs}): both are {storage}; \
         refusing {want} access"
    )]
    Shared {
        /// The disk.
        what: String,
        /// Who has it.
        domid: String,
        /// Their `params` and mode.
        theirs: String,
        /// What both use.
        storage: String,
        /// Our access: "read" or "write".
        want: &'static str,
    },
    /// What another vbd uses could not be determined.
    #[error(
        "cannot tell what storage {vbd} uses ({why}); refusing rather than risk giving \
         its disk to a second writer"
    )]
    Undetermined {
        /// The other vbd's backend path.
        vbd: String,
        /// Why.
        why: String,
    },
    /// `add` found what an earlier `add` of the same vbd made.
    #[error(
        "{be} already records {key} from an earlier add; refusing to make a second disk \
         over it (remove undoes the first)"
    )]
    AlreadyMade {
        /// The vbd.
        be: String,
        /// The record found.
        key: &'static str,
    },
    /// The host's hotplug lock could not be taken.
    #[error("the hotplug lock {path}: {source}")]
    Lock {
        /// The lock file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A thin pool that cannot take a volume's writes.
    #[error("thin pool {pool}: {why} ({status}); refusing to activate a volume in it")]
    Pool {
        /// The pool's name.
        pool: String,
        /// Why.
        why: &'static str,
        /// Its status, summed up.
        status: String,
    },
    /// The configuration file could not be used.
    #[error("{0}")]
    Config(String),
    /// The RBD image could not be used.
    #[error(transparent)]
    Rbd(#[from] crate::rbd::RbdError),
    /// Not available yet.
    #[error("{0} disks are not supported yet")]
    Unsupported(&'static str),
    /// Device-mapper failed.
    #[error(transparent)]
    Dm(#[from] crate::disk::dm::DmError),
    /// A file could not be made or read.
    #[error("{0}: {1}")]
    File(String, std::io::Error),
    /// The disk layer failed.
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    /// Xenstore failed.
    #[error(transparent)]
    Xenstore(#[from] xenstore::Error),
    /// No `XENBUS_PATH`.
    #[error("XENBUS_PATH is not set (libxl sets it for block scripts)")]
    NoPath,
}

fn absolute(p: &str, raw: &str) -> Result<PathBuf, HotplugError> {
    let path = Path::new(p);
    let ok = path.is_absolute()
        && !p.contains(['\0', '\n'])
        && !path
            .components()
            .any(|c| c == std::path::Component::ParentDir);
    if ok {
        Ok(path.to_owned())
    } else {
        Err(HotplugError::Params(
            raw.to_owned(),
            "the path must be absolute, without `..`",
        ))
    }
}

impl Params {
    /// Parses `params` strictly.
    pub fn parse(raw: &str) -> Result<Params, HotplugError> {
        let bad = |why| HotplugError::Params(raw.to_owned(), why);
        if raw.is_empty() {
            return Err(bad("it is empty"));
        }
        if let Some(p) = raw.strip_prefix("file:") {
            return Ok(Params::File(absolute(p, raw)?));
        }
        if let Some(p) = raw.strip_prefix("direct:") {
            return Ok(Params::Direct(absolute(p, raw)?));
        }
        if let Some(p) = raw.strip_prefix("phy:") {
            return Ok(Params::Block(absolute(p, raw)?));
        }
        if let Some(t) = raw.strip_prefix("snapshot:") {
            if t.is_empty() || t.starts_with('.') || t.contains(['/', '\0', '\n']) {
                return Err(bad(
                    "a snapshot names its template, e.g. snapshot:debian-12",
                ));
            }
            return Ok(Params::Snapshot(t.to_owned()));
        }
        if let Some(t) = raw.strip_prefix("thin:") {
            let form = "a thin volume is thin:POOL/ID:SIZE, e.g. thin:pool0/7:20G";
            let (pool, rest) = t.split_once('/').ok_or_else(|| bad(form))?;
            let (id, size) = rest.split_once(':').ok_or_else(|| bad(form))?;
            crate::disk::dm::validate_name(pool)
                .map_err(|_| bad("the pool is not a valid device-mapper name"))?;
            let id = Some(id)
                .filter(|i| i.len() == 1 || !i.starts_with('0'))
                .and_then(xenstore::wire::parse_decimal)
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| n < 1 << 24)
                .ok_or_else(|| bad("the thin id is a decimal number below 2^24"))?;
            let sectors = parse_size(size).ok_or_else(|| {
                bad("SIZE is bytes (a multiple of 512, not 0) with an optional K, M, G or T")
            })?;
            return Ok(Params::Thin {
                pool: pool.to_owned(),
                id,
                sectors,
            });
        }
        if let Some(t) = raw.strip_prefix("rbd:") {
            return crate::rbd::Spec::parse(t).map(Params::Rbd).map_err(bad);
        }
        if raw.starts_with('/') {
            return Ok(Params::Block(absolute(raw, raw)?));
        }
        Err(bad(
            "expected /dev/..., phy:..., file:..., direct:..., snapshot:..., thin:... or rbd:...",
        ))
    }
}

/// A directory from the environment, or its default.
fn env_dir(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

/// The host's hotplug lock: an exclusive `flock` on
/// `$BLKBACKD_LOCK_DIR/hotplug.lock` (default `/run/blkbackd`), which `add`
/// holds from its sharing check until its result is written, as Xen's own
/// `block` script holds `claim_lock block`. The kernel drops it when the
/// process ends, however it ends; the file is never removed.
#[derive(Debug)]
pub struct HostLock {
    _file: std::fs::File,
}

/// Where the hotplug lock lives, with the effective uid when it could be
/// read: `$BLKBACKD_LOCK_DIR` if set, else `/run/blkbackd` for root (the
/// block script), else a directory of the user's own under the temporary
/// directory (the embedded default run by a user, which can only serve
/// plain files: it shares no storage with root's block scripts).
fn lock_dir() -> (PathBuf, Option<u32>) {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").ok().map(|m| m.uid());
    if let Some(d) = std::env::var_os("BLKBACKD_LOCK_DIR") {
        return (PathBuf::from(d), uid);
    }
    match uid {
        Some(0) | None => (PathBuf::from("/run/blkbackd"), uid),
        Some(u) => (std::env::temp_dir().join(format!("blkbackd-{u}")), uid),
    }
}

/// How long `add` waits for the lock before it fails with a clear error
/// (libxl's hotplug timeout, 40 s, would kill it silently).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl HostLock {
    /// Takes the lock, waiting at most `LOCK_WAIT` (30 s).
    pub async fn acquire() -> Result<HostLock, HotplugError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let (dir, uid) = lock_dir();
        let path = dir.join("hotplug.lock");
        let err = |source| HotplugError::Lock {
            path: path.display().to_string(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(if uid == Some(0) { 0o755 } else { 0o700 })
            .create(&dir)
            .map_err(err)?;
        if let Some(uid) = uid.filter(|&u| u != 0) {
            // A directory in a shared /tmp: only ours, or someone else
            // could hold or replace the lock.
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::symlink_metadata(&dir).map_err(err)?;
            if !m.is_dir() || m.uid() != uid || m.mode() & 0o022 != 0 {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "the directory is not this user's alone",
                )));
            }
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(err)?;
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            if disk::sys::try_lock_exclusive(&file).map_err(err)? {
                return Ok(HostLock { _file: file });
            }
            if std::time::Instant::now() > deadline {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("another block script has held it for {LOCK_WAIT:?}"),
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

/// `add`: builds the disk and publishes it. On failure, reports it in
/// Xenstore and returns the error (the caller exits non-zero). Runs under
/// the host's [`HostLock`] until its result is written, so that a second
/// `add` sees this one's disk, or its failure, in its sharing check.
pub async fn add(xs: &Client, be: &str) -> Result<Published, HotplugError> {
    // What talks to a network cluster is done before the host's lock is
    // taken, so that a slow cluster holds up no other disk's `add`.
    let (made, _lock) = match remote_check(xs, be).await {
        Err(e) => (Err(e), None),
        Ok(checked) => match HostLock::acquire().await {
            Ok(lock) => (add_inner(xs, be, checked).await, Some(lock)),
            Err(e) => (Err(e), None),
        },
    };
    match &made {
        Ok(id) => {
            xs.write(&node(be, key::HOTPLUG_STATUS), "connected")
                .await?;
            tracing::info!(backend = be, "hotplug add: {id} published");
        }
        Err(e) => {
            let _ = xs.write(&node(be, key::HOTPLUG_ERROR), e.to_string()).await;
            let _ = xs.write(&node(be, key::HOTPLUG_STATUS), "error").await;
        }
    }
    made
}

/// A disk opened and typed for `add`, before the sharing check: the fd
/// checked is the fd attached or published, so the identity compared is the
/// identity served.
enum Prepared<'a> {
    Block(&'a Path, disk::OpenedDisk),
    File(&'a Path, std::fs::File, LoopOptions),
    Direct(&'a Path, FileId),
    Snapshot(&'a str),
    /// Checked before the host's lock (`remote_check`).
    Rbd,
    Thin {
        pool: &'a str,
        id: u32,
        sectors: u64,
    },
}

/// Opens what `params` names (refusing the wrong type of node before it is
/// opened) and says what storage it uses, for the sharing check.
fn prepare(params: &Params, writable: bool) -> Result<(Prepared<'_>, sharing::Uses), HotplugError> {
    let mut uses = sharing::Uses::default();
    let prepared = match params {
        Params::Block(p) => {
            let d = disk::identify(p, writable)?;
            let held = sharing::device(Some(&d.file), d.id.major, d.id.minor)
                .map_err(|e| HotplugError::File(p.display().to_string(), e))?;
            for s in held {
                uses.add(s, writable);
            }
            Prepared::Block(p, d)
        }
        Params::File(p) => {
            let opts = LoopOptions {
                read_only: !writable,
                ..LoopOptions::default()
            };
            let file = loopdev::open_backing(p, &opts)?;
            let meta = file
                .metadata()
                .map_err(|e| HotplugError::File(format!("fstat of {}", p.display()), e))?;
            uses.add(sharing::file(&meta), writable);
            Prepared::File(p, file, opts)
        }
        Params::Direct(p) => {
            let (file, id) = disk::identify_file(p, writable)?;
            let meta = file
                .metadata()
                .map_err(|e| HotplugError::File(format!("fstat of {}", p.display()), e))?;
            uses.add(sharing::file(&meta), writable);
            Prepared::Direct(p, id)
        }
        Params::Snapshot(t) => {
            // A template that cannot be looked up fails `snapshot::add`.
            uses = sharing::declared(params, writable).unwrap_or_default();
            Prepared::Snapshot(t)
        }
        Params::Rbd(spec) => {
            uses.add(sharing::rbd(spec), writable && spec.snap.is_none());
            Prepared::Rbd
        }
        Params::Thin { pool, id, sectors } => {
            for s in sharing::thin(pool, *id) {
                uses.add(s, writable);
            }
            Prepared::Thin {
                pool,
                id: *id,
                sectors: *sectors,
            }
        }
    };
    Ok((prepared, uses))
}

/// `params` and whether the vbd is written, as `add` reads them.
async fn params_and_mode(xs: &Client, be: &str) -> Result<(String, bool), HotplugError> {
    let raw = xs.read_string(&node(be, key::PARAMS)).await?;
    let mode = xs
        .try_read_text(&node(be, key::MODE))
        .await?
        .unwrap_or_else(|| "w".into());
    match mode.as_str() {
        "w" => Ok((raw, true)),
        "r" => Ok((raw, false)),
        _ => Err(HotplugError::Mode(mode)),
    }
}

/// How long `add` gives a cluster to answer (libxl kills the script at 40 s,
/// leaving no reason behind).
const REMOTE_WAIT: std::time::Duration = std::time::Duration::from_secs(25);

/// For an `rbd:` disk, the image checked (see [`check_rbd`]), within
/// [`REMOTE_WAIT`]; nothing for any other disk.
async fn remote_check(xs: &Client, be: &str) -> Result<Option<Published>, HotplugError> {
    let (raw, writable) = params_and_mode(xs, be).await?;
    let Ok(Params::Rbd(spec)) = Params::parse(&raw) else {
        return Ok(None); // add_inner reports a bad params
    };
    if spec.snap.is_some() && writable {
        return Err(HotplugError::Params(
            raw,
            "a snapshot is read-only: attach it with mode r",
        ));
    }
    match tokio::time::timeout(REMOTE_WAIT, check_rbd(spec.clone(), writable)).await {
        Ok(r) => r.map(Some),
        Err(_) => Err(HotplugError::Config(format!(
            "the Ceph cluster did not answer within {REMOTE_WAIT:?} about image {spec}"
        ))),
    }
}

async fn add_inner(
    xs: &Client,
    be: &str,
    checked: Option<Published>,
) -> Result<Published, HotplugError> {
    let (raw, writable) = params_and_mode(xs, be).await?;
    let params = Params::parse(&raw)?;
    let (prepared, uses) = prepare(&params, writable)?;
    sharing::check(xs, be, &raw, uses, writable).await?;
    let (id, path, made_loop) = match prepared {
        Prepared::Direct(p, id) => {
            let published = Published::File(p.to_owned(), id);
            published.write(xs, be, None).await?;
            return Ok(published);
        }
        Prepared::Rbd => {
            let published = checked.ok_or(HotplugError::Config(
                "internal: the image was not checked".into(),
            ))?;
            published.write(xs, be, None).await?;
            return Ok(published);
        }
        Prepared::Block(p, d) => (d.id, p.to_owned(), None),
        Prepared::File(p, file, opts) => {
            let dev = loopdev::attach_file(&file, p, &opts)?;
            let path = dev.path.clone();
            // The loop device stays attached after we exit; `remove` releases it.
            (dev.keep(), path, Some(()))
        }
        Prepared::Snapshot(t) => {
            let id = snapshot::add(xs, be, t, writable).await?;
            (
                id,
                PathBuf::from(format!("/dev/block/{}:{}", id.major, id.minor)),
                None,
            )
        }
        Prepared::Thin { pool, id, sectors } => {
            let d = thin::add(xs, be, pool, id, sectors, writable).await?;
            (
                d,
                PathBuf::from(format!("/dev/block/{}:{}", d.major, d.minor)),
                None,
            )
        }
    };
    let published = Published::Block(id);
    if let Err(e) = published.write(xs, be, Some(&path)).await {
        if made_loop.is_some() {
            let _ = loopdev::release_by_id(id);
        }
        return Err(e.into());
    }
    Ok(published)
}

/// Opens the image once, as the daemon will, so that a missing pool or
/// image, an unreachable cluster or (to be written) an image without the
/// exclusive-lock feature fails `add`, where libxl reports it; returns what
/// names it. The lock is not taken: a migrating guest's destination is
/// attached while its source still holds it, and the daemon waits for it
/// when the guest connects. Who holds it now is logged.
async fn check_rbd(spec: crate::rbd::Spec, writable: bool) -> Result<Published, HotplugError> {
    let settings =
        crate::config::rbd_settings().map_err(|e| HotplugError::Config(e.to_string()))?;
    crate::rbd::configure(settings);
    let opened = tokio::task::spawn_blocking(move || {
        let image = crate::rbd::Image::open(&spec, writable, None)?;
        if writable {
            let owners = image.lock_owners().unwrap_or_default();
            if !owners.is_empty() {
                tracing::info!(image = %spec, ?owners, "the image's lock is held now; the daemon will wait for it when the guest connects");
            }
        }
        Ok::<_, crate::rbd::RbdError>(Published::Rbd(spec, image.id.clone()))
    })
    .await
    .map_err(|e| HotplugError::Config(format!("opening the image: {e}")))?;
    Ok(opened?)
}

/// The disk the vbd at `be` published (`physical-device` and `diskseq`),
/// `None` if it published none.
async fn published_id(xs: &Client, be: &str) -> Result<Option<DiskId>, HotplugError> {
    Ok(Nodes::read(xs, be).await?.block()?)
}

/// `remove`: releases what `add` made (a loop device, if it is still the one
/// `add` published); nothing for a block device we did not make.
pub async fn remove(xs: &Client, be: &str) -> Result<(), HotplugError> {
    let Some(raw) = xs.try_read_text(&node(be, key::PARAMS)).await? else {
        return Ok(());
    };
    match Params::parse(&raw) {
        Ok(Params::Snapshot(_)) => return snapshot::remove(xs, be).await,
        Ok(Params::Thin { .. }) => return thin::remove(xs, be).await,
        Ok(Params::File(_)) => {}
        _ => return Ok(()),
    }
    let Some(id) = published_id(xs, be).await? else {
        return Ok(()); // add never got as far as publishing
    };
    let minor = id.minor;
    match loopdev::release_by_id(id)? {
        Some(new) => tracing::info!(
            backend = be,
            "hotplug remove: released /dev/loop{minor} (diskseq now {new:x})"
        ),
        None => tracing::info!(
            backend = be,
            "hotplug remove: /dev/loop{minor} was already released"
        ),
    }
    Ok(())
}

/// The loop devices the block script made for the vbd at `be` and that
/// are still in use: the published disk when it is a loop device, and a
/// snapshot's template and store.
pub async fn loops_of(xs: &Client, be: &str) -> Result<Vec<DiskId>, HotplugError> {
    let mut out = snapshot::recorded_loops(xs, be).await?;
    // A malformed record names no device of ours.
    if let Ok(Some(id)) = Nodes::read(xs, be).await?.block() {
        if id.major == loopdev::LOOP_MAJOR {
            out.push(id);
        }
    }
    Ok(out)
}

/// `SIZE` of `thin:`: bytes with an optional binary K, M, G or T suffix, a
/// whole number of sectors and not zero; in sectors.
fn parse_size(s: &str) -> Option<u64> {
    let (num, shift) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], 10),
        b'M' => (&s[..s.len() - 1], 20),
        b'G' => (&s[..s.len() - 1], 30),
        b'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let bytes = xenstore::wire::parse_decimal(num)?.checked_mul(1u64 << shift)?;
    (bytes > 0 && bytes % 512 == 0).then_some(bytes / 512)
}

/// (domid, devid) from `backend/vbd/<domid>/<devid>`.
fn vbd_ids(be: &str) -> Result<(u16, u32), HotplugError> {
    xenbus::vbd_of(be).map(|(d, v)| (d.0, v)).ok_or_else(|| {
        HotplugError::Params(be.to_owned(), "XENBUS_PATH does not end in <domid>/<devid>")
    })
}

/// Removes the dm device recorded in `be` (deferred if still open), if it
/// is still ours; forgets the record.
async fn remove_dm(xs: &Client, be: &str) -> Result<(), HotplugError> {
    use crate::disk::dm::{self, Control, DevId, DmError};
    if let Some(name) = xs.try_read_text(&node(be, key::DM_NAME)).await? {
        dm::validate_name(&name)?;
        let ctl = Control::open()?;
        let bound = match published_id(xs, be).await? {
            // The disk the vbd published, and no other under its name.
            Some(id) => dm::bind(&ctl, &name, id).map(|(dev, _)| dev),
            // An add that failed after making the device and before
            // publishing it: no identity was ever given out; ours by UUID.
            None => ctl.info(&DevId::Name(name.clone())).and_then(|info| {
                if info.uuid.starts_with(dm::UUID_PREFIX) {
                    Ok(DevId::Uuid(info.uuid))
                } else {
                    Err(DmError::NotOurs {
                        dev: name.clone(),
                        uuid: format!("{}...", dm::UUID_PREFIX),
                    })
                }
            }),
        };
        match bound {
            Ok(dev) => {
                ctl.remove(&dev, true)?;
                tracing::info!(backend = be, name, "hotplug remove: dm device removed");
            }
            // Never made, or already gone.
            Err(DmError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::ENXIO) => {}
            Err(e) => tracing::warn!(backend = be, "hotplug remove: not removing {name}: {e}"),
        }
        xs.rm(&node(be, key::DM_NAME)).await?;
    }
    Ok(())
}

pub mod reconcile;
mod sharing;
mod snapshot;
mod thin;
pub use snapshot::revoke;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_grammar() {
        assert_eq!(
            Params::parse("/dev/sdb").unwrap(),
            Params::Block("/dev/sdb".into())
        );
        assert_eq!(
            Params::parse("phy:/dev/vg/lv").unwrap(),
            Params::Block("/dev/vg/lv".into())
        );
        assert_eq!(
            Params::parse("file:/srv/a.img").unwrap(),
            Params::File("/srv/a.img".into())
        );
        assert_eq!(
            Params::parse("direct:/srv/a.img").unwrap(),
            Params::Direct("/srv/a.img".into())
        );
        assert_eq!(
            Params::parse("snapshot:debian-12").unwrap(),
            Params::Snapshot("debian-12".into())
        );
        assert_eq!(
            Params::parse("thin:pool0/7:20G").unwrap(),
            Params::Thin {
                pool: "pool0".into(),
                id: 7,
                sectors: 20 << 21
            }
        );
        assert_eq!(
            Params::parse("thin:blkbackd-pool/0:4096").unwrap(),
            Params::Thin {
                pool: "blkbackd-pool".into(),
                id: 0,
                sectors: 8
            }
        );
        for bad in [
            "",
            "sdb",
            "file:",
            "file:rel/a.img",
            "direct:",
            "direct:a.img",
            "direct:/srv/../a.img",
            "file:/srv/../etc/shadow",
            "phy:dev/sdb",
            "snapshot:",
            "snapshot:a/b",
            "snapshot:..",
            "snapshot:.hidden",
            "thin:pool",
            "thin:/7:1G",
            "thin:pool/",
            "thin:pool/7",
            "thin:pool/vm1:1G",
            "thin:pool/7:",
            "thin:pool/7:0",
            "thin:pool/7:1000",
            "thin:pool/7:1g",
            "thin:pool/16777216:1G",
            "thin:pool/-1:1G",
            "thin:pool/07:1G",
            "thin:p/v/w:1G",
            "thin:../7:1G",
            "thin:control/7:1G",
            "thin:pool/7:99999999999T",
            "iscsi:whatever",
            "/dev/sdb\n",
        ] {
            assert!(Params::parse(bad).is_err(), "{bad:?}");
        }
    }
}
