//! A simulated blkfront: the guest side of a vbd, doing what Linux
//! xen-blkfront does over the simulated Xen, and misbehaving on request.
//!
//! Connection (as blkfront's `talk_to_blkback`): wait for the backend's
//! InitWait, read what it offers, pick ring order, queues, indirect segments
//! and persistent grants, grant the ring pages, allocate event channels, write
//! everything and Initialised in one transaction, then wait for Connected and
//! read the disk's geometry.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use xenstore::{Client, Xs};

use crate::abi::blkif::*;
use crate::abi::sys::XenbusState;
use crate::ring::request::{encode, Segment};
use crate::ring::{FrontRing, RingMem};
use crate::xen::mem::SharedView;
use crate::xen::sim::{GuestPort, SimDomain};
use crate::xen::DomId;

tokio::task_local! {
    /// A submitter's lane (a guest CPU, as blk-mq sees it): its requests
    /// all go to queue `LANE % queues`.
    pub static LANE: usize;
}

/// What the simulated frontend asks for (capped by what the backend offers).
#[derive(Clone, Debug)]
pub struct FrontOptions {
    /// Wanted `ring-page-order`.
    pub ring_order: u32,
    /// Wanted queues.
    pub queues: u32,
    /// Wanted indirect segments per request (0: none).
    pub indirect: u32,
    /// Use persistent grants if offered.
    pub persistent: bool,
    /// Request layout.
    pub abi: Abi,
    /// Start ring indices here (near `u32::MAX` to exercise the wrap).
    pub start_index: u32,
}

impl Default for FrontOptions {
    fn default() -> Self {
        FrontOptions {
            ring_order: 2,
            queues: 2,
            indirect: 32,
            persistent: true,
            abi: Abi::X86_64,
            start_index: 0,
        }
    }
}

/// A frontend-side failure.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    /// The backend answered a non-OKAY status.
    #[error("backend answered status {0}")]
    Status(i16),
    /// No answer in time (the ring may have been halted).
    #[error("no response within {0:?}")]
    NoResponse(Duration),
    /// Xenstore failed.
    #[error(transparent)]
    Xenstore(#[from] xenstore::Error),
    /// The simulated hypervisor failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The backend did something unexpected.
    #[error("{0}")]
    Protocol(String),
}

type Result<T, E = FrontError> = std::result::Result<T, E>;

pub(super) struct FrontQueue {
    pub(super) ring: Mutex<FrontRing<SharedView>>,
    pub(super) port: GuestPort,
    pending: Mutex<HashMap<u64, oneshot::Sender<i16>>>,
    space: Notify,
    /// Persistent grants: (frame, gref) pairs granted writable once, reused.
    pool: Mutex<Vec<(u64, GrantRef)>>,
    /// The task completing this queue's requests (blkfront's interrupt
    /// handler), until a driver takes the queue over.
    completer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for FrontQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrontQueue")
    }
}

/// One queue of a [`Blkfront`], taken over by a loop of its own (see
/// [`Blkfront::take_queue`] and `sim::driver`).
#[derive(Debug)]
pub struct DrivenQueue {
    pub(super) queue: Arc<FrontQueue>,
    pub(super) dom: Arc<SimDomain>,
    pub(super) abi: Abi,
    pub(super) persistent: bool,
    /// Most pages one request may carry (direct or indirect segments).
    pub(super) per_request: usize,
}

impl DrivenQueue {
    /// Notifies the queue's event channel, whether or not there is anything
    /// new on the ring.
    pub fn notify(&self) -> Result<()> {
        self.queue.port.notify().map_err(FrontError::from)
    }
}

/// A connected simulated frontend.
#[derive(Debug)]
pub struct Blkfront {
    dom: Arc<SimDomain>,
    xs: Client,
    fe: String,
    be: String,
    abi: Abi,
    /// Disk size in 512-byte sectors.
    pub sectors: u64,
    /// Logical sector size.
    pub sector_size: u32,
    /// Whether the backend said read-only.
    pub read_only: bool,
    /// Negotiated ring order.
    pub ring_order: u32,
    /// Negotiated indirect segments (0: none).
    pub max_indirect: u32,
    /// Whether persistent grants are in use.
    pub persistent: bool,
    /// `feature-discard`, and the backend's `discard-granularity` in bytes:
    /// blkfront sends no discard to a backend that does not offer it.
    pub discard: Option<u32>,
    queues: Vec<Arc<FrontQueue>>,
    next_id: AtomicU64,
    next_queue: AtomicUsize,
}

async fn read_u32(xs: &Client, path: &str) -> Result<Option<u32>> {
    Ok(match xs.try_read(path).await? {
        None => None,
        Some(v) => Some(
            std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| FrontError::Protocol(format!("backend wrote a bad {path}")))?,
        ),
    })
}

async fn wait_state(
    xs: &Client,
    path: &str,
    ok: impl Fn(XenbusState) -> bool,
) -> Result<XenbusState> {
    let mut w = xs.watch(path).await?;
    loop {
        let st = xs
            .try_read(path)
            .await?
            .and_then(|v| std::str::from_utf8(&v).ok().and_then(XenbusState::parse));
        if let Some(st) = st {
            if ok(st) {
                return Ok(st);
            }
        }
        match tokio::time::timeout(Duration::from_secs(30), w.next()).await {
            Ok(Some(_)) => {}
            _ => {
                return Err(FrontError::Protocol(format!(
                    "{path} never reached the wanted state"
                )))
            }
        }
    }
}

impl Blkfront {
    /// Connects device `fe` (e.g. `device/vbd/51712` below the domain's home,
    /// absolute) of domain `dom` to its backend.
    pub async fn connect(
        xs: Client,
        dom: Arc<SimDomain>,
        fe: &str,
        opts: &FrontOptions,
    ) -> Result<Blkfront> {
        let be = xs.read_string(&format!("{fe}/backend")).await?;
        wait_state(&xs, &format!("{be}/state"), |s| s >= XenbusState::InitWait).await?;
        let be_order = read_u32(&xs, &format!("{be}/max-ring-page-order"))
            .await?
            .unwrap_or(0);
        let be_queues = read_u32(&xs, &format!("{be}/multi-queue-max-queues"))
            .await?
            .unwrap_or(1);
        let be_indirect = read_u32(&xs, &format!("{be}/feature-max-indirect-segments"))
            .await?
            .unwrap_or(0);
        let be_persistent = read_u32(&xs, &format!("{be}/feature-persistent"))
            .await?
            .unwrap_or(0)
            == 1;
        let order = opts.ring_order.min(be_order);
        let nq = opts.queues.min(be_queues).max(1);
        let max_indirect = opts.indirect.min(be_indirect);
        let persistent = opts.persistent && be_persistent;
        let pages = 1u64 << order;

        let mut queues = Vec::new();
        let mut keys: Vec<(String, String)> = Vec::new();
        for q in 0..nq {
            let first = dom.alloc_pages(pages)?;
            let view = SharedView::new(
                dom.mem().clone(),
                first as usize * XEN_PAGE_SIZE,
                pages as usize * XEN_PAGE_SIZE,
            )
            .ok_or_else(|| FrontError::Protocol("ring outside guest memory".into()))?;
            let ring = FrontRing::init(view, pages as usize, opts.abi, opts.start_index)
                .map_err(|e| FrontError::Protocol(e.to_string()))?;
            let port = dom.alloc_unbound(DomId::DOM0)?;
            let dir = if nq == 1 {
                fe.to_owned()
            } else {
                format!("{fe}/queue-{q}")
            };
            for i in 0..pages {
                let gref = dom.grant(first + i, DomId::DOM0, false)?;
                let key = if order == 0 {
                    "ring-ref".to_owned()
                } else {
                    format!("ring-ref{i}")
                };
                keys.push((format!("{dir}/{key}"), gref.to_string()));
            }
            keys.push((format!("{dir}/event-channel"), port.port().to_string()));
            queues.push(Arc::new(FrontQueue {
                ring: Mutex::new(ring),
                port,
                pending: Mutex::new(HashMap::new()),
                space: Notify::new(),
                pool: Mutex::new(Vec::new()),
                completer: Mutex::new(None),
            }));
        }
        if order > 0 {
            keys.push((format!("{fe}/ring-page-order"), order.to_string()));
        }
        if nq > 1 {
            keys.push((format!("{fe}/multi-queue-num-queues"), nq.to_string()));
        }
        keys.push((format!("{fe}/protocol"), opts.abi.protocol().to_owned()));
        keys.push((
            format!("{fe}/feature-persistent"),
            u8::from(persistent).to_string(),
        ));
        keys.push((
            format!("{fe}/state"),
            XenbusState::Initialised.as_str().to_owned(),
        ));
        xs.transaction(|tx| {
            let keys = keys.clone();
            async move {
                for (k, v) in &keys {
                    tx.write(k, v).await?;
                }
                Ok(())
            }
        })
        .await?;
        for q in &queues {
            let task = tokio::spawn(complete_responses(q.clone()));
            *q.completer.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        }
        wait_state(&xs, &format!("{be}/state"), |s| s == XenbusState::Connected).await?;
        let sectors = read_u32_u64(&xs, &format!("{be}/sectors")).await?;
        let sector_size = read_u32(&xs, &format!("{be}/sector-size"))
            .await?
            .unwrap_or(512);
        let info = read_u32(&xs, &format!("{be}/info")).await?.unwrap_or(0);
        let discard = match read_u32(&xs, &format!("{be}/feature-discard")).await? {
            Some(1) => Some(
                read_u32(&xs, &format!("{be}/discard-granularity"))
                    .await?
                    .unwrap_or(sector_size),
            ),
            _ => None,
        };
        xs.write(&format!("{fe}/state"), XenbusState::Connected.as_str())
            .await?;
        Ok(Blkfront {
            dom,
            xs,
            fe: fe.to_owned(),
            be,
            abi: opts.abi,
            sectors,
            sector_size,
            read_only: info & VDISK_READONLY != 0,
            ring_order: order,
            max_indirect,
            persistent,
            discard,
            queues,
            next_id: AtomicU64::new(1),
            next_queue: AtomicUsize::new(0),
        })
    }

    /// Hands queue `q` to a [`DrivenQueue`] for a loop on its own thread
    /// (the bench's guest): its completion task is stopped first, so that
    /// nothing else takes its responses or its kicks. The queue no longer
    /// serves [`Blkfront::read`] and the like.
    pub async fn take_queue(&self, q: usize) -> Result<DrivenQueue> {
        let queue = self
            .queues
            .get(q)
            .ok_or_else(|| FrontError::Protocol(format!("no queue {q}")))?
            .clone();
        let task = queue
            .completer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| FrontError::Protocol(format!("queue {q} is already taken")))?;
        task.abort();
        // Aborted while waiting for a kick: the wait is dropped unfinished,
        // so no kick is lost to it.
        let _ = task.await;
        Ok(DrivenQueue {
            queue,
            dom: self.dom.clone(),
            abi: self.abi,
            persistent: self.persistent,
            per_request: self.pages_per_request(),
        })
    }

    /// Number of queues in use.
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// The backend's directory.
    pub fn backend_path(&self) -> &str {
        &self.be
    }

    /// The frontend's directory.
    pub fn frontend_path(&self) -> &str {
        &self.fe
    }

    /// The Xenstore connection (the guest's).
    pub fn xenstore(&self) -> &Client {
        &self.xs
    }

    /// The simulated domain.
    pub fn domain(&self) -> &Arc<SimDomain> {
        &self.dom
    }

    /// The queue of the calling task's lane if it runs in [`LANE`]'s scope
    /// (as Linux's blk-mq maps a submitting CPU to one queue), else the
    /// next in turn.
    fn pick_queue(&self) -> usize {
        let n = LANE
            .try_with(|l| *l)
            .unwrap_or_else(|_| self.next_queue.fetch_add(1, Ordering::Relaxed));
        n % self.queues.len()
    }

    /// Puts raw slot bytes on queue `q` (with the id at the ABI's offset
    /// replaced by a fresh one) and waits up to `wait` for the status.
    pub async fn submit_raw(&self, q: usize, mut bytes: Vec<u8>, wait: Duration) -> Result<i16> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let at = self.abi.layout().id;
        bytes[at..at + 8].copy_from_slice(&id.to_le_bytes());
        let queue = &self.queues[q];
        let (tx, rx) = oneshot::channel();
        queue
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        loop {
            // Registered before the check, so a wake-up in between is not lost.
            let space = queue.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            let notify = {
                let mut ring = queue.ring.lock().unwrap_or_else(|e| e.into_inner());
                if ring.put_request(&bytes) {
                    Some(ring.push_requests())
                } else {
                    None
                }
            };
            match notify {
                Some(n) => {
                    if n {
                        let _ = queue.port.notify();
                    }
                    break;
                }
                None => {
                    if tokio::time::timeout(wait, space).await.is_err() {
                        return Err(FrontError::NoResponse(wait));
                    }
                }
            }
        }
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(st)) => Ok(st),
            _ => Err(FrontError::NoResponse(wait)),
        }
    }

    /// Misbehaviour: publishes a producer index `ahead` past what was produced.
    pub fn bogus_producer(&self, q: usize, ahead: u32) {
        let queue = &self.queues[q];
        let ring = queue.ring.lock().unwrap_or_else(|e| e.into_inner());
        let prod = ring.mem().load_u32(SRING_REQ_PROD);
        ring.mem()
            .store_u32(SRING_REQ_PROD, prod.wrapping_add(ahead));
        drop(ring);
        let _ = queue.port.notify();
    }

    /// Notifies queue `q`'s event channel, whether or not there is anything
    /// new on the ring.
    pub fn notify(&self, q: usize) -> Result<()> {
        self.queues[q].port.notify().map_err(FrontError::from)
    }

    /// Misbehaviour: overwrites slot `index` of queue `q`'s ring with `bytes`.
    pub fn scribble_slot(&self, q: usize, index: u32, bytes: &[u8]) {
        let queue = &self.queues[q];
        let ring = queue.ring.lock().unwrap_or_else(|e| e.into_inner());
        let stride = self.abi.layout().slot;
        let at = SRING_ENTRIES_OFFSET + (index & (ring.size() - 1)) as usize * stride;
        ring.mem().write(at, &bytes[..bytes.len().min(stride)]);
    }

    /// Ring entries per queue.
    pub fn ring_size(&self) -> u32 {
        self.queues[0]
            .ring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .size()
    }

    /// Takes a data page: from the persistent pool, or freshly granted.
    fn data_page(&self, q: &FrontQueue, readonly: bool) -> Result<(u64, GrantRef)> {
        if self.persistent {
            if let Some(p) = q.pool.lock().unwrap_or_else(|e| e.into_inner()).pop() {
                return Ok(p);
            }
            let f = self.dom.alloc_pages(1)?;
            return Ok((f, self.dom.grant(f, DomId::DOM0, false)?));
        }
        let f = self.dom.alloc_pages(1)?;
        Ok((f, self.dom.grant(f, DomId::DOM0, readonly)?))
    }

    fn release_page(&self, q: &FrontQueue, (frame, gref): (u64, GrantRef)) {
        if self.persistent {
            q.pool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((frame, gref));
        } else {
            self.dom.end_access(gref);
            self.dom.free_page(frame);
        }
    }

    /// One request of up to the per-request maximum of pages; `data` is a
    /// whole number of sectors.
    async fn one(&self, op: u8, sector: u64, data: &mut [u8]) -> Result<()> {
        let qi = self.pick_queue();
        let q = self.queues[qi].clone();
        let npages = data.len().div_ceil(XEN_PAGE_SIZE);
        let mut pages = Vec::with_capacity(npages);
        let mut segs = Vec::with_capacity(npages);
        for chunk in data.chunks(XEN_PAGE_SIZE) {
            let p = self.data_page(&q, op == BLKIF_OP_WRITE)?;
            if op == BLKIF_OP_WRITE {
                self.dom
                    .mem()
                    .write_data(p.0 as usize * XEN_PAGE_SIZE, chunk);
            }
            segs.push(Segment {
                gref: p.1,
                first_sect: 0,
                last_sect: (chunk.len() / SECTOR_SIZE as usize - 1) as u8,
            });
            pages.push(p);
        }
        let mut indirect = Vec::new();
        let raw = if segs.len() <= BLKIF_MAX_SEGMENTS_PER_REQUEST {
            encode::rw(self.abi, op, 0, sector, &segs)
        } else {
            let nind = segs.len().div_ceil(SEGS_PER_INDIRECT_FRAME);
            let mut grefs = Vec::with_capacity(nind);
            for chunk in segs.chunks(SEGS_PER_INDIRECT_FRAME) {
                let f = self.dom.alloc_pages(1)?;
                let mut page = vec![0u8; XEN_PAGE_SIZE];
                for (j, s) in chunk.iter().enumerate() {
                    encode::put_segment(&mut page, j * 8, s);
                }
                self.dom.mem().write(f as usize * XEN_PAGE_SIZE, &page);
                let g = self.dom.grant(f, DomId::DOM0, true)?;
                indirect.push((f, g));
                grefs.push(g);
            }
            encode::indirect(self.abi, op, 0, sector, segs.len() as u16, &grefs)
        };
        let status = self.submit_raw(qi, raw, Duration::from_secs(30)).await;
        for (f, g) in indirect {
            self.dom.end_access(g);
            self.dom.free_page(f);
        }
        if matches!(status, Ok(BLKIF_RSP_OKAY)) && op == BLKIF_OP_READ {
            for (chunk, p) in data.chunks_mut(XEN_PAGE_SIZE).zip(&pages) {
                self.dom
                    .mem()
                    .read_data(p.0 as usize * XEN_PAGE_SIZE, chunk);
            }
        }
        for p in pages {
            self.release_page(&q, p);
        }
        match status? {
            BLKIF_RSP_OKAY => Ok(()),
            st => Err(FrontError::Status(st)),
        }
    }

    fn pages_per_request(&self) -> usize {
        if self.max_indirect as usize > BLKIF_MAX_SEGMENTS_PER_REQUEST {
            self.max_indirect as usize
        } else {
            BLKIF_MAX_SEGMENTS_PER_REQUEST
        }
    }

    async fn rw(&self, op: u8, sector: u64, data: &mut [u8]) -> Result<()> {
        if !data.len().is_multiple_of(SECTOR_SIZE as usize) {
            return Err(FrontError::Protocol("I/O must be whole sectors".into()));
        }
        let per = self.pages_per_request() * XEN_PAGE_SIZE;
        let mut futs = Vec::new();
        for (i, chunk) in data.chunks_mut(per).enumerate() {
            let s = sector + (i * per / SECTOR_SIZE as usize) as u64;
            futs.push(self.one(op, s, chunk));
        }
        for f in futs {
            f.await?;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes from `sector`.
    pub async fn read(&self, sector: u64, buf: &mut [u8]) -> Result<()> {
        self.rw(BLKIF_OP_READ, sector, buf).await
    }

    /// Writes `data` at `sector`.
    pub async fn write(&self, sector: u64, data: &[u8]) -> Result<()> {
        let mut copy = data.to_vec();
        self.rw(BLKIF_OP_WRITE, sector, &mut copy).await
    }

    /// A flush without data. Like Linux blkfront, it carries sector_number
    /// (sector_t)-1, the block layer's value for a request with no sectors.
    pub async fn flush(&self) -> Result<()> {
        let raw = encode::rw(self.abi, BLKIF_OP_FLUSH_DISKCACHE, 0, u64::MAX, &[]);
        match self
            .submit_raw(self.pick_queue(), raw, Duration::from_secs(30))
            .await?
        {
            BLKIF_RSP_OKAY => Ok(()),
            st => Err(FrontError::Status(st)),
        }
    }

    /// A discard.
    pub async fn discard(&self, sector: u64, nr: u64) -> Result<()> {
        let raw = encode::discard(self.abi, 0, sector, nr, false);
        match self
            .submit_raw(self.pick_queue(), raw, Duration::from_secs(30))
            .await?
        {
            BLKIF_RSP_OKAY => Ok(()),
            st => Err(FrontError::Status(st)),
        }
    }

    /// The backend's `error` node, if it wrote one.
    pub async fn backend_error(&self) -> Result<Option<String>> {
        Ok(self.xs.try_read_text(&format!("{}/error", self.be)).await?)
    }

    /// The backend's state.
    pub async fn backend_state(&self) -> Result<Option<XenbusState>> {
        Ok(self
            .xs
            .try_read(&format!("{}/state", self.be))
            .await?
            .and_then(|v| std::str::from_utf8(&v).ok().and_then(XenbusState::parse)))
    }
}

async fn read_u32_u64(xs: &Client, path: &str) -> Result<u64> {
    let v = xs.read_string(path).await?;
    v.parse()
        .map_err(|_| FrontError::Protocol(format!("backend wrote a bad {path}: {v:?}")))
}

/// Completes requests as their responses arrive (blkfront's interrupt handler).
async fn complete_responses(q: Arc<FrontQueue>) {
    loop {
        if q.port.wait().await.is_err() {
            return;
        }
        loop {
            let rsps = q
                .ring
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take_responses();
            {
                let mut pending = q.pending.lock().unwrap_or_else(|e| e.into_inner());
                for (id, _op, st) in rsps {
                    if let Some(tx) = pending.remove(&id) {
                        let _ = tx.send(st);
                    }
                }
            }
            q.space.notify_waiters();
            let more = q
                .ring
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .final_check_responses();
            if !more {
                break;
            }
        }
    }
}
