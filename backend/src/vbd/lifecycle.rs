//! One vbd's life, as Linux blkback's xenbus driver leads it:
//!
//! 1. check what the toolstack wrote, publish the features, `opened = 0`,
//!    InitWait at once (libxl waits only 10 s for it);
//! 2. when the hotplug script has written `physical-device` and `diskseq`,
//!    open the disk by both (a mismatch is fatal, never served), write
//!    `opened = 1` and the geometry;
//! 3. when the frontend is Initialised (or Connected), map, bind, Connected;
//! 4. frontend Closing: Closing; frontend Closed, or the toolstack's Closing:
//!    stop the queues, unmap, Closed; a frontend that comes back
//!    (Initialising) gets InitWait and a fresh connection;
//! 5. `online = 0` and Closed, or the directory removed: done. The toolstack
//!    may remove a device at any stage (a block script that failed, a guest
//!    that never connected): it reaches Closed at once.
//!
//! Any fatal problem: the reason in `error`, Closing; this device only.
//!
//! The daemon stopping ([`Stop::Handover`], SIGTERM) leaves every device as it
//! is for the next daemon: the queues finish and answer what they took,
//! nothing is written to Xenstore, and the next daemon adopts the connected
//! devices at `rsp_prod`. [`Stop::Close`] closes them instead (an operator's
//! explicit choice), as does a domain's release.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use xenstore::{Access, Client, Perm, Xs};

use super::transition::{step, Observed, Phase, Step};
use super::{publish_geometry, serve_frontend, Connection, Offer};
use crate::abi::sys::XenbusState;
use crate::disk::{self, DiskId};
use crate::io::rbd::RbdDisk;
use crate::io::{Disk, FileDisk, ServedDisk};
use crate::xen::{DomId, EventChannels, Grants};
use crate::xenbus::{self, key, published::Nodes, Published};

/// What a vbd task needs.
#[derive(Debug)]
pub struct VbdCtx<G, EC> {
    /// Dom0's Xenstore connection.
    pub xs: Client,
    /// Grant access.
    pub grants: Arc<G>,
    /// Event channels.
    pub evtchn: Arc<EC>,
    /// What we offer frontends (re-read on SIGHUP; a device keeps what it
    /// was offered when it was created).
    pub offer: std::sync::RwLock<Offer>,
    /// Serve a `physical-device` without `diskseq` (unsafe; off by default).
    pub allow_missing_diskseq: bool,
    /// Per-ring counters for `blkbackd status`, and each vbd's I/O limiter.
    pub live: crate::vbd::live::Live,
    /// The configuration's `[[limit]]` rules (a vbd's own `limit-*` nodes
    /// take precedence).
    pub limits: std::sync::RwLock<Arc<Vec<crate::vbd::limit::LimitRule>>>,
}

/// Why a vbd stopped being served.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    /// Xenstore failed.
    #[error(transparent)]
    Xenstore(#[from] xenstore::Error),
    /// The toolstack wrote something unusable.
    #[error("{0}")]
    Config(String),
    /// The disk could not be opened (or was not the one named).
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    /// Publishing or connecting failed.
    #[error(transparent)]
    Vbd(#[from] super::VbdError),
    /// The RBD image could not be opened (or locked, or was replaced).
    #[error(transparent)]
    Rbd(#[from] crate::rbd::RbdError),
}

async fn read(xs: &Client, path: &str) -> Result<Option<String>, Fatal> {
    Ok(xs.try_read_text(path).await?)
}

async fn state_of(xs: &Client, path: &str) -> Result<Option<XenbusState>, Fatal> {
    Ok(read(xs, path)
        .await?
        .as_deref()
        .and_then(XenbusState::parse))
}

async fn set_state(xs: &Client, be: &str, s: XenbusState) -> Result<(), Fatal> {
    xs.write(&format!("{be}/state"), s.as_str()).await?;
    Ok(())
}

/// Why a vbd task is asked to end (the daemon's stop, per device).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stop {
    /// Keep serving.
    #[default]
    Run,
    /// The daemon is stopping to be replaced (SIGTERM, an upgrade): finish
    /// and answer what the rings took, then let go of everything without a
    /// word to Xenstore or the guest. The next daemon adopts the device.
    Handover,
    /// Close the device (Closed): the operator asked for it, or its domain
    /// is gone.
    Close,
}

/// Guest-written text put into a log line or an `error` node: at most this
/// many bytes of it.
pub const GUEST_TEXT_MAX: usize = 64;

/// `s` cut to [`GUEST_TEXT_MAX`] bytes (on a character boundary), marked
/// when cut: whatever a guest wrote, a log line about it stays short.
pub fn truncated(s: &str) -> std::borrow::Cow<'_, str> {
    if s.len() <= GUEST_TEXT_MAX {
        return s.into();
    }
    let mut end = GUEST_TEXT_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &s[..end], s.len()).into()
}

/// Events a guest can repeat at will (connecting, closing) are logged at
/// info level this many times per vbd, then at debug level.
const LOUD_EVENTS: u32 = 16;

/// Counts a vbd's repeatable events, for [`LOUD_EVENTS`].
#[derive(Debug, Default)]
struct Chatter(u32);

impl Chatter {
    /// Whether this event still gets an info line.
    fn loud(&mut self) -> bool {
        self.0 = self.0.saturating_add(1);
        if self.0 == LOUD_EVENTS {
            tracing::info!(
                "this vbd keeps reconnecting: further connects and closes at debug level"
            );
        }
        self.0 < LOUD_EVENTS
    }
}

/// Puts the reason in `error` and the device in Closing (`xenbus_dev_fatal`).
/// Logged at debug level: the reason is often the guest's doing, and a guest
/// cycling its connection must not be able to fill dom0's logs.
pub async fn fail(xs: &Client, be: &str, why: &str) {
    tracing::debug!(backend = be, "vbd failed: {}", truncated(why));
    let _ = xs.write(&format!("{be}/error"), why).await;
    let _ = xs
        .write(&format!("{be}/state"), XenbusState::Closing.as_str())
        .await;
}

/// Runs one vbd until it is removed or `stop` leaves [`Stop::Run`] (handed
/// over as it stands, or closed, as the value says).
pub async fn run<G: Grants, EC: EventChannels>(
    ctx: Arc<VbdCtx<G, EC>>,
    domid: DomId,
    devid: u32,
    mut stop: watch::Receiver<Stop>,
) {
    let be = xenbus::backend_path(domid, devid);
    match lifecycle(&ctx, domid, &be, &mut stop).await {
        Ok(()) => tracing::debug!(%domid, devid, "vbd done"),
        Err(e) => fail(&ctx.xs, &be, &e.to_string()).await,
    }
}

struct Toolstack {
    fe: String,
    writable: bool,
    /// `discard-enable` (libxl writes 0 for `no-discard`; absent: on).
    discard: bool,
}

/// Refuses a node that anyone but dom0 could have written (its owner is
/// another domain, or its permissions let one write it): what the backend
/// trusts to name a disk must come from the toolstack, never from a guest,
/// even when a toolstack or an operator got the permissions wrong. A node
/// that does not exist passes (its absence is judged by the caller).
pub async fn dom0_only(xs: &Client, path: &str) -> Result<(), Fatal> {
    use xenstore::wire::DomId as XsDom;
    let perms = match xs.get_perms(path).await {
        Ok(p) => p,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let foreign_owner = perms
        .first()
        .is_none_or(|o| o.domid != XsDom(0) || o.access.can_write());
    let foreign_writer = perms
        .iter()
        .skip(1)
        .any(|p| p.domid != XsDom(0) && p.access.can_write());
    if foreign_owner || foreign_writer {
        let list: Vec<String> = perms.iter().map(|p| p.to_string()).collect();
        return Err(Fatal::Config(format!(
            "{path} has permissions {:?}: a domain other than dom0 can write it; refusing to trust it",
            list.join(" ")
        )));
    }
    Ok(())
}

/// The I/O limits for the vbd at `be`: its own `limit-*` nodes (`blkbackd
/// limit`), else the first configuration rule naming the guest by its name
/// or UUID, else none. The name and UUID count only where only dom0 can
/// write them: a guest cannot rename itself out of its limit.
pub async fn limit_for<G, EC>(
    ctx: &VbdCtx<G, EC>,
    domid: DomId,
    devid: u32,
    be: &str,
) -> Result<crate::vbd::limit::IoLimit, Fatal> {
    let xs = &ctx.xs;
    let own = crate::vbd::limit::read_nodes(xs, be)
        .await?
        .map_err(|e| Fatal::Config(format!("{be}: {e}")))?;
    if let Some(l) = own {
        return Ok(l);
    }
    let rules = ctx.limits.read().unwrap_or_else(|e| e.into_inner()).clone();
    if rules.is_empty() {
        return Ok(Default::default());
    }
    let home = format!("/local/domain/{}", domid.0);
    let trusted = |path: String| async move {
        match dom0_only(xs, &path).await {
            Ok(()) => read(xs, &path).await,
            Err(_) => Ok(None),
        }
    };
    let (name, vm) = tokio::join!(
        trusted(format!("{home}/name")),
        trusted(format!("{home}/vm"))
    );
    let (name, vm) = (name?, vm?);
    let uuid = vm.as_deref().and_then(|v| v.strip_prefix("/vm/"));
    Ok(rules
        .iter()
        .find(|r| r.matches(name.as_deref(), uuid, devid))
        .map(|r| r.limit)
        .unwrap_or_default())
}

/// Puts the vbd's limits (see [`limit_for`]) in force; a bad node is said
/// once per change and leaves the limits as they were.
async fn apply_limit<G, EC>(ctx: &VbdCtx<G, EC>, domid: DomId, devid: u32, be: &str) {
    let limiter = ctx.live.limiter(be);
    match limit_for(ctx, domid, devid, be).await {
        Ok(l) if l != limiter.limit() => {
            tracing::info!(%domid, backend = be, "I/O limit: {l}");
            limiter.set(l);
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(%domid, backend = be, "I/O limit unchanged: {e}"),
    }
}

/// [`dom0_only`] for several nodes at once (one round trip).
async fn all_dom0_only(xs: &Client, paths: &[String]) -> Result<(), Fatal> {
    for r in futures_util::future::join_all(paths.iter().map(|p| dom0_only(xs, p))).await {
        r?;
    }
    Ok(())
}

async fn check_toolstack(xs: &Client, be: &str, domid: DomId) -> Result<Toolstack, Fatal> {
    let need = |k: &'static str, v: Option<String>| {
        v.ok_or_else(|| Fatal::Config(format!("the toolstack did not write {k}")))
    };
    // Read together: one round trip.
    let p = [
        "frontend",
        "frontend-id",
        "mode",
        "device-type",
        "discard-enable",
    ]
    .map(|k| format!("{be}/{k}"));
    let mut nodes = vec![be.to_owned()];
    nodes.extend(p.iter().cloned());
    all_dom0_only(xs, &nodes).await?;
    let (fe, fe_id, mode, device_type, discard) = tokio::try_join!(
        read(xs, &p[0]),
        read(xs, &p[1]),
        read(xs, &p[2]),
        read(xs, &p[3]),
        read(xs, &p[4]),
    )?;
    let fe = need("frontend", fe)?;
    let fe_id = need("frontend-id", fe_id)?;
    if fe_id != domid.0.to_string() {
        return Err(Fatal::Config(format!(
            "frontend-id {fe_id:?} does not match the domain {domid} of the backend path"
        )));
    }
    if !fe.starts_with(&format!("/local/domain/{}/", domid.0)) {
        return Err(Fatal::Config(format!(
            "frontend {fe:?} is not below domain {domid}'s home"
        )));
    }
    let writable = match mode.as_deref() {
        None | Some("w") => true,
        Some("r") => false,
        Some(m) => return Err(Fatal::Config(format!("mode {m:?} is neither r nor w"))),
    };
    match device_type.as_deref() {
        None | Some("disk") | Some("cdrom") => {}
        Some(t) => {
            return Err(Fatal::Config(format!(
                "device-type {t:?} is neither disk nor cdrom"
            )))
        }
    }
    let discard = match discard.as_deref() {
        None | Some("1") => true,
        Some("0") => false,
        Some(d) => {
            return Err(Fatal::Config(format!(
                "discard-enable {:?} is neither 0 nor 1",
                truncated(d)
            )))
        }
    };
    Ok(Toolstack {
        fe,
        writable,
        discard,
    })
}

/// Waits for any change below `be` or `fe` (or `stop`); false if stopping.
/// Level-triggered: everything queued on both watches is taken at once, so a
/// guest rewriting its nodes costs one look at the state per wake-up, never
/// one per write (XSA-349).
async fn changed(
    be_w: &mut xenstore::Watch,
    fe_w: &mut xenstore::Watch,
    stop: &mut watch::Receiver<Stop>,
) -> bool {
    if *stop.borrow() != Stop::Run {
        return false;
    }
    let alive = tokio::select! {
        e = be_w.changed() => e.is_some(),
        e = fe_w.changed() => e.is_some(),
        _ = stop.changed() => false,
    };
    while be_w.try_next().is_some() {}
    while fe_w.try_next().is_some() {}
    alive && *stop.borrow() == Stop::Run
}

/// Whether the daemon is handing this device over (leave it as it is).
fn handing_over(stop: &watch::Receiver<Stop>) -> bool {
    *stop.borrow() == Stop::Handover
}

/// One look at the nodes the state machine reads ([`step`]), in one round
/// trip.
async fn observe(xs: &Client, be: &str, fe: &str) -> Result<Observed, Fatal> {
    let (online, be_state, fe_state) = (
        xenbus::node(be, key::ONLINE),
        xenbus::node(be, key::STATE),
        xenbus::node(fe, key::STATE),
    );
    let (dir, online, backend, frontend) = tokio::try_join!(
        read(xs, be),
        read(xs, &online),
        state_of(xs, &be_state),
        state_of(xs, &fe_state)
    )?;
    Ok(Observed {
        exists: dir.is_some(),
        online: online.as_deref() != Some("0"),
        backend,
        frontend,
    })
}

async fn lifecycle<G: Grants, EC: EventChannels>(
    ctx: &VbdCtx<G, EC>,
    domid: DomId,
    be: &str,
    stop: &mut watch::Receiver<Stop>,
) -> Result<(), Fatal> {
    let xs = &ctx.xs;
    // The daemon's scan named this vbd by `{VBD_ROOT}/domid/devid`.
    let devid: u32 = be
        .rsplit('/')
        .next()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0);
    let mut offer = ctx.offer.read().unwrap_or_else(|e| e.into_inner()).clone();
    let ts = check_toolstack(xs, be, domid).await?;
    let mut be_w = xs.watch(be).await?;
    let mut fe_w = xs.watch(&format!("{}/state", ts.fe)).await?;
    let adopted = adopting(xs, be, &ts.fe).await?;
    // The toolstack's word on discard holds for this vbd, adopted or new.
    offer.discard &= ts.discard;
    if adopted {
        // What this device was offered, not what the configuration says now:
        // the frontend negotiated against it, and a smaller offer would
        // refuse the rings it already has.
        offer = super::adopted_offer(xs, be, &offer).await?;
        offer.discard &= ts.discard;
        ctx.live.note_adopted(be);
        tracing::info!(%domid, backend = be, "adopting a connected device: re-attaching its rings at rsp_prod");
    } else {
        super::publish_init_wait(xs, be, &offer).await?;
        tracing::info!(%domid, backend = be, "vbd in InitWait, waiting for the hotplug script");
    }

    // The hotplug script's handshake: physical-device + diskseq.
    let disk = loop {
        match step(
            Phase::AwaitingDisk { adopted },
            &observe(xs, be, &ts.fe).await?,
        ) {
            Step::Gone => return Ok(()), // removed before it was used
            Step::CloseForRemoval => {
                set_state(xs, be, XenbusState::Closed).await?;
                tracing::info!(%domid, backend = be, "vbd removed before its disk was published: closed");
                return wait_removed(xs, be, &mut be_w, stop).await;
            }
            _ => {} // Step::OpenDisk: if it is published
        }
        match published_disk(ctx, be).await? {
            Some(Published::Block(id)) => {
                let opened = disk::open_by_diskseq(id, ts.writable)?;
                tracing::info!(%domid, disk = %id, "disk opened by diskseq");
                break Arc::new(ServedDisk::File(FileDisk::from_opened(opened)));
            }
            Some(Published::File(path, id)) => {
                let file = disk::open_file_by_id(&path, id, ts.writable)?;
                let d = FileDisk::from_file(file, !ts.writable).map_err(|e| {
                    Fatal::Config(format!("reading the size of {}: {e}", path.display()))
                })?;
                tracing::info!(%domid, path = %path.display(), file = %id, "file opened by identity");
                break Arc::new(ServedDisk::File(d));
            }
            Some(Published::Rbd(spec, id)) => {
                let d = open_rbd(spec, id, ts.writable).await?;
                tracing::info!(%domid, image = %d.image().spec, id = %d.image().id, "RBD image opened");
                break Arc::new(ServedDisk::Rbd(d));
            }
            None => {}
        }
        if !changed(&mut be_w, &mut fe_w, stop).await {
            return Ok(());
        }
    };
    publish_geometry(xs, be, &*disk, &offer).await?;
    xs.write(&format!("{be}/opened"), "1").await?;
    let mut chatter = Chatter::default();
    let mut size_warned = false;

    // Connect, serve, close; again if the frontend comes back.
    loop {
        // Wait for the frontend (or for the end).
        loop {
            match step(Phase::AwaitingFrontend, &observe(xs, be, &ts.fe).await?) {
                Step::Gone => return Ok(()),
                Step::CloseForRemoval => {
                    // Let go of the disk first, so the hotplug script's
                    // remove (run once we are Closed) can release it.
                    drop(disk);
                    set_state(xs, be, XenbusState::Closed).await?;
                    return wait_removed(xs, be, &mut be_w, stop).await;
                }
                Step::Connect => break,
                Step::Reinitialise => set_state(xs, be, XenbusState::InitWait).await?,
                _ => {} // Step::Wait
            }
            if !changed(&mut be_w, &mut fe_w, stop).await {
                if !handing_over(stop) {
                    set_state(xs, be, XenbusState::Closed).await?;
                }
                return Ok(());
            }
        }
        // The lock may take a while (`[rbd] lock_wait_s`): meanwhile the
        // vbd can still be closed or removed, and the daemon stopped.
        match lock_rbd_or_interrupted(xs, be, &ts.fe, &disk, &mut be_w, &mut fe_w, stop).await? {
            LockWait::Held => {}
            // Closing or removal: handled as before a connection.
            LockWait::Closing => continue,
            // As when the wait for the frontend ends so (stopping, or the
            // watches gone).
            LockWait::Stopped => {
                if !handing_over(stop) {
                    set_state(xs, be, XenbusState::Closed).await?;
                }
                return Ok(());
            }
        }
        let (qstop, qstop_rx) = watch::channel(false);
        apply_limit(ctx, domid, devid, be).await;
        // Boxed so it can be dropped as soon as the queues are given up on:
        // it holds the disk, which the hotplug script's remove needs closed.
        let mut serving = Box::pin(serve_frontend(
            Connection {
                xs,
                be,
                fe: &ts.fe,
                domid,
                grants: ctx.grants.clone(),
                evtchn: &*ctx.evtchn,
                disk: disk.clone(),
                offer: &offer,
                live: Some(&ctx.live),
            },
            qstop_rx,
        ));
        let mut size_check = tokio::time::interval(Duration::from_secs(1));
        // The configuration's limit rules as last applied (SIGHUP replaces them).
        let mut rules = ctx.limits.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut published = disk.sectors();
        let mut announced = false;
        // Serve until the frontend or the toolstack closes, or we stop.
        let outcome = loop {
            tokio::select! {
                r = &mut serving => break Some(r),
                _ = size_check.tick() => {
                    let now = ctx.limits.read().unwrap_or_else(|e| e.into_inner()).clone();
                    if !Arc::ptr_eq(&now, &rules) {
                        rules = now;
                        apply_limit(ctx, domid, devid, be).await;
                    }
                    match disk.refresh_sectors() {
                        Ok(now) if now != published => {
                            publish_resize(xs, be, now).await?;
                            tracing::info!(%domid, backend = be, from = published, to = now, "disk resized");
                            published = now;
                        }
                        Ok(_) => {}
                        Err(e) if !size_warned => {
                            size_warned = true;
                            tracing::warn!(%domid, backend = be, "cannot re-read the disk size: {e} (said once)");
                        }
                        Err(e) => tracing::debug!(%domid, "cannot re-read the disk size: {e}"),
                    }
                }
                alive = changed(&mut be_w, &mut fe_w, stop) => {
                    apply_limit(ctx, domid, devid, be).await;
                    let o = observe(xs, be, &ts.fe).await?;
                    if alive && !announced && o.backend == Some(XenbusState::Connected) {
                        announced = true;
                        if chatter.loud() {
                            tracing::info!(%domid, backend = be, adopted_at_start = adopted, "vbd connected");
                        } else {
                            tracing::debug!(%domid, backend = be, "vbd connected");
                        }
                    }
                    let next = step(Phase::Connected, &o);
                    if !alive || next != Step::Wait {
                        if next == (Step::Disconnect { closing: true }) {
                            set_state(xs, be, XenbusState::Closing).await?;
                        }
                        let _ = qstop.send(true);
                        break None;
                    }
                }
            }
        };
        let result = match outcome {
            Some(r) => r,
            None => tokio::time::timeout(Duration::from_secs(5), &mut serving)
                .await
                .unwrap_or_else(|_| {
                    tracing::warn!(%domid, backend = be, "queues did not stop within 5 s; abandoning them");
                    Ok(Vec::new())
                }),
        };
        drop(serving);
        if let Err(e) = result {
            fail(xs, be, &e.to_string()).await;
        } else if handing_over(stop) {
            // Every answer is published and the rings are let go of as they
            // stand: the device stays Connected for the next daemon.
            tracing::debug!(%domid, backend = be, "vbd handed over");
            return Ok(());
        }
        // Queues stopped and rings unmapped. Closed once the frontend is
        // Closed (Closing until then, as blkback answers a closing frontend),
        // or at once when the toolstack removes the device.
        let removing = loop {
            match step(Phase::Disconnected, &observe(xs, be, &ts.fe).await?) {
                Step::Gone => return Ok(()),
                Step::CloseForRemoval => break true,
                Step::Closed => break false,
                Step::AnswerClosing => set_state(xs, be, XenbusState::Closing).await?,
                _ => {} // Step::Wait
            }
            if !changed(&mut be_w, &mut fe_w, stop).await {
                if handing_over(stop) {
                    // Mid-close: the next daemon finishes it.
                    return Ok(());
                }
                break true;
            }
        };
        if removing {
            drop(disk);
            set_state(xs, be, XenbusState::Closed).await?;
            tracing::info!(%domid, backend = be, "vbd closed for removal");
            return wait_removed(xs, be, &mut be_w, stop).await;
        }
        set_state(xs, be, XenbusState::Closed).await?;
        if chatter.loud() {
            tracing::info!(%domid, backend = be, "vbd closed");
        } else {
            tracing::debug!(%domid, backend = be, "vbd closed");
        }
        if *stop.borrow() != Stop::Run {
            return Ok(());
        }
    }
}

/// Tells a connected frontend the disk's new size as blkback does: the new
/// `sectors` and the state rewritten with its value, in one transaction, so
/// blkfront's state watch fires and it re-reads the capacity.
async fn publish_resize(xs: &Client, be: &str, sectors: u64) -> Result<(), Fatal> {
    xs.transaction(|tx| async move {
        tx.write(&format!("{be}/sectors"), sectors.to_string())
            .await?;
        tx.write(&format!("{be}/state"), XenbusState::Connected.as_str())
            .await
    })
    .await?;
    Ok(())
}

/// Whether a previous daemon left this device connected (it crashed or was
/// restarted). Its rings are then taken over where they stand: the queues
/// answer requests strictly in ring order, so the published `rsp_prod` marks
/// exactly what was answered; consumption resumes there (`BACK_RING_ATTACH`),
/// requests that were taken but not answered are read again and re-executed,
/// and nothing answered is answered twice. (Linux blkfront does not reconnect
/// from Closed, so going through Closing would strand the guest.) An engine
/// that completes out of order must keep responses in ring order to keep this
/// safe.
async fn adopting(xs: &Client, be: &str, fe: &str) -> Result<bool, Fatal> {
    let (be_state, fe_state) = (format!("{be}/state"), format!("{fe}/state"));
    let (b, f) = tokio::try_join!(state_of(xs, &be_state), state_of(xs, &fe_state))?;
    Ok(b == Some(XenbusState::Connected) && f == Some(XenbusState::Connected))
}

async fn wait_removed(
    xs: &Client,
    be: &str,
    be_w: &mut xenstore::Watch,
    stop: &mut watch::Receiver<Stop>,
) -> Result<(), Fatal> {
    while read(xs, be).await?.is_some() {
        if *stop.borrow() != Stop::Run {
            break;
        }
        tokio::select! {
            e = be_w.changed() => if e.is_none() { break },
            _ = stop.changed() => break,
        }
    }
    Ok(())
}

/// The disk the hotplug script published, if it has.
async fn published_disk<G, EC>(ctx: &VbdCtx<G, EC>, be: &str) -> Result<Option<Published>, Fatal> {
    let xs = &ctx.xs;
    let n = Nodes::read(xs, be).await?;
    if let Some(published) = n.rbd().map_err(Fatal::Config)? {
        trusted(xs, be, &published).await?;
        return Ok(Some(published));
    }
    let Some(phys) = n.physical_device.as_deref() else {
        // A file to serve directly is published in one transaction.
        if n.physical_file.is_none() {
            return Ok(None);
        }
        let Some(published) = n.file()? else {
            return Err(Fatal::Config(
                "the hotplug script wrote physical-file without file-id; refusing to serve a file by path alone".into(),
            ));
        };
        trusted(xs, be, &published).await?;
        return Ok(Some(published));
    };
    let (major, minor) = disk::parse_physical_device(phys.as_bytes())?;
    let diskseq = match n.diskseq.as_deref() {
        Some(s) => disk::parse_diskseq(s.as_bytes())?,
        None if ctx.allow_missing_diskseq => {
            tracing::warn!(
                backend = be,
                "physical-device without diskseq: serving by major:minor alone, as configured"
            );
            disk::current_diskseq(major, minor)?
        }
        // The script may write diskseq right after physical-device: wait.
        None if n.hotplug_status.as_deref() == Some("connected") => {
            return Err(Fatal::Config(
                "the hotplug script wrote physical-device without diskseq; refusing to serve a disk by major:minor alone".into(),
            ));
        }
        None => return Ok(None),
    };
    let published = Published::Block(DiskId {
        major,
        minor,
        diskseq,
    });
    trusted(xs, be, &published).await?;
    Ok(Some(published))
}

/// Opens the RBD image the block script checked: the same id (not another
/// image since created under its name). librbd blocks while it talks to the
/// cluster: on a blocking thread.
async fn open_rbd(spec: crate::rbd::Spec, id: String, writable: bool) -> Result<RbdDisk, Fatal> {
    let opened = tokio::task::spawn_blocking(move || {
        let image = crate::rbd::Image::open(&spec, writable, Some(&id))?;
        RbdDisk::new(image).map_err(|e| Fatal::Config(format!("reading the image's size: {e}")))
    })
    .await;
    opened.map_err(|e| Fatal::Config(format!("opening the image: {e}")))?
}

/// Before a guest connects to a writable RBD image: takes its lock, waiting
/// (`[rbd] lock_wait_s`) for another client to let go (a migrating guest's
/// source), breaking it at once if it is held by the owner recorded in
/// `rbd-lock-owner` (this vbd's previous daemon, crashed); records the owner
/// it took it as, readable and writable by dom0 only, so that the next
/// daemon breaks exactly this lock and no other.
async fn take_rbd_lock(
    xs: &Client,
    be: &str,
    disk: &ServedDisk,
    cancel: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), Fatal> {
    let ServedDisk::Rbd(d) = disk else {
        return Ok(());
    };
    let image = d.image().clone();
    if image.read_only || image.holds_lock() {
        return Ok(());
    }
    let owner_node = xenbus::node(be, key::RBD_LOCK_OWNER);
    // Only dom0 may name a lock to break: a guest that could would take
    // another host's image from under it.
    all_dom0_only(xs, std::slice::from_ref(&owner_node)).await?;
    let predecessor = xs.try_read_text(&owner_node).await?;
    let taken = tokio::task::spawn_blocking({
        let image = image.clone();
        move || image.take_lock(predecessor.as_deref(), crate::rbd::lock_wait(), &cancel)
    })
    .await
    .map_err(|e| Fatal::Config(format!("taking the image's lock: {e}")))?;
    taken?;
    if let Some(owner) = image.owner() {
        xs.write(&owner_node, &owner).await?;
        xs.set_perms(&owner_node, &[Perm::new(Access::None, 0)])
            .await?;
    }
    Ok(())
}

/// How [`lock_rbd_or_interrupted`] ended.
enum LockWait {
    /// The lock is held (or not needed).
    Held,
    /// Given up: the toolstack closes or removes the vbd.
    Closing,
    /// Given up: the daemon stops (or the watches ended), as
    /// [`changed`] says.
    Stopped,
}

/// [`take_rbd_lock`] while watching the vbd: the wait is given up when the
/// toolstack closes or removes the vbd or the daemon stops meanwhile.
/// Xenstore changes that leave the vbd waiting to connect (a guest writing
/// its own nodes) do not restart the wait: a guest can neither prolong it
/// nor pile up waiting threads.
async fn lock_rbd_or_interrupted(
    xs: &Client,
    be: &str,
    fe: &str,
    disk: &ServedDisk,
    be_w: &mut xenstore::Watch,
    fe_w: &mut xenstore::Watch,
    stop: &mut watch::Receiver<Stop>,
) -> Result<LockWait, Fatal> {
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lock = take_rbd_lock(xs, be, disk, cancel.clone());
    tokio::pin!(lock);
    loop {
        tokio::select! {
            r = &mut lock => return r.map(|()| LockWait::Held),
            still = changed(be_w, fe_w, stop) => {
                let end = if !still {
                    LockWait::Stopped
                } else if matches!(
                    step(Phase::AwaitingFrontend, &observe(xs, be, fe).await?),
                    Step::Gone | Step::CloseForRemoval
                ) {
                    LockWait::Closing
                } else {
                    continue;
                };
                // The blocking wait sees it within half a second and lets
                // go of the image.
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(backend = be, "gave up waiting for the RBD image's lock: the vbd is closing or the daemon stops");
                return Ok(end);
            }
        }
    }
}

/// Refuses a published disk whose nodes anyone but dom0 could have written.
async fn trusted(xs: &Client, be: &str, p: &Published) -> Result<(), Fatal> {
    all_dom0_only(xs, &p.keys().map(|k| xenbus::node(be, k))).await
}
