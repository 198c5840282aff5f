//! One virtual block device: publishing what the backend offers, reading
//! what the frontend wrote, mapping its rings, binding its event channels and
//! serving every queue on a thread of its own until told to stop or until the
//! frontend breaks the protocol ([`serve_frontend`], given one
//! [`Connection`]). The xenbus state machine is [`transition`] (a pure
//! function, tested by a table of blkback's transitions); [`lifecycle`]
//! carries it out (the hotplug handshake, Connected, Closing, reconnect,
//! resize, adoption after a restart); the per-queue serving loop is
//! [`queue`]; a vbd's I/O limits are [`limit`] and its fair share of the
//! host's requests in flight is [`share`]. Paths and keys are
//! [`crate::xenbus`]'s.
#![forbid(unsafe_code)]

pub mod frontend;
pub mod lifecycle;
pub mod limit;
pub mod live;
pub mod queue;
pub mod share;
pub mod transition;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use xenstore::{Client, Xs};

use crate::abi::blkif::VDISK_READONLY;
use crate::abi::sys::XenbusState;
use crate::io::engine::{Engine, EngineChoice};
use crate::io::pool::BouncePool;
use crate::io::Disk;
use crate::ring::request::Limits;
use crate::ring::BackRing;
use crate::xen::{DomId, EventChannels, Grants};
use queue::{Queue, QueueEnd, QueueParts, QueueStats};

/// The largest `max-ring-page-order` offered: Linux's own bound.
pub const MAX_RING_ORDER: u32 = crate::abi::blkif::XENBUS_MAX_RING_GRANT_ORDER;
/// The most queues offered (`multi-queue-max-queues`).
pub const MAX_QUEUES: u32 = 32;

/// What the backend offers a frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    /// `max-ring-page-order`.
    pub max_ring_order: u32,
    /// `multi-queue-max-queues`.
    pub max_queues: u32,
    /// `feature-max-indirect-segments` (0: none).
    pub max_indirect_segments: u16,
    /// `feature-persistent`.
    pub persistent_grants: bool,
    /// The I/O engine the rings use.
    pub engine: EngineChoice,
    /// `O_DIRECT` for aligned requests where the disk allows it.
    pub direct_io: bool,
    /// Map each request's grants instead of grant-copying them.
    pub map_grants: bool,
    /// Each ring's bounce pool in bytes (raised to one largest request).
    pub pool_bytes: usize,
    /// Adaptive polling's largest window, µs (0: off).
    pub poll_us: u32,
    /// Disk I/O straight on guest pages where they are mapped (`[io]
    /// zero_copy`; off by default).
    pub zero_copy: bool,
    /// `feature-discard` where the disk can: the toolstack's
    /// `discard-enable` = 0 (libxl's `no-discard`) turns it off per vbd.
    pub discard: bool,
}

impl Default for Offer {
    fn default() -> Self {
        Offer {
            max_ring_order: MAX_RING_ORDER,
            max_queues: 4,
            max_indirect_segments: 256,
            persistent_grants: true,
            engine: EngineChoice::Auto,
            direct_io: true,
            map_grants: false,
            pool_bytes: queue::DEFAULT_POOL_BYTES,
            poll_us: 0,
            // Off until it measures faster in a PV dom0 (VM scenario 16
            // runs both; two runs so far disagreed with each other).
            zero_copy: false,
            discard: true,
        }
    }
}

/// Where the backend keeps the offer a device was made (dom0-only, like every
/// backend node; the guest may read it), for a daemon that adopts it.
pub const OFFER_KEY: &str = "blkbackd-offer";

impl Offer {
    /// One line, `key=value` pairs: what [`Offer::decode`] reads back.
    pub fn encode(&self) -> String {
        use clap::ValueEnum as _;
        let engine = self
            .engine
            .to_possible_value()
            .map_or_else(|| "auto".to_owned(), |v| v.get_name().to_owned());
        format!(
            "order={} queues={} indirect={} persistent={} engine={engine} direct={} map={} pool={} poll={} zc={} discard={}",
            self.max_ring_order,
            self.max_queues,
            self.max_indirect_segments,
            u8::from(self.persistent_grants),
            u8::from(self.direct_io),
            u8::from(self.map_grants),
            self.pool_bytes,
            self.poll_us,
            u8::from(self.zero_copy),
            u8::from(self.discard),
        )
    }

    /// Reads what [`Offer::encode`] wrote; keys it does not name keep the
    /// value of `base`. `None` if anything is malformed.
    pub fn decode(s: &str, base: &Offer) -> Option<Offer> {
        use clap::ValueEnum as _;
        let mut o = base.clone();
        let flag = |v: &str| match v {
            "0" => Some(false),
            "1" => Some(true),
            _ => None,
        };
        for kv in s.split_ascii_whitespace() {
            let (k, v) = kv.split_once('=')?;
            match k {
                "order" => o.max_ring_order = v.parse().ok().filter(|n| *n <= MAX_RING_ORDER)?,
                "queues" => {
                    o.max_queues = v.parse().ok().filter(|n| (1..=MAX_QUEUES).contains(n))?
                }
                "indirect" => o.max_indirect_segments = v.parse().ok()?,
                "persistent" => o.persistent_grants = flag(v)?,
                "engine" => o.engine = crate::io::engine::EngineChoice::from_str(v, true).ok()?,
                "direct" => o.direct_io = flag(v)?,
                "map" => o.map_grants = flag(v)?,
                "pool" => o.pool_bytes = v.parse().ok().filter(|n| *n <= 1 << 30)?,
                "poll" => o.poll_us = v.parse().ok().filter(|n| *n <= 1000)?,
                "zc" => o.zero_copy = flag(v)?,
                "discard" => o.discard = flag(v)?,
                _ => {}
            }
        }
        Some(o)
    }
}

/// The offer a device being adopted was made: the one its first daemon
/// recorded, else what its feature nodes say (over `current` for the rest).
/// A daemon whose configuration changed applies it to new devices only.
pub async fn adopted_offer(xs: &Client, be: &str, current: &Offer) -> Result<Offer, VbdError> {
    if let Some(v) = xs.try_read(&format!("{be}/{OFFER_KEY}")).await? {
        if let Some(o) = Offer::decode(&String::from_utf8_lossy(&v), current) {
            return Ok(o);
        }
        tracing::debug!(
            backend = be,
            "unreadable {OFFER_KEY}; using the feature nodes"
        );
    }
    let num =
        |v: Option<Vec<u8>>| v.and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u32>().ok());
    let mut o = current.clone();
    let keys = [
        "max-ring-page-order",
        "multi-queue-max-queues",
        "feature-max-indirect-segments",
        "feature-persistent",
    ]
    .map(|k| format!("{be}/{k}"));
    let (order, queues, indirect, persistent) = tokio::try_join!(
        xs.try_read(&keys[0]),
        xs.try_read(&keys[1]),
        xs.try_read(&keys[2]),
        xs.try_read(&keys[3]),
    )?;
    if let Some(n) = num(order).filter(|n| *n <= MAX_RING_ORDER) {
        o.max_ring_order = n;
    }
    if let Some(n) = num(queues).filter(|n| (1..=MAX_QUEUES).contains(n)) {
        o.max_queues = n;
    }
    if let Some(n) = num(indirect).and_then(|n| u16::try_from(n).ok()) {
        o.max_indirect_segments = n;
    }
    if let Some(n) = num(persistent) {
        o.persistent_grants = n == 1;
    }
    Ok(o)
}

/// A vbd could not be served.
#[derive(Debug, thiserror::Error)]
pub enum VbdError {
    /// What the frontend wrote is unacceptable.
    #[error(transparent)]
    Frontend(#[from] frontend::FrontendError),
    /// Xenstore failed.
    #[error(transparent)]
    Xenstore(#[from] xenstore::Error),
    /// A ring could not be mapped or an event channel bound.
    #[error("cannot connect queue {queue}: {source}")]
    Connect {
        /// Which queue.
        queue: usize,
        /// Why.
        source: std::io::Error,
    },
    /// The frontend did not get ready in time.
    #[error("frontend did not reach Initialised within {0:?}")]
    Timeout(Duration),
}

/// The limits requests of this disk are checked against.
pub fn limits<D: Disk>(disk: &D, offer: &Offer) -> Limits {
    Limits {
        disk_sectors: disk.sectors(),
        logical_block_sectors: u64::from(disk.logical_block_size() / 512).max(1),
        read_only: disk.read_only(),
        max_indirect_segments: offer.max_indirect_segments,
        flush: true,
        barrier: true,
        discard: offer.discard && disk.can_discard(),
        discard_secure: false,
    }
}

async fn write_all(xs: &Client, be: &str, kv: Vec<(&'static str, String)>) -> Result<(), VbdError> {
    xs.transaction(|tx| {
        let kv = kv.clone();
        async move {
            // All in flight at once: one round trip for the whole set.
            let paths: Vec<String> = kv.iter().map(|(k, _)| format!("{be}/{k}")).collect();
            let writes = paths.iter().zip(&kv).map(|(p, (_, v))| tx.write(p, v));
            for r in futures_util::future::join_all(writes).await {
                r?;
            }
            Ok(())
        }
    })
    .await?;
    Ok(())
}

/// Writes what the backend offers every frontend (before InitWait).
pub async fn publish_features(xs: &Client, be: &str, offer: &Offer) -> Result<(), VbdError> {
    write_all(xs, be, features(offer)).await
}

/// The nodes that say what the backend offers every frontend.
fn features(offer: &Offer) -> Vec<(&'static str, String)> {
    vec![
        ("feature-flush-cache", "1".to_owned()),
        ("feature-barrier", "1".to_owned()),
        (
            "feature-max-indirect-segments",
            offer.max_indirect_segments.to_string(),
        ),
        (
            "feature-persistent",
            u8::from(offer.persistent_grants).to_string(),
        ),
        ("max-ring-page-order", offer.max_ring_order.to_string()),
        ("multi-queue-max-queues", offer.max_queues.to_string()),
        (OFFER_KEY, offer.encode()),
    ]
}

/// A new device's first words: what the backend offers, `opened` = 0 and
/// InitWait, in one transaction (one round trip while libxl waits for
/// InitWait to run the block script; the frontend never sees InitWait
/// without the features).
pub async fn publish_init_wait(xs: &Client, be: &str, offer: &Offer) -> Result<(), VbdError> {
    let mut kv = features(offer);
    kv.push(("opened", "0".to_owned()));
    kv.push(("state", XenbusState::InitWait.as_str().to_owned()));
    write_all(xs, be, kv).await
}

/// Writes the disk's geometry and what it supports (once it is open). The
/// discard nodes are the device's own limits, as Linux blkback publishes
/// them, and only where discard is offered.
pub async fn publish_geometry<D: Disk>(
    xs: &Client,
    be: &str,
    disk: &D,
    offer: &Offer,
) -> Result<(), VbdError> {
    let l = limits(disk, offer);
    let info = if l.read_only { VDISK_READONLY } else { 0 };
    let lbs = disk.logical_block_size().to_string();
    let mut kv = vec![
        ("sectors", l.disk_sectors.to_string()),
        ("sector-size", lbs.clone()),
        (
            "physical-sector-size",
            disk.physical_block_size().to_string(),
        ),
        ("info", info.to_string()),
        ("feature-discard", u8::from(l.discard).to_string()),
    ];
    if l.discard {
        kv.extend([
            (
                "discard-granularity",
                disk.discard_granularity()
                    .max(disk.logical_block_size())
                    .to_string(),
            ),
            ("discard-alignment", disk.discard_alignment().to_string()),
            // No interface tells a process whether a device can erase
            // securely short of issuing BLKSECDISCARD: never offered.
            ("discard-secure", "0".to_owned()),
        ]);
    }
    write_all(xs, be, kv).await
}

/// Features, geometry, then InitWait: what a backend whose disk is already
/// known does at once (the simulation's vbds).
pub async fn publish<D: Disk>(
    xs: &Client,
    be: &str,
    disk: &D,
    offer: &Offer,
) -> Result<(), VbdError> {
    publish_features(xs, be, offer).await?;
    publish_geometry(xs, be, disk, offer).await?;
    xs.write(&format!("{be}/state"), XenbusState::InitWait.as_str())
        .await?;
    Ok(())
}

/// Waits until the frontend at `fe` is Initialised (or Connected), for a
/// backend without a lifecycle around it (the simulation's vbds; the
/// lifecycle's own state machine waits for it otherwise).
pub async fn wait_frontend_ready(xs: &Client, fe: &str, timeout: Duration) -> Result<(), VbdError> {
    let mut w = xs.watch(&format!("{fe}/state")).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let st = xs.try_read(&format!("{fe}/state")).await?;
        let st = st
            .as_deref()
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(XenbusState::parse);
        if matches!(st, Some(XenbusState::Initialised | XenbusState::Connected)) {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, w.next()).await {
            Ok(Some(_)) => {}
            _ => return Err(VbdError::Timeout(timeout)),
        }
    }
}

/// One frontend's connection: who it is, what serves it and what it was
/// offered (what [`serve_frontend`] needs, read once by the lifecycle).
#[derive(Debug)]
pub struct Connection<'a, G, EC, D> {
    /// Dom0's Xenstore.
    pub xs: &'a Client,
    /// The backend directory.
    pub be: &'a str,
    /// The frontend directory.
    pub fe: &'a str,
    /// The frontend's domain.
    pub domid: DomId,
    /// Grant access.
    pub grants: Arc<G>,
    /// Event channels.
    pub evtchn: &'a EC,
    /// The disk.
    pub disk: Arc<D>,
    /// What the backend offered this device.
    pub offer: &'a Offer,
    /// Where the rings' counters and the vbd's limiter live (`None`: not
    /// shown, not limited).
    pub live: Option<&'a live::Live>,
}

/// Maps the rings of a frontend that is ready (Initialised or Connected)
/// and serves every queue until `stop` turns true or a ring halts. A halted
/// ring puts its reason in the backend's `error` node and the device in
/// Closing.
pub async fn serve_frontend<G: Grants, EC: EventChannels, D: Disk>(
    c: Connection<'_, G, EC, D>,
    stop: watch::Receiver<bool>,
) -> Result<Vec<(QueueEnd, QueueStats)>, VbdError> {
    let Connection {
        xs,
        be,
        fe,
        domid,
        grants,
        evtchn,
        disk,
        offer,
        live,
    } = c;
    let cfg = frontend::read(xs, fe, offer.max_ring_order, offer.max_queues).await?;
    let limits = limits(&*disk, offer);
    let pages = 1usize << cfg.order;
    let mut queues = Vec::with_capacity(cfg.queues.len());
    let mut engine_name = "";
    for (i, q) in cfg.queues.iter().enumerate() {
        let err = |source| VbdError::Connect { queue: i, source };
        let mem = grants.map(domid, &q.refs, true).map_err(err)?;
        let ring = BackRing::new(mem, pages, cfg.abi)
            .map_err(|e| err(std::io::Error::other(e.to_string())))?;
        let ev = evtchn.bind_interdomain(domid, q.port).map_err(err)?;
        let max_segs = usize::from(offer.max_indirect_segments)
            .max(crate::abi::blkif::BLKIF_MAX_SEGMENTS_PER_REQUEST);
        let pool =
            Arc::new(BouncePool::new(queue::pool_pages(offer.pool_bytes, max_segs)).map_err(err)?);
        let engine = Engine::open(
            offer.engine,
            disk.clone() as Arc<dyn Disk>,
            pool.clone(),
            offer.direct_io,
        )
        .map_err(err)?;
        if i == 0 {
            tracing::debug!(%domid, engine = engine.name(), "I/O engine");
            engine_name = engine.name();
        }
        queues.push(
            Queue::new(QueueParts {
                ring,
                ev,
                grants: grants.clone(),
                disk: disk.clone(),
                engine,
                pool,
                domid,
                limits: limits.clone(),
            })
            .with_persistent_grants(cfg.persistent && offer.persistent_grants)
            .with_map_mode(offer.map_grants)
            .with_polling(Duration::from_micros(u64::from(offer.poll_us)))
            .with_zero_copy(offer.zero_copy),
        );
    }
    xs.write(&format!("{be}/state"), XenbusState::Connected.as_str())
        .await?;
    // Debug: a guest can reconnect at will; the lifecycle says it at info
    // level, rate-limited per vbd.
    tracing::debug!(
        %domid, queues = queues.len(), order = cfg.order, abi = cfg.abi.protocol(),
        engine = engine_name, "rings connected"
    );
    let slots = live.map(|l| l.register(be, engine_name, queues.len(), disk.rbd_image()));
    let limiter = live.map(|l| l.limiter(be));
    let share = Arc::new(share::VbdShare::default());
    // Each queue is served by a thread of its own; the stop reaches them
    // through a signal they sleep on.
    let signal = queue::StopSignal::new().map_err(|e| VbdError::Connect {
        queue: 0,
        source: e,
    })?;
    let mut ends = futures_util::stream::FuturesUnordered::new();
    for (i, q) in queues.into_iter().enumerate() {
        let q = match &slots {
            Some(s) => q.with_counters(s[i].clone()),
            None => q,
        };
        let q = match &limiter {
            Some(l) => q.with_limiter(l.clone(), i),
            None => q,
        }
        .with_share(share.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = signal.try_clone().and_then(|sig| {
            std::thread::Builder::new()
                .name(format!("blkbackd-q{}.{i}", domid.0))
                .spawn(move || {
                    let _ = tx.send(q.serve(&sig));
                })
        });
        if let Err(e) = spawned {
            tracing::warn!(%domid, "cannot start queue {i}'s thread: {e}");
        }
        ends.push(rx);
    }
    let forward = {
        let signal = signal.try_clone();
        let mut stop = stop;
        async move {
            let _ = stop.wait_for(|s| *s).await;
            match signal {
                Ok(s) => s.stop(),
                Err(e) => tracing::warn!("cannot signal the queues to stop: {e}"),
            }
        }
    };
    let forward = tokio::spawn(forward);
    let mut out = Vec::new();
    while let Some(r) = futures_util::StreamExt::next(&mut ends).await {
        let r = r.unwrap_or_else(|_| {
            (
                QueueEnd::Failed("the queue's thread ended without an answer (it panicked)".into()),
                QueueStats::default(),
            )
        });
        // A dead ring takes the device to Closing at once, reason in `error`:
        // the guest's doing at debug level, ours at error level.
        let why = match &r.0 {
            QueueEnd::Stopped => None,
            QueueEnd::Halted(e) => {
                tracing::debug!(%domid, "ring halted: {e}");
                Some(e.to_string())
            }
            QueueEnd::Failed(e) => {
                tracing::error!(%domid, backend = be, "a queue failed: {e}");
                Some(format!("internal error of the backend: {e}"))
            }
        };
        if let Some(why) = why {
            let _ = xs.write(&format!("{be}/error"), why).await;
            let _ = xs
                .write(&format!("{be}/state"), XenbusState::Closing.as_str())
                .await;
        }
        out.push(r);
    }
    forward.abort();
    if let Some(l) = live {
        l.remove(be);
    }
    Ok(out)
}
