//! Killing the migrator inside two-phase commit, then `recover` (or the next
//! `up`): every shard ends at the same revision, no prepared transaction is
//! left. The binary runs as a child process and aborts at the failpoint
//! `SHARDGATE_MIGRATE_CRASH_AFTER=prepare|decision`.

mod support;

use std::path::Path;

use tokio::process::Command;

const A: &str = "a00000000001";
const B1: &str = "b10000000001";
const C1: &str = "c10000000001";

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn shardgate(dir: &Path, map: &Path, args: &[&str], crash: Option<&str>) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shardgate"));
    command
        .arg("migrate")
        .arg("--config")
        .arg(map)
        .args(args)
        .current_dir(dir)
        .env("SHARDGATE_LOG", "warn");
    if let Some(point) = crash {
        command.env("SHARDGATE_MIGRATE_CRASH_AFTER", point);
    }
    let out = command.output().await.expect("running shardgate");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn state(shards: &[tokio_postgres::Client]) -> Vec<(Vec<String>, i64)> {
    let mut out = Vec::new();
    for c in shards {
        let rows: Vec<String> = c
            .query(
                "SELECT version_num::text FROM shardgate.version ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let prepared: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE 'shardgate_mig_%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        out.push((rows, prepared));
    }
    out
}

fn all_at(rows: &[&str]) -> Vec<(Vec<String>, i64)> {
    let rows: Vec<String> = rows.iter().map(|s| s.to_string()).collect();
    vec![(rows.clone(), 0), (rows.clone(), 0), (rows, 0)]
}

#[tokio::test]
async fn crashes_inside_two_phase_commit_are_recovered() {
    let db = support::fresh_db("migrate_crash");
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/migrations/graph");
    let map = tmp.path().join("map.yaml");
    std::fs::write(
        &map,
        support::shard_map(
            &db,
            &format!("migrations: {{ dir: \"{}\" }}\n", fixtures.display()),
        ),
    )
    .unwrap();
    let mut shards = Vec::new();
    for cluster in &support::fleet().clusters {
        shards.push(support::connect(cluster, &db).await);
    }

    // 1. Killed after the PREPAREs, before the decision: s1 and s2 hold
    //    prepared transactions, s0 (the coordinator) rolled back with the process.
    let run = shardgate(tmp.path(), &map, &["up", A], Some("prepare")).await;
    assert!(!run.ok, "the failpoint aborts: {}", run.stderr);
    let s = state(&shards).await;
    assert_eq!(s[0], (vec![], 0));
    assert_eq!(s[1].1, 1, "s1 prepared");
    assert_eq!(s[2].1, 1, "s2 prepared");
    let status = shardgate(tmp.path(), &map, &["status"], None).await;
    assert!(
        status.stdout.contains("in doubt: shardgate_mig_"),
        "{}",
        status.stdout
    );

    let recover = shardgate(tmp.path(), &map, &["recover"], None).await;
    assert!(recover.ok, "{}", recover.stderr);
    assert_eq!(
        recover.stdout.matches("rolled back shardgate_mig_").count(),
        2,
        "{}",
        recover.stdout
    );
    assert_eq!(state(&shards).await, all_at(&[]));

    // 2. Killed right after the decision: committed on s0, prepared elsewhere;
    //    the next `up` commits them (the decision exists) and carries on.
    let run = shardgate(tmp.path(), &map, &["up", A], Some("decision")).await;
    assert!(!run.ok);
    let s = state(&shards).await;
    assert_eq!(s[0], (vec![A.to_string()], 0));
    assert_eq!((s[1].1, s[2].1), (1, 1));
    let up = shardgate(tmp.path(), &map, &["up", B1], None).await;
    assert!(up.ok, "{}", up.stderr);
    assert_eq!(
        up.stdout.matches("recovered: committed").count(),
        2,
        "{}",
        up.stdout
    );
    assert_eq!(state(&shards).await, all_at(&[B1]));

    // 3. Same crash point, resolved by `recover`.
    let run = shardgate(tmp.path(), &map, &["up", C1], Some("decision")).await;
    assert!(!run.ok);
    let recover = shardgate(tmp.path(), &map, &["recover"], None).await;
    assert!(recover.ok, "{}", recover.stderr);
    assert_eq!(
        recover.stdout.matches("committed shardgate_mig_").count(),
        2,
        "{}",
        recover.stdout
    );
    assert_eq!(state(&shards).await, all_at(&[C1]));
    let nothing = shardgate(tmp.path(), &map, &["recover"], None).await;
    assert!(
        nothing.stdout.contains("no in-doubt transactions"),
        "{}",
        nothing.stdout
    );
    for c in &shards {
        let decisions: i64 = c
            .query_one("SELECT count(*) FROM shardgate.decisions", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(decisions, 0);
    }
}
