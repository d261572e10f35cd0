//! The client's unnamed statement in routing mode, over the raw wire:
//! shardgate answers the unnamed Parse itself and re-creates the statement
//! on the backend its Bind routes to; when the Bind comes right behind the
//! Parse it takes its own ParseComplete back and lets the backend's answer
//! (or error) through instead. Whatever path a batch takes, the client must
//! see exactly the messages Postgres sends: every scenario below runs the
//! same bytes against an unsharded oracle database and through shardgate
//! over the shards, and compares the normalised message streams.

mod support;

use support::wire::{self, Msg, Wire};
use support::{connect, fleet, fresh_db, shard_map, start_proxy};

const SCHEMA: &str = "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);";

const MAP: &str = "\
functions:
  by_user: { kind: hash }
tables:
  users: { key: id, function: by_user }
";

const SELECT: &str = "SELECT id, name FROM users WHERE id = $1";

struct Pair {
    direct: Wire,
    proxied: Wire,
}

impl Pair {
    /// Sends `bytes` to both and asserts the same answers through `ready`
    /// ReadyForQuery messages; returns them.
    async fn same(&mut self, what: &str, bytes: &[u8], ready: usize) -> Vec<Msg> {
        let direct = self.direct.exchange(bytes, ready).await;
        let proxied = self.proxied.exchange(bytes, ready).await;
        let d: Vec<String> = direct.iter().map(Msg::normalized).collect();
        let p: Vec<String> = proxied.iter().map(Msg::normalized).collect();
        assert_eq!(p, d, "{what}: shardgate (left) vs Postgres (right)");
        proxied
    }
}

/// An oracle with every row and shardgate over shards holding the same rows.
async fn setup(name: &str) -> (shardgate::server::RunningServer, Pair) {
    let db = support::fresh_db_with(name, SCHEMA).await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let oracle_db = fresh_db(&format!("{name}_oracle"));
    let oracle = connect(&fleet().clusters[0], &oracle_db).await;
    oracle.batch_execute(SCHEMA).await.expect("oracle schema");
    let rows: Vec<String> = (1..=40).map(|i| format!("({i}, 'user {i}')")).collect();
    let insert = format!("INSERT INTO users (id, name) VALUES {}", rows.join(", "));
    oracle.batch_execute(&insert).await.expect("oracle rows");
    let loader = support::connect_proxy(&server, "app", None).await;
    for i in 1..=40 {
        loader
            .batch_execute(&format!(
                "INSERT INTO users (id, name) VALUES ({i}, 'user {i}')"
            ))
            .await
            .expect("rows through shardgate");
    }
    let direct = Wire::connect(fleet().clusters[0].port(), "postgres", &oracle_db).await;
    let proxied = Wire::connect(server.address.port(), "app", &server.shared.config.database).await;
    (server, Pair { direct, proxied })
}

fn batch(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// pgbench `-M extended`: Parse, Bind, Describe portal, Execute, Sync in one
/// write, the same text every time, keys all over the shards.
fn pgbench_txn(id: i64) -> Vec<u8> {
    let id = id.to_string();
    batch(&[
        wire::parse("", SELECT, &[]),
        wire::bind("", "", &[Some(&id)]),
        wire::describe(b'P', ""),
        wire::execute("", 0),
        wire::sync(),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_statements_answer_like_postgres_on_every_path() {
    let (server, mut pair) = setup("routed_unnamed").await;

    // The hot path, over and over on changing shards and backends.
    for id in [1, 2, 3, 17, 17, 40, 5, 1] {
        let got = pair.same("pgbench transaction", &pgbench_txn(id), 1).await;
        let tags: Vec<char> = got.iter().map(|m| m.tag as char).collect();
        assert_eq!(tags, ['1', '2', 'T', 'D', 'C', 'Z'], "{got:?}");
    }

    // The backend rejects the Parse: its error is the first answer, with no
    // ParseComplete before it (Postgres sends none).
    let bad = batch(&[
        wire::parse("", "SELECT no_such_column FROM users WHERE id = $1", &[]),
        wire::bind("", "", &[Some("3")]),
        wire::execute("", 0),
        wire::sync(),
    ]);
    let got = pair.same("failing Parse", &bad, 1).await;
    assert_eq!(got[0].error_code().as_deref(), Some("42703"), "{got:?}");
    // The same text again after the failure, then a good one.
    pair.same("failing Parse again", &bad, 1).await;
    pair.same("good after failed", &pgbench_txn(4), 1).await;

    // Parse and Flush alone: the client waits for the ParseComplete before
    // it sends the Bind (which then re-creates the statement unseen).
    let flushed = batch(&[wire::parse("", SELECT, &[20]), wire::flush()]);
    pair.direct.send(&flushed).await;
    pair.proxied.send(&flushed).await;
    let d = pair.direct.recv().await.expect("direct ParseComplete");
    let p = pair.proxied.recv().await.expect("proxied ParseComplete");
    assert_eq!((p.tag, d.tag), (b'1', b'1'));
    let rest = batch(&[
        wire::bind("", "", &[Some("9")]),
        wire::execute("", 0),
        wire::sync(),
    ]);
    let got = pair.same("Bind after Parse+Flush", &rest, 1).await;
    let tags: Vec<char> = got.iter().map(|m| m.tag as char).collect();
    assert_eq!(tags, ['2', 'D', 'C', 'Z'], "exactly one ParseComplete");

    // Two unnamed statements pipelined in one batch (same shard: keys
    // repeated), the second replacing the first.
    let other = "SELECT name, id FROM users WHERE id = $1";
    let two = batch(&[
        wire::parse("", SELECT, &[]),
        wire::bind("", "", &[Some("6")]),
        wire::execute("", 0),
        wire::parse("", other, &[]),
        wire::bind("", "", &[Some("6")]),
        wire::execute("", 0),
        wire::sync(),
    ]);
    let got = pair
        .same("two unnamed statements in one batch", &two, 1)
        .await;
    let tags: Vec<char> = got.iter().map(|m| m.tag as char).collect();
    assert_eq!(tags, ['1', '2', 'D', 'C', '1', '2', 'D', 'C', 'Z']);

    // Same text, different declared parameter types: the result column
    // type follows the Parse (text vs int4).
    let typed = "SELECT $1 AS v, name FROM users WHERE id = $2";
    for types in [[25, 20], [23, 20], [25, 20]] {
        let b = batch(&[
            wire::parse("", typed, &types),
            wire::bind("", "", &[Some("7"), Some("8")]),
            wire::describe(b'P', ""),
            wire::execute("", 0),
            wire::sync(),
        ]);
        pair.same(&format!("parameter types {types:?}"), &b, 1)
            .await;
    }

    // A simple query replaces the unnamed statement: a Bind of it now fails
    // as in Postgres, and a new Parse of the old text works again.
    pair.same("before the query", &pgbench_txn(10), 1).await;
    pair.same("simple query", &wire::query("SELECT 1"), 1).await;
    let rebind = batch(&[
        wire::bind("", "", &[Some("10")]),
        wire::execute("", 0),
        wire::sync(),
    ]);
    let got = pair.same("Bind after a simple query", &rebind, 1).await;
    assert_eq!(got[0].error_code().as_deref(), Some("26000"), "{got:?}");
    pair.same("Parse again after the query", &pgbench_txn(10), 1)
        .await;

    // Bind the unnamed statement again in a later batch (no new Parse).
    pair.same("parse for rebind", &pgbench_txn(11), 1).await;
    let again = batch(&[
        wire::bind("", "", &[Some("12")]),
        wire::execute("", 0),
        wire::sync(),
    ]);
    pair.same("rebind in a later batch", &again, 1).await;

    // Described statements and closes.
    let described = batch(&[
        wire::parse("", SELECT, &[]),
        wire::describe(b'S', ""),
        wire::sync(),
    ]);
    pair.same("Parse + Describe statement", &described, 1).await;
    pair.same("Bind after describe", &again, 1).await;
    let closed = batch(&[wire::close(b'S', ""), wire::sync()]);
    pair.same("Close of the unnamed statement", &closed, 1)
        .await;
    pair.same("Parse after close", &pgbench_txn(13), 1).await;

    // An extended-protocol transaction: BEGIN held back by shardgate, the
    // statement on its shard, COMMIT.
    let verb = |sql: &str| {
        batch(&[
            wire::parse("", sql, &[]),
            wire::bind("", "", &[]),
            wire::execute("", 0),
            wire::sync(),
        ])
    };
    pair.same("BEGIN", &verb("BEGIN"), 1).await;
    pair.same("statement in the transaction", &pgbench_txn(14), 1)
        .await;
    pair.same("COMMIT", &verb("COMMIT"), 1).await;
    pair.same("after the transaction", &pgbench_txn(15), 1)
        .await;

    server.stop().await;
}

/// Unnamed statements larger than shardgate's re-send buffer (64 KiB) are
/// routed like any other: a bulk INSERT of 3,000 rows (~100 KB of SQL) over
/// the extended protocol lands every row on its own shard (split, atomic),
/// and a large IN list reads from every shard. Before, such a statement went
/// unrouted to one backend: rows on the wrong shard, partial answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_larger_than_64_kib_are_routed_too() {
    let (server, mut pair) = setup("routed_unnamed_large").await;
    let rows: Vec<String> = (1000..4000)
        .map(|i| format!("({i}, 'bulk user {i} with some padding')"))
        .collect();
    let insert = format!("INSERT INTO users (id, name) VALUES {}", rows.join(", "));
    assert!(insert.len() > 64 * 1024, "{} bytes", insert.len());
    let run = |sql: &str| {
        batch(&[
            wire::parse("", sql, &[]),
            wire::bind("", "", &[]),
            wire::execute("", 0),
            wire::sync(),
        ])
    };
    pair.same("bulk INSERT over the shards", &run(&insert), 1)
        .await;
    let ids: Vec<String> = (1000..4000).step_by(2).map(|i| i.to_string()).collect();
    let in_list = format!(
        "SELECT count(*), sum(id) FROM users WHERE id IN ({})",
        ids.join(", ")
    );
    pair.same("large IN list", &run(&in_list), 1).await;
    // Every row is on the shard its key routes to: a routed lookup finds it.
    for id in (1000..4000).step_by(97) {
        let got = pair.same("lookup by key", &pgbench_txn(id), 1).await;
        assert!(
            got.iter().any(|m| m.tag == b'D'),
            "row {id} not on its shard"
        );
    }
    let per_shard = support::rows_per_shard(&server.shared.config.database, "users").await;
    assert!(per_shard.iter().all(|n| *n > 1000), "{per_shard:?}");
    assert_eq!(per_shard.iter().sum::<i64>(), 40 + 3000);
}

/// An empty statement text over the extended protocol (drivers send one
/// for an empty query): EmptyQueryResponse, as from Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_unnamed_statement_answers_like_postgres() {
    let (_server, mut pair) = setup("routed_unnamed_empty").await;
    let empty = batch(&[
        wire::parse("", "", &[]),
        wire::bind("", "", &[]),
        wire::describe(b'P', ""),
        wire::execute("", 0),
        wire::sync(),
    ]);
    pair.same("empty statement", &empty, 1).await;
    pair.same("then a real one", &pgbench_txn(7), 1).await;
}
