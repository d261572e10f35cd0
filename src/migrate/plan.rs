//! What `up`/`down` will do: the ordered steps, each one atomic group run on
//! every participating shard, with the exact statements.

use super::graph::{Graph, Target};
use super::revision::{Revision, Scope, DEFAULT_TENANT_BATCH};
use super::statements::{self, Statement};
use super::{MigrateError, Result};

/// Which way a step goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Up,
    Down,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
}

/// One step: a revision applied or reverted on every participant, plus the
/// version rows it leaves behind.
#[derive(Debug, Clone)]
pub struct Step {
    pub revision: String,
    pub direction: Direction,
    /// The file the statements come from (for error messages).
    pub file: String,
    pub statements: Vec<Statement>,
    /// Checksum recorded in the history (of `up.sql`, also for `down`, so the
    /// ledger says which version of the revision was reverted).
    pub checksum: String,
    /// Version rows after this step.
    pub rows_after: Vec<String>,
    pub transactional: bool,
    /// Checkpointed batches instead of one atomic group (data and tenant
    /// revisions); the version rows still move in one atomic group at the end.
    pub batching: Option<Batching>,
}

/// The placeholder a batched data revision's statements contain; each batch
/// replaces it with its key-range predicate.
pub const BATCH_MARK: &str = "{{batch}}";

/// How a batched step is cut into transactions on each shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Batching {
    /// Ranges of `key` in `table`, `size` rows per transaction.
    Keys {
        table: String,
        key: String,
        size: usize,
    },
    /// Every tenant schema of the shard, `size` schemas per transaction,
    /// `search_path` set to each schema in turn.
    Tenants { size: usize },
}

/// The steps from `current` rows to `target`.
#[derive(Debug, Clone)]
pub struct Plan {
    pub from: Vec<String>,
    pub target: Target,
    pub steps: Vec<Step>,
}

/// Plans an upgrade (`direction = Up`) or downgrade. Every file problem (a
/// missing or irreversible `down.sql`, SQL that does not split) is found
/// here, before anything runs.
pub fn make(graph: &Graph, current: &[String], spec: &str, direction: Direction) -> Result<Plan> {
    let target = graph.resolve(spec, current)?;
    let ids = match direction {
        Direction::Up => graph.upgrade_steps(current, &target)?,
        Direction::Down => graph.downgrade_steps(current, &target, spec)?,
    };
    let mut applied = graph.applied(current)?;
    let mut steps = Vec::with_capacity(ids.len());
    for id in ids {
        let revision = graph
            .get(&id)
            .ok_or_else(|| MigrateError::Invalid(format!("revision {id} vanished")))?;
        let (file, sql) = match direction {
            Direction::Up => (
                revision.up_path.display().to_string(),
                revision.up_sql.as_str(),
            ),
            Direction::Down => down_sql(revision)?,
        };
        let statements = statements::split(sql).map_err(|(line, message)| {
            MigrateError::Invalid(format!("{file}:{line}: {message}"))
        })?;
        if revision.transactional {
            if let Some(bad) = statements.iter().find(|s| controls_transaction(&s.sql)) {
                return Err(MigrateError::Invalid(format!(
                    "{file}:{}: `{}` ends or starts a transaction, which would break the atomic group; remove it (the migrator wraps each revision in one transaction) or mark the revision `transactional: false`",
                    bad.line, bad.sql
                )));
            }
        }
        let batching = batching_of(revision, &statements, &file)?;
        match direction {
            Direction::Up => applied.insert(id.clone()),
            Direction::Down => applied.remove(&id),
        };
        steps.push(Step {
            revision: id.clone(),
            direction,
            file,
            statements,
            checksum: revision.checksum.clone(),
            rows_after: graph.heads_of(&applied),
            transactional: revision.transactional,
            batching,
        });
    }
    Ok(Plan {
        from: current.to_vec(),
        target,
        steps,
    })
}

/// The batching of one direction of a revision. A data revision's direction
/// whose statements contain no `{{batch}}` (often `down.sql`) runs as one
/// ordinary atomic group; a mix of marked and unmarked statements is refused
/// (the unmarked ones would run once per batch).
fn batching_of(
    revision: &Revision,
    statements: &[Statement],
    file: &str,
) -> Result<Option<Batching>> {
    let marked = statements
        .iter()
        .filter(|s| s.sql.contains(BATCH_MARK))
        .count();
    if revision.scope == Scope::Tenants {
        if let Some(s) = statements.iter().find(|s| s.sql.contains(BATCH_MARK)) {
            return Err(MigrateError::Invalid(format!(
                "{file}:{}: {BATCH_MARK} is for key-batched data revisions, not scope: tenants",
                s.line
            )));
        }
        let size = revision
            .batch
            .as_ref()
            .map_or(DEFAULT_TENANT_BATCH, |b| b.size);
        return Ok(Some(Batching::Tenants { size }));
    }
    let key_batch = revision
        .batch
        .as_ref()
        .and_then(|b| b.key.as_ref().map(|k| (b, k)));
    let Some((batch, key)) = key_batch else {
        if let Some(s) = statements.iter().find(|s| s.sql.contains(BATCH_MARK)) {
            return Err(MigrateError::Invalid(format!(
                "{file}:{}: {BATCH_MARK} needs a `-- batch: key=<column> size=<rows>` header",
                s.line
            )));
        }
        return Ok(None);
    };
    if marked == 0 {
        return Ok(None);
    }
    if let Some(s) = statements.iter().find(|s| !s.sql.contains(BATCH_MARK)) {
        return Err(MigrateError::Invalid(format!(
            "{file}:{}: every statement of a batched direction must contain {BATCH_MARK} (this one would run once per batch): {}",
            s.line, s.sql
        )));
    }
    let table = match &batch.table {
        Some(table) => table.clone(),
        None => target_table(&statements[0].sql).ok_or_else(|| {
            MigrateError::Invalid(format!(
                "{file}:{}: cannot tell which table to walk by `{key}`; add table=<name> to the batch header",
                statements[0].line
            ))
        })?,
    };
    Ok(Some(Batching::Keys {
        table,
        key: key.clone(),
        size: batch.size,
    }))
}

/// The table of `UPDATE [ONLY] t …` or `DELETE FROM [ONLY] t …`.
fn target_table(sql: &str) -> Option<String> {
    let words = super::nontx::tokens(sql);
    let mut it = words.iter().map(String::as_str);
    let first = it.next()?.to_ascii_uppercase();
    let mut table = match first.as_str() {
        "UPDATE" => it.next()?,
        "DELETE" if it.next()?.eq_ignore_ascii_case("FROM") => it.next()?,
        _ => return None,
    };
    if table.eq_ignore_ascii_case("ONLY") {
        table = it.next()?;
    }
    Some(table.to_owned())
}

/// A quoted identifier (for schema names found in the catalog).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// True for statements that end or start a transaction (or prepare one).
fn controls_transaction(sql: &str) -> bool {
    let words: Vec<String> = sql
        .split_whitespace()
        .take(2)
        .map(|w| w.trim_end_matches(';').to_ascii_uppercase())
        .collect();
    let first = words.first().map(String::as_str).unwrap_or("");
    let second = words.get(1).map(String::as_str).unwrap_or("");
    matches!(first, "BEGIN" | "COMMIT" | "ROLLBACK" | "END" | "ABORT")
        || (first == "START" && second == "TRANSACTION")
        || (matches!(first, "PREPARE" | "COMMIT" | "ROLLBACK") && second == "PREPARED")
        || (first == "PREPARE" && second == "TRANSACTION")
}

/// The plan as a psql script for one shard: each step in its own
/// transaction with the same ledger updates `up` makes (history rows carry
/// run id `offline`), for review or for applying by hand. Batched data
/// steps run as one transaction (`{{batch}}` becomes `true`); tenant steps
/// run once per schema in `tenant_schemas` (those found on the shard).
pub fn offline_sql(shard: &str, plan: &Plan, tenant_schemas: &[String]) -> String {
    let rows = |rows: &[String]| {
        if rows.is_empty() {
            "base".to_owned()
        } else {
            rows.join(", ")
        }
    };
    let mut out = format!(
        "-- shardgate migrate plan for shard {shard}: from {} to {}\n\\set ON_ERROR_STOP on\n{}\n",
        rows(&plan.from),
        plan.target,
        super::ledger::SCHEMA_SQL.trim()
    );
    for (n, step) in plan.steps.iter().enumerate() {
        out.push_str(&format!(
            "\n-- step {}: {} {} ({}){}\n",
            n + 1,
            step.direction.as_str(),
            step.revision,
            step.file,
            if step.transactional {
                ""
            } else {
                ", not transactional: statements run one by one"
            }
        ));
        // Non-transactional statements (CREATE INDEX CONCURRENTLY) cannot
        // run inside BEGIN; only the ledger update is a transaction then.
        if step.transactional {
            out.push_str("BEGIN;\n");
        }
        match &step.batching {
            Some(Batching::Tenants { .. }) => {
                for schema in tenant_schemas {
                    out.push_str(&format!(
                        "SET LOCAL search_path = {};\n",
                        quote_ident(schema)
                    ));
                    for statement in &step.statements {
                        out.push_str(&statement.sql);
                        out.push_str(";\n");
                    }
                }
                out.push_str("RESET search_path;\n");
            }
            Some(Batching::Keys { .. }) => {
                out.push_str("-- batched online; here every row in one transaction\n");
                for statement in &step.statements {
                    out.push_str(&statement.sql.replace(BATCH_MARK, "true"));
                    out.push_str(";\n");
                }
            }
            None => {
                for statement in &step.statements {
                    out.push_str(&statement.sql);
                    out.push_str(";\n");
                }
            }
        }
        if !step.transactional {
            out.push_str("BEGIN;\n");
        }
        out.push_str("DELETE FROM shardgate.version;\n");
        for row in &step.rows_after {
            // Ids are 12 hex characters: safe as literals.
            out.push_str(&format!(
                "INSERT INTO shardgate.version (version_num) VALUES ('{row}');\n"
            ));
        }
        out.push_str(&format!(
            "INSERT INTO shardgate.history (revision, direction, checksum, run_id, started_at, client) VALUES ('{}', '{}', '{}', 'offline', now(), 'plan --sql');\nCOMMIT;\n",
            step.revision,
            step.direction.as_str(),
            step.checksum
        ));
    }
    out
}

fn down_sql(revision: &Revision) -> Result<(String, &str)> {
    if revision.irreversible {
        return Err(MigrateError::Invalid(format!(
            "revision {} ({}) is irreversible; cannot downgrade past it",
            revision.id,
            revision.up_path.display()
        )));
    }
    match (&revision.down_path, &revision.down_sql) {
        (Some(path), Some(sql)) => Ok((path.display().to_string(), sql.as_str())),
        _ => Err(MigrateError::Invalid(format!(
            "revision {} has no down.sql in {}; add one or mark it `irreversible: true`",
            revision.id,
            revision.dir.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::{
        batching_of, controls_transaction, offline_sql, target_table, Batching, Direction, Plan,
        Revision, Scope, Step,
    };

    fn revision(up: &str, batch: Option<super::super::revision::Batch>) -> Revision {
        Revision {
            id: "aaaaaaaaaaaa".into(),
            slug: "x".into(),
            message: "x".into(),
            dir: "m/aaaaaaaaaaaa_x".into(),
            up_path: "m/aaaaaaaaaaaa_x/up.sql".into(),
            down_path: None,
            down_revisions: Vec::new(),
            branch_labels: Vec::new(),
            depends_on: Vec::new(),
            transactional: true,
            kind: super::super::revision::Kind::Data,
            irreversible: false,
            batch,
            scope: Scope::Shard,
            up_sql: up.into(),
            down_sql: None,
            checksum: String::new(),
        }
    }

    fn key_batch(table: Option<&str>) -> Option<super::super::revision::Batch> {
        Some(super::super::revision::Batch {
            key: Some("id".into()),
            table: table.map(str::to_owned),
            size: 10,
        })
    }

    fn batching(
        up: &str,
        batch: Option<super::super::revision::Batch>,
    ) -> Result<Option<Batching>, String> {
        let r = revision(up, batch);
        let statements = crate::migrate::statements::split(up).unwrap();
        batching_of(&r, &statements, "up.sql").map_err(|e| e.to_string())
    }

    #[test]
    fn batched_directions_are_checked() {
        assert_eq!(
            batching("UPDATE t SET x = 1 WHERE {{batch}};", key_batch(None)),
            Ok(Some(Batching::Keys {
                table: "t".into(),
                key: "id".into(),
                size: 10
            }))
        );
        // No marker: one ordinary group (e.g. a down.sql).
        assert_eq!(batching("UPDATE t SET x = 0;", key_batch(None)), Ok(None));
        let mixed = batching(
            "UPDATE t SET x = 1 WHERE {{batch}};\nINSERT INTO log VALUES (1);",
            key_batch(None),
        )
        .unwrap_err();
        assert!(
            mixed.contains("up.sql:2") && mixed.contains("once per batch"),
            "{mixed}"
        );
        let no_table = batching(
            "INSERT INTO t SELECT * FROM s WHERE {{batch}};",
            key_batch(None),
        )
        .unwrap_err();
        assert!(no_table.contains("table=<name>"), "{no_table}");
        assert_eq!(
            batching(
                "INSERT INTO t SELECT * FROM s WHERE {{batch}};",
                key_batch(Some("s"))
            ),
            Ok(Some(Batching::Keys {
                table: "s".into(),
                key: "id".into(),
                size: 10
            }))
        );
        let no_header = batching("UPDATE t SET x = 1 WHERE {{batch}};", None).unwrap_err();
        assert!(no_header.contains("batch: key="), "{no_header}");
    }

    #[test]
    fn offline_sql_runs_key_batches_as_one_transaction() {
        let plan = Plan {
            from: Vec::new(),
            target: super::super::graph::Target::Base,
            steps: vec![Step {
                revision: "aaaaaaaaaaaa".to_string(),
                direction: Direction::Up,
                file: "x/up.sql".to_string(),
                statements: vec![super::super::statements::Statement {
                    sql: "UPDATE t SET x = 1 WHERE {{batch}}".to_string(),
                    line: 1,
                }],
                checksum: "c".to_string(),
                rows_after: vec!["aaaaaaaaaaaa".to_string()],
                transactional: true,
                batching: Some(Batching::Keys {
                    table: "t".into(),
                    key: "id".into(),
                    size: 10,
                }),
            }],
        };
        let sql = offline_sql("s0", &plan, &[]);
        assert!(sql.contains("UPDATE t SET x = 1 WHERE true;"), "{sql}");
        assert!(!sql.contains("{{batch}}"), "{sql}");
    }

    #[test]
    fn batch_tables_are_inferred() {
        assert_eq!(
            target_table("UPDATE ONLY app.users SET x = 1 WHERE {{batch}}").as_deref(),
            Some("app.users")
        );
        assert_eq!(
            target_table("delete from t where {{batch}}").as_deref(),
            Some("t")
        );
        assert_eq!(target_table("INSERT INTO t SELECT 1"), None);
    }

    #[test]
    fn transaction_control_is_recognised() {
        for sql in [
            "BEGIN",
            "commit",
            "COMMIT PREPARED 'x'",
            "start transaction",
            "END",
            "PREPARE TRANSACTION 'x'",
            "ROLLBACK",
        ] {
            assert!(controls_transaction(sql), "{sql}");
        }
        for sql in [
            "CREATE TABLE begin_x (a int)",
            "PREPARE q AS SELECT 1",
            "SELECT 1",
            "BEGINNING",
        ] {
            assert!(!controls_transaction(sql), "{sql}");
        }
    }

    #[test]
    fn offline_sql_runs_non_transactional_statements_outside_begin() {
        let plan = Plan {
            from: Vec::new(),
            target: super::super::graph::Target::Base,
            steps: vec![Step {
                revision: "aaaaaaaaaaaa".to_string(),
                direction: Direction::Up,
                file: "x/up.sql".to_string(),
                statements: vec![super::super::statements::Statement {
                    sql: "CREATE INDEX CONCURRENTLY i ON t (v)".to_string(),
                    line: 1,
                }],
                checksum: "c".to_string(),
                rows_after: vec!["aaaaaaaaaaaa".to_string()],
                transactional: false,
                batching: None,
            }],
        };
        let sql = offline_sql("s0", &plan, &[]);
        let create = sql.find("CREATE INDEX CONCURRENTLY").expect("statement");
        let begin = sql.find("BEGIN;").expect("ledger transaction");
        assert!(
            begin > create,
            "CONCURRENTLY must not run inside BEGIN:\n{sql}"
        );
        assert!(sql.contains("not transactional"));
    }
}
