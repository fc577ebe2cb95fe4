//! Which partition a CDR key goes to, as the switch's producer computes it.
//!
//! The CDR message key is the account SID, so an account's CDRs all land on
//! one partition, a pure function of the SID under the producer's
//! partitioner. The instance that consumes that partition owns the account's
//! wallet (docs/design.md, wallets); every instance must compute the same
//! partition as the switch, so `kafka.partitioner` names the switch's:
//!
//! - `murmur2_random`: the Java client's default (and librdkafka's
//!   `murmur2_random`): `(murmur2(key) & 0x7fffffff) % partitions`;
//! - `consistent_random`: librdkafka's default (so that of rdkafka, confluent-kafka
//!   and tallyd's own generator): `crc32(key) % partitions`.
//!
//! Both put a message without key on a random partition; such a CDR has no
//! computed partition. A CDR read from another partition than its key's is
//! counted by ingest (`tallyd_cdr_partition_mismatch_total`) and logged: its
//! account's wallet then has debits on a partition its owner may not hold.

use serde::Deserialize;

/// The switch's producer partitioner (`kafka.partitioner`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Partitioner {
    /// Java clients' default: murmur2 of the key, positive, modulo the count.
    Murmur2Random,
    /// librdkafka's default: CRC-32 of the key modulo the count.
    #[default]
    ConsistentRandom,
}

impl Partitioner {
    /// The partition of `key` among `partitions` (`None` when there are none).
    pub fn partition(self, key: &[u8], partitions: u32) -> Option<i32> {
        if partitions == 0 {
            return None;
        }
        let h = match self {
            Partitioner::Murmur2Random => (murmur2(key) & 0x7fff_ffff) as u32,
            Partitioner::ConsistentRandom => crc32(key),
        };
        Some((h % partitions) as i32)
    }

    /// The name as configured.
    pub fn as_str(self) -> &'static str {
        match self {
            Partitioner::Murmur2Random => "murmur2_random",
            Partitioner::ConsistentRandom => "consistent_random",
        }
    }
}

/// Kafka's murmur2 (the Java client's `Utils.murmur2`, seed `0x9747b28c`).
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// CRC-32 (IEEE, reflected, as zlib and librdkafka's `rd_crc32`).
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafkas_test_vectors() {
        // The Java client's `UtilsTest.testMurmur2`.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            (b"abc", 479470107),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key), want, "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn no_partitions_no_partition() {
        assert_eq!(Partitioner::Murmur2Random.partition(b"x", 0), None);
        assert_eq!(Partitioner::ConsistentRandom.partition(b"x", 1), Some(0));
    }

    /// librdkafka's own partitioners put every key where ours say: produced
    /// through an in-process mock cluster and read back.
    #[test]
    fn each_partitioner_agrees_with_librdkafkas() {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::mocking::MockCluster;
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        use rdkafka::Message;
        use std::time::{Duration, Instant};
        const N: u32 = 7;
        let cluster = MockCluster::new(1).unwrap();
        for (i, p) in [Partitioner::Murmur2Random, Partitioner::ConsistentRandom]
            .into_iter()
            .enumerate()
        {
            let topic = format!("t{i}");
            cluster.create_topic(&topic, N as i32, 1).unwrap();
            let producer: BaseProducer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", cluster.bootstrap_servers())
                .set("partitioner", p.as_str())
                .create()
                .unwrap();
            let keys: Vec<String> = (0..60).map(|k| format!("AC{:032x}", k * 7919)).collect();
            for k in &keys {
                producer
                    .send(BaseRecord::to(&topic).key(k).payload(k))
                    .unwrap();
            }
            producer.flush(Duration::from_secs(10)).unwrap();
            let consumer: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", cluster.bootstrap_servers())
                .set("group.id", "g")
                .create()
                .unwrap();
            let mut tpl = rdkafka::TopicPartitionList::new();
            for part in 0..N as i32 {
                tpl.add_partition_offset(&topic, part, rdkafka::Offset::Beginning)
                    .unwrap();
            }
            consumer.assign(&tpl).unwrap();
            let mut seen = 0;
            let deadline = Instant::now() + Duration::from_secs(20);
            while seen < keys.len() {
                assert!(Instant::now() < deadline, "{seen} of {} read", keys.len());
                let Some(m) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let m = m.unwrap();
                let key = m.key().unwrap();
                assert_eq!(
                    p.partition(key, N),
                    Some(m.partition()),
                    "{} under {}",
                    String::from_utf8_lossy(key),
                    p.as_str()
                );
                seen += 1;
            }
        }
    }
}
