//! Two-phase commit of client transactions over raw pooled-style backend
//! connections, against real clusters: commits visible everywhere, failures
//! before the decision leave nothing anywhere, `two_phase_commit: false`,
//! and shards with `max_prepared_transactions = 0`.

mod support;

use std::path::Path;
use std::time::Duration;

use shardgate::backend::BackendConnection;
use shardgate::config::Config;
use shardgate::devcluster::DevCluster;
use shardgate::executor::control;
use shardgate::executor::recovery::{self, RecoveryOptions};
use shardgate::executor::twophase::{self, CommitOutcome, Participant, TwoPhase};
use shardgate::metrics::Metrics;

const SCHEMA: &str = "
CREATE TABLE t (id int PRIMARY KEY, tx int NOT NULL);
CREATE TABLE d (id int, CONSTRAINT d_unique UNIQUE (id) DEFERRABLE INITIALLY DEFERRED);
";

fn config_for(map: &str) -> Config {
    Config::parse(Path::new("test-map.yaml"), map, &|_| None)
        .unwrap_or_else(|e| panic!("bad test map: {e}\n{map}"))
}

fn fleet_config(db: &str, extra: &str) -> Config {
    config_for(&support::shard_map(db, extra))
}

async fn setup(test: &str) -> (String, Vec<tokio_postgres::Client>) {
    let db = support::fresh_db(test);
    let mut clients = Vec::new();
    for cluster in &support::fleet().clusters {
        let c = support::connect(cluster, &db).await;
        c.batch_execute(SCHEMA).await.unwrap();
        clients.push(c);
    }
    (db, clients)
}

async fn open_all(config: &Config) -> Vec<BackendConnection> {
    let mut conns = Vec::new();
    for (i, shard) in config.shards.iter().enumerate() {
        conns.push(
            BackendConnection::connect(shard, i, Duration::from_secs(5))
                .await
                .unwrap(),
        );
    }
    conns
}

async fn run(conn: &mut BackendConnection, sql: &str) {
    control::run(conn, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn rows(client: &tokio_postgres::Client, tx: i32) -> i64 {
    client
        .query_one("SELECT count(*) FROM t WHERE tx = $1", &[&tx])
        .await
        .unwrap()
        .get(0)
}

async fn prepared(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn decisions(client: &tokio_postgres::Client) -> i64 {
    let present: bool = client
        .query_one(
            "SELECT to_regclass('shardgate.tx_decisions') IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if !present {
        return 0;
    }
    client
        .query_one("SELECT count(*) FROM shardgate.tx_decisions", &[])
        .await
        .unwrap()
        .get(0)
}

/// `BEGIN` + one row of transaction `tx` on each listed shard.
async fn write(conns: &mut [BackendConnection], shards: &[usize], tx: i32) {
    for &s in shards {
        run(&mut conns[s], "BEGIN").await;
        run(
            &mut conns[s],
            &format!("INSERT INTO t VALUES ({}, {tx})", tx * 10 + s as i32),
        )
        .await;
    }
}

fn participants<'a>(conns: &'a mut [BackendConnection], wrote: &[bool]) -> Vec<Participant<'a>> {
    conns
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| *i < wrote.len())
        .map(|(i, conn)| Participant {
            shard: i,
            conn,
            wrote: wrote[i],
        })
        .collect()
}

#[tokio::test]
async fn commit_across_three_shards_is_visible_everywhere() {
    let (db, clients) = setup("twophase_commit3").await;
    let config = fleet_config(&db, "");
    let metrics = Metrics::new(&["s0", "s1", "s2"]);
    let tp = TwoPhase::new(&config, Some(metrics.clone()));
    let mut conns = open_all(&config).await;

    write(&mut conns, &[0, 1, 2], 1).await;
    let outcome = twophase::commit(&tp, &mut participants(&mut conns, &[true, true, true]))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        CommitOutcome::Committed {
            prepared: 2,
            background: 0
        }
    );
    assert_eq!(outcome.command_tag(), "COMMIT");
    for c in &conns {
        assert_eq!(c.transaction_status(), b'I');
        assert!(!c.is_broken());
    }
    for c in &clients {
        assert_eq!(rows(c, 1).await, 1);
        assert_eq!(prepared(c).await, 0);
    }
    assert!(metrics
        .render()
        .contains("shardgate_twophase_total{outcome=\"committed\"} 1"));
    // The decision row stays until recovery deletes the spent ones.
    assert_eq!(decisions(&clients[0]).await, 1);
    let spent = tp.take_spent();
    assert_eq!(spent.len(), 1);
    let report = recovery::recover_once(&config.shards, &RecoveryOptions::default(), spent).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.decisions_deleted, 1);
    assert_eq!(decisions(&clients[0]).await, 0);

    // The same connections serve the next transaction: 2 writers and a reader.
    write(&mut conns, &[1, 2], 2).await;
    run(&mut conns[0], "BEGIN").await;
    run(&mut conns[0], "SELECT count(*) FROM t").await;
    let outcome = twophase::commit(&tp, &mut participants(&mut conns, &[false, true, true]))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        CommitOutcome::Committed {
            prepared: 1,
            background: 0
        }
    );
    assert_eq!(rows(&clients[0], 2).await, 0);
    assert_eq!(rows(&clients[1], 2).await, 1);
    assert_eq!(rows(&clients[2], 2).await, 1);
    // s1 coordinated this one.
    assert_eq!(decisions(&clients[1]).await, 1);
}

#[tokio::test]
async fn one_written_shard_commits_without_prepare() {
    let (db, clients) = setup("twophase_single").await;
    let config = fleet_config(&db, "");
    let tp = TwoPhase::new(&config, None);
    let mut conns = open_all(&config).await;
    write(&mut conns, &[2], 3).await;
    for s in [0, 1] {
        run(&mut conns[s], "BEGIN").await;
        run(&mut conns[s], "SELECT 1").await;
    }
    let outcome = twophase::commit(&tp, &mut participants(&mut conns, &[false, false, true]))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        CommitOutcome::Committed {
            prepared: 0,
            background: 0
        }
    );
    assert_eq!(rows(&clients[2], 3).await, 1);
    for c in &clients {
        assert_eq!(decisions(c).await, 0, "no decision row for a plain commit");
    }
}

#[tokio::test]
async fn deferred_violation_at_prepare_leaves_nothing_anywhere() {
    let (db, clients) = setup("twophase_prepare_fails").await;
    let config = fleet_config(&db, "");
    let metrics = Metrics::new(&["s0", "s1", "s2"]);
    let tp = TwoPhase::new(&config, Some(metrics.clone()));
    let mut conns = open_all(&config).await;
    write(&mut conns, &[0, 1, 2], 4).await;
    // Checked at PREPARE on s2 (a participant).
    run(&mut conns[2], "INSERT INTO d VALUES (1), (1)").await;
    let error = twophase::commit(&tp, &mut participants(&mut conns, &[true, true, true]))
        .await
        .unwrap_err();
    assert_eq!(error.code, "23505", "{error}");
    assert!(error.message.contains("shard s2"), "{error}");
    for c in &conns {
        assert_eq!(c.transaction_status(), b'I');
        assert!(!c.is_broken());
    }
    for c in &clients {
        assert_eq!(rows(c, 4).await, 0);
        assert_eq!(prepared(c).await, 0);
        assert_eq!(decisions(c).await, 0);
    }
    assert!(metrics
        .render()
        .contains("shardgate_twophase_total{outcome=\"aborted\"} 1"));

    // Checked at the coordinator's COMMIT (s0), after s1 and s2 prepared.
    write(&mut conns, &[0, 1, 2], 5).await;
    run(&mut conns[0], "INSERT INTO d VALUES (7), (7)").await;
    let error = twophase::commit(&tp, &mut participants(&mut conns, &[true, true, true]))
        .await
        .unwrap_err();
    assert_eq!(error.code, "23505", "{error}");
    assert!(error.message.contains("shard s0"), "{error}");
    for c in &clients {
        assert_eq!(rows(c, 5).await, 0);
        assert_eq!(prepared(c).await, 0);
        assert_eq!(decisions(c).await, 0);
    }
}

#[tokio::test]
async fn failed_transaction_block_rolls_back_everywhere() {
    let (db, clients) = setup("twophase_failed_block").await;
    let config = fleet_config(&db, "");
    let tp = TwoPhase::new(&config, None);
    let mut conns = open_all(&config).await;
    write(&mut conns, &[0, 1], 6).await;
    let error = control::run(&mut conns[1], "SELECT 1/0").await.unwrap_err();
    assert_eq!(error.sqlstate(), "22012");
    assert_eq!(conns[1].transaction_status(), b'E');
    let outcome = twophase::commit(&tp, &mut participants(&mut conns, &[true, true]))
        .await
        .unwrap();
    assert_eq!(outcome, CommitOutcome::RolledBack);
    assert_eq!(outcome.command_tag(), "ROLLBACK");
    for c in &clients {
        assert_eq!(rows(c, 6).await, 0);
    }

    // Explicit rollback.
    write(&mut conns, &[0, 1, 2], 7).await;
    twophase::rollback(&mut participants(&mut conns, &[true, true, true])).await;
    for c in &conns {
        assert_eq!(c.transaction_status(), b'I');
    }
    for c in &clients {
        assert_eq!(rows(c, 7).await, 0);
    }
}

#[tokio::test]
async fn two_phase_commit_off_refuses_a_second_written_shard() {
    let (db, clients) = setup("twophase_off").await;
    let config = fleet_config(&db, "two_phase_commit: false\n");
    let tp = TwoPhase::new(&config, None);
    assert!(!tp.enabled());
    assert!(tp.may_write(&[], 1).is_ok());
    assert!(tp.may_write(&[1], 1).is_ok());
    let error = tp.may_write(&[1], 2).unwrap_err();
    assert_eq!(error.code, "0A000");
    assert!(
        error.message.contains("s1") && error.message.contains("s2"),
        "{error}"
    );
    assert!(error
        .hint
        .as_deref()
        .is_some_and(|h| h.contains("two_phase_commit")));

    // A caller that ignored may_write still gets no partial commit.
    let mut conns = open_all(&config).await;
    write(&mut conns, &[0, 1], 8).await;
    let error = twophase::commit(&tp, &mut participants(&mut conns, &[true, true]))
        .await
        .unwrap_err();
    assert_eq!(error.code, "0A000");
    for c in &clients {
        assert_eq!(rows(c, 8).await, 0);
    }
    let on = TwoPhase::new(&fleet_config(&db, ""), None);
    assert!(on.may_write(&[0, 1], 2).is_ok());
}

/// A cluster of our own (the shared fleet cannot be killed or reconfigured).
async fn own_cluster(name: &str, db: &str, mpt_zero: bool) -> DevCluster {
    let name = name.to_owned();
    let db = db.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut cluster = DevCluster::start(&name).unwrap();
        cluster.create_database(&db).unwrap();
        cluster.psql(&db, SCHEMA).unwrap();
        if mpt_zero {
            cluster
                .psql("postgres", "ALTER SYSTEM SET max_prepared_transactions = 0")
                .unwrap();
            cluster.restart().unwrap();
        }
        cluster
    })
    .await
    .unwrap()
}

fn map_with(db: &str, extra_cluster: &DevCluster) -> Config {
    let mut map = support::shard_map(db, "");
    let fleet = &support::fleet().clusters;
    // Keep s0 and s1 of the fleet, replace s2 by our cluster.
    map = map.replace(&fleet[2].url(db), &extra_cluster.url(db));
    config_for(&map)
}

#[tokio::test]
async fn participant_killed_before_prepare_leaves_nothing_anywhere() {
    let (db, clients) = setup("twophase_killed").await;
    let mut cluster = own_cluster("twophase-kill", &db, false).await;
    let config = map_with(&db, &cluster);
    let tp = TwoPhase::new(&config, None);
    let mut conns = open_all(&config).await;
    write(&mut conns, &[0, 1, 2], 9).await;
    let mut cluster = tokio::task::spawn_blocking(move || {
        cluster.kill().unwrap();
        cluster
    })
    .await
    .unwrap();
    let error = twophase::commit(&tp, &mut participants(&mut conns, &[true, true, true]))
        .await
        .unwrap_err();
    assert!(
        error.code.starts_with("08") || error.code == "57P01",
        "{error}"
    );
    assert!(error.message.contains("shard s2"), "{error}");
    assert!(conns[2].is_broken());
    for c in &clients[..2] {
        assert_eq!(rows(c, 9).await, 0);
        assert_eq!(prepared(c).await, 0);
        assert_eq!(decisions(c).await, 0);
    }
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart().unwrap();
        cluster
    })
    .await
    .unwrap();
    let c2 = support::connect(&cluster, &db).await;
    assert_eq!(rows(&c2, 9).await, 0);
    assert_eq!(prepared(&c2).await, 0);
}

#[tokio::test]
async fn max_prepared_transactions_zero_is_reported_and_refused() {
    let (db, clients) = setup("twophase_mpt0").await;
    let cluster = own_cluster("twophase-mpt0", &db, true).await;
    let config = map_with(&db, &cluster);

    // Without preflight: PREPARE itself fails; the message says how to fix it.
    let tp = TwoPhase::new(&config, None);
    let mut conns = open_all(&config).await;
    write(&mut conns, &[0, 2], 10).await;
    let error = twophase::commit(&tp, &mut participants(&mut conns, &[true, false, true]))
        .await
        .unwrap_err();
    assert_eq!(error.code, "55000", "{error}");
    assert!(error.message.contains("shard s2"), "{error}");
    let hint = error.hint.clone().unwrap_or_default();
    assert!(
        hint.contains("max_prepared_transactions")
            && hint.contains("postgresql.conf")
            && hint.contains("restart"),
        "{hint}"
    );
    assert_eq!(rows(&clients[0], 10).await, 0);

    // With preflight: the metric is set and the commit is refused up front.
    let metrics = Metrics::new(&["s0", "s1", "s2"]);
    let tp = TwoPhase::new(&config, Some(metrics.clone()));
    let report = recovery::recover_once(&config.shards, &RecoveryOptions::default(), vec![]).await;
    assert_eq!(report.prepare_disabled, vec![2]);
    tp.after_recovery(&report);
    let text = metrics.render();
    assert!(
        text.contains("shardgate_prepared_transactions_disabled{shard=\"s2\"} 1"),
        "{text}"
    );
    assert!(text.contains("shardgate_prepared_transactions_disabled{shard=\"s0\"} 0"));
    write(&mut conns, &[0, 2], 11).await;
    let error = twophase::commit(&tp, &mut participants(&mut conns, &[true, false, true]))
        .await
        .unwrap_err();
    assert_eq!(error.code, "55000");
    assert!(error
        .hint
        .as_deref()
        .is_some_and(|h| h.contains("max_prepared_transactions")));
    let c2 = support::connect(&cluster, &db).await;
    assert_eq!(rows(&clients[0], 11).await, 0);
    assert_eq!(rows(&c2, 11).await, 0);
    // Also when that shard would be the coordinator (the lowest index
    // written): the rule is "multi-shard writes on it fail".
    let mut swapped = config.clone();
    swapped.shards.swap(0, 2);
    let tp_swapped = TwoPhase::new(&swapped, None);
    let report = recovery::recover_once(&swapped.shards, &RecoveryOptions::default(), vec![]).await;
    assert_eq!(report.prepare_disabled, vec![0]);
    tp_swapped.after_recovery(&report);
    let mut swapped_conns = open_all(&swapped).await;
    write(&mut swapped_conns, &[0, 2], 13).await;
    let error = twophase::commit(
        &tp_swapped,
        &mut participants(&mut swapped_conns, &[true, false, true]),
    )
    .await
    .unwrap_err();
    assert_eq!(error.code, "55000");
    assert_eq!(rows(&clients[0], 13).await, 0);
    assert_eq!(rows(&c2, 13).await, 0);
    // Writes on that shard alone still work.
    write(&mut conns, &[2], 12).await;
    twophase::commit(&tp, &mut participants(&mut conns, &[false, false, true]))
        .await
        .unwrap();
    assert_eq!(rows(&c2, 12).await, 1);
}
