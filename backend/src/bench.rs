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
use crate::io::rbd::RbdDisk;
use crate::io::uring::{raw_run, RawJob, RawRun};
use crate::io::{FileDisk, ServedDisk};
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
    /// Adaptive polling's largest window in µs (0: off).
    pub poll_us: u32,
    /// How long the simulated guest polls its rings before it sleeps, in µs.
    pub guest_poll_us: u32,
    /// Disk I/O on the guest's mapped pages (`[io] zero_copy`).
    pub zero_copy: bool,
    /// Run only the workloads whose name contains this (e.g. "128k write").
    pub only: Option<String>,
    /// Instead of a file: this RBD image (`POOL/IMAGE`), against fio's rbd
    /// engine ([`rbd`]).
    pub rbd: Option<String>,
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
    /// The guest process's CPU per I/O (its own report).
    guest_us_per_io: f64,
    notifications_per_io: f64,
    /// Latency p50 and p99 in µs, at depth 1.
    latency: Option<(f64, f64)>,
    /// Time in the backend (taken off the ring to answered), p50 and p99 as
    /// power-of-two bucket bounds in µs.
    in_backend: Option<(u64, u64)>,
}

/// One fio run: the rate and, at depth 1, latency p50 and p99 in µs.
#[derive(Clone, Copy, Debug)]
struct FioRun {
    rate: f64,
    latency: Option<(f64, f64)>,
    /// fio's CPU per I/O in µs: its process's, from start to exit (librbd's
    /// threads, and connecting to the cluster, included).
    cpu_us_per_io: Option<f64>,
}

/// fio with its io_uring engine on the same file and the same job, as a
/// second raw baseline (`None` where fio is not installed or fails).
/// What fio runs on: a file (with io_uring, `O_DIRECT` or not), or an RBD
/// image through its rbd engine (librbd, as blkbackd) as client `NAME`.
enum FioTarget<'a> {
    File(&'a Path, bool),
    Rbd(&'a crate::rbd::Spec, &'a str),
}

fn fio_baseline(target: FioTarget<'_>, spec: &BenchSpec) -> Option<FioRun> {
    let rw = match (spec.write, spec.random) {
        (false, true) => "randread",
        (true, true) => "randwrite",
        (false, false) => "read",
        (true, false) => "write",
    };
    let mut fio = std::process::Command::new("fio");
    fio.arg("--name=blkbackd-bench");
    match target {
        FioTarget::File(img, direct) => fio
            .arg(format!("--filename={}", img.display()))
            .arg("--ioengine=io_uring")
            .arg(format!("--direct={}", u8::from(direct)))
            // fio drops the file's page cache before a job by default: the
            // run after it (blkbackd's) would then start cold against a
            // warm raw loop, and measure the disk's reads, not the cache.
            .arg("--invalidate=0"),
        FioTarget::Rbd(image, client) => fio
            .arg("--ioengine=rbd")
            .arg(format!("--clientname={client}"))
            .arg(format!("--pool={}", image.pool))
            .arg(format!("--rbdname={}", image.image)),
    };
    let cpu0 = crate::sim::guest::children_cpu_seconds();
    let out = fio
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", spec.bs))
        .arg(format!("--iodepth={}", spec.depth))
        .arg(format!("--runtime={}ms", (spec.seconds * 1000.0) as u64))
        .args([
            "--time_based",
            "--norandommap",
            "--randrepeat=0",
            "--lat_percentiles=1",
        ])
        .arg("--output-format=json")
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before its JSON.
    let v: serde_json::Value = serde_json::from_str(&text[text.find('{')?..]).ok()?;
    let side = &v["jobs"][0][if spec.write { "write" } else { "read" }];
    let rate = if spec.bs >= 65536 {
        side["bw_bytes"].as_f64()? / 1e6
    } else {
        side["iops"].as_f64()?
    };
    let pct = |k: &str| {
        side["lat_ns"]["percentile"][k]
            .as_f64()
            .map(|ns| ns / 1000.0)
    };
    let latency = (spec.depth == 1)
        .then(|| Some((pct("50.000000")?, pct("99.000000")?)))
        .flatten();
    // fio's own usr_cpu/sys_cpu are its job thread's alone: librbd's
    // threads are counted here, with the whole process.
    let cpu_us_per_io = side["total_ios"]
        .as_f64()
        .filter(|n| *n > 0.0)
        .map(|ios| (crate::sim::guest::children_cpu_seconds() - cpu0) * 1e6 / ios);
    Some(FioRun {
        rate,
        latency,
        cpu_us_per_io,
    })
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

/// Reads the whole file, so that page-cache runs start from a warm cache.
fn warm(path: &Path) -> anyhow::Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    std::io::copy(&mut f, &mut std::io::sink())?;
    Ok(())
}

/// Writes the file's dirty pages back, so that every page-cache run starts
/// with none (the writes of the run before would otherwise throttle this
/// one's) and with the cache still warm.
fn settle(path: &Path) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_data())
        .with_context(|| format!("writing back {}", path.display()))
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
    /// Serve this RBD image instead of `img`.
    rbd: Option<crate::rbd::Spec>,
    exe: PathBuf,
    engine: EngineChoice,
    poll_us: u32,
    guest_poll_us: u32,
    zero_copy: bool,
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
        // An image is opened (and locked) for the run only, so that fio's
        // client can take its lock in between.
        let disk = Arc::new(match &self.rbd {
            Some(spec) => {
                ServedDisk::Rbd(RbdDisk::new(crate::rbd::Image::open(spec, true, None)?)?)
            }
            None => ServedDisk::File(FileDisk::open_file(&self.img, false)?),
        });
        let offer = Offer {
            engine: self.engine,
            direct_io: direct,
            poll_us: self.poll_us,
            zero_copy: self.zero_copy,
            ..Offer::default()
        };
        let b = self
            .world
            .serve_with(domid, 51712, "bench", disk, offer)
            .await?;
        let cpu0 = crate::sim::guest::cpu_seconds();
        let out = self
            .world
            .guest_command(&self.exe, domid, "bench")
            .arg("--bench")
            .arg(text)
            .arg("--poll-us")
            .arg(self.guest_poll_us.to_string())
            // One submitter, as the baselines (one io_uring loop, one fio
            // job) are, and as fio with one job in a guest submits from one
            // CPU, to one queue: a stream spread over two queues would also
            // reach the disk out of order.
            .args(["--queues", "1"])
            .env("RUST_LOG", "warn")
            .output()
            .await
            .context("running the guest")?;
        let cpu1 = crate::sim::guest::cpu_seconds();
        let ends = tokio::time::timeout(Duration::from_secs(30), b.finish())
            .await
            .context("the backend did not stop")??;
        self.world.destroy_domain(domid);
        let report = GuestReport::of(&out)?;
        let field = |k: &str| report.field(k);
        let line = &report.0;
        let (ops, secs) = (field("ops="), field("secs="));
        let latency = line
            .contains("p50_us=")
            .then(|| (field("p50_us="), field("p99_us=")));
        let notifications: u64 = ends.iter().map(|(_, s)| s.notifications).sum();
        let errors: u64 = ends.iter().map(|(_, s)| s.errors).sum();
        let mut hist = crate::vbd::queue::LatencyHistogram::default();
        for (_, s) in &ends {
            hist.merge(&s.latency.all());
        }
        let in_backend = hist.quantile_us(0.5).zip(hist.quantile_us(0.99));
        anyhow::ensure!(errors == 0, "{errors} requests failed during the bench");
        anyhow::ensure!(ops > 0.0, "the guest completed no request");
        Ok(Served {
            rate: rate(spec, ops as u64, secs),
            cpu_us_per_io: (cpu1 - cpu0) * 1e6 / ops,
            guest_us_per_io: field("cpu_s=") * 1e6 / ops,
            notifications_per_io: notifications as f64 / ops,
            latency,
            in_backend,
        })
    }
}

/// What timing and counting one request costs the serving loop, in ns: the
/// clock reads when it is taken and answered and the count into its
/// operation's histogram, measured over a million of them.
fn histogram_cost_ns() -> f64 {
    use crate::vbd::queue::{Latencies, OpKind};
    const N: u32 = 1_000_000;
    let mut l = Latencies::default();
    let t0 = std::time::Instant::now();
    for i in 0..N {
        let taken = std::time::Instant::now();
        let op = OpKind::ALL[(i & 3) as usize];
        l.get_mut(op).record(std::hint::black_box(taken).elapsed());
    }
    let ns = t0.elapsed().as_nanos() as f64 / f64::from(N);
    std::hint::black_box(&l);
    ns
}

/// A bench guest's `BENCH ops=... secs=...` line.
struct GuestReport(String);

impl GuestReport {
    /// The line from the guest process's output, or why there is none.
    fn of(out: &std::process::Output) -> anyhow::Result<GuestReport> {
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
        Ok(GuestReport(line.to_owned()))
    }

    /// The number after `key` (e.g. "ops="), 0 if absent.
    fn field(&self, key: &str) -> f64 {
        self.0
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

/// The bench's directory: the one named, or a fresh one under /var/tmp
/// (on a real file system, for `O_DIRECT`) removed when the guard drops.
fn work_dir(
    opts: &BenchOptions,
    prefix: &str,
) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    Ok(match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix(prefix)
                .tempdir_in("/var/tmp")?;
            (t.path().to_owned(), Some(t))
        }
    })
}

/// Runs the benchmark and prints the table.
fn polling(us: u32) -> String {
    if us == 0 {
        "off".to_owned()
    } else {
        format!("up to {us} µs")
    }
}

pub async fn run(opts: BenchOptions) -> anyhow::Result<()> {
    let (dir, _temp) = work_dir(&opts, "blkbackd-bench-")?;
    let img = dir.join("disk.img");
    println!(
        "blkbackd bench: {} MiB file in {}, {} s per run, {} repetitions, engine {:?}, zero copy {}, polling {}, guest polling {}",
        opts.size_mib,
        dir.display(),
        opts.seconds,
        opts.reps,
        opts.engine,
        if opts.zero_copy { "on" } else { "off" },
        polling(opts.poll_us),
        polling(opts.guest_poll_us),
    );
    make_disk(&img, opts.size_mib)?;
    let mut bench = Bench {
        world: SimWorld::start(&dir.join("xen")).await?,
        img: img.clone(),
        rbd: None,
        exe: opts.exe.clone(),
        engine: opts.engine,
        poll_us: opts.poll_us,
        guest_poll_us: opts.guest_poll_us,
        zero_copy: opts.zero_copy,
        next_domid: 0,
    };
    let rss0 = status_kib("VmRSS:");
    let have_fio = std::process::Command::new("fio")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_fio {
        println!("(fio is not installed: the raw io_uring loop is the only baseline)");
    }
    let mut rows = Vec::new();
    let mut latency_rows = Vec::new();
    // blkbackd's CPU per I/O at 4 KiB random read, depth 32, O_DIRECT: what
    // the histograms' cost is set against.
    let mut qd32_cpu_us = None;
    for (cache, direct) in [("page cache", false), ("O_DIRECT", true)] {
        if !direct {
            // Every page-cache run starts warm (nothing drops the cache in
            // between: see `fio_baseline`) and clean (`settle`).
            warm(&img)?;
        }
        for (name, w) in WORKLOADS {
            if opts.only.as_deref().is_some_and(|o| !name.contains(o)) {
                continue;
            }
            let text = format!("{w}:{}", opts.seconds);
            let spec: BenchSpec = text.parse().map_err(anyhow::Error::msg)?;
            let (mut raw, mut fio, mut ours, mut cpu, mut notif) =
                (vec![], vec![], vec![], vec![], vec![]);
            let mut guest_cpu = vec![];
            let mut raw_cpu = vec![];
            let mut inside = Vec::new();
            let (mut lat_raw, mut lat_fio, mut lat_ours) = (vec![], vec![], vec![]);
            for _ in 0..opts.reps {
                // The raw loop runs on this thread while the backend idles:
                // this process's CPU over it is the disk's own cost per I/O
                // (the kernel's work: page cache, file system, zram), which
                // the serving path pays as well.
                let settled = || if direct { Ok(()) } else { settle(&img) };
                settled()?;
                let cpu0 = crate::sim::guest::cpu_seconds();
                let mut r = raw_baseline(&img, direct, &spec)
                    .with_context(|| format!("raw io_uring baseline of {name}"))?;
                raw_cpu.push((crate::sim::guest::cpu_seconds() - cpu0) * 1e6 / r.ops.max(1) as f64);
                raw.push(rate(&spec, r.ops, r.secs));
                if spec.depth == 1 {
                    let p50 = crate::sim::guest::quantile_us(&mut r.latency_ns, 0.5);
                    lat_raw.push((p50, crate::sim::guest::quantile_us(&mut r.latency_ns, 0.99)));
                }
                if have_fio {
                    settled()?;
                    if let Some(f) = fio_baseline(FioTarget::File(&img, direct), &spec) {
                        fio.push(f.rate);
                        lat_fio.extend(f.latency);
                    }
                }
                settled()?;
                let s = bench.served(&spec, &text, direct).await?;
                ours.push(s.rate);
                cpu.push(s.cpu_us_per_io);
                guest_cpu.push(s.guest_us_per_io);
                notif.push(s.notifications_per_io);
                lat_ours.extend(s.latency);
                inside.extend(s.in_backend);
            }
            // The last repetition's in-backend quantiles (bucket bounds).
            let inside = inside
                .last()
                .map_or_else(|| "-".to_owned(), |(a, b)| format!("<{a}/<{b}"));
            let (raw, ours) = (median(&mut raw), median(&mut ours));
            let fio = (!fio.is_empty()).then(|| median(&mut fio));
            // The ratio is quoted against the faster baseline.
            let best = fio.map_or(raw, |f| f.max(raw));
            let unit = if spec.bs >= 65536 { "MB/s" } else { "IOPS" };
            let (cpu, raw_cpu) = (median(&mut cpu), median(&mut raw_cpu));
            if direct && name == "4k randread qd32" {
                qd32_cpu_us = Some(cpu);
            }
            let row = format!(
                "{name:<18} {cache:<10} {raw:>10.0} {:>10} {ours:>10.0} {unit:<4} {:>6.2} {cpu:>9.1} {raw_cpu:>7.1} {:>6.1} {:>6.1} {:>8.3} {inside:>12}",
                fio.map_or_else(|| "-".to_owned(), |f| format!("{f:.0}")),
                ours / best,
                cpu - raw_cpu,
                median(&mut guest_cpu),
                median(&mut notif),
            );
            println!("{row}");
            rows.push(row);
            if spec.depth == 1 {
                let med = |v: &mut Vec<(f64, f64)>| {
                    let mut a: Vec<f64> = v.iter().map(|x| x.0).collect();
                    let mut b: Vec<f64> = v.iter().map(|x| x.1).collect();
                    (!v.is_empty()).then(|| (median(&mut a), median(&mut b)))
                };
                let show = |l: Option<(f64, f64)>| {
                    l.map_or_else(|| "-".to_owned(), |(a, b)| format!("{a:.1}/{b:.1}"))
                };
                let (r, f, o) = (med(&mut lat_raw), med(&mut lat_fio), med(&mut lat_ours));
                let base = match (r, f) {
                    (Some(r), Some(f)) => Some(if f.0 < r.0 { f } else { r }),
                    (r, f) => r.or(f),
                };
                latency_rows.push(format!(
                    "{name:<18} {cache:<10} {:>14} {:>14} {:>14} {:>12}",
                    show(r),
                    show(f),
                    show(o),
                    match (o, base) {
                        (Some(o), Some(b)) => format!("{:.1}", o.0 - b.0),
                        _ => "-".to_owned(),
                    }
                ));
            }
        }
    }
    let hwm = status_kib("VmHWM:");
    println!();
    println!(
        "{:<18} {:<10} {:>10} {:>10} {:>10} {:<4} {:>6} {:>9} {:>7} {:>6} {:>6} {:>8} {:>12}",
        "workload",
        "cache",
        "raw",
        "fio",
        "blkbackd",
        "unit",
        "ratio",
        "cpu-us/io",
        "raw-cpu",
        "added",
        "guest",
        "notif/io",
        "in-be p50/99"
    );
    for r in &rows {
        println!("{r}");
    }
    println!();
    println!("depth-1 latency, p50/p99 in µs (added: blkbackd's p50 over the faster baseline's)");
    println!(
        "{:<18} {:<10} {:>14} {:>14} {:>14} {:>12}",
        "workload", "cache", "raw", "fio", "blkbackd", "added p50"
    );
    for r in &latency_rows {
        println!("{r}");
    }
    println!();
    let hist_ns = histogram_cost_ns();
    println!(
        "latency histograms (always on): {hist_ns:.1} ns per request to time and count it{}",
        qd32_cpu_us.map_or_else(String::new, |c| format!(
            ", {:.2}% of blkbackd's CPU per I/O at 4k randread qd32 O_DIRECT ({c:.1} µs)",
            hist_ns / 10.0 / c
        ))
    );
    println!("ratio: blkbackd over the faster of the raw io_uring loop and fio (io_uring engine)");
    println!(
        "in-be p50/99: µs a request spent in the backend, taken off the ring to answered \
         (bounds of log-linear buckets, each at most 25% wide): the rest of a guest's latency is wake-ups and the guest"
    );
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
        "cpu-us/io is the backend's (this process's) CPU per guest I/O, the disk's own work \
         in the kernel included; raw-cpu is the same for the raw io_uring loop (the disk's \
         cost alone); added is the difference: what serving through a ring costs. guest is \
         the simulated guest's CPU per I/O: it runs in its own process on the same cores"
    );
    Ok(())
}

/// Depth-1 guests beside the flooder in [`fairness`].
const QUIET_GUESTS: u16 = 7;

/// One run of [`fairness`]: each quiet guest's p99 in µs, and the
/// flooder's rate (IOPS) if it ran.
struct FairRun {
    quiet_p99: Vec<f64>,
    flood_iops: Option<f64>,
}

impl Bench {
    /// Serves `QUIET_GUESTS` guests reading 4 KiB at depth 1, each from its
    /// own file, and (if `flood`) one more writing 4 KiB at random at depth
    /// 128 over four queues from its own file, all on the same file system
    /// at once, the flooder held to `limit` IOPS if given; returns what each
    /// measured.
    async fn fair_run(
        &mut self,
        dir: &Path,
        secs: f64,
        flood: bool,
        limit: Option<u64>,
    ) -> anyhow::Result<FairRun> {
        let quiet = format!("randread:4096:1:{secs}");
        let flooder = format!("randwrite:4096:128:{secs}");
        let mut served = Vec::new();
        let mut guests = tokio::task::JoinSet::new();
        let n = QUIET_GUESTS + u16::from(flood);
        for g in 0..n {
            self.next_domid += 1;
            let domid = DomId(self.next_domid);
            let is_flooder = flood && g == QUIET_GUESTS;
            let disk = Arc::new(FileDisk::open_file(
                &dir.join(format!("fair-{g}.img")),
                false,
            )?);
            let offer = Offer {
                engine: self.engine,
                direct_io: true,
                poll_us: self.poll_us,
                zero_copy: self.zero_copy,
                ..Offer::default()
            };
            let b = self
                .world
                .serve_with(domid, 51712, "fairness", disk, offer)
                .await?;
            if let (true, Some(iops)) = (is_flooder, limit) {
                self.world
                    .live
                    .limiter(&b.paths.backend)
                    .set(crate::vbd::limit::IoLimit {
                        iops,
                        ..Default::default()
                    });
            }
            served.push((domid, b));
            let mut cmd = self.world.guest_command(&self.exe, domid, "bench");
            cmd.arg("--bench")
                .arg(if is_flooder { &flooder } else { &quiet })
                .args(["--queues", if is_flooder { "4" } else { "1" }])
                .args(["--poll-us", &self.guest_poll_us.to_string()])
                .env("RUST_LOG", "warn");
            guests.spawn(async move { (is_flooder, cmd.output().await) });
        }
        let mut run = FairRun {
            quiet_p99: Vec::new(),
            flood_iops: None,
        };
        while let Some(r) = guests.join_next().await {
            let (is_flooder, out) = r?;
            let out = out.context("running a guest")?;
            let report = GuestReport::of(&out)?;
            let field = |k: &str| report.field(k);
            if is_flooder {
                run.flood_iops = Some(field("ops=") / field("secs="));
            } else {
                run.quiet_p99.push(field("p99_us="));
            }
        }
        for (domid, b) in served {
            let ends = tokio::time::timeout(Duration::from_secs(30), b.finish())
                .await
                .context("a backend did not stop")??;
            let errors: u64 = ends.iter().map(|(_, s)| s.errors).sum();
            anyhow::ensure!(
                errors == 0,
                "{errors} requests failed for domain {}",
                domid.0
            );
            self.world.destroy_domain(domid);
        }
        Ok(run)
    }
}

/// `blkbackd bench --fairness`: seven guests at depth 1 alone, then beside
/// a guest flooding the same file system with 4 KiB random writes at depth
/// 128 over four queues (no limits set), then with that flooder held to
/// a quarter of the rate it reached. Prints the quiet guests' p99 latency in each
/// case (the median of their p99s, per repetition, then the median of
/// those) and the flooder's rate against its limit (a quarter of its free
/// rate: well inside what it can do beside the others).
pub async fn fairness(opts: BenchOptions) -> anyhow::Result<()> {
    let (dir, _temp) = work_dir(&opts, "blkbackd-fair-")?;
    let per = (opts.size_mib / u64::from(QUIET_GUESTS + 1)).max(16);
    println!(
        "blkbackd bench --fairness: {QUIET_GUESTS} guests reading 4 KiB at depth 1 and one writing 4 KiB \
         at random at depth 128 over 4 queues, each on its own {per} MiB file in {}, O_DIRECT, \
         {} s per run, {} repetitions",
        dir.display(),
        opts.seconds,
        opts.reps
    );
    for g in 0..=QUIET_GUESTS {
        make_disk(&dir.join(format!("fair-{g}.img")), per)?;
    }
    let mut bench = Bench {
        world: SimWorld::start(&dir.join("xen")).await?,
        img: dir.join("fair-0.img"),
        rbd: None,
        exe: opts.exe.clone(),
        engine: opts.engine,
        poll_us: opts.poll_us,
        guest_poll_us: opts.guest_poll_us,
        zero_copy: opts.zero_copy,
        next_domid: 0,
    };
    let med_p99 = |r: &FairRun| {
        let mut v = r.quiet_p99.clone();
        median(&mut v)
    };
    let (mut alone, mut beside, mut limited, mut flood, mut held) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut limits = vec![];
    for rep in 0..opts.reps {
        // In turn, so slow drift of the machine hits all three alike.
        let a = bench.fair_run(&dir, opts.seconds, false, None).await?;
        let b = bench.fair_run(&dir, opts.seconds, true, None).await?;
        let f = b.flood_iops.unwrap_or(0.0);
        let limit = ((f / 4.0) as u64).max(100);
        let c = bench
            .fair_run(&dir, opts.seconds, true, Some(limit))
            .await?;
        let h = c.flood_iops.unwrap_or(0.0);
        println!(
            "rep {rep}: quiet p99 alone {:.0} µs, beside the flooder {:.0} µs ({:.2}x; flooder {f:.0} IOPS), \
             flooder held to {limit}: {h:.0} IOPS ({:+.1}%), quiet p99 {:.0} µs",
            med_p99(&a),
            med_p99(&b),
            med_p99(&b) / med_p99(&a).max(1e-9),
            (h / limit as f64 - 1.0) * 100.0,
            med_p99(&c),
        );
        alone.push(med_p99(&a));
        beside.push(med_p99(&b));
        limited.push(med_p99(&c));
        flood.push(f);
        held.push(h / limit as f64);
        limits.push(limit as f64);
    }
    let (a, b, c) = (
        median(&mut alone),
        median(&mut beside),
        median(&mut limited),
    );
    println!();
    println!("quiet guests' p99 (median of {} repetitions; each the median of the {QUIET_GUESTS} guests' p99):", opts.reps);
    println!("  alone                      {a:>8.0} µs");
    println!("  beside the flooder         {b:>8.0} µs   {:.2}x alone (target: within 2x, no limits set)", b / a.max(1e-9));
    println!(
        "  beside the flooder, held   {c:>8.0} µs   {:.2}x alone",
        c / a.max(1e-9)
    );
    println!(
        "flooder: {:.0} IOPS free; held to a quarter of that, it ran at {:.3}x its limit (target: within 5%)",
        median(&mut flood),
        median(&mut held)
    );
    Ok(())
}

/// The benchmark's baseline: the requests `spec` describes, issued with
/// io_uring straight on the image at `path` (`O_DIRECT` if `direct`).
fn raw_baseline(path: &Path, direct: bool, spec: &BenchSpec) -> std::io::Result<RawRun> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(spec.write)
        .custom_flags(flags)
        .open(path)?;
    let bytes = file.metadata()?.len();
    let job = RawJob {
        write: spec.write,
        depth: spec.depth as usize,
        bs: spec.bs as usize,
        seconds: spec.seconds,
        latency_samples: crate::sim::guest::LATENCY_SAMPLES,
    };
    raw_run(&file, &job, |lane, n| {
        crate::sim::guest::bench_offset(spec, bytes, lane, n)
    })
}

/// `blkbackd bench --rbd POOL/IMAGE`: the same workloads served from an RBD
/// image through blkbackd (librbd), against fio's rbd engine (librbd too) on
/// the same image, interleaved; the image is filled first, so that reads
/// reach objects. The image's lock passes between the two clients at each run.
pub async fn rbd(opts: BenchOptions, image: &str) -> anyhow::Result<()> {
    let spec = crate::rbd::Spec::parse(image).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        spec.snap.is_none(),
        "the bench writes: name an image, not a snapshot"
    );
    anyhow::ensure!(
        spec.namespace.is_none(),
        "fio's rbd engine, the bench's baseline, cannot reach an RBD namespace: \
         bench an image in the pool's default namespace (POOL/IMAGE)"
    );
    let settings = crate::config::rbd_settings()?;
    crate::rbd::configure(settings.clone());
    let size = {
        let i = crate::rbd::Image::open(&spec, true, None).map_err(|e| match e {
            crate::rbd::RbdError::Image { ref err, .. }
                if err.kind() == std::io::ErrorKind::NotFound =>
            {
                anyhow::anyhow!("{e} (create it: rbd create --size 1G {spec})")
            }
            e => e.into(),
        })?;
        i.size()?
    };
    let (dir, _temp) = work_dir(&opts, "blkbackd-bench-rbd-")?;
    println!(
        "blkbackd bench --rbd {spec}: {} MiB image, client.{}, {} s per run, {} repetitions",
        size >> 20,
        settings.client,
        opts.seconds,
        opts.reps
    );
    let have_fio = std::process::Command::new("fio")
        .args(["--enghelp=rbd"])
        .output()
        .is_ok_and(|o| o.status.success());
    anyhow::ensure!(
        have_fio,
        "fio with its rbd engine is needed (apt install fio)"
    );
    // Fill it once, so that reads are of data, not of absent objects.
    let filled = std::process::Command::new("fio")
        .args([
            "--name=fill",
            "--ioengine=rbd",
            "--rw=write",
            "--bs=4M",
            "--iodepth=4",
        ])
        .arg(format!("--clientname={}", settings.client))
        .arg(format!("--pool={}", spec.pool))
        .arg(format!("--rbdname={}", spec.image))
        .arg(format!("--size={size}"))
        .output()
        .context("running fio")?;
    anyhow::ensure!(
        filled.status.success(),
        "filling the image with fio failed: {}",
        String::from_utf8_lossy(&filled.stderr)
    );
    let mut bench = Bench {
        world: SimWorld::start(&dir.join("xen")).await?,
        img: dir.join("unused"),
        rbd: Some(spec.clone()),
        exe: opts.exe.clone(),
        engine: opts.engine,
        poll_us: opts.poll_us,
        guest_poll_us: opts.guest_poll_us,
        zero_copy: false,
        next_domid: 0,
    };
    let mut rows = Vec::new();
    for (name, w) in WORKLOADS {
        if opts.only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let text = format!("{w}:{}", opts.seconds);
        let b: BenchSpec = text.parse().map_err(anyhow::Error::msg)?;
        let (mut fio, mut ours, mut cpu, mut notif) = (vec![], vec![], vec![], vec![]);
        let (mut fio_cpu, mut guest_cpu) = (vec![], vec![]);
        let (mut lat_fio, mut lat_ours) = (vec![], vec![]);
        let mut inside = None;
        for _ in 0..opts.reps {
            let f = fio_baseline(FioTarget::Rbd(&spec, &settings.client), &b)
                .with_context(|| format!("fio's rbd engine on {name}"))?;
            fio.push(f.rate);
            fio_cpu.extend(f.cpu_us_per_io);
            lat_fio.extend(f.latency.map(|l| l.0));
            let s = bench.served(&b, &text, true).await?;
            ours.push(s.rate);
            cpu.push(s.cpu_us_per_io);
            guest_cpu.push(s.guest_us_per_io);
            notif.push(s.notifications_per_io);
            lat_ours.extend(s.latency.map(|l| l.0));
            inside = s.in_backend.or(inside);
        }
        let inside = inside.map_or_else(|| "-".to_owned(), |(a, b)| format!("<{a}/<{b}"));
        let (f, o) = (median(&mut fio), median(&mut ours));
        let unit = if b.bs >= 65536 { "MB/s" } else { "IOPS" };
        let lat = if lat_ours.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.0}/{:.0}", median(&mut lat_fio), median(&mut lat_ours))
        };
        let fio_cpu = if fio_cpu.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.1}", median(&mut fio_cpu))
        };
        let row = format!(
            "{name:<18} {f:>10.0} {o:>10.0} {unit:<4} {:>6.2} {fio_cpu:>7} {:>9.1} {:>6.1} {:>8.3} {lat:>12} {inside:>12}",
            o / f,
            median(&mut cpu),
            median(&mut guest_cpu),
            median(&mut notif),
        );
        println!("{row}");
        rows.push(row);
    }
    println!();
    println!(
        "{:<18} {:>10} {:>10} {:<4} {:>6} {:>7} {:>9} {:>6} {:>8} {:>12} {:>12}",
        "workload",
        "fio rbd",
        "blkbackd",
        "unit",
        "ratio",
        "fio-cpu",
        "cpu-us/io",
        "guest",
        "notif/io",
        "p50 fio/ours",
        "in-be p50/99"
    );
    for r in &rows {
        println!("{r}");
    }
    println!();
    println!(
        "ratio: blkbackd over fio --ioengine=rbd on the same image (medians of {}; runs \
         interleaved). cpu-us/io: this process's CPU per guest I/O, librbd's threads \
         included; fio-cpu: the same for fio's process from start to exit (connecting included); guest: the simulated guest's. p50: depth-1 latency in µs. in-be: µs a request spent in the backend \
         (the last repetition; bucket bounds), librbd's time included. The cluster's daemons \
         share this machine's CPUs with blkbackd and its guest process (and fio): pin them \
         apart (taskset) to see the client side's own cost",
        opts.reps
    );
    Ok(())
}
