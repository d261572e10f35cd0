//! `kind: consistent_hash`: a virtual-node hash ring with a hash that is stable
//! forever (ARCHITECTURE.md §2.6).
//!
//! The `consistent_hash` crate's `DefaultHash` goes through `std::hash::Hash`
//! (native endianness, `usize` width, a `0xff` string terminator), so placement
//! could change with the platform or the standard library. We plug our own
//! [`StableRingHash`] into the crate's `RingHash` trait, and feed it only values
//! whose `Hash` impl writes an explicit byte encoding ([`RingBytes`], [`ShardName`]).
//!
//! Lookups do not go through `StaticHashRing::calc_candidates`: its candidate
//! iterator records seen nodes in a `SplaySet`, which allocates on every lookup
//! (measured with a counting allocator in
//! `tests/sharding_pg_hash.rs::crate_ring_lookup_allocates`: 1000 allocations
//! for 1000 lookups), and `shard_for` must not allocate for integer or uuid
//! keys. [`ConsistentHashRing`] therefore keeps the same ring, built with the same
//! `RingHash`, in a sorted `Vec` and binary-searches it; a test checks that it
//! picks the same node as the crate's ring for every key.

use std::hash::{Hash, Hasher};

use super::{KeyValue, ShardingError};

/// Default number of virtual nodes per shard.
pub const DEFAULT_VNODES: usize = 256;
/// Upper bound on vnodes per shard, so a typo cannot build a gigabyte ring.
pub const MAX_VNODES: usize = 65_536;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 over the written bytes, finished with MurmurHash3's `fmix64` so
/// that short keys spread over the whole ring. Fully specified, so it is stable
/// across platforms and Rust versions. Integer writes are encoded big-endian at
/// their declared width, never native-endian or `usize`-wide.
#[derive(Debug, Clone)]
pub struct StableHasher {
    state: u64,
}

impl StableHasher {
    pub fn new() -> StableHasher {
        StableHasher { state: FNV_OFFSET }
    }
}

impl Default for StableHasher {
    fn default() -> Self {
        Self::new()
    }
}

/// MurmurHash3's 64-bit finalizer.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

impl Hasher for StableHasher {
    fn finish(&self) -> u64 {
        fmix64(self.state)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.state ^= u64::from(b);
            self.state = self.state.wrapping_mul(FNV_PRIME);
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.write(&[i]);
    }
    fn write_u16(&mut self, i: u16) {
        self.write(&i.to_be_bytes());
    }
    fn write_u32(&mut self, i: u32) {
        self.write(&i.to_be_bytes());
    }
    fn write_u64(&mut self, i: u64) {
        self.write(&i.to_be_bytes());
    }
    fn write_u128(&mut self, i: u128) {
        self.write(&i.to_be_bytes());
    }
    fn write_usize(&mut self, i: usize) {
        self.write(&(i as u64).to_be_bytes());
    }
    fn write_i8(&mut self, i: i8) {
        self.write_u8(i as u8);
    }
    fn write_i16(&mut self, i: i16) {
        self.write_u16(i as u16);
    }
    fn write_i32(&mut self, i: i32) {
        self.write_u32(i as u32);
    }
    fn write_i64(&mut self, i: i64) {
        self.write_u64(i as u64);
    }
    fn write_i128(&mut self, i: i128) {
        self.write_u128(i as u128);
    }
    fn write_isize(&mut self, i: isize) {
        self.write_u64(i as u64);
    }
}

/// Explicitly encoded bytes: its `Hash` writes exactly these bytes, nothing else.
#[derive(Debug, Clone, Copy)]
pub struct RingBytes<'a>(pub &'a [u8]);

impl Hash for RingBytes<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0);
    }
}

/// A shard name as a ring node: hashes its UTF-8 bytes only (no terminator).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ShardName(pub String);

impl Hash for ShardName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0.as_bytes());
    }
}

/// The ring's hash: [`StableHasher`] over explicit encodings. A vnode is the
/// shard name's bytes followed by its sequence number as 4 big-endian bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct StableRingHash;

impl consistent_hash::RingHash for StableRingHash {
    fn hash_item<T: Hash>(&self, item: &T) -> u64 {
        let mut h = StableHasher::new();
        item.hash(&mut h);
        h.finish()
    }

    fn hash_vnode<K: Hash>(&self, node_key: &K, vnode_seq: usize) -> u64 {
        let mut h = StableHasher::new();
        node_key.hash(&mut h);
        // vnode_seq < MAX_VNODES, checked when the ring is built.
        h.write(&(vnode_seq as u32).to_be_bytes());
        h.finish()
    }
}

/// The ring encoding of a key: integers and timestamps as 8 big-endian bytes,
/// dates as 4, uuids as their 16 bytes, text as UTF-8. Borrowed or on the stack.
pub fn ring_encoding<'a>(key: &'a KeyValue, buf: &'a mut [u8; 16]) -> &'a [u8] {
    match key {
        KeyValue::Int(v) | KeyValue::Timestamp(v) => {
            buf[..8].copy_from_slice(&v.to_be_bytes());
            &buf[..8]
        }
        KeyValue::Date(d) => {
            buf[..4].copy_from_slice(&d.to_be_bytes());
            &buf[..4]
        }
        KeyValue::Uuid(u) => u,
        KeyValue::Text(s) => s.as_bytes(),
    }
}

/// The ring position of a key.
pub fn ring_hash(key: &KeyValue) -> u64 {
    use consistent_hash::RingHash;
    let mut buf = [0u8; 16];
    StableRingHash.hash_item(&RingBytes(ring_encoding(key, &mut buf)))
}

/// A consistent-hash ring over named shards, `vnodes` points per shard.
#[derive(Debug, Clone)]
pub struct ConsistentHashRing {
    names: Vec<String>,
    vnodes: usize,
    /// (ring position, shard index), sorted by position then shard name, exactly
    /// as `consistent_hash::StaticHashRing` orders its virtual nodes.
    points: Vec<(u64, u32)>,
}

impl ConsistentHashRing {
    /// Builds the ring. Shard indexes are positions in `shard_names`; placement
    /// depends only on the names and `vnodes`, not on their order.
    pub fn new<S: AsRef<str>>(
        shard_names: &[S],
        vnodes: usize,
    ) -> Result<ConsistentHashRing, ShardingError> {
        use consistent_hash::RingHash;
        if shard_names.is_empty() {
            return Err(ShardingError::InvalidFunction(
                "consistent_hash sharding needs at least one shard".into(),
            ));
        }
        if vnodes == 0 || vnodes > MAX_VNODES {
            return Err(ShardingError::InvalidFunction(format!(
                "consistent_hash vnodes must be between 1 and {MAX_VNODES}, got {vnodes}"
            )));
        }
        if shard_names.len() > u32::MAX as usize {
            return Err(ShardingError::InvalidFunction("too many shards".into()));
        }
        let names: Vec<String> = shard_names.iter().map(|s| s.as_ref().to_string()).collect();
        for (i, n) in names.iter().enumerate() {
            if names[..i].contains(n) {
                return Err(ShardingError::InvalidFunction(format!(
                    "consistent_hash: shard name {n:?} appears twice"
                )));
            }
        }
        let mut points = Vec::with_capacity(names.len() * vnodes);
        for (idx, name) in names.iter().enumerate() {
            let node = ShardName(name.clone());
            for seq in 0..vnodes {
                points.push((StableRingHash.hash_vnode(&node, seq), idx as u32));
            }
        }
        points.sort_by(|x, y| {
            x.0.cmp(&y.0)
                .then_with(|| names[x.1 as usize].cmp(&names[y.1 as usize]))
        });
        Ok(ConsistentHashRing {
            names,
            vnodes,
            points,
        })
    }

    pub fn shard_names(&self) -> &[String] {
        &self.names
    }

    pub fn shard_count(&self) -> usize {
        self.names.len()
    }

    pub fn vnodes(&self) -> usize {
        self.vnodes
    }

    /// The shard owning the first virtual node at or clockwise after the key's
    /// position (wrapping). No allocation.
    pub fn shard_for(&self, key: &KeyValue) -> usize {
        self.shard_for_hash(ring_hash(key))
    }

    /// As [`Self::shard_for`], for a precomputed ring position.
    pub fn shard_for_hash(&self, h: u64) -> usize {
        let i = self.points.partition_point(|&(p, _)| p < h);
        let (_, shard) = self
            .points
            .get(i)
            .or(self.points.first())
            .copied()
            .unwrap_or((0, 0));
        shard as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use consistent_hash::{Node, StaticHashRing};

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("s{i}")).collect()
    }

    fn golden_keys() -> Vec<KeyValue> {
        let mut keys: Vec<KeyValue> = (0..20).map(KeyValue::Int).collect();
        keys.extend([-1, -42, i64::MIN, i64::MAX, 1 << 40].map(KeyValue::Int));
        keys.extend(
            [
                "",
                "a",
                "alice",
                "bob",
                "eu",
                "us",
                "日本",
                "user_42",
                "x".repeat(40).as_str(),
            ]
            .map(|s| KeyValue::Text(s.to_string())),
        );
        keys.extend((0u8..8).map(|i| KeyValue::Uuid([i.wrapping_mul(37); 16])));
        keys.extend([0, 9497, -1, 100_000].map(KeyValue::Date));
        keys.extend([0, 820_584_000_000_000, -1, 1].map(KeyValue::Timestamp));
        keys
    }

    /// Frozen placement: 4 shards s0..s3, 256 vnodes. The two raw hashes were
    /// cross-checked with an independent Python FNV-1a + fmix64. If this changes, every
    /// deployed consistent_hash map would silently move data: don't "fix" it.
    #[test]
    fn golden_placement_is_frozen() {
        let ring = ConsistentHashRing::new(&names(4), DEFAULT_VNODES).unwrap();
        let keys = golden_keys();
        assert_eq!(keys.len(), 50);
        let got: Vec<usize> = keys.iter().map(|k| ring.shard_for(k)).collect();
        assert_eq!(got, GOLDEN_4X256.to_vec());
        // The raw hash is frozen too.
        assert_eq!(ring_hash(&KeyValue::Int(0)), GOLDEN_HASH_INT0);
        assert_eq!(
            ring_hash(&KeyValue::Text("alice".into())),
            GOLDEN_HASH_ALICE
        );
    }

    const GOLDEN_4X256: [usize; 50] = [
        3, 2, 3, 2, 1, 0, 1, 2, 1, 3, 2, 1, 1, 2, 0, 3, 3, 0, 1, 1, 3, 1, 1, 0, 3, 2, 3, 1, 0, 2,
        3, 1, 0, 1, 1, 1, 1, 3, 3, 2, 1, 2, 3, 2, 0, 3, 3, 1, 3, 2,
    ];
    const GOLDEN_HASH_INT0: u64 = 8_922_497_616_986_557_598;
    const GOLDEN_HASH_ALICE: u64 = 3_821_251_815_001_557_236;

    #[test]
    fn same_placement_as_the_crates_ring() {
        let shard_names = names(5);
        let ring = ConsistentHashRing::new(&shard_names, 64).unwrap();
        let crate_ring = StaticHashRing::new(
            StableRingHash,
            shard_names
                .iter()
                .enumerate()
                .map(|(i, n)| Node::new(ShardName(n.clone())).value(i).quantity(64)),
        );
        for k in 0..10_000i64 {
            let mut buf = [0u8; 16];
            let key = KeyValue::Int(k * 7919 - 5000);
            let want = crate_ring
                .calc_candidates(&RingBytes(ring_encoding(&key, &mut buf)))
                .next()
                .map(|n| n.value);
            assert_eq!(Some(ring.shard_for(&key)), want, "key {key}");
        }
    }

    #[test]
    fn adding_a_fifth_shard_moves_about_a_fifth_only_onto_it() {
        let four = ConsistentHashRing::new(&names(4), DEFAULT_VNODES).unwrap();
        let five = ConsistentHashRing::new(&names(5), DEFAULT_VNODES).unwrap();
        let n = 100_000;
        let mut moved = 0;
        for k in 0..n {
            let key = KeyValue::Int(k);
            let (a, b) = (four.shard_for(&key), five.shard_for(&key));
            if a != b {
                assert_eq!(
                    b, 4,
                    "key {k} moved from s{a} to s{b}, not to the new shard"
                );
                moved += 1;
            }
        }
        let frac = moved as f64 / n as f64;
        assert!((0.15..=0.25).contains(&frac), "moved {frac}");
    }

    #[test]
    fn order_of_names_does_not_matter_and_bad_input_is_refused() {
        let a = ConsistentHashRing::new(&["a", "b", "c"], 32).unwrap();
        let b = ConsistentHashRing::new(&["c", "a", "b"], 32).unwrap();
        for k in 0..1000 {
            let key = KeyValue::Int(k);
            assert_eq!(
                a.shard_names()[a.shard_for(&key)],
                b.shard_names()[b.shard_for(&key)]
            );
        }
        assert!(ConsistentHashRing::new(&["a", "a"], 32).is_err());
        assert!(ConsistentHashRing::new::<&str>(&[], 32).is_err());
        assert!(ConsistentHashRing::new(&["a"], 0).is_err());
    }

    #[test]
    fn hasher_is_fnv1a_then_fmix64() {
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c (published test vector).
        let mut h = StableHasher::new();
        h.write(b"a");
        assert_eq!(h.state, 0xaf63_dc4c_8601_ec8c);
        assert_eq!(h.finish(), fmix64(0xaf63_dc4c_8601_ec8c));
    }
}
