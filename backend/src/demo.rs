//! `blkbackd demo`: the embedded default in one command.
//!
//! What it runs: the embedded Xenstore and the simulated hypervisor in one
//! directory; dom0's side (toolstack and backend) in this process; two guests,
//! each a separate `blkbackd sim-guest` process with its own memory and grant
//! table. Guest 1 is a well-behaved blkfront doing verified I/O; guest 2
//! corrupts its ring's producer index. The backend serves guest 1 to the last
//! byte and halts only guest 2's ring, with the reason in its `error` node.
//! Each step prints what it did so a newcomer can follow the protocol.

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
    let _tmp;
    let dir = match dir {
        Some(d) => d,
        None => {
            let t = TempDir::new()?;
            let p = t.0.clone();
            _tmp = t;
            p
        }
    };
    let exe = match exe {
        Some(e) => e,
        None => std::env::current_exe().context("finding the blkbackd binary")?,
    };
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

    let guest = |d: DomId, mode: &str, extra: &[&str]| {
        let mut c = world.guest_command(&exe, d, mode);
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
