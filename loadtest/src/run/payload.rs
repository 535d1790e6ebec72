//! What each produced record carries, and where it goes.
//!
//! The value is JSON `{"run":"…","id":N,"sent_ms":T,"pad":"xx…"}` padded to
//! the scenario's size: the id makes every record accountable (lost,
//! duplicated, out of order), `sent_ms` gives end-to-end latency from the
//! receipt alone, and the run id keeps records of an earlier run on the
//! same topic (an `--external` coordinator's stream) out of the counts.
//!
//! Kafka partitions are chosen here, not by librdkafka's partitioner, from
//! a hash of the key: a spike's extra load must land on given partitions
//! while every key stays on one partition, so per-key order stays a valid
//! check.

use serde::Deserialize;

/// The key of key index `k`.
pub fn key(k: u32) -> String {
    format!("k-{k}")
}

/// The partition of key index `k` among `partitions` (FNV-1a of the key
/// text: stable across runs and machines).
pub fn partition_of(k: u32, partitions: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key(k).bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions.max(1)
}

/// The value of record `id`, `size` bytes long when `size` leaves room for
/// the fields (longer otherwise: the fields are never cut).
pub fn encode(run: &str, id: u64, sent_ms: u64, size: usize) -> Vec<u8> {
    let head = format!("{{\"run\":\"{run}\",\"id\":{id},\"sent_ms\":{sent_ms}");
    // `,"pad":""}` is 10 bytes: the padding field only when it fits.
    let mut value = Vec::with_capacity(size.max(head.len() + 1));
    value.extend_from_slice(head.as_bytes());
    if let Some(pad) = size.checked_sub(head.len() + 10) {
        value.extend_from_slice(b",\"pad\":\"");
        value.resize(value.len() + pad, b'x');
        value.push(b'"');
    }
    value.push(b'}');
    value
}

/// The fields a receipt is matched by.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Stamp {
    pub run: String,
    pub id: u64,
    pub sent_ms: u64,
}

/// Reads a value written by [`encode`]; `None` for anything else.
pub fn decode(value: &[u8]) -> Option<Stamp> {
    serde_json::from_slice(value).ok()
}

/// Wall-clock milliseconds since the Unix epoch: latency is measured
/// between this process and the brokers' timestamps, all on one machine.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_at_the_requested_size() {
        for size in [200, 64, 61, 1000] {
            let value = encode("r1", 123, 1_700_000_000_000, size);
            assert_eq!(value.len(), size, "{}", String::from_utf8_lossy(&value));
            assert_eq!(decode(&value), Some(Stamp { run: "r1".into(), id: 123, sent_ms: 1_700_000_000_000 }));
        }
        let tiny = encode("r1", 5, 7, 1);
        assert_eq!(decode(&tiny).map(|s| s.id), Some(5), "too small a size keeps every field");
        assert_eq!(decode(b"id-5"), None);
    }

    #[test]
    fn keys_spread_over_partitions_and_stay_put() {
        let mut counts = [0u32; 8];
        for k in 0..1000 {
            let p = partition_of(k, 8);
            assert_eq!(p, partition_of(k, 8));
            counts[p as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 80), "{counts:?}");
        assert_eq!(partition_of(3, 1), 0);
    }
}
