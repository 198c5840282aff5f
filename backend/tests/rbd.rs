//! `rbd:POOL/IMAGE[@SNAP]` disks against a real single-node Ceph cluster
//! (`scripts/ceph-cluster`, started by `scripts/test-all`; `CEPH_CONF`
//! names it): byte-exact service through librbd, one writer across two
//! "hosts" (two daemons, each with its own Xenstore), identity by image id,
//! resize, snapshots read-only, and the clear failures.
mod common;
#[path = "common/cprobe.rs"]
mod cprobe;

use std::time::Duration;

use common::tier::{self, Tier};
use common::{blkbackd, exits_cleanly, signal, sim_daemon_command, sim_guest, wait_socket};
use xenstore::{Client, Xs};

const DEVID: u32 = 51712;

/// `CMD ARGS` (a Ceph command) against the test cluster; its stdout.
fn cli(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `rbd ARGS` against the test cluster; its stdout.
fn rbd(args: &[&str]) -> String {
    cli("rbd", args)
}

/// A fresh image of `mib` MiB, removed (with its snapshots) when dropped.
struct TestImage(String);

impl TestImage {
    fn new(tag: &str, mib: u32) -> TestImage {
        let name = format!("rbd/t{}-{tag}", std::process::id());
        let _ = std::process::Command::new("rbd")
            .args(["rm", "--no-progress", &name])
            .output();
        rbd(&["create", "--size", &format!("{mib}M"), &name]);
        TestImage(name)
    }

    /// The image's id, as `rbd info` reports it.
    fn id(&self) -> String {
        let info = rbd(&["info", "--format", "json", &self.0]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        v["id"].as_str().unwrap().to_owned()
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rbd")
            .args(["snap", "purge", "--no-progress", &self.0])
            .output();
        let _ = std::process::Command::new("rbd")
            .args(["rm", "--no-progress", &self.0])
            .output();
    }
}

/// One "host": its own Xenstore and daemon (a dom0 of its own).
struct Host {
    dir: tempfile::TempDir,
    _xenstored: tokio::process::Child,
    daemon: Option<tokio::process::Child>,
    xs: Client,
}

impl Host {
    async fn new() -> Host {
        Host::with_config("").await
    }

    /// A host whose daemon reads `config` (its configuration file's text).
    async fn with_config(config: &str) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("xenstored.sock");
        let xenstored = blkbackd()
            .arg("xenstored")
            .arg("--socket")
            .arg(&socket)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let xs = wait_socket(&socket).await;
        std::fs::write(dir.path().join("blkbackd.toml"), config).unwrap();
        let daemon = Host::daemon_in(dir.path());
        Host {
            dir,
            _xenstored: xenstored,
            daemon: Some(daemon),
            xs,
        }
    }

    /// Host A of the lock tests: serving `params` to domain 6, whose guest
    /// verifies until killed; returned once connected.
    async fn serving(params: &str) -> (Host, tokio::process::Child) {
        let a = Host::new().await;
        a.attach(6, params, true).await.unwrap();
        let guest = a.guest(6, "verify", 1_000_000);
        blkbackd::attach::wait_value(&a.xs, &format!("{}/state", a.be(6)), "4")
            .await
            .unwrap();
        (a, guest)
    }

    /// Domain `domid`'s vbd is waiting to connect (InitWait), not served.
    async fn assert_unserved(&self, domid: u16, why: &str) {
        assert_eq!(
            self.xs
                .read_string(&format!("{}/state", self.be(domid)))
                .await
                .unwrap(),
            "2",
            "{why}: {}",
            self.log()
        );
    }

    async fn home(&self, domid: u16) -> xenstore::DomId {
        common::new_domain(&self.xs, domid).await
    }

    async fn attach(&self, domid: u16, params: &str, writable: bool) -> Result<(), String> {
        let d = self.home(domid).await;
        blkbackd::attach::attach(&self.xs, d, DEVID, params, writable)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    async fn detach(&self, domid: u16) {
        blkbackd::attach::detach(&self.xs, xenstore::DomId(domid), DEVID)
            .await
            .unwrap();
    }

    fn guest(&self, domid: u16, mode: &str, ios: u32) -> tokio::process::Child {
        sim_guest(self.dir.path(), domid, mode, ios)
    }

    fn daemon_in(dir: &std::path::Path) -> tokio::process::Child {
        sim_daemon_command(dir, "daemon.log")
            .env("BLKBACKD_CONFIG", dir.join("blkbackd.toml"))
            .spawn()
            .unwrap()
    }

    /// Starts its daemon again (after a stop or a crash), logging anew.
    fn restart(&mut self) {
        self.daemon = Some(Host::daemon_in(self.dir.path()));
    }

    async fn guest_report(&self, domid: u16, mode: &str, ios: u32) -> String {
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            self.guest(domid, mode, ios).wait_with_output(),
        )
        .await
        .expect("the guest did not finish in 120 s")
        .unwrap();
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "guest: {report} {}", self.log());
        report
    }

    fn be(&self, domid: u16) -> String {
        blkbackd::xenbus::backend_path(xenstore::DomId(domid), DEVID)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    async fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            signal(&d, "TERM");
            exits_cleanly(&mut d).await;
        }
    }
}

/// The embedded default serves a simulated guest from an RBD image: every
/// size of read and write verified byte for byte, flushes and discards
/// through librbd; the data is in the image afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rbd_image_is_served_byte_exact_with_flush_and_discard() {
    if !tier::need(Tier::Ceph) {
        return;
    }
    let img = TestImage::new("exact", 64);
    let mut host = Host::new().await;
    host.attach(6, &format!("rbd:{}", img.0), true)
        .await
        .unwrap();
    let be = host.be(6);
    assert_eq!(
        host.xs
            .read_string(&format!("{be}/rbd-image"))
            .await
            .unwrap(),
        img.0
    );
    assert_eq!(
        host.xs
            .read_string(&format!("{be}/rbd-image-id"))
            .await
            .unwrap(),
        img.id()
    );
    // While a guest is connected, `status` names the image, its id, the
    // client and its lock.
    // (1000 I/Os per lane: the guest is still at it when status looks.)
    let guest = host.guest(6, "verify", 1000);
    blkbackd::attach::wait_value(&host.xs, &format!("{be}/state"), "4")
        .await
        .unwrap();
    let out = blkbackd()
        .args(["status", "--json", "--socket"])
        .arg(
            host.dir
                .path()
                .join("sim")
                .join(blkbackd::status::SIM_SOCKET),
        )
        .env("XENSTORED_PATH", host.dir.path().join("xenstored.sock"))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let vbd = &v[0];
    assert_eq!(vbd["rbd_image"], img.0.as_str(), "{text}");
    assert_eq!(vbd["rbd"]["id"], img.id().as_str(), "{text}");
    assert_eq!(vbd["rbd"]["client"], "client.admin", "{text}");
    assert_eq!(vbd["rbd"]["lock_held"], true, "{text}");
    let owner = host
        .xs
        .read_string(&format!("{be}/rbd-lock-owner"))
        .await
        .unwrap();
    assert_eq!(vbd["rbd"]["lock_owner"], owner.as_str(), "{text}");
    assert_eq!(vbd["engine"], "librbd", "{text}");
    // The guest verifies every size, flushes and discards.
    let out = tokio::time::timeout(Duration::from_secs(300), guest.wait_with_output())
        .await
        .expect("the guest did not finish in 300 s")
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("SIM-GUEST PASS") && report.contains("verified ios="),
        "{report}"
    );
    assert!(host.log().contains("RBD image opened"), "{}", host.log());
    host.detach(6).await;
    host.stop().await;
    // What the guest wrote is in the image (read by another client).
    let export = tempfile::NamedTempFile::new().unwrap();
    let path = export.path().to_str().unwrap().to_owned();
    std::fs::remove_file(&path).unwrap();
    rbd(&["export", "--no-progress", &img.0, &path]);
    let data = std::fs::read(&path).unwrap();
    assert_eq!(data.len(), 64 << 20);
    assert!(
        data.iter().any(|&b| b != 0),
        "nothing the guest wrote reached the image"
    );
}

/// One writer across hosts. Host A serves an image. Host C, attaching it
/// too, is refused when its guest connects: its daemon waits for the lock
/// (`lock_wait_s`, 1 s here) and then fails the vbd with the reason. Host B
/// attaches it as a migration's destination does, while A still serves it:
/// its block script passes, its guest waits, unserved, and is served as soon
/// as A lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_host_is_refused_while_the_first_serves_and_served_after() {
    if !tier::need(Tier::Ceph) {
        return;
    }
    let img = TestImage::new("twohosts", 64);
    let params = format!("rbd:{}", img.0);
    let (mut a, mut guest_a) = Host::serving(&params).await;
    let mut b = Host::with_config("[rbd]\nlock_wait_s = 60\n").await;
    let mut c = Host::with_config("[rbd]\nlock_wait_s = 1\n").await;

    // C: refused with a clear error once its wait is over.
    c.attach(9, &params, true).await.unwrap();
    let mut c_guest = c.guest(9, "verify", 200);
    blkbackd::attach::wait_value(&c.xs, &format!("{}/state", c.be(9)), "5")
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", c.log()));
    let err =
        c.xs.read_string(&format!("{}/error", c.be(9)))
            .await
            .unwrap();
    assert!(
        err.contains("locked for writing by another client"),
        "{err}"
    );
    c_guest.kill().await.unwrap();

    // B: attached while A serves; its guest is not served...
    b.attach(7, &params, true)
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", b.log()));
    let b_guest = b.guest(7, "verify", 200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.assert_unserved(7, "host B connected a guest while host A holds the lock")
        .await;
    // ... until A lets go.
    guest_a.kill().await.unwrap();
    a.detach(6).await;
    let out = tokio::time::timeout(Duration::from_secs(120), b_guest.wait_with_output())
        .await
        .expect("B's guest did not finish")
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("SIM-GUEST PASS") && report.contains("verified ios="),
        "{report} {}",
        b.log()
    );
    b.detach(7).await;
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

/// A vbd waiting for the lock (`lock_wait_s` = 600 here) is still the
/// toolstack's: removed meanwhile, it closes at once, and it never takes
/// the lock later. Before, the removal waited out the whole lock wait (and
/// the toolstack gave up), and the lock was taken when the holder let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vbd_waiting_for_the_lock_is_removed_without_waiting() {
    if !tier::need(Tier::Ceph) {
        return;
    }
    let img = TestImage::new("waitremove", 64);
    let params = format!("rbd:{}", img.0);
    let (mut a, mut guest_a) = Host::serving(&params).await;
    let mut b = Host::with_config("[rbd]\nlock_wait_s = 600\n").await;
    let mut d = Host::with_config("[rbd]\nlock_wait_s = 5\n").await;

    b.attach(7, &params, true)
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", b.log()));
    let mut b_guest = b.guest(7, "verify", 200);
    // Its guest is Initialised and B waits for A's lock.
    blkbackd::attach::wait_value(
        &b.xs,
        &format!("/local/domain/7/device/vbd/{DEVID}/state"),
        "3",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.assert_unserved(7, "host B connected a guest while host A holds the lock")
        .await;
    let t = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(20), b.detach(7))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "removing a vbd that waits for the lock waited for it: {}",
                b.log()
            )
        });
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    b_guest.kill().await.unwrap();
    assert!(
        b.log().contains("gave up waiting for the RBD image's lock"),
        "{}",
        b.log()
    );

    // A lets go; B's daemon, still running, must not take the lock: a
    // third host that waits 5 s for it serves its guest.
    guest_a.kill().await.unwrap();
    a.detach(6).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    d.attach(8, &params, true).await.unwrap();
    let report = d.guest_report(8, "verify", 50).await;
    assert!(report.contains("verified ios="), "{report}");
    d.detach(8).await;
    a.stop().await;
    b.stop().await;
    d.stop().await;
}

/// An image grown with `rbd resize` while connected reaches the guest as
/// `sectors`, and its new end is read and written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grown_image_reaches_the_connected_guest() {
    if !tier::need(Tier::Ceph) {
        return;
    }
    let img = TestImage::new("grow", 32);
    let mut host = Host::new().await;
    host.attach(6, &format!("rbd:{}", img.0), true)
        .await
        .unwrap();
    let guest = host.guest(6, "resize", 1);
    blkbackd::attach::wait_value(&host.xs, &format!("{}/state", host.be(6)), "4")
        .await
        .unwrap();
    rbd(&["resize", "--no-progress", "--size", "48M", &img.0]);
    let out = tokio::time::timeout(Duration::from_secs(60), guest.wait_with_output())
        .await
        .expect("the guest never saw the new size")
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("resized from 65536 to 98304 sectors; the new end reads back"),
        "{report} {}",
        host.log()
    );
    host.detach(6).await;
    host.stop().await;
}

/// A snapshot is served read-only (a write is refused to the guest, and
/// `mode=w` is refused at attach); the image it was taken of is checked by
/// id: one deleted and recreated under the same name is not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_read_only_and_a_recreated_image_is_refused() {
    if !tier::need(Tier::Ceph) {
        return;
    }
    let img = TestImage::new("snap", 16);
    rbd(&["snap", "create", &format!("{}@s1", img.0)]);
    let mut host = Host::new().await;
    let snap = format!("rbd:{}@s1", img.0);
    let e = host.attach(6, &snap, true).await.unwrap_err();
    assert!(e.contains("a snapshot is read-only"), "{e}");
    host.attach(6, &snap, false).await.unwrap();
    let report = host.guest_report(6, "write-read-only", 1).await;
    assert!(
        report.contains("write refused, reads still served"),
        "{report}"
    );
    host.detach(6).await;

    // Published, then the image is replaced under its name before the
    // daemon opens it.
    let d = host.home(9).await;
    let params = format!("rbd:{}", img.0);
    let paths = blkbackd::xenbus::toolstack::create_vbd(&host.xs, d, DEVID, &params, "w")
        .await
        .unwrap();
    let old_id = img.id();
    rbd(&["snap", "purge", "--no-progress", &img.0]);
    rbd(&["rm", "--no-progress", &img.0]);
    rbd(&["create", "--size", "16M", &img.0]);
    let published =
        blkbackd::xenbus::Published::Rbd(blkbackd::rbd::Spec::parse(&img.0).unwrap(), old_id);
    published
        .write(&host.xs, &paths.backend, None)
        .await
        .unwrap();
    host.xs
        .write(&format!("{}/hotplug-status", paths.backend), "connected")
        .await
        .unwrap();
    blkbackd::attach::wait_value(&host.xs, &format!("{}/state", paths.backend), "5")
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", host.log()));
    let err = host
        .xs
        .read_string(&format!("{}/error", paths.backend))
        .await
        .unwrap();
    assert!(err.contains("deleted and recreated"), "{err}");
    host.stop().await;
}

/// Clear failures at attach, each leaving no vbd behind: a missing image,
/// a missing pool, an image without exclusive-lock written, bad names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rbd_disks_fail_attach_clearly() {
    if !tier::need(Tier::Ceph) {
        return;
    }
    let nolock = format!("rbd/t{}-nolock", std::process::id());
    let _ = std::process::Command::new("rbd")
        .args(["rm", &nolock])
        .output();
    rbd(&[
        "create",
        "--size",
        "8M",
        "--image-feature",
        "layering",
        &nolock,
    ]);
    let _cleanup = TestImage(nolock.clone());
    let mut host = Host::new().await;
    let cases = [
        (
            "rbd:rbd/no-such-image",
            true,
            "image rbd/no-such-image: No such file",
        ),
        ("rbd:nopool/img", true, "pool nopool"),
        (
            &*format!("rbd:{nolock}"),
            true,
            "has no exclusive-lock feature",
        ),
        ("rbd:rbd", true, "an RBD image is POOL/IMAGE"),
        ("rbd:rbd/a b", true, "without spaces"),
    ];
    for (i, (params, w, want)) in cases.iter().enumerate() {
        let domid = 10 + i as u16;
        let e = host.attach(domid, params, *w).await.unwrap_err();
        assert!(e.contains(want), "{params}: {e}");
        assert_eq!(host.xs.try_read(&host.be(domid)).await.unwrap(), None);
    }
    // Without the lock feature it is still served read-only.
    host.attach(20, &format!("rbd:{nolock}"), false)
        .await
        .unwrap();
    host.detach(20).await;
    host.stop().await;
}

/// `ceph ARGS` against the test cluster; its stdout.
fn ceph(args: &[&str]) -> String {
    cli("ceph", args)
}

/// The cluster fences the daemon's client (`ceph osd blocklist add`, as
/// after a network partition or a lock broken by another host): the guest
/// it served loses its disk, and a vbd attached afterwards is served all
/// the same, by a new client (one client per process until then: every
/// later `rbd:` vbd failed until the daemon restarted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocklisted_client_is_replaced_for_the_next_vbd() {
    if !tier::need(Tier::Ceph) {
        return;
    }
    let first = TestImage::new("fenced", 16);
    let second = TestImage::new("after", 16);
    let (host, mut guest) = Host::serving(&format!("rbd:{}", first.0)).await;
    // The daemon's client, as the image's watcher.
    let status = rbd(&["status", "--format", "json", &first.0]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let addr = v["watchers"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no watcher: {status}"))
        .to_owned();
    ceph(&["osd", "blocklist", "add", &addr]);
    struct Unblock(String);
    impl Drop for Unblock {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ceph")
                .args(["osd", "blocklist", "rm", &self.0])
                .output();
        }
    }
    let _unblock = Unblock(addr);
    // The fenced guest's I/O fails: its verify loop ends, not passing.
    let out = tokio::time::timeout(Duration::from_secs(120), guest.wait())
        .await
        .expect("the fenced guest went on");
    assert!(!out.unwrap().success());
    // A new vbd, another image: served and verified.
    host.attach(7, &format!("rbd:{}", second.0), true)
        .await
        .unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        host.guest(7, "verify", 40).wait_with_output(),
    )
    .await
    .expect("the guest did not finish in 300 s")
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("SIM-GUEST PASS"),
        "{report}\n{}",
        host.log()
    );
    assert!(
        host.log().contains("blocklisted this client"),
        "{}",
        host.log()
    );
}

/// An RBD namespace (`rbd namespace create`), removed when dropped (after
/// the images in it: declare it first).
struct TestNamespace(String);

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rbd")
            .args(["namespace", "remove", &self.0])
            .output();
    }
}

/// `rbd:POOL/NAMESPACE/IMAGE` serves the image in that namespace, not its
/// namesake in the pool's default namespace: the id published is the
/// namespaced image's, what the guest writes lands there only, and a
/// namespace that does not exist fails the attach clearly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_in_a_namespace_is_served_apart_from_its_namesake() {
    if !tier::need(Tier::Ceph) {
        return;
    }
    let ns = format!("rbd/t{}-ns", std::process::id());
    let _ = std::process::Command::new("rbd")
        .args(["namespace", "remove", &ns])
        .output();
    rbd(&["namespace", "create", &ns]);
    let _ns = TestNamespace(ns.clone());
    // The same image name in the default namespace and in `ns`.
    let plain = TestImage::new("same", 16);
    let name = plain.0.rsplit('/').next().unwrap().to_owned();
    let inner = TestImage(format!("{ns}/{name}"));
    rbd(&["create", "--size", "16M", &inner.0]);
    assert_ne!(inner.id(), plain.id());
    let mut host = Host::new().await;
    host.attach(6, &format!("rbd:{}", inner.0), true)
        .await
        .unwrap();
    let be = host.be(6);
    let published = |k: &'static str| {
        let xs = &host.xs;
        let be = be.clone();
        async move { xs.read_string(&format!("{be}/{k}")).await.unwrap() }
    };
    assert_eq!(published("rbd-image").await, inner.0);
    assert_eq!(published("rbd-image-id").await, inner.id());
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        host.guest(6, "verify", 40).wait_with_output(),
    )
    .await
    .expect("the guest did not finish in 300 s")
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("SIM-GUEST PASS"), "{report}");
    host.detach(6).await;
    // A namespace that does not exist: the image is not found.
    let e = host
        .attach(
            7,
            &format!("rbd:rbd/t{}-nons/{name}", std::process::id()),
            true,
        )
        .await
        .unwrap_err();
    assert!(e.contains("No such file"), "{e}");
    host.stop().await;
    let written = |image: &str| {
        let export = tempfile::NamedTempFile::new().unwrap();
        let path = export.path().to_str().unwrap().to_owned();
        std::fs::remove_file(&path).unwrap();
        rbd(&["export", "--no-progress", image, &path]);
        std::fs::read(&path).unwrap().iter().any(|&b| b != 0)
    };
    assert!(written(&inner.0), "nothing reached the namespaced image");
    assert!(!written(&plain.0), "the guest wrote its namesake");
}

/// The declarations `src/rbd/ffi.rs` loads by name match librbd's and
/// librados's headers (a C program assigns each function to a pointer of
/// ffi.rs's type, under -Werror), and so do the constants it uses.
#[test]
fn ffi_declarations_match_the_headers() {
    if !tier::need(Tier::Headers("rbd/librbd.h")) {
        return;
    }
    let v = cprobe::c_values("rbd_abi", &["-Werror", "-lrbd", "-lrados"], "librbd-dev");
    assert_eq!(v["functions"], 31);
    assert_eq!(
        v["RBD_LOCK_MODE_EXCLUSIVE"],
        i64::from(blkbackd::rbd::ffi::LOCK_MODE_EXCLUSIVE)
    );
    assert_eq!(
        v["RBD_FEATURE_EXCLUSIVE_LOCK"] as u64,
        blkbackd::rbd::ffi::FEATURE_EXCLUSIVE_LOCK
    );
    // ffi.rs passes the mode as a C int.
    assert_eq!(v["rbd_lock_mode_t"], 4);
    // ... and loads the very functions the C program linked.
    assert!(blkbackd::rbd::ffi::lib().is_ok());
}

/// A restart under I/O (SIGTERM, as `systemctl restart` and every upgrade
/// do; SIGKILL, as a crash does): the next daemon adopts the connected
/// device, opens the image again and takes its lock back (after a crash,
/// from the dead client), and the guest gets every byte back.
async fn restart_under_io(kill: bool) {
    let img = TestImage::new(if kill { "kill" } else { "term" }, 64);
    let mut host = Host::new().await;
    host.attach(6, &format!("rbd:{}", img.0), true)
        .await
        .unwrap();
    let guest = host.guest(6, "verify", 300);
    let fe = "/local/domain/6/device/vbd/51712/state";
    blkbackd::attach::wait_value(&host.xs, fe, "4")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut first = host.daemon.take().unwrap();
    if kill {
        first.kill().await.unwrap();
    } else {
        signal(&first, "TERM");
        exits_cleanly(&mut first).await;
    }
    std::fs::rename(
        host.dir.path().join("daemon.log"),
        host.dir.path().join("first.log"),
    )
    .unwrap();
    host.restart();
    let out = tokio::time::timeout(Duration::from_secs(120), guest.wait_with_output())
        .await
        .expect("the guest did not finish in 120 s")
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("SIM-GUEST PASS") && report.contains("verified ios="),
        "{report} {}",
        host.log()
    );
    assert!(
        host.log().contains("adopting a connected device"),
        "{}",
        host.log()
    );
    // After a crash the dead daemon's lock is broken (and its client
    // blocklisted), not waited out; after a handover there is none to break.
    assert_eq!(
        host.log().contains("broke the previous daemon's lock"),
        kill,
        "{}",
        host.log()
    );
    println!("{}: {report}", if kill { "SIGKILL" } else { "SIGTERM" });
    host.detach(6).await;
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_an_rbd_disk_over_and_the_next_daemon_takes_its_lock() {
    if !tier::need(Tier::Ceph) {
        return;
    }
    restart_under_io(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_daemons_rbd_lock_is_taken_back_by_the_next() {
    if !tier::need(Tier::Ceph) {
        return;
    }
    restart_under_io(true).await;
}
