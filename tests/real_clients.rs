//! psql and pgbench, unmodified, through shardgate.

mod support;

use tokio::process::Command;

async fn run(program: &str, args: &[String]) -> (bool, String, String) {
    let output = Command::new(program)
        .args(args)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn conn(port: u16, db: &str) -> Vec<String> {
    ["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app", db]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_meta_commands_and_copy() {
    let db = support::fresh_db("psql_client");
    let server = support::start_proxy(&support::shard_map(&db, "")).await;
    let port = server.address.port();
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.csv");
    let output = dir.path().join("out.csv");
    std::fs::write(&input, "1,alpha\n2,beta\n3,\"gamma, delta\"\n").expect("write csv");
    let script = format!(
        "CREATE TABLE items (id int PRIMARY KEY, name text);\n\
         \\copy items FROM '{}' WITH (FORMAT csv)\n\
         \\copy (SELECT * FROM items ORDER BY id) TO '{}' WITH (FORMAT csv)\n\
         \\dt\n\
         \\d items\n\
         SELECT count(*) AS n FROM items;\n",
        input.display(),
        output.display()
    );
    let script_path = dir.path().join("script.sql");
    std::fs::write(&script_path, &script).expect("write script");
    let mut args = conn(port, &db);
    args.extend(
        ["-X", "-v", "ON_ERROR_STOP=1", "-f"]
            .iter()
            .map(|s| s.to_string()),
    );
    args.push(script_path.display().to_string());
    let (ok, stdout, stderr) = run("psql", &args).await;
    assert!(ok, "psql failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("COPY 3"), "{stdout}");
    assert!(
        stdout.contains("items") && stdout.contains("table"),
        "\\dt lists the table: {stdout}"
    );
    assert!(
        stdout.contains("items_pkey"),
        "\\d shows the index: {stdout}"
    );
    assert!(
        stdout.contains("character varying") || stdout.contains("text"),
        "{stdout}"
    );
    let copied = std::fs::read_to_string(&output).expect("\\copy output");
    assert_eq!(copied, "1,alpha\n2,beta\n3,\"gamma, delta\"\n");
    server.stop().await;
}

fn failed_transactions(output: &str) -> Option<u64> {
    output
        .lines()
        .find(|l| l.starts_with("number of failed transactions:"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn processed(output: &str) -> Option<u64> {
    output
        .lines()
        .find(|l| l.starts_with("number of transactions actually processed:"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_in_every_protocol_and_pool_mode() {
    let db = support::fresh_db("pgbench_client");
    for mode in ["transaction", "session"] {
        let map = support::shard_map(&db, &format!("pool: {{ mode: {mode}, size: 8 }}\n"));
        let server = support::start_proxy(&map).await;
        let port = server.address.port();
        if mode == "transaction" {
            let mut args = vec![
                "-i".to_string(),
                "-s".to_string(),
                "1".to_string(),
                "-q".to_string(),
            ];
            args.extend(conn(port, &db));
            let (ok, stdout, stderr) = run("pgbench", &args).await;
            assert!(ok, "pgbench -i failed:\n{stdout}\n{stderr}");
        }
        for protocol in ["simple", "extended", "prepared"] {
            for select_only in [true, false] {
                let mut args: Vec<String> =
                    ["-M", protocol, "-c", "6", "-j", "2", "-t", "150", "-n"]
                        .iter()
                        .map(|s| s.to_string())
                        .collect();
                if select_only {
                    args.push("-S".to_string());
                }
                args.extend(conn(port, &db));
                let (ok, stdout, stderr) = run("pgbench", &args).await;
                let what = format!(
                    "pgbench -M {protocol} {} in {mode} mode",
                    if select_only { "-S" } else { "TPC-B" }
                );
                assert!(ok, "{what} failed:\n{stdout}\n{stderr}");
                assert_eq!(failed_transactions(&stdout), Some(0), "{what}:\n{stdout}");
                assert_eq!(processed(&stdout), Some(900), "{what}:\n{stdout}");
            }
        }
        server.stop().await;
    }
    // TPC-B kept its invariant: balances moved exactly by the history deltas.
    let shard = support::connect(&support::fleet().clusters[0], &db).await;
    let row = shard
        .query_one(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts)::bigint, (SELECT sum(delta) FROM pgbench_history)::bigint, (SELECT count(*) FROM pgbench_history)",
            &[],
        )
        .await
        .expect("check");
    let (balances, deltas, history): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(balances, deltas);
    assert_eq!(
        history,
        2 * 3 * 900,
        "every TPC-B transaction left one history row"
    );
}
