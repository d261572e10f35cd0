//! Statement analysis with sqlparser: what kind of statement, which tables,
//! and which predicates constrain the sharding key. The result ([`Analysis`])
//! does not depend on bound parameters, so it is cached by SQL text and only
//! [`Analysis::route`] runs per execution.
//!
//! Soundness rule: a predicate narrows the route only when every row the
//! statement can produce or change must satisfy it (a conjunct of a WHERE or
//! inner-join ON in a scope whose rows are required). Anything the walker does
//! not understand widens the route to all shards; nothing narrows it by guess.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Bound, ControlFlow};

use sqlparser::ast::{
    self, BinaryOperator, CopySource, Expr, FromTable, Ident, InTarget, JoinConstraint,
    JoinOperator, ObjectName, OnConflictAction, OnInsert, Query, Select, SelectItem, SetExpr,
    SetOperator, Statement, TableFactor, TableObject, TableWithJoins, UnaryOperator,
    UpdateTableFromKind, Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

use super::route::{Param, ParamFormat, Route, RouteError};
use super::shardmap::{MapFunction, ShardMap, TableRule};
use crate::config::DefaultTable;
use crate::sharding::{oid, KeyType, KeyValue};

/// Version tables of migration tools (Alembic, Rails/ActiveRecord, Flyway,
/// Django, goose, Knex, Liquibase, EF Core): replicated even when the map
/// does not name them, so every shard records the same schema version and
/// the tools' `rowcount == 1` checks hold.
pub const MIGRATION_VERSION_TABLES: &[&str] = &[
    "alembic_version",
    "schema_migrations",
    "flyway_schema_history",
    "schema_version",
    "django_migrations",
    "goose_db_version",
    "knex_migrations",
    "knex_migrations_lock",
    "databasechangelog",
    "databasechangeloglock",
    "__efmigrationshistory",
];

/// What a statement does, as far as routing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementKind {
    Read,
    Write,
    Ddl,
    Transaction,
    Set,
    Utility,
}

impl StatementKind {
    pub fn name(self) -> &'static str {
        match self {
            StatementKind::Read => "read",
            StatementKind::Write => "write",
            StatementKind::Ddl => "DDL",
            StatementKind::Transaction => "transaction control",
            StatementKind::Set => "SET",
            StatementKind::Utility => "utility",
        }
    }
}

/// How a referenced table is placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    Sharded {
        key: String,
        function: usize,
    },
    Replicated,
    /// Not in the map; `default_table: replicated` (or a system catalog).
    DefaultReplicated,
}

/// A table the statement references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableUse {
    /// The name as written (normalised: unquoted identifiers lower-cased).
    pub name: String,
    pub alias: Option<String>,
    pub placement: Placement,
}

/// A value compared with the sharding key, before parameters are bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueExpr {
    /// A literal whose type is certain: an integer, or a cast / typed literal.
    Known(KeyValue),
    /// A quoted literal: its type is the column's, which the router may not know.
    Untyped(String),
    /// `$n` (0-based index), with the type OID of a cast if it had one.
    Param {
        index: usize,
        cast: Option<u32>,
    },
    Null,
}

/// The key column a predicate constrains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLeaf {
    /// `table.column` for explanations.
    pub column: String,
    /// The table's name in the map (for its key type).
    pub table: String,
    pub function: usize,
    /// The key column's type as the map knew it at analysis time (the
    /// analysis cache is cleared whenever the catalog teaches new types), or
    /// the type the function fixes.
    pub kind: Option<KeyType>,
}

/// A constraint on the shards a statement needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// No sharded table here: any shard can answer this part.
    Free,
    /// Every shard (no usable key predicate).
    All,
    /// The key equals one of the values.
    In {
        leaf: KeyLeaf,
        values: Vec<ValueExpr>,
    },
    /// `key = ANY($n)`: unknown until the array is decoded (treated as all shards).
    ParamArray {
        leaf: KeyLeaf,
        index: usize,
    },
    /// A range predicate on a range-sharded key.
    Range {
        leaf: KeyLeaf,
        lower: Bound<ValueExpr>,
        upper: Bound<ValueExpr>,
    },
    And(Vec<Cond>),
    Or(Vec<Cond>),
}

fn and(a: Cond, b: Cond) -> Cond {
    match (a, b) {
        (Cond::Free, x) | (x, Cond::Free) => x,
        (Cond::All, x) | (x, Cond::All) => x,
        (Cond::And(mut v), Cond::And(w)) => {
            v.extend(w);
            Cond::And(v)
        }
        (Cond::And(mut v), x) | (x, Cond::And(mut v)) => {
            v.push(x);
            Cond::And(v)
        }
        (x, y) => Cond::And(vec![x, y]),
    }
}

fn or(a: Cond, b: Cond) -> Cond {
    match (a, b) {
        (Cond::Free, x) | (x, Cond::Free) => x,
        (Cond::All, _) | (_, Cond::All) => Cond::All,
        (Cond::Or(mut v), Cond::Or(w)) => {
            v.extend(w);
            Cond::Or(v)
        }
        (Cond::Or(mut v), x) | (x, Cond::Or(mut v)) => {
            v.push(x);
            Cond::Or(v)
        }
        (x, y) => Cond::Or(vec![x, y]),
    }
}

/// A part whose rows are not required (outer-joined side, EXCEPT's right)
/// cannot narrow the route; it still needs every shard if it is sharded.
fn weaken(c: Cond) -> Cond {
    match c {
        Cond::Free => Cond::Free,
        _ => Cond::All,
    }
}

/// The parameter-independent routing plan of one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Fixed(Route),
    Sharded {
        function: usize,
        cond: Cond,
        /// `UPDATE … SET key = v`: allowed only if `v` maps to the routed shard.
        key_update: Option<(KeyLeaf, ValueExpr)>,
    },
    Insert {
        function: usize,
        leaf: KeyLeaf,
        rows: Vec<ValueExpr>,
    },
    /// Several statements in one simple query.
    Multi(Vec<Plan>),
}

/// The result of analysing one SQL text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    pub kind: StatementKind,
    pub tables: Vec<TableUse>,
    pub plan: Plan,
    /// True when sqlparser could not parse it and the tokenizer classified it.
    pub by_tokenizer: bool,
}

impl Analysis {
    /// The sharding function the statement routes by, if any.
    pub fn function(&self) -> Option<usize> {
        fn of(p: &Plan) -> Option<usize> {
            match p {
                Plan::Sharded { function, .. } | Plan::Insert { function, .. } => Some(*function),
                Plan::Multi(v) => v.iter().find_map(of),
                Plan::Fixed(_) => None,
            }
        }
        of(&self.plan)
    }

    /// The sharded table the statement routes by (for its key type), if any.
    pub fn key_table(&self) -> Option<&str> {
        self.tables.iter().find_map(|t| match t.placement {
            Placement::Sharded { .. } => Some(t.name.as_str()),
            _ => None,
        })
    }

    /// The route for this statement with `params` bound.
    pub fn route(&self, map: &ShardMap, params: &[Param]) -> Result<Route, RouteError> {
        plan_route(&self.plan, map, params)
    }
}

fn plan_route(plan: &Plan, map: &ShardMap, params: &[Param]) -> Result<Route, RouteError> {
    match plan {
        Plan::Fixed(r) => Ok(r.clone()),
        Plan::Sharded {
            function,
            cond,
            key_update,
        } => {
            let f = function_of(map, *function)?;
            let route = match cond {
                // The common case, `key = v`: no set to build.
                Cond::In { leaf, values } if values.len() == 1 => {
                    let f = function_of(map, leaf.function)?;
                    match shard_of(map, f, leaf, &values[0], params)? {
                        Some(shard) => Route::Single(shard),
                        None => Route::AnyOne,
                    }
                }
                _ => match eval(cond, map, params)? {
                    None => Route::All,
                    Some(set) => Route::from_set(set),
                },
            };
            if let Some((leaf, value)) = key_update {
                let new = shard_of(map, f, leaf, value, params)?;
                let Some(new) = new else {
                    return Err(RouteError::InvalidKey(format!(
                        "UPDATE sets the sharding key {} to NULL",
                        leaf.column
                    )));
                };
                if route != Route::Single(new) && route != Route::AnyOne {
                    return Err(RouteError::Unsupported(format!(
                        "UPDATE changes the sharding key {} to a value that belongs on shard {}, \
                         but the rows it updates {}: rows cannot move between shards; \
                         delete and re-insert them instead",
                        leaf.column,
                        map.shard_names.get(new).map_or("?", String::as_str),
                        match &route {
                            Route::Single(s) => format!(
                                "are on shard {}",
                                map.shard_names.get(*s).map_or("?", String::as_str)
                            ),
                            _ => "may be on any shard".to_string(),
                        }
                    )));
                }
            }
            Ok(route)
        }
        Plan::Insert {
            function,
            leaf,
            rows,
        } => {
            let f = function_of(map, *function)?;
            let mut by_shard: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for (i, v) in rows.iter().enumerate() {
                match shard_of(map, f, leaf, v, params)? {
                    Some(s) => by_shard.entry(s).or_default().push(i),
                    None => {
                        return Err(RouteError::InvalidKey(format!(
                            "row {} of the INSERT has a NULL sharding key {}: it cannot be placed",
                            i + 1,
                            leaf.column
                        )))
                    }
                }
            }
            Ok(match by_shard.len() {
                0 => Route::AnyOne,
                1 => by_shard
                    .keys()
                    .next()
                    .map_or(Route::AnyOne, |s| Route::Single(*s)),
                _ => Route::Split {
                    rows_by_shard: by_shard,
                },
            })
        }
        Plan::Multi(plans) => {
            let mut routes = Vec::with_capacity(plans.len());
            for p in plans {
                routes.push(plan_route(p, map, params)?);
            }
            combine(routes)
        }
    }
}

/// One route for several statements sent together: session statements need no
/// shard, reads that can run anywhere follow the others, shard sets unite.
fn combine(routes: Vec<Route>) -> Result<Route, RouteError> {
    let mut out = Route::NoShard;
    for r in routes {
        out = match (out, r) {
            (Route::NoShard, x) | (x, Route::NoShard) => x,
            (Route::AnyOne, x) | (x, Route::AnyOne) => x,
            (Route::Broadcast, Route::Broadcast) => Route::Broadcast,
            (Route::All, Route::All | Route::Single(_) | Route::Shards(_))
            | (Route::Single(_) | Route::Shards(_), Route::All) => Route::All,
            (a @ (Route::Single(_) | Route::Shards(_)), b @ (Route::Single(_) | Route::Shards(_))) => {
                let mut set = shards_of(&a);
                set.extend(shards_of(&b));
                Route::from_set(set)
            }
            _ => {
                return Err(RouteError::Unsupported(
                    "these statements, sent in one query, need different kinds of routing \
                     (e.g. DDL with a keyed statement or a multi-shard INSERT); send them separately"
                        .into(),
                ))
            }
        };
    }
    Ok(out)
}

fn shards_of(r: &Route) -> BTreeSet<usize> {
    match r {
        Route::Single(s) => BTreeSet::from([*s]),
        Route::Shards(s) => s.clone(),
        _ => BTreeSet::new(),
    }
}

fn function_of(map: &ShardMap, f: usize) -> Result<&MapFunction, RouteError> {
    map.functions
        .get(f)
        .ok_or_else(|| RouteError::Unsupported(format!("sharding function #{f} does not exist")))
}

/// `None` = every shard; `Some(set)` = these shards.
fn eval(
    cond: &Cond,
    map: &ShardMap,
    params: &[Param],
) -> Result<Option<BTreeSet<usize>>, RouteError> {
    Ok(match cond {
        Cond::Free | Cond::All | Cond::ParamArray { .. } => None,
        Cond::In { leaf, values } => {
            let f = function_of(map, leaf.function)?;
            let mut set = BTreeSet::new();
            for v in values {
                if let Some(s) = shard_of(map, f, leaf, v, params)? {
                    set.insert(s);
                }
            }
            Some(set)
        }
        Cond::Range { leaf, lower, upper } => {
            let f = function_of(map, leaf.function)?;
            let conv = |b: &Bound<ValueExpr>| -> Result<Option<Bound<KeyValue>>, RouteError> {
                Ok(match b {
                    Bound::Unbounded => Some(Bound::Unbounded),
                    Bound::Included(v) => key_value(map, f, leaf, v, params)?.map(Bound::Included),
                    Bound::Excluded(v) => key_value(map, f, leaf, v, params)?.map(Bound::Excluded),
                })
            };
            match (conv(lower)?, conv(upper)?) {
                (Some(lo), Some(hi)) => Some(
                    f.function
                        .shards_for_interval(lo.as_ref(), hi.as_ref())
                        .into_iter()
                        .collect(),
                ),
                // A NULL bound matches no row.
                _ => Some(BTreeSet::new()),
            }
        }
        Cond::And(parts) => {
            let mut acc: Option<BTreeSet<usize>> = None;
            for p in parts {
                if let Some(s) = eval(p, map, params)? {
                    acc = Some(match acc {
                        None => s,
                        Some(a) => a.intersection(&s).copied().collect(),
                    });
                }
            }
            acc
        }
        Cond::Or(parts) => {
            let mut acc = BTreeSet::new();
            for p in parts {
                match eval(p, map, params)? {
                    None => return Ok(None),
                    Some(s) => acc.extend(s),
                }
            }
            Some(acc)
        }
    })
}

/// The key type to read a value as: the column's (from the catalog) or the one
/// the function fixes. `None` means only self-typed values can be routed.
fn leaf_type(map: &ShardMap, f: &MapFunction, leaf: &KeyLeaf) -> Option<KeyType> {
    leaf.kind
        .or_else(|| map.key_type(&leaf.table))
        .or_else(|| f.implied_key_type())
}

fn binary_oid(kind: KeyType, len: usize) -> u32 {
    match kind {
        KeyType::Int => match len {
            2 => oid::INT2,
            4 => oid::INT4,
            _ => oid::INT8,
        },
        KeyType::Text => oid::TEXT,
        KeyType::Uuid => oid::UUID,
        KeyType::Date => oid::DATE,
        KeyType::Timestamp => oid::TIMESTAMP,
    }
}

/// The typed key value of `v` (`None` for NULL).
fn key_value(
    map: &ShardMap,
    f: &MapFunction,
    leaf: &KeyLeaf,
    v: &ValueExpr,
    params: &[Param],
) -> Result<Option<KeyValue>, RouteError> {
    key_value_as(f, leaf, v, params, leaf_type(map, f, leaf))
}

/// [`key_value`] with the key's type already looked up (`kind`; the lookup
/// hashes the table name, so the hot path does it once per statement).
fn key_value_as(
    f: &MapFunction,
    leaf: &KeyLeaf,
    v: &ValueExpr,
    params: &[Param],
    kind: Option<KeyType>,
) -> Result<Option<KeyValue>, RouteError> {
    let bad = |e: crate::sharding::ShardingError| match e {
        crate::sharding::ShardingError::InvalidValue { .. } => {
            RouteError::BadKeyText(format!("sharding key {}: {e}", leaf.column))
        }
        _ => RouteError::InvalidKey(format!("sharding key {}: {e}", leaf.column)),
    };
    match v {
        ValueExpr::Null => Ok(None),
        ValueExpr::Known(k) => Ok(Some(k.clone())),
        ValueExpr::Untyped(s) => match kind {
            Some(kind) => KeyValue::parse_as(kind, s).map(Some).map_err(bad),
            None => Err(RouteError::TypeNeeded(format!(
                "the sharding key {} is compared with the quoted literal '{}', and {} placement \
                 depends on the key's type (the text '42' and the integer 42 go to different \
                 shards). Cast the literal (e.g. '{}'::bigint or ::uuid) or let the proxy learn \
                 the column type of table {} from the catalog",
                leaf.column,
                short(s),
                f.kind,
                short(s),
                leaf.table
            ))),
        },
        ValueExpr::Param { index, cast } => {
            let p = params
                .get(*index)
                .ok_or(RouteError::MissingParam(index + 1))?;
            let Some(bytes) = &p.value else {
                return Ok(None);
            };
            // The bytes are in the type the Parse declared (SQLAlchemy with
            // psycopg binds a small Python int as binary int2 and casts it
            // `$1::BIGINT` in the SQL): read them as that type, as Postgres
            // does before applying the cast; the cast types undeclared ones.
            let key_oid = |o: &u32| KeyType::from_oid(*o).is_ok();
            let declared = p.declared_oid().filter(key_oid).or(cast.filter(key_oid));
            let need_type = || {
                RouteError::TypeNeeded(format!(
                    "parameter ${} for the sharding key {} has no declared type and {} placement \
                     depends on the key's type; declare the parameter type (or cast: ${}::bigint) \
                     or let the proxy learn the column type of table {} from the catalog",
                    index + 1,
                    leaf.column,
                    f.kind,
                    index + 1,
                    leaf.table
                ))
            };
            match (p.format, declared, kind) {
                (ParamFormat::Text, Some(o), _) => {
                    KeyValue::from_text(o, bytes).map(Some).map_err(bad)
                }
                (ParamFormat::Text, None, Some(kind)) => {
                    let text = crate::protocol::messages::utf8(bytes).ok_or_else(|| {
                        RouteError::InvalidKey(format!(
                            "parameter ${} for the sharding key {} is not valid UTF-8",
                            index + 1,
                            leaf.column
                        ))
                    })?;
                    KeyValue::parse_as(kind, text).map(Some).map_err(bad)
                }
                (ParamFormat::Binary, Some(o), _) => {
                    KeyValue::from_binary(o, bytes).map(Some).map_err(bad)
                }
                (ParamFormat::Binary, None, Some(kind)) => {
                    KeyValue::from_binary(binary_oid(kind, bytes.len()), bytes)
                        .map(Some)
                        .map_err(bad)
                }
                (_, None, None) => Err(need_type()),
            }
        }
    }
}

fn short(s: &str) -> String {
    if s.chars().count() <= 40 {
        s.to_string()
    } else {
        let cut: String = s.chars().take(40).collect();
        format!("{cut}…")
    }
}

/// The shard of one key value (`None` for NULL: no row matches).
fn shard_of(
    map: &ShardMap,
    f: &MapFunction,
    leaf: &KeyLeaf,
    v: &ValueExpr,
    params: &[Param],
) -> Result<Option<usize>, RouteError> {
    let kind = leaf_type(map, f, leaf);
    let Some(key) = key_value_as(f, leaf, v, params, kind)? else {
        return Ok(None);
    };
    let placed = match kind {
        Some(kind) => f.function.shard_for_as(&key, kind),
        None => f.function.shard_for(&key),
    };
    placed
        .map(Some)
        .map_err(|e| RouteError::InvalidKey(format!("sharding key {}: {e}", leaf.column)))
}

// ---------------------------------------------------------------------------
// Parsing and the walk
// ---------------------------------------------------------------------------

/// Analyses `sql` against `map` (uncached; see [`super::Router`] for the cache).
pub fn analyze(map: &ShardMap, sql: &str) -> Result<Analysis, RouteError> {
    let dialect = PostgreSqlDialect {};
    let statements = match Parser::parse_sql(&dialect, sql) {
        Ok(s) => s,
        Err(parse_error) => match rewrite_for_parser(sql) {
            Some(rewritten) => match Parser::parse_sql(&dialect, &rewritten) {
                Ok(s) => s,
                Err(_) => return classify_by_tokens(sql, &parse_error.to_string()),
            },
            None => return classify_by_tokens(sql, &parse_error.to_string()),
        },
    };
    let mut analyses = Vec::with_capacity(statements.len());
    for stmt in &statements {
        super::uniqueness::check(map, stmt)?;
        analyses.push(super::volatile::check(
            map,
            stmt,
            analyze_statement(map, stmt)?,
        )?);
    }
    match analyses.len() {
        0 => Ok(Analysis {
            kind: StatementKind::Utility,
            tables: Vec::new(),
            plan: Plan::Fixed(Route::NoShard),
            by_tokenizer: false,
        }),
        1 => Ok(analyses.remove(0)),
        _ => {
            let kind = analyses
                .iter()
                .map(|a| a.kind)
                .find(|k| !matches!(k, StatementKind::Transaction | StatementKind::Set))
                .unwrap_or(StatementKind::Transaction);
            let mut tables = Vec::new();
            let mut plans = Vec::new();
            for a in analyses {
                tables.extend(a.tables);
                plans.push(a.plan);
            }
            Ok(Analysis {
                kind,
                tables,
                plan: Plan::Multi(plans),
                by_tokenizer: false,
            })
        }
    }
}

/// Postgres syntax sqlparser 0.64 rejects but that routes like something it
/// accepts: `FOR NO KEY UPDATE` / `FOR KEY SHARE` (row locks) and `TABLE t`.
/// Only used to analyse; the client's text is what gets forwarded.
fn rewrite_for_parser(sql: &str) -> Option<String> {
    if let Some(copy) = super::copy_grammar::for_parser(sql) {
        return Some(copy);
    }
    let lower = sql.to_ascii_lowercase();
    if lower.contains("for no key update") || lower.contains("for key share") {
        let mut out = String::with_capacity(sql.len());
        let mut rest = sql;
        loop {
            let l = rest.to_ascii_lowercase();
            let hit = [
                ("for no key update", "FOR UPDATE"),
                ("for key share", "FOR SHARE"),
            ]
            .iter()
            .filter_map(|(p, r)| l.find(p).map(|i| (i, p.len(), *r)))
            .min_by_key(|(i, _, _)| *i);
            match hit {
                Some((i, len, r)) => {
                    out.push_str(&rest[..i]);
                    out.push_str(r);
                    rest = &rest[i + len..];
                }
                None => {
                    out.push_str(rest);
                    break;
                }
            }
        }
        return Some(out);
    }
    let trimmed = sql.trim_start();
    if let (Some(head), Some(rest)) = (trimmed.get(..6), trimmed.get(6..)) {
        if head.eq_ignore_ascii_case("table ") {
            return Some(format!("SELECT * FROM {rest}"));
        }
    }
    None
}

/// Statements sqlparser cannot parse, classified by their leading keywords.
fn classify_by_tokens(sql: &str, parse_error: &str) -> Result<Analysis, RouteError> {
    let dialect = PostgreSqlDialect {};
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize()
        .map_err(|e| RouteError::Syntax(format!("cannot read the statement: {e}")))?;
    let words: Vec<String> = tokens
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .take(3)
        .map(|t| match t {
            Token::Word(w) => w.value.to_ascii_uppercase(),
            other => other.to_string(),
        })
        .collect();
    let first = words.first().map(String::as_str).unwrap_or("");
    let second = words.get(1).map(String::as_str).unwrap_or("");
    let fixed = |kind, route| {
        Ok(Analysis {
            kind,
            tables: Vec::new(),
            plan: Plan::Fixed(route),
            by_tokenizer: true,
        })
    };
    match (first, second) {
        ("PREPARE", "TRANSACTION") | ("COMMIT" | "ROLLBACK", "PREPARED") => {
            fixed(StatementKind::Transaction, Route::NoShard)
        }
        (
            "BEGIN" | "START" | "COMMIT" | "END" | "ROLLBACK" | "ABORT" | "SAVEPOINT" | "RELEASE",
            _,
        ) => fixed(StatementKind::Transaction, Route::NoShard),
        ("SET" | "RESET" | "DISCARD", _) => fixed(StatementKind::Set, Route::NoShard),
        (
            "VACUUM" | "ANALYZE" | "ANALYSE" | "DO" | "REINDEX" | "CLUSTER" | "CHECKPOINT" | "LOAD",
            _,
        ) => fixed(StatementKind::Utility, Route::Broadcast),
        (
            "COMMENT" | "CREATE" | "ALTER" | "DROP" | "GRANT" | "REVOKE" | "SECURITY" | "REFRESH",
            _,
        ) => fixed(StatementKind::Ddl, Route::Broadcast),
        ("SHOW", _) => fixed(StatementKind::Read, Route::AnyOne),
        // Cursor and prepared-statement verbs sqlparser does not read
        // (MOVE, FETCH/CLOSE forms): the session's current backend.
        ("MOVE" | "FETCH" | "CLOSE", _) => fixed(StatementKind::Read, Route::NoShard),
        ("DEALLOCATE", _) => fixed(StatementKind::Utility, Route::NoShard),
        ("", _) => fixed(StatementKind::Utility, Route::NoShard),
        (kind, _) => Err(RouteError::Syntax(format!(
            "cannot route this {kind} statement: the SQL parser rejected it ({parse_error}) and \
             it is not a utility statement that can run on every shard"
        ))),
    }
}

/// Lower-cases unquoted identifiers, as Postgres does.
pub(super) fn norm(id: &Ident) -> String {
    if id.quote_style.is_some() {
        id.value.clone()
    } else {
        id.value.to_lowercase()
    }
}

/// The map's entry for a table as the statement names it (`schema.table`
/// or bare), with the name the rule is registered under.
pub(super) fn lookup_table<'m>(
    map: &'m ShardMap,
    name: &ObjectName,
) -> Option<(&'m str, &'m TableRule)> {
    let mut parts = name_parts(name);
    let bare = parts.pop()?;
    map.lookup(parts.pop().as_deref(), &bare)
}

pub(super) fn name_parts(name: &ObjectName) -> Vec<String> {
    name.0
        .iter()
        .map(|p| p.as_ident().map_or_else(|| p.to_string(), norm))
        .collect()
}

struct Occ {
    /// Map name for tables; None for derived tables and CTE references.
    table: Option<String>,
    rule: Option<TableRule>,
    alias: Option<String>,
    bare: String,
    schema: Option<String>,
}

struct Scope {
    parent: Option<usize>,
    occs: Vec<usize>,
}

struct Walker<'m> {
    map: &'m ShardMap,
    occs: Vec<Occ>,
    scopes: Vec<Scope>,
    edges: Vec<(usize, usize)>,
    ctes: Vec<(String, Cond)>,
    all_cte_names: BTreeSet<String>,
    tables: Vec<TableUse>,
    data_modifying_cte: bool,
    locking: bool,
    /// The scope of the last SELECT walked (for `x IN (SELECT key …)`).
    last_select_scope: Option<usize>,
    /// Sharded occurrences not from INSERT targets (compared with a full visit).
    walked_sharded: usize,
}

impl<'m> Walker<'m> {
    fn new(map: &'m ShardMap) -> Self {
        Walker {
            map,
            occs: Vec::new(),
            scopes: Vec::new(),
            edges: Vec::new(),
            ctes: Vec::new(),
            all_cte_names: BTreeSet::new(),
            tables: Vec::new(),
            data_modifying_cte: false,
            locking: false,
            last_select_scope: None,
            walked_sharded: 0,
        }
    }

    fn new_scope(&mut self, parent: Option<usize>) -> usize {
        self.scopes.push(Scope {
            parent,
            occs: Vec::new(),
        });
        self.scopes.len() - 1
    }

    fn push_occ(&mut self, scope: usize, occ: Occ) -> usize {
        self.occs.push(occ);
        let i = self.occs.len() - 1;
        if let Some(s) = self.scopes.get_mut(scope) {
            s.occs.push(i);
        }
        i
    }

    /// Registers a table reference; returns its occurrence and its condition
    /// (All for sharded tables, Free for replicated ones, the body's for CTEs).
    fn add_table(
        &mut self,
        name: &ObjectName,
        alias: Option<&Ident>,
        scope: usize,
        counted: bool,
    ) -> Result<(usize, Cond), RouteError> {
        let parts = name_parts(name);
        let bare = parts.last().cloned().unwrap_or_default();
        let schema = if parts.len() >= 2 {
            parts.get(parts.len() - 2).cloned()
        } else {
            None
        };
        let alias = alias.map(norm);
        if parts.len() == 1 {
            if let Some((_, c)) = self.ctes.iter().rev().find(|(n, _)| *n == bare) {
                let c = c.clone();
                let o = self.push_occ(
                    scope,
                    Occ {
                        table: None,
                        rule: None,
                        alias,
                        bare,
                        schema: None,
                    },
                );
                return Ok((o, c));
            }
        }
        if let Some(fence) = self.map.fence(schema.as_deref(), &bare) {
            return Err(RouteError::Fenced {
                sqlstate: fence.sqlstate,
                message: fence.message.clone(),
            });
        }
        let found = self
            .map
            .lookup(schema.as_deref(), &bare)
            .map(|(k, r)| (k.to_string(), r.clone()));
        let display = parts.join(".");
        let (table, rule, placement) = match found {
            Some((k, rule)) => {
                let placement = match &rule {
                    TableRule::Sharded { key, function } => Placement::Sharded {
                        key: key.clone(),
                        function: *function,
                    },
                    TableRule::Replicated => Placement::Replicated,
                };
                (k, rule, placement)
            }
            None => {
                let system = matches!(schema.as_deref(), Some("pg_catalog" | "information_schema"))
                    || bare.starts_with("pg_");
                // Migration tools' version tables must agree on every shard.
                let version_table = matches!(schema.as_deref(), None | Some("public"))
                    && MIGRATION_VERSION_TABLES.contains(&bare.as_str());
                if !system && !version_table && self.map.default_table == DefaultTable::Error {
                    return Err(RouteError::UnknownTable {
                        table: display,
                        configured: self.map.configured_tables(),
                    });
                }
                (
                    bare.clone(),
                    TableRule::Replicated,
                    Placement::DefaultReplicated,
                )
            }
        };
        let cond = match rule {
            TableRule::Sharded { .. } => {
                if counted {
                    self.walked_sharded += 1;
                }
                Cond::All
            }
            TableRule::Replicated => Cond::Free,
        };
        self.tables.push(TableUse {
            name: display,
            alias: alias.clone(),
            placement,
        });
        let o = self.push_occ(
            scope,
            Occ {
                table: Some(table),
                rule: Some(rule),
                alias,
                bare,
                schema,
            },
        );
        Ok((o, cond))
    }

    fn walk_query(&mut self, q: &Query, parent: Option<usize>) -> Result<Cond, RouteError> {
        let mark = self.ctes.len();
        if let Some(with) = &q.with {
            for cte in &with.cte_tables {
                let name = norm(&cte.alias.name);
                self.all_cte_names.insert(name.clone());
                if with.recursive {
                    self.ctes.push((name.clone(), Cond::All));
                }
                let c = self.walk_query(&cte.query, parent)?;
                self.ctes.push((name, c));
            }
        }
        if !q.locks.is_empty() {
            self.locking = true;
        }
        let c = self.walk_set(&q.body, parent)?;
        if let (Some(ob), Some(scope)) = (&q.order_by, self.last_select_scope) {
            self.scan(ob, scope)?;
        }
        self.ctes.truncate(mark);
        Ok(c)
    }

    fn walk_set(&mut self, s: &SetExpr, parent: Option<usize>) -> Result<Cond, RouteError> {
        match s {
            SetExpr::Select(sel) => self.walk_select(sel, parent),
            SetExpr::Query(q) => self.walk_query(q, parent),
            SetExpr::SetOperation {
                left, op, right, ..
            } => {
                // Each branch runs on its own, so branches need no join on the key
                // between them: link them so only joins inside a branch are checked.
                let start = self.occs.len();
                let l = self.walk_set(left, parent)?;
                let mid = self.occs.len();
                let r = self.walk_set(right, parent)?;
                let first_sharded = |w: &Self, range: std::ops::Range<usize>| {
                    range
                        .into_iter()
                        .find(|o| matches!(w.occs[*o].rule, Some(TableRule::Sharded { .. })))
                };
                if let (Some(a), Some(b)) = (
                    first_sharded(self, start..mid),
                    first_sharded(self, mid..self.occs.len()),
                ) {
                    self.edges.push((a, b));
                }
                Ok(match op {
                    SetOperator::Union => or(l, r),
                    SetOperator::Intersect => and(l, r),
                    _ => and(l, weaken(r)),
                })
            }
            SetExpr::Values(v) => {
                let scope = self.new_scope(parent);
                for row in &v.rows {
                    for e in &row.content {
                        self.scan(e, scope)?;
                    }
                }
                Ok(Cond::Free)
            }
            SetExpr::Table(t) => {
                let scope = self.new_scope(parent);
                match &t.table_name {
                    Some(name) => {
                        let mut parts = Vec::new();
                        if let Some(s) = &t.schema_name {
                            parts.push(s.clone());
                        }
                        parts.push(name.clone());
                        let on = ObjectName::from(parts);
                        Ok(self.add_table(&on, None, scope, true)?.1)
                    }
                    None => Ok(Cond::All),
                }
            }
            _ => {
                self.data_modifying_cte = true;
                Ok(Cond::All)
            }
        }
    }

    fn walk_select(&mut self, sel: &Select, parent: Option<usize>) -> Result<Cond, RouteError> {
        let scope = self.new_scope(parent);
        let mut cond = Cond::Free;
        for twj in &sel.from {
            let c = self.walk_twj(twj, scope)?;
            cond = and(cond, c);
        }
        if let Some(w) = &sel.selection {
            self.scan(w, scope)?;
            if cond != Cond::Free {
                cond = and(cond, self.cond(w, scope)?);
            }
        }
        for item in &sel.projection {
            match item {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                    self.scan(e, scope)?
                }
                _ => {}
            }
        }
        if let Some(h) = &sel.having {
            self.scan(h, scope)?;
        }
        self.last_select_scope = Some(scope);
        Ok(cond)
    }

    fn walk_twj(&mut self, twj: &TableWithJoins, scope: usize) -> Result<Cond, RouteError> {
        let mut c = self.walk_factor(&twj.relation, scope)?;
        for j in &twj.joins {
            let (left_req, right_req, constraint) = match &j.join_operator {
                JoinOperator::Join(k)
                | JoinOperator::Inner(k)
                | JoinOperator::CrossJoin(k)
                | JoinOperator::Semi(k)
                | JoinOperator::LeftSemi(k) => (true, true, Some(k)),
                JoinOperator::Left(k) | JoinOperator::LeftOuter(k) => (true, false, Some(k)),
                JoinOperator::Right(k) | JoinOperator::RightOuter(k) => (false, true, Some(k)),
                JoinOperator::FullOuter(k) => (false, false, Some(k)),
                _ => (true, false, None),
            };
            let rc = self.walk_factor(&j.relation, scope)?;
            c = and(
                if left_req { c } else { weaken(c) },
                if right_req { rc } else { weaken(rc) },
            );
            match constraint {
                Some(JoinConstraint::On(e)) => {
                    self.scan(e, scope)?;
                    if left_req && right_req && c != Cond::Free {
                        c = and(c, self.cond(e, scope)?);
                    }
                }
                Some(JoinConstraint::Using(cols)) => {
                    for col in cols {
                        let col = name_parts(col).pop().unwrap_or_default();
                        let keyed: Vec<usize> = self.scopes[scope]
                            .occs
                            .iter()
                            .copied()
                            .filter(|o| {
                                matches!(&self.occs[*o].rule, Some(TableRule::Sharded { key, .. }) if *key == col)
                            })
                            .collect();
                        for w in keyed.windows(2) {
                            self.edges.push((w[0], w[1]));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(c)
    }

    fn walk_factor(&mut self, f: &TableFactor, scope: usize) -> Result<Cond, RouteError> {
        match f {
            TableFactor::Table {
                name,
                alias,
                args: None,
                ..
            } => Ok(self
                .add_table(name, alias.as_ref().map(|a| &a.name), scope, true)?
                .1),
            TableFactor::Derived {
                lateral,
                subquery,
                alias,
                ..
            } => {
                self.push_occ(
                    scope,
                    Occ {
                        table: None,
                        rule: None,
                        alias: alias.as_ref().map(|a| norm(&a.name)),
                        bare: String::new(),
                        schema: None,
                    },
                );
                let parent = if *lateral {
                    Some(scope)
                } else {
                    self.scopes[scope].parent
                };
                self.walk_query(subquery, parent)
            }
            TableFactor::NestedJoin {
                table_with_joins, ..
            } => self.walk_twj(table_with_joins, scope),
            _ => Ok(Cond::Free),
        }
    }

    /// Finds subqueries in `e` (walked as non-required scopes) and key
    /// equalities between tables (co-location edges). `_tag` is unused.
    fn scan<T: Visit + ?Sized>(&mut self, e: &T, scope: usize) -> Result<(), RouteError> {
        let mut v = ScanVisitor {
            walker: self,
            scope,
            depth: 0,
            skip: Vec::new(),
        };
        match e.visit(&mut v) {
            ControlFlow::Break(err) => Err(err),
            ControlFlow::Continue(()) => Ok(()),
        }
    }

    /// The sharded occurrence whose key column `e` names, if it does.
    fn resolve_key(&self, e: &Expr, scope: usize) -> Option<usize> {
        match e {
            Expr::Nested(inner) => self.resolve_key(inner, scope),
            Expr::Identifier(id) => {
                let col = norm(id);
                let mut hits = self.scopes.get(scope)?.occs.iter().filter(|o| {
                    matches!(&self.occs[**o].rule, Some(TableRule::Sharded { key, .. }) if *key == col)
                });
                let first = *hits.next()?;
                if hits.next().is_some() {
                    None
                } else {
                    Some(first)
                }
            }
            Expr::CompoundIdentifier(ids) if ids.len() == 2 || ids.len() == 3 => {
                let col = norm(ids.last()?);
                let qual = norm(ids.get(ids.len() - 2)?);
                let schema = if ids.len() == 3 {
                    ids.first().map(norm)
                } else {
                    None
                };
                let mut s = Some(scope);
                while let Some(cur) = s {
                    let sc = self.scopes.get(cur)?;
                    let found = sc.occs.iter().copied().find(|o| {
                        let occ = &self.occs[*o];
                        match (&occ.alias, &schema) {
                            (Some(a), None) => *a == qual,
                            (Some(_), Some(_)) => false,
                            (None, None) => occ.bare == qual,
                            (None, Some(sch)) => {
                                occ.bare == qual && occ.schema.as_ref() == Some(sch)
                                    || occ.bare == qual && occ.schema.is_none() && (sch == "public")
                            }
                        }
                    });
                    if let Some(o) = found {
                        return match &self.occs[o].rule {
                            Some(TableRule::Sharded { key, .. }) if *key == col => Some(o),
                            _ => None,
                        };
                    }
                    s = sc.parent;
                }
                None
            }
            _ => None,
        }
    }

    fn leaf(&self, occ: usize, col: &str) -> Option<KeyLeaf> {
        let o = self.occs.get(occ)?;
        match &o.rule {
            Some(TableRule::Sharded { function, .. }) => {
                let table = o.table.clone()?;
                let kind = self.map.key_type(&table).or_else(|| {
                    self.map
                        .functions
                        .get(*function)
                        .and_then(MapFunction::implied_key_type)
                });
                Some(KeyLeaf {
                    column: format!("{}.{}", o.alias.as_deref().unwrap_or(&o.bare), col),
                    table,
                    function: *function,
                    kind,
                })
            }
            _ => None,
        }
    }

    fn key_leaf(&self, e: &Expr, scope: usize) -> Option<KeyLeaf> {
        let occ = self.resolve_key(e, scope)?;
        match &self.occs.get(occ)?.rule {
            Some(TableRule::Sharded { key, .. }) => self.leaf(occ, key),
            _ => None,
        }
    }

    fn is_range(&self, leaf: &KeyLeaf) -> bool {
        self.map
            .functions
            .get(leaf.function)
            .is_some_and(|f| matches!(f.function, crate::sharding::ShardingFunction::Range(_)))
    }

    /// The key constraint a predicate expresses in `scope`.
    fn cond(&self, e: &Expr, scope: usize) -> Result<Cond, RouteError> {
        Ok(match e {
            Expr::Nested(inner) => self.cond(inner, scope)?,
            Expr::BinaryOp { left, op, right } => match op {
                BinaryOperator::And => and(self.cond(left, scope)?, self.cond(right, scope)?),
                BinaryOperator::Or => or(self.cond(left, scope)?, self.cond(right, scope)?),
                BinaryOperator::Eq => {
                    if let (Some(leaf), Some(v)) = (self.key_leaf(left, scope), value(right)?) {
                        Cond::In {
                            leaf,
                            values: vec![v],
                        }
                    } else if let (Some(leaf), Some(v)) =
                        (self.key_leaf(right, scope), value(left)?)
                    {
                        Cond::In {
                            leaf,
                            values: vec![v],
                        }
                    } else {
                        Cond::All
                    }
                }
                BinaryOperator::Lt
                | BinaryOperator::LtEq
                | BinaryOperator::Gt
                | BinaryOperator::GtEq => {
                    let (leaf, v, op) = if let (Some(l), Some(v)) =
                        (self.key_leaf(left, scope), value(right)?)
                    {
                        (l, v, op.clone())
                    } else if let (Some(l), Some(v)) = (self.key_leaf(right, scope), value(left)?) {
                        let flipped = match op {
                            BinaryOperator::Lt => BinaryOperator::Gt,
                            BinaryOperator::LtEq => BinaryOperator::GtEq,
                            BinaryOperator::Gt => BinaryOperator::Lt,
                            _ => BinaryOperator::LtEq,
                        };
                        (l, v, flipped)
                    } else {
                        return Ok(Cond::All);
                    };
                    if !self.is_range(&leaf) {
                        return Ok(Cond::All);
                    }
                    let (lower, upper) = match op {
                        BinaryOperator::Lt => (Bound::Unbounded, Bound::Excluded(v)),
                        BinaryOperator::LtEq => (Bound::Unbounded, Bound::Included(v)),
                        BinaryOperator::Gt => (Bound::Excluded(v), Bound::Unbounded),
                        _ => (Bound::Included(v), Bound::Unbounded),
                    };
                    Cond::Range { leaf, lower, upper }
                }
                _ => Cond::All,
            },
            Expr::In {
                expr,
                target: InTarget::List(list),
                negated: false,
                ..
            } => match self.key_leaf(expr, scope) {
                Some(leaf) => match values(list)? {
                    Some(values) => Cond::In { leaf, values },
                    None => Cond::All,
                },
                None => Cond::All,
            },
            Expr::AnyOp {
                left,
                compare_op: BinaryOperator::Eq,
                right,
                ..
            } => match self.key_leaf(left, scope) {
                Some(leaf) => match array_values(right)? {
                    ArrayArg::Values(values) => Cond::In { leaf, values },
                    ArrayArg::Param(index) => Cond::ParamArray { leaf, index },
                    ArrayArg::Unknown => Cond::All,
                },
                None => Cond::All,
            },
            Expr::Between {
                expr,
                negated: false,
                low,
                high,
            } => match (self.key_leaf(expr, scope), value(low)?, value(high)?) {
                (Some(leaf), Some(lo), Some(hi)) if self.is_range(&leaf) => Cond::Range {
                    leaf,
                    lower: Bound::Included(lo),
                    upper: Bound::Included(hi),
                },
                _ => Cond::All,
            },
            _ => Cond::All,
        })
    }

    /// Records a co-location edge for `a = b` when both are key columns.
    fn equality_edge(&mut self, left: &Expr, right: &Expr, scope: usize) {
        if let (Some(a), Some(b)) = (
            self.resolve_key(left, scope),
            self.resolve_key(right, scope),
        ) {
            self.edges.push((a, b));
        }
    }
}

enum ArrayArg {
    Values(Vec<ValueExpr>),
    Param(usize),
    Unknown,
}

fn array_values(e: &Expr) -> Result<ArrayArg, RouteError> {
    Ok(match e {
        Expr::Nested(inner) => array_values(inner)?,
        Expr::Array(arr) => match values(&arr.elem)? {
            Some(v) => ArrayArg::Values(v),
            None => ArrayArg::Unknown,
        },
        Expr::Cast { expr, .. } => match array_values(expr)? {
            // `ARRAY['a','b']::uuid[]`: the element type comes from the cast.
            ArrayArg::Values(v) => match e {
                Expr::Cast { data_type, .. } => {
                    let elem = data_type.to_string().to_lowercase();
                    match elem.strip_suffix("[]").and_then(cast_oid) {
                        Some(o) => {
                            let mut out = Vec::with_capacity(v.len());
                            for x in v {
                                out.push(apply_cast(x, o)?);
                            }
                            ArrayArg::Values(out)
                        }
                        None => ArrayArg::Values(v),
                    }
                }
                _ => ArrayArg::Values(v),
            },
            other => other,
        },
        Expr::Value(v) => match &v.value {
            Value::Placeholder(p) => match placeholder_index(p) {
                Some(i) => ArrayArg::Param(i),
                None => ArrayArg::Unknown,
            },
            _ => ArrayArg::Unknown,
        },
        _ => ArrayArg::Unknown,
    })
}

fn values(list: &[Expr]) -> Result<Option<Vec<ValueExpr>>, RouteError> {
    let mut out = Vec::with_capacity(list.len());
    for e in list {
        match value(e)? {
            Some(v) => out.push(v),
            None => return Ok(None),
        }
    }
    Ok(Some(out))
}

fn placeholder_index(p: &str) -> Option<usize> {
    p.strip_prefix('$')?.parse::<usize>().ok()?.checked_sub(1)
}

/// The OID a cast to `type_name` gives a key (key types only).
pub fn cast_oid(type_name: &str) -> Option<u32> {
    let t = type_name.trim();
    Some(match t {
        "int" | "integer" | "int4" => oid::INT4,
        "smallint" | "int2" => oid::INT2,
        "bigint" | "int8" => oid::INT8,
        "text" | "varchar" | "string" => oid::TEXT,
        "uuid" => oid::UUID,
        "date" => oid::DATE,
        "timestamptz" | "timestamp with time zone" => oid::TIMESTAMPTZ,
        _ if t.starts_with("character varying") || t.starts_with("varchar(") => oid::TEXT,
        _ if t.starts_with("timestamp")
            && t.contains("with time zone")
            && !t.contains("without") =>
        {
            oid::TIMESTAMPTZ
        }
        _ if t.starts_with("timestamp") => oid::TIMESTAMP,
        _ => return None,
    })
}

fn apply_cast(v: ValueExpr, type_oid: u32) -> Result<ValueExpr, RouteError> {
    let parse = |s: &str| {
        KeyValue::from_text(type_oid, s.as_bytes())
            .map(ValueExpr::Known)
            .map_err(|e| RouteError::InvalidKey(e.to_string()))
    };
    match v {
        ValueExpr::Known(KeyValue::Text(s)) | ValueExpr::Untyped(s) => parse(&s),
        ValueExpr::Known(KeyValue::Int(i)) => parse(&i.to_string()),
        ValueExpr::Known(other) => Ok(ValueExpr::Known(other)),
        ValueExpr::Param { index, .. } => Ok(ValueExpr::Param {
            index,
            cast: Some(type_oid),
        }),
        ValueExpr::Null => Ok(ValueExpr::Null),
    }
}

/// A literal, cast or parameter usable as a key value; `None` for anything else.
fn value(e: &Expr) -> Result<Option<ValueExpr>, RouteError> {
    Ok(match e {
        Expr::Nested(inner) => value(inner)?,
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n
                .parse::<i64>()
                .ok()
                .map(|i| ValueExpr::Known(KeyValue::Int(i))),
            Value::SingleQuotedString(s)
            | Value::EscapedStringLiteral(s)
            | Value::UnicodeStringLiteral(s) => Some(ValueExpr::Untyped(s.clone())),
            Value::Placeholder(p) => {
                placeholder_index(p).map(|index| ValueExpr::Param { index, cast: None })
            }
            Value::Null => Some(ValueExpr::Null),
            _ => None,
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match expr.as_ref() {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => format!("-{n}")
                    .parse::<i64>()
                    .ok()
                    .map(|i| ValueExpr::Known(KeyValue::Int(i))),
                _ => None,
            },
            _ => None,
        },
        Expr::Cast {
            expr, data_type, ..
        } => match (
            cast_oid(&data_type.to_string().to_lowercase()),
            value(expr)?,
        ) {
            (Some(o), Some(v)) => Some(apply_cast(v, o)?),
            _ => None,
        },
        Expr::TypedString(ts) => {
            let text = match &ts.value.value {
                Value::SingleQuotedString(s) => Some(s.clone()),
                _ => None,
            };
            match (cast_oid(&ts.data_type.to_string().to_lowercase()), text) {
                (Some(o), Some(s)) => Some(apply_cast(ValueExpr::Untyped(s), o)?),
                _ => None,
            }
        }
        _ => None,
    })
}

struct ScanVisitor<'w, 'm> {
    walker: &'w mut Walker<'m>,
    scope: usize,
    depth: usize,
    /// Subqueries already walked by the InSubquery handler.
    skip: Vec<*const Query>,
}

impl Visitor for ScanVisitor<'_, '_> {
    type Break = RouteError;

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<RouteError> {
        if self.depth == 0 && !self.skip.iter().any(|p| std::ptr::eq(*p, q)) {
            if let Err(e) = self.walker.walk_query(q, Some(self.scope)) {
                return ControlFlow::Break(e);
            }
        }
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _q: &Query) -> ControlFlow<RouteError> {
        self.depth = self.depth.saturating_sub(1);
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<RouteError> {
        if self.depth != 0 {
            return ControlFlow::Continue(());
        }
        match e {
            Expr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            } => self.walker.equality_edge(left, right, self.scope),
            Expr::In {
                expr,
                target: InTarget::Subquery(subquery),
                ..
            } => {
                if let Err(err) = self.walker.walk_query(subquery, Some(self.scope)) {
                    return ControlFlow::Break(err);
                }
                self.skip.push(subquery.as_ref() as *const Query);
                // `key IN (SELECT other_key FROM …)` joins on the keys.
                if let (SetExpr::Select(sel), Some(inner_scope)) =
                    (subquery.body.as_ref(), self.walker.last_select_scope)
                {
                    if let [SelectItem::UnnamedExpr(item)
                    | SelectItem::ExprWithAlias { expr: item, .. }] = sel.projection.as_slice()
                    {
                        if let (Some(a), Some(b)) = (
                            self.walker.resolve_key(expr, self.scope),
                            self.walker.resolve_key(item, inner_scope),
                        ) {
                            self.walker.edges.push((a, b));
                        }
                    }
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// Counts every sharded table reference anywhere in a statement, to catch
/// references the walker did not reach (they would otherwise run on partial data).
struct CountVisitor<'m> {
    map: &'m ShardMap,
    ctes: &'m BTreeSet<String>,
    sharded: usize,
}

impl Visitor for CountVisitor<'_> {
    type Break = ();

    fn pre_visit_table_factor(&mut self, f: &TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table {
            name, args: None, ..
        } = f
        {
            let parts = name_parts(name);
            let bare = parts.last().cloned().unwrap_or_default();
            if parts.len() == 1 && self.ctes.contains(&bare) {
                return ControlFlow::Continue(());
            }
            let schema = if parts.len() >= 2 {
                parts.get(parts.len() - 2).map(String::as_str)
            } else {
                None
            };
            if let Some((_, TableRule::Sharded { .. })) = self.map.lookup(schema, &bare) {
                self.sharded += 1;
            }
        }
        ControlFlow::Continue(())
    }
}

fn fixed(kind: StatementKind, route: Route) -> Analysis {
    Analysis {
        kind,
        tables: Vec::new(),
        plan: Plan::Fixed(route),
        by_tokenizer: false,
    }
}

fn statement_word(stmt: &Statement) -> String {
    let text = stmt.to_string();
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
        .to_uppercase()
}

fn analyze_statement(map: &ShardMap, stmt: &Statement) -> Result<Analysis, RouteError> {
    use StatementKind as K;
    let mut w = Walker::new(map);
    let (kind, cond, write_target, key_update, insert) = match stmt {
        Statement::Query(q) => {
            let c = w.walk_query(q, None)?;
            (K::Read, c, None, None, None)
        }
        Statement::Explain { statement, .. } => return analyze_statement(map, statement),
        Statement::Insert(ins) => return analyze_insert(map, w, ins, stmt),
        Statement::Update(u) => {
            let scope = w.new_scope(None);
            let mut c = w.walk_twj(&u.table, scope)?;
            let target = w.scopes[scope].occs.first().copied();
            if let Some(UpdateTableFromKind::BeforeSet(f) | UpdateTableFromKind::AfterSet(f)) =
                &u.from
            {
                for twj in f {
                    let fc = w.walk_twj(twj, scope)?;
                    c = and(c, fc);
                }
            }
            if let Some(sel) = &u.selection {
                w.scan(sel, scope)?;
                if c != Cond::Free {
                    c = and(c, w.cond(sel, scope)?);
                }
            }
            let mut key_update = None;
            for a in &u.assignments {
                w.scan(&a.value, scope)?;
                if let (ast::AssignmentTarget::ColumnName(col), Some(t)) = (&a.target, target) {
                    let col = name_parts(col).pop().unwrap_or_default();
                    if let Some(TableRule::Sharded { key, .. }) = &w.occs[t].rule {
                        if *key == col {
                            let leaf = w.leaf(t, key).ok_or_else(|| {
                                RouteError::Unsupported("cannot resolve the key column".into())
                            })?;
                            let v = value(&a.value)?.ok_or_else(|| {
                                RouteError::Unsupported(format!(
                                    "UPDATE sets the sharding key {} to `{}`, which shardgate \
                                     cannot evaluate; rows cannot move between shards (set it to \
                                     a literal or parameter, or delete and re-insert)",
                                    leaf.column, a.value
                                ))
                            })?;
                            key_update = Some((leaf, v));
                        }
                    }
                }
            }
            (K::Write, c, target, key_update, None::<()>)
        }
        Statement::Delete(d) => {
            let scope = w.new_scope(None);
            let from = match &d.from {
                FromTable::WithFromKeyword(v) | FromTable::WithoutKeyword(v) => v,
            };
            let mut c = Cond::Free;
            for twj in from {
                let fc = w.walk_twj(twj, scope)?;
                c = and(c, fc);
            }
            let target = w.scopes[scope].occs.first().copied();
            if let Some(using) = &d.using {
                for twj in using {
                    let fc = w.walk_twj(twj, scope)?;
                    c = and(c, fc);
                }
            }
            if let Some(sel) = &d.selection {
                w.scan(sel, scope)?;
                if c != Cond::Free {
                    c = and(c, w.cond(sel, scope)?);
                }
            }
            (K::Write, c, target, None, None)
        }
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. } => return Ok(fixed(K::Transaction, Route::NoShard)),
        Statement::Set(_) | Statement::Reset(_) | Statement::Discard { .. } => {
            return Ok(fixed(K::Set, Route::NoShard))
        }
        Statement::LISTEN { .. } | Statement::UNLISTEN { .. } | Statement::NOTIFY { .. } => {
            return Ok(fixed(K::Utility, Route::NoShard))
        }
        Statement::ShowVariable { .. } | Statement::ShowVariables { .. } => {
            return Ok(fixed(K::Read, Route::AnyOne))
        }
        Statement::Copy {
            source, to, target, ..
        } => match source {
            CopySource::Query(q) => {
                let c = w.walk_query(q, None)?;
                (K::Read, c, None, None, None)
            }
            CopySource::Table { table_name, .. } => {
                let scope = w.new_scope(None);
                let (_, c) = w.add_table(table_name, None, scope, true)?;
                if *to {
                    (K::Read, c, None, None, None)
                } else if c == Cond::Free {
                    return Ok(Analysis {
                        kind: K::Write,
                        tables: w.tables,
                        plan: Plan::Fixed(Route::Broadcast),
                        by_tokenizer: false,
                    });
                } else if matches!(target, ast::CopyTarget::Stdin) {
                    // Rows spread over every shard; the session routes them
                    // one by one (frontend/session/copy.rs).
                    return Ok(Analysis {
                        kind: K::Write,
                        tables: w.tables,
                        plan: Plan::Fixed(Route::All),
                        by_tokenizer: false,
                    });
                } else {
                    return Err(RouteError::Unsupported(format!(
                        "COPY {table_name} FROM a file or program: the server would read rows \
                         shardgate never sees, so they cannot be routed to their shards; use COPY \
                         {table_name} FROM STDIN (psql: \\copy)"
                    )));
                }
            }
        },
        // A cursor runs where its query's rows are; FETCH, MOVE and CLOSE
        // go to the backend the session's transaction is on (a cursor
        // lives in its transaction, or pins the backend WITH HOLD).
        Statement::Declare { stmts, .. } => match stmts.as_slice() {
            [ast::Declare {
                for_query: Some(q), ..
            }] => {
                let c = w.walk_query(q, None)?;
                (K::Read, c, None, None, None)
            }
            _ => {
                return Err(RouteError::Unsupported(
                    "DECLARE without a single cursor query is not routed".into(),
                ))
            }
        },
        Statement::Fetch { .. } => return Ok(fixed(K::Read, Route::NoShard)),
        Statement::Close { .. } | Statement::Deallocate { .. } => {
            return Ok(fixed(K::Utility, Route::NoShard))
        }
        // SQL PREPARE runs where its statement would (and pins the backend,
        // see the session's `taints`); EXECUTE goes to that backend.
        Statement::Prepare { statement, .. } => {
            let inner = analyze_statement(map, statement)?;
            if !matches!(
                inner.plan,
                Plan::Fixed(Route::AnyOne | Route::NoShard | Route::Single(_))
            ) {
                return Err(RouteError::Unsupported(
                    "SQL PREPARE of a statement on sharded tables: its shard depends on the \
                     values EXECUTE passes, and the prepared statement lives on one backend; use \
                     the extended protocol's prepared statements (every driver's default), \
                     which shardgate routes at each execution"
                        .into(),
                ));
            }
            return Ok(inner);
        }
        Statement::Execute { .. } => return Ok(fixed(K::Write, Route::NoShard)),
        // A temporary object lives in one backend session: created on every
        // shard it would need two-phase commit, which Postgres refuses for
        // temporary objects, and later statements could not find it.
        Statement::CreateTable(ast::CreateTable {
            temporary: true, ..
        })
        | Statement::CreateView(ast::CreateView {
            temporary: true, ..
        })
        | Statement::CreateSequence {
            temporary: true, ..
        } if map.shard_count() > 1 => {
            return Err(RouteError::Unsupported(
                "temporary tables, views and sequences over several shards: each would live in \
                 one backend session of one shard; pin the session to a shard first (SET \
                 shardgate.shard = 's0', or a /* shardgate: shard=s0 */ comment), or use a \
                 regular table"
                    .into(),
            ))
        }
        // Roles and databases are per cluster: every shard's cluster gets them.
        Statement::CreateUser(_)
        | Statement::AlterUser(_)
        | Statement::CreateDatabase { .. }
        | Statement::DropDomain(_)
        | Statement::CreateCollation(_)
        | Statement::AlterDefaultPrivileges(_)
        | Statement::AlterFunction(_)
        | Statement::CreateOperator(_)
        | Statement::DropOperator(_)
        | Statement::CreateTextSearch(_) => return Ok(fixed(K::Ddl, Route::Broadcast)),
        Statement::Truncate(_) => return Ok(fixed(K::Write, Route::Broadcast)),
        Statement::Vacuum(_) | Statement::Analyze(_) | Statement::Call(_) | Statement::Lock(_) => {
            return Ok(fixed(K::Utility, Route::Broadcast))
        }
        Statement::CreateTable(_)
        | Statement::CreateIndex(_)
        | Statement::CreateView(_)
        | Statement::CreateSchema { .. }
        | Statement::CreateExtension(_)
        | Statement::CreateFunction(_)
        | Statement::CreateSequence { .. }
        | Statement::CreateType { .. }
        | Statement::CreateDomain(_)
        | Statement::CreateTrigger(_)
        | Statement::CreatePolicy(_)
        | Statement::CreateRole(_)
        | Statement::AlterTable(_)
        | Statement::AlterIndex { .. }
        | Statement::AlterView(_)
        | Statement::AlterType(_)
        | Statement::AlterSchema(_)
        | Statement::AlterRole { .. }
        | Statement::Drop { .. }
        | Statement::DropFunction(_)
        | Statement::DropTrigger(_)
        | Statement::DropExtension(_)
        | Statement::DropPolicy(_)
        | Statement::Comment { .. }
        | Statement::Grant(_)
        | Statement::Revoke(_)
        | Statement::RefreshMaterializedView(_) => return Ok(fixed(K::Ddl, Route::Broadcast)),
        other => {
            return Err(RouteError::Unsupported(format!(
                "{} statements are not routed by shardgate yet",
                statement_word(other)
            )))
        }
    };
    let _ = insert;
    finish(map, w, stmt, kind, cond, write_target, key_update)
}

fn finish(
    map: &ShardMap,
    w: Walker<'_>,
    stmt: &Statement,
    kind: StatementKind,
    cond: Cond,
    write_target: Option<usize>,
    key_update: Option<(KeyLeaf, ValueExpr)>,
) -> Result<Analysis, RouteError> {
    if w.data_modifying_cte {
        return Err(RouteError::Unsupported(
            "data-modifying statements inside WITH are not routed yet; run them as separate statements"
                .into(),
        ));
    }
    let mut counter = CountVisitor {
        map,
        ctes: &w.all_cte_names,
        sharded: 0,
    };
    let _ = stmt.visit(&mut counter);
    if counter.sharded > w.walked_sharded {
        return Err(RouteError::Unsupported(
            "a sharded table appears in a part of this statement shardgate does not analyse \
             (e.g. a table function argument); running it per shard could give partial results. \
             Rewrite it, or add /* shardgate: shard=… */ if you know the shard"
                .into(),
        ));
    }
    let sharded: Vec<usize> = (0..w.occs.len())
        .filter(|o| matches!(w.occs[*o].rule, Some(TableRule::Sharded { .. })))
        .collect();
    let describe = |o: usize| {
        let occ = &w.occs[o];
        match &occ.alias {
            Some(a) => format!("{} AS {a}", occ.table.as_deref().unwrap_or("?")),
            None => occ.table.clone().unwrap_or_default(),
        }
    };
    let Some(&first) = sharded.first() else {
        let route = if kind == StatementKind::Write {
            Route::Broadcast
        } else if w.locking && !w.tables.is_empty() {
            // Row locks on replicated tables are taken on one fixed shard so
            // that concurrent lockers serialise on the same rows.
            Route::Single(0)
        } else {
            Route::AnyOne
        };
        return Ok(Analysis {
            kind,
            tables: w.tables,
            plan: Plan::Fixed(route),
            by_tokenizer: false,
        });
    };
    let function = match &w.occs[first].rule {
        Some(TableRule::Sharded { function, .. }) => *function,
        _ => 0,
    };
    for &o in &sharded {
        if let Some(TableRule::Sharded { function: g, .. }) = &w.occs[o].rule {
            if *g != function {
                let name = |f: usize| {
                    map.functions
                        .get(f)
                        .map_or("?", |f| f.name.as_str())
                        .to_string()
                };
                return Err(RouteError::CrossShard(format!(
                    "{} (sharded by {}) and {} (sharded by {}) are not co-located: rows that \
                     belong together may be on different shards, and shardgate does not run \
                     cross-shard joins. Query them separately, or shard both by one function",
                    describe(first),
                    name(function),
                    describe(o),
                    name(*g)
                )));
            }
        }
    }
    if let Some(t) = write_target {
        if matches!(w.occs[t].rule, Some(TableRule::Replicated)) {
            return Err(RouteError::CrossShard(format!(
                "this statement writes the replicated table {} using rows of the sharded table {}: \
                 each shard would write different data into its copy. Compute the values first, \
                 then write them",
                describe(t),
                describe(first)
            )));
        }
    }
    // Union-find: every sharded occurrence must be joined to the others on the key.
    let mut parent: Vec<usize> = (0..w.occs.len()).collect();
    fn find(p: &mut [usize], mut x: usize) -> usize {
        while p[x] != x {
            p[x] = p[p[x]];
            x = p[x];
        }
        x
    }
    for &(a, b) in &w.edges {
        if a < parent.len() && b < parent.len() {
            let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
            parent[ra] = rb;
        }
    }
    let root = find(&mut parent, first);
    if let Some(&loose) = sharded.iter().find(|o| find(&mut parent, **o) != root) {
        return Err(RouteError::CrossShard(format!(
            "{} and {} are both sharded but this statement does not join them on their sharding \
             keys (e.g. a.key = b.key): matching rows may be on different shards and shardgate \
             does not run cross-shard joins. Add the key equality, or query them separately",
            describe(first),
            describe(loose)
        )));
    }
    Ok(Analysis {
        kind,
        tables: w.tables,
        plan: Plan::Sharded {
            function,
            cond,
            key_update,
        },
        by_tokenizer: false,
    })
}

fn analyze_insert(
    map: &ShardMap,
    mut w: Walker<'_>,
    ins: &ast::Insert,
    stmt: &Statement,
) -> Result<Analysis, RouteError> {
    let TableObject::TableName(name) = &ins.table else {
        return Err(RouteError::Unsupported(
            "INSERT into a table function is not routed".into(),
        ));
    };
    let scope = w.new_scope(None);
    let alias = ins.table_alias.as_ref().map(|a| &a.alias);
    let (target, tc) = w.add_table(name, alias, scope, false)?;
    let mut columns: Vec<String> = ins
        .columns
        .iter()
        .map(|c| name_parts(c).pop().unwrap_or_default())
        .collect();
    if columns.is_empty() {
        // Without a column list the values follow the table's column order,
        // which the proxy reads from a shard's catalog.
        if let Some(order) = w.occs[target]
            .table
            .as_deref()
            .and_then(|t| map.column_order(t))
        {
            columns = order.to_vec();
        }
    }
    if let Some(OnInsert::OnConflict(oc)) = &ins.on {
        if let OnConflictAction::DoUpdate(du) = &oc.action {
            if let Some(TableRule::Sharded { key, .. }) = &w.occs[target].rule {
                for a in &du.assignments {
                    if let ast::AssignmentTarget::ColumnName(c) = &a.target {
                        if name_parts(c).pop().as_deref() == Some(key.as_str()) {
                            return Err(RouteError::Unsupported(format!(
                                "ON CONFLICT DO UPDATE sets the sharding key {key}: rows cannot \
                                 move between shards"
                            )));
                        }
                    }
                }
            }
        }
    }
    let Some(source) = &ins.source else {
        return Err(RouteError::Unsupported(
            "INSERT without a source is not routed".into(),
        ));
    };
    let TableRule::Sharded { key, function } =
        w.occs[target].rule.clone().unwrap_or(TableRule::Replicated)
    else {
        // Replicated target: every shard gets the rows, which must not come
        // from a sharded table (each shard would insert different rows).
        let _ = tc;
        let sc = w.walk_query(source, Some(scope))?;
        if sc != Cond::Free {
            return Err(RouteError::CrossShard(format!(
                "INSERT into the replicated table {} selects rows of a sharded table: each shard \
                 would insert different rows into its copy. Select the rows first, then insert them",
                name
            )));
        }
        return finish_fixed(w, StatementKind::Write, Route::Broadcast);
    };
    let leaf = w
        .leaf(target, &key)
        .ok_or_else(|| RouteError::Unsupported("cannot resolve the key column".into()))?;
    if columns.is_empty() {
        return Err(RouteError::ColumnOrderUnknown(format!(
            "INSERT INTO {name} without a column list: shardgate needs the table's column order to \
             find the sharding key {key}, and the table was not found in the catalog of the first \
             shard; create the table first, or list the columns, e.g. INSERT INTO {name} ({key}, …) \
             VALUES …"
        )));
    }
    let Some(pos) = columns.iter().position(|c| *c == key) else {
        return Err(RouteError::Unsupported(format!(
            "INSERT INTO {name} does not give the sharding key {key}: a default or generated \
             value would be computed by whichever shard runs it, so the row cannot be placed. \
             Give the key explicitly"
        )));
    };
    match source.body.as_ref() {
        SetExpr::Values(v) if source.with.is_none() => {
            let mut rows = Vec::with_capacity(v.rows.len());
            for (i, row) in v.rows.iter().enumerate() {
                for e in &row.content {
                    w.scan(e, scope)?;
                }
                let Some(e) = row.content.get(pos) else {
                    return Err(RouteError::Syntax(format!(
                        "row {} of the INSERT has fewer values than columns",
                        i + 1
                    )));
                };
                let Some(val) = value(e)? else {
                    return Err(RouteError::Unsupported(format!(
                        "row {} of the INSERT gives the sharding key {key} as `{e}`, which \
                         shardgate cannot evaluate; use a literal or a parameter",
                        i + 1
                    )));
                };
                rows.push(val);
            }
            let mut analysis = finish(map, w, stmt, StatementKind::Write, Cond::Free, None, None)?;
            analysis.plan = Plan::Insert {
                function,
                leaf,
                rows,
            };
            Ok(analysis)
        }
        _ => {
            let sc = w.walk_query(source, None)?;
            let projected = match (source.body.as_ref(), w.last_select_scope) {
                (SetExpr::Select(sel), Some(s)) => match sel.projection.get(pos) {
                    Some(
                        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. },
                    ) => Some((e.clone(), s, sel.from.is_empty())),
                    _ => None,
                },
                _ => None,
            };
            match projected {
                // INSERT … SELECT <values> (no FROM): one row.
                Some((e, _, true)) if sc == Cond::Free => {
                    let Some(val) = value(&e)? else {
                        return Err(RouteError::Unsupported(format!(
                            "the INSERT gives the sharding key {key} as `{e}`, which shardgate \
                             cannot evaluate; use a literal or a parameter"
                        )));
                    };
                    let mut analysis =
                        finish(map, w, stmt, StatementKind::Write, Cond::Free, None, None)?;
                    analysis.plan = Plan::Insert {
                        function,
                        leaf,
                        rows: vec![val],
                    };
                    Ok(analysis)
                }
                // INSERT … SELECT key FROM co-located table: each shard inserts its own rows.
                Some((e, s, false)) => match w.resolve_key(&e, s) {
                    Some(o) => {
                        w.edges.push((target, o));
                        finish(map, w, stmt, StatementKind::Write, sc, None, None)
                    }
                    None => Err(cross_insert(name, &key)),
                },
                _ => Err(cross_insert(name, &key)),
            }
        }
    }
}

fn cross_insert(name: &ObjectName, key: &str) -> RouteError {
    RouteError::CrossShard(format!(
        "INSERT INTO {name} … SELECT: the inserted sharding key {key} does not come straight from \
         the key of a co-located table, so rows may belong on other shards than the one that \
         selects them. Select the rows first, then insert them"
    ))
}

fn finish_fixed(w: Walker<'_>, kind: StatementKind, route: Route) -> Result<Analysis, RouteError> {
    Ok(Analysis {
        kind,
        tables: w.tables,
        plan: Plan::Fixed(route),
        by_tokenizer: false,
    })
}
