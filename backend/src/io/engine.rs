//! The I/O engines a ring's worker submits to.
//!
//! An [`IoOp`] carries the [`Buf`] it reads into or writes from; the engine
//! keeps it until the I/O has completed and hands it back in the [`IoDone`],
//! so a buffer is never reused while the kernel may still touch it.
//! Completions come back in any order. Two engines:
//! - [`UringEngine`](super::uring::UringEngine): io_uring, batched
//!   submissions, `O_DIRECT` for aligned requests, the bounce pool registered
//!   as a fixed buffer where the kernel lets us;
//! - [`ThreadEngine`]: a worker thread doing blocking positioned I/O through
//!   the [`Disk`] trait, for dom0s that disable io_uring and for disks that
//!   have no file descriptor (the in-memory disk of the tests and the demo).
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::pool::{BouncePool, Buf};
use super::uring::UringEngine;
use super::wait::Doorbell;
use super::Disk;
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

/// Which engine serves the rings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum EngineChoice {
    /// io_uring where the disk and the kernel allow it, else blocking.
    #[default]
    Auto,
    /// io_uring only: a disk it cannot serve fails to connect.
    IoUring,
    /// Blocking I/O on a worker thread per ring.
    Blocking,
}

/// Whether this kernel lets us use io_uring (probed once, logged once).
pub fn uring_available() -> bool {
    static PROBE: OnceLock<bool> = OnceLock::new();
    *PROBE.get_or_init(|| match io_uring::IoUring::new(2) {
        Ok(_) => {
            tracing::info!("I/O engine: io_uring");
            true
        }
        Err(e) => {
            tracing::warn!(
                "io_uring is unavailable ({e}; is kernel.io_uring_disabled set?): \
                 rings are served with blocking I/O on worker threads"
            );
            false
        }
    })
}

/// A ring's engine.
#[derive(Debug)]
pub enum Engine {
    /// io_uring.
    Uring(Box<UringEngine>),
    /// Blocking worker thread.
    Threads(ThreadEngine),
    /// Completions decided by the owner (the serving loop's fuzz target and
    /// tests): their order, errors and short transfers.
    Scripted(ScriptedEngine),
}

/// An engine that does no I/O: operations wait in [`ScriptedEngine::pending`]
/// until [`ScriptedEngine::complete`] says how each ends.
#[derive(Debug, Default)]
pub struct ScriptedEngine {
    /// Operations pushed and not completed yet, in push order.
    pub pending: Vec<IoOp>,
    done: VecDeque<IoDone>,
}

impl ScriptedEngine {
    /// Completes pending operation `index` with `result` (bytes
    /// transferred, or an error); false if there is no such operation.
    pub fn complete(&mut self, index: usize, result: io::Result<usize>) -> bool {
        if index >= self.pending.len() {
            return false;
        }
        let op = self.pending.remove(index);
        self.done.push_back(IoDone {
            tag: op.tag,
            result,
            buf: op.buf,
            guest: op.guest,
        });
        true
    }
}

impl Engine {
    /// The engine `choice` asks for over `disk`, with its buffers in `pool`.
    pub fn open(
        choice: EngineChoice,
        disk: Arc<dyn Disk>,
        pool: Arc<BouncePool>,
        direct: bool,
    ) -> io::Result<Engine> {
        let want_uring = match choice {
            EngineChoice::Blocking => false,
            EngineChoice::IoUring => true,
            EngineChoice::Auto => uring_available() && disk.uring_target().is_some(),
        };
        if want_uring {
            return UringEngine::new(disk, pool, direct).map(|u| Engine::Uring(Box::new(u)));
        }
        Ok(Engine::Threads(ThreadEngine::new(disk, pool)?))
    }

    /// The engine's name, for status and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Uring(u) if u.direct() => "io_uring+O_DIRECT",
            Engine::Uring(_) => "io_uring",
            Engine::Threads(_) => "blocking",
            Engine::Scripted(_) => "scripted",
        }
    }

    /// Whether operations may carry guest pages ([`IoOp::guest`]) instead
    /// of a bounce buffer: io_uring does vectored I/O on them; the blocking
    /// engine has only the [`Disk`] trait's byte slices, which must never
    /// point into guest memory.
    pub fn zero_copy(&self) -> bool {
        matches!(self, Engine::Uring(_) | Engine::Scripted(_))
    }

    /// Queues an operation (submitted by [`Engine::submit`]).
    pub fn push(&mut self, op: IoOp) {
        match self {
            Engine::Uring(u) => u.push(op),
            Engine::Threads(t) => t.push(op),
            Engine::Scripted(s) => s.pending.push(op),
        }
    }

    /// Hands the queued operations to the kernel or the worker.
    pub fn submit(&mut self) {
        match self {
            Engine::Uring(u) => u.submit(),
            Engine::Threads(_) | Engine::Scripted(_) => {}
        }
    }

    /// Moves the completions available now into `out`.
    pub fn reap(&mut self, out: &mut Vec<IoDone>) {
        match self {
            Engine::Uring(u) => u.reap(out),
            Engine::Threads(t) => t.reap(out),
            Engine::Scripted(s) => out.extend(s.done.drain(..)),
        }
    }

    /// Whether [`Engine::reap`] has something now, without waiting (what a
    /// polling ring looks at).
    pub fn has_completions(&mut self) -> bool {
        match self {
            Engine::Uring(u) => u.has_completions(),
            Engine::Threads(t) => t.has_completions(),
            Engine::Scripted(s) => !s.done.is_empty(),
        }
    }

    /// Waits at most `timeout` for a completion where the engine can sleep
    /// on it directly (io_uring: in `io_uring_enter`); elsewhere only looks.
    pub fn wait_completion(&mut self, timeout: Duration) -> bool {
        match self {
            Engine::Uring(u) => u.wait_completion(timeout),
            _ => self.has_completions(),
        }
    }

    /// Operations pushed and not yet reaped.
    pub fn in_flight(&self) -> usize {
        match self {
            Engine::Uring(u) => u.in_flight(),
            Engine::Threads(t) => t.in_flight,
            Engine::Scripted(s) => s.pending.len() + s.done.len(),
        }
    }

    /// The descriptors that poll readable when [`Engine::reap`] may have
    /// something (io_uring: its ring, and the side thread's doorbell; the
    /// blocking engine: its worker's doorbell; scripted: none, the owner
    /// completes its operations).
    pub fn fds(&self) -> [Option<std::os::fd::RawFd>; 2] {
        match self {
            Engine::Uring(u) => u.fds(),
            Engine::Threads(t) => [Some(t.bell.fd()), None],
            Engine::Scripted(_) => [None, None],
        }
    }
}

/// Blocking I/O on one worker thread per ring. Operations run one after
/// another in submission order, so a flush drains by construction.
#[derive(Debug)]
pub struct ThreadEngine {
    tx: std::sync::mpsc::Sender<IoOp>,
    rx: std::sync::mpsc::Receiver<IoDone>,
    /// Rung by the worker after each completion.
    pub(super) bell: Doorbell,
    ready: VecDeque<IoDone>,
    pub(super) in_flight: usize,
}

impl ThreadEngine {
    /// A worker over `disk`.
    pub fn new(disk: Arc<dyn Disk>, pool: Arc<BouncePool>) -> io::Result<ThreadEngine> {
        let (tx, ops) = std::sync::mpsc::channel::<IoOp>();
        let (done, rx) = std::sync::mpsc::channel();
        let bell = Doorbell::new()?;
        let theirs = bell.try_clone()?;
        // The worker owns clones of the disk and the pool: if the disk hangs
        // and the ring is torn down, the buffer it is using stays valid.
        std::thread::Builder::new()
            .name("blkbackd-io".into())
            .spawn(move || {
                while let Ok(mut op) = ops.recv() {
                    let result = run_blocking(&*disk, &pool, &mut op);
                    let d = IoDone {
                        tag: op.tag,
                        result,
                        buf: op.buf,
                        guest: op.guest,
                    };
                    if done.send(d).is_err() {
                        break;
                    }
                    theirs.ring();
                }
            })?;
        Ok(ThreadEngine {
            tx,
            rx,
            bell,
            ready: VecDeque::new(),
            in_flight: 0,
        })
    }

    pub(super) fn push(&mut self, op: IoOp) {
        self.in_flight += 1;
        if let Err(std::sync::mpsc::SendError(op)) = self.tx.send(op) {
            let gone = io::Error::other("the I/O worker thread is gone");
            self.ready.push_back(IoDone::failed(op, gone));
        }
    }

    pub(super) fn has_completions(&mut self) -> bool {
        self.gather();
        !self.ready.is_empty()
    }

    /// Takes what the worker finished; quiets the doorbell first, so a
    /// completion sent after the look rings it again.
    fn gather(&mut self) {
        self.bell.clear();
        while let Ok(d) = self.rx.try_recv() {
            self.ready.push_back(d);
        }
    }

    pub(super) fn reap(&mut self, out: &mut Vec<IoDone>) {
        self.gather();
        self.in_flight -= self.ready.len();
        out.extend(self.ready.drain(..));
    }
}

/// Runs one operation with blocking calls.
fn run_blocking(disk: &dyn Disk, pool: &BouncePool, op: &mut IoOp) -> io::Result<usize> {
    let len = op.len as usize;
    let range = op.buf_off..op.buf_off.saturating_add(len);
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, "I/O outside its buffer");
    if op.guest.is_some() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the blocking engine does no I/O on guest pages",
        ));
    }
    match (op.kind, op.buf.as_mut()) {
        (IoKind::Read, Some(buf)) => {
            let b = pool.slice_mut(buf).get_mut(range).ok_or_else(bad)?;
            disk.read_at(op.off, b).map(|()| len)
        }
        (IoKind::Write, Some(buf)) => {
            let b = pool.slice(buf).get(range).ok_or_else(bad)?;
            disk.write_at(op.off, b).map(|()| len)
        }
        (IoKind::Flush, _) => disk.flush().map(|()| 0),
        (IoKind::Discard, _) => disk.discard(op.off, op.len).map(|()| 0),
        (IoKind::Read | IoKind::Write, None) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a read or write without a buffer",
        )),
    }
}
