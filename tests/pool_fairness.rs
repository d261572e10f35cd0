//! Checkouts are served first come, first served (issue #15-1).
//!
//! Many clients on a small pool, each running short transactions in a
//! loop: with a fair queue every checkout waits about one turn of the queue
//! (clients / size × hold time, ~0.1 s here). Before the fix a client that
//! had just returned a connection took it again ahead of the waiters (bb8's
//! `Notify` wake-up and the hot stack let it barge in): the pool test
//! measured p99 4.06 s and max 4.10 s on the old code (0.13 s / 0.13 s
//! after). The bound is 10 fair turns (1 s), far from both, so a loaded CI
//! box does not make it flaky. Through the proxy each client's round trip
//! between statements hides most of the barging (old max 0.32 s, new
//! 0.14 s): there the latency bound is a sanity check, and the old code
//! fails for the missing `shardgate_pool_wait_max_seconds`.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use shardgate::backend::{BackendConnection, ShardPool};
use shardgate::config::{PoolConfig, PoolMode, ShardConfig};

const CLIENTS: usize = 40;
const POOL_SIZE: u32 = 2;
const HOLD: Duration = Duration::from_millis(5);
const RUN_FOR: Duration = Duration::from_secs(4);

/// One queue turn: every other client holds a connection once before us.
fn fair_turn() -> Duration {
    HOLD * (CLIENTS as u32 / POOL_SIZE)
}

/// What the tests accept as the longest wait: 10 fair turns (1 s).
fn bound() -> Duration {
    fair_turn() * 10
}

/// Runs `SELECT pg_sleep(..)` on a raw backend connection up to ReadyForQuery.
async fn hold(conn: &mut BackendConnection) {
    let mut out = BytesMut::new();
    let sql = format!("SELECT pg_sleep({})", HOLD.as_secs_f64());
    frontend::query(&sql, &mut out).expect("encode");
    conn.write_all(&out).await.expect("write");
    let mut buf = BytesMut::new();
    loop {
        while let Some(message) = Message::parse(&mut buf).expect("backend message") {
            match message {
                Message::ErrorResponse(_) => panic!("pg_sleep failed"),
                Message::ReadyForQuery(body) => {
                    conn.set_transaction_status(body.status());
                    return;
                }
                _ => {}
            }
        }
        assert!(conn.read_buf(&mut buf).await.expect("read") > 0, "EOF");
    }
}

#[derive(Debug, Default)]
struct Tally {
    waits: Vec<Duration>,
    errors: Vec<String>,
}

impl Tally {
    async fn collect(tasks: Vec<tokio::task::JoinHandle<Tally>>) -> Tally {
        let mut all = Tally::default();
        for task in tasks {
            let tally = task.await.expect("client task");
            all.waits.extend(tally.waits);
            all.errors.extend(tally.errors);
        }
        all
    }

    /// Prints the distribution; asserts no errors and both bounds.
    fn check(&self, what: &str) -> Duration {
        let (p99, max) = self.report(what);
        assert!(
            self.errors.is_empty(),
            "errors: {:?}",
            &self.errors[..self.errors.len().min(5)]
        );
        assert!(self.waits.len() > CLIENTS * 2, "too few checkouts to judge");
        assert!(max <= bound(), "{what}: max wait {max:?} > {:?}", bound());
        assert!(p99 <= bound(), "{what}: p99 wait {p99:?} > {:?}", bound());
        max
    }

    fn report(&self, what: &str) -> (Duration, Duration) {
        let mut waits = self.waits.clone();
        waits.sort();
        let max = waits.last().copied().unwrap_or_default();
        let p99 = waits
            .get(waits.len().saturating_mul(99) / 100)
            .copied()
            .unwrap_or_default();
        let mean = waits.iter().sum::<Duration>() / u32::try_from(waits.len().max(1)).unwrap_or(1);
        println!(
            "{what}: {} checkouts, {} errors, wait mean {mean:?} p99 {p99:?} max {max:?} (fair turn {:?}, bound {:?})",
            waits.len(),
            self.errors.len(),
            fair_turn(),
            bound()
        );
        (p99, max)
    }
}

/// The proxy's own checkout sequence (parked connection first, then the
/// queue), measured per checkout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_checkouts_are_first_come_first_served() {
    let db = support::fresh_db("pool_fairness");
    let cluster = &support::fleet().clusters[0];
    let shard = ShardConfig {
        name: "s0".to_owned(),
        url: cluster.url(&db),
        host: cluster.host().to_owned(),
        port: cluster.port(),
        user: "postgres".to_owned(),
        password: None,
        database: db.clone(),
    };
    let pool = Arc::new(ShardPool::new(
        &shard,
        0,
        &PoolConfig {
            mode: PoolMode::Transaction,
            size: POOL_SIZE,
            connect_timeout: Duration::from_secs(5),
            checkout_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            ..PoolConfig::default()
        },
    ));
    let stop_at = Instant::now() + RUN_FOR;
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while Instant::now() < stop_at {
                let asked = Instant::now();
                let checkout = match pool.checkout_parked() {
                    Some(conn) => Ok(conn),
                    None => pool.checkout().await,
                };
                match checkout {
                    Ok(mut conn) => {
                        tally.waits.push(asked.elapsed());
                        hold(&mut conn).await;
                        pool.release(conn).await;
                    }
                    Err(e) => tally.errors.push(format!("{} {e}", e.sqlstate())),
                }
            }
            tally
        }));
    }
    let all = Tally::collect(tasks).await;
    all.check("pool");
}

/// The same through the proxy with real clients: every client's statement
/// latency (its wait plus the 5 ms it holds the connection) stays bounded,
/// nobody gets 53300, and `/metrics` shows the longest wait per shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_clients_are_served_in_order() {
    let db = support::fresh_db("proxy_fairness");
    let map = support::shard_map(
        &db,
        &format!(
            "metrics: 127.0.0.1:0\npool: {{ size: {POOL_SIZE}, connect_timeout: 5s, checkout_timeout: 5s }}\n"
        ),
    );
    let server = support::start_proxy(&map).await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(support::connect_proxy(&server, "app", None).await);
    }
    let sql = format!("SELECT pg_sleep({})", HOLD.as_secs_f64());
    let stop_at = Instant::now() + RUN_FOR;
    let mut tasks = Vec::new();
    for client in clients {
        let sql = sql.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while Instant::now() < stop_at {
                let asked = Instant::now();
                match client.simple_query(&sql).await {
                    Ok(_) => tally.waits.push(asked.elapsed().saturating_sub(HOLD)),
                    Err(e) => tally.errors.push(e.to_string()),
                }
            }
            tally
        }));
    }
    let all = Tally::collect(tasks).await;
    let max = all.check("proxy");

    // The longest wait is readable per shard (it is at most the longest
    // client-side latency, and the pool was contended, so above 0).
    let address = server.metrics_address.expect("metrics address");
    let text = support::scrape_metrics(address).await;
    let series = "shardgate_pool_wait_max_seconds{shard=\"s0\"} ";
    let wait_max: f64 = text
        .lines()
        .find_map(|line| line.strip_prefix(series))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series:?} in /metrics:\n{text}"));
    assert!(wait_max > 0.0, "{wait_max}");
    assert!(
        wait_max <= max.as_secs_f64() + HOLD.as_secs_f64() + 0.05,
        "{wait_max} vs {max:?}"
    );
    server.stop().await;
}

/// Fail fast survives the gate: checkouts queued behind the pool's permits
/// hear a connect failure as soon as it happens, not after
/// `checkout_timeout` (a server that accepts TCP and never answers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_checkouts_hear_a_connect_failure_at_once() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let shard = ShardConfig {
        name: "s7".to_owned(),
        url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        host: "127.0.0.1".to_owned(),
        port,
        user: "postgres".to_owned(),
        password: None,
        database: "postgres".to_owned(),
    };
    let connect_timeout = Duration::from_millis(700);
    let pool = Arc::new(ShardPool::new(
        &shard,
        7,
        &PoolConfig {
            mode: PoolMode::Transaction,
            size: 2,
            connect_timeout,
            checkout_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            ..PoolConfig::default()
        },
    ));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let result = pool.checkout().await.map(|_| ());
            (result, started.elapsed())
        }));
    }
    for task in tasks {
        let (result, elapsed) = task.await.expect("checkout task");
        let err = result.expect_err("nothing answers");
        assert_eq!(err.sqlstate(), "08006", "{err}");
        assert!(
            err.to_string()
                .contains("no answer within connect_timeout (700ms)"),
            "{err}"
        );
        assert!(elapsed < connect_timeout * 4, "{elapsed:?}: {err}");
    }
    drop(silent);
}
