use std::sync::Arc;

use std::sync::atomic::{AtomicI64, Ordering};

use proptest::prelude::*;

use super::*;
use crate::cdr::decode;
use crate::config::Config;

const ACCOUNT: AccountSid = AccountSid(7);

fn wallets(start: Money) -> Wallets {
    Wallets::new(Box::new(move |_| start))
}

#[test]
fn the_seed_refusal_message_byte_for_byte() {
    assert_eq!(
        refusal_message(188 * CENT, 300 * CENT),
        "Calls paused. Your balance is $1.88 but each call requires a $3.00 hold \
         (we release it back if no one answers). Add $1.12 or more in credits to keep calling."
    );
    // A shortfall in fractions of a cent asks for the next whole cent.
    assert!(refusal_message(188 * CENT + 1, 300 * CENT).contains("Add $1.12 or more"));
    assert!(refusal_message(188 * CENT - 1, 300 * CENT).contains("Add $1.13 or more"));
    assert!(refusal_message(-50 * CENT, 300 * CENT).contains("balance is -$0.50"));
}

#[test]
fn the_seed_hold_is_three_dollars_for_an_hour_at_five_cents() {
    let (_, tariff) = Config::shipped().unwrap();
    let callingbox = tariff
        .plans()
        .iter()
        .find(|p| p.name == "callingbox")
        .unwrap();
    assert_eq!(
        hold_amount(callingbox, CallNumberType::Local, None, 60),
        300 * CENT
    );
    let agentphone = tariff
        .plans()
        .iter()
        .find(|p| p.name == "agentphone")
        .unwrap();
    // $0.22/min hosted × 60 = $13.20; webhook $0.13 × 60 = $7.80.
    assert_eq!(
        hold_amount(agentphone, CallNumberType::Local, Some(Mode::Hosted), 60),
        1320 * CENT
    );
    assert_eq!(
        hold_amount(agentphone, CallNumberType::Mobile, Some(Mode::Webhook), 60),
        780 * CENT
    );
    // Rounded up to the cent: 7 minutes at $0.13 = $0.91; 1 minute at 0.13 is exact.
    assert_eq!(round_up_to_cent(90_001), 91 * CENT);
    assert_eq!(round_up_to_cent(91 * CENT), 91 * CENT);
    assert_eq!(round_up_to_cent(-1), 0);
}

#[test]
fn money_texts() {
    assert_eq!(decimal(498_750), "4.98750");
    assert_eq!(dollars(498_750, false), "$4.98");
    assert_eq!(dollars(498_750, true), "$4.99");
    assert_eq!(status(600 * CENT, 300 * CENT), "ok");
    assert_eq!(status(599 * CENT, 300 * CENT), "low");
    assert_eq!(status(299 * CENT, 300 * CENT), "paused");
}

#[test]
fn grant_is_idempotent_refuses_overspending_and_limits_calls() {
    let w = wallets(500 * CENT);
    let Grant::Granted(a) = w.grant(ACCOUNT, "CA1", 300 * CENT, 2, 0, 60) else {
        panic!("first hold refused")
    };
    assert!(
        matches!(w.grant(ACCOUNT, "CA1", 300 * CENT, 2, 0, 60), Grant::Existing(h) if Arc::ptr_eq(&h, &a))
    );
    match w.grant(ACCOUNT, "CA2", 300 * CENT, 2, 0, 60) {
        Grant::Refused { available, amount } => {
            assert_eq!((available, amount), (200 * CENT, 300 * CENT))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        w.grant(ACCOUNT, "CA3", 100 * CENT, 2, 0, 60),
        Grant::Granted(_)
    ));
    assert!(matches!(
        w.grant(ACCOUNT, "CA4", CENT, 2, 0, 60),
        Grant::TooManyCalls { limit: 2 }
    ));
    let v = w.wallet(ACCOUNT).view();
    assert_eq!(
        (v.balance, v.held, v.available),
        (500 * CENT, 400 * CENT, 100 * CENT)
    );
    assert!(w.release(&a));
    assert!(!w.release(&a), "a hold is released once");
    let v = w.wallet(ACCOUNT).view();
    assert_eq!(
        (v.held, v.available, v.active_holds),
        (100 * CENT, 400 * CENT, 1)
    );
}

/// A hold released and forgotten leaves nothing in the registry, however
/// many call ids come and go; a reserved one is never forgotten.
#[test]
fn released_holds_are_forgotten_reserved_ones_kept() {
    let w = wallets(500 * CENT);
    for i in 0..1000 {
        let Grant::Granted(h) = w.grant(ACCOUNT, &format!("CA{i}"), 300 * CENT, 2, 0, 60) else {
            panic!("hold {i} refused")
        };
        w.forget(&h);
        assert!(w.hold(ACCOUNT, &h.call_id).is_some(), "reserved: kept");
        assert!(w.release(&h));
        w.forget(&h);
    }
    assert_eq!(w.hold_count.load(Ordering::Acquire), 0);
    assert!(w.holds.is_empty());
    let v = w.wallet(ACCOUNT).view();
    assert_eq!((v.balance, v.held, v.active_holds), (500 * CENT, 0, 0));
}

fn call_cdr(id: &str, status: &str, billsec: u32) -> Vec<u8> {
    format!(
        r#"{{"id":"{id}","account_sid":"AC00000000000000000000000000000c11","kind":"call",
        "timestamp":"2026-11-29T10:00:00Z","direction":"outbound","status":"{status}",
        "duration":{},"billsec":{billsec}}}"#,
        billsec + 5
    )
    .into_bytes()
}

#[test]
fn a_cdr_settles_or_releases_its_hold_and_a_late_one_is_still_charged() {
    let (_, tariff) = Config::shipped().unwrap();
    let w = Arc::new(wallets(500 * CENT));
    let mut ledger = Ledger::new(w.clone());
    let answered = call_cdr("CAa", "completed", 120);
    let cdr = decode(&answered).unwrap();
    let account = cdr.account;
    let Grant::Granted(a) = w.grant(account, "CAa", 200 * CENT, 5, 0, 60) else {
        panic!()
    };
    let Grant::Granted(b) = w.grant(account, "CAb", 200 * CENT, 5, 0, 60) else {
        panic!()
    };
    // 2 minutes at $0.05.
    let charge = tariff.rate(&cdr, cdr.leaf());
    assert_eq!(charge.price, 10 * CENT);
    ledger.debit(&cdr, charge);
    assert_eq!(a.status(), HoldStatus::Settled);
    assert_eq!(
        a.billing(),
        Some(CallBilling {
            duration: 125,
            billsec: 120,
            charged: 10 * CENT
        })
    );
    let unanswered = call_cdr("CAb", "no-answer", 0);
    let cdr = decode(&unanswered).unwrap();
    ledger.debit(&cdr, tariff.rate(&cdr, cdr.leaf()));
    assert_eq!(b.status(), HoldStatus::Released);
    // An expired hold, then its late CDR: released and still charged.
    let Grant::Granted(c) = w.grant(account, "CAc", 200 * CENT, 5, 0, 60) else {
        panic!()
    };
    assert_eq!(w.expire(59, 0, |_| true).len(), 0);
    assert_eq!(w.expire(60, 0, |_| true).len(), 1);
    let late = call_cdr("CAc", "completed", 60);
    let cdr = decode(&late).unwrap();
    ledger.debit(&cdr, tariff.rate(&cdr, cdr.leaf()));
    assert_eq!(c.status(), HoldStatus::Released);
    assert_eq!(c.billing().unwrap().charged, 5 * CENT);
    let v = w.wallet(account).view();
    assert_eq!((v.balance, v.held, v.active_holds), (485 * CENT, 0, 0));
    let cut = ledger.take();
    assert_eq!(cut.debits, vec![(account, 15 * CENT, 500 * CENT)]);
    assert_eq!(cut.holds.len(), 3);
    assert!(ledger.take().is_empty());
}

#[test]
fn load_replaces_the_accounts_state_with_the_stored_one() {
    let w = wallets(500 * CENT);
    w.grant(ACCOUNT, "CAx", 100 * CENT, 5, 0, 60);
    w.load(
        ACCOUNT,
        900 * CENT,
        vec![Hold::new(ACCOUNT, "CAy", 300 * CENT, 0, 60)],
    );
    assert!(w.hold(ACCOUNT, "CAx").is_none());
    let v = w.wallet(ACCOUNT).view();
    assert_eq!(
        (v.balance, v.held, v.available, v.active_holds),
        (900 * CENT, 300 * CENT, 600 * CENT, 1)
    );
}

/// One step of one actor.
#[derive(Debug, Clone)]
enum Op {
    Grant(u8, Money),
    Release(u8),
    Settle(u8, Money),
    Debit(Money),
    Credit(Money),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..12, 1i64..400_000).prop_map(|(c, a)| Op::Grant(c, a)),
        (0u8..12).prop_map(Op::Release),
        (0u8..12, 0i64..400_000).prop_map(|(c, p)| Op::Settle(c, p)),
        (0i64..300_000).prop_map(Op::Debit),
        (0i64..300_000).prop_map(Op::Credit),
    ]
}

/// Runs `op` against the wallets; the model keeps the balance it implies.
fn apply(w: &Wallets, op: &Op, balance: &mut Money) {
    let wallet = w.wallet(ACCOUNT);
    match *op {
        Op::Grant(c, a) => {
            let before = wallet.view().available;
            match w.grant(ACCOUNT, &format!("CA{c}"), a, 4, 0, 60) {
                Grant::Refused { available, .. } => assert!(available < a),
                Grant::Granted(_) => assert!(before >= a),
                _ => {}
            }
        }
        Op::Release(c) => {
            if let Some(h) = w.hold(ACCOUNT, &format!("CA{c}")) {
                w.release(&h);
            }
        }
        Op::Settle(c, price) => {
            // What the ledger does for an answered call.
            *balance -= price;
            match w.hold(ACCOUNT, &format!("CA{c}")) {
                Some(h) if h.leave_reserved(HoldStatus::Settled) => wallet.settle(h.amount, price),
                _ => wallet.debit(price),
            }
        }
        Op::Debit(p) => {
            wallet.debit(p);
            *balance -= p;
        }
        Op::Credit(p) => {
            wallet.credit(p);
            *balance += p;
        }
    }
}

proptest! {
    /// Any interleaving of grants, releases, settlements, debits and credits:
    /// the balance is exactly the model's, held is the sum of reserved holds,
    /// and a grant never takes available below zero.
    #[test]
    fn interleavings_keep_the_books_exact(ops in proptest::collection::vec(op(), 1..200)) {
        let w = wallets(500_000);
        let mut balance = 500_000;
        for op in &ops {
            let before = w.wallet(ACCOUNT).view().available;
            apply(&w, op, &mut balance);
            let v = w.wallet(ACCOUNT).view();
            prop_assert_eq!(v.balance, balance);
            let reserved: Vec<Arc<Hold>> = (0..12)
                .filter_map(|c| w.hold(ACCOUNT, &format!("CA{c}")))
                .filter(|h| h.status() == HoldStatus::Reserved)
                .collect();
            prop_assert_eq!(v.held, reserved.iter().map(|h| h.amount).sum::<Money>());
            prop_assert_eq!(v.active_holds as usize, reserved.len());
            if let Op::Grant(..) = op {
                prop_assert!(v.available >= 0 || v.available == before);
            }
        }
    }
}

/// Many threads granting, settling, releasing, debiting and crediting one
/// account at once: available never goes below zero through a grant, and the
/// final balance is exact to the milli-cent.
#[test]
fn threads_never_overspend_and_the_balance_is_exact() {
    const THREADS: usize = 8;
    const ROUNDS: usize = 20_000;
    let w = Arc::new(wallets(1_000 * CENT));
    let wallet = w.wallet(ACCOUNT);
    let charged = Arc::new(AtomicI64::new(0));
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let w = w.clone();
            let wallet = wallet.clone();
            let charged = charged.clone();
            s.spawn(move || {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(t as u64);
                use rand::{Rng, SeedableRng};
                for i in 0..ROUNDS {
                    let call = format!("CA{t}-{i}");
                    let amount = rng.gen_range(1..300 * CENT);
                    if let Grant::Granted(h) = w.grant(ACCOUNT, &call, amount, 64, 0, 60) {
                        match rng.gen_range(0..3) {
                            0 => {
                                w.release(&h);
                            }
                            _ => {
                                // An answered call, charged at most its hold.
                                let price = rng.gen_range(0..=h.amount);
                                charged.fetch_add(price, Ordering::Relaxed);
                                if h.leave_reserved(HoldStatus::Settled) {
                                    wallet.settle(h.amount, price);
                                } else {
                                    wallet.debit(price);
                                }
                            }
                        }
                    }
                    if i % 7 == 0 {
                        wallet.credit(CENT);
                        charged.fetch_sub(CENT, Ordering::Relaxed);
                    }
                }
            });
        }
        // A watcher: with no debits outside holds, available never drops
        // below zero at any moment.
        let wallet = wallet.clone();
        s.spawn(move || {
            for _ in 0..200_000 {
                assert!(wallet.available.load(Ordering::Acquire) >= 0);
            }
        });
    });
    let v = wallet.view();
    assert_eq!(v.held, 0);
    assert_eq!(v.active_holds, 0);
    assert_eq!(v.balance, 1_000 * CENT - charged.load(Ordering::Relaxed));
    assert!(v.available >= 0);
}
