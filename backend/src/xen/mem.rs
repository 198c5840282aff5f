//! Memory shared with a guest: mapped grants, ring pages, simulated guest frames.
//!
//! The only door to guest-shared memory. The guest may change any byte at any
//! moment, so nothing here hands out a Rust reference into the region: every
//! access is an atomic load or store of the exact width wanted, or a copy made
//! of such accesses. A racing guest can make us read garbage, never undefined
//! behaviour; the ring engine copies once and validates the copy.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, Ordering};

use crate::abi::blkif::XEN_PAGE_SIZE;
use crate::ring::RingMem;

type OnDrop = Box<dyn FnOnce() + Send + Sync>;

/// A mapping of memory shared with a guest. Unmapped when dropped.
pub struct SharedMem {
    ptr: NonNull<u8>,
    len: usize,
    /// Runs after the munmap (e.g. gntdev's UNMAP_GRANT_REF).
    on_drop: Option<OnDrop>,
}

impl std::fmt::Debug for SharedMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMem")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: the region is only ever accessed through atomic operations, which are
// sound from any thread; the pointer stays valid until drop unmaps it.
unsafe impl Send for SharedMem {}
// SAFETY: as above: `&SharedMem` only allows atomic accesses.
unsafe impl Sync for SharedMem {}

fn prot(writable: bool) -> libc::c_int {
    if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    }
}

impl SharedMem {
    /// Anonymous shared memory (for tests and the simulated guest's own pages).
    pub fn anonymous(len: usize) -> io::Result<SharedMem> {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        Self::from_mmap(p, len)
    }

    /// Maps `len` bytes of `fd` at `offset` (a gntdev index, a file offset).
    pub fn map_fd(
        fd: &impl AsRawFd,
        offset: u64,
        len: usize,
        writable: bool,
    ) -> io::Result<SharedMem> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a new shared mapping of a file we hold open; the kernel checks
        // the range and the permissions, and no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot(writable),
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        Self::from_mmap(p, len)
    }

    /// Maps pages of `file` (page numbers `frames`) side by side into one
    /// contiguous region, as mapping several grants at once does.
    pub fn map_frames(file: &File, frames: &[u64], writable: bool) -> io::Result<SharedMem> {
        let len = frames
            .len()
            .checked_mul(XEN_PAGE_SIZE)
            .filter(|&l| l > 0)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        // Reserve the whole range first, then put each frame in its place.
        // SAFETY: a fresh PROT_NONE reservation; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let region = Self::from_mmap(base, len)?;
        for (i, &frame) in frames.iter().enumerate() {
            let off = frame
                .checked_mul(XEN_PAGE_SIZE as u64)
                .and_then(|o| libc::off_t::try_from(o).ok())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: the target page lies inside `region`, which we own and which
            // nothing else refers to yet; MAP_FIXED replaces only that page.
            let p = unsafe {
                libc::mmap(
                    region.ptr.as_ptr().add(i * XEN_PAGE_SIZE).cast(),
                    XEN_PAGE_SIZE,
                    prot(writable),
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    file.as_raw_fd(),
                    off,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(region)
    }

    fn from_mmap(p: *mut libc::c_void, len: usize) -> io::Result<SharedMem> {
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast()).ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        Ok(SharedMem {
            ptr,
            len,
            on_drop: None,
        })
    }

    /// Runs `f` after the region is unmapped (for device-side cleanup).
    pub fn with_on_drop(mut self, f: impl FnOnce() + Send + Sync + 'static) -> SharedMem {
        self.on_drop = Some(Box::new(f));
        self
    }

    /// The mapping's size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address of the mapping (for handing to the kernel, e.g. grant copy).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, off: usize, width: usize) {
        assert!(
            off.checked_add(width).is_some_and(|end| end <= self.len),
            "shared-memory access {off}+{width} outside a {}-byte mapping",
            self.len
        );
    }

    fn atomic_u32(&self, off: usize) -> &AtomicU32 {
        self.check(off, 4);
        assert_eq!(off % 4, 0, "unaligned u32 access");
        // SAFETY: in bounds and aligned (checked above); the memory lives as long
        // as `self`, and is only accessed atomically, so a reference to the atomic
        // (not to plain data) is sound even while the guest writes it.
        unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(off).cast()) }
    }

    /// Reads `dst.len()` bytes at `off`, word by word where aligned. The copy is
    /// what callers validate; the shared bytes may change right after.
    pub fn read(&self, off: usize, dst: &mut [u8]) {
        self.check(off, dst.len());
        let base = self.ptr.as_ptr();
        let mut i = 0;
        while i < dst.len() {
            let at = off + i;
            if at.is_multiple_of(8) && dst.len() - i >= 8 {
                // SAFETY: in bounds (checked) and 8-aligned; atomic access only.
                let v = unsafe { AtomicU64::from_ptr(base.add(at).cast()) }.load(Ordering::Relaxed);
                dst[i..i + 8].copy_from_slice(&v.to_ne_bytes());
                i += 8;
            } else {
                // SAFETY: in bounds (checked); byte atomics need no alignment.
                dst[i] = unsafe { AtomicU8::from_ptr(base.add(at)) }.load(Ordering::Relaxed);
                i += 1;
            }
        }
    }

    /// Copies `dst.len()` bytes at `off` out in bulk (`memcpy`), for data
    /// pages: bytes the backend moves and never interprets (a request's
    /// payload). The guest may change them meanwhile; what is copied is then
    /// some mix of old and new bytes, as a device's DMA would see, and
    /// nothing is decided on it. Ring indices and request slots, which are
    /// validated, go through [`SharedMem::read`] (per-word atomics) instead.
    pub fn read_data(&self, off: usize, dst: &mut [u8]) {
        self.check(off, dst.len());
        // SAFETY: the source range is inside the mapping (checked) and lives
        // as long as `self`; the destination is our own buffer, which cannot
        // overlap a guest mapping. No reference into guest memory is formed:
        // the copy goes through raw pointers, as rust-vmm's volatile slices
        // copy guest memory in bulk.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len());
        }
    }

    /// Copies `src` in at `off` in bulk, for data pages (see
    /// [`SharedMem::read_data`]).
    pub fn write_data(&self, off: usize, src: &[u8]) {
        self.check(off, src.len());
        // SAFETY: the destination range is inside the mapping (checked),
        // mapped writable by whoever gave it to us for data; the source is our
        // own buffer. Raw pointers only: no reference into guest memory.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(off), src.len());
        }
    }

    /// Writes `src` at `off`, word by word where aligned.
    pub fn write(&self, off: usize, src: &[u8]) {
        self.check(off, src.len());
        let base = self.ptr.as_ptr();
        let mut i = 0;
        while i < src.len() {
            let at = off + i;
            if at.is_multiple_of(8) && src.len() - i >= 8 {
                let v = u64::from_ne_bytes(src[i..i + 8].try_into().expect("8 bytes"));
                // SAFETY: in bounds (checked) and 8-aligned; atomic access only.
                unsafe { AtomicU64::from_ptr(base.add(at).cast()) }.store(v, Ordering::Relaxed);
                i += 8;
            } else {
                // SAFETY: in bounds (checked); byte atomics need no alignment.
                unsafe { AtomicU8::from_ptr(base.add(at)) }.store(src[i], Ordering::Relaxed);
                i += 1;
            }
        }
    }
}

impl RingMem for SharedMem {
    fn len(&self) -> usize {
        self.len
    }

    fn load_u32(&self, off: usize) -> u32 {
        self.atomic_u32(off).load(Ordering::Acquire)
    }

    fn store_u32(&self, off: usize, v: u32) {
        self.atomic_u32(off).store(v, Ordering::Release)
    }

    fn full_fence(&self) {
        fence(Ordering::SeqCst)
    }

    fn read(&self, off: usize, dst: &mut [u8]) {
        SharedMem::read(self, off, dst)
    }

    fn write(&self, off: usize, src: &[u8]) {
        SharedMem::write(self, off, src)
    }
}

impl Drop for SharedMem {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping this value created and owns; no
        // reference into it outlives `self` (accessors hand out copies only).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
        if let Some(f) = self.on_drop.take() {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_data_copies_round_trip_and_stay_inside_the_mapping() {
        let m = SharedMem::anonymous(8192).unwrap();
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        m.write_data(3, &data);
        let mut back = vec![0u8; 5000];
        m.read_data(3, &mut back);
        assert_eq!(back, data);
        // The word-wise reader sees the same bytes.
        let mut words = vec![0u8; 5000];
        m.read(3, &mut words);
        assert_eq!(words, data);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            m.read_data(8000, &mut [0u8; 200])
        }));
        assert!(r.is_err(), "a copy past the mapping must not happen");
    }

    #[test]
    fn reads_and_writes_of_any_alignment_round_trip() {
        let m = SharedMem::anonymous(4096).unwrap();
        let data: Vec<u8> = (0..100u8).collect();
        for off in [0usize, 1, 3, 8, 13] {
            m.write(off, &data);
            let mut back = vec![0u8; 100];
            m.read(off, &mut back);
            assert_eq!(back, data, "offset {off}");
        }
        m.store_u32(8, 0xdead_beef);
        assert_eq!(m.load_u32(8), 0xdead_beef);
    }

    #[test]
    fn frames_of_a_file_map_side_by_side_and_share_its_pages() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(8 * 4096).unwrap();
        let whole = SharedMem::map_fd(&f, 0, 8 * 4096, true).unwrap();
        whole.write(5 * 4096, b"page five");
        whole.write(2 * 4096, b"page two");
        let two = SharedMem::map_frames(&f, &[5, 2], true).unwrap();
        let mut b = [0u8; 9];
        two.read(0, &mut b);
        assert_eq!(&b, b"page five");
        two.read(4096, &mut b[..8]);
        assert_eq!(&b[..8], b"page two");
        two.write(4096, b"PAGE");
        let mut c = [0u8; 4];
        whole.read(2 * 4096, &mut c);
        assert_eq!(&c, b"PAGE");
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn an_access_past_the_end_is_caught() {
        let m = SharedMem::anonymous(4096).unwrap();
        let mut b = [0u8; 8];
        m.read(4092, &mut b);
    }
}

/// A window into a shared mapping: a guest's ring pages inside its memory.
#[derive(Clone, Debug)]
pub struct SharedView {
    mem: std::sync::Arc<SharedMem>,
    base: usize,
    len: usize,
}

impl SharedView {
    /// The bytes `base..base + len` of `mem`, if they lie inside it.
    pub fn new(mem: std::sync::Arc<SharedMem>, base: usize, len: usize) -> Option<SharedView> {
        (base.checked_add(len)? <= mem.len()).then_some(SharedView { mem, base, len })
    }
}

impl RingMem for SharedView {
    fn len(&self) -> usize {
        self.len
    }

    fn load_u32(&self, off: usize) -> u32 {
        assert!(off + 4 <= self.len, "view access outside its window");
        self.mem.load_u32(self.base + off)
    }

    fn store_u32(&self, off: usize, v: u32) {
        assert!(off + 4 <= self.len, "view access outside its window");
        self.mem.store_u32(self.base + off, v)
    }

    fn full_fence(&self) {
        fence(Ordering::SeqCst)
    }

    fn read(&self, off: usize, dst: &mut [u8]) {
        assert!(
            off + dst.len() <= self.len,
            "view access outside its window"
        );
        self.mem.read(self.base + off, dst)
    }

    fn write(&self, off: usize, src: &[u8]) {
        assert!(
            off + src.len() <= self.len,
            "view access outside its window"
        );
        self.mem.write(self.base + off, src)
    }
}
