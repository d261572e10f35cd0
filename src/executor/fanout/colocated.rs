//! Subqueries that are exact when each shard evaluates them on its own rows
//! ("provably co-located"), the only subqueries over sharded tables a
//! multi-shard statement may contain:
//!
//! - `outer_key IN (SELECT inner_key FROM inner_table …)` (not `NOT IN`: a
//!   NULL on another shard would change its result) with a plain subquery;
//! - `EXISTS` / `NOT EXISTS` / a scalar subquery over one sharded table whose
//!   WHERE has the conjunct `inner_key = outer.key`.
//!
//! In both, the outer and inner keys belong to tables sharded by the same
//! function, so every inner row the subquery can see for an outer row lives
//! on that outer row's shard.

use sqlparser::ast::{
    BinaryOperator, Expr, ObjectName, ObjectNamePart, SelectItem, SetExpr, TableFactor,
    TableWithJoins,
};

use super::plan::{plain_subquery, Tables};

/// A sharded table visible in a scope: name, alias, key column, function.
#[derive(Debug, Clone)]
struct Visible {
    name: String,
    alias: Option<String>,
    key: String,
    function: String,
}

/// The tables of one FROM list, as far as key references need.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    sharded: Vec<Visible>,
    relations: usize,
}

fn last_ident(name: &ObjectName) -> Option<String> {
    match name.0.last() {
        Some(ObjectNamePart::Identifier(i)) => Some(super::plan::ident_name(i)),
        _ => None,
    }
}

impl Scope {
    pub fn of_from(from: &[TableWithJoins], tables: &Tables) -> Scope {
        let mut scope = Scope::default();
        for twj in from {
            let factors =
                std::iter::once(&twj.relation).chain(twj.joins.iter().map(|j| &j.relation));
            for f in factors {
                scope.relations += 1;
                if let TableFactor::Table { name, alias, .. } = f {
                    let Some(t) = last_ident(name) else { continue };
                    if let Some((key, function)) = tables.sharded.get(&t) {
                        scope.sharded.push(Visible {
                            name: t,
                            alias: alias.as_ref().map(|a| super::plan::ident_name(&a.name)),
                            key: key.clone(),
                            function: function.clone(),
                        });
                    }
                }
            }
        }
        scope
    }

    fn qualifies(&self, qual: &str) -> bool {
        self.sharded
            .iter()
            .any(|v| v.alias.as_deref() == Some(qual) || (v.alias.is_none() && v.name == qual))
    }

    /// The sharding function of `e` if it is a reference to the key column
    /// of a sharded table of this scope. Unqualified names only count when
    /// `unqualified` and the scope has exactly one relation.
    fn key_ref(&self, e: &Expr, unqualified: bool) -> Option<&str> {
        match e {
            Expr::Nested(inner) => self.key_ref(inner, unqualified),
            Expr::Identifier(i) if unqualified && self.relations == 1 => {
                let col = super::plan::ident_name(i);
                self.sharded
                    .iter()
                    .find(|v| v.key == col)
                    .map(|v| v.function.as_str())
            }
            Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
                let col = super::plan::ident_name(&parts[parts.len() - 1]);
                let qual = super::plan::ident_name(&parts[parts.len() - 2]);
                self.sharded
                    .iter()
                    .find(|v| {
                        v.key == col
                            && (v.alias.as_deref() == Some(qual.as_str())
                                || (v.alias.is_none() && v.name == qual))
                    })
                    .map(|v| v.function.as_str())
            }
            _ => None,
        }
    }
}

/// The subquery's single sharded table as a scope, if it reads exactly one
/// table and contains no further subqueries.
fn single_table(
    q: &sqlparser::ast::Query,
    tables: &Tables,
) -> Option<(Scope, sqlparser::ast::Select)> {
    if q.with.is_some() {
        return None;
    }
    let SetExpr::Select(s) = q.body.as_ref() else {
        return None;
    };
    let scope = Scope::of_from(&s.from, tables);
    if scope.relations != 1 || scope.sharded.len() != 1 {
        return None;
    }
    if super::plan::contains_subquery(s.as_ref()) {
        return None;
    }
    Some((scope, s.as_ref().clone()))
}

fn conjuncts(e: &Expr) -> Vec<&Expr> {
    match e {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            let mut v = conjuncts(left);
            v.extend(conjuncts(right));
            v
        }
        Expr::Nested(inner) => conjuncts(inner),
        other => vec![other],
    }
}

/// Whether a subquery expression over sharded tables is exact per shard.
pub fn colocated(expr: &Expr, outer: &Scope, tables: &Tables) -> bool {
    match expr {
        Expr::In {
            expr: left,
            target: sqlparser::ast::InTarget::Subquery(q),
            negated: false,
            ..
        } => {
            let Some((inner, select)) = single_table(q, tables) else {
                return false;
            };
            if !plain_subquery(q) || select.projection.len() != 1 {
                return false;
            }
            let projected = match &select.projection[0] {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
                _ => return false,
            };
            match (inner.key_ref(projected, true), outer.key_ref(left, true)) {
                (Some(a), Some(b)) => a == b,
                _ => false,
            }
        }
        Expr::Exists { subquery: q, .. } | Expr::Subquery(q) => {
            let Some((inner, select)) = single_table(q, tables) else {
                return false;
            };
            let Some(selection) = &select.selection else {
                return false;
            };
            conjuncts(selection).into_iter().any(|c| {
                let Expr::BinaryOp {
                    left,
                    op: BinaryOperator::Eq,
                    right,
                } = c
                else {
                    return false;
                };
                let correlated = |i: &Expr, o: &Expr| -> bool {
                    // The outer side must be qualified by an outer table the
                    // inner scope does not shadow.
                    let shadowed = match o {
                        Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
                            inner.qualifies(&super::plan::ident_name(&parts[parts.len() - 2]))
                        }
                        _ => true,
                    };
                    match (inner.key_ref(i, true), outer.key_ref(o, false)) {
                        (Some(a), Some(b)) => !shadowed && a == b,
                        _ => false,
                    }
                };
                correlated(left, right) || correlated(right, left)
            })
        }
        _ => false,
    }
}
