//! Recovery of client two-phase commits against real clusters: a
//! coordinator process killed after PREPARE and after the decision, two
//! recoveries at once, a live transaction seen by another instance's
//! recovery, a COMMIT PREPARED finished in the background, and gids of
//! other families left alone.
//!
//! The coordinator runs in a child process: this test binary re-executes
//! itself with `--exact child_transaction` and `TWOPHASE_CHILD_*` set; that
//! "test" then runs one transaction over the three shards with the library
//! (failpoints `SHARDGATE_2PC_CRASH_AFTER` / `SHARDGATE_2PC_PAUSE_AFTER`).

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use shardgate::backend::BackendConnection;
use shardgate::config::Config;
use shardgate::executor::control;
use shardgate::executor::recovery::{self, RecoveryOptions, RecoveryReport};
use shardgate::executor::twophase::{self, Participant, TwoPhase, CRASH_ENV, PAUSE_ENV};
use tokio::process::Command;

const SCHEMA: &str = "CREATE TABLE t (id int PRIMARY KEY, tx int NOT NULL);";

fn config_for(map: &str) -> Config {
    Config::parse(Path::new("test-map.yaml"), map, &|_| None)
        .unwrap_or_else(|e| panic!("bad test map: {e}\n{map}"))
}

/// The coordinator of the crash tests; does nothing in a normal test run.
#[tokio::test]
async fn child_transaction() {
    let (Ok(map), Ok(tx)) = (
        std::env::var("TWOPHASE_CHILD_MAP"),
        std::env::var("TWOPHASE_CHILD_TX"),
    ) else {
        return;
    };
    let tx: i32 = tx.parse().unwrap();
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter("shardgate=info")
        .try_init();
    let config = config_for(&map);
    let count: i32 = std::env::var("TWOPHASE_CHILD_COUNT")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(1);
    let tp = TwoPhase::new(&config, None);
    let mut conns = Vec::new();
    for (i, shard) in config.shards.iter().enumerate() {
        conns.push(
            BackendConnection::connect(shard, i, Duration::from_secs(5))
                .await
                .unwrap(),
        );
    }
    for tx in tx..tx + count {
        for (i, conn) in conns.iter_mut().enumerate() {
            control::run(
                conn,
                &format!("BEGIN; INSERT INTO t VALUES ({}, {tx})", tx * 10 + i as i32),
            )
            .await
            .unwrap();
        }
        let mut participants: Vec<Participant<'_>> = conns
            .iter_mut()
            .enumerate()
            .map(|(shard, conn)| Participant {
                shard,
                conn,
                wrote: true,
            })
            .collect();
        let outcome = twophase::commit(&tp, &mut participants).await;
        println!("CHILD_OUTCOME {outcome:?}");
    }
    // Let background resolution finish before exiting (shards may be down
    // for a while: keep trying).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut clean = false;
    while !clean && Instant::now() < deadline {
        clean = true;
        for shard in &config.shards {
            match recovery_client(shard).await {
                Some(client) => clean &= pending(&client).await == 0,
                None => clean = false,
            }
        }
        if !clean {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!("CHILD_CLEAN {clean}");
}

async fn recovery_client(shard: &shardgate::config::ShardConfig) -> Option<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(&shard.url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Some(client)
}

async fn pending(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database() \
             AND gid LIKE 'shardgate\\_tx\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

fn child(map: &str, tx: i32, env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "child_transaction",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TWOPHASE_CHILD_MAP", map)
        .env("TWOPHASE_CHILD_TX", tx.to_string())
        .env_remove(CRASH_ENV)
        .env_remove(PAUSE_ENV)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    command
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn run_child(map: &str, tx: i32, env: &[(&str, &str)]) -> Out {
    let out = child(map, tx, env).output().await.unwrap();
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

struct Fixture {
    map: String,
    config: Config,
    clients: Vec<tokio_postgres::Client>,
}

async fn setup(test: &str) -> Fixture {
    let db = support::fresh_db(test);
    let mut clients = Vec::new();
    for cluster in &support::fleet().clusters {
        let c = support::connect(cluster, &db).await;
        c.batch_execute(SCHEMA).await.unwrap();
        clients.push(c);
    }
    let map = support::shard_map(&db, "");
    let config = config_for(&map);
    Fixture {
        map,
        config,
        clients,
    }
}

impl Fixture {
    /// Per shard: (rows of transaction `tx`, shardgate_tx_ prepared xacts).
    async fn state(&self, tx: i32) -> Vec<(i64, i64)> {
        let mut out = Vec::new();
        for c in &self.clients {
            let rows: i64 = c
                .query_one("SELECT count(*) FROM t WHERE tx = $1", &[&tx])
                .await
                .unwrap()
                .get(0);
            out.push((rows, pending(c).await));
        }
        out
    }

    async fn decisions(&self) -> i64 {
        let mut total = 0;
        for c in &self.clients {
            let present: bool = c
                .query_one(
                    "SELECT to_regclass('shardgate.tx_decisions') IS NOT NULL",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if present {
                let n: i64 = c
                    .query_one("SELECT count(*) FROM shardgate.tx_decisions", &[])
                    .await
                    .unwrap()
                    .get(0);
                total += n;
            }
        }
        total
    }

    /// Recovery passes (as a fresh instance would run them, `min_age` 0)
    /// until nothing is prepared or in flight; the reports, merged.
    async fn recover(&self) -> RecoveryReport {
        let opts = RecoveryOptions {
            min_age: Duration::ZERO,
            ..RecoveryOptions::default()
        };
        let mut all = RecoveryReport::default();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let report = recovery::recover_once(&self.config.shards, &opts, vec![]).await;
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            assert!(report.unresolved.is_empty(), "{:?}", report.unresolved);
            all.committed.extend(report.committed);
            all.rolled_back.extend(report.rolled_back);
            all.decisions_deleted += report.decisions_deleted;
            assert!(report.young.is_empty(), "min_age is 0");
            if report.in_flight.is_empty() {
                return all;
            }
            assert!(
                Instant::now() < deadline,
                "still in flight: {:?}",
                report.in_flight
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

const ABSENT: [(i64, i64); 3] = [(0, 0), (0, 0), (0, 0)];
const VISIBLE: [(i64, i64); 3] = [(1, 0), (1, 0), (1, 0)];

#[tokio::test]
async fn coordinator_killed_after_prepare_is_rolled_back() {
    let f = setup("twophase_crash_prepare").await;
    let out = run_child(&f.map, 1, &[(CRASH_ENV, "prepare")]).await;
    assert!(!out.ok, "the failpoint aborts: {}", out.stderr);
    assert!(!out.stdout.contains("CHILD_OUTCOME"), "{}", out.stdout);
    // s0 (coordinator) rolled back with its session; s1, s2 hold prepared parts.
    assert_eq!(f.state(1).await, vec![(0, 0), (0, 1), (0, 1)]);

    let report = f.recover().await;
    assert_eq!(report.rolled_back.len(), 2, "{report:?}");
    assert!(report.committed.is_empty());
    assert_eq!(f.state(1).await, ABSENT);
    assert_eq!(f.decisions().await, 0);
}

#[tokio::test]
async fn coordinator_killed_after_decision_is_committed() {
    let f = setup("twophase_crash_decision").await;
    let out = run_child(&f.map, 2, &[(CRASH_ENV, "decision")]).await;
    assert!(!out.ok, "the failpoint aborts: {}", out.stderr);
    assert_eq!(f.state(2).await, vec![(1, 0), (0, 1), (0, 1)]);
    assert_eq!(f.decisions().await, 1);

    // The periodic task a restarted proxy runs (here with a short interval).
    let metrics = shardgate::metrics::Metrics::new(&["s0", "s1", "s2"]);
    let tp = TwoPhase::new(&f.config, Some(metrics.clone()));
    let task = recovery::spawn(
        tp,
        RecoveryOptions {
            interval: Duration::from_millis(100),
            min_age: Duration::ZERO,
            ..RecoveryOptions::default()
        },
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while f.state(2).await != VISIBLE || f.decisions().await != 0 {
        assert!(Instant::now() < deadline, "recovery did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    task.abort();
    let text = metrics.render();
    assert!(text.contains("shardgate_twophase_in_doubt 0"), "{text}");
    assert!(text.contains("shardgate_prepared_transactions_disabled{shard=\"s1\"} 0"));
}

#[tokio::test]
async fn two_recoveries_at_once_agree() {
    let f = setup("twophase_two_recoveries").await;
    for (tx, point) in [
        (11, "prepare"),
        (12, "decision"),
        (13, "prepare"),
        (14, "decision"),
    ] {
        let out = run_child(&f.map, tx, &[(CRASH_ENV, point)]).await;
        assert!(!out.ok);
    }
    let opts = RecoveryOptions {
        min_age: Duration::ZERO,
        lock_timeout: Duration::from_secs(5),
        ..RecoveryOptions::default()
    };
    let (a, b) = tokio::join!(
        recovery::recover_once(&f.config.shards, &opts, vec![]),
        recovery::recover_once(&f.config.shards, &opts, vec![]),
    );
    for r in [&a, &b] {
        assert!(r.errors.is_empty() && r.unresolved.is_empty(), "{r:?}");
    }
    // Every prepared part was finished exactly once, the right way.
    let committed: Vec<_> = a.committed.iter().chain(&b.committed).collect();
    let rolled_back: Vec<_> = a.rolled_back.iter().chain(&b.rolled_back).collect();
    let leftover = f.recover().await;
    assert_eq!(
        committed.len() + leftover.committed.len(),
        4,
        "{a:?}\n{b:?}"
    );
    assert_eq!(
        rolled_back.len() + leftover.rolled_back.len(),
        4,
        "{a:?}\n{b:?}"
    );
    for (_, gid) in committed
        .iter()
        .chain(&leftover.committed.iter().collect::<Vec<_>>())
    {
        assert!(
            !rolled_back.iter().any(|(_, g)| g == gid),
            "{gid} both ways"
        );
    }
    assert_eq!(f.state(11).await, ABSENT);
    assert_eq!(f.state(12).await, VISIBLE);
    assert_eq!(f.state(13).await, ABSENT);
    assert_eq!(f.state(14).await, VISIBLE);
    assert_eq!(f.decisions().await, 0);
}

#[tokio::test]
async fn live_transaction_survives_another_instances_recovery() {
    let f = setup("twophase_live").await;
    let running = child(&f.map, 21, &[(PAUSE_ENV, "prepare:4000")])
        .spawn()
        .unwrap();
    // Wait until both participants prepared (the coordinator now sleeps).
    let deadline = Instant::now() + Duration::from_secs(15);
    while f.state(21).await != vec![(0, 0), (0, 1), (0, 1)] {
        assert!(Instant::now() < deadline, "child never prepared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let opts = RecoveryOptions {
        min_age: Duration::ZERO,
        lock_timeout: Duration::from_millis(300),
        ..RecoveryOptions::default()
    };
    let report = recovery::recover_once(&f.config.shards, &opts, vec![]).await;
    assert_eq!(report.in_flight.len(), 2, "{report:?}");
    assert!(report.rolled_back.is_empty() && report.committed.is_empty());
    assert_eq!(report.decisions_deleted, 0);

    let out = running.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("CHILD_OUTCOME Ok(Committed { prepared: 2, background: 0 })"),
        "{stdout}"
    );
    assert_eq!(f.state(21).await, VISIBLE);
}

#[tokio::test]
async fn lost_commit_prepared_is_finished_in_the_background() {
    let f = setup("twophase_background").await;
    let running = child(&f.map, 31, &[(PAUSE_ENV, "decision:3000")])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while f.state(31).await != vec![(1, 0), (0, 1), (0, 1)] {
        assert!(Instant::now() < deadline, "child never decided");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Cut the coordinator's connection to s2: its COMMIT PREPARED fails.
    let killed: i64 = f.clients[2]
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND backend_type = 'client backend' \
             AND application_name = '' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    let out = running.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("CHILD_OUTCOME Ok(Committed { prepared: 2, background: 1 })"),
        "{stdout}"
    );
    assert!(stdout.contains("CHILD_CLEAN true"), "{stdout}");
    assert_eq!(f.state(31).await, VISIBLE);
}

#[tokio::test]
async fn other_gid_families_are_left_alone() {
    let f = setup("twophase_families").await;
    let s1 = &f.clients[1];
    for gid in ["shardgate_mig_abc123_1_s1", "someone_elses_gid"] {
        s1.batch_execute(&format!(
            "BEGIN; INSERT INTO t VALUES (900 + length('{gid}'), 99); PREPARE TRANSACTION '{gid}'"
        ))
        .await
        .unwrap();
    }
    let report = f.recover().await;
    assert!(report.committed.is_empty() && report.rolled_back.is_empty());
    let left: i64 = s1
        .query_one(
            "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 2);
    for gid in ["shardgate_mig_abc123_1_s1", "someone_elses_gid"] {
        s1.batch_execute(&format!("ROLLBACK PREPARED '{gid}'"))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn coordinator_lost_during_commit_is_resolved_by_asking_it() {
    let f = setup("twophase_unknown").await;
    let db = f.config.shards[0].database.clone();
    let mut cluster = {
        let db = db.clone();
        tokio::task::spawn_blocking(move || {
            let cluster = shardgate::devcluster::DevCluster::start("twophase-coord").unwrap();
            cluster.create_database(&db).unwrap();
            cluster.psql(&db, SCHEMA).unwrap();
            cluster
        })
        .await
        .unwrap()
    };
    // s0, the coordinator, is our own cluster.
    let fleet = &support::fleet().clusters;
    let map = f.map.replace(&fleet[0].url(&db), &cluster.url(&db));
    let running = child(&map, 41, &[(PAUSE_ENV, "prepare:3000")])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while f.state(41).await[1..] != [(0, 1), (0, 1)] {
        assert!(Instant::now() < deadline, "child never prepared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The coordinator shard crashes while the coordinator is about to COMMIT.
    cluster = tokio::task::spawn_blocking(move || {
        cluster.kill().unwrap();
        std::thread::sleep(Duration::from_secs(4));
        cluster.restart().unwrap();
        cluster
    })
    .await
    .unwrap();
    let out = running.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("CHILD_OUTCOME Err") && stdout.contains("08007"),
        "{stdout}"
    );
    // The child's background task asked the restarted coordinator: no
    // decision survived the crash, so the prepared parts were rolled back.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("CHILD_CLEAN true"), "{stdout}\n{stderr}");
    assert_eq!(f.state(41).await[1..], [(0, 0), (0, 0)]);
    let c0 = support::connect(&cluster, &db).await;
    let rows: i64 = c0
        .query_one("SELECT count(*) FROM t WHERE tx = 41", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
}

/// Coordinators that pause 30 ms between PREPARE and their decision, while
/// two other "instances" run recovery back to back with `min_age` 0: every
/// commit succeeds and is complete on every shard (the probe waits for the
/// live coordinator instead of rolling its prepared parts back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_under_aggressive_recovery_stay_atomic() {
    let f = setup("twophase_stress").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let recovering: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            let shards = f.config.shards.clone();
            tokio::spawn(async move {
                let opts = RecoveryOptions {
                    min_age: Duration::ZERO,
                    lock_timeout: Duration::from_secs(5),
                    ..RecoveryOptions::default()
                };
                let (mut passes, mut rolled_back, mut seen) = (0, 0, 0);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let report = recovery::recover_once(&shards, &opts, vec![]).await;
                    assert!(report.errors.is_empty(), "{:?}", report.errors);
                    rolled_back += report.rolled_back.len();
                    seen += report.committed.len() + report.in_flight.len();
                    passes += 1;
                }
                (passes, rolled_back, seen)
            })
        })
        .collect();
    let children: Vec<_> = (0..2)
        .map(|c| {
            let mut command = child(&f.map, 1000 + c * 1000, &[(PAUSE_ENV, "prepare:30")]);
            command.env("TWOPHASE_CHILD_COUNT", "25");
            command.output()
        })
        .collect();
    for out in futures::future::join_all(children).await {
        let out = out.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        assert_eq!(
            stdout.matches("CHILD_OUTCOME Ok(Committed").count(),
            25,
            "{stdout}"
        );
        assert!(stdout.contains("CHILD_CLEAN true"), "{stdout}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut passes, mut seen) = (0, 0);
    for r in futures::future::join_all(recovering).await {
        let (p, rolled_back, s) = r.unwrap();
        assert_eq!(rolled_back, 0, "a live transaction was rolled back");
        passes += p;
        seen += s;
    }
    println!("{passes} recovery passes met {seen} prepared parts of live transactions");
    assert!(seen > 0, "the race was not exercised ({passes} passes)");
    for c in &f.clients {
        let n: i64 = c
            .query_one("SELECT count(*) FROM t WHERE tx >= 1000", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 50);
        assert_eq!(pending(c).await, 0);
    }
}
