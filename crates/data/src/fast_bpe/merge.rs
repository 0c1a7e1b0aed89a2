//! BPE merges over one pre-tokenized word, as `tokenizers`' `Word::merge_all`: start from one
//! symbol per byte, repeatedly merge the adjacent pair with the lowest merge rank (leftmost on
//! ties), and a bounded word cache in front.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;

/// FxHash (rustc's): `h = (h.rotl(5) ^ word) * K`, eight bytes at a time, finished with a
/// xor-shift-multiply so the low bits (the table index) depend on every input bit; much
/// cheaper than SipHash for short strings and id pairs.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

const K: u64 = 0xf135_7aea_2e62_a9c5;

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        let h = self.0 ^ (self.0 >> 31);
        h.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (h >> 29)
    }
}

pub(crate) type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// Merge table: `(left << 32) | right` -> (rank, merged id).
pub(crate) type Merges = FxMap<u64, (u32, u32)>;

#[inline]
fn pair(a: u32, b: u32) -> u64 {
    (u64::from(a) << 32) | u64::from(b)
}

#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    prev: i32,
    next: i32,
    removed: bool,
}

/// Appends the BPE ids of a word given as its byte symbols' ids.
pub(crate) fn merge_word(symbol_ids: &[u32], merges: &Merges, out: &mut Vec<u32>) {
    let n = symbol_ids.len();
    if n < 2 {
        out.extend_from_slice(symbol_ids);
        return;
    }
    let mut symbols: Vec<Symbol> = symbol_ids
        .iter()
        .enumerate()
        .map(|(i, &id)| Symbol {
            id,
            prev: i as i32 - 1,
            next: if i + 1 < n { i as i32 + 1 } else { -1 },
            removed: false,
        })
        .collect();
    // Min-heap on (rank, position); the merged id rides along to detect stale entries.
    let mut queue: BinaryHeap<Reverse<(u32, u32, u32)>> = BinaryHeap::with_capacity(n);
    for (i, w) in symbol_ids.windows(2).enumerate() {
        if let Some(&(rank, new_id)) = merges.get(&pair(w[0], w[1])) {
            queue.push(Reverse((rank, i as u32, new_id)));
        }
    }
    while let Some(Reverse((_, pos, new_id))) = queue.pop() {
        let pos = pos as usize;
        let cur = symbols[pos];
        if cur.removed || cur.next < 0 {
            continue;
        }
        let next_pos = cur.next as usize;
        let right = symbols[next_pos];
        if merges.get(&pair(cur.id, right.id)).is_none_or(|&(_, id)| id != new_id) {
            continue;
        }
        symbols[pos].id = new_id;
        symbols[pos].next = right.next;
        symbols[next_pos].removed = true;
        if right.next >= 0 {
            symbols[right.next as usize].prev = pos as i32;
        }
        let cur = symbols[pos];
        if cur.prev >= 0
            && let Some(&(rank, id)) = merges.get(&pair(symbols[cur.prev as usize].id, cur.id))
        {
            queue.push(Reverse((rank, cur.prev as u32, id)));
        }
        if cur.next >= 0
            && let Some(&(rank, id)) = merges.get(&pair(cur.id, symbols[cur.next as usize].id))
        {
            queue.push(Reverse((rank, pos as u32, id)));
        }
    }
    out.extend(symbols.iter().filter(|s| !s.removed).map(|s| s.id));
}

/// Shards of the word cache (fewer lock collisions between threads).
const SHARDS: usize = 16;
/// Two-way sets per shard: the cache holds `SHARDS * SETS * 2` words in `64 *` that many
/// bytes (8 MiB), fixed, so memory does not grow with the data.
const SETS: usize = 4096;
/// Longest word cached (bytes); longer ones are merged each time.
const MAX_KEY: usize = 30;
/// Most ids of a cached word.
const MAX_IDS: usize = 8;

/// One cached word, one cache line: key bytes and ids inline, so a lookup touches one line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Entry {
    key_len: u8,
    n_ids: u8,
    key: [u8; MAX_KEY],
    ids: [u32; MAX_IDS],
}

const EMPTY: Entry = Entry { key_len: 0, n_ids: 0, key: [0; MAX_KEY], ids: [0; MAX_IDS] };

impl Entry {
    #[inline]
    fn holds(&self, word: &[u8]) -> bool {
        usize::from(self.key_len) == word.len() && &self.key[..word.len()] == word
    }
}

/// Word (pre-tokenized text) -> ids: a two-way set-associative table of fixed size (the most
/// recently used way first), sharded behind mutexes.
pub(crate) struct WordCache {
    shards: Vec<Mutex<Box<[Entry]>>>,
}

impl std::fmt::Debug for WordCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WordCache").field("words", &(SHARDS * SETS * 2)).finish()
    }
}

impl Default for WordCache {
    fn default() -> Self {
        Self { shards: (0..SHARDS).map(|_| Mutex::new(vec![EMPTY; SETS * 2].into_boxed_slice())).collect() }
    }
}

impl WordCache {
    /// Shard and first way of `word`'s set.
    #[inline]
    fn slot(word: &[u8]) -> (usize, usize) {
        let mut h = FxHasher::default();
        h.write(word);
        let h = h.finish();
        ((h >> 60) as usize % SHARDS, (h as usize % SETS) * 2)
    }

    /// Whether `word` can be cached with `n_ids` ids.
    #[inline]
    pub fn fits(word: &str, n_ids: usize) -> bool {
        !word.is_empty() && word.len() <= MAX_KEY && n_ids <= MAX_IDS
    }

    /// Appends the cached ids of `word` to `out`; false if not cached.
    pub fn get(&self, word: &str, out: &mut Vec<u32>) -> bool {
        let w = word.as_bytes();
        if w.is_empty() || w.len() > MAX_KEY {
            return false;
        }
        let (shard, i) = Self::slot(w);
        let mut set = self.shards[shard].lock().unwrap_or_else(|e| e.into_inner());
        let way = if set[i].holds(w) {
            i
        } else if set[i + 1].holds(w) {
            set.swap(i, i + 1);
            i
        } else {
            return false;
        };
        out.extend_from_slice(&set[way].ids[..usize::from(set[way].n_ids)]);
        true
    }

    /// Caches `ids` for `word` (if it [`fits`](Self::fits)), evicting its set's older way.
    pub fn insert(&self, word: &str, ids: &[u32]) {
        if !Self::fits(word, ids.len()) {
            return;
        }
        let w = word.as_bytes();
        let mut e = EMPTY;
        e.key_len = w.len() as u8;
        e.key[..w.len()].copy_from_slice(w);
        e.n_ids = ids.len() as u8;
        e.ids[..ids.len()].copy_from_slice(ids);
        let (shard, i) = Self::slot(w);
        let mut set = self.shards[shard].lock().unwrap_or_else(|e| e.into_inner());
        set[i + 1] = set[i];
        set[i] = e;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_lowest_rank_first_and_leftmost_on_ties() {
        // bytes 1 2 3 -> merges: (2,3)->11 rank 0, (1,2)->10 rank 1, (1,11)->12 rank 2.
        let mut merges = Merges::default();
        merges.insert(pair(2, 3), (0, 11));
        merges.insert(pair(1, 2), (1, 10));
        merges.insert(pair(1, 11), (2, 12));
        let mut out = Vec::new();
        merge_word(&[1, 2, 3], &merges, &mut out);
        assert_eq!(out, [12]);
        // a a a with (a,a)->b: leftmost pair merges first.
        let mut merges = Merges::default();
        merges.insert(pair(1, 1), (0, 5));
        out.clear();
        merge_word(&[1, 1, 1], &merges, &mut out);
        assert_eq!(out, [5, 1]);
    }

    #[test]
    fn the_word_cache_keeps_two_words_a_set_and_skips_long_ones() {
        let cache = WordCache::default();
        let mut out = Vec::new();
        assert!(!cache.get("word", &mut out));
        cache.insert("word", &[1, 2]);
        cache.insert("other", &[3]);
        assert!(cache.get("word", &mut out) && cache.get("other", &mut out));
        assert_eq!(out, [1, 2, 3]);
        cache.insert("a very long word of more than thirty bytes", &[4]);
        cache.insert("many", &[1; 9]);
        assert!(!cache.get("a very long word of more than thirty bytes", &mut out));
        assert!(!cache.get("many", &mut out));
    }
}
