//! Placement epochs: every shard records, in `shardgate.placements`, how each
//! table of the map is placed (function and its parameters, the ordered
//! shard names, key column and type), with a version, when and by whom.
//!
//! Why: rows stay where the placement they were written under put them. A
//! map edited afterwards (another function, a shard added, removed or moved,
//! a bound moved) would route key lookups to the wrong shard and let a
//! duplicate key be inserted on another one, silently. So the proxy compares
//! its map with the records whenever it loads the map or the catalog
//! ([`sync`]) and *fences* every table whose placement differs: statements
//! naming it are refused with [`SQLSTATE`] (see [`crate::router::ShardMap`]'s
//! `fenced`), while other tables keep working. The comparison happens at
//! load time, never per statement.
//!
//! A recorded placement changes only by [`accept`] (`shardgate placement
//! accept`, for an operator who moved rows by hand) or by the data-movement
//! command at its cutover; tables without a record get one the first time a
//! proxy sees them exist on the shards. Writes to several shards are one
//! two-phase-commit group in the `shardgate_tx_` family (decision row in
//! `shardgate.tx_decisions` on the first shard), so the proxy's 2PC
//! recovery resolves a group interrupted by a crash.

pub mod cli;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use futures::future::join_all;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use crate::backend::{connect_control, TWO_PHASE_APPLICATION};
use crate::config::{Config, FunctionKind, ShardConfig, TablePlacement, TenantMode};
use crate::executor::recovery;
use crate::executor::rollback::{roll_back_clients, Pending};
use crate::executor::twophase::{gid, GID_PREFIX};
use crate::sharding::KeyType;

/// SQLSTATE of a statement refused because its table's placement differs
/// from the recorded one (object_not_in_prerequisite_state).
pub const SQLSTATE: &str = "55000";

/// SQLSTATE while no shard's records could be read yet (connection_failure:
/// the cause is unreachable shards, and clients retry 08xxx).
pub const UNCHECKED_SQLSTATE: &str = "08006";

/// Why statements naming a table are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub sqlstate: &'static str,
    pub message: String,
}

/// The fence of every map table before any shard's records were read: the
/// proxy must not route by a placement it has not compared.
pub fn unchecked(config: &Config) -> HashMap<String, Fence> {
    config
        .tables
        .iter()
        .map(|t| {
            let name = t.name.to_lowercase();
            let message = format!(
                "table \"{name}\" is not routed yet: the placements recorded on the shards \
                 (shardgate.placements) could not be read, no shard answered; shardgate retries \
                 every second"
            );
            (
                name,
                Fence {
                    sqlstate: UNCHECKED_SQLSTATE,
                    message,
                },
            )
        })
        .collect()
}

/// Creates the placement table; the advisory lock serialises concurrent
/// creators, as for `shardgate.tx_decisions`.
const TABLE_SQL: &str = "
BEGIN;
SET LOCAL synchronous_commit = on;
SELECT pg_advisory_xact_lock(7526752186389689717);
CREATE SCHEMA IF NOT EXISTS shardgate;
CREATE TABLE IF NOT EXISTS shardgate.placements (
    table_name text PRIMARY KEY,
    placement text NOT NULL CHECK (placement IN ('sharded', 'replicated')),
    function text NOT NULL,
    shards text[] NOT NULL,
    key_column text NOT NULL,
    key_type text,
    version bigint NOT NULL,
    set_at timestamptz NOT NULL DEFAULT now(),
    set_by text NOT NULL
);
COMMIT;
";

const READ_SQL: &str = "SELECT table_name, placement, function, shards, key_column, key_type, \
     version, to_char(set_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC', set_by \
     FROM shardgate.placements ORDER BY table_name";

const UPSERT_SQL: &str = "INSERT INTO shardgate.placements \
     (table_name, placement, function, shards, key_column, key_type, version, set_by) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
     ON CONFLICT (table_name) DO UPDATE SET placement = EXCLUDED.placement, \
     function = EXCLUDED.function, shards = EXCLUDED.shards, key_column = EXCLUDED.key_column, \
     key_type = EXCLUDED.key_type, version = EXCLUDED.version, set_at = now(), \
     set_by = EXCLUDED.set_by";

const INSERT_SQL: &str = "INSERT INTO shardgate.placements \
     (table_name, placement, function, shards, key_column, key_type, version, set_by, set_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, COALESCE(NULLIF($9, '')::timestamptz, now())) \
     ON CONFLICT (table_name) DO NOTHING";

#[derive(Debug, Clone, thiserror::Error)]
pub enum PlacementError {
    #[error("shard \"{shard}\": {doing}: {message}")]
    Shard {
        shard: String,
        doing: &'static str,
        message: String,
    },
    #[error("shard \"{shard}\": {doing}: no answer within {seconds} s")]
    Timeout {
        shard: String,
        doing: &'static str,
        seconds: u64,
    },
    #[error("table \"{0}\" is not in the shard map; only a table the map names can be accepted")]
    NotInMap(String),
    #[error("{0}")]
    Refused(String),
}

/// How one table is placed, in the canonical form that is recorded and
/// compared (the function's map name is left out: renaming it moves no row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub replicated: bool,
    /// Function kind and parameters, shards named (empty when replicated).
    pub function: String,
    /// The map's shard names, in order (the order is part of placement).
    pub shards: Vec<String>,
    pub key_column: String,
    /// The key column's type as the router hashes it; `None` when unknown.
    pub key_type: Option<String>,
}

impl Placement {
    /// Equal placements; an unknown key type on either side is not a difference.
    pub fn same_as(&self, other: &Placement) -> bool {
        self.replicated == other.replicated
            && self.function == other.function
            && self.shards == other.shards
            && self.key_column == other.key_column
            && match (&self.key_type, &other.key_type) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    /// Hash functions place a key by its type (the text '42' and the
    /// integer 42 land apart); the others fix the type themselves.
    fn needs_key_type(&self) -> bool {
        !self.replicated
            && (self.function.starts_with("hash ") || self.function.starts_with("consistent_hash "))
    }

    pub fn describe(&self) -> String {
        if self.replicated {
            return format!("replicated on [{}]", self.shards.join(", "));
        }
        let key_type = self
            .key_type
            .as_deref()
            .map(|t| format!(" ({t})"))
            .unwrap_or_default();
        format!(
            "sharded by {}{key_type} with {} over [{}]",
            self.key_column,
            self.function,
            self.shards.join(", ")
        )
    }
}

/// A placement as recorded on a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub table: String,
    pub placement: Placement,
    pub version: i64,
    /// `YYYY-MM-DD HH:MM:SS UTC`.
    pub set_at: String,
    pub set_by: String,
}

impl Record {
    /// The same placement epoch (when and by whom it was copied to a shard
    /// does not matter).
    fn same_epoch(&self, other: &Record) -> bool {
        self.placement == other.placement && self.version == other.version
    }

    fn describe(&self) -> String {
        format!(
            "version {} (set {} by {}): {}",
            self.version,
            self.set_at,
            self.set_by,
            self.placement.describe()
        )
    }
}

/// The placements the map describes, by lower-cased table name.
/// `key_types` are the catalog's (see [`crate::router::catalog`]).
pub fn expected(
    config: &Config,
    key_types: &HashMap<String, KeyType>,
) -> BTreeMap<String, Placement> {
    let shards: Vec<String> = config.shards.iter().map(|s| s.name.clone()).collect();
    let mut out = BTreeMap::new();
    for table in &config.tables {
        let name = table.name.to_lowercase();
        let placement = match &table.placement {
            TablePlacement::Replicated => Placement {
                replicated: true,
                function: String::new(),
                shards: shards.clone(),
                key_column: String::new(),
                key_type: None,
            },
            TablePlacement::Sharded { key, function } => Placement {
                replicated: false,
                function: config
                    .function(function)
                    .map(|f| describe_function(config, &f.kind))
                    .unwrap_or_else(|| format!("undefined function {function}")),
                shards: config
                    .function(function)
                    .and_then(|f| named_shards(config, &f.kind))
                    .unwrap_or_else(|| shards.clone()),
                key_column: key.to_lowercase(),
                key_type: key_types.get(&name).map(|t| t.name().to_string()),
            },
        };
        out.insert(name, placement);
    }
    out
}

/// For functions that name their shards (range, list, tenant): those
/// shards, sorted, since adding, removing or moving other shards in the
/// list moves none of their keys. `None` for functions over the whole
/// ordered list (hash, modulo, consistent_hash).
fn named_shards(config: &Config, kind: &FunctionKind) -> Option<Vec<String>> {
    let indexes: Vec<usize> = match kind {
        FunctionKind::Hash | FunctionKind::Modulo | FunctionKind::ConsistentHash { .. } => {
            return None
        }
        FunctionKind::Range { ranges, .. } => ranges.iter().map(|r| r.shard).collect(),
        FunctionKind::List {
            values, default, ..
        } => values.iter().map(|(_, s)| *s).chain(*default).collect(),
        FunctionKind::Tenant {
            tenants, default, ..
        } => tenants.iter().map(|(_, s)| *s).chain(*default).collect(),
    };
    let names: BTreeSet<String> = indexes
        .iter()
        .map(|i| {
            config
                .shards
                .get(*i)
                .map_or_else(|| format!("#{i}"), |s| s.name.clone())
        })
        .collect();
    Some(names.into_iter().collect())
}

/// The canonical text of a function: kind and every parameter that decides
/// where a key lands, shards by name.
pub fn describe_function(config: &Config, kind: &FunctionKind) -> String {
    let shard = |i: &usize| {
        config
            .shards
            .get(*i)
            .map_or_else(|| format!("#{i}"), |s| s.name.clone())
    };
    let n = config.shards.len();
    match kind {
        FunctionKind::Hash => format!("hash modulus {n}"),
        FunctionKind::Modulo => format!("modulo {n}"),
        FunctionKind::ConsistentHash { vnodes } => {
            format!("consistent_hash vnodes {vnodes}")
        }
        FunctionKind::Range { key_type, ranges } => {
            let parts: Vec<String> = ranges
                .iter()
                .map(|r| {
                    let from = r.from.as_ref().map_or("-inf".into(), |v| v.to_string());
                    let to = r.to.as_ref().map_or("+inf".into(), |v| v.to_string());
                    format!("[{from}, {to})->{}", shard(&r.shard))
                })
                .collect();
            format!("range {} {}", key_type.name(), parts.join(" "))
        }
        FunctionKind::List {
            key_type,
            values,
            default,
        } => {
            let mut parts: Vec<String> = values
                .iter()
                .map(|(v, s)| format!("{v}->{}", shard(s)))
                .collect();
            parts.sort();
            let default = default.as_ref().map_or("none".into(), shard);
            format!(
                "list {} {} default {default}",
                key_type.name(),
                parts.join(" ")
            )
        }
        FunctionKind::Tenant {
            mode,
            tenants,
            default,
            schema_template,
        } => {
            let mode = match mode {
                TenantMode::Database => "database".to_string(),
                TenantMode::Schema => format!("schema {schema_template}"),
            };
            let mut parts: Vec<String> = tenants
                .iter()
                .map(|(t, s)| format!("{t}->{}", shard(s)))
                .collect();
            parts.sort();
            let default = default.as_ref().map_or("none".into(), shard);
            format!("tenant {mode} {} default {default}", parts.join(" "))
        }
    }
}

/// What one shard holds: its records and which of the asked tables exist.
#[derive(Debug, Clone, Default)]
pub struct ShardFacts {
    pub records: HashMap<String, Record>,
    pub existing: HashSet<String>,
}

/// `"schema"."table"` or `"table"` for `to_regclass`.
fn regclass_text(name: &str) -> String {
    name.split('.')
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

fn shard_error<'a>(
    shard: &'a ShardConfig,
    doing: &'static str,
) -> impl Fn(tokio_postgres::Error) -> PlacementError + 'a {
    move |e| PlacementError::Shard {
        shard: shard.name.clone(),
        doing,
        message: recovery::describe(&e),
    }
}

async fn with_timeout<T>(
    shard: &ShardConfig,
    doing: &'static str,
    timeout: Duration,
    work: impl std::future::Future<Output = Result<T, PlacementError>>,
) -> Result<T, PlacementError> {
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(PlacementError::Timeout {
                shard: shard.name.clone(),
                doing,
                seconds: timeout.as_secs().max(1),
            })
        })
}

/// Reads one shard's records and which of `tables` exist there.
pub async fn read_shard(
    shard: &ShardConfig,
    tables: &[String],
    timeout: Duration,
) -> Result<ShardFacts, PlacementError> {
    let doing = "reading shardgate.placements";
    with_timeout(shard, doing, timeout * 2, async {
        let client = connect_control(shard, TWO_PHASE_APPLICATION, timeout)
            .await
            .map_err(shard_error(shard, doing))?;
        read_with(&client, shard, tables).await
    })
    .await
}

async fn read_with(
    client: &Client,
    shard: &ShardConfig,
    tables: &[String],
) -> Result<ShardFacts, PlacementError> {
    let doing = "reading shardgate.placements";
    let fail = shard_error(shard, doing);
    let mut facts = ShardFacts::default();
    let quoted: Vec<String> = tables.iter().map(|t| regclass_text(t)).collect();
    let rows = client
        .query(
            "SELECT i, to_regclass(t) IS NOT NULL FROM unnest($1::text[]) WITH ORDINALITY AS u(t, i)",
            &[&quoted],
        )
        .await
        .map_err(&fail)?;
    for row in rows {
        let i: i64 = row.try_get(0).map_err(&fail)?;
        let exists: bool = row.try_get(1).map_err(&fail)?;
        let table = usize::try_from(i - 1).ok().and_then(|i| tables.get(i));
        if let (true, Some(table)) = (exists, table) {
            facts.existing.insert(table.clone());
        }
    }
    let present: bool = client
        .query_one(
            "SELECT to_regclass('shardgate.placements') IS NOT NULL",
            &[],
        )
        .await
        .and_then(|r| r.try_get(0))
        .map_err(&fail)?;
    if !present {
        return Ok(facts);
    }
    for row in client.query(READ_SQL, &[]).await.map_err(&fail)? {
        let get = |i: usize| -> Result<String, PlacementError> { row.try_get(i).map_err(&fail) };
        let table = get(0)?;
        let record = Record {
            table: table.clone(),
            placement: Placement {
                replicated: get(1)? == "replicated",
                function: get(2)?,
                shards: row.try_get(3).map_err(&fail)?,
                key_column: get(4)?,
                key_type: row.try_get(5).map_err(&fail)?,
            },
            version: row.try_get(6).map_err(&fail)?,
            set_at: get(7)?,
            set_by: get(8)?,
        };
        facts.records.insert(table, record);
    }
    Ok(facts)
}

/// Reads every shard of `config` in parallel (one result per shard, in order).
pub async fn read_all(
    config: &Config,
    tables: &[String],
) -> Vec<Result<ShardFacts, PlacementError>> {
    let timeout = config.pool.connect_timeout;
    join_all(
        config
            .shards
            .iter()
            .map(|shard| read_shard(shard, tables, timeout)),
    )
    .await
}

/// What one shard says about one table.
#[derive(Debug, Clone)]
pub enum ShardView {
    Recorded { record: Record, table_exists: bool },
    NotRecorded { table_exists: bool },
    Unreachable(String),
}

/// The verdict for one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The map and every record agree (`version` of the records).
    Ok { version: i64 },
    /// No shard holds a record.
    NotRecorded,
    /// The map differs from what the shards hold.
    Differs,
    /// The shards hold different placements.
    Disagree,
}

/// Map vs shards for one table.
#[derive(Debug, Clone)]
pub struct TableReport {
    pub table: String,
    /// `None`: the map does not name the table (only recorded).
    pub expected: Option<Placement>,
    /// (shard name, view), in map order.
    pub shards: Vec<(String, ShardView)>,
    pub verdict: Verdict,
}

impl TableReport {
    /// The distinct records the shards hold.
    fn records(&self) -> Vec<&Record> {
        let mut out: Vec<&Record> = Vec::new();
        for (_, view) in &self.shards {
            if let ShardView::Recorded { record, .. } = view {
                if !out.iter().any(|r| r.same_epoch(record)) {
                    out.push(record);
                }
            }
        }
        out
    }

    /// True when the table exists on at least one shard.
    pub fn exists_somewhere(&self) -> bool {
        self.shards.iter().any(|(_, v)| {
            matches!(
                v,
                ShardView::Recorded {
                    table_exists: true,
                    ..
                } | ShardView::NotRecorded { table_exists: true }
            )
        })
    }

    /// Which shards hold `record`, comma-separated.
    fn holders(&self, record: &Record) -> String {
        self.shards
            .iter()
            .filter(
                |(_, v)| matches!(v, ShardView::Recorded { record: r, .. } if r.same_epoch(record)),
            )
            .map(|(s, _)| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The refusal clients get for a fenced table; `None` when it is routed.
    pub fn fence_message(&self) -> Option<String> {
        let holds: Vec<String> = self
            .records()
            .iter()
            .map(|r| format!("shard(s) {} hold {}", self.holders(r), r.describe()))
            .collect();
        let map_says = self
            .expected
            .as_ref()
            .map_or("does not name it".into(), Placement::describe);
        let t = &self.table;
        match self.verdict {
            Verdict::Ok { .. } | Verdict::NotRecorded => None,
            Verdict::Differs => Some(format!(
                "table \"{t}\" is not routed: the shard map's placement differs from the one \
                 recorded on the shards, so its rows may not be where the map would look. The map \
                 says: {map_says}; {}. Restore the map, or move the rows to the map's placement \
                 and run `shardgate placement accept --table {t} --config MAP` (see `shardgate \
                 check --config MAP --shards`)",
                holds.join("; ")
            )),
            Verdict::Disagree => Some(format!(
                "table \"{t}\" is not routed: the shards disagree about its placement: {}. The \
                 map says: {map_says}. Find where the rows are, then run `shardgate placement \
                 accept --table {t} --config MAP` (see `shardgate check --config MAP --shards`)",
                holds.join("; ")
            )),
        }
    }
}

/// Compares the map's placements with what each shard holds. Tables only
/// recorded (no longer in the map) are reported too.
pub fn assess(
    config: &Config,
    expected: &BTreeMap<String, Placement>,
    reads: &[Result<ShardFacts, PlacementError>],
) -> Vec<TableReport> {
    let mut names: BTreeSet<String> = expected.keys().cloned().collect();
    for facts in reads.iter().flatten() {
        names.extend(facts.records.keys().cloned());
    }
    let default_replicated = config.default_table == crate::config::DefaultTable::Replicated;
    let all_shards: Vec<String> = config.shards.iter().map(|s| s.name.clone()).collect();
    let mut out = Vec::with_capacity(names.len());
    for table in names {
        let shards: Vec<(String, ShardView)> = config
            .shards
            .iter()
            .zip(reads)
            .map(|(shard, read)| {
                let view = match read {
                    Err(e) => ShardView::Unreachable(e.to_string()),
                    Ok(facts) => {
                        let table_exists = facts.existing.contains(&table);
                        match facts.records.get(&table) {
                            Some(record) => ShardView::Recorded {
                                record: record.clone(),
                                table_exists,
                            },
                            None => ShardView::NotRecorded { table_exists },
                        }
                    }
                };
                (shard.name.clone(), view)
            })
            .collect();
        let mut report = TableReport {
            expected: expected.get(&table).cloned(),
            table,
            shards,
            verdict: Verdict::NotRecorded,
        };
        let records = report.records();
        let verdict = match records.as_slice() {
            [] => Verdict::NotRecorded,
            [one] => {
                // A table the map leaves out is routed as `default_table`
                // says: replicated on every shard, or refused anyway.
                let routed_as = report.expected.clone().or_else(|| {
                    default_replicated.then(|| Placement {
                        replicated: true,
                        function: String::new(),
                        shards: all_shards.clone(),
                        key_column: String::new(),
                        key_type: None,
                    })
                });
                match routed_as {
                    Some(map) if map.same_as(&one.placement) => Verdict::Ok {
                        version: one.version,
                    },
                    Some(_) => Verdict::Differs,
                    None => Verdict::Ok {
                        version: one.version,
                    },
                }
            }
            _ => Verdict::Disagree,
        };
        report.verdict = verdict;
        out.push(report);
    }
    out
}

/// The fenced tables of a set of reports.
pub fn fence(reports: &[TableReport]) -> HashMap<String, Fence> {
    reports
        .iter()
        .filter_map(|r| {
            let message = r.fence_message()?;
            Some((
                r.table.clone(),
                Fence {
                    sqlstate: SQLSTATE,
                    message,
                },
            ))
        })
        .collect()
}

/// Who is acting, for `set_by`: what, OS user and host.
pub fn actor(what: &str) -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{what} ({user}@{host})")
}

async fn placements_exist(client: &Client) -> Result<bool, tokio_postgres::Error> {
    client
        .query_one(
            "SELECT to_regclass('shardgate.placements') IS NOT NULL",
            &[],
        )
        .await?
        .try_get(0)
}

/// Creates `shardgate.placements` if it is missing.
async fn ensure_table(client: &Client) -> Result<(), tokio_postgres::Error> {
    if placements_exist(client).await? {
        return Ok(());
    }
    if client.batch_execute(TABLE_SQL).await.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
        // The migrator and 2PC recovery create schema `shardgate` under
        // other locks; a collision is resolved by trying once more.
        if placements_exist(client).await? {
            return Ok(());
        }
        client.batch_execute(TABLE_SQL).await?;
    }
    Ok(())
}

/// How a write treats an existing record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// First record: a shard that already has one keeps it (a concurrent
    /// proxy won; the re-read after the write shows it).
    IfAbsent,
    /// `placement accept`: overwrite.
    Replace,
}

/// Writes `records` on every shard of `config` as one atomic group
/// (two-phase commit when there are several shards).
pub async fn write_group(
    config: &Config,
    records: &[Record],
    mode: WriteMode,
) -> Result<(), PlacementError> {
    let timeout = config.pool.connect_timeout;
    // Shards sharing one database share its records: writing them twice in
    // one group would wait on its own uncommitted row.
    let mut shards: Vec<&ShardConfig> = Vec::with_capacity(config.shards.len());
    for shard in &config.shards {
        if !shards.iter().any(|s| {
            (s.host.as_str(), s.port, s.database.as_str())
                == (shard.host.as_str(), shard.port, shard.database.as_str())
        }) {
            shards.push(shard);
        }
    }
    let shards = &shards;
    let connected = join_all(shards.iter().map(|&shard| async move {
        let doing = "preparing shardgate.placements";
        with_timeout(shard, doing, timeout * 4, async {
            let fail = shard_error(shard, doing);
            let client = connect_control(shard, TWO_PHASE_APPLICATION, timeout)
                .await
                .map_err(&fail)?;
            ensure_table(&client).await.map_err(&fail)?;
            recovery::ensure_table(&client).await.map_err(&fail)?;
            Ok(client)
        })
        .await
    }))
    .await;
    let clients: Vec<Client> = connected.into_iter().collect::<Result<_, _>>()?;
    let (Some(first), Some(first_shard)) = (clients.first(), shards.first()) else {
        return Err(PlacementError::Refused(
            "the shard map has no shards".into(),
        ));
    };
    let group = format!("{GID_PREFIX}{:016x}_0", rand::random::<u64>());
    let coordinator = first_shard.name.clone();
    let gids: Vec<String> = (0..shards.len())
        .map(|i| gid(&group, i, &coordinator))
        .collect();
    let sql = match mode {
        WriteMode::IfAbsent => INSERT_SQL,
        WriteMode::Replace => UPSERT_SQL,
    };
    // 1. Every shard writes in an open transaction; the first one also
    //    inserts the decision row (its lease, see executor::recovery).
    let step = STEP_TIMEOUT;
    let written = join_all(
        clients
            .iter()
            .zip(shards)
            .enumerate()
            .map(|(i, (client, shard))| {
                let group = &group;
                async move {
                    let doing = "writing shardgate.placements";
                    with_timeout(shard, doing, step, async {
                        let fail = shard_error(shard, doing);
                        client
                            .batch_execute("BEGIN; SET LOCAL synchronous_commit = on")
                            .await
                            .map_err(&fail)?;
                        for r in records {
                            let kind = if r.placement.replicated {
                                "replicated"
                            } else {
                                "sharded"
                            };
                            let params: [&(dyn ToSql + Sync); 9] = [
                                &r.table,
                                &kind,
                                &r.placement.function,
                                &r.placement.shards,
                                &r.placement.key_column,
                                &r.placement.key_type,
                                &r.version,
                                &r.set_by,
                                &r.set_at,
                            ];
                            // Replace stamps `now()`; a first record or a
                            // copy keeps the `set_at` it was given, if any.
                            let used = match mode {
                                WriteMode::IfAbsent => &params[..],
                                WriteMode::Replace => &params[..8],
                            };
                            client.execute(sql, used).await.map_err(&fail)?;
                        }
                        if i == 0 && shards.len() > 1 {
                            client
                                .execute(
                                    "INSERT INTO shardgate.tx_decisions (gid_prefix) VALUES ($1)",
                                    &[group],
                                )
                                .await
                                .map_err(&fail)?;
                        }
                        Ok(())
                    })
                    .await
                }
            }),
    )
    .await;
    if let Some(error) = written.into_iter().find_map(Result::err) {
        rollback_all(&clients, &[]).await;
        return Err(error);
    }
    if shards.len() == 1 {
        return first
            .batch_execute("COMMIT")
            .await
            .map_err(shard_error(first_shard, "committing shardgate.placements"));
    }
    // 2. PREPARE the others.
    let prepared = join_all(clients.iter().zip(shards).zip(&gids).skip(1).map(
        |((client, shard), gid)| async move {
            client
                .batch_execute(&format!("PREPARE TRANSACTION '{gid}'"))
                .await
                .map_err(shard_error(shard, "PREPARE TRANSACTION"))
        },
    ))
    .await;
    let prepared_ok: Vec<usize> = prepared
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_ok())
        .map(|(i, _)| i + 1)
        .collect();
    if let Some(error) = prepared.into_iter().find_map(Result::err) {
        rollback_all(
            &clients,
            &prepared_ok
                .iter()
                .map(|&i| (i, gids[i].clone()))
                .collect::<Vec<_>>(),
        )
        .await;
        return Err(error);
    }
    // 3. The coordinator's COMMIT is the decision.
    first
        .batch_execute("COMMIT")
        .await
        .map_err(|e| PlacementError::Shard {
            shard: coordinator.clone(),
            doing: "committing the decision (the prepared parts are resolved by 2PC recovery)",
            message: recovery::describe(&e),
        })?;
    // 4. COMMIT PREPARED the others; a failure is left to recovery.
    let finished = join_all(
        clients
            .iter()
            .zip(&gids)
            .skip(1)
            .map(|(client, gid)| async move {
                client
                    .batch_execute(&format!("COMMIT PREPARED '{gid}'"))
                    .await
            }),
    )
    .await;
    if finished.iter().all(Result::is_ok) {
        let _ = first
            .execute(
                "DELETE FROM shardgate.tx_decisions WHERE gid_prefix = $1",
                &[&group],
            )
            .await;
    } else {
        tracing::warn!(
            group,
            "placement write committed; some COMMIT PREPARED failed and are left to 2PC recovery"
        );
    }
    Ok(())
}

/// Bound on one step of a placement write.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Rolls the group back, best effort (failures are ignored).
async fn rollback_all(clients: &[Client], prepared: &[(usize, String)]) {
    roll_back_clients(clients.iter().enumerate().map(|(i, client)| {
        let pending = match prepared.iter().find(|(p, _)| *p == i) {
            Some((_, gid)) => Pending::Prepared(gid),
            None => Pending::Open,
        };
        (client, pending)
    }))
    .await;
}

/// The proxy's check, at startup and every catalog read: reads every
/// shard, records the placement of tables that exist but have no record
/// (one atomic group, logged), and returns the fenced tables. `None` when
/// no shard could be read (the caller keeps what it had).
pub async fn sync(
    config: &Config,
    key_types: &HashMap<String, KeyType>,
) -> Option<HashMap<String, Fence>> {
    let expected = expected(config, key_types);
    let tables: Vec<String> = expected.keys().cloned().collect();
    let reads = read_all(config, &tables).await;
    if reads.iter().all(Result::is_err) {
        for error in reads.iter().filter_map(|r| r.as_ref().err()) {
            tracing::warn!(%error, "placement check: cannot read the recorded placements");
        }
        return None;
    }
    let mut reports = assess(config, &expected, &reads);
    let all_read = reads.iter().all(Result::is_ok);
    let to_record = missing_records(&reports, &expected);
    if !to_record.is_empty() && all_read {
        match write_group(config, &to_record, WriteMode::IfAbsent).await {
            Ok(()) => {
                for r in &to_record {
                    tracing::info!(
                        table = %r.table,
                        version = r.version,
                        "placement recorded on every shard: {}",
                        r.placement.describe()
                    );
                }
                // Re-read: a concurrent proxy may have recorded another one.
                let reads = read_all(config, &tables).await;
                reports = assess(config, &expected, &reads);
            }
            Err(error) => tracing::warn!(%error, "recording table placements failed"),
        }
    }
    for error in reads.iter().filter_map(|r| r.as_ref().err()) {
        tracing::warn!(%error, "placement check: a shard could not be read");
    }
    Some(fence(&reports))
}

/// Records to write: tables that exist on a shard and have no record
/// anywhere (the map's placement, version 1), and agreed records missing on
/// some shard (copied there).
fn missing_records(reports: &[TableReport], expected: &BTreeMap<String, Placement>) -> Vec<Record> {
    let mut out = Vec::new();
    let set_by = actor("shardgate serve, first record");
    for report in reports {
        match report.verdict {
            Verdict::NotRecorded if report.exists_somewhere() => {
                if let Some(placement) = expected.get(&report.table) {
                    // Hash placement depends on the key type: wait until it is known.
                    if placement.key_type.is_none() && placement.needs_key_type() {
                        continue;
                    }
                    out.push(Record {
                        table: report.table.clone(),
                        placement: placement.clone(),
                        version: 1,
                        set_at: String::new(),
                        set_by: set_by.clone(),
                    });
                }
            }
            Verdict::Ok { .. } => {
                let lacking = report
                    .shards
                    .iter()
                    .any(|(_, v)| matches!(v, ShardView::NotRecorded { .. }));
                if let (true, Some(record)) = (lacking, report.records().first()) {
                    out.push((*record).clone());
                }
            }
            _ => {}
        }
    }
    out
}

/// What `placement accept` overwrote and wrote.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub written: Record,
    /// (shard, the record it held before), `None` where it had none.
    pub overwritten: Vec<(String, Option<Record>)>,
}

/// Records the map's placement of `table` on every shard (version = the
/// highest recorded + 1), atomically. For an operator who moved the rows.
pub async fn accept(
    config: &Config,
    key_types: &HashMap<String, KeyType>,
    table: &str,
    set_by: &str,
) -> Result<Accepted, PlacementError> {
    let table = table.to_lowercase();
    let expected = expected(config, key_types);
    let placement = expected
        .get(&table)
        .cloned()
        .ok_or_else(|| PlacementError::NotInMap(table.clone()))?;
    let tables: Vec<String> = expected.keys().cloned().collect();
    let reads = read_all(config, &tables).await;
    let mut overwritten = Vec::new();
    let mut version = 0;
    for (shard, read) in config.shards.iter().zip(reads) {
        let facts = read?;
        let old = facts.records.get(&table).cloned();
        if let Some(old) = &old {
            version = version.max(old.version);
        }
        overwritten.push((shard.name.clone(), old));
    }
    if placement.key_type.is_none() && placement.needs_key_type() {
        return Err(PlacementError::Refused(format!(
            "the type of key column \"{}\" of table \"{table}\" could not be read from the \
             catalog (does the table exist on the shards?); its placement depends on it",
            placement.key_column
        )));
    }
    let written = Record {
        table: table.clone(),
        placement,
        version: version + 1,
        set_at: String::new(),
        set_by: set_by.to_string(),
    };
    write_group(config, std::slice::from_ref(&written), WriteMode::Replace).await?;
    Ok(Accepted {
        written,
        overwritten,
    })
}

/// One line per table for `shardgate check --shards`; true when every
/// table is routed (ok or not recorded yet).
pub fn render(reports: &[TableReport], out: &mut String) -> bool {
    let mut all_ok = true;
    let _ = writeln!(out, "placements (map vs recorded on the shards):");
    for report in reports {
        let status = match &report.verdict {
            Verdict::Ok { version } => format!("ok (version {version})"),
            Verdict::NotRecorded => "not recorded".to_string(),
            Verdict::Differs => {
                all_ok = false;
                "DIFFERS (not routed)".to_string()
            }
            Verdict::Disagree => {
                all_ok = false;
                "SHARDS DISAGREE (not routed)".to_string()
            }
        };
        let _ = writeln!(out, "  {:<16} {status}", report.table);
        let map = report
            .expected
            .as_ref()
            .map_or("(not in the map)".into(), Placement::describe);
        let _ = writeln!(out, "    map: {map}");
        for (shard, view) in &report.shards {
            let line = match view {
                ShardView::Recorded {
                    record,
                    table_exists,
                } => format!(
                    "{}{}",
                    record.describe(),
                    if *table_exists {
                        ""
                    } else {
                        "; table missing on this shard"
                    }
                ),
                ShardView::NotRecorded { table_exists } => format!(
                    "not recorded{}",
                    if *table_exists {
                        ""
                    } else {
                        "; table missing on this shard"
                    }
                ),
                ShardView::Unreachable(e) => format!("unreachable: {e}"),
            };
            let _ = writeln!(out, "    {shard}: {line}");
        }
    }
    all_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        let map = format!(
            "listen: 127.0.0.1:0\nauth: trust\nusers: [ {{ name: app }} ]\nshards:\n  - {{ name: s0, url: \"postgres://u@h:1/d\" }}\n  - {{ name: s1, url: \"postgres://u@h:2/d\" }}\n{text}"
        );
        match Config::parse(std::path::Path::new("m.yaml"), &map, &|_| None) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn placement_texts_name_every_parameter() {
        let c = config(
            "functions:\n  f: { kind: range, ranges: [ { to: 100, shard: s0 }, { from: 100, shard: s1 } ] }\n  h: { kind: hash }\ntables:\n  a: { key: id, function: f }\n  b: { key: k, function: h }\n  c: { replicated: true }\n",
        );
        let mut types = HashMap::new();
        types.insert("b".to_string(), KeyType::Int);
        let e = expected(&c, &types);
        assert_eq!(
            e["a"].describe(),
            "sharded by id with range int [-inf, 100)->s0 [100, +inf)->s1 over [s0, s1]"
        );
        assert_eq!(
            e["b"].describe(),
            "sharded by k (integer) with hash modulus 2 over [s0, s1]"
        );
        assert_eq!(e["c"].describe(), "replicated on [s0, s1]");
    }

    #[test]
    fn placement_differs_and_disagree_are_fenced() {
        let c = config(
            "functions:\n  h: { kind: hash }\ntables:\n  a: { key: id, function: h }\n  b: { key: id, function: h }\n",
        );
        let e = expected(&c, &HashMap::new());
        let record = |table: &str, function: &str, version| Record {
            table: table.into(),
            placement: Placement {
                function: function.into(),
                ..e[table].clone()
            },
            version,
            set_at: "now".into(),
            set_by: "test".into(),
        };
        let shard = |records: Vec<Record>| -> Result<ShardFacts, PlacementError> {
            Ok(ShardFacts {
                records: records.into_iter().map(|r| (r.table.clone(), r)).collect(),
                existing: ["a".to_string(), "b".to_string()].into(),
            })
        };
        let reads = vec![
            shard(vec![
                record("a", "modulo 2", 1),
                record("b", "hash modulus 2", 1),
            ]),
            shard(vec![
                record("a", "modulo 2", 1),
                record("b", "hash modulus 2", 2),
            ]),
        ];
        let reports = assess(&c, &e, &reads);
        assert_eq!(reports[0].verdict, Verdict::Differs);
        assert_eq!(reports[1].verdict, Verdict::Disagree);
        let fenced = fence(&reports);
        assert_eq!(fenced["a"].sqlstate, "55000");
        let a = &fenced["a"].message;
        assert!(
            a.contains("The map says: sharded by id with hash modulus 2"),
            "{a}"
        );
        assert!(a.contains("shard(s) s0, s1 hold version 1"), "{a}");
        assert!(fenced["b"].message.contains("disagree"));
    }
}
