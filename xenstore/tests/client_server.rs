//! The async client against the embedded server, over real unix sockets.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use xenstore::wire::{self, Header, Message, HEADER_LEN};
use xenstore::{Access, Client, DomId, ErrorCode, Op, Perm, Quotas, Server, Xs};

const D5: DomId = DomId(5);

fn dom0(server: &Server) -> Client {
    Client::from_stream(server.connect_as(DomId::DOM0).unwrap())
}

fn guest(server: &Server, domid: DomId) -> Client {
    Client::from_stream(server.connect_as(domid).unwrap())
}

fn code<T: std::fmt::Debug>(r: Result<T, xenstore::Error>) -> Option<ErrorCode> {
    r.err().and_then(|e| e.code())
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("timed out")
}

/// Makes `/local/domain/<d>` owned by `d`, as the toolstack does.
async fn make_home(c: &Client, d: DomId) {
    let home = format!("/local/domain/{d}");
    c.mkdir(&home).await.unwrap();
    c.set_perms(&home, &[Perm::new(Access::None, d.0)])
        .await
        .unwrap();
}

#[tokio::test]
async fn conformance_suite_passes_against_the_embedded_server() {
    let server = Server::default();
    let c = dom0(&server);
    let checks = within(xenstore::conformance::run(&c, "conformance")).await;
    let failed: Vec<_> = checks.iter().filter(|c| c.outcome.is_err()).collect();
    assert!(failed.is_empty(), "failed checks: {failed:#?}");
    assert_eq!(checks.len(), 10);
}

#[tokio::test]
async fn many_requests_in_flight_are_matched_by_req_id() {
    let server = Server::default();
    let c = dom0(&server);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..2000u32 {
        let c = c.clone();
        set.spawn(async move {
            let p = format!("/pipe/{}", i % 97);
            c.write(&format!("{p}/{i}"), i.to_string()).await.unwrap();
            let v = c.read_string(&format!("{p}/{i}")).await.unwrap();
            assert_eq!(v, i.to_string());
        });
    }
    within(async {
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
    })
    .await;
    assert_eq!(c.directory("/pipe").await.unwrap().len(), 97);
}

/// A burst of 10,000 events that the watcher does not read: replies are
/// never held up behind the events, and the watch queue stays bounded
/// (XSA-349): at most `WATCH_QUEUE_MAX` events, the overflow collapsed into
/// one event for the watched path, which says "read again".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_10000_watch_events_stays_bounded_and_never_stalls_replies() {
    let server = Server::default();
    let watcher = dom0(&server);
    let writer = dom0(&server);
    watcher.mkdir("/burst").await.unwrap();
    let mut w = watcher.watch("/burst").await.unwrap();
    assert_eq!(w.next().await.unwrap().path, "/burst");

    const N: usize = 10_000;
    let burst = tokio::spawn(async move {
        for i in 0..N {
            writer.write(&format!("/burst/k{i}"), b"x").await.unwrap();
        }
    });
    // Meanwhile the watching connection keeps requests in flight and does not
    // read its watch until they are done: replies must not wait for the stream.
    let mut reads = tokio::task::JoinSet::new();
    for i in 0..500 {
        let c = watcher.clone();
        reads.spawn(async move { c.read(&format!("/burst/k{i}")).await.map(|_| ()) });
    }
    within(async {
        while let Some(r) = reads.join_next().await {
            let _ = r.unwrap(); // ENOENT is fine if the writer is not there yet
        }
    })
    .await;
    within(burst).await.unwrap();
    // The writer's last reply came after its last event was sent to us; one
    // more round trip on our connection makes sure every event was routed.
    watcher.read("/burst/k0").await.unwrap();
    assert!(
        w.queued() <= xenstore::client::WATCH_QUEUE_MAX,
        "{} queued",
        w.queued()
    );
    let mut got = Vec::new();
    while let Some(ev) = w.try_next() {
        got.push(ev.path);
    }
    assert!(!got.is_empty() && got.len() <= xenstore::client::WATCH_QUEUE_MAX);
    assert!(
        got.iter().any(|p| p == "/burst"),
        "the overflow is one event for the watched path: {got:?}"
    );
    assert!(
        w.coalesced() as usize + got.len() >= N,
        "every event is accounted for"
    );
    // Drained, the watch works as before.
    watcher.write("/burst/after", b"y").await.unwrap();
    assert_eq!(within(w.next()).await.unwrap().path, "/burst/after");
}

/// Rewriting one node folds into one queued event, however often.
#[tokio::test]
async fn events_for_a_path_already_queued_are_folded_into_it() {
    let server = Server::default();
    let c = dom0(&server);
    c.mkdir("/fold").await.unwrap();
    let mut w = c.watch("/fold").await.unwrap();
    assert_eq!(w.next().await.unwrap().path, "/fold");
    for i in 0..1000 {
        c.write("/fold/state", format!("{i}")).await.unwrap();
    }
    c.write("/fold/other", b"x").await.unwrap();
    let mut got = Vec::new();
    while let Some(ev) = w.try_next() {
        got.push(ev.path);
    }
    assert_eq!(got, ["/fold/state", "/fold/other"]);
    assert_eq!(w.coalesced(), 999);
}

#[tokio::test]
async fn a_guest_cannot_read_or_write_what_dom0_did_not_grant() {
    let server = Server::default();
    server.introduce(D5);
    let c = dom0(&server);
    make_home(&c, D5).await;
    c.write("/local/domain/0/backend/vbd/5/51712/params", "secret")
        .await
        .unwrap();
    let g = guest(&server, D5);
    assert_eq!(
        code(g.read("/local/domain/0/backend/vbd/5/51712/params").await),
        Some(ErrorCode::EACCES)
    );
    assert_eq!(
        code(
            g.write("/local/domain/0/backend/vbd/5/51712/state", "4")
                .await
        ),
        Some(ErrorCode::EACCES)
    );
    assert_eq!(code(g.write("/evil", "x").await), Some(ErrorCode::EACCES));
    // Its own home is its own, relative paths included.
    g.write("device/vbd/51712/state", "1").await.unwrap();
    assert_eq!(
        c.read_string("/local/domain/5/device/vbd/51712/state")
            .await
            .unwrap(),
        "1"
    );
    let perms = c
        .get_perms("/local/domain/5/device/vbd/51712/state")
        .await
        .unwrap();
    assert_eq!(perms[0].domid, D5, "the guest owns what it created");
    // And the privileged-only operations are refused.
    assert_eq!(
        code(g.introduce(DomId(9), 1, 1).await),
        Some(ErrorCode::EACCES)
    );
    assert_eq!(code(g.control(&["check"]).await), Some(ErrorCode::EACCES));
}

#[tokio::test]
async fn a_grant_lets_the_frontend_domain_read_the_backend_dir() {
    let server = Server::default();
    server.introduce(D5);
    let c = dom0(&server);
    let be = "/local/domain/0/backend/vbd/5/51712";
    c.transaction(|tx| async move {
        tx.write(&format!("{be}/state"), "1").await?;
        tx.set_perms(
            be,
            &[Perm::new(Access::None, 0), Perm::new(Access::Read, 5)],
        )
        .await?;
        tx.set_perms(
            &format!("{be}/state"),
            &[Perm::new(Access::None, 0), Perm::new(Access::Read, 5)],
        )
        .await
    })
    .await
    .unwrap();
    let g = guest(&server, D5);
    assert_eq!(g.read_string(&format!("{be}/state")).await.unwrap(), "1");
    assert_eq!(
        code(g.write(&format!("{be}/state"), "6").await),
        Some(ErrorCode::EACCES)
    );
    assert_eq!(
        code(guest(&server, DomId(6)).read(&format!("{be}/state")).await),
        Some(ErrorCode::EACCES),
        "another guest is not granted"
    );
}

#[tokio::test]
async fn relative_watch_reports_relative_paths_and_skips_unreadable_nodes() {
    let server = Server::default();
    server.introduce(D5);
    let c = dom0(&server);
    make_home(&c, D5).await;
    let g = guest(&server, D5);
    let mut w = g.watch("device").await.unwrap();
    assert_eq!(w.next().await.unwrap().path, "device");
    c.write("/local/domain/5/device/vbd/1/state", "3")
        .await
        .unwrap();
    assert_eq!(within(w.next()).await.unwrap().path, "device/vbd/1/state");
    // A node the guest cannot read fires no event for it.
    let mut all = g.watch("/").await.unwrap();
    assert_eq!(all.next().await.unwrap().path, "/");
    c.write("/private", "x").await.unwrap();
    c.write("/local/domain/5/device/x", "y").await.unwrap();
    assert_eq!(
        within(all.next()).await.unwrap().path,
        "/local/domain/5/device/x"
    );
}

#[tokio::test]
async fn introduce_and_release_fire_special_watches_and_close_the_domain() {
    let server = Server::default();
    let c = dom0(&server);
    let mut intro = c.watch("@introduceDomain").await.unwrap();
    let mut rel = c.watch("@releaseDomain").await.unwrap();
    assert_eq!(intro.next().await.unwrap().path, "@introduceDomain");
    assert_eq!(rel.next().await.unwrap().path, "@releaseDomain");
    assert!(!c.is_domain_introduced(DomId(3)).await.unwrap());
    c.introduce(DomId(3), 1234, 7).await.unwrap();
    assert_eq!(within(intro.next()).await.unwrap().path, "@introduceDomain");
    assert!(c.is_domain_introduced(DomId(3)).await.unwrap());
    make_home(&c, DomId(3)).await;

    // A separate process would do this over the socket: become domain 3.
    let g = dom0(&server);
    g.control(&[xenstore::server::SIM_AS_DOMAIN, "3"])
        .await
        .unwrap();
    g.write("data/x", "1").await.unwrap();
    assert_eq!(
        code(g.read("/tool/xenstored").await),
        Some(ErrorCode::EACCES)
    );

    c.release(DomId(3)).await.unwrap();
    assert_eq!(within(rel.next()).await.unwrap().path, "@releaseDomain");
    assert!(!c.is_domain_introduced(DomId(3)).await.unwrap());
    // The released domain's connection is gone.
    assert!(matches!(
        within(g.read("data/x")).await,
        Err(xenstore::Error::Disconnected(_))
    ));
    // A domain may not become one that was not introduced.
    let h = dom0(&server);
    assert_eq!(
        code(h.control(&[xenstore::server::SIM_AS_DOMAIN, "3"]).await),
        Some(ErrorCode::ENOENT)
    );
    assert_eq!(code(c.release(DomId(3)).await), Some(ErrorCode::ENOENT));
    assert_eq!(code(c.release(DomId(0)).await), Some(ErrorCode::EINVAL));
}

#[tokio::test]
async fn guest_quotas_are_answered_with_xenstoreds_errors() {
    let server = Server::new(Quotas {
        nodes_per_domain: 20,
        value_size: 100,
        watches_per_connection: 3,
        transactions_per_connection: 2,
        perms_per_node: 2,
        ..Quotas::default()
    });
    server.introduce(D5);
    let c = dom0(&server);
    make_home(&c, D5).await;
    let g = guest(&server, D5);
    assert_eq!(
        code(g.write("big", [b'x'; 101]).await),
        Some(ErrorCode::ENOSPC)
    );
    g.write("ok", [b'x'; 100]).await.unwrap();
    let mut hit = None;
    for i in 0..30 {
        if let Err(e) = g.write(&format!("n{i}"), "").await {
            hit = Some((i, e.code()));
            break;
        }
    }
    // home + "ok" + 18 more = 20 nodes.
    assert_eq!(hit, Some((18, Some(ErrorCode::ENOSPC))));
    let mut ws = Vec::new();
    for i in 0..3 {
        ws.push(g.watch(&format!("w{i}")).await.unwrap());
    }
    assert_eq!(code(g.watch("w3").await), Some(ErrorCode::E2BIG));
    for _ in 0..2 {
        g.request(Op::TransactionStart, 0, b"\0".to_vec())
            .await
            .unwrap();
    }
    assert_eq!(
        code(g.request(Op::TransactionStart, 0, b"\0".to_vec()).await),
        Some(ErrorCode::ENOSPC)
    );
    assert_eq!(
        code(
            g.set_perms(
                "ok",
                &[
                    Perm::new(Access::None, 5),
                    Perm::new(Access::Read, 1),
                    Perm::new(Access::Read, 2)
                ]
            )
            .await
        ),
        Some(ErrorCode::ENOSPC)
    );
    // Dom0 is not bound by guest quotas.
    c.write("/dom0/big", [b'y'; 3000]).await.unwrap();
}

#[tokio::test]
async fn a_client_that_disconnects_mid_transaction_leaves_nothing_behind() {
    let server = Server::default();
    let c = dom0(&server);
    {
        let g = dom0(&server);
        let m = g
            .request(Op::TransactionStart, 0, b"\0".to_vec())
            .await
            .unwrap();
        let tx: u32 = wire::one_arg(&m.payload).unwrap().parse().unwrap();
        g.request(Op::Write, tx, wire::payload(&[b"/half"], b"done"))
            .await
            .unwrap();
    } // dropped: the connection closes with the transaction open
    within(async {
        while server.connections() > 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(code(c.read("/half").await), Some(ErrorCode::ENOENT));
    c.write("/after", "ok").await.unwrap();
}

/// Sends raw bytes and reads back one message.
async fn raw_exchange(s: &mut UnixStream, bytes: &[u8]) -> Message {
    s.write_all(bytes).await.unwrap();
    let mut head = [0u8; HEADER_LEN];
    within(s.read_exact(&mut head)).await.unwrap();
    let h = Header::from_bytes(&head);
    let mut payload = vec![0u8; h.len as usize];
    within(s.read_exact(&mut payload)).await.unwrap();
    Message {
        ty: h.ty,
        req_id: h.req_id,
        tx_id: h.tx_id,
        payload,
    }
}

fn error_name(m: &Message) -> Option<ErrorCode> {
    m.error_code().and_then(Result::ok)
}

#[tokio::test]
async fn malformed_requests_get_xenstoreds_answers() {
    let server = Server::default();
    let mut s = server.connect_as(DomId::DOM0).unwrap();
    let unknown = Message {
        ty: 99,
        req_id: 1,
        tx_id: 0,
        payload: vec![],
    };
    let m = raw_exchange(&mut s, &unknown.encode()).await;
    assert_eq!((m.req_id, error_name(&m)), (1, Some(ErrorCode::ENOSYS)));
    let restrict = Message {
        ty: 20,
        req_id: 2,
        tx_id: 0,
        payload: b"5\0".to_vec(),
    };
    let m = raw_exchange(&mut s, &restrict.encode()).await;
    assert_eq!(
        error_name(&m),
        Some(ErrorCode::ENOSYS),
        "XS_RESTRICT is gone"
    );
    let no_nul = Message::new(Op::Read, 3, 0, b"/tool".to_vec());
    assert_eq!(
        error_name(&raw_exchange(&mut s, &no_nul.encode()).await),
        Some(ErrorCode::EINVAL)
    );
    let bad_path = Message::new(Op::Mkdir, 4, 0, b"/a//b\0".to_vec());
    assert_eq!(
        error_name(&raw_exchange(&mut s, &bad_path.encode()).await),
        Some(ErrorCode::EINVAL)
    );
    let bad_tx = Message::new(Op::Read, 5, 777, b"/tool\0".to_vec());
    let m = raw_exchange(&mut s, &bad_tx.encode()).await;
    assert_eq!((m.tx_id, error_name(&m)), (777, Some(ErrorCode::ENOENT)));
    let bad_perm = Message::new(Op::SetPerms, 6, 0, b"/tool\0x1\0".to_vec());
    assert_eq!(
        error_name(&raw_exchange(&mut s, &bad_perm.encode()).await),
        Some(ErrorCode::EINVAL)
    );
    let ok = Message::new(Op::Read, 7, 0, b"/tool\0".to_vec());
    let m = raw_exchange(&mut s, &ok.encode()).await;
    assert_eq!((m.ty, m.req_id), (Op::Read as u32, 7));
}

#[tokio::test]
async fn an_oversized_message_drops_only_that_connection() {
    let server = Server::default();
    let c = dom0(&server);
    let mut bad = server.connect_as(DomId::DOM0).unwrap();
    let h = Header {
        ty: Op::Write as u32,
        req_id: 1,
        tx_id: 0,
        len: 5000,
    };
    bad.write_all(&h.to_bytes()).await.unwrap();
    let mut b = [0u8; 1];
    assert_eq!(within(bad.read(&mut b)).await.unwrap(), 0, "closed");
    c.write("/still/here", "yes").await.unwrap();
    assert_eq!(c.read_string("/still/here").await.unwrap(), "yes");
}

#[tokio::test]
async fn a_connection_that_never_reads_is_dropped_before_it_pins_memory() {
    let server = Server::new(Quotas {
        outstanding_bytes: 64 * 1024,
        ..Quotas::default()
    });
    let c = dom0(&server);
    let mut lazy = server.connect_as(DomId::DOM0).unwrap();
    let watch = Message::new(Op::Watch, 1, 0, b"/spam\0t\0".to_vec());
    raw_exchange(&mut lazy, &watch.encode()).await;
    // It never reads again; the socket buffer fills, then the server's queue.
    let value = vec![b'v'; 3000];
    within(async {
        for i in 0.. {
            c.write(
                &format!("/spam/{}", "k".repeat(1000) + &i.to_string()),
                &value,
            )
            .await
            .unwrap();
            if server.connections() == 1 {
                break;
            }
        }
    })
    .await;
    c.write("/fine", "1").await.unwrap();
}

#[tokio::test]
async fn transaction_closure_gives_up_after_bounded_retries() {
    let server = Server::default();
    let c = dom0(&server);
    c.write("/hot", "0").await.unwrap();
    let other = dom0(&server);
    let r: Result<(), _> = c
        .transaction(|tx| {
            let other = other.clone();
            async move {
                tx.read("/hot").await?;
                other.write("/hot", "changed").await?; // conflict every time
                tx.write("/hot", "mine").await
            }
        })
        .await;
    assert!(
        matches!(r, Err(xenstore::Error::TooManyRetries(20))),
        "{r:?}"
    );
    assert_eq!(c.read_string("/hot").await.unwrap(), "changed");
}

#[tokio::test]
async fn values_are_bytes_not_text() {
    let server = Server::default();
    let c = dom0(&server);
    let v = [0u8, 0xff, 0, b'\n', 0x80];
    c.write("/bin", v).await.unwrap();
    assert_eq!(c.read("/bin").await.unwrap(), v);
    assert!(matches!(
        c.read_string("/bin").await,
        Err(xenstore::Error::NotUtf8 { .. })
    ));
}

#[tokio::test]
async fn dropping_a_watch_unregisters_it_on_the_server() {
    let server = Server::default();
    let c = dom0(&server);
    let w = c.watch("/w").await.unwrap();
    let token = w.token().to_owned();
    drop(w);
    // UNWATCH goes out in the background; once it has, a second UNWATCH fails.
    within(async {
        loop {
            let p = wire::payload(&[b"/w", token.as_bytes()], b"");
            if code(c.request(Op::Unwatch, 0, p).await) == Some(ErrorCode::ENOENT) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}
