//! Client transactions that span several shards.
//!
//! The session's current backend serves the statement at hand; the other
//! shards a transaction touched wait in `others`, idle inside their
//! transaction block. A statement for another shard switches the current
//! backend once earlier answers are in, joining that shard to the
//! transaction (with the client's own BEGIN) the first time. COMMIT and
//! ROLLBACK of such a transaction are shardgate's: two-phase commit when
//! more than one shard wrote (`executor::twophase`).

use bytes::BytesMut;

use super::fanout::PendingPortal;
use super::routing::{tx_verb, TxVerb};
use super::{Attach, Attached, Expect, Session};
use crate::backend::release;
use crate::executor::twophase::{self, CommitOutcome, Participant};
use crate::protocol::messages::{Bind, Parse};
use crate::protocol::synth::{self, ProxyError};
use crate::router::{Router, StatementKind};

impl Session {
    /// Whether `sql` may write (anything but a plain read or session /
    /// transaction control); unknown statements count as writes.
    pub(super) fn may_write(router: &Router, sql: &str) -> bool {
        router.statement_kind(sql).map_or(true, writes)
    }

    /// Makes `shard` the current backend of the open transaction, joining
    /// it (with the transaction's BEGIN) the first time. Called with no
    /// answers outstanding. `writes`: the statement about to run may write.
    pub(super) async fn join_shard(&mut self, shard: usize, extended: bool) -> Attach {
        if let Some(position) = self.others.iter().position(|a| a.shard == shard) {
            let next = self.others.swap_remove(position);
            if let Some(current) = self.backend.replace(next) {
                self.others.push(current);
            }
            if let Some(attached) = &self.backend {
                let (pid, secret) = attached.conn.cancel_key();
                self.cancel.set(Some((shard, pid, secret)));
            }
            self.unnamed_on_backend = false;
            return Attach::Ready;
        }
        let begin = self
            .transaction_begin
            .clone()
            .unwrap_or_else(plain_begin_frame);
        let previous = self.backend.take();
        self.deferred_begin = Some(begin);
        match self.checkout(shard).await {
            Ok(()) => {
                if let Some(previous) = previous {
                    self.others.push(previous);
                }
                Attach::Ready
            }
            Err(error) => {
                self.deferred_begin = None;
                self.backend = previous;
                let error = ProxyError::error(error.sqlstate(), error.to_string());
                self.report(error, extended);
                Attach::Failed
            }
        }
    }

    /// Records that a statement that may write goes to the current backend;
    /// with two-phase commit off, refuses it if another shard of the
    /// transaction wrote already. False: refused (the client was told).
    pub(super) fn note_write(&mut self, extended: bool) -> bool {
        let Some(current) = self.backend.as_ref().map(|a| a.shard) else {
            return true;
        };
        if !self.others.is_empty() {
            let written: Vec<usize> = self
                .participants()
                .filter(|a| a.wrote)
                .map(|a| a.shard)
                .collect();
            if let Err(error) = self.shared.twophase.may_write(&written, current) {
                self.report(error, extended);
                return false;
            }
        }
        if let Some(attached) = self.backend.as_mut() {
            attached.wrote = true;
        }
        true
    }

    /// A statement for `shard` in an extended batch whose earlier messages
    /// went to another shard without a Sync: Postgres would run the whole
    /// batch as one implicit transaction, so shardgate turns it into a
    /// regular transaction on each shard (a hidden BEGIN in the batch, which
    /// Postgres allows inside an implicit block), reads the current shard's
    /// answers (Flush), joins the next shard, and commits all of them
    /// together at the client's Sync (two-phase commit when several wrote).
    pub(super) async fn switch_in_batch(&mut self, shard: usize, extended: bool) -> Attach {
        self.begin_batch_transaction();
        if let Some(not_yet) = self.read_batch_answers() {
            return not_yet;
        }
        self.join_shard(shard, extended).await
    }

    /// Turns the current backend's implicit transaction (an extended batch
    /// without a Sync yet) into a regular one that the client's Sync ends
    /// on every shard of the batch (`finish_implicit_batch`).
    pub(super) fn begin_batch_transaction(&mut self) {
        if !self.implicit_multi {
            let begin = Parse {
                name: "",
                query: "BEGIN",
                param_types: &[0, 0],
            };
            begin.encode_as("", &mut self.backend_out);
            self.queue.sent(Expect::HiddenParse(0));
            Bind {
                portal: "",
                statement: "",
                rest: &[0, 0, 0, 0, 0, 0],
            }
            .encode_as("", &mut self.backend_out);
            self.queue.sent(Expect::HiddenBind);
            self.backend_out
                .extend_from_slice(&[b'E', 0, 0, 0, 9, 0, 0, 0, 0, 0]);
            self.queue.sent(Expect::HiddenExecute);
            // The client's unnamed statement there was replaced by BEGIN.
            self.unnamed_on_backend = false;
            self.implicit_multi = true;
            self.batch_flushed = false;
        }
    }

    /// Before an extended batch moves to another shard: this backend's
    /// answers must be read (asked for with one Flush; Wait until they
    /// are in), and a batch that failed here skips to its Sync (Failed).
    /// None: go on.
    fn read_batch_answers(&mut self) -> Option<Attach> {
        if !self.queue.is_empty() {
            if !self.batch_flushed {
                synth::flush(&mut self.backend_out);
                self.batch_flushed = true;
            }
            return Some(Attach::Wait);
        }
        self.batch_flushed = false;
        if self.queue.backend_skipping() {
            // The batch failed on this shard: Postgres skips the rest of it.
            self.skip_until_sync = true;
            return Some(Attach::Failed);
        }
        None
    }

    /// A statement for another shard of the open transaction. In an
    /// extended batch (no Sync yet) this backend's answers are read first
    /// (Flush); its part of the batch then stays open and gets a Sync with
    /// the client's ([`Session::sync_other_shards`]): JDBC batches with
    /// autocommit off and asyncpg's `executemany` in a transaction.
    pub(super) async fn switch_in_transaction(&mut self, shard: usize, extended: bool) -> Attach {
        if let Some(not_yet) = self.read_batch_answers() {
            return not_yet;
        }
        if self.queue.batch_open() {
            if let Some(current) = self.backend.as_ref().map(|a| a.shard) {
                if !self.unsynced.contains(&current) {
                    self.unsynced.push(current);
                }
            }
        }
        // The shard that becomes current gets the client's own Sync.
        self.unsynced.retain(|s| *s != shard);
        self.join_shard(shard, extended).await
    }

    /// Before the client's Sync goes to the current backend: the other
    /// shards' parts of the batch end with a Sync of their own (their
    /// answers were all read when the batch moved on). A shard lost here
    /// fails the transaction.
    pub(super) async fn sync_other_shards(&mut self) {
        let shards = std::mem::take(&mut self.unsynced);
        for shard in shards {
            let Some(attached) = self.others.iter_mut().find(|a| a.shard == shard) else {
                continue;
            };
            let synced =
                tokio::time::timeout(twophase::STEP_TIMEOUT, sync_backend(&mut attached.conn))
                    .await;
            if !matches!(synced, Ok(Ok(_))) {
                attached.conn.mark_broken();
                let name = self.shard_name(shard);
                let error = ProxyError::error(
                    "08006",
                    format!("lost the connection to shard \"{name}\" of this transaction"),
                );
                self.shared.metrics.error(None, error.code);
                let mut out = BytesMut::new();
                error.encode(&mut out);
                self.queue.local(out, &mut self.client_out);
                self.abort_backend_transaction = true;
            }
        }
    }

    /// The client's Sync of a batch that spans several shards: every shard
    /// ends its part of the batch, then they commit together (or roll back
    /// if the batch failed anywhere) and the client gets one ReadyForQuery.
    pub(super) async fn finish_implicit_batch(&mut self) -> super::Step {
        if !self.queue.is_empty() {
            if !self.batch_flushed {
                synth::flush(&mut self.backend_out);
                self.batch_flushed = true;
            }
            return super::Step::Wait;
        }
        self.implicit_multi = false;
        self.batch_flushed = false;
        // A failure was reported in the batch: the rollback below ends it.
        self.abort_backend_transaction = false;
        // Every backend's batch ends here (their Syncs are sent below), so
        // the queue's skip-to-Sync state ends too.
        self.queue.clear();
        let mut group: Vec<Attached> = Vec::with_capacity(self.others.len() + 1);
        group.extend(self.backend.take());
        group.append(&mut self.others);
        self.cancel.set(None);
        let mut failed = false;
        for attached in group.iter_mut() {
            // Bounded like every step of a commit: a hung shard fails the batch.
            match tokio::time::timeout(twophase::STEP_TIMEOUT, sync_backend(&mut attached.conn))
                .await
            {
                Ok(Ok(status)) => failed |= status == b'E',
                Ok(Err(_)) | Err(_) => {
                    attached.conn.mark_broken();
                    failed = true;
                }
            }
        }
        let outcome = {
            let mut participants: Vec<Participant<'_>> = group
                .iter_mut()
                .filter(|a| !a.conn.is_broken())
                .map(|a| Participant {
                    shard: a.shard,
                    wrote: a.wrote,
                    conn: &mut a.conn,
                })
                .collect();
            if failed {
                twophase::rollback(&mut participants).await;
                Ok(CommitOutcome::RolledBack)
            } else {
                twophase::commit(&self.shared.twophase, &mut participants).await
            }
        };
        for attached in group {
            match self.shared.pools.get(attached.shard) {
                Some(pool) => pool.release(attached.conn).await,
                None => release(attached.conn).await,
            }
        }
        let mut out = BytesMut::new();
        if let Err(error) = outcome {
            self.shared.metrics.error(None, error.code);
            error.encode(&mut out);
        }
        self.transaction_begin = None;
        self.transaction_replay.clear();
        self.status = b'I';
        self.batch_status_before = b'I';
        synth::ready_for_query(&mut out, self.status);
        self.queue.local(out, &mut self.client_out);
        super::Step::Next
    }

    /// Every backend of the client's transaction.
    pub(super) fn participants(&self) -> impl Iterator<Item = &Attached> {
        self.backend.iter().chain(self.others.iter())
    }

    /// COMMIT or ROLLBACK of a transaction with more than one shard,
    /// answered by shardgate once every participant has finished.
    pub(super) async fn end_multi(&mut self, commit: bool) {
        self.finish_multi(commit, None).await;
    }

    /// Bind of an extended-protocol COMMIT / ROLLBACK in a transaction with
    /// more than one shard (pgbench `-M extended`, drivers that prepare
    /// every statement): kept until its Execute, which ends the transaction
    /// on every shard like the simple-query COMMIT. Savepoint commands and
    /// SET (psycopg sends every statement with the extended protocol, so
    /// SQLAlchemy's `begin_nested()` arrives this way) run on every shard
    /// at their Execute, as in a simple query. Other control statements
    /// are refused, as is one pipelined behind unanswered statements of
    /// the same batch (the backends would have to be synced first).
    pub(super) fn bind_end_multi(&mut self, bind: &Bind<'_>) -> Attach {
        let text = if bind.statement.is_empty() {
            self.unnamed_parse
                .get(5..)
                .and_then(|body| Parse::decode(body).ok())
                .map(|p| p.query.to_string())
        } else {
            self.statements
                .text_of(bind.statement)
                .map(|(query, _)| query.to_string())
        };
        let text = text.unwrap_or_default();
        let portal = match tx_verb(&text) {
            Some(TxVerb::Commit) => PendingPortal::end(bind.portal, true),
            Some(TxVerb::Rollback) => PendingPortal::end(bind.portal, false),
            _ if super::routing::participant_control(&text) => {
                PendingPortal::every_participant(bind.portal, &text)
            }
            _ if self.deallocates_all_here(&text) => {
                PendingPortal::held(bind.portal, super::fanout::Held::DeallocateAll)
            }
            _ => {
                self.report(control_in_multi_shard_transaction(), true);
                return Attach::Failed;
            }
        };
        if !self.queue.is_empty() {
            if self.queue.batch_open() {
                self.report(control_in_multi_shard_transaction(), true);
                return Attach::Failed;
            }
            // Answers of earlier batches first.
            return Attach::Wait;
        }
        self.pending_portal = Some(portal);
        let mut out = BytesMut::new();
        synth::bind_complete(&mut out);
        self.queue.local(out, &mut self.client_out);
        Attach::Answered
    }

    /// `DEALLOCATE ALL` that shardgate answers itself in a transaction over
    /// several shards: it names only the client's protocol statements
    /// (no SQL `PREPARE` pinned the session), and the transaction has not
    /// failed (Postgres would answer 25P02 then).
    pub(super) fn deallocates_all_here(&self, sql: &str) -> bool {
        !self.others.is_empty()
            && !self.tainted
            && self.status != b'E'
            && super::deallocates_all(sql)
    }

    /// Ends the multi-shard transaction: two-phase or plain commit, or
    /// rollback. `extended`: `Some(describe)` for an Execute (NoData first
    /// when the portal was described; no ReadyForQuery, the client's Sync
    /// gets it), `None` for a simple query.
    pub(super) async fn finish_multi(&mut self, commit: bool, extended: Option<bool>) {
        // Parts of an extended batch still open on other shards end first.
        self.sync_other_shards().await;
        let mut group: Vec<Attached> = Vec::with_capacity(self.others.len() + 1);
        if let Some(current) = self.backend.take() {
            group.push(current);
        }
        group.append(&mut self.others);
        self.cancel.set(None);
        let outcome = {
            let mut participants: Vec<Participant<'_>> = group
                .iter_mut()
                .map(|a| Participant {
                    shard: a.shard,
                    wrote: a.wrote,
                    conn: &mut a.conn,
                })
                .collect();
            if commit && self.status == b'T' {
                twophase::commit(&self.shared.twophase, &mut participants).await
            } else {
                twophase::rollback(&mut participants).await;
                Ok(CommitOutcome::RolledBack)
            }
        };
        for attached in group {
            match self.shared.pools.get(attached.shard) {
                Some(pool) => pool.release(attached.conn).await,
                None => release(attached.conn).await,
            }
        }
        let mut out = BytesMut::new();
        if extended == Some(true) {
            // NoData: the Describe of a COMMIT portal.
            out.extend_from_slice(&[b'n', 0, 0, 0, 4]);
        }
        let committed = match outcome {
            Ok(outcome) => {
                synth::command_complete(&mut out, outcome.command_tag());
                matches!(outcome, CommitOutcome::Committed { .. })
            }
            Err(error) => {
                self.shared.metrics.error(None, error.code);
                error.encode(&mut out);
                if extended.is_some() {
                    self.skip_until_sync = true;
                }
                false
            }
        };
        self.settings.batch_done(b'T', b'I', false, Some(committed));
        self.transaction_begin = None;
        self.transaction_replay.clear();
        self.status = b'I';
        self.batch_status_before = b'I';
        if extended.is_none() {
            synth::ready_for_query(&mut out, self.status);
        }
        self.queue.local(out, &mut self.client_out);
    }

    /// A savepoint command or SET in a transaction on several shards: runs
    /// on every participant (one after the other) and is kept for shards
    /// that join later, so a `ROLLBACK TO` undoes the same work everywhere.
    /// The client's transaction is in the state the participants report:
    /// `ROLLBACK TO` after an error brings all of them back. `extended`:
    /// `Some(described)` for an Execute (NoData first when the portal was
    /// described; no ReadyForQuery, the client's Sync gets it).
    pub(super) async fn on_every_participant(&mut self, sql: &str, extended: Option<bool>) {
        let before = self.status;
        let mut tag = None;
        let mut failure = None;
        let mut failed_state = false;
        let backends = self.backend.iter_mut().chain(self.others.iter_mut());
        for attached in backends {
            match crate::executor::control::run_within(
                &mut attached.conn,
                sql,
                twophase::STEP_TIMEOUT,
            )
            .await
            {
                Ok(tags) => {
                    tag = tag.or_else(|| tags.last().cloned());
                }
                Err(error) => {
                    failure.get_or_insert_with(|| error.to_proxy_error());
                }
            }
            failed_state |= attached.conn.transaction_status() != b'T';
        }
        let mut out = BytesMut::new();
        if extended == Some(true) {
            // NoData: the Describe of a statement without rows.
            out.extend_from_slice(&[b'n', 0, 0, 0, 4]);
        }
        match failure {
            None => {
                self.transaction_replay.push(sql.to_string());
                synth::command_complete(&mut out, tag.as_deref().unwrap_or("SET"));
            }
            Some(error) => {
                self.shared.metrics.error(None, error.code);
                error.encode(&mut out);
                if extended.is_some() {
                    self.skip_until_sync = true;
                }
            }
        }
        self.status = if failed_state { b'E' } else { b'T' };
        if self.status == b'E' && !self.backend.iter().any(|a| a.conn.is_broken()) {
            // Every participant must be in the failed state, not just those
            // where it failed: the next statement may go to any of them.
            for attached in self.backend.iter_mut().chain(self.others.iter_mut()) {
                if attached.conn.transaction_status() == b'T' {
                    let _ = crate::executor::control::run_within(
                        &mut attached.conn,
                        super::TRANSACTION_ABORT_SQL,
                        twophase::STEP_TIMEOUT,
                    )
                    .await;
                }
            }
        }
        self.settings.statement_sent(sql);
        self.settings
            .batch_done(before, self.status, self.status == b'E', None);
        self.batch_status_before = self.status;
        if extended.is_none() {
            synth::ready_for_query(&mut out, self.status);
        }
        self.queue.local(out, &mut self.client_out);
    }

    /// Returns the other participants' backends (the transaction ended on
    /// the current one, or the client left): a pool reset rolls back any
    /// transaction still open on them.
    pub(super) async fn release_others(&mut self) {
        for attached in std::mem::take(&mut self.others) {
            match self.shared.pools.get(attached.shard) {
                Some(pool) => pool.release(attached.conn).await,
                None => release(attached.conn).await,
            }
        }
    }
}

/// Whether a statement of this kind may write.
pub(super) fn writes(kind: StatementKind) -> bool {
    !matches!(
        kind,
        StatementKind::Read | StatementKind::Transaction | StatementKind::Set
    )
}

/// Ends an extended batch on a backend whose answers were all read: Sync,
/// then everything up to ReadyForQuery. Returns the transaction status.
async fn sync_backend(conn: &mut crate::backend::BackendConnection) -> std::io::Result<u8> {
    conn.write_all(&[b'S', 0, 0, 0, 4]).await?;
    let mut input = BytesMut::new();
    loop {
        while let Some((frame, total)) =
            crate::protocol::next_frame(&input, crate::protocol::MAX_BACKEND_MESSAGE)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?
        {
            if frame.tag == crate::protocol::tag::READY_FOR_QUERY {
                let status = frame.body.first().copied().unwrap_or(b'I');
                conn.set_transaction_status(status);
                return Ok(status);
            }
            let _ = input.split_to(total);
        }
        if conn.read_buf(&mut input).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the shard closed the connection",
            ));
        }
    }
}

/// A `BEGIN` query frame, for shards joining a transaction whose BEGIN went
/// straight to a backend.
fn plain_begin_frame() -> Vec<u8> {
    let mut out = BytesMut::new();
    synth::query(&mut out, "BEGIN");
    out.to_vec()
}

/// The refusal for session or transaction control inside a multi-shard
/// transaction that shardgate cannot apply to every shard exactly.
pub(super) fn control_in_multi_shard_transaction() -> ProxyError {
    ProxyError::error(
        "0A000",
        "this statement cannot be applied to a transaction that spans several shards \
         (PREPARE TRANSACTION and LISTEN/NOTIFY are not supported there, nor a savepoint, \
         SET or COMMIT pipelined behind unanswered statements of the same extended batch)",
    )
    .with_hint("keep the statement to one-shard transactions, or send a Sync before it")
}
