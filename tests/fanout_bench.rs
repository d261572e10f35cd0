//! Fan-out benchmark (ignored by default; run by `bench/fanout.sh`):
//! 1,000,000 rows per shard on 3 shards (and an unsharded oracle with all
//! 3,000,000), measuring
//! - peak RSS growth of the process while the executor merges
//!   `ORDER BY … LIMIT 10` and streams a full 3M-row ordered merge (VmHWM
//!   reset through /proc/self/clear_refs before each query);
//! - fan-out latency vs the slowest shard answering its own part directly,
//!   for count(*), ORDER BY … LIMIT 10 and GROUP BY;
//! - sequential throughput of a fan-out aggregate: oracle direct vs executor;
//! - peak RSS growth while the full 3M-row ordered merge goes through
//!   shardgate, fetched whole and in parts of 1000 rows (a portal).

mod fanout_util;
mod support;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use fanout_util::{read_answer, Fixture, Proto};
use tokio::io::AsyncWrite;

const ROWS_PER_SHARD: i64 = 1_000_000;

/// A client that discards what it is sent, counting bytes.
#[derive(Default)]
struct Sink(u64);

/// Never vanishes: it has no peer.
impl shardgate::executor::fanout::ClientSink for Sink {}

impl AsyncWrite for Sink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0 += buf.len() as u64;
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Runs `sql` through the executor into a discarding client; (time, bytes, rows, peak RSS growth kB).
async fn fanout(fx: &mut Fixture, sql: &str) -> (Duration, u64, u64, u64) {
    use shardgate::executor::fanout::{run, FanoutProtocol, FanoutRequest, ShardConn};
    let route = shardgate::router::Route::All;
    let mut targets: Vec<ShardConn> = fx
        .shards
        .iter_mut()
        .enumerate()
        .map(|(i, conn)| ShardConn { shard: i, conn })
        .collect();
    let mut out = bytes::BytesMut::new();
    let mut sink = Sink::default();
    reset_peak();
    let before = status_kb("VmRSS:");
    let start = Instant::now();
    let outcome = run(
        &fx.executor,
        FanoutRequest {
            sql,
            route: &route,
            protocol: FanoutProtocol::Simple,
        },
        &mut targets,
        &mut out,
        &mut sink,
    )
    .await
    .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let elapsed = start.elapsed();
    let peak = status_kb("VmHWM:");
    (
        elapsed,
        sink.0 + out.len() as u64,
        outcome.rows,
        peak.saturating_sub(before),
    )
}

/// The slowest of the shards answering `sql` directly (each its own part).
async fn slowest_shard(fx: &mut Fixture, sql: &str) -> Duration {
    let req = Fixture::request(sql, &[], Proto::Simple);
    let mut slowest = Duration::ZERO;
    for c in fx.shards.iter_mut() {
        let start = Instant::now();
        let a = read_answer(c, &req).await;
        assert!(a.error.is_none(), "{sql}: {:?}", a.error);
        slowest = slowest.max(start.elapsed());
    }
    slowest
}

/// All shards answering `sql` at the same time, directly (no merge): what
/// the fan-out costs on this machine before the executor does anything.
async fn shards_concurrently(fx: &mut Fixture, sql: &str) -> Duration {
    let req = Fixture::request(sql, &[], Proto::Simple);
    let start = Instant::now();
    let runs = fx.shards.iter_mut().map(|c| read_answer(c, &req));
    for a in futures::future::join_all(runs).await {
        assert!(a.error.is_none(), "{sql}: {:?}", a.error);
    }
    start.elapsed()
}

/// Fetches `sql` through shardgate with Execute(`part`) + Flush until
/// CommandComplete, counting rows without keeping them: (rows, parts).
async fn fetch_in_parts(client: &mut support::wire::Wire, sql: &str, part: i32) -> (u64, u64) {
    use support::wire::{bind, execute, flush, parse, sync};
    client
        .send(
            &[
                parse("", sql, &[]),
                bind("", "", &[]),
                execute("", part),
                flush(),
            ]
            .concat(),
        )
        .await;
    let (mut rows, mut parts) = (0u64, 1u64);
    loop {
        let m = client.recv().await.expect("connection open");
        match m.tag {
            b'D' => rows += 1,
            b's' => {
                parts += 1;
                client.send(&[execute("", part), flush()].concat()).await;
            }
            b'C' => break,
            b'E' => panic!("{sql}: {}", m.normalized()),
            _ => {}
        }
    }
    client.exchange(&sync(), 1).await;
    (rows, parts)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run bench/fanout.sh"]
async fn fanout_benchmark() {
    let map = "functions:\n  by_id: { kind: hash }\ntables:\n  big: { key: id, function: by_id }\n";
    let mut fx = Fixture::new("fanout_bench", map).await;
    fx.executor.set_text_collation_bytewise(true);
    let load = Instant::now();
    let fleet = support::fleet();
    let schema = "CREATE TABLE big (id int8, grp int4, v int4, pad text)";
    let mut loads = Vec::new();
    for (i, c) in fleet.clusters.iter().enumerate() {
        let client = support::connect(c, &fx.db).await;
        loads.push(async move {
            client.batch_execute(schema).await.unwrap();
            client
                .batch_execute(&format!(
                    "INSERT INTO big SELECT g::int8 * 3 + {i}, (g * 7 + {i}) % 100, (g::int8 * 7919 + {i}) % 1000003, repeat('x', 20) FROM generate_series(0, {}) g",
                    ROWS_PER_SHARD - 1
                ))
                .await
                .unwrap();
            client.batch_execute("VACUUM ANALYZE big").await.unwrap();
        });
    }
    futures::future::join_all(loads).await;
    let oracle = support::connect(&fleet.clusters[0], &fx.oracle_db).await;
    oracle.batch_execute(schema).await.unwrap();
    oracle
        .batch_execute(&format!(
            "INSERT INTO big SELECT g::int8 * 3 + i, (g * 7 + i) % 100, (g::int8 * 7919 + i) % 1000003, repeat('x', 20) FROM generate_series(0, {}) g, generate_series(0, 2) i",
            ROWS_PER_SHARD - 1
        ))
        .await
        .unwrap();
    oracle.batch_execute("VACUUM ANALYZE big").await.unwrap();
    println!(
        "loaded 3 x {ROWS_PER_SHARD} rows (+ oracle) in {:?}",
        load.elapsed()
    );
    println!("process RSS before queries: {} kB", status_kb("VmRSS:"));

    // Memory.
    for sql in [
        "SELECT * FROM big ORDER BY v LIMIT 10",
        "SELECT * FROM big LIMIT 10",
        "SELECT id, v, pad FROM big ORDER BY v, id",
        "SELECT grp, count(*), avg(v) FROM big GROUP BY grp",
    ] {
        let (t, bytes, rows, peak) = fanout(&mut fx, sql).await;
        println!(
            "memory | {sql} | {rows} rows, {:.1} MB to client, {t:?} | peak RSS growth {:.1} MB",
            bytes as f64 / 1e6,
            peak as f64 / 1024.0
        );
        assert!(peak < 50 * 1024, "{sql}: peak RSS grew {peak} kB");
    }

    // Through shardgate (in this process): the full ordered merge fetched
    // whole and in parts of 1000 rows (a multi-shard portal, Execute with a
    // row limit + Flush per part): both must stream.
    fx.start_proxy().await;
    let (_, mut client) = fx.oracle_and_proxy_wires().await;
    let sql = "SELECT id, v, pad FROM big ORDER BY v, id";
    for part in [0, 1000] {
        reset_peak();
        let before = status_kb("VmRSS:");
        let start = Instant::now();
        let (rows, parts) = fetch_in_parts(&mut client, sql, part).await;
        let peak = status_kb("VmHWM:").saturating_sub(before);
        println!(
            "portal | {sql} | {} | {rows} rows in {parts} part(s), {:?} | peak RSS growth {:.1} MB",
            if part == 0 {
                "whole (Execute 0)".to_string()
            } else {
                format!("parts of {part}")
            },
            start.elapsed(),
            peak as f64 / 1024.0
        );
        assert_eq!(rows, 3 * ROWS_PER_SHARD as u64);
        assert!(
            peak < 50 * 1024,
            "{sql} in parts of {part}: peak RSS grew {peak} kB"
        );
    }

    // Latency: fan-out vs the slowest shard alone (median of 5).
    for (sql, shard_sql) in [
        ("SELECT count(*) FROM big", "SELECT count(*) FROM big"),
        (
            "SELECT id, v FROM big ORDER BY v, id LIMIT 10",
            "SELECT id, v FROM big ORDER BY v, id LIMIT 10",
        ),
        (
            "SELECT grp, count(*), sum(v) FROM big GROUP BY grp",
            "SELECT grp AS g0, count(*) AS a0, sum(v) AS a1 FROM big GROUP BY 1",
        ),
    ] {
        let mut f = Vec::new();
        let mut s = Vec::new();
        let mut c = Vec::new();
        for _ in 0..5 {
            f.push(fanout(&mut fx, sql).await.0);
            s.push(slowest_shard(&mut fx, shard_sql).await);
            c.push(shards_concurrently(&mut fx, shard_sql).await);
        }
        let (f, s, c) = (median(f), median(s), median(c));
        println!(
            "latency | {sql} | fan-out {:.1} ms | slowest shard alone {:.1} ms | 3 shards at once, direct {:.1} ms | executor overhead {:.1} ms",
            f.as_secs_f64() * 1e3,
            s.as_secs_f64() * 1e3,
            c.as_secs_f64() * 1e3,
            (f.as_secs_f64() - c.as_secs_f64()) * 1e3
        );
    }

    // Throughput of a fan-out aggregate, sequential: oracle direct vs executor.
    let sql = "SELECT grp, count(*), avg(v) FROM big WHERE v < 100000 GROUP BY grp";
    let n = 10;
    let start = Instant::now();
    for _ in 0..n {
        let a = fx.via_oracle(sql, &[], Proto::Simple).await;
        assert_eq!(a.rows.len(), 100);
    }
    let direct = start.elapsed();
    let start = Instant::now();
    for _ in 0..n {
        let (_, _, rows, _) = fanout(&mut fx, sql).await;
        assert_eq!(rows, 100);
    }
    let sharded = start.elapsed();
    println!(
        "throughput | {sql} | oracle direct {:.1} q/s | 3 shards via executor {:.1} q/s",
        n as f64 / direct.as_secs_f64(),
        n as f64 / sharded.as_secs_f64()
    );
}
