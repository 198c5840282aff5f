//! Names and UUIDs: the `blkbackd-<domid>-<devid>[-role]` names, the
//! `BLKBACKD-` UUIDs that mark a device as ours, and the checks every name and
//! UUID passes before it reaches an ioctl.

use std::fmt;
use std::fs::File;
use std::io;

use super::DmError;

/// UUID prefix of every device we make (start-up reconciliation finds them by it).
pub const UUID_PREFIX: &str = "BLKBACKD-";
/// `DM_NAME_LEN`, with the NUL.
pub const NAME_LEN: usize = 128;
/// `DM_UUID_LEN`, with the NUL.
pub const UUID_LEN: usize = 129;

/// How to name a device in an ioctl.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DevId {
    /// By name.
    Name(String),
    /// By UUID.
    Uuid(String),
}

impl fmt::Display for DevId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DevId::Name(n) => write!(f, "dm device {n}"),
            DevId::Uuid(u) => write!(f, "dm device with uuid {u}"),
        }
    }
}

fn bad(what: &'static str, value: &str, why: &'static str) -> DmError {
    DmError::BadName {
        what,
        value: value.chars().take(160).collect(),
        why,
    }
}

/// Checks a device name: what the kernel takes, and nothing that could name
/// another node under /dev/mapper.
pub fn validate_name(name: &str) -> Result<(), DmError> {
    if name.is_empty() {
        return Err(bad("name", name, "it is empty"));
    }
    if name.len() >= NAME_LEN {
        return Err(bad("name", name, "it is longer than 127 bytes"));
    }
    if name == "." || name == ".." || name == "control" {
        return Err(bad("name", name, "it is reserved"));
    }
    if name.contains('/') {
        return Err(bad("name", name, "it contains '/'"));
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad(
            "name",
            name,
            "only printable ASCII without spaces is allowed",
        ));
    }
    Ok(())
}

/// Checks a UUID: ours, within the kernel's length, printable.
pub fn validate_uuid(uuid: &str) -> Result<(), DmError> {
    if !uuid.starts_with(UUID_PREFIX) || uuid.len() == UUID_PREFIX.len() {
        return Err(bad("uuid", uuid, "it must be BLKBACKD- and a unique part"));
    }
    if uuid.len() >= UUID_LEN {
        return Err(bad("uuid", uuid, "it is longer than 128 bytes"));
    }
    if !uuid.bytes().all(|b| b.is_ascii_graphic()) || uuid.contains('/') {
        return Err(bad(
            "uuid",
            uuid,
            "only printable ASCII without spaces or '/' is allowed",
        ));
    }
    Ok(())
}

/// `blkbackd-<domid>-<devid>[-role]`.
pub fn vbd_name(domid: u16, devid: u32, role: Option<&str>) -> Result<String, DmError> {
    let n = match role {
        Some(r) => format!("blkbackd-{domid}-{devid}-{r}"),
        None => format!("blkbackd-{domid}-{devid}"),
    };
    validate_name(&n)?;
    Ok(n)
}

/// A fresh UUID for `name`: `BLKBACKD-<name>-<16 random hex digits>`.
pub fn new_uuid(name: &str) -> Result<String, DmError> {
    let mut r = [0u8; 8];
    let got = File::open("/dev/urandom").and_then(|mut f| io::Read::read_exact(&mut f, &mut r));
    if let Err(e) = got {
        return Err(DmError::Ioctl {
            op: "reading /dev/urandom",
            dev: name.into(),
            source: e,
        });
    }
    let u = format!("{UUID_PREFIX}{name}-{:016x}", u64::from_ne_bytes(r));
    validate_uuid(&u)?;
    Ok(u)
}

/// Checks a device reference before it goes into an ioctl.
pub(super) fn check_id(id: &DevId) -> Result<(), DmError> {
    match id {
        DevId::Name(n) => validate_name(n),
        DevId::Uuid(u) => {
            if u.is_empty() || u.len() >= UUID_LEN {
                return Err(bad("uuid", u, "bad length"));
            }
            Ok(())
        }
    }
}
