//! A ring's pool of page-aligned bounce buffers.
//!
//! One anonymous mapping, handed out in runs of whole 4 KiB pages. A run is a
//! [`Buf`], a unique token: whoever holds it may touch those bytes, and an
//! I/O engine takes it for the life of a request's I/O and gives it back with
//! the completion, so a buffer the kernel may still be writing is never read,
//! reused or freed. The pool is sized once per ring, which bounds the memory a
//! guest can make us use; a request that does not fit waits for buffers to
//! come back (it never fails for it).
#![allow(unsafe_code)]

use std::io;
use std::ptr::NonNull;
use std::sync::Mutex;

/// Granularity of the pool (and the alignment `O_DIRECT` needs).
pub const POOL_PAGE: usize = 4096;

/// A run of pages of a [`BouncePool`], owned by one request.
#[derive(Debug)]
pub struct Buf {
    first: usize,
    pages: usize,
    len: usize,
}

impl Buf {
    /// Bytes in use (at most `pages * 4096`).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Offset of the buffer in the pool.
    pub fn pool_offset(&self) -> usize {
        self.first * POOL_PAGE
    }
}

/// Bytes reserved by every bounce pool alive in this process.
static RESERVED_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Bytes reserved by every bounce pool alive now (each ring's, for as long
/// as the ring is connected): the daemon's memory bound for request data.
pub fn reserved_bytes() -> usize {
    RESERVED_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Page-aligned memory for a ring's in-flight requests.
pub struct BouncePool {
    base: NonNull<u8>,
    pages: usize,
    used: Mutex<Vec<bool>>,
    /// Pages handed out now (kept beside the bitmap for cheap reading).
    in_use: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for BouncePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BouncePool")
            .field("pages", &self.pages)
            .field("in_use", &self.in_use())
            .finish()
    }
}

// SAFETY: the mapping is owned by the pool and valid until drop; every byte is
// reachable only through a unique `Buf` token (see `slice`/`slice_mut`), so
// sharing the pool between threads cannot create aliasing access.
unsafe impl Send for BouncePool {}
// SAFETY: as above; the allocation bitmap is behind a mutex.
unsafe impl Sync for BouncePool {}

impl BouncePool {
    /// A pool of `pages` pages (touched lazily: unused pages cost nothing).
    pub fn new(pages: usize) -> io::Result<BouncePool> {
        let len = pages
            .checked_mul(POOL_PAGE)
            .filter(|&l| l > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad bounce pool size"))?;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        RESERVED_BYTES.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        Ok(BouncePool {
            base,
            pages,
            used: Mutex::new(vec![false; pages]),
            in_use: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Pages in the pool.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Pages handed out now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The whole region, for registering it with io_uring.
    pub fn region(&self) -> (*mut u8, usize) {
        (self.base.as_ptr(), self.pages * POOL_PAGE)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<bool>> {
        self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A run of pages holding `len` bytes (first fit), or `None` while the
    /// pool is too full.
    pub fn alloc(&self, len: usize) -> Option<Buf> {
        let pages = len.div_ceil(POOL_PAGE).max(1);
        if pages > self.pages {
            return None;
        }
        let mut used = self.lock();
        let mut run = 0;
        for i in 0..self.pages {
            if used[i] {
                run = 0;
                continue;
            }
            run += 1;
            if run == pages {
                let first = i + 1 - pages;
                used[first..=i].fill(true);
                self.in_use
                    .fetch_add(pages, std::sync::atomic::Ordering::Relaxed);
                return Some(Buf { first, pages, len });
            }
        }
        None
    }

    /// Gives a run back.
    pub fn free(&self, buf: Buf) {
        self.lock()[buf.first..buf.first + buf.pages].fill(false);
        self.in_use
            .fetch_sub(buf.pages, std::sync::atomic::Ordering::Relaxed);
    }

    /// The bytes of `buf`.
    pub fn slice<'a>(&'a self, buf: &'a Buf) -> &'a [u8] {
        assert!(
            buf.first + buf.pages <= self.pages,
            "buffer of another pool"
        );
        // SAFETY: the run lies inside the mapping (checked above, and `Buf`s are
        // only made by `alloc`); the token is unique and borrowed for the life
        // of the slice, so no `&mut` to these bytes exists meanwhile, and no I/O
        // is in flight on it (an engine holds the token while it is).
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(buf.pool_offset()), buf.len) }
    }

    /// The bytes of `buf`, writable.
    pub fn slice_mut<'a>(&'a self, buf: &'a mut Buf) -> &'a mut [u8] {
        assert!(
            buf.first + buf.pages <= self.pages,
            "buffer of another pool"
        );
        // SAFETY: as in `slice`; the token is borrowed mutably, so this is the
        // only reference to the run.
        unsafe {
            std::slice::from_raw_parts_mut(self.base.as_ptr().add(buf.pool_offset()), buf.len)
        }
    }

    /// Where `buf` starts, for handing to the kernel while the token is held.
    pub fn ptr(&self, buf: &Buf) -> *mut u8 {
        assert!(
            buf.first + buf.pages <= self.pages,
            "buffer of another pool"
        );
        // SAFETY: in bounds of the mapping, as checked above.
        unsafe { self.base.as_ptr().add(buf.pool_offset()) }
    }
}

impl Drop for BouncePool {
    fn drop(&mut self) {
        // SAFETY: our own mapping; no `Buf` can outlive the pool's users (the
        // engines keep the pool alive while I/O is in flight).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.pages * POOL_PAGE);
        }
        RESERVED_BYTES.fetch_sub(self.pages * POOL_PAGE, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_never_overlap_and_come_back() {
        let p = BouncePool::new(8).unwrap();
        let mut a = p.alloc(3 * POOL_PAGE).unwrap();
        let mut b = p.alloc(POOL_PAGE + 1).unwrap();
        assert_eq!(p.in_use(), 5);
        p.slice_mut(&mut a).fill(1);
        p.slice_mut(&mut b).fill(2);
        assert!(p.slice(&a).iter().all(|&x| x == 1));
        assert!(p.slice(&b).iter().all(|&x| x == 2));
        assert_eq!(p.ptr(&a) as usize % POOL_PAGE, 0);
        assert_eq!(p.ptr(&b) as usize % POOL_PAGE, 0);
        // Four pages do not fit in the three that are left.
        assert!(p.alloc(4 * POOL_PAGE).is_none());
        p.free(a);
        // Three free pages on each side of `b`: still no run of four.
        assert!(p.alloc(4 * POOL_PAGE).is_none());
        p.free(b);
        let c = p.alloc(4 * POOL_PAGE).unwrap();
        assert_eq!(c.pool_offset(), 0);
        assert!(p.alloc(5 * POOL_PAGE).is_none());
        p.free(c);
        assert_eq!(p.in_use(), 0);
    }
}
