//! Prometheus metrics (ARCHITECTURE §3 "Metrics") and the HTTP endpoint that
//! exposes them.
//!
//! Design choices, and why:
//!
//! * **Own registry.** Every [`Metrics`] owns a [`Registry`] instead of using
//!   the process-global default one, so several proxies can run in one
//!   process (the integration tests start many) without their series
//!   colliding or being registered twice.
//! * **Pre-resolved handles.** Recording a query happens for every statement
//!   the proxy forwards. Looking a child up in a `*Vec` by label values hashes
//!   the strings and takes a lock each time, so [`Metrics::new`] resolves every
//!   `{shard,route}` child once and keeps them in plain `Vec`s indexed by shard
//!   index and [`Route`]. The hot-path methods are then an index plus an
//!   atomic add, with no allocation (checked by a unit test with a counting
//!   allocator).
//! * **Gauges are refreshed at scrape time.** Pool occupancy and backend
//!   health change constantly and are cheap to read, so instead of updating
//!   them on every checkout, [`http::serve`] calls a `refresh` callback before
//!   rendering; [`Metrics::record_pools`] is a ready-made body for it.

pub mod http;

use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::backend::{BackendError, ShardPool};

pub use http::serve;

/// Latency buckets from 50µs to 10s in 1-2.5-5 steps: a pooled round trip to
/// a local shard takes tens of microseconds, while a fan-out report or a
/// checkout waiting for an exhausted pool takes seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Number of shards a fan-out touched: powers of two up to 256.
const FANOUT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// How a statement was routed; the `route` label of the query series.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// Exactly one shard (sharding key or hint).
    Single,
    /// Several shards chosen by the router, results merged.
    Fanout,
    /// Every shard (DDL, writes to replicated tables).
    Broadcast,
}

impl Route {
    /// All routes, in label-index order.
    pub const ALL: [Route; 3] = [Route::Single, Route::Fanout, Route::Broadcast];

    /// The `route` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Single => "single",
            Route::Fanout => "fanout",
            Route::Broadcast => "broadcast",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Outcome of a two-phase commit; the `outcome` label of
/// `shardgate_twophase_total`. A closed set keeps the series bounded and
/// lets every outcome be exported as 0 before it first happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TwoPhaseOutcome {
    /// Every shard committed its prepared transaction.
    Committed,
    /// A shard failed to prepare; all prepared parts were rolled back.
    Aborted,
    /// All shards prepared but a COMMIT PREPARED failed: left for recovery.
    InDoubt,
}

impl TwoPhaseOutcome {
    /// All outcomes, in label-index order.
    pub const ALL: [TwoPhaseOutcome; 3] = [
        TwoPhaseOutcome::Committed,
        TwoPhaseOutcome::Aborted,
        TwoPhaseOutcome::InDoubt,
    ];

    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            TwoPhaseOutcome::Committed => "committed",
            TwoPhaseOutcome::Aborted => "aborted",
            TwoPhaseOutcome::InDoubt => "in_doubt",
        }
    }
}

/// Result of a shard-map reload; the `result` label of
/// `shardgate_config_reloads_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReloadResult {
    /// The new map was validated and is in use.
    Success,
    /// The new map was rejected; the old one stays in use.
    Failure,
}

impl ReloadResult {
    /// All results, in label-index order.
    pub const ALL: [ReloadResult; 2] = [ReloadResult::Success, ReloadResult::Failure];

    /// The `result` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Success => "success",
            ReloadResult::Failure => "failure",
        }
    }
}

/// Why a client's login failed; the `reason` label of
/// `shardgate_client_auth_failures_total` (a closed set: no user names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthFailure {
    /// A user of the map with a wrong password.
    WrongPassword,
    /// A user the map does not name (the client got the same 28P01).
    UnknownUser,
    /// The exchange itself was broken (wrong message, bad SCRAM data).
    Protocol,
    /// No login within `login_timeout`.
    Timeout,
    /// Refused at once: `max_pending_logins` connections were logging in.
    TooManyLogins,
}

impl AuthFailure {
    /// All reasons, in label-index order.
    pub const ALL: [AuthFailure; 5] = [
        AuthFailure::WrongPassword,
        AuthFailure::UnknownUser,
        AuthFailure::Protocol,
        AuthFailure::Timeout,
        AuthFailure::TooManyLogins,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::WrongPassword => "wrong_password",
            AuthFailure::UnknownUser => "unknown_user",
            AuthFailure::Protocol => "protocol",
            AuthFailure::Timeout => "timeout",
            AuthFailure::TooManyLogins => "too_many_logins",
        }
    }
}

/// Handles of one shard, labelled once at construction (clones share the
/// same series).
#[derive(Debug, Clone)]
struct ShardSeries {
    name: String,
    /// `queries_total{shard, route}`, indexed by [`Route::index`].
    queries: [IntCounter; 3],
    /// `pool_connections{shard, state="active"}`.
    pool_active: IntGauge,
    /// `pool_connections{shard, state="idle"}`.
    pool_idle: IntGauge,
    /// `backend_up{shard}`.
    up: IntGauge,
    /// `pool_wait_max_seconds{shard}`.
    wait_max: Gauge,
    /// `prepared_transactions_disabled{shard}`.
    prepare_disabled: IntGauge,
    /// `shard_paused{shard}`.
    paused: IntGauge,
}

/// All shardgate series plus the registry they live in.
///
/// `Send + Sync`; share it as `Arc<Metrics>` (what [`Metrics::new`] returns).
/// Shard arguments are indexes into the shard map, as used by
/// [`crate::backend::Pools`]; an index out of range is ignored rather than
/// panicking, so a metrics bug can never take a session down.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    shards: Vec<ShardSeries>,
    /// `query_duration_seconds{route}`, indexed by [`Route::index`].
    durations: [Histogram; 3],
    errors: IntCounterVec,
    client_connections: IntGauge,
    pool_wait: Histogram,
    fanout_shards: Histogram,
    /// `twophase_total{outcome}`, indexed like [`TwoPhaseOutcome::ALL`].
    twophase: [IntCounter; 3],
    /// `twophase_in_doubt`.
    twophase_in_doubt: IntGauge,
    /// `twophase_duration_seconds`.
    twophase_duration: Histogram,
    /// `map_generation`.
    map_generation: IntGauge,
    /// `config_reloads_total{result}`, indexed like [`ReloadResult::ALL`].
    config_reloads: [IntCounter; 2],
    /// `client_auth_failures_total{reason}`, indexed like [`AuthFailure::ALL`].
    auth_failures: [IntCounter; 5],
    /// `other_databases`: database names pooled now (`other_databases`).
    other_databases: IntGauge,
    /// `other_database_connections{database, state}`: rebuilt at every
    /// scrape from the pools that exist, so its label values are bounded by
    /// `other_databases.max_databases` although clients choose the names.
    other_connections: IntGaugeVec,
    /// `other_database_refusals_total`: logins refused at `max_databases`.
    other_refusals: IntCounter,
}

/// Registers a collector whose definition is fixed in this file. Failing
/// here means a duplicate or malformed metric name in the source, a bug no
/// input can trigger (covered by the unit tests), hence the panic.
fn register<C: Collector + Clone + 'static>(registry: &Registry, collector: C) -> C {
    if let Err(error) = registry.register(Box::new(collector.clone())) {
        panic!("shardgate metrics are defined inconsistently: {error}");
    }
    collector
}

/// Same reasoning as [`register`]: constructor errors only come from the
/// static definitions below.
fn defined<T>(result: prometheus::Result<T>) -> T {
    match result {
        Ok(value) => value,
        Err(error) => panic!("shardgate metrics are defined inconsistently: {error}"),
    }
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    defined(Histogram::with_opts(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
    ))
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    defined(IntCounterVec::new(Opts::new(name, help), labels))
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    defined(IntGaugeVec::new(Opts::new(name, help), labels))
}

/// `sqlstate_class` label: the first two characters of a SQLSTATE. Anything
/// that is not two ASCII letters/digits becomes `XX` (internal error), which
/// keeps the label set bounded (36² classes) whatever a server sends.
fn sqlstate_class(sqlstate: &str) -> [u8; 2] {
    match sqlstate.as_bytes() {
        [a, b, ..] if a.is_ascii_alphanumeric() && b.is_ascii_alphanumeric() => {
            [a.to_ascii_uppercase(), b.to_ascii_uppercase()]
        }
        _ => *b"XX",
    }
}

impl Metrics {
    /// Creates and registers every series, pre-labelling the per-shard ones
    /// for `shard_names` (in shard-map order; index = shard index).
    pub fn new<S: AsRef<str>>(shard_names: &[S]) -> std::sync::Arc<Metrics> {
        let registry = Registry::new();

        let queries = register(
            &registry,
            counter_vec(
                "shardgate_queries_total",
                "Statements forwarded, per shard and routing kind (single|fanout|broadcast).",
                &["shard", "route"],
            ),
        );
        let durations = register(
            &registry,
            defined(HistogramVec::new(
                HistogramOpts::new(
                    "shardgate_query_duration_seconds",
                    "Time from receiving a statement to its last response, per routing kind.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["route"],
            )),
        );
        let errors = register(
            &registry,
            counter_vec(
                "shardgate_errors_total",
                "Errors sent to clients, per shard (empty for proxy-level errors) and SQLSTATE class.",
                &["shard", "sqlstate_class"],
            ),
        );
        let client_connections = register(
            &registry,
            defined(IntGauge::new(
                "shardgate_client_connections",
                "Client connections currently open.",
            )),
        );
        let pool = register(
            &registry,
            gauge_vec(
                "shardgate_pool_connections",
                "Backend connections per shard and state (idle|active).",
                &["shard", "state"],
            ),
        );
        let pool_wait = register(
            &registry,
            histogram(
                "shardgate_pool_wait_seconds",
                "Time spent waiting to check a backend connection out of a pool (p99: histogram_quantile(0.99, rate(shardgate_pool_wait_seconds_bucket[1m]))).",
                LATENCY_BUCKETS,
            ),
        );
        let wait_max = register(
            &registry,
            defined(GaugeVec::new(
                Opts::new(
                    "shardgate_pool_wait_max_seconds",
                    "Longest wait for a backend connection of the shard's pool in the last 10-20 s (checkouts are served first come, first served).",
                ),
                &["shard"],
            )),
        );
        let up = register(
            &registry,
            gauge_vec(
                "shardgate_backend_up",
                "1 if the shard was reachable at the last connect attempt or health probe (every 5 s while its pool is not busy; from startup), else 0. A shard answering with an error (bad password) counts as reachable.",
                &["shard"],
            ),
        );
        let fanout_shards = register(
            &registry,
            histogram(
                "shardgate_fanout_shards",
                "Number of shards a multi-shard statement was sent to.",
                FANOUT_BUCKETS,
            ),
        );
        let twophase = register(
            &registry,
            counter_vec(
                "shardgate_twophase_total",
                "Two-phase commits, per outcome.",
                &["outcome"],
            ),
        );
        let twophase_in_doubt = register(
            &registry,
            defined(IntGauge::new(
                "shardgate_twophase_in_doubt",
                "Prepared transactions of multi-shard commits not yet finished on every shard (retried in the background or left for recovery).",
            )),
        );
        let twophase_duration = register(
            &registry,
            histogram(
                "shardgate_twophase_duration_seconds",
                "Time from a multi-shard transaction's COMMIT to its outcome (prepare on every writer, decision, commit prepared).",
                LATENCY_BUCKETS,
            ),
        );
        let map_generation = register(
            &registry,
            defined(IntGauge::new(
                "shardgate_map_generation",
                "The running shard map's generation: 1 at start, one more per successful reload.",
            )),
        );
        let paused = register(
            &registry,
            gauge_vec(
                "shardgate_shard_paused",
                "1 while the shard is paused by the admin console's PAUSE, else 0.",
                &["shard"],
            ),
        );
        let prepare_disabled = register(
            &registry,
            gauge_vec(
                "shardgate_prepared_transactions_disabled",
                "1 if the shard has max_prepared_transactions = 0 (it cannot take part in a multi-shard write), else 0.",
                &["shard"],
            ),
        );
        let config_reloads = register(
            &registry,
            counter_vec(
                "shardgate_config_reloads_total",
                "Shard map reloads, per result.",
                &["result"],
            ),
        );
        let auth_failures = register(
            &registry,
            counter_vec(
                "shardgate_client_auth_failures_total",
                "Client logins that failed, per reason (wrong_password|unknown_user|protocol|timeout|too_many_logins).",
                &["reason"],
            ),
        );

        let other_databases = register(
            &registry,
            defined(IntGauge::new(
                "shardgate_other_databases",
                "Database names other than the map's database pooled now (other_databases; at most max_databases).",
            )),
        );
        let other_connections = register(
            &registry,
            gauge_vec(
                "shardgate_other_database_connections",
                "Backend connections of the pools of other database names, per database and state (idle|active); only databases pooled now.",
                &["database", "state"],
            ),
        );
        let other_refusals = register(
            &registry,
            defined(IntCounter::new(
                "shardgate_other_database_refusals_total",
                "Logins to another database name refused because other_databases.max_databases databases were in use.",
            )),
        );

        let shards = shard_names
            .iter()
            .map(|name| {
                let name = name.as_ref();
                ShardSeries {
                    name: name.to_owned(),
                    queries: Route::ALL
                        .map(|route| queries.with_label_values(&[name, route.as_str()])),
                    pool_active: pool.with_label_values(&[name, "active"]),
                    pool_idle: pool.with_label_values(&[name, "idle"]),
                    up: up.with_label_values(&[name]),
                    wait_max: wait_max.with_label_values(&[name]),
                    prepare_disabled: prepare_disabled.with_label_values(&[name]),
                    paused: paused.with_label_values(&[name]),
                }
            })
            .collect();

        std::sync::Arc::new(Metrics {
            registry,
            shards,
            durations: Route::ALL.map(|route| durations.with_label_values(&[route.as_str()])),
            errors,
            client_connections,
            pool_wait,
            fanout_shards,
            twophase: TwoPhaseOutcome::ALL.map(|o| twophase.with_label_values(&[o.as_str()])),
            twophase_in_doubt,
            twophase_duration,
            map_generation,
            config_reloads: ReloadResult::ALL
                .map(|r| config_reloads.with_label_values(&[r.as_str()])),
            auth_failures: AuthFailure::ALL.map(|r| auth_failures.with_label_values(&[r.as_str()])),
            other_databases,
            other_connections,
            other_refusals,
        })
    }

    /// The same series seen through a one-shard map whose shard 0 is
    /// `shard`: what the plain pooler of another database on that shard's
    /// server records into, so its statements, errors and waits count as
    /// that shard's (no label value per database name).
    pub fn for_shard(&self, shard: usize) -> std::sync::Arc<Metrics> {
        std::sync::Arc::new(Metrics {
            registry: self.registry.clone(),
            shards: self.shards.get(shard).cloned().into_iter().collect(),
            durations: self.durations.clone(),
            errors: self.errors.clone(),
            client_connections: self.client_connections.clone(),
            pool_wait: self.pool_wait.clone(),
            fanout_shards: self.fanout_shards.clone(),
            twophase: self.twophase.clone(),
            twophase_in_doubt: self.twophase_in_doubt.clone(),
            twophase_duration: self.twophase_duration.clone(),
            map_generation: self.map_generation.clone(),
            config_reloads: self.config_reloads.clone(),
            auth_failures: self.auth_failures.clone(),
            other_databases: self.other_databases.clone(),
            other_connections: self.other_connections.clone(),
            other_refusals: self.other_refusals.clone(),
        })
    }

    /// Replaces `other_databases` and `other_database_connections` with
    /// `(database, active, idle)` of every pool that exists now; series of
    /// pools dropped since the last scrape go away.
    pub fn record_other_databases(&self, pools: &[(String, u32, u32)]) {
        self.other_connections.reset();
        self.other_databases
            .set(i64::try_from(pools.len()).unwrap_or(i64::MAX));
        for (database, active, idle) in pools {
            for (state, value) in [("active", active), ("idle", idle)] {
                match self
                    .other_connections
                    .get_metric_with_label_values(&[database, state])
                {
                    Ok(gauge) => gauge.set(i64::from(*value)),
                    Err(error) => tracing::warn!(%error, "cannot record other database metric"),
                }
            }
        }
    }

    /// Counts a login refused at `other_databases.max_databases`.
    pub fn other_database_refused(&self) {
        self.other_refusals.inc();
    }

    /// The registry behind [`Metrics::render`], for series added elsewhere
    /// (e.g. `shardgate_migration_revision`).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Index of the shard called `name`, for callers that only have a name
    /// (error values). Linear: shard maps are small and this is off the hot path.
    pub fn shard_index(&self, name: &str) -> Option<usize> {
        self.shards.iter().position(|s| s.name == name)
    }

    /// A statement sent to one shard finished. Hot path: no allocation, no
    /// hashing, no lock.
    pub fn query_done(&self, shard: usize, route: Route, elapsed: Duration) {
        if let Some(series) = self.shards.get(shard) {
            series.queries[route.index()].inc();
        }
        self.durations[route.index()].observe(elapsed.as_secs_f64());
    }

    /// A statement sent to several shards finished: counts it once per shard,
    /// observes its duration once and records the fan-out width. No
    /// allocation.
    pub fn multi_query_done(&self, shards: &[usize], route: Route, elapsed: Duration) {
        for &shard in shards {
            if let Some(series) = self.shards.get(shard) {
                series.queries[route.index()].inc();
            }
        }
        self.durations[route.index()].observe(elapsed.as_secs_f64());
        self.fanout_shards.observe(shards.len() as f64);
    }

    /// An error was sent to a client. `shard` is `None` for proxy-level
    /// errors (routing, auth, syntax). Not on the hot path, so the child is
    /// looked up by label values (bounded: classes are two `[0-9A-Z]` chars).
    pub fn error(&self, shard: Option<usize>, sqlstate: &str) {
        let shard = shard
            .and_then(|index| self.shards.get(index))
            .map_or("", |series| series.name.as_str());
        let class = sqlstate_class(sqlstate);
        // Both bytes are ASCII alphanumerics, so this cannot fail.
        let class = std::str::from_utf8(&class).unwrap_or("XX");
        match self.errors.get_metric_with_label_values(&[shard, class]) {
            Ok(counter) => counter.inc(),
            Err(error) => tracing::warn!(%error, "cannot record error metric"),
        }
    }

    /// [`Metrics::error`] for a backend error, labelled with its shard.
    pub fn backend_error(&self, error: &BackendError) {
        self.error(self.shard_index(error.shard()), error.sqlstate());
    }

    /// A client connected; the gauge goes down again when the returned guard
    /// is dropped, so every exit path of a session is covered.
    #[must_use = "the connection counts as open only while the guard lives"]
    pub fn client_connected(&self) -> ClientConnection {
        self.client_connections.inc();
        ClientConnection {
            gauge: self.client_connections.clone(),
        }
    }

    /// Clients connected now (for the admin console).
    pub fn clients(&self) -> i64 {
        self.client_connections.get()
    }

    /// Statements counted on `shard`, by route in [`Route::ALL`] order (for
    /// the admin console's `SHOW STATS`).
    pub fn shard_queries(&self, shard: usize) -> [u64; 3] {
        self.shards
            .get(shard)
            .map_or([0; 3], |series| series.queries.each_ref().map(|c| c.get()))
    }

    /// Time a checkout waited for a pooled connection.
    pub fn pool_wait(&self, elapsed: Duration) {
        self.pool_wait.observe(elapsed.as_secs_f64());
    }

    /// Whether `shard` accepts connections.
    pub fn set_backend_up(&self, shard: usize, up: bool) {
        if let Some(series) = self.shards.get(shard) {
            series.up.set(i64::from(up));
        }
    }

    /// Current pool occupancy of `shard`.
    pub fn set_pool_state(&self, shard: usize, active: u32, idle: u32) {
        if let Some(series) = self.shards.get(shard) {
            series.pool_active.set(i64::from(active));
            series.pool_idle.set(i64::from(idle));
        }
    }

    /// Longest recent checkout wait of `shard`'s pool.
    pub fn set_pool_wait_max(&self, shard: usize, wait: Duration) {
        if let Some(series) = self.shards.get(shard) {
            series.wait_max.set(wait.as_secs_f64());
        }
    }

    /// Copies the occupancy, reachability and longest recent wait of every
    /// pool into `pool_connections`, `backend_up` and
    /// `pool_wait_max_seconds`; meant for the scrape-time `refresh` callback
    /// of [`serve`].
    pub fn record_pools(&self, pools: &[ShardPool]) {
        for pool in pools {
            let (connections, idle) = pool.state();
            self.set_pool_state(pool.index(), connections.saturating_sub(idle), idle);
            self.set_backend_up(pool.index(), pool.is_up());
            self.set_pool_wait_max(pool.index(), pool.wait_max());
            if let Some(series) = self.shards.get(pool.index()) {
                series.paused.set(i64::from(pool.is_paused()));
            }
        }
    }

    /// Records how many shards a multi-shard statement touched (already done
    /// by [`Metrics::multi_query_done`]).
    pub fn fanout(&self, shards: usize) {
        self.fanout_shards.observe(shards as f64);
    }

    /// Counts a finished two-phase commit.
    pub fn twophase(&self, outcome: TwoPhaseOutcome) {
        self.twophase[outcome as usize].inc();
    }

    /// A two-phase commit ended (whatever its outcome) after `elapsed`.
    pub fn twophase_duration(&self, elapsed: Duration) {
        self.twophase_duration.observe(elapsed.as_secs_f64());
    }

    /// Sets `map_generation` (see `cluster`).
    pub fn set_map_generation(&self, generation: u64) {
        self.map_generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    /// Sets `twophase_in_doubt`: prepared transactions of multi-shard
    /// commits this instance knows are not finished yet.
    pub fn set_twophase_in_doubt(&self, count: i64) {
        self.twophase_in_doubt.set(count);
    }

    /// Sets `prepared_transactions_disabled{shard}` from the 2PC preflight.
    pub fn set_prepared_transactions_disabled(&self, shard: usize, disabled: bool) {
        if let Some(series) = self.shards.get(shard) {
            series.prepare_disabled.set(i64::from(disabled));
        }
    }

    /// Counts a shard-map reload attempt.
    pub fn config_reload(&self, result: ReloadResult) {
        self.config_reloads[result as usize].inc();
    }

    /// Counts a failed client login.
    pub fn auth_failure(&self, reason: AuthFailure) {
        self.auth_failures[reason as usize].inc();
    }

    /// Everything in the text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(error) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out) {
            // Only possible with malformed families, which gather() does not
            // produce; serve what was encoded rather than nothing.
            tracing::warn!(%error, "encoding metrics failed");
        }
        out
    }
}

/// Keeps `shardgate_client_connections` incremented while alive.
#[derive(Debug)]
pub struct ClientConnection {
    gauge: IntGauge,
}

impl Drop for ClientConnection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// Counts allocations made by the current thread while enabled, so tests
    /// running in parallel on other threads do not disturb the count.
    struct CountingAllocator;

    thread_local! {
        static COUNTING: Cell<bool> = const { Cell::new(false) };
        static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    }

    fn note_allocation() {
        let counting = COUNTING.try_with(Cell::get).unwrap_or(false);
        if counting {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        }
    }

    // SAFETY: delegates every operation to `System`; only adds bookkeeping
    // in const-initialised thread locals, which never allocate.
    unsafe impl GlobalAlloc for CountingAllocator {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note_allocation();
            System.alloc(layout)
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note_allocation();
            System.alloc_zeroed(layout)
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note_allocation();
            System.realloc(ptr, layout, new_size)
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            System.dealloc(ptr, layout)
        }
    }

    #[global_allocator]
    static ALLOCATOR: CountingAllocator = CountingAllocator;

    fn allocations_during(f: impl FnOnce()) -> u64 {
        ALLOCATIONS.with(|n| n.set(0));
        COUNTING.with(|c| c.set(true));
        f();
        COUNTING.with(|c| c.set(false));
        ALLOCATIONS.with(Cell::get)
    }

    fn metrics() -> std::sync::Arc<Metrics> {
        Metrics::new(&["s0".to_owned(), "s1".to_owned()])
    }

    #[test]
    fn counting_allocator_sees_allocations() {
        let n = allocations_during(|| drop(std::hint::black_box(vec![1u8; 16])));
        assert!(n >= 1, "the allocation check would be vacuous");
    }

    #[test]
    fn hot_path_does_not_allocate() {
        let m = metrics();
        // Warm up anything lazily initialised.
        m.query_done(0, Route::Single, Duration::from_micros(80));
        let n = allocations_during(|| {
            for i in 0..10_000u64 {
                let route = Route::ALL[(i % 3) as usize];
                m.query_done((i % 2) as usize, route, Duration::from_micros(i));
                m.multi_query_done(&[0, 1], Route::Fanout, Duration::from_micros(i));
                m.pool_wait(Duration::from_nanos(i));
                m.set_pool_state(1, 3, 2);
                m.set_backend_up(0, true);
                drop(m.client_connected());
                m.twophase(TwoPhaseOutcome::Aborted);
                m.config_reload(ReloadResult::Failure);
            }
            m.query_done(99, Route::Single, Duration::ZERO);
        });
        assert_eq!(n, 0, "recording allocated {n} times");
        assert_eq!(m.shards[0].queries[0].get(), 1 + 1667);
    }

    #[test]
    fn render_has_help_type_and_labels() {
        let m = metrics();
        for _ in 0..3 {
            m.query_done(0, Route::Single, Duration::from_millis(2));
        }
        m.query_done(1, Route::Broadcast, Duration::from_secs(20));
        m.error(Some(1), "23505");
        m.error(None, "42601");
        let text = m.render();
        for line in [
            "# HELP shardgate_queries_total ",
            "# TYPE shardgate_queries_total counter",
            "shardgate_queries_total{route=\"single\",shard=\"s0\"} 3",
            "shardgate_queries_total{route=\"broadcast\",shard=\"s1\"} 1",
            "shardgate_queries_total{route=\"fanout\",shard=\"s1\"} 0",
            "# TYPE shardgate_query_duration_seconds histogram",
            "shardgate_query_duration_seconds_bucket{route=\"single\",le=\"0.00005\"} 0",
            "shardgate_query_duration_seconds_bucket{route=\"single\",le=\"0.0025\"} 3",
            "shardgate_query_duration_seconds_bucket{route=\"broadcast\",le=\"10\"} 0",
            "shardgate_query_duration_seconds_bucket{route=\"broadcast\",le=\"+Inf\"} 1",
            "shardgate_query_duration_seconds_count{route=\"single\"} 3",
            "# TYPE shardgate_errors_total counter",
            "shardgate_errors_total{shard=\"s1\",sqlstate_class=\"23\"} 1",
            "shardgate_errors_total{shard=\"\",sqlstate_class=\"42\"} 1",
            "# TYPE shardgate_client_connections gauge",
            "shardgate_client_connections 0",
            "# TYPE shardgate_pool_connections gauge",
            "shardgate_pool_connections{shard=\"s0\",state=\"idle\"} 0",
            "shardgate_pool_connections{shard=\"s1\",state=\"active\"} 0",
            "# TYPE shardgate_pool_wait_seconds histogram",
            "shardgate_pool_wait_seconds_count 0",
            "# TYPE shardgate_pool_wait_max_seconds gauge",
            "shardgate_pool_wait_max_seconds{shard=\"s1\"} 0",
            "# TYPE shardgate_backend_up gauge",
            "shardgate_backend_up{shard=\"s0\"} 0",
            "# TYPE shardgate_fanout_shards histogram",
            "# HELP shardgate_twophase_total ",
            "# TYPE shardgate_twophase_total counter",
            "shardgate_twophase_total{outcome=\"in_doubt\"} 0",
            "# HELP shardgate_config_reloads_total ",
            "# TYPE shardgate_config_reloads_total counter",
            "shardgate_config_reloads_total{result=\"failure\"} 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn gauges_follow_updates() {
        let m = metrics();
        let a = m.client_connected();
        let b = m.client_connected();
        drop(a);
        m.set_pool_state(1, 4, 6);
        m.set_pool_wait_max(1, Duration::from_millis(250));
        m.set_backend_up(1, true);
        m.set_backend_up(0, false);
        m.twophase(TwoPhaseOutcome::Committed);
        m.set_twophase_in_doubt(2);
        m.set_prepared_transactions_disabled(1, true);
        m.set_prepared_transactions_disabled(9, true);
        m.config_reload(ReloadResult::Success);
        m.fanout(2);
        m.auth_failure(AuthFailure::UnknownUser);
        let text = m.render();
        for line in [
            "shardgate_client_auth_failures_total{reason=\"unknown_user\"} 1",
            "shardgate_client_auth_failures_total{reason=\"wrong_password\"} 0",
            "shardgate_client_connections 1",
            "shardgate_pool_connections{shard=\"s1\",state=\"active\"} 4",
            "shardgate_pool_connections{shard=\"s1\",state=\"idle\"} 6",
            "shardgate_backend_up{shard=\"s1\"} 1",
            "shardgate_backend_up{shard=\"s0\"} 0",
            "shardgate_pool_wait_max_seconds{shard=\"s1\"} 0.25",
            "shardgate_twophase_total{outcome=\"committed\"} 1",
            "shardgate_twophase_in_doubt 2",
            "shardgate_prepared_transactions_disabled{shard=\"s1\"} 1",
            "shardgate_prepared_transactions_disabled{shard=\"s0\"} 0",
            "shardgate_config_reloads_total{result=\"success\"} 1",
            "shardgate_fanout_shards_bucket{le=\"2\"} 1",
            "shardgate_fanout_shards_count 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        drop(b);
        assert!(m.render().contains("shardgate_client_connections 0"));
    }

    #[test]
    fn a_shard_view_records_into_that_shards_series() {
        let m = metrics();
        let view = m.for_shard(1);
        view.query_done(0, Route::Single, Duration::ZERO);
        view.error(Some(0), "3D000");
        view.query_done(1, Route::Single, Duration::ZERO);
        m.record_other_databases(&[("a".into(), 1, 2), ("b".into(), 0, 1)]);
        m.record_other_databases(&[("b".into(), 0, 3)]);
        view.other_database_refused();
        let text = m.render();
        for line in [
            "shardgate_queries_total{route=\"single\",shard=\"s1\"} 1",
            "shardgate_queries_total{route=\"single\",shard=\"s0\"} 0",
            "shardgate_errors_total{shard=\"s1\",sqlstate_class=\"3D\"} 1",
            "shardgate_other_databases 1",
            "shardgate_other_database_connections{database=\"b\",state=\"idle\"} 3",
            "shardgate_other_database_refusals_total 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("database=\"a\""), "{text}");
    }

    #[test]
    fn sqlstate_classes_are_bounded() {
        assert_eq!(&sqlstate_class("08006"), b"08");
        assert_eq!(&sqlstate_class("p0001"), b"P0");
        assert_eq!(&sqlstate_class(""), b"XX");
        assert_eq!(&sqlstate_class("4"), b"XX");
        assert_eq!(&sqlstate_class("é1234"), b"XX");
        assert_eq!(&sqlstate_class("{\"}"), b"XX");
        let m = metrics();
        m.error(Some(7), "\u{0}\u{0}");
        assert!(m
            .render()
            .contains("shardgate_errors_total{shard=\"\",sqlstate_class=\"XX\"} 1"));
    }

    #[test]
    fn instances_are_independent() {
        let a = metrics();
        let b = metrics();
        a.query_done(0, Route::Single, Duration::ZERO);
        assert!(a
            .render()
            .contains("shardgate_queries_total{route=\"single\",shard=\"s0\"} 1"));
        assert!(b
            .render()
            .contains("shardgate_queries_total{route=\"single\",shard=\"s0\"} 0"));
        assert_eq!(a.shard_index("s1"), Some(1));
        assert_eq!(a.shard_index("nope"), None);
    }

    #[test]
    fn metrics_are_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Metrics>();
        check::<ClientConnection>();
    }
}
