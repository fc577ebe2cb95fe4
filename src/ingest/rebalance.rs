//! The rebalance protocol: what the group member does when the group gives
//! or takes partitions (from inside librdkafka's rebalance callback, so it
//! never waits on the store: assignment only starts the load), how a share
//! of them reaches the instance's helper consumers, and the revocation's
//! final flush.

use super::*;

/// How long a revocation waits for a flush it called off to end.
const CANCEL_GRACE: Duration = Duration::from_secs(1);

impl ClientContext for IngestContext {
    fn error(&self, error: KafkaError, reason: &str) {
        // With `enable.partition.eof` librdkafka also reports every end of
        // partition here; the consumer loop handles it, and it is no error.
        if let KafkaError::Global(RDKafkaErrorCode::PartitionEOF) = error {
            tracing::debug!(reason, "end of partition");
            return;
        }
        if let Some(repeats) = self.log_throttle.admit_error(&error) {
            tracing::error!(error = %error, reason, repeats_not_logged = repeats, "librdkafka error");
        }
    }
}

impl ConsumerContext for IngestContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                let mut shares = share::split(&partitions, 1 + self.helpers.len()).into_iter();
                let mine = shares.next().unwrap_or_default();
                for (helper, share) in self.helpers.iter().zip(shares) {
                    let _ = helper.send(Control::Assign(share));
                }
                if mine.is_empty() {
                    // Nothing to load: complete the rebalance now.
                    if let Err(e) = consumer.assign(&TopicPartitionList::new()) {
                        tracing::error!(error = %e, "assign failed");
                    }
                } else {
                    // Only starts loading the stored offsets: the consumer thread
                    // assigns once they are there (see `assign`).
                    self.begin_assign(mine);
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // A load still under way is called off: nothing was assigned.
                self.state.lock().loading = None;
                self.revoke_with_helpers();
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassign failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; dropping assignment");
                self.state.lock().loading = None;
                self.revoke_with_helpers();
                let _ = consumer.unassign();
            }
        }
    }
}

impl IngestContext {
    /// Starts loading `partitions`' stored offsets and dedup windows; the
    /// consumer thread assigns them once loaded ([`Ingest::take_loaded`]). Never
    /// waits: called from the rebalance callback.
    pub(super) fn begin_assign(&self, partitions: Vec<i32>) {
        tracing::info!(partitions = ?partitions, "partitions given; loading their stored offsets");
        self.state.lock().loading = Some(Loading::start(&self.load, partitions));
    }

    /// Builds the state of partitions whose stored state was loaded; returns the
    /// list to assign them at their stored offsets.
    pub(super) fn take_partitions(
        &self,
        st: &mut State,
        loading: &Loading,
        stored: Stored,
    ) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        let today = loading.today;
        // The consumer's thread is named after the consumer.
        let thread = std::thread::current();
        let thread_name = thread.name().unwrap_or("?");
        st.today = today;
        for p in &loading.partitions {
            // Not expected (a revocation comes first); a ledger dropped after
            // the reload below would give back debits the reload already left out.
            st.partitions.remove(p);
        }
        if let Some(w) = stored.wallets {
            // Before any of their CDRs is consumed: the wallets of the
            // partitions' accounts as the store has them (the previous owner's
            // holds and top-ups included); the replay from the stored offsets
            // then re-debits what it had not flushed.
            let ownership = &self.settings.ownership;
            let n = w.partition_count;
            let mine = |a: crate::cdr::AccountSid| {
                ownership
                    .partitioner
                    .partition(a.to_string().as_bytes(), n)
                    .is_some_and(|p| loading.partitions.contains(&p))
            };
            let loaded =
                crate::wallet::owners::reload(&self.settings.wallets, w.balances, w.holds, mine);
            ownership.own(&w.epochs);
            tracing::info!(epochs = ?w.epochs, wallets = loaded, consumer = thread_name, "partitions' wallets loaded and owned");
        }
        for &p in &loading.partitions {
            let stored_offset = stored.offsets.get(&p).copied();
            let mut window = DedupWindow::new(today);
            let mut ids = 0;
            for (day, blob) in stored.dedup.get(&p).map(Vec::as_slice).unwrap_or_default() {
                window.load(*day, unpack(blob));
                ids += blob.len() / 16;
            }
            let offset = match stored_offset {
                Some(o) => Offset::Offset(o),
                None => Offset::Beginning,
            };
            if let Err(e) = tpl.add_partition_offset(&self.settings.topic, p, offset) {
                tracing::error!(error = %e, partition = p, "cannot set start offset");
            }
            tracing::info!(partition = p, offset = ?stored_offset, dedup_ids = ids, consumer = thread_name, "partition assigned");
            st.partitions.insert(
                p,
                PartitionState {
                    stored: stored_offset,
                    next: stored_offset.unwrap_or(-1),
                    window,
                    deltas: Deltas::default(),
                    ledger: crate::wallet::Ledger::new(self.settings.wallets.clone()),
                    consumed: Default::default(),
                    gains: Default::default(),
                },
            );
        }
        tpl
    }

    /// The group revoked the member's partitions: every helper flushes and drops
    /// its share while the member does its own, and the member waits for them
    /// (bounded by the revoke timeout). At shutdown the helpers do their own
    /// final flush and are not waited for.
    pub(super) fn revoke_with_helpers(&self) {
        let acks: Vec<Receiver<()>> = if self.shutdown.load(Ordering::Relaxed) {
            Vec::new()
        } else {
            self.helpers
                .iter()
                .filter_map(|h| {
                    let (tx, rx) = mpsc::sync_channel(1);
                    h.send(Control::Revoke(tx)).ok().map(|_| rx)
                })
                .collect()
        };
        self.on_revoke();
        let deadline = Instant::now() + self.settings.revoke_timeout;
        for ack in acks {
            if let Err(RecvTimeoutError::Timeout) =
                ack.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                tracing::warn!("a consumer did not drop its partitions within the revoke timeout");
            }
        }
    }

    /// Flushes what was consumed (best effort, bounded in time), then drops every
    /// bit of local state: the next owner — maybe this instance again — starts from
    /// what the store holds, so whatever the flush's fate, nothing counts twice.
    pub(super) fn on_revoke(&self) {
        let deadline = Instant::now() + self.settings.revoke_timeout;
        let mut st = self.state.lock();
        // The API stops answering for these wallets before the last flush:
        // whatever it would grant now, the next owner might not load.
        self.settings
            .ownership
            .disown(st.partitions.keys().copied());
        let landed = self.wait_in_flight(&mut st, deadline) && {
            let snapshot = take_snapshot(&mut st, &self.settings);
            match snapshot {
                None => true,
                Some(s) => {
                    self.submit(&mut st, s);
                    self.wait_in_flight(&mut st, deadline)
                }
            }
        };
        if !landed {
            tracing::warn!("partitions revoked before the last flush landed; their unflushed work will be re-read by the next owner");
        }
        for p in st.partitions.keys() {
            // Another member reports it from now on.
            metrics::gauge!(crate::metrics::CONSUMER_LAG, "partition" => p.to_string()).set(0.0);
        }
        st.partitions.clear();
        self.health.set_assigned(&self.my_health, 0);
    }

    /// Waits for the in-flight flush until `deadline`; then calls it off and
    /// gives it [`CANCEL_GRACE`] more to say so, and after that stops waiting
    /// (a stalled store may hold a statement for good). Returns whether
    /// everything handed over has landed. A flush abandoned here may still land
    /// later: its offset compare-and-set fences the next owner's first flush,
    /// which then reloads, so nothing counts twice.
    pub(super) fn wait_in_flight(&self, st: &mut State, deadline: Instant) -> bool {
        let Some(rx) = st.in_flight.take() else {
            return true;
        };
        self.publish_backlog(st);
        let left = deadline.saturating_duration_since(Instant::now());
        let res = rx.recv_timeout(left).or_else(|_| {
            st.in_flight_cancel.store(true, Ordering::Relaxed);
            rx.recv_timeout(CANCEL_GRACE)
        });
        if let Ok(Ok(f)) = &res {
            wallets_flushed(st, &f.stuck);
        }
        matches!(res, Ok(Ok(_)))
    }

    /// Tells the instance's health whether this consumer's flush in flight
    /// writes CDRs counted while far behind.
    pub(super) fn publish_backlog(&self, st: &State) {
        let backlog = st.in_flight.is_some() && st.backlog_in_flight;
        self.health.set_flushing_backlog(&self.my_health, backlog);
    }

    pub(super) fn submit(&self, st: &mut State, snapshot: Snapshot) {
        // Published before the flusher takes the job: it asks the webhook
        // dispatcher whether to hand callbacks over as it starts.
        st.backlog_in_flight = st.backlog_unflushed;
        st.backlog_unflushed = st.behind;
        self.health
            .set_flushing_backlog(&self.my_health, st.backlog_in_flight);
        let (tx, rx) = mpsc::sync_channel(1);
        let cancel = Arc::new(AtomicBool::new(false));
        let job = Job {
            snapshot: Box::new(snapshot),
            cancel: cancel.clone(),
            reply: tx,
        };
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => {
                // A shared (SQLite) flusher is writing another consumer's
                // flush; this consumer has none out, so it waits for one.
                if self.jobs.send(job).is_err() {
                    return self.publish_backlog(st);
                }
            }
            Err(TrySendError::Disconnected(_)) => return self.publish_backlog(st),
        }
        st.in_flight = Some(rx);
        st.in_flight_cancel = cancel;
    }
}
