//! Issue #6: DDL through shardgate is broadcast to every shard; in a
//! transaction block it is atomic with the rest (two-phase commit), and
//! statements that cannot run in a transaction block run on each shard,
//! with an error that says which shards succeeded and which failed.

mod support;

use support::{connect, connect_proxy, fleet, fresh_db, shard_map, start_proxy};
use tokio_postgres::Client;

const MAP: &str = "\
functions:
  by_id: { kind: hash }
tables:
  users: { key: id, function: by_id }
";

async fn direct_clients(db: &str) -> Vec<Client> {
    let mut clients = Vec::new();
    for cluster in &fleet().clusters {
        let client = connect(cluster, db).await;
        client
            .batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, email text)")
            .await
            .expect("schema");
        clients.push(client);
    }
    clients
}

/// Whether each shard has `relation`.
async fn exists(direct: &[Client], relation: &str) -> Vec<bool> {
    let mut found = Vec::new();
    for c in direct {
        found.push(
            c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&relation])
                .await
                .expect("to_regclass")
                .get(0),
        );
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_in_a_transaction_is_all_or_nothing() {
    let db = fresh_db("ddl_tx");
    let direct = direct_clients(&db).await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let client = connect_proxy(&server, "app", None).await;

    // One query string with its own BEGIN/COMMIT would commit on each
    // shard separately: refused, nothing changed.
    let error = client
        .batch_execute(
            "BEGIN; CREATE TABLE audit (id int); ALTER TABLE users ADD COLUMN age int; COMMIT",
        )
        .await
        .expect_err("transaction control in a multi-shard query string");
    assert_eq!(error.code().map(|c| c.code()), Some("0A000"), "{error}");
    assert_eq!(exists(&direct, "audit").await, vec![false; 3]);
    // Inside a transaction too; the transaction is then aborted.
    client.simple_query("BEGIN").await.expect("begin");
    let error = client
        .simple_query("CREATE TABLE audit (id int); COMMIT")
        .await
        .expect_err("COMMIT in a multi-shard query string");
    assert_eq!(error.code().map(|c| c.code()), Some("0A000"), "{error}");
    client
        .simple_query("COMMIT")
        .await
        .expect("commit answers ROLLBACK");
    assert_eq!(exists(&direct, "audit").await, vec![false; 3]);
    // Several statements without transaction control are fine, and a
    // function body with BEGIN ATOMIC is not transaction control.
    client
        .batch_execute(
            "CREATE TABLE t1 (id int); CREATE FUNCTION one() RETURNS int LANGUAGE sql \
             BEGIN ATOMIC SELECT 1; END; CREATE TABLE t2 (id int)",
        )
        .await
        .expect("several DDL statements in one string");
    assert_eq!(exists(&direct, "t2").await, vec![true; 3]);

    // Committed: every shard.
    for sql in [
        "BEGIN",
        "CREATE TABLE audit (id int)",
        "ALTER TABLE users ADD COLUMN age int",
        "COMMIT",
    ] {
        client.simple_query(sql).await.expect(sql);
    }
    assert_eq!(exists(&direct, "audit").await, vec![true; 3]);

    // A failure on one shard (the table exists only on s1) rolls back the
    // others' DDL of the same transaction.
    direct[1]
        .batch_execute("CREATE TABLE clash (id int)")
        .await
        .expect("clash on s1");
    client.simple_query("BEGIN").await.expect("begin");
    client
        .simple_query("CREATE TABLE before_clash (id int)")
        .await
        .expect("first DDL");
    let error = client
        .simple_query("CREATE TABLE clash (id int)")
        .await
        .expect_err("clash on s1");
    assert_eq!(error.code().map(|c| c.code()), Some("42P07"), "{error}");
    client.simple_query("ROLLBACK").await.expect("rollback");
    assert_eq!(exists(&direct, "before_clash").await, vec![false; 3]);

    // Rolled back explicitly: nowhere.
    for sql in ["BEGIN", "CREATE TABLE gone (id int)", "ROLLBACK"] {
        client.simple_query(sql).await.expect(sql);
    }
    assert_eq!(exists(&direct, "gone").await, vec![false; 3]);
    server.stop().await;
}

/// With two-phase commit off, a statement that would write on several
/// shards is refused, and the session stays in step: the next query gets
/// its own answer (no stray ReadyForQuery).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_multi_shard_write_without_two_phase_commit_keeps_the_session_in_step() {
    let db = fresh_db("ddl_no2pc");
    let _direct = direct_clients(&db).await;
    let server = start_proxy(&shard_map(&db, &format!("{MAP}two_phase_commit: false\n"))).await;
    let client = connect_proxy(&server, "app", None).await;
    for round in 0..3 {
        let error = client
            .simple_query("UPDATE users SET email = 'x'")
            .await
            .expect_err("keyless UPDATE needs two-phase commit");
        assert_eq!(error.code().map(|c| c.code()), Some("0A000"), "{error}");
        let rows = client
            .simple_query(&format!("SELECT {round} AS n"))
            .await
            .expect("the next query");
        let value = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        });
        assert_eq!(value, Some(round.to_string()), "answer of the next query");
    }
    // Inside a transaction: refused, and the transaction is aborted.
    client.simple_query("BEGIN").await.expect("begin");
    client
        .simple_query("INSERT INTO users (id) VALUES (1)")
        .await
        .expect("one shard");
    let error = client
        .simple_query("UPDATE users SET email = 'y'")
        .await
        .expect_err("second written shard refused");
    assert_eq!(error.code().map(|c| c.code()), Some("0A000"), "{error}");
    let after = client
        .simple_query("SELECT 1")
        .await
        .expect_err("transaction aborted");
    assert_eq!(after.code().map(|c| c.code()), Some("25P02"), "{after}");
    client.simple_query("ROLLBACK").await.expect("rollback");
    let rows = client
        .query("SELECT count(*) FROM users", &[])
        .await
        .expect("count");
    assert_eq!(rows[0].get::<_, i64>(0), 0, "nothing committed");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_index_concurrently_reports_which_shards_failed() {
    let db = fresh_db("ddl_concurrently");
    let direct = direct_clients(&db).await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let client = connect_proxy(&server, "app", None).await;

    // Works everywhere.
    client
        .simple_query("CREATE INDEX CONCURRENTLY users_email ON users (email)")
        .await
        .expect("CREATE INDEX CONCURRENTLY");
    assert_eq!(exists(&direct, "users_email").await, vec![true; 3]);

    // A row with id 1 on s2 only: the index expression divides by zero there.
    direct[2]
        .batch_execute("INSERT INTO users VALUES (1, 'x')")
        .await
        .expect("row on s2");
    let error = client
        .simple_query("CREATE INDEX CONCURRENTLY users_inverse ON users ((1 / (id - 1)))")
        .await
        .expect_err("fails on s2");
    let db_error = error.as_db_error().expect("server error");
    let text = format!(
        "{} {} {}",
        db_error.message(),
        db_error.detail().unwrap_or(""),
        db_error.hint().unwrap_or("")
    );
    eprintln!("{}: {text}", db_error.code().code());
    assert_eq!(db_error.code().code(), "22012", "{text}");
    assert!(text.contains("s2"), "names the failed shard: {text}");
    assert!(
        text.contains("s0") && text.contains("s1"),
        "names the shards that succeeded: {text}"
    );
    // VACUUM runs on each shard.
    client.simple_query("VACUUM users").await.expect("VACUUM");
    server.stop().await;
}

/// A column named `concurrently` does not make a multi-row INSERT a
/// "statement that cannot run in a transaction": split over the shards, it
/// is still atomic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_insert_into_a_column_named_concurrently_is_atomic() {
    let db = fresh_db("ddl_concurrently_column");
    let direct = direct_clients(&db).await;
    for c in &direct {
        c.batch_execute("CREATE TABLE jobs (id bigint PRIMARY KEY, \"concurrently\" boolean)")
            .await
            .expect("jobs");
    }
    let map = format!("{MAP}  jobs: {{ key: id, function: by_id }}\n");
    let server = start_proxy(&shard_map(&db, &map)).await;
    let client = connect_proxy(&server, "app", None).await;
    // id 1 exists on its shard already: the INSERT fails there.
    client
        .simple_query("INSERT INTO jobs (id, \"concurrently\") VALUES (1, false)")
        .await
        .expect("one row");
    let values: Vec<String> = (1..=30).map(|i| format!("({i}, true)")).collect();
    let error = client
        .simple_query(&format!(
            "INSERT INTO jobs (id, \"concurrently\") VALUES {}",
            values.join(", ")
        ))
        .await
        .expect_err("duplicate key on one shard");
    assert_eq!(error.code().map(|c| c.code()), Some("23505"), "{error}");
    let mut rows = 0;
    for c in &direct {
        rows += c
            .query_one("SELECT count(*) FROM jobs", &[])
            .await
            .expect("jobs")
            .get::<_, i64>(0);
    }
    assert_eq!(rows, 1, "the failed INSERT left nothing on any shard");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_constraints_without_the_sharding_key_are_refused() {
    let db = fresh_db("ddl_unique");
    let direct = direct_clients(&db).await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let client = connect_proxy(&server, "app", None).await;
    // Each shard would check only its own rows: the same email could be
    // stored once per shard. Refused before any shard runs it.
    let refused = client
        .simple_query("CREATE UNIQUE INDEX users_email ON users (email)")
        .await
        .expect_err("unique without the key");
    let db_error = refused.as_db_error().expect("a server error");
    assert_eq!(db_error.code().code(), "0A000");
    assert!(
        db_error.message().contains("sharding key id"),
        "{}",
        db_error.message()
    );
    assert_eq!(exists(&direct, "users_email").await, [false, false, false]);
    // With the key it holds globally: created on every shard.
    client
        .simple_query("CREATE UNIQUE INDEX users_id_email ON users (id, email)")
        .await
        .expect("unique with the key");
    assert_eq!(exists(&direct, "users_id_email").await, [true, true, true]);
    server.stop().await;
}
