//! Connections handed straight from one transaction to the next.
//!
//! A bb8 checkout plus return costs about 2,000 instructions per transaction
//! (callgrind: a timeout registration, a watch subscription, locks, the
//! validity check), a fifth of shardgate's user-space work for a pgbench
//! `-S` transaction. Under load the connection a session returns is usually
//! the one the next session takes, so returned connections wait here, still
//! checked out from bb8, and the next checkout pops one.
//!
//! Parked connections hold no gate permit (see `pool.rs`): only a checkout
//! that got its permit, in arrival order, may pop one, so the stack never
//! lets a newcomer overtake a waiter.
//!
//! Invariants, so nobody starves and bb8 keeps its duties:
//! - nothing is parked while a checkout is waiting on bb8 (`waiting`), and a
//!   park that races with a new waiter hands the connection back to bb8;
//! - a sweeper returns everything to bb8 every [`SWEEP_EVERY`], so idle
//!   timeouts, lifetimes and the pool gauges catch up within that time;
//! - only clean connections (idle, not broken) are parked; a popped one is
//!   re-checked like bb8's own check on checkout.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::pool::Bb8Connection;

/// How long a connection may sit here before it goes back to bb8.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct HotStack {
    conns: Mutex<Vec<Bb8Connection>>,
    /// Checkouts past the pool's gate (popping here or waiting on bb8).
    waiting: AtomicUsize,
}

/// Marks a checkout in progress for as long as it lives.
pub struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl HotStack {
    /// A stack with its sweeper task (requires a Tokio runtime).
    pub fn start() -> Arc<HotStack> {
        let stack = Arc::new(HotStack::default());
        let weak: Weak<HotStack> = Arc::downgrade(&stack);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(stack) = weak.upgrade() else { return };
                let drained = stack.drain();
                // Dropping returns them to bb8.
                drop(drained);
            }
        });
        stack
    }

    /// Registers a checkout; keep the guard until it has a connection or failed.
    pub fn enter(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(&self.waiting)
    }

    /// A parked connection that is still good, if any.
    pub fn pop(&self, max_lifetime: Option<Duration>) -> Option<Bb8Connection> {
        loop {
            let mut conn = self.lock().pop()?;
            let now = Instant::now();
            let too_old = max_lifetime
                .is_some_and(|limit| now.saturating_duration_since(conn.created_at()) >= limit);
            let healthy = conn.fit_for_checkout_at(now);
            if healthy && !too_old {
                return Some(conn);
            }
            if !healthy {
                conn.mark_broken();
            }
            // Back to bb8, which closes it (broken, or past its lifetime).
            drop(conn);
        }
    }

    /// Parks a clean connection, or gives it back to bb8 when someone waits there.
    pub fn park(&self, conn: Bb8Connection) {
        if conn.is_broken() || conn.needs_reset() || self.waiting.load(Ordering::SeqCst) > 0 {
            drop(conn);
            return;
        }
        self.lock().push(conn);
        // A checkout that started after our check may be waiting on bb8 now:
        // give it a connection through bb8.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            let back = self.lock().pop();
            drop(back);
        }
    }

    /// Everything parked (returned to bb8 when dropped).
    pub fn drain(&self) -> Vec<Bb8Connection> {
        std::mem::take(&mut *self.lock())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Bb8Connection>> {
        match self.conns.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}
