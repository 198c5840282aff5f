//! The ring consumer over arbitrary shared memory: indices, slots and
//! indirect pages are the guest's. Mostly the producer index is sane (a few
//! requests ahead of rsp_prod), so request parsing and indirect validation
//! are reached; rarely it is anything. Nothing may panic; a halted ring must
//! stay halted.
#![no_main]

use blkbackd::abi::blkif::{Abi, XEN_PAGE_SIZE};
use blkbackd::ring::request::{parse, Limits, Parsed};
use blkbackd::ring::{BackRing, RingMem};
use blkbackd::xen::mem::SharedMem;
use blkbackd_fuzz::Input;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let pages = 1usize << (inp.byte() % 3);
    let abi = if inp.byte() & 1 == 0 {
        Abi::X86_64
    } else {
        Abi::X86_32
    };
    let mem = SharedMem::anonymous(pages * XEN_PAGE_SIZE).expect("memory");
    let image = inp.take(pages * XEN_PAGE_SIZE);
    mem.write(0, image);
    let rsp = inp.u32();
    mem.store_u32(4, rsp); // rsp_prod
    let ahead = if inp.rarely() {
        inp.u32()
    } else {
        u32::from(inp.byte() % 40)
    };
    mem.store_u32(0, rsp.wrapping_add(ahead)); // req_prod
    let mut limits = Limits::new(u64::from(inp.u32()));
    limits.read_only = inp.rarely();
    limits.max_indirect_segments = if inp.rarely() { 0 } else { 256 };
    limits.logical_block_sectors = if inp.rarely() { 8 } else { 1 };
    let indirect_pages = inp.rest();
    let Ok(mut ring) = BackRing::new(mem, pages, abi) else {
        return;
    };
    for _ in 0..3 {
        let raws = match ring.take(ring.size()) {
            Ok(r) => r,
            Err(_) => {
                assert!(ring.take(1).is_err(), "a halted ring served again");
                return;
            }
        };
        for raw in &raws {
            if let Ok(Parsed::Indirect(h)) = parse(raw, abi, &limits) {
                let want = h.grefs.len() * XEN_PAGE_SIZE;
                let mut pages = indirect_pages.to_vec();
                pages.resize(want, 0);
                let _ = h.finish(&pages, &limits);
            }
        }
        for raw in raws {
            ring.put_response(u64::from(raw.bytes[0]), 0, 0);
        }
        ring.push_responses();
        let _ = ring.final_check();
    }
});
