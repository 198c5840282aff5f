//! `blkbackd status`: every vbd in Xenstore, its state, its disk and what its
//! frontend negotiated, with the per-ring counters the running daemon
//! reports on its status socket, as a table or JSON.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xenstore::{Client, Xs};

use crate::abi::sys::XenbusState;
use crate::daemon::VBD_ROOT;
use crate::vbd::queue::QueueStats;

/// Where the daemon on real Xen answers status queries.
pub const SOCKET: &str = "/run/blkbackd/status.sock";
/// Its name inside an embedded default's directory.
pub const SIM_SOCKET: &str = "blkbackd-status.sock";

/// One vbd's rings as the daemon reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingCounters {
    /// The I/O engine.
    pub engine: String,
    /// Each ring's counters.
    pub rings: Vec<QueueStats>,
}

#[derive(Debug, Default)]
struct LiveVbd {
    engine: String,
    rings: Vec<Arc<Mutex<QueueStats>>>,
}

/// The counters of every ring being served, by backend path; shared by the
/// queues (each updates its own after every pass) and the status socket.
#[derive(Clone, Debug, Default)]
pub struct Live(Arc<Mutex<BTreeMap<String, LiveVbd>>>);

impl Live {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, LiveVbd>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `rings` rings of the vbd at `be`; returns their slots.
    pub fn register(&self, be: &str, engine: &str, rings: usize) -> Vec<Arc<Mutex<QueueStats>>> {
        let slots: Vec<_> = (0..rings).map(|_| Arc::default()).collect();
        self.lock().insert(
            be.to_owned(),
            LiveVbd {
                engine: engine.to_owned(),
                rings: slots.clone(),
            },
        );
        slots
    }

    /// Forgets the vbd at `be` (its rings stopped).
    pub fn remove(&self, be: &str) {
        self.lock().remove(be);
    }

    /// Every vbd's counters now.
    pub fn snapshot(&self) -> BTreeMap<String, RingCounters> {
        self.lock()
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
                    },
                )
            })
            .collect()
    }

    /// Answers every connection to `path` with the snapshot as JSON (root
    /// only: the socket is made 0600). Runs until the listener fails.
    pub async fn serve(self, path: PathBuf) -> std::io::Result<()> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        loop {
            let (mut conn, _) = listener.accept().await?;
            let body = serde_json::to_vec(&self.snapshot()).unwrap_or_default();
            tokio::spawn(async move {
                let _ = conn.write_all(&body).await;
                let _ = conn.shutdown().await;
            });
        }
    }
}

/// The daemon's counters from its status socket, if it answers.
pub async fn fetch(path: &Path) -> Option<BTreeMap<String, RingCounters>> {
    let c = tokio::net::UnixStream::connect(path).await.ok()?;
    let mut body = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        c.take(64 << 20).read_to_end(&mut body),
    )
    .await
    .ok()?
    .ok()?;
    serde_json::from_slice(&body).ok()
}

/// Adds the daemon's per-ring counters to what Xenstore said.
pub fn merge(vbds: &mut [VbdStatus], live: &BTreeMap<String, RingCounters>) {
    for v in vbds {
        let be = format!("{VBD_ROOT}/{}/{}", v.domid, v.devid);
        if let Some(c) = live.get(&be) {
            v.engine = Some(c.engine.clone());
            v.rings = c.rings.clone();
        }
    }
}

/// One vbd as Xenstore shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VbdStatus {
    /// Guest domain.
    pub domid: String,
    /// Device number.
    pub devid: String,
    /// Backend state, by name.
    pub state: String,
    /// Frontend state, by name.
    pub frontend_state: String,
    /// What the toolstack asked to serve.
    pub params: Option<String>,
    /// `r` or `w`.
    pub mode: Option<String>,
    /// The disk the block script published (hex major:minor).
    pub physical_device: Option<String>,
    /// Its diskseq (hex).
    pub diskseq: Option<String>,
    /// Whether the daemon opened and verified it.
    pub opened: bool,
    /// Size in 512-byte sectors.
    pub sectors: Option<u64>,
    /// The block script's status.
    pub hotplug_status: Option<String>,
    /// Why the device failed, if it did.
    pub error: Option<String>,
    /// Negotiated ring-page-order.
    pub ring_page_order: u32,
    /// Negotiated queues.
    pub queues: u32,
    /// Request layout.
    pub protocol: Option<String>,
    /// Persistent grants in use.
    pub persistent: bool,
    /// The I/O engine (from the daemon, while connected).
    pub engine: Option<String>,
    /// Per-ring counters (from the daemon, while connected).
    pub rings: Vec<QueueStats>,
}

fn state_name(v: Option<&str>) -> String {
    match v.and_then(XenbusState::parse) {
        Some(s) => format!("{s:?}"),
        None => v.map_or_else(|| "-".to_owned(), |v| format!("invalid ({v})")),
    }
}

async fn get(xs: &Client, p: &str) -> Result<Option<String>, xenstore::Error> {
    Ok(xs
        .try_read(p)
        .await?
        .map(|v| String::from_utf8_lossy(&v).into_owned()))
}

/// Reads the status of every vbd below [`VBD_ROOT`].
pub async fn collect(xs: &Client) -> Result<Vec<VbdStatus>, xenstore::Error> {
    let mut out = Vec::new();
    let domids = match xs.directory(VBD_ROOT).await {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(out),
        Err(e) => return Err(e),
    };
    for domid in domids {
        let devids = xs
            .directory(&format!("{VBD_ROOT}/{domid}"))
            .await
            .unwrap_or_default();
        for devid in devids {
            let be = format!("{VBD_ROOT}/{domid}/{devid}");
            let fe = get(xs, &format!("{be}/frontend")).await?;
            let fget = |k: &'static str| {
                let fe = fe.clone();
                async move {
                    match fe {
                        Some(fe) => get(xs, &format!("{fe}/{k}")).await,
                        None => Ok(None),
                    }
                }
            };
            let num = |v: Option<String>| v.and_then(|s| s.parse::<u32>().ok());
            out.push(VbdStatus {
                state: state_name(get(xs, &format!("{be}/state")).await?.as_deref()),
                frontend_state: state_name(fget("state").await?.as_deref()),
                params: get(xs, &format!("{be}/params")).await?,
                mode: get(xs, &format!("{be}/mode")).await?,
                physical_device: get(xs, &format!("{be}/physical-device")).await?,
                diskseq: get(xs, &format!("{be}/diskseq")).await?,
                opened: get(xs, &format!("{be}/opened")).await?.as_deref() == Some("1"),
                sectors: get(xs, &format!("{be}/sectors"))
                    .await?
                    .and_then(|s| s.parse().ok()),
                hotplug_status: get(xs, &format!("{be}/hotplug-status")).await?,
                error: get(xs, &format!("{be}/error")).await?,
                ring_page_order: num(fget("ring-page-order").await?).unwrap_or(0),
                queues: num(fget("multi-queue-num-queues").await?).unwrap_or(1),
                protocol: fget("protocol").await?,
                persistent: fget("feature-persistent").await?.as_deref() == Some("1"),
                domid: domid.clone(),
                devid,
                engine: None,
                rings: Vec::new(),
            });
        }
    }
    Ok(out)
}

/// A human-readable table.
pub fn table(vbds: &[VbdStatus]) -> String {
    let mut s = format!(
        "{:<6} {:<7} {:<12} {:<12} {:<10} {:<8} {:>10} {:<5} {:<6} {}\n",
        "domid",
        "devid",
        "state",
        "frontend",
        "disk",
        "diskseq",
        "sectors",
        "order",
        "queues",
        "params"
    );
    for v in vbds {
        s += &format!(
            "{:<6} {:<7} {:<12} {:<12} {:<10} {:<8} {:>10} {:<5} {:<6} {}{}\n",
            v.domid,
            v.devid,
            v.state,
            v.frontend_state,
            v.physical_device.as_deref().unwrap_or("-"),
            v.diskseq.as_deref().unwrap_or("-"),
            v.sectors.map_or_else(|| "-".to_owned(), |n| n.to_string()),
            v.ring_page_order,
            v.queues,
            v.params.as_deref().unwrap_or("-"),
            v.error
                .as_ref()
                .map_or_else(String::new, |e| format!("  [error: {e}]")),
        );
        for (i, r) in v.rings.iter().enumerate() {
            s += &format!(
                "       ring {i}: {} ok, {} errors (reads {}, writes {}, flushes {}, discards {}), \
                 {} bytes, {} kicks in, {} notifications out, {} persistent hits, peak {} in flight{}\n",
                r.ok,
                r.errors,
                r.reads,
                r.writes,
                r.flushes,
                r.discards,
                r.bytes,
                r.kicks,
                r.notifications,
                r.persistent_hits,
                r.in_flight_peak,
                if i == 0 {
                    v.engine
                        .as_ref()
                        .map_or_else(String::new, |e| format!(", engine {e}"))
                } else {
                    String::new()
                },
            );
        }
    }
    s
}
