//! Shards that just failed to answer, so statements any shard can serve
//! (a Describe before Bind, a catalog read) try the others first.
//!
//! Without it, each such statement that happens to pick a hung shard waits
//! `query_timeout` before trying the next one, and then its own statement
//! may wait `query_timeout` again (#15: 5 of 202 hung-shard statements took
//! up to 9.95 s with `query_timeout: 5s`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a shard stays suspect after it failed to answer.
pub const SUSPECT_FOR: Duration = Duration::from_secs(10);

/// Per shard: until when (milliseconds after `base`) it is suspect.
#[derive(Debug)]
pub struct SuspectShards {
    base: Instant,
    until: Vec<AtomicU64>,
}

impl SuspectShards {
    pub fn new(shards: usize) -> SuspectShards {
        SuspectShards {
            base: Instant::now(),
            until: (0..shards).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// `shard` failed to answer (unreachable, dying, or past
    /// `query_timeout`): passed over for [`SUSPECT_FOR`].
    pub fn mark(&self, shard: usize) {
        if let Some(until) = self.until.get(shard) {
            let deadline = self.now_ms() + SUSPECT_FOR.as_millis() as u64;
            until.store(deadline, Ordering::Relaxed);
        }
    }

    /// `shard` answered: no longer suspect.
    pub fn clear(&self, shard: usize) {
        if let Some(until) = self.until.get(shard) {
            until.store(0, Ordering::Relaxed);
        }
    }

    pub fn is_suspect(&self, shard: usize) -> bool {
        self.until
            .get(shard)
            .is_some_and(|until| until.load(Ordering::Relaxed) > self.now_ms())
    }

    /// Every shard once, starting at `preferred`: those not suspect first,
    /// in round-robin order, then the suspect ones (still tried: they may
    /// be all there is).
    pub fn order(&self, preferred: usize) -> Vec<usize> {
        let count = self.until.len().max(1);
        let ring = (0..count).map(|i| (preferred + i) % count);
        let (fine, suspect): (Vec<usize>, Vec<usize>) = ring.partition(|s| !self.is_suspect(*s));
        fine.into_iter().chain(suspect).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspect_shards_are_tried_last() {
        let shards = SuspectShards::new(3);
        assert_eq!(shards.order(1), vec![1, 2, 0]);
        shards.mark(1);
        assert!(shards.is_suspect(1));
        assert_eq!(shards.order(1), vec![2, 0, 1]);
        assert_eq!(shards.order(0), vec![0, 2, 1]);
        shards.clear(1);
        assert_eq!(shards.order(1), vec![1, 2, 0]);
        shards.mark(7);
        assert_eq!(shards.order(2), vec![2, 0, 1]);
    }
}
