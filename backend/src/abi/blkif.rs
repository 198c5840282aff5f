//! `xen/io/blkif.h` and the shared-ring part of `xen/io/ring.h`.

use std::mem::{offset_of, size_of};

/// A grant reference (`grant_ref_t`): an index into the granting guest's
/// grant table, meaningful only with that guest's domid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(transparent)]
pub struct GrantRef(pub u32);

impl std::fmt::Display for GrantRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Xen's page size for rings and grants: always 4 KiB, whatever the guest uses.
pub const XEN_PAGE_SIZE: usize = 4096;
/// Every sector number and count on the wire is in these units.
pub const SECTOR_SIZE: u64 = 512;
/// Sectors in one granted page: `first_sect`/`last_sect` lie in `0..8`.
pub const SECTORS_PER_PAGE: u8 = (XEN_PAGE_SIZE as u64 / SECTOR_SIZE) as u8;

/// `BLKIF_OP_READ`.
pub const BLKIF_OP_READ: u8 = 0;
/// `BLKIF_OP_WRITE`.
pub const BLKIF_OP_WRITE: u8 = 1;
/// `BLKIF_OP_WRITE_BARRIER`.
pub const BLKIF_OP_WRITE_BARRIER: u8 = 2;
/// `BLKIF_OP_FLUSH_DISKCACHE`.
pub const BLKIF_OP_FLUSH_DISKCACHE: u8 = 3;
/// `BLKIF_OP_RESERVED_1` (a SLES extension nobody else implements).
pub const BLKIF_OP_RESERVED_1: u8 = 4;
/// `BLKIF_OP_DISCARD`.
pub const BLKIF_OP_DISCARD: u8 = 5;
/// `BLKIF_OP_INDIRECT`.
pub const BLKIF_OP_INDIRECT: u8 = 6;

/// `BLKIF_RSP_OKAY`.
pub const BLKIF_RSP_OKAY: i16 = 0;
/// `BLKIF_RSP_ERROR`.
pub const BLKIF_RSP_ERROR: i16 = -1;
/// `BLKIF_RSP_EOPNOTSUPP`.
pub const BLKIF_RSP_EOPNOTSUPP: i16 = -2;

/// `XENBUS_MAX_RING_GRANT_ORDER`: the largest ring Linux maps, 2^4 pages.
pub const XENBUS_MAX_RING_GRANT_ORDER: u32 = 4;
/// `BLKIF_MAX_SEGMENTS_PER_REQUEST`.
pub const BLKIF_MAX_SEGMENTS_PER_REQUEST: usize = 11;
/// `BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST`.
pub const BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST: usize = 8;
/// Segments per indirect page (4096 / 8).
pub const SEGS_PER_INDIRECT_FRAME: usize = XEN_PAGE_SIZE / size_of::<BlkifRequestSegment>();
/// The protocol's ceiling on segments in one indirect request.
pub const MAX_INDIRECT_SEGMENTS: usize =
    SEGS_PER_INDIRECT_FRAME * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST;

/// `BLKIF_DISCARD_SECURE`: the discard flag asking for a secure erase.
pub const BLKIF_DISCARD_SECURE: u8 = 1;

/// `VDISK_CDROM`.
pub const VDISK_CDROM: u32 = 0x1;
/// `VDISK_REMOVABLE`.
pub const VDISK_REMOVABLE: u32 = 0x2;
/// `VDISK_READONLY`.
pub const VDISK_READONLY: u32 = 0x4;

/// The `protocol` key's values (`xen/io/protocols.h`).
pub const XEN_IO_PROTO_ABI_X86_32: &str = "x86_32-abi";
/// See [`XEN_IO_PROTO_ABI_X86_32`].
pub const XEN_IO_PROTO_ABI_X86_64: &str = "x86_64-abi";
/// See [`XEN_IO_PROTO_ABI_X86_32`]; same layout as x86_64.
pub const XEN_IO_PROTO_ABI_ARM: &str = "arm-abi";

/// `struct blkif_request_segment`: one granted page and the sectors used in it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkifRequestSegment {
    /// The granted page.
    pub gref: GrantRef,
    /// First sector used in the page (0..=7).
    pub first_sect: u8,
    /// Last sector used in the page (first_sect..=7).
    pub last_sect: u8,
    /// Padding.
    pub _pad: [u8; 2],
}

/// Defines a blkif struct twice, with one field list: `$x64` in the 64-bit
/// layout (x86_64 and ARM frontends) and `$x32` in the i386 layout, where
/// `uint64_t` is aligned to 4 (`packed(4)`).
/// Fields after `i386_only` exist in the i386 layout alone (blkif.h's
/// `#ifdef __i386__` padding).
macro_rules! two_layouts {
    ($c:literal, $x64:ident, $x32:ident { $($(#[$fd:meta])* $f:ident: $t:ty,)* }
     $(i386_only { $($(#[$xd:meta])* $xf:ident: $xt:ty,)* })?) => {
        #[doc = concat!("`struct ", $c, "`, 64-bit layout.")]
        #[repr(C)]
        #[derive(Clone, Copy, Debug)]
        pub struct $x64 { $($(#[$fd])* pub $f: $t,)* }

        #[doc = concat!("`struct ", $c, "`, i386 layout.")]
        #[repr(C, packed(4))]
        #[derive(Clone, Copy, Debug)]
        pub struct $x32 {
            $($(#[$fd])* pub $f: $t,)*
            $($($(#[$xd])* pub $xf: $xt,)*)?
        }
    };
}

two_layouts!(
    "blkif_request",
    RequestX86_64,
    RequestX86_32 {
        /// `operation`.
        operation: u8,
        /// `nr_segments`.
        nr_segments: u8,
        /// `handle`.
        handle: u16,
        /// `id`, echoed in the response.
        id: u64,
        /// `sector_number`, in 512-byte units.
        sector_number: u64,
        /// `seg`.
        seg: [BlkifRequestSegment; BLKIF_MAX_SEGMENTS_PER_REQUEST],
    }
);

two_layouts!(
    "blkif_request_discard",
    DiscardX86_64,
    DiscardX86_32 {
        /// `operation` (`BLKIF_OP_DISCARD`).
        operation: u8,
        /// `flag` ([`BLKIF_DISCARD_SECURE`] or 0).
        flag: u8,
        /// `handle`.
        handle: u16,
        /// `id`.
        id: u64,
        /// `sector_number`.
        sector_number: u64,
        /// `nr_sectors`.
        nr_sectors: u64,
    }
);

two_layouts!("blkif_request_indirect", IndirectX86_64, IndirectX86_32 {
    /// `operation` (`BLKIF_OP_INDIRECT`).
    operation: u8,
    /// `indirect_op`: the real operation, READ or WRITE.
    indirect_op: u8,
    /// `nr_segments`.
    nr_segments: u16,
    /// `id`.
    id: u64,
    /// `sector_number`.
    sector_number: u64,
    /// `handle`.
    handle: u16,
    /// Padding.
    _pad1: u16,
    /// `indirect_grefs`: pages holding the segment array.
    indirect_grefs: [GrantRef; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST],
} i386_only {
    /// `pad`: makes it 64 bytes on i386.
    _pad2: u64,
});

two_layouts!(
    "blkif_response",
    ResponseX86_64,
    ResponseX86_32 {
        /// `id`, copied from the request.
        id: u64,
        /// `operation`, copied from the request.
        operation: u8,
        /// Padding.
        _pad: u8,
        /// `status`: a `BLKIF_RSP_*`.
        status: i16,
    }
);

/// The header of a shared ring (`DEFINE_RING_TYPES`' `struct blkif_sring`
/// before `ring[]`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SringHeader {
    /// `req_prod`: written by the frontend.
    pub req_prod: u32,
    /// `req_event`: written by the backend ("notify me past this").
    pub req_event: u32,
    /// `rsp_prod`: written by the backend.
    pub rsp_prod: u32,
    /// `rsp_event`: written by the frontend.
    pub rsp_event: u32,
    /// `pvt`: private use (tapif).
    pub pvt: [u8; 4],
    /// `__pad`.
    pub _pad: [u8; 44],
}

/// Where the ring entries start in the shared page.
pub const SRING_ENTRIES_OFFSET: usize = size_of::<SringHeader>();
/// Byte offsets of the header's indices.
pub const SRING_REQ_PROD: usize = offset_of!(SringHeader, req_prod);
/// See [`SRING_REQ_PROD`].
pub const SRING_REQ_EVENT: usize = offset_of!(SringHeader, req_event);
/// See [`SRING_REQ_PROD`].
pub const SRING_RSP_PROD: usize = offset_of!(SringHeader, rsp_prod);
/// See [`SRING_REQ_PROD`].
pub const SRING_RSP_EVENT: usize = offset_of!(SringHeader, rsp_event);

/// `__RING_SIZE`: entries in a ring of `bytes` bytes whose slots are `stride`
/// bytes (the largest power of two that fits).
pub const fn ring_entries(bytes: usize, stride: usize) -> u32 {
    let n = (bytes - SRING_ENTRIES_OFFSET) / stride;
    if n == 0 {
        0
    } else {
        1 << (usize::BITS - 1 - n.leading_zeros())
    }
}

// The layouts of blkif.h, pinned at compile time (64-bit and i386 columns of
// the header; the C test checks the same numbers against the real header).
const _: () = {
    assert!(size_of::<BlkifRequestSegment>() == 8);
    assert!(size_of::<RequestX86_64>() == 112);
    assert!(offset_of!(RequestX86_64, id) == 8);
    assert!(offset_of!(RequestX86_64, sector_number) == 16);
    assert!(offset_of!(RequestX86_64, seg) == 24);
    assert!(size_of::<RequestX86_32>() == 108);
    assert!(offset_of!(RequestX86_32, id) == 4);
    assert!(offset_of!(RequestX86_32, sector_number) == 12);
    assert!(offset_of!(RequestX86_32, seg) == 20);
    assert!(size_of::<DiscardX86_64>() == 32);
    assert!(offset_of!(DiscardX86_64, nr_sectors) == 24);
    assert!(size_of::<DiscardX86_32>() == 28);
    assert!(offset_of!(DiscardX86_32, nr_sectors) == 20);
    assert!(size_of::<IndirectX86_64>() == 64);
    assert!(offset_of!(IndirectX86_64, indirect_grefs) == 28);
    assert!(size_of::<IndirectX86_32>() == 64);
    assert!(offset_of!(IndirectX86_32, indirect_grefs) == 24);
    assert!(size_of::<ResponseX86_64>() == 16);
    assert!(offset_of!(ResponseX86_64, status) == 10);
    assert!(size_of::<ResponseX86_32>() == 12);
    assert!(offset_of!(ResponseX86_32, status) == 10);
    assert!(SRING_ENTRIES_OFFSET == 64);
    assert!(ring_entries(XEN_PAGE_SIZE, 112) == 32);
    assert!(ring_entries(XEN_PAGE_SIZE, 108) == 32);
    assert!(ring_entries(16 * XEN_PAGE_SIZE, 112) == 512);
    assert!(SEGS_PER_INDIRECT_FRAME == 512);
};

/// The request layout a frontend uses, chosen by its `protocol` key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Abi {
    /// 64-bit x86 and ARM frontends.
    X86_64,
    /// 32-bit x86 frontends (u64 fields aligned to 4).
    X86_32,
}

/// Byte offsets of the fields the ring engine reads, for one ABI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Size of a ring slot (`union blkif_sring_entry`).
    pub slot: usize,
    /// `id` in a read/write request (and in any request, `blkif_request_other`).
    pub id: usize,
    /// `sector_number` in a read/write request.
    pub sector: usize,
    /// `seg[]` in a read/write request.
    pub seg: usize,
    /// `nr_sectors` in a discard request.
    pub discard_nr_sectors: usize,
    /// `id` in an indirect request.
    pub ind_id: usize,
    /// `sector_number` in an indirect request.
    pub ind_sector: usize,
    /// `indirect_grefs[]` in an indirect request.
    pub ind_grefs: usize,
    /// Size of a response.
    pub rsp: usize,
    /// `operation` in a response.
    pub rsp_op: usize,
    /// `status` in a response.
    pub rsp_status: usize,
}

impl Abi {
    /// The ABI named by a frontend's `protocol` key. No key means what Linux
    /// blkback assumes on x86: the 32-bit layout of old PV guests.
    pub fn from_protocol(protocol: Option<&str>) -> Option<Abi> {
        match protocol {
            None => Some(Abi::X86_32),
            Some(XEN_IO_PROTO_ABI_X86_64) | Some(XEN_IO_PROTO_ABI_ARM) => Some(Abi::X86_64),
            Some(XEN_IO_PROTO_ABI_X86_32) => Some(Abi::X86_32),
            Some(_) => None,
        }
    }

    /// The `protocol` key value.
    pub fn protocol(self) -> &'static str {
        match self {
            Abi::X86_64 => XEN_IO_PROTO_ABI_X86_64,
            Abi::X86_32 => XEN_IO_PROTO_ABI_X86_32,
        }
    }

    /// Field offsets for this ABI.
    pub const fn layout(self) -> Layout {
        match self {
            Abi::X86_64 => Layout {
                slot: size_of::<RequestX86_64>(),
                id: offset_of!(RequestX86_64, id),
                sector: offset_of!(RequestX86_64, sector_number),
                seg: offset_of!(RequestX86_64, seg),
                discard_nr_sectors: offset_of!(DiscardX86_64, nr_sectors),
                ind_id: offset_of!(IndirectX86_64, id),
                ind_sector: offset_of!(IndirectX86_64, sector_number),
                ind_grefs: offset_of!(IndirectX86_64, indirect_grefs),
                rsp: size_of::<ResponseX86_64>(),
                rsp_op: offset_of!(ResponseX86_64, operation),
                rsp_status: offset_of!(ResponseX86_64, status),
            },
            Abi::X86_32 => Layout {
                slot: size_of::<RequestX86_32>(),
                id: offset_of!(RequestX86_32, id),
                sector: offset_of!(RequestX86_32, sector_number),
                seg: offset_of!(RequestX86_32, seg),
                discard_nr_sectors: offset_of!(DiscardX86_32, nr_sectors),
                ind_id: offset_of!(IndirectX86_32, id),
                ind_sector: offset_of!(IndirectX86_32, sector_number),
                ind_grefs: offset_of!(IndirectX86_32, indirect_grefs),
                rsp: size_of::<ResponseX86_32>(),
                rsp_op: offset_of!(ResponseX86_32, operation),
                rsp_status: offset_of!(ResponseX86_32, status),
            },
        }
    }

    /// Entries in a ring of `pages` pages.
    pub const fn ring_entries(self, pages: usize) -> u32 {
        ring_entries(pages * XEN_PAGE_SIZE, self.layout().slot)
    }
}

/// The offsets every ABI shares: `operation` at 0, `nr_segments`/`flag`/
/// `indirect_op` at 1, `nr_segments` (u16) of an indirect request at 2.
pub const REQ_OPERATION: usize = 0;
/// See [`REQ_OPERATION`].
pub const REQ_NR_SEGMENTS: usize = 1;
/// See [`REQ_OPERATION`].
pub const REQ_IND_NR_SEGMENTS: usize = 2;
