//! The blocking engine: a worker thread doing positioned I/O through the
//! [`Disk`] trait, for dom0s that disable io_uring, for disks that have no
//! file descriptor (the in-memory disk of the tests and the demo), and as
//! io_uring's side engine for what it cannot carry.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use super::op::{IoDone, IoKind, IoOp};
use super::pool::BouncePool;
use super::wait::Doorbell;
use super::Disk;

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
