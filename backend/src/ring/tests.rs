//! Ring arithmetic and every validation rule, each test named after its rule.

use proptest::prelude::*;

use super::request::{encode, parse, Limits, Operation, Parsed, Reason, Segment};
use super::*;
use crate::abi::blkif::*;
use crate::xen::mem::SharedMem;

fn pair(
    pages: usize,
    abi: Abi,
    start: u32,
) -> (
    FrontRing<std::sync::Arc<SharedMem>>,
    BackRing<std::sync::Arc<SharedMem>>,
) {
    let mem = std::sync::Arc::new(SharedMem::anonymous(pages * XEN_PAGE_SIZE).unwrap());
    let front = FrontRing::init(mem.clone(), pages, abi, start).unwrap();
    let back = BackRing::new(mem, pages, abi).unwrap();
    assert_eq!((back.req_cons, back.rsp_prod_pvt), (start, start));
    (front, back)
}

impl<T: RingMem> RingMem for std::sync::Arc<T> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn load_u32(&self, off: usize) -> u32 {
        (**self).load_u32(off)
    }
    fn store_u32(&self, off: usize, v: u32) {
        (**self).store_u32(off, v)
    }
    fn full_fence(&self) {
        (**self).full_fence()
    }
    fn read(&self, off: usize, dst: &mut [u8]) {
        (**self).read(off, dst)
    }
    fn write(&self, off: usize, src: &[u8]) {
        (**self).write(off, src)
    }
}

fn seg(gref: u32, first: u8, last: u8) -> Segment {
    Segment {
        gref: GrantRef(gref),
        first_sect: first,
        last_sect: last,
    }
}

fn read_req(abi: Abi, id: u64) -> Vec<u8> {
    encode::rw(abi, BLKIF_OP_READ, id, 8, &[seg(1, 0, 7)])
}

#[test]
fn ring_sizes_follow_the_ring_size_macro() {
    for (pages, n) in [(1, 32), (2, 64), (4, 128), (8, 256), (16, 512)] {
        assert_eq!(Abi::X86_64.ring_entries(pages), n);
        assert_eq!(Abi::X86_32.ring_entries(pages), n);
    }
}

#[test]
fn requests_pass_from_front_to_back_unchanged_in_both_abis() {
    for abi in [Abi::X86_64, Abi::X86_32] {
        let (mut f, mut b) = pair(1, abi, 0);
        for id in 0..5u64 {
            assert!(f.put_request(&read_req(abi, id + 100)));
        }
        f.push_requests();
        let got = b.take(64).unwrap();
        assert_eq!(got.len(), 5);
        for (i, raw) in got.iter().enumerate() {
            let Parsed::Ready(r) = parse(raw, abi, &Limits::new(1024)).unwrap() else {
                panic!("not ready")
            };
            assert_eq!((r.id, r.sector, r.nr_sectors), (100 + i as u64, 8, 8));
        }
    }
}

#[test]
fn ring_request_prod_overflow_halts_the_ring() {
    let (f, mut b) = pair(1, Abi::X86_64, 0);
    f.mem().store_u32(SRING_REQ_PROD, 33); // 33 > 32 entries
    let e = b.take(64).unwrap_err();
    assert!(
        matches!(e, RingError::ProdOverflow { req_prod: 33, .. }),
        "{e}"
    );
    assert!(b.halted().is_some());
    // Halted for good, even if the index is put right.
    f.mem().store_u32(SRING_REQ_PROD, 1);
    assert!(b.take(64).is_err());
}

#[test]
fn consumption_stops_at_the_free_response_slots() {
    let (mut f, mut b) = pair(1, Abi::X86_64, 0);
    for i in 0..32 {
        f.put_request(&read_req(Abi::X86_64, i));
    }
    f.push_requests();
    assert_eq!(b.take(10).unwrap().len(), 10);
    assert_eq!(b.take(100).unwrap().len(), 22, "one ring's worth at most");
    assert_eq!(b.in_flight(), 32);
    // The frontend cannot produce more until responses free slots; a prod that
    // pretends it did is an overflow.
    f.mem().store_u32(SRING_REQ_PROD, 33);
    assert!(b.take(100).is_err());
}

#[test]
fn push_responses_and_check_notify_is_exact_across_the_wrap() {
    let start = u32::MAX - 3;
    let (mut f, mut b) = pair(1, Abi::X86_64, start);
    for i in 0..8 {
        f.put_request(&read_req(Abi::X86_64, i));
    }
    f.push_requests();
    assert_eq!(b.take(64).unwrap().len(), 8);
    // The frontend asked (rsp_event = start + 1) to hear of the first response.
    b.put_response(0, BLKIF_OP_READ, BLKIF_RSP_OKAY);
    assert!(b.push_responses(), "first response past rsp_event notifies");
    b.put_response(1, BLKIF_OP_READ, BLKIF_RSP_OKAY);
    assert!(
        !b.push_responses(),
        "the frontend has not re-armed rsp_event"
    );
    assert_eq!(f.take_responses().len(), 2);
    assert!(!f.final_check_responses());
    // Re-armed at rsp_cons + 1, which is past the 32-bit wrap.
    for i in 2..8 {
        b.put_response(i, BLKIF_OP_READ, BLKIF_RSP_OKAY);
    }
    assert!(b.push_responses());
    let ids: Vec<u64> = f.take_responses().iter().map(|r| r.0).collect();
    assert_eq!(ids, vec![2, 3, 4, 5, 6, 7]);
}

#[test]
fn final_check_for_requests_arms_req_event_and_sees_a_late_request() {
    let (mut f, mut b) = pair(1, Abi::X86_64, u32::MAX);
    assert!(!b.final_check().unwrap());
    assert_eq!(f.mem().load_u32(SRING_REQ_EVENT), u32::MAX.wrapping_add(1));
    f.put_request(&read_req(Abi::X86_64, 1));
    assert!(f.push_requests(), "the backend asked to be told");
    assert!(b.final_check().unwrap());
    assert_eq!(b.take(64).unwrap().len(), 1);
    f.put_request(&read_req(Abi::X86_64, 2));
    assert!(!f.push_requests(), "req_event not re-armed yet");
}

#[test]
fn responses_are_written_whole_with_zeroed_padding() {
    for abi in [Abi::X86_64, Abi::X86_32] {
        let (mut f, mut b) = pair(1, abi, 0);
        let junk = vec![0xAA; abi.layout().slot];
        f.put_request(&junk);
        f.push_requests();
        b.take(1).unwrap();
        b.put_response(0x0102, 7, BLKIF_RSP_ERROR);
        b.push_responses();
        let mut rsp = vec![0u8; abi.layout().rsp];
        f.mem().read(SRING_ENTRIES_OFFSET, &mut rsp);
        let mut want = vec![0u8; abi.layout().rsp];
        want[0] = 2;
        want[1] = 1;
        want[8] = 7;
        want[10..12].copy_from_slice(&(-1i16).to_le_bytes());
        assert_eq!(rsp, want, "{abi:?}");
    }
}

#[test]
fn attach_resumes_at_the_published_rsp_prod() {
    let (mut f, mut b) = pair(1, Abi::X86_64, 5);
    for i in 0..3 {
        f.put_request(&read_req(Abi::X86_64, i));
    }
    f.push_requests();
    b.take(1).unwrap();
    b.put_response(0, 0, 0);
    b.push_responses();
    drop(b);
    let mut b2 = BackRing::attach(f.mem().clone(), 1, Abi::X86_64).unwrap();
    assert_eq!(b2.take(64).unwrap().len(), 2, "the two unanswered ones");
}

fn reason(raw: Vec<u8>, abi: Abi, l: &Limits) -> (Reason, i16, bool) {
    let r = parse(&RawRequest { bytes: raw }, abi, l).unwrap_err();
    (r.reason, r.status, r.halt)
}

#[test]
fn unknown_operation_is_answered_eopnotsupp_without_halting() {
    let mut raw = read_req(Abi::X86_64, 9);
    raw[0] = 42;
    let (r, st, halt) = reason(raw.clone(), Abi::X86_64, &Limits::new(64));
    assert_eq!(
        (r, st, halt),
        (Reason::UnknownOp(42), BLKIF_RSP_EOPNOTSUPP, false)
    );
    raw[0] = BLKIF_OP_RESERVED_1;
    assert_eq!(
        reason(raw, Abi::X86_64, &Limits::new(64)).1,
        BLKIF_RSP_EOPNOTSUPP
    );
}

#[test]
fn direct_request_needs_one_to_eleven_segments() {
    let l = Limits::new(1 << 20);
    let segs: Vec<Segment> = (0..11).map(|i| seg(i, 0, 7)).collect();
    let mut raw = encode::rw(Abi::X86_64, BLKIF_OP_WRITE, 1, 0, &segs);
    assert!(parse(&RawRequest { bytes: raw.clone() }, Abi::X86_64, &l).is_ok());
    raw[1] = 12;
    let (r, st, halt) = reason(raw.clone(), Abi::X86_64, &l);
    assert_eq!(
        r,
        Reason::SegmentCount {
            nr: 12,
            min: 1,
            max: 11
        }
    );
    assert!(st == BLKIF_RSP_ERROR && halt);
    raw[1] = 0;
    assert!(matches!(
        reason(raw, Abi::X86_64, &l).0,
        Reason::SegmentCount { nr: 0, .. }
    ));
}

#[test]
fn flush_without_data_is_allowed_with_zero_segments() {
    let raw = encode::rw(Abi::X86_64, BLKIF_OP_FLUSH_DISKCACHE, 3, 0, &[]);
    let Parsed::Ready(r) = parse(&RawRequest { bytes: raw }, Abi::X86_64, &Limits::new(8)).unwrap()
    else {
        panic!()
    };
    assert_eq!((r.op, r.nr_sectors), (Operation::Flush, 0));
}

#[test]
fn segment_needs_first_sect_at_most_last_sect_below_eight() {
    let l = Limits::new(1 << 20);
    for (first, last) in [(3, 2), (0, 8), (8, 8), (255, 255)] {
        let raw = encode::rw(
            Abi::X86_64,
            BLKIF_OP_READ,
            1,
            0,
            &[seg(1, 0, 7), seg(2, first, last)],
        );
        let (r, _, halt) = reason(raw, Abi::X86_64, &l);
        assert_eq!(
            r,
            Reason::SegmentSectors {
                index: 1,
                first,
                last
            }
        );
        assert!(halt);
    }
}

#[test]
fn sector_range_must_fit_the_disk_with_checked_arithmetic() {
    let l = Limits::new(100);
    let ok = encode::rw(Abi::X86_64, BLKIF_OP_READ, 1, 92, &[seg(1, 0, 7)]);
    assert!(parse(&RawRequest { bytes: ok }, Abi::X86_64, &l).is_ok());
    let past = encode::rw(Abi::X86_64, BLKIF_OP_READ, 1, 93, &[seg(1, 0, 7)]);
    let (r, st, halt) = reason(past, Abi::X86_64, &l);
    assert!(matches!(
        r,
        Reason::BeyondEnd {
            sector: 93,
            nr: 8,
            disk: 100
        }
    ));
    assert!(st == BLKIF_RSP_ERROR && !halt);
    let wrap = encode::rw(Abi::X86_64, BLKIF_OP_READ, 1, u64::MAX - 2, &[seg(1, 0, 7)]);
    assert!(matches!(
        reason(wrap, Abi::X86_64, &l).0,
        Reason::BeyondEnd { .. }
    ));
}

#[test]
fn range_must_be_aligned_to_the_logical_block_size() {
    let l = Limits {
        logical_block_sectors: 8,
        ..Limits::new(1 << 20)
    };
    let raw = encode::rw(Abi::X86_64, BLKIF_OP_READ, 1, 4, &[seg(1, 0, 7)]);
    assert!(matches!(
        reason(raw, Abi::X86_64, &l).0,
        Reason::Misaligned { block: 8, .. }
    ));
}

#[test]
fn no_write_discard_or_flush_with_data_on_a_read_only_disk() {
    let l = Limits {
        read_only: true,
        ..Limits::new(1 << 20)
    };
    for raw in [
        encode::rw(Abi::X86_64, BLKIF_OP_WRITE, 1, 0, &[seg(1, 0, 7)]),
        encode::rw(Abi::X86_64, BLKIF_OP_FLUSH_DISKCACHE, 1, 0, &[seg(1, 0, 7)]),
        encode::rw(Abi::X86_64, BLKIF_OP_WRITE_BARRIER, 1, 0, &[seg(1, 0, 7)]),
        encode::discard(Abi::X86_64, 1, 0, 8, false),
        encode::indirect(Abi::X86_64, BLKIF_OP_WRITE, 1, 0, 20, &[GrantRef(5)]),
    ] {
        let (r, st, halt) = reason(raw, Abi::X86_64, &l);
        assert_eq!((r, st, halt), (Reason::ReadOnly, BLKIF_RSP_ERROR, false));
    }
    let read = encode::rw(Abi::X86_64, BLKIF_OP_READ, 1, 0, &[seg(1, 0, 7)]);
    assert!(parse(&RawRequest { bytes: read }, Abi::X86_64, &l).is_ok());
    let flush = encode::rw(Abi::X86_64, BLKIF_OP_FLUSH_DISKCACHE, 1, 0, &[]);
    assert!(parse(&RawRequest { bytes: flush }, Abi::X86_64, &l).is_ok());
}

#[test]
fn discard_range_must_lie_inside_the_disk() {
    let l = Limits::new(1000);
    let ok = encode::discard(Abi::X86_32, 1, 0, 1000, false);
    assert!(parse(&RawRequest { bytes: ok }, Abi::X86_32, &l).is_ok());
    let bad = encode::discard(Abi::X86_32, 1, 1, 1000, false);
    assert!(matches!(
        reason(bad, Abi::X86_32, &l).0,
        Reason::BeyondEnd { .. }
    ));
    let huge = encode::discard(Abi::X86_32, 1, u64::MAX, 2, false);
    assert!(matches!(
        reason(huge, Abi::X86_32, &l).0,
        Reason::BeyondEnd { .. }
    ));
}

#[test]
fn secure_discard_only_when_offered() {
    let l = Limits::new(1000);
    let raw = encode::discard(Abi::X86_64, 1, 0, 8, true);
    assert_eq!(reason(raw.clone(), Abi::X86_64, &l).1, BLKIF_RSP_EOPNOTSUPP);
    let l2 = Limits {
        discard_secure: true,
        ..l
    };
    let Parsed::Ready(r) = parse(&RawRequest { bytes: raw }, Abi::X86_64, &l2).unwrap() else {
        panic!()
    };
    assert_eq!(r.op, Operation::Discard { secure: true });
}

#[test]
fn operations_not_offered_are_answered_eopnotsupp() {
    let l = Limits {
        flush: false,
        barrier: false,
        discard: false,
        max_indirect_segments: 0,
        ..Limits::new(1000)
    };
    for raw in [
        encode::rw(Abi::X86_64, BLKIF_OP_FLUSH_DISKCACHE, 1, 0, &[]),
        encode::rw(Abi::X86_64, BLKIF_OP_WRITE_BARRIER, 1, 0, &[]),
        encode::discard(Abi::X86_64, 1, 0, 8, false),
        encode::indirect(Abi::X86_64, BLKIF_OP_READ, 1, 0, 20, &[GrantRef(5)]),
    ] {
        let (_, st, halt) = reason(raw, Abi::X86_64, &l);
        assert_eq!((st, halt), (BLKIF_RSP_EOPNOTSUPP, false));
    }
}

#[test]
fn indirect_pages_are_ceil_of_segments_over_512_within_the_negotiated_maximum() {
    let l = Limits {
        max_indirect_segments: 1024,
        ..Limits::new(1 << 30)
    };
    let raw = encode::indirect(
        Abi::X86_64,
        BLKIF_OP_READ,
        7,
        0,
        513,
        &[GrantRef(10), GrantRef(11), GrantRef(12)],
    );
    let Parsed::Indirect(h) = parse(&RawRequest { bytes: raw }, Abi::X86_64, &l).unwrap() else {
        panic!()
    };
    assert_eq!(
        h.grefs,
        vec![GrantRef(10), GrantRef(11)],
        "513 segments take exactly 2 pages"
    );
    let over = encode::indirect(
        Abi::X86_64,
        BLKIF_OP_READ,
        7,
        0,
        1025,
        &[GrantRef(1), GrantRef(2), GrantRef(3)],
    );
    assert!(matches!(
        reason(over, Abi::X86_64, &l).0,
        Reason::SegmentCount {
            nr: 1025,
            max: 1024,
            ..
        }
    ));
    let zero = encode::indirect(Abi::X86_64, BLKIF_OP_READ, 7, 0, 0, &[GrantRef(1)]);
    assert!(reason(zero, Abi::X86_64, &l).2, "zero segments halts");
    let flush = encode::indirect(
        Abi::X86_64,
        BLKIF_OP_FLUSH_DISKCACHE,
        7,
        0,
        4,
        &[GrantRef(1)],
    );
    assert_eq!(
        reason(flush, Abi::X86_64, &l).0,
        Reason::IndirectOp(BLKIF_OP_FLUSH_DISKCACHE)
    );
}

#[test]
fn indirect_segments_are_validated_from_the_private_copy() {
    let l = Limits::new(1 << 30);
    let raw = encode::indirect(Abi::X86_32, BLKIF_OP_WRITE, 7, 16, 3, &[GrantRef(10)]);
    let Parsed::Indirect(h) = parse(&RawRequest { bytes: raw }, Abi::X86_32, &l).unwrap() else {
        panic!()
    };
    let mut page = vec![0u8; 4096];
    for (i, s) in [seg(1, 0, 7), seg(2, 0, 7), seg(3, 0, 3)]
        .iter()
        .enumerate()
    {
        encode::put_segment(&mut page, i * 8, s);
    }
    let r = h.finish(&page, &l).unwrap();
    assert_eq!(
        (r.id, r.wire_op, r.nr_sectors, r.segments.len()),
        (7, BLKIF_OP_WRITE, 20, 3)
    );
    encode::put_segment(&mut page, 8, &seg(2, 5, 4));
    assert!(h.finish(&page, &l).unwrap_err().halt);
}

proptest! {
    #[test]
    fn any_slot_bytes_parse_without_panic_and_ready_requests_are_in_bounds(
        bytes in proptest::collection::vec(any::<u8>(), 112),
        op in prop_oneof![4 => 0u8..7, 1 => any::<u8>()],
        disk in 0u64..1 << 40,
        x86_32 in any::<bool>(),
    ) {
        let abi = if x86_32 { Abi::X86_32 } else { Abi::X86_64 };
        let mut bytes = bytes;
        bytes.truncate(abi.layout().slot);
        bytes[0] = op;
        let l = Limits::new(disk);
        match parse(&RawRequest { bytes }, abi, &l) {
            Ok(Parsed::Ready(r)) => {
                let in_disk = r.sector.checked_add(r.nr_sectors).is_some_and(|e| e <= disk);
                let pure_flush = r.segments.is_empty() && matches!(r.op, Operation::Flush | Operation::Barrier);
                prop_assert!(in_disk || pure_flush);
                prop_assert!(r.segments.len() <= BLKIF_MAX_SEGMENTS_PER_REQUEST);
                for s in &r.segments {
                    prop_assert!(s.first_sect <= s.last_sect && s.last_sect < 8);
                }
            }
            Ok(Parsed::Indirect(h)) => {
                prop_assert!(h.nr_segments >= 1 && h.nr_segments <= 256);
                prop_assert_eq!(h.grefs.len(), usize::from(h.nr_segments).div_ceil(512));
            }
            Err(r) => prop_assert!(r.status == BLKIF_RSP_ERROR || r.status == BLKIF_RSP_EOPNOTSUPP),
        }
    }

    #[test]
    fn unconsumed_matches_a_model_at_any_start_index(
        start in any::<u32>(),
        steps in proptest::collection::vec((0u32..40, 0u32..40, 0u32..40), 1..30),
    ) {
        let (mut f, mut b) = pair(1, Abi::X86_64, start);
        let size = b.size();
        let (mut produced, mut consumed, mut answered) = (0u32, 0u32, 0u32);
        for (p, c, a) in steps {
            for _ in 0..p {
                if f.put_request(&read_req(Abi::X86_64, produced as u64)) {
                    produced += 1;
                }
            }
            f.push_requests();
            let got = b.take(c).unwrap();
            let want = c.min(produced - consumed).min(size - (consumed - answered));
            prop_assert_eq!(got.len() as u32, want);
            consumed += want;
            for _ in 0..a.min(consumed - answered) {
                b.put_response(answered as u64, 0, 0);
                answered += 1;
            }
            b.push_responses();
            f.take_responses();
        }
    }
}
