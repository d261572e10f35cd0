//! Non-transactional revisions against three real shards: a
//! `CREATE UNIQUE INDEX CONCURRENTLY` that fails on one shard (duplicate
//! data) leaves the heads unchanged everywhere and an invalid index on that
//! shard; after the data is fixed, a re-run resumes there (the finished shard
//! is not rebuilt, the invalid index is dropped and rebuilt), and every shard
//! ends with valid indexes, the same version rows and the same history.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use shardgate::config::Config;
use shardgate::migrate::{ApplyOptions, MigrateError, Migrator};
use tokio_postgres::Client;

const R1: &str = "aaaaaaaaaaa1";
const R2: &str = "bbbbbbbbbbb2";

fn write_revisions(dir: &Path) {
    let r1 = dir.join(format!("{R1}_items"));
    std::fs::create_dir_all(&r1).expect("r1");
    std::fs::write(
        r1.join("up.sql"),
        format!("-- revision: {R1}\n-- down_revision:\n-- message: items\nCREATE TABLE items (id int NOT NULL, code text);\n"),
    )
    .expect("r1 up");
    std::fs::write(r1.join("down.sql"), "DROP TABLE items;\n").expect("r1 down");
    let r2 = dir.join(format!("{R2}_indexes"));
    std::fs::create_dir_all(&r2).expect("r2");
    std::fs::write(
        r2.join("up.sql"),
        format!(
            "-- revision: {R2}\n-- down_revision: {R1}\n-- transactional: false\n-- message: indexes\n\
             CREATE INDEX CONCURRENTLY items_id_idx ON items (id);\n\
             CREATE UNIQUE INDEX CONCURRENTLY items_code_key ON items (code);\n"
        ),
    )
    .expect("r2 up");
    std::fs::write(
        r2.join("down.sql"),
        "DROP INDEX CONCURRENTLY items_code_key;\nDROP INDEX CONCURRENTLY items_id_idx;\n",
    )
    .expect("r2 down");
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

async fn version_rows(client: &Client) -> Vec<String> {
    client
        .query(
            "SELECT version_num::text FROM shardgate.version ORDER BY 1",
            &[],
        )
        .await
        .expect("version rows")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// (index name, valid, oid) of the `items` indexes.
async fn indexes(client: &Client) -> Vec<(String, bool, u32)> {
    client
        .query(
            "SELECT c.relname::text, x.indisvalid, c.oid FROM pg_index x \
             JOIN pg_class c ON c.oid = x.indexrelid \
             WHERE x.indrelid = 'items'::regclass ORDER BY 1",
            &[],
        )
        .await
        .expect("indexes")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The history without times and client: (revision, direction, checksum, run id).
async fn history(client: &Client) -> Vec<(String, String, Option<String>, String)> {
    client
        .query(
            "SELECT revision::text, direction, checksum, run_id FROM shardgate.history ORDER BY id",
            &[],
        )
        .await
        .expect("history")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

#[tokio::test]
async fn create_index_concurrently_resumes_after_a_failure_on_one_shard() {
    let db = support::fresh_db("migrate_nontx");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir: PathBuf = tmp.path().join("migrations");
    write_revisions(&dir);
    let migrator = Migrator::from_config(&config(&db, &dir)).expect("migrator");
    let mut shards = Vec::new();
    for cluster in &support::fleet().clusters {
        shards.push(support::connect(cluster, &db).await);
    }

    migrator.upgrade(R1, &opts()).await.expect("up to R1");
    for (i, c) in shards.iter().enumerate() {
        c.batch_execute(&format!(
            "INSERT INTO items SELECT g, 's{i}-' || g FROM generate_series(1, 50) g"
        ))
        .await
        .expect("data");
    }
    // Duplicate codes on s1 only: its unique index build fails.
    shards[1]
        .batch_execute("INSERT INTO items VALUES (1000, 's1-7')")
        .await
        .expect("duplicate");

    let error = migrator
        .upgrade("heads", &opts())
        .await
        .expect_err("the unique index must fail on s1");
    let MigrateError::Statement(failure) = &error else {
        panic!("expected a statement failure, got {error}");
    };
    assert_eq!(failure.shard, "s1", "{error}");
    assert_eq!(failure.revision, R2);
    assert!(
        failure.statement.contains("items_code_key"),
        "{}",
        failure.statement
    );
    assert!(failure.message.contains("finished on s0"), "{error}");

    // Heads did not move anywhere; s0 is fully built, s1 has an invalid
    // unique index, s2 was not touched.
    for (i, c) in shards.iter().enumerate() {
        assert_eq!(version_rows(c).await, [R1], "version rows on s{i}");
    }
    let s0_before = indexes(&shards[0]).await;
    assert_eq!(
        s0_before
            .iter()
            .map(|(n, v, _)| (n.as_str(), *v))
            .collect::<Vec<_>>(),
        [("items_code_key", true), ("items_id_idx", true)]
    );
    let s1_before = indexes(&shards[1]).await;
    assert_eq!(
        s1_before
            .iter()
            .map(|(n, v, _)| (n.as_str(), *v))
            .collect::<Vec<_>>(),
        [("items_code_key", false), ("items_id_idx", true)]
    );
    assert!(indexes(&shards[2]).await.is_empty());
    // verify sees the half-applied state as drift.
    let report = migrator.verify(&opts()).await.expect("verify");
    let drift: Vec<String> = report.drift.iter().map(|d| d.to_string()).collect();
    assert_eq!(
        drift,
        [
            "index public.items_code_key: present on s0, s1, missing on s2",
            "index public.items_code_key: state valid on s0; INVALID on s1",
            "index public.items_id_idx: present on s0, s1, missing on s2",
        ]
    );

    // status shows where each shard stopped.
    let statuses = migrator.status(&opts()).await.expect("status");
    let partial: Vec<(&str, usize)> = statuses
        .iter()
        .map(|s| (s.shard.as_str(), s.partial.len()))
        .collect();
    assert_eq!(partial, [("s0", 1), ("s1", 1), ("s2", 0)]);
    assert!(
        statuses[1].partial[0].starts_with(&format!("{R2} up: 1 statement(s) done")),
        "{:?}",
        statuses[1].partial
    );

    // Fix the data and re-run: s1 resumes at the unique index.
    shards[1]
        .batch_execute("DELETE FROM items WHERE id = 1000")
        .await
        .expect("fix data");
    let report = migrator.upgrade("heads", &opts()).await.expect("re-run");
    assert_eq!(report.steps, [(R2.to_owned(), "up")]);

    for (i, c) in shards.iter().enumerate() {
        assert_eq!(version_rows(c).await, [R2], "version rows on s{i}");
        let now = indexes(c).await;
        assert_eq!(
            now.iter()
                .map(|(n, v, _)| (n.as_str(), *v))
                .collect::<Vec<_>>(),
            [("items_code_key", true), ("items_id_idx", true)],
            "indexes on s{i}"
        );
        let progress: i64 = c
            .query_one("SELECT count(*) FROM shardgate.nontx_progress", &[])
            .await
            .expect("progress")
            .get(0);
        assert_eq!(progress, 0, "progress rows left on s{i}");
    }
    // s0 was not rebuilt; s1 kept its valid id index and rebuilt the invalid one.
    assert_eq!(indexes(&shards[0]).await, s0_before);
    let s1_after = indexes(&shards[1]).await;
    assert_ne!(s1_after[0].2, s1_before[0].2, "invalid index not rebuilt");
    assert_eq!(
        s1_after[1].2, s1_before[1].2,
        "valid index rebuilt needlessly"
    );

    let h0 = history(&shards[0]).await;
    assert_eq!(h0.len(), 2, "{h0:?}");
    for (i, c) in shards.iter().enumerate().skip(1) {
        assert_eq!(history(c).await, h0, "history on s{i}");
    }
    let report = migrator.verify(&opts()).await.expect("verify");
    assert!(report.agrees(), "{:#?}", report.drift);

    // And back down, non-transactionally too.
    migrator.downgrade(R1, &opts()).await.expect("down to R1");
    for (i, c) in shards.iter().enumerate() {
        assert_eq!(version_rows(c).await, [R1], "version rows on s{i}");
        assert!(indexes(c).await.is_empty(), "indexes left on s{i}");
    }
}

/// Progress is trusted only while no other step moved the shard: after a
/// partial R2, `down base` drops the table (and s0's finished indexes), so
/// the next `up` must build R2 again on s0 instead of skipping it.
#[tokio::test]
async fn stale_progress_is_not_trusted_after_other_steps() {
    let db = support::fresh_db("migrate_nontx_stale");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir: PathBuf = tmp.path().join("migrations");
    write_revisions(&dir);
    let migrator = Migrator::from_config(&config(&db, &dir)).expect("migrator");
    let mut shards = Vec::new();
    for cluster in &support::fleet().clusters {
        shards.push(support::connect(cluster, &db).await);
    }
    migrator.upgrade(R1, &opts()).await.expect("up to R1");
    shards[1]
        .batch_execute("INSERT INTO items VALUES (1, 'dup'), (2, 'dup')")
        .await
        .expect("duplicates");
    migrator
        .upgrade("heads", &opts())
        .await
        .expect_err("fails on s1");
    migrator
        .downgrade("base", &opts())
        .await
        .expect("down base");
    migrator.upgrade("heads", &opts()).await.expect("up again");
    for (i, c) in shards.iter().enumerate() {
        assert_eq!(version_rows(c).await, [R2], "version rows on s{i}");
        assert_eq!(
            indexes(c)
                .await
                .iter()
                .map(|(n, v, _)| (n.as_str(), *v))
                .collect::<Vec<_>>(),
            [("items_code_key", true), ("items_id_idx", true)],
            "indexes on s{i}"
        );
    }
}
