//! What clients can make shardgate hold (issue #15-6), measured on the
//! proxy process itself (VmRSS of a `shardgate serve` child): large
//! messages from several clients at once stay within `max_client_memory`,
//! a message over `max_message_size` is refused from its header, half-open
//! connections cost little and give their memory back, and logins are
//! capped and timed out.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::process::ChildProxy;
use support::wire::{self, read_to_close, Wire};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const MIB: u64 = 1024;

/// A simple query of exactly `total` bytes on the wire (tag included).
fn big_query(total: usize) -> Vec<u8> {
    let frame = "SELECT length('')";
    let filler = total - wire::query(frame).len();
    wire::query(&format!("SELECT length('{}')", "x".repeat(filler)))
}

/// Samples the proxy's RSS every 10 ms until `done`; returns the peak.
fn sample_peak(proxy: &ChildProxy, done: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let pid = proxy.pid();
    tokio::spawn(async move {
        let peak = AtomicU64::new(0);
        while !done.load(Ordering::Relaxed) {
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                let rss = status
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                peak.fetch_max(rss, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        peak.load(Ordering::Relaxed)
    })
}

fn error_fields(bytes: &[u8]) -> Option<wire::Msg> {
    let start = bytes.iter().position(|b| *b == b'E')?;
    Some(wire::Msg {
        tag: b'E',
        body: bytes.get(start + 5..)?.to_vec(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_from_many_clients_stay_within_max_client_memory() {
    let db = support::fresh_db("memory_large_messages");
    // 6 clients × 24 MiB: before the budget the proxy held each message
    // twice (read buffer grown by doubling, copy to the shard) at once.
    let map = support::shard_map(
        &db,
        "max_message_size: 24MiB\nmax_client_memory: 64MiB\npool: { size: 8 }\n",
    );
    let proxy = ChildProxy::start(&map).await;
    let clients = 6;
    let size = 24 << 20;
    let mut connected = Vec::new();
    for _ in 0..clients {
        let mut client = Wire::connect(proxy.port, "app", &db).await;
        client.exchange(&wire::query("SELECT 1"), 1).await;
        connected.push(client);
    }
    let query = Arc::new(big_query(size));
    let before = proxy.rss_kib();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = sample_peak(&proxy, done.clone());
    let started = Instant::now();
    let tasks: Vec<_> = connected
        .into_iter()
        .map(|mut client| {
            let query = query.clone();
            tokio::spawn(async move {
                let answer = client.exchange(&query, 1).await;
                let row = answer.iter().find(|m| m.tag == b'D').unwrap_or_else(|| {
                    panic!("no row: {:?}", answer.last().map(|m| m.normalized()))
                });
                String::from_utf8_lossy(&row.body[6..]).into_owned()
            })
        })
        .collect();
    for task in tasks {
        let length: usize = task.await.expect("client").parse().expect("a length");
        assert!(length > size - 64 && length < size, "{length}");
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let peak = sampler.await.expect("sampler");
    let grew = peak.saturating_sub(before);
    println!(
        "{clients} clients × 24 MiB queries in {elapsed:?}: proxy RSS {} MiB before, peak {} MiB (+{} MiB)",
        before / MIB,
        peak / MIB,
        grew / MIB
    );
    // The budget (64 MiB) plus 16 MiB for everything else a query needs.
    assert!(
        grew < 80 * MIB,
        "the proxy grew by {} MiB with max_client_memory 64MiB",
        grew / MIB
    );

    // One message of exactly max_message_size still goes through: the
    // budget is at least twice the largest message, so it cannot wait forever.
    let mut client = Wire::connect(proxy.port, "app", &db).await;
    let answer = tokio::time::timeout(
        Duration::from_secs(30),
        client.exchange(&big_query(24 << 20), 1),
    )
    .await
    .expect("a message of max_message_size is answered");
    assert!(answer.iter().any(|m| m.tag == b'D'), "a row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_max_message_size_is_refused_from_its_header() {
    let db = support::fresh_db("memory_too_large");
    let map = support::shard_map(&db, "max_message_size: 8MiB\n");
    let proxy = ChildProxy::start(&map).await;
    let before = proxy.rss_kib();
    let mut client = Wire::connect(proxy.port, "app", &db).await;
    // Only the header and a little of a 40 MiB Query: the answer must not
    // wait for the body.
    let header = big_query(40 << 20);
    client.send(&header[..4096]).await;
    let answer = read_to_close(&mut client.stream).await;
    let error = error_fields(&answer).expect("an ErrorResponse");
    assert_eq!(
        error.error_code().as_deref(),
        Some("54000"),
        "{}",
        error.normalized()
    );
    let text = error.error_message().unwrap_or_default();
    assert!(
        text.contains("max_message_size") && text.contains(&(8u64 << 20).to_string()),
        "names the limit and the setting: {text}"
    );
    assert!(
        proxy.rss_kib() < before + 4 * MIB,
        "nothing of it was buffered"
    );
    // Below the limit is fine, on a new connection.
    let mut client = Wire::connect(proxy.port, "app", &db).await;
    let answer = client.exchange(&big_query(4 << 20), 1).await;
    assert!(answer.iter().any(|m| m.tag == b'D'), "a row");
}

/// Opens `n` connections that send nothing or part of a startup packet.
async fn half_open(port: u16, n: usize) -> Vec<TcpStream> {
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        if i % 2 == 1 {
            // Length 80, protocol 3.0, then nothing.
            stream
                .write_all(&[0, 0, 0, 80, 0, 3, 0, 0, b'u'])
                .await
                .expect("partial startup");
        }
        streams.push(stream);
    }
    streams
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_cost_little_and_give_it_back() {
    let db = support::fresh_db("memory_half_open");
    let map = support::shard_map(&db, "max_pending_logins: 5000\n");
    let proxy = ChildProxy::start(&map).await;
    // Warm up: one real session.
    Wire::connect(proxy.port, "app", &db)
        .await
        .exchange(&wire::query("SELECT 1"), 1)
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = proxy.rss_kib();
    let n = 2000;
    for round in 0..3 {
        let streams = half_open(proxy.port, n).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let open = proxy.rss_kib();
        drop(streams);
        // The proxy sees the closes, and trims at most once a second.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let closed = proxy.rss_kib();
        println!(
            "round {round}: {n} half-open connections: RSS {} KiB before, {} KiB open \
             ({} B each), {} KiB after they closed",
            before,
            open,
            open.saturating_sub(before) * 1024 / n as u64,
            closed
        );
        assert!(
            open.saturating_sub(before) < 8 * MIB,
            "{n} half-open connections cost {} KiB",
            open.saturating_sub(before)
        );
        assert!(
            closed < before + 2 * MIB,
            "round {round}: {} KiB not given back after the connections closed",
            closed.saturating_sub(before)
        );
    }
    // Still serving.
    Wire::connect(proxy.port, "app", &db)
        .await
        .exchange(&wire::query("SELECT 1"), 1)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_capped_and_timed_out() {
    let db = support::fresh_db("memory_login_cap");
    let map = support::shard_map(&db, "max_pending_logins: 100\nlogin_timeout: 1s\n");
    let proxy = ChildProxy::start(&map).await;
    let held = half_open(proxy.port, 100).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .expect("connect");
    let answer = read_to_close(&mut extra).await;
    let error = error_fields(&answer).expect("an ErrorResponse");
    assert_eq!(
        error.error_code().as_deref(),
        Some("53300"),
        "{}",
        error.normalized()
    );
    assert_eq!(
        proxy
            .metric("shardgate_client_auth_failures_total{reason=\"too_many_logins\"}")
            .await,
        1.0
    );
    // login_timeout closes the half-open ones, which frees their slots.
    let started = Instant::now();
    for mut stream in held {
        read_to_close(&mut stream).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        started.elapsed()
    );
    assert_eq!(
        proxy
            .metric("shardgate_client_auth_failures_total{reason=\"timeout\"}")
            .await,
        100.0
    );
    Wire::connect(proxy.port, "app", &db)
        .await
        .exchange(&wire::query("SELECT 1"), 1)
        .await;
}
