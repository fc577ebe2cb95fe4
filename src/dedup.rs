//! The durable, bounded dedup window (DESIGN invariant 2).
//!
//! A CDR id is hashed to 128 bits (xxh3) — collision odds are ~2⁻⁶⁴ even at billions
//! of ids — and remembered per partition (an account always lands on one partition,
//! so a re-sent CDR comes back to the same one). Ids first seen since the last flush
//! are written with that flush, in the same transaction as the deltas and offsets;
//! on partition assignment the window is loaded back from the store.
//!
//! The window is counted from when an id was *first seen*, in days: an id is
//! forgotten `window_days` after it was first seen, and a duplicate arriving later
//! than that is counted again. Memory is ~40 bytes per id in the window.

use hashbrown::HashMap;
use rustc_hash::FxBuildHasher;

use crate::calendar::Day;
use crate::cdr::Cdr;
use crate::pipeline::SeenIds;

/// The 128-bit hash a CDR id is remembered by.
#[inline]
pub fn id_hash(id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(id.as_bytes())
}

/// Ids seen on one partition within the window.
#[derive(Debug, Default)]
pub struct DedupWindow {
    /// id hash → day first seen.
    seen: HashMap<u128, i32, FxBuildHasher>,
    /// Ids first seen since the last flush, in arrival order.
    fresh: Vec<u128>,
    /// The day stamped on ids seen now (updated by the consumer loop, not per CDR).
    today: i32,
}

impl DedupWindow {
    pub fn new(today: Day) -> DedupWindow {
        DedupWindow {
            today: today.0,
            ..Default::default()
        }
    }

    pub fn set_today(&mut self, today: Day) {
        self.today = today.0;
    }

    /// Adds ids loaded from the store.
    pub fn load(&mut self, seen_day: Day, ids: impl IntoIterator<Item = u128>) {
        for h in ids {
            self.seen.entry(h).or_insert(seen_day.0);
        }
    }

    /// Returns `true` if the id is new (and remembers it).
    #[inline]
    pub fn first_sighting_of(&mut self, hash: u128) -> bool {
        match self.seen.entry(hash) {
            hashbrown::hash_map::Entry::Occupied(_) => false,
            hashbrown::hash_map::Entry::Vacant(v) => {
                v.insert(self.today);
                self.fresh.push(hash);
                true
            }
        }
    }

    /// Takes the ids first seen since the last call.
    pub fn take_fresh(&mut self) -> Vec<u128> {
        std::mem::take(&mut self.fresh)
    }

    /// Forgets ids first seen before `oldest_kept`.
    pub fn prune(&mut self, oldest_kept: Day) {
        self.seen.retain(|_, d| *d >= oldest_kept.0);
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

impl SeenIds for DedupWindow {
    #[inline]
    fn first_sighting(&mut self, cdr: &Cdr<'_>) -> bool {
        self.first_sighting_of(id_hash(&cdr.id))
    }
}

/// Packs id hashes into the blob stored in `dedup_batches.ids`.
pub fn pack(ids: &[u128]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ids.len() * 16);
    for h in ids {
        out.extend_from_slice(&h.to_le_bytes());
    }
    out
}

/// Unpacks a `dedup_batches.ids` blob; a trailing partial entry is ignored.
pub fn unpack(blob: &[u8]) -> impl Iterator<Item = u128> + '_ {
    blob.chunks_exact(16)
        .map(|c| u128::from_le_bytes(c.try_into().expect("16 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_and_forgets() {
        let mut w = DedupWindow::new(Day(100));
        let a = id_hash("CA1");
        assert!(w.first_sighting_of(a));
        assert!(!w.first_sighting_of(a));
        assert_eq!(w.take_fresh(), vec![a]);
        assert!(w.take_fresh().is_empty());
        w.set_today(Day(108));
        let b = id_hash("CA2");
        assert!(w.first_sighting_of(b));
        w.prune(Day(101));
        assert!(w.first_sighting_of(a), "forgotten after the window");
        assert!(!w.first_sighting_of(b));
    }

    #[test]
    fn pack_round_trips() {
        let ids = [id_hash("a"), id_hash("b"), u128::MAX, 0];
        assert_eq!(unpack(&pack(&ids)).collect::<Vec<_>>(), ids);
        let mut w = DedupWindow::new(Day(5));
        w.load(Day(3), unpack(&pack(&ids)));
        assert!(!w.first_sighting_of(id_hash("b")));
        assert_eq!(w.len(), 4);
    }
}
