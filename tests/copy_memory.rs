//! Benchmark (ignored by default; `bench/copy.sh` runs it): a large COPY
//! FROM STDIN through shardgate into a sharded table keeps the proxy's
//! memory bounded. The proxy runs in this process, so its resident set is
//! this process's; the input is generated on the fly, never held whole.
//! Prints throughput through shardgate and directly into one shard.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{pin_mut, SinkExt};
use support::{connect, connect_proxy, fleet, fresh_db, shard_map, start_proxy};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Rows `from..` as COPY text, about `bytes` long.
fn chunk(from: &mut u64, bytes: usize) -> Bytes {
    let mut out = String::with_capacity(bytes + 300);
    while out.len() < bytes {
        let id = *from;
        *from += 1;
        out.push_str(&format!(
            "{id}\tpayload {id:0>12} {}\n",
            "abcdefghij".repeat(18)
        ));
    }
    Bytes::from(out)
}

async fn copy_stream(client: &tokio_postgres::Client, sql: &str, total: usize) -> (u64, Duration) {
    let started = Instant::now();
    let sink = client.copy_in(sql).await.expect("COPY");
    pin_mut!(sink);
    let mut next = 1u64;
    let mut sent = 0;
    while sent < total {
        let data = chunk(&mut next, 64 * 1024);
        sent += data.len();
        sink.send(data).await.expect("CopyData");
    }
    let rows = sink.finish().await.expect("COPY done");
    assert_eq!(rows, next - 1);
    (rows, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: bench/copy.sh"]
async fn large_copy_keeps_proxy_memory_bounded() {
    let mb: usize = std::env::var("SHARDGATE_COPY_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let total = mb << 20;
    let db = fresh_db("copy_memory");
    for cluster in &fleet().clusters {
        connect(cluster, &db)
            .await
            .batch_execute(
                "CREATE UNLOGGED TABLE big (id bigint, payload text);\
                 CREATE UNLOGGED TABLE direct (id bigint, payload text);",
            )
            .await
            .expect("schema");
    }
    let map = "functions:\n  h: { kind: hash }\ntables:\n  big: { key: id, function: h }\n";
    let server = start_proxy(&shard_map(&db, map)).await;
    let client = connect_proxy(&server, "app", None).await;

    // Warm up (pools, catalog), then measure.
    copy_stream(&client, "COPY big FROM STDIN", 1 << 20).await;
    client.simple_query("TRUNCATE big").await.expect("truncate");
    let before = rss_kib();
    let peak = Arc::new(AtomicU64::new(before));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let peak = Arc::clone(&peak);
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let (rows, through) = copy_stream(&client, "COPY big FROM STDIN", total).await;
    done.store(true, Ordering::Relaxed);
    sampler.await.expect("sampler");
    let peak = peak.load(Ordering::Relaxed);
    let after = rss_kib();

    let mut on_shards = 0i64;
    for cluster in &fleet().clusters {
        let n: i64 = connect(cluster, &db)
            .await
            .query_one("SELECT count(*) FROM big", &[])
            .await
            .expect("count")
            .get(0);
        assert!(n > 0, "every shard got rows");
        on_shards += n;
    }
    assert_eq!(on_shards as u64, rows, "every row committed once");

    // The same stream straight into one shard, for reference.
    let direct_client = connect(&fleet().clusters[0], &db).await;
    let (_, direct) = copy_stream(&direct_client, "COPY direct FROM STDIN", total).await;

    let mib = total as f64 / (1 << 20) as f64;
    println!(
        "COPY {mib:.0} MiB, {rows} rows: through shardgate {:.1} s ({:.1} MiB/s), \
         direct into one shard {:.1} s ({:.1} MiB/s); proxy process RSS before {} MiB, \
         peak {} MiB (+{} MiB), after {} MiB",
        through.as_secs_f64(),
        mib / through.as_secs_f64(),
        direct.as_secs_f64(),
        mib / direct.as_secs_f64(),
        before / 1024,
        peak / 1024,
        peak.saturating_sub(before) / 1024,
        after / 1024,
    );
    assert!(
        peak.saturating_sub(before) < 64 * 1024,
        "the proxy's memory grew by {} MiB during a {mib:.0} MiB COPY",
        peak.saturating_sub(before) / 1024
    );
    server.stop().await;
}
