//! The running map as one snapshot ([`Shared`]) with a generation number,
//! replaced whole by a reload (SIGHUP, `systemctl reload`).
//!
//! A session keeps the snapshot it has for the whole of a transaction and
//! takes the newest one between transactions (`Session::adopt_newest_map`),
//! so no client is disconnected and no transaction sees two maps. Pools
//! and the two-phase coordinator go over to the new snapshot when their
//! settings did not change; a new map that would route a table differently
//! from the placement recorded on the shards is refused, and the running
//! map stays (see `placement`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};

use crate::config::Config;
use crate::metrics::ReloadResult;
use crate::server::{ServerError, Shared};

/// What every snapshot points to: the newest generation, and the newest
/// snapshot itself (weakly: the [`Cluster`] owns it).
#[derive(Debug, Default)]
pub struct ClusterLink {
    newest_generation: AtomicU64,
    newest: RwLock<Weak<Shared>>,
}

impl ClusterLink {
    /// The newest snapshot when it is newer than `generation` (one atomic
    /// load when it is not: this runs before every client message).
    pub fn newer_than(&self, generation: u64) -> Option<Arc<Shared>> {
        if self.newest_generation.load(Ordering::Acquire) <= generation {
            return None;
        }
        let newest = match self.newest.read() {
            Ok(newest) => newest.upgrade(),
            Err(poisoned) => poisoned.into_inner().upgrade(),
        };
        newest.filter(|shared| shared.generation > generation)
    }

    fn publish(&self, shared: &Arc<Shared>) {
        match self.newest.write() {
            Ok(mut newest) => *newest = Arc::downgrade(shared),
            Err(poisoned) => *poisoned.into_inner() = Arc::downgrade(shared),
        }
        self.newest_generation
            .store(shared.generation, Ordering::Release);
    }
}

/// The running proxy's map: the current snapshot and how to replace it.
pub struct Cluster {
    current: RwLock<Arc<Shared>>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    /// The console's SHUTDOWN, heard by `shardgate serve` like SIGTERM.
    shutdown: tokio::sync::Notify,
}

/// What a reload applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub generation: u64,
    /// Backend pools kept with their connections (false: new pools, the
    /// old ones drain as their sessions give their backends back).
    pub pools_kept: bool,
    /// Settings that changed in the file but apply only after a restart.
    pub needs_restart: Vec<&'static str>,
}

/// Why a reload left the running map in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not load (its error names file:line:col).
    #[error("{0}")]
    Invalid(String),
    #[error(
        "the new map changes the shards ({old} -> {new}): adding, removing, renaming, \
         reordering or re-addressing shards needs a restart (and, for sharded tables, \
         moving their rows)"
    )]
    ShardsChanged { old: String, new: String },
    #[error(transparent)]
    Build(#[from] ServerError),
    #[error(
        "cannot compare the new map with the placements recorded on the shards: no shard \
         answered"
    )]
    PlacementsUnread,
    #[error("the new map disagrees with where the data is: {0}")]
    PlacementDiffers(String),
}

impl Cluster {
    pub fn new(first: Arc<Shared>) -> Arc<Cluster> {
        first.link.publish(&first);
        first.metrics.set_map_generation(first.generation);
        Arc::new(Cluster {
            current: RwLock::new(first),
            reloading: tokio::sync::Mutex::new(()),
            shutdown: tokio::sync::Notify::new(),
        })
    }

    /// Asks the process to stop gracefully (the console's SHUTDOWN).
    pub fn request_shutdown(&self) {
        self.shutdown.notify_one();
    }

    /// Completes when a graceful stop was asked for by [`Cluster::request_shutdown`].
    pub async fn shutdown_requested(&self) {
        self.shutdown.notified().await
    }

    /// The snapshot new clients and background tasks use.
    pub fn current(&self) -> Arc<Shared> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Validates `config` against the running map and the shards, and makes
    /// it the running map; on any error the running map stays. Counted in
    /// `shardgate_config_reloads_total` and logged either way.
    pub async fn reload(&self, config: Result<Config, String>) -> Result<Reloaded, ReloadError> {
        let _one_at_a_time = self.reloading.lock().await;
        let current = self.current();
        let result = match config {
            Ok(config) => self.replace(&current, config).await,
            Err(error) => Err(ReloadError::Invalid(error)),
        };
        match &result {
            Ok(done) => {
                current.metrics.config_reload(ReloadResult::Success);
                tracing::info!(
                    generation = done.generation,
                    pools_kept = done.pools_kept,
                    "shard map reloaded: sessions take it at their next transaction"
                );
                for setting in &done.needs_restart {
                    tracing::warn!(
                        setting,
                        "changed in the map, but applies only after a restart: the running value stays"
                    );
                }
            }
            Err(error) => {
                current.metrics.config_reload(ReloadResult::Failure);
                tracing::error!(%error, "shard map reload failed: the running map stays");
            }
        }
        result
    }

    async fn replace(
        &self,
        current: &Arc<Shared>,
        config: Config,
    ) -> Result<Reloaded, ReloadError> {
        let old = &current.config;
        if old.shards != config.shards {
            let names = |c: &Config| {
                c.shards
                    .iter()
                    .map(|s| format!("{}@{}:{}/{}", s.name, s.host, s.port, s.database))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(ReloadError::ShardsChanged {
                old: names(old),
                new: names(&config),
            });
        }
        let needs_restart = settings_needing_restart(old, &config);
        let pools_kept = old.pool.builds_like(&config.pool);
        let generation = current.generation + 1;
        let next = Shared::from_config(config, current.process_parts(), generation, Some(current))?;
        let next = Arc::new(next);
        if let Some(router) = &next.router {
            // The new map is compared with the recorded placements before
            // any statement is routed by it.
            next.refresh_catalog().await;
            if !next.placements_read() {
                return Err(ReloadError::PlacementsUnread);
            }
            let before = current.router.as_ref().map(|r| r.map().fenced.clone());
            let newly_fenced: Vec<String> = router
                .map()
                .fenced
                .iter()
                .filter(|(table, fence)| {
                    before
                        .as_ref()
                        .and_then(|b| b.get(*table))
                        .is_none_or(|old| old.message != fence.message)
                })
                .map(|(_, fence)| fence.message.clone())
                .collect();
            if !newly_fenced.is_empty() {
                return Err(ReloadError::PlacementDiffers(newly_fenced.join("; ")));
            }
        }
        next.link.publish(&next);
        next.metrics.set_map_generation(next.generation);
        match self.current.write() {
            Ok(mut slot) => *slot = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        Ok(Reloaded {
            generation,
            pools_kept,
            needs_restart,
        })
    }
}

/// The settings read once at startup (listeners, TLS, runtime threads,
/// client limits, other databases): changed in the file, they are reported.
fn settings_needing_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |name: &'static str, differs: bool| {
        if differs {
            changed.push(name);
        }
    };
    check("listen", old.listen != new.listen);
    check("metrics", old.metrics != new.metrics);
    check("tls", format!("{:?}", old.tls) != format!("{:?}", new.tls));
    check("threads", old.threads != new.threads);
    check(
        "limits",
        format!("{:?}", old.limits) != format!("{:?}", new.limits),
    );
    check(
        "other_databases",
        format!("{:?}", old.other_databases) != format!("{:?}", new.other_databases),
    );
    check("database", old.database != new.database);
    changed
}
