//! A dm thin pool's health, as its status line says it: space used, the
//! mode it is in (read-write, out of data space, read-only, failed) and
//! whether its metadata needs checking. `blkbackd status` shows it per
//! thin-backed vbd; the block script refuses a pool that cannot take writes.
#![forbid(unsafe_code)]

use serde::Serialize;

use super::{Control, DevId, DmError};

/// What a thin pool can do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    /// Reads and writes.
    ReadWrite,
    /// Out of data space: writes to unprovisioned blocks are held (or fail
    /// with `error_if_no_space`).
    OutOfDataSpace,
    /// Read-only (metadata trouble, or set so).
    ReadOnly,
    /// Failed: no I/O at all.
    Failed,
}

/// A thin pool's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PoolStatus {
    /// Metadata blocks used and in all.
    pub metadata_used: u64,
    /// See `metadata_used`.
    pub metadata_total: u64,
    /// Data blocks used and in all.
    pub data_used: u64,
    /// See `data_used`.
    pub data_total: u64,
    /// A data block in 512-byte sectors (from the pool's table).
    pub block_sectors: u64,
    /// Its mode.
    pub mode: PoolMode,
    /// Its metadata must be checked (`thin_check`) before it is trusted.
    pub needs_check: bool,
    /// Writes fail at once when out of space, instead of being held.
    pub error_if_no_space: bool,
}

impl PoolStatus {
    /// Parses the status line of a `thin-pool` target (`dmsetup status`
    /// after the target name) and `block_sectors` from its table. `None` if
    /// it is not one.
    pub fn parse(status: &str, block_sectors: u64) -> Option<PoolStatus> {
        let w: Vec<&str> = status.split_ascii_whitespace().collect();
        if w.first() == Some(&"Fail") {
            return Some(PoolStatus {
                metadata_used: 0,
                metadata_total: 0,
                data_used: 0,
                data_total: 0,
                block_sectors,
                mode: PoolMode::Failed,
                needs_check: false,
                error_if_no_space: false,
            });
        }
        let pair = |s: &str| -> Option<(u64, u64)> {
            let (a, b) = s.split_once('/')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        };
        let (metadata_used, metadata_total) = pair(w.get(1)?)?;
        let (data_used, data_total) = pair(w.get(2)?)?;
        let mode = match *w.get(4)? {
            "rw" => PoolMode::ReadWrite,
            "out_of_data_space" => PoolMode::OutOfDataSpace,
            "ro" => PoolMode::ReadOnly,
            _ => return None,
        };
        Some(PoolStatus {
            metadata_used,
            metadata_total,
            data_used,
            data_total,
            block_sectors,
            mode,
            needs_check: w.get(7) == Some(&"needs_check"),
            error_if_no_space: w.get(6) == Some(&"error_if_no_space"),
        })
    }

    /// Data space left, in 512-byte sectors.
    pub fn free_sectors(&self) -> u64 {
        self.data_total
            .saturating_sub(self.data_used)
            .saturating_mul(self.block_sectors)
    }

    /// Why a new volume must not be activated in this pool, if it must not.
    pub fn refusal(&self) -> Option<&'static str> {
        match (self.mode, self.needs_check) {
            (PoolMode::Failed, _) => Some("the pool has failed"),
            (PoolMode::ReadOnly, _) => Some("the pool is read-only"),
            (_, true) => Some("the pool's metadata needs checking (thin_check)"),
            _ => None,
        }
    }

    /// One line for `blkbackd status`.
    pub fn summary(&self) -> String {
        let mode = match self.mode {
            PoolMode::ReadWrite => "read-write",
            PoolMode::OutOfDataSpace => "OUT OF DATA SPACE",
            PoolMode::ReadOnly => "READ-ONLY",
            PoolMode::Failed => "FAILED",
        };
        format!(
            "{mode}, data {}/{} blocks of {} KiB, metadata {}/{} blocks{}{}",
            self.data_used,
            self.data_total,
            self.block_sectors / 2,
            self.metadata_used,
            self.metadata_total,
            if self.needs_check {
                ", NEEDS CHECK"
            } else {
                ""
            },
            if self.error_if_no_space {
                ", error_if_no_space"
            } else {
                ", queue_if_no_space"
            },
        )
    }
}

/// The status of the thin pool `name`: its one target must be `thin-pool`.
pub fn status_of(ctl: &Control, name: &str) -> Result<Option<PoolStatus>, DmError> {
    let id = DevId::Name(name.to_owned());
    let table = ctl.table_lines(&id, true)?;
    let [(_, _, target, params)] = &table[..] else {
        return Ok(None);
    };
    if target != "thin-pool" {
        return Ok(None);
    }
    // Table: META DATA BLOCK_SECTORS LOW_WATER [features].
    let Some(block) = params
        .split_ascii_whitespace()
        .nth(2)
        .and_then(|b| b.parse().ok())
    else {
        return Ok(None);
    };
    let status = ctl.table_lines(&id, false)?;
    Ok(status
        .first()
        .and_then(|(_, _, _, s)| PoolStatus::parse(s, block)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_status_is_read_as_the_kernel_writes_it() {
        // As the VM's pool printed it when full.
        let full = PoolStatus::parse(
            "0 112/1024 32/32 - out_of_data_space discard_passdown queue_if_no_space - 256",
            128,
        )
        .unwrap();
        assert_eq!(full.mode, PoolMode::OutOfDataSpace);
        assert_eq!((full.data_used, full.data_total), (32, 32));
        assert_eq!((full.metadata_used, full.metadata_total), (112, 1024));
        assert!(!full.needs_check && !full.error_if_no_space);
        assert_eq!(full.free_sectors(), 0);
        assert_eq!(full.refusal(), None, "out of space is legal; writes wait");
        assert!(full
            .summary()
            .starts_with("OUT OF DATA SPACE, data 32/32 blocks of 64 KiB"));

        let ro = PoolStatus::parse(
            "3 10/1024 5/2048 - ro no_discard_passdown error_if_no_space needs_check 256",
            128,
        )
        .unwrap();
        assert_eq!(ro.mode, PoolMode::ReadOnly);
        assert!(ro.needs_check && ro.error_if_no_space);
        assert_eq!(ro.free_sectors(), 2043 * 128);
        assert_eq!(ro.refusal(), Some("the pool is read-only"));

        let check = PoolStatus::parse(
            "3 10/1024 5/2048 - rw discard_passdown queue_if_no_space needs_check 256",
            128,
        )
        .unwrap();
        assert_eq!(
            check.refusal(),
            Some("the pool's metadata needs checking (thin_check)")
        );
        assert_eq!(
            PoolStatus::parse("Fail", 128).unwrap().refusal(),
            Some("the pool has failed")
        );
        // Not a pool's status: no claim at all.
        for bad in [
            "",
            "0 1/2",
            "0 x/2 3/4 - rw",
            "0 1/2 3/4 - sideways",
            "0 1/2 3",
        ] {
            assert_eq!(PoolStatus::parse(bad, 128), None, "{bad:?}");
        }
    }
}
