//! Cuts batches by count, bytes or time window (DESIGN.md "Batches"). A
//! record that does not fit is carried into the next batch. With a zero
//! window a batch takes only what is already buffered, so latency stays
//! low when traffic is light.

use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::handler::Record;
use crate::source::RecordReader;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub batch_size: usize,
    pub max_batch_bytes: usize,
    pub window: std::time::Duration,
}

/// Cuts batches from one reader; keeps the record that did not fit.
pub struct Batcher<R> {
    pub reader: R,
    limits: Limits,
    carry: Option<Record>,
}

impl<R: RecordReader> Batcher<R> {
    pub fn new(reader: R, limits: Limits) -> Self {
        Self { reader, limits, carry: None }
    }

    /// The next batch, or `None` when `stop` fires before a first record
    /// arrives (a record already carried is never dropped: it is returned)
    /// or the reader has ended.
    pub async fn next_batch(&mut self, stop: &CancellationToken) -> Option<Vec<Arc<Record>>> {
        let first = match self.carry.take() {
            Some(r) => r,
            None => stop.run_until_cancelled(self.reader.next()).await??,
        };
        let deadline = Instant::now() + self.limits.window;
        let mut bytes = first.payload_len();
        // Room for a full batch from the start (bounded: a huge batch_size
        // grows as records come), so filling it does not reallocate.
        let mut records = Vec::with_capacity(self.limits.batch_size.min(4096));
        records.push(Arc::new(first));
        while records.len() < self.limits.batch_size {
            let next = if self.limits.window.is_zero() {
                self.reader.try_next()
            } else {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => None,
                    () = tokio::time::sleep_until(deadline) => None,
                    r = self.reader.next() => r,
                }
            };
            let Some(record) = next else { break };
            if bytes + record.payload_len() > self.limits.max_batch_bytes {
                self.carry = Some(record);
                break;
            }
            bytes += record.payload_len();
            records.push(Arc::new(record));
        }
        Some(records)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::time::Duration;

    use super::*;

    /// A reader over a fixed list: records 0..n with `size`-byte values.
    struct ListReader(VecDeque<Record>);

    fn reader(n: i64, size: usize) -> ListReader {
        let records = (0..n)
            .map(|offset| Record {
                key: None,
                value: vec![0; size],
                tombstone: false,
                headers: vec![],
                timestamp_ms: None,
                origin: crate::handler::Origin::Kafka { partition: 0, offset },
                reply_to: None,
            })
            .collect();
        ListReader(records)
    }

    impl RecordReader for ListReader {
        async fn next(&mut self) -> Option<Record> {
            loop {
                if let Some(r) = self.try_next() {
                    return Some(r);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        fn try_next(&mut self) -> Option<Record> {
            self.0.pop_front()
        }

        fn lag(&self, _cut_to: i64, _finished: i64) -> i64 {
            self.0.len() as i64
        }
    }

    fn limits(batch_size: usize, max_batch_bytes: usize, window_ms: u64) -> Limits {
        Limits { batch_size, max_batch_bytes, window: Duration::from_millis(window_ms) }
    }

    fn offsets(batch: &Option<Vec<Arc<Record>>>) -> Vec<i64> {
        batch.iter().flatten().map(|r| r.position()).collect()
    }

    #[tokio::test]
    async fn cuts_by_count_and_carries_what_does_not_fit_in_bytes() {
        let stop = CancellationToken::new();
        let mut b = Batcher::new(reader(10, 10), limits(4, 1000, 0));
        assert_eq!(offsets(&b.next_batch(&stop).await), vec![0, 1, 2, 3]);
        let mut b = Batcher::new(reader(10, 10), limits(100, 35, 0));
        assert_eq!(offsets(&b.next_batch(&stop).await), vec![0, 1, 2]);
        assert_eq!(offsets(&b.next_batch(&stop).await), vec![3, 4, 5], "record 3 was carried, not lost");
        // A record larger than the byte limit still goes, alone.
        let mut b = Batcher::new(reader(2, 100), limits(100, 35, 0));
        assert_eq!(offsets(&b.next_batch(&stop).await), vec![0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_waits_for_more_records_and_stop_ends_the_wait() {
        let stop = CancellationToken::new();
        let mut b = Batcher::new(reader(3, 1), limits(100, 1000, 500));
        let started = Instant::now();
        assert_eq!(offsets(&b.next_batch(&stop).await), vec![0, 1, 2]);
        assert!(started.elapsed() >= Duration::from_millis(500), "waited for the window to fill the batch");
        let mut b = Batcher::new(reader(3, 1), limits(2, 1000, 500));
        let started = Instant::now();
        assert_eq!(offsets(&b.next_batch(&stop).await), vec![0, 1]);
        assert!(started.elapsed() < Duration::from_millis(500), "a full batch does not wait");
        stop.cancel();
        let mut b = Batcher::new(reader(0, 1), limits(2, 1000, 500));
        assert!(b.next_batch(&stop).await.is_none());
    }
}
