//! `blkbackd status`: every vbd in Xenstore, its state, its disk and what its
//! frontend negotiated, with the per-ring counters the running daemon
//! reports on its status socket, as a table or JSON.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xenstore::{Client, Xs};

use crate::abi::sys::XenbusState;
use crate::vbd::queue::QueueStats;
use crate::xenbus::VBD_ROOT;

/// Where the daemon on real Xen answers status queries.
pub const SOCKET: &str = "/run/blkbackd/status.sock";
/// Its name inside an embedded default's directory.
pub const SIM_SOCKET: &str = "blkbackd-status.sock";

pub use crate::vbd::live::{Live, RingCounters};

impl Live {
    /// Answers every connection to `path` (root only: the socket is made
    /// 0600). The client sends one line: `status` (or nothing) gets the
    /// snapshot as JSON; `stop handover` or `stop close` stops the daemon
    /// through `control` that way and gets `ok`. Runs until the listener fails.
    pub async fn serve(
        self,
        path: PathBuf,
        control: Option<tokio::sync::watch::Sender<crate::vbd::lifecycle::Stop>>,
    ) -> std::io::Result<()> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        loop {
            let (mut conn, _) = listener.accept().await?;
            let (live, control) = (self.clone(), control.clone());
            tokio::spawn(async move {
                let body = match read_request(&mut conn).await.as_deref() {
                    Some("stop handover" | "stop close") if control.is_none() => {
                        b"error: this daemon takes no stop requests".to_vec()
                    }
                    Some(r @ ("stop handover" | "stop close")) => {
                        let how = if r == "stop close" {
                            crate::vbd::lifecycle::Stop::Close
                        } else {
                            crate::vbd::lifecycle::Stop::Handover
                        };
                        tracing::info!("stop requested on the status socket: {how:?}");
                        if let Some(c) = control {
                            let _ = c.send(how);
                        }
                        b"ok".to_vec()
                    }
                    Some("status") | None => {
                        serde_json::to_vec(&live.snapshot()).unwrap_or_default()
                    }
                    Some(_) => b"error: unknown request".to_vec(),
                };
                let _ = conn.write_all(&body).await;
                let _ = conn.shutdown().await;
            });
        }
    }
}

/// One request line (at most 64 bytes, within a second); `None` when the
/// client sends nothing (an older `blkbackd status`).
async fn read_request(conn: &mut tokio::net::UnixStream) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while line.len() < 64 {
            match conn.read(&mut byte).await {
                Ok(1) if byte[0] != b'\n' => line.push(byte[0]),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), read).await;
    let s = String::from_utf8_lossy(&line).trim().to_owned();
    (!s.is_empty()).then_some(s)
}

/// Asks the daemon on `path` to stop: handing its devices over, or closing
/// them (`close`). Returns its answer.
pub async fn request_stop(path: &Path, close: bool) -> std::io::Result<String> {
    let mut c = tokio::net::UnixStream::connect(path).await?;
    let req = if close {
        "stop close\n"
    } else {
        "stop handover\n"
    };
    c.write_all(req.as_bytes()).await?;
    let mut body = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        c.take(4096).read_to_end(&mut body),
    )
    .await
    .map_err(|_| std::io::Error::other("the daemon did not answer within 5 s"))??;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The daemon's counters from its status socket, if it answers.
pub async fn fetch(path: &Path) -> Option<BTreeMap<String, RingCounters>> {
    let mut c = tokio::net::UnixStream::connect(path).await.ok()?;
    c.write_all(b"status\n").await.ok()?;
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
        let be = v.backend_path();
        if let Some(c) = live.get(&be) {
            v.engine = Some(c.engine.clone());
            v.rings = c.rings.clone();
            v.connected_at = Some(c.connected_at);
            v.adopted = c.adopted;
            v.limit = Some(c.limit);
            v.rbd = c.rbd.clone();
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
    /// When the running daemon connected (or adopted) the rings, seconds
    /// since the epoch.
    pub connected_at: Option<u64>,
    /// Whether the running daemon adopted the rings from a previous one
    /// (a restart or an upgrade) instead of negotiating them.
    pub adopted: bool,
    /// For a `thin:` disk, its pool's name and health (read from
    /// device-mapper when the status is collected).
    pub thin_pool: Option<ThinPool>,
    /// The I/O limits in force (from the daemon, while connected).
    pub limit: Option<crate::vbd::limit::IoLimit>,
    /// The RBD image the block script published (`POOL/IMAGE[@SNAP]`).
    pub rbd_image: Option<String>,
    /// Its id.
    pub rbd_image_id: Option<String>,
    /// The image, its client and its lock (from the daemon, while connected).
    pub rbd: Option<crate::vbd::live::RbdState>,
}

impl VbdStatus {
    /// Its backend directory.
    pub fn backend_path(&self) -> String {
        format!("{VBD_ROOT}/{}/{}", self.domid, self.devid)
    }
}

/// A thin-backed vbd's pool: its name and health.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ThinPool {
    /// The pool's dm name.
    pub pool: String,
    /// Its status.
    #[serde(flatten)]
    pub status: crate::disk::dm::pool::PoolStatus,
}

/// The pool a `thin:POOL/ID:SIZE` disk lives in, and its status now.
fn thin_pool_of(ctl: Option<&crate::disk::dm::Control>, params: Option<&str>) -> Option<ThinPool> {
    let pool = params?.strip_prefix("thin:")?.split_once('/')?.0;
    let status = crate::disk::dm::pool::status_of(ctl?, pool).ok()??;
    Some(ThinPool {
        pool: pool.to_owned(),
        status,
    })
}

fn state_name(v: Option<&str>) -> String {
    match v.and_then(XenbusState::parse) {
        Some(s) => format!("{s:?}"),
        None => v.map_or_else(|| "-".to_owned(), |v| format!("invalid ({v})")),
    }
}

async fn get(xs: &Client, p: &str) -> Result<Option<String>, xenstore::Error> {
    xs.try_read_text(p).await
}

/// Reads the status of every vbd below [`VBD_ROOT`].
pub async fn collect(xs: &Client) -> Result<Vec<VbdStatus>, xenstore::Error> {
    let mut out = Vec::new();
    // Thin pools are read through device-mapper (root; absent without dm).
    let dm = crate::disk::dm::Control::open().ok();
    for (domid, devid) in crate::xenbus::scan(xs).await? {
        let be = crate::xenbus::backend_path(domid, devid);
        let (domid, devid) = (domid.0.to_string(), devid.to_string());
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
        let params = get(xs, &format!("{be}/params")).await?;
        out.push(VbdStatus {
            state: state_name(get(xs, &format!("{be}/state")).await?.as_deref()),
            frontend_state: state_name(fget("state").await?.as_deref()),
            thin_pool: thin_pool_of(dm.as_ref(), params.as_deref()),
            params,
            mode: get(xs, &format!("{be}/mode")).await?,
            physical_device: get(xs, &format!("{be}/physical-device")).await?,
            diskseq: get(xs, &format!("{be}/diskseq")).await?,
            rbd_image: get(xs, &format!("{be}/rbd-image")).await?,
            rbd_image_id: get(xs, &format!("{be}/rbd-image-id")).await?,
            rbd: None,
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
            connected_at: None,
            adopted: false,
            limit: None,
        });
    }
    Ok(out)
}

/// The vbd's latency in the backend per operation, all rings together:
/// p50/p99/p99.9 as the bounds of the histogram buckets that hold them.
fn latency_line(rings: &[QueueStats]) -> Option<String> {
    use crate::vbd::queue::{Latencies, OpKind};
    let mut all = Latencies::default();
    for r in rings {
        all.merge(&r.latency);
    }
    let parts: Vec<String> = OpKind::ALL
        .iter()
        .filter_map(|op| {
            let h = all.get(*op);
            let q = |x| h.quantile_us(x);
            Some(format!(
                "{} {}/{}/{} ({})",
                op.name(),
                q(0.5)?,
                q(0.99)?,
                q(0.999)?,
                h.count()
            ))
        })
        .collect();
    (!parts.is_empty()).then(|| {
        format!(
            "       in the backend, µs below p50/p99/p99.9 (requests): {}\n",
            parts.join(", ")
        )
    })
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
        if let Some(r) = &v.rbd {
            s += &format!(
                "       RBD image {} (id {}), {} instance {}, {}\n",
                r.image,
                r.id,
                r.client,
                r.instance,
                if r.read_only {
                    "read-only (no lock)".to_owned()
                } else if r.lock_held {
                    format!(
                        "exclusive lock held (owner {})",
                        r.lock_owner.as_deref().unwrap_or("-")
                    )
                } else {
                    "exclusive lock not held".to_owned()
                }
            );
        } else if let Some(i) = &v.rbd_image {
            s += &format!(
                "       RBD image {i} (id {}), not open in the daemon\n",
                v.rbd_image_id.as_deref().unwrap_or("-")
            );
        }
        if let Some(t) = &v.thin_pool {
            s += &format!("       thin pool {}: {}\n", t.pool, t.status.summary());
        }
        if let Some(t) = v.connected_at {
            let ago = crate::vbd::live::now_secs().saturating_sub(t);
            s += &format!(
                "       {} {ago} s ago (at {t}, seconds since the epoch)\n",
                if v.adopted {
                    "adopted from the previous daemon"
                } else {
                    "connected by this daemon"
                }
            );
        }
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
        if let Some(l) = latency_line(&v.rings) {
            s += &l;
        }
        if let Some(l) = v.limit.filter(|l| !l.is_none()) {
            let waits: u64 = v.rings.iter().map(|r| r.throttled).sum();
            s += &format!("       I/O limit {l} ({waits} waits for it)\n");
        }
    }
    s
}
