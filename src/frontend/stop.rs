//! Asking a session to end from outside it: a graceful shutdown lets it
//! finish its transaction first, the admin console's KILL does not. Either
//! way the client gets Postgres' own `FATAL 57P01 terminating connection due
//! to administrator command` before the connection closes.

use std::sync::atomic::{AtomicU8, Ordering};

use tokio::sync::Notify;

/// How soon a session is asked to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StopWhen {
    /// At its next moment between transactions (shutdown).
    BetweenTransactions = 1,
    /// Now, rolling back what is in flight (KILL).
    Now = 2,
}

/// A session's stop request: set by the registry, read by the session loop.
#[derive(Debug, Default)]
pub struct SessionStop {
    when: AtomicU8,
    notify: Notify,
}

impl SessionStop {
    /// Asks the session to end (a later, sooner request wins).
    pub fn request(&self, when: StopWhen) {
        self.when.fetch_max(when as u8, Ordering::AcqRel);
        // Stored as a permit when the session is not waiting right now.
        self.notify.notify_one();
    }

    /// The request so far, if any.
    pub fn requested(&self) -> Option<StopWhen> {
        match self.when.load(Ordering::Acquire) {
            0 => None,
            1 => Some(StopWhen::BetweenTransactions),
            _ => Some(StopWhen::Now),
        }
    }

    /// Completes when a request arrives (at once if one arrived unseen).
    pub async fn wait(&self) {
        self.notify.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sooner_request_wins() {
        let stop = SessionStop::default();
        assert_eq!(stop.requested(), None);
        stop.request(StopWhen::Now);
        stop.request(StopWhen::BetweenTransactions);
        assert_eq!(stop.requested(), Some(StopWhen::Now));
    }

    #[tokio::test]
    async fn a_request_before_the_wait_is_not_lost() {
        let stop = SessionStop::default();
        stop.request(StopWhen::BetweenTransactions);
        tokio::time::timeout(std::time::Duration::from_secs(1), stop.wait())
            .await
            .expect("the stored permit completes the wait");
    }
}
