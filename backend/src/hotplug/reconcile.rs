//! Start-up reconciliation of what block scripts made: the loop and dm
//! devices a crash between a script's `add` and its `remove` left behind,
//! released when no vbd in Xenstore claims them. Beside `add` and `remove`,
//! since it undoes what they make, by the same records.
#![forbid(unsafe_code)]

use std::collections::HashSet;

use xenstore::Xs;

use crate::xenbus;

/// Start-up reconciliation: removes the dm devices with our UUID prefix
/// that no vbd in Xenstore claims (left by a crash between a block script's
/// `add` and its `remove`); removal is deferred while one is open. Does
/// nothing where device-mapper is absent.
pub async fn reconcile_dm(xs: &xenstore::Client) -> Result<Vec<String>, xenstore::Error> {
    if !std::path::Path::new(crate::disk::dm::CONTROL).exists() {
        return Ok(Vec::new());
    }
    let mut claimed = HashSet::new();
    for (domid, devid) in xenbus::scan(xs).await? {
        let key = xenbus::node(&xenbus::backend_path(domid, devid), xenbus::key::DM_NAME);
        if let Some(v) = xs.try_read(&key).await? {
            claimed.insert(String::from_utf8_lossy(&v).into_owned());
        }
    }
    let removed = crate::disk::dm::Control::open()
        .and_then(|ctl| crate::disk::dm::reconcile(&ctl, |name| claimed.contains(name)));
    match removed {
        Ok(names) => {
            for n in &names {
                tracing::info!(name = n, "removed a dm device no vbd claims");
            }
            Ok(names)
        }
        Err(e) => {
            tracing::warn!("cannot reconcile dm devices: {e}");
            Ok(Vec::new())
        }
    }
}

/// Start-up reconciliation of loop devices: releases those we made (marked
/// in `lo_file_name`) that no vbd in Xenstore still uses, as a crash between
/// a block script's `add` and its `remove` leaves them. One still open
/// elsewhere detaches on its last close.
pub async fn reconcile_loops(
    xs: &xenstore::Client,
) -> Result<Vec<crate::disk::DiskId>, xenstore::Error> {
    let mut claimed = HashSet::new();
    for (domid, devid) in xenbus::scan(xs).await? {
        let be = xenbus::backend_path(domid, devid);
        match super::loops_of(xs, &be).await {
            Ok(ids) => claimed.extend(ids),
            Err(super::HotplugError::Xenstore(e)) => return Err(e),
            Err(e) => tracing::warn!(backend = be, "cannot read its loop devices: {e}"),
        }
    }
    let released = tokio::task::spawn_blocking(move || {
        crate::disk::loopdev::reconcile(|id| claimed.contains(&id), |_| true)
    })
    .await
    .unwrap_or_default();
    for f in &released {
        tracing::info!(dev = %f.id, backing = %f.backing.display(), "released a loop device no vbd claims");
    }
    Ok(released.into_iter().map(|f| f.id).collect())
}
