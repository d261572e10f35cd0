//! The per-shard ledger, in schema `shardgate` on every shard.
//!
//! - `shardgate.version (version_num)`: one row per current head, exactly
//!   Alembic's `alembic_version` semantics, so a shard answers "where am I"
//!   on its own, without the proxy or any local file;
//! - `shardgate.history`: append-only, one row per step applied, reverted,
//!   stamped or accepted, with the checksum of the file that ran, the run id,
//!   times and who ran it — the audit trail and the source of checksums;
//! - `shardgate.decisions (gid_prefix, decided_at)`: the two-phase-commit
//!   decision records, written on the coordinator shard (ARCHITECTURE §2.9).

use std::collections::HashMap;

use tokio_postgres::Client;

/// Prefix of every prepared-transaction gid the migrator creates.
pub const GID_PREFIX: &str = "shardgate_mig_";

pub const SCHEMA_SQL: &str = "
CREATE SCHEMA IF NOT EXISTS shardgate;
CREATE TABLE IF NOT EXISTS shardgate.version (
    version_num varchar(32) NOT NULL PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS shardgate.history (
    id bigserial PRIMARY KEY,
    revision varchar(32) NOT NULL,
    direction text NOT NULL CHECK (direction IN ('up', 'down', 'stamp', 'accept')),
    checksum text,
    run_id text NOT NULL,
    started_at timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    applied_by text NOT NULL DEFAULT current_user,
    client text
);
CREATE TABLE IF NOT EXISTS shardgate.decisions (
    gid_prefix text PRIMARY KEY,
    decided_at timestamptz NOT NULL DEFAULT now()
);
";

/// Creates the ledger tables if missing. Runs only under the migration lock
/// (concurrent `CREATE … IF NOT EXISTS` can still collide in Postgres).
pub async fn ensure(client: &Client) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(SCHEMA_SQL).await
}

/// True when the ledger exists on this shard.
pub async fn exists(client: &Client) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT to_regclass('shardgate.version') IS NOT NULL AND to_regclass('shardgate.history') IS NOT NULL",
            &[],
        )
        .await?;
    row.try_get(0)
}

/// The current version rows (heads), sorted; empty when there is no ledger.
pub async fn rows(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    if !exists(client).await? {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT version_num::text FROM shardgate.version ORDER BY 1",
            &[],
        )
        .await?;
    rows.iter().map(|r| r.try_get(0)).collect()
}

/// Replaces the version rows (inside the caller's transaction).
pub async fn set_rows(client: &Client, heads: &[String]) -> Result<(), tokio_postgres::Error> {
    client.execute("DELETE FROM shardgate.version", &[]).await?;
    client
        .execute(
            "INSERT INTO shardgate.version (version_num) SELECT unnest($1::text[])",
            &[&heads],
        )
        .await?;
    Ok(())
}

/// One history row to append.
pub struct Entry<'a> {
    pub revision: &'a str,
    pub direction: &'a str,
    pub checksum: Option<&'a str>,
    pub run_id: &'a str,
    pub started_at: std::time::SystemTime,
}

/// Appends a history row (inside the caller's transaction).
pub async fn record(client: &Client, entry: &Entry<'_>) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO shardgate.history (revision, direction, checksum, run_id, started_at, client) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &entry.revision,
                &entry.direction,
                &entry.checksum,
                &entry.run_id,
                &entry.started_at,
                &who(),
            ],
        )
        .await?;
    Ok(())
}

/// `user@host pid N` of this process, for the history's `client` column.
pub fn who() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "?".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    format!("{user}@{host} pid {}", std::process::id())
}

/// The checksum each revision was last applied, accepted or stamped with
/// (none once reverted or stamped away).
pub async fn checksums(client: &Client) -> Result<HashMap<String, String>, tokio_postgres::Error> {
    if !exists(client).await? {
        return Ok(HashMap::new());
    }
    let rows = client
        .query(
            "SELECT DISTINCT ON (revision) revision::text, direction, checksum FROM shardgate.history \
             ORDER BY revision, id DESC",
            &[],
        )
        .await?;
    let mut out = HashMap::new();
    for row in rows {
        let revision: String = row.try_get(0)?;
        let direction: String = row.try_get(1)?;
        let checksum: Option<String> = row.try_get(2)?;
        if direction != "down" {
            if let Some(checksum) = checksum {
                out.insert(revision, checksum);
            }
        }
    }
    Ok(out)
}

/// A history row as stored.
#[derive(Debug, Clone)]
pub struct HistoryRow {
    pub revision: String,
    pub direction: String,
    pub checksum: Option<String>,
    pub run_id: String,
    pub started_at: std::time::SystemTime,
    pub finished_at: std::time::SystemTime,
    pub applied_by: String,
    pub client: Option<String>,
}

/// The whole history, oldest first.
pub async fn history(client: &Client) -> Result<Vec<HistoryRow>, tokio_postgres::Error> {
    if !exists(client).await? {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT revision::text, direction, checksum, run_id, started_at, finished_at, applied_by, client \
             FROM shardgate.history ORDER BY id",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(HistoryRow {
                revision: r.try_get(0)?,
                direction: r.try_get(1)?,
                checksum: r.try_get(2)?,
                run_id: r.try_get(3)?,
                started_at: r.try_get(4)?,
                finished_at: r.try_get(5)?,
                applied_by: r.try_get(6)?,
                client: r.try_get(7)?,
            })
        })
        .collect()
}

/// The migrator's prepared transactions in this database (in doubt when no
/// migrator is running).
pub async fn in_doubt(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() \
             AND starts_with(gid, $1) ORDER BY gid",
            &[&GID_PREFIX],
        )
        .await?;
    rows.iter().map(|r| r.try_get(0)).collect()
}

/// Whether the ledger table `shardgate.<table>` exists on this shard.
pub async fn table_exists(client: &Client, table: &str) -> Result<bool, tokio_postgres::Error> {
    client
        .query_one(
            "SELECT to_regclass(format('shardgate.%I', $1::text)) IS NOT NULL",
            &[&table],
        )
        .await?
        .try_get(0)
}

/// Every decision record on this shard.
pub async fn decisions(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    let present = table_exists(client, "decisions").await?;
    if !present {
        return Ok(Vec::new());
    }
    let rows = client
        .query("SELECT gid_prefix FROM shardgate.decisions", &[])
        .await?;
    rows.iter().map(|r| r.try_get(0)).collect()
}

/// The group a gid belongs to: `shardgate_mig_<run>_<step>` (run ids and
/// steps contain no `_`; the shard name after them may).
pub fn group_of(gid: &str) -> Option<String> {
    let rest = gid.strip_prefix(GID_PREFIX)?;
    let mut parts = rest.splitn(3, '_');
    let run = parts.next()?;
    let step = parts.next()?;
    parts.next()?;
    Some(format!("{GID_PREFIX}{run}_{step}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gid_groups() {
        assert_eq!(
            group_of("shardgate_mig_abc123_7_s_1").as_deref(),
            Some("shardgate_mig_abc123_7")
        );
        assert_eq!(group_of("shardgate_mig_abc"), None);
        assert_eq!(group_of("other_1_2_3"), None);
    }
}
