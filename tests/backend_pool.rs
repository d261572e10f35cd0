//! Backend connections and per-shard pools against real PostgreSQL clusters.
//!
//! Tests that stop, restart or reconfigure a cluster start their own
//! `DevCluster`; the others share the binary's fleet, one database each.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use shardgate::backend::{release, send_cancel, BackendConnection, BackendError, Pools, ShardPool};
use shardgate::config::{Config, PoolConfig, PoolMode, ShardConfig};
use shardgate::devcluster::DevCluster;
use tokio_postgres::fallible_iterator::FallibleIterator;

fn shard_config(name: &str, host: &str, port: u16, db: &str) -> ShardConfig {
    ShardConfig {
        name: name.to_owned(),
        url: format!("postgres://postgres@{host}:{port}/{db}"),
        host: host.to_owned(),
        port,
        user: "postgres".to_owned(),
        password: None,
        database: db.to_owned(),
    }
}

fn cluster_shard(name: &str, cluster: &DevCluster, db: &str) -> ShardConfig {
    shard_config(name, cluster.host(), cluster.port(), db)
}

fn pool_config(size: u32, connect_timeout: Duration, checkout_timeout: Duration) -> PoolConfig {
    PoolConfig {
        mode: PoolMode::Transaction,
        size,
        connect_timeout,
        checkout_timeout,
        idle_timeout: Duration::from_secs(600),
        max_lifetime: Duration::from_secs(3600),
        ..PoolConfig::default()
    }
}

/// What a simple query returned, decoded from the raw backend bytes.
#[derive(Debug, Default)]
struct Outcome {
    rows: Vec<Vec<Option<String>>>,
    error: Option<(String, String)>,
    status: u8,
}

/// Read backend messages until ReadyForQuery, the way the proxy's message
/// loop sees them, and report the transaction status back to the connection.
async fn read_until_ready(conn: &mut BackendConnection) -> Outcome {
    let mut buf = BytesMut::new();
    let mut outcome = Outcome::default();
    loop {
        while let Some(message) = Message::parse(&mut buf).expect("valid backend message") {
            match message {
                Message::DataRow(row) => {
                    let mut values = Vec::new();
                    let mut ranges = row.ranges();
                    while let Some(range) = ranges.next().expect("valid DataRow") {
                        values.push(
                            range.map(|r| String::from_utf8_lossy(&row.buffer()[r]).into_owned()),
                        );
                    }
                    outcome.rows.push(values);
                }
                Message::ErrorResponse(body) => {
                    let mut code = String::new();
                    let mut text = String::new();
                    let mut fields = body.fields();
                    while let Some(field) = fields.next().expect("valid ErrorResponse") {
                        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
                        match field.type_() {
                            b'C' => code = value,
                            b'M' => text = value,
                            _ => {}
                        }
                    }
                    outcome.error = Some((code, text));
                }
                Message::ReadyForQuery(body) => {
                    outcome.status = body.status();
                    conn.set_transaction_status(body.status());
                    assert!(buf.is_empty(), "bytes after ReadyForQuery");
                    return outcome;
                }
                _ => {}
            }
        }
        let n = conn.read_buf(&mut buf).await.expect("read from backend");
        assert!(n > 0, "backend closed the connection");
    }
}

async fn simple_query(conn: &mut BackendConnection, sql: &str) -> Outcome {
    let mut out = BytesMut::new();
    frontend::query(sql, &mut out).expect("encode query");
    conn.write_all(&out).await.expect("write query");
    read_until_ready(conn).await
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn expect_err<T>(result: Result<T, BackendError>) -> BackendError {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_query_round_trip_and_server_parameters() {
    let db = support::fresh_db("raw_query_round_trip");
    let cluster = &support::fleet().clusters[0];
    let shard = cluster_shard("s0", cluster, &db);
    let mut conn = BackendConnection::connect(&shard, 0, Duration::from_secs(5))
        .await
        .expect("connect");
    assert_eq!(conn.shard_index(), 0);
    assert_eq!(conn.transaction_status(), b'I');
    assert!(!conn.is_broken());
    let (pid, _secret) = conn.cancel_key();
    assert!(pid > 0, "BackendKeyData seen");
    let params = conn.server_parameters();
    assert!(
        param(params, "server_version").is_some_and(|v| v.starts_with("15")),
        "{params:?}"
    );
    assert!(param(params, "DateStyle").is_some(), "{params:?}");
    assert!(param(params, "TimeZone").is_some(), "{params:?}");
    // Empty, as Postgres reports it to a client that set none.
    assert_eq!(param(params, "application_name"), Some(""));

    let outcome = simple_query(
        &mut conn,
        "SELECT 40 + 2 AS answer, current_database(), pg_backend_pid(), NULL",
    )
    .await;
    assert_eq!(outcome.error, None);
    assert_eq!(outcome.status, b'I');
    assert_eq!(
        outcome.rows,
        vec![vec![
            Some("42".to_owned()),
            Some(db.clone()),
            Some(pid.to_string()),
            None
        ]]
    );
    assert!(conn.poll_idle_health(), "idle connection looks healthy");

    let outcome = simple_query(&mut conn, "BEGIN; SELECT 1").await;
    assert_eq!(outcome.status, b'T');
    assert_eq!(conn.transaction_status(), b'T');
    let outcome = simple_query(&mut conn, "SELECT 1/0").await;
    assert_eq!(outcome.error.as_ref().map(|e| e.0.as_str()), Some("22012"));
    assert_eq!(outcome.status, b'E');
    let outcome = simple_query(&mut conn, "ROLLBACK").await;
    assert_eq!(outcome.status, b'I');

    // The startup ErrorResponse keeps its SQLSTATE and names the shard.
    let missing = cluster_shard("s0", cluster, "no_such_database_here");
    let err = expect_err(BackendConnection::connect(&missing, 0, Duration::from_secs(5)).await);
    assert_eq!(err.sqlstate(), "3D000", "{err}");
    assert!(err.to_string().starts_with("shard s0: "), "{err}");
    assert!(err.to_string().contains("no_such_database_here"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_connection() {
    let cluster = &support::fleet().clusters[1];
    let socket_dir = cluster
        .data_dir()
        .parent()
        .expect("cluster root")
        .to_str()
        .expect("utf-8 path")
        .to_owned();
    let shard = shard_config("s1", &socket_dir, cluster.port(), "postgres");
    let mut conn = BackendConnection::connect(&shard, 1, Duration::from_secs(5))
        .await
        .expect("connect over the Unix socket");
    let outcome = simple_query(&mut conn, "SELECT inet_client_addr() IS NULL").await;
    assert_eq!(outcome.rows, vec![vec![Some("t".to_owned())]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_from_shard_map_cache_server_parameters() {
    let db = support::fresh_db("pools_from_shard_map");
    let fleet = support::fleet();
    let yaml = format!(
        "listen: 127.0.0.1:0\nauth: trust\npool: {{ size: 2, connect_timeout: 2s, checkout_timeout: 2s }}\nshards:\n{}",
        fleet
            .clusters
            .iter()
            .enumerate()
            .map(|(i, c)| format!("  - {{ name: s{i}, url: \"{}\" }}\n", c.url(&db)))
            .collect::<String>()
    );
    let config = Config::parse(Path::new("test.yaml"), &yaml, &|_| None).expect("valid map");
    let pools = Pools::new(&config);
    assert_eq!(pools.shards.len(), fleet.clusters.len());
    for (i, pool) in pools.shards.iter().enumerate() {
        assert_eq!(pool.name(), format!("s{i}"));
        assert_eq!(
            pool.server_parameters(),
            None,
            "lazy: nothing connected yet"
        );
        assert_eq!(pool.state(), (0, 0));
        let mut conn = pool.checkout().await.expect("checkout");
        assert_eq!(conn.shard_index(), i);
        let outcome = simple_query(&mut conn, "SELECT current_setting('port')").await;
        assert_eq!(
            outcome.rows,
            vec![vec![Some(fleet.clusters[i].port().to_string())]]
        );
        release(conn).await;
        assert_eq!(pool.state(), (1, 1));
        let params = pool.server_parameters().expect("cached after a connection");
        assert!(param(&params, "server_version").is_some());
        assert!(param(&params, "standard_conforming_strings").is_some());
        assert!(param(&params, "client_encoding").is_some());
    }
    assert_eq!(pools.by_name("s1").map(ShardPool::index), Some(1));
}

/// Prepend per-role rules to pg_hba.conf (first match wins) and reload.
fn require_passwords(cluster: &DevCluster) {
    let hba = cluster.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
    let rules = "host all app_md5 127.0.0.1/32 md5\n\
                 host all app_scram 127.0.0.1/32 scram-sha-256\n\
                 host all app_plain 127.0.0.1/32 password\n";
    // Rewriting in place keeps the file's owner (the server user).
    std::fs::write(&hba, format!("{rules}{old}")).expect("write pg_hba.conf");
    cluster
        .psql(
            "postgres",
            "SET password_encryption = 'md5';\n\
             CREATE ROLE app_md5 LOGIN PASSWORD 'md5-secret';\n\
             SET password_encryption = 'scram-sha-256';\n\
             CREATE ROLE app_scram LOGIN PASSWORD 'scram-secret';\n\
             CREATE ROLE app_plain LOGIN PASSWORD 'plain-secret';\n\
             SELECT pg_reload_conf();",
        )
        .expect("create roles and reload");
}

fn with_user(mut shard: ShardConfig, user: &str, password: Option<&str>) -> ShardConfig {
    shard.user = user.to_owned();
    shard.password = password.map(str::to_owned);
    shard
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_authentication_md5_scram_cleartext() {
    let cluster = DevCluster::start("auth").expect("start own cluster");
    require_passwords(&cluster);
    let base = cluster_shard("sauth", &cluster, "postgres");
    let timeout = Duration::from_secs(5);

    // The reload is asynchronous: wait until the new rules are in force.
    let wrong_md5 = with_user(base.clone(), "app_md5", Some("nope"));
    let started = Instant::now();
    let err = loop {
        match BackendConnection::connect(&wrong_md5, 0, timeout).await {
            Err(e) => break e,
            Ok(_) if started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(_) => panic!("pg_hba.conf reload never took effect"),
        }
    };
    assert_eq!(err.sqlstate(), "28P01", "{err}");
    assert!(err.to_string().starts_with("shard sauth: "), "{err}");
    assert!(err.to_string().contains("app_md5"), "{err}");

    for (user, password) in [
        ("app_md5", "md5-secret"),
        ("app_scram", "scram-secret"),
        ("app_plain", "plain-secret"),
    ] {
        let good = with_user(base.clone(), user, Some(password));
        let mut conn = BackendConnection::connect(&good, 0, timeout)
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        let outcome = simple_query(&mut conn, "SELECT current_user").await;
        assert_eq!(outcome.rows, vec![vec![Some(user.to_owned())]]);

        let wrong = with_user(base.clone(), user, Some("wrong password"));
        let err = expect_err(BackendConnection::connect(&wrong, 0, timeout).await);
        assert_eq!(err.sqlstate(), "28P01", "{user}: {err}");
        assert!(err.to_string().starts_with("shard sauth: "), "{err}");

        let missing = with_user(base.clone(), user, None);
        let err = expect_err(BackendConnection::connect(&missing, 0, timeout).await);
        assert_eq!(err.sqlstate(), "28000", "{user}: {err}");
        assert!(err.to_string().contains("shard map has none"), "{err}");
    }

    // Through a pool, the backend's SQLSTATE reaches the caller promptly.
    let pool = ShardPool::new(
        &with_user(base.clone(), "app_scram", Some("bad")),
        0,
        &pool_config(2, Duration::from_secs(5), Duration::from_secs(10)),
    );
    let started = Instant::now();
    let err = expect_err(pool.checkout().await);
    assert_eq!(err.sqlstate(), "28P01", "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_exhausted_is_53300_after_checkout_timeout() {
    let cluster = &support::fleet().clusters[0];
    let shard = cluster_shard("s0", cluster, "postgres");
    let checkout_timeout = Duration::from_millis(500);
    let pool = ShardPool::new(
        &shard,
        0,
        &pool_config(1, Duration::from_secs(5), checkout_timeout),
    );
    let held = pool.checkout().await.expect("first checkout");
    assert_eq!(pool.state(), (1, 0));
    let started = Instant::now();
    let err = expect_err(pool.checkout().await);
    let elapsed = started.elapsed();
    println!("53300 after {elapsed:?} (checkout_timeout {checkout_timeout:?})");
    assert_eq!(err.sqlstate(), "53300", "{err}");
    assert_eq!(
        err.to_string(),
        "too many clients waiting for shard s0: no connection free within 500ms (pool size 1)"
    );
    assert!(elapsed >= checkout_timeout, "{elapsed:?}");
    assert!(elapsed < checkout_timeout * 3, "{elapsed:?}");

    // Once the holder lets go, a waiting checkout gets the same connection.
    let pid = held.cancel_key().0;
    let waiter = tokio::spawn({
        let pool_ref = std::sync::Arc::new(pool);
        async move {
            let conn = pool_ref.checkout().await.map(|c| c.cancel_key().0);
            (conn, pool_ref)
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    release(held).await;
    let (got, _pool) = waiter.await.expect("join");
    assert_eq!(got.expect("checkout after release"), pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_shards_fail_with_08006_within_connect_timeout() {
    // A port nothing listens on: refused at once, long before checkout_timeout.
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let shard = shard_config("s9", "127.0.0.1", closed_port, "postgres");
    let pool = ShardPool::new(
        &shard,
        9,
        &pool_config(4, Duration::from_secs(2), Duration::from_secs(20)),
    );
    let started = Instant::now();
    let err = expect_err(pool.checkout().await);
    let elapsed = started.elapsed();
    println!("refused: 08006 after {elapsed:?}: {err}");
    assert_eq!(err.sqlstate(), "08006");
    // What happened and when, not the configured limit (issue #15-8).
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "shard s9 (127.0.0.1:{closed_port}) is unavailable: connection refused after "
        )) && text.ends_with(" ms"),
        "{text}"
    );
    assert!(!text.contains("connect_timeout"), "{text}");
    assert!(err.is_unavailable());
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");

    // A server that accepts TCP but never answers the startup message.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_port = silent.local_addr().expect("addr").port();
    let shard = shard_config("s8", "127.0.0.1", silent_port, "postgres");
    let connect_timeout = Duration::from_millis(700);
    let pool = ShardPool::new(
        &shard,
        8,
        &pool_config(4, connect_timeout, Duration::from_secs(20)),
    );
    let started = Instant::now();
    let err = expect_err(pool.checkout().await);
    let elapsed = started.elapsed();
    println!("silent: 08006 after {elapsed:?}: {err}");
    assert_eq!(err.sqlstate(), "08006");
    assert!(
        err.to_string()
            .contains("is unavailable: no answer within connect_timeout (700ms)"),
        "{err}"
    );
    assert!(elapsed >= connect_timeout, "{elapsed:?}");
    assert!(elapsed < connect_timeout * 3, "{elapsed:?}");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_shard_connections_are_detected_and_pool_recovers() {
    let mut cluster = DevCluster::start("restart").expect("start own cluster");
    let shard = cluster_shard("s1", &cluster, "postgres");
    let connect_timeout = Duration::from_secs(1);
    let pool = ShardPool::new(
        &shard,
        1,
        &pool_config(2, connect_timeout, Duration::from_secs(20)),
    );

    // Phase 1: an idle pooled connection whose server restarted is found
    // dead at checkout by the socket peek, without a query, and replaced.
    let conn = pool.checkout().await.expect("checkout");
    let first_pid = conn.cancel_key().0;
    release(conn).await;
    assert_eq!(pool.state(), (1, 1));
    cluster.restart().expect("restart");
    // Only connections idle for a moment are checked (no syscall per checkout otherwise).
    tokio::time::sleep(shardgate::backend::HEALTH_CHECK_AFTER_IDLE).await;
    let mut conn = pool.checkout().await.expect("checkout after restart");
    assert_ne!(conn.cancel_key().0, first_pid, "a new backend");
    let stats = pool.bb8().state().statistics;
    assert_eq!(stats.connections_closed_invalid, 1, "{stats:?}");
    let outcome = simple_query(&mut conn, "SELECT 1").await;
    assert_eq!(outcome.rows, vec![vec![Some("1".to_owned())]]);
    release(conn).await;

    // Phase 2: shard down -> 08006 within connect_timeout, although
    // checkout_timeout is 20s.
    cluster.stop().expect("stop");
    // The idle connection is only re-checked once it has been idle a moment.
    tokio::time::sleep(shardgate::backend::HEALTH_CHECK_AFTER_IDLE).await;
    let started = Instant::now();
    let err = expect_err(pool.checkout().await);
    let elapsed = started.elapsed();
    println!("shard down: {} after {elapsed:?}: {err}", err.sqlstate());
    assert_eq!(err.sqlstate(), "08006", "{err}");
    assert!(err.to_string().starts_with("shard s1 (127.0.0.1:"), "{err}");
    assert!(err.to_string().contains("is unavailable"), "{err}");
    assert!(
        elapsed < connect_timeout + Duration::from_millis(500),
        "{elapsed:?}"
    );
    // And again: every checkout tries anew, none hangs.
    let started = Instant::now();
    let err = expect_err(pool.checkout().await);
    assert_eq!(err.sqlstate(), "08006", "{err}");
    assert!(started.elapsed() < connect_timeout + Duration::from_millis(500));

    // Phase 3: the pool recovers on its own once the shard is back.
    cluster.restart().expect("start again");
    let mut conn = pool.checkout().await.expect("checkout after recovery");
    let outcome = simple_query(&mut conn, "SELECT 2").await;
    assert_eq!(outcome.rows, vec![vec![Some("2".to_owned())]]);
    release(conn).await;

    // A raw connection sees the server going away without a round trip.
    let mut raw = BackendConnection::connect(&shard, 1, connect_timeout)
        .await
        .expect("connect");
    assert!(raw.poll_idle_health());
    cluster.stop().expect("stop");
    let started = Instant::now();
    while raw.poll_idle_health() {
        assert!(started.elapsed() < Duration::from_secs(5), "never noticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(raw.is_broken());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_returned_inside_transaction_is_rolled_back() {
    let db = support::fresh_db("returned_inside_transaction");
    let cluster = &support::fleet().clusters[2];
    cluster
        .psql(&db, "CREATE TABLE t (id int)")
        .expect("create table");
    let shard = cluster_shard("s2", cluster, &db);
    let pool = ShardPool::new(
        &shard,
        2,
        &pool_config(1, Duration::from_secs(5), Duration::from_secs(5)),
    );

    // Idle in transaction.
    let mut conn = pool.checkout().await.expect("checkout");
    let pid = conn.cancel_key().0;
    let outcome = simple_query(&mut conn, "BEGIN; INSERT INTO t VALUES (1)").await;
    assert_eq!(outcome.status, b'T');
    release(conn).await;
    let mut conn = pool.checkout().await.expect("checkout after release");
    assert_eq!(
        conn.cancel_key().0,
        pid,
        "the same backend, reset and reused"
    );
    assert_eq!(conn.transaction_status(), b'I');
    let outcome = simple_query(&mut conn, "SELECT count(*) FROM t").await;
    assert_eq!(outcome.rows, vec![vec![Some("0".to_owned())]]);
    assert_eq!(
        cluster.psql(&db, "SELECT count(*) FROM t").expect("psql"),
        "0"
    );

    // Failed transaction.
    let outcome = simple_query(&mut conn, "BEGIN; SELECT 1/0").await;
    assert_eq!(outcome.status, b'E');
    release(conn).await;
    let mut conn = pool.checkout().await.expect("checkout");
    assert_eq!(conn.cancel_key().0, pid);
    assert_eq!(simple_query(&mut conn, "SELECT 3").await.status, b'I');

    // Client vanished while a large result was streaming inside a transaction.
    let mut out = BytesMut::new();
    frontend::query(
        "BEGIN; INSERT INTO t VALUES (2); SELECT repeat('x', 2000) FROM generate_series(1, 20000)",
        &mut out,
    )
    .expect("encode");
    conn.write_all(&out).await.expect("write");
    let mut partial = BytesMut::new();
    conn.read_buf(&mut partial).await.expect("some bytes");
    // The proxy hands back what it read but did not forward.
    conn.unread(&partial);
    release(conn).await;
    let mut conn = pool.checkout().await.expect("checkout");
    assert_eq!(
        conn.cancel_key().0,
        pid,
        "reset skipped the abandoned result"
    );
    let outcome = simple_query(&mut conn, "SELECT count(*) FROM t").await;
    assert_eq!(outcome.rows, vec![vec![Some("0".to_owned())]]);

    // Same, but the partial frame is lost: the reset cannot resynchronise,
    // so the connection is discarded rather than reused.
    conn.write_all(&out).await.expect("write");
    let mut partial = BytesMut::new();
    while partial.len() < 10_000 {
        conn.read_buf(&mut partial).await.expect("some bytes");
    }
    drop(partial);
    release(conn).await;
    let mut conn = pool.checkout().await.expect("checkout");
    assert_ne!(
        conn.cancel_key().0,
        pid,
        "misaligned stream must not be reused"
    );
    let pid = conn.cancel_key().0;
    let outcome = simple_query(&mut conn, "SELECT count(*) FROM t").await;
    assert_eq!(outcome.rows, vec![vec![Some("0".to_owned())]]);

    // Dropped without `release` while in a transaction: not reused as-is,
    // bb8 discards it and opens a new backend.
    let outcome = simple_query(&mut conn, "BEGIN; INSERT INTO t VALUES (3)").await;
    assert_eq!(outcome.status, b'T');
    drop(conn);
    let conn = pool.checkout().await.expect("checkout");
    assert_ne!(conn.cancel_key().0, pid, "a fresh backend");
    assert_eq!(conn.transaction_status(), b'I');
    drop(conn);
    let started = Instant::now();
    while cluster.psql(&db, "SELECT count(*) FROM t").expect("psql") != "0" {
        assert!(started.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_cancels_pg_sleep() {
    let cluster = &support::fleet().clusters[1];
    let shard = cluster_shard("s1", cluster, "postgres");
    let mut conn = BackendConnection::connect(&shard, 1, Duration::from_secs(5))
        .await
        .expect("connect");
    let (pid, secret) = conn.cancel_key();
    let mut out = BytesMut::new();
    frontend::query("SELECT pg_sleep(10)", &mut out).expect("encode");
    let started = Instant::now();
    conn.write_all(&out).await.expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_cancel(&shard, pid, secret).await.expect("send cancel");
    let outcome = read_until_ready(&mut conn).await;
    let elapsed = started.elapsed();
    println!("cancelled after {elapsed:?}");
    assert_eq!(
        outcome.error.as_ref().map(|e| e.0.as_str()),
        Some("57014"),
        "{outcome:?}"
    );
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert_eq!(outcome.status, b'I');
    assert!(!conn.is_broken());
    // A wrong secret is ignored by the server.
    let outcome = simple_query(&mut conn, "SELECT 5").await;
    assert_eq!(outcome.rows, vec![vec![Some("5".to_owned())]]);
}

/// Connections returned with `ShardPool::release` are parked for the next
/// checkout, yet a checkout already waiting on a full pool gets one at once,
/// and parked connections go back to bb8 within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_connections_are_reused_and_never_starve_a_waiter() {
    let db = support::fresh_db("backend_hot");
    let shard = cluster_shard("s0", &support::fleet().clusters[0], &db);
    let pool = std::sync::Arc::new(ShardPool::new(
        &shard,
        0,
        &pool_config(1, Duration::from_secs(2), Duration::from_secs(5)),
    ));

    // Parked and handed to the next checkout: the same backend.
    let conn = pool.checkout().await.expect("checkout");
    let pid = conn.cancel_key().0;
    pool.release(conn).await;
    assert_eq!(pool.state(), (1, 1), "a parked connection counts as idle");
    let conn = pool.checkout().await.expect("checkout again");
    assert_eq!(conn.cancel_key().0, pid);

    // With the only connection out, a second checkout waits; the release
    // must reach it promptly instead of parking the connection.
    let waiter_pool = pool.clone();
    let waiter = tokio::spawn(async move {
        let conn = waiter_pool
            .checkout()
            .await
            .expect("waiter gets the connection");
        (conn.cancel_key().0, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let released = Instant::now();
    pool.release(conn).await;
    let (got, acquired) = waiter.await.expect("waiter task");
    assert_eq!(got, pid);
    // Handed over at once, not left parked until the sweeper (every 1 s).
    let handover = acquired.duration_since(released);
    assert!(
        handover < Duration::from_millis(50),
        "handover took {handover:?}"
    );

    // A connection returned inside a transaction is not parked as-is.
    let mut conn = pool.checkout().await.expect("checkout");
    let outcome = simple_query(&mut conn, "BEGIN; SELECT 1").await;
    assert!(outcome.error.is_none(), "{outcome:?}");
    pool.release(conn).await;
    let mut conn = pool.checkout().await.expect("checkout after rollback");
    let outcome = simple_query(&mut conn, "SELECT 1").await;
    assert_eq!(
        outcome.status, b'I',
        "the connection was rolled back before reuse"
    );
    pool.release(conn).await;

    // The sweeper hands parked connections back to bb8 within a second or so.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let stats = pool.bb8().state();
    assert_eq!(stats.idle_connections, 1, "back in bb8: {stats:?}");
}
