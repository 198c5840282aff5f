//! The ring engine against simulated guests in separate processes, over the
//! simulated Xen: data verified byte for byte, and each misbehaviour mode
//! affecting only the misbehaving guest's ring while another guest is served.

use std::sync::Arc;
use std::time::Duration;

use blkbackd::io::{Disk, MemDisk};
use blkbackd::sim::guest::Mode;
use blkbackd::sim::world::{Served, SimWorld};
use blkbackd::vbd::queue::{QueueEnd, QueueStats};
use blkbackd::vbd::Offer;
use xenstore::DomId;

const DEVID: u32 = 51712;
const DISK_SECTORS: u64 = 16 * 2048; // 16 MiB

struct Sim {
    _dir: tempfile::TempDir,
    world: SimWorld,
}

async fn sim() -> Sim {
    let dir = tempfile::tempdir().unwrap();
    let world = SimWorld::start(dir.path()).await.unwrap();
    Sim { _dir: dir, world }
}

impl Sim {
    /// Does what the toolstack and the daemon do for one vbd of `domid`.
    async fn backend(&self, domid: DomId, read_only: bool) -> Served {
        self.world
            .serve_mem_disk(domid, DEVID, DISK_SECTORS, read_only)
            .await
            .unwrap()
    }

    /// Runs `blkbackd sim-guest` for `domid` as a separate process.
    async fn guest(&self, domid: DomId, mode: &str, extra: &[&str]) -> (bool, String) {
        let exe = std::path::Path::new(env!("CARGO_BIN_EXE_blkbackd"));
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            self.world
                .guest_command(exe, domid, mode)
                .args(extra)
                .env("RUST_LOG", "warn")
                .output(),
        )
        .await
        .expect("sim-guest hung")
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), format!("{stdout}{stderr}"))
    }
}

async fn finish(b: Served) -> Vec<(QueueEnd, QueueStats)> {
    tokio::time::timeout(Duration::from_secs(30), b.finish())
        .await
        .expect("backend did not stop")
        .expect("backend failed to connect")
}

fn halted(ends: &[(QueueEnd, QueueStats)]) -> usize {
    ends.iter()
        .filter(|(e, _)| matches!(e, QueueEnd::Halted(_)))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_in_another_process_gets_its_data_back_byte_for_byte() {
    let s = sim().await;
    let b = s.backend(DomId(2), false).await;
    let (ok, out) = s.guest(DomId(2), "verify", &["--ios", "40"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("queues=2 order=2 indirect=32 persistent=true"),
        "{out}"
    );
    let ends = finish(b).await;
    assert_eq!(halted(&ends), 0);
    let bytes: u64 = ends.iter().map(|(_, st)| st.bytes).sum();
    assert!(bytes > 1 << 20, "only {bytes} bytes moved");
    // Persistent grants: each page mapped once, then reused.
    let maps: u64 = ends.iter().map(|(_, st)| st.persistent_maps).sum();
    let hits: u64 = ends.iter().map(|(_, st)| st.persistent_hits).sum();
    assert!(maps > 0 && hits > 10 * maps, "maps {maps}, hits {hits}");
    assert!(maps as usize <= 2 * blkbackd::vbd::queue::MAX_PERSISTENT_GRANTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_32_bit_guest_with_one_page_ring_and_no_indirect_across_the_index_wrap() {
    let s = sim().await;
    let b = s.backend(DomId(2), false).await;
    let (ok, out) = s
        .guest(
            DomId(2),
            "verify",
            &[
                "--protocol",
                "x86_32-abi",
                "--ring-order",
                "0",
                "--queues",
                "1",
                "--indirect",
                "0",
                "--start-index",
                "4294967200",
                "--ios",
                "40",
            ],
        )
        .await;
    assert!(ok, "{out}");
    assert!(out.contains("queues=1 order=0 indirect=0"), "{out}");
    assert_eq!(halted(&finish(b).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_persistent_grants_every_segment_is_a_grant_copy() {
    let s = sim().await;
    let b = s.backend(DomId(2), false).await;
    let (ok, out) = s
        .guest(DomId(2), "verify", &["--ios", "10", "--no-persistent"])
        .await;
    assert!(ok, "{out}");
    assert!(out.contains("persistent=false"), "{out}");
    let ends = finish(b).await;
    assert_eq!(
        ends.iter().map(|(_, st)| st.persistent_maps).sum::<u64>(),
        0
    );
}

/// The bench's guest loop (a thread per queue, answers taken in batches)
/// keeps its requests in flight until its time is up and counts exactly what
/// the backend answered: with persistent grants or without, direct or
/// indirect segments, sleeping on the event channel or polling the ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_guest_counts_exactly_what_the_backend_answered() {
    let s = sim().await;
    let runs: [(&str, &[&str]); 4] = [
        ("randwrite:4096:5:0.3", &[]),
        ("read:131072:3:0.3", &["--no-persistent"]),
        ("randread:8192:1:0.3", &["--poll-us", "50"]),
        ("write:131072:4:0.3", &["--no-persistent", "--queues", "1"]),
    ];
    for (i, (spec, extra)) in runs.into_iter().enumerate() {
        let domid = DomId(10 + i as u16);
        let b = s.backend(domid, false).await;
        let mut args = vec!["--bench", spec];
        args.extend_from_slice(extra);
        let (ok, out) = s.guest(domid, "bench", &args).await;
        assert!(ok, "{spec} {extra:?}: {out}");
        let ops: u64 = out
            .split_whitespace()
            .find_map(|f| f.strip_prefix("ops="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no ops= in {out}"));
        let ends = finish(b).await;
        assert_eq!(halted(&ends), 0, "{spec}");
        let answered: u64 = ends.iter().map(|(_, st)| st.ok).sum();
        let errors: u64 = ends.iter().map(|(_, st)| st.errors).sum();
        assert!(ops > 10, "{spec}: only {ops} requests in 0.3 s");
        assert_eq!((ops, errors), (answered, 0), "{spec} {extra:?}");
        let bs: u64 = spec.split(':').nth(1).unwrap().parse().unwrap();
        let bytes: u64 = ends.iter().map(|(_, st)| st.bytes).sum();
        assert_eq!(bytes, ops * bs, "{spec}");
    }
    // Requests larger than one request carries are refused, clearly.
    let b = s.backend(DomId(20), false).await;
    let (ok, out) = s
        .guest(
            DomId(20),
            "bench",
            &["--bench", "read:65536:1:0.3", "--indirect", "0"],
        )
        .await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("need 16 segments; the backend takes 11"),
        "{out}"
    );
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_guest_wrote_is_on_the_backend_disk() {
    let s = sim().await;
    let b = s.backend(DomId(2), false).await;
    let disk = b.disk.clone();
    // Dom0 writes a marker the guest's discard must clear (sectors 0..64) and
    // one it must leave alone (the last sector).
    let last = (DISK_SECTORS - 1) * 512;
    disk.write_at(last, &[0x5A; 512]).unwrap();
    disk.write_at(0, &[0xA5; 512]).unwrap();
    let (ok, out) = s.guest(DomId(2), "verify", &["--ios", "10"]).await;
    assert!(ok, "{out}");
    finish(b).await;
    let snap = disk.snapshot();
    assert!(snap[..64 * 512].iter().all(|&x| x == 0), "discarded range");
    assert!(
        snap[last as usize..].iter().all(|&x| x == 0x5A),
        "untouched sector"
    );
    assert!(
        snap[64 * 512..].iter().any(|&x| x != 0),
        "the guest's writes landed"
    );
}

/// One hostile guest (domain 2) next to a well-behaved one (domain 3);
/// returns how the hostile guest's rings ended.
async fn hostile(mode: &str) -> Vec<(QueueEnd, QueueStats)> {
    hostile_with(mode, &[]).await.0
}

/// [`hostile`] with extra arguments for the hostile guest; also returns what
/// it printed.
async fn hostile_with(mode: &str, extra: &[&str]) -> (Vec<(QueueEnd, QueueStats)>, String) {
    hostile_offered(mode, extra, Offer::default()).await
}

/// [`hostile_with`], the hostile guest's vbd offered `offer`.
async fn hostile_offered(
    mode: &str,
    extra: &[&str],
    offer: Offer,
) -> (Vec<(QueueEnd, QueueStats)>, String) {
    let m: Mode = mode.parse().unwrap();
    let s = sim().await;
    let disk = Arc::new(MemDisk::new(DISK_SECTORS, m == Mode::WriteReadOnly));
    let hostile = s
        .world
        .serve_with(DomId(2), DEVID, "memory", disk, offer)
        .await
        .unwrap();
    let good = s.backend(DomId(3), false).await;
    let (h, g) = tokio::join!(
        s.guest(DomId(2), mode, extra),
        s.guest(DomId(3), "verify", &["--ios", "30", "--seed", "7"])
    );
    assert!(g.0, "the well-behaved guest was affected: {}", g.1);
    if m != Mode::Rewrite {
        assert!(h.0, "the hostile guest did not see what it should: {}", h.1);
    }
    let h_ends = finish(hostile).await;
    let g_ends = finish(good).await;
    assert_eq!(halted(&g_ends), 0, "the well-behaved guest's rings");
    match m {
        Mode::Rewrite => assert!(halted(&h_ends) <= 1, "{h_ends:?}"),
        m if m.halts() => assert_eq!(halted(&h_ends), 1, "exactly one halted ring: {h_ends:?}"),
        _ => assert_eq!(halted(&h_ends), 0, "refused, not halted: {h_ends:?}"),
    }
    (h_ends, h.1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_channel_storm_halts_only_that_ring() {
    use blkbackd::ring::RingError;
    use blkbackd::vbd::queue::STORM_HALT;
    let (ends, out) = hostile_with("event-storm", &[]).await;
    let sent: u64 = out
        .split_whitespace()
        .zip(out.split_whitespace().skip(1))
        .find(|(_, w)| *w == "notifications")
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {out}"));
    let (end, st) = ends
        .iter()
        .find(|(e, _)| matches!(e, QueueEnd::Halted(_)))
        .unwrap();
    assert!(
        matches!(end, QueueEnd::Halted(RingError::EventStorm(n)) if *n >= STORM_HALT),
        "{end:?}"
    );
    assert!(st.spurious_kicks >= u64::from(STORM_HALT), "{st:?}");
    // The storm was coalesced and throttled: fewer wake-ups than
    // notifications, and no request was made up out of it.
    assert!(
        st.kicks < sent,
        "{} wake-ups for {sent} notifications",
        st.kicks
    );
    assert_eq!(st.ok + st.errors, 0, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_answers_pins_only_bounded_memory() {
    use blkbackd::vbd::queue::MAX_PERSISTENT_GRANTS;
    // 100 reads of 128 KiB per ring (12.5 MiB asked for), all published at
    // once and their responses never consumed, against a bounce pool of
    // 1 MiB (8 such reads): the backend answers them all within its bounce
    // pool and persistent-grant cache, and the guest can push no more than
    // its ring holds.
    const POOL: usize = 1 << 20;
    let offer = Offer {
        pool_bytes: POOL,
        ..Offer::default()
    };
    let (ends, out) = hostile_offered("never-answer", &["--ios", "100"], offer).await;
    assert!(
        out.contains("outstanding 200 reads of 131072 bytes"),
        "{out}"
    );
    assert_eq!(ends.len(), 2, "{ends:?}");
    for (end, st) in &ends {
        assert!(matches!(end, QueueEnd::Stopped), "{end:?}");
        assert_eq!(st.ok, 100, "every read answered: {st:?}");
        assert!(
            st.in_flight_peak <= 128,
            "more in flight than the ring holds: {st:?}"
        );
        assert!(
            st.pool_peak_bytes <= POOL as u64,
            "bounce buffers past the pool: {st:?}"
        );
        // The bound was reached: a pass takes more reads at once than the
        // pool has room for, so some waited for buffers to come back.
        assert!(
            st.buffer_waits > 0,
            "the pool bound was never reached: {st:?}"
        );
        assert_eq!(
            st.persistent_maps, MAX_PERSISTENT_GRANTS as u64,
            "persistent grants past (or short of) the cap: {st:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_producer_index_halts_only_that_ring() {
    hostile("bogus-prod").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_segments_halts_only_that_ring() {
    hostile("too-many-segments").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_first_last_sector_halts_only_that_ring() {
    hostile("bad-sector").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sectors_past_the_end_are_refused_and_the_ring_serves_on() {
    hostile("past-end").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_a_read_only_disk_are_refused() {
    hostile("write-read-only").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_operations_get_eopnotsupp() {
    hostile("unknown-op").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_never_granted_reference_fails_only_its_request() {
    hostile("bad-grant").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_grant_fails_only_its_request() {
    hostile("revoked-grant").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_rewriting_its_ring_during_the_copy_hurts_only_itself() {
    hostile("rewrite").await;
}

/// A simulated blkfront in this process, speaking for `domid` and connected
/// to the vbd `b` serves.
async fn in_process_guest(s: &Sim, b: &Served, domid: DomId) -> blkbackd::sim::blkfront::Blkfront {
    let opts = blkbackd::sim::blkfront::FrontOptions::default();
    s.world
        .front(domid, &b.paths.frontend, &opts, 1024)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulated_blkfront_also_runs_in_process() {
    let s = sim().await;
    let b = s.backend(DomId(4), false).await;
    let front = in_process_guest(&s, &b, DomId(4)).await;
    assert_eq!(front.sectors, DISK_SECTORS);
    // 40 pages: more than 11 direct segments, so it goes indirect.
    let data: Vec<u8> = (0..40 * 4096).map(|i| (i % 251) as u8).collect();
    front.write(100, &data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    front.read(100, &mut back).await.unwrap();
    assert_eq!(back, data);
    let on_disk = b.disk.snapshot();
    assert_eq!(&on_disk[100 * 512..100 * 512 + data.len()], &data[..]);
    assert_eq!(halted(&finish(b).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_error_fails_only_the_requests_that_touch_it() {
    use blkbackd::sim::blkfront::FrontError;
    let s = sim().await;
    let b = s.backend(DomId(4), false).await;
    b.disk.fail_sectors(1000, 8); // a bad stretch of medium
    let front = in_process_guest(&s, &b, DomId(4)).await;
    let mut buf = vec![0u8; 8 * 512];
    for at in [996, 1000, 1007] {
        let r = front.read(at, &mut buf).await;
        assert!(
            matches!(r, Err(FrontError::Status(-1))),
            "read at {at}: {r:?}"
        );
    }
    let w = front.write(1004, &buf).await;
    assert!(matches!(w, Err(FrontError::Status(-1))), "{w:?}");
    // Everything around it still works, and the ring was never halted.
    front.write(1008, &[7u8; 4096]).await.unwrap();
    front.read(1008, &mut buf).await.unwrap();
    assert_eq!(buf, vec![7u8; 4096]);
    front.read(0, &mut buf).await.unwrap();
    let ends = finish(b).await;
    assert_eq!(halted(&ends), 0);
    assert_eq!(ends.iter().map(|(_, st)| st.errors).sum::<u64>(), 4);
}
