//! `shardgate migrate verify` against three real shards: identical schemas
//! agree (exit 0); a column added on one shard by hand, a changed column type
//! and a missing index are each named with the shards on each side (exit 1);
//! ledgers that disagree are reported; an unreachable shard exits 2.

mod support;

use std::path::{Path, PathBuf};

use tokio::process::Command;

const REV: &str = "a1b2c3d4e5f6";

/// A map for `db` on the fleet (or `shards` verbatim) with a migrations
/// folder holding one empty revision, in a temporary directory.
fn setup(db: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let migrations = tmp.path().join("migrations");
    let folder = migrations.join(format!("{REV}_first"));
    std::fs::create_dir_all(&folder).expect("migrations folder");
    std::fs::write(
        folder.join("up.sql"),
        format!("-- revision: {REV}\n-- down_revision:\n-- message: first\nSELECT 1;\n"),
    )
    .expect("up.sql");
    let map = support::shard_map(
        db,
        &format!("migrations: {{ dir: \"{}\" }}\n", migrations.display()),
    );
    let path = tmp.path().join("map.yaml");
    std::fs::write(&path, map).expect("map.yaml");
    (tmp, path)
}

/// Runs `shardgate migrate --config MAP ARGS…`: (exit code, stdout, stderr).
async fn migrate(map: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .arg("migrate")
        .arg("--config")
        .arg(map)
        .args(args)
        .output()
        .await
        .expect("running shardgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const SCHEMA: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE SEQUENCE ticket_seq INCREMENT BY 5 START 100;
CREATE TABLE users (
    id bigserial PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text DEFAULT 'anon',
    feeling mood
);
CREATE TABLE t (id int PRIMARY KEY, v integer, user_id bigint REFERENCES users (id), CHECK (v > 0));
CREATE INDEX t_v_idx ON t (v);
CREATE VIEW active_users AS SELECT id, email FROM users WHERE name <> 'anon';
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.name := lower(NEW.name); RETURN NEW; END $$;
CREATE TRIGGER users_touch BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION touch();
";

#[tokio::test]
async fn verify_reports_drift_by_object_and_shard() {
    let db = support::fresh_db("migrate_verify");
    let (_tmp, map) = setup(&db);
    let mut shards = Vec::new();
    for cluster in &support::fleet().clusters {
        let client = support::connect(cluster, &db).await;
        client.batch_execute(SCHEMA).await.expect("schema");
        shards.push(client);
    }

    let (code, out, err) = migrate(&map, &["verify"]).await;
    assert_eq!(code, 0, "identical shards must agree\n{out}\n{err}");
    assert!(out.contains("no drift: all 3 shards agree"), "{out}");
    let digests: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split("fingerprint ").nth(1))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(digests.len(), 3, "{out}");
    assert!(digests.iter().all(|d| *d == digests[0]), "{out}");

    // A column added on one shard by hand.
    shards[1]
        .batch_execute("ALTER TABLE users ADD COLUMN nickname text")
        .await
        .expect("add column");
    let (code, out, err) = migrate(&map, &["verify"]).await;
    assert_eq!(code, 1, "drift must exit 1\n{out}\n{err}");
    assert!(
        out.contains("column public.users.nickname: present on s1, missing on s0, s2"),
        "{out}"
    );
    assert_eq!(
        out.matches("  column ").count(),
        1,
        "only the column: {out}"
    );

    // A changed column type and a dropped index.
    shards[2]
        .batch_execute("ALTER TABLE t ALTER COLUMN v TYPE bigint")
        .await
        .expect("alter type");
    shards[0]
        .batch_execute("DROP INDEX t_v_idx")
        .await
        .expect("drop index");
    let (code, out, err) = migrate(&map, &["verify"]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains("column public.t.v: type integer on s0, s1; bigint on s2"),
        "{out}"
    );
    assert!(
        out.contains("index public.t_v_idx: present on s1, s2, missing on s0"),
        "{out}"
    );
    assert!(out.contains("drift: 3 difference(s)"), "{out}");

    // --shards limits the comparison: s0 and s1 still differ (the column),
    // but the type change on s2 is out of scope.
    let (code, out, _) = migrate(&map, &["verify", "--shards", "s0,s1"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(!out.contains("bigint"), "{out}");

    // Repair by hand: all agree again.
    shards[1]
        .batch_execute("ALTER TABLE users DROP COLUMN nickname")
        .await
        .expect("drop column");
    shards[2]
        .batch_execute("ALTER TABLE t ALTER COLUMN v TYPE integer")
        .await
        .expect("alter type back");
    shards[0]
        .batch_execute("CREATE INDEX t_v_idx ON t (v)")
        .await
        .expect("recreate index");
    let (code, out, err) = migrate(&map, &["verify"]).await;
    assert_eq!(code, 0, "{out}\n{err}");

    // Ledgers that disagree are drift too, even with identical schemas.
    let (code, out, err) = migrate(&map, &["stamp", REV, "--shard", "s1"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = migrate(&map, &["verify"]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains(&format!("ledger heads: base on s0, s2; {REV} on s1")),
        "{out}"
    );
}

#[tokio::test]
async fn verify_library_api_and_function_enum_sequence_drift() {
    let db = support::fresh_db("migrate_verify_lib");
    let (_tmp, map) = setup(&db);
    let mut shards = Vec::new();
    for cluster in &support::fleet().clusters {
        let client = support::connect(cluster, &db).await;
        client.batch_execute(SCHEMA).await.expect("schema");
        shards.push(client);
    }
    shards[0]
        .batch_execute(
            "ALTER TYPE mood ADD VALUE 'meh' BEFORE 'ok'; \
             ALTER SEQUENCE ticket_seq INCREMENT BY 10; \
             CREATE OR REPLACE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;",
        )
        .await
        .expect("drift on s0");
    // An extension on one shard is one line: its own objects (citext has
    // dozens of functions) are not listed one by one.
    shards[2]
        .batch_execute("CREATE EXTENSION citext")
        .await
        .expect("citext");
    let config = shardgate::config::Config::load(&map).expect("map");
    let migrator = shardgate::migrate::Migrator::from_config(&config).expect("migrator");
    let report = migrator
        .verify(&shardgate::migrate::ApplyOptions::default())
        .await
        .expect("verify");
    let lines: Vec<String> = report.drift.iter().map(|d| d.to_string()).collect();
    assert!(!report.agrees());
    assert!(
        lines.contains(&"enum public.mood: labels 'sad', 'meh', 'ok', 'happy' on s0; 'sad', 'ok', 'happy' on s1, s2".to_owned()),
        "{lines:#?}"
    );
    assert!(
        lines.contains(&"sequence public.ticket_seq: increment 10 on s0; 5 on s1, s2".to_owned()),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("function public.touch(): definition ")
                && l.contains("on s1, s2")),
        "{lines:#?}"
    );
    assert!(
        lines.contains(&"extension citext: present on s2, missing on s0, s1".to_owned()),
        "{lines:#?}"
    );
    assert_eq!(lines.len(), 4, "{lines:#?}");
}

#[tokio::test]
async fn verify_exits_2_when_a_shard_is_unreachable() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let migrations = tmp.path().join("migrations");
    std::fs::create_dir_all(&migrations).expect("migrations");
    let map = tmp.path().join("map.yaml");
    std::fs::write(
        &map,
        format!(
            "listen: 127.0.0.1:0\nauth: trust\nusers: [ {{ name: app }} ]\nshards:\n  - {{ name: s0, url: \"postgres://postgres@127.0.0.1:1/app\" }}\nmigrations: {{ dir: \"{}\" }}\n",
            migrations.display()
        ),
    )
    .expect("map.yaml");
    let (code, out, err) = migrate(&map, &["verify"]).await;
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("shard s0: cannot connect"), "{err}");
}
