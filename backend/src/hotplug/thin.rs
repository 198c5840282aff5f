//! `thin:POOL/ID:SIZE`: a guest disk as a thin volume of an existing pool.
//!
//! The pool is the operator's (a dm `thin-pool` device named `POOL`); the
//! volume is thin id `ID` in it, created with `create_thin` the first time it
//! is used. `add` activates it as the dm `thin` device
//! `blkbackd-<domid>-<devid>` of `SIZE`, recorded in the backend directory
//! before it is made; `remove` deactivates it. The volume and its data stay
//! in the pool (deleting it is the operator's decision: `dmsetup message
//! POOL 0 "delete ID"`).
#![forbid(unsafe_code)]

use xenstore::{Client, Xs};

use super::{remove_dm, vbd_ids, HotplugError};
use crate::disk::dm::{self, Control, DevId, DevRef, DmError, Table, Target};
use crate::disk::DiskId;
use crate::xenbus::key::DM_NAME;

/// Activates volume `id` of `pool` (creating it if the pool has none by that
/// id) as the vbd's disk of `sectors`; returns its identity.
pub(super) async fn add(
    xs: &Client,
    be: &str,
    pool: &str,
    id: u32,
    sectors: u64,
    writable: bool,
) -> Result<DiskId, HotplugError> {
    let (domid, devid) = vbd_ids(be)?;
    let name = dm::vbd_name(domid, devid, None)?;
    let ctl = Control::open()?;
    let pool_id = DevId::Name(pool.to_owned());
    let info = ctl.info(&pool_id)?;
    let lines = ctl.table_lines(&pool_id, true)?;
    if !matches!(&lines[..], [(_, _, target, _)] if target == "thin-pool") {
        return Err(HotplugError::Params(
            format!("thin:{pool}/{id}"),
            "the pool is not a device-mapper thin-pool",
        ));
    }
    // A pool that cannot take writes is refused with the reason; one with
    // less free space than the volume's size is legal (thin provisioning
    // overcommits) but said.
    if let Some(st) = dm::pool::status_of(&ctl, pool)? {
        if let Some(why) = st.refusal() {
            return Err(HotplugError::Pool {
                pool: pool.to_owned(),
                why,
                status: st.summary(),
            });
        }
        if sectors > st.free_sectors() {
            tracing::warn!(
                backend = be,
                pool,
                "volume {id} of {} MiB is larger than the pool's free data space ({} MiB): \
                 overcommitted; writes will be held or fail when the pool fills ({})",
                sectors >> 11,
                st.free_sectors() >> 11,
                st.summary()
            );
        }
    }
    match ctl.message(&pool_id, 0, &format!("create_thin {id}")) {
        Ok(_) => tracing::info!(backend = be, pool, id, "thin volume created"),
        Err(DmError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(e.into()),
    }
    let table = Table::single(
        sectors,
        Target::Thin {
            pool: DevRef {
                major: info.major,
                minor: info.minor,
            },
            id,
        },
    );
    // Recorded first, so that `remove` undoes a half-finished `add`.
    xs.write(&format!("{be}/{DM_NAME}"), &name).await?;
    match dm::create_disk(&ctl, &name, &table, !writable) {
        Ok(d) => Ok(d.id),
        Err(e) => {
            if let Err(u) = remove(xs, be).await {
                tracing::warn!(backend = be, "undoing a failed thin add: {u}");
            }
            Err(e.into())
        }
    }
}

/// Deactivates the volume (the dm device goes; the volume stays in the pool).
pub(super) async fn remove(xs: &Client, be: &str) -> Result<(), HotplugError> {
    remove_dm(xs, be).await
}
