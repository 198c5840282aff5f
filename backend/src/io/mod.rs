//! Disks and the I/O engines that serve them.
//!
//! A [`Disk`] is what a vbd serves: [`FileDisk`] (a regular file, or a block
//! device opened by diskseq) or [`MemDisk`] (in memory, for tests and the
//! demo). The [`engine`]s move a ring's data between its bounce [`pool`] and
//! the disk: io_uring ([`uring`]) where it can, blocking I/O on a worker
//! thread where it cannot.
#![deny(unsafe_code)]

pub mod engine;
pub mod op;
pub mod pool;
pub mod rbd;
pub mod thread;
pub mod uring;
pub mod wait;

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::disk::{sys, OpenedDisk};

/// A disk the queue workers serve. Offsets and lengths are in bytes.
pub trait Disk: Send + Sync + 'static {
    /// Size in 512-byte sectors.
    fn sectors(&self) -> u64;
    /// Logical block size in bytes (512 or 4096).
    fn logical_block_size(&self) -> u32 {
        512
    }
    /// Physical block size in bytes (never less than the logical one).
    fn physical_block_size(&self) -> u32 {
        self.logical_block_size()
    }
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Re-reads the size (after a grown dm table or a refreshed loop device)
    /// and returns it; [`Disk::sectors`] reports it from then on.
    fn refresh_sectors(&self) -> io::Result<u64> {
        Ok(self.sectors())
    }
    /// Whether [`Disk::discard`] works.
    fn can_discard(&self) -> bool {
        !self.read_only()
    }
    /// The unit discards free space in, bytes (a guest's smaller discards
    /// free nothing): the device's own, never less than a logical block.
    fn discard_granularity(&self) -> u32 {
        self.logical_block_size()
    }
    /// Where the first discard unit starts, bytes.
    fn discard_alignment(&self) -> u32 {
        0
    }
    /// Reads `buf.len()` bytes at `off`.
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `buf` at `off`.
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Discards a range (reads of it return zeroes afterwards).
    fn discard(&self, off: u64, len: u64) -> io::Result<()>;
    /// The descriptors io_uring can use, valid while the disk lives; `None`
    /// for a disk that is not a file.
    fn uring_target(&self) -> Option<UringTarget> {
        None
    }
    /// The Ceph RBD image, for a disk that is one (served by librbd's own
    /// asynchronous requests).
    fn rbd_image(&self) -> Option<Arc<crate::rbd::Image>> {
        None
    }
}

/// How a disk discards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscardKind {
    /// `fallocate(PUNCH_HOLE)` on a regular file.
    PunchHole,
    /// `BLKDISCARD` on a block device.
    Block,
    /// Not supported.
    None,
}

/// What the io_uring engine needs of a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UringTarget {
    /// The buffered descriptor (also used for flushes and hole punching).
    pub fd: RawFd,
    /// An `O_DIRECT` descriptor of the same disk and the alignment (offset,
    /// length and memory) it needs.
    pub direct: Option<(RawFd, u32)>,
    /// How discards are done.
    pub discard: DiscardKind,
}

/// A disk held in memory.
#[derive(Debug)]
pub struct MemDisk {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    /// Byte ranges whose reads and writes fail with EIO (fault injection).
    failing: Mutex<Vec<std::ops::Range<u64>>>,
}

impl MemDisk {
    /// A zeroed disk of `sectors` 512-byte sectors.
    pub fn new(sectors: u64, read_only: bool) -> MemDisk {
        MemDisk {
            data: Mutex::new(vec![0u8; (sectors * 512) as usize]),
            read_only,
            failing: Mutex::new(Vec::new()),
        }
    }

    /// Makes I/O touching sectors `first..first + count` fail with EIO, as a
    /// failing medium does.
    pub fn fail_sectors(&self, first: u64, count: u64) {
        self.failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(first * 512..(first + count) * 512);
    }

    fn check_fault(&self, off: u64, len: u64) -> io::Result<()> {
        let end = off.saturating_add(len);
        let failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        if failing.iter().any(|r| off < r.end && r.start < end) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    /// A copy of the contents (for checks).
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn range(&self, off: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let size = self.lock().len() as u64;
        match off.checked_add(len) {
            Some(end) if end <= size => Ok(off as usize..end as usize),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "beyond the end of the disk",
            )),
        }
    }
}

impl Disk for MemDisk {
    fn sectors(&self) -> u64 {
        self.lock().len() as u64 / 512
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_fault(off, buf.len() as u64)?;
        let r = self.range(off, buf.len() as u64)?;
        buf.copy_from_slice(&self.lock()[r]);
        Ok(())
    }

    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.check_fault(off, buf.len() as u64)?;
        let r = self.range(off, buf.len() as u64)?;
        self.lock()[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        let r = self.range(off, len)?;
        self.lock()[r].fill(0);
        Ok(())
    }
}

/// A regular file or a block device, with positioned blocking I/O.
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    sectors: AtomicU64,
    block_device: bool,
    lbs: u32,
    pbs: u32,
    read_only: bool,
    discard: DiscardKind,
    /// Discard granularity and alignment in bytes.
    discard_geometry: (u32, u32),
    /// The same disk opened with `O_DIRECT`, and its alignment.
    direct: Option<(File, u32)>,
    _pin: Option<crate::disk::loopdev::LoopDevice>,
}

impl FileDisk {
    /// A block device opened and verified by diskseq.
    pub fn from_opened(d: OpenedDisk) -> FileDisk {
        FileDisk {
            sectors: AtomicU64::new(d.size / 512),
            block_device: true,
            lbs: d.logical_block_size.max(512),
            pbs: d.physical_block_size.max(d.logical_block_size).max(512),
            read_only: d.read_only,
            discard: if d.discard {
                DiscardKind::Block
            } else {
                DiscardKind::None
            },
            discard_geometry: (d.discard_granularity, d.discard_alignment),
            file: d.file,
            direct: None,
            _pin: None,
        }
        .with_direct()
    }

    /// Keeps a loop device alive (and released on drop) for as long as the disk.
    pub fn pinning(mut self, dev: crate::disk::loopdev::LoopDevice) -> FileDisk {
        self._pin = Some(dev);
        self
    }

    /// A regular file served directly (no loop device).
    pub fn open_file(path: &Path, read_only: bool) -> io::Result<FileDisk> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)?;
        FileDisk::from_file(file, read_only)
    }

    /// An open regular file served directly (opened and verified by
    /// [`crate::disk::open_file_by_id`]).
    pub fn from_file(file: File, read_only: bool) -> io::Result<FileDisk> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata()?;
        let len = meta.len();
        // A punched hole frees whole file system blocks: st_blksize is the
        // file system's block (a power of two, 512 at least, else 4096).
        let block = u32::try_from(meta.blksize())
            .ok()
            .filter(|b| b.is_power_of_two() && (512..=1 << 20).contains(b))
            .unwrap_or(4096);
        Ok(FileDisk {
            file,
            sectors: AtomicU64::new(len / 512),
            block_device: false,
            lbs: 512,
            pbs: 512,
            read_only,
            discard: DiscardKind::PunchHole,
            discard_geometry: (block, 0),
            direct: None,
            _pin: None,
        }
        .with_direct())
    }

    /// Opens the same disk again with `O_DIRECT` (through `/proc/self/fd`, so
    /// it is the very inode we verified), for the aligned requests of the
    /// io_uring engine. A file system without direct I/O just leaves it off.
    fn with_direct(mut self) -> FileDisk {
        let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(!self.read_only)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(&path);
        match opened {
            Ok(f) => {
                // The logical block size of the device (or of the device the
                // file lives on), and never less than the pool's page
                // alignment requirement for memory.
                let align = if self.block_device {
                    self.lbs
                } else {
                    sys::dio_alignment(&f).unwrap_or(4096)
                };
                self.direct = Some((f, align.max(512)));
            }
            Err(e) => tracing::debug!("no O_DIRECT for this disk ({e}): buffered I/O only"),
        }
        self
    }

    /// Whether an `O_DIRECT` descriptor is open.
    pub fn has_direct(&self) -> bool {
        self.direct.is_some()
    }
}

impl Disk for FileDisk {
    fn sectors(&self) -> u64 {
        self.sectors.load(Ordering::Relaxed)
    }

    fn refresh_sectors(&self) -> io::Result<u64> {
        let bytes = if self.block_device {
            sys::size_bytes(&self.file)?
        } else {
            self.file.metadata()?.len()
        };
        self.sectors.store(bytes / 512, Ordering::Relaxed);
        Ok(bytes / 512)
    }

    fn logical_block_size(&self) -> u32 {
        self.lbs
    }

    fn physical_block_size(&self) -> u32 {
        self.pbs
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn can_discard(&self) -> bool {
        !self.read_only && self.discard != DiscardKind::None
    }

    fn discard_granularity(&self) -> u32 {
        self.discard_geometry.0.max(self.lbs)
    }

    fn discard_alignment(&self) -> u32 {
        self.discard_geometry.1
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }

    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.file.write_all_at(buf, off)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        match self.discard {
            DiscardKind::PunchHole => sys::punch_hole(&self.file, off, len),
            // A loop device we pinned is held with O_EXCL, and the kernel
            // refuses BLKDISCARD (EBUSY) through any other descriptor while
            // someone holds that claim: discard through the claiming one.
            DiscardKind::Block => {
                let f = self
                    ._pin
                    .as_ref()
                    .and_then(|p| p.file())
                    .unwrap_or(&self.file);
                sys::blk_discard(f, off, len, false)
            }
            DiscardKind::None => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        }
    }

    fn uring_target(&self) -> Option<UringTarget> {
        Some(UringTarget {
            fd: self.file.as_raw_fd(),
            direct: self.direct.as_ref().map(|(f, a)| (f.as_raw_fd(), *a)),
            discard: if self.read_only {
                DiscardKind::None
            } else {
                self.discard
            },
        })
    }
}

/// The disk a vbd serves in the daemon: a file or block device, or an RBD
/// image (one type, so that the serving loop is not generic over both).
#[derive(Debug)]
pub enum ServedDisk {
    /// A file or a block device.
    File(FileDisk),
    /// A Ceph RBD image.
    Rbd(rbd::RbdDisk),
}

macro_rules! each {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            ServedDisk::File($d) => $e,
            ServedDisk::Rbd($d) => $e,
        }
    };
}

impl Disk for ServedDisk {
    fn sectors(&self) -> u64 {
        each!(self, d => d.sectors())
    }
    fn logical_block_size(&self) -> u32 {
        each!(self, d => d.logical_block_size())
    }
    fn physical_block_size(&self) -> u32 {
        each!(self, d => d.physical_block_size())
    }
    fn read_only(&self) -> bool {
        each!(self, d => d.read_only())
    }
    fn refresh_sectors(&self) -> io::Result<u64> {
        each!(self, d => d.refresh_sectors())
    }
    fn can_discard(&self) -> bool {
        each!(self, d => d.can_discard())
    }
    fn discard_granularity(&self) -> u32 {
        each!(self, d => d.discard_granularity())
    }
    fn discard_alignment(&self) -> u32 {
        each!(self, d => d.discard_alignment())
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        each!(self, d => d.read_at(off, buf))
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        each!(self, d => d.write_at(off, buf))
    }
    fn flush(&self) -> io::Result<()> {
        each!(self, d => d.flush())
    }
    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        each!(self, d => d.discard(off, len))
    }
    fn uring_target(&self) -> Option<UringTarget> {
        each!(self, d => d.uring_target())
    }
    fn rbd_image(&self) -> Option<Arc<crate::rbd::Image>> {
        each!(self, d => d.rbd_image())
    }
}
