//! Where a queue's thread sleeps when its engine is not io_uring (which
//! sleeps in `io_uring_enter`): `poll(2)` on its few descriptors at once
//! (the event channel, the engine's completions, the stop signal), and
//! [`Doorbell`], a descriptor one thread rings for another.
#![allow(unsafe_code)]

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Spins until `ready()` or `window` has passed; whether `ready()` came.
/// The clock is read once every few looks: a look is a few loads, a clock
/// read costs as much as several of them.
pub fn spin(window: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + window;
    loop {
        for _ in 0..16 {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        if std::time::Instant::now() >= until {
            return ready();
        }
    }
}

/// Most descriptors one wait takes.
pub const MAX_FDS: usize = 4;

/// Sleeps until one of `fds` is readable (or has hung up), at most
/// `timeout` (`None`: no limit); returns which are, by index. Negative
/// entries are ignored. An interrupted wait returns none ready.
pub fn readable(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<[bool; MAX_FDS]> {
    assert!(fds.len() <= MAX_FDS, "at most {MAX_FDS} descriptors");
    let mut p = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; MAX_FDS];
    for (slot, &fd) in p.iter_mut().zip(fds) {
        slot.fd = fd;
        slot.events = libc::POLLIN;
    }
    let ms = match timeout {
        None => -1,
        // Rounded up: a wait never ends before its time.
        Some(t) => i32::try_from(t.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX),
    };
    // SAFETY: `p` is a live array of `fds.len()` initialised pollfds that
    // the kernel writes `revents` of and nothing else.
    let r = unsafe { libc::poll(p.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    let mut out = [false; MAX_FDS];
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(out)
        } else {
            Err(e)
        };
    }
    for (o, slot) in out.iter_mut().zip(&p[..fds.len()]) {
        *o = slot.fd >= 0 && slot.revents != 0;
    }
    Ok(out)
}

/// [`readable`] on a sleep's two descriptors (`-1`: none) and an engine's
/// own (what polls readable when it has completions); says which of the
/// two were readable.
pub fn readable_with(
    fds: [RawFd; 2],
    own: [Option<RawFd>; 2],
    timeout: Option<Duration>,
) -> io::Result<[bool; 2]> {
    let all = [fds[0], fds[1], own[0].unwrap_or(-1), own[1].unwrap_or(-1)];
    let ready = readable(&all, timeout)?;
    Ok([ready[0], ready[1]])
}

/// A descriptor that turns readable when rung and stays so until
/// [`Doorbell::clear`]: how another thread wakes one sleeping in
/// [`readable`] (a completion of the blocking engine's worker, a stop).
#[derive(Debug)]
pub struct Doorbell {
    rx: UnixStream,
    tx: UnixStream,
}

impl Doorbell {
    /// A new, quiet doorbell.
    pub fn new() -> io::Result<Doorbell> {
        let (rx, tx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        Ok(Doorbell { rx, tx })
    }

    /// Another handle on the same doorbell.
    pub fn try_clone(&self) -> io::Result<Doorbell> {
        Ok(Doorbell {
            rx: self.rx.try_clone()?,
            tx: self.tx.try_clone()?,
        })
    }

    /// Makes [`Doorbell::fd`] readable. A full socket already is: nothing
    /// is lost.
    pub fn ring(&self) {
        let _ = (&self.tx).write(&[1]);
    }

    /// Quiets it again (what was rung before is consumed).
    pub fn clear(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.rx).read(&mut buf), Ok(n) if n > 0) {}
    }

    /// What to wait on.
    pub fn fd(&self) -> RawFd {
        self.rx.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_rung_doorbell_wakes_the_wait_until_cleared() {
        let a = Doorbell::new().unwrap();
        let b = Doorbell::new().unwrap();
        let t = Instant::now();
        let r = readable(&[a.fd(), b.fd()], Some(Duration::from_millis(20))).unwrap();
        assert_eq!(r[..2], [false, false]);
        assert!(t.elapsed() >= Duration::from_millis(20), "woke early");
        let other = b.try_clone().unwrap();
        std::thread::spawn(move || other.ring()).join().unwrap();
        let r = readable(&[a.fd(), b.fd(), -1], None).unwrap();
        assert_eq!(r[..3], [false, true, false]);
        b.clear();
        let r = readable(&[a.fd(), b.fd()], Some(Duration::ZERO)).unwrap();
        assert_eq!(r[..2], [false, false]);
    }
}
