//! Cost of a 2-shard write transaction committed with two-phase commit
//! versus a single-shard one (bench/twophase.sh runs this; ignored in the
//! normal test run). Uses the library the way the proxy does: raw backend
//! connections, `BEGIN; UPDATE …` as one query per shard, then
//! `twophase::commit`.
//!
//! Three kinds of transaction, interleaved round by round so drifts of the
//! shared machine hit all alike:
//! * `single`: one UPDATE on s0, plain COMMIT;
//! * `two-shard 2PC`: one UPDATE on s0 and one on s1, two-phase commit;
//! * `two-shard plain`: the same two UPDATEs, each shard committed on its
//!   own (NOT atomic; only there to separate the cost of touching a second
//!   shard from the cost of 2PC).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use shardgate::backend::BackendConnection;
use shardgate::config::Config;
use shardgate::executor::control;
use shardgate::executor::recovery::{self, RecoveryOptions};
use shardgate::executor::twophase::{self, Participant, TwoPhase};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Single,
    TwoPhase,
    TwoPlain,
}

const KINDS: [Kind; 3] = [Kind::Single, Kind::TwoPhase, Kind::TwoPlain];

fn name(kind: Kind) -> &'static str {
    match kind {
        Kind::Single => "single-shard",
        Kind::TwoPhase => "two-shard 2PC",
        Kind::TwoPlain => "two-shard plain (not atomic)",
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One transaction of `kind` by client `client`, returning its latency.
async fn transaction(
    tp: &TwoPhase,
    conns: &mut [BackendConnection],
    kind: Kind,
    client: usize,
    i: usize,
) -> Duration {
    let id = client as i32;
    let started = Instant::now();
    let shards: &[usize] = if kind == Kind::Single { &[0] } else { &[0, 1] };
    for &s in shards {
        control::run(
            &mut conns[s],
            &format!("BEGIN; UPDATE acc SET v = v + 1, n = {i} WHERE id = {id}"),
        )
        .await
        .unwrap();
    }
    match kind {
        Kind::TwoPlain => {
            for &s in shards {
                let tags = control::run(&mut conns[s], "COMMIT").await.unwrap();
                assert_eq!(tags, ["COMMIT"]);
            }
        }
        _ => {
            let mut participants: Vec<Participant<'_>> = conns
                .iter_mut()
                .enumerate()
                .filter(|(s, _)| shards.contains(s))
                .map(|(shard, conn)| Participant {
                    shard,
                    conn,
                    wrote: true,
                })
                .collect();
            twophase::commit(tp, &mut participants).await.unwrap();
        }
    }
    started.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run bench/twophase.sh"]
async fn two_shard_commit_cost() {
    let per_round = env_usize("TWOPHASE_BENCH_TXNS", 500);
    let rounds = env_usize("TWOPHASE_BENCH_ROUNDS", 3);
    let clients = env_usize("TWOPHASE_BENCH_CLIENTS", 1);
    let db = support::fresh_db("twophase_bench");
    for cluster in &support::fleet().clusters {
        let c = support::connect(cluster, &db).await;
        c.batch_execute(&format!(
            "CREATE TABLE acc (id int PRIMARY KEY, v bigint NOT NULL, n int); \
             INSERT INTO acc SELECT g, 0, 0 FROM generate_series(0, {clients}) g"
        ))
        .await
        .unwrap();
    }
    let map = support::shard_map(&db, "");
    let config = Config::parse(Path::new("bench-map.yaml"), &map, &|_| None).unwrap();
    let tp = TwoPhase::new(&config, None);
    // Creates the decision tables, so no transaction pays for it.
    recovery::recover_once(&config.shards, &RecoveryOptions::default(), vec![]).await;

    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); KINDS.len()];
    let mut wall: Vec<Duration> = vec![Duration::ZERO; KINDS.len()];
    let mut all_conns = Vec::new();
    for _ in 0..clients {
        let mut conns = Vec::new();
        for (i, shard) in config.shards.iter().enumerate() {
            conns.push(
                BackendConnection::connect(shard, i, Duration::from_secs(5))
                    .await
                    .unwrap(),
            );
        }
        all_conns.push(conns);
    }
    // Warm-up.
    for conns in &mut all_conns {
        for kind in KINDS {
            for i in 0..20 {
                transaction(&tp, conns, kind, 0, i).await;
            }
        }
    }
    for _round in 0..rounds {
        for (k, kind) in KINDS.into_iter().enumerate() {
            let started = Instant::now();
            let tasks = all_conns.drain(..).enumerate().map(|(client, mut conns)| {
                let tp = tp.clone();
                tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(per_round);
                    for i in 0..per_round {
                        lat.push(transaction(&tp, &mut conns, kind, client, i).await);
                    }
                    (conns, lat)
                })
            });
            let done = futures::future::join_all(tasks).await;
            wall[k] += started.elapsed();
            for result in done {
                let (conns, lat) = result.unwrap();
                samples[k].extend(lat);
                all_conns.push(conns);
            }
            let spent = tp.take_spent();
            recovery::recover_once(&config.shards, &RecoveryOptions::default(), spent).await;
        }
    }

    let total = (per_round * rounds * clients) as f64;
    let mut rows = Vec::new();
    for (k, kind) in KINDS.into_iter().enumerate() {
        let mut s = samples[k].clone();
        s.sort();
        let mean = s.iter().sum::<Duration>() / s.len().max(1) as u32;
        let tps = total / wall[k].as_secs_f64();
        rows.push((kind, mean, percentile(&s, 0.5), percentile(&s, 0.99), tps));
    }
    let base = rows[0];
    println!(
        "\n{} clients, {} rounds x {} transactions per client and kind\n",
        clients, rounds, per_round
    );
    println!("| transaction | mean µs | p50 µs | p99 µs | tps | mean latency / single | tps single / tps |");
    println!("|---|---|---|---|---|---|---|");
    for (kind, mean, p50, p99, tps) in &rows {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
            name(*kind),
            us(*mean),
            us(*p50),
            us(*p99),
            tps,
            us(*mean) / us(base.1),
            base.4 / tps
        );
    }
    // Sanity: every 2PC left nothing prepared.
    for cluster in &support::fleet().clusters {
        let c = support::connect(cluster, &db).await;
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
    }
}
