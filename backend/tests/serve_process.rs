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
    let daemon = blkbackd()
        .args(["serve", "--sim"])
        .arg(&sim)
        .arg("--config")
        .arg(&cfg)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let xs = wait_socket(&sim.join("xenstore.sock")).await;
    blkbackd::xenbus::toolstack::create_vbd(&xs, xenstore::DomId(2), 51712, "file:/x", "w")
        .await
        .unwrap();
    assert_eq!(offered(&xs, 2, "multi-queue-max-queues").await, "1");
    assert_eq!(offered(&xs, 2, "feature-persistent").await, "0");

    std::fs::write(&cfg, "[offer]\nmax_queues = 3\n").unwrap();
    signal(&daemon, "HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    blkbackd::xenbus::toolstack::create_vbd(&xs, xenstore::DomId(3), 51712, "file:/y", "w")
        .await
        .unwrap();
    assert_eq!(offered(&xs, 3, "multi-queue-max-queues").await, "3");
    assert_eq!(offered(&xs, 3, "feature-persistent").await, "1");
    // The first device keeps what it was offered.
    assert_eq!(offered(&xs, 2, "multi-queue-max-queues").await, "1");

    stop(daemon).await;
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
    blkbackd::xenbus::toolstack::create_vbd(&xs, xenstore::DomId(3), 51712, "file:/x", "w")
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
    blkbackd::xenbus::toolstack::create_vbd(&xs, xenstore::DomId(4), 51712, "file:/x", "w")
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

/// How the first daemon of a restart goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Restart {
    /// SIGKILL: a crash.
    Kill,
    /// SIGTERM: `systemctl restart`, an upgrade.
    Term,
}

/// What a restart under a verifying guest showed.
struct Restarted {
    /// The guest's report (`verified ios=.. max_gap_ms=..`).
    report: String,
    /// The second daemon's log.
    log: String,
    /// The backend and frontend states once the first daemon was gone.
    states_between: (String, String),
    /// From the signal to the first daemon's exit.
    stop_ms: u128,
}

/// A guest does verified I/O on a `direct:` file while the daemon serving
/// it is stopped (`how`) and a second one started with `second_config`
/// (a config file's text, if any), as systemd would restart it.
async fn restart_under_io(how: Restart, second_config: Option<&str>) -> Restarted {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("xenstored.sock");
    let sim = dir.path().join("sim");
    let (_xenstored, xs) = xenstored(&socket).await;
    let daemon = |log: &str, config: Option<&str>| {
        let mut cmd = blkbackd();
        cmd.args(["serve", "--sim"])
            .arg(&sim)
            .arg("--xenstore")
            .arg(&socket)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(dir.path().join(log)).unwrap())
            .kill_on_drop(true);
        if let Some(text) = config {
            let path = dir.path().join(format!("{log}.toml"));
            std::fs::write(&path, text).unwrap();
            cmd.arg("--config").arg(path);
        }
        cmd.spawn().unwrap()
    };
    let mut first = daemon("first.log", None);
    let img = dir.path().join("guest.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let d = xenstore::DomId(5);
    xs.introduce(d, 0, 0).await.unwrap();
    blkbackd::xenbus::toolstack::create_domain_home(&xs, d)
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
    let restart = async {
        blkbackd::attach::wait_value(&xs, &format!("{}/state", paths.frontend), "4")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = std::time::Instant::now();
        match how {
            Restart::Kill => first.kill().await.unwrap(),
            Restart::Term => {
                signal(&first, "TERM");
                exits_cleanly(&mut first).await;
            }
        }
        let stop_ms = t.elapsed().as_millis();
        let state = |p: String| {
            let xs = xs.clone();
            async move { xs.read_string(&p).await.unwrap_or_default() }
        };
        let states_between = (
            state(format!("{}/state", paths.backend)).await,
            state(format!("{}/state", paths.frontend)).await,
        );
        (daemon("second.log", second_config), states_between, stop_ms)
    };
    let (out, (mut second, states_between, stop_ms)) = tokio::join!(guest, restart);
    let out = out.unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && report.contains("verified ios=2400"),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    blkbackd::attach::detach(&xs, d, 51712).await.unwrap();
    signal(&second, "TERM");
    exits_cleanly(&mut second).await;
    Restarted {
        report,
        log: std::fs::read_to_string(dir.path().join("second.log")).unwrap(),
        states_between,
        stop_ms,
    }
}

/// The daemon is SIGKILLed while a guest does verified I/O and started
/// again (as systemd would): it adopts the connected device, re-attaches the
/// rings where the published answers stop, re-executes what was taken but not
/// answered, and the guest (which never noticed more than a pause) gets every
/// byte back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_io_and_restarted_loses_nothing() {
    let r = restart_under_io(Restart::Kill, None).await;
    assert!(
        r.log.contains("adopting a connected device"),
        "the restarted daemon did not adopt the device:\n{}",
        r.log
    );
}

/// SIGTERM (`systemctl restart`, every upgrade) hands the devices over: the
/// daemon answers what its rings took, leaves the device Connected (the
/// guest's blkfront would never come back from Closed) and exits 0; the next
/// daemon, whose configuration now offers less, adopts the device with what
/// it negotiated, and the guest verifies every byte. The stall is printed
/// (`--no-capture`): the guest's longest wait for an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_devices_over_and_the_next_daemon_adopts_them() {
    let smaller = "[offer]\nmax_ring_page_order = 0\nmax_queues = 1\nmax_indirect_segments = 0\n";
    let r = restart_under_io(Restart::Term, Some(smaller)).await;
    assert_eq!(
        r.states_between,
        ("4".to_owned(), "4".to_owned()),
        "the stopped daemon must leave both ends Connected"
    );
    assert!(
        r.log.contains("adopting a connected device"),
        "the next daemon did not adopt the device:\n{}",
        r.log
    );
    let gap = r
        .report
        .split(' ')
        .find_map(|f| f.trim().strip_prefix("max_gap_ms="))
        .unwrap_or("?");
    println!(
        "handover: SIGTERM to exit {} ms; the guest's longest wait for an answer {gap} ms",
        r.stop_ms
    );
}

/// A daemon and a domain with one `direct:` vbd attached, for the tests
/// below; the guest is up to each test.
struct OneVbd {
    dir: tempfile::TempDir,
    _xenstored: tokio::process::Child,
    xs: Client,
    img: std::path::PathBuf,
    paths: blkbackd::xenbus::toolstack::VbdPaths,
}

impl OneVbd {
    async fn new() -> OneVbd {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("xenstored.sock");
        let (xenstored, xs) = xenstored(&socket).await;
        let img = dir.path().join("guest.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        OneVbd {
            paths: blkbackd::xenbus::toolstack::VbdPaths::new(xenstore::DomId(6), 51712),
            dir,
            _xenstored: xenstored,
            xs,
            img,
        }
    }

    fn daemon(&self, log: &str) -> tokio::process::Child {
        common::sim_daemon(self.dir.path(), log)
    }

    async fn attach(&self) {
        self.attach_domain(6, &self.img).await;
    }

    /// Introduces domain `domid` and gives it its home, as domain creation does.
    async fn home(&self, domid: u16) -> xenstore::DomId {
        common::new_domain(&self.xs, domid).await
    }

    /// Attaches `img` to domain `domid` (introduced here) as its xvda.
    async fn attach_domain(&self, domid: u16, img: &std::path::Path) {
        let d = self.home(domid).await;
        let params = format!("direct:{}", img.display());
        blkbackd::attach::attach(&self.xs, d, 51712, &params, true)
            .await
            .unwrap();
    }

    fn guest(&self) -> tokio::process::Child {
        self.guest_doing(6, "verify", 1_000_000)
    }

    /// A guest of domain `domid` in `mode` (`ios` as that mode reads it).
    fn guest_doing(&self, domid: u16, mode: &str, ios: u32) -> tokio::process::Child {
        common::sim_guest(self.dir.path(), domid, mode, ios)
    }

    /// Detaches domain `domid`'s xvda as libxl does (Closed, remove, nodes gone).
    async fn detach(&self, domid: u16) {
        blkbackd::attach::detach(&self.xs, xenstore::DomId(domid), 51712)
            .await
            .unwrap();
    }

    async fn state(&self, which: &str) -> String {
        let p = format!("{which}/state");
        self.xs.read_string(&p).await.unwrap_or_default()
    }
}

/// Closing every device stays available as an explicit operator act:
/// `blkbackd shutdown --close-devices` (through the status socket) stops the
/// daemon with every device Closed; plain `blkbackd shutdown` hands over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_close_devices_closes_them_and_plain_shutdown_hands_over() {
    for close in [false, true] {
        let v = OneVbd::new().await;
        let mut daemon = v.daemon("daemon.log");
        v.attach().await;
        let mut guest = v.guest();
        blkbackd::attach::wait_value(&v.xs, &format!("{}/state", v.paths.frontend), "4")
            .await
            .unwrap();
        let mut cmd = blkbackd();
        cmd.arg("shutdown")
            .arg("--socket")
            .arg(v.dir.path().join("sim").join(blkbackd::status::SIM_SOCKET));
        if close {
            cmd.arg("--close-devices");
        }
        let out = cmd.output().await.unwrap();
        assert!(out.status.success(), "{out:?}");
        exits_cleanly(&mut daemon).await;
        let want = if close { "6" } else { "4" };
        assert_eq!(v.state(&v.paths.backend).await, want, "close={close}");
        guest.kill().await.unwrap();
    }
}

/// A device whose disk changed while no daemon ran (the file replaced under
/// its path) is not adopted: it goes to Closing with the reason in `error`,
/// and the replacement file is never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_replaced_between_two_daemons_is_not_served_by_the_next() {
    let v = OneVbd::new().await;
    let mut first = v.daemon("first.log");
    v.attach().await;
    let mut guest = v.guest();
    blkbackd::attach::wait_value(&v.xs, &format!("{}/state", v.paths.frontend), "4")
        .await
        .unwrap();
    signal(&first, "TERM");
    exits_cleanly(&mut first).await;
    assert_eq!(v.state(&v.paths.backend).await, "4");
    // Another file under the same path.
    std::fs::remove_file(&v.img).unwrap();
    std::fs::write(&v.img, vec![0x55u8; 16 << 20]).unwrap();
    let second = v.daemon("second.log");
    blkbackd::attach::wait_value(&v.xs, &format!("{}/state", v.paths.backend), "5")
        .await
        .unwrap();
    let err =
        v.xs.read_string(&format!("{}/error", v.paths.backend))
            .await
            .unwrap();
    assert!(err.contains("the file was replaced"), "{err}");
    // Nothing of the new file reached the guest, nothing was written to it.
    guest.kill().await.unwrap();
    assert!(std::fs::read(&v.img).unwrap().iter().all(|&b| b == 0x55));
    stop(second).await;
}

/// A vbd whose disk was never built closes when the toolstack removes it:
/// `blkbackd attach` of a missing file fails, removes what it created, and
/// takes nowhere near libxl's 10 s to do so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attach_is_removed_at_once_and_leaves_nothing() {
    let v = OneVbd::new().await;
    let daemon = v.daemon("daemon.log");
    let d = v.home(6).await;
    let t = std::time::Instant::now();
    let missing = v.dir.path().join("missing.img");
    let e = blkbackd::attach::attach(
        &v.xs,
        d,
        51712,
        &format!("direct:{}", missing.display()),
        true,
    )
    .await
    .unwrap_err()
    .to_string();
    let took = t.elapsed();
    assert!(e.contains("missing.img"), "{e}");
    assert!(
        took < Duration::from_secs(5),
        "the failed attach took {took:?}: the vbd was not closed when removed"
    );
    assert_eq!(v.xs.try_read(&v.paths.backend).await.unwrap(), None);
    assert_eq!(v.xs.try_read(&v.paths.frontend).await.unwrap(), None);
    println!("failed attach removed in {} ms", took.as_millis());
    stop(daemon).await;
}

/// SIGTERM, then a clean exit.
async fn stop(mut daemon: tokio::process::Child) {
    signal(&daemon, "TERM");
    exits_cleanly(&mut daemon).await;
}

/// The daemon's anonymous resident memory (what a queue of events grows).
fn rss_anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon in /proc/PID/status")
}

/// XSA-349, as the audit reproduced it: a guest rewrites its own frontend
/// nodes from 16 writers (each write fires the daemon's watch). The daemon's
/// memory stays flat, a neighbour's verified I/O goes on, and both devices
/// are then detached as libxl does (the lifecycle kept up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_storming_its_xenstore_nodes_cannot_grow_the_daemon() {
    let v = OneVbd::new().await;
    let daemon = v.daemon("daemon.log");
    let pid = daemon.id().unwrap();
    v.attach().await;
    let storm_img = v.dir.path().join("storm.img");
    std::fs::File::create(&storm_img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    v.attach_domain(7, &storm_img).await;
    let stormer = blkbackd::xenbus::toolstack::VbdPaths::new(xenstore::DomId(7), 51712);
    let neighbour = v.guest_doing(6, "verify", 300);
    let storm = v.guest_doing(7, "xenstore-storm", 5);
    // Both connected (their rings' buffers allocated) before the baseline.
    for fe in [&stormer.frontend, &v.paths.frontend] {
        blkbackd::attach::wait_value(&v.xs, &format!("{fe}/state"), "4")
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = rss_anon_kib(pid);
    let mut peak = before;
    let sample = async {
        for _ in 0..24 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            peak = peak.max(rss_anon_kib(pid));
        }
    };
    let (storm, neighbour, ()) = tokio::join!(
        storm.wait_with_output(),
        neighbour.wait_with_output(),
        sample
    );
    let (storm, neighbour) = (storm.unwrap(), neighbour.unwrap());
    let storm_report = String::from_utf8_lossy(&storm.stdout);
    let report = String::from_utf8_lossy(&neighbour.stdout);
    assert!(storm.status.success(), "{storm_report}{:?}", storm.stderr);
    assert!(
        neighbour.status.success() && report.contains("verified ios=2400"),
        "the neighbour's I/O: {report}"
    );
    println!(
        "xenstore storm: {} ; daemon RssAnon {before} KiB before, peak {peak} KiB",
        storm_report.trim()
    );
    assert!(
        peak < before + 12 * 1024,
        "the daemon grew from {before} KiB to {peak} KiB under the storm"
    );
    // The lifecycle kept up: both devices close as libxl removes them.
    v.detach(7).await;
    v.detach(6).await;
    stop(daemon).await;
}

/// A guest cycling connect failures with a long invalid `protocol` cannot
/// fill dom0's log: its failures are logged at debug level, what it wrote is
/// cut short wherever it is repeated, and repeatable events (connect, close)
/// are said at info level a bounded number of times per vbd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_cycling_connect_failures_cannot_flood_the_log() {
    let v = OneVbd::new().await;
    let mut daemon = v.daemon("daemon.log");
    v.attach().await;
    let guest = xenstore::Client::connect_to(&xenstore::Endpoint::Socket(
        v.dir.path().join("xenstored.sock"),
    ))
    .await
    .unwrap();
    guest
        .control(&[xenstore::server::SIM_AS_DOMAIN, "6"])
        .await
        .unwrap();
    let (fe, be) = (&v.paths.frontend, &v.paths.backend);
    let long = "P".repeat(1500); // under the value quota
    const CYCLES: usize = 40;
    for _ in 0..CYCLES {
        for (k, val) in [
            ("protocol", long.as_str()),
            ("ring-ref", "8"),
            ("event-channel", "5"),
            ("state", "3"),
        ] {
            guest.write(&format!("{fe}/{k}"), val).await.unwrap();
        }
        blkbackd::attach::wait_value(&v.xs, &format!("{be}/state"), "5")
            .await
            .unwrap();
        guest.write(&format!("{fe}/state"), "6").await.unwrap();
        blkbackd::attach::wait_value(&v.xs, &format!("{be}/state"), "6")
            .await
            .unwrap();
        guest.write(&format!("{fe}/state"), "1").await.unwrap();
        blkbackd::attach::wait_value(&v.xs, &format!("{be}/state"), "2")
            .await
            .unwrap();
    }
    let err = v.xs.read_string(&format!("{be}/error")).await.unwrap();
    assert!(err.contains("protocol") && err.len() < 200, "{err}");
    signal(&daemon, "TERM");
    exits_cleanly(&mut daemon).await;
    let log = std::fs::read_to_string(v.dir.path().join("daemon.log")).unwrap();
    let warns = log.lines().filter(|l| l.contains("WARN")).count();
    let guest_text = log.matches('P').count();
    println!(
        "{CYCLES} failed connects: {} log lines, {} bytes, {warns} WARN, {guest_text} bytes of the guest's text",
        log.lines().count(),
        log.len()
    );
    assert_eq!(warns, 0, "{log}");
    assert!(guest_text < 1000, "the guest's text reached the log whole");
    assert!(
        log.lines().count() < CYCLES,
        "one line or more per cycle:\n{log}"
    );
}

/// The daemon trusts no backend node a guest could write: a vbd whose
/// directory, or whose published disk node, a guest can write (a
/// misconfigured toolstack) is refused with the reason in `error`, and the
/// disk it names is never opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_nodes_a_guest_can_write_are_not_trusted() {
    use xenstore::wire::{Access, Perm};
    for bad in ["directory", "physical-file"] {
        let v = OneVbd::new().await;
        let d = v.home(6).await;
        let params = format!("direct:{}", v.img.display());
        let p = blkbackd::xenbus::toolstack::create_vbd(&v.xs, d, 51712, &params, "w")
            .await
            .unwrap();
        let (_, id) = blkbackd::disk::identify_file(&v.img, false).unwrap();
        v.xs.write(
            &format!("{}/physical-file", p.backend),
            v.img.to_str().unwrap(),
        )
        .await
        .unwrap();
        v.xs.write(&format!("{}/file-id", p.backend), id.to_string())
            .await
            .unwrap();
        let guest_writes = [Perm::new(Access::None, 0), Perm::new(Access::Both, 6)];
        let node = match bad {
            "directory" => p.backend.clone(),
            _ => format!("{}/physical-file", p.backend),
        };
        v.xs.set_perms(&node, &guest_writes).await.unwrap();
        let daemon = v.daemon("daemon.log");
        blkbackd::attach::wait_value(&v.xs, &format!("{}/state", p.backend), "5")
            .await
            .unwrap();
        let err =
            v.xs.read_string(&format!("{}/error", p.backend))
                .await
                .unwrap();
        assert!(
            err.contains("can write it") && err.contains(&node),
            "{bad}: {err}"
        );
        assert_ne!(
            v.xs.read_string(&format!("{}/opened", p.backend))
                .await
                .unwrap_or_default(),
            "1",
            "{bad}: the disk was opened"
        );
        stop(daemon).await;
    }
}

/// The backend side of a live migration on one host (what `xl migrate`
/// does to the disks, with the toolstack's steps done here): the receiving
/// domain of the same VM gets its vbd of the same disk built while the
/// sender still writes through its own (the same VM is not a second writer;
/// another VM still is), the sender's vbd is then torn down, and only then
/// does the receiver connect and do its I/O, from what the sender left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_receiver_is_built_beside_the_sender_and_serves_after_it() {
    let v = OneVbd::new().await;
    let daemon = v.daemon("daemon.log");
    let lock_dir = v.dir.path().join("lock");
    std::env::set_var("BLKBACKD_LOCK_DIR", &lock_dir);
    // Sender (domain 6) and receiver (domain 9): the same VM.
    v.attach().await;
    v.xs.write(
        "/local/domain/6/vm",
        "/vm/5d0a1e2b-7c3f-4a51-9e0d-20b1c0ffee20",
    )
    .await
    .unwrap();
    let mut sender = v.guest();
    blkbackd::attach::wait_value(&v.xs, &format!("{}/state", v.paths.frontend), "4")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    v.home(9).await;
    v.xs.write(
        "/local/domain/9/vm",
        "/vm/5d0a1e2b-7c3f-4a51-9e0d-20b1c0ffee20",
    )
    .await
    .unwrap();
    let params = format!("direct:{}", v.img.display());
    blkbackd::attach::attach(&v.xs, xenstore::DomId(9), 51712, &params, true)
        .await
        .expect("the receiving side of the same VM was refused the disk");
    // Another VM is refused while the sender writes.
    v.home(10).await;
    v.xs.write("/local/domain/10/vm", "/vm/another")
        .await
        .unwrap();
    let e = blkbackd::attach::attach(&v.xs, xenstore::DomId(10), 51712, &params, true)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("in use"), "{e}");
    // The sender goes (its guest stops, its vbd is removed), then the
    // receiver runs.
    sender.kill().await.unwrap();
    v.detach(6).await;
    let written = std::fs::read(&v.img).unwrap();
    assert!(written.iter().any(|&b| b != 0), "the sender wrote nothing");
    let out = v
        .guest_doing(9, "verify", 100)
        .wait_with_output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.contains("verified ios=800"),
        "the receiver: {report}"
    );
    v.detach(9).await;
    stop(daemon).await;
}

/// A second `blkbackd serve` for the same Xenstore refuses to start, saying
/// why, and the first goes on: two daemons would both drive every device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_for_the_same_xenstore_refuses_to_start() {
    let v = OneVbd::new().await;
    let first = v.daemon("first.log");
    v.attach().await; // the first one serves (InitWait reached)
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        v.daemon("second.log").wait_with_output(),
    )
    .await
    .expect("the second daemon kept running")
    .unwrap();
    assert!(!out.status.success());
    let log = std::fs::read_to_string(v.dir.path().join("second.log")).unwrap();
    assert!(log.contains("another blkbackd serve is running"), "{log}");
    v.detach(6).await;
    stop(first).await;
}
