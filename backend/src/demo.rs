//! `blkbackd demo`: the embedded default in one command.
//!
//! What it runs today: the embedded Xenstore on a unix socket, a toolstack that
//! creates a vbd the way libxl does (backend and frontend nodes with their
//! permissions in one transaction), a backend side that follows the vbd through
//! the xenbus states by watching Xenstore, and a guest (domain 1, on its own
//! unprivileged connection) that plays blkfront's part of the handshake. The
//! ring and the disk I/O join in as the data path lands; each step prints what
//! it did so a newcomer can follow the protocol.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use xenstore::{Access, Client, DomId, Perm, Server, Watch, Xs};

const GUEST: DomId = DomId(1);
const DEVID: u32 = 51712; // xvda

fn say(who: &str, what: impl AsRef<str>) {
    println!("[{who:<9}] {}", what.as_ref());
}

/// Runs the demo; `dir` holds the socket (a temporary directory if `None`).
pub async fn run(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let tmp;
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            d
        }
        None => {
            tmp = tempdir()?;
            tmp.0.clone()
        }
    };
    let server = Server::default();
    let listening = server.listen(dir.join("xenstore.sock")).await?;
    say(
        "xenstore",
        format!(
            "embedded Xenstore listening at {} (XENSTORED_PATH=... xenstore-ls works against it)",
            listening.path().display()
        ),
    );
    let ep = xenstore::Endpoint::Socket(listening.path().to_path_buf());
    let toolstack = Client::connect_to(&ep).await?;
    let backend = Client::connect_to(&ep).await?;

    let be = format!("/local/domain/0/backend/vbd/{}/{DEVID}", GUEST.0);
    let fe = format!("/local/domain/{}/device/vbd/{DEVID}", GUEST.0);

    // The backend watches for vbds before any exist, as the daemon does.
    let mut vbds = backend.watch("/local/domain/0/backend/vbd").await?;
    next(&mut vbds).await?; // the initial event

    // Toolstack: introduce the guest, give it a home, create the vbd.
    toolstack.introduce(GUEST, 0, 0).await?;
    toolstack
        .transaction(|tx| {
            let (be, fe) = (be.clone(), fe.clone());
            async move {
                let home = format!("/local/domain/{}", GUEST.0);
                tx.mkdir(&home).await?;
                tx.set_perms(&home, &[Perm::new(Access::None, GUEST.0)])
                    .await?;
                let be_perms = [Perm::new(Access::None, 0), Perm::new(Access::Read, GUEST.0)];
                let fe_perms = [Perm::new(Access::None, GUEST.0), Perm::new(Access::Read, 0)];
                for (k, v) in [
                    ("frontend", fe.as_str()),
                    ("frontend-id", "1"),
                    ("online", "1"),
                    ("state", "1"),
                    ("mode", "w"),
                    ("device-type", "disk"),
                    ("params", "/srv/disks/guest1.img"),
                ] {
                    tx.write(&format!("{be}/{k}"), v).await?;
                }
                for (k, v) in [
                    ("backend", be.as_str()),
                    ("backend-id", "0"),
                    ("state", "1"),
                    ("virtual-device", "51712"),
                    ("device-type", "disk"),
                ] {
                    tx.write(&format!("{fe}/{k}"), v).await?;
                }
                set_tree_perms(&tx, &be, &be_perms).await?;
                set_tree_perms(&tx, &fe, &fe_perms).await?;
                Ok(())
            }
        })
        .await?;
    say(
        "toolstack",
        format!("introduced domain 1 and wrote {be} and {fe} in one transaction (backend n0 r1, frontend n1 r0)"),
    );

    // Backend: a new vbd appeared; publish features and go to InitWait at once.
    let ev = next(&mut vbds).await?;
    say("backend", format!("watch fired for {}", ev));
    let mode = backend.read_string(&format!("{be}/mode")).await?;
    let params = backend.read_string(&format!("{be}/params")).await?;
    for (k, v) in [
        ("feature-flush-cache", "1"),
        ("feature-barrier", "1"),
        ("feature-discard", "1"),
        ("feature-max-indirect-segments", "256"),
        ("feature-persistent", "1"),
        ("max-ring-page-order", "4"),
        ("multi-queue-max-queues", "4"),
        ("state", "2"),
    ] {
        backend.write(&format!("{be}/{k}"), v).await?;
    }
    say(
        "backend",
        format!(
            "vbd 1/{DEVID} mode={mode} params={params}: published features, state 2 (InitWait)"
        ),
    );

    // Guest: a separate, unprivileged connection speaking for domain 1.
    let guest = Client::connect_to(&ep).await?;
    guest
        .control(&[xenstore::server::SIM_AS_DOMAIN, "1"])
        .await?;
    let be_state = guest.read_string(&format!("{be}/state")).await?;
    let order = guest
        .read_string(&format!("{be}/max-ring-page-order"))
        .await?;
    say(
        "guest d1",
        format!("reads backend state {be_state}, max-ring-page-order {order}"),
    );
    match guest.write(&format!("{be}/state"), "4").await {
        Err(e) => say(
            "guest d1",
            format!("tries to write the backend's state: refused ({e})"),
        ),
        Ok(()) => bail!("the guest could write the backend directory"),
    }
    let mut be_watch = guest.watch(&format!("{be}/state")).await?;
    next(&mut be_watch).await?;
    guest
        .transaction(|tx| async move {
            tx.write("device/vbd/51712/ring-ref", "8").await?;
            tx.write("device/vbd/51712/event-channel", "5").await?;
            tx.write("device/vbd/51712/protocol", "x86_64-abi").await?;
            tx.write("device/vbd/51712/state", "3").await
        })
        .await?;
    say(
        "guest d1",
        "wrote ring-ref 8, event-channel 5, protocol x86_64-abi; state 3 (Initialised)",
    );

    // Backend: follow the frontend; it reads what the guest wrote, checks it,
    // and connects (the ring mapping arrives with the data path).
    let mut fe_watch = backend.watch(&format!("{fe}/state")).await?;
    wait_state(&backend, &mut fe_watch, &format!("{fe}/state"), "3").await?;
    let ring = backend.read_string(&format!("{fe}/ring-ref")).await?;
    let port = backend.read_string(&format!("{fe}/event-channel")).await?;
    let ring: u32 = ring.parse().context("guest wrote a bad ring-ref")?;
    let port: u32 = port.parse().context("guest wrote a bad event-channel")?;
    backend.write(&format!("{be}/sectors"), "2097152").await?;
    backend.write(&format!("{be}/sector-size"), "512").await?;
    backend.write(&format!("{be}/state"), "4").await?;
    say(
        "backend",
        format!("frontend Initialised: ring-ref {ring}, event-channel {port}; published 2097152 sectors; state 4 (Connected)"),
    );
    wait_state(&guest, &mut be_watch, &format!("{be}/state"), "4").await?;
    guest.write("device/vbd/51712/state", "4").await?;
    say(
        "guest d1",
        "sees the backend Connected; state 4 (Connected)",
    );

    // Toolstack tears it down: Closing, the backend answers Closed, then remove.
    wait_state(&backend, &mut fe_watch, &format!("{fe}/state"), "4").await?;
    toolstack.write(&format!("{be}/online"), "0").await?;
    toolstack.write(&format!("{be}/state"), "5").await?;
    say("toolstack", "detach: online=0, backend state 5 (Closing)");
    backend.write(&format!("{be}/state"), "6").await?;
    say("backend", "nothing in flight; state 6 (Closed)");
    toolstack.rm(&be).await?;
    toolstack.rm(&fe).await?;
    toolstack.release(GUEST).await?;
    say(
        "toolstack",
        "removed both directories and released domain 1",
    );
    println!("demo complete: the xenbus handshake ran over the embedded Xenstore with xenstored's permissions.");
    Ok(())
}

async fn set_tree_perms(
    tx: &xenstore::Transaction,
    dir: &str,
    perms: &[Perm],
) -> xenstore::client::Result<()> {
    tx.set_perms(dir, perms).await?;
    for child in tx.directory(dir).await? {
        tx.set_perms(&format!("{dir}/{child}"), perms).await?;
    }
    Ok(())
}

async fn next(w: &mut Watch) -> anyhow::Result<String> {
    match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
        Ok(Some(ev)) => Ok(ev.path),
        Ok(None) => bail!("the Xenstore connection closed"),
        Err(_) => bail!("no watch event on {} within 10 s", w.path()),
    }
}

/// Waits (by watch) until the node at `path` reads `want`.
async fn wait_state(c: &Client, w: &mut Watch, path: &str, want: &str) -> anyhow::Result<()> {
    loop {
        if c.try_read(path).await?.as_deref() == Some(want.as_bytes()) {
            return Ok(());
        }
        next(w).await?;
    }
}

struct TempDir(PathBuf);

fn tempdir() -> anyhow::Result<TempDir> {
    let base = std::env::temp_dir().join(format!("blkbackd-demo-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    Ok(TempDir(base))
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
