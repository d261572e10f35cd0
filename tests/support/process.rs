//! `shardgate serve` as a child process, for tests that measure the proxy
//! itself (its resident memory in `/proc/<pid>/status`, its log lines)
//! without the test's own allocations mixed in.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

pub struct ChildProxy {
    child: Child,
    pub port: u16,
    pub metrics_port: u16,
    log: PathBuf,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl ChildProxy {
    /// Starts the binary with `map` (from `support::shard_map`, whose
    /// `listen: 127.0.0.1:0` is replaced by a free port; a `metrics:`
    /// address is added) and waits until it listens.
    pub async fn start(map: &str) -> ChildProxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let (port, metrics_port) = (free_port(), free_port());
        let map = map.replacen(
            "listen: 127.0.0.1:0",
            &format!("listen: 127.0.0.1:{port}\nmetrics: 127.0.0.1:{metrics_port}"),
            1,
        );
        let config = dir.path().join("map.yaml");
        std::fs::write(&config, map).expect("map file");
        let map_file = config.clone();
        let log = dir.path().join("shardgate.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        // SHARDGATE_TEST_BIN: measure another build (e.g. the previous commit's).
        let binary = std::env::var("SHARDGATE_TEST_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_shardgate").to_string());
        let child = Command::new(binary)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("SHARDGATE_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .expect("shardgate serve starts");
        let mut proxy = ChildProxy {
            child,
            port,
            metrics_port,
            log,
            config: map_file,
            _dir: dir,
        };
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                panic!("shardgate exited ({status}):\n{}", proxy.log_text());
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "shardgate did not listen on {port}:\n{}",
                proxy.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        proxy
    }

    /// Replaces the map file with `map` (its `listen: 127.0.0.1:0` gets the
    /// running ports), as an operator edits it before a reload.
    #[allow(dead_code)]
    pub fn rewrite_map(&self, map: &str) {
        let map = map.replacen(
            "listen: 127.0.0.1:0",
            &format!(
                "listen: 127.0.0.1:{}\nmetrics: 127.0.0.1:{}",
                self.port, self.metrics_port
            ),
            1,
        );
        std::fs::write(&self.config, map).expect("map file rewritten");
    }

    /// Sends `signal` to the process.
    #[allow(dead_code)]
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with the pid of a child this test started.
        let sent = unsafe { libc::kill(self.pid() as i32, signal) };
        assert_eq!(sent, 0, "signal {signal} sent");
    }

    /// Waits up to 5 s for `text` in the log.
    #[allow(dead_code)]
    pub async fn wait_for_log(&self, text: &str) -> String {
        for _ in 0..50 {
            let log = self.log_text();
            if log.contains(text) {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{text:?} not logged within 5 s:\n{}", self.log_text());
    }

    /// Waits for the process to exit, at most `limit`.
    #[allow(dead_code)]
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("still running after {limit:?}:\n{}", self.log_text()))
            .expect("wait for the child")
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the proxy is running")
    }

    /// The proxy's resident set (VmRSS) in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/<pid>/status");
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `/metrics` page.
    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .await
            .expect("metrics listener");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .expect("request");
        let mut page = String::new();
        stream.read_to_string(&mut page).await.expect("response");
        page
    }

    /// The value of one series line of `/metrics` (0 when absent).
    pub async fn metric(&self, series: &str) -> f64 {
        let page = self.metrics().await;
        page.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }
}
