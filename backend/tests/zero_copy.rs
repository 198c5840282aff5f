//! Zero copy: disk I/O straight on mapped guest pages. What must hold is
//! about lifetimes, so the queue is driven pass by pass over a scripted
//! engine (which holds each operation until the test completes it) and
//! grants whose unmapping is counted: a mapping is never unmapped while an
//! operation on it is in flight, a per-request mapping (map mode) is let go
//! once its I/O is done, and a kernel that refuses I/O on the pages (EFAULT)
//! costs the queue its zero copy, not the request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blkbackd::abi::blkif::{
    Abi, GrantRef, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_OKAY, XEN_PAGE_SIZE,
};
use blkbackd::abi::sys::GNTST_OKAY;
use blkbackd::io::engine::{Engine, ScriptedEngine};
use blkbackd::io::op::IoOp;
use blkbackd::io::pool::BouncePool;
use blkbackd::io::MemDisk;
use blkbackd::ring::request::{encode, Limits, Segment};
use blkbackd::ring::{BackRing, FrontRing};
use blkbackd::vbd::queue::{Queue, QueueParts, MAP_BUDGET};
use blkbackd::xen::mem::SharedMem;
use blkbackd::xen::{CopySeg, DomId, EventChannel, Grants, Port};

/// Grants that map fresh pages and count every unmapping.
#[derive(Default)]
struct CountingGrants {
    mapped: Arc<AtomicU64>,
    unmapped: Arc<AtomicU64>,
}

impl Grants for CountingGrants {
    fn copy(&self, segs: &mut [CopySeg<'_>]) -> std::io::Result<()> {
        for s in segs.iter_mut() {
            s.status = GNTST_OKAY;
        }
        Ok(())
    }

    fn map(&self, _domid: DomId, refs: &[GrantRef], _writable: bool) -> std::io::Result<SharedMem> {
        self.mapped.fetch_add(1, Ordering::SeqCst);
        let unmapped = self.unmapped.clone();
        Ok(
            SharedMem::anonymous(refs.len() * XEN_PAGE_SIZE)?.with_on_drop(move || {
                unmapped.fetch_add(1, Ordering::SeqCst);
            }),
        )
    }
}

struct QuietEv;

impl EventChannel for QuietEv {
    fn local_port(&self) -> Port {
        Port(1)
    }
    fn notify(&self) -> std::io::Result<()> {
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

type Q = Queue<CountingGrants, QuietEv, MemDisk>;

/// A one-page ring (the guest's end and a queue on the other) and the
/// grants' counters.
fn setup(
    persistent: bool,
    map_mode: bool,
) -> (FrontRing<SharedMem>, Q, Arc<AtomicU64>, Arc<AtomicU64>) {
    let path = format!(
        "/dev/shm/blkbackd-zc-{}-{}",
        std::process::id(),
        rand_suffix()
    );
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("ring file");
    std::fs::remove_file(&path).expect("unlink");
    f.set_len(XEN_PAGE_SIZE as u64).expect("size");
    let map = || SharedMem::map_fd(&f, 0, XEN_PAGE_SIZE, true).expect("map");
    let front = FrontRing::init(map(), 1, Abi::X86_64, 0).expect("front ring");
    let back = BackRing::new(map(), 1, Abi::X86_64).expect("back ring");
    let grants = CountingGrants::default();
    let (mapped, unmapped) = (grants.mapped.clone(), grants.unmapped.clone());
    let q = Queue::new(QueueParts {
        ring: back,
        ev: QuietEv,
        grants: Arc::new(grants),
        disk: Arc::new(MemDisk::new(4096, false)),
        engine: Engine::Scripted(ScriptedEngine::default()),
        pool: Arc::new(BouncePool::new(64).expect("pool")),
        domid: DomId(1),
        limits: Limits::new(4096),
    })
    .with_persistent_grants(persistent)
    .with_map_mode(map_mode);
    (front, q, mapped, unmapped)
}

/// The tests look at the daemon-wide budget of mappings: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rand_suffix() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Puts a request of `pages` whole pages (grants 8, 9, ...) on the ring.
fn ask(front: &mut FrontRing<SharedMem>, op: u8, id: u64, pages: u32) {
    let segs: Vec<Segment> = (0..pages)
        .map(|i| Segment {
            gref: GrantRef(8 + i),
            first_sect: 0,
            last_sect: 7,
        })
        .collect();
    assert!(front.put_request(&encode::rw(Abi::X86_64, op, id, 0, &segs)));
    front.push_requests();
}

fn scripted(q: &mut Q) -> &mut ScriptedEngine {
    match q.engine_mut() {
        Engine::Scripted(s) => s,
        _ => unreachable!("a scripted engine was given"),
    }
}

fn pending(q: &mut Q) -> Vec<IoOp> {
    std::mem::take(&mut scripted(q).pending)
}

#[test]
fn a_kept_mapping_outlives_its_queue_while_io_on_it_is_in_flight() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (mut front, mut q, mapped, unmapped) = setup(true, false);
    ask(&mut front, BLKIF_OP_READ, 1, 4);
    q.pass();
    let ops = pending(&mut q);
    assert_eq!(ops.len(), 1);
    let g = ops[0]
        .guest
        .as_ref()
        .expect("the read runs on the guest's pages");
    assert!(ops[0].buf.is_none(), "and takes no bounce buffer");
    assert_eq!(g.len(), 4 * XEN_PAGE_SIZE);
    assert_eq!(
        mapped.load(Ordering::SeqCst),
        4,
        "one kept mapping per grant"
    );
    assert_eq!(q.stats().zero_copy, 1);
    // The ring is torn down with the read still in flight (as a hung disk
    // leaves it): the kept mappings must stay until the I/O lets go.
    drop(q);
    assert_eq!(
        unmapped.load(Ordering::SeqCst),
        0,
        "a mapping was unmapped under I/O still in flight"
    );
    // What the kernel would do at completion: write into the pages.
    for m in ops[0].guest.as_ref().unwrap().mappings() {
        m.write_data(0, &[0xAB; 512]);
    }
    drop(ops);
    assert_eq!(
        unmapped.load(Ordering::SeqCst),
        4,
        "let go once the I/O is done"
    );
}

#[test]
fn a_per_request_mapping_is_let_go_once_its_io_is_done() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let budget = MAP_BUDGET.used();
    let (mut front, mut q, mapped, unmapped) = setup(false, true);
    ask(&mut front, BLKIF_OP_WRITE, 7, 3);
    q.pass();
    assert_eq!(
        mapped.load(Ordering::SeqCst),
        1,
        "the request's grants, mapped once"
    );
    assert_eq!(
        MAP_BUDGET.used(),
        budget + 1,
        "a mapping held by I/O draws on the budget"
    );
    let op = &scripted(&mut q).pending[0];
    assert!(
        op.guest.is_some() && op.buf.is_none(),
        "zero copy in map mode"
    );
    let len = op.len as usize;
    q.pass();
    assert_eq!(
        unmapped.load(Ordering::SeqCst),
        0,
        "unmapped with its write in flight"
    );
    assert!(
        front.take_responses().is_empty(),
        "answered before its I/O completed"
    );
    // Completed in two halves (a short write): the mapping is needed for both.
    assert!(scripted(&mut q).complete(0, Ok(len / 2)));
    q.pass();
    assert_eq!(
        unmapped.load(Ordering::SeqCst),
        0,
        "unmapped between the halves"
    );
    let rest = &scripted(&mut q).pending[0];
    assert_eq!(rest.buf_off, len / 2);
    assert!(scripted(&mut q).complete(0, Ok(len - len / 2)));
    q.pass();
    assert_eq!(unmapped.load(Ordering::SeqCst), 1, "kept past its I/O");
    assert_eq!(MAP_BUDGET.used(), budget, "its budget back");
    assert_eq!(
        front.take_responses(),
        vec![(7, BLKIF_OP_WRITE, BLKIF_RSP_OKAY)]
    );
}

#[test]
fn io_refused_on_guest_pages_goes_through_the_bounce_pool_instead() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (mut front, mut q, _, _) = setup(true, false);
    ask(&mut front, BLKIF_OP_READ, 3, 2);
    q.pass();
    assert!(scripted(&mut q).pending[0].guest.is_some());
    // A kernel that cannot pin these pages for I/O (EFAULT).
    assert!(scripted(&mut q).complete(0, Err(std::io::Error::from_raw_os_error(libc::EFAULT))));
    q.pass();
    let op = &scripted(&mut q).pending[0];
    assert!(
        op.guest.is_none() && op.buf.is_some(),
        "started again through the pool"
    );
    let len = op.len as usize;
    assert!(scripted(&mut q).complete(0, Ok(len)));
    q.pass();
    assert_eq!(
        front.take_responses(),
        vec![(3, BLKIF_OP_READ, BLKIF_RSP_OKAY)]
    );
    // And the queue does not try the pages again.
    ask(&mut front, BLKIF_OP_READ, 4, 1);
    q.pass();
    assert!(scripted(&mut q).pending[0].guest.is_none());
    assert_eq!(q.stats().zero_copy, 0);
}
