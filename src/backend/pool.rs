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
//! * **Cheap validation.** `is_valid` never does a round trip: a peek at the
//!   socket (EOF / stray bytes = dead) and the transaction status suffice,
//!   because the proxy sees every ReadyForQuery and EOF (ARCHITECTURE §2.2).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bb8::{ErrorSink, ManageConnection, PooledConnection, QueueStrategy, RunError};
use tokio::sync::watch;

use super::connection::{display_addr, BackendConnection};
use super::error::{fmt_duration, BackendError};
use super::hot::HotStack;
use crate::config::{Config, PoolConfig, ShardConfig};

/// A checked-out backend connection; returns to its pool when dropped.
/// Prefer [`release`] so a connection left inside a transaction is reset
/// rather than discarded.
pub type PooledBackend = PooledConnection<'static, BackendManager>;

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
        tracing::warn!(shard = %error.shard(), sqlstate = error.sqlstate(), "{error}");
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
    /// Connections passed from one transaction to the next (see `hot.rs`).
    hot: Arc<HotStack>,
    max_lifetime: Option<Duration>,
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
            hot: HotStack::start(),
            max_lifetime: nonzero(pool.max_lifetime),
        }
    }

    /// A parked connection ready at once, if there is one: the common
    /// checkout, which needs no clock read for the pool-wait metric.
    pub fn checkout_parked(&self) -> Option<PooledBackend> {
        self.hot.pop(self.max_lifetime)
    }

    /// An idle, healthy connection to this shard.
    ///
    /// Errors: `08006` as soon as a connect attempt fails (at most
    /// `connect_timeout`, not `checkout_timeout`); `53300` when all `size`
    /// connections stay busy for `checkout_timeout`.
    pub async fn checkout(&self) -> Result<PooledBackend, BackendError> {
        let _waiting = self.hot.enter();
        if let Some(conn) = self.hot.pop(self.max_lifetime) {
            return Ok(conn);
        }
        // Subscribe first so a failure of the attempt our own `get` triggers
        // cannot be missed.
        let mut failures = self.shared.failures.subscribe();
        tokio::select! {
            biased;
            result = self.pool.get_owned() => match result {
                Ok(conn) => Ok(conn),
                Err(RunError::User(e)) => Err(e),
                Err(RunError::TimedOut) => Err(self.timeout_error()),
            },
            Ok(()) = failures.changed() => {
                let error = failures.borrow_and_update().clone();
                Err(error.unwrap_or_else(|| self.timeout_error()))
            }
        }
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
            self.hot.park(conn);
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
#[derive(Debug)]
pub struct Pools {
    pub shards: Vec<ShardPool>,
}

impl Pools {
    /// Pools for every shard of `config`; connects lazily.
    pub fn new(config: &Config) -> Pools {
        Pools {
            shards: config
                .shards
                .iter()
                .enumerate()
                .map(|(index, shard)| ShardPool::new(shard, index, &config.pool))
                .collect(),
        }
    }

    pub fn get(&self, index: usize) -> Option<&ShardPool> {
        self.shards.get(index)
    }

    pub fn by_name(&self, name: &str) -> Option<&ShardPool> {
        self.shards.iter().find(|p| p.name() == name)
    }
}
