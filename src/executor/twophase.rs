//! Two-phase commit of client transactions that wrote on several shards
//! (ARCHITECTURE §2.9, the Citus pattern), over the raw pooled connections
//! the client's transaction lives on.
//!
//! At COMMIT, with participants = the shards the transaction touched:
//!
//! * read-only participants just `COMMIT`;
//! * 0 or 1 written shard: plain `COMMIT` (readers first, so a reader's
//!   failure, e.g. a serialization failure, still rolls the writer back);
//! * 2 or more written shards, coordinator = the written participant with the
//!   lowest shard index:
//!   1. `INSERT` the decision row into `shardgate.tx_decisions` inside the
//!      coordinator's transaction (with readers' `COMMIT`s, in parallel);
//!   2. `PREPARE TRANSACTION '<gid>'` on every other written participant;
//!   3. `COMMIT` on the coordinator: this local commit is the global commit;
//!   4. `COMMIT PREPARED '<gid>'` on the others, on the same connections.
//!      Failures here are retried in the background until done; the client
//!      has its `COMMIT` already.
//!
//! Any failure before 3 rolls back everywhere (`ROLLBACK`, `ROLLBACK
//! PREPARED`) and reports the cause's SQLSTATE naming its shard. Losing the
//! coordinator during 3 leaves the outcome unknown: the client gets 08007
//! and the prepared parts are resolved by asking the coordinator shard
//! (never guessed). Step 1 is answered before any PREPARE is sent, so that
//! an open coordinator transaction always holds the decision row's lock:
//! that is how [`super::recovery`] tells a live coordinator from a dead one,
//! with any number of shardgate instances (see its module doc). Do not
//! pipeline the INSERT with the PREPAREs or move it into the COMMIT: a
//! recovery could then roll back parts of a transaction whose decision is
//! still to be committed.
//!
//! ## gids
//!
//! `shardgate_tx_<instance>_<n>_<participant>_<coordinator shard name>`:
//! `<instance>` is 16 random hex digits drawn when the process starts, `<n>`
//! a per-process counter (together: the group, the decision row's key),
//! `<participant>` the participant's shard index (gids are unique per
//! Postgres *cluster*, and two shards may share one), and the coordinator's
//! name last (it may contain `_`) so recovery knows where to look. The
//! migrator's gids start with `shardgate_mig_`; the two never meet.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::future::join_all;

use super::control::{self, literal, ControlError};
use super::recovery::{self, Finished, Probe, RecoveryReport};
use super::rollback::Pending;
use crate::backend::{connect_control, BackendConnection, TWO_PHASE_APPLICATION};
use crate::config::{Config, ShardConfig};
use crate::metrics::{Metrics, TwoPhaseOutcome};
use crate::protocol::synth::ProxyError;

/// Prefix of every gid this module creates.
pub const GID_PREFIX: &str = "shardgate_tx_";

/// Environment variable that makes the coordinator abort the process at a
/// point of the protocol, for crash tests: `prepare` (after every PREPARE,
/// before the decision) or `decision` (right after the coordinator's COMMIT).
pub const CRASH_ENV: &str = "SHARDGATE_2PC_CRASH_AFTER";

/// Environment variable `prepare:<ms>` or `decision:<ms>` that makes the
/// coordinator sleep at that point, for tests of concurrent recovery and of
/// background `COMMIT PREPARED` retries.
pub const PAUSE_ENV: &str = "SHARDGATE_2PC_PAUSE_AFTER";

/// Postgres limits gids to 199 bytes.
const MAX_GID: usize = 199;

/// Bound on each control round trip of a commit. Long enough for a COMMIT
/// that checks deferred constraints under load; a hung shard must not hold
/// the client forever.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// One shard of a client transaction at COMMIT time.
pub struct Participant<'a> {
    pub shard: usize,
    /// The raw connection the transaction lives on, answered up to its last
    /// ReadyForQuery.
    pub conn: &'a mut BackendConnection,
    /// The transaction wrote (or may have written) on this shard.
    pub wrote: bool,
}

/// How a commit ended, when the client is to be told success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Committed on every participant. `prepared` participants went through
    /// two-phase commit (0 for a plain commit); `background` of them still
    /// have their `COMMIT PREPARED` retried (the data is committed: the
    /// decision is durable).
    Committed { prepared: usize, background: usize },
    /// A participant was in a failed transaction block: everything was
    /// rolled back, as Postgres does for COMMIT in a failed transaction.
    RolledBack,
}

impl CommitOutcome {
    /// The CommandComplete tag for the client.
    pub fn command_tag(&self) -> &'static str {
        match self {
            CommitOutcome::Committed { .. } => "COMMIT",
            CommitOutcome::RolledBack => "ROLLBACK",
        }
    }
}

/// The parts of a gid (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedGid<'a> {
    /// `shardgate_tx_<instance>_<n>`: the decision row's key.
    pub group: &'a str,
    pub participant: usize,
    pub coordinator: &'a str,
}

/// Splits a gid of this family; `None` for anything else.
pub fn parse_gid(gid: &str) -> Option<ParsedGid<'_>> {
    let rest = gid.strip_prefix(GID_PREFIX)?;
    let mut parts = rest.splitn(4, '_');
    let instance = parts.next()?;
    let n = parts.next()?;
    let participant = parts.next()?;
    let coordinator = parts.next()?;
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !hex(instance) || !digits(n) || !digits(participant) || coordinator.is_empty() {
        return None;
    }
    let group_len = GID_PREFIX.len() + instance.len() + 1 + n.len();
    Some(ParsedGid {
        group: &gid[..group_len],
        participant: participant.parse().ok()?,
        coordinator,
    })
}

/// The gid of `participant` in `group`.
pub fn gid(group: &str, participant: usize, coordinator: &str) -> String {
    format!("{group}_{participant}_{coordinator}")
}

/// The two-phase-commit coordinator of one shardgate process: settings,
/// gid allocation, per-shard preflight state and background resolution.
/// Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct TwoPhase {
    inner: Arc<Inner>,
}

struct Inner {
    enabled: bool,
    shards: Vec<ShardConfig>,
    instance: String,
    counter: AtomicU64,
    connect_timeout: Duration,
    step_timeout: Duration,
    /// The decision table is known to exist on this shard.
    table_ready: Vec<AtomicBool>,
    /// The last preflight saw `max_prepared_transactions = 0` here.
    prepare_disabled: Vec<AtomicBool>,
    /// Decision rows whose participants all committed: (shard, group).
    spent: Mutex<Vec<(usize, String)>>,
    /// Prepared parts being resolved by background tasks of this process.
    background: AtomicI64,
    /// Prepared parts the last recovery pass left undecided.
    recovery_in_doubt: AtomicI64,
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for TwoPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwoPhase")
            .field("enabled", &self.inner.enabled)
            .field("instance", &self.inner.instance)
            .finish()
    }
}

impl TwoPhase {
    /// A coordinator for `config`'s shards (`two_phase_commit` decides
    /// whether multi-shard writes are allowed). `metrics` gets
    /// `twophase_total`, the in-doubt gauge and the preflight gauge.
    pub fn new(config: &Config, metrics: Option<Arc<Metrics>>) -> TwoPhase {
        let n = config.shards.len();
        TwoPhase {
            inner: Arc::new(Inner {
                enabled: config.two_phase_commit,
                shards: config.shards.clone(),
                instance: format!("{:016x}", rand::random::<u64>()),
                counter: AtomicU64::new(0),
                connect_timeout: config.pool.connect_timeout,
                step_timeout: STEP_TIMEOUT,
                table_ready: (0..n).map(|_| AtomicBool::new(false)).collect(),
                prepare_disabled: (0..n).map(|_| AtomicBool::new(false)).collect(),
                spent: Mutex::new(Vec::new()),
                background: AtomicI64::new(0),
                recovery_in_doubt: AtomicI64::new(0),
                metrics,
            }),
        }
    }

    /// Whether `two_phase_commit` is on.
    pub fn enabled(&self) -> bool {
        self.inner.enabled
    }

    /// This process's instance id (the `<instance>` of its gids).
    pub fn instance_id(&self) -> &str {
        &self.inner.instance
    }

    pub fn shards(&self) -> &[ShardConfig] {
        &self.inner.shards
    }

    /// May a transaction that has written on `written` now write on
    /// `shard`? Always yes with two-phase commit on; with it off, a second
    /// written shard is refused with 0A000 at the statement that needs it.
    pub fn may_write(&self, written: &[usize], shard: usize) -> Result<(), ProxyError> {
        if self.inner.enabled || written.iter().all(|&w| w == shard) {
            return Ok(());
        }
        let name = |i: usize| {
            self.inner
                .shards
                .get(i)
                .map_or_else(|| format!("#{i}"), |s| s.name.clone())
        };
        let first = written
            .iter()
            .find(|&&w| w != shard)
            .copied()
            .unwrap_or(shard);
        Err(ProxyError::error(
            "0A000",
            format!(
                "this transaction already wrote on shard {} and would now write on shard {}, but two_phase_commit is off in the shard map",
                name(first),
                name(shard)
            ),
        )
        .with_hint(
            "set `two_phase_commit: true` for atomic multi-shard writes, or keep each transaction's writes on one shard",
        ))
    }

    /// Decision rows ready to be deleted (drained; see [`recovery::spawn`]).
    pub fn take_spent(&self) -> Vec<(usize, String)> {
        match self.inner.spent.lock() {
            Ok(mut guard) => std::mem::take(&mut *guard),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        }
    }

    /// Queues a decision row for deletion. Bounded: without a recovery
    /// task draining the queue, rows past the bound are left to recovery's
    /// sweep (it deletes decisions that no prepared part needs).
    fn push_spent(&self, shard: usize, group: String) {
        const MAX_SPENT: usize = 100_000;
        let mut guard = match self.inner.spent.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if guard.len() < MAX_SPENT {
            guard.push((shard, group));
        }
    }

    /// Takes in a recovery pass: preflight flags (with one warning per shard
    /// that turns unable to prepare), in-doubt gauge, spent rows to retry.
    pub fn after_recovery(&self, report: &RecoveryReport) {
        for &i in &report.settings_read {
            let disabled = report.prepare_disabled.contains(&i);
            let Some(flag) = self.inner.prepare_disabled.get(i) else {
                continue;
            };
            let was = flag.swap(disabled, Ordering::Relaxed);
            let Some(name) = self.inner.shards.get(i).map(|s| &s.name) else {
                continue;
            };
            if disabled && !was && self.inner.enabled {
                tracing::warn!(
                    shard = %name,
                    "shard {name} has max_prepared_transactions = 0: transactions that write on it and on another shard will fail; set max_prepared_transactions (e.g. to max_connections) in its postgresql.conf and restart it"
                );
            } else if !disabled && was {
                tracing::info!(shard = %name, "shard {name} now accepts prepared transactions");
            }
            if let Some(metrics) = &self.inner.metrics {
                metrics.set_prepared_transactions_disabled(i, disabled && self.inner.enabled);
            }
        }
        for &i in &report.tables_ready {
            if let Some(flag) = self.inner.table_ready.get(i) {
                flag.store(true, Ordering::Relaxed);
            }
        }
        for (shard, group) in &report.spent_left {
            self.push_spent(*shard, group.clone());
        }
        let in_doubt = i64::try_from(report.in_doubt()).unwrap_or(i64::MAX);
        self.inner
            .recovery_in_doubt
            .store(in_doubt, Ordering::Relaxed);
        self.refresh_in_doubt();
    }

    fn refresh_in_doubt(&self) {
        if let Some(metrics) = &self.inner.metrics {
            metrics.set_twophase_in_doubt(
                self.inner.background.load(Ordering::Relaxed)
                    + self.inner.recovery_in_doubt.load(Ordering::Relaxed),
            );
        }
    }

    fn count(&self, outcome: TwoPhaseOutcome) {
        if let Some(metrics) = &self.inner.metrics {
            metrics.twophase(outcome);
        }
    }

    fn shard_name(&self, shard: usize) -> &str {
        self.inner
            .shards
            .get(shard)
            .map_or("?", |s| s.name.as_str())
    }

    /// Makes sure the coordinator shard has the decision table (once per
    /// process and shard; recovery's first pass usually did it already).
    async fn ensure_table(&self, shard: usize) -> Result<(), ProxyError> {
        if self
            .inner
            .table_ready
            .get(shard)
            .is_some_and(|f| f.load(Ordering::Relaxed))
        {
            return Ok(());
        }
        let config = self
            .inner
            .shards
            .get(shard)
            .ok_or_else(|| ProxyError::error("XX000", format!("no shard #{shard}")))?;
        let fail = |e: &tokio_postgres::Error| {
            ProxyError::error(
                "08006",
                format!(
                    "shard {}: cannot create the two-phase commit decision table shardgate.tx_decisions: {}",
                    config.name,
                    recovery::describe(e)
                ),
            )
        };
        let client = connect_control(config, TWO_PHASE_APPLICATION, self.inner.connect_timeout)
            .await
            .map_err(|e| fail(&e))?;
        recovery::ensure_table(&client)
            .await
            .map_err(|e| fail(&e))?;
        if let Some(flag) = self.inner.table_ready.get(shard) {
            flag.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Resolves a prepared part on a fresh connection until it is done,
    /// without holding up anyone: `Some(commit)` when the outcome is known,
    /// `None` to ask the coordinator shard (outcome unknown to us).
    fn resolve_in_background(&self, shard: usize, gid: String, known: Option<bool>) {
        let this = self.clone();
        this.inner.background.fetch_add(1, Ordering::Relaxed);
        this.refresh_in_doubt();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                match this.resolve_once(shard, &gid, known).await {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(message) => tracing::warn!(
                        shard = %this.shard_name(shard),
                        "2PC: resolving {gid} failed, retrying in {}ms: {message}",
                        delay.as_millis()
                    ),
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            this.inner.background.fetch_sub(1, Ordering::Relaxed);
            this.refresh_in_doubt();
        });
    }

    /// One attempt of [`resolve_in_background`]; `Ok(true)` when finished.
    async fn resolve_once(
        &self,
        shard: usize,
        gid: &str,
        known: Option<bool>,
    ) -> Result<bool, String> {
        let timeout = self.inner.connect_timeout;
        let config = self
            .inner
            .shards
            .get(shard)
            .ok_or_else(|| format!("no shard #{shard}"))?;
        let commit = match known {
            Some(commit) => commit,
            None => {
                let parsed = parse_gid(gid).ok_or("not a shardgate gid")?;
                let coordinator = self
                    .inner
                    .shards
                    .iter()
                    .find(|s| s.name == parsed.coordinator)
                    .ok_or("unknown coordinator shard")?;
                let mut client = connect_control(coordinator, TWO_PHASE_APPLICATION, timeout)
                    .await
                    .map_err(|e| recovery::describe(&e))?;
                match recovery::probe(&mut client, parsed.group, Duration::from_secs(1))
                    .await
                    .map_err(|e| recovery::describe(&e))?
                {
                    Probe::Committed => true,
                    Probe::Absent => false,
                    Probe::InFlight => return Ok(false),
                    Probe::NoTable => return Err("the coordinator has no decision table".into()),
                }
            }
        };
        let client = connect_control(config, TWO_PHASE_APPLICATION, timeout)
            .await
            .map_err(|e| recovery::describe(&e))?;
        match recovery::finish(&client, gid, commit)
            .await
            .map_err(|e| recovery::describe(&e))?
        {
            Finished::Done | Finished::Gone => {
                tracing::info!(
                    shard = %config.name,
                    "2PC: {} {gid} in the background",
                    if commit { "committed" } else { "rolled back" }
                );
                Ok(true)
            }
            Finished::Busy => Ok(false),
        }
    }

    fn next_group(&self) -> String {
        let n = self.inner.counter.fetch_add(1, Ordering::Relaxed);
        format!("{GID_PREFIX}{}_{n}", self.inner.instance)
    }
}

/// Where one participant's transaction stands during a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Transaction block still open.
    Open,
    /// Prepared under its gid.
    Prepared,
    /// Ended (committed or rolled back); nothing left to do.
    Ended,
    /// The connection failed mid-statement: maybe prepared, maybe not.
    Unknown,
}

fn crash_point(point: &str) {
    static VALUE: OnceLock<Option<String>> = OnceLock::new();
    if VALUE
        .get_or_init(|| std::env::var(CRASH_ENV).ok())
        .as_deref()
        == Some(point)
    {
        eprintln!("shardgate: {CRASH_ENV}={point}: aborting now");
        std::process::abort();
    }
}

async fn pause_point(point: &str) {
    static VALUE: OnceLock<Option<(String, u64)>> = OnceLock::new();
    let value = VALUE.get_or_init(|| {
        let text = std::env::var(PAUSE_ENV).ok()?;
        let (at, ms) = text.split_once(':')?;
        Some((at.to_owned(), ms.parse().ok()?))
    });
    if let Some((at, ms)) = value {
        if at == point {
            tokio::time::sleep(Duration::from_millis(*ms)).await;
        }
    }
}

/// Runs `sql(i)` on every participant it returns `Some` for, in parallel.
async fn run_each<F>(
    participants: &mut [Participant<'_>],
    timeout: Duration,
    sql: F,
) -> Vec<(usize, Result<Vec<String>, ControlError>)>
where
    F: Fn(usize, &Participant<'_>) -> Option<String>,
{
    let jobs = participants
        .iter_mut()
        .enumerate()
        .filter_map(|(i, p)| sql(i, p).map(|text| (i, p, text)))
        .map(|(i, p, text)| async move { (i, control::run_within(p.conn, &text, timeout).await) });
    join_all(jobs).await
}

/// True when a COMMIT-like statement really committed: a COMMIT in an
/// aborted transaction block answers `ROLLBACK` without an error.
fn committed(result: &Result<Vec<String>, ControlError>, tag: &str) -> bool {
    matches!(result, Ok(tags) if tags.last().map(String::as_str) == Some(tag))
}

/// The client's error for a failed step on one shard.
fn step_error(result: Result<Vec<String>, ControlError>, shard: &str, doing: &str) -> ProxyError {
    match result {
        Err(ControlError::Server {
            sqlstate, message, ..
        }) if sqlstate == "55000" && message.contains("prepared transactions are disabled") => {
            prepare_disabled_error(shard)
        }
        Err(e) => e.to_proxy_error(),
        Ok(_) => ProxyError::error(
            "40000",
            format!("shard {shard}: the transaction was rolled back during {doing}"),
        ),
    }
}

fn prepare_disabled_error(shard: &str) -> ProxyError {
    ProxyError::error(
        "55000",
        format!(
            "shard {shard} cannot take part in a multi-shard write: prepared transactions are disabled there (max_prepared_transactions = 0)"
        ),
    )
    .with_hint(format!(
        "set max_prepared_transactions to a value above 0 (e.g. equal to max_connections) in the postgresql.conf of shard {shard} and restart that server"
    ))
}

fn rolled_back_everywhere(mut error: ProxyError) -> ProxyError {
    if error.detail.is_none() {
        error.detail = Some("shardgate rolled the transaction back on every shard".into());
    }
    error
}

/// Ends a client transaction with COMMIT on every participant: plain commit
/// or two-phase commit (see the module doc). On success every participant
/// connection is idle; on error the transaction is rolled back everywhere
/// (or, with 08007, resolved later) and connections that failed are marked
/// broken. Every participant must be inside an open transaction block.
pub async fn commit(
    coordinator: &TwoPhase,
    participants: &mut [Participant<'_>],
) -> Result<CommitOutcome, ProxyError> {
    if participants
        .iter()
        .any(|p| p.conn.transaction_status() == b'E')
    {
        rollback(participants).await;
        return Ok(CommitOutcome::RolledBack);
    }
    let timeout = coordinator.inner.step_timeout;
    let open = |p: &Participant<'_>| p.conn.transaction_status() != b'I';
    let writers: Vec<usize> = (0..participants.len())
        .filter(|&i| participants[i].wrote && open(&participants[i]))
        .collect();
    if writers.len() <= 1 {
        return plain_commit(participants, writers.first().copied(), timeout).await;
    }
    if !coordinator.enabled() {
        rollback(participants).await;
        let shards: Vec<usize> = writers.iter().map(|&i| participants[i].shard).collect();
        return Err(coordinator
            .may_write(&shards[..1], shards[1])
            .err()
            .unwrap_or_else(|| ProxyError::error("0A000", "two_phase_commit is off")));
    }
    let started = std::time::Instant::now();
    let outcome = two_phase_commit(coordinator, participants, &writers, timeout).await;
    if let Some(metrics) = &coordinator.inner.metrics {
        metrics.twophase_duration(started.elapsed());
    }
    outcome
}

/// 0 or 1 written shard: readers commit first, then the writer.
async fn plain_commit(
    participants: &mut [Participant<'_>],
    writer: Option<usize>,
    timeout: Duration,
) -> Result<CommitOutcome, ProxyError> {
    let readers = run_each(participants, timeout, |i, p| {
        (Some(i) != writer && p.conn.transaction_status() != b'I').then(|| "COMMIT".to_owned())
    })
    .await;
    let mut failure = None;
    for (i, result) in readers {
        if failure.is_none() && !committed(&result, "COMMIT") {
            let shard = participants[i].conn.shard_name().to_owned();
            failure = Some(step_error(result, &shard, "COMMIT"));
        }
    }
    let Some(w) = writer else {
        return match failure {
            Some(e) => Err(e),
            None => Ok(CommitOutcome::Committed {
                prepared: 0,
                background: 0,
            }),
        };
    };
    let conn = &mut *participants[w].conn;
    if let Some(error) = failure {
        let _ = control::run_within(conn, "ROLLBACK", timeout).await;
        return Err(rolled_back_everywhere(error));
    }
    let result = control::run_within(conn, "COMMIT", timeout).await;
    if committed(&result, "COMMIT") {
        return Ok(CommitOutcome::Committed {
            prepared: 0,
            background: 0,
        });
    }
    let shard = conn.shard_name().to_owned();
    Err(step_error(result, &shard, "COMMIT"))
}

async fn two_phase_commit(
    tp: &TwoPhase,
    participants: &mut [Participant<'_>],
    writers: &[usize],
    timeout: Duration,
) -> Result<CommitOutcome, ProxyError> {
    let coord = writers
        .iter()
        .copied()
        .min_by_key(|&i| participants[i].shard)
        .unwrap_or(writers[0]);
    let coord_shard = participants[coord].shard;
    let coord_name = participants[coord].conn.shard_name().to_owned();
    let group = tp.next_group();
    let gids: Vec<String> = participants
        .iter()
        .map(|p| gid(&group, p.shard, &coord_name))
        .collect();
    let mut state: Vec<State> = participants
        .iter()
        .map(|p| {
            if p.conn.transaction_status() == b'I' {
                State::Ended
            } else {
                State::Open
            }
        })
        .collect();
    let preparing: Vec<usize> = writers.iter().copied().filter(|&i| i != coord).collect();

    // Refusals that need no round trip.
    let refusal = if gids.iter().any(|g| g.len() > MAX_GID) {
        Some(ProxyError::error(
            "0A000",
            format!("shard name {coord_name:?} is too long for a two-phase commit identifier"),
        ))
    } else {
        // Any written shard known to be unable to prepare, the coordinator
        // included (it would not need to prepare, but "multi-shard writes
        // on that shard fail" is the rule users can predict).
        writers
            .iter()
            .map(|&i| participants[i].shard)
            .find(|&s| {
                tp.inner
                    .prepare_disabled
                    .get(s)
                    .is_some_and(|f| f.load(Ordering::Relaxed))
            })
            .map(|s| prepare_disabled_error(tp.shard_name(s)))
    };
    let refusal = match refusal {
        Some(e) => Some(e),
        None => tp.ensure_table(coord_shard).await.err(),
    };
    if let Some(error) = refusal {
        rollback(participants).await;
        tp.count(TwoPhaseOutcome::Aborted);
        return Err(rolled_back_everywhere(error));
    }

    // 1. The decision row (uncommitted: the coordinator's lease) and the
    //    readers' commits.
    // The decision must be durable before any COMMIT PREPARED: a client
    // (or server default) `synchronous_commit = off` is raised to `on` for
    // this one transaction (PREPARE and COMMIT PREPARED always flush).
    let insert = format!(
        "INSERT INTO shardgate.tx_decisions (gid_prefix) VALUES ({}); \
         SELECT set_config('synchronous_commit', 'on', true) WHERE current_setting('synchronous_commit') = 'off'",
        literal(&group)
    );
    let results = run_each(participants, timeout, |i, p| {
        if i == coord {
            Some(insert.clone())
        } else if !p.wrote && state[i] == State::Open {
            Some("COMMIT".to_owned())
        } else {
            None
        }
    })
    .await;
    let mut failure = None;
    for (i, result) in results {
        let ok = if i == coord {
            matches!(&result, Ok(tags) if tags.first().is_some_and(|t| t == "INSERT 0 1"))
        } else {
            committed(&result, "COMMIT")
        };
        if i != coord || !ok {
            state[i] = after(&result, participants[i].conn);
        }
        if i == coord
            && matches!(
                &result,
                Err(ControlError::Server {
                    sqlstate: "42P01",
                    ..
                })
            )
        {
            // Someone dropped the decision table: create it again next time.
            if let Some(flag) = tp.inner.table_ready.get(coord_shard) {
                flag.store(false, Ordering::Relaxed);
            }
        }
        if !ok && failure.is_none() {
            let shard = participants[i].conn.shard_name().to_owned();
            let doing = if i == coord {
                "recording the commit decision"
            } else {
                "COMMIT"
            };
            failure = Some(step_error(result, &shard, doing));
        }
    }
    if let Some(error) = failure {
        abort(tp, participants, &mut state, &gids, timeout).await;
        return Err(rolled_back_everywhere(error));
    }

    // 2. PREPARE the other writers.
    let results = run_each(participants, timeout, |i, _| {
        preparing
            .contains(&i)
            .then(|| format!("PREPARE TRANSACTION {}", literal(&gids[i])))
    })
    .await;
    let mut failure = None;
    for (i, result) in results {
        let ok = committed(&result, "PREPARE TRANSACTION");
        state[i] = if ok {
            State::Prepared
        } else {
            after(&result, participants[i].conn)
        };
        if !ok && failure.is_none() {
            let shard = participants[i].conn.shard_name().to_owned();
            failure = Some(step_error(result, &shard, "PREPARE TRANSACTION"));
        }
    }
    if let Some(error) = failure {
        abort(tp, participants, &mut state, &gids, timeout).await;
        return Err(rolled_back_everywhere(error));
    }
    crash_point("prepare");
    pause_point("prepare").await;

    // 3. The decision: the coordinator's local commit.
    let result = control::run_within(participants[coord].conn, "COMMIT", timeout).await;
    if !committed(&result, "COMMIT") {
        if matches!(&result, Err(e) if e.outcome_unknown()) {
            // The COMMIT may or may not have happened: ask the coordinator
            // shard later instead of guessing.
            for &i in &preparing {
                tp.resolve_in_background(participants[i].shard, gids[i].clone(), None);
            }
            tp.count(TwoPhaseOutcome::InDoubt);
            let cause = result.err().map(|e| e.to_string()).unwrap_or_default();
            return Err(ProxyError::error(
                "08007",
                format!(
                    "the outcome of this transaction is unknown: the connection to coordinator shard {coord_name} failed during COMMIT ({cause})"
                ),
            )
            .with_detail(
                "shardgate finishes it on every shard: committed if the coordinator's commit went through, else rolled back",
            ));
        }
        state[coord] = State::Ended;
        let error = step_error(result, &coord_name, "COMMIT");
        abort(tp, participants, &mut state, &gids, timeout).await;
        return Err(rolled_back_everywhere(error));
    }
    state[coord] = State::Ended;
    crash_point("decision");
    pause_point("decision").await;

    // 4. COMMIT PREPARED; what fails is finished in the background.
    let results = run_each(participants, timeout, |i, _| {
        (state[i] == State::Prepared).then(|| format!("COMMIT PREPARED {}", literal(&gids[i])))
    })
    .await;
    let mut background = 0;
    for (i, result) in results {
        let done = match &result {
            Ok(_) => true,
            Err(ControlError::Server { sqlstate, .. }) => *sqlstate == "42704",
            Err(_) => false,
        };
        if !done {
            let message = result.err().map(|e| e.to_string()).unwrap_or_default();
            tracing::warn!(
                "2PC: COMMIT PREPARED {} failed ({message}); retrying in the background",
                gids[i]
            );
            tp.resolve_in_background(participants[i].shard, gids[i].clone(), Some(true));
            background += 1;
        }
    }
    if background == 0 {
        tp.push_spent(coord_shard, group);
        tp.count(TwoPhaseOutcome::Committed);
    } else {
        tp.count(TwoPhaseOutcome::InDoubt);
    }
    Ok(CommitOutcome::Committed {
        prepared: preparing.len(),
        background,
    })
}

/// A participant's state after a statement that did not do what we wanted.
fn after(result: &Result<Vec<String>, ControlError>, conn: &BackendConnection) -> State {
    match result {
        Err(e) if e.outcome_unknown() => State::Unknown,
        _ if conn.transaction_status() == b'I' => State::Ended,
        _ => State::Open,
    }
}

/// Rolls back everything before the decision: `ROLLBACK` where the block is
/// open, `ROLLBACK PREPARED` where prepared. The coordinator never sent
/// COMMIT, so the outcome is abort; what cannot be rolled back now is
/// rolled back in the background.
async fn abort(
    tp: &TwoPhase,
    participants: &mut [Participant<'_>],
    state: &mut [State],
    gids: &[String],
    timeout: Duration,
) {
    tp.count(TwoPhaseOutcome::Aborted);
    let results = run_each(participants, timeout, |i, _| {
        match state[i] {
            State::Open => Pending::Open,
            State::Prepared => Pending::Prepared(&gids[i]),
            State::Ended | State::Unknown => Pending::Idle,
        }
        .rollback_sql()
    })
    .await;
    for (i, result) in results {
        let prepared = state[i] == State::Prepared;
        state[i] = State::Ended;
        if prepared && result.is_err() {
            state[i] = State::Unknown;
        }
    }
    for (i, s) in state.iter().enumerate() {
        // An open block on a lost connection dies with the session; a
        // prepared one, or one that may have prepared, must be rolled back.
        if *s == State::Unknown {
            tp.resolve_in_background(participants[i].shard, gids[i].clone(), Some(false));
        }
    }
}

/// Ends a client transaction with ROLLBACK on every participant that is in a
/// transaction block. Connections that fail are marked broken (their
/// transaction dies with the session), so the pool discards them.
pub async fn rollback(participants: &mut [Participant<'_>]) {
    let results = run_each(participants, STEP_TIMEOUT, |_, p| {
        (p.conn.transaction_status() != b'I').then(|| "ROLLBACK".to_owned())
    })
    .await;
    for (i, result) in results {
        if let Err(e) = result {
            tracing::warn!("ROLLBACK failed: {e}");
            participants[i].conn.mark_broken();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_round_trip() {
        let g = gid("shardgate_tx_00ff00ff00ff00ff_42", 3, "s_1");
        assert_eq!(g, "shardgate_tx_00ff00ff00ff00ff_42_3_s_1");
        let parsed = parse_gid(&g).unwrap();
        assert_eq!(parsed.group, "shardgate_tx_00ff00ff00ff00ff_42");
        assert_eq!(parsed.participant, 3);
        assert_eq!(parsed.coordinator, "s_1");
        assert_eq!(parse_gid("shardgate_mig_abc_1_s0"), None);
        assert_eq!(parse_gid("shardgate_tx_zz_1_2_s0"), None);
        assert_eq!(parse_gid("shardgate_tx_ab_1_2_"), None);
        assert_eq!(parse_gid("shardgate_tx_ab_1_x_s0"), None);
    }

    proptest::proptest! {
        #[test]
        fn parse_gid_never_panics(text in ".{0,80}") {
            let _ = parse_gid(&text);
            let _ = parse_gid(&format!("{GID_PREFIX}{text}"));
        }
    }
}
