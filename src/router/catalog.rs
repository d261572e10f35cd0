//! What the router learns from a shard's catalog: the type of each sharded
//! table's key column (hash placement depends on it: the text '42' and the
//! integer 42 land on different shards) and each table's column order (an
//! INSERT without a column list gives values in that order).
//!
//! Read over a control-plane tokio-postgres connection (ARCHITECTURE §2.3),
//! at startup and again when a statement needs something not learned yet
//! (e.g. the table was created through the proxy after startup).

use std::collections::HashMap;
use std::time::Duration;

use super::shardmap::{ShardMap, TableRule};
use super::volatile;
use crate::backend::{connect_control, CATALOG_APPLICATION};
use crate::config::ShardConfig;
use crate::sharding::KeyType;

/// Key types and column orders of the map's tables, by map table name.
#[derive(Debug, Default, Clone)]
pub struct CatalogFacts {
    pub key_types: HashMap<String, KeyType>,
    pub columns: HashMap<String, Vec<String>>,
    /// Replicated tables' columns with a per-shard default (sequence,
    /// identity, random): (column, default text).
    pub per_shard_defaults: HashMap<String, Vec<(String, String)>>,
    /// The database's default collation compares text bytewise (C, POSIX,
    /// C.UTF-8): the fan-out merge can order text exactly only then.
    pub bytewise_collation: Option<bool>,
    /// Every aggregate function's name: the fan-out planner must know a
    /// user-defined aggregate is one (it would otherwise return a row per
    /// shard).
    pub aggregates: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("reading the catalog of shard \"{shard}\": {message}")]
    Query { shard: String, message: String },
    #[error("reading the catalog of shard \"{shard}\": no answer within {seconds} s")]
    Timeout { shard: String, seconds: u64 },
}

/// Columns of every table named in the map (bare names: the one visible on
/// the search path; `schema.table`: exactly that one), domains resolved to
/// their base type, with each column's default (identity columns as
/// `identity`; generated columns have none: they are computed from the row).
const COLUMNS_SQL: &str = "\
SELECT n.nspname, c.relname, a.attname, \
       (CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END)::int8, \
       pg_table_is_visible(c.oid), \
       CASE WHEN a.attidentity <> '' THEN 'identity' \
            WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END \
FROM pg_attribute a \
JOIN pg_class c ON c.oid = a.attrelid \
JOIN pg_namespace n ON n.oid = c.relnamespace \
JOIN pg_type t ON t.oid = a.atttypid \
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
WHERE c.relkind IN ('r', 'p', 'f') AND a.attnum > 0 AND NOT a.attisdropped \
  AND c.relname = ANY($1) \
ORDER BY n.nspname, c.relname, a.attnum";

/// Every user-defined type of a shard (OID, `schema.name`), for the type
/// OID translation (`protocol::type_oids`).
const TYPES_SQL: &str = "\
SELECT t.oid::int8, n.nspname || '.' || t.typname \
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
WHERE t.oid >= 16384 AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'";

/// Reads `shard`'s user-defined types as (OID, `schema.name`).
pub async fn load_types(
    shard: &ShardConfig,
    timeout: Duration,
) -> Result<Vec<(u32, String)>, CatalogError> {
    let read = async {
        let client = connect(shard, timeout).await?;
        let rows = client
            .query(TYPES_SQL, &[])
            .await
            .map_err(|e| query_error(shard, e))?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let oid: i64 = row.get(0);
                Some((u32::try_from(oid).ok()?, row.get::<_, String>(1)))
            })
            .collect())
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(result) => result,
        Err(_) => Err(CatalogError::Timeout {
            shard: shard.name.clone(),
            seconds: timeout.as_secs().max(1),
        }),
    }
}

fn query_error(shard: &ShardConfig, e: tokio_postgres::Error) -> CatalogError {
    CatalogError::Query {
        shard: shard.name.clone(),
        message: match e.as_db_error() {
            Some(db) => db.message().to_string(),
            None => e.to_string(),
        },
    }
}

/// A control-plane connection to `shard`.
async fn connect(
    shard: &ShardConfig,
    timeout: Duration,
) -> Result<tokio_postgres::Client, CatalogError> {
    connect_control(shard, CATALOG_APPLICATION, timeout)
        .await
        .map_err(|e| query_error(shard, e))
}

/// Reads the facts for `map`'s tables from `shard`.
pub async fn load(
    shard: &ShardConfig,
    map: &ShardMap,
    timeout: Duration,
) -> Result<CatalogFacts, CatalogError> {
    match tokio::time::timeout(timeout, load_inner(shard, map, timeout)).await {
        Ok(result) => result,
        Err(_) => Err(CatalogError::Timeout {
            shard: shard.name.clone(),
            seconds: timeout.as_secs().max(1),
        }),
    }
}

async fn load_inner(
    shard: &ShardConfig,
    map: &ShardMap,
    timeout: Duration,
) -> Result<CatalogFacts, CatalogError> {
    let fail = |e: tokio_postgres::Error| query_error(shard, e);
    let client = connect(shard, timeout).await?;
    let bare: Vec<String> = map
        .tables
        .keys()
        .map(|name| name.rsplit('.').next().unwrap_or(name).to_string())
        .collect();
    let rows = client.query(COLUMNS_SQL, &[&bare]).await.map_err(fail)?;
    // (schema, table) → [(column, type oid)], in column order.
    let mut tables: TablesFound = HashMap::new();
    for row in rows {
        let schema: String = row.get(0);
        let table: String = row.get(1);
        let column: String = row.get(2);
        let type_oid: i64 = row.get(3);
        let visible: bool = row.get(4);
        let default: Option<String> = row.get(5);
        let entry = tables
            .entry((schema, table))
            .or_insert_with(|| (visible, Vec::new()));
        entry.1.push(Column {
            name: column,
            type_oid: u32::try_from(type_oid).unwrap_or_default(),
            default,
        });
    }
    let mut facts = facts_for(map, &tables);
    let collation = client
        .query_one(
            "SELECT datcollate FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await
        .map_err(fail)?;
    let collate: String = collation.get(0);
    facts.bytewise_collation = Some(matches!(
        collate.as_str(),
        "C" | "POSIX" | "C.UTF-8" | "C.utf8" | "C.UTF8" | "ucs_basic"
    ));
    let aggregates = client
        .query(
            "SELECT DISTINCT proname::text FROM pg_proc WHERE prokind = 'a'",
            &[],
        )
        .await
        .map_err(fail)?;
    facts.aggregates = Some(aggregates.iter().map(|r| r.get(0)).collect());
    Ok(facts)
}

/// A column as the catalog describes it.
struct Column {
    name: String,
    type_oid: u32,
    /// The default's text, `identity` for identity columns.
    default: Option<String>,
}

/// (schema, table) → (visible on the search path, columns in order).
type TablesFound = HashMap<(String, String), (bool, Vec<Column>)>;

fn facts_for(map: &ShardMap, tables: &TablesFound) -> CatalogFacts {
    let mut facts = CatalogFacts::default();
    for (name, rule) in &map.tables {
        let found = match name.split_once('.') {
            Some((schema, table)) => tables.get(&(schema.to_string(), table.to_string())),
            None => tables
                .iter()
                .find(|((_, table), (visible, _))| table == name && *visible)
                .map(|(_, found)| found),
        };
        let Some((_, columns)) = found else {
            continue;
        };
        match rule {
            TableRule::Sharded { key, .. } => {
                if let Some(column) = columns.iter().find(|c| c.name == *key) {
                    if let Ok(kind) = KeyType::from_oid(column.type_oid) {
                        facts.key_types.insert(name.clone(), kind);
                    }
                }
            }
            TableRule::Replicated => {
                let per_shard: Vec<(String, String)> = columns
                    .iter()
                    .filter_map(|c| {
                        let default = c.default.as_deref()?;
                        (default == "identity" || volatile::default_is_per_shard(default))
                            .then(|| (c.name.clone(), default.to_string()))
                    })
                    .collect();
                if !per_shard.is_empty() {
                    facts.per_shard_defaults.insert(name.clone(), per_shard);
                }
            }
        }
        facts.columns.insert(
            name.clone(),
            columns.iter().map(|c| c.name.clone()).collect(),
        );
    }
    facts
}

impl ShardMap {
    /// True when this map already holds exactly these facts.
    pub fn knows(&self, facts: &CatalogFacts) -> bool {
        let next = self.with_catalog(facts);
        next.key_types == self.key_types
            && next.columns == self.columns
            && next.per_shard_defaults == self.per_shard_defaults
    }

    /// This map with the catalog's facts added (earlier facts for tables the
    /// catalog no longer shows are dropped: the table may have been recreated).
    pub fn with_catalog(&self, facts: &CatalogFacts) -> ShardMap {
        self.clone()
            .with_key_types(facts.key_types.clone())
            .with_columns(facts.columns.clone())
            .with_per_shard_defaults(facts.per_shard_defaults.clone())
    }
}
