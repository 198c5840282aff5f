//! One queue (ring) of a virtual block device: the serving loop.
//!
//! Each pass takes what the ring holds (at most a ring's worth), copies every
//! request out and validates the copy, starts the I/O of as many as the bounce
//! pool has room for (in ring order), submits them in one batch, and answers
//! what has completed. I/O completes in any order; answers are published in
//! ring order, so a request's slot is overwritten by its answer only once
//! every earlier request is answered too, and a daemon killed at any moment
//! leaves every unanswered request readable for the next one (see
//! `lifecycle::adopting`). Before sleeping the worker re-checks the ring
//! (`RING_FINAL_CHECK_FOR_REQUESTS`) and only then unmasks the event channel;
//! it sleeps on the event channel and on the engine's completions at once.
//! A request that breaks the protocol is answered and then halts this ring
//! alone, after the I/O already started has completed and been answered.
//!
//! Split along its seams: this module is the request state machine (take,
//! start, complete, answer); [`serve`] the thread that runs it (sleeping,
//! polling, stopping); [`transfer`] how data reaches guest pages (zero copy,
//! persistent grants, map mode, grant copy); [`stats`] the counters.
#![forbid(unsafe_code)]

mod serve;
mod stats;
mod transfer;

use serve::Polling;
pub use serve::{StopSignal, STORM_HALT};
pub use stats::{Latencies, LatencyHistogram, OpKind, QueueStats};
use transfer::Persistent;
pub use transfer::{MapBudget, MAP_BUDGET, MAX_PERSISTENT_GRANTS};

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use crate::abi::blkif::{BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, SECTOR_SIZE};
use crate::io::engine::Engine;
use crate::io::op::{GuestBufs, IoDone, IoKind, IoOp};
use crate::io::pool::{BouncePool, Buf, POOL_PAGE};
use crate::io::Disk;
use crate::ring::request::{parse, Limits, Operation, Parsed, Request};
use crate::ring::{BackRing, RingError};
use crate::vbd::limit::Limiter;
use crate::xen::mem::SharedMem;
use crate::xen::{DomId, EventChannel, Grants};

/// Bounce pool of a ring by default: 4 MiB, or one largest request if that is
/// more. With the ring itself and at most [`MAX_PERSISTENT_GRANTS`] kept
/// mappings (guest pages, not ours), this bounds a ring's memory.
pub const DEFAULT_POOL_BYTES: usize = 4 << 20;

/// Requests taken from the ring per pass: a pass runs without looking at
/// `stop` or the completions, so this bounds how long it takes; the ring's
/// final check brings the next batch.
const TAKE_PER_PASS: u32 = 32;

/// The least a pass takes when more waits: below it, a pass's system calls
/// (a submit, a notification) are paid for too few requests.
const MIN_BITE: u32 = 4;

/// Pages of bounce pool a ring gets: `pool_bytes` (see [`DEFAULT_POOL_BYTES`]),
/// and never less than one largest request (`max_segments` pages).
pub fn pool_pages(pool_bytes: usize, max_segments: usize) -> usize {
    (pool_bytes / POOL_PAGE).max(max_segments)
}

/// How a queue ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueEnd {
    /// Asked to stop.
    Stopped,
    /// The frontend broke the protocol; the ring is dead.
    Halted(RingError),
    /// The queue's thread ended without saying how (it panicked): the
    /// backend's fault, not the guest's; the ring is dead.
    Failed(String),
}

/// Where a taken request is.
#[derive(Debug)]
enum Stage {
    /// Validated, waiting for its turn (bounce buffers).
    Waiting(Request),
    /// I/O in flight. `flush_first`: a flush runs before the write.
    Running {
        req: Request,
        flush_first: bool,
        done: u64,
    },
    /// Answered (not yet published).
    Done(i16),
}

#[derive(Debug)]
struct Slot {
    id: u64,
    wire_op: u8,
    stage: Stage,
    /// The request's bounce buffer while it has one.
    buf: Option<Buf>,
    /// Or the guest pages its I/O runs on (zero copy).
    guest: Option<GuestBufs>,
    /// When it was taken from the ring, and its operation (for
    /// [`QueueStats::latency`]; `None`: refused when parsed, not timed).
    taken_at: std::time::Instant,
    kind: Option<OpKind>,
    /// The I/O limits let it start (it paid its tokens once).
    admitted: bool,
}

/// One ring being served.
pub struct Queue<G, E, D> {
    ring: BackRing<SharedMem>,
    /// Declared (so dropped) before `ev`: its teardown cancels the entries
    /// the ring holds on the event channel's descriptor, and submits an
    /// unmask still queued, while that descriptor is still open.
    engine: Engine,
    ev: E,
    masked: bool,
    grants: Arc<G>,
    disk: Arc<D>,
    pool: Arc<BouncePool>,
    domid: DomId,
    limits: Limits,
    stats: QueueStats,
    persistent: Persistent,
    /// Taken requests in ring order; `slots[0]` has sequence number `base`.
    slots: VecDeque<Slot>,
    base: u64,
    /// Set when a request broke the protocol: nothing more is taken.
    halt: Option<RingError>,
    /// Where `stats` is published for `blkbackd status`.
    counters: Option<Arc<std::sync::Mutex<QueueStats>>>,
    /// Map each request's grants (and unmap after the copy) instead of
    /// grant-copying them.
    map_mode: bool,
    /// A notification came since the last pass.
    kicked: bool,
    /// Requests taken by the last pass.
    taken: usize,
    /// Consecutive notifications that brought no new request.
    spurious: u32,
    /// Adaptive polling.
    polling: Polling,
    /// Completions the last pass handled.
    completed: usize,
    /// Do the disk I/O on the guest's pages where they are mapped (kept
    /// persistent grants, map mode) instead of through the bounce pool.
    zero_copy: bool,
    /// The vbd's I/O limits (shared by its queues), if any, and this
    /// queue's number among them.
    limiter: Option<(Arc<Limiter>, usize)>,
    /// When the limits let the oldest waiting request start.
    throttled_until: Option<std::time::Instant>,
    /// Limits no longer apply (the ring is draining to stop).
    unthrottled: bool,
    /// When the counters were last published.
    published_at: Duration,
    /// The vbd's share of the host's requests in flight, and what this
    /// queue counts in it.
    share: Option<(Arc<crate::vbd::share::VbdShare>, u32)>,
    /// Completions being handled (kept to reuse its allocation).
    reaped: Vec<IoDone>,
    /// A pass leaves its I/O queued for the serving loop (which submits it
    /// as it sleeps, or before the next pass) instead of submitting it.
    defer_submit: bool,
}

/// What a queue is made of (see [`Queue::new`]).
#[derive(Debug)]
pub struct QueueParts<G, E, D> {
    /// The mapped ring.
    pub ring: BackRing<SharedMem>,
    /// Its event channel.
    pub ev: E,
    /// Grant access, for the requests' segments.
    pub grants: Arc<G>,
    /// The disk.
    pub disk: Arc<D>,
    /// The I/O engine.
    pub engine: Engine,
    /// The bounce pool `engine` does its I/O in.
    pub pool: Arc<BouncePool>,
    /// The frontend's domain.
    pub domid: DomId,
    /// What requests are checked against.
    pub limits: Limits,
}

impl<G, E, D> std::fmt::Debug for Queue<G, E, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("domid", &self.domid)
            .field("engine", &self.engine.name())
            .field("stats", &self.stats)
            .finish()
    }
}

impl<G: Grants, E: EventChannel, D: Disk> Queue<G, E, D> {
    /// A queue over a mapped ring, doing its I/O with `engine` in buffers of
    /// `pool`.
    pub fn new(p: QueueParts<G, E, D>) -> Self {
        Queue {
            ring: p.ring,
            ev: p.ev,
            masked: true,
            grants: p.grants,
            disk: p.disk,
            engine: p.engine,
            pool: p.pool,
            domid: p.domid,
            limits: p.limits,
            stats: QueueStats::default(),
            persistent: Persistent::default(),
            slots: VecDeque::new(),
            base: 0,
            halt: None,
            counters: None,
            map_mode: false,
            kicked: false,
            taken: 0,
            spurious: 0,
            polling: Polling::default(),
            completed: 0,
            zero_copy: true,
            limiter: None,
            throttled_until: None,
            unthrottled: false,
            published_at: coarse_now(),
            share: None,
            reaped: Vec::new(),
            defer_submit: false,
        }
    }

    /// Keeps the vbd's requests in flight within its fair share while
    /// other vbds are busy (`share` is the vbd's, shared by its queues).
    pub fn with_share(mut self, share: Arc<crate::vbd::share::VbdShare>) -> Self {
        self.share = Some((share, 0));
        self
    }

    /// Tells the vbd's share what this queue has in flight now.
    pub(super) fn account_share(&mut self) {
        let now = u32::try_from(self.engine.in_flight()).unwrap_or(u32::MAX);
        if let Some((s, mine)) = &mut self.share {
            if *mine != now {
                s.account(*mine, now);
                *mine = now;
            }
        }
    }

    /// This queue counts for nothing in the vbd's share any more (it
    /// stopped; what a hung disk still holds is abandoned with it).
    pub(super) fn leave_share(&mut self) {
        if let Some((s, mine)) = &mut self.share {
            s.account(*mine, 0);
            *mine = 0;
        }
    }

    /// Holds requests to `limiter`'s limits (shared with the vbd's other
    /// queues, this one being number `index`): a request over them waits,
    /// taken but not started.
    pub fn with_limiter(mut self, limiter: Arc<Limiter>, index: usize) -> Self {
        self.limiter = Some((limiter, index));
        self
    }

    /// Publishes this ring's counters into `slot` after every pass.
    pub fn with_counters(mut self, slot: Arc<std::sync::Mutex<QueueStats>>) -> Self {
        self.counters = Some(slot);
        self
    }

    /// Copies the counters where `blkbackd status` reads them: at most
    /// once a millisecond while busy (the copy carries the histograms),
    /// and always when `now` (before the queue sleeps or stops).
    fn publish_counters(&mut self, now: bool) {
        if let Some(c) = &self.counters {
            let t = coarse_now();
            if now || t.saturating_sub(self.published_at) >= Duration::from_millis(1) {
                self.published_at = t;
                *c.lock().unwrap_or_else(|e| e.into_inner()) = self.stats.clone();
            }
        }
    }

    /// The engine, for a caller that drives the queue pass by pass (the
    /// serving loop's fuzz target completes a scripted engine's operations).
    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Requests taken from the ring and not yet answered.
    pub fn unanswered(&self) -> usize {
        self.slots.len()
    }

    /// Why the ring stopped being served, if a request broke the protocol.
    pub fn halted(&self) -> Option<&RingError> {
        self.halt.as_ref()
    }

    /// What the queue counted so far.
    pub fn stats(&self) -> &QueueStats {
        &self.stats
    }

    /// One pass: take (unless halted), start, submit, complete, answer; the
    /// serving loop's unit of work ([`Queue::run`] calls it), public so a
    /// caller can drive the queue pass by pass.
    pub fn pass(&mut self) {
        let kicked = std::mem::take(&mut self.kicked);
        self.taken = 0;
        if self.halt.is_none() {
            self.take();
        }
        if kicked {
            if self.taken == 0 {
                self.spurious = self.spurious.saturating_add(1);
                self.stats.spurious_kicks += 1;
            } else {
                self.spurious = 0;
            }
        }
        self.advance();
        self.publish();
        self.publish_counters(false);
    }

    /// Starts what waits, submits, and handles the completions; again while
    /// completions free room for requests that wait for it. A request that
    /// waits for buffers is started as soon as they come back, not at the
    /// guest's next kick: a guest that has said all it had to say (and will
    /// not kick again until answered) must still be answered.
    fn advance(&mut self) {
        self.completed = 0;
        loop {
            self.start_waiting();
            if !self.defer_submit || self.engine.submit_in_pass() {
                self.engine.submit();
            }
            let completed = self.complete();
            self.completed += completed;
            if completed == 0 || !self.has_waiting() {
                break;
            }
        }
        // What the completions resubmitted (the rest of a short transfer).
        if !self.defer_submit || self.engine.submit_in_pass() {
            self.engine.submit();
        }
    }

    fn has_waiting(&self) -> bool {
        self.slots
            .iter()
            .any(|s| matches!(s.stage, Stage::Waiting(_)))
    }

    /// Takes what the ring holds (at most a ring's worth): each request is
    /// copied out, validated, and queued in ring order.
    fn take(&mut self) {
        // A pass answers what it took before it takes more. A bite of a
        // quarter of what waits lets the guest see its first answers, and
        // send more, while the rest are served: the two sides overlap
        // instead of taking turns with the whole ring.
        let waiting = self.ring.unconsumed().unwrap_or(TAKE_PER_PASS);
        let raws = match self.ring.take((waiting / 4).clamp(MIN_BITE, TAKE_PER_PASS)) {
            Ok(r) => r,
            Err(e) => {
                self.halt = Some(e);
                return;
            }
        };
        self.taken = raws.len();
        // One clock read for the pass's requests, not one each: where the
        // clock is a system call (a Xen PV dom0 whose clock source the vDSO
        // cannot read), every read costs a trip through the hypervisor.
        let now = std::time::Instant::now();
        // The disk may have grown (resize): check requests against its size now.
        self.limits.disk_sectors = self.disk.sectors();
        for raw in raws {
            let slot = match parse(&raw, self.ring.abi(), &self.limits) {
                Ok(Parsed::Ready(req)) => Slot::waiting(req, now),
                Ok(Parsed::Indirect(h)) => match self.indirect(&h) {
                    Ok(req) => Slot::waiting(req, now),
                    Err(r) => {
                        if r.halt {
                            self.halt = Some(RingError::Protocol(r.reason.to_string()));
                        }
                        Slot::done(r.id, r.wire_op, r.status, now)
                    }
                },
                Err(r) => {
                    tracing::debug!(domid = %self.domid, id = r.id, "request refused: {}", r.reason);
                    if r.halt {
                        self.halt = Some(RingError::Protocol(r.reason.to_string()));
                    }
                    Slot::done(r.id, r.wire_op, r.status, now)
                }
            };
            self.slots.push_back(slot);
            if self.halt.is_some() {
                break;
            }
        }
        let running = self.slots.len() as u64;
        self.stats.in_flight_peak = self.stats.in_flight_peak.max(running);
    }

    /// Starts the waiting requests in ring order while the I/O limits
    /// allow and buffers last.
    fn start_waiting(&mut self) {
        self.throttled_until = None;
        // The clock only where limits need it (see `take`).
        let now = self.limiter.is_some().then(std::time::Instant::now);
        self.account_share();
        for i in 0..self.slots.len() {
            let Stage::Waiting(req) = &self.slots[i].stage else {
                continue;
            };
            // Beside other busy vbds, this one starts no more than its
            // share (but always one, if this queue has none in flight: its
            // completions are what wakes it to start the rest).
            if let Some((s, _)) = &self.share {
                if !self.unthrottled && s.room() == 0 && self.engine.in_flight() > 0 {
                    self.stats.share_waits += 1;
                    break;
                }
            }
            if !self.slots[i].admitted && !self.unthrottled {
                if let (Some((l, q)), Some(now)) = (&self.limiter, now) {
                    let bytes = if req.segments.is_empty() {
                        0
                    } else {
                        req.nr_sectors.saturating_mul(SECTOR_SIZE)
                    };
                    let r = l.admit(*q, bytes, now);
                    if let Err(wait) = r {
                        // Over the limit: it and everything after it wait
                        // (ring order is kept), the serving loop wakes then.
                        self.throttled_until = Some(now + wait);
                        self.stats.throttled += 1;
                        return;
                    }
                }
                self.slots[i].admitted = true;
            }
            let Stage::Waiting(req) = std::mem::replace(&mut self.slots[i].stage, Stage::Done(0))
            else {
                unreachable!("checked above");
            };
            match self.start(i, req) {
                Ok(()) => {
                    self.account_share();
                    let used = (self.pool.in_use() * crate::io::pool::POOL_PAGE) as u64;
                    self.stats.pool_peak_bytes = self.stats.pool_peak_bytes.max(used);
                }
                Err(req) => {
                    // No room in the pool: it and everything after it wait
                    // for buffers to come back (ring order is kept).
                    self.slots[i].stage = Stage::Waiting(req);
                    self.stats.buffer_waits += 1;
                    break;
                }
            }
        }
        // Nothing here waits for the limits now: the vbd's other queues go.
        if let (Some((l, q)), Some(now)) = (&self.limiter, now) {
            l.done(*q, now);
        }
    }

    /// Starts one request, or gives it back when the pool is full.
    fn start(&mut self, i: usize, req: Request) -> Result<(), Request> {
        let tag = self.base + i as u64;
        // A flush without data names no sectors: Linux sends sector_number
        // (sector_t)-1 for it, which must not be taken for an offset.
        let off = req.sector.checked_mul(SECTOR_SIZE);
        let len = req.nr_sectors.checked_mul(SECTOR_SIZE);
        let has_data = !req.segments.is_empty();
        let (off, len) = match (off, len) {
            (Some(o), Some(l)) => (o, l),
            _ if !has_data && matches!(req.op, Operation::Flush | Operation::Barrier) => (0, 0),
            _ => {
                tracing::debug!(domid = %self.domid, id = req.id, "request range overflows");
                self.finish(i, &req, BLKIF_RSP_ERROR);
                return Ok(());
            }
        };
        let mut buf = None;
        let mut guest = None;
        let writes = req.op.writes(req.segments.len());
        if has_data {
            match self.zero_copy_bufs(&req, writes) {
                Ok(g) => guest = g,
                Err(e) => {
                    tracing::debug!(domid = %self.domid, id = req.id, "{e}");
                    self.finish(i, &req, BLKIF_RSP_ERROR);
                    return Ok(());
                }
            }
        }
        if guest.is_some() {
            self.stats.zero_copy += 1;
        } else if has_data {
            let Some(mut b) = self.pool.alloc(len as usize) else {
                return Err(req);
            };
            if writes {
                if let Err(e) = self.copy_in(&req, &mut b) {
                    e.log(self.domid, req.id);
                    self.pool.free(b);
                    self.finish(i, &req, e.answer());
                    return Ok(());
                }
            }
            buf = Some(b);
        }
        let (kind, flush_first) = match req.op {
            Operation::Read => (IoKind::Read, false),
            Operation::Write => (IoKind::Write, false),
            Operation::Flush | Operation::Barrier => (IoKind::Flush, has_data),
            Operation::Discard { .. } => (IoKind::Discard, false),
        };
        let op = match kind {
            IoKind::Flush => IoOp::flush(tag),
            _ => IoOp {
                tag,
                kind,
                off,
                len,
                buf: buf.take(),
                guest: guest.take(),
                buf_off: 0,
                drain: false,
            },
        };
        self.engine.push(op);
        let slot = &mut self.slots[i];
        slot.buf = buf;
        slot.guest = guest;
        slot.stage = Stage::Running {
            req,
            flush_first,
            done: 0,
        };
        Ok(())
    }

    /// Handles every completion the engine has; returns how many.
    fn complete(&mut self) -> usize {
        // One vector for every pass (its capacity stays): no allocation
        // per pass on the serving thread.
        let mut done = std::mem::take(&mut self.reaped);
        self.engine.reap(&mut done);
        let n = done.len();
        for d in done.drain(..) {
            self.completed(d);
        }
        self.reaped = done;
        n
    }

    fn completed(&mut self, d: IoDone) {
        let Some(i) = d.tag.checked_sub(self.base).map(|i| i as usize) else {
            return;
        };
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        if let Some(b) = d.buf {
            slot.buf = Some(b);
        }
        if let Some(g) = d.guest {
            slot.guest = Some(g);
        }
        let Stage::Running {
            req,
            flush_first,
            done,
        } = std::mem::replace(&mut slot.stage, Stage::Done(BLKIF_RSP_ERROR))
        else {
            return;
        };
        let n = match d.result {
            Ok(n) => n as u64,
            Err(e)
                if e.raw_os_error() == Some(libc::EFAULT) && slot.guest.is_some() && done == 0 =>
            {
                // The kernel could not do I/O on these guest pages (a grant
                // mapping it cannot pin): this queue goes back to the bounce
                // pool, and the request starts again through it.
                tracing::info!(domid = %self.domid, "disk I/O on mapped guest pages refused ({e}): copying through the bounce pool from now on");
                self.zero_copy = false;
                slot.guest = None;
                if self.map_mode && !self.persistent.enabled {
                    self.persistent.release_transient();
                }
                self.stats.zero_copy = self.stats.zero_copy.saturating_sub(1);
                slot.stage = Stage::Waiting(req);
                return;
            }
            Err(e) => {
                tracing::debug!(domid = %self.domid, id = req.id, "request failed: {e}");
                self.finish(i, &req, BLKIF_RSP_ERROR);
                return;
            }
        };
        let len = req.nr_sectors * SECTOR_SIZE;
        if flush_first {
            // The flush before a barrier's or flush's data: now the write.
            self.resubmit(i, req, 0, IoKind::Write, len);
            return;
        }
        let kind = match req.op {
            Operation::Read => IoKind::Read,
            Operation::Write | Operation::Flush | Operation::Barrier => IoKind::Write,
            Operation::Discard { .. } => IoKind::Discard,
        };
        let transferred = done + n;
        let moves_data = !req.segments.is_empty();
        if moves_data && transferred < len {
            if n == 0 {
                tracing::debug!(domid = %self.domid, id = req.id, "short transfer at {transferred} of {len} bytes");
                self.finish(i, &req, BLKIF_RSP_ERROR);
            } else {
                // A short read or write: go on from where it stopped.
                self.resubmit(i, req, transferred, kind, len);
            }
            return;
        }
        let status = if req.op == Operation::Read && self.slots[i].guest.is_none() {
            match self.copy_out_slot(i, &req) {
                Ok(()) => BLKIF_RSP_OKAY,
                Err(e) => {
                    e.log(self.domid, req.id);
                    e.answer()
                }
            }
        } else {
            BLKIF_RSP_OKAY
        };
        self.finish(i, &req, status);
    }

    /// Submits the rest of a request: bytes `from..len` of its buffer.
    fn resubmit(&mut self, i: usize, req: Request, from: u64, kind: IoKind, len: u64) {
        let tag = self.base + i as u64;
        let buf = self.slots[i].buf.take();
        let guest = self.slots[i].guest.take();
        if buf.is_none() && guest.is_none() {
            self.finish(i, &req, BLKIF_RSP_ERROR);
            return;
        }
        self.engine.push(IoOp {
            tag,
            kind,
            off: req.sector * SECTOR_SIZE + from,
            len: len - from,
            buf,
            guest,
            buf_off: from as usize,
            drain: false,
        });
        self.slots[i].stage = Stage::Running {
            req,
            flush_first: false,
            done: from,
        };
    }

    /// Records a request's answer and gives its buffer back.
    fn finish(&mut self, i: usize, req: &Request, status: i16) {
        let slot = &mut self.slots[i];
        if let Some(b) = slot.buf.take() {
            self.pool.free(b);
        }
        // Unpins the guest pages (map mode: unmaps them): the I/O is done.
        if slot.guest.take().is_some() && self.map_mode && !self.persistent.enabled {
            self.persistent.release_transient();
        }
        slot.stage = Stage::Done(status);
        match req.op {
            Operation::Read => self.stats.reads += 1,
            Operation::Write => self.stats.writes += 1,
            Operation::Flush | Operation::Barrier => self.stats.flushes += 1,
            Operation::Discard { .. } => self.stats.discards += 1,
        }
        if status == BLKIF_RSP_OKAY && !req.segments.is_empty() {
            self.stats.bytes += req.nr_sectors * SECTOR_SIZE;
        }
    }

    /// Answers, in ring order, every request answered so far from the oldest
    /// on; notifies per the ring's event suppression.
    fn publish(&mut self) {
        let mut any = false;
        // Read once, when the first answer goes out (see `take`).
        let mut answered = None;
        while let Some(Slot {
            stage: Stage::Done(status),
            ..
        }) = self.slots.front()
        {
            let status = *status;
            let slot = self.slots.pop_front().expect("front exists");
            self.base += 1;
            if status == BLKIF_RSP_OKAY {
                self.stats.ok += 1;
            } else {
                self.stats.errors += 1;
            }
            self.ring.put_response(slot.id, slot.wire_op, status);
            if let Some(k) = slot.kind {
                self.stats.latency.get_mut(k).record(
                    answered
                        .get_or_insert_with(std::time::Instant::now)
                        .saturating_duration_since(slot.taken_at),
                );
            }
            any = true;
        }
        if any && self.ring.push_responses() {
            self.stats.notifications += 1;
            if let Err(e) = self.ev.notify() {
                tracing::debug!(domid = %self.domid, "notify failed: {e}");
            }
        }
    }
}

/// The time since boot by the coarse monotonic clock (to the last tick): the
/// vDSO reads it without the clock source, so it costs no system call where
/// the precise clock does (a Xen PV dom0). Zero if it cannot be read.
fn coarse_now() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map(Duration::from)
        .unwrap_or_default()
}

impl Slot {
    fn waiting(req: Request, taken_at: std::time::Instant) -> Slot {
        let kind = match req.op {
            Operation::Read => OpKind::Read,
            Operation::Write => OpKind::Write,
            Operation::Flush | Operation::Barrier => OpKind::Flush,
            Operation::Discard { .. } => OpKind::Discard,
        };
        Slot {
            kind: Some(kind),
            admitted: false,
            id: req.id,
            wire_op: req.wire_op,
            stage: Stage::Waiting(req),
            buf: None,
            guest: None,
            taken_at,
        }
    }

    fn done(id: u64, wire_op: u8, status: i16, taken_at: std::time::Instant) -> Slot {
        Slot {
            id,
            wire_op,
            stage: Stage::Done(status),
            buf: None,
            guest: None,
            taken_at,
            kind: None,
            admitted: true,
        }
    }
}
