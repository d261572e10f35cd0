//! Shared harness for the integration tests: one fleet of three throwaway
//! PostgreSQL clusters per test binary, and one fresh database per test so
//! tests can run in parallel without seeing each other's data.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use shardgate::devcluster::{DevCluster, DevFleet};

pub mod process;
pub mod tpcb;
pub mod wire;

/// Number of clusters (shards) in the shared fleet.
pub const FLEET_SIZE: usize = 3;

/// The binary's shared fleet, started on first use. It lives in a static and
/// is never dropped; devcluster's atexit hook and watchdogs remove it.
pub fn fleet() -> &'static DevFleet {
    static FLEET: OnceLock<DevFleet> = OnceLock::new();
    FLEET.get_or_init(|| {
        DevFleet::start(FLEET_SIZE, "shard")
            .unwrap_or_else(|e| panic!("starting the shared test fleet failed: {e}"))
    })
}

/// Create a uniquely named database on every cluster of [`fleet`] and return
/// its name (`t_<sanitised test name>_<n>`).
pub fn fresh_db(test_name: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let sanitised: String = test_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let name = format!("t_{sanitised}_{n}");
    fleet()
        .create_database(&name)
        .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
    name
}

/// A fresh database (see [`fresh_db`]) with `schema` created directly on
/// every cluster of the fleet.
pub async fn fresh_db_with(test_name: &str, schema: &str) -> String {
    let db = fresh_db(test_name);
    for cluster in &fleet().clusters {
        connect(cluster, &db)
            .await
            .batch_execute(schema)
            .await
            .unwrap_or_else(|e| panic!("schema on {}: {e}", cluster.url(&db)));
    }
    db
}

/// Sends a CancelRequest for `client`'s running query after `delay`.
pub fn cancel_after(
    client: &tokio_postgres::Client,
    delay: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    let token = client.cancel_token();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        token
            .cancel_query(tokio_postgres::NoTls)
            .await
            .expect("cancel request sent");
    })
}

/// How many backends on every cluster still run a query containing `text`.
pub async fn active_queries_like(db: &str, text: &str) -> i64 {
    let mut running = 0;
    for cluster in &fleet().clusters {
        running += connect(cluster, db)
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE strpos(query, $1) > 0 \
                 AND state = 'active' AND pid <> pg_backend_pid()",
                &[&text],
            )
            .await
            .expect("pg_stat_activity")
            .get::<_, i64>(0);
    }
    running
}

/// Connect with tokio-postgres (no TLS) and drive the connection on a task.
pub async fn connect(cluster: &DevCluster, db: &str) -> tokio_postgres::Client {
    let url = cluster.url(db);
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    tokio::spawn(async move {
        // Errors here surface as failed queries on the client side.
        let _ = connection.await;
    });
    client
}

/// A shard map for `database` on the shared fleet (every cluster a shard,
/// named s0, s1, …), listening on a free port. `extra` is appended verbatim
/// (functions, tables, pool, users/auth…).
pub fn shard_map(database: &str, extra: &str) -> String {
    let mut map = String::from("listen: 127.0.0.1:0\n");
    if !extra.contains("auth:") {
        map.push_str("auth: trust\nusers: [ { name: app } ]\n");
    }
    map.push_str("shards:\n");
    for (i, cluster) in fleet().clusters.iter().enumerate() {
        map.push_str(&format!(
            "  - {{ name: s{i}, url: \"{}\" }}\n",
            cluster.url(database)
        ));
    }
    map.push_str(extra);
    map
}

/// Starts shardgate in this process with the given map text.
pub async fn start_proxy(map: &str) -> shardgate::server::RunningServer {
    let config =
        shardgate::config::Config::parse(std::path::Path::new("test-map.yaml"), map, &|_| None)
            .unwrap_or_else(|e| panic!("test shard map is invalid:\n{e}\n---\n{map}"));
    shardgate::server::start(config)
        .await
        .unwrap_or_else(|e| panic!("shardgate did not start: {e}"))
}

/// A tokio-postgres client connected through the proxy as `user`.
pub async fn connect_proxy(
    server: &shardgate::server::RunningServer,
    user: &str,
    password: Option<&str>,
) -> tokio_postgres::Client {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(server.address.port())
        .user(user)
        .dbname(&server.shared.config.database);
    if let Some(password) = password {
        config.password(password);
    }
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting through shardgate: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Runs a child process (a client program under test) to its end within
/// `timeout`; its output, or an error with status, stdout and stderr.
pub async fn run_checked(
    command: &mut tokio::process::Command,
    what: &str,
    timeout: std::time::Duration,
) -> Result<std::process::Output, String> {
    command.kill_on_drop(true);
    match tokio::time::timeout(timeout, command.output()).await {
        Err(_) => Err(format!("{what}: timed out after {timeout:?}")),
        Ok(Err(e)) => Err(format!("{what}: could not run: {e}")),
        Ok(Ok(output)) if !output.status.success() => Err(format!(
            "{what}: {}\n--- stdout\n{}\n--- stderr\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )),
        Ok(Ok(output)) => Ok(output),
    }
}

/// `count(*)` of `table` on each cluster of the fleet (shard order).
pub async fn rows_per_shard(db: &str, table: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for cluster in &fleet().clusters {
        let n: i64 = connect(cluster, db)
            .await
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .expect("count on a shard")
            .get(0);
        out.push(n);
    }
    out
}

/// The raw HTTP response of `GET /metrics` at `address`.
pub async fn scrape_metrics(address: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect to /metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut text = String::new();
    stream.read_to_string(&mut text).await.expect("read");
    text
}

/// The shard of `id` under a 3-shard `hash` function (Postgres' own
/// `PARTITION BY HASH` placement).
pub fn hash3_shard_of(id: i64) -> usize {
    shardgate::sharding::ShardingFunction::hash(3)
        .and_then(|f| f.shard_for(&shardgate::sharding::KeyValue::Int(id)))
        .expect("hash")
}

/// Keys 1.. that fall on three different shards under [`hash3_shard_of`].
pub fn keys_on_three_shards() -> [i64; 3] {
    let mut found = [None, None, None];
    for id in 1..1000i64 {
        let s = hash3_shard_of(id);
        if found[s].is_none() {
            found[s] = Some(id);
        }
    }
    found.map(|k| k.expect("every shard gets some key"))
}

/// Prepared transactions left in `client`'s database on its server.
#[allow(dead_code)]
pub async fn prepared_transactions(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
            &[],
        )
        .await
        .expect("pg_prepared_xacts")
        .get::<_, i64>(0)
}
