//! Shards at different revisions (`up` refuses, naming each shard's
//! revisions; `--allow-divergent` brings each from its own revisions to the
//! target), the per-shard applied history in the CLI (`history --shard`,
//! `status --verbose`), and the library API returning per-shard results.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use shardgate::config::Config;
use shardgate::migrate::{ApplyOptions, Direction, MigrateError, Migrator};
use tokio_postgres::Client;

const R1: &str = "f10000000001";
const R2: &str = "f20000000002";
const R3: &str = "f30000000003";

fn write_revisions(dir: &Path) {
    let revs = [
        (R1, "none", "CREATE TABLE t1 (id int);", "DROP TABLE t1;"),
        (R2, R1, "CREATE TABLE t2 (id int);", "DROP TABLE t2;"),
        (R3, R2, "CREATE TABLE t3 (id int);", "DROP TABLE t3;"),
    ];
    for (id, parent, up, down) in revs {
        let folder = dir.join(format!("{id}_table"));
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(
            folder.join("up.sql"),
            format!("-- revision: {id}\n-- down_revision: {parent}\n{up}\n"),
        )
        .unwrap();
        std::fs::write(folder.join("down.sql"), format!("{down}\n")).unwrap();
    }
}

fn setup(test: &str) -> (String, tempfile::TempDir, PathBuf) {
    let db = support::fresh_db(test);
    let tmp = tempfile::tempdir().unwrap();
    let migrations = tmp.path().join("migrations");
    write_revisions(&migrations);
    let map = tmp.path().join("map.yaml");
    std::fs::write(
        &map,
        support::shard_map(
            &db,
            &format!("migrations: {{ dir: \"{}\" }}\n", migrations.display()),
        ),
    )
    .unwrap();
    (db, tmp, map)
}

fn migrator(map: &Path) -> Migrator {
    Migrator::from_config(&Config::load(map).unwrap()).unwrap()
}

fn only(shard: &str) -> ApplyOptions {
    ApplyOptions {
        shards: vec![shard.to_string()],
        ..ApplyOptions::default()
    }
}

async fn migrate(map: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args(["migrate", "--config"])
        .arg(map)
        .args(args)
        .output()
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn clients(db: &str) -> Vec<Client> {
    let mut out = Vec::new();
    for cluster in &support::fleet().clusters {
        out.push(support::connect(cluster, db).await);
    }
    out
}

/// (revision, direction) of the shard's history rows, oldest first.
async fn history(c: &Client) -> Vec<(String, String)> {
    c.query(
        "SELECT revision::text, direction FROM shardgate.history ORDER BY id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

fn ups(ids: &[&str]) -> Vec<(String, String)> {
    ids.iter()
        .map(|i| (i.to_string(), "up".to_string()))
        .collect()
}

#[tokio::test]
async fn divergent_shards_are_refused_unless_allowed() {
    let (db, _tmp, map) = setup("migrate_divergent");
    let m = migrator(&map);
    // s0 at R2, s1 at R1, s2 at base.
    m.upgrade(R2, &only("s0")).await.unwrap();
    m.upgrade(R1, &only("s1")).await.unwrap();

    let error = m
        .upgrade("heads", &ApplyOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(error, MigrateError::Divergent(_)), "{error}");
    let message = error.to_string();
    assert!(
        message.contains(&format!("s0: {R2}; s1: {R1}; s2: base")),
        "{message}"
    );
    assert!(message.contains("--allow-divergent"), "{message}");
    let out = migrate(&map, &["up"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(&format!("s0: {R2}; s1: {R1}; s2: base")),
        "{}",
        text(&out.stderr)
    );
    let shards = clients(&db).await;
    assert_eq!(history(&shards[2]).await, ups(&[]), "nothing ran on s2");

    // The plan of each group of shards.
    let out = migrate(&map, &["plan", "--allow-divergent"]).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let groups: Vec<&str> = stdout.split("shards ").skip(1).collect();
    assert_eq!(groups.len(), 3, "{stdout}");
    assert!(
        groups[0].starts_with(&format!("s0:\nfrom: {R2}")),
        "{stdout}"
    );
    assert_eq!(groups[0].matches("-- step").count(), 1, "{stdout}");
    assert!(groups[2].starts_with("s2:\nfrom: base"), "{stdout}");
    assert_eq!(groups[2].matches("-- step").count(), 3, "{stdout}");
    let out = migrate(&map, &["plan"]).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--allow-divergent"));

    // Allowed: each shard from its own revisions to the target.
    let out = migrate(&map, &["up", "--allow-divergent"]).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.contains(&format!("s0: from {R2}: up {R3}")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("s1: from {R1}: up {R2}, up {R3}")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("s2: from base: up {R1}, up {R2}, up {R3}")),
        "{stdout}"
    );
    for (i, c) in shards.iter().enumerate() {
        assert_eq!(
            history(c).await,
            ups(&[R1, R2, R3]),
            "s{i}: each revision once"
        );
        let version: String = c
            .query_one("SELECT version_num::text FROM shardgate.version", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(version, R3);
    }
    // Converged: a plain `up` has nothing to do.
    let report = m.upgrade("heads", &ApplyOptions::default()).await.unwrap();
    assert!(report.steps.is_empty());

    // Per-shard applied history in the CLI.
    let out = migrate(&map, &["history", "--shard", "s1"]).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "s1:", "{stdout}");
    assert_eq!(lines.len(), 4, "{stdout}");
    let checksum = m.graph().get(R2).unwrap().checksum.clone();
    assert!(lines[2].contains(&format!("{R2} up")), "{stdout}");
    assert!(
        lines[2].contains(&format!("checksum {checksum}")),
        "{stdout}"
    );
    assert!(
        lines[2].contains(" run ") && lines[2].contains(" started 20"),
        "{stdout}"
    );
    assert!(lines[2].contains(" by postgres"), "{stdout}");
    let out = migrate(&map, &["status", "--verbose"]).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for shard in ["s0", "s1", "s2"] {
        assert!(stdout.contains(&format!("{shard} history:")), "{stdout}");
    }
    assert_eq!(stdout.matches(&format!("{R3} up")).count(), 3, "{stdout}");
}

/// The library API (`shardgate::migrate`): the operations the CLI runs,
/// with per-shard results.
#[tokio::test]
async fn library_api_returns_per_shard_results() {
    let (db, _tmp, map) = setup("migrate_library");
    let m = migrator(&map);
    let opts = ApplyOptions::default();

    let plan = m.plan("heads", Direction::Up, &opts).await.unwrap();
    assert_eq!(plan.steps.len(), 3);
    let statuses = m.status(&opts).await.unwrap();
    assert_eq!(statuses.len(), 3);
    assert!(statuses
        .iter()
        .all(|s| s.pending.len() == 3 && s.heads.is_empty()));

    let report = m.upgrade(R2, &opts).await.unwrap();
    assert_eq!(report.per_shard.len(), 3);
    for (i, shard) in report.per_shard.iter().enumerate() {
        assert_eq!(shard.shard, format!("s{i}"));
        assert!(shard.from.is_empty());
        assert_eq!(
            shard.steps,
            vec![(R1.to_string(), "up"), (R2.to_string(), "up")]
        );
        assert_eq!(shard.heads, vec![R2.to_string()]);
    }

    let applied = m.applied_history(&opts).await.unwrap();
    let shards = clients(&db).await;
    for ((name, rows), c) in applied.iter().zip(&shards) {
        assert_eq!(rows.len(), 2, "{name}");
        assert!(rows.iter().all(|r| r.run_id == report.run_id));
        assert_eq!(
            rows.iter()
                .map(|r| (r.revision.clone(), r.direction.clone()))
                .collect::<Vec<_>>(),
            history(c).await
        );
    }

    let verify = m.verify(&opts).await.unwrap();
    assert!(verify.agrees());
    assert!(verify
        .heads
        .iter()
        .all(|(_, heads)| heads == &vec![R2.to_string()]));

    let report = m.downgrade("base", &opts).await.unwrap();
    for shard in &report.per_shard {
        assert_eq!(
            shard.steps,
            vec![(R2.to_string(), "down"), (R1.to_string(), "down")]
        );
        assert!(shard.heads.is_empty());
    }
    for c in &shards {
        let tables: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE tablename IN ('t1', 't2', 't3')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(tables, 0);
    }
}

/// Several migration sets (the "versioning multiple databases"),
/// through the library: one set for the shards, one for a separate
/// unsharded database, each with its own ledger and lock. (The map has a
/// single `migrations.dir`, so the CLI runs one set per map.)
#[tokio::test]
async fn two_migration_sets_on_disjoint_databases_keep_their_own_ledgers() {
    let (db, tmp, map) = setup("migrate_sets_shards");
    let shards_set = migrator(&map);
    let other_db = support::fresh_db("migrate_sets_reporting");
    let cluster = &support::fleet().clusters[0];
    let reporting = shardgate::config::ShardConfig {
        name: "reporting".into(),
        url: cluster.url(&other_db),
        host: cluster.host().to_string(),
        port: cluster.port(),
        user: "postgres".into(),
        password: None,
        database: other_db.clone(),
    };
    let reporting_dir = tmp.path().join("reporting");
    let folder = reporting_dir.join("e10000000001_daily");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("up.sql"),
        "-- revision: e10000000001\nCREATE TABLE daily (day date PRIMARY KEY, total numeric);\n",
    )
    .unwrap();
    let reporting_set = Migrator::new(vec![reporting], &reporting_dir).unwrap();

    let opts = ApplyOptions::default();
    let (a, b) = tokio::join!(
        shards_set.upgrade("heads", &opts),
        reporting_set.upgrade("heads", &opts)
    );
    assert_eq!(a.unwrap().per_shard.len(), 3);
    let b = b.unwrap();
    assert_eq!(b.per_shard[0].shard, "reporting");
    assert_eq!(b.heads, vec!["e10000000001".to_string()]);

    let shards = clients(&db).await;
    for c in &shards {
        assert_eq!(history(c).await, ups(&[R1, R2, R3]));
    }
    let other = support::connect(cluster, &other_db).await;
    assert_eq!(history(&other).await, ups(&["e10000000001"]));
    assert!(shards_set
        .status(&ApplyOptions::default())
        .await
        .unwrap()
        .iter()
        .all(|s| s.pending.is_empty()));
    assert!(reporting_set
        .status(&ApplyOptions::default())
        .await
        .unwrap()[0]
        .pending
        .is_empty());
}
