//! `blkbackd sim-guest`: a simulated guest domain in its own process. It
//! speaks for its domain on the embedded Xenstore, creates its memory and
//! grant table in the simulation directory, connects its blkfront and then
//! behaves (verified I/O) or misbehaves in one chosen way.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use xenstore::{Client, DomId, Endpoint, Xs};

use super::blkfront::{Blkfront, FrontError, FrontOptions};
use crate::abi::blkif::*;
use crate::abi::sys::XenbusState;
use crate::ring::request::{encode, Segment};
use crate::xen::sim::SimDomain;

/// What the guest does once connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Verified reads and writes of many sizes, flush, discard.
    Verify,
    /// A producer index past what the ring holds.
    BogusProd,
    /// A direct request with 12 segments.
    TooManySegments,
    /// A segment whose first sector is after its last.
    BadSector,
    /// A read past the end of the disk.
    PastEnd,
    /// A write to a read-only disk.
    WriteReadOnly,
    /// An operation code the protocol does not define.
    UnknownOp,
    /// A segment naming a grant reference never granted.
    BadGrant,
    /// A grant revoked after the request was queued.
    RevokedGrant,
    /// A task rewriting ring slots while the backend reads them.
    Rewrite,
    /// Stay connected until the backend announces a bigger disk, then use
    /// the new end of it.
    Resize,
    /// Drive a benchmark workload (see [`BenchSpec`]) and report throughput.
    Bench,
    /// Notifies the event channel in a tight loop without producing any
    /// request (an event-channel storm).
    EventStorm,
    /// Fills its rings with the largest reads it may send and never consumes
    /// a response (a guest that never answers): what it pins must stay
    /// bounded.
    NeverAnswer,
    /// Rewrites its own frontend nodes (its `state`, and children it creates
    /// below it, which the backend's watch also sees) from 16 writers for
    /// `--ios` seconds, staying connected: the daemon's memory must not grow.
    XenstoreStorm,
    /// What `blkbackd demo` shows: verified I/O with progress lines
    /// (`SIM-GUEST progress DONE TOTAL BYTES`) and its throughput, then
    /// [`Mode::Resize`].
    Demo,
}

impl Mode {
    /// Every mode, for tests and help text.
    pub const ALL: [(&'static str, Mode); 16] = [
        ("verify", Mode::Verify),
        ("bogus-prod", Mode::BogusProd),
        ("too-many-segments", Mode::TooManySegments),
        ("bad-sector", Mode::BadSector),
        ("past-end", Mode::PastEnd),
        ("write-read-only", Mode::WriteReadOnly),
        ("unknown-op", Mode::UnknownOp),
        ("bad-grant", Mode::BadGrant),
        ("revoked-grant", Mode::RevokedGrant),
        ("rewrite", Mode::Rewrite),
        ("resize", Mode::Resize),
        ("bench", Mode::Bench),
        ("demo", Mode::Demo),
        ("event-storm", Mode::EventStorm),
        ("never-answer", Mode::NeverAnswer),
        ("xenstore-storm", Mode::XenstoreStorm),
    ];

    /// Whether a correct backend halts the ring for this misbehaviour.
    pub fn halts(self) -> bool {
        matches!(
            self,
            Mode::BogusProd | Mode::TooManySegments | Mode::BadSector | Mode::EventStorm
        )
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        Mode::ALL
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, m)| *m)
            .ok_or_else(|| {
                let names: Vec<&str> = Mode::ALL.iter().map(|(n, _)| *n).collect();
                format!("unknown mode {s:?}; one of {}", names.join(", "))
            })
    }
}

/// Everything the guest process needs.
#[derive(Clone, Debug)]
pub struct GuestArgs {
    /// The simulation directory.
    pub dir: PathBuf,
    /// The embedded Xenstore's socket.
    pub xenstore: PathBuf,
    /// This domain's id (introduced by the toolstack beforehand).
    pub domid: DomId,
    /// The vbd's device id.
    pub devid: u32,
    /// What to do.
    pub mode: Mode,
    /// I/Os per lane in verify mode.
    pub ios: u32,
    /// Seed of the data pattern.
    pub seed: u64,
    /// What to negotiate.
    pub opts: FrontOptions,
    /// The workload of [`Mode::Bench`].
    pub bench: Option<BenchSpec>,
    /// In bench mode: how long the guest polls its rings for answers before
    /// it sleeps on the event channel, in µs (0: it sleeps at once).
    pub poll_us: u32,
}

/// A benchmark workload: `randread|randwrite|read|write:BYTES:DEPTH:SECONDS`
/// (`read`/`write` are sequential).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BenchSpec {
    /// Writes rather than reads.
    pub write: bool,
    /// Random offsets rather than sequential.
    pub random: bool,
    /// Bytes per request (a multiple of 4096).
    pub bs: u32,
    /// Requests kept in flight.
    pub depth: u32,
    /// How long to run.
    pub seconds: f64,
}

impl FromStr for BenchSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<BenchSpec, String> {
        let bad = || {
            format!("bad workload {s:?}: want randread|randwrite|read|write:BYTES:DEPTH:SECONDS")
        };
        let f: Vec<&str> = s.split(':').collect();
        let [kind, bs, depth, secs] = f[..] else {
            return Err(bad());
        };
        let (write, random) = match kind {
            "randread" => (false, true),
            "randwrite" => (true, true),
            "read" => (false, false),
            "write" => (true, false),
            _ => return Err(bad()),
        };
        let bs: u32 = bs.parse().map_err(|_| bad())?;
        let depth: u32 = depth.parse().map_err(|_| bad())?;
        let seconds: f64 = secs.parse().map_err(|_| bad())?;
        if bs == 0 || !bs.is_multiple_of(4096) || bs > 1 << 20 || !(1..=1024).contains(&depth) {
            return Err(bad());
        }
        if !(seconds > 0.0 && seconds <= 3600.0) {
            return Err(bad());
        }
        Ok(BenchSpec {
            write,
            random,
            bs,
            depth,
            seconds,
        })
    }
}

/// Where lane `lane`'s `n`th request of `spec` goes on a disk of `bytes`, in
/// bytes (the same sequence drives the raw baseline).
pub fn bench_offset(spec: &BenchSpec, bytes: u64, lane: u32, n: u64) -> u64 {
    let bs = u64::from(spec.bs);
    let blocks = (bytes / bs).max(1);
    if spec.random {
        let mut x = (u64::from(lane) << 32 | n).wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        (x % blocks) * bs
    } else {
        // One sequential stream `depth` deep, as a guest's sequential I/O
        // (and fio's `--rw=read --iodepth=N`) is: lane `lane`'s `n`th request
        // is the stream's (n * depth + lane)th block.
        (n.wrapping_mul(u64::from(spec.depth))
            .wrapping_add(u64::from(lane))
            % blocks)
            * bs
    }
}

/// Latency samples a bench lane keeps (about a minute at depth 1).
pub const LATENCY_SAMPLES: usize = 1 << 20;

/// The `q`th quantile (0..=1) of `samples` (sorted here), in µs.
pub fn quantile_us(samples: &mut [u32], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_unstable();
    let i = ((samples.len() - 1) as f64 * q).round() as usize;
    f64::from(samples[i.min(samples.len() - 1)]) / 1000.0
}

async fn bench(
    front: &Arc<Blkfront>,
    spec: BenchSpec,
    poll: Duration,
) -> Result<String, FrontError> {
    let bytes = front.sectors * 512;
    let nq = front.queues() as u32;
    // Each lane sticks to one queue, as a guest CPU does: lane L to queue
    // L % queues, each queue driven by a loop on its own thread.
    let mut taken = Vec::new();
    for q in 0..nq.min(spec.depth) {
        let lanes: Vec<u32> = (0..spec.depth).filter(|l| l % nq == q).collect();
        taken.push((front.take_queue(q as usize).await?, lanes));
    }
    let started = std::time::Instant::now();
    let cpu0 = cpu_seconds();
    let deadline = started + Duration::from_secs_f64(spec.seconds);
    let mut loops = tokio::task::JoinSet::new();
    for (dq, lanes) in taken {
        loops.spawn_blocking(move || {
            crate::sim::driver::drive(dq, &spec, &lanes, bytes, deadline, poll)
        });
    }
    let (mut ops, mut lat) = (0, Vec::new());
    while let Some(r) = loops.join_next().await {
        let d = r.map_err(|e| fail(format!("bench queue loop failed: {e}")))??;
        ops += d.ops;
        lat.extend(d.latency);
    }
    let secs = started.elapsed().as_secs_f64();
    let latency = if lat.is_empty() {
        String::new()
    } else {
        format!(
            " p50_us={:.2} p99_us={:.2}",
            quantile_us(&mut lat, 0.5),
            quantile_us(&mut lat, 0.99)
        )
    };
    Ok(format!(
        "BENCH ops={ops} bytes={} secs={secs:.4} cpu_s={:.3}{latency}",
        ops * u64::from(spec.bs),
        cpu_seconds() - cpu0
    ))
}

/// This process's user + system CPU seconds.
pub fn cpu_seconds() -> f64 {
    // utime and stime: fields 14 and 15 of the whole line.
    proc_stat_seconds(14)
}

/// User + system CPU seconds of this process's children that have ended
/// and been waited for (all their threads).
pub fn children_cpu_seconds() -> f64 {
    // cutime and cstime: fields 16 and 17.
    proc_stat_seconds(16)
}

/// The sum of `/proc/self/stat` fields `field` and `field + 1` (numbered
/// from 1, in clock ticks), in seconds.
fn proc_stat_seconds(field: usize) -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ')',
    // with field 3.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(field) + ticks(field + 1)) / 100.0
}

/// Memory and grant-table sizes of a simulated guest.
const GUEST_PAGES: u64 = 8192;
const GUEST_GRANTS: u32 = 8192;
const WAIT: Duration = Duration::from_secs(10);

fn fail(msg: impl Into<String>) -> FrontError {
    FrontError::Protocol(msg.into())
}

/// A reproducible byte pattern (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Runs the guest; returns a one-line report of what it saw.
pub async fn run(args: GuestArgs) -> Result<String, FrontError> {
    let xs = Client::connect_to(&Endpoint::Socket(args.xenstore.clone())).await?;
    let d = args.domid.0.to_string();
    xs.control(&[xenstore::server::SIM_AS_DOMAIN, &d]).await?;
    let dom = Arc::new(SimDomain::create(
        &args.dir,
        args.domid,
        GUEST_PAGES,
        GUEST_GRANTS,
    )?);
    let fe = format!("/local/domain/{}/device/vbd/{}", args.domid.0, args.devid);
    let front = Arc::new(Blkfront::connect(xs, dom, &fe, &args.opts).await?);
    let tag = format!(
        "queues={} order={} indirect={} persistent={}",
        front.queues(),
        front.ring_order,
        front.max_indirect,
        front.persistent
    );
    let report = match args.mode {
        Mode::Verify => verify(&front, args.ios, args.seed, false).await?,
        Mode::Demo => {
            println!("SIM-GUEST negotiated {tag} sectors={}", front.sectors);
            let started = std::time::Instant::now();
            let v = verify(&front, args.ios, args.seed, true).await?;
            println!("SIM-GUEST {v} secs={:.3}", started.elapsed().as_secs_f64());
            resized(&front).await?
        }
        Mode::BogusProd => {
            front.bogus_producer(0, front.ring_size() + 5);
            halted(&front).await?
        }
        Mode::TooManySegments | Mode::BadSector => {
            let segs: Vec<Segment> = (0..12)
                .map(|i| Segment {
                    gref: GrantRef(8 + i),
                    first_sect: if args.mode == Mode::BadSector { 5 } else { 0 },
                    last_sect: if args.mode == Mode::BadSector { 2 } else { 7 },
                })
                .collect();
            let mut raw = encode::rw(front_abi(&args), BLKIF_OP_READ, 0, 0, &segs);
            if args.mode == Mode::BadSector {
                raw[REQ_NR_SEGMENTS] = 2;
            }
            let st = front.submit_raw(0, raw, WAIT).await?;
            if st != BLKIF_RSP_ERROR {
                return Err(fail(format!("expected an error status, got {st}")));
            }
            halted(&front).await?
        }
        Mode::PastEnd => {
            let mut buf = vec![0u8; 4096];
            expect_status(front.read(front.sectors, &mut buf).await, BLKIF_RSP_ERROR)?;
            still_serves(&front, args.seed).await?
        }
        Mode::WriteReadOnly => {
            if !front.read_only {
                return Err(fail("the backend did not say the disk is read-only"));
            }
            expect_status(front.write(0, &[0xEE; 4096]).await, BLKIF_RSP_ERROR)?;
            let mut buf = vec![0u8; 4096];
            front.read(0, &mut buf).await?;
            "write refused, reads still served".to_owned()
        }
        Mode::UnknownOp => {
            let mut raw = encode::rw(front_abi(&args), BLKIF_OP_READ, 0, 0, &[]);
            raw[REQ_OPERATION] = 42;
            let st = front.submit_raw(0, raw, WAIT).await?;
            if st != BLKIF_RSP_EOPNOTSUPP {
                return Err(fail(format!("expected EOPNOTSUPP, got {st}")));
            }
            still_serves(&front, args.seed).await?
        }
        Mode::BadGrant | Mode::RevokedGrant => {
            let dom = front.domain();
            let gref = if args.mode == Mode::BadGrant {
                GrantRef(7) // reserved, never granted
            } else {
                let f = dom.alloc_pages(1)?;
                let g = dom.grant(f, DomId::DOM0, false)?;
                dom.revoke(g);
                g
            };
            let seg = Segment {
                gref,
                first_sect: 0,
                last_sect: 7,
            };
            let raw = encode::rw(front_abi(&args), BLKIF_OP_READ, 0, 0, &[seg]);
            let st = front.submit_raw(0, raw, WAIT).await?;
            if st != BLKIF_RSP_ERROR {
                return Err(fail(format!("expected an error status, got {st}")));
            }
            still_serves(&front, args.seed).await?
        }
        Mode::Rewrite => rewrite(&front, args.seed).await?,
        Mode::EventStorm => {
            let mut sent = 0u64;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                // The backend unbinding its end (a halted ring) fails the
                // notification: then see why.
                let unbound = (0..256).any(|_| front.notify(0).is_err());
                sent += 256;
                if unbound || front.backend_error().await?.is_some() {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(fail(format!(
                        "{sent} notifications and the ring still runs"
                    )));
                }
                tokio::task::yield_now().await;
            }
            let h = halted(&front).await?;
            format!("{sent} notifications sent; {h}")
        }
        Mode::NeverAnswer => never_answer(&front, args.ios).await?,
        Mode::XenstoreStorm => xenstore_storm(&args, &front).await?,
        Mode::Resize => resized(&front).await?,
        Mode::Bench => {
            let spec = args.bench.ok_or_else(|| fail("bench mode needs --bench"))?;
            bench(&front, spec, Duration::from_micros(args.poll_us.into())).await?
        }
    };
    Ok(format!("{tag} {report}"))
}

fn front_abi(args: &GuestArgs) -> Abi {
    args.opts.abi
}

fn expect_status(r: Result<(), FrontError>, want: i16) -> Result<(), FrontError> {
    match r {
        Err(FrontError::Status(st)) if st == want => Ok(()),
        other => Err(fail(format!("expected status {want}, got {other:?}"))),
    }
}

/// Waits for the backend to give up on us: an `error` node and Closing.
async fn halted(front: &Blkfront) -> Result<String, FrontError> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let err = front.backend_error().await?;
        let st = front.backend_state().await?;
        if let (Some(e), Some(XenbusState::Closing)) = (&err, st) {
            return Ok(format!("ring halted: {e}"));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(fail(format!(
                "backend did not halt the ring (error {err:?}, state {st:?})"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn still_serves(front: &Arc<Blkfront>, seed: u64) -> Result<String, FrontError> {
    let v = verify(front, 4, seed, false).await?;
    Ok(format!("refused as expected, then {v}"))
}

/// Verified I/O: four lanes, each in its own region, sizes from one sector to
/// past the direct-segment limit, then flush and discard. With `progress`, a
/// line `SIM-GUEST progress DONE TOTAL BYTES` every 100 ms (the demo draws
/// its progress bar from them).
async fn verify(
    front: &Arc<Blkfront>,
    ios: u32,
    seed: u64,
    progress: bool,
) -> Result<String, FrontError> {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    const SIZES: [u64; 8] = [1, 8, 13, 64, 88, 96, 256, 1024];
    let lanes = 4u64;
    let region = front.sectors / lanes;
    if region < 2048 {
        return Err(fail("disk too small for verify mode"));
    }
    let total = u64::from(ios) * lanes;
    let done = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    // The longest time without any answer while I/O was outstanding: what a
    // backend restart (or any stall) costs this guest.
    let gaps = Arc::new(std::sync::Mutex::new((
        std::time::Instant::now(),
        Duration::ZERO,
    )));
    let ticker = progress.then(|| {
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                println!(
                    "SIM-GUEST progress {} {total} {}",
                    done.0.load(Relaxed),
                    done.1.load(Relaxed)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let mut set = tokio::task::JoinSet::new();
    for lane in 0..lanes {
        let front = front.clone();
        let done = done.clone();
        let gaps = gaps.clone();
        let answered = move || {
            let mut g = gaps.lock().unwrap_or_else(|e| e.into_inner());
            let now = std::time::Instant::now();
            g.1 = g.1.max(now - g.0);
            g.0 = now;
        };
        set.spawn(async move {
            let base = lane * region;
            // Start from what the disk holds (a previous connection may have
            // written it), read in the largest requests the ring allows.
            let mut model = vec![0u8; (region * 512) as usize];
            for (i, chunk) in model.chunks_mut(1024 * 512).enumerate() {
                front.read(base + i as u64 * 1024, chunk).await?;
            }
            let mut rng = Rng(seed ^ (lane + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut bytes = 0u64;
            for _ in 0..ios {
                let n = SIZES[(rng.next() % SIZES.len() as u64) as usize];
                let at = rng.next() % (region - n);
                let mut data = vec![0u8; (n * 512) as usize];
                rng.fill(&mut data);
                front.write(base + at, &data).await?;
                answered();
                model[(at * 512) as usize..((at + n) * 512) as usize].copy_from_slice(&data);
                let rn = SIZES[(rng.next() % SIZES.len() as u64) as usize];
                let rat = rng.next() % (region - rn);
                let mut back = vec![0u8; (rn * 512) as usize];
                front.read(base + rat, &mut back).await?;
                answered();
                let want = &model[(rat * 512) as usize..((rat + rn) * 512) as usize];
                if back != want {
                    return Err(fail(format!(
                        "lane {lane}: read of {rn} sectors at {} differs from what was written",
                        base + rat
                    )));
                }
                bytes += (n + rn) * 512;
                done.0.fetch_add(1, Relaxed);
                done.1.fetch_add((n + rn) * 512, Relaxed);
            }
            Ok::<u64, FrontError>(bytes)
        });
    }
    let mut moved = 0;
    let mut failed = None;
    while let Some(r) = set.join_next().await {
        match r.map_err(|e| fail(e.to_string())).and_then(|r| r) {
            Ok(b) => moved += b,
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    if let Some(t) = ticker {
        t.abort();
        println!(
            "SIM-GUEST progress {} {total} {}",
            done.0.load(Relaxed),
            done.1.load(Relaxed)
        );
    }
    if let Some(e) = failed {
        return Err(e);
    }
    front.flush().await?;
    // As blkfront: a discard only where the backend offers it.
    if front.discard.is_some() {
        front.discard(0, 64).await?;
        let mut z = vec![1u8; 64 * 512];
        front.read(0, &mut z).await?;
        if z.iter().any(|&b| b != 0) {
            return Err(fail("discarded range does not read back as zeroes"));
        }
    }
    let max_gap = gaps.lock().unwrap_or_else(|e| e.into_inner()).1;
    Ok(format!(
        "verified ios={} bytes={moved} max_gap_ms={:.1} discard={}",
        total * 2,
        max_gap.as_secs_f64() * 1000.0,
        front
            .discard
            .map_or_else(|| "off".to_owned(), |g| g.to_string()),
    ))
}

/// Stops consuming responses, then puts `per_queue` reads of the largest
/// size it may send on every queue (the ring's worth at most) and keeps them
/// outstanding for `hold` seconds, kicking the backend now and then.
/// Sixteen writers rewrite this guest's frontend nodes for `args.ios`
/// seconds: its `state` (with the value it has, Connected) and children
/// below it. Reports the writes made.
async fn xenstore_storm(args: &GuestArgs, front: &Arc<Blkfront>) -> Result<String, FrontError> {
    let xs = Client::connect_to(&Endpoint::Socket(args.xenstore.clone())).await?;
    xs.control(&[xenstore::server::SIM_AS_DOMAIN, &args.domid.0.to_string()])
        .await?;
    let state = format!("{}/state", front.frontend_path());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(u64::from(args.ios));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..16u32 {
        let (xs, state) = (xs.clone(), state.clone());
        writers.spawn(async move {
            let mut n = 0u64;
            while tokio::time::Instant::now() < deadline {
                let r = if n.is_multiple_of(2) {
                    xs.write(&state, "4").await
                } else {
                    xs.write(&format!("{state}/w{w}-{}", n % 16), n.to_string())
                        .await
                };
                r?;
                n += 1;
            }
            Ok::<u64, xenstore::Error>(n)
        });
    }
    let mut writes = 0;
    while let Some(r) = writers.join_next().await {
        writes += r.map_err(|e| fail(e.to_string()))??;
    }
    Ok(format!("STORM writes={writes}"))
}

/// Fills each queue's ring with reads at once and never takes an answer
/// (its queues are taken from the completion tasks that would).
async fn never_answer(front: &Arc<Blkfront>, per_queue: u32) -> Result<String, FrontError> {
    let bytes = (front.max_indirect.max(11) as usize * 4096) as u32;
    let spec = BenchSpec {
        write: false,
        random: true,
        bs: bytes,
        depth: per_queue,
        seconds: 0.0,
    };
    let disk = front.sectors * 512;
    let mut queues = Vec::with_capacity(front.queues());
    let mut put = 0;
    for q in 0..front.queues() {
        let dq = front.take_queue(q).await?;
        put += super::driver::flood(&dq, &spec, per_queue, disk)?;
        queues.push(dq);
    }
    println!("SIM-GUEST outstanding {put} reads of {bytes} bytes");
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for q in &queues {
            q.notify()?;
        }
    }
    Ok(format!(
        "left {put} reads of {bytes} bytes unanswered for 2 s"
    ))
}

/// Rewrites random ring slots of queue 0 with random bytes while doing I/O, as
/// a hostile guest racing the backend's copy would.
async fn rewrite(front: &Arc<Blkfront>, seed: u64) -> Result<String, FrontError> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scribbler = {
        let (front, stop) = (front.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            let mut rng = Rng(seed | 1);
            let mut n = 0u64;
            // The largest slot; scribble_slot trims it to the ring's own.
            let mut junk = vec![0u8; std::mem::size_of::<RequestX86_64>()];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                rng.fill(&mut junk);
                junk[REQ_OPERATION] = (rng.next() % 8) as u8;
                front.scribble_slot(0, rng.next() as u32, &junk);
                n += 1;
            }
            n
        })
    };
    let mut served = 0u32;
    let mut failed = 0u32;
    for i in 0..100u64 {
        let mut buf = vec![0u8; 8 * 512];
        let r = tokio::time::timeout(Duration::from_millis(500), front.read(i * 8, &mut buf)).await;
        match r {
            Ok(Ok(())) => served += 1,
            _ => failed += 1,
        }
        if failed > 5 {
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let scribbles = scribbler.await.map_err(|e| fail(e.to_string()))?;
    let err = front.backend_error().await?;
    Ok(format!(
        "scribbles={scribbles} served={served} failed={failed} halted={}",
        err.is_some()
    ))
}

/// Waits (as blkfront's state watch does) for the backend to publish a new
/// `sectors`, then writes and reads back the last sector of the grown disk.
async fn resized(front: &Blkfront) -> Result<String, FrontError> {
    use xenstore::Xs;
    let xs = front.xenstore();
    let path = format!("{}/sectors", front.backend_path());
    let mut w = xs.watch(&format!("{}/state", front.backend_path())).await?;
    println!("SIM-GUEST connected sectors={}", front.sectors);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let now = loop {
        let s: u64 = xs
            .read_string(&path)
            .await?
            .parse()
            .map_err(|_| fail("bad sectors"))?;
        if s != front.sectors {
            break s;
        }
        match tokio::time::timeout_at(deadline, w.next()).await {
            Ok(Some(_)) => {}
            _ => return Err(fail("the backend never announced a new size")),
        }
    };
    let data = vec![0x5Au8; 4096];
    front.write(now - 8, &data).await?;
    let mut back = vec![0u8; 4096];
    front.read(now - 8, &mut back).await?;
    if back != data {
        return Err(fail("the grown end of the disk does not read back"));
    }
    Ok(format!(
        "resized from {} to {now} sectors; the new end reads back",
        front.sectors
    ))
}
