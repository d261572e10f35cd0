//! `plan` and `plan --sql`: the offline scripts, applied with psql to fresh
//! shards, give the same schema (the same `verify` fingerprint) and ledger
//! as `up`.

mod support;

use std::path::Path;

use shardgate::config::Config;
use shardgate::migrate::{ApplyOptions, Migrator};

fn write_map(dir: &Path, db: &str) -> std::path::PathBuf {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/migrations/graph");
    let path = dir.join(format!("{db}.yaml"));
    std::fs::write(
        &path,
        support::shard_map(
            db,
            &format!("migrations: {{ dir: \"{}\" }}\n", fixtures.display()),
        ),
    )
    .unwrap();
    path
}

/// Columns (with types, defaults, nullability) and views of `public`, plus the version rows.
async fn fingerprint(client: &tokio_postgres::Client) -> Vec<String> {
    let rows = client
        .query(
            "SELECT table_name || '.' || column_name || ' ' || data_type || ' ' || coalesce(column_default, '') || ' ' || is_nullable \
             FROM information_schema.columns WHERE table_schema = 'public' \
             UNION ALL SELECT 'view ' || viewname || ': ' || definition FROM pg_views WHERE schemaname = 'public' \
             UNION ALL SELECT 'version ' || version_num FROM shardgate.version ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test]
async fn offline_sql_matches_up() {
    let online = support::fresh_db("migrate_plan_online");
    let offline = support::fresh_db("migrate_plan_offline");
    let tmp = tempfile::tempdir().unwrap();

    let map = write_map(tmp.path(), &online);
    let config = Config::load(&map).unwrap();
    Migrator::from_config(&config)
        .unwrap()
        .upgrade("heads", &ApplyOptions::default())
        .await
        .unwrap();

    let map = write_map(tmp.path(), &offline);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args(["migrate", "--config"])
        .arg(&map)
        .args(["plan", "heads"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("-- step 6 (one atomic group on every shard)"),
        "{text}"
    );
    assert!(text.contains("CREATE TABLE users"), "{text}");

    let scripts = tmp.path().join("sql");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args(["migrate", "--config"])
        .arg(&map)
        .args(["plan", "heads", "--sql"])
        .arg(&scripts)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for i in 0..support::fleet().clusters.len() {
        let script = std::fs::read_to_string(scripts.join(format!("s{i}.sql"))).unwrap();
        let db = offline.clone();
        tokio::task::spawn_blocking(move || {
            support::fleet().clusters[i]
                .psql(&db, &script)
                .unwrap_or_else(|e| panic!("s{i}.sql: {e}"))
        })
        .await
        .unwrap();
    }
    // The catalog fingerprint `verify` computes (columns, types, defaults,
    // constraints, indexes, views, functions…), shard by shard.
    let online_fp = Migrator::from_config(&config)
        .unwrap()
        .verify(&ApplyOptions::default())
        .await
        .unwrap();
    let offline_fp = Migrator::from_config(&Config::load(&map).unwrap())
        .unwrap()
        .verify(&ApplyOptions::default())
        .await
        .unwrap();
    assert!(online_fp.agrees() && offline_fp.agrees());
    assert_eq!(online_fp.fingerprints.len(), 3);
    for ((shard, a), (shard_b, b)) in online_fp.fingerprints.iter().zip(&offline_fp.fingerprints) {
        assert_eq!(shard, shard_b);
        assert!(a.objects.len() > 5, "{shard}: {:?}", a.objects.keys());
        assert_eq!(a.objects, b.objects, "{shard}");
        assert_eq!(a.digest(), b.digest(), "{shard}");
    }
    assert_eq!(online_fp.heads, offline_fp.heads);

    for (i, cluster) in support::fleet().clusters.iter().enumerate() {
        let a = fingerprint(&support::connect(cluster, &online).await).await;
        let b = fingerprint(&support::connect(cluster, &offline).await).await;
        assert!(
            a.iter().any(|l| l.starts_with("view invoice_audit")),
            "{a:?}"
        );
        assert_eq!(a, b, "s{i}");
    }

    // The ledger written by the scripts is one `up` understands: nothing to do.
    let report = Migrator::from_config(&Config::load(&map).unwrap())
        .unwrap()
        .upgrade("heads", &ApplyOptions::default())
        .await
        .unwrap();
    assert!(report.steps.is_empty());
}
