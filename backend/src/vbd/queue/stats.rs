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
    /// How long requests spent in the backend, from being taken off the
    /// ring to their answer being written (waiting for buffers, the disk,
    /// the copies, waiting for older answers): its own share of the latency
    /// a guest sees, without the wake-ups on either side.
    #[serde(default)]
    pub latency: LatencyHistogram,
}

/// Counts of durations in powers of two of microseconds: bucket 0 holds
/// under 1 µs, bucket `i` holds `[2^(i-1), 2^i)` µs, the last everything
/// longer.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LatencyHistogram {
    /// The counts.
    pub buckets: [u64; LatencyHistogram::BUCKETS],
}

impl LatencyHistogram {
    /// Buckets: up to 2^22 µs (4 s), then one for the rest.
    pub const BUCKETS: usize = 24;

    /// Counts one duration.
    pub fn record(&mut self, d: Duration) {
        let us = d.as_micros();
        let i = if us == 0 {
            0
        } else {
            (128 - us.leading_zeros()) as usize
        };
        self.buckets[i.min(Self::BUCKETS - 1)] += 1;
    }

    /// Adds `other`'s counts.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
    }

    /// The upper bound, in µs, of the bucket that holds the `q`th quantile
    /// (0..=1); `None` when nothing was counted.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(1u64 << i);
            }
        }
        Some(1u64 << (Self::BUCKETS - 1))
    }
}

#[cfg(test)]
mod latency_tests {
    use super::*;

    #[test]
    pub(super) fn durations_land_in_power_of_two_buckets_and_quantiles_bound_them() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.quantile_us(0.5), None);
        h.record(Duration::from_nanos(300)); // bucket 0: under 1 µs
        h.record(Duration::from_micros(1)); // bucket 1: [1, 2)
        h.record(Duration::from_micros(3)); // bucket 2: [2, 4)
        h.record(Duration::from_micros(100)); // bucket 7: [64, 128)
        h.record(Duration::from_secs(60)); // the last bucket
        assert_eq!(h.buckets[0], 1);
        assert_eq!(h.buckets[1], 1);
        assert_eq!(h.buckets[2], 1);
        assert_eq!(h.buckets[7], 1);
        assert_eq!(h.buckets[LatencyHistogram::BUCKETS - 1], 1);
        assert_eq!(h.quantile_us(0.5), Some(4)); // the third of five: under 4 µs
        assert_eq!(h.quantile_us(0.8), Some(128));
        let mut m = LatencyHistogram::default();
        m.merge(&h);
        m.merge(&h);
        assert_eq!(m.buckets.iter().sum::<u64>(), 10);
    }
}
