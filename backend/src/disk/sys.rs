//! Block-device, loop, device-mapper and file calls (`linux/fs.h`,
//! `linux/loop.h`, `linux/dm-ioctl.h`, `statx`, `mknodat`, `fallocate`,
//! `flock`): the only unsafe of the disk layer.
//!
//! Every ioctl number is built one way, by nix's `request_code_*!` from the
//! `_IO`/`_IOR`/`_IOWR` its header defines it with (the test below pins the
//! headers' values; `tests/disk_abi.rs` compiles the headers to check them and
//! the argument layouts). Every ioctl but device-mapper's is declared once, by
//! nix's `ioctl_*_bad!`, with the argument type its header gives, and called
//! through a safe function here. `mknodat` and `fallocate` go through nix's
//! safe wrappers. Raw libc is left where nothing fits: the dm ioctl (its
//! buffer outgrows the header its request number declares), `flock` (nix's
//! `Flock` owns the file) and `statx` (nix has none).
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::{fallocate, FallocateFlags};
use nix::sys::stat::{mknodat, Mode, SFlag};
use nix::{request_code_none, request_code_read, request_code_readwrite};

/// The block layer's ioctl type (`linux/fs.h`).
const BLK: u8 = 0x12;
/// The loop driver's ioctl type (`linux/loop.h`).
const LOOP: u8 = 0x4C;

/// `BLKGETDISKSEQ` = `_IOR(0x12, 128, __u64)`.
pub const BLKGETDISKSEQ: u32 = request_code_read!(BLK, 128, size_of::<u64>()) as u32;
/// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)`.
pub const BLKGETSIZE64: u32 = request_code_read!(BLK, 114, size_of::<libc::size_t>()) as u32;
/// `BLKSSZGET` = `_IO(0x12, 104)`: logical block size (int).
pub const BLKSSZGET: u32 = request_code_none!(BLK, 104) as u32;
/// `BLKPBSZGET` = `_IO(0x12, 123)`: physical block size (unsigned int).
pub const BLKPBSZGET: u32 = request_code_none!(BLK, 123) as u32;
/// `BLKROGET` = `_IO(0x12, 94)`: read-only flag (int).
pub const BLKROGET: u32 = request_code_none!(BLK, 94) as u32;
/// `BLKDISCARD` = `_IO(0x12, 119)`: discard a byte range (`u64[2]`).
pub const BLKDISCARD: u32 = request_code_none!(BLK, 119) as u32;
/// `BLKSECDISCARD` = `_IO(0x12, 125)`.
pub const BLKSECDISCARD: u32 = request_code_none!(BLK, 125) as u32;

/// `FS_IOC_GETVERSION` = `_IOR('v', 1, long)`: an inode's generation.
pub const FS_IOC_GETVERSION: u32 = request_code_read!(b'v', 1, size_of::<libc::c_long>()) as u32;
/// `LOOP_CLR_FD` = `0x4C01`.
pub const LOOP_CLR_FD: u32 = request_code_none!(LOOP, 0x01) as u32;
/// `LOOP_GET_STATUS64` = `0x4C05`.
pub const LOOP_GET_STATUS64: u32 = request_code_none!(LOOP, 0x05) as u32;
/// `LOOP_SET_CAPACITY` = `0x4C07`.
pub const LOOP_SET_CAPACITY: u32 = request_code_none!(LOOP, 0x07) as u32;
/// `LOOP_CONFIGURE` = `0x4C0A`.
pub const LOOP_CONFIGURE: u32 = request_code_none!(LOOP, 0x0A) as u32;
/// `LOOP_CTL_ADD` = `0x4C80` (on `/dev/loop-control`).
pub const LOOP_CTL_ADD: u32 = request_code_none!(LOOP, 0x80) as u32;
/// `LOOP_CTL_GET_FREE` = `0x4C82` (on `/dev/loop-control`).
pub const LOOP_CTL_GET_FREE: u32 = request_code_none!(LOOP, 0x82) as u32;

/// `sizeof(struct dm_ioctl)`: the header every device-mapper request starts with.
pub const DM_IOCTL_SIZE: usize = 312;

/// A device-mapper command, `_IOWR(DM_IOCTL, nr, struct dm_ioctl)`. Only the
/// constants below exist, so [`dm_ioctl`] is never handed another request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmCmd(u32);

impl DmCmd {
    /// `DM_IOCTL`, device-mapper's ioctl type.
    const TYPE: u8 = 0xfd;

    const fn new(nr: u8) -> DmCmd {
        DmCmd(request_code_readwrite!(DmCmd::TYPE, nr, DM_IOCTL_SIZE) as u32)
    }

    /// The request number.
    pub const fn code(self) -> u32 {
        self.0
    }
}

/// `DM_VERSION`.
pub const DM_VERSION: DmCmd = DmCmd::new(0);
/// `DM_LIST_DEVICES`.
pub const DM_LIST_DEVICES: DmCmd = DmCmd::new(2);
/// `DM_DEV_CREATE`.
pub const DM_DEV_CREATE: DmCmd = DmCmd::new(3);
/// `DM_DEV_REMOVE`.
pub const DM_DEV_REMOVE: DmCmd = DmCmd::new(4);
/// `DM_DEV_SUSPEND` (also resumes).
pub const DM_DEV_SUSPEND: DmCmd = DmCmd::new(6);
/// `DM_DEV_STATUS`.
pub const DM_DEV_STATUS: DmCmd = DmCmd::new(7);
/// `DM_TABLE_LOAD`.
pub const DM_TABLE_LOAD: DmCmd = DmCmd::new(9);
/// `DM_TABLE_CLEAR`.
pub const DM_TABLE_CLEAR: DmCmd = DmCmd::new(10);
/// `DM_TABLE_STATUS`.
pub const DM_TABLE_STATUS: DmCmd = DmCmd::new(12);
/// `DM_TARGET_MSG`.
pub const DM_TARGET_MSG: DmCmd = DmCmd::new(14);

/// `LO_FLAGS_READ_ONLY`.
pub const LO_FLAGS_READ_ONLY: u32 = 1;
/// `LO_FLAGS_AUTOCLEAR`.
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// `LO_FLAGS_DIRECT_IO`.
pub const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LoopInfo64 {
    /// Backing file's `st_dev`.
    pub lo_device: u64,
    /// Backing file's inode.
    pub lo_inode: u64,
    /// `lo_rdevice`.
    pub lo_rdevice: u64,
    /// Offset into the backing file.
    pub lo_offset: u64,
    /// Size limit (0: the whole file).
    pub lo_sizelimit: u64,
    /// The loop device's number.
    pub lo_number: u32,
    /// Obsolete.
    pub lo_encrypt_type: u32,
    /// Obsolete.
    pub lo_encrypt_key_size: u32,
    /// `LO_FLAGS_*`.
    pub lo_flags: u32,
    /// Backing file name (informational).
    pub lo_file_name: [u8; 64],
    /// Obsolete.
    pub lo_crypt_name: [u8; 64],
    /// Obsolete.
    pub lo_encrypt_key: [u8; 32],
    /// Obsolete.
    pub lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LoopConfig {
    /// The backing file's descriptor.
    pub fd: u32,
    /// Logical block size (0: let the kernel pick, which we never do).
    pub block_size: u32,
    /// Status to set.
    pub info: LoopInfo64,
    /// Reserved.
    pub reserved: [u64; 8],
}

const _: () = {
    assert!(std::mem::size_of::<LoopInfo64>() == 232);
    assert!(std::mem::offset_of!(LoopInfo64, lo_flags) == 52);
    assert!(std::mem::offset_of!(LoopInfo64, lo_file_name) == 56);
    assert!(std::mem::size_of::<LoopConfig>() == 304);
    assert!(std::mem::offset_of!(LoopConfig, info) == 8);
};

impl LoopConfig {
    /// A configuration for `fd` with `block_size` and `flags`.
    pub fn new(fd: RawFd, block_size: u32, flags: u32, name: &Path) -> LoopConfig {
        let mut info = LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: flags,
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        };
        let n = name.as_os_str().as_bytes();
        let k = n.len().min(63);
        info.lo_file_name[..k].copy_from_slice(&n[..k]);
        LoopConfig {
            fd: fd as u32,
            block_size,
            info,
            reserved: [0; 8],
        }
    }

    /// Prefixes the informational `lo_file_name` with `mark` (the kernel
    /// keeps the 64 bytes verbatim and reports them in `LOOP_GET_STATUS64`;
    /// util-linux shows sysfs' `backing_file` instead): who made the device.
    pub fn with_owner(mut self, mark: &[u8]) -> LoopConfig {
        let name = self.info.lo_file_name;
        let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        let mut out = [0u8; 64];
        let m = mark.len().min(63);
        out[..m].copy_from_slice(&mark[..m]);
        let k = len.min(63 - m);
        out[m..m + k].copy_from_slice(&name[..k]);
        self.info.lo_file_name = out;
        self
    }
}

/// The ioctls, each declared once with the argument type its header gives
/// it (nix makes each an `unsafe fn`: the pointer is the caller's to vouch
/// for).
mod raw {
    use super::*;

    nix::ioctl_read_bad!(
        /// `BLKGETDISKSEQ`.
        ///
        /// # Safety
        /// `data` must be valid for writing one `u64`.
        blkgetdiskseq,
        BLKGETDISKSEQ,
        u64
    );
    nix::ioctl_read_bad!(
        /// `BLKGETSIZE64`.
        ///
        /// # Safety
        /// `data` must be valid for writing one `size_t`.
        blkgetsize64,
        BLKGETSIZE64,
        libc::size_t
    );
    nix::ioctl_read_bad!(
        /// `BLKSSZGET`.
        ///
        /// # Safety
        /// `data` must be valid for writing one `int`.
        blksszget,
        BLKSSZGET,
        libc::c_int
    );
    nix::ioctl_read_bad!(
        /// `BLKPBSZGET`.
        ///
        /// # Safety
        /// `data` must be valid for writing one `unsigned int`.
        blkpbszget,
        BLKPBSZGET,
        libc::c_uint
    );
    nix::ioctl_read_bad!(
        /// `BLKROGET`.
        ///
        /// # Safety
        /// `data` must be valid for writing one `int`.
        blkroget,
        BLKROGET,
        libc::c_int
    );
    nix::ioctl_write_ptr_bad!(
        /// `BLKDISCARD`: `{start, length}` in bytes.
        ///
        /// # Safety
        /// `data` must be valid for reading a `u64[2]`.
        blkdiscard,
        BLKDISCARD,
        [u64; 2]
    );
    nix::ioctl_write_ptr_bad!(
        /// `BLKSECDISCARD`: `{start, length}` in bytes.
        ///
        /// # Safety
        /// `data` must be valid for reading a `u64[2]`.
        blksecdiscard,
        BLKSECDISCARD,
        [u64; 2]
    );
    nix::ioctl_read_bad!(
        /// `FS_IOC_GETVERSION`.
        ///
        /// # Safety
        /// `data` must be valid for writing one `long`.
        fs_ioc_getversion,
        FS_IOC_GETVERSION,
        libc::c_long
    );
    nix::ioctl_write_ptr_bad!(
        /// `LOOP_CONFIGURE`.
        ///
        /// # Safety
        /// `data` must be valid for reading one `struct loop_config`, whose
        /// `fd` is an open descriptor.
        loop_configure,
        LOOP_CONFIGURE,
        LoopConfig
    );
    nix::ioctl_read_bad!(
        /// `LOOP_GET_STATUS64`.
        ///
        /// # Safety
        /// `data` must be valid for writing one `struct loop_info64`.
        loop_get_status64,
        LOOP_GET_STATUS64,
        LoopInfo64
    );
    nix::ioctl_write_int_bad!(
        /// `LOOP_CLR_FD`.
        ///
        /// # Safety
        /// None beyond an open `fd`: the argument is an unused int.
        loop_clr_fd,
        LOOP_CLR_FD
    );
    nix::ioctl_write_int_bad!(
        /// `LOOP_SET_CAPACITY`.
        ///
        /// # Safety
        /// None beyond an open `fd`: the argument is an unused int.
        loop_set_capacity,
        LOOP_SET_CAPACITY
    );
    nix::ioctl_write_int_bad!(
        /// `LOOP_CTL_ADD`: the argument is the index wanted, -1 for any.
        ///
        /// # Safety
        /// None beyond an open `fd`: the argument is an int passed by value.
        loop_ctl_add,
        LOOP_CTL_ADD
    );
    nix::ioctl_write_int_bad!(
        /// `LOOP_CTL_GET_FREE`.
        ///
        /// # Safety
        /// None beyond an open `fd`: the argument is an unused int.
        loop_ctl_get_free,
        LOOP_CTL_GET_FREE
    );
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A nix result as the `io::Result` the disk layer speaks.
fn io<T>(r: nix::Result<T>) -> io::Result<T> {
    r.map_err(io::Error::from)
}

/// `BLKGETDISKSEQ`.
pub fn diskseq(f: &File) -> io::Result<u64> {
    let mut v = 0u64;
    // SAFETY: `v` is a live u64 the ioctl writes into.
    io(unsafe { raw::blkgetdiskseq(f.as_raw_fd(), &mut v) })?;
    Ok(v)
}

/// `BLKGETSIZE64`: size in bytes.
pub fn size_bytes(f: &File) -> io::Result<u64> {
    let mut v: libc::size_t = 0;
    // SAFETY: `v` is a live size_t the ioctl writes into.
    io(unsafe { raw::blkgetsize64(f.as_raw_fd(), &mut v) })?;
    Ok(v as u64)
}

/// `BLKSSZGET`: logical block size.
pub fn logical_block_size(f: &File) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: `v` is a live int the ioctl writes into.
    io(unsafe { raw::blksszget(f.as_raw_fd(), &mut v) })?;
    Ok(v as u32)
}

/// `BLKPBSZGET`: physical block size.
pub fn physical_block_size(f: &File) -> io::Result<u32> {
    let mut v: libc::c_uint = 0;
    // SAFETY: `v` is a live unsigned int the ioctl writes into.
    io(unsafe { raw::blkpbszget(f.as_raw_fd(), &mut v) })?;
    Ok(v)
}

/// `BLKROGET`.
pub fn read_only(f: &File) -> io::Result<bool> {
    let mut v: libc::c_int = 0;
    // SAFETY: `v` is a live int the ioctl writes into.
    io(unsafe { raw::blkroget(f.as_raw_fd(), &mut v) })?;
    Ok(v != 0)
}

/// `BLKDISCARD` or `BLKSECDISCARD` of `len` bytes at `off`.
pub fn blk_discard(f: &File, off: u64, len: u64, secure: bool) -> io::Result<()> {
    let range = [off, len];
    // SAFETY: `range` is a live u64[2] the ioctl reads.
    io(unsafe {
        if secure {
            raw::blksecdiscard(f.as_raw_fd(), &range)
        } else {
            raw::blkdiscard(f.as_raw_fd(), &range)
        }
    })
    .map(drop)
}

/// `FS_IOC_GETVERSION`: the inode's generation number, which changes when
/// the file system reuses an inode number (ext4, xfs, btrfs have one; `None`
/// where the file system has none).
pub fn inode_generation(f: &File) -> io::Result<Option<u32>> {
    // The kernel writes an int despite the `long` in the ioctl number; give
    // it a long so either width fits.
    let mut v: libc::c_long = 0;
    // SAFETY: `v` is a live long the ioctl writes (at most) into.
    match io(unsafe { raw::fs_ioc_getversion(f.as_raw_fd(), &mut v) }) {
        Ok(_) => Ok(Some(v as u32)),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOTTY | libc::EOPNOTSUPP | libc::EINVAL)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// `LOOP_CONFIGURE`.
pub fn loop_configure(f: &File, cfg: &LoopConfig) -> io::Result<()> {
    // SAFETY: `cfg` is a live struct loop_config the ioctl reads; a bad `fd`
    // in it is refused by the kernel (EBADF).
    io(unsafe { raw::loop_configure(f.as_raw_fd(), cfg) }).map(drop)
}

/// `LOOP_GET_STATUS64`.
pub fn loop_status(f: &File) -> io::Result<LoopInfo64> {
    let mut info = LoopConfig::new(-1, 0, 0, Path::new("")).info;
    // SAFETY: `info` is a live struct loop_info64 the ioctl writes into.
    io(unsafe { raw::loop_get_status64(f.as_raw_fd(), &mut info) })?;
    Ok(info)
}

/// `LOOP_CLR_FD`: detaches the loop device `f`.
pub fn loop_clr_fd(f: &File) -> io::Result<()> {
    // SAFETY: the argument is an int passed by value; no memory is passed.
    io(unsafe { raw::loop_clr_fd(f.as_raw_fd(), 0) }).map(drop)
}

/// `LOOP_SET_CAPACITY`: the loop device `f` re-reads its backing file's size.
pub fn loop_set_capacity(f: &File) -> io::Result<()> {
    // SAFETY: the argument is an int passed by value; no memory is passed.
    io(unsafe { raw::loop_set_capacity(f.as_raw_fd(), 0) }).map(drop)
}

/// `LOOP_CTL_GET_FREE` on `/dev/loop-control`: a free loop device's number.
pub fn loop_ctl_get_free(ctl: &File) -> io::Result<u32> {
    // SAFETY: the argument is an int passed by value; no memory is passed.
    io(unsafe { raw::loop_ctl_get_free(ctl.as_raw_fd(), 0) }).map(|n| n as u32)
}

/// `LOOP_CTL_ADD` on `/dev/loop-control`: a new loop device, any number.
pub fn loop_ctl_add(ctl: &File) -> io::Result<u32> {
    // SAFETY: the argument is an int passed by value; no memory is passed.
    io(unsafe { raw::loop_ctl_add(ctl.as_raw_fd(), -1) }).map(|n| n as u32)
}

/// `mknodat(dirfd, name, S_IFBLK | 0600, dev)`.
pub fn mknod_block(dir: &File, name: &str, dev: libc::dev_t) -> io::Result<()> {
    io(mknodat(
        dir,
        name,
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o600),
        dev,
    ))
}

/// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`: discard in a file.
pub fn punch_hole(f: &File, off: u64, len: u64) -> io::Result<()> {
    let (o, l) = (off as libc::off_t, len as libc::off_t);
    let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    io(fallocate(f, mode, o, l))
}

/// `flock(fd, LOCK_EX | LOCK_NB)` (std's `File::try_lock`, which is that
/// on Linux): `Ok(false)` if another open file holds it. The lock lasts as
/// long as the caller keeps `f` open.
pub fn try_lock_exclusive(f: &File) -> io::Result<bool> {
    match f.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// `makedev(major, minor)`.
pub fn makedev(major: u32, minor: u32) -> libc::dev_t {
    libc::makedev(major, minor)
}

/// `major(dev)`, `minor(dev)`.
pub fn split_dev(dev: u64) -> (u32, u32) {
    (libc::major(dev), libc::minor(dev))
}

/// `statx(STATX_DIOALIGN)`: the offset and length alignment direct I/O on
/// this file needs (Linux 6.1+); `None` where the kernel or the file system
/// does not say. The raw syscall (nix has no statx), not libc's wrapper,
/// which older C libraries lack; the answer is read from libc's typed
/// `struct statx`.
pub fn dio_alignment(f: &File) -> Option<u32> {
    // SAFETY: an all-zero `struct statx` is valid (integers and padding
    // only); the kernel writes at most its 256-byte `struct statx`, the size
    // of libc's (asserted below), into the live `stx`; the path is an empty
    // NUL-terminated string used with AT_EMPTY_PATH on an open descriptor.
    let (r, stx) = unsafe {
        let mut stx: libc::statx = std::mem::zeroed();
        let r = libc::syscall(
            libc::SYS_statx,
            f.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx as *mut libc::statx,
        );
        (r, stx)
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some(stx.stx_dio_offset_align).filter(|&a| a > 0)
}

const _: () = assert!(size_of::<libc::statx>() == 256);

/// A device-mapper ioctl on `/dev/mapper/control`, with `buf` holding the
/// `struct dm_ioctl` header (its `data_size` field set to the whole buffer's
/// length) and its payload. Raw libc: the buffer is longer than the header
/// the request number declares, which no nix ioctl macro models.
pub fn dm_ioctl(ctl: &File, cmd: DmCmd, buf: &mut [u64]) -> io::Result<()> {
    let bytes = std::mem::size_of_val(buf);
    let data_size = u32::from_ne_bytes([
        buf[1].to_ne_bytes()[4],
        buf[1].to_ne_bytes()[5],
        buf[1].to_ne_bytes()[6],
        buf[1].to_ne_bytes()[7],
    ]) as usize;
    if bytes < DM_IOCTL_SIZE || data_size > bytes {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `cmd` is one of the DM_* requests, whose argument is a
    // `struct dm_ioctl` followed by `data_size` bytes in all; `buf` is
    // 8-aligned (u64s), at least a `struct dm_ioctl` long, and its data_size
    // (checked above) does not exceed it, so the kernel reads and writes only
    // inside it.
    check(unsafe { libc::ioctl(ctl.as_raw_fd(), cmd.code() as _, buf.as_mut_ptr()) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernel_headers_values() {
        // As gcc computes them from linux/fs.h, linux/loop.h and
        // linux/dm-ioctl.h (the same on every Linux architecture whose
        // _IOC layout is asm-generic's: x86, arm, riscv; not powerpc, mips
        // or sparc).
        for (name, ours, kernel) in [
            ("BLKGETDISKSEQ", BLKGETDISKSEQ, 0x8008_1280),
            ("BLKGETSIZE64", BLKGETSIZE64, 0x8008_1272),
            ("BLKSSZGET", BLKSSZGET, 0x1268),
            ("BLKPBSZGET", BLKPBSZGET, 0x127b),
            ("BLKROGET", BLKROGET, 0x125e),
            ("BLKDISCARD", BLKDISCARD, 0x1277),
            ("BLKSECDISCARD", BLKSECDISCARD, 0x127d),
            ("FS_IOC_GETVERSION", FS_IOC_GETVERSION, 0x8008_7601),
            ("LOOP_CLR_FD", LOOP_CLR_FD, 0x4c01),
            ("LOOP_GET_STATUS64", LOOP_GET_STATUS64, 0x4c05),
            ("LOOP_SET_CAPACITY", LOOP_SET_CAPACITY, 0x4c07),
            ("LOOP_CONFIGURE", LOOP_CONFIGURE, 0x4c0a),
            ("LOOP_CTL_ADD", LOOP_CTL_ADD, 0x4c80),
            ("LOOP_CTL_GET_FREE", LOOP_CTL_GET_FREE, 0x4c82),
            ("DM_VERSION", DM_VERSION.code(), 0xc138_fd00),
            ("DM_LIST_DEVICES", DM_LIST_DEVICES.code(), 0xc138_fd02),
            ("DM_DEV_CREATE", DM_DEV_CREATE.code(), 0xc138_fd03),
            ("DM_DEV_REMOVE", DM_DEV_REMOVE.code(), 0xc138_fd04),
            ("DM_DEV_SUSPEND", DM_DEV_SUSPEND.code(), 0xc138_fd06),
            ("DM_DEV_STATUS", DM_DEV_STATUS.code(), 0xc138_fd07),
            ("DM_TABLE_LOAD", DM_TABLE_LOAD.code(), 0xc138_fd09),
            ("DM_TABLE_CLEAR", DM_TABLE_CLEAR.code(), 0xc138_fd0a),
            ("DM_TABLE_STATUS", DM_TABLE_STATUS.code(), 0xc138_fd0c),
            ("DM_TARGET_MSG", DM_TARGET_MSG.code(), 0xc138_fd0e),
        ] {
            assert_eq!(
                ours, kernel,
                "{name}: {ours:#x}, the kernel's is {kernel:#x}"
            );
        }
    }

    #[test]
    fn direct_io_alignment_is_read_from_statx_by_field() {
        // ext4, xfs and btrfs report it (Linux 6.1+), as a power of two;
        // tmpfs and older kernels do not, and then there is no claim.
        let f = tempfile::tempfile().unwrap();
        if let Some(a) = dio_alignment(&f) {
            assert!(a.is_power_of_two() && a <= 1 << 16, "{a}");
        }
    }
}
