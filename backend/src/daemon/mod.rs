//! The daemon: watches `backend/vbd`, runs one task per vbd, closes the
//! devices of domains that are gone, and on shutdown hands every device over
//! to the next daemon as it stands (or closes them, when asked to).
//!
//! Watch events are treated as level-triggered: every burst is coalesced into
//! one rescan of the directory, so a guest (or anyone) rewriting nodes fast
//! cannot queue work without bound (XSA-349).
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use xenstore::wire;

pub use crate::vbd::lifecycle::Stop;
use crate::vbd::lifecycle::{self, VbdCtx};
use crate::xen::{DomId, EventChannels, Grants};
use crate::xenbus::{scan, VbdId, VBD_ROOT};

type Key = VbdId;

struct Task {
    handle: JoinHandle<()>,
    stop: watch::Sender<Stop>,
}

/// How long a stopping daemon gives its devices to finish what their rings
/// took (a queue gives its I/O 3 s, then abandons it as a crash would).
pub const STOP_GRACE: Duration = Duration::from_secs(8);

/// Runs until `stop` leaves [`Stop::Run`], then hands every device over
/// ([`Stop::Handover`]: answers published, nothing closed, the next daemon
/// adopts them) or closes them ([`Stop::Close`]), within [`STOP_GRACE`].
pub async fn run<G: Grants, EC: EventChannels>(
    ctx: Arc<VbdCtx<G, EC>>,
    mut stop: watch::Receiver<Stop>,
) -> Result<(), xenstore::Error> {
    let xs = ctx.xs.clone();
    let mut vbds = xs.watch(VBD_ROOT).await?;
    let mut released = xs.watch(wire::RELEASE_DOMAIN).await?;
    let mut tasks: HashMap<Key, Task> = HashMap::new();
    // Devices whose task ended while their directory stayed (failed, or
    // closed with online=1): not restarted until the directory goes away.
    let mut done: HashSet<Key> = HashSet::new();
    let mut vanished: HashSet<Key> = HashSet::new();
    // Each task says when it ends, so a directory re-created at its path
    // while it was closing is picked up at once.
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel::<Key>();
    tracing::info!("blkbackd serving {VBD_ROOT}");
    crate::signals::sd_notify("READY=1");
    // Set when a watch stream ends: the Xenstore connection is gone.
    let mut lost = false;
    loop {
        let present = match scan(&xs).await {
            Ok(p) => p,
            // The connection died under the scan, before a watch said so.
            Err(xenstore::Error::Disconnected(_)) => {
                lost = true;
                break;
            }
            Err(e) => return Err(e),
        };
        // A device whose directory went away while its task still ran (the
        // task is closing it): when the task ends, a directory at that path
        // is a new device (libxl re-attaching the same vdev), to be served.
        for k in tasks.keys() {
            if !present.contains(k) {
                vanished.insert(*k);
            }
        }
        let before: HashSet<DomId> = tasks.keys().map(|k| k.0).collect();
        tasks.retain(|k, t| {
            if t.handle.is_finished() {
                if !vanished.remove(k) {
                    done.insert(*k);
                }
                false
            } else {
                true
            }
        });
        forget_idle_domains(&*ctx.grants, &before, &tasks);
        done.retain(|k| present.contains(k));
        for key in &present {
            if tasks.contains_key(key) || done.contains(key) {
                continue;
            }
            let (tx, rx) = watch::channel(Stop::Run);
            let (c, k, tx_end) = (ctx.clone(), *key, ended_tx.clone());
            let handle = tokio::spawn(async move {
                lifecycle::run(c, k.0, k.1, rx).await;
                let _ = tx_end.send(k);
            });
            tracing::debug!(domid = %key.0, devid = key.1, "new vbd");
            tasks.insert(*key, Task { handle, stop: tx });
        }
        tokio::select! {
            e = vbds.next() => if e.is_none() { lost = true; break },
            e = released.next() => {
                if e.is_none() { lost = true; break }
                let before: HashSet<DomId> = tasks.keys().map(|k| k.0).collect();
                reap_released(&xs, &mut tasks, &mut done).await;
                forget_idle_domains(&*ctx.grants, &before, &tasks);
            }
            Some(k) = ended.recv() => {
                if let Some(t) = tasks.remove(&k) {
                    let _ = t.handle.await;
                    if !vanished.remove(&k) {
                        done.insert(k);
                    }
                    forget_idle_domains(&*ctx.grants, &HashSet::from([k.0]), &tasks);
                }
            }
            _ = stop.changed() => if *stop.borrow() != Stop::Run { break },
        }
        // Coalesce whatever else is already queued into this one rescan.
        while vbds.try_next().is_some() {}
    }
    let mode = *stop.borrow();
    crate::signals::sd_notify("STOPPING=1");
    if lost && mode == Stop::Run {
        // Nothing can be negotiated or closed without Xenstore: stop the
        // rings and exit with an error, so that systemd restarts the daemon,
        // which then adopts the connected devices where they stand.
        tracing::error!(
            devices = tasks.len(),
            "the Xenstore connection is lost: stopping every ring and exiting"
        );
        shutdown(tasks, STOP_GRACE, Stop::Handover).await;
        return Err(xenstore::Error::Disconnected(
            "the Xenstore connection was lost (xenstored restarted or died)".into(),
        ));
    }
    let started = std::time::Instant::now();
    let devices = tasks.len();
    if mode == Stop::Close {
        tracing::info!(devices, "closing every device, as asked");
    } else {
        tracing::info!(
            devices,
            "stopping: handing every device over as it stands (the next daemon adopts them)"
        );
    }
    shutdown(tasks, STOP_GRACE, mode).await;
    tracing::info!(
        devices,
        ms = started.elapsed().as_millis() as u64,
        "every ring stopped and answered what it took"
    );
    Ok(())
}

/// Lets the grant layer drop what it keeps for the domains of `had` that no
/// longer have a vbd being served (a domain's devices all closed).
fn forget_idle_domains<G: Grants>(grants: &G, had: &HashSet<DomId>, tasks: &HashMap<Key, Task>) {
    for d in had {
        if !tasks.keys().any(|k| k.0 == *d) {
            grants.forget_domain(*d);
        }
    }
}

/// A domain went away: close its devices (state Closed, disks let go). The
/// directories stay for the toolstack, whose block-script `remove` reads them
/// to release what `add` made before it deletes them.
async fn reap_released(
    xs: &xenstore::Client,
    tasks: &mut HashMap<Key, Task>,
    done: &mut HashSet<Key>,
) {
    let domids: HashSet<DomId> = tasks.keys().map(|k| k.0).collect();
    for d in domids {
        if matches!(xs.is_domain_introduced(d).await, Ok(true)) {
            continue;
        }
        tracing::info!(domid = %d, "domain released; closing its vbds");
        let gone: Vec<Key> = tasks.keys().filter(|k| k.0 == d).copied().collect();
        let mut stopped = HashMap::new();
        for k in gone {
            if let Some(t) = tasks.remove(&k) {
                stopped.insert(k, t);
            }
            // Not to be restarted while its directory remains.
            done.insert(k);
        }
        shutdown(stopped, Duration::from_secs(5), Stop::Close).await;
    }
}

async fn shutdown(tasks: HashMap<Key, Task>, grace: Duration, how: Stop) {
    for t in tasks.values() {
        let _ = t.stop.send(how);
    }
    for ((d, v), t) in tasks {
        if tokio::time::timeout(grace, t.handle).await.is_err() {
            tracing::warn!(domid = %d, devid = v, "vbd did not close within {grace:?}");
        }
    }
}
