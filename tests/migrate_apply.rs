//! The coordinated migrator against three real shards: a graph with two
//! branches, a merge and a depends_on going base → heads → base; a revision
//! failing on one shard; the migration lock; changed files.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use shardgate::config::Config;
use shardgate::migrate::{ApplyOptions, MigrateError, Migrator};

const A: &str = "a00000000001";
const B1: &str = "b10000000001";
const C1: &str = "c10000000001";
const B2: &str = "b20000000001";
const M: &str = "e00000000001";
const D: &str = "d00000000001";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/migrations")
        .join(name)
}

fn config(db: &str, dir: &Path) -> Config {
    let map = support::shard_map(
        db,
        &format!("migrations: {{ dir: \"{}\" }}\n", dir.display()),
    );
    Config::parse(Path::new("test-map.yaml"), &map, &|_| None)
        .unwrap_or_else(|e| panic!("bad test map: {e}"))
}

fn opts() -> ApplyOptions {
    ApplyOptions {
        lock_wait: Duration::from_secs(20),
        ..ApplyOptions::default()
    }
}

async fn clients(db: &str) -> Vec<tokio_postgres::Client> {
    let mut out = Vec::new();
    for cluster in &support::fleet().clusters {
        out.push(support::connect(cluster, db).await);
    }
    out
}

async fn version_rows(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT version_num::text FROM shardgate.version ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn exists(client: &tokio_postgres::Client, relation: &str) -> bool {
    client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&relation])
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

/// Every shard has exactly `rows` as version rows, these relations, and no
/// prepared transaction.
async fn expect_everywhere(
    shards: &[tokio_postgres::Client],
    rows: &[&str],
    present: &[&str],
    absent: &[&str],
) {
    for (i, c) in shards.iter().enumerate() {
        assert_eq!(version_rows(c).await, rows, "version rows on s{i}");
        for r in present {
            assert!(exists(c, r).await, "{r} should exist on s{i}");
        }
        for r in absent {
            assert!(!exists(c, r).await, "{r} should not exist on s{i}");
        }
        assert_eq!(prepared(c).await, 0, "prepared transactions left on s{i}");
    }
}

#[tokio::test]
async fn graph_with_branches_merge_and_depends_on_goes_up_and_down() {
    let db = support::fresh_db("migrate_graph");
    let migrator = Migrator::from_config(&config(&db, &fixture("graph"))).unwrap();
    let shards = clients(&db).await;

    // Up one branch: the parent comes first.
    let report = migrator.upgrade("billing", &opts()).await.unwrap();
    assert_eq!(
        report
            .steps
            .iter()
            .map(|s| s.0.as_str())
            .collect::<Vec<_>>(),
        [A, B1]
    );
    assert_eq!(report.shards, ["s0", "s1", "s2"]);
    expect_everywhere(&shards, &[B1], &["users", "invoices"], &["audit_log"]).await;

    // `head` is ambiguous (two heads), like Alembic.
    let error = migrator.upgrade("head", &opts()).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("Multiple head revisions are present"),
        "{error}"
    );

    // Up to every head: the branch, the merge and the depends_on revision.
    let report = migrator.upgrade("heads", &opts()).await.unwrap();
    assert_eq!(report.steps.len(), 4, "{:?}", report.steps);
    expect_everywhere(
        &shards,
        &[D, M],
        &["invoices", "audit_log", "invoice_audit", "report"],
        &[],
    )
    .await;
    let again = migrator.upgrade("heads", &opts()).await.unwrap();
    assert!(again.steps.is_empty(), "nothing applied twice");

    // Remove one branch by label.
    migrator.downgrade("reports@base", &opts()).await.unwrap();
    expect_everywhere(&shards, &[M], &["invoice_audit"], &["report"]).await;

    // Below the merge: both parents become heads again (alembic_version rows).
    migrator.downgrade(C1, &opts()).await.unwrap();
    expect_everywhere(&shards, &[B2, C1], &["audit_log"], &["invoice_audit"]).await;

    // Relative downgrade is ambiguous with two heads.
    assert!(migrator.downgrade("-1", &opts()).await.is_err());

    migrator.downgrade("base", &opts()).await.unwrap();
    expect_everywhere(&shards, &[], &[], &["users", "invoices", "audit_log"]).await;

    // The history is append-only and complete on every shard.
    for c in &shards {
        let rows = c
            .query(
                "SELECT direction, count(*) FROM shardgate.history GROUP BY 1 ORDER BY 1",
                &[],
            )
            .await
            .unwrap();
        let counts: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(counts, [("down".to_string(), 6), ("up".to_string(), 6)]);
        let run_ids: i64 = c
            .query_one("SELECT count(DISTINCT run_id) FROM shardgate.history", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(run_ids, 5);
        let decisions: i64 = c
            .query_one("SELECT count(*) FROM shardgate.decisions", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(decisions, 0, "spent decisions are deleted");
    }
}

#[tokio::test]
async fn a_revision_failing_on_one_shard_changes_no_shard() {
    let db = support::fresh_db("migrate_fail_one");
    let migrator = Migrator::from_config(&config(&db, &fixture("graph"))).unwrap();
    let shards = clients(&db).await;
    migrator.upgrade(A, &opts()).await.unwrap();
    // A conflicting object on s1 only.
    shards[1]
        .batch_execute("CREATE TABLE invoices (x int)")
        .await
        .unwrap();

    let error = migrator.upgrade(C1, &opts()).await.unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, MigrateError::Statement(_)), "{text}");
    assert!(text.contains("shard s1"), "{text}");
    assert!(text.contains("CREATE TABLE invoices"), "{text}");
    assert!(text.contains("already exists"), "{text}");
    assert!(text.contains("b10000000001_invoices/up.sql:5"), "{text}");

    for (i, c) in shards.iter().enumerate() {
        assert_eq!(version_rows(c).await, [A], "s{i}");
        assert_eq!(prepared(c).await, 0, "s{i}");
        let ups: i64 = c
            .query_one("SELECT count(*) FROM shardgate.history", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(ups, 1, "no history row for the failed step on s{i}");
    }
    assert!(!exists(&shards[0], "invoices").await);
    assert!(!exists(&shards[2], "invoices").await);
}

#[tokio::test]
async fn a_held_lock_makes_a_second_migrator_fail_clearly() {
    let db = support::fresh_db("migrate_lock");
    let migrator = Migrator::from_config(&config(&db, &fixture("graph"))).unwrap();
    let shards = clients(&db).await;
    shards[0]
        .query_one(
            "SELECT pg_advisory_lock($1)",
            &[&shardgate::migrate::apply::LOCK_KEY],
        )
        .await
        .unwrap();
    let quick = ApplyOptions {
        lock_wait: Duration::from_millis(500),
        ..ApplyOptions::default()
    };
    let error = migrator.upgrade("heads", &quick).await.unwrap_err();
    assert!(matches!(error, MigrateError::Locked { .. }), "{error}");
    assert!(error.to_string().contains("another migrator"), "{error}");
    // Released: the next run goes through.
    shards[0]
        .query_one(
            "SELECT pg_advisory_unlock($1)",
            &[&shardgate::migrate::apply::LOCK_KEY],
        )
        .await
        .unwrap();
    migrator.upgrade(A, &quick).await.unwrap();
    expect_everywhere(&shards, &[A], &["users"], &[]).await;
}

#[tokio::test]
async fn a_changed_applied_file_is_refused_unless_accepted() {
    let db = support::fresh_db("migrate_changed");
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("graph"), tmp.path());
    let cfg = config(&db, tmp.path());
    Migrator::from_config(&cfg)
        .unwrap()
        .upgrade(A, &opts())
        .await
        .unwrap();
    let up = tmp.path().join("a00000000001_users/up.sql");
    let text = std::fs::read_to_string(&up).unwrap();
    std::fs::write(&up, text.replace("name text NOT NULL", "name text")).unwrap();

    let migrator = Migrator::from_config(&cfg).unwrap();
    let error = migrator.upgrade(B1, &opts()).await.unwrap_err();
    assert!(matches!(error, MigrateError::Changed { .. }), "{error}");
    assert!(error.to_string().contains("--accept-changed"), "{error}");
    assert!(
        error.to_string().contains("a00000000001_users/up.sql"),
        "{error}"
    );

    let accept = ApplyOptions {
        accept_changed: true,
        ..opts()
    };
    migrator.upgrade(B1, &accept).await.unwrap();
    // Accepted once: the next run does not complain.
    migrator.upgrade(C1, &opts()).await.unwrap();
    let shards = clients(&db).await;
    expect_everywhere(&shards, &[C1], &["invoices"], &[]).await;
}

#[tokio::test]
async fn stamp_sets_rows_without_running_sql_and_status_reports_per_shard() {
    let db = support::fresh_db("migrate_stamp");
    let migrator = Migrator::from_config(&config(&db, &fixture("graph"))).unwrap();
    let shards = clients(&db).await;
    let only_s1 = ApplyOptions {
        shards: vec!["s1".into()],
        ..opts()
    };
    migrator.stamp(B1, &only_s1).await.unwrap();
    assert_eq!(version_rows(&shards[1]).await, [B1]);
    assert!(!exists(&shards[1], "users").await, "stamp runs no SQL");

    let status = migrator.status(&opts()).await.unwrap();
    assert_eq!(status.len(), 3);
    assert!(status[0].heads.is_empty());
    assert_eq!(status[0].pending.len(), 6);
    assert_eq!(status[1].heads, [B1]);
    assert_eq!(status[1].pending.len(), 4);

    // Shards that disagree stop `up`.
    let error = migrator.upgrade("heads", &opts()).await.unwrap_err();
    assert!(matches!(error, MigrateError::Divergent(_)), "{error}");
    assert!(error.to_string().contains("s1: b10000000001"), "{error}");

    migrator.stamp("base", &only_s1).await.unwrap();
    migrator.upgrade("heads", &opts()).await.unwrap();
    expect_everywhere(&shards, &[D, M], &["report"], &[]).await;
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
