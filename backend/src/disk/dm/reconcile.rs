//! Start-up reconciliation: removing the devices with our UUID prefix that
//! no vbd claims (left by a crash).

use super::{Control, DevId, DmError, UUID_PREFIX};

/// Removes every device with our UUID prefix whose name `claimed` does not
/// accept (deferred when open); returns the names removed.
pub fn reconcile(ctl: &Control, claimed: impl Fn(&str) -> bool) -> Result<Vec<String>, DmError> {
    let mut gone = Vec::new();
    for (name, _, _, uuid) in ctl.list()? {
        if uuid.starts_with(UUID_PREFIX) && !claimed(&name) {
            match ctl.remove(&DevId::Uuid(uuid.clone()), true) {
                Ok(()) => gone.push(name),
                Err(e) => tracing::warn!(name, "cannot remove an unclaimed dm device: {e}"),
            }
        }
    }
    Ok(gone)
}
