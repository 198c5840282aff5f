//! The ioctl encoding: a `struct dm_ioctl` request built and read at the
//! byte offsets of `linux/dm-ioctl.h` ([`Req`]), its flags, a table encoded
//! as `DM_TABLE_LOAD` takes it, and what `DM_DEV_STATUS` says ([`Info`]).

use super::{sys, DevId, Table, NAME_LEN, UUID_LEN};

/// `sizeof(struct dm_ioctl)`: where a request's payload starts.
pub(super) const HEADER: usize = sys::DM_IOCTL_SIZE;

pub(super) const READONLY_FLAG: u32 = 1 << 0;
pub(super) const SUSPEND_FLAG: u32 = 1 << 1;
pub(super) const STATUS_TABLE_FLAG: u32 = 1 << 4;
pub(super) const ACTIVE_PRESENT_FLAG: u32 = 1 << 5;
pub(super) const INACTIVE_PRESENT_FLAG: u32 = 1 << 6;
pub(super) const BUFFER_FULL_FLAG: u32 = 1 << 8;
pub(super) const NOFLUSH_FLAG: u32 = 1 << 11;
pub(super) const UUID_FLAG: u32 = 1 << 14;
pub(super) const SECURE_DATA_FLAG: u32 = 1 << 15;
pub(super) const DATA_OUT_FLAG: u32 = 1 << 16;
pub(super) const DEFERRED_REMOVE: u32 = 1 << 17;

/// What `DM_DEV_STATUS` says of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    /// Its name.
    pub name: String,
    /// Its UUID.
    pub uuid: String,
    /// Its dev_t.
    pub major: u32,
    /// See `major`.
    pub minor: u32,
    /// Opens.
    pub open_count: i32,
    /// Suspended now.
    pub suspended: bool,
    /// A live table is loaded.
    pub active: bool,
    /// An inactive table waits.
    pub inactive: bool,
}

/// A `struct dm_ioctl` buffer with payload.
pub(super) struct Req {
    pub(super) b: Vec<u8>,
}

pub(super) fn cstr_at(b: &[u8], at: usize, max: usize) -> String {
    let end = (at + max).min(b.len());
    let s = &b[at.min(end)..end];
    let n = s.iter().position(|&c| c == 0).unwrap_or(s.len());
    String::from_utf8_lossy(&s[..n]).into_owned()
}

pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map(|s| u32::from_ne_bytes(s.try_into().expect("4 bytes")))
        .unwrap_or(0)
}

pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map(|s| u64::from_ne_bytes(s.try_into().expect("8 bytes")))
        .unwrap_or(0)
}

/// `huge_encode_dev` decoded (the encoding of dm's and loop's ioctls).
pub(crate) fn decode_dev(d: u64) -> (u32, u32) {
    let major = ((d >> 8) & 0xfff) as u32;
    let minor = ((d & 0xff) | ((d >> 12) & 0xfff_ff00)) as u32;
    (major, minor)
}

impl Req {
    pub(super) fn new(id: Option<&DevId>, flags: u32, payload: &[u8], size: usize) -> Req {
        let size = size.max(HEADER + payload.len()).div_ceil(8) * 8;
        let mut b = vec![0u8; size];
        for (i, v) in [4u32, 0, 0].iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        b[12..16].copy_from_slice(&(size as u32).to_ne_bytes());
        b[16..20].copy_from_slice(&(HEADER as u32).to_ne_bytes());
        b[28..32].copy_from_slice(&flags.to_ne_bytes());
        match id {
            Some(DevId::Name(n)) => b[48..48 + n.len()].copy_from_slice(n.as_bytes()),
            Some(DevId::Uuid(u)) => b[176..176 + u.len()].copy_from_slice(u.as_bytes()),
            None => {}
        }
        b[HEADER..HEADER + payload.len()].copy_from_slice(payload);
        Req { b }
    }

    pub(super) fn set_target_count(&mut self, n: u32) {
        self.b[20..24].copy_from_slice(&n.to_ne_bytes());
    }

    pub(super) fn flags(&self) -> u32 {
        u32_at(&self.b, 28)
    }

    pub(super) fn data_start(&self) -> usize {
        u32_at(&self.b, 16) as usize
    }

    pub(super) fn info(&self) -> Info {
        let (major, minor) = decode_dev(u64_at(&self.b, 40));
        let f = self.flags();
        Info {
            name: cstr_at(&self.b, 48, NAME_LEN),
            uuid: cstr_at(&self.b, 176, UUID_LEN),
            major,
            minor,
            open_count: u32_at(&self.b, 24) as i32,
            suspended: f & SUSPEND_FLAG != 0,
            active: f & ACTIVE_PRESENT_FLAG != 0,
            inactive: f & INACTIVE_PRESENT_FLAG != 0,
        }
    }
}

/// Encodes a table as `DM_TABLE_LOAD` takes it.
pub(super) fn encode_table(t: &Table) -> Vec<u8> {
    let mut out = Vec::new();
    for l in &t.0 {
        let params = l.target.params();
        let len = (40 + params.len() + 1).div_ceil(8) * 8;
        let mut spec = vec![0u8; len];
        spec[0..8].copy_from_slice(&l.start.to_ne_bytes());
        spec[8..16].copy_from_slice(&l.len.to_ne_bytes());
        spec[20..24].copy_from_slice(&(len as u32).to_ne_bytes());
        let kind = l.target.kind().as_bytes();
        spec[24..24 + kind.len()].copy_from_slice(kind);
        spec[40..40 + params.len()].copy_from_slice(params.as_bytes());
        out.extend_from_slice(&spec);
    }
    out
}
