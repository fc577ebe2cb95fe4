//! One group member per instance; its partitions shared over the instance's consumers.
//!
//! An instance runs `kafka.consumers` consumers, each with its own thread and
//! broker connection (librdkafka keeps one fetch in flight per connection; two
//! overlap). Only the first — the *member* — joins the consumer group. When the
//! group assigns it partitions, its rebalance callback splits them into one share
//! per consumer, keeps the first and hands the others to the *helpers*, which load
//! their share's stored offsets and `assign()` it themselves; when the group
//! revokes, the member has every helper flush and drop its share (in parallel with
//! its own) and waits for them before the callback returns, so the partitions
//! leave this instance flushed, as they do with a single consumer.
//!
//! Why not one group member per consumer: in a group rebalance each member sends
//! a SyncGroup request, and tansu holds a follower's request that arrives before
//! the leader's for a second. An instance's two members got their partitions
//! 1.0 s apart in about two runs of three, and the one that started late drained a
//! 2M backlog a second after the other. With one member per instance the shares
//! start within milliseconds of each other.
//!
//! Helpers are not group members, so the broker would refuse their Kafka offset
//! commits (made for lag tools only; the offsets that count are in the store):
//! they leave them with the member, which commits them with its own. A helper
//! whose flush is fenced drops its share and asks the member to rejoin the group,
//! which reassigns everything from the store.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};

use parking_lot::Mutex;

/// What the member tells a helper.
pub enum Control {
    /// Take these partitions: load their stored offsets and dedup windows, assign.
    Assign(Vec<i32>),
    /// Flush and drop the partitions held, unassign them, then answer.
    Revoke(SyncSender<()>),
}

/// A consumer's place in its instance.
pub enum Seat {
    /// Joins the group and hands a share of its partitions to each helper.
    Member(Vec<Sender<Control>>),
    /// Reads the share the member hands it.
    Helper(Receiver<Control>),
}

/// What an instance's consumers share besides their flushers.
#[derive(Default)]
pub struct Crew {
    /// A helper's flush was fenced: the member should rejoin the group.
    rejoin: AtomicBool,
    /// Offsets helpers stored, for the member to commit to Kafka.
    commits: Mutex<Vec<(i32, i64)>>,
}

impl Crew {
    /// Seats for `consumers` consumers: the member first, then the helpers.
    pub fn seats(consumers: usize) -> Vec<Seat> {
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (1..consumers.max(1)).map(|_| mpsc::channel()).unzip();
        std::iter::once(Seat::Member(senders))
            .chain(receivers.into_iter().map(Seat::Helper))
            .collect()
    }

    pub fn ask_rejoin(&self) {
        self.rejoin.store(true, Ordering::Relaxed);
    }

    /// Whether a helper asked for a rejoin since the last call.
    pub fn take_rejoin(&self) -> bool {
        self.rejoin.swap(false, Ordering::Relaxed)
    }

    /// Leaves a helper's stored offsets for the member to commit.
    pub fn leave_commits(&self, offsets: impl IntoIterator<Item = (i32, i64)>) {
        self.commits.lock().extend(offsets);
    }

    pub fn take_commits(&self) -> Vec<(i32, i64)> {
        std::mem::take(&mut *self.commits.lock())
    }
}

/// Splits `partitions` into `n` shares, dealing them out in order over the
/// sorted partitions: shares differ by at most one partition.
pub fn split(partitions: &[i32], n: usize) -> Vec<Vec<i32>> {
    let mut sorted = partitions.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let n = n.max(1);
    let mut shares = vec![Vec::new(); n];
    for (i, p) in sorted.into_iter().enumerate() {
        shares[i % n].push(p);
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_dealt_evenly_and_cover_every_partition_once() {
        assert_eq!(split(&[3, 0, 2, 1], 2), vec![vec![0, 2], vec![1, 3]]);
        assert_eq!(split(&[4, 1, 0, 3, 2], 2), vec![vec![0, 2, 4], vec![1, 3]]);
        // More consumers than partitions: some get none.
        assert_eq!(split(&[7], 3), vec![vec![7], vec![], vec![]]);
        assert_eq!(split(&[], 2), vec![Vec::<i32>::new(), vec![]]);
        assert_eq!(split(&[5, 6], 1), vec![vec![5, 6]]);
    }

    #[test]
    fn the_member_sits_first_and_talks_to_every_helper() {
        let seats = Crew::seats(3);
        assert_eq!(seats.len(), 3);
        let Seat::Member(helpers) = &seats[0] else {
            panic!("first seat is not the member");
        };
        assert_eq!(helpers.len(), 2);
        for (i, h) in helpers.iter().enumerate() {
            h.send(Control::Assign(vec![i as i32])).unwrap();
        }
        for (i, seat) in seats[1..].iter().enumerate() {
            let Seat::Helper(rx) = seat else {
                panic!("seat {} is not a helper", i + 1);
            };
            let Ok(Control::Assign(ps)) = rx.try_recv() else {
                panic!("helper {} got nothing", i + 1);
            };
            assert_eq!(ps, vec![i as i32]);
        }
        assert!(matches!(&Crew::seats(1)[..], [Seat::Member(h)] if h.is_empty()));
    }

    #[test]
    fn commits_and_rejoin_requests_are_handed_over_once() {
        let crew = Crew::default();
        assert!(!crew.take_rejoin());
        crew.ask_rejoin();
        assert!(crew.take_rejoin());
        assert!(!crew.take_rejoin());
        crew.leave_commits([(1, 10), (3, 30)]);
        crew.leave_commits([(1, 12)]);
        assert_eq!(crew.take_commits(), vec![(1, 10), (3, 30), (1, 12)]);
        assert!(crew.take_commits().is_empty());
    }
}
