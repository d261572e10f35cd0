//! Issue #6: writes to a replicated table go to every shard atomically and
//! report the row count of one shard (tools that check `rowcount == 1`
//! keep working), in the simple and the extended protocol, alone (an
//! implicit two-phase commit) and inside a client transaction with a
//! sharded write.

mod support;

use support::{connect, connect_proxy, fleet, fresh_db, shard_map, start_proxy};
use tokio_postgres::{Client, SimpleQueryMessage};

const SCHEMA: &str = "\
    CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL);\
    CREATE TABLE users (id bigint PRIMARY KEY, country text);";

const MAP: &str = "\
functions:
  by_id: { kind: hash }
tables:
  users: { key: id, function: by_id }
  countries: { replicated: true }
";

async fn direct_clients(db: &str) -> Vec<Client> {
    let mut clients = Vec::new();
    for cluster in &fleet().clusters {
        let client = connect(cluster, db).await;
        client.batch_execute(SCHEMA).await.expect("schema");
        clients.push(client);
    }
    clients
}

/// The countries rows of every shard, as `code=name`.
async fn on_each_shard(clients: &[Client]) -> Vec<Vec<String>> {
    let mut all = Vec::new();
    for client in clients {
        all.push(
            client
                .query(
                    "SELECT code || '=' || name FROM countries ORDER BY code",
                    &[],
                )
                .await
                .expect("countries")
                .iter()
                .map(|r| r.get(0))
                .collect(),
        );
    }
    all
}

fn same_everywhere(all: &[Vec<String>], expected: &[&str], step: &str) {
    for (i, rows) in all.iter().enumerate() {
        assert_eq!(rows, expected, "shard s{i} after {step}");
    }
}

/// The CommandComplete counts of a simple query.
fn counts(messages: &[SimpleQueryMessage]) -> Vec<u64> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect()
}

fn code(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map(|e| e.code().code().to_string())
        .unwrap_or_else(|| format!("not a server error: {error}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_writes_reach_every_shard_and_report_one_shards_count() {
    let db = fresh_db("replicated_counts");
    let direct = direct_clients(&db).await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let client = connect_proxy(&server, "app", None).await;

    // Simple protocol: INSERT 0 1, not INSERT 0 3.
    let done = client
        .simple_query("INSERT INTO countries (code, name) VALUES ('fr', 'France')")
        .await
        .expect("insert");
    assert_eq!(counts(&done), vec![1], "INSERT 0 1");
    same_everywhere(&on_each_shard(&direct).await, &["fr=France"], "insert");

    // Several rows and RETURNING: one shard's rows and count.
    let done = client
        .simple_query(
            "INSERT INTO countries (code, name) VALUES ('de', 'Germany'), ('it', 'Italy') RETURNING code",
        )
        .await
        .expect("insert returning");
    let returned: Vec<String> = done
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(returned, vec!["de", "it"], "RETURNING rows of one shard");
    assert_eq!(counts(&done), vec![2]);

    // Extended protocol (tokio-postgres execute = rows affected).
    let n = client
        .execute(
            "INSERT INTO countries (code, name) VALUES ($1, $2)",
            &[&"es", &"Spain"],
        )
        .await
        .expect("insert (extended)");
    assert_eq!(n, 1, "extended INSERT reports 1");
    let n = client
        .execute(
            "UPDATE countries SET name = $1 WHERE code = $2",
            &[&"Italia", &"it"],
        )
        .await
        .expect("update (extended)");
    assert_eq!(n, 1, "UPDATE 1");
    let done = client
        .simple_query("DELETE FROM countries WHERE code = 'de'")
        .await
        .expect("delete");
    assert_eq!(counts(&done), vec![1], "DELETE 1");
    same_everywhere(
        &on_each_shard(&direct).await,
        &["es=Spain", "fr=France", "it=Italia"],
        "update and delete",
    );
    let prepared = prepared_everywhere(&direct).await;
    assert_eq!(prepared, 0, "implicit two-phase commits all finished");

    // A failure on one shard rolls the statement back on all of them.
    direct[2]
        .batch_execute("INSERT INTO countries VALUES ('pt', 'only on s2')")
        .await
        .expect("divergent row on s2");
    let error = client
        .simple_query(
            "INSERT INTO countries (code, name) VALUES ('nl', 'Netherlands'), ('pt', 'Portugal')",
        )
        .await
        .expect_err("duplicate key on s2");
    assert_eq!(code(&error), "23505", "{error}");
    let all = on_each_shard(&direct).await;
    same_everywhere(
        &all[..2],
        &["es=Spain", "fr=France", "it=Italia"],
        "failed insert",
    );
    assert_eq!(
        all[2],
        vec!["es=Spain", "fr=France", "it=Italia", "pt=only on s2"],
        "s2 after the failed insert"
    );
    direct[2]
        .batch_execute("DELETE FROM countries WHERE code = 'pt'")
        .await
        .expect("cleanup");

    // In a client transaction with a sharded write: atomic with it.
    client.simple_query("BEGIN").await.expect("begin");
    client
        .simple_query("INSERT INTO users (id, country) VALUES (7, 'be')")
        .await
        .expect("sharded write");
    let done = client
        .simple_query("INSERT INTO countries (code, name) VALUES ('be', 'Belgium')")
        .await
        .expect("replicated write in the transaction");
    assert_eq!(counts(&done), vec![1]);
    client.simple_query("ROLLBACK").await.expect("rollback");
    same_everywhere(
        &on_each_shard(&direct).await,
        &["es=Spain", "fr=France", "it=Italia"],
        "rolled-back transaction",
    );
    client.simple_query("BEGIN").await.expect("begin");
    client
        .simple_query("INSERT INTO countries (code, name) VALUES ('be', 'Belgium')")
        .await
        .expect("replicated write first");
    client
        .simple_query("INSERT INTO users (id, country) VALUES (7, 'be')")
        .await
        .expect("sharded write");
    client.simple_query("COMMIT").await.expect("commit");
    same_everywhere(
        &on_each_shard(&direct).await,
        &["be=Belgium", "es=Spain", "fr=France", "it=Italia"],
        "committed transaction",
    );
    let mut users = 0;
    for c in &direct {
        users += c
            .query_one("SELECT count(*) FROM users", &[])
            .await
            .expect("users")
            .get::<_, i64>(0);
    }
    assert_eq!(users, 1, "the sharded row once");
    assert_eq!(prepared_everywhere(&direct).await, 0);

    // Reads of the replicated table come from one shard.
    let rows = client
        .query("SELECT code FROM countries ORDER BY code", &[])
        .await
        .expect("read");
    assert_eq!(rows.len(), 4, "one shard's rows, not three copies");
    server.stop().await;
}

async fn prepared_everywhere(clients: &[Client]) -> i64 {
    let mut total = 0;
    for c in clients {
        total += support::prepared_transactions(c).await;
    }
    total
}

/// A transaction whose first statement needs several shards (a replicated
/// write, a fan-out read): the BEGIN shardgate held back is applied to those
/// shards and must not be replayed later in front of an autocommit
/// statement (which would leave that statement uncommitted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_opened_by_a_multi_shard_statement_leaves_no_stale_begin() {
    let db = fresh_db("replicated_first");
    let direct = direct_clients(&db).await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let client = connect_proxy(&server, "app", None).await;

    for (first, id) in [
        (
            "INSERT INTO countries (code, name) VALUES ('se', 'Sweden')",
            11i64,
        ),
        ("SELECT count(*) FROM users", 12),
    ] {
        client.simple_query("BEGIN").await.expect("begin");
        client.simple_query(first).await.expect(first);
        client.simple_query("COMMIT").await.expect("commit");
        // Autocommit, one shard: committed at once, visible elsewhere.
        client
            .simple_query(&format!(
                "INSERT INTO users (id, country) VALUES ({id}, 'se')"
            ))
            .await
            .expect("autocommit insert");
        let mut seen = 0;
        for c in &direct {
            seen += c
                .query_one("SELECT count(*) FROM users WHERE id = $1", &[&id])
                .await
                .expect("users")
                .get::<_, i64>(0);
        }
        assert_eq!(
            seen, 1,
            "after a transaction opened by {first:?}, an autocommit INSERT is committed"
        );
    }
    same_everywhere(&on_each_shard(&direct).await, &["se=Sweden"], "insert");
    server.stop().await;
}

/// A replicated table whose copies would diverge: a `serial` id, a random
/// UUID default. Created through the proxy (the catalog is re-read after
/// DDL), so shardgate knows the defaults.
const PER_SHARD_MAP: &str = "\
functions:
  by_id: { kind: hash }
tables:
  users: { key: id, function: by_id }
  currencies: { replicated: true }
  tokens: { replicated: true }
  events: { replicated: true }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_each_shard_would_compute_differently_are_refused() {
    let db = fresh_db("replicated_per_shard");
    let server = start_proxy(&shard_map(&db, PER_SHARD_MAP)).await;
    let client = connect_proxy(&server, "app", None).await;
    client
        .batch_execute(
            "CREATE TABLE users (id bigint PRIMARY KEY, name text);\
             CREATE TABLE currencies (id serial PRIMARY KEY, code text UNIQUE NOT NULL);\
             CREATE TABLE tokens (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), owner text);\
             CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY, at timestamptz DEFAULT now(), what text);\
             CREATE SEQUENCE invoice_numbers;",
        )
        .await
        .expect("schema through the proxy");

    // Left to a per-shard default: refused, naming the column; nothing written.
    for (sql, column) in [
        ("INSERT INTO currencies (code) VALUES ('EUR')", "column id"),
        ("INSERT INTO tokens (owner) VALUES ('ann')", "column id"),
        ("INSERT INTO events (what) VALUES ('boot')", "column id"),
        (
            "INSERT INTO currencies VALUES (DEFAULT, 'EUR')",
            "currencies",
        ),
    ] {
        let error = client.simple_query(sql).await.expect_err(sql);
        assert_eq!(code(&error), "0A000", "{sql}: {error}");
        let message = error
            .as_db_error()
            .map(|e| e.message().to_string())
            .unwrap_or_default();
        assert!(message.contains(column), "{sql}: {message}");
    }
    // A random value written explicitly: refused too.
    let error = client
        .simple_query("INSERT INTO tokens (id, owner) VALUES (gen_random_uuid(), 'bob')")
        .await
        .expect_err("explicit random uuid");
    assert_eq!(code(&error), "0A000");

    // Given explicitly, the same rows reach every shard; the time default is allowed.
    client
        .simple_query("INSERT INTO currencies (id, code) VALUES (1, 'EUR'), (2, 'USD')")
        .await
        .expect("explicit ids");
    client
        .simple_query("INSERT INTO events (id, what) OVERRIDING SYSTEM VALUE VALUES (7, 'boot')")
        .await
        .expect("identity given explicitly");
    for cluster in &fleet().clusters {
        let direct = connect(cluster, &db).await;
        let rows: Vec<String> = direct
            .query("SELECT id || ':' || code FROM currencies ORDER BY id", &[])
            .await
            .expect("currencies")
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(rows, ["1:EUR", "2:USD"], "{}", cluster.port());
        let tokens: i64 = direct
            .query_one("SELECT count(*) FROM tokens", &[])
            .await
            .expect("tokens")
            .get(0);
        assert_eq!(tokens, 0, "no refused row reached shard {}", cluster.port());
    }

    // A standalone sequence exists on every shard; nextval runs on one
    // fixed shard, so its values are unique as on one Postgres.
    let mut values = Vec::new();
    for _ in 0..6 {
        let fresh = connect_proxy(&server, "app", None).await;
        let row = fresh
            .query_one("SELECT nextval('invoice_numbers')", &[])
            .await
            .expect("nextval");
        values.push(row.get::<_, i64>(0));
    }
    assert_eq!(values, [1, 2, 3, 4, 5, 6]);
    // In a statement on a sharded table it would use that shard's sequence.
    let error = client
        .simple_query("INSERT INTO users (id, name) VALUES (5, nextval('invoice_numbers')::text)")
        .await
        .expect_err("nextval in a sharded write");
    assert_eq!(code(&error), "0A000");
    server.stop().await;
}

/// A replicated table created directly on the shards after the proxy
/// started (as `shardgate migrate` does) is learned by the periodic
/// catalog read, and its per-shard default is then enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_created_on_the_shards_are_learned_periodically() {
    let db = fresh_db("replicated_periodic_catalog");
    let map = format!("{PER_SHARD_MAP}catalog_refresh: 200ms\n");
    let server = start_proxy(&shard_map(&db, &map)).await;
    for cluster in &fleet().clusters {
        connect(cluster, &db)
            .await
            .batch_execute("CREATE TABLE currencies (id serial PRIMARY KEY, code text NOT NULL)")
            .await
            .expect("table on the shard");
    }
    let client = connect_proxy(&server, "app", None).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        // A write the shards would reject anyway (NOT NULL), so probing
        // before the catalog is learned stores nothing.
        match client
            .simple_query("INSERT INTO currencies (code) VALUES (NULL)")
            .await
        {
            Err(error) if code(&error) == "0A000" => break,
            Err(error) => assert_eq!(code(&error), "23502", "{error}"),
            Ok(_) => panic!("a NULL code was stored"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the table's serial default was not learned within 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    server.stop().await;
}
