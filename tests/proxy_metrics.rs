//! `/metrics` of a running proxy counts what its clients did.

mod support;

async fn scrape(address: std::net::SocketAddr) -> String {
    support::scrape_metrics(address).await
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_errors_connections_and_pools_are_counted() {
    let db = support::fresh_db("proxy_metrics");
    let server = support::start_proxy(&support::shard_map(&db, "metrics: 127.0.0.1:0\n")).await;
    let address = server.metrics_address.expect("metrics address");
    let client = support::connect_proxy(&server, "app", None).await;
    // The failing query first: tokio-postgres returns its error before the
    // ReadyForQuery that completes it, so a later query orders the scrape.
    assert!(client.simple_query("SELECT 1/0").await.is_err());
    for _ in 0..5 {
        client.simple_query("SELECT 1").await.expect("query");
    }
    client
        .simple_query("/* shardgate: shard=s2 */ SELECT 1")
        .await
        .expect("query");
    let text = scrape(address).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let s0 = value(
        &text,
        "shardgate_queries_total{route=\"single\",shard=\"s0\"}",
    )
    .expect("s0 series");
    assert!(s0 >= 6.0, "5 queries + 1 failed on s0, got {s0}");
    assert_eq!(
        value(
            &text,
            "shardgate_queries_total{route=\"single\",shard=\"s2\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            "shardgate_errors_total{shard=\"s0\",sqlstate_class=\"22\"}"
        ),
        Some(1.0)
    );
    assert_eq!(value(&text, "shardgate_client_connections"), Some(1.0));
    assert_eq!(
        value(&text, "shardgate_backend_up{shard=\"s0\"}"),
        Some(1.0)
    );
    assert!(
        value(
            &text,
            "shardgate_pool_connections{shard=\"s0\",state=\"idle\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    drop(client);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let text = scrape(address).await;
    assert_eq!(value(&text, "shardgate_client_connections"), Some(0.0));
    server.stop().await;
}

async fn wait_for_value(
    address: std::net::SocketAddr,
    series: &str,
    want: f64,
    within: std::time::Duration,
) -> String {
    let started = std::time::Instant::now();
    loop {
        let text = scrape(address).await;
        if value(&text, series) == Some(want) {
            return text;
        }
        assert!(
            started.elapsed() < within,
            "{series} is not {want} after {within:?}:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// `backend_up` tells the truth without any client traffic: 1 for a healthy
/// shard soon after startup, 0 soon after it stops; and a client then hears
/// what actually happened, with the time it took, not the configured
/// connect_timeout (issue #15-8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_up_is_right_on_an_idle_proxy_and_errors_say_what_happened() {
    let mut cluster =
        shardgate::devcluster::DevCluster::start("metrics-up").expect("start own cluster");
    let map = format!(
        "listen: 127.0.0.1:0\nmetrics: 127.0.0.1:0\nauth: trust\nusers: [ {{ name: app }} ]\n\
         pool: {{ size: 4, connect_timeout: 2s, checkout_timeout: 5s }}\n\
         shards:\n  - {{ name: s0, url: \"{}\" }}\n",
        cluster.url("postgres")
    );
    let server = support::start_proxy(&map).await;
    let address = server.metrics_address.expect("metrics address");
    let up = "shardgate_backend_up{shard=\"s0\"}";
    let text = wait_for_value(address, up, 1.0, std::time::Duration::from_secs(5)).await;
    assert_eq!(value(&text, "shardgate_client_connections"), Some(0.0));
    // The help text says what the value means.
    assert!(
        text.contains("# HELP shardgate_backend_up 1 if the shard was reachable at the last connect attempt or health probe"),
        "{text}"
    );

    // A client connected before the shard goes away (startup needs no shard).
    let client = support::connect_proxy(&server, "app", None).await;
    cluster.stop().expect("stop the shard");
    wait_for_value(
        address,
        up,
        0.0,
        // PROBE_EVERY (5 s) plus a generous margin for a loaded machine.
        std::time::Duration::from_secs(12),
    )
    .await;

    let started = std::time::Instant::now();
    let err = client
        .simple_query("SELECT 1")
        .await
        .expect_err("the shard is down");
    let elapsed = started.elapsed();
    let db = err.as_db_error().expect("an ErrorResponse");
    println!("{} after {elapsed:?}: {}", db.code().code(), db.message());
    assert_eq!(db.code().code(), "08006");
    assert!(
        db.message()
            .contains("is unavailable: connection refused after "),
        "{}",
        db.message()
    );
    assert!(
        !db.message().contains("connect_timeout"),
        "{}",
        db.message()
    );
    assert!(elapsed < std::time::Duration::from_secs(2), "{elapsed:?}");
    server.stop().await;
}

/// A statement over several shards counts once per shard it ran on and
/// records its width in `shardgate_fanout_shards` (it counted only its
/// first shard and never the width before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fanout_counts_every_shard_and_its_width() {
    let db = support::fresh_db_with(
        "fanout_metrics",
        "CREATE TABLE users (id bigint PRIMARY KEY, name text);",
    )
    .await;
    let map = support::shard_map(
        &db,
        "metrics: 127.0.0.1:0\nfunctions: { by_id: { kind: hash } }\ntables: { users: { key: id, function: by_id } }\n",
    );
    let server = support::start_proxy(&map).await;
    let address = server.metrics_address.expect("metrics address");
    let client = support::connect_proxy(&server, "app", None).await;
    for _ in 0..2 {
        client
            .simple_query("SELECT count(*) FROM users")
            .await
            .expect("fan-out");
    }
    client
        .simple_query("SELECT 1")
        .await
        .expect("order the scrape");
    let text = scrape(address).await;
    for shard in ["s0", "s1", "s2"] {
        let series = format!("shardgate_queries_total{{route=\"fanout\",shard=\"{shard}\"}}");
        assert_eq!(value(&text, &series), Some(2.0), "{series}\n{text}");
    }
    assert_eq!(
        value(&text, "shardgate_fanout_shards_count"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "shardgate_fanout_shards_sum"),
        Some(6.0),
        "{text}"
    );
    server.stop().await;
}
