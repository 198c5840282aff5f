//! The `blkbackd` command.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "blkbackd",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("BLKBACKD_COMMIT"), ")"),
    about = "A userspace Xen block backend"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the embedded default: the embedded Xenstore and a simulated Xen,
    /// dom0's backend serving two guests that run as separate processes, one
    /// well-behaved (verified I/O) and one hostile (its ring is halted).
    Demo {
        /// The simulation directory (a temporary one by default).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Revoke a dm-built disk now: its table becomes `error` over the same
    /// size, so no further I/O reaches the storage (the guest gets errors).
    Revoke {
        /// The guest's domain id.
        #[arg(long)]
        domid: u16,
        /// The vbd's device id.
        #[arg(long)]
        devid: u32,
    },
    /// Set a vbd's I/O limits at run time (stored in its backend directory,
    /// where only dom0 can write; the daemon applies them at once, and they
    /// take precedence over the configuration's [[limit]] rules). A request
    /// over a limit waits, it never fails. With no value given, shows them.
    Limit {
        /// The guest's domain id.
        #[arg(long)]
        domid: u16,
        /// The vbd's device id.
        #[arg(long)]
        devid: u32,
        /// Requests per second (0: no limit).
        #[arg(long)]
        iops: Option<u64>,
        /// Bytes per second (0: no limit).
        #[arg(long)]
        bps: Option<u64>,
        /// The burst, in milliseconds of each rate (default 100).
        #[arg(long)]
        burst_ms: Option<u64>,
        /// Remove the vbd's own limits (the configuration's apply again).
        #[arg(long, conflicts_with_all = ["iops", "bps", "burst_ms"])]
        clear: bool,
    },
    /// Write the manual pages (blkbackd.8 and blkbackd-COMMAND.8 for each
    /// command) into DIR; the Debian package is built with them.
    #[command(hide = true)]
    ManPages {
        /// Where to write them.
        dir: PathBuf,
    },
    /// Check the device-mapper layer against this kernel (needs root and
    /// dm-mod; used by the VM tests): prints one line per check.
    #[command(hide = true)]
    DmCheck {
        /// Scratch directory for the backing files.
        #[arg(long, default_value = "/var/tmp/blkbackd-dm-check")]
        dir: PathBuf,
    },
    /// Measure the serving path against raw io_uring on the same file: a
    /// simulated guest in its own process, side by side with the baseline,
    /// page cache and O_DIRECT; prints medians and ratios.
    Bench {
        /// Working directory on a real file system (default: a fresh one in /var/tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Seconds per run.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Repetitions per workload (the median is quoted).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Size of the disk file in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// I/O engine of the serving path.
        #[arg(long, value_enum, default_value = "auto")]
        engine: blkbackd::io::engine::EngineChoice,
        /// Adaptive polling's largest window in µs (0: off), as `[io] poll_us`.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1000))]
        poll_us: u32,
        /// µs the simulated guest polls its rings for answers before it
        /// sleeps on the event channel (default: --poll-us): a guest CPU with
        /// nothing else to do. 0: it sleeps at once, woken by each
        /// notification.
        #[arg(long, value_parser = clap::value_parser!(u32).range(0..=1000))]
        guest_poll_us: Option<u32>,
        /// Disk I/O straight on the guest's mapped pages (`[io] zero_copy =
        /// true`), to measure what zero copy buys against the copy.
        #[arg(long)]
        zero_copy: bool,
        /// Run only the workloads whose name contains this (e.g. "128k write").
        #[arg(long)]
        only: Option<String>,
        /// Instead: seven guests at depth 1 beside one flooding guest, their
        /// p99 latency alone, beside it, and beside it held to a limit.
        #[arg(long)]
        fairness: bool,
        /// Instead: serve this Ceph RBD image (POOL/IMAGE, existing; it is
        /// overwritten) against fio's rbd engine on it. The cluster is
        /// reached as the block script does ([rbd] of $BLKBACKD_CONFIG or
        /// /etc/blkbackd/blkbackd.toml, else Ceph's defaults and $CEPH_CONF).
        #[arg(long, value_name = "POOL/IMAGE", conflicts_with = "fairness")]
        rbd: Option<String>,
    },
    /// Serve every vbd in Xenstore's backend/vbd until SIGTERM, which hands
    /// every device over as it stands (answers published, rings left
    /// Connected) for the next daemon to adopt: a restart or an upgrade is a
    /// stall to the guests. On real Xen by default; `--sim DIR` runs the
    /// embedded default (its own Xenstore and the simulated hypervisor in DIR).
    Serve {
        /// Run on the embedded default in this directory.
        #[arg(long)]
        sim: Option<PathBuf>,
        /// Xenstore socket or device (default: XENSTORED_PATH, then
        /// /run/xenstored/socket, then /dev/xen/xenbus). With --sim: a
        /// separate Xenstore (`blkbackd xenstored`) instead of the embedded one.
        #[arg(long)]
        xenstore: Option<PathBuf>,
        /// Serve a physical-device published without diskseq, by major:minor
        /// alone. Unsafe: a released and reused device number could be served.
        #[arg(long)]
        allow_missing_diskseq: bool,
        /// Configuration file (TOML; see the README). SIGHUP re-reads it for
        /// devices created afterwards. Default: $BLKBACKD_CONFIG, else
        /// /etc/blkbackd/blkbackd.toml if it exists (the block script reads
        /// the same file for its [rbd] settings).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the embedded Xenstore server on a unix socket until SIGINT/SIGTERM.
    Xenstored {
        /// The socket to listen on (point XENSTORED_PATH at it).
        #[arg(long)]
        socket: PathBuf,
    },
    /// Attach a disk to a domain as libxl would (nodes and permissions in one
    /// transaction, InitWait, the block script); needs `blkbackd serve` running.
    Attach {
        /// The guest domain.
        #[arg(long)]
        domid: u16,
        /// The guest's device name (xvda..xvdp) or Xen device number.
        #[arg(long, default_value = "xvda")]
        vdev: String,
        /// What to serve (see the README's params grammar).
        #[arg(long)]
        params: String,
        /// Serve read-only.
        #[arg(long)]
        read_only: bool,
    },
    /// Detach a disk as libxl would (online=0 + Closing, Closed within 10 s,
    /// the block script's remove, nodes deleted).
    Detach {
        /// The guest domain.
        #[arg(long)]
        domid: u16,
        /// The guest's device name (xvda..xvdp) or Xen device number.
        #[arg(long, default_value = "xvda")]
        vdev: String,
    },
    /// Stop the running daemon through its status socket: by default as
    /// SIGTERM does (every device handed over as it stands, for the next
    /// daemon to adopt); `--close-devices` closes every device instead, and
    /// guests lose their disks (Linux blkfront does not reconnect).
    Shutdown {
        /// Close every device instead of handing them over.
        #[arg(long)]
        close_devices: bool,
        /// The daemon's status socket (default: /run/blkbackd/status.sock, or
        /// the one beside $XENSTORED_PATH in an embedded default's directory).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Show every vbd: state, disk and diskseq, what the frontend negotiated.
    Status {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The daemon's status socket, for per-ring counters (default:
        /// /run/blkbackd/status.sock, or the one beside $XENSTORED_PATH in an
        /// embedded default's directory).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// The libxl block script (`/etc/xen/scripts/block-blkbackd` execs this):
    /// `add` builds the disk named by `params` and publishes it by
    /// identity; `remove` undoes it. Uses XENBUS_PATH and XENSTORED_PATH.
    Hotplug {
        /// add or remove.
        #[arg(value_parser = ["add", "remove"])]
        action: String,
        /// The vbd's backend directory (default: $XENBUS_PATH).
        #[arg(long)]
        xenbus_path: Option<String>,
    },
    /// Run a simulated guest domain (used by the tests and the demo): it
    /// connects its blkfront to the vbd `--devid` and then does `--mode`.
    SimGuest {
        /// The simulation directory (guest memory, grant tables, event channels).
        #[arg(long)]
        dir: PathBuf,
        /// The embedded Xenstore's socket.
        #[arg(long)]
        xenstore: PathBuf,
        /// This guest's domain id (already introduced).
        #[arg(long)]
        domid: u16,
        /// The vbd's device id.
        #[arg(long, default_value_t = 51712)]
        devid: u32,
        /// verify, bogus-prod, too-many-segments, bad-sector, past-end,
        /// write-read-only, unknown-op, bad-grant, revoked-grant, rewrite,
        /// resize, bench, demo, event-storm, never-answer or xenstore-storm.
        #[arg(long, default_value = "verify")]
        mode: String,
        /// I/Os per lane in verify mode (seconds in xenstore-storm mode).
        #[arg(long, default_value_t = 50)]
        ios: u32,
        /// Seed of the data pattern.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Wanted ring-page-order.
        #[arg(long, default_value_t = 2)]
        ring_order: u32,
        /// Wanted queues.
        #[arg(long, default_value_t = 2)]
        queues: u32,
        /// Wanted indirect segments (0: none).
        #[arg(long, default_value_t = 32)]
        indirect: u32,
        /// Request layout: x86_64-abi or x86_32-abi.
        #[arg(long, default_value = "x86_64-abi")]
        protocol: String,
        /// First ring index (near 4294967295 to exercise the 32-bit wrap).
        #[arg(long, default_value_t = 0)]
        start_index: u32,
        /// Do not use persistent grants even if the backend offers them.
        #[arg(long)]
        no_persistent: bool,
        /// The workload of bench mode:
        /// randread|randwrite|read|write:BYTES:DEPTH:SECONDS.
        #[arg(long)]
        bench: Option<String>,
        /// In bench mode, µs the guest polls its rings for answers before it
        /// sleeps on the event channel (0: never polls).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1000))]
        poll_us: u32,
    },
    /// Check a Xenstore (the real xenstored, or ours) against the behaviour
    /// blkbackd relies on; exits non-zero if any check fails.
    XenstoreCheck {
        /// Socket or device to use instead of XENSTORED_PATH / the defaults.
        #[arg(long)]
        endpoint: Option<PathBuf>,
        /// Scratch node the checks work under (removed afterwards).
        #[arg(long, default_value = "blkbackd-xenstore-check")]
        scratch: String,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes. A backtrace (captured when
            // RUST_BACKTRACE is set) only when debugging logs are asked for.
            // (Causes whose text an error already quotes are not repeated.)
            let mut line = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !line.contains(&c) {
                    line = format!("{line}: {c}");
                }
            }
            eprintln!("blkbackd: {line}");
            if std::env::var_os("RUST_LOG").is_some()
                && e.backtrace().status() == std::backtrace::BacktraceStatus::Captured
            {
                eprintln!("{}", e.backtrace());
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // The demo prints its own story; its logs stay quiet unless asked for.
    let default = if matches!(cli.cmd, Cmd::Demo { .. } | Cmd::Bench { .. }) {
        "warn"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs in files and journald stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // The short-lived commands (the block script's above all: libxl waits
    // for it while a guest is created or fails to be) run on the calling
    // thread: no worker threads to start and stop.
    let mut rt = if matches!(
        cli.cmd,
        Cmd::Hotplug { .. }
            | Cmd::Status { .. }
            | Cmd::Shutdown { .. }
            | Cmd::Revoke { .. }
            | Cmd::Limit { .. }
    ) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let rt = rt
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Demo { dir } => blkbackd::demo::run(dir, None).await,
            Cmd::Revoke { domid, devid } => {
                let xs = xenstore::Client::connect().await?;
                let name = blkbackd::hotplug::revoke(&xs, domid, devid).await?;
                println!("revoked {name}: every further I/O fails");
                Ok(())
            }
            Cmd::ManPages { dir } => man_pages(&dir),
            Cmd::Limit {
                domid,
                devid,
                iops,
                bps,
                burst_ms,
                clear,
            } => {
                let xs = xenstore::Client::connect().await?;
                let be = blkbackd::xenbus::backend_path(blkbackd::xen::DomId(domid), devid);
                let change = if clear {
                    None
                } else {
                    Some((iops, bps, burst_ms))
                };
                let show = !clear && iops.is_none() && bps.is_none() && burst_ms.is_none();
                let now = if show {
                    blkbackd::vbd::limit::read_nodes(&xs, &be)
                        .await?
                        .map_err(anyhow::Error::msg)?
                } else {
                    blkbackd::vbd::limit::set_nodes(&xs, &be, change).await?
                };
                match now {
                    Some(l) => println!("{be}: I/O limit {l}"),
                    None => println!(
                        "{be}: no limit of its own (the configuration's [[limit]] rules apply)"
                    ),
                }
                Ok(())
            }
            Cmd::DmCheck { dir } => {
                let ok = blkbackd::dmcheck::run(&dir)?;
                let _ = std::fs::remove_dir_all(&dir);
                anyhow::ensure!(ok, "device-mapper checks failed");
                Ok(())
            }
            Cmd::Bench {
                dir,
                seconds,
                reps,
                size_mib,
                engine,
                poll_us,
                guest_poll_us,
                zero_copy,
                only,
                fairness,
                rbd,
            } => {
                let opts = blkbackd::bench::BenchOptions {
                    dir,
                    seconds,
                    reps,
                    size_mib,
                    engine,
                    poll_us,
                    guest_poll_us: guest_poll_us.unwrap_or(poll_us),
                    zero_copy,
                    only,
                    rbd: rbd.clone(),
                    exe: std::env::current_exe().context("finding the blkbackd binary")?,
                };
                if let Some(image) = rbd {
                    blkbackd::bench::rbd(opts, &image).await
                } else if fairness {
                    blkbackd::bench::fairness(opts).await
                } else {
                    blkbackd::bench::run(opts).await
                }
            }
            Cmd::Xenstored { socket } => xenstored(socket).await,
            Cmd::Serve {
                sim,
                xenstore,
                allow_missing_diskseq,
                config,
            } => serve(sim, xenstore, allow_missing_diskseq, config).await,
            Cmd::XenstoreCheck { endpoint, scratch } => xenstore_check(endpoint, &scratch).await,
            Cmd::Attach {
                domid,
                vdev,
                params,
                read_only,
            } => {
                let devid = blkbackd::attach::devid_of(&vdev)?;
                let xs = xenstore::Client::connect().await?;
                let (paths, id) = blkbackd::attach::attach(
                    &xs,
                    xenstore::DomId(domid),
                    devid,
                    &params,
                    !read_only,
                )
                .await?;
                println!(
                    "attached {params} as {vdev} of domain {domid}: {} ({id})",
                    paths.backend
                );
                Ok(())
            }
            Cmd::Detach { domid, vdev } => {
                let devid = blkbackd::attach::devid_of(&vdev)?;
                let xs = xenstore::Client::connect().await?;
                blkbackd::attach::detach(&xs, xenstore::DomId(domid), devid).await?;
                println!("detached {vdev} of domain {domid}");
                Ok(())
            }
            Cmd::Shutdown {
                close_devices,
                socket,
            } => {
                let socket = status_socket(socket);
                let answer = blkbackd::status::request_stop(&socket, close_devices)
                    .await
                    .with_context(|| format!("asking the daemon on {}", socket.display()))?;
                if answer != "ok" {
                    anyhow::bail!("the daemon on {} answered: {answer}", socket.display());
                }
                println!(
                    "blkbackd is stopping; its devices are {}",
                    if close_devices {
                        "being closed"
                    } else {
                        "handed over to the next daemon"
                    }
                );
                Ok(())
            }
            Cmd::Status { json, socket } => {
                let xs = xenstore::Client::connect().await?;
                let mut vbds = blkbackd::status::collect(&xs).await?;
                let socket = status_socket(socket);
                match blkbackd::status::fetch(&socket).await {
                    Some(live) => blkbackd::status::merge(&mut vbds, &live),
                    None => eprintln!(
                        "(no per-ring counters: the daemon does not answer on {})",
                        socket.display()
                    ),
                }
                let text = if json {
                    serde_json::to_string_pretty(&vbds)? + "\n"
                } else {
                    blkbackd::status::table(&vbds)
                };
                // A reader that stopped early (`| grep -q`, `| head`) is not
                // an error, and never a panic.
                match std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes()) {
                    Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                    _ => Ok(()),
                }
            }
            Cmd::Hotplug {
                action,
                xenbus_path,
            } => {
                let be = xenbus_path
                    .or_else(|| std::env::var("XENBUS_PATH").ok())
                    .ok_or(blkbackd::hotplug::HotplugError::NoPath)?;
                let xs = xenstore::Client::connect().await?;
                if action == "add" {
                    blkbackd::hotplug::add(&xs, &be).await.map(drop)?;
                } else {
                    blkbackd::hotplug::remove(&xs, &be).await?;
                }
                Ok(())
            }
            Cmd::SimGuest {
                dir,
                xenstore,
                domid,
                devid,
                mode,
                ios,
                seed,
                ring_order,
                queues,
                indirect,
                protocol,
                start_index,
                no_persistent,
                bench,
                poll_us,
            } => {
                use blkbackd::sim::guest::{self, GuestArgs};
                let mode: guest::Mode = mode.parse().map_err(anyhow::Error::msg)?;
                let abi = blkbackd::abi::blkif::Abi::from_protocol(Some(&protocol))
                    .with_context(|| format!("unknown protocol {protocol:?}"))?;
                let args = GuestArgs {
                    dir,
                    xenstore,
                    domid: xenstore::DomId(domid),
                    devid,
                    mode,
                    ios,
                    seed,
                    opts: blkbackd::sim::blkfront::FrontOptions {
                        ring_order,
                        queues,
                        indirect,
                        persistent: !no_persistent,
                        abi,
                        start_index,
                    },
                    bench: bench
                        .map(|b| b.parse::<guest::BenchSpec>())
                        .transpose()
                        .map_err(anyhow::Error::msg)?,
                    poll_us,
                };
                match guest::run(args).await {
                    Ok(report) => {
                        println!("SIM-GUEST PASS {report}");
                        Ok(())
                    }
                    Err(e) => {
                        println!("SIM-GUEST FAIL {e}");
                        Err(e.into())
                    }
                }
            }
        }
    })
}

/// The daemon's status socket: as given, else the one beside $XENSTORED_PATH
/// in an embedded default's directory, else the one on real Xen.
fn status_socket(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| {
        let beside = std::env::var_os("XENSTORED_PATH")
            .map(PathBuf::from)
            .and_then(|p| p.parent().map(|d| d.join(blkbackd::status::SIM_SOCKET)))
            .filter(|p| p.exists());
        beside.unwrap_or_else(|| PathBuf::from(blkbackd::status::SOCKET))
    })
}

/// Takes the daemon's instance lock at `path` (held until the process
/// exits), or says that another daemon holds it.
fn one_instance(path: PathBuf) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if !blkbackd::disk::sys::try_lock_exclusive(&file)
        .with_context(|| format!("locking {}", path.display()))?
    {
        anyhow::bail!(
            "another blkbackd serve is running ({} is locked): stop it first; two daemons \
             would both drive every device",
            path.display()
        );
    }
    Ok(file)
}

async fn serve(
    sim: Option<PathBuf>,
    endpoint: Option<PathBuf>,
    allow_missing_diskseq: bool,
    config: Option<PathBuf>,
) -> anyhow::Result<()> {
    use blkbackd::config::Config;
    use blkbackd::vbd::lifecycle::VbdCtx;
    use std::sync::{Arc, RwLock};
    let config = config.or_else(blkbackd::config::default_path);
    let cfg = match &config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let offer = RwLock::new(
        cfg.offer()
            .map_err(|(k, v, r)| anyhow::anyhow!("offer.{k} = {v} is outside {r}"))?,
    );
    let allow_missing_diskseq = allow_missing_diskseq || cfg.allow_missing_diskseq;
    blkbackd::rbd::configure(cfg.rbd.clone());
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        commit = blkbackd::BUILD_COMMIT,
        build = %option_env!("BLKBACKD_BUILD_TAG").unwrap_or("release"),
        on_stop = ?cfg.on_stop,
        "blkbackd starting"
    );
    {
        let budget = &blkbackd::vbd::queue::MAP_BUDGET;
        budget.set_limit(cfg.io.max_persistent_maps.map(|n| n as usize));
        tracing::info!(
            limit = budget.limit(),
            "persistent-grant mappings kept daemon-wide (past it, grants are copied)"
        );
    }
    let endpoint = endpoint.or(cfg.xenstore.clone());
    if allow_missing_diskseq {
        tracing::warn!(
            "serving disks published without diskseq: a reused device number could be served"
        );
    }
    let (stop, stop_rx) = tokio::sync::watch::channel(blkbackd::daemon::Stop::Run);
    let on_stop = cfg.on_stop.stop();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            if blkbackd::signals::until_terminated().await.is_ok() {
                tracing::info!("terminating ({on_stop:?})");
                let _ = stop.send(on_stop);
            }
        });
    }
    // The I/O engine is chosen here, once, and said in the log.
    if offer.read().map(|o| o.engine).unwrap_or_default()
        != blkbackd::io::engine::EngineChoice::Blocking
    {
        blkbackd::io::engine::uring_available();
    }
    // One daemon per Xenstore: two would both drive every device (seen in
    // the VM when an operator started a second one beside an upgraded one).
    let _instance = one_instance(match &sim {
        Some(dir) => dir.join("serve.lock"),
        None => PathBuf::from("/run/blkbackd/serve.lock"),
    })?;
    let live = blkbackd::status::Live::default();
    // Bound before anything is served: a bad address stops the start.
    let metrics = match &cfg.metrics.listen {
        Some(l) => Some(blkbackd::metrics::Endpoint::bind(l).await?),
        None => None,
    };
    let status_socket = match &sim {
        Some(dir) => dir.join(blkbackd::status::SIM_SOCKET),
        None => PathBuf::from(blkbackd::status::SOCKET),
    };
    {
        let (live, path) = (live.clone(), status_socket.clone());
        tokio::spawn(async move {
            if let Err(e) = live.serve(path.clone(), Some(stop)).await {
                tracing::warn!("status socket {} failed: {e}", path.display());
            }
        });
    }
    match sim {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            // Our own Xenstore, unless one is named (`blkbackd xenstored` in
            // another process, as xenstored is in dom0).
            let server = xenstore::Server::default();
            let (_listening, ep) = match endpoint {
                Some(p) => (None, xenstore::Endpoint::for_path(p)),
                None => {
                    let l = server.listen(dir.join("xenstore.sock")).await?;
                    let ep = xenstore::Endpoint::Socket(l.path().into());
                    (Some(l), ep)
                }
            };
            tracing::info!(dir = %dir.display(), "simulated hypervisor; Xenstore at {ep:?}");
            let xs = xenstore::Client::connect_to(&ep).await?;
            serve_metrics(metrics, &xs, &live);
            let ctx = Arc::new(VbdCtx {
                xs,
                grants: Arc::new(blkbackd::xen::sim::SimGrants::new(
                    &dir,
                    xenstore::DomId::DOM0,
                )),
                evtchn: Arc::new(blkbackd::xen::sim::SimEvtchn::new(
                    &dir,
                    xenstore::DomId::DOM0,
                )),
                offer,
                allow_missing_diskseq,
                live: live.clone(),
                limits: RwLock::new(Arc::new(cfg.limit.clone())),
            });
            reload_on_sighup(ctx.clone(), config.clone());
            blkbackd::daemon::run(ctx, stop_rx).await?;
        }
        None => {
            let ep = match endpoint {
                Some(p) => xenstore::Endpoint::for_path(p),
                None => xenstore::Endpoint::from_env()?,
            };
            let xs = xenstore::Client::connect_to(&ep).await?;
            serve_metrics(metrics, &xs, &live);
            let ctx = Arc::new(VbdCtx {
                xs,
                grants: Arc::new(
                    blkbackd::xen::dev::Gntdev::open().context("opening /dev/xen/gntdev")?,
                ),
                evtchn: Arc::new(blkbackd::xen::dev::Evtchn),
                offer,
                allow_missing_diskseq,
                live: live.clone(),
                limits: RwLock::new(Arc::new(cfg.limit.clone())),
            });
            blkbackd::hotplug::reconcile::reconcile_dm(&ctx.xs).await?;
            blkbackd::hotplug::reconcile::reconcile_loops(&ctx.xs).await?;
            reload_on_sighup(ctx.clone(), config.clone());
            blkbackd::daemon::run(ctx, stop_rx).await?;
        }
    }
    Ok(())
}

/// blkbackd.8 and one page per visible command, in section 8 (system
/// administration), as the Debian package installs them.
fn man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let top = Cli::command().name("blkbackd");
    let write = |name: String, bin: String, cmd: clap::Command| -> anyhow::Result<()> {
        let path = dir.join(format!("{name}.8"));
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd.display_name(name).bin_name(bin))
            .section("8")
            .render(&mut out)?;
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
        Ok(())
    };
    for sub in top.get_subcommands().filter(|c| !c.is_hide_set()) {
        let n = sub.get_name();
        write(
            format!("blkbackd-{n}"),
            format!("blkbackd {n}"),
            sub.clone(),
        )?;
    }
    write("blkbackd".to_owned(), "blkbackd".to_owned(), top)
}

/// Answers scrapes on `metrics`, if configured, for as long as the daemon runs.
fn serve_metrics(
    metrics: Option<blkbackd::metrics::Endpoint>,
    xs: &xenstore::Client,
    live: &blkbackd::status::Live,
) {
    let Some(m) = metrics else { return };
    let (xs, live) = (xs.clone(), live.clone());
    tokio::spawn(async move {
        if let Err(e) = m.serve(xs, live).await {
            tracing::error!("the metrics endpoint failed: {e}");
        }
    });
}

/// SIGHUP: re-read the configuration; a bad file keeps the old one (and says why).
fn reload_on_sighup<G, E>(
    ctx: std::sync::Arc<blkbackd::vbd::lifecycle::VbdCtx<G, E>>,
    path: Option<PathBuf>,
) where
    G: Send + Sync + 'static,
    E: Send + Sync + 'static,
{
    use tokio::signal::unix::{signal, SignalKind};
    let Some(path) = path else { return };
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match blkbackd::config::Config::load(&path).map(|c| (c.offer(), c.limit)) {
                Ok((Ok(o), limits)) => {
                    tracing::info!(?o, "configuration re-read; new devices get this offer");
                    *ctx.offer.write().unwrap_or_else(|e| e.into_inner()) = o;
                    tracing::info!(
                        rules = limits.len(),
                        "I/O limit rules re-read; every vbd applies them within a second"
                    );
                    *ctx.limits.write().unwrap_or_else(|e| e.into_inner()) =
                        std::sync::Arc::new(limits);
                }
                Ok((Err((k, v, r)), _)) => {
                    tracing::error!("keeping the old configuration: offer.{k} = {v} is outside {r}")
                }
                Err(e) => tracing::error!("keeping the old configuration: {e}"),
            }
        }
    });
}

async fn xenstored(socket: PathBuf) -> anyhow::Result<()> {
    let server = xenstore::Server::default();
    let listening = server
        .listen(&socket)
        .await
        .with_context(|| format!("listening on {}", socket.display()))?;
    tracing::info!(socket = %listening.path().display(), "embedded Xenstore serving");
    blkbackd::signals::until_terminated().await?;
    tracing::info!("embedded Xenstore stopping");
    Ok(())
}

async fn xenstore_check(endpoint: Option<PathBuf>, scratch: &str) -> anyhow::Result<()> {
    let ep = match endpoint {
        Some(p) => xenstore::Endpoint::for_path(p),
        None => xenstore::Endpoint::from_env()?,
    };
    let client = xenstore::Client::connect_to(&ep).await?;
    let checks = xenstore::conformance::run(&client, scratch).await;
    let mut failed = 0;
    for c in &checks {
        match &c.outcome {
            Ok(()) => println!("XS-CHECK PASS {}", c.name),
            Err(why) => {
                failed += 1;
                println!("XS-CHECK FAIL {}: {why}", c.name);
            }
        }
    }
    println!("{} passed, {} failed", checks.len() - failed, failed);
    anyhow::ensure!(
        failed == 0,
        "{failed} Xenstore checks failed against {ep:?}"
    );
    Ok(())
}
