//! Several migration sets in one shard map (`migrations.sets`): the shards'
//! own tree and a tree for a separate database, each with its own ledger,
//! chosen with `shardgate migrate --set NAME`.

mod support;

use std::path::Path;

use support::{connect, fleet, fresh_db};

fn revision(dir: &Path, id: &str, parent: &str, sql: &str) {
    let folder = dir.join(format!("{id}_step"));
    std::fs::create_dir_all(&folder).expect("revision folder");
    std::fs::write(
        folder.join("up.sql"),
        format!("-- revision: {id}\n-- down_revision: {parent}\n-- message: step\n{sql}\n"),
    )
    .expect("up.sql");
}

async fn migrate(map: &Path, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .arg("migrate")
        .arg("--config")
        .arg(map)
        .args(args)
        .output()
        .await
        .expect("run shardgate migrate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn has_table(cluster: usize, db: &str, table: &str) -> bool {
    connect(&fleet().clusters[cluster], db)
        .await
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .expect("regclass")
        .get(0)
}

#[tokio::test]
async fn each_migration_set_has_its_own_tree_and_ledger() {
    let shards_db = fresh_db("sets_shards");
    let reporting_db = fresh_db("sets_reporting");
    let tmp = tempfile::tempdir().expect("tempdir");
    let main = tmp.path().join("main");
    let reporting = tmp.path().join("reporting");
    revision(
        &main,
        "aaaaaaaaaaa1",
        "none",
        "CREATE TABLE orders (id int PRIMARY KEY);",
    );
    revision(
        &reporting,
        "bbbbbbbbbbb1",
        "none",
        "CREATE TABLE daily (day date PRIMARY KEY);",
    );
    revision(
        &reporting,
        "bbbbbbbbbbb2",
        "bbbbbbbbbbb1",
        "ALTER TABLE daily ADD COLUMN total numeric;",
    );
    let mut map = support::shard_map(&shards_db, "");
    map.push_str(&format!(
        "migrations:\n  dir: \"{}\"\n  sets:\n    reporting:\n      dir: \"{}\"\n      databases:\n        - {{ name: rep, url: \"{}\" }}\n",
        main.display(),
        reporting.display(),
        fleet().clusters[0].url(&reporting_db)
    ));
    let map_path = tmp.path().join("map.yaml");
    std::fs::write(&map_path, &map).expect("map");

    let (ok, out) = migrate(&map_path, &["--set", "reporting", "up"]).await;
    assert!(ok, "{out}");
    assert!(has_table(0, &reporting_db, "daily").await);
    for i in 0..fleet().clusters.len() {
        assert!(
            !has_table(i, &shards_db, "orders").await,
            "shards untouched by the set"
        );
        assert!(!has_table(i, &shards_db, "daily").await);
    }
    let (ok, out) = migrate(&map_path, &["up"]).await;
    assert!(ok, "{out}");
    for i in 0..fleet().clusters.len() {
        assert!(
            has_table(i, &shards_db, "orders").await,
            "shard {i} migrated"
        );
    }
    assert!(
        !has_table(0, &reporting_db, "orders").await,
        "the set's database untouched"
    );
    // Each ledger holds its own tree's head.
    let version: String = connect(&fleet().clusters[0], &reporting_db)
        .await
        .query_one("SELECT version_num FROM shardgate.version", &[])
        .await
        .expect("set ledger")
        .get(0);
    assert_eq!(version, "bbbbbbbbbbb2");
    let (ok, out) = migrate(&map_path, &["--set", "reporting", "heads"]).await;
    assert!(ok && out.contains("bbbbbbbbbbb2"), "{out}");

    // An unknown set and a set sharing a shard's database are refused.
    let (ok, out) = migrate(&map_path, &["--set", "nope", "status"]).await;
    assert!(!ok && out.contains("no migration set `nope`"), "{out}");
    let shared = map.replace(
        &fleet().clusters[0].url(&reporting_db),
        &fleet().clusters[0].url(&shards_db),
    );
    std::fs::write(&map_path, shared).expect("map");
    let (ok, out) = migrate(&map_path, &["--set", "reporting", "status"]).await;
    assert!(
        !ok && out.contains("each set needs databases of its own"),
        "{out}"
    );
}

#[test]
fn a_malformed_set_is_reported_with_its_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("map.yaml");
    std::fs::write(
        &path,
        "listen: 127.0.0.1:0\nauth: trust\nusers: [ { name: app } ]\nshards:\n  - { name: s0, url: \"postgres://postgres@127.0.0.1:1/app\" }\nmigrations:\n  sets:\n    reporting:\n      dir: x\n",
    )
    .expect("map");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("check");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains(":9:10: migration set `reporting` needs `databases`"),
        "{text}"
    );
}
