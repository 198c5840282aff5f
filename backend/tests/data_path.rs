//! The data path over real files and loop devices: every ring shape with each
//! I/O engine returns the guest's bytes exactly; flushes reach the device
//! after the writes acknowledged before them; discards read back as zeroes;
//! 4096-byte logical sectors are honoured.

#[path = "common/tier.rs"]
mod tier;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tier::Tier;

use blkbackd::disk::loopdev::{self, LoopOptions};
use blkbackd::disk::open_by_diskseq;
use blkbackd::io::engine::EngineChoice;
use blkbackd::io::{Disk, FileDisk};
use blkbackd::sim::blkfront::{Blkfront, FrontError, FrontOptions};
use blkbackd::sim::world::{Served, SimWorld};
use blkbackd::vbd::queue::{QueueEnd, QueueStats};
use blkbackd::vbd::Offer;
use xenstore::DomId;
use xenstore::Xs;

const DEVID: u32 = 51712;
const DISK_BYTES: u64 = 8 << 20;

struct Sim {
    dir: tempfile::TempDir,
    world: SimWorld,
    // One at a time where tests share a process (`cargo test`): the
    // daemon-wide budget of kept mappings is one per process, and one test
    // sets and counts it.
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn sim() -> Sim {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_max_level(tracing::Level::DEBUG)
        .try_init();
    let serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let world = SimWorld::start(&dir.path().join("xen")).await.unwrap();
    Sim {
        dir,
        world,
        _serial: serial,
    }
}

fn image(dir: &Path, name: &str, bytes: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(bytes).unwrap();
    p
}

fn offer(engine: EngineChoice, direct_io: bool) -> Offer {
    Offer {
        engine,
        direct_io,
        ..Offer::default()
    }
}

impl Sim {
    /// A fresh image file `name` served to `domid` with `offer`.
    async fn serve_file(
        &self,
        domid: u16,
        name: &str,
        offer: Offer,
    ) -> (Served<FileDisk>, std::path::PathBuf) {
        let img = image(self.dir.path(), name, DISK_BYTES);
        let disk = FileDisk::open_file(&img, false).unwrap();
        (
            self.serve_disk(DomId(domid), "file", disk, offer).await,
            img,
        )
    }

    /// `disk` (a `kind` of disk, for the logs) served to `domid` with `offer`.
    async fn serve_disk(
        &self,
        domid: DomId,
        kind: &str,
        disk: FileDisk,
        offer: Offer,
    ) -> Served<FileDisk> {
        self.world
            .serve_with(domid, DEVID, kind, Arc::new(disk), offer)
            .await
            .unwrap()
    }

    /// A blkfront in this process for the vbd `b` serves, asking for `opts`.
    async fn front<D: Disk>(&self, b: &Served<D>, domid: DomId, opts: &FrontOptions) -> Blkfront {
        tokio::time::timeout(
            Duration::from_secs(30),
            self.world.front(domid, &b.paths.frontend, opts, 16384),
        )
        .await
        .expect("connect hung")
        .unwrap()
    }
}

async fn finish<D>(b: Served<D>) -> Vec<(QueueEnd, QueueStats)> {
    let ends = tokio::time::timeout(Duration::from_secs(30), b.finish())
        .await
        .expect("backend did not stop")
        .expect("backend failed to connect");
    for (e, _) in &ends {
        assert_eq!(*e, QueueEnd::Stopped, "a ring was halted");
    }
    ends
}

/// Deterministic bytes for request `i`.
fn pattern(i: usize, len: usize) -> Vec<u8> {
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Concurrent writes of many sizes into disjoint extents, read back
/// concurrently; returns (sector, data) of each extent.
async fn scatter(front: &Arc<Blkfront>, seed: usize) -> Vec<(u64, Vec<u8>)> {
    // Sizes from one sector to 96 pages (indirect, or split by the front).
    let sizes = [1usize, 8, 3, 64, 16, 768, 7, 40, 2, 200, 11 * 8, 12 * 8];
    let mut extents = Vec::new();
    let mut at = 64u64;
    for (i, &sectors) in sizes.iter().cycle().take(36).enumerate() {
        extents.push((at, pattern(seed * 100 + i, sectors * 512)));
        at += sectors as u64 + 5; // gaps, so nothing is page-aligned by luck
    }
    assert!(at * 512 < DISK_BYTES);
    let mut tasks = tokio::task::JoinSet::new();
    for (sector, data) in extents.clone() {
        let f = front.clone();
        tasks.spawn(async move { f.write(sector, &data).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (sector, data) in extents.clone() {
        let f = front.clone();
        tasks.spawn(async move {
            let mut back = vec![0u8; data.len()];
            f.read(sector, &mut back).await.unwrap();
            assert!(back == data, "extent at sector {sector} read back wrong");
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    extents
}

fn assert_on_file(path: &Path, extents: &[(u64, Vec<u8>)]) {
    let file = std::fs::read(path).unwrap();
    for (sector, data) in extents {
        let at = *sector as usize * 512;
        assert!(
            file[at..at + data.len()] == data[..],
            "extent at sector {sector} is not on the file"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ring_shape_and_engine_returns_the_guests_bytes() {
    let s = sim().await;
    let mut domid = 10u16;
    let mut ran = 0;
    for engine in [EngineChoice::IoUring, EngineChoice::Blocking] {
        for ring_order in [0u32, 2, 4] {
            for queues in [1u32, 3] {
                for indirect in [0u32, 64] {
                    for (persistent, map_grants, zero_copy) in [
                        (false, false, true),
                        (false, true, true),
                        (false, true, false),
                        (true, false, true),
                        (true, false, false),
                    ] {
                        domid += 1;
                        let (b, img) = s
                            .serve_file(
                                domid,
                                &format!("d{domid}.img"),
                                Offer {
                                    map_grants,
                                    zero_copy,
                                    ..offer(engine, true)
                                },
                            )
                            .await;
                        let opts = FrontOptions {
                            ring_order,
                            queues,
                            indirect,
                            persistent,
                            ..FrontOptions::default()
                        };
                        let front = Arc::new(s.front(&b, DomId(domid), &opts).await);
                        let what = format!(
                            "{engine:?} order {ring_order} queues {queues} indirect {indirect} persistent {persistent} map {map_grants} zero-copy {zero_copy}"
                        );
                        assert_eq!(
                            (front.ring_order, front.queues() as u32, front.persistent),
                            (ring_order, queues, persistent),
                            "{what}: not negotiated"
                        );
                        let extents = scatter(&front, domid as usize).await;
                        let ends = finish(b).await;
                        assert_on_file(&img, &extents);
                        let st: u64 = ends.iter().map(|(_, s)| s.errors).sum();
                        assert_eq!(st, 0, "{what}: errors");
                        if persistent {
                            assert!(ends.iter().any(|(_, s)| s.persistent_hits > 0), "{what}");
                        }
                        let mapped: u64 = ends.iter().map(|(_, s)| s.mapped_segments).sum();
                        assert_eq!(mapped > 0, map_grants, "{what}: map mode");
                        // Zero copy where the guest's pages are mapped and
                        // the engine can do I/O on them (io_uring), and
                        // only there: the blocking engine and grant copy
                        // go through the bounce pool.
                        let zc: u64 = ends.iter().map(|(_, s)| s.zero_copy).sum();
                        let want_zc = zero_copy
                            && engine == EngineChoice::IoUring
                            && (persistent || map_grants);
                        assert_eq!(zc > 0, want_zc, "{what}: zero copy ({zc} requests)");
                        if queues > 1 {
                            assert!(
                                ends.iter().filter(|(_, s)| s.ok > 0).count() > 1,
                                "{what}: only one queue served"
                            );
                        }
                        ran += 1;
                    }
                }
            }
        }
    }
    assert_eq!(ran, 120);
}

/// A loop device's (writes completed, sectors written, flushes completed)
/// from `/sys/block/loopN/stat`.
fn loop_stat(minor: u32) -> (u64, u64, u64) {
    let s = std::fs::read_to_string(format!("/sys/block/loop{minor}/stat")).unwrap();
    let f: Vec<u64> = s.split_whitespace().map(|v| v.parse().unwrap()).collect();
    assert!(f.len() >= 17, "no flush counters in {s:?}");
    (f[4], f[6], f[15])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_answers_only_after_the_acknowledged_writes_reached_the_device() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let s = sim().await;
    for (n, engine) in [EngineChoice::IoUring, EngineChoice::Blocking]
        .into_iter()
        .enumerate()
    {
        let domid = DomId(70 + n as u16);
        let img = image(s.dir.path(), &format!("flush{n}.img"), DISK_BYTES);
        let dev = loopdev::attach(&img, &LoopOptions::default()).unwrap();
        let minor = dev.id.minor;
        let disk = FileDisk::from_opened(open_by_diskseq(dev.id, true).unwrap()).pinning(dev);
        // Buffered: writes sit in the page cache until the flush pushes them.
        let b = s
            .world
            .serve_with(domid, DEVID, "loop", Arc::new(disk), offer(engine, false))
            .await
            .unwrap();
        let front = s.front(&b, domid, &FrontOptions::default()).await;
        let data = pattern(n, 1 << 20);
        let (_, sectors_before, _) = loop_stat(minor);
        front.write(2048, &data).await.unwrap();
        let (_, _, flushes_before) = loop_stat(minor);
        front.flush().await.unwrap();
        let (_, sectors_after, flushes_after) = loop_stat(minor);
        assert!(
            sectors_after >= sectors_before + (data.len() as u64 / 512),
            "{engine:?}: the acknowledged MiB did not reach the device by the flush's answer \
             ({sectors_before} -> {sectors_after} sectors)"
        );
        assert!(
            flushes_after > flushes_before,
            "{engine:?}: no flush reached the device ({flushes_before} -> {flushes_after})"
        );
        finish(b).await;
        assert_on_file(&img, &[(2048, data)]);
    }
}

/// A disk that completes asynchronously (a loop device: its worker thread
/// does the I/O) has its I/O submitted by the `io_uring_enter` the serving
/// thread sleeps in, not by one of its own; every byte still comes back,
/// through the persistent-grant copy and the grant copy alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_left_to_the_sleep_on_an_asynchronous_disk_returns_the_guests_bytes() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let s = sim().await;
    for (n, persistent) in [true, false].into_iter().enumerate() {
        // Whether the disk looks asynchronous is seen at each submission: on
        // a loaded machine the loop device's worker can finish before the
        // serving thread looks, and the ring then submits in the pass. A few
        // rounds make one that leaves its I/O to the sleep all but certain.
        let mut left = 0;
        for round in 0..8u16 {
            let domid = DomId(75 + 10 * n as u16 + round);
            let img = image(s.dir.path(), &format!("async{n}-{round}.img"), DISK_BYTES);
            let dev = loopdev::attach(&img, &LoopOptions::default()).unwrap();
            let disk = FileDisk::from_opened(open_by_diskseq(dev.id, true).unwrap()).pinning(dev);
            let b = s
                .serve_disk(domid, "loop", disk, offer(EngineChoice::IoUring, true))
                .await;
            let opts = FrontOptions {
                persistent,
                ..FrontOptions::default()
            };
            let front = Arc::new(s.front(&b, domid, &opts).await);
            let extents = scatter(&front, 40 + n).await;
            // A flush (it waits for everything started before it, and the
            // ring's read of the event channel must not wait for it), then
            // I/O again behind it.
            tokio::time::timeout(Duration::from_secs(10), front.flush())
                .await
                .expect("the flush was never answered")
                .unwrap();
            let again = pattern(50 + n, 64 << 10);
            front.write(8192, &again).await.unwrap();
            let ends = finish(b).await;
            assert_on_file(&img, &extents);
            assert_on_file(&img, &[(8192, again)]);
            std::fs::remove_file(&img).unwrap();
            left = ends.iter().map(|(_, s)| s.sleep_submits).sum::<u64>();
            if left > 0 {
                break;
            }
        }
        assert!(
            left > 0,
            "persistent {persistent}: no pass left its I/O to the sleep in 8 rounds"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarded_ranges_read_back_as_zeroes_on_files_and_block_devices() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let s = sim().await;
    let mut domid = 80u16;
    for engine in [EngineChoice::IoUring, EngineChoice::Blocking] {
        for on_loop in [false, true] {
            domid += 1;
            let img = image(s.dir.path(), &format!("disc{domid}.img"), DISK_BYTES);
            let disk: FileDisk = if on_loop {
                let dev = loopdev::attach(&img, &LoopOptions::default()).unwrap();
                FileDisk::from_opened(open_by_diskseq(dev.id, true).unwrap()).pinning(dev)
            } else {
                FileDisk::open_file(&img, false).unwrap()
            };
            assert!(disk.can_discard());
            let b = s
                .world
                .serve_with(
                    DomId(domid),
                    DEVID,
                    "disc",
                    Arc::new(disk),
                    offer(engine, true),
                )
                .await
                .unwrap();
            let front = s.front(&b, DomId(domid), &FrontOptions::default()).await;
            let data = pattern(domid as usize, 256 << 10);
            front.write(0, &data).await.unwrap();
            front.discard(128, 256).await.unwrap(); // 128 KiB in the middle
            let mut back = vec![0u8; data.len()];
            front.read(0, &mut back).await.unwrap();
            let (a, z) = (128 * 512, 384 * 512);
            let what = format!("{engine:?} loop={on_loop}");
            assert!(
                back[..a] == data[..a],
                "{what}: data before the discard changed"
            );
            assert!(
                back[a..z].iter().all(|&b| b == 0),
                "{what}: discarded range not zero"
            );
            assert!(
                back[z..] == data[z..],
                "{what}: data after the discard changed"
            );
            finish(b).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4096_byte_sector_disk_is_served_in_whole_sectors() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let s = sim().await;
    let img = image(s.dir.path(), "4k.img", DISK_BYTES);
    let dev = loopdev::attach(
        &img,
        &LoopOptions {
            block_size: 4096,
            ..LoopOptions::default()
        },
    )
    .unwrap();
    let disk = FileDisk::from_opened(open_by_diskseq(dev.id, true).unwrap()).pinning(dev);
    assert_eq!(disk.logical_block_size(), 4096);
    assert!(disk.has_direct());
    let b = s
        .serve_disk(DomId(90), "4k", disk, offer(EngineChoice::IoUring, true))
        .await;
    let front = s.front(&b, DomId(90), &FrontOptions::default()).await;
    assert_eq!(front.sector_size, 4096);
    let pss = format!("{}/physical-sector-size", b.paths.backend);
    assert_eq!(s.world.dom0.read_string(&pss).await.unwrap(), "4096");
    // Wire sectors stay 512 bytes: sector 8 is the second 4 KiB block.
    let data = pattern(4, 64 << 10);
    front.write(8, &data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    front.read(8, &mut back).await.unwrap();
    assert!(back == data);
    // Half a logical block is refused with an error; the ring serves on.
    let r = front.write(9, &[1u8; 512]).await;
    assert!(matches!(r, Err(FrontError::Status(_))), "{r:?}");
    front.read(8, &mut back).await.unwrap();
    assert!(back == data);
    finish(b).await;
    assert_on_file(&img, &[(8, data)]);
}

/// Requests that wait for bounce-pool room are started as soon as
/// completions free it, not at the guest's next kick: 64 concurrent 128 KiB
/// reads through a pool with room for two are all answered, although the
/// guest kicks only as it produces them and never again while it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_for_buffers_are_answered_without_another_kick() {
    let s = sim().await;
    for engine in [EngineChoice::IoUring, EngineChoice::Blocking] {
        let domid = if engine == EngineChoice::IoUring {
            90
        } else {
            91
        };
        let (b, _) = s
            .serve_file(
                domid,
                &format!("stall{domid}.img"),
                Offer {
                    max_indirect_segments: 32,
                    pool_bytes: 256 << 10,
                    ..offer(engine, true)
                },
            )
            .await;
        let opts = FrontOptions {
            ring_order: 4,
            queues: 1,
            indirect: 32,
            persistent: false,
            ..FrontOptions::default()
        };
        let front = Arc::new(s.front(&b, DomId(domid), &opts).await);
        let mut reads = tokio::task::JoinSet::new();
        for i in 0..64u64 {
            let f = front.clone();
            reads.spawn(async move {
                let mut buf = vec![0u8; 128 << 10];
                f.read(i * 256, &mut buf).await
            });
        }
        let answered = tokio::time::timeout(Duration::from_secs(20), async {
            let mut n = 0;
            while let Some(r) = reads.join_next().await {
                r.unwrap().unwrap();
                n += 1;
            }
            n
        })
        .await;
        assert_eq!(answered, Ok(64), "{engine:?}: requests left unanswered");
        let ends = finish(b).await;
        assert!(
            ends.iter().map(|(_, s)| s.buffer_waits).sum::<u64>() > 0,
            "{engine:?}: the pool never ran short, so this proved nothing"
        );
    }
}

/// The kept mappings of persistent grants are bounded daemon-wide, not only
/// per ring: four guests with four queues each, doing I/O over many distinct
/// grants at once against a budget of 200, never hold more than 200 between
/// them; past it their grants are copied, every byte still comes back, and
/// the budget is whole again once they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_mappings_are_bounded_daemon_wide() {
    use blkbackd::vbd::queue::MAP_BUDGET;
    MAP_BUDGET.set_limit(Some(200));
    let s = sim().await;
    let mut served = Vec::new();
    for domid in 60..64u16 {
        let (b, img) = s
            .serve_file(
                domid,
                &format!("b{domid}.img"),
                offer(EngineChoice::IoUring, true),
            )
            .await;
        let opts = FrontOptions {
            queues: 4,
            persistent: true,
            ..FrontOptions::default()
        };
        let front = Arc::new(s.front(&b, DomId(domid), &opts).await);
        served.push((b, front, img));
    }
    let mut io = tokio::task::JoinSet::new();
    for (i, (_, front, _)) in served.iter().enumerate() {
        let f = front.clone();
        io.spawn(async move { (i, scatter(&f, 70 + i).await) });
    }
    let mut extents = vec![Vec::new(); served.len()];
    while let Some(r) = io.join_next().await {
        let (i, e) = r.unwrap();
        extents[i] = e;
    }
    assert!(MAP_BUDGET.used() <= 200, "{} kept", MAP_BUDGET.used());
    let (mut maps, mut over) = (0, 0);
    for ((b, front, img), extents) in served.into_iter().zip(&extents) {
        drop(front);
        let ends = finish(b).await;
        maps += ends.iter().map(|(_, s)| s.persistent_maps).sum::<u64>();
        over += ends
            .iter()
            .map(|(_, s)| s.persistent_over_budget)
            .sum::<u64>();
        assert_eq!(ends.iter().map(|(_, s)| s.errors).sum::<u64>(), 0);
        assert_on_file(&img, extents);
    }
    println!("kept mappings made {maps} (budget 200), grants copied for want of budget {over}");
    assert!(
        maps <= 200,
        "{maps} kept mappings made against a budget of 200"
    );
    assert!(
        over > 0,
        "the guests never reached the budget, so this proved nothing"
    );
    assert_eq!(MAP_BUDGET.used(), 0, "mappings not given back");
}

/// Adaptive polling on: the same bytes come back with either engine, the
/// rings did poll after passes that found work, and with polling off they
/// never spin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_on_and_off_returns_the_guests_bytes() {
    let s = sim().await;
    let mut domid = 100u16;
    for engine in [EngineChoice::IoUring, EngineChoice::Blocking] {
        for poll_us in [0u32, 50] {
            domid += 1;
            let (b, img) = s
                .serve_file(
                    domid,
                    &format!("poll{domid}.img"),
                    Offer {
                        poll_us,
                        ..offer(engine, true)
                    },
                )
                .await;
            let front = Arc::new(s.front(&b, DomId(domid), &FrontOptions::default()).await);
            let extents = scatter(&front, domid as usize).await;
            drop(front);
            let ends = finish(b).await;
            assert_on_file(&img, &extents);
            let spun: u64 = ends.iter().map(|(_, s)| s.poll_ns).sum();
            assert_eq!(
                spun > 0,
                poll_us > 0,
                "{engine:?} poll_us={poll_us}: spun {spun} ns"
            );
            assert_eq!(ends.iter().map(|(_, s)| s.errors).sum::<u64>(), 0);
        }
    }
}
