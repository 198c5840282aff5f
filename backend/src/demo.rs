//! `blkbackd demo`: the embedded default in one command.
//!
//! What it runs: the embedded Xenstore and the simulated hypervisor in one
//! directory; the daemon (what `blkbackd serve --sim` runs) in this process;
//! a toolstack creating two vbds as libxl does, in one transaction each, and
//! the hotplug script publishing each guest's image file (on a loop device by
//! diskseq where the machine has loop devices, else as a plain file by its
//! identity); two guests, each a separate `blkbackd sim-guest` process with
//! its own memory and grant table. Guest 1 is a well-behaved blkfront: it
//! writes and verifies data (with a progress bar), then the operator grows its
//! disk and the guest sees and uses the new end. Guest 2 corrupts its ring's
//! producer index: the daemon halts only that ring, with the reason in its
//! `error` node. Both vbds are then removed as libxl removes them, and
//! nothing is left behind. Each step prints what it did so a newcomer can
//! follow the protocol.

#![forbid(unsafe_code)]

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use tokio::io::AsyncBufReadExt as _;
use xenstore::{DomId, Xs};

use crate::xenbus::Published;

const DEVID: u32 = 51712; // xvda
const GOOD: DomId = DomId(1);
const HOSTILE: DomId = DomId(2);
/// Guest 1's disk before and after the operator grows it.
const GOOD_MIB: u64 = 64;
const GROWN_MIB: u64 = 96;

fn say(who: &str, what: impl AsRef<str>) {
    println!("[{who:<9}] {}", what.as_ref());
}

/// Runs the demo in `dir` (a temporary directory if `None`); `exe` is the
/// blkbackd binary to start the guests with (this one if `None`). Disks are
/// loop devices where this machine has them (root), plain files otherwise.
pub async fn run(dir: Option<PathBuf>, exe: Option<PathBuf>) -> anyhow::Result<()> {
    let loops = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .is_ok();
    if !loops {
        say(
            "demo",
            "no loop devices here (not root?): the daemon serves the images as plain files (params direct:PATH)",
        );
    }
    run_with(dir, exe, loops).await
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

/// The demo with loop devices (`loops`) or plain files as the guests' disks.
pub async fn run_with(
    dir: Option<PathBuf>,
    exe: Option<PathBuf>,
    loops: bool,
) -> anyhow::Result<()> {
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
        limits: Default::default(),
    });
    let (stop, stop_rx) = tokio::sync::watch::channel(crate::daemon::Stop::Run);
    let daemon = tokio::spawn(crate::daemon::run(ctx, stop_rx));
    say(
        "daemon",
        "blkbackd serve --sim: watching /local/domain/0/backend/vbd",
    );

    let mut vbds = Vec::new();
    for (d, mib) in [(GOOD, GOOD_MIB), (HOSTILE, 16)] {
        let img = dir.join(format!("guest{}.img", d.0));
        std::fs::File::create(&img)?.set_len(mib << 20)?;
        server.introduce(d);
        crate::xenbus::toolstack::create_domain_home(&xs, d).await?;
        let scheme = if loops { "file" } else { "direct" };
        let params = format!("{scheme}:{}", img.display());
        let (p, published) = crate::attach::attach(&xs, d, DEVID, &params, true).await?;
        say(
            "toolstack",
            format!("domain {d}: vbd {DEVID} with params {params} (backend and frontend nodes in one transaction)"),
        );
        say(
            "daemon",
            format!("domain {d}: state 2 (InitWait), features published"),
        );
        let what = match &published {
            Published::Block(id) => format!("/dev/loop{} published as {published}", id.minor),
            Published::File(..) | Published::Rbd(..) => {
                format!("{} published as {published}", img.display())
            }
        };
        say("hotplug", format!("block-blkbackd add: {what}"));
        crate::attach::wait_value(&xs, &format!("{}/opened", p.backend), "1").await?;
        let sectors = xs.read_string(&format!("{}/sectors", p.backend)).await?;
        let how = match &published {
            Published::Block(_) => "disk opened by diskseq",
            Published::File(..) => "file opened and checked by identity",
            Published::Rbd(..) => "image opened and checked by id",
        };
        say(
            "daemon",
            format!("domain {d}: {how}; opened=1, {sectors} sectors"),
        );
        vbds.push((d, p, published, img));
    }

    let grow = |published: Published, img: PathBuf| async move {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)?
            .set_len(GROWN_MIB << 20)?;
        if let Published::Block(id) = published {
            crate::disk::loopdev::refresh_capacity_of(id)?;
        }
        say(
            "operator",
            format!(
                "grew {} from {GOOD_MIB} to {GROWN_MIB} MiB{}",
                img.display(),
                if loops {
                    " and refreshed its loop device (losetup -c)"
                } else {
                    ""
                }
            ),
        );
        anyhow::Ok(())
    };
    let (good_published, good_img) = (vbds[0].2.clone(), vbds[0].3.clone());
    run_guests(
        &exe,
        |d, mode| {
            let mut c = tokio::process::Command::new(&exe);
            c.args(["sim-guest", "--mode", mode, "--domid", &d.0.to_string()])
                .arg("--dir")
                .arg(&dir)
                .arg("--xenstore")
                .arg(listening.path());
            c
        },
        grow(good_published, good_img),
    )
    .await?;
    let sectors = xs
        .read_string(&format!("{}/sectors", vbds[0].1.backend))
        .await?;
    say(
        "daemon",
        format!("domain {GOOD}: noticed the new size and published sectors = {sectors} while connected, as blkback does"),
    );
    let err = xs
        .try_read_text(&format!("{}/error", vbds[1].1.backend))
        .await?
        .unwrap_or_default();
    say(
        "daemon",
        format!("domain {HOSTILE}: error node says \"{err}\"; state 5 (Closing)"),
    );

    for (d, ..) in &vbds {
        let t0 = std::time::Instant::now();
        crate::attach::detach(&xs, *d, DEVID).await?;
        let released = if loops {
            ", block-blkbackd remove released the loop device"
        } else {
            ""
        };
        say(
            "toolstack",
            format!(
                "domain {d}: online=0 + Closing; the daemon answered Closed{released}, nodes removed ({} ms in all)",
                t0.elapsed().as_millis()
            ),
        );
        xs.release(*d).await?;
    }
    let _ = stop.send(crate::daemon::Stop::Close);
    daemon.await??;
    println!("demo complete: guest 1's data verified byte for byte and its disk grown while connected; only guest 2's ring was halted; nothing left behind.");
    Ok(())
}

/// Runs the two guests side by side (`command` builds a `sim-guest` command
/// line for a domain and mode): guest 1 in `demo` mode, its progress drawn as
/// it goes and `grow` run when it waits for a bigger disk; guest 2 breaking
/// its ring. Fails unless guest 1 verified its data and saw the new size and
/// guest 2 saw its ring halted.
async fn run_guests(
    exe: &Path,
    command: impl Fn(DomId, &str) -> tokio::process::Command,
    grow: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    say(
        "guest d1",
        format!(
            "starting `{} sim-guest --mode demo` (a separate process)",
            exe.display()
        ),
    );
    say(
        "guest d2",
        "starting `sim-guest --mode bogus-prod`: it will claim more requests than its ring holds",
    );
    let mut good = command(GOOD, "demo");
    good.args(["--ios", "500"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut good = good.spawn().context("starting guest 1")?;
    let stdout = good.stdout.take().context("guest 1's stdout")?;
    let hostile = command(HOSTILE, "bogus-prod")
        .env("RUST_LOG", "warn")
        .output();
    let follow = async {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut bar = Progress::new();
        let mut grow = Some(grow);
        let mut passed = false;
        while let Some(line) = lines.next_line().await? {
            let Some(rest) = line.strip_prefix("SIM-GUEST ") else {
                say("guest d1", &line);
                continue;
            };
            if let Some(p) = rest.strip_prefix("progress ") {
                let n: Vec<u64> = p.split(' ').filter_map(|v| v.parse().ok()).collect();
                if let [done, total, bytes] = n[..] {
                    bar.draw(done, total, bytes);
                }
            } else if let Some(v) = rest.strip_prefix("verified ") {
                bar.finish();
                say("guest d1", format!("verified {v}{}", throughput(v)));
            } else if let Some(n) = rest.strip_prefix("negotiated ") {
                say("guest d1", format!("connected; negotiated {n}"));
            } else if let Some(s) = rest.strip_prefix("connected sectors=") {
                say(
                    "guest d1",
                    format!("waiting for a bigger disk (now {s} sectors)"),
                );
                if let Some(g) = grow.take() {
                    g.await?;
                }
            } else {
                passed |= rest.starts_with("PASS ");
                say("guest d1", rest);
            }
        }
        anyhow::Ok(passed)
    };
    let (passed, g2) = tokio::join!(follow, hostile);
    let status = good.wait().await.context("waiting for guest 1")?;
    let g2 = g2.context("running guest 2")?;
    for line in String::from_utf8_lossy(&g2.stdout).lines() {
        say("guest d2", line);
    }
    if !passed? || !status.success() {
        let mut err = String::new();
        if let Some(mut e) = good.stderr.take() {
            use tokio::io::AsyncReadExt as _;
            let _ = e.read_to_string(&mut err).await;
        }
        bail!("guest 1 failed: {err}");
    }
    if !g2.status.success() {
        bail!(
            "guest 2 did not see its ring halted: {}",
            String::from_utf8_lossy(&g2.stderr)
        );
    }
    Ok(())
}

/// ", N MB/s" from a guest's `verified ios=.. bytes=B secs=S` report.
fn throughput(report: &str) -> String {
    let field = |k: &str| {
        report
            .split(' ')
            .find_map(|f| f.strip_prefix(k))
            .and_then(|v| v.parse::<f64>().ok())
    };
    match (field("bytes="), field("secs=")) {
        (Some(b), Some(s)) if s > 0.0 => format!(" ({:.1} MB/s through the backend)", b / s / 1e6),
        _ => String::new(),
    }
}

/// Guest 1's progress: a bar redrawn in place on a terminal, a line per
/// quarter otherwise (logs, CI).
struct Progress {
    tty: bool,
    shown: u64,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            tty: std::io::stdout().is_terminal(),
            shown: 0,
        }
    }

    fn draw(&mut self, done: u64, total: u64, bytes: u64) {
        let pct = (done * 100).checked_div(total).unwrap_or(100).min(100);
        let mb = bytes as f64 / 1e6;
        if self.tty {
            let filled = (pct / 4) as usize;
            print!(
                "\r[guest d1 ] [{}{}] {pct:>3}%  {done}/{total} write+verify pairs, {mb:.1} MB",
                "#".repeat(filled),
                "-".repeat(25 - filled)
            );
            let _ = std::io::stdout().flush();
        } else if pct >= self.shown + 25 || (pct == 100 && self.shown < 100) {
            self.shown = pct - pct % 25;
            say(
                "guest d1",
                format!("{pct:>3}% of its write+verify pairs done ({done}/{total}, {mb:.1} MB)"),
            );
        }
    }

    fn finish(&mut self) {
        if self.tty {
            println!();
        }
    }
}
