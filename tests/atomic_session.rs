//! Multi-shard transactions and the session around them: a client that
//! leaves in the middle leaves no lock and no data behind, and session
//! pooling keeps working across two-phase commits.

mod support;

use std::time::Duration;

use support::{connect, connect_proxy, fleet, fresh_db, shard_map, start_proxy};
use tokio_postgres::Client;

const SCHEMA: &str = "\
    CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL);\
    INSERT INTO items SELECT g, 0 FROM generate_series(1, 30) g;";

const MAP: &str = "\
functions:
  by_id: { kind: hash }
tables:
  items: { key: id, function: by_id }
";

async fn setup(name: &str) -> (String, Vec<Client>) {
    let db = fresh_db(name);
    let mut direct = Vec::new();
    for cluster in &fleet().clusters {
        let c = connect(cluster, &db).await;
        c.batch_execute(SCHEMA).await.expect("schema");
        direct.push(c);
    }
    (db, direct)
}

async fn sum(direct: &[Client]) -> i64 {
    let mut total = 0;
    for c in direct {
        // The seed rows are on every shard; routed updates change the
        // copy on the key's shard only, so the sum counts each change once.
        total += c
            .query_one("SELECT coalesce(sum(v), 0)::bigint FROM items", &[])
            .await
            .expect("sum")
            .get::<_, i64>(0);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_transaction_leaves_no_lock_and_no_data() {
    let (db, direct) = setup("session_leave").await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let leaving = connect_proxy(&server, "app", None).await;
    leaving.simple_query("BEGIN").await.expect("begin");
    for id in 1..=30 {
        leaving
            .simple_query(&format!("UPDATE items SET v = v + 1 WHERE id = {id}"))
            .await
            .expect("update");
    }
    drop(leaving);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Another client updates the same rows at once: no lock left behind.
    let client = connect_proxy(&server, "app", None).await;
    let update = async {
        client.simple_query("BEGIN").await.expect("begin");
        for id in 1..=30 {
            client
                .simple_query(&format!("UPDATE items SET v = v + 10 WHERE id = {id}"))
                .await
                .expect("update");
        }
        client.simple_query("COMMIT").await.expect("commit");
    };
    tokio::time::timeout(Duration::from_secs(10), update)
        .await
        .expect("rows still locked by the departed client's transaction");
    // 30 routed updates of 10 each.
    assert_eq!(sum(&direct).await, 300, "only the second client's updates");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pooling_keeps_settings_and_statements_across_two_phase_commits() {
    let (db, direct) = setup("session_mode").await;
    let server = start_proxy(&shard_map(
        &db,
        &format!("pool: {{ mode: session, size: 4 }}\n{MAP}"),
    ))
    .await;
    let client = connect_proxy(&server, "app", None).await;
    client
        .simple_query("SET application_name = 'sg_session_test'")
        .await
        .expect("set");
    let bump = client
        .prepare("UPDATE items SET v = v + 1 WHERE id = $1")
        .await
        .expect("prepare");
    for round in 0..3 {
        client.simple_query("BEGIN").await.expect("begin");
        for id in 1..=30i64 {
            client.execute(&bump, &[&id]).await.expect("bump");
        }
        client.simple_query("COMMIT").await.expect("commit");
        let name: String = client
            .query_one("SELECT current_setting('application_name')", &[])
            .await
            .expect("setting")
            .get(0);
        assert_eq!(name, "sg_session_test", "round {round}");
    }
    assert_eq!(sum(&direct).await, 90);
    server.stop().await;
}
