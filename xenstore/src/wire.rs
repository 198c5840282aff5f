//! The Xenstore wire protocol of `xen/io/xs_wire.h` and `docs/misc/xenstore.txt`.
//!
//! Pure data: message framing, operation numbers, error names, path rules and the
//! permission string format. No I/O happens here; the client and the server both
//! build on it, and it is what the fuzz and property tests hammer.

use std::fmt;

/// Size of `struct xsd_sockmsg`: type, req_id, tx_id, len, each a `uint32_t`.
pub const HEADER_LEN: usize = 16;
/// `XENSTORE_PAYLOAD_MAX`: the largest payload in either direction.
pub const PAYLOAD_MAX: usize = 4096;
/// `XENSTORE_ABS_PATH_MAX`: the longest absolute path.
pub const ABS_PATH_MAX: usize = 3072;
/// `XENSTORE_REL_PATH_MAX`: the longest path relative to a domain's home.
pub const REL_PATH_MAX: usize = 2048;

/// A Xen domain id (0..=65535 on the wire, as decimal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomId(pub u16);

impl DomId {
    /// The control domain.
    pub const DOM0: DomId = DomId(0);

    /// Parses a decimal domid as xenstored does, but strictly: the whole string,
    /// digits only, at most 65535.
    pub fn parse(s: &str) -> Option<DomId> {
        parse_decimal(s)
            .and_then(|v| u16::try_from(v).ok())
            .map(DomId)
    }
}

impl fmt::Display for DomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Parses an unsigned decimal number: non-empty, ASCII digits only, fits in a u64.
pub fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

macro_rules! ops {
    ($($(#[$doc:meta])* $name:ident = $num:literal, $wire:literal;)*) => {
        /// `enum xsd_sockmsg_type`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum Op {
            $($(#[$doc])* $name = $num,)*
        }

        impl Op {
            /// Every operation, in wire order.
            pub const ALL: &'static [Op] = &[$(Op::$name,)*];

            /// The operation with this wire number, if there is one.
            pub fn from_u32(v: u32) -> Option<Op> {
                match v {
                    $($num => Some(Op::$name),)*
                    _ => None,
                }
            }

            /// The name xenstored uses in its logs (`XS_` prefix dropped).
            pub fn name(self) -> &'static str {
                match self {
                    $(Op::$name => $wire,)*
                }
            }
        }
    };
}

ops! {
    /// `XS_CONTROL` (formerly `XS_DEBUG`): implementation-specific commands.
    Control = 0, "CONTROL";
    /// `XS_DIRECTORY`: the children of a node.
    Directory = 1, "DIRECTORY";
    /// `XS_READ`: a node's value.
    Read = 2, "READ";
    /// `XS_GET_PERMS`: a node's permissions.
    GetPerms = 3, "GET_PERMS";
    /// `XS_WATCH`: register a watch.
    Watch = 4, "WATCH";
    /// `XS_UNWATCH`: remove a watch.
    Unwatch = 5, "UNWATCH";
    /// `XS_TRANSACTION_START`.
    TransactionStart = 6, "TRANSACTION_START";
    /// `XS_TRANSACTION_END`.
    TransactionEnd = 7, "TRANSACTION_END";
    /// `XS_INTRODUCE`: tell xenstored about a new domain.
    Introduce = 8, "INTRODUCE";
    /// `XS_RELEASE`: forget a domain.
    Release = 9, "RELEASE";
    /// `XS_GET_DOMAIN_PATH`: `/local/domain/<domid>`.
    GetDomainPath = 10, "GET_DOMAIN_PATH";
    /// `XS_WRITE`.
    Write = 11, "WRITE";
    /// `XS_MKDIR`.
    Mkdir = 12, "MKDIR";
    /// `XS_RM`.
    Rm = 13, "RM";
    /// `XS_SET_PERMS`.
    SetPerms = 14, "SET_PERMS";
    /// `XS_WATCH_EVENT`: an unsolicited message that a watch fired.
    WatchEvent = 15, "WATCH_EVENT";
    /// `XS_ERROR`: the reply to a failed request.
    Error = 16, "ERROR";
    /// `XS_IS_DOMAIN_INTRODUCED`.
    IsDomainIntroduced = 17, "IS_DOMAIN_INTRODUCED";
    /// `XS_RESUME`.
    Resume = 18, "RESUME";
    /// `XS_SET_TARGET`.
    SetTarget = 19, "SET_TARGET";
    /// `XS_RESET_WATCHES` (20 was `XS_RESTRICT`, since removed).
    ResetWatches = 21, "RESET_WATCHES";
    /// `XS_DIRECTORY_PART`: part of a long children list.
    DirectoryPart = 22, "DIRECTORY_PART";
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `XS_TYPE_COUNT`: one past the highest operation number.
pub const TYPE_COUNT: u32 = 23;
/// `XS_INVALID`: guaranteed never to be a valid operation.
pub const TYPE_INVALID: u32 = 0xffff;

macro_rules! errors {
    ($($name:ident = $errno:literal;)*) => {
        /// The error names of `xsd_errors[]`, sent as strings in an `XS_ERROR` reply.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $(#[doc = concat!("`", stringify!($name), "`")] $name,)*
        }

        impl ErrorCode {
            /// Every error xenstored may send, in `xsd_errors[]` order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            /// The name on the wire, e.g. `"ENOENT"`.
            pub fn name(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => stringify!($name),)*
                }
            }

            /// The Linux errno value with this name.
            pub fn errno(self) -> i32 {
                match self {
                    $(ErrorCode::$name => $errno,)*
                }
            }

            /// The code with this wire name.
            pub fn from_name(name: &str) -> Option<ErrorCode> {
                match name {
                    $(stringify!($name) => Some(ErrorCode::$name),)*
                    _ => None,
                }
            }
        }
    };
}

errors! {
    EINVAL = 22;
    EACCES = 13;
    EEXIST = 17;
    EISDIR = 21;
    ENOENT = 2;
    ENOMEM = 12;
    ENOSPC = 28;
    EIO = 5;
    ENOTEMPTY = 39;
    ENOSYS = 38;
    EROFS = 30;
    EBUSY = 16;
    EAGAIN = 11;
    EISCONN = 106;
    E2BIG = 7;
    EPERM = 1;
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::error::Error for ErrorCode {}

/// The fixed header that precedes every payload (`struct xsd_sockmsg`).
///
/// `xs_wire.h` says the fields are native-endian; every Xen platform with a
/// userspace backend is little-endian, and so is this encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The raw operation number (may be unknown: the server answers ENOSYS).
    pub ty: u32,
    /// Echoed in the reply; lets a client match replies to requests.
    pub req_id: u32,
    /// The transaction the request belongs to, 0 for none.
    pub tx_id: u32,
    /// The payload length.
    pub len: u32,
}

impl Header {
    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.ty.to_le_bytes());
        b[4..8].copy_from_slice(&self.req_id.to_le_bytes());
        b[8..12].copy_from_slice(&self.tx_id.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes a header from exactly [`HEADER_LEN`] bytes.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Header {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            ty: word(0),
            req_id: word(4),
            tx_id: word(8),
            len: word(12),
        }
    }
}

/// A framing error: the peer broke the protocol and the stream cannot be resynchronised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header announced a payload over [`PAYLOAD_MAX`]; xenstored drops such a client.
    #[error("message payload of {0} bytes exceeds the Xenstore maximum of {PAYLOAD_MAX}")]
    PayloadTooLarge(u32),
}

/// One message, request or reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The raw operation number.
    pub ty: u32,
    /// Request id, echoed in the reply.
    pub req_id: u32,
    /// Transaction id.
    pub tx_id: u32,
    /// The payload, at most [`PAYLOAD_MAX`] bytes.
    pub payload: Vec<u8>,
}

impl Message {
    /// A message of a known operation.
    pub fn new(op: Op, req_id: u32, tx_id: u32, payload: Vec<u8>) -> Message {
        Message {
            ty: op as u32,
            req_id,
            tx_id,
            payload,
        }
    }

    /// The operation, if the number is a known one.
    pub fn op(&self) -> Option<Op> {
        Op::from_u32(self.ty)
    }

    /// Header and payload as one buffer. Callers keep payloads within [`PAYLOAD_MAX`].
    pub fn encode(&self) -> Vec<u8> {
        let len = u32::try_from(self.payload.len()).unwrap_or(u32::MAX);
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(
            &Header {
                ty: self.ty,
                req_id: self.req_id,
                tx_id: self.tx_id,
                len,
            }
            .to_bytes(),
        );
        out.extend_from_slice(&self.payload);
        out
    }

    /// Takes one whole message off the front of `buf`.
    ///
    /// `Ok(None)`: more bytes are needed. `Ok(Some((msg, used)))`: a message and the
    /// number of bytes it took. An oversized length is an error at once, before its
    /// payload arrives, so a peer cannot make us buffer it.
    pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, FrameError> {
        let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let h = Header::from_bytes(head);
        if h.len as usize > PAYLOAD_MAX {
            return Err(FrameError::PayloadTooLarge(h.len));
        }
        let end = HEADER_LEN + h.len as usize;
        if buf.len() < end {
            return Ok(None);
        }
        Ok(Some((
            Message {
                ty: h.ty,
                req_id: h.req_id,
                tx_id: h.tx_id,
                payload: buf[HEADER_LEN..end].to_vec(),
            },
            end,
        )))
    }

    /// The error name of an `XS_ERROR` reply.
    pub fn error_code(&self) -> Option<Result<ErrorCode, String>> {
        if self.ty != Op::Error as u32 {
            return None;
        }
        let name = self.payload.strip_suffix(b"\0").unwrap_or(&self.payload);
        let name = String::from_utf8_lossy(name);
        Some(ErrorCode::from_name(&name).ok_or_else(|| name.into_owned()))
    }
}

/// Builds a payload of nul-terminated strings, optionally followed by raw bytes
/// (the value of a WRITE is not nul-terminated).
pub fn payload(strings: &[&[u8]], tail: &[u8]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(strings.iter().map(|s| s.len() + 1).sum::<usize>() + tail.len());
    for s in strings {
        out.extend_from_slice(s);
        out.push(0);
    }
    out.extend_from_slice(tail);
    out
}

/// Splits a payload into its nul-terminated strings, as `xs_count_strings` counts
/// them: trailing bytes without a nul are not a string and are returned apart.
pub fn split_strings(payload: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut out = Vec::new();
    let mut rest = payload;
    while let Some(i) = rest.iter().position(|&b| b == 0) {
        out.push(&rest[..i]);
        rest = &rest[i + 1..];
    }
    (out, rest)
}

/// The payload as exactly one nul-terminated UTF-8 string (xenstored's `onearg`).
pub fn one_arg(payload: &[u8]) -> Option<&str> {
    let body = payload.strip_suffix(b"\0")?;
    if body.contains(&0) {
        return None;
    }
    std::str::from_utf8(body).ok()
}

/// The payload as exactly `n` nul-terminated UTF-8 strings and nothing after them.
pub fn n_args(payload: &[u8], n: usize) -> Option<Vec<&str>> {
    let (strings, rest) = split_strings(payload);
    if strings.len() != n || !rest.is_empty() {
        return None;
    }
    strings
        .into_iter()
        .map(|s| std::str::from_utf8(s).ok())
        .collect()
}

/// `/local/domain/<domid>`: the home of a domain's relative paths.
pub fn domain_path(domid: DomId) -> String {
    format!("/local/domain/{}", domid.0)
}

/// Whether `path` names a special watch (`@introduceDomain`, `@releaseDomain`, ...).
pub fn is_special(path: &str) -> bool {
    path.starts_with('@')
}

/// The two special paths xenstored fires events on.
pub const INTRODUCE_DOMAIN: &str = "@introduceDomain";
/// See [`INTRODUCE_DOMAIN`].
pub const RELEASE_DOMAIN: &str = "@releaseDomain";

fn valid_chars(path: &str) -> bool {
    path.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'@'))
}

/// Turns a request path into an absolute one: relative paths are taken from
/// `/local/domain/<domid>`, absolute and special paths are left alone.
pub fn canonicalize(path: &str, domid: DomId) -> String {
    if path.starts_with('/') || is_special(path) {
        path.to_owned()
    } else {
        format!("{}/{}", domain_path(domid), path)
    }
}

/// Checks an absolute node name by xenstored's rules (`is_valid_nodename`):
/// starts with `/`, no `//`, no trailing `/` except the root, only
/// `[A-Za-z0-9-/_@]`, at most [`ABS_PATH_MAX`] bytes, and for an unprivileged
/// domain at most `rel_max` bytes below `/local/domain/<id>/`.
///
/// Special names (`@...`) pass only where `allow_special` is set.
pub fn validate_path(path: &str, allow_special: bool, rel_max: Option<usize>) -> bool {
    if path.is_empty() || path.len() > ABS_PATH_MAX || !valid_chars(path) {
        return false;
    }
    if is_special(path) {
        return allow_special && path.len() > 1 && !path.contains('/');
    }
    if !path.starts_with('/') || path.contains("//") || (path.len() > 1 && path.ends_with('/')) {
        return false;
    }
    if let Some(max) = rel_max {
        let rel = strip_domain_prefix(path).map_or(path.len(), |(_, rest)| rest.len());
        if rel > max {
            return false;
        }
    }
    true
}

/// Splits `/local/domain/<id>/rest` into (`id`, `rest`).
pub fn strip_domain_prefix(path: &str) -> Option<(DomId, &str)> {
    let rest = path.strip_prefix("/local/domain/")?;
    let (id, tail) = rest.split_once('/')?;
    Some((DomId::parse(id)?, tail))
}

/// Whether `child` is `parent` or lies below it (`docs/misc/xenstore.txt`: the root
/// is the parent of everything).
pub fn is_child(child: &str, parent: &str) -> bool {
    if parent == "/" {
        return child.starts_with('/');
    }
    match child.strip_prefix(parent) {
        Some("") => true,
        Some(rest) => rest.starts_with('/'),
        None => false,
    }
}

/// The parent of an absolute path (`/` for a top-level node, `None` for `/`).
pub fn parent(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

/// What a permission entry grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// `n`: nothing.
    None,
    /// `r`: read.
    Read,
    /// `w`: write.
    Write,
    /// `b`: both.
    Both,
}

impl Access {
    /// The letter of the permission string.
    pub fn letter(self) -> char {
        match self {
            Access::None => 'n',
            Access::Read => 'r',
            Access::Write => 'w',
            Access::Both => 'b',
        }
    }

    /// Whether this grants read.
    pub fn can_read(self) -> bool {
        matches!(self, Access::Read | Access::Both)
    }

    /// Whether this grants write.
    pub fn can_write(self) -> bool {
        matches!(self, Access::Write | Access::Both)
    }
}

/// One entry of a node's permission list, e.g. `r5`.
///
/// The first entry of a list names the owner and what every domain not listed
/// later gets; the rest are per-domain grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perm {
    /// The domain the entry is about.
    pub domid: DomId,
    /// What it grants.
    pub access: Access,
}

impl Perm {
    /// A permission entry.
    pub fn new(access: Access, domid: u16) -> Perm {
        Perm {
            domid: DomId(domid),
            access,
        }
    }

    /// Parses `n0`, `r5`, `w7`, `b3`: a letter, then a decimal domid, nothing else.
    pub fn parse(s: &str) -> Option<Perm> {
        let mut chars = s.chars();
        let access = match chars.next()? {
            'n' => Access::None,
            'r' => Access::Read,
            'w' => Access::Write,
            'b' => Access::Both,
            _ => return None,
        };
        Some(Perm {
            domid: DomId::parse(chars.as_str())?,
            access,
        })
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.access.letter(), self.domid.0)
    }
}

/// Parses a whole permission list as sent in SET_PERMS (after the path).
pub fn parse_perms<'a>(items: impl IntoIterator<Item = &'a str>) -> Option<Vec<Perm>> {
    let perms: Option<Vec<Perm>> = items.into_iter().map(Perm::parse).collect();
    perms.filter(|p| !p.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_numbers_match_xs_wire_h() {
        assert_eq!(Op::Control as u32, 0);
        assert_eq!(Op::SetTarget as u32, 19);
        assert_eq!(Op::ResetWatches as u32, 21);
        assert_eq!(Op::DirectoryPart as u32, 22);
        assert_eq!(Op::from_u32(20), None, "XS_RESTRICT was removed");
        for op in Op::ALL {
            assert_eq!(Op::from_u32(*op as u32), Some(*op));
        }
        assert_eq!(Op::ALL.len(), TYPE_COUNT as usize - 1);
    }

    #[test]
    fn error_names_round_trip_in_xsd_errors_order() {
        let names: Vec<_> = ErrorCode::ALL.iter().map(|e| e.name()).collect();
        assert_eq!(
            names,
            [
                "EINVAL",
                "EACCES",
                "EEXIST",
                "EISDIR",
                "ENOENT",
                "ENOMEM",
                "ENOSPC",
                "EIO",
                "ENOTEMPTY",
                "ENOSYS",
                "EROFS",
                "EBUSY",
                "EAGAIN",
                "EISCONN",
                "E2BIG",
                "EPERM"
            ]
        );
        for e in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_name(e.name()), Some(*e));
        }
    }

    #[test]
    fn header_is_16_little_endian_bytes() {
        let h = Header {
            ty: 2,
            req_id: 0x01020304,
            tx_id: 7,
            len: 5,
        };
        let b = h.to_bytes();
        assert_eq!(&b[..8], &[2, 0, 0, 0, 4, 3, 2, 1]);
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn decode_waits_for_a_whole_message_and_reports_what_it_used() {
        let m = Message::new(Op::Read, 9, 0, b"/a\0".to_vec());
        let mut bytes = m.encode();
        bytes.extend_from_slice(&[1, 2]);
        for cut in 0..HEADER_LEN + 3 {
            assert_eq!(Message::decode(&bytes[..cut]), Ok(None));
        }
        assert_eq!(Message::decode(&bytes), Ok(Some((m, HEADER_LEN + 3))));
    }

    #[test]
    fn oversized_payload_is_refused_from_the_header_alone() {
        let h = Header {
            ty: 2,
            req_id: 1,
            tx_id: 0,
            len: PAYLOAD_MAX as u32 + 1,
        };
        assert_eq!(
            Message::decode(&h.to_bytes()),
            Err(FrameError::PayloadTooLarge(4097))
        );
    }

    #[test]
    fn path_rules_follow_xenstored() {
        assert!(validate_path("/", false, None));
        assert!(validate_path(
            "/local/domain/1/device-model_x@y",
            false,
            None
        ));
        assert!(!validate_path("", false, None));
        assert!(!validate_path("local", false, None));
        assert!(!validate_path("/a//b", false, None));
        assert!(!validate_path("/a/", false, None));
        assert!(!validate_path("/a b", false, None));
        assert!(!validate_path("/a.b", false, None));
        assert!(!validate_path("@releaseDomain", false, None));
        assert!(validate_path("@releaseDomain", true, None));
        assert!(!validate_path("@", true, None));
        let long = format!("/{}", "a".repeat(ABS_PATH_MAX));
        assert!(!validate_path(&long, false, None));
        let rel = format!("/local/domain/3/{}", "a".repeat(REL_PATH_MAX + 1));
        assert!(validate_path(&rel, false, None));
        assert!(!validate_path(&rel, false, Some(REL_PATH_MAX)));
    }

    #[test]
    fn relative_paths_live_under_the_domain_home() {
        assert_eq!(
            canonicalize("device/vbd", DomId(3)),
            "/local/domain/3/device/vbd"
        );
        assert_eq!(canonicalize("/x", DomId(3)), "/x");
        assert_eq!(canonicalize("@releaseDomain", DomId(3)), "@releaseDomain");
    }

    #[test]
    fn parent_and_child_relations() {
        assert!(is_child("/a/b", "/a"));
        assert!(is_child("/a", "/a"));
        assert!(!is_child("/ab", "/a"));
        assert!(is_child("/ab", "/"));
        assert_eq!(parent("/a/b"), Some("/a"));
        assert_eq!(parent("/a"), Some("/"));
        assert_eq!(parent("/"), None);
    }

    #[test]
    fn permission_strings() {
        assert_eq!(Perm::parse("n0"), Some(Perm::new(Access::None, 0)));
        assert_eq!(Perm::parse("r5"), Some(Perm::new(Access::Read, 5)));
        assert_eq!(Perm::parse("w7"), Some(Perm::new(Access::Write, 7)));
        assert_eq!(Perm::parse("b3"), Some(Perm::new(Access::Both, 3)));
        for bad in ["", "x1", "r", "r-1", "r65536", "r1a", "R1", "r 1"] {
            assert_eq!(Perm::parse(bad), None, "{bad:?}");
        }
        assert_eq!(Perm::new(Access::Both, 12).to_string(), "b12");
    }

    #[test]
    fn argument_splitting() {
        assert_eq!(one_arg(b"/a\0"), Some("/a"));
        assert_eq!(one_arg(b"/a"), None);
        assert_eq!(one_arg(b"/a\0b\0"), None);
        assert_eq!(n_args(b"/a\0tok\0", 2), Some(vec!["/a", "tok"]));
        assert_eq!(n_args(b"/a\0tok", 2), None);
        let (s, rest) = split_strings(b"/a\0val\0ue");
        assert_eq!(s, vec![&b"/a"[..], &b"val"[..]]);
        assert_eq!(rest, b"ue");
    }
}
