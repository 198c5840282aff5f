//! The serving loop (`vbd::queue`) driven pass by pass, with a scripted
//! engine and fake grants: the guest's requests (mostly well formed, now and
//! then breaking a rule), when the queue runs a pass, which I/O completes
//! when and how (in any order, with errors, short transfers), which grants
//! are bad, and when the guest takes its answers, all come from the input.
//!
//! Asserted: every request the guest produced is answered exactly once, in
//! ring order (nothing is answered that was not asked, nothing twice); a
//! ring that is not halted answers everything once its I/O completes; a
//! halted ring answers a prefix and then nothing more; what the queue holds
//! stays within the ring, and what it has in flight within the bounce pool.
#![no_main]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blkbackd::abi::blkif::{
    Abi, GrantRef, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER,
    XEN_PAGE_SIZE,
};
use blkbackd::abi::sys::{GNTST_GENERAL_ERROR, GNTST_OKAY};
use blkbackd::io::engine::{Engine, ScriptedEngine};
use blkbackd::io::pool::BouncePool;
use blkbackd::io::MemDisk;
use blkbackd::ring::request::{encode, Limits, Segment};
use blkbackd::ring::{BackRing, FrontRing};
use blkbackd::vbd::queue::{Queue, QueueParts};
use blkbackd::xen::mem::SharedMem;
use blkbackd::xen::{CopyDir, CopySeg, DomId, EventChannel, Grants, Port};
use blkbackd_fuzz::Input;
use libfuzzer_sys::fuzz_target;

/// Grants whose reference is a multiple of `bad` (if not 0) are refused.
struct FakeGrants {
    bad: u32,
}

impl FakeGrants {
    fn is_bad(&self, gref: GrantRef) -> bool {
        self.bad != 0 && gref.0 % self.bad == 0
    }
}

impl Grants for FakeGrants {
    fn copy(&self, segs: &mut [CopySeg<'_>]) -> std::io::Result<()> {
        for s in segs.iter_mut() {
            if self.is_bad(s.gref) {
                s.status = GNTST_GENERAL_ERROR;
                continue;
            }
            if let CopyDir::FromGuest(buf) = &mut s.dir {
                buf.fill(s.gref.0 as u8);
            }
            s.status = GNTST_OKAY;
        }
        Ok(())
    }

    fn map(&self, _domid: DomId, refs: &[GrantRef], _writable: bool) -> std::io::Result<SharedMem> {
        if refs.is_empty() || refs.iter().any(|&g| self.is_bad(g)) {
            return Err(std::io::Error::from_raw_os_error(libc_einval()));
        }
        SharedMem::anonymous(refs.len() * XEN_PAGE_SIZE)
    }
}

fn libc_einval() -> i32 {
    22
}

/// An event channel that only counts notifications.
struct FakeEv(AtomicU64);

impl EventChannel for FakeEv {
    fn local_port(&self) -> Port {
        Port(1)
    }
    fn notify(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn unmask(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    fn take_kick(&self) -> std::io::Result<bool> {
        Ok(false)
    }
}

/// Two mappings of the same fresh pages: the guest's and the backend's.
fn ring_pages(len: usize) -> (SharedMem, SharedMem) {
    static N: AtomicU64 = AtomicU64::new(0);
    let path = format!(
        "/dev/shm/blkbackd-fuzz-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("ring file");
    std::fs::remove_file(&path).expect("unlink");
    f.set_len(len as u64).expect("size");
    (
        SharedMem::map_fd(&f, 0, len, true).expect("map"),
        SharedMem::map_fd(&f, 0, len, true).expect("map"),
    )
}

const DISK_SECTORS: u64 = 4096;

/// One request from the input: mostly valid, rarely not.
fn request(inp: &mut Input<'_>, abi: Abi, id: u64) -> Vec<u8> {
    let kind = inp.byte() % 6;
    if kind == 5 {
        let sector = u64::from(inp.u32()) % (DISK_SECTORS + 64);
        let nr = u64::from(inp.byte()) + 1;
        return encode::discard(abi, id, sector, nr, inp.rarely());
    }
    let op = match kind {
        0 | 1 => BLKIF_OP_READ,
        2 | 3 => BLKIF_OP_WRITE,
        4 if inp.rarely() => BLKIF_OP_WRITE_BARRIER,
        4 => BLKIF_OP_FLUSH_DISKCACHE,
        _ => unreachable!(),
    };
    let op = if inp.rarely() { inp.byte() } else { op };
    let nsegs = if inp.rarely() {
        usize::from(inp.byte() % 16)
    } else {
        usize::from(inp.byte() % 11) + usize::from(op != BLKIF_OP_FLUSH_DISKCACHE)
    };
    let segs: Vec<Segment> = (0..nsegs)
        .map(|_| {
            let (first, last) = if inp.rarely() {
                (inp.byte() % 9, inp.byte() % 9)
            } else {
                let a = inp.byte() % 8;
                (a, a + inp.byte() % (8 - a))
            };
            Segment {
                gref: GrantRef(u32::from(inp.byte()) + 8),
                first_sect: first,
                last_sect: last,
            }
        })
        .collect();
    let sector = if inp.rarely() {
        u64::from(inp.u32())
    } else {
        u64::from(inp.u32()) % DISK_SECTORS
    };
    encode::rw(abi, op, id, sector, &segs)
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let pages = 1usize << (inp.byte() % 2);
    let abi = if inp.byte() & 1 == 0 {
        Abi::X86_64
    } else {
        Abi::X86_32
    };
    let (front_mem, back_mem) = ring_pages(pages * XEN_PAGE_SIZE);
    let start = if inp.rarely() { u32::MAX - 3 } else { 0 };
    let mut front = FrontRing::init(front_mem, pages, abi, start).expect("front ring");
    let back = BackRing::new(back_mem, pages, abi).expect("back ring");
    let ring_size = back.size() as usize;
    // Room for one largest request at least, sometimes barely more.
    let pool_pages = 11 + usize::from(inp.byte() % 40);
    let pool = Arc::new(BouncePool::new(pool_pages).expect("pool"));
    let read_only = inp.rarely();
    let disk = Arc::new(MemDisk::new(DISK_SECTORS, read_only));
    let mut limits = Limits::new(DISK_SECTORS);
    limits.read_only = read_only;
    limits.max_indirect_segments = 0;
    limits.discard = true;
    let grants = Arc::new(FakeGrants {
        bad: if inp.rarely() {
            u32::from(inp.byte() % 8)
        } else {
            0
        },
    });
    let mut q = Queue::new(QueueParts {
        ring: back,
        ev: FakeEv(AtomicU64::new(0)),
        grants,
        disk,
        engine: Engine::Scripted(ScriptedEngine::default()),
        pool: pool.clone(),
        domid: DomId(1),
        limits,
    })
    .with_persistent_grants(inp.byte() & 1 == 1)
    .with_map_mode(inp.rarely());

    let mut asked: VecDeque<u64> = VecDeque::new();
    let mut next_id = 1u64;
    let mut answered = 0usize;
    let mut take_answers = |front: &mut FrontRing<SharedMem>, asked: &mut VecDeque<u64>| {
        for (id, _, _) in front.take_responses() {
            let want = asked.pop_front();
            assert_eq!(
                Some(id),
                want,
                "an answer out of ring order, twice, or never asked"
            );
            answered += 1;
        }
    };
    fn scripted(q: &mut Queue<FakeGrants, FakeEv, MemDisk>) -> &mut ScriptedEngine {
        match q.engine_mut() {
            Engine::Scripted(s) => s,
            _ => unreachable!("the queue was given a scripted engine"),
        }
    }
    for _ in 0..400 {
        if inp.is_empty() {
            break;
        }
        match inp.byte() % 5 {
            0 => {
                for _ in 0..inp.byte() % 8 {
                    if front.free() == 0 {
                        break;
                    }
                    let r = request(&mut inp, abi, next_id);
                    assert!(front.put_request(&r));
                    asked.push_back(next_id);
                    next_id += 1;
                }
                front.push_requests();
            }
            1 | 2 => q.pass(),
            3 => {
                let pick = usize::from(inp.byte());
                let how = inp.byte();
                let e = scripted(&mut q);
                if !e.pending.is_empty() {
                    let i = pick % e.pending.len();
                    let len = e.pending[i].len as usize;
                    let result = match how % 8 {
                        0 => Err(std::io::Error::from_raw_os_error(5)),
                        // EFAULT: what a kernel that cannot do I/O on
                        // mapped guest pages answers (zero copy falls back).
                        3 if inp.rarely() => Err(std::io::Error::from_raw_os_error(14)),
                        1 if len > 1 => Ok(len / 2),
                        2 => Ok(0),
                        _ => Ok(len),
                    };
                    e.complete(i, result);
                }
            }
            _ => take_answers(&mut front, &mut asked),
        }
        assert!(
            q.unanswered() <= ring_size,
            "more taken than the ring holds"
        );
        assert!(scripted(&mut q).pending.len() <= ring_size);
        assert!(pool.in_use() <= pool.pages(), "the pool overcommitted");
    }
    // The disk finishes everything; the queue must then take and answer
    // all the ring holds. A pass takes at most 32 requests, so the ring is
    // drained only once a pass with nothing pending answers nothing new.
    let mut answers_before = u64::MAX;
    for _ in 0..10_000 {
        let e = scripted(&mut q);
        while let Some(op) = e.pending.first() {
            let len = op.len as usize;
            e.complete(0, Ok(len));
        }
        q.pass();
        let answers = q.stats().ok + q.stats().errors;
        if scripted(&mut q).pending.is_empty() && q.unanswered() == 0 && answers == answers_before {
            break;
        }
        answers_before = answers;
    }
    assert_eq!(q.unanswered(), 0, "requests taken and never answered");
    take_answers(&mut front, &mut asked);
    if q.halted().is_none() {
        assert!(asked.is_empty(), "{} requests never answered", asked.len());
    }
    assert_eq!(pool.in_use(), 0, "bounce buffers not given back");
    let st = q.stats();
    assert_eq!((st.ok + st.errors) as usize, answered);
});
