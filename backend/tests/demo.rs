//! The README's first command: the demo must run to completion.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_the_handshake_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        blkbackd::demo::run(Some(dir.path().join("demo"))),
    )
    .await
    .expect("demo hung")
    .expect("demo failed");
    // The demo's Xenstore socket is gone once it is done.
    assert!(!dir.path().join("demo/xenstore.sock").exists());
}
