//! Binding an operation to the disk a vbd published: a dm device found by
//! name is acted on only if it is that (dev_t, diskseq) and carries our UUID.

use std::io;

use super::{validate_name, Control, DevId, DiskId, DmError, Info, UUID_PREFIX};

/// Whether the device `info` (read by name), whose diskseq is `diskseq`,
/// is the disk `published`; `Err(Replaced)` if not.
pub fn check_published(info: &Info, diskseq: u64, published: DiskId) -> Result<(), DmError> {
    if (info.major, info.minor, diskseq) == (published.major, published.minor, published.diskseq) {
        return Ok(());
    }
    Err(DmError::Replaced {
        name: info.name.clone(),
        published,
        found: format!("{}:{} (diskseq {diskseq})", info.major, info.minor),
    })
}

/// Binds an operation on the dm device called `name` to the disk a vbd
/// published: reads it by name, refuses it unless it carries our UUID and is
/// that dev_t with that diskseq, and returns it addressed by its UUID (fresh
/// for every device we create), so a device re-created under the name
/// meanwhile is never the one acted on: its UUID differs and the ioctls
/// fail.
pub fn bind(ctl: &Control, name: &str, published: DiskId) -> Result<(DevId, Info), DmError> {
    validate_name(name)?;
    let info = ctl.info(&DevId::Name(name.to_owned()))?;
    if !info.uuid.starts_with(UUID_PREFIX) {
        return Err(DmError::NotOurs {
            dev: name.to_owned(),
            uuid: format!("{UUID_PREFIX}..."),
        });
    }
    let path = format!("/sys/dev/block/{}:{}/diskseq", info.major, info.minor);
    let diskseq = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(|| DmError::Ioctl {
            op: "reading the diskseq",
            dev: path.clone(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        })?;
    check_published(&info, diskseq, published)?;
    Ok((DevId::Uuid(info.uuid.clone()), info))
}
