//! COMMIT / ROLLBACK sent with the extended protocol (Parse/Bind/Execute,
//! as pgbench `-M extended` and drivers that prepare every statement do) end
//! a multi-shard transaction like the simple-query ones: two-phase commit
//! when several shards wrote, rollback everywhere otherwise.

mod support;

use support::{connect, connect_proxy, fleet, fresh_db, shard_map, start_proxy};
use tokio_postgres::Client;

const SCHEMA: &str = "\
    CREATE TABLE items (id bigint PRIMARY KEY, tx int NOT NULL);\
    CREATE TABLE placement_probe (id bigint) PARTITION BY HASH (id);";

const MAP: &str = "\
functions:
  by_id: { kind: hash }
tables:
  items: { key: id, function: by_id }
";

/// Keys on shard 0, 1 and 2, the `n`th of each.
async fn keys(probe: &Client, n: i64) -> [i64; 3] {
    let mut keys = [0; 3];
    for (shard, key) in keys.iter_mut().enumerate() {
        *key = probe
            .query_one(
                "SELECT k FROM generate_series(1::bigint, 10000) k \
                 WHERE satisfies_hash_partition('placement_probe'::regclass, 3, $1, k) \
                 ORDER BY k OFFSET $2 LIMIT 1",
                &[&(shard as i32), &n],
            )
            .await
            .expect("a key of the shard")
            .get(0);
    }
    keys
}

/// Rows of `tx` on each shard, and prepared transactions left anywhere.
async fn state(direct: &[Client], tx: i32) -> (Vec<i64>, i64) {
    let mut rows = Vec::new();
    let mut prepared = 0;
    for c in direct {
        rows.push(
            c.query_one("SELECT count(*) FROM items WHERE tx = $1", &[&tx])
                .await
                .expect("rows")
                .get(0),
        );
        prepared += c
            .query_one(
                "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
                &[],
            )
            .await
            .expect("prepared")
            .get::<_, i64>(0);
    }
    (rows, prepared)
}

async fn write_everywhere(client: &Client, keys: [i64; 3], tx: i32) {
    for key in keys {
        let n = client
            .execute("INSERT INTO items (id, tx) VALUES ($1, $2)", &[&key, &tx])
            .await
            .unwrap_or_else(|e| panic!("insert {key}: {e}"));
        assert_eq!(n, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_commit_and_rollback_end_multi_shard_transactions() {
    let db = fresh_db("extended_commit");
    let mut direct = Vec::new();
    for cluster in &fleet().clusters {
        let c = connect(cluster, &db).await;
        c.batch_execute(SCHEMA).await.expect("schema");
        direct.push(c);
    }
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let client = connect_proxy(&server, "app", None).await;

    // Unnamed statements (tokio-postgres `execute` with a string).
    client.execute("BEGIN", &[]).await.expect("begin");
    write_everywhere(&client, keys(&direct[0], 0).await, 1).await;
    client
        .execute("COMMIT", &[])
        .await
        .expect("extended COMMIT");
    assert_eq!(state(&direct, 1).await, (vec![1, 1, 1], 0), "committed");

    client.execute("BEGIN", &[]).await.expect("begin");
    write_everywhere(&client, keys(&direct[0], 1).await, 2).await;
    client
        .execute("ROLLBACK", &[])
        .await
        .expect("extended ROLLBACK");
    assert_eq!(state(&direct, 2).await, (vec![0, 0, 0], 0), "rolled back");

    // Named prepared statements, reused across transactions.
    let begin = client.prepare("BEGIN").await.expect("prepare BEGIN");
    let end = client.prepare("END").await.expect("prepare END");
    for (i, tx) in [3, 4].into_iter().enumerate() {
        client.execute(&begin, &[]).await.expect("begin");
        write_everywhere(&client, keys(&direct[0], 2 + i as i64).await, tx).await;
        client.execute(&end, &[]).await.expect("prepared END");
        assert_eq!(state(&direct, tx).await, (vec![1, 1, 1], 0), "tx {tx}");
    }

    // COMMIT of a failed transaction: nothing kept (Postgres answers it
    // with ROLLBACK, no error).
    client.execute("BEGIN", &[]).await.expect("begin");
    let [a, _, _] = keys(&direct[0], 9).await;
    client
        .execute("INSERT INTO items (id, tx) VALUES ($1, 5)", &[&a])
        .await
        .expect("first shard");
    let taken = keys(&direct[0], 0).await[1];
    let error = client
        .execute("INSERT INTO items (id, tx) VALUES ($1, 5)", &[&taken])
        .await
        .expect_err("duplicate key on the second shard");
    assert_eq!(error.code().map(|c| c.code()), Some("23505"));
    client
        .execute("COMMIT", &[])
        .await
        .expect("COMMIT of a failed transaction answers");
    assert_eq!(state(&direct, 5).await, (vec![0, 0, 0], 0));

    // The session goes on normally afterwards.
    let rows = client
        .query("SELECT count(*) FROM items", &[])
        .await
        .expect("fan-out count");
    assert_eq!(rows[0].get::<_, i64>(0), 9);
    server.stop().await;
}
