//! Fairness between busy vbds without limits: while several vbds have
//! requests in flight, each may keep at most an equal share of [`BUDGET`]
//! (never less than [`MIN_SHARE`]) in flight at once, as blk-mq shares a
//! device's tags between its active queues. A guest flooding its rings then
//! fills the disk's queue (and the CPU doing its I/O) only up to its share,
//! and a guest waiting on one request at a time does not wait behind the
//! whole flood. Alone, a vbd has no cap. Every queue may always keep one
//! request in flight, so none waits on a share it can never get.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU32, Ordering};

/// Requests in flight the busy vbds of this host share (a SATA disk's
/// queue is 32 deep, an NVMe one's deeper; `blkbackd bench --fairness`
/// brought the quiet guests' p99 within 2x of alone at 64, not at 128).
pub const BUDGET: u32 = 64;
/// The least share a busy vbd gets.
pub const MIN_SHARE: u32 = 8;

/// The vbds that share: how many have requests in flight now.
#[derive(Debug, Default)]
pub struct Host {
    busy: AtomicU32,
}

/// This process's vbds (the daemon's, all on one host).
pub static HOST: Host = Host {
    busy: AtomicU32::new(0),
};

/// One vbd's requests in flight, the sum of its queues' (shared by them).
#[derive(Debug)]
pub struct VbdShare {
    host: &'static Host,
    in_flight: AtomicU32,
}

impl Default for VbdShare {
    fn default() -> Self {
        VbdShare::on(&HOST)
    }
}

impl VbdShare {
    /// A vbd sharing with the others of `host`.
    pub fn on(host: &'static Host) -> VbdShare {
        VbdShare {
            host,
            in_flight: AtomicU32::new(0),
        }
    }

    /// A queue of this vbd had `old` requests in flight and has `new`.
    pub fn account(&self, old: u32, new: u32) {
        if new > old {
            let before = self.in_flight.fetch_add(new - old, Ordering::AcqRel);
            if before == 0 {
                self.host.busy.fetch_add(1, Ordering::AcqRel);
            }
        } else if new < old {
            let before = self.in_flight.fetch_sub(old - new, Ordering::AcqRel);
            if before == old - new {
                self.host.busy.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// How many more requests this vbd may start now (`u32::MAX`: no cap,
    /// it is the only busy vbd).
    pub fn room(&self) -> u32 {
        let busy = self.host.busy.load(Ordering::Acquire);
        if busy <= 1 {
            return u32::MAX;
        }
        let share = (BUDGET / busy).max(MIN_SHARE);
        share.saturating_sub(self.in_flight.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_vbd_beside_others_gets_its_share_and_alone_no_cap() {
        let host: &'static Host = Box::leak(Box::default());
        let (a, b, c) = (VbdShare::on(host), VbdShare::on(host), VbdShare::on(host));
        a.account(0, 100);
        assert_eq!(a.room(), u32::MAX, "alone: no cap");
        b.account(0, 1);
        assert_eq!(host.busy.load(Ordering::Acquire), 2);
        assert_eq!(a.room(), 0, "100 in flight, over its share of 32");
        assert_eq!(b.room(), 31);
        // Queue by queue: two queues of `b` make one busy vbd.
        b.account(0, 3);
        assert_eq!(host.busy.load(Ordering::Acquire), 2);
        // Many busy vbds: never below the least share.
        for _ in 0..30 {
            c.account(0, 1);
            c.account(1, 0);
        }
        let many: Vec<VbdShare> = (0..30).map(|_| VbdShare::on(host)).collect();
        for v in &many {
            v.account(0, 1);
        }
        assert_eq!(many[0].room(), MIN_SHARE - 1);
        for v in &many {
            v.account(1, 0);
        }
        b.account(3, 0);
        b.account(1, 0);
        assert_eq!(a.room(), u32::MAX);
        a.account(100, 0);
        assert_eq!(host.busy.load(Ordering::Acquire), 0);
    }
}
