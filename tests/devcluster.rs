//! Acceptance tests for `shardgate::devcluster`: real clusters start with the
//! expected settings, survive kill -9 + restart with committed data intact,
//! and leave no process or directory behind after drop, panic, abort,
//! atexit-only cleanup, or SIGKILL of the owning process.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shardgate::devcluster::{base_dir, DevCluster, DevFleet, DIR_PREFIX};

const CRASH_MODE_ENV: &str = "SHARDGATE_DEVCLUSTER_CRASH_MODE";

/// Not a zombie and still in the process table.
fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(')').unwrap().1.trim_start().chars().next();
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// Live processes whose command line or working directory refers to `root`:
/// the postmaster (`-D root/data`), its children (cwd = data dir) and the
/// watchdog shell (root is an argument).
fn processes_mentioning(root: &Path) -> Vec<(i32, String)> {
    let needle = root.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == std::process::id() as i32 || !pid_alive(pid) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let cwd = std::fs::read_link(entry.path().join("cwd"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if cmdline.contains(&needle) || cwd.starts_with(&needle) {
            found.push((pid, format!("cmdline={cmdline:?} cwd={cwd:?}")));
        }
    }
    found
}

/// Temp dirs created by the process `pid` (clusters and its template).
fn dirs_of_process(pid: u32) -> Vec<PathBuf> {
    let prefix = format!("{DIR_PREFIX}{pid}-");
    std::fs::read_dir(base_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

fn cluster_root(c: &DevCluster) -> PathBuf {
    c.data_dir().parent().unwrap().to_path_buf()
}

#[tokio::test]
async fn fleet_settings_kill_restart_and_cleanup() {
    let t = Instant::now();
    let mut fleet = DevFleet::start(3, "accept").unwrap();
    eprintln!("DevFleet::start(3) took {:?}", t.elapsed());
    assert_eq!(fleet.clusters.len(), 3);

    let mut ports: Vec<u16> = fleet.clusters.iter().map(|c| c.port()).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 3, "clusters must have distinct ports");

    for (i, c) in fleet.clusters.iter().enumerate() {
        assert_eq!(c.name(), format!("accept{i}"));
        assert_eq!(c.host(), "127.0.0.1");
        assert_eq!(
            c.url("db1"),
            format!("postgres://postgres@127.0.0.1:{}/db1", c.port())
        );
        assert!(c.is_running());
        let root = cluster_root(c);
        assert!(root
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(DIR_PREFIX));
        assert!(root.starts_with(base_dir()));

        // Through psql ...
        assert_eq!(
            c.psql("postgres", "SHOW max_prepared_transactions")
                .unwrap(),
            "64"
        );
        assert_eq!(
            c.psql("postgres", "SHOW port").unwrap(),
            c.port().to_string()
        );
        assert_eq!(c.psql("postgres", "SHOW fsync").unwrap(), "off");
        assert_eq!(
            c.psql("postgres", "SHOW listen_addresses").unwrap(),
            "127.0.0.1"
        );
        assert_eq!(
            c.psql("postgres", "SHOW unix_socket_directories").unwrap(),
            root.to_string_lossy()
        );
        // ... and through tokio-postgres.
        let client = support::connect(c, "postgres").await;
        let row = client
            .query_one(
                "SELECT current_setting('max_connections'), current_user, 6 * 7",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "200");
        assert_eq!(row.get::<_, String>(1), "postgres");
        assert_eq!(row.get::<_, i32>(2), 42);
        let row = client
            .query_one("SELECT pg_encoding_to_char(encoding), datcollate FROM pg_database WHERE datname = 'postgres'", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "UTF8");
        assert!(row.get::<_, String>(1).starts_with('C'));
    }

    // psql errors carry the server's message.
    let err = fleet.clusters[0]
        .psql("postgres", "SELECT * FROM no_such_table")
        .unwrap_err();
    assert!(err.to_string().contains("no_such_table"), "{err}");

    fleet.create_database("app").unwrap();
    let victim = &mut fleet.clusters[1];
    victim
        .psql(
            "app",
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             BEGIN; INSERT INTO t VALUES (1, 'before kill'); COMMIT;",
        )
        .unwrap();
    // A prepared transaction must survive the crash too.
    victim
        .psql(
            "app",
            "BEGIN; INSERT INTO t VALUES (2, 'prepared'); PREPARE TRANSACTION 'gx1';",
        )
        .unwrap();
    let client = support::connect(victim, "app").await;
    let port = victim.port();
    let old_pid = victim.postmaster_pid().unwrap();

    let t = Instant::now();
    victim.kill().unwrap();
    eprintln!("kill took {:?}", t.elapsed());
    assert!(!pid_alive(old_pid), "postmaster must be dead after kill");
    assert!(!victim.is_running());
    assert_eq!(victim.postmaster_pid(), None);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    assert!(
        tokio_postgres::connect(&victim.url("app"), tokio_postgres::NoTls)
            .await
            .is_err()
    );
    assert!(victim.psql("app", "SELECT 1").is_err());
    assert!(
        client.query_one("SELECT 1", &[]).await.is_err(),
        "old session must be gone"
    );

    let t = Instant::now();
    victim.restart().unwrap();
    eprintln!("restart after kill (crash recovery) took {:?}", t.elapsed());
    assert_eq!(victim.port(), port, "restart must reuse the port");
    let new_pid = victim.postmaster_pid().unwrap();
    assert_ne!(new_pid, old_pid);
    assert_eq!(
        victim.psql("app", "SELECT v FROM t ORDER BY id").unwrap(),
        "before kill"
    );
    assert_eq!(
        victim
            .psql("app", "SELECT gid FROM pg_prepared_xacts")
            .unwrap(),
        "gx1"
    );
    victim.psql("app", "COMMIT PREPARED 'gx1'").unwrap();
    let client = support::connect(victim, "app").await;
    let n: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    drop(client);

    // Clean stop + restart keeps data as well.
    victim.stop().unwrap();
    assert!(!victim.is_running());
    assert!(!pid_alive(new_pid));
    victim.restart().unwrap();
    assert_eq!(victim.psql("app", "SELECT count(*) FROM t").unwrap(), "2");

    // The other clusters were unaffected.
    for i in [0, 2] {
        assert_eq!(fleet.clusters[i].psql("app", "SELECT 1").unwrap(), "1");
    }

    let pids: Vec<i32> = fleet
        .clusters
        .iter()
        .map(|c| c.postmaster_pid().unwrap())
        .collect();
    let roots: Vec<PathBuf> = fleet.clusters.iter().map(cluster_root).collect();
    for r in &roots {
        assert!(
            !processes_mentioning(r).is_empty(),
            "watchdog/postmaster expected for {r:?}"
        );
    }
    let t = Instant::now();
    drop(fleet);
    eprintln!("dropping the fleet took {:?}", t.elapsed());
    for pid in pids {
        assert!(!pid_alive(pid), "postmaster {pid} still alive after drop");
    }
    for r in &roots {
        assert!(!r.exists(), "{r:?} still exists after drop");
        let left = processes_mentioning(r);
        assert!(left.is_empty(), "processes left for {r:?}: {left:?}");
    }
}

#[tokio::test]
async fn shared_fleet_gives_isolated_databases() {
    let fleet = support::fleet();
    assert_eq!(fleet.clusters.len(), support::FLEET_SIZE);
    let a = support::fresh_db("shared fleet/Isolation");
    let b = support::fresh_db("shared fleet/Isolation");
    assert_ne!(a, b);
    assert!(a.starts_with("t_shared_fleet_isolation_"), "{a}");
    for c in &fleet.clusters {
        let ca = support::connect(c, &a).await;
        ca.batch_execute("CREATE TABLE only_in_a (x int); INSERT INTO only_in_a VALUES (1)")
            .await
            .unwrap();
        let cb = support::connect(c, &b).await;
        let err = cb.query("SELECT * FROM only_in_a", &[]).await.unwrap_err();
        assert!(err.to_string().contains("only_in_a") || err.code().is_some());
        let db: String = cb
            .query_one("SELECT current_database()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(db, b);
    }
    // Same object, not a second fleet.
    assert!(std::ptr::eq(fleet, support::fleet()));
}

#[test]
fn start_failure_reports_command_and_server_log() {
    let mut c = DevCluster::start("broken").unwrap();
    c.stop().unwrap();
    let conf = c.data_dir().join("postgresql.conf");
    let original = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, format!("{original}\nshared_buffers = 'lots'\n")).unwrap();
    let err = c.restart().unwrap_err().to_string();
    assert!(err.contains("pg_ctl"), "{err}");
    assert!(err.contains("shared_buffers"), "log tail missing: {err}");
    assert!(!c.is_running());
    std::fs::write(&conf, original).unwrap();
    c.restart().unwrap();
    assert_eq!(c.psql("postgres", "SELECT 1").unwrap(), "1");
}

/// What the crash helper child reported about its cluster.
struct ChildCluster {
    child_pid: u32,
    root: PathBuf,
    postmaster: i32,
}

fn parse_report(line: &str, root: &mut Option<PathBuf>, pm: &mut Option<i32>) {
    if let Some(v) = line.strip_prefix("DEVCLUSTER_ROOT=") {
        *root = Some(PathBuf::from(v.trim()));
    } else if let Some(v) = line.strip_prefix("DEVCLUSTER_PID=") {
        *pm = Some(v.trim().parse().unwrap());
    }
}

/// Re-run this test binary with only `crash_helper` in the given mode.
/// Returns once the helper has exited (mode `sigkill`: once it was killed).
fn run_crash_helper(mode: &str) -> (ChildCluster, std::process::ExitStatus) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_helper", "--ignored", "--nocapture"])
        .env(CRASH_MODE_ENV, mode)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let child_pid = child.id();
    let mut root = None;
    let mut pm = None;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        parse_report(&line.unwrap(), &mut root, &mut pm);
        if root.is_some() && pm.is_some() {
            break;
        }
    }
    let (Some(root), Some(postmaster)) = (root, pm) else {
        let _ = child.kill();
        panic!(
            "helper ({mode}) did not report its cluster: {:?}",
            child.wait()
        );
    };
    assert!(
        pid_alive(postmaster),
        "helper's postmaster should be running"
    );
    assert!(root.exists());
    if mode == "sigkill" {
        child.kill().unwrap();
    } else {
        // Drain the rest so the helper never blocks on a full pipe.
        for _ in lines {}
    }
    // Reap it: a zombie owner would still hold nothing, but be tidy.
    let status = child.wait().unwrap();
    (
        ChildCluster {
            child_pid,
            root,
            postmaster,
        },
        status,
    )
}

fn assert_cleaned(c: &ChildCluster, within: Duration) {
    let t = Instant::now();
    let gone = wait_until(within, || {
        !pid_alive(c.postmaster)
            && !c.root.exists()
            && processes_mentioning(&c.root).is_empty()
            && dirs_of_process(c.child_pid).is_empty()
    });
    assert!(
        gone,
        "not cleaned within {within:?}: postmaster alive={}, root exists={}, procs={:?}, dirs={:?}",
        pid_alive(c.postmaster),
        c.root.exists(),
        processes_mentioning(&c.root),
        dirs_of_process(c.child_pid)
    );
    eprintln!("cleanup observed after {:?}", t.elapsed());
}

#[test]
fn cleanup_when_owner_panics() {
    let (c, status) = run_crash_helper("panic");
    assert!(!status.success(), "helper should fail by panicking");
    // Unwinding ran Drop (clusters) and atexit (template) before exit.
    assert_cleaned(&c, Duration::ZERO);
}

#[test]
fn cleanup_at_exit_when_cluster_is_never_dropped() {
    let (c, status) = run_crash_helper("leak");
    assert!(!status.success(), "helper should fail by panicking");
    // No Drop ran (mem::forget): only the atexit hook can have cleaned up by now.
    assert_cleaned(&c, Duration::ZERO);
}

#[test]
fn cleanup_when_owner_aborts() {
    let (c, status) = run_crash_helper("abort");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGABRT));
    assert_cleaned(&c, Duration::from_secs(10));
}

#[test]
fn cleanup_when_owner_is_sigkilled() {
    let (c, status) = run_crash_helper("sigkill");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert_cleaned(&c, Duration::from_secs(10));
}

/// Child side of the crash tests; does nothing unless the env var is set.
#[test]
#[ignore = "helper run by the crash tests in a child process"]
fn crash_helper() {
    let Ok(mode) = std::env::var(CRASH_MODE_ENV) else {
        return;
    };
    let cluster = DevCluster::start("crash").unwrap();
    println!("DEVCLUSTER_ROOT={}", cluster_root(&cluster).display());
    println!("DEVCLUSTER_PID={}", cluster.postmaster_pid().unwrap());
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    match mode.as_str() {
        "panic" => panic!("crash_helper: deliberate panic"),
        "leak" => {
            std::mem::forget(cluster);
            panic!("crash_helper: deliberate panic after leaking the cluster");
        }
        "abort" => std::process::abort(),
        "sigkill" => loop {
            std::thread::sleep(Duration::from_secs(1));
        },
        other => panic!("unknown mode {other}"),
    }
}
