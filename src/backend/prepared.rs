//! Per-backend record of the prepared statements shardgate created on it.
//!
//! In transaction pooling a client's named statement must be re-created on
//! whichever backend it lands on. The front end prepares each distinct
//! statement under a shardgate-owned name (keyed by a hash of its text and
//! parameter types) and asks this cache whether the current backend already
//! has it. The cache is bounded: when full, the least recently used entry is
//! evicted and its name returned so the caller can `Close` it on the server.

use std::collections::HashMap;

/// Default number of statements remembered per backend connection.
pub const DEFAULT_PREPARED_CAPACITY: usize = 512;

#[derive(Debug)]
struct Entry {
    name: String,
    last_used: u64,
    /// When it was prepared, on the front end's Parse clock (see
    /// `frontend::prepared`): a client's Parse after that must not use it.
    prepared_at: u64,
    /// The result columns this copy was planned with, once known.
    shape: ResultShape,
}

/// What shardgate knows of the result columns of a backend's statement copy.
/// Postgres fixes them when it prepares the copy (a later schema change
/// makes its Bind fail with 0A000 instead), so once known they stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultShape {
    /// Not described on this backend yet.
    Unknown,
    /// A hidden Describe is on its way.
    Probing,
    /// Described: see `frontend::prepared::result_shape`.
    Known(u64),
}

/// Bounded map from statement hash to the server-side statement name.
#[derive(Debug)]
pub struct PreparedCache {
    entries: HashMap<u64, Entry>,
    capacity: usize,
    clock: u64,
}

impl Default for PreparedCache {
    fn default() -> Self {
        PreparedCache::new(DEFAULT_PREPARED_CAPACITY)
    }
}

impl PreparedCache {
    /// A cache holding at most `capacity` statements (at least 1).
    pub fn new(capacity: usize) -> PreparedCache {
        PreparedCache {
            entries: HashMap::new(),
            capacity: capacity.max(1),
            clock: 0,
        }
    }

    /// The server-side name for `hash`, marking it recently used.
    pub fn get(&mut self, hash: u64) -> Option<&str> {
        self.get_prepared_since(hash, 0)
    }

    /// [`PreparedCache::get`], but only a statement prepared at or after
    /// `since`: an older one may carry a plan from before a schema change
    /// that a client's later Parse must not inherit.
    pub fn get_prepared_since(&mut self, hash: u64, since: u64) -> Option<&str> {
        self.clock += 1;
        let clock = self.clock;
        self.entries
            .get_mut(&hash)
            .filter(|e| e.prepared_at >= since)
            .map(|e| {
                e.last_used = clock;
                e.name.as_str()
            })
    }

    /// True if the statement exists on this backend (does not touch recency).
    pub fn contains(&self, hash: u64) -> bool {
        self.entries.contains_key(&hash)
    }

    /// The result shape of the copy for `hash` prepared at or after `since`
    /// (`None`: no such copy; does not touch recency).
    pub fn shape_since(&self, hash: u64, since: u64) -> Option<ResultShape> {
        self.entries
            .get(&hash)
            .filter(|e| e.prepared_at >= since)
            .map(|e| e.shape)
    }

    /// Records what is known of the result shape of the copy for `hash`.
    pub fn set_shape(&mut self, hash: u64, shape: ResultShape) {
        if let Some(entry) = self.entries.get_mut(&hash) {
            entry.shape = shape;
        }
    }

    /// Record that `name` was prepared for `hash`. Returns the name of a
    /// statement that had to be evicted to make room (the caller should
    /// `Close` it on the backend), or the previous name for the same hash.
    pub fn insert(&mut self, hash: u64, name: String) -> Option<String> {
        self.insert_prepared_at(hash, name, 0)
    }

    /// [`PreparedCache::insert`] of a statement prepared at `prepared_at`.
    pub fn insert_prepared_at(
        &mut self,
        hash: u64,
        name: String,
        prepared_at: u64,
    ) -> Option<String> {
        self.clock += 1;
        let entry = Entry {
            name,
            last_used: self.clock,
            prepared_at,
            shape: ResultShape::Unknown,
        };
        if let Some(old) = self.entries.insert(hash, entry) {
            return Some(old.name);
        }
        if self.entries.len() <= self.capacity {
            return None;
        }
        // O(n) scan: eviction is rare and n is small; avoids a linked list.
        let victim = self
            .entries
            .iter()
            .filter(|(h, _)| **h != hash)
            .min_by_key(|(_, e)| e.last_used)
            .map(|(h, _)| *h)?;
        self.entries.remove(&victim).map(|e| e.name)
    }

    /// Forget one statement (e.g. after the front end closed it), returning its name.
    pub fn remove(&mut self, hash: u64) -> Option<String> {
        self.entries.remove(&hash).map(|e| e.name)
    }

    /// Forget everything, e.g. after `DISCARD ALL` went through.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut cache = PreparedCache::new(2);
        assert_eq!(cache.insert(1, "sg_1".into()), None);
        assert_eq!(cache.insert(2, "sg_2".into()), None);
        assert_eq!(cache.get(1), Some("sg_1"));
        assert_eq!(cache.insert(3, "sg_3".into()), Some("sg_2".into()));
        assert!(cache.contains(1) && cache.contains(3) && !cache.contains(2));
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.remove(1), Some("sg_1".into()));
        cache.clear();
        assert!(cache.is_empty());
    }

    #[test]
    fn reinsert_returns_previous_name() {
        let mut cache = PreparedCache::new(1);
        assert_eq!(cache.insert(7, "a".into()), None);
        assert_eq!(cache.insert(7, "b".into()), Some("a".into()));
        assert_eq!(cache.get(7), Some("b"));
        assert_eq!(PreparedCache::new(0).capacity(), 1);
    }

    #[test]
    fn older_preparations_are_not_reused_for_later_parses() {
        let mut cache = PreparedCache::new(4);
        assert_eq!(cache.insert_prepared_at(7, "sg_7".into(), 5), None);
        assert_eq!(cache.get_prepared_since(7, 5), Some("sg_7"));
        assert_eq!(cache.get_prepared_since(7, 6), None);
        // Re-prepared: the caller closes the previous server statement.
        assert_eq!(
            cache.insert_prepared_at(7, "sg_7".into(), 6),
            Some("sg_7".into())
        );
        assert_eq!(cache.get_prepared_since(7, 6), Some("sg_7"));
    }
}
