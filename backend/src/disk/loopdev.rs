//! Loop devices for file-backed disks, made and released so that a stale
//! (dev_t, diskseq) can never reach the next user of the same loop minor.
//!
//! Attach: `LOOP_CTL_GET_FREE` (later tries: `LOOP_CTL_ADD`), open the device
//! with `O_EXCL`, `LOOP_CONFIGURE` in one step with an explicit block size,
//! read the diskseq on the same fd. Another process may win the free device
//! between the two steps (`GET_FREE` can hand out one being configured), so a
//! bounded number of retries follows. Release: `LOOP_CLR_FD`, close, then
//! confirm the diskseq moved on (the kernel bumps it on the final detach).
//!
//! Deliberate choices:
//! - Our own loop ioctls, not `losetup` or a loop library: the `O_EXCL` fd
//!   that ran `LOOP_CONFIGURE` must be the one that reads the diskseq and pins
//!   the device, which a tool that exits with the device closed cannot give.
//! - No udev: `/dev/loopN` is opened by number (devtmpfs makes it) and checked
//!   by diskseq, so nothing waits for udev's events or symlinks.
#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{io_err, sys, DiskError, DiskId};

/// The loop block major.
pub const LOOP_MAJOR: u32 = 7;
const CONTROL: &str = "/dev/loop-control";
const ATTEMPTS: usize = 8;
/// What our loop devices' `lo_file_name` starts with (see
/// [`sys::LoopConfig::with_owner`]), so that a restarted daemon can tell the
/// ones a crash left behind from everyone else's.
pub const OWNER: &[u8] = b"blkbackd:";

/// How to set a loop device up.
#[derive(Clone, Debug)]
pub struct LoopOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// Logical block size, always given explicitly (with 0 and direct I/O the
    /// kernel may pick 4096 behind the guest's back).
    pub block_size: u32,
    /// Bypass the page cache of the backing file.
    pub direct_io: bool,
    /// Detach by itself on the last close.
    pub autoclear: bool,
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions {
            read_only: false,
            block_size: 512,
            direct_io: false,
            autoclear: false,
        }
    }
}

/// A loop device we configured; the fd we hold keeps it ours.
#[derive(Debug)]
pub struct LoopDevice {
    file: Option<File>,
    /// Its identity at attach time.
    pub id: DiskId,
    /// Its node.
    pub path: PathBuf,
    /// The backing file.
    pub backing: PathBuf,
}

/// Refuses a loop device whose diskseq did not move when it was attached.
/// The identity every later step checks (the daemon's open, `remove`'s
/// release, adoption) is (dev_t, diskseq): on a kernel that does not move
/// the diskseq when a loop device is reused (Linux moves it since 5.15),
/// the next user's disk on the same minor would pass for ours.
fn check_bumped(n: u32, before: u64, after: u64) -> io::Result<()> {
    if after != before {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "/dev/loop{n} kept diskseq {after} when it was attached: this kernel does not \
         move a loop device's diskseq on reuse, so a reused loop device could not be told \
         from the one published; refusing to make loop devices (use direct: or a block device)"
    )))
}

fn retryable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBUSY | libc::ENXIO | libc::ENOENT | libc::EAGAIN)
    )
}

fn open_loop(n: u32, writable: bool, excl: bool) -> io::Result<File> {
    let mut flags = libc::O_CLOEXEC | libc::O_NOCTTY;
    if excl {
        flags |= libc::O_EXCL;
    }
    OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(flags)
        .open(format!("/dev/loop{n}"))
}

/// Opens the regular file a loop device is to read and write (anything else
/// is refused before it is opened: a FIFO would block, a device's driver would
/// run).
pub fn open_backing(backing: &Path, opts: &LoopOptions) -> Result<File, DiskError> {
    super::open_checked(backing, super::NodeKind::File, !opts.read_only, true).map(|(f, _)| f)
}

/// Attaches the regular file `backing` to a free loop device.
pub fn attach(backing: &Path, opts: &LoopOptions) -> Result<LoopDevice, DiskError> {
    attach_file(&open_backing(backing, opts)?, backing, opts)
}

/// Attaches the open file `back` (opened by [`open_backing`], so that what
/// was checked is what is attached) to a free loop device; `backing` is its
/// name, for messages and `lo_file_name`.
pub fn attach_file(
    back: &File,
    backing: &Path,
    opts: &LoopOptions,
) -> Result<LoopDevice, DiskError> {
    let ctl = File::open(CONTROL).map_err(io_err(format!("opening {CONTROL}")))?;
    let mut last = None;
    for attempt in 0..ATTEMPTS {
        let n = if attempt == 0 {
            sys::loop_ctl_get_free(&ctl)
        } else {
            sys::loop_ctl_add(&ctl)
        }
        .map_err(io_err("asking /dev/loop-control for a free loop device"))?;
        match configure(n, back, backing, opts) {
            Ok(dev) => return Ok(dev),
            Err(e) if retryable(&e) => {
                tracing::debug!(
                    loop_dev = n,
                    "loop device taken by another process, retrying: {e}"
                );
                last = Some(e);
            }
            Err(e) => return Err(io_err(format!("configuring /dev/loop{n}"))(e)),
        }
    }
    Err(io_err(format!("no loop device after {ATTEMPTS} attempts"))(
        last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EBUSY)),
    ))
}

/// Attaches `backing` to loop device `n` exactly (for tests that need a given minor).
pub fn attach_at(n: u32, backing: &Path, opts: &LoopOptions) -> Result<LoopDevice, DiskError> {
    let back = open_backing(backing, opts)?;
    configure(n, &back, backing, opts).map_err(io_err(format!("configuring /dev/loop{n}")))
}

fn configure(n: u32, back: &File, backing: &Path, opts: &LoopOptions) -> io::Result<LoopDevice> {
    let dev = open_loop(n, !opts.read_only, true)?;
    let before = sys::diskseq(&dev)?;
    let mut flags = 0;
    if opts.read_only {
        flags |= sys::LO_FLAGS_READ_ONLY;
    }
    if opts.autoclear {
        flags |= sys::LO_FLAGS_AUTOCLEAR;
    }
    if opts.direct_io {
        flags |= sys::LO_FLAGS_DIRECT_IO;
    }
    let cfg =
        sys::LoopConfig::new(back.as_raw_fd(), opts.block_size, flags, backing).with_owner(OWNER);
    sys::loop_configure(&dev, &cfg)?;
    let diskseq = sys::diskseq(&dev)?;
    if let Err(e) = check_bumped(n, before, diskseq) {
        // Undo the attach: nothing of ours stays on a device we refuse.
        let _ = sys::loop_clr_fd(&dev);
        return Err(e);
    }
    Ok(LoopDevice {
        file: Some(dev),
        id: DiskId {
            major: LOOP_MAJOR,
            minor: n,
            diskseq,
        },
        path: PathBuf::from(format!("/dev/loop{n}")),
        backing: backing.to_owned(),
    })
}

impl LoopDevice {
    /// The open device (it pins this exact disk).
    pub fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    /// Gives up our fd without releasing the device: it stays attached (with
    /// nothing pinning it) until someone releases it by identity
    /// ([`release_by_id`]), as `hotplug remove` does.
    pub fn keep(mut self) -> DiskId {
        self.file = None;
        self.id
    }

    /// Tells the loop device its backing file changed size (`LOOP_SET_CAPACITY`).
    pub fn refresh_capacity(&self) -> Result<(), DiskError> {
        let f = self.file.as_ref().ok_or_else(|| {
            io_err("refreshing a released loop device")(io::Error::from_raw_os_error(libc::EBADF))
        })?;
        sys::loop_set_capacity(f)
            .map(drop)
            .map_err(io_err("LOOP_SET_CAPACITY"))
    }

    /// Detaches the device and confirms its diskseq moved on, so the old
    /// (dev_t, diskseq) can never open the next user's disk. Returns the new
    /// diskseq. Fails if someone else still holds the device open (the kernel
    /// then detaches at their last close).
    pub fn release(mut self) -> Result<u64, DiskError> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<u64, DiskError> {
        let Some(f) = self.file.take() else {
            return Ok(self.id.diskseq);
        };
        clear_and_confirm(f, self.id)
    }
}

/// Makes loop device `id` (checked by diskseq) pick up its backing file's new
/// size (`LOOP_SET_CAPACITY`, what `losetup -c` does).
pub fn refresh_capacity_of(id: DiskId) -> Result<(), DiskError> {
    let f = open_loop(id.minor, false, false)
        .map_err(io_err(format!("opening /dev/loop{}", id.minor)))?;
    let seq = sys::diskseq(&f).map_err(io_err("BLKGETDISKSEQ"))?;
    if seq != id.diskseq || id.major != LOOP_MAJOR {
        return Err(DiskError::Reused {
            major: id.major,
            minor: id.minor,
            wanted: id.diskseq,
            found: seq,
        });
    }
    sys::loop_set_capacity(&f)
        .map(drop)
        .map_err(io_err("LOOP_SET_CAPACITY"))
}

/// Releases the loop device `id` names, if it still is that device: `None`
/// if it was already released (its diskseq moved on), else the new diskseq.
/// What `hotplug remove` uses: it can never detach someone else's device.
pub fn release_by_id(id: DiskId) -> Result<Option<u64>, DiskError> {
    let path = format!("/dev/loop{}", id.minor);
    let f = match open_loop(id.minor, false, false) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(io_err(format!("opening {path}"))(e)),
    };
    let seq = sys::diskseq(&f).map_err(io_err(format!("BLKGETDISKSEQ on {path}")))?;
    if seq != id.diskseq || id.major != LOOP_MAJOR {
        return Ok(None);
    }
    clear_and_confirm(f, id).map(Some)
}

/// `LOOP_CLR_FD` on `f`, close it, and wait (bounded) for the diskseq to move.
fn clear_and_confirm(f: File, id: DiskId) -> Result<u64, DiskError> {
    let path = format!("/dev/loop{}", id.minor);
    match sys::loop_clr_fd(&f) {
        Ok(_) => {}
        // Already detached (autoclear, or someone else cleared it).
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
        Err(e) => return Err(io_err(format!("LOOP_CLR_FD on {path}"))(e)),
    }
    drop(f);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seq = open_loop(id.minor, false, false)
            .and_then(|f| sys::diskseq(&f))
            .map_err(io_err(format!("re-reading the diskseq of {path}")))?;
        if seq != id.diskseq {
            return Ok(seq);
        }
        if Instant::now() > deadline {
            return Err(io_err(format!(
                "{path} is still attached (diskseq {seq}): another process holds it open"
            ))(io::Error::from_raw_os_error(libc::EBUSY)));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if self.file.is_some() {
            if let Err(e) = self.release_inner() {
                tracing::warn!("releasing {}: {e}", self.path.display());
            }
        }
    }
}

/// The file loop device `dev` (an open loop node) reads and writes: the
/// (major, minor) of its file system and its inode, as `LOOP_GET_STATUS64`
/// reports them; `None` when nothing is attached.
pub fn backing_of(dev: &File) -> io::Result<Option<((u32, u32), u64)>> {
    match sys::loop_status(dev) {
        Ok(info) => Ok(Some((super::dm::decode_dev(info.lo_device), info.lo_inode))),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// One of our loop devices, found by [`ours`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// Its identity now.
    pub id: DiskId,
    /// Its backing file, as sysfs names it.
    pub backing: PathBuf,
}

/// The attached loop devices that carry our [`OWNER`] mark.
pub fn ours() -> Vec<Found> {
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix("loop"))
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Only attached devices have a backing file.
        let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        let Ok(f) = open_loop(n, false, false) else {
            continue;
        };
        let (Ok(info), Ok(diskseq)) = (sys::loop_status(&f), sys::diskseq(&f)) else {
            continue;
        };
        if info.lo_file_name.starts_with(OWNER) {
            out.push(Found {
                id: DiskId {
                    major: LOOP_MAJOR,
                    minor: n,
                    diskseq,
                },
                backing: PathBuf::from(backing.trim_end_matches('\n')),
            });
        }
    }
    out
}

/// Start-up reconciliation: releases our loop devices for which `claimed`
/// is false (left by a crash between a block script's `add` and its
/// `remove`), among those `in_scope` (everything, for the daemon). A device
/// still open elsewhere is marked to detach on its last close. Returns what
/// was released or marked.
pub fn reconcile(
    claimed: impl Fn(DiskId) -> bool,
    in_scope: impl Fn(&Found) -> bool,
) -> Vec<Found> {
    let mut out = Vec::new();
    for f in ours() {
        if claimed(f.id) || !in_scope(&f) {
            continue;
        }
        match release_by_id(f.id) {
            Ok(_) => out.push(f),
            Err(e) => {
                tracing::warn!(dev = %f.id, "unclaimed loop device not released now: {e}");
                out.push(f);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_device_whose_diskseq_stayed_put_is_refused_with_the_reason() {
        // The kernel's answers injected: moved (this kernel), and kept.
        assert!(check_bumped(3, 41, 42).is_ok());
        let e = check_bumped(3, 42, 42).unwrap_err();
        assert!(!retryable(&e), "another loop device would not do better");
        let msg = e.to_string();
        assert!(
            msg.contains("/dev/loop3 kept diskseq 42")
                && msg.contains("refusing to make loop devices"),
            "{msg}"
        );
    }
}
