//! Ending clients on purpose (issue #17): a graceful shutdown lets each
//! client finish its transaction, then sends Postgres' own `FATAL 57P01`;
//! the console's KILL ends one client at once, rolling its transaction back.

mod support;

use std::time::{Duration, Instant};

use support::wire::{self, Msg, Wire};

const SCHEMA: &str = "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);";

fn map(db: &str) -> String {
    support::shard_map(
        db,
        "users: [ { name: app }, { name: ops } ]
auth: trust
admin: { users: [ ops ] }
functions: { by_id: { kind: hash } }
tables:
  users: { key: id, function: by_id }
",
    )
}

fn tags(messages: &[Msg]) -> String {
    messages.iter().map(|m| m.tag as char).collect()
}

/// The next message, within `limit`.
async fn next(client: &mut Wire, limit: Duration) -> Option<Msg> {
    tokio::time::timeout(limit, client.recv())
        .await
        .ok()
        .flatten()
}

fn is_admin_termination(message: &Option<Msg>) -> bool {
    message.as_ref().is_some_and(|m| {
        m.tag == b'E'
            && m.error_code().as_deref() == Some("57P01")
            && m.normalized().contains("FATAL")
    })
}

async fn count(db: &str, key: i64) -> i64 {
    let mut total = 0;
    for cluster in &support::fleet().clusters {
        total += support::connect(cluster, db)
            .await
            .query_one("SELECT count(*) FROM users WHERE id = $1", &[&key])
            .await
            .expect("count on a shard")
            .get::<_, i64>(0);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_transactions_finish_then_says_why() {
    let db = support::fresh_db_with("graceful_stop", SCHEMA).await;
    let server = support::start_proxy(&map(&db)).await;
    let port = server.address.port();
    let mut idle = Wire::connect(port, "app", &db).await;
    let mut busy = Wire::connect(port, "app", &db).await;
    let mut stuck = Wire::connect(port, "app", &db).await;
    assert_eq!(tags(&busy.exchange(&wire::query("BEGIN"), 1).await), "CZ");
    let insert = "INSERT INTO users (id, name) VALUES (1, 'committed at shutdown')";
    assert_eq!(tags(&busy.exchange(&wire::query(insert), 1).await), "CZ");
    assert_eq!(tags(&stuck.exchange(&wire::query("BEGIN"), 1).await), "CZ");
    let insert = "INSERT INTO users (id, name) VALUES (2, 'never committed')";
    assert_eq!(tags(&stuck.exchange(&wire::query(insert), 1).await), "CZ");

    let started = Instant::now();
    let stopping = tokio::spawn(server.shutdown(Duration::from_secs(2)));
    // The idle client is told at once.
    assert!(
        is_admin_termination(&next(&mut idle, Duration::from_secs(1)).await),
        "the idle client gets FATAL 57P01"
    );
    assert!(
        next(&mut idle, Duration::from_secs(1)).await.is_none(),
        "then EOF"
    );
    // New clients are refused: the listener is closed.
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err());
    // A transaction in flight commits, then its client is told.
    let answer = busy.exchange(&wire::query("COMMIT"), 1).await;
    assert_eq!(
        tags(&answer),
        "CZ",
        "the transaction in flight commits: {answer:?}"
    );
    assert!(is_admin_termination(
        &next(&mut busy, Duration::from_secs(1)).await
    ));
    // One still open after shutdown_timeout is ended, rolled back.
    assert!(is_admin_termination(
        &next(&mut stuck, Duration::from_secs(4)).await
    ));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("shutdown returns once every client is gone")
        .expect("shutdown task");
    assert_eq!(count(&db, 1).await, 1, "committed");
    assert_eq!(count(&db, 2).await, 0, "rolled back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_ends_exactly_that_client() {
    let db = support::fresh_db_with("console_kill", SCHEMA).await;
    let server = support::start_proxy(&map(&db)).await;
    let port = server.address.port();
    let mut other = Wire::connect(port, "app", &db).await;
    let mut victim = Wire::connect(port, "app", &db).await;
    assert_eq!(tags(&victim.exchange(&wire::query("BEGIN"), 1).await), "CZ");
    let insert = "INSERT INTO users (id, name) VALUES (3, 'killed')";
    assert_eq!(tags(&victim.exchange(&wire::query(insert), 1).await), "CZ");

    let url = format!("host=127.0.0.1 port={port} user=ops dbname=shardgate");
    let (ops, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("console");
    tokio::spawn(connection);
    ops.simple_query(&format!("KILL {}", victim.key.0))
        .await
        .expect("KILL");
    assert!(
        is_admin_termination(&next(&mut victim, Duration::from_secs(2)).await),
        "the killed client gets FATAL 57P01"
    );
    assert!(
        next(&mut victim, Duration::from_secs(1)).await.is_none(),
        "then EOF"
    );
    assert_eq!(count(&db, 3).await, 0, "its transaction rolled back");
    // The other client is untouched.
    let answer = other
        .exchange(&wire::query("SELECT count(*) FROM users"), 1)
        .await;
    assert_eq!(tags(&answer), "TDCZ", "{answer:?}");
    let error = ops
        .simple_query("KILL 999999")
        .await
        .expect_err("no such client");
    assert_eq!(error.as_db_error().map(|e| e.code().code()), Some("42704"));
    server.stop().await;
}
