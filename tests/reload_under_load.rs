//! Issue #17 acceptance: the map reloaded 10 times while pgbench's
//! select-only and TPC-B-like workloads run through shardgate for 20 s
//! (pool sizes and users changed, a replicated table added, an invalid map
//! in between): no failed transaction, no client disconnected, the invalid
//! map refused, and the balances still equal the history afterwards.

mod support;

use std::time::Duration;

use shardgate::config::Config;
use support::tpcb::{direct_sums, pgbench_with, reported, tpcb_db, MAP, TPCB};
use support::{connect, fleet, shard_map, start_proxy};

fn parse(map: &str) -> Result<Config, String> {
    Config::parse(std::path::Path::new("reload-map.yaml"), map, &|_| None)
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_reloads_under_pgbench_load_lose_nothing() {
    let db = tpcb_db("reload_load").await;
    for cluster in &fleet().clusters {
        connect(cluster, &db)
            .await
            .batch_execute("CREATE TABLE countries (code int PRIMARY KEY, name text)")
            .await
            .expect("a table the map learns at a reload");
    }
    let base = shard_map(&db, MAP);
    let server = start_proxy(&base).await;
    let port = server.address.port();
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("tpcb.sql");
    std::fs::write(&script, TPCB).expect("script");
    let script = script.to_string_lossy().to_string();

    let run = |workload: [&str; 2], protocol: &'static str| {
        let db = db.clone();
        let workload = workload.map(str::to_string);
        tokio::spawn(async move {
            let [flag, value] = &workload;
            let run = [
                flag.as_str(),
                value.as_str(),
                "-c",
                "4",
                "-j",
                "1",
                "-T",
                "20",
                "-M",
                protocol,
            ];
            pgbench_with(port, &db, &run).await
        })
    };
    let select_only = run(["-b", "select-only"], "extended");
    let tpcb = run(["-f", &script], "simple");

    // Ten reloads, about 1.5 s apart, while both run.
    let variants = [
        base.replace("size: 12", "size: 8"),
        base.replace(
            "users: [ { name: app } ]",
            "users: [ { name: app }, { name: reporting } ]",
        ),
        format!("{base}  countries: {{ replicated: true }}\n"),
        "shards: [ unclosed\n".to_string(),
        base.replace("size: 12", "size: 16"),
        format!(
            "{}  countries: {{ replicated: true }}\n",
            base.replace("size: 12", "size: 10")
        ),
        base.clone(),
        base.replace(
            "transaction, size: 12",
            "transaction, size: 12, query_timeout: 30s",
        ),
        base.replace("size: 12", "size: 6"),
        base.clone(),
    ];
    let mut refused = Vec::new();
    for (i, map) in variants.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        match server.cluster.reload(parse(map)).await {
            Ok(done) => eprintln!(
                "reload {i}: generation {}, pools kept {}",
                done.generation, done.pools_kept
            ),
            Err(error) => {
                eprintln!("reload {i} refused: {error}");
                refused.push(i);
            }
        }
    }
    assert_eq!(refused, vec![3], "only the invalid map is refused");
    assert_eq!(server.cluster.current().generation, 10);

    for (name, run) in [("select-only", select_only), ("tpcb-like", tpcb)] {
        let stdout = run.await.expect("pgbench task");
        eprintln!("{name} through shardgate during the reloads:\n{stdout}");
        assert_eq!(
            reported(&stdout, "number of failed transactions:"),
            0,
            "{stdout}"
        );
        assert!(
            reported(&stdout, "number of transactions actually processed:") > 100,
            "{stdout}"
        );
        // pgbench exits non-zero (and pgbench_with panics) when a client
        // is disconnected: "client N aborted".
        assert!(!stdout.contains("aborted"), "{stdout}");
    }
    let (sums, prepared) = direct_sums(&db).await;
    assert_eq!(sums.accounts, sums.history, "sum(abalance) = sum(delta)");
    assert_eq!(sums.tellers, sums.history, "sum(tbalance) = sum(delta)");
    assert_eq!(sums.branches, sums.history, "sum(bbalance) = sum(delta)");
    assert_eq!(prepared, 0, "no prepared transaction left on any shard");
    let metrics = server.shared.metrics.render();
    assert!(
        metrics.contains("shardgate_config_reloads_total{result=\"success\"} 9"),
        "{metrics}"
    );
    assert!(
        metrics.contains("shardgate_config_reloads_total{result=\"failure\"} 1"),
        "{metrics}"
    );
    server.stop().await;
}
