//! The disk layer's ioctl numbers and argument layouts (`blkbackd::disk::sys`)
//! against the kernel's UAPI headers (`linux/fs.h`, `linux/loop.h`,
//! `linux/dm-ioctl.h`, `linux/stat.h`), compiled with gcc.

#[path = "common/cprobe.rs"]
mod cprobe;
#[path = "common/tier.rs"]
mod tier;
use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use tier::Tier;

use blkbackd::disk::dm::{NAME_LEN, UUID_LEN};
use blkbackd::disk::sys::*;

fn c_values() -> BTreeMap<String, i64> {
    cprobe::c_values("disk_abi", &[], "linux-libc-dev")
}

#[test]
fn ioctl_numbers_and_layouts_match_the_kernel_headers() {
    if !tier::need(Tier::Headers("linux/dm-ioctl.h")) {
        return;
    }
    let c = c_values();
    let ours: Vec<(&str, i64)> = vec![
        ("val.BLKGETDISKSEQ", BLKGETDISKSEQ.into()),
        ("val.BLKGETSIZE64", BLKGETSIZE64.into()),
        ("val.BLKSSZGET", BLKSSZGET.into()),
        ("val.BLKPBSZGET", BLKPBSZGET.into()),
        ("val.BLKROGET", BLKROGET.into()),
        ("val.BLKDISCARD", BLKDISCARD.into()),
        ("val.BLKSECDISCARD", BLKSECDISCARD.into()),
        ("val.FS_IOC_GETVERSION", FS_IOC_GETVERSION.into()),
        ("val.LOOP_CLR_FD", LOOP_CLR_FD.into()),
        ("val.LOOP_GET_STATUS64", LOOP_GET_STATUS64.into()),
        ("val.LOOP_SET_CAPACITY", LOOP_SET_CAPACITY.into()),
        ("val.LOOP_CONFIGURE", LOOP_CONFIGURE.into()),
        ("val.LOOP_CTL_ADD", LOOP_CTL_ADD.into()),
        ("val.LOOP_CTL_GET_FREE", LOOP_CTL_GET_FREE.into()),
        ("val.LO_FLAGS_READ_ONLY", LO_FLAGS_READ_ONLY.into()),
        ("val.LO_FLAGS_AUTOCLEAR", LO_FLAGS_AUTOCLEAR.into()),
        ("val.LO_FLAGS_DIRECT_IO", LO_FLAGS_DIRECT_IO.into()),
        ("size.loop_info64", size_of::<LoopInfo64>() as i64),
        (
            "off.loop_info64.lo_device",
            offset_of!(LoopInfo64, lo_device) as i64,
        ),
        (
            "off.loop_info64.lo_inode",
            offset_of!(LoopInfo64, lo_inode) as i64,
        ),
        (
            "off.loop_info64.lo_flags",
            offset_of!(LoopInfo64, lo_flags) as i64,
        ),
        (
            "off.loop_info64.lo_file_name",
            offset_of!(LoopInfo64, lo_file_name) as i64,
        ),
        ("size.loop_config", size_of::<LoopConfig>() as i64),
        (
            "off.loop_config.block_size",
            offset_of!(LoopConfig, block_size) as i64,
        ),
        ("off.loop_config.info", offset_of!(LoopConfig, info) as i64),
        ("val.DM_VERSION", DM_VERSION.code().into()),
        ("val.DM_LIST_DEVICES", DM_LIST_DEVICES.code().into()),
        ("val.DM_DEV_CREATE", DM_DEV_CREATE.code().into()),
        ("val.DM_DEV_REMOVE", DM_DEV_REMOVE.code().into()),
        ("val.DM_DEV_SUSPEND", DM_DEV_SUSPEND.code().into()),
        ("val.DM_DEV_STATUS", DM_DEV_STATUS.code().into()),
        ("val.DM_TABLE_LOAD", DM_TABLE_LOAD.code().into()),
        ("val.DM_TABLE_CLEAR", DM_TABLE_CLEAR.code().into()),
        ("val.DM_TABLE_STATUS", DM_TABLE_STATUS.code().into()),
        ("val.DM_TARGET_MSG", DM_TARGET_MSG.code().into()),
        ("size.dm_ioctl", DM_IOCTL_SIZE as i64),
        ("val.DM_NAME_LEN", NAME_LEN as i64),
        ("val.DM_UUID_LEN", UUID_LEN as i64),
        ("val.STATX_DIOALIGN", libc::STATX_DIOALIGN.into()),
        ("size.statx", size_of::<libc::statx>() as i64),
        (
            "off.statx.stx_mask",
            offset_of!(libc::statx, stx_mask) as i64,
        ),
        (
            "off.statx.stx_dio_offset_align",
            offset_of!(libc::statx, stx_dio_offset_align) as i64,
        ),
    ];
    let mut bad = Vec::new();
    for (k, v) in &ours {
        match c.get(*k) {
            Some(cv) if cv == v => {}
            other => bad.push(format!("{k}: the headers say {other:?}, we say {v}")),
        }
    }
    assert!(bad.is_empty(), "mismatches:\n{}", bad.join("\n"));
    assert_eq!(c.len(), ours.len(), "a value printed but not compared");
}
