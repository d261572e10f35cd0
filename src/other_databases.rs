//! Client database names other than the map's `database` (`other_databases`
//! in the map, PgBouncer's `*` entry): each is served by a plain pooler (no
//! routing) to that database on one shard's server, with the map's users,
//! authentication and pool settings.
//!
//! A name's pool is made at the first login to it and dropped when its last
//! client has left (after `idle_timeout`, default at once), so a database
//! nobody uses through shardgate has no sessions from it, as directly:
//! `DROP DATABASE` and `CREATE DATABASE … TEMPLATE` refuse a database with
//! sessions. Clients choose the names, so at most `max_databases` pools
//! exist at once; an idle pool (kept by `idle_timeout`) gives way to a new
//! name, a pool with clients does not.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::backend::{BackendError, ShardPool};
use crate::config::OtherDatabasesConfig;
use crate::protocol::synth::ProxyError;
use crate::server::Shared;

/// Why a login to another database name cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OtherDatabaseError {
    /// `max_databases` pools exist and each has clients.
    #[error(
        "too many databases in use through shardgate: \"{database}\" would be one more than \
         other_databases.max_databases ({max}), and each of those has clients"
    )]
    Full { database: String, max: usize },
    /// `other_databases.shard` is not a shard of the map (the reader
    /// refuses such maps; kept for maps built in code).
    #[error("other_databases names shard #{0}, which the shard map does not have")]
    NoShard(usize),
}

impl OtherDatabaseError {
    /// The FATAL the client gets: 53300, as Postgres' own connection limits.
    pub fn to_proxy_error(&self) -> ProxyError {
        match self {
            OtherDatabaseError::Full { .. } => ProxyError::fatal("53300", self.to_string())
                .with_hint(
                    "raise other_databases.max_databases in the shard map, or close the \
                     connections to other databases that are not needed",
                ),
            OtherDatabaseError::NoShard(_) => ProxyError::fatal("XX000", self.to_string()),
        }
    }
}

/// The pools of other database names.
#[derive(Debug)]
pub struct OtherDatabases {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: OtherDatabasesConfig,
    pools: Mutex<HashMap<String, Entry>>,
    /// Source of `Entry::idle_epoch`: unique over all entries, so a delayed
    /// drop planned for a pool since evicted never hits a newer pool of
    /// the same name.
    epochs: AtomicU64,
}

struct Entry {
    /// The plain pooler's state (config, one pool) its sessions run on.
    shared: Arc<Shared>,
    /// Leases alive: sessions, and logins being checked.
    clients: usize,
    /// Set anew each time `clients` falls to zero; a delayed drop goes
    /// ahead only if no client came and went since it was planned.
    idle_epoch: u64,
    idle_since: Instant,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("clients", &self.clients)
            .field("idle_epoch", &self.idle_epoch)
            .finish_non_exhaustive()
    }
}

impl OtherDatabases {
    pub fn new(settings: OtherDatabasesConfig) -> OtherDatabases {
        OtherDatabases {
            inner: Arc::new(Inner {
                settings,
                pools: Mutex::new(HashMap::new()),
                epochs: AtomicU64::new(1),
            }),
        }
    }

    /// A client for `database`: its pool, made now if there is none. At
    /// `max_databases` the pool idle the longest is dropped for it; if every
    /// pool has clients, the login is refused.
    pub fn acquire(&self, main: &Shared, database: &str) -> Result<Lease, OtherDatabaseError> {
        let database = postgres_name(database);
        let mut evicted = None;
        let mut pools = self.inner.lock();
        if let Some(entry) = pools.get_mut(database) {
            entry.clients += 1;
            return Ok(self.lease(database, entry.shared.clone()));
        }
        if pools.len() >= self.inner.settings.max_databases {
            let idle = pools
                .iter()
                .filter(|(_, entry)| entry.clients == 0)
                .min_by_key(|(_, entry)| entry.idle_since)
                .map(|(name, _)| name.clone());
            match idle {
                Some(name) => evicted = pools.remove(&name),
                None => {
                    return Err(OtherDatabaseError::Full {
                        database: database.to_string(),
                        max: self.inner.settings.max_databases,
                    })
                }
            }
        }
        let shard = self.inner.settings.shard;
        let shared = Arc::new(
            main.plain_pooler(database, shard)
                .ok_or(OtherDatabaseError::NoShard(shard))?,
        );
        pools.insert(
            database.to_string(),
            Entry {
                shared: shared.clone(),
                clients: 1,
                idle_epoch: 0,
                idle_since: Instant::now(),
            },
        );
        drop(pools);
        // Its backends close outside the lock.
        drop(evicted);
        Ok(self.lease(database, shared))
    }

    fn lease(&self, database: &str, shared: Arc<Shared>) -> Lease {
        Lease {
            inner: self.inner.clone(),
            database: database.to_string(),
            shared,
        }
    }

    /// (database, active, idle) of every pool, for the metrics scrape.
    pub fn pool_states(&self) -> Vec<(String, u32, u32)> {
        let pools = self.inner.lock();
        let mut states: Vec<(String, u32, u32)> = pools
            .iter()
            .map(|(name, entry)| {
                let (open, idle) = entry.shared.pools.get(0).map_or((0, 0), ShardPool::state);
                (name.clone(), open.saturating_sub(idle), idle)
            })
            .collect();
        states.sort();
        states
    }

    /// Database names pooled now.
    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        match self.pools.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A lease ended: the last one drops the pool at once when
    /// `idle_timeout` is zero or the pool never connected (a database the
    /// server does not have must not hold a place), else after
    /// `idle_timeout` unless a client came meanwhile.
    fn release(self: &Arc<Self>, database: &str) {
        let mut pools = self.lock();
        let Some(entry) = pools.get_mut(database) else {
            return;
        };
        entry.clients = entry.clients.saturating_sub(1);
        if entry.clients > 0 {
            return;
        }
        entry.idle_epoch = self.epochs.fetch_add(1, Ordering::Relaxed);
        entry.idle_since = Instant::now();
        let never_connected = entry
            .shared
            .pools
            .get(0)
            .is_none_or(|pool| pool.server_parameters().is_none());
        let linger = self.settings.idle_timeout;
        let runtime = tokio::runtime::Handle::try_current().ok();
        match runtime {
            Some(runtime) if !linger.is_zero() && !never_connected => {
                let epoch = entry.idle_epoch;
                let inner = self.clone();
                let database = database.to_string();
                runtime.spawn(async move {
                    tokio::time::sleep(linger).await;
                    inner.expire(&database, epoch);
                });
            }
            _ => {
                let removed = pools.remove(database);
                drop(pools);
                drop(removed);
            }
        }
    }

    /// Drops `database`'s pool if it stayed without clients since `epoch`.
    fn expire(&self, database: &str, epoch: u64) {
        let mut pools = self.lock();
        let idle = pools
            .get(database)
            .is_some_and(|entry| entry.clients == 0 && entry.idle_epoch == epoch);
        if idle {
            let removed = pools.remove(database);
            drop(pools);
            drop(removed);
        }
    }
}

/// A client's hold on the pool of its database; the pool may go once the
/// last lease is dropped.
pub struct Lease {
    inner: Arc<Inner>,
    database: String,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// The plain pooler the client's session runs on.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.inner.release(&self.database);
    }
}

/// Logs in a client to `database` (not the map's): its lease and the
/// ParameterStatus values of the serving server. Unless the pool has a
/// connection open already, one is made now, so a database the server does
/// not have fails here with the server's own FATAL (3D000), not at the
/// client's first statement.
pub async fn login(
    main: &Shared,
    database: &str,
) -> Result<(Lease, Vec<(String, String)>), ProxyError> {
    let Some(registry) = &main.other_databases else {
        return Err(not_served(main, database));
    };
    let lease = registry.acquire(main, database).map_err(|error| {
        if matches!(error, OtherDatabaseError::Full { .. }) {
            main.metrics.other_database_refused();
        }
        tracing::warn!(database = %database, "{error}");
        error.to_proxy_error()
    })?;
    let Some(pool) = lease.shared.pools.get(0) else {
        return Err(ProxyError::fatal("XX000", "no pool for this database"));
    };
    if let (Some(parameters), (1.., _)) = (pool.server_parameters(), pool.state()) {
        return Ok((lease, parameters));
    }
    match pool.checkout().await {
        Ok(conn) => {
            let parameters = conn.server_parameters().to_vec();
            pool.release(conn).await;
            Ok((lease, parameters))
        }
        Err(BackendError::Server { error, .. }) => {
            // The server's own words: `database "x" does not exist`.
            let mut refused = ProxyError::fatal(error.sqlstate, error.message);
            refused.detail = error.detail;
            refused.hint = error.hint;
            Err(refused)
        }
        Err(error) => Err(ProxyError::fatal(error.sqlstate(), error.to_string())),
    }
}

/// The 3D000 of a map without `other_databases`, naming the option.
pub fn not_served(main: &Shared, database: &str) -> ProxyError {
    ProxyError::fatal("3D000", format!("database \"{database}\" does not exist")).with_hint(
        format!(
            "this shardgate serves database \"{}\"; to serve other database names from one \
             shard's server, set other_databases: {{ shard: <name> }} in the shard map",
            main.config.database
        ),
    )
}

/// Postgres keeps the first 63 bytes of a database name from a startup
/// packet (NAMEDATALEN - 1, cut at a character boundary): longer names that
/// share them are one database, and one pool.
fn postgres_name(name: &str) -> &str {
    const MAX: usize = 63;
    if name.len() <= MAX {
        return name;
    }
    let mut end = MAX;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cut_like_postgres_cuts_them() {
        assert_eq!(postgres_name("app"), "app");
        let long = "x".repeat(70);
        assert_eq!(postgres_name(&long).len(), 63);
        let wide = format!("{}é", "x".repeat(62));
        assert_eq!(postgres_name(&wide), "x".repeat(62));
    }

    #[test]
    fn the_cap_error_names_the_setting() {
        let error = OtherDatabaseError::Full {
            database: "x".into(),
            max: 2,
        }
        .to_proxy_error();
        assert_eq!((error.severity, error.code), ("FATAL", "53300"));
        assert!(error.message.contains("other_databases.max_databases (2)"));
    }
}
