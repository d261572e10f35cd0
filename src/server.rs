//! The running proxy: shared state, the listener, and an in-process handle
//! (used by `shardgate serve` and by the tests).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backend::{release, BackendError, Pools};
use crate::cluster::{Cluster, ClusterLink};
use crate::config::{Config, DefaultTable};
use crate::executor::fanout::FanoutExecutor;
use crate::executor::recovery::{self, RecoveryOptions};
use crate::executor::twophase::TwoPhase;
use crate::frontend::auth::{CredentialError, LoginFailures, UserDirectory};
use crate::frontend::cancel::{CancelRegistry, CancelSlot, ClientInfo};
use crate::frontend::limits::ClientLimiter;
use crate::frontend::session::Session;
use crate::frontend::startup::{self, Accepted, KeyGenerator};
use crate::frontend::stop::StopWhen;
use crate::frontend::tls;
use crate::metrics::Metrics;
use crate::other_databases::OtherDatabases;
use crate::placement;
use crate::router::catalog::{self, CatalogError};
use crate::router::{Router, RouterError, ShardMap};

/// State every client task shares: one snapshot of the running map (see
/// `cluster`). A reload builds a new one; the process-wide parts (metrics,
/// limits, keys, cancels, TLS, other databases) go over to it unchanged.
pub struct Shared {
    pub config: Arc<Config>,
    pub pools: Pools,
    pub users: UserDirectory,
    pub tls: Option<pgwire::tokio::TlsAcceptor>,
    pub keys: Arc<KeyGenerator>,
    pub cancels: Arc<CancelRegistry>,
    pub metrics: Arc<Metrics>,
    /// `max_client_memory` and the login slots (see `frontend::limits`).
    pub limiter: Arc<ClientLimiter>,
    /// Failed logins: counted and logged (rate-limited).
    pub login_failures: Arc<LoginFailures>,
    /// SQL routing; `None` when the map names no tables (a plain pooler:
    /// statements go to the hinted shard or the first one).
    pub router: Option<Arc<Router>>,
    /// The two-phase-commit coordinator for multi-shard transactions.
    pub twophase: TwoPhase,
    /// Runs and merges statements that need several shards.
    pub fanout: FanoutExecutor,
    /// Shards that just failed to answer; any-shard statements try others
    /// first.
    pub suspects: crate::backend::SuspectShards,
    /// Serialises catalog reads; `catalog_reads` counts completed ones.
    catalog_lock: tokio::sync::Mutex<()>,
    catalog_reads: std::sync::atomic::AtomicU64,
    /// Some shard's recorded placements were read and compared; until then
    /// every map table is fenced ([`placement::unchecked`]).
    placements_read: std::sync::atomic::AtomicBool,
    /// The pools of database names other than `config.database`
    /// (`other_databases`); `None` when the map does not serve them.
    pub other_databases: Option<Arc<OtherDatabases>>,
    /// This snapshot's number: 1 at start, one more per reload.
    pub generation: u64,
    /// Where sessions find a newer snapshot (see `cluster`).
    pub link: Arc<ClusterLink>,
}

/// The parts of [`Shared`] that live as long as the process, whatever the
/// map says after a reload.
#[derive(Clone)]
pub struct ProcessParts {
    pub metrics: Arc<Metrics>,
    pub limiter: Arc<ClientLimiter>,
    pub login_failures: Arc<LoginFailures>,
    pub keys: Arc<KeyGenerator>,
    pub cancels: Arc<CancelRegistry>,
    pub tls: Option<pgwire::tokio::TlsAcceptor>,
    pub other_databases: Option<Arc<OtherDatabases>>,
    pub link: Arc<ClusterLink>,
}

impl Shared {
    /// The snapshot for `config`. With `previous` (a reload), its pools and
    /// two-phase coordinator are kept when their settings did not change, so
    /// idle backends and in-flight recovery go over to the new snapshot.
    pub fn from_config(
        config: Config,
        parts: ProcessParts,
        generation: u64,
        previous: Option<&Shared>,
    ) -> Result<Shared, ServerError> {
        // Without tables and with `default_table: error` the map is a plain
        // pooler (hints or the first shard). With `default_table: replicated`
        // every table is replicated: writes must reach every shard, so the
        // router runs (with one shard there is nothing to route).
        let router = if config.tables.is_empty()
            && (config.default_table == DefaultTable::Error || config.shards.len() == 1)
        {
            None
        } else {
            // Nothing is routed by a placement not compared with the records
            // yet: the first catalog read lifts this fence.
            let map = ShardMap::from_config(&config)?.with_fence(placement::unchecked(&config));
            Some(Arc::new(Router::new(map)))
        };
        let same_shards = |old: &Config| old.shards == config.shards;
        let pools = match previous {
            Some(old) if same_shards(&old.config) && old.config.pool.builds_like(&config.pool) => {
                old.pools.clone()
            }
            _ => {
                let pools = Pools::new(&config);
                // A PAUSE stays in force over a reload that makes new pools.
                if let Some(old) = previous {
                    for (new, old) in pools.shards.iter().zip(old.pools.shards.iter()) {
                        if old.is_paused() {
                            new.pause();
                        }
                    }
                }
                pools
            }
        };
        let twophase = match previous {
            Some(old)
                if same_shards(&old.config)
                    && old.config.two_phase_commit == config.two_phase_commit
                    && old.config.pool.connect_timeout == config.pool.connect_timeout =>
            {
                old.twophase.clone()
            }
            _ => TwoPhase::new(&config, Some(parts.metrics.clone())),
        };
        Ok(Shared {
            users: UserDirectory::from_config(&config)?,
            limiter: parts.limiter,
            login_failures: parts.login_failures,
            metrics: parts.metrics,
            router,
            twophase,
            fanout: FanoutExecutor::new(&config),
            suspects: crate::backend::SuspectShards::new(config.shards.len()),
            catalog_lock: tokio::sync::Mutex::new(()),
            catalog_reads: std::sync::atomic::AtomicU64::new(0),
            placements_read: std::sync::atomic::AtomicBool::new(false),
            other_databases: parts.other_databases,
            pools,
            tls: parts.tls,
            keys: parts.keys,
            cancels: parts.cancels,
            generation,
            link: parts.link,
            config: Arc::new(config),
        })
    }

    /// What a reload carries over to the next snapshot.
    pub fn process_parts(&self) -> ProcessParts {
        ProcessParts {
            metrics: self.metrics.clone(),
            limiter: self.limiter.clone(),
            login_failures: self.login_failures.clone(),
            keys: self.keys.clone(),
            cancels: self.cancels.clone(),
            tls: self.tls.clone(),
            other_databases: self.other_databases.clone(),
            link: self.link.clone(),
        }
    }

    /// Whether the recorded placements were read and compared since this
    /// snapshot was made.
    pub fn placements_read(&self) -> bool {
        self.placements_read
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The state of a plain pooler (no router, one shard) for `database` on
    /// the server of shard `shard`, for the clients of another database
    /// name: the map's pool settings and users, this proxy's key generator,
    /// client limits and metrics (recorded as that shard's). `None` if the
    /// map has no such shard.
    pub fn plain_pooler(&self, database: &str, shard: usize) -> Option<Shared> {
        let mut config = (*self.config).clone();
        let mut serving = config.shards.get(shard)?.clone();
        serving.database = database.to_string();
        config.database = database.to_string();
        config.shards = vec![serving];
        config.tables.clear();
        config.functions.clear();
        config.default_table = DefaultTable::Error;
        config.other_databases = None;
        let metrics = self.metrics.for_shard(shard);
        Some(Shared {
            limiter: self.limiter.clone(),
            login_failures: Arc::new(LoginFailures::new(metrics.clone())),
            twophase: TwoPhase::new(&config, None),
            fanout: FanoutExecutor::new(&config),
            metrics,
            router: None,
            suspects: crate::backend::SuspectShards::new(1),
            catalog_lock: tokio::sync::Mutex::new(()),
            catalog_reads: std::sync::atomic::AtomicU64::new(0),
            placements_read: std::sync::atomic::AtomicBool::new(true),
            users: self.users.clone(),
            pools: Pools::new(&config),
            tls: None,
            keys: self.keys.clone(),
            cancels: Arc::new(CancelRegistry::default()),
            other_databases: None,
            generation: 1,
            link: Arc::new(ClusterLink::default()),
            config: Arc::new(config),
        })
    }

    /// Re-reads key types and column orders from the first shard that
    /// answers. Returns true if a read completed since the call (callers
    /// then retry the statement once). Sessions asking at the same time
    /// share one read.
    pub async fn refresh_catalog(&self) -> bool {
        use std::sync::atomic::Ordering;
        let Some(router) = &self.router else {
            return false;
        };
        let before = self.catalog_reads.load(Ordering::Acquire);
        let _reading = self.catalog_lock.lock().await;
        if self.catalog_reads.load(Ordering::Acquire) != before {
            return true;
        }
        let result = self.read_catalog(&router.map()).await;
        match result {
            Ok(facts) => {
                if let Some(bytewise) = facts.bytewise_collation {
                    self.fanout.set_text_collation_bytewise(bytewise);
                }
                if let Some(aggregates) = &facts.aggregates {
                    self.fanout.set_aggregate_names(aggregates.iter().cloned());
                }
                // Placement epochs: compare the map with the placements
                // recorded on the shards (recording those of tables seen
                // for the first time); differing tables are fenced.
                let map = router.map();
                let key_types = map.with_catalog(&facts).key_types;
                let fenced = match placement::sync(&self.config, &key_types).await {
                    Some(fenced) => {
                        self.placements_read.store(true, Ordering::Release);
                        fenced
                    }
                    None => map.fenced.clone(),
                };
                let fence_changed = fenced != map.fenced;
                if fence_changed {
                    for (table, fence) in &fenced {
                        tracing::error!(table = %table, "{}", fence.message);
                    }
                    for table in map.fenced.keys().filter(|t| !fenced.contains_key(*t)) {
                        tracing::info!(table = %table, "placement matches again: routing resumes");
                    }
                }
                // A periodic read that found nothing new keeps the analysis cache.
                if fence_changed || !map.knows(&facts) {
                    router.learn(|map| map.with_catalog(&facts).with_fence(fenced));
                }
                self.read_type_oids().await;
                self.catalog_reads.fetch_add(1, Ordering::AcqRel);
                true
            }
            Err(error) => {
                tracing::warn!(%error, "reading the catalog failed");
                false
            }
        }
    }

    /// Maps every shard's user-defined type OIDs to the first shard's
    /// (`protocol::type_oids`). Kept as it was when a shard cannot be read.
    async fn read_type_oids(&self) {
        if self.config.shards.len() < 2 {
            return;
        }
        let timeout = self.config.pool.connect_timeout;
        let reads = self
            .config
            .shards
            .iter()
            .map(|shard| catalog::load_types(shard, timeout));
        let mut types = Vec::with_capacity(self.config.shards.len());
        for result in futures::future::join_all(reads).await {
            match result {
                Ok(found) => types.push(found),
                Err(error) => {
                    tracing::warn!(%error, "reading the shards' type OIDs failed");
                    return;
                }
            }
        }
        let oids = crate::protocol::type_oids::TypeOids::build(&types);
        if !oids.is_empty() && self.fanout.type_oids().get().is_none() {
            tracing::info!(
                "user-defined types have different OIDs on the shards: clients see the first \
                 shard's, catalog reads go to it"
            );
        }
        self.fanout.type_oids().set(oids);
    }

    async fn read_catalog(&self, map: &ShardMap) -> Result<catalog::CatalogFacts, CatalogError> {
        let timeout = self.config.pool.connect_timeout;
        let mut last_error = None;
        for shard in &self.config.shards {
            match catalog::load(shard, map, timeout).await {
                Ok(facts) => return Ok(facts),
                Err(error) => last_error = Some(error),
            }
        }
        match last_error {
            Some(error) => Err(error),
            None => Ok(catalog::CatalogFacts::default()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("the shard map cannot be used for routing: {0}")]
    Router(#[from] RouterError),
    #[error("cannot serve metrics on {address}: {source}")]
    Metrics {
        address: String,
        source: std::io::Error,
    },
}

impl Pools {
    /// ParameterStatus values of a live shard (cached after the first
    /// connection); the first shard that answers wins.
    pub async fn any_server_parameters(&self) -> Result<Vec<(String, String)>, BackendError> {
        let mut last_error = None;
        for pool in self.shards.iter() {
            if let Some(parameters) = pool.server_parameters() {
                return Ok(parameters);
            }
            match pool.checkout().await {
                Ok(conn) => {
                    let parameters = conn.server_parameters().to_vec();
                    release(conn).await;
                    return Ok(parameters);
                }
                Err(error) => last_error = Some(error),
            }
        }
        match last_error {
            Some(error) => Err(error),
            None => Ok(Vec::new()),
        }
    }
}

/// A proxy running in this process.
pub struct RunningServer {
    pub address: SocketAddr,
    /// Where `/metrics` is served, when the map has `metrics:`.
    pub metrics_address: Option<SocketAddr>,
    /// The snapshot the server started with (a reload makes newer ones:
    /// see [`RunningServer::cluster`]).
    pub shared: Arc<Shared>,
    /// The running map, reloadable.
    pub cluster: Arc<Cluster>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// Background tasks (2PC recovery) stopped with the server.
    background: Vec<JoinHandle<()>>,
}

impl RunningServer {
    /// Graceful stop (SIGTERM, SIGINT): no new clients; each connected one
    /// finishes its transaction and then gets `FATAL 57P01`; those still in
    /// a transaction after `grace` get it at once (their transactions roll
    /// back). Returns when every client is gone, or a few seconds after
    /// that for a client that does not read.
    pub async fn shutdown(self, grace: std::time::Duration) {
        let _ = self.shutdown.send(true);
        let cancels = self.cluster.current().cancels.clone();
        let clients = cancels.stop_all(StopWhen::BetweenTransactions);
        tracing::info!(
            clients,
            grace = ?grace,
            "shutting down: no new clients; each connected one ends after its transaction"
        );
        if !wait_until_empty(&cancels, grace).await {
            let left = cancels.stop_all(StopWhen::Now);
            tracing::warn!(
                clients = left,
                "still in a transaction after shutdown_timeout: ending them now (rolled back)"
            );
            wait_until_empty(&cancels, std::time::Duration::from_secs(5)).await;
        }
        for task in &self.background {
            task.abort();
        }
        let _ = self.task.await;
    }

    /// Stops accepting clients; existing sessions end when their clients leave.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for task in &self.background {
            task.abort();
        }
        let _ = self.task.await;
    }
}

/// Waits until no client is registered, at most `limit`; true if none is.
async fn wait_until_empty(cancels: &CancelRegistry, limit: std::time::Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !cancels.is_empty() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    true
}

/// Binds `config.listen` (port 0 picks a free port) and serves clients.
pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
    let listener =
        TcpListener::bind(&config.listen)
            .await
            .map_err(|source| ServerError::Listen {
                address: config.listen.clone(),
                source,
            })?;
    let address = listener
        .local_addr()
        .map_err(|source| ServerError::Listen {
            address: config.listen.clone(),
            source,
        })?;
    let tls = match &config.tls {
        Some(tls_config) => Some(tls::acceptor(tls_config)?),
        None => None,
    };
    let shard_names: Vec<String> = config.shards.iter().map(|s| s.name.clone()).collect();
    let metrics = Metrics::new(&shard_names);
    let metrics_listener = match &config.metrics {
        Some(metrics_address) => {
            Some(TcpListener::bind(metrics_address).await.map_err(|source| {
                ServerError::Metrics {
                    address: metrics_address.clone(),
                    source,
                }
            })?)
        }
        None => None,
    };
    let parts = ProcessParts {
        limiter: Arc::new(ClientLimiter::new(&config.limits)),
        login_failures: Arc::new(LoginFailures::new(metrics.clone())),
        metrics,
        keys: Arc::new(KeyGenerator::default()),
        cancels: Arc::new(CancelRegistry::default()),
        tls,
        other_databases: config
            .other_databases
            .clone()
            .map(|o| Arc::new(OtherDatabases::new(o))),
        link: Arc::new(ClusterLink::default()),
    };
    let shared = Arc::new(Shared::from_config(config, parts, 1, None)?);
    let cluster = Cluster::new(shared.clone());
    if shared.router.is_some() {
        // Best effort: shards may be down or tables not created yet; routing
        // retries on demand when it needs a fact it does not have.
        shared.refresh_catalog().await;
    }
    let mut background = Vec::new();
    // Also with two_phase_commit off: a map switched off may still have
    // prepared transactions left from before.
    if shared.router.is_some() && shared.config.shards.len() > 1 {
        // Resolves prepared transactions left by crashed coordinators (of
        // any shardgate instance) and checks each shard can prepare.
        background.push(recovery::spawn(
            shared.twophase.clone(),
            RecoveryOptions {
                connect_timeout: shared.config.pool.connect_timeout,
                ..RecoveryOptions::default()
            },
        ));
    }
    // The loops below read the newest snapshot on each round: a reload
    // needs no task restarted.
    if shared.router.is_some() {
        let every_second = cluster.clone();
        background.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let current = every_second.current();
                let Some(router) = &current.router else {
                    continue;
                };
                // No shard answered yet: every map table stays fenced until
                // one does, whatever `catalog_refresh` is. And statements
                // refused for a fenced table make the proxy re-read the
                // recorded placements, at most once a second: the table may
                // have been accepted by an operator or another proxy since.
                if !current.placements_read() || router.take_fence_hit() {
                    current.refresh_catalog().await;
                }
            }
        }));
    }
    {
        // Tables created or changed directly on the shards (`shardgate
        // migrate`, psql) are learned within one `catalog_refresh`.
        let refresh = cluster.clone();
        background.push(tokio::spawn(async move {
            loop {
                let interval = refresh.current().config.catalog_refresh;
                if interval.is_zero() {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
                tokio::time::sleep(interval).await;
                let current = refresh.current();
                if current.router.is_some() {
                    current.refresh_catalog().await;
                }
            }
        }));
    }
    // `backend_up` of a proxy without traffic: probe each shard at startup
    // and every PROBE_EVERY (a no-op for a pool whose connections are all
    // in use), all shards at once so a hanging one delays no other.
    let probe = cluster.clone();
    background.push(tokio::spawn(async move {
        loop {
            let current = probe.current();
            futures::future::join_all(current.pools.shards.iter().map(|p| p.probe())).await;
            drop(current);
            tokio::time::sleep(crate::backend::PROBE_EVERY).await;
        }
    }));
    {
        // Freed memory back to the system after bursts (see `limits`).
        let limiter = shared.limiter.clone();
        background.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                limiter.trim.run_if_requested();
            }
        }));
    }
    let (shutdown, mut stopped) = watch::channel(false);
    let mut metrics_address = None;
    if let Some(listener) = metrics_listener {
        metrics_address = listener.local_addr().ok();
        let scrape = cluster.clone();
        let mut metrics_stopped = shutdown.subscribe();
        let served = crate::metrics::serve(shared.metrics.clone(), listener, move || {
            let scrape_shared = scrape.current();
            scrape_shared
                .metrics
                .record_pools(&scrape_shared.pools.shards);
            if let Some(other) = &scrape_shared.other_databases {
                scrape_shared
                    .metrics
                    .record_other_databases(&other.pool_states());
            }
        });
        tokio::spawn(async move {
            tokio::select! {
                _ = served => {}
                _ = metrics_stopped.changed() => {}
            }
        });
    }
    let accept = cluster.clone();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stopped.changed() => return,
                accepted = listener.accept() => match accepted {
                    Ok((socket, _)) => {
                        tokio::spawn(serve_client(accept.clone(), socket));
                    }
                    Err(error) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
            }
        }
    });
    Ok(RunningServer {
        address,
        metrics_address,
        shared,
        cluster,
        shutdown,
        task,
        background,
    })
}

async fn serve_client(cluster: Arc<Cluster>, socket: tokio::net::TcpStream) {
    let shared = cluster.current();
    let Some(login) = shared.limiter.login() else {
        startup::too_many_logins(&shared, &socket);
        return;
    };
    let accepted = startup::accept(&shared, socket).await;
    drop(login);
    match accepted {
        // A task of its own: this one (sized for the handshake) ends, and
        // an idle client keeps only the session's state; inline, the
        // session's state made every half-open connection's task 2 KB.
        Accepted::Client(client) => {
            tokio::spawn(serve_session(shared, client));
        }
        Accepted::Admin(client) => {
            tokio::spawn(crate::admin::serve(cluster, client));
        }
        Accepted::Cancel | Accepted::Closed => {}
    }
}

/// Who a client is, for the admin console's `SHOW CLIENTS`.
fn client_info(client: &startup::ClientStartup) -> ClientInfo {
    let addr = match &client.io {
        pgwire::tokio::server::MaybeTls::Plain(tcp) => tcp.peer_addr().ok(),
        pgwire::tokio::server::MaybeTls::Tls(tls) => tls.get_ref().0.peer_addr().ok(),
        // Unix sockets have no address of this kind.
        _ => None,
    };
    let application_name = client
        .settings
        .iter()
        .find(|(name, _)| name == "application_name")
        .map_or_else(String::new, |(_, value)| value.clone());
    ClientInfo {
        user: client.user.clone(),
        database: client.database.clone(),
        addr,
        connected_at: Some(std::time::SystemTime::now()),
        application_name,
    }
}

async fn serve_session(shared: Arc<Shared>, mut client: Box<startup::ClientStartup>) {
    let _connected = shared.metrics.client_connected();
    let slot = CancelSlot::default();
    let (pid, secret) = client.key;
    // A client of another database name runs on that database's plain
    // pooler, whose pool stays while the lease lives. Cancels still arrive
    // here, so they are registered here, with that pooler's shard list.
    let lease = client.other_database.take();
    let info = client_info(&client);
    let session_shared = match &lease {
        Some(lease) => {
            let other = lease.shared().clone();
            shared.cancels.register_client(
                pid,
                secret,
                slot.clone(),
                Some(other.config.clone()),
                info,
            );
            other
        }
        None => {
            shared
                .cancels
                .register_client(pid, secret, slot.clone(), None, info);
            shared.clone()
        }
    };
    // Boxed: an async fn keeps its by-value argument twice in its
    // state (as passed and as moved into its body), which cost every
    // idle client another copy of the session.
    let session = Box::new(Session::new(session_shared, *client, slot));
    session.run().await;
    shared.cancels.unregister(pid);
    // Last: the session has returned its backend to the pool by now.
    drop(lease);
}
