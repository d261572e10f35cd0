//! Unique constraints that the shards cannot enforce.
//!
//! Each shard checks a `UNIQUE`/`PRIMARY KEY`/`EXCLUDE` constraint against its
//! own rows only. When the constrained columns include the sharding key, two
//! rows that collide always share a shard, so the check is as strong as one
//! Postgres's. Without the key, the same value can be stored once per shard
//! and the constraint silently stops holding. DDL through shardgate that
//! would create such a constraint on a sharded table is refused (Citus
//! refuses the same for its distributed tables).

use sqlparser::ast::{
    AlterTableOperation, ColumnDef, ColumnOption, CreateIndex, Expr, IndexColumn, Statement,
    TableConstraint,
};

use super::analyze::{lookup_table, norm};
use super::route::RouteError;
use super::shardmap::{ShardMap, TableRule};

/// Refuses `stmt` when it creates a uniqueness constraint on a sharded table
/// that does not include the table's sharding key.
pub fn check(map: &ShardMap, stmt: &Statement) -> Result<(), RouteError> {
    let (table, constraints) = match stmt {
        Statement::CreateTable(ct) => {
            let mut found = column_constraints(&ct.columns);
            found.extend(ct.constraints.iter().filter_map(table_constraint));
            (&ct.name, found)
        }
        Statement::CreateIndex(CreateIndex {
            table_name,
            columns,
            unique: true,
            ..
        }) => (table_name, vec![("UNIQUE index", column_names(columns))]),
        Statement::AlterTable(at) => {
            let mut found = Vec::new();
            for op in &at.operations {
                match op {
                    AlterTableOperation::AddConstraint { constraint, .. } => {
                        found.extend(table_constraint(constraint));
                    }
                    AlterTableOperation::AddColumn { column_def, .. } => {
                        found.extend(column_constraints(std::slice::from_ref(column_def)));
                    }
                    _ => {}
                }
            }
            (&at.name, found)
        }
        _ => return Ok(()),
    };
    if constraints.is_empty() {
        return Ok(());
    }
    let Some((name, TableRule::Sharded { key, .. })) = lookup_table(map, table) else {
        return Ok(());
    };
    for (what, columns) in constraints {
        if !columns.iter().any(|(name, _)| name.as_deref() == Some(key)) {
            let listed = if columns.is_empty() {
                String::new()
            } else {
                let shown: Vec<&str> = columns.iter().map(|(_, shown)| shown.as_str()).collect();
                format!("({}) ", shown.join(", "))
            };
            return Err(RouteError::Unsupported(format!(
                "a {what} on the sharded table {name} {listed}without its sharding key {key} \
                 could only be enforced per shard: equal values on different shards would all \
                 be accepted. Include {key} in it (e.g. UNIQUE ({key}, …)), or make {name} a \
                 replicated table"
            )));
        }
    }
    Ok(())
}

/// A constraint's kind and its columns: (plain column name, or `None` for
/// an expression; the text shown in errors).
type Found = (&'static str, Vec<(Option<String>, String)>);

fn table_constraint(c: &TableConstraint) -> Option<Found> {
    match c {
        TableConstraint::PrimaryKey(pk) => Some(("PRIMARY KEY", column_names(&pk.columns))),
        TableConstraint::Unique(u) => Some(("UNIQUE constraint", column_names(&u.columns))),
        // Which column an EXCLUDE compares with `=` is not read here.
        TableConstraint::Exclude(_) => Some(("EXCLUDE constraint", Vec::new())),
        _ => None,
    }
}

fn column_constraints(columns: &[ColumnDef]) -> Vec<Found> {
    let mut found = Vec::new();
    for column in columns {
        for option in &column.options {
            let what = match option.option {
                ColumnOption::PrimaryKey(_) => "PRIMARY KEY",
                ColumnOption::Unique(_) => "UNIQUE constraint",
                _ => continue,
            };
            let name = norm(&column.name);
            found.push((what, vec![(Some(name.clone()), name)]));
        }
    }
    found
}

fn column_names(columns: &[IndexColumn]) -> Vec<(Option<String>, String)> {
    columns
        .iter()
        .map(|c| match &c.column.expr {
            Expr::Identifier(id) => (Some(norm(id)), norm(id)),
            other => (None, other.to_string()),
        })
        .collect()
}
