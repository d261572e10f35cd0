//! `kind: list`: explicit value → shard map with an optional default shard.

use std::collections::HashMap;

use super::{KeyType, KeyValue, ShardingError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListFunction {
    key_type: KeyType,
    map: HashMap<KeyValue, usize>,
    default: Option<usize>,
    shard_count: usize,
}

impl ListFunction {
    /// Validates one key type across values, no duplicate values, and shard
    /// indexes `< shard_count`.
    pub fn new(
        values: Vec<(KeyValue, usize)>,
        default: Option<usize>,
        shard_count: usize,
    ) -> Result<ListFunction, ShardingError> {
        let cfg = ShardingError::InvalidFunction;
        if values.is_empty() && default.is_none() {
            return Err(cfg(
                "list sharding needs at least one value or a default shard".into(),
            ));
        }
        if let Some(d) = default.filter(|d| *d >= shard_count) {
            return Err(cfg(format!(
                "list default shard index {d} is out of range (the map has {shard_count} shards)"
            )));
        }
        let key_type = values.first().map_or(KeyType::Text, |(v, _)| v.key_type());
        let mut map = HashMap::with_capacity(values.len());
        for (value, shard) in values {
            if shard >= shard_count {
                return Err(cfg(format!(
                    "list value {value}: shard index {shard} is out of range (the map has {shard_count} shards)"
                )));
            }
            if value.key_type() != key_type {
                return Err(cfg(format!(
                    "list value {value} is a {}, but the first value is a {key_type}",
                    value.key_type()
                )));
            }
            if let Some(prev) = map.get(&value) {
                return Err(cfg(format!(
                    "list value {value} appears twice (shards {prev} and {shard})"
                )));
            }
            map.insert(value, shard);
        }
        Ok(ListFunction {
            key_type,
            map,
            default,
            shard_count,
        })
    }

    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    pub fn default_shard(&self) -> Option<usize> {
        self.default
    }

    pub fn shard_count(&self) -> usize {
        self.shard_count
    }

    /// The shard listed for `key`, else the default. A text key is parsed as the
    /// list's type first (SQL literals arrive as text).
    pub fn shard_for(&self, key: &KeyValue) -> Result<usize, ShardingError> {
        let key = match key.coerce(self.key_type, "list") {
            Ok(k) => k,
            // A value of another type cannot be listed: it falls to the default.
            Err(e) => return self.default.ok_or(e),
        };
        match self.map.get(&*key).copied().or(self.default) {
            Some(s) => Ok(s),
            None => Err(ShardingError::NoListEntry(key.shown())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> KeyValue {
        KeyValue::Text(s.into())
    }

    #[test]
    fn lookup_default_and_errors() {
        let f = ListFunction::new(vec![(t("eu"), 0), (t("us"), 1)], Some(0), 2).unwrap();
        assert_eq!(f.shard_for(&t("us")), Ok(1));
        assert_eq!(f.shard_for(&t("apac")), Ok(0));
        let strict = ListFunction::new(vec![(t("eu"), 0), (t("us"), 1)], None, 2).unwrap();
        let err = strict.shard_for(&t("apac")).unwrap_err().to_string();
        assert!(err.contains("'apac'"), "{err}");
    }

    #[test]
    fn integer_lists_accept_text_literals() {
        let f =
            ListFunction::new(vec![(KeyValue::Int(1), 1), (KeyValue::Int(2), 0)], None, 2).unwrap();
        assert_eq!(f.shard_for(&t("1")), Ok(1));
        assert!(f.shard_for(&KeyValue::Int(3)).is_err());
        assert!(f.shard_for(&t("x")).is_err());
    }

    #[test]
    fn validation() {
        assert!(ListFunction::new(vec![(t("a"), 0), (t("a"), 1)], None, 2).is_err());
        assert!(ListFunction::new(vec![(t("a"), 2)], None, 2).is_err());
        assert!(ListFunction::new(vec![(t("a"), 0)], Some(5), 2).is_err());
        assert!(ListFunction::new(vec![(t("a"), 0), (KeyValue::Int(1), 0)], None, 2).is_err());
        assert!(ListFunction::new(vec![], None, 2).is_err());
    }
}
