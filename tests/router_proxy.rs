//! The router inside the proxy, against real shards: rows land on the shard
//! their function names (checked with Postgres' own hash partitioning), key
//! lookups equal an unsharded oracle database, transactions start on the
//! shard of their first statement, and what cannot be routed is refused.

mod support;

use std::collections::BTreeSet;

use futures::future::join_all;
use support::{
    connect, connect_proxy, fleet, fresh_db, keys_on_three_shards, shard_map, start_proxy,
};
use tokio_postgres::{Client, SimpleQueryMessage};

const SCHEMA: &str = "\
    CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, score int);\
    CREATE TABLE orders (id bigint PRIMARY KEY, user_id bigint NOT NULL, amount numeric(12,2), note text);\
    CREATE TABLE countries (code text PRIMARY KEY, name text);";

const MAP: &str = "\
functions:
  by_user: { kind: hash }
tables:
  users: { key: id, function: by_user }
  orders: { key: user_id, function: by_user }
  countries: { replicated: true }
";

/// The schema on every shard (created directly).
async fn sharded_db(name: &str) -> String {
    support::fresh_db_with(name, SCHEMA).await
}

/// The unsharded oracle: the same schema in one database on cluster 0.
async fn oracle(name: &str) -> Client {
    let db = fresh_db(name);
    let client = connect(&fleet().clusters[0], &db).await;
    client.batch_execute(SCHEMA).await.expect("oracle schema");
    client
}

fn rows_text(messages: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_users_and_fifty_thousand_orders_land_on_their_shards() {
    let db = sharded_db("placement").await;
    let oracle = oracle("placement_oracle").await;
    let server = start_proxy(&shard_map(&db, MAP)).await;

    // Users: literal SQL (psql style), 8 clients in parallel.
    let mut writers = Vec::new();
    for w in 0..8i64 {
        let client = connect_proxy(&server, "app", None).await;
        writers.push(tokio::spawn(async move {
            for id in (w * 1250 + 1)..=(w * 1250 + 1250) {
                let score = if id % 7 == 0 {
                    "NULL".to_string()
                } else {
                    ((id * 37) % 1000 - 500).to_string()
                };
                client
                    .simple_query(&format!(
                        "INSERT INTO users (id, name, score) VALUES ({id}, 'user {id}', {score})"
                    ))
                    .await
                    .unwrap_or_else(|e| panic!("insert user {id}: {e}"));
            }
        }));
    }
    // Orders: bound parameters (extended protocol, binary), pipelined on
    // each connection so consecutive statements go to different shards.
    for w in 0..4i64 {
        let client = connect_proxy(&server, "app", None).await;
        writers.push(tokio::spawn(async move {
            let insert = client
                .prepare("INSERT INTO orders (id, user_id, amount, note) VALUES ($1, $2, ($3::text)::numeric, $4)")
                .await
                .expect("prepare insert");
            for chunk in ((w * 12_500 + 1)..=(w * 12_500 + 12_500))
                .collect::<Vec<i64>>()
                .chunks(50)
            {
                let batch = chunk.iter().map(|id| {
                    let user = (id * 7919) % 10_000 + 1;
                    let amount = format!("{}.{:02}", id % 500, id % 100);
                    let note = (id % 3 != 0).then(|| format!("order {id}"));
                    let client = &client;
                    let insert = &insert;
                    async move {
                        client
                            .execute(insert, &[id, &user, &amount, &note])
                            .await
                            .unwrap_or_else(|e| panic!("insert order {id}: {e}"))
                    }
                });
                let counts = join_all(batch).await;
                assert!(counts.iter().all(|n| *n == 1));
            }
        }));
    }
    for writer in writers {
        writer.await.expect("writer task");
    }
    // The oracle gets the same rows directly.
    oracle
        .batch_execute(
            "INSERT INTO users SELECT id, 'user ' || id, CASE WHEN id % 7 = 0 THEN NULL ELSE (id * 37) % 1000 - 500 END FROM generate_series(1, 10000) id;\
             INSERT INTO orders SELECT id, (id * 7919) % 10000 + 1, ((id % 500) || '.' || lpad((id % 100)::text, 2, '0'))::numeric, CASE WHEN id % 3 <> 0 THEN 'order ' || id END FROM generate_series(1, 50000) id;\
             CREATE TABLE hp (id bigint) PARTITION BY HASH (id);",
        )
        .await
        .expect("oracle rows");

    // Every row is on exactly the shard Postgres' own hash partitioning
    // (modulus 3) assigns its key to.
    let mut users_seen = 0;
    let mut orders_seen = 0;
    for (shard, cluster) in fleet().clusters.iter().enumerate() {
        let direct = connect(cluster, &db).await;
        let ids: Vec<i64> = direct
            .query("SELECT id FROM users", &[])
            .await
            .expect("users on shard")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let user_keys: Vec<i64> = direct
            .query("SELECT user_id FROM orders", &[])
            .await
            .expect("orders on shard")
            .iter()
            .map(|r| r.get(0))
            .collect();
        users_seen += ids.len();
        orders_seen += user_keys.len();
        for (what, keys) in [("users", &ids), ("orders", &user_keys)] {
            let misplaced: i64 = oracle
                .query_one(
                    "SELECT count(*) FROM unnest($1::bigint[]) k \
                     WHERE NOT satisfies_hash_partition('hp'::regclass, 3, $2, k)",
                    &[keys, &(shard as i32)],
                )
                .await
                .expect("placement check")
                .get(0);
            assert_eq!(
                misplaced, 0,
                "{what} rows on shard s{shard} that belong elsewhere"
            );
        }
        assert!(!ids.is_empty(), "shard s{shard} got no users");
    }
    assert_eq!(users_seen, 10_000, "every user exactly once");
    assert_eq!(orders_seen, 50_000, "every order exactly once");

    // Key lookups equal the oracle, in text (simple) and binary (extended).
    let client = connect_proxy(&server, "app", None).await;
    let lookups = [1i64, 2, 3, 77, 700, 4096, 9999, 10_000, 10_001, -5];
    for id in lookups {
        let sql = format!("SELECT id, name, score FROM users WHERE id = {id}");
        let through = rows_text(&client.simple_query(&sql).await.expect("lookup"));
        let direct = rows_text(&oracle.simple_query(&sql).await.expect("oracle lookup"));
        assert_eq!(through, direct, "{sql}");
        let sql = "SELECT id, amount::text, note FROM orders WHERE user_id = $1 ORDER BY id";
        let through: Vec<(i64, String, Option<String>)> = client
            .query(sql, &[&id])
            .await
            .expect("orders by user")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let direct: Vec<(i64, String, Option<String>)> = oracle
            .query(sql, &[&id])
            .await
            .expect("oracle orders by user")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(through, direct, "orders of user {id}");
    }
    // Quoted literals work once the key type is known from the catalog;
    // co-located joins run on the key's shard.
    let sql = "SELECT u.id, count(o.id) FROM users u JOIN orders o ON o.user_id = u.id \
               WHERE u.id = '4242' GROUP BY u.id";
    assert_eq!(
        rows_text(&client.simple_query(sql).await.expect("join")),
        rows_text(&oracle.simple_query(sql).await.expect("oracle join")),
    );
    server.stop().await;
}

/// Users with these ids, inserted through the proxy with bound parameters.
async fn insert_users(client: &Client, ids: std::ops::RangeInclusive<i64>) {
    for id in ids {
        client
            .execute("INSERT INTO users (id, name) VALUES ($1, 'n')", &[&id])
            .await
            .unwrap_or_else(|e| panic!("insert user {id}: {e}"));
    }
}

fn code(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map(|e| e.code().code().to_string())
        .unwrap_or_else(|| format!("not a server error: {error}"))
}

/// The shard (0-based) that holds user `id`, found by asking each shard.
async fn shard_holding(db: &str, id: i64) -> Option<usize> {
    for (i, cluster) in fleet().clusters.iter().enumerate() {
        let n: i64 = connect(cluster, db)
            .await
            .query_one("SELECT count(*) FROM users WHERE id = $1", &[&id])
            .await
            .expect("count")
            .get(0);
        if n > 0 {
            return Some(i);
        }
    }
    None
}

#[tokio::test]
async fn transactions_begin_on_the_shard_of_their_first_statement() {
    let db = sharded_db("transactions").await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let client = connect_proxy(&server, "app", None).await;

    // Committed: the row is on its shard.
    client
        .batch_execute("BEGIN; INSERT INTO users (id, name) VALUES (1, 'a'); UPDATE users SET score = 5 WHERE id = 1; COMMIT")
        .await
        .expect("batch in one transaction");
    client.simple_query("BEGIN").await.expect("begin");
    client
        .simple_query("INSERT INTO users (id, name) VALUES (2, 'b')")
        .await
        .expect("insert in transaction");
    let seen = client
        .query_one("SELECT name FROM users WHERE id = 2", &[])
        .await
        .expect("read own write");
    assert_eq!(seen.get::<_, String>(0), "b");
    client.simple_query("COMMIT").await.expect("commit");
    assert!(shard_holding(&db, 2).await.is_some());

    // Rolled back: nowhere.
    client.simple_query("BEGIN").await.expect("begin");
    client
        .simple_query("INSERT INTO users (id, name) VALUES (3, 'c')")
        .await
        .expect("insert");
    client.simple_query("ROLLBACK").await.expect("rollback");
    assert_eq!(shard_holding(&db, 3).await, None);

    // BEGIN … COMMIT with no statement in between never needs a shard.
    client
        .batch_execute("BEGIN; COMMIT")
        .await
        .expect("empty transaction");
    client
        .batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
        .await
        .expect("begin serializable");
    let level: String = client
        .query_one(
            "SELECT current_setting('transaction_isolation') FROM users WHERE id = 1",
            &[],
        )
        .await
        .expect("isolation inside the routed transaction")
        .get(0);
    assert_eq!(
        level, "serializable",
        "the held-back BEGIN reached the shard with its options"
    );
    client.simple_query("COMMIT").await.expect("commit");

    // The session is usable afterwards.
    let n: i64 = client
        .query_one("SELECT count(*) FROM users WHERE id = 1", &[])
        .await
        .expect("after the failed transaction")
        .get(0);
    assert_eq!(n, 1);
    server.stop().await;
}

#[tokio::test]
async fn what_cannot_be_routed_is_refused_with_its_sqlstate() {
    let db = sharded_db("refusals").await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let client = connect_proxy(&server, "app", None).await;
    let cases = [
        ("SELECT * FROM nowhere", "42P01"),
        (
            "SELECT * FROM users u JOIN orders o ON o.id = u.id WHERE u.id = 1",
            "0A000",
        ),
        ("UPDATE users SET id = id + 1 WHERE id = 1", "0A000"),
        ("INSERT INTO users (name) VALUES ('no key')", "0A000"),
        ("SELECT * FROM users WHERE id = 'not a number'", "22P02"),
    ];
    for (sql, expected) in cases {
        let error = client.simple_query(sql).await.expect_err(sql);
        assert_eq!(code(&error), expected, "{sql}: {error}");
        // Extended protocol: the same refusal at Bind.
        let error = client.query(sql, &[]).await.expect_err(sql);
        assert_eq!(code(&error), expected, "{sql} (extended): {error}");
    }
    // Still usable after every refusal.
    client
        .simple_query("INSERT INTO users VALUES (1, 'one', 1)")
        .await
        .expect("INSERT without a column list uses the catalog's column order");
    assert!(shard_holding(&db, 1).await.is_some());
    server.stop().await;
}

#[tokio::test]
async fn tables_created_after_startup_are_learned_from_the_catalog() {
    let db = fresh_db("late_tables");
    let map = "functions:\n  by_id: { kind: hash }\ntables:\n  late: { key: k, function: by_id }\n";
    let server = start_proxy(&shard_map(&db, map)).await;
    // Created directly on the shards after the proxy read the catalog.
    for cluster in &fleet().clusters {
        connect(cluster, &db)
            .await
            .batch_execute("CREATE TABLE late (k text PRIMARY KEY, v int)")
            .await
            .expect("create on shard");
    }
    let client = connect_proxy(&server, "app", None).await;
    // A text key compared with a quoted literal needs the column type, and
    // an INSERT without columns needs the column order: both are learned.
    let mut placed = BTreeSet::new();
    for k in ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"] {
        client
            .simple_query(&format!("INSERT INTO late VALUES ('{k}', 1)"))
            .await
            .unwrap_or_else(|e| panic!("insert {k}: {e}"));
        let found = client
            .simple_query(&format!("SELECT v FROM late WHERE k = '{k}'"))
            .await
            .expect("lookup");
        assert_eq!(rows_text(&found), vec![vec![Some("1".to_string())]], "{k}");
        for (i, cluster) in fleet().clusters.iter().enumerate() {
            let n: i64 = connect(cluster, &db)
                .await
                .query_one("SELECT count(*) FROM late WHERE k = $1", &[&k])
                .await
                .expect("count")
                .get(0);
            if n == 1 {
                placed.insert(i);
                let expected = shardgate::sharding::ShardingFunction::hash(3)
                    .and_then(|f| {
                        f.shard_for_as(
                            &shardgate::sharding::KeyValue::Text(k.to_string()),
                            shardgate::sharding::KeyType::Text,
                        )
                    })
                    .expect("hash");
                assert_eq!(i, expected, "{k} placed by the text hash");
            }
        }
    }
    assert!(placed.len() > 1, "keys spread over shards: {placed:?}");
    server.stop().await;
}

#[tokio::test]
async fn session_routing_settings_pick_the_shard() {
    let db = sharded_db("settings").await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let client = connect_proxy(&server, "app", None).await;
    insert_users(&client, 1..=30).await;
    let holder = shard_holding(&db, 17).await.expect("17 placed");
    let local_count: i64 = connect(&fleet().clusters[holder], &db)
        .await
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("count")
        .get(0);
    // A keyless query would fan out; with a session key it runs on that key's shard.
    client
        .simple_query("SET shardgate.sharding_key = '17'")
        .await
        .expect("set key");
    let n: i64 = client
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("count on the key's shard")
        .get(0);
    assert_eq!(n, local_count);
    client
        .simple_query("RESET shardgate.sharding_key")
        .await
        .expect("reset");
    // A hint comment names the shard outright.
    let hinted: i64 = client
        .query_one(
            &format!("/* shardgate: shard=s{holder} */ SELECT count(*) FROM users"),
            &[],
        )
        .await
        .expect("hinted")
        .get(0);
    assert_eq!(hinted, local_count);
    server.stop().await;
}

fn shard_of(id: i64) -> usize {
    support::hash3_shard_of(id)
}

async fn no_prepared_xacts_left(db: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let left = prepared_xacts(db).await;
        if left == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{left} prepared transactions still left after 15 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn prepared_xacts(db: &str) -> i64 {
    let mut n = 0;
    for cluster in &fleet().clusters {
        n += connect(cluster, db)
            .await
            .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
            .await
            .expect("pg_prepared_xacts")
            .get::<_, i64>(0);
    }
    n
}

#[tokio::test]
async fn multi_shard_transactions_commit_atomically() {
    let db = sharded_db("multi_shard_tx").await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let client = connect_proxy(&server, "app", None).await;
    let [a, b, c] = keys_on_three_shards();

    // Writes on three shards in one transaction: all committed (2PC).
    client.simple_query("BEGIN").await.expect("begin");
    for k in [a, b, c] {
        client
            .simple_query(&format!("INSERT INTO users (id, name) VALUES ({k}, 'tx')"))
            .await
            .unwrap_or_else(|e| panic!("insert {k}: {e}"));
    }
    // Reads inside see the transaction's own writes on each shard.
    for k in [a, b, c] {
        let rows = client
            .query("SELECT name FROM users WHERE id = $1", &[&k])
            .await
            .expect("read own write");
        assert_eq!(rows.len(), 1, "key {k} visible inside the transaction");
    }
    let done = client.simple_query("COMMIT").await.expect("commit");
    assert!(matches!(
        done.first(),
        Some(SimpleQueryMessage::CommandComplete(_))
    ));
    for k in [a, b, c] {
        assert_eq!(
            shard_holding(&db, k).await,
            Some(shard_of(k)),
            "key {k} committed"
        );
    }
    assert_eq!(prepared_xacts(&db).await, 0, "no prepared transaction left");

    // Rolled back on every shard.
    client.simple_query("BEGIN").await.expect("begin");
    for k in [a + 1000, b + 1000, c + 1000] {
        client
            .execute("INSERT INTO users (id, name) VALUES ($1, 'rb')", &[&k])
            .await
            .expect("insert (extended)");
    }
    client.simple_query("ROLLBACK").await.expect("rollback");
    for k in [a + 1000, b + 1000, c + 1000] {
        assert_eq!(shard_holding(&db, k).await, None, "key {k} rolled back");
    }

    // A failure on one shard aborts the whole transaction: COMMIT answers
    // ROLLBACK and the other shards keep nothing.
    client.simple_query("BEGIN").await.expect("begin");
    client
        .simple_query(&format!(
            "INSERT INTO users (id, name) VALUES ({}, 'lost')",
            a + 2000
        ))
        .await
        .expect("insert on the first shard");
    let duplicate = client
        .simple_query(&format!("INSERT INTO users (id, name) VALUES ({b}, 'dup')"))
        .await
        .expect_err("duplicate key on the second shard");
    assert_eq!(code(&duplicate), "23505");
    let after = client
        .simple_query(&format!("SELECT 1 FROM users WHERE id = {c}"))
        .await
        .expect_err("the transaction is aborted");
    assert_eq!(code(&after), "25P02", "{after}");
    let end = client.simple_query("COMMIT").await.expect("commit answers");
    let tag = end.iter().find_map(|m| match m {
        SimpleQueryMessage::CommandComplete(_) => Some(()),
        _ => None,
    });
    assert!(tag.is_some());
    assert_eq!(
        shard_holding(&db, a + 2000).await,
        None,
        "nothing of the failed transaction"
    );

    // Savepoints span the shards of the transaction; the whole of it
    // still rolls back.
    client.simple_query("BEGIN").await.expect("begin");
    client
        .simple_query(&format!("UPDATE users SET score = 1 WHERE id = {a}"))
        .await
        .expect("first shard");
    client
        .simple_query(&format!("UPDATE users SET score = 1 WHERE id = {b}"))
        .await
        .expect("second shard");
    client
        .simple_query("SAVEPOINT s1")
        .await
        .expect("savepoint in a multi-shard transaction");
    client
        .simple_query(&format!("UPDATE users SET score = 2 WHERE id = {a}"))
        .await
        .expect("after the savepoint");
    client
        .simple_query("ROLLBACK TO SAVEPOINT s1")
        .await
        .expect("rollback to the savepoint on every shard");
    client.simple_query("ROLLBACK").await.expect("rollback");
    let score: Option<i32> = connect(&fleet().clusters[shard_of(a)], &db)
        .await
        .query_one("SELECT score FROM users WHERE id = $1", &[&a])
        .await
        .expect("score")
        .get(0);
    assert_eq!(score, None, "the rolled-back update left no trace");
    assert_eq!(prepared_xacts(&db).await, 0);
    server.stop().await;
}

#[tokio::test]
async fn without_two_phase_commit_a_second_written_shard_is_refused() {
    let db = sharded_db("no_2pc").await;
    let map = format!("{MAP}two_phase_commit: false\n");
    let server = start_proxy(&shard_map(&db, &map)).await;
    let client = connect_proxy(&server, "app", None).await;
    let [a, b, _] = keys_on_three_shards();
    client.simple_query("BEGIN").await.expect("begin");
    client
        .simple_query(&format!("INSERT INTO users (id, name) VALUES ({a}, 'x')"))
        .await
        .expect("first shard");
    // Reading another shard is fine.
    client
        .simple_query(&format!("SELECT * FROM users WHERE id = {b}"))
        .await
        .expect("a read on a second shard");
    let error = client
        .simple_query(&format!("INSERT INTO users (id, name) VALUES ({b}, 'y')"))
        .await
        .expect_err("a write on a second shard");
    assert_eq!(code(&error), "0A000", "{error:?}");
    let message = error.as_db_error().map(|e| e.message().to_string());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("two_phase_commit")),
        "{message:?}"
    );
    let next = client
        .simple_query(&format!("SELECT 1 FROM users WHERE id = {a}"))
        .await
        .expect_err("aborted");
    assert_eq!(code(&next), "25P02");
    client
        .simple_query("COMMIT")
        .await
        .expect("commit answers ROLLBACK");
    assert_eq!(
        shard_holding(&db, a).await,
        None,
        "the aborted insert is gone"
    );
    server.stop().await;
}

/// Rows of a simple query as sorted text (a multiset comparison).
fn sorted(messages: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    let mut rows = rows_text(messages);
    rows.sort();
    rows
}

fn command_tags(messages: &[SimpleQueryMessage]) -> Vec<u64> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn statements_on_several_shards_are_atomic_and_complete() {
    let db = sharded_db("fanout_session").await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let client = connect_proxy(&server, "app", None).await;
    let [a, b, c] = keys_on_three_shards();

    // A multi-row INSERT over three shards: one statement, one tag,
    // RETURNING rows in VALUES order.
    let inserted = client
        .simple_query(&format!(
            "INSERT INTO users (id, name) VALUES ({c}, 'c'), ({a}, 'a'), ({b}, 'b') RETURNING id"
        ))
        .await
        .expect("split insert");
    assert_eq!(
        rows_text(&inserted),
        vec![
            vec![Some(c.to_string())],
            vec![Some(a.to_string())],
            vec![Some(b.to_string())]
        ]
    );
    assert_eq!(command_tags(&inserted), vec![3]);
    for k in [a, b, c] {
        assert_eq!(shard_holding(&db, k).await, Some(shard_of(k)));
    }
    // The same with bound parameters (extended protocol, Bind decides).
    let n = client
        .execute(
            "INSERT INTO users (id, name) VALUES ($1, 'p'), ($2, 'q')",
            &[&(a + 3000), &(b + 3000)],
        )
        .await
        .expect("split insert with parameters");
    assert_eq!(n, 2);
    assert_eq!(shard_holding(&db, a + 3000).await, Some(shard_of(a + 3000)));

    // Atomic: a duplicate on one shard leaves nothing on the others.
    let error = client
        .simple_query(&format!(
            "INSERT INTO users (id, name) VALUES ({}, 'new'), ({b}, 'duplicate')",
            a + 5000
        ))
        .await
        .expect_err("duplicate key on one shard");
    assert_eq!(code(&error), "23505", "{error:?}");
    assert_eq!(
        shard_holding(&db, a + 5000).await,
        None,
        "nothing committed anywhere"
    );
    assert_eq!(prepared_xacts(&db).await, 0);

    // Keyless UPDATE: the tag counts every shard's rows; a keyless SELECT
    // sees every row.
    let updated = client
        .simple_query("UPDATE users SET score = 7")
        .await
        .expect("keyless update");
    assert_eq!(command_tags(&updated), vec![5]);
    let all = client
        .simple_query("SELECT id, score FROM users")
        .await
        .expect("keyless select");
    assert_eq!(rows_text(&all).len(), 5);
    assert!(sorted(&all).iter().all(|r| r[1].as_deref() == Some("7")));
    let counted: i64 = client
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("count(*) over shards (extended)")
        .get(0);
    assert_eq!(counted, 5);

    // DDL reaches every shard; in a transaction block it is atomic.
    client
        .simple_query("CREATE TABLE audit (id bigint, what text)")
        .await
        .expect("broadcast DDL");
    client
        .simple_query("CREATE INDEX CONCURRENTLY audit_id ON audit (id)")
        .await
        .expect("non-transactional DDL on every shard");
    for cluster in &fleet().clusters {
        let direct = connect(cluster, &db).await;
        let found: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_indexes WHERE indexname = 'audit_id'",
                &[],
            )
            .await
            .expect("index")
            .get(0);
        assert_eq!(found, 1, "index on every shard");
    }
    client.simple_query("BEGIN").await.expect("begin");
    client
        .simple_query("CREATE TABLE later (id int)")
        .await
        .expect("DDL in a transaction");
    let error = client
        .simple_query("CREATE TABLE audit (id int)")
        .await
        .expect_err("already exists");
    assert_eq!(code(&error), "42P07");
    client
        .simple_query("COMMIT")
        .await
        .expect("commit answers ROLLBACK");
    for cluster in &fleet().clusters {
        let exists: bool = connect(cluster, &db)
            .await
            .query_one("SELECT to_regclass('later') IS NOT NULL", &[])
            .await
            .expect("regclass")
            .get(0);
        assert!(!exists, "the rolled-back CREATE TABLE left nothing");
    }
    assert_eq!(prepared_xacts(&db).await, 0);
    server.stop().await;
}

#[tokio::test]
async fn schema_per_tenant_sessions_and_explain_shards() {
    let db = fresh_db("tenants");
    let map = "\
functions:
  by_tenant:
    kind: tenant
    mode: schema
    schema_template: \"tenant_{tenant}\"
    tenants: { acme: s1, globex: s2 }
    default: s0
tables:
  plans: { replicated: true }
";
    // Each tenant's schema on its shard (and a decoy of the same name
    // elsewhere, which must stay empty).
    for (i, cluster) in fleet().clusters.iter().enumerate() {
        let direct = connect(cluster, &db).await;
        direct
            .batch_execute(
                "CREATE SCHEMA tenant_acme; CREATE TABLE tenant_acme.items (id int, what text);\
                 CREATE SCHEMA tenant_globex; CREATE TABLE tenant_globex.items (id int, what text);\
                 CREATE SCHEMA tenant_newco; CREATE TABLE tenant_newco.items (id int, what text);\
                 CREATE TABLE plans (id int primary key);",
            )
            .await
            .unwrap_or_else(|e| panic!("tenant schemas on s{i}: {e}"));
    }
    let server = start_proxy(&shard_map(&db, map)).await;
    let client = connect_proxy(&server, "app", None).await;
    for (tenant, expected_shard) in [("acme", 1usize), ("globex", 2), ("newco", 0)] {
        client
            .simple_query(&format!("SET shardgate.tenant = '{tenant}'"))
            .await
            .expect("set tenant");
        // Several transactions: the backend may change; search_path follows.
        for i in 0..3 {
            client
                .execute("INSERT INTO items VALUES ($1, $2)", &[&i, &tenant])
                .await
                .unwrap_or_else(|e| panic!("insert for {tenant}: {e}"));
        }
        let n: i64 = client
            .query_one("SELECT count(*) FROM items", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(n, 3, "{tenant} sees its own rows");
        for (i, cluster) in fleet().clusters.iter().enumerate() {
            let n: i64 = connect(cluster, &db)
                .await
                .query_one(&format!("SELECT count(*) FROM tenant_{tenant}.items"), &[])
                .await
                .expect("direct count")
                .get(0);
            let expected = if i == expected_shard { 3 } else { 0 };
            assert_eq!(n, expected, "tenant {tenant} rows on s{i}");
        }
    }
    // Inside a transaction block the tenant cannot change.
    client.simple_query("BEGIN").await.expect("begin");
    let error = client
        .simple_query("SET shardgate.tenant = 'acme'")
        .await
        .expect_err("tenant change inside a transaction");
    assert_eq!(code(&error), "25001");
    client.simple_query("ROLLBACK").await.expect("rollback");
    client
        .simple_query("RESET shardgate.tenant")
        .await
        .expect("reset tenant");
    let path: String = client
        .query_one("SHOW search_path", &[])
        .await
        .expect("search_path after reset")
        .get(0);
    assert_eq!(path, "\"$user\", public");

    // EXPLAIN (SHARDS) answers with the routing decision.
    let plan = client
        .simple_query("EXPLAIN (SHARDS) SELECT * FROM plans")
        .await
        .expect("explain shards");
    let text: Vec<String> = rows_text(&plan)
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect();
    assert!(
        text.iter()
            .any(|l| l.contains("any-one") || l.contains("one shard")),
        "{text:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_cancel_request_stops_a_fan_out_on_every_shard() {
    let db = sharded_db("fanout_cancel").await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let client = connect_proxy(&server, "app", None).await;
    insert_users(&client, 1..=30).await;
    let canceller = support::cancel_after(&client, std::time::Duration::from_millis(500));
    let started = std::time::Instant::now();
    // Keyless: runs on all three shards, each sleeping 0.5 s per row.
    let error = client
        .simple_query("SELECT count(*) FROM users WHERE pg_sleep(0.5) IS NOT NULL")
        .await
        .expect_err("cancelled");
    canceller.await.expect("canceller");
    assert_eq!(code(&error), "57014", "{error:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "cancelled promptly, not after every shard finished: {:?}",
        started.elapsed()
    );
    // No shard is still running it.
    assert_eq!(
        support::active_queries_like(&db, "pg_sleep(0.5)").await,
        0,
        "no shard still running it"
    );
    let n: i64 = client
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("session usable after the cancel")
        .get(0);
    assert_eq!(n, 30);
    server.stop().await;
}

/// A client that vanishes (killed: no Terminate, no cancel) during a
/// fan-out: the shards stop within a second, as Postgres would stop a
/// single backend once it noticed (#15-4: they used to run to the end).
#[tokio::test]
async fn a_vanished_client_stops_its_fan_out_on_every_shard() {
    use support::wire;
    let db = sharded_db("fanout_vanished").await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let client = connect_proxy(&server, "app", None).await;
    insert_users(&client, 1..=30).await;
    for in_transaction in [false, true] {
        let mut raw =
            wire::Wire::connect(server.address.port(), "app", &server.shared.config.database).await;
        if in_transaction {
            raw.send(&wire::query("BEGIN")).await;
            raw.until_ready(1).await;
        }
        // Keyless: all three shards, 0.51 s per row, about 5 s each.
        raw.send(&wire::query(
            "SELECT count(*) FROM users WHERE pg_sleep(0.51) IS NOT NULL",
        ))
        .await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while support::active_queries_like(&db, "pg_sleep(0.51)").await < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "the fan-out started on every shard"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        drop(raw);
        let gone = std::time::Instant::now();
        while support::active_queries_like(&db, "pg_sleep(0.51)").await > 0 {
            assert!(
                gone.elapsed() < std::time::Duration::from_secs(1),
                "every shard stopped within 1 s of the client vanishing \
                 (in a transaction: {in_transaction})"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        eprintln!(
            "in a transaction: {in_transaction}: shards stopped {:?} after the client vanished",
            gone.elapsed()
        );
    }
    // The proxy serves on.
    let n: i64 = client
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("other clients unaffected")
        .get(0);
    assert_eq!(n, 30);
    server.stop().await;
}

/// Runs one extended-protocol batch (Parse, then Bind/Execute per row, one
/// Sync) through a raw client and returns the message tags it got back.
async fn one_batch(
    server: &shardgate::server::RunningServer,
    db: &str,
    rows: &[(i64, &str)],
) -> Vec<support::wire::Msg> {
    use support::wire;
    let mut client =
        wire::Wire::connect(server.address.port(), "app", &server.shared.config.database).await;
    let _ = db;
    let mut batch = wire::parse(
        "",
        "INSERT INTO users (id, name) VALUES ($1, $2)",
        &[20, 25],
    );
    for (id, name) in rows {
        let id = id.to_string();
        batch.extend(wire::bind("", "", &[Some(&id), Some(name)]));
        batch.extend(wire::execute("", 0));
    }
    batch.extend(wire::sync());
    client.send(&batch).await;
    client.until_ready(1).await
}

#[tokio::test]
async fn one_extended_batch_over_several_shards_commits_together() {
    let db = sharded_db("batch_over_shards").await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let [a, b, c] = keys_on_three_shards();
    // asyncpg's executemany and JDBC batches: Bind/Execute per row, one Sync.
    let answers = one_batch(
        &server,
        &db,
        &[(a, "a"), (b, "b"), (c, "c"), (a + 3000, "a2")],
    )
    .await;
    let tags: Vec<char> = answers.iter().map(|m| m.tag as char).collect();
    assert_eq!(
        tags,
        vec!['1', '2', 'C', '2', 'C', '2', 'C', '2', 'C', 'Z'],
        "{answers:?}"
    );
    assert_eq!(answers.last().map(|m| m.body.clone()), Some(vec![b'I']));
    for k in [a, b, c, a + 3000] {
        assert_eq!(shard_holding(&db, k).await, Some(shard_of(k)), "key {k}");
    }
    assert_eq!(prepared_xacts(&db).await, 0);

    // One failing row fails the whole batch, on every shard.
    let answers = one_batch(
        &server,
        &db,
        &[
            (a + 6000, "x"),
            (b + 6000, "y"),
            (c, "duplicate"),
            (a + 9000, "z"),
        ],
    )
    .await;
    let error = answers
        .iter()
        .find_map(|m| m.error_code())
        .expect("the duplicate fails");
    assert_eq!(error, "23505");
    assert_eq!(answers.last().map(|m| m.tag), Some(b'Z'));
    for k in [a + 6000, b + 6000, a + 9000] {
        assert_eq!(
            shard_holding(&db, k).await,
            None,
            "key {k} rolled back with the batch"
        );
    }
    // A part whose COMMIT/ROLLBACK PREPARED step timed out under load is
    // resolved in the background within moments: none may stay.
    no_prepared_xacts_left(&db).await;
    // The connection pool is clean afterwards: a normal statement works.
    let client = connect_proxy(&server, "app", None).await;
    let n: i64 = client
        .query_one("SELECT count(*) FROM users WHERE id = $1", &[&a])
        .await
        .expect("after the batches")
        .get(0);
    assert_eq!(n, 1);
    server.stop().await;
}
