//! `shardgate demo` end to end: clusters start, the proxy answers with the
//! demo schema, Ctrl-C (SIGINT) stops everything and leaves nothing behind.

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_the_example_schema_and_cleans_up_on_ctrl_c() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args(["demo", "--shards", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start shardgate demo");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut proxy_port = None;
    let mut shard_ports = Vec::new();
    let started = Instant::now();
    while proxy_port.is_none() {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("demo printed in time")
            .expect("read stdout")
            .expect("demo exited early");
        if let Some(rest) = line.trim().strip_prefix("psql -h 127.0.0.1 -p ") {
            let port: u16 = rest
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .expect("port");
            if line.contains("-U app") {
                proxy_port = Some(port);
            } else {
                shard_ports.push(port);
            }
        }
    }
    assert_eq!(shard_ports.len(), 2, "two shards printed");
    let port = proxy_port.expect("proxy port");
    println!("demo up in {:?}", started.elapsed());

    // The proxy answers with the demo schema (replicated countries are on every shard).
    let output = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app", "app", "-XAtc"])
        .arg("SELECT count(*) FROM countries; /* shardgate: shard=s1 */ SELECT name FROM countries WHERE code = 'jp'")
        .output()
        .await
        .expect("psql");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains('4'), "{text}");

    // Ctrl-C: the demo stops the proxy and the clusters.
    let pid = child.id().expect("pid") as i32;
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("demo stopped in time")
        .expect("wait");
    assert!(status.success(), "demo exit status {status}");
    for shard_port in shard_ports {
        let refused = tokio::net::TcpStream::connect(("127.0.0.1", shard_port))
            .await
            .is_err();
        assert!(
            refused,
            "shard on port {shard_port} still accepts connections"
        );
    }
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "proxy still listening"
    );
}
