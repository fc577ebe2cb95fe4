//! Dead letters: every rejected message is produced, unchanged, to the dead-letter
//! topic with headers naming the reason and where it came from (docs/design.md, invariant 6).
//!
//! The producer retries forever (`message.timeout.ms = 0`) and the flusher waits for
//! outstanding dead letters before it stores the offsets past them, so a rejected
//! message is never lost. After a crash a dead letter may be produced twice.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use crate::cdr::Rejection;
use crate::log_throttle::LogThrottle;

/// Counts deliveries that failed for good (e.g. a message larger than the topic
/// allows), and logs the producer's client errors once a throttle window.
#[derive(Default)]
pub struct DeadLetterContext {
    log_throttle: LogThrottle,
}

impl ClientContext for DeadLetterContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(repeats) = self.log_throttle.admit_error(&error) {
            tracing::error!(error = %error, reason, repeats_not_logged = repeats, "dead-letter producer error");
        }
    }
}

impl ProducerContext for DeadLetterContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            metrics::counter!(crate::metrics::DEAD_LETTER_FAILURES_TOTAL).increment(1);
            tracing::error!(error = %e, "a dead letter could not be delivered");
        }
    }
}

pub struct DeadLetters {
    producer: ThreadedProducer<DeadLetterContext>,
    topic: String,
}

/// Where a rejected message came from.
pub struct Source<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

impl DeadLetters {
    pub fn new(base: &ClientConfig, topic: &str) -> Result<DeadLetters, KafkaError> {
        let mut cfg = base.clone();
        cfg.remove("group.id");
        cfg.set("message.timeout.ms", "0")
            .set("linger.ms", "20")
            .set("enable.idempotence", "false");
        Ok(DeadLetters {
            producer: cfg.create_with_context(DeadLetterContext::default())?,
            topic: topic.to_owned(),
        })
    }

    /// Queues one dead letter; waits (backpressure) while the producer queue is full.
    pub fn send(
        &self,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        rejection: &Rejection,
        src: &Source<'_>,
    ) {
        let partition = src.partition.to_string();
        let offset = src.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "tallyd-reason",
                value: Some(rejection.reason.as_str()),
            })
            .insert(Header {
                key: "tallyd-error",
                value: Some(rejection.message.as_str()),
            })
            .insert(Header {
                key: "tallyd-field",
                value: rejection.field,
            })
            .insert(Header {
                key: "tallyd-source-topic",
                value: Some(src.topic),
            })
            .insert(Header {
                key: "tallyd-source-partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "tallyd-source-offset",
                value: Some(offset.as_str()),
            });
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&self.topic).headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => {
                    metrics::counter!(crate::metrics::DEAD_LETTER_FAILURES_TOTAL).increment(1);
                    tracing::error!(error = %e, topic = src.topic, partition = src.partition, offset = src.offset,
                        "cannot queue dead letter");
                    return;
                }
            }
        }
    }

    /// Waits until every queued dead letter is delivered.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }

    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }
}
