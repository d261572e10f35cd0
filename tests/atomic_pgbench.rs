//! Issue #6 acceptance: pgbench's TPC-B-like transaction through shardgate
//! on three shards. `pgbench_accounts`, `pgbench_tellers` and
//! `pgbench_branches` are each sharded by their own id, so most transactions
//! write on two or three shards and commit with two-phase commit.
//! `pgbench_history` is sharded by `aid`: its INSERT lands on the shard the
//! transaction's account UPDATE already wrote on (co-located), so it adds no
//! participant; replicated, it would make every transaction a write on all
//! three shards and test replication rather than TPC-B.
//!
//! Afterwards: pgbench reports no failed transaction, the sums of account,
//! teller and branch balances each equal the sum of history deltas (read on
//! the shards directly and through the proxy), and no shard has a prepared
//! transaction left.

mod support;

use std::time::Duration;

use support::tpcb::{direct_sums, pgbench, reported, tpcb_db, MAP, TPCB};
use support::{connect, connect_proxy, fleet, fresh_db, shard_map, start_proxy};
use tokio::process::Command;

async fn tpcb_through_shardgate(name: &str, protocol: &str) {
    let db = tpcb_db(name).await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let dir = std::env::temp_dir().join(format!("shardgate-{db}"));
    tokio::fs::create_dir_all(&dir).await.expect("script dir");
    let script = dir.join("tpcb.sql");
    tokio::fs::write(&script, TPCB).await.expect("script");

    let stdout = pgbench(server.address.port(), &db, protocol, &script).await;
    let processed = reported(&stdout, "number of transactions actually processed:");
    let failed = reported(&stdout, "number of failed transactions:");
    assert_eq!(failed, 0, "pgbench reported failed transactions:\n{stdout}");
    assert!(processed > 100, "too few transactions ran:\n{stdout}");

    let (sums, prepared) = direct_sums(&db).await;
    assert_eq!(
        sums.history_rows, processed,
        "one history row per committed transaction"
    );
    assert_eq!(sums.accounts, sums.history, "sum(abalance) = sum(delta)");
    assert_eq!(sums.tellers, sums.history, "sum(tbalance) = sum(delta)");
    assert_eq!(sums.branches, sums.history, "sum(bbalance) = sum(delta)");
    assert_eq!(prepared, 0, "no prepared transaction left on any shard");

    // The same sums through the proxy (fan-out aggregates).
    let client = connect_proxy(&server, "app", None).await;
    for (table, column, expected) in [
        ("pgbench_accounts", "abalance", sums.accounts),
        ("pgbench_tellers", "tbalance", sums.tellers),
        ("pgbench_branches", "bbalance", sums.branches),
        ("pgbench_history", "delta", sums.history),
    ] {
        let total: i64 = client
            .query_one(
                &format!("SELECT coalesce(sum({column}), 0)::bigint FROM {table}"),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("sum of {table} through shardgate: {e}"))
            .get(0);
        assert_eq!(total, expected, "sum({column}) through shardgate");
    }
    // Most transactions were multi-shard: every shard has history rows and
    // balance changes.
    for (i, cluster) in fleet().clusters.iter().enumerate() {
        let changed: i64 = connect(cluster, &db)
            .await
            .query_one(
                "SELECT count(*) FROM pgbench_tellers WHERE tbalance <> 0",
                &[],
            )
            .await
            .expect("tellers changed")
            .get(0);
        assert!(changed > 0, "shard s{i}: no teller was updated");
    }
    server.stop().await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpcb_like_simple_protocol_commits_atomically_on_three_shards() {
    tpcb_through_shardgate("tpcb_simple", "simple").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpcb_like_extended_protocol_commits_atomically_on_three_shards() {
    tpcb_through_shardgate("tpcb_extended", "extended").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpcb_like_prepared_statements_commit_atomically_on_three_shards() {
    tpcb_through_shardgate("tpcb_prepared", "prepared").await;
}

/// Issue #14: `pgbench -i` itself through shardgate (its `COPY … WITH
/// (FREEZE ON)` was refused by the SQL parser), then TPC-B on what it
/// loaded: no failed transaction, balances equal to history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_init_through_shardgate_then_tpcb() {
    let db = fresh_db("tpcb_init");
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let port = server.address.port().to_string();
    let init = tokio::time::timeout(
        Duration::from_secs(300),
        Command::new("pgbench")
            .args([
                "-i",
                "-s",
                "10",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "app",
                &db,
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("pgbench -i finished in time")
    .expect("pgbench runs");
    assert!(
        init.status.success(),
        "pgbench -i -s 10 through shardgate failed:\n{}",
        String::from_utf8_lossy(&init.stderr)
    );
    // Every row is on the shard its key hashes to, and no row is missing.
    let accounts = support::rows_per_shard(&db, "pgbench_accounts").await;
    assert_eq!(accounts.iter().sum::<i64>(), 1_000_000, "{accounts:?}");
    assert!(accounts.iter().all(|n| *n > 300_000), "{accounts:?}");
    for (i, cluster) in fleet().clusters.iter().enumerate() {
        let client = connect(cluster, &db).await;
        client
            .batch_execute("CREATE TABLE placement_probe (id int) PARTITION BY HASH (id)")
            .await
            .expect("probe");
        let misplaced: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM pgbench_accounts WHERE NOT \
                     satisfies_hash_partition('placement_probe'::regclass, {}, {i}, aid)",
                    fleet().clusters.len()
                ),
                &[],
            )
            .await
            .expect("placement check")
            .get(0);
        assert_eq!(misplaced, 0, "shard s{i} holds rows of another shard");
    }
    let dir = std::env::temp_dir().join(format!("shardgate-{db}"));
    tokio::fs::create_dir_all(&dir).await.expect("script dir");
    let script = dir.join("tpcb.sql");
    tokio::fs::write(&script, TPCB.replace("100000 * :scale", "100000 * 10"))
        .await
        .expect("script");
    let stdout = pgbench(server.address.port(), &db, "simple", &script).await;
    assert_eq!(reported(&stdout, "number of failed transactions:"), 0);
    let processed = reported(&stdout, "number of transactions actually processed:");
    let (sums, prepared) = direct_sums(&db).await;
    assert_eq!(sums.history_rows, processed);
    assert_eq!(sums.accounts, sums.history, "sum(abalance) = sum(delta)");
    assert_eq!(sums.tellers, sums.history, "sum(tbalance) = sum(delta)");
    assert_eq!(sums.branches, sums.history, "sum(bbalance) = sum(delta)");
    assert_eq!(prepared, 0, "no prepared transaction left on any shard");
    server.stop().await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
}
