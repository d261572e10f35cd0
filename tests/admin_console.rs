//! The admin console (`admin:` in the map): PgBouncer's SHOW commands and
//! RELOAD for admin users on the admin database; refused to everyone else.

mod support;

use tokio_postgres::SimpleQueryMessage;

const SCHEMA: &str = "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);";

fn map(db: &str, app_password: &str) -> String {
    support::shard_map(
        db,
        &format!(
            "auth: scram-sha-256
users: [ {{ name: app, password: {app_password} }}, {{ name: ops, password: opspw }} ]
admin: {{ users: [ ops ] }}
functions: {{ by_id: {{ kind: hash }} }}
tables:
  users: {{ key: id, function: by_id }}
"
        ),
    )
}

async fn login(
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let url = format!("host=127.0.0.1 port={port} user={user} password={password} dbname={db}");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The rows of a console command, as (column → value) lists.
async fn show(client: &tokio_postgres::Client, command: &str) -> Vec<Vec<(String, String)>> {
    client
        .simple_query(command)
        .await
        .unwrap_or_else(|e| panic!("{command}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                row.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_string(), row.get(i).unwrap_or("").to_string()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn cell<'a>(row: &'a [(String, String)], column: &str) -> &'a str {
    row.iter()
        .find(|(name, _)| name == column)
        .map(|(_, value)| value.as_str())
        .unwrap_or_else(|| panic!("no column {column} in {row:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_see_pools_and_reload_everyone_else_is_refused() {
    let db = support::fresh_db_with("admin_console", SCHEMA).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("map.yaml");
    std::fs::write(&path, map(&db, "first")).expect("map file");
    let config = shardgate::config::Config::load(&path).expect("valid map");
    let server = shardgate::server::start(config).await.expect("started");
    let port = server.address.port();

    let app = login(port, "app", "first", &db).await.expect("app logs in");
    for k in 1..=10i64 {
        app.execute("INSERT INTO users (id, name) VALUES ($1, 'n')", &[&k])
            .await
            .expect("insert");
    }
    app.simple_query("SELECT count(*) FROM users")
        .await
        .expect("fan-out");

    // The application's user is no admin.
    let Err(refused) = login(port, "app", "first", "shardgate").await else {
        panic!("app must be refused the console");
    };
    assert_eq!(
        refused.as_db_error().map(|e| e.code().code()),
        Some("42501"),
        "{refused}"
    );

    let ops = login(port, "ops", "opspw", "shardgate")
        .await
        .expect("an admin user logs in to the console");
    let pools = show(&ops, "SHOW POOLS").await;
    assert_eq!(
        pools
            .iter()
            .map(|r| cell(r, "database"))
            .collect::<Vec<_>>(),
        ["s0", "s1", "s2"]
    );
    let idle: u32 = pools
        .iter()
        .map(|r| cell(r, "sv_idle").parse::<u32>().expect("a number"))
        .sum();
    assert!(
        idle >= 3,
        "the app's backends are idle in the pools: {pools:?}"
    );
    assert_eq!(cell(&pools[0], "pool_mode"), "transaction");

    let databases = show(&ops, "show databases;").await;
    assert_eq!(cell(&databases[1], "name"), "s1");
    assert_eq!(cell(&databases[1], "database"), db);

    let stats = show(&ops, "SHOW STATS").await;
    let total: u64 = stats
        .iter()
        .map(|r| {
            cell(r, "total_query_count")
                .parse::<u64>()
                .expect("a number")
        })
        .sum();
    // 10 inserts and one fan-out over three shards.
    assert!(total >= 13, "{stats:?}");
    assert!(
        stats.iter().all(|r| cell(r, "fanout_query_count") == "1"),
        "{stats:?}"
    );

    let shards = show(&ops, "SHOW SHARDS").await;
    assert!(
        shards.iter().all(|r| cell(r, "state") == "up"),
        "{shards:?}"
    );
    let lists = show(&ops, "SHOW LISTS").await;
    let used_clients = lists
        .iter()
        .find(|r| cell(r, "list") == "used_clients")
        .map(|r| cell(r, "items").to_string());
    assert_eq!(
        used_clients.as_deref(),
        Some("1"),
        "the app's client: {lists:?}"
    );
    let clients = show(&ops, "SHOW CLIENTS").await;
    assert_eq!(
        clients.len(),
        1,
        "the app's client, not the console: {clients:?}"
    );
    assert_eq!(
        (
            cell(&clients[0], "user"),
            cell(&clients[0], "database"),
            cell(&clients[0], "state")
        ),
        ("app", db.as_str(), "idle")
    );
    assert_eq!(cell(&clients[0], "addr"), "127.0.0.1");
    let version = show(&ops, "SHOW VERSION").await;
    assert!(cell(&version[0], "version").starts_with("shardgate "));
    let route = show(&ops, "SHOW ROUTE SELECT name FROM users WHERE id = 7").await;
    let route_text: Vec<&str> = route.iter().map(|r| cell(r, "route")).collect();
    assert!(
        route_text
            .iter()
            .any(|l| l.contains("s0") || l.contains("s1") || l.contains("s2")),
        "{route_text:?}"
    );

    // Mistakes are errors, and the console goes on.
    let error = ops.simple_query("SHOW NOTHING").await.expect_err("unknown");
    assert_eq!(error.as_db_error().map(|e| e.code().code()), Some("42601"));
    let error = ops
        .query("SHOW POOLS", &[])
        .await
        .expect_err("extended protocol");
    assert_eq!(error.as_db_error().map(|e| e.code().code()), Some("0A000"));

    // RELOAD re-reads the file: the new password works for new logins, the
    // connected client goes on.
    std::fs::write(&path, map(&db, "second")).expect("map file rewritten");
    ops.simple_query("RELOAD").await.expect("reload");
    let config = show(&ops, "SHOW CONFIG").await;
    let generation = config
        .iter()
        .find(|r| cell(r, "key") == "map_generation")
        .map(|r| cell(r, "value").to_string());
    assert_eq!(generation.as_deref(), Some("2"));
    assert!(login(port, "app", "first", &db).await.is_err());
    login(port, "app", "second", &db)
        .await
        .expect("new password");
    app.simple_query("SELECT 1").await.expect("still connected");

    // A broken file: RELOAD fails with the file's line, the map stays.
    std::fs::write(&path, "shards: [\n").expect("map file broken");
    let error = ops.simple_query("RELOAD").await.expect_err("invalid map");
    let db_error = error.as_db_error().expect("an ErrorResponse");
    assert_eq!(db_error.code().code(), "F0000");
    assert!(
        db_error.message().contains("map.yaml:"),
        "{}",
        db_error.message()
    );
    login(port, "app", "second", &db)
        .await
        .expect("the running map stays");

    drop(ops);
    server.stop().await;
}

/// The console needs no shard: with the only shard down it logs in and
/// shows the shard as down (a client of the application gets 08006).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_answers_with_every_shard_down() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let port = closed.local_addr().expect("address").port();
    drop(closed);
    let map = format!(
        "listen: 127.0.0.1:0
auth: scram-sha-256
users: [ {{ name: ops, password: opspw }} ]
admin: {{ database: console, users: [ ops ] }}
pool: {{ connect_timeout: 1s }}
shards:
  - {{ name: s0, url: \"postgres://postgres@127.0.0.1:{port}/app\" }}
"
    );
    let server = support::start_proxy(&map).await;
    let proxy_port = server.address.port();
    let Err(app) = login(proxy_port, "ops", "opspw", "app").await else {
        panic!("no shard to serve the application's database");
    };
    assert_eq!(
        app.as_db_error().map(|e| e.code().code()),
        Some("08006"),
        "{app}"
    );
    let ops = login(proxy_port, "ops", "opspw", "console")
        .await
        .expect("the console logs in with its shard down");
    let shards = show(&ops, "SHOW SHARDS").await;
    assert_eq!(cell(&shards[0], "state"), "down", "{shards:?}");
    server.stop().await;
}

/// PAUSE as in PgBouncer: it returns once the transactions in flight have
/// finished; new statements wait (not fail) until RESUME, or fail with
/// 57P03 after `pool.pause_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_new_statements_until_resume() {
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let db = support::fresh_db_with("admin_pause", SCHEMA).await;
    let server = support::start_proxy(&format!(
        "{}pool: {{ pause_timeout: 2s }}\n",
        map(&db, "pw")
    ))
    .await;
    let port = server.address.port();
    let app = Arc::new(login(port, "app", "pw", &db).await.expect("app"));
    let ops = Arc::new(login(port, "ops", "opspw", "shardgate").await.expect("ops"));

    // A transaction in flight holds a backend: PAUSE waits for its COMMIT.
    app.batch_execute("BEGIN; INSERT INTO users (id, name) VALUES (1, 'in flight')")
        .await
        .expect("a transaction in flight");
    let pausing = tokio::spawn({
        let ops = ops.clone();
        async move { ops.simple_query("PAUSE").await.map(|_| Instant::now()) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pausing.is_finished(),
        "PAUSE returned with a transaction in flight"
    );
    app.batch_execute("COMMIT")
        .await
        .expect("the transaction finishes");
    let committed = Instant::now();
    let paused_at = pausing.await.expect("task").expect("PAUSE");
    assert!(paused_at >= committed, "PAUSE returned before the COMMIT");
    let shards = show(&ops, "SHOW SHARDS").await;
    assert!(
        shards.iter().all(|r| cell(r, "state") == "paused"),
        "{shards:?}"
    );

    // A new statement waits, and runs at RESUME.
    let waiting = tokio::spawn({
        let app = app.clone();
        async move {
            app.simple_query("SELECT count(*) FROM users")
                .await
                .map(|_| Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a statement ran on a paused shard");
    ops.simple_query("RESUME").await.expect("RESUME");
    let resumed = Instant::now();
    let ran_at = waiting
        .await
        .expect("task")
        .expect("the waiting statement runs");
    assert!(ran_at >= resumed && ran_at - resumed < Duration::from_secs(2));

    // Paused past pool.pause_timeout: 57P03 naming the shard; the client goes on.
    ops.simple_query("PAUSE s1").await.expect("PAUSE one shard");
    let started = Instant::now();
    let error = app
        .simple_query("SELECT count(*) FROM users")
        .await
        .expect_err("s1 stays paused");
    let db_error = error.as_db_error().expect("an ErrorResponse");
    assert_eq!(db_error.code().code(), "57P03", "{db_error:?}");
    assert!(db_error.message().contains("s1"), "{}", db_error.message());
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
    let error = ops
        .simple_query("PAUSE s9")
        .await
        .expect_err("unknown shard");
    assert_eq!(error.as_db_error().map(|e| e.code().code()), Some("42704"));
    ops.simple_query("RESUME s1")
        .await
        .expect("RESUME one shard");
    app.simple_query("SELECT count(*) FROM users")
        .await
        .expect("served again");
    server.stop().await;
}
