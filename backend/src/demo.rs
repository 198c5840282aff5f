//! `blkbackd demo`: the embedded default in one command.
//!
//! What it runs: the embedded Xenstore and the simulated hypervisor in one
//! directory; the daemon (`blkbackd serve --sim`) in this process; a toolstack
//! creating two vbds as libxl does, and the hotplug script attaching each
//! guest's image file to a loop device published by diskseq; two guests, each
//! a separate `blkbackd sim-guest` process with its own memory and grant
//! table. Guest 1 is a well-behaved blkfront doing verified I/O; guest 2
//! corrupts its ring's producer index. The daemon serves guest 1 to the last
//! byte and halts only guest 2's ring, with the reason in its `error` node;
//! then both are removed as libxl removes them. Without loop devices (no
//! root) the same story runs on in-memory disks. Each step prints what it did
//! so a newcomer can follow the protocol.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use xenstore::{DomId, Xs};

use crate::abi::sys::XenbusState;
use crate::sim::world::SimWorld;
use crate::vbd::queue::QueueEnd;

const DEVID: u32 = 51712; // xvda
const GOOD: DomId = DomId(1);
const HOSTILE: DomId = DomId(2);

fn say(who: &str, what: impl AsRef<str>) {
    println!("[{who:<9}] {}", what.as_ref());
}

/// Runs the demo in `dir` (a temporary directory if `None`); `exe` is the
/// blkbackd binary to start the guests with (this one if `None`).
pub async fn run(dir: Option<PathBuf>, exe: Option<PathBuf>) -> anyhow::Result<()> {
    let loops = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .is_ok();
    if loops {
        run_daemon(dir, exe).await
    } else {
        say(
            "demo",
            "no loop devices here (not root?): running on in-memory disks instead",
        );
        run_memory(dir, exe).await
    }
}

/// The in-memory variant: the backend's vbds without the daemon's disk layer.
pub async fn run_memory(dir: Option<PathBuf>, exe: Option<PathBuf>) -> anyhow::Result<()> {
    let (_tmp, dir, exe) = workplace(dir, exe)?;
    let world = SimWorld::start(&dir).await?;
    say(
        "xenstore",
        format!(
            "embedded Xenstore at {} (XENSTORED_PATH=<that> xenstore-ls works against it)",
            world.xenstore_socket().display()
        ),
    );
    say(
        "xen",
        format!(
            "simulated hypervisor in {}: guest memory and grant tables in files, event channels as unix sockets",
            dir.display()
        ),
    );

    let good = world.serve_mem_disk(GOOD, DEVID, 64 * 2048, false).await?;
    let hostile = world
        .serve_mem_disk(HOSTILE, DEVID, 16 * 2048, false)
        .await?;
    for (d, s, mib) in [(GOOD, &good, 64), (HOSTILE, &hostile, 16)] {
        say(
            "toolstack",
            format!(
                "domain {d}: created vbd {DEVID} in one transaction ({}, {mib} MiB in-memory disk)",
                s.paths.backend
            ),
        );
    }
    say(
        "backend",
        "published features and geometry; both vbds in state 2 (InitWait)",
    );

    run_guests(&exe, |d, mode| world.guest_command(&exe, d, mode)).await?;
    let err = world
        .dom0
        .try_read(&format!("{}/error", hostile.paths.backend))
        .await?
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_default();
    say(
        "backend",
        format!("domain 2's vbd: error node says \"{err}\"; state 5 (Closing)"),
    );

    for (d, served) in [(GOOD, good), (HOSTILE, hostile)] {
        let be = served.paths.backend.clone();
        let fe = served.paths.frontend.clone();
        world.dom0.write(&format!("{be}/online"), "0").await?;
        world
            .dom0
            .write(&format!("{be}/state"), XenbusState::Closing.as_str())
            .await?;
        let ends = tokio::time::timeout(Duration::from_secs(10), served.finish())
            .await
            .context("the backend did not close within libxl's 10 s")??;
        world
            .dom0
            .write(&format!("{be}/state"), XenbusState::Closed.as_str())
            .await?;
        let (mut ok, mut errors, mut bytes, mut notes, mut halted) = (0, 0, 0, 0, 0);
        for (end, st) in &ends {
            ok += st.ok;
            errors += st.errors;
            bytes += st.bytes;
            notes += st.notifications;
            halted += usize::from(matches!(end, QueueEnd::Halted(_)));
        }
        say(
            "backend",
            format!(
                "domain {d}: {} queue(s), {halted} halted; {ok} requests OK, {errors} refused, {} KiB moved, {notes} notifications; state 6 (Closed)",
                ends.len(),
                bytes / 1024
            ),
        );
        world.dom0.rm(&be).await?;
        world.dom0.rm(&fe).await?;
        world.dom0.release(d).await?;
    }
    say("toolstack", "removed both vbds and released both domains");
    println!(
        "demo complete: guest 1's data verified byte for byte; only guest 2's ring was halted."
    );
    Ok(())
}

/// The demo's directory (a temporary one, removed at the end, if `dir` is
/// `None`) and the blkbackd binary to start guests with (this one if `None`).
fn workplace(
    dir: Option<PathBuf>,
    exe: Option<PathBuf>,
) -> anyhow::Result<(Option<TempDir>, PathBuf, PathBuf)> {
    let exe = match exe {
        Some(e) => e,
        None => std::env::current_exe().context("finding the blkbackd binary")?,
    };
    Ok(match dir {
        Some(d) => (None, d, exe),
        None => {
            let t = TempDir::new()?;
            let d = t.0.clone();
            (Some(t), d, exe)
        }
    })
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<TempDir> {
        let base = std::env::temp_dir().join(format!("blkbackd-demo-{}", std::process::id()));
        std::fs::create_dir_all(&base)?;
        Ok(TempDir(base))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The full variant: daemon, hotplug script, loop devices, diskseq.
pub async fn run_daemon(dir: Option<PathBuf>, exe: Option<PathBuf>) -> anyhow::Result<()> {
    use crate::vbd::{lifecycle::VbdCtx, Offer};
    use crate::xen::sim::{SimEvtchn, SimGrants};
    use std::sync::Arc;

    let (_tmp, dir, exe) = workplace(dir, exe)?;
    std::fs::create_dir_all(&dir)?;
    let server = xenstore::Server::default();
    let listening = server.listen(dir.join("xenstore.sock")).await?;
    let xs =
        xenstore::Client::connect_to(&xenstore::Endpoint::Socket(listening.path().into())).await?;
    say(
        "xenstore",
        format!("embedded Xenstore at {}", listening.path().display()),
    );
    say(
        "xen",
        format!(
            "simulated hypervisor in {}: guest memory and grant tables in files, event channels as unix sockets",
            dir.display()
        ),
    );
    let ctx = Arc::new(VbdCtx {
        xs: xs.clone(),
        grants: Arc::new(SimGrants::new(&dir, DomId::DOM0)),
        evtchn: Arc::new(SimEvtchn::new(&dir, DomId::DOM0)),
        offer: std::sync::RwLock::new(Offer::default()),
        allow_missing_diskseq: false,
        live: Default::default(),
    });
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let daemon = tokio::spawn(crate::daemon::run(ctx, stop_rx));
    say(
        "daemon",
        "blkbackd serve --sim: watching /local/domain/0/backend/vbd",
    );

    let mut vbds = Vec::new();
    for (d, mib) in [(GOOD, 64u64), (HOSTILE, 16)] {
        let img = dir.join(format!("guest{}.img", d.0));
        std::fs::File::create(&img)?.set_len(mib << 20)?;
        server.introduce(d);
        crate::sim::toolstack::create_domain_home(&xs, d).await?;
        let params = format!("file:{}", img.display());
        let (p, id) = crate::attach::attach(&xs, d, DEVID, &params, true).await?;
        say(
            "toolstack",
            format!("domain {d}: vbd {DEVID} with params {params} (backend and frontend nodes in one transaction)"),
        );
        say(
            "daemon",
            format!("domain {d}: state 2 (InitWait), features published"),
        );
        say(
            "hotplug",
            format!(
                "block-blkbackd add: /dev/loop{} published as physical-device {} diskseq {} (hex)",
                id.minor,
                id.physical_device(),
                id.diskseq_hex()
            ),
        );
        crate::attach::wait_value(&xs, &format!("{}/opened", p.backend), "1").await?;
        let sectors = xs.read_string(&format!("{}/sectors", p.backend)).await?;
        say(
            "daemon",
            format!("domain {d}: disk {id} opened by diskseq; opened=1, {sectors} sectors"),
        );
        vbds.push((d, p));
    }

    run_guests(&exe, |d, mode| {
        let mut c = tokio::process::Command::new(&exe);
        c.args(["sim-guest", "--mode", mode, "--domid", &d.0.to_string()])
            .arg("--dir")
            .arg(&dir)
            .arg("--xenstore")
            .arg(listening.path());
        c
    })
    .await?;
    let err = xs
        .try_read(&format!("{}/error", vbds[1].1.backend))
        .await?
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_default();
    say(
        "daemon",
        format!("domain 2: error node says \"{err}\"; state 5 (Closing)"),
    );

    for (d, _) in &vbds {
        let t0 = std::time::Instant::now();
        crate::attach::detach(&xs, *d, DEVID).await?;
        say(
            "toolstack",
            format!(
                "domain {d}: online=0 + Closing; the daemon answered Closed, block-blkbackd remove released the loop device, nodes removed ({} ms in all)",
                t0.elapsed().as_millis()
            ),
        );
        xs.release(*d).await?;
    }
    let _ = stop.send(true);
    daemon.await??;
    println!("demo complete: guest 1's data verified byte for byte; only guest 2's ring was halted; nothing left behind.");
    Ok(())
}

/// Runs the two guests side by side (`command` builds a `sim-guest` command
/// line for a domain and mode), prints what they report, and fails unless the
/// good one verified its data and the hostile one saw its ring halted.
async fn run_guests(
    exe: &std::path::Path,
    command: impl Fn(DomId, &str) -> tokio::process::Command,
) -> anyhow::Result<()> {
    let guest = |d: DomId, mode: &str, extra: &[&str]| {
        let mut c = command(d, mode);
        c.args(extra).env("RUST_LOG", "warn");
        c.output()
    };
    say(
        "guest d1",
        format!(
            "starting `{} sim-guest --mode verify` (a separate process)",
            exe.display()
        ),
    );
    say(
        "guest d2",
        "starting `sim-guest --mode bogus-prod`: it will claim more requests than its ring holds",
    );
    let (g1, g2) = tokio::join!(
        guest(GOOD, "verify", &["--ios", "100"]),
        guest(HOSTILE, "bogus-prod", &[])
    );
    let (g1, g2) = (
        g1.context("running guest 1")?,
        g2.context("running guest 2")?,
    );
    for (name, out) in [("guest d1", &g1), ("guest d2", &g2)] {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            say(name, line);
        }
    }
    if !g1.status.success() {
        bail!("guest 1 failed: {}", String::from_utf8_lossy(&g1.stderr));
    }
    if !g2.status.success() {
        bail!(
            "guest 2 did not see its ring halted: {}",
            String::from_utf8_lossy(&g2.stderr)
        );
    }
    Ok(())
}
