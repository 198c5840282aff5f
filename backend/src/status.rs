//! `blkbackd status`: every vbd in Xenstore, its state, its disk and what its
//! frontend negotiated, as a table or JSON. (Per-ring counters need a status
//! socket from the daemon, which is not there yet.)
#![forbid(unsafe_code)]

use serde::Serialize;
use xenstore::{Client, Xs};

use crate::abi::sys::XenbusState;
use crate::daemon::VBD_ROOT;

/// One vbd as Xenstore shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VbdStatus {
    /// Guest domain.
    pub domid: String,
    /// Device number.
    pub devid: String,
    /// Backend state, by name.
    pub state: String,
    /// Frontend state, by name.
    pub frontend_state: String,
    /// What the toolstack asked to serve.
    pub params: Option<String>,
    /// `r` or `w`.
    pub mode: Option<String>,
    /// The disk the block script published (hex major:minor).
    pub physical_device: Option<String>,
    /// Its diskseq (hex).
    pub diskseq: Option<String>,
    /// Whether the daemon opened and verified it.
    pub opened: bool,
    /// Size in 512-byte sectors.
    pub sectors: Option<u64>,
    /// The block script's status.
    pub hotplug_status: Option<String>,
    /// Why the device failed, if it did.
    pub error: Option<String>,
    /// Negotiated ring-page-order.
    pub ring_page_order: u32,
    /// Negotiated queues.
    pub queues: u32,
    /// Request layout.
    pub protocol: Option<String>,
    /// Persistent grants in use.
    pub persistent: bool,
}

fn state_name(v: Option<&str>) -> String {
    match v.and_then(XenbusState::parse) {
        Some(s) => format!("{s:?}"),
        None => v.map_or_else(|| "-".to_owned(), |v| format!("invalid ({v})")),
    }
}

async fn get(xs: &Client, p: &str) -> Result<Option<String>, xenstore::Error> {
    Ok(xs
        .try_read(p)
        .await?
        .map(|v| String::from_utf8_lossy(&v).into_owned()))
}

/// Reads the status of every vbd below [`VBD_ROOT`].
pub async fn collect(xs: &Client) -> Result<Vec<VbdStatus>, xenstore::Error> {
    let mut out = Vec::new();
    let domids = match xs.directory(VBD_ROOT).await {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(out),
        Err(e) => return Err(e),
    };
    for domid in domids {
        let devids = xs
            .directory(&format!("{VBD_ROOT}/{domid}"))
            .await
            .unwrap_or_default();
        for devid in devids {
            let be = format!("{VBD_ROOT}/{domid}/{devid}");
            let fe = get(xs, &format!("{be}/frontend")).await?;
            let fget = |k: &'static str| {
                let fe = fe.clone();
                async move {
                    match fe {
                        Some(fe) => get(xs, &format!("{fe}/{k}")).await,
                        None => Ok(None),
                    }
                }
            };
            let num = |v: Option<String>| v.and_then(|s| s.parse::<u32>().ok());
            out.push(VbdStatus {
                state: state_name(get(xs, &format!("{be}/state")).await?.as_deref()),
                frontend_state: state_name(fget("state").await?.as_deref()),
                params: get(xs, &format!("{be}/params")).await?,
                mode: get(xs, &format!("{be}/mode")).await?,
                physical_device: get(xs, &format!("{be}/physical-device")).await?,
                diskseq: get(xs, &format!("{be}/diskseq")).await?,
                opened: get(xs, &format!("{be}/opened")).await?.as_deref() == Some("1"),
                sectors: get(xs, &format!("{be}/sectors"))
                    .await?
                    .and_then(|s| s.parse().ok()),
                hotplug_status: get(xs, &format!("{be}/hotplug-status")).await?,
                error: get(xs, &format!("{be}/error")).await?,
                ring_page_order: num(fget("ring-page-order").await?).unwrap_or(0),
                queues: num(fget("multi-queue-num-queues").await?).unwrap_or(1),
                protocol: fget("protocol").await?,
                persistent: fget("feature-persistent").await?.as_deref() == Some("1"),
                domid: domid.clone(),
                devid,
            });
        }
    }
    Ok(out)
}

/// A human-readable table.
pub fn table(vbds: &[VbdStatus]) -> String {
    let mut s = format!(
        "{:<6} {:<7} {:<12} {:<12} {:<10} {:<8} {:>10} {:<5} {:<6} {}\n",
        "domid",
        "devid",
        "state",
        "frontend",
        "disk",
        "diskseq",
        "sectors",
        "order",
        "queues",
        "params"
    );
    for v in vbds {
        s += &format!(
            "{:<6} {:<7} {:<12} {:<12} {:<10} {:<8} {:>10} {:<5} {:<6} {}{}\n",
            v.domid,
            v.devid,
            v.state,
            v.frontend_state,
            v.physical_device.as_deref().unwrap_or("-"),
            v.diskseq.as_deref().unwrap_or("-"),
            v.sectors.map_or_else(|| "-".to_owned(), |n| n.to_string()),
            v.ring_page_order,
            v.queues,
            v.params.as_deref().unwrap_or("-"),
            v.error
                .as_ref()
                .map_or_else(String::new, |e| format!("  [error: {e}]")),
        );
    }
    s
}
