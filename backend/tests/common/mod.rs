//! What the tests that run blkbackd as a process share: starting it,
//! reaching its Xenstore, signalling it and checking that it stops cleanly.
#![allow(dead_code)] // each test binary uses its own part

pub mod tier;

use std::path::Path;
use std::time::Duration;

use xenstore::{Client, Endpoint};

/// The blkbackd binary, as a command.
pub fn blkbackd() -> tokio::process::Command {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_blkbackd"))
}

/// A client of the Xenstore at `sock`, waiting (bounded) for it to come up.
pub async fn wait_socket(sock: &Path) -> Client {
    for _ in 0..400 {
        if let Ok(c) = Client::connect_to(&Endpoint::Socket(sock.into())).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the Xenstore at {} never came up", sock.display());
}

/// Sends `signal` (e.g. "TERM", "HUP") to `child`.
pub fn signal(child: &tokio::process::Child, signal: &str) {
    let pid = child.id().expect("the process already exited").to_string();
    let ok = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal} {pid} failed");
}

/// Waits (at most 20 s) for `child` to exit, and requires success.
pub async fn exits_cleanly(child: &mut tokio::process::Child) {
    let st = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the daemon did not stop")
        .unwrap();
    assert!(st.success(), "{st:?}");
}

/// `blkbackd serve` on the embedded default laid out in `dir` (the
/// simulation in `dir/sim`, Xenstore at `dir/xenstored.sock`), logging at
/// info level to `dir/log`.
pub fn sim_daemon(dir: &Path, log: &str) -> tokio::process::Child {
    sim_daemon_command(dir, log).spawn().unwrap()
}

/// [`sim_daemon`], not started yet (for more options).
pub fn sim_daemon_command(dir: &Path, log: &str) -> tokio::process::Command {
    let mut c = blkbackd();
    c.args(["serve", "--sim"])
        .arg(dir.join("sim"))
        .arg("--xenstore")
        .arg(dir.join("xenstored.sock"))
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(dir.join(log)).unwrap())
        .kill_on_drop(true);
    c
}

/// A simulated guest of domain `domid` on the embedded default in `dir`
/// (see [`sim_daemon`]) doing `mode` (`ios` as that mode reads it); its
/// report on the piped stdout.
pub fn sim_guest(dir: &Path, domid: u16, mode: &str, ios: u32) -> tokio::process::Child {
    blkbackd()
        .args(["sim-guest", "--mode", mode, "--ios", &ios.to_string()])
        .args(["--domid", &domid.to_string(), "--dir"])
        .arg(dir.join("sim"))
        .arg("--xenstore")
        .arg(dir.join("xenstored.sock"))
        .env("RUST_LOG", "off")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Introduces domain `domid` to the Xenstore behind `xs` and gives it its
/// home, as domain creation does.
pub async fn new_domain(xs: &Client, domid: u16) -> xenstore::DomId {
    let d = xenstore::DomId(domid);
    xs.introduce(d, 0, 0).await.unwrap();
    blkbackd::xenbus::toolstack::create_domain_home(xs, d)
        .await
        .unwrap();
    d
}
