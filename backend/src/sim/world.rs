//! The embedded default assembled: an embedded Xenstore on a socket, a
//! simulated hypervisor directory, and vbds served from dom0's side, ready for
//! `blkbackd sim-guest` processes. Used by `blkbackd demo` and the tests.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;
use xenstore::{Client, DomId, Endpoint, Server};

use crate::io::{Disk, MemDisk};
use crate::vbd::queue::{QueueEnd, QueueStats};
use crate::vbd::{self, Offer, VbdError};
use crate::xen::sim::{SimEvtchn, SimGrants};
use crate::xenbus::toolstack::{self, VbdPaths};

/// A running simulation.
#[derive(Debug)]
pub struct SimWorld {
    dir: PathBuf,
    /// The embedded Xenstore.
    pub server: Server,
    listening: xenstore::server::Listening,
    /// Dom0's Xenstore connection (toolstack and backend).
    pub dom0: Client,
    grants: Arc<SimGrants>,
    /// What the vbds served count, and their I/O limiters, as the daemon's.
    pub live: crate::vbd::live::Live,
}

/// A vbd being served.
#[derive(Debug)]
pub struct Served<D = MemDisk> {
    /// Its Xenstore paths.
    pub paths: VbdPaths,
    /// Its disk.
    pub disk: Arc<D>,
    task: tokio::task::JoinHandle<Result<Vec<(QueueEnd, QueueStats)>, VbdError>>,
    stop: watch::Sender<bool>,
}

impl<D> Served<D> {
    /// Stops serving and returns how each queue ended.
    pub async fn finish(self) -> Result<Vec<(QueueEnd, QueueStats)>, VbdError> {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(VbdError::Connect {
                queue: 0,
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }
}

impl SimWorld {
    /// Starts the embedded Xenstore at `dir/xenstore.sock`; `dir` is also the
    /// simulated hypervisor's directory.
    pub async fn start(dir: &Path) -> std::io::Result<SimWorld> {
        std::fs::create_dir_all(dir)?;
        let server = Server::default();
        let listening = server.listen(dir.join("xenstore.sock")).await?;
        let dom0 = Client::connect_to(&Endpoint::Socket(listening.path().into()))
            .await
            .map_err(std::io::Error::other)?;
        Ok(SimWorld {
            dir: dir.to_owned(),
            grants: Arc::new(SimGrants::new(dir, DomId::DOM0)),
            server,
            listening,
            dom0,
            live: Default::default(),
        })
    }

    /// Forgets a guest that has gone: the backend's view of its memory and
    /// its files (as Xen frees a destroyed domain's memory).
    pub fn destroy_domain(&self, d: DomId) {
        self.grants.forget(d);
        crate::xen::sim::destroy_domain_files(&self.dir, d);
    }

    /// The simulation directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The Xenstore socket.
    pub fn xenstore_socket(&self) -> &Path {
        self.listening.path()
    }

    /// A vbd of `domid` backed by an in-memory disk (see [`SimWorld::serve`]).
    pub async fn serve_mem_disk(
        &self,
        domid: DomId,
        devid: u32,
        sectors: u64,
        read_only: bool,
    ) -> Result<Served, VbdError> {
        let disk = Arc::new(MemDisk::new(sectors, read_only));
        self.serve(domid, devid, "memory", disk).await
    }

    /// What the toolstack and the backend do for a vbd of `domid` backed by
    /// `disk`: introduce the domain, create the nodes, publish the features
    /// (InitWait), and serve the frontend once it is ready.
    pub async fn serve<D: Disk>(
        &self,
        domid: DomId,
        devid: u32,
        params: &str,
        disk: Arc<D>,
    ) -> Result<Served<D>, VbdError> {
        self.serve_with(domid, devid, params, disk, Offer::default())
            .await
    }

    /// [`SimWorld::serve`] with what the backend offers and how it does I/O.
    pub async fn serve_with<D: Disk>(
        &self,
        domid: DomId,
        devid: u32,
        params: &str,
        disk: Arc<D>,
        offer: Offer,
    ) -> Result<Served<D>, VbdError> {
        self.server.introduce(domid);
        toolstack::create_domain_home(&self.dom0, domid).await?;
        let mode = if disk.read_only() { "r" } else { "w" };
        let paths = toolstack::create_vbd(&self.dom0, domid, devid, params, mode).await?;
        vbd::publish(&self.dom0, &paths.backend, &*disk, &offer).await?;
        let (stop, stop_rx) = watch::channel(false);
        let (xs, grants, d, p) = (
            self.dom0.clone(),
            self.grants.clone(),
            disk.clone(),
            paths.clone(),
        );
        let evtchn = SimEvtchn::new(&self.dir, DomId::DOM0);
        let live = self.live.clone();
        let task = tokio::spawn(async move {
            vbd::wait_frontend_ready(&xs, &p.frontend, std::time::Duration::from_secs(30)).await?;
            let conn = vbd::Connection {
                xs: &xs,
                be: &p.backend,
                fe: &p.frontend,
                domid,
                grants,
                evtchn: &evtchn,
                disk: d,
                offer: &offer,
                live: Some(&live),
            };
            vbd::serve_frontend(conn, stop_rx).await
        });
        Ok(Served {
            paths,
            disk,
            task,
            stop,
        })
    }

    /// A simulated blkfront in this process speaking for `domid` (with
    /// `pages` of guest memory and as many grant entries), connected to the
    /// vbd whose frontend directory is `frontend`.
    pub async fn front(
        &self,
        domid: DomId,
        frontend: &str,
        opts: &crate::sim::blkfront::FrontOptions,
        pages: u64,
    ) -> Result<crate::sim::blkfront::Blkfront, crate::sim::blkfront::FrontError> {
        let xs = Client::connect_to(&Endpoint::Socket(self.xenstore_socket().into())).await?;
        xs.control(&[xenstore::server::SIM_AS_DOMAIN, &domid.0.to_string()])
            .await?;
        let dom = Arc::new(crate::xen::sim::SimDomain::create(
            &self.dir,
            domid,
            pages,
            pages as u32,
        )?);
        crate::sim::blkfront::Blkfront::connect(xs, dom, frontend, opts).await
    }

    /// The command line of a `sim-guest` process for `domid` (run `exe`, the
    /// blkbackd binary), before mode-specific arguments.
    pub fn guest_command(&self, exe: &Path, domid: DomId, mode: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(exe);
        c.args(["sim-guest", "--mode", mode, "--domid", &domid.0.to_string()])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--xenstore")
            .arg(self.listening.path());
        c
    }
}
