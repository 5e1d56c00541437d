//! Reading streams in flushes: what the lake sink and pipelines share.

use crate::{LogError, Stream, StoredRecord};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// One record read by [`collect`]: which of the given streams, which partition.
#[derive(Debug, Clone)]
pub struct Collected {
    pub stream: usize,
    pub partition: u32,
    pub record: StoredRecord,
}

/// When [`collect`] returns.
#[derive(Debug, Clone, Copy)]
pub struct FlushPolicy {
    /// Return once this many value bytes are buffered ...
    pub bytes: u64,
    /// ... or this long after the first record arrived ...
    pub interval: Duration,
    /// Templated records as their fields and template ([`Partition::read_fields`]) instead
    /// of whole values.
    pub fields: bool,
}

impl FlushPolicy {
    /// ... or once the streams have gone quiet (nothing new for a tenth of the interval)
    /// with at least an eighth of `bytes` buffered: the end of a burst or bulk load is landed
    /// at once instead of an interval later, while a trickle still waits for the interval
    /// (so a flush is never smaller than an eighth of a full one before its interval).
    fn quiet(&self, buffered: u64) -> Option<Duration> {
        (buffered >= self.bytes / 8).then_some(self.interval / 10)
    }
}

/// Reads durable records of `streams` from the positions in `next` (`next[s][p]`, advanced
/// past what is returned) until the policy says flush; when `shutdown` turns true, until
/// nothing more is durable. Partitions are read in turn so none starves.
///
/// The interval counts from when the oldest record read became durable
/// ([`Partition::arrived`]), so records that waited in the log while the consumer was busy
/// (a long commit, a backlog) are flushed as soon as it gets to them, and a record that
/// arrives at an idle consumer waits at most the interval. Records recovered from disk
/// have waited since before this process and are due at once. A sizeable flush is also
/// due once the streams go quiet (see [`FlushPolicy`]).
pub async fn collect(
    streams: &[Arc<Stream>],
    next: &mut [Vec<u64>],
    policy: FlushPolicy,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Vec<Collected>, LogError> {
    let mut out = Vec::new();
    let mut bytes = 0u64;
    // When the oldest record read so far arrived (`Some(None)`: before this process).
    let mut oldest: Option<Option<Instant>> = None;
    // When the newest record read so far arrived (`None`: before this process).
    let mut newest: Option<Instant> = None;
    loop {
        let mut got = false;
        for (s, stream) in streams.iter().enumerate() {
            for p in stream.partitions() {
                let i = p.id() as usize;
                if bytes >= policy.bytes || next[s][i] >= p.high_watermark() {
                    continue;
                }
                let budget = (policy.bytes - bytes).clamp(64 << 10, 8 << 20) as usize;
                let recs = if policy.fields { p.read_fields(next[s][i], budget)? } else { p.read(next[s][i], budget)? };
                if let (Some(first), Some(last)) = (recs.first(), recs.last()) {
                    let arrived = p.arrived(first.offset);
                    oldest = Some(match oldest {
                        None => arrived,
                        Some(o) => o.zip(arrived).map(|(a, b)| a.min(b)),
                    });
                    newest = newest.max(p.arrived(last.offset));
                    next[s][i] = last.offset + 1;
                    got = true;
                }
                if out.is_empty() && !recs.is_empty() {
                    // Room for a whole flush of records this size at once: doubling up to a
                    // 64 MiB flush copied ~20 MB of `Collected` each time. A flush ends past
                    // its bytes by up to a read (whole batches), hence the read's count on top:
                    // without it the last read of a full flush doubled the vector (13% of a
                    // bulk load's page faults).
                    let avg = recs.iter().map(|r| r.value_len() as u64).sum::<u64>() / recs.len() as u64;
                    out.reserve((policy.bytes / avg.max(1)).min(1 << 20) as usize + recs.len());
                }
                for r in recs {
                    bytes += r.value_len() as u64;
                    out.push(Collected { stream: s, partition: p.id(), record: r });
                }
            }
        }
        let now = Instant::now();
        let mut deadline = oldest.map(|o| o.map_or(now, |t| t + policy.interval));
        if let Some(quiet) = policy.quiet(bytes) {
            let idle_at = newest.map_or(now, |t| t + quiet);
            deadline = deadline.map(|d| d.min(idle_at));
        }
        let stopping = *shutdown.borrow();
        // Once due, what is already durable still goes into this flush (up to the bytes).
        if bytes >= policy.bytes || (!got && (stopping || deadline.is_some_and(|d| now >= d))) {
            return Ok(out);
        }
        if got {
            continue;
        }
        let wait = deadline.map_or(Duration::from_millis(500), |d| d.saturating_duration_since(now));
        let mut waits: Vec<Pin<Box<dyn Future<Output = ()> + Send + '_>>> = Vec::new();
        for (s, stream) in streams.iter().enumerate() {
            for p in stream.partitions() {
                waits.push(Box::pin(p.wait_for(next[s][p.id() as usize], wait)));
            }
        }
        if waits.is_empty() {
            waits.push(Box::pin(tokio::time::sleep(wait)));
        }
        tokio::select! {
            _ = select_any(waits) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Completes when the first of `futs` does.
async fn select_any<F: Future<Output = ()> + Unpin>(mut futs: Vec<F>) {
    std::future::poll_fn(|cx| {
        for f in futs.iter_mut() {
            if Pin::new(f).poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Runs `commit` and `ahead` at once (a flush being committed while the next is read). If
/// `commit` fails, returns at once without `ahead`'s result, so a failed commit is retried
/// right away instead of after more records arrive.
pub async fn commit_while_reading<T, E, U>(
    commit: impl Future<Output = Result<T, E>>,
    ahead: impl Future<Output = U>,
) -> (Result<T, E>, Option<U>) {
    let mut commit = std::pin::pin!(commit);
    let mut ahead = std::pin::pin!(ahead);
    let mut committed: Option<Result<T, E>> = None;
    let mut read: Option<U> = None;
    loop {
        tokio::select! {
            r = &mut commit, if committed.is_none() => {
                if r.is_err() {
                    return (r, None);
                }
                committed = Some(r);
            }
            r = &mut ahead, if read.is_none() => read = Some(r),
        }
        if committed.is_some() && read.is_some() {
            return (committed.expect("set"), read);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_commit_does_not_wait_for_the_read_ahead() {
        let (r, ahead) = commit_while_reading(async { Err::<(), _>("disk full") }, std::future::pending::<u32>()).await;
        assert_eq!(r, Err("disk full"));
        assert!(ahead.is_none());
        let (r, ahead) = commit_while_reading(
            async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok::<_, ()>(1)
            },
            async { 2 },
        )
        .await;
        assert_eq!((r, ahead), (Ok(1), Some(2)));
    }

    /// Records recovered from disk have waited since before this process: with a one-hour
    /// interval they are returned at once (the timeout only keeps a broken build from
    /// hanging the suite).
    #[tokio::test]
    async fn recovered_records_are_due_at_once() {
        let dir = tempfile::tempdir().unwrap();
        drop(stream_with(dir.path(), b"{}", 1).await);
        let log = crate::Log::open(dir.path(), crate::LogConfig::default()).unwrap();
        let stream = log.stream("s").unwrap();
        let policy = FlushPolicy { bytes: 1 << 30, interval: Duration::from_secs(3600), fields: false };
        let (_tx, mut shutdown) = watch::channel(false);
        let mut next = vec![vec![0]];
        let got = tokio::time::timeout(Duration::from_secs(60), collect(&[stream.clone()], &mut next, policy, &mut shutdown)).await;
        assert_eq!(got.expect("returned without waiting for the interval").unwrap().len(), 1);
        assert_eq!(next, vec![vec![1]]);
    }

    /// A stream `s` of one partition in a new log in `dir`, holding `n` records `value` (durable).
    async fn stream_with(dir: &std::path::Path, value: &'static [u8], n: usize) -> (crate::Log, Arc<Stream>) {
        let log = crate::Log::open(dir, crate::LogConfig::default()).unwrap();
        let stream = log.create_stream("s", crate::StreamOptions::default()).unwrap();
        let p = stream.partition(0).unwrap();
        let recs: Vec<_> = (0..n).map(|_| crate::Record::new(bytes::Bytes::from_static(value), 1)).collect();
        let a = p.append(&recs).unwrap();
        p.sync(&a).await.unwrap();
        (log, stream)
    }

    /// A record that just arrived waits for the interval (here: longer than the test waits),
    /// even once the stream is quiet (after 0.2 s), when the flush would be small.
    #[tokio::test]
    async fn a_new_record_waits_for_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, stream) = stream_with(dir.path(), b"{}", 1).await;
        let policy = FlushPolicy { bytes: 1 << 30, interval: Duration::from_secs(2), fields: false };
        let (_tx, mut shutdown) = watch::channel(false);
        let mut next = vec![vec![0]];
        let got = tokio::time::timeout(Duration::from_millis(1000), collect(&[stream.clone()], &mut next, policy, &mut shutdown)).await;
        assert!(got.is_err(), "a fresh record was flushed before its interval");
    }

    /// At least an eighth of the flush size buffered and nothing new for a tenth of the
    /// interval (1 s of 10 here): flushed then, not at the interval.
    #[tokio::test]
    async fn a_burst_is_flushed_once_the_stream_is_quiet() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, stream) = stream_with(dir.path(), b"{\"a\":1}", 3).await;
        // 21 bytes buffered: over an eighth of 160, under a full flush.
        let policy = FlushPolicy { bytes: 160, interval: Duration::from_secs(10), fields: false };
        let (_tx, mut shutdown) = watch::channel(false);
        let mut next = vec![vec![0]];
        let got = tokio::time::timeout(Duration::from_secs(8), collect(&[stream.clone()], &mut next, policy, &mut shutdown)).await;
        assert_eq!(got.expect("flushed once quiet, before the interval").unwrap().len(), 3);
        assert_eq!(next, vec![vec![3]]);
    }
}
