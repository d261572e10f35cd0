//! Log lines that come in bursts — a shard refusing every connect attempt
//! (26,778 warnings in 20 s of a kill -9 in the reliability suite), a flood
//! of failed logins — are written at most once per interval, each with the
//! count of those left out since the last one.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogThrottle {
    pub fn new(interval: Duration) -> LogThrottle {
        LogThrottle {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(left out since the last line)` when a line may be written now;
    /// `None` when this one is left out (and counted).
    pub fn admit(&self) -> Option<u64> {
        let now = Instant::now();
        let Ok(mut state) = self.state.lock() else {
            return None;
        };
        let (last, suppressed) = &mut *state;
        if last.is_some_and(|at| now.duration_since(at) < self.interval) {
            *suppressed += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_left_out() {
        let throttle = LogThrottle::new(Duration::from_millis(50));
        assert_eq!(throttle.admit(), Some(0));
        assert_eq!(throttle.admit(), None);
        assert_eq!(throttle.admit(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(throttle.admit(), Some(2));
        assert_eq!(throttle.admit(), None);
    }
}
