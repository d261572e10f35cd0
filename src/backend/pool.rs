//! Per-shard bb8 pools of [`BackendConnection`]s.
//!
//! Two things bb8 does not give us out of the box, and why this file exists:
//!
//! * **Fail fast when a shard is down.** bb8 reports connect failures only to
//!   its error sink; a waiting `get` keeps waiting until `connection_timeout`
//!   (our `checkout_timeout`). A client should instead hear "shard s1 is
//!   unavailable" as soon as the connect attempt fails (at most
//!   `connect_timeout`). So connect retries are off, the sink publishes each
//!   connect failure on a watch channel, and `checkout` races the pool
//!   against it.
//! * **First come, first served.** bb8 wakes a waiting `get` through a
//!   `Notify` that a newcomer can beat, and the hot stack (`hot.rs`) hands
//!   connections to whoever asks next, so under load some waiters were
//!   overtaken again and again (800 clients on 20 connections: worst waits
//!   1.1-1.9 s, 53300 after 3 s, while PgBouncer stayed under 0.2 s, issue
//!   #15). A checkout therefore first takes a permit from a FIFO gate
//!   (tokio's fair `Semaphore`) sized to the pool; the permit travels with
//!   the connection and is released after the connection is returned, so
//!   bb8 and the hot stack only ever serve clients the gate let in, in
//!   arrival order.
//! * **Cheap validation.** `is_valid` never does a round trip: a peek at the
//!   socket (EOF / stray bytes = dead) and the transaction status suffice,
//!   because the proxy sees every ReadyForQuery and EOF (ARCHITECTURE §2.2).

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bb8::{ErrorSink, ManageConnection, PooledConnection, QueueStrategy, RunError};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::connection::{display_addr, BackendConnection};
use super::error::{fmt_duration, BackendError};
use super::hot::HotStack;
use crate::config::{Config, PoolConfig, ShardConfig};

/// A connection checked out of bb8, without its gate permit (what the hot
/// stack parks).
pub(crate) type Bb8Connection = PooledConnection<'static, BackendManager>;

/// A checked-out backend connection and its place in the pool's gate; both
/// go back when dropped (the connection first, so the next client in line
/// finds it). Prefer [`release`] so a connection left inside a transaction
/// is reset rather than discarded.
pub struct PooledBackend {
    // Field order is drop order: connection, then permit.
    conn: Bb8Connection,
    _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for PooledBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PooledBackend").field(&**self.conn).finish()
    }
}

impl Deref for PooledBackend {
    type Target = BackendConnection;

    fn deref(&self) -> &BackendConnection {
        &self.conn
    }
}

impl DerefMut for PooledBackend {
    fn deref_mut(&mut self) -> &mut BackendConnection {
        &mut self.conn
    }
}

/// Window of `shardgate_pool_wait_max_seconds`: the gauge shows the longest
/// wait of the current and the previous window, so 10 to 20 s of history,
/// enough for any scrape interval up to 10 s to see every peak.
pub const WAIT_MAX_WINDOW: Duration = Duration::from_secs(10);

/// How often [`ShardPool::probe`] is meant to run (`backend_up` of an idle
/// proxy is at most this old).
pub const PROBE_EVERY: Duration = Duration::from_secs(5);

/// Longest checkout waits per [`WAIT_MAX_WINDOW`] (only waiting checkouts
/// record here, so the uncontended path reads no clock).
#[derive(Debug)]
struct WaitMax {
    started: Instant,
    /// (window number, longest wait in it, longest wait in the window before).
    windows: Mutex<(u64, Duration, Duration)>,
}

impl WaitMax {
    fn new() -> WaitMax {
        WaitMax {
            started: Instant::now(),
            windows: Mutex::new((0, Duration::ZERO, Duration::ZERO)),
        }
    }

    fn window(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.started).as_millis();
        u64::try_from(elapsed / WAIT_MAX_WINDOW.as_millis()).unwrap_or(u64::MAX)
    }

    /// Rolls the windows forward to `now`; returns the guard.
    fn current(&self, now: Instant) -> std::sync::MutexGuard<'_, (u64, Duration, Duration)> {
        let window = self.window(now);
        let mut guard = match self.windows.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if window != guard.0 {
            let previous = if window == guard.0 + 1 {
                guard.1
            } else {
                Duration::ZERO
            };
            *guard = (window, Duration::ZERO, previous);
        }
        guard
    }

    fn record(&self, wait: Duration, now: Instant) {
        let mut guard = self.current(now);
        guard.1 = guard.1.max(wait);
    }

    fn get(&self, now: Instant) -> Duration {
        let guard = self.current(now);
        guard.1.max(guard.2)
    }
}

/// How long [`release`] may spend rolling back a connection returned
/// inside a transaction before giving up and discarding it.
pub const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle connections older than this are checked for a dead server (EOF, a
/// FATAL notice) at checkout; younger ones are handed out unchecked.
pub const HEALTH_CHECK_AFTER_IDLE: Duration = Duration::from_millis(250);

/// State shared by a pool, its manager and its error sink.
#[derive(Debug)]
struct PoolShared {
    /// ParameterStatus set of the most recent successful connection.
    server_parameters: Mutex<Option<Vec<(String, String)>>>,
    /// Latest connect failure; every change wakes the waiting checkouts.
    failures: watch::Sender<Option<BackendError>>,
    /// Whether the last connect attempt reached the server (see
    /// [`ShardPool::is_up`]); false until one did.
    up: AtomicBool,
    /// Connect failures are logged at most once a second.
    failure_log: crate::throttle::LogThrottle,
}

/// bb8 manager: opens, validates and judges connections to one shard.
#[derive(Debug)]
pub struct BackendManager {
    shard: ShardConfig,
    index: usize,
    connect_timeout: Duration,
    shared: Arc<PoolShared>,
}

impl BackendManager {
    fn broken(&self) -> BackendError {
        BackendError::Broken {
            shard: self.shard.name.clone(),
        }
    }
}

impl ManageConnection for BackendManager {
    /// Boxed: bb8 and the session move the connection several times per
    /// transaction (checkout, put back, attach, detach); moving a pointer
    /// instead of the struct removed ~2,000 instructions of memcpy per
    /// transaction (callgrind).
    type Connection = Box<BackendConnection>;
    type Error = BackendError;

    async fn connect(&self) -> Result<Box<BackendConnection>, BackendError> {
        let conn =
            BackendConnection::connect(&self.shard, self.index, self.connect_timeout).await?;
        self.shared.up.store(true, Ordering::Relaxed);
        let mut params = match self.shared.server_parameters.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        *params = Some(conn.server_parameters().to_vec());
        Ok(Box::new(conn))
    }

    /// Cheap: no SQL. Not broken, idle (`'I'`, nothing in flight) and the
    /// socket neither closed nor holding unexpected bytes.
    async fn is_valid(&self, conn: &mut Box<BackendConnection>) -> Result<(), BackendError> {
        if !conn.fit_for_checkout() {
            conn.mark_broken();
            return Err(self.broken());
        }
        Ok(())
    }

    /// Also true for a connection dropped while not idle: without a reset
    /// (see [`release`]) it must not be handed to another client.
    fn has_broken(&self, conn: &mut Box<BackendConnection>) -> bool {
        conn.is_broken() || conn.needs_reset()
    }
}

/// Publishes connect failures to waiting checkouts and logs them.
#[derive(Debug, Clone)]
struct ConnectFailureSink {
    shared: Arc<PoolShared>,
}

impl ErrorSink<BackendError> for ConnectFailureSink {
    fn sink(&self, error: BackendError) {
        if let BackendError::Broken { shard } = &error {
            // A failed checkout validation; bb8 replaces the connection.
            tracing::debug!(shard = %shard, "discarding a broken idle backend connection");
            return;
        }
        if let Some(suppressed) = self.shared.failure_log.admit() {
            tracing::warn!(
                shard = %error.shard(),
                sqlstate = error.sqlstate(),
                suppressed,
                "{error}"
            );
        }
        // A server that answered (bad password, unknown database) is up.
        self.shared
            .up
            .store(!error.is_unavailable(), Ordering::Relaxed);
        self.shared.failures.send_replace(Some(error));
    }

    fn boxed_clone(&self) -> Box<dyn ErrorSink<BackendError>> {
        Box::new(self.clone())
    }
}

/// The pool of one shard.
#[derive(Debug)]
pub struct ShardPool {
    name: String,
    addr: String,
    index: usize,
    size: u32,
    checkout_timeout: Duration,
    pool: bb8::Pool<BackendManager>,
    shared: Arc<PoolShared>,
    /// FIFO admission: `size` permits, one per checked-out connection.
    gate: Arc<Semaphore>,
    waits: WaitMax,
    /// Connections passed from one transaction to the next (see `hot.rs`).
    hot: Arc<HotStack>,
    /// Checkouts waiting at the gate now (the admin console's `cl_waiting`).
    queued: Arc<AtomicUsize>,
    /// PAUSE in the admin console: new checkouts wait for RESUME (up to
    /// `pause_timeout`); connections already out finish their transactions.
    paused: watch::Sender<bool>,
    pause_timeout: Duration,
    max_lifetime: Option<Duration>,
}

/// A checkout counted as waiting at the gate until dropped (also when the
/// wait is cancelled by a timeout).
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn enter(count: &'a AtomicUsize) -> Queued<'a> {
        count.fetch_add(1, Ordering::Relaxed);
        Queued(count)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// bb8 panics on zero durations; zero in the map means "never".
fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

impl ShardPool {
    /// Build the pool without connecting, so shardgate starts even when a
    /// shard is down. Must be called inside a Tokio runtime (bb8 spawns its
    /// reaper task).
    pub fn new(shard: &ShardConfig, index: usize, pool: &PoolConfig) -> ShardPool {
        let (failures, _) = watch::channel(None);
        let shared = Arc::new(PoolShared {
            server_parameters: Mutex::new(None),
            failures,
            up: AtomicBool::new(false),
            failure_log: crate::throttle::LogThrottle::new(Duration::from_secs(1)),
        });
        let manager = BackendManager {
            shard: shard.clone(),
            index,
            connect_timeout: pool.connect_timeout,
            shared: shared.clone(),
        };
        let size = pool.size.max(1);
        let checkout_timeout = nonzero(pool.checkout_timeout).unwrap_or(Duration::from_millis(1));
        let built = bb8::Pool::builder()
            .max_size(size)
            .min_idle(None)
            .test_on_check_out(true)
            .connection_timeout(checkout_timeout)
            .idle_timeout(nonzero(pool.idle_timeout))
            .max_lifetime(nonzero(pool.max_lifetime))
            // Fail fast: a connect error goes to the sink (and so to the
            // waiting checkout) instead of being retried until checkout_timeout.
            .retry_connection(false)
            .error_sink(Box::new(ConnectFailureSink {
                shared: shared.clone(),
            }))
            // Reuse the most recently used connection: keeps the number of
            // busy backends low and their caches (and our prepared-statement
            // cache) warm; extra idle connections age out via idle_timeout.
            .queue_strategy(QueueStrategy::Lifo)
            .build_unchecked(manager);
        ShardPool {
            name: shard.name.clone(),
            addr: display_addr(&shard.host, shard.port),
            index,
            size,
            checkout_timeout,
            pool: built,
            shared,
            gate: Arc::new(Semaphore::new(size as usize)),
            waits: WaitMax::new(),
            hot: HotStack::start(),
            queued: Arc::new(AtomicUsize::new(0)),
            paused: watch::channel(false).0,
            pause_timeout: pool.pause_timeout,
            max_lifetime: nonzero(pool.max_lifetime),
        }
    }

    /// A parked connection ready at once, if there is one and nobody is
    /// waiting for this pool: the common checkout, which needs no clock
    /// read for the pool-wait metric.
    pub fn checkout_parked(&self) -> Option<PooledBackend> {
        if *self.paused.borrow() {
            return None;
        }
        // Fails while anyone is queued: tokio hands released permits to
        // the queue first, so this cannot overtake a waiter.
        let permit = self.gate.clone().try_acquire_owned().ok()?;
        let conn = self.hot.pop(self.max_lifetime)?;
        Some(PooledBackend {
            conn,
            _permit: permit,
        })
    }

    /// An idle, healthy connection to this shard, in arrival order.
    ///
    /// Errors: `08006` as soon as a connect attempt fails (at most
    /// `connect_timeout`, not `checkout_timeout`); `53300` when all `size`
    /// connections stay busy for `checkout_timeout`.
    pub async fn checkout(&self) -> Result<PooledBackend, BackendError> {
        if *self.paused.borrow() {
            self.wait_resumed().await?;
        }
        let started = Instant::now();
        // Subscribe first so a failure of the attempt our own `get` triggers
        // cannot be missed; clients still queued at the gate hear it too.
        let mut failures = self.shared.failures.subscribe();
        let admitted = AtomicBool::new(false);
        let result = tokio::select! {
            biased;
            result = tokio::time::timeout(self.checkout_timeout, self.admit(&admitted)) => {
                match result {
                    Ok(result) => result,
                    Err(_) if !admitted.load(Ordering::Relaxed) => Err(self.exhausted_error()),
                    Err(_) => Err(self.timeout_error()),
                }
            }
            Ok(()) = failures.changed() => {
                let error = failures.borrow_and_update().clone();
                Err(error.unwrap_or_else(|| self.timeout_error()))
            }
        };
        // Failed waits count too: a 53300 after checkout_timeout is the
        // longest wait there is.
        let now = Instant::now();
        self.waits
            .record(now.saturating_duration_since(started), now);
        result
    }

    /// Waits for a gate permit, then takes a parked connection or one from bb8.
    async fn admit(&self, admitted: &AtomicBool) -> Result<PooledBackend, BackendError> {
        let queued = Queued::enter(&self.queued);
        let acquired = self.gate.clone().acquire_owned().await;
        drop(queued);
        let permit = match acquired {
            Ok(permit) => permit,
            // Never closed; treat it like a timeout rather than panicking.
            Err(_) => return Err(self.exhausted_error()),
        };
        admitted.store(true, Ordering::Relaxed);
        let _waiting = self.hot.enter();
        if let Some(conn) = self.hot.pop(self.max_lifetime) {
            return Ok(PooledBackend {
                conn,
                _permit: permit,
            });
        }
        // At most `size` permits exist and nothing is parked while we wait
        // here (`hot.rs`), so bb8 has a connection or a free slot for us.
        match self.pool.get_owned().await {
            Ok(conn) => Ok(PooledBackend {
                conn,
                _permit: permit,
            }),
            Err(RunError::User(e)) => Err(e),
            Err(RunError::TimedOut) => Err(self.timeout_error()),
        }
    }

    fn exhausted_error(&self) -> BackendError {
        BackendError::PoolExhausted {
            shard: self.name.clone(),
            timeout: self.checkout_timeout,
            size: self.size,
        }
    }

    /// Longest checkout wait of the last 10-20 s ([`WAIT_MAX_WINDOW`]).
    /// PAUSE: new checkouts wait until [`ShardPool::resume`].
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// RESUME: waiting checkouts go on.
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Waits (counted as queued) until the pool is resumed, at most
    /// `pause_timeout`.
    async fn wait_resumed(&self) -> Result<(), BackendError> {
        let _queued = Queued::enter(&self.queued);
        let mut paused = self.paused.subscribe();
        let waited = tokio::time::timeout(self.pause_timeout, async {
            // An error means the sender is gone: the pool is, too.
            let _ = paused.wait_for(|paused| !*paused).await;
        })
        .await;
        match waited {
            Ok(()) => Ok(()),
            Err(_) => Err(BackendError::Paused {
                shard: self.name.clone(),
                timeout: self.pause_timeout,
            }),
        }
    }

    /// Checkouts waiting for a connection now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn wait_max(&self) -> Duration {
        self.waits.get(Instant::now())
    }

    /// Whether the shard was reachable at the last connect attempt or probe
    /// (a server that answered with an error counts as reachable).
    pub fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::Relaxed)
    }

    /// Checks that the shard is reachable when the pool is not busy, so
    /// [`is_up`](Self::is_up) is right on an idle proxy: validates an idle
    /// connection (a socket peek) or opens one. Skipped when every
    /// connection is in use, since traffic then keeps the state current.
    pub async fn probe(&self) {
        let Ok(permit) = self.gate.clone().try_acquire_owned() else {
            return;
        };
        let _waiting = self.hot.enter();
        if let Some(conn) = self.hot.pop(self.max_lifetime) {
            // Popping validated it.
            self.shared.up.store(true, Ordering::Relaxed);
            drop(conn);
            drop(permit);
            return;
        }
        // A successful connect or a failure reported to the error sink
        // updates the state; an idle connection that passes bb8's check
        // means the server is still there. A failed connect reaches only
        // the sink, so listen there rather than wait for bb8's timeout.
        let mut failures = self.shared.failures.subscribe();
        tokio::select! {
            biased;
            got = self.pool.get() => {
                if got.is_ok() {
                    self.shared.up.store(true, Ordering::Relaxed);
                }
            }
            Ok(()) = failures.changed() => {}
        }
        drop(permit);
    }

    /// `checkout_timeout` passed: exhausted if every slot holds a live
    /// connection, otherwise a connect attempt is still hanging (a
    /// `connect_timeout` longer than `checkout_timeout`).
    fn timeout_error(&self) -> BackendError {
        let state = self.pool.state();
        if state.connections >= self.size {
            BackendError::PoolExhausted {
                shard: self.name.clone(),
                timeout: self.checkout_timeout,
                size: self.size,
            }
        } else {
            BackendError::Unavailable {
                shard: self.name.clone(),
                addr: self.addr.clone(),
                reason: format!(
                    "no connection established within checkout_timeout ({})",
                    fmt_duration(self.checkout_timeout)
                ),
            }
        }
    }

    /// (open connections, idle connections); parked hot connections count as idle.
    pub fn state(&self) -> (u32, u32) {
        let state = self.pool.state();
        let hot = u32::try_from(self.hot.len()).unwrap_or(u32::MAX);
        (
            state.connections,
            state.idle_connections.saturating_add(hot),
        )
    }

    /// Returns a connection after a transaction: a clean one is parked for
    /// the next checkout; one inside a transaction is rolled back first (see
    /// [`release`]).
    pub async fn release(&self, conn: PooledBackend) {
        if conn.needs_reset() || conn.is_broken() {
            release(conn).await;
        } else {
            let PooledBackend { conn, _permit } = conn;
            // Parked before the permit goes to the next client in line.
            self.hot.park(conn);
            drop(_permit);
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// Maximum number of connections (`pool.size`).
    pub fn size(&self) -> u32 {
        self.size
    }

    /// ParameterStatus values of the most recent successful connection
    /// (server_version, DateStyle, TimeZone, ...), for the front end to send
    /// to clients at startup. `None` until a connection has succeeded.
    pub fn server_parameters(&self) -> Option<Vec<(String, String)>> {
        match self.shared.server_parameters.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The underlying bb8 pool, for statistics (metrics).
    pub fn bb8(&self) -> &bb8::Pool<BackendManager> {
        &self.pool
    }
}

/// Return a connection to its pool, first rolling it back (bounded by
/// [`RESET_TIMEOUT`]) if it is inside a transaction or mid-request, e.g.
/// because its client vanished. A connection that cannot be reset is marked
/// broken, so bb8 closes it and opens a fresh one when needed.
pub async fn release(conn: PooledBackend) {
    release_within(conn, RESET_TIMEOUT).await;
}

/// [`release`] with an explicit bound on the reset.
pub async fn release_within(mut conn: PooledBackend, limit: Duration) {
    if !conn.is_broken() && conn.needs_reset() {
        let shard = conn.shard_name().to_owned();
        match tokio::time::timeout(limit, conn.reset()).await {
            Ok(Ok(())) => tracing::debug!(shard = %shard, "backend connection rolled back"),
            Ok(Err(e)) => {
                tracing::warn!(shard = %shard, "discarding backend connection: {e}");
                conn.mark_broken();
            }
            Err(_) => {
                tracing::warn!(
                    shard = %shard,
                    "discarding backend connection: reset took longer than {}",
                    fmt_duration(limit)
                );
                conn.mark_broken();
            }
        }
    }
    drop(conn);
}

/// One pool per shard, in shard-map order (index = shard index).
#[derive(Debug, Clone)]
pub struct Pools {
    /// Shared by the map snapshots a reload left them unchanged in.
    pub shards: Arc<Vec<ShardPool>>,
}

impl Pools {
    /// Pools for every shard of `config`; connects lazily.
    pub fn new(config: &Config) -> Pools {
        Pools {
            shards: Arc::new(
                config
                    .shards
                    .iter()
                    .enumerate()
                    .map(|(index, shard)| ShardPool::new(shard, index, &config.pool))
                    .collect(),
            ),
        }
    }

    pub fn get(&self, index: usize) -> Option<&ShardPool> {
        self.shards.get(index)
    }

    pub fn by_name(&self, name: &str) -> Option<&ShardPool> {
        self.shards.iter().find(|p| p.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_max_covers_the_current_and_the_previous_window() {
        let waits = WaitMax::new();
        let t0 = waits.started;
        assert_eq!(waits.get(t0), Duration::ZERO);
        waits.record(Duration::from_millis(300), t0 + Duration::from_secs(1));
        waits.record(Duration::from_millis(100), t0 + Duration::from_secs(2));
        assert_eq!(
            waits.get(t0 + Duration::from_secs(3)),
            Duration::from_millis(300)
        );
        // Next window: the previous one still counts.
        waits.record(Duration::from_millis(50), t0 + Duration::from_secs(11));
        assert_eq!(
            waits.get(t0 + Duration::from_secs(15)),
            Duration::from_millis(300)
        );
        // Two windows on, only the 50 ms of the window before is left.
        assert_eq!(
            waits.get(t0 + Duration::from_secs(21)),
            Duration::from_millis(50)
        );
        // A long quiet spell forgets everything.
        assert_eq!(waits.get(t0 + Duration::from_secs(60)), Duration::ZERO);
    }
}
