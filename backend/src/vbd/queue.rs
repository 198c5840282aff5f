//! One queue (ring) of a virtual block device: the serving loop.
//!
//! Each pass takes at most one ring's worth of requests, validates each copy,
//! moves data with batched grant copies, answers, and notifies per the ring's
//! event suppression; before sleeping it re-checks the ring
//! (`RING_FINAL_CHECK_FOR_REQUESTS`) and only then unmasks the event channel.
//! A request that breaks the protocol is answered and then halts this ring
//! alone; nothing a guest sends can stop the daemon or reach another ring.
#![forbid(unsafe_code)]

use std::sync::Arc;

use tokio::sync::watch;

use crate::abi::blkif::{BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, SECTOR_SIZE, XEN_PAGE_SIZE};
use crate::abi::sys::GNTST_OKAY;
use crate::io::Disk;
use crate::ring::request::{parse, IndirectHeader, Limits, Operation, Parsed, Request};
use crate::ring::{BackRing, RingError};
use crate::xen::mem::SharedMem;
use crate::xen::{CopySeg, DomId, EventChannel, Grants};

/// What a queue did, for status reports and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Requests answered OKAY.
    pub ok: u64,
    /// Requests answered with an error status.
    pub errors: u64,
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
}

/// Persistent grants kept per ring, as Linux blkback keeps at most 1056: past
/// this, further grants are served by grant copy (memory stays bounded).
pub const MAX_PERSISTENT_GRANTS: usize = 1056;

/// Grants the frontend promised to reuse, mapped once and kept until the ring
/// is torn down (the mappings are dropped with the queue).
#[derive(Debug, Default)]
struct Persistent {
    enabled: bool,
    maps: std::collections::HashMap<crate::abi::blkif::GrantRef, SharedMem>,
    /// Grants that could not be mapped (e.g. granted read-only): copied.
    unmappable: std::collections::HashSet<crate::abi::blkif::GrantRef>,
}

/// How a queue ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueEnd {
    /// Asked to stop.
    Stopped,
    /// The frontend broke the protocol; the ring is dead.
    Halted(RingError),
}

/// One ring being served.
pub struct Queue<G, E, D> {
    ring: BackRing<SharedMem>,
    ev: E,
    grants: Arc<G>,
    disk: Arc<D>,
    domid: DomId,
    limits: Limits,
    stats: QueueStats,
    persistent: Persistent,
}

impl<G, E, D> std::fmt::Debug for Queue<G, E, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("domid", &self.domid)
            .field("stats", &self.stats)
            .finish()
    }
}

impl<G: Grants, E: EventChannel, D: Disk> Queue<G, E, D> {
    /// A queue over a mapped ring.
    pub fn new(
        ring: BackRing<SharedMem>,
        ev: E,
        grants: Arc<G>,
        disk: Arc<D>,
        domid: DomId,
        limits: Limits,
    ) -> Self {
        Queue {
            ring,
            ev,
            grants,
            disk,
            domid,
            limits,
            stats: QueueStats::default(),
            persistent: Persistent::default(),
        }
    }

    /// Uses persistent grants (both ends said `feature-persistent = 1`).
    pub fn with_persistent_grants(mut self, on: bool) -> Self {
        self.persistent.enabled = on;
        self
    }

    /// The kept mapping of `gref`, mapping it now if there is room.
    fn persistent_page(&mut self, gref: crate::abi::blkif::GrantRef) -> Option<&SharedMem> {
        let p = &mut self.persistent;
        if !p.enabled || p.unmappable.contains(&gref) {
            return None;
        }
        if !p.maps.contains_key(&gref) {
            if p.maps.len() >= MAX_PERSISTENT_GRANTS {
                return None;
            }
            match self.grants.map(self.domid, &[gref], true) {
                Ok(m) => {
                    p.maps.insert(gref, m);
                    self.stats.persistent_maps += 1;
                }
                Err(e) => {
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
                return (QueueEnd::Stopped, self.stats);
            }
            if let Err(e) = self.sweep() {
                return (QueueEnd::Halted(e), self.stats);
            }
            match self.ring.final_check() {
                Ok(true) => {
                    tokio::task::yield_now().await;
                    continue;
                }
                Ok(false) => {}
                Err(e) => return (QueueEnd::Halted(e), self.stats),
            }
            if let Err(e) = self.ev.unmask() {
                tracing::warn!(domid = %self.domid, "cannot unmask event channel: {e}");
            }
            tokio::select! {
                r = self.ev.wait() => match r {
                    Ok(()) => self.stats.kicks += 1,
                    Err(e) => {
                        tracing::warn!(domid = %self.domid, "event channel failed: {e}");
                        return (QueueEnd::Stopped, self.stats);
                    }
                },
                _ = stop.changed() => {}
            }
        }
    }

    /// One pass: at most a ring's worth of requests. Answers are kept private
    /// until the whole pass is done, then written and published together in
    /// ring order: a request's slot is overwritten by its answer only just
    /// before the answer is published, so a daemon killed mid-pass leaves
    /// every unanswered request readable for the next one (see
    /// `lifecycle::adopting`).
    fn sweep(&mut self) -> Result<(), RingError> {
        let raws = self.ring.take(self.ring.size())?;
        // The disk may have grown (resize): check requests against its size now.
        self.limits.disk_sectors = self.disk.sectors();
        let mut halt = None;
        let mut answers = Vec::with_capacity(raws.len());
        for raw in raws {
            let (id, op, status) = match parse(&raw, self.ring.abi(), &self.limits) {
                Ok(Parsed::Ready(req)) => (req.id, req.wire_op, self.execute(&req)),
                Ok(Parsed::Indirect(h)) => match self.indirect(&h) {
                    Ok(req) => (req.id, req.wire_op, self.execute(&req)),
                    Err(r) => {
                        if r.halt {
                            halt = Some(r.reason.to_string());
                        }
                        (r.id, r.wire_op, r.status)
                    }
                },
                Err(r) => {
                    tracing::debug!(domid = %self.domid, id = r.id, "request refused: {}", r.reason);
                    if r.halt {
                        halt = Some(r.reason.to_string());
                    }
                    (r.id, r.wire_op, r.status)
                }
            };
            if status == BLKIF_RSP_OKAY {
                self.stats.ok += 1;
            } else {
                self.stats.errors += 1;
            }
            answers.push((id, op, status));
            if halt.is_some() {
                break;
            }
        }
        for (id, op, status) in answers {
            self.ring.put_response(id, op, status);
        }
        if self.ring.push_responses() {
            self.stats.notifications += 1;
            if let Err(e) = self.ev.notify() {
                tracing::debug!(domid = %self.domid, "notify failed: {e}");
            }
        }
        match halt {
            Some(reason) => {
                let e = RingError::Protocol(reason);
                self.ring.halt(e.clone());
                Err(e)
            }
            None => Ok(()),
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

    /// Runs a validated request against the disk; returns its status.
    fn execute(&mut self, req: &Request) -> i16 {
        // A flush without data names no sectors: Linux sends sector_number
        // (sector_t)-1 for it, which must not be taken for an offset.
        let no_data =
            req.segments.is_empty() && matches!(req.op, Operation::Flush | Operation::Barrier);
        let off = if no_data {
            Some(0)
        } else {
            req.sector.checked_mul(SECTOR_SIZE)
        };
        let len = req.nr_sectors.checked_mul(SECTOR_SIZE);
        let (Some(off), Some(len)) = (off, len) else {
            tracing::debug!(domid = %self.domid, id = req.id, "request range overflows");
            return BLKIF_RSP_ERROR;
        };
        let result = match req.op {
            Operation::Read => {
                let mut buf = vec![0u8; len as usize];
                self.disk
                    .read_at(off, &mut buf)
                    .map_err(|e| e.to_string())
                    .and_then(|()| self.copy_out(req, &buf))
            }
            Operation::Write => self
                .copy_in(req)
                .and_then(|buf| self.disk.write_at(off, &buf).map_err(|e| e.to_string())),
            Operation::Flush | Operation::Barrier => {
                // Every write answered before this one has completed (requests
                // run in order here), so a flush makes them all durable.
                self.disk.flush().map_err(|e| e.to_string()).and_then(|()| {
                    if req.segments.is_empty() {
                        Ok(())
                    } else {
                        self.copy_in(req).and_then(|buf| {
                            self.disk.write_at(off, &buf).map_err(|e| e.to_string())
                        })
                    }
                })
            }
            Operation::Discard { .. } => self.disk.discard(off, len).map_err(|e| e.to_string()),
        };
        match result {
            Ok(()) => {
                self.stats.bytes += if req.segments.is_empty() { 0 } else { len };
                BLKIF_RSP_OKAY
            }
            Err(e) => {
                tracing::debug!(domid = %self.domid, id = req.id, "request failed: {e}");
                BLKIF_RSP_ERROR
            }
        }
    }

    fn copy_out(&mut self, req: &Request, data: &[u8]) -> Result<(), String> {
        let mut at = 0;
        let mut rest = Vec::new();
        for s in &req.segments {
            let chunk = &data[at..at + s.len()];
            match self.persistent_page(s.gref) {
                Some(page) => page.write(s.offset(), chunk),
                None => rest.push((s.gref, s.offset() as u16, at, s.len())),
            }
            at += s.len();
        }
        let mut segs: Vec<CopySeg<'_>> = rest
            .iter()
            .map(|&(g, off, at, len)| CopySeg::to_guest(self.domid, g, off, &data[at..at + len]))
            .collect();
        self.copy(&mut segs)
    }

    fn copy_in(&mut self, req: &Request) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; req.nr_sectors as usize * SECTOR_SIZE as usize];
        let mut at = 0;
        let mut rest = Vec::new();
        for s in &req.segments {
            match self.persistent_page(s.gref) {
                Some(page) => page.read(s.offset(), &mut buf[at..at + s.len()]),
                None => rest.push((s.gref, s.offset() as u16, at, s.len())),
            }
            at += s.len();
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
        self.copy(&mut segs)?;
        Ok(buf)
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
