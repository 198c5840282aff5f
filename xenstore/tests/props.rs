//! Property tests: the decoder over arbitrary bytes, the server over mostly valid
//! random requests, and the store against a simple model.

use std::collections::BTreeMap;

use proptest::prelude::*;
use xenstore::wire::{self, Message, HEADER_LEN, PAYLOAD_MAX};
use xenstore::{DomId, Op, Server};

proptest! {
    #[test]
    fn decoder_never_panics_and_never_overreads(bytes in proptest::collection::vec(any::<u8>(), 0..9000)) {
        match Message::decode(&bytes) {
            Ok(Some((m, used))) => {
                prop_assert!(used <= bytes.len());
                prop_assert_eq!(used, HEADER_LEN + m.payload.len());
                prop_assert!(m.payload.len() <= PAYLOAD_MAX);
            }
            Ok(None) => prop_assert!(bytes.len() < HEADER_LEN + PAYLOAD_MAX),
            Err(_) => {}
        }
    }

    #[test]
    fn messages_round_trip_through_any_chunking(
        msgs in proptest::collection::vec(
            (any::<u32>(), any::<u32>(), any::<u32>(), proptest::collection::vec(any::<u8>(), 0..300)),
            1..8),
        cut in 1usize..64,
    ) {
        let msgs: Vec<Message> = msgs.into_iter()
            .map(|(ty, req_id, tx_id, payload)| Message { ty, req_id, tx_id, payload })
            .collect();
        let stream: Vec<u8> = msgs.iter().flat_map(Message::encode).collect();
        // Feed the stream in chunks of `cut` bytes, as a socket might deliver it.
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for chunk in stream.chunks(cut) {
            buf.extend_from_slice(chunk);
            while let Some((m, used)) = Message::decode(&buf).unwrap() {
                buf.drain(..used);
                got.push(m);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, msgs);
    }
}

/// Mostly valid paths, with the odd invalid one (`rarely`).
fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => proptest::collection::vec(prop::sample::select(vec!["a", "b", "c", "local", "domain", "5", "0"]), 1..5)
            .prop_map(|c| format!("/{}", c.join("/"))),
        2 => proptest::collection::vec(prop::sample::select(vec!["x", "y", "device"]), 1..3)
            .prop_map(|c| c.join("/")),
        1 => prop::sample::select(vec!["/", "@releaseDomain", "@introduceDomain", "/a//b", "/a/", "", "/a.b", "@"])
            .prop_map(str::to_owned),
        1 => "[ -~]{0,40}",
    ]
}

fn request() -> impl Strategy<Value = Message> {
    let op = prop_oneof![
        10 => prop::sample::select(Op::ALL.to_vec()).prop_map(|o| o as u32),
        1 => any::<u32>(),
    ];
    let payload = prop_oneof![
        6 => (path(), proptest::collection::vec(any::<u8>(), 0..20))
            .prop_map(|(p, v)| wire::payload(&[p.as_bytes()], &v)),
        3 => (path(), "[a-z0-9]{0,6}").prop_map(|(p, t)| wire::payload(&[p.as_bytes(), t.as_bytes()], b"")),
        2 => (path(), prop::sample::select(vec!["n0", "r5", "b3", "w7", "x", ""]))
            .prop_map(|(p, q)| wire::payload(&[p.as_bytes(), q.as_bytes()], b"")),
        1 => prop::sample::select(vec!["T", "F", "5", "0", "check", "sim-as-domain"])
            .prop_map(|s| wire::payload(&[s.as_bytes()], b"")),
        1 => proptest::collection::vec(any::<u8>(), 0..64),
    ];
    (
        op,
        1u32..1000,
        prop_oneof![4 => Just(0u32), 1 => 0u32..4],
        payload,
    )
        .prop_map(|(ty, req_id, tx_id, payload)| Message {
            ty,
            req_id,
            tx_id,
            payload,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn every_request_gets_exactly_one_reply_and_the_server_survives(
        reqs in proptest::collection::vec(request(), 1..40),
        as_guest in any::<bool>(),
    ) {
        let server = Server::default();
        server.introduce(DomId(5));
        let domid = if as_guest { DomId(5) } else { DomId::DOM0 };
        let bytes: Vec<u8> = reqs.iter().flat_map(Message::encode).collect();
        let out = server.handle_bytes(domid, &bytes);
        let replies: Vec<&Message> = out.iter().filter(|m| m.ty != Op::WatchEvent as u32).collect();
        prop_assert_eq!(replies.len(), reqs.len());
        for (req, rep) in reqs.iter().zip(&replies) {
            prop_assert_eq!(rep.req_id, req.req_id);
            prop_assert!(rep.ty == req.ty || rep.ty == Op::Error as u32);
            prop_assert!(rep.payload.len() <= PAYLOAD_MAX);
            if let Some(code) = rep.error_code() {
                prop_assert!(code.is_ok(), "unknown error name {:?}", code);
            }
        }
        for ev in out.iter().filter(|m| m.ty == Op::WatchEvent as u32) {
            prop_assert_eq!((ev.req_id, ev.tx_id), (0, 0));
            prop_assert_eq!(wire::split_strings(&ev.payload).0.len(), 2);
        }
        // The server still answers sensibly afterwards.
        let probe = Message::new(Op::Read, 1, 0, b"/tool/xenstored\0".to_vec());
        let after = server.handle_bytes(DomId::DOM0, &probe.encode());
        prop_assert_eq!(after.len(), 1);
        prop_assert_eq!(after[0].ty, Op::Read as u32);
        if as_guest {
            // A guest can neither create nor take over dom0's nodes: dom0 still owns
            // exactly /tool and /tool/xenstored.
            prop_assert_eq!(server.nodes_owned_by(DomId::DOM0), 2);
        }
    }
}

#[derive(Clone, Debug)]
enum ModelOp {
    Write(String, Vec<u8>),
    Mkdir(String),
    Rm(String),
    Read(String),
    Dir(String),
}

fn model_op() -> impl Strategy<Value = ModelOp> {
    let p = proptest::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..4)
        .prop_map(|c| format!("/m/{}", c.join("/")));
    prop_oneof![
        3 => (p.clone(), proptest::collection::vec(any::<u8>(), 0..8)).prop_map(|(p, v)| ModelOp::Write(p, v)),
        1 => p.clone().prop_map(ModelOp::Mkdir),
        2 => p.clone().prop_map(ModelOp::Rm),
        2 => p.clone().prop_map(ModelOp::Read),
        1 => p.prop_map(ModelOp::Dir),
    ]
}

fn model_parents(m: &mut BTreeMap<String, Vec<u8>>, p: &str) {
    let mut at = String::new();
    for c in p.split('/').filter(|c| !c.is_empty()) {
        at.push('/');
        at.push_str(c);
        m.entry(at.clone()).or_default();
    }
}

proptest! {
    #[test]
    fn store_agrees_with_a_map_model(ops in proptest::collection::vec(model_op(), 1..60)) {
        let server = Server::default();
        let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        model.insert("/m".into(), vec![]);
        let mut bytes = Message::new(Op::Mkdir, 1, 0, b"/m\0".to_vec()).encode();
        let mut expect: Vec<Result<Vec<u8>, &str>> = vec![Ok(b"OK\0".to_vec())];
        for (i, op) in ops.iter().enumerate() {
            let req_id = i as u32 + 2;
            let (msg, want) = match op {
                ModelOp::Write(p, v) => {
                    model_parents(&mut model, p);
                    model.insert(p.clone(), v.clone());
                    (Message::new(Op::Write, req_id, 0, wire::payload(&[p.as_bytes()], v)), Ok(b"OK\0".to_vec()))
                }
                ModelOp::Mkdir(p) => {
                    model_parents(&mut model, p);
                    (Message::new(Op::Mkdir, req_id, 0, wire::payload(&[p.as_bytes()], b"")), Ok(b"OK\0".to_vec()))
                }
                ModelOp::Rm(p) => {
                    let parent = wire::parent(p).unwrap().to_owned();
                    let want = if model.contains_key(p) || model.contains_key(&parent) {
                        model.retain(|k, _| !wire::is_child(k, p));
                        Ok(b"OK\0".to_vec())
                    } else {
                        Err("ENOENT")
                    };
                    (Message::new(Op::Rm, req_id, 0, wire::payload(&[p.as_bytes()], b"")), want)
                }
                ModelOp::Read(p) => {
                    let want = model.get(p).cloned().ok_or("ENOENT");
                    (Message::new(Op::Read, req_id, 0, wire::payload(&[p.as_bytes()], b"")), want)
                }
                ModelOp::Dir(p) => {
                    let want = if model.contains_key(p) {
                        let prefix = format!("{p}/");
                        let kids: Vec<&[u8]> = model.keys()
                            .filter_map(|k| k.strip_prefix(&prefix))
                            .filter(|r| !r.contains('/'))
                            .map(str::as_bytes)
                            .collect();
                        Ok(wire::payload(&kids, b""))
                    } else {
                        Err("ENOENT")
                    };
                    (Message::new(Op::Directory, req_id, 0, wire::payload(&[p.as_bytes()], b"")), want)
                }
            };
            bytes.extend(msg.encode());
            expect.push(want);
        }
        let out = server.handle_bytes(DomId::DOM0, &bytes);
        prop_assert_eq!(out.len(), expect.len());
        for (got, want) in out.iter().zip(expect) {
            match want {
                Ok(payload) => prop_assert_eq!(&got.payload, &payload),
                Err(name) => prop_assert_eq!(got.error_code().unwrap().unwrap().name(), name),
            }
        }
    }
}
