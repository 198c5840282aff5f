//! I/O engines behind the [`Disk`] trait.
//!
//! Today: [`MemDisk`], an in-memory disk for the ring tests and the demo. The
//! io_uring engine and its blocking fallback implement the same trait next.
#![forbid(unsafe_code)]

use std::io;
use std::sync::Mutex;

/// A disk the queue workers serve. Offsets and lengths are in bytes.
pub trait Disk: Send + Sync + 'static {
    /// Size in 512-byte sectors.
    fn sectors(&self) -> u64;
    /// Logical block size in bytes (512 or 4096).
    fn logical_block_size(&self) -> u32 {
        512
    }
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Reads `buf.len()` bytes at `off`.
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `buf` at `off`.
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Discards a range (reads of it return zeroes afterwards).
    fn discard(&self, off: u64, len: u64) -> io::Result<()>;
}

/// A disk held in memory.
#[derive(Debug)]
pub struct MemDisk {
    data: Mutex<Vec<u8>>,
    read_only: bool,
}

impl MemDisk {
    /// A zeroed disk of `sectors` 512-byte sectors.
    pub fn new(sectors: u64, read_only: bool) -> MemDisk {
        MemDisk {
            data: Mutex::new(vec![0u8; (sectors * 512) as usize]),
            read_only,
        }
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
        let r = self.range(off, buf.len() as u64)?;
        buf.copy_from_slice(&self.lock()[r]);
        Ok(())
    }

    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
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
