//! Non-transactional revisions (`transactional: false`): statements that
//! Postgres refuses inside a transaction block (`CREATE INDEX CONCURRENTLY`,
//! `ALTER TYPE … ADD VALUE` on old servers, `VACUUM`…).
//!
//! They cannot join a two-phase-commit group, so they run shard by shard,
//! statement by statement, each in its own implicit transaction. After every
//! statement the shard records how far it got in
//! `shardgate.nontx_progress`, so a re-run skips what is done and resumes on
//! the shards (and at the statement) that did not finish.
//!
//! The version rows do *not* move shard by shard: once every shard has run
//! every statement, the ledger update (version rows, history, clearing the
//! progress rows) is one ordinary atomic group over all shards. So the fleet
//! never disagrees on its heads (which would stop the next `up` as
//! divergent), every shard's history gets the same rows, and a shard that
//! finished early is simply skipped on the re-run.
//!
//! A failed `CREATE INDEX CONCURRENTLY` leaves an *invalid* index behind
//! (`pg_index.indisvalid = false`) that is not used for queries but is still
//! maintained on writes, and re-running the statement fails with "already
//! exists". Before re-running such a statement the migrator looks the index
//! up: an invalid one is dropped (`DROP INDEX CONCURRENTLY`) and rebuilt, a
//! valid one means the statement already succeeded (the progress update was
//! lost) and it is skipped.

use std::time::Duration;

use tokio_postgres::Client;

use super::apply::{shard_error, Conn};
use super::plan::Step;
use super::statements::Statement;
use super::{MigrateError, Result, StatementFailure};

/// Per-shard progress of non-transactional steps. Kept out of
/// `shardgate.history` (append-only, one row per finished step) because it
/// is scratch state: rows are deleted by the step's final ledger group.
pub const PROGRESS_SQL: &str = "
CREATE TABLE IF NOT EXISTS shardgate.nontx_progress (
    revision varchar(32) NOT NULL,
    direction text NOT NULL,
    checksum text NOT NULL,
    statements_done integer NOT NULL,
    history_id bigint NOT NULL,
    run_id text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (revision, direction)
);
";

/// Creates the progress table if missing (caller holds the migration lock).
pub async fn ensure(client: &Client) -> std::result::Result<(), tokio_postgres::Error> {
    client.batch_execute(PROGRESS_SQL).await
}

/// The newest history row id of this shard: progress is only trusted while
/// it is unchanged (see [`progress`]).
async fn history_mark(client: &Client) -> std::result::Result<i64, tokio_postgres::Error> {
    client
        .query_one(
            "SELECT COALESCE(max(id), 0)::bigint FROM shardgate.history",
            &[],
        )
        .await?
        .try_get(0)
}

/// How many statements of `step` this shard already ran, and with which
/// checksum of the file. Progress recorded before some other step moved
/// this shard (a history row newer than the progress) is stale: after e.g.
/// a partial revision, a `down` past its parent and an `up` again, the
/// objects it built may be gone, so the step starts over (statements of a
/// non-transactional revision should be idempotent; `CREATE INDEX
/// CONCURRENTLY` is made so by [`prepare_rerun`]).
async fn progress(
    client: &Client,
    step: &Step,
    mark: i64,
) -> std::result::Result<Option<(usize, String)>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT statements_done, checksum, history_id FROM shardgate.nontx_progress \
             WHERE revision = $1 AND direction = $2",
            &[&step.revision, &step.direction.as_str()],
        )
        .await?;
    match row {
        None => Ok(None),
        Some(row) => {
            let done: i32 = row.try_get(0)?;
            let checksum: String = row.try_get(1)?;
            let recorded_at: i64 = row.try_get(2)?;
            if recorded_at != mark {
                tracing::warn!(revision = %step.revision, "stale non-transactional progress (other steps ran since): starting the revision over");
                return Ok(None);
            }
            Ok(Some((usize::try_from(done).unwrap_or(0), checksum)))
        }
    }
}

async fn record_progress(
    client: &Client,
    step: &Step,
    done: usize,
    run_id: &str,
    mark: i64,
) -> std::result::Result<(), tokio_postgres::Error> {
    let done = i32::try_from(done).unwrap_or(i32::MAX);
    client
        .execute(
            "INSERT INTO shardgate.nontx_progress (revision, direction, checksum, statements_done, run_id, history_id) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (revision, direction) DO UPDATE SET checksum = EXCLUDED.checksum, \
             statements_done = EXCLUDED.statements_done, run_id = EXCLUDED.run_id, \
             history_id = EXCLUDED.history_id, \
             updated_at = clock_timestamp()",
            &[
                &step.revision,
                &step.direction.as_str(),
                &step.checksum,
                &done,
                &run_id,
                &mark,
            ],
        )
        .await?;
    Ok(())
}

/// This shard's unfinished non-transactional steps, as
/// `<revision> <direction>: N statement(s) done (run <id>)`, for `status`:
/// an interrupted revision is otherwise invisible until the next `up`.
pub async fn partial(client: &Client) -> std::result::Result<Vec<String>, tokio_postgres::Error> {
    let present = super::ledger::table_exists(client, "nontx_progress").await?;
    if !present {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT revision::text, direction, statements_done, run_id \
             FROM shardgate.nontx_progress ORDER BY updated_at",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let revision: String = r.try_get(0)?;
            let direction: String = r.try_get(1)?;
            let done: i32 = r.try_get(2)?;
            let run_id: String = r.try_get(3)?;
            Ok(format!(
                "{revision} {direction}: {done} statement(s) done (run {run_id})"
            ))
        })
        .collect()
}

/// The statement the final ledger group runs on every shard to clear this
/// step's progress (inside the group's transaction, so progress disappears
/// exactly when the version rows move). Revision ids are 12 hex characters
/// and directions `up`/`down`, so inlining them is safe.
pub fn clear_statement(step: &Step) -> Statement {
    Statement {
        sql: format!(
            "DELETE FROM shardgate.nontx_progress WHERE revision = '{}' AND direction = '{}'",
            step.revision.replace('\'', "''"),
            step.direction.as_str()
        ),
        line: 0,
    }
}

/// Runs a non-transactional step's statements on every shard in map order,
/// resuming from each shard's recorded progress. Stops at the first failure
/// (the error names the shard, the statement and which shards finished).
pub(super) async fn run_step(
    conns: &[Conn],
    step: &Step,
    run_id: &str,
    lock_timeout: Duration,
    accept_changed: bool,
) -> Result<()> {
    let mut finished: Vec<&str> = Vec::new();
    for c in conns {
        let fail = |what: &str, e: tokio_postgres::Error| shard_error(&c.name, what, &e);
        let mark = history_mark(&c.client)
            .await
            .map_err(|e| fail("reading the history", e))?;
        let start = match progress(&c.client, step, mark)
            .await
            .map_err(|e| fail("reading non-transactional progress", e))?
        {
            None => 0,
            Some((done, checksum)) => {
                if checksum != step.checksum && !accept_changed {
                    return Err(MigrateError::Shard {
                        shard: c.name.clone(),
                        message: format!(
                            "revision {} ({}) changed while partly applied ({done} statement(s) done with checksum {checksum}, {} on disk); restore the file or run again with --accept-changed",
                            step.revision, step.file, step.checksum
                        ),
                    });
                }
                done
            }
        };
        if start >= step.statements.len() {
            tracing::info!(shard = %c.name, revision = %step.revision, "non-transactional step already done here");
            finished.push(&c.name);
            continue;
        }
        c.client
            .batch_execute(&format!(
                "SET lock_timeout = {}",
                lock_timeout.as_millis().max(1)
            ))
            .await
            .map_err(|e| fail("setting lock_timeout", e))?;
        for (n, statement) in step.statements.iter().enumerate().skip(start) {
            let skip = prepare_rerun(&c.client, &statement.sql)
                .await
                .map_err(|e| fail("checking a concurrently built index", e))?;
            if !skip {
                if let Err(e) = c.client.batch_execute(&statement.sql).await {
                    let note = if finished.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " (non-transactional: finished on {}; run `up` again to resume)",
                            finished.join(", ")
                        )
                    };
                    return Err(MigrateError::Statement(Box::new(StatementFailure {
                        shard: c.name.clone(),
                        revision: step.revision.clone(),
                        file: step.file.clone(),
                        line: statement.line,
                        statement: statement.sql.clone(),
                        message: format!("{}{note}", super::apply::describe(&e)),
                    })));
                }
            }
            record_progress(&c.client, step, n + 1, run_id, mark)
                .await
                .map_err(|e| fail("recording non-transactional progress", e))?;
        }
        c.client
            .batch_execute("RESET lock_timeout")
            .await
            .map_err(|e| fail("resetting lock_timeout", e))?;
        finished.push(&c.name);
    }
    Ok(())
}

/// Before (re-)running `sql`: for `CREATE INDEX CONCURRENTLY name ON table`,
/// drops an invalid index of that name left by an earlier failure and
/// returns `true` (skip) when a valid one already exists. Other statements:
/// `false`.
async fn prepare_rerun(
    client: &Client,
    sql: &str,
) -> std::result::Result<bool, tokio_postgres::Error> {
    let Some((index, table)) = concurrent_index(sql) else {
        return Ok(false);
    };
    let row = client
        .query_opt(
            "SELECT x.indisvalid, quote_ident(n.nspname) || '.' || quote_ident(c.relname) \
             FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE x.indrelid = to_regclass($1) AND c.relname = $2",
            &[&table, &index],
        )
        .await?;
    let Some(row) = row else {
        return Ok(false);
    };
    let valid: bool = row.try_get(0)?;
    if valid {
        tracing::info!(index = %index, "index already built and valid: statement skipped");
        return Ok(true);
    }
    let qualified: String = row.try_get(1)?;
    tracing::warn!(index = %qualified, "invalid index left by a failed CREATE INDEX CONCURRENTLY: dropping it to rebuild");
    client
        .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {qualified}"))
        .await?;
    Ok(false)
}

/// `(index name, table as written)` of a `CREATE [UNIQUE] INDEX CONCURRENTLY
/// [IF NOT EXISTS] name ON [ONLY] table …`; the name unquoted (or folded to
/// lower case), the table as text for `to_regclass`. None for anything else,
/// including an unnamed index (Postgres picks the name; nothing to look up).
pub fn concurrent_index(sql: &str) -> Option<(String, String)> {
    let words = tokens(sql);
    let mut it = words.iter().map(String::as_str).peekable();
    let upper = |w: Option<&str>| w.map(str::to_ascii_uppercase);
    if upper(it.next())?.as_str() != "CREATE" {
        return None;
    }
    let mut word = upper(it.next())?;
    if word == "UNIQUE" {
        word = upper(it.next())?;
    }
    if word != "INDEX" || upper(it.next())?.as_str() != "CONCURRENTLY" {
        return None;
    }
    let mut name = it.next()?;
    if name.eq_ignore_ascii_case("IF") {
        it.next(); // NOT
        it.next(); // EXISTS
        name = it.next()?;
    }
    if name.eq_ignore_ascii_case("ON") {
        return None;
    }
    if upper(it.next())?.as_str() != "ON" {
        return None;
    }
    let mut table = it.next()?;
    if table.eq_ignore_ascii_case("ONLY") {
        table = it.next()?;
    }
    Some((identifier(name), table.to_owned()))
}

/// An identifier as stored in the catalog: quotes removed, else lower-cased.
fn identifier(word: &str) -> String {
    match word.strip_prefix('"').and_then(|w| w.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None => word.to_ascii_lowercase(),
    }
}

/// Whitespace-separated words, skipping comments; `(` ends a word (so
/// `t(col)` gives `t`), quoted identifiers stay whole (with their dots).
pub(super) fn tokens(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut chars = sql.chars().peekable();
    let mut in_quotes = false;
    while let Some(ch) = chars.next() {
        if in_quotes {
            current.push(ch);
            if ch == '"' {
                if chars.peek() == Some(&'"') {
                    current.push('"');
                    chars.next();
                } else {
                    in_quotes = false;
                }
            }
            continue;
        }
        match ch {
            '"' => {
                in_quotes = true;
                current.push(ch);
            }
            '-' if chars.peek() == Some(&'-') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
                flush(&mut out, &mut current);
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut last = ' ';
                for c in chars.by_ref() {
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
                flush(&mut out, &mut current);
            }
            '(' => {
                flush(&mut out, &mut current);
                break;
            }
            c if c.is_whitespace() => flush(&mut out, &mut current),
            c => current.push(c),
        }
    }
    flush(&mut out, &mut current);
    out
}

fn flush(out: &mut Vec<String>, current: &mut String) {
    if !current.is_empty() {
        out.push(std::mem::take(current));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_concurrent_index_names() {
        assert_eq!(
            concurrent_index("CREATE UNIQUE INDEX CONCURRENTLY Items_Code ON public.items (code)"),
            Some(("items_code".into(), "public.items".into()))
        );
        assert_eq!(
            concurrent_index(
                "-- why\ncreate index concurrently if not exists \"Odd\"\"Name\" on only \"T\"(x)"
            ),
            Some(("Odd\"Name".into(), "\"T\"".into()))
        );
        assert_eq!(concurrent_index("CREATE INDEX CONCURRENTLY ON t (x)"), None);
        assert_eq!(concurrent_index("CREATE INDEX i ON t (x)"), None);
        assert_eq!(concurrent_index("VACUUM t"), None);
    }
}
