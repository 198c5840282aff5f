//! Block-device, loop and mknod system calls (`linux/fs.h`, `linux/loop.h`).
//! The only unsafe of the disk layer; each ioctl takes exactly the argument
//! type its header declares.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `BLKGETDISKSEQ` = `_IOR(0x12, 128, __u64)`.
pub const BLKGETDISKSEQ: u64 = 0x8008_1280;
/// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)`.
pub const BLKGETSIZE64: u64 = 0x8008_1272;
/// `BLKSSZGET` = `_IO(0x12, 104)`: logical block size (int).
pub const BLKSSZGET: u64 = 0x1268;
/// `BLKPBSZGET` = `_IO(0x12, 123)`: physical block size (unsigned int).
pub const BLKPBSZGET: u64 = 0x127b;
/// `BLKROGET` = `_IO(0x12, 94)`: read-only flag (int).
pub const BLKROGET: u64 = 0x125e;
/// `BLKDISCARD` = `_IO(0x12, 119)`: discard a byte range (u64[2]).
pub const BLKDISCARD: u64 = 0x1277;
/// `BLKSECDISCARD` = `_IO(0x12, 125)`.
pub const BLKSECDISCARD: u64 = 0x127d;
/// `BLKFLSBUF` = `_IO(0x12, 97)`.
pub const BLKFLSBUF: u64 = 0x1261;

/// `FS_IOC_GETVERSION` (`_IOR('v', 1, long)`): an inode's generation.
pub const FS_IOC_GETVERSION: u64 = 0x8008_7601;
/// `LOOP_CLR_FD`.
pub const LOOP_CLR_FD: u64 = 0x4C01;
/// `LOOP_GET_STATUS64`.
pub const LOOP_GET_STATUS64: u64 = 0x4C05;
/// `LOOP_SET_CAPACITY`.
pub const LOOP_SET_CAPACITY: u64 = 0x4C07;
/// `LOOP_CONFIGURE`.
pub const LOOP_CONFIGURE: u64 = 0x4C0A;
/// `LOOP_CTL_ADD` (on `/dev/loop-control`).
pub const LOOP_CTL_ADD: u64 = 0x4C80;
/// `LOOP_CTL_GET_FREE` (on `/dev/loop-control`).
pub const LOOP_CTL_GET_FREE: u64 = 0x4C82;

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

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// An ioctl whose argument is a plain integer (or nothing).
pub fn ioctl_int(f: &impl AsRawFd, req: u64, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: `req` is one of the constants above whose argument is passed by
    // value (an int or nothing), so the kernel reads no memory of ours.
    check(unsafe { libc::ioctl(f.as_raw_fd(), req as libc::c_ulong, arg) })
}

/// An ioctl that reads or writes one `T` at the pointer.
///
/// # Safety
/// `req` must be an ioctl whose argument is a pointer to exactly a `T`.
pub unsafe fn ioctl_ptr<T>(f: &impl AsRawFd, req: u64, arg: &mut T) -> io::Result<libc::c_int> {
    // SAFETY: the caller guarantees `req` takes a `*mut T`; `arg` is a live,
    // exclusive reference for the duration of the call.
    check(unsafe { libc::ioctl(f.as_raw_fd(), req as libc::c_ulong, arg as *mut T) })
}

/// `BLKGETDISKSEQ`.
pub fn diskseq(f: &File) -> io::Result<u64> {
    let mut v = 0u64;
    // SAFETY: BLKGETDISKSEQ writes one __u64.
    unsafe { ioctl_ptr(f, BLKGETDISKSEQ, &mut v) }?;
    Ok(v)
}

/// `BLKGETSIZE64`: size in bytes.
pub fn size_bytes(f: &File) -> io::Result<u64> {
    let mut v = 0u64;
    // SAFETY: BLKGETSIZE64 writes one size_t (u64 on 64-bit Linux).
    unsafe { ioctl_ptr(f, BLKGETSIZE64, &mut v) }?;
    Ok(v)
}

/// `BLKSSZGET`: logical block size.
pub fn logical_block_size(f: &File) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int.
    unsafe { ioctl_ptr(f, BLKSSZGET, &mut v) }?;
    Ok(v as u32)
}

/// `BLKPBSZGET`: physical block size.
pub fn physical_block_size(f: &File) -> io::Result<u32> {
    let mut v: libc::c_uint = 0;
    // SAFETY: BLKPBSZGET writes one unsigned int.
    unsafe { ioctl_ptr(f, BLKPBSZGET, &mut v) }?;
    Ok(v)
}

/// `BLKROGET`.
pub fn read_only(f: &File) -> io::Result<bool> {
    let mut v: libc::c_int = 0;
    // SAFETY: BLKROGET writes one int.
    unsafe { ioctl_ptr(f, BLKROGET, &mut v) }?;
    Ok(v != 0)
}

/// `BLKDISCARD` or `BLKSECDISCARD` of `len` bytes at `off`.
pub fn blk_discard(f: &File, off: u64, len: u64, secure: bool) -> io::Result<()> {
    let mut range = [off, len];
    let req = if secure { BLKSECDISCARD } else { BLKDISCARD };
    // SAFETY: both ioctls read a u64[2] {start, length}.
    unsafe { ioctl_ptr(f, req, &mut range) }.map(drop)
}

/// `FS_IOC_GETVERSION`: the inode's generation number, which changes when
/// the file system reuses an inode number (ext4, xfs, btrfs have one; `None`
/// where the file system has none).
pub fn inode_generation(f: &File) -> io::Result<Option<u32>> {
    // The kernel writes an int despite the `long` in the ioctl number; give
    // it a long so either width fits.
    let mut v: libc::c_long = 0;
    // SAFETY: FS_IOC_GETVERSION writes at most one long at the pointer.
    match unsafe { ioctl_ptr(f, FS_IOC_GETVERSION, &mut v) } {
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
pub fn loop_configure(f: &File, cfg: &mut LoopConfig) -> io::Result<()> {
    // SAFETY: LOOP_CONFIGURE reads one struct loop_config.
    unsafe { ioctl_ptr(f, LOOP_CONFIGURE, cfg) }.map(drop)
}

/// `LOOP_GET_STATUS64`.
pub fn loop_status(f: &File) -> io::Result<LoopInfo64> {
    let mut info = LoopConfig::new(-1, 0, 0, Path::new("")).info;
    // SAFETY: LOOP_GET_STATUS64 writes one struct loop_info64.
    unsafe { ioctl_ptr(f, LOOP_GET_STATUS64, &mut info) }?;
    Ok(info)
}

/// `mknodat(dirfd, name, S_IFBLK | 0600, dev)`.
pub fn mknod_block(dir: &File, name: &str, dev: libc::dev_t) -> io::Result<()> {
    let c = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a valid NUL-terminated name relative to the open `dir`.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), c.as_ptr(), libc::S_IFBLK | 0o600, dev) })
        .map(drop)
}

/// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`: discard in a file.
pub fn punch_hole(f: &File, off: u64, len: u64) -> io::Result<()> {
    let (o, l) = (off as libc::off_t, len as libc::off_t);
    // SAFETY: a plain syscall on an open descriptor; no memory is passed.
    check(unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        )
    })
    .map(drop)
}

/// `flock(fd, LOCK_EX | LOCK_NB)`: `Ok(false)` if another open file holds it.
pub fn try_lock_exclusive(f: &File) -> io::Result<bool> {
    loop {
        // SAFETY: a plain syscall on an open descriptor; no memory is passed.
        match check(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }) {
            Ok(_) => return Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => return Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
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
/// does not say.
pub fn dio_alignment(f: &File) -> Option<u32> {
    const STATX_DIOALIGN: u32 = 0x2000;
    // Offsets in the kernel's `struct statx` (256 bytes, stable ABI).
    const STX_MASK: usize = 0;
    const STX_DIO_OFFSET_ALIGN: usize = 156;
    let mut buf = [0u64; 32];
    let empty = c"";
    // SAFETY: `buf` is a writable 256-byte buffer, the size of `struct statx`;
    // the path is an empty NUL-terminated string used with AT_EMPTY_PATH on an
    // open descriptor.
    let r = unsafe {
        libc::syscall(
            libc::SYS_statx,
            f.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            STATX_DIOALIGN,
            buf.as_mut_ptr(),
        )
    };
    if r != 0 {
        return None;
    }
    let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let u32_at = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    if u32_at(STX_MASK) & STATX_DIOALIGN == 0 {
        return None;
    }
    Some(u32_at(STX_DIO_OFFSET_ALIGN)).filter(|&a| a > 0)
}

/// A device-mapper ioctl (`_IOWR(0xfd, nr, struct dm_ioctl)`) on
/// `/dev/mapper/control`, with `buf` holding the `struct dm_ioctl` header
/// (its `data_size` field set to the whole buffer's length) and its payload.
pub fn dm_ioctl(ctl: &File, nr: u8, buf: &mut [u64]) -> io::Result<()> {
    const DM_IOCTL_SIZE: u64 = 312;
    let req = (3u64 << 30) | (DM_IOCTL_SIZE << 16) | (0xfd << 8) | u64::from(nr);
    let bytes = std::mem::size_of_val(buf);
    let data_size = u32::from_ne_bytes([
        buf[1].to_ne_bytes()[4],
        buf[1].to_ne_bytes()[5],
        buf[1].to_ne_bytes()[6],
        buf[1].to_ne_bytes()[7],
    ]) as usize;
    if bytes < DM_IOCTL_SIZE as usize || data_size > bytes {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `buf` is 8-aligned (u64s), at least a `struct dm_ioctl` long,
    // and its data_size (checked above) does not exceed it, so the kernel
    // reads and writes only inside it.
    check(unsafe { libc::ioctl(ctl.as_raw_fd(), req as _, buf.as_mut_ptr()) }).map(drop)
}
