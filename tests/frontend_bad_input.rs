//! Bad input never panics or hangs shardgate, and leaves backends clean:
//! garbage, invalid lengths, oversized and truncated messages, unknown
//! message types, clients vanishing mid-COPY or mid-result, random bytes.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use support::wire::{self, read_to_close, Wire};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Counts panics anywhere in the process (including proxy tasks).
fn panic_counter() -> Arc<AtomicUsize> {
    static COUNTER: std::sync::OnceLock<Arc<AtomicUsize>> = std::sync::OnceLock::new();
    COUNTER
        .get_or_init(|| {
            let counter = Arc::new(AtomicUsize::new(0));
            let seen = counter.clone();
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                seen.fetch_add(1, Ordering::SeqCst);
                previous(info);
            }));
            counter
        })
        .clone()
}

fn fatal_code(bytes: &[u8]) -> Option<String> {
    let start = bytes.iter().position(|b| *b == b'E')?;
    let msg = wire::Msg {
        tag: b'E',
        body: bytes.get(start + 5..)?.to_vec(),
    };
    msg.error_code()
}

async fn still_serves(port: u16, db: &str) {
    let mut client = Wire::connect(port, "app", db).await;
    let answer = client.exchange(&wire::query("SELECT 'alive'"), 1).await;
    assert!(
        answer.iter().any(|m| m.tag == b'D'),
        "proxy must keep serving"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_a_clean_error_or_close() {
    let panics = panic_counter();
    let before = panics.load(Ordering::SeqCst);
    let db = support::fresh_db("bad_input");
    let server = support::start_proxy(&support::shard_map(&db, "pool: { size: 2 }\n")).await;
    let port = server.address.port();

    // Garbage before startup.
    let mut stream = TcpStream::connect(server.address).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    read_to_close(&mut stream).await;

    // A startup packet without a user: 28000.
    let mut stream = TcpStream::connect(server.address).await.expect("connect");
    let mut packet = 9i32.to_be_bytes().to_vec();
    packet.extend_from_slice(&196608i32.to_be_bytes());
    packet.push(0);
    stream.write_all(&packet).await.expect("send");
    let answer = read_to_close(&mut stream).await;
    assert_eq!(fatal_code(&answer).as_deref(), Some("28000"));

    // Unsupported protocol version.
    let mut stream = TcpStream::connect(server.address).await.expect("connect");
    let mut packet = 9i32.to_be_bytes().to_vec();
    packet.extend_from_slice(&(2i32 << 16).to_be_bytes());
    packet.push(0);
    stream.write_all(&packet).await.expect("send");
    read_to_close(&mut stream).await;

    // After authentication: invalid length, oversized length (54000,
    // program_limit_exceeded, refused from the header), unknown type.
    for (bad, code) in [
        (vec![b'Q', 0, 0, 0, 2], "08P01"),
        (vec![b'Q', 0x7f, 0xff, 0xff, 0xff], "54000"),
        (vec![b'Q', 0xff, 0xff, 0xff, 0xf0], "08P01"),
        (vec![b'z', 0, 0, 0, 4], "08P01"),
        // Parse with a parameter count that does not match its length.
        (vec![b'P', 0, 0, 0, 10, 0, b'x', 0, 0, 9, 0], "08P01"),
    ] {
        let mut client = Wire::connect(port, "app", &db).await;
        client.send(&bad).await;
        let answer = read_to_close(&mut client.stream).await;
        assert_eq!(fatal_code(&answer).as_deref(), Some(code), "for {bad:?}");
    }

    // A truncated message, then the client goes away.
    let mut client = Wire::connect(port, "app", &db).await;
    client.send(&wire::query("SELECT 1")[..6]).await;
    drop(client);

    // A client that asks for TLS (not configured) and then sends garbage.
    let mut stream = TcpStream::connect(server.address).await.expect("connect");
    let mut ssl = 8i32.to_be_bytes().to_vec();
    ssl.extend_from_slice(&80877103i32.to_be_bytes());
    stream.write_all(&ssl).await.expect("send");
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await.expect("ssl answer");
    assert_eq!(answer[0], b'N', "TLS is refused when not configured");
    stream
        .write_all(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5])
        .await
        .expect("send");
    drop(stream);

    // GSSAPI encryption is refused with 'N'; the client may then start up in the clear.
    let mut stream = TcpStream::connect(server.address).await.expect("connect");
    let mut gss = 8i32.to_be_bytes().to_vec();
    gss.extend_from_slice(&80877104i32.to_be_bytes());
    stream.write_all(&gss).await.expect("send");
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await.expect("gssenc answer");
    assert_eq!(answer[0], b'N', "GSSENC is refused");
    stream
        .write_all(&wire::startup_packet("app", &db, &[]))
        .await
        .expect("startup after refusal");
    let mut startup = Vec::new();
    let mut buf = [0u8; 1024];
    while !startup.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I']) {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("startup answer in time")
            .expect("read");
        assert!(n > 0, "closed during startup after GSSENC refusal");
        startup.extend_from_slice(&buf[..n]);
    }

    still_serves(port, &db).await;
    assert_eq!(panics.load(Ordering::SeqCst), before, "a panic happened");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_vanishing_mid_copy_or_mid_result_leave_the_backend_clean() {
    let db = support::fresh_db("bad_vanish");
    let shard = support::connect(&support::fleet().clusters[0], &db).await;
    shard
        .batch_execute("CREATE TABLE t (v int)")
        .await
        .expect("create");
    // One backend: whoever comes next gets the same connection.
    let server = support::start_proxy(&support::shard_map(&db, "pool: { size: 1 }\n")).await;
    let port = server.address.port();

    let mut client = Wire::connect(port, "app", &db).await;
    client.send(&wire::query("COPY t FROM STDIN")).await;
    let response = client.recv().await.expect("CopyInResponse");
    assert_eq!(response.tag, b'G');
    client.send(&wire::copy_data(b"1\n2\n3\n")).await;
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut client = Wire::connect(port, "app", &db).await;
    client
        .send(&wire::query("SELECT generate_series(1, 2000000)"))
        .await;
    let first = client.recv().await.expect("RowDescription");
    assert_eq!(first.tag, b'T');
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut next = Wire::connect(port, "app", &db).await;
    let answer = next
        .exchange(&wire::query("SELECT count(*) FROM t; SELECT 'clean'"), 1)
        .await;
    let rows: Vec<String> = answer
        .iter()
        .filter(|m| m.tag == b'D')
        .map(wire::Msg::normalized)
        .collect();
    assert_eq!(rows.len(), 2, "{answer:?}");
    assert!(
        rows[0].contains("\\u{1}0"),
        "the abandoned COPY must not be committed: {rows:?}"
    );
    let status = answer.last().expect("ready");
    assert_eq!(status.body, b"I");
    server.stop().await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Random bytes after a successful startup: the proxy answers or closes,
    /// never panics, and keeps serving other clients.
    #[test]
    fn random_bytes_after_startup_never_break_the_proxy(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..6),
        valid_prefix in any::<bool>(),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        runtime.block_on(async {
            let panics = panic_counter();
            let before = panics.load(Ordering::SeqCst);
            let db = fuzz_db();
            let server = support::start_proxy(&support::shard_map(db, "pool: { size: 2 }\n")).await;
            let port = server.address.port();
            let mut client = Wire::connect(port, "app", db).await;
            if valid_prefix {
                client.send(&wire::parse("", "SELECT 1", &[])).await;
            }
            for chunk in &chunks {
                let _ = client.stream.write_all(chunk).await;
            }
            let _ = client.stream.write_all(&wire::sync()).await;
            // Give the proxy a moment to react, then go away.
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_millis(50), client.stream.read(&mut buf)).await;
            drop(client);
            still_serves(port, db).await;
            prop_assert_eq!(panics.load(Ordering::SeqCst), before);
            server.stop().await;
            Ok(())
        })?;
    }
}

fn fuzz_db() -> &'static str {
    static DB: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DB.get_or_init(|| support::fresh_db("bad_fuzz"))
}

/// A client that pipelines many requests with large answers, reading them
/// concurrently, must not stall: shardgate has to keep reading the backend
/// while it writes to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_pipeline_with_large_answers_does_not_stall() {
    let db = support::fresh_db("bad_pipeline");
    let server = support::start_proxy(&support::shard_map(&db, "")).await;
    let client = Wire::connect(server.address.port(), "app", &db).await;
    let (mut read_half, mut write_half) = client.stream.into_split();
    const QUERIES: usize = 300;
    let writer = tokio::spawn(async move {
        // Large requests and large answers: each write to the backend is big.
        let padding = "-".repeat(400_000);
        let query = wire::query(&format!("SELECT repeat('x', 400000) /* {padding} */"));
        for _ in 0..QUERIES {
            write_half.write_all(&query).await.expect("write pipeline");
        }
        write_half
    });
    let reader = tokio::spawn(async move {
        let mut ready = 0;
        let mut buf = vec![0u8; 1 << 16];
        let mut pending: Vec<u8> = Vec::new();
        while ready < QUERIES {
            let n = read_half.read(&mut buf).await.expect("read");
            assert!(n > 0, "connection closed after {ready} answers");
            pending.extend_from_slice(&buf[..n]);
            let mut at = 0;
            while pending.len() - at >= 5 {
                let len = i32::from_be_bytes([
                    pending[at + 1],
                    pending[at + 2],
                    pending[at + 3],
                    pending[at + 4],
                ]) as usize;
                if pending.len() - at < len + 1 {
                    break;
                }
                if pending[at] == b'Z' {
                    ready += 1;
                }
                at += len + 1;
            }
            pending.drain(..at);
        }
        ready
    });
    let answered = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the pipeline stalled")
        .expect("reader task");
    assert_eq!(answered, QUERIES);
    drop(writer.await.expect("writer task"));
    server.stop().await;
}

/// Malformed messages during a SCRAM login (found by tests/fuzz: pgwire
/// panicked on each): a FATAL 08P01, the connection closed, no panic, and
/// the proxy serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_login_messages_get_a_clean_error() {
    let panics = panic_counter();
    let before = panics.load(Ordering::SeqCst);
    let db = support::fresh_db("bad_login");
    let server = support::start_proxy(&support::shard_map(
        &db,
        "auth: scram-sha-256\nusers:\n  - { name: app, password: \"pw-app\" }\n",
    ))
    .await;
    let mut sasl_initial = b"SCRAM-SHA-256\0\0\0\0\x20".to_vec();
    sasl_initial.extend_from_slice(b"n,,n=,r=rOprNGfwEbeRWgbNEkqO");
    let mut bad_sasl = vec![b'p'];
    bad_sasl.extend_from_slice(&(sasl_initial.len() as i32 + 4).to_be_bytes());
    bad_sasl.extend_from_slice(&sasl_initial);
    let cases: [(&str, Vec<u8>); 3] = [
        (
            "SASL initial response announcing more than it carries",
            bad_sasl,
        ),
        (
            "password message shorter than its length field",
            vec![b'p', 0, 0, 0, 2],
        ),
        ("a Bind during login", vec![b'B', 0, 0, 0, 4]),
    ];
    for (what, message) in cases {
        let mut stream = TcpStream::connect(server.address).await.expect("connect");
        stream
            .write_all(&wire::startup_packet("app", &db, &[]))
            .await
            .expect("startup");
        // AuthenticationSASL arrives first.
        let mut head = [0u8; 5];
        stream.read_exact(&mut head).await.expect("auth request");
        assert_eq!(head[0], b'R', "{what}");
        let rest = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
        let mut body = vec![0u8; rest];
        stream
            .read_exact(&mut body)
            .await
            .expect("auth request body");
        stream.write_all(&message).await.expect("bad message");
        let answer = read_to_close(&mut stream).await;
        assert_eq!(
            fatal_code(&answer).as_deref(),
            Some("08P01"),
            "{what}: {answer:?}"
        );
    }
    assert_eq!(panics.load(Ordering::SeqCst), before, "no panic");
    let client = support::connect_proxy(&server, "app", Some("pw-app")).await;
    client
        .simple_query("SELECT 1")
        .await
        .expect("proxy serves on");
    server.stop().await;
}
