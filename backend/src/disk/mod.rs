//! Disks named race-free: (dev_t, diskseq).
//!
//! A `major:minor` pair is reused all the time (loop and dm minors are
//! recycled); the kernel's disk sequence number never is while it runs. A disk
//! is therefore opened by both: open a node for the dev_t, check with `fstat`
//! that it is that block device, and check `BLKGETDISKSEQ` on the same fd. The
//! open fd then pins that exact disk. [`loopdev`] makes loop devices for files.
#![deny(unsafe_code)]

pub mod dm;
pub mod loopdev;
pub mod sys;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A disk's identity: its device number and its sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DiskId {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// `BLKGETDISKSEQ`.
    pub diskseq: u64,
}

impl fmt::Display for DiskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} (diskseq {})",
            self.major, self.minor, self.diskseq
        )
    }
}

/// A regular file's identity, for files served directly (no loop device):
/// the file system's device, the inode, and the inode's generation where the
/// file system keeps one. An inode number freed and reused by another file
/// gets a new generation, so (dev, ino, generation) names one file as
/// (dev_t, diskseq) names one disk. Published as `file-id` = `%x:%x[:%x]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    /// `st_dev` of the file system.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// `FS_IOC_GETVERSION`, if the file system has it.
    pub generation: Option<u32>,
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}:{:x}", self.dev, self.ino)?;
        if let Some(g) = self.generation {
            write!(f, ":{g:x}")?;
        }
        Ok(())
    }
}

impl FileId {
    /// Parses `file-id` strictly (lower-case hex fields, as for `diskseq`).
    pub fn parse(raw: &[u8]) -> Result<FileId, DiskError> {
        let bad = || DiskError::Format {
            key: "file-id",
            value: String::from_utf8_lossy(&raw[..raw.len().min(64)]).into_owned(),
            want: "DEV:INO or DEV:INO:GENERATION in lower-case hex",
        };
        let s = std::str::from_utf8(raw).map_err(|_| bad())?;
        let mut parts = s.split(':');
        let dev = parts.next().and_then(parse_hex).ok_or_else(bad)?;
        let ino = parts.next().and_then(parse_hex).ok_or_else(bad)?;
        let generation = match parts.next() {
            None => None,
            Some(g) => Some(
                parse_hex(g)
                    .and_then(|g| u32::try_from(g).ok())
                    .ok_or_else(bad)?,
            ),
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(FileId {
            dev,
            ino,
            generation,
        })
    }

    fn of(file: &File, meta: &std::fs::Metadata) -> Result<FileId, DiskError> {
        Ok(FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            generation: sys::inode_generation(file).map_err(io_err("FS_IOC_GETVERSION"))?,
        })
    }
}

/// Why a disk could not be opened or named.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A Xenstore value that is not in the expected format.
    #[error("{key} = {value:?} is not {want}")]
    Format {
        /// The key.
        key: &'static str,
        /// Its value (truncated).
        value: String,
        /// What was expected.
        want: &'static str,
    },
    /// The node is not the block device we asked for.
    #[error("{path} is not block device {major}:{minor}")]
    NotThatDevice {
        /// The node opened.
        path: PathBuf,
        /// Wanted major.
        major: u32,
        /// Wanted minor.
        minor: u32,
    },
    /// The device number now belongs to another disk: it was released and reused.
    #[error("block device {major}:{minor} has diskseq {found}, not {wanted}: the disk was released and the number reused; refusing to serve it")]
    Reused {
        /// Major.
        major: u32,
        /// Minor.
        minor: u32,
        /// The diskseq asked for.
        wanted: u64,
        /// The diskseq found.
        found: u64,
    },
    /// The path names a node of another type than the one wanted (found
    /// before anything opened it).
    #[error("{path} is {found}, not {want}")]
    WrongType {
        /// The path.
        path: PathBuf,
        /// What it is, e.g. "a FIFO (named pipe)".
        found: &'static str,
        /// What was wanted, e.g. "a regular file".
        want: &'static str,
    },
    /// The path now names another file than the one published.
    #[error(
        "{path} is now file {found}, not {wanted}: the file was replaced; refusing to serve it"
    )]
    FileReplaced {
        /// The path.
        path: PathBuf,
        /// The identity published.
        wanted: FileId,
        /// The identity found.
        found: FileId,
    },
    /// A zoned device (host-managed or host-aware): blkif has no zones, so a
    /// guest would write where the device refuses it.
    #[error(
        "block device {major}:{minor} is zoned ({model}): blkif has no zones; refusing to serve it"
    )]
    Zoned {
        /// Its major number.
        major: u32,
        /// Its minor number.
        minor: u32,
        /// What sysfs calls it (`host-managed`, `host-aware`).
        model: String,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The error.
        source: io::Error,
    },
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DiskError {
    let what = what.into();
    move |source| DiskError::Io { what, source }
}

/// Lower-case hex, no `0x`, no leading zeros (zero is "0"): the whole value.
fn parse_hex(s: &str) -> Option<u64> {
    let ok = !s.is_empty()
        && s.len() <= 16
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && (s == "0" || !s.starts_with('0'));
    ok.then(|| u64::from_str_radix(s, 16).ok()).flatten()
}

/// Parses `physical-device` as the stock and Qubes scripts write it: `%x:%x`.
pub fn parse_physical_device(raw: &[u8]) -> Result<(u32, u32), DiskError> {
    let bad = || DiskError::Format {
        key: "physical-device",
        value: String::from_utf8_lossy(&raw[..raw.len().min(40)]).into_owned(),
        want: "hex major:minor (e.g. 7:1f)",
    };
    let s = std::str::from_utf8(raw).map_err(|_| bad())?;
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    let major = parse_hex(a)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(bad)?;
    let minor = parse_hex(b)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(bad)?;
    Ok((major, minor))
}

/// Parses `diskseq` as Qubes' script writes it: `%llx`.
pub fn parse_diskseq(raw: &[u8]) -> Result<u64, DiskError> {
    std::str::from_utf8(raw)
        .ok()
        .and_then(parse_hex)
        .filter(|&v| v != 0)
        .ok_or_else(|| DiskError::Format {
            key: "diskseq",
            value: String::from_utf8_lossy(&raw[..raw.len().min(40)]).into_owned(),
            want: "a non-zero lower-case hex number without 0x or leading zeros",
        })
}

impl DiskId {
    /// `physical-device` as written to Xenstore.
    pub fn physical_device(&self) -> String {
        format!("{:x}:{:x}", self.major, self.minor)
    }

    /// `diskseq` as written to Xenstore.
    pub fn diskseq_hex(&self) -> String {
        format!("{:x}", self.diskseq)
    }
}

/// A disk opened and verified: the fd pins it.
#[derive(Debug)]
pub struct OpenedDisk {
    /// The open device.
    pub file: File,
    /// What it is.
    pub id: DiskId,
    /// Size in bytes.
    pub size: u64,
    /// Logical block size.
    pub logical_block_size: u32,
    /// Physical block size.
    pub physical_block_size: u32,
    /// Whether the device is read-only (or was opened so).
    pub read_only: bool,
    /// Whether the device accepts discard.
    pub discard: bool,
    /// Its discard granularity in bytes (a dm-thin pool's block size, a
    /// disk's erase unit), as the kernel reports it.
    pub discard_granularity: u32,
    /// Its discard alignment in bytes.
    pub discard_alignment: u32,
}

/// The zone model of a zoned block device (`queue/zoned` other than
/// `none`), `None` for a conventional one or where sysfs does not say.
pub fn zoned_model(sysfs: &Path) -> Option<String> {
    let model = std::fs::read_to_string(sysfs.join("queue/zoned")).ok()?;
    let model = model.trim();
    (!model.is_empty() && model != "none").then(|| model.chars().take(32).collect())
}

/// What a block device's sysfs directory (`/sys/dev/block/M:m`) says of its
/// discard support: (supported, granularity, alignment), the granularity at
/// least the logical block size `lbs`. Missing or malformed files read as no
/// discard (support) or the smallest legal value (geometry).
pub fn discard_limits(sysfs: &Path, lbs: u32) -> (bool, u32, u32) {
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(sysfs.join(f))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    };
    let supported = read("queue/discard_max_bytes").is_some_and(|v| v > 0);
    let granularity = read("queue/discard_granularity")
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(0)
        .max(lbs);
    let alignment = read("discard_alignment")
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(0);
    (supported, granularity, alignment)
}

/// A node for `major:minor`: the devtmpfs name from sysfs if it is there,
/// else one made with `mknodat` in a private directory (no udev needed).
fn node_for(major: u32, minor: u32) -> Result<(PathBuf, Option<tempfile::TempDir>), DiskError> {
    let uevent = format!("/sys/dev/block/{major}:{minor}/uevent");
    if let Ok(text) = std::fs::read_to_string(&uevent) {
        if let Some(name) = text.lines().find_map(|l| l.strip_prefix("DEVNAME=")) {
            let p = Path::new("/dev").join(name);
            if p.exists() {
                return Ok((p, None));
            }
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("blkbackd-node-")
        .tempdir()
        .map_err(io_err("making a private directory for a device node"))?;
    let d = File::open(dir.path()).map_err(io_err("opening the private directory"))?;
    sys::mknod_block(&d, "disk", sys::makedev(major, minor))
        .map_err(io_err(format!("mknod for {major}:{minor}")))?;
    Ok((dir.path().join("disk"), Some(dir)))
}

/// The kind of node an operator's path must name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A block device (`phy:`, a device node).
    Block,
    /// A regular file (`file:`, `direct:`, templates, stores).
    File,
}

impl NodeKind {
    fn is(self, ft: std::fs::FileType) -> bool {
        match self {
            NodeKind::Block => ft.is_block_device(),
            NodeKind::File => ft.is_file(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            NodeKind::Block => "a block device",
            NodeKind::File => "a regular file",
        }
    }
}

/// What a node is, for error messages.
pub fn type_name(ft: std::fs::FileType) -> &'static str {
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_fifo() {
        "a FIFO (named pipe)"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "a node of unknown type"
    }
}

/// Opens `path` for I/O only once it is known to be `want`, reads its
/// metadata from the opened fd.
///
/// The path is first resolved with `O_PATH` (with `O_NOFOLLOW` unless
/// `follow`), which opens nothing: no FIFO waits for a writer, no device
/// driver's `open` runs. Its type is read from that fd with `fstat`; a wrong
/// type is refused there, naming it. Only then is the same inode opened for
/// I/O, through `/proc/self/fd/N` (the path is not looked up again, so it
/// cannot be swapped meanwhile), and checked to be the inode that was typed.
pub fn open_checked(
    path: &Path,
    want: NodeKind,
    writable: bool,
    follow: bool,
) -> Result<(File, std::fs::Metadata), DiskError> {
    let mut flags = libc::O_PATH | libc::O_CLOEXEC;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let shown = path.display();
    let node = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(io_err(format!("looking up {shown}")))?;
    let typed = node
        .metadata()
        .map_err(io_err(format!("fstat of {shown}")))?;
    if !want.is(typed.file_type()) {
        return Err(DiskError::WrongType {
            path: path.to_owned(),
            found: type_name(typed.file_type()),
            want: want.name(),
        });
    }
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", node.as_raw_fd()))
        .map_err(io_err(format!("opening {shown} (through /proc/self/fd)")))?;
    let meta = file
        .metadata()
        .map_err(io_err(format!("fstat of {shown}")))?;
    if (meta.dev(), meta.ino()) != (typed.dev(), typed.ino()) || !want.is(meta.file_type()) {
        return Err(io_err(format!("opening {shown}"))(io::Error::other(
            "/proc/self/fd reopened another file",
        )));
    }
    Ok((file, meta))
}

/// Opens a block-device node for I/O (symlinks followed: `/dev/vg/lv` and
/// `/dev/disk/by-id/...` are symlinks) and reads its metadata from the same
/// fd; anything else is refused before it is opened.
fn open_node(path: &Path, writable: bool) -> Result<(File, std::fs::Metadata), DiskError> {
    open_checked(path, NodeKind::Block, writable, true)
}

/// Opens block device (major, minor) and checks it is the disk `diskseq` names.
/// On any mismatch the fd is closed and the error names both numbers.
pub fn open_by_diskseq(id: DiskId, writable: bool) -> Result<OpenedDisk, DiskError> {
    let (path, _private) = node_for(id.major, id.minor)?;
    let (file, meta) = open_node(&path, writable).map_err(|e| match e {
        DiskError::WrongType { .. } => DiskError::NotThatDevice {
            path: path.clone(),
            major: id.major,
            minor: id.minor,
        },
        e => e,
    })?;
    if sys::split_dev(meta.rdev()) != (id.major, id.minor) {
        return Err(DiskError::NotThatDevice {
            path,
            major: id.major,
            minor: id.minor,
        });
    }
    let found = sys::diskseq(&file).map_err(io_err("BLKGETDISKSEQ"))?;
    if found != id.diskseq {
        return Err(DiskError::Reused {
            major: id.major,
            minor: id.minor,
            wanted: id.diskseq,
            found,
        });
    }
    describe(file, id, writable)
}

/// Opens block device `major:minor` read-only to look at it (another vbd's
/// published disk, for the sharing check): `None` when there is no such
/// device any more, or when `diskseq` is given and the number now belongs to
/// another disk.
pub fn open_published(
    major: u32,
    minor: u32,
    diskseq: Option<u64>,
) -> Result<Option<File>, DiskError> {
    let (path, _private) = node_for(major, minor)?;
    let (file, meta) = match open_node(&path, false) {
        Ok(opened) => opened,
        Err(DiskError::Io { source, .. })
            if matches!(
                source.raw_os_error(),
                Some(libc::ENXIO | libc::ENOENT | libc::ENODEV)
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    if sys::split_dev(meta.rdev()) != (major, minor) {
        return Err(DiskError::NotThatDevice { path, major, minor });
    }
    if let Some(want) = diskseq {
        if sys::diskseq(&file).map_err(io_err("BLKGETDISKSEQ"))? != want {
            return Ok(None);
        }
    }
    Ok(Some(file))
}

/// The diskseq the device `major:minor` carries now (for the explicitly
/// allowed, unsafe case of a script that publishes no diskseq).
pub fn current_diskseq(major: u32, minor: u32) -> Result<u64, DiskError> {
    let (path, _private) = node_for(major, minor)?;
    let f = File::open(&path).map_err(io_err(format!("opening {}", path.display())))?;
    sys::diskseq(&f).map_err(io_err("BLKGETDISKSEQ"))
}

/// Opens a block device by path and reads its identity from the same fd
/// (what a hotplug script publishes for a `params` naming a block device).
/// Anything but a block device is refused before it is opened.
pub fn identify(path: &Path, writable: bool) -> Result<OpenedDisk, DiskError> {
    let (file, meta) = open_node(path, writable)?;
    let (major, minor) = sys::split_dev(meta.rdev());
    let diskseq = sys::diskseq(&file).map_err(io_err("BLKGETDISKSEQ"))?;
    describe(
        file,
        DiskId {
            major,
            minor,
            diskseq,
        },
        writable,
    )
}

/// Opens a regular file to serve it directly (what a hotplug script
/// publishes for `direct:PATH`): no symlink in the last component, and a
/// regular file. Returns it with its identity, read from the same fd.
pub fn identify_file(path: &Path, writable: bool) -> Result<(File, FileId), DiskError> {
    let (file, meta) = open_file_node(path, writable)?;
    let id = FileId::of(&file, &meta)?;
    Ok((file, id))
}

/// Opens the regular file at `path` and checks it is still the file `id`
/// names (a file replaced under the same path, or an inode number reused, is
/// refused with both identities in the error). The fd pins that file.
pub fn open_file_by_id(path: &Path, id: FileId, writable: bool) -> Result<File, DiskError> {
    let (file, meta) = open_file_node(path, writable)?;
    let mut found = FileId::of(&file, &meta)?;
    if id.generation.is_none() {
        found.generation = None; // the script's file system had none either
    }
    if found != id {
        return Err(DiskError::FileReplaced {
            path: path.to_owned(),
            wanted: id,
            found,
        });
    }
    Ok(file)
}

/// A regular file at an absolute path, no symlink in the last component;
/// anything else is refused before it is opened.
fn open_file_node(path: &Path, writable: bool) -> Result<(File, std::fs::Metadata), DiskError> {
    if !path.is_absolute() {
        return Err(DiskError::Format {
            key: "physical-file",
            value: path.display().to_string(),
            want: "an absolute path",
        });
    }
    open_checked(path, NodeKind::File, writable, false)
}

fn describe(file: File, id: DiskId, writable: bool) -> Result<OpenedDisk, DiskError> {
    let size = sys::size_bytes(&file).map_err(io_err("BLKGETSIZE64"))?;
    let lbs = sys::logical_block_size(&file).map_err(io_err("BLKSSZGET"))?;
    let pbs = sys::physical_block_size(&file).map_err(io_err("BLKPBSZGET"))?;
    let ro = sys::read_only(&file).map_err(io_err("BLKROGET"))? || !writable;
    let sysfs = PathBuf::from(format!("/sys/dev/block/{}:{}", id.major, id.minor));
    if let Some(model) = zoned_model(&sysfs) {
        return Err(DiskError::Zoned {
            major: id.major,
            minor: id.minor,
            model,
        });
    }
    let (discard, discard_granularity, discard_alignment) = discard_limits(&sysfs, lbs.max(512));
    Ok(OpenedDisk {
        file,
        id,
        size,
        logical_block_size: lbs,
        physical_block_size: pbs,
        read_only: ro,
        discard,
        discard_granularity,
        discard_alignment,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zoned_devices_are_named_and_conventional_ones_pass() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(zoned_model(d.path()), None, "no sysfs entry: not zoned");
        std::fs::create_dir(d.path().join("queue")).unwrap();
        for (v, want) in [
            ("none\n", None),
            ("host-managed\n", Some("host-managed")),
            ("host-aware\n", Some("host-aware")),
        ] {
            std::fs::write(d.path().join("queue/zoned"), v).unwrap();
            assert_eq!(zoned_model(d.path()).as_deref(), want, "{v:?}");
        }
        let e = DiskError::Zoned {
            major: 259,
            minor: 3,
            model: "host-managed".into(),
        };
        assert!(
            e.to_string().contains("259:3 is zoned (host-managed)"),
            "{e}"
        );
        // Every loop device this kernel makes is conventional.
        assert_eq!(zoned_model(Path::new("/sys/dev/block/7:0")), None);
    }

    #[test]
    fn discard_limits_are_the_kernels_and_malformed_ones_are_safe() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("queue")).unwrap();
        let put = |f: &str, v: &str| std::fs::write(d.path().join(f), v).unwrap();
        // Nothing there: no discard, the smallest geometry.
        assert_eq!(discard_limits(d.path(), 512), (false, 512, 0));
        // A dm-thin volume of a pool with 64 KiB blocks.
        put("queue/discard_max_bytes", "17179869184\n");
        put("queue/discard_granularity", "65536\n");
        put("discard_alignment", "0\n");
        assert_eq!(discard_limits(d.path(), 512), (true, 65536, 0));
        // A granularity below the logical block is raised to it; an
        // alignment or granularity that does not fit is no claim at all.
        put("queue/discard_granularity", "512\n");
        put("discard_alignment", "99999999999\n");
        assert_eq!(discard_limits(d.path(), 4096), (true, 4096, 0));
        put("queue/discard_granularity", "garbage");
        put("queue/discard_max_bytes", "0\n");
        assert_eq!(discard_limits(d.path(), 512), (false, 512, 0));
    }

    /// Every value of `bad` is refused by `parse`.
    fn all_refused<T: fmt::Debug>(parse: impl Fn(&[u8]) -> Result<T, DiskError>, bad: &[&[u8]]) {
        for b in bad {
            assert!(parse(b).is_err(), "{:?}", String::from_utf8_lossy(b));
        }
    }

    #[test]
    fn physical_device_is_hex_major_colon_minor_and_nothing_else() {
        assert_eq!(parse_physical_device(b"7:1f").unwrap(), (7, 31));
        assert_eq!(parse_physical_device(b"fd:0").unwrap(), (253, 0));
        assert_eq!(parse_physical_device(b"103:10000").unwrap(), (259, 65536));
        all_refused(
            parse_physical_device,
            &[
                &b""[..],
                b"7",
                b"7:",
                b":1",
                b"7:1f ",
                b" 7:1f",
                b"7:1F",
                b"0x7:1",
                b"07:1",
                b"7:-1",
                b"7:1:2",
                b"100000000:0",
                b"7:1\n",
            ],
        );
    }

    #[test]
    fn diskseq_is_lower_case_hex_without_prefix_or_leading_zeros() {
        assert_eq!(parse_diskseq(b"1").unwrap(), 1);
        assert_eq!(parse_diskseq(b"2a").unwrap(), 42);
        assert_eq!(parse_diskseq(b"ffffffffffffffff").unwrap(), u64::MAX);
        all_refused(
            parse_diskseq,
            &[
                &b""[..],
                b"0",
                b"02a",
                b"0x2a",
                b"2A",
                b"42 ",
                b"-1",
                b"10000000000000000",
                b"g",
            ],
        );
    }

    #[test]
    fn file_id_is_strict_hex_with_an_optional_generation() {
        let id = FileId::parse(b"803:1a2b:7").unwrap();
        assert_eq!((id.dev, id.ino, id.generation), (0x803, 0x1a2b, Some(7)));
        assert_eq!(id.to_string(), "803:1a2b:7");
        let id = FileId::parse(b"803:1a2b").unwrap();
        assert_eq!(id.generation, None);
        assert_eq!(id.to_string(), "803:1a2b");
        all_refused(
            FileId::parse,
            &[
                &b""[..],
                b"803",
                b"803:",
                b"803:1a2b:",
                b"803:1a2b:7:1",
                b"803:1A2B",
                b"0803:1",
                b"803:1:100000000",
                b" 803:1",
                b"803:1\n",
            ],
        );
    }

    #[test]
    fn a_file_replaced_under_its_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let (_f, id) = identify_file(&p, true).unwrap();
        open_file_by_id(&p, id, true).unwrap();
        // Replace it: a new file under the same name.
        let q = dir.path().join("other.img");
        std::fs::write(&q, vec![1u8; 4096]).unwrap();
        std::fs::rename(&q, &p).unwrap();
        let e = open_file_by_id(&p, id, true).unwrap_err();
        assert!(matches!(e, DiskError::FileReplaced { .. }), "{e}");
        assert!(e.to_string().contains(&id.to_string()), "{e}");
        // Symlinks and non-files are refused.
        let l = dir.path().join("link.img");
        std::os::unix::fs::symlink(&p, &l).unwrap();
        assert!(identify_file(&l, false).is_err());
        assert!(identify_file(dir.path(), false).is_err());
        assert!(identify_file(Path::new("rel.img"), false).is_err());
    }

    /// Runs `f` on another thread; fails if it has not returned within 5 s
    /// (a FIFO opened for reading waits for a writer for ever).
    fn promptly<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()));
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("the open blocked")
    }

    #[test]
    fn a_node_of_the_wrong_type_is_refused_before_it_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let img = dir.path().join("a.img");
        std::fs::write(&img, [0u8; 512]).unwrap();
        let link = dir.path().join("link.img");
        std::os::unix::fs::symlink(&img, &link).unwrap();
        for (path, want, follow, found) in [
            (fifo.clone(), NodeKind::File, true, "a FIFO (named pipe)"),
            (fifo.clone(), NodeKind::Block, true, "a FIFO (named pipe)"),
            (
                "/dev/null".into(),
                NodeKind::File,
                true,
                "a character device",
            ),
            (
                "/dev/null".into(),
                NodeKind::Block,
                true,
                "a character device",
            ),
            (link.clone(), NodeKind::File, false, "a symbolic link"),
            (dir.path().to_owned(), NodeKind::File, true, "a directory"),
            (img.clone(), NodeKind::Block, true, "a regular file"),
        ] {
            for writable in [false, true] {
                let p = path.clone();
                let e = promptly(move || open_checked(&p, want, writable, follow)).unwrap_err();
                match &e {
                    DiskError::WrongType { found: f, .. } => assert_eq!(*f, found, "{e}"),
                    _ => panic!("{}: {e}", path.display()),
                }
                assert!(e.to_string().contains(found), "{e}");
            }
        }
        // The right type opens, through a symlink only when following.
        let (_f, meta) = open_checked(&link, NodeKind::File, true, true).unwrap();
        assert_eq!(meta.ino(), std::fs::metadata(&img).unwrap().ino());
        let e = identify_file(&fifo, false).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        let e = identify(Path::new("/dev/null"), false).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
    }

    #[test]
    fn formats_round_trip() {
        let id = DiskId {
            major: 259,
            minor: 65536,
            diskseq: 0x2a,
        };
        assert_eq!(id.physical_device(), "103:10000");
        assert_eq!(id.diskseq_hex(), "2a");
        assert_eq!(
            parse_physical_device(id.physical_device().as_bytes()).unwrap(),
            (259, 65536)
        );
        assert_eq!(parse_diskseq(id.diskseq_hex().as_bytes()).unwrap(), 42);
    }
}
