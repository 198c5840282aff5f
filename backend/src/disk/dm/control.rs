//! The control device, `/dev/mapper/control`: one method per command we
//! use, each checking its names before the ioctl, and the [`DmOps`] a table
//! swap drives.

use std::fmt;
use std::fs::File;

use super::ioctl::{
    cstr_at, decode_dev, encode_table, u32_at, u64_at, Req, BUFFER_FULL_FLAG, DATA_OUT_FLAG,
    DEFERRED_REMOVE, HEADER, NOFLUSH_FLAG, READONLY_FLAG, SECURE_DATA_FLAG, STATUS_TABLE_FLAG,
    SUSPEND_FLAG, UUID_FLAG,
};
use super::name::check_id;
use super::{
    sys, validate_name, validate_uuid, DevId, DmError, DmOps, Info, Table, NAME_LEN, UUID_LEN,
};

/// The control node.
pub const CONTROL: &str = "/dev/mapper/control";

/// `/dev/mapper/control`.
#[derive(Debug)]
pub struct Control {
    file: File,
}

impl Control {
    /// Opens the control node.
    pub fn open() -> Result<Control, DmError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTROL)
            .map_err(|e| DmError::Ioctl {
                op: "opening",
                dev: CONTROL.into(),
                source: e,
            })?;
        Ok(Control { file })
    }

    /// Runs one command; grows the buffer while the kernel says it is full.
    fn run(
        &self,
        op: &'static str,
        cmd: sys::DmCmd,
        mut req: Req,
        who: &dyn fmt::Display,
    ) -> Result<Req, DmError> {
        loop {
            let mut words: Vec<u64> = req
                .b
                .chunks_exact(8)
                .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
                .collect();
            let r = sys::dm_ioctl(&self.file, cmd, &mut words);
            let out: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let secure = req.flags() & SECURE_DATA_FLAG != 0;
            if secure {
                req.b.fill(0);
            }
            r.map_err(|e| DmError::Ioctl {
                op,
                dev: who.to_string(),
                source: e,
            })?;
            let full = u32_at(&out, 28) & BUFFER_FULL_FLAG != 0;
            if full && !secure && req.b.len() < 16 << 20 {
                // Same request, bigger buffer.
                let bigger = req.b.len() * 4;
                req.b.resize(bigger, 0);
                req.b[12..16].copy_from_slice(&(bigger as u32).to_ne_bytes());
                continue;
            }
            return Ok(Req { b: out });
        }
    }

    /// The driver's interface version.
    pub fn version(&self) -> Result<(u32, u32, u32), DmError> {
        let r = self.run(
            "DM_VERSION",
            sys::DM_VERSION,
            Req::new(None, 0, &[], HEADER),
            &"control",
        )?;
        Ok((u32_at(&r.b, 0), u32_at(&r.b, 4), u32_at(&r.b, 8)))
    }

    /// Creates an empty device (no table: not openable until the first load).
    pub fn create(&self, name: &str, uuid: &str) -> Result<Info, DmError> {
        validate_name(name)?;
        validate_uuid(uuid)?;
        let mut req = Req::new(Some(&DevId::Name(name.into())), 0, &[], HEADER);
        req.b[176..176 + uuid.len()].copy_from_slice(uuid.as_bytes());
        Ok(self
            .run("DM_DEV_CREATE", sys::DM_DEV_CREATE, req, &name)?
            .info())
    }

    /// `DM_DEV_STATUS`.
    pub fn info(&self, id: &DevId) -> Result<Info, DmError> {
        check_id(id)?;
        Ok(self
            .run(
                "DM_DEV_STATUS",
                sys::DM_DEV_STATUS,
                Req::new(Some(id), 0, &[], HEADER),
                id,
            )?
            .info())
    }

    /// Removes a device; `deferred`: when it is open, on its last close.
    pub fn remove(&self, id: &DevId, deferred: bool) -> Result<(), DmError> {
        check_id(id)?;
        let flags = if deferred { DEFERRED_REMOVE } else { 0 };
        self.run(
            "DM_DEV_REMOVE",
            sys::DM_DEV_REMOVE,
            Req::new(Some(id), flags, &[], HEADER),
            id,
        )
        .map(drop)
    }

    /// The live table's lines (`DM_STATUS_TABLE_FLAG`) or status lines:
    /// (start, length, type, params). A crypt key appears in table lines:
    /// never log them.
    pub fn table_lines(
        &self,
        id: &DevId,
        table: bool,
    ) -> Result<Vec<(u64, u64, String, String)>, DmError> {
        check_id(id)?;
        let flags = if table { STATUS_TABLE_FLAG } else { 0 };
        let r = self.run(
            "DM_TABLE_STATUS",
            sys::DM_TABLE_STATUS,
            Req::new(Some(id), flags, &[], 16384),
            id,
        )?;
        let count = u32_at(&r.b, 20);
        let base = r.data_start();
        let mut at = base;
        let mut out = Vec::new();
        for _ in 0..count {
            if at + 40 > r.b.len() {
                break;
            }
            out.push((
                u64_at(&r.b, at),
                u64_at(&r.b, at + 8),
                cstr_at(&r.b, at + 24, 16),
                cstr_at(&r.b, at + 40, r.b.len().saturating_sub(at + 40)),
            ));
            at = base + u32_at(&r.b, at + 20) as usize;
        }
        Ok(out)
    }

    /// Sends a target message (thin-pool `create_thin N`, `create_snap N
    /// ORIGIN`, `delete N`); returns the reply, if any.
    pub fn message(&self, id: &DevId, sector: u64, msg: &str) -> Result<Option<String>, DmError> {
        check_id(id)?;
        let mut payload = sector.to_ne_bytes().to_vec();
        payload.extend_from_slice(msg.as_bytes());
        payload.push(0);
        let r = self.run(
            "DM_TARGET_MSG",
            sys::DM_TARGET_MSG,
            Req::new(Some(id), 0, &payload, 4096),
            id,
        )?;
        Ok((r.flags() & DATA_OUT_FLAG != 0).then(|| cstr_at(&r.b, r.data_start(), r.b.len())))
    }

    /// Every device: (name, major, minor, uuid).
    pub fn list(&self) -> Result<Vec<(String, u32, u32, String)>, DmError> {
        let r = self.run(
            "DM_LIST_DEVICES",
            sys::DM_LIST_DEVICES,
            Req::new(None, UUID_FLAG, &[], 16384),
            &"control",
        )?;
        let mut out = Vec::new();
        let mut at = r.data_start();
        loop {
            if at + 12 > r.b.len() {
                break;
            }
            let dev = u64_at(&r.b, at);
            let next = u32_at(&r.b, at + 8) as usize;
            let name = cstr_at(&r.b, at + 12, NAME_LEN);
            if dev == 0 && name.is_empty() {
                break;
            }
            // After the name's NUL, 8-aligned: event_nr, flags, uuid.
            let after = (at + 12 + name.len() + 1).div_ceil(8) * 8;
            let flags = u32_at(&r.b, after + 4);
            let uuid = if flags & 1 != 0 {
                cstr_at(&r.b, after + 8, UUID_LEN)
            } else {
                String::new()
            };
            let (major, minor) = decode_dev(dev);
            out.push((name, major, minor, uuid));
            if next == 0 {
                break;
            }
            at += next;
        }
        Ok(out)
    }
}

impl DmOps for Control {
    fn load(&self, id: &DevId, t: &Table, read_only: bool) -> Result<(), DmError> {
        check_id(id)?;
        t.check()?;
        let mut flags = if read_only { READONLY_FLAG } else { 0 };
        if t.secret() {
            flags |= SECURE_DATA_FLAG;
        }
        let payload = encode_table(t);
        let mut req = Req::new(Some(id), flags, &payload, HEADER);
        req.set_target_count(t.0.len() as u32);
        self.run("DM_TABLE_LOAD", sys::DM_TABLE_LOAD, req, id)
            .map(drop)
    }

    fn suspend(&self, id: &DevId, noflush: bool) -> Result<(), DmError> {
        check_id(id)?;
        let flags = SUSPEND_FLAG | if noflush { NOFLUSH_FLAG } else { 0 };
        self.run(
            "DM_DEV_SUSPEND",
            sys::DM_DEV_SUSPEND,
            Req::new(Some(id), flags, &[], HEADER),
            id,
        )
        .map(drop)
    }

    fn resume(&self, id: &DevId) -> Result<(), DmError> {
        check_id(id)?;
        self.run(
            "DM_DEV_SUSPEND",
            sys::DM_DEV_SUSPEND,
            Req::new(Some(id), 0, &[], HEADER),
            id,
        )
        .map(drop)
    }

    fn clear(&self, id: &DevId) -> Result<(), DmError> {
        check_id(id)?;
        self.run(
            "DM_TABLE_CLEAR",
            sys::DM_TABLE_CLEAR,
            Req::new(Some(id), 0, &[], HEADER),
            id,
        )
        .map(drop)
    }
}
