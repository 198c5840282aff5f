//! Waiting for the signals that stop a daemon.

#![forbid(unsafe_code)]

use tokio::signal::unix::{signal, SignalKind};

/// Returns when SIGINT or SIGTERM arrives.
pub async fn until_terminated() -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
