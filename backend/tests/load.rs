//! Load: 64 vbds with 2 queues each, served by one `blkbackd serve --sim`
//! process, every guest a separate process doing verified I/O, while other
//! vbds are attached, used and detached in a loop beside them. Nothing may
//! fail, and the daemon must end with the descriptors it started with.
//!
//! It prints one `LOAD ...` line with the figures (requests served, errors,
//! attach/detach cycles, the daemon's peak memory, its fds before and after);
//! `cargo nextest run --test load --no-capture` shows it.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkbackd::xenbus::toolstack;
use xenstore::{Client, DomId, Xs};

const VBDS: u16 = 64;
const DEVID: u32 = 51712;
/// Each ring's bounce pool.
const POOL_KIB: u64 = 1024;
/// What the daemon may use beyond its rings' pools (runtime, Xenstore
/// client, rings' bookkeeping).
const OVERHEAD_KIB: u64 = 96 * 1024;
/// Domains of the vbds that come and go.
const CHURN: [u16; 4] = [201, 202, 203, 204];

mod common;
use common::tier::{self, Tier};
use common::{blkbackd, exits_cleanly, signal, wait_socket};

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A `/proc/<pid>/status` field in KiB: `VmHWM` (peak resident memory,
/// including the simulated guests' memory the daemon maps for grant copies)
/// or `RssAnon` (the daemon's own memory now: bounce pools, rings, state).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

struct Load {
    dir: PathBuf,
    xs: Client,
}

impl Load {
    /// A domain with one vbd over a fresh 8 MiB file served directly.
    async fn attach(&self, d: u16) {
        let img = self.dir.join(format!("d{d}.img"));
        std::fs::File::create(&img)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        self.xs.introduce(DomId(d), 0, 0).await.unwrap();
        toolstack::create_domain_home(&self.xs, DomId(d))
            .await
            .unwrap();
        blkbackd::attach::attach(
            &self.xs,
            DomId(d),
            DEVID,
            &format!("direct:{}", img.display()),
            true,
        )
        .await
        .unwrap_or_else(|e| panic!("attaching domain {d}: {e}"));
    }

    async fn detach(&self, d: u16) {
        blkbackd::attach::detach(&self.xs, DomId(d), DEVID)
            .await
            .unwrap_or_else(|e| panic!("detaching domain {d}: {e}"));
        self.xs.release(DomId(d)).await.unwrap();
        let _ = self.xs.rm(&format!("/local/domain/{d}")).await;
        let _ = std::fs::remove_file(self.dir.join(format!("d{d}.img")));
    }

    /// Runs a verifying guest for domain `d`; returns the I/Os it verified.
    async fn guest(&self, d: u16, ios: u32) -> u64 {
        let out = blkbackd()
            .args(["sim-guest", "--mode", "verify", "--queues", "2"])
            .args(["--ios", &ios.to_string(), "--seed", &d.to_string()])
            .args(["--domid", &d.to_string()])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--xenstore")
            .arg(self.dir.join("xenstore.sock"))
            .env("RUST_LOG", "warn")
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "guest {d}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("queues=2"), "guest {d}: {text}");
        text.split_whitespace()
            .find_map(|w| w.strip_prefix("ios="))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("guest {d}: no count in {text}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_vbds_do_verified_io_while_others_come_and_go() {
    if !tier::need(Tier::Loop) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sim");
    // 1 MiB of bounce buffers per ring (the default is 4): io_uring pins a
    // ring's pool while it is connected, so this is most of what 128 rings
    // cost the daemon, and the test checks that bound.
    let cfg = tmp.path().join("blkbackd.toml");
    std::fs::write(&cfg, format!("[io]\npool_kib = {POOL_KIB}\n")).unwrap();
    let mut daemon = blkbackd()
        .args(["serve", "--sim"])
        .arg(&dir)
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = daemon.id().unwrap();
    let xs = wait_socket(&dir.join("xenstore.sock")).await;
    let load = Arc::new(Load {
        dir: dir.clone(),
        xs,
    });

    // One full cycle first, so what the daemon opens once (io_uring probe,
    // status socket clients) is in the baseline.
    load.attach(CHURN[0]).await;
    load.guest(CHURN[0], 2).await;
    load.detach(CHURN[0]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fds_before = open_fds(pid);

    // The daemon's own memory, sampled through the run.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while sampling.load(Ordering::Relaxed) {
                peak = peak.max(status_kib(pid, "RssAnon"));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        })
    };
    let started = Instant::now();
    for d in 1..=VBDS {
        load.attach(d).await;
    }
    let attached_in = started.elapsed();

    // The churn: vbds attached (InitWait, the script, the disk opened) and
    // detached in a loop until the 64 guests are done; every fourth one is
    // also connected and used by a guest first.
    let done = Arc::new(AtomicBool::new(false));
    let churn = {
        let (load, done) = (load.clone(), done.clone());
        tokio::spawn(async move {
            let mut cycles = 0u64;
            let mut ios = 0u64;
            while !done.load(Ordering::Relaxed) {
                let d = CHURN[(cycles % CHURN.len() as u64) as usize];
                load.attach(d).await;
                if cycles % 4 == 3 {
                    ios += load.guest(d, 1).await;
                }
                load.detach(d).await;
                cycles += 1;
            }
            (cycles, ios)
        })
    };
    let mut guests = tokio::task::JoinSet::new();
    for d in 1..=VBDS {
        let load = load.clone();
        guests.spawn(async move { load.guest(d, 60).await });
    }
    let mut verified = 0u64;
    while let Some(r) = guests.join_next().await {
        verified += r.unwrap();
    }
    let io_secs = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let (cycles, churn_ios) = churn.await.unwrap();

    // The daemon's own counters: every ring of the 64, no error anywhere.
    let counters = blkbackd::status::fetch(&dir.join(blkbackd::status::SIM_SOCKET))
        .await
        .expect("the daemon's status socket did not answer");
    let mut requests = 0u64;
    let mut errors = 0u64;
    for d in 1..=VBDS {
        let be = format!("/local/domain/0/backend/vbd/{d}/{DEVID}");
        let c = counters
            .get(&be)
            .unwrap_or_else(|| panic!("no counters for {be}"));
        assert_eq!(c.rings.len(), 2, "{be}: {c:?}");
        for r in &c.rings {
            requests += r.ok + r.errors;
            errors += r.errors;
        }
    }
    assert_eq!(errors, 0, "requests answered with an error under load");
    assert!(
        requests >= verified,
        "{requests} served < {verified} verified"
    );

    for d in 1..=VBDS {
        load.detach(d).await;
    }
    // Every vbd gone: the descriptors come back to the baseline.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut fds_after = open_fds(pid);
    while fds_after != fds_before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        fds_after = open_fds(pid);
    }
    sampling.store(false, Ordering::Relaxed);
    let anon_peak = sampler.await.unwrap();
    let hwm = status_kib(pid, "VmHWM");
    println!(
        "LOAD vbds={VBDS} queues=2 attached_in={:.2}s requests={requests} verified_ios={verified} \
         errors={errors} churn_cycles={cycles} churn_ios={churn_ios} io_secs={io_secs:.1} \
         daemon_peak_anon_mib={:.1} daemon_peak_rss_mib={:.1} fds_before={fds_before} fds_after={fds_after}",
        attached_in.as_secs_f64(),
        anon_peak as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    assert!(cycles > 0, "no vbd came and went during the load");
    let bound = u64::from(VBDS) * 2 * POOL_KIB + OVERHEAD_KIB;
    assert!(
        anon_peak <= bound,
        "the daemon's own memory peaked at {anon_peak} KiB, past {bound} KiB"
    );
    assert_eq!(fds_after, fds_before, "the daemon leaked descriptors");
    for d in 1..=VBDS {
        let be = format!("/local/domain/0/backend/vbd/{d}/{DEVID}");
        assert!(
            load.xs.try_read(&be).await.unwrap().is_none(),
            "{be} left behind"
        );
    }

    signal(&daemon, "TERM");
    exits_cleanly(&mut daemon).await;
}
