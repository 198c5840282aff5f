//! An async Xenstore client (tokio).
//!
//! One background task reads the connection and routes each message: a reply to
//! the request waiting on its `req_id`, a watch event to its watch's queue. It
//! never waits on a consumer, so a burst of events cannot stall replies.
//!
//! Watch queues are bounded and coalescing (XSA-349: whoever can write below a
//! watched path, a guest below its own frontend directory, must not be able to
//! grow the watcher's memory): an event whose path is already queued is folded
//! into it, and a queue that reaches [`WATCH_QUEUE_MAX`] distinct paths is
//! replaced by one event for the watched path itself, meaning "anything at or
//! below it may have changed: read again", which absorbs every further event
//! until it is taken. A consumer that re-reads what it watches on each event
//! (every consumer of Xenstore should) misses nothing.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use crate::wire::{self, DomId, ErrorCode, Message, Op, Perm, PAYLOAD_MAX};

/// The default socket of xenstored.
pub const DEFAULT_SOCKET: &str = "/run/xenstored/socket";
/// The xenbus device, for a domain without a socket (a driver domain).
pub const XENBUS_DEVICE: &str = "/dev/xen/xenbus";
/// How often [`Client::transaction`] tries a transaction that keeps conflicting.
pub const MAX_TRANSACTION_ATTEMPTS: u32 = 20;

/// A client error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// xenstored refused the request.
    #[error("Xenstore answered {code} to {op} {path}")]
    Xenstore {
        /// The error name xenstored sent.
        code: ErrorCode,
        /// The request.
        op: Op,
        /// The path (or other first argument) of the request.
        path: String,
    },
    /// xenstored sent an error name that `xs_wire.h` does not list.
    #[error("Xenstore answered an unknown error {name:?} to {op}")]
    UnknownError {
        /// What it sent.
        name: String,
        /// The request.
        op: Op,
    },
    /// No Xenstore could be reached.
    #[error("cannot connect to Xenstore at {path}: {source}")]
    Connect {
        /// Where we tried.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// None of `XENSTORED_PATH`, the default socket and the xenbus device exists.
    #[error("no Xenstore found: XENSTORED_PATH is unset and neither {DEFAULT_SOCKET} nor {XENBUS_DEVICE} exists")]
    NoEndpoint,
    /// The connection is gone; every pending and later request fails with this.
    #[error("the Xenstore connection is closed: {0}")]
    Disconnected(String),
    /// A request larger than the wire allows (nothing was sent).
    #[error("a {op} request of {len} bytes exceeds the Xenstore payload maximum of {PAYLOAD_MAX}")]
    TooLarge {
        /// The request.
        op: Op,
        /// Its payload size.
        len: usize,
    },
    /// An argument the wire cannot carry (a nul byte in a path or token).
    #[error("invalid argument for {op}: {detail}")]
    InvalidArgument {
        /// The request.
        op: Op,
        /// What is wrong.
        detail: String,
    },
    /// A reply that does not follow the protocol.
    #[error("malformed reply to {op}: {detail}")]
    Protocol {
        /// The request.
        op: Op,
        /// What is wrong.
        detail: String,
    },
    /// A value that was expected to be text is not UTF-8.
    #[error("the value at {path} is not UTF-8")]
    NotUtf8 {
        /// Where.
        path: String,
    },
    /// A transaction still conflicted after [`MAX_TRANSACTION_ATTEMPTS`] tries.
    #[error("transaction still conflicting (EAGAIN) after {0} attempts")]
    TooManyRetries(u32),
}

impl Error {
    /// The xenstored error name, if this is a refusal by xenstored.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Xenstore { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether xenstored said ENOENT.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(ErrorCode::ENOENT)
    }
}

/// A client result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a Xenstore lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket (xenstored's, or an embedded server's).
    Socket(PathBuf),
    /// The xenbus character device.
    Device(PathBuf),
}

impl Endpoint {
    /// What libxenstore would use: `XENSTORED_PATH` if set, else the default
    /// socket if it exists, else the xenbus device if it exists.
    pub fn from_env() -> Result<Endpoint> {
        if let Some(p) = std::env::var_os("XENSTORED_PATH") {
            return Ok(Endpoint::for_path(p));
        }
        for p in [DEFAULT_SOCKET, XENBUS_DEVICE] {
            if Path::new(p).exists() {
                return Ok(Endpoint::for_path(p));
            }
        }
        Err(Error::NoEndpoint)
    }

    /// A socket, or the device if `path` is a character device.
    pub fn for_path(path: impl Into<PathBuf>) -> Endpoint {
        let path = path.into();
        match std::fs::metadata(&path) {
            Ok(m) if m.file_type().is_char_device() => Endpoint::Device(path),
            _ => Endpoint::Socket(path),
        }
    }
}

/// A watch event: the path that changed (relative if the watch was) and the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// The path that changed.
    pub path: String,
    /// The watch's token.
    pub token: String,
}

#[derive(Debug, Default)]
struct Routes {
    pending: HashMap<u32, oneshot::Sender<Message>>,
    watches: HashMap<String, Arc<WatchQueue>>,
    dead: Option<String>,
}

#[derive(Debug)]
struct Inner {
    out: mpsc::UnboundedSender<Vec<u8>>,
    routes: Mutex<Routes>,
    next_req: AtomicU32,
    next_token: AtomicU64,
}

impl Inner {
    fn routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fails everything pending and ends every watch stream.
    fn die(&self, why: String) {
        let mut r = self.routes();
        if r.dead.is_none() {
            tracing::debug!("Xenstore connection closed: {why}");
            r.dead = Some(why);
        }
        r.pending.clear();
        for (_, q) in r.watches.drain() {
            q.close();
        }
    }

    fn route(&self, msg: Message) {
        if msg.ty == Op::WatchEvent as u32 {
            let (strings, _) = wire::split_strings(&msg.payload);
            if strings.len() < 2 {
                tracing::debug!("malformed watch event ignored");
                return;
            }
            let ev = WatchEvent {
                path: String::from_utf8_lossy(strings[0]).into_owned(),
                token: String::from_utf8_lossy(strings[1]).into_owned(),
            };
            let q = self.routes().watches.get(&ev.token).cloned();
            if let Some(q) = q {
                q.push(ev);
            }
            return;
        }
        match self.routes().pending.remove(&msg.req_id) {
            Some(tx) => {
                let _ = tx.send(msg);
            }
            None => tracing::debug!(req_id = msg.req_id, "reply to no pending request"),
        }
    }
}

enum Reader {
    Socket(OwnedReadHalf),
    /// Chunks read by a thread doing blocking reads of the xenbus device (its
    /// poll support is partial, and blocking reads keep this crate free of unsafe).
    Device(mpsc::UnboundedReceiver<io::Result<Vec<u8>>>, Vec<u8>),
}

impl Reader {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Reader::Socket(s) => s.read(buf).await,
            Reader::Device(rx, left) => {
                if left.is_empty() {
                    match rx.recv().await {
                        Some(chunk) => *left = chunk?,
                        None => return Ok(0),
                    }
                }
                let n = left.len().min(buf.len());
                buf[..n].copy_from_slice(&left[..n]);
                left.drain(..n);
                Ok(n)
            }
        }
    }
}

enum Writer {
    Socket(OwnedWriteHalf),
    Device(Arc<std::fs::File>),
}

impl Writer {
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Writer::Socket(s) => s.write_all(buf).await,
            Writer::Device(f) => {
                let (f, buf) = (f.clone(), buf.to_vec());
                tokio::task::spawn_blocking(move || io::Write::write_all(&mut &*f, &buf))
                    .await
                    .map_err(io::Error::other)?
            }
        }
    }
}

/// A connection to Xenstore. Cheap to clone: clones share the connection, and
/// any number of requests may be in flight at once.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Connects where libxenstore would (see [`Endpoint::from_env`]).
    pub async fn connect() -> Result<Client> {
        Client::connect_to(&Endpoint::from_env()?).await
    }

    /// Connects to an explicit endpoint.
    pub async fn connect_to(ep: &Endpoint) -> Result<Client> {
        match ep {
            Endpoint::Socket(p) => {
                let s = UnixStream::connect(p)
                    .await
                    .map_err(|source| Error::Connect {
                        path: p.clone(),
                        source,
                    })?;
                Ok(Client::from_stream(s))
            }
            Endpoint::Device(p) => {
                let err = |source| Error::Connect {
                    path: p.clone(),
                    source,
                };
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(p)
                    .map_err(err)?;
                let mut rf = f.try_clone().map_err(err)?;
                let (tx, rx) = mpsc::unbounded_channel();
                std::thread::Builder::new()
                    .name("xenbus-reader".into())
                    .spawn(move || {
                        let mut chunk = vec![0u8; 2 * PAYLOAD_MAX];
                        loop {
                            let r = io::Read::read(&mut rf, &mut chunk);
                            let stop = !matches!(r, Ok(n) if n > 0);
                            if tx.send(r.map(|n| chunk[..n].to_vec())).is_err() || stop {
                                return;
                            }
                        }
                    })
                    .map_err(err)?;
                Ok(Client::start(
                    Reader::Device(rx, Vec::new()),
                    Writer::Device(Arc::new(f)),
                ))
            }
        }
    }

    /// A client over an already connected socket (e.g. [`crate::Server::connect_as`]).
    pub fn from_stream(stream: UnixStream) -> Client {
        let (rd, wr) = stream.into_split();
        Client::start(Reader::Socket(rd), Writer::Socket(wr))
    }

    fn start(mut reader: Reader, mut writer: Writer) -> Client {
        let (out, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let inner = Arc::new(Inner {
            out,
            routes: Mutex::new(Routes::default()),
            next_req: AtomicU32::new(1),
            next_token: AtomicU64::new(1),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Some(buf) = out_rx.recv().await {
                if let Err(e) = writer.write_all(&buf).await {
                    if let Some(inner) = weak.upgrade() {
                        inner.die(format!("write failed: {e}"));
                    }
                    return;
                }
            }
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(2 * PAYLOAD_MAX);
            let mut chunk = vec![0u8; 64 * 1024];
            let why = loop {
                let n = match reader.read(&mut chunk).await {
                    Ok(0) => break "xenstored closed the connection".to_owned(),
                    Ok(n) => n,
                    Err(e) => break format!("read failed: {e}"),
                };
                buf.extend_from_slice(&chunk[..n]);
                let Some(inner) = weak.upgrade() else { return };
                let mut start = 0;
                let bad = loop {
                    match Message::decode(&buf[start..]) {
                        Ok(Some((msg, used))) => {
                            start += used;
                            inner.route(msg);
                        }
                        Ok(None) => break None,
                        Err(e) => break Some(e.to_string()),
                    }
                };
                buf.drain(..start);
                if let Some(e) = bad {
                    break e;
                }
            };
            if let Some(inner) = weak.upgrade() {
                inner.die(why);
            }
        });
        Client { inner }
    }

    /// Sends one request and waits for its reply; an `XS_ERROR` reply becomes
    /// [`Error::Xenstore`].
    pub async fn request(&self, op: Op, tx_id: u32, payload: Vec<u8>) -> Result<Message> {
        if payload.len() > PAYLOAD_MAX {
            return Err(Error::TooLarge {
                op,
                len: payload.len(),
            });
        }
        let first_arg = payload
            .iter()
            .position(|&b| b == 0)
            .map(|i| String::from_utf8_lossy(&payload[..i]).into_owned())
            .unwrap_or_default();
        let req_id = self.inner.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut r = self.inner.routes();
            if let Some(why) = &r.dead {
                return Err(Error::Disconnected(why.clone()));
            }
            r.pending.insert(req_id, tx);
        }
        let _ = self
            .inner
            .out
            .send(Message::new(op, req_id, tx_id, payload).encode());
        let reply = match rx.await {
            Ok(m) => m,
            Err(_) => {
                let why = self.inner.routes().dead.clone();
                return Err(Error::Disconnected(
                    why.unwrap_or_else(|| "connection closed".into()),
                ));
            }
        };
        match reply.error_code() {
            Some(Ok(code)) => Err(Error::Xenstore {
                code,
                op,
                path: first_arg,
            }),
            Some(Err(name)) => Err(Error::UnknownError { name, op }),
            None if reply.ty != op as u32 => Err(Error::Protocol {
                op,
                detail: format!("reply of type {}", reply.ty),
            }),
            None => Ok(reply),
        }
    }

    /// Registers a watch on `path` (or `@introduceDomain` / `@releaseDomain`).
    /// It fires once at once, as xenstored guarantees, then on every change at
    /// or below `path`. Dropping the [`Watch`] unregisters it.
    pub async fn watch(&self, path: &str) -> Result<Watch> {
        let n = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        let token = format!("xs-rs-{n}");
        let q = Arc::new(WatchQueue::new(path, &token));
        self.inner.routes().watches.insert(token.clone(), q.clone());
        let args = payload_of(Op::Watch, &[path, &token])?;
        if let Err(e) = self.request(Op::Watch, 0, args).await {
            self.inner.routes().watches.remove(&token);
            return Err(e);
        }
        Ok(Watch {
            q,
            token,
            path: path.to_owned(),
            client: self.clone(),
        })
    }

    /// Runs `f` in a transaction and commits it; when the commit (or a request
    /// inside) answers EAGAIN, runs it again, at most [`MAX_TRANSACTION_ATTEMPTS`]
    /// times. An error from `f` aborts the transaction and is returned.
    pub async fn transaction<T, F, Fut>(&self, mut f: F) -> Result<T>
    where
        F: FnMut(Transaction) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        for attempt in 1..=MAX_TRANSACTION_ATTEMPTS {
            let reply = self
                .request(Op::TransactionStart, 0, b"\0".to_vec())
                .await?;
            let id = wire::one_arg(&reply.payload)
                .and_then(|s| s.parse::<u32>().ok())
                .filter(|&id| id != 0)
                .ok_or_else(|| Error::Protocol {
                    op: Op::TransactionStart,
                    detail: "no transaction id".into(),
                })?;
            let tx = Transaction {
                client: self.clone(),
                id,
            };
            let outcome = f(tx).await;
            let value = match outcome {
                Ok(v) => v,
                Err(e) => {
                    let _ = self.request(Op::TransactionEnd, id, b"F\0".to_vec()).await;
                    if e.code() == Some(ErrorCode::EAGAIN) {
                        backoff(attempt).await;
                        continue;
                    }
                    return Err(e);
                }
            };
            match self.request(Op::TransactionEnd, id, b"T\0".to_vec()).await {
                Ok(_) => return Ok(value),
                Err(e) if e.code() == Some(ErrorCode::EAGAIN) => {
                    tracing::debug!(attempt, "Xenstore transaction conflicted; retrying");
                    backoff(attempt).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::TooManyRetries(MAX_TRANSACTION_ATTEMPTS))
    }

    /// INTRODUCE: tells xenstored about a domain and its store ring.
    pub async fn introduce(&self, domid: DomId, mfn: u64, port: u32) -> Result<()> {
        let (d, m, p) = (domid.to_string(), mfn.to_string(), port.to_string());
        let args = payload_of(Op::Introduce, &[&d, &m, &p])?;
        self.request(Op::Introduce, 0, args).await.map(drop)
    }

    /// RELEASE: tells xenstored a domain is gone.
    pub async fn release(&self, domid: DomId) -> Result<()> {
        self.domid_op(Op::Release, domid).await.map(drop)
    }

    /// RESUME.
    pub async fn resume(&self, domid: DomId) -> Result<()> {
        self.domid_op(Op::Resume, domid).await.map(drop)
    }

    /// IS_DOMAIN_INTRODUCED.
    pub async fn is_domain_introduced(&self, domid: DomId) -> Result<bool> {
        let m = self.domid_op(Op::IsDomainIntroduced, domid).await?;
        match wire::one_arg(&m.payload) {
            Some("T") => Ok(true),
            Some("F") => Ok(false),
            _ => Err(Error::Protocol {
                op: Op::IsDomainIntroduced,
                detail: "neither T nor F".into(),
            }),
        }
    }

    /// GET_DOMAIN_PATH: `/local/domain/<domid>`.
    pub async fn get_domain_path(&self, domid: DomId) -> Result<String> {
        let m = self.domid_op(Op::GetDomainPath, domid).await?;
        text_reply(Op::GetDomainPath, &m.payload)
    }

    /// SET_TARGET: `domid` may act for `target`.
    pub async fn set_target(&self, domid: DomId, target: DomId) -> Result<()> {
        let (d, t) = (domid.to_string(), target.to_string());
        let args = payload_of(Op::SetTarget, &[&d, &t])?;
        self.request(Op::SetTarget, 0, args).await.map(drop)
    }

    /// RESET_WATCHES: drops every watch and transaction of this connection on
    /// the server (our own watch streams then see no more events).
    pub async fn reset_watches(&self) -> Result<()> {
        self.request(Op::ResetWatches, 0, b"\0".to_vec())
            .await
            .map(drop)
    }

    /// CONTROL with arguments; returns the raw reply.
    pub async fn control(&self, args: &[&str]) -> Result<Vec<u8>> {
        let p = payload_of(Op::Control, args)?;
        Ok(self.request(Op::Control, 0, p).await?.payload)
    }

    async fn domid_op(&self, op: Op, domid: DomId) -> Result<Message> {
        let d = domid.to_string();
        self.request(op, 0, payload_of(op, &[&d])?).await
    }
}

async fn backoff(attempt: u32) {
    let ms = u64::from(attempt.min(10)) * 2;
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

fn payload_of(op: Op, strings: &[&str]) -> Result<Vec<u8>> {
    if let Some(bad) = strings.iter().find(|s| s.contains('\0')) {
        return Err(Error::InvalidArgument {
            op,
            detail: format!("{bad:?} contains a nul byte"),
        });
    }
    let refs: Vec<&[u8]> = strings.iter().map(|s| s.as_bytes()).collect();
    Ok(wire::payload(&refs, b""))
}

fn text_reply(op: Op, payload: &[u8]) -> Result<String> {
    let body = payload.strip_suffix(b"\0").unwrap_or(payload);
    String::from_utf8(body.to_vec()).map_err(|_| Error::Protocol {
        op,
        detail: "reply is not UTF-8".into(),
    })
}

/// Distinct paths one watch queues before its queue collapses into a single
/// event for the watched path (see the module docs).
pub const WATCH_QUEUE_MAX: usize = 64;

/// One watch's pending events: bounded and coalescing.
#[derive(Debug)]
struct WatchQueue {
    state: Mutex<QueueState>,
    ready: tokio::sync::Notify,
    /// The event that stands for "anything may have changed".
    everything: WatchEvent,
}

#[derive(Debug, Default)]
struct QueueState {
    events: std::collections::VecDeque<WatchEvent>,
    /// The queue is the single `everything` event: later events are folded
    /// into it until it is taken.
    collapsed: bool,
    closed: bool,
    /// Events folded or absorbed instead of queued.
    coalesced: u64,
}

impl WatchQueue {
    fn new(path: &str, token: &str) -> Self {
        WatchQueue {
            state: Mutex::default(),
            ready: tokio::sync::Notify::new(),
            everything: WatchEvent {
                path: path.to_owned(),
                token: token.to_owned(),
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, ev: WatchEvent) {
        {
            let mut s = self.lock();
            if s.closed {
                return;
            }
            if s.collapsed || s.events.iter().any(|e| e.path == ev.path) {
                s.coalesced += 1;
                return;
            }
            if s.events.len() >= WATCH_QUEUE_MAX {
                s.coalesced += s.events.len() as u64;
                s.events.clear();
                s.events.push_back(self.everything.clone());
                s.collapsed = true;
            } else {
                s.events.push_back(ev);
            }
        }
        self.ready.notify_one();
    }

    fn pop(&self) -> Option<WatchEvent> {
        let mut s = self.lock();
        let ev = s.events.pop_front();
        if s.events.is_empty() {
            s.collapsed = false;
        }
        ev
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }
}

/// A registered watch: a stream of [`WatchEvent`]s, bounded and coalesced as
/// the module docs say. Dropping it unregisters the watch (in the background,
/// if a runtime is running).
#[derive(Debug)]
pub struct Watch {
    q: Arc<WatchQueue>,
    token: String,
    path: String,
    client: Client,
}

impl Watch {
    /// The next event; `None` once the connection is gone (and every queued
    /// event was taken).
    pub async fn next(&mut self) -> Option<WatchEvent> {
        loop {
            if let Some(ev) = self.q.pop() {
                return Some(ev);
            }
            if self.q.lock().closed {
                return None;
            }
            // A single consumer: `notify_one` keeps a permit for a push that
            // came between the check above and this wait.
            self.q.ready.notified().await;
        }
    }

    /// An event if one is queued now.
    pub fn try_next(&mut self) -> Option<WatchEvent> {
        self.q.pop()
    }

    /// Takes every queued event at once: for consumers that only need to
    /// know that something changed. `None` once the connection is gone.
    pub async fn changed(&mut self) -> Option<()> {
        self.next().await?;
        while self.q.pop().is_some() {}
        Some(())
    }

    /// Events folded into others or absorbed by a collapsed queue so far.
    pub fn coalesced(&self) -> u64 {
        self.q.lock().coalesced
    }

    /// Events queued now (at most [`WATCH_QUEUE_MAX`]).
    pub fn queued(&self) -> usize {
        self.q.lock().events.len()
    }

    /// The watched path, as given.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The token the server echoes in events.
    pub fn token(&self) -> &str {
        &self.token
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let inner = &self.client.inner;
        let live = {
            let mut r = inner.routes();
            if let Some(q) = r.watches.remove(&self.token) {
                q.close();
            }
            r.dead.is_none()
        };
        if !live {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            let (path, token) = (self.path.clone(), self.token.clone());
            rt.spawn(async move {
                if let Ok(p) = payload_of(Op::Unwatch, &[&path, &token]) {
                    let _ = client.request(Op::Unwatch, 0, p).await;
                }
            });
        }
    }
}

/// A transaction in progress (see [`Client::transaction`]).
#[derive(Clone, Debug)]
pub struct Transaction {
    client: Client,
    id: u32,
}

impl Transaction {
    /// The transaction id the server gave.
    pub fn id(&self) -> u32 {
        self.id
    }
}

/// The database operations, on the live store ([`Client`]) or inside a
/// [`Transaction`].
#[allow(async_fn_in_trait)]
pub trait Xs {
    /// The connection and transaction id (0 for none) requests go to.
    fn target(&self) -> (&Client, u32);

    /// READ: the value at `path`.
    async fn read(&self, path: &str) -> Result<Vec<u8>> {
        let (c, tx) = self.target();
        Ok(c.request(Op::Read, tx, payload_of(Op::Read, &[path])?)
            .await?
            .payload)
    }

    /// READ, as text.
    async fn read_string(&self, path: &str) -> Result<String> {
        String::from_utf8(self.read(path).await?).map_err(|_| Error::NotUtf8 {
            path: path.to_owned(),
        })
    }

    /// READ, with ENOENT as `None`.
    async fn try_read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        match self.read(path).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// READ as text (invalid UTF-8 replaced, as a value is only ever shown
    /// or parsed), with ENOENT as `None`.
    async fn try_read_text(&self, path: &str) -> Result<Option<String>> {
        Ok(self
            .try_read(path)
            .await?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Whether `path` exists (as `xenstore-exists`: a readable node).
    async fn exists(&self, path: &str) -> Result<bool> {
        Ok(self.try_read(path).await?.is_some())
    }

    /// WRITE: sets the value (any bytes), creating the node and its parents.
    async fn write(&self, path: &str, value: impl AsRef<[u8]>) -> Result<()> {
        let (c, tx) = self.target();
        if path.contains('\0') {
            return Err(Error::InvalidArgument {
                op: Op::Write,
                detail: "path contains a nul byte".into(),
            });
        }
        let p = wire::payload(&[path.as_bytes()], value.as_ref());
        c.request(Op::Write, tx, p).await.map(drop)
    }

    /// MKDIR.
    async fn mkdir(&self, path: &str) -> Result<()> {
        let (c, tx) = self.target();
        c.request(Op::Mkdir, tx, payload_of(Op::Mkdir, &[path])?)
            .await
            .map(drop)
    }

    /// RM: the node and everything below it.
    async fn rm(&self, path: &str) -> Result<()> {
        let (c, tx) = self.target();
        c.request(Op::Rm, tx, payload_of(Op::Rm, &[path])?)
            .await
            .map(drop)
    }

    /// DIRECTORY, falling back to DIRECTORY_PART when the list is too long for one
    /// reply (E2BIG); the parts are re-read if the node changes in between.
    async fn directory(&self, path: &str) -> Result<Vec<String>> {
        let (c, tx) = self.target();
        match c
            .request(Op::Directory, tx, payload_of(Op::Directory, &[path])?)
            .await
        {
            Ok(m) => return names(Op::Directory, &m.payload),
            Err(e) if e.code() == Some(ErrorCode::E2BIG) => {}
            Err(e) => return Err(e),
        }
        'again: for _ in 0..MAX_TRANSACTION_ATTEMPTS {
            let mut all = Vec::new();
            let mut offset = 0usize;
            let mut gen: Option<Vec<u8>> = None;
            loop {
                let off = offset.to_string();
                let m = c
                    .request(
                        Op::DirectoryPart,
                        tx,
                        payload_of(Op::DirectoryPart, &[path, &off])?,
                    )
                    .await?;
                let (strings, _) = wire::split_strings(&m.payload);
                let Some((g, rest)) = strings.split_first() else {
                    return Err(Error::Protocol {
                        op: Op::DirectoryPart,
                        detail: "no generation".into(),
                    });
                };
                if gen.as_deref().is_some_and(|prev| prev != *g) {
                    continue 'again;
                }
                gen = Some(g.to_vec());
                let mut done = false;
                for s in rest {
                    if s.is_empty() {
                        done = true;
                        break;
                    }
                    offset += s.len() + 1;
                    all.push(String::from_utf8_lossy(s).into_owned());
                }
                if done {
                    return Ok(all);
                }
                if rest.is_empty() {
                    return Err(Error::Protocol {
                        op: Op::DirectoryPart,
                        detail: "a part with no names and no end".into(),
                    });
                }
            }
        }
        Err(Error::TooManyRetries(MAX_TRANSACTION_ATTEMPTS))
    }

    /// GET_PERMS.
    async fn get_perms(&self, path: &str) -> Result<Vec<Perm>> {
        let (c, tx) = self.target();
        let m = c
            .request(Op::GetPerms, tx, payload_of(Op::GetPerms, &[path])?)
            .await?;
        let list = names(Op::GetPerms, &m.payload)?;
        wire::parse_perms(list.iter().map(String::as_str)).ok_or_else(|| Error::Protocol {
            op: Op::GetPerms,
            detail: format!("bad permission list {list:?}"),
        })
    }

    /// SET_PERMS: the first entry names the owner and everyone's default.
    async fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<()> {
        let (c, tx) = self.target();
        let strs: Vec<String> = perms.iter().map(Perm::to_string).collect();
        let mut args = vec![path];
        args.extend(strs.iter().map(String::as_str));
        c.request(Op::SetPerms, tx, payload_of(Op::SetPerms, &args)?)
            .await
            .map(drop)
    }
}

fn names(op: Op, payload: &[u8]) -> Result<Vec<String>> {
    let (strings, rest) = wire::split_strings(payload);
    if !rest.is_empty() {
        return Err(Error::Protocol {
            op,
            detail: "list not nul-terminated".into(),
        });
    }
    Ok(strings
        .into_iter()
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

impl Xs for Client {
    fn target(&self) -> (&Client, u32) {
        (self, 0)
    }
}

impl Xs for Transaction {
    fn target(&self) -> (&Client, u32) {
        (&self.client, self.id)
    }
}
