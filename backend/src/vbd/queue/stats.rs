//! What a queue counts, for `blkbackd status`, the bench and the tests.
#![forbid(unsafe_code)]

use std::time::Duration;

/// What a queue did, for status reports and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueStats {
    /// Requests answered OKAY.
    pub ok: u64,
    /// Requests answered with an error status.
    pub errors: u64,
    /// Reads, writes, flushes (and barriers) and discards answered.
    pub reads: u64,
    /// See `reads`.
    pub writes: u64,
    /// See `reads`.
    pub flushes: u64,
    /// See `reads`.
    pub discards: u64,
    /// Bytes moved to or from the guest.
    pub bytes: u64,
    /// Notifications sent to the frontend.
    pub notifications: u64,
    /// Kicks received from the frontend.
    pub kicks: u64,
    /// Grants mapped and kept (persistent grants).
    pub persistent_maps: u64,
    /// Segments served through a kept mapping instead of a grant copy.
    pub persistent_hits: u64,
    /// Segments served through a per-request mapping (map mode).
    pub mapped_segments: u64,
    /// Requests whose disk I/O ran straight on the guest's pages (kept or
    /// per-request mappings), with no copy at all.
    #[serde(default)]
    pub zero_copy: u64,
    /// Most requests in flight at once.
    pub in_flight_peak: u64,
    /// Times a request waited for bounce buffers.
    pub buffer_waits: u64,
    /// Most bounce-pool bytes in use at once (bounded by the pool's size).
    #[serde(default)]
    pub pool_peak_bytes: u64,
    /// Notifications that brought no new request.
    #[serde(default)]
    pub spurious_kicks: u64,
    /// Grants served by copy because the daemon-wide budget of kept
    /// mappings was spent.
    #[serde(default)]
    pub persistent_over_budget: u64,
    /// Polling windows (after a pass that found work) that found more.
    #[serde(default)]
    pub poll_hits: u64,
    /// Nanoseconds spent polling.
    #[serde(default)]
    pub poll_ns: u64,
    /// Passes whose disk I/O the sleep after them submitted, in the
    /// `io_uring_enter` that waits (a disk that completes asynchronously).
    #[serde(default)]
    pub sleep_submits: u64,
    /// Times a request waited for the vbd's I/O limits.
    #[serde(default)]
    pub throttled: u64,
    /// Times requests waited for the vbd's share of the host's requests in
    /// flight (other vbds were busy).
    #[serde(default)]
    pub share_waits: u64,
    /// How long requests spent in the backend, from being taken off the
    /// ring to their answer being written (waiting for buffers, the disk,
    /// the copies, waiting for older answers), per operation: its own share
    /// of the latency a guest sees, without the wake-ups on either side.
    /// Requests refused when parsed are not timed.
    #[serde(default)]
    pub latency: Latencies,
}

/// One histogram per operation.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Latencies {
    /// Reads.
    #[serde(default)]
    pub read: LatencyHistogram,
    /// Writes.
    #[serde(default)]
    pub write: LatencyHistogram,
    /// Flushes and barriers (with or without data).
    #[serde(default)]
    pub flush: LatencyHistogram,
    /// Discards.
    #[serde(default)]
    pub discard: LatencyHistogram,
}

/// The operations a histogram is kept for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// See [`Latencies`].
    Read,
    /// See [`Latencies`].
    Write,
    /// See [`Latencies`].
    Flush,
    /// See [`Latencies`].
    Discard,
}

impl OpKind {
    /// Every kind, in the order of [`OpKind::name`]'s use in reports.
    pub const ALL: [OpKind; 4] = [OpKind::Read, OpKind::Write, OpKind::Flush, OpKind::Discard];

    /// Its name in reports and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Discard => "discard",
        }
    }
}

impl Latencies {
    /// The histogram of `op`.
    pub fn get(&self, op: OpKind) -> &LatencyHistogram {
        match op {
            OpKind::Read => &self.read,
            OpKind::Write => &self.write,
            OpKind::Flush => &self.flush,
            OpKind::Discard => &self.discard,
        }
    }

    /// The histogram of `op`, to count into.
    pub fn get_mut(&mut self, op: OpKind) -> &mut LatencyHistogram {
        match op {
            OpKind::Read => &mut self.read,
            OpKind::Write => &mut self.write,
            OpKind::Flush => &mut self.flush,
            OpKind::Discard => &mut self.discard,
        }
    }

    /// Every operation's counts in one histogram.
    pub fn all(&self) -> LatencyHistogram {
        let mut h = LatencyHistogram::default();
        for op in OpKind::ALL {
            h.merge(self.get(op));
        }
        h
    }

    /// Adds `other`'s counts.
    pub fn merge(&mut self, other: &Latencies) {
        for op in OpKind::ALL {
            self.get_mut(op).merge(other.get(op));
        }
    }
}

/// Log-linear counts of durations in microseconds (HDR-style): exact below
/// 4 µs, then four buckets per power of two (each at most 25% wide) up to
/// 2^23 µs (about 8.4 s), and one for everything longer. Recording is an
/// index computation and an add: cheap enough to be always on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// The counts; bucket `i` holds durations below [`LatencyHistogram::upper_us`]`(i)`
    /// and at or above the previous bucket's bound.
    pub buckets: [u64; LatencyHistogram::BUCKETS],
    /// The durations' sum in nanoseconds (saturating).
    pub sum_ns: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: [0; Self::BUCKETS],
            sum_ns: 0,
        }
    }
}

impl LatencyHistogram {
    /// Sub-buckets per power of two, as a shift.
    const SUB_BITS: u32 = 2;
    const SUB: usize = 1 << Self::SUB_BITS;
    /// Powers of two with sub-buckets: [4, 8) µs up to [2^22, 2^23) µs.
    const OCTAVES: usize = 21;
    /// Exact buckets for 0..4 µs, the log-linear ones, and the overflow.
    pub const BUCKETS: usize = Self::SUB + Self::OCTAVES * Self::SUB + 1;

    /// The bucket a duration of `us` microseconds falls in.
    fn index(us: u64) -> usize {
        if us < Self::SUB as u64 {
            return us as usize;
        }
        let e = 63 - us.leading_zeros(); // us in [2^e, 2^(e+1)), e >= SUB_BITS
        let octave = (e - Self::SUB_BITS) as usize;
        if octave >= Self::OCTAVES {
            return Self::BUCKETS - 1;
        }
        let sub = ((us >> (e - Self::SUB_BITS)) as usize) & (Self::SUB - 1);
        Self::SUB + octave * Self::SUB + sub
    }

    /// The exclusive upper bound of bucket `i` in µs (`u64::MAX` for the
    /// last, which has none).
    pub fn upper_us(i: usize) -> u64 {
        if i < Self::SUB {
            return i as u64 + 1;
        }
        if i >= Self::BUCKETS - 1 {
            return u64::MAX;
        }
        let (octave, sub) = ((i - Self::SUB) / Self::SUB, (i - Self::SUB) % Self::SUB);
        ((Self::SUB + sub + 1) as u64) << octave
    }

    /// Counts one duration.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let b = &mut self.buckets[Self::index(ns / 1000)];
        *b = b.saturating_add(1);
        self.sum_ns = self.sum_ns.saturating_add(ns);
    }

    /// Durations counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }

    /// Adds `other`'s counts.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a = a.saturating_add(b);
        }
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
    }

    /// How many durations were below `us` microseconds, for a `us` that is
    /// a bucket bound (`None` otherwise): cumulative counts, as Prometheus
    /// histograms give them.
    pub fn count_below_us(&self, us: u64) -> Option<u64> {
        let i = Self::index(us.checked_sub(1)?);
        (Self::upper_us(i) == us).then(|| {
            self.buckets[..=i]
                .iter()
                .fold(0u64, |a, b| a.saturating_add(*b))
        })
    }

    /// The upper bound, in µs, of the bucket that holds the `q`th quantile
    /// (0..=1); `None` when nothing was counted. For the last bucket, its
    /// lower bound (2^23 µs) is returned.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, n) in self.buckets.iter().enumerate() {
            seen = seen.saturating_add(*n);
            if seen >= want {
                return Some(Self::upper_us(i).min(Self::upper_us(Self::BUCKETS - 2)));
            }
        }
        Some(Self::upper_us(Self::BUCKETS - 2))
    }
}

/// In JSON a histogram is its sum and its non-empty buckets,
/// `{"sum_ns": N, "buckets": [[upper_us, count], ...]}` in order (`upper_us`
/// null for the overflow bucket).
#[derive(serde::Serialize, serde::Deserialize)]
struct HistogramJson {
    #[serde(default)]
    sum_ns: u64,
    buckets: Vec<(Option<u64>, u64)>,
}

impl serde::Serialize for LatencyHistogram {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let buckets = (self.buckets.iter().enumerate())
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| ((i < Self::BUCKETS - 1).then(|| Self::upper_us(i)), *c))
            .collect();
        HistogramJson {
            sum_ns: self.sum_ns,
            buckets,
        }
        .serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for LatencyHistogram {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let j = HistogramJson::deserialize(d)?;
        let mut h = LatencyHistogram {
            sum_ns: j.sum_ns,
            ..Default::default()
        };
        for (upper, count) in j.buckets {
            let i = match upper {
                // The bucket whose exclusive bound this is holds upper - 1.
                Some(u) if u > 0 && u <= Self::upper_us(Self::BUCKETS - 2) => Self::index(u - 1),
                None => Self::BUCKETS - 1,
                Some(u) => {
                    return Err(serde::de::Error::custom(format!(
                        "no latency bucket ends at {u} µs"
                    )))
                }
            };
            if Self::upper_us(i) != upper.unwrap_or(u64::MAX) {
                return Err(serde::de::Error::custom(format!(
                    "no latency bucket ends at {upper:?} µs"
                )));
            }
            h.buckets[i] = h.buckets[i].saturating_add(count);
        }
        Ok(h)
    }
}

#[cfg(test)]
mod latency_tests {
    use super::*;

    #[test]
    pub(super) fn durations_land_in_log_linear_buckets_and_quantiles_bound_them() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.quantile_us(0.5), None);
        h.record(Duration::from_nanos(300)); // [0, 1) µs
        h.record(Duration::from_micros(3)); // [3, 4)
        h.record(Duration::from_micros(100)); // [96, 112)
        h.record(Duration::from_micros(101));
        h.record(Duration::from_secs(60)); // the overflow bucket
        assert_eq!(h.buckets[0], 1);
        assert_eq!(h.buckets[3], 1);
        let i100 = LatencyHistogram::index(100);
        assert_eq!(h.buckets[i100], 2);
        assert_eq!(
            (
                LatencyHistogram::upper_us(i100 - 1),
                LatencyHistogram::upper_us(i100)
            ),
            (96, 112)
        );
        assert_eq!(h.buckets[LatencyHistogram::BUCKETS - 1], 1);
        assert_eq!(h.count(), 5);
        assert_eq!(h.quantile_us(0.2), Some(1));
        assert_eq!(h.quantile_us(0.5), Some(112));
        assert_eq!(h.quantile_us(1.0), Some(1 << 23));
        assert_eq!(h.sum_ns, 300 + 3000 + 201_000 + 60_000_000_000);
        // Cumulative counts at bucket bounds, as Prometheus takes them.
        assert_eq!(h.count_below_us(1), Some(1));
        assert_eq!(h.count_below_us(4), Some(2));
        assert_eq!(h.count_below_us(96), Some(2));
        assert_eq!(h.count_below_us(128), Some(4));
        assert_eq!(h.count_below_us(1 << 23), Some(4));
        assert_eq!(h.count_below_us(100), None);
        assert_eq!(h.count_below_us(0), None);
        let mut m = LatencyHistogram::default();
        m.merge(&h);
        m.merge(&h);
        assert_eq!(m.count(), 10);
    }

    #[test]
    fn every_bucket_is_at_most_a_quarter_wide_and_bounds_rise() {
        let mut prev = 0;
        for i in 0..LatencyHistogram::BUCKETS - 1 {
            let up = LatencyHistogram::upper_us(i);
            assert!(up > prev, "bucket {i}: {up} after {prev}");
            assert!(
                prev < 4 || (up - prev) * 4 <= prev,
                "bucket {i} [{prev}, {up}) too wide"
            );
            // Every value in the bucket indexes to it.
            assert_eq!(LatencyHistogram::index(prev), i);
            assert_eq!(LatencyHistogram::index(up - 1), i);
            prev = up;
        }
        assert_eq!(prev, 1 << 23);
        assert_eq!(LatencyHistogram::index(prev), LatencyHistogram::BUCKETS - 1);
        assert_eq!(
            LatencyHistogram::index(u64::MAX),
            LatencyHistogram::BUCKETS - 1
        );
    }

    #[test]
    fn json_carries_the_non_empty_buckets_and_reads_back_the_same() {
        let mut l = Latencies::default();
        l.read.record(Duration::from_micros(5));
        l.write.record(Duration::from_micros(700));
        l.write.record(Duration::from_secs(100));
        let j = serde_json::to_string(&l).unwrap();
        assert_eq!(
            j,
            r#"{"read":{"sum_ns":5000,"buckets":[[6,1]]},"write":{"sum_ns":100000700000,"buckets":[[768,1],[null,1]]},"flush":{"sum_ns":0,"buckets":[]},"discard":{"sum_ns":0,"buckets":[]}}"#
        );
        assert_eq!(serde_json::from_str::<Latencies>(&j).unwrap(), l);
        // A bound that is no bucket's is refused, not misfiled.
        for bad in ["[[9,1]]", "[[0,1]]"] {
            let j = format!(r#"{{"buckets":{bad}}}"#);
            assert!(serde_json::from_str::<LatencyHistogram>(&j).is_err(), "{j}");
        }
    }
}
