//! `kind: range`: half-open ranges `[from, to)` mapped to shards.

use std::fmt;
use std::ops::Bound;

use super::{KeyType, KeyValue, ShardingError};

/// One range of a range function: keys `from <= key < to` go to `shard`.
/// `None` is an open end (only allowed on the first `from` and the last `to`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSpec {
    pub from: Option<KeyValue>,
    pub to: Option<KeyValue>,
    pub shard: usize,
}

impl fmt::Display for RangeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.from {
            Some(v) => write!(f, "[{v}, ")?,
            None => f.write_str("(unbounded, ")?,
        }
        match &self.to {
            Some(v) => write!(f, "{v})")?,
            None => f.write_str("unbounded)")?,
        }
        write!(f, " -> shard {}", self.shard)
    }
}

/// Sorted, contiguous ranges. Ordering is the key type's: numeric for integers,
/// chronological for dates and timestamps, bytewise (C collation) for text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeFunction {
    key_type: KeyType,
    ranges: Vec<RangeSpec>,
    shard_count: usize,
}

impl RangeFunction {
    /// Validates that the ranges are non-empty, of one supported key type, sorted,
    /// without overlap or gap, and point at shards `< shard_count`.
    pub fn new(ranges: Vec<RangeSpec>, shard_count: usize) -> Result<RangeFunction, ShardingError> {
        let cfg = |msg: String| ShardingError::InvalidFunction(msg);
        let first = ranges
            .first()
            .ok_or_else(|| cfg("range sharding needs at least one range".into()))?;
        let key_type = first
            .from
            .as_ref()
            .or(first.to.as_ref())
            .map(KeyValue::key_type)
            .unwrap_or(KeyType::Int);
        if key_type == KeyType::Uuid {
            return Err(cfg(
                "range sharding supports integer, text, date and timestamp keys, not uuid".into(),
            ));
        }
        let last = ranges.len() - 1;
        for (i, r) in ranges.iter().enumerate() {
            let n = i + 1;
            if r.shard >= shard_count {
                return Err(cfg(format!(
                    "range #{n} {r}: shard index {} is out of range (the map has {shard_count} shards)",
                    r.shard
                )));
            }
            for v in r.from.iter().chain(r.to.iter()) {
                if v.key_type() != key_type {
                    return Err(cfg(format!(
                        "range #{n} {r}: bound {v} is a {}, but the ranges are of type {key_type}",
                        v.key_type()
                    )));
                }
            }
            if r.from.is_none() && i != 0 {
                return Err(cfg(format!(
                    "range #{n} {r}: only the first range may have an open start"
                )));
            }
            if r.to.is_none() && i != last {
                return Err(cfg(format!(
                    "range #{n} {r}: only the last range may have an open end"
                )));
            }
            if let (Some(f), Some(t)) = (&r.from, &r.to) {
                if f >= t {
                    return Err(cfg(format!("range #{n} {r} is empty: from must be < to")));
                }
            }
        }
        for (i, pair) in ranges.windows(2).enumerate() {
            let (a, b) = (&pair[0], &pair[1]);
            let (na, nb) = (i + 1, i + 2);
            // Both exist: `a.to` is Some unless a is last, `b.from` unless b is first.
            if let (Some(a_to), Some(b_from)) = (&a.to, &b.from) {
                if b_from < a.from.as_ref().unwrap_or(b_from) {
                    return Err(cfg(format!(
                        "ranges #{na} {a} and #{nb} {b} are not sorted by their start"
                    )));
                }
                if b_from < a_to {
                    return Err(cfg(format!(
                        "ranges #{na} {a} and #{nb} {b} overlap on [{b_from}, {a_to})"
                    )));
                }
                if b_from > a_to {
                    return Err(cfg(format!(
                        "ranges #{na} {a} and #{nb} {b} leave a gap: keys in [{a_to}, {b_from}) have no shard"
                    )));
                }
            }
        }
        Ok(RangeFunction {
            key_type,
            ranges,
            shard_count,
        })
    }

    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    pub fn ranges(&self) -> &[RangeSpec] {
        &self.ranges
    }

    pub fn shard_count(&self) -> usize {
        self.shard_count
    }

    /// The shard of the range containing `key`. A text key is parsed as the
    /// ranges' type first (SQL literals arrive as text).
    pub fn shard_for(&self, key: &KeyValue) -> Result<usize, ShardingError> {
        let key = key.coerce(self.key_type, "range")?;
        let key: &KeyValue = &key;
        // Index of the first range whose start is above the key; the candidate is
        // the one before it (open starts only occur at index 0 and count as below).
        let after = self
            .ranges
            .partition_point(|r| r.from.as_ref().is_none_or(|f| f <= key));
        let hit = after
            .checked_sub(1)
            .and_then(|i| self.ranges.get(i))
            .filter(|r| r.to.as_ref().is_none_or(|t| key < t));
        match hit {
            Some(r) => Ok(r.shard),
            None => Err(ShardingError::NoRange {
                value: key.shown(),
                covered: self.covered(),
            }),
        }
    }

    fn covered(&self) -> String {
        let lo = self.ranges.first().and_then(|r| r.from.as_ref());
        let hi = self.ranges.last().and_then(|r| r.to.as_ref());
        match (lo, hi) {
            (Some(l), Some(h)) => format!("[{l}, {h})"),
            (Some(l), None) => format!("[{l}, unbounded)"),
            (None, Some(h)) => format!("(unbounded, {h})"),
            (None, None) => "everything".into(),
        }
    }

    /// Shards whose ranges may hold keys in the interval `lower .. upper`
    /// (for `key < v`, `key <= v`, `key >= v`, `BETWEEN a AND b`), sorted and
    /// deduplicated. It may over-approximate (never under): bounds that cannot be
    /// read as the key type select every shard. An empty interval gives no shards.
    pub fn shards_for_interval(
        &self,
        lower: Bound<&KeyValue>,
        upper: Bound<&KeyValue>,
    ) -> Vec<usize> {
        let all = || {
            let mut v: Vec<usize> = self.ranges.iter().map(|r| r.shard).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let lower = match coerce_bound(lower, self.key_type) {
            Some(b) => b,
            None => return all(),
        };
        let upper = match coerce_bound(upper, self.key_type) {
            Some(b) => b,
            None => return all(),
        };
        let as_ref = |b: &Bound<KeyValue>| match b {
            Bound::Included(v) => Bound::Included(v.clone()),
            Bound::Excluded(v) => Bound::Excluded(v.clone()),
            Bound::Unbounded => Bound::Unbounded,
        };
        let (lower, upper) = (as_ref(&lower), as_ref(&upper));
        let mut out: Vec<usize> = self
            .ranges
            .iter()
            .filter(|r| {
                // The interval reaches below the range's end …
                let below_end = match (&lower, &r.to) {
                    (_, None) | (Bound::Unbounded, _) => true,
                    (Bound::Included(l) | Bound::Excluded(l), Some(t)) => l < t,
                };
                // … and above the range's start.
                let above_start = match (&upper, &r.from) {
                    (_, None) | (Bound::Unbounded, _) => true,
                    (Bound::Included(u), Some(f)) => u >= f,
                    (Bound::Excluded(u), Some(f)) => u > f,
                };
                below_end && above_start
            })
            .map(|r| r.shard)
            .collect();
        let empty = match (&lower, &upper) {
            (Bound::Included(l), Bound::Included(u)) => l > u,
            (Bound::Included(l) | Bound::Excluded(l), Bound::Excluded(u))
            | (Bound::Excluded(l), Bound::Included(u)) => l >= u,
            _ => false,
        };
        if empty {
            return Vec::new();
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// A bound converted to the ranges' key type; `None` if it cannot be.
fn coerce_bound(b: Bound<&KeyValue>, kind: KeyType) -> Option<Bound<KeyValue>> {
    Some(match b {
        Bound::Included(v) => Bound::Included(v.coerce(kind, "range").ok()?.clone()),
        Bound::Excluded(v) => Bound::Excluded(v.coerce(kind, "range").ok()?.clone()),
        Bound::Unbounded => Bound::Unbounded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(v: i64) -> Option<KeyValue> {
        Some(KeyValue::Int(v))
    }

    fn spec(from: Option<KeyValue>, to: Option<KeyValue>, shard: usize) -> RangeSpec {
        RangeSpec { from, to, shard }
    }

    fn three() -> RangeFunction {
        RangeFunction::new(
            vec![
                spec(None, int(100), 0),
                spec(int(100), int(200), 1),
                spec(int(200), None, 2),
            ],
            3,
        )
        .unwrap()
    }

    #[test]
    fn half_open_lookup() {
        let f = three();
        for (k, s) in [
            (i64::MIN, 0),
            (99, 0),
            (100, 1),
            (199, 1),
            (200, 2),
            (i64::MAX, 2),
        ] {
            assert_eq!(f.shard_for(&KeyValue::Int(k)), Ok(s), "{k}");
        }
        assert_eq!(f.shard_for(&KeyValue::Text("150".into())), Ok(1));
    }

    #[test]
    fn outside_every_range_names_the_value() {
        let f = RangeFunction::new(vec![spec(int(0), int(10), 0), spec(int(10), int(20), 1)], 2)
            .unwrap();
        let err = f.shard_for(&KeyValue::Int(20)).unwrap_err().to_string();
        assert!(err.contains("20") && err.contains("[0, 20)"), "{err}");
        assert!(f.shard_for(&KeyValue::Int(-1)).is_err());
    }

    #[test]
    fn validation_names_the_two_ranges() {
        let gap = RangeFunction::new(vec![spec(None, int(10), 0), spec(int(20), None, 1)], 2)
            .unwrap_err()
            .to_string();
        assert!(
            gap.contains("#1") && gap.contains("#2") && gap.contains("gap"),
            "{gap}"
        );
        let overlap = RangeFunction::new(vec![spec(None, int(20), 0), spec(int(10), None, 1)], 2)
            .unwrap_err()
            .to_string();
        assert!(overlap.contains("overlap"), "{overlap}");
        let unsorted =
            RangeFunction::new(vec![spec(int(10), int(20), 0), spec(int(0), int(10), 1)], 2)
                .unwrap_err()
                .to_string();
        assert!(unsorted.contains("not sorted"), "{unsorted}");
        assert!(RangeFunction::new(vec![spec(int(5), int(5), 0)], 1).is_err());
        assert!(RangeFunction::new(vec![spec(None, None, 3)], 2).is_err());
        assert!(RangeFunction::new(vec![], 2).is_err());
        let mixed = RangeFunction::new(
            vec![
                spec(None, int(5), 0),
                spec(Some(KeyValue::Text("5".into())), None, 1),
            ],
            2,
        );
        assert!(mixed.is_err());
    }

    #[test]
    fn text_ranges_use_byte_order() {
        let t = |s: &str| Some(KeyValue::Text(s.into()));
        let f = RangeFunction::new(vec![spec(None, t("m"), 0), spec(t("m"), None, 1)], 2).unwrap();
        assert_eq!(f.shard_for(&KeyValue::Text("Zebra".into())), Ok(0)); // 'Z' < 'm' in C
        assert_eq!(f.shard_for(&KeyValue::Text("apple".into())), Ok(0));
        assert_eq!(f.shard_for(&KeyValue::Text("m".into())), Ok(1));
        assert_eq!(f.shard_for(&KeyValue::Text("éclair".into())), Ok(1));
    }

    #[test]
    fn date_ranges_from_the_yaml_example() {
        let d = |s| Some(KeyValue::parse_as(KeyType::Date, s).unwrap());
        let f = RangeFunction::new(
            vec![
                spec(None, d("2026-01-01"), 0),
                spec(d("2026-01-01"), None, 1),
            ],
            2,
        )
        .unwrap();
        assert_eq!(f.shard_for(&KeyValue::Text("2025-12-31".into())), Ok(0));
        assert_eq!(f.shard_for(&KeyValue::Text("2026-01-01".into())), Ok(1));
        assert!(f.shard_for(&KeyValue::Int(3)).is_err());
    }

    #[test]
    fn intervals() {
        let f = three();
        let i = KeyValue::Int;
        use Bound::*;
        assert_eq!(f.shards_for_interval(Unbounded, Excluded(&i(100))), vec![0]);
        assert_eq!(
            f.shards_for_interval(Unbounded, Included(&i(100))),
            vec![0, 1]
        );
        assert_eq!(f.shards_for_interval(Included(&i(200)), Unbounded), vec![2]);
        assert_eq!(
            f.shards_for_interval(Included(&i(150)), Included(&i(250))),
            vec![1, 2]
        );
        assert_eq!(
            f.shards_for_interval(Included(&i(5)), Included(&i(7))),
            vec![0]
        );
        assert_eq!(f.shards_for_interval(Unbounded, Unbounded), vec![0, 1, 2]);
        assert_eq!(
            f.shards_for_interval(Included(&i(7)), Included(&i(5))),
            Vec::<usize>::new()
        );
        let bad = KeyValue::Text("x".into());
        assert_eq!(
            f.shards_for_interval(Included(&bad), Unbounded),
            vec![0, 1, 2]
        );
    }
}
