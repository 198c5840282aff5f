//! The shared ring of `xen/io/ring.h`: both ends, with exact index arithmetic.
//!
//! No syscalls and no unsafe: the ring reads and writes shared memory only
//! through [`RingMem`], whose implementation (`xen::mem::SharedMem`) makes
//! atomic accesses. Indices are free-running `u32`s compared with wrapping
//! subtraction, as the C macros do.
//!
//! The back end copies each request slot out whole before anything looks at
//! it ([`BackRing::take`]); [`request`] validates those copies.
#![forbid(unsafe_code)]

pub mod request;

use crate::abi::blkif::{
    Abi, Layout, SRING_ENTRIES_OFFSET, SRING_REQ_EVENT, SRING_REQ_PROD, SRING_RSP_EVENT,
    SRING_RSP_PROD, XEN_PAGE_SIZE,
};

/// Access to memory shared with the other end of a ring.
pub trait RingMem {
    /// Size of the region.
    fn len(&self) -> usize;
    /// Whether the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A `u32` load with acquire ordering (`rmb` after reading a producer index).
    fn load_u32(&self, off: usize) -> u32;
    /// A `u32` store with release ordering (`wmb` before publishing an index).
    fn store_u32(&self, off: usize, v: u32);
    /// A full barrier (`mb`).
    fn full_fence(&self);
    /// Copies bytes out.
    fn read(&self, off: usize, dst: &mut [u8]);
    /// Copies bytes in.
    fn write(&self, off: usize, src: &[u8]);
}

/// A ring index (`RING_IDX`).
pub type RingIdx = u32;

/// Why a ring stopped being served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// `RING_REQUEST_PROD_OVERFLOW`: the frontend claims more requests than the
    /// ring can hold, which only a broken or hostile frontend does.
    #[error("frontend provided bogus ring requests (req_prod {req_prod}, rsp_prod {rsp_prod}, ring of {size}); halting ring")]
    ProdOverflow {
        /// The producer index read.
        req_prod: u32,
        /// Our response producer.
        rsp_prod: u32,
        /// Entries in the ring.
        size: u32,
    },
    /// The ring's memory is smaller than `pages` pages.
    #[error("ring mapping of {have} bytes is smaller than {pages} pages")]
    TooSmall {
        /// Bytes mapped.
        have: usize,
        /// Pages wanted.
        pages: usize,
    },
    /// A request broke the protocol (see the reason); the ring is halted.
    #[error("frontend broke the protocol: {0}; halting ring")]
    Protocol(String),
    /// The frontend notified the event channel over and over without
    /// producing a request (an event-channel storm).
    #[error("event channel storm: {0} notifications in a row without a new request; halting ring")]
    EventStorm(u32),
}

/// Slot offset of index `idx` in a ring of `size` entries of `stride` bytes.
fn slot(idx: RingIdx, size: u32, stride: usize) -> usize {
    SRING_ENTRIES_OFFSET + (idx & (size - 1)) as usize * stride
}

/// The backend's end: consumes requests, produces responses.
#[derive(Debug)]
pub struct BackRing<M> {
    mem: M,
    abi: Abi,
    layout: Layout,
    size: u32,
    req_cons: RingIdx,
    rsp_prod_pvt: RingIdx,
    halted: Option<RingError>,
}

/// One request slot, copied out of the ring: the bytes the validator sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawRequest {
    /// The slot's bytes (the ABI's slot size).
    pub bytes: Vec<u8>,
}

impl<M: RingMem> BackRing<M> {
    /// A back ring over `pages` pages of `mem`. Consumption starts at the
    /// published `rsp_prod` (0 on a fresh ring), as `BACK_RING_ATTACH` does:
    /// with wrapping arithmetic any start is as good as 0, and the same code
    /// takes over a live ring after a restart (every response must have been
    /// pushed before the previous owner let go).
    pub fn new(mem: M, pages: usize, abi: Abi) -> Result<Self, RingError> {
        if !pages.is_power_of_two() || mem.len() < pages * XEN_PAGE_SIZE {
            return Err(RingError::TooSmall {
                have: mem.len(),
                pages,
            });
        }
        let rsp = mem.load_u32(SRING_RSP_PROD);
        Ok(BackRing {
            size: abi.ring_entries(pages),
            layout: abi.layout(),
            abi,
            mem,
            req_cons: rsp,
            rsp_prod_pvt: rsp,
            halted: None,
        })
    }

    /// [`BackRing::new`], refusing at once a ring whose producer already
    /// claims more requests than it holds.
    pub fn attach(mem: M, pages: usize, abi: Abi) -> Result<Self, RingError> {
        let mut r = Self::new(mem, pages, abi)?;
        r.check_prod()?;
        Ok(r)
    }

    /// Entries in the ring.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The ABI requests are laid out in.
    pub fn abi(&self) -> Abi {
        self.abi
    }

    /// Why the ring was halted, if it was.
    pub fn halted(&self) -> Option<&RingError> {
        self.halted.as_ref()
    }

    /// Stops serving this ring for good.
    pub fn halt(&mut self, why: RingError) {
        if self.halted.is_none() {
            self.halted = Some(why);
        }
    }

    /// Requests consumed but not yet answered.
    pub fn in_flight(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    /// Reads `req_prod` (acquire) and checks it against what the ring can hold.
    fn check_prod(&mut self) -> Result<RingIdx, RingError> {
        if let Some(e) = &self.halted {
            return Err(e.clone());
        }
        let rp = self.mem.load_u32(SRING_REQ_PROD);
        if rp.wrapping_sub(self.rsp_prod_pvt) > self.size {
            let e = RingError::ProdOverflow {
                req_prod: rp,
                rsp_prod: self.rsp_prod_pvt,
                size: self.size,
            };
            self.halted = Some(e.clone());
            return Err(e);
        }
        Ok(rp)
    }

    /// `RING_HAS_UNCONSUMED_REQUESTS`: what may be taken now, never more than
    /// there are free response slots for.
    pub fn unconsumed(&mut self) -> Result<u32, RingError> {
        let rp = self.check_prod()?;
        let req = rp.wrapping_sub(self.req_cons);
        let rsp = self.size - self.req_cons.wrapping_sub(self.rsp_prod_pvt);
        Ok(req.min(rsp))
    }

    /// Copies up to `max` requests out of the ring (at most one ring's worth per
    /// call) and advances `req_cons` past them.
    pub fn take(&mut self, max: u32) -> Result<Vec<RawRequest>, RingError> {
        let n = self.unconsumed()?.min(max).min(self.size);
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let mut bytes = vec![0u8; self.layout.slot];
            self.mem
                .read(slot(self.req_cons, self.size, self.layout.slot), &mut bytes);
            // The slot is now ours to reuse for the response: consume before
            // answering, as the shared slot serves both.
            self.req_cons = self.req_cons.wrapping_add(1);
            out.push(RawRequest { bytes });
        }
        Ok(out)
    }

    /// Writes one response into the next response slot (not yet published).
    /// The whole response is written, padding zeroed, so no stale byte leaks.
    pub fn put_response(&mut self, id: u64, operation: u8, status: i16) {
        debug_assert!(self.in_flight() > 0, "a response needs a consumed request");
        // On the stack: every response is at most the x86_64 layout's size.
        let mut buf = [0u8; std::mem::size_of::<crate::abi::blkif::ResponseX86_64>()];
        let rsp = &mut buf[..self.layout.rsp];
        rsp[0..8].copy_from_slice(&id.to_le_bytes());
        rsp[self.layout.rsp_op] = operation;
        rsp[self.layout.rsp_status..self.layout.rsp_status + 2]
            .copy_from_slice(&status.to_le_bytes());
        self.mem
            .write(slot(self.rsp_prod_pvt, self.size, self.layout.slot), rsp);
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`: publishes the responses written
    /// so far; returns whether the frontend asked to be notified.
    pub fn push_responses(&mut self) -> bool {
        let old = self.mem.load_u32(SRING_RSP_PROD);
        let new = self.rsp_prod_pvt;
        self.mem.store_u32(SRING_RSP_PROD, new);
        self.mem.full_fence();
        let event = self.mem.load_u32(SRING_RSP_EVENT);
        new.wrapping_sub(event) < new.wrapping_sub(old)
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`: before sleeping, ask to be notified of
    /// the next request, then look once more (closes the race with a request
    /// produced in between).
    pub fn final_check(&mut self) -> Result<bool, RingError> {
        if self.unconsumed()? > 0 {
            return Ok(true);
        }
        self.mem
            .store_u32(SRING_REQ_EVENT, self.req_cons.wrapping_add(1));
        self.mem.full_fence();
        Ok(self.unconsumed()? > 0)
    }
}

/// The frontend's end (used by the simulated blkfront): produces requests,
/// consumes responses.
#[derive(Debug)]
pub struct FrontRing<M> {
    mem: M,
    layout: Layout,
    size: u32,
    req_prod_pvt: RingIdx,
    rsp_cons: RingIdx,
}

impl<M: RingMem> FrontRing<M> {
    /// `SHARED_RING_INIT` + `FRONT_RING_INIT` over `pages` zeroed pages. `start`
    /// is the initial index (0 normally; tests start near `u32::MAX`).
    pub fn init(mem: M, pages: usize, abi: Abi, start: RingIdx) -> Result<Self, RingError> {
        if !pages.is_power_of_two() || mem.len() < pages * XEN_PAGE_SIZE {
            return Err(RingError::TooSmall {
                have: mem.len(),
                pages,
            });
        }
        mem.store_u32(SRING_REQ_PROD, start);
        mem.store_u32(SRING_RSP_PROD, start);
        mem.store_u32(SRING_REQ_EVENT, start.wrapping_add(1));
        mem.store_u32(SRING_RSP_EVENT, start.wrapping_add(1));
        Ok(FrontRing {
            size: abi.ring_entries(pages),
            layout: abi.layout(),
            mem,
            req_prod_pvt: start,
            rsp_cons: start,
        })
    }

    /// Entries in the ring.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Free request slots.
    pub fn free(&self) -> u32 {
        self.size - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// The shared memory (for misbehaving on purpose).
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// Writes a request (raw slot bytes) into the next slot, unpublished.
    /// Returns `false` if the ring is full.
    pub fn put_request(&mut self, bytes: &[u8]) -> bool {
        if self.free() == 0 {
            return false;
        }
        let n = bytes.len().min(self.layout.slot);
        self.mem.write(
            slot(self.req_prod_pvt, self.size, self.layout.slot),
            &bytes[..n],
        );
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        true
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`.
    pub fn push_requests(&mut self) -> bool {
        let old = self.mem.load_u32(SRING_REQ_PROD);
        let new = self.req_prod_pvt;
        self.mem.store_u32(SRING_REQ_PROD, new);
        self.mem.full_fence();
        let event = self.mem.load_u32(SRING_REQ_EVENT);
        new.wrapping_sub(event) < new.wrapping_sub(old)
    }

    /// Takes the published responses: (id, operation, status) each.
    pub fn take_responses(&mut self) -> Vec<(u64, u8, i16)> {
        let mut out = Vec::new();
        self.take_responses_into(&mut out);
        out
    }

    /// [`FrontRing::take_responses`] appended to `out`, allocating nothing
    /// when `out` has room.
    pub fn take_responses_into(&mut self, out: &mut Vec<(u64, u8, i16)>) {
        let rp = self.mem.load_u32(SRING_RSP_PROD);
        let mut b = [0u8; 64];
        let b = &mut b[..self.layout.rsp.min(64)];
        while self.rsp_cons != rp {
            self.mem
                .read(slot(self.rsp_cons, self.size, self.layout.slot), b);
            let id = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
            let op = b[self.layout.rsp_op];
            let st = i16::from_le_bytes([b[self.layout.rsp_status], b[self.layout.rsp_status + 1]]);
            out.push((id, op, st));
            self.rsp_cons = self.rsp_cons.wrapping_add(1);
        }
    }

    /// Whether the backend has published responses not taken yet (a look
    /// that arms nothing: for a frontend polling its ring).
    pub fn has_responses(&self) -> bool {
        self.mem.load_u32(SRING_RSP_PROD) != self.rsp_cons
    }

    /// `RING_FINAL_CHECK_FOR_RESPONSES`: arms `rsp_event`, then looks again.
    pub fn final_check_responses(&mut self) -> bool {
        if self.mem.load_u32(SRING_RSP_PROD) != self.rsp_cons {
            return true;
        }
        self.mem
            .store_u32(SRING_RSP_EVENT, self.rsp_cons.wrapping_add(1));
        self.mem.full_fence();
        self.mem.load_u32(SRING_RSP_PROD) != self.rsp_cons
    }

    /// Requests published but not yet answered.
    pub fn outstanding(&self) -> u32 {
        self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }
}

#[cfg(test)]
mod tests;
