//! PostgreSQL `PARTITION BY HASH`, bit for bit (ARCHITECTURE.md §2.5), so users
//! can check or re-split placement with native hash partitions.
//!
//! Ported from `src/common/hashfn.c` (Bob Jenkins' lookup3 as Postgres ships it),
//! `hashint8extended` / `hashint4extended` (`access/hash/hashfunc.c`),
//! `uuid_hash_extended`, and `compute_partition_hash_value` + `hash_combine64`
//! (`partitioning/partbounds.c`). Postgres reads words little-endian on x86; we read
//! bytes explicitly little-endian, which equals both its aligned and unaligned paths.

use super::{KeyValue, ShardingError};

/// `HASH_PARTITION_SEED` from Postgres' `partbounds.h`.
pub const HASH_PARTITION_SEED: u64 = 0x7A5B_2236_7996_DCFD;

#[inline(always)]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

#[inline(always)]
fn final_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// Little-endian value of up to 4 bytes (missing high bytes are zero), which is
/// what lookup3's fall-through tail switch adds.
#[inline(always)]
fn le_partial(bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .enumerate()
        .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (8 * i)))
}

/// `hash_bytes_extended`: 64-bit lookup3 with a seed (`hash_any_extended`).
pub fn hash_bytes_extended(k: &[u8], seed: u64) -> u64 {
    // Postgres passes the length as a C int; keys are far below 2^31 bytes.
    let init = 0x9e37_79b9u32
        .wrapping_add(k.len() as u32)
        .wrapping_add(3_923_095);
    let (mut a, mut b, mut c) = (init, init, init);
    if seed != 0 {
        a = a.wrapping_add((seed >> 32) as u32);
        b = b.wrapping_add(seed as u32);
        mix(&mut a, &mut b, &mut c);
    }
    let mut blocks = k.chunks_exact(12);
    for blk in &mut blocks {
        a = a.wrapping_add(le_partial(&blk[0..4]));
        b = b.wrapping_add(le_partial(&blk[4..8]));
        c = c.wrapping_add(le_partial(&blk[8..12]));
        mix(&mut a, &mut b, &mut c);
    }
    let tail = blocks.remainder();
    let (ta, rest) = tail.split_at(tail.len().min(4));
    let (tb, tc) = rest.split_at(rest.len().min(4));
    a = a.wrapping_add(le_partial(ta));
    b = b.wrapping_add(le_partial(tb));
    // The lowest byte of c is reserved for the length: tail bytes 8..11 go above it.
    c = c.wrapping_add(le_partial(tc) << 8);
    final_mix(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

/// `hash_bytes_uint32_extended` (`hash_uint32_extended`).
pub fn hash_uint32_extended(k: u32, seed: u64) -> u64 {
    let init = 0x9e37_79b9u32.wrapping_add(4).wrapping_add(3_923_095);
    let (mut a, mut b, mut c) = (init, init, init);
    if seed != 0 {
        a = a.wrapping_add((seed >> 32) as u32);
        b = b.wrapping_add(seed as u32);
        mix(&mut a, &mut b, &mut c);
    }
    a = a.wrapping_add(k);
    final_mix(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

/// `hashint8extended`: folds the high half into the low half so that int8 values
/// that fit in int4 hash like the int4 (`hashint4extended` = `hash_uint32_extended`).
pub fn hashint8extended(val: i64, seed: u64) -> u64 {
    let mut lohalf = val as u32;
    let hihalf = (val >> 32) as u32;
    lohalf ^= if val >= 0 { hihalf } else { !hihalf };
    hash_uint32_extended(lohalf, seed)
}

/// The type's extended hash support function, as the hash opclass of
/// int2/int4/int8, text, uuid, date (`hashint4extended`) and timestamp picks it.
pub fn pg_hash_extended(key: &KeyValue, seed: u64) -> u64 {
    match key {
        KeyValue::Int(v) | KeyValue::Timestamp(v) => hashint8extended(*v, seed),
        KeyValue::Text(s) => hash_bytes_extended(s.as_bytes(), seed),
        KeyValue::Uuid(b) => hash_bytes_extended(b, seed),
        KeyValue::Date(d) => hash_uint32_extended(*d as u32, seed),
    }
}

/// `hash_combine64` from `common/hashfn.h`.
#[inline]
pub fn hash_combine64(a: u64, b: u64) -> u64 {
    a ^ b
        .wrapping_add(0x49a0_f4dd_15e5_a8e3)
        .wrapping_add(a << 54)
        .wrapping_add(a >> 7)
}

/// The row hash Postgres computes for a single-column hash partition key
/// (`compute_partition_hash_value`).
pub fn partition_hash(key: &KeyValue) -> u64 {
    hash_combine64(0, pg_hash_extended(key, HASH_PARTITION_SEED))
}

/// `kind: hash`: Postgres' hash partitioning with modulus = shard count, so shard
/// `i` holds exactly the rows of `FOR VALUES WITH (MODULUS n, REMAINDER i)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashFunction {
    shard_count: usize,
}

impl HashFunction {
    pub fn new(shard_count: usize) -> Result<HashFunction, ShardingError> {
        if shard_count == 0 {
            return Err(ShardingError::InvalidFunction(
                "hash sharding needs at least one shard".into(),
            ));
        }
        Ok(HashFunction { shard_count })
    }

    pub fn shard_count(&self) -> usize {
        self.shard_count
    }

    /// The partition remainder (= shard index) of `key`. Never fails: every
    /// supported key type has a Postgres hash function.
    pub fn shard_for(&self, key: &KeyValue) -> usize {
        (partition_hash(key) % self.shard_count as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::super::pg_golden as g;
    use super::*;

    const MODULI: [usize; 5] = [2, 3, 4, 5, 8];

    fn check(key: KeyValue, raw: i64, rems: [u64; 5]) {
        assert_eq!(
            pg_hash_extended(&key, HASH_PARTITION_SEED) as i64,
            raw,
            "raw hash of {key}"
        );
        for (m, want) in MODULI.iter().zip(rems) {
            let f = HashFunction::new(*m).unwrap();
            assert_eq!(f.shard_for(&key) as u64, want, "{key} modulus {m}");
        }
    }

    #[test]
    fn matches_postgres_int8() {
        for &(v, raw, rems) in g::INT8 {
            check(KeyValue::Int(v), raw, rems);
        }
    }

    #[test]
    fn matches_postgres_int4_and_int2() {
        for &(v, raw, rems) in g::INT4 {
            check(KeyValue::Int(v.into()), raw, rems);
        }
        for &(v, raw, rems) in g::INT2 {
            check(KeyValue::Int(v.into()), raw, rems);
        }
    }

    #[test]
    fn matches_postgres_text() {
        assert!(g::TEXT.len() > 50);
        for &(v, raw, rems) in g::TEXT {
            check(KeyValue::Text(v.to_string()), raw, rems);
        }
    }

    #[test]
    fn matches_postgres_uuid() {
        for &(v, raw, rems) in g::UUID {
            let key = KeyValue::parse_as(super::super::KeyType::Uuid, v).unwrap();
            check(key, raw, rems);
        }
    }

    #[test]
    fn matches_postgres_date_and_timestamp() {
        for &(_, days, raw, rems) in g::DATE {
            check(KeyValue::Date(days), raw, rems);
        }
        for &(_, us, raw, rems) in g::TIMESTAMP {
            check(KeyValue::Timestamp(us), raw, rems);
        }
    }

    #[test]
    fn unseeded_values_from_postgres() {
        // SELECT hashint8extended(0, 0), hashint8extended(0, 8816678312871386365) on Postgres 15.
        assert_eq!(hashint8extended(0, 0) as i64, 4154612158245552303);
        assert_eq!(
            hashint8extended(0, HASH_PARTITION_SEED) as i64,
            -4403592609991167795
        );
    }

    #[test]
    fn zero_shards_is_an_error() {
        assert!(HashFunction::new(0).is_err());
    }
}
