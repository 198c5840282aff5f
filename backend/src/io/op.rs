//! What an I/O engine is asked to do and what it answers: an [`IoOp`]
//! carries the [`Buf`] it reads into or writes from (or the guest pages it
//! runs on, [`GuestBufs`]); the engine keeps it until the I/O has completed
//! and hands it back in the [`IoDone`], so a buffer is never reused while the
//! kernel may still touch it. Shared by every engine ([`super::engine`],
//! [`super::uring`], [`super::thread`]).
#![forbid(unsafe_code)]

use std::io;
use std::sync::Arc;

use super::pool::Buf;
use crate::xen::mem::SharedMem;

/// What an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    /// Read `len` bytes at `off` into the buffer.
    Read,
    /// Write the buffer's `len` bytes at `off`.
    Write,
    /// Make every completed write durable (fdatasync or a device flush).
    Flush,
    /// Discard `len` bytes at `off`.
    Discard,
}

/// Guest memory an operation moves its data into or out of directly (zero
/// copy): pieces of mappings of the guest's granted pages, in order. The
/// operation holds the mappings, and the engine holds the operation until
/// its I/O has completed (or, on a hung disk, a reaper does), so a mapping is
/// never unmapped while the kernel may still touch it.
#[derive(Debug, Default)]
pub struct GuestBufs {
    pieces: Vec<Piece>,
    len: usize,
}

#[derive(Debug)]
struct Piece {
    map: Arc<SharedMem>,
    off: usize,
    len: usize,
}

impl GuestBufs {
    /// Appends bytes `off..off + len` of `map`; refused (false) when they
    /// do not lie inside it.
    pub fn push(&mut self, map: Arc<SharedMem>, off: usize, len: usize) -> bool {
        if off.checked_add(len).is_none_or(|end| end > map.len()) || len == 0 {
            return false;
        }
        self.len += len;
        self.pieces.push(Piece { map, off, len });
        true
    }

    /// Bytes in all.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mappings held (one per piece).
    pub fn mappings(&self) -> impl Iterator<Item = &Arc<SharedMem>> {
        self.pieces.iter().map(|p| &p.map)
    }

    /// The address ranges of bytes `from..from + len`, in order, pieces that
    /// touch merged: what a vectored read or write is given. `None` when the
    /// range is not inside.
    pub fn ranges(&self, from: usize, len: usize) -> Option<Vec<(*mut u8, usize)>> {
        let end = from.checked_add(len).filter(|&e| e <= self.len)?;
        let mut out: Vec<(*mut u8, usize)> = Vec::with_capacity(self.pieces.len());
        let mut at = 0;
        for p in &self.pieces {
            let (lo, hi) = (at.max(from), (at + p.len).min(end));
            at += p.len;
            if lo >= hi {
                continue;
            }
            let ptr = p.map.as_ptr().wrapping_add(p.off + (lo - (at - p.len)));
            let n = hi - lo;
            match out.last_mut() {
                Some((q, m)) if q.wrapping_add(*m) == ptr => *m += n,
                _ => out.push((ptr, n)),
            }
        }
        Some(out)
    }
}

/// One operation for an engine.
#[derive(Debug)]
pub struct IoOp {
    /// The caller's name for it, returned with the completion.
    pub tag: u64,
    /// What to do.
    pub kind: IoKind,
    /// Byte offset on the disk.
    pub off: u64,
    /// Bytes.
    pub len: u64,
    /// The buffer (reads and writes), owned by the engine until completion.
    pub buf: Option<Buf>,
    /// Guest pages instead of `buf` (zero copy), held until completion.
    pub guest: Option<GuestBufs>,
    /// Where in the buffer (or the guest pages) the `len` bytes start.
    pub buf_off: usize,
    /// Start only after every operation submitted before it has completed.
    pub drain: bool,
}

impl IoOp {
    /// A flush tagged `tag`: it starts only once every operation submitted
    /// before it is done, so it covers every write answered before it.
    pub fn flush(tag: u64) -> IoOp {
        IoOp {
            tag,
            kind: IoKind::Flush,
            off: 0,
            len: 0,
            buf: None,
            guest: None,
            buf_off: 0,
            drain: true,
        }
    }
}

/// A completed operation.
#[derive(Debug)]
pub struct IoDone {
    /// The operation's tag.
    pub tag: u64,
    /// Bytes transferred, or the error.
    pub result: io::Result<usize>,
    /// The operation's buffer, back with its owner.
    pub buf: Option<Buf>,
    /// The operation's guest pages, back with their owner.
    pub guest: Option<GuestBufs>,
}

impl IoDone {
    /// `op` ended before it reached the disk, with `err`; its memory goes
    /// back with it.
    pub fn failed(op: IoOp, err: io::Error) -> IoDone {
        IoDone {
            tag: op.tag,
            result: Err(err),
            buf: op.buf,
            guest: op.guest,
        }
    }
}

/// The order a drain (a flush) imposes on an engine that starts operations
/// as they come: the drain starts only once everything started before it has
/// completed, and nothing pushed after it starts before it has completed.
/// Operations wait here meanwhile (at most what the guest's ring holds).
///
/// Engines keep it themselves rather than leave it to the kernel
/// (`IOSQE_IO_DRAIN`), which would also hold back the entries io_uring
/// sleeps on (the event channel's read) and cannot share a ring with
/// `IOSQE_CQE_SKIP_SUCCESS`.
#[derive(Debug, Default)]
pub struct DrainOrder {
    held: std::collections::VecDeque<IoOp>,
    /// The tag of the drain started and not yet completed.
    barrier: Option<u64>,
}

impl DrainOrder {
    /// Queues `op` behind what is held.
    pub fn hold(&mut self, op: IoOp) {
        self.held.push_back(op);
    }

    /// The next operation that may start now, with `started` of the
    /// engine's operations started and not completed.
    pub fn next(&mut self, started: usize) -> Option<IoOp> {
        if self.barrier.is_some() {
            return None;
        }
        if self.held.front()?.drain && started > 0 {
            return None;
        }
        let op = self.held.pop_front()?;
        if op.drain {
            self.barrier = Some(op.tag);
        }
        Some(op)
    }

    /// Operation `tag` is done (completed, or failed before it started):
    /// a drain no longer holds back what came after it.
    pub fn done(&mut self, tag: u64) {
        if self.barrier == Some(tag) {
            self.barrier = None;
        }
    }

    /// Operations held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(tag: u64) -> IoOp {
        IoOp {
            tag,
            kind: IoKind::Read,
            off: 0,
            len: 512,
            buf: None,
            guest: None,
            buf_off: 0,
            drain: false,
        }
    }

    #[test]
    fn a_drain_waits_for_what_started_before_it_and_holds_back_what_follows() {
        let mut o = DrainOrder::default();
        o.hold(read(1));
        o.hold(IoOp::flush(2));
        o.hold(read(3));
        // Nothing started: the read goes; the flush waits for it.
        assert_eq!(o.next(0).map(|op| op.tag), Some(1));
        assert!(o.next(1).is_none(), "the flush started under a read");
        // The read done: the flush goes, alone.
        o.done(1);
        assert_eq!(o.next(0).map(|op| op.tag), Some(2));
        assert!(o.next(1).is_none(), "a read started under the flush");
        // Another operation's end does not lift the barrier.
        o.done(1);
        assert!(o.next(0).is_none());
        o.done(2);
        assert_eq!(o.next(0).map(|op| op.tag), Some(3));
        assert!(o.next(1).is_none());
        assert_eq!(o.len(), 0);
        // A flush that failed before it started lifts it as well.
        o.hold(IoOp::flush(4));
        o.hold(read(5));
        assert_eq!(o.next(0).map(|op| op.tag), Some(4));
        o.done(4);
        assert_eq!(o.next(0).map(|op| op.tag), Some(5));
    }
}
