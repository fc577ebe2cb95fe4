//! The baseline of `scripts/bench-e2e.sh`: a bare librdkafka consumer that reads a
//! whole topic as fast as it can and does nothing with the messages.
//!
//! Usage: bare_consumer BROKERS TOPIC PARTITIONS COUNT — prints "bare: N msgs in S s = R msgs/s".

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, brokers, topic, partitions, count] = &args[..] else {
        eprintln!("usage: bare_consumer BROKERS TOPIC PARTITIONS COUNT");
        std::process::exit(2);
    };
    let partitions: i32 = partitions.parse().expect("PARTITIONS");
    let count: u64 = count.parse().expect("COUNT");
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "bare-bench")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("tpl");
    }
    c.assign(&tpl).expect("assign");
    let mut n = 0u64;
    let mut bytes = 0usize;
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while n < count && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(Instant::now);
            bytes += m.payload().map_or(0, |p| p.len());
            n += 1;
        }
    }
    let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    println!(
        "bare: {n} msgs ({bytes} bytes) in {secs:.3} s = {:.0} msgs/s",
        n as f64 / secs
    );
}
