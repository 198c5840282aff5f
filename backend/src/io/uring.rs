//! The io_uring engine: one ring per guest ring.
//!
//! Reads and writes go to the kernel in batches (one `io_uring_enter` per
//! ring pass), from and into the ring's bounce pool, which is registered as
//! a fixed buffer when the kernel allows it. A request aligned to the disk's
//! direct-I/O alignment uses the `O_DIRECT` descriptor; any other request
//! takes the buffered one, so alignment never makes a request fail. A flush
//! is an `fdatasync` that the engine starts only after every operation
//! started before it has completed, holding back what comes after it until
//! it is done ([`DrainOrder`]; not `IOSQE_IO_DRAIN`, which would wait for the
//! sleep's own entries too). Discards on files punch holes
//! with `IORING_OP_FALLOCATE`; `BLKDISCARD` has no io_uring opcode on the
//! kernels we support, so block-device discards go to a side worker thread.
//!
//! The thread serving the ring sleeps in `io_uring_enter` itself
//! ([`UringEngine::sleep`]): the event channel and the stop signal are polled
//! by the same ring (`IORING_OP_POLL_ADD`; the event channel is read,
//! `IORING_OP_READ`, where it can be, and its unmask written by the ring
//! too), so one system call submits the pass's I/O and waits for whichever
//! comes first, a completion or a kick.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};

use super::engine::{Ready, SleepOn};
use super::op::{DrainOrder, GuestBufs, IoDone, IoKind, IoOp};
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
/// bounded by what is in flight) and above the unmask's, below the cancels'
/// `u64::MAX`.
const POLL_KEY: u64 = u64::MAX - 1 - POLLED as u64;
/// `user_data` of an event channel's unmask written by the ring.
const UNMASK_KEY: u64 = POLL_KEY - 1;
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
    /// The ring writes the event channel's unmask: every entry of a
    /// submission goes in even if one before it fails
    /// (`IORING_SETUP_SUBMIT_ALL`), so the sleep can count on the unmask's
    /// completion. Otherwise it is a `write(2)`.
    carry_unmask: bool,
    /// The unmask's bytes (the channel's port, the same for every write):
    /// the kernel reads them after the entry went in.
    unmask_buf: Option<Box<[u8; 4]>>,
    /// Unmask writes the kernel has not completed.
    unmasks: u32,
    /// An unmask is queued and not yet submitted: its completion (at
    /// submission) must not end the sleep that submits it.
    unmask_queued: bool,
    /// The first unmask that failed since the caller last asked.
    unmask_err: Option<io::Error>,
    /// The last submission made in a pass found completions on return
    /// (page-cache hits, a RAM disk): see [`UringEngine::submit_in_pass`].
    completes_inline: bool,
    /// Passes that left their I/O to the sleep since the last look at
    /// whether the disk completes inline.
    deferred: u32,
    /// Operations held back by a flush (see [`DrainOrder`]).
    order: DrainOrder,
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
        // Submit-all (Linux 5.18) lets the ring carry the unmask; without
        // it the unmask is a system call of its own.
        let build = |submit_all: bool| {
            let mut b = IoUring::builder();
            b.setup_cqsize(ENTRIES * 2);
            if submit_all {
                b.setup_submit_all();
            }
            b.build(ENTRIES)
        };
        let (ring, carry_unmask) = match build(true) {
            Ok(r) => (r, true),
            Err(_) => (build(false)?, false),
        };
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
            carry_unmask,
            unmask_buf: None,
            unmasks: 0,
            unmask_queued: false,
            unmask_err: None,
            completes_inline: true,
            deferred: 0,
            order: DrainOrder::default(),
        })
    }

    /// Whether aligned requests use `O_DIRECT`.
    pub fn direct(&self) -> bool {
        self.target.direct.is_some()
    }

    /// Operations pushed and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.started() + self.done.len() + self.order.len()
    }

    /// Operations started and not completed (the ring's and the side
    /// thread's).
    fn started(&self) -> usize {
        self.flights.len() + self.side.as_ref().map_or(0, |s| s.in_flight)
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
        Ok(e.user_data(ud))
    }

    /// Queues `op`; it reaches the kernel at the next [`UringEngine::submit`]
    /// (a flush, and what follows it, once the flush may start).
    pub fn push(&mut self, op: IoOp) {
        self.order.hold(op);
        self.start_ready();
    }

    /// Starts held operations in order, as far as a flush allows.
    fn start_ready(&mut self) {
        while let Some(op) = self.order.next(self.started()) {
            self.start(op);
        }
    }

    /// `op` ended before it reached the disk.
    fn fail(&mut self, op: IoOp, e: io::Error) {
        self.order.done(op.tag);
        self.done.push(IoDone::failed(op, e));
    }

    fn start(&mut self, op: IoOp) {
        if op.kind == IoKind::Discard && self.target.discard == DiscardKind::Block {
            // No io_uring opcode for BLKDISCARD: a side thread does it.
            if self.side.is_none() {
                match ThreadEngine::new(self.disk.clone(), self.pool.clone()) {
                    Ok(t) => self.side = Some(t),
                    Err(e) => return self.fail(op, e),
                }
            }
            if let Some(side) = &mut self.side {
                side.push(op);
            }
            return;
        }
        if op.kind == IoKind::Discard && self.target.discard == DiscardKind::None {
            let unsupported = io::Error::from_raw_os_error(libc::EOPNOTSUPP);
            return self.fail(op, unsupported);
        }
        let ud = self.flights.reserve();
        let mut iov = Vec::new();
        let entry = match self.entry(&op, ud, &mut iov) {
            Ok(e) => e,
            Err(e) => {
                self.flights.give_back(ud);
                return self.fail(op, e);
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
        self.unmask_queued &= self.unsubmitted == 0;
        while self.unsubmitted > 0 {
            match self.ring.submit() {
                Ok(n) => self.unsubmitted = self.unsubmitted.saturating_sub(n.max(1)),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => {
                    // Completions must be reaped before more can go in; they
                    // are, by the caller's next reap. Keep the rest queued.
                    let mut out = Vec::new();
                    self.collect(&mut out);
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

    /// Moves the completions available now into `out`, and starts what
    /// they let start (a flush they held back, or what a flush held).
    pub fn reap(&mut self, out: &mut Vec<IoDone>) {
        self.collect(out);
        self.start_ready();
    }

    /// [`UringEngine::reap`] without starting anything.
    fn collect(&mut self, out: &mut Vec<IoDone>) {
        out.append(&mut self.done);
        self.take_cqes(out);
        if let Some(s) = &mut self.side {
            let from = out.len();
            s.reap(out);
            for d in &out[from..] {
                self.order.done(d.tag);
            }
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
            if ud == UNMASK_KEY {
                self.unmasks = self.unmasks.saturating_sub(1);
                if r != 4 && self.unmask_err.is_none() {
                    self.unmask_err = Some(if r < 0 {
                        io::Error::from_raw_os_error(-r)
                    } else {
                        io::Error::from(io::ErrorKind::WriteZero)
                    });
                }
                continue;
            }
            let Some(f) = self.flights.remove(ud) else {
                continue;
            };
            self.order.done(f.tag);
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
    /// to it by the ring in the same call (where the kernel submits every
    /// entry of a call: see `carry_unmask`): a kick then costs the thread no
    /// `read` and no `write` of its own.
    pub fn sleep(&mut self, on: SleepOn, timeout: Option<Duration>) -> io::Result<[Ready; 2]> {
        let fds = on.fds;
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
            // Its completion is counted, not hidden: `IOSQE_CQE_SKIP_SUCCESS`
            // would leave a teardown unable to tell when the kernel is done
            // with the bytes.
            self.push_unmask(fds[1], bytes);
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
        // An unmask this call submits completes at once: wait for one more.
        let unmask = usize::from(std::mem::take(&mut self.unmask_queued));
        let wait = if done.is_empty() && !ready(&self.fired) {
            1 + unmask
        } else {
            0
        };
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

    /// Queues the event channel's unmask, `bytes` written to `fd` by the
    /// ring (with the next submission), or writes it now where the ring
    /// cannot carry it.
    fn push_unmask(&mut self, fd: RawFd, bytes: [u8; 4]) {
        if !self.carry_unmask || fd < 0 {
            return self.unmask_now(fd, bytes);
        }
        match &mut self.unmask_buf {
            Some(b) if **b == bytes => {}
            // Other bytes while a write of the old ones is out: that write
            // still reads them.
            Some(_) if self.unmasks > 0 => return self.unmask_now(fd, bytes),
            slot => *slot = Some(Box::new(bytes)),
        }
        let Some(b) = &self.unmask_buf else { return };
        let write = opcode::Write::new(types::Fd(fd), b.as_ptr(), 4)
            .offset(u64::MAX)
            .build()
            .user_data(UNMASK_KEY);
        // SAFETY: the bytes are on the heap, never changed while a write of
        // them is out (`unmasks`), and leaked by a teardown that cannot see
        // its completion (see `disarm`); the descriptor is the caller's and
        // outlives the entry (the sleep's caller holds it).
        while unsafe { self.ring.submission().push(&write) }.is_err() {
            self.submit_queued();
        }
        self.unsubmitted += 1;
        self.unmasks += 1;
        self.unmask_queued = true;
    }

    /// Writes the unmask with a system call of its own.
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
        while (self.armed.iter().any(Option::is_some) || self.unmasks > 0)
            && Instant::now() < deadline
        {
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
        if self.unmasks > 0 {
            tracing::warn!("an event channel unmask outlived the teardown: leaking its bytes");
            std::mem::forget(self.unmask_buf.take());
            self.unmasks = 0;
            // Its late completion would be counted against a later write's
            // bytes: the ring carries no unmask again.
            self.carry_unmask = false;
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // What a flush still holds back never starts: the guest was not
        // answered for it, and a write started now could land after the
        // ring was given up (and handed to the next daemon).
        self.order = DrainOrder::default();
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
            // Collected, not reaped: reaping would start what they let start.
            let mut out = Vec::new();
            self.collect(&mut out);
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
    fn a_flush_starts_after_the_io_before_it_and_before_the_io_after_it() {
        let (mut e, pool, _dir) = engine();
        let mut buf = pool.alloc(4096).unwrap();
        pool.slice_mut(&mut buf).fill(0xAB);
        let rw = |tag, kind, buf| IoOp {
            tag,
            kind,
            off: 8192,
            len: 4096,
            buf: Some(buf),
            guest: None,
            buf_off: 0,
            drain: false,
        };
        e.push(rw(1, IoKind::Write, buf));
        e.push(IoOp::flush(2));
        e.push(rw(3, IoKind::Read, pool.alloc(4096).unwrap()));
        // Only the write went to the ring; the flush waits for it, the read
        // for the flush.
        assert_eq!((e.queued(), e.in_flight()), (1, 3));
        let mut order = Vec::new();
        let t = Instant::now();
        while order.len() < 3 && t.elapsed() < Duration::from_secs(5) {
            let started = e.queued();
            let _ = e.sleep(polled([-1, -1]), Some(Duration::from_secs(1)));
            let mut out = Vec::new();
            e.reap(&mut out);
            // One operation at a time: each one's end starts the next.
            assert!(started <= 1 && out.len() <= 1, "{out:?}");
            for d in out {
                assert!(d.result.is_ok(), "{} failed: {:?}", d.tag, d.result);
                if d.tag == 3 {
                    let b = d.buf.as_ref().unwrap();
                    assert!(
                        pool.slice(b).iter().all(|&x| x == 0xAB),
                        "read before the write"
                    );
                }
                order.push(d.tag);
                if let Some(b) = d.buf {
                    pool.free(b);
                }
            }
        }
        assert_eq!(order, [1, 2, 3]);
        assert_eq!(e.in_flight(), 0);
    }

    #[test]
    fn a_dropped_engine_starts_nothing_a_flush_held_back() {
        let (mut e, pool, dir) = engine();
        let write = |tag, off, byte: u8| {
            let mut buf = pool.alloc(4096).unwrap();
            pool.slice_mut(&mut buf).fill(byte);
            IoOp {
                tag,
                kind: IoKind::Write,
                off,
                len: 4096,
                buf: Some(buf),
                guest: None,
                buf_off: 0,
                drain: false,
            }
        };
        // Torn down with a write in flight and a flush and a write behind
        // it: the first is the kernel's (cancelled or completed), the others
        // were never started and must not be once the ring is given up.
        e.push(write(1, 0, 0x11));
        e.push(IoOp::flush(2));
        e.push(write(3, 4096, 0x33));
        assert_eq!((e.queued(), e.in_flight()), (1, 3));
        drop(e);
        let disk = std::fs::read(dir.path().join("disk")).unwrap();
        assert!(
            disk[4096..8192].iter().all(|&b| b == 7),
            "a write held behind the flush reached the disk after teardown"
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
        assert!(
            e.carry_unmask,
            "this kernel submits all: the ring writes the unmask"
        );
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
        // A flush pushed while the read is armed neither waits for the read
        // (a kick that never comes) nor disturbs it: the flush completes,
        // and the kick is read by the same entry, with the unmask carried.
        e.push(IoOp::flush(9));
        let on = SleepOn {
            unmask: Some(*b"UNMK"),
            ..on
        };
        let t = Instant::now();
        let mut out = Vec::new();
        while out.is_empty() && t.elapsed() < Duration::from_secs(5) {
            assert_eq!(
                e.sleep(on, Some(Duration::from_secs(5))).unwrap(),
                [Ready::No; 2],
                "woken by no kick"
            );
            e.reap(&mut out);
        }
        assert_eq!(out.len(), 1, "the flush waited for the channel's read");
        assert!(
            out[0].result.is_ok(),
            "the flush failed: {:?}",
            out[0].result
        );
        assert_eq!(peer.recv(&mut got).ok(), Some(4), "no unmask");
        peer.send(b"K").unwrap();
        let on = SleepOn { unmask: None, ..on };
        assert_eq!(
            e.sleep(on, Some(Duration::from_secs(5))).unwrap(),
            [Ready::No, Ready::Read]
        );
        assert_eq!(e.in_flight(), 0);
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
