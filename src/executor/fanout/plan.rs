//! The fan-out planner: SQL text → [`Plan`], cached by text.
//!
//! Works on sqlparser's AST only: the per-shard statement is the rewritten
//! AST printed back (hidden sort columns appended, LIMIT widened to
//! limit+offset, aggregates replaced by partial aggregates), never spliced
//! text. Anything whose merged result could differ from what one Postgres
//! holding all rows would return is refused with `0A000`, saying why and how
//! to rewrite.

use std::collections::HashMap;
use std::ops::ControlFlow;

use sqlparser::ast::{
    self, Distinct, Expr, Function, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr,
    Ident, LimitClause, ObjectName, OrderByKind, Query, Select, SelectItem, SetExpr, Statement,
    TableFactor, Value, Visit, VisitMut, Visitor, VisitorMut,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::colocated::{colocated, Scope};
use crate::protocol::synth::ProxyError;

/// The refusal SQLSTATE: feature_not_supported.
pub const REFUSED: &str = "0A000";

pub fn refuse(why: impl Into<String>, rewrite: impl Into<String>) -> ProxyError {
    ProxyError::error(REFUSED, why).with_hint(rewrite)
}

/// What the executor does with a statement that targets several shards.
#[derive(Debug)]
pub enum Plan {
    /// Run the statement as sent on every target; rows concatenated, command
    /// tags summed (writes, utility statements, anything not rewritten).
    Passthrough,
    /// A SELECT merged by the proxy (concat / merge sort, distinct, limit).
    Select(SelectPlan),
    /// A SELECT with aggregates re-aggregated across shards.
    Aggregate(Box<AggPlan>),
    /// An INSERT: a Split route divides its VALUES rows; on other
    /// multi-shard routes it runs as sent unless `fanout_refusal` says why not.
    Insert {
        insert: Box<ast::Insert>,
        fanout_refusal: Option<ProxyError>,
    },
    /// COPY … TO STDOUT (text/CSV): every shard's rows concatenated.
    CopyOut,
    /// Refused before touching any shard.
    Refused(ProxyError),
}

/// A LIMIT/OFFSET count: a literal or a parameter (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Literal(u64),
    Param(usize),
}

/// A merged column: position in the client's output, or a hidden column
/// appended after the visible ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Col {
    Output(usize),
    Hidden(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortKey {
    pub col: Col,
    pub desc: bool,
    pub nulls_first: bool,
    /// `COLLATE "C"` (or POSIX) written on the key: bytewise order is exact.
    pub collate_c: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DistinctKind {
    None,
    All,
    On(Vec<Col>),
}

/// A non-aggregating SELECT (or one grouped by a sharding key, whose groups
/// each live on one shard).
#[derive(Debug, Clone)]
pub struct SelectPlan {
    pub shard_sql: String,
    pub hidden: usize,
    pub sort: Vec<SortKey>,
    pub distinct: DistinctKind,
    pub limit: Option<Count>,
    pub offset: Option<Count>,
}

/// How one aggregate of the original query is recombined from partials.
#[derive(Debug, Clone)]
pub enum Combine {
    /// count: sum of partial counts, 0 when there are none.
    Count(usize),
    /// sum: sum of partial sums, cast back to the partial's type.
    Sum(usize),
    /// min/max/bool_and/bool_or/bit_*: the same function over partials.
    Same(String, usize),
    /// avg: sum of sums / sum of counts, typed as Postgres' avg.
    Avg { sum: usize, count: usize },
    /// string_agg(x, sep) without ORDER BY: string_agg of partial strings.
    StringAgg { col: usize, sep: Box<Expr> },
    /// An aggregate over DISTINCT values pushed down as a group column.
    OverDistinct(Box<Expr>),
}

/// A SELECT with aggregates: shards compute partial aggregates grouped by
/// the GROUP BY expressions (and by the DISTINCT argument, if any); the
/// groups are then re-aggregated, and the original select list, HAVING,
/// ORDER BY, DISTINCT and LIMIT are evaluated over the merged groups.
#[derive(Debug, Clone)]
pub struct AggPlan {
    pub shard_sql: String,
    /// Parameters the shard statement still references (HAVING, ORDER BY
    /// and LIMIT move to the final statement).
    pub shard_params: Vec<usize>,
    /// Parameters the final statement references.
    pub final_params: Vec<usize>,
    /// Group columns in the shard result (`g0..`), then the distinct column
    /// (`d0`) if any, then partials (`a0..`).
    pub groups: usize,
    pub distinct_col: bool,
    pub partials: usize,
    pub combines: Vec<Combine>,
    /// The final SELECT over `m`, with `__sg_g<i>` / `__sg_x<j>` placeholders.
    pub final_select: Box<Query>,
}

/// Table placement the planner needs: sharded table name → (key column,
/// sharding function name).
#[derive(Debug, Clone, Default)]
pub struct Tables {
    pub sharded: HashMap<String, (String, String)>,
    /// Aggregate functions of the database the planner cannot merge (from
    /// `pg_proc`, e.g. user-defined aggregates): a call is refused rather
    /// than evaluated per shard as if it were a scalar function.
    pub other_aggregates: std::collections::HashSet<String>,
}

/// The first call of an aggregate the planner does not know how to merge.
fn unknown_aggregate<V: Visit>(node: &V, tables: &Tables) -> Option<String> {
    struct U<'a>(&'a Tables, Option<String>);
    impl Visitor for U<'_> {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            if let Expr::Function(f) = expr {
                let name = fn_name(f);
                if f.over.is_none()
                    && !AGGS.contains(&name.as_str())
                    && self.0.other_aggregates.contains(&name)
                {
                    self.1 = Some(name);
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut u = U(tables, None);
    let _ = node.visit(&mut u);
    u.1
}

const AGGS: &[&str] = &[
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "bool_and",
    "bool_or",
    "every",
    "bit_and",
    "bit_or",
    "bit_xor",
    "string_agg",
];

const REFUSED_AGGS: &[&str] = &[
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "array_agg",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "json_objectagg",
    "json_arrayagg",
    "xmlagg",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "corr",
    "covar_pop",
    "covar_samp",
    "regr_avgx",
    "regr_avgy",
    "regr_count",
    "regr_intercept",
    "regr_r2",
    "regr_slope",
    "regr_sxx",
    "regr_sxy",
    "regr_syy",
    "range_agg",
    "range_intersect_agg",
    "any_value",
];

fn fn_name(f: &Function) -> String {
    match f.name.0.last() {
        Some(ast::ObjectNamePart::Identifier(i)) => ident_name(i),
        _ => String::new(),
    }
}

/// An identifier as Postgres folds it: unquoted ones lower-cased.
pub(crate) fn ident_name(i: &Ident) -> String {
    if i.quote_style.is_some() {
        i.value.clone()
    } else {
        i.value.to_lowercase()
    }
}

fn is_agg_call(expr: &Expr) -> Option<&Function> {
    match expr {
        Expr::Function(f) if f.over.is_none() => {
            let name = fn_name(f);
            (AGGS.contains(&name.as_str()) || REFUSED_AGGS.contains(&name.as_str())).then_some(f)
        }
        _ => None,
    }
}

fn args_of(f: &Function) -> Option<&ast::FunctionArgumentList> {
    match &f.args {
        FunctionArguments::List(l) => Some(l),
        _ => None,
    }
}

/// The plain expression arguments of a call (`None` for `*`).
fn expr_args(f: &Function) -> Vec<Option<Expr>> {
    args_of(f).map_or_else(Vec::new, |l| {
        l.args
            .iter()
            .map(|a| match a {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e.clone()),
                _ => None,
            })
            .collect()
    })
}

/// Facts about the expressions of a query that decide the plan.
#[derive(Default)]
struct Scan {
    /// Nesting inside subqueries: their aggregates and windows are their own.
    depth: usize,
    aggs: Vec<Expr>,
    window: bool,
    subquery: bool,
    refused_agg: Option<String>,
}

impl Visitor for Scan {
    type Break = ();
    fn pre_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
        self.depth += 1;
        ControlFlow::Continue(())
    }
    fn post_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
        self.depth = self.depth.saturating_sub(1);
        ControlFlow::Continue(())
    }
    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if self.depth > 0 {
            if matches!(
                expr,
                Expr::Subquery(_)
                    | Expr::In {
                        target: ast::InTarget::Subquery(_),
                        ..
                    }
                    | Expr::Exists { .. }
            ) {
                self.subquery = true;
            }
            return ControlFlow::Continue(());
        }
        match expr {
            Expr::Function(f) if f.over.is_some() => self.window = true,
            Expr::Function(f) => {
                let name = fn_name(f);
                if REFUSED_AGGS.contains(&name.as_str()) || !f.within_group.is_empty() {
                    self.refused_agg.get_or_insert(name);
                } else if AGGS.contains(&name.as_str()) && !self.aggs.contains(expr) {
                    self.aggs.push(expr.clone());
                }
            }
            Expr::Subquery(_)
            | Expr::In {
                target: ast::InTarget::Subquery(_),
                ..
            }
            | Expr::Exists { .. } => self.subquery = true,
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// Names of relations a query reads.
#[derive(Default)]
struct Relations(Vec<String>);

impl Visitor for Relations {
    type Break = ();
    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        if let Some(ast::ObjectNamePart::Identifier(i)) = relation.0.last() {
            self.0.push(ident_name(i));
        }
        ControlFlow::Continue(())
    }
}

impl Tables {
    fn touches_sharded<V: Visit>(&self, node: &V) -> bool {
        let mut rel = Relations::default();
        let _ = node.visit(&mut rel);
        rel.0.iter().any(|t| self.sharded.contains_key(t))
    }
}

/// Whether a node contains any subquery expression.
pub(crate) fn contains_subquery<V: Visit>(node: &V) -> bool {
    let mut scan = Scan::default();
    let _ = node.visit(&mut scan);
    scan.subquery
}

/// Whether a nested query is "plain" (rows pass through unchanged per
/// shard): no aggregates, grouping, DISTINCT, LIMIT, window functions, set operations.
pub(crate) fn plain_subquery(q: &Query) -> bool {
    if q.limit_clause.is_some() || q.fetch.is_some() || q.with.is_some() {
        return false;
    }
    let SetExpr::Select(s) = q.body.as_ref() else {
        return false;
    };
    let mut scan = Scan::default();
    let _ = s.visit(&mut scan);
    let grouped =
        !matches!(&s.group_by, GroupByExpr::Expressions(v, m) if v.is_empty() && m.is_empty());
    scan.aggs.is_empty()
        && !scan.window
        && scan.refused_agg.is_none()
        && !grouped
        && s.having.is_none()
        && s.distinct.is_none()
}

/// Parses and plans `sql` for a multi-shard route.
pub fn plan(sql: &str, tables: &Tables) -> Plan {
    let statements = match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(s) => s,
        // Utility statements sqlparser does not know run as sent; a query
        // we cannot analyse might need merging, so it is refused.
        Err(e) => {
            let first = sql
                .trim_start_matches(|c: char| c.is_whitespace() || c == '(')
                .split(|c: char| !c.is_ascii_alphabetic())
                .next()
                .unwrap_or("")
                .to_ascii_lowercase();
            return match first.as_str() {
                "select" | "with" | "table" | "values" | "insert" | "update" | "delete"
                | "merge" | "declare" | "create" | "copy" => Plan::Refused(refuse(
                    format!("this statement cannot be analysed for a multi-shard execution ({e})"),
                    "restrict it to one shard by its sharding key or a routing hint",
                )),
                _ => Plan::Passthrough,
            };
        }
    };
    if statements.len() != 1 {
        return Plan::Refused(refuse(
            "several statements in one query string cannot be fanned out to several shards",
            "send the statements one at a time",
        ));
    }
    if let Some(name) = statements
        .first()
        .and_then(|st| unknown_aggregate(st, tables))
    {
        return Plan::Refused(refuse(
            format!("aggregate {name}() cannot be merged across shards"),
            "restrict the query to one shard by its sharding key, or use count/sum/min/max/avg",
        ));
    }
    match statements.into_iter().next() {
        Some(Statement::Query(q)) => match plan_query(*q, tables) {
            Ok(p) => p,
            Err(e) => Plan::Refused(e),
        },
        Some(Statement::Insert(insert)) => {
            let fanout_refusal = insert
                .source
                .as_ref()
                .filter(|q| !matches!(q.body.as_ref(), SetExpr::Values(_)))
                .filter(|q| tables.touches_sharded(q.as_ref()) && !plain_subquery(q))
                .map(|_| {
                    refuse(
                        "INSERT … SELECT that aggregates, groups, sorts with LIMIT or uses DISTINCT over a sharded table cannot run per shard",
                        "restrict the SELECT to one shard by its sharding key, or compute the rows in the application",
                    )
                })
                .or_else(|| write_refusal(&Statement::Insert(insert.clone()), tables));
            Plan::Insert {
                insert: Box::new(insert),
                fanout_refusal,
            }
        }
        Some(statement @ (Statement::Update(_) | Statement::Delete(_) | Statement::Merge { .. })) => {
            match write_refusal(&statement, tables) {
                Some(e) => Plan::Refused(e),
                None => Plan::Passthrough,
            }
        }
        Some(Statement::Declare { .. }) => Plan::Refused(refuse(
            "cursors over several shards are not supported",
            "fetch the rows with one query, or restrict the cursor's query to one shard by its sharding key",
        )),
        Some(Statement::CreateTable(ct)) if ct.query.is_some() => Plan::Refused(refuse(
            "CREATE TABLE … AS over several shards is not supported",
            "create the table, then INSERT … SELECT, or restrict the query to one shard",
        )),
        Some(Statement::Copy {
            source,
            to: true,
            target: ast::CopyTarget::Stdout,
            options,
            legacy_options,
            ..
        }) => match copy_refusal(&source, &options, &legacy_options, tables) {
            Some(e) => Plan::Refused(e),
            None => Plan::CopyOut,
        },
        Some(Statement::Copy { .. }) => Plan::Refused(refuse(
            "COPY FROM, or COPY to a file or program, over several shards is not supported",
            "COPY each shard with a routing hint (/* shardgate: shard=s0 */); for loading, INSERT through shardgate",
        )),
        _ => Plan::Passthrough,
    }
}

/// Why a COPY … TO STDOUT cannot be concatenated from the shards.
fn copy_refusal(
    source: &ast::CopySource,
    options: &[ast::CopyOption],
    legacy: &[ast::CopyLegacyOption],
    tables: &Tables,
) -> Option<ProxyError> {
    let binary = options
        .iter()
        .any(|o| matches!(o, ast::CopyOption::Format(f) if f.value.eq_ignore_ascii_case("binary")))
        || legacy
            .iter()
            .any(|o| matches!(o, ast::CopyLegacyOption::Binary));
    let header = options
        .iter()
        .any(|o| matches!(o, ast::CopyOption::Header(true)))
        || legacy.iter().any(|o| format!("{o:?}").contains("Header"));
    if binary || header {
        return Some(refuse(
            "COPY TO STDOUT over several shards supports text and CSV without HEADER",
            "drop FORMAT binary / HEADER, or COPY each shard with a routing hint",
        ));
    }
    if let ast::CopySource::Query(q) = source {
        if q.order_by.is_some() || (tables.touches_sharded(q.as_ref()) && !plain_subquery(q)) {
            return Some(refuse(
                "COPY (SELECT …) TO STDOUT over several shards must be a plain SELECT (no ORDER BY, LIMIT, aggregates or DISTINCT)",
                "use a SELECT for ordered or aggregated results",
            ));
        }
    }
    None
}

/// Why a write cannot run per shard: a subquery over a sharded table (its
/// rows may live on other shards than the rows it filters or feeds).
fn write_refusal(statement: &Statement, tables: &Tables) -> Option<ProxyError> {
    struct Derived<'a> {
        tables: &'a Tables,
        found: bool,
    }
    impl Visitor for Derived<'_> {
        type Break = ();
        fn pre_visit_table_factor(&mut self, f: &TableFactor) -> ControlFlow<()> {
            if let TableFactor::Derived { subquery, .. } = f {
                if self.tables.touches_sharded(subquery.as_ref()) && !plain_subquery(subquery) {
                    self.found = true;
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut d = Derived {
        tables,
        found: false,
    };
    let _ = statement.visit(&mut d);
    let outer = match statement {
        Statement::Update(u) => {
            let mut from = vec![u.table.clone()];
            if let Some(
                ast::UpdateTableFromKind::BeforeSet(f) | ast::UpdateTableFromKind::AfterSet(f),
            ) = &u.from
            {
                from.extend(f.iter().cloned());
            }
            Scope::of_from(&from, tables)
        }
        Statement::Delete(del) => {
            let (ast::FromTable::WithFromKeyword(v) | ast::FromTable::WithoutKeyword(v)) =
                &del.from;
            let mut from = v.clone();
            if let Some(using) = &del.using {
                from.extend(using.iter().cloned());
            }
            Scope::of_from(&from, tables)
        }
        _ => Scope::default(),
    };
    (d.found || uncolocated_subquery(statement, &outer, tables)).then(|| {
        refuse(
            "a write on several shards with a subquery over a sharded table that is not co-located with the written rows is not supported: the subquery would only see each shard's own rows",
            "correlate the subquery on the sharding key (EXISTS … WHERE o.key = t.key, or key IN (SELECT key …)), compute the keys first, or restrict the write to one shard",
        )
    })
}

fn count_of(e: &Expr) -> Result<Count, ProxyError> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse::<u64>().map(Count::Literal).map_err(|_| {
                refuse(
                    format!("LIMIT/OFFSET {n} is not a non-negative integer"),
                    "use an integer literal or a parameter",
                )
            }),
            Value::Placeholder(p) => p
                .strip_prefix('$')
                .and_then(|n| n.parse::<usize>().ok())
                .map(Count::Param)
                .ok_or_else(|| refuse("unsupported LIMIT parameter", "use $n")),
            _ => Err(refuse(
                "LIMIT/OFFSET across shards needs an integer literal or a parameter",
                "write LIMIT 10 or LIMIT $1",
            )),
        },
        Expr::Nested(inner) => count_of(inner),
        _ => Err(refuse(
            "LIMIT/OFFSET across shards needs an integer literal or a parameter",
            "write LIMIT 10 or LIMIT $1",
        )),
    }
}

fn parse_expr(text: &str) -> Result<Expr, ProxyError> {
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(text)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| ProxyError::error("XX000", format!("internal rewrite failed: {e}")))
}

fn number(n: u64) -> Expr {
    Expr::value(Value::Number(n.to_string(), false))
}

/// LIMIT/OFFSET of a query: (limit, offset) and the clause each shard gets.
/// (limit, offset, the LIMIT clause each shard gets)
type Limits = (Option<Count>, Option<Count>, Option<LimitClause>);

fn limits(q: &Query) -> Result<Limits, ProxyError> {
    if q.fetch.is_some() {
        return Err(refuse(
            "FETCH FIRST across shards is not supported",
            "write LIMIT n instead of FETCH FIRST n ROWS",
        ));
    }
    let Some(clause) = &q.limit_clause else {
        return Ok((None, None, None));
    };
    let (limit, offset) = match clause {
        LimitClause::LimitOffset {
            limit,
            offset,
            limit_by,
        } if limit_by.is_empty() => (limit.clone(), offset.as_ref().map(|o| o.value.clone())),
        _ => return Err(refuse("unsupported LIMIT syntax", "write LIMIT n OFFSET m")),
    };
    // LIMIT ALL / LIMIT NULL mean no limit.
    let limit = limit.filter(|e| !matches!(e, Expr::Value(v) if v.value == Value::Null));
    let lc = limit.as_ref().map(count_of).transpose()?;
    let oc = offset.as_ref().map(count_of).transpose()?;
    let shard_limit = match (&limit, lc, oc) {
        (None, _, _) => None,
        (Some(_), Some(Count::Literal(l)), None) => Some(number(l)),
        (Some(_), Some(Count::Literal(l)), Some(Count::Literal(o))) => {
            Some(number(l.saturating_add(o)))
        }
        (Some(l), _, None) => Some(l.clone()),
        (Some(l), _, Some(_)) => {
            let o = offset.as_ref().map(|e| e.to_string()).unwrap_or_default();
            Some(parse_expr(&format!("({l})::int8 + ({o})::int8"))?)
        }
    };
    let clause = shard_limit.map(|l| LimitClause::LimitOffset {
        limit: Some(l),
        offset: None,
        limit_by: Vec::new(),
    });
    Ok((lc, oc, clause))
}

fn plan_query(mut q: Query, tables: &Tables) -> Result<Plan, ProxyError> {
    if let Some(with) = &q.with {
        if with.recursive {
            return Err(refuse(
                "WITH RECURSIVE over several shards is not supported",
                "run it on one shard with a routing hint, or restrict it by the sharding key",
            ));
        }
        for cte in &with.cte_tables {
            if tables.touches_sharded(&cte.query) && !plain_subquery(&cte.query) {
                return Err(refuse(
                    "a WITH query over a sharded table that aggregates, groups, sorts with LIMIT or uses DISTINCT cannot be computed per shard",
                    "move the aggregation to the outer query, or restrict the query to one shard by its sharding key",
                ));
            }
        }
    }
    if !q.locks.is_empty() && q.limit_clause.is_some() {
        return Err(refuse(
            "SELECT … FOR UPDATE with LIMIT across shards would lock rows on every shard",
            "restrict the query by the sharding key",
        ));
    }
    let select = match q.body.as_mut() {
        SetExpr::Select(s) => s.as_mut().clone(),
        _ => return Err(refuse(
            "UNION / INTERSECT / EXCEPT / VALUES over several shards is not supported",
            "run each branch separately, or restrict each branch to one shard by its sharding key",
        )),
    };
    if select.into.is_some() {
        return Err(refuse(
            "SELECT INTO across shards is not supported",
            "use CREATE TABLE … AS on one shard, or INSERT … SELECT per shard",
        ));
    }
    // Subqueries and derived tables.
    for twj in &select.from {
        let factors = std::iter::once(&twj.relation).chain(twj.joins.iter().map(|j| &j.relation));
        for f in factors {
            if let TableFactor::Derived { subquery, .. } = f {
                if tables.touches_sharded(subquery.as_ref()) && !plain_subquery(subquery) {
                    return Err(refuse(
                        "a subquery in FROM over a sharded table that aggregates, groups, uses DISTINCT or LIMIT cannot be computed per shard",
                        "move the aggregation to the outer query, or restrict the subquery to one shard by its sharding key",
                    ));
                }
            }
        }
    }
    let mut scan = Scan::default();
    for item in &select.projection {
        let _ = item.visit(&mut scan);
    }
    let _ = select.having.visit(&mut scan);
    if let Some(ob) = &q.order_by {
        let _ = ob.visit(&mut scan);
    }
    let mut where_scan = Scan::default();
    let _ = select.selection.visit(&mut where_scan);
    if scan.window {
        return Err(refuse(
            "window functions over rows of several shards are not supported",
            "restrict the query to one shard by its sharding key, or compute the window in the application",
        ));
    }
    if let Some(name) = scan.refused_agg {
        return Err(refuse(
            format!("aggregate {name}() cannot be merged exactly across shards"),
            "restrict the query to one shard by its sharding key, or compute it from count/sum/min/max (e.g. sum(x*x) for a variance)",
        ));
    }
    if (scan.subquery || where_scan.subquery) && has_sharded_subquery(&select, &q, tables) {
        return Err(refuse(
            "subqueries over sharded tables in a query that runs on several shards are not supported",
            "rewrite the subquery as a join on the sharding key, or restrict the query to one shard",
        ));
    }
    let group_exprs = match &select.group_by {
        GroupByExpr::Expressions(v, m) if m.is_empty() => v.clone(),
        _ => {
            return Err(refuse(
                "GROUP BY ALL / ROLLUP / CUBE / GROUPING SETS across shards are not supported",
                "group by plain expressions",
            ))
        }
    };
    if group_exprs
        .iter()
        .any(|e| matches!(e, Expr::Rollup(_) | Expr::Cube(_) | Expr::GroupingSets(_)))
    {
        return Err(refuse(
            "ROLLUP / CUBE / GROUPING SETS across shards are not supported",
            "group by plain expressions and compute the subtotals in the application",
        ));
    }
    let aggregating = !scan.aggs.is_empty() || !group_exprs.is_empty() || select.having.is_some();
    if aggregating && !groups_by_shard_key(&select, &group_exprs, tables) {
        return plan_aggregate(q, select, group_exprs, scan.aggs)
            .map(|p| Plan::Aggregate(Box::new(p)));
    }
    plan_select(q, select).map(Plan::Select)
}

/// Whether the statement has a subquery over sharded tables that is not
/// provably co-located with the rows of `outer` (see [`super::colocated`]).
fn uncolocated_subquery<V: Visit>(node: &V, outer: &Scope, tables: &Tables) -> bool {
    struct Sub<'a> {
        tables: &'a Tables,
        outer: &'a Scope,
        found: bool,
    }
    impl Visitor for Sub<'_> {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            let q = match expr {
                Expr::Subquery(q) | Expr::Exists { subquery: q, .. } => Some(q),
                Expr::In {
                    target: ast::InTarget::Subquery(subquery),
                    ..
                } => Some(subquery),
                _ => None,
            };
            if let Some(q) = q {
                if self.tables.touches_sharded(q.as_ref())
                    && !colocated(expr, self.outer, self.tables)
                {
                    self.found = true;
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut v = Sub {
        tables,
        outer,
        found: false,
    };
    let _ = node.visit(&mut v);
    v.found
}

fn has_sharded_subquery(select: &Select, q: &Query, tables: &Tables) -> bool {
    let outer = Scope::of_from(&select.from, tables);
    uncolocated_subquery(select, &outer, tables)
        || q.order_by
            .as_ref()
            .is_some_and(|ob| uncolocated_subquery(ob, &outer, tables))
}

/// True when a GROUP BY expression is the sharding key of a sharded table in
/// FROM: every group then lives on one shard and passes through unmerged.
fn groups_by_shard_key(select: &Select, groups: &[Expr], tables: &Tables) -> bool {
    let mut in_from: Vec<(String, Option<String>, String)> = Vec::new(); // (table, alias, key)
    for twj in &select.from {
        let factors = std::iter::once(&twj.relation).chain(twj.joins.iter().map(|j| &j.relation));
        for f in factors {
            if let TableFactor::Table { name, alias, .. } = f {
                if let Some(ast::ObjectNamePart::Identifier(i)) = name.0.last() {
                    let t = ident_name(i);
                    if let Some((key, _)) = tables.sharded.get(&t) {
                        in_from.push((t, alias.as_ref().map(|a| ident_name(&a.name)), key.clone()));
                    }
                }
            }
        }
    }
    let relations = select.from.iter().map(|t| 1 + t.joins.len()).sum::<usize>();
    groups.iter().any(|g| match g {
        Expr::Identifier(i) => {
            relations == 1 && in_from.len() == 1 && in_from[0].2 == ident_name(i)
        }
        Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
            let col = ident_name(&parts[parts.len() - 1]);
            let qual = ident_name(&parts[parts.len() - 2]);
            in_from.iter().any(|(t, alias, key)| {
                *key == col
                    && (alias.as_deref() == Some(qual.as_str()) || (alias.is_none() && *t == qual))
            })
        }
        _ => false,
    })
}

fn item_expr(item: &SelectItem) -> Option<(&Expr, Option<&Ident>)> {
    match item {
        SelectItem::UnnamedExpr(e) => Some((e, None)),
        SelectItem::ExprWithAlias { expr, alias } => Some((expr, Some(alias))),
        _ => None,
    }
}

/// Output column for an ORDER BY / DISTINCT ON expression, if it is one of
/// the visible columns at a position known before the shard answers.
fn resolve_output(expr: &Expr, projection: &[SelectItem]) -> Option<usize> {
    if let Expr::Value(v) = expr {
        if let Value::Number(n, _) = &v.value {
            return n.parse::<usize>().ok().and_then(|n| n.checked_sub(1));
        }
    }
    for (i, item) in projection.iter().enumerate() {
        let (e, alias) = item_expr(item)?;
        if e == expr {
            return Some(i);
        }
        if let (Expr::Identifier(id), Some(alias)) = (expr, alias) {
            if ident_name(id) == ident_name(alias) {
                return Some(i);
            }
        }
    }
    None
}

/// The expression an alias stands for (ORDER BY alias with a wildcard before it).
fn alias_expr<'a>(expr: &Expr, projection: &'a [SelectItem]) -> Option<&'a Expr> {
    let Expr::Identifier(id) = expr else {
        return None;
    };
    projection.iter().find_map(|item| match item {
        SelectItem::ExprWithAlias { expr, alias } if ident_name(alias) == ident_name(id) => {
            Some(expr)
        }
        _ => None,
    })
}

fn strip_collate(expr: &Expr) -> (&Expr, bool) {
    match expr {
        Expr::Collate { expr, collation } => {
            let name = collation
                .0
                .last()
                .map(|p| match p {
                    ast::ObjectNamePart::Identifier(i) => i.value.clone(),
                    _ => String::new(),
                })
                .unwrap_or_default();
            (expr, name == "C" || name == "POSIX" || name == "ucs_basic")
        }
        _ => (expr, false),
    }
}

fn plan_select(mut q: Query, mut select: Select) -> Result<SelectPlan, ProxyError> {
    let projection = select.projection.clone();
    let mut hidden: Vec<SelectItem> = Vec::new();
    let col_for = |expr: &Expr, hidden: &mut Vec<SelectItem>| -> Col {
        if let Some(i) = resolve_output(expr, &projection) {
            return Col::Output(i);
        }
        let e = alias_expr(expr, &projection).unwrap_or(expr).clone();
        let n = hidden.len();
        hidden.push(SelectItem::ExprWithAlias {
            expr: e,
            alias: Ident::new(format!("__sg_h{n}")),
        });
        Col::Hidden(n)
    };
    let mut sort = Vec::new();
    if let Some(ob) = &q.order_by {
        let OrderByKind::Expressions(exprs) = &ob.kind else {
            return Err(refuse(
                "ORDER BY ALL is not supported",
                "list the sort keys",
            ));
        };
        for o in exprs {
            let desc = match &o.options.sort {
                None | Some(ast::OrderBySort::Asc) => false,
                Some(ast::OrderBySort::Desc) => true,
                Some(ast::OrderBySort::Using(_)) => {
                    return Err(refuse(
                        "ORDER BY … USING across shards is not supported",
                        "use ASC or DESC",
                    ))
                }
            };
            let (expr, collate_c) = strip_collate(&o.expr);
            let col = if collate_c {
                // Sort by the collated expression itself (a hidden column).
                let n = hidden.len();
                hidden.push(SelectItem::ExprWithAlias {
                    expr: o.expr.clone(),
                    alias: Ident::new(format!("__sg_h{n}")),
                });
                Col::Hidden(n)
            } else {
                col_for(expr, &mut hidden)
            };
            sort.push(SortKey {
                col,
                desc,
                nulls_first: o.options.nulls_first.unwrap_or(desc),
                collate_c,
            });
        }
    }
    let distinct = match &select.distinct {
        None | Some(Distinct::All) => DistinctKind::None,
        Some(Distinct::Distinct) => DistinctKind::All,
        Some(Distinct::On(exprs)) => {
            DistinctKind::On(exprs.iter().map(|e| col_for(e, &mut hidden)).collect())
        }
    };
    let (limit, offset, shard_limit) = limits(&q)?;
    let n_hidden = hidden.len();
    select.projection.extend(hidden);
    *q.body = SetExpr::Select(Box::new(select));
    q.limit_clause = shard_limit;
    Ok(SelectPlan {
        shard_sql: q.to_string(),
        hidden: n_hidden,
        sort,
        distinct,
        limit,
        offset,
    })
}

/// Replaces group expressions and aggregate calls with placeholders
/// (`__sg_g<i>`, `__sg_x<j>`), top-down so an aggregate's arguments are
/// never rewritten.
struct Placeholders<'a> {
    groups: &'a [Expr],
    aggs: &'a [Expr],
}

impl VisitorMut for Placeholders<'_> {
    type Break = ();
    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        if let Some(i) = self.groups.iter().position(|g| g == expr) {
            *expr = Expr::Identifier(Ident::new(format!("__sg_g{i}")));
        } else if let Some(j) = self.aggs.iter().position(|a| a == expr) {
            *expr = Expr::Identifier(Ident::new(format!("__sg_x{j}")));
        }
        ControlFlow::Continue(())
    }
}

/// Column references left after placeholders: they are neither grouped nor aggregated.
fn leftover_columns<V: Visit>(node: &V, aliases: &[String]) -> Option<String> {
    struct Left<'a> {
        aliases: &'a [String],
        found: Option<String>,
    }
    impl Visitor for Left<'_> {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            match expr {
                Expr::Identifier(i)
                    if !i.value.starts_with("__sg_") && !self.aliases.contains(&ident_name(i)) =>
                {
                    self.found = Some(i.value.clone());
                    ControlFlow::Break(())
                }
                Expr::CompoundIdentifier(parts) => {
                    self.found = Some(
                        parts
                            .iter()
                            .map(|p| p.value.as_str())
                            .collect::<Vec<_>>()
                            .join("."),
                    );
                    ControlFlow::Break(())
                }
                _ => ControlFlow::Continue(()),
            }
        }
    }
    let mut l = Left {
        aliases,
        found: None,
    };
    let _ = node.visit(&mut l);
    l.found
}

/// The column name Postgres gives an unaliased select-list expression
/// (FigureColname), so merged results keep the names clients expect.
pub fn figure_colname(expr: &Expr) -> String {
    fn inner(expr: &Expr) -> Option<String> {
        match expr {
            Expr::Identifier(i) => Some(ident_name(i)),
            Expr::CompoundIdentifier(p) => p.last().map(ident_name),
            Expr::Function(f) => Some(fn_name(f)),
            Expr::Nested(e) | Expr::Collate { expr: e, .. } => inner(e),
            Expr::Cast {
                expr, data_type, ..
            } => inner(expr).or_else(|| Some(type_colname(data_type))),
            Expr::Case { .. } => Some("case".into()),
            Expr::Exists { .. } => Some("exists".into()),
            Expr::Array(_) => Some("array".into()),
            Expr::Extract { .. } => Some("extract".into()),
            Expr::Substring { .. } => Some("substring".into()),
            Expr::Position { .. } => Some("position".into()),
            Expr::Trim { .. } => Some("btrim".into()),
            Expr::Ceil { .. } => Some("ceil".into()),
            Expr::Floor { .. } => Some("floor".into()),
            Expr::Overlay { .. } => Some("overlay".into()),
            Expr::Subquery(q) => match q.body.as_ref() {
                SetExpr::Select(s) => s.projection.first().and_then(|i| match i {
                    SelectItem::ExprWithAlias { alias, .. } => Some(ident_name(alias)),
                    SelectItem::UnnamedExpr(e) => inner(e),
                    _ => None,
                }),
                _ => None,
            },
            _ => None,
        }
    }
    inner(expr).unwrap_or_else(|| "?column?".into())
}

fn type_colname(t: &ast::DataType) -> String {
    let text = t.to_string().to_lowercase();
    let base = text.split('(').next().unwrap_or("").trim().to_string();
    match base.as_str() {
        "int" | "integer" | "int4" => "int4",
        "bigint" | "int8" => "int8",
        "smallint" | "int2" => "int2",
        "real" | "float4" => "float4",
        "double precision" | "float8" | "float" => "float8",
        "boolean" | "bool" => "bool",
        "decimal" | "numeric" => "numeric",
        "character varying" | "varchar" => "varchar",
        "character" | "char" | "bpchar" => "bpchar",
        "timestamp" | "timestamp without time zone" => "timestamp",
        "timestamptz" | "timestamp with time zone" => "timestamptz",
        other => return other.to_string(),
    }
    .to_string()
}

fn col_ident(prefix: &str, i: usize) -> Expr {
    Expr::CompoundIdentifier(vec![Ident::new("m"), Ident::new(format!("{prefix}{i}"))])
}

fn plan_aggregate(
    q: Query,
    select: Select,
    mut groups: Vec<Expr>,
    aggs: Vec<Expr>,
) -> Result<AggPlan, ProxyError> {
    if select.projection.iter().any(|i| {
        matches!(
            i,
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
        )
    }) {
        return Err(refuse(
            "SELECT * with GROUP BY or aggregates across shards is not supported",
            "list the grouped columns explicitly",
        ));
    }
    // GROUP BY 2 / GROUP BY alias → the select-list expression.
    for g in groups.iter_mut() {
        if let Expr::Value(v) = &*g {
            if let Value::Number(n, _) = &v.value {
                let idx = n.parse::<usize>().ok().and_then(|n| n.checked_sub(1));
                match idx
                    .and_then(|i| select.projection.get(i))
                    .and_then(item_expr)
                {
                    Some((e, _)) => *g = e.clone(),
                    None => {
                        return Err(ProxyError::error(
                            "42P10",
                            format!("GROUP BY position {n} is not in select list"),
                        ))
                    }
                }
                continue;
            }
        }
        if let Some(e) = alias_expr(g, &select.projection) {
            *g = e.clone();
        }
    }
    // DISTINCT aggregates: pushed down as one more group column.
    let mut distinct_arg: Option<Expr> = None;
    let mut partial_exprs: Vec<Expr> = Vec::new();
    let mut combines = Vec::new();
    let push_partial = |f: &Function, name: &str, partials: &mut Vec<Expr>| -> usize {
        let mut f = f.clone();
        f.name = ObjectName::from(vec![Ident::new(name)]);
        partials.push(Expr::Function(f));
        partials.len() - 1
    };
    for a in &aggs {
        let Some(f) = is_agg_call(a) else { continue };
        let name = fn_name(f);
        let list = args_of(f);
        if list.is_some_and(|l| !l.clauses.is_empty()) {
            return Err(refuse(
                format!("{name}() with ORDER BY inside the call cannot be merged across shards"),
                "drop the ORDER BY inside the aggregate, or restrict the query to one shard",
            ));
        }
        let is_distinct = list.is_some_and(|l| {
            matches!(
                l.duplicate_treatment,
                Some(ast::DuplicateTreatment::Distinct)
            )
        });
        let args = expr_args(f);
        if is_distinct {
            let Some(Some(arg)) = args.first() else {
                return Err(refuse("unsupported DISTINCT aggregate", "use one argument"));
            };
            if f.filter.is_some() {
                return Err(refuse(
                    format!("{name}(DISTINCT …) FILTER (…) across shards is not supported"),
                    "move the condition into the argument: count(DISTINCT CASE WHEN cond THEN x END)",
                ));
            }
            match &distinct_arg {
                None => distinct_arg = Some(arg.clone()),
                Some(d) if d == arg => {}
                Some(_) => {
                    return Err(refuse(
                        "DISTINCT aggregates over different expressions in one query cannot be merged across shards",
                        "use one DISTINCT argument per query (split the query)",
                    ))
                }
            }
            let mut fin = f.clone();
            if let FunctionArguments::List(l) = &mut fin.args {
                if let Some(first) = l.args.first_mut() {
                    *first = FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::CompoundIdentifier(
                        vec![Ident::new("m"), Ident::new("d0")],
                    )));
                }
            }
            combines.push(Combine::OverDistinct(Box::new(Expr::Function(fin))));
            continue;
        }
        let combine =
            match name.as_str() {
                "count" => Combine::Count(push_partial(f, "count", &mut partial_exprs)),
                "sum" => Combine::Sum(push_partial(f, "sum", &mut partial_exprs)),
                "min" | "max" | "bool_and" | "bool_or" | "bit_and" | "bit_or" | "bit_xor" => {
                    let i = push_partial(f, &name, &mut partial_exprs);
                    Combine::Same(name.clone(), i)
                }
                "every" => Combine::Same(
                    "bool_and".into(),
                    push_partial(f, "bool_and", &mut partial_exprs),
                ),
                "avg" => {
                    let sum = push_partial(f, "sum", &mut partial_exprs);
                    let count = push_partial(f, "count", &mut partial_exprs);
                    Combine::Avg { sum, count }
                }
                "string_agg" => match args.get(1) {
                    Some(Some(sep @ Expr::Value(_))) => Combine::StringAgg {
                        col: push_partial(f, "string_agg", &mut partial_exprs),
                        sep: Box::new(sep.clone()),
                    },
                    _ => return Err(refuse(
                        "string_agg() with a non-constant separator cannot be merged across shards",
                        "use a literal separator",
                    )),
                },
                other => {
                    return Err(refuse(
                        format!("aggregate {other}() cannot be merged across shards"),
                        "restrict the query to one shard",
                    ))
                }
            };
        combines.push(combine);
    }

    // Shard statement: SELECT g.., [d0], a.. FROM … WHERE … GROUP BY 1..k(+1)
    let mut shard_select = select.clone();
    let mut proj = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        proj.push(SelectItem::ExprWithAlias {
            expr: g.clone(),
            alias: Ident::new(format!("g{i}")),
        });
    }
    if let Some(d) = &distinct_arg {
        proj.push(SelectItem::ExprWithAlias {
            expr: d.clone(),
            alias: Ident::new("d0"),
        });
    }
    for (i, p) in partial_exprs.iter().enumerate() {
        proj.push(SelectItem::ExprWithAlias {
            expr: p.clone(),
            alias: Ident::new(format!("a{i}")),
        });
    }
    let key_count = groups.len() + usize::from(distinct_arg.is_some());
    if proj.is_empty() {
        // `SELECT 1 FROM t HAVING true`: one partial so every shard answers a row.
        let count = parse_expr("count(*)")?;
        partial_exprs.push(count.clone());
        proj.push(SelectItem::ExprWithAlias {
            expr: count,
            alias: Ident::new("a0"),
        });
    }
    shard_select.projection = proj;
    shard_select.distinct = None;
    shard_select.having = None;
    shard_select.group_by =
        GroupByExpr::Expressions((1..=key_count as u64).map(number).collect(), Vec::new());
    let mut shard_q = q.clone();
    *shard_q.body = SetExpr::Select(Box::new(shard_select));
    shard_q.order_by = None;
    shard_q.limit_clause = None;
    shard_q.fetch = None;

    // Final statement over the merged groups.
    let mut fin = select;
    let mut final_q = q;
    let aliases: Vec<String> = fin
        .projection
        .iter()
        .filter_map(|i| match i {
            SelectItem::ExprWithAlias { alias, .. } => Some(ident_name(alias)),
            _ => None,
        })
        .collect();
    let mut ph = Placeholders {
        groups: &groups,
        aggs: &aggs,
    };
    let mut items = Vec::new();
    for item in fin.projection.drain(..) {
        let (mut expr, alias) = match item {
            SelectItem::UnnamedExpr(e) => {
                let name = figure_colname(&e);
                (e, Ident::with_quote('"', name))
            }
            SelectItem::ExprWithAlias { expr, alias } => (expr, alias),
            _ => {
                return Err(refuse(
                    "unsupported select item with aggregates",
                    "list expressions",
                ))
            }
        };
        let _ = VisitMut::visit(&mut expr, &mut ph);
        if let Some(col) = leftover_columns(&expr, &[]) {
            return Err(refuse(
                format!("column \"{col}\" is neither grouped nor aggregated in a query that runs on several shards"),
                "add it to GROUP BY exactly as written in the select list, or wrap it in an aggregate",
            ));
        }
        items.push(SelectItem::ExprWithAlias { expr, alias });
    }
    fin.projection = items;
    if let Some(h) = fin.having.as_mut() {
        let _ = VisitMut::visit(h, &mut ph);
        if let Some(col) = leftover_columns(&*h, &[]) {
            return Err(refuse(
                format!(
                    "HAVING refers to column \"{col}\", which is neither grouped nor aggregated"
                ),
                "use an aggregate or a GROUP BY expression",
            ));
        }
    }
    if let Some(Distinct::On(exprs)) = fin.distinct.as_mut() {
        for e in exprs.iter_mut() {
            let _ = VisitMut::visit(e, &mut ph);
        }
    }
    if let Some(ob) = final_q.order_by.as_mut() {
        let _ = VisitMut::visit(ob, &mut ph);
        if let Some(col) = leftover_columns(&*ob, &aliases) {
            return Err(refuse(
                format!(
                    "ORDER BY refers to column \"{col}\", which is neither grouped nor aggregated"
                ),
                "order by a select-list column, its alias or position",
            ));
        }
    }
    fin.group_by = GroupByExpr::Expressions(
        (0..groups.len()).map(|i| col_ident("g", i)).collect(),
        Vec::new(),
    );
    fin.from = Vec::new();
    fin.selection = None;
    *final_q.body = SetExpr::Select(Box::new(fin));
    final_q.with = None;
    let _ = ph;
    Ok(AggPlan {
        shard_params: referenced_params(&shard_q),
        final_params: referenced_params(&final_q),
        shard_sql: shard_q.to_string(),
        groups: groups.len(),
        distinct_col: distinct_arg.is_some(),
        partials: partial_exprs.len(),
        combines,
        final_select: Box::new(final_q),
    })
}

impl AggPlan {
    /// For each output column of the final statement: the grouping column
    /// it is, when it is exactly one (its table OID and column number are
    /// then the shards' description of it, as one Postgres would report).
    pub fn output_groups(&self) -> Vec<Option<usize>> {
        let SetExpr::Select(select) = self.final_select.body.as_ref() else {
            return Vec::new();
        };
        let group_of = |e: &Expr| match e {
            Expr::Identifier(i) => i
                .value
                .strip_prefix("__sg_g")
                .and_then(|n| n.parse::<usize>().ok()),
            _ => None,
        };
        select
            .projection
            .iter()
            .map(|item| match item {
                SelectItem::UnnamedExpr(e) => group_of(e),
                SelectItem::ExprWithAlias { expr, .. } => group_of(expr),
                _ => None,
            })
            .collect()
    }
}

/// Replaces the placeholders of the final statement with `m.g<i>` and the
/// combine expressions (built once the partial column types are known).
pub struct Finalize<'a> {
    pub combines: &'a [Expr],
}

impl VisitorMut for Finalize<'_> {
    type Break = ();
    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        if let Expr::Identifier(i) = expr {
            if let Some(n) = i
                .value
                .strip_prefix("__sg_g")
                .and_then(|n| n.parse::<usize>().ok())
            {
                *expr = col_ident("g", n);
            } else if let Some(n) = i
                .value
                .strip_prefix("__sg_x")
                .and_then(|n| n.parse::<usize>().ok())
            {
                if let Some(c) = self.combines.get(n) {
                    *expr = Expr::Nested(Box::new(c.clone()));
                }
            }
        }
        ControlFlow::Continue(())
    }
}

/// Builds the SQL of the final statement: the template with placeholders
/// resolved, reading the merged rows from `unnest` of text arrays cast to
/// the shard column types.
pub fn final_sql(
    plan: &AggPlan,
    combine_sql: &[String],
    from_sql: &str,
) -> Result<String, ProxyError> {
    let combines = combine_sql
        .iter()
        .map(|s| parse_expr(s))
        .collect::<Result<Vec<_>, _>>()?;
    let mut q = plan.final_select.as_ref().clone();
    let _ = VisitMut::visit(
        &mut q,
        &mut Finalize {
            combines: &combines,
        },
    );
    let from = Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&format!("SELECT 1 FROM ({from_sql}) AS m"))
        .and_then(|mut p| p.parse_query())
        .map_err(|e| ProxyError::error("XX000", format!("internal rewrite failed: {e}")))?;
    if let (SetExpr::Select(target), SetExpr::Select(src)) = (q.body.as_mut(), from.body.as_ref()) {
        target.from = src.from.clone();
    }
    Ok(q.to_string())
}

/// Parameters (1-based) a statement references.
pub fn referenced_params<V: Visit>(node: &V) -> Vec<usize> {
    struct P(Vec<usize>);
    impl Visitor for P {
        type Break = ();
        fn pre_visit_value(&mut self, v: &ast::ValueWithSpan) -> ControlFlow<()> {
            if let Value::Placeholder(p) = &v.value {
                if let Some(n) = p
                    .strip_prefix('$')
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|n| *n >= 1)
                {
                    if !self.0.contains(&n) {
                        self.0.push(n);
                    }
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut p = P(Vec::new());
    let _ = node.visit(&mut p);
    p.0
}

/// Renumbers `$n` placeholders with `map` (old → new, 1-based).
pub fn renumber_params<V: VisitMut>(node: &mut V, map: &HashMap<usize, usize>) {
    struct R<'a>(&'a HashMap<usize, usize>);
    impl VisitorMut for R<'_> {
        type Break = ();
        fn pre_visit_value(&mut self, v: &mut ast::ValueWithSpan) -> ControlFlow<()> {
            if let Value::Placeholder(p) = &v.value {
                if let Some(n) = p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
                    if let Some(new) = self.0.get(&n) {
                        v.value = Value::Placeholder(format!("${new}"));
                    }
                }
            }
            ControlFlow::Continue(())
        }
    }
    let _ = VisitMut::visit(node, &mut R(map));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables() -> Tables {
        let mut t = Tables::default();
        t.sharded.insert("t".into(), ("id".into(), "f".into()));
        t.sharded.insert("u".into(), ("uid".into(), "f".into()));
        t.sharded.insert("v".into(), ("vid".into(), "g".into()));
        t
    }

    fn select(sql: &str) -> SelectPlan {
        match plan(sql, &tables()) {
            Plan::Select(p) => p,
            other => panic!("{sql}: {other:?}"),
        }
    }

    fn agg(sql: &str) -> AggPlan {
        match plan(sql, &tables()) {
            Plan::Aggregate(p) => *p,
            other => panic!("{sql}: {other:?}"),
        }
    }

    fn refused(sql: &str) -> ProxyError {
        match plan(sql, &tables()) {
            Plan::Refused(e) => e,
            other => panic!("{sql}: {other:?}"),
        }
    }

    #[test]
    fn hidden_sort_columns_and_limits() {
        let p = select("SELECT a FROM t ORDER BY b DESC, 1 LIMIT 5 OFFSET 2");
        assert_eq!(
            p.shard_sql,
            "SELECT a, b AS __sg_h0 FROM t ORDER BY b DESC, 1 LIMIT 7"
        );
        assert_eq!(p.hidden, 1);
        assert_eq!(
            p.sort[0],
            SortKey {
                col: Col::Hidden(0),
                desc: true,
                nulls_first: true,
                collate_c: false
            }
        );
        assert_eq!(p.sort[1].col, Col::Output(0));
        assert_eq!(
            (p.limit, p.offset),
            (Some(Count::Literal(5)), Some(Count::Literal(2)))
        );
        let p = select("SELECT a AS x FROM t ORDER BY x LIMIT $1 OFFSET $2");
        assert_eq!(p.hidden, 0);
        assert!(
            p.shard_sql.ends_with("LIMIT ($1)::INT8 + ($2)::INT8"),
            "{}",
            p.shard_sql
        );
        let p = select("SELECT id, count(*) FROM t GROUP BY id ORDER BY count(*)");
        assert_eq!(p.sort[0].col, Col::Output(1));
    }

    #[test]
    fn aggregates_become_partials() {
        let p = agg("SELECT a, avg(b), count(*) FROM t GROUP BY a HAVING max(c) > 1 ORDER BY 2");
        assert_eq!(
            p.shard_sql,
            "SELECT a AS g0, sum(b) AS a0, count(b) AS a1, count(*) AS a2, max(c) AS a3 FROM t GROUP BY 1"
        );
        let sql = final_sql(&p, &["x0".into(), "x1".into(), "x2".into()], "SELECT 1").unwrap();
        assert_eq!(
            sql,
            "SELECT m.g0 AS \"a\", (x0) AS \"avg\", (x1) AS \"count\" FROM (SELECT 1) AS m GROUP BY m.g0 HAVING (x2) > 1 ORDER BY 2"
        );
        let p = agg("SELECT count(DISTINCT b), sum(c) FROM t");
        assert_eq!(
            p.shard_sql,
            "SELECT b AS d0, sum(c) AS a0 FROM t GROUP BY 1"
        );
    }

    #[test]
    fn colocated_subqueries_run_per_shard() {
        for sql in [
            "SELECT * FROM t WHERE id IN (SELECT uid FROM u WHERE x > 1)",
            "SELECT * FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.uid = t.id AND u.x > 0)",
            "SELECT * FROM t a WHERE NOT EXISTS (SELECT 1 FROM u WHERE a.id = uid)",
            "SELECT t.id, (SELECT count(*) FROM u WHERE u.uid = t.id) FROM t ORDER BY 2",
        ] {
            select(sql);
        }
        for sql in [
            "SELECT * FROM t WHERE id NOT IN (SELECT uid FROM u)",
            "SELECT * FROM t WHERE id IN (SELECT uid FROM u LIMIT 3)",
            "SELECT * FROM t WHERE id IN (SELECT x FROM u)",
            "SELECT * FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.x = t.id)",
            "SELECT * FROM t WHERE EXISTS (SELECT 1 FROM v WHERE v.vid = t.id)",
            "SELECT * FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.uid = id)",
            "SELECT * FROM t WHERE EXISTS (SELECT 1 FROM u t WHERE t.uid = t.id)",
        ] {
            assert_eq!(refused(sql).code, "0A000", "{sql}");
        }
        assert!(matches!(
            plan(
                "UPDATE t SET a = 1 WHERE EXISTS (SELECT 1 FROM u WHERE u.uid = t.id)",
                &tables()
            ),
            Plan::Passthrough
        ));
        assert!(matches!(
            plan(
                "UPDATE t SET a = 1 WHERE id IN (SELECT x FROM u)",
                &tables()
            ),
            Plan::Refused(_)
        ));
    }

    #[test]
    fn aggregates_of_the_database_are_refused() {
        let mut t = tables();
        t.other_aggregates.insert("my_sum".into());
        assert!(matches!(
            plan("SELECT my_sum(a) FROM t", &t),
            Plan::Refused(_)
        ));
        assert!(matches!(
            plan("SELECT my_sum(a) OVER () FROM t", &t),
            Plan::Refused(_)
        ));
        assert!(matches!(
            plan("SELECT lower(s) FROM t", &t),
            Plan::Select(_)
        ));
    }

    #[test]
    fn refusals_say_why() {
        assert!(refused("SELECT stddev(a) FROM t")
            .message
            .contains("stddev"));
        assert!(refused("SELECT a, rank() OVER (ORDER BY a) FROM t")
            .message
            .contains("window"));
        assert!(refused("SELECT b, count(*) FROM t GROUP BY a")
            .message
            .contains("\"b\""));
        assert!(refused("SELECT a FROM t UNION SELECT a FROM u")
            .message
            .contains("UNION"));
        assert!(refused("SELECT * FROM t WHERE a IN (SELECT b FROM u)")
            .message
            .contains("subquer"));
        assert_eq!(
            refused("SELECT string_agg(a, ',' ORDER BY a) FROM t").code,
            "0A000"
        );
    }
}
