//! The table model and its parser: the targets we build ([`Target`]), the
//! lines of a table ([`Line`], [`Table`]), the checks a table passes before
//! it is loaded, and the declarative spec `Table::parse` reads.

use std::fmt;
use std::path::Path;

use super::{DmError, Key};

/// A block device a table refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevRef {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
}

impl fmt::Display for DevRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl DevRef {
    fn parse(s: &str) -> Option<DevRef> {
        let (a, b) = s.split_once(':')?;
        let p = |v: &str| {
            (!v.is_empty() && v.bytes().all(|c| c.is_ascii_digit()))
                .then(|| v.parse().ok())
                .flatten()
        };
        Some(DevRef {
            major: p(a)?,
            minor: p(b)?,
        })
    }
}

/// What one table line maps its sectors to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `linear DEV OFFSET`.
    Linear {
        /// The device.
        dev: DevRef,
        /// Its first sector.
        offset: u64,
    },
    /// `error`: every I/O fails (revocation).
    Error,
    /// `zero`: reads zeroes, writes vanish.
    Zero,
    /// `snapshot-origin DEV`.
    SnapshotOrigin {
        /// The origin.
        dev: DevRef,
    },
    /// `snapshot ORIGIN COW P|N CHUNK`: a copy-on-write view of a template.
    Snapshot {
        /// The template.
        origin: DevRef,
        /// The exception store.
        cow: DevRef,
        /// Persistent exception store.
        persistent: bool,
        /// Chunk size in sectors.
        chunk: u32,
    },
    /// `thin-pool META DATA BLOCK LOW_WATER`.
    ThinPool {
        /// Metadata device.
        meta: DevRef,
        /// Data device.
        data: DevRef,
        /// Block size in sectors (64..=2097152, a multiple of 64).
        block: u32,
        /// Low-water mark in blocks.
        low_water: u64,
    },
    /// `thin POOL ID`.
    Thin {
        /// The pool device.
        pool: DevRef,
        /// The thin device id.
        id: u32,
    },
    /// `crypt CIPHER KEY IV_OFFSET DEV OFFSET`.
    Crypt {
        /// e.g. `aes-xts-plain64`.
        cipher: String,
        /// The key.
        key: Key,
        /// IV offset.
        iv_offset: u64,
        /// The device.
        dev: DevRef,
        /// Its first sector.
        offset: u64,
    },
}

impl Target {
    /// The kernel's target type name.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Linear { .. } => "linear",
            Target::Error => "error",
            Target::Zero => "zero",
            Target::SnapshotOrigin { .. } => "snapshot-origin",
            Target::Snapshot { .. } => "snapshot",
            Target::ThinPool { .. } => "thin-pool",
            Target::Thin { .. } => "thin",
            Target::Crypt { .. } => "crypt",
        }
    }

    /// The parameter string (holds the key for crypt: never log it).
    pub(super) fn params(&self) -> String {
        match self {
            Target::Linear { dev, offset } => format!("{dev} {offset}"),
            Target::Error | Target::Zero => String::new(),
            Target::SnapshotOrigin { dev } => dev.to_string(),
            Target::Snapshot {
                origin,
                cow,
                persistent,
                chunk,
            } => format!(
                "{origin} {cow} {} {chunk}",
                if *persistent { "P" } else { "N" }
            ),
            Target::ThinPool {
                meta,
                data,
                block,
                low_water,
            } => format!("{meta} {data} {block} {low_water}"),
            Target::Thin { pool, id } => format!("{pool} {id}"),
            Target::Crypt {
                cipher,
                key,
                iv_offset,
                dev,
                offset,
            } => format!("{cipher} {} {iv_offset} {dev} {offset}", key.hex()),
        }
    }
}

/// One line: `len` sectors from `start`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// First sector.
    pub start: u64,
    /// Sectors.
    pub len: u64,
    /// What they map to.
    pub target: Target,
}

/// A table: lines covering `0..size` without gaps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table(pub Vec<Line>);

impl Table {
    /// One target over `len` sectors.
    pub fn single(len: u64, target: Target) -> Table {
        Table(vec![Line {
            start: 0,
            len,
            target,
        }])
    }

    /// Sectors covered.
    pub fn sectors(&self) -> u64 {
        self.0.iter().map(|l| l.len).sum()
    }

    /// Whether it holds key material (loaded with `DM_SECURE_DATA_FLAG`).
    pub(super) fn secret(&self) -> bool {
        self.0
            .iter()
            .any(|l| matches!(l.target, Target::Crypt { .. }))
    }

    /// Checks the lines are contiguous from 0, non-empty, and sane.
    pub fn check(&self) -> Result<(), DmError> {
        let mut at = 0u64;
        if self.0.is_empty() {
            return Err(DmError::BadSpec {
                line: 0,
                why: "a table needs at least one line".into(),
            });
        }
        for (i, l) in self.0.iter().enumerate() {
            let e = |why: String| DmError::BadSpec { line: i + 1, why };
            if l.start != at {
                return Err(e(format!(
                    "starts at sector {}, not {at}: tables have no gaps",
                    l.start
                )));
            }
            if l.len == 0 {
                return Err(e("has no sectors".into()));
            }
            at = at
                .checked_add(l.len)
                .filter(|&a| a <= i64::MAX as u64 / 512)
                .ok_or_else(|| e("is too long".into()))?;
            match &l.target {
                Target::ThinPool { block, .. }
                    if !(64..=2_097_152).contains(block) || block % 64 != 0 =>
                {
                    return Err(e(format!(
                        "thin-pool block size {block} is not a multiple of 64 in 64..=2097152"
                    )));
                }
                Target::Snapshot { chunk, .. } if *chunk == 0 || !chunk.is_power_of_two() => {
                    return Err(e(format!(
                        "snapshot chunk size {chunk} is not a power of two"
                    )));
                }
                Target::Crypt { cipher, .. }
                    if cipher.is_empty()
                        || !cipher
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b':') =>
                {
                    return Err(e(format!("bad cipher {cipher:?}")));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Parses the declarative spec: one `START LEN TYPE ARGS...` line per
    /// target, as `dmsetup table` prints them, except that a crypt key is
    /// given as `keyfile=PATH` (read here, never written in a spec).
    /// Blank lines and `#` comments are ignored.
    pub fn parse(spec: &str) -> Result<Table, DmError> {
        let mut lines = Vec::new();
        for (i, raw) in spec.lines().enumerate() {
            let text = raw.split('#').next().unwrap_or("").trim();
            if text.is_empty() {
                continue;
            }
            let e = |why: String| DmError::BadSpec { line: i + 1, why };
            let f: Vec<&str> = text.split_whitespace().collect();
            if f.len() < 3 {
                return Err(e("want START LEN TYPE ARGS...".into()));
            }
            let num = |s: &str, what: &str| -> Result<u64, DmError> {
                if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
                    return Err(e(format!("{what} {s:?} is not a decimal number")));
                }
                s.parse()
                    .map_err(|_| e(format!("{what} {s:?} is too large")))
            };
            let dev =
                |s: &str| DevRef::parse(s).ok_or_else(|| e(format!("{s:?} is not MAJOR:MINOR")));
            let small = |s: &str, what: &str| -> Result<u32, DmError> {
                u32::try_from(num(s, what)?).map_err(|_| e(format!("{what} {s} is too large")))
            };
            let args = &f[3..];
            let want = |n: usize| -> Result<(), DmError> {
                if args.len() == n {
                    Ok(())
                } else {
                    Err(e(format!(
                        "{} takes {n} arguments, not {}",
                        f[2],
                        args.len()
                    )))
                }
            };
            let target = match f[2] {
                "linear" => {
                    want(2)?;
                    Target::Linear {
                        dev: dev(args[0])?,
                        offset: num(args[1], "offset")?,
                    }
                }
                "error" => {
                    want(0)?;
                    Target::Error
                }
                "zero" => {
                    want(0)?;
                    Target::Zero
                }
                "snapshot-origin" => {
                    want(1)?;
                    Target::SnapshotOrigin { dev: dev(args[0])? }
                }
                "snapshot" => {
                    want(4)?;
                    Target::Snapshot {
                        origin: dev(args[0])?,
                        cow: dev(args[1])?,
                        persistent: match args[2] {
                            "P" => true,
                            "N" => false,
                            o => return Err(e(format!("snapshot store {o:?} is not P or N"))),
                        },
                        chunk: small(args[3], "chunk size")?,
                    }
                }
                "thin-pool" => {
                    want(4)?;
                    Target::ThinPool {
                        meta: dev(args[0])?,
                        data: dev(args[1])?,
                        block: small(args[2], "block size")?,
                        low_water: num(args[3], "low-water mark")?,
                    }
                }
                "thin" => {
                    want(2)?;
                    Target::Thin {
                        pool: dev(args[0])?,
                        id: small(args[1], "thin id")?,
                    }
                }
                "crypt" => {
                    want(5)?;
                    let path = args[1].strip_prefix("keyfile=").ok_or_else(|| {
                        e("a crypt key is given as keyfile=PATH, never inline".into())
                    })?;
                    Target::Crypt {
                        cipher: args[0].to_owned(),
                        key: Key::from_file(Path::new(path)).map_err(e)?,
                        iv_offset: num(args[2], "iv offset")?,
                        dev: dev(args[3])?,
                        offset: num(args[4], "offset")?,
                    }
                }
                other => return Err(e(format!("unknown target type {other:?}"))),
            };
            lines.push(Line {
                start: num(f[0], "start")?,
                len: num(f[1], "length")?,
                target,
            });
        }
        let t = Table(lines);
        t.check()?;
        Ok(t)
    }
}
