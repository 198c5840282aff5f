//! The thread that serves a queue: a pass, then (if nothing is left to do)
//! one sleep on the event channel, the engine's completions and the stop
//! signal together; adaptive polling before sleeping; event-storm limits;
//! the bounded drain when stopping.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use super::{Queue, QueueEnd, QueueStats};
use crate::io::engine::{Ready, SleepOn};
use crate::io::Disk;
use crate::ring::RingError;
use crate::xen::{EventChannel, Grants};

/// Adaptive polling (`[io] poll_us`): after a pass that found work, the ring
/// and the engine's completions are looked at for a short window before the
/// event channel is armed; meanwhile `req_event` stays behind, so the guest
/// does not notify. The window tunes itself as KVM's halt-polling does: it
/// doubles when the ring was woken soon enough after it that a longer window
/// would have caught the work, and halves when the wait was longer than the
/// largest window. An idle ring never polls.
#[derive(Debug, Default)]
pub(super) struct Polling {
    /// The largest window (0: no polling).
    pub(super) max: Duration,
    /// The window now.
    pub(super) window: Duration,
}

impl Polling {
    /// The smallest window polling grows back from.
    const START: Duration = Duration::from_micros(2);

    pub(super) fn adapt(&mut self, waited: Duration) {
        if self.max.is_zero() {
            return;
        }
        if waited <= self.max {
            self.window = (self.window * 2).max(Self::START).min(self.max);
        } else {
            self.window /= 2;
        }
    }
}

/// How long a stopping ring waits for its in-flight I/O to complete and be
/// answered before it gives up on it (a hung disk; libxl allows 10 s).
pub(super) const DRAIN: Duration = Duration::from_secs(3);

/// Event-channel storms (XSA-332's lesson): after this many notifications in
/// a row that brought no new request, the ring listens again only after
/// [`STORM_DELAY`], so a storming guest costs at most ~1000 wake-ups a second
/// (a real event channel stays masked meanwhile, coalescing the storm).
pub(super) const STORM_GRACE: u32 = 64;

/// See [`STORM_GRACE`].
pub(super) const STORM_DELAY: Duration = Duration::from_millis(1);

/// After this many in a row, the ring is halted: a frontend notifies only
/// after producing requests, so thousands of empty notifications in a row are
/// never a correct frontend's doing.
pub const STORM_HALT: u32 = 2048;

/// What ended a queue's sleep.
pub(super) struct Woke {
    pub(super) kick: bool,
    pub(super) io: bool,
}

/// Tells a device's queue threads to stop: a flag, and a doorbell that
/// wakes them. Clones share both.
#[derive(Debug)]
pub struct StopSignal {
    flag: Arc<std::sync::atomic::AtomicBool>,
    bell: crate::io::wait::Doorbell,
}

impl StopSignal {
    /// A signal not given yet.
    pub fn new() -> std::io::Result<StopSignal> {
        Ok(StopSignal {
            flag: Arc::default(),
            bell: crate::io::wait::Doorbell::new()?,
        })
    }

    /// Another handle on the same signal.
    pub fn try_clone(&self) -> std::io::Result<StopSignal> {
        Ok(StopSignal {
            flag: self.flag.clone(),
            bell: self.bell.try_clone()?,
        })
    }

    /// Gives it: every queue waiting on it wakes and stops.
    pub fn stop(&self) {
        self.flag.store(true, std::sync::atomic::Ordering::SeqCst);
        self.bell.ring();
    }

    /// Whether it was given.
    pub fn is_stopped(&self) -> bool {
        self.flag.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(super) fn fd(&self) -> std::os::fd::RawFd {
        self.bell.fd()
    }
}

impl<G: Grants, E: EventChannel, D: Disk> Queue<G, E, D> {
    /// Polls for up to `max` after a pass that found work (see
    /// [`Polling`]); zero turns polling off.
    pub fn with_polling(mut self, max: Duration) -> Self {
        self.polling = Polling { max, window: max };
        self
    }

    /// Looks at the ring and the completions for up to the polling window;
    /// true if there is work. Spins: bounded by the window, and only after a
    /// pass that found work.
    pub(super) fn poll_for_work(&mut self) -> bool {
        let start = std::time::Instant::now();
        let until = start + self.polling.window;
        // I/O in flight: sleep on it in the kernel for the window (the
        // completion wakes the thread directly); then look at the ring.
        if self.engine.in_flight() > 0 && self.engine.wait_completion(self.polling.window) {
            self.stats.poll_ns += start.elapsed().as_nanos() as u64;
            self.stats.poll_hits += 1;
            return true;
        }
        let left = until.saturating_duration_since(std::time::Instant::now());
        let found = crate::io::wait::spin(left, || {
            !matches!(self.ring.unconsumed(), Ok(0)) || self.engine.has_completions()
        });
        self.stats.poll_ns += start.elapsed().as_nanos() as u64;
        if found {
            self.stats.poll_hits += 1;
        }
        found
    }

    /// Serves until stopped or halted, on the calling thread (a queue has
    /// one of its own: the data plane never waits behind the control
    /// plane's runtime). Between passes it sleeps once, on the event
    /// channel, the engine's completions and `stop` together (see
    /// [`crate::io::engine::Engine::sleep`]).
    pub fn serve(mut self, stop: &StopSignal) -> (QueueEnd, QueueStats) {
        // A pass that ends in a sleep leaves its I/O to the sleep's system
        // call; one that goes straight on to the next submits it here.
        self.defer_submit = self.engine.submits_in_sleep();
        loop {
            self.engine.submit();
            if stop.is_stopped() {
                self.drain();
                self.leave_share();
                return (QueueEnd::Stopped, self.stats);
            }
            self.pass();
            self.account_share();
            if self.halt.is_none() && self.spurious >= STORM_HALT {
                self.halt = Some(RingError::EventStorm(self.spurious));
            }
            let progressed = self.taken > 0 || self.completed > 0;
            if let Some(e) = &self.halt {
                if self.engine.in_flight() == 0 {
                    let e = e.clone();
                    self.ring.halt(e.clone());
                    self.leave_share();
                    return (QueueEnd::Halted(e), self.stats);
                }
            } else {
                if progressed && !self.polling.window.is_zero() && self.poll_for_work() {
                    continue;
                }
                match self.ring.final_check() {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => {
                        self.halt = Some(e);
                        continue;
                    }
                }
                if self.spurious > STORM_GRACE {
                    std::thread::sleep(STORM_DELAY);
                }
                // The channel is unmasked by the sleep (see `sleep`).
            }
            let listen = self.halt.is_none();
            // Idle: what it counted is there for `blkbackd status` now.
            self.publish_counters(self.engine.in_flight() == 0);
            if self.engine.queued() > 0 {
                self.stats.sleep_submits += 1;
            }
            // The clock is read only where it is needed (polling adapts to
            // how long sleeps last; limits wake the ring): where it is a
            // system call, two reads a sleep were most of a ring's calls.
            let polls = !self.polling.max.is_zero();
            let asleep = (polls || self.throttled_until.is_some()).then(std::time::Instant::now);
            // Requests held by the I/O limits are started when they allow.
            let wake = self
                .throttled_until
                .zip(asleep)
                .map(|(t, a)| t.saturating_duration_since(a));
            match self.sleep(listen, Some(stop), wake) {
                Ok(Woke { kick, io }) => {
                    if kick {
                        self.stats.kicks += 1;
                        self.masked = true;
                        // Judged by the pass this kick triggers.
                        self.kicked = true;
                    }
                    if let (true, Some(a)) = (kick || io, asleep.filter(|_| polls)) {
                        self.polling.adapt(a.elapsed());
                    }
                }
                Err(e) => {
                    tracing::warn!(domid = %self.domid, "event channel failed: {e}");
                    self.drain();
                    self.leave_share();
                    return (QueueEnd::Stopped, self.stats);
                }
            }
        }
    }

    /// Sleeps until a kick (if `listen`), a completion (if I/O is in
    /// flight), `stop`, or `timeout`; says which of the first two came. A
    /// listening sleep first unmasks the channel if a kick masked it. The
    /// engine sleeps (io_uring: in the same system call that submits the
    /// pass's I/O, and that also reads the channel where it can carry it,
    /// see [`crate::xen::Carried`]).
    pub(super) fn sleep(
        &mut self,
        listen: bool,
        stop: Option<&StopSignal>,
        timeout: Option<Duration>,
    ) -> std::io::Result<Woke> {
        let ev_fd = if listen { self.ev.fd() } else { None };
        // A channel without a descriptor (tests' fakes) is looked at every
        // millisecond instead.
        let timeout = match (listen, ev_fd) {
            (true, None) => Some(timeout.map_or(STORM_DELAY, |t| t.min(STORM_DELAY))),
            _ => timeout,
        };
        let carried = ev_fd
            .and(self.ev.carried())
            .filter(|_| self.engine.carries_channel());
        let mut unmask = None;
        if listen && self.masked {
            match carried {
                Some(c) => unmask = c.unmask,
                None => {
                    if let Err(e) = self.ev.unmask() {
                        tracing::warn!(domid = %self.domid, "cannot unmask event channel: {e}");
                    }
                }
            }
            self.masked = false;
        }
        let on = SleepOn {
            fds: [stop.map_or(-1, StopSignal::fd), ev_fd.unwrap_or(-1)],
            read_ev: carried.is_some(),
            unmask,
        };
        let ready = self.engine.sleep(on, timeout);
        if let Some(e) = self.engine.take_unmask_error() {
            tracing::warn!(domid = %self.domid, "cannot unmask event channel: {e}");
        }
        let ready = ready?;
        // Read the channel only when it polled readable (or has no
        // descriptor): a wake-up for a completion costs no read that would
        // only say EAGAIN. A kick the engine read is there already.
        let kick = listen
            && match ready[1] {
                Ready::Read => {
                    if carried.is_some_and(|c| c.fold) {
                        self.ev.take_kick()?;
                    }
                    true
                }
                Ready::Readable => self.ev.take_kick()?,
                Ready::No => ev_fd.is_none() && self.ev.take_kick()?,
            };
        Ok(Woke {
            kick,
            io: self.engine.in_flight() > 0 && self.engine.has_completions(),
        })
    }

    /// Takes nothing more from the ring, and finishes (bounded by [`DRAIN`])
    /// every request already taken: those that wait for buffers are started
    /// as room comes back, and every answer is published in ring order. A
    /// ring stopped to be handed over thus leaves `rsp_prod` at the end of
    /// everything it took, and the next daemon starts from there.
    pub(super) fn drain(&mut self) {
        let deadline = std::time::Instant::now() + DRAIN;
        // What was taken is finished now, limits or not: the next daemon
        // starts after it.
        self.unthrottled = true;
        loop {
            self.advance();
            self.publish();
            self.publish_counters(true);
            if self.engine.in_flight() == 0 {
                if self.has_waiting() {
                    // Nothing in flight frees room: cannot happen with a pool
                    // of at least one largest request, but never spin.
                    tracing::warn!(domid = %self.domid, "requests wait for buffers that nothing frees");
                }
                return;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let woke = !left.is_zero() && self.sleep(false, None, Some(left)).is_ok();
            if !woke {
                tracing::warn!(
                    domid = %self.domid,
                    in_flight = self.engine.in_flight(),
                    "I/O did not complete within {DRAIN:?} of the ring stopping; abandoning it"
                );
                return;
            }
        }
    }
}
