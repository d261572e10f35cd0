//! `shardgate migrate verify`: a schema fingerprint per shard, read from the
//! catalog, compared object by object.
//!
//! The ledger says which revisions a shard *thinks* it has; only the catalog
//! says what is really there. Someone running `ALTER TABLE` on one shard by
//! hand, a half-applied non-transactional revision or a restored backup all
//! leave shards whose ledgers agree but whose schemas do not, and a sharded
//! query then fails (or, worse, succeeds differently) on one shard only. So
//! `verify` reads every user object from `pg_catalog` on every shard and
//! names each object that differs, with the shards on each side.
//!
//! Objects are keyed by kind and qualified name (`column public.users.id`),
//! never by OID, since OIDs differ between clusters for identical schemas.
//! Definitions come from Postgres' own deparsers (`format_type`,
//! `pg_get_constraintdef`, `pg_get_indexdef`, …), so two shards agree exactly
//! when Postgres would print the same DDL for them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use futures::future::join_all;
use tokio_postgres::Client;

use super::apply::{connect, shard_error, ApplyOptions, Conn};
use super::{ledger, Result};

/// Schemas that are not the user's: the system's and the migrator's own
/// ledger (which legitimately differs between shards, e.g. history times).
const EXCLUDED_SCHEMAS: &str =
    "n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', 'shardgate') \
     AND n.nspname NOT LIKE 'pg_temp_%' AND n.nspname NOT LIKE 'pg_toast_temp_%'";

/// One catalog object's attributes, e.g. a column's `type`, `nullable`,
/// `default`. Kept as separate attributes (not one string) so a report can
/// say *what* differs, not only that something does.
pub type Attributes = BTreeMap<String, String>;

/// The schema of one shard: object key (`kind qualified.name`) → attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fingerprint {
    pub objects: BTreeMap<String, Attributes>,
}

impl Fingerprint {
    /// A short digest of the whole fingerprint (md5 of its canonical text),
    /// to compare shards at a glance or record in a note.
    pub fn digest(&self) -> String {
        let mut text = String::new();
        for (key, attrs) in &self.objects {
            text.push_str(key);
            text.push('\n');
            for (name, value) in attrs {
                text.push_str(&format!("  {name}={value}\n"));
            }
        }
        format!("{:x}", md5::compute(text.as_bytes()))
    }
}

/// One object that differs between shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// `column public.users.nickname`, `index public.t_v_idx`, `ledger heads`…
    pub object: String,
    /// `present on s1, missing on s0, s2` or `type integer on s0, s2; bigint on s1`.
    pub detail: String,
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.detail)
    }
}

/// What `verify` found on the selected shards.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// (shard, its fingerprint), in map order.
    pub fingerprints: Vec<(String, Fingerprint)>,
    /// (shard, its ledger's version rows), in map order.
    pub heads: Vec<(String, Vec<String>)>,
    /// Every difference; empty when all shards agree.
    pub drift: Vec<Drift>,
}

impl VerifyReport {
    pub fn agrees(&self) -> bool {
        self.drift.is_empty()
    }
}

/// Connects to the selected shards, reads their fingerprints and ledger
/// heads concurrently (one consistent snapshot per shard) and compares them.
pub(super) async fn verify(
    shards: &[&crate::config::ShardConfig],
    opts: &ApplyOptions,
) -> Result<VerifyReport> {
    let conns: Vec<Conn> = join_all(shards.iter().map(|s| connect(s, opts.connect_timeout)))
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    let read = join_all(conns.iter().map(|c| async move {
        let fail = |e: tokio_postgres::Error| shard_error(&c.name, "reading the catalog", &e);
        // One snapshot, so a concurrent migration cannot show half a change.
        c.client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(fail)?;
        let fingerprint = fingerprint(&c.client).await.map_err(fail)?;
        let heads = ledger::rows(&c.client)
            .await
            .map_err(|e| shard_error(&c.name, "reading the ledger", &e))?;
        c.client.batch_execute("COMMIT").await.map_err(fail)?;
        Ok::<_, super::MigrateError>((fingerprint, heads))
    }))
    .await;
    let mut report = VerifyReport::default();
    for (c, result) in conns.iter().zip(read) {
        let (fingerprint, heads) = result?;
        report.fingerprints.push((c.name.clone(), fingerprint));
        report.heads.push((c.name.clone(), heads));
    }
    report.drift = compare(&report.fingerprints);
    let heads: Vec<(String, Option<String>)> = report
        .heads
        .iter()
        .map(|(shard, rows)| {
            let text = if rows.is_empty() {
                "base".to_owned()
            } else {
                rows.join(", ")
            };
            (shard.clone(), Some(text))
        })
        .collect();
    if let Some(detail) = split_detail("", &heads) {
        report.drift.insert(
            0,
            Drift {
                object: "ledger heads".into(),
                detail,
            },
        );
    }
    Ok(report)
}

/// Reads one shard's fingerprint (inside the caller's transaction).
pub async fn fingerprint(
    client: &Client,
) -> std::result::Result<Fingerprint, tokio_postgres::Error> {
    let mut fp = Fingerprint::default();
    for (query, _) in QUERIES {
        let query = query.replace("{EXCLUDED}", EXCLUDED_SCHEMAS);
        for row in client.query(&query, &[]).await? {
            let key: String = row.try_get(0)?;
            let attr: String = row.try_get(1)?;
            let value: Option<String> = row.try_get(2)?;
            fp.objects
                .entry(key)
                .or_default()
                .insert(attr, value.unwrap_or_else(|| "(none)".into()));
        }
    }
    Ok(fp)
}

/// The catalog queries: each row is (object key, attribute, value);
/// `{EXCLUDED}` becomes [`EXCLUDED_SCHEMAS`] (over alias `n`). The second
/// field names the object kinds, for documentation only.
const QUERIES: &[(&str, &str)] = &[
    (
        "SELECT 'schema ' || n.nspname, 'present', 'yes' FROM pg_namespace n WHERE {EXCLUDED}",
        "schemas",
    ),
    (
        "SELECT CASE c.relkind WHEN 'v' THEN 'view ' WHEN 'm' THEN 'materialized view ' \
                  WHEN 'f' THEN 'foreign table ' ELSE 'table ' END || n.nspname || '.' || c.relname, \
                  a.attr, a.value \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             CROSS JOIN LATERAL (VALUES \
                  ('kind', CASE c.relkind WHEN 'p' THEN 'partitioned' ELSE 'plain' END), \
                  ('persistence', CASE c.relpersistence WHEN 'u' THEN 'unlogged' ELSE 'logged' END), \
                  ('row security', c.relrowsecurity::text), \
                  ('definition', CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) END)) AS a(attr, value) \
             WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND {EXCLUDED} AND NOT EXISTS (SELECT 1 FROM pg_depend dep WHERE dep.classid = 'pg_class'::regclass AND dep.objid = c.oid AND dep.deptype = 'e') \
               AND (a.attr <> 'definition' OR c.relkind IN ('v', 'm')) \
               AND (a.attr <> 'kind' OR c.relkind IN ('r', 'p'))",
        "tables and views",
    ),
    (
        "SELECT 'column ' || n.nspname || '.' || c.relname || '.' || att.attname, a.attr, a.value \
             FROM pg_attribute att JOIN pg_class c ON c.oid = att.attrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_attrdef d ON d.adrelid = att.attrelid AND d.adnum = att.attnum \
             CROSS JOIN LATERAL (VALUES \
                  ('type', format_type(att.atttypid, att.atttypmod)), \
                  ('nullable', CASE WHEN att.attnotnull THEN 'not null' ELSE 'null' END), \
                  ('default', pg_get_expr(d.adbin, d.adrelid)), \
                  ('identity', NULLIF(att.attidentity, '')::text), \
                  ('generated', NULLIF(att.attgenerated, '')::text), \
                  ('collation', CASE WHEN att.attcollation <> 0 THEN att.attcollation::regcollation::text END)) AS a(attr, value) \
             WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND att.attnum > 0 AND NOT att.attisdropped AND {EXCLUDED} AND NOT EXISTS (SELECT 1 FROM pg_depend dep WHERE dep.classid = 'pg_class'::regclass AND dep.objid = c.oid AND dep.deptype = 'e')",
        "columns",
    ),
    (
        "SELECT 'constraint ' || n.nspname || '.' || COALESCE(c.relname, t.typname) || '.' || con.conname, \
                    'definition', pg_get_constraintdef(con.oid) \
             FROM pg_constraint con JOIN pg_namespace n ON n.oid = con.connamespace \
             LEFT JOIN pg_class c ON c.oid = con.conrelid \
             LEFT JOIN pg_type t ON t.oid = con.contypid \
             WHERE {EXCLUDED}",
        "constraints",
    ),
    (
        "SELECT 'index ' || n.nspname || '.' || i.relname, a.attr, a.value \
             FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid \
             JOIN pg_namespace n ON n.oid = i.relnamespace \
             CROSS JOIN LATERAL (VALUES \
                  ('definition', pg_get_indexdef(x.indexrelid)), \
                  ('state', CASE WHEN x.indisvalid THEN 'valid' ELSE 'INVALID' END)) AS a(attr, value) \
             WHERE {EXCLUDED}",
        "indexes",
    ),
    (
        "SELECT 'trigger ' || n.nspname || '.' || c.relname || '.' || tg.tgname, a.attr, a.value \
             FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             CROSS JOIN LATERAL (VALUES \
                  ('definition', pg_get_triggerdef(tg.oid)), \
                  ('enabled', tg.tgenabled::text)) AS a(attr, value) \
             WHERE NOT tg.tgisinternal AND {EXCLUDED}",
        "triggers",
    ),
    (
        "SELECT CASE p.prokind WHEN 'p' THEN 'procedure ' ELSE 'function ' END \
                    || n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')', \
                    'definition', pg_get_functiondef(p.oid) \
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE p.prokind <> 'a' AND {EXCLUDED} \
               AND NOT EXISTS (SELECT 1 FROM pg_depend dep WHERE dep.classid = 'pg_proc'::regclass \
                               AND dep.objid = p.oid AND dep.deptype = 'e')",
        "functions",
    ),
    (
        "SELECT 'enum ' || n.nspname || '.' || t.typname, 'labels', \
                    (SELECT string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder) \
                     FROM pg_enum e WHERE e.enumtypid = t.oid) \
             FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
             WHERE t.typtype = 'e' AND {EXCLUDED} \
               AND NOT EXISTS (SELECT 1 FROM pg_depend dep WHERE dep.classid = 'pg_type'::regclass AND dep.objid = t.oid AND dep.deptype = 'e')",
        "enums",
    ),
    (
        "SELECT 'sequence ' || n.nspname || '.' || c.relname, a.attr, a.value \
             FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             CROSS JOIN LATERAL (VALUES \
                  ('type', format_type(s.seqtypid, NULL)), \
                  ('start', s.seqstart::text), \
                  ('increment', s.seqincrement::text), \
                  ('min', s.seqmin::text), \
                  ('max', s.seqmax::text), \
                  ('cache', s.seqcache::text), \
                  ('cycle', s.seqcycle::text)) AS a(attr, value) \
             WHERE {EXCLUDED}",
        "sequences",
    ),
    (
        // Objects owned by an extension are skipped above (the same
        // extension version creates the same objects); the extension and
        // its version are compared instead.
        "SELECT 'extension ' || e.extname, a.attr, a.value \
         FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace \
         CROSS JOIN LATERAL (VALUES ('version', e.extversion), ('schema', n.nspname::text)) AS a(attr, value)",
        "extensions",
    ),
];

/// Compares fingerprints object by object. An object missing on some shards
/// is one line, and each attribute that differs among the shards that have
/// it is one more line. A column, constraint or trigger whose
/// table is itself missing on exactly the same shards is not repeated: the
/// table's line already says it.
pub fn compare(shards: &[(String, Fingerprint)]) -> Vec<Drift> {
    let keys: BTreeSet<&String> = shards.iter().flat_map(|(_, f)| f.objects.keys()).collect();
    let presence = |key: &str| -> Vec<bool> {
        shards
            .iter()
            .map(|(_, f)| f.objects.contains_key(key))
            .collect()
    };
    let mut out = Vec::new();
    for key in keys {
        let present = presence(key);
        if present.iter().any(|p| !p) {
            if parent_keys(key)
                .iter()
                .any(|parent| presence(parent) == present)
            {
                continue;
            }
            let on: Vec<&str> = names_where(shards, &present, true);
            let off: Vec<&str> = names_where(shards, &present, false);
            out.push(Drift {
                object: key.clone(),
                detail: format!(
                    "present on {}, missing on {}",
                    on.join(", "),
                    off.join(", ")
                ),
            });
        }
        let attrs: BTreeSet<&String> = shards
            .iter()
            .filter_map(|(_, f)| f.objects.get(key))
            .flat_map(|a| a.keys())
            .collect();
        for attr in attrs {
            // Among the shards that have the object (a half-built index is
            // both missing somewhere and invalid elsewhere).
            let values: Vec<(String, Option<String>)> = shards
                .iter()
                .filter_map(|(name, f)| {
                    let attrs = f.objects.get(key)?;
                    Some((name.clone(), attrs.get(attr).cloned()))
                })
                .collect();
            if let Some(detail) = split_detail(attr, &values) {
                out.push(Drift {
                    object: key.clone(),
                    detail,
                });
            }
        }
    }
    out
}

/// `type integer on s0, s2; bigint on s1` when the values differ, else None.
/// Groups are in order of first appearance, so the first shard's value leads.
fn split_detail(attr: &str, values: &[(String, Option<String>)]) -> Option<String> {
    let mut groups: Vec<(Option<&String>, Vec<&str>)> = Vec::new();
    for (shard, value) in values {
        match groups.iter_mut().find(|(v, _)| *v == value.as_ref()) {
            Some((_, shards)) => shards.push(shard),
            None => groups.push((value.as_ref(), vec![shard.as_str()])),
        }
    }
    if groups.len() < 2 {
        return None;
    }
    let prefix = if attr.is_empty() {
        String::new()
    } else {
        format!("{attr} ")
    };
    let parts: Vec<String> = groups
        .iter()
        .map(|(value, shards)| {
            let value = value.map_or("(none)", |v| v.as_str());
            // Multi-line definitions (functions, views) stay readable on one line.
            let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
            format!("{value} on {}", shards.join(", "))
        })
        .collect();
    Some(format!("{prefix}{}", parts.join("; ")))
}

fn names_where<'a>(
    shards: &'a [(String, Fingerprint)],
    present: &[bool],
    want: bool,
) -> Vec<&'a str> {
    shards
        .iter()
        .zip(present)
        .filter(|(_, p)| **p == want)
        .map(|((name, _), _)| name.as_str())
        .collect()
}

/// The keys the relation of a column/constraint/trigger key may have (a
/// column may belong to a table, a view…; a constraint to a domain).
fn parent_keys(key: &str) -> Vec<String> {
    let Some((kind, name)) = key.split_once(' ') else {
        return Vec::new();
    };
    if !matches!(kind, "column" | "constraint" | "trigger") {
        return Vec::new();
    }
    let Some((relation, _)) = name.rsplit_once('.') else {
        return Vec::new();
    };
    ["table", "view", "materialized view", "foreign table"]
        .iter()
        .map(|kind| format!("{kind} {relation}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(name: &str, objects: &[(&str, &[(&str, &str)])]) -> (String, Fingerprint) {
        let mut fp = Fingerprint::default();
        for (key, attrs) in objects {
            let entry = fp.objects.entry((*key).to_owned()).or_default();
            for (attr, value) in *attrs {
                entry.insert((*attr).to_owned(), (*value).to_owned());
            }
        }
        (name.to_owned(), fp)
    }

    #[test]
    fn missing_table_is_one_line_and_attribute_splits_are_grouped() {
        let table: &[(&str, &str)] = &[("persistence", "logged")];
        let col_int: &[(&str, &str)] = &[("type", "integer")];
        let col_big: &[(&str, &str)] = &[("type", "bigint")];
        let shards = [
            shard(
                "s0",
                &[("table public.t", table), ("column public.t.v", col_int)],
            ),
            shard(
                "s1",
                &[
                    ("table public.t", table),
                    ("column public.t.v", col_big),
                    ("table public.x", table),
                    ("column public.x.a", col_int),
                ],
            ),
            shard(
                "s2",
                &[("table public.t", table), ("column public.t.v", col_int)],
            ),
        ];
        let lines: Vec<String> = compare(&shards).iter().map(|d| d.to_string()).collect();
        assert_eq!(
            lines,
            [
                "column public.t.v: type integer on s0, s2; bigint on s1",
                "table public.x: present on s1, missing on s0, s2",
            ]
        );
        let same = [shards[0].clone(), shards[2].clone()];
        assert!(compare(&same).is_empty());
        assert_eq!(same[0].1.digest(), same[1].1.digest());
    }
}
