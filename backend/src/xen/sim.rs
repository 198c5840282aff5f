//! A simulated Xen that works across processes, for the embedded default.
//!
//! A directory plays the hypervisor:
//! - `dom<N>.mem`: domain N's memory, page by page (frame F at byte F*4096);
//! - `dom<N>.grants`: its grant table, real `grant_entry_v1` entries;
//! - `evtchn/d<N>-p<P>`: a unix datagram socket for port P of domain N.
//!
//! The guest side ([`SimDomain`]) owns its memory and grant table; the backend
//! side ([`SimGrants`], [`SimEvtchn`]) opens them as Xen would and checks every
//! grant entry as Xen does (permit-access, granted to us, read-only, frame in
//! range, copy within one page) before it touches a page: a bad or revoked
//! grant fails that copy, never reads another page.
//!
//! Not simulated: Xen pins a grant (`GTF_reading`/`GTF_writing`) while it
//! copies, so a revocation racing a copy is decided by Xen; here the check and
//! the copy are two steps. The backend never relies on that difference.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::net::UnixDatagram;

use super::mem::SharedMem;
use super::{CopyDir, CopySeg, DomId, EventChannel, EventChannels, Grants, Port};
use crate::abi::blkif::{GrantRef, XEN_PAGE_SIZE};
use crate::abi::sys::*;
use crate::ring::RingMem;

const ENTRY: usize = std::mem::size_of::<GrantEntryV1>();
/// Grant refs below this are reserved, as Linux reserves them.
pub const RESERVED_GRANTS: u32 = 8;

fn mem_path(dir: &Path, d: DomId) -> PathBuf {
    dir.join(format!("dom{}.mem", d.0))
}

fn grants_path(dir: &Path, d: DomId) -> PathBuf {
    dir.join(format!("dom{}.grants", d.0))
}

/// Removes what a destroyed simulated domain left in `dir` (its memory and
/// grant table files).
pub fn destroy_domain_files(dir: &Path, d: DomId) {
    let _ = std::fs::remove_file(mem_path(dir, d));
    let _ = std::fs::remove_file(grants_path(dir, d));
}

fn port_path(dir: &Path, d: DomId, p: Port) -> PathBuf {
    dir.join("evtchn").join(format!("d{}-p{p}", d.0))
}

fn einval(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_owned())
}

/// A simulated guest domain: its memory, its grant table, its event channels.
#[derive(Debug)]
pub struct SimDomain {
    dir: PathBuf,
    domid: DomId,
    mem: Arc<SharedMem>,
    grants: SharedMem,
    pages: u64,
    entries: u32,
    state: Mutex<DomState>,
}

#[derive(Debug, Default)]
struct DomState {
    next_page: u64,
    free_pages: Vec<u64>,
    next_gref: u32,
    free_grefs: Vec<u32>,
}

impl SimDomain {
    /// Creates domain `domid` with `pages` pages of memory and `entries` grant entries.
    pub fn create(dir: &Path, domid: DomId, pages: u64, entries: u32) -> io::Result<SimDomain> {
        std::fs::create_dir_all(dir.join("evtchn"))?;
        let open = |p: PathBuf, len: u64| -> io::Result<File> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)?;
            f.set_len(len)?;
            Ok(f)
        };
        let mem_len = pages * XEN_PAGE_SIZE as u64;
        let gt_len = u64::from(entries) * ENTRY as u64;
        let mf = open(mem_path(dir, domid), mem_len)?;
        let gf = open(grants_path(dir, domid), gt_len)?;
        Ok(SimDomain {
            dir: dir.to_owned(),
            domid,
            mem: Arc::new(SharedMem::map_fd(&mf, 0, mem_len as usize, true)?),
            grants: SharedMem::map_fd(&gf, 0, gt_len as usize, true)?,
            pages,
            entries,
            state: Mutex::new(DomState {
                next_gref: RESERVED_GRANTS,
                ..DomState::default()
            }),
        })
    }

    fn st(&self) -> std::sync::MutexGuard<'_, DomState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The domain id.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// The whole memory of the domain (frame F at F*4096).
    pub fn mem(&self) -> &Arc<SharedMem> {
        &self.mem
    }

    /// Allocates `n` contiguous zeroed pages; returns the first frame.
    pub fn alloc_pages(&self, n: u64) -> io::Result<u64> {
        let mut st = self.st();
        if n == 1 {
            if let Some(p) = st.free_pages.pop() {
                drop(st);
                self.mem
                    .write(p as usize * XEN_PAGE_SIZE, &[0u8; XEN_PAGE_SIZE]);
                return Ok(p);
            }
        }
        let first = st.next_page;
        if first + n > self.pages {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "simulated guest out of memory",
            ));
        }
        st.next_page += n;
        Ok(first)
    }

    /// Returns a page to the allocator.
    pub fn free_page(&self, frame: u64) {
        self.st().free_pages.push(frame);
    }

    /// Grants `frame` to `to` (read-only if asked); returns the grant reference.
    pub fn grant(&self, frame: u64, to: DomId, readonly: bool) -> io::Result<GrantRef> {
        let gref = {
            let mut st = self.st();
            match st.free_grefs.pop() {
                Some(g) => g,
                None if st.next_gref < self.entries => {
                    st.next_gref += 1;
                    st.next_gref - 1
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::OutOfMemory,
                        "grant table full",
                    ))
                }
            }
        };
        let frame = u32::try_from(frame).map_err(|_| einval("frame too large"))?;
        let gref = GrantRef(gref);
        self.write_entry(gref, frame, to, readonly);
        Ok(gref)
    }

    /// Writes a grant entry as a guest does: frame and domid first, then the
    /// flags that make it valid.
    pub fn write_entry(&self, gref: GrantRef, frame: u32, to: DomId, readonly: bool) {
        let at = gref.0 as usize * ENTRY;
        self.grants.store_u32(at + 4, frame);
        let flags = GTF_PERMIT_ACCESS | if readonly { GTF_READONLY } else { 0 };
        self.grants
            .store_u32(at, u32::from(flags) | (u32::from(to.0) << 16));
    }

    /// Ends access to a grant (`gnttab_end_foreign_access`): the entry becomes
    /// invalid and the reference free again.
    pub fn end_access(&self, gref: GrantRef) {
        self.revoke(gref);
        self.st().free_grefs.push(gref.0);
    }

    /// Invalidates a grant without freeing the reference (misbehaviour tests).
    pub fn revoke(&self, gref: GrantRef) {
        if gref.0 < self.entries {
            self.grants.store_u32(gref.0 as usize * ENTRY, 0);
        }
    }

    /// Allocates an unbound event-channel port for `remote` to bind to.
    pub fn alloc_unbound(&self, _remote: DomId) -> io::Result<GuestPort> {
        for port in (1..4096).map(Port) {
            let path = port_path(&self.dir, self.domid, port);
            match std::os::unix::net::UnixDatagram::bind(&path) {
                Ok(s) => {
                    s.set_nonblocking(true)?;
                    return Ok(GuestPort {
                        port,
                        path,
                        tx: s.try_clone()?,
                        sock: UnixDatagram::from_std(s)?,
                        peer: Mutex::new(None),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other("no free simulated event-channel port"))
    }
}

/// The guest's end of a simulated event channel.
#[derive(Debug)]
pub struct GuestPort {
    port: Port,
    path: PathBuf,
    /// Sends go through the std socket: tokio's `try_send` reports WouldBlock
    /// until its reactor has seen the socket writable, which would lose a kick.
    tx: std::os::unix::net::UnixDatagram,
    sock: UnixDatagram,
    peer: Mutex<Option<PathBuf>>,
}

impl GuestPort {
    /// The port number to publish (`event-channel`).
    pub fn port(&self) -> Port {
        self.port
    }

    /// Kicks the backend (an error until the backend has bound).
    pub fn notify(&self) -> io::Result<()> {
        let peer = self.peer.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let peer = match peer {
            Some(p) => p,
            None => self.peek_peer()?,
        };
        match self.tx.send_to(b"K", &peer) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Learns the backend's address from the link the bind recorded next to
    /// our port (`<port>.peer`): the guest may notify before its waiter has
    /// seen the bind announcement, as a real guest may notify as soon as the
    /// backend has bound.
    fn peek_peer(&self) -> io::Result<PathBuf> {
        let p = std::fs::read_to_string(self.path.with_extension("peer"))
            .map(PathBuf::from)
            .map_err(|_| {
                io::Error::new(io::ErrorKind::NotConnected, "event channel not bound yet")
            })?;
        *self.peer.lock().unwrap_or_else(|e| e.into_inner()) = Some(p.clone());
        Ok(p)
    }

    /// Whether the backend has bound this port.
    pub fn is_bound(&self) -> bool {
        self.peer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Waits for a kick (or the backend's bind), folding queued kicks into one.
    pub async fn wait(&self) -> io::Result<()> {
        let mut buf = [0u8; 16];
        let (_, from) = self.sock.recv_from(&mut buf).await?;
        self.learn(from);
        while let Ok((_, from)) = self.sock.try_recv_from(&mut buf) {
            self.learn(from);
        }
        Ok(())
    }

    /// The port's descriptor: readable while a kick is queued. For a guest
    /// loop on a thread of its own that sleeps in poll(2) itself, with no
    /// task waiting on the port (see [`GuestPort::take_kicks`]).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.tx.as_raw_fd()
    }

    /// Takes the kicks queued, without waiting; whether there was one.
    pub fn take_kicks(&self) -> bool {
        let mut buf = [0u8; 16];
        let mut any = false;
        while let Ok((_, from)) = self.tx.recv_from(&mut buf) {
            any = true;
            if let Some(p) = from.as_pathname() {
                self.learn_path(p);
            }
        }
        any
    }

    fn learn(&self, from: tokio::net::unix::SocketAddr) {
        if let Some(p) = from.as_pathname() {
            self.learn_path(p);
        }
    }

    fn learn_path(&self, p: &Path) {
        let mut peer = self.peer.lock().unwrap_or_else(|e| e.into_inner());
        if peer.as_deref() != Some(p) {
            *peer = Some(p.to_owned());
        }
    }
}

impl Drop for GuestPort {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(self.path.with_extension("peer"));
    }
}

/// The backend's view of another domain's memory and grant table.
#[derive(Debug)]
struct Foreign {
    file: File,
    mem: SharedMem,
    grants: SharedMem,
    frames: u64,
    entries: u32,
}

/// Grant access for the backend domain over a simulation directory.
#[derive(Debug)]
pub struct SimGrants {
    dir: PathBuf,
    me: DomId,
    doms: Mutex<HashMap<DomId, Arc<Foreign>>>,
}

impl SimGrants {
    /// The grant layer of domain `me` (the backend, usually 0) in `dir`.
    pub fn new(dir: &Path, me: DomId) -> SimGrants {
        SimGrants {
            dir: dir.to_owned(),
            me,
            doms: Mutex::new(HashMap::new()),
        }
    }

    fn foreign(&self, d: DomId) -> io::Result<Arc<Foreign>> {
        let mut doms = self.doms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = doms.get(&d) {
            return Ok(f.clone());
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(mem_path(&self.dir, d))?;
        let gfile = File::open(grants_path(&self.dir, d))?;
        let mem_len = file.metadata()?.len() as usize;
        let gt_len = gfile.metadata()?.len() as usize;
        if mem_len == 0 || gt_len < ENTRY {
            return Err(einval("simulated domain has no memory or grant table"));
        }
        let f = Arc::new(Foreign {
            mem: SharedMem::map_fd(&file, 0, mem_len, true)?,
            grants: SharedMem::map_fd(&gfile, 0, gt_len, false)?,
            frames: (mem_len / XEN_PAGE_SIZE) as u64,
            entries: (gt_len / ENTRY) as u32,
            file,
        });
        doms.insert(d, f.clone());
        Ok(f)
    }

    /// Forgets a domain's mappings (after it is gone).
    pub fn forget(&self, d: DomId) {
        self.doms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&d);
    }

    /// Checks a grant as Xen does; the frame on success, a `GNTST_*` otherwise.
    fn check(&self, f: &Foreign, gref: GrantRef, write: bool) -> Result<u64, i16> {
        if gref.0 >= f.entries {
            return Err(GNTST_BAD_GNTREF);
        }
        let at = gref.0 as usize * ENTRY;
        let head = f.grants.load_u32(at);
        let frame = u64::from(f.grants.load_u32(at + 4));
        let flags = (head & 0xffff) as u16;
        let domid = (head >> 16) as u16;
        if flags & GTF_TYPE_MASK != GTF_PERMIT_ACCESS || domid != self.me.0 {
            return Err(GNTST_GENERAL_ERROR);
        }
        if write && flags & GTF_READONLY != 0 {
            return Err(GNTST_GENERAL_ERROR);
        }
        if frame >= f.frames {
            return Err(GNTST_BAD_PAGE);
        }
        Ok(frame)
    }
}

impl Grants for SimGrants {
    fn copy(&self, segs: &mut [CopySeg<'_>]) -> io::Result<()> {
        for s in segs.iter_mut() {
            let f = match self.foreign(s.domid) {
                Ok(f) => f,
                Err(_) => {
                    s.status = GNTST_BAD_DOMAIN;
                    continue;
                }
            };
            if usize::from(s.offset) + s.dir.len() > XEN_PAGE_SIZE {
                s.status = GNTST_BAD_COPY_ARG;
                continue;
            }
            let write = matches!(s.dir, CopyDir::ToGuest(_));
            match self.check(&f, s.gref, write) {
                Err(st) => s.status = st,
                Ok(frame) => {
                    let at = frame as usize * XEN_PAGE_SIZE + usize::from(s.offset);
                    match &mut s.dir {
                        CopyDir::FromGuest(buf) => f.mem.read_data(at, buf),
                        CopyDir::ToGuest(buf) => f.mem.write_data(at, buf),
                    }
                    s.status = GNTST_OKAY;
                }
            }
        }
        Ok(())
    }

    fn map(&self, domid: DomId, refs: &[GrantRef], writable: bool) -> io::Result<SharedMem> {
        let f = self.foreign(domid)?;
        let frames = refs
            .iter()
            .map(|&g| self.check(&f, g, writable))
            .collect::<Result<Vec<u64>, i16>>()
            .map_err(|st| {
                io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("grant map refused with status {st}"),
                )
            })?;
        SharedMem::map_frames(&f.file, &frames, writable)
    }

    fn forget_domain(&self, domid: DomId) {
        self.forget(domid);
    }
}

/// Event channels for the backend domain over a simulation directory.
#[derive(Debug)]
pub struct SimEvtchn {
    dir: PathBuf,
    me: DomId,
}

impl SimEvtchn {
    /// Event channels of domain `me` in `dir`.
    pub fn new(dir: &Path, me: DomId) -> SimEvtchn {
        SimEvtchn {
            dir: dir.to_owned(),
            me,
        }
    }
}

/// The backend's end of a simulated event channel.
#[derive(Debug)]
pub struct SimChannel {
    port: Port,
    path: PathBuf,
    /// Non-blocking; registered with no reactor (the queue's thread polls it).
    tx: std::os::unix::net::UnixDatagram,
}

impl EventChannels for SimEvtchn {
    type Channel = SimChannel;

    fn bind_interdomain(&self, remote: DomId, remote_port: Port) -> io::Result<SimChannel> {
        let target = port_path(&self.dir, remote, remote_port);
        if !target.exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("domain {remote} has no unbound port {remote_port}"),
            ));
        }
        std::fs::create_dir_all(self.dir.join("evtchn"))?;
        for port in (1..65536).map(Port) {
            let path = port_path(&self.dir, self.me, port);
            match std::os::unix::net::UnixDatagram::bind(&path) {
                Ok(s) => {
                    s.set_nonblocking(true)?;
                    if let Err(e) = s.connect(&target) {
                        let _ = std::fs::remove_file(&path);
                        return Err(e);
                    }
                    // Xen links the two ports: record the link for the guest.
                    std::fs::write(
                        target.with_extension("peer"),
                        path.as_os_str().as_encoded_bytes(),
                    )?;
                    let ch = SimChannel { port, path, tx: s };
                    // Tell the guest who its peer is (Xen links the two ports).
                    ch.notify()?;
                    return Ok(ch);
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other("no free simulated event-channel port"))
    }
}

impl EventChannel for SimChannel {
    fn local_port(&self) -> Port {
        self.port
    }

    fn notify(&self) -> io::Result<()> {
        match self.tx.send(b"K") {
            Ok(_) => Ok(()),
            // A full queue means a kick is already pending: nothing is lost.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn unmask(&self) -> io::Result<()> {
        Ok(())
    }

    fn fd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(&self.tx))
    }

    fn carried(&self) -> Option<crate::xen::Carried> {
        // A kick is a datagram: a read takes one, `take_kick` the rest.
        Some(crate::xen::Carried {
            unmask: None,
            fold: true,
        })
    }

    fn take_kick(&self) -> io::Result<bool> {
        let mut buf = [0u8; 16];
        let mut any = false;
        loop {
            match self.tx.recv(&mut buf) {
                Ok(_) => any = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(any),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for SimChannel {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, SimDomain, SimGrants) {
        let dir = tempfile::tempdir().unwrap();
        let guest = SimDomain::create(dir.path(), DomId(3), 64, 128).unwrap();
        let grants = SimGrants::new(dir.path(), DomId(0));
        (dir, guest, grants)
    }

    #[test]
    fn a_granted_page_can_be_copied_both_ways() {
        let (_d, g, gr) = setup();
        let f = g.alloc_pages(1).unwrap();
        g.mem().write(f as usize * 4096 + 100, b"guest data");
        let gref = g.grant(f, DomId(0), false).unwrap();
        let mut buf = [0u8; 10];
        let mut segs = [CopySeg::from_guest(DomId(3), gref, 100, &mut buf)];
        gr.copy(&mut segs).unwrap();
        assert_eq!(segs[0].status, GNTST_OKAY);
        assert_eq!(&buf, b"guest data");
        let mut segs = [CopySeg::to_guest(DomId(3), gref, 0, b"backend")];
        gr.copy(&mut segs).unwrap();
        assert_eq!(segs[0].status, GNTST_OKAY);
        let mut back = [0u8; 7];
        g.mem().read(f as usize * 4096, &mut back);
        assert_eq!(&back, b"backend");
    }

    #[test]
    fn bad_grants_fail_their_own_copy_and_touch_nothing() {
        let (_d, g, gr) = setup();
        let f = g.alloc_pages(1).unwrap();
        let ro = g.grant(f, DomId(0), true).unwrap();
        let other = g.grant(f, DomId(7), false).unwrap();
        let revoked = g.grant(f, DomId(0), false).unwrap();
        g.revoke(revoked);
        let good = g.grant(f, DomId(0), false).unwrap();
        let mut segs = vec![
            CopySeg::to_guest(DomId(3), ro, 0, b"x"),
            CopySeg::to_guest(DomId(3), other, 0, b"x"),
            CopySeg::to_guest(DomId(3), revoked, 0, b"x"),
            CopySeg::to_guest(DomId(3), GrantRef(10_000), 0, b"x"),
            CopySeg::to_guest(DomId(3), good, 4095, b"xx"),
            CopySeg::to_guest(DomId(9), good, 0, b"x"),
            CopySeg::to_guest(DomId(3), good, 0, b"ok"),
        ];
        gr.copy(&mut segs).unwrap();
        let st: Vec<i16> = segs.iter().map(|s| s.status).collect();
        assert_eq!(
            st,
            vec![
                GNTST_GENERAL_ERROR,
                GNTST_GENERAL_ERROR,
                GNTST_GENERAL_ERROR,
                GNTST_BAD_GNTREF,
                GNTST_BAD_COPY_ARG,
                GNTST_BAD_DOMAIN,
                GNTST_OKAY
            ]
        );
        let mut page = vec![0u8; 4096];
        g.mem().read(f as usize * 4096, &mut page);
        assert_eq!(&page[..2], b"ok");
        assert!(page[2..].iter().all(|&b| b == 0), "no other write landed");
    }

    #[test]
    fn a_grant_for_a_frame_outside_guest_memory_is_refused() {
        let (_d, g, gr) = setup();
        let gref = g.grant(10_000, DomId(0), false).unwrap();
        let mut buf = [0u8; 4];
        let mut segs = [CopySeg::from_guest(DomId(3), gref, 0, &mut buf)];
        gr.copy(&mut segs).unwrap();
        assert_eq!(segs[0].status, GNTST_BAD_PAGE);
        assert!(gr.map(DomId(3), &[gref], false).is_err());
    }

    #[test]
    fn mapped_grants_share_the_guests_pages() {
        let (_d, g, gr) = setup();
        let a = g.alloc_pages(2).unwrap();
        let r0 = g.grant(a + 1, DomId(0), false).unwrap();
        let r1 = g.grant(a, DomId(0), false).unwrap();
        let m = gr.map(DomId(3), &[r0, r1], true).unwrap();
        m.write(0, b"into a+1");
        let mut b = [0u8; 8];
        g.mem().read((a as usize + 1) * 4096, &mut b);
        assert_eq!(&b, b"into a+1");
        let ro = g.grant(a, DomId(0), true).unwrap();
        assert!(
            gr.map(DomId(3), &[ro], true).is_err(),
            "read-only grant mapped writable"
        );
    }

    /// What a queue's thread does: sleep on the descriptor, take the kick.
    fn backend_waits(ch: &SimChannel) {
        let fd = ch.fd().expect("a descriptor");
        let r = crate::io::wait::readable(&[fd], Some(std::time::Duration::from_secs(5))).unwrap();
        assert!(r[0], "no kick within 5 s");
        assert!(ch.take_kick().unwrap());
    }

    #[tokio::test]
    async fn event_channels_kick_both_ways() {
        let (d, g, _gr) = setup();
        let gp = g.alloc_unbound(DomId(0)).unwrap();
        let ev = SimEvtchn::new(d.path(), DomId(0));
        assert!(ev
            .bind_interdomain(DomId(3), Port(gp.port().0 + 100))
            .is_err());
        let ch = ev.bind_interdomain(DomId(3), gp.port()).unwrap();
        // The guest may kick before it has waited for anything: the bind
        // announcement, still queued, tells it where the backend is.
        gp.notify().unwrap();
        assert!(gp.is_bound());
        backend_waits(&ch);
        tokio::time::timeout(std::time::Duration::from_secs(5), gp.wait())
            .await
            .expect("the bind announcement is still there for the waiter")
            .unwrap();
        gp.notify().unwrap();
        gp.notify().unwrap();
        backend_waits(&ch);
        assert!(!ch.take_kick().unwrap(), "two kicks folded into one");
        ch.notify().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), gp.wait())
            .await
            .unwrap()
            .unwrap();
    }
}
