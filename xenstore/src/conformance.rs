//! A behaviour check for any Xenstore, run from a dom0 connection.
//!
//! The same checks run in the test suite against the embedded server and, in the
//! VM tests, against the real C xenstored (`blkbackd xenstore-check`), so the two
//! are held to one set of expectations. Everything happens below a scratch node
//! that is removed afterwards.

use std::time::Duration;

use crate::client::{Client, Error, Result, Watch, Xs};
use crate::wire::{Access, DomId, ErrorCode, Perm};

/// The outcome of one check.
#[derive(Debug)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// `Ok` or what went wrong.
    pub outcome: std::result::Result<(), String>,
}

/// Runs every check below `/<scratch>` and returns their outcomes.
pub async fn run(c: &Client, scratch: &str) -> Vec<Check> {
    let base = format!("/{scratch}");
    let mut out = Vec::new();
    macro_rules! check {
        ($name:literal, $body:expr) => {
            let outcome = tokio::time::timeout(Duration::from_secs(20), $body)
                .await
                .map_err(|_| "timed out".to_string())
                .and_then(|r: Result<(), String>| r);
            out.push(Check {
                name: $name,
                outcome,
            });
        };
    }
    let _ = c.rm(&base).await;
    check!("write and read back bytes", rw(c, &base));
    check!("missing nodes and bad paths", errors(c, &base));
    check!("directory and rm", dirs(c, &base));
    check!("long directory via DIRECTORY_PART", long_dir(c, &base));
    check!("permissions round trip", perms(c, &base));
    check!(
        "watch fires at once, on change, on removal",
        watches(c, &base)
    );
    check!("transaction commits atomically", tx_commit(c, &base));
    check!(
        "conflicting transaction answers EAGAIN",
        tx_conflict(c, &base)
    );
    check!(
        "transaction closure retried after conflict",
        tx_retry(c, &base)
    );
    check!("domain path", domain_path(c));
    let _ = c.rm(&base).await;
    out
}

fn expect(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

fn e(err: Error) -> String {
    err.to_string()
}

fn code(r: Result<impl std::fmt::Debug>) -> Option<ErrorCode> {
    r.err().and_then(|e| e.code())
}

async fn rw(c: &Client, base: &str) -> Result<(), String> {
    let p = format!("{base}/rw/value");
    let bytes: Vec<u8> = (0..=255u8).collect();
    c.write(&p, &bytes).await.map_err(e)?;
    let got = c.read(&p).await.map_err(e)?;
    expect(got == bytes, || {
        format!("read back {} bytes differently", got.len())
    })?;
    c.write(&p, b"").await.map_err(e)?;
    expect(c.read(&p).await.map_err(e)?.is_empty(), || {
        "empty value".into()
    })
}

async fn errors(c: &Client, base: &str) -> Result<(), String> {
    let got = code(c.read(&format!("{base}/nope")).await);
    expect(got == Some(ErrorCode::ENOENT), || {
        format!("read missing: {got:?}")
    })?;
    for bad in ["/a//b", "/trailing/", "/sp ace", "/dot.dot"] {
        let got = code(c.write(bad, b"x").await);
        expect(got == Some(ErrorCode::EINVAL), || {
            format!("write {bad:?}: {got:?}")
        })?;
    }
    let got = code(c.rm(&format!("{base}/no/such/parent")).await);
    expect(got == Some(ErrorCode::ENOENT), || {
        format!("rm under missing parent: {got:?}")
    })?;
    c.mkdir(&format!("{base}/e")).await.map_err(e)?;
    c.rm(&format!("{base}/e/missing")).await.map_err(e)
}

async fn dirs(c: &Client, base: &str) -> Result<(), String> {
    let d = format!("{base}/dir");
    for k in ["b", "a", "c"] {
        c.write(&format!("{d}/{k}/leaf"), k).await.map_err(e)?;
    }
    let mut names = c.directory(&d).await.map_err(e)?;
    names.sort();
    expect(names == ["a", "b", "c"], || format!("children {names:?}"))?;
    c.rm(&format!("{d}/b")).await.map_err(e)?;
    let got = code(c.read(&format!("{d}/b/leaf")).await);
    expect(got == Some(ErrorCode::ENOENT), || {
        format!("removed leaf: {got:?}")
    })?;
    c.mkdir(&format!("{d}/a")).await.map_err(e)?;
    let v = c.read(&format!("{d}/a/leaf")).await.map_err(e)?;
    expect(v == b"a", || "mkdir of an existing node changed it".into())
}

async fn long_dir(c: &Client, base: &str) -> Result<(), String> {
    let d = format!("{base}/long");
    let want: Vec<String> = (0..400).map(|i| format!("entry-number-{i:04}")).collect();
    c.transaction(|tx| {
        let (d, want) = (d.clone(), want.clone());
        async move {
            for n in &want {
                tx.mkdir(&format!("{d}/{n}")).await?;
            }
            Ok(())
        }
    })
    .await
    .map_err(e)?;
    let mut got = c.directory(&d).await.map_err(e)?;
    got.sort();
    expect(got == want, || {
        format!("{} of {} children", got.len(), want.len())
    })
}

async fn perms(c: &Client, base: &str) -> Result<(), String> {
    let p = format!("{base}/perm");
    c.write(&p, b"x").await.map_err(e)?;
    let want = vec![
        Perm::new(Access::None, 0),
        Perm::new(Access::Read, 5),
        Perm::new(Access::Both, 7),
    ];
    c.set_perms(&p, &want).await.map_err(e)?;
    let got = c.get_perms(&p).await.map_err(e)?;
    expect(got == want, || format!("perms {got:?}"))?;
    c.write(&format!("{p}/child"), b"").await.map_err(e)?;
    let got = c.get_perms(&format!("{p}/child")).await.map_err(e)?;
    expect(got == want, || format!("child did not inherit: {got:?}"))
}

async fn next(w: &mut Watch) -> Result<String, String> {
    match tokio::time::timeout(Duration::from_secs(5), w.next()).await {
        Ok(Some(ev)) => Ok(ev.path),
        Ok(None) => Err("watch stream ended".into()),
        Err(_) => Err("no watch event within 5 s".into()),
    }
}

async fn watches(c: &Client, base: &str) -> Result<(), String> {
    let p = format!("{base}/watched");
    c.mkdir(&p).await.map_err(e)?;
    let mut w = c.watch(&p).await.map_err(e)?;
    let first = next(&mut w).await?;
    expect(first == p, || format!("initial event {first:?}"))?;
    c.write(&format!("{p}/k"), b"1").await.map_err(e)?;
    let ev = next(&mut w).await?;
    expect(ev == format!("{p}/k"), || format!("change event {ev:?}"))?;
    c.rm(&p).await.map_err(e)?;
    let ev = next(&mut w).await?;
    expect(ev == p, || format!("removal event {ev:?}"))
}

async fn tx_commit(c: &Client, base: &str) -> Result<(), String> {
    let p = format!("{base}/tx");
    let mut w = c.watch(&p).await.map_err(e)?;
    next(&mut w).await?;
    c.transaction(|tx| {
        let p = p.clone();
        async move {
            tx.write(&format!("{p}/a"), "1").await?;
            tx.write(&format!("{p}/b"), "2").await?;
            // Inside the transaction its own writes are visible ...
            Ok(tx.read(&format!("{p}/a")).await? == b"1")
        }
    })
    .await
    .map_err(e)
    .and_then(|own| expect(own, || "a transaction did not see its own write".into()))?;
    let a = c.read(&format!("{p}/a")).await.map_err(e)?;
    let b = c.read(&format!("{p}/b")).await.map_err(e)?;
    expect(a == b"1" && b == b"2", || "committed values".into())?;
    // ... and the commit fires the watch.
    let ev = next(&mut w).await?;
    expect(ev.starts_with(&p), || format!("commit event {ev:?}"))
}

async fn tx_conflict(c: &Client, base: &str) -> Result<(), String> {
    let p = format!("{base}/conflict");
    c.write(&p, b"0").await.map_err(e)?;
    let start = |c: Client| async move {
        let m = c
            .request(crate::Op::TransactionStart, 0, b"\0".to_vec())
            .await?;
        let id: u32 = crate::wire::one_arg(&m.payload)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok::<u32, Error>(id)
    };
    let t1 = start(c.clone()).await.map_err(e)?;
    let read = crate::wire::payload(&[p.as_bytes()], b"");
    c.request(crate::Op::Read, t1, read).await.map_err(e)?;
    // Another writer changes the node the transaction read.
    c.write(&p, b"other").await.map_err(e)?;
    let w = crate::wire::payload(&[p.as_bytes()], b"mine");
    c.request(crate::Op::Write, t1, w).await.map_err(e)?;
    let end = c
        .request(crate::Op::TransactionEnd, t1, b"T\0".to_vec())
        .await;
    let got = code(end);
    expect(got == Some(ErrorCode::EAGAIN), || {
        format!("commit answered {got:?}")
    })?;
    let v = c.read(&p).await.map_err(e)?;
    expect(v == b"other", || {
        "the conflicting commit took effect".into()
    })
}

async fn tx_retry(c: &Client, base: &str) -> Result<(), String> {
    let p = format!("{base}/counter");
    c.write(&p, b"0").await.map_err(e)?;
    let mut attempts = 0u32;
    c.transaction(|tx| {
        attempts += 1;
        let (c, p, first) = (c.clone(), p.clone(), attempts == 1);
        async move {
            let v: u32 = tx.read_string(&p).await?.parse().unwrap_or(0);
            if first {
                c.write(&p, b"10").await?; // force a conflict once
            }
            tx.write(&p, (v + 1).to_string()).await
        }
    })
    .await
    .map_err(e)?;
    let v = c.read_string(&p).await.map_err(e)?;
    expect(attempts == 2 && v == "11", || {
        format!("{attempts} attempts, value {v}")
    })
}

async fn domain_path(c: &Client) -> Result<(), String> {
    let p = c.get_domain_path(DomId(7)).await.map_err(e)?;
    expect(p == "/local/domain/7", || format!("domain path {p:?}"))
}
