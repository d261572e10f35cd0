//! Fan-out executor: statements that run on several shards at once, with
//! the client getting exactly what one Postgres holding all rows would
//! return — same rows, order, column types and command tag — or a `0A000`
//! refusal saying why and how to rewrite.
//!
//! # Contract with the session
//!
//! ```text
//! run(&executor, FanoutRequest { sql, route, protocol }, &mut targets, &mut out, &mut client)
//!     -> Result<FanoutOutcome, ProxyError>
//! ```
//! - `targets`: one checked-out connection per shard of the route, idle
//!   (`I`) or inside a transaction block (`T`).
//! - Each target gets the (possibly rewritten) statement: simple protocol
//!   writes as a `Query`; SELECTs and every extended-protocol request as
//!   unnamed Parse + Bind + Describe(P) + Execute + Sync. Every target is read
//!   to its ReadyForQuery before `run` returns, also on errors (shards still
//!   working are cancelled); `set_transaction_status` is called on each. A
//!   connection whose stream broke is marked broken.
//! - Result frames (RowDescription for the simple protocol or when
//!   `describe`, DataRows, CommandComplete) are appended to `out`, which is
//!   written to `client` whenever it exceeds 32 KiB. Never ReadyForQuery,
//!   ParseComplete or BindComplete: the session writes those.
//! - On error `out` may hold rows already merged (as with one Postgres, rows
//!   then an error); the error keeps the shard's SQLSTATE, message and hint,
//!   with the shard named in the detail. Per-shard transaction status after
//!   an error: `conn.transaction_status()`.
//! - A Describe(statement) of a fan-out SELECT should be answered by any one
//!   shard with the client's original SQL (the rewrite only adds hidden
//!   columns, which are stripped).
//!
//! # Structure (as Vitess)
//! - [`plan`]: sqlparser AST → [`plan::Plan`] (per-shard SQL printed from the
//!   rewritten AST, plus the merge to apply), cached by SQL text.
//! - [`merge`]: the merge primitives (Sorter, Dedup, Window, Project,
//!   Collect, Pass). [`value`]: typed sort keys (text and binary formats).
//! - [`engine`]: the concurrent scatter/gather loop.
//! - [`aggregate`]: re-aggregation of partial aggregates and the final
//!   evaluation of the select list / HAVING / ORDER BY over merged groups.
//! - [`split`]: a Split INSERT divided by VALUES rows.
//! - [`colocated`]: which subqueries over sharded tables are exact per shard.
//! - [`wire`]: Bind decoding, the extended batch sent to shards, row codecs.

pub mod aggregate;
pub mod colocated;
pub mod engine;
pub mod merge;
pub mod plan;
pub mod split;
pub mod value;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;

use crate::backend::BackendConnection;
use crate::config::{Config, ShardConfig, TablePlacement};
use crate::protocol::messages::Bind;
use crate::protocol::synth::{self, ProxyError};
use crate::router::Route;
use engine::{gather, Memory, Output};
pub use engine::{ClientSink, Presence};
use merge::{Pass, SelectMerge, Window};
use plan::{Count, Plan, Tables};
use wire::{BindParams, OutParam};

/// One target shard and its checked-out connection.
pub struct ShardConn<'a> {
    pub shard: usize,
    pub conn: &'a mut BackendConnection,
}

/// How the client sent the statement.
pub enum FanoutProtocol<'a> {
    Simple,
    /// The client's Bind (param formats/values/result formats raw in
    /// `bind.rest`), the parameter type OIDs from its Parse, whether it sent
    /// Describe(portal) (then RowDescription precedes the rows). The whole
    /// result is produced; a client fetching it in parts (Execute with
    /// max_rows) is served by the session from this stream.
    /// `expected_shape`: the result columns the client was told when it
    /// described the statement; other columns fail with 0A000, as in
    /// Postgres after a schema change.
    Extended {
        bind: Bind<'a>,
        param_types: &'a [u32],
        describe: bool,
        expected_shape: Option<u64>,
    },
}

pub struct FanoutRequest<'a> {
    pub sql: &'a str,
    pub route: &'a Route,
    pub protocol: FanoutProtocol<'a>,
}

/// What happened, per target (same order as `targets`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FanoutOutcome {
    /// Transaction status of each target after the statement (`I`/`T`/`E`).
    pub statuses: Vec<u8>,
    /// Whether each target may have written (for two-phase commit).
    pub wrote: Vec<bool>,
    /// Rows sent to the client, or rows affected for writes.
    pub rows: u64,
    /// The combined command tag sent in CommandComplete.
    pub tag: String,
}

/// Shared fan-out state: plan cache, shard addresses (for cancels), limits.
pub struct FanoutExecutor {
    shards: Vec<ShardConfig>,
    tables: std::sync::RwLock<Tables>,
    max_merge_memory: u64,
    /// `pool.query_timeout`: the bound on waiting for a shard's answer.
    query_timeout: std::time::Duration,
    bytewise: AtomicBool,
    cache: Mutex<HashMap<String, Arc<Plan>>>,
    /// The shards' user-defined type OIDs mapped to the first shard's
    /// (see `protocol::type_oids`); the sessions use it too.
    type_oids: crate::protocol::type_oids::TypeOidsCell,
}

/// Cached plans; the cache is cleared when full (ad-hoc SQL with inlined values).
const PLAN_CACHE_CAPACITY: usize = 10_000;

impl FanoutExecutor {
    pub fn new(config: &Config) -> FanoutExecutor {
        let mut tables = Tables::default();
        for t in &config.tables {
            if let TablePlacement::Sharded { key, function } = &t.placement {
                let name = t.name.rsplit('.').next().unwrap_or(&t.name).to_string();
                tables.sharded.insert(name, (key.clone(), function.clone()));
            }
        }
        FanoutExecutor {
            shards: config.shards.clone(),
            tables: std::sync::RwLock::new(tables),
            max_merge_memory: config.max_merge_memory,
            query_timeout: config.pool.query_timeout,
            bytewise: AtomicBool::new(false),
            cache: Mutex::new(HashMap::new()),
            type_oids: Default::default(),
        }
    }

    /// The current type OID translation (`None`: the shards agree).
    pub fn type_oids(&self) -> &crate::protocol::type_oids::TypeOidsCell {
        &self.type_oids
    }

    /// Whether the shards' database collation (`datcollate`) is C, POSIX or
    /// C.UTF-8: then text sorts bytewise and text ORDER BY merges exactly.
    /// Until told, text ORDER BY is refused unless it says `COLLATE "C"`.
    pub fn set_text_collation_bytewise(&self, bytewise: bool) {
        self.bytewise.store(bytewise, Ordering::Relaxed);
    }

    /// The names of the database's aggregate functions (`SELECT proname
    /// FROM pg_proc WHERE prokind = 'a'`): calls of those the planner cannot
    /// merge (user-defined aggregates) are then refused instead of being
    /// taken for scalar functions and evaluated per shard.
    pub fn set_aggregate_names<I: IntoIterator<Item = String>>(&self, names: I) {
        let names = names.into_iter().collect();
        match self.tables.write() {
            Ok(mut t) => t.other_aggregates = names,
            Err(poisoned) => poisoned.into_inner().other_aggregates = names,
        }
        if let Ok(mut cache) = self.cache.lock() {
            cache.clear();
        }
    }

    pub fn text_collation_bytewise(&self) -> bool {
        self.bytewise.load(Ordering::Relaxed)
    }

    pub fn query_timeout(&self) -> std::time::Duration {
        self.query_timeout
    }

    pub fn max_merge_memory(&self) -> u64 {
        self.max_merge_memory
    }

    pub(crate) fn shard_config(&self, index: usize) -> Option<&ShardConfig> {
        self.shards.get(index)
    }

    /// The plan for `sql`, cached by text.
    pub fn plan(&self, sql: &str) -> Arc<Plan> {
        if let Ok(cache) = self.cache.lock() {
            if let Some(p) = cache.get(sql) {
                return p.clone();
            }
        }
        let p = match self.tables.read() {
            Ok(tables) => Arc::new(plan::plan(sql, &tables)),
            Err(poisoned) => Arc::new(plan::plan(sql, &poisoned.into_inner())),
        };
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= PLAN_CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(sql.to_string(), p.clone());
        }
        p
    }
}

/// The request's parameters and formats, protocol-independent.
pub(crate) struct Request<'a> {
    pub sql: &'a str,
    pub extended: bool,
    pub describe: bool,
    pub params: BindParams,
    pub param_types: Vec<u32>,
}

impl Request<'_> {
    pub fn emit_header(&self) -> bool {
        !self.extended || self.describe
    }

    /// The client's parameters as sent to a shard.
    pub fn out_params(&self) -> Vec<OutParam> {
        (0..self.params.values.len())
            .map(|i| OutParam {
                type_oid: self.param_types.get(i).copied().unwrap_or(0),
                format: self.params.formats.get(i).copied().unwrap_or(0),
                value: self.params.values[i].clone(),
            })
            .collect()
    }

    /// The client's parameters with those a rewritten statement no longer
    /// references sent as NULL text (an unreferenced parameter of unknown
    /// type would make Parse fail).
    pub fn masked_params(&self, used: &[usize]) -> Vec<OutParam> {
        self.out_params()
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                if used.contains(&(i + 1)) {
                    p
                } else {
                    OutParam {
                        type_oid: value::oid::TEXT,
                        format: 0,
                        value: None,
                    }
                }
            })
            .collect()
    }

    /// The statement as one target's batch: a Query for simple-protocol
    /// statements that need no per-column formats, else extended messages.
    pub fn batch(&self, sql: &str, force_extended: bool, result_formats: &[i16]) -> BytesMut {
        let mut b = BytesMut::new();
        if self.extended || force_extended {
            wire::extended_batch(&mut b, sql, &self.out_params(), result_formats);
        } else {
            synth::query(&mut b, sql);
        }
        b
    }

    fn count(&self, c: Option<Count>) -> Result<Option<u64>, ProxyError> {
        match c {
            None => Ok(None),
            Some(Count::Literal(n)) => Ok(Some(n)),
            Some(Count::Param(n)) => match self.params.int_param(n) {
                Some(Some(v)) if v >= 0 => Ok(Some(v as u64)),
                Some(None) => Ok(None),
                _ => Err(ProxyError::error(
                    "2201W",
                    format!("LIMIT/OFFSET parameter ${n} is not a non-negative integer"),
                )),
            },
        }
    }
}

/// Runs a statement on several shards; see the module documentation.
pub async fn run<W: ClientSink>(
    executor: &FanoutExecutor,
    request: FanoutRequest<'_>,
    targets: &mut [ShardConn<'_>],
    out: &mut BytesMut,
    client: &mut W,
) -> Result<FanoutOutcome, ProxyError> {
    run_flushing(executor, request, targets, out, client, false).await
}

/// [`run`]; `eager`: for a reader that wants rows as soon as they are merged
/// (a portal fetched in parts, whose client waits for a few rows), merged
/// output is written whenever the executor would wait for the shards, not
/// only in 32 KiB pieces.
pub async fn run_flushing<W: ClientSink>(
    executor: &FanoutExecutor,
    request: FanoutRequest<'_>,
    targets: &mut [ShardConn<'_>],
    out: &mut BytesMut,
    client: &mut W,
    eager: bool,
) -> Result<FanoutOutcome, ProxyError> {
    let expected_shape = match &request.protocol {
        FanoutProtocol::Extended { expected_shape, .. } => *expected_shape,
        FanoutProtocol::Simple => None,
    };
    let req = match &request.protocol {
        FanoutProtocol::Simple => Request {
            sql: request.sql,
            extended: false,
            describe: true,
            params: BindParams::default(),
            param_types: Vec::new(),
        },
        FanoutProtocol::Extended {
            bind,
            param_types,
            describe,
            ..
        } => {
            let params = BindParams::decode(bind.rest)
                .map_err(|e| ProxyError::error("08P01", format!("invalid Bind message: {e}")))?;
            Request {
                sql: request.sql,
                extended: true,
                describe: *describe,
                params,
                param_types: param_types.to_vec(),
            }
        }
    };
    let mut output = Output {
        out,
        client,
        client_lost: false,
        eager,
        watching: true,
        expected_shape,
    };
    let mut memory = Memory {
        used: 0,
        limit: executor.max_merge_memory,
    };
    let result = match request.route {
        Route::Broadcast => {
            passthrough(executor, &req, targets, true, &mut output, &mut memory).await
        }
        Route::Split { rows_by_shard } => match executor.plan(req.sql).as_ref() {
            Plan::Insert { insert, .. } => {
                split::run(
                    executor,
                    &req,
                    insert,
                    rows_by_shard,
                    targets,
                    &mut output,
                    &mut memory,
                )
                .await
            }
            _ => Err(ProxyError::error(
                "XX000",
                "a Split route needs an INSERT … VALUES statement",
            )),
        },
        _ => {
            let plan = executor.plan(req.sql);
            match plan.as_ref() {
                Plan::Refused(e) => Err(e.clone()),
                Plan::Insert {
                    fanout_refusal: Some(e),
                    ..
                } => Err(e.clone()),
                Plan::Passthrough | Plan::Insert { .. } => {
                    passthrough(executor, &req, targets, false, &mut output, &mut memory).await
                }
                Plan::CopyOut => copy_out(executor, &req, targets, &mut output, &mut memory).await,
                Plan::Select(p) => {
                    select(executor, &req, p, targets, &mut output, &mut memory).await
                }
                Plan::Aggregate(p) => {
                    aggregate::run(executor, &req, p, targets, &mut output, &mut memory).await
                }
            }
        }
    };
    if output.client_lost {
        return Err(ProxyError::error(
            "08006",
            "the client connection was lost while sending a merged result",
        ));
    }
    result
}

/// SELECT merged by the proxy.
async fn select<W: ClientSink>(
    ex: &FanoutExecutor,
    req: &Request<'_>,
    plan: &plan::SelectPlan,
    targets: &mut [ShardConn<'_>],
    output: &mut Output<'_, W>,
    memory: &mut Memory,
) -> Result<FanoutOutcome, ProxyError> {
    let window = Window {
        offset: req.count(plan.offset)?.unwrap_or(0),
        limit: req.count(plan.limit)?,
        ..Window::default()
    };
    // Visible columns in the client's formats, hidden sort columns as text.
    let mut formats = req.params.result_formats.clone();
    if formats.len() > 1 {
        formats.extend(std::iter::repeat_n(0, plan.hidden));
    }
    let batch = req.batch(&plan.shard_sql, true, &formats);
    let batches: Vec<_> = targets.iter().map(|_| Some(batch.clone())).collect();
    let mut merge = SelectMerge::new(
        plan,
        req.emit_header(),
        ex.text_collation_bytewise(),
        window,
        ex.max_merge_memory,
    );
    let g = gather(ex, targets, &batches, &mut merge, output, memory).await?;
    let rows = merge.rows();
    let tag = format!("SELECT {rows}");
    synth::command_complete(output.out, &tag);
    Ok(FanoutOutcome {
        statuses: g.statuses,
        wrote: vec![false; targets.len()],
        rows,
        tag,
    })
}

/// A statement run as sent: writes on several shards (tags summed, RETURNING
/// rows concatenated) or a Broadcast (every shard must succeed; rows and
/// tags of the first shard, since replicated tables hold the same rows).
async fn passthrough<W: ClientSink>(
    ex: &FanoutExecutor,
    req: &Request<'_>,
    targets: &mut [ShardConn<'_>],
    broadcast: bool,
    output: &mut Output<'_, W>,
    memory: &mut Memory,
) -> Result<FanoutOutcome, ProxyError> {
    let batch = req.batch(req.sql, false, &req.params.result_formats);
    let batches: Vec<_> = targets.iter().map(|_| Some(batch.clone())).collect();
    let mut merge = Pass {
        emit_header: req.emit_header(),
        no_data: req.extended && req.describe,
        only: broadcast.then_some(0),
        rows: 0,
    };
    let g = gather(ex, targets, &batches, &mut merge, output, memory).await?;
    let wrote = g
        .tags
        .iter()
        .map(|t| t.iter().any(|t| tag_wrote(t)))
        .collect();
    let (tags, rows) = if broadcast {
        let tags = g.tags.first().cloned().unwrap_or_default();
        let rows = tags.last().map_or(0, |t| tag_count(t).1.unwrap_or(0));
        (tags, rows)
    } else {
        let tag = sum_tags(&g.tags);
        let rows = tag_count(&tag).1.unwrap_or(merge.rows);
        (vec![tag], rows)
    };
    for t in &tags {
        synth::command_complete(output.out, t);
    }
    Ok(FanoutOutcome {
        statuses: g.statuses,
        wrote,
        rows,
        tag: tags.last().cloned().unwrap_or_default(),
    })
}

/// COPY … TO STDOUT: CopyOutResponse once, CopyData of every shard,
/// CopyDone, `COPY <sum>`.
async fn copy_out<W: ClientSink>(
    ex: &FanoutExecutor,
    req: &Request<'_>,
    targets: &mut [ShardConn<'_>],
    output: &mut Output<'_, W>,
    memory: &mut Memory,
) -> Result<FanoutOutcome, ProxyError> {
    let batch = req.batch(req.sql, false, &req.params.result_formats);
    let batches: Vec<_> = targets.iter().map(|_| Some(batch.clone())).collect();
    let mut merge = merge::CopyOut {
        started: false,
        rows: 0,
    };
    let g = gather(ex, targets, &batches, &mut merge, output, memory).await?;
    if merge.started {
        output.out.extend_from_slice(&[b'c', 0, 0, 0, 4]);
    }
    let tag = sum_tags(&g.tags);
    let rows = tag_count(&tag).1.unwrap_or(merge.rows);
    synth::command_complete(output.out, &tag);
    Ok(FanoutOutcome {
        statuses: g.statuses,
        wrote: vec![false; targets.len()],
        rows,
        tag,
    })
}

/// A command tag split into its words and trailing row count.
pub fn tag_count(tag: &str) -> (&str, Option<u64>) {
    match tag.rsplit_once(' ') {
        Some((head, n)) => match n.parse::<u64>() {
            Ok(n) => (head, Some(n)),
            Err(_) => (tag, None),
        },
        None => (tag, None),
    }
}

/// Whether a command tag means the statement may have changed data.
fn tag_wrote(tag: &str) -> bool {
    match tag_count(tag) {
        ("SELECT", _) => false,
        (_, Some(n)) => n > 0,
        _ => true,
    }
}

/// Combines one statement's tags from several shards: counts summed.
pub fn sum_tags(tags: &[Vec<String>]) -> String {
    let lasts: Vec<&String> = tags.iter().filter_map(|t| t.last()).collect();
    let Some(first) = lasts.first() else {
        return String::new();
    };
    let (head, _) = tag_count(first);
    let mut total = 0u64;
    for t in &lasts {
        match tag_count(t) {
            (h, Some(n)) if h == head => total += n,
            _ => return (*first).clone(),
        }
    }
    format!("{head} {total}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_summed() {
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(sum_tags(&[t(&["UPDATE 2"]), t(&["UPDATE 3"])]), "UPDATE 5");
        assert_eq!(
            sum_tags(&[t(&["INSERT 0 2"]), t(&["INSERT 0 1"])]),
            "INSERT 0 3"
        );
        assert_eq!(
            sum_tags(&[t(&["CREATE TABLE"]), t(&["CREATE TABLE"])]),
            "CREATE TABLE"
        );
        assert!(!tag_wrote("SELECT 3"));
        assert!(!tag_wrote("UPDATE 0"));
        assert!(tag_wrote("DELETE 1"));
        assert!(tag_wrote("CREATE INDEX"));
    }
}
