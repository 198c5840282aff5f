//! Per-vbd I/O limits: token buckets for requests and bytes per second with
//! a burst, shared by all the vbd's queues. A request over the limit waits
//! (taken off the ring, started when the buckets allow), it never fails; the
//! ring's size bounds what can wait.
//!
//! Where limits come from: the vbd's `limit-iops`, `limit-bps` and
//! `limit-burst-ms` nodes in its backend directory (written by `blkbackd
//! limit`; only dom0 can write there), else the first `[[limit]]` of the
//! configuration naming the guest's domain (by name or UUID), else none.
#![forbid(unsafe_code)]

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One vbd's limits (0: no limit of that kind).
/// One `[[limit]]`: I/O limits for a guest's vbds, the guest named by its
/// domain name or UUID (domids change at every boot; these do not).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitRule {
    /// The domain's name (`/local/domain/D/name`).
    pub domain: Option<String>,
    /// The domain's UUID (`/local/domain/D/vm` is `/vm/UUID`).
    pub uuid: Option<String>,
    /// Only this vbd of it (default: every one).
    pub devid: Option<u32>,
    /// The limits.
    #[serde(flatten)]
    pub limit: IoLimit,
}

impl LimitRule {
    /// Whether it names this guest's vbd.
    pub fn matches(&self, name: Option<&str>, uuid: Option<&str>, devid: u32) -> bool {
        let who = match (&self.domain, &self.uuid) {
            (Some(d), _) => name == Some(d.as_str()),
            (None, Some(u)) => uuid.is_some_and(|v| v.eq_ignore_ascii_case(u)),
            (None, None) => false,
        };
        who && self.devid.is_none_or(|d| d == devid)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoLimit {
    /// Requests per second.
    #[serde(default)]
    pub iops: u64,
    /// Bytes per second (reads and writes; flushes and discards move none).
    #[serde(default)]
    pub bps: u64,
    /// How much may be done at once after an idle spell, in milliseconds of
    /// each rate (0: the default, [`IoLimit::DEFAULT_BURST_MS`]).
    #[serde(default)]
    pub burst_ms: u64,
}

impl IoLimit {
    /// The burst when none is given: a tenth of a second's worth.
    pub const DEFAULT_BURST_MS: u64 = 100;
    /// The largest rates and burst accepted (far above any disk; bounds the
    /// arithmetic).
    pub const MAX_IOPS: u64 = 100_000_000;
    /// See [`IoLimit::MAX_IOPS`].
    pub const MAX_BPS: u64 = 1 << 40;
    /// See [`IoLimit::MAX_IOPS`].
    pub const MAX_BURST_MS: u64 = 60_000;

    /// Whether it limits anything.
    pub fn is_none(&self) -> bool {
        self.iops == 0 && self.bps == 0
    }

    /// Checks the ranges; says which value is out of which.
    pub fn check(&self) -> Result<(), String> {
        for (k, v, max) in [
            ("iops", self.iops, Self::MAX_IOPS),
            ("bps", self.bps, Self::MAX_BPS),
            ("burst_ms", self.burst_ms, Self::MAX_BURST_MS),
        ] {
            if v > max {
                return Err(format!("{k} = {v} is above {max}"));
            }
        }
        Ok(())
    }

    fn burst(&self) -> Duration {
        Duration::from_millis(if self.burst_ms == 0 {
            Self::DEFAULT_BURST_MS
        } else {
            self.burst_ms
        })
    }
}

impl std::fmt::Display for IoLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_none() {
            return write!(f, "none");
        }
        let mut parts = Vec::new();
        if self.iops > 0 {
            parts.push(format!("{} IOPS", self.iops));
        }
        if self.bps > 0 {
            parts.push(format!("{} bytes/s", self.bps));
        }
        write!(
            f,
            "{}, burst {} ms",
            parts.join(", "),
            self.burst().as_millis()
        )
    }
}

/// A token bucket: `rate` tokens a second, holding at most `capacity`. A
/// request is admitted while the bucket is not in debt and then pays its
/// whole cost (the bucket may go into debt), so a request larger than the
/// burst still passes and the long-run rate is exactly `rate`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
}

impl Bucket {
    fn new(rate: u64, burst: Duration) -> Option<Bucket> {
        (rate > 0).then(|| {
            let capacity = (rate as f64 * burst.as_secs_f64()).max(1.0);
            Bucket {
                rate: rate as f64,
                capacity,
                tokens: capacity,
            }
        })
    }

    fn refill(&mut self, elapsed: Duration) {
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate).min(self.capacity);
    }

    /// How long until it is out of debt (zero: now).
    fn wait(&self) -> Duration {
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            // Rounded up to the next 10 µs so a wake-up finds it paid.
            Duration::from_secs_f64(-self.tokens / self.rate + 10e-6)
        }
    }
}

#[derive(Debug)]
struct State {
    limit: IoLimit,
    iops: Option<Bucket>,
    bps: Option<Bucket>,
    last: Instant,
    /// Requests that had to wait.
    throttled: u64,
    /// Queues waiting for the buckets, first come first served (with the
    /// time by which the first must be back, or lose its turn): the vbd's
    /// queues share the rate fairly, none starved by another that happens
    /// to wake first.
    waiters: std::collections::VecDeque<(usize, Instant)>,
    /// The first waiter admitted a request in its turn.
    turn_used: bool,
}

/// A vbd's limits in force, shared by its queues (and changed at run time
/// by the lifecycle when the nodes change). Without limits, admitting is
/// one relaxed load: the queues of a vbd do not contend for the lock.
#[derive(Debug)]
pub struct Limiter(Mutex<State>, std::sync::atomic::AtomicBool);

impl Default for Limiter {
    fn default() -> Self {
        Limiter(
            Mutex::new(State {
                limit: IoLimit::default(),
                iops: None,
                bps: None,
                last: Instant::now(),
                throttled: 0,
                waiters: Default::default(),
                turn_used: false,
            }),
            std::sync::atomic::AtomicBool::new(false),
        )
    }
}

impl Limiter {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `limit` in force now (the buckets start full); the same limit
    /// again changes nothing.
    pub fn set(&self, limit: IoLimit) {
        let mut s = self.lock();
        if s.limit == limit {
            return;
        }
        let burst = limit.burst();
        s.limit = limit;
        s.iops = Bucket::new(limit.iops, burst);
        s.bps = Bucket::new(limit.bps, burst);
        s.last = Instant::now();
        s.waiters.clear();
        s.turn_used = false;
        self.1
            .store(!limit.is_none(), std::sync::atomic::Ordering::Relaxed);
    }

    /// The limit in force.
    pub fn limit(&self) -> IoLimit {
        self.lock().limit
    }

    /// Requests that had to wait so far.
    pub fn throttled(&self) -> u64 {
        self.lock().throttled
    }

    /// Admits one request of queue `queue` moving `bytes` at `now`, or says
    /// how long to wait before asking again. Cheap when no limit is set.
    ///
    /// Queues that had to wait take turns, in the order they came: the one
    /// whose turn it is admits as many requests as the buckets allow, and
    /// passes the turn on when they run dry (or when it has nothing more to
    /// start, [`Limiter::done`]). None is starved by another that happens to
    /// wake first, and a turn costs one wake-up, not one per request.
    pub fn admit(&self, queue: usize, bytes: u64, now: Instant) -> Result<(), Duration> {
        if !self.1.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let mut guard = self.lock();
        let s = &mut *guard;
        if s.iops.is_none() && s.bps.is_none() {
            return Ok(());
        }
        let elapsed = now.saturating_duration_since(s.last);
        s.last = s.last.max(now);
        let mut wait = Duration::ZERO;
        // One request's worth at the slower rate.
        let mut turn = Duration::ZERO;
        for b in [&mut s.iops, &mut s.bps].into_iter().flatten() {
            b.refill(elapsed);
            wait = wait.max(b.wait());
            turn = turn.max(Duration::from_secs_f64(1.0 / b.rate));
        }
        // A queue whose turn it is that did not come back in time (its ring
        // stopped) loses its turn.
        while s
            .waiters
            .front()
            .is_some_and(|(q, by)| *q != queue && *by < now)
        {
            s.waiters.pop_front();
            s.turn_used = false;
        }
        match s.waiters.front().map(|(q, _)| *q) {
            Some(f) if f != queue => {
                s.throttled += 1;
                if !s.waiters.iter().any(|(q, _)| *q == queue) {
                    s.waiters.push_back((queue, now));
                }
                return Err(wait.max(turn));
            }
            front => {
                if !wait.is_zero() {
                    s.throttled += 1;
                    if front == Some(queue) && s.turn_used && s.waiters.len() > 1 {
                        // Its turn is spent: the next one's.
                        if let Some(me) = s.waiters.pop_front() {
                            s.waiters.push_back(me);
                        }
                        s.turn_used = false;
                    } else if front.is_none() {
                        s.waiters.push_back((queue, now));
                    }
                    // Whoever's turn it is must be back within its wait
                    // and a margin.
                    if let Some(f) = s.waiters.front_mut() {
                        f.1 = now + wait + Duration::from_millis(50);
                    }
                    return Err(wait);
                }
                if front == Some(queue) {
                    s.turn_used = true;
                }
            }
        }
        if let Some(b) = &mut s.iops {
            b.tokens -= 1.0;
        }
        if let Some(b) = &mut s.bps {
            b.tokens -= bytes as f64;
        }
        Ok(())
    }

    /// Queue `queue` has nothing more waiting for the buckets: it gives up
    /// its turn, or its place in line.
    pub fn done(&self, queue: usize, now: Instant) {
        if !self.1.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut s = self.lock();
        if s.waiters.is_empty() {
            return;
        }
        if s.waiters.front().is_some_and(|(q, _)| *q == queue) {
            s.waiters.pop_front();
            s.turn_used = false;
            if let Some(f) = s.waiters.front_mut() {
                f.1 = now + Duration::from_millis(50);
            }
        } else {
            s.waiters.retain(|(q, _)| *q != queue);
        }
    }
}

/// The limit a vbd's own nodes set, if any: `limit-iops`, `limit-bps`,
/// `limit-burst-ms` (decimal; a missing one is 0). `Err` names a bad value.
pub fn from_nodes(
    iops: Option<&str>,
    bps: Option<&str>,
    burst_ms: Option<&str>,
) -> Result<Option<IoLimit>, String> {
    if iops.is_none() && bps.is_none() && burst_ms.is_none() {
        return Ok(None);
    }
    let num = |k: &str, v: Option<&str>| -> Result<u64, String> {
        v.map_or(Ok(0), |v| {
            v.trim().parse().map_err(|_| {
                format!(
                    "{k} = {:?} is not a number",
                    crate::vbd::lifecycle::truncated(v)
                )
            })
        })
    };
    let l = IoLimit {
        iops: num("limit-iops", iops)?,
        bps: num("limit-bps", bps)?,
        burst_ms: num("limit-burst-ms", burst_ms)?,
    };
    l.check()?;
    Ok(Some(l))
}

/// The names of a vbd's limit nodes, in [`from_nodes`]'s order.
pub const NODES: [&str; 3] = ["limit-iops", "limit-bps", "limit-burst-ms"];

/// The limit the vbd at `be`'s own nodes set, if any (the inner error
/// names a bad value).
pub async fn read_nodes(
    xs: &xenstore::Client,
    be: &str,
) -> Result<Result<Option<IoLimit>, String>, xenstore::Error> {
    use xenstore::Xs;
    let keys = NODES.map(|k| format!("{be}/{k}"));
    let mut v: [Option<String>; 3] = Default::default();
    for (slot, k) in v.iter_mut().zip(&keys) {
        *slot = xs.try_read_text(k).await?;
    }
    Ok(from_nodes(
        v[0].as_deref(),
        v[1].as_deref(),
        v[2].as_deref(),
    ))
}

/// `blkbackd limit`: changes the limit nodes of the vbd at `be` in one
/// transaction (`None` removes them: the configuration's rules apply
/// again) and returns the limit now stored. Values given replace the
/// stored ones, values not given keep them. The vbd must exist; its
/// daemon applies the change at once.
pub async fn set_nodes(
    xs: &xenstore::Client,
    be: &str,
    change: Option<(Option<u64>, Option<u64>, Option<u64>)>,
) -> Result<Option<IoLimit>, anyhow::Error> {
    use xenstore::Xs;
    let be = be.to_owned();
    let stored = xs
        .transaction(|tx| {
            let be = be.clone();
            async move {
                if tx.try_read(&format!("{be}/state")).await?.is_none() {
                    return Ok(Err(format!("there is no vbd at {be}")));
                }
                let paths = NODES.map(|k| format!("{be}/{k}"));
                let Some((iops, bps, burst)) = change else {
                    for p in &paths {
                        if tx.try_read(p).await?.is_some() {
                            tx.rm(p).await?;
                        }
                    }
                    return Ok(Ok(None));
                };
                let mut now = [0u64; 3];
                for (i, (p, given)) in paths.iter().zip([iops, bps, burst]).enumerate() {
                    let old = tx.try_read(p).await?;
                    let old = old.as_deref().map(String::from_utf8_lossy);
                    now[i] = match (given, old) {
                        (Some(v), _) => v,
                        (None, Some(v)) => v.trim().parse().unwrap_or(0),
                        (None, None) => 0,
                    };
                }
                let l = IoLimit {
                    iops: now[0],
                    bps: now[1],
                    burst_ms: now[2],
                };
                if let Err(e) = l.check() {
                    return Ok(Err(e));
                }
                for (p, v) in paths.iter().zip(now) {
                    tx.write(p, v.to_string().as_bytes()).await?;
                }
                Ok(Ok(Some(l)))
            }
        })
        .await?;
    stored.map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Admits as fast as it may for `secs` of simulated time in 100 µs
    /// steps; returns the requests admitted.
    fn run(l: &Limiter, bytes: u64, secs: f64) -> u64 {
        let t0 = Instant::now();
        let mut now = t0;
        let mut n = 0;
        while now < t0 + Duration::from_secs_f64(secs) {
            match l.admit(0, bytes, now) {
                Ok(()) => n += 1,
                Err(w) => now += w.max(Duration::from_micros(100)),
            }
        }
        n
    }

    #[test]
    fn no_limit_admits_everything() {
        let l = Limiter::default();
        let now = Instant::now();
        for _ in 0..100_000 {
            assert_eq!(l.admit(0, 1 << 20, now), Ok(()));
        }
        assert_eq!(l.throttled(), 0);
    }

    #[test]
    fn the_long_run_rate_is_the_limit_plus_one_burst() {
        let l = Limiter::default();
        l.set(IoLimit {
            iops: 1000,
            ..Default::default()
        });
        // 10 s: 10,000 at the rate, plus the 100-request burst it starts with.
        let n = run(&l, 4096, 10.0);
        assert!((10_090..=10_110).contains(&n), "{n}");
        assert!(l.throttled() > 0);

        let l = Limiter::default();
        l.set(IoLimit {
            bps: 10 << 20,
            burst_ms: 50,
            ..Default::default()
        });
        let n = run(&l, 128 << 10, 10.0); // 80 a second
        assert!((800..=806).contains(&n), "{n}");
    }

    #[test]
    fn a_request_larger_than_the_burst_still_passes_and_pays_its_debt() {
        let l = Limiter::default();
        l.set(IoLimit {
            bps: 1000,
            burst_ms: 10, // 10 bytes of burst
            ..Default::default()
        });
        let t = Instant::now();
        assert_eq!(l.admit(0, 4096, t), Ok(()));
        let w = l.admit(0, 4096, t).unwrap_err();
        assert!(
            w >= Duration::from_millis(4086) && w < Duration::from_millis(4100),
            "{w:?}"
        );
        assert_eq!(l.admit(0, 4096, t + w), Ok(()));
    }

    #[test]
    fn both_limits_hold_together_and_can_be_changed_or_lifted() {
        let l = Limiter::default();
        l.set(IoLimit {
            iops: 500,
            bps: 1 << 20,
            burst_ms: 10,
        });
        // 4 KiB: 256 a second by bytes, fewer than 500 by count.
        let n = run(&l, 4096, 4.0);
        assert!((1020..=1030).contains(&n), "{n}");
        l.set(IoLimit::default());
        assert!(l.limit().is_none());
        let now = Instant::now();
        assert!((0..10_000).all(|_| l.admit(0, 4096, now).is_ok()));
    }

    #[test]
    fn queues_sharing_a_limit_take_turns_whichever_wakes_first() {
        let l = Limiter::default();
        l.set(IoLimit {
            iops: 100,
            burst_ms: 10, // one request
            ..Default::default()
        });
        // Queue 0 always asks first when both wake; queue 1 still gets
        // every other request.
        let t0 = Instant::now();
        let (mut now, mut got) = (t0, [0u32; 2]);
        while now < t0 + Duration::from_secs(10) {
            let mut next = Duration::from_millis(5);
            for (q, n) in got.iter_mut().enumerate() {
                match l.admit(q, 4096, now) {
                    Ok(()) => *n += 1,
                    Err(w) => next = next.min(w),
                }
            }
            now += next.max(Duration::from_micros(100));
        }
        assert!(got[0].abs_diff(got[1]) <= 2, "{got:?}");
        assert!((995..=1005).contains(&(got[0] + got[1])), "{got:?}");
        // A queue that stops asking (its ring stopped) loses its turn.
        l.set(IoLimit {
            iops: 101,
            burst_ms: 10,
            ..Default::default()
        });
        let t = Instant::now();
        assert!(l.admit(5, 0, t).is_ok());
        while l.admit(5, 0, t).is_ok() {} // 5's turn next, then it never returns
        assert!(l.admit(1, 0, t + Duration::from_millis(15)).is_err()); // not 1's turn
        let later = t + Duration::from_millis(200);
        assert!(l.admit(1, 0, later).is_ok());
    }

    #[test]
    fn a_turn_admits_what_the_buckets_hold_in_one_go() {
        let l = Limiter::default();
        l.set(IoLimit {
            iops: 60_000,
            ..Default::default()
        });
        // Four queues, each waking every millisecond (poll(2)'s resolution)
        // with 32 requests waiting: the rate is the limit, not one request
        // per queue per wake-up.
        let t0 = Instant::now();
        let mut got = [0u64; 4];
        for ms in 0..1000u64 {
            let now = t0 + Duration::from_millis(ms);
            for (q, n) in got.iter_mut().enumerate() {
                let mut took = 0;
                while took < 32 && l.admit(q, 4096, now).is_ok() {
                    took += 1;
                }
                *n += took;
                if took == 32 {
                    l.done(q, now);
                }
            }
        }
        let total: u64 = got.iter().sum();
        // A second at the rate, plus the 100 ms burst it starts with.
        assert!((65_000..=66_100).contains(&total), "{got:?}");
        // And fairly: each queue about a quarter.
        assert!(
            got.iter().all(|n| n.abs_diff(total / 4) < total / 20),
            "{got:?}"
        );
    }

    #[test]
    fn nodes_are_read_strictly() {
        assert_eq!(from_nodes(None, None, None), Ok(None));
        assert_eq!(
            from_nodes(Some("100"), None, Some("20")),
            Ok(Some(IoLimit {
                iops: 100,
                bps: 0,
                burst_ms: 20
            }))
        );
        assert!(from_nodes(Some("-1"), None, None)
            .unwrap_err()
            .contains("limit-iops"));
        assert!(from_nodes(None, Some("lots"), None)
            .unwrap_err()
            .contains("limit-bps"));
        assert!(from_nodes(None, None, Some("99999999"))
            .unwrap_err()
            .contains("burst_ms"));
        assert!(from_nodes(Some("18446744073709551615"), None, None).is_err());
    }
}
