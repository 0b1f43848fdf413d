//! When the sync loop may start its next sync: kube-proxy's sync-runner semantics (its
//! `BoundedFrequencyRunner`, constructed with `minSyncPeriod` and a burst of 2).
//!
//! A token bucket holds up to `burst` syncs and refills at one per `min_interval`; a sync takes
//! one. With a token to spare, a sync starts at once; without one, it waits until
//! `min_interval` after the end of the previous sync. So:
//! - after a quiet period, the first changes apply at once: a Service and its EndpointSlice
//!   created milliseconds apart land in one or two syncs, neither waiting out `min_interval`;
//! - under sustained churn the bucket stays empty and syncs are spaced by `min_interval`
//!   (from the end of one to the start of the next), each taking in every change that arrived
//!   meanwhile;
//! - `min_interval` zero: always at once.
//!
//! Pure: every method takes the time it is called at, so that the tests use explicit instants.

use std::time::{Duration, Instant};

use super::later;

/// kube-proxy's `burstSyncs` (both its nftables and its iptables proxier).
pub const BURST_SYNCS: u32 = 2;

/// The sync loop's rate limiter. See the module documentation.
#[derive(Debug, Clone)]
pub struct Pacer {
    min_interval: Duration,
    burst: f64,
    /// Tokens in the bucket at `counted_at` (the bucket starts full, as kube-proxy's does).
    tokens: f64,
    counted_at: Option<Instant>,
    /// When the last sync ended.
    last_end: Option<Instant>,
}

impl Pacer {
    pub fn new(min_interval: Duration, burst: u32) -> Pacer {
        let burst = f64::from(burst.max(1));
        Pacer {
            min_interval,
            burst,
            tokens: burst,
            counted_at: None,
            last_end: None,
        }
    }

    /// The tokens in the bucket at `now`.
    fn tokens_at(&self, now: Instant) -> f64 {
        match self.counted_at {
            None => self.burst,
            Some(at) => {
                let refill = now.saturating_duration_since(at).as_secs_f64()
                    / self.min_interval.as_secs_f64();
                (self.tokens + refill).min(self.burst)
            }
        }
    }

    /// The earliest a sync may start, for a change pending at `now` (`now` itself if at once).
    pub fn earliest(&self, now: Instant) -> Instant {
        if self.min_interval.is_zero() || self.tokens_at(now) >= 1.0 {
            return now;
        }
        // No token: the next possible run is min_interval after the last one ended (by then
        // the bucket has refilled at least one token since the last sync took its own).
        match self.last_end {
            Some(end) => later(end, self.min_interval).max(now),
            // A sync is running that took the last token and has not ended: wait for it.
            None => later(now, self.min_interval),
        }
    }

    /// A sync starts at `now`: it takes a token.
    pub fn started(&mut self, now: Instant) {
        if self.min_interval.is_zero() {
            return;
        }
        self.tokens = (self.tokens_at(now) - 1.0).max(0.0);
        self.counted_at = Some(now);
    }

    /// The sync that started last ended at `now` (successfully or not).
    pub fn ended(&mut self, now: Instant) {
        self.last_end = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const SECOND: Duration = Duration::from_secs(1);

    /// Runs a sync of `took` at the earliest moment for a change pending at `at`; returns when
    /// it started.
    fn sync(p: &mut Pacer, at: Instant, took: Duration) -> Instant {
        let start = p.earliest(at);
        p.started(start);
        p.ended(start + took);
        start
    }

    #[test]
    fn the_first_changes_after_a_quiet_period_apply_at_once() {
        let t0 = Instant::now();
        let mut p = Pacer::new(SECOND, BURST_SYNCS);
        // The first sync of all, then a Service and its slice 5 ms apart, after a long quiet.
        assert_eq!(sync(&mut p, t0, 20 * MS), t0);
        let quiet = t0 + 60 * SECOND;
        assert_eq!(sync(&mut p, quiet, 15 * MS), quiet, "the Service");
        let slice = quiet + 20 * MS;
        assert_eq!(sync(&mut p, slice, 15 * MS), slice, "its slice");
        // A third change right after waits min_interval from the end of the second sync.
        let third = slice + 20 * MS;
        assert_eq!(p.earliest(third), slice + 15 * MS + SECOND);
    }

    #[test]
    fn sustained_churn_is_spaced_by_min_interval() {
        let t0 = Instant::now();
        let mut p = Pacer::new(SECOND, BURST_SYNCS);
        let took = 30 * MS;
        // A change every millisecond for 20 s: each sync is pending as soon as the previous
        // one ends.
        let mut starts = Vec::new();
        let mut now = t0;
        while now < t0 + 20 * SECOND {
            let start = sync(&mut p, now, took);
            starts.push(start);
            now = start + took + MS;
        }
        // Two burst syncs, then one per min_interval after the previous one ended.
        assert_eq!(starts[0], t0);
        assert_eq!(starts[1], t0 + took + MS);
        for w in starts[1..].windows(2) {
            assert!(w[1] >= w[0] + took + SECOND, "{:?}", w[1] - w[0]);
        }
        for w in starts[2..].windows(2) {
            assert_eq!(w[1] - w[0], took + SECOND);
        }
        // About 20 syncs in 20 s, not 20,000.
        assert!(starts.len() <= 2 + 20, "{}", starts.len());
    }

    #[test]
    fn the_bucket_refills_one_token_per_min_interval_up_to_the_burst() {
        let t0 = Instant::now();
        let mut p = Pacer::new(SECOND, BURST_SYNCS);
        sync(&mut p, t0, MS);
        sync(&mut p, t0 + 2 * MS, MS);
        // Empty now; 1 s after the first token was taken and 1 s after the last sync ended.
        let after = t0 + 3 * MS + SECOND;
        assert_eq!(p.earliest(t0 + 4 * MS), after);
        assert_eq!(sync(&mut p, after, MS), after);
        // Half a second later: half a token, so wait for the end of the last + 1 s.
        let half = after + SECOND / 2;
        assert_eq!(p.earliest(half), after + MS + SECOND);
        // Ten seconds of quiet fill the bucket to 2, no more: two syncs at once, the third waits.
        let later = after + 10 * SECOND;
        assert_eq!(sync(&mut p, later, MS), later);
        assert_eq!(sync(&mut p, later + 2 * MS, MS), later + 2 * MS);
        assert_eq!(p.earliest(later + 4 * MS), later + 3 * MS + SECOND);
    }

    #[test]
    fn a_huge_min_interval_does_not_panic() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Duration::MAX, 1);
        assert_eq!(sync(&mut p, t0, MS), t0);
        assert!(p.earliest(t0 + 2 * MS) > t0 + 1000 * 24 * 3600 * SECOND);
    }

    #[test]
    fn a_zero_min_interval_never_waits() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Duration::ZERO, BURST_SYNCS);
        for i in 0..100u32 {
            let now = t0 + i * MS;
            assert_eq!(sync(&mut p, now, MS / 2), now);
        }
    }

    #[test]
    fn a_sync_still_running_holds_the_next_when_the_bucket_is_empty() {
        let t0 = Instant::now();
        let mut p = Pacer::new(SECOND, 1);
        p.started(t0);
        // Not ended yet: no earlier than min_interval from now.
        assert_eq!(p.earliest(t0 + MS), t0 + MS + SECOND);
        p.ended(t0 + 500 * MS);
        assert_eq!(p.earliest(t0 + 600 * MS), t0 + 1500 * MS);
    }
}
