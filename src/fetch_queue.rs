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
//! The queue holds a reference into the client: [`FetchQueue::close`] must run
//! before the consumer is dropped (`Ingest`'s `Drop` does), or librdkafka's
//! shutdown waits for it forever.

use std::ffi::CString;
use std::ptr::NonNull;
use std::time::Duration;

use parking_lot::Mutex;
use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;

/// A queue of tallyd's own that assigned partitions' fetched messages are
/// forwarded to.
pub struct FetchQueue {
    rk: *mut rd::rd_kafka_t,
    topic: CString,
    /// Null once closed.
    queue: Mutex<*mut rd::rd_kafka_queue_t>,
    /// Partitions whose fetch queue forwards here.
    routed: Mutex<Vec<i32>>,
}

// SAFETY: librdkafka's client and queue handles may be used from any thread; the
// queue pointer itself is only read or cleared under its mutex.
unsafe impl Send for FetchQueue {}
unsafe impl Sync for FetchQueue {}

impl FetchQueue {
    pub fn new<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str) -> FetchQueue {
        let rk = consumer.client().native_ptr();
        // SAFETY: `rk` is a live client; the queue is destroyed in `close`.
        let queue = unsafe { rd::rd_kafka_queue_new(rk) };
        FetchQueue {
            rk,
            topic: CString::new(topic).expect("topic names have no NUL"),
            queue: Mutex::new(queue),
            routed: Mutex::new(Vec::new()),
        }
    }

    /// Forwards `partition`'s fetched messages to `queue` (null: nowhere).
    fn forward(&self, partition: i32, queue: *mut rd::rd_kafka_queue_t) {
        // SAFETY: `rk` is live while the consumer is (see the module doc);
        // `get_partition` creates the partition's handle if the client has none
        // yet and returns a reference that is released right after forwarding,
        // which stays in place.
        unsafe {
            let pq = rd::rd_kafka_queue_get_partition(self.rk, self.topic.as_ptr(), partition);
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
        // SAFETY: `rk` is live while the consumer is (see the module doc) and the
        // topic is a NUL-terminated string; the call only reads cached offsets.
        let err = unsafe {
            rd::rd_kafka_get_watermark_offsets(
                self.rk,
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
        let queue = self.queue.lock();
        if queue.is_null() {
            return;
        }
        let mut routed = self.routed.lock();
        for &p in partitions {
            self.forward(p, *queue);
            if !routed.contains(&p) {
                routed.push(p);
            }
        }
    }

    /// Takes up to `out`'s spare capacity of messages and partition events,
    /// waiting at most `timeout` for the first.
    pub fn consume(&self, timeout: Duration, out: &mut Vec<Fetched>) {
        let queue = *self.queue.lock();
        if queue.is_null() {
            return;
        }
        let room = out.capacity() - out.len();
        let mut raw: [*mut rd::rd_kafka_message_t; 256] = [std::ptr::null_mut(); 256];
        let room = room.min(raw.len());
        // SAFETY: the queue is open (it is closed only by the consumer thread,
        // which is the one calling this) and `raw` has room for `room` pointers.
        let got = unsafe {
            rd::rd_kafka_consume_batch_queue(
                queue,
                timeout.as_millis() as i32,
                raw.as_mut_ptr(),
                room,
            )
        };
        let got = usize::try_from(got).unwrap_or(0);
        out.extend(
            raw[..got]
                .iter()
                .filter_map(|&m| NonNull::new(m))
                .map(Fetched),
        );
    }

    /// Stops forwarding the routed partitions (what they fetch from now on
    /// stays in their own queues) and destroys this one. Idempotent.
    pub fn close(&self) {
        let mut queue = self.queue.lock();
        if queue.is_null() {
            return;
        }
        for p in self.routed.lock().drain(..) {
            self.forward(p, std::ptr::null_mut());
        }
        // SAFETY: created by `rd_kafka_queue_new`, destroyed once (then null).
        unsafe { rd::rd_kafka_queue_destroy(*queue) };
        *queue = std::ptr::null_mut();
    }
}

impl Drop for FetchQueue {
    fn drop(&mut self) {
        self.close();
    }
}

/// A message, or a partition event such as its end, taken from a [`FetchQueue`].
pub struct Fetched(NonNull<rd::rd_kafka_message_t>);

impl Fetched {
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

impl Record for Fetched {
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

impl Drop for Fetched {
    fn drop(&mut self) {
        // SAFETY: each message taken from the queue is destroyed exactly once.
        unsafe { rd::rd_kafka_message_destroy(self.0.as_ptr()) }
    }
}
