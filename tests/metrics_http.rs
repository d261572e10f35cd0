//! The metrics HTTP endpoint, exercised with a raw TCP client so the exact
//! bytes on the wire (status lines, framing, connection handling) are checked.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shardgate::metrics::http::{serve_with_limits, Limits};
use shardgate::metrics::{serve, Metrics, Route};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(5);

/// Binds a free port and serves `metrics` there; the task ends with the test runtime.
async fn start(metrics: Arc<Metrics>, refreshes: Arc<AtomicUsize>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("local_addr");
    tokio::spawn(serve(metrics, listener, move || {
        refreshes.fetch_add(1, Ordering::SeqCst);
    }));
    address
}

/// Sends `request` and reads until the server closes the connection.
async fn exchange(address: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream.write_all(request).await.expect("write");
    read_to_close(&mut stream).await
}

async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut response = Vec::new();
    timeout(LIMIT, stream.read_to_end(&mut response))
        .await
        .expect("server did not close the connection in time")
        .expect("read");
    String::from_utf8(response).expect("utf-8 response")
}

/// Reads exactly one response framed by Content-Length from a kept-alive connection.
async fn read_one(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .expect("Content-Length")
                .parse()
                .expect("numeric Content-Length");
            if buf.len() >= end + 4 + length {
                return String::from_utf8(buf[..end + 4 + length].to_vec()).expect("utf-8");
            }
        }
        let n = timeout(LIMIT, stream.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "connection closed mid-response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn serves_metrics_health_and_errors() {
    let metrics = Metrics::new(&["s0".to_owned(), "s1".to_owned()]);
    for _ in 0..3 {
        metrics.query_done(0, Route::Single, Duration::from_micros(300));
    }
    let refreshes = Arc::new(AtomicUsize::new(0));
    let address = start(metrics.clone(), refreshes.clone()).await;

    let response = exchange(
        address,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(
        response.contains("\r\nContent-Type: text/plain; version=0.0.4"),
        "{response}"
    );
    assert!(
        response.contains("\nshardgate_queries_total{route=\"single\",shard=\"s0\"} 3\n"),
        "{response}"
    );
    assert!(response.contains("# TYPE shardgate_backend_up gauge"));
    assert_eq!(refreshes.load(Ordering::SeqCst), 1, "refresh before render");

    let response = exchange(address, b"GET /healthz HTTP/1.0\r\n\r\n").await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.ends_with("\r\n\r\nok"), "{response}");

    let response = exchange(address, b"GET /nope HTTP/1.0\r\n\r\n").await;
    assert!(response.starts_with("HTTP/1.1 404 "), "{response}");

    let response = exchange(address, b"POST /metrics HTTP/1.0\r\n\r\n").await;
    assert!(response.starts_with("HTTP/1.1 405 "), "{response}");

    for garbage in [
        &b"hello there\r\n\r\n"[..],
        b"GET /metrics HTTP/9\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
    ] {
        let response = exchange(address, garbage).await;
        assert!(
            response.starts_with("HTTP/1.1 400 "),
            "{garbage:?} -> {response}"
        );
    }
}

#[tokio::test]
async fn refuses_oversized_requests() {
    let address = start(Metrics::new(&["s0"]), Arc::default()).await;

    // One huge header: refused once 8 KiB have arrived, before the end.
    let mut request = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
    request.extend(std::iter::repeat_n(b'a', 20 * 1024));
    request.extend_from_slice(b"\r\n\r\n");
    let response = exchange(address, &request).await;
    assert!(response.starts_with("HTTP/1.1 431 "), "{response}");

    // Many small headers adding up to more than 8 KiB.
    let mut request = b"GET /metrics HTTP/1.1\r\n".to_vec();
    for i in 0..1000 {
        request.extend_from_slice(format!("X-H{i}: value\r\n").as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    let response = exchange(address, &request).await;
    assert!(response.starts_with("HTTP/1.1 431 "), "{response}");

    // A request line without an end.
    let mut request = b"GET /".to_vec();
    request.extend(std::iter::repeat_n(b'a', 16 * 1024));
    let response = exchange(address, &request).await;
    assert!(response.starts_with("HTTP/1.1 431 "), "{response}");
}

#[tokio::test]
async fn keep_alive_and_pipelining() {
    let metrics = Metrics::new(&["s0"]);
    let refreshes = Arc::new(AtomicUsize::new(0));
    let address = start(metrics.clone(), refreshes.clone()).await;
    let mut stream = TcpStream::connect(address).await.expect("connect");

    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let first = read_one(&mut stream).await;
    assert!(first.contains("Connection: keep-alive"), "{first}");
    assert!(first.ends_with("ok"), "{first}");

    metrics.query_done(0, Route::Fanout, Duration::from_millis(1));
    // Two pipelined requests in one write; HEAD gets headers only.
    stream
        .write_all(
            b"HEAD /metrics HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("write");
    let rest = read_to_close(&mut stream).await;
    let (head, get) = rest.split_once("\r\n\r\n").expect("two responses");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{rest}");
    assert!(get.starts_with("HTTP/1.1 200 OK"), "{rest}");
    assert!(get.contains("Connection: close"), "{rest}");
    assert!(
        get.contains("shardgate_queries_total{route=\"fanout\",shard=\"s0\"} 1"),
        "{rest}"
    );
    assert_eq!(refreshes.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn slow_clients_do_not_block_others() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("local_addr");
    let limits = Limits {
        read_timeout: Duration::from_millis(300),
        max_connections: 4,
        ..Limits::default()
    };
    tokio::spawn(serve_with_limits(
        Metrics::new(&["s0"]),
        listener,
        || {},
        limits,
    ));

    // More idle and half-sent connections than the server serves at once.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(address).await.expect("connect"));
    }
    let mut partial = TcpStream::connect(address).await.expect("connect");
    partial
        .write_all(b"GET /metrics HTTP/1.1\r\nHost")
        .await
        .expect("write");

    // Still answered once the stragglers time out.
    let response = timeout(LIMIT, exchange(address, b"GET /healthz HTTP/1.0\r\n\r\n"))
        .await
        .expect("served despite slow clients");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");

    // The idle ones are closed silently, the half-sent one gets 408.
    for mut stream in idle {
        assert_eq!(read_to_close(&mut stream).await, "");
    }
    let response = read_to_close(&mut partial).await;
    assert!(response.starts_with("HTTP/1.1 408 "), "{response}");
}
