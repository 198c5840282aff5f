//! The daemon's configuration file (TOML). Every key is optional; unknown keys
//! and out-of-range values are refused with an error that names them.
//!
//! ```toml
//! # Xenstore socket or device (default: XENSTORED_PATH, /run/xenstored/socket,
//! # /dev/xen/xenbus).
//! xenstore = "/run/xenstored/socket"
//! # Serve a physical-device published without diskseq, by major:minor alone.
//! # Unsafe: a released and reused device number could be served.
//! allow_missing_diskseq = false
//! # What SIGTERM (systemctl stop/restart, an upgrade) does to the devices:
//! # "handover" (default) leaves them Connected for the next daemon, which
//! # adopts them (guests see a stall); "close" closes every device, and Linux
//! # blkfront does not come back from Closed.
//! on_stop = "handover"
//!
//! [offer]                       # what frontends are offered
//! max_ring_page_order = 4       # 0..=4: rings of up to 16 pages
//! max_queues = 4                # 1..=32
//! max_indirect_segments = 256   # 0 (none) or 12..=4096 (Linux blkback: 256)
//! persistent_grants = true
//!
//! [io]                          # how the rings' I/O is done
//! engine = "auto"               # "auto" (io_uring if the kernel allows it),
//!                               # "io-uring" or "blocking" (a thread per ring)
//! direct_io = true              # O_DIRECT for aligned requests where possible
//! grants = "copy"               # "copy" (grant copy) or "map" (map each
//!                               # request's grants, unmap after the I/O)
//! zero_copy = false             # true: disk I/O straight on mapped guest
//!                               # pages (kept persistent grants, map mode);
//!                               # false: through the bounce pool
//! pool_kib = 4096               # 64..=65536: each ring's bounce buffers (never
//!                               # less than one largest request); pinned
//!                               # while the ring is connected
//! poll_us = 0                   # 0..=1000: after a pass that found work, poll
//!                               # the ring this long (self-tuning, at most) before
//!                               # sleeping; 0 turns polling off
//! max_persistent_maps = 16382   # persistent-grant mappings kept daemon-wide
//!                               # (default: a quarter of vm.max_map_count);
//!                               # past it, grants are copied
//!
//! [rbd]                         # rbd:POOL/IMAGE disks (librbd); the block
//!                               # script reads this file too: $BLKBACKD_CONFIG,
//!                               # else /etc/blkbackd/blkbackd.toml
//! conf = "/etc/ceph/ceph.conf"  # default: $CEPH_CONF, then Ceph's search
//! client = "admin"              # client.NAME, its key found by ceph.conf
//! keyring = "/etc/ceph/ceph.client.admin.keyring"   # optional
//! connect_timeout_s = 10        # 1..=25: the monitors' answer
//! lock_wait_s = 45              # 0..=600: a connecting guest waits this long
//!                               # for another client to let go of the lock
//!
//! [metrics]                     # Prometheus text endpoint (off by default)
//! listen = "127.0.0.1:9587"     # ADDRESS:PORT (GET /metrics), or
//!                               # "unix:/run/blkbackd/metrics.sock"
//! ```
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::io::engine::EngineChoice;
use crate::vbd::Offer;

/// The configuration file's contents.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Xenstore endpoint.
    pub xenstore: Option<PathBuf>,
    /// Serve disks published without `diskseq`.
    #[serde(default)]
    pub allow_missing_diskseq: bool,
    /// What frontends are offered.
    #[serde(default)]
    pub offer: OfferConfig,
    /// How I/O is done.
    #[serde(default)]
    pub io: IoConfig,
    /// What SIGTERM does to the devices.
    #[serde(default)]
    pub on_stop: OnStop,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Per-guest I/O limits.
    #[serde(default)]
    pub limit: Vec<LimitRule>,
    /// How `rbd:` disks reach their Ceph cluster.
    #[serde(default)]
    pub rbd: crate::rbd::ClientConfig,
}

/// The configuration file when none is named on the command line (the
/// block script, run by libxl, never has one): `$BLKBACKD_CONFIG`, else this
/// file if it exists, else none (every default).
pub const DEFAULT_PATH: &str = "/etc/blkbackd/blkbackd.toml";

/// See [`DEFAULT_PATH`].
pub fn default_path() -> Option<PathBuf> {
    match std::env::var_os("BLKBACKD_CONFIG") {
        Some(p) => Some(PathBuf::from(p)),
        None => Some(PathBuf::from(DEFAULT_PATH)).filter(|p| p.exists()),
    }
}

/// The `[rbd]` settings the block script uses (see [`DEFAULT_PATH`]); Ceph's
/// defaults when there is no file.
pub fn rbd_settings() -> Result<crate::rbd::ClientConfig, ConfigError> {
    match default_path() {
        Some(path) => Ok(Config::load(&path)?.rbd),
        None => Ok(Default::default()),
    }
}

pub use crate::vbd::limit::LimitRule;

/// A rule's check, where the configuration is read.
trait LimitRuleCheck {
    fn check(&self, i: usize) -> Result<(), String>;
}

impl LimitRuleCheck for LimitRule {
    fn check(&self, i: usize) -> Result<(), String> {
        let at = format!("limit[{i}]");
        match (&self.domain, &self.uuid) {
            (Some(_), Some(_)) => {
                return Err(format!("{at}: domain and uuid both given: name one"))
            }
            (None, None) => {
                return Err(format!(
                    "{at}: names no guest (domain = \"NAME\" or uuid = \"UUID\")"
                ))
            }
            (None, Some(u)) if !is_uuid(u) => {
                return Err(format!("{at}: uuid = {u:?} is not a UUID"))
            }
            _ => {}
        }
        if self.limit.is_none() {
            return Err(format!("{at}: sets neither iops nor bps"));
        }
        self.limit.check().map_err(|e| format!("{at}: {e}"))
    }
}

/// A TOML error as one line: where (line and column, from its span) and
/// what, without the quoted snippet the parser draws over several lines.
fn one_line(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {what}")
        }
        None => what,
    }
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// The `[metrics]` table.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where to answer scrapes (`None`: no endpoint).
    pub listen: Option<Listen>,
}

/// Where the metrics endpoint listens.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Listen {
    /// A TCP address and port.
    Tcp(std::net::SocketAddr),
    /// A unix socket (`unix:/absolute/path`).
    Unix(PathBuf),
}

impl TryFrom<String> for Listen {
    type Error = String;

    fn try_from(s: String) -> Result<Listen, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            let p = Path::new(p);
            if !p.is_absolute() || p.file_name().is_none() {
                return Err(format!(
                    "metrics.listen = {s:?}: a unix socket needs an absolute path"
                ));
            }
            return Ok(Listen::Unix(p.to_owned()));
        }
        s.parse().map(Listen::Tcp).map_err(|_| {
            format!(
                "metrics.listen = {s:?} is neither ADDRESS:PORT (e.g. \"127.0.0.1:9587\", \
                 \"[::1]:9587\") nor \"unix:/absolute/path\""
            )
        })
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "http://{a}/metrics"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// What stopping the daemon does to the devices it serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnStop {
    /// Hand them over as they stand; the next daemon adopts them.
    #[default]
    Handover,
    /// Close every device (guests lose their disks).
    Close,
}

impl OnStop {
    /// The stop this asks the daemon for.
    pub fn stop(self) -> crate::vbd::lifecycle::Stop {
        match self {
            OnStop::Handover => crate::vbd::lifecycle::Stop::Handover,
            OnStop::Close => crate::vbd::lifecycle::Stop::Close,
        }
    }
}

/// The `[io]` table.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct IoConfig {
    /// The engine.
    pub engine: EngineChoice,
    /// `O_DIRECT` for aligned requests.
    pub direct_io: bool,
    /// How request data moves: grant copy or per-request mapping.
    pub grants: GrantMode,
    /// Each ring's bounce pool, in KiB.
    pub pool_kib: u32,
    /// Persistent-grant mappings kept daemon-wide (`None`: a quarter of
    /// `vm.max_map_count`).
    pub max_persistent_maps: Option<u32>,
    /// Adaptive polling's largest window in µs (0: off).
    pub poll_us: u32,
    /// Disk I/O on mapped guest pages, no copy.
    pub zero_copy: bool,
}

/// How a request's data leaves and reaches guest pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GrantMode {
    /// `GNTTABOP_copy` (the default: no mapping lives past its call).
    #[default]
    Copy,
    /// Map the request's grants, copy, unmap.
    Map,
}

impl Default for IoConfig {
    fn default() -> Self {
        let o = Offer::default();
        IoConfig {
            engine: o.engine,
            direct_io: o.direct_io,
            grants: GrantMode::Copy,
            pool_kib: (o.pool_bytes / 1024) as u32,
            max_persistent_maps: None,
            poll_us: o.poll_us,
            zero_copy: o.zero_copy,
        }
    }
}

/// The `[offer]` table.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct OfferConfig {
    /// `max-ring-page-order`.
    pub max_ring_page_order: u32,
    /// `multi-queue-max-queues`.
    pub max_queues: u32,
    /// `feature-max-indirect-segments`.
    pub max_indirect_segments: u32,
    /// `feature-persistent`.
    pub persistent_grants: bool,
}

impl Default for OfferConfig {
    fn default() -> Self {
        let o = Offer::default();
        OfferConfig {
            max_ring_page_order: o.max_ring_order,
            max_queues: o.max_queues,
            max_indirect_segments: u32::from(o.max_indirect_segments),
            persistent_grants: o.persistent_grants,
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not TOML, or a key we do not know, or a value of the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's explanation (names the key and the line).
        message: String,
    },
    /// A value outside its range.
    #[error("{path}: offer.{key} = {value} is outside {range}")]
    Range {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// Its value.
        value: u32,
        /// What is allowed.
        range: &'static str,
    },
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and checks configuration text (`path` names it in errors, one
    /// line each: `PATH: line L, column C: what is wrong`).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: one_line(text, &e),
        })?;
        c.offer()
            .map_err(|(key, value, range)| ConfigError::Range {
                path: path.to_owned(),
                key,
                value,
                range,
            })?;
        c.rbd.check().map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        for (i, r) in c.limit.iter().enumerate() {
            r.check(i).map_err(|message| ConfigError::Parse {
                path: path.to_owned(),
                message,
            })?;
        }
        Ok(c)
    }

    /// The offer, checked.
    pub fn offer(&self) -> Result<Offer, (&'static str, u32, &'static str)> {
        let o = &self.offer;
        use crate::vbd::{MAX_QUEUES, MAX_RING_ORDER};
        if o.max_ring_page_order > MAX_RING_ORDER {
            return Err(("max_ring_page_order", o.max_ring_page_order, "0..=4"));
        }
        if !(1..=MAX_QUEUES).contains(&o.max_queues) {
            return Err(("max_queues", o.max_queues, "1..=32"));
        }
        let ind = o.max_indirect_segments;
        if ind != 0 && !(12..=4096).contains(&ind) {
            return Err(("max_indirect_segments", ind, "0 or 12..=4096"));
        }
        if !(64..=65536).contains(&self.io.pool_kib) {
            return Err(("io.pool_kib", self.io.pool_kib, "64..=65536"));
        }
        if self.io.poll_us > 1000 {
            return Err(("io.poll_us", self.io.poll_us, "0..=1000"));
        }
        Ok(Offer {
            pool_bytes: self.io.pool_kib as usize * 1024,
            max_ring_order: o.max_ring_page_order,
            max_queues: o.max_queues,
            max_indirect_segments: ind as u16,
            persistent_grants: o.persistent_grants,
            engine: self.io.engine,
            direct_io: self.io.direct_io,
            map_grants: self.io.grants == GrantMode::Map,
            poll_us: self.io.poll_us,
            zero_copy: self.io.zero_copy,
            // Per vbd, by the toolstack (`discard-enable`).
            discard: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("test.toml"))
    }

    #[test]
    fn an_empty_file_means_the_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.offer().unwrap(), Offer::default());
    }

    #[test]
    fn every_documented_key_is_read() {
        let c = parse(
            r#"
            xenstore = "/run/xenstored/socket"
            allow_missing_diskseq = true
            on_stop = "close"
            [offer]
            max_ring_page_order = 2
            max_queues = 8
            max_indirect_segments = 0
            persistent_grants = false
            [io]
            engine = "blocking"
            direct_io = false
            grants = "map"
            pool_kib = 1024
            max_persistent_maps = 500
            poll_us = 50
            [metrics]
            listen = "127.0.0.1:9587"
            "#,
        )
        .unwrap();
        assert_eq!(
            c.metrics.listen,
            Some(Listen::Tcp("127.0.0.1:9587".parse().unwrap()))
        );
        assert_eq!(Config::default().metrics.listen, None);
        let l = parse(
            "[[limit]]\ndomain = \"web1\"\niops = 500\n[[limit]]\n\
             uuid = \"1D1A1C1E-0000-4000-8000-00000000abcd\"\ndevid = 51728\nbps = 1048576\nburst_ms = 20",
        )
        .unwrap()
        .limit;
        assert_eq!(l.len(), 2);
        assert!(
            l[0].matches(Some("web1"), None, 51712) && !l[0].matches(Some("web2"), None, 51712)
        );
        assert_eq!(l[0].limit.iops, 500);
        let u = Some("1d1a1c1e-0000-4000-8000-00000000ABCD");
        assert!(l[1].matches(None, u, 51728) && !l[1].matches(None, u, 51712));
        assert_eq!((l[1].limit.bps, l[1].limit.burst_ms), (1 << 20, 20));
        assert_eq!(
            parse("[metrics]\nlisten = \"unix:/run/blkbackd/metrics.sock\"")
                .unwrap()
                .metrics
                .listen,
            Some(Listen::Unix("/run/blkbackd/metrics.sock".into()))
        );
        assert_eq!(c.on_stop, OnStop::Close);
        assert_eq!(c.io.max_persistent_maps, Some(500));
        assert_eq!(c.offer().unwrap().poll_us, 50);
        assert_eq!(Config::default().on_stop, OnStop::Handover);
        assert_eq!(
            c.xenstore.as_deref(),
            Some(Path::new("/run/xenstored/socket"))
        );
        assert!(c.allow_missing_diskseq);
        let o = c.offer().unwrap();
        assert_eq!(
            (
                o.max_ring_order,
                o.max_queues,
                o.max_indirect_segments,
                o.persistent_grants
            ),
            (2, 8, 0, false)
        );
        assert_eq!(
            (o.engine, o.direct_io, o.map_grants),
            (EngineChoice::Blocking, false, true)
        );
        assert_eq!(o.pool_bytes, 1 << 20);
    }

    #[test]
    fn the_packaged_example_shows_the_defaults() {
        let text = include_str!("../../scripts/debian/blkbackd.toml");
        assert_eq!(parse(text).unwrap(), Config::default());
        // Every setting in it uncommented: the defaults, plus the endpoint.
        let on: Vec<&str> = text
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(r) if r.starts_with(|c: char| c.is_ascii_lowercase() || c == '[') => r,
                _ => l,
            })
            .collect();
        let c = parse(&on.join("\n")).unwrap();
        let mut want = Config::default();
        want.metrics.listen = Some(Listen::Tcp("127.0.0.1:9587".parse().unwrap()));
        want.xenstore = Some("/run/xenstored/socket".into());
        want.rbd.conf = Some("/etc/ceph/ceph.conf".into());
        want.rbd.keyring = Some("/etc/ceph/ceph.client.admin.keyring".into());
        want.limit = vec![LimitRule {
            domain: Some("web1".into()),
            limit: crate::vbd::limit::IoLimit {
                iops: 2000,
                bps: 100 << 20,
                burst_ms: 100,
            },
            ..Default::default()
        }];
        assert_eq!(c, want);
        // It shows every table and top-level key there is.
        for key in [
            "xenstore",
            "allow_missing_diskseq",
            "on_stop",
            "[offer]",
            "[io]",
            "[metrics]",
            "[rbd]",
        ] {
            assert!(
                on.iter().any(|l| l.starts_with(key)),
                "{key} is not in the example"
            );
        }
    }

    #[test]
    fn bad_files_are_refused_with_what_is_wrong() {
        for (text, wants) in [
            ("max_queues = 4", "unknown field `max_queues`"),
            ("[rbd]\nclient = \"client.admin\"", "without \"client.\""),
            ("[rbd]\nconf = \"ceph.conf\"", "not an absolute path"),
            ("[rbd]\nconnect_timeout_s = 0", "outside 1..=25"),
            ("[rbd]\nconnect_timeout_s = 40", "outside 1..=25"),
            ("[rbd]\nlock_wait_s = 601", "outside 0..=600"),
            ("[rbd]\nmonitors = \"x\"", "unknown field `monitors`"),
            ("[offer]\nmax_queue = 4", "unknown field `max_queue`"),
            ("[offer]\nmax_queues = \"four\"", "invalid type"),
            (
                "[offer]\nmax_queues = 0",
                "offer.max_queues = 0 is outside 1..=32",
            ),
            (
                "[offer]\nmax_ring_page_order = 5",
                "max_ring_page_order = 5",
            ),
            (
                "[offer]\nmax_indirect_segments = 11",
                "max_indirect_segments = 11",
            ),
            ("allow_missing_diskseq = 1", "invalid type"),
            ("[io]\nengine = \"aio\"", "unknown variant `aio`"),
            ("on_stop = \"halt\"", "unknown variant `halt`"),
            (
                "[io]\npoll_us = 5000",
                "io.poll_us = 5000 is outside 0..=1000",
            ),
            ("[io]\non_stop = \"close\"", "unknown field `on_stop`"),
            (
                "[io]\npool_kib = 8",
                "io.pool_kib = 8 is outside 64..=65536",
            ),
            ("not toml at all", "test.toml: line 1, column 5:"),
            (
                "[offer]\n\nmax_queue = 4",
                "line 3, column 1: unknown field `max_queue`",
            ),
            (
                "[metrics]\nlisten = \"localhost:9587\"",
                "metrics.listen = \"localhost:9587\" is neither ADDRESS:PORT",
            ),
            (
                "[metrics]\nlisten = \"9587\"",
                "metrics.listen = \"9587\" is neither",
            ),
            (
                "[metrics]\nlisten = \"unix:metrics.sock\"",
                "needs an absolute path",
            ),
            ("[metrics]\nport = 9587", "unknown field `port`"),
            ("[[limit]]\niops = 10", "limit[0]: names no guest"),
            (
                "[[limit]]\ndomain = \"a\"\nuuid = \"b\"\niops = 1",
                "limit[0]: domain and uuid both given",
            ),
            (
                "[[limit]]\nuuid = \"web1\"\niops = 1",
                "uuid = \"web1\" is not a UUID",
            ),
            (
                "[[limit]]\ndomain = \"web1\"",
                "limit[0]: sets neither iops nor bps",
            ),
            (
                "[[limit]]\ndomain = \"web1\"\niops = 1000000000000",
                "limit[0]: iops = 1000000000000 is above",
            ),
            ("[[limit]]\ndomain = \"web1\"\nipos = 5", "unknown field"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(wants), "{text:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{text:?}: {e}");
        }
    }
}
