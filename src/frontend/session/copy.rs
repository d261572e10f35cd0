//! `COPY` through the router.
//!
//! * `COPY t FROM STDIN` into a sharded table: every shard runs the same
//!   COPY in a transaction; the client's CopyData is cut into rows
//!   ([`RowFramer`]), each row goes to the shard its key names, buffered
//!   per shard and flushed at [`FLUSH_AT`] bytes, so memory stays bounded
//!   whatever the size of the input. A row whose key is NULL, missing or
//!   malformed ends the COPY with an error naming its line; nothing is
//!   committed anywhere. At CopyDone the shards' counts are summed and,
//!   outside a client transaction, committed with two-phase commit.
//! * `COPY t FROM STDIN` into a replicated table: every shard gets every
//!   byte; atomic the same way; the tag is one shard's count.
//! * `COPY t TO STDOUT` / `COPY (SELECT …) TO STDOUT` over several shards:
//!   one CopyOutResponse, every shard's rows concatenated (one header line
//!   for csv/text HEADER, one file header and trailer for binary), counts
//!   summed. A query whose result is not a plain concatenation (ORDER BY,
//!   LIMIT, DISTINCT, aggregates) is refused.
//!
//! Hooks (called by the session): [`Session::routed_copy_in`] for simple
//! queries, [`Session::routed_copy_portal`] for an extended-protocol
//! portal the router sent to several shards; while a COPY FROM STDIN runs,
//! the client's CopyData / CopyDone / CopyFail go to
//! [`Session::copy_in_message`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use futures::FutureExt;
use sqlparser::ast::{
    CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Ident, Statement,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::{Attach, Attached, Session};
use crate::backend::BackendConnection;
use crate::executor::control;
use crate::executor::copy_rows::{
    CopyDataError, CopyFormat, CopyOptions, Piece, RowFramer, BINARY_TRAILER,
};
use crate::executor::fanout::plan::{DistinctKind, Plan as FanoutPlan};
use crate::executor::twophase::{self, CommitOutcome, Participant};
use crate::metrics;
use crate::protocol::messages::{command_tag, ready_status, Cursor};
use crate::protocol::synth::{self, ProxyError};
use crate::protocol::{frame_length, tag, MAX_BACKEND_MESSAGE};
use crate::router::hints;
use crate::router::{Placement, Route, Router, ShardMap};
use crate::sharding::{KeyType, KeyValue, ShardingError};

/// Per-shard CopyData is sent once this many bytes are buffered.
pub const FLUSH_AT: usize = 64 * 1024;
/// Client-bound CopyData (COPY TO) is flushed at this size.
const CLIENT_FLUSH_AT: usize = 64 * 1024;
/// Bound on draining a shard after an error (its COPY was cancelled).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// CopyData frame header: tag and a length filled in at flush.
const FRAME_HEADER: [u8; 5] = [tag::COPY_DATA, 0, 0, 0, 0];

/// State of a COPY FROM STDIN being routed row by row.
pub(super) struct CopyIn {
    /// The table as written, for messages (`COPY users, line 3: …`).
    table: String,
    extended: bool,
    in_transaction: bool,
    current_shard: Option<usize>,
    /// One backend per shard, sorted by shard.
    group: Vec<Attached>,
    io: Vec<ShardIo>,
    rows: Rows,
    started: Instant,
}

impl std::fmt::Debug for CopyIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyIn")
            .field("table", &self.table)
            .field("shards", &self.group.len())
            .finish_non_exhaustive()
    }
}

impl Drop for CopyIn {
    /// The client left mid-COPY: these connections are inside a COPY and
    /// must never be reused.
    fn drop(&mut self) {
        for attached in &mut self.group {
            attached.conn.mark_broken();
        }
    }
}

/// One shard's side of a COPY FROM STDIN.
struct ShardIo {
    /// A CopyData frame being filled (header first, length set at flush).
    out: BytesMut,
    input: BytesMut,
    /// The shard is still in COPY IN mode (no ReadyForQuery yet).
    in_copy: bool,
    rows: u64,
}

impl ShardIo {
    fn new() -> ShardIo {
        let mut out = BytesMut::with_capacity(FLUSH_AT + 8192);
        out.extend_from_slice(&FRAME_HEADER);
        ShardIo {
            out,
            input: BytesMut::new(),
            in_copy: false,
            rows: 0,
        }
    }

    fn buffered(&self) -> usize {
        self.out.len() - FRAME_HEADER.len()
    }
}

/// How rows reach shards.
enum Rows {
    /// Replicated table: every byte to every shard.
    Every,
    /// Sharded table: row by row.
    Routed { framer: RowFramer, key: KeyPlacer },
}

/// Places a row by its key field.
struct KeyPlacer {
    map: Arc<ShardMap>,
    function: usize,
    /// The key column's type (domains resolved to their base type).
    type_oid: u32,
    kind: KeyType,
    binary: bool,
    /// The key column's name, for messages.
    column: String,
}

impl KeyPlacer {
    fn shard(&self, key: Option<&[u8]>) -> Result<usize, CopyDataError> {
        let column = self.column.as_str();
        let fail = |sqlstate: &'static str, message: String| CopyDataError {
            sqlstate,
            line: 0,
            column: Some(column.to_string()),
            message,
            hint: None,
        };
        let Some(bytes) = key else {
            return Err(CopyDataError {
                hint: Some("every row needs its sharding key to be placed on a shard".into()),
                ..fail(
                    "23502",
                    format!("null value in sharding key column \"{column}\""),
                )
            });
        };
        let value = if self.binary {
            KeyValue::from_binary(self.type_oid, bytes)
        } else {
            KeyValue::from_text(self.type_oid, bytes)
        }
        .map_err(|e| {
            let sqlstate = if self.binary { "22P03" } else { "22P02" };
            fail(sqlstate, e.to_string())
        })?;
        let function = self
            .map
            .functions
            .get(self.function)
            .ok_or_else(|| fail("XX000", "the sharding function is gone".into()))?;
        function
            .function
            .shard_for_as(&value, self.kind)
            .map_err(|e| match e {
                ShardingError::InvalidValue { .. } => fail("22P02", e.to_string()),
                other => fail("22023", other.to_string()),
            })
    }
}

/// What the statement asks for, from sqlparser's AST.
#[derive(Debug)]
struct CopySpec {
    to: bool,
    /// `COPY (query) TO`: the query.
    query: Option<String>,
    /// The table as written (quoted identifiers kept), for `::regclass`.
    table: Option<String>,
    /// The column list, normalised as Postgres does (unquoted lower-cased).
    columns: Vec<String>,
    options: CopyOptions,
    force_not_null: Vec<String>,
    force_null: Vec<String>,
    /// The ENCODING option, if given.
    encoding: Option<String>,
}

/// Lower-cases unquoted identifiers, as Postgres does.
fn norm(id: &Ident) -> String {
    if id.quote_style.is_some() {
        id.value.clone()
    } else {
        id.value.to_lowercase()
    }
}

fn one_byte(c: char, what: &str) -> Result<u8, ProxyError> {
    u8::try_from(u32::from(c))
        .ok()
        .filter(u8::is_ascii)
        .ok_or_else(|| {
            ProxyError::error(
                "0A000",
                format!("COPY {what} must be a single one-byte character"),
            )
        })
}

/// Whether `sql` starts with the word COPY (after whitespace).
pub(super) fn starts_with_copy(sql: &str) -> bool {
    let text = sql.trim_ascii_start();
    text.get(..4)
        .is_some_and(|w| w.eq_ignore_ascii_case("copy"))
        && !text
            .as_bytes()
            .get(4)
            .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
}

/// `None`: not a single COPY statement sqlparser reads.
fn parse_copy(sql: &str) -> Option<Result<CopySpec, ProxyError>> {
    let statements = match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(statements) => statements,
        // Options sqlparser does not know (FREEZE, HEADER MATCH, WHERE, …):
        // the shards get the client's text; routing reads the equivalent.
        Err(_) => Parser::parse_sql(
            &PostgreSqlDialect {},
            &crate::router::copy_grammar::for_parser(sql)?,
        )
        .ok()?,
    };
    let [Statement::Copy {
        source,
        to,
        target,
        options,
        legacy_options,
        payload,
    }] = statements.as_slice()
    else {
        return None;
    };
    if payload.is_some() {
        return None;
    }
    let wanted = if *to {
        CopyTarget::Stdout
    } else {
        CopyTarget::Stdin
    };
    if *target != wanted {
        return None;
    }
    let (query, table, columns) = match source {
        CopySource::Query(q) => (Some(q.to_string()), None, Vec::new()),
        CopySource::Table {
            table_name,
            columns,
        } => (
            None,
            Some(table_name.to_string()),
            columns.iter().map(norm).collect(),
        ),
    };
    Some(copy_options(options, legacy_options).map(
        |(options, force_not_null, force_null, encoding)| CopySpec {
            to: *to,
            query,
            table,
            columns,
            options,
            force_not_null,
            force_null,
            encoding,
        },
    ))
}

/// The options, FORCE_NOT_NULL and FORCE_NULL columns, ENCODING.
type ParsedOptions = (CopyOptions, Vec<String>, Vec<String>, Option<String>);

fn copy_options(
    options: &[CopyOption],
    legacy: &[CopyLegacyOption],
) -> Result<ParsedOptions, ProxyError> {
    let mut format = CopyFormat::Text;
    let mut delimiter = None;
    let mut null = None;
    let mut quote = None;
    let mut escape = None;
    let mut header = false;
    let mut force_not_null = Vec::new();
    let mut force_null = Vec::new();
    let mut encoding = None;
    for option in options {
        match option {
            CopyOption::Format(name) => {
                format = match name.value.to_ascii_lowercase().as_str() {
                    "text" => CopyFormat::Text,
                    "csv" => CopyFormat::Csv,
                    "binary" => CopyFormat::Binary,
                    other => {
                        return Err(ProxyError::error(
                            "22023",
                            format!("COPY format \"{other}\" not recognized"),
                        ))
                    }
                }
            }
            CopyOption::Freeze(_) | CopyOption::ForceQuote(_) => {}
            CopyOption::Delimiter(c) => delimiter = Some(one_byte(*c, "delimiter")?),
            CopyOption::Null(s) => null = Some(s.as_bytes().to_vec()),
            CopyOption::Header(h) => header = *h,
            CopyOption::Quote(c) => quote = Some(one_byte(*c, "quote")?),
            CopyOption::Escape(c) => escape = Some(one_byte(*c, "escape")?),
            CopyOption::ForceNotNull(cols) => force_not_null.extend(cols.iter().map(norm)),
            CopyOption::ForceNull(cols) => force_null.extend(cols.iter().map(norm)),
            CopyOption::Encoding(name) => encoding = Some(name.clone()),
        }
    }
    for option in legacy {
        match option {
            CopyLegacyOption::Binary => format = CopyFormat::Binary,
            CopyLegacyOption::Delimiter(c) => delimiter = Some(one_byte(*c, "delimiter")?),
            CopyLegacyOption::Null(s) => null = Some(s.as_bytes().to_vec()),
            CopyLegacyOption::Header => header = true,
            CopyLegacyOption::Csv(csv) => {
                format = CopyFormat::Csv;
                for o in csv {
                    match o {
                        CopyLegacyCsvOption::Header => header = true,
                        CopyLegacyCsvOption::Quote(c) => quote = Some(one_byte(*c, "quote")?),
                        CopyLegacyCsvOption::Escape(c) => escape = Some(one_byte(*c, "escape")?),
                        CopyLegacyCsvOption::ForceQuote(_) => {}
                        CopyLegacyCsvOption::ForceNotNull(cols) => {
                            force_not_null.extend(cols.iter().map(norm))
                        }
                    }
                }
            }
            other => {
                return Err(ProxyError::error(
                    "0A000",
                    format!("COPY option {other} is not supported through shardgate"),
                ))
            }
        }
    }
    let mut opts = CopyOptions::new(format);
    if let Some(d) = delimiter {
        opts.delimiter = d;
    }
    if let Some(n) = null {
        opts.null = n;
    }
    if let Some(q) = quote {
        opts.quote = q;
        // ESCAPE defaults to QUOTE.
        opts.escape = q;
    }
    if let Some(e) = escape {
        opts.escape = e;
    }
    opts.header = header;
    Ok((opts, force_not_null, force_null, encoding))
}

/// What the session does with a COPY.
enum CopyPlan {
    /// Rows into a sharded table: key column and function.
    InSharded { key: String, function: usize },
    /// Rows into a replicated table: every shard.
    InEvery,
    /// Rows out of several shards.
    Out { targets: Vec<usize> },
}

fn copy_fail_frame(message: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(message.len() + 6);
    out.put_u8(tag::COPY_FAIL);
    out.put_i32((4 + message.len() + 1) as i32);
    out.put_slice(message.as_bytes());
    out.put_u8(0);
    out
}

fn copy_done_frame() -> [u8; 5] {
    [tag::COPY_DONE, 0, 0, 0, 4]
}

fn lost(shard: &str, why: &dyn std::fmt::Display) -> ProxyError {
    ProxyError::error(
        "08006",
        format!("lost the connection to shard \"{shard}\": {why}"),
    )
}

/// A shard's ErrorResponse, every field kept, the shard named in CONTEXT
/// (where its line numbers count only the rows sent to that shard).
fn shard_error(shard: &str, body: &[u8]) -> ProxyError {
    ProxyError::from_shard(
        body,
        shard,
        "; line numbers there count the rows sent to that shard",
    )
}

/// Reads one complete message from `conn`.
async fn read_message(
    conn: &mut BackendConnection,
    input: &mut BytesMut,
) -> Result<BytesMut, ProxyError> {
    loop {
        match frame_length(input, MAX_BACKEND_MESSAGE) {
            Ok(Some(total)) if input.len() >= total => return Ok(input.split_to(total)),
            Ok(_) => {}
            Err(e) => {
                conn.mark_broken();
                return Err(lost(conn.shard_name(), &e));
            }
        }
        match conn.read_buf(input).await {
            Ok(0) => return Err(lost(conn.shard_name(), &"end of stream")),
            Ok(_) => {}
            Err(e) => return Err(lost(conn.shard_name(), &e)),
        }
    }
}

/// Reads up to ReadyForQuery: the last command tag, or the first error.
async fn read_until_ready(
    conn: &mut BackendConnection,
    input: &mut BytesMut,
) -> Result<Option<String>, ProxyError> {
    let mut tag_seen = None;
    let mut error = None;
    loop {
        let frame = read_message(conn, input).await?;
        match frame[0] {
            tag::COMMAND_COMPLETE => tag_seen = Some(command_tag(&frame[5..]).to_string()),
            tag::ERROR_RESPONSE if error.is_none() => {
                error = Some(shard_error(conn.shard_name(), &frame[5..]))
            }
            tag::READY_FOR_QUERY => {
                let status = ready_status(&frame[5..]).unwrap_or(b'E');
                conn.set_transaction_status(status);
                return match error {
                    Some(e) => Err(e),
                    None => Ok(tag_seen),
                };
            }
            _ => {}
        }
    }
}

/// Reads a shard's answer to a COPY up to its Copy{In,Out}Response.
async fn read_copy_start(
    conn: &mut BackendConnection,
    input: &mut BytesMut,
    expect: u8,
) -> Result<BytesMut, ProxyError> {
    loop {
        let frame = read_message(conn, input).await?;
        match frame[0] {
            t if t == expect => return Ok(frame),
            tag::ERROR_RESPONSE => {
                let error = shard_error(conn.shard_name(), &frame[5..]);
                read_until_ready(conn, input).await.ok();
                return Err(error);
            }
            tag::READY_FOR_QUERY => {
                conn.set_transaction_status(ready_status(&frame[5..]).unwrap_or(b'E'));
                return Err(ProxyError::error(
                    "XX000",
                    format!("shard \"{}\" did not start the COPY", conn.shard_name()),
                ));
            }
            tag::COPY_IN_RESPONSE | tag::COPY_OUT_RESPONSE | tag::COPY_BOTH_RESPONSE => {
                conn.mark_broken();
                return Err(ProxyError::error(
                    "XX000",
                    format!(
                        "shard \"{}\" answered the COPY in an unexpected direction",
                        conn.shard_name()
                    ),
                ));
            }
            _ => {}
        }
    }
}

/// Rows of a catalog query (text values), run on a raw connection.
async fn query_rows(
    conn: &mut BackendConnection,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, ProxyError> {
    let mut out = BytesMut::new();
    synth::query(&mut out, sql);
    if let Err(e) = conn.write_all(&out).await {
        return Err(lost(conn.shard_name(), &e));
    }
    let mut input = BytesMut::new();
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let frame = read_message(conn, &mut input).await?;
        match frame[0] {
            tag::DATA_ROW => {
                let mut cursor = Cursor::new(tag::DATA_ROW, &frame[5..]);
                let count = cursor.i16().unwrap_or(0).max(0);
                let mut row = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    let len = cursor.i32().unwrap_or(-1);
                    if len < 0 {
                        row.push(None);
                    } else {
                        let bytes = cursor.bytes(len as usize).unwrap_or_default();
                        row.push(Some(String::from_utf8_lossy(bytes).into_owned()));
                    }
                }
                rows.push(row);
            }
            tag::ERROR_RESPONSE if error.is_none() => {
                error = Some(shard_error(conn.shard_name(), &frame[5..]))
            }
            tag::READY_FOR_QUERY => {
                conn.set_transaction_status(ready_status(&frame[5..]).unwrap_or(b'E'));
                conn.unread(&input);
                return match error {
                    Some(e) => Err(e),
                    None => Ok(rows),
                };
            }
            _ => {}
        }
    }
}

/// The columns a COPY without a column list reads (not dropped, not
/// generated) with their base type OIDs, in table order.
async fn table_columns(
    conn: &mut BackendConnection,
    table: &str,
) -> Result<Vec<(String, u32)>, ProxyError> {
    let sql = format!(
        "SELECT a.attname, (CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END)::int8, \
                a.attgenerated <> '' \
         FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
         WHERE a.attrelid = {}::regclass AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attnum",
        control::literal(table)
    );
    let rows = query_rows(conn, &sql).await?;
    Ok(rows
        .into_iter()
        .filter(|r| r.get(2).cloned().flatten().as_deref() != Some("t"))
        .filter_map(|r| {
            let name = r.first().cloned().flatten()?;
            let oid = r.get(1).cloned().flatten()?.parse::<u32>().ok()?;
            Some((name, oid))
        })
        .collect())
}

/// A COPY data error as the client sees it: `COPY users, line 17, column
/// id: …`, and nothing committed.
fn data_error(table: &str, e: &CopyDataError) -> ProxyError {
    let column = e
        .column
        .as_ref()
        .map(|c| format!(", column {c}"))
        .unwrap_or_default();
    let mut error = ProxyError::error(
        e.sqlstate,
        format!("COPY {table}, line {}{column}: {}", e.line, e.message),
    )
    .with_detail("nothing of this COPY was committed on any shard");
    error.hint = e.hint.clone();
    error
}

impl Session {
    /// If `sql` is a COPY that shardgate runs over several shards itself
    /// (rows into a sharded or replicated table, rows out of several
    /// shards), runs or starts it and returns how the query was handled;
    /// `None`: any other statement.
    pub(super) async fn routed_copy_in(
        &mut self,
        router: &Router,
        _frame: &[u8],
        sql: &str,
    ) -> Option<Attach> {
        if !starts_with_copy(sql)
            || hints::leading_hint(sql).is_some()
            || self.session_shard.is_some()
            || self.session_key.is_some()
        {
            return None;
        }
        let spec = match parse_copy(sql)? {
            Ok(spec) => spec,
            Err(error) => {
                self.report(error, false);
                return Some(Attach::Failed);
            }
        };
        let plan = match self.copy_plan(router, &spec, sql).await? {
            Ok(plan) => plan,
            Err(error) => {
                self.report(error, false);
                return Some(Attach::Failed);
            }
        };
        if !self.queue.is_empty() {
            return Some(Attach::Wait);
        }
        if self.status == b'E' {
            // A failed transaction answers 25P02 from its current backend.
            return Some(self.attach_for(None, false).await);
        }
        self.start_copy(router, spec, plan, sql, false).await;
        Some(Attach::Answered)
    }

    /// Execute of an extended-protocol portal the router sent to several
    /// shards: true if it is a COPY handled here (started, run or refused).
    pub(super) async fn routed_copy_portal(&mut self, sql: &str) -> bool {
        if !starts_with_copy(sql) {
            return false;
        }
        let Some(router) = self.router() else {
            return false;
        };
        let spec = match parse_copy(sql) {
            None => return false,
            Some(Ok(spec)) => spec,
            Some(Err(error)) => {
                self.report(error, true);
                return true;
            }
        };
        let plan = match self.copy_plan(&router, &spec, sql).await {
            None => return false,
            Some(Ok(plan)) => plan,
            Some(Err(error)) => {
                self.report(error, true);
                return true;
            }
        };
        self.start_copy(&router, spec, plan, sql, true).await;
        true
    }

    /// Whether (and how) shardgate runs this COPY itself.
    async fn copy_plan(
        &self,
        router: &Router,
        spec: &CopySpec,
        sql: &str,
    ) -> Option<Result<CopyPlan, ProxyError>> {
        if spec.to {
            let mut memo = crate::router::Memo::default();
            let route = match self.route(router, &mut memo, sql, &[]).await {
                Ok((route, _)) => route,
                // The normal path reports it.
                Err(_) => return None,
            };
            let targets: Vec<usize> = match route {
                Route::All => (0..self.shared.config.shards.len()).collect(),
                Route::Shards(set) => set.into_iter().collect(),
                _ => return None,
            };
            if let Some(query) = &spec.query {
                if let Err(error) = self.concatenates(query) {
                    return Some(Err(error));
                }
            }
            return Some(Ok(CopyPlan::Out { targets }));
        }
        let analysis = router.analyze(sql).ok()?;
        let table = analysis.tables.first()?;
        match &table.placement {
            Placement::Sharded { key, function } => Some(Ok(CopyPlan::InSharded {
                key: key.clone(),
                function: *function,
            })),
            Placement::Replicated | Placement::DefaultReplicated => Some(Ok(CopyPlan::InEvery)),
        }
    }

    /// `COPY (query) TO` over several shards is exact only when the query's
    /// result is the concatenation of the shards' results.
    fn concatenates(&self, query: &str) -> Result<(), ProxyError> {
        let refuse = |why: &str| {
            ProxyError::error(
                "0A000",
                format!("COPY ({query}) TO STDOUT over several shards: {why}"),
            )
            .with_hint(
                "COPY over several shards concatenates the shards' rows; run the SELECT itself \
                 (shardgate merges it), or add the sharding key so it runs on one shard",
            )
        };
        match self.shared.fanout.plan(query).as_ref() {
            FanoutPlan::Select(p)
                if p.hidden == 0
                    && p.sort.is_empty()
                    && p.distinct == DistinctKind::None
                    && p.limit.is_none()
                    && p.offset.is_none() =>
            {
                Ok(())
            }
            FanoutPlan::Passthrough => Ok(()),
            FanoutPlan::Refused(e) => Err(refuse(&e.message)),
            _ => Err(refuse(
                "its result (ORDER BY, LIMIT/OFFSET, DISTINCT or aggregates) is not the \
                 concatenation of the shards' rows",
            )),
        }
    }

    /// Gathers one backend per target shard, in the client's transaction if
    /// it has one, else (`begin_each`) in a transaction of its own.
    async fn gather(
        &mut self,
        targets: &[usize],
        begin_each: bool,
    ) -> Result<(Vec<Attached>, Vec<Attached>), (ProxyError, Vec<Attached>)> {
        let in_transaction = self.status == b'T';
        let begin = (in_transaction || begin_each).then(|| self.begin_sql());
        let mut group: Vec<Attached> = Vec::with_capacity(targets.len());
        group.extend(self.backend.take());
        group.append(&mut self.others);
        self.cancel.set(None);
        self.deferred_begin = None;
        for &shard in targets {
            if group.iter().any(|a| a.shard == shard) {
                continue;
            }
            match self.open_for_fanout(shard, begin.as_deref()).await {
                Ok(attached) => group.push(attached),
                Err(error) => return Err((error, group)),
            }
        }
        if let Some(begin) = &begin {
            // A backend kept outside a transaction (session mode) joins too.
            for attached in &mut group {
                if attached.conn.transaction_status() == b'I' {
                    if let Err(e) = control::run(&mut attached.conn, begin).await {
                        return Err((e.to_proxy_error(), group));
                    }
                }
            }
        }
        // The targets, sorted by shard; the transaction's other backends aside.
        let (mut chosen, rest): (Vec<Attached>, Vec<Attached>) =
            group.into_iter().partition(|a| targets.contains(&a.shard));
        chosen.sort_by_key(|a| a.shard);
        // A CancelRequest during the COPY reaches every shard of it (cleared
        // when the backends are restored).
        self.cancel.set_fanout(
            chosen
                .iter()
                .map(|a| {
                    let (pid, secret) = a.conn.cancel_key();
                    (a.shard, pid, secret)
                })
                .collect(),
        );
        Ok((chosen, rest))
    }

    async fn start_copy(
        &mut self,
        router: &Router,
        spec: CopySpec,
        plan: CopyPlan,
        sql: &str,
        extended: bool,
    ) {
        let mut query = BytesMut::new();
        synth::query(&mut query, sql);
        match plan {
            CopyPlan::Out { targets } => self.copy_out(spec, &targets, &query, extended).await,
            CopyPlan::InEvery => {
                self.copy_in_start(router, spec, None, &query, extended)
                    .await
            }
            CopyPlan::InSharded { key, function } => {
                self.copy_in_start(router, spec, Some((key, function)), &query, extended)
                    .await
            }
        }
    }

    /// Starts COPY FROM STDIN on every shard and answers the client's
    /// CopyInResponse; or reports why it could not.
    async fn copy_in_start(
        &mut self,
        router: &Router,
        spec: CopySpec,
        sharded: Option<(String, usize)>,
        query: &[u8],
        extended: bool,
    ) {
        let started = Instant::now();
        let in_transaction = self.status == b'T';
        let current_shard = self.backend.as_ref().map(|a| a.shard);
        let targets: Vec<usize> = (0..self.shared.config.shards.len()).collect();
        let table = spec.table.clone().unwrap_or_default();
        let (group, rest) = match self.gather(&targets, true).await {
            Ok(gathered) => gathered,
            Err((error, group)) => {
                self.copy_in_abort_group(
                    group,
                    Vec::new(),
                    in_transaction,
                    current_shard,
                    error,
                    extended,
                )
                .await;
                return;
            }
        };
        let mut io: Vec<ShardIo> = group.iter().map(|_| ShardIo::new()).collect();
        let mut copy = Box::new(CopyIn {
            table: table.clone(),
            extended,
            in_transaction,
            current_shard,
            group,
            io: Vec::new(),
            rows: Rows::Every,
            started,
        });
        // Backends of the transaction that this COPY does not use stay in it.
        self.others = rest;
        if let Some((key, function)) = sharded {
            match self
                .key_placer(router, &mut copy, &spec, &key, function)
                .await
            {
                Ok(rows) => copy.rows = rows,
                Err(error) => {
                    copy.io = io;
                    self.copy_in_abort(copy, error).await;
                    return;
                }
            }
        }
        // The same COPY on every shard, then their answers.
        let mut failure = None;
        for attached in copy.group.iter_mut() {
            if let Err(e) = attached.conn.write_all(query).await {
                failure = Some(lost(attached.conn.shard_name(), &e));
                break;
            }
        }
        let mut response = None;
        if failure.is_none() {
            for (attached, shard_io) in copy.group.iter_mut().zip(io.iter_mut()) {
                match read_copy_start(
                    &mut attached.conn,
                    &mut shard_io.input,
                    tag::COPY_IN_RESPONSE,
                )
                .await
                {
                    Ok(frame) => {
                        shard_io.in_copy = true;
                        attached.wrote = true;
                        response.get_or_insert(frame);
                    }
                    Err(e) => {
                        failure.get_or_insert(e);
                    }
                }
            }
        }
        copy.io = io;
        if let Some(error) = failure {
            self.copy_in_abort(copy, error).await;
            return;
        }
        let Some(response) = response else {
            self.copy_in_abort(
                copy,
                ProxyError::error("XX000", "no shard started the COPY"),
            )
            .await;
            return;
        };
        self.queue.local(response, &mut self.client_out);
        self.copy_in = Some(copy);
    }

    /// Key position and type, and the framer for a sharded table.
    async fn key_placer(
        &mut self,
        router: &Router,
        copy: &mut CopyIn,
        spec: &CopySpec,
        key: &str,
        function: usize,
    ) -> Result<Rows, ProxyError> {
        let Some(first) = copy.group.first_mut() else {
            return Err(ProxyError::error("XX000", "no shards"));
        };
        let table = spec.table.clone().unwrap_or_default();
        let described = table_columns(&mut first.conn, &table).await?;
        let columns: Vec<String> = if spec.columns.is_empty() {
            described.iter().map(|(c, _)| c.clone()).collect()
        } else {
            spec.columns.clone()
        };
        let Some(position) = columns.iter().position(|c| c == key) else {
            return Err(ProxyError::error(
                "0A000",
                format!(
                    "COPY {table}: the column list must include the sharding key \"{key}\", \
                     which places each row on its shard"
                ),
            ));
        };
        let Some((_, type_oid)) = described.iter().find(|(c, _)| c == key) else {
            return Err(ProxyError::error(
                "42703",
                format!("column \"{key}\" of relation \"{table}\" does not exist"),
            ));
        };
        let kind = KeyType::from_oid(*type_oid)
            .map_err(|e| ProxyError::error("0A000", format!("COPY {table}: {e}")))?;
        if kind == KeyType::Text {
            // Text keys hash as UTF-8 bytes: the data must arrive as UTF-8.
            let encoding = match &spec.encoding {
                Some(encoding) => encoding.clone(),
                None => query_rows(&mut first.conn, "SHOW client_encoding")
                    .await?
                    .first()
                    .and_then(|r| r.first().cloned().flatten())
                    .unwrap_or_default(),
            };
            let encoding = match encoding
                .to_ascii_uppercase()
                .replace(['-', '_'], "")
                .as_str()
            {
                "UTF8" | "UNICODE" => "UTF8".to_string(),
                _ => encoding,
            };
            if !encoding.eq_ignore_ascii_case("UTF8") {
                return Err(ProxyError::error(
                    "0A000",
                    format!(
                        "COPY {table}: the data's encoding is {encoding}; shardgate routes COPY \
                         rows by text keys only in UTF8"
                    ),
                )
                .with_hint("send the data in UTF8 (client_encoding, COPY's ENCODING option)"));
            }
        }
        let mut options = spec.options.clone();
        options.key_force_not_null = spec.force_not_null.iter().any(|c| c == key);
        options.key_force_null = spec.force_null.iter().any(|c| c == key);
        let binary = options.format == CopyFormat::Binary;
        Ok(Rows::Routed {
            framer: RowFramer::new(options, columns, position),
            key: KeyPlacer {
                map: router.map(),
                function,
                type_oid: *type_oid,
                kind,
                binary,
                column: key.to_string(),
            },
        })
    }

    /// A CopyData, CopyDone or CopyFail from the client during a routed COPY.
    pub(super) async fn copy_in_message(&mut self, tag_byte: u8, frame: &[u8]) {
        let Some(mut copy) = self.copy_in.take() else {
            return;
        };
        let body = frame.get(5..).unwrap_or_default();
        let step = match tag_byte {
            tag::COPY_DATA => route_data(&mut copy, body).map(|()| false),
            tag::COPY_DONE => finish_data(&mut copy).map(|()| true),
            _ => {
                let message = Cursor::new(tag::COPY_FAIL, body).cstr().unwrap_or("");
                let error =
                    ProxyError::error("57014", format!("COPY from stdin failed: {message}"))
                        .with_detail("nothing of this COPY was committed on any shard");
                Box::pin(self.copy_in_abort(copy, error)).await;
                return;
            }
        };
        let done = match step {
            Ok(done) => done,
            Err(error) => {
                Box::pin(self.copy_in_abort(copy, error)).await;
                return;
            }
        };
        if let Err(error) = flush_shards(&mut copy, done).await {
            Box::pin(self.copy_in_abort(copy, error)).await;
            return;
        }
        if done {
            Box::pin(self.copy_in_done(copy)).await;
        } else {
            self.copy_in = Some(copy);
        }
    }

    /// CopyDone: every shard finishes its COPY, then commit (outside a
    /// client transaction) or stay in the transaction.
    async fn copy_in_done(&mut self, mut copy: Box<CopyIn>) {
        let done = copy_done_frame();
        let mut failure = None;
        for attached in copy.group.iter_mut() {
            if let Err(e) = attached.conn.write_all(&done).await {
                failure.get_or_insert(lost(attached.conn.shard_name(), &e));
            }
        }
        let mut counts = Vec::with_capacity(copy.group.len());
        for (attached, io) in copy.group.iter_mut().zip(copy.io.iter_mut()) {
            if !io.in_copy {
                continue;
            }
            match read_until_ready(&mut attached.conn, &mut io.input).await {
                Ok(tag_seen) => {
                    io.in_copy = false;
                    let n = tag_seen
                        .as_deref()
                        .and_then(|t| t.strip_prefix("COPY "))
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(0);
                    counts.push(n);
                }
                Err(e) => {
                    io.in_copy = false;
                    failure.get_or_insert(e);
                }
            }
        }
        if let Some(error) = failure {
            self.copy_in_abort(copy, error).await;
            return;
        }
        let total: u64 = match copy.rows {
            Rows::Every => counts.first().copied().unwrap_or(0),
            Rows::Routed { .. } => counts.iter().sum(),
        };
        for (attached, io) in copy.group.iter_mut().zip(copy.io.iter()) {
            attached.wrote = match copy.rows {
                Rows::Every => true,
                Rows::Routed { .. } => io.rows > 0,
            };
        }
        let route = match copy.rows {
            Rows::Every => metrics::Route::Broadcast,
            Rows::Routed { .. } => metrics::Route::Fanout,
        };
        let mut group = std::mem::take(&mut copy.group);
        let (in_transaction, current_shard, extended, started) = (
            copy.in_transaction,
            copy.current_shard,
            copy.extended,
            copy.started,
        );
        drop(copy);
        let outcome = if in_transaction {
            Ok(())
        } else {
            let mut participants: Vec<Participant<'_>> = group
                .iter_mut()
                .map(|a| Participant {
                    shard: a.shard,
                    wrote: a.wrote,
                    conn: &mut a.conn,
                })
                .collect();
            match twophase::commit(&self.shared.twophase, &mut participants).await {
                Ok(CommitOutcome::Committed { .. }) => Ok(()),
                Ok(CommitOutcome::RolledBack) => Err(ProxyError::error(
                    "40000",
                    "the COPY's implicit transaction was rolled back on every shard",
                )),
                Err(error) => Err(error),
            }
        };
        self.shared.metrics.query_done(
            group.first().map_or(0, |a| a.shard),
            route,
            started.elapsed(),
        );
        match outcome {
            Ok(()) => {
                self.restore_group(group, current_shard, in_transaction)
                    .await;
                let mut out = BytesMut::new();
                synth::command_complete(&mut out, &format!("COPY {total}"));
                if !extended {
                    synth::ready_for_query(&mut out, self.status);
                }
                self.queue.local(out, &mut self.client_out);
            }
            Err(error) => {
                self.restore_group(group, current_shard, false).await;
                self.report(error, extended);
            }
        }
    }

    /// Ends a COPY FROM STDIN that failed: every shard still copying gets
    /// CopyFail, nothing is committed (outside a client transaction: rolled
    /// back; inside one: the transaction is aborted on every shard, as
    /// Postgres would), and the client gets `error`.
    async fn copy_in_abort(&mut self, mut copy: Box<CopyIn>, error: ProxyError) {
        let fail = copy_fail_frame(&format!("shardgate: {}", error.message));
        for (attached, io) in copy.group.iter_mut().zip(copy.io.iter_mut()) {
            if !io.in_copy {
                continue;
            }
            io.in_copy = false;
            if attached.conn.write_all(&fail).await.is_err() {
                continue;
            }
            let drained = tokio::time::timeout(
                DRAIN_TIMEOUT,
                read_until_ready(&mut attached.conn, &mut io.input),
            )
            .await;
            if !matches!(drained, Ok(Ok(_)) | Ok(Err(_))) || attached.conn.is_broken() {
                attached.conn.mark_broken();
            }
        }
        let group = std::mem::take(&mut copy.group);
        let (in_transaction, current_shard, extended) =
            (copy.in_transaction, copy.current_shard, copy.extended);
        drop(copy);
        self.copy_in_abort_group(
            group,
            Vec::new(),
            in_transaction,
            current_shard,
            error,
            extended,
        )
        .await;
    }

    async fn copy_in_abort_group(
        &mut self,
        mut group: Vec<Attached>,
        rest: Vec<Attached>,
        in_transaction: bool,
        current_shard: Option<usize>,
        error: ProxyError,
        extended: bool,
    ) {
        group.extend(rest);
        group.append(&mut self.others);
        if in_transaction {
            abort_transactions(&mut group).await;
        } else {
            super::fanout::rollback_group(&mut group).await;
        }
        self.report(error, extended);
        self.restore_group(group, current_shard, in_transaction)
            .await;
    }

    /// COPY … TO STDOUT over several shards: one CopyOutResponse, the
    /// shards' rows one shard after the other, one CopyDone and the summed
    /// count.
    async fn copy_out(&mut self, spec: CopySpec, targets: &[usize], query: &[u8], extended: bool) {
        let started = Instant::now();
        let in_transaction = self.status == b'T';
        let current_shard = self.backend.as_ref().map(|a| a.shard);
        let (mut group, rest) = match self.gather(targets, false).await {
            Ok(gathered) => gathered,
            Err((error, group)) => {
                self.report(error, extended);
                self.restore_group(group, current_shard, in_transaction)
                    .await;
                return;
            }
        };
        let mut inputs: Vec<BytesMut> = group.iter().map(|_| BytesMut::new()).collect();
        let mut in_copy = vec![false; group.len()];
        let mut failure = None;
        let mut response = None;
        for attached in group.iter_mut() {
            if let Err(e) = attached.conn.write_all(query).await {
                failure.get_or_insert(lost(attached.conn.shard_name(), &e));
            }
        }
        if failure.is_none() {
            for (i, attached) in group.iter_mut().enumerate() {
                match read_copy_start(&mut attached.conn, &mut inputs[i], tag::COPY_OUT_RESPONSE)
                    .await
                {
                    Ok(frame) => {
                        in_copy[i] = true;
                        response.get_or_insert(frame);
                    }
                    Err(e) => {
                        failure.get_or_insert(e);
                    }
                }
            }
        }
        let binary = spec.options.format == CopyFormat::Binary;
        let header = spec.options.header && !binary;
        let mut total = 0u64;
        // Columns per row, from the CopyOutResponse (format, count, formats).
        let columns = response
            .as_ref()
            .and_then(|r| r.get(6..8))
            .map_or(0, |c| i16::from_be_bytes([c[0], c[1]]).max(0) as usize);
        let mut joined = BinaryOut::new();
        if failure.is_none() {
            if let Some(response) = response {
                self.client_out.extend_from_slice(&response);
            }
            for i in 0..group.len() {
                let mut framer = BinaryOut::framer(columns);
                let mut first_data = true;
                let attached = &mut group[i];
                let result = loop {
                    let frame = match read_message(&mut attached.conn, &mut inputs[i]).await {
                        Ok(frame) => frame,
                        Err(e) => break Err(e),
                    };
                    match frame[0] {
                        tag::COPY_DATA => {
                            let skip = header && first_data && i > 0;
                            first_data = false;
                            if skip {
                                continue;
                            }
                            if binary {
                                let out = &mut self.client_out;
                                let fed = framer.feed(&frame[5..], &mut |piece| {
                                    joined.piece(piece, out);
                                    Ok(())
                                });
                                if let Err(e) = fed {
                                    break Err(ProxyError::error(
                                        "XX000",
                                        format!(
                                            "shard \"{}\" sent malformed binary COPY data: {e}",
                                            attached.conn.shard_name()
                                        ),
                                    ));
                                }
                            } else {
                                self.client_out.extend_from_slice(&frame);
                            }
                            if self.client_out.len() >= CLIENT_FLUSH_AT
                                && self.flush_client().await.is_err()
                            {
                                break Err(ProxyError::error("08006", "the client went away"));
                            }
                        }
                        tag::COMMAND_COMPLETE => {
                            total += command_tag(&frame[5..])
                                .strip_prefix("COPY ")
                                .and_then(|n| n.parse::<u64>().ok())
                                .unwrap_or(0);
                        }
                        tag::ERROR_RESPONSE => {
                            let error = shard_error(attached.conn.shard_name(), &frame[5..]);
                            read_until_ready(&mut attached.conn, &mut inputs[i])
                                .await
                                .ok();
                            break Err(error);
                        }
                        tag::READY_FOR_QUERY => {
                            attached
                                .conn
                                .set_transaction_status(ready_status(&frame[5..]).unwrap_or(b'E'));
                            break Ok(());
                        }
                        _ => {}
                    }
                };
                in_copy[i] = false;
                if let Err(error) = result {
                    failure = Some(error);
                    break;
                }
            }
        }
        // Shards still copying after an error: cancelled and drained.
        for (i, attached) in group.iter_mut().enumerate() {
            if !in_copy[i] {
                continue;
            }
            let (pid, secret) = attached.conn.cancel_key();
            if let Some(shard) = self.shared.config.shards.get(attached.shard) {
                let _ = crate::backend::send_cancel(shard, pid, secret).await;
            }
            let drained = tokio::time::timeout(
                DRAIN_TIMEOUT,
                read_until_ready(&mut attached.conn, &mut inputs[i]),
            )
            .await;
            if drained.is_err() {
                attached.conn.mark_broken();
            }
        }
        self.shared.metrics.query_done(
            group.first().map_or(0, |a| a.shard),
            metrics::Route::Fanout,
            started.elapsed(),
        );
        group.extend(rest);
        match failure {
            None => {
                let mut out = BytesMut::new();
                if binary {
                    joined.finish(&mut out);
                }
                out.extend_from_slice(&copy_done_frame());
                synth::command_complete(&mut out, &format!("COPY {total}"));
                if !extended {
                    synth::ready_for_query(&mut out, self.status);
                }
                self.client_out.extend_from_slice(&out);
                self.restore_group(group, current_shard, in_transaction)
                    .await;
            }
            Some(error) => {
                if in_transaction {
                    abort_transactions(&mut group).await;
                }
                self.report(error, extended);
                self.restore_group(group, current_shard, in_transaction)
                    .await;
            }
        }
    }
}

fn put_copy_data(out: &mut BytesMut, data: &[u8]) {
    out.put_u8(tag::COPY_DATA);
    out.put_i32((data.len() + 4) as i32);
    out.put_slice(data);
}

/// Joins binary COPY streams the way one Postgres would send them: one
/// file header (with the first tuple), every shard's tuples one CopyData
/// each, one trailer. Tuples are found with the row framer, so it does
/// not depend on how a shard cut its messages.
struct BinaryOut {
    /// The first shard's file header, until it goes out with a tuple.
    header: Option<Vec<u8>>,
    header_sent: bool,
}

impl BinaryOut {
    fn new() -> BinaryOut {
        BinaryOut {
            header: None,
            header_sent: false,
        }
    }

    /// A framer for one shard's stream of `columns` fields per tuple.
    fn framer(columns: usize) -> RowFramer {
        RowFramer::new(
            CopyOptions::new(CopyFormat::Binary),
            vec![String::new(); columns],
            0,
        )
    }

    fn piece(&mut self, piece: Piece<'_>, out: &mut BytesMut) {
        match piece {
            Piece::Header(bytes) => {
                if !self.header_sent && self.header.is_none() {
                    self.header = Some(bytes.to_vec());
                }
            }
            Piece::Row { bytes, .. } => {
                let header = self.header.take().unwrap_or_default();
                self.header_sent = true;
                out.put_u8(tag::COPY_DATA);
                out.put_i32((header.len() + bytes.len() + 4) as i32);
                out.put_slice(&header);
                out.put_slice(bytes);
            }
        }
    }

    /// The trailer (with the header if no tuple carried it).
    fn finish(&mut self, out: &mut BytesMut) {
        let mut last = self.header.take().unwrap_or_default();
        last.extend_from_slice(&BINARY_TRAILER);
        put_copy_data(out, &last);
    }
}

/// Aborts the client's transaction on every backend still inside it
/// healthy (a COPY of it failed), as Postgres would have.
async fn abort_transactions(group: &mut [Attached]) {
    for attached in group.iter_mut() {
        if attached.conn.transaction_status() == b'T' && !attached.conn.is_broken() {
            let _ = control::run(
                &mut attached.conn,
                "SELECT 1/0 AS shardgate_aborts_this_transaction_after_a_failed_copy",
            )
            .await;
        }
    }
}

/// Routes one CopyData chunk's rows into the shards' buffers.
fn route_data(copy: &mut CopyIn, data: &[u8]) -> Result<(), ProxyError> {
    let CopyIn {
        rows, io, table, ..
    } = copy;
    match rows {
        Rows::Every => {
            for shard_io in io.iter_mut() {
                shard_io.out.extend_from_slice(data);
            }
            Ok(())
        }
        Rows::Routed { framer, key } => framer
            .feed(data, &mut |piece| route_piece(piece, key, io))
            .map_err(|e| data_error(table, &e)),
    }
}

/// One piece from the framer into the right buffers.
fn route_piece(piece: Piece<'_>, key: &KeyPlacer, io: &mut [ShardIo]) -> Result<(), CopyDataError> {
    match piece {
        Piece::Header(bytes) => {
            for shard_io in io.iter_mut() {
                shard_io.out.extend_from_slice(bytes);
            }
            Ok(())
        }
        Piece::Row {
            bytes,
            key: value,
            line,
        } => {
            let shard = key
                .shard(value.as_deref())
                .map_err(|e| CopyDataError { line, ..e })?;
            let Some(shard_io) = io.get_mut(shard) else {
                return Err(CopyDataError {
                    sqlstate: "XX000",
                    line,
                    column: None,
                    message: format!(
                        "the sharding function named shard #{shard}, which has no backend"
                    ),
                    hint: None,
                });
            };
            shard_io.out.extend_from_slice(bytes);
            shard_io.rows += 1;
            Ok(())
        }
    }
}

/// CopyDone: the last row, and the binary trailer for every shard.
fn finish_data(copy: &mut CopyIn) -> Result<(), ProxyError> {
    let CopyIn {
        rows, io, table, ..
    } = copy;
    if let Rows::Routed { framer, key } = rows {
        framer
            .finish(&mut |piece| route_piece(piece, key, io))
            .map_err(|e| data_error(table, &e))?;
        if framer.format() == CopyFormat::Binary {
            for shard_io in io.iter_mut() {
                shard_io.out.extend_from_slice(&BINARY_TRAILER);
            }
        }
    }
    Ok(())
}

/// Sends every shard buffer past [`FLUSH_AT`] (all of them when `all`),
/// and notices a shard that already failed its COPY.
async fn flush_shards(copy: &mut CopyIn, all: bool) -> Result<(), ProxyError> {
    for (attached, shard_io) in copy.group.iter_mut().zip(copy.io.iter_mut()) {
        let size = shard_io.buffered();
        if size == 0 || (!all && size < FLUSH_AT) {
            continue;
        }
        let length = (size + 4) as u32;
        shard_io.out[1..5].copy_from_slice(&length.to_be_bytes());
        if let Err(e) = attached.conn.write_all(&shard_io.out).await {
            return Err(lost(attached.conn.shard_name(), &e));
        }
        shard_io.out.truncate(FRAME_HEADER.len());
        // Did the shard give up already (constraint violation, …)?
        if let Some(read) = attached.conn.read_buf(&mut shard_io.input).now_or_never() {
            match read {
                Ok(0) => return Err(lost(attached.conn.shard_name(), &"end of stream")),
                Err(e) => return Err(lost(attached.conn.shard_name(), &e)),
                Ok(_) => {
                    if let Some(error) = early_error(attached, shard_io) {
                        return Err(error);
                    }
                }
            }
        }
    }
    Ok(())
}

/// An ErrorResponse a shard sent during its COPY IN, with what follows it.
fn early_error(attached: &mut Attached, shard_io: &mut ShardIo) -> Option<ProxyError> {
    let mut at = 0;
    let mut error = None;
    while let Ok(Some(total)) = frame_length(&shard_io.input[at..], MAX_BACKEND_MESSAGE) {
        if shard_io.input.len() < at + total {
            break;
        }
        let frame = &shard_io.input[at..at + total];
        match frame[0] {
            tag::ERROR_RESPONSE if error.is_none() => {
                error = Some(shard_error(attached.conn.shard_name(), &frame[5..]))
            }
            tag::READY_FOR_QUERY => {
                attached
                    .conn
                    .set_transaction_status(ready_status(&frame[5..]).unwrap_or(b'E'));
                shard_io.in_copy = false;
            }
            _ => {}
        }
        at += total;
    }
    if error.is_some() {
        // The rest of its answer (ReadyForQuery) is read when aborting.
        let _ = shard_io.input.split_to(at);
    }
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_statements_and_options() {
        assert!(starts_with_copy("  copy t from stdin"));
        assert!(!starts_with_copy("copying"));
        let spec = parse_copy("COPY Users (ID, \"Name\") FROM STDIN WITH (FORMAT csv, HEADER, DELIMITER ';', FORCE_NULL (id))")
            .unwrap()
            .unwrap();
        assert_eq!(spec.columns, vec!["id".to_string(), "Name".to_string()]);
        assert_eq!(spec.options.format, CopyFormat::Csv);
        assert_eq!(spec.options.delimiter, b';');
        assert!(spec.options.header);
        assert_eq!(spec.force_null, vec!["id".to_string()]);
        let spec = parse_copy("COPY t FROM STDIN CSV HEADER QUOTE '|'")
            .unwrap()
            .unwrap();
        assert_eq!((spec.options.quote, spec.options.escape), (b'|', b'|'));
        let spec = parse_copy("COPY t FROM STDIN BINARY").unwrap().unwrap();
        assert_eq!(spec.options.format, CopyFormat::Binary);
        let spec = parse_copy("COPY (SELECT 1) TO STDOUT").unwrap().unwrap();
        assert!(spec.to && spec.query.is_some());
        assert!(parse_copy("COPY t FROM '/tmp/x'").is_none());
        assert!(parse_copy("SELECT 1").is_none());
        assert_eq!(
            parse_copy("COPY t FROM STDIN (FORMAT xml)")
                .unwrap()
                .unwrap_err()
                .code,
            "22023"
        );
        let spec = parse_copy("COPY t FROM STDIN (ENCODING 'LATIN1')")
            .unwrap()
            .unwrap();
        assert_eq!(spec.encoding.as_deref(), Some("LATIN1"));
    }

    #[test]
    fn binary_streams_join() {
        let mut header = crate::executor::copy_rows::BINARY_SIGNATURE.to_vec();
        header.extend_from_slice(&[0; 8]);
        let tuple = [0u8, 1, 0, 0, 0, 1, 7];
        let mut stream: Vec<u8> = header.clone();
        stream.extend_from_slice(&tuple);
        stream.extend_from_slice(&BINARY_TRAILER);
        let mut joined = BinaryOut::new();
        let mut out = BytesMut::new();
        for cut in [3, 5] {
            let mut framer = BinaryOut::framer(1);
            for b in stream.chunks(cut) {
                framer
                    .feed(b, &mut |p| {
                        joined.piece(p, &mut out);
                        Ok(())
                    })
                    .unwrap();
            }
        }
        joined.finish(&mut out);
        let mut expected = BytesMut::new();
        let mut first = header.clone();
        first.extend_from_slice(&tuple);
        put_copy_data(&mut expected, &first);
        put_copy_data(&mut expected, &tuple);
        put_copy_data(&mut expected, &BINARY_TRAILER);
        assert_eq!(out, expected);
        // No tuple anywhere: the header goes with the trailer.
        let mut empty = BinaryOut::new();
        let mut out = BytesMut::new();
        let mut only = header.clone();
        only.extend_from_slice(&BINARY_TRAILER);
        BinaryOut::framer(1)
            .feed(&only, &mut |p| {
                empty.piece(p, &mut out);
                Ok(())
            })
            .unwrap();
        empty.finish(&mut out);
        let mut expected = BytesMut::new();
        put_copy_data(&mut expected, &only);
        assert_eq!(out, expected);
    }
}
