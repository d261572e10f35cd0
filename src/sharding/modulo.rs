//! `kind: modulo`: integer key mod shard count.

use super::{KeyType, KeyValue, ShardingError};

/// Integer key modulo shard count.
///
/// Negative keys use the Euclidean remainder (`rem_euclid`): `-1` with 4 shards
/// goes to shard 3, so every key lands on a valid shard and consecutive keys
/// rotate through the shards on both sides of zero. (SQL's `%` would give -1.)
/// Only integer keys are accepted; text and other types are errors because a
/// silent conversion would hide a misconfigured map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuloFunction {
    shard_count: usize,
}

impl ModuloFunction {
    pub fn new(shard_count: usize) -> Result<ModuloFunction, ShardingError> {
        if shard_count == 0 {
            return Err(ShardingError::InvalidFunction(
                "modulo sharding needs at least one shard".into(),
            ));
        }
        Ok(ModuloFunction { shard_count })
    }

    pub fn shard_count(&self) -> usize {
        self.shard_count
    }

    pub fn shard_for(&self, key: &KeyValue) -> Result<usize, ShardingError> {
        match key {
            // shard_count fits in i64 on every supported platform (it is a Vec length).
            KeyValue::Int(v) => Ok(v.rem_euclid(self.shard_count as i64) as usize),
            other => Err(ShardingError::KeyTypeMismatch {
                function: "modulo",
                value: other.shown(),
                found: other.key_type().name(),
                expected: KeyType::Int.name(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn euclidean_for_negative_keys() {
        let f = ModuloFunction::new(4).unwrap();
        let got: Vec<usize> = (-5..=5)
            .map(|k| f.shard_for(&KeyValue::Int(k)).unwrap())
            .collect();
        assert_eq!(got, vec![3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1]);
        assert_eq!(f.shard_for(&KeyValue::Int(i64::MIN)), Ok(0));
        assert_eq!(f.shard_for(&KeyValue::Int(i64::MAX)), Ok(3));
    }

    #[test]
    fn text_is_an_error_naming_the_value() {
        let f = ModuloFunction::new(4).unwrap();
        let err = f
            .shard_for(&KeyValue::Text("abc".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("'abc'") && err.contains("modulo"), "{err}");
        assert!(ModuloFunction::new(0).is_err());
    }
}
