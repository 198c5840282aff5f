//! Connections, domains and request dispatch of the embedded server.
//!
//! Everything here runs under one lock and never waits: a request is answered and
//! its watch events are queued to every interested connection before the next
//! request is looked at, which is how xenstored orders things too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, Notify};

use super::store::{Fire, Quotas, Store, Transaction, Who};
use crate::wire::{
    self, n_args, one_arg, split_strings, DomId, ErrorCode, Message, Op, Perm, PAYLOAD_MAX,
};

pub(crate) type ConnId = u64;

/// The first domid Xen reserves (`DOMID_FIRST_RESERVED`).
const DOMID_FIRST_RESERVED: u16 = 0x7ff0;

/// The CONTROL command by which a privileged connection of the simulation turns
/// into domain N's connection (a real guest's connection is its domain's by
/// construction). The domain must have been introduced.
pub const SIM_AS_DOMAIN: &str = "sim-as-domain";

/// Where a connection's replies and events go: the writer task drains it.
#[derive(Debug)]
pub(crate) struct Outbox {
    pub(crate) tx: mpsc::UnboundedSender<Vec<u8>>,
    pub(crate) queued: Arc<AtomicUsize>,
    pub(crate) kill: Arc<Notify>,
}

#[derive(Debug)]
struct WatchReg {
    /// Canonical path (absolute, or `@special`).
    path: String,
    token: String,
    /// Registered with a relative path: events are reported relative too.
    relative: bool,
}

#[derive(Debug)]
struct Conn {
    domid: DomId,
    outbox: Outbox,
    watches: Vec<WatchReg>,
    txs: HashMap<u32, Transaction>,
}

#[derive(Debug, Default)]
struct Domain {
    target: Option<DomId>,
}

/// The whole server state: the store, the connections and the known domains.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) store: Store,
    conns: HashMap<ConnId, Conn>,
    domains: HashMap<DomId, Domain>,
    special: HashMap<String, Vec<Perm>>,
    next_conn: ConnId,
    next_tx: u32,
    pub(crate) commits: u64,
}

type Reply = Result<Vec<u8>, ErrorCode>;

fn ok() -> Reply {
    Ok(b"OK\0".to_vec())
}

fn text(s: &str) -> Vec<u8> {
    wire::payload(&[s.as_bytes()], b"")
}

impl State {
    pub(crate) fn new(quotas: Quotas) -> State {
        let mut domains = HashMap::new();
        domains.insert(DomId::DOM0, Domain::default());
        let dom0_only = vec![Perm::new(wire::Access::None, 0)];
        State {
            store: Store::new(quotas),
            conns: HashMap::new(),
            domains,
            special: [wire::INTRODUCE_DOMAIN, wire::RELEASE_DOMAIN]
                .into_iter()
                .map(|s| (s.to_owned(), dom0_only.clone()))
                .collect(),
            next_conn: 1,
            next_tx: 1,
            commits: 0,
        }
    }

    pub(crate) fn add_conn(&mut self, domid: DomId, outbox: Outbox) -> ConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            id,
            Conn {
                domid,
                outbox,
                watches: Vec::new(),
                txs: HashMap::new(),
            },
        );
        id
    }

    /// Drops a connection with its watches and open transactions.
    pub(crate) fn remove_conn(&mut self, id: ConnId) {
        if let Some(c) = self.conns.remove(&id) {
            c.outbox.kill.notify_one();
        }
    }

    pub(crate) fn is_alive(&self, id: ConnId) -> bool {
        self.conns.contains_key(&id)
    }

    pub(crate) fn connections(&self) -> usize {
        self.conns.len()
    }

    fn who(&self, domid: DomId) -> Who {
        Who {
            domid,
            privileged: domid == DomId::DOM0,
            target: self.domains.get(&domid).and_then(|d| d.target),
        }
    }

    /// Queues bytes for a connection; one that lets too much pile up is dropped.
    fn send(&mut self, id: ConnId, bytes: Vec<u8>) {
        let limit = self.store.quotas.outstanding_bytes;
        let Some(c) = self.conns.get(&id) else { return };
        let len = bytes.len();
        let queued = c.outbox.queued.fetch_add(len, Ordering::Relaxed) + len;
        if queued > limit || c.outbox.tx.send(bytes).is_err() {
            tracing::warn!(
                conn = id,
                domid = %c.domid,
                queued,
                "dropping a Xenstore connection that does not read its replies and events"
            );
            self.remove_conn(id);
        }
    }

    /// Sends watch events for a batch of changes to every connection entitled to them.
    fn fire(&mut self, fires: &[Fire]) {
        if fires.is_empty() {
            return;
        }
        let mut out: Vec<(ConnId, Vec<u8>)> = Vec::new();
        for (&id, c) in &self.conns {
            if c.watches.is_empty() {
                continue;
            }
            let who = self.who(c.domid);
            for w in &c.watches {
                for f in fires {
                    let hit = if f.exact {
                        f.path == w.path
                    } else {
                        wire::is_child(&f.path, &w.path)
                    };
                    if hit && f.visible_to(&who) {
                        out.push((id, event(&f.path, w, c.domid)));
                    }
                }
            }
        }
        for (id, bytes) in out {
            self.send(id, bytes);
        }
    }

    fn fire_special(&mut self, name: &str) {
        let perms = self.special.get(name).cloned().unwrap_or_default();
        self.fire(&[Fire {
            path: name.to_owned(),
            exact: false,
            perms,
            new_perms: None,
        }]);
    }

    /// Handles one request from connection `id` and queues the reply.
    pub(crate) fn handle(&mut self, id: ConnId, msg: Message) {
        let Some(conn) = self.conns.get(&id) else {
            return;
        };
        let who = self.who(conn.domid);
        let mut fires = Vec::new();
        let mut initial_event = None;
        let result = match msg.op() {
            None | Some(Op::WatchEvent) | Some(Op::Error) => Err(ErrorCode::ENOSYS),
            Some(op) => self.dispatch(id, who, op, &msg, &mut fires, &mut initial_event),
        };
        self.fire(&fires);
        let reply = match result {
            Ok(p) if p.len() > PAYLOAD_MAX => Err(ErrorCode::E2BIG),
            other => other,
        };
        let reply = match reply {
            Ok(payload) => Message {
                ty: msg.ty,
                req_id: msg.req_id,
                tx_id: msg.tx_id,
                payload,
            },
            Err(code) => {
                tracing::trace!(conn = id, ty = msg.ty, %code, "Xenstore request refused");
                Message {
                    ty: Op::Error as u32,
                    req_id: msg.req_id,
                    tx_id: msg.tx_id,
                    payload: text(code.name()),
                }
            }
        };
        self.send(id, reply.encode());
        if let Some(ev) = initial_event {
            self.send(id, ev);
        }
    }

    /// Canonical, validated node path of a request argument.
    fn node_path(&self, who: &Who, raw: &str, allow_special: bool) -> Result<String, ErrorCode> {
        let path = wire::canonicalize(raw, who.domid);
        let rel_max = (!who.privileged).then_some(self.store.quotas.path_length);
        if wire::validate_path(&path, allow_special, rel_max) {
            Ok(path)
        } else {
            Err(ErrorCode::EINVAL)
        }
    }

    fn dispatch(
        &mut self,
        id: ConnId,
        who: Who,
        op: Op,
        msg: &Message,
        fires: &mut Vec<Fire>,
        initial_event: &mut Option<Vec<u8>>,
    ) -> Reply {
        use Op::*;
        let privileged_only = matches!(
            op,
            Control | Introduce | Release | IsDomainIntroduced | Resume | SetTarget
        );
        if privileged_only && !who.privileged {
            return Err(ErrorCode::EACCES);
        }
        // Every request but WATCH and UNWATCH names a transaction, or 0.
        if !matches!(op, Watch | Unwatch) && msg.tx_id != 0 {
            let conn = self.conns.get(&id).expect("caller checked");
            if !conn.txs.contains_key(&msg.tx_id) {
                return Err(ErrorCode::ENOENT);
            }
        }
        let p = &msg.payload;
        match op {
            Read | Directory | GetPerms | DirectoryPart => self.read_op(id, who, op, msg),
            Write => {
                let (strings, _) = split_strings(p);
                let raw = strings.first().ok_or(ErrorCode::EINVAL)?;
                let raw = std::str::from_utf8(raw).map_err(|_| ErrorCode::EINVAL)?;
                let path = self.node_path(&who, raw, false)?;
                let value = &p[raw.len() + 1..];
                fires.extend(self.view_op(id, msg.tx_id, |v| v.write(&who, &path, value))?);
                ok()
            }
            Mkdir => {
                let path = self.node_path(&who, one_arg(p).ok_or(ErrorCode::EINVAL)?, false)?;
                fires.extend(self.view_op(id, msg.tx_id, |v| v.mkdir(&who, &path))?);
                ok()
            }
            Rm => {
                let path = self.node_path(&who, one_arg(p).ok_or(ErrorCode::EINVAL)?, false)?;
                fires.extend(self.view_op(id, msg.tx_id, |v| v.rm(&who, &path))?);
                ok()
            }
            SetPerms => {
                let (strings, rest) = split_strings(p);
                if strings.len() < 2 || !rest.is_empty() {
                    return Err(ErrorCode::EINVAL);
                }
                let raw = std::str::from_utf8(strings[0]).map_err(|_| ErrorCode::EINVAL)?;
                let perms = wire::parse_perms(
                    strings[1..]
                        .iter()
                        .map(|s| std::str::from_utf8(s).unwrap_or("")),
                )
                .ok_or(ErrorCode::EINVAL)?;
                let path = self.node_path(&who, raw, true)?;
                if wire::is_special(&path) {
                    return self.set_special_perms(&who, &path, perms);
                }
                fires.extend(self.view_op(id, msg.tx_id, |v| v.set_perms(&who, &path, perms))?);
                ok()
            }
            Watch => self.watch(id, who, p, initial_event),
            Unwatch => {
                let args = n_args(p, 2).ok_or(ErrorCode::EINVAL)?;
                let path = self.node_path(&who, args[0], true)?;
                let conn = self.conns.get_mut(&id).expect("caller checked");
                let before = conn.watches.len();
                conn.watches
                    .retain(|w| !(w.path == path && w.token == args[1]));
                if conn.watches.len() == before {
                    return Err(ErrorCode::ENOENT);
                }
                ok()
            }
            TransactionStart => {
                if msg.tx_id != 0 {
                    return Err(ErrorCode::EBUSY);
                }
                let limit = self.store.quotas.transactions_per_connection;
                let tx = self.store.begin();
                let conn = self.conns.get_mut(&id).expect("caller checked");
                if !who.privileged && conn.txs.len() >= limit {
                    return Err(ErrorCode::ENOSPC);
                }
                let mut tid = self.next_tx;
                while tid == 0 || conn.txs.contains_key(&tid) {
                    tid = tid.wrapping_add(1);
                }
                self.next_tx = tid.wrapping_add(1);
                conn.txs.insert(tid, tx);
                Ok(text(&tid.to_string()))
            }
            TransactionEnd => {
                let commit = match one_arg(p) {
                    Some("T") => true,
                    Some("F") => false,
                    _ => return Err(ErrorCode::EINVAL),
                };
                let conn = self.conns.get_mut(&id).expect("caller checked");
                let tx = conn.txs.remove(&msg.tx_id).ok_or(ErrorCode::ENOENT)?;
                if commit {
                    fires.extend(self.store.commit(&who, tx)?);
                    self.commits += 1;
                }
                ok()
            }
            Introduce => {
                let (strings, _) = split_strings(p);
                if strings.len() < 3 {
                    return Err(ErrorCode::EINVAL);
                }
                let domid = guest_domid(strings[0])?;
                self.introduce(domid);
                ok()
            }
            Release => {
                let domid = guest_domid(one_arg(p).ok_or(ErrorCode::EINVAL)?.as_bytes())?;
                self.release(domid)?;
                ok()
            }
            IsDomainIntroduced => {
                let domid =
                    DomId::parse(one_arg(p).ok_or(ErrorCode::EINVAL)?).ok_or(ErrorCode::EINVAL)?;
                Ok(text(if self.domains.contains_key(&domid) {
                    "T"
                } else {
                    "F"
                }))
            }
            GetDomainPath => {
                let domid =
                    DomId::parse(one_arg(p).ok_or(ErrorCode::EINVAL)?).ok_or(ErrorCode::EINVAL)?;
                Ok(text(&wire::domain_path(domid)))
            }
            Resume => {
                let domid = guest_domid(one_arg(p).ok_or(ErrorCode::EINVAL)?.as_bytes())?;
                if self.domains.contains_key(&domid) {
                    ok()
                } else {
                    Err(ErrorCode::ENOENT)
                }
            }
            SetTarget => {
                let args = n_args(p, 2).ok_or(ErrorCode::EINVAL)?;
                let domid = guest_domid(args[0].as_bytes())?;
                let target = guest_domid(args[1].as_bytes())?;
                if !self.domains.contains_key(&target) {
                    return Err(ErrorCode::ENOENT);
                }
                self.domains
                    .get_mut(&domid)
                    .ok_or(ErrorCode::ENOENT)?
                    .target = Some(target);
                ok()
            }
            ResetWatches => {
                let conn = self.conns.get_mut(&id).expect("caller checked");
                conn.watches.clear();
                conn.txs.clear();
                ok()
            }
            Control => self.control(id, p),
            WatchEvent | Error => Err(ErrorCode::ENOSYS),
        }
    }

    /// Runs a tree operation on the live tree or inside the named transaction.
    fn view_op<T>(
        &mut self,
        id: ConnId,
        tx_id: u32,
        f: impl FnOnce(&mut super::store::View<'_>) -> Result<T, ErrorCode>,
    ) -> Result<T, ErrorCode> {
        let conn = self.conns.get_mut(&id).expect("caller checked");
        let tx = if tx_id == 0 {
            None
        } else {
            Some(conn.txs.get_mut(&tx_id).ok_or(ErrorCode::ENOENT)?)
        };
        let mut view = self.store.view(tx);
        f(&mut view)
    }

    fn read_op(&mut self, id: ConnId, who: Who, op: Op, msg: &Message) -> Reply {
        let p = &msg.payload;
        if op == Op::DirectoryPart {
            let args = n_args(p, 2).ok_or(ErrorCode::EINVAL)?;
            let path = self.node_path(&who, args[0], false)?;
            let offset: usize = args[1].parse().map_err(|_| ErrorCode::EINVAL)?;
            let names = self.view_op(id, msg.tx_id, |v| v.directory(&who, &path))?;
            let conn = self.conns.get(&id).expect("caller checked");
            let gen = self
                .store
                .generation_of(conn.txs.get(&msg.tx_id), &path)
                .unwrap_or(0);
            return Ok(directory_part(gen, &names, offset));
        }
        let raw = one_arg(p).ok_or(ErrorCode::EINVAL)?;
        let path = self.node_path(&who, raw, op == Op::GetPerms)?;
        match op {
            Op::Read => self.view_op(id, msg.tx_id, |v| v.read(&who, &path)),
            Op::Directory => {
                let names = self.view_op(id, msg.tx_id, |v| v.directory(&who, &path))?;
                let refs: Vec<&[u8]> = names.iter().map(|n| n.as_bytes()).collect();
                Ok(wire::payload(&refs, b""))
            }
            _ if wire::is_special(&path) => {
                let perms = self.special.get(&path).ok_or(ErrorCode::ENOENT)?;
                if !who.access(perms).0.can_read() {
                    return Err(ErrorCode::EACCES);
                }
                Ok(perm_list(perms))
            }
            _ => {
                let perms = self.view_op(id, msg.tx_id, |v| v.get_perms(&who, &path))?;
                Ok(perm_list(&perms))
            }
        }
    }

    fn set_special_perms(&mut self, who: &Who, path: &str, perms: Vec<Perm>) -> Reply {
        let cur = self.special.get(path).ok_or(ErrorCode::ENOENT)?;
        let (access, owner) = who.access(cur);
        if !owner || !access.can_write() {
            return Err(ErrorCode::EACCES);
        }
        self.special.insert(path.to_owned(), perms);
        ok()
    }

    fn watch(&mut self, id: ConnId, who: Who, p: &[u8], initial: &mut Option<Vec<u8>>) -> Reply {
        let (strings, _) = split_strings(p);
        if strings.len() < 2 {
            return Err(ErrorCode::EINVAL);
        }
        let raw = std::str::from_utf8(strings[0]).map_err(|_| ErrorCode::EINVAL)?;
        let token = std::str::from_utf8(strings[1]).map_err(|_| ErrorCode::EINVAL)?;
        let path = self.node_path(&who, raw, true)?;
        let relative = !raw.starts_with('/') && !wire::is_special(raw);
        let limit = self.store.quotas.watches_per_connection;
        let conn = self.conns.get_mut(&id).expect("caller checked");
        if conn
            .watches
            .iter()
            .any(|w| w.path == path && w.token == token)
        {
            return Err(ErrorCode::EEXIST);
        }
        if !who.privileged && conn.watches.len() >= limit {
            return Err(ErrorCode::E2BIG);
        }
        let reg = WatchReg {
            path: path.clone(),
            token: token.to_owned(),
            relative,
        };
        // Every watch fires once at once, with the path as registered.
        *initial = Some(event(&path, &reg, conn.domid));
        conn.watches.push(reg);
        ok()
    }

    /// Forgets a domain: its connections are closed, its nodes pass to dom0, and
    /// `@releaseDomain` fires.
    pub(crate) fn release(&mut self, domid: DomId) -> Result<(), ErrorCode> {
        if domid == DomId::DOM0 {
            return Err(ErrorCode::EINVAL);
        }
        if self.domains.remove(&domid).is_none() {
            return Err(ErrorCode::ENOENT);
        }
        let gone: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.domid == domid)
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.remove_conn(id);
        }
        for d in self.domains.values_mut() {
            if d.target == Some(domid) {
                d.target = None;
            }
        }
        self.store.forget_domain(domid);
        tracing::debug!(%domid, "domain released");
        self.fire_special(wire::RELEASE_DOMAIN);
        Ok(())
    }

    /// Introduces a domain (the in-process form of INTRODUCE).
    pub(crate) fn introduce(&mut self, domid: DomId) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.domains.entry(domid) {
            e.insert(Domain::default());
            tracing::debug!(%domid, "domain introduced");
            self.fire_special(wire::INTRODUCE_DOMAIN);
        }
    }

    fn control(&mut self, id: ConnId, p: &[u8]) -> Reply {
        let (strings, _) = split_strings(p);
        let args: Vec<&str> = strings
            .iter()
            .map(|s| std::str::from_utf8(s).map_err(|_| ErrorCode::EINVAL))
            .collect::<Result<_, _>>()?;
        match args.as_slice() {
            ["check", ..] => ok(),
            ["print", msg, ..] => {
                tracing::info!(target: "xenstored", "{msg}");
                ok()
            }
            ["help", ..] => Ok(text(&format!(
                "check\nprint <string>\nquota\nhelp\n{SIM_AS_DOMAIN} <domid>\n"
            ))),
            ["quota", ..] => {
                let q = &self.store.quotas;
                Ok(text(&format!(
                    "nodes {}\nnode-size {}\nwatches {}\ntransactions {}\nnode-permissions {}\npath-length {}\noutstanding {}\n",
                    q.nodes_per_domain,
                    q.value_size,
                    q.watches_per_connection,
                    q.transactions_per_connection,
                    q.perms_per_node,
                    q.path_length,
                    q.outstanding_bytes
                )))
            }
            [SIM_AS_DOMAIN, d] => {
                let domid = guest_domid(d.as_bytes())?;
                if !self.domains.contains_key(&domid) {
                    return Err(ErrorCode::ENOENT);
                }
                let conn = self.conns.get_mut(&id).expect("caller checked");
                conn.watches.clear();
                conn.txs.clear();
                conn.domid = domid;
                ok()
            }
            _ => Err(ErrorCode::EINVAL),
        }
    }
}

/// A guest domid argument: decimal, not 0, below the reserved range.
fn guest_domid(raw: &[u8]) -> Result<DomId, ErrorCode> {
    let s = std::str::from_utf8(raw).map_err(|_| ErrorCode::EINVAL)?;
    match DomId::parse(s) {
        Some(d) if d != DomId::DOM0 && d.0 < DOMID_FIRST_RESERVED => Ok(d),
        _ => Err(ErrorCode::EINVAL),
    }
}

fn perm_list(perms: &[Perm]) -> Vec<u8> {
    let strs: Vec<String> = perms.iter().map(Perm::to_string).collect();
    let refs: Vec<&[u8]> = strs.iter().map(|s| s.as_bytes()).collect();
    wire::payload(&refs, b"")
}

/// An encoded WATCH_EVENT for watch `w`, relative if it was registered relative.
fn event(path: &str, w: &WatchReg, domid: DomId) -> Vec<u8> {
    let home = wire::domain_path(domid);
    let shown = if w.relative {
        path.strip_prefix(&home)
            .and_then(|r| r.strip_prefix('/'))
            .unwrap_or(path)
    } else {
        path
    };
    Message::new(
        Op::WatchEvent,
        0,
        0,
        wire::payload(&[shown.as_bytes(), w.token.as_bytes()], b""),
    )
    .encode()
}

/// A DIRECTORY_PART reply: the generation, then as many names from byte `offset`
/// of the full list as fit, and an empty string once the list is complete.
fn directory_part(gen: u64, names: &[String], offset: usize) -> Vec<u8> {
    let gen = gen.to_string();
    let mut out = wire::payload(&[gen.as_bytes()], b"");
    let max = PAYLOAD_MAX - out.len() - 1;
    let mut pos = 0usize;
    let mut body = Vec::new();
    let mut complete = true;
    for n in names {
        let len = n.len() + 1;
        if pos >= offset {
            if body.len() + len > max {
                complete = false;
                break;
            }
            body.extend_from_slice(n.as_bytes());
            body.push(0);
        }
        pos += len;
    }
    out.extend_from_slice(&body);
    if complete {
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_part_splits_long_lists_and_marks_the_end() {
        let names: Vec<String> = (0..1000).map(|i| format!("child-{i:05}")).collect();
        let mut offset = 0;
        let mut got = Vec::new();
        loop {
            let reply = directory_part(7, &names, offset);
            assert!(reply.len() <= PAYLOAD_MAX);
            let (strings, rest) = split_strings(&reply);
            assert!(rest.is_empty());
            assert_eq!(strings[0], b"7");
            let mut done = false;
            for s in &strings[1..] {
                if s.is_empty() {
                    done = true;
                } else {
                    got.push(String::from_utf8(s.to_vec()).unwrap());
                    offset += s.len() + 1;
                }
            }
            if done {
                break;
            }
        }
        assert_eq!(got, names);
        assert_eq!(directory_part(7, &names, 1 << 20), b"7\0\0");
    }
}
