//! Log lines that come in bursts are throttled (src/throttle.rs): a shard
//! that refuses every connect attempt wrote one warning per attempt —
//! 26,778 in 20 s of the reliability suite's kill -9 — drowning the rest.

mod support;

use std::time::{Duration, Instant};

use support::process::ChildProxy;
use support::wire::{self, Wire};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_shard_is_logged_about_once_a_second() {
    // A port nothing listens on: every connect attempt is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let map = format!(
        "listen: 127.0.0.1:0\nauth: trust\nusers: [ {{ name: app }} ]\n\
         pool: {{ size: 4, connect_timeout: 1s }}\n\
         shards:\n  - {{ name: s0, url: \"postgres://postgres@127.0.0.1:{closed}/db\" }}\n"
    );
    let proxy = ChildProxy::start(&map).await;
    let started = Instant::now();
    let mut refused = 0;
    while started.elapsed() < Duration::from_secs(2) {
        // The login itself fails: shardgate checks the shard first.
        let mut c = Wire::begin(proxy.port, "app", "db").await;
        while let Some(message) = c.recv().await {
            match message.tag {
                b'E' => {
                    refused += 1;
                    break;
                }
                b'Z' => {
                    let answers = c.exchange(&wire::query("SELECT 1"), 1).await;
                    refused += usize::from(answers.iter().any(|m| m.tag == b'E'));
                    break;
                }
                _ => {}
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let log = proxy.log_text();
    let lines = log.lines().filter(|l| l.contains("is unavailable")).count();
    eprintln!("{refused} refused statements in {elapsed:.1} s, {lines} log lines");
    assert!(
        refused >= 20,
        "{refused} statements: the test did not load the pool"
    );
    assert!(
        (1..=(elapsed.ceil() as usize + 2)).contains(&lines),
        "{lines} warnings for {refused} refusals in {elapsed:.1} s:\n{log}"
    );
    assert!(log.contains("suppressed"), "{log}");
}
