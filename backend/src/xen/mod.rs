//! The hypervisor seam: grant access and event channels.
//!
//! `mem` is the accessor for memory shared with guests. The traits here are
//! implemented twice: [`dev`] over Linux's `/dev/xen/gntdev` and
//! `/dev/xen/evtchn`, and [`sim`] over files and unix sockets for the embedded
//! default. The protocol engine only sees the traits.

pub mod dev;
pub mod mem;
pub mod sim;

use std::io;
use std::os::fd::RawFd;

pub use xenstore::DomId;

use crate::abi::blkif::GrantRef;
use mem::SharedMem;

/// An event-channel port number, local to the domain that bound it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port(pub u32);

impl std::fmt::Display for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Which way a grant copy goes.
#[derive(Debug)]
pub enum CopyDir<'a> {
    /// From the guest's page into this buffer.
    FromGuest(&'a mut [u8]),
    /// From this buffer into the guest's page.
    ToGuest(&'a [u8]),
}

impl CopyDir<'_> {
    /// Bytes to copy.
    pub fn len(&self) -> usize {
        match self {
            CopyDir::FromGuest(b) => b.len(),
            CopyDir::ToGuest(b) => b.len(),
        }
    }

    /// Whether nothing is to be copied.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One element of a grant-copy batch. The guest side must lie within one page.
#[derive(Debug)]
pub struct CopySeg<'a> {
    /// The granting domain.
    pub domid: DomId,
    /// The grant.
    pub gref: GrantRef,
    /// Offset in the granted page.
    pub offset: u16,
    /// Direction and local buffer.
    pub dir: CopyDir<'a>,
    /// OUT: `GNTST_*` for this element; check every one (XSA-361 and friends).
    pub status: i16,
}

impl<'a> CopySeg<'a> {
    /// A copy out of a guest page.
    pub fn from_guest(domid: DomId, gref: GrantRef, offset: u16, buf: &'a mut [u8]) -> Self {
        CopySeg {
            domid,
            gref,
            offset,
            dir: CopyDir::FromGuest(buf),
            status: crate::abi::sys::GNTST_GENERAL_ERROR,
        }
    }

    /// A copy into a guest page.
    pub fn to_guest(domid: DomId, gref: GrantRef, offset: u16, buf: &'a [u8]) -> Self {
        CopySeg {
            domid,
            gref,
            offset,
            dir: CopyDir::ToGuest(buf),
            status: crate::abi::sys::GNTST_GENERAL_ERROR,
        }
    }
}

/// Access to pages other domains granted us.
pub trait Grants: Send + Sync + 'static {
    /// Copies every element of the batch, setting each one's status. An `Err`
    /// means the batch as a whole could not be attempted.
    fn copy(&self, segs: &mut [CopySeg<'_>]) -> io::Result<()>;

    /// Maps `refs` of `domid` side by side (ring pages, persistent grants).
    /// Refused as a whole if any grant is bad; unmapped when dropped.
    fn map(&self, domid: DomId, refs: &[GrantRef], writable: bool) -> io::Result<SharedMem>;

    /// Lets go of whatever is kept per domain once none of its devices is
    /// served any more (the simulation keeps the guest's memory mapped;
    /// gntdev keeps nothing).
    fn forget_domain(&self, _domid: DomId) {}
}

/// One bound event channel.
pub trait EventChannel: Send + Sync + 'static {
    /// Our end's port.
    fn local_port(&self) -> Port;
    /// Kicks the other end.
    fn notify(&self) -> io::Result<()>;
    /// Lets further kicks through (call after the ring sweep, XSA-332).
    fn unmask(&self) -> io::Result<()>;
    /// A descriptor that polls readable while a kick is pending, for a
    /// queue's own thread to sleep on with its other descriptors (`None`:
    /// the channel has none; only [`EventChannel::take_kick`] tells). It is
    /// registered with no async reactor: a kick wakes the queue's thread and
    /// nothing else.
    fn fd(&self) -> Option<RawFd>;
    /// Consumes the kicks pending now without waiting; true if there was
    /// one (kicks that came meanwhile are folded into one, like an event
    /// channel's pending bit). The channel stays masked until
    /// [`EventChannel::unmask`].
    fn take_kick(&self) -> io::Result<bool>;
    /// Whether a ring (io_uring) can carry this channel's kicks in the
    /// sleep's own system call: a kick is a read of [`EventChannel::fd`],
    /// the unmask a write to it that the engine makes (see [`Carried`]).
    /// `None` (the default): the queue reads and unmasks it itself.
    fn carried(&self) -> Option<Carried> {
        None
    }
}

/// How a ring carries an event channel (see [`EventChannel::carried`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Carried {
    /// Written to the descriptor, unmasks the channel (`None`: there is no
    /// mask to lift).
    pub unmask: Option<[u8; 4]>,
    /// A read takes one kick of several queued (datagrams rather than a
    /// pending bit): the rest are taken with [`EventChannel::take_kick`],
    /// folding them into one as the pending bit does.
    pub fold: bool,
}

/// A factory of event channels.
pub trait EventChannels: Send + Sync + 'static {
    /// The channel type.
    type Channel: EventChannel;
    /// Binds to `remote_port` of `remote` (which the guest allocated unbound).
    fn bind_interdomain(&self, remote: DomId, remote_port: Port) -> io::Result<Self::Channel>;
}
