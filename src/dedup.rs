//! The durable, bounded dedup window (docs/design.md, invariant 2).
//!
//! A CDR id is hashed to 128 bits (xxh3) — collision odds are ~2⁻⁶⁴ even at billions
//! of ids — and remembered per partition (an account always lands on one partition,
//! so a re-sent CDR comes back to the same one). Ids first seen since the last flush
//! are written with that flush, in the same transaction as the deltas and offsets;
//! on partition assignment the window is loaded back from the store.
//!
//! The window is counted from when an id was *first seen*, in days: an id is
//! forgotten `window_days` after it was first seen, and a duplicate arriving later
//! than that is counted again. Memory is 16 bytes per slot with 5/16 to 5/8 of the
//! slots in use: 26–51 bytes per id in the window.

use std::borrow::Cow;

use crate::calendar::Day;
use crate::cdr::Cdr;
use crate::counters::table::prefetch;
use crate::pipeline::SeenIds;

/// The 128-bit hash a CDR id is remembered by.
#[inline]
pub fn id_hash(id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(id.as_bytes())
}

/// The low 112 bits of an id hash; the top 16 hold the day it was first seen.
const HASH_BITS: u128 = (1 << 112) - 1;

/// Ids seen on one partition within the window.
///
/// An open-addressing set of 16-byte slots, each an id hash's low 112 bits with
/// the day it was first seen (days since 1970 as 16 bits, good until 2149) in the
/// top 16, probed linearly and kept at most 5/8 full: a lookup reads one cache line,
/// which [`DedupWindow::prepare`] prefetches a batch ahead. 112 bits of hash keep
/// the collision odds negligible (~n²·2⁻¹¹³).
#[derive(Debug, Default)]
pub struct DedupWindow {
    /// 0 = empty.
    slots: Vec<u128>,
    len: usize,
    /// Ids first seen since the last flush, in arrival order.
    fresh: Vec<u128>,
    /// The day stamped on ids seen now (updated by the consumer loop, not per CDR).
    today: Day,
}

/// The part of `hash` a slot compares; never 0, which marks an empty slot.
#[inline]
fn key_bits(hash: u128) -> u128 {
    (hash & HASH_BITS).max(1)
}

impl DedupWindow {
    pub fn new(today: Day) -> DedupWindow {
        DedupWindow {
            today,
            ..Default::default()
        }
    }

    pub fn set_today(&mut self, today: Day) {
        self.today = today;
    }

    #[inline]
    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    /// Adds ids loaded from the store.
    pub fn load(&mut self, seen_day: Day, ids: impl IntoIterator<Item = u128>) {
        for h in ids {
            self.insert(h, seen_day);
        }
    }

    /// Inserts `hash` first seen on `day`; `false` if it was already there.
    #[inline]
    fn insert(&mut self, hash: u128, day: Day) -> bool {
        if (self.len + 1) * 8 > self.slots.len() * 5 {
            self.grow();
        }
        let want = key_bits(hash);
        let mask = self.mask();
        let mut i = want as usize & mask;
        loop {
            let s = self.slots[i];
            if s == 0 {
                self.slots[i] = want | ((day.0 as u16 as u128) << 112);
                self.len += 1;
                return true;
            }
            if s & HASH_BITS == want {
                return false;
            }
            i = (i + 1) & mask;
        }
    }

    #[cold]
    fn grow(&mut self) {
        let n = (self.slots.len() * 2).max(64);
        let old = std::mem::replace(&mut self.slots, vec![0; n]);
        self.rehash(old.into_iter().filter(|&s| s != 0));
    }

    /// Puts `values` (slot values) into the (empty) slots.
    fn rehash(&mut self, values: impl Iterator<Item = u128>) {
        let mask = self.mask();
        self.len = 0;
        for v in values {
            let mut i = (v & HASH_BITS) as usize & mask;
            while self.slots[i] != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = v;
            self.len += 1;
        }
    }

    /// Returns `true` if the id is new (and remembers it).
    #[inline]
    pub fn first_sighting_of(&mut self, hash: u128) -> bool {
        let new = self.insert(hash, self.today);
        if new {
            self.fresh.push(hash);
        }
        new
    }

    /// Takes the ids first seen since the last call.
    pub fn take_fresh(&mut self) -> Vec<u128> {
        std::mem::take(&mut self.fresh)
    }

    /// Forgets ids first seen before `oldest_kept`.
    pub fn prune(&mut self, oldest_kept: Day) {
        let keep: Vec<u128> = self
            .slots
            .iter()
            .copied()
            .filter(|&s| s != 0 && (s >> 112) as i32 >= oldest_kept.0)
            .collect();
        self.slots = vec![0; (keep.len() * 8 / 5 + 1).next_power_of_two().max(64)];
        self.rehash(keep.into_iter());
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl SeenIds for DedupWindow {
    type Token = u128;

    #[inline]
    fn prepare(&self, cdr: &Cdr<'_>) -> u128 {
        let h = id_hash(&cdr.id);
        if let Some(s) = self.slots.get(key_bits(h) as usize & self.mask()) {
            prefetch(s);
        }
        h
    }

    #[inline]
    fn first_sighting(&mut self, hash: u128) -> bool {
        self.first_sighting_of(hash)
    }
}

/// The blob stored in `dedup_batches.ids`: the id hashes' 16-byte little-endian
/// forms back to back. On a little-endian machine that is the ids' own memory, so
/// a flush writes millions of ids without copying them (the consumer thread used
/// to pack them at every flush: 160 MB after a 10M-CDR backlog).
pub fn blob(ids: &[u128]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(ids))
    } else {
        Cow::Owned(ids.iter().flat_map(|h| h.to_le_bytes()).collect())
    }
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
    fn many_ids_across_growth_and_prune() {
        let mut w = DedupWindow::new(Day(20_000));
        let ids: Vec<u128> = (0..20_000).map(|i| id_hash(&format!("CA{i}"))).collect();
        for (i, h) in ids.iter().enumerate() {
            if i == 10_000 {
                w.set_today(Day(20_005));
            }
            assert!(w.first_sighting_of(*h));
        }
        assert_eq!(w.len(), 20_000);
        assert!(ids.iter().all(|h| !w.first_sighting_of(*h)));
        // The first half was seen on day 20 000, the second on 20 005.
        w.prune(Day(20_001));
        assert_eq!(w.len(), 10_000);
        assert!(ids[10_000..].iter().all(|h| !w.first_sighting_of(*h)));
        assert!(ids[..10_000].iter().all(|h| w.first_sighting_of(*h)));
    }

    #[test]
    fn blob_round_trips() {
        let ids = [id_hash("a"), id_hash("b"), u128::MAX, 0, 2];
        let b = blob(&ids);
        assert_eq!(b.len(), 80);
        // Little-endian whatever the machine: 2 is a 2 byte then fifteen zeros.
        assert_eq!(b[64..], [&[2][..], &[0; 15]].concat());
        assert_eq!(unpack(&b).collect::<Vec<_>>(), ids);
        let mut w = DedupWindow::new(Day(5));
        w.load(Day(3), unpack(&b));
        assert!(!w.first_sighting_of(id_hash("b")));
        assert_eq!(w.len(), 5);
    }
}
