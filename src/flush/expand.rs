//! What a flush writes, computed from the consumers' deltas off the hot path
//! and without I/O: each account-day cell added into the day, month, year and
//! all-time rows of the usage page it belongs to (see [`crate::store::page`]),
//! each by-number/by-agent entry into its page; and a snapshot's partitions
//! spread over the writer connections.

use crate::calendar::Period;
use crate::counters::{AccountDay, Deltas, Leaves};
use crate::rating::Tariff;
use crate::store::page::{PageDelta, PageDeltas};

use super::PartitionCut;

/// The page deltas of `parts`, in key order (account SID, then page: the order
/// of the store's primary key, and one lock order for every writer). Deltas of
/// several partitions are combined without merging their tables; what two of
/// them share (an account seen on two partitions) is summed. Rows and
/// breakdowns are expanded on two threads: after a backlog drain the final
/// flush is all that is left to do, and the second core is idle.
pub fn pages(mut parts: Vec<Deltas>, tariff: &Tariff) -> Vec<PageDelta> {
    let by_entry: Vec<Deltas> = parts.iter_mut().map(Deltas::split_breakdowns).collect();
    let (mut pages, breakdowns) = std::thread::scope(|s| {
        let breakdowns = s.spawn(|| breakdown_pages(by_entry));
        let rows = row_pages(&parts, tariff);
        (
            rows,
            breakdowns.join().expect("breakdown expansion panicked"),
        )
    });
    pages.merge(breakdowns);
    pages.into_vec()
}

/// The usage rows of `parts` on their pages. The account-day cells are sorted
/// by account and day (small elements: a key and a reference); one pass per
/// account then sums its months, years and all time as it goes, and each row
/// is added to its page once. (Adding every cell into a hash map of 400-byte
/// rows and sorting those took 3× as long.)
fn row_pages(parts: &[Deltas], tariff: &Tariff) -> PageDeltas {
    let mut cells: Vec<(AccountDay, &Leaves)> = parts
        .iter()
        .flat_map(|d| d.cells().iter().map(|(k, l)| (*k, l)))
        .collect();
    cells.sort_unstable_by_key(|(k, _)| (k.account, k.day));
    let mut pages = PageDeltas::default();
    for account_cells in cells.chunk_by(|a, b| a.0.account == b.0.account) {
        let account = account_cells[0].0.account;
        let price_unit = &tariff.plan_for(account).currency;
        // Cells come in day order, so each period's sum is the last of its kind.
        let mut sums: [Vec<(Period, Leaves)>; 3] = Default::default();
        let mut all = Leaves::default();
        for (k, leaves) in account_cells {
            all.add(leaves);
            let [day, month, year, _] = Period::containing(k.day);
            for (period, out) in [day, month, year].into_iter().zip(sums.iter_mut()) {
                match out.last_mut() {
                    Some((p, sum)) if *p == period => sum.add(leaves),
                    _ => out.push((period, **leaves)),
                }
            }
        }
        let all = std::iter::once((Period::AllTime, all));
        for (period, leaves) in sums.into_iter().flatten().chain(all) {
            pages.add_row(account, period, price_unit, &leaves);
        }
    }
    pages
}

fn breakdown_pages(parts: Vec<Deltas>) -> PageDeltas {
    let mut pages = PageDeltas::default();
    pages.add_breakdowns(
        parts
            .into_iter()
            .flat_map(Deltas::into_breakdowns)
            .collect(),
    );
    pages
}

/// Deals partitions' cuts into at most `lanes` shares of about equal size
/// (largest first, each to the lightest share so far), each in partition order.
pub fn spread(mut parts: Vec<PartitionCut>, lanes: usize) -> Vec<Vec<PartitionCut>> {
    let lanes = lanes.clamp(1, parts.len().max(1));
    parts.sort_by_key(|p| std::cmp::Reverse(p.deltas.live_cells()));
    let mut shares: Vec<(usize, Vec<PartitionCut>)> = (0..lanes).map(|_| (0, Vec::new())).collect();
    for p in parts {
        let lightest = shares
            .iter_mut()
            .min_by_key(|(cells, _)| *cells)
            .expect("at least one share");
        lightest.0 += p.deltas.live_cells();
        lightest.1.push(p);
    }
    shares
        .into_iter()
        .map(|(_, mut share)| {
            share.sort_by_key(|p| p.offset.partition);
            share
        })
        .filter(|share| !share.is_empty())
        .collect()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::calendar::Day;
    use crate::category::Category;
    use crate::cdr::AccountSid;
    use crate::counters::{Dimension, LeafDay, RowKey, Tally};
    use crate::store::page::PageId;
    use crate::store::OffsetAdvance;

    pub fn tariff() -> Tariff {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tallyd.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        crate::config::Config::from_toml(&text, &path, [])
            .unwrap()
            .1
    }

    pub fn call(d: &mut Deltas, account: u128, day: i32, number: &str, agent: &str) {
        d.record(
            LeafDay {
                account: AccountSid(account),
                day: Day(day),
                leaf: Category::CallsOutbound,
                hour: 0,
            },
            Tally {
                count: 1,
                usage: 60,
                price: 5_000,
            },
            Some(number),
            Some(agent),
        );
    }

    pub fn cut(partition: i32, deltas: Deltas) -> PartitionCut {
        PartitionCut {
            deltas,
            offset: OffsetAdvance {
                topic: "cdrs".into(),
                partition,
                from: None,
                to: 1,
            },
            dedup: None,
            wallet: Default::default(),
            consumed: Default::default(),
            crossings: Vec::new(),
        }
    }

    #[test]
    fn pages_are_in_key_order_and_an_account_on_two_partitions_is_summed() {
        let (mut a, mut b) = (Deltas::default(), Deltas::default());
        for acc in [9u128, 3, 7] {
            call(&mut a, acc, 20_000, "+1555", "agt_b");
            call(&mut a, acc, 20_001, "+1444", "agt_a");
        }
        // Account 3 also came through the other partition.
        call(&mut b, 3, 20_000, "+1555", "agt_b");
        let pages = pages(vec![a, b], &tariff());
        let keys: Vec<(AccountSid, PageId)> = pages.iter().map(|p| (p.account, p.page)).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(keys, sorted, "pages sorted, each key once");
        // 3 accounts x (the month of days 20000-20001 + all).
        assert_eq!(pages.len(), 6);
        let all3 = pages
            .iter()
            .find(|p| p.account == AccountSid(3) && p.page == PageId::All)
            .unwrap();
        let (_, unit, all) = all3.delta.rows().find(|r| r.0 == Period::AllTime).unwrap();
        assert_eq!((all.get(Category::Calls).count, unit), (3, "usd"));
        let numbers: Vec<(&str, u64)> = all3
            .delta
            .breakdowns()
            .filter(|b| b.dimension == Dimension::Number)
            .map(|b| (b.value, b.calls.count))
            .collect();
        assert_eq!(numbers, [("+1444", 1), ("+1555", 2)]);
        let month3 = pages
            .iter()
            .find(|p| p.account == AccountSid(3) && p.page != PageId::All)
            .unwrap();
        // Two day rows and the month row; agents and hours per day.
        assert_eq!(month3.delta.rows().count(), 3);
        assert_eq!(month3.delta.breakdowns().count(), 4);
    }

    proptest::proptest! {
        /// The sort-and-walk expansion adds up exactly what adding every cell into
        /// its four periods' rows does, across month and year ends and with
        /// accounts on several partitions.
        #[test]
        fn page_rows_are_every_cell_added_into_its_four_periods(
            cells in proptest::collection::vec(
                (0usize..3, 0u128..6, 20_080i32..20_100, 0usize..Category::LEAVES, 1u64..1000),
                1..200,
            )
        ) {
            let mut parts: Vec<Deltas> = (0..3).map(|_| Deltas::default()).collect();
            for (p, account, day, leaf, usage) in cells {
                let leaf_day = LeafDay {
                    account: AccountSid(account),
                    day: Day(day),
                    leaf: Category::ALL[leaf],
                    hour: 0,
                };
                let tally = Tally { count: 1, usage, price: usage as i64 * 7 };
                parts[p].record(leaf_day, tally, None, None);
            }
            let mut expected = hashbrown::HashMap::default();
            for d in &parts {
                d.add_rows_to(&mut expected);
            }
            let mut got: hashbrown::HashMap<RowKey, Leaves, _> = Default::default();
            for p in pages(parts, &tariff()) {
                for (period, _, leaves) in p.delta.rows() {
                    proptest::prop_assert_eq!(PageId::of_period(period), p.page);
                    let fresh = got.insert(RowKey { account: p.account, period }, leaves);
                    proptest::prop_assert!(fresh.is_none(), "each row once");
                }
            }
            proptest::prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn partitions_are_spread_evenly_and_whole() {
        let sizes = [5usize, 1, 4, 2, 3];
        let parts: Vec<PartitionCut> = sizes
            .iter()
            .enumerate()
            .map(|(p, &n)| {
                let mut d = Deltas::default();
                for acc in 0..n {
                    call(&mut d, acc as u128 + 100 * p as u128, 20_000, "+1", "a");
                }
                cut(p as i32, d)
            })
            .collect();
        let shares = spread(parts, 2);
        assert_eq!(shares.len(), 2);
        let cells: Vec<usize> = shares
            .iter()
            .map(|s| s.iter().map(|p| p.deltas.account_days()).sum())
            .collect();
        assert_eq!(cells.iter().sum::<usize>(), 15);
        assert!(cells.iter().all(|&c| c == 7 || c == 8), "{cells:?}");
        for share in &shares {
            let ps: Vec<i32> = share.iter().map(|p| p.offset.partition).collect();
            assert!(ps.windows(2).all(|w| w[0] < w[1]), "{ps:?}");
        }
        // More writers than partitions: one share per partition, none empty.
        let one = vec![cut(0, Deltas::default())];
        assert_eq!(spread(one, 4).len(), 1);
    }
}
