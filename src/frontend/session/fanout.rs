//! Statements that need several shards: the session gathers one backend per
//! target shard (the transaction's own where it has them), hands them to
//! the fan-out executor (`executor::fanout`), and keeps Postgres' semantics
//! around it:
//!
//! * outside a transaction, a statement that may write on several shards
//!   runs in an implicit transaction on each and commits with two-phase
//!   commit, so it is atomic like one Postgres statement; its answer is held
//!   until the commit decided (Postgres, too, reports a failed commit
//!   instead of the statement's CommandComplete);
//! * inside a transaction the shards join it (with its BEGIN);
//! * statements that cannot run in a transaction block (VACUUM, CREATE
//!   INDEX CONCURRENTLY, …) run on each shard as they are.
//!
//! In the extended protocol the decision is made at Bind; the portal is
//! kept here and run at Execute (BindComplete is answered at once, the
//! RowDescription of a Describe(portal) comes with the rows).

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::BytesMut;

use super::portal::{ChannelWriter, LiveContext, LiveEnd, SuspendedPortal};
use super::{Attach, Attached, Session};
use crate::executor::control;
use crate::executor::fanout::{self, FanoutProtocol, FanoutRequest, ShardConn};
use crate::executor::twophase::{self, CommitOutcome, Participant};
use crate::metrics;
use crate::protocol::messages::{self, Bind};
use crate::protocol::synth::{self, ProxyError};
use crate::router::{Route, Router};

/// An extended-protocol portal whose statement needs several shards,
/// waiting for its Execute.
#[derive(Debug)]
pub(super) struct PendingPortal {
    name: String,
    route: Route,
    sql: String,
    param_types: Vec<u32>,
    /// The client's Bind body (portal, statement, formats, values).
    bind: Vec<u8>,
    describe: bool,
    /// The result columns the client was told for the bound statement
    /// (`protocol::messages::ResultShape`): the fan-out's must match.
    expected_shape: Option<u64>,
    /// Execute's row limit (0: all rows).
    max_rows: i32,
    /// COMMIT (true) or ROLLBACK (false) of a multi-shard transaction
    /// instead of a fan-out statement (see `Session::bind_end_multi`).
    end: Option<bool>,
    /// A savepoint command or SET (its text, in `sql`) run on every shard
    /// of a multi-shard transaction (see `Session::bind_end_multi`).
    every_participant: bool,
    /// Transaction control shardgate answers itself (see [`Held`]).
    held: Option<Held>,
    /// Bound inside a transaction block and kept past a Sync (asyncpg
    /// binds a cursor's portal in one batch and fetches in the next); it
    /// ends with the transaction.
    kept: bool,
}

/// Extended-protocol transaction control with no backend attached,
/// answered by shardgate at Execute like its simple-query form.
#[derive(Debug)]
pub(super) enum Held {
    /// BEGIN (its SQL), held back until a statement names a shard.
    Begin(String),
    /// COMMIT (true) / ROLLBACK of a held-back BEGIN that reached no shard.
    EndDeferred(bool),
    /// `DEALLOCATE ALL` in a transaction over several shards (psycopg sends
    /// it after DDL): the client's statements go; the shards' copies stay
    /// shardgate's cache.
    DeallocateAll,
}

impl PendingPortal {
    /// The portal of an extended-protocol COMMIT / ROLLBACK that ends a
    /// multi-shard transaction at its Execute.
    pub(super) fn end(portal: &str, commit: bool) -> PendingPortal {
        PendingPortal {
            name: portal.to_string(),
            route: Route::NoShard,
            sql: String::new(),
            param_types: Vec::new(),
            bind: Vec::new(),
            describe: false,
            expected_shape: None,
            max_rows: 0,
            end: Some(commit),
            every_participant: false,
            held: None,
            kept: false,
        }
    }

    /// The portal of a savepoint command or SET that runs on every shard of
    /// a multi-shard transaction at its Execute.
    pub(super) fn every_participant(portal: &str, sql: &str) -> PendingPortal {
        PendingPortal {
            sql: sql.to_string(),
            end: None,
            every_participant: true,
            ..PendingPortal::end(portal, false)
        }
    }

    /// The portal of transaction control answered by shardgate.
    pub(super) fn held(portal: &str, held: Held) -> PendingPortal {
        PendingPortal {
            held: Some(held),
            ..PendingPortal::end(portal, false)
        }
    }

    pub(super) fn is(&self, portal: &str) -> bool {
        self.name == portal
    }

    pub(super) fn describe(&mut self) {
        self.describe = true;
    }

    pub(super) fn set_max_rows(&mut self, max_rows: i32) {
        self.max_rows = max_rows;
    }

    /// At Sync: a statement's portal inside a transaction block stays
    /// (true); anything else ends.
    pub(super) fn keep_at_sync(&mut self, in_block: bool) -> bool {
        self.kept =
            in_block && self.end.is_none() && self.held.is_none() && !self.every_participant;
        self.kept
    }

    pub(super) fn kept(&self) -> bool {
        self.kept
    }
}

/// The shards a multi-shard route runs on.
fn target_shards(route: &Route, shard_count: usize) -> Vec<usize> {
    match route {
        Route::Single(s) => vec![*s],
        Route::Shards(set) => set.iter().copied().collect(),
        Route::Split { rows_by_shard } => rows_by_shard.keys().copied().collect(),
        _ => (0..shard_count).collect(),
    }
}

/// Statements Postgres refuses inside a transaction block: they run on each
/// shard on their own. `CONCURRENTLY` counts only in the utility statements
/// that have it (an INSERT into a column named `concurrently` is a write
/// like any other and needs the implicit two-phase commit).
fn runs_outside_transactions(sql: &str) -> bool {
    let mut words = sql
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty());
    let first = words.next().unwrap_or("");
    let second = words.next().unwrap_or("");
    let is = |w: &str, k: &str| w.eq_ignore_ascii_case(k);
    is(first, "vacuum")
        || (is(first, "create") || is(first, "drop"))
            && (is(second, "database") || is(second, "tablespace"))
        || (is(first, "alter") && is(second, "system"))
        || ["create", "drop", "reindex", "refresh", "alter"]
            .iter()
            .any(|k| is(first, k))
            && sql
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .any(|w| w.eq_ignore_ascii_case("concurrently"))
}

/// Whether a query string of several statements contains transaction
/// control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT, PREPARE TRANSACTION, …).
/// Sent to several shards as one string, each shard would begin and commit
/// on its own, outside shardgate's two-phase commit: refused instead.
/// `BEGIN ATOMIC … END` function bodies are not transaction control.
fn embeds_transaction_control(sql: &str) -> bool {
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::tokenizer::{Token, Tokenizer};
    let body = sql.trim_end().trim_end_matches(';');
    if !body.contains(';') {
        return false;
    }
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize() else {
        // Unreadable: the shards will say what is wrong with it.
        return false;
    };
    let mut words = tokens.iter().filter_map(|t| match t {
        Token::Word(w) => Some(Some(w.value.to_ascii_uppercase())),
        Token::SemiColon => Some(None),
        Token::Whitespace(_) => None,
        _ => Some(Some(String::new())),
    });
    let mut at_start = true;
    let mut atomic_depth = 0usize;
    let mut previous = String::new();
    while let Some(word) = words.next() {
        let Some(word) = word else {
            at_start = atomic_depth == 0;
            continue;
        };
        if word == "ATOMIC" && previous == "BEGIN" {
            atomic_depth += 1;
        } else if atomic_depth > 0 && word == "END" {
            atomic_depth -= 1;
        } else if at_start && atomic_depth == 0 {
            let control = match word.as_str() {
                "BEGIN" | "COMMIT" | "END" | "ROLLBACK" | "ABORT" | "SAVEPOINT" | "RELEASE" => true,
                "START" | "PREPARE" => {
                    matches!(words.clone().next(), Some(Some(next)) if next == "TRANSACTION")
                }
                _ => false,
            };
            if control {
                return true;
            }
        }
        at_start = false;
        previous = word;
    }
    false
}

fn transaction_control_in_multi_shard_string() -> ProxyError {
    ProxyError::error(
        "0A000",
        "this query string mixes transaction control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT, …) \
         with statements for several shards: each shard would commit on its own, so shardgate \
         refuses it",
    )
    .with_hint(
        "send BEGIN, the statements and COMMIT as separate queries; shardgate then commits \
         every shard atomically with two-phase commit",
    )
}

impl Session {
    /// A simple query that needs several shards.
    pub(super) async fn fanout_query(
        &mut self,
        router: &Router,
        sql: &str,
        route: Route,
    ) -> Attach {
        if !self.queue.is_empty() {
            // Its answers follow the earlier ones.
            return Attach::Wait;
        }
        if self.status == b'E' {
            // A failed transaction answers 25P02 from its current backend.
            return self.attach_for(None, false).await;
        }
        self.run_fanout(router, sql, route, None).await;
        let mut ready = BytesMut::new();
        synth::ready_for_query(&mut ready, self.status);
        self.queue.local(ready, &mut self.client_out);
        Attach::Answered
    }

    /// Bind of a statement that needs several shards: kept until Execute.
    pub(super) fn bind_fanout(
        &mut self,
        bind: &Bind<'_>,
        route: Route,
        sql: &str,
        param_types: &[u8],
    ) -> Attach {
        // A write on several shards after a statement of the same batch on
        // the attached backend: that statement's implicit transaction
        // becomes the batch's, so this write and it commit (or roll back)
        // together at the Sync, as in one Postgres.
        if self.statement_writes
            && self.backend.is_some()
            && !self.implicit_multi
            && self.status == b'I'
            && self.queue.batch_open()
            && !self.tainted
            && self.mode == crate::config::PoolMode::Transaction
            && self.shared.twophase.enabled()
            && !runs_outside_transactions(sql)
        {
            self.begin_batch_transaction();
        }
        // Answers owed by a backend come first (in an open batch it is
        // asked for them with a Flush): the fan-out runs on that backend too.
        if !self.queue.is_empty() && self.backend.is_some() {
            if self.queue.batch_open() && !self.batch_flushed {
                synth::flush(&mut self.backend_out);
                self.batch_flushed = true;
            }
            return Attach::Wait;
        }
        self.batch_flushed = false;
        if self.queue.backend_skipping() {
            // An earlier statement of this batch failed on the backend:
            // Postgres skips the rest of the batch up to its Sync, and so
            // must the fan-out (psycopg's pipeline waited forever).
            self.skip_until_sync = true;
            return Attach::Failed;
        }
        let types = param_types
            .get(2..)
            .unwrap_or_default()
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let mut frame = BytesMut::new();
        bind.encode_as(bind.statement, &mut frame);
        let expected_shape = self
            .statements
            .expected_shape(bind.statement)
            .map(|e| e.shape);
        self.pending_portal = Some(PendingPortal {
            expected_shape,
            name: bind.portal.to_string(),
            route,
            sql: sql.to_string(),
            param_types: types,
            bind: frame.get(5..).unwrap_or_default().to_vec(),
            describe: false,
            max_rows: 0,
            end: None,
            every_participant: false,
            held: None,
            kept: false,
        });
        let mut out = BytesMut::new();
        synth::bind_complete(&mut out);
        self.queue.local(out, &mut self.client_out);
        Attach::Answered
    }

    /// Execute of a kept multi-shard portal.
    pub(super) async fn execute_fanout(&mut self) {
        let Some(portal) = self.pending_portal.take() else {
            return;
        };
        if !self.queue.is_empty() {
            // Every earlier answer of this batch is local (Parse/Bind
            // answered by shardgate) or from a backend that finished before
            // the Bind; release them first.
            self.queue.after(&mut self.client_out);
        }
        if let Some(held) = portal.held {
            self.execute_held(held, portal.describe);
            return;
        }
        if let Some(commit) = portal.end {
            self.finish_multi(commit, Some(portal.describe)).await;
            return;
        }
        if portal.every_participant {
            self.on_every_participant(&portal.sql, Some(portal.describe))
                .await;
            return;
        }
        if self.status == b'E' {
            self.report(
                ProxyError::error(
                    "25P02",
                    "current transaction is aborted, commands ignored until end of transaction block",
                ),
                true,
            );
            return;
        }
        // COPY over several shards runs in `copy` (rows routed one by one).
        if self.routed_copy_portal(&portal.sql).await {
            return;
        }
        let Some(router) = self.router() else {
            return;
        };
        self.run_fanout(
            &router,
            &portal.sql.clone(),
            portal.route.clone(),
            Some(&portal),
        )
        .await;
        if portal.max_rows > 0 {
            // Fetched in parts: the first part now (see `portal`).
            if let Some(index) = self.suspended_portal(&portal.name) {
                self.serve_portal(index, portal.max_rows).await;
            }
        }
    }

    /// Gathers the backends, runs the executor, commits an implicit
    /// multi-shard write, and leaves the answer (or the error) in
    /// `client_out`. No ReadyForQuery.
    async fn run_fanout(
        &mut self,
        router: &Router,
        sql: &str,
        route: Route,
        portal: Option<&PendingPortal>,
    ) {
        let extended = portal.is_some();
        let shared = Arc::clone(&self.shared);
        let targets = target_shards(&route, shared.config.shards.len());
        if targets.len() > 1 && embeds_transaction_control(sql) {
            self.refuse_fanout(transaction_control_in_multi_shard_string(), extended);
            return;
        }
        let writes = Self::may_write(router, sql);
        // An extended batch turned into a transaction on its shards (see
        // below and `multi`) is the client's transaction until its Sync.
        let in_transaction = self.status == b'T' || self.implicit_multi;
        let outside = runs_outside_transactions(sql);
        // A write on several shards in an extended batch (asyncpg
        // `executemany`, JDBC batches) with nothing attached yet: Postgres
        // runs the whole batch as one implicit transaction, so a later
        // statement's failure undoes this one too. Its shards stay in a
        // transaction that the client's Sync commits (two-phase) or rolls
        // back (`finish_implicit_batch`), instead of committing now.
        let batch_transaction = portal.is_some_and(|p| p.max_rows == 0)
            && !in_transaction
            && writes
            && targets.len() > 1
            && !outside
            && shared.twophase.enabled()
            && self.backend.is_none()
            && self.others.is_empty();
        let implicit =
            !in_transaction && !batch_transaction && writes && targets.len() > 1 && !outside;
        if in_transaction && writes && !shared.twophase.enabled() {
            let written: Vec<usize> = self
                .participants()
                .filter(|a| a.wrote)
                .map(|a| a.shard)
                .collect();
            for &shard in &targets {
                if let Err(error) = shared.twophase.may_write(&written, shard) {
                    self.refuse_fanout(error, extended);
                    return;
                }
            }
        }
        if implicit && !shared.twophase.enabled() {
            self.refuse_fanout(
                ProxyError::error(
                    "0A000",
                    format!(
                        "this statement writes on {} shards, which is atomic only with two-phase \
                         commit, and two_phase_commit is off in the shard map",
                        targets.len()
                    ),
                )
                .with_hint("set `two_phase_commit: true`, or add the sharding key so the write stays on one shard"),
                extended,
            );
            return;
        }
        if outside && !in_transaction && targets.len() > 1 && matches!(route, Route::Broadcast) {
            self.run_on_each_shard(sql, &targets, portal.map(|p| p.describe))
                .await;
            return;
        }
        let begin = if in_transaction || implicit || batch_transaction {
            Some(self.begin_sql())
        } else {
            None
        };
        // The transaction's backends, then new ones for the other targets.
        let current_shard = self.backend.as_ref().map(|a| a.shard);
        let mut group: Vec<Attached> = Vec::with_capacity(targets.len());
        group.extend(self.backend.take());
        group.append(&mut self.others);
        self.cancel.set(None);
        let mut failure = None;
        for &shard in &targets {
            if group.iter().any(|a| a.shard == shard) {
                continue;
            }
            match self.open_for_fanout(shard, begin.as_deref()).await {
                Ok(attached) => group.push(attached),
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        if in_transaction && !group.is_empty() {
            // A BEGIN held back for the first statement that names a shard
            // has now run on these shards; replayed later, it would open a
            // transaction around an autocommit statement.
            self.deferred_begin = None;
        }
        if let (None, Some(p)) = (&failure, portal) {
            if p.max_rows > 0 && !implicit {
                // Fetched in parts: the fan-out streams from a task of its own.
                self.start_live_portal(
                    group,
                    &targets,
                    sql,
                    &route,
                    p,
                    LiveContext {
                        current_shard,
                        in_transaction,
                        shards: targets.clone(),
                        broadcast: matches!(route, Route::Broadcast),
                    },
                    writes,
                );
                return;
            }
        }
        let started = std::time::Instant::now();
        let mut held = BytesMut::new();
        let mut spill: Vec<u8> = Vec::new();
        let result = match failure {
            Some(error) => Err(error),
            None => {
                let wanted: BTreeSet<usize> = targets.iter().copied().collect();
                let mut conns: Vec<ShardConn<'_>> = group
                    .iter_mut()
                    .filter(|a| wanted.contains(&a.shard))
                    .map(|a| ShardConn {
                        shard: a.shard,
                        conn: &mut a.conn,
                    })
                    .collect();
                conns.sort_by_key(|c| c.shard);
                let bind;
                let protocol = match portal {
                    None => FanoutProtocol::Simple,
                    Some(p) => {
                        bind = match Bind::decode(&p.bind) {
                            Ok(bind) => bind,
                            Err(e) => {
                                self.report(
                                    ProxyError::error(
                                        "08P01",
                                        format!("invalid Bind message: {e}"),
                                    ),
                                    true,
                                );
                                self.restore_group(group, current_shard, in_transaction)
                                    .await;
                                return;
                            }
                        };
                        FanoutProtocol::Extended {
                            bind,
                            param_types: &p.param_types,
                            describe: p.describe,
                            expected_shape: p.expected_shape,
                        }
                    }
                };
                let request = FanoutRequest {
                    sql,
                    route: &route,
                    protocol,
                };
                // A CancelRequest during the fan-out reaches every shard.
                self.cancel.set_fanout(
                    conns
                        .iter()
                        .map(|c| {
                            let (pid, secret) = c.conn.cancel_key();
                            (c.shard, pid, secret)
                        })
                        .collect(),
                );
                let outcome = if implicit {
                    fanout::run(&shared.fanout, request, &mut conns, &mut held, &mut spill).await
                } else {
                    fanout::run(
                        &shared.fanout,
                        request,
                        &mut conns,
                        &mut self.client_out,
                        &mut self.client,
                    )
                    .await
                };
                self.cancel.set_fanout(Vec::new());
                let wrote = wrote_by_shard(&conns, &outcome, writes);
                drop(conns);
                for (shard, wrote) in wrote {
                    if let Some(a) = group.iter_mut().find(|a| a.shard == shard) {
                        a.wrote |= wrote;
                    }
                }
                outcome.map(|_| ())
            }
        };
        shared.metrics.multi_query_done(
            &targets,
            if matches!(route, Route::Broadcast) {
                metrics::Route::Broadcast
            } else {
                metrics::Route::Fanout
            },
            started.elapsed(),
        );
        if implicit {
            let result = match result {
                Ok(()) => self.commit_group(&mut group).await,
                Err(error) => {
                    rollback_group(&mut group).await;
                    Err(error)
                }
            };
            let committed = result.is_ok();
            match result {
                Ok(()) => match portal.filter(|p| p.max_rows > 0) {
                    // Fetched in parts: Postgres, too, runs the write to its
                    // end and hands out its RETURNING rows from memory.
                    Some(p) => {
                        let mut frames = BytesMut::from(&spill[..]);
                        frames.extend_from_slice(&held);
                        self.suspended
                            .push(SuspendedPortal::buffered(&p.name, false, frames));
                    }
                    None => {
                        self.client_out.extend_from_slice(&spill);
                        self.client_out.extend_from_slice(&held);
                    }
                },
                Err(error) => self.report_fanout_error(error, extended),
            }
            self.restore_group(group, current_shard, false).await;
            if committed && is_ddl(router, sql) {
                // Key types and column orders may have changed with it.
                shared.refresh_catalog().await;
            }
            return;
        }
        let succeeded = result.is_ok();
        if let Err(error) = result {
            self.report_fanout_error(error, extended);
            if self.status == b'T' {
                self.status = b'E';
                self.batch_status_before = b'E';
            }
        }
        if batch_transaction && !group.is_empty() {
            self.implicit_multi = true;
            self.batch_flushed = false;
        }
        self.restore_group(group, current_shard, in_transaction || batch_transaction)
            .await;
        if succeeded && !in_transaction && is_ddl(router, sql) {
            // Key types and column orders may have changed with it.
            shared.refresh_catalog().await;
        }
    }

    /// Starts a fan-out whose portal is fetched in parts: the statement runs
    /// in a task that owns the shard connections and streams its merged
    /// answer into a channel the session reads at each Execute.
    #[allow(clippy::too_many_arguments)]
    fn start_live_portal(
        &mut self,
        mut group: Vec<Attached>,
        targets: &[usize],
        sql: &str,
        route: &Route,
        portal: &PendingPortal,
        context: LiveContext,
        writes: bool,
    ) {
        let wanted: BTreeSet<usize> = targets.iter().copied().collect();
        // A CancelRequest while the client waits for a part reaches every
        // shard (between parts the client is idle: a cancel does nothing).
        let cancel_keys = group
            .iter()
            .filter(|a| wanted.contains(&a.shard))
            .map(|a| {
                let (pid, secret) = a.conn.cancel_key();
                (a.shard, pid, secret)
            })
            .collect();
        let shared = Arc::clone(&self.shared);
        let sql = sql.to_string();
        let route = route.clone();
        let bind = portal.bind.clone();
        let param_types = portal.param_types.clone();
        let describe = portal.describe;
        let expected_shape = portal.expected_shape;
        let (mut writer, rx) = ChannelWriter::channel();
        let task = tokio::spawn(async move {
            let mut conns: Vec<ShardConn<'_>> = group
                .iter_mut()
                .filter(|a| wanted.contains(&a.shard))
                .map(|a| ShardConn {
                    shard: a.shard,
                    conn: &mut a.conn,
                })
                .collect();
            conns.sort_by_key(|c| c.shard);
            let result = match Bind::decode(&bind) {
                Ok(bind) => {
                    let request = FanoutRequest {
                        sql: &sql,
                        route: &route,
                        protocol: FanoutProtocol::Extended {
                            bind,
                            param_types: &param_types,
                            describe,
                            expected_shape,
                        },
                    };
                    let mut out = BytesMut::new();
                    let result = fanout::run_flushing(
                        &shared.fanout,
                        request,
                        &mut conns,
                        &mut out,
                        &mut writer,
                        true,
                    )
                    .await;
                    if !out.is_empty() {
                        // Nobody reading: the session stopped the portal.
                        let _ = tokio::io::AsyncWriteExt::write_all(&mut writer, &out).await;
                    }
                    result
                }
                Err(e) => Err(ProxyError::error(
                    "08P01",
                    format!("invalid Bind message: {e}"),
                )),
            };
            let wrote = wrote_by_shard(&conns, &result, writes);
            drop(conns);
            LiveEnd {
                group,
                result,
                wrote,
            }
        });
        self.suspended.push(SuspendedPortal::live(
            &portal.name,
            rx,
            task,
            context,
            cancel_keys,
        ));
    }

    /// A refusal before anything ran, in protocol order: the error and,
    /// inside a transaction block, the transaction aborted as Postgres does
    /// after an error. The simple protocol's ReadyForQuery is the caller's
    /// (`Session::report` would add a second one).
    fn refuse_fanout(&mut self, error: ProxyError, extended: bool) {
        if extended {
            self.report(error, true);
            return;
        }
        let in_block = self.status == b'T'
            || self
                .backend
                .as_ref()
                .is_some_and(|a| a.conn.transaction_status() == b'T');
        self.shared.metrics.error(None, error.code);
        let mut out = BytesMut::new();
        error.encode(&mut out);
        self.queue.local(out, &mut self.client_out);
        if in_block {
            self.send_transaction_abort();
            self.batch_status_before = self.status;
        }
    }

    /// A statement that cannot run in a transaction block (VACUUM, CREATE
    /// INDEX CONCURRENTLY, …) on every target shard, each on its own and to
    /// its end (one shard's failure does not cancel the others, which may
    /// be half through an index build). The answer is the first shard's
    /// tags; a failure names the shards where it succeeded and where it
    /// failed, so the user knows where to run it again. `describe`: the
    /// extended protocol's Describe(portal) wants NoData first.
    async fn run_on_each_shard(&mut self, sql: &str, targets: &[usize], describe: Option<bool>) {
        let extended = describe.is_some();
        let current_shard = self.backend.as_ref().map(|a| a.shard);
        let mut group: Vec<Attached> = Vec::with_capacity(targets.len());
        group.extend(self.backend.take());
        group.append(&mut self.others);
        self.cancel.set(None);
        let mut failures: Vec<(usize, ProxyError)> = Vec::new();
        for &shard in targets {
            if group.iter().any(|a| a.shard == shard) {
                continue;
            }
            match self.open_for_fanout(shard, None).await {
                Ok(attached) => group.push(attached),
                Err(error) => failures.push((shard, error)),
            }
        }
        let started = std::time::Instant::now();
        let runs = group
            .iter_mut()
            .filter(|a| targets.contains(&a.shard))
            .map(|a| async move {
                let result = control::run(&mut a.conn, sql).await;
                if matches!(&result, Err(e) if e.outcome_unknown()) {
                    a.conn.mark_broken();
                }
                (a.shard, result)
            });
        let mut results = futures::future::join_all(runs).await;
        results.sort_by_key(|(shard, _)| *shard);
        self.shared
            .metrics
            .multi_query_done(targets, metrics::Route::Broadcast, started.elapsed());
        let mut succeeded = Vec::new();
        let mut tags: Option<Vec<String>> = None;
        for (shard, result) in results {
            match result {
                Ok(t) => {
                    succeeded.push(shard);
                    tags.get_or_insert(t);
                }
                Err(e) => failures.push((shard, e.to_proxy_error())),
            }
        }
        failures.sort_by_key(|(shard, _)| *shard);
        if failures.is_empty() {
            if describe == Some(true) {
                // NoData: utility statements return no rows.
                self.client_out.extend_from_slice(&[b'n', 0, 0, 0, 4]);
            }
            for tag in tags.unwrap_or_default() {
                synth::command_complete(&mut self.client_out, &tag);
            }
        } else {
            let names = |shards: &mut dyn Iterator<Item = usize>| {
                shards
                    .map(|s| self.shard_name(s))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let ok = names(&mut succeeded.iter().copied());
            let failed = names(&mut failures.iter().map(|(s, _)| *s));
            let (_, first) = &failures[0];
            let mut error = first.clone();
            let mut detail = format!(
                "this statement runs on each shard on its own: it failed on {failed} and {}",
                if ok.is_empty() {
                    "succeeded nowhere".to_string()
                } else {
                    format!("succeeded on {ok}")
                }
            );
            for (_, e) in failures.iter().skip(1) {
                detail.push_str(&format!("; {}", e.message));
            }
            if let Some(theirs) = &first.detail {
                detail.push_str(&format!(" ({theirs})"));
            }
            error.detail = Some(detail);
            if error.hint.is_none() {
                error.hint = Some(format!(
                    "fix the cause and run it again on {failed} only, with a routing hint such as \
                     /* shardgate: shard={} */",
                    self.shard_name(failures[0].0)
                ));
            }
            self.report_fanout_error(error, extended);
        }
        self.restore_group(group, current_shard, false).await;
    }

    /// Two-phase (or plain) commit of an implicit multi-shard write.
    async fn commit_group(&mut self, group: &mut [Attached]) -> Result<(), ProxyError> {
        let mut participants: Vec<Participant<'_>> = group
            .iter_mut()
            .filter(|a| a.conn.transaction_status() != b'I')
            .map(|a| Participant {
                shard: a.shard,
                wrote: a.wrote,
                conn: &mut a.conn,
            })
            .collect();
        match twophase::commit(&self.shared.twophase, &mut participants).await? {
            CommitOutcome::Committed { .. } => Ok(()),
            CommitOutcome::RolledBack => Err(ProxyError::error(
                "40000",
                "the statement's implicit transaction was rolled back on every shard",
            )),
        }
    }

    /// An error of a multi-shard statement, in protocol order: the simple
    /// protocol's ReadyForQuery is added by the caller.
    fn report_fanout_error(&mut self, error: ProxyError, extended: bool) {
        self.shared.metrics.error(None, error.code);
        error.encode(&mut self.client_out);
        if extended {
            self.skip_until_sync = true;
        }
    }

    /// Puts the backends back: inside a transaction they stay (the one that
    /// was current stays current); otherwise they go back to their pools,
    /// except a session-mode or pinned backend.
    pub(super) async fn restore_group(
        &mut self,
        mut group: Vec<Attached>,
        current_shard: Option<usize>,
        in_transaction: bool,
    ) {
        // The statement that held these backends is over.
        self.cancel.set_fanout(Vec::new());
        let keep_current =
            in_transaction || self.tainted || self.mode == crate::config::PoolMode::Session;
        if keep_current && !group.is_empty() {
            let position = current_shard
                .and_then(|s| group.iter().position(|a| a.shard == s))
                .unwrap_or(0);
            let current = group.swap_remove(position);
            let (pid, secret) = current.conn.cancel_key();
            self.cancel.set(Some((current.shard, pid, secret)));
            self.backend = Some(current);
            self.unnamed_on_backend = false;
        }
        if in_transaction {
            self.others = group;
        } else {
            for attached in group {
                match self.shared.pools.get(attached.shard) {
                    Some(pool) => pool.release(attached.conn).await,
                    None => crate::backend::release(attached.conn).await,
                }
            }
        }
    }

    /// A backend of `shard` for a fan-out: the session's settings applied
    /// and, when given, the transaction's BEGIN run.
    pub(super) async fn open_for_fanout(
        &mut self,
        shard: usize,
        begin: Option<&str>,
    ) -> Result<Attached, ProxyError> {
        let pool = self.shared.pools.get(shard).ok_or_else(|| {
            ProxyError::error("XX000", format!("shard #{shard} is not in the pool set"))
        })?;
        let mut conn = pool
            .checkout()
            .await
            .map_err(|e| ProxyError::error(e.sqlstate(), e.to_string()))?;
        if conn.settings_signature() != self.settings.signature() {
            let sql = self.settings.replay_sql();
            control::run(&mut conn, &sql)
                .await
                .map_err(|e| e.to_proxy_error())?;
            conn.set_settings_signature(self.settings.signature());
        }
        if let Some(begin) = begin {
            control::run(&mut conn, begin)
                .await
                .map_err(|e| e.to_proxy_error())?;
            // The transaction's savepoints and SETs so far, as they ran on
            // its other shards (one that failed there fails here too, and
            // the ROLLBACK TO that followed it recovers here as well).
            for statement in &self.transaction_replay {
                match control::run(&mut conn, statement).await {
                    Err(e) if e.outcome_unknown() => return Err(e.to_proxy_error()),
                    _ => {}
                }
            }
        }
        Ok(Attached {
            conn,
            shard,
            wrote: false,
        })
    }

    /// The SQL of the client's BEGIN (for shards joining its transaction).
    pub(super) fn begin_sql(&self) -> String {
        self.transaction_begin
            .as_deref()
            .and_then(|frame| frame.get(5..))
            .and_then(|body| messages::query_text(body).ok())
            .unwrap_or("BEGIN")
            .to_string()
    }
}

/// Per shard of a fan-out: whether it may have written (for two-phase
/// commit). After an error anything may have been written.
fn wrote_by_shard(
    conns: &[ShardConn<'_>],
    outcome: &Result<fanout::FanoutOutcome, ProxyError>,
    writes: bool,
) -> Vec<(usize, bool)> {
    match outcome {
        Ok(outcome) => conns
            .iter()
            .map(|c| c.shard)
            .zip(outcome.wrote.iter().copied())
            .collect(),
        Err(_) => conns.iter().map(|c| (c.shard, writes)).collect(),
    }
}

fn is_ddl(router: &Router, sql: &str) -> bool {
    router
        .analyze(sql)
        .is_ok_and(|a| a.kind == crate::router::StatementKind::Ddl)
}

pub(super) async fn rollback_group(group: &mut [Attached]) {
    let mut participants: Vec<Participant<'_>> = group
        .iter_mut()
        .map(|a| Participant {
            shard: a.shard,
            wrote: a.wrote,
            conn: &mut a.conn,
        })
        .collect();
    twophase::rollback(&mut participants).await;
}

#[cfg(test)]
mod tests {
    use super::{embeds_transaction_control, runs_outside_transactions};

    #[test]
    fn statements_outside_transaction_blocks() {
        for sql in [
            "VACUUM users",
            "vacuum (analyze) users",
            "CREATE INDEX CONCURRENTLY i ON t (a)",
            "create unique index concurrently i on t (a)",
            "DROP INDEX CONCURRENTLY i",
            "REINDEX TABLE CONCURRENTLY t",
            "REFRESH MATERIALIZED VIEW CONCURRENTLY v",
            "ALTER TABLE p DETACH PARTITION c CONCURRENTLY",
            "CREATE DATABASE x",
            "ALTER SYSTEM SET work_mem = '8MB'",
        ] {
            assert!(runs_outside_transactions(sql), "{sql}");
        }
        for sql in [
            "INSERT INTO jobs (id, \"concurrently\") VALUES (1, true), (2, false)",
            "UPDATE jobs SET \"concurrently\" = true",
            "DELETE FROM jobs WHERE \"concurrently\"",
            "CREATE INDEX i ON t (a)",
            "ALTER TABLE t ADD COLUMN b int",
        ] {
            assert!(!runs_outside_transactions(sql), "{sql}");
        }
    }

    #[test]
    fn transaction_control_inside_query_strings() {
        for sql in [
            "BEGIN; CREATE TABLE a (id int); COMMIT",
            "create table a (id int); commit;",
            "CREATE TABLE a (id int);\n  END",
            "UPDATE t SET x = 1; SAVEPOINT s",
            "UPDATE t SET x = 1; PREPARE TRANSACTION 'g'",
            "start transaction; DELETE FROM t",
            "DELETE FROM t; ROLLBACK",
        ] {
            assert!(embeds_transaction_control(sql), "{sql}");
        }
        for sql in [
            "BEGIN",
            "COMMIT;",
            "CREATE TABLE a (id int); CREATE TABLE b (id int);",
            "INSERT INTO t VALUES ('BEGIN; COMMIT')",
            "DO $$ BEGIN PERFORM 1; END $$; CREATE TABLE c (id int)",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END; SELECT 1",
            "UPDATE t SET x = 1; PREPARE p AS SELECT 1",
            "SELECT 1 -- ; COMMIT\n",
        ] {
            assert!(!embeds_transaction_control(sql), "{sql}");
        }
    }
}
