//! Functions whose value depends on the shard that evaluates them.
//!
//! A replicated table is one copy per shard, written by running the same
//! statement on every shard. That keeps the copies equal only when every
//! shard computes the same values: `random()`, `gen_random_uuid()`, a
//! sequence's `nextval()` (also behind a `serial`/identity default) give
//! each shard its own value, and the copies silently diverge (a later read,
//! answered by any one shard, depends on which one). Such writes are refused.
//!
//! Sequences exist once per shard too. `nextval('s')` with no sharded table
//! in the statement is sent to one fixed shard (the first), so the values are
//! unique as one Postgres would give them; inside a statement on a sharded
//! table it would use the sequence of whichever shard holds the rows, whose
//! values repeat on the other shards, so it is refused.
//!
//! Time functions (`now()`, `CURRENT_TIMESTAMP`, …) are allowed: each shard's
//! copy records its own transaction's time, which differs by the commit skew
//! (README, known differences).

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    CopySource, Expr, Query, SelectItem, SetExpr, Statement, TableObject, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::analyze::{lookup_table, name_parts, norm, Analysis, Plan, StatementKind};
use super::route::{Route, RouteError};
use super::shardmap::{ShardMap, TableRule};

/// Sequence functions: per-shard state.
const SEQUENCE_FUNCTIONS: &[&str] = &["nextval", "setval", "currval", "lastval"];

/// Functions that give a different value on every evaluation or every shard.
const PER_SHARD_FUNCTIONS: &[&str] = &[
    "random",
    "random_normal",
    "setseed",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "gen_random_bytes",
    "gen_salt",
    "txid_current",
    "txid_current_if_assigned",
    "pg_current_xact_id",
    "pg_current_xact_id_if_assigned",
    "pg_backend_pid",
    "inet_server_addr",
    "inet_server_port",
    "pg_postmaster_start_time",
    "pg_current_wal_lsn",
];

/// The per-shard functions a statement (or expression) calls, lower-cased.
fn per_shard_calls<T: Visit + ?Sized>(node: &T) -> BTreeSet<String> {
    struct Calls(BTreeSet<String>);
    impl Visitor for Calls {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            if let Expr::Function(f) = e {
                if let Some(name) = name_parts(&f.name).pop() {
                    if SEQUENCE_FUNCTIONS.contains(&name.as_str())
                        || PER_SHARD_FUNCTIONS.contains(&name.as_str())
                    {
                        self.0.insert(name);
                    }
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut calls = Calls(BTreeSet::new());
    let _ = node.visit(&mut calls);
    calls.0
}

/// True when a column default (as `pg_get_expr` prints it) calls a
/// per-shard function; unparseable defaults count as per-shard (refusing is
/// safe, guessing is not).
pub fn default_is_per_shard(default: &str) -> bool {
    let dialect = PostgreSqlDialect {};
    match Parser::new(&dialect)
        .try_with_sql(default)
        .and_then(|mut p| p.parse_expr())
    {
        Ok(expr) => !per_shard_calls(&expr).is_empty(),
        Err(_) => true,
    }
}

/// Applies the rules of this module to one analysed statement.
pub fn check(map: &ShardMap, stmt: &Statement, analysis: Analysis) -> Result<Analysis, RouteError> {
    let calls = per_shard_calls(stmt);
    let sequence = calls
        .iter()
        .find(|c| SEQUENCE_FUNCTIONS.contains(&c.as_str()));
    match &analysis.plan {
        Plan::Fixed(Route::Broadcast) if analysis.kind == StatementKind::Write => {
            if let Some(call) = calls.iter().next() {
                return Err(RouteError::Unsupported(format!(
                    "this statement writes a replicated table (a copy on every shard) using \
                     {call}(), which every shard would evaluate to a different value: the copies \
                     would differ. Compute the value first (e.g. SELECT {call}(…) through \
                     shardgate) and write it as a literal or parameter"
                )));
            }
            if let Some((table, column, default)) = per_shard_default(map, stmt) {
                return Err(RouteError::Unsupported(format!(
                    "this statement writes the replicated table {table} without a value for \
                     column {column}, whose default `{default}` every shard would evaluate to a \
                     different value: the copies would differ. Give {column} explicitly"
                )));
            }
            Ok(analysis)
        }
        Plan::Fixed(Route::AnyOne) if sequence.is_some() => Ok(Analysis {
            plan: Plan::Fixed(Route::Single(0)),
            ..analysis
        }),
        Plan::Sharded { .. } | Plan::Insert { .. } => match sequence {
            Some(call) => Err(RouteError::Unsupported(format!(
                "{call}() in a statement on a sharded table would use the sequence of the shard \
                 that holds the rows; each shard has its own, so values repeat across shards. \
                 Get the value first with SELECT {call}(…) on its own (shardgate runs it on shard \
                 {first}), then use it",
                first = map.shard_names.first().map_or("0", String::as_str)
            ))),
            None => Ok(analysis),
        },
        _ => Ok(analysis),
    }
}

/// For an INSERT or COPY FROM into a map-named replicated table: the first
/// column it leaves to a per-shard default, as (table, column, default).
fn per_shard_default(map: &ShardMap, stmt: &Statement) -> Option<(String, String, String)> {
    let (name, listed, given) = match stmt {
        Statement::Insert(ins) => {
            let TableObject::TableName(name) = &ins.table else {
                return None;
            };
            let listed: Vec<String> = ins
                .columns
                .iter()
                .filter_map(|c| name_parts(c).pop())
                .collect();
            (
                name,
                listed,
                ins.source.as_deref().and_then(given_positions),
            )
        }
        Statement::Copy {
            source:
                CopySource::Table {
                    table_name,
                    columns,
                },
            to: false,
            ..
        } => (table_name, columns.iter().map(norm).collect(), None),
        _ => return None,
    };
    let (map_name, rule) = lookup_table(map, name)?;
    if *rule != TableRule::Replicated {
        return None;
    }
    let defaults = map.per_shard_defaults.get(map_name)?;
    // The columns the values fill, in order: the list, or the table's order.
    let order: &[String] = if listed.is_empty() {
        map.column_order(map_name).unwrap_or_default()
    } else {
        &listed
    };
    let is_given = |column: &str| -> bool {
        let Some(position) = order.iter().position(|c| c == column) else {
            // Not listed (or the table's order is unknown: assume given).
            return listed.is_empty() && order.is_empty();
        };
        match &given {
            Some(given) => given.get(position).copied().unwrap_or(false),
            None => true,
        }
    };
    defaults
        .iter()
        .find(|(column, _)| !is_given(column))
        .map(|(column, default)| (map_name.to_string(), column.clone(), default.clone()))
}

/// Which positions of an INSERT's source carry a value in every row (not
/// missing, not the `DEFAULT` keyword); `None` when it cannot be told.
fn given_positions(source: &Query) -> Option<Vec<bool>> {
    match source.body.as_ref() {
        SetExpr::Values(v) => {
            let width = v.rows.iter().map(|r| r.content.len()).max()?;
            let mut given = vec![true; width];
            for row in &v.rows {
                for (position, slot) in given.iter_mut().enumerate() {
                    let is_default = match row.content.get(position) {
                        None => true,
                        Some(Expr::Identifier(id)) => {
                            id.quote_style.is_none() && id.value.eq_ignore_ascii_case("default")
                        }
                        Some(_) => false,
                    };
                    if is_default {
                        *slot = false;
                    }
                }
            }
            Some(given)
        }
        SetExpr::Select(s)
            if s.projection.iter().all(|p| {
                matches!(
                    p,
                    SelectItem::UnnamedExpr(_) | SelectItem::ExprWithAlias { .. }
                )
            }) =>
        {
            Some(vec![true; s.projection.len()])
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::default_is_per_shard;

    #[test]
    fn defaults_are_classified() {
        assert!(default_is_per_shard(
            "nextval('countries_id_seq'::regclass)"
        ));
        assert!(default_is_per_shard("gen_random_uuid()"));
        assert!(default_is_per_shard("(random() * (10)::double precision)"));
        assert!(!default_is_per_shard("now()"));
        assert!(!default_is_per_shard("CURRENT_TIMESTAMP"));
        assert!(!default_is_per_shard("'x'::text"));
        assert!(!default_is_per_shard("0"));
    }
}
