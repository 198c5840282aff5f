//! Making a dm disk: create, load, resume, then bind it to its diskseq and
//! check it still carries our UUID; and the helpers that recognise a thin
//! volume by its live table.

use std::fs::File;

use super::{new_uuid, sys, validate_name, Control, DevId, DiskId, DmError, DmOps, Table};

/// The thin volume a dm device's live table maps, from its table lines: one
/// `thin` target whose parameters are `POOL_MAJOR:POOL_MINOR DEV_ID
/// [EXTERNAL_ORIGIN]` (as the kernel prints them); `None` for anything else.
pub fn thin_target(lines: &[(u64, u64, String, String)]) -> Option<((u32, u32), u32)> {
    let [(_, _, target, params)] = lines else {
        return None;
    };
    if target != "thin" {
        return None;
    }
    let mut words = params.split_ascii_whitespace();
    let (major, minor) = words.next()?.split_once(':')?;
    let pool = (major.parse().ok()?, minor.parse().ok()?);
    let id = words.next()?.parse().ok()?;
    Some((pool, id))
}

/// If block device `major:minor` is a dm device whose live table is one
/// `thin` target: its pool's dev_t and the volume's thin id (so that a thin
/// volume activated by hand is recognised as the volume it is). `None` when
/// it is not, or when device-mapper cannot say.
pub fn thin_volume_of(major: u32, minor: u32) -> Option<((u32, u32), u32)> {
    let name = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/dm/name")).ok()?;
    let name = name.trim_end_matches('\n');
    validate_name(name).ok()?;
    let ctl = Control::open().ok()?;
    // Table lines may hold a crypt key: only a thin line is looked at.
    thin_target(&ctl.table_lines(&DevId::Name(name.to_owned()), true).ok()?)
}

/// A dm disk made and verified: its identity and an fd pinning it.
#[derive(Debug)]
pub struct DmDisk {
    /// Its name.
    pub name: String,
    /// Its UUID.
    pub uuid: String,
    /// (dev_t, diskseq).
    pub id: DiskId,
}

/// Creates `name` with `table`, makes it live, and binds it to a diskseq:
/// opens the node by the dev_t create returned, reads BLKGETDISKSEQ on that
/// fd, then checks by UUID that the dev_t still carries our UUID. Undone
/// (device removed) if any step fails.
pub fn create_disk(
    ctl: &Control,
    name: &str,
    table: &Table,
    read_only: bool,
) -> Result<DmDisk, DmError> {
    table.check()?;
    let uuid = new_uuid(name)?;
    let created = ctl.create(name, &uuid)?;
    let byuuid = DevId::Uuid(uuid.clone());
    let result = (|| {
        ctl.load(&byuuid, table, read_only)?;
        ctl.resume(&byuuid)?;
        let diskseq = {
            let (path, _private) = crate::disk::node_for(created.major, created.minor)?;
            let f = File::open(&path).map_err(|e| DmError::Ioctl {
                op: "opening",
                dev: path.display().to_string(),
                source: e,
            })?;
            sys::diskseq(&f).map_err(|e| DmError::Ioctl {
                op: "BLKGETDISKSEQ",
                dev: path.display().to_string(),
                source: e,
            })?
        };
        let now = ctl.info(&byuuid)?;
        if (now.major, now.minor) != (created.major, created.minor) || now.uuid != uuid {
            return Err(DmError::NotOurs {
                dev: format!("{}:{}", created.major, created.minor),
                uuid: uuid.clone(),
            });
        }
        Ok(DiskId {
            major: created.major,
            minor: created.minor,
            diskseq,
        })
    })();
    match result {
        Ok(id) => Ok(DmDisk {
            name: name.to_owned(),
            uuid,
            id,
        }),
        Err(e) => {
            let _ = ctl.remove(&byuuid, true);
            Err(e)
        }
    }
}
