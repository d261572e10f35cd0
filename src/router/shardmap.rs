//! The shard map as the router needs it: instantiated sharding functions and
//! per-table rules, looked up by lower-cased name.
//!
//! Built once from a validated [`Config`]; the router never re-reads YAML.

use std::collections::HashMap;

use crate::config::{BoundValue, Config, DefaultTable, FunctionKind, TablePlacement, TenantMode};
use crate::placement::Fence;
use crate::sharding::{KeyType, KeyValue, RangeSpec, ShardingError, ShardingFunction};

/// A problem turning a config into a shard map (the config validator should
/// already have refused these; this is the router's own guard).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    #[error("sharding function \"{name}\": {source}")]
    Function { name: String, source: ShardingError },
    #[error("table \"{table}\" uses the sharding function \"{function}\", which is not defined")]
    UnknownFunction { table: String, function: String },
    #[error("the shard map has no shards")]
    NoShards,
}

/// One named sharding function of the map.
#[derive(Debug, Clone)]
pub struct MapFunction {
    pub name: String,
    /// `kind:` as written in the map (`tenant` is a list on text underneath).
    pub kind: &'static str,
    pub function: ShardingFunction,
    /// For tenant functions in `schema` mode: the schema template.
    pub schema_template: Option<String>,
}

impl MapFunction {
    /// The key type the function itself fixes (range and list bounds, tenant
    /// ids, modulo's integers); `None` for hash and consistent_hash, which
    /// accept any supported type and therefore need the column's type.
    pub fn implied_key_type(&self) -> Option<KeyType> {
        match &self.function {
            ShardingFunction::Range(f) => Some(f.key_type()),
            ShardingFunction::List(f) => Some(f.key_type()),
            ShardingFunction::Modulo(_) => Some(KeyType::Int),
            ShardingFunction::Hash(_) | ShardingFunction::ConsistentHash(_) => None,
        }
    }
}

/// How one table is placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableRule {
    /// Rows spread by `functions[function]` applied to column `key` (lower-cased).
    Sharded {
        key: String,
        function: usize,
    },
    Replicated,
}

/// The router's view of a shard map.
#[derive(Debug, Clone)]
pub struct ShardMap {
    pub shard_names: Vec<String>,
    pub functions: Vec<MapFunction>,
    /// Table name (lower-cased, as written in the map: bare or `schema.table`) → rule.
    pub tables: HashMap<String, TableRule>,
    pub default_table: DefaultTable,
    /// Key column types by table name (lower-cased), filled by the proxy from the
    /// catalog. Hash functions are type-sensitive, so a quoted literal or an
    /// untyped text parameter is only routed when its column's type is known.
    pub key_types: HashMap<String, KeyType>,
    /// Column names in table order by table name (lower-cased), from the
    /// catalog: an INSERT without a column list needs the key's position.
    pub columns: HashMap<String, Vec<String>>,
    /// Replicated tables' columns whose default differs per shard (a
    /// sequence, identity, random value), with the default's text, from the
    /// catalog: an INSERT leaving them out would make the copies differ.
    pub per_shard_defaults: HashMap<String, Vec<(String, String)>>,
    /// Tables whose recorded placement differs from this map (see
    /// [`crate::placement`]), with the refusal clients get. Set when maps
    /// and catalogs load, read only when a statement is analysed (analyses
    /// are cached), so routed statements pay nothing for it.
    pub fenced: HashMap<String, Fence>,
}

fn bound_to_key(value: &BoundValue) -> Result<KeyValue, ShardingError> {
    match value {
        BoundValue::Int(v) => Ok(KeyValue::Int(*v)),
        BoundValue::Text(v) => Ok(KeyValue::Text(v.clone())),
        BoundValue::Date(v) => KeyValue::parse_as(KeyType::Date, v),
        BoundValue::Timestamp(v) => KeyValue::parse_as(KeyType::Timestamp, v),
    }
}

impl ShardMap {
    /// Instantiates every function and table rule of `config`.
    pub fn from_config(config: &Config) -> Result<ShardMap, RouterError> {
        let shard_names: Vec<String> = config.shards.iter().map(|s| s.name.clone()).collect();
        let n = shard_names.len();
        if n == 0 {
            return Err(RouterError::NoShards);
        }
        let mut functions = Vec::with_capacity(config.functions.len());
        for f in &config.functions {
            let err = |source| RouterError::Function {
                name: f.name.clone(),
                source,
            };
            let mut schema_template = None;
            let function = match &f.kind {
                FunctionKind::Hash => ShardingFunction::hash(n),
                FunctionKind::Modulo => ShardingFunction::modulo(n),
                FunctionKind::ConsistentHash { vnodes } => {
                    ShardingFunction::consistent_hash(&shard_names, *vnodes as usize)
                }
                FunctionKind::Range { ranges, .. } => {
                    let mut specs = Vec::with_capacity(ranges.len());
                    for r in ranges {
                        specs.push(RangeSpec {
                            from: r.from.as_ref().map(bound_to_key).transpose().map_err(err)?,
                            to: r.to.as_ref().map(bound_to_key).transpose().map_err(err)?,
                            shard: r.shard,
                        });
                    }
                    ShardingFunction::range(specs, n)
                }
                FunctionKind::List {
                    values, default, ..
                } => {
                    let mut list = Vec::with_capacity(values.len());
                    for (v, s) in values {
                        list.push((bound_to_key(v).map_err(err)?, *s));
                    }
                    ShardingFunction::list(list, *default, n)
                }
                FunctionKind::Tenant {
                    mode,
                    tenants,
                    default,
                    schema_template: template,
                } => {
                    if *mode == TenantMode::Schema {
                        schema_template = Some(template.clone());
                    }
                    let list = tenants
                        .iter()
                        .map(|(t, s)| (KeyValue::Text(t.clone()), *s))
                        .collect();
                    ShardingFunction::list(list, *default, n)
                }
            }
            .map_err(err)?;
            functions.push(MapFunction {
                name: f.name.clone(),
                kind: f.kind.name(),
                function,
                schema_template,
            });
        }
        let mut tables = HashMap::with_capacity(config.tables.len());
        for t in &config.tables {
            let rule = match &t.placement {
                TablePlacement::Replicated => TableRule::Replicated,
                TablePlacement::Sharded { key, function } => {
                    let index = functions
                        .iter()
                        .position(|f| &f.name == function)
                        .ok_or_else(|| RouterError::UnknownFunction {
                            table: t.name.clone(),
                            function: function.clone(),
                        })?;
                    TableRule::Sharded {
                        key: key.to_lowercase(),
                        function: index,
                    }
                }
            };
            tables.insert(t.name.to_lowercase(), rule);
        }
        Ok(ShardMap {
            shard_names,
            functions,
            tables,
            default_table: config.default_table,
            key_types: HashMap::new(),
            columns: HashMap::new(),
            per_shard_defaults: HashMap::new(),
            fenced: HashMap::new(),
        })
    }

    /// Sets the key column types (from the catalog); keys are table names as in the map.
    pub fn with_key_types(mut self, key_types: HashMap<String, KeyType>) -> ShardMap {
        self.key_types = key_types
            .into_iter()
            .map(|(k, v)| (k.to_lowercase(), v))
            .collect();
        self
    }

    /// Sets the column orders (from the catalog); keys are table names as in the map.
    pub fn with_columns(mut self, columns: HashMap<String, Vec<String>>) -> ShardMap {
        self.columns = columns
            .into_iter()
            .map(|(k, v)| (k.to_lowercase(), v))
            .collect();
        self
    }

    /// Sets the replicated tables' per-shard defaults (from the catalog).
    pub fn with_per_shard_defaults(
        mut self,
        defaults: HashMap<String, Vec<(String, String)>>,
    ) -> ShardMap {
        self.per_shard_defaults = defaults
            .into_iter()
            .map(|(k, v)| (k.to_lowercase(), v))
            .collect();
        self
    }

    /// Sets the fenced tables (lower-cased name → refusal message).
    pub fn with_fence(mut self, fenced: HashMap<String, Fence>) -> ShardMap {
        self.fenced = fenced;
        self
    }

    /// The refusal for a statement naming `schema.table` or `table`, when
    /// that table is fenced.
    pub fn fence(&self, schema: Option<&str>, table: &str) -> Option<&Fence> {
        if self.fenced.is_empty() {
            return None;
        }
        if let Some(schema) = schema {
            if let Some(fence) = self.fenced.get(format!("{schema}.{table}").as_str()) {
                return Some(fence);
            }
        }
        self.fenced.get(table)
    }

    /// The column order of a configured table, if the proxy supplied it.
    pub fn column_order(&self, table: &str) -> Option<&[String]> {
        self.columns.get(table).map(Vec::as_slice)
    }

    pub fn shard_count(&self) -> usize {
        self.shard_names.len()
    }

    pub fn shard_index(&self, name: &str) -> Option<usize> {
        self.shard_names.iter().position(|s| s == name)
    }

    /// The configured entry for a table: `schema.table` as written, then the
    /// bare table name (so `public.users` finds `users`). Returns the name the
    /// rule is registered under.
    pub fn lookup(&self, schema: Option<&str>, table: &str) -> Option<(&str, &TableRule)> {
        if let Some(schema) = schema {
            let full = format!("{schema}.{table}");
            if let Some((k, r)) = self.tables.get_key_value(full.as_str()) {
                return Some((k.as_str(), r));
            }
        }
        self.tables
            .get_key_value(table)
            .map(|(k, r)| (k.as_str(), r))
    }

    /// The key column type of a configured table, if the proxy supplied it.
    pub fn key_type(&self, table: &str) -> Option<KeyType> {
        self.key_types.get(table).copied()
    }

    /// The configured table names, sorted, for error messages.
    pub fn configured_tables(&self) -> String {
        let mut names: Vec<&str> = self.tables.keys().map(String::as_str).collect();
        names.sort_unstable();
        if names.is_empty() {
            "(none)".into()
        } else {
            names.join(", ")
        }
    }
}
