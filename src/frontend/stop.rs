//! Asking a session to end from outside it: a graceful shutdown lets it
//! finish its transaction first, the admin console's KILL does not. Either
//! way the client gets Postgres' own `FATAL 57P01 terminating connection due
//! to administrator command` before the connection closes.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::Poll;

use futures::task::AtomicWaker;

/// How soon a session is asked to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StopWhen {
    /// At its next moment between transactions (shutdown).
    BetweenTransactions = 1,
    /// Now, rolling back what is in flight (KILL).
    Now = 2,
}

/// A session's stop request: set by the registry, read by the session loop.
/// An atomic flag and waker rather than a `Notify`: the session polls it in
/// every wait, and a `Notify` waiter (a lock and a list entry per poll) cost
/// ~850 instructions per routed transaction (callgrind).
#[derive(Debug, Default)]
pub struct SessionStop {
    when: AtomicU8,
    waker: AtomicWaker,
}

impl SessionStop {
    /// Asks the session to end (a later, sooner request wins).
    pub fn request(&self, when: StopWhen) {
        self.when.fetch_max(when as u8, Ordering::AcqRel);
        self.waker.wake();
    }

    /// The request so far, if any.
    pub fn requested(&self) -> Option<StopWhen> {
        match self.when.load(Ordering::Acquire) {
            0 => None,
            1 => Some(StopWhen::BetweenTransactions),
            _ => Some(StopWhen::Now),
        }
    }

    /// Completes once the request is sooner than `seen` (what the session
    /// already acted on): a session finishing its transaction after a
    /// shutdown request waits on, and still hears a later KILL.
    pub async fn wait_beyond(&self, seen: Option<StopWhen>) {
        let seen = seen.map_or(0, |when| when as u8);
        poll_fn(|cx| {
            if self.when.load(Ordering::Acquire) > seen {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // A request between the check and the registration woke nobody.
            if self.when.load(Ordering::Acquire) > seen {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
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
    async fn a_request_wakes_a_waiting_task() {
        let stop = std::sync::Arc::new(SessionStop::default());
        let waiting = tokio::spawn({
            let stop = stop.clone();
            async move {
                stop.wait_beyond(None).await;
                // A shutdown was seen; a KILL still wakes it.
                stop.wait_beyond(Some(StopWhen::BetweenTransactions)).await
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        stop.request(StopWhen::BetweenTransactions);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "still waiting for something sooner");
        stop.request(StopWhen::Now);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("woken")
            .expect("task");
    }

    #[tokio::test]
    async fn a_request_before_the_wait_is_not_lost() {
        let stop = SessionStop::default();
        stop.request(StopWhen::BetweenTransactions);
        tokio::time::timeout(std::time::Duration::from_secs(1), stop.wait_beyond(None))
            .await
            .expect("the stored permit completes the wait");
    }
}
