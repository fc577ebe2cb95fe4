//! The consumer thread's message queue: librdkafka's batch consume over the
//! assigned partitions' fetch queues.
//!
//! rdkafka's `BaseConsumer::poll` hands out one message per call, and each call
//! takes the queue lock, reads the clock twice, wraps the message in a new event
//! and an `Arc`, and destroys both when the message is dropped: 450–490 ns of
//! the consumer thread per message on a 2-vCPU VM, against 130–140 ns for
//! `rd_kafka_consume_batch_queue` taking up to a batch at a time (measured
//! draining 2M messages from a local tansu, same prefetch settings). So each
//! partition's fetch queue is forwarded, before the partition is assigned, to a
//! queue of tallyd's own, and the consumer thread takes messages from it in
//! batches. Rebalances, errors and commit results stay on the consumer queue,
//! which the thread still polls every turn: a rebalance callback therefore runs
//! between two batches, never inside one, and messages fetched before a
//! partition was re-assigned are discarded by librdkafka's version barriers.
//!
//! [`BatchConsumer`] owns the consumer together with its queue and destroys the
//! queue before the consumer (librdkafka's shutdown would wait for it forever
//! otherwise); it is not `Sync`, so only the thread owning it can reach the
//! queue, and nothing but its `Drop` closes it.

use std::cell::RefCell;
use std::ffi::CString;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;

/// A consumer and a queue of tallyd's own that its assigned partitions'
/// fetched messages are forwarded to.
pub struct BatchConsumer<C: ConsumerContext + 'static> {
    consumer: BaseConsumer<C>,
    topic: CString,
    queue: NonNull<rd::rd_kafka_queue_t>,
    /// Partitions whose fetch queue forwards here.
    routed: RefCell<Vec<i32>>,
}

// SAFETY: librdkafka's client and queue handles may be used from any thread, so
// the consumer may move to the thread that runs it. It is deliberately not
// `Sync` (the raw queue pointer makes it so): only its owner reaches the queue.
unsafe impl<C: ConsumerContext + 'static> Send for BatchConsumer<C> {}

impl<C: ConsumerContext + 'static> BatchConsumer<C> {
    pub fn new(consumer: BaseConsumer<C>, topic: &str) -> BatchConsumer<C> {
        let rk = consumer.client().native_ptr();
        // SAFETY: `rk` is a live client, owned by `consumer`, which is dropped only
        // after `Drop::drop` destroyed the queue.
        let queue = unsafe { rd::rd_kafka_queue_new(rk) };
        BatchConsumer {
            consumer,
            topic: CString::new(topic).expect("topic names have no NUL"),
            queue: NonNull::new(queue).expect("librdkafka allocates queues or aborts"),
            routed: RefCell::new(Vec::new()),
        }
    }

    pub fn consumer(&self) -> &BaseConsumer<C> {
        &self.consumer
    }

    fn rk(&self) -> *mut rd::rd_kafka_t {
        self.consumer.client().native_ptr()
    }

    /// Forwards `partition`'s fetched messages to `queue` (null: nowhere).
    fn forward(&self, partition: i32, queue: *mut rd::rd_kafka_queue_t) {
        // SAFETY: the client is live (owned by `self`); `get_partition` creates the
        // partition's handle if the client has none yet and returns a reference
        // that is released right after forwarding, which stays in place.
        unsafe {
            let pq = rd::rd_kafka_queue_get_partition(self.rk(), self.topic.as_ptr(), partition);
            if pq.is_null() {
                tracing::error!(partition, "no fetch queue for partition");
                return;
            }
            rd::rd_kafka_queue_forward(pq, queue);
            rd::rd_kafka_queue_destroy(pq);
        }
    }

    /// `partition`'s low and high watermarks as of its last fetch response, from
    /// the client's cache (no broker request); `None` before the first.
    pub fn watermarks(&self, partition: i32) -> Option<(i64, i64)> {
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: the client is live (owned by `self`) and the topic is a
        // NUL-terminated string; the call only reads cached offsets.
        let err = unsafe {
            rd::rd_kafka_get_watermark_offsets(
                self.rk(),
                self.topic.as_ptr(),
                partition,
                &mut low,
                &mut high,
            )
        };
        (err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && low >= 0 && high >= 0)
            .then_some((low, high))
    }

    /// Routes the fetched messages of `partitions` here. Call before assigning them.
    pub fn route(&self, partitions: &[i32]) {
        let mut routed = self.routed.borrow_mut();
        for &p in partitions {
            self.forward(p, self.queue.as_ptr());
            if !routed.contains(&p) {
                routed.push(p);
            }
        }
    }

    /// Takes up to `out`'s spare capacity of messages and partition events,
    /// waiting at most `timeout` for the first. The messages borrow the
    /// consumer: they cannot outlive the client they belong to.
    pub fn consume<'a>(&'a self, timeout: Duration, out: &mut Vec<Fetched<'a>>) {
        let room = out.capacity() - out.len();
        let mut raw: [*mut rd::rd_kafka_message_t; 256] = [std::ptr::null_mut(); 256];
        let room = room.min(raw.len());
        // SAFETY: the queue lives until `Drop::drop`, which cannot run while
        // `self` is borrowed, and `raw` has room for `room` pointers.
        let got = unsafe {
            rd::rd_kafka_consume_batch_queue(
                self.queue.as_ptr(),
                timeout.as_millis().min(i32::MAX as u128) as i32,
                raw.as_mut_ptr(),
                room,
            )
        };
        let got = usize::try_from(got).unwrap_or(0);
        out.extend(
            raw[..got]
                .iter()
                .filter_map(|&m| NonNull::new(m))
                .map(|m| Fetched(m, PhantomData)),
        );
    }
}

impl<C: ConsumerContext + 'static> Drop for BatchConsumer<C> {
    /// Stops forwarding the routed partitions and destroys the queue; the
    /// consumer (a field) is dropped after this.
    fn drop(&mut self) {
        for p in self.routed.take() {
            self.forward(p, std::ptr::null_mut());
        }
        // SAFETY: created by `rd_kafka_queue_new`, destroyed once, here.
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) };
    }
}

/// A message, or a partition event such as its end, taken from a [`FetchQueue`].
pub struct Fetched<'a>(NonNull<rd::rd_kafka_message_t>, PhantomData<&'a ()>);

impl Fetched<'_> {
    fn raw(&self) -> &rd::rd_kafka_message_t {
        // SAFETY: valid until destroyed in `drop`.
        unsafe { self.0.as_ref() }
    }

    /// `None` for a message; the error code for an event.
    pub fn error(&self) -> Option<RDKafkaErrorCode> {
        let err = self.raw().err;
        (err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR).then(|| err.into())
    }
}

/// What the consumer thread needs of a consumed message, whichever queue it
/// came from.
pub trait Record {
    fn partition(&self) -> i32;
    fn offset(&self) -> i64;
    fn payload(&self) -> Option<&[u8]>;
    fn key(&self) -> Option<&[u8]>;
}

impl Record for Fetched<'_> {
    fn partition(&self) -> i32 {
        self.raw().partition
    }
    fn offset(&self) -> i64 {
        self.raw().offset
    }
    fn payload(&self) -> Option<&[u8]> {
        bytes(self.raw().payload, self.raw().len)
    }
    fn key(&self) -> Option<&[u8]> {
        bytes(self.raw().key, self.raw().key_len)
    }
}

/// A message polled from the consumer queue.
impl<M: Message> Record for M {
    fn partition(&self) -> i32 {
        Message::partition(self)
    }
    fn offset(&self) -> i64 {
        Message::offset(self)
    }
    fn payload(&self) -> Option<&[u8]> {
        Message::payload(self)
    }
    fn key(&self) -> Option<&[u8]> {
        Message::key(self)
    }
}

fn bytes<'a>(ptr: *mut std::ffi::c_void, len: usize) -> Option<&'a [u8]> {
    // SAFETY: librdkafka's message buffers live as long as the message.
    (!ptr.is_null()).then(|| unsafe { std::slice::from_raw_parts(ptr as *const u8, len) })
}

impl Drop for Fetched<'_> {
    fn drop(&mut self) {
        // SAFETY: each message taken from the queue is destroyed exactly once.
        unsafe { rd::rd_kafka_message_destroy(self.0.as_ptr()) }
    }
}
