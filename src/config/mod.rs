//! The YAML shard map: typed configuration, strict validation, `${VAR}` substitution.
//!
//! Key names are the public contract (README "Configuration"). Loading never
//! stops at the first problem: every error is collected with file, line and
//! column so `shardgate check` can show them all at once.

mod reader;
pub mod spanned;
mod values;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use values::{parse_duration, parse_size, BoundType, BoundValue};

/// The whole shard map.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (relative paths in the map are resolved against its folder).
    pub source: PathBuf,
    /// Postgres-protocol listen address, `host:port`.
    pub listen: String,
    /// Prometheus `/metrics` listen address, `host:port`.
    pub metrics: Option<String>,
    pub tls: Option<TlsConfig>,
    /// The database name clients connect to; defaults to the first shard's database.
    pub database: String,
    pub users: Vec<UserConfig>,
    pub auth: AuthMethod,
    pub pool: PoolConfig,
    pub shards: Vec<ShardConfig>,
    pub functions: Vec<FunctionConfig>,
    pub tables: Vec<TableConfig>,
    pub default_table: DefaultTable,
    pub two_phase_commit: bool,
    /// Memory a single fan-out merge may hold before it is ended with `53200`.
    pub max_merge_memory: u64,
    pub migrations: MigrationsConfig,
    /// Runtime threads of `serve`: 1 (default) is a single-threaded event
    /// loop like PgBouncer's, the fastest on small machines (measured); 0 is
    /// one per CPU.
    pub threads: usize,
    /// How often the proxy re-reads the routing facts (key types, column
    /// orders, replicated tables' per-shard defaults) from the catalog, so
    /// tables created or changed directly on the shards (e.g. by `shardgate
    /// migrate`) are learned; zero turns the periodic read off.
    pub catalog_refresh: Duration,
    /// Client-side resource limits (message size, buffered bytes, logins).
    pub limits: ClientLimits,
    /// How client database names other than `database` are served; `None`
    /// (the default): refused with 3D000.
    pub other_databases: Option<OtherDatabasesConfig>,
    /// The admin console; `None` (the default): no console.
    pub admin: Option<AdminConfig>,
    /// On SIGTERM/SIGINT, how long clients may finish their transactions
    /// before they are ended with 57P01 anyway.
    pub shutdown_timeout: Duration,
}

/// `admin: { database, users }`: logging in to `database` as one of `users`
/// (listed in `users:` too, with their passwords) opens the admin console
/// (`SHOW POOLS`, `RELOAD`, …) instead of the shards. The application's users
/// are never admins unless listed here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub database: String,
    pub users: Vec<String>,
}

impl AdminConfig {
    pub const DEFAULT_DATABASE: &'static str = "shardgate";
}

/// `other_databases`: a login to another database name than `database`
/// (psql's `\c postgres`, admin tools, a database created through the
/// proxy) is served by a plain pooler to that database on one shard's
/// server, like PgBouncer's `*` entry. Off unless the map names the shard:
/// it makes every database of that server the map's users can reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherDatabasesConfig {
    /// Index of the shard whose server (host, port, user, password of its
    /// URL) serves them.
    pub shard: usize,
    /// Databases pooled at once, at most: the names come from clients, and
    /// each pool may hold `pool.size` backends.
    pub max_databases: usize,
    /// How long a database's pool stays after its last client left; zero
    /// closes its backends at once, so the database has no sessions left,
    /// as directly (DROP DATABASE waits only 5 s for other sessions).
    pub idle_timeout: Duration,
}

impl OtherDatabasesConfig {
    pub const DEFAULT_MAX_DATABASES: usize = 16;
}

/// Bounds on what clients can make the proxy hold (issue #15-6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// Largest message a client may send (`max_message_size`); larger ones
    /// are refused from their length header with 54000 and the connection
    /// closed. Postgres accepts up to 1 GiB; a proxy holding whole messages
    /// for several clients needs a smaller default.
    pub max_message_size: usize,
    /// Bytes of large client messages all sessions together may hold
    /// (`max_client_memory`; each counted twice, read and on its way to the
    /// shard); a session whose message does not fit waits (its socket is
    /// not read) until others finish. At least twice `max_message_size`.
    pub max_client_memory: usize,
    /// How long a client may take from connect to authenticated (`login_timeout`).
    pub login_timeout: Duration,
    /// Connections not yet authenticated, at most (`max_pending_logins`);
    /// more are refused with 53300 at once.
    pub max_pending_logins: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            max_message_size: 64 << 20,
            max_client_memory: 256 << 20,
            login_timeout: Duration::from_secs(15),
            max_pending_logins: 10_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct UserConfig {
    pub name: String,
    pub password: Option<Secret>,
}

/// How a user's password is stored in the map.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    Plain(String),
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, as in `pg_authid`.
    ScramVerifier(String),
    /// `md5` + md5(password || username), as in `pg_authid`.
    Md5Hash(String),
}

impl fmt::Debug for Secret {
    /// Never prints the secret itself.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Plain(_) => f.write_str("Plain(***)"),
            Secret::ScramVerifier(_) => f.write_str("ScramVerifier(***)"),
            Secret::Md5Hash(_) => f.write_str("Md5Hash(***)"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ScramSha256,
    Md5,
    Trust,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A backend connection is returned to the pool at the end of every transaction.
    Transaction,
    /// A backend connection is pinned to the client for its whole session.
    Session,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub mode: PoolMode,
    /// Backend connections per shard.
    pub size: u32,
    pub connect_timeout: Duration,
    pub checkout_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
    /// A statement (one round from request to ReadyForQuery on a shard)
    /// not answered within this fails with 57014 naming the shard, and its
    /// backend is dropped: the bound on a hung shard. Zero: none.
    pub query_timeout: Duration,
    /// A client idle inside a transaction for this long is disconnected
    /// (25P03, as Postgres' idle_in_transaction_session_timeout), freeing
    /// its backends. Zero: never.
    pub idle_transaction_timeout: Duration,
    /// How long a statement waits for a shard paused by PAUSE (admin
    /// console) before it fails with 57P03.
    pub pause_timeout: Duration,
}

impl PoolConfig {
    /// Whether pools built with `other` would be the same: the settings a
    /// session reads each time (mode, query and idle-transaction timeouts)
    /// apply without new pools.
    pub fn builds_like(&self, other: &PoolConfig) -> bool {
        self.size == other.size
            && self.connect_timeout == other.connect_timeout
            && self.checkout_timeout == other.checkout_timeout
            && self.idle_timeout == other.idle_timeout
            && self.max_lifetime == other.max_lifetime
            && self.pause_timeout == other.pause_timeout
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Transaction,
            size: 20,
            connect_timeout: Duration::from_secs(5),
            checkout_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            query_timeout: Duration::ZERO,
            idle_transaction_timeout: Duration::ZERO,
            pause_timeout: Duration::from_secs(120),
        }
    }
}

/// One shard: an ordinary Postgres database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardConfig {
    pub name: String,
    /// The URL as written (after `${VAR}` substitution).
    pub url: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
}

/// A named sharding function.
#[derive(Debug, Clone)]
pub struct FunctionConfig {
    pub name: String,
    pub kind: FunctionKind,
}

#[derive(Debug, Clone)]
pub enum FunctionKind {
    /// Postgres `PARTITION BY HASH` compatible; modulus = shard count.
    Hash,
    /// Integer key modulo shard count.
    Modulo,
    ConsistentHash {
        vnodes: u32,
    },
    Range {
        key_type: BoundType,
        ranges: Vec<RangeConfig>,
    },
    List {
        key_type: BoundType,
        values: Vec<(BoundValue, usize)>,
        default: Option<usize>,
    },
    Tenant {
        mode: TenantMode,
        /// Tenant id → shard index.
        tenants: Vec<(String, usize)>,
        default: Option<usize>,
        /// Schema name for a tenant in `schema` mode; `{tenant}` is replaced by the id.
        schema_template: String,
    },
}

impl FunctionKind {
    pub fn name(&self) -> &'static str {
        match self {
            FunctionKind::Hash => "hash",
            FunctionKind::Modulo => "modulo",
            FunctionKind::ConsistentHash { .. } => "consistent_hash",
            FunctionKind::Range { .. } => "range",
            FunctionKind::List { .. } => "list",
            FunctionKind::Tenant { .. } => "tenant",
        }
    }
}

/// A half-open range `[from, to)` and its shard index; `None` is an open end.
#[derive(Debug, Clone)]
pub struct RangeConfig {
    pub from: Option<BoundValue>,
    pub to: Option<BoundValue>,
    pub shard: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantMode {
    /// Each tenant's rows live in the shard's database, found by the key.
    Database,
    /// Each tenant has its own schema; it is set as `search_path` for the transaction.
    Schema,
}

#[derive(Debug, Clone)]
pub struct TableConfig {
    pub name: String,
    pub placement: TablePlacement,
}

#[derive(Debug, Clone)]
pub enum TablePlacement {
    /// Rows spread over shards by `function` applied to column `key`.
    Sharded { key: String, function: String },
    /// A full copy on every shard.
    Replicated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultTable {
    Replicated,
    Error,
}

#[derive(Debug, Clone)]
pub struct MigrationsConfig {
    pub dir: PathBuf,
    /// Further migration trees for other groups of databases
    /// (`migrations.sets`), each with its own ledger in its databases.
    pub sets: Vec<MigrationSet>,
}

/// A named migration tree applied to its own databases
/// (`shardgate migrate --set NAME …`).
#[derive(Debug, Clone)]
pub struct MigrationSet {
    pub name: String,
    pub dir: PathBuf,
    pub databases: Vec<ShardConfig>,
}

impl Config {
    pub fn shard_index(&self, name: &str) -> Option<usize> {
        self.shards.iter().position(|s| s.name == name)
    }

    pub fn function(&self, name: &str) -> Option<&FunctionConfig> {
        self.functions.iter().find(|f| f.name == name)
    }

    pub fn table(&self, name: &str) -> Option<&TableConfig> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// Reads and validates a shard map file; `${VAR}` comes from the process environment.
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        Self::load_with_env(path, &|name| std::env::var(name).ok())
    }

    pub fn load_with_env(
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text, env).map_err(LoadError::Invalid)
    }

    /// Parses map text; `path` is used for error messages and relative paths.
    pub fn parse(
        path: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        reader::read(path, text, env)
    }
}

/// One problem in a shard map, with its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Every problem found in a shard map, in document order.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read shard map {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid shard map:\n{0}")]
    Invalid(ConfigErrors),
}
