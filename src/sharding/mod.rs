//! Sharding functions: which shard a key value belongs to. Pure code, no I/O.
//!
//! - [`HashFunction`]: PostgreSQL `PARTITION BY HASH`, bit for bit.
//! - [`ModuloFunction`]: integer key mod shard count.
//! - [`ConsistentHashRing`]: virtual-node ring with a stable hash.
//! - [`RangeFunction`]: half-open ranges.
//! - [`ListFunction`]: explicit values with an optional default.
//!
//! [`ShardingFunction`] is the common interface the config and the router use;
//! keys are [`KeyValue`]s decoded from SQL literals or protocol parameters.

use std::ops::Bound;

mod key;
mod list;
mod modulo;
mod pg_hash;
mod range;
mod ring;

#[cfg(test)]
mod pg_golden;

pub use key::{oid, CoercedKey, KeyType, KeyValue};
pub use list::ListFunction;
pub use modulo::ModuloFunction;
pub use pg_hash::{
    hash_bytes_extended, hash_combine64, hash_uint32_extended, hashint8extended, partition_hash,
    pg_hash_extended, HashFunction, HASH_PARTITION_SEED,
};
pub use range::{RangeFunction, RangeSpec};
pub use ring::{
    ring_encoding, ring_hash, ConsistentHashRing, RingBytes, ShardName, StableHasher,
    StableRingHash, DEFAULT_VNODES, MAX_VNODES,
};

/// Errors from decoding keys, building functions, and looking keys up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardingError {
    /// A key's text or bytes are not a valid value of the expected type.
    #[error("invalid {expected} value \"{value}\": {reason}")]
    InvalidValue {
        value: String,
        expected: &'static str,
        reason: String,
    },
    /// The key's Postgres type cannot be a sharding key.
    #[error("unsupported sharding key type: {0}")]
    UnsupportedType(String),
    /// The key's type does not fit the function (e.g. text for modulo).
    #[error(
        "{function} sharding cannot place the {found} value {value}: it needs a {expected} key"
    )]
    KeyTypeMismatch {
        function: &'static str,
        value: String,
        found: &'static str,
        expected: &'static str,
    },
    /// The key lies outside every configured range.
    #[error("no range contains the sharding key {value} (the ranges cover {covered})")]
    NoRange { value: String, covered: String },
    /// The key is not listed and the list has no default shard.
    #[error("the sharding key {0} is not in the list and the list has no default shard")]
    NoListEntry(String),
    /// The function's definition is invalid (from the shard map).
    #[error("invalid sharding function: {0}")]
    InvalidFunction(String),
}

/// A configured sharding function. `shard_for` returns an index into the shard
/// map's shard list.
#[derive(Debug, Clone)]
pub enum ShardingFunction {
    Hash(HashFunction),
    Modulo(ModuloFunction),
    ConsistentHash(ConsistentHashRing),
    Range(RangeFunction),
    List(ListFunction),
}

impl ShardingFunction {
    /// `kind: hash` over `shard_count` shards (modulus = shard count).
    pub fn hash(shard_count: usize) -> Result<Self, ShardingError> {
        HashFunction::new(shard_count).map(Self::Hash)
    }

    /// `kind: modulo` over `shard_count` shards.
    pub fn modulo(shard_count: usize) -> Result<Self, ShardingError> {
        ModuloFunction::new(shard_count).map(Self::Modulo)
    }

    /// `kind: consistent_hash` over the named shards (index = position in the list).
    pub fn consistent_hash<S: AsRef<str>>(
        shard_names: &[S],
        vnodes: usize,
    ) -> Result<Self, ShardingError> {
        ConsistentHashRing::new(shard_names, vnodes).map(Self::ConsistentHash)
    }

    /// `kind: range`; shard indexes must be `< shard_count`.
    pub fn range(ranges: Vec<RangeSpec>, shard_count: usize) -> Result<Self, ShardingError> {
        RangeFunction::new(ranges, shard_count).map(Self::Range)
    }

    /// `kind: list`; shard indexes must be `< shard_count`.
    pub fn list(
        values: Vec<(KeyValue, usize)>,
        default: Option<usize>,
        shard_count: usize,
    ) -> Result<Self, ShardingError> {
        ListFunction::new(values, default, shard_count).map(Self::List)
    }

    /// The shard index for `key`. Does not allocate for integer and uuid keys
    /// (except when building an error).
    pub fn shard_for(&self, key: &KeyValue) -> Result<usize, ShardingError> {
        match self {
            Self::Hash(f) => Ok(f.shard_for(key)),
            Self::Modulo(f) => f.shard_for(key),
            Self::ConsistentHash(f) => Ok(f.shard_for(key)),
            Self::Range(f) => f.shard_for(key),
            Self::List(f) => f.shard_for(key),
        }
    }

    /// As [`Self::shard_for`], after reading `key` as the key column's type.
    /// Hashing is type-sensitive: the literal `'42'` must hash as the integer 42
    /// for an integer column, never as the text "42".
    pub fn shard_for_as(&self, key: &KeyValue, kind: KeyType) -> Result<usize, ShardingError> {
        let key = key.coerce(kind, self.kind())?;
        self.shard_for(&key)
    }

    /// Number of shards the function distributes over.
    pub fn shard_count(&self) -> usize {
        match self {
            Self::Hash(f) => f.shard_count(),
            Self::Modulo(f) => f.shard_count(),
            Self::ConsistentHash(f) => f.shard_count(),
            Self::Range(f) => f.shard_count(),
            Self::List(f) => f.shard_count(),
        }
    }

    /// The `kind:` name used in the shard map.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hash(_) => "hash",
            Self::Modulo(_) => "modulo",
            Self::ConsistentHash(_) => "consistent_hash",
            Self::Range(_) => "range",
            Self::List(_) => "list",
        }
    }

    /// Shards that may hold keys in `lower .. upper` (a range predicate).
    /// Only range functions can prune; the others return every shard.
    pub fn shards_for_interval(
        &self,
        lower: Bound<&KeyValue>,
        upper: Bound<&KeyValue>,
    ) -> Vec<usize> {
        match self {
            Self::Range(f) => f.shards_for_interval(lower, upper),
            other => (0..other.shard_count()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_for_as_reads_text_literals_as_the_column_type() {
        let f = ShardingFunction::hash(4).unwrap();
        let as_int = f.shard_for_as(&KeyValue::Text("42".into()), KeyType::Int);
        assert_eq!(as_int, f.shard_for(&KeyValue::Int(42)));
        // Postgres puts int 42 in remainder 2 of modulus 4 (pg_golden.rs).
        assert_eq!(as_int, Ok(2));
        assert!(f
            .shard_for_as(&KeyValue::Text("x".into()), KeyType::Int)
            .is_err());
        let err = f
            .shard_for_as(&KeyValue::Int(1), KeyType::Uuid)
            .unwrap_err()
            .to_string();
        assert!(err.contains("hash") && err.contains("uuid"), "{err}");
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn any_key() -> impl Strategy<Value = KeyValue> {
        prop_oneof![
            any::<i64>().prop_map(KeyValue::Int),
            ".{0,40}".prop_map(KeyValue::Text),
            any::<[u8; 16]>().prop_map(KeyValue::Uuid),
            any::<i32>().prop_map(KeyValue::Date),
            any::<i64>().prop_map(KeyValue::Timestamp),
        ]
    }

    fn any_kind() -> impl Strategy<Value = KeyType> {
        prop_oneof![
            Just(KeyType::Int),
            Just(KeyType::Text),
            Just(KeyType::Uuid),
            Just(KeyType::Date),
            Just(KeyType::Timestamp),
        ]
    }

    proptest! {
        #[test]
        fn int_widths_hash_equally(v in any::<i16>()) {
            // int2, int4, int8 of equal value: one KeyValue, and the int4 path of
            // Postgres (hash_uint32_extended of the value) agrees with the int8 fold.
            let h8 = hashint8extended(i64::from(v), HASH_PARTITION_SEED);
            prop_assert_eq!(h8, hash_uint32_extended(i32::from(v) as u32, HASH_PARTITION_SEED));
            let from2 = KeyValue::from_binary(oid::INT2, &v.to_be_bytes()).unwrap();
            let from4 = KeyValue::from_binary(oid::INT4, &i32::from(v).to_be_bytes()).unwrap();
            let from8 = KeyValue::from_binary(oid::INT8, &i64::from(v).to_be_bytes()).unwrap();
            prop_assert_eq!(partition_hash(&from2), partition_hash(&from4));
            prop_assert_eq!(partition_hash(&from4), partition_hash(&from8));
        }

        #[test]
        fn int4_range_hashes_like_hashint4(v in any::<i32>()) {
            prop_assert_eq!(
                hashint8extended(i64::from(v), HASH_PARTITION_SEED),
                hash_uint32_extended(v as u32, HASH_PARTITION_SEED)
            );
        }

        #[test]
        fn shard_index_below_count(key in any_key(), n in 1usize..64) {
            let names: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
            let fns = [
                ShardingFunction::hash(n).unwrap(),
                ShardingFunction::modulo(n).unwrap(),
                ShardingFunction::consistent_hash(&names, 8).unwrap(),
            ];
            for f in &fns {
                if let Ok(s) = f.shard_for(&key) {
                    prop_assert!(s < n, "{} gave {} of {}", f.kind(), s, n);
                }
            }
        }

        #[test]
        fn range_and_list_never_panic(
            bounds in proptest::collection::vec(any::<i64>(), 0..8),
            opens in any::<(bool, bool)>(),
            list in proptest::collection::vec((any_key(), 0usize..6), 0..8),
            default in proptest::option::of(0usize..6),
            key in any_key(),
            lo in proptest::option::of(any_key()),
            hi in proptest::option::of(any_key()),
        ) {
            let mut sorted = bounds.clone();
            sorted.sort_unstable();
            sorted.dedup();
            for bs in [bounds, sorted] {
                let mut specs: Vec<RangeSpec> = bs
                    .windows(2)
                    .enumerate()
                    .map(|(i, w)| RangeSpec {
                        from: Some(KeyValue::Int(w[0])),
                        to: Some(KeyValue::Int(w[1])),
                        shard: i % 5,
                    })
                    .collect();
                if let (Some(first), true) = (specs.first_mut(), opens.0) {
                    first.from = None;
                }
                if let (Some(last), true) = (specs.last_mut(), opens.1) {
                    last.to = None;
                }
                if let Ok(f) = ShardingFunction::range(specs, 4) {
                    if let Ok(s) = f.shard_for(&key) {
                        prop_assert!(s < 4);
                    }
                    fn b(v: &Option<KeyValue>) -> Bound<&KeyValue> {
                        v.as_ref().map_or(Bound::Unbounded, Bound::Included)
                    }
                    for s in f.shards_for_interval(b(&lo), b(&hi)) {
                        prop_assert!(s < 4);
                    }
                }
            }
            if let Ok(f) = ShardingFunction::list(list, default, 5) {
                if let Ok(s) = f.shard_for(&key) {
                    prop_assert!(s < 5);
                }
            }
        }

        #[test]
        fn range_lookup_agrees_with_interval(points in proptest::collection::btree_set(-1000i64..1000, 2..8), k in -1100i64..1100) {
            let pts: Vec<i64> = points.into_iter().collect();
            let specs: Vec<RangeSpec> = pts
                .windows(2)
                .enumerate()
                .map(|(i, w)| RangeSpec { from: Some(KeyValue::Int(w[0])), to: Some(KeyValue::Int(w[1])), shard: i })
                .collect();
            let f = ShardingFunction::range(specs, pts.len()).unwrap();
            let key = KeyValue::Int(k);
            let point = f.shards_for_interval(Bound::Included(&key), Bound::Included(&key));
            match f.shard_for(&key) {
                Ok(s) => prop_assert_eq!(point, vec![s]),
                Err(_) => prop_assert!(point.is_empty()),
            }
        }

        #[test]
        fn parse_never_panics(kind in any_kind(), s in "\\PC{0,40}") {
            let _ = KeyValue::parse_as(kind, &s);
            for o in [oid::INT2, oid::INT4, oid::INT8, oid::TEXT, oid::UUID, oid::DATE, oid::TIMESTAMP, oid::TIMESTAMPTZ, oid::BPCHAR] {
                let _ = KeyValue::from_text(o, s.as_bytes());
                let _ = KeyValue::from_binary(o, s.as_bytes());
            }
        }

        #[test]
        fn datetime_like_strings_never_panic(s in "[0-9]{1,8}-[0-9]{1,3}-[0-9]{1,3}([ T][0-9]{1,3}:[0-9]{1,3}(:[0-9]{1,3}(\\.[0-9]{0,9})?)?)?( ?[+-Z][0-9:]{0,6})?( BC| AD)?") {
            let _ = KeyValue::parse_as(KeyType::Date, &s);
            let _ = KeyValue::parse_as(KeyType::Timestamp, &s);
            let _ = KeyValue::from_text(oid::TIMESTAMPTZ, s.as_bytes());
        }

        #[test]
        fn parsed_values_display_and_reparse(kind in any_kind(), key in any_key()) {
            // Whatever parses, prints back to something that parses to the same value.
            if key.key_type() == kind && !matches!(key, KeyValue::Text(_)) {
                let shown = key.to_string();
                if let Ok(again) = KeyValue::parse_as(kind, &shown) {
                    prop_assert_eq!(again, key);
                }
            }
        }
    }
}
