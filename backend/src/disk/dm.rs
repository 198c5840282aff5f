//! Device-mapper: the `/dev/mapper/control` ioctls, the tables we build, and
//! table swaps that never leave a device suspended or half swapped.
//!
//! Written here rather than taken from the `devicemapper` crate, which links
//! libdevmapper through bindgen and pkg-config at build time and waits for
//! udev cookies; dom0s without udev (our VM tests) and a static binary want
//! neither. The layer is the ioctl ABI of `linux/dm-ioctl.h` (DM 4.x) built
//! with byte offsets (see `reference/diskseq-dm.md`, section 5), no udev.
//!
//! Names are `blkbackd-<domid>-<devid>[-role]`, UUIDs `BLKBACKD-` plus a
//! unique part, both checked before any ioctl. A dm disk becomes openable
//! after its first table load: [`create_disk`] creates, loads, resumes, opens
//! the node by the dev_t create returned, reads its diskseq, and checks by
//! UUID that the dev_t still carries our UUID.
#![forbid(unsafe_code)]

use std::fmt;
use std::fs::File;
use std::io;
use std::path::Path;

use super::{sys, DiskError, DiskId};

/// The control node.
pub const CONTROL: &str = "/dev/mapper/control";
/// UUID prefix of every device we make (start-up reconciliation finds them by it).
pub const UUID_PREFIX: &str = "BLKBACKD-";
/// `DM_NAME_LEN`, with the NUL.
pub const NAME_LEN: usize = 128;
/// `DM_UUID_LEN`, with the NUL.
pub const UUID_LEN: usize = 129;

const HEADER: usize = 312;
const DM_VERSION: u8 = 0;
const DM_LIST_DEVICES: u8 = 2;
const DM_DEV_CREATE: u8 = 3;
const DM_DEV_REMOVE: u8 = 4;
const DM_DEV_SUSPEND: u8 = 6;
const DM_DEV_STATUS: u8 = 7;
const DM_TABLE_LOAD: u8 = 9;
const DM_TABLE_CLEAR: u8 = 10;
const DM_TABLE_STATUS: u8 = 12;
const DM_TARGET_MSG: u8 = 14;

const READONLY_FLAG: u32 = 1 << 0;
const SUSPEND_FLAG: u32 = 1 << 1;
const STATUS_TABLE_FLAG: u32 = 1 << 4;
const ACTIVE_PRESENT_FLAG: u32 = 1 << 5;
const INACTIVE_PRESENT_FLAG: u32 = 1 << 6;
const BUFFER_FULL_FLAG: u32 = 1 << 8;
const NOFLUSH_FLAG: u32 = 1 << 11;
const UUID_FLAG: u32 = 1 << 14;
const SECURE_DATA_FLAG: u32 = 1 << 15;
const DATA_OUT_FLAG: u32 = 1 << 16;
const DEFERRED_REMOVE: u32 = 1 << 17;

/// A device-mapper failure.
#[derive(Debug, thiserror::Error)]
pub enum DmError {
    /// A name or UUID the kernel would refuse or that could escape /dev/mapper.
    #[error("device-mapper {what} {value:?} is not allowed: {why}")]
    BadName {
        /// "name" or "uuid".
        what: &'static str,
        /// The value.
        value: String,
        /// Why.
        why: &'static str,
    },
    /// A table spec that cannot be loaded.
    #[error("bad table spec, line {line}: {why}")]
    BadSpec {
        /// 1-based line.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// An ioctl failed.
    #[error("{op} on {dev}: {source}")]
    Ioctl {
        /// The command.
        op: &'static str,
        /// The device.
        dev: String,
        /// The error.
        source: io::Error,
    },
    /// A table swap failed and was rolled back: the old table is live.
    #[error("table swap of {dev} failed at {step} and was rolled back: {source}")]
    SwapRolledBack {
        /// The device.
        dev: String,
        /// load, suspend or resume.
        step: &'static str,
        /// The failure.
        source: Box<DmError>,
    },
    /// The device we opened does not carry our UUID (someone replaced it).
    #[error("{dev} is not the device {uuid} we created")]
    NotOurs {
        /// The dev_t opened.
        dev: String,
        /// The UUID expected.
        uuid: String,
    },
    /// The device under a vbd's name is not the disk the vbd published (it
    /// was removed and another made under that name, or the name was never
    /// that disk's): nothing is done to it.
    #[error("{name} is now {found}, not the disk {published} its vbd published: it was replaced; refusing to act on it")]
    Replaced {
        /// The dm name.
        name: String,
        /// What the vbd published (`major:minor diskseq`).
        published: DiskId,
        /// What carries the name now.
        found: String,
    },
    /// Opening the new device failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
}

/// How to name a device in an ioctl.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DevId {
    /// By name.
    Name(String),
    /// By UUID.
    Uuid(String),
}

impl fmt::Display for DevId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DevId::Name(n) => write!(f, "dm device {n}"),
            DevId::Uuid(u) => write!(f, "dm device with uuid {u}"),
        }
    }
}

fn bad(what: &'static str, value: &str, why: &'static str) -> DmError {
    DmError::BadName {
        what,
        value: value.chars().take(160).collect(),
        why,
    }
}

/// Checks a device name: what the kernel takes, and nothing that could name
/// another node under /dev/mapper.
pub fn validate_name(name: &str) -> Result<(), DmError> {
    if name.is_empty() {
        return Err(bad("name", name, "it is empty"));
    }
    if name.len() >= NAME_LEN {
        return Err(bad("name", name, "it is longer than 127 bytes"));
    }
    if name == "." || name == ".." || name == "control" {
        return Err(bad("name", name, "it is reserved"));
    }
    if name.contains('/') {
        return Err(bad("name", name, "it contains '/'"));
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad(
            "name",
            name,
            "only printable ASCII without spaces is allowed",
        ));
    }
    Ok(())
}

/// Checks a UUID: ours, within the kernel's length, printable.
pub fn validate_uuid(uuid: &str) -> Result<(), DmError> {
    if !uuid.starts_with(UUID_PREFIX) || uuid.len() == UUID_PREFIX.len() {
        return Err(bad("uuid", uuid, "it must be BLKBACKD- and a unique part"));
    }
    if uuid.len() >= UUID_LEN {
        return Err(bad("uuid", uuid, "it is longer than 128 bytes"));
    }
    if !uuid.bytes().all(|b| b.is_ascii_graphic()) || uuid.contains('/') {
        return Err(bad(
            "uuid",
            uuid,
            "only printable ASCII without spaces or '/' is allowed",
        ));
    }
    Ok(())
}

/// `blkbackd-<domid>-<devid>[-role]`.
pub fn vbd_name(domid: u16, devid: u32, role: Option<&str>) -> Result<String, DmError> {
    let n = match role {
        Some(r) => format!("blkbackd-{domid}-{devid}-{r}"),
        None => format!("blkbackd-{domid}-{devid}"),
    };
    validate_name(&n)?;
    Ok(n)
}

/// A fresh UUID for `name`: `BLKBACKD-<name>-<16 random hex digits>`.
pub fn new_uuid(name: &str) -> Result<String, DmError> {
    let mut r = [0u8; 8];
    let got = File::open("/dev/urandom").and_then(|mut f| io::Read::read_exact(&mut f, &mut r));
    if let Err(e) = got {
        return Err(DmError::Ioctl {
            op: "reading /dev/urandom",
            dev: name.into(),
            source: e,
        });
    }
    let u = format!("{UUID_PREFIX}{name}-{:016x}", u64::from_ne_bytes(r));
    validate_uuid(&u)?;
    Ok(u)
}

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

/// A crypt key: hex, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(String);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Key {
    /// Reads a raw key from `path` (16 to 64 bytes).
    pub fn from_file(path: &Path) -> Result<Key, String> {
        let raw = std::fs::read(path)
            .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
        if !(16..=64).contains(&raw.len()) {
            return Err(format!(
                "key file {} holds {} bytes, not 16 to 64",
                path.display(),
                raw.len()
            ));
        }
        Ok(Key(raw.iter().map(|b| format!("{b:02x}")).collect()))
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
    fn params(&self) -> String {
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
            } => format!("{cipher} {} {iv_offset} {dev} {offset}", key.0),
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
    fn secret(&self) -> bool {
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

/// What `DM_DEV_STATUS` says of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    /// Its name.
    pub name: String,
    /// Its UUID.
    pub uuid: String,
    /// Its dev_t.
    pub major: u32,
    /// See `major`.
    pub minor: u32,
    /// Opens.
    pub open_count: i32,
    /// Suspended now.
    pub suspended: bool,
    /// A live table is loaded.
    pub active: bool,
    /// An inactive table waits.
    pub inactive: bool,
}

/// A `struct dm_ioctl` buffer with payload.
struct Req {
    b: Vec<u8>,
}

fn cstr_at(b: &[u8], at: usize, max: usize) -> String {
    let end = (at + max).min(b.len());
    let s = &b[at.min(end)..end];
    let n = s.iter().position(|&c| c == 0).unwrap_or(s.len());
    String::from_utf8_lossy(&s[..n]).into_owned()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map(|s| u32::from_ne_bytes(s.try_into().expect("4 bytes")))
        .unwrap_or(0)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map(|s| u64::from_ne_bytes(s.try_into().expect("8 bytes")))
        .unwrap_or(0)
}

/// `huge_encode_dev` decoded (the encoding of dm's and loop's ioctls).
pub(crate) fn decode_dev(d: u64) -> (u32, u32) {
    let major = ((d >> 8) & 0xfff) as u32;
    let minor = ((d & 0xff) | ((d >> 12) & 0xfff_ff00)) as u32;
    (major, minor)
}

impl Req {
    fn new(id: Option<&DevId>, flags: u32, payload: &[u8], size: usize) -> Req {
        let size = size.max(HEADER + payload.len()).div_ceil(8) * 8;
        let mut b = vec![0u8; size];
        for (i, v) in [4u32, 0, 0].iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        b[12..16].copy_from_slice(&(size as u32).to_ne_bytes());
        b[16..20].copy_from_slice(&(HEADER as u32).to_ne_bytes());
        b[28..32].copy_from_slice(&flags.to_ne_bytes());
        match id {
            Some(DevId::Name(n)) => b[48..48 + n.len()].copy_from_slice(n.as_bytes()),
            Some(DevId::Uuid(u)) => b[176..176 + u.len()].copy_from_slice(u.as_bytes()),
            None => {}
        }
        b[HEADER..HEADER + payload.len()].copy_from_slice(payload);
        Req { b }
    }

    fn set_target_count(&mut self, n: u32) {
        self.b[20..24].copy_from_slice(&n.to_ne_bytes());
    }

    fn flags(&self) -> u32 {
        u32_at(&self.b, 28)
    }

    fn data_start(&self) -> usize {
        u32_at(&self.b, 16) as usize
    }

    fn info(&self) -> Info {
        let (major, minor) = decode_dev(u64_at(&self.b, 40));
        let f = self.flags();
        Info {
            name: cstr_at(&self.b, 48, NAME_LEN),
            uuid: cstr_at(&self.b, 176, UUID_LEN),
            major,
            minor,
            open_count: u32_at(&self.b, 24) as i32,
            suspended: f & SUSPEND_FLAG != 0,
            active: f & ACTIVE_PRESENT_FLAG != 0,
            inactive: f & INACTIVE_PRESENT_FLAG != 0,
        }
    }
}

/// Encodes a table as `DM_TABLE_LOAD` takes it.
fn encode_table(t: &Table) -> Vec<u8> {
    let mut out = Vec::new();
    for l in &t.0 {
        let params = l.target.params();
        let len = (40 + params.len() + 1).div_ceil(8) * 8;
        let mut spec = vec![0u8; len];
        spec[0..8].copy_from_slice(&l.start.to_ne_bytes());
        spec[8..16].copy_from_slice(&l.len.to_ne_bytes());
        spec[20..24].copy_from_slice(&(len as u32).to_ne_bytes());
        let kind = l.target.kind().as_bytes();
        spec[24..24 + kind.len()].copy_from_slice(kind);
        spec[40..40 + params.len()].copy_from_slice(params.as_bytes());
        out.extend_from_slice(&spec);
    }
    out
}

/// The operations a table swap needs (implemented by [`Control`]; a test
/// injects failures through it).
pub trait DmOps {
    /// Loads `t` as the inactive table.
    fn load(&self, id: &DevId, t: &Table, read_only: bool) -> Result<(), DmError>;
    /// Suspends (flushing queued I/O unless `noflush`).
    fn suspend(&self, id: &DevId, noflush: bool) -> Result<(), DmError>;
    /// Resumes, making a loaded inactive table live.
    fn resume(&self, id: &DevId) -> Result<(), DmError>;
    /// Drops the inactive table.
    fn clear(&self, id: &DevId) -> Result<(), DmError>;
}

/// Replaces `id`'s live table by `t` as one transaction: load the inactive
/// table, suspend, resume. On any failure the inactive table is cleared and
/// the device resumed on its old table: never left suspended or half swapped.
pub fn swap_table<O: DmOps>(
    ops: &O,
    id: &DevId,
    t: &Table,
    read_only: bool,
) -> Result<(), DmError> {
    swap(ops, id, t, read_only, false)
}

/// [`swap_table`], suspending with `noflush` if asked: I/O the old table
/// holds is then requeued to the new one instead of waited for.
fn swap<O: DmOps>(
    ops: &O,
    id: &DevId,
    t: &Table,
    read_only: bool,
    noflush: bool,
) -> Result<(), DmError> {
    t.check()?;
    let rolled = |step: &'static str, e: DmError| DmError::SwapRolledBack {
        dev: id.to_string(),
        step,
        source: Box::new(e),
    };
    if let Err(e) = ops.load(id, t, read_only) {
        let _ = ops.clear(id);
        return Err(rolled("load", e));
    }
    if let Err(e) = ops.suspend(id, noflush) {
        let _ = ops.clear(id);
        let _ = ops.resume(id);
        return Err(rolled("suspend", e));
    }
    if let Err(e) = ops.resume(id) {
        // The swap did not happen: drop the new table, bring the old one back.
        let _ = ops.clear(id);
        if let Err(again) = ops.resume(id) {
            tracing::error!(%id, "cannot resume after a failed table swap: {again}");
        }
        return Err(rolled("resume", e));
    }
    Ok(())
}

/// Revokes a disk: swaps its table to `error` over the same size, so no
/// further I/O reaches the storage underneath. The suspend does not flush:
/// a flushing suspend waits for the I/O the old table holds, and a thin
/// volume whose pool is out of data space holds its writes until the pool's
/// no-space timeout (dm-thin requeues them only on a `noflush` suspend);
/// requeued, they meet the `error` table.
pub fn revoke<O: DmOps>(ops: &O, id: &DevId, sectors: u64) -> Result<(), DmError> {
    swap(ops, id, &Table::single(sectors, Target::Error), false, true)
}

/// Whether the device `info` (read by name), whose diskseq is `diskseq`,
/// is the disk `published`; `Err(Replaced)` if not.
pub fn check_published(info: &Info, diskseq: u64, published: DiskId) -> Result<(), DmError> {
    if (info.major, info.minor, diskseq) == (published.major, published.minor, published.diskseq) {
        return Ok(());
    }
    Err(DmError::Replaced {
        name: info.name.clone(),
        published,
        found: format!("{}:{} (diskseq {diskseq})", info.major, info.minor),
    })
}

/// Binds an operation on the dm device called `name` to the disk a vbd
/// published: reads it by name, refuses it unless it carries our UUID and is
/// that dev_t with that diskseq, and returns it addressed by its UUID (fresh
/// for every device we create), so a device re-created under the name
/// meanwhile is never the one acted on: its UUID differs and the ioctls
/// fail.
pub fn bind(ctl: &Control, name: &str, published: DiskId) -> Result<(DevId, Info), DmError> {
    validate_name(name)?;
    let info = ctl.info(&DevId::Name(name.to_owned()))?;
    if !info.uuid.starts_with(UUID_PREFIX) {
        return Err(DmError::NotOurs {
            dev: name.to_owned(),
            uuid: format!("{UUID_PREFIX}..."),
        });
    }
    let path = format!("/sys/dev/block/{}:{}/diskseq", info.major, info.minor);
    let diskseq = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(|| DmError::Ioctl {
            op: "reading the diskseq",
            dev: path.clone(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        })?;
    check_published(&info, diskseq, published)?;
    Ok((DevId::Uuid(info.uuid.clone()), info))
}

/// `/dev/mapper/control`.
#[derive(Debug)]
pub struct Control {
    file: File,
}

impl Control {
    /// Opens the control node.
    pub fn open() -> Result<Control, DmError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTROL)
            .map_err(|e| DmError::Ioctl {
                op: "opening",
                dev: CONTROL.into(),
                source: e,
            })?;
        Ok(Control { file })
    }

    /// Runs one command; grows the buffer while the kernel says it is full.
    fn run(
        &self,
        op: &'static str,
        nr: u8,
        mut req: Req,
        who: &dyn fmt::Display,
    ) -> Result<Req, DmError> {
        loop {
            let mut words: Vec<u64> = req
                .b
                .chunks_exact(8)
                .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
                .collect();
            let r = sys::dm_ioctl(&self.file, nr, &mut words);
            let out: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let secure = req.flags() & SECURE_DATA_FLAG != 0;
            if secure {
                req.b.fill(0);
            }
            r.map_err(|e| DmError::Ioctl {
                op,
                dev: who.to_string(),
                source: e,
            })?;
            let full = u32_at(&out, 28) & BUFFER_FULL_FLAG != 0;
            if full && !secure && req.b.len() < 16 << 20 {
                // Same request, bigger buffer.
                let bigger = req.b.len() * 4;
                req.b.resize(bigger, 0);
                req.b[12..16].copy_from_slice(&(bigger as u32).to_ne_bytes());
                continue;
            }
            return Ok(Req { b: out });
        }
    }

    /// The driver's interface version.
    pub fn version(&self) -> Result<(u32, u32, u32), DmError> {
        let r = self.run(
            "DM_VERSION",
            DM_VERSION,
            Req::new(None, 0, &[], HEADER),
            &"control",
        )?;
        Ok((u32_at(&r.b, 0), u32_at(&r.b, 4), u32_at(&r.b, 8)))
    }

    /// Creates an empty device (no table: not openable until the first load).
    pub fn create(&self, name: &str, uuid: &str) -> Result<Info, DmError> {
        validate_name(name)?;
        validate_uuid(uuid)?;
        let mut req = Req::new(Some(&DevId::Name(name.into())), 0, &[], HEADER);
        req.b[176..176 + uuid.len()].copy_from_slice(uuid.as_bytes());
        Ok(self.run("DM_DEV_CREATE", DM_DEV_CREATE, req, &name)?.info())
    }

    /// `DM_DEV_STATUS`.
    pub fn info(&self, id: &DevId) -> Result<Info, DmError> {
        check_id(id)?;
        Ok(self
            .run(
                "DM_DEV_STATUS",
                DM_DEV_STATUS,
                Req::new(Some(id), 0, &[], HEADER),
                id,
            )?
            .info())
    }

    /// Removes a device; `deferred`: when it is open, on its last close.
    pub fn remove(&self, id: &DevId, deferred: bool) -> Result<(), DmError> {
        check_id(id)?;
        let flags = if deferred { DEFERRED_REMOVE } else { 0 };
        self.run(
            "DM_DEV_REMOVE",
            DM_DEV_REMOVE,
            Req::new(Some(id), flags, &[], HEADER),
            id,
        )
        .map(drop)
    }

    /// The live table's lines (`DM_STATUS_TABLE_FLAG`) or status lines:
    /// (start, length, type, params). A crypt key appears in table lines:
    /// never log them.
    pub fn table_lines(
        &self,
        id: &DevId,
        table: bool,
    ) -> Result<Vec<(u64, u64, String, String)>, DmError> {
        check_id(id)?;
        let flags = if table { STATUS_TABLE_FLAG } else { 0 };
        let r = self.run(
            "DM_TABLE_STATUS",
            DM_TABLE_STATUS,
            Req::new(Some(id), flags, &[], 16384),
            id,
        )?;
        let count = u32_at(&r.b, 20);
        let base = r.data_start();
        let mut at = base;
        let mut out = Vec::new();
        for _ in 0..count {
            if at + 40 > r.b.len() {
                break;
            }
            out.push((
                u64_at(&r.b, at),
                u64_at(&r.b, at + 8),
                cstr_at(&r.b, at + 24, 16),
                cstr_at(&r.b, at + 40, r.b.len().saturating_sub(at + 40)),
            ));
            at = base + u32_at(&r.b, at + 20) as usize;
        }
        Ok(out)
    }

    /// Sends a target message (thin-pool `create_thin N`, `create_snap N
    /// ORIGIN`, `delete N`); returns the reply, if any.
    pub fn message(&self, id: &DevId, sector: u64, msg: &str) -> Result<Option<String>, DmError> {
        check_id(id)?;
        let mut payload = sector.to_ne_bytes().to_vec();
        payload.extend_from_slice(msg.as_bytes());
        payload.push(0);
        let r = self.run(
            "DM_TARGET_MSG",
            DM_TARGET_MSG,
            Req::new(Some(id), 0, &payload, 4096),
            id,
        )?;
        Ok((r.flags() & DATA_OUT_FLAG != 0).then(|| cstr_at(&r.b, r.data_start(), r.b.len())))
    }

    /// Every device: (name, major, minor, uuid).
    pub fn list(&self) -> Result<Vec<(String, u32, u32, String)>, DmError> {
        let r = self.run(
            "DM_LIST_DEVICES",
            DM_LIST_DEVICES,
            Req::new(None, UUID_FLAG, &[], 16384),
            &"control",
        )?;
        let mut out = Vec::new();
        let mut at = r.data_start();
        loop {
            if at + 12 > r.b.len() {
                break;
            }
            let dev = u64_at(&r.b, at);
            let next = u32_at(&r.b, at + 8) as usize;
            let name = cstr_at(&r.b, at + 12, NAME_LEN);
            if dev == 0 && name.is_empty() {
                break;
            }
            // After the name's NUL, 8-aligned: event_nr, flags, uuid.
            let after = (at + 12 + name.len() + 1).div_ceil(8) * 8;
            let flags = u32_at(&r.b, after + 4);
            let uuid = if flags & 1 != 0 {
                cstr_at(&r.b, after + 8, UUID_LEN)
            } else {
                String::new()
            };
            let (major, minor) = decode_dev(dev);
            out.push((name, major, minor, uuid));
            if next == 0 {
                break;
            }
            at += next;
        }
        Ok(out)
    }
}

fn check_id(id: &DevId) -> Result<(), DmError> {
    match id {
        DevId::Name(n) => validate_name(n),
        DevId::Uuid(u) => {
            if u.is_empty() || u.len() >= UUID_LEN {
                return Err(bad("uuid", u, "bad length"));
            }
            Ok(())
        }
    }
}

impl DmOps for Control {
    fn load(&self, id: &DevId, t: &Table, read_only: bool) -> Result<(), DmError> {
        check_id(id)?;
        t.check()?;
        let mut flags = if read_only { READONLY_FLAG } else { 0 };
        if t.secret() {
            flags |= SECURE_DATA_FLAG;
        }
        let payload = encode_table(t);
        let mut req = Req::new(Some(id), flags, &payload, HEADER);
        req.set_target_count(t.0.len() as u32);
        self.run("DM_TABLE_LOAD", DM_TABLE_LOAD, req, id).map(drop)
    }

    fn suspend(&self, id: &DevId, noflush: bool) -> Result<(), DmError> {
        check_id(id)?;
        let flags = SUSPEND_FLAG | if noflush { NOFLUSH_FLAG } else { 0 };
        self.run(
            "DM_DEV_SUSPEND",
            DM_DEV_SUSPEND,
            Req::new(Some(id), flags, &[], HEADER),
            id,
        )
        .map(drop)
    }

    fn resume(&self, id: &DevId) -> Result<(), DmError> {
        check_id(id)?;
        self.run(
            "DM_DEV_SUSPEND",
            DM_DEV_SUSPEND,
            Req::new(Some(id), 0, &[], HEADER),
            id,
        )
        .map(drop)
    }

    fn clear(&self, id: &DevId) -> Result<(), DmError> {
        check_id(id)?;
        self.run(
            "DM_TABLE_CLEAR",
            DM_TABLE_CLEAR,
            Req::new(Some(id), 0, &[], HEADER),
            id,
        )
        .map(drop)
    }
}

/// The thin volume a dm device's live table maps, from its table lines: one
/// `thin` target whose parameters are `POOL_MAJOR:POOL_MINOR DEV_ID
/// [EXTERNAL_ORIGIN]` (as the kernel prints them); `None` for anything else.
pub fn thin_target(lines: &[(u64, u64, String, String)]) -> Option<((u32, u32), u32)> {
    let [(_, _, target, params)] = lines else {
        return None;
    };
    if target != "thin" {
        return None;
    }
    let mut words = params.split_ascii_whitespace();
    let (major, minor) = words.next()?.split_once(':')?;
    let pool = (major.parse().ok()?, minor.parse().ok()?);
    let id = words.next()?.parse().ok()?;
    Some((pool, id))
}

/// If block device `major:minor` is a dm device whose live table is one
/// `thin` target: its pool's dev_t and the volume's thin id (so that a thin
/// volume activated by hand is recognised as the volume it is). `None` when
/// it is not, or when device-mapper cannot say.
pub fn thin_volume_of(major: u32, minor: u32) -> Option<((u32, u32), u32)> {
    let name = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/dm/name")).ok()?;
    let name = name.trim_end_matches('\n');
    validate_name(name).ok()?;
    let ctl = Control::open().ok()?;
    // Table lines may hold a crypt key: only a thin line is looked at.
    thin_target(&ctl.table_lines(&DevId::Name(name.to_owned()), true).ok()?)
}

/// A dm disk made and verified: its identity and an fd pinning it.
#[derive(Debug)]
pub struct DmDisk {
    /// Its name.
    pub name: String,
    /// Its UUID.
    pub uuid: String,
    /// (dev_t, diskseq).
    pub id: DiskId,
}

/// Creates `name` with `table`, makes it live, and binds it to a diskseq:
/// opens the node by the dev_t create returned, reads BLKGETDISKSEQ on that
/// fd, then checks by UUID that the dev_t still carries our UUID. Undone
/// (device removed) if any step fails.
pub fn create_disk(
    ctl: &Control,
    name: &str,
    table: &Table,
    read_only: bool,
) -> Result<DmDisk, DmError> {
    table.check()?;
    let uuid = new_uuid(name)?;
    let created = ctl.create(name, &uuid)?;
    let byuuid = DevId::Uuid(uuid.clone());
    let result = (|| {
        ctl.load(&byuuid, table, read_only)?;
        ctl.resume(&byuuid)?;
        let diskseq = {
            let (path, _private) = super::node_for(created.major, created.minor)?;
            let f = File::open(&path).map_err(|e| DmError::Ioctl {
                op: "opening",
                dev: path.display().to_string(),
                source: e,
            })?;
            sys::diskseq(&f).map_err(|e| DmError::Ioctl {
                op: "BLKGETDISKSEQ",
                dev: path.display().to_string(),
                source: e,
            })?
        };
        let now = ctl.info(&byuuid)?;
        if (now.major, now.minor) != (created.major, created.minor) || now.uuid != uuid {
            return Err(DmError::NotOurs {
                dev: format!("{}:{}", created.major, created.minor),
                uuid: uuid.clone(),
            });
        }
        Ok(DiskId {
            major: created.major,
            minor: created.minor,
            diskseq,
        })
    })();
    match result {
        Ok(id) => Ok(DmDisk {
            name: name.to_owned(),
            uuid,
            id,
        }),
        Err(e) => {
            let _ = ctl.remove(&byuuid, true);
            Err(e)
        }
    }
}

/// Removes every device with our UUID prefix whose name `claimed` does not
/// accept (deferred when open); returns the names removed.
pub fn reconcile(ctl: &Control, claimed: impl Fn(&str) -> bool) -> Result<Vec<String>, DmError> {
    let mut gone = Vec::new();
    for (name, _, _, uuid) in ctl.list()? {
        if uuid.starts_with(UUID_PREFIX) && !claimed(&name) {
            match ctl.remove(&DevId::Uuid(uuid.clone()), true) {
                Ok(()) => gone.push(name),
                Err(e) => tracing::warn!(name, "cannot remove an unclaimed dm device: {e}"),
            }
        }
    }
    Ok(gone)
}

pub mod pool;

#[cfg(test)]
mod tests;
