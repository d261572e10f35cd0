//! One extended-protocol batch (no Sync between statements) for several
//! shards inside an explicit transaction: JDBC batches with autocommit off
//! (Hibernate batch inserts) and asyncpg's `executemany` in a transaction
//! send Bind/Execute per row and one Sync. Each exchange runs against one
//! Postgres holding every row (the oracle) and through shardgate over 3
//! shards; the message streams must be identical, and the rows must end up
//! on their shards, committed or rolled back together.

mod fanout_util;
mod support;

use fanout_util::Fixture;
use support::wire::{bind, execute, parse, query, sync, Msg, Wire};

const MAP: &str =
    "functions:\n  by_id: { kind: hash }\ntables:\n  items: { key: id, function: by_id }\n";

const SCHEMA: &str = "CREATE TABLE items (id int8 PRIMARY KEY, v text);";

async fn fixture(test: &str) -> (Fixture, Wire, Wire) {
    let mut f = Fixture::new(test, MAP).await;
    f.everywhere(SCHEMA).await;
    f.start_proxy().await;
    let (oracle, proxied) = f.oracle_and_proxy_wires().await;
    (f, oracle, proxied)
}

async fn same(oracle: &mut Wire, proxied: &mut Wire, name: &str, bytes: &[u8], ready: usize) {
    let expected: Vec<String> = oracle
        .exchange(bytes, ready)
        .await
        .iter()
        .map(Msg::normalized)
        .collect();
    let got: Vec<String> = proxied
        .exchange(bytes, ready)
        .await
        .iter()
        .map(Msg::normalized)
        .collect();
    assert_eq!(got, expected, "`{name}` differs from Postgres");
}

/// Parse once, then Bind/Execute per row: the rows' keys span the shards.
fn insert_batch(ids: &[i64]) -> Vec<u8> {
    let mut b = parse("ins", "INSERT INTO items VALUES ($1, $2)", &[20, 25]);
    for id in ids {
        let v = format!("v{id}");
        b.extend(bind("", "ins", &[Some(&id.to_string()), Some(&v)]));
        b.extend(execute("", 0));
    }
    b
}

/// Rows of `ids` per shard (shards in map order).
async fn rows_on_shards(f: &Fixture, ids: &[i64]) -> Vec<i64> {
    let list: Vec<String> = ids.iter().map(i64::to_string).collect();
    rows_where(f, &format!("id IN ({})", list.join(","))).await
}

/// Rows matching `condition` per shard (shards in map order).
async fn rows_where(f: &Fixture, condition: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for cluster in &support::fleet().clusters {
        let n: i64 = support::connect(cluster, &f.db)
            .await
            .query_one(
                &format!("SELECT count(*) FROM items WHERE {condition}"),
                &[],
            )
            .await
            .expect("count")
            .get(0);
        out.push(n);
    }
    out
}

/// Parse, Bind and Execute of `sql` (no Sync): one statement of a batch.
fn statement(sql: &str) -> Vec<u8> {
    [parse("", sql, &[]), bind("", "", &[]), execute("", 0)].concat()
}

#[tokio::test]
async fn a_batch_over_several_shards_in_a_transaction_commits_together() {
    let (f, mut oracle, mut proxied) = fixture("txbatch_commit").await;
    let ids: Vec<i64> = (1..=12).collect();
    let shards: std::collections::BTreeSet<usize> = ids
        .iter()
        .map(|id| f.shard_of("items", "id", &id.to_string()))
        .collect();
    assert_eq!(shards.len(), 3, "the keys must span every shard");
    same(&mut oracle, &mut proxied, "begin", &query("BEGIN"), 1).await;
    let mut batch = insert_batch(&ids);
    // A multi-shard read in the same batch sees the transaction's rows.
    batch.extend(statement("SELECT count(*) FROM items"));
    batch.extend(sync());
    same(
        &mut oracle,
        &mut proxied,
        "inserts and a count in one batch",
        &batch,
        1,
    )
    .await;
    // Nothing visible outside the transaction yet.
    assert_eq!(rows_on_shards(&f, &ids).await.iter().sum::<i64>(), 0);
    same(&mut oracle, &mut proxied, "commit", &query("COMMIT"), 1).await;
    let per_shard = rows_on_shards(&f, &ids).await;
    assert!(per_shard.iter().all(|n| *n > 0), "{per_shard:?}");
    assert_eq!(per_shard.iter().sum::<i64>(), 12);

    // The same, rolled back: nothing anywhere.
    let more: Vec<i64> = (101..=112).collect();
    same(&mut oracle, &mut proxied, "begin 2", &query("BEGIN"), 1).await;
    let mut batch = insert_batch(&more);
    batch.extend(sync());
    same(&mut oracle, &mut proxied, "second batch", &batch, 1).await;
    same(&mut oracle, &mut proxied, "rollback", &query("ROLLBACK"), 1).await;
    assert_eq!(rows_on_shards(&f, &more).await.iter().sum::<i64>(), 0);
}

#[tokio::test]
async fn an_error_in_the_batch_fails_the_whole_transaction() {
    let (f, mut oracle, mut proxied) = fixture("txbatch_error").await;
    same(&mut oracle, &mut proxied, "begin", &query("BEGIN"), 1).await;
    // Key 5 twice: the second insert fails; Postgres skips the rest of the
    // batch and the transaction is aborted.
    let ids = [1, 2, 3, 4, 5, 6, 5, 7, 8, 9];
    let mut batch = insert_batch(&ids);
    batch.extend(sync());
    same(
        &mut oracle,
        &mut proxied,
        "batch with a duplicate key",
        &batch,
        1,
    )
    .await;
    same(
        &mut oracle,
        &mut proxied,
        "statement in the failed transaction",
        &query("SELECT 1"),
        1,
    )
    .await;
    same(
        &mut oracle,
        &mut proxied,
        "commit of a failed transaction",
        &query("COMMIT"),
        1,
    )
    .await;
    assert_eq!(
        rows_on_shards(&f, &[1, 2, 3, 4, 5, 6, 7, 8, 9])
            .await
            .iter()
            .sum::<i64>(),
        0
    );
    // The session goes on.
    same(
        &mut oracle,
        &mut proxied,
        "after",
        &query("SELECT count(*) FROM items"),
        1,
    )
    .await;
}

/// A statement that fails in a batch makes Postgres skip the rest of the
/// batch, a multi-shard statement after it included: it must not run.
#[tokio::test]
async fn a_fan_out_after_a_failure_in_the_batch_is_skipped() {
    let (f, mut oracle, mut proxied) = fixture("txbatch_skip_fanout").await;
    let seed = [insert_batch(&[1, 2, 3, 4, 5, 6]), sync()].concat();
    same(&mut oracle, &mut proxied, "seed", &seed, 1).await;
    for begin in [false, true] {
        if begin {
            same(&mut oracle, &mut proxied, "begin", &query("BEGIN"), 1).await;
        }
        let mut batch = insert_batch(&[1]); // duplicate key: fails
        batch.extend(statement("UPDATE items SET v = 'touched'"));
        batch.extend(sync());
        same(
            &mut oracle,
            &mut proxied,
            "failure, then a fan-out UPDATE",
            &batch,
            1,
        )
        .await;
        if begin {
            same(&mut oracle, &mut proxied, "rollback", &query("ROLLBACK"), 1).await;
        }
        let touched: i64 = rows_where(&f, "v = 'touched'").await.iter().sum();
        assert_eq!(
            touched, 0,
            "the skipped UPDATE ran (in a transaction: {begin})"
        );
    }
}
