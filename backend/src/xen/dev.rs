//! Grants and event channels through Linux's Xen devices in dom0:
//! `/dev/xen/gntdev` (map, unmap, grant copy) and `/dev/xen/evtchn`.
//!
//! Each ioctl here was checked line by line against `xen/sys/gntdev.h` and
//! `xen/sys/evtchn.h`; the struct encodings are unit-tested, the devices
//! themselves are exercised in the VM tests (no Xen on a plain host).
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use super::mem::SharedMem;
use super::{CopyDir, CopySeg, DomId, EventChannel, EventChannels, Grants, Port};
use crate::abi::blkif::{GrantRef, XEN_PAGE_SIZE};
use crate::abi::sys::*;

/// The gntdev device.
pub const GNTDEV: &str = "/dev/xen/gntdev";
/// The evtchn device.
pub const EVTCHN: &str = "/dev/xen/evtchn";

/// `ioctl(fd, req, arg)` on the gntdev or evtchn device.
///
/// # Safety
///
/// `req` must be a request number from `abi::sys` whose argument, as the
/// kernel's header declares it, is exactly a `T` (sizes are pinned by
/// compile-time assertions there), and every address inside `*arg` must be
/// valid for what that request does with it for the length of the call.
unsafe fn ioctl<T: ?Sized>(fd: RawFd, req: u32, arg: &mut T) -> io::Result<libc::c_int> {
    // SAFETY: `arg` is a live, writable `T`, which the caller vouches is
    // what `req` reads and writes.
    let r = unsafe {
        libc::ioctl(
            fd,
            req as libc::c_ulong,
            (arg as *mut T).cast::<libc::c_void>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Builds the variable-length argument of `IOCTL_GNTDEV_MAP_GRANT_REF`:
/// the head, then `count` refs, in u64 words so it is aligned for the kernel.
pub fn encode_map(domid: DomId, refs: &[GrantRef]) -> Vec<u64> {
    let words = 2 + refs.len();
    let mut buf = vec![0u64; words];
    buf[0] = refs.len() as u64; // count (low half), pad (high half) = 0
    for (i, r) in refs.iter().enumerate() {
        buf[2 + i] = u64::from(domid.0) | (u64::from(r.0) << 32);
    }
    buf
}

/// Builds the grant-copy segments for a batch: the foreign side by grant, the
/// local side by address.
pub fn encode_copy(segs: &mut [CopySeg<'_>]) -> Vec<GntdevGrantCopySegment> {
    segs.iter_mut()
        .map(|s| {
            let foreign = GntdevCopyPtr {
                foreign: GntdevCopyForeign {
                    gref: s.gref.0,
                    offset: s.offset,
                    domid: s.domid.0,
                },
            };
            let len = s.dir.len().min(u16::MAX as usize) as u16;
            match &mut s.dir {
                CopyDir::FromGuest(buf) => GntdevGrantCopySegment {
                    source: foreign,
                    dest: GntdevCopyPtr {
                        virt: buf.as_mut_ptr() as u64,
                    },
                    len,
                    flags: GNTCOPY_SOURCE_GREF,
                    status: 0,
                },
                CopyDir::ToGuest(buf) => GntdevGrantCopySegment {
                    source: GntdevCopyPtr {
                        virt: buf.as_ptr() as u64,
                    },
                    dest: foreign,
                    len,
                    flags: GNTCOPY_DEST_GREF,
                    status: 0,
                },
            }
        })
        .collect()
}

/// `/dev/xen/gntdev`.
#[derive(Debug, Clone)]
pub struct Gntdev {
    file: Arc<File>,
}

impl Gntdev {
    /// Opens the device.
    pub fn open() -> io::Result<Gntdev> {
        let file = OpenOptions::new().read(true).write(true).open(GNTDEV)?;
        Ok(Gntdev {
            file: Arc::new(file),
        })
    }
}

impl Gntdev {
    /// Maps grants like [`Grants::map`] and arms `IOCTL_GNTDEV_SET_UNMAP_NOTIFY`
    /// on the mapping: if this process dies without unmapping, the kernel
    /// clears the byte at `clear_byte` (an offset in the mapping) and/or
    /// notifies `port`, so the frontend learns its backend is gone.
    pub fn map_with_unmap_notify(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
        clear_byte: Option<u64>,
        port: Option<Port>,
    ) -> io::Result<SharedMem> {
        let (mem, index) = self.map_indexed(domid, refs, writable)?;
        let mut arg = unmap_notify(index, clear_byte, port);
        if arg.action != 0 {
            // SAFETY: the request's argument is a `GntdevUnmapNotify`.
            unsafe {
                ioctl(
                    self.file.as_raw_fd(),
                    IOCTL_GNTDEV_SET_UNMAP_NOTIFY,
                    &mut arg,
                )
            }?;
        }
        Ok(mem)
    }

    fn map_indexed(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> io::Result<(SharedMem, u64)> {
        if refs.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut arg = encode_map(domid, refs);
        // SAFETY: the request's argument is a `GntdevMapGrantRef` head
        // followed by its `count` refs, which `encode_map` laid out in `arg`.
        unsafe {
            ioctl(
                self.file.as_raw_fd(),
                IOCTL_GNTDEV_MAP_GRANT_REF,
                &mut arg[..],
            )
        }?;
        let index = arg[1];
        let len = refs.len() * XEN_PAGE_SIZE;
        let unmap = {
            let file = self.file.clone();
            let count = refs.len() as u32;
            move || {
                let mut u = GntdevUnmapGrantRef {
                    index,
                    count,
                    pad: 0,
                };
                // SAFETY: the request's argument is a `GntdevUnmapGrantRef`.
                let r = unsafe { ioctl(file.as_raw_fd(), IOCTL_GNTDEV_UNMAP_GRANT_REF, &mut u) };
                if let Err(e) = r {
                    tracing::error!("gntdev unmap of {count} grants at {index:#x} failed: {e}");
                }
            }
        };
        match SharedMem::map_fd(&*self.file, index, len, writable) {
            Ok(m) => Ok((m.with_on_drop(unmap), index)),
            Err(e) => {
                unmap();
                Err(e)
            }
        }
    }
}

/// The argument of `IOCTL_GNTDEV_SET_UNMAP_NOTIFY` for a mapping at `index`.
pub fn unmap_notify(index: u64, clear_byte: Option<u64>, port: Option<Port>) -> GntdevUnmapNotify {
    let mut action = 0;
    if clear_byte.is_some() {
        action |= UNMAP_NOTIFY_CLEAR_BYTE;
    }
    if port.is_some() {
        action |= UNMAP_NOTIFY_SEND_EVENT;
    }
    GntdevUnmapNotify {
        index: index + clear_byte.unwrap_or(0),
        action,
        event_channel_port: port.map_or(0, |p| p.0),
    }
}

impl Grants for Gntdev {
    fn copy(&self, segs: &mut [CopySeg<'_>]) -> io::Result<()> {
        if segs.is_empty() {
            return Ok(());
        }
        for s in segs.iter() {
            if usize::from(s.offset) + s.dir.len() > XEN_PAGE_SIZE {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
        }
        let mut wire = encode_copy(segs);
        let mut arg = GntdevGrantCopy {
            count: u32::try_from(wire.len())
                .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
            segments: wire.as_mut_ptr() as u64,
        };
        // SAFETY: the request's argument is a `GntdevGrantCopy`; the
        // segments it points to are `wire`, alive until this returns, and the
        // local buffers named in them are borrowed by `segs` for this call.
        unsafe { ioctl(self.file.as_raw_fd(), IOCTL_GNTDEV_GRANT_COPY, &mut arg) }?;
        for (s, w) in segs.iter_mut().zip(&wire) {
            s.status = w.status;
        }
        Ok(())
    }

    fn map(&self, domid: DomId, refs: &[GrantRef], writable: bool) -> io::Result<SharedMem> {
        self.map_indexed(domid, refs, writable).map(|(m, _)| m)
    }
}

/// `/dev/xen/evtchn`, one open file per bound channel.
#[derive(Debug, Default, Clone, Copy)]
pub struct Evtchn;

/// A channel bound through `/dev/xen/evtchn`.
#[derive(Debug)]
pub struct DevChannel {
    /// Non-blocking; registered with no reactor (the queue's thread polls it).
    fd: File,
    port: Port,
}

impl EventChannels for Evtchn {
    type Channel = DevChannel;

    fn bind_interdomain(&self, remote: DomId, remote_port: Port) -> io::Result<DevChannel> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(EVTCHN)?;
        let mut arg = EvtchnBindInterdomain {
            remote_domain: u32::from(remote.0),
            remote_port: remote_port.0,
        };
        // SAFETY: the request's argument is an `EvtchnBindInterdomain`.
        let port = unsafe { ioctl(file.as_raw_fd(), IOCTL_EVTCHN_BIND_INTERDOMAIN, &mut arg) }?;
        let port = Port(u32::try_from(port).map_err(|_| io::Error::other("negative port"))?);
        Ok(DevChannel { fd: file, port })
    }
}

use std::os::unix::fs::OpenOptionsExt;

impl EventChannel for DevChannel {
    fn local_port(&self) -> Port {
        self.port
    }

    fn notify(&self) -> io::Result<()> {
        let mut arg = EvtchnPortArg { port: self.port.0 };
        // SAFETY: the request's argument is an `EvtchnPortArg`.
        unsafe { ioctl(self.fd.as_raw_fd(), IOCTL_EVTCHN_NOTIFY, &mut arg) }.map(drop)
    }

    fn fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.fd.as_raw_fd())
    }

    fn take_kick(&self) -> io::Result<bool> {
        // The descriptor is non-blocking: read the pending ports until none.
        let mut any = false;
        loop {
            let mut bytes = [0u8; 64];
            match io::Read::read(&mut (&self.fd), &mut bytes) {
                Ok(0) => return Ok(any),
                Ok(n) => {
                    any |= bytes[..n]
                        .chunks_exact(4)
                        .any(|c| c == self.port.0.to_ne_bytes());
                    // The driver hands over every pending port that fits:
                    // a read that did not fill the buffer left none.
                    if n < bytes.len() {
                        return Ok(any);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(any),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn carried(&self) -> Option<super::Carried> {
        // The descriptor is bound to this one port: what a read returns is
        // its kick, and the driver queues it again only after the unmask
        // (the late EOI), so one read takes all there is.
        Some(super::Carried {
            unmask: Some(self.port.0.to_ne_bytes()),
            fold: false,
        })
    }

    fn unmask(&self) -> io::Result<()> {
        let n = io::Write::write(&mut (&self.fd), &self.port.0.to_ne_bytes())?;
        if n == 4 {
            Ok(())
        } else {
            Err(io::Error::from(io::ErrorKind::WriteZero))
        }
    }
}

impl Drop for DevChannel {
    fn drop(&mut self) {
        let mut arg = EvtchnPortArg { port: self.port.0 };
        // SAFETY: the request's argument is an `EvtchnPortArg`.
        let _ = unsafe { ioctl(self.fd.as_raw_fd(), IOCTL_EVTCHN_UNBIND, &mut arg) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_argument_is_head_then_domid_ref_pairs() {
        let w = encode_map(DomId(5), &[GrantRef(0x11), GrantRef(0x22)]);
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_ne_bytes()).collect();
        assert_eq!(bytes.len(), 16 + 2 * 8);
        assert_eq!(&bytes[0..4], &2u32.to_ne_bytes(), "count");
        assert_eq!(&bytes[4..8], &[0; 4], "pad");
        assert_eq!(&bytes[16..20], &5u32.to_ne_bytes(), "domid of ref 0");
        assert_eq!(&bytes[20..24], &0x11u32.to_ne_bytes(), "ref 0");
        assert_eq!(&bytes[28..32], &0x22u32.to_ne_bytes(), "ref 1");
    }

    #[test]
    fn copy_segments_point_the_foreign_side_at_the_grant() {
        let mut a = [0u8; 512];
        let b = [1u8; 100];
        let mut segs = [
            CopySeg::from_guest(DomId(3), GrantRef(9), 512, &mut a),
            CopySeg::to_guest(DomId(4), GrantRef(10), 8, &b),
        ];
        let a_ptr = match &segs[0].dir {
            CopyDir::FromGuest(x) => x.as_ptr() as u64,
            _ => unreachable!(),
        };
        let w = encode_copy(&mut segs);
        assert_eq!((w[0].len, w[0].flags), (512, GNTCOPY_SOURCE_GREF));
        // SAFETY: reading the union arm the encoder wrote for each side.
        let (src, dst) = unsafe { (w[0].source.foreign, w[0].dest.virt) };
        assert_eq!((src.gref, src.offset, src.domid), (9, 512, 3));
        assert_eq!(dst, a_ptr);
        assert_eq!((w[1].len, w[1].flags), (100, GNTCOPY_DEST_GREF));
        // SAFETY: as above.
        let dst = unsafe { w[1].dest.foreign };
        assert_eq!((dst.gref, dst.offset, dst.domid), (10, 8, 4));
    }

    #[test]
    fn unmap_notify_names_the_byte_and_the_port() {
        let a = unmap_notify(0x1000, Some(8), Some(Port(5)));
        assert_eq!(
            (a.index, a.action, a.event_channel_port),
            (0x1008, UNMAP_NOTIFY_CLEAR_BYTE | UNMAP_NOTIFY_SEND_EVENT, 5)
        );
        let b = unmap_notify(0x2000, None, Some(Port(9)));
        assert_eq!((b.index, b.action), (0x2000, UNMAP_NOTIFY_SEND_EVENT));
        assert_eq!(unmap_notify(0, None, None).action, 0);
    }

    #[test]
    fn opening_the_devices_without_xen_fails_cleanly() {
        if std::path::Path::new(GNTDEV).exists() {
            return; // a real dom0: covered by the VM tests
        }
        assert!(Gntdev::open().is_err());
        assert!(Evtchn.bind_interdomain(DomId(1), Port(1)).is_err());
    }
}
