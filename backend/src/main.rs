//! The `blkbackd` command.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "blkbackd", version, about = "A userspace Xen block backend")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the embedded default: an embedded Xenstore and a simulated toolstack
    /// and guest going through the vbd handshake, printing what happens.
    Demo {
        /// Where to put the Xenstore socket (a temporary directory by default).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Run the embedded Xenstore server on a unix socket until SIGINT/SIGTERM.
    Xenstored {
        /// The socket to listen on (point XENSTORED_PATH at it).
        #[arg(long)]
        socket: PathBuf,
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

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Demo { dir } => blkbackd::demo::run(dir).await,
            Cmd::Xenstored { socket } => xenstored(socket).await,
            Cmd::XenstoreCheck { endpoint, scratch } => xenstore_check(endpoint, &scratch).await,
        }
    })
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
