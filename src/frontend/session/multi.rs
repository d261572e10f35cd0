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
use super::{Attach, Attached, Session};
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
    /// on every shard like the simple-query COMMIT. Other control statements
    /// are refused, as is a COMMIT pipelined behind unanswered statements of
    /// the same batch (the backends would have to be synced first).
    pub(super) fn bind_end_multi(&mut self, bind: &Bind<'_>) -> Attach {
        let verb = if bind.statement.is_empty() {
            self.unnamed_parse
                .get(5..)
                .and_then(|body| Parse::decode(body).ok())
                .and_then(|p| tx_verb(p.query))
        } else {
            self.statements
                .text_of(bind.statement)
                .and_then(|(query, _)| tx_verb(query))
        };
        let commit = match verb {
            Some(TxVerb::Commit) => true,
            Some(TxVerb::Rollback) => false,
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
        self.pending_portal = Some(PendingPortal::end(bind.portal, commit));
        let mut out = BytesMut::new();
        synth::bind_complete(&mut out);
        self.queue.local(out, &mut self.client_out);
        Attach::Answered
    }

    /// Ends the multi-shard transaction: two-phase or plain commit, or
    /// rollback. `extended`: `Some(describe)` for an Execute (NoData first
    /// when the portal was described; no ReadyForQuery, the client's Sync
    /// gets it), `None` for a simple query.
    pub(super) async fn finish_multi(&mut self, commit: bool, extended: Option<bool>) {
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
        self.status = b'I';
        self.batch_status_before = b'I';
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
         (savepoints, SET LOCAL and PREPARE TRANSACTION are not supported there)",
    )
    .with_hint("keep savepoints and SET LOCAL to one-shard transactions")
}
