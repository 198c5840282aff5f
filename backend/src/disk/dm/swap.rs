//! Table swaps and revocation: a new table made live as one transaction
//! (load, suspend, resume) that is rolled back at any failure, so a device is
//! never left suspended or half swapped.

use super::{DevId, DmError, Table, Target};

/// The operations a table swap needs (implemented by [`Control`](super::Control); a test
/// injects failures through it).
pub trait DmOps {
    /// Loads `t` as the inactive table.
    fn load(&self, id: &DevId, t: &Table, read_only: bool) -> Result<(), DmError>;
    /// Suspends (flushing queued I/O unless `noflush`).
    fn suspend(&self, id: &DevId, noflush: bool) -> Result<(), DmError>;
    /// Resumes, making a loaded inactive table live.
    fn resume(&self, id: &DevId) -> Result<(), DmError>;
    /// Drops the inactive table.
    fn clear(&self, id: &DevId) -> Result<(), DmError>;
}

/// Replaces `id`'s live table by `t` as one transaction: load the inactive
/// table, suspend, resume. On any failure the inactive table is cleared and
/// the device resumed on its old table: never left suspended or half swapped.
pub fn swap_table<O: DmOps>(
    ops: &O,
    id: &DevId,
    t: &Table,
    read_only: bool,
) -> Result<(), DmError> {
    swap(ops, id, t, read_only, false)
}

/// [`swap_table`], suspending with `noflush` if asked: I/O the old table
/// holds is then requeued to the new one instead of waited for.
fn swap<O: DmOps>(
    ops: &O,
    id: &DevId,
    t: &Table,
    read_only: bool,
    noflush: bool,
) -> Result<(), DmError> {
    t.check()?;
    let rolled = |step: &'static str, e: DmError| DmError::SwapRolledBack {
        dev: id.to_string(),
        step,
        source: Box::new(e),
    };
    if let Err(e) = ops.load(id, t, read_only) {
        let _ = ops.clear(id);
        return Err(rolled("load", e));
    }
    if let Err(e) = ops.suspend(id, noflush) {
        let _ = ops.clear(id);
        let _ = ops.resume(id);
        return Err(rolled("suspend", e));
    }
    if let Err(e) = ops.resume(id) {
        // The swap did not happen: drop the new table, bring the old one back.
        let _ = ops.clear(id);
        if let Err(again) = ops.resume(id) {
            tracing::error!(%id, "cannot resume after a failed table swap: {again}");
        }
        return Err(rolled("resume", e));
    }
    Ok(())
}

/// Revokes a disk: swaps its table to `error` over the same size, so no
/// further I/O reaches the storage underneath. The suspend does not flush:
/// a flushing suspend waits for the I/O the old table holds, and a thin
/// volume whose pool is out of data space holds its writes until the pool's
/// no-space timeout (dm-thin requeues them only on a `noflush` suspend);
/// requeued, they meet the `error` table.
pub fn revoke<O: DmOps>(ops: &O, id: &DevId, sectors: u64) -> Result<(), DmError> {
    swap(ops, id, &Table::single(sectors, Target::Error), false, true)
}
