//! `blkbackd attach` / `detach`: what libxl does for a vbd, for operators and
//! toolstacks without libxl. Attach writes the backend and frontend nodes and
//! their permissions in one transaction, waits for the daemon's InitWait (as
//! libxl does, 10 s), then runs the block script's `add`; detach writes
//! `online = 0` and Closing in one transaction, waits for Closed (10 s), runs
//! the script's `remove` and deletes the nodes.
#![forbid(unsafe_code)]

use std::time::Duration;

use xenstore::{Client, DomId, Xs};

use crate::abi::sys::XenbusState;
use crate::hotplug::{self, HotplugError};
use crate::xenbus::toolstack::{self, VbdPaths};

/// libxl's timeouts for InitWait after creation and Closed after Closing.
pub const LIBXL_TIMEOUT: Duration = Duration::from_secs(10);

/// An attach or detach failure.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// A bad `--vdev`.
    #[error("vdev {0:?} is not xvdX (a..p) or a device number")]
    Vdev(String),
    /// The daemon did not answer in time.
    #[error("{path} did not become {want} within {secs} s (is `blkbackd serve` running?)")]
    Timeout {
        /// The node.
        path: String,
        /// The value wanted.
        want: String,
        /// How long we waited.
        secs: u64,
    },
    /// The block script failed.
    #[error(transparent)]
    Hotplug(#[from] HotplugError),
    /// Xenstore failed.
    #[error(transparent)]
    Xenstore(#[from] xenstore::Error),
}

/// The device number of a vdev name: `xvda` is 51712 (202 << 8), `xvdb`
/// 51728, ...; a plain number is taken as it is.
pub fn devid_of(vdev: &str) -> Result<u32, AttachError> {
    if let Some(n) = xenstore::wire::parse_decimal(vdev).and_then(|n| u32::try_from(n).ok()) {
        return Ok(n);
    }
    let bad = || AttachError::Vdev(vdev.to_owned());
    let letter = vdev.strip_prefix("xvd").ok_or_else(bad)?;
    match letter.as_bytes() {
        [c @ b'a'..=b'p'] => Ok((202 << 8) | (u32::from(c - b'a') << 4)),
        _ => Err(bad()),
    }
}

/// Waits by watch, at most [`LIBXL_TIMEOUT`], until `path` reads `want`.
pub async fn wait_value(xs: &Client, path: &str, want: &str) -> Result<(), AttachError> {
    let mut w = xs.watch(path).await?;
    let deadline = tokio::time::Instant::now() + LIBXL_TIMEOUT;
    loop {
        if xs.try_read(path).await?.as_deref() == Some(want.as_bytes()) {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, w.next()).await {
            Ok(Some(_)) => {}
            _ => {
                return Err(AttachError::Timeout {
                    path: path.to_owned(),
                    want: want.to_owned(),
                    secs: LIBXL_TIMEOUT.as_secs(),
                })
            }
        }
    }
}

/// Attaches `params` to domain `domid` as device `devid`; returns the paths
/// and the disk the block script published.
pub async fn attach(
    xs: &Client,
    domid: DomId,
    devid: u32,
    params: &str,
    writable: bool,
) -> Result<(VbdPaths, crate::xenbus::Published), AttachError> {
    let mode = if writable { "w" } else { "r" };
    let paths = toolstack::create_vbd(xs, domid, devid, params, mode).await?;
    let built = async {
        wait_value(
            xs,
            &format!("{}/state", paths.backend),
            XenbusState::InitWait.as_str(),
        )
        .await?;
        let rel = crate::xenbus::backend_rel(domid, devid);
        Ok::<_, AttachError>(hotplug::add(xs, &rel).await?)
    };
    match built.await {
        Ok(id) => Ok((paths, id)),
        Err(e) => {
            // As libxl does when a block script fails: remove the device
            // (the daemon closes it at once), so nothing is left behind.
            if let Err(undo) = detach(xs, domid, devid).await {
                tracing::warn!("removing the failed vbd: {undo}");
            }
            Err(e)
        }
    }
}

/// Detaches device `devid` of domain `domid`.
pub async fn detach(xs: &Client, domid: DomId, devid: u32) -> Result<(), AttachError> {
    let paths = VbdPaths::new(domid, devid);
    let be = paths.backend.clone();
    xs.transaction(|tx| {
        let be = be.clone();
        async move {
            tx.write(&format!("{be}/online"), "0").await?;
            tx.write(&format!("{be}/state"), XenbusState::Closing.as_str())
                .await
        }
    })
    .await?;
    wait_value(xs, &format!("{be}/state"), XenbusState::Closed.as_str()).await?;
    hotplug::remove(xs, &crate::xenbus::backend_rel(domid, devid)).await?;
    xs.rm(&paths.backend).await?;
    xs.rm(&paths.frontend).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vdev_names_map_to_xen_device_numbers() {
        assert_eq!(devid_of("xvda").unwrap(), 51712);
        assert_eq!(devid_of("xvdb").unwrap(), 51728);
        assert_eq!(devid_of("xvdp").unwrap(), 51952);
        assert_eq!(devid_of("768").unwrap(), 768);
        for bad in ["xvdq", "xvd", "sda", "xvdaa", "-1", ""] {
            assert!(devid_of(bad).is_err(), "{bad}");
        }
    }
}
