//! The daemon end to end on the embedded default, driven the way libxl drives
//! a backend: nodes in one transaction, InitWait within 10 s, the hotplug
//! script (the real binary), the guest in its own process, Closing answered
//! with Closed within 10 s, then the script's remove.

#[path = "common/tier.rs"]
mod tier;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tier::Tier;

use blkbackd::disk::loopdev::{self, LoopOptions};
use blkbackd::vbd::{lifecycle::VbdCtx, Offer};
use blkbackd::xen::sim::{SimEvtchn, SimGrants};
use blkbackd::xenbus::toolstack;
use tokio::sync::watch;
use xenstore::{Client, DomId, Endpoint, Server, Xs};

/// A process's success and what it printed (stdout, then stderr).
fn said(out: &std::process::Output) -> (bool, String) {
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

struct World {
    dir: tempfile::TempDir,
    server: Server,
    listening: xenstore::server::Listening,
    xs: Client,
    stop: watch::Sender<blkbackd::daemon::Stop>,
    daemon: tokio::task::JoinHandle<Result<(), xenstore::Error>>,
    live: blkbackd::status::Live,
}

async fn world() -> World {
    world_with(false).await
}

/// A world whose daemon serves disks published without diskseq if `allow`.
async fn world_with(allow_missing_diskseq: bool) -> World {
    world_full(allow_missing_diskseq, Vec::new()).await
}

/// A world whose daemon has the configuration's `[[limit]]` rules `limits`.
async fn world_full(
    allow_missing_diskseq: bool,
    limits: Vec<blkbackd::config::LimitRule>,
) -> World {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("blkbackd=debug")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::default();
    let listening = server
        .listen(dir.path().join("xenstore.sock"))
        .await
        .unwrap();
    let xs = Client::connect_to(&Endpoint::Socket(listening.path().into()))
        .await
        .unwrap();
    let live = blkbackd::status::Live::default();
    let ctx = Arc::new(VbdCtx {
        xs: xs.clone(),
        grants: Arc::new(SimGrants::new(dir.path(), DomId::DOM0)),
        evtchn: Arc::new(SimEvtchn::new(dir.path(), DomId::DOM0)),
        offer: std::sync::RwLock::new(Offer::default()),
        allow_missing_diskseq,
        live: live.clone(),
        limits: std::sync::RwLock::new(Arc::new(limits)),
    });
    let (stop, rx) = watch::channel(blkbackd::daemon::Stop::Run);
    let daemon = tokio::spawn(blkbackd::daemon::run(ctx, rx));
    World {
        dir,
        server,
        listening,
        xs,
        stop,
        daemon,
        live,
    }
}

impl World {
    fn image(&self, name: &str, mib: usize) -> String {
        let p = self.dir.path().join(name);
        std::fs::File::create(&p)
            .unwrap()
            .write_all(&vec![0u8; mib << 20])
            .unwrap();
        p.display().to_string()
    }

    async fn vbd(&self, domid: u16, params: &str) -> toolstack::VbdPaths {
        self.server.introduce(DomId(domid));
        toolstack::create_domain_home(&self.xs, DomId(domid))
            .await
            .unwrap();
        toolstack::create_vbd(&self.xs, DomId(domid), 51712, params, "w")
            .await
            .unwrap()
    }

    async fn read(&self, path: &str) -> Option<String> {
        self.xs
            .try_read(path)
            .await
            .unwrap()
            .map(|v| String::from_utf8(v).unwrap())
    }

    /// Waits (by polling; bounded) until `path` reads `want`.
    async fn wait_for(&self, path: &str, want: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.read(path).await.as_deref() == Some(want) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{path} is {:?}, not {want:?}, after {within:?} (error: {:?})",
                    self.read(path).await,
                    self.read(&format!("{}/error", path.rsplit_once('/').unwrap().0))
                        .await
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Publishes `keys` in the backend directory `be` in one transaction, as
    /// a block script would, and expects the daemon to refuse the disk:
    /// Closing, `opened` still 0. Returns the `error` node.
    async fn refused(&self, be: &str, keys: [(&'static str, String); 2]) -> String {
        self.xs
            .transaction(|tx| {
                let (be, keys) = (be.to_owned(), keys.clone());
                async move {
                    for (k, v) in &keys {
                        tx.write(&format!("{be}/{k}"), v).await?;
                    }
                    Ok(())
                }
            })
            .await
            .unwrap();
        self.wait_for(&format!("{be}/state"), "5", Duration::from_secs(10))
            .await;
        assert_eq!(
            self.read(&format!("{be}/opened")).await.as_deref(),
            Some("0")
        );
        self.read(&format!("{be}/error")).await.unwrap()
    }

    /// The vbd at `be` through InitWait, the block script's `add` (which
    /// must succeed) and the daemon's `opened`.
    async fn added(&self, be: &str, domid: u16) {
        self.wait_for(&format!("{be}/state"), "2", Duration::from_secs(10))
            .await;
        let out = self.hotplug("add", domid).await;
        assert!(out.status.success(), "{out:?}");
        self.wait_for(&format!("{be}/opened"), "1", Duration::from_secs(10))
            .await;
    }

    /// A vbd of `domid` on a new `mib` MiB image file `name`, added by the
    /// block script and opened by the daemon (InitWait, disk published).
    async fn file_vbd(&self, domid: u16, name: &str, mib: usize) -> toolstack::VbdPaths {
        let img = self.image(name, mib);
        let p = self.vbd(domid, &format!("file:{img}")).await;
        self.added(&p.backend, domid).await;
        p
    }

    /// `blkbackd ARGS` against this world's Xenstore: (success, stdout+stderr).
    async fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_blkbackd"))
            .args(args)
            .env("XENSTORED_PATH", self.listening.path())
            .output()
            .await
            .unwrap();
        said(&out)
    }

    async fn hotplug(&self, action: &str, domid: u16) -> std::process::Output {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_blkbackd"))
            .args(["hotplug", action])
            .env("XENBUS_PATH", format!("backend/vbd/{domid}/51712"))
            .env("XENSTORED_PATH", self.listening.path())
            .output()
            .await
            .unwrap()
    }

    async fn guest(&self, domid: u16, mode: &str) -> (bool, String) {
        self.guest_with(domid, mode, &[]).await
    }

    /// [`World::guest`] with more arguments for the sim guest.
    async fn guest_with(&self, domid: u16, mode: &str, extra: &[&str]) -> (bool, String) {
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_blkbackd"))
                .args(["sim-guest", "--mode", mode, "--ios", "20"])
                .args(extra)
                .args(["--domid", &domid.to_string()])
                .arg("--dir")
                .arg(self.dir.path())
                .arg("--xenstore")
                .arg(self.listening.path())
                .output(),
        )
        .await
        .expect("guest hung")
        .unwrap();
        said(&out)
    }

    /// libxl's removal: online=0 and Closing in one transaction, then Closed
    /// within 10 s, then the script's remove and the directories deleted.
    async fn detach(&self, domid: u16, p: &toolstack::VbdPaths) {
        self.close(&p.backend).await;
        self.remove(domid, p).await;
    }

    /// The first half of libxl's removal: online=0 and Closing in one
    /// transaction, then Closed within 10 s.
    async fn close(&self, be: &str) {
        self.xs
            .transaction(|tx| {
                let be = be.to_owned();
                async move {
                    tx.write(&format!("{be}/online"), "0").await?;
                    tx.write(&format!("{be}/state"), "5").await
                }
            })
            .await
            .unwrap();
        self.wait_for(&format!("{be}/state"), "6", Duration::from_secs(10))
            .await;
    }

    /// The second half: the script's remove, then the directories deleted.
    async fn remove(&self, domid: u16, p: &toolstack::VbdPaths) {
        let out = self.hotplug("remove", domid).await;
        assert!(out.status.success(), "{out:?}");
        self.xs.rm(&p.backend).await.unwrap();
        self.xs.rm(&p.frontend).await.unwrap();
    }

    async fn finish(self) {
        let _ = self.stop.send(blkbackd::daemon::Stop::Close);
        tokio::time::timeout(Duration::from_secs(20), self.daemon)
            .await
            .expect("daemon did not stop")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vbd_goes_from_creation_to_removal_as_libxl_expects() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let w = world().await;
    let img = w.image("guest.img", 16);
    let p = w.vbd(2, &format!("file:{img}")).await;
    let be = &p.backend;
    // InitWait at once (libxl gives 10 s), before any disk exists.
    w.wait_for(&format!("{be}/state"), "2", Duration::from_secs(10))
        .await;
    assert_eq!(w.read(&format!("{be}/opened")).await.as_deref(), Some("0"));
    assert_eq!(
        w.read(&format!("{be}/feature-max-indirect-segments"))
            .await
            .as_deref(),
        Some("256")
    );
    // The hotplug script: the daemon opens the disk by diskseq, says so.
    let out = w.hotplug("add", 2).await;
    assert!(out.status.success(), "{out:?}");
    w.wait_for(&format!("{be}/opened"), "1", Duration::from_secs(10))
        .await;
    assert_eq!(
        w.read(&format!("{be}/sectors")).await.as_deref(),
        Some("32768")
    );
    // The guest connects and gets its data back.
    let (ok, text) = w.guest(2, "verify").await;
    assert!(ok, "{text}");
    assert_eq!(w.read(&format!("{be}/state")).await.as_deref(), Some("4"));
    // `blkbackd status` gets per-ring counters from the daemon's socket.
    let sock = w.dir.path().join(blkbackd::status::SIM_SOCKET);
    tokio::spawn(w.live.clone().serve(sock.clone(), None));
    let mut counters = None;
    for _ in 0..100 {
        counters = blkbackd::status::fetch(&sock).await;
        if counters.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let counters = counters.expect("the status socket never answered");
    let mut vbds = blkbackd::status::collect(&w.xs).await.unwrap();
    blkbackd::status::merge(&mut vbds, &counters);
    let v = vbds.iter().find(|v| v.domid == "2").unwrap();
    assert!(!v.rings.is_empty(), "no rings in {counters:?}");
    let ok_total: u64 = v.rings.iter().map(|r| r.ok).sum();
    let writes: u64 = v.rings.iter().map(|r| r.writes).sum();
    assert!(ok_total > 100 && writes > 0, "{:?}", v.rings);
    assert!(
        v.engine.as_deref().unwrap_or("").starts_with("io_uring"),
        "{:?}",
        v.engine
    );
    // Every answered read and write was timed in its own histogram, and
    // the counts came through the socket's JSON bucket by bucket.
    let mut lat = blkbackd::vbd::queue::Latencies::default();
    for r in &v.rings {
        lat.merge(&r.latency);
    }
    let reads: u64 = v.rings.iter().map(|r| r.reads).sum();
    assert_eq!(lat.read.count(), reads, "{lat:?}");
    assert_eq!(lat.write.count(), writes, "{lat:?}");
    assert_eq!(lat.all().count(), ok_total, "{lat:?}");
    let table = blkbackd::status::table(&vbds);
    assert!(
        table.contains("ring 0:") && table.contains("notifications out"),
        "{table}"
    );
    let line = table
        .lines()
        .find(|l| l.contains("p50/p99/p99.9"))
        .unwrap_or_else(|| panic!("no latency line in {table}"));
    assert!(
        line.contains("read ") && line.contains(&format!("({writes})")),
        "{line}"
    );
    w.detach(2, &p).await;
    assert!(
        w.live.snapshot().is_empty(),
        "a closed vbd still has counters"
    );
    assert!(
        std::fs::read(&img).unwrap().iter().any(|&b| b != 0),
        "the guest's writes are in the file"
    );
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diskseq_that_does_not_match_is_refused_with_an_error_node() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let w = world().await;
    let img = w.image("other.img", 1);
    let dev = loopdev::attach(Path::new(&img), &LoopOptions::default()).unwrap();
    let p = w.vbd(3, "phy:/dev/whatever").await;
    let be = &p.backend;
    w.wait_for(&format!("{be}/state"), "2", Duration::from_secs(10))
        .await;
    // A script publishing the right device number with a stale diskseq.
    let stale = format!("{:x}", dev.id.diskseq - 1);
    let err = w
        .refused(
            be,
            [
                ("physical-device", dev.id.physical_device()),
                ("diskseq", stale),
            ],
        )
        .await;
    assert!(err.contains("released and the number reused"), "{err}");
    dev.release().unwrap();
    w.finish().await;
}

/// A script that publishes `physical-device` without `diskseq` (and says it
/// is done): refused by default, with the reason; served by number alone
/// when the operator allowed it (`--allow-missing-diskseq`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_without_diskseq_is_refused_unless_the_operator_allowed_it() {
    if !tier::need(Tier::Loop) {
        return;
    }
    for allow in [false, true] {
        let w = world_with(allow).await;
        let img = w.image("nodiskseq.img", 1);
        let dev = loopdev::attach(Path::new(&img), &LoopOptions::default()).unwrap();
        let p = w.vbd(4, "phy:/dev/whatever").await;
        let be = &p.backend;
        w.wait_for(&format!("{be}/state"), "2", Duration::from_secs(10))
            .await;
        let published = [
            ("physical-device", dev.id.physical_device()),
            ("hotplug-status", "connected".to_owned()),
        ];
        if allow {
            for (k, v) in &published {
                w.xs.write(&format!("{be}/{k}"), v).await.unwrap();
            }
            w.wait_for(&format!("{be}/opened"), "1", Duration::from_secs(10))
                .await;
            assert_eq!(w.read(&format!("{be}/error")).await, None);
        } else {
            let err = w.refused(be, published).await;
            assert!(err.contains("without diskseq"), "{err}");
        }
        if allow {
            w.close(be).await; // lets go of the disk before the release
        }
        dev.release().unwrap();
        w.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_file_is_served_directly_and_a_replaced_one_is_refused() {
    let w = world().await;
    // direct:PATH: no loop device; the guest's data lands in the file.
    let img = w.image("direct.img", 16);
    let p = w.vbd(11, &format!("direct:{img}")).await;
    let be = &p.backend;
    w.wait_for(&format!("{be}/state"), "2", Duration::from_secs(10))
        .await;
    let out = w.hotplug("add", 11).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        w.read(&format!("{be}/physical-file")).await,
        Some(img.clone())
    );
    assert!(w.read(&format!("{be}/physical-device")).await.is_none());
    w.wait_for(&format!("{be}/opened"), "1", Duration::from_secs(10))
        .await;
    let (ok, text) = w.guest(11, "verify").await;
    assert!(ok, "{text}");
    let data = std::fs::read(&img).unwrap();
    assert!(
        data.iter().any(|&b| b != 0),
        "the guest's writes are not in the file"
    );
    w.detach(11, &p).await;
    assert!(
        Path::new(&img).exists(),
        "remove must not touch a direct file"
    );

    // A script's identity that no longer matches what the path names (the
    // file was replaced after it published): refused, never served.
    let img2 = w.image("replaced.img", 1);
    let (_f, id) = blkbackd::disk::identify_file(Path::new(&img2), true).unwrap();
    let fresh = w.image("fresh.img", 1);
    std::fs::rename(&fresh, &img2).unwrap();
    let p = w.vbd(12, &format!("direct:{img2}")).await;
    let be = &p.backend;
    w.wait_for(&format!("{be}/state"), "2", Duration::from_secs(10))
        .await;
    let err = w
        .refused(
            be,
            [("physical-file", img2.clone()), ("file-id", id.to_string())],
        )
        .await;
    assert!(err.contains("the file was replaced"), "{err}");
    assert!(err.contains(&id.to_string()), "{err}");
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frontend_that_closes_and_comes_back_is_served_again() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let w = world().await;
    let img = w.image("re.img", 16);
    let p = w.vbd(4, &format!("file:{img}")).await;
    let (be, fe) = (&p.backend, &p.frontend);
    w.wait_for(&format!("{be}/state"), "2", Duration::from_secs(10))
        .await;
    assert!(w.hotplug("add", 4).await.status.success());
    let (ok, text) = w.guest(4, "verify").await;
    assert!(ok, "{text}");
    // blkfront closing (e.g. before migration or a driver reload).
    w.xs.write(&format!("{fe}/state"), "5").await.unwrap();
    w.wait_for(&format!("{be}/state"), "5", Duration::from_secs(10))
        .await;
    w.xs.write(&format!("{fe}/state"), "6").await.unwrap();
    w.wait_for(&format!("{be}/state"), "6", Duration::from_secs(10))
        .await;
    // It comes back: Initialising, then a fresh connection.
    w.xs.write(&format!("{fe}/state"), "1").await.unwrap();
    w.wait_for(&format!("{be}/state"), "2", Duration::from_secs(10))
        .await;
    let (ok, text) = w.guest(4, "verify").await;
    assert!(ok, "second connection: {text}");
    w.detach(4, &p).await;
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_domains_vbds_are_closed_and_their_disks_let_go() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let w = world().await;
    let img = w.image("gone.img", 4);
    let p = w.vbd(5, &format!("file:{img}")).await;
    w.wait_for(
        &format!("{}/state", p.backend),
        "2",
        Duration::from_secs(10),
    )
    .await;
    assert!(w.hotplug("add", 5).await.status.success());
    w.wait_for(
        &format!("{}/opened", p.backend),
        "1",
        Duration::from_secs(10),
    )
    .await;
    w.server.release(DomId(5));
    // Its device is closed and its disk let go at once...
    w.wait_for(
        &format!("{}/state", p.backend),
        "6",
        Duration::from_secs(10),
    )
    .await;
    // ...so the toolstack's cleanup still works: the script releases the loop
    // device it made (this fails if the daemon still held the disk).
    let out = w.hotplug("remove", 5).await;
    assert!(out.status.success(), "{out:?}");
    let id = blkbackd::disk::DiskId {
        major: 7,
        minor: u32::from_str_radix(
            w.read(&format!("{}/physical-device", p.backend))
                .await
                .unwrap()
                .split(':')
                .nth(1)
                .unwrap(),
            16,
        )
        .unwrap(),
        diskseq: u64::from_str_radix(
            &w.read(&format!("{}/diskseq", p.backend)).await.unwrap(),
            16,
        )
        .unwrap(),
    };
    assert!(
        blkbackd::disk::open_by_diskseq(id, false).is_err(),
        "loop device released"
    );
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grown_disk_is_announced_to_the_connected_guest() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let w = world().await;
    let img = w.image("grow.img", 16);
    let p = w.vbd(6, &format!("file:{img}")).await;
    let be = &p.backend;
    w.wait_for(&format!("{be}/state"), "2", Duration::from_secs(10))
        .await;
    assert!(w.hotplug("add", 6).await.status.success());
    w.wait_for(&format!("{be}/opened"), "1", Duration::from_secs(10))
        .await;
    let guest = tokio::process::Command::new(env!("CARGO_BIN_EXE_blkbackd"))
        .args(["sim-guest", "--mode", "resize", "--domid", "6"])
        .arg("--dir")
        .arg(w.dir.path())
        .arg("--xenstore")
        .arg(w.listening.path())
        .output();
    let grow = async {
        w.wait_for(
            &format!("{}/state", p.frontend),
            "4",
            Duration::from_secs(30),
        )
        .await;
        // The operator grows the file and refreshes the loop device.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let (major, minor) = blkbackd::disk::parse_physical_device(
            w.read(&format!("{be}/physical-device"))
                .await
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
        let diskseq = blkbackd::disk::parse_diskseq(
            w.read(&format!("{be}/diskseq")).await.unwrap().as_bytes(),
        )
        .unwrap();
        loopdev::refresh_capacity_of(blkbackd::disk::DiskId {
            major,
            minor,
            diskseq,
        })
        .unwrap();
    };
    let (out, ()) = tokio::join!(guest, grow);
    let out = out.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("resized from 32768 to 65536 sectors"),
        "{text}"
    );
    assert_eq!(
        w.read(&format!("{be}/sectors")).await.as_deref(),
        Some("65536")
    );
    w.detach(6, &p).await;
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_and_detach_commands_do_what_libxl_does() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let w = world().await;
    let img = w.image("cli.img", 16);
    w.server.introduce(DomId(7));
    toolstack::create_domain_home(&w.xs, DomId(7))
        .await
        .unwrap();
    let cli = |args: Vec<String>| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_blkbackd"))
            .args(args)
            .env("XENSTORED_PATH", w.listening.path())
            .output()
    };
    let out = cli(vec![
        "attach".into(),
        "--domid".into(),
        "7".into(),
        "--vdev".into(),
        "xvdb".into(),
        "--params".into(),
        format!("file:{img}"),
    ])
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let be = "/local/domain/0/backend/vbd/7/51728";
    w.wait_for(&format!("{be}/opened"), "1", Duration::from_secs(10))
        .await;
    // Frontend nodes belong to the guest, backend nodes to dom0 (read for the guest).
    let perms = w.xs.get_perms(be).await.unwrap();
    assert_eq!(perms[0].domid, DomId(0));
    let fe_perms =
        w.xs.get_perms("/local/domain/7/device/vbd/51728")
            .await
            .unwrap();
    assert_eq!(fe_perms[0].domid, DomId(7));
    let out = cli(vec![
        "detach".into(),
        "--domid".into(),
        "7".into(),
        "--vdev".into(),
        "xvdb".into(),
    ])
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(w.read(be).await.is_none());
    assert!(w.read("/local/domain/7/device/vbd/51728").await.is_none());
    w.finish().await;
}

/// Runs a command, panicking with its output if it fails.
fn run(cmd: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
}

/// Writes answered so far by every ring of the vbd at `be`.
fn writes_answered(w: &World, be: &str) -> u64 {
    w.live
        .snapshot()
        .get(be)
        .map(|c| c.rings.iter().map(|r| r.writes).sum())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_toolstack_removes_a_vbd_within_its_timeout_even_when_the_disk_hangs() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let w = world().await;
    // The guest's image on a small ext4 file system of its own; freezing that
    // file system makes every write to the image hang in the kernel, as dead
    // storage does (the loop device's writes block in sb_start_write).
    let fs_img = w.image("fs.img", 48);
    run("mkfs.ext4", &["-q", "-F", &fs_img]);
    let mnt = w.dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mnt_s = mnt.display().to_string();
    run("mount", &["-o", "loop", &fs_img, &mnt_s]);
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::process::Command::new("fsfreeze")
                .args(["-u", &self.0])
                .output();
            let _ = std::process::Command::new("umount")
                .args(["-d", &self.0])
                .output();
        }
    }
    let cleanup = Cleanup(mnt_s.clone());
    let img = mnt.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();

    let p = w.vbd(13, &format!("file:{}", img.display())).await;
    let be = p.backend.clone();
    w.wait_for(&format!("{be}/state"), "2", Duration::from_secs(10))
        .await;
    assert!(w.hotplug("add", 13).await.status.success());
    w.wait_for(&format!("{be}/opened"), "1", Duration::from_secs(10))
        .await;
    // A guest writing as fast as it can, 8 requests in flight.
    let mut guest = tokio::process::Command::new(env!("CARGO_BIN_EXE_blkbackd"))
        .args(["sim-guest", "--mode", "bench", "--domid", "13"])
        .args(["--bench", "randwrite:65536:8:60"])
        .arg("--dir")
        .arg(w.dir.path())
        .arg("--xenstore")
        .arg(w.listening.path())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    w.wait_for(
        &format!("{}/state", p.frontend),
        "4",
        Duration::from_secs(30),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while writes_answered(&w, &be) < 50 {
        assert!(tokio::time::Instant::now() < deadline, "no writes served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The storage dies: writes stop completing.
    run("fsfreeze", &["-f", &mnt_s]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = writes_answered(&w, &be);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        writes_answered(&w, &be),
        before,
        "writes still completing: the disk is not hung"
    );

    // libxl removes the device: Closed within its 10 s all the same.
    let t0 = std::time::Instant::now();
    w.close(&be).await;
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(10), "Closed after {took:?}");

    // The storage comes back; the script's remove releases the loop device
    // and the daemon is still serving (a new vbd works).
    guest.kill().await.unwrap();
    run("fsfreeze", &["-u", &mnt_s]);
    w.remove(13, &p).await;
    let other = w.image("after.img", 16);
    let q = w.vbd(14, &format!("file:{other}")).await;
    w.wait_for(
        &format!("{}/state", q.backend),
        "2",
        Duration::from_secs(10),
    )
    .await;
    assert!(w.hotplug("add", 14).await.status.success());
    let (ok, text) = w.guest(14, "verify").await;
    assert!(ok, "{text}");
    w.detach(14, &q).await;
    drop(cleanup);
    w.finish().await;
}

/// `blkbackd status | grep -q ...` (as scenario 01 does) or `| head`: a
/// reader that stops early gets what it read; the command neither panics
/// nor fails (it used to panic with "failed printing to stdout").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_to_a_reader_that_stopped_early_is_no_failure() {
    let w = world().await;
    for json in [true, false] {
        let (r, wr) = std::io::pipe().unwrap();
        drop(r); // the reader is gone before the first byte
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_blkbackd"));
        cmd.arg("status");
        if json {
            cmd.arg("--json");
        }
        let out = cmd
            .arg("--socket")
            .arg(w.dir.path().join("no-daemon.sock"))
            .env("XENSTORED_PATH", w.listening.path())
            .stdout(std::process::Stdio::from(wr))
            .stderr(std::process::Stdio::piped())
            .spawn() // (`output()` would replace stdout with a pipe of its own)
            .unwrap()
            .wait_with_output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "json={json}: {err}");
        assert!(out.status.success(), "json={json}: {:?} {err}", out.status);
    }
}

/// One number from a sysfs file (0 if it is missing).
fn sysfs_u64(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .map(|s| s.trim().parse().unwrap())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_is_published_with_the_devices_own_geometry_and_honours_no_discard() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let w = world().await;
    // A file on a loop device: the loop device's own discard limits (a loop
    // device over a file system frees whole blocks of it, never 512 bytes),
    // as Linux blkback publishes them; it used to publish the sector size.
    let p = w.file_vbd(21, "discard.img", 16).await;
    let be = &p.backend;
    let phys = w.read(&format!("{be}/physical-device")).await.unwrap();
    let (major, minor) = blkbackd::disk::parse_physical_device(phys.as_bytes()).unwrap();
    let sys = format!("/sys/dev/block/{major}:{minor}");
    assert!(
        sysfs_u64(&format!("{sys}/queue/discard_max_bytes")) > 0,
        "this kernel's loop devices discard"
    );
    let granularity = sysfs_u64(&format!("{sys}/queue/discard_granularity"));
    assert!(granularity >= 4096, "{sys}: granularity {granularity}");
    assert_eq!(
        w.read(&format!("{be}/feature-discard")).await.as_deref(),
        Some("1")
    );
    assert_eq!(
        w.read(&format!("{be}/discard-granularity")).await,
        Some(granularity.to_string())
    );
    assert_eq!(
        w.read(&format!("{be}/discard-alignment")).await,
        Some(sysfs_u64(&format!("{sys}/discard_alignment")).to_string())
    );
    let (ok, text) = w.guest(21, "verify").await;
    assert!(
        ok && text.contains(&format!("discard={granularity}")),
        "{text}"
    );
    w.detach(21, &p).await;

    // A plain file served directly: a punched hole frees whole blocks of
    // its file system.
    let img = w.image("direct-discard.img", 4);
    let blksize = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&img).unwrap().blksize()
    };
    let p = w.vbd(22, &format!("direct:{img}")).await;
    let be = &p.backend;
    w.added(be, 22).await;
    assert_eq!(
        w.read(&format!("{be}/discard-granularity")).await,
        Some(blksize.to_string())
    );
    w.detach(22, &p).await;

    // libxl's `no-discard` (discard-enable = 0): no discard offered, and a
    // guest that follows the protocol sends none.
    w.server.introduce(DomId(23));
    toolstack::create_domain_home(&w.xs, DomId(23))
        .await
        .unwrap();
    let img = w.image("nodiscard.img", 16);
    let p = toolstack::create_vbd_with(&w.xs, DomId(23), 51712, &format!("file:{img}"), "w", false)
        .await
        .unwrap();
    let be = &p.backend;
    w.added(be, 23).await;
    assert_eq!(
        w.read(&format!("{be}/feature-discard")).await.as_deref(),
        Some("0")
    );
    assert_eq!(w.read(&format!("{be}/discard-granularity")).await, None);
    let (ok, text) = w.guest(23, "verify").await;
    assert!(ok && text.contains("discard=off"), "{text}");
    w.detach(23, &p).await;
    w.finish().await;
}

#[test]
fn a_command_line_error_is_one_line_even_with_rust_backtrace_set() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_blkbackd"))
        .args(["serve", "--config", "/nonexistent/blkbackd.toml"])
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("blkbackd: cannot read /nonexistent/blkbackd.toml: No such file"),
        "{err}"
    );
    // The cause is said once, not once per layer.
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
}

/// One HTTP request to the metrics endpoint at `addr`: (status line, body).
async fn scrape(addr: &str, request: &str) -> (String, String) {
    try_scrape(addr, request).await.unwrap()
}

/// The same; an error when the connection was reset (a busy endpoint may).
async fn try_scrape(addr: &str, request: &str) -> std::io::Result<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await?;
    c.write_all(request.as_bytes()).await?;
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut all))
        .await
        .expect("the endpoint answered within 10 s")?;
    let text = String::from_utf8(all).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    Ok((head.lines().next().unwrap().to_owned(), body.to_owned()))
}

/// promtool: on PATH, or where scripts/test-all unpacked it.
fn promtool() -> std::path::PathBuf {
    let unpacked = Path::new("/var/tmp/blkbackd-tools/x/usr/bin/promtool");
    if unpacked.exists() {
        return unpacked.into();
    }
    let on_path = std::process::Command::new("promtool")
        .arg("--version")
        .output();
    assert!(
        on_path.is_ok_and(|o| o.status.success()),
        "needs Prometheus' promtool (scripts/test-all unpacks Debian's)"
    );
    "promtool".into()
}

/// The value of the one sample of `name` whose labels include all of `has`.
fn sample(text: &str, name: &str, has: &[&str]) -> f64 {
    let found: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| has.iter().all(|h| l.contains(h)))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(found.len(), 1, "{name} {has:?} in:\n{text}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_serves_what_the_rings_counted_and_promtool_accepts_it() {
    if !tier::need(Tier::Loop)
        || !tier::need(Tier::Tool(&[
            "promtool",
            "/var/tmp/blkbackd-tools/x/usr/bin/promtool",
        ]))
    {
        return;
    }
    let w = world().await;
    let p = w.file_vbd(31, "metrics.img", 16).await;
    let be = &p.backend;
    let (ok, text) = w.guest(31, "verify").await;
    assert!(ok, "{text}");

    let listen = blkbackd::config::Listen::Tcp("127.0.0.1:0".parse().unwrap());
    let ep = blkbackd::metrics::Endpoint::bind(&listen).await.unwrap();
    let addr = ep
        .url()
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned();
    tokio::spawn(ep.serve(w.xs.clone(), w.live.clone()));

    // A scraper that sends half a header and stalls holds one slot for 2 s
    // at most, and a flood of them no more than 8 (the rest are told 503):
    // the real scrape below is answered within seconds all the same.
    let mut stalled = Vec::new();
    for _ in 0..12 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut c, b"GET /metr")
            .await
            .unwrap();
        stalled.push(c);
    }
    let t0 = std::time::Instant::now();
    let (status, body) = loop {
        let (status, body) = try_scrape(&addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap_or_else(|e| (format!("503 (reset: {e})"), String::new()));
        assert!(status.contains("200") || status.contains("503"), "{status}");
        if status.contains("200") || t0.elapsed() > Duration::from_secs(8) {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status.contains("200 OK"), "{status}: {body}");
    drop(stalled);

    // What the rings counted, as `blkbackd status` reads it.
    let snap = w.live.snapshot();
    let rings = &snap[be.as_str()].rings;
    let (reads, writes): (u64, u64) = (
        rings.iter().map(|r| r.reads).sum(),
        rings.iter().map(|r| r.writes).sum(),
    );
    let id = ["domid=\"31\"", "devid=\"51712\""];
    let sum = |name: &str, has: &[&str]| -> f64 {
        (0..rings.len())
            .map(|i| {
                let ring = format!("ring=\"{i}\"");
                let mut h = vec![id[0], id[1], ring.as_str()];
                h.extend_from_slice(has);
                sample(&body, name, &h)
            })
            .sum()
    };
    assert!(reads > 0 && writes > 0, "{rings:?}");
    assert_eq!(
        sum("blkbackd_ring_requests_total", &["op=\"read\""]),
        reads as f64
    );
    assert_eq!(
        sum("blkbackd_ring_requests_total", &["op=\"write\""]),
        writes as f64
    );
    assert_eq!(
        sum("blkbackd_ring_bytes_total", &[]),
        rings.iter().map(|r| r.bytes).sum::<u64>() as f64
    );
    // The histograms: every answered read counted, and in the +Inf bucket.
    let h = "blkbackd_request_duration_seconds";
    assert_eq!(
        sample(&body, &format!("{h}_count"), &[id[0], "op=\"read\""]),
        reads as f64
    );
    assert_eq!(
        sample(
            &body,
            &format!("{h}_bucket"),
            &[id[0], "op=\"read\"", "le=\"+Inf\""]
        ),
        reads as f64
    );
    assert!(sample(&body, &format!("{h}_sum"), &[id[0], "op=\"write\""]) > 0.0);
    // State and disk identity, as published.
    let phys = w.read(&format!("{be}/physical-device")).await.unwrap();
    let seq = w.read(&format!("{be}/diskseq")).await.unwrap();
    sample(
        &body,
        "blkbackd_vbd_info",
        &[
            id[0],
            "state=\"Connected\"",
            &format!("physical_device=\"{phys}\""),
            &format!("diskseq=\"{seq}\""),
            "opened=\"1\"",
        ],
    );
    assert_eq!(sample(&body, "blkbackd_vbds_served", &[]), 1.0);
    assert!(sample(&body, "blkbackd_bounce_pool_bytes", &[]) > 0.0);
    assert!(sample(&body, "blkbackd_xenstore_roundtrip_seconds", &[]) > 0.0);
    assert!(body.contains("blkbackd_build_info{"), "{body}");

    // Prometheus' own linter: the exposition is valid and follows its rules.
    let mut lint = std::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut lint.stdin.take().unwrap(), body.as_bytes()).unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Anything else is refused with a reason, the endpoint unharmed.
    let (s, _) = scrape(&addr, "GET / HTTP/1.1\r\n\r\n").await;
    assert!(s.contains("404"), "{s}");
    let (s, _) = scrape(&addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
    assert!(s.contains("405"), "{s}");
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    let (s, _) = scrape(&addr, &huge).await;
    assert!(s.contains("400"), "{s}");

    // A taken address is an error that names it, not a silent no-endpoint.
    let taken = blkbackd::config::Listen::Tcp(addr.parse().unwrap());
    let e = blkbackd::metrics::Endpoint::bind(&taken).await.unwrap_err();
    assert!(format!("{e:#}").contains(&addr), "{e:#}");

    w.detach(31, &p).await;
    let (_, body) = scrape(&addr, "GET /metrics HTTP/1.1\r\n\r\n").await;
    assert_eq!(sample(&body, "blkbackd_vbds_served", &[]), 0.0);
    assert!(!body.contains("blkbackd_ring_requests_total{"), "{body}");
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_set_at_run_time_holds_the_guest_to_its_rate_and_its_requests_wait_not_fail() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let w = world().await;
    let p = w.file_vbd(41, "limit.img", 64).await;
    let be = &p.backend;
    let limit = |extra: &[&'static str]| {
        let mut a = vec!["limit", "--domid", "41", "--devid", "51712"];
        a.extend_from_slice(extra);
        a
    };
    // The operator's typos: another vbd, a value out of range. Refused,
    // nothing written.
    let (ok, text) = w
        .cli(&[
            "limit", "--domid", "41", "--devid", "51713", "--iops", "100",
        ])
        .await;
    assert!(!ok && text.contains("there is no vbd at"), "{text}");
    let (ok, text) = w.cli(&limit(&["--iops", "1000000000000"])).await;
    assert!(
        !ok && text.contains("iops = 1000000000000 is above"),
        "{text}"
    );
    assert_eq!(w.read(&format!("{be}/limit-iops")).await, None);

    // 300 requests a second for a guest reading 4 KiB at depth 8 on both
    // queues (one bucket for the vbd, whatever queue a request is on); then
    // 600, set while it runs; then none.
    let (ok, text) = w.cli(&limit(&["--iops", "300"])).await;
    assert!(ok && text.contains("300 IOPS, burst 100 ms"), "{text}");
    let guest = {
        let dir = w.dir.path().to_owned();
        let xs = w.listening.path().to_owned();
        tokio::spawn(async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_blkbackd"))
                .args([
                    "sim-guest",
                    "--mode",
                    "bench",
                    "--bench",
                    "randread:4096:8:7",
                ])
                .args(["--domid", "41", "--dir"])
                .arg(dir)
                .arg("--xenstore")
                .arg(xs)
                .output()
                .await
                .unwrap()
        })
    };
    w.wait_for(&format!("{be}/state"), "4", Duration::from_secs(10))
        .await;
    let answered = || {
        let snap = w.live.snapshot();
        snap.get(be.as_str())
            .map_or(0, |c| c.rings.iter().map(|r| r.ok).sum::<u64>())
    };
    // Requests answered per second over 1.5 s, after 0.5 s to settle
    // (the burst spent, the change applied).
    let rate = || async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (t0, a0) = (std::time::Instant::now(), answered());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        (answered() - a0) as f64 / t0.elapsed().as_secs_f64()
    };
    let r300 = rate().await;
    let (ok, text) = w.cli(&limit(&["--iops", "600"])).await;
    assert!(ok && text.contains("600 IOPS"), "{text}");
    let r600 = rate().await;
    let (ok, text) = w.cli(&limit(&["--clear"])).await;
    assert!(ok && text.contains("no limit of its own"), "{text}");
    assert_eq!(w.read(&format!("{be}/limit-iops")).await, None);
    let free = rate().await;
    eprintln!("answered: {r300:.0}/s under 300 IOPS, {r600:.0}/s under 600, {free:.0}/s with none");
    // Within 5% of each limit; free of it, far faster.
    assert!(
        (285.0..=315.0).contains(&r300),
        "{r300:.0} IOPS under a 300 IOPS limit"
    );
    assert!(
        (570.0..=630.0).contains(&r600),
        "{r600:.0} IOPS under a 600 IOPS limit"
    );
    assert!(
        free > 3.0 * r600,
        "{free:.0} IOPS with no limit, {r600:.0} under 600"
    );
    // The requests over the limit waited; none failed.
    let out = guest.await.unwrap();
    assert!(out.status.success(), "{out:?}");
    let snap = w.live.snapshot();
    let c = &snap[be.as_str()];
    let waits: u64 = c.rings.iter().map(|r| r.throttled).sum();
    let errors: u64 = c.rings.iter().map(|r| r.errors).sum();
    assert!(waits > 0 && errors == 0, "{:?}", c.rings);
    w.detach(41, &p).await;
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_limit_finds_its_guest_by_name_or_uuid_and_a_guest_cannot_rename_itself_out() {
    if !tier::need(Tier::Loop) {
        return;
    }
    use blkbackd::config::LimitRule;
    use blkbackd::vbd::limit::IoLimit;
    use xenstore::wire::{Access, Perm};
    let rule = |domain: Option<&str>, uuid: Option<&str>, iops| LimitRule {
        domain: domain.map(String::from),
        uuid: uuid.map(String::from),
        limit: IoLimit {
            iops,
            ..Default::default()
        },
        ..Default::default()
    };
    const UUID: &str = "6a1d7c2e-1f00-4b7e-9c3a-2d5e00000053";
    let w = world_full(
        false,
        vec![rule(Some("web1"), None, 200), rule(None, Some(UUID), 700)],
    )
    .await;
    // What the limit of a connected vbd of `domid` is, once its guest ran.
    let limit_of = |domid: u16| {
        let w = &w;
        async move {
            let p = w.file_vbd(domid, &format!("rule{domid}.img"), 16).await;
            let (ok, text) = w.guest(domid, "verify").await;
            assert!(ok, "{text}");
            let l = w.live.snapshot()[p.backend.as_str()].limit;
            w.detach(domid, &p).await;
            l
        }
    };
    // libxl writes the name where only dom0 may write (n0 r<domid>).
    let named = |domid: u16, key: &'static str, value: String, dom0_only: bool| {
        let w = &w;
        async move {
            let path = format!("/local/domain/{domid}/{key}");
            w.xs.write(&path, value.as_bytes()).await.unwrap();
            if dom0_only {
                w.xs.set_perms(
                    &path,
                    &[Perm::new(Access::None, 0), Perm::new(Access::Read, domid)],
                )
                .await
                .unwrap();
            }
        }
    };
    w.server.introduce(DomId(51));
    toolstack::create_domain_home(&w.xs, DomId(51))
        .await
        .unwrap();
    named(51, "name", "web1".into(), true).await;
    assert_eq!(limit_of(51).await.iops, 200);
    // The same name in a node the guest owns (as if it had renamed itself)
    // is not taken at its word: no rule applies.
    w.server.introduce(DomId(52));
    toolstack::create_domain_home(&w.xs, DomId(52))
        .await
        .unwrap();
    named(52, "name", "web1".into(), false).await;
    assert!(limit_of(52).await.is_none());
    // By UUID, from the domain's vm path.
    w.server.introduce(DomId(53));
    toolstack::create_domain_home(&w.xs, DomId(53))
        .await
        .unwrap();
    named(53, "vm", format!("/vm/{}", UUID.to_uppercase()), true).await;
    assert_eq!(limit_of(53).await.iops, 700);
    w.finish().await;
}
