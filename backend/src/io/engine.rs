//! The I/O engines a ring's worker submits to.
//!
//! What an engine is asked and answers is [`super::op`]. Completions come
//! back in any order. Three engines:
//! - [`UringEngine`](super::uring::UringEngine): io_uring, batched
//!   submissions, `O_DIRECT` for aligned requests, the bounce pool registered
//!   as a fixed buffer where the kernel lets us;
//! - [`ThreadEngine`](super::thread::ThreadEngine): a worker thread doing blocking positioned I/O through
//!   the [`Disk`] trait, for dom0s that disable io_uring and for disks that
//!   have no file descriptor (the in-memory disk of the tests and the demo);
//! - [`RbdEngine`](super::rbd::RbdEngine): librbd's asynchronous requests,
//!   for Ceph RBD images.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::op::{IoDone, IoOp};
use super::pool::BouncePool;
use super::rbd::RbdEngine;
use super::thread::ThreadEngine;
use super::uring::UringEngine;
use super::Disk;

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

/// What a queue's thread sleeps on (see [`Engine::sleep`]).
#[derive(Clone, Copy, Debug)]
pub struct SleepOn {
    /// Polled readable: the stop doorbell and the event channel (`-1`:
    /// none).
    pub fds: [RawFd; 2],
    /// The engine may read the event channel (`fds[1]`) itself: io_uring
    /// reads it in the ring instead of polling it, so the kick is consumed
    /// by the system call that sleeps, and says so with [`Ready::Read`].
    pub read_ev: bool,
    /// Written to the event channel just before the sleep: the unmask (only
    /// where [`Engine::carries_channel`]; the io_uring engine writes it
    /// with `write(2)`, see [`UringEngine::sleep`]).
    pub unmask: Option<[u8; 4]>,
}

/// What a sleep found on one of its descriptors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ready {
    /// Nothing.
    #[default]
    No,
    /// It polls readable (or its read failed): the caller reads it.
    Readable,
    /// The engine read a kick from it: there is nothing left to read.
    Read,
}

impl Ready {
    /// A `poll(2)` result.
    pub fn polled(readable: bool) -> Ready {
        if readable {
            Ready::Readable
        } else {
            Ready::No
        }
    }
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
    /// librbd's asynchronous requests (an `rbd:` disk).
    Rbd(RbdEngine),
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
        if let Some(image) = disk
            .rbd_image()
            .filter(|_| choice != EngineChoice::Blocking)
        {
            return RbdEngine::new(image, pool).map(Engine::Rbd);
        }
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
            Engine::Rbd(_) => "librbd",
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
            Engine::Rbd(r) => r.push(op),
            Engine::Scripted(s) => s.pending.push(op),
        }
    }

    /// Hands the queued operations to the kernel or the worker.
    pub fn submit(&mut self) {
        match self {
            Engine::Uring(u) => u.submit(),
            Engine::Threads(_) | Engine::Rbd(_) | Engine::Scripted(_) => {}
        }
    }

    /// Moves the completions available now into `out`.
    pub fn reap(&mut self, out: &mut Vec<IoDone>) {
        match self {
            Engine::Uring(u) => u.reap(out),
            Engine::Threads(t) => t.reap(out),
            Engine::Rbd(r) => r.reap(out),
            Engine::Scripted(s) => out.extend(s.done.drain(..)),
        }
    }

    /// Whether [`Engine::reap`] has something now, without waiting (what a
    /// polling ring looks at).
    pub fn has_completions(&mut self) -> bool {
        match self {
            Engine::Uring(u) => u.has_completions(),
            Engine::Threads(t) => t.has_completions(),
            Engine::Rbd(r) => r.has_completions(),
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
            Engine::Rbd(r) => r.in_flight(),
            Engine::Scripted(s) => s.pending.len() + s.done.len(),
        }
    }

    /// Whether [`Engine::sleep`] also submits what is queued (io_uring): a
    /// caller about to sleep can leave its pass's I/O to that one call.
    pub fn submits_in_sleep(&self) -> bool {
        matches!(self, Engine::Uring(_))
    }

    /// Operations queued and not yet handed to the kernel.
    pub fn queued(&self) -> usize {
        match self {
            Engine::Uring(u) => u.queued(),
            _ => 0,
        }
    }

    /// Whether a pass should submit its queued I/O itself even so (see
    /// [`UringEngine::submit_in_pass`]); true for the engines whose sleep
    /// does not submit.
    pub fn submit_in_pass(&mut self) -> bool {
        match self {
            Engine::Uring(u) => u.submit_in_pass(),
            _ => true,
        }
    }

    /// Whether [`Engine::sleep`] takes an event channel's unmask
    /// ([`SleepOn::unmask`]) and reads its kicks itself (io_uring).
    pub fn carries_channel(&self) -> bool {
        matches!(self, Engine::Uring(_))
    }

    /// Sleeps until one of `on.fds` (`-1`: none) is ready, a completion may
    /// be reaped (while I/O is in flight), or `timeout` (`None`: no limit);
    /// says which of `on.fds` were. io_uring writes the unmask, then submits
    /// what is queued, reads the event channel and waits in one `io_uring_enter`
    /// (see [`UringEngine::sleep`]); the other engines wait in `poll(2)` on
    /// `on.fds` and their own descriptors, and carry no unmask (an error).
    pub fn sleep(&mut self, on: SleepOn, timeout: Option<Duration>) -> io::Result<[Ready; 2]> {
        if let Engine::Uring(u) = self {
            return u.sleep(on, timeout);
        }
        if on.unmask.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "only the io_uring engine carries an event channel's unmask",
            ));
        }
        let own = if self.in_flight() > 0 {
            self.fds()
        } else {
            [None, None]
        };
        let ready = super::wait::readable_with(on.fds, own, timeout)?;
        Ok(ready.map(Ready::polled))
    }

    /// The first failure of an unmask the engine wrote since the last
    /// call (the channel stays masked: the caller says so).
    pub fn take_unmask_error(&mut self) -> Option<io::Error> {
        match self {
            Engine::Uring(u) => u.take_unmask_error(),
            _ => None,
        }
    }

    /// The descriptors that poll readable when [`Engine::reap`] may have
    /// something (io_uring: its ring, and the side thread's doorbell; the
    /// blocking engine: its worker's doorbell; scripted: none, the owner
    /// completes its operations).
    pub fn fds(&self) -> [Option<RawFd>; 2] {
        match self {
            Engine::Uring(u) => u.fds(),
            Engine::Threads(t) => [Some(t.bell.fd()), None],
            Engine::Rbd(r) => [Some(r.fd()), None],
            Engine::Scripted(_) => [None, None],
        }
    }
}
