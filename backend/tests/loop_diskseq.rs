//! Loop devices and open-by-diskseq, for real (root and /dev/loop-control,
//! which this machine and CI have): attach, open by diskseq, release, reuse
//! of the same minor, stale identities refused; and a guest served from a
//! file through a loop device opened by diskseq.

#[path = "common/tier.rs"]
mod tier;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tier::Tier;

use blkbackd::disk::loopdev::{self, LoopOptions};
use blkbackd::disk::{open_by_diskseq, DiskError, DiskId};
use blkbackd::io::{Disk, FileDisk};
use blkbackd::sim::world::SimWorld;
use xenstore::DomId;

fn backing(dir: &Path, name: &str, mib: u64, fill: u8) -> std::path::PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(&vec![fill; (mib << 20) as usize]).unwrap();
    p
}

#[test]
fn a_released_and_reused_loop_minor_is_refused_under_its_old_diskseq() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = backing(dir.path(), "a.img", 4, 0xAA);
    let b = backing(dir.path(), "b.img", 4, 0xBB);

    let dev = loopdev::attach(&a, &LoopOptions::default()).unwrap();
    let first = dev.id;
    let opened = open_by_diskseq(first, true).unwrap();
    assert_eq!((opened.size, opened.logical_block_size), (4 << 20, 512));
    assert!(!opened.read_only);
    drop(opened);

    // A wrong diskseq is refused with both numbers named.
    let wrong = DiskId {
        diskseq: first.diskseq + 1000,
        ..first
    };
    let e = open_by_diskseq(wrong, false).unwrap_err();
    assert!(matches!(e, DiskError::Reused { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&first.diskseq.to_string()) && msg.contains(&wrong.diskseq.to_string()),
        "{msg}"
    );

    // Release: the diskseq moves on, so the old identity is dead at once.
    let after_release = dev.release().unwrap();
    assert_ne!(after_release, first.diskseq);
    assert!(matches!(
        open_by_diskseq(first, false),
        Err(DiskError::Reused { .. })
    ));

    // The same minor, reused for another file: the old identity still fails,
    // the new one opens the new file's data.
    let again = loopdev::attach_at(first.minor, &b, &LoopOptions::default()).unwrap();
    assert_eq!((again.id.major, again.id.minor), (first.major, first.minor));
    assert_ne!(again.id.diskseq, first.diskseq);
    assert!(matches!(
        open_by_diskseq(first, false),
        Err(DiskError::Reused { .. })
    ));
    let d = FileDisk::from_opened(open_by_diskseq(again.id, false).unwrap());
    let mut buf = [0u8; 512];
    d.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0xBB), "reads the new file");
    drop(d);
    again.release().unwrap();
}

#[test]
fn block_size_and_read_only_are_what_we_asked_for() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = backing(dir.path(), "c.img", 4, 0);
    let opts = LoopOptions {
        read_only: true,
        block_size: 4096,
        ..LoopOptions::default()
    };
    let dev = loopdev::attach(&f, &opts).unwrap();
    let d = open_by_diskseq(dev.id, false).unwrap();
    assert_eq!(d.logical_block_size, 4096);
    assert!(d.read_only);
    drop(d);
    dev.release().unwrap();
}

#[test]
fn a_node_that_is_not_the_device_asked_for_is_refused() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = backing(dir.path(), "d.img", 1, 0);
    let dev = loopdev::attach(&f, &LoopOptions::default()).unwrap();
    // A dev_t with no disk behind it (an unused loop minor far away).
    let ghost = DiskId {
        major: 7,
        minor: 1 << 19,
        diskseq: 1,
    };
    assert!(open_by_diskseq(ghost, false).is_err());
    dev.release().unwrap();
}

#[test]
fn concurrent_attaches_each_get_their_own_device() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = (0..6)
        .map(|i| backing(dir.path(), &format!("p{i}.img"), 1, i as u8))
        .collect();
    let devs: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = paths
            .iter()
            .map(|p| s.spawn(move || loopdev::attach(p, &LoopOptions::default()).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut minors: Vec<u32> = devs.iter().map(|d| d.id.minor).collect();
    minors.sort();
    minors.dedup();
    assert_eq!(minors.len(), 6, "distinct loop devices");
    for (i, d) in devs.iter().enumerate() {
        let opened = FileDisk::from_opened(open_by_diskseq(d.id, false).unwrap());
        let mut b = [0u8; 1];
        opened.read_at(0, &mut b).unwrap();
        assert_eq!(b[0], i as u8, "each device is backed by its own file");
    }
    for d in devs {
        d.release().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_is_served_from_a_file_through_a_loop_device_opened_by_diskseq() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = backing(dir.path(), "guest.img", 16, 0);
    let dev = loopdev::attach(&img, &LoopOptions::default()).unwrap();
    let disk = FileDisk::from_opened(open_by_diskseq(dev.id, true).unwrap()).pinning(dev);
    let world = SimWorld::start(&dir.path().join("sim")).await.unwrap();
    let served = world
        .serve(DomId(2), 51712, img.to_str().unwrap(), Arc::new(disk))
        .await
        .unwrap();
    let exe = Path::new(env!("CARGO_BIN_EXE_blkbackd"));
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        world
            .guest_command(exe, DomId(2), "verify")
            .args(["--ios", "20"])
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    served.finish().await.unwrap();
    // What the guest wrote went through the loop device into the file.
    let data = std::fs::read(&img).unwrap();
    assert!(data[64 * 512..].iter().any(|&b| b != 0));
}

#[test]
fn start_up_reconciliation_releases_only_our_unclaimed_loop_devices() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        backing(dir.path(), "claimed.img", 1, 1),
        backing(dir.path(), "left.img", 1, 2),
        backing(dir.path(), "foreign.img", 1, 3),
    );
    // Two of ours, left attached as a block script's `add` leaves them.
    let claimed = loopdev::attach(&a, &LoopOptions::default()).unwrap().keep();
    let left = loopdev::attach(&b, &LoopOptions::default()).unwrap().keep();
    // One made by someone else (util-linux).
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&c)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let foreign = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let mine: Vec<DiskId> = loopdev::ours().into_iter().map(|f| f.id).collect();
    assert!(mine.contains(&claimed) && mine.contains(&left), "{mine:?}");
    let in_dir = |f: &loopdev::Found| f.backing.starts_with(dir.path());
    assert!(
        loopdev::ours()
            .iter()
            .filter(|f| in_dir(f))
            .all(|f| f.backing != c),
        "a device util-linux made was taken for ours"
    );

    // Only this test's devices are in scope (other tests run beside it).
    let released = loopdev::reconcile(|id| id == claimed, in_dir);
    assert_eq!(
        released.iter().map(|f| f.id).collect::<Vec<_>>(),
        vec![left]
    );
    assert!(
        matches!(
            open_by_diskseq(left, false),
            Err(DiskError::Reused { .. }) | Err(DiskError::Io { .. })
        ),
        "the released device still opens under its old diskseq"
    );
    open_by_diskseq(claimed, false).expect("the claimed device was touched");
    assert!(std::path::Path::new(&foreign).exists());
    let st = std::process::Command::new("losetup")
        .arg(&foreign)
        .output()
        .unwrap();
    assert!(st.status.success(), "the foreign device was detached");

    loopdev::release_by_id(claimed).unwrap();
    std::process::Command::new("losetup")
        .args(["-d", &foreign])
        .status()
        .unwrap();
}
