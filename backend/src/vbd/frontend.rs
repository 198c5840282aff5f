//! What the frontend wrote: ring references, event channels, protocol and
//! features, read and checked before anything is mapped. Every value here is
//! guest-written: parsed strictly, bounded by what we offered.
#![forbid(unsafe_code)]

use xenstore::Xs;

use crate::abi::blkif::{Abi, GrantRef};
use crate::xen::Port;

/// One queue's ring: its pages (in order) and event channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueRing {
    /// Grant references of the ring pages.
    pub refs: Vec<GrantRef>,
    /// The frontend's event-channel port.
    pub port: Port,
}

/// The frontend's side of the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendConfig {
    /// Request layout.
    pub abi: Abi,
    /// Ring size: 2^order pages per queue.
    pub order: u32,
    /// One entry per queue.
    pub queues: Vec<QueueRing>,
    /// Whether the frontend wants persistent grants.
    pub persistent: bool,
}

/// A frontend wrote something we cannot accept.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// A key is missing.
    #[error("frontend did not write {0}")]
    Missing(String),
    /// A key holds something other than what the protocol allows.
    #[error("frontend wrote an invalid {key}: {value:?}")]
    Invalid {
        /// The key.
        key: String,
        /// What it holds (truncated).
        value: String,
    },
    /// Above what we offered.
    #[error("frontend asked for {key} = {value}, more than the {max} offered")]
    TooMuch {
        /// The key.
        key: &'static str,
        /// What it asked.
        value: u32,
        /// What we offered.
        max: u32,
    },
    /// Xenstore failed.
    #[error(transparent)]
    Xenstore(#[from] xenstore::Error),
}

/// Parses a guest-written unsigned decimal strictly: digits only, fits in u32.
pub fn parse_u32(key: &str, raw: &[u8]) -> Result<u32, FrontendError> {
    let invalid = || FrontendError::Invalid {
        key: key.to_owned(),
        value: String::from_utf8_lossy(&raw[..raw.len().min(32)]).into_owned(),
    };
    let s = std::str::from_utf8(raw).map_err(|_| invalid())?;
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    s.parse().map_err(|_| invalid())
}

async fn need(xs: &impl Xs, path: &str) -> Result<Vec<u8>, FrontendError> {
    xs.try_read(path)
        .await?
        .ok_or_else(|| FrontendError::Missing(path.to_owned()))
}

async fn read_u32(xs: &impl Xs, path: &str) -> Result<Option<u32>, FrontendError> {
    match xs.try_read(path).await? {
        None => Ok(None),
        Some(v) => parse_u32(path, &v).map(Some),
    }
}

/// Reads the frontend's keys below `fe` and checks them against what we offered
/// (`max_order`, `max_queues`).
pub async fn read(
    xs: &impl Xs,
    fe: &str,
    max_order: u32,
    max_queues: u32,
) -> Result<FrontendConfig, FrontendError> {
    let protocol = xs.try_read(&format!("{fe}/protocol")).await?;
    let abi = match &protocol {
        None => Abi::from_protocol(None),
        Some(p) => std::str::from_utf8(p)
            .ok()
            .and_then(|p| Abi::from_protocol(Some(p))),
    }
    .ok_or_else(|| {
        let raw = protocol.as_deref().unwrap_or_default();
        FrontendError::Invalid {
            key: "protocol".into(),
            value: String::from_utf8_lossy(&raw[..raw.len().min(32)]).into_owned(),
        }
    })?;
    // Like blkback: a ring-page-order key (even 0) means numbered ring-refN keys.
    let order_key = read_u32(xs, &format!("{fe}/ring-page-order")).await?;
    let order = order_key.unwrap_or(0);
    if order > max_order {
        return Err(FrontendError::TooMuch {
            key: "ring-page-order",
            value: order,
            max: max_order,
        });
    }
    let nq = read_u32(xs, &format!("{fe}/multi-queue-num-queues"))
        .await?
        .unwrap_or(1);
    if nq == 0 || nq > max_queues {
        return Err(FrontendError::TooMuch {
            key: "multi-queue-num-queues",
            value: nq,
            max: max_queues,
        });
    }
    let mut queues = Vec::with_capacity(nq as usize);
    for q in 0..nq {
        let dir = if nq == 1 {
            fe.to_owned()
        } else {
            format!("{fe}/queue-{q}")
        };
        let refs = if order_key.is_none() {
            let p = format!("{dir}/ring-ref");
            vec![GrantRef(parse_u32(&p, &need(xs, &p).await?)?)]
        } else {
            let mut refs = Vec::with_capacity(1 << order);
            for i in 0..(1u32 << order) {
                let p = format!("{dir}/ring-ref{i}");
                refs.push(GrantRef(parse_u32(&p, &need(xs, &p).await?)?));
            }
            refs
        };
        let p = format!("{dir}/event-channel");
        let port = Port(parse_u32(&p, &need(xs, &p).await?)?);
        queues.push(QueueRing { refs, port });
    }
    let persistent = read_u32(xs, &format!("{fe}/feature-persistent"))
        .await?
        .unwrap_or(0)
        == 1;
    Ok(FrontendConfig {
        abi,
        order,
        queues,
        persistent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use xenstore::{Client, DomId, Server};

    async fn store(kv: &[(&str, &str)]) -> Client {
        let server = Server::default();
        let c = Client::from_stream(server.connect_as(DomId::DOM0).unwrap());
        for (k, v) in kv {
            c.write(&format!("/fe/{k}"), v).await.unwrap();
        }
        c
    }

    #[tokio::test]
    async fn single_page_single_queue_as_old_frontends_write_it() {
        let c = store(&[("ring-ref", "8"), ("event-channel", "5")]).await;
        let cfg = read(&c, "/fe", 4, 4).await.unwrap();
        assert_eq!(cfg.abi, Abi::X86_32, "no protocol key: the x86_32 layout");
        assert_eq!(
            cfg.queues,
            vec![QueueRing {
                refs: vec![GrantRef(8)],
                port: Port(5)
            }]
        );
    }

    #[tokio::test]
    async fn multi_page_multi_queue() {
        let c = store(&[
            ("protocol", "x86_64-abi"),
            ("ring-page-order", "1"),
            ("multi-queue-num-queues", "2"),
            ("queue-0/ring-ref0", "10"),
            ("queue-0/ring-ref1", "11"),
            ("queue-0/event-channel", "7"),
            ("queue-1/ring-ref0", "20"),
            ("queue-1/ring-ref1", "21"),
            ("queue-1/event-channel", "8"),
            ("feature-persistent", "1"),
        ])
        .await;
        let cfg = read(&c, "/fe", 4, 4).await.unwrap();
        assert_eq!((cfg.abi, cfg.order, cfg.persistent), (Abi::X86_64, 1, true));
        assert_eq!(
            cfg.queues[1],
            QueueRing {
                refs: vec![GrantRef(20), GrantRef(21)],
                port: Port(8)
            }
        );
    }

    #[tokio::test]
    async fn guest_written_values_are_checked() {
        for (kv, bad) in [
            (vec![("ring-ref", "8x"), ("event-channel", "5")], "invalid"),
            (vec![("ring-ref", "-1"), ("event-channel", "5")], "invalid"),
            (
                vec![("ring-ref", "99999999999"), ("event-channel", "5")],
                "invalid",
            ),
            (vec![("ring-ref", "8")], "did not write"),
            (
                vec![
                    ("ring-page-order", "5"),
                    ("ring-ref0", "1"),
                    ("event-channel", "5"),
                ],
                "more than",
            ),
            (
                vec![
                    ("multi-queue-num-queues", "0"),
                    ("ring-ref", "1"),
                    ("event-channel", "5"),
                ],
                "more than",
            ),
            (
                vec![
                    ("multi-queue-num-queues", "9"),
                    ("ring-ref", "1"),
                    ("event-channel", "5"),
                ],
                "more than",
            ),
            (
                vec![
                    ("protocol", "sparc-abi"),
                    ("ring-ref", "1"),
                    ("event-channel", "5"),
                ],
                "invalid",
            ),
        ] {
            let c = store(&kv).await;
            let e = read(&c, "/fe", 4, 4).await.unwrap_err().to_string();
            assert!(e.contains(bad), "{kv:?}: {e}");
        }
    }
}
