//! When records became durable, coarsely, so a consumer's flush interval can count from a
//! record's arrival rather than from when the consumer got around to it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Offsets made durable within this long of a remembered arrival share its time.
const BUCKET: Duration = Duration::from_millis(10);
/// Arrivals remembered per partition (at least ~10 s of history at any rate).
const CAPACITY: usize = 1024;

/// `(first offset, when)` per bucket, oldest first. An offset arrived at the time of the
/// last bucket starting at or before it: never later than it really did (a bucket's time
/// is that of its first offset), so a deadline computed from it is never too late.
#[derive(Debug)]
pub(crate) struct Arrivals {
    /// Offsets below this were durable when the partition was opened: arrival unknown.
    opened_at: u64,
    buckets: VecDeque<(u64, Instant)>,
}

impl Arrivals {
    pub(crate) fn new(opened_at: u64) -> Arrivals {
        Arrivals { opened_at, buckets: VecDeque::new() }
    }

    /// Offsets from `first` on became durable at `now`.
    pub(crate) fn record(&mut self, first: u64, now: Instant) {
        if self.buckets.back().is_some_and(|(_, t)| now.saturating_duration_since(*t) < BUCKET) {
            return;
        }
        if self.buckets.len() == CAPACITY {
            self.buckets.pop_front();
        }
        self.buckets.push_back((first, now));
    }

    /// When `offset` became durable, at the latest; `None` for records that were already
    /// in the log when it was opened (they have waited since before this process).
    pub(crate) fn arrived(&self, offset: u64) -> Option<Instant> {
        if offset < self.opened_at {
            return None;
        }
        let i = self.buckets.partition_point(|(first, _)| *first <= offset);
        match i {
            // Older than every remembered bucket (forgotten): it arrived by the oldest one.
            0 => self.buckets.front().map(|(_, t)| *t),
            i => Some(self.buckets[i - 1].1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrival_is_the_bucket_time_never_later() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut a = Arrivals::new(5);
        assert_eq!(a.arrived(0), None, "recovered records");
        assert_eq!(a.arrived(4), None);
        a.record(5, t0);
        a.record(9, t0 + ms(3)); // same bucket: offsets 5.. share t0
        a.record(12, t0 + ms(20));
        a.record(30, t0 + ms(45));
        assert_eq!(a.arrived(5), Some(t0));
        assert_eq!(a.arrived(11), Some(t0));
        assert_eq!(a.arrived(12), Some(t0 + ms(20)));
        assert_eq!(a.arrived(29), Some(t0 + ms(20)));
        assert_eq!(a.arrived(1000), Some(t0 + ms(45)));
        assert_eq!(a.arrived(4), None);
    }

    #[test]
    fn forgotten_arrivals_count_from_the_oldest_remembered() {
        let t0 = Instant::now();
        let mut a = Arrivals::new(0);
        for i in 0..(CAPACITY as u64 + 10) {
            a.record(i * 10, t0 + Duration::from_millis(20 * i));
        }
        // Offsets 0..100 were forgotten: they arrived by the oldest remembered bucket.
        assert_eq!(a.arrived(0), Some(t0 + Duration::from_millis(200)));
        assert_eq!(a.arrived(105), Some(t0 + Duration::from_millis(200)));
        assert_eq!(a.arrived(110), Some(t0 + Duration::from_millis(220)));
    }
}
