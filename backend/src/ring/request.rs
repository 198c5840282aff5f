//! Validation of copied-out requests: the guest's bytes become an owned,
//! checked [`Request`] or a [`Refusal`] saying what to answer.
//!
//! Two kinds of refusal: a *violation* of the protocol's structure (segment
//! counts, sector ranges inside a page, indirect layout), which no correct
//! frontend ever sends, halts the ring after answering; a request that is
//! well-formed but cannot be served (past the end, a write to a read-only disk,
//! an operation not offered) gets an error status and the ring carries on, as
//! with Linux blkback. Every guest number goes through checked arithmetic.
#![forbid(unsafe_code)]

use std::fmt;

use super::RawRequest;
use crate::abi::blkif::*;

/// What the device offers and how big it is: the facts requests are checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Disk size in 512-byte sectors.
    pub disk_sectors: u64,
    /// Logical block size in 512-byte sectors (1 for 512, 8 for 4096).
    pub logical_block_sectors: u64,
    /// Whether the disk is read-only.
    pub read_only: bool,
    /// Negotiated `feature-max-indirect-segments` (0: indirect not offered).
    pub max_indirect_segments: u16,
    /// `feature-flush-cache` offered.
    pub flush: bool,
    /// `feature-barrier` offered.
    pub barrier: bool,
    /// `feature-discard` offered.
    pub discard: bool,
    /// `discard-secure` offered.
    pub discard_secure: bool,
}

impl Limits {
    /// A writable 512-byte-sector disk of `sectors` sectors offering everything.
    pub fn new(disk_sectors: u64) -> Limits {
        Limits {
            disk_sectors,
            logical_block_sectors: 1,
            read_only: false,
            max_indirect_segments: 256,
            flush: true,
            barrier: true,
            discard: true,
            discard_secure: false,
        }
    }
}

/// A validated operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Read into the segments.
    Read,
    /// Write from the segments.
    Write,
    /// Make every completed write durable, then write the segments (if any).
    Flush,
    /// Like flush, and order: earlier writes complete before, later after.
    Barrier,
    /// Discard a range.
    Discard {
        /// Secure erase asked for (and offered).
        secure: bool,
    },
}

impl Operation {
    /// Whether the operation changes the disk's contents.
    pub fn writes(self, segments: usize) -> bool {
        match self {
            Operation::Read => false,
            Operation::Write | Operation::Discard { .. } => true,
            Operation::Flush | Operation::Barrier => segments > 0,
        }
    }
}

/// One granted page of a request and the sectors used in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// The grant.
    pub gref: GrantRef,
    /// First sector in the page.
    pub first_sect: u8,
    /// Last sector in the page (inclusive).
    pub last_sect: u8,
}

impl Segment {
    /// Sectors covered.
    pub fn sectors(&self) -> u64 {
        u64::from(self.last_sect - self.first_sect) + 1
    }
    /// Byte offset in the page.
    pub fn offset(&self) -> usize {
        usize::from(self.first_sect) * SECTOR_SIZE as usize
    }
    /// Bytes covered.
    pub fn len(&self) -> usize {
        self.sectors() as usize * SECTOR_SIZE as usize
    }
    /// Whether it covers nothing (never true for a validated segment).
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// A request that passed every check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The guest's id, echoed in the response.
    pub id: u64,
    /// The operation byte to echo in the response.
    pub wire_op: u8,
    /// What to do.
    pub op: Operation,
    /// First sector (512-byte units).
    pub sector: u64,
    /// Sectors covered (the segments' sum, or a discard's count).
    pub nr_sectors: u64,
    /// The data pages, in order.
    pub segments: Vec<Segment>,
}

/// An indirect request whose segment list lives in granted pages: copy those
/// pages out (read-only grants), then call [`IndirectHeader::finish`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndirectHeader {
    /// The guest's id.
    pub id: u64,
    /// The real operation byte (`indirect_op`), echoed in the response.
    pub wire_op: u8,
    /// Read or write.
    pub op: Operation,
    /// First sector.
    pub sector: u64,
    /// Segments in the pages.
    pub nr_segments: u16,
    /// The pages holding the segments: exactly ceil(nr_segments / 512).
    pub grefs: Vec<GrantRef>,
}

/// The result of parsing one slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Ready to serve.
    Ready(Request),
    /// Needs its indirect pages first.
    Indirect(IndirectHeader),
}

/// Why a request is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// An operation code the protocol does not define.
    UnknownOp(u8),
    /// An operation the backend did not offer.
    NotOffered(&'static str),
    /// `nr_segments` outside what the operation allows.
    SegmentCount {
        /// What the guest sent.
        nr: u32,
        /// The least allowed.
        min: u32,
        /// The most allowed.
        max: u32,
    },
    /// A segment with `first_sect > last_sect` or `last_sect >= 8`.
    SegmentSectors {
        /// Which segment.
        index: usize,
        /// `first_sect`.
        first: u8,
        /// `last_sect`.
        last: u8,
    },
    /// An indirect request whose `indirect_op` is not READ or WRITE.
    IndirectOp(u8),
    /// The range does not fit the disk (or overflows).
    BeyondEnd {
        /// First sector.
        sector: u64,
        /// Sectors.
        nr: u64,
        /// Disk size.
        disk: u64,
    },
    /// The range is not aligned to the logical block size.
    Misaligned {
        /// First sector.
        sector: u64,
        /// Sectors.
        nr: u64,
        /// Logical block size in sectors.
        block: u64,
    },
    /// A write, discard or flush-with-data to a read-only disk.
    ReadOnly,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::UnknownOp(op) => write!(f, "unknown operation {op}"),
            Reason::NotOffered(what) => write!(f, "{what} was not offered"),
            Reason::SegmentCount { nr, min, max } => {
                write!(f, "{nr} segments, allowed {min}..={max}")
            }
            Reason::SegmentSectors { index, first, last } => write!(
                f,
                "segment {index} covers sectors {first}..={last} of an 8-sector page"
            ),
            Reason::IndirectOp(op) => write!(f, "indirect request for operation {op}"),
            Reason::BeyondEnd { sector, nr, disk } => write!(
                f,
                "sectors {sector}+{nr} beyond the end of a {disk}-sector disk"
            ),
            Reason::Misaligned { sector, nr, block } => write!(
                f,
                "sectors {sector}+{nr} not aligned to {block}-sector blocks"
            ),
            Reason::ReadOnly => write!(f, "write to a read-only disk"),
        }
    }
}

/// A refused request: answer `status` for `id`, and halt the ring if `halt`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The guest's id.
    pub id: u64,
    /// The operation byte to echo.
    pub wire_op: u8,
    /// `BLKIF_RSP_ERROR` or `BLKIF_RSP_EOPNOTSUPP`.
    pub status: i16,
    /// Why.
    pub reason: Reason,
    /// A protocol violation: stop serving the ring.
    pub halt: bool,
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Reads segment `i` of a packed array starting at `at`.
fn segment(b: &[u8], at: usize) -> Segment {
    Segment {
        gref: GrantRef(le_u32(b, at)),
        first_sect: b[at + 4],
        last_sect: b[at + 5],
    }
}

struct Ctx {
    id: u64,
    wire_op: u8,
}

impl Ctx {
    fn refuse(&self, status: i16, reason: Reason, halt: bool) -> Refusal {
        Refusal {
            id: self.id,
            wire_op: self.wire_op,
            status,
            reason,
            halt,
        }
    }
}

fn check_segments(ctx: &Ctx, segs: &[Segment]) -> Result<u64, Refusal> {
    let mut total = 0u64;
    for (index, s) in segs.iter().enumerate() {
        if s.first_sect > s.last_sect || s.last_sect >= SECTORS_PER_PAGE {
            return Err(ctx.refuse(
                BLKIF_RSP_ERROR,
                Reason::SegmentSectors {
                    index,
                    first: s.first_sect,
                    last: s.last_sect,
                },
                true,
            ));
        }
        total += s.sectors();
    }
    Ok(total)
}

fn check_range(ctx: &Ctx, l: &Limits, sector: u64, nr: u64, aligned: bool) -> Result<(), Refusal> {
    let beyond = || Reason::BeyondEnd {
        sector,
        nr,
        disk: l.disk_sectors,
    };
    match sector.checked_add(nr) {
        Some(end) if end <= l.disk_sectors => {}
        _ => return Err(ctx.refuse(BLKIF_RSP_ERROR, beyond(), false)),
    }
    let mask = l.logical_block_sectors.saturating_sub(1);
    if aligned && (sector | nr) & mask != 0 {
        return Err(ctx.refuse(
            BLKIF_RSP_ERROR,
            Reason::Misaligned {
                sector,
                nr,
                block: l.logical_block_sectors,
            },
            false,
        ));
    }
    Ok(())
}

/// Validates one copied-out slot laid out in `abi`.
pub fn parse(raw: &RawRequest, abi: Abi, l: &Limits) -> Result<Parsed, Refusal> {
    let b = &raw.bytes;
    let lay = abi.layout();
    let op = b[REQ_OPERATION];
    let ctx = Ctx {
        id: le_u64(b, lay.id),
        wire_op: op,
    };
    match op {
        BLKIF_OP_READ | BLKIF_OP_WRITE | BLKIF_OP_FLUSH_DISKCACHE | BLKIF_OP_WRITE_BARRIER => {
            let operation = match op {
                BLKIF_OP_READ => Operation::Read,
                BLKIF_OP_WRITE => Operation::Write,
                BLKIF_OP_FLUSH_DISKCACHE if l.flush => Operation::Flush,
                BLKIF_OP_WRITE_BARRIER if l.barrier => Operation::Barrier,
                BLKIF_OP_FLUSH_DISKCACHE => {
                    return Err(ctx.refuse(
                        BLKIF_RSP_EOPNOTSUPP,
                        Reason::NotOffered("flush"),
                        false,
                    ))
                }
                _ => {
                    return Err(ctx.refuse(
                        BLKIF_RSP_EOPNOTSUPP,
                        Reason::NotOffered("barrier"),
                        false,
                    ))
                }
            };
            let nr = u32::from(b[REQ_NR_SEGMENTS]);
            let min = u32::from(matches!(operation, Operation::Read | Operation::Write));
            let max = BLKIF_MAX_SEGMENTS_PER_REQUEST as u32;
            if nr < min || nr > max {
                return Err(ctx.refuse(
                    BLKIF_RSP_ERROR,
                    Reason::SegmentCount { nr, min, max },
                    true,
                ));
            }
            let segments: Vec<Segment> = (0..nr as usize)
                .map(|i| segment(b, lay.seg + i * 8))
                .collect();
            let nr_sectors = check_segments(&ctx, &segments)?;
            if l.read_only && operation.writes(segments.len()) {
                return Err(ctx.refuse(BLKIF_RSP_ERROR, Reason::ReadOnly, false));
            }
            let sector = le_u64(b, lay.sector);
            if !segments.is_empty() {
                check_range(&ctx, l, sector, nr_sectors, true)?;
            }
            Ok(Parsed::Ready(Request {
                id: ctx.id,
                wire_op: op,
                op: operation,
                sector,
                nr_sectors,
                segments,
            }))
        }
        BLKIF_OP_DISCARD => {
            if !l.discard {
                return Err(ctx.refuse(BLKIF_RSP_EOPNOTSUPP, Reason::NotOffered("discard"), false));
            }
            let secure = b[REQ_NR_SEGMENTS] & BLKIF_DISCARD_SECURE != 0;
            if secure && !l.discard_secure {
                return Err(ctx.refuse(
                    BLKIF_RSP_EOPNOTSUPP,
                    Reason::NotOffered("secure discard"),
                    false,
                ));
            }
            if l.read_only {
                return Err(ctx.refuse(BLKIF_RSP_ERROR, Reason::ReadOnly, false));
            }
            let sector = le_u64(b, lay.sector);
            let nr_sectors = le_u64(b, lay.discard_nr_sectors);
            check_range(&ctx, l, sector, nr_sectors, false)?;
            Ok(Parsed::Ready(Request {
                id: ctx.id,
                wire_op: op,
                op: Operation::Discard { secure },
                sector,
                nr_sectors,
                segments: Vec::new(),
            }))
        }
        BLKIF_OP_INDIRECT if l.max_indirect_segments > 0 => {
            let real = b[REQ_NR_SEGMENTS];
            let ctx = Ctx {
                id: le_u64(b, lay.ind_id),
                wire_op: real,
            };
            let operation = match real {
                BLKIF_OP_READ => Operation::Read,
                BLKIF_OP_WRITE => Operation::Write,
                other => return Err(ctx.refuse(BLKIF_RSP_ERROR, Reason::IndirectOp(other), true)),
            };
            let nr = le_u16(b, REQ_IND_NR_SEGMENTS);
            let max = l.max_indirect_segments.min(MAX_INDIRECT_SEGMENTS as u16);
            if nr == 0 || nr > max {
                return Err(ctx.refuse(
                    BLKIF_RSP_ERROR,
                    Reason::SegmentCount {
                        nr: u32::from(nr),
                        min: 1,
                        max: u32::from(max),
                    },
                    true,
                ));
            }
            if l.read_only && operation == Operation::Write {
                return Err(ctx.refuse(BLKIF_RSP_ERROR, Reason::ReadOnly, false));
            }
            let pages = usize::from(nr).div_ceil(SEGS_PER_INDIRECT_FRAME);
            debug_assert!(pages <= BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
            let grefs = (0..pages)
                .map(|i| GrantRef(le_u32(b, lay.ind_grefs + i * 4)))
                .collect();
            Ok(Parsed::Indirect(IndirectHeader {
                id: ctx.id,
                wire_op: real,
                op: operation,
                sector: le_u64(b, lay.ind_sector),
                nr_segments: nr,
                grefs,
            }))
        }
        other => Err(ctx.refuse(BLKIF_RSP_EOPNOTSUPP, Reason::UnknownOp(other), false)),
    }
}

impl IndirectHeader {
    /// Completes the request from a private copy of its indirect pages
    /// (`grefs.len()` pages, in order).
    pub fn finish(&self, pages: &[u8], l: &Limits) -> Result<Request, Refusal> {
        let ctx = Ctx {
            id: self.id,
            wire_op: self.wire_op,
        };
        let n = usize::from(self.nr_segments);
        assert!(
            pages.len() >= n * 8,
            "caller copies ceil(n/512) pages for n segments"
        );
        let segments: Vec<Segment> = (0..n).map(|i| segment(pages, i * 8)).collect();
        let nr_sectors = check_segments(&ctx, &segments)?;
        check_range(&ctx, l, self.sector, nr_sectors, true)?;
        Ok(Request {
            id: self.id,
            wire_op: self.wire_op,
            op: self.op,
            sector: self.sector,
            nr_sectors,
            segments,
        })
    }

    /// The refusal to send if the indirect pages cannot be copied.
    pub fn unreadable(&self) -> Refusal {
        Refusal {
            id: self.id,
            wire_op: self.wire_op,
            status: BLKIF_RSP_ERROR,
            reason: Reason::NotOffered("access to the indirect pages"),
            halt: false,
        }
    }
}

/// Encodes requests (for the simulated frontend and tests): the exact bytes a
/// frontend of `abi` puts in a slot.
pub mod encode {
    use super::*;

    /// A read/write/flush/barrier request with direct segments.
    pub fn rw(abi: Abi, op: u8, id: u64, sector: u64, segs: &[Segment]) -> Vec<u8> {
        let lay = abi.layout();
        let mut b = vec![0u8; lay.slot];
        b[REQ_OPERATION] = op;
        b[REQ_NR_SEGMENTS] = segs.len().min(255) as u8;
        b[lay.id..lay.id + 8].copy_from_slice(&id.to_le_bytes());
        b[lay.sector..lay.sector + 8].copy_from_slice(&sector.to_le_bytes());
        for (i, s) in segs.iter().take(BLKIF_MAX_SEGMENTS_PER_REQUEST).enumerate() {
            put_segment(&mut b, lay.seg + i * 8, s);
        }
        b
    }

    /// Writes one segment into a slot or an indirect page.
    pub fn put_segment(b: &mut [u8], at: usize, s: &Segment) {
        b[at..at + 4].copy_from_slice(&s.gref.0.to_le_bytes());
        b[at + 4] = s.first_sect;
        b[at + 5] = s.last_sect;
    }

    /// A discard request.
    pub fn discard(abi: Abi, id: u64, sector: u64, nr: u64, secure: bool) -> Vec<u8> {
        let lay = abi.layout();
        let mut b = vec![0u8; lay.slot];
        b[REQ_OPERATION] = BLKIF_OP_DISCARD;
        b[REQ_NR_SEGMENTS] = if secure { BLKIF_DISCARD_SECURE } else { 0 };
        b[lay.id..lay.id + 8].copy_from_slice(&id.to_le_bytes());
        b[lay.sector..lay.sector + 8].copy_from_slice(&sector.to_le_bytes());
        b[lay.discard_nr_sectors..lay.discard_nr_sectors + 8].copy_from_slice(&nr.to_le_bytes());
        b
    }

    /// An indirect request header.
    pub fn indirect(
        abi: Abi,
        op: u8,
        id: u64,
        sector: u64,
        nr: u16,
        pages: &[GrantRef],
    ) -> Vec<u8> {
        let lay = abi.layout();
        let mut b = vec![0u8; lay.slot];
        b[REQ_OPERATION] = BLKIF_OP_INDIRECT;
        b[REQ_NR_SEGMENTS] = op;
        b[REQ_IND_NR_SEGMENTS..REQ_IND_NR_SEGMENTS + 2].copy_from_slice(&nr.to_le_bytes());
        b[lay.ind_id..lay.ind_id + 8].copy_from_slice(&id.to_le_bytes());
        b[lay.ind_sector..lay.ind_sector + 8].copy_from_slice(&sector.to_le_bytes());
        for (i, g) in pages
            .iter()
            .take(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)
            .enumerate()
        {
            let at = lay.ind_grefs + i * 4;
            b[at..at + 4].copy_from_slice(&g.0.to_le_bytes());
        }
        b
    }
}
