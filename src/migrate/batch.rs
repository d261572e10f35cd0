//! Batched steps: data revisions walked by key range (`batch: key=id
//! size=5000`) and tenant revisions run in every tenant schema (`scope:
//! tenants`). Both are too big (or too many) for one transaction per shard,
//! so each shard runs a sequence of small transactions, each committing its
//! own checkpoint in `shardgate.batch_progress` together with its work: a
//! batch is either done and recorded, or neither. A re-run after an
//! interruption resumes after the last checkpoint and never runs a batch
//! twice.
//!
//! Shards run in parallel (one connection each). As with non-transactional
//! revisions, the version rows do not move shard by shard: once every shard
//! finished, one atomic group moves them (and clears the checkpoints).
//!
//! Data batches: the statements contain `{{batch}}`, replaced by
//! `(key > 'lo' AND key <= 'hi')`, where `hi` is the `size`-th key after the
//! checkpoint `lo` in key order (keys need not be unique or dense). Rows
//! inserted below the checkpoint while the revision runs are not visited.
//!
//! Tenant schemas: found on each shard by the map's `schema_template`s
//! (`tenant_{tenant}` matches every schema `tenant_<something>`), walked in
//! name order; `search_path` is set to the one schema (not `public`), so an
//! unqualified name never falls through to a shared table.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::join_all;
use tokio_postgres::Client;

use super::apply::{describe, shard_error, Conn, CRASH_ENV};
use super::plan::{quote_ident, Batching, Step, BATCH_MARK};
use super::statements::Statement;
use super::{MigrateError, Result, StatementFailure};

/// Checkpoints of batched steps (scratch state, deleted by the step's final
/// ledger group, like `nontx_progress`).
pub const PROGRESS_SQL: &str = "
CREATE TABLE IF NOT EXISTS shardgate.batch_progress (
    revision varchar(32) NOT NULL,
    direction text NOT NULL,
    checksum text NOT NULL,
    checkpoint text,
    batches_done integer NOT NULL,
    units_done bigint NOT NULL,
    finished boolean NOT NULL DEFAULT false,
    history_id bigint NOT NULL,
    run_id text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (revision, direction)
);
";

/// Creates the checkpoint table if missing (caller holds the migration lock).
pub async fn ensure(client: &Client) -> std::result::Result<(), tokio_postgres::Error> {
    client.batch_execute(PROGRESS_SQL).await
}

/// What one shard did in a batched step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub shard: String,
    /// Batches committed by this run (not counting earlier runs).
    pub batches: usize,
    /// Rows changed (data) or schemas migrated (tenants) by this run.
    pub units: u64,
    /// True when this run started from an earlier run's checkpoint.
    pub resumed: bool,
}

/// Batches committed by this process, for the `batch:N` failpoint.
static BATCHES_COMMITTED: AtomicUsize = AtomicUsize::new(0);

/// `SHARDGATE_MIGRATE_CRASH_AFTER=batch:N` aborts the process right after
/// its N-th committed batch (an interruption for resume tests).
fn batch_crash_point() {
    let n = BATCHES_COMMITTED.fetch_add(1, Ordering::SeqCst) + 1;
    let Ok(value) = std::env::var(CRASH_ENV) else {
        return;
    };
    if value
        .strip_prefix("batch:")
        .and_then(|v| v.parse::<usize>().ok())
        == Some(n)
    {
        eprintln!("shardgate migrate: {CRASH_ENV}={value}: aborting now");
        std::process::abort();
    }
}

/// A shard's saved checkpoint for `step`.
struct Checkpoint {
    at: Option<String>,
    finished: bool,
}

/// The checkpoint, if it belongs to this shard's current history (see
/// `nontx::progress` for why an older one is stale) and to this file.
async fn checkpoint(
    c: &Conn,
    step: &Step,
    mark: i64,
    accept_changed: bool,
) -> Result<Option<Checkpoint>> {
    let row = c
        .client
        .query_opt(
            "SELECT checkpoint, finished, checksum, history_id, batches_done FROM shardgate.batch_progress \
             WHERE revision = $1 AND direction = $2",
            &[&step.revision, &step.direction.as_str()],
        )
        .await
        .map_err(|e| shard_error(&c.name, "reading batch checkpoints", &e))?;
    let Some(row) = row else { return Ok(None) };
    let read = |e: tokio_postgres::Error| shard_error(&c.name, "reading batch checkpoints", &e);
    let at: Option<String> = row.try_get(0).map_err(read)?;
    let finished: bool = row.try_get(1).map_err(read)?;
    let checksum: String = row.try_get(2).map_err(read)?;
    let history_id: i64 = row.try_get(3).map_err(read)?;
    let done: i32 = row.try_get(4).map_err(read)?;
    if history_id != mark {
        tracing::warn!(shard = %c.name, revision = %step.revision, "stale batch checkpoint (other steps ran since): starting over");
        c.client
            .execute(
                "DELETE FROM shardgate.batch_progress WHERE revision = $1 AND direction = $2",
                &[&step.revision, &step.direction.as_str()],
            )
            .await
            .map_err(|e| shard_error(&c.name, "dropping a stale batch checkpoint", &e))?;
        return Ok(None);
    }
    if checksum != step.checksum && !accept_changed {
        return Err(MigrateError::Shard {
            shard: c.name.clone(),
            message: format!(
                "revision {} ({}) changed while partly applied ({done} batch(es) done with checksum {checksum}, {} on disk); restore the file or run again with --accept-changed",
                step.revision, step.file, step.checksum
            ),
        });
    }
    Ok(Some(Checkpoint { at, finished }))
}

/// Saves a checkpoint (inside the batch's transaction, or alone for `finished`).
async fn save(
    client: &Client,
    step: &Step,
    at: Option<&str>,
    units: i64,
    finished: bool,
    run_id: &str,
    mark: i64,
) -> std::result::Result<(), tokio_postgres::Error> {
    let batches: i32 = if finished { 0 } else { 1 };
    client
        .execute(
            "INSERT INTO shardgate.batch_progress (revision, direction, checksum, checkpoint, batches_done, units_done, finished, history_id, run_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (revision, direction) DO UPDATE SET checksum = EXCLUDED.checksum, \
             checkpoint = COALESCE(EXCLUDED.checkpoint, batch_progress.checkpoint), \
             batches_done = batch_progress.batches_done + EXCLUDED.batches_done, \
             units_done = batch_progress.units_done + EXCLUDED.units_done, \
             finished = EXCLUDED.finished, history_id = EXCLUDED.history_id, \
             run_id = EXCLUDED.run_id, updated_at = clock_timestamp()",
            &[
                &step.revision,
                &step.direction.as_str(),
                &step.checksum,
                &at,
                &batches,
                &units,
                &finished,
                &mark,
                &run_id,
            ],
        )
        .await?;
    Ok(())
}

/// The newest history row that moved this shard (`up`, `down`, `stamp`; not
/// `accept`, which `--accept-changed` writes before the step resumes): a
/// checkpoint is only trusted while it is unchanged.
async fn history_mark(client: &Client) -> std::result::Result<i64, tokio_postgres::Error> {
    client
        .query_one(
            "SELECT COALESCE(max(id), 0)::bigint FROM shardgate.history WHERE direction <> 'accept'",
            &[],
        )
        .await?
        .try_get(0)
}

/// Runs a batched step on every shard in parallel; the first error is
/// returned after every shard stopped (each keeps its last checkpoint).
pub(super) async fn run_step(
    conns: &[Conn],
    step: &Step,
    run_id: &str,
    lock_timeout: Duration,
    accept_changed: bool,
    tenant_templates: &TenantSchemas,
) -> Result<Vec<BatchOutcome>> {
    for c in conns {
        ensure(&c.client)
            .await
            .map_err(|e| shard_error(&c.name, "creating the batch checkpoint table", &e))?;
    }
    if matches!(step.batching, Some(Batching::Tenants { .. })) && tenant_templates.is_empty() {
        return Err(MigrateError::Invalid(format!(
            "revision {} ({}) has scope: tenants, but the map has no tenant function with mode: schema (its schema_template says which schemas are tenants)",
            step.revision, step.file
        )));
    }
    let results = join_all(conns.iter().map(|c| {
        run_shard(
            c,
            step,
            run_id,
            lock_timeout,
            accept_changed,
            tenant_templates,
        )
    }))
    .await;
    results.into_iter().collect()
}

async fn run_shard(
    c: &Conn,
    step: &Step,
    run_id: &str,
    lock_timeout: Duration,
    accept_changed: bool,
    tenant_templates: &TenantSchemas,
) -> Result<BatchOutcome> {
    let mark = history_mark(&c.client)
        .await
        .map_err(|e| shard_error(&c.name, "reading the history", &e))?;
    let saved = checkpoint(c, step, mark, accept_changed).await?;
    let mut outcome = BatchOutcome {
        shard: c.name.clone(),
        resumed: saved.is_some(),
        ..BatchOutcome::default()
    };
    let (mut at, finished) = saved.map_or((None, false), |s| (s.at, s.finished));
    if finished {
        tracing::info!(shard = %c.name, revision = %step.revision, "batched step already done here");
        return Ok(outcome);
    }
    let tenants = match &step.batching {
        Some(Batching::Tenants { .. }) => {
            let mut all = tenant_schemas(&c.client, tenant_templates)
                .await
                .map_err(|e| shard_error(&c.name, "listing tenant schemas", &e))?;
            all.retain(|s| at.as_ref().is_none_or(|done| s > done));
            all
        }
        _ => Vec::new(),
    };
    let mut next_tenant = 0;
    loop {
        c.client
            .batch_execute("BEGIN")
            .await
            .map_err(|e| shard_error(&c.name, "BEGIN", &e))?;
        let body = async {
            c.client
                .batch_execute(&format!(
                    "SET LOCAL lock_timeout = {}",
                    lock_timeout.as_millis().max(1)
                ))
                .await
                .map_err(|e| shard_error(&c.name, "setting lock_timeout", &e))?;
            let done = match &step.batching {
                Some(Batching::Keys { table, key, size }) => {
                    key_batch(c, step, table, key, *size, at.as_deref()).await?
                }
                Some(Batching::Tenants { size }) => {
                    let chunk: Vec<String> = tenants
                        .iter()
                        .skip(next_tenant)
                        .take(*size)
                        .cloned()
                        .collect();
                    tenant_batch(c, step, &chunk).await?
                }
                None => None,
            };
            if let Some((checkpoint, units)) = &done {
                save(
                    &c.client,
                    step,
                    Some(checkpoint),
                    *units,
                    false,
                    run_id,
                    mark,
                )
                .await
                .map_err(|e| shard_error(&c.name, "saving the batch checkpoint", &e))?;
            }
            Ok::<_, MigrateError>(done)
        };
        match body.await {
            Err(e) => {
                let _ = c.client.batch_execute("ROLLBACK").await;
                return Err(e);
            }
            Ok(None) => {
                c.client
                    .batch_execute("ROLLBACK")
                    .await
                    .map_err(|e| shard_error(&c.name, "ending the last batch", &e))?;
                break;
            }
            Ok(Some((checkpoint, units))) => {
                c.client
                    .batch_execute("COMMIT")
                    .await
                    .map_err(|e| shard_error(&c.name, "committing a batch", &e))?;
                outcome.batches += 1;
                outcome.units += u64::try_from(units).unwrap_or(0);
                if matches!(step.batching, Some(Batching::Tenants { .. })) {
                    next_tenant += usize::try_from(units).unwrap_or(0);
                }
                at = Some(checkpoint);
                batch_crash_point();
            }
        }
    }
    save(&c.client, step, None, 0, true, run_id, mark)
        .await
        .map_err(|e| shard_error(&c.name, "saving the batch checkpoint", &e))?;
    tracing::info!(shard = %c.name, revision = %step.revision, batches = outcome.batches, units = outcome.units, "batched step done here");
    Ok(outcome)
}

/// One key batch inside the open transaction: `Some((new checkpoint, rows
/// changed))`, or `None` when no key is left after `after`.
async fn key_batch(
    c: &Conn,
    step: &Step,
    table: &str,
    key: &str,
    size: usize,
    after: Option<&str>,
) -> Result<Option<(String, i64)>> {
    let lower = after.map(|lo| format!("{key} > {}", literal(lo)));
    let bound_sql = format!(
        "SELECT s.k::text AS bound FROM (SELECT {key} AS k FROM {table} {} ORDER BY {key} LIMIT {size}) s ORDER BY s.k DESC LIMIT 1",
        lower.as_ref().map_or(String::new(), |l| format!("WHERE {l}"))
    );
    let row = c.client.query_opt(&bound_sql, &[]).await.map_err(|e| {
        shard_error(
            &c.name,
            &format!("finding the next batch ({bound_sql})"),
            &e,
        )
    })?;
    let hi: Option<String> = match row {
        Some(row) => row
            .try_get(0)
            .map_err(|e| shard_error(&c.name, "finding the next batch", &e))?,
        None => None,
    };
    let Some(hi) = hi else { return Ok(None) };
    let predicate = match &lower {
        Some(l) => format!("({l} AND {key} <= {})", literal(&hi)),
        None => format!("({key} <= {})", literal(&hi)),
    };
    let mut rows = 0u64;
    for statement in &step.statements {
        let sql = statement.sql.replace(BATCH_MARK, &predicate);
        rows += c
            .client
            .execute(sql.as_str(), &[])
            .await
            .map_err(|e| failure(c, step, statement, &sql, &e, None))?;
    }
    Ok(Some((hi, i64::try_from(rows).unwrap_or(i64::MAX))))
}

/// One batch of tenant schemas inside the open transaction: `Some((last
/// schema, schemas done))`, or `None` when `chunk` is empty.
async fn tenant_batch(c: &Conn, step: &Step, chunk: &[String]) -> Result<Option<(String, i64)>> {
    let Some(last) = chunk.last() else {
        return Ok(None);
    };
    for schema in chunk {
        c.client
            .batch_execute(&format!("SET LOCAL search_path = {}", quote_ident(schema)))
            .await
            .map_err(|e| shard_error(&c.name, &format!("setting search_path to {schema}"), &e))?;
        for statement in &step.statements {
            c.client
                .batch_execute(&statement.sql)
                .await
                .map_err(|e| failure(c, step, statement, &statement.sql, &e, Some(schema)))?;
        }
    }
    Ok(Some((
        last.clone(),
        i64::try_from(chunk.len()).unwrap_or(i64::MAX),
    )))
}

fn failure(
    c: &Conn,
    step: &Step,
    statement: &Statement,
    sql: &str,
    e: &tokio_postgres::Error,
    schema: Option<&str>,
) -> MigrateError {
    let place = schema.map_or(String::new(), |s| format!(" in tenant schema {s}"));
    MigrateError::Statement(Box::new(StatementFailure {
        shard: c.name.clone(),
        revision: step.revision.clone(),
        file: step.file.clone(),
        line: statement.line,
        statement: sql.to_owned(),
        message: format!(
            "{}{place} (batched: earlier batches stay committed; run `up` again to resume)",
            describe(e)
        ),
    }))
}

/// A SQL string literal (standard_conforming_strings is on since 9.1).
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Which schemas are tenant schemas, from the map's schema-mode tenant functions.
#[derive(Debug, Clone, Default)]
pub struct TenantSchemas {
    /// `schema_template`s with a fixed part (`tenant_{tenant}`): every
    /// schema of that shape is a tenant, listed in the map or not (tenants
    /// placed by `default` are not listed).
    pub templates: Vec<String>,
    /// Schema names of the tenants the map lists (the only way to know with
    /// the bare template `{tenant}`, which every schema would match).
    pub listed: Vec<String>,
}

impl TenantSchemas {
    pub fn is_empty(&self) -> bool {
        self.templates.is_empty() && self.listed.is_empty()
    }

    /// True when `name` is a tenant schema (never `public`).
    pub fn contains(&self, name: &str) -> bool {
        name != "public"
            && (self.listed.iter().any(|l| l == name)
                || self.templates.iter().any(|t| matches_template(t, name)))
    }
}

/// The tenant schemas of this database, sorted by name.
pub async fn tenant_schemas(
    client: &Client,
    tenants: &TenantSchemas,
) -> std::result::Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT nspname::text FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' \
             AND nspname NOT IN ('information_schema', 'shardgate') ORDER BY 1",
            &[],
        )
        .await?;
    let mut out = Vec::new();
    for row in rows {
        let name: String = row.try_get(0)?;
        if tenants.contains(&name) {
            out.push(name);
        }
    }
    // Byte order, whatever the database's collation: the checkpoint (the
    // last schema done) is compared with `>` in Rust.
    out.sort();
    Ok(out)
}

/// True when `name` is `template` with `{tenant}` replaced by a non-empty
/// id; a template without a fixed part matches nothing (see [`TenantSchemas`]).
pub fn matches_template(template: &str, name: &str) -> bool {
    let Some((prefix, suffix)) = template.split_once("{tenant}") else {
        return template == name;
    };
    if prefix.is_empty() && suffix.is_empty() {
        return false;
    }
    name.len() > prefix.len() + suffix.len() && name.starts_with(prefix) && name.ends_with(suffix)
}

/// This shard's unfinished batched steps, for `status`.
pub async fn partial(client: &Client) -> std::result::Result<Vec<String>, tokio_postgres::Error> {
    let present = super::ledger::table_exists(client, "batch_progress").await?;
    if !present {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT revision::text, direction, batches_done, units_done, finished, coalesce(checkpoint, ''), run_id \
             FROM shardgate.batch_progress ORDER BY updated_at",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let revision: String = r.try_get(0)?;
            let direction: String = r.try_get(1)?;
            let batches: i32 = r.try_get(2)?;
            let units: i64 = r.try_get(3)?;
            let finished: bool = r.try_get(4)?;
            let at: String = r.try_get(5)?;
            let run_id: String = r.try_get(6)?;
            let state = if finished { "all batches done" } else { "in progress" };
            Ok(format!(
                "{revision} {direction}: {batches} batch(es), {units} row(s)/schema(s), checkpoint {at:?}, {state} (run {run_id})"
            ))
        })
        .collect()
}

/// The statement the final ledger group runs to clear this step's checkpoints.
pub fn clear_statement(step: &Step) -> Statement {
    Statement {
        sql: format!(
            "DELETE FROM shardgate.batch_progress WHERE revision = '{}' AND direction = '{}'",
            step.revision.replace('\'', "''"),
            step.direction.as_str()
        ),
        line: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::{matches_template, TenantSchemas};

    #[test]
    fn listed_tenants_and_public() {
        let t = TenantSchemas {
            templates: vec!["{tenant}".into()],
            listed: vec!["acme".into(), "public".into()],
        };
        assert!(t.contains("acme"));
        assert!(!t.contains("public"));
        assert!(!t.contains("globex"));
    }

    #[test]
    fn templates_match_schema_names() {
        assert!(matches_template("tenant_{tenant}", "tenant_acme"));
        assert!(!matches_template("tenant_{tenant}", "tenant_"));
        assert!(!matches_template("tenant_{tenant}", "public"));
        assert!(matches_template("t_{tenant}_app", "t_x_app"));
        assert!(!matches_template("t_{tenant}_app", "t_x_ap"));
        assert!(!matches_template("{tenant}", "public"));
    }
}
