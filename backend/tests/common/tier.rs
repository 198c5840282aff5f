//! Test tiers. A test that needs more than a plain user's machine says which
//! tier at its start: `if !tier::need(Tier::Loop) { return; }`.
//!
//! - pure: needs nothing (no call);
//! - [`Tier::Loop`]: root with loop devices (`/dev/loop-control`), and
//!   with it mount;
//! - [`Tier::Tool`]: a program the README's test command installs (fio,
//!   promtool, xenstore-utils);
//! - [`Tier::Headers`]: gcc and the C headers it compiles against;
//! - the VM tier is `vm-tests/run`, run by `scripts/test-all` only.
//!
//! Where a tier is missing, a plain `cargo test` reports the test as skipped
//! and why (on the terminal, past libtest's capture) and passes it; where
//! `BLKBACKD_ALL_TIERS` is set (`scripts/test-all`, so CI) a missing tier
//! fails the test: nothing is skipped there.
#![allow(dead_code)] // each test binary uses its own tiers

use std::io::Write;
use std::path::Path;

/// What a test needs.
#[derive(Clone, Copy, Debug)]
pub enum Tier {
    /// Root and loop devices.
    Loop,
    /// Any of these programs: a name on `PATH`, or a path.
    Tool(&'static [&'static str]),
    /// gcc and this header (under /usr/include).
    Headers(&'static str),
    /// A Ceph cluster: `CEPH_CONF` names its ceph.conf, and `rbd` is here.
    Ceph,
}

impl Tier {
    /// Why it is not here, if it is not.
    fn missing(self) -> Option<String> {
        match self {
            Tier::Loop => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/loop-control")
                .err()
                .map(|e| format!("needs root and loop devices (/dev/loop-control: {e})")),
            Tier::Tool(names) => (!names.iter().any(|n| found(n)))
                .then(|| format!("needs {} (the README's test command installs it)", names[0])),
            Tier::Ceph => match std::env::var_os("CEPH_CONF") {
                _ if !found("rbd") => {
                    Some("needs Ceph's rbd (the README's test command installs it)".into())
                }
                Some(c) if Path::new(&c).exists() => None,
                _ => Some(
                    "needs a Ceph cluster: scripts/ceph-cluster start DIR, then \
                     CEPH_CONF=DIR/ceph.conf (scripts/test-all does both)"
                        .into(),
                ),
            },
            Tier::Headers(h) => {
                if !found("gcc") {
                    Some("needs gcc (the README's test command installs it)".into())
                } else if !Path::new("/usr/include").join(h).exists() {
                    Some(format!(
                        "needs /usr/include/{h} (the README's test command installs it)"
                    ))
                } else {
                    None
                }
            }
        }
    }
}

/// A program on `PATH` (a bare name), or an existing file (a path).
fn found(name: &str) -> bool {
    if name.contains('/') {
        return Path::new(name).exists();
    }
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).exists()))
}

/// Whether `tier` is here. Where it is not: a failure under
/// `BLKBACKD_ALL_TIERS`, else a "skipped" line and `false`.
pub fn need(tier: Tier) -> bool {
    let Some(why) = tier.missing() else {
        return true;
    };
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    assert!(
        std::env::var_os("BLKBACKD_ALL_TIERS").is_none(),
        "{test}: {why}; every tier must run here (BLKBACKD_ALL_TIERS is set)"
    );
    // Straight to the terminal: libtest captures only print!'s output.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    false
}
