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
        }
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

    /// One pass: at most a ring's worth of requests.
    fn sweep(&mut self) -> Result<(), RingError> {
        let raws = self.ring.take(self.ring.size())?;
        let mut halt = None;
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
            self.ring.put_response(id, op, status);
            if halt.is_some() {
                break;
            }
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
        let off = req.sector.checked_mul(SECTOR_SIZE);
        let len = req.nr_sectors.checked_mul(SECTOR_SIZE);
        let (Some(off), Some(len)) = (off, len) else {
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

    fn copy_out(&self, req: &Request, data: &[u8]) -> Result<(), String> {
        let mut at = 0;
        let mut segs = Vec::with_capacity(req.segments.len());
        for s in &req.segments {
            segs.push(CopySeg::to_guest(
                self.domid,
                s.gref,
                s.offset() as u16,
                &data[at..at + s.len()],
            ));
            at += s.len();
        }
        self.copy(&mut segs)
    }

    fn copy_in(&self, req: &Request) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; req.nr_sectors as usize * SECTOR_SIZE as usize];
        let mut rest = &mut buf[..];
        let mut segs = Vec::with_capacity(req.segments.len());
        for s in &req.segments {
            let (head, tail) = rest.split_at_mut(s.len());
            segs.push(CopySeg::from_guest(
                self.domid,
                s.gref,
                s.offset() as u16,
                head,
            ));
            rest = tail;
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
