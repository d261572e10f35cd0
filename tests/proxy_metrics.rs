//! `/metrics` of a running proxy counts what its clients did.

mod support;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn scrape(address: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut text = String::new();
    stream.read_to_string(&mut text).await.expect("read");
    text
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
