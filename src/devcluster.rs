//! Throwaway PostgreSQL clusters for `shardgate demo` and the integration tests.
//!
//! A [`DevCluster`] is a private data directory under the system temp dir,
//! started with the installed server binaries on a free 127.0.0.1 port with
//! settings tuned for tests (`fsync = off`, `max_prepared_transactions = 64`,
//! trust auth for `postgres`). `initdb` runs once per process into a template
//! directory that later clusters copy, because copying is much faster.
//!
//! Cleanup is layered so that no cluster outlives its owner:
//! 1. `Drop` stops the server (`-m immediate`) and removes the directory;
//! 2. an `atexit` hook cleans every cluster still registered, for clusters
//!    held in statics (which Rust never drops);
//! 3. a detached watchdog shell per directory blocks on a pipe whose write end
//!    only the owner holds; when the owner dies in any way (panic, abort,
//!    SIGKILL) the kernel closes the pipe and the watchdog tears the cluster
//!    down. After a normal cleanup the owner kills its watchdog.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, Once, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Prefix of every directory this module creates under [`base_dir`].
pub const DIR_PREFIX: &str = "shardgate-devcluster-";

/// Environment variable that overrides [`base_dir`].
pub const BASE_DIR_ENV: &str = "SHARDGATE_DEVCLUSTER_TMPDIR";

/// Where cluster dirs go: `$SHARDGATE_DEVCLUSTER_TMPDIR` if set, else
/// [`std::env::temp_dir`]. Creating the ~1000 files of a data dir is slow on
/// some disks (about 1 s per cluster on our CI VM vs 0.1 s on tmpfs), so
/// pointing this at `/dev/shm` speeds tests up without touching `TMPDIR`.
pub fn base_dir() -> PathBuf {
    match std::env::var_os(BASE_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => std::env::temp_dir(),
    }
}

const HOST: &str = "127.0.0.1";
/// How long to wait for a server to start, stop or release its resources.
const WAIT: Duration = Duration::from_secs(60);
const START_ATTEMPTS: usize = 5;

/// Settings appended to every cluster's `postgresql.conf`; the per-cluster
/// port and socket dir live in the included `shardgate.conf` so that a
/// restart reuses them.
const BASE_SETTINGS: &str = "
# added by shardgate devcluster
listen_addresses = '127.0.0.1'
max_prepared_transactions = 64
max_connections = 200
shared_buffers = 32MB
fsync = off
synchronous_commit = off
full_page_writes = off
# Dynamic shared memory as files in the data dir (pg_dynshmem), not POSIX
# segments in /dev/shm: a killed cluster's segments then go with its dir.
dynamic_shared_memory_type = mmap
include_if_exists = 'shardgate.conf'
";

/// The watchdog: `read` blocks until the owner's write end is closed (the
/// owner exited or died), then it stops the server and removes the dir.
/// Arguments: $1 = cluster root dir, $2 = data dir, $3 = pg_ctl.
const WATCHDOG_SCRIPT: &str = r#"read _unused
[ -d "$1" ] || exit 0
pid=$(head -n 1 "$2/postmaster.pid" 2>/dev/null)
state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -c1)
case "$state" in
  ''|Z|X) ;;
  *) "$3" -D "$2" stop -m immediate -w -t 30 >/dev/null 2>&1 ;;
esac
rm -rf "$1"
"#;

/// Everything that can go wrong while managing a dev cluster.
#[derive(Debug, thiserror::Error)]
pub enum DevClusterError {
    /// No usable `initdb`/`pg_ctl`/`postgres` triple was found.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH, \
         via `pg_config --bindir`, or under /usr/lib/postgresql/*/bin; \
         install postgresql (e.g. `apt-get install postgresql`)"
    )]
    BinariesNotFound,
    /// Running as root, but there is no `postgres` OS user to run the server as.
    #[error(
        "running as root but OS user `postgres` does not exist (PostgreSQL refuses to run as root)"
    )]
    NoPostgresUser,
    /// A filesystem or process-spawning operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// An external command exited unsuccessfully.
    #[error("command `{command}` failed with {status}\nstderr: {stderr}{log_tail}")]
    Command {
        command: String,
        status: String,
        stderr: String,
        /// Tail of the cluster's server log (empty when irrelevant).
        log_tail: String,
    },
    /// A cluster did not reach the expected state in time.
    #[error("cluster `{name}`: {message}{log_tail}")]
    Cluster {
        name: String,
        message: String,
        log_tail: String,
    },
}

type Result<T, E = DevClusterError> = std::result::Result<T, E>;

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> DevClusterError {
    let context = context.into();
    move |source| DevClusterError::Io { context, source }
}

/// Recover the data from a poisoned mutex: the protected state stays
/// consistent because every critical section is a simple insert/remove.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Binaries and the OS user to run them as
// ---------------------------------------------------------------------------

/// Locations of the server binaries plus the user they must run as.
#[derive(Debug, Clone)]
struct Runner {
    initdb: PathBuf,
    pg_ctl: PathBuf,
    psql: PathBuf,
    /// `Some((uid, gid))` of `postgres` when this process runs as root.
    run_as: Option<(u32, u32)>,
}

impl Runner {
    /// Found once per process; the result is cached (errors are retried).
    fn get() -> Result<Runner> {
        static RUNNER: OnceLock<Runner> = OnceLock::new();
        if let Some(r) = RUNNER.get() {
            return Ok(r.clone());
        }
        let bindir = find_bindir().ok_or(DevClusterError::BinariesNotFound)?;
        // SAFETY: geteuid has no preconditions.
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(lookup_user("postgres").ok_or(DevClusterError::NoPostgresUser)?)
        } else {
            None
        };
        let psql = if bindir.join("psql").is_file() {
            bindir.join("psql")
        } else {
            PathBuf::from("psql")
        };
        let runner = Runner {
            initdb: bindir.join("initdb"),
            pg_ctl: bindir.join("pg_ctl"),
            psql,
            run_as,
        };
        Ok(RUNNER.get_or_init(|| runner).clone())
    }

    /// A command that runs as the server's OS user, in `cwd`, without stdin.
    fn command(&self, program: impl AsRef<OsStr>, cwd: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(cwd).stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            // std drops supplementary groups when switching away from root.
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Give `path` to the server's OS user (no-op when not root).
    fn chown(&self, path: &Path) -> Result<()> {
        let Some((uid, gid)) = self.run_as else {
            return Ok(());
        };
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|e| io_err(format!("chown {}", path.display()))(e.into()))?;
        // SAFETY: `c` is a valid NUL-terminated path.
        if unsafe { libc::chown(c.as_ptr(), uid, gid) } != 0 {
            return Err(io_err(format!("chown {} to postgres", path.display()))(
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|b| dir.join(b).is_file())
}

/// PATH first, then `pg_config --bindir`, then the newest Debian-style install.
fn find_bindir() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(dir) = std::env::split_paths(&path).find(|d| has_server_binaries(d)) {
            return Some(dir);
        }
    }
    if let Ok(out) = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .output()
    {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_server_binaries(&dir) {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version: Vec<u32> = name
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            let bin = e.path().join("bin");
            has_server_binaries(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids).
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the stated buffer length.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
}

// ---------------------------------------------------------------------------
// Small process and OS helpers
// ---------------------------------------------------------------------------

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Run to completion; non-zero exit becomes [`DevClusterError::Command`].
fn run(cmd: &mut Command, log: Option<&Path>) -> Result<Output> {
    let desc = describe(cmd);
    let out = cmd.output().map_err(io_err(format!("spawning `{desc}`")))?;
    if out.status.success() {
        return Ok(out);
    }
    Err(DevClusterError::Command {
        command: desc,
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim_end().to_owned(),
        log_tail: log.map(log_tail).unwrap_or_default(),
    })
}

/// Last lines of a server log, formatted for appending to an error message.
fn log_tail(path: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    format!("\nlast lines of {}:\n{tail}", path.display())
}

/// PID recorded in `data_dir/postmaster.pid`, whether or not it is alive.
fn pidfile_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// True if the process exists and is not a zombie (our PID 1 may never reap
/// orphaned postmasters, so zombies must count as dead).
fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) if Path::new("/proc/self/stat").exists() => false,
        Err(_) => {
            // SAFETY: signal 0 only checks for existence.
            let rc = unsafe { libc::kill(pid, 0) };
            rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
        }
    }
}

fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Poll `cond` every 20 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ports handed out by this process, so parallel starts never pick the same one.
static USED_PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

fn pick_port() -> Result<u16> {
    for _ in 0..50 {
        let listener = TcpListener::bind((HOST, 0)).map_err(io_err("binding 127.0.0.1:0"))?;
        let port = listener
            .local_addr()
            .map_err(io_err("reading local address"))?
            .port();
        if lock(&USED_PORTS)
            .get_or_insert_with(HashSet::new)
            .insert(port)
        {
            return Ok(port);
        }
    }
    Err(io_err("picking a free port")(io::Error::new(
        io::ErrorKind::AddrInUse,
        "kernel kept returning ports already used by this process",
    )))
}

/// A fresh, uniquely named directory under the temp dir, owned by the server user.
fn make_root(runner: &Runner, label: &str) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let label: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = base_dir().join(format!(
            "{DIR_PREFIX}{}-{label}-{n}-{nanos:x}",
            std::process::id()
        ));
        match std::fs::create_dir(&dir) {
            Ok(()) => {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io_err(format!("chmod {}", dir.display())))?;
                runner.chown(&dir)?;
                return Ok(dir);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(format!("creating {}", dir.display()))(e)),
        }
    }
}

/// Write a small file the server user can read and later delete.
fn write_owned(runner: &Runner, path: &Path, contents: &str, append: bool) -> Result<()> {
    let ctx = || format!("writing {}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(path)
        .map_err(io_err(ctx()))?;
    f.write_all(contents.as_bytes()).map_err(io_err(ctx()))?;
    runner.chown(path)
}

// ---------------------------------------------------------------------------
// Cleanup registry, atexit hook and watchdogs
// ---------------------------------------------------------------------------

/// What is needed to tear a directory (and maybe its server) down.
struct Guard {
    runner: Runner,
    root: PathBuf,
    data_dir: PathBuf,
    watchdog: Option<Child>,
    /// Write end of the watchdog pipe; closing it (by dying) triggers the watchdog.
    pipe: Option<OwnedFd>,
}

impl Guard {
    /// Takes ownership of `root`: on error the directory is removed again.
    fn new(runner: &Runner, root: PathBuf, data_dir: PathBuf) -> Result<Guard> {
        Self::spawn_watchdog(runner, &root, &data_dir).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&root);
        })
    }

    fn spawn_watchdog(runner: &Runner, root: &Path, data_dir: &Path) -> Result<Guard> {
        let (root, data_dir) = (root.to_path_buf(), data_dir.to_path_buf());
        let mut guard = Guard {
            runner: runner.clone(),
            root,
            data_dir,
            watchdog: None,
            pipe: None,
        };
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for two descriptors; O_CLOEXEC keeps the write
        // end out of every other child, so only our own death closes it.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io_err("creating watchdog pipe")(io::Error::last_os_error()));
        }
        // SAFETY: pipe2 just returned these two fresh descriptors to us.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        guard.pipe = Some(write_end);
        let mut cmd = runner.command("/bin/sh", Path::new("/"));
        cmd.arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("shardgate-devcluster-watchdog")
            .arg(&guard.root)
            .arg(&guard.data_dir)
            .arg(&runner.pg_ctl)
            .stdin(Stdio::from(read_end))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid is async-signal-safe; a new session keeps the
        // watchdog alive when the owner's process group gets a signal.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        guard.watchdog = Some(
            cmd.spawn()
                .map_err(io_err("spawning the cluster watchdog"))?,
        );
        Ok(guard)
    }

    /// Stop the server if any, remove the dir, then retire the watchdog.
    fn cleanup(mut self) {
        if pidfile_pid(&self.data_dir).is_some_and(pid_alive) {
            let mut cmd = self.runner.command(&self.runner.pg_ctl, Path::new("/"));
            cmd.arg("-D").arg(&self.data_dir).args([
                "stop",
                "-m",
                "immediate",
                "-w",
                "-t",
                "30",
                "-s",
            ]);
            if let Err(e) = run(&mut cmd, None) {
                tracing::debug!("devcluster cleanup: {e}");
            }
        }
        match std::fs::remove_dir_all(&self.root) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("devcluster: removing {}: {e}", self.root.display()),
        }
        if let Some(mut child) = self.watchdog.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.pipe = None;
    }
}

static REGISTRY: Mutex<Vec<(u64, Guard)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Track a guard for the atexit hook; returns the key to release it.
fn register(guard: Guard) -> u64 {
    static ATEXIT: Once = Once::new();
    ATEXIT.call_once(|| {
        // SAFETY: registering a plain extern "C" fn without arguments.
        if unsafe { libc::atexit(cleanup_at_exit) } != 0 {
            tracing::warn!("devcluster: atexit registration failed; relying on watchdogs");
        }
    });
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    lock(&REGISTRY).push((id, guard));
    id
}

fn release(id: u64) {
    let guard = {
        let mut reg = lock(&REGISTRY);
        reg.iter()
            .position(|(i, _)| *i == id)
            .map(|pos| reg.swap_remove(pos).1)
    };
    if let Some(g) = guard {
        g.cleanup();
    }
}

/// Runs at process exit: clean every cluster that was never dropped
/// (e.g. held in a `static OnceLock`). Never blocks on a held lock.
extern "C" fn cleanup_at_exit() {
    let guards: Vec<Guard> = match REGISTRY.try_lock() {
        Ok(mut reg) => reg.drain(..).map(|(_, g)| g).collect(),
        Err(std::sync::TryLockError::Poisoned(e)) => {
            e.into_inner().drain(..).map(|(_, g)| g).collect()
        }
        // Another thread is mid-update; the watchdogs will handle it.
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    let _ = std::panic::catch_unwind(move || guards.into_iter().for_each(Guard::cleanup));
}

// ---------------------------------------------------------------------------
// Template (initdb once per process)
// ---------------------------------------------------------------------------

/// The per-process initdb result that new clusters copy.
static TEMPLATE: Mutex<Option<(u64, PathBuf)>> = Mutex::new(None);

/// Path of the template data dir, creating it on first use.
fn template(runner: &Runner) -> Result<PathBuf> {
    let mut slot = lock(&TEMPLATE);
    if let Some((_, data)) = slot.as_ref() {
        return Ok(data.clone());
    }
    let started = Instant::now();
    let root = make_root(runner, "template")?;
    let data = root.join("data");
    let id = register(Guard::new(runner, root.clone(), data.clone())?);
    let result = initdb(runner, &root, &data)
        .and_then(|()| write_owned(runner, &data.join("postgresql.conf"), BASE_SETTINGS, true));
    if let Err(e) = result {
        release(id);
        return Err(e);
    }
    tracing::debug!("devcluster: initdb template in {:?}", started.elapsed());
    *slot = Some((id, data.clone()));
    Ok(data)
}

fn initdb(runner: &Runner, root: &Path, data: &Path) -> Result<()> {
    let attempt = |locale: &str| {
        let mut cmd = runner.command(&runner.initdb, root);
        cmd.arg("-D")
            .arg(data)
            .args(["-U", "postgres", "--auth=trust", "--encoding=UTF8"])
            .arg(format!("--locale={locale}"))
            .args(["--no-sync", "--no-instructions"]);
        run(&mut cmd, None)
    };
    match attempt("C.UTF-8") {
        Ok(_) => Ok(()),
        // Systems without a C.UTF-8 locale still have plain C.
        Err(first) => {
            tracing::debug!("devcluster: initdb with C.UTF-8 failed, retrying with C: {first}");
            attempt("C").map(|_| ())
        }
    }
}

// ---------------------------------------------------------------------------
// DevCluster
// ---------------------------------------------------------------------------

/// One throwaway PostgreSQL cluster; stopped and deleted on drop.
#[derive(Debug)]
pub struct DevCluster {
    name: String,
    port: u16,
    root: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    runner: Runner,
    guard_id: u64,
}

impl DevCluster {
    /// Create (copy of the per-process template) and start a cluster, waiting
    /// until it accepts TCP connections.
    pub fn start(name: &str) -> Result<DevCluster, DevClusterError> {
        let started = Instant::now();
        let runner = Runner::get()?;
        let template = template(&runner)?;
        let root = make_root(&runner, name)?;
        let data_dir = root.join("data");
        let guard_id = register(Guard::new(&runner, root.clone(), data_dir.clone())?);
        let mut cluster = DevCluster {
            name: name.to_owned(),
            port: 0,
            log: root.join("postgres.log"),
            root,
            data_dir,
            runner,
            guard_id,
        };
        // On error `cluster` drops here, which releases the guard.
        let mut cp = cluster.runner.command("cp", &cluster.root);
        cp.arg("-a").arg(&template).arg(&cluster.data_dir);
        run(&mut cp, None)?;
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            cluster.port = pick_port()?;
            cluster.write_local_conf()?;
            match cluster.pg_ctl_start() {
                Ok(()) => {
                    tracing::debug!(
                        "devcluster {name}: started on port {} in {:?}",
                        cluster.port,
                        started.elapsed()
                    );
                    return Ok(cluster);
                }
                // Someone else grabbed the port between pick and bind: pick again.
                Err(e) if cluster.log_says_port_taken() => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| cluster.fail("could not start")))
    }

    /// Name given at start (used in the dir name and messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// TCP port on 127.0.0.1; stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Always `127.0.0.1`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// The cluster's data directory (inside its private temp dir).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// `postgres://postgres@127.0.0.1:PORT/DATABASE` (trust auth, no password).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@{HOST}:{}/{database}", self.port)
    }

    /// PID of the live postmaster, or `None` if it is stopped or dead.
    pub fn postmaster_pid(&self) -> Option<i32> {
        pidfile_pid(&self.data_dir).filter(|pid| pid_alive(*pid))
    }

    /// True while a postmaster for this data dir is alive.
    pub fn is_running(&self) -> bool {
        self.postmaster_pid().is_some()
    }

    /// Clean shutdown (`pg_ctl stop -m fast`), waiting until it has exited.
    pub fn stop(&mut self) -> Result<(), DevClusterError> {
        let mut cmd = self.pg_ctl();
        cmd.args(["stop", "-m", "fast", "-w", "-t", "60", "-s"]);
        run(&mut cmd, Some(&self.log))?;
        Ok(())
    }

    /// Simulate a crash: SIGKILL the postmaster, then wait until its port is
    /// closed and its backends have detached from shared memory (so that a
    /// [`restart`](Self::restart) does crash recovery instead of failing).
    pub fn kill(&mut self) -> Result<(), DevClusterError> {
        let Some(pid) = self.postmaster_pid() else {
            return Err(self.fail("kill: no running postmaster"));
        };
        let shmid = self.shmem_id();
        // SAFETY: plain kill(2) on a pid we just verified belongs to our postmaster.
        if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
            return Err(io_err(format!("kill -9 {pid}"))(io::Error::last_os_error()));
        }
        if !wait_until(WAIT, || !pid_alive(pid)) {
            return Err(self.fail(&format!("postmaster {pid} survived SIGKILL")));
        }
        if !wait_until(WAIT, || !port_open(self.port)) {
            return Err(self.fail("port still accepts connections after kill"));
        }
        if let Some(shmid) = shmid {
            if !wait_until(WAIT, || shmem_attached(shmid) == 0) {
                return Err(self.fail("orphaned backends kept shared memory attached"));
            }
        }
        // The dead postmaster may linger as a zombie until PID 1 reaps it, and
        // postgres treats a lock file naming a zombie as "server running". We
        // know it is dead, so remove its stale lock files.
        for lock in [
            self.data_dir.join("postmaster.pid"),
            self.root.join(format!(".s.PGSQL.{}.lock", self.port)),
        ] {
            match std::fs::remove_file(&lock) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format!("removing {}", lock.display()))(e)),
            }
        }
        Ok(())
    }

    /// Start again on the same port after [`stop`](Self::stop) or
    /// [`kill`](Self::kill) (crash recovery runs), waiting until ready.
    pub fn restart(&mut self) -> Result<(), DevClusterError> {
        if self.is_running() {
            self.stop()?;
        }
        let mut last = None;
        for _ in 0..3 {
            match self.pg_ctl_start() {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Err(last.unwrap_or_else(|| self.fail("restart failed")))
    }

    /// Run SQL (one or more statements) with `psql -XAtq` and return stdout
    /// without its final newline; errors carry psql's stderr.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, DevClusterError> {
        let mut cmd = Command::new(&self.runner.psql);
        cmd.args([
            "-XAtq",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            HOST,
            "-U",
            "postgres",
        ])
        .arg("-p")
        .arg(self.port.to_string())
        .arg("-d")
        .arg(database)
        .args(["-f", "-"])
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGOPTIONS")
        .env_remove("PGSERVICE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let desc = format!("psql -d {database} -p {} <<< {sql:?}", self.port);
        let mut child = cmd.spawn().map_err(io_err(format!("spawning `{desc}`")))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A write error means psql exited early; its stderr says why.
            let _ = stdin.write_all(sql.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(io_err(format!("waiting for `{desc}`")))?;
        if !out.status.success() {
            return Err(DevClusterError::Command {
                command: desc,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim_end().to_owned(),
                log_tail: String::new(),
            });
        }
        let mut stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if stdout.ends_with('\n') {
            stdout.pop();
        }
        Ok(stdout)
    }

    /// `CREATE DATABASE "name"` (quoted, so any name is taken literally).
    pub fn create_database(&self, name: &str) -> Result<(), DevClusterError> {
        let ident = name.replace('"', "\"\"");
        self.psql("postgres", &format!("CREATE DATABASE \"{ident}\";"))?;
        Ok(())
    }

    fn pg_ctl(&self) -> Command {
        let mut cmd = self.runner.command(&self.runner.pg_ctl, &self.root);
        cmd.arg("-D").arg(&self.data_dir);
        cmd
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let mut cmd = self.pg_ctl();
        cmd.arg("-l")
            .arg(&self.log)
            .args(["start", "-w", "-t", "60", "-s"]);
        run(&mut cmd, Some(&self.log))?;
        // pg_ctl -w waits for "ready" in postmaster.pid; double-check TCP.
        if !wait_until(Duration::from_secs(10), || port_open(self.port)) {
            return Err(self.fail("started but does not accept TCP connections"));
        }
        Ok(())
    }

    /// Per-cluster settings, kept in an included file so restarts reuse them.
    fn write_local_conf(&self) -> Result<()> {
        let conf = format!(
            "port = {}\nunix_socket_directories = '{}'\n",
            self.port,
            self.root.display().to_string().replace('\'', "''")
        );
        write_owned(
            &self.runner,
            &self.data_dir.join("shardgate.conf"),
            &conf,
            false,
        )
    }

    fn log_says_port_taken(&self) -> bool {
        let mut text = String::new();
        let _ = std::fs::File::open(&self.log).and_then(|mut f| f.read_to_string(&mut text));
        text.contains("Address already in use") || text.contains("could not bind")
    }

    /// SysV shared memory id from line 7 of postmaster.pid.
    fn shmem_id(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        text.lines().nth(6)?.split_whitespace().nth(1)?.parse().ok()
    }

    fn fail(&self, message: &str) -> DevClusterError {
        DevClusterError::Cluster {
            name: self.name.clone(),
            message: message.to_owned(),
            log_tail: log_tail(&self.log),
        }
    }
}

/// Number of processes attached to a SysV segment (0 once it is gone).
fn shmem_attached(shmid: i32) -> u64 {
    // SAFETY: all-zero is a valid shmid_ds; shmctl only writes into it.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: `ds` is a valid out-pointer for IPC_STAT.
    if unsafe { libc::shmctl(shmid, libc::IPC_STAT, &mut ds) } != 0 {
        return 0;
    }
    ds.shm_nattch as u64
}

impl Drop for DevCluster {
    /// `pg_ctl stop -m immediate`, remove the temp dir, retire the watchdog.
    fn drop(&mut self) {
        release(self.guard_id);
    }
}

// ---------------------------------------------------------------------------
// DevFleet
// ---------------------------------------------------------------------------

/// Several clusters started together, e.g. one per shard.
#[derive(Debug)]
pub struct DevFleet {
    pub clusters: Vec<DevCluster>,
}

impl DevFleet {
    /// Start `n` clusters named `{prefix}0..{prefix}{n-1}` in parallel threads.
    pub fn start(n: usize, prefix: &str) -> Result<DevFleet, DevClusterError> {
        let results: Vec<Result<DevCluster>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|i| spawn_scoped(s, move || DevCluster::start(&format!("{prefix}{i}"))))
                .collect();
            handles.into_iter().map(join_scoped).collect()
        });
        // Any error drops the clusters that did start.
        let clusters = results.into_iter().collect::<Result<Vec<_>>>()?;
        Ok(DevFleet { clusters })
    }

    /// Create database `name` on every cluster (in parallel).
    pub fn create_database(&self, name: &str) -> Result<(), DevClusterError> {
        std::thread::scope(|s| {
            let handles: Vec<_> = self
                .clusters
                .iter()
                .map(|c| spawn_scoped(s, move || c.create_database(name)))
                .collect();
            handles.into_iter().try_for_each(join_scoped)
        })
    }
}

impl Drop for DevFleet {
    /// Tear the clusters down in parallel (each stop waits ~0.1 s or more).
    fn drop(&mut self) {
        std::thread::scope(|s| {
            for cluster in self.clusters.drain(..) {
                let slot = std::sync::Arc::new(Mutex::new(Some(cluster)));
                let theirs = std::sync::Arc::clone(&slot);
                let spawned =
                    std::thread::Builder::new().spawn_scoped(s, move || drop(lock(&theirs).take()));
                if spawned.is_err() {
                    // Could not get a thread: tear down on this one.
                    drop(lock(&slot).take());
                }
            }
        });
    }
}

type Spawned<'scope, T> = io::Result<std::thread::ScopedJoinHandle<'scope, Result<T>>>;

/// `Scope::spawn` without its panic when the OS refuses a thread.
fn spawn_scoped<'scope, T: Send + 'scope>(
    s: &'scope std::thread::Scope<'scope, '_>,
    f: impl FnOnce() -> Result<T> + Send + 'scope,
) -> Spawned<'scope, T> {
    std::thread::Builder::new().spawn_scoped(s, f)
}

/// Join a scoped thread, turning spawn failures and panics into errors.
fn join_scoped<T>(h: Spawned<'_, T>) -> Result<T> {
    let h = h.map_err(io_err("spawning a fleet worker thread"))?;
    h.join().unwrap_or_else(|_| {
        Err(DevClusterError::Cluster {
            name: String::from("fleet"),
            message: String::from("worker thread panicked"),
            log_tail: String::new(),
        })
    })
}
