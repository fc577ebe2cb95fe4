//! Taking partitions without blocking librdkafka.
//!
//! An assignment must start at the offsets the store holds, with the partitions'
//! dedup windows loaded (offsets are never taken from Kafka; docs/design.md, invariant 1).
//! Reading them may take long: the store may be down, or stalled. The rebalance
//! callback (and a helper's order from its member) therefore only starts a
//! [`Loading`] and returns: the load runs on a thread of its own over a store
//! connection of its own, retrying with backoff until it succeeds or is
//! called off; the consumer thread looks at it every turn without waiting, and
//! assigns the partitions at their stored offsets once it is there. Meanwhile
//! the consumer keeps polling, so librdkafka keeps heartbeating and the member
//! stays in the group however long the store takes (librdkafka waits for the
//! application's `assign()` in its "wait assign call" state, heartbeating).
//!
//! A load that has not finished within [`Loading::deadline`] — derived from the
//! group's session and poll timeouts — is reported (log and
//! `tallyd_partition_load_overdue_total`) and goes on retrying: no other member
//! could do better while the store is unreachable, and the partitions cannot be
//! read without their stored offsets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::calendar::Day;
use crate::store::{self, Store};

/// What a partition's assignment needs from the store.
#[derive(Debug, Default)]
pub struct Stored {
    /// Next offset to read, per partition (absent: nothing stored yet).
    pub offsets: HashMap<i32, i64>,
    /// partition → (seen day, packed ids) blobs.
    pub dedup: HashMap<i32, Vec<(Day, Vec<u8>)>>,
    /// The partitions' wallets, when wallets are routed by partition.
    pub wallets: Option<StoredWallets>,
}

/// The wallets of the partitions being taken, read after they were claimed.
#[derive(Debug, Default)]
pub struct StoredWallets {
    /// The epoch this instance claimed each partition at.
    pub epochs: Vec<(i32, i64)>,
    /// The topic's partition count the accounts were sorted by.
    pub partition_count: u32,
    /// Every stored balance and reserved hold (the consumer keeps those of
    /// its partitions' accounts).
    pub balances: Vec<(String, crate::wallet::Money)>,
    pub holds: Vec<crate::store::wallet::StoredHold>,
}

/// Reads `partitions`' stored offsets and their dedup ids seen since `since`,
/// on one pooled connection. The one place ingest reads the store.
///
/// With `claim` (wallets routed by partition: the owner's URL and the
/// topic's partition count), first records this instance as the partitions'
/// wallet owner with a new epoch, then reads the wallets — in that order: a
/// hold the previous owner is still writing either lands before the claim
/// (and is read here) or is fenced by it. Offsets are read before balances:
/// a flush of the previous owner landing in between makes the replay debit
/// twice in memory (and this owner's first flush fenced, so reloaded), never
/// not at all.
pub fn load_stored(
    store: &Store,
    topic: &str,
    partitions: &[i32],
    since: Day,
    claim: Option<(&str, u32)>,
) -> store::Result<Stored> {
    store.with_conn(|c| {
        let epochs = match claim {
            Some((owner, _)) => Some(c.claim_partitions(topic, partitions, owner)?),
            None => None,
        };
        let mut offsets = c.load_offsets(topic)?;
        offsets.retain(|p, _| partitions.contains(p));
        let mut dedup = HashMap::with_capacity(partitions.len());
        for &p in partitions {
            dedup.insert(p, c.load_dedup(topic, p, since)?);
        }
        let wallets = match (epochs, claim) {
            (Some(epochs), Some((_, partition_count))) => Some(StoredWallets {
                epochs,
                partition_count,
                balances: c.wallet_balances()?,
                holds: c.reserved_holds()?,
            }),
            _ => None,
        };
        Ok(Stored {
            offsets,
            dedup,
            wallets,
        })
    })
}

/// Where the loads read from and how long they may take before being reported.
#[derive(Debug, Clone)]
pub struct LoadSettings {
    pub store: Store,
    pub topic: String,
    pub dedup_window_days: u32,
    /// A load taking longer than this is reported as overdue.
    pub deadline: Duration,
    /// Which partitions' wallets this instance owns (claimed by the load).
    pub ownership: Arc<crate::wallet::owners::Ownership>,
}

/// The longest an assignment load may take before it is reported: a third of
/// the shorter of the group's session timeout and poll interval (librdkafka's
/// `session.timeout.ms`, `max.poll.interval.ms`). The consumer keeps polling
/// and heartbeating meanwhile, so it is a report, not a limit the group sees.
pub fn load_deadline(session_timeout: Duration, max_poll_interval: Duration) -> Duration {
    session_timeout.min(max_poll_interval) / 3
}

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A load of stored state for partitions being assigned, running on a thread of
/// its own. Dropping it calls the load off.
pub struct Loading {
    pub partitions: Vec<i32>,
    /// The day the dedup windows were loaded for.
    pub today: Day,
    started: Instant,
    deadline: Duration,
    reported: bool,
    rx: Receiver<Stored>,
    cancel: Arc<AtomicBool>,
}

impl Loading {
    /// Starts loading `partitions`' stored state; the thread is named after the
    /// consumer thread calling this.
    pub fn start(settings: &LoadSettings, partitions: Vec<i32>) -> Loading {
        let today = Day::today();
        let since = Day(today.0 - settings.dedup_window_days as i32);
        let (tx, rx) = mpsc::sync_channel(1);
        let cancel = Arc::new(AtomicBool::new(false));
        let name = format!(
            "{}-load",
            std::thread::current().name().unwrap_or("tallyd-ingest")
        );
        let (store, topic, ps, stop, ownership) = (
            settings.store.clone(),
            settings.topic.clone(),
            partitions.clone(),
            cancel.clone(),
            settings.ownership.clone(),
        );
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            let mut backoff = FIRST_BACKOFF;
            while !stop.load(Ordering::Relaxed) {
                let me = ownership.me();
                let claim = ownership
                    .is_routed()
                    .then(|| (me.as_str(), ownership.partitions()));
                if let Some((_, 0)) = claim {
                    // The wallets of a partition are its accounts': which
                    // ones depends on the partition count.
                    tracing::warn!(partitions = ?ps, retry_in_ms = backoff.as_millis() as u64,
                        "the topic's partition count is not known yet; the partitions wait for it");
                } else {
                    match load_stored(&store, &topic, &ps, since, claim) {
                        Ok(stored) => {
                            let _ = tx.send(stored);
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, partitions = ?ps, retry_in_ms = backoff.as_millis() as u64,
                                "cannot load the stored offsets of assigned partitions; retrying");
                        }
                    }
                }
                // Sleep in short steps so that a called-off load ends soon.
                let until = Instant::now() + backoff;
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        });
        if let Err(e) = spawned {
            // The receiver sees a closed channel: reported by `poll`.
            tracing::error!(error = %e, "cannot start a thread to load stored offsets");
        }
        Loading {
            partitions,
            today,
            started: Instant::now(),
            deadline: settings.deadline,
            reported: false,
            rx,
            cancel,
        }
    }

    /// The loaded state if it is there; never waits. `Err(())` if the load
    /// ended without a result (its thread could not be started or died).
    #[allow(clippy::result_unit_err)]
    pub fn poll(&mut self) -> Result<Option<Stored>, ()> {
        match self.rx.try_recv() {
            Ok(stored) => Ok(Some(stored)),
            Err(TryRecvError::Disconnected) => Err(()),
            Err(TryRecvError::Empty) => {
                if !self.reported && self.started.elapsed() >= self.deadline {
                    self.reported = true;
                    metrics::counter!(crate::metrics::PARTITION_LOAD_OVERDUE_TOTAL).increment(1);
                    tracing::error!(
                        partitions = ?self.partitions,
                        waited_ms = self.started.elapsed().as_millis() as u64,
                        "stored offsets still not loaded; the partitions stay unassigned (and the consumer in the group) until the store answers"
                    );
                }
                Ok(None)
            }
        }
    }
}

impl Drop for Loading {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_against_a_dead_store_never_blocks_and_is_called_off_by_drop() {
        // Nothing listens on port 1: every attempt fails at once.
        let settings = LoadSettings {
            store: Store::new("postgres://tallyd@127.0.0.1:1/none", 1).unwrap(),
            topic: "cdrs".into(),
            dedup_window_days: 7,
            deadline: Duration::from_millis(50),
            ownership: Arc::new(crate::wallet::owners::Ownership::lone()),
        };
        let mut l = Loading::start(&settings, vec![0, 1]);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(matches!(l.poll(), Ok(None)));
            std::thread::sleep(Duration::from_millis(30));
        }
        assert!(t0.elapsed() < Duration::from_secs(1), "poll waited");
        assert!(l.reported, "an overdue load is reported");
        drop(l);
    }

    #[test]
    fn a_load_brings_only_the_partitions_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/s.db", dir.path().display());
        let settings = LoadSettings {
            store: Store::open(&url).unwrap(),
            topic: "cdrs".into(),
            dedup_window_days: 7,
            deadline: Duration::from_secs(10),
            ownership: Arc::new(crate::wallet::owners::Ownership::lone()),
        };
        let mut l = Loading::start(&settings, vec![2, 3]);
        let t0 = Instant::now();
        let stored = loop {
            if let Some(s) = l.poll().unwrap() {
                break s;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "load never came");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(stored.offsets.is_empty());
        let mut ps: Vec<i32> = stored.dedup.keys().copied().collect();
        ps.sort_unstable();
        assert_eq!(ps, [2, 3]);
    }

    #[test]
    fn the_deadline_is_a_third_of_the_shorter_group_timeout() {
        let s = Duration::from_secs;
        assert_eq!(load_deadline(s(45), s(300)), s(15));
        assert_eq!(load_deadline(s(60), s(30)), s(10));
    }
}
