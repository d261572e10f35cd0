//! Batched revisions against three real shards:
//! - a `kind: data` revision with `batch: key=id size=5000` over 24k+ rows
//!   per shard, interrupted (the process aborts after its 7th committed
//!   batch) and resumed: every row is changed exactly once;
//! - a `scope: tenants` revision run in every tenant schema of each shard,
//!   two schemas per transaction, interrupted and resumed, then reverted.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use shardgate::config::Config;
use shardgate::migrate::{ApplyOptions, Migrator};
use tokio_postgres::Client;

const S1: &str = "b10000000001";
const D1: &str = "b20000000002";
const T1: &str = "c10000000001";
const T2: &str = "c20000000002";

fn write(dir: &Path, id: &str, up: &str, down: Option<&str>) {
    let folder = dir.join(format!("{id}_rev"));
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("up.sql"), up).unwrap();
    if let Some(down) = down {
        std::fs::write(folder.join("down.sql"), down).unwrap();
    }
}

fn write_map(dir: &Path, db: &str, migrations: &Path, extra: &str) -> PathBuf {
    let path = dir.join("map.yaml");
    std::fs::write(
        &path,
        support::shard_map(
            db,
            &format!(
                "migrations: {{ dir: \"{}\" }}\n{extra}",
                migrations.display()
            ),
        ),
    )
    .unwrap();
    path
}

async fn migrate(map: &Path, args: &[&str], crash_after: Option<&str>) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_shardgate"));
    command.args(["migrate", "--config"]).arg(map).args(args);
    if let Some(point) = crash_after {
        command.env("SHARDGATE_MIGRATE_CRASH_AFTER", point);
    }
    command.output().await.unwrap()
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

async fn version_rows(client: &Client) -> Vec<String> {
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

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn data_revision_runs_in_batches_and_resumes_after_an_interruption() {
    let db = support::fresh_db("migrate_batch_data");
    let tmp = tempfile::tempdir().unwrap();
    let migrations = tmp.path().join("migrations");
    write(
        &migrations,
        S1,
        &format!("-- revision: {S1}\nCREATE TABLE items (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0, label text);\n"),
        Some("DROP TABLE items;\n"),
    );
    write(
        &migrations,
        D1,
        &format!(
            "-- revision: {D1}\n-- down_revision: {S1}\n-- kind: data\n-- batch: key=id size=5000\n\
             UPDATE items SET n = n + 1, label = 'item ' || id WHERE {{{{batch}}}};\n"
        ),
        Some("UPDATE items SET n = n - 1, label = NULL;\n"),
    );
    let map = write_map(tmp.path(), &db, &migrations, "");
    let shards = clients(&db).await;

    let out = migrate(&map, &["up", S1], None).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // 24,000 / 25,000 / 26,000 rows, ids with gaps (every third id).
    let sizes = [24_000i64, 25_000, 26_000];
    for (c, size) in shards.iter().zip(sizes) {
        c.batch_execute(&format!(
            "INSERT INTO items (id) SELECT g * 3 FROM generate_series(1, {size}) g"
        ))
        .await
        .unwrap();
    }

    // The plan says how the step runs.
    let out = migrate(&map, &["plan"], None).await;
    assert!(
        text(&out.stdout).contains("data batches of 5000 rows of items by id"),
        "{}",
        text(&out.stdout)
    );

    // Interrupted: the process aborts right after its 7th committed batch.
    let out = migrate(&map, &["up"], Some("batch:7")).await;
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("aborting now"),
        "{}",
        text(&out.stderr)
    );

    let mut batches_total = 0;
    for (i, c) in shards.iter().enumerate() {
        // The version rows did not move; the batches done are committed with
        // their checkpoint, and nothing past the checkpoint was touched.
        assert_eq!(version_rows(c).await, [S1], "s{i}");
        assert_eq!(count(c, "SELECT count(*) FROM items WHERE n > 1").await, 0);
        let row = c
            .query_opt(
                "SELECT batches_done, units_done, checkpoint, finished FROM shardgate.batch_progress WHERE revision = $1",
                &[&D1],
            )
            .await
            .unwrap();
        let changed = count(c, "SELECT count(*) FROM items WHERE n = 1").await;
        match row {
            None => assert_eq!(changed, 0, "s{i}: rows changed without a checkpoint"),
            Some(row) => {
                let batches: i32 = row.get(0);
                let units: i64 = row.get(1);
                let checkpoint: Option<String> = row.get(2);
                let finished: bool = row.get(3);
                batches_total += batches;
                assert_eq!(units, changed, "s{i}: rows changed = rows checkpointed");
                let checkpoint: i64 = checkpoint.unwrap().parse().unwrap();
                assert_eq!(
                    count(
                        c,
                        &format!("SELECT count(*) FROM items WHERE id <= {checkpoint} AND n <> 1")
                    )
                    .await,
                    0,
                    "s{i}: every row up to the checkpoint is done"
                );
                assert_eq!(
                    count(
                        c,
                        &format!("SELECT count(*) FROM items WHERE id > {checkpoint} AND n <> 0")
                    )
                    .await,
                    0,
                    "s{i}: no row after the checkpoint is done"
                );
                if !finished {
                    // Full batches, except that the shard's last batch may be
                    // partial (checkpointed before `finished` was written).
                    let batches = i64::from(batches);
                    assert!(
                        changed <= batches * 5000 && changed > (batches - 1) * 5000,
                        "s{i}: {changed} rows in {batches} batches of 5000"
                    );
                }
            }
        }
    }
    // The abort follows the 7th batch this process saw committed; another
    // shard's COMMIT may already have reached its server (at most one per
    // other shard).
    assert!(
        (7..=9).contains(&batches_total),
        "seven batches (plus in-flight commits) before the abort: {batches_total}"
    );

    // `status` shows the interrupted step.
    let out = migrate(&map, &["status"], None).await;
    assert!(
        text(&out.stdout).contains(&format!("{D1} up: ")),
        "{}",
        text(&out.stdout)
    );

    // The re-run resumes: no row is changed twice, every row once.
    let out = migrate(&map, &["up"], None).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("resumed from a checkpoint"), "{stdout}");
    let mut resumed_batches = 0;
    for line in stdout.lines().filter(|l| l.contains(&format!("{D1}: "))) {
        let n: usize = line
            .split(&format!("{D1}: "))
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line}"));
        resumed_batches += n;
    }
    // 5 + 5 + 6 batches in all (the last batch of each shard is partial).
    assert_eq!(resumed_batches + batches_total as usize, 16, "{stdout}");
    for (i, (c, size)) in shards.iter().zip(sizes).enumerate() {
        assert_eq!(version_rows(c).await, [D1], "s{i}");
        assert_eq!(
            count(c, "SELECT count(*) FROM items WHERE n = 1").await,
            size,
            "s{i}"
        );
        assert_eq!(
            count(
                c,
                "SELECT count(*) FROM items WHERE label IS DISTINCT FROM 'item ' || id"
            )
            .await,
            0
        );
        assert_eq!(
            count(c, "SELECT count(*) FROM shardgate.batch_progress").await,
            0
        );
        assert_eq!(
            count(c, &format!("SELECT count(*) FROM shardgate.history WHERE revision = '{D1}' AND direction = 'up'")).await,
            1,
            "s{i}: one history row for the data revision"
        );
        assert_eq!(
            count(
                c,
                "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()"
            )
            .await,
            0
        );
    }

    // down.sql has no {{batch}}: it runs as one ordinary atomic group.
    let out = migrate(&map, &["down", S1], None).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    for c in &shards {
        assert_eq!(version_rows(c).await, [S1]);
        assert_eq!(count(c, "SELECT count(*) FROM items WHERE n <> 0").await, 0);
    }
}

/// Tenant schemas per shard, plus schemas that are not tenants.
const TENANTS: [&[&str]; 3] = [
    &["tenant_acme", "tenant_bolt", "tenant_cyan"],
    &["tenant_dune", "tenant_echo"],
    &[
        "tenant_fawn",
        "tenant_gulf",
        "tenant_hive",
        "tenant_iris",
        "tenant_jade",
    ],
];

async fn tables_in(c: &Client, table: &str) -> Vec<String> {
    c.query(
        "SELECT table_schema::text FROM information_schema.tables WHERE table_name = $1 ORDER BY 1",
        &[&table],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test]
async fn tenant_revisions_run_in_every_tenant_schema_in_batches() {
    let db = support::fresh_db("migrate_batch_tenants");
    let tmp = tempfile::tempdir().unwrap();
    let migrations = tmp.path().join("migrations");
    write(
        &migrations,
        T1,
        &format!("-- revision: {T1}\n-- scope: tenants\n-- batch: size=2\nCREATE TABLE notes (id int PRIMARY KEY, body text);\n"),
        Some("DROP TABLE notes;\n"),
    );
    write(
        &migrations,
        T2,
        &format!("-- revision: {T2}\n-- down_revision: {T1}\n-- scope: tenants\n-- batch: size=2\nALTER TABLE notes ADD COLUMN created_at timestamptz;\nINSERT INTO notes VALUES (1, current_schema());\n"),
        Some("ALTER TABLE notes DROP COLUMN created_at;\nDELETE FROM notes;\n"),
    );
    // The map lists only some tenants: the template finds the others.
    let extra = "functions:\n  tenant_schema: { kind: tenant, mode: schema, schema_template: \"tenant_{tenant}\", tenants: { acme: s0 }, default: s0 }\n";
    let map = write_map(tmp.path(), &db, &migrations, extra);
    let shards = clients(&db).await;
    for (c, tenants) in shards.iter().zip(TENANTS) {
        let mut sql = String::from("CREATE SCHEMA other; CREATE SCHEMA tenant;");
        for t in tenants {
            sql.push_str(&format!("CREATE SCHEMA {t};"));
        }
        c.batch_execute(&sql).await.unwrap();
    }

    // Interrupted after the 3rd committed batch of schemas.
    let out = migrate(&map, &["up", T1], Some("batch:3")).await;
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let mut migrated = 0;
    for (i, c) in shards.iter().enumerate() {
        assert_eq!(version_rows(c).await, Vec::<String>::new());
        let here = tables_in(c, "notes").await.len() as i64;
        // Schemas migrated = schemas checkpointed: a batch commits with its checkpoint.
        let checkpointed = count(
            c,
            "SELECT coalesce(sum(units_done), 0)::bigint FROM shardgate.batch_progress",
        )
        .await;
        assert_eq!(here, checkpointed, "s{i}");
        migrated += here;
    }
    // 6 batches in all (2 + 1 + 3); the abort came after the 3rd (at most two
    // more in flight on other shards).
    assert!(
        (3..10).contains(&migrated),
        "interrupted part-way: {migrated}"
    );

    let out = migrate(&map, &["up"], None).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("resumed from a checkpoint"), "{stdout}");
    for (i, (c, tenants)) in shards.iter().zip(TENANTS).enumerate() {
        assert_eq!(version_rows(c).await, [T2], "s{i}");
        // Only tenant schemas: not public, `other`, nor `tenant` (no id).
        assert_eq!(tables_in(c, "notes").await, tenants.to_vec(), "s{i}");
        for t in tenants {
            let rows = c
                .query(&format!("SELECT id, body FROM {t}.notes"), &[])
                .await
                .unwrap();
            assert_eq!(rows.len(), 1, "{t}: the insert ran once in this schema");
            assert_eq!(rows[0].get::<_, String>(1), *t);
            assert_eq!(
                count(c, &format!("SELECT count(*) FROM information_schema.columns WHERE table_schema = '{t}' AND column_name = 'created_at'")).await,
                1
            );
        }
    }

    // The offline script runs the revision in each schema found on the shard.
    let fresh = support::fresh_db("migrate_batch_tenants_offline");
    std::fs::create_dir_all(tmp.path().join("offline")).unwrap();
    let offline_map = write_map(&tmp.path().join("offline"), &fresh, &migrations, extra);
    let fresh_shards = clients(&fresh).await;
    for (c, tenants) in fresh_shards.iter().zip(TENANTS) {
        for t in tenants {
            c.batch_execute(&format!("CREATE SCHEMA {t};"))
                .await
                .unwrap();
        }
    }
    let scripts = tmp.path().join("sql");
    let out = migrate(
        &offline_map,
        &["plan", "--sql", scripts.to_str().unwrap()],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    for i in 0..3 {
        let script = std::fs::read_to_string(scripts.join(format!("s{i}.sql"))).unwrap();
        let fresh = fresh.clone();
        tokio::task::spawn_blocking(move || {
            support::fleet().clusters[i].psql(&fresh, &script).unwrap()
        })
        .await
        .unwrap();
    }
    for (i, (c, tenants)) in fresh_shards.iter().zip(TENANTS).enumerate() {
        assert_eq!(
            tables_in(c, "notes").await,
            tenants.to_vec(),
            "offline s{i}"
        );
        assert_eq!(version_rows(c).await, [T2], "offline s{i}");
    }

    // Down to base through the library: every tenant schema reverted.
    let config = Config::load(&map).unwrap();
    let report = Migrator::from_config(&config)
        .unwrap()
        .downgrade("base", &ApplyOptions::default())
        .await
        .unwrap();
    assert_eq!(report.steps.len(), 2);
    for (result, tenants) in report.per_shard.iter().zip(TENANTS) {
        let schemas: u64 = result.batches.iter().map(|(_, b)| b.units).sum();
        assert_eq!(schemas, 2 * tenants.len() as u64, "{result:?}");
    }
    for c in &shards {
        assert!(tables_in(c, "notes").await.is_empty());
        assert!(version_rows(c).await.is_empty());
    }
}
