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
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::abi::blkif::{GrantRef, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, SECTOR_SIZE, XEN_PAGE_SIZE};
use crate::abi::sys::GNTST_OKAY;
use crate::io::engine::{Engine, IoDone, IoKind, IoOp};
use crate::io::pool::{BouncePool, Buf, POOL_PAGE};
use crate::io::Disk;
use crate::ring::request::{parse, IndirectHeader, Limits, Operation, Parsed, Request};
use crate::ring::{BackRing, RingError};
use crate::xen::mem::SharedMem;
use crate::xen::{CopySeg, DomId, EventChannel, Grants};

/// What a queue did, for status reports and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueStats {
    /// Requests answered OKAY.
    pub ok: u64,
    /// Requests answered with an error status.
    pub errors: u64,
    /// Reads, writes, flushes (and barriers) and discards answered.
    pub reads: u64,
    /// See `reads`.
    pub writes: u64,
    /// See `reads`.
    pub flushes: u64,
    /// See `reads`.
    pub discards: u64,
    /// Bytes moved to or from the guest.
    pub bytes: u64,
    /// Notifications sent to the frontend.
    pub notifications: u64,
    /// Kicks received from the frontend.
    pub kicks: u64,
    /// Grants mapped and kept (persistent grants).
    pub persistent_maps: u64,
    /// Segments served through a kept mapping instead of a grant copy.
    pub persistent_hits: u64,
    /// Segments served through a per-request mapping (map mode).
    pub mapped_segments: u64,
    /// Most requests in flight at once.
    pub in_flight_peak: u64,
    /// Times a request waited for bounce buffers.
    pub buffer_waits: u64,
    /// Most bounce-pool bytes in use at once (bounded by the pool's size).
    #[serde(default)]
    pub pool_peak_bytes: u64,
    /// Notifications that brought no new request.
    #[serde(default)]
    pub spurious_kicks: u64,
    /// Grants served by copy because the daemon-wide budget of kept
    /// mappings was spent.
    #[serde(default)]
    pub persistent_over_budget: u64,
    /// Polling windows (after a pass that found work) that found more.
    #[serde(default)]
    pub poll_hits: u64,
    /// Nanoseconds spent polling.
    #[serde(default)]
    pub poll_ns: u64,
    /// How long requests spent in the backend, from being taken off the
    /// ring to their answer being written (waiting for buffers, the disk,
    /// the copies, waiting for older answers): its own share of the latency
    /// a guest sees, without the wake-ups on either side.
    #[serde(default)]
    pub latency: LatencyHistogram,
}

/// Counts of durations in powers of two of microseconds: bucket 0 holds
/// under 1 µs, bucket `i` holds `[2^(i-1), 2^i)` µs, the last everything
/// longer.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LatencyHistogram {
    /// The counts.
    pub buckets: [u64; LatencyHistogram::BUCKETS],
}

impl LatencyHistogram {
    /// Buckets: up to 2^22 µs (4 s), then one for the rest.
    pub const BUCKETS: usize = 24;

    /// Counts one duration.
    pub fn record(&mut self, d: Duration) {
        let us = d.as_micros();
        let i = if us == 0 {
            0
        } else {
            (128 - us.leading_zeros()) as usize
        };
        self.buckets[i.min(Self::BUCKETS - 1)] += 1;
    }

    /// Adds `other`'s counts.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
    }

    /// The upper bound, in µs, of the bucket that holds the `q`th quantile
    /// (0..=1); `None` when nothing was counted.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(1u64 << i);
            }
        }
        Some(1u64 << (Self::BUCKETS - 1))
    }
}

#[cfg(test)]
mod latency_tests {
    use super::*;

    #[test]
    fn durations_land_in_power_of_two_buckets_and_quantiles_bound_them() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.quantile_us(0.5), None);
        h.record(Duration::from_nanos(300)); // bucket 0: under 1 µs
        h.record(Duration::from_micros(1)); // bucket 1: [1, 2)
        h.record(Duration::from_micros(3)); // bucket 2: [2, 4)
        h.record(Duration::from_micros(100)); // bucket 7: [64, 128)
        h.record(Duration::from_secs(60)); // the last bucket
        assert_eq!(h.buckets[0], 1);
        assert_eq!(h.buckets[1], 1);
        assert_eq!(h.buckets[2], 1);
        assert_eq!(h.buckets[7], 1);
        assert_eq!(h.buckets[LatencyHistogram::BUCKETS - 1], 1);
        assert_eq!(h.quantile_us(0.5), Some(4)); // the third of five: under 4 µs
        assert_eq!(h.quantile_us(0.8), Some(128));
        let mut m = LatencyHistogram::default();
        m.merge(&h);
        m.merge(&h);
        assert_eq!(m.buckets.iter().sum::<u64>(), 10);
    }
}

/// Adaptive polling (`[io] poll_us`): after a pass that found work, the ring
/// and the engine's completions are looked at for a short window before the
/// event channel is armed; meanwhile `req_event` stays behind, so the guest
/// does not notify. The window tunes itself as KVM's halt-polling does: it
/// doubles when the ring was woken soon enough after it that a longer window
/// would have caught the work, and halves when the wait was longer than the
/// largest window. An idle ring never polls.
#[derive(Debug, Default)]
struct Polling {
    /// The largest window (0: no polling).
    max: Duration,
    /// The window now.
    window: Duration,
}

impl Polling {
    /// The smallest window polling grows back from.
    const START: Duration = Duration::from_micros(2);

    fn adapt(&mut self, waited: Duration) {
        if self.max.is_zero() {
            return;
        }
        if waited <= self.max {
            self.window = (self.window * 2).max(Self::START).min(self.max);
        } else {
            self.window /= 2;
        }
    }
}

/// Persistent grants kept per ring, as Linux blkback keeps at most 1056: past
/// this, further grants are served by grant copy (memory stays bounded).
pub const MAX_PERSISTENT_GRANTS: usize = 1056;

/// Bounce pool of a ring by default: 4 MiB, or one largest request if that is
/// more. With the ring itself and at most [`MAX_PERSISTENT_GRANTS`] kept
/// mappings (guest pages, not ours), this bounds a ring's memory.
pub const DEFAULT_POOL_BYTES: usize = 4 << 20;

/// How long a stopping ring waits for its in-flight I/O to complete and be
/// answered before it gives up on it (a hung disk; libxl allows 10 s).
const DRAIN: Duration = Duration::from_secs(3);

/// Requests taken from the ring per pass. A pass runs without yielding, so
/// this bounds how long one busy ring holds a runtime thread: with many
/// rings busy, the control plane (Xenstore, other devices' lifecycles) still
/// gets its turn quickly. The ring's final check brings the next batch.
const TAKE_PER_PASS: u32 = 32;

/// Event-channel storms (XSA-332's lesson): after this many notifications in
/// a row that brought no new request, the ring listens again only after
/// [`STORM_DELAY`], so a storming guest costs at most ~1000 wake-ups a second
/// (a real event channel stays masked meanwhile, coalescing the storm).
const STORM_GRACE: u32 = 64;
/// See [`STORM_GRACE`].
const STORM_DELAY: Duration = Duration::from_millis(1);
/// After this many in a row, the ring is halted: a frontend notifies only
/// after producing requests, so thousands of empty notifications in a row are
/// never a correct frontend's doing.
pub const STORM_HALT: u32 = 2048;

/// Pages of bounce pool a ring gets: `pool_bytes` (see [`DEFAULT_POOL_BYTES`]),
/// and never less than one largest request (`max_segments` pages).
pub fn pool_pages(pool_bytes: usize, max_segments: usize) -> usize {
    (pool_bytes / POOL_PAGE).max(max_segments)
}

/// The daemon-wide budget of kept (persistent-grant) mappings. Each is a
/// mapping of its own, and a process may hold only `vm.max_map_count` of
/// them (65,530 by default): without a daemon-wide bound, a few guests with
/// many queues (1056 per ring) would use them all, and every other guest's
/// connect would then fail. Past the budget, grants are served by grant copy.
#[derive(Debug)]
pub struct MapBudget {
    limit: std::sync::atomic::AtomicUsize,
    used: std::sync::atomic::AtomicUsize,
}

/// The budget when nothing sets one: a quarter of `vm.max_map_count`
/// (the rest is for rings, map mode, threads and libraries).
fn default_map_budget() -> usize {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(65_530)
        / 4
}

/// The budget every queue of this process shares.
pub static MAP_BUDGET: MapBudget = MapBudget {
    limit: std::sync::atomic::AtomicUsize::new(usize::MAX),
    used: std::sync::atomic::AtomicUsize::new(0),
};

impl MapBudget {
    /// Sets the limit (the configuration's `io.max_persistent_maps`; `None`:
    /// a quarter of `vm.max_map_count`). Mappings already held stay.
    pub fn set_limit(&self, limit: Option<usize>) {
        let limit = limit.unwrap_or_else(default_map_budget);
        self.limit
            .store(limit, std::sync::atomic::Ordering::Relaxed);
    }

    /// The limit in force.
    pub fn limit(&self) -> usize {
        let l = self.limit.load(std::sync::atomic::Ordering::Relaxed);
        if l == usize::MAX {
            // Never set: the default, decided once.
            let d = default_map_budget();
            let _ = self.limit.compare_exchange(
                usize::MAX,
                d,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            );
            return self.limit.load(std::sync::atomic::Ordering::Relaxed);
        }
        l
    }

    /// Kept mappings held now, daemon-wide.
    pub fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn acquire(&self) -> bool {
        let limit = self.limit();
        self.used
            .fetch_update(
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Relaxed,
                |u| (u < limit).then_some(u + 1),
            )
            .is_ok()
    }

    fn release(&self, n: usize) {
        self.used.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Grants the frontend promised to reuse, mapped once and kept until the ring
/// is torn down (the mappings are dropped with the queue), within the
/// per-ring [`MAX_PERSISTENT_GRANTS`] and the daemon-wide [`MAP_BUDGET`].
#[derive(Debug, Default)]
struct Persistent {
    enabled: bool,
    maps: std::collections::HashMap<GrantRef, SharedMem>,
    /// Grants that could not be mapped (e.g. granted read-only): copied.
    unmappable: std::collections::HashSet<GrantRef>,
}

impl Drop for Persistent {
    fn drop(&mut self) {
        MAP_BUDGET.release(self.maps.len());
    }
}

/// How a queue ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueEnd {
    /// Asked to stop.
    Stopped,
    /// The frontend broke the protocol; the ring is dead.
    Halted(RingError),
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
    /// When it was taken from the ring (for [`QueueStats::latency`]).
    taken_at: std::time::Instant,
}

/// One ring being served.
pub struct Queue<G, E, D> {
    ring: BackRing<SharedMem>,
    ev: E,
    masked: bool,
    grants: Arc<G>,
    disk: Arc<D>,
    engine: Engine,
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
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ring: BackRing<SharedMem>,
        ev: E,
        grants: Arc<G>,
        disk: Arc<D>,
        engine: Engine,
        pool: Arc<BouncePool>,
        domid: DomId,
        limits: Limits,
    ) -> Self {
        Queue {
            ring,
            ev,
            masked: true,
            grants,
            disk,
            engine,
            pool,
            domid,
            limits,
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
        }
    }

    /// Polls for up to `max` after a pass that found work (see
    /// [`Polling`]); zero turns polling off.
    pub fn with_polling(mut self, max: Duration) -> Self {
        self.polling = Polling { max, window: max };
        self
    }

    /// Looks at the ring and the completions for up to the polling window;
    /// true if there is work. Spins: bounded by the window, and only after a
    /// pass that found work.
    fn poll_for_work(&mut self) -> bool {
        let start = std::time::Instant::now();
        let until = start + self.polling.window;
        // I/O in flight: sleep on it in the kernel for the window (the
        // completion wakes the thread directly); then look at the ring.
        if self.engine.in_flight() > 0 && self.engine.wait_completion(self.polling.window) {
            self.stats.poll_ns += start.elapsed().as_nanos() as u64;
            self.stats.poll_hits += 1;
            return true;
        }
        let found = loop {
            if !matches!(self.ring.unconsumed(), Ok(0)) || self.engine.has_completions() {
                break true;
            }
            if std::time::Instant::now() >= until {
                break false;
            }
            std::hint::spin_loop();
        };
        self.stats.poll_ns += start.elapsed().as_nanos() as u64;
        if found {
            self.stats.poll_hits += 1;
        }
        found
    }

    /// Map mode: a request's grants are mapped for its copy and unmapped
    /// right after, instead of grant copies.
    pub fn with_map_mode(mut self, on: bool) -> Self {
        self.map_mode = on;
        self
    }

    /// Maps the grants of `rest` side by side (map mode).
    fn map_rest(
        &mut self,
        rest: &[(GrantRef, u16, usize, usize)],
        writable: bool,
    ) -> Result<SharedMem, String> {
        let refs: Vec<GrantRef> = rest.iter().map(|r| r.0).collect();
        let m = self
            .grants
            .map(self.domid, &refs, writable)
            .map_err(|e| format!("mapping the request's grants: {e}"))?;
        self.stats.mapped_segments += rest.len() as u64;
        Ok(m)
    }

    /// Publishes this ring's counters into `slot` after every pass.
    pub fn with_counters(mut self, slot: Arc<std::sync::Mutex<QueueStats>>) -> Self {
        self.counters = Some(slot);
        self
    }

    fn publish_counters(&self) {
        if let Some(c) = &self.counters {
            *c.lock().unwrap_or_else(|e| e.into_inner()) = self.stats.clone();
        }
    }

    /// Uses persistent grants (both ends said `feature-persistent = 1`).
    pub fn with_persistent_grants(mut self, on: bool) -> Self {
        self.persistent.enabled = on;
        self
    }

    /// The kept mapping of `gref`, mapping it now if there is room.
    fn persistent_page(&mut self, gref: GrantRef) -> Option<&SharedMem> {
        let p = &mut self.persistent;
        if !p.enabled || p.unmappable.contains(&gref) {
            return None;
        }
        if !p.maps.contains_key(&gref) {
            if p.maps.len() >= MAX_PERSISTENT_GRANTS {
                return None;
            }
            if !MAP_BUDGET.acquire() {
                self.stats.persistent_over_budget += 1;
                return None;
            }
            match self.grants.map(self.domid, &[gref], true) {
                Ok(m) => {
                    p.maps.insert(gref, m);
                    self.stats.persistent_maps += 1;
                }
                Err(e) => {
                    MAP_BUDGET.release(1);
                    tracing::debug!(domid = %self.domid, gref, "persistent grant not mappable, copying: {e}");
                    if p.unmappable.len() < MAX_PERSISTENT_GRANTS {
                        p.unmappable.insert(gref);
                    }
                    return None;
                }
            }
        }
        self.stats.persistent_hits += 1;
        self.persistent.maps.get(&gref)
    }

    /// Serves until stopped or halted.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> (QueueEnd, QueueStats) {
        loop {
            if *stop.borrow() {
                self.drain().await;
                return (QueueEnd::Stopped, self.stats);
            }
            self.pass();
            if self.halt.is_none() && self.spurious >= STORM_HALT {
                self.halt = Some(RingError::EventStorm(self.spurious));
            }
            let progressed = self.taken > 0 || self.completed > 0;
            if let Some(e) = &self.halt {
                if self.engine.in_flight() == 0 {
                    let e = e.clone();
                    self.ring.halt(e.clone());
                    return (QueueEnd::Halted(e), self.stats);
                }
            } else {
                if progressed && !self.polling.window.is_zero() && self.poll_for_work() {
                    continue;
                }
                match self.ring.final_check() {
                    Ok(true) => {
                        tokio::task::yield_now().await;
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        self.halt = Some(e);
                        continue;
                    }
                }
                if self.spurious > STORM_GRACE {
                    tokio::time::sleep(STORM_DELAY).await;
                }
                if self.masked {
                    if let Err(e) = self.ev.unmask() {
                        tracing::warn!(domid = %self.domid, "cannot unmask event channel: {e}");
                    }
                    self.masked = false;
                }
            }
            let busy = self.engine.in_flight() > 0;
            let listen = self.halt.is_none();
            let asleep = std::time::Instant::now();
            tokio::select! {
                r = self.ev.wait(), if listen => match r {
                    Ok(()) => {
                        self.stats.kicks += 1;
                        self.masked = true;
                        // Judged by the pass this kick triggers.
                        self.kicked = true;
                        self.polling.adapt(asleep.elapsed());
                    }
                    Err(e) => {
                        tracing::warn!(domid = %self.domid, "event channel failed: {e}");
                        self.drain().await;
                        return (QueueEnd::Stopped, self.stats);
                    }
                },
                () = self.engine.ready(), if busy => self.polling.adapt(asleep.elapsed()),
                _ = stop.changed() => {}
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
        self.publish_counters();
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
            self.engine.submit();
            let completed = self.complete();
            self.completed += completed;
            if completed == 0 || !self.has_waiting() {
                break;
            }
        }
        // What the completions resubmitted (the rest of a short transfer).
        self.engine.submit();
    }

    fn has_waiting(&self) -> bool {
        self.slots
            .iter()
            .any(|s| matches!(s.stage, Stage::Waiting(_)))
    }

    /// Takes nothing more from the ring, and finishes (bounded by [`DRAIN`])
    /// every request already taken: those that wait for buffers are started
    /// as room comes back, and every answer is published in ring order. A
    /// ring stopped to be handed over thus leaves `rsp_prod` at the end of
    /// everything it took, and the next daemon starts from there.
    async fn drain(&mut self) {
        let deadline = tokio::time::Instant::now() + DRAIN;
        loop {
            self.advance();
            self.publish();
            self.publish_counters();
            if self.engine.in_flight() == 0 {
                if self.has_waiting() {
                    // Nothing in flight frees room: cannot happen with a pool
                    // of at least one largest request, but never spin.
                    tracing::warn!(domid = %self.domid, "requests wait for buffers that nothing frees");
                }
                return;
            }
            if tokio::time::timeout_at(deadline, self.engine.ready())
                .await
                .is_err()
            {
                tracing::warn!(
                    domid = %self.domid,
                    in_flight = self.engine.in_flight(),
                    "I/O did not complete within {DRAIN:?} of the ring stopping; abandoning it"
                );
                return;
            }
        }
    }

    /// Takes what the ring holds (at most a ring's worth): each request is
    /// copied out, validated, and queued in ring order.
    fn take(&mut self) {
        let raws = match self.ring.take(TAKE_PER_PASS) {
            Ok(r) => r,
            Err(e) => {
                self.halt = Some(e);
                return;
            }
        };
        self.taken = raws.len();
        // The disk may have grown (resize): check requests against its size now.
        self.limits.disk_sectors = self.disk.sectors();
        for raw in raws {
            let slot = match parse(&raw, self.ring.abi(), &self.limits) {
                Ok(Parsed::Ready(req)) => Slot::waiting(req),
                Ok(Parsed::Indirect(h)) => match self.indirect(&h) {
                    Ok(req) => Slot::waiting(req),
                    Err(r) => {
                        if r.halt {
                            self.halt = Some(RingError::Protocol(r.reason.to_string()));
                        }
                        Slot::done(r.id, r.wire_op, r.status)
                    }
                },
                Err(r) => {
                    tracing::debug!(domid = %self.domid, id = r.id, "request refused: {}", r.reason);
                    if r.halt {
                        self.halt = Some(RingError::Protocol(r.reason.to_string()));
                    }
                    Slot::done(r.id, r.wire_op, r.status)
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

    /// Starts the waiting requests in ring order while buffers last.
    fn start_waiting(&mut self) {
        for i in 0..self.slots.len() {
            if !matches!(self.slots[i].stage, Stage::Waiting(_)) {
                continue;
            }
            let Stage::Waiting(req) = std::mem::replace(&mut self.slots[i].stage, Stage::Done(0))
            else {
                unreachable!("checked above");
            };
            match self.start(i, req) {
                Ok(()) => {
                    let used = (self.pool.in_use() * crate::io::pool::POOL_PAGE) as u64;
                    self.stats.pool_peak_bytes = self.stats.pool_peak_bytes.max(used);
                }
                Err(req) => {
                    // No room in the pool: it and everything after it wait
                    // for buffers to come back (ring order is kept).
                    self.slots[i].stage = Stage::Waiting(req);
                    self.stats.buffer_waits += 1;
                    return;
                }
            }
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
        if has_data {
            let Some(mut b) = self.pool.alloc(len as usize) else {
                return Err(req);
            };
            if req.op.writes(req.segments.len()) {
                if let Err(e) = self.copy_in(&req, &mut b) {
                    tracing::debug!(domid = %self.domid, id = req.id, "{e}");
                    self.pool.free(b);
                    self.finish(i, &req, BLKIF_RSP_ERROR);
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
            // Every write answered before this flush has completed: the flush
            // starts only once everything submitted before it is done.
            IoKind::Flush => IoOp {
                tag,
                kind,
                off: 0,
                len: 0,
                buf: None,
                buf_off: 0,
                drain: true,
            },
            _ => IoOp {
                tag,
                kind,
                off,
                len,
                buf: buf.take(),
                buf_off: 0,
                drain: false,
            },
        };
        self.engine.push(op);
        let slot = &mut self.slots[i];
        slot.buf = buf;
        slot.stage = Stage::Running {
            req,
            flush_first,
            done: 0,
        };
        Ok(())
    }

    /// Handles every completion the engine has; returns how many.
    fn complete(&mut self) -> usize {
        let mut done = Vec::new();
        self.engine.reap(&mut done);
        let n = done.len();
        for d in done {
            self.completed(d);
        }
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
        let status = if req.op == Operation::Read {
            match self.copy_out_slot(i, &req) {
                Ok(()) => BLKIF_RSP_OKAY,
                Err(e) => {
                    tracing::debug!(domid = %self.domid, id = req.id, "{e}");
                    BLKIF_RSP_ERROR
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
        let Some(buf) = self.slots[i].buf.take() else {
            self.finish(i, &req, BLKIF_RSP_ERROR);
            return;
        };
        self.engine.push(IoOp {
            tag,
            kind,
            off: req.sector * SECTOR_SIZE + from,
            len: len - from,
            buf: Some(buf),
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
            self.stats.latency.record(slot.taken_at.elapsed());
            any = true;
        }
        if any && self.ring.push_responses() {
            self.stats.notifications += 1;
            if let Err(e) = self.ev.notify() {
                tracing::debug!(domid = %self.domid, "notify failed: {e}");
            }
        }
    }

    /// Copies an indirect request's segment pages out (read-only grants) and
    /// validates the private copy.
    fn indirect(&mut self, h: &IndirectHeader) -> Result<Request, crate::ring::request::Refusal> {
        let mut pages = vec![0u8; h.grefs.len() * XEN_PAGE_SIZE];
        let mut segs: Vec<CopySeg<'_>> = pages
            .chunks_mut(XEN_PAGE_SIZE)
            .zip(&h.grefs)
            .map(|(buf, &g)| CopySeg::from_guest(self.domid, g, 0, buf))
            .collect();
        let ok = self.grants.copy(&mut segs).is_ok() && segs.iter().all(|s| s.status == GNTST_OKAY);
        drop(segs);
        if !ok {
            tracing::debug!(domid = %self.domid, id = h.id, "indirect pages not readable");
            return Err(h.unreadable());
        }
        h.finish(&pages, &self.limits)
    }

    /// Copies a completed read's data to the guest's pages.
    fn copy_out_slot(&mut self, i: usize, req: &Request) -> Result<(), String> {
        let Some(buf) = self.slots[i].buf.take() else {
            return Err("a read without its buffer".into());
        };
        let pool = self.pool.clone();
        let r = self.copy_out(req, pool.slice(&buf));
        self.slots[i].buf = Some(buf);
        r
    }

    fn copy_out(&mut self, req: &Request, data: &[u8]) -> Result<(), String> {
        let mut at = 0;
        let mut rest = Vec::new();
        for s in &req.segments {
            let chunk = &data[at..at + s.len()];
            match self.persistent_page(s.gref) {
                Some(page) => page.write_data(s.offset(), chunk),
                None => rest.push((s.gref, s.offset() as u16, at, s.len())),
            }
            at += s.len();
        }
        if self.map_mode && !rest.is_empty() {
            let m = self.map_rest(&rest, true)?;
            for (i, &(_, off, at, len)) in rest.iter().enumerate() {
                m.write_data(i * XEN_PAGE_SIZE + usize::from(off), &data[at..at + len]);
            }
            return Ok(()); // unmapped as `m` drops
        }
        let mut segs: Vec<CopySeg<'_>> = rest
            .iter()
            .map(|&(g, off, at, len)| CopySeg::to_guest(self.domid, g, off, &data[at..at + len]))
            .collect();
        self.copy(&mut segs)
    }

    /// Copies a write's data from the guest's pages into `buf`.
    fn copy_in(&mut self, req: &Request, buf: &mut Buf) -> Result<(), String> {
        let pool = self.pool.clone();
        let buf = pool.slice_mut(buf);
        let mut at = 0;
        let mut rest = Vec::new();
        for s in &req.segments {
            match self.persistent_page(s.gref) {
                Some(page) => page.read_data(s.offset(), &mut buf[at..at + s.len()]),
                None => rest.push((s.gref, s.offset() as u16, at, s.len())),
            }
            at += s.len();
        }
        if self.map_mode && !rest.is_empty() {
            let m = self.map_rest(&rest, false)?;
            for (i, &(_, off, at, len)) in rest.iter().enumerate() {
                m.read_data(i * XEN_PAGE_SIZE + usize::from(off), &mut buf[at..at + len]);
            }
            return Ok(());
        }
        let mut tail = &mut buf[..];
        let mut consumed = 0;
        let mut segs = Vec::with_capacity(rest.len());
        for &(g, off, at, len) in &rest {
            let (_, t) = tail.split_at_mut(at - consumed);
            let (head, t) = t.split_at_mut(len);
            segs.push(CopySeg::from_guest(self.domid, g, off, head));
            tail = t;
            consumed = at + len;
        }
        self.copy(&mut segs)
    }

    fn copy(&self, segs: &mut [CopySeg<'_>]) -> Result<(), String> {
        self.grants.copy(segs).map_err(|e| e.to_string())?;
        match segs.iter().find(|s| s.status != GNTST_OKAY) {
            None => Ok(()),
            Some(s) => Err(format!(
                "grant copy of ref {} failed with status {}",
                s.gref, s.status
            )),
        }
    }
}

impl Slot {
    fn waiting(req: Request) -> Slot {
        Slot {
            id: req.id,
            wire_op: req.wire_op,
            stage: Stage::Waiting(req),
            buf: None,
            taken_at: std::time::Instant::now(),
        }
    }

    fn done(id: u64, wire_op: u8, status: i16) -> Slot {
        Slot {
            id,
            wire_op,
            stage: Stage::Done(status),
            buf: None,
            taken_at: std::time::Instant::now(),
        }
    }
}
