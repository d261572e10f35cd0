//! Issue #14 D2: database names other than the map's `database`.
//! With `other_databases: { shard: S }` a login to another name is served
//! by a plain transaction pooler to that database on S's server: the
//! maintenance database `postgres`, and a database created through the
//! proxy, with one shard and with three (S not the first). A name the server
//! does not have gets Postgres' own 3D000 at login; without the option the
//! 3D000 names it; `max_databases` caps the pools (idle ones give way); a
//! pool closes its backends when its last client leaves (or `idle_timeout`
//! later), so `DROP DATABASE`
//! through the proxy works; `CREATE DATABASE` through the routed database
//! runs on every shard and a failure on one is reported with where it
//! succeeded; a cancel reaches the serving server.

mod support;

use std::time::{Duration, Instant};

use support::{connect, fleet, fresh_db, scrape_metrics, shard_map, start_proxy};
use tokio_postgres::error::SqlState;

/// Connects through `server` to `database` as `app` (trust).
async fn connect_to(
    server: &shardgate::server::RunningServer,
    database: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(server.address.port())
        .user("app")
        .dbname(database)
        .connect_timeout(Duration::from_secs(20));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// (SQLSTATE, severity, message, hint) of a failed connect.
fn refusal(error: &tokio_postgres::Error) -> (String, String, String, Option<String>) {
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("expected a server error, got {error}"));
    (
        db.code().code().to_string(),
        db.severity().to_string(),
        db.message().to_string(),
        db.hint().map(str::to_string),
    )
}

async fn exists_on(cluster: usize, database: &str) -> bool {
    connect(&fleet().clusters[cluster], "postgres")
        .await
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&database],
        )
        .await
        .expect("pg_database")
        .get::<_, i64>(0)
        == 1
}

/// Sessions of `database` on `cluster`, other than the asking one.
async fn sessions_on(cluster: usize, database: &str) -> i64 {
    connect(&fleet().clusters[cluster], "postgres")
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&database],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// `CREATE DATABASE` through the routed database, then clients of it and
/// of `postgres` through the proxy, served on `serving`'s server by a
/// transaction pooler; after they leave, `DROP DATABASE` through the proxy.
async fn other_databases_are_served(
    label: &str,
    routed_db: &str,
    map: String,
    serving: usize,
    shards: usize,
) {
    let server = start_proxy(&map).await;
    let admin = connect_to(&server, routed_db).await.expect("routed login");
    let made = format!("{routed_db}_made");
    admin
        .simple_query(&format!("CREATE DATABASE {made}"))
        .await
        .unwrap_or_else(|e| panic!("{label}: CREATE DATABASE through the proxy: {e}"));
    for cluster in 0..shards {
        assert!(
            exists_on(cluster, &made).await,
            "{label}: created on shard {cluster}"
        );
    }

    let first = connect_to(&server, &made)
        .await
        .unwrap_or_else(|e| panic!("{label}: login to {made}: {e}"));
    let row = first
        .query_one("SELECT current_database()::text, inet_server_port()", &[])
        .await
        .expect("where");
    assert_eq!(row.get::<_, String>(0), made, "{label}");
    assert_eq!(
        row.get::<_, i32>(1),
        i32::from(fleet().clusters[serving].port()),
        "{label}: served by shard {serving}'s server"
    );
    first
        .batch_execute("CREATE TABLE notes (id int); INSERT INTO notes VALUES (1), (2)")
        .await
        .expect("write in the other database");
    // A transaction pooler: with pool.size 1, a second client gets the
    // same backend between transactions.
    let second = connect_to(&server, &made).await.expect("second login");
    let sum: i64 = second
        .query_one("SELECT sum(id) FROM notes", &[])
        .await
        .expect("read")
        .get(0);
    assert_eq!(sum, 3, "{label}");
    let pid_first: i32 = first
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let pid_second: i32 = second
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    assert_eq!(pid_first, pid_second, "{label}: one pooled backend");

    let maintenance = connect_to(&server, "postgres")
        .await
        .unwrap_or_else(|e| panic!("{label}: login to postgres: {e}"));
    let row = maintenance
        .query_one("SELECT current_database()::text, inet_server_port()", &[])
        .await
        .expect("where");
    assert_eq!(row.get::<_, String>(0), "postgres");
    assert_eq!(
        row.get::<_, i32>(1),
        i32::from(fleet().clusters[serving].port())
    );
    // The routed database is unaffected.
    admin.simple_query("SELECT 1").await.expect("routed");

    let metrics = scrape_metrics(server.metrics_address.expect("metrics")).await;
    for line in [
        "shardgate_other_databases 2".to_string(),
        format!("shardgate_other_database_connections{{database=\"{made}\",state=\"idle\"}} 1"),
    ] {
        assert!(metrics.contains(&line), "{label}: {line} in\n{metrics}");
    }

    drop((first, second, maintenance));
    // Once its clients are gone a pool closes its backends, so the
    // database can be dropped through the proxy as directly.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sessions_on(serving, &made).await > 0 {
        assert!(
            Instant::now() < deadline,
            "{label}: backends of {made} still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    admin
        .simple_query(&format!("DROP DATABASE {made}"))
        .await
        .unwrap_or_else(|e| panic!("{label}: DROP DATABASE through the proxy: {e:?}"));
    for cluster in 0..shards {
        assert!(
            !exists_on(cluster, &made).await,
            "{label}: dropped on shard {cluster}"
        );
    }
    if shards > 1 {
        // Each shard on its own (Postgres refuses CREATE DATABASE in a
        // transaction block): a failure on one is reported, never silent.
        let half = format!("{routed_db}_half");
        connect(&fleet().clusters[2], "postgres")
            .await
            .simple_query(&format!("CREATE DATABASE {half}"))
            .await
            .expect("directly on shard 2");
        let error = admin
            .simple_query(&format!("CREATE DATABASE {half}"))
            .await
            .expect_err("exists on shard 2");
        let db = error.as_db_error().expect("server error");
        let said = format!("{} {}", db.message(), db.detail().unwrap_or_default());
        assert!(
            said.contains("failed on s2") && said.contains("succeeded on s0, s1"),
            "{label}: {said}"
        );
        admin
            .simple_query(&format!("DROP DATABASE {half}"))
            .await
            .expect("dropped everywhere");
    }
    let metrics = scrape_metrics(server.metrics_address.expect("metrics")).await;
    assert!(
        metrics.contains("shardgate_other_databases 0")
            && !metrics.contains("shardgate_other_database_connections{"),
        "{label}: {metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn one_shard_serves_postgres_and_a_database_created_through_it() {
    let db = fresh_db("other_one");
    let map = format!(
        "listen: 127.0.0.1:0\nmetrics: 127.0.0.1:0\nauth: trust\nusers: [ {{ name: app }} ]\n\
         pool: {{ mode: transaction, size: 1 }}\nother_databases: {{ shard: s0 }}\n\
         shards:\n  - {{ name: s0, url: \"{}\" }}\n",
        fleet().clusters[0].url(&db)
    );
    other_databases_are_served("one shard", &db, map, 0, 1).await;
}

#[tokio::test]
async fn three_shards_serve_them_from_the_named_shard() {
    let db = fresh_db("other_three");
    let map = shard_map(
        &db,
        "metrics: 127.0.0.1:0\npool: { mode: transaction, size: 1 }\n\
         default_table: replicated\nother_databases: { shard: s1 }\n",
    );
    other_databases_are_served("three shards", &db, map, 1, 3).await;
}

#[tokio::test]
async fn a_database_the_server_lacks_gets_postgres_own_3d000_at_login() {
    let db = fresh_db("other_missing");
    let server = start_proxy(&shard_map(&db, "other_databases: { shard: s2 }\n")).await;
    let started = Instant::now();
    let error = connect_to(&server, "no_such_database_here")
        .await
        .expect_err("refused");
    assert!(started.elapsed() < Duration::from_secs(5), "not a hang");
    assert_eq!(error.code(), Some(&SqlState::INVALID_CATALOG_NAME));
    let (code, severity, message, _) = refusal(&error);
    assert_eq!(
        (code.as_str(), severity.as_str(), message.as_str()),
        (
            "3D000",
            "FATAL",
            "database \"no_such_database_here\" does not exist"
        )
    );
    // The failed login holds no pool.
    let other = server.shared.other_databases.as_ref().expect("option on");
    assert_eq!(other.len(), 0);
    connect_to(&server, &db)
        .await
        .expect("the routed database still serves")
        .simple_query("SELECT 1")
        .await
        .expect("query");
    server.stop().await;
}

#[tokio::test]
async fn without_the_option_another_name_gets_3d000_naming_it() {
    let db = fresh_db("other_off");
    let server = start_proxy(&shard_map(&db, "")).await;
    let error = connect_to(&server, "postgres").await.expect_err("refused");
    let (code, severity, message, hint) = refusal(&error);
    assert_eq!(
        (code.as_str(), severity.as_str(), message.as_str()),
        ("3D000", "FATAL", "database \"postgres\" does not exist")
    );
    let hint = hint.expect("a hint");
    assert!(
        hint.contains(&format!("serves database \"{db}\"")) && hint.contains("other_databases"),
        "{hint}"
    );
    server.stop().await;
}

#[tokio::test]
async fn max_databases_caps_the_pools_and_idle_ones_give_way() {
    let db = fresh_db("other_cap");
    let [a, b, c] = [
        fresh_db("other_cap_a"),
        fresh_db("other_cap_b"),
        fresh_db("other_cap_c"),
    ];
    let server = start_proxy(&shard_map(
        &db,
        "metrics: 127.0.0.1:0\n\
         other_databases: { shard: s0, max_databases: 2, idle_timeout: 1h }\n",
    ))
    .await;
    let client_a = connect_to(&server, &a).await.expect("a");
    let client_b = connect_to(&server, &b).await.expect("b");
    // A second client of a pooled database takes no new place.
    let client_b2 = connect_to(&server, &b).await.expect("b again");
    let error = connect_to(&server, &c).await.expect_err("over the cap");
    let (code, severity, message, hint) = refusal(&error);
    assert_eq!((code.as_str(), severity.as_str()), ("53300", "FATAL"));
    assert!(
        message.contains(&format!("\"{c}\""))
            && message.contains("other_databases.max_databases (2)"),
        "{message}"
    );
    assert!(hint.is_some_and(|h| h.contains("max_databases")));
    let metrics = scrape_metrics(server.metrics_address.expect("metrics")).await;
    assert!(
        metrics.contains("shardgate_other_database_refusals_total 1"),
        "{metrics}"
    );
    // a's pool stays (idle_timeout 1h) but, without clients, gives way.
    drop(client_a);
    let deadline = Instant::now() + Duration::from_secs(5);
    let client_c = loop {
        match connect_to(&server, &c).await {
            Ok(client) => break client,
            Err(error) if Instant::now() < deadline => {
                assert_eq!(refusal(&error).0, "53300");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("a's idle pool did not give way: {error}"),
        }
    };
    client_c.simple_query("SELECT 1").await.expect("c works");
    client_b2.simple_query("SELECT 1").await.expect("b works");
    let other = server.shared.other_databases.as_ref().expect("option on");
    assert_eq!(other.len(), 2);
    drop((client_b, client_b2, client_c));
    server.stop().await;
}

#[tokio::test]
async fn an_idle_pool_stays_for_idle_timeout_then_closes_its_backends() {
    let db = fresh_db("other_linger");
    let kept = fresh_db("other_linger_kept");
    let server = start_proxy(&shard_map(
        &db,
        "other_databases: { shard: s1, idle_timeout: 700ms }\n",
    ))
    .await;
    let client = connect_to(&server, &kept).await.expect("login");
    client.simple_query("SELECT 1").await.expect("query");
    drop(client);
    let other = server.shared.other_databases.as_ref().expect("option on");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(other.len(), 1, "kept while idle_timeout runs");
    assert_eq!(sessions_on(1, &kept).await, 1, "its backend stays open");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !other.is_empty() || sessions_on(1, &kept).await > 0 {
        assert!(Instant::now() < deadline, "the idle pool did not go");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_cancel_reaches_the_serving_shards_server() {
    let db = fresh_db("other_cancel");
    let server = start_proxy(&shard_map(&db, "other_databases: { shard: s2 }\n")).await;
    let client = connect_to(&server, "postgres").await.expect("login");
    let cancel = support::cancel_after(&client, Duration::from_millis(300));
    let started = Instant::now();
    let error = client
        .simple_query("SELECT pg_sleep(30)")
        .await
        .expect_err("cancelled");
    cancel.await.expect("cancel sent");
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    server.stop().await;
}
