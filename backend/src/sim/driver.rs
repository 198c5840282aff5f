//! The bench's guest: blkfront's hot path, without the test harness's
//! machinery around each request.
//!
//! [`Blkfront::read`](super::blkfront::Blkfront::read) and its kin suit
//! tests: any task may call them on any queue, each request with its own
//! timeout, answer channel and task wake-up. A real guest's blkfront costs far
//! less per request: blk-mq hands a hardware queue a batch, and the interrupt
//! handler completes what the backend answered. On this simulated Xen the
//! guest shares the backend's CPUs, so whatever the guest wastes is taken from
//! the backend's figures. The bench drives each queue with this loop instead:
//! one thread per queue, the bench's lanes (a guest's submitters) fixed to it,
//! each lane with its own pages, granted once (persistent grants, as blkfront
//! keeps them) or for each request, data copied into them before a write and
//! out after a read as blkfront copies, answers taken in batches, new
//! requests pushed with one notification at most per batch, and the event
//! channel waited on in poll(2).
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use crate::abi::blkif::*;
use crate::ring::request::{encode, Segment};
use crate::xen::DomId;

use super::blkfront::{DrivenQueue, FrontError};
use super::guest::{bench_offset, BenchSpec, LATENCY_SAMPLES};

/// How long the loop waits for an answer before it gives up.
const PATIENCE: Duration = Duration::from_secs(30);

/// What one queue's lanes did.
#[derive(Debug, Default)]
pub struct Driven {
    /// Requests completed.
    pub ops: u64,
    /// Each request's latency in ns, kept at depth 1 only (where latency
    /// is the figure).
    pub latency: Vec<u32>,
}

/// One lane: a request kept in flight, again and again, on the same pages.
struct Lane {
    lane: u32,
    /// Requests this lane completed (and the index of its next offset).
    n: u64,
    /// The guest's own buffer: written from, or read into.
    buf: Vec<u8>,
    /// Data frames, one per 4 KiB of a request.
    frames: Vec<u64>,
    /// Their grants (for the request in flight, or kept if persistent).
    grefs: Vec<GrantRef>,
    /// Indirect-segment pages (frame, grant), if a request needs them.
    indirect: Vec<(u64, GrantRef)>,
    started: Instant,
}

/// Runs `lanes` of `spec` on queue `q` until `deadline`, then waits for what
/// is in flight. `bytes`: the disk's size. With a `poll` window, the loop
/// looks at its ring that long before it sleeps on the event channel (a
/// guest CPU with nothing else to do, as the backend's `poll_us` is for the
/// backend).
pub fn drive(
    q: DrivenQueue,
    spec: &BenchSpec,
    lanes: &[u32],
    bytes: u64,
    deadline: Instant,
    poll: Duration,
) -> Result<Driven, FrontError> {
    let write = spec.write;
    let op = op_of(spec);
    let mut slots = lanes_for(&q, spec, lanes)?;
    let mut ring = q.queue.ring.lock().unwrap_or_else(|e| e.into_inner());
    if ring.free() < lanes.len() as u32 {
        return Err(FrontError::Protocol(format!(
            "{} lanes do not fit a ring of {}",
            lanes.len(),
            ring.size()
        )));
    }
    let mut out = Driven::default();
    let keep_latency = spec.depth == 1;
    let mut raw = Vec::new();
    for (id, l) in slots.iter_mut().enumerate() {
        start(&q, spec, bytes, op, id as u64, l, &mut raw)?;
        ring.put_request(&raw);
    }
    let mut in_flight = slots.len();
    if ring.push_requests() {
        q.queue.port.notify()?;
    }
    let mut answers = Vec::with_capacity(ring.size() as usize);
    let mut waited_since: Option<Instant> = None;
    while in_flight > 0 {
        answers.clear();
        ring.take_responses_into(&mut answers);
        if answers.is_empty() {
            // Polling looks at the ring without arming `rsp_event`: the
            // backend then has no reason to notify, as blkback's guests are
            // not notified while they are not waiting.
            if !poll.is_zero() && crate::io::wait::spin(poll, || ring.has_responses()) {
                continue;
            }
            if ring.final_check_responses() {
                continue;
            }
            let since = *waited_since.get_or_insert_with(Instant::now);
            if since.elapsed() > PATIENCE {
                return Err(FrontError::NoResponse(PATIENCE));
            }
            let port = &q.queue.port;
            if crate::io::wait::readable(&[port.raw_fd()], Some(Duration::from_secs(1)))?[0] {
                port.take_kicks();
            }
            continue;
        }
        waited_since = None;
        let now = Instant::now();
        for &(id, _, status) in &answers {
            let l = usize::try_from(id)
                .ok()
                .and_then(|i| slots.get_mut(i))
                .ok_or_else(|| FrontError::Protocol(format!("answer for unknown id {id}")))?;
            if status != BLKIF_RSP_OKAY {
                return Err(FrontError::Status(status));
            }
            finish(&q, l, write);
            if keep_latency && out.latency.len() < LATENCY_SAMPLES {
                let ns = now.duration_since(l.started).as_nanos();
                out.latency.push(ns.min(u128::from(u32::MAX)) as u32);
            }
            l.n += 1;
            out.ops += 1;
            if now < deadline {
                start(&q, spec, bytes, op, id, l, &mut raw)?;
                ring.put_request(&raw);
            } else {
                in_flight -= 1;
            }
        }
        if ring.push_requests() {
            q.queue.port.notify()?;
        }
    }
    drop(ring);
    for l in slots {
        if q.persistent {
            for &g in &l.grefs {
                q.dom.end_access(g);
            }
            for &(_, g) in &l.indirect {
                q.dom.end_access(g);
            }
        }
        for f in l.frames.iter().chain(l.indirect.iter().map(|(f, _)| f)) {
            q.dom.free_page(*f);
        }
    }
    Ok(out)
}

/// Sets up `lanes` for requests of `spec`: their frames, and their grants if
/// they are persistent.
fn lanes_for(q: &DrivenQueue, spec: &BenchSpec, lanes: &[u32]) -> Result<Vec<Lane>, FrontError> {
    let pages = (spec.bs as usize).div_ceil(XEN_PAGE_SIZE);
    if pages == 0 || pages > q.per_request {
        return Err(FrontError::Protocol(format!(
            "bench requests of {} bytes need {pages} segments; the backend takes {} per request",
            spec.bs, q.per_request
        )));
    }
    let n_indirect = if pages > BLKIF_MAX_SEGMENTS_PER_REQUEST {
        pages.div_ceil(SEGS_PER_INDIRECT_FRAME)
    } else {
        0
    };
    let mut slots = Vec::with_capacity(lanes.len());
    for &lane in lanes {
        let mut l = Lane {
            lane,
            n: 0,
            buf: vec![0xA5u8; spec.bs as usize],
            frames: Vec::with_capacity(pages),
            grefs: Vec::with_capacity(pages),
            indirect: Vec::with_capacity(n_indirect),
            started: Instant::now(),
        };
        for _ in 0..pages {
            l.frames.push(q.dom.alloc_pages(1)?);
        }
        for _ in 0..n_indirect {
            l.indirect.push((q.dom.alloc_pages(1)?, GrantRef(0)));
        }
        if q.persistent {
            grant(q, &mut l, false)?;
        }
        slots.push(l);
    }
    Ok(slots)
}

/// Misbehaviour: puts up to `n` requests of `spec` on queue `q` at once (as
/// many as its ring has room for), each on pages of its own, publishes them
/// with one producer update and one notification, and never takes an
/// answer: the backend sees them all in its first look. The pages stay
/// granted (the guest never answers, so never takes them back). Returns how
/// many were put.
pub fn flood(q: &DrivenQueue, spec: &BenchSpec, n: u32, bytes: u64) -> Result<u32, FrontError> {
    let mut ring = q.queue.ring.lock().unwrap_or_else(|e| e.into_inner());
    let n = n.min(ring.free());
    let lanes: Vec<u32> = (0..n).collect();
    let mut slots = lanes_for(q, spec, &lanes)?;
    let op = op_of(spec);
    let mut raw = Vec::new();
    for (id, l) in slots.iter_mut().enumerate() {
        start(q, spec, bytes, op, id as u64, l, &mut raw)?;
        ring.put_request(&raw);
    }
    ring.push_requests();
    q.notify()?;
    Ok(n)
}

/// The ring operation of `spec`'s requests.
fn op_of(spec: &BenchSpec) -> u8 {
    if spec.write {
        BLKIF_OP_WRITE
    } else {
        BLKIF_OP_READ
    }
}

/// Grants lane `l`'s pages to dom0 (read-only if the backend only reads
/// them), and writes its indirect pages.
fn grant(q: &DrivenQueue, l: &mut Lane, readonly: bool) -> Result<(), FrontError> {
    l.grefs.clear();
    for &f in &l.frames {
        l.grefs.push(q.dom.grant(f, DomId::DOM0, readonly)?);
    }
    let last_sect = (XEN_PAGE_SIZE / SECTOR_SIZE as usize - 1) as u8;
    let mut page = vec![0u8; XEN_PAGE_SIZE];
    for (k, (f, g)) in l.indirect.iter_mut().enumerate() {
        page.fill(0);
        let segs = l.grefs.iter().skip(k * SEGS_PER_INDIRECT_FRAME);
        for (j, &gref) in segs.take(SEGS_PER_INDIRECT_FRAME).enumerate() {
            let s = Segment {
                gref,
                first_sect: 0,
                last_sect,
            };
            encode::put_segment(&mut page, j * 8, &s);
        }
        q.dom.mem().write(*f as usize * XEN_PAGE_SIZE, &page);
        *g = q.dom.grant(*f, DomId::DOM0, true)?;
    }
    Ok(())
}

/// Puts lane `l`'s next request in `raw`: its data copied in if a write, its
/// pages granted if grants are not persistent.
fn start(
    q: &DrivenQueue,
    spec: &BenchSpec,
    bytes: u64,
    op: u8,
    id: u64,
    l: &mut Lane,
    raw: &mut Vec<u8>,
) -> Result<(), FrontError> {
    let write = op == BLKIF_OP_WRITE;
    if write {
        for (chunk, &f) in l.buf.chunks(XEN_PAGE_SIZE).zip(&l.frames) {
            q.dom.mem().write_data(f as usize * XEN_PAGE_SIZE, chunk);
        }
    }
    if !q.persistent {
        grant(q, l, write)?;
    }
    let sector = bench_offset(spec, bytes, l.lane, l.n) / 512;
    *raw = if l.indirect.is_empty() {
        let segs: Vec<Segment> = l
            .grefs
            .iter()
            .zip(l.buf.chunks(XEN_PAGE_SIZE))
            .map(|(&gref, chunk)| Segment {
                gref,
                first_sect: 0,
                last_sect: (chunk.len() / SECTOR_SIZE as usize - 1) as u8,
            })
            .collect();
        encode::rw(q.abi, op, id, sector, &segs)
    } else {
        let pages: Vec<GrantRef> = l.indirect.iter().map(|&(_, g)| g).collect();
        encode::indirect(q.abi, op, id, sector, l.grefs.len() as u16, &pages)
    };
    if spec.depth == 1 {
        l.started = Instant::now();
    }
    Ok(())
}

/// Completes lane `l`'s request: data copied out if a read, grants ended if
/// they are not persistent.
fn finish(q: &DrivenQueue, l: &mut Lane, write: bool) {
    if !write {
        for (chunk, &f) in l.buf.chunks_mut(XEN_PAGE_SIZE).zip(&l.frames) {
            q.dom.mem().read_data(f as usize * XEN_PAGE_SIZE, chunk);
        }
    }
    if !q.persistent {
        for &g in &l.grefs {
            q.dom.end_access(g);
        }
        for &(_, g) in &l.indirect {
            q.dom.end_access(g);
        }
    }
}
