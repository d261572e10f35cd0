//! How a session turns the router's decision into a backend: which shard a
//! simple query or a Bind goes to, BEGIN held back until the first statement
//! that names a shard, and the session's routing settings
//! (`SET shardgate.shard`, `SET shardgate.sharding_key`).
//!
//! Extended-protocol statements are routed at Bind, where the parameters are
//! known: the same named statement may run on a different shard each time.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use super::{Attach, Session};
use crate::backend::BackendError;
use crate::protocol::messages::{Bind, Cursor, Parse};
use crate::protocol::synth::{self, ProxyError};
use crate::protocol::{next_frame, tag, ProtocolError, MAX_BACKEND_MESSAGE};
use crate::router::effects::{scan_statement, StatementEffects};
use crate::router::hints::leading_hint;
use crate::router::{Memo, Param, ParamFormat, Route, RouteError, Router};

/// Where the session sends a statement.
#[derive(Debug)]
pub(super) enum Destination {
    /// This shard.
    Shard(usize),
    /// Any shard gives the answer: the attached one, else one round-robin.
    AnyShard,
    /// Session or transaction control: the attached backend, else the
    /// session's default shard.
    Current,
    /// BEGIN with no backend attached: answered by shardgate and sent ahead
    /// of the first statement that names a shard, so a transaction starts
    /// on the shard its data lives on.
    DeferBegin,
    /// COMMIT / ROLLBACK of a held-back BEGIN that never reached a shard.
    EndDeferred { commit: bool },
    /// COMMIT / ROLLBACK of a transaction on several shards.
    EndMulti { commit: bool },
    /// SAVEPOINT, RELEASE, ROLLBACK TO, SET or RESET in a transaction on
    /// several shards: run on each of them.
    EveryParticipant,
    /// Refused with this error.
    Refuse(ProxyError),
    /// Several shards.
    Shards(Route),
}

/// Transaction-control verbs the session answers itself when no backend
/// holds the transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TxVerb {
    Begin,
    Commit,
    Rollback,
}

/// The verb of a single-statement transaction-control query. `ROLLBACK TO`,
/// `COMMIT PREPARED`, `PREPARE TRANSACTION` and anything with a second
/// statement are not.
pub(super) fn tx_verb(sql: &str) -> Option<TxVerb> {
    // Decided by the first letter for almost every statement (this runs for
    // every simple query), before the text is trimmed at both ends.
    if !matches!(
        sql.trim_ascii_start().as_bytes().first().map(|b| b | 0x20),
        Some(b'b' | b's' | b'c' | b'e' | b'r' | b'a')
    ) {
        return None;
    }
    let text = sql.trim().trim_end_matches(';').trim_end();
    let mut words = text.split_ascii_whitespace();
    let first = words.next()?;
    let is = |w: &str, k: &str| w.eq_ignore_ascii_case(k);
    // Decided by the first word for almost every statement, before the
    // whole text is scanned (this runs for every simple query).
    const VERBS: [&str; 6] = ["begin", "start", "commit", "end", "rollback", "abort"];
    if !VERBS.iter().any(|verb| is(first, verb)) {
        return None;
    }
    if text.contains(';') || text.contains("/*") || text.contains("--") {
        return None;
    }
    let second = words.next();
    let plain_end =
        |w: Option<&str>| w.is_none() || w.is_some_and(|w| is(w, "work") || is(w, "transaction"));
    if is(first, "begin") || (is(first, "start") && second.is_some_and(|w| is(w, "transaction"))) {
        return Some(TxVerb::Begin);
    }
    if (is(first, "commit") || is(first, "end")) && plain_end(second) {
        return Some(TxVerb::Commit);
    }
    if (is(first, "rollback") || is(first, "abort")) && plain_end(second) {
        return Some(TxVerb::Rollback);
    }
    None
}

/// A single SAVEPOINT, RELEASE, ROLLBACK TO, SET or RESET: what a
/// multi-shard transaction runs on every participant.
pub(super) fn participant_control(sql: &str) -> bool {
    let text = sql.trim().trim_end_matches(';').trim_end();
    let mut words = text.split_ascii_whitespace();
    let first = words.next().unwrap_or("");
    let is = |w: &str, k: &str| w.eq_ignore_ascii_case(k);
    // Decided by the first word for almost every statement (this runs for
    // every statement inside a transaction) before the text is scanned.
    let control = if ["savepoint", "release", "set", "reset"]
        .iter()
        .any(|k| is(first, k))
    {
        true
    } else if is(first, "rollback") || is(first, "abort") {
        let mut second = words.next().unwrap_or("");
        if is(second, "work") || is(second, "transaction") {
            second = words.next().unwrap_or("");
        }
        is(second, "to")
    } else {
        false
    };
    control && !text.contains(';')
}

/// The statement of `EXPLAIN (SHARDS) statement`, answered by shardgate
/// with the routing decision (the same text as `shardgate route`).
fn explain_shards(sql: &str) -> Option<&str> {
    let text = sql.trim_ascii_start();
    text.get(..7)
        .filter(|h| h.eq_ignore_ascii_case("explain"))?;
    let rest = text[7..].trim_start().strip_prefix('(')?;
    let close = rest.find(')')?;
    if !rest[..close].trim().eq_ignore_ascii_case("shards") {
        return None;
    }
    Some(rest[close + 1..].trim())
}

/// Parameters decoded without allocating (see [`bind_params`]); more spill
/// into a Vec.
pub(super) const INLINE_PARAMS: usize = 4;

/// Decodes a Bind's parameters for routing, with the types from the Parse
/// (`param_types`: count, then OIDs). The values are borrowed from the
/// frame; up to `inline.len()` parameters go into `inline`, more into
/// `spill`, so the usual Bind costs no allocation.
pub(super) fn bind_params<'a, 's>(
    bind: &Bind<'a>,
    param_types: &[u8],
    inline: &'s mut [Param<'a>],
    spill: &'s mut Vec<Param<'a>>,
) -> Result<&'s [Param<'a>], ProtocolError> {
    let mut types = Cursor::new(b'P', param_types);
    let declared = types.i16()?.max(0) as usize;
    let oids = types.bytes(declared * 4)?;
    let mut cursor = Cursor::new(b'B', bind.rest);
    let format_count = cursor.i16()?.max(0) as usize;
    let formats = cursor.bytes(format_count * 2)?;
    let count = cursor.i16()?.max(0) as usize;
    if format_count > 1 && format_count != count {
        return Err(ProtocolError::Malformed {
            tag: b'B',
            what: "parameter format count does not match the parameter count",
        });
    }
    let mut next = |i: usize| -> Result<Param<'a>, ProtocolError> {
        let len = cursor.i32()?;
        let value = if len < 0 {
            None
        } else {
            Some(Cow::Borrowed(cursor.bytes(len as usize)?))
        };
        let f = if format_count == 1 { 0 } else { i };
        let format = match formats.get(f * 2..f * 2 + 2) {
            Some([0, 1]) => ParamFormat::Binary,
            _ => ParamFormat::Text,
        };
        let type_oid = oids
            .get(i * 4..i * 4 + 4)
            .map(|o| u32::from_be_bytes([o[0], o[1], o[2], o[3]]))
            .filter(|o| *o != 0);
        Ok(Param {
            value,
            format,
            type_oid,
        })
    };
    if let Some(slots) = inline.get_mut(..count) {
        for (i, slot) in slots.iter_mut().enumerate() {
            *slot = next(i)?;
        }
        return Ok(slots);
    }
    spill.clear();
    spill.reserve(count);
    for i in 0..count {
        spill.push(next(i)?);
    }
    Ok(spill)
}

impl RouteError {
    /// Errors a fresher catalog (key column types, column orders) may cure.
    fn may_need_catalog(&self) -> bool {
        matches!(
            self,
            RouteError::TypeNeeded(_) | RouteError::ColumnOrderUnknown(_)
        )
    }
}

pub(super) fn route_error(error: RouteError) -> ProxyError {
    ProxyError::error(error.sqlstate(), error.to_string())
}

impl Session {
    pub(super) fn router(&self) -> Option<Arc<Router>> {
        self.shared.router.clone()
    }

    /// The route of one statement: a leading hint comment wins, then the
    /// session's `shardgate.shard`, then its `shardgate.sharding_key`, then
    /// the analysis. Re-reads the catalog once when it lacks a fact.
    pub(super) async fn route(
        &self,
        router: &Router,
        memo: &mut Memo,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<(Route, bool), ProxyError> {
        let decide = |session: &Session, memo: &mut Memo| -> Result<(Route, bool), RouteError> {
            memo.forget_last();
            if leading_hint(sql).is_none() {
                let kind = || {
                    router
                        .statement_kind(sql)
                        .map_or(true, super::multi::writes)
                };
                if let Some(shard) = session.session_shard {
                    return Ok((Route::Single(shard), kind()));
                }
                if let Some(key) = &session.session_key {
                    return Ok((Route::Single(router.hinted_key(sql, key)?), kind()));
                }
            }
            router
                .route_statement_memo(memo, sql, params)
                .map(|(route, kind)| (route, super::multi::writes(kind)))
        };
        match decide(self, memo) {
            Err(error)
                if error.may_need_catalog() && Box::pin(self.shared.refresh_catalog()).await =>
            {
                decide(self, memo).map_err(route_error)
            }
            other => other.map_err(route_error),
        }
    }

    /// `SET shardgate.tenant = 'name'` (schema-per-tenant maps): every
    /// statement goes to the tenant's shard with `search_path` set to the
    /// tenant's schema; `RESET shardgate.tenant` undoes both.
    pub(super) fn set_tenant(&mut self, tenant: Option<String>) -> Result<(), ProxyError> {
        if self.status != b'I' {
            return Err(ProxyError::error(
                "25001",
                "shardgate.tenant cannot change inside a transaction block",
            ));
        }
        let Some(tenant) = tenant else {
            self.session_shard = None;
            self.settings.set_now("search_path", None);
            return self.apply_search_path_now();
        };
        let Some(router) = self.router() else {
            return Err(ProxyError::error(
                "0A000",
                "shardgate.tenant needs a shard map with a tenant function in schema mode",
            ));
        };
        let map = router.map();
        let Some(function) = map.functions.iter().find(|f| f.schema_template.is_some()) else {
            return Err(ProxyError::error(
                "0A000",
                "shardgate.tenant needs a tenant function with `mode: schema` in the shard map",
            ));
        };
        let shard = function
            .function
            .shard_for(&crate::sharding::KeyValue::Text(tenant.clone()))
            .map_err(|e| ProxyError::error("22023", format!("tenant \"{tenant}\": {e}")))?;
        let schema = function
            .schema_template
            .as_deref()
            .unwrap_or("{tenant}")
            .replace("{tenant}", &tenant);
        self.session_shard = Some(shard);
        self.settings.set_now(
            "search_path",
            Some(format!("\"{}\"", schema.replace('"', "\"\""))),
        );
        self.apply_search_path_now()
    }

    /// An attached backend gets the session's settings now (the next
    /// checkout would replay them anyway).
    fn apply_search_path_now(&mut self) -> Result<(), ProxyError> {
        if let Some(attached) = self.backend.as_mut() {
            if attached.shard != self.session_shard.unwrap_or(attached.shard) {
                return Ok(());
            }
            let sql = self.settings.replay_sql();
            synth::query(&mut self.backend_out, &sql);
            self.queue.sent(super::Expect::HiddenQuery);
            attached
                .conn
                .set_settings_signature(self.settings.signature());
        }
        Ok(())
    }

    /// What to do with a routed simple query.
    pub(super) fn destination(&self, sql: &str, route: Route) -> Destination {
        match route {
            Route::Single(shard) => Destination::Shard(shard),
            Route::AnyOne => Destination::AnyShard,
            Route::NoShard => {
                if !self.others.is_empty() {
                    return match tx_verb(sql) {
                        Some(TxVerb::Commit) => Destination::EndMulti { commit: true },
                        Some(TxVerb::Rollback) => Destination::EndMulti { commit: false },
                        _ if participant_control(sql) => Destination::EveryParticipant,
                        // A failed transaction: its backend answers 25P02.
                        _ if self.status == b'E' && self.backend.is_some() => Destination::Current,
                        _ => {
                            Destination::Refuse(super::multi::control_in_multi_shard_transaction())
                        }
                    };
                }
                if self.backend.is_some() {
                    return Destination::Current;
                }
                match tx_verb(sql) {
                    Some(TxVerb::Begin) if self.status == b'I' => Destination::DeferBegin,
                    Some(TxVerb::Commit) if self.deferred_begin.is_some() => {
                        Destination::EndDeferred { commit: true }
                    }
                    Some(TxVerb::Rollback) if self.deferred_begin.is_some() => {
                        Destination::EndDeferred { commit: false }
                    }
                    _ => Destination::Current,
                }
            }
            other => Destination::Shards(other),
        }
    }

    /// Routes a simple query and attaches its backend; `Ready`: forward it.
    /// Routes a simple Query and attaches what it needs. `effects`: the
    /// statement's session effects when already known; set (and noted)
    /// once routed. A read of `pg_prepared_statements` is answered from the
    /// client's own statements: the rewritten text is routed and sent here.
    pub(super) async fn attach_query(
        &mut self,
        router: &Router,
        frame: &[u8],
        sql: &str,
        effects: &mut Option<StatementEffects>,
    ) -> Attach {
        // Boxed, as the other rare paths below: their state would otherwise
        // be part of every idle session's future (bench/idle_connections.sh).
        let copy = if !super::copy::starts_with_copy(sql) {
            None
        } else if self.text_transcoded {
            // COPY's statement goes to the shards as text too.
            self.report(super::non_utf8_unroutable(self.client_encoding()), false);
            return Attach::Failed;
        } else {
            self.note_effects(scan_statement(sql));
            Box::pin(self.routed_copy_in(router, frame, sql)).await
        };
        if let Some(handled) = copy {
            return handled;
        }
        if let Some(statement) = explain_shards(sql) {
            let explanation = crate::router::explain::explain(router, statement, &[]);
            let lines: Vec<&str> = explanation.lines().collect();
            let mut out = BytesMut::new();
            synth::text_result(&mut out, "SHARD PLAN", &lines, "EXPLAIN");
            synth::ready_for_query(&mut out, self.status);
            self.queue.local(out, &mut self.client_out);
            return Attach::Answered;
        }
        let mut memo = std::mem::take(&mut self.route_memo);
        let routed = self.route(router, &mut memo, sql, &[]).await;
        self.route_memo = memo;
        let (route, writes) = match routed {
            Ok(routed) => routed,
            Err(error) => {
                self.report(error, false);
                return Attach::Failed;
            }
        };
        self.statement_writes = writes;
        let found = match *effects {
            Some(known) => known,
            None => self.route_memo.effects(sql),
        };
        if found.reads_prepared_view && effects.is_none() {
            self.learn_inferred_parameter_types().await;
            if let Some((query, text)) = self.prepared_view_query(found, sql) {
                let mut known = Some(found);
                let attach = Box::pin(self.attach_query(router, &query, &text, &mut known)).await;
                if attach != Attach::Ready {
                    return attach;
                }
                self.send_query(&query, &text, found);
                return Attach::Answered;
            }
        }
        *effects = Some(found);
        self.note_effects(found);
        let verb = tx_verb(sql);
        let attach = match self.destination(sql, route) {
            Destination::Shard(shard) => self.attach_shard(shard, false).await,
            Destination::AnyShard => self.attach_any(router, false).await,
            Destination::Current => self.attach_for(None, false).await,
            Destination::DeferBegin => {
                self.defer_begin(frame);
                return Attach::Answered;
            }
            Destination::EndDeferred { commit } => {
                self.end_deferred(commit);
                return Attach::Answered;
            }
            Destination::EndMulti { commit } => {
                if !self.queue.is_empty() {
                    return Attach::Wait;
                }
                Box::pin(self.end_multi(commit)).await;
                return Attach::Answered;
            }
            Destination::EveryParticipant => {
                if !self.queue.is_empty() {
                    return Attach::Wait;
                }
                Box::pin(self.on_every_participant(sql, None)).await;
                return Attach::Answered;
            }
            Destination::Refuse(error) => {
                self.report(error, false);
                return Attach::Failed;
            }
            Destination::Shards(_) if self.text_transcoded => {
                // The fan-out sends the text again: it would go out as UTF-8.
                self.report(super::non_utf8_unroutable(self.client_encoding()), false);
                return Attach::Failed;
            }
            Destination::Shards(route) => {
                return Box::pin(self.fanout_query(router, sql, route)).await
            }
        };
        if attach == Attach::Ready {
            if verb == Some(TxVerb::Begin) {
                self.transaction_begin = Some(frame.to_vec());
            }
            if self.status != b'I' && participant_control(sql) {
                // A shard joining this transaction later gets it too.
                self.transaction_replay.push(sql.to_string());
            }
            if writes && !self.note_write(false) {
                return Attach::Failed;
            }
        }
        attach
    }

    /// Holds a BEGIN back (the client sees it succeed, as Postgres would).
    pub(super) fn defer_begin(&mut self, frame: &[u8]) {
        self.deferred_begin = Some(frame.to_vec());
        self.transaction_begin = Some(frame.to_vec());
        self.status = b'T';
        self.batch_status_before = b'T';
        let mut out = BytesMut::new();
        synth::command_complete(&mut out, "BEGIN");
        synth::ready_for_query(&mut out, self.status);
        self.queue.local(out, &mut self.client_out);
    }

    /// COMMIT / ROLLBACK of a transaction that never needed a shard.
    pub(super) fn end_deferred(&mut self, commit: bool) {
        self.deferred_begin = None;
        self.transaction_begin = None;
        self.transaction_replay.clear();
        self.settings
            .batch_done(b'T', b'I', false, Some(commit && self.status == b'T'));
        // Postgres answers COMMIT of a failed transaction with ROLLBACK.
        let tag = if commit && self.status == b'T' {
            "COMMIT"
        } else {
            "ROLLBACK"
        };
        self.status = b'I';
        self.batch_status_before = b'I';
        let mut out = BytesMut::new();
        synth::command_complete(&mut out, tag);
        synth::ready_for_query(&mut out, self.status);
        self.queue.local(out, &mut self.client_out);
    }

    /// Routes a Bind: its statement's text with these parameters. Returns
    /// false when the client has been sent an error instead.
    pub(super) async fn route_bind(&mut self, router: &Router, bind: &Bind<'_>) -> Attach {
        let mut memo = std::mem::take(&mut self.route_memo);
        let decided = if bind.statement.is_empty() {
            if self.unnamed_text.is_empty() {
                // No unnamed statement: the backend answers 26000.
                None
            } else {
                let parse = Parse {
                    name: "",
                    query: &self.unnamed_text,
                    param_types: &self.unnamed_types,
                };
                Some(self.route_parsed(router, &mut memo, bind, parse).await)
            }
        } else {
            match self.statements.text_of(bind.statement) {
                Some((query, param_types)) => {
                    let parse = Parse {
                        name: bind.statement,
                        query,
                        param_types,
                    };
                    Some(self.route_parsed(router, &mut memo, bind, parse).await)
                }
                // Unknown statement: the caller reports 26000.
                None => None,
            }
        };
        self.route_memo = memo;
        let route = match decided {
            None => return self.attach_for(None, true).await,
            Some(Ok((route, writes))) => {
                self.statement_writes = writes;
                route
            }
            Some(Err(error)) => {
                self.report(error, true);
                return Attach::Failed;
            }
        };
        let no_shard = matches!(route, Route::NoShard);
        let attach = match route {
            Route::NoShard if !self.others.is_empty() => self.bind_end_multi(bind),
            Route::NoShard if self.backend.is_none() => match self.bound_verb(bind) {
                Some(TxVerb::Begin) if self.status == b'I' => {
                    let sql = self.bound_text(bind).unwrap_or("BEGIN").to_string();
                    self.hold(bind, super::fanout::Held::Begin(sql))
                }
                Some(verb @ (TxVerb::Commit | TxVerb::Rollback))
                    if self.deferred_begin.is_some() =>
                {
                    self.hold(
                        bind,
                        super::fanout::Held::EndDeferred(verb == TxVerb::Commit),
                    )
                }
                _ => self.attach_any(router, true).await,
            },
            Route::Single(shard) => self.attach_shard(shard, true).await,
            Route::AnyOne | Route::NoShard => self.attach_any(router, true).await,
            other => {
                let statement = if bind.statement.is_empty() {
                    self.unnamed_parse
                        .get(5..)
                        .and_then(|body| Parse::decode(body).ok())
                        .map(|p| (p.query.to_string(), p.param_types.to_vec()))
                } else {
                    self.statements
                        .text_of(bind.statement)
                        .map(|(q, t)| (q.to_string(), t.to_vec()))
                };
                match statement {
                    Some((sql, types)) => self.bind_fanout(bind, other, &sql, &types),
                    None => {
                        self.report(multi_shard_unavailable(&other), true);
                        Attach::Failed
                    }
                }
            }
        };
        if attach == Attach::Ready && no_shard && self.status != b'I' {
            // A savepoint or SET of a one-shard transaction: a shard joining
            // it later gets it too (as for a simple query).
            let control = self
                .bound_text(bind)
                .filter(|text| participant_control(text))
                .map(str::to_string);
            self.transaction_replay.extend(control);
        }
        if attach == Attach::Ready && self.statement_writes && !self.note_write(true) {
            return Attach::Failed;
        }
        attach
    }

    async fn route_parsed(
        &self,
        router: &Router,
        memo: &mut Memo,
        bind: &Bind<'_>,
        parse: Parse<'_>,
    ) -> Result<(Route, bool), ProxyError> {
        let mut inline: [Param<'_>; INLINE_PARAMS] = std::array::from_fn(|_| Param::null());
        let mut spill = Vec::new();
        let params = bind_params(bind, parse.param_types, &mut inline, &mut spill)
            .map_err(|e| ProxyError::error("08P01", format!("invalid Bind message: {e}")))?;
        self.route(router, memo, parse.query, params).await
    }

    /// The SQL text of the statement a Bind names.
    fn bound_text(&self, bind: &Bind<'_>) -> Option<&str> {
        if bind.statement.is_empty() {
            (!self.unnamed_text.is_empty()).then_some(self.unnamed_text.as_str())
        } else {
            self.statements.text_of(bind.statement).map(|(q, _)| q)
        }
    }

    fn bound_verb(&self, bind: &Bind<'_>) -> Option<TxVerb> {
        self.bound_text(bind).and_then(tx_verb)
    }

    /// Keeps a transaction-control portal for shardgate to answer at Execute.
    fn hold(&mut self, bind: &Bind<'_>, held: super::fanout::Held) -> Attach {
        self.pending_portal = Some(super::fanout::PendingPortal::held(bind.portal, held));
        self.queue
            .local_slice(synth::BIND_COMPLETE, &mut self.client_out);
        Attach::Answered
    }

    /// Execute of a held transaction-control portal (no ReadyForQuery: the
    /// batch's Sync answers with the new status).
    pub(super) fn execute_held(&mut self, held: super::fanout::Held, described: bool) {
        let mut out = BytesMut::new();
        if described {
            out.extend_from_slice(&[b'n', 0, 0, 0, 4]);
        }
        match held {
            super::fanout::Held::Begin(sql) => {
                let mut frame = BytesMut::new();
                synth::query(&mut frame, &sql);
                self.deferred_begin = Some(frame.to_vec());
                self.transaction_begin = Some(frame.to_vec());
                self.status = b'T';
                self.batch_status_before = b'T';
                synth::command_complete(&mut out, "BEGIN");
            }
            super::fanout::Held::EndDeferred(commit) => {
                let committed = commit && self.status == b'T';
                self.deferred_begin = None;
                self.transaction_begin = None;
                self.transaction_replay.clear();
                self.settings.batch_done(b'T', b'I', false, Some(committed));
                self.status = b'I';
                self.batch_status_before = b'I';
                synth::command_complete(&mut out, if committed { "COMMIT" } else { "ROLLBACK" });
            }
            super::fanout::Held::DeallocateAll => {
                self.statements.clear();
                synth::command_complete(&mut out, "DEALLOCATE ALL");
            }
        }
        self.queue.local(out, &mut self.client_out);
    }

    /// Attaches the backend for a statement any shard can answer.
    pub(super) async fn attach_any(&mut self, router: &Router, extended: bool) -> Attach {
        if self.backend.is_some() {
            return Attach::Ready;
        }
        let shard = self.session_shard.unwrap_or_else(|| self.any_shard(router));
        if self.session_shard.is_some() || self.shared.fanout.type_oids().is_active() {
            // The client chose the shard, or catalog reads must come from
            // the first shard (their rows carry its type OIDs).
            return self.attach_shard(shard, extended).await;
        }
        // Any shard will do, so a shard that cannot be reached is passed
        // over for the next (#15-3): a dead shard fails only its own keys.
        let order = self.shared.suspects.order(shard);
        let count = order.len();
        for (tried, candidate) in order.into_iter().enumerate() {
            match self.checkout(candidate).await {
                Ok(()) => return Attach::Ready,
                Err(error) if tried + 1 < count && unreachable(&error) => {
                    self.shared.suspects.mark(candidate);
                    tracing::debug!(%error, "any-shard statement: trying the next shard");
                }
                Err(error) => {
                    let error = ProxyError::error(error.sqlstate(), error.to_string());
                    self.report(error, extended);
                    return Attach::Failed;
                }
            }
        }
        Attach::Failed
    }

    /// A shard for a statement any shard can answer: round-robin, or the
    /// first shard while user-defined types have different OIDs on the
    /// shards (catalog reads must answer with the OIDs clients see).
    pub(super) fn any_shard(&self, router: &Router) -> usize {
        if self.shared.fanout.type_oids().is_active() {
            return 0;
        }
        router.pick_any()
    }
}

impl Session {
    /// Describe of a statement while no backend is attached (routing mode):
    /// any shard knows its parameter and row types, so one is borrowed just
    /// for this, outside the client's (possibly held-back) transaction, and
    /// its answer is queued for the client. The statement's Bind later
    /// routes freely. `Some` when a shard described it (the statement is
    /// valid): the shape of its result columns (`prepared::result_shape`).
    pub(super) async fn describe_aside(
        &mut self,
        router: &Router,
        query: &str,
        param_types: &[u8],
    ) -> Option<u64> {
        let preferred = self.session_shard.unwrap_or_else(|| self.any_shard(router));
        // Any shard knows the types; one that cannot be reached, or whose
        // backend dies on the way, is passed over (#15-3: asyncpg prepares
        // with Parse/Describe/Flush before it binds, so a dead shard failed
        // clients of the live ones).
        let order = if self.session_shard.is_some() {
            vec![preferred]
        } else {
            self.shared.suspects.order(preferred)
        };
        let count = order.len();
        let mut answer = Err(ProxyError::error(
            "08006",
            "no shard to describe the statement",
        ));
        let query_timeout = self.shared.config.pool.query_timeout;
        for (tried, shard) in order.into_iter().enumerate() {
            // A Describe only plans: while another shard could answer, one
            // that takes longer than DESCRIBE_PATIENCE is passed over
            // instead of awaited for the whole query_timeout (a hung shard
            // is marked suspect only after its first failure, so the first
            // clients of a hang would otherwise wait that long).
            let patience = if tried + 1 < count && !query_timeout.is_zero() {
                query_timeout.min(DESCRIBE_PATIENCE)
            } else if tried + 1 < count {
                DESCRIBE_PATIENCE
            } else {
                query_timeout
            };
            answer = self.describe_on(shard, query, param_types, patience).await;
            let failed = match &answer {
                Err(error) => not_answering(error.code),
                Ok(Answer::Failed(frames)) => is_fatal(frames),
                Ok(Answer::Described(_)) => false,
            };
            if !failed {
                break;
            }
            self.shared.suspects.mark(shard);
            if tried + 1 < count {
                tracing::debug!(shard, "describe: the shard did not answer; trying the next");
            }
        }
        match answer {
            Ok(Answer::Described(frames)) => {
                let shape = crate::protocol::messages::result_shape_in(&frames);
                self.queue.local(frames, &mut self.client_out);
                // A malformed answer cannot be compared later: no record.
                return Some(shape.unwrap_or(0));
            }
            // The shard's own error, every field kept.
            Ok(Answer::Failed(frames)) => self.report_frames(frames, true),
            Err(error) => self.report(error, true),
        }
        None
    }

    /// Before the client reads `pg_prepared_statements`: the parameter
    /// types the server infers for its statements that declared none are
    /// learnt (once each) from a Describe on the side, on the attached
    /// backend's shard (or the first). Without it a statement that ran
    /// only on other shards' backends, or over several shards, showed `-`
    /// (psycopg's `test_untyped_json`). A shard that cannot describe it
    /// leaves what the client declared.
    pub(super) async fn learn_inferred_parameter_types(&mut self) {
        let needing = self.statements.needing_inferred_types();
        if needing.is_empty() {
            return;
        }
        let shard = self
            .backend
            .as_ref()
            .map_or(self.session_shard.unwrap_or(0), |a| a.shard);
        let patience = self.shared.config.pool.query_timeout;
        let in_transaction = self
            .backend
            .as_ref()
            .is_some_and(|a| a.conn.transaction_status() == b'T');
        for (name, query, param_types) in needing {
            let answer = if in_transaction {
                self.describe_in_transaction(&query, &param_types).await
            } else {
                self.describe_on(shard, &query, &param_types, patience)
                    .await
            };
            let types = match answer {
                Ok(Answer::Described(frames)) => {
                    crate::protocol::messages::parameter_types_in(&frames)
                }
                _ => None,
            };
            if let Some(types) = types {
                self.statements.set_inferred_types(&name, types);
            }
        }
    }

    /// A Describe on the backend of the client's open transaction, which
    /// may name what only that transaction sees (psycopg's tests create
    /// their table in it), inside a savepoint, so that a failure leaves the
    /// transaction as it was. It replaces the backend's unnamed statement,
    /// which is sent again when the client uses its own.
    async fn describe_in_transaction(
        &mut self,
        query: &str,
        param_types: &[u8],
    ) -> Result<Answer, ProxyError> {
        let not_now = || ProxyError::error("55000", "the backend owes earlier answers");
        if !self.queue.is_empty() || !self.backend_out.is_empty() {
            return Err(not_now());
        }
        let type_oids = self.shared.fanout.type_oids().get();
        let Some(attached) = self.backend.as_mut() else {
            return Err(not_now());
        };
        let shard = attached.shard;
        let type_oids = type_oids.filter(|_| shard != 0);
        let mut savepoint = BytesMut::new();
        synth::query(&mut savepoint, "SAVEPOINT shardgate_describe");
        if !matches!(
            exchange(&mut attached.conn, &savepoint).await?,
            Answer::Described(_)
        ) {
            return Err(not_now());
        }
        let request = describe_request(query, param_types, type_oids.as_deref(), shard);
        let mut answer = exchange(&mut attached.conn, &request).await;
        self.unnamed_on_backend = false;
        let undo = match &answer {
            Ok(Answer::Described(_)) => "RELEASE SAVEPOINT shardgate_describe",
            _ => "ROLLBACK TO SAVEPOINT shardgate_describe; RELEASE SAVEPOINT shardgate_describe",
        };
        let mut release = BytesMut::new();
        synth::query(&mut release, undo);
        if !matches!(
            exchange(&mut attached.conn, &release).await,
            Ok(Answer::Described(_))
        ) {
            // The transaction's state is no longer known: the backend goes.
            attached.conn.mark_broken();
        }
        if let (Some(map), Ok(Answer::Described(frames))) = (&type_oids, &mut answer) {
            rewrite_description_frames(map, shard, frames);
        }
        answer
    }

    /// One attempt of [`Session::describe_aside`] on `shard`, given up after
    /// `patience` (zero: none).
    async fn describe_on(
        &mut self,
        shard: usize,
        query: &str,
        param_types: &[u8],
        patience: std::time::Duration,
    ) -> Result<Answer, ProxyError> {
        let Some(pool) = self.shared.pools.get(shard) else {
            return Err(ProxyError::error("08006", "no such shard"));
        };
        let mut conn = super::checkout_within(pool, patience)
            .await
            .map_err(|error| ProxyError::error(error.sqlstate(), error.to_string()))?;
        // The statement must resolve names as the session would.
        if conn.settings_signature() != self.settings.signature() {
            let sql = self.settings.replay_sql();
            match crate::executor::control::run(&mut conn, &sql).await {
                Ok(_) => conn.set_settings_signature(self.settings.signature()),
                Err(error) => {
                    pool.release(conn).await;
                    return Err(error.to_proxy_error());
                }
            }
        }
        let type_oids = self.shared.fanout.type_oids().get().filter(|_| shard != 0);
        let request = describe_request(query, param_types, type_oids.as_deref(), shard);
        let mut answer = if patience.is_zero() {
            exchange(&mut conn, &request).await
        } else {
            match tokio::time::timeout(patience, exchange(&mut conn, &request)).await {
                Ok(answer) => answer,
                Err(_) => {
                    conn.mark_broken();
                    Err(ProxyError::error(
                        "57014",
                        format!(
                            "canceling statement due to query_timeout: shard \"{}\" did not answer within {patience:?}",
                            self.shard_name(shard)
                        ),
                    ))
                }
            }
        };
        if matches!(&answer, Ok(Answer::Failed(frames)) if is_fatal(frames)) {
            conn.mark_broken();
        }
        pool.release(conn).await;
        if let (Some(map), Ok(Answer::Described(frames))) = (&type_oids, &mut answer) {
            // In the OIDs clients see (the first shard's).
            rewrite_description_frames(map, shard, frames);
        }
        answer
    }
}

/// How long a Describe waits for one shard while others could answer it.
const DESCRIBE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// A checkout failure that says the shard cannot be reached now (down,
/// refusing, not answering), as opposed to a full pool or a refused login.
fn unreachable(error: &BackendError) -> bool {
    !matches!(error, BackendError::Protocol { .. }) && not_answering(error.sqlstate())
}

/// SQLSTATEs that say the shard is not answering now: connection failures
/// (08), starting up / shutting down / crashed (57P), past `query_timeout`.
fn not_answering(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("57P") || code == "57014"
}

/// An ErrorResponse that ends the backend (FATAL or PANIC).
fn is_fatal(frames: &[u8]) -> bool {
    frames.first() == Some(&tag::ERROR_RESPONSE)
        && frames.len() > 5
        && matches!(
            crate::protocol::messages::error_fields(&frames[5..]).severity,
            "FATAL" | "PANIC"
        )
}

/// ParameterDescription and RowDescription frames of `shard` rewritten to
/// the type OIDs clients see.
fn rewrite_description_frames(
    map: &crate::protocol::type_oids::TypeOids,
    shard: usize,
    frames: &mut BytesMut,
) {
    let mut at = 0;
    while at + 5 <= frames.len() {
        let kind = frames[at];
        let length = u32::from_be_bytes([
            frames[at + 1],
            frames[at + 2],
            frames[at + 3],
            frames[at + 4],
        ]);
        let end = at + 1 + length as usize;
        if end > frames.len() || length < 4 {
            return;
        }
        let body = &mut frames[at + 5..end];
        match kind {
            tag::ROW_DESCRIPTION => map.rewrite_row_description(shard, body),
            tag::PARAMETER_DESCRIPTION => map.rewrite_parameter_description(shard, body),
            _ => {}
        }
        at = end;
    }
}

enum Answer {
    /// ParameterDescription and RowDescription / NoData.
    Described(BytesMut),
    /// The shard's ErrorResponse.
    Failed(BytesMut),
}

/// Parse of `query` as the unnamed statement, its Describe and a Sync,
/// with declared types in `shard`'s OIDs.
fn describe_request(
    query: &str,
    param_types: &[u8],
    type_oids: Option<&crate::protocol::type_oids::TypeOids>,
    shard: usize,
) -> BytesMut {
    let mut request = BytesMut::new();
    Parse {
        name: "",
        query,
        param_types,
    }
    .encode_as("", &mut request);
    if let Some(map) = type_oids {
        map.rewrite_parse_frames(shard, &mut request);
    }
    request.put_u8(tag::DESCRIBE);
    request.put_i32(6);
    request.put_slice(b"S\0");
    synth::sync(&mut request);
    request
}

/// Sends `request` (ending in Sync) and collects the describe answer.
async fn exchange(
    conn: &mut crate::backend::BackendConnection,
    request: &[u8],
) -> Result<Answer, ProxyError> {
    let name = conn.shard_name().to_string();
    let lost = |e: &dyn std::fmt::Display| {
        ProxyError::error(
            "08006",
            format!("lost the connection to shard \"{name}\": {e}"),
        )
    };
    if let Err(e) = conn.write_all(request).await {
        return Err(lost(&e));
    }
    let mut input = BytesMut::new();
    let mut described = BytesMut::new();
    let mut failed: Option<BytesMut> = None;
    loop {
        loop {
            let (kind, status, total) = match next_frame(&input, MAX_BACKEND_MESSAGE) {
                Ok(Some((frame, total))) => (frame.tag, frame.body.first().copied(), total),
                Ok(None) => break,
                Err(e) => {
                    conn.mark_broken();
                    return Err(lost(&e));
                }
            };
            let frame = input.split_to(total);
            match kind {
                tag::PARAMETER_DESCRIPTION | tag::ROW_DESCRIPTION | tag::NO_DATA => {
                    described.extend_from_slice(&frame);
                }
                tag::ERROR_RESPONSE => failed = Some(frame),
                tag::READY_FOR_QUERY => {
                    conn.set_transaction_status(status.unwrap_or(b'I'));
                    return Ok(match failed {
                        Some(error) => Answer::Failed(error),
                        None => Answer::Described(described),
                    });
                }
                _ => {}
            }
        }
        match conn.read_buf(&mut input).await {
            Ok(0) => return Err(lost(&"end of stream")),
            Ok(_) => {}
            Err(e) => return Err(lost(&e)),
        }
    }
}

/// A multi-shard statement whose text shardgate no longer has (it keeps
/// the text of every statement it routes, so this is a defensive refusal).
pub(super) fn multi_shard_unavailable(route: &Route) -> ProxyError {
    ProxyError::error(
        "0A000",
        format!(
            "this statement needs several shards (route: {}), but shardgate has not kept its text",
            route.name()
        ),
    )
    .with_hint("prepare the statement again, or name a shard with /* shardgate: shard=NAME */")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explain_shards_is_recognised() {
        assert_eq!(
            explain_shards("EXPLAIN (SHARDS) SELECT 1"),
            Some("SELECT 1")
        );
        assert_eq!(
            explain_shards("  explain ( shards )select 1"),
            Some("select 1")
        );
        assert_eq!(explain_shards("EXPLAIN (ANALYZE) SELECT 1"), None);
        assert_eq!(explain_shards("EXPLAIN SELECT 1"), None);
        assert_eq!(explain_shards("EXPLAİN (SHARDS) x"), None);
    }

    #[test]
    fn transaction_verbs() {
        assert_eq!(tx_verb("BEGIN"), Some(TxVerb::Begin));
        assert_eq!(
            tx_verb("begin isolation level serializable;"),
            Some(TxVerb::Begin)
        );
        assert_eq!(tx_verb("START TRANSACTION READ ONLY"), Some(TxVerb::Begin));
        assert_eq!(tx_verb("commit"), Some(TxVerb::Commit));
        assert_eq!(tx_verb("END WORK"), Some(TxVerb::Commit));
        assert_eq!(tx_verb("ROLLBACK"), Some(TxVerb::Rollback));
        assert_eq!(tx_verb("abort transaction"), Some(TxVerb::Rollback));
        assert_eq!(tx_verb("ROLLBACK TO SAVEPOINT a"), None);
        assert_eq!(tx_verb("COMMIT PREPARED 'x'"), None);
        assert_eq!(tx_verb("BEGIN; SELECT 1"), None);
        assert_eq!(tx_verb("START"), None);
    }

    #[test]
    fn bind_parameters_decode_with_formats_and_types() {
        // Two parameters: text '42' (declared int8) and binary int4 7.
        let mut rest = Vec::new();
        rest.extend_from_slice(&2i16.to_be_bytes());
        rest.extend_from_slice(&0i16.to_be_bytes());
        rest.extend_from_slice(&1i16.to_be_bytes());
        rest.extend_from_slice(&2i16.to_be_bytes());
        rest.extend_from_slice(&2i32.to_be_bytes());
        rest.extend_from_slice(b"42");
        rest.extend_from_slice(&4i32.to_be_bytes());
        rest.extend_from_slice(&7i32.to_be_bytes());
        rest.extend_from_slice(&0i16.to_be_bytes());
        let bind = Bind {
            portal: "",
            statement: "",
            rest: &rest,
        };
        let mut types = Vec::new();
        types.extend_from_slice(&1i16.to_be_bytes());
        types.extend_from_slice(&20u32.to_be_bytes());
        let (mut inline, mut spill) = ([Param::null(), Param::null()], Vec::new());
        let params = bind_params(&bind, &types, &mut inline, &mut spill).unwrap();
        assert_eq!(params.len(), 2);
        assert_eq!(params[0], Param::typed_text("42", 20));
        assert_eq!(params[1], Param::binary(&7i32.to_be_bytes(), None));
        // More parameters than inline slots spill into the Vec.
        let (mut one, mut spill) = ([Param::null()], Vec::new());
        let params = bind_params(&bind, &types, &mut one, &mut spill).unwrap();
        assert_eq!(params.len(), 2);
        assert_eq!(params[1], Param::binary(&7i32.to_be_bytes(), None));
        let truncated = Bind {
            rest: &rest[..9],
            ..bind
        };
        let (mut inline, mut spill) = ([Param::null(), Param::null()], Vec::new());
        assert!(bind_params(&truncated, &types, &mut inline, &mut spill).is_err());
        // One format code applies to every parameter.
        let mut rest = Vec::new();
        rest.extend_from_slice(&1i16.to_be_bytes());
        rest.extend_from_slice(&1i16.to_be_bytes());
        rest.extend_from_slice(&2i16.to_be_bytes());
        for v in [1i32, 2] {
            rest.extend_from_slice(&4i32.to_be_bytes());
            rest.extend_from_slice(&v.to_be_bytes());
        }
        rest.extend_from_slice(&0i16.to_be_bytes());
        let bind = Bind {
            portal: "",
            statement: "",
            rest: &rest,
        };
        let (mut inline, mut spill) = ([Param::null(), Param::null()], Vec::new());
        let params = bind_params(&bind, &[0, 0], &mut inline, &mut spill).unwrap();
        assert_eq!(params[0], Param::binary(&1i32.to_be_bytes(), None));
        assert_eq!(params[1], Param::binary(&2i32.to_be_bytes(), None));
    }
}
