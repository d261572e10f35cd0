//! The console's commands: each reads the running map's snapshot and
//! answers with rows, as PgBouncer's console does (same column names where
//! the concept is the same; shardgate's shards are PgBouncer's databases).

use bytes::BytesMut;

use crate::backend::ShardPool;
use crate::civil_time::CivilTime;
use crate::cluster::{Cluster, Reloaded};
use crate::config::Config;
use crate::metrics::Route;
use crate::protocol::synth::{self, ProxyError};
use crate::server::Shared;

/// The commands, for `SHOW HELP` and the error on anything else.
const HELP: &[&str] = &[
    "SHOW HELP",
    "SHOW POOLS",
    "SHOW CLIENTS",
    "SHOW DATABASES",
    "SHOW SHARDS",
    "SHOW STATS",
    "SHOW LISTS",
    "SHOW CONFIG",
    "SHOW VERSION",
    "SHOW ROUTE <sql>",
    "RELOAD",
    "PAUSE [shard]",
    "RESUME [shard]",
    "KILL <client id>",
    "SHUTDOWN",
];

/// Runs one console statement; the answer (rows and CommandComplete, or an
/// ErrorResponse) goes to `out`.
pub async fn run(cluster: &Cluster, user: &str, sql: &str, out: &mut BytesMut) {
    let text = sql.trim().trim_end_matches(';').trim_end();
    let mut words = text.split_whitespace();
    let verb = words.next().unwrap_or("").to_ascii_uppercase();
    let what = words.next().unwrap_or("").to_ascii_uppercase();
    let shared = cluster.current();
    match (verb.as_str(), what.as_str()) {
        ("", _) => synth::empty_query(out),
        ("SHOW", "HELP") => synth::text_result(out, "command", HELP, "SHOW"),
        ("SHOW", "POOLS") => pools(&shared, out),
        ("SHOW", "CLIENTS") => clients(&shared, out),
        ("SHOW", "DATABASES") => databases(&shared, out),
        ("SHOW", "SHARDS") => shards(&shared, out),
        ("SHOW", "STATS") => stats(&shared, out),
        ("SHOW", "LISTS") => lists(&shared, out),
        ("SHOW", "CONFIG") => config(&shared, out),
        ("SHOW", "VERSION") => synth::text_result(
            out,
            "version",
            &[concat!("shardgate ", env!("CARGO_PKG_VERSION"))],
            "SHOW",
        ),
        ("SHOW", "ROUTE") => {
            let statement = text
                .split_once(|c: char| c.is_whitespace())
                .and_then(|(_, rest)| rest.trim_start().split_once(|c: char| c.is_whitespace()))
                .map_or("", |(_, sql)| sql.trim());
            route(&shared, statement, out)
        }
        ("RELOAD", "") => reload(cluster, &shared, user, out).await,
        ("PAUSE", _) => pause(&shared, user, words_after(text, 1), out).await,
        ("RESUME", _) => resume(&shared, user, words_after(text, 1), out),
        ("KILL", _) => kill(&shared, user, words_after(text, 1), out),
        ("SHUTDOWN", "") => {
            // As SIGTERM: transactions finish, then clients get 57P01.
            tracing::warn!(user, "admin console: SHUTDOWN");
            cluster.request_shutdown();
            synth::command_complete(out, "SHUTDOWN");
        }
        _ => ProxyError::error("42601", format!("invalid admin console command: {text}"))
            .with_hint(format!("the console knows: {}", HELP.join(", ")))
            .encode(out),
    }
}

/// PgBouncer's `SHOW POOLS`: one row per shard (its "database").
fn pools(shared: &Shared, out: &mut BytesMut) {
    let mode = format!("{:?}", shared.config.pool.mode).to_ascii_lowercase();
    per_pool(shared, out, &POOLS_COLUMNS, |pool, (connections, idle)| {
        let wait = pool.wait_max();
        vec![
            pool.name().to_string(),
            shared.config.database.clone(),
            pool.queued().to_string(),
            connections.saturating_sub(idle).to_string(),
            idle.to_string(),
            wait.as_secs().to_string(),
            wait.subsec_micros().to_string(),
            mode.clone(),
        ]
    });
}

const POOLS_COLUMNS: [&str; 8] = [
    "database",
    "pool_database",
    "cl_waiting",
    "sv_active",
    "sv_idle",
    "maxwait",
    "maxwait_us",
    "pool_mode",
];

/// A table with one row per shard pool, made by `row` from the pool and its
/// (connections, idle) counts.
fn per_pool(
    shared: &Shared,
    out: &mut BytesMut,
    columns: &[&str],
    row: impl Fn(&ShardPool, (u32, u32)) -> Vec<String>,
) {
    let rows: Vec<Vec<String>> = shared
        .pools
        .shards
        .iter()
        .map(|pool| row(pool, pool.state()))
        .collect();
    synth::table_result(out, columns, &rows, "SHOW");
}

/// PgBouncer's `SHOW CLIENTS`: one row per application client (console
/// clients are not listed). `state` is `active` while the client holds a
/// backend (inside a transaction or a statement), else `idle`.
fn clients(shared: &Shared, out: &mut BytesMut) {
    let rows: Vec<Vec<String>> = shared
        .cancels
        .clients()
        .into_iter()
        .map(|row| {
            let shard = row
                .shard
                .and_then(|index| shared.config.shards.get(index))
                .map_or_else(String::new, |shard| shard.name.clone());
            let connected = row
                .client
                .connected_at
                .and_then(CivilTime::of)
                .map_or_else(String::new, |t| format!("{} {}", t.date(), t.time()));
            vec![
                "C".to_string(),
                row.client.user,
                row.client.database,
                if shard.is_empty() { "idle" } else { "active" }.to_string(),
                row.client
                    .addr
                    .map_or_else(String::new, |a| a.ip().to_string()),
                row.client
                    .addr
                    .map_or_else(String::new, |a| a.port().to_string()),
                connected,
                row.client.application_name,
                row.id.to_string(),
                shard,
            ]
        })
        .collect();
    synth::table_result(
        out,
        &[
            "type",
            "user",
            "database",
            "state",
            "addr",
            "port",
            "connect_time",
            "application_name",
            "id",
            "shard",
        ],
        &rows,
        "SHOW",
    );
}

/// PgBouncer's `SHOW DATABASES`: where each shard is and its pool's size.
fn databases(shared: &Shared, out: &mut BytesMut) {
    let mode = format!("{:?}", shared.config.pool.mode).to_ascii_lowercase();
    let rows: Vec<Vec<String>> = shared
        .config
        .shards
        .iter()
        .zip(shared.pools.shards.iter())
        .map(|(shard, pool)| {
            let (connections, _) = pool.state();
            vec![
                shard.name.clone(),
                shard.host.clone(),
                shard.port.to_string(),
                shard.database.clone(),
                shard.user.clone(),
                pool.size().to_string(),
                mode.clone(),
                connections.to_string(),
            ]
        })
        .collect();
    synth::table_result(
        out,
        &[
            "name",
            "host",
            "port",
            "database",
            "force_user",
            "pool_size",
            "pool_mode",
            "current_connections",
        ],
        &rows,
        "SHOW",
    );
}

/// shardgate's `SHOW SHARDS`: each shard's state as the proxy sees it.
fn shards(shared: &Shared, out: &mut BytesMut) {
    let columns = [
        "index",
        "name",
        "state",
        "connections",
        "idle",
        "waiting",
        "map_generation",
    ];
    per_pool(shared, out, &columns, |pool, (connections, idle)| {
        vec![
            pool.index().to_string(),
            pool.name().to_string(),
            match (pool.is_paused(), pool.is_up()) {
                (true, _) => "paused",
                (false, true) => "up",
                (false, false) => "down",
            }
            .to_string(),
            connections.to_string(),
            idle.to_string(),
            pool.queued().to_string(),
            shared.generation.to_string(),
        ]
    });
}

/// `SHOW STATS`: statements per shard since start, by route.
fn stats(shared: &Shared, out: &mut BytesMut) {
    let columns = [
        "database",
        "total_query_count",
        "single_query_count",
        "fanout_query_count",
        "broadcast_query_count",
    ];
    per_pool(shared, out, &columns, |pool, _| {
        let counts = shared.metrics.shard_queries(pool.index());
        let total: u64 = counts.iter().sum();
        let by_route = |route: Route| {
            let at = Route::ALL.iter().position(|r| *r == route).unwrap_or(0);
            counts[at].to_string()
        };
        vec![
            pool.name().to_string(),
            total.to_string(),
            by_route(Route::Single),
            by_route(Route::Fanout),
            by_route(Route::Broadcast),
        ]
    });
}

/// PgBouncer's `SHOW LISTS`: how many of each thing there are.
fn lists(shared: &Shared, out: &mut BytesMut) {
    let (mut used, mut free) = (0u32, 0u32);
    for pool in shared.pools.shards.iter() {
        let (connections, idle) = pool.state();
        used += connections.saturating_sub(idle);
        free += idle;
    }
    let rows = [
        ("databases", shared.config.shards.len().to_string()),
        ("users", shared.config.users.len().to_string()),
        ("pools", shared.pools.shards.len().to_string()),
        ("used_clients", shared.metrics.clients().to_string()),
        ("used_servers", used.to_string()),
        ("free_servers", free.to_string()),
    ]
    .map(|(list, items)| vec![list.to_string(), items]);
    synth::table_result(out, &["list", "items"], &rows, "SHOW");
}

/// `SHOW CONFIG`: the running map's settings; `changeable` says whether a
/// RELOAD applies a change of it.
fn config(shared: &Shared, out: &mut BytesMut) {
    let c: &Config = &shared.config;
    let live = |key: &str, value: String| vec![key.to_string(), value, "yes".to_string()];
    let fixed = |key: &str, value: String| vec![key.to_string(), value, "no".to_string()];
    let pool = &c.pool;
    let rows = vec![
        fixed("source", c.source.display().to_string()),
        fixed("listen", c.listen.clone()),
        fixed("metrics", c.metrics.clone().unwrap_or_default()),
        fixed("tls", c.tls.is_some().to_string()),
        fixed("database", c.database.clone()),
        fixed("threads", c.threads.to_string()),
        fixed("shards", c.shards.len().to_string()),
        live("auth", format!("{:?}", c.auth).to_ascii_lowercase()),
        live("users", c.users.len().to_string()),
        live("pool.mode", format!("{:?}", pool.mode).to_ascii_lowercase()),
        live("pool.size", pool.size.to_string()),
        live(
            "pool.connect_timeout",
            format!("{:?}", pool.connect_timeout),
        ),
        live(
            "pool.checkout_timeout",
            format!("{:?}", pool.checkout_timeout),
        ),
        live("pool.idle_timeout", format!("{:?}", pool.idle_timeout)),
        live("pool.max_lifetime", format!("{:?}", pool.max_lifetime)),
        live("pool.query_timeout", format!("{:?}", pool.query_timeout)),
        live(
            "pool.idle_transaction_timeout",
            format!("{:?}", pool.idle_transaction_timeout),
        ),
        live("tables", c.tables.len().to_string()),
        live("functions", c.functions.len().to_string()),
        live(
            "default_table",
            format!("{:?}", c.default_table).to_ascii_lowercase(),
        ),
        live("two_phase_commit", c.two_phase_commit.to_string()),
        live("max_merge_memory", c.max_merge_memory.to_string()),
        live("catalog_refresh", format!("{:?}", c.catalog_refresh)),
        fixed("map_generation", shared.generation.to_string()),
    ];
    synth::table_result(out, &["key", "value", "changeable"], &rows, "SHOW");
}

/// shardgate's `SHOW ROUTE <sql>`: where the statement would go and why.
fn route(shared: &Shared, sql: &str, out: &mut BytesMut) {
    if sql.is_empty() {
        return ProxyError::error("42601", "SHOW ROUTE needs a statement: SHOW ROUTE <sql>")
            .encode(out);
    }
    let explanation = match &shared.router {
        Some(router) => crate::router::explain::explain(router, sql, &[]),
        None => "no routing: the map names no tables; every statement goes to the hinted shard \
                 or the first one"
            .to_string(),
    };
    let lines: Vec<&str> = explanation.lines().collect();
    synth::text_result(out, "route", &lines, "SHOW");
}

/// The text after the first `n` words.
fn words_after(text: &str, n: usize) -> &str {
    let mut rest = text.trim_start();
    for _ in 0..n {
        rest = rest
            .split_once(char::is_whitespace)
            .map_or("", |(_, after)| after.trim_start());
    }
    rest.trim()
}

/// The pools a PAUSE / RESUME names: one shard, or every shard.
fn named_pools<'a>(shared: &'a Shared, name: &str) -> Result<Vec<&'a ShardPool>, ProxyError> {
    if name.is_empty() {
        return Ok(shared.pools.shards.iter().collect());
    }
    match shared.pools.by_name(name) {
        Some(pool) => Ok(vec![pool]),
        None => {
            let names: Vec<&str> = shared.pools.shards.iter().map(|p| p.name()).collect();
            Err(
                ProxyError::error("42704", format!("no shard named \"{name}\""))
                    .with_hint(format!("the shards are: {}", names.join(", "))),
            )
        }
    }
}

/// `PAUSE [shard]`, as PgBouncer's: new transactions wait (up to
/// `pool.pause_timeout`, then 57P03) and this returns once the ones in
/// flight have given their backends back (a NOTICE says if some still hold
/// one when `pool.pause_timeout` is up).
async fn pause(shared: &Shared, user: &str, name: &str, out: &mut BytesMut) {
    let pools = match named_pools(shared, name) {
        Ok(pools) => pools,
        Err(error) => return error.encode(out),
    };
    for pool in &pools {
        pool.pause();
    }
    tracing::warn!(user, shard = name, "admin console: PAUSE");
    let deadline = std::time::Instant::now() + shared.config.pool.pause_timeout;
    let busy = |pools: &[&ShardPool]| -> u32 {
        pools
            .iter()
            .map(|p| {
                let (connections, idle) = p.state();
                connections.saturating_sub(idle)
            })
            .sum()
    };
    while busy(&pools) > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let still = busy(&pools);
    if still > 0 {
        ProxyError::error(
            "01000",
            format!("{still} backend(s) still in a transaction after pool.pause_timeout"),
        )
        .encode_notice(out);
    }
    synth::command_complete(out, "PAUSE");
}

/// `RESUME [shard]`: waiting transactions go on.
fn resume(shared: &Shared, user: &str, name: &str, out: &mut BytesMut) {
    match named_pools(shared, name) {
        Ok(pools) => {
            for pool in pools {
                pool.resume();
            }
            tracing::warn!(user, shard = name, "admin console: RESUME");
            synth::command_complete(out, "RESUME");
        }
        Err(error) => error.encode(out),
    }
}

/// `KILL <client id>` (the `id` of SHOW CLIENTS): the client gets `FATAL
/// 57P01` and is disconnected at once; a transaction it had open rolls back.
fn kill(shared: &Shared, user: &str, id: &str, out: &mut BytesMut) {
    let Ok(id) = id.parse::<i32>() else {
        return ProxyError::error(
            "42601",
            format!("KILL needs a client id (SHOW CLIENTS), got `{id}`"),
        )
        .encode(out);
    };
    if shared.cancels.stop_one(id) {
        tracing::warn!(user, client = id, "admin console: KILL");
        synth::command_complete(out, "KILL");
    } else {
        ProxyError::error("42704", format!("no client with id {id}"))
            .with_hint("SHOW CLIENTS lists the ids")
            .encode(out);
    }
}

/// `RELOAD`: re-reads the map file the proxy started with (see `cluster`).
async fn reload(cluster: &Cluster, shared: &Shared, user: &str, out: &mut BytesMut) {
    tracing::info!(user, "admin console: RELOAD");
    let config = Config::load(&shared.config.source).map_err(|error| error.to_string());
    match cluster.reload(config).await {
        Ok(Reloaded { needs_restart, .. }) => {
            for setting in needs_restart {
                ProxyError::error(
                    "01000",
                    format!("`{setting}` changed in the map but applies only after a restart"),
                )
                .encode_notice(out);
            }
            synth::command_complete(out, "RELOAD");
        }
        Err(error) => ProxyError::error(
            "F0000",
            format!("RELOAD failed, the running map stays: {error}"),
        )
        .encode(out),
    }
}
