//! The grant table entry, the Linux `/dev/xen/gntdev` and `/dev/xen/evtchn`
//! ioctl ABI (`xen/sys/gntdev.h`, `xen/sys/evtchn.h`), and the xenbus states.

use std::mem::{offset_of, size_of};

/// `struct grant_entry_v1`: one entry of a domain's grant table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantEntryV1 {
    /// `GTF_*` type and flags.
    pub flags: u16,
    /// The domain allowed to access the frame.
    pub domid: u16,
    /// The frame (GFN) granted.
    pub frame: u32,
}

/// `GTF_invalid`.
pub const GTF_INVALID: u16 = 0;
/// `GTF_permit_access`: the entry grants access to `frame`.
pub const GTF_PERMIT_ACCESS: u16 = 1;
/// `GTF_accept_transfer`.
pub const GTF_ACCEPT_TRANSFER: u16 = 2;
/// `GTF_transitive`.
pub const GTF_TRANSITIVE: u16 = 3;
/// `GTF_type_mask`.
pub const GTF_TYPE_MASK: u16 = 3;
/// `GTF_readonly`: the grantee may only read.
pub const GTF_READONLY: u16 = 1 << 2;
/// `GTF_reading`: set by Xen while the grantee reads.
pub const GTF_READING: u16 = 1 << 3;
/// `GTF_writing`: set by Xen while the grantee writes.
pub const GTF_WRITING: u16 = 1 << 4;

/// `GNTST_okay`.
pub const GNTST_OKAY: i16 = 0;
/// `GNTST_general_error`.
pub const GNTST_GENERAL_ERROR: i16 = -1;
/// `GNTST_bad_domain`.
pub const GNTST_BAD_DOMAIN: i16 = -2;
/// `GNTST_bad_gntref`.
pub const GNTST_BAD_GNTREF: i16 = -3;
/// `GNTST_permission_denied`.
pub const GNTST_PERMISSION_DENIED: i16 = -8;
/// `GNTST_bad_page`.
pub const GNTST_BAD_PAGE: i16 = -9;
/// `GNTST_bad_copy_arg`: the copy crosses a page boundary.
pub const GNTST_BAD_COPY_ARG: i16 = -10;

/// `_IOC_SIZESHIFT`: where `_IOC` puts the argument's size (16 on every
/// Linux architecture).
const IOC_SIZESHIFT: u32 = 16;

/// `_IOC(_IOC_NONE, ty, nr, size)`: the Xen device ioctls declare no
/// direction yet give their argument's size, which nix's
/// `request_code_none!` (`_IO`, size 0) has no room for; the size is added
/// to it.
macro_rules! xen_ioc {
    ($ty:expr, $nr:expr, $size:expr) => {
        (nix::request_code_none!($ty, $nr) as u32) | (($size as u32) << IOC_SIZESHIFT)
    };
}

/// `struct ioctl_gntdev_grant_ref`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GntdevGrantRef {
    /// The granting domain.
    pub domid: u32,
    /// The grant reference.
    pub gref: u32,
}

/// The fixed head of `struct ioctl_gntdev_map_grant_ref`; `count` refs follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GntdevMapGrantRef {
    /// How many grants.
    pub count: u32,
    /// Padding.
    pub pad: u32,
    /// OUT: the mmap offset of the mapping.
    pub index: u64,
    /// The first ref (the C struct declares `refs[1]`).
    pub refs: [GntdevGrantRef; 1],
}

/// `struct ioctl_gntdev_unmap_grant_ref`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GntdevUnmapGrantRef {
    /// The mmap offset returned by the map.
    pub index: u64,
    /// Pages to unmap.
    pub count: u32,
    /// Padding.
    pub pad: u32,
}

/// `struct ioctl_gntdev_unmap_notify`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GntdevUnmapNotify {
    /// Offset of a byte in the mapping.
    pub index: u64,
    /// `UNMAP_NOTIFY_*`.
    pub action: u32,
    /// Event channel to notify.
    pub event_channel_port: u32,
}

/// `UNMAP_NOTIFY_CLEAR_BYTE`.
pub const UNMAP_NOTIFY_CLEAR_BYTE: u32 = 1;
/// `UNMAP_NOTIFY_SEND_EVENT`.
pub const UNMAP_NOTIFY_SEND_EVENT: u32 = 2;

/// One side of a grant copy: a local address or a foreign (ref, offset, domid).
#[repr(C)]
#[derive(Clone, Copy)]
pub union GntdevCopyPtr {
    /// Local virtual address.
    pub virt: u64,
    /// Foreign page.
    pub foreign: GntdevCopyForeign,
}

impl std::fmt::Debug for GntdevCopyPtr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GntdevCopyPtr")
    }
}

/// The `foreign` arm of [`GntdevCopyPtr`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GntdevCopyForeign {
    /// Grant reference.
    pub gref: u32,
    /// Offset in the granted page.
    pub offset: u16,
    /// Granting domain.
    pub domid: u16,
}

/// `struct ioctl_gntdev_grant_copy_segment`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GntdevGrantCopySegment {
    /// Source.
    pub source: GntdevCopyPtr,
    /// Destination.
    pub dest: GntdevCopyPtr,
    /// Bytes to copy; the foreign side must not cross its page.
    pub len: u16,
    /// `GNTCOPY_*`.
    pub flags: u16,
    /// OUT: `GNTST_*` for this segment.
    pub status: i16,
}

/// `GNTCOPY_source_gref`: the source is foreign.
pub const GNTCOPY_SOURCE_GREF: u16 = 1;
/// `GNTCOPY_dest_gref`: the destination is foreign.
pub const GNTCOPY_DEST_GREF: u16 = 2;

/// `struct ioctl_gntdev_grant_copy`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GntdevGrantCopy {
    /// Segments in the batch.
    pub count: u32,
    /// Pointer to the segments.
    pub segments: u64,
}

/// `IOCTL_GNTDEV_MAP_GRANT_REF`.
pub const IOCTL_GNTDEV_MAP_GRANT_REF: u32 = xen_ioc!(b'G', 0, size_of::<GntdevMapGrantRef>());
/// `IOCTL_GNTDEV_UNMAP_GRANT_REF`.
pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: u32 = xen_ioc!(b'G', 1, size_of::<GntdevUnmapGrantRef>());
/// `IOCTL_GNTDEV_SET_UNMAP_NOTIFY`.
pub const IOCTL_GNTDEV_SET_UNMAP_NOTIFY: u32 = xen_ioc!(b'G', 7, size_of::<GntdevUnmapNotify>());
/// `IOCTL_GNTDEV_GRANT_COPY`.
pub const IOCTL_GNTDEV_GRANT_COPY: u32 = xen_ioc!(b'G', 8, size_of::<GntdevGrantCopy>());

/// `struct ioctl_evtchn_bind_interdomain`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EvtchnBindInterdomain {
    /// The other domain.
    pub remote_domain: u32,
    /// Its unbound port.
    pub remote_port: u32,
}

/// `struct ioctl_evtchn_unbind` and `struct ioctl_evtchn_notify`: one port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EvtchnPortArg {
    /// The local port.
    pub port: u32,
}

/// `IOCTL_EVTCHN_BIND_INTERDOMAIN` (returns the local port).
pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: u32 =
    xen_ioc!(b'E', 1, size_of::<EvtchnBindInterdomain>());
/// `IOCTL_EVTCHN_UNBIND`.
pub const IOCTL_EVTCHN_UNBIND: u32 = xen_ioc!(b'E', 3, size_of::<EvtchnPortArg>());
/// `IOCTL_EVTCHN_NOTIFY`.
pub const IOCTL_EVTCHN_NOTIFY: u32 = xen_ioc!(b'E', 4, size_of::<EvtchnPortArg>());
/// `IOCTL_EVTCHN_RESET`.
pub const IOCTL_EVTCHN_RESET: u32 = xen_ioc!(b'E', 5, 0);

/// `enum xenbus_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum XenbusState {
    /// 0.
    Unknown = 0,
    /// 1.
    Initialising = 1,
    /// 2: waiting for the peer or the hotplug script.
    InitWait = 2,
    /// 3: waiting for a connection from the peer.
    Initialised = 3,
    /// 4.
    Connected = 4,
    /// 5: closing because of an error or an unplug.
    Closing = 5,
    /// 6.
    Closed = 6,
    /// 7.
    Reconfiguring = 7,
    /// 8.
    Reconfigured = 8,
}

impl XenbusState {
    /// Parses a state node's value strictly (decimal 0..=8, the whole value).
    pub fn parse(s: &str) -> Option<XenbusState> {
        use XenbusState::*;
        Some(match s.trim_end_matches('\n') {
            "0" => Unknown,
            "1" => Initialising,
            "2" => InitWait,
            "3" => Initialised,
            "4" => Connected,
            "5" => Closing,
            "6" => Closed,
            "7" => Reconfiguring,
            "8" => Reconfigured,
            _ => return None,
        })
    }

    /// The value to write into a state node.
    pub fn as_str(self) -> &'static str {
        ["0", "1", "2", "3", "4", "5", "6", "7", "8"][self as usize]
    }
}

// The layouts and the ioctl numbers as gcc computes them from the headers
// (`tests/abi_layout.rs` checks them against libxen-dev at test time).
const _: () = {
    assert!(size_of::<GrantEntryV1>() == 8);
    assert!(offset_of!(GrantEntryV1, domid) == 2);
    assert!(offset_of!(GrantEntryV1, frame) == 4);
    assert!(size_of::<GntdevMapGrantRef>() == 24);
    assert!(offset_of!(GntdevMapGrantRef, refs) == 16);
    assert!(size_of::<GntdevGrantCopySegment>() == 24);
    assert!(offset_of!(GntdevGrantCopySegment, status) == 20);
    assert!(size_of::<GntdevGrantCopy>() == 16);
    assert!(IOCTL_GNTDEV_MAP_GRANT_REF == 0x0018_4700);
    assert!(IOCTL_GNTDEV_UNMAP_GRANT_REF == 0x0010_4701);
    assert!(IOCTL_GNTDEV_SET_UNMAP_NOTIFY == 0x0010_4707);
    assert!(IOCTL_GNTDEV_GRANT_COPY == 0x0010_4708);
    assert!(IOCTL_EVTCHN_BIND_INTERDOMAIN == 0x0008_4501);
    assert!(IOCTL_EVTCHN_UNBIND == 0x0004_4503);
    assert!(IOCTL_EVTCHN_NOTIFY == 0x0004_4504);
    assert!(IOCTL_EVTCHN_RESET == 0x0000_4505);
};
