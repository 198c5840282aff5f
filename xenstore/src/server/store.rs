//! The node tree of the embedded server: values, permissions, quotas, transactions.
//!
//! No I/O and no connections here: the connection layer (`server::state`) turns
//! requests into calls on a [`View`], which is either the live tree or a
//! transaction's private copy, and routes the [`Fire`]s they return to watchers.
//!
//! The tree is persistent: nodes are shared through `Arc` and copied on write, so a
//! transaction's snapshot costs one pointer copy and never sees later changes.
//! A transaction remembers the generation of every node it looked at; its commit
//! answers EAGAIN if any of them changed meanwhile, and otherwise replays its
//! operations on the live tree. That is the isolation xenstored promises, with the
//! conflict rule it implements (only nodes the transaction touched count).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::wire::{self, Access, DomId, ErrorCode, Perm};

type Result<T> = std::result::Result<T, ErrorCode>;

/// Per-domain limits, as xenstored's `-E -S -W -t -A -M` options. They bind
/// unprivileged domains only, as in xenstored; dom0 is bound by the wire limits.
#[derive(Clone, Debug)]
pub struct Quotas {
    /// Nodes a domain may own (`quota_nb_entry_per_domain`, 1000). Over: ENOSPC.
    pub nodes_per_domain: usize,
    /// Largest value a domain may write (2048 bytes). Over: ENOSPC.
    pub value_size: usize,
    /// Watches per connection (128). Over: E2BIG.
    pub watches_per_connection: usize,
    /// Open transactions per connection (10). Over: ENOSPC.
    pub transactions_per_connection: usize,
    /// Entries in a permission list (5). Over: ENOSPC.
    pub perms_per_node: usize,
    /// Path length below the domain's home (`XENSTORE_REL_PATH_MAX`). Over: EINVAL.
    pub path_length: usize,
    /// Bytes of replies and watch events queued for one connection that is not
    /// reading them; past this the connection is dropped (xenstored "ignores" it).
    pub outstanding_bytes: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            nodes_per_domain: 1000,
            value_size: 2048,
            watches_per_connection: 128,
            transactions_per_connection: 10,
            perms_per_node: 5,
            path_length: wire::REL_PATH_MAX,
            outstanding_bytes: 16 << 20,
        }
    }
}

/// Who is asking: the connection's domain, as permission checks need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Who {
    /// The domain the connection speaks for.
    pub domid: DomId,
    /// Whether it is the privileged (control) domain.
    pub privileged: bool,
    /// The domain it acts for (`SET_TARGET`), such as a device model's guest.
    pub target: Option<DomId>,
}

impl Who {
    /// The control domain.
    pub const DOM0: Who = Who {
        domid: DomId::DOM0,
        privileged: true,
        target: None,
    };

    /// An unprivileged domain.
    pub fn domain(domid: DomId) -> Who {
        Who {
            domid,
            privileged: domid == DomId::DOM0,
            target: None,
        }
    }

    fn is(&self, d: DomId) -> bool {
        self.domid == d || self.target == Some(d)
    }

    /// What `perms` grant this connection (xenstored's `perm_for_conn`).
    /// Returns (access, is_owner).
    pub fn access(&self, perms: &[Perm]) -> (Access, bool) {
        let Some(owner) = perms.first() else {
            return (Access::None, false);
        };
        if self.privileged || self.is(owner.domid) {
            return (Access::Both, true);
        }
        for p in &perms[1..] {
            if self.is(p.domid) {
                return (p.access, false);
            }
        }
        (owner.access, false)
    }

    fn can_read(&self, perms: &[Perm]) -> bool {
        self.access(perms).0.can_read()
    }

    fn can_write(&self, perms: &[Perm]) -> bool {
        self.access(perms).0.can_write()
    }
}

#[derive(Clone, Debug)]
struct Node {
    value: Vec<u8>,
    perms: Vec<Perm>,
    children: BTreeMap<String, Arc<Node>>,
    generation: u64,
}

/// A change a watch may be told about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fire {
    /// The absolute path that changed.
    pub path: String,
    /// `true`: only a watch on exactly this path fires (a descendant removed with
    /// its parent); `false`: every watch on this path or an ancestor fires.
    pub exact: bool,
    /// The node's permissions at the time (before a removal or a permission change):
    /// only connections that may read the node are told.
    pub perms: Vec<Perm>,
    /// The new permissions after a SET_PERMS: readable under either is enough.
    pub new_perms: Option<Vec<Perm>>,
}

impl Fire {
    /// Whether `who` may be told about this change.
    pub fn visible_to(&self, who: &Who) -> bool {
        who.can_read(&self.perms) || self.new_perms.as_ref().is_some_and(|p| who.can_read(p))
    }
}

/// One operation of a transaction, replayed on the live tree at commit.
#[derive(Clone, Debug)]
enum TxOp {
    Write(String, Vec<u8>),
    Mkdir(String),
    Rm(String),
    SetPerms(String, Vec<Perm>),
}

/// An open transaction: a private copy of the tree and what it touched.
#[derive(Debug)]
pub struct Transaction {
    root: Arc<Node>,
    counts: HashMap<DomId, usize>,
    accessed: HashMap<String, Option<u64>>,
    ops: Vec<TxOp>,
}

/// The whole database.
#[derive(Debug)]
pub struct Store {
    root: Arc<Node>,
    counts: HashMap<DomId, usize>,
    generation: u64,
    /// The limits in force.
    pub quotas: Quotas,
}

fn components(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|c| !c.is_empty())
}

fn lookup<'a>(root: &'a Arc<Node>, path: &str) -> Option<&'a Node> {
    let mut node: &Node = root;
    for c in components(path) {
        node = node.children.get(c)?;
    }
    Some(node)
}

fn lookup_mut<'a>(root: &'a mut Arc<Node>, path: &str) -> Option<&'a mut Node> {
    let mut node = Arc::make_mut(root);
    for c in components(path) {
        node = Arc::make_mut(node.children.get_mut(c)?);
    }
    Some(node)
}

/// The deepest existing ancestor of a missing `path`, with its path.
fn nearest_ancestor<'a>(root: &'a Arc<Node>, path: &str) -> (&'a Node, String) {
    let mut node: &Node = root;
    let mut at = String::from("/");
    for c in components(path) {
        match node.children.get(c) {
            Some(child) => {
                node = child;
                if at.len() > 1 {
                    at.push('/');
                }
                at.push_str(c);
            }
            None => break,
        }
    }
    (node, at)
}

impl Default for Store {
    fn default() -> Self {
        Store::new(Quotas::default())
    }
}

impl Store {
    /// A store holding only `/` (owned by dom0, `n0`) and `/tool/xenstored`, as
    /// xenstored starts.
    pub fn new(quotas: Quotas) -> Store {
        let mut store = Store {
            root: Arc::new(Node {
                value: Vec::new(),
                perms: vec![Perm::new(Access::None, 0)],
                children: BTreeMap::new(),
                generation: 0,
            }),
            counts: HashMap::new(),
            generation: 0,
            quotas,
        };
        let mut v = store.view(None);
        v.mkdir(&Who::DOM0, "/tool/xenstored")
            .expect("a fresh store takes /tool/xenstored");
        store
    }

    /// A snapshot for a new transaction.
    pub fn begin(&self) -> Transaction {
        Transaction {
            root: Arc::clone(&self.root),
            counts: self.counts.clone(),
            accessed: HashMap::new(),
            ops: Vec::new(),
        }
    }

    /// Operations on the live tree (`tx = None`) or inside a transaction.
    pub fn view<'a>(&'a mut self, tx: Option<&'a mut Transaction>) -> View<'a> {
        match tx {
            None => View {
                root: &mut self.root,
                counts: &mut self.counts,
                generation: &mut self.generation,
                quotas: &self.quotas,
                tx: None,
            },
            Some(tx) => View {
                root: &mut tx.root,
                counts: &mut tx.counts,
                generation: &mut self.generation,
                quotas: &self.quotas,
                tx: Some((&mut tx.accessed, &mut tx.ops)),
            },
        }
    }

    /// Commits a transaction: EAGAIN if any node it read or wrote changed since
    /// it looked, otherwise its operations take effect at once and their watch
    /// events are returned. Nothing changes on error.
    pub fn commit(&mut self, who: &Who, tx: Transaction) -> Result<Vec<Fire>> {
        for (path, seen) in &tx.accessed {
            if lookup(&self.root, path).map(|n| n.generation) != *seen {
                return Err(ErrorCode::EAGAIN);
            }
        }
        let mut root = Arc::clone(&self.root);
        let mut counts = self.counts.clone();
        let mut generation = self.generation;
        let mut fires = Vec::new();
        {
            let mut v = View {
                root: &mut root,
                counts: &mut counts,
                generation: &mut generation,
                quotas: &self.quotas,
                tx: None,
            };
            for op in tx.ops {
                fires.extend(match op {
                    TxOp::Write(p, val) => v.write(who, &p, &val)?,
                    TxOp::Mkdir(p) => v.mkdir(who, &p)?,
                    TxOp::Rm(p) => v.rm(who, &p)?,
                    TxOp::SetPerms(p, perms) => v.set_perms(who, &p, perms)?,
                });
            }
        }
        self.root = root;
        self.counts = counts;
        self.generation = generation;
        Ok(fires)
    }

    /// A domain went away: what it owned passes to dom0 and grants naming it are
    /// dropped, so a new domain given the same id inherits nothing (xenstored's
    /// `domain_tree_remove`).
    pub fn forget_domain(&mut self, domid: DomId) {
        fn mentions(n: &Node, d: DomId) -> bool {
            n.perms.iter().any(|p| p.domid == d) || n.children.values().any(|c| mentions(c, d))
        }
        fn fix(n: &mut Arc<Node>, d: DomId) {
            if !mentions(n, d) {
                return;
            }
            let n = Arc::make_mut(n);
            if n.perms[0].domid == d {
                n.perms[0].domid = DomId::DOM0;
            }
            let owner = n.perms[0];
            n.perms.retain(|p| p.domid != d);
            if n.perms.first() != Some(&owner) {
                n.perms.insert(0, owner);
            }
            for c in n.children.values_mut() {
                fix(c, d);
            }
        }
        fix(&mut self.root, domid);
        self.counts.remove(&domid);
    }

    /// Nodes owned by `domid` (for quotas and tests).
    pub fn owned_by(&self, domid: DomId) -> usize {
        self.counts.get(&domid).copied().unwrap_or(0)
    }

    /// The generation of a node (for DIRECTORY_PART); `None` if absent.
    pub fn generation_of(&self, tx: Option<&Transaction>, path: &str) -> Option<u64> {
        lookup(tx.map_or(&self.root, |t| &t.root), path).map(|n| n.generation)
    }
}

/// Operations on one version of the tree. Every operation checks everything
/// before it changes anything, so an error leaves the tree as it was.
#[derive(Debug)]
pub struct View<'a> {
    root: &'a mut Arc<Node>,
    counts: &'a mut HashMap<DomId, usize>,
    generation: &'a mut u64,
    quotas: &'a Quotas,
    #[allow(clippy::type_complexity)]
    tx: Option<(&'a mut HashMap<String, Option<u64>>, &'a mut Vec<TxOp>)>,
}

impl View<'_> {
    fn next_gen(&mut self) -> u64 {
        *self.generation += 1;
        *self.generation
    }

    /// Remembers the generation a transaction first saw at `path`.
    fn touch(&mut self, path: &str) {
        if let Some((accessed, _)) = &mut self.tx {
            if !accessed.contains_key(path) {
                let seen = lookup(self.root, path).map(|n| n.generation);
                accessed.insert(path.to_owned(), seen);
            }
        }
    }

    fn log(&mut self, op: TxOp) {
        if let Some((_, ops)) = &mut self.tx {
            ops.push(op);
        }
    }

    /// The error for a missing node: ENOENT if the caller could read the nearest
    /// existing ancestor, EACCES if not, so that absence does not leak
    /// (xenstored's `errno_from_parents`).
    fn missing(&self, who: &Who, path: &str) -> ErrorCode {
        let (anc, _) = nearest_ancestor(self.root, path);
        if who.can_read(&anc.perms) {
            ErrorCode::ENOENT
        } else {
            ErrorCode::EACCES
        }
    }

    fn readable(&mut self, who: &Who, path: &str) -> Result<&Node> {
        self.touch(path);
        match lookup(self.root, path) {
            Some(n) if who.can_read(&n.perms) => Ok(lookup(self.root, path).expect("just found")),
            Some(_) => Err(ErrorCode::EACCES),
            None => Err(self.missing(who, path)),
        }
    }

    /// READ.
    pub fn read(&mut self, who: &Who, path: &str) -> Result<Vec<u8>> {
        Ok(self.readable(who, path)?.value.clone())
    }

    /// DIRECTORY: the children's names, in the server's stable order.
    pub fn directory(&mut self, who: &Who, path: &str) -> Result<Vec<String>> {
        Ok(self.readable(who, path)?.children.keys().cloned().collect())
    }

    /// GET_PERMS.
    pub fn get_perms(&mut self, who: &Who, path: &str) -> Result<Vec<Perm>> {
        Ok(self.readable(who, path)?.perms.clone())
    }

    /// Creates `path` and any missing parents, each inheriting its parent's
    /// permissions; an unprivileged creator owns what it creates. Needs write
    /// access to the deepest existing ancestor and room in the creator's quota.
    fn create(&mut self, who: &Who, path: &str, value: &[u8]) -> Result<Vec<Fire>> {
        let (anc, anc_path) = nearest_ancestor(self.root, path);
        if !who.can_write(&anc.perms) {
            return Err(if who.can_read(&anc.perms) {
                ErrorCode::EACCES
            } else {
                self.missing(who, path)
            });
        }
        let mut perms = anc.perms.clone();
        if !who.privileged {
            perms[0].domid = who.domid;
        }
        let owner = perms[0].domid;
        let rest: Vec<String> = components(&path[anc_path.len()..])
            .map(str::to_owned)
            .collect();
        let have = self.counts.get(&owner).copied().unwrap_or(0);
        if !who.privileged && have + rest.len() > self.quotas.nodes_per_domain {
            return Err(ErrorCode::ENOSPC);
        }
        // Record what the transaction depends on: the ancestor's child list and
        // the absence of each new node.
        self.touch(&anc_path);
        let mut p = anc_path.clone();
        for c in &rest {
            if p.len() > 1 {
                p.push('/');
            }
            p.push_str(c);
            self.touch(&p);
        }
        let gen = self.next_gen();
        let mut chain: Option<Arc<Node>> = None;
        for i in (0..rest.len()).rev() {
            let mut node = Node {
                value: if i + 1 == rest.len() {
                    value.to_vec()
                } else {
                    Vec::new()
                },
                perms: perms.clone(),
                children: BTreeMap::new(),
                generation: gen,
            };
            if let Some(child) = chain.take() {
                node.children.insert(rest[i + 1].clone(), child);
            }
            chain = Some(Arc::new(node));
        }
        let anc = lookup_mut(self.root, &anc_path).expect("ancestor exists");
        anc.generation = gen;
        anc.children
            .insert(rest[0].clone(), chain.expect("at least one new node"));
        *self.counts.entry(owner).or_insert(0) += rest.len();
        Ok(vec![Fire {
            path: path.to_owned(),
            exact: false,
            perms,
            new_perms: None,
        }])
    }

    /// WRITE: sets the value, creating the node and its parents if needed.
    pub fn write(&mut self, who: &Who, path: &str, value: &[u8]) -> Result<Vec<Fire>> {
        if !who.privileged && value.len() > self.quotas.value_size {
            return Err(ErrorCode::ENOSPC);
        }
        self.touch(path);
        let fires = match lookup(self.root, path) {
            Some(n) if !who.can_write(&n.perms) => return Err(ErrorCode::EACCES),
            Some(n) => {
                let perms = n.perms.clone();
                let gen = self.next_gen();
                let n = lookup_mut(self.root, path).expect("exists");
                n.value = value.to_vec();
                n.generation = gen;
                vec![Fire {
                    path: path.to_owned(),
                    exact: false,
                    perms,
                    new_perms: None,
                }]
            }
            None => self.create(who, path, value)?,
        };
        self.log(TxOp::Write(path.to_owned(), value.to_vec()));
        Ok(fires)
    }

    /// MKDIR: makes sure the node exists; an existing node is left alone.
    pub fn mkdir(&mut self, who: &Who, path: &str) -> Result<Vec<Fire>> {
        self.touch(path);
        let fires = match lookup(self.root, path) {
            Some(n) if !who.can_write(&n.perms) => return Err(ErrorCode::EACCES),
            Some(_) => Vec::new(),
            None => self.create(who, path, b"")?,
        };
        self.log(TxOp::Mkdir(path.to_owned()));
        Ok(fires)
    }

    /// RM: removes the node and everything below it. Not an error if the node is
    /// already gone, as long as its parent exists.
    pub fn rm(&mut self, who: &Who, path: &str) -> Result<Vec<Fire>> {
        let parent = wire::parent(path).ok_or(ErrorCode::EINVAL)?.to_owned();
        self.touch(path);
        let Some(node) = lookup(self.root, path) else {
            let err = self.missing(who, path);
            if err == ErrorCode::ENOENT && lookup(self.root, &parent).is_some() {
                self.log(TxOp::Rm(path.to_owned()));
                return Ok(Vec::new());
            }
            return Err(err);
        };
        if !who.can_write(&node.perms) {
            return Err(ErrorCode::EACCES);
        }
        // Every removed descendant fires watches on exactly its own path; the
        // removed node fires watches on itself and its ancestors.
        let mut fires = vec![Fire {
            path: path.to_owned(),
            exact: false,
            perms: node.perms.clone(),
            new_perms: None,
        }];
        let mut removed: Vec<(String, DomId)> = vec![(path.to_owned(), node.perms[0].domid)];
        fn walk(n: &Node, at: &str, fires: &mut Vec<Fire>, removed: &mut Vec<(String, DomId)>) {
            for (name, c) in &n.children {
                let p = format!("{at}/{name}");
                fires.push(Fire {
                    path: p.clone(),
                    exact: true,
                    perms: c.perms.clone(),
                    new_perms: None,
                });
                removed.push((p.clone(), c.perms[0].domid));
                walk(c, &p, fires, removed);
            }
        }
        walk(node, path, &mut fires, &mut removed);
        self.touch(&parent);
        for (p, _) in &removed {
            self.touch(p);
        }
        let gen = self.next_gen();
        let name = path.rsplit('/').next().expect("non-root path").to_owned();
        let par = lookup_mut(self.root, &parent).expect("parent of an existing node");
        par.children.remove(&name);
        par.generation = gen;
        for (_, owner) in removed {
            if let Some(c) = self.counts.get_mut(&owner) {
                *c = c.saturating_sub(1);
            }
        }
        self.log(TxOp::Rm(path.to_owned()));
        Ok(fires)
    }

    /// SET_PERMS: only the owner (or dom0) may; an unprivileged owner may not give
    /// the node away (EPERM) and is held to the permission-list quota (ENOSPC).
    pub fn set_perms(&mut self, who: &Who, path: &str, perms: Vec<Perm>) -> Result<Vec<Fire>> {
        if perms.is_empty() {
            return Err(ErrorCode::EINVAL);
        }
        self.touch(path);
        let Some(node) = lookup(self.root, path) else {
            return Err(self.missing(who, path));
        };
        let (access, owner) = who.access(&node.perms);
        if !access.can_write() || !owner {
            return Err(ErrorCode::EACCES);
        }
        if !who.privileged {
            if perms.len() > self.quotas.perms_per_node {
                return Err(ErrorCode::ENOSPC);
            }
            if perms[0].domid != node.perms[0].domid {
                return Err(ErrorCode::EPERM);
            }
        }
        let old = node.perms.clone();
        let (old_owner, new_owner) = (old[0].domid, perms[0].domid);
        let gen = self.next_gen();
        let n = lookup_mut(self.root, path).expect("exists");
        n.perms = perms.clone();
        n.generation = gen;
        if old_owner != new_owner {
            if let Some(c) = self.counts.get_mut(&old_owner) {
                *c = c.saturating_sub(1);
            }
            *self.counts.entry(new_owner).or_insert(0) += 1;
        }
        self.log(TxOp::SetPerms(path.to_owned(), perms.clone()));
        Ok(vec![Fire {
            path: path.to_owned(),
            exact: false,
            perms: old,
            new_perms: Some(perms),
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: DomId = DomId(1);
    const D2: DomId = DomId(2);

    fn w(d: u16) -> Who {
        Who::domain(DomId(d))
    }

    fn home(store: &mut Store, d: DomId) {
        let p = wire::domain_path(d);
        let mut v = store.view(None);
        v.mkdir(&Who::DOM0, &p).unwrap();
        v.set_perms(&Who::DOM0, &p, vec![Perm::new(Access::None, d.0)])
            .unwrap();
    }

    #[test]
    fn write_creates_parents_that_inherit_permissions() {
        let mut s = Store::default();
        let mut v = s.view(None);
        v.mkdir(&Who::DOM0, "/a").unwrap();
        v.set_perms(
            &Who::DOM0,
            "/a",
            vec![Perm::new(Access::None, 0), Perm::new(Access::Read, 5)],
        )
        .unwrap();
        v.write(&Who::DOM0, "/a/b/c", b"x").unwrap();
        assert_eq!(
            v.get_perms(&Who::DOM0, "/a/b").unwrap(),
            vec![Perm::new(Access::None, 0), Perm::new(Access::Read, 5)]
        );
        assert_eq!(v.read(&w(5), "/a/b/c").unwrap(), b"x");
        assert_eq!(v.read(&w(6), "/a/b/c"), Err(ErrorCode::EACCES));
        assert_eq!(v.write(&w(5), "/a/b/c", b"y"), Err(ErrorCode::EACCES));
    }

    #[test]
    fn unprivileged_creator_owns_new_nodes_and_counts_against_its_quota() {
        // The home node itself counts: 1 + x + x/y + z = 4.
        let mut s = Store::new(Quotas {
            nodes_per_domain: 4,
            ..Quotas::default()
        });
        home(&mut s, D1);
        let mut v = s.view(None);
        v.write(&w(1), "/local/domain/1/x/y", b"1").unwrap();
        assert_eq!(
            v.get_perms(&w(1), "/local/domain/1/x/y").unwrap()[0].domid,
            D1
        );
        v.write(&w(1), "/local/domain/1/z", b"1").unwrap();
        assert_eq!(
            v.write(&w(1), "/local/domain/1/q", b"1"),
            Err(ErrorCode::ENOSPC)
        );
        v.rm(&w(1), "/local/domain/1/x").unwrap();
        v.write(&w(1), "/local/domain/1/q", b"1").unwrap();
    }

    #[test]
    fn missing_node_under_unreadable_parent_answers_eacces_not_enoent() {
        let mut s = Store::default();
        home(&mut s, D1);
        let mut v = s.view(None);
        assert_eq!(
            v.read(&w(2), "/local/domain/1/nope"),
            Err(ErrorCode::EACCES)
        );
        assert_eq!(
            v.read(&w(1), "/local/domain/1/nope"),
            Err(ErrorCode::ENOENT)
        );
    }

    #[test]
    fn only_the_owner_sets_permissions_and_cannot_give_the_node_away() {
        let mut s = Store::default();
        home(&mut s, D1);
        let p = "/local/domain/1";
        let mut v = s.view(None);
        assert_eq!(
            v.set_perms(&w(2), p, vec![Perm::new(Access::Both, 2)]),
            Err(ErrorCode::EACCES)
        );
        assert_eq!(
            v.set_perms(&w(1), p, vec![Perm::new(Access::None, 2)]),
            Err(ErrorCode::EPERM)
        );
        v.set_perms(
            &w(1),
            p,
            vec![Perm::new(Access::None, 1), Perm::new(Access::Read, 2)],
        )
        .unwrap();
        assert!(v.read(&w(2), p).is_ok());
    }

    #[test]
    fn rm_of_missing_node_is_ok_only_if_parent_exists() {
        let mut s = Store::default();
        let mut v = s.view(None);
        v.mkdir(&Who::DOM0, "/a").unwrap();
        assert_eq!(v.rm(&Who::DOM0, "/a/b"), Ok(vec![]));
        assert_eq!(v.rm(&Who::DOM0, "/x/y"), Err(ErrorCode::ENOENT));
        assert_eq!(v.rm(&Who::DOM0, "/"), Err(ErrorCode::EINVAL));
    }

    #[test]
    fn rm_fires_exact_events_for_removed_descendants() {
        let mut s = Store::default();
        let mut v = s.view(None);
        v.write(&Who::DOM0, "/a/b/c", b"").unwrap();
        let fires = v.rm(&Who::DOM0, "/a").unwrap();
        let got: Vec<_> = fires.iter().map(|f| (f.path.as_str(), f.exact)).collect();
        assert_eq!(got, vec![("/a", false), ("/a/b", true), ("/a/b/c", true)]);
    }

    #[test]
    fn transaction_sees_its_snapshot_and_conflicts_on_commit() {
        let mut s = Store::default();
        s.view(None).write(&Who::DOM0, "/k", b"1").unwrap();
        let mut tx = s.begin();
        assert_eq!(s.view(Some(&mut tx)).read(&Who::DOM0, "/k").unwrap(), b"1");
        s.view(None).write(&Who::DOM0, "/k", b"2").unwrap();
        assert_eq!(s.view(Some(&mut tx)).read(&Who::DOM0, "/k").unwrap(), b"1");
        s.view(Some(&mut tx))
            .write(&Who::DOM0, "/other", b"x")
            .unwrap();
        assert_eq!(s.commit(&Who::DOM0, tx), Err(ErrorCode::EAGAIN));
        assert_eq!(
            s.view(None).read(&Who::DOM0, "/other"),
            Err(ErrorCode::ENOENT)
        );
    }

    #[test]
    fn transaction_commits_when_nothing_it_touched_changed() {
        let mut s = Store::default();
        s.view(None).write(&Who::DOM0, "/k/v", b"1").unwrap();
        s.view(None).mkdir(&Who::DOM0, "/t").unwrap();
        s.view(None).mkdir(&Who::DOM0, "/u").unwrap();
        let mut tx = s.begin();
        s.view(Some(&mut tx))
            .write(&Who::DOM0, "/t/x", b"a")
            .unwrap();
        s.view(Some(&mut tx)).rm(&Who::DOM0, "/k/v").unwrap();
        // Creating a node elsewhere changes neither /t nor /k: no conflict.
        s.view(None)
            .write(&Who::DOM0, "/u/unrelated", b"2")
            .unwrap();
        assert_eq!(
            s.view(None).read(&Who::DOM0, "/t/x"),
            Err(ErrorCode::ENOENT)
        );
        let fires = s.commit(&Who::DOM0, tx).unwrap();
        assert_eq!(fires.len(), 2);
        assert_eq!(s.view(None).read(&Who::DOM0, "/t/x").unwrap(), b"a");
        assert_eq!(
            s.view(None).read(&Who::DOM0, "/k/v"),
            Err(ErrorCode::ENOENT)
        );
        assert_eq!(s.view(None).read(&Who::DOM0, "/u/unrelated").unwrap(), b"2");
    }

    #[test]
    fn creating_a_node_another_transaction_also_creates_conflicts() {
        let mut s = Store::default();
        let mut t1 = s.begin();
        let mut t2 = s.begin();
        s.view(Some(&mut t1)).write(&Who::DOM0, "/n", b"1").unwrap();
        s.view(Some(&mut t2)).write(&Who::DOM0, "/n", b"2").unwrap();
        s.commit(&Who::DOM0, t1).unwrap();
        assert_eq!(s.commit(&Who::DOM0, t2), Err(ErrorCode::EAGAIN));
        assert_eq!(s.view(None).read(&Who::DOM0, "/n").unwrap(), b"1");
    }

    #[test]
    fn forgetting_a_domain_hands_its_nodes_to_dom0() {
        let mut s = Store::default();
        home(&mut s, D1);
        s.view(None)
            .write(&w(1), "/local/domain/1/data", b"secret")
            .unwrap();
        s.view(None)
            .set_perms(
                &Who::DOM0,
                "/local/domain/1",
                vec![Perm::new(Access::None, 1), Perm::new(Access::Read, 2)],
            )
            .unwrap();
        s.forget_domain(D1);
        let mut v = s.view(None);
        // A new domain 1 cannot read what the old one owned.
        assert_eq!(
            v.read(&w(1), "/local/domain/1/data"),
            Err(ErrorCode::EACCES)
        );
        assert_eq!(
            v.get_perms(&Who::DOM0, "/local/domain/1").unwrap(),
            vec![Perm::new(Access::None, 0), Perm::new(Access::Read, 2)]
        );
        assert!(v.read(&Who::domain(D2), "/local/domain/1").is_ok());
    }

    #[test]
    fn failed_operation_changes_nothing() {
        let mut s = Store::new(Quotas {
            nodes_per_domain: 2,
            ..Quotas::default()
        });
        home(&mut s, D1);
        let before = s.owned_by(D1);
        assert_eq!(
            s.view(None).write(&w(1), "/local/domain/1/a/b/c", b""),
            Err(ErrorCode::ENOSPC)
        );
        assert_eq!(s.owned_by(D1), before);
        assert_eq!(
            s.view(None).read(&Who::DOM0, "/local/domain/1/a"),
            Err(ErrorCode::ENOENT)
        );
    }
}
