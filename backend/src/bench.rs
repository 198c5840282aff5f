//! `blkbackd bench`: the serving path against the raw limit, side by side.
//!
//! For each workload, in the page cache and with `O_DIRECT`, it runs a
//! simulated blkfront (a separate process, as a guest is) against the real
//! serving path on a real file, and a raw io_uring baseline issuing the same
//! request sizes at the same depth directly on the same file. Runs are
//! interleaved and repeated; medians are printed with the ratio, the
//! backend's CPU time per I/O and its notifications per I/O. Figures, never a
//! pass/fail: these machines are shared and noisy, so only ratios measured in
//! one run are meaningful.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use xenstore::DomId;

use crate::io::engine::EngineChoice;
use crate::io::uring::raw_baseline;
use crate::io::FileDisk;
use crate::sim::guest::BenchSpec;
use crate::sim::world::SimWorld;
use crate::vbd::queue::{pool_pages, DEFAULT_POOL_BYTES};
use crate::vbd::Offer;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Working directory (a fresh one under /var/tmp by default; it must be
    /// on a real file system for `O_DIRECT`).
    pub dir: Option<PathBuf>,
    /// Seconds per run.
    pub seconds: f64,
    /// Repetitions (the median is quoted).
    pub reps: usize,
    /// Size of the disk file in MiB.
    pub size_mib: u64,
    /// The I/O engine of the serving path.
    pub engine: EngineChoice,
    /// The blkbackd binary for the guest processes.
    pub exe: PathBuf,
}

const WORKLOADS: [(&str, &str); 5] = [
    ("4k randread qd1", "randread:4096:1"),
    ("4k randread qd32", "randread:4096:32"),
    ("4k randwrite qd32", "randwrite:4096:32"),
    ("128k read qd8", "read:131072:8"),
    ("128k write qd8", "write:131072:8"),
];

/// One measurement of the serving path.
#[derive(Clone, Copy, Debug, Default)]
struct Served {
    rate: f64,
    cpu_us_per_io: f64,
    notifications_per_io: f64,
}

/// This process's user + system CPU seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ')'.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    (ticks(11) + ticks(12)) / 100.0
}

/// A `/proc/self/status` field in KiB.
fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn make_disk(path: &Path, mib: u64) -> anyhow::Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 7 + 3) as u8).collect();
    for _ in 0..mib {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    Ok(())
}

fn rate(spec: &BenchSpec, ops: u64, secs: f64) -> f64 {
    if spec.bs >= 65536 {
        ops as f64 * f64::from(spec.bs) / secs / 1e6 // MB/s
    } else {
        ops as f64 / secs // IOPS
    }
}

struct Bench {
    world: SimWorld,
    img: PathBuf,
    exe: PathBuf,
    engine: EngineChoice,
    next_domid: u16,
}

impl Bench {
    async fn served(
        &mut self,
        spec: &BenchSpec,
        text: &str,
        direct: bool,
    ) -> anyhow::Result<Served> {
        self.next_domid += 1;
        let domid = DomId(self.next_domid);
        let disk = Arc::new(FileDisk::open_file(&self.img, false)?);
        let offer = Offer {
            engine: self.engine,
            direct_io: direct,
            ..Offer::default()
        };
        let b = self
            .world
            .serve_with(domid, 51712, "bench", disk, offer)
            .await?;
        let cpu0 = cpu_seconds();
        let out = self
            .world
            .guest_command(&self.exe, domid, "bench")
            .arg("--bench")
            .arg(text)
            .env("RUST_LOG", "warn")
            .output()
            .await
            .context("running the guest")?;
        let cpu1 = cpu_seconds();
        let ends = tokio::time::timeout(Duration::from_secs(30), b.finish())
            .await
            .context("the backend did not stop")??;
        self.world.destroy_domain(domid);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.contains("BENCH "))
            .with_context(|| {
                format!(
                    "the guest reported no figures: {stdout}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        let field = |k: &str| -> f64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        let (ops, secs) = (field("ops="), field("secs="));
        let notifications: u64 = ends.iter().map(|(_, s)| s.notifications).sum();
        let errors: u64 = ends.iter().map(|(_, s)| s.errors).sum();
        anyhow::ensure!(errors == 0, "{errors} requests failed during the bench");
        anyhow::ensure!(ops > 0.0, "the guest completed no request");
        Ok(Served {
            rate: rate(spec, ops as u64, secs),
            cpu_us_per_io: (cpu1 - cpu0) * 1e6 / ops,
            notifications_per_io: notifications as f64 / ops,
        })
    }
}

/// Runs the benchmark and prints the table.
pub async fn run(opts: BenchOptions) -> anyhow::Result<()> {
    // Removed at the end unless the caller named the directory.
    let temp;
    let dir = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("blkbackd-bench-")
                .tempdir_in("/var/tmp")?;
            temp.path().to_owned()
        }
    };
    let img = dir.join("disk.img");
    println!(
        "blkbackd bench: {} MiB file in {}, {} s per run, {} repetitions, engine {:?}",
        opts.size_mib,
        dir.display(),
        opts.seconds,
        opts.reps,
        opts.engine
    );
    make_disk(&img, opts.size_mib)?;
    let mut bench = Bench {
        world: SimWorld::start(&dir.join("xen")).await?,
        img: img.clone(),
        exe: opts.exe.clone(),
        engine: opts.engine,
        next_domid: 0,
    };
    let rss0 = status_kib("VmRSS:");
    let mut rows = Vec::new();
    for (cache, direct) in [("page cache", false), ("O_DIRECT", true)] {
        for (name, w) in WORKLOADS {
            let text = format!("{w}:{}", opts.seconds);
            let spec: BenchSpec = text.parse().map_err(anyhow::Error::msg)?;
            let (mut raw, mut ours, mut cpu, mut notif) = (vec![], vec![], vec![], vec![]);
            for _ in 0..opts.reps {
                let r = raw_baseline(&img, direct, &spec)
                    .with_context(|| format!("raw io_uring baseline of {name}"))?;
                raw.push(rate(&spec, r.ops, r.secs));
                let s = bench.served(&spec, &text, direct).await?;
                ours.push(s.rate);
                cpu.push(s.cpu_us_per_io);
                notif.push(s.notifications_per_io);
            }
            let (raw, ours) = (median(&mut raw), median(&mut ours));
            let unit = if spec.bs >= 65536 { "MB/s" } else { "IOPS" };
            let row = format!(
                "{name:<18} {cache:<10} {raw:>10.0} {ours:>10.0} {unit:<4} {:>6.2} {:>9.1} {:>8.3}",
                ours / raw,
                median(&mut cpu),
                median(&mut notif),
            );
            println!("{row}");
            rows.push(row);
        }
    }
    let hwm = status_kib("VmHWM:");
    println!();
    println!(
        "{:<18} {:<10} {:>10} {:>10} {:<4} {:>6} {:>9} {:>8}",
        "workload", "cache", "raw", "blkbackd", "unit", "ratio", "cpu-us/io", "notif/io"
    );
    for r in &rows {
        println!("{r}");
    }
    println!();
    println!(
        "memory: bench process peak RSS {} MiB (backend, embedded Xenstore, the baseline's \
         buffers; {} MiB at the start); per ring the bounce pool is at most {} MiB \
         ({} pages with 256 indirect segments), plus at most 1056 persistent-grant mappings \
         of guest pages",
        hwm / 1024,
        rss0 / 1024,
        DEFAULT_POOL_BYTES >> 20,
        pool_pages(DEFAULT_POOL_BYTES, 256),
    );
    println!(
        "cpu-us/io is the backend's (this process's) CPU per guest I/O; the guest runs in \
         its own process on the same cores"
    );
    Ok(())
}
