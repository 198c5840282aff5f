//! How a request's data reaches the guest's pages and back: disk I/O on the
//! pages themselves where they are mapped (zero copy: kept persistent
//! grants, map mode), else through the bounce pool with a grant copy (or a
//! copy through a kept or per-request mapping); indirect segment pages; the
//! daemon-wide budget of kept mappings.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::Queue;
use crate::abi::blkif::{GrantRef, XEN_PAGE_SIZE};
use crate::abi::sys::GNTST_OKAY;
use crate::io::op::GuestBufs;
use crate::io::pool::Buf;
use crate::io::Disk;
use crate::ring::request::{IndirectHeader, Request};
use crate::xen::mem::SharedMem;
use crate::xen::{CopySeg, EventChannel, Grants};

/// Why a request's data could not reach the guest's pages or come from
/// them. Each is answered to the guest as `BLKIF_RSP_ERROR` (the request
/// fails; the ring goes on) and logged as [`TransferError::log`] says.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The guest's grants could not be mapped (a bad or revoked grant).
    #[error("mapping the request's grants: {0}")]
    Map(std::io::Error),
    /// A grant copy entry failed (a bad or read-only grant).
    #[error("grant copy of ref {gref} failed with status {status}")]
    Status {
        /// The grant.
        gref: GrantRef,
        /// Xen's `GNTST_*` status.
        status: i16,
    },
    /// The grant-copy call itself failed (the hypervisor interface, ours).
    #[error("the grant copy call failed: {0}")]
    Copy(std::io::Error),
    /// A completed read had no buffer to copy out of (a bug of ours).
    #[error("a read without its buffer")]
    NoBuffer,
}

impl TransferError {
    /// The status the guest is answered.
    pub fn answer(&self) -> i16 {
        crate::abi::blkif::BLKIF_RSP_ERROR
    }

    /// Whether the guest caused it (its grants), rather than the backend.
    pub fn guest_caused(&self) -> bool {
        matches!(self, TransferError::Map(_) | TransferError::Status { .. })
    }

    /// Logs it: a guest's doing at debug level (a guest must not fill
    /// dom0's logs); the backend's once per daemon at warn, then at debug.
    pub fn log(&self, domid: crate::xen::DomId, id: u64) {
        static WARNED: AtomicBool = AtomicBool::new(false);
        if self.guest_caused() || WARNED.swap(true, Ordering::Relaxed) {
            tracing::debug!(%domid, id, "request failed: {self}");
        } else {
            tracing::warn!(%domid, id, "request failed: {self} (said once; further at debug level)");
        }
    }
}

/// Persistent grants kept per ring, as Linux blkback keeps at most 1056: past
/// this, further grants are served by grant copy (memory stays bounded).
pub const MAX_PERSISTENT_GRANTS: usize = 1056;

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

    pub(super) fn acquire(&self) -> bool {
        let limit = self.limit();
        self.used
            .fetch_update(
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Relaxed,
                |u| (u < limit).then_some(u + 1),
            )
            .is_ok()
    }

    pub(super) fn release(&self, n: usize) {
        self.used.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Grants the frontend promised to reuse, mapped once and kept until the ring
/// is torn down (the mappings are dropped with the queue), within the
/// per-ring [`MAX_PERSISTENT_GRANTS`] and the daemon-wide [`MAP_BUDGET`].
#[derive(Debug, Default)]
pub(super) struct Persistent {
    pub(super) enabled: bool,
    /// Shared with the I/O in flight on them: a mapping outlives its I/O.
    pub(super) maps: std::collections::HashMap<GrantRef, Arc<SharedMem>, GrefHash>,
    /// Grants that could not be mapped (e.g. granted read-only): copied.
    pub(super) unmappable: std::collections::HashSet<GrantRef, GrefHash>,
    /// Map mode's per-request mappings held by I/O in flight (each drawn
    /// from [`MAP_BUDGET`] too: up to a ring's worth can be in flight).
    pub(super) transient: usize,
}

/// How the kept mappings are found by grant ref: looked up for every
/// segment of every request (32 times a 128 KiB request), where SipHash was a
/// fifth of the serving thread's time. A multiply-fold keyed by a random
/// seed per ring: the guest picks its grant refs but not the seed, and the
/// maps hold at most [`MAX_PERSISTENT_GRANTS`] each, so even refs that
/// collided would cost that guest's own ring a longer probe, no more.
#[derive(Clone, Debug)]
pub(super) struct GrefHash(u64);

impl Default for GrefHash {
    fn default() -> Self {
        use std::hash::{BuildHasher, Hasher};
        // std's per-map random keys, drawn once, as the seed.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u8(0);
        GrefHash(h.finish() | 1)
    }
}

impl std::hash::BuildHasher for GrefHash {
    type Hasher = GrefHasher;
    fn build_hasher(&self) -> GrefHasher {
        GrefHasher(self.0)
    }
}

/// See [`GrefHash`].
#[derive(Debug)]
pub(super) struct GrefHasher(u64);

impl std::hash::Hasher for GrefHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u32(&mut self, x: u32) {
        self.write_u64(u64::from(x));
    }

    fn write_u64(&mut self, x: u64) {
        // A folded 128-bit multiply (as foldhash and wyhash do): every
        // input bit reaches every output bit.
        let m = u128::from(self.0 ^ x) * 0x9e37_79b9_7f4a_7c15;
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl Persistent {
    /// A per-request mapping's I/O is done: its budget goes back.
    pub(super) fn release_transient(&mut self) {
        if self.transient > 0 {
            self.transient -= 1;
            MAP_BUDGET.release(1);
        }
    }
}

impl Drop for Persistent {
    fn drop(&mut self) {
        MAP_BUDGET.release(self.maps.len() + self.transient);
    }
}

impl<G: Grants, E: EventChannel, D: Disk> Queue<G, E, D> {
    /// Zero copy (on by default where the engine can do it): disk I/O
    /// straight on mapped guest pages. Off: every request goes through the
    /// bounce pool.
    pub fn with_zero_copy(mut self, on: bool) -> Self {
        self.zero_copy = on;
        self
    }

    /// The guest pages `req`'s disk I/O can run on directly, when zero copy
    /// is on and they are mapped: every segment a kept persistent grant, or
    /// (map mode) the request's grants mapped now, unmapped once its I/O has
    /// completed. `Ok(None)`: use the bounce pool.
    pub(super) fn zero_copy_bufs(
        &mut self,
        req: &Request,
        writes: bool,
    ) -> Result<Option<GuestBufs>, String> {
        if !self.zero_copy || !self.engine.zero_copy() {
            return Ok(None);
        }
        let mut g = GuestBufs::default();
        if self.persistent.enabled {
            for s in &req.segments {
                let Some(page) = self.persistent_page(s.gref) else {
                    return Ok(None);
                };
                if !g.push(page.clone(), s.offset(), s.len()) {
                    return Err("a segment outside its page".into());
                }
            }
            return Ok(Some(g));
        }
        if !self.map_mode {
            return Ok(None);
        }
        let refs: Vec<GrantRef> = req.segments.iter().map(|s| s.gref).collect();
        // The mapping lives as long as the I/O: it draws on the daemon-wide
        // budget of mappings; past it, the request is copied through a
        // mapping that lives only for the copy.
        if !MAP_BUDGET.acquire() {
            self.stats.persistent_over_budget += 1;
            return Ok(None);
        }
        // A read writes the guest's pages; a write only reads them.
        let m = match self.grants.map(self.domid, &refs, !writes) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                MAP_BUDGET.release(1);
                return Err(format!("mapping the request's grants: {e}"));
            }
        };
        self.persistent.transient += 1;
        self.stats.mapped_segments += refs.len() as u64;
        for (i, s) in req.segments.iter().enumerate() {
            if !g.push(m.clone(), i * XEN_PAGE_SIZE + s.offset(), s.len()) {
                self.persistent.release_transient();
                return Err("a segment outside its page".into());
            }
        }
        Ok(Some(g))
    }

    /// Map mode: a request's grants are mapped for its copy and unmapped
    /// right after, instead of grant copies.
    pub fn with_map_mode(mut self, on: bool) -> Self {
        self.map_mode = on;
        self
    }

    /// Maps the grants of `rest` side by side (map mode).
    pub(super) fn map_rest(
        &mut self,
        rest: &[(GrantRef, u16, usize, usize)],
        writable: bool,
    ) -> Result<SharedMem, TransferError> {
        let refs: Vec<GrantRef> = rest.iter().map(|r| r.0).collect();
        let m = self
            .grants
            .map(self.domid, &refs, writable)
            .map_err(TransferError::Map)?;
        self.stats.mapped_segments += rest.len() as u64;
        Ok(m)
    }

    /// Uses persistent grants (both ends said `feature-persistent = 1`).
    pub fn with_persistent_grants(mut self, on: bool) -> Self {
        self.persistent.enabled = on;
        self
    }

    /// The kept mapping of `gref`, mapping it now if there is room.
    /// A reference, not a clone of the `Arc`: a copy needs the mapping only
    /// while it copies, and a clone per segment (an atomic on a cache line
    /// of its own, 32 of them for a 128 KiB request) was most of this
    /// function's time; zero copy clones what its I/O must hold.
    pub(super) fn persistent_page(&mut self, gref: GrantRef) -> Option<&Arc<SharedMem>> {
        let p = &mut self.persistent;
        if !p.enabled {
            return None;
        }
        let full = p.maps.len() >= MAX_PERSISTENT_GRANTS;
        // One lookup, whether kept already (every request after the first
        // few) or mapped now.
        let v = match p.maps.entry(gref) {
            std::collections::hash_map::Entry::Occupied(o) => {
                self.stats.persistent_hits += 1;
                return Some(o.into_mut());
            }
            std::collections::hash_map::Entry::Vacant(v) => v,
        };
        if full || p.unmappable.contains(&gref) {
            return None;
        }
        if !MAP_BUDGET.acquire() {
            self.stats.persistent_over_budget += 1;
            return None;
        }
        match self.grants.map(self.domid, &[gref], true) {
            Ok(m) => {
                self.stats.persistent_maps += 1;
                self.stats.persistent_hits += 1;
                Some(v.insert(Arc::new(m)))
            }
            Err(e) => {
                MAP_BUDGET.release(1);
                tracing::debug!(domid = %self.domid, %gref, "persistent grant not mappable, copying: {e}");
                if p.unmappable.len() < MAX_PERSISTENT_GRANTS {
                    p.unmappable.insert(gref);
                }
                None
            }
        }
    }

    /// Copies an indirect request's segment pages out (read-only grants) and
    /// validates the private copy.
    pub(super) fn indirect(
        &mut self,
        h: &IndirectHeader,
    ) -> Result<Request, crate::ring::request::Refusal> {
        let mut pages = vec![0u8; h.grefs.len() * XEN_PAGE_SIZE];
        // Through a kept mapping where the guest granted the page
        // persistently (Linux blkfront does, with persistent grants), as
        // blkback maps them; the rest by one grant copy.
        let mut copied = vec![false; h.grefs.len()];
        // Only pages already kept: an indirect page may be granted
        // read-only, and is not worth a mapping of its own.
        for (i, &g) in h.grefs.iter().enumerate() {
            let kept = self
                .persistent
                .enabled
                .then(|| self.persistent.maps.get(&g).cloned());
            if let Some(page) = kept.flatten() {
                page.read_data(0, &mut pages[i * XEN_PAGE_SIZE..(i + 1) * XEN_PAGE_SIZE]);
                copied[i] = true;
            }
        }
        let mut segs: Vec<CopySeg<'_>> = pages
            .chunks_mut(XEN_PAGE_SIZE)
            .zip(&h.grefs)
            .zip(&copied)
            .filter(|(_, &done)| !done)
            .map(|((buf, &g), _)| CopySeg::from_guest(self.domid, g, 0, buf))
            .collect();
        let ok = segs.is_empty()
            || (self.grants.copy(&mut segs).is_ok() && segs.iter().all(|s| s.status == GNTST_OKAY));
        drop(segs);
        if !ok {
            tracing::debug!(domid = %self.domid, id = h.id, "indirect pages not readable");
            return Err(h.unreadable());
        }
        h.finish(&pages, &self.limits)
    }

    /// Copies a completed read's data to the guest's pages.
    pub(super) fn copy_out_slot(&mut self, i: usize, req: &Request) -> Result<(), TransferError> {
        let Some(buf) = self.slots[i].buf.take() else {
            return Err(TransferError::NoBuffer);
        };
        let pool = self.pool.clone();
        let r = self.copy_out(req, pool.slice(&buf));
        self.slots[i].buf = Some(buf);
        r
    }

    pub(super) fn copy_out(&mut self, req: &Request, data: &[u8]) -> Result<(), TransferError> {
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
    pub(super) fn copy_in(&mut self, req: &Request, buf: &mut Buf) -> Result<(), TransferError> {
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

    pub(super) fn copy(&self, segs: &mut [CopySeg<'_>]) -> Result<(), TransferError> {
        self.grants.copy(segs).map_err(TransferError::Copy)?;
        match segs.iter().find(|s| s.status != GNTST_OKAY) {
            None => Ok(()),
            Some(s) => Err(TransferError::Status {
                gref: s.gref,
                status: s.status,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::GrefHash;
    use crate::abi::blkif::GrantRef;
    use std::hash::BuildHasher;

    #[test]
    fn gref_hash_is_keyed_per_map_and_spreads_neighbours() {
        let (a, b) = (GrefHash::default(), GrefHash::default());
        // Keyed: the same refs land elsewhere in another ring's map, so a
        // guest cannot pick refs that collide in every backend.
        let same = (0..64u32)
            .filter(|&g| a.hash_one(GrantRef(g)) == b.hash_one(GrantRef(g)))
            .count();
        assert_eq!(same, 0);
        // Neighbouring refs (what a frontend grants) differ in the low bits
        // hashbrown picks buckets with, and in the top 7 it tags them with.
        let low: std::collections::HashSet<u64> = (0..1024u32)
            .map(|g| a.hash_one(GrantRef(g)) & 1023)
            .collect();
        assert!(low.len() > 600, "{} distinct low bits of 1024", low.len());
        let top: std::collections::HashSet<u64> = (0..1024u32)
            .map(|g| a.hash_one(GrantRef(g)) >> 57)
            .collect();
        assert!(top.len() > 100, "{} distinct tags of 128", top.len());
    }
}
