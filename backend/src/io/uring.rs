//! The io_uring engine: one ring per guest ring.
//!
//! Reads and writes go to the kernel in batches (one `io_uring_enter` per
//! ring pass), from and into the ring's bounce pool, which is registered as
//! a fixed buffer when the kernel allows it. A request aligned to the disk's
//! direct-I/O alignment uses the `O_DIRECT` descriptor; any other request
//! takes the buffered one, so alignment never makes a request fail. A flush
//! is an `fdatasync` with `IOSQE_IO_DRAIN`: it starts only after every
//! operation submitted before it has completed. Discards on files punch holes
//! with `IORING_OP_FALLOCATE`; `BLKDISCARD` has no io_uring opcode on the
//! kernels we support, so block-device discards go to a side worker thread.
//!
//! The thread serving the ring sleeps in `io_uring_enter` itself
//! ([`UringEngine::sleep`]): the event channel and the stop signal are polled
//! by the same ring (`IORING_OP_POLL_ADD`), so one system call submits the
//! pass's I/O and waits for whichever comes first, a completion or a kick.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};

use super::engine::{Ready, SleepOn};
use super::op::{GuestBufs, IoDone, IoKind, IoOp};
use super::pool::{BouncePool, Buf};
use super::thread::ThreadEngine;
use super::{DiscardKind, Disk, UringTarget};

/// Submission queue entries per ring (the completion queue is twice that).
const ENTRIES: u32 = 256;
/// Descriptors a sleep polls in the ring: the two of [`UringEngine::sleep`]'s
/// caller, and the side thread's doorbell.
const POLLED: usize = 3;
/// `user_data` of the poll (or the event channel's read) on descriptor `i`
/// of a sleep: `POLL_KEY + i`, far above any flight's key (a slot index,
/// bounded by what is in flight) and below the cancels' `u64::MAX`.
const POLL_KEY: u64 = u64::MAX - 1 - POLLED as u64;
/// `user_data` of a cancel (its completion is nobody's).
const CANCEL_KEY: u64 = u64::MAX;
/// What a sleep slot has armed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arm {
    /// A one-shot poll.
    Poll,
    /// A read of the event channel.
    Read,
}

/// Bytes a read of the event channel takes at most (the driver hands over
/// whole 4-byte ports; a channel's descriptor has only its own).
const EV_BUF: usize = 64;
/// How long a torn-down ring waits, in place, for cancelled I/O; past this
/// (a hung disk) the ring, its buffers and the disk go to a reaper thread
/// that frees them when the kernel finally completes the I/O, so closing the
/// device never waits on the disk.
const TEARDOWN: Duration = Duration::from_millis(200);

/// An in-flight operation: the tag and the memory the kernel is using (a
/// pool buffer, or guest pages with the vector that describes them).
#[derive(Debug)]
struct Flight {
    tag: u64,
    buf: Option<Buf>,
    guest: Option<GuestBufs>,
    #[expect(dead_code, reason = "read by the kernel through the entry, not by us")]
    iov: Vec<libc::iovec>,
}

// SAFETY: the iovecs only describe memory the flight itself holds (its
// guest pages); they are never dereferenced by us, only read by the kernel.
unsafe impl Send for Flight {}

/// The operations in flight, found by their entry's `user_data`: a slot
/// index, reused once reaped (a hashed map of sequence numbers was hashing
/// twice per I/O on the serving thread). Holds at most what was in flight at
/// once, which the guest's ring bounds.
#[derive(Debug, Default)]
struct Flights {
    slots: Vec<Option<Flight>>,
    free: Vec<usize>,
    len: usize,
}

impl Flights {
    /// A key of its own for a flight about to start (what its entry's
    /// `user_data` says): filed by [`Flights::fill`], or given back by
    /// [`Flights::give_back`] if it never starts. Reaping in between (a full
    /// submission queue) cannot hand it out again.
    fn reserve(&mut self) -> u64 {
        let i = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        i as u64
    }

    fn give_back(&mut self, key: u64) {
        self.free.push(key as usize);
    }

    /// Files `f` under `key` (from [`Flights::reserve`]).
    fn fill(&mut self, key: u64, f: Flight) {
        self.slots[key as usize] = Some(f);
        self.len += 1;
    }

    /// Takes the flight filed under `key`, if any (a cancel's or a stale
    /// key finds none).
    fn remove(&mut self, key: u64) -> Option<Flight> {
        let i = usize::try_from(key).ok()?;
        let f = self.slots.get_mut(i)?.take()?;
        self.free.push(i);
        self.len -= 1;
        Some(f)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One io_uring instance serving one guest ring.
pub struct UringEngine {
    ring: IoUring,
    target: UringTarget,
    disk: Arc<dyn Disk>,
    pool: Arc<BouncePool>,
    registered: bool,
    flights: Flights,
    unsubmitted: usize,
    done: Vec<IoDone>,
    side: Option<ThreadEngine>,
    /// The descriptor each sleep slot's poll (or read) is armed on
    /// (one-shot: until its completion is seen), and what it is.
    armed: [Option<(RawFd, Arm)>; POLLED],
    /// The ring may read the event channel: the kernel waits for a kick
    /// under a read (fast poll), and no read has failed with `EAGAIN` (as
    /// kernels that do not wait on an `O_NONBLOCK` descriptor answer) nor
    /// outlived its cancel. Otherwise the channel is polled.
    read_ev_ok: bool,
    /// What each slot's entry found since the last sleep said so.
    fired: [Ready; POLLED],
    /// Where the ring reads the event channel (on the heap: the kernel
    /// writes it after the entry went in, wherever the engine has moved).
    ev_buf: Box<[u8; EV_BUF]>,
    /// The first unmask that failed since the caller last asked.
    unmask_err: Option<io::Error>,
    /// The last submission made in a pass found completions on return
    /// (page-cache hits, a RAM disk): see [`UringEngine::submit_in_pass`].
    completes_inline: bool,
    /// Passes that left their I/O to the sleep since the last look at
    /// whether the disk completes inline.
    deferred: u32,
    /// The key of the last `IOSQE_IO_DRAIN` entry (a flush) until it
    /// completes: meanwhile a sleep arms no poll, which would wait for it.
    drain_key: Option<u64>,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("target", &self.target)
            .field("registered", &self.registered)
            .field("in_flight", &self.flights.len())
            .finish()
    }
}

impl UringEngine {
    /// An engine over `disk` (which must have descriptors: see
    /// [`Disk::uring_target`]). `direct` asks for `O_DIRECT` where the disk
    /// has a direct descriptor.
    pub fn new(disk: Arc<dyn Disk>, pool: Arc<BouncePool>, direct: bool) -> io::Result<Self> {
        let mut target = disk.uring_target().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "this disk has no file descriptor for io_uring",
            )
        })?;
        if !direct {
            target.direct = None;
        }
        let ring = IoUring::builder()
            .setup_cqsize(ENTRIES * 2)
            .build(ENTRIES)?;
        let (ptr, len) = pool.region();
        let iov = libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        };
        // SAFETY: the region is the pool's mapping, which outlives the ring:
        // the engine holds the pool, and on a teardown that cannot confirm
        // every I/O finished it leaks the pool instead of unmapping it.
        let registered = match unsafe { ring.submitter().register_buffers(&[iov]) } {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(
                    "bounce pool not registered with io_uring ({e}): plain reads and writes"
                );
                false
            }
        };
        let read_ev_ok = ring.params().is_feature_fast_poll();
        Ok(UringEngine {
            ring,
            target,
            disk,
            pool,
            registered,
            flights: Flights::default(),
            unsubmitted: 0,
            done: Vec::new(),
            side: None,
            armed: [None; POLLED],
            fired: [Ready::No; POLLED],
            ev_buf: Box::new([0; EV_BUF]),
            read_ev_ok,
            unmask_err: None,
            completes_inline: true,
            deferred: 0,
            drain_key: None,
        })
    }

    /// Whether aligned requests use `O_DIRECT`.
    pub fn direct(&self) -> bool {
        self.target.direct.is_some()
    }

    /// Operations pushed and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.flights.len() + self.done.len() + self.side.as_ref().map_or(0, |s| s.in_flight)
    }

    /// The vector of a zero-copy operation's guest pages (empty for the
    /// others), and whether every piece meets the disk's direct-I/O
    /// alignment.
    fn guest_iov(op: &IoOp, align: u64) -> Result<(Vec<libc::iovec>, bool), io::Error> {
        let Some(g) = &op.guest else {
            return Ok((Vec::new(), true));
        };
        let len = usize::try_from(op.len).unwrap_or(usize::MAX);
        let ranges = g.ranges(op.buf_off, len).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "I/O outside its guest pages")
        })?;
        let aligned = ranges
            .iter()
            .all(|&(p, n)| (p as u64).is_multiple_of(align) && (n as u64).is_multiple_of(align));
        let iov = ranges
            .into_iter()
            .map(|(p, n)| libc::iovec {
                iov_base: p.cast(),
                iov_len: n,
            })
            .collect();
        Ok((iov, aligned))
    }

    /// Prepares the submission queue entry for `op`; a zero-copy operation's
    /// vector goes to `iov_out`, which must stay alive (unmoved on the heap)
    /// until the operation completes.
    fn entry(
        &self,
        op: &IoOp,
        ud: u64,
        iov_out: &mut Vec<libc::iovec>,
    ) -> Result<squeue::Entry, io::Error> {
        let align = self.target.direct.map_or(1, |(_, a)| u64::from(a));
        let (iov, iov_aligned) = Self::guest_iov(op, align)?;
        *iov_out = iov;
        // O_DIRECT when the disk offset, the length and the memory address
        // (the pool is page-aligned) all meet the disk's alignment.
        let buf_off = if op.guest.is_some() {
            0
        } else {
            op.buf_off as u64
        };
        let fd_for = |off: u64, len: u64| match self.target.direct {
            Some((fd, align))
                if iov_aligned
                    && [off, len, buf_off]
                        .iter()
                        .all(|v| v % u64::from(align) == 0) =>
            {
                fd
            }
            _ => self.target.fd,
        };
        let len32 = || {
            u32::try_from(op.len)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "operation too large"))
        };
        // Where the transfer starts in the pool, checked to lie in the buffer.
        let ptr = || {
            op.buf
                .as_ref()
                .filter(|b| {
                    (op.buf_off as u64)
                        .checked_add(op.len)
                        .is_some_and(|end| end <= b.len() as u64)
                })
                .map(|b| self.pool.ptr(b).wrapping_add(op.buf_off))
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "I/O outside its buffer")
                })
        };
        let iov_len = || {
            u32::try_from(iov_out.len())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many pieces"))
        };
        let e = match op.kind {
            IoKind::Read if op.guest.is_some() => {
                let fd = types::Fd(fd_for(op.off, op.len));
                opcode::Readv::new(fd, iov_out.as_ptr(), iov_len()?)
                    .offset(op.off)
                    .build()
            }
            IoKind::Write if op.guest.is_some() => {
                let fd = types::Fd(fd_for(op.off, op.len));
                opcode::Writev::new(fd, iov_out.as_ptr(), iov_len()?)
                    .offset(op.off)
                    .build()
            }
            IoKind::Read => {
                let fd = types::Fd(fd_for(op.off, op.len));
                let p = ptr()?;
                if self.registered {
                    opcode::ReadFixed::new(fd, p, len32()?, 0)
                        .offset(op.off)
                        .build()
                } else {
                    opcode::Read::new(fd, p, len32()?).offset(op.off).build()
                }
            }
            IoKind::Write => {
                let fd = types::Fd(fd_for(op.off, op.len));
                let p = ptr()?;
                if self.registered {
                    opcode::WriteFixed::new(fd, p, len32()?, 0)
                        .offset(op.off)
                        .build()
                } else {
                    opcode::Write::new(fd, p, len32()?).offset(op.off).build()
                }
            }
            IoKind::Flush => opcode::Fsync::new(types::Fd(self.target.fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoKind::Discard => opcode::Fallocate::new(types::Fd(self.target.fd), op.len)
                .offset(op.off)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        };
        let flags = if op.drain {
            squeue::Flags::IO_DRAIN
        } else {
            squeue::Flags::empty()
        };
        Ok(e.flags(flags).user_data(ud))
    }

    /// Queues `op`; it reaches the kernel at the next [`UringEngine::submit`].
    pub fn push(&mut self, op: IoOp) {
        if op.kind == IoKind::Discard && self.target.discard == DiscardKind::Block {
            // No io_uring opcode for BLKDISCARD: a side thread does it.
            if self.side.is_none() {
                match ThreadEngine::new(self.disk.clone(), self.pool.clone()) {
                    Ok(t) => self.side = Some(t),
                    Err(e) => {
                        self.done.push(IoDone::failed(op, e));
                        return;
                    }
                }
            }
            if let Some(side) = &mut self.side {
                side.push(op);
            }
            return;
        }
        if op.kind == IoKind::Discard && self.target.discard == DiscardKind::None {
            let unsupported = io::Error::from_raw_os_error(libc::EOPNOTSUPP);
            self.done.push(IoDone::failed(op, unsupported));
            return;
        }
        if op.drain {
            // `IOSQE_IO_DRAIN` waits for every entry submitted before it,
            // the sleep's polls too (which complete only with a kick or a
            // stop): they go first, and are not armed again until it is
            // done (see `sleep`).
            self.disarm();
        }
        let ud = self.flights.reserve();
        if op.drain {
            self.drain_key = Some(ud);
        }
        let mut iov = Vec::new();
        let entry = match self.entry(&op, ud, &mut iov) {
            Ok(e) => e,
            Err(e) => {
                self.flights.give_back(ud);
                self.done.push(IoDone::failed(op, e));
                return;
            }
        };
        // SAFETY: the entry's buffer is the op's `Buf` (or its guest pages
        // and the vector describing them, whose heap storage does not move
        // with the Vec), which moves into `flights` below and stays there
        // (alive, mapped, touched by nobody else) until the completion for
        // `ud` is reaped; a torn-down engine hands `flights` to a reaper.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            // The submission queue is full: hand it to the kernel first.
            self.submit_queued();
        }
        self.flights.fill(
            ud,
            Flight {
                tag: op.tag,
                buf: op.buf,
                guest: op.guest,
                iov,
            },
        );
        self.unsubmitted += 1;
    }

    /// Operations pushed and not yet submitted.
    pub fn queued(&self) -> usize {
        self.unsubmitted
    }

    /// Passes that leave their I/O to the sleep between two that submit
    /// it themselves, to see whether the disk completes inline.
    const PROBE_EVERY: u32 = 64;

    /// Whether a pass should submit its I/O itself rather than leave it to
    /// the sleep that follows (whose `io_uring_enter` submits and waits in
    /// one call, one system call fewer per I/O). Leaving it pays where the
    /// disk completes asynchronously (a real disk, a loop device); where it
    /// completes inline (the page cache, a RAM disk) the answers would go
    /// out a pass later, after the ring has asked the guest for a kick it
    /// then sends for every request: such a disk is submitted to in the
    /// pass. Which one the disk is, is seen at each submission made in a
    /// pass, and looked at again every [`Self::PROBE_EVERY`] passes.
    pub fn submit_in_pass(&mut self) -> bool {
        if self.unsubmitted == 0 {
            return false;
        }
        if self.completes_inline {
            return true;
        }
        self.deferred += 1;
        if self.deferred >= Self::PROBE_EVERY {
            self.deferred = 0;
            return true;
        }
        false
    }

    /// Submits everything queued, in one system call when it can.
    pub fn submit(&mut self) {
        if self.unsubmitted > 0 {
            self.submit_queued();
            // Completions there already (or from before: either way the
            // pass has answers to give) mean inline completion.
            self.completes_inline = !self.ring.completion().is_empty();
        }
    }

    fn submit_queued(&mut self) {
        while self.unsubmitted > 0 {
            match self.ring.submit() {
                Ok(n) => self.unsubmitted = self.unsubmitted.saturating_sub(n.max(1)),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => {
                    // Completions must be reaped before more can go in; they
                    // are, by the caller's next reap. Keep the rest queued.
                    let mut out = Vec::new();
                    self.reap(&mut out);
                    self.done.extend(out);
                    std::thread::yield_now();
                }
                Err(e) => {
                    tracing::warn!("io_uring submission failed: {e}");
                    return;
                }
            }
        }
    }

    /// Whether [`UringEngine::reap`] has something now (no system call).
    pub fn has_completions(&mut self) -> bool {
        !self.done.is_empty()
            || !self.ring.completion().is_empty()
            || self.side.as_mut().is_some_and(|s| s.has_completions())
    }

    /// Waits in the kernel, at most `timeout`, for a completion (what a
    /// polling ring does while its I/O is in flight: the thread sleeps in
    /// `io_uring_enter` and the completion wakes it directly, without the
    /// reactor's epoll and a task wake-up). True if one came.
    pub fn wait_completion(&mut self, timeout: Duration) -> bool {
        if self.has_completions() {
            return true;
        }
        if self.flights.is_empty() || timeout.is_zero() {
            return false;
        }
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        // An error is ETIME (the window passed) or EINTR (a signal): neither
        // is a failure of the I/O, which reap reports.
        if let Ok(n) = self.ring.submitter().submit_with_args(1, &args) {
            self.unsubmitted = self.unsubmitted.saturating_sub(n);
        }
        !self.ring.completion().is_empty()
    }

    /// Moves the completions available now into `out`.
    pub fn reap(&mut self, out: &mut Vec<IoDone>) {
        out.append(&mut self.done);
        self.take_cqes(out);
        if let Some(s) = &mut self.side {
            s.reap(out);
        }
    }

    /// Empties the completion queue: the I/O's completions into `out`, the
    /// sleep polls' into [`UringEngine::fired`].
    fn take_cqes(&mut self, out: &mut Vec<IoDone>) {
        for cqe in self.ring.completion() {
            let ud = cqe.user_data();
            let r = cqe.result();
            let slot = ud
                .checked_sub(POLL_KEY)
                .filter(|&i| i < POLLED as u64)
                .map(|i| i as usize);
            if let Some(i) = slot {
                let Some((_, arm)) = self.armed[i] else {
                    // Its entry was given up already (one that outlived its
                    // cancel).
                    continue;
                };
                // Fired, or cancelled: either way no longer armed.
                self.armed[i] = None;
                let reads = arm == Arm::Read;
                if reads && r == -libc::EAGAIN {
                    // This kernel does not wait under a read of a
                    // non-blocking descriptor: poll it from now on.
                    tracing::debug!("the ring cannot wait on an event channel read: polling it");
                    self.read_ev_ok = false;
                }
                let found = match (reads, r) {
                    // The channel's bytes: a kick, consumed.
                    (true, 1..) => Ready::Read,
                    // A read cancelled (by `disarm`) took nothing.
                    (true, r) if r == -libc::ECANCELED => Ready::No,
                    // A poll that fired or was cancelled, or a read that
                    // failed: the caller looks for itself.
                    _ => Ready::Readable,
                };
                self.fired[i] = self.fired[i].max(found);
                continue;
            }
            if self.drain_key == Some(ud) {
                self.drain_key = None;
            }
            let Some(f) = self.flights.remove(ud) else {
                continue;
            };
            let r = cqe.result();
            out.push(IoDone {
                tag: f.tag,
                result: if r < 0 {
                    Err(io::Error::from_raw_os_error(-r))
                } else {
                    Ok(r as usize)
                },
                buf: f.buf,
                guest: f.guest,
            });
        }
    }

    /// Submits what is queued and sleeps in that same `io_uring_enter`
    /// until a completion, one of `on.fds` ready (`-1`: none), or
    /// `timeout`; says which of `on.fds` were. The descriptors are polled by
    /// the ring itself (one-shot polls, armed again by the next sleep after
    /// they fire), so a ring's thread makes one system call to start its
    /// pass's I/O and wait, instead of a submit and a `poll(2)`. With
    /// `on.read_ev` the event channel is read rather than polled (its kick
    /// consumed in the kernel: [`Ready::Read`]), and `on.unmask` is written
    /// to it in the same call: a kick then costs the thread no `read` and no
    /// `write` of its own.
    pub fn sleep(&mut self, on: SleepOn, timeout: Option<Duration>) -> io::Result<[Ready; 2]> {
        let fds = on.fds;
        if self.drain_key.is_some() {
            // An entry pushed now would start only after the flush: unmask
            // here and sleep in `poll(2)` on the ring's descriptor and `fds`
            // until it is done.
            if let Some(bytes) = on.unmask {
                self.unmask_now(fds[1], bytes);
            }
            self.submit_queued();
            // A kick a read took before `disarm` cancelled it is still one,
            // and is told now, not after the flush.
            let told = (0..2).any(|i| fds[i] >= 0 && self.fired[i] != Ready::No);
            let timeout = if told { Some(Duration::ZERO) } else { timeout };
            let polled = super::wait::readable_with(fds, self.fds(), timeout)?;
            let mut done = std::mem::take(&mut self.done);
            self.take_cqes(&mut done);
            self.done = done;
            return Ok(self.tell(fds, polled.map(Ready::polled)));
        }
        let side = self
            .side
            .as_ref()
            .filter(|s| s.in_flight > 0)
            .map_or(-1, |s| s.bell.fd());
        let want = [fds[0], fds[1], side];
        if want
            .iter()
            .zip(&self.armed)
            .any(|(&fd, a)| fd >= 0 && a.is_some_and(|(a, _)| a != fd))
        {
            // A slot armed on another descriptor than this sleep's: its
            // entry (and a read's buffer) goes first.
            self.disarm();
        }
        if let Some(bytes) = on.unmask {
            // Written with a system call of its own, before the entries go
            // in. (Carried in the ring, its completion would have to be told
            // from a wake-up's; and `IOSQE_CQE_SKIP_SUCCESS`, which would
            // hide it, turns off `IOSQE_IO_DRAIN` for the whole ring, which
            // our flushes need: the VM's flushes failed with EOPNOTSUPP.)
            self.unmask_now(fds[1], bytes);
        }
        for (i, &fd) in want.iter().enumerate() {
            if fd < 0 || self.fired[i] != Ready::No || self.armed[i].is_some_and(|(a, _)| a == fd) {
                continue;
            }
            let read = i == 1 && on.read_ev && self.read_ev_ok;
            let (entry, arm) = if read {
                // Offset -1: the descriptor's own position (a stream).
                let r = opcode::Read::new(types::Fd(fd), self.ev_buf.as_mut_ptr(), EV_BUF as u32)
                    .offset(u64::MAX)
                    .build();
                (r, Arm::Read)
            } else {
                let p = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build();
                (p, Arm::Poll)
            };
            let entry = entry.user_data(POLL_KEY + i as u64);
            // SAFETY: a poll carries no buffer; a read's is `ev_buf`, on the
            // heap and not touched by us until its completion is seen (or,
            // if a teardown cannot see it, leaked: see `disarm`). The
            // descriptor is the caller's and outlives the entry (`Drop`
            // cancels what is still armed before the engine goes).
            while unsafe { self.ring.submission().push(&entry) }.is_err() {
                self.submit_queued();
            }
            self.unsubmitted += 1;
            self.armed[i] = Some((fd, arm));
        }
        let mut done = std::mem::take(&mut self.done);
        self.take_cqes(&mut done);
        let ready = |fired: &[Ready; POLLED]| {
            fired
                .iter()
                .zip(&want)
                .any(|(&f, &fd)| f != Ready::No && fd >= 0)
        };
        let wait = usize::from(done.is_empty() && !ready(&self.fired));
        let r = match timeout {
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(wait, &args)
            }
            None => self.ring.submitter().submit_and_wait(wait),
        };
        match r {
            Ok(n) => self.unsubmitted = self.unsubmitted.saturating_sub(n),
            // The time passed, a signal, or completions to reap before more
            // can go in (they are, below; what is queued goes next time).
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) => {}
            Err(e) => {
                self.done = done;
                return Err(e);
            }
        }
        self.take_cqes(&mut done);
        self.done = done;
        // The side thread's doorbell: its completions are found by reaping.
        self.fired[2] = Ready::No;
        Ok(self.tell(fds, [Ready::No; 2]))
    }

    /// What a sleep on `fds` says: what their entries found (handed over
    /// once), or else what `poll(2)` did.
    fn tell(&mut self, fds: [RawFd; 2], polled: [Ready; 2]) -> [Ready; 2] {
        let mut out = polled;
        for (i, o) in out.iter_mut().enumerate() {
            if fds[i] >= 0 {
                *o = (*o).max(std::mem::take(&mut self.fired[i]));
            }
        }
        out
    }

    /// Writes the unmask with a system call of its own (while a flush
    /// drains, an entry would wait for it).
    fn unmask_now(&mut self, fd: RawFd, bytes: [u8; 4]) {
        // SAFETY: a write from a live 4-byte array to the caller's
        // descriptor; the kernel keeps no reference.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), 4) };
        if n != 4 && self.unmask_err.is_none() {
            self.unmask_err = Some(if n < 0 {
                io::Error::last_os_error()
            } else {
                io::Error::from(io::ErrorKind::WriteZero)
            });
        }
    }

    /// The first unmask failure since the last call.
    pub fn take_unmask_error(&mut self) -> Option<io::Error> {
        self.unmask_err.take()
    }

    /// What polls readable when [`UringEngine::reap`] may have something:
    /// the ring (while completions wait) and the side thread's doorbell.
    pub fn fds(&self) -> [Option<RawFd>; 2] {
        [
            Some(self.ring.as_raw_fd()),
            self.side.as_ref().map(|s| s.bell.fd()),
        ]
    }

    /// Cancels the sleep's polls and read still armed and waits (bounded)
    /// for the kernel to let go of them: an entry holds its descriptor open,
    /// and an event channel must be unbound when its owner closes it (the
    /// next daemon binds the guest's port again). A read's buffer, and the
    /// unmask's bytes, that the kernel may still use after that are leaked,
    /// never freed under it.
    fn disarm(&mut self) {
        for i in 0..POLLED {
            if self.armed[i].is_none() {
                continue;
            }
            let cancel = opcode::AsyncCancel::new(POLL_KEY + i as u64)
                .build()
                .user_data(CANCEL_KEY);
            // SAFETY: a cancel entry carries no buffer.
            while unsafe { self.ring.submission().push(&cancel) }.is_err() {
                self.submit_queued();
            }
            self.unsubmitted += 1;
        }
        let deadline = Instant::now() + TEARDOWN;
        let mut done = std::mem::take(&mut self.done);
        while self.armed.iter().any(Option::is_some) && Instant::now() < deadline {
            let ts = types::Timespec::new().nsec(50_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            if let Ok(n) = self.ring.submitter().submit_with_args(1, &args) {
                self.unsubmitted = self.unsubmitted.saturating_sub(n);
            }
            self.take_cqes(&mut done);
        }
        self.done = done;
        if self.armed[1].is_some_and(|(_, a)| a == Arm::Read) {
            tracing::warn!("an event channel read outlived its cancel: leaking its buffer");
            std::mem::forget(std::mem::replace(&mut self.ev_buf, Box::new([0; EV_BUF])));
            self.armed[1] = None;
            // Its late completion would carry this slot's key: no read is
            // armed under it again (the channel is polled).
            self.read_ev_ok = false;
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.disarm();
        if self.flights.is_empty() {
            return;
        }
        // Cancel what is in flight and wait for the kernel to let go of the
        // buffers; if it will not (a hung disk), leak the pool rather than
        // free memory a late completion could still write.
        self.submit_queued();
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(CANCEL_KEY);
        // SAFETY: a cancel entry carries no buffer.
        if unsafe { self.ring.submission().push(&cancel) }.is_ok() {
            let _ = self.ring.submit();
        }
        let deadline = Instant::now() + TEARDOWN;
        while !self.flights.is_empty() && Instant::now() < deadline {
            let ts = types::Timespec::new().nsec(50_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            let mut out = Vec::new();
            self.reap(&mut out);
        }
        if self.flights.is_empty() {
            return;
        }
        // A stand-in ring for this engine's remaining (trivial) drop.
        let spare = match IoUring::new(1) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(
                    in_flight = self.flights.len(),
                    "I/O still in flight at teardown and no reaper ring ({e}): leaking its buffers"
                );
                std::mem::forget(self.pool.clone());
                std::mem::forget(self.disk.clone());
                return;
            }
        };
        let abandoned = Abandoned {
            ring: std::mem::replace(&mut self.ring, spare),
            flights: std::mem::take(&mut self.flights),
            pool: self.pool.clone(),
            disk: self.disk.clone(),
        };
        tracing::warn!(
            in_flight = abandoned.flights.len(),
            "I/O still in flight at teardown (a hung disk?): a reaper keeps its buffers and the disk until the kernel completes it"
        );
        abandoned.reap_in_background();
    }
}

/// What a torn-down engine leaves while the kernel still owns some of its
/// I/O: the ring (the kernel writes completions and, for reads, data into the
/// pool), the in-flight buffers, the pool and the disk (whose fds the I/O
/// uses). Freed only after the last completion.
struct Abandoned {
    ring: IoUring,
    flights: Flights,
    pool: Arc<BouncePool>,
    disk: Arc<dyn Disk>,
}

impl Abandoned {
    fn reap_in_background(self) {
        // Handed over through a slot so that if the thread cannot start, the
        // memory is leaked here rather than freed under the kernel's feet.
        let slot = Arc::new(std::sync::Mutex::new(Some(self)));
        let theirs = slot.clone();
        let spawned = std::thread::Builder::new()
            .name("blkbackd-reaper".into())
            .spawn(move || {
                let taken = theirs.lock().ok().and_then(|mut s| s.take());
                let Some(mut me) = taken else { return };
                while !me.flights.is_empty() {
                    if let Err(e) = me.ring.submit_and_wait(1) {
                        if e.raw_os_error() != Some(libc::EINTR) {
                            tracing::warn!("reaping abandoned I/O: {e}; leaking its buffers");
                            std::mem::forget(me);
                            return;
                        }
                    }
                    for cqe in me.ring.completion() {
                        me.flights.remove(cqe.user_data());
                    }
                }
                tracing::info!("abandoned I/O completed: its buffers and the disk are let go");
                let Abandoned {
                    ring,
                    flights,
                    pool,
                    disk,
                } = me;
                drop((flights, ring, pool, disk));
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a reaper thread ({e}): leaking abandoned buffers");
            if let Some(me) = slot.lock().ok().and_then(|mut s| s.take()) {
                std::mem::forget(me);
            }
        }
    }
}

/// What a raw io_uring run did.
#[derive(Clone, Debug)]
pub struct RawRun {
    /// Requests completed.
    pub ops: u64,
    /// Wall-clock seconds.
    pub secs: f64,
    /// Each request's latency in ns, at depth 1.
    pub latency_ns: Vec<u32>,
}

/// What a raw run issues: `depth` lanes, each keeping one request of `bs`
/// bytes in flight, for `seconds`.
#[derive(Clone, Copy, Debug)]
pub struct RawJob {
    /// Writes (else reads).
    pub write: bool,
    /// Lanes.
    pub depth: usize,
    /// Bytes per request.
    pub bs: usize,
    /// How long.
    pub seconds: f64,
    /// At depth 1, at most this many latencies are kept.
    pub latency_samples: usize,
}

/// Requests issued with io_uring straight on `file` (the limit a backend
/// can approach: the benchmark's baseline), lanes of one request each kept
/// in flight; lane `l`'s `n`th request goes to `offset(l, n)`.
pub fn raw_run(
    file: &std::fs::File,
    job: &RawJob,
    offset: impl Fn(u32, u64) -> u64,
) -> io::Result<RawRun> {
    let (depth, bs) = (job.depth, job.bs);
    let pool = BouncePool::new(depth * bs.div_ceil(super::pool::POOL_PAGE))?;
    let mut bufs: Vec<Buf> = (0..depth)
        .map(|_| {
            pool.alloc(bs)
                .ok_or_else(|| io::Error::other("raw pool too small"))
        })
        .collect::<io::Result<_>>()?;
    for b in &mut bufs {
        pool.slice_mut(b).fill(0x5A);
    }
    let mut ring = IoUring::new(depth.next_power_of_two().max(8) as u32)?;
    let fd = types::Fd(file.as_raw_fd());
    let mut issued = vec![0u64; depth];
    let mut latency_ns = Vec::new();
    let mut sent_at;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(job.seconds);
    let mut ops = 0u64;
    let mut in_flight = 0usize;
    let push = |ring: &mut IoUring, lane: usize, n: u64| -> io::Result<()> {
        let off = offset(lane as u32, n);
        let p = pool.ptr(&bufs[lane]);
        let e = if job.write {
            opcode::Write::new(fd, p, bs as u32).offset(off).build()
        } else {
            opcode::Read::new(fd, p, bs as u32).offset(off).build()
        };
        // SAFETY: lane `lane`'s buffer is used by at most one request at a
        // time (a lane resubmits only after its completion) and the pool
        // outlives the ring, which is drained before this function returns.
        unsafe { ring.submission().push(&e.user_data(lane as u64)) }
            .map_err(|_| io::Error::other("submission queue full"))
    };
    for lane in 0..depth {
        push(&mut ring, lane, 0)?;
        in_flight += 1;
    }
    sent_at = Instant::now();
    while in_flight > 0 {
        ring.submit_and_wait(1)?;
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (lane, r) in done {
            in_flight -= 1;
            if r < 0 {
                // Drain what is in flight before reporting.
                while in_flight > 0 {
                    ring.submit_and_wait(1)?;
                    in_flight -= ring.completion().count();
                }
                return Err(io::Error::from_raw_os_error(-r));
            }
            ops += 1;
            let lane = lane as usize;
            issued[lane] += 1;
            let now = Instant::now();
            if depth == 1 && latency_ns.len() < job.latency_samples {
                latency_ns.push((now - sent_at).as_nanos().min(u128::from(u32::MAX)) as u32);
            }
            if now < deadline {
                push(&mut ring, lane, issued[lane])?;
                in_flight += 1;
                sent_at = Instant::now();
            }
        }
    }
    Ok(RawRun {
        ops,
        secs: started.elapsed().as_secs_f64(),
        latency_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::{Flight, Flights, UringEngine};
    use crate::io::engine::{Ready, SleepOn};
    use crate::io::op::{IoKind, IoOp};
    use crate::io::pool::BouncePool;
    use crate::io::FileDisk;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// A sleep on `fds`, polled.
    fn polled(fds: [i32; 2]) -> SleepOn {
        SleepOn {
            fds,
            read_ev: false,
            unmask: None,
        }
    }

    fn engine() -> (UringEngine, Arc<BouncePool>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![7u8; 64 << 10]).unwrap();
        let disk = Arc::new(FileDisk::open_file(&path, false).unwrap());
        let pool = Arc::new(BouncePool::new(4).unwrap());
        (
            UringEngine::new(disk, pool.clone(), false).unwrap(),
            pool,
            dir,
        )
    }

    #[test]
    fn a_sleep_submits_and_wakes_for_a_completion_a_descriptor_or_its_time() {
        let (mut e, pool, _dir) = engine();
        let (r, mut w) = std::os::unix::net::UnixStream::pair().unwrap();
        let fds = [r.as_raw_fd(), -1];
        // Nothing readable, nothing in flight: the time ends it.
        let t = Instant::now();
        assert_eq!(
            e.sleep(polled(fds), Some(Duration::from_millis(30)))
                .unwrap(),
            [Ready::No; 2]
        );
        assert!(t.elapsed() >= Duration::from_millis(25), "woke early");
        // A read pushed and not submitted: the sleep submits it and wakes
        // for its completion, not for its time.
        e.push(IoOp {
            tag: 5,
            kind: IoKind::Read,
            off: 4096,
            len: 4096,
            buf: pool.alloc(4096),
            guest: None,
            buf_off: 0,
            drain: false,
        });
        let t = Instant::now();
        assert_eq!(
            e.sleep(polled(fds), Some(Duration::from_secs(5))).unwrap(),
            [Ready::No; 2]
        );
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "the read was not submitted"
        );
        assert!(e.has_completions());
        let mut out = Vec::new();
        e.reap(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].tag, out[0].result.as_ref().ok()), (5, Some(&4096)));
        assert!(pool
            .slice(out[0].buf.as_ref().unwrap())
            .iter()
            .all(|&b| b == 7));
        pool.free(out.remove(0).buf.unwrap());
        // The descriptor turns readable while the sleep waits: it says so,
        // and once more after it is read only if it is readable again.
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            w.write_all(b"k").unwrap();
            w
        });
        assert_eq!(
            e.sleep(polled(fds), None).unwrap(),
            [Ready::Readable, Ready::No]
        );
        let mut w = writer.join().unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(std::io::Read::read(&mut (&r), &mut buf).unwrap(), 1);
        assert_eq!(
            e.sleep(polled(fds), Some(Duration::from_millis(10)))
                .unwrap(),
            [Ready::No; 2]
        );
        w.write_all(b"k").unwrap();
        assert_eq!(
            e.sleep(polled(fds), Some(Duration::from_secs(5))).unwrap(),
            [Ready::Readable, Ready::No]
        );
    }

    #[test]
    fn a_disarmed_engine_lets_go_of_the_descriptors_it_polled_or_read() {
        // An event channel is unbound when its descriptor's last reference
        // goes, and a poll or read armed in the ring holds one. Closing a
        // ring cancels them, but a ring whose I/O hangs at teardown lives on
        // in a reaper: they must be gone before, or the guest's port stays
        // bound and the next daemon cannot bind it again.
        for read_ev in [false, true] {
            let (mut e, _pool, _dir) = engine();
            let (r, w) = std::os::unix::net::UnixStream::pair().unwrap();
            r.set_nonblocking(true).unwrap();
            let on = SleepOn {
                fds: [-1, r.as_raw_fd()],
                read_ev,
                unmask: None,
            };
            assert_eq!(
                e.sleep(on, Some(Duration::from_millis(1))).unwrap(),
                [Ready::No; 2]
            );
            drop(r);
            // The armed entry holds the other end: no hang-up (which a write
            // would not show: it would end the entry).
            let hung_up =
                || crate::io::wait::readable(&[w.as_raw_fd()], Some(Duration::ZERO)).unwrap()[0];
            assert!(
                !hung_up(),
                "the entry did not hold the descriptor ({read_ev})"
            );
            e.disarm();
            assert!(
                hung_up(),
                "the disarmed entry still holds the descriptor ({read_ev})"
            );
            // And the next sleep arms its entries again.
            let (r2, mut w2) = std::os::unix::net::UnixStream::pair().unwrap();
            r2.set_nonblocking(true).unwrap();
            w2.write_all(b"k").unwrap();
            let want = if read_ev {
                Ready::Read
            } else {
                Ready::Readable
            };
            let on = SleepOn {
                fds: [-1, r2.as_raw_fd()],
                ..on
            };
            assert_eq!(
                e.sleep(on, Some(Duration::from_secs(5))).unwrap(),
                [Ready::No, want]
            );
        }
    }

    #[test]
    fn a_sleep_reads_the_channel_and_writes_its_unmask_itself() {
        use std::os::unix::net::UnixDatagram;
        let (mut e, _pool, _dir) = engine();
        // `ours` stands for the event channel's descriptor; what the ring
        // writes to it (the unmask) arrives at `peer`, and what `peer` sends
        // (a kick) is what the ring reads.
        let (ours, peer) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        peer.set_nonblocking(true).unwrap();
        let on = SleepOn {
            fds: [-1, ours.as_raw_fd()],
            read_ev: true,
            unmask: Some(*b"UNMK"),
        };
        let mut got = [0u8; 8];
        // The unmask's own completion does not end the sleep.
        let t = Instant::now();
        assert_eq!(
            e.sleep(on, Some(Duration::from_millis(30))).unwrap(),
            [Ready::No; 2]
        );
        assert!(t.elapsed() >= Duration::from_millis(25), "woke early");
        assert_eq!(peer.recv(&mut got).ok(), Some(4), "no unmask written");
        assert_eq!(&got[..4], b"UNMK");
        // A kick while the read waits: the sleep ends with it taken.
        let on = SleepOn { unmask: None, ..on };
        let kicker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            peer.send(b"K").unwrap();
            peer
        });
        assert_eq!(e.sleep(on, None).unwrap(), [Ready::No, Ready::Read]);
        let peer = kicker.join().unwrap();
        assert_eq!(
            ours.recv(&mut got).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock,
            "the kick was left to read"
        );
        assert!(peer.recv(&mut got).is_err(), "an unmask nobody asked for");
        // Told once: the next sleep waits again.
        assert_eq!(
            e.sleep(on, Some(Duration::from_millis(10))).unwrap(),
            [Ready::No; 2]
        );
        // A kick the armed read took just before a flush cancelled it is
        // still handed over by the sleep that waits for the flush, and that
        // sleep writes its unmask itself (an entry would wait for the flush).
        peer.send(b"K").unwrap();
        e.push(IoOp::flush(9));
        let on = SleepOn {
            unmask: Some(*b"UNMK"),
            ..on
        };
        // Taken by the read before its cancel, or left for the caller.
        let woke = e.sleep(on, Some(Duration::from_secs(5))).unwrap()[1];
        let left = ours.recv(&mut got).is_ok();
        match woke {
            Ready::Read => assert!(!left, "a kick read and still there"),
            Ready::Readable => assert!(left, "a kick said readable and gone"),
            Ready::No => panic!("the kick was lost"),
        }
        assert_eq!(
            peer.recv(&mut got).ok(),
            Some(4),
            "no unmask while draining"
        );
        // The flush done (and reaped), the ring sleeps in itself again.
        let t = Instant::now();
        while e.in_flight() > 0 && t.elapsed() < Duration::from_secs(5) {
            let _ = e.sleep(polled([-1, -1]), Some(Duration::from_millis(10)));
            let mut out = Vec::new();
            e.reap(&mut out);
            for d in out {
                // (`IOSQE_CQE_SKIP_SUCCESS` anywhere in the ring would have
                // failed it with EOPNOTSUPP.)
                assert!(d.result.is_ok(), "the flush failed: {:?}", d.result);
            }
        }
        assert_eq!(e.in_flight(), 0, "the flush never completed");
        // A failed unmask is reported, once.
        // (Non-blocking: its read completes in the sleep that arms it.)
        let dead = std::os::unix::fs::OpenOptionsExt::custom_flags(
            std::fs::OpenOptions::new().read(true),
            libc::O_NONBLOCK,
        )
        .open("/dev/null")
        .unwrap();
        let on = SleepOn {
            fds: [-1, dead.as_raw_fd()],
            read_ev: true,
            unmask: Some(*b"UNMK"),
        };
        let _ = e.sleep(on, Some(Duration::from_secs(5))).unwrap();
        assert!(
            e.take_unmask_error().is_some(),
            "a failed unmask went unsaid"
        );
        assert!(e.take_unmask_error().is_none());
        // The channel's kicks still wake the ring.
        let on = SleepOn {
            fds: [-1, ours.as_raw_fd()],
            read_ev: true,
            unmask: None,
        };
        peer.send(b"K").unwrap();
        assert_eq!(
            e.sleep(on, Some(Duration::from_secs(5))).unwrap(),
            [Ready::No, Ready::Read]
        );
    }

    fn flight(tag: u64) -> Flight {
        Flight {
            tag,
            buf: None,
            guest: None,
            iov: Vec::new(),
        }
    }

    #[test]
    fn flights_are_found_by_their_key_once_and_keys_are_reused() {
        let mut f = Flights::default();
        let a = f.reserve();
        let b = f.reserve();
        assert_ne!(a, b);
        f.fill(a, flight(10));
        f.fill(b, flight(11));
        assert_eq!(f.len(), 2);
        assert_eq!(f.remove(b).map(|x| x.tag), Some(11));
        // A second completion for the same key, a cancel's key, one never
        // handed out: none finds a flight.
        assert!(f.remove(b).is_none());
        assert!(f.remove(u64::MAX).is_none());
        assert!(f.remove(7).is_none());
        assert_eq!(f.len(), 1);
        // The freed key is handed out again; the table did not grow.
        let c = f.reserve();
        assert_eq!(c, b);
        f.give_back(c);
        assert_eq!(f.reserve(), b);
        assert_eq!(f.slots.len(), 2);
        assert_eq!(f.remove(a).map(|x| x.tag), Some(10));
        assert!(f.is_empty());
    }
}
