//! Which instance answers for a wallet (docs/design.md, wallets).
//!
//! A wallet is hot state with one writer: the instance that owns its
//! account's CDR partition (a pure function of the account SID under
//! `kafka.partitioner`, see [`crate::partitioner`]). That instance debits it
//! from CDRs on its consumer thread and grants holds from it; any other
//! instance forwards a wallet request to the owner recorded in the store
//! (`wallet_owners`, written with a fresh epoch at every assignment).
//!
//! [`Ownership`] is what the consumer threads tell the HTTP handlers: the
//! topic's partition count and the partitions this instance owns *and has
//! loaded* (with the epoch it claimed), behind one read lock. A partition is
//! published only after its wallets were reloaded from the store, and taken
//! back before its revocation flushes, so a handler never grants from a
//! wallet its instance does not hold.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};

use parking_lot::RwLock;

use super::{Hold, Money, Wallets};
use crate::cdr::AccountSid;
use crate::partitioner::Partitioner;
use crate::store::wallet::{Fence, StoredHold};

/// The partitions this instance owns, shared by its consumers and its API.
#[derive(Debug)]
pub struct Ownership {
    /// Whether wallets are routed by partition at all: a daemon consuming
    /// Kafka does; a lone API (tools, tests) answers every wallet itself.
    routed: bool,
    pub topic: String,
    pub partitioner: Partitioner,
    /// This instance's advertised base URL (`http.advertise_url`), set once
    /// the listener is bound when derived from it.
    me: RwLock<String>,
    partitions: AtomicU32,
    owned: RwLock<HashMap<i32, i64>>,
}

/// Where a wallet request for an account is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Here; writes are fenced by the claim (none for a lone API).
    Local(Option<Fence>),
    /// By the owner of this partition (not this instance, or not loaded yet).
    Elsewhere(i32),
    /// The topic's partition count is not known yet.
    Unknown,
}

impl Ownership {
    /// Every wallet answered here, unfenced.
    pub fn lone() -> Ownership {
        Ownership {
            routed: false,
            topic: String::new(),
            partitioner: Partitioner::default(),
            me: Default::default(),
            partitions: AtomicU32::new(0),
            owned: Default::default(),
        }
    }

    /// Wallets routed by the partition of `topic` their account maps to.
    pub fn routed(topic: &str, partitioner: Partitioner, me: &str) -> Ownership {
        Ownership {
            routed: true,
            topic: topic.to_owned(),
            partitioner,
            me: RwLock::new(me.to_owned()),
            partitions: AtomicU32::new(0),
            owned: Default::default(),
        }
    }

    /// This instance's advertised base URL.
    pub fn me(&self) -> String {
        self.me.read().clone()
    }

    pub fn set_me(&self, me: &str) {
        *self.me.write() = me.to_owned();
    }

    pub fn is_routed(&self) -> bool {
        self.routed
    }

    /// The topic's partition count (0: not known yet).
    pub fn partitions(&self) -> u32 {
        self.partitions.load(Ordering::Acquire)
    }

    pub fn set_partitions(&self, n: u32) {
        self.partitions.store(n, Ordering::Release);
    }

    /// The partition `account`'s CDRs are produced to.
    pub fn partition_of(&self, account: AccountSid) -> Option<i32> {
        self.partitioner
            .partition(account.to_string().as_bytes(), self.partitions())
    }

    /// Where `account`'s wallet is answered now.
    pub fn route(&self, account: AccountSid) -> Route {
        if !self.routed {
            return Route::Local(None);
        }
        let Some(p) = self.partition_of(account) else {
            return Route::Unknown;
        };
        match self.owned.read().get(&p) {
            Some(&epoch) => Route::Local(Some(Fence {
                topic: self.topic.clone(),
                partition: p,
                epoch,
            })),
            None => Route::Elsewhere(p),
        }
    }

    /// Publishes partitions whose wallets are loaded, with their epochs.
    pub fn own(&self, epochs: &[(i32, i64)]) {
        self.owned.write().extend(epochs.iter().copied());
    }

    /// Takes partitions back (revoked, or about to be reloaded).
    pub fn disown(&self, partitions: impl IntoIterator<Item = i32>) {
        let mut owned = self.owned.write();
        for p in partitions {
            owned.remove(&p);
        }
    }

    /// The partitions owned now.
    pub fn owned(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self.owned.read().keys().copied().collect();
        v.sort_unstable();
        v
    }
}

/// Stored balances and reserved holds grouped by account (holds of an
/// account with no balance row get its starting credit), for the accounts
/// `keep` accepts.
pub fn group_stored(
    wallets: &Wallets,
    balances: Vec<(String, Money)>,
    holds: Vec<StoredHold>,
    keep: impl Fn(AccountSid) -> bool,
) -> HashMap<AccountSid, (Money, Vec<Hold>)> {
    let mut by_account: HashMap<AccountSid, (Money, Vec<Hold>)> = HashMap::new();
    for (sid, balance) in balances {
        if let Some(a) = AccountSid::parse(&sid).filter(|a| keep(*a)) {
            by_account.entry(a).or_insert((balance, Vec::new())).0 = balance;
        }
    }
    for h in holds {
        let Some(a) = AccountSid::parse(&h.account_sid).filter(|a| keep(*a)) else {
            continue;
        };
        by_account
            .entry(a)
            .or_insert_with(|| (wallets.starting_credit(a), Vec::new()))
            .1
            .push(Hold::from_store(
                a,
                &h.call_id,
                h.amount,
                h.created_at,
                h.expires_at,
            ));
    }
    by_account
}

/// Replaces the in-memory wallets of the accounts `mine` accepts with what
/// the store holds (an account with nothing stored goes back to its starting
/// credit and no holds): done by a new owner before it consumes the
/// partitions, so the holds and top-ups the previous owner made durable are
/// there, and the replay from the stored offsets re-debits what it had not
/// flushed. Returns how many wallets were set.
pub fn reload(
    wallets: &Wallets,
    balances: Vec<(String, Money)>,
    holds: Vec<StoredHold>,
    mine: impl Fn(AccountSid) -> bool,
) -> usize {
    let mut by_account = group_stored(wallets, balances, holds, &mine);
    for a in wallets.accounts() {
        if mine(a) {
            by_account
                .entry(a)
                .or_insert_with(|| (wallets.starting_credit(a), Vec::new()));
        }
    }
    let n = by_account.len();
    for (a, (balance, holds)) in by_account {
        wallets.load(a, balance, holds);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wallet::{Grant, HoldStatus, CENT};

    fn sid(i: u128) -> AccountSid {
        AccountSid::parse(&format!("AC{i:032x}")).unwrap()
    }

    #[test]
    fn a_lone_api_answers_everything_itself() {
        let o = Ownership::lone();
        assert_eq!(o.route(sid(1)), Route::Local(None));
    }

    #[test]
    fn routes_follow_the_owned_partitions() {
        let o = Ownership::routed("cdrs", Partitioner::ConsistentRandom, "http://a");
        assert_eq!(o.route(sid(1)), Route::Unknown, "count not known yet");
        o.set_partitions(4);
        let (a, b) = {
            let mut found = (None, None);
            for i in 0..100 {
                match o.partition_of(sid(i)) {
                    Some(0) if found.0.is_none() => found.0 = Some(sid(i)),
                    Some(1) if found.1.is_none() => found.1 = Some(sid(i)),
                    _ => {}
                }
            }
            (found.0.unwrap(), found.1.unwrap())
        };
        assert_eq!(
            o.partition_of(a),
            Partitioner::ConsistentRandom.partition(a.to_string().as_bytes(), 4)
        );
        assert_eq!(o.route(a), Route::Elsewhere(0));
        o.own(&[(0, 7)]);
        let fence = Fence {
            topic: "cdrs".into(),
            partition: 0,
            epoch: 7,
        };
        assert_eq!(o.route(a), Route::Local(Some(fence)));
        assert_eq!(o.route(b), Route::Elsewhere(1));
        o.disown([0]);
        assert_eq!(o.route(a), Route::Elsewhere(0));
        assert!(o.owned().is_empty());
    }

    #[test]
    fn a_reload_replaces_only_the_partitions_wallets() {
        let w = Wallets::new(Box::new(|_| 500 * CENT));
        let (mine, other) = (sid(1), sid(2));
        // What this instance believed before: a stale hold on each account.
        for a in [mine, other] {
            assert!(matches!(
                w.grant(a, "old", 100 * CENT, 10, 0, 100),
                Grant::Granted(_)
            ));
        }
        let stored_hold = StoredHold {
            account_sid: mine.to_string(),
            call_id: "new".into(),
            amount: 50 * CENT,
            status: HoldStatus::Reserved,
            created_at: 1,
            expires_at: 200,
            billing: None,
        };
        let n = reload(
            &w,
            vec![(mine.to_string(), 420 * CENT), (other.to_string(), CENT)],
            vec![stored_hold],
            |a| a == mine,
        );
        assert_eq!(n, 1);
        let v = w.wallet(mine).view();
        assert_eq!(
            (v.balance, v.held, v.available, v.active_holds),
            (420 * CENT, 50 * CENT, 370 * CENT, 1)
        );
        assert!(w.hold(mine, "old").is_none(), "the stale hold is gone");
        assert!(w.hold(mine, "new").is_some());
        // The other partition's wallet is untouched.
        let v = w.wallet(other).view();
        assert_eq!((v.balance, v.held), (500 * CENT, 100 * CENT));
        // A wallet of the partition with nothing stored starts over.
        let fresh = sid(3);
        w.wallet(fresh).debit(CENT);
        reload(&w, vec![], vec![], |a| a == fresh);
        assert_eq!(w.wallet(fresh).view().balance, 500 * CENT);
    }
}
