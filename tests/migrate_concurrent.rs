//! Two `shardgate migrate up` processes started at once on the same fleet:
//! one applies, the other waits for the migration lock (then finds nothing
//! to do) or, with `--lock-wait 0`, fails clearly. Nothing is applied twice.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

const R1: &str = "a10000000001";
const R2: &str = "a20000000002";
const R3: &str = "a30000000003";

/// Three revisions; the first sleeps so the two runs surely overlap.
fn write_revisions(dir: &Path) {
    let revs = [
        (
            R1,
            "none",
            "SELECT pg_sleep(1.5);\nCREATE TABLE accounts (id bigint PRIMARY KEY, name text);",
        ),
        (R2, R1, "ALTER TABLE accounts ADD COLUMN email text;"),
        (R3, R2, "CREATE INDEX accounts_email ON accounts (email);"),
    ];
    for (id, parent, sql) in revs {
        let folder = dir.join(format!("{id}_step"));
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(
            folder.join("up.sql"),
            format!("-- revision: {id}\n-- down_revision: {parent}\n{sql}\n"),
        )
        .unwrap();
    }
}

fn write_map(dir: &Path, db: &str, migrations: &Path) -> PathBuf {
    let path = dir.join("map.yaml");
    std::fs::write(
        &path,
        support::shard_map(
            db,
            &format!("migrations: {{ dir: \"{}\" }}\n", migrations.display()),
        ),
    )
    .unwrap();
    path
}

async fn up(map: &Path, lock_wait: &str) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args(["migrate", "--lock-wait", lock_wait, "--config"])
        .arg(map)
        .arg("up")
        .output()
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// (revision, direction, run id) of every history row on every shard.
async fn histories(db: &str) -> Vec<Vec<(String, String, String)>> {
    let mut out = Vec::new();
    for cluster in &support::fleet().clusters {
        let client = support::connect(cluster, db).await;
        let rows = client
            .query(
                "SELECT revision::text, direction, run_id FROM shardgate.history ORDER BY id",
                &[],
            )
            .await
            .unwrap();
        out.push(
            rows.iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect(),
        );
    }
    out
}

/// Every shard applied R1, R2, R3 exactly once, in one run.
async fn assert_applied_once(db: &str) {
    for (i, history) in histories(db).await.iter().enumerate() {
        let revisions: Vec<(&str, &str)> = history
            .iter()
            .map(|(r, d, _)| (r.as_str(), d.as_str()))
            .collect();
        assert_eq!(
            revisions,
            vec![(R1, "up"), (R2, "up"), (R3, "up")],
            "shard s{i}: {history:?}"
        );
        assert!(
            history.iter().all(|(_, _, run)| *run == history[0].2),
            "one run applied everything on s{i}: {history:?}"
        );
        let client = support::connect(&support::fleet().clusters[i], db).await;
        let version: Vec<String> = client
            .query("SELECT version_num::text FROM shardgate.version", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(version, vec![R3.to_string()], "s{i}");
    }
}

#[tokio::test]
async fn two_concurrent_ups_one_applies_the_other_waits() {
    let db = support::fresh_db("migrate_concurrent_wait");
    let tmp = tempfile::tempdir().unwrap();
    let migrations = tmp.path().join("migrations");
    write_revisions(&migrations);
    let map = write_map(tmp.path(), &db, &migrations);

    let (a, b) = tokio::join!(up(&map, "30"), up(&map, "30"));
    for out in [&a, &b] {
        assert!(
            out.status.success(),
            "stdout: {}\nstderr: {}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    let ((applied, _), (waited, waited_err)) = if text(&a.stdout).contains(&format!("up {R1}")) {
        (
            (text(&a.stdout), text(&a.stderr)),
            (text(&b.stdout), text(&b.stderr)),
        )
    } else {
        (
            (text(&b.stdout), text(&b.stderr)),
            (text(&a.stdout), text(&a.stderr)),
        )
    };
    assert!(
        waited_err.contains("another migrator holds the migration lock: waiting up to 30s"),
        "the second run says it waits: {waited_err}"
    );
    assert_eq!(
        waited_err.matches("waiting up to").count(),
        1,
        "said once, not on every retry: {waited_err}"
    );
    assert!(applied.contains(&format!("up {R3}")), "{applied}");
    assert!(
        waited.contains("nothing to do") && !waited.contains(&format!("up {R1}")),
        "the second run must find everything applied: {waited}"
    );
    assert!(waited.contains(&format!("heads: {R3}")), "{waited}");
    assert_applied_once(&db).await;
}

#[tokio::test]
async fn two_concurrent_ups_without_waiting_one_fails_clearly() {
    let db = support::fresh_db("migrate_concurrent_fail");
    let tmp = tempfile::tempdir().unwrap();
    let migrations = tmp.path().join("migrations");
    write_revisions(&migrations);
    let map = write_map(tmp.path(), &db, &migrations);

    let (a, b) = tokio::join!(up(&map, "0"), up(&map, "0"));
    let (ok, failed) = match (a.status.success(), b.status.success()) {
        (true, false) => (a, b),
        (false, true) => (b, a),
        _ => panic!(
            "exactly one run must succeed:\nA {:?} {} {}\nB {:?} {} {}",
            a.status,
            text(&a.stdout),
            text(&a.stderr),
            b.status,
            text(&b.stdout),
            text(&b.stderr)
        ),
    };
    assert!(text(&ok.stdout).contains(&format!("up {R1}")));
    assert_eq!(failed.status.code(), Some(1));
    let err = text(&failed.stderr);
    assert!(
        err.contains("another migrator holds the migration lock on shard s0"),
        "{err}"
    );
    assert!(text(&failed.stdout).is_empty(), "{}", text(&failed.stdout));
    assert_applied_once(&db).await;
}
