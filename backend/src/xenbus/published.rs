//! The disk the block script publishes for a vbd, by identity: a block
//! device as `physical-device` (`%x:%x`) and `diskseq` (`%llx`), or a
//! regular file served directly as `physical-file` and `file-id`. Written by
//! `hotplug add`; read by the lifecycle (which opens exactly that disk),
//! `hotplug remove` and reconciliation (which release only what was
//! published) and `status`.
#![forbid(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};

use xenstore::{Client, Xs};

use super::{key, node};
use crate::disk::{self, DiskError, DiskId, FileId};
use crate::rbd::Spec;

/// What the block script published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Published {
    /// A block device, by (dev_t, diskseq).
    Block(DiskId),
    /// A regular file served directly, by its identity.
    File(PathBuf, FileId),
    /// A Ceph RBD image, by name and id.
    Rbd(Spec, String),
}

impl fmt::Display for Published {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Published::Block(id) => write!(
                f,
                "{} {} {} {}",
                key::PHYSICAL_DEVICE,
                id.physical_device(),
                key::DISKSEQ,
                id.diskseq_hex()
            ),
            Published::File(p, id) => {
                write!(
                    f,
                    "{} {} {} {id}",
                    key::PHYSICAL_FILE,
                    p.display(),
                    key::FILE_ID
                )
            }
            Published::Rbd(spec, id) => {
                write!(f, "{} {spec} {} {id}", key::RBD_IMAGE, key::RBD_IMAGE_ID)
            }
        }
    }
}

impl Published {
    /// The two nodes that name it (for a check of who may write them).
    pub fn keys(&self) -> [&'static str; 2] {
        match self {
            Published::Block(_) => [key::PHYSICAL_DEVICE, key::DISKSEQ],
            Published::File(..) => [key::PHYSICAL_FILE, key::FILE_ID],
            Published::Rbd(..) => [key::RBD_IMAGE, key::RBD_IMAGE_ID],
        }
    }

    /// Publishes it in `be` in one transaction, so that a reader never sees
    /// one node without the other; `found_at` (a block device's path, for
    /// people) as `physical-device-path`.
    pub async fn write(
        &self,
        xs: &Client,
        be: &str,
        found_at: Option<&Path>,
    ) -> Result<(), xenstore::Error> {
        let mut kv: Vec<(String, String)> = match self {
            Published::Block(id) => vec![
                (node(be, key::PHYSICAL_DEVICE), id.physical_device()),
                (node(be, key::DISKSEQ), id.diskseq_hex()),
            ],
            Published::File(p, id) => vec![
                (node(be, key::PHYSICAL_FILE), p.display().to_string()),
                (node(be, key::FILE_ID), id.to_string()),
            ],
            Published::Rbd(spec, id) => vec![
                (node(be, key::RBD_IMAGE), spec.to_string()),
                (node(be, key::RBD_IMAGE_ID), id.clone()),
            ],
        };
        if let Some(p) = found_at {
            kv.push((node(be, key::PHYSICAL_DEVICE_PATH), p.display().to_string()));
        }
        xs.transaction(|tx| {
            let kv = kv.clone();
            async move {
                for (k, v) in &kv {
                    tx.write(k, v).await?;
                }
                Ok(())
            }
        })
        .await
    }
}

/// The nodes a disk is published by, as read together (see [`Nodes::read`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Nodes {
    /// `physical-device`.
    pub physical_device: Option<String>,
    /// `diskseq`.
    pub diskseq: Option<String>,
    /// `physical-file`.
    pub physical_file: Option<String>,
    /// `file-id`.
    pub file_id: Option<String>,
    /// `hotplug-status`.
    pub hotplug_status: Option<String>,
    /// `rbd-image`.
    pub rbd_image: Option<String>,
    /// `rbd-image-id`.
    pub rbd_image_id: Option<String>,
}

impl Nodes {
    /// Reads them in one Xenstore transaction, so that `physical-device`
    /// and `diskseq` (or `physical-file` and `file-id`) are seen as one
    /// snapshot, never one from before a rewrite and one after.
    pub async fn read(xs: &Client, be: &str) -> Result<Nodes, xenstore::Error> {
        xs.transaction(|tx| async move {
            let keys = [
                key::PHYSICAL_DEVICE,
                key::DISKSEQ,
                key::PHYSICAL_FILE,
                key::FILE_ID,
                key::HOTPLUG_STATUS,
                key::RBD_IMAGE,
                key::RBD_IMAGE_ID,
            ]
            .map(|k| node(be, k));
            let reads = keys.iter().map(|k| tx.try_read_text(k));
            let mut v = futures_util::future::join_all(reads).await.into_iter();
            let mut next = || v.next().transpose().map(Option::flatten);
            Ok(Nodes {
                physical_device: next()?,
                diskseq: next()?,
                physical_file: next()?,
                file_id: next()?,
                hotplug_status: next()?,
                rbd_image: next()?,
                rbd_image_id: next()?,
            })
        })
        .await
    }

    /// The published block device, when both of its nodes are there.
    pub fn block(&self) -> Result<Option<DiskId>, DiskError> {
        let (Some(phys), Some(seq)) = (&self.physical_device, &self.diskseq) else {
            return Ok(None);
        };
        let (major, minor) = disk::parse_physical_device(phys.as_bytes())?;
        let diskseq = disk::parse_diskseq(seq.as_bytes())?;
        Ok(Some(DiskId {
            major,
            minor,
            diskseq,
        }))
    }

    /// The published file, when both of its nodes are there.
    pub fn file(&self) -> Result<Option<Published>, DiskError> {
        let (Some(path), Some(id)) = (&self.physical_file, &self.file_id) else {
            return Ok(None);
        };
        Ok(Some(Published::File(
            path.into(),
            FileId::parse(id.as_bytes())?,
        )))
    }

    /// The published RBD image, when both of its nodes are there (an
    /// unreadable one is an error: it names nothing to serve).
    pub fn rbd(&self) -> Result<Option<Published>, String> {
        let (Some(image), Some(id)) = (&self.rbd_image, &self.rbd_image_id) else {
            return Ok(None);
        };
        let spec = Spec::parse(image).map_err(|e| format!("rbd-image {image:?}: {e}"))?;
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(format!("rbd-image-id {id:?} is not an RBD image id"));
        }
        Ok(Some(Published::Rbd(spec, id.clone())))
    }
}
