//! An embedded Xenstore server: the same wire protocol as xenstored, over a unix
//! socket, with xenstored's permission, transaction, watch and quota semantics.
//!
//! It is the Xenstore of blkbackd's embedded default (no Xen at hand) and of the
//! tests. Debian's `xenstore-*` tools work against it with `XENSTORED_PATH`.
//! Socket connections speak for dom0, as with xenstored; a connection can be
//! made domain N's either in-process ([`Server::connect_as`]) or, across
//! processes, by the CONTROL command [`SIM_AS_DOMAIN`] once N is introduced.

mod state;
pub mod store;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

pub use state::SIM_AS_DOMAIN;
pub use store::Quotas;

use crate::wire::{DomId, Message};
use state::{ConnId, Outbox, State};

/// A Xenstore server. Cheap to clone; every clone serves the same store.
#[derive(Clone, Debug)]
pub struct Server {
    state: Arc<Mutex<State>>,
}

impl Default for Server {
    fn default() -> Self {
        Server::new(Quotas::default())
    }
}

impl Server {
    /// A server with an empty store and the given limits.
    pub fn new(quotas: Quotas) -> Server {
        Server {
            state: Arc::new(Mutex::new(State::new(quotas))),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug in the server; the store is
        // only changed after every check passed, so carrying on is still sound.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accepts connections on `listener` for ever; each speaks for dom0.
    pub async fn serve(&self, listener: UnixListener) -> io::Result<()> {
        loop {
            let (stream, _) = listener.accept().await?;
            self.attach(stream, DomId::DOM0);
        }
    }

    /// Binds `path` (replacing a stale socket) and serves it in a background task.
    pub async fn listen(&self, path: impl AsRef<Path>) -> io::Result<Listening> {
        let path = path.as_ref().to_path_buf();
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(&path)?;
        let server = self.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = server.serve(listener).await {
                tracing::error!("Xenstore server stopped accepting: {e}");
            }
        });
        Ok(Listening { path, task })
    }

    /// A new connection that speaks for `domid`, as a guest's would.
    pub fn connect_as(&self, domid: DomId) -> io::Result<UnixStream> {
        let (ours, theirs) = UnixStream::pair()?;
        self.attach(ours, domid);
        Ok(theirs)
    }

    /// Tells the server a domain exists (what the toolstack's INTRODUCE does).
    pub fn introduce(&self, domid: DomId) {
        self.lock().introduce(domid);
    }

    /// Tells the server a domain is gone (RELEASE): its connections are closed,
    /// its nodes pass to dom0, `@releaseDomain` fires.
    pub fn release(&self, domid: DomId) {
        let _ = self.lock().release(domid);
    }

    /// How many connections are open.
    pub fn connections(&self) -> usize {
        self.lock().connections()
    }

    /// How many transactions have committed.
    pub fn transactions_committed(&self) -> u64 {
        self.lock().commits
    }

    /// How many nodes `domid` owns.
    pub fn nodes_owned_by(&self, domid: DomId) -> usize {
        self.lock().store.owned_by(domid)
    }

    /// Runs raw bytes through a fresh connection of `domid`, without sockets, and
    /// returns everything the server queued for it: the synchronous door for
    /// property tests and fuzzing. Framing errors end the input as they would
    /// end a connection.
    pub fn handle_bytes(&self, domid: DomId, bytes: &[u8]) -> Vec<Message> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let outbox = Outbox {
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
            kill: Arc::new(Notify::new()),
        };
        let mut st = self.lock();
        let id = st.add_conn(domid, outbox);
        let mut rest = bytes;
        while let Ok(Some((msg, used))) = Message::decode(rest) {
            rest = &rest[used..];
            st.handle(id, msg);
            if !st.is_alive(id) {
                break;
            }
        }
        st.remove_conn(id);
        drop(st);
        let mut out = Vec::new();
        while let Ok(buf) = rx.try_recv() {
            let mut b = &buf[..];
            while let Ok(Some((m, used))) = Message::decode(b) {
                out.push(m);
                b = &b[used..];
            }
        }
        out
    }

    fn attach(&self, stream: UnixStream, domid: DomId) -> ConnId {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let kill = Arc::new(Notify::new());
        let id = self.lock().add_conn(
            domid,
            Outbox {
                tx,
                queued: queued.clone(),
                kill: kill.clone(),
            },
        );
        tokio::spawn(self.clone().run_conn(id, stream, rx, queued, kill));
        id
    }

    async fn run_conn(
        self,
        id: ConnId,
        stream: UnixStream,
        mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
        queued: Arc<AtomicUsize>,
        kill: Arc<Notify>,
    ) {
        let (mut rd, mut wr) = stream.into_split();
        let writer = tokio::spawn(async move {
            while let Some(buf) = rx.recv().await {
                if wr.write_all(&buf).await.is_err() {
                    break;
                }
                queued.fetch_sub(buf.len(), Ordering::Relaxed);
            }
        });
        let mut buf = Vec::with_capacity(2 * crate::wire::PAYLOAD_MAX);
        let mut chunk = vec![0u8; 16 * 1024];
        let mut killed = false;
        'conn: loop {
            loop {
                match Message::decode(&buf) {
                    Ok(Some((msg, used))) => {
                        buf.drain(..used);
                        let mut st = self.lock();
                        st.handle(id, msg);
                        if !st.is_alive(id) {
                            killed = true;
                            break 'conn;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // xenstored ignores a client that breaks framing; we drop it.
                        tracing::warn!(conn = id, "closing Xenstore connection: {e}");
                        break 'conn;
                    }
                }
            }
            tokio::select! {
                r = rd.read(&mut chunk) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                },
                _ = kill.notified() => { killed = true; break }
            }
        }
        self.lock().remove_conn(id);
        if killed {
            writer.abort();
        }
    }
}

/// A server bound to a socket path; dropping it stops accepting and removes the socket.
#[derive(Debug)]
pub struct Listening {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl Listening {
    /// The socket path (what `XENSTORED_PATH` should say).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}
