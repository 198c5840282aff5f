//! Debian's own Xenstore clients (package `xenstore-utils`, libxenstore inside)
//! against the embedded server, pointed at it with `XENSTORED_PATH`.

#[path = "../../backend/tests/common/tier.rs"]
mod tier;
use std::path::Path;
use std::process::Output;
use std::time::Duration;
use tier::Tier;

use tokio::process::Command;
use xenstore::{Access, Client, DomId, Perm, Server, Xs};

struct Fixture {
    _dir: tempfile::TempDir,
    listening: xenstore::server::Listening,
    server: Server,
}

async fn fixture() -> Fixture {
    for tool in [
        "xenstore-write",
        "xenstore-read",
        "xenstore-ls",
        "xenstore-watch",
    ] {
        assert!(
            Path::new("/usr/bin").join(tool).exists(),
            "{tool} is missing: install Debian's xenstore-utils (the README test command does)"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::default();
    let listening = server.listen(dir.path().join("xs.sock")).await.unwrap();
    Fixture {
        _dir: dir,
        listening,
        server,
    }
}

impl Fixture {
    async fn run(&self, tool: &str, args: &[&str]) -> Output {
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            Command::new(tool)
                .args(args)
                .env("XENSTORED_PATH", self.listening.path())
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("{tool} {args:?} hung"))
        .unwrap();
        out
    }

    async fn ok(&self, tool: &str, args: &[&str]) -> String {
        let out = self.run(tool, args).await;
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    async fn client(&self) -> Client {
        Client::connect_to(&xenstore::Endpoint::Socket(self.listening.path().into()))
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_pair_xenstore_write_is_one_transaction() {
    if !tier::need(Tier::Tool(&["xenstore-read"])) {
        return;
    }
    let f = fixture().await;
    let before = f.server.transactions_committed();
    f.ok(
        "xenstore-write",
        &["/vm/a", "1", "/vm/b", "two words", "/vm/c/d", "3"],
    )
    .await;
    assert_eq!(f.server.transactions_committed(), before + 1);
    let c = f.client().await;
    assert_eq!(c.read_string("/vm/b").await.unwrap(), "two words");
    assert_eq!(c.read_string("/vm/c/d").await.unwrap(), "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_list_ls_exists_and_rm_behave_as_with_xenstored() {
    if !tier::need(Tier::Tool(&["xenstore-read"])) {
        return;
    }
    let f = fixture().await;
    let c = f.client().await;
    c.write("/t/x", "hello").await.unwrap();
    c.write("/t/y/z", "").await.unwrap();
    assert_eq!(f.ok("xenstore-read", &["/t/x"]).await, "hello\n");
    assert_eq!(f.ok("xenstore-list", &["/t"]).await, "x\ny\n");
    assert_eq!(
        f.ok("xenstore-ls", &["-f", "/t"]).await,
        "/t/x = \"hello\"\n/t/y = \"\"\n/t/y/z = \"\"\n"
    );
    assert!(f.run("xenstore-exists", &["/t/x"]).await.status.success());
    assert!(!f
        .run("xenstore-exists", &["/t/nope"])
        .await
        .status
        .success());
    let missing = f.run("xenstore-read", &["/t/nope"]).await;
    assert!(!missing.status.success());
    f.ok("xenstore-rm", &["/t/y"]).await;
    assert!(c.try_read("/t/y/z").await.unwrap().is_none());
    assert_eq!(f.ok("xenstore-list", &["/t"]).await, "x\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chmod_and_ls_p_show_the_permissions_we_store() {
    if !tier::need(Tier::Tool(&["xenstore-read"])) {
        return;
    }
    let f = fixture().await;
    let c = f.client().await;
    c.write("/p/node", "v").await.unwrap();
    f.ok("xenstore-chmod", &["/p/node", "n0", "r5", "b7"]).await;
    assert_eq!(
        c.get_perms("/p/node").await.unwrap(),
        vec![
            Perm::new(Access::None, 0),
            Perm::new(Access::Read, 5),
            Perm::new(Access::Both, 7)
        ]
    );
    let ls = f.ok("xenstore-ls", &["-fp", "/p"]).await;
    assert_eq!(ls, "/p/node = \"v\"   (n0,r5,b7)\n");
    // And what it means: domain 5 may read, domain 6 may not.
    f.server.introduce(DomId(5));
    let g = Client::from_stream(f.server.connect_as(DomId(5)).unwrap());
    assert_eq!(g.read_string("/p/node").await.unwrap(), "v");
    let h = Client::from_stream(f.server.connect_as(DomId(6)).unwrap());
    assert!(h.read("/p/node").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xenstore_watch_sees_the_initial_event_and_changes() {
    if !tier::need(Tier::Tool(&["xenstore-read"])) {
        return;
    }
    let f = fixture().await;
    let c = f.client().await;
    c.mkdir("/w").await.unwrap();
    let watch = Command::new("xenstore-watch")
        .args(["-n", "3", "/w"])
        .env("XENSTORED_PATH", f.listening.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Give it time to register, then make two changes.
    let mut seen_watch = false;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if f.server.connections() >= 2 {
            seen_watch = true;
            break;
        }
    }
    assert!(seen_watch, "xenstore-watch never connected");
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.write("/w/one", "1").await.unwrap();
    c.write("/w/two", "2").await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(20), watch.wait_with_output())
        .await
        .expect("xenstore-watch did not exit after 3 events")
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "/w\n/w/one\n/w/two\n"
    );
}
