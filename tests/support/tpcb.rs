//! pgbench's TPC-B-like workload on the shared fleet: its schema and rows
//! placed on the shards as the map's `hash` places them, the sums that must
//! balance afterwards, and running pgbench through a proxy. Shared by the
//! tests that put real pgbench load through shardgate.
#![allow(dead_code)]

use std::time::Duration;

use tokio::process::Command;

use super::{connect, fleet, fresh_db};

/// pgbench's scale: 3 branches (one per shard, roughly), 30 tellers,
/// 300,000 accounts.
pub const SCALE: i64 = 3;

/// The built-in tpcb-like script, verbatim (`pgbench --show-script=tpcb-like`).
pub const TPCB: &str = "\
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
pub const SCHEMA: &str = "\
    CREATE TABLE pgbench_branches (bid int NOT NULL PRIMARY KEY, bbalance int, filler char(88)) WITH (fillfactor=100);\
    CREATE TABLE pgbench_tellers (tid int NOT NULL PRIMARY KEY, bid int, tbalance int, filler char(84)) WITH (fillfactor=100);\
    CREATE TABLE pgbench_accounts (aid int NOT NULL PRIMARY KEY, bid int, abalance int, filler char(84)) WITH (fillfactor=100);\
    CREATE TABLE pgbench_history (tid int, bid int, aid int, delta int, mtime timestamp, filler char(22));\
    CREATE TABLE placement_probe (id int) PARTITION BY HASH (id);";

pub const MAP: &str = "\
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
pub async fn tpcb_db(name: &str) -> String {
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

pub struct Sums {
    pub accounts: i64,
    pub tellers: i64,
    pub branches: i64,
    pub history: i64,
    pub history_rows: i64,
}

pub const SUMS: &str = "SELECT \
    (SELECT coalesce(sum(abalance), 0)::bigint FROM pgbench_accounts), \
    (SELECT coalesce(sum(tbalance), 0)::bigint FROM pgbench_tellers), \
    (SELECT coalesce(sum(bbalance), 0)::bigint FROM pgbench_branches), \
    (SELECT coalesce(sum(delta), 0)::bigint FROM pgbench_history), \
    (SELECT count(*) FROM pgbench_history)";

/// The sums over all shards, read on each shard directly.
pub async fn direct_sums(db: &str) -> (Sums, i64) {
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
        prepared += super::prepared_transactions(&client).await;
    }
    (sums, prepared)
}

/// Runs pgbench through the proxy; returns its stdout (panics, with its
/// output, when it fails).
pub async fn pgbench(port: u16, db: &str, protocol: &str, script: &std::path::Path) -> String {
    let script = script.to_string_lossy();
    let run = [
        "-c", "8", "-j", "2", "-T", "10", "-M", protocol, "-f", &script,
    ];
    pgbench_with(port, db, &run).await
}

/// pgbench as `app` through the proxy at `port` with `run` (clients,
/// duration, script…); returns its stdout, panics with it when it fails.
pub async fn pgbench_with(port: u16, db: &str, run: &[&str]) -> String {
    let protocol = run
        .iter()
        .position(|a| *a == "-M")
        .and_then(|i| run.get(i + 1))
        .copied()
        .unwrap_or("simple");
    let mut command = Command::new("pgbench");
    command
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app"])
        .args(["-n", "-D", &format!("scale={SCALE}")])
        .args(run)
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
pub fn reported(stdout: &str, label: &str) -> i64 {
    stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("pgbench did not report {label:?}:\n{stdout}"))
}
