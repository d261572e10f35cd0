//! Recovery of client transactions left prepared by a two-phase commit.
//!
//! A coordinator that crashes (or loses a shard) can leave prepared
//! transactions `shardgate_tx_…` behind (see [`super::twophase`] for the
//! protocol and the gid format). Recovery, at startup and then every
//! `interval`, over tokio-postgres connections to every shard (the control
//! plane, ARCHITECTURE §2.3), resolves each of them:
//!
//! * **commit** when the group's decision row exists on the coordinator shard
//!   named in the gid;
//! * **roll back** when it does not exist *and can never appear*;
//! * otherwise leave it: its coordinator is still deciding.
//!
//! ## Why "can never appear" is decided safely, with any number of instances
//!
//! The coordinator inserts the decision row inside the client's transaction
//! on the coordinator shard *before* it sends any `PREPARE TRANSACTION`, and
//! commits that transaction only after every participant prepared. So when a
//! prepared transaction of group G exists, the coordinator's transaction T
//! has already inserted G's row (uncommitted), and that row is the
//! coordinator's lease: T can still commit exactly as long as T is open.
//!
//! Recovery asks with a *probe*: `INSERT` of G's row with `ON CONFLICT DO
//! NOTHING` in its own transaction, under a short `lock_timeout`, then
//! `ROLLBACK` (nothing is ever written). Postgres makes an insert that
//! conflicts with an uncommitted row wait for the inserting transaction:
//!
//! * T committed: the insert conflicts, 0 rows → the decision is commit;
//! * T still open: the wait hits `lock_timeout` (55P03) → in flight, leave it
//!   (a live coordinator, or one whose backend has not noticed yet that the
//!   proxy died; it is retried on the next pass);
//! * T rolled back, or its session died (Postgres aborts it): the insert
//!   succeeds, 1 row → no decision exists, and none can appear, because T
//!   was the only transaction that would ever insert G (gids are never
//!   reused: a random instance id per process plus a counter), and it is
//!   over. → roll back.
//!
//! No clocks, leases or instance registry are involved, so two recoveries,
//! or a recovery and a live coordinator of another instance, can run side by
//! side: each only acts on an outcome that is already fixed in the
//! coordinator's database. Racing resolvers of the same gid are harmless:
//! the loser gets 42704 (gone) or 55000 "is busy" (Postgres' code for a
//! prepared transaction another session is finishing) and moves on.
//!
//! `min_age` only spares live transactions the probe's wait; safety does not
//! depend on it.
//!
//! ## Decision rows and the migrator
//!
//! Client transactions use their own table, `shardgate.tx_decisions`, and
//! their own gid family `shardgate_tx_`; this module never touches
//! `shardgate_mig_…` gids nor the migrator's `shardgate.decisions`, and the
//! migrator's `recover` only touches `shardgate_mig_…` gids. A separate table
//! is needed because `migrate recover` empties `shardgate.decisions`
//! wholesale, which would erase the decision of a committed client
//! transaction whose `COMMIT PREPARED` is still pending and make it look
//! aborted. Decision rows are deleted when every participant has committed
//! (by the coordinator, in batches) or, after a crash, by a pass that reached
//! every shard and found no prepared transaction of that group left: the
//! rows were read before the scan, and a group's prepares all happen before
//! its decision commits, so none can appear later.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::future::join_all;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::twophase::{parse_gid, GID_PREFIX};
use crate::backend::{connect_control, TWO_PHASE_APPLICATION};
use crate::config::ShardConfig;

/// Creates the decision table. The advisory transaction lock serialises
/// concurrent creators (two `CREATE … IF NOT EXISTS` can still collide).
/// Committed synchronously: a table lost in a crash would turn prepared
/// parts into "no decision table, cannot decide" (see [`Probe::NoTable`]).
const DECISION_TABLE_SQL: &str = "
BEGIN;
SET LOCAL synchronous_commit = on;
SELECT pg_advisory_xact_lock(7526752186389689716);
CREATE SCHEMA IF NOT EXISTS shardgate;
CREATE TABLE IF NOT EXISTS shardgate.tx_decisions (
    gid_prefix text PRIMARY KEY,
    decided_at timestamptz NOT NULL DEFAULT now()
);
COMMIT;
";

/// Knobs of recovery.
#[derive(Debug, Clone)]
pub struct RecoveryOptions {
    /// Time between passes of [`spawn`].
    pub interval: Duration,
    /// Prepared transactions younger than this are left alone this pass
    /// (they are almost always in flight; see the module doc).
    pub min_age: Duration,
    /// How long the probe waits for an open coordinator transaction.
    pub lock_timeout: Duration,
    pub connect_timeout: Duration,
    /// Create `shardgate.tx_decisions` on shards that lack it (so the first
    /// multi-shard commit does not pay for it).
    pub create_tables: bool,
}

impl Default for RecoveryOptions {
    fn default() -> Self {
        RecoveryOptions {
            interval: Duration::from_secs(10),
            min_age: Duration::from_secs(2),
            lock_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
            create_tables: true,
        }
    }
}

/// What one pass did. Entries are (shard name, gid).
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    pub committed: Vec<(String, String)>,
    pub rolled_back: Vec<(String, String)>,
    /// Left alone: the coordinator's transaction is still open, or another
    /// session is finishing the gid right now.
    pub in_flight: Vec<(String, String)>,
    /// Left alone: prepared less than `min_age` ago.
    pub young: Vec<(String, String)>,
    /// Not decidable now (coordinator unreachable or unknown, errors).
    pub unresolved: Vec<(String, String, String)>,
    /// Shards that could not be reached or read: (shard, message).
    pub errors: Vec<(String, String)>,
    /// Shard indexes with `max_prepared_transactions = 0`.
    pub prepare_disabled: Vec<usize>,
    /// Shard indexes whose setting was read (the others are unknown).
    pub settings_read: Vec<usize>,
    /// Shard indexes where `shardgate.tx_decisions` was created or found.
    pub tables_ready: Vec<usize>,
    pub decisions_deleted: u64,
    /// Spent decision rows handed in that could not be deleted yet.
    pub spent_left: Vec<(usize, String)>,
}

impl RecoveryReport {
    /// Prepared transactions still waiting for an outcome after this pass.
    pub fn in_doubt(&self) -> usize {
        self.in_flight.len() + self.unresolved.len()
    }
}

/// The decision of a group as seen by a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    Committed,
    /// No decision exists and none can appear.
    Absent,
    /// The coordinator's transaction is still open.
    InFlight,
    /// The coordinator has no decision table. Its transaction cannot be
    /// open (it would hold a lock that blocks DROP TABLE), but a decision it
    /// committed may have been dropped with the table: nothing is concluded,
    /// the parts stay prepared for an operator.
    NoTable,
}

/// What `COMMIT PREPARED` / `ROLLBACK PREPARED` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finished {
    Done,
    /// The gid does not exist (any more): someone else finished it.
    Gone,
    /// Another session is finishing it right now (55000 "is busy"; 55006
    /// accepted too).
    Busy,
}

/// The server's message with its SQLSTATE, rather than "db error".
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

async fn table_exists(client: &Client) -> Result<bool, tokio_postgres::Error> {
    client
        .query_one(
            "SELECT to_regclass('shardgate.tx_decisions') IS NOT NULL",
            &[],
        )
        .await?
        .try_get(0)
}

/// Creates `shardgate.tx_decisions` if it is missing.
pub(crate) async fn ensure_table(client: &Client) -> Result<(), tokio_postgres::Error> {
    if table_exists(client).await? {
        return Ok(());
    }
    let result = client.batch_execute(DECISION_TABLE_SQL).await;
    if result.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
        // The migrator creates schema `shardgate` under another lock; a
        // collision with it is resolved by trying once more.
        if table_exists(client).await? {
            return Ok(());
        }
        client.batch_execute(DECISION_TABLE_SQL).await?;
    }
    Ok(())
}

/// Asks the coordinator shard whether `group` is decided (see the module
/// doc). Writes nothing.
pub(crate) async fn probe(
    client: &mut Client,
    group: &str,
    lock_timeout: Duration,
) -> Result<Probe, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = {}",
        lock_timeout.as_millis().max(1)
    ))
    .await?;
    let outcome = tx
        .execute(
            "INSERT INTO shardgate.tx_decisions (gid_prefix) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&group],
        )
        .await;
    // Dropping `tx` would also roll back, but asynchronously.
    let _ = tx.rollback().await;
    match outcome {
        Ok(0) => Ok(Probe::Committed),
        Ok(_) => Ok(Probe::Absent),
        Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => Ok(Probe::InFlight),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Ok(Probe::NoTable),
        Err(e) => Err(e),
    }
}

/// `COMMIT PREPARED` or `ROLLBACK PREPARED` of `gid` on this shard.
pub(crate) async fn finish(
    client: &Client,
    gid: &str,
    commit: bool,
) -> Result<Finished, tokio_postgres::Error> {
    let verb = if commit { "COMMIT" } else { "ROLLBACK" };
    let sql = format!("{verb} PREPARED {}", super::control::literal(gid));
    match client.batch_execute(&sql).await {
        Ok(()) => Ok(Finished::Done),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => Ok(Finished::Gone),
        Err(e)
            if e.code() == Some(&SqlState::OBJECT_IN_USE)
                || e.code() == Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE) =>
        {
            Ok(Finished::Busy)
        }
        Err(e) => Err(e),
    }
}

/// This family's prepared transactions in the shard's database, with their
/// age in seconds (by the shard's own clock).
async fn prepared(client: &Client) -> Result<Vec<(String, f64)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT gid, extract(epoch FROM now() - prepared)::float8 FROM pg_prepared_xacts \
             WHERE database = current_database() AND starts_with(gid, $1) ORDER BY gid",
            &[&GID_PREFIX],
        )
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

async fn decisions(client: &Client) -> Result<HashSet<String>, tokio_postgres::Error> {
    if !table_exists(client).await? {
        return Ok(HashSet::new());
    }
    let rows = client
        .query("SELECT gid_prefix FROM shardgate.tx_decisions", &[])
        .await?;
    rows.iter().map(|r| r.try_get(0)).collect()
}

async fn delete_decisions(
    client: &Client,
    groups: &[String],
) -> Result<u64, tokio_postgres::Error> {
    if groups.is_empty() {
        return Ok(0);
    }
    client
        .execute(
            "DELETE FROM shardgate.tx_decisions WHERE gid_prefix = ANY($1)",
            &[&groups],
        )
        .await
}

async fn max_prepared(client: &Client) -> Result<i64, tokio_postgres::Error> {
    let value: String = client
        .query_one("SELECT current_setting('max_prepared_transactions')", &[])
        .await?
        .try_get(0)?;
    Ok(value.trim().parse().unwrap_or(0))
}

/// One recovery pass over `shards` (the whole shard map, in map order).
/// `spent` are decision rows (coordinator shard index, group) whose
/// participants have all committed; they are deleted here. Never fails as a
/// whole: per-shard problems are in the report.
pub async fn recover_once(
    shards: &[ShardConfig],
    opts: &RecoveryOptions,
    spent: Vec<(usize, String)>,
) -> RecoveryReport {
    let mut report = RecoveryReport::default();
    let mut clients: Vec<Option<Client>> = join_all(
        shards
            .iter()
            .map(|s| connect_control(s, TWO_PHASE_APPLICATION, opts.connect_timeout)),
    )
    .await
    .into_iter()
    .zip(shards)
    .map(|(result, shard)| match result {
        Ok(client) => Some(client),
        Err(e) => {
            report.errors.push((shard.name.clone(), describe(&e)));
            None
        }
    })
    .collect();

    // Settings, tables and decisions first: decisions must be read before
    // the prepared transactions are listed (see "Decision rows").
    let mut decided: Vec<Option<HashSet<String>>> = vec![None; shards.len()];
    for (i, slot) in clients.iter().enumerate() {
        let Some(client) = slot else { continue };
        let step = async {
            match max_prepared(client).await {
                Ok(n) => {
                    report.settings_read.push(i);
                    if n == 0 {
                        report.prepare_disabled.push(i);
                    }
                }
                Err(e) => return Err(e),
            }
            if opts.create_tables {
                ensure_table(client).await?;
            }
            Ok((table_exists(client).await?, decisions(client).await?))
        };
        match step.await {
            Ok((table, set)) => {
                if table {
                    report.tables_ready.push(i);
                }
                decided[i] = Some(set);
            }
            Err(e) => report.errors.push((shards[i].name.clone(), describe(&e))),
        }
    }

    let mut scans: Vec<Option<Vec<(String, f64)>>> = vec![None; shards.len()];
    for (i, slot) in clients.iter().enumerate() {
        let Some(client) = slot else { continue };
        match prepared(client).await {
            Ok(list) => scans[i] = Some(list),
            Err(e) => report.errors.push((shards[i].name.clone(), describe(&e))),
        }
    }

    // Groups that still have a prepared transaction after this pass.
    let mut remaining: HashSet<String> = HashSet::new();
    let mut probes: HashMap<String, Probe> = HashMap::new();
    let min_age = opts.min_age.as_secs_f64();
    for i in 0..shards.len() {
        let Some(list) = scans[i].take() else {
            continue;
        };
        for (gid, age) in list {
            let participant = shards[i].name.clone();
            let Some(parsed) = parse_gid(&gid) else {
                remaining.insert(gid.clone());
                report
                    .unresolved
                    .push((participant, gid, "not a shardgate gid".into()));
                continue;
            };
            let group = parsed.group.to_owned();
            if age < min_age {
                remaining.insert(group);
                report.young.push((participant, gid));
                continue;
            }
            let Some(coordinator) = shards.iter().position(|s| s.name == parsed.coordinator) else {
                remaining.insert(group);
                report.unresolved.push((
                    participant,
                    gid.clone(),
                    format!(
                        "its coordinator shard {:?} is not in the shard map",
                        parsed.coordinator
                    ),
                ));
                continue;
            };
            let decision = match probes.get(&group) {
                Some(p) => Ok(*p),
                None if decided[coordinator]
                    .as_ref()
                    .is_some_and(|d| d.contains(&group)) =>
                {
                    Ok(Probe::Committed)
                }
                None => match clients[coordinator].as_mut() {
                    Some(client) => probe(client, &group, opts.lock_timeout)
                        .await
                        .map_err(|e| describe(&e)),
                    None => Err(format!(
                        "coordinator shard {} is unreachable",
                        shards[coordinator].name
                    )),
                },
            };
            let commit = match decision {
                Ok(p) => {
                    probes.insert(group.clone(), p);
                    match p {
                        Probe::Committed => true,
                        Probe::Absent => false,
                        Probe::InFlight => {
                            remaining.insert(group);
                            report.in_flight.push((participant, gid));
                            continue;
                        }
                        Probe::NoTable => {
                            remaining.insert(group);
                            report.unresolved.push((
                                participant,
                                gid,
                                format!(
                                    "coordinator shard {} has no shardgate.tx_decisions table",
                                    shards[coordinator].name
                                ),
                            ));
                            continue;
                        }
                    }
                }
                Err(message) => {
                    remaining.insert(group);
                    report.unresolved.push((participant, gid, message));
                    continue;
                }
            };
            let Some(client) = clients[i].as_ref() else {
                continue;
            };
            match finish(client, &gid, commit).await {
                Ok(Finished::Done) => {
                    tracing::info!(
                        shard = %participant,
                        "2PC recovery: {} {gid}",
                        if commit { "committed" } else { "rolled back" }
                    );
                    if commit {
                        report.committed.push((participant, gid));
                    } else {
                        report.rolled_back.push((participant, gid));
                    }
                }
                Ok(Finished::Gone) => {}
                Ok(Finished::Busy) => {
                    remaining.insert(group);
                    report.in_flight.push((participant, gid));
                }
                Err(e) => {
                    remaining.insert(group);
                    report.unresolved.push((participant, gid, describe(&e)));
                }
            }
        }
    }

    // Spent rows handed in by the coordinator: their participants committed.
    let mut by_shard: HashMap<usize, Vec<String>> = HashMap::new();
    for (shard, group) in spent {
        by_shard.entry(shard).or_default().push(group);
    }
    for (shard, groups) in by_shard {
        let deleted = match clients.get(shard).and_then(Option::as_ref) {
            Some(client) => delete_decisions(client, &groups).await.ok(),
            None => None,
        };
        match deleted {
            Some(n) => report.decisions_deleted += n,
            None => report
                .spent_left
                .extend(groups.into_iter().map(|g| (shard, g))),
        }
    }

    // Leftover rows of crashed coordinators: only when every shard was
    // scanned, so "no prepared transaction left" is known everywhere.
    let complete = report.errors.is_empty() && clients.iter().all(Option::is_some);
    if complete {
        for (i, set) in decided.iter().enumerate() {
            let Some(set) = set else { continue };
            let done: Vec<String> = set
                .iter()
                .filter(|g| !remaining.contains(*g))
                .cloned()
                .collect();
            if let Some(client) = clients[i].as_ref() {
                match delete_decisions(client, &done).await {
                    Ok(n) => report.decisions_deleted += n,
                    Err(e) => report.errors.push((shards[i].name.clone(), describe(&e))),
                }
            }
        }
    }
    report
}

/// Runs recovery now and then every `opts.interval` for the lifetime of the
/// returned task (abort it to stop): resolves prepared transactions, deletes
/// spent decision rows, and refreshes the preflight (`max_prepared_transactions`
/// per shard: one warning when a shard cannot prepare while 2PC is on, the
/// `prepared_transactions_disabled` metric) and the in-doubt gauge.
pub fn spawn(
    twophase: super::twophase::TwoPhase,
    opts: RecoveryOptions,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let spent = twophase.take_spent();
            let report = recover_once(twophase.shards(), &opts, spent).await;
            twophase.after_recovery(&report);
            for (shard, message) in &report.errors {
                tracing::warn!(shard = %shard, "2PC recovery could not check this shard: {message}");
            }
            for (shard, gid, why) in &report.unresolved {
                tracing::warn!(shard = %shard, "2PC recovery left {gid} prepared: {why}");
            }
            tokio::time::sleep(opts.interval).await;
        }
    })
}
