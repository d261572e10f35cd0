//! The per-client message loop: reads client messages, attaches a backend of
//! the right shard when one is needed, forwards frames as bytes, and passes
//! backend answers back in order (see `responses.rs`).
//!
//! Only the messages routing and pooling need are decoded; rows, COPY data
//! and everything else cross as the bytes they arrived as.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use pgwire::tokio::server::MaybeTls;
use tokio::io::AsyncWriteExt;

use super::buffers;
use super::cancel::CancelSlot;
use super::limits::{self, ClientMemory};
use super::prepared::{ClientStatements, ParseAction};
use super::responses::{Disposition, Expect, ResponseQueue};
use super::settings::SessionSettings;
use super::startup::ClientStartup;
use super::stop::StopWhen;
use crate::backend::{release, BackendError, PooledBackend, ResultShape};
use crate::config::PoolMode;
use crate::metrics::Route;
use crate::protocol::messages::{self, Bind, Parse, Target};
use crate::protocol::synth::{self, ProxyError};
use crate::protocol::{frame_length, next_frame, tag, ProtocolError, MAX_BACKEND_MESSAGE};
use crate::router::effects::{scan_statement, StatementEffects};
use crate::router::hints::{self, Hint};
use crate::server::Shared;

mod copy;
mod fanout;
mod multi;
mod portal;
mod routing;

/// The backend serving the client right now.
struct Attached {
    conn: PooledBackend,
    shard: usize,
    /// A statement that may write ran here in the current transaction.
    wrote: bool,
}

/// What became of one client message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Handled (or answered with an error); on to the next message.
    Next,
    /// Not yet: it needs another shard's backend while this one still owes
    /// answers to earlier, complete requests. Retried once they arrived.
    Wait,
    /// Terminate.
    Terminate,
}

/// What a Bind of a described statement may do (see
/// [`Session::check_result_shape`]).
enum ShapeCheck {
    Ready,
    /// The backend's copy is being described: retry once it answered.
    Wait,
    /// It would return other columns than the client was told.
    Changed,
}

/// Whether a backend of the wanted shard is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attach {
    Ready,
    /// The client was sent the error.
    Failed,
    /// Shardgate answered the message itself; nothing goes to a backend.
    Answered,
    /// See [`Step::Wait`].
    Wait,
}

/// Returns from message handling unless the backend is ready.
macro_rules! attach_or_return {
    ($attach:expr) => {
        match $attach {
            Attach::Ready => {}
            Attach::Failed | Attach::Answered => return Ok(Step::Next),
            Attach::Wait => return Ok(Step::Wait),
        }
    };
}

/// Why the loop ended.
enum Exit {
    /// Terminate or EOF from the client.
    Client,
    /// Broken protocol or I/O on the client side; the client was told if possible.
    ClientError,
}

/// What a session's wait is bounded by (see [`Session::deadline`]).
#[derive(Debug, Clone, Copy)]
enum Deadline {
    Query,
    IdleInTransaction,
}

pub struct Session {
    shared: Arc<Shared>,
    client: MaybeTls,
    client_in: BytesMut,
    /// This session's share of `max_client_memory` (see `limits`).
    client_memory: ClientMemory,
    client_out: BytesMut,
    backend: Option<Attached>,
    /// Other shards of a multi-shard transaction, idle in their transaction
    /// block (see `multi`).
    others: Vec<Attached>,
    /// The BEGIN that opened the client's transaction, for shards joining it.
    transaction_begin: Option<Vec<u8>>,
    /// Savepoints and SETs run on every shard of a multi-shard transaction,
    /// in order: replayed after the BEGIN on a shard that joins it later,
    /// so every participant has the same savepoints (see `multi`).
    transaction_replay: Vec<String>,
    /// The statement being attached for may write (for two-phase commit).
    statement_writes: bool,
    /// A bound portal that runs on several shards at its Execute.
    pending_portal: Option<fanout::PendingPortal>,
    /// Multi-shard portals fetched in parts (see `portal`).
    suspended: Vec<portal::SuspendedPortal>,
    /// Complete client messages were left in `client_in` because enough
    /// was queued for the backend (see `BACKEND_WRITE_BATCH`).
    client_backlog: bool,
    /// The current extended batch spans several shards: its implicit
    /// transaction was turned into a regular one on each, and the client's
    /// Sync commits them together (see `multi`).
    implicit_multi: bool,
    /// A Flush went to the current backend since its last request.
    batch_flushed: bool,
    /// Shards of the open transaction whose part of the client's current
    /// extended batch ended without a Sync (the batch moved on to another
    /// shard); each gets its Sync with the client's (see `multi`).
    unsynced: Vec<usize>,
    /// The last statement's analysis (see `router::Memo`).
    route_memo: crate::router::Memo,
    /// A COPY FROM STDIN whose rows shardgate routes to their shards.
    copy_in: Option<Box<copy::CopyIn>>,
    backend_in: BytesMut,
    backend_out: BytesMut,
    /// Bytes of a large backend message still to pass through unparsed.
    passthrough: usize,
    queue: ResponseQueue,
    /// Transaction status last reported to the client.
    status: u8,
    /// The client's extended-protocol batch failed in shardgate; drop until Sync.
    skip_until_sync: bool,
    /// Shard chosen with `SET shardgate.shard`.
    session_shard: Option<usize>,
    /// Key chosen with `SET shardgate.sharding_key`: statements go to its shard.
    session_key: Option<String>,
    /// A BEGIN answered by shardgate and not yet sent: it goes ahead of the
    /// first statement that needs a shard (see `routing`).
    deferred_begin: Option<Vec<u8>>,
    /// The backend of the client's open transaction died between its
    /// statements: the error its next statement gets (see
    /// [`Session::backend_lost`]).
    lost_transaction: Option<ProxyError>,
    /// shardgate reported an error inside the client's transaction block
    /// while the backend's transaction is still healthy: it must be aborted
    /// too, as Postgres would have (done at the batch's Sync).
    abort_backend_transaction: bool,
    settings: SessionSettings,
    statements: ClientStatements,
    /// Outcome of the statements in flight since the last ReadyForQuery.
    batch_failed: bool,
    batch_ended: Option<bool>,
    batch_status_before: u8,
    cancel: CancelSlot,
    /// The stop request (shutdown, KILL) the loop has already woken for.
    stop_seen: Option<StopWhen>,
    mode: PoolMode,
    /// The client did something that lives on its backend beyond the
    /// transaction (LISTEN, temp table, SQL PREPARE, WITH HOLD cursor,
    /// session advisory lock, set_config, SESSION AUTHORIZATION): the backend
    /// stays with this client, and is closed rather than reused afterwards.
    tainted: bool,
    key: (i32, i32),
    /// The client's last unnamed Parse (empty: none), re-sent when a Bind or
    /// Describe for it lands on a backend that does not have it (transaction
    /// pooling moved the client between its Parse+Sync and its Bind).
    unnamed_parse: Vec<u8>,
    /// Text and parameter types of that statement (routing mode), kept
    /// decoded so every Bind routes it without decoding the frame again.
    unnamed_text: String,
    unnamed_types: Vec<u8>,
    /// What `scan_statement` found in that statement's text.
    unnamed_effects: StatementEffects,
    /// Whether the attached backend holds that unnamed statement.
    unnamed_on_backend: bool,
    /// Where the client's last unnamed Parse frame ended in the input, while
    /// shardgate's ParseComplete for it may still be taken back (see
    /// `ensure_unnamed_before`).
    unnamed_answered_end: Option<usize>,
    /// The same for the last named Parse answered by shardgate (routing
    /// mode): a Bind of it right behind takes that answer back, so a Parse
    /// the shard rejects fails at the Parse, as in Postgres (node-postgres
    /// keeps a name whose Parse it saw complete).
    named_answered_end: Option<usize>,
    /// The last Parse text and what `scan_statement` found in it.
    last_scan: Option<(String, StatementEffects)>,
    /// When the first statement since the last ReadyForQuery was forwarded.
    batch_started: Option<Instant>,
    /// When the last ReadyForQuery reached the client (idle-in-transaction
    /// timing).
    ready_at: Instant,
    /// The backend sent a FATAL for the client's statement: the client's
    /// connection closes once it has the message.
    client_closing: bool,
    /// The simple query being routed was converted from a client encoding
    /// other than UTF-8: only its original bytes may reach a shard.
    text_transcoded: bool,
}

impl Session {
    pub fn new(shared: Arc<Shared>, startup: ClientStartup, cancel: CancelSlot) -> Session {
        let mode = shared.config.pool.mode;
        let settings = SessionSettings::from_startup(&startup.settings);
        // Bytes the client pipelined behind its startup packet, if any;
        // otherwise no buffer until data arrives (see `buffers`).
        let client_in = if startup.read_buf.is_empty() {
            BytesMut::new()
        } else {
            BytesMut::from(&startup.read_buf[..])
        };
        let client_memory = shared.limiter.session();
        Session {
            shared,
            client: startup.io,
            client_in,
            client_memory,
            client_out: BytesMut::new(),
            backend: None,
            others: Vec::new(),
            transaction_begin: None,
            transaction_replay: Vec::new(),
            statement_writes: false,
            pending_portal: None,
            suspended: Vec::new(),
            copy_in: None,
            route_memo: crate::router::Memo::default(),
            client_backlog: false,
            implicit_multi: false,
            batch_flushed: false,
            unsynced: Vec::new(),
            backend_in: BytesMut::new(),
            backend_out: BytesMut::new(),
            passthrough: 0,
            queue: ResponseQueue::default(),
            status: b'I',
            skip_until_sync: false,
            session_shard: None,
            session_key: None,
            deferred_begin: None,
            lost_transaction: None,
            abort_backend_transaction: false,
            settings,
            statements: ClientStatements::default(),
            batch_failed: false,
            batch_ended: None,
            batch_status_before: b'I',
            cancel,
            stop_seen: None,
            mode,
            tainted: false,
            key: startup.key,
            batch_started: None,
            ready_at: Instant::now(),
            unnamed_parse: Vec::new(),
            unnamed_text: String::new(),
            unnamed_types: Vec::new(),
            unnamed_effects: StatementEffects::default(),
            unnamed_on_backend: false,
            unnamed_answered_end: None,
            named_answered_end: None,
            last_scan: None,
            client_closing: false,
            text_transcoded: false,
        }
    }

    /// The session's `client_encoding`, as SQL text (may be quoted).
    fn client_encoding(&self) -> Option<&str> {
        self.settings.latest("client_encoding")
    }

    pub fn key(&self) -> (i32, i32) {
        self.key
    }

    /// Runs until the client leaves; the backend is returned clean afterwards.
    pub async fn run(mut self: Box<Self>) {
        let _exit = self.message_loop().await;
        self.detach_on_exit().await;
    }

    async fn message_loop(&mut self) -> Exit {
        loop {
            match self.process_client_input().await {
                Ok(true) => {}
                Ok(false) => {
                    let _ = self.flush_client().await;
                    return Exit::Client;
                }
                Err(error) => {
                    error.encode(&mut self.client_out);
                    let _ = self.flush_client().await;
                    return Exit::ClientError;
                }
            }
            if self.flush_backend().await.is_err() {
                self.backend_lost();
            }
            if self.flush_client().await.is_err() {
                return Exit::ClientError;
            }
            if self.backend.is_none() {
                // Idle between transactions: hold no buffers.
                buffers::park(&mut self.client_in);
                buffers::park(&mut self.client_out);
            }
            if self.stop_now() {
                ProxyError::fatal(
                    "57P01",
                    "terminating connection due to administrator command",
                )
                .encode(&mut self.client_out);
                let _ = self.flush_client().await;
                return Exit::Client;
            }
            // Wait for input from whichever side has something.
            let client_read;
            let mut backend_read = None;
            let deadline = self.deadline();
            let max_message = self.shared.config.limits.max_message_size;
            match self.backend.as_mut() {
                Some(attached) => {
                    buffers::ensure(&mut self.backend_in);
                    let backlog = self.client_backlog;
                    let timer = async {
                        match deadline {
                            Some((at, _)) => tokio::time::sleep_until(at.into()).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        biased;
                        read = attached.conn.read_buf(&mut self.backend_in) => {
                            backend_read = Some(read);
                            client_read = None;
                        }
                        // With a backlog, read no more from the client (backpressure).
                        read = limits::read_client(&mut self.client, &mut self.client_in, &mut self.backend_out, &mut self.client_memory, max_message), if !backlog => client_read = Some(read),
                        // Messages already read wait: no need to wait for more.
                        _ = std::future::ready(()), if backlog => client_read = None,
                        // A shutdown or KILL: decided at the top of the loop.
                        () = self.cancel.stop().wait_beyond(self.stop_seen) => {
                            self.stop_seen = self.cancel.stop().requested();
                            continue;
                        }
                        () = timer => {
                            match deadline.map(|(_, kind)| kind) {
                                Some(Deadline::Query) => {
                                    self.query_timed_out();
                                    continue;
                                }
                                Some(Deadline::IdleInTransaction) | None => {
                                    ProxyError::fatal(
                                        "25P03",
                                        "terminating connection due to idle-in-transaction timeout",
                                    )
                                    .with_detail(format!(
                                        "pool.idle_transaction_timeout is {:?}",
                                        self.shared.config.pool.idle_transaction_timeout
                                    ))
                                    .encode(&mut self.client_out);
                                    let _ = self.flush_client().await;
                                    return Exit::Client;
                                }
                            }
                        }
                    }
                }
                None => {
                    tokio::select! {
                        read = limits::read_client(
                            &mut self.client,
                            &mut self.client_in,
                            &mut self.backend_out,
                            &mut self.client_memory,
                            max_message,
                        ) => client_read = Some(read),
                        () = self.cancel.stop().wait_beyond(self.stop_seen) => {
                            self.stop_seen = self.cancel.stop().requested();
                            continue;
                        }
                    }
                }
            }
            match client_read {
                Some(Ok(0)) | Some(Err(_)) => return Exit::Client,
                _ => {}
            }
            match backend_read {
                Some(Ok(0)) | Some(Err(_)) => self.backend_lost(),
                Some(Ok(_)) => {
                    if let Err(error) = self.process_backend_input().await {
                        tracing::warn!(%error, "malformed message from backend");
                        self.backend_lost();
                    }
                    if self.client_closing {
                        let _ = self.flush_client().await;
                        return Exit::Client;
                    }
                }
                None => {}
            }
        }
    }

    /// Handles every complete client message. `Ok(false)`: the client terminated.
    /// Frames are handled in place (no per-message split of the buffer: a
    /// split turns the buffer shared and costs an allocation per message).
    async fn process_client_input(&mut self) -> Result<bool, ProxyError> {
        let mut input = std::mem::take(&mut self.client_in);
        let mut consumed = 0;
        self.client_backlog = false;
        let result = loop {
            if self.backend_out.len() >= BACKEND_WRITE_BATCH {
                // Write this much, then read the backend's answers before
                // taking more: a pipeline of large requests with large
                // answers would otherwise fill both directions' socket
                // buffers and deadlock (we blocked writing, the backend
                // blocked writing answers nobody read).
                self.client_backlog = true;
                break Ok(true);
            }
            let rest = &input[consumed..];
            let total = match frame_length(rest, self.shared.config.limits.max_message_size) {
                Ok(Some(total)) if rest.len() >= total => total,
                Ok(_) => break Ok(true),
                Err(ProtocolError::TooLarge { tag, length, limit }) => {
                    break Err(limits::too_large(tag, length, limit))
                }
                Err(error) => break Err(protocol_violation(error)),
            };
            match self.handle_client_message(&rest[..total]).await {
                Ok(Step::Next) => consumed += total,
                Ok(Step::Wait) => break Ok(true),
                Ok(Step::Terminate) => break Ok(false),
                Err(error) => break Err(error),
            }
        };
        input.advance(consumed);
        self.client_in = input;
        result
    }

    async fn handle_client_message(&mut self, frame: &[u8]) -> Result<Step, ProxyError> {
        let tag = frame[0];
        let body = &frame[5..];
        if let Some(newest) = self.shared.link.newer_than(self.shared.generation) {
            self.adopt_newest_map(newest);
        }
        if self.skip_until_sync && tag != tag::SYNC && tag != tag::TERMINATE {
            return Ok(Step::Next);
        }
        if self.lost_transaction.is_some() && self.report_lost_transaction(tag, body) {
            return Ok(Step::Next);
        }
        if self.status == b'I' && self.pending_portal.as_ref().is_some_and(|p| p.kept()) {
            // A portal kept past Sync in a transaction block that ended.
            self.pending_portal = None;
        }
        if !self.suspended.is_empty() {
            if self.status == b'I' {
                self.drop_ended_transaction_portals();
            }
            if self.has_live_portal() && self.needs_backends(tag, body) {
                if tag == tag::BIND && body.first() == Some(&0) {
                    // A Bind replacing the unnamed portal stops its fan-out
                    // rather than reading the rest into memory.
                    Box::pin(self.close_portals(|p| !p.is(""))).await;
                }
                Box::pin(self.park_live_portals()).await;
            }
        }
        if self.copy_in.is_some() && tag != tag::TERMINATE {
            // Postgres ignores Flush and Sync during COPY FROM STDIN.
            if matches!(tag, tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL) {
                self.copy_in_message(tag, frame).await;
            }
            return Ok(Step::Next);
        }
        match tag {
            tag::TERMINATE => return Ok(Step::Terminate),
            tag::QUERY => {
                let decoded;
                let sql = match messages::query_text(body) {
                    Ok(sql) => sql,
                    Err(ProtocolError::Utf8 { .. }) => {
                        // A client_encoding other than UTF-8: the shards get
                        // the bytes; shardgate reads them for routing.
                        let raw = messages::query_bytes(body).map_err(protocol_violation)?;
                        decoded = super::encoding::decode(raw, self.client_encoding());
                        if self.shared.router.is_some() && !decoded.exact {
                            self.report(non_utf8_unroutable(self.client_encoding()), false);
                            return Ok(Step::Next);
                        }
                        self.text_transcoded = true;
                        decoded.text.as_str()
                    }
                    Err(error) => return Err(protocol_violation(error)),
                };
                if let Some((name, value)) = hints::shardgate_setting(sql) {
                    self.shardgate_set(name, value)?;
                    return Ok(Step::Next);
                }
                if !self.suspended.is_empty() && Box::pin(self.cursor_statement(sql)).await {
                    return Ok(Step::Next);
                }
                // SQL EXECUTE / DEALLOCATE of the client's protocol-level
                // statements (one namespace in Postgres); nothing to look
                // for when it has none.
                let named = !self.statements.is_empty();
                if let Some((name, rest)) = executed_statement(sql).filter(|_| named) {
                    if self.statements.text_of(name).is_some() {
                        let name = name.to_string();
                        let rest = rest.to_string();
                        return Ok(Box::pin(self.execute_protocol_statement(&name, &rest)).await);
                    }
                }
                if self.deallocates_all_here(sql) {
                    self.statements.clear();
                    let mut out = BytesMut::new();
                    synth::command_complete(&mut out, "DEALLOCATE ALL");
                    synth::ready_for_query(&mut out, self.status);
                    self.queue.local(out, &mut self.client_out);
                    return Ok(Step::Next);
                }
                if let Some(name) = deallocated_name(sql).filter(|_| named) {
                    if self.statements.text_of(name).is_some() {
                        // Protocol and SQL prepared statements share one
                        // namespace in Postgres (psycopg evicts its cache
                        // with `DEALLOCATE _pg3_N`): the client's name goes;
                        // the server copy stays cached for reuse.
                        self.statements.close(name);
                        let mut out = BytesMut::new();
                        synth::command_complete(&mut out, "DEALLOCATE");
                        synth::ready_for_query(&mut out, self.status);
                        self.queue.local(out, &mut self.client_out);
                        return Ok(Step::Next);
                    }
                }
                if let Some(router) = self.router() {
                    // Routed first: the route's memo knows the statement's
                    // effects (see `Memo::effects`).
                    let mut effects = None;
                    let attach = self.attach_query(&router, frame, sql, &mut effects).await;
                    self.text_transcoded = false;
                    attach_or_return!(attach);
                    let effects = effects.unwrap_or_else(|| scan_statement(sql));
                    self.send_query(frame, sql, effects);
                } else {
                    let effects = scan_statement(sql);
                    if effects.reads_prepared_view {
                        self.learn_inferred_parameter_types().await;
                    }
                    let rewritten;
                    let (frame, sql) = match self.prepared_view_query(effects, sql) {
                        Some(query) => {
                            rewritten = query;
                            (&rewritten.0[..], rewritten.1.as_str())
                        }
                        None => (frame, sql),
                    };
                    self.note_effects(effects);
                    attach_or_return!(self.attach_for(route_hint(sql), false).await);
                    self.send_query(frame, sql, effects);
                }
            }
            tag::PARSE
                if self.shared.router.is_some()
                    && !self.unnamed_parse.is_empty()
                    && self.unnamed_parse.as_slice() == frame =>
            {
                // Drivers re-send the same unnamed Parse for every execution:
                // the bytes equal the recorded one, so nothing is decoded or
                // scanned again.
                let effects = self.unnamed_effects;
                self.note_effects(effects);
                if effects.sets {
                    self.settings.statement_sent(&self.unnamed_text);
                }
                self.answer_unnamed_parse(frame);
                return Ok(Step::Next);
            }
            tag::PARSE => {
                let parse = match Parse::decode(body) {
                    Ok(parse) => parse,
                    Err(ProtocolError::Utf8 { .. }) => {
                        self.client_error_in_batch(
                            non_utf8_unroutable(self.client_encoding()).with_hint(
                                "the extended protocol needs UTF-8 statement text through \
                                 shardgate; set client_encoding to UTF8 (the data may still \
                                 be in any encoding the database converts)",
                            ),
                        );
                        return Ok(Step::Next);
                    }
                    Err(error) => return Err(protocol_violation(error)),
                };
                let effects = self.scan_cached(parse.query);
                if effects.reads_prepared_view {
                    self.learn_inferred_parameter_types().await;
                }
                let rewritten;
                let replacement = match self.read_prepared_view(effects, parse.query) {
                    Some(text) => Some((text, parse.param_types.to_vec())),
                    None => self.execute_as_parse(&parse),
                };
                let (frame, parse) = match replacement {
                    Some((text, param_types)) => {
                        let mut message = BytesMut::new();
                        Parse {
                            query: &text,
                            param_types: &param_types,
                            ..parse
                        }
                        .encode_as(parse.name, &mut message);
                        rewritten = message;
                        let parse = Parse::decode(&rewritten[5..]).map_err(protocol_violation)?;
                        (&rewritten[..], parse)
                    }
                    None => (frame, parse),
                };
                self.note_effects(effects);
                if parse.name.is_empty() {
                    self.unnamed_effects = effects;
                }
                if self.shared.router.is_some() {
                    // Routed at Bind, when the parameters are known; the
                    // statement is created on that backend then.
                    self.parse_deferred(frame, parse);
                    if effects.sets {
                        self.settings.statement_sent(parse.query);
                    }
                    return Ok(Step::Next);
                }
                attach_or_return!(self.attach_for(route_hint(parse.query), true).await);
                if effects.sets {
                    self.settings.statement_sent(parse.query);
                }
                if effects.drops_statements {
                    self.forget_backend_statements();
                    if deallocates_all(parse.query) {
                        // Protocol-level statements too, as from a simple query.
                        self.statements.clear();
                    }
                }
                if parse.name.is_empty() {
                    self.forget_unnamed();
                    if frame.len() <= MAX_REMEMBERED_UNNAMED {
                        self.unnamed_parse.extend_from_slice(frame);
                    }
                    self.unnamed_on_backend = true;
                    self.forward(frame, Expect::Parse(0));
                } else {
                    self.parse_named(parse);
                }
            }
            tag::BIND => {
                let bind = Bind::decode(body).map_err(protocol_violation)?;
                if self.suspended_portal(bind.portal).is_some() {
                    if !bind.portal.is_empty() {
                        self.client_error_in_batch(ProxyError::error(
                            "42P03",
                            format!("cursor \"{}\" already exists", bind.portal),
                        ));
                        return Ok(Step::Next);
                    }
                    // The unnamed portal is replaced.
                    Box::pin(self.close_portals(|p| !p.is(""))).await;
                }
                let attach = match self.router() {
                    Some(router) => self.route_bind(&router, &bind).await,
                    None => self.attach_for(None, true).await,
                };
                attach_or_return!(attach);
                if bind.statement.is_empty() {
                    self.ensure_unnamed_before(frame);
                    self.forward(frame, Expect::Bind);
                } else {
                    match self.check_result_shape(bind.statement) {
                        ShapeCheck::Ready => {}
                        ShapeCheck::Wait => return Ok(Step::Wait),
                        ShapeCheck::Changed => {
                            self.client_error_in_batch(ProxyError::result_changed());
                            return Ok(Step::Next);
                        }
                    }
                    if !self.ensure_statement_before(bind.statement, frame) {
                        self.client_error_in_batch(unknown_statement(bind.statement));
                        return Ok(Step::Next);
                    }
                    self.statements.bind_into(bind, &mut self.backend_out);
                    self.queue.sent(Expect::Bind);
                }
            }
            tag::DESCRIBE | tag::CLOSE => {
                let target = Target::decode(tag, body).map_err(protocol_violation)?;
                let suspended = if target.kind == b'P' {
                    self.suspended_portal(target.name)
                } else {
                    None
                };
                if let Some(index) = suspended {
                    if tag == tag::CLOSE {
                        let name = target.name.to_string();
                        Box::pin(self.close_portals(|p| !p.is(&name))).await;
                        let mut out = BytesMut::new();
                        synth::close_complete(&mut out);
                        self.queue.local(out, &mut self.client_out);
                    } else {
                        self.describe_suspended(index);
                    }
                } else if target.kind == b'P'
                    && self
                        .pending_portal
                        .as_ref()
                        .is_some_and(|p| p.is(target.name))
                {
                    if tag == tag::CLOSE {
                        self.pending_portal = None;
                        let mut out = BytesMut::new();
                        synth::close_complete(&mut out);
                        self.queue.local(out, &mut self.client_out);
                    } else if let Some(portal) = self.pending_portal.as_mut() {
                        // Answered with the rows at Execute.
                        portal.describe();
                    }
                } else if self.backend.is_none() && self.shared.router.is_some() {
                    self.target_without_backend(tag, target).await;
                } else if target.kind == b'S' && !target.name.is_empty() {
                    return Ok(self.statement_target(tag, target).await);
                } else {
                    attach_or_return!(self.attach_for(None, true).await);
                    let expect = match (tag, target.kind) {
                        (tag::CLOSE, _) => Expect::Close,
                        (_, b'S') => Expect::DescribeStatement(0),
                        _ => Expect::DescribePortal,
                    };
                    if target.kind == b'S' {
                        if tag == tag::CLOSE {
                            self.forget_unnamed();
                        } else {
                            self.ensure_unnamed();
                        }
                    }
                    self.forward(frame, expect);
                }
            }
            tag::EXECUTE => {
                let mut cursor = messages::Cursor::new(tag, body);
                let name = cursor.cstr().map_err(protocol_violation)?;
                let max_rows = cursor.i32().map_err(protocol_violation)?;
                if let Some(index) = self.suspended_portal(name) {
                    // Answers owed by a backend come first.
                    self.queue.after(&mut self.client_out);
                    if !self.queue.is_empty() {
                        return Ok(Step::Wait);
                    }
                    Box::pin(self.serve_portal(index, max_rows)).await;
                    return Ok(Step::Next);
                }
                if let Some(portal) = self.pending_portal.as_mut().filter(|p| p.is(name)) {
                    portal.set_max_rows(max_rows);
                    Box::pin(self.execute_fanout()).await;
                    return Ok(Step::Next);
                }
                if self.backend.is_none() && self.shared.router.is_some() {
                    // Routing mode attaches at Bind: no backend, no portal.
                    self.client_error_in_batch(ProxyError::error(
                        "34000",
                        format!("portal \"{name}\" does not exist"),
                    ));
                    return Ok(Step::Next);
                }
                attach_or_return!(self.attach_for(None, true).await);
                self.forward(frame, Expect::Execute);
            }
            tag::SYNC => {
                self.skip_until_sync = false;
                let in_block = matches!(self.status, b'T' | b'E');
                if !self
                    .pending_portal
                    .as_mut()
                    .is_some_and(|p| p.keep_at_sync(in_block))
                {
                    self.pending_portal = None;
                }
                if !self.suspended.is_empty() {
                    // Portals outside a transaction block end with it.
                    Box::pin(self.close_portals(|p| p.in_transaction)).await;
                }
                if self.implicit_multi {
                    return Ok(Box::pin(self.finish_implicit_batch()).await);
                }
                if !self.unsynced.is_empty() {
                    self.sync_other_shards().await;
                }
                if self.abort_backend_transaction {
                    self.abort_backend_transaction = false;
                    self.send_transaction_abort();
                }
                if self.backend.is_some() {
                    self.forward(frame, Expect::Sync);
                } else {
                    let mut out = BytesMut::new();
                    synth::ready_for_query(&mut out, self.status);
                    self.queue.local(out, &mut self.client_out);
                }
            }
            tag::FLUSH => {
                if self.backend.is_some() {
                    self.backend_out.extend_from_slice(frame);
                }
            }
            tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL => {
                // Outside COPY these are ignored, as by Postgres.
                if self.backend.is_some() {
                    self.backend_out.extend_from_slice(frame);
                }
            }
            tag::FUNCTION_CALL => {
                attach_or_return!(self.attach_for(None, false).await);
                self.forward(frame, Expect::UntilReady);
            }
            other => {
                return Err(ProxyError::fatal(
                    "08P01",
                    format!("invalid frontend message type {}", other),
                ))
            }
        }
        Ok(Step::Next)
    }

    /// A Parse of `EXECUTE name` (no arguments) where `name` is a statement
    /// the client prepared with the protocol: Postgres shares one namespace
    /// between protocol and SQL statements, and shardgate's copies of the
    /// client's statements have other names on the backends, so the new
    /// statement takes the named one's text and parameter types — what it
    /// executes, with the same columns and command tag (asyncpg's
    /// `fetchval('EXECUTE foobar')`; #14-D3). With arguments it goes on
    /// unchanged and fails as unknown on the backend.
    fn execute_as_parse(&self, parse: &Parse<'_>) -> Option<(String, Vec<u8>)> {
        if self.statements.is_empty() || parse.param_types.get(..2) != Some(&[0, 0]) {
            return None;
        }
        let (name, rest) = executed_statement(parse.query)?;
        if !rest.trim().trim_end_matches(';').trim().is_empty() {
            return None;
        }
        let (text, types) = self.statements.text_of(name)?;
        Some((text.to_string(), types.to_vec()))
    }

    /// The statement's text with `pg_prepared_statements` answered from the
    /// client's own statements (`prepared_view`), if it reads the view.
    fn read_prepared_view(&self, effects: StatementEffects, sql: &str) -> Option<String> {
        if !effects.reads_prepared_view || self.text_transcoded {
            return None;
        }
        super::prepared_view::rewrite(sql, &self.statements.listing())
    }

    /// [`Session::read_prepared_view`] for a simple Query: the rewritten
    /// Query message and its text.
    fn prepared_view_query(
        &self,
        effects: StatementEffects,
        sql: &str,
    ) -> Option<(BytesMut, String)> {
        let text = self.read_prepared_view(effects, sql)?;
        let mut query = BytesMut::new();
        synth::query(&mut query, &text);
        Some((query, text))
    }

    /// `scan_statement`, remembered for the last Parse text: drivers re-send
    /// the same unnamed statement text for every execution.
    fn scan_cached(&mut self, sql: &str) -> StatementEffects {
        if let Some((text, effects)) = &self.last_scan {
            if text.as_bytes() == sql.as_bytes() {
                return *effects;
            }
        }
        let effects = scan_statement(sql);
        if sql.len() > 4096 {
            // Not worth keeping per session.
            return effects;
        }
        match &mut self.last_scan {
            Some((text, cached)) => {
                text.clear();
                text.push_str(sql);
                *cached = effects;
            }
            None => self.last_scan = Some((sql.to_string(), effects)),
        }
        effects
    }

    /// Takes a reloaded map (see `cluster`) between transactions: when no
    /// backend is held and nothing is in flight, so a transaction, a pinned
    /// session (session pooling, LISTEN, temp tables) or a streaming portal
    /// keeps the map it started with.
    fn adopt_newest_map(&mut self, newest: Arc<Shared>) {
        if self.between_transactions() {
            self.shared = newest;
            // Memo entries hold the old map's analyses.
            self.route_memo = crate::router::Memo::default();
        }
    }

    /// No backend held, nothing in flight, no transaction, portal or COPY
    /// open: the session can change maps or end without losing anything.
    fn between_transactions(&self) -> bool {
        self.status == b'I'
            && self.backend.is_none()
            && self.others.is_empty()
            && self.queue.is_empty()
            && self.suspended.is_empty()
            && self.pending_portal.is_none()
            && self.copy_in.is_none()
            && self.deferred_begin.is_none()
            && !self.skip_until_sync
            && !self.implicit_multi
            && self.unsynced.is_empty()
    }

    /// A shutdown or KILL asked this session to end, and it may now
    /// (see `stop`): the client is told why, as Postgres tells it.
    fn stop_now(&self) -> bool {
        match self.cancel.stop().requested() {
            Some(StopWhen::Now) => true,
            Some(StopWhen::BetweenTransactions) => self.between_transactions(),
            None => false,
        }
    }

    /// Sends a simple Query to the attached backend, with what its
    /// `effects` change in the session.
    fn send_query(&mut self, frame: &[u8], sql: &str, effects: StatementEffects) {
        // A simple query replaces the unnamed statement, as in Postgres.
        self.forget_unnamed();
        self.unnamed_on_backend = false;
        if effects.sets {
            self.settings.statement_sent(sql);
        }
        if effects.drops_statements {
            self.forget_backend_statements();
            if deallocates_all(sql) {
                // DEALLOCATE ALL removes protocol-level statements too.
                self.statements.clear();
            }
        }
        self.forward(frame, Expect::UntilReady);
    }

    /// The client's unnamed statement is replaced or closed.
    fn forget_unnamed(&mut self) {
        if self.unnamed_parse.capacity() > MAX_REMEMBERED_UNNAMED {
            // A huge statement's copies are not kept for the session's life.
            self.unnamed_parse = Vec::new();
            self.unnamed_text = String::new();
        }
        self.unnamed_parse.clear();
        self.unnamed_text.clear();
        self.unnamed_types.clear();
    }

    /// Re-creates the client's unnamed statement on a backend that lacks it.
    fn ensure_unnamed(&mut self) {
        self.ensure_unnamed_before(&[]);
    }

    /// [`Session::ensure_unnamed`] ahead of the client message `next`. When
    /// `next` directly follows the Parse shardgate answered (routing mode)
    /// and that ParseComplete has not left yet, it is taken back and the
    /// Parse goes to the backend as the client's own: the client then gets
    /// one write with every answer instead of an early one with just the
    /// ParseComplete (a syscall and a client wake-up per transaction).
    fn ensure_unnamed_before(&mut self, next: &[u8]) {
        let answered_end = self.unnamed_answered_end.take();
        if !self.unnamed_on_backend && !self.unnamed_parse.is_empty() {
            let from = self.backend_out.len();
            self.backend_out.extend_from_slice(&self.unnamed_parse);
            self.translate_parse_types(from);
            let adjacent = !next.is_empty() && answered_end == Some(next.as_ptr() as usize);
            let expect = if adjacent
                && self
                    .queue
                    .retract(synth::PARSE_COMPLETE, &mut self.client_out)
            {
                Expect::Parse(0)
            } else {
                Expect::HiddenParse(0)
            };
            self.queue.sent(expect);
            self.unnamed_on_backend = true;
        }
    }

    /// Session-scoped effects pin the backend; DISCARD ALL undoes them all.
    fn note_effects(&mut self, effects: StatementEffects) {
        if effects.discards_all {
            self.tainted = false;
        }
        self.tainted |= effects.taints;
    }

    /// DISCARD ALL / DEALLOCATE ran on the backend: its shardgate-owned
    /// statements may be gone, so they are re-created on next use.
    fn forget_backend_statements(&mut self) {
        if let Some(attached) = self.backend.as_mut() {
            attached.conn.prepared().clear();
        }
    }

    fn forward(&mut self, frame: &[u8], expect: Expect) {
        self.backend_out.extend_from_slice(frame);
        self.queue.sent(expect);
        if self.batch_started.is_none() {
            self.batch_started = Some(Instant::now());
        }
    }

    /// `SET shardgate.shard = …` and friends, answered by shardgate itself.
    fn shardgate_set(&mut self, name: &str, value: Option<String>) -> Result<(), ProxyError> {
        let mut out = BytesMut::new();
        match (name, value) {
            ("shard", Some(shard)) => match self.shared.pools.by_name(&shard) {
                Some(pool) => self.session_shard = Some(pool.index()),
                None => {
                    let names: Vec<&str> = self
                        .shared
                        .config
                        .shards
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect();
                    ProxyError::error("22023", format!("unknown shard \"{shard}\""))
                        .with_hint(format!("shards in this map: {}", names.join(", ")))
                        .encode(&mut out);
                }
            },
            ("shard", None) => self.session_shard = None,
            ("sharding_key", Some(_)) if self.shared.router.is_none() => {
                ProxyError::error(
                    "0A000",
                    "shardgate.sharding_key needs a shard map with tables; this map only pools",
                )
                .encode(&mut out);
            }
            ("sharding_key", value) => self.session_key = value,
            ("tenant", value) => {
                if let Err(error) = self.set_tenant(value) {
                    error.encode(&mut out);
                }
            }
            (other, _) => {
                ProxyError::error(
                    "42704",
                    format!("unrecognized configuration parameter \"shardgate.{other}\""),
                )
                .with_hint(
                    "shardgate settings: shardgate.shard, shardgate.sharding_key, shardgate.tenant",
                )
                .encode(&mut out);
            }
        }
        if out.is_empty() {
            synth::command_complete(&mut out, "SET");
        }
        synth::ready_for_query(&mut out, self.status);
        self.queue.local(out, &mut self.client_out);
        Ok(())
    }

    /// Makes sure a backend of the right shard is attached. Returns false if
    /// not possible; the client has then been sent the error.
    async fn attach_for(&mut self, hint: Option<Hint<'_>>, extended: bool) -> Attach {
        // Most messages of a batch (Bind, Describe, Execute) just continue on
        // the attached backend.
        if hint.is_none() && self.session_shard.is_none() && self.backend.is_some() {
            return Attach::Ready;
        }
        let wanted = match self.target_shard(hint) {
            Ok(wanted) => wanted,
            Err(error) => {
                self.report(error, extended);
                return Attach::Failed;
            }
        };
        match wanted {
            Some(shard) => self.attach_shard(shard, extended).await,
            None if self.backend.is_some() => Attach::Ready,
            None => self.attach_shard(0, extended).await,
        }
    }

    /// Makes sure a backend of `shard` is attached: switches backends between
    /// transactions, refuses to inside one.
    async fn attach_shard(&mut self, shard: usize, extended: bool) -> Attach {
        if let Some(attached) = &self.backend {
            if attached.shard == shard {
                return Attach::Ready;
            }
            if self.shared.router.is_some()
                && self.status == b'I'
                && self.mode == PoolMode::Transaction
                && !self.tainted
                && (self.implicit_multi || self.queue.batch_open())
            {
                // One extended batch (no Sync yet) for several shards.
                return self.switch_in_batch(shard, extended).await;
            }
            if !self.queue.is_empty() && !self.queue.batch_open() && !self.tainted {
                // Pipelined requests for different shards: finish reading
                // this backend's answers first, then switch.
                return Attach::Wait;
            }
            if self.queue.is_empty()
                && self.status == b'I'
                && self.mode == PoolMode::Transaction
                && !self.tainted
            {
                self.detach().await;
            } else if self.status == b'E' {
                // A failed transaction: its backend answers 25P02, as Postgres would.
                return Attach::Ready;
            } else if self.status == b'T'
                && self.shared.router.is_some()
                && (self.queue.is_empty() || self.queue.batch_open())
            {
                // Another shard of the transaction; in one extended batch
                // once this backend's answers are in (see `multi`).
                return self.switch_in_transaction(shard, extended).await;
            } else {
                let from = self.shard_name(attached.shard);
                let to = self.shard_name(shard);
                let error = if self.status == b'I' && !self.queue.batch_open() {
                    // Session pooling, or a backend pinned by session state.
                    ProxyError::error(
                        "0A000",
                        format!("this session is pinned to a backend of shard \"{from}\" (session pooling, or session state such as LISTEN, temp tables or SQL PREPARE); a statement for shard \"{to}\" cannot run in it"),
                    )
                    .with_hint("use pool.mode: transaction for sessions that use several shards, and keep session state out of them")
                } else {
                    ProxyError::error(
                        "0A000",
                        format!("statements for shard \"{from}\" and shard \"{to}\" were sent in one extended-protocol batch (no Sync between them); shardgate cannot run one implicit transaction on several shards that way"),
                    )
                    .with_hint("send a Sync after each statement (most drivers do), or use an explicit BEGIN … COMMIT")
                };
                self.report(error, extended);
                return Attach::Failed;
            }
        }
        match self.checkout(shard).await {
            Ok(()) => Attach::Ready,
            Err(error) => {
                let error = ProxyError::error(error.sqlstate(), error.to_string());
                self.report(error, extended);
                Attach::Failed
            }
        }
    }

    /// A Parse in routing mode: recorded and answered here; the statement is
    /// created on the backend its Bind routes to (pipelined statements may
    /// go to different shards).
    fn parse_deferred(&mut self, frame: &[u8], parse: Parse<'_>) {
        if parse.name.is_empty() {
            // Kept whatever its size: every Bind routes by its text. (A
            // statement sent to some backend unrouted would run on that
            // shard only: a silently wrong answer for a large IN list, a
            // bulk INSERT on the wrong shard.)
            // (A Parse with the recorded bytes never gets here: see the
            // repeated-Parse arm of `handle_client_message`.)
            self.forget_unnamed();
            self.unnamed_parse.extend_from_slice(frame);
            self.unnamed_text.push_str(parse.query);
            self.unnamed_types.extend_from_slice(parse.param_types);
            self.answer_unnamed_parse(frame);
        } else if let Err(error) = self.statements.define_local(parse) {
            self.client_error_in_batch(error);
        } else {
            let retractable = self
                .queue
                .local_slice_retractable(synth::PARSE_COMPLETE, &mut self.client_out);
            self.named_answered_end = retractable.then(|| frame.as_ptr() as usize + frame.len());
        }
    }

    /// ParseComplete for the recorded unnamed statement (routing mode); the
    /// statement itself goes to the backend its Bind routes to.
    fn answer_unnamed_parse(&mut self, frame: &[u8]) {
        self.unnamed_on_backend = false;
        // The answer's buffer is the one the batch will use anyway (a
        // fresh small one would be reallocated at checkout).
        buffers::ensure(&mut self.client_out);
        let retractable = self
            .queue
            .local_slice_retractable(synth::PARSE_COMPLETE, &mut self.client_out);
        self.unnamed_answered_end = retractable.then(|| frame.as_ptr() as usize + frame.len());
    }

    fn target_shard(&self, hint: Option<Hint<'_>>) -> Result<Option<usize>, ProxyError> {
        match hint {
            None => Ok(self.session_shard),
            Some(Hint::Shard(name)) => match self.shared.pools.by_name(name) {
                Some(pool) => Ok(Some(pool.index())),
                None => Err(ProxyError::error(
                    "22023",
                    format!("routing hint names unknown shard \"{name}\""),
                )),
            },
            Some(Hint::Key(_)) => Err(ProxyError::error(
                "0A000",
                "key= routing hints need the router, which is not built yet; use shard=NAME",
            )),
        }
    }

    async fn checkout(&mut self, shard: usize) -> Result<(), BackendError> {
        let Some(pool) = self.shared.pools.get(shard) else {
            return Ok(());
        };
        let checkout = match pool.checkout_parked() {
            Some(conn) => {
                self.shared.metrics.pool_wait(std::time::Duration::ZERO);
                Ok(conn)
            }
            None => {
                let waiting = Instant::now();
                let checkout = checkout_within(pool, self.shared.config.pool.query_timeout).await;
                self.shared.metrics.pool_wait(waiting.elapsed());
                checkout
            }
        };
        self.shared
            .metrics
            .set_backend_up(shard, !matches!(&checkout, Err(e) if e.is_unavailable()));
        let mut conn = checkout?;
        buffers::ensure(&mut self.backend_out);
        buffers::ensure(&mut self.client_out);
        let (pid, secret) = conn.cancel_key();
        self.cancel.set(Some((shard, pid, secret)));
        // Make the backend's session settings match the client's.
        if conn.settings_signature() != self.settings.signature() {
            let sql = self.settings.replay_sql();
            synth::query(&mut self.backend_out, &sql);
            self.queue.sent(Expect::HiddenQuery);
            conn.set_settings_signature(self.settings.signature());
        }
        // The transaction the client began before it named a shard.
        if let Some(begin) = self.deferred_begin.take() {
            self.backend_out.extend_from_slice(&begin);
            self.queue.sent(Expect::HiddenQuery);
            for statement in &self.transaction_replay {
                synth::query(&mut self.backend_out, statement);
                self.queue.sent(Expect::HiddenQuery);
            }
            if self.status == b'E' {
                // shardgate failed a statement of this transaction before
                // it reached a shard: the shard's part starts failed too,
                // so the client's statement gets 25P02 as from Postgres.
                synth::query(&mut self.backend_out, TRANSACTION_ABORT_SQL);
                self.queue.sent(Expect::HiddenAbort);
            }
        }
        self.unnamed_on_backend = false;
        self.backend = Some(Attached {
            conn,
            shard,
            wrote: false,
        });
        Ok(())
    }

    /// Returns the backend to its pool.
    async fn detach(&mut self) {
        if let Some(attached) = self.backend.take() {
            self.cancel.set(None);
            buffers::park(&mut self.backend_in);
            buffers::park(&mut self.backend_out);
            match self.shared.pools.get(attached.shard) {
                Some(pool) => pool.release(attached.conn).await,
                None => release(attached.conn).await,
            }
        }
    }

    async fn detach_on_exit(&mut self) {
        // A portal still streaming gives its connections back first.
        if !self.suspended.is_empty() {
            Box::pin(self.close_portals(|_| false)).await;
        }
        if let Some(attached) = self.backend.as_mut() {
            if self.tainted {
                attached.conn.mark_broken();
            }
            if !self.queue.is_empty() {
                // A query was still running: cancel it and do not reuse the connection.
                let (pid, secret) = attached.conn.cancel_key();
                if let Some(shard) = self.shared.config.shards.get(attached.shard) {
                    let _ = crate::backend::send_cancel(shard, pid, secret).await;
                }
                attached.conn.mark_broken();
            }
        }
        self.detach().await;
        self.release_others().await;
    }

    /// When the session must stop waiting: the statement in flight has run
    /// past `query_timeout`, or the client has sat idle inside a
    /// transaction past `idle_transaction_timeout`.
    fn deadline(&self) -> Option<(Instant, Deadline)> {
        let pool = &self.shared.config.pool;
        if !self.queue.is_empty() {
            let started = self.batch_started?;
            return (!pool.query_timeout.is_zero())
                .then(|| (started + pool.query_timeout, Deadline::Query));
        }
        if matches!(self.status, b'T' | b'E') && !pool.idle_transaction_timeout.is_zero() {
            return Some((
                self.ready_at + pool.idle_transaction_timeout,
                Deadline::IdleInTransaction,
            ));
        }
        None
    }

    /// The statement in flight ran past `query_timeout`: the client is told
    /// (57014 naming the shard) and the backend dropped, since a hung
    /// server may never answer a cancel (one is still sent, for a backend
    /// that is merely slow).
    fn query_timed_out(&mut self) {
        let Some(attached) = self.backend.as_ref() else {
            return;
        };
        let shard = self.shard_name(attached.shard);
        let (pid, secret) = attached.conn.cancel_key();
        if let Some(config) = self.shared.config.shards.get(attached.shard).cloned() {
            crate::backend::send_cancel_in_background(config, pid, secret);
        }
        let timeout = format!("{:?}", self.shared.config.pool.query_timeout);
        let error = ProxyError::error(
            "57014",
            format!("canceling statement due to query_timeout: shard \"{shard}\" did not answer within {timeout}"),
        );
        self.shared.suspects.mark(attached.shard);
        tracing::warn!(shard = %shard, %timeout, "query_timeout: dropping the backend");
        self.lose_backend(error);
    }

    /// The backend connection failed (EOF, a read error, or a FATAL nobody
    /// asked for): forget the backend, and tell the client only what
    /// concerns it, in protocol order.
    ///
    /// - A statement in flight gets 08006 naming the shard, and
    ///   ReadyForQuery.
    /// - Nothing in flight, outside a transaction: nothing was lost; the
    ///   next statement takes another backend. Nothing is sent: an
    ///   unrequested message after ReadyForQuery desynchronises drivers
    ///   (asyncpg: "another operation is in progress", #15-2).
    /// - Nothing in flight, inside a transaction: the transaction is gone;
    ///   the client's next statement gets 08006 (a ROLLBACK just succeeds).
    ///
    /// Either way an open transaction stays failed until the client ends it,
    /// as after any error: its later statements must not run outside it.
    fn backend_lost(&mut self) {
        self.backend_ended(None);
    }

    /// [`Session::backend_lost`], with the server's own words when it said
    /// why (a FATAL: shutdown, termination, postmaster death).
    fn backend_ended(&mut self, cause: Option<&str>) {
        let Some(attached) = self.backend.as_ref() else {
            return;
        };
        let shard = self.shard_name(attached.shard);
        let error = match cause {
            Some(cause) => ProxyError::error(
                "08006",
                format!("lost the connection to shard \"{shard}\": {cause}"),
            ),
            None => ProxyError::error("08006", format!("lost the connection to shard \"{shard}\"")),
        };
        self.lose_backend(error);
    }

    /// Drops the attached backend (and the transaction's other shards);
    /// `error` is what the client hears, as [`Session::backend_lost`] says.
    fn lose_backend(&mut self, error: ProxyError) {
        let Some(mut attached) = self.backend.take() else {
            return;
        };
        attached.conn.mark_broken();
        // The transaction is lost: the other shards' parts are closed with
        // their connections (the server rolls them back).
        for mut other in std::mem::take(&mut self.others) {
            other.conn.mark_broken();
        }
        let in_transaction = self.status != b'I';
        self.transaction_begin = None;
        self.transaction_replay.clear();
        self.cancel.set(None);
        let in_flight = !self.queue.is_empty();
        // The client has not sent its Sync yet: ReadyForQuery waits for it.
        let unsynced = self.queue.batch_open();
        self.queue.clear();
        self.backend_in.clear();
        self.backend_out.clear();
        self.passthrough = 0;
        self.batch_started = None;
        if in_transaction {
            // Later statements meet a failed transaction (25P02) on whichever
            // backend they get, until the client's ROLLBACK or COMMIT.
            let mut begin = BytesMut::new();
            synth::query(&mut begin, "BEGIN");
            self.deferred_begin = Some(begin.to_vec());
            self.status = b'E';
            self.batch_status_before = b'E';
        }
        let error = if in_transaction {
            error.with_detail("the transaction in progress was aborted")
        } else {
            error.with_detail("the statement in progress there was aborted")
        };
        if in_flight {
            self.shared.metrics.error(Some(attached.shard), error.code);
            error.encode(&mut self.client_out);
            if unsynced {
                self.skip_until_sync = true;
            } else {
                synth::ready_for_query(&mut self.client_out, self.status);
            }
        } else if in_transaction {
            self.lost_transaction = Some(error);
        }
        drop(attached);
    }

    /// Reports [`Session::lost_transaction`] as the answer to this client
    /// message, unless the message ends the transaction (that just ends
    /// it). True if the message was answered.
    fn report_lost_transaction(&mut self, tag: u8, body: &[u8]) -> bool {
        let text = match tag {
            tag::QUERY => messages::query_text(body).ok(),
            tag::PARSE => messages::Parse::decode(body).ok().map(|p| p.query),
            tag::BIND | tag::EXECUTE | tag::DESCRIBE => None,
            _ => return false,
        };
        let Some(error) = self.lost_transaction.take() else {
            return false;
        };
        let ends = text.and_then(routing::tx_verb).is_some_and(|verb| {
            matches!(verb, routing::TxVerb::Commit | routing::TxVerb::Rollback)
        });
        if ends {
            return false;
        }
        self.report(error, tag != tag::QUERY);
        true
    }

    /// Reports a shardgate error in protocol order: simple queries get
    /// ErrorResponse + ReadyForQuery; extended batches skip to their Sync.
    fn report(&mut self, error: ProxyError, extended: bool) {
        self.shared.metrics.error(None, error.code);
        let mut out = BytesMut::new();
        error.encode(&mut out);
        self.report_frames(out, extended);
    }

    /// Reports an encoded ErrorResponse (see [`Session::report`]).
    fn report_frames(&mut self, out: BytesMut, extended: bool) {
        // Inside a transaction block an error aborts the transaction, on
        // the backend too (else the client's COMMIT would commit it).
        let in_block = self.status == b'T'
            || self
                .backend
                .as_ref()
                .is_some_and(|a| a.conn.transaction_status() == b'T');
        if extended {
            self.skip_until_sync = true;
            if in_block {
                self.abort_backend_transaction = true;
            }
            self.queue.local(out, &mut self.client_out);
        } else {
            self.queue.local(out, &mut self.client_out);
            if in_block {
                self.send_transaction_abort();
            }
            let status = if in_block { b'E' } else { self.status };
            let mut ready = BytesMut::new();
            synth::ready_for_query(&mut ready, status);
            self.queue.local(ready, &mut self.client_out);
            self.status = status;
            self.batch_status_before = status;
        }
    }

    /// Puts the backend's transaction into the failed state with a hidden
    /// statement that errors (its answers are dropped). A held-back BEGIN
    /// that never reached a shard just fails in shardgate's own state.
    fn send_transaction_abort(&mut self) {
        if self.backend.is_none() {
            if self.status == b'T' {
                self.status = b'E';
            }
            return;
        }
        if self.queue.backend_skipping() {
            // The backend failed the batch itself: already aborted.
            return;
        }
        synth::query(&mut self.backend_out, TRANSACTION_ABORT_SQL);
        self.queue.sent(Expect::HiddenAbort);
        self.status = b'E';
    }

    fn client_error_in_batch(&mut self, error: ProxyError) {
        self.report(error, true);
    }

    fn shard_name(&self, index: usize) -> String {
        self.shared
            .config
            .shards
            .get(index)
            .map(|s| s.name.clone())
            .unwrap_or_else(|| format!("#{index}"))
    }

    async fn flush_backend(&mut self) -> std::io::Result<()> {
        if self.backend_out.is_empty() {
            return Ok(());
        }
        match self.backend.as_mut() {
            Some(attached) => {
                let result = attached.conn.write_all(&self.backend_out).await;
                self.backend_out.clear();
                result
            }
            None => {
                self.backend_out.clear();
                Ok(())
            }
        }
    }

    async fn flush_client(&mut self) -> std::io::Result<()> {
        if self.client_out.is_empty() {
            return Ok(());
        }
        self.client.write_all(&self.client_out).await?;
        self.client_out.clear();
        self.client.flush().await
    }

    /// Moves backend messages to the client in order, tracking status.
    async fn process_backend_input(&mut self) -> Result<(), ProtocolError> {
        // Scan in place and drop the consumed bytes once, not per message.
        let mut input = std::mem::take(&mut self.backend_in);
        let mut at = 0;
        let result = self.scan_backend(&input, &mut at).await;
        input.advance(at);
        self.backend_in = input;
        if self.backend.is_none() {
            buffers::park(&mut self.backend_in);
        }
        result
    }

    async fn scan_backend(&mut self, input: &[u8], at: &mut usize) -> Result<(), ProtocolError> {
        loop {
            let rest = &input[*at..];
            if self.passthrough > 0 {
                let n = self.passthrough.min(rest.len());
                if n == 0 {
                    return Ok(());
                }
                self.client_out.extend_from_slice(&rest[..n]);
                *at += n;
                self.passthrough -= n;
                if self.passthrough == 0 {
                    self.queue.after(&mut self.client_out);
                }
                continue;
            }
            let Some(total) = frame_length(rest, MAX_BACKEND_MESSAGE)? else {
                return Ok(());
            };
            let tag = rest[0];
            // Rows and COPY data stream through without waiting for the whole message.
            if matches!(tag, tag::DATA_ROW | tag::COPY_DATA) && rest.len() < total {
                if self.queue.on_backend(tag) == Disposition::Forward {
                    self.passthrough = total;
                    continue;
                }
                return Ok(());
            }
            let Some((frame, total)) = next_frame(rest, MAX_BACKEND_MESSAGE)? else {
                return Ok(());
            };
            // Nothing of the client's in flight: whatever comes now was not
            // asked for (a FATAL as the server shuts down or is killed).
            let unsolicited = self.queue.is_empty();
            let disposition = self.queue.on_backend(tag);
            let mut ready = None;
            match tag {
                tag::READY_FOR_QUERY => ready = Some(messages::ready_status(frame.body)?),
                tag::ERROR_RESPONSE if disposition == Disposition::Discard => {}
                tag::ERROR_RESPONSE => {
                    self.batch_failed = true;
                    let shard = self.backend.as_ref().map(|a| a.shard);
                    let fields = messages::error_fields(frame.body);
                    let fatal = matches!(fields.severity, "FATAL" | "PANIC");
                    if fatal && self.mode == PoolMode::Transaction && !self.tainted {
                        // The backend ends (its shard shuts down or died, or
                        // it was terminated), but the client's session holds
                        // nothing of it beyond the statement in flight or
                        // an open transaction: it goes on with other
                        // backends (#15-2). Closing it, as Postgres closes
                        // its own connection, would fail that client's next
                        // statements on every other shard too.
                        tracing::info!(
                            shard = %self.shard_name(shard.unwrap_or(0)),
                            code = fields.code,
                            message = fields.message,
                            unsolicited,
                            "a backend connection ended"
                        );
                        if unsolicited {
                            self.shared.metrics.error(shard, fields.code);
                        }
                        let cause = fields.message.to_string();
                        *at = input.len();
                        self.backend_ended(Some(&cause));
                        return Ok(());
                    }
                    if disposition == Disposition::Forward && fatal {
                        // A session-pooled or pinned backend ends: its
                        // session state is gone, so as with Postgres the
                        // client's connection closes after the message
                        // (drivers wait for that).
                        self.client_closing = true;
                    }
                    self.shared.metrics.error(shard, fields.code);
                    if disposition == Disposition::Swallow {
                        // Replaying the session's settings failed on this
                        // backend: the client must know its statement may run
                        // with other settings, so it gets a WARNING notice.
                        tracing::warn!(
                            code = fields.code,
                            message = fields.message,
                            "replaying session settings failed"
                        );
                        ProxyError {
                            severity: "WARNING",
                            ..ProxyError::error(
                                "01000",
                                format!(
                                    "shardgate could not restore this session's settings on the backend: {}",
                                    fields.message
                                ),
                            )
                        }
                        .with_detail(format!("SQLSTATE {} from the shard", fields.code))
                        .encode_notice(&mut self.client_out);
                    }
                }
                tag::COMMAND_COMPLETE if disposition == Disposition::Forward => {
                    let tag_text = messages::command_tag(frame.body);
                    if tag_text == "COMMIT" {
                        self.batch_ended = Some(true);
                    } else if tag_text == "ROLLBACK" {
                        self.batch_ended = Some(false);
                    }
                }
                _ => {}
            }
            if disposition == Disposition::Forward {
                self.client_out.extend_from_slice(&rest[..total]);
                if matches!(tag, tag::ROW_DESCRIPTION | tag::PARAMETER_DESCRIPTION) {
                    self.translate_type_oids(tag, total);
                }
            }
            if let Some((hash, hidden)) = self.queue.take_described() {
                self.remember_result_shape(hash, hidden, tag, frame.body, total);
            }
            *at += total;
            self.queue.after(&mut self.client_out);
            self.forget_failed_statements();
            if let Some(status) = ready {
                self.on_ready(status, disposition, *at < input.len()).await;
            }
        }
    }

    /// `trailing`: the backend sent more after this ReadyForQuery; it keeps
    /// the backend until that is read (a FATAL right behind the answer
    /// must not reach the client after its ReadyForQuery, nor the backend
    /// the pool).
    async fn on_ready(&mut self, status: u8, disposition: Disposition, trailing: bool) {
        if let Some(attached) = self.backend.as_mut() {
            attached.conn.set_transaction_status(status);
        }
        if disposition != Disposition::Forward {
            return;
        }
        self.settings.batch_done(
            self.batch_status_before,
            status,
            self.batch_failed,
            self.batch_ended,
        );
        self.batch_failed = false;
        self.batch_ended = None;
        self.batch_status_before = status;
        self.status = status;
        if status == b'I' {
            self.drop_ended_transaction_portals();
        }
        // One query per ReadyForQuery; with pipelining the next one is
        // already under way, so its clock starts now.
        let now = Instant::now();
        self.ready_at = now;
        let started = self.batch_started.take().unwrap_or(now);
        if !self.queue.is_empty() {
            self.batch_started = Some(now);
        }
        if let Some(attached) = &self.backend {
            self.shared
                .metrics
                .query_done(attached.shard, Route::Single, now - started);
        }
        if let Some(attached) = self.backend.as_mut() {
            // The backend now has exactly the session's committed settings.
            attached
                .conn
                .set_settings_signature(self.settings.signature());
            if status == b'I' {
                attached.wrote = false;
            }
        }
        if status == b'I' {
            self.transaction_begin = None;
            self.transaction_replay.clear();
            if !self.others.is_empty() {
                self.release_others().await;
            }
        }
        if status == b'I'
            && self.queue.is_empty()
            && self.mode == PoolMode::Transaction
            && !self.tainted
            && !trailing
        {
            self.detach().await;
        }
    }

    /// Named `Parse`: recorded per client; sent to the backend under a
    /// shardgate-owned name unless this backend already has it.
    fn parse_named(&mut self, parse: Parse<'_>) {
        let Some(attached) = self.backend.as_mut() else {
            return;
        };
        let from = self.backend_out.len();
        let defined =
            self.statements
                .define(parse, attached.conn.prepared(), &mut self.backend_out);
        self.translate_parse_types(from);
        match defined {
            Ok(ParseAction::Known) => {
                let mut out = BytesMut::new();
                synth::parse_complete(&mut out);
                self.queue.local(out, &mut self.client_out);
            }
            Ok(ParseAction::Sent { hash, evicted }) => {
                if evicted {
                    self.queue.sent(Expect::HiddenClose);
                }
                self.queue.sent(Expect::Parse(hash));
            }
            Err(error) => self.client_error_in_batch(error),
        }
    }

    /// Makes sure the attached backend has the client's statement `name`,
    /// sending a hidden Parse if needed. False if the client never defined it.
    fn ensure_statement(&mut self, name: &str) -> bool {
        self.ensure_statement_before(name, &[])
    }

    /// [`Session::ensure_statement`] for the client message `next`: if it
    /// comes right behind the statement's Parse that shardgate answered, the
    /// backend's answer to the Parse replaces that one.
    fn ensure_statement_before(&mut self, name: &str, next: &[u8]) -> bool {
        let answered_end = self.named_answered_end.take();
        let Some(attached) = self.backend.as_mut() else {
            return false;
        };
        let from = self.backend_out.len();
        let ensured = self
            .statements
            .ensure(name, attached.conn.prepared(), &mut self.backend_out);
        self.translate_parse_types(from);
        match ensured {
            Some(Some((hash, evicted))) => {
                let adjacent = !next.is_empty() && answered_end == Some(next.as_ptr() as usize);
                let expect = if adjacent
                    && self
                        .queue
                        .retract(synth::PARSE_COMPLETE, &mut self.client_out)
                {
                    Expect::Parse(hash)
                } else {
                    Expect::HiddenParse(hash)
                };
                if evicted {
                    self.queue.sent(Expect::HiddenClose);
                }
                self.queue.sent(expect);
                true
            }
            Some(None) => true,
            None => false,
        }
    }

    /// Before a Bind of the client's statement `name` on the attached
    /// backend: if the client was told its result columns, the backend's
    /// copy must return those (it may have been prepared after a schema
    /// change, e.g. on another shard or backend than the one that described
    /// it; Postgres fails such a Bind with 0A000). The copy's columns are
    /// learnt once per backend with a hidden Describe.
    fn check_result_shape(&mut self, name: &str) -> ShapeCheck {
        let Some(expected) = self.statements.expected_shape(name) else {
            return ShapeCheck::Ready;
        };
        if expected.changed {
            return ShapeCheck::Changed;
        }
        if self.queue.backend_skipping() {
            // The backend ignores the Bind anyway (an error came first).
            return ShapeCheck::Ready;
        }
        let queue_empty = self.queue.is_empty();
        let Some(attached) = self.backend.as_mut() else {
            return ShapeCheck::Ready;
        };
        match attached
            .conn
            .prepared()
            .shape_since(expected.hash, expected.parsed_at)
        {
            Some(ResultShape::Known(shape)) if shape == expected.shape => ShapeCheck::Ready,
            Some(ResultShape::Known(_)) => {
                self.statements.mark_result_changed(name);
                ShapeCheck::Changed
            }
            Some(ResultShape::Probing) if !queue_empty => ShapeCheck::Wait,
            _ => {
                // Unknown (or a probe whose answer was skipped): ask.
                if !self.ensure_statement(name) {
                    return ShapeCheck::Ready;
                }
                let target = Target { kind: b'S', name };
                self.statements.describe_into(target, &mut self.backend_out);
                synth::flush(&mut self.backend_out);
                self.queue.sent(Expect::HiddenDescribe(expected.hash));
                if let Some(attached) = self.backend.as_mut() {
                    attached
                        .conn
                        .prepared()
                        .set_shape(expected.hash, ResultShape::Probing);
                }
                ShapeCheck::Wait
            }
        }
    }

    /// A statement's RowDescription or NoData (`body`, `total` bytes in all)
    /// just came from the backend: the result columns of the backend's
    /// copy, and, unless shardgate asked (`hidden`), what the client was told.
    fn remember_result_shape(
        &mut self,
        hash: u64,
        hidden: bool,
        tag: u8,
        body: &[u8],
        total: usize,
    ) {
        let shape = if hidden {
            // In the OIDs clients see, as a forwarded one is.
            let shard = self.backend.as_ref().map_or(0, |a| a.shard);
            match self.shared.fanout.type_oids().get().filter(|_| shard != 0) {
                Some(map) if tag == tag::ROW_DESCRIPTION => {
                    let mut copy = body.to_vec();
                    map.rewrite_row_description(shard, &mut copy);
                    messages::result_shape(tag, &copy)
                }
                _ => messages::result_shape(tag, body),
            }
        } else {
            let start = self.client_out.len() - total + 5;
            messages::result_shape(tag, &self.client_out[start..])
        };
        let Some(shape) = shape else {
            return;
        };
        if let Some(attached) = self.backend.as_mut() {
            attached
                .conn
                .prepared()
                .set_shape(hash, ResultShape::Known(shape));
        }
        if !hidden {
            self.statements.record_described(hash, shape);
        }
    }

    /// Describe/Close in routing mode with no backend attached: statements
    /// are described by any shard on the side, closes need no backend.
    async fn target_without_backend(&mut self, tag: u8, target: Target<'_>) {
        let mut out = BytesMut::new();
        if tag == tag::CLOSE {
            match (target.kind, target.name.is_empty()) {
                (b'S', true) => self.unnamed_parse.clear(),
                (b'S', false) => self.statements.close(target.name),
                _ => {}
            }
            synth::close_complete(&mut out);
            self.queue.local(out, &mut self.client_out);
            return;
        }
        if target.kind == b'P' {
            self.client_error_in_batch(ProxyError::error(
                "34000",
                format!("portal \"{}\" does not exist", target.name),
            ));
            return;
        }
        let statement = if target.name.is_empty() {
            self.unnamed_parse
                .get(5..)
                .and_then(|body| Parse::decode(body).ok())
                .map(|p| (p.query.to_string(), p.param_types.to_vec()))
        } else {
            self.statements
                .text_of(target.name)
                .map(|(q, t)| (q.to_string(), t.to_vec()))
        };
        let Some((query, param_types)) = statement else {
            self.client_error_in_batch(unknown_statement(target.name));
            return;
        };
        if let Some(router) = self.router() {
            let described = self.describe_aside(&router, &query, &param_types).await;
            if let (Some(shape), false) = (described, target.name.is_empty()) {
                // A shard accepted it: the name is taken, as in Postgres.
                self.statements.mark_valid(target.name);
                if shape != 0 {
                    if let Some(hash) = self.statements.hash_of(target.name) {
                        self.statements.record_described(hash, shape);
                    }
                }
            }
        }
    }

    /// Describe/Close of a named statement.
    async fn statement_target(&mut self, tag: u8, target: Target<'_>) -> Step {
        if tag == tag::CLOSE {
            // The server-side statement stays cached for reuse; the client's name goes.
            self.statements.close(target.name);
            let mut out = BytesMut::new();
            synth::close_complete(&mut out);
            self.queue.local(out, &mut self.client_out);
            return Step::Next;
        }
        match self.attach_for(None, true).await {
            Attach::Ready => {}
            Attach::Failed | Attach::Answered => return Step::Next,
            Attach::Wait => return Step::Wait,
        }
        if !self.ensure_statement(target.name) {
            self.client_error_in_batch(unknown_statement(target.name));
            return Step::Next;
        }
        self.statements.describe_into(target, &mut self.backend_out);
        let hash = self.statements.hash_of(target.name).unwrap_or(0);
        self.queue.sent(Expect::DescribeStatement(hash));
        Step::Next
    }

    /// SQL `EXECUTE name …` of a statement the client prepared with the
    /// protocol's Parse (one namespace in Postgres; asyncpg's named
    /// statements): it runs under its server-side name on the backend its
    /// text routes to, created there first if needed.
    async fn execute_protocol_statement(&mut self, name: &str, rest: &str) -> Step {
        let attach = match self.router() {
            Some(router) => {
                let text = self
                    .statements
                    .text_of(name)
                    .map(|(q, _)| q.to_string())
                    .unwrap_or_default();
                let mut memo = crate::router::Memo::default();
                match self.route(&router, &mut memo, &text, &[]).await {
                    Ok((crate::router::Route::Single(shard), _)) => {
                        self.attach_shard(shard, false).await
                    }
                    Ok((crate::router::Route::AnyOne | crate::router::Route::NoShard, _)) => {
                        self.attach_any(&router, false).await
                    }
                    _ => {
                        self.report(
                            ProxyError::error(
                                "0A000",
                                format!(
                                    "EXECUTE {name}: the shard of this prepared statement \
                                     depends on its parameters (or it spans several shards); \
                                     shardgate routes it only through the extended protocol"
                                ),
                            )
                            .with_hint(
                                "bind and execute it with the protocol (every driver's way)",
                            ),
                            false,
                        );
                        return Step::Next;
                    }
                }
            }
            None => self.attach_for(None, false).await,
        };
        match attach {
            Attach::Ready => {}
            Attach::Failed | Attach::Answered => return Step::Next,
            Attach::Wait => return Step::Wait,
        }
        if !self.ensure_statement(name) {
            self.report(unknown_statement(name), false);
            return Step::Next;
        }
        let Some(server_name) = self.statements.server_name(name) else {
            return Step::Next;
        };
        let sql = format!("EXECUTE {server_name}{rest}");
        let mut frame = BytesMut::new();
        synth::query(&mut frame, &sql);
        self.forget_unnamed();
        self.unnamed_on_backend = false;
        self.forward(&frame, Expect::UntilReady);
        Step::Next
    }

    /// A RowDescription or ParameterDescription of `total` bytes just
    /// forwarded from the backend: its user-defined type OIDs become the
    /// first shard's (`protocol::type_oids`).
    fn translate_type_oids(&mut self, tag: u8, total: usize) {
        let Some(shard) = self.backend.as_ref().map(|a| a.shard).filter(|s| *s != 0) else {
            return;
        };
        let Some(map) = self.shared.fanout.type_oids().get() else {
            return;
        };
        let start = self.client_out.len() - total + 5;
        let body = &mut self.client_out[start..];
        if tag == tag::ROW_DESCRIPTION {
            map.rewrite_row_description(shard, body);
        } else {
            map.rewrite_parameter_description(shard, body);
        }
    }

    /// Parse messages written to the backend from `from` on: declared
    /// parameter types in the attached shard's OIDs (`protocol::type_oids`).
    fn translate_parse_types(&mut self, from: usize) {
        let Some(shard) = self.backend.as_ref().map(|a| a.shard).filter(|s| *s != 0) else {
            return;
        };
        if let Some(map) = self.shared.fanout.type_oids().get() {
            if let Some(frames) = self.backend_out.get_mut(from..) {
                map.rewrite_parse_frames(shard, frames);
            }
        }
    }

    /// Statements whose Parse failed are not on the backend after all.
    fn forget_failed_statements(&mut self) {
        if self.queue.failed_statements.is_empty() {
            return;
        }
        let failed = std::mem::take(&mut self.queue.failed_statements);
        if let Some(attached) = self.backend.as_mut() {
            for hash in failed {
                attached.conn.prepared().remove(hash);
            }
        }
        for hash in std::mem::take(&mut self.queue.rejected_statements) {
            self.statements.forget_rejected(hash);
        }
    }
}

/// A hidden statement that fails, putting the backend's transaction into the
/// aborted state after shardgate reported an error inside it.
pub(super) const TRANSACTION_ABORT_SQL: &str =
    "SELECT 1/0 AS shardgate_aborts_this_transaction_after_a_proxy_error";

/// Client messages are moved to the backend in batches of about this size,
/// with the backend's answers read in between.
const BACKEND_WRITE_BATCH: usize = 256 * 1024;

/// Unnamed statements larger than this are not kept for re-sending when
/// not routing (routing keeps every one: see `parse_deferred`), and their
/// buffers are freed once replaced.
const MAX_REMEMBERED_UNNAMED: usize = 64 * 1024;

/// A checkout bounded by `query_timeout` too (zero: only by the pool's
/// own timeouts): behind a hung shard every pooled connection is stuck and
/// a connect is never answered, and the statement must still fail in time.
pub(super) async fn checkout_within(
    pool: &crate::backend::ShardPool,
    query_timeout: std::time::Duration,
) -> Result<PooledBackend, BackendError> {
    if query_timeout.is_zero() {
        return pool.checkout().await;
    }
    match tokio::time::timeout(query_timeout, pool.checkout()).await {
        Ok(checkout) => checkout,
        Err(_) => Err(BackendError::QueryTimeout {
            shard: pool.name().to_string(),
            timeout: query_timeout,
        }),
    }
}

fn route_hint(sql: &str) -> Option<Hint<'_>> {
    if sql
        .as_bytes()
        .first()
        .is_some_and(|b| *b == b'/' || b.is_ascii_whitespace())
    {
        hints::leading_hint(sql)
    } else {
        None
    }
}

/// The statement name of a single `DEALLOCATE [PREPARE] name` (quoted or
/// not; not `ALL`).
fn deallocated_name(sql: &str) -> Option<&str> {
    let mut rest = strip_word(sql.trim_ascii_start(), "deallocate")?.trim_start();
    if let Some(after) = strip_word(rest, "prepare") {
        rest = after.trim_start();
    }
    let rest = rest.trim_end().trim_end_matches(';').trim_end();
    let name = match rest.strip_prefix('"') {
        Some(quoted) => quoted.strip_suffix('"').filter(|n| !n.contains('"'))?,
        None if !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$')
            && !rest.eq_ignore_ascii_case("all") =>
        {
            rest
        }
        None => return None,
    };
    // An unquoted name is folded to lower case by Postgres; drivers send
    // lower-case names, so only those are matched unquoted.
    (rest.starts_with('"') || !name.bytes().any(|b| b.is_ascii_uppercase())).then_some(name)
}

/// `EXECUTE name[ rest]`: the statement name (lower-case unquoted, or
/// quoted) and the rest of the text (its arguments).
fn executed_statement(sql: &str) -> Option<(&str, &str)> {
    let rest = strip_word(sql.trim_ascii_start(), "execute")?.trim_start();
    if let Some(quoted) = rest.strip_prefix('"') {
        let end = quoted.find('"')?;
        return Some((&quoted[..end], &quoted[end + 1..]));
    }
    let end = rest
        .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$'))
        .unwrap_or(rest.len());
    (end > 0).then(|| (&rest[..end], &rest[end..]))
}

/// Whether `sql` is `DEALLOCATE [PREPARE] ALL`.
fn deallocates_all(sql: &str) -> bool {
    let Some(mut rest) = strip_word(sql.trim_ascii_start(), "deallocate") else {
        return false;
    };
    rest = rest.trim_start();
    if let Some(after) = strip_word(rest, "prepare") {
        rest = after.trim_start();
    }
    rest.trim_end()
        .trim_end_matches(';')
        .trim_end()
        .eq_ignore_ascii_case("all")
}

/// `text` after its first word if that word is `word` (any case).
fn strip_word<'a>(text: &'a str, word: &str) -> Option<&'a str> {
    let head = text.get(..word.len())?;
    let rest = &text[word.len()..];
    (head.eq_ignore_ascii_case(word)
        && rest.bytes().next().is_some_and(|b| b.is_ascii_whitespace()))
    .then_some(rest)
}

/// A statement in a client encoding shardgate cannot route exactly.
fn non_utf8_unroutable(encoding: Option<&str>) -> ProxyError {
    ProxyError::error(
        "0A000",
        format!(
            "this statement's text is not UTF-8 (client_encoding {}); through shardgate with \
             routing on, only LATIN1, LATIN9 and WIN1252 statements are read, and only those \
             that run on one shard",
            encoding.unwrap_or("unknown")
        ),
    )
    .with_hint("set client_encoding to UTF8 for this statement")
}

fn protocol_violation(error: ProtocolError) -> ProxyError {
    ProxyError::fatal("08P01", format!("protocol violation: {error}"))
}

fn unknown_statement(name: &str) -> ProxyError {
    ProxyError::error(
        "26000",
        format!("prepared statement \"{name}\" does not exist"),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn executed_names() {
        use super::executed_statement;
        assert_eq!(executed_statement("EXECUTE foobar"), Some(("foobar", "")));
        assert_eq!(
            executed_statement("execute s1 (1, 'a');"),
            Some(("s1", " (1, 'a');"))
        );
        assert_eq!(executed_statement("EXECUTE \"My\"(2)"), Some(("My", "(2)")));
        assert_eq!(executed_statement("EXECUTE"), None);
        assert_eq!(executed_statement("EXECUTEx"), None);
    }

    #[test]
    fn deallocate_names() {
        use super::{deallocated_name, deallocates_all};
        assert_eq!(deallocated_name("DEALLOCATE _pg3_7"), Some("_pg3_7"));
        assert_eq!(deallocated_name("deallocate prepare s1;"), Some("s1"));
        assert_eq!(deallocated_name("DEALLOCATE \"My S\""), Some("My S"));
        assert_eq!(deallocated_name("DEALLOCATE ALL"), None);
        assert_eq!(deallocated_name("DEALLOCATE S1"), None);
        assert_eq!(deallocated_name("DEALLOCATEx s1"), None);
        assert!(deallocates_all("deallocate all"));
        assert!(deallocates_all("DEALLOCATE PREPARE ALL;"));
        assert!(!deallocates_all("DEALLOCATE s1"));
    }
}
