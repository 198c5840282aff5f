//! The xenbus state machine of one vbd as a pure function: what was
//! observed in Xenstore (is the directory there, `online`, both ends'
//! `state`) and where the device is in its life ([`Phase`]) decide what to
//! do next ([`Step`]). The lifecycle ([`super::lifecycle`]) only reads the
//! nodes, calls [`step`] and carries the step out.
//!
//! The transitions are Linux blkback's (`drivers/block/xen-blkback/xenbus.c`,
//! `frontend_changed` and the toolstack's removal through `online`), named in
//! the table test below; where blkback waits for a removal blkbackd waits
//! too, and what blkbackd adds (the hotplug handshake before the disk is
//! open, adoption after a restart) is said where it differs.
#![forbid(unsafe_code)]

use crate::abi::sys::XenbusState;

/// Where a vbd is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// InitWait published; waiting for the block script's disk.
    AwaitingDisk {
        /// A device a previous daemon left connected: its toolstack state
        /// is not read as a removal (it was Connected when we came).
        adopted: bool,
    },
    /// The disk is open; waiting for the frontend to be ready.
    AwaitingFrontend,
    /// Rings mapped and served.
    Connected,
    /// The queues stopped; waiting for the frontend to close (or the
    /// toolstack to remove the device).
    Disconnected,
}

/// What was read in Xenstore, at one look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observed {
    /// The backend directory exists.
    pub exists: bool,
    /// `online` is not `0`.
    pub online: bool,
    /// The backend's `state`.
    pub backend: Option<XenbusState>,
    /// The frontend's `state`.
    pub frontend: Option<XenbusState>,
}

/// What to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing yet: wait for the next change.
    Wait,
    /// The directory is gone: the toolstack removed the device; end.
    Gone,
    /// The toolstack is removing the device: let go of the disk (its block
    /// script's `remove` needs it closed), write Closed, wait until the
    /// directory goes.
    CloseForRemoval,
    /// Look for the disk the block script published, and open it.
    OpenDisk,
    /// blkfront starts over (a reconnect, a migration): InitWait again.
    Reinitialise,
    /// The frontend is ready: map its rings and serve them, Connected.
    Connect,
    /// Stop the queues (they answer what they took); with `closing`, write
    /// Closing first, answering a closing frontend.
    Disconnect {
        /// The frontend wrote Closing.
        closing: bool,
    },
    /// Answer a closing frontend with Closing.
    AnswerClosing,
    /// The frontend closed: write Closed; it may come back.
    Closed,
}

impl Observed {
    /// The toolstack is removing the device: `online = 0`, or it wrote
    /// Closing to the backend itself (libxl's removal does both).
    fn removing(&self) -> bool {
        !self.online || self.backend == Some(XenbusState::Closing)
    }

    /// The frontend is gone or going: no state, Closing, Closed or Unknown.
    fn frontend_down(&self) -> bool {
        matches!(
            self.frontend,
            None | Some(XenbusState::Closing | XenbusState::Closed | XenbusState::Unknown)
        )
    }
}

/// The next step of a vbd in `phase` that observed `o`.
pub fn step(phase: Phase, o: &Observed) -> Step {
    use XenbusState as S;
    if !o.exists {
        return Step::Gone;
    }
    match phase {
        Phase::AwaitingDisk { adopted } => {
            if !adopted && o.removing() {
                // Its block script failed, or the guest went before it was
                // built: Closed at once (libxl would wait 10 s otherwise).
                Step::CloseForRemoval
            } else {
                Step::OpenDisk
            }
        }
        Phase::AwaitingFrontend => match o.frontend {
            _ if o.removing() => Step::CloseForRemoval,
            Some(S::Initialised | S::Connected) => Step::Connect,
            Some(S::Initialising) if o.backend == Some(S::Closed) => Step::Reinitialise,
            _ => Step::Wait,
        },
        Phase::Connected => {
            if o.frontend_down() || o.removing() {
                Step::Disconnect {
                    closing: o.frontend == Some(S::Closing),
                }
            } else {
                Step::Wait
            }
        }
        Phase::Disconnected => {
            if !o.online {
                Step::CloseForRemoval
            } else if matches!(o.frontend, None | Some(S::Closed | S::Unknown)) {
                Step::Closed
            } else if o.frontend == Some(S::Closing) && o.backend != Some(S::Closing) {
                Step::AnswerClosing
            } else {
                Step::Wait
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use XenbusState as S;

    const D: Phase = Phase::AwaitingDisk { adopted: false };
    const A: Phase = Phase::AwaitingDisk { adopted: true };
    const F: Phase = Phase::AwaitingFrontend;
    const C: Phase = Phase::Connected;
    const X: Phase = Phase::Disconnected;

    fn seen(online: bool, backend: Option<S>, frontend: Option<S>) -> Observed {
        Observed {
            exists: true,
            online,
            backend,
            frontend,
        }
    }

    /// A transition's name, the phase, `online`, the backend's and the
    /// frontend's state, and the step wanted.
    type Row = (&'static str, Phase, bool, Option<S>, Option<S>, Step);

    #[rustfmt::skip]
    const TABLE: &[Row] = &[
        // Before the disk is open (blkback has no such phase: its hotplug
        // watch on physical-device only connects once it is written).
        ("disk: the block script's result is looked for in InitWait", D, true, Some(S::InitWait), Some(S::Initialising), Step::OpenDisk),
        ("disk: online=0 before the disk: closed at once, not after libxl's timeout", D, false, Some(S::InitWait), Some(S::Initialising), Step::CloseForRemoval),
        ("disk: the toolstack's Closing before the disk: closed at once", D, true, Some(S::Closing), Some(S::Initialising), Step::CloseForRemoval),
        ("disk: an adopted device's state is not a removal", A, true, Some(S::Connected), Some(S::Connected), Step::OpenDisk),
        // frontend_changed, before connecting.
        ("frontend_changed Initialising while InitWait: nothing to do", F, true, Some(S::InitWait), Some(S::Initialising), Step::Wait),
        ("frontend_changed Initialising while Closed: prepare for reconnect, InitWait", F, true, Some(S::Closed), Some(S::Initialising), Step::Reinitialise),
        ("frontend_changed Initialised: connect", F, true, Some(S::InitWait), Some(S::Initialised), Step::Connect),
        ("frontend_changed Connected: connect (a frontend that skips Initialised)", F, true, Some(S::InitWait), Some(S::Connected), Step::Connect),
        ("frontend_changed Connected after a reconnect from Closed: connect", F, true, Some(S::Closed), Some(S::Connected), Step::Connect),
        ("frontend absent: wait for it", F, true, Some(S::InitWait), None, Step::Wait),
        ("frontend_changed Closed before connecting: nothing to close", F, true, Some(S::InitWait), Some(S::Closed), Step::Wait),
        ("online=0 before connecting: closed for removal", F, false, Some(S::InitWait), Some(S::Initialised), Step::CloseForRemoval),
        ("the toolstack's Closing before connecting: closed for removal", F, true, Some(S::Closing), Some(S::Initialising), Step::CloseForRemoval),
        // frontend_changed while connected.
        ("frontend_changed Connected while connected: keep serving", C, true, Some(S::Connected), Some(S::Connected), Step::Wait),
        ("frontend_changed Closing: switch to Closing, disconnect", C, true, Some(S::Connected), Some(S::Closing), Step::Disconnect { closing: true }),
        ("frontend_changed Closed: disconnect", C, true, Some(S::Connected), Some(S::Closed), Step::Disconnect { closing: false }),
        ("frontend_changed Unknown: disconnect (blkback unregisters)", C, true, Some(S::Connected), Some(S::Unknown), Step::Disconnect { closing: false }),
        ("frontend state removed: disconnect", C, true, Some(S::Connected), None, Step::Disconnect { closing: false }),
        ("online=0 while connected (xl block-detach): disconnect", C, false, Some(S::Connected), Some(S::Connected), Step::Disconnect { closing: false }),
        ("the toolstack's Closing while connected: disconnect", C, true, Some(S::Closing), Some(S::Connected), Step::Disconnect { closing: false }),
        // After the queues stopped.
        ("frontend_changed Closing after disconnect: answer Closing", X, true, Some(S::Connected), Some(S::Closing), Step::AnswerClosing),
        ("frontend Closing, Closing already written: wait for Closed", X, true, Some(S::Closing), Some(S::Closing), Step::Wait),
        ("frontend_changed Closed: xen_blkif_disconnect, Closed", X, true, Some(S::Closing), Some(S::Closed), Step::Closed),
        ("frontend_changed Unknown after disconnect: Closed", X, true, Some(S::Closing), Some(S::Unknown), Step::Closed),
        ("frontend state removed after disconnect: Closed", X, true, Some(S::Closing), None, Step::Closed),
        ("frontend_changed Closed with online=0: Closed, device removed", X, false, Some(S::Closing), Some(S::Closed), Step::CloseForRemoval),
        ("online=0 while the frontend still closes: closed for removal", X, false, Some(S::Connected), Some(S::Closing), Step::CloseForRemoval),
    ];

    #[test]
    fn blkbacks_transitions() {
        for &(name, phase, online, backend, frontend, want) in TABLE {
            assert_eq!(
                step(phase, &seen(online, backend, frontend)),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn a_removed_directory_ends_every_phase() {
        for phase in [D, A, F, C, X] {
            let o = Observed {
                exists: false,
                ..seen(true, Some(S::Connected), Some(S::Connected))
            };
            assert_eq!(step(phase, &o), Step::Gone, "{phase:?}");
        }
    }
}
