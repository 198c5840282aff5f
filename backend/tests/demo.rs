//! The README's first command: the demo must run to completion.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_one_guest_and_halts_only_the_hostile_one() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_blkbackd"));
    tokio::time::timeout(
        std::time::Duration::from_secs(120),
        blkbackd::demo::run(Some(dir.path().join("demo")), Some(exe)),
    )
    .await
    .expect("demo hung")
    .expect("demo failed");
    // The demo's Xenstore socket is gone once it is done.
    assert!(!dir.path().join("demo/xenstore.sock").exists());
}

#[test]
fn the_demo_command_prints_the_whole_story() {
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
        "SIM-GUEST PASS",
        "verified ios=",
        "ring halted: frontend provided bogus ring requests",
        "state 6 (Closed)",
        "demo complete",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}
