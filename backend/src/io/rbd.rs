//! Ceph RBD images as disks ([`RbdDisk`]) and their engine ([`RbdEngine`]):
//! each operation is one librbd asynchronous request on the ring's bounce
//! buffer; librbd's completion callback queues the answer and rings a
//! doorbell the serving thread sleeps on with its event channel, as the
//! blocking engine's worker does.
#![allow(unsafe_code)]

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::op::{DrainOrder, IoDone, IoKind, IoOp};
use super::pool::BouncePool;
use super::wait::Doorbell;
use super::Disk;
use crate::rbd::{Aio, Image};

/// An RBD image served as a disk.
#[derive(Debug)]
pub struct RbdDisk {
    image: Arc<Image>,
    sectors: AtomicU64,
}

impl RbdDisk {
    /// Serves `image`.
    pub fn new(image: Image) -> io::Result<RbdDisk> {
        let size = image.size()?;
        Ok(RbdDisk {
            image: Arc::new(image),
            sectors: AtomicU64::new(size / 512),
        })
    }

    /// The image.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }
}

impl Disk for RbdDisk {
    fn sectors(&self) -> u64 {
        self.sectors.load(Ordering::Relaxed)
    }

    fn read_only(&self) -> bool {
        self.image.read_only
    }

    /// librbd keeps the size current (it watches the image's header), so a
    /// `rbd resize` elsewhere is seen here.
    fn refresh_sectors(&self) -> io::Result<u64> {
        let s = self.image.size()? / 512;
        self.sectors.store(s, Ordering::Relaxed);
        Ok(s)
    }

    /// RBD frees whole objects and zeroes the rest: any 512-byte-aligned
    /// range may be discarded, and reads of it return zeroes.
    fn discard_granularity(&self) -> u32 {
        512
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.image.read(off, buf)
    }

    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        if self.image.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.image.write(off, buf)
    }

    fn flush(&self) -> io::Result<()> {
        self.image.flush()
    }

    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        if self.image.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.image.discard(off, len)
    }

    fn rbd_image(&self) -> Option<Arc<Image>> {
        Some(self.image.clone())
    }
}

/// What librbd's callbacks hand back.
#[derive(Debug)]
struct Shared {
    done: Mutex<Vec<IoDone>>,
    bell: Doorbell,
}

impl Shared {
    /// Queues an answer. The bell is rung, and (in [`RbdEngine::gather`])
    /// cleared, under the list's lock, as the list turns non-empty and
    /// empty: it is readable exactly while answers wait, so the serving
    /// thread never reads it in vain (a system call a look, where most looks
    /// find nothing) nor sleeps past an answer.
    fn answer(&self, d: IoDone) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        done.push(d);
        // The first answer since the queue last looked wakes it; the rest
        // wait in the list for that same look.
        if done.len() == 1 {
            self.bell.ring();
        }
    }
}

/// librbd asynchronous requests for one ring.
#[derive(Debug)]
pub struct RbdEngine {
    image: Arc<Image>,
    /// Discards larger than [`crate::rbd::DISCARD_CHUNK`] go to this
    /// thread, which does them piece by piece (made on first use).
    side: Option<std::sync::mpsc::Sender<IoOp>>,
    pool: Arc<BouncePool>,
    shared: Arc<Shared>,
    /// Pushed, not started: behind a drain (flush) that waits for what was
    /// started before it, or one that has not completed.
    order: DrainOrder,
    /// Started and not reaped.
    started: usize,
    ready: Vec<IoDone>,
}

impl RbdEngine {
    /// An engine over `image`, with its buffers in `pool`.
    pub fn new(image: Arc<Image>, pool: Arc<BouncePool>) -> io::Result<RbdEngine> {
        Ok(RbdEngine {
            image,
            side: None,
            pool,
            shared: Arc::new(Shared {
                done: Mutex::new(Vec::new()),
                bell: Doorbell::new()?,
            }),
            order: DrainOrder::default(),
            started: 0,
            ready: Vec::new(),
        })
    }

    pub(super) fn push(&mut self, op: IoOp) {
        self.order.hold(op);
        self.start_ready();
    }

    /// Starts held operations in order, as far as drains allow.
    fn start_ready(&mut self) {
        while let Some(op) = self.order.next(self.started) {
            self.start(op);
        }
    }

    fn start(&mut self, mut op: IoOp) {
        if op.kind == IoKind::Discard && op.len > crate::rbd::DISCARD_CHUNK {
            return self.discard_aside(op);
        }
        let (what, ptr) = match op.kind {
            IoKind::Flush => (Aio::Flush, std::ptr::null_mut()),
            IoKind::Discard => (Aio::Discard, std::ptr::null_mut()),
            IoKind::Read | IoKind::Write if op.guest.is_some() => {
                let e = io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the RBD engine does no I/O on guest pages",
                );
                return self.fail(op, e);
            }
            IoKind::Read | IoKind::Write => {
                let fits = op.buf.as_ref().is_some_and(|b| {
                    op.buf_off
                        .checked_add(op.len as usize)
                        .is_some_and(|end| end <= b.len())
                });
                let Some(buf) = op.buf.as_mut().filter(|_| fits) else {
                    let e = io::Error::new(io::ErrorKind::InvalidInput, "I/O outside its buffer");
                    return self.fail(op, e);
                };
                let what = if op.kind == IoKind::Read {
                    Aio::Read
                } else {
                    Aio::Write
                };
                (what, self.pool.ptr(buf).wrapping_add(op.buf_off))
            }
        };
        let (off, len) = (op.off, op.len as usize);
        self.started += 1;
        let shared = self.shared.clone();
        let lost = self.image.lock_lost_flag();
        let fenced = self.image.blocklist_flag();
        // The pool stays mapped while librbd may touch the buffer.
        let pool = self.pool.clone();
        let on_done = Box::new(move |result: io::Result<usize>| {
            if let Err(e) = &result {
                if crate::rbd::lost_lock(e) {
                    lost.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                crate::rbd::note_blocklisted(e, &fenced);
            }
            // librbd answers a write with 0, not the bytes written: a write
            // either happened whole or failed.
            let result = match (what, result) {
                (Aio::Write, Ok(_)) => Ok(len),
                (_, r) => r,
            };
            let d = IoDone {
                tag: op.tag,
                result,
                buf: op.buf,
                guest: op.guest,
            };
            drop(pool);
            shared.answer(d);
        });
        // SAFETY: `ptr..ptr + len` lies in the bounce buffer `op.buf` (checked
        // above), which moves into `on_done` with a clone of its pool: no one
        // else uses the run, and it stays mapped, until librbd calls back.
        unsafe { self.image.aio(what, off, ptr, len, on_done) };
    }

    /// A discard too large for one librbd request, done piece by piece on
    /// the side thread (in order: the ring bounds how many wait).
    fn discard_aside(&mut self, op: IoOp) {
        if self.side.is_none() {
            let (tx, rx) = std::sync::mpsc::channel::<IoOp>();
            let (image, shared) = (self.image.clone(), self.shared.clone());
            let spawned = std::thread::Builder::new()
                .name("blkbackd-rbd-discard".into())
                .spawn(move || {
                    while let Ok(op) = rx.recv() {
                        let result = image.discard(op.off, op.len).map(|()| 0);
                        shared.answer(IoDone {
                            tag: op.tag,
                            result,
                            buf: op.buf,
                            guest: op.guest,
                        });
                    }
                });
            match spawned {
                Ok(_) => self.side = Some(tx),
                Err(e) => return self.fail(op, e),
            }
        }
        self.started += 1;
        if let Some(Err(std::sync::mpsc::SendError(op))) = self.side.as_ref().map(|s| s.send(op)) {
            self.started -= 1;
            self.fail(op, io::Error::other("the RBD discard thread is gone"));
        }
    }

    fn fail(&mut self, op: IoOp, e: io::Error) {
        self.order.done(op.tag);
        self.ready.push(IoDone::failed(op, e));
    }

    fn gather(&mut self) {
        let mut done = self.shared.done.lock().unwrap_or_else(|e| e.into_inner());
        if !done.is_empty() {
            self.shared.bell.clear();
        }
        for d in done.drain(..) {
            self.started -= 1;
            self.order.done(d.tag);
            self.ready.push(d);
        }
        drop(done);
        self.start_ready();
    }

    pub(super) fn has_completions(&mut self) -> bool {
        self.gather();
        !self.ready.is_empty()
    }

    pub(super) fn reap(&mut self, out: &mut Vec<IoDone>) {
        self.gather();
        out.append(&mut self.ready);
    }

    pub(super) fn in_flight(&self) -> usize {
        self.started + self.order.len() + self.ready.len()
    }

    pub(super) fn fd(&self) -> std::os::fd::RawFd {
        self.shared.bell.fd()
    }
}
