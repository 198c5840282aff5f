//! The README's first command: the demo must run to completion, in both its
//! variants (loop devices by diskseq; plain files by identity, as without
//! root).

#[path = "common/tier.rs"]
mod tier;
use std::path::PathBuf;
use std::time::Duration;
use tier::Tier;

fn exe() -> Option<PathBuf> {
    Some(PathBuf::from(env!("CARGO_BIN_EXE_blkbackd")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_device_demo_serves_one_guest_and_halts_only_the_hostile_one() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    tokio::time::timeout(
        Duration::from_secs(120),
        blkbackd::demo::run_with(Some(dir.path().join("demo")), exe(), true),
    )
    .await
    .expect("demo hung")
    .expect("demo failed");
    assert!(!dir.path().join("demo/xenstore.sock").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_file_demo_runs_without_loop_devices() {
    let dir = tempfile::tempdir().unwrap();
    tokio::time::timeout(
        Duration::from_secs(120),
        blkbackd::demo::run_with(Some(dir.path().join("demo")), exe(), false),
    )
    .await
    .expect("demo hung")
    .expect("demo failed");
}

#[test]
fn the_demo_command_prints_the_whole_story() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_blkbackd"))
        .arg("demo")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "state 2 (InitWait)",
        "opened by diskseq",
        "SIM-GUEST PASS",
        "connected; negotiated queues=2 order=2 indirect=32 persistent=true",
        "100% of its write+verify pairs done",
        "verified ios=4000",
        "MB/s through the backend",
        "grew ",
        "resized from 131072 to 196608 sectors; the new end reads back",
        "published sectors = 196608 while connected",
        "ring halted: frontend provided bogus ring requests",
        "the daemon answered Closed",
        "demo complete",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

/// The benchmark command runs end to end and prints its table (a smoke run:
/// the figures themselves are for people, never asserted).
#[test]
fn the_bench_command_prints_every_workload_with_its_ratio() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_blkbackd"))
        .args([
            "bench",
            "--seconds",
            "0.2",
            "--reps",
            "1",
            "--size-mib",
            "16",
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for w in [
        "4k randread qd1",
        "4k randread qd32",
        "4k randwrite qd32",
        "128k read qd8",
        "128k write qd8",
    ] {
        for cache in ["page cache", "O_DIRECT"] {
            assert!(
                text.lines().any(|l| l.starts_with(w) && l.contains(cache)),
                "no {w} / {cache} row in:\n{text}"
            );
        }
    }
    assert!(text.contains("ratio") && text.contains("notif/io") && text.contains("peak RSS"));
}
