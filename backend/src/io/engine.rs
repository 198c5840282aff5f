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

use tokio::sync::mpsc;

use super::pool::{BouncePool, Buf};
use super::uring::UringEngine;
use super::Disk;

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
    /// Where in the buffer the `len` bytes start.
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
        Ok(Engine::Threads(ThreadEngine::new(disk, pool)))
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

    /// Waits until [`Engine::reap`] has something (returns at once when
    /// nothing is in flight, so callers guard it with [`Engine::in_flight`]).
    pub async fn ready(&mut self) {
        match self {
            Engine::Uring(u) => u.ready().await,
            Engine::Threads(t) => t.ready().await,
            Engine::Scripted(s) => {
                if s.done.is_empty() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// Blocking I/O on one worker thread per ring. Operations run one after
/// another in submission order, so a flush drains by construction.
#[derive(Debug)]
pub struct ThreadEngine {
    tx: Option<std::sync::mpsc::Sender<IoOp>>,
    rx: mpsc::UnboundedReceiver<IoDone>,
    ready: VecDeque<IoDone>,
    pub(super) in_flight: usize,
}

impl ThreadEngine {
    /// A worker over `disk`.
    pub fn new(disk: Arc<dyn Disk>, pool: Arc<BouncePool>) -> ThreadEngine {
        let (tx, ops) = std::sync::mpsc::channel::<IoOp>();
        let (done, rx) = mpsc::unbounded_channel();
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
                    };
                    if done.send(d).is_err() {
                        break;
                    }
                }
            })
            .map(drop)
            .unwrap_or_else(|e| tracing::error!("cannot start an I/O worker thread: {e}"));
        ThreadEngine {
            tx: Some(tx),
            rx,
            ready: VecDeque::new(),
            in_flight: 0,
        }
    }

    pub(super) fn push(&mut self, op: IoOp) {
        self.in_flight += 1;
        if let Some(tx) = &self.tx {
            if let Err(std::sync::mpsc::SendError(op)) = tx.send(op) {
                self.ready.push_back(IoDone {
                    tag: op.tag,
                    result: Err(io::Error::other("the I/O worker thread is gone")),
                    buf: op.buf,
                });
            }
        }
    }

    pub(super) fn has_completions(&mut self) -> bool {
        while let Ok(d) = self.rx.try_recv() {
            self.ready.push_back(d);
        }
        !self.ready.is_empty()
    }

    pub(super) fn reap(&mut self, out: &mut Vec<IoDone>) {
        while let Ok(d) = self.rx.try_recv() {
            self.ready.push_back(d);
        }
        self.in_flight -= self.ready.len();
        out.extend(self.ready.drain(..));
    }

    pub(super) async fn ready(&mut self) {
        if !self.ready.is_empty() || self.in_flight == 0 {
            return;
        }
        if let Some(d) = self.rx.recv().await {
            self.ready.push_back(d);
        }
    }
}

/// Runs one operation with blocking calls.
fn run_blocking(disk: &dyn Disk, pool: &BouncePool, op: &mut IoOp) -> io::Result<usize> {
    let len = op.len as usize;
    let range = op.buf_off..op.buf_off.saturating_add(len);
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, "I/O outside its buffer");
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
