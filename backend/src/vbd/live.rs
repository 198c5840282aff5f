//! The registry of what is being served, shared by the data plane and what
//! an operator reads: every vbd's rings' counters (each queue updates its
//! own slot) and each vbd's I/O limiter (the lifecycle sets it, the queues
//! obey it). `status` and `metrics` read it; the status socket is
//! [`crate::status`]'s.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::queue::QueueStats;

/// One vbd's rings as the daemon reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingCounters {
    /// The I/O engine.
    pub engine: String,
    /// Each ring's counters.
    pub rings: Vec<QueueStats>,
    /// When this daemon connected the rings (seconds since the epoch).
    #[serde(default)]
    pub connected_at: u64,
    /// Whether they were adopted from a previous daemon (left Connected by
    /// it) rather than negotiated by this one.
    #[serde(default)]
    pub adopted: bool,
    /// The I/O limits in force.
    #[serde(default)]
    pub limit: crate::vbd::limit::IoLimit,
    /// An `rbd:` disk's image and client, as librbd sees them now.
    #[serde(default)]
    pub rbd: Option<RbdState>,
}

/// A served RBD image, as the daemon's librbd client sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RbdState {
    /// `POOL/IMAGE[@SNAP]`.
    pub image: String,
    /// Its id.
    pub id: String,
    /// The client serving it: `client.NAME`.
    pub client: String,
    /// The client's instance id (librbd names a lock owner by both).
    pub instance: u64,
    /// Whether this client holds the image's exclusive lock (a writable
    /// image is served only while it does).
    pub lock_held: bool,
    /// The lock's owner as librbd names it (this client's address), as
    /// recorded in `rbd-lock-owner`.
    pub lock_owner: Option<String>,
    /// Opened read-only (a snapshot, or mode `r`): no lock is taken.
    pub read_only: bool,
}

impl RbdState {
    fn of(image: &crate::rbd::Image) -> RbdState {
        let (client, instance) = image.client();
        RbdState {
            image: image.spec.to_string(),
            id: image.id.clone(),
            client,
            instance,
            lock_held: !image.read_only && image.holds_lock(),
            lock_owner: image.owner(),
            read_only: image.read_only,
        }
    }
}

#[derive(Debug, Default)]
struct LiveVbd {
    rbd: Option<Arc<crate::rbd::Image>>,
    engine: String,
    rings: Vec<Arc<Mutex<QueueStats>>>,
    connected_at: u64,
    adopted: bool,
}

#[derive(Debug, Default)]
struct LiveInner {
    vbds: BTreeMap<String, LiveVbd>,
    /// Each vbd's I/O limits in force, shared by its queues.
    limiters: BTreeMap<String, Arc<crate::vbd::limit::Limiter>>,
    /// Backend paths being adopted: their next registration says so.
    adopting: std::collections::BTreeSet<String>,
}

/// The counters of every ring being served, by backend path; shared by the
/// queues (each updates its own after every pass) and the status socket.
#[derive(Clone, Debug, Default)]
pub struct Live(Arc<Mutex<LiveInner>>);

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Live {
    fn lock(&self) -> std::sync::MutexGuard<'_, LiveInner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The vbd at `be` is being adopted from a previous daemon: its next
    /// [`Live::register`] is marked so.
    pub fn note_adopted(&self, be: &str) {
        self.lock().adopting.insert(be.to_owned());
    }

    /// Registers `rings` rings of the vbd at `be` (serving `rbd`, if its
    /// disk is an RBD image); returns their slots.
    pub fn register(
        &self,
        be: &str,
        engine: &str,
        rings: usize,
        rbd: Option<Arc<crate::rbd::Image>>,
    ) -> Vec<Arc<Mutex<QueueStats>>> {
        let slots: Vec<_> = (0..rings).map(|_| Arc::default()).collect();
        let mut l = self.lock();
        let adopted = l.adopting.remove(be);
        l.vbds.insert(
            be.to_owned(),
            LiveVbd {
                rbd,
                engine: engine.to_owned(),
                rings: slots.clone(),
                connected_at: now_secs(),
                adopted,
            },
        );
        slots
    }

    /// Forgets the vbd at `be` (its rings stopped).
    pub fn remove(&self, be: &str) {
        let mut l = self.lock();
        l.vbds.remove(be);
        l.adopting.remove(be);
        l.limiters.remove(be);
    }

    /// The I/O limiter of the vbd at `be` (made, with no limit, if it has
    /// none yet): the lifecycle sets its limits, the queues obey them.
    pub fn limiter(&self, be: &str) -> Arc<crate::vbd::limit::Limiter> {
        self.lock()
            .limiters
            .entry(be.to_owned())
            .or_default()
            .clone()
    }

    /// Every vbd's counters now.
    pub fn snapshot(&self) -> BTreeMap<String, RingCounters> {
        let l = self.lock();
        l.vbds
            .iter()
            .map(|(be, v)| {
                let rings = v
                    .rings
                    .iter()
                    .map(|r| r.lock().unwrap_or_else(|e| e.into_inner()).clone())
                    .collect();
                (
                    be.clone(),
                    RingCounters {
                        engine: v.engine.clone(),
                        rings,
                        connected_at: v.connected_at,
                        adopted: v.adopted,
                        limit: l.limiters.get(be).map(|x| x.limit()).unwrap_or_default(),
                        rbd: v.rbd.as_deref().map(RbdState::of),
                    },
                )
            })
            .collect()
    }
}
