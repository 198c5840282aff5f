//! `blkbackd serve --sim DIR --config FILE` as a process: the offer comes from
//! the file, SIGHUP re-reads it for devices created afterwards, a bad file is
//! refused at start with the key named, and SIGTERM stops the daemon.

use std::process::Stdio;
use std::time::Duration;

use xenstore::{Client, Xs};

mod common;
use common::{blkbackd, exits_cleanly, signal, wait_socket};

async fn offered(xs: &Client, domid: u16, key: &str) -> String {
    let be = format!("/local/domain/0/backend/vbd/{domid}/51712");
    for _ in 0..400 {
        if xs
            .try_read(&format!("{be}/state"))
            .await
            .unwrap()
            .as_deref()
            == Some(b"2")
        {
            return xs.read_string(&format!("{be}/{key}")).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("vbd of domain {domid} never reached InitWait");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offer_comes_from_the_config_file_and_sighup_rereads_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("blkbackd.toml");
    std::fs::write(&cfg, "[offer]\nmax_queues = 1\npersistent_grants = false\n").unwrap();
    let sim = dir.path().join("sim");
    let mut daemon = blkbackd()
        .args(["serve", "--sim"])
        .arg(&sim)
        .arg("--config")
        .arg(&cfg)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let xs = wait_socket(&sim.join("xenstore.sock")).await;
    blkbackd::sim::toolstack::create_vbd(&xs, xenstore::DomId(2), 51712, "file:/x", "w")
        .await
        .unwrap();
    assert_eq!(offered(&xs, 2, "multi-queue-max-queues").await, "1");
    assert_eq!(offered(&xs, 2, "feature-persistent").await, "0");

    std::fs::write(&cfg, "[offer]\nmax_queues = 3\n").unwrap();
    signal(&daemon, "HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    blkbackd::sim::toolstack::create_vbd(&xs, xenstore::DomId(3), 51712, "file:/y", "w")
        .await
        .unwrap();
    assert_eq!(offered(&xs, 3, "multi-queue-max-queues").await, "3");
    assert_eq!(offered(&xs, 3, "feature-persistent").await, "1");
    // The first device keeps what it was offered.
    assert_eq!(offered(&xs, 2, "multi-queue-max-queues").await, "1");

    signal(&daemon, "TERM");
    exits_cleanly(&mut daemon).await;
}

#[tokio::test]
async fn a_bad_config_file_is_refused_at_start_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[offer]\nmax_queus = 2\n").unwrap();
    let out = blkbackd()
        .args(["serve", "--sim"])
        .arg(dir.path().join("sim"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_queus"), "{err}");
}

/// Under systemd's `Type=notify` the daemon says READY=1 once it watches
/// backend/vbd (a vbd created right after is served), and STOPPING=1 on
/// SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_then_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&notify).unwrap();
    let sim = dir.path().join("sim");
    let mut daemon = blkbackd()
        .args(["serve", "--sim"])
        .arg(&sim)
        .env("NOTIFY_SOCKET", &notify)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(20), sock.recv(&mut buf))
        .await
        .expect("no READY=1 from the daemon")
        .unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means watching: a vbd made now reaches InitWait.
    let xs = wait_socket(&sim.join("xenstore.sock")).await;
    blkbackd::sim::toolstack::create_vbd(&xs, xenstore::DomId(3), 51712, "file:/x", "w")
        .await
        .unwrap();
    assert_eq!(offered(&xs, 3, "feature-flush-cache").await, "1");
    signal(&daemon, "TERM");
    let n = tokio::time::timeout(Duration::from_secs(20), sock.recv(&mut buf))
        .await
        .expect("no STOPPING=1 from the daemon")
        .unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    exits_cleanly(&mut daemon).await;
}

/// `blkbackd xenstored` on `socket`, in its own process (as xenstored runs
/// in dom0), and a client of it.
async fn xenstored(socket: &std::path::Path) -> (tokio::process::Child, Client) {
    let child = blkbackd()
        .args(["xenstored", "--socket"])
        .arg(socket)
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (child, wait_socket(socket).await)
}

/// Xenstore dies under the daemon (xenstored crashed or was restarted without
/// keeping its connections): the daemon stops its rings and exits with an
/// error naming the cause, so that systemd's Restart=on-failure restarts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_xenstore_connection_ends_the_daemon_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("xenstored.sock");
    let (mut xenstored, xs) = xenstored(&socket).await;
    let daemon = blkbackd()
        .args(["serve", "--sim"])
        .arg(dir.path().join("sim"))
        .arg("--xenstore")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    blkbackd::sim::toolstack::create_vbd(&xs, xenstore::DomId(4), 51712, "file:/x", "w")
        .await
        .unwrap();
    assert_eq!(offered(&xs, 4, "feature-flush-cache").await, "1");

    xenstored.kill().await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(20), daemon.wait_with_output())
        .await
        .expect("the daemon kept running without Xenstore")
        .unwrap();
    assert!(!out.status.success(), "exit status {:?}", out.status);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Xenstore connection was lost"), "{err}");
}

/// The daemon is SIGKILLed while a guest does verified I/O and started
/// again (as systemd would): it adopts the connected device, re-attaches the
/// rings where the published answers stop, re-executes what was taken but not
/// answered, and the guest (which never noticed more than a pause) gets every
/// byte back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_io_and_restarted_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("xenstored.sock");
    let sim = dir.path().join("sim");
    let (_xenstored, xs) = xenstored(&socket).await;
    let daemon = |log: &str| {
        blkbackd()
            .args(["serve", "--sim"])
            .arg(&sim)
            .arg("--xenstore")
            .arg(&socket)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(dir.path().join(log)).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let mut first = daemon("first.log");
    let img = dir.path().join("guest.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let d = xenstore::DomId(5);
    xs.introduce(d, 0, 0).await.unwrap();
    blkbackd::sim::toolstack::create_domain_home(&xs, d)
        .await
        .unwrap();
    let params = format!("direct:{}", img.display());
    let (paths, _) = blkbackd::attach::attach(&xs, d, 51712, &params, true)
        .await
        .unwrap();
    let guest = blkbackd()
        .args([
            "sim-guest",
            "--mode",
            "verify",
            "--ios",
            "300",
            "--domid",
            "5",
        ])
        .arg("--dir")
        .arg(&sim)
        .arg("--xenstore")
        .arg(&socket)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    let crash = async {
        blkbackd::attach::wait_value(&xs, &format!("{}/state", paths.frontend), "4")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        first.kill().await.unwrap();
        daemon("second.log")
    };
    let (out, mut second) = tokio::join!(guest, crash);
    let out = out.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("verified ios=2400"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(dir.path().join("second.log")).unwrap();
    assert!(
        log.contains("adopting a connected device"),
        "the restarted daemon did not adopt the device:\n{log}"
    );
    blkbackd::attach::detach(&xs, d, 51712).await.unwrap();
    signal(&second, "TERM");
    exits_cleanly(&mut second).await;
}
