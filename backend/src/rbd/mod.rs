//! Ceph RBD images through librbd: `rbd:POOL/IMAGE[@SNAP]` disks.
//!
//! Why librbd and not the kernel's `rbd map` is said in the README
//! ("Ceph RBD"). In short: it needs no kernel module (the embedded default
//! and hosts without `rbd.ko` serve images too), the daemon itself holds the
//! image's exclusive lock for as long as it serves it, and an image is named
//! by its id, which a deleted and recreated image does not keep, as a block
//! device is named by its diskseq.
//!
//! One client (one `rados_t`) per process, connected on first use with the
//! `[rbd]` settings ([`ClientConfig`]); one [`Image`] per served vbd. A
//! writable image is served only while this client holds its exclusive lock,
//! taken explicitly ([`Image::open`]): librbd then refuses to hand it to
//! another client that asks for it, so a second host (another daemon,
//! another Xenstore) is refused while this one serves it.
#![allow(unsafe_code)]

pub mod ffi;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

/// An image as `params` names it: `POOL/[NAMESPACE/]IMAGE[@SNAP]`, as the
/// `rbd` command does.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Spec {
    /// The pool.
    pub pool: String,
    /// The RBD namespace within the pool (`None`: the default one).
    pub namespace: Option<String>,
    /// The image.
    pub image: String,
    /// The snapshot (served read-only), if any.
    pub snap: Option<String>,
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/", self.pool)?;
        if let Some(ns) = &self.namespace {
            write!(f, "{ns}/")?;
        }
        write!(f, "{}", self.image)?;
        if let Some(s) = &self.snap {
            write!(f, "@{s}")?;
        }
        Ok(())
    }
}

/// Whether `s` is a name this daemon accepts for a pool, an image or a
/// snapshot: 1 to 255 bytes of printable ASCII other than space, `/` and
/// `@` (the separators). Ceph allows more; nobody names images with
/// control characters, and a Xenstore value must not carry them.
fn valid_name(s: &str) -> bool {
    (1..=255).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'@')
}

impl Spec {
    /// Parses `POOL/[NAMESPACE/]IMAGE[@SNAP]` strictly.
    pub fn parse(s: &str) -> Result<Spec, &'static str> {
        let form = "an RBD image is POOL/IMAGE, POOL/NAMESPACE/IMAGE, or either with @SNAP, \
                    e.g. rbd/web01 or rbd/tenant1/web01@before-upgrade";
        let (pool, rest) = s.split_once('/').ok_or(form)?;
        let (namespace, rest) = match rest.split_once('/') {
            Some((ns, r)) => (Some(ns), r),
            None => (None, rest),
        };
        let (image, snap) = match rest.split_once('@') {
            Some((i, s)) => (i, Some(s)),
            None => (rest, None),
        };
        if ![pool, image]
            .into_iter()
            .chain(namespace)
            .chain(snap)
            .all(valid_name)
        {
            return Err(
                "pool, namespace, image and snapshot names are 1-255 printable characters, \
                        without spaces, '/' or '@'",
            );
        }
        Ok(Spec {
            pool: pool.into(),
            namespace: namespace.map(Into::into),
            image: image.into(),
            snap: snap.map(Into::into),
        })
    }
}

/// How the daemon and the block script reach the cluster (`[rbd]` in the
/// configuration file). Everything is Ceph's own: a `ceph.conf` (its monitors,
/// and usually the keyring's path) and a client name with its key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// `ceph.conf` (default: librados's search: `$CEPH_CONF`,
    /// `/etc/ceph/ceph.conf`, `~/.ceph/config`, `./ceph.conf`).
    pub conf: Option<PathBuf>,
    /// The client's name without `client.` (default: `admin`).
    #[serde(default = "default_client")]
    pub client: String,
    /// The keyring (default: what `ceph.conf` says, else Ceph's default
    /// `/etc/ceph/ceph.client.NAME.keyring`).
    pub keyring: Option<PathBuf>,
    /// Seconds to wait for the monitors before an open fails (default 10:
    /// libxl gives a block script 40 s).
    #[serde(default = "default_timeout")]
    pub connect_timeout_s: u32,
    /// Seconds a guest's connection waits for another client to let go of
    /// the image's lock (default 45: a migrating guest's source letting go,
    /// or a crashed client's watch expiring after 30 s).
    #[serde(default = "default_lock_wait")]
    pub lock_wait_s: u32,
}

fn default_lock_wait() -> u32 {
    45
}

/// How long a connection waits for the image's lock (`[rbd] lock_wait_s`).
pub fn lock_wait() -> std::time::Duration {
    let s = SETTINGS.read().unwrap_or_else(|e| e.into_inner());
    let secs = s.as_ref().map_or_else(default_lock_wait, |c| c.lock_wait_s);
    std::time::Duration::from_secs(u64::from(secs))
}

fn default_client() -> String {
    "admin".into()
}

fn default_timeout() -> u32 {
    10
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            conf: None,
            client: default_client(),
            keyring: None,
            connect_timeout_s: default_timeout(),
            lock_wait_s: default_lock_wait(),
        }
    }
}

impl ClientConfig {
    /// Checks what the file says.
    pub fn check(&self) -> Result<(), String> {
        if !valid_name(&self.client) || self.client.starts_with("client.") {
            return Err(format!(
                "rbd.client = {:?}: the client's name without \"client.\", e.g. \"admin\"",
                self.client
            ));
        }
        if !(1..=25).contains(&self.connect_timeout_s) {
            return Err(format!(
                "rbd.connect_timeout_s = {} is outside 1..=25 (libxl gives the block script 40 s)",
                self.connect_timeout_s
            ));
        }
        if self.lock_wait_s > 600 {
            return Err(format!(
                "rbd.lock_wait_s = {} is outside 0..=600",
                self.lock_wait_s
            ));
        }
        for p in [&self.conf, &self.keyring].into_iter().flatten() {
            if !p.is_absolute() {
                return Err(format!("rbd: {} is not an absolute path", p.display()));
            }
        }
        Ok(())
    }
}

/// What failed, with what Ceph said (`errno` from librados or librbd).
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    /// librados or librbd cannot be loaded.
    #[error("{0}")]
    Library(String),
    /// The cluster could not be reached or refused us.
    #[error("connecting to the Ceph cluster as client.{client} ({conf}): {err}")]
    Connect {
        /// The client name.
        client: String,
        /// The configuration used.
        conf: String,
        /// Why.
        err: std::io::Error,
    },
    /// The pool is not there (or not ours to open).
    #[error("pool {pool}: {err}")]
    Pool {
        /// The pool.
        pool: String,
        /// Why.
        err: std::io::Error,
    },
    /// The image (or its snapshot) is not there, or could not be opened.
    #[error("image {spec}: {err}")]
    Image {
        /// The image.
        spec: Box<Spec>,
        /// Why.
        err: std::io::Error,
    },
    /// A writable image without the exclusive-lock feature.
    #[error(
        "image {0} has no exclusive-lock feature, so nothing stops another host from writing \
         it too; enable it (rbd feature enable {0} exclusive-lock) or attach it read-only"
    )]
    NoExclusiveLock(Box<Spec>),
    /// Another client holds the image's lock.
    #[error(
        "image {spec} is locked for writing by another client ({owners}): refusing to serve it"
    )]
    Locked {
        /// The image.
        spec: Box<Spec>,
        /// Who holds it, as librbd names them.
        owners: String,
    },
    /// The wait for the lock was given up: the vbd is being closed or
    /// removed, or the daemon stops.
    #[error("gave up waiting for the lock of image {0}")]
    LockWaitCancelled(Box<Spec>),
    /// The image under this name is not the one the block script checked.
    #[error(
        "image {spec} now has id {found}, not {want} as when it was attached: it was deleted \
         and recreated; refusing to serve another image under the same name"
    )]
    Replaced {
        /// The image.
        spec: Box<Spec>,
        /// The id published.
        want: String,
        /// The id found.
        found: String,
    },
}

fn errno(rc: impl Into<i64>) -> std::io::Error {
    let rc: i64 = rc.into();
    std::io::Error::from_raw_os_error(i32::try_from(-rc).unwrap_or(libc::EIO))
}

fn cstring(s: &str) -> CString {
    // Names are checked (valid_name) and paths come from the configuration
    // or the environment, where a NUL cannot be; keep it total anyway.
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

/// The process's client settings, set once the configuration is read.
static SETTINGS: RwLock<Option<ClientConfig>> = RwLock::new(None);

/// Sets how the client connects (the `[rbd]` table); used by the next
/// connection (an established one is kept).
pub fn configure(c: ClientConfig) {
    *SETTINGS.write().unwrap_or_else(|e| e.into_inner()) = Some(c);
}

/// The connected cluster: one `rados_t` for the process, until the cluster
/// blocklists it (then the next open connects anew, see [`cluster`]).
pub struct Cluster {
    handle: ffi::Rados,
    lib: &'static ffi::Lib,
    /// `client.NAME`.
    pub client: String,
    /// An operation failed with EBLOCKLISTED: this client can do nothing
    /// more (set by the engine's completions too).
    blocklisted: Arc<std::sync::atomic::AtomicBool>,
}

// SAFETY: a rados_t is used concurrently by librados's own threads and is
// documented as thread-safe for the calls made here (ioctx creation,
// instance id); it is shut down once, in Drop.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cluster({})", self.client)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle was connected by connect(); every ioctx and
        // image holds an Arc of this Cluster, so none outlives it.
        unsafe { (self.lib.rados_shutdown)(self.handle) }
    }
}

impl Cluster {
    /// Notes what a failed call says: EBLOCKLISTED (Ceph's name for
    /// ESHUTDOWN) means the cluster has fenced this client for good.
    fn note(&self, rc: impl Into<i64>) {
        if rc.into() == -i64::from(libc::ESHUTDOWN) {
            mark_blocklisted(&self.blocklisted, &self.client);
        }
    }

    /// The client's instance id (`client.NAME` plus this number is how
    /// librbd names a lock owner).
    pub fn instance_id(&self) -> u64 {
        // SAFETY: a connected handle.
        unsafe { (self.lib.rados_get_instance_id)(self.handle) }
    }

    fn connect(c: &ClientConfig) -> Result<Cluster, RbdError> {
        let lib = ffi::lib().map_err(RbdError::Library)?;
        let conf_name = c
            .conf
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the default ceph.conf".into());
        let fail = |rc: c_int| RbdError::Connect {
            client: c.client.clone(),
            conf: conf_name.clone(),
            err: errno(rc),
        };
        let id = cstring(&c.client);
        let mut h: ffi::Rados = std::ptr::null_mut();
        // SAFETY: h is an out-pointer; id is NUL-terminated.
        let rc = unsafe { (lib.rados_create)(&mut h, id.as_ptr()) };
        if rc < 0 {
            return Err(fail(rc));
        }
        // From here the handle is shut down on every path.
        let cluster = Cluster {
            handle: h,
            lib,
            client: format!("client.{}", c.client),
            blocklisted: Arc::default(),
        };
        let conf = c.conf.as_ref().map(|p| cstring(&p.display().to_string()));
        // SAFETY: a created handle; NULL asks for librados's default search.
        let rc = unsafe {
            (lib.rados_conf_read_file)(h, conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()))
        };
        if rc < 0 {
            return Err(fail(rc));
        }
        let timeout = c.connect_timeout_s.to_string();
        let mut set = vec![
            ("client_mount_timeout", timeout.clone()),
            ("rados_mon_op_timeout", timeout),
            // A discarded range reads back as zeroes, as blkfront's users
            // (and a file's hole punching) expect: librbd otherwise skips
            // the parts of a discard that do not cover whole objects.
            ("rbd_skip_partial_discard", "false".into()),
        ];
        if let Some(k) = &c.keyring {
            set.push(("keyring", k.display().to_string()));
        }
        for (k, v) in set {
            let (k, v) = (cstring(k), cstring(&v));
            // SAFETY: a created, not yet connected handle; both strings
            // NUL-terminated.
            let rc = unsafe { (lib.rados_conf_set)(h, k.as_ptr(), v.as_ptr()) };
            if rc < 0 {
                return Err(fail(rc));
            }
        }
        // SAFETY: a configured handle.
        let rc = unsafe { (lib.rados_connect)(h) };
        if rc < 0 {
            return Err(fail(rc));
        }
        Ok(cluster)
    }
}

/// Marks a client blocklisted (said once).
fn mark_blocklisted(flag: &std::sync::atomic::AtomicBool, client: &str) {
    if !flag.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            %client,
            "the Ceph cluster blocklisted this client: its images fail; what opens next connects anew"
        );
    }
}

/// Whether an I/O error is EBLOCKLISTED; if so, marks `flag` (a cluster's,
/// from [`Image::blocklist_flag`]).
pub fn note_blocklisted(e: &std::io::Error, flag: &std::sync::atomic::AtomicBool) {
    if e.raw_os_error() == Some(libc::ESHUTDOWN) {
        mark_blocklisted(flag, "this daemon's");
    }
}

/// The process's connection, made on first use; a failed attempt is not
/// kept (the next open tries again), nor is a client the cluster has
/// blocklisted (its open images keep it until they close; new opens get a
/// new client, so one fencing does not fail every later vbd until the
/// daemon restarts).
pub fn cluster() -> Result<Arc<Cluster>, RbdError> {
    static CLUSTER: Mutex<Option<Arc<Cluster>>> = Mutex::new(None);
    let mut c = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = c
        .as_ref()
        .filter(|c| !c.blocklisted.load(std::sync::atomic::Ordering::Relaxed))
    {
        return Ok(c.clone());
    }
    *c = None;
    let settings = SETTINGS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default();
    let new = Arc::new(Cluster::connect(&settings)?);
    tracing::info!(client = %new.client, "connected to the Ceph cluster");
    *c = Some(new.clone());
    Ok(new)
}

/// An open image.
pub struct Image {
    cluster: Arc<Cluster>,
    ioctx: ffi::IoCtx,
    handle: ffi::Image,
    /// What it was opened as.
    pub spec: Spec,
    /// Its id (stable for the image's life; a recreated image gets another).
    pub id: String,
    /// Opened read-only (a snapshot always is).
    pub read_only: bool,
    /// This client as librbd names the lock's owner (its messenger address),
    /// read once the lock is taken.
    owner: Mutex<Option<String>>,
    /// An I/O failed as it does once the lock is lost (set by the engine).
    lock_lost: Arc<std::sync::atomic::AtomicBool>,
}

// SAFETY: librbd documents an image handle as usable from several threads
// at once for I/O and metadata reads; close happens once, in Drop, after
// every Arc of it is gone.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Image({} id {})", self.spec, self.id)
    }
}

/// How long dropping an image waits for librbd to close it (flush, wait
/// for its requests, release the lock) before it lets the close finish on
/// its own: a cluster that does not answer must not hold the caller (often
/// an async worker) for ever.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The handles of an image being closed, sent to the closing thread.
struct Closing(&'static ffi::Lib, ffi::Image, ffi::IoCtx, Arc<Cluster>);

// SAFETY: librbd's handles may be closed from any thread; only the closing
// thread uses them from here on.
unsafe impl Send for Closing {}

impl Drop for Image {
    fn drop(&mut self) {
        let closing = Closing(
            self.cluster.lib,
            self.handle,
            self.ioctx,
            self.cluster.clone(),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("blkbackd-rbd-close".into())
            .spawn(move || {
                let c = closing;
                // SAFETY: handles opened by Image::open, closed once here;
                // rbd_close waits for the image's in-flight requests and
                // releases its lock. The Arc keeps the cluster connected
                // until then.
                unsafe {
                    (c.0.rbd_close)(c.1);
                    (c.0.rados_ioctx_destroy)(c.2);
                }
                drop(c.3);
                let _ = tx.send(());
            });
        match spawned {
            Ok(_) => {
                if rx.recv_timeout(CLOSE_WAIT).is_err() {
                    tracing::warn!(image = %self.spec, "closing the image takes over {CLOSE_WAIT:?}: left to finish in the background");
                }
            }
            Err(e) => {
                tracing::warn!(image = %self.spec, "no thread to close the image ({e}): left open")
            }
        }
    }
}

/// What an asynchronous request does (see [`Image::aio`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aio {
    /// Read into the buffer.
    Read,
    /// Write the buffer.
    Write,
    /// Make completed writes durable.
    Flush,
    /// Discard the range.
    Discard,
}

type OnDone = Box<dyn FnOnce(std::io::Result<usize>) + Send>;

/// Whether an I/O error says this client lost the image's lock
/// (blocklisted: ESHUTDOWN or EBLOCKLISTED; the lock taken: EROFS).
pub fn lost_lock(e: &std::io::Error) -> bool {
    // EBLOCKLISTED is ESHUTDOWN in Ceph's errno.h; 108 on Linux too.
    matches!(e.raw_os_error(), Some(libc::ESHUTDOWN | libc::EROFS))
}

/// The largest discard handed to librbd at once: it expands a discard into
/// a request per object (4 MiB) up front, so a guest's whole-disk discard is
/// split (as QEMU caps one at 2 GiB).
pub const DISCARD_CHUNK: u64 = 1 << 30;

unsafe extern "C" fn aio_done(c: ffi::Completion, arg: *mut c_void) {
    // SAFETY: arg is the Box<OnDone> leaked by Image::aio for this
    // completion, which librbd calls back exactly once.
    let done = unsafe { Box::from_raw(arg.cast::<OnDone>()) };
    let Ok(lib) = ffi::lib() else {
        // Unreachable (librbd called us), but the request must be answered.
        done(Err(std::io::Error::from_raw_os_error(libc::EIO)));
        return;
    };
    // SAFETY: c is the completion librbd just completed; it is released
    // here, once, after its value is read.
    let rc = unsafe {
        let rc = (lib.rbd_aio_get_return_value)(c);
        (lib.rbd_aio_release)(c);
        rc
    };
    let r = if rc < 0 {
        Err(errno(rc as i64))
    } else {
        Ok(rc as usize)
    };
    // A panic must not unwind into librbd's C++ thread.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| done(r)));
}

impl Image {
    /// Opens `spec` (blocking: it talks to the cluster); `want_id`, when
    /// given, must be the image's id. A writable image must have the
    /// exclusive-lock feature; its lock is not taken here but by
    /// [`Image::take_lock`], when a guest is to write it: a migrating
    /// guest's destination opens the image while the source still holds it.
    pub fn open(spec: &Spec, writable: bool, want_id: Option<&str>) -> Result<Image, RbdError> {
        let cluster = cluster()?;
        let lib = cluster.lib;
        let read_only = !writable || spec.snap.is_some();
        let pool = cstring(&spec.pool);
        let mut ioctx: ffi::IoCtx = std::ptr::null_mut();
        // SAFETY: a connected cluster; out-pointer; NUL-terminated name.
        let rc = unsafe { (lib.rados_ioctx_create)(cluster.handle, pool.as_ptr(), &mut ioctx) };
        if rc < 0 {
            cluster.note(rc);
            return Err(RbdError::Pool {
                pool: spec.pool.clone(),
                err: errno(rc),
            });
        }
        if let Some(ns) = &spec.namespace {
            let ns = cstring(ns);
            // SAFETY: the live ioctx created above; a NUL-terminated name
            // (librados copies it). A namespace that does not exist is not
            // an error here: the open below finds no image in it.
            unsafe { (lib.rados_ioctx_set_namespace)(ioctx, ns.as_ptr()) };
        }
        let (name, snap) = (cstring(&spec.image), spec.snap.as_deref().map(cstring));
        let snap_ptr = snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let mut handle: ffi::Image = std::ptr::null_mut();
        let open = if read_only {
            lib.rbd_open_read_only
        } else {
            lib.rbd_open
        };
        // SAFETY: a live ioctx; out-pointer; NUL-terminated names (the
        // snapshot's may be NULL).
        let rc = unsafe { open(ioctx, name.as_ptr(), &mut handle, snap_ptr) };
        if rc < 0 {
            cluster.note(rc);
            // SAFETY: the ioctx created above, not used again.
            unsafe { (lib.rados_ioctx_destroy)(ioctx) };
            return Err(RbdError::Image {
                spec: Box::new(spec.clone()),
                err: errno(rc),
            });
        }
        let mut img = Image {
            cluster,
            ioctx,
            handle,
            spec: spec.clone(),
            id: String::new(),
            read_only,
            owner: Mutex::new(None),
            lock_lost: Arc::default(),
        };
        img.id = img.read_id()?;
        if let Some(want) = want_id.filter(|w| *w != img.id) {
            return Err(RbdError::Replaced {
                spec: Box::new(spec.clone()),
                want: want.into(),
                found: img.id.clone(),
            });
        }
        if !read_only {
            img.check_lock_feature()?;
        }
        Ok(img)
    }

    /// Takes the exclusive lock for writing, waiting up to `wait` for
    /// another client to let go of it (a migrating guest's source, a
    /// crashed client's watch expiring), and breaking it at once if its
    /// holder is `predecessor` (an owner as [`Image::owner`] gave it: this
    /// vbd's previous daemon, gone): librbd blocklists that client, so it can
    /// never write again even were it still alive. Blocking; gives up
    /// within half a second of `cancel` being set.
    pub fn take_lock(
        &self,
        predecessor: Option<&str>,
        wait: std::time::Duration,
        cancel: &std::sync::atomic::AtomicBool,
    ) -> Result<(), RbdError> {
        let deadline = std::time::Instant::now() + wait;
        let mut broke = false;
        loop {
            if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(RbdError::LockWaitCancelled(Box::new(self.spec.clone())));
            }
            if let (Some(dead), false) = (predecessor, broke) {
                broke = true;
                self.break_lock_of(dead);
            }
            match self.try_lock() {
                Ok(()) => break,
                Err(e @ RbdError::Locked { .. }) if std::time::Instant::now() >= deadline => {
                    return Err(e)
                }
                Err(RbdError::Locked { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(500))
                }
                Err(e) => return Err(e),
            }
        }
        *self.owner.lock().unwrap_or_else(|e| e.into_inner()) =
            self.lock_owners()?.into_iter().next();
        self.lock_lost
            .store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Breaks the lock if `dead` holds it (librbd refuses unless it does).
    fn break_lock_of(&self, dead: &str) {
        match self.lock_owners() {
            Ok(owners) if owners.iter().any(|o| o == dead) => {
                let name = cstring(dead);
                // SAFETY: an open image; a NUL-terminated owner name.
                let rc = unsafe {
                    (self.cluster.lib.rbd_lock_break)(
                        self.handle,
                        ffi::LOCK_MODE_EXCLUSIVE,
                        name.as_ptr(),
                    )
                };
                if rc < 0 {
                    tracing::warn!(image = %self.spec, owner = dead, "breaking the previous daemon's lock failed: {}", errno(rc));
                } else {
                    tracing::info!(image = %self.spec, owner = dead, "broke the previous daemon's lock");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(image = %self.spec, "reading the lock's owner: {e}"),
        }
    }

    /// This client as librbd names the owner of the lock it took (its
    /// messenger address); `None` before [`Image::take_lock`].
    pub fn owner(&self) -> Option<String> {
        self.owner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The flag the engine sets when an I/O fails with EBLOCKLISTED
    /// ([`note_blocklisted`]): its client's.
    pub fn blocklist_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.cluster.blocklisted.clone()
    }

    /// The flag the engine sets when an I/O fails as it does once this
    /// client has lost the lock ([`lost_lock`]).
    pub fn lock_lost_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.lock_lost.clone()
    }

    /// Whether this client holds the lock, as far as it knows without
    /// asking the cluster: taken, and no I/O failed since as it does once
    /// the lock is lost. (librbd's own check pings an OSD.)
    pub fn holds_lock(&self) -> bool {
        self.owner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
            && !self.lock_lost.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn io_err(&self, rc: impl Into<i64> + Copy) -> RbdError {
        self.cluster.note(rc);
        RbdError::Image {
            spec: Box::new(self.spec.clone()),
            err: errno(rc),
        }
    }

    fn read_id(&self) -> Result<String, RbdError> {
        let mut buf = [0u8; 64];
        // SAFETY: an open image; buf's length is passed.
        let rc = unsafe {
            (self.cluster.lib.rbd_get_id)(self.handle, buf.as_mut_ptr().cast(), buf.len())
        };
        if rc < 0 {
            return Err(self.io_err(rc));
        }
        let id = CStr::from_bytes_until_nul(&buf).map_err(|_| self.io_err(-libc::EINVAL))?;
        Ok(id.to_string_lossy().into_owned())
    }

    fn check_lock_feature(&self) -> Result<(), RbdError> {
        let mut features = 0u64;
        // SAFETY: an open image; out-pointer.
        let rc = unsafe { (self.cluster.lib.rbd_get_features)(self.handle, &mut features) };
        if rc < 0 {
            return Err(self.io_err(rc));
        }
        if features & ffi::FEATURE_EXCLUSIVE_LOCK == 0 {
            return Err(RbdError::NoExclusiveLock(Box::new(self.spec.clone())));
        }
        Ok(())
    }

    /// One attempt at the exclusive lock.
    fn try_lock(&self) -> Result<(), RbdError> {
        // SAFETY: an open image.
        let rc =
            unsafe { (self.cluster.lib.rbd_lock_acquire)(self.handle, ffi::LOCK_MODE_EXCLUSIVE) };
        if rc < 0 {
            let owners = self.lock_owners().unwrap_or_default();
            return Err(
                if matches!(-rc, libc::EROFS | libc::EBUSY) || !owners.is_empty() {
                    RbdError::Locked {
                        spec: Box::new(self.spec.clone()),
                        owners: if owners.is_empty() {
                            format!("librbd says: {}", errno(rc))
                        } else {
                            owners.join(", ")
                        },
                    }
                } else {
                    self.io_err(rc)
                },
            );
        }
        Ok(())
    }

    /// Who holds the image's lock, as librbd names them (empty: nobody).
    pub fn lock_owners(&self) -> Result<Vec<String>, RbdError> {
        let lib = self.cluster.lib;
        let mut mode: c_int = 0;
        let mut owners: [*mut c_char; 8] = [std::ptr::null_mut(); 8];
        let mut n: usize = owners.len();
        // SAFETY: an open image; the array's length is passed in n.
        let rc = unsafe {
            (lib.rbd_lock_get_owners)(self.handle, &mut mode, owners.as_mut_ptr(), &mut n)
        };
        if rc == -libc::ENOENT {
            return Ok(Vec::new());
        }
        if rc < 0 {
            return Err(self.io_err(rc));
        }
        let n = n.min(owners.len());
        let names = owners[..n]
            .iter()
            .filter(|p| !p.is_null())
            // SAFETY: librbd filled n NUL-terminated strings.
            .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            .collect();
        // SAFETY: the n strings librbd allocated, freed once.
        unsafe { (lib.rbd_lock_get_owners_cleanup)(owners.as_mut_ptr(), n) };
        Ok(names)
    }

    /// The client serving it (`client.NAME`, instance id).
    pub fn client(&self) -> (String, u64) {
        (self.cluster.client.clone(), self.cluster.instance_id())
    }

    /// Its size in bytes (librbd refreshes it when the image is resized).
    pub fn size(&self) -> std::io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: an open image; out-pointer.
        let rc = unsafe { (self.cluster.lib.rbd_get_size)(self.handle, &mut size) };
        if rc < 0 {
            return Err(errno(rc));
        }
        Ok(size)
    }

    fn sync_result(rc: isize, want: usize) -> std::io::Result<()> {
        match usize::try_from(rc) {
            Ok(n) if n == want => Ok(()),
            Ok(_) => Err(std::io::Error::from_raw_os_error(libc::EIO)),
            Err(_) => Err(errno(rc as i64)),
        }
    }

    /// Reads `buf.len()` bytes at `off`.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        // SAFETY: an open image; buf is valid for its length for the call.
        let rc = unsafe {
            (self.cluster.lib.rbd_read)(self.handle, off, buf.len(), buf.as_mut_ptr().cast())
        };
        Self::sync_result(rc, buf.len())
    }

    /// Writes `buf` at `off`.
    pub fn write(&self, off: u64, buf: &[u8]) -> std::io::Result<()> {
        // SAFETY: an open image; buf is valid for its length for the call.
        let rc = unsafe {
            (self.cluster.lib.rbd_write)(self.handle, off, buf.len(), buf.as_ptr().cast())
        };
        Self::sync_result(rc, buf.len())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> std::io::Result<()> {
        // SAFETY: an open image.
        let rc = unsafe { (self.cluster.lib.rbd_flush)(self.handle) };
        Self::sync_result(rc as isize, 0)
    }

    /// Discards a range, in pieces of at most [`DISCARD_CHUNK`] (librbd's
    /// synchronous call refuses more than 2 GiB).
    pub fn discard(&self, off: u64, len: u64) -> std::io::Result<()> {
        let end = off.checked_add(len).ok_or_else(|| errno(-libc::EINVAL))?;
        let mut at = off;
        while at < end {
            let n = (end - at).min(DISCARD_CHUNK);
            // SAFETY: an open image.
            let rc = unsafe { (self.cluster.lib.rbd_discard)(self.handle, at, n) };
            if rc < 0 {
                return Err(errno(rc));
            }
            at += n;
        }
        Ok(())
    }

    /// Starts an asynchronous request; `on_done` is called once, on one of
    /// librbd's threads, with the bytes transferred or the error (also when
    /// the request could not be started, before this returns).
    ///
    /// # Safety
    ///
    /// For [`Aio::Read`] and [`Aio::Write`], `buf` must be valid for reads
    /// (writes: for writes, reads: for reads) of `len` bytes, and stay so,
    /// untouched by anyone else, until `on_done` has been called.
    pub unsafe fn aio(&self, what: Aio, off: u64, buf: *mut u8, len: usize, on_done: OnDone) {
        let lib = self.cluster.lib;
        let arg = Box::into_raw(Box::new(on_done));
        let mut c: ffi::Completion = std::ptr::null_mut();
        // SAFETY: arg is a leaked Box handed back to aio_done exactly once.
        let rc = unsafe { (lib.rbd_aio_create_completion)(arg.cast(), aio_done, &mut c) };
        if rc < 0 {
            // SAFETY: not handed to librbd: ours to take back.
            let done = unsafe { Box::from_raw(arg) };
            done(Err(errno(rc)));
            return;
        }
        // SAFETY: an open image, a fresh completion; the buffer's validity
        // until completion is the caller's promise.
        let rc = unsafe {
            match what {
                Aio::Read => (lib.rbd_aio_read)(self.handle, off, len, buf.cast(), c),
                Aio::Write => (lib.rbd_aio_write)(self.handle, off, len, buf.cast(), c),
                Aio::Flush => (lib.rbd_aio_flush)(self.handle, c),
                Aio::Discard => (lib.rbd_aio_discard)(self.handle, off, len as u64, c),
            }
        };
        if rc < 0 {
            // Not started: librbd will not call back; release and answer.
            // SAFETY: the completion created above, never started; arg is
            // ours again.
            let done = unsafe {
                (lib.rbd_aio_release)(c);
                Box::from_raw(arg)
            };
            done(Err(errno(rc)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_grammar() {
        let s = Spec::parse("rbd/web01").unwrap();
        assert_eq!(
            (s.pool.as_str(), s.image.as_str(), s.snap),
            ("rbd", "web01", None)
        );
        let s = Spec::parse("vms/db@before-upgrade").unwrap();
        assert_eq!(s.snap.as_deref(), Some("before-upgrade"));
        assert_eq!(s.to_string(), "vms/db@before-upgrade");
        for bad in [
            "",
            "rbd",
            "/img",
            "rbd/",
            "rbd/img@",
            "rbd/a/b/c",
            "rbd//b",
            "rbd/a/",
            "rbd/a/b@",
            "rbd/a@b@c",
            "rbd/a b",
            "rbd/a\nb",
            "rbd/a\0",
            "@/x",
        ] {
            assert!(Spec::parse(bad).is_err(), "{bad:?} accepted");
        }
        let s = Spec::parse("vms/tenant1/db@snap1").unwrap();
        assert_eq!(
            (
                s.pool.as_str(),
                s.namespace.as_deref(),
                s.image.as_str(),
                s.snap.as_deref()
            ),
            ("vms", Some("tenant1"), "db", Some("snap1"))
        );
        assert_eq!(s.to_string(), "vms/tenant1/db@snap1");
        assert_eq!(Spec::parse("rbd/web01").unwrap().namespace, None);
        assert_eq!(
            Spec::parse("rbd/ns/web01").unwrap().to_string(),
            "rbd/ns/web01"
        );
        assert!(Spec::parse(&format!("rbd/{}/i", "x".repeat(256))).is_err());
        assert!(Spec::parse(&format!("rbd/{}", "x".repeat(256))).is_err());
        assert!(Spec::parse(&format!("rbd/{}", "x".repeat(255))).is_ok());
    }

    #[test]
    fn client_config_checked() {
        assert!(ClientConfig::default().check().is_ok());
        let bad = |f: fn(&mut ClientConfig)| {
            let mut c = ClientConfig::default();
            f(&mut c);
            c.check().is_err()
        };
        assert!(bad(|c| c.client = "client.admin".into()));
        assert!(bad(|c| c.client = String::new()));
        assert!(bad(|c| c.connect_timeout_s = 0));
        assert!(bad(|c| c.conf = Some("ceph.conf".into())));
        assert!(bad(|c| c.keyring = Some("k".into())));
    }
}
