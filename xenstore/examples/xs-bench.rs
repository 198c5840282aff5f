//! Xenstore throughput through the client against the embedded server, over a
//! real unix socket: small reads, writes, transactions and watch fires per
//! second, one request in flight versus many. Figures are printed, not judged:
//! run with `cargo run --release -p xenstore --example xs-bench`.

use std::time::{Duration, Instant};

use xenstore::{Client, Endpoint, Server, Xs};

const OPS: usize = 20_000;
const ROUNDS: usize = 3;

async fn client(ep: &Endpoint) -> Client {
    Client::connect_to(ep).await.expect("connect")
}

/// Runs `ops` operations with `depth` in flight; returns operations per second.
async fn rate<F, Fut>(ops: usize, depth: usize, f: F) -> f64
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for lane in 0..depth {
        let f = f.clone();
        set.spawn(async move {
            let mut i = lane;
            while i < ops {
                f(i).await;
                i += depth;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("worker");
    }
    ops as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::default();
    let listening = server
        .listen(dir.path().join("xs.sock"))
        .await
        .expect("listen");
    let ep = Endpoint::Socket(listening.path().to_path_buf());
    let c = client(&ep).await;
    for i in 0..1000 {
        c.write(&format!("/bench/r/{i}"), b"0123456789")
            .await
            .unwrap();
    }
    // One directory per device, as backend/vbd/<domid>/<devid> is: transactions
    // update existing nodes of their own device, so they do not conflict.
    for lane in 0..64 {
        for k in ["a", "b"] {
            c.write(&format!("/bench/t/{lane}/{k}"), b"0")
                .await
                .unwrap();
        }
    }

    let mut rows: Vec<(&str, Vec<f64>, Vec<f64>)> = vec![
        ("read 10 B", vec![], vec![]),
        ("write 10 B", vec![], vec![]),
        ("transaction (2 updates)", vec![], vec![]),
    ];
    let mut fires = Vec::new();
    for round in 0..ROUNDS {
        for (row, depth_idx) in [(0usize, 0usize), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)] {
            let depth = if depth_idx == 0 { 1 } else { 64 };
            let c = c.clone();
            let ops = if row == 2 { OPS / 4 } else { OPS };
            let r = match row {
                0 => {
                    rate(ops, depth, move |i| {
                        let c = c.clone();
                        async move {
                            c.read(&format!("/bench/r/{}", i % 1000)).await.unwrap();
                        }
                    })
                    .await
                }
                1 => {
                    rate(ops, depth, move |i| {
                        let c = c.clone();
                        async move {
                            c.write(&format!("/bench/w/{round}/{}", i % 4096), b"0123456789")
                                .await
                                .unwrap();
                        }
                    })
                    .await
                }
                _ => {
                    rate(ops, depth, move |i| {
                        let c = c.clone();
                        async move {
                            c.transaction(|tx| async move {
                                let dev = i % depth;
                                tx.write(&format!("/bench/t/{dev}/a"), b"1").await?;
                                tx.write(&format!("/bench/t/{dev}/b"), b"2").await
                            })
                            .await
                            .unwrap();
                        }
                    })
                    .await
                }
            };
            if depth_idx == 0 {
                rows[row].1.push(r);
            } else {
                rows[row].2.push(r);
            }
        }
        // Watch fires: a second connection writes under a watched node with 64
        // writes in flight; time until the watcher has every event.
        let watcher = client(&ep).await;
        let base = format!("/bench/watch/{round}");
        watcher.mkdir(&base).await.unwrap();
        let mut w = watcher.watch(&base).await.unwrap();
        w.next().await.unwrap();
        let writer = client(&ep).await;
        let start = Instant::now();
        let b2 = base.clone();
        let writes = tokio::spawn(rate(OPS, 64, move |i| {
            let (writer, b2) = (writer.clone(), b2.clone());
            async move {
                writer.write(&format!("{b2}/{i}"), b"x").await.unwrap();
            }
        }));
        // Every event, or the one a collapsed (bounded) queue stands for.
        for _ in 0..OPS {
            let ev = tokio::time::timeout(Duration::from_secs(60), w.next())
                .await
                .expect("watch event")
                .expect("stream");
            if ev.path == base {
                break;
            }
        }
        fires.push(OPS as f64 / start.elapsed().as_secs_f64());
        writes.await.unwrap();
        c.rm(&base).await.unwrap();
    }

    println!("xenstore client <-> embedded server over a unix socket, {ROUNDS} rounds, median");
    println!(
        "{:<24} {:>14} {:>16} {:>8}",
        "operation", "depth 1 op/s", "depth 64 op/s", "ratio"
    );
    for (name, d1, d64) in rows {
        let (a, b) = (median(d1), median(d64));
        println!("{name:<24} {a:>14.0} {b:>16.0} {:>7.2}x", b / a);
    }
    println!(
        "{:<24} {:>14} {:>16.0}",
        "watch fires (64 writers)",
        "-",
        median(fires)
    );
}
