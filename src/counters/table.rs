//! The hash table under the counters: open addressing over a dense entry array,
//! built so the hot path can fetch the memory a CDR will touch a batch ahead.
//!
//! A lookup touches two cache lines at random: the slot (an 8-byte tag and index
//! in a power-of-two array probed linearly) and the entry it points to. With
//! hundreds of thousands of live entries both miss the cache, and a miss costs
//! more than the rest of a CDR's work. So a batch of CDRs is looked up in waves:
//! [`Table::prefetch_slot`] for every CDR of the batch, then
//! [`Table::candidate`] (its slot is cached by now) to prefetch the entry, then the
//! real update — by which time both lines are in cache and the misses of the whole
//! batch have overlapped instead of following one another.
//!
//! Entries are never removed one by one (a flush takes the whole table), so the
//! entry array stays dense and iteration is a slice walk.

/// A key that hashes itself to 64 well-mixed bits.
pub trait TableKey: Copy + Eq {
    fn hash64(&self) -> u64;
}

/// Multiplies and folds the 128-bit product: a fast, well-mixing step for keys
/// that are already random-looking (SIDs, id hashes).
#[inline]
pub fn fold_mul(a: u64, b: u64) -> u64 {
    let p = (a as u128) * (b as u128);
    (p as u64) ^ ((p >> 64) as u64)
}

/// Hints the CPU to load the cache line holding `p`. Never faults, whatever `p`.
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; it neither reads into the program nor
    // faults on any address.
    unsafe {
        core::arch::x86_64::_mm_prefetch(p as *const i8, core::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

const EMPTY: u64 = 0;
/// The smallest slot array allocated.
const MIN_SLOTS: usize = 16;

#[inline]
fn tag(h: u64) -> u64 {
    h >> 32
}

/// Open-addressing map from `K` to `V` with prefetchable lookups.
#[derive(Debug, Clone)]
pub struct Table<K, V> {
    /// `EMPTY`, or the key hash's high 32 bits above (entry index + 1).
    slots: Vec<u64>,
    entries: Vec<(K, V)>,
}

impl<K, V> Default for Table<K, V> {
    fn default() -> Self {
        Table {
            slots: Vec::new(),
            entries: Vec::new(),
        }
    }
}

impl<K: TableKey, V> Table<K, V> {
    /// A table that holds `n` entries without growing.
    pub fn with_capacity(n: usize) -> Self {
        if n == 0 {
            return Table::default();
        }
        Table {
            slots: vec![EMPTY; slots_for(n)],
            entries: Vec::with_capacity(n),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> &[(K, V)] {
        &self.entries
    }

    pub fn into_entries(self) -> Vec<(K, V)> {
        self.entries
    }

    /// Every entry, its value writable (keys stay as they are: the slots
    /// point at them).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&K, &mut V)> {
        self.entries.iter_mut().map(|(k, v)| (&*k, v))
    }

    #[inline]
    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    /// Starts loading the first slot a lookup of hash `h` reads.
    #[inline]
    pub fn prefetch_slot(&self, h: u64) {
        if let Some(s) = self.slots.get(h as usize & self.mask()) {
            prefetch(s);
        }
    }

    /// The entry a lookup of hash `h` would compare first, if its slot is taken:
    /// for prefetching (it may hold another key with the same tag, or the key may
    /// be absent). Reads slots only.
    #[inline]
    pub fn candidate(&self, h: u64) -> Option<&(K, V)> {
        let mask = self.mask();
        let mut i = h as usize & mask;
        loop {
            let s = *self.slots.get(i)?;
            if s == EMPTY {
                return None;
            }
            if s >> 32 == tag(h) {
                return self.entries.get((s as u32 - 1) as usize);
            }
            i = (i + 1) & mask;
        }
    }

    /// Where `key` is, or the empty slot it would go in.
    #[inline]
    fn probe(&self, key: &K, h: u64) -> Result<usize, usize> {
        let mask = self.mask();
        let mut i = h as usize & mask;
        loop {
            let s = self.slots[i];
            if s == EMPTY {
                return Err(i);
            }
            if s >> 32 == tag(h) {
                let e = (s as u32 - 1) as usize;
                if self.entries[e].0 == *key {
                    return Ok(e);
                }
            }
            i = (i + 1) & mask;
        }
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        if self.slots.is_empty() {
            return None;
        }
        self.probe(key, key.hash64())
            .ok()
            .map(|e| &self.entries[e].1)
    }

    /// The value of `key` (whose hash is `h`), inserted from `new` if absent; and
    /// whether it was inserted.
    #[inline]
    pub fn get_or_insert_with(
        &mut self,
        key: K,
        h: u64,
        new: impl FnOnce() -> V,
    ) -> (&mut V, bool) {
        debug_assert_eq!(h, key.hash64());
        if (self.entries.len() + 1) * 2 > self.slots.len() {
            self.grow();
        }
        match self.probe(&key, h) {
            Ok(e) => (&mut self.entries[e].1, false),
            Err(slot) => {
                let e = self.entries.len();
                assert!(e < u32::MAX as usize, "counter table full");
                self.entries.push((key, new()));
                self.slots[slot] = (tag(h) << 32) | (e as u64 + 1);
                (&mut self.entries[e].1, true)
            }
        }
    }

    /// Doubles the slot array (keeping at most half of it in use) and re-slots
    /// every entry.
    #[cold]
    fn grow(&mut self) {
        let n = (self.slots.len() * 2).max(MIN_SLOTS);
        self.slots = vec![EMPTY; n];
        let mask = n - 1;
        for (e, (k, _)) in self.entries.iter().enumerate() {
            let h = k.hash64();
            let mut i = h as usize & mask;
            while self.slots[i] != EMPTY {
                i = (i + 1) & mask;
            }
            self.slots[i] = (tag(h) << 32) | (e as u64 + 1);
        }
    }
}

/// Slots for `n` entries at most half full.
fn slots_for(n: usize) -> usize {
    (n * 2 + 1).next_power_of_two().max(MIN_SLOTS)
}

/// Equal when the same keys map to equal values, whatever the insertion order.
impl<K: TableKey, V: PartialEq> PartialEq for Table<K, V> {
    fn eq(&self, o: &Self) -> bool {
        self.len() == o.len() && self.entries.iter().all(|(k, v)| o.get(k) == Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct K(u64);

    impl TableKey for K {
        fn hash64(&self) -> u64 {
            // Deliberately poor: only 16 distinct hashes, colliding tags and slots.
            fold_mul(self.0 % 16, 0x9e37_79b9_7f4a_7c15)
        }
    }

    #[test]
    fn finds_inserts_and_grows_through_collisions() {
        let mut t: Table<K, u64> = Table::default();
        assert!(t.get(&K(1)).is_none());
        assert!(t.candidate(K(1).hash64()).is_none());
        for round in 0..3 {
            for k in 0..1000u64 {
                let key = K(k);
                let (v, new) = t.get_or_insert_with(key, key.hash64(), || 0);
                assert_eq!(new, round == 0);
                *v += k;
            }
        }
        assert_eq!(t.len(), 1000);
        for k in 0..1000u64 {
            assert_eq!(t.get(&K(k)), Some(&(3 * k)));
            // The candidate shares the key's tag, so it is a key of the same class.
            let c = t.candidate(K(k).hash64()).expect("slot taken");
            assert_eq!(c.0 .0 % 16, k % 16);
        }
        assert!(t.get(&K(1000)).is_none());
        let presized: Table<K, u64> = Table::with_capacity(1000);
        assert!(presized.slots.len() >= 2000);
    }

    #[test]
    fn equality_ignores_insertion_order() {
        let fill = |keys: &mut dyn Iterator<Item = u64>| {
            let mut t: Table<K, u64> = Table::default();
            for k in keys {
                *t.get_or_insert_with(K(k), K(k).hash64(), || 0).0 += k;
            }
            t
        };
        let a = fill(&mut (0..100));
        let b = fill(&mut (0..100).rev());
        assert_eq!(a, b);
        let c = fill(&mut (1..100));
        assert_ne!(a, c);
    }
}
