//! What libxl does for a vbd (for `blkbackd attach`, the embedded default
//! and the tests): the backend and frontend directories with their
//! permissions, in one transaction (a separate write-then-chmod loses a race
//! with the frontend's probe).
#![forbid(unsafe_code)]

use xenstore::{Access, Client, DomId, Perm, Xs};

/// The paths of one vbd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VbdPaths {
    /// `/local/domain/0/backend/vbd/<domid>/<devid>`.
    pub backend: String,
    /// `/local/domain/<domid>/device/vbd/<devid>`.
    pub frontend: String,
}

impl VbdPaths {
    /// The paths for `devid` of `domid`, served by dom0.
    pub fn new(domid: DomId, devid: u32) -> VbdPaths {
        VbdPaths {
            backend: super::backend_path(domid, devid),
            frontend: super::frontend_path(domid, devid),
        }
    }
}

/// Gives `domid` its home directory, owned by it (as domain creation does).
pub async fn create_domain_home(xs: &Client, domid: DomId) -> xenstore::client::Result<()> {
    let home = super::domain_home(domid);
    xs.transaction(|tx| {
        let home = home.clone();
        async move {
            tx.mkdir(&home).await?;
            tx.set_perms(&home, &[Perm::new(Access::None, domid.0)])
                .await?;
            tx.mkdir(&format!("{home}/device")).await?;
            tx.set_perms(
                &format!("{home}/device"),
                &[Perm::new(Access::None, domid.0)],
            )
            .await
        }
    })
    .await
}

/// Creates the vbd's backend and frontend nodes with libxl's permissions
/// (backend `n0 r<domid>`, frontend `n<domid> r0`) in one transaction.
pub async fn create_vbd(
    xs: &Client,
    domid: DomId,
    devid: u32,
    params: &str,
    mode: &str,
) -> xenstore::client::Result<VbdPaths> {
    create_vbd_with(xs, domid, devid, params, mode, true).await
}

/// [`create_vbd`] with libxl's `discard-enable` said (`false`: the disk
/// spec's `no-discard`).
pub async fn create_vbd_with(
    xs: &Client,
    domid: DomId,
    devid: u32,
    params: &str,
    mode: &str,
    discard: bool,
) -> xenstore::client::Result<VbdPaths> {
    let paths = VbdPaths::new(domid, devid);
    let (be, fe) = (paths.backend.clone(), paths.frontend.clone());
    let params = params.to_owned();
    let mode = mode.to_owned();
    xs.transaction(|tx| {
        let (be, fe, params, mode) = (be.clone(), fe.clone(), params.clone(), mode.clone());
        async move {
            let be_perms = [Perm::new(Access::None, 0), Perm::new(Access::Read, domid.0)];
            let fe_perms = [Perm::new(Access::None, domid.0), Perm::new(Access::Read, 0)];
            let id = domid.0.to_string();
            let dev = devid.to_string();
            let be_keys = [
                ("frontend", fe.as_str()),
                ("frontend-id", id.as_str()),
                ("online", "1"),
                ("state", "1"),
                ("mode", mode.as_str()),
                ("device-type", "disk"),
                ("params", params.as_str()),
                ("discard-enable", if discard { "1" } else { "0" }),
            ];
            let fe_keys = [
                ("backend", be.as_str()),
                ("backend-id", "0"),
                ("state", "1"),
                ("virtual-device", dev.as_str()),
                ("device-type", "disk"),
            ];
            tx.mkdir(&be).await?;
            tx.set_perms(&be, &be_perms).await?;
            for (k, v) in be_keys {
                tx.write(&format!("{be}/{k}"), v).await?;
                tx.set_perms(&format!("{be}/{k}"), &be_perms).await?;
            }
            tx.mkdir(&fe).await?;
            tx.set_perms(&fe, &fe_perms).await?;
            for (k, v) in fe_keys {
                tx.write(&format!("{fe}/{k}"), v).await?;
                tx.set_perms(&format!("{fe}/{k}"), &fe_perms).await?;
            }
            Ok(())
        }
    })
    .await?;
    Ok(paths)
}
