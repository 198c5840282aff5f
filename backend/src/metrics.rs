//! The Prometheus endpoint (`[metrics] listen`, off by default): every ring's
//! counters, each vbd's latency histograms per operation, its state and disk
//! identity, and daemon-wide gauges, in the Prometheus text format (0.0.4,
//! encoded by the `prometheus` crate), gathered when scraped.
//!
//! Per-ring and per-vbd series carry `domid` and `devid`; the vbd's state and
//! disk identity are the labels of `blkbackd_vbd_info` (join on those two, as
//! with any `_info` metric), so a state change does not start every counter
//! over as a new series.
//!
//! The HTTP side is the least a scraper needs: `GET /metrics` on TCP or a
//! unix socket; a request is read within 2 s and 8 KiB, at most 8
//! connections are served at once, the rest answered 503 at once.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use xenstore::{Client, Xs};

use crate::config::Listen;
use crate::status::{Live, RingCounters, VbdStatus};
use crate::vbd::queue::{Latencies, LatencyHistogram, OpKind, QueueStats};
use crate::xenbus::VBD_ROOT;

/// Connections served at once; more are closed unanswered.
const MAX_CONNECTIONS: usize = 8;
/// A request's header must arrive within this time and size.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const REQUEST_MAX: usize = 8192;
/// The answer past [`MAX_CONNECTIONS`].
const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// The metric families being built, by name, in the order first used.
#[derive(Default)]
struct Families {
    order: Vec<String>,
    by_name: BTreeMap<String, MetricFamily>,
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name((*k).to_owned());
            l.set_value((*v).to_owned());
            l
        })
        .collect()
}

impl Families {
    fn push(&mut self, name: &str, help: &str, kind: MetricType, m: Metric) {
        let f = self.by_name.entry(name.to_owned()).or_insert_with(|| {
            self.order.push(name.to_owned());
            let mut f = MetricFamily::default();
            f.set_name(name.to_owned());
            f.set_help(help.to_owned());
            f.set_field_type(kind);
            f
        });
        f.mut_metric().push(m);
    }

    fn gauge(&mut self, name: &str, help: &str, l: &[(&str, &str)], v: f64) {
        let mut g = Gauge::default();
        g.set_value(v);
        let mut m = Metric::default();
        m.set_label(labels(l));
        m.set_gauge(g);
        self.push(name, help, MetricType::GAUGE, m);
    }

    fn counter(&mut self, name: &str, help: &str, l: &[(&str, &str)], v: f64) {
        let mut c = Counter::default();
        c.set_value(v);
        let mut m = Metric::default();
        m.set_label(labels(l));
        m.set_counter(c);
        self.push(name, help, MetricType::COUNTER, m);
    }

    /// A histogram with buckets at every power of two of microseconds (the
    /// octave bounds of [`LatencyHistogram`], where its counts are exact).
    fn histogram(&mut self, name: &str, help: &str, l: &[(&str, &str)], h: &LatencyHistogram) {
        let mut buckets = Vec::new();
        let mut us = 1u64;
        while let Some(n) = h.count_below_us(us) {
            let mut b = Bucket::default();
            b.set_upper_bound(us as f64 / 1e6);
            b.set_cumulative_count(n);
            buckets.push(b);
            us *= 2;
        }
        let mut p = Histogram::default();
        p.set_sample_count(h.count());
        p.set_sample_sum(h.sum_ns as f64 / 1e9);
        p.set_bucket(buckets);
        let mut m = Metric::default();
        m.set_label(labels(l));
        m.set_histogram(p);
        self.push(name, help, MetricType::HISTOGRAM, m);
    }

    fn into_vec(mut self) -> Vec<MetricFamily> {
        self.order
            .iter()
            .filter_map(|n| self.by_name.remove(n))
            .collect()
    }
}

/// Every ring counter: name (without `blkbackd_ring_`), help, value.
fn ring_counters(q: &QueueStats) -> [(&'static str, &'static str, f64); 15] {
    [
        (
            "bytes_total",
            "Bytes moved to or from the guest.",
            q.bytes as f64,
        ),
        (
            "kicks_total",
            "Notifications received from the frontend.",
            q.kicks as f64,
        ),
        (
            "notifications_total",
            "Notifications sent to the frontend.",
            q.notifications as f64,
        ),
        (
            "spurious_kicks_total",
            "Notifications that brought no new request.",
            q.spurious_kicks as f64,
        ),
        (
            "persistent_maps_total",
            "Grants mapped and kept (persistent grants).",
            q.persistent_maps as f64,
        ),
        (
            "persistent_hits_total",
            "Segments served through a kept mapping instead of a grant copy.",
            q.persistent_hits as f64,
        ),
        (
            "persistent_over_budget_total",
            "Grants copied because the daemon-wide budget of kept mappings was spent.",
            q.persistent_over_budget as f64,
        ),
        (
            "mapped_segments_total",
            "Segments served through a per-request mapping (map mode).",
            q.mapped_segments as f64,
        ),
        (
            "zero_copy_requests_total",
            "Requests whose disk I/O ran on the guest's pages, with no copy.",
            q.zero_copy as f64,
        ),
        (
            "buffer_waits_total",
            "Times a request waited for bounce buffers.",
            q.buffer_waits as f64,
        ),
        (
            "poll_hits_total",
            "Polling windows that found more work.",
            q.poll_hits as f64,
        ),
        (
            "sleep_submits_total",
            "Passes whose disk I/O was submitted by the sleep that followed (one system call to submit and wait).",
            q.sleep_submits as f64,
        ),
        (
            "poll_seconds_total",
            "Time spent polling the ring.",
            q.poll_ns as f64 / 1e9,
        ),
        (
            "throttled_total",
            "Times a request waited for the vbd's I/O limits.",
            q.throttled as f64,
        ),
        (
            "share_waits_total",
            "Times requests waited for the vbd's fair share of the host's requests in flight.",
            q.share_waits as f64,
        ),
    ]
}

/// The metrics of one gathering: what Xenstore says of every vbd, the
/// running rings' counters and the daemon-wide gauges.
pub fn families(
    vbds: &[VbdStatus],
    live: &BTreeMap<String, RingCounters>,
    xenstore_rtt: Option<Duration>,
) -> Vec<MetricFamily> {
    let mut f = Families::default();
    f.gauge(
        "blkbackd_build_info",
        "The running daemon's version and build.",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("commit", crate::BUILD_COMMIT),
        ],
        1.0,
    );
    f.gauge(
        "blkbackd_vbds",
        "Vbds below backend/vbd in Xenstore.",
        &[],
        vbds.len() as f64,
    );
    f.gauge(
        "blkbackd_vbds_served",
        "Vbds whose rings this daemon serves.",
        &[],
        live.len() as f64,
    );
    let budget = &crate::vbd::queue::MAP_BUDGET;
    f.gauge(
        "blkbackd_persistent_mappings",
        "Persistent-grant mappings of guest pages kept now, daemon-wide.",
        &[],
        budget.used() as f64,
    );
    f.gauge(
        "blkbackd_persistent_mappings_limit",
        "The daemon-wide budget of kept mappings (past it, grants are copied).",
        &[],
        budget.limit() as f64,
    );
    f.gauge(
        "blkbackd_bounce_pool_bytes",
        "Bytes reserved by the connected rings' bounce pools.",
        &[],
        crate::io::pool::reserved_bytes() as f64,
    );
    if let Some(rtt) = xenstore_rtt {
        f.gauge(
            "blkbackd_xenstore_roundtrip_seconds",
            "How long one Xenstore read took while gathering these metrics.",
            &[],
            rtt.as_secs_f64(),
        );
    }
    for v in vbds {
        let id = [("domid", v.domid.as_str()), ("devid", v.devid.as_str())];
        let be = v.backend_path();
        let counters = live.get(&be);
        let sectors = v.sectors.map(|s| s.to_string()).unwrap_or_default();
        let engine = counters.map(|c| c.engine.as_str()).unwrap_or("");
        f.gauge(
            "blkbackd_vbd_info",
            "A vbd: its xenbus states, what it serves and the disk's identity \
             (major:minor and diskseq, as published).",
            &[
                id[0],
                id[1],
                ("state", &v.state),
                ("frontend_state", &v.frontend_state),
                ("params", v.params.as_deref().unwrap_or("")),
                ("mode", v.mode.as_deref().unwrap_or("")),
                (
                    "physical_device",
                    v.physical_device.as_deref().unwrap_or(""),
                ),
                ("diskseq", v.diskseq.as_deref().unwrap_or("")),
                ("opened", if v.opened { "1" } else { "0" }),
                ("engine", engine),
                (
                    "adopted",
                    if counters.is_some_and(|c| c.adopted) {
                        "1"
                    } else {
                        "0"
                    },
                ),
                ("error", v.error.as_deref().unwrap_or("")),
            ],
            1.0,
        );
        if !sectors.is_empty() {
            f.gauge(
                "blkbackd_vbd_size_bytes",
                "The disk's size as published to the frontend.",
                &id,
                v.sectors.unwrap_or(0) as f64 * 512.0,
            );
        }
        let Some(c) = counters else { continue };
        f.gauge(
            "blkbackd_vbd_connected_time_seconds",
            "When this daemon connected or adopted the rings (seconds since the epoch).",
            &id,
            c.connected_at as f64,
        );
        for (what, help, v) in [
            (
                "iops",
                "The vbd's I/O limit in requests per second (0: none).",
                c.limit.iops,
            ),
            (
                "bytes_per_second",
                "The vbd's I/O limit in bytes per second (0: none).",
                c.limit.bps,
            ),
        ] {
            f.gauge(&format!("blkbackd_vbd_limit_{what}"), help, &id, v as f64);
        }
        let mut lat = Latencies::default();
        for (i, q) in c.rings.iter().enumerate() {
            lat.merge(&q.latency);
            let ring = i.to_string();
            let rl = [id[0], id[1], ("ring", ring.as_str())];
            for (op, n) in [
                ("read", q.reads),
                ("write", q.writes),
                ("flush", q.flushes),
                ("discard", q.discards),
            ] {
                f.counter(
                    "blkbackd_ring_requests_total",
                    "Requests answered, by operation.",
                    &[rl[0], rl[1], rl[2], ("op", op)],
                    n as f64,
                );
            }
            for (status, n) in [("ok", q.ok), ("error", q.errors)] {
                f.counter(
                    "blkbackd_ring_responses_total",
                    "Answers published, by status.",
                    &[rl[0], rl[1], rl[2], ("status", status)],
                    n as f64,
                );
            }
            for (name, help, v) in ring_counters(q) {
                f.counter(&format!("blkbackd_ring_{name}"), help, &rl, v);
            }
            f.gauge(
                "blkbackd_ring_in_flight_peak",
                "Most requests in flight at once.",
                &rl,
                q.in_flight_peak as f64,
            );
            f.gauge(
                "blkbackd_ring_pool_peak_bytes",
                "Most bounce-pool bytes in use at once.",
                &rl,
                q.pool_peak_bytes as f64,
            );
        }
        for op in OpKind::ALL {
            f.histogram(
                "blkbackd_request_duration_seconds",
                "Time a request spent in the backend, taken off the ring to answered, \
                 all the vbd's rings together.",
                &[id[0], id[1], ("op", op.name())],
                lat.get(op),
            );
        }
    }
    f.into_vec()
}

/// Gathers and encodes the metrics now.
pub async fn render(xs: &Client, live: &Live) -> String {
    // One read timed on its own: the round trip every vbd operation pays.
    let t0 = Instant::now();
    let rtt = xs.try_read(VBD_ROOT).await.ok().map(|_| t0.elapsed());
    let vbds = match crate::status::collect(xs).await {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!("metrics: reading the vbds from Xenstore failed: {e}");
            Vec::new()
        }
    };
    let fams = families(&vbds, &live.snapshot(), rtt);
    let mut out = String::new();
    if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&fams, &mut out) {
        tracing::warn!("metrics: encoding failed: {e}");
    }
    out
}

/// A bound metrics endpoint, not yet answering.
#[derive(Debug)]
pub enum Endpoint {
    /// On TCP.
    Tcp(tokio::net::TcpListener),
    /// On a unix socket.
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

impl Endpoint {
    /// Binds `listen` (a unix socket is made 0600, its directory created).
    /// Fails, naming the address, when it cannot: a mistyped or taken
    /// address stops the daemon from starting rather than going unnoticed.
    pub async fn bind(listen: &Listen) -> anyhow::Result<Endpoint> {
        use anyhow::Context;
        let ep = match listen {
            Listen::Tcp(addr) => Endpoint::Tcp(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("metrics.listen: cannot listen on {addr}"))?,
            ),
            Listen::Unix(path) => {
                let bind = || -> std::io::Result<tokio::net::UnixListener> {
                    if let Some(d) = path.parent() {
                        std::fs::create_dir_all(d)?;
                    }
                    let _ = std::fs::remove_file(path);
                    let l = tokio::net::UnixListener::bind(path)?;
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                    Ok(l)
                };
                Endpoint::Unix(
                    bind().with_context(|| {
                        format!("metrics.listen: cannot listen on unix:{}", path.display())
                    })?,
                    path.clone(),
                )
            }
        };
        Ok(ep)
    }

    /// Where it listens, for the log and for tests (`http://ADDR/metrics`
    /// or `unix:PATH`).
    pub fn url(&self) -> String {
        match self {
            Endpoint::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| format!("(tcp: {e})"), |a| format!("http://{a}/metrics")),
            Endpoint::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    /// Answers scrapes until the listener fails.
    pub async fn serve(self, xs: Client, live: Live) -> std::io::Result<()> {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let xs = Arc::new(xs);
        tracing::info!("metrics at {}", self.url());
        macro_rules! accept_loop {
            ($listener:expr) => {
                loop {
                    let (conn, _) = $listener.accept().await?;
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        tracing::debug!(
                            "metrics: {MAX_CONNECTIONS} scrapes in progress, one refused"
                        );
                        // Told so without reading it (a non-blocking try:
                        // a full socket buffer loses only the reason).
                        let _ = conn.try_write(BUSY);
                        continue;
                    };
                    let (xs, live) = (xs.clone(), live.clone());
                    tokio::spawn(async move {
                        answer(conn, &xs, &live).await;
                        drop(permit);
                    });
                }
            };
        }
        match self {
            Endpoint::Tcp(l) => accept_loop!(l),
            Endpoint::Unix(l, _) => accept_loop!(l),
        }
    }
}

/// Reads one request's header (bounded in size and time) and answers it.
async fn answer<C: AsyncRead + AsyncWrite + Unpin>(mut conn: C, xs: &Client, live: &Live) {
    let mut head = Vec::new();
    let read = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < REQUEST_MAX {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        true
    };
    let complete = matches!(tokio::time::timeout(REQUEST_TIMEOUT, read).await, Ok(true))
        && head.windows(4).any(|w| w == b"\r\n\r\n");
    let line = String::from_utf8_lossy(&head);
    let mut words = line.lines().next().unwrap_or("").split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, body) = if !complete {
        (
            "400 Bad Request",
            "a request header within 8 KiB and 2 s\n".to_owned(),
        )
    } else if method != "GET" && method != "HEAD" {
        ("405 Method Not Allowed", "only GET\n".to_owned())
    } else if target != "/metrics" && !target.starts_with("/metrics?") {
        ("404 Not Found", "the metrics are at /metrics\n".to_owned())
    } else {
        ("200 OK", render(xs, live).await)
    };
    let kind = if status.starts_with("200") {
        prometheus::TEXT_FORMAT
    } else {
        "text/plain; charset=utf-8"
    };
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(header.as_bytes()).await;
    if method != "HEAD" {
        let _ = conn.write_all(body.as_bytes()).await;
    }
    let _ = conn.shutdown().await;
    // What the client sent past the header is read and dropped (64 KiB and
    // 1 s at most): closing with it unread would reset the connection and
    // could lose the answer.
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut left: usize = 64 << 10;
        while left > 0 {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}
