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

use support::{connect, connect_proxy, fleet, fresh_db, shard_map, start_proxy};
use tokio::process::Command;

/// pgbench's scale: 3 branches (one per shard, roughly), 30 tellers,
/// 300,000 accounts.
const SCALE: i64 = 3;

/// The built-in tpcb-like script, verbatim (`pgbench --show-script=tpcb-like`).
const TPCB: &str = "\
\\set aid random(1, 100000 * :scale)
\\set bid random(1, 1 * :scale)
\\set tid random(1, 10 * :scale)
\\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
";

/// pgbench's own schema (`pgbench -i`), plus the hash-partitioned helper
/// that tells which keys belong to this shard.
const SCHEMA: &str = "\
    CREATE TABLE pgbench_branches (bid int NOT NULL PRIMARY KEY, bbalance int, filler char(88)) WITH (fillfactor=100);\
    CREATE TABLE pgbench_tellers (tid int NOT NULL PRIMARY KEY, bid int, tbalance int, filler char(84)) WITH (fillfactor=100);\
    CREATE TABLE pgbench_accounts (aid int NOT NULL PRIMARY KEY, bid int, abalance int, filler char(84)) WITH (fillfactor=100);\
    CREATE TABLE pgbench_history (tid int, bid int, aid int, delta int, mtime timestamp, filler char(22));\
    CREATE TABLE placement_probe (id int) PARTITION BY HASH (id);";

const MAP: &str = "\
pool: { mode: transaction, size: 12 }
functions:
  by_id: { kind: hash }
tables:
  pgbench_accounts: { key: aid, function: by_id }
  pgbench_tellers: { key: tid, function: by_id }
  pgbench_branches: { key: bid, function: by_id }
  pgbench_history: { key: aid, function: by_id }
";

/// Schema on every shard, and pgbench's initial rows, each on the shard the
/// map's hash function puts its key on (Postgres' own hash partitioning
/// decides, which is what `kind: hash` reproduces).
async fn tpcb_db(name: &str) -> String {
    let db = fresh_db(name);
    let shards = fleet().clusters.len();
    for (i, cluster) in fleet().clusters.iter().enumerate() {
        let mine = |column: &str| {
            format!(
                "satisfies_hash_partition('placement_probe'::regclass, {shards}, {i}, {column})"
            )
        };
        let load = format!(
            "{SCHEMA}\
             INSERT INTO pgbench_branches SELECT b, 0 FROM generate_series(1, {b}) b WHERE {pb};\
             INSERT INTO pgbench_tellers SELECT t, (t - 1) / 10 + 1, 0 FROM generate_series(1, {t}) t WHERE {pt};\
             INSERT INTO pgbench_accounts SELECT a, (a - 1) / 100000 + 1, 0, '' FROM generate_series(1, {a}) a WHERE {pa};\
             ANALYZE;",
            b = SCALE,
            t = 10 * SCALE,
            a = 100_000 * SCALE,
            pb = mine("b"),
            pt = mine("t"),
            pa = mine("a"),
        );
        connect(cluster, &db)
            .await
            .batch_execute(&load)
            .await
            .expect("pgbench schema and rows on a shard");
    }
    db
}

struct Sums {
    accounts: i64,
    tellers: i64,
    branches: i64,
    history: i64,
    history_rows: i64,
}

const SUMS: &str = "SELECT \
    (SELECT coalesce(sum(abalance), 0)::bigint FROM pgbench_accounts), \
    (SELECT coalesce(sum(tbalance), 0)::bigint FROM pgbench_tellers), \
    (SELECT coalesce(sum(bbalance), 0)::bigint FROM pgbench_branches), \
    (SELECT coalesce(sum(delta), 0)::bigint FROM pgbench_history), \
    (SELECT count(*) FROM pgbench_history)";

/// The sums over all shards, read on each shard directly.
async fn direct_sums(db: &str) -> (Sums, i64) {
    let mut sums = Sums {
        accounts: 0,
        tellers: 0,
        branches: 0,
        history: 0,
        history_rows: 0,
    };
    let mut prepared = 0;
    for cluster in &fleet().clusters {
        let client = connect(cluster, db).await;
        let row = client.query_one(SUMS, &[]).await.expect("sums on a shard");
        sums.accounts += row.get::<_, i64>(0);
        sums.tellers += row.get::<_, i64>(1);
        sums.branches += row.get::<_, i64>(2);
        sums.history += row.get::<_, i64>(3);
        sums.history_rows += row.get::<_, i64>(4);
        prepared += client
            .query_one(
                "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
                &[],
            )
            .await
            .expect("pg_prepared_xacts")
            .get::<_, i64>(0);
    }
    (sums, prepared)
}

/// Runs pgbench through the proxy; returns its stdout (panics, with its
/// output, when it fails).
async fn pgbench(port: u16, db: &str, protocol: &str, script: &std::path::Path) -> String {
    let mut command = Command::new("pgbench");
    command
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app"])
        .args(["-n", "-c", "8", "-j", "2", "-T", "10", "-M", protocol])
        .args(["-D", &format!("scale={SCALE}")])
        .arg("-f")
        .arg(script)
        .arg(db)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("pgbench finished in time")
        .expect("pgbench runs");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(
        output.status.success(),
        "pgbench -M {protocol} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    eprintln!("pgbench -M {protocol} through shardgate:\n{stdout}");
    stdout
}

/// The integer after `label` in pgbench's report.
fn reported(stdout: &str, label: &str) -> i64 {
    stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("pgbench did not report {label:?}:\n{stdout}"))
}

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
