//! Transaction pooling must be invisible: 50 clients on a pool of 5 see their
//! own SETs and prepared statements, never another client's, and rollbacks
//! and disconnects inside transactions leave nothing behind.

mod support;

use std::time::Duration;

const CLIENTS: usize = 50;
const ROUNDS: i32 = 20;

fn pooled_map(db: &str, size: u32, mode: &str) -> String {
    support::shard_map(
        db,
        &format!("pool: {{ mode: {mode}, size: {size}, checkout_timeout: 30s }}\n"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_on_five_connections_keep_their_own_session_state() {
    let db = support::fresh_db("txpool_isolation");
    let server = support::start_proxy(&pooled_map(&db, 5, "transaction")).await;
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let client = support::connect_proxy(&server, "app", None).await;
        tasks.push(tokio::spawn(async move {
            let i32i = i as i32;
            let timeout = format!("{}ms", 20_001 + i); // not a whole second: Postgres would print "20s"
            client
                .batch_execute(&format!("SET application_name = 'c{i}'; SET statement_timeout = '{timeout}'"))
                .await
                .expect("set");
            // Every client uses tokio-postgres' statement names (s0, s1, …) for different SQL.
            let statement = client
                .prepare(&format!(
                    "SELECT $1::int * {i} AS v, current_setting('application_name') AS app, current_setting('statement_timeout') AS st"
                ))
                .await
                .expect("prepare");
            for k in 0..ROUNDS {
                let row = client.query_one(&statement, &[&k]).await.expect("query");
                assert_eq!(row.get::<_, i32>("v"), k * i32i, "client {i} got another client's statement");
                assert_eq!(row.get::<_, String>("app"), format!("c{i}"), "client {i}: application_name leaked");
                assert_eq!(row.get::<_, String>("st"), timeout, "client {i}: statement_timeout leaked");
                match k % 4 {
                    0 => {
                        // A SET inside a rolled-back transaction does not persist.
                        client
                            .batch_execute("BEGIN; SET application_name = 'rolled-back'; ROLLBACK")
                            .await
                            .expect("rollback");
                    }
                    1 => {
                        // SET LOCAL lasts only for its transaction.
                        client
                            .batch_execute("BEGIN; SET LOCAL statement_timeout = '1s'; SELECT 1; COMMIT")
                            .await
                            .expect("set local");
                    }
                    2 => {
                        // A failed transaction.
                        client.batch_execute("BEGIN").await.expect("begin");
                        let error = client.batch_execute("SELECT 1/0").await.expect_err("division by zero");
                        assert_eq!(error.code().map(|c| c.code()), Some("22012"));
                        client.batch_execute("ROLLBACK").await.expect("rollback");
                    }
                    _ => tokio::task::yield_now().await,
                }
            }
            // A SET in a committed transaction does persist.
            client
                .batch_execute(&format!("BEGIN; SET application_name = 'c{i}-committed'; COMMIT"))
                .await
                .expect("commit");
            let row = client.query_one(&statement, &[&1]).await.expect("query");
            assert_eq!(row.get::<_, String>("app"), format!("c{i}-committed"));
            i
        }));
    }
    for task in tasks {
        task.await.expect("client task panicked");
    }
    // Never more than the pool size of backends on the shard.
    let shard = support::connect(&support::fleet().clusters[0], &db).await;
    let backends: i64 = shard
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("count backends")
        .get(0);
    assert!(backends <= 5, "{backends} backends for a pool of 5");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_vanishing_inside_a_transaction_leaves_nothing() {
    let db = support::fresh_db("txpool_vanish");
    let shard = support::connect(&support::fleet().clusters[0], &db).await;
    shard
        .batch_execute("CREATE TABLE t (v int)")
        .await
        .expect("create");
    let server = support::start_proxy(&pooled_map(&db, 1, "transaction")).await;
    {
        let client = support::connect_proxy(&server, "app", None).await;
        client
            .batch_execute("BEGIN; INSERT INTO t VALUES (1); SET application_name = 'ghost'")
            .await
            .expect("begin");
        // Dropping the client closes the connection mid-transaction.
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The single pooled backend is reused, clean, by the next client.
    let next = support::connect_proxy(&server, "app", None).await;
    let row = next
        .query_one(
            "SELECT count(*)::int, current_setting('application_name'), pg_backend_pid() FROM t",
            &[],
        )
        .await
        .expect("query");
    assert_eq!(
        row.get::<_, i32>(0),
        0,
        "the vanished client's insert must be rolled back"
    );
    assert_ne!(row.get::<_, String>(1), "ghost");
    let visible: i64 = shard
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(visible, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_pins_one_backend_per_client() {
    let db = support::fresh_db("session_mode");
    let server = support::start_proxy(&pooled_map(&db, 2, "session")).await;
    let a = support::connect_proxy(&server, "app", None).await;
    let b = support::connect_proxy(&server, "app", None).await;
    let pid = |row: tokio_postgres::Row| row.get::<_, i32>(0);
    let a1 = pid(a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("a"));
    let b1 = pid(b
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("b"));
    let a2 = pid(a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("a"));
    assert_eq!(a1, a2, "session mode keeps the backend");
    assert_ne!(a1, b1);
    // Temp tables and LISTEN work in session mode.
    a.batch_execute("CREATE TEMP TABLE tmp (v int); INSERT INTO tmp VALUES (7)")
        .await
        .expect("temp");
    let v: i32 = a
        .query_one("SELECT v FROM tmp", &[])
        .await
        .expect("tmp")
        .get(0);
    assert_eq!(v, 7);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_tables_pin_the_backend_in_transaction_mode() {
    let db = support::fresh_db("txpool_pin");
    let server = support::start_proxy(&pooled_map(&db, 2, "transaction")).await;
    let a = support::connect_proxy(&server, "app", None).await;
    a.batch_execute("CREATE TEMP TABLE tmp (v int); INSERT INTO tmp VALUES (1)")
        .await
        .expect("temp");
    // Other clients come and go; the temp table stays reachable for its owner.
    for _ in 0..5 {
        let other = support::connect_proxy(&server, "app", None).await;
        other.batch_execute("SELECT 1").await.expect("other");
    }
    let v: i32 = a
        .query_one("SELECT v FROM tmp", &[])
        .await
        .expect("tmp")
        .get(0);
    assert_eq!(v, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_across_clients_in_session_mode() {
    use support::wire::{self, Wire};
    let db = support::fresh_db("session_listen");
    let server = support::start_proxy(&pooled_map(&db, 3, "session")).await;
    let port = server.address.port();
    let mut listener = Wire::connect(port, "app", &db).await;
    listener.exchange(&wire::query("LISTEN jobs"), 1).await;
    let mut notifier = Wire::connect(port, "app", &db).await;
    notifier
        .exchange(&wire::query("NOTIFY jobs, 'run 42'"), 1)
        .await;
    // The notification arrives while the listener is idle, unprompted.
    let message = listener.recv().await.expect("a notification");
    assert_eq!(message.tag, b'A', "{}", message.normalized());
    assert!(message.normalized().contains("jobs") && message.normalized().contains("run 42"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepare_and_listen_pin_the_backend_in_transaction_mode() {
    use support::wire::{self, Wire};
    let db = support::fresh_db("txpool_sql_prepare");
    // Three backends: the owner and the listener each pin one.
    let server = support::start_proxy(&pooled_map(&db, 3, "transaction")).await;
    let port = server.address.port();
    let owner = support::connect_proxy(&server, "app", None).await;
    owner
        .batch_execute("PREPARE double_it(int) AS SELECT $1 * 2")
        .await
        .expect("prepare");
    // Other clients use the pool in between; the owner's SQL-level statement survives.
    for _ in 0..4 {
        let other = support::connect_proxy(&server, "app", None).await;
        other.batch_execute("SELECT 1").await.expect("other");
    }
    let rows = owner
        .simple_query("EXECUTE double_it(21)")
        .await
        .expect("execute");
    let value = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(value.as_deref(), Some("42"));
    owner
        .batch_execute("DEALLOCATE double_it")
        .await
        .expect("deallocate");

    // LISTEN in transaction mode keeps the backend, so notifications arrive.
    let mut listener = Wire::connect(port, "app", &db).await;
    listener.exchange(&wire::query("LISTEN jobs"), 1).await;
    let mut notifier = Wire::connect(port, "app", &db).await;
    notifier
        .exchange(&wire::query("NOTIFY jobs, 'pinned'"), 1)
        .await;
    let message = listener.recv().await.expect("a notification");
    assert_eq!(message.tag, b'A', "{}", message.normalized());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_role_never_leaks_to_the_next_client() {
    let db = support::fresh_db("txpool_role");
    for cluster in &support::fleet().clusters {
        let shard = support::connect(cluster, &db).await;
        shard
            .batch_execute(&format!(
                "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'limited_{db}') THEN CREATE ROLE limited_{db}; END IF; END$$"
            ))
            .await
            .expect("create role");
    }
    let server = support::start_proxy(&pooled_map(&db, 1, "transaction")).await;
    let a = support::connect_proxy(&server, "app", None).await;
    a.batch_execute(&format!("SET ROLE limited_{db}"))
        .await
        .expect("set role");
    let b = support::connect_proxy(&server, "app", None).await;
    let user: String = b
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("b")
        .get(0);
    assert_eq!(user, "postgres", "another client's SET ROLE leaked");
    let user: String = a
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("a")
        .get(0);
    assert_eq!(
        user,
        format!("limited_{db}"),
        "the client's own role is restored"
    );
    a.batch_execute("RESET ROLE").await.expect("reset role");
    let user: String = a
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("a")
        .get(0);
    assert_eq!(user, "postgres");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unnamed_statement_survives_a_backend_switch() {
    use support::wire::{self, Wire};
    let db = support::fresh_db("txpool_unnamed");
    // One backend: the other client's simple query replaces the unnamed statement there.
    let server = support::start_proxy(&pooled_map(&db, 1, "transaction")).await;
    let port = server.address.port();
    let mut a = Wire::connect(port, "app", &db).await;
    let mut b = Wire::connect(port, "app", &db).await;
    // Parse + Describe + Sync, then Bind + Execute + Sync later (pgx, Npgsql do this).
    let described = a
        .exchange(
            &[
                wire::parse("", "SELECT $1::int + 1 AS n", &[23]),
                wire::describe(b'S', ""),
                wire::sync(),
            ]
            .concat(),
            1,
        )
        .await;
    assert!(described.iter().any(|m| m.tag == b'1'), "ParseComplete");
    b.exchange(&wire::query("SELECT 'in between'"), 1).await;
    let answer = a
        .exchange(
            &[
                wire::bind("", "", &[Some("41")]),
                wire::execute("", 0),
                wire::sync(),
            ]
            .concat(),
            1,
        )
        .await;
    let rendered: Vec<String> = answer.iter().map(wire::Msg::normalized).collect();
    assert!(answer.iter().all(|m| m.tag != b'E'), "{rendered:?}");
    assert!(rendered.iter().any(|m| m.contains("42")), "{rendered:?}");
    // As in Postgres, a simple query of the client itself replaces its unnamed statement.
    a.exchange(&wire::query("SELECT 1"), 1).await;
    let answer = a
        .exchange(
            &[
                wire::bind("", "", &[Some("41")]),
                wire::execute("", 0),
                wire::sync(),
            ]
            .concat(),
            1,
        )
        .await;
    assert_eq!(
        answer
            .iter()
            .find(|m| m.tag == b'E')
            .and_then(|m| m.error_code())
            .as_deref(),
        Some("26000"),
        "Postgres: unnamed prepared statement does not exist"
    );
    server.stop().await;
}
