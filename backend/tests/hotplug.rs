//! `blkbackd hotplug add|remove` as libxl runs it: XENBUS_PATH relative to
//! dom0's home, the embedded Xenstore via XENSTORED_PATH, judged by exit status.

#[path = "common/tier.rs"]
mod tier;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;
use tier::Tier;

use blkbackd::disk::{open_by_diskseq, parse_diskseq, parse_physical_device, DiskId};
use blkbackd::sim::world::SimWorld;
use blkbackd::xenbus::toolstack;
use xenstore::{DomId, Xs};

struct Env {
    dir: tempfile::TempDir,
    world: SimWorld,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let world = SimWorld::start(&dir.path().join("sim")).await.unwrap();
    Env { dir, world }
}

impl Env {
    fn image(&self, name: &str) -> String {
        let p = self.dir.path().join(name);
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(&vec![0x11; 2 << 20]).unwrap();
        p.display().to_string()
    }

    async fn vbd(&self, domid: u16, params: &str, mode: &str) -> String {
        self.vbd_at(domid, 51712, params, mode).await
    }

    async fn vbd_at(&self, domid: u16, devid: u32, params: &str, mode: &str) -> String {
        toolstack::create_vbd(&self.world.dom0, DomId(domid), devid, params, mode)
            .await
            .unwrap();
        // libxl passes the backend path relative to dom0's home.
        format!("backend/vbd/{domid}/{devid}")
    }

    /// Where the block script finds templates, stores and its lock: this
    /// test's own directories.
    fn state_dir(&self, what: &str) -> PathBuf {
        self.dir.path().join(what)
    }

    fn command(&self, action: &str, xenbus_path: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_blkbackd"));
        cmd.args(["hotplug", action])
            .env("XENBUS_PATH", xenbus_path)
            .env("XENSTORED_PATH", self.world.xenstore_socket())
            .env("BLKBACKD_TEMPLATES", self.state_dir("templates"))
            .env("BLKBACKD_COW_DIR", self.state_dir("cow"))
            .env("BLKBACKD_LOCK_DIR", self.state_dir("lock"))
            .kill_on_drop(true);
        cmd
    }

    async fn hotplug(&self, action: &str, xenbus_path: &str) -> Output {
        self.command(action, xenbus_path).output().await.unwrap()
    }

    /// `add`, which must fail; returns its `hotplug-error`.
    async fn refused(&self, be: &str) -> String {
        let out = self.hotplug("add", be).await;
        assert!(!out.status.success(), "{be} was accepted");
        assert_eq!(
            self.read(be, "hotplug-status").await.as_deref(),
            Some("error")
        );
        self.read(be, "hotplug-error").await.unwrap()
    }

    /// Template `name` (1 MiB) in this test's template directory; returns
    /// the (existing) store directory.
    fn template(&self, name: &str) -> PathBuf {
        let templates = self.state_dir("templates");
        std::fs::create_dir_all(&templates).unwrap();
        std::fs::write(templates.join(format!("{name}.img")), vec![0x22; 1 << 20]).unwrap();
        let cow = self.state_dir("cow");
        std::fs::create_dir_all(&cow).unwrap();
        cow
    }

    /// What libxl does after `remove`: the backend directory goes.
    async fn forget(&self, be: &str) {
        self.world
            .dom0
            .rm(&format!("/local/domain/0/{be}"))
            .await
            .unwrap();
    }

    /// The toolstack's `/local/domain/<domid>/vm` (`/vm/<uuid>`).
    async fn set_vm(&self, domid: u16, uuid: &str) {
        self.world
            .dom0
            .write(&format!("/local/domain/{domid}/vm"), format!("/vm/{uuid}"))
            .await
            .unwrap();
    }

    async fn read(&self, be: &str, key: &str) -> Option<String> {
        self.world
            .dom0
            .try_read(&format!("/local/domain/0/{be}/{key}"))
            .await
            .unwrap()
            .map(|v| String::from_utf8(v).unwrap())
    }

    async fn published(&self, be: &str) -> DiskId {
        let (major, minor) =
            parse_physical_device(self.read(be, "physical-device").await.unwrap().as_bytes())
                .unwrap();
        let diskseq = parse_diskseq(self.read(be, "diskseq").await.unwrap().as_bytes()).unwrap();
        DiskId {
            major,
            minor,
            diskseq,
        }
    }
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_makes_a_loop_device_publishes_it_by_diskseq_and_remove_releases_it() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let e = env().await;
    let img = e.image("a.img");
    let be = e.vbd(3, &format!("file:{img}"), "w").await;
    ok(&e.hotplug("add", &be).await);
    assert_eq!(
        e.read(&be, "hotplug-status").await.as_deref(),
        Some("connected")
    );
    let id = e.published(&be).await;
    assert_eq!(id.major, 7, "a loop device");
    assert_eq!(
        e.read(&be, "physical-device-path").await,
        Some(format!("/dev/loop{}", id.minor))
    );
    let d = open_by_diskseq(id, true).expect("the published identity opens");
    assert_eq!(d.size, 2 << 20);
    drop(d);

    ok(&e.hotplug("remove", &be).await);
    assert!(
        open_by_diskseq(id, false).is_err(),
        "released: the old identity is dead"
    );
    // Idempotent.
    ok(&e.hotplug("remove", &be).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_device_path_is_published_as_it_is() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let e = env().await;
    let img = e.image("b.img");
    let dev = blkbackd::disk::loopdev::attach(Path::new(&img), &Default::default()).unwrap();
    let be = e.vbd(4, dev.path.to_str().unwrap(), "r").await;
    ok(&e.hotplug("add", &be).await);
    assert_eq!(e.published(&be).await, dev.id);
    ok(&e.hotplug("remove", &be).await);
    // remove did not touch a device it did not make.
    assert!(open_by_diskseq(dev.id, false).is_ok());
    dev.release().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_params_fail_with_hotplug_error_and_a_non_zero_exit() {
    let e = env().await;
    for (domid, params) in [
        (5, "relative/path.img"),
        (6, "file:/nonexistent/blkbackd-test.img"),
        (7, "snapshot:debian-12"),
        (8, "/dev/null"),
    ] {
        let be = e.vbd(domid, params, "w").await;
        let out = e.hotplug("add", &be).await;
        assert!(!out.status.success(), "{params:?} was accepted");
        assert_eq!(
            e.read(&be, "hotplug-status").await.as_deref(),
            Some("error")
        );
        let why = e.read(&be, "hotplug-error").await.unwrap();
        assert!(!why.is_empty(), "{params:?}");
        assert!(e.read(&be, "physical-device").await.is_none());
        ok(&e.hotplug("remove", &be).await); // safe after a failed add
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_written_by_one_domain_is_refused_to_another() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let e = env().await;
    let img = e.image("shared.img");
    let params = format!("file:{img}");
    let first = e.vbd(9, &params, "w").await;
    ok(&e.hotplug("add", &first).await);
    let second = e.vbd(10, &params, "r").await;
    let out = e.hotplug("add", &second).await;
    assert!(!out.status.success());
    let why = e.read(&second, "hotplug-error").await.unwrap();
    assert!(why.contains("domain 9"), "{why}");
    ok(&e.hotplug("remove", &first).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_xenbus_path_the_script_fails_clearly() {
    let e = env().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_blkbackd"))
        .args(["hotplug", "add"])
        .env_remove("XENBUS_PATH")
        .env("XENSTORED_PATH", e.world.xenstore_socket())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("XENBUS_PATH"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifos_and_character_devices_are_refused_at_once_by_their_type() {
    let e = env().await;
    let fifo = e.dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let mut domid = 70;
    for (path, kind) in [
        (fifo.display().to_string(), "FIFO"),
        ("/dev/null".to_owned(), "character device"),
    ] {
        for scheme in ["file:", "direct:", "phy:"] {
            for mode in ["r", "w"] {
                let params = format!("{scheme}{path}");
                let be = e.vbd(domid, &params, mode).await;
                domid += 1;
                let out =
                    tokio::time::timeout(Duration::from_secs(10), e.command("add", &be).output())
                        .await
                        .unwrap_or_else(|_| panic!("add of {params} ({mode}) hung"))
                        .unwrap();
                assert!(!out.status.success(), "{params} ({mode}) was accepted");
                let why = e.read(&be, "hotplug-error").await.unwrap();
                assert!(why.contains(kind), "{params} ({mode}): {why}");
                ok(&e.hotplug("remove", &be).await);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_file_under_another_name_is_refused_beside_a_writer() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let e = env().await;
    let real = e.dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let img = real.join("a.img");
    std::fs::write(&img, vec![0x11; 2 << 20]).unwrap();
    std::os::unix::fs::symlink(&real, e.dir.path().join("alias")).unwrap();
    std::fs::hard_link(&img, e.dir.path().join("hard.img")).unwrap();
    let writer = e.vbd(40, &format!("file:{}", img.display()), "w").await;
    ok(&e.hotplug("add", &writer).await);
    // A loop device of our own over the same file, reached through a symlink.
    let dev = blkbackd::disk::loopdev::attach(&img, &Default::default()).unwrap();
    let loop_link = e.dir.path().join("loop-link");
    std::os::unix::fs::symlink(&dev.path, &loop_link).unwrap();
    let d = e.dir.path().display();
    for (domid, params) in [
        (41, format!("direct:{d}/real/./a.img")),
        (42, format!("file:{d}/alias/a.img")),
        (43, format!("direct:{d}/hard.img")),
        (44, format!("file:{d}/hard.img")),
        (45, format!("phy:{}", loop_link.display())),
    ] {
        let be = e.vbd(domid, &params, "r").await;
        let why = e.refused(&be).await;
        assert!(why.contains("domain 40"), "{params}: {why}");
        assert!(e.read(&be, "physical-device").await.is_none(), "{params}");
        ok(&e.hotplug("remove", &be).await);
    }
    ok(&e.hotplug("remove", &writer).await);
    drop(dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_device_is_recognised_by_its_device_number_under_any_path() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let e = env().await;
    let img = e.image("dev.img");
    let dev = blkbackd::disk::loopdev::attach(Path::new(&img), &Default::default()).unwrap();
    let link = e.dir.path().join("disk-link");
    std::os::unix::fs::symlink(&dev.path, &link).unwrap();
    let writer = e.vbd(46, &format!("phy:{}", dev.path.display()), "w").await;
    ok(&e.hotplug("add", &writer).await);
    let be = e.vbd(47, &format!("phy:{}", link.display()), "r").await;
    let why = e.refused(&be).await;
    assert!(why.contains("domain 46"), "{why}");
    ok(&e.hotplug("remove", &writer).await);
    e.forget(&writer).await;
    // The writer gone, the reader is served.
    let be = e.vbd(48, &format!("phy:{}", link.display()), "r").await;
    ok(&e.hotplug("add", &be).await);
    ok(&e.hotplug("remove", &be).await);
    dev.release().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vbd_without_a_mode_is_taken_for_the_writer_it_is_served_as() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let e = env().await;
    let img = e.image("nomode.img");
    let first = e.vbd(50, &format!("file:{img}"), "w").await;
    e.world
        .dom0
        .rm(&format!("/local/domain/0/{first}/mode"))
        .await
        .unwrap();
    ok(&e.hotplug("add", &first).await);
    let second = e.vbd(51, &format!("file:{img}"), "r").await;
    let why = e.refused(&second).await;
    assert!(why.contains("domain 50"), "{why}");
    ok(&e.hotplug("remove", &first).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_adds_of_one_disk_give_it_to_exactly_one_domain() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let e = env().await;
    let img = e.image("race.img");
    for round in 0..25u16 {
        let a = e.vbd(100 + 2 * round, &format!("file:{img}"), "w").await;
        let b = e.vbd(101 + 2 * round, &format!("direct:{img}"), "w").await;
        let (oa, ob) = tokio::join!(e.hotplug("add", &a), e.hotplug("add", &b));
        let won = [&oa, &ob].iter().filter(|o| o.status.success()).count();
        assert_eq!(
            won, 1,
            "round {round}: {won} domains got the disk for writing"
        );
        let loser = if oa.status.success() { &b } else { &a };
        let why = e.read(loser, "hotplug-error").await.unwrap();
        assert!(why.contains("in use by domain"), "round {round}: {why}");
        for be in [&a, &b] {
            ok(&e.hotplug("remove", be).await);
            e.forget(be).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_vbd_of_the_same_vm_may_share_the_disk() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let e = env().await;
    let img = e.image("vm.img");
    let params = format!("file:{img}");
    e.set_vm(60, "0d5e0c4c-0000-4000-8000-000000000060").await;
    e.set_vm(61, "0d5e0c4c-0000-4000-8000-000000000060").await; // migration's receiving side
    e.set_vm(62, "0d5e0c4c-0000-4000-8000-000000000062").await;
    let first = e.vbd(60, &params, "w").await;
    ok(&e.hotplug("add", &first).await);
    let again = e.vbd_at(60, 51728, &format!("direct:{img}"), "w").await;
    ok(&e.hotplug("add", &again).await);
    let incoming = e.vbd(61, &params, "w").await;
    ok(&e.hotplug("add", &incoming).await);
    // A stub domain serving domain 60 belongs to its VM.
    e.world
        .dom0
        .write("/local/domain/64/target", "60")
        .await
        .unwrap();
    let stubdom = e.vbd(64, &params, "w").await;
    ok(&e.hotplug("add", &stubdom).await);
    let other = e.vbd(62, &params, "r").await;
    let why = e.refused(&other).await;
    assert!(why.contains("in use by domain"), "{why}");
    // A domain without a `vm` node is not taken for the same VM.
    let unknown = e.vbd(63, &params, "r").await;
    e.refused(&unknown).await;
    for be in [&first, &again, &incoming, &stubdom] {
        ok(&e.hotplug("remove", be).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_store_left_by_a_crash_does_not_block_its_number() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let e = env().await;
    let cow = e.template("t");
    // A crash between creating the store and recording it left this.
    let stale = cow.join("80-51712.cow");
    std::fs::write(&stale, b"stale").unwrap();
    let be = e.vbd(80, "snapshot:t", "w").await;
    let out = e.hotplug("add", &be).await;
    if !out.status.success() {
        // Without device-mapper (this host) the add fails at the dm step,
        // after the store was made: not because of the stale file.
        let why = e.read(&be, "hotplug-error").await.unwrap();
        assert!(!why.contains("File exists"), "{why}");
        assert!(why.contains("mapper"), "{why}");
    }
    ok(&e.hotplug("remove", &be).await);
    assert!(!stale.exists(), "the store is removed with the vbd");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_store_a_vbd_records_is_never_replaced() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let e = env().await;
    let cow = e.template("t");
    let store = cow.join("91-51712.cow");
    std::fs::write(&store, b"live").unwrap();
    // Another vbd records that store as its own.
    let holder = e.vbd(90, "snapshot:t", "w").await;
    e.world
        .dom0
        .write(
            &format!("/local/domain/0/{holder}/blkbackd-cow-file"),
            store.display().to_string(),
        )
        .await
        .unwrap();
    let be = e.vbd(91, "snapshot:t", "w").await;
    let why = e.refused(&be).await;
    assert!(why.contains("records it as its store"), "{why}");
    ok(&e.hotplug("remove", &be).await);
    assert_eq!(std::fs::read(&store).unwrap(), b"live");
    // An add run again on a vbd that has its disk refuses, and its undo
    // touches nothing the first add made.
    let why = e.refused(&holder).await;
    assert!(why.contains("already records blkbackd-cow-file"), "{why}");
    assert_eq!(std::fs::read(&store).unwrap(), b"live");
    assert_eq!(
        e.read(&holder, "blkbackd-cow-file").await,
        Some(store.display().to_string())
    );
}
