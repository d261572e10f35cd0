"""Shared plumbing for the shardgate benchmarks (Python 3 standard library only).

Starts and always stops: one throwaway PostgreSQL cluster (its own data
directory, a free port), shardgate (`serve` with a generated one-shard map) and
PgBouncer (transaction mode, same pool size). Everything lives in one temp
directory (on /dev/shm when available) that is removed on exit, including on
Ctrl-C / SIGTERM / SIGHUP. Only SIGKILL of the benchmark process can leave
things behind; then `pgrep -a -f shardgate-bench-` shows them.
"""

import atexit
import glob
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
CLK_TCK = os.sysconf("SC_CLK_TCK")
DB = "bench"
PG_USER = "postgres"


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile(want=65536):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (want, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
            return limit
        except (ValueError, OSError):
            pass
    return soft


def pg_bindir():
    env = os.environ.get("PG_BINDIR")
    if env:
        return env
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    try:
        return subprocess.check_output(["pg_config", "--bindir"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        sys.exit("PostgreSQL server binaries not found (set PG_BINDIR)")


def proc_cpu_seconds(pid):
    """utime+stime of a whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime/stime are fields 14/15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def build_shardgate():
    """`cargo build --release` unless SHARDGATE_BIN points at a binary."""
    binary = os.environ.get("SHARDGATE_BIN")
    if binary:
        log(f"using SHARDGATE_BIN={binary} (no build)")
        return binary
    log("cargo build --release")
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    return os.path.join(ROOT, "target", "release", "shardgate")


def build_tokio_floor():
    """The bare tokio forwarder of bench/tokio-floor (its own small crate)."""
    manifest = os.path.join(ROOT, "bench", "tokio-floor", "Cargo.toml")
    log("cargo build --release (bench/tokio-floor)")
    subprocess.run(["cargo", "build", "--release", "--quiet", "--manifest-path", manifest], check=True)
    return os.path.join(ROOT, "bench", "tokio-floor", "target", "release", "tokio-floor")


def ensure_pgbouncer():
    """Path of pgbouncer, installing it with apt-get if missing; None if impossible."""
    path = shutil.which("pgbouncer")
    if path:
        return path
    log("pgbouncer missing: apt-get install -y pgbouncer")
    try:
        subprocess.run(["apt-get", "install", "-y", "pgbouncer"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError):
        log("NOTE: could not install pgbouncer; PgBouncer columns will be empty")
        return None
    return shutil.which("pgbouncer")


def pgbouncer_version(path):
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"PgBouncer (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


class Bench:
    """Owns the temp dir and every process the benchmark starts."""

    def __init__(self):
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = tempfile.mkdtemp(prefix="shardgate-bench-", dir=base)
        os.chmod(self.dir, 0o755)
        self.procs = []  # (name, Popen), stopped in reverse order
        self.as_root = os.geteuid() == 0
        self.pg_port = self.sg_port = self.pb_port = self.floor_port = None
        self.sg = self.pb = None
        atexit.register(self.cleanup)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame):
        log(f"signal {signum}: cleaning up")
        self.cleanup()
        os._exit(128 + signum)

    def _as_pg_user(self):
        """Popen kwargs running a command as the `postgres` OS user when we are root."""
        if not self.as_root:
            return {}
        pw = pwd.getpwnam(PG_USER)
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [],
                "env": {**os.environ, "HOME": self.dir, "USER": PG_USER}}

    def _chown(self, path):
        if self.as_root:
            pw = pwd.getpwnam(PG_USER)
            shutil.chown(path, pw.pw_uid, pw.pw_gid)

    def _spawn(self, name, argv, **kwargs):
        logf = open(os.path.join(self.dir, f"{name}.log"), "ab")
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)
        self.procs.append((name, proc))
        return proc

    def tail_log(self, name, n=20):
        try:
            with open(os.path.join(self.dir, f"{name}.log"), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    # --- PostgreSQL -------------------------------------------------------
    def start_postgres(self, extra=()):
        bindir = pg_bindir()
        data = os.path.join(self.dir, "pgdata")
        os.mkdir(data)
        self._chown(data)
        self._chown(self.dir)
        subprocess.run([os.path.join(bindir, "initdb"), "-D", data, "-U", PG_USER, "-A", "trust",
                        "--no-sync", "-E", "UTF8", "--locale=C"], check=True,
                       stdout=subprocess.DEVNULL, **self._as_pg_user())
        self.pg_port = free_port()
        settings = {"port": self.pg_port, "listen_addresses": "127.0.0.1",
                    "unix_socket_directories": self.dir, "fsync": "off",
                    "synchronous_commit": "off", "full_page_writes": "off",
                    "max_connections": 300, "shared_buffers": "128MB"}
        argv = [os.path.join(bindir, "postgres"), "-D", data]
        for k, v in settings.items():
            argv += ["-c", f"{k}={v}"]
        argv += list(extra)
        proc = self._spawn("postgres", argv, **self._as_pg_user())
        for _ in range(300):
            if proc.poll() is not None:
                sys.exit("postgres exited:\n" + self.tail_log("postgres"))
            r = subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.pg_port)])
            if r.returncode == 0:
                break
            time.sleep(0.1)
        else:
            sys.exit("postgres did not become ready:\n" + self.tail_log("postgres"))
        self.psql("postgres", f"CREATE DATABASE {DB}")
        log(f"postgres {bindir} on 127.0.0.1:{self.pg_port}, data in {data}")
        return self.pg_port

    def psql(self, db, sql):
        subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                        "-p", str(self.pg_port), "-U", PG_USER, "-d", db, "-c", sql],
                       check=True, stdout=subprocess.DEVNULL)

    # --- shardgate --------------------------------------------------------
    def start_shardgate(self, binary, pool_size, pool_mode="transaction", wrapper=(), routed=False,
                        pool_extra="", map_extra="", name="shardgate"):
        """`pool_extra` is appended inside `pool: { ... }` (e.g. ", checkout_timeout: 3s"),
        `map_extra` to the map as top-level lines (e.g. "metrics: 127.0.0.1:9930\n").
        `name`: a second instance (e.g. an older build to compare with) gets its own
        name, map and log; its port is `self.ports[name]`."""
        port = free_port()
        if name == "shardgate":
            self.sg_port = port
        self.ports = {**getattr(self, "ports", {}), name: port}
        config = os.path.join(self.dir, f"{name}.yaml")
        with open(config, "w") as f:
            f.write(f"""# generated by bench/harness.py
listen: 127.0.0.1:{port}
auth: trust
database: {DB}
users:
  - {{ name: {PG_USER} }}
pool: {{ mode: {pool_mode}, size: {pool_size}{pool_extra} }}
shards:
  - {{ name: s0, url: "postgres://{PG_USER}@127.0.0.1:{self.pg_port}/{DB}" }}
default_table: replicated
{map_extra}""")
            if routed:
                # SQL routing on: every statement is analysed (cache hit) and
                # its key evaluated, as with a real sharded map.
                f.write("""functions:
  by_aid: { kind: hash }
tables:
  pgbench_accounts: { key: aid, function: by_aid }
""")
        env = {**os.environ, "SHARDGATE_LOG": os.environ.get("SHARDGATE_LOG", "warn")}
        proc = self._spawn(name, list(wrapper) + [binary, "serve", "--config", config], env=env)
        if name == "shardgate":
            self.sg = proc
        self._wait_port(name, proc, port, timeout=60 if wrapper else 15)
        log(f"{name} pid {proc.pid} on 127.0.0.1:{port}, pool {pool_mode}/{pool_size}")
        return proc

    # --- tokio floor (bare forwarder) ---------------------------------------
    def start_tokio_floor(self, binary):
        self.floor_port = free_port()
        self.floor = self._spawn("tokio-floor", [binary, f"127.0.0.1:{self.floor_port}",
                                                 f"127.0.0.1:{self.pg_port}"])
        self._wait_port("tokio-floor", self.floor, self.floor_port)
        log(f"tokio-floor pid {self.floor.pid} on 127.0.0.1:{self.floor_port} (bare forwarder, 1:1)")
        return self.floor

    # --- PgBouncer --------------------------------------------------------
    def start_pgbouncer(self, path, pool_size, max_prepared=None):
        self.pb_port = free_port()
        userlist = os.path.join(self.dir, "userlist.txt")
        with open(userlist, "w") as f:
            f.write(f'"{PG_USER}" ""\n')
        ini = os.path.join(self.dir, "pgbouncer.ini")
        prepared = f"max_prepared_statements = {max_prepared}\n" if max_prepared else ""
        with open(ini, "w") as f:
            f.write(f"""[databases]
{DB} = host=127.0.0.1 port={self.pg_port} dbname={DB} user={PG_USER}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.pb_port}
unix_socket_dir =
auth_type = trust
auth_file = {userlist}
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_db_connections = {pool_size}
max_client_conn = 12000
ignore_startup_parameters = extra_float_digits,options
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
logfile = {os.path.join(self.dir, "pgbouncer-file.log")}
{prepared}""")
        for p in (userlist, ini):
            self._chown(p)
        self.pb = self._spawn("pgbouncer", [path, ini], **self._as_pg_user())
        self._wait_port("pgbouncer", self.pb, self.pb_port)
        log(f"pgbouncer pid {self.pb.pid} on 127.0.0.1:{self.pb_port}, pool transaction/{pool_size}")
        return self.pb

    def _wait_port(self, name, proc, port, timeout=15):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                sys.exit(f"{name} exited with {proc.returncode}:\n" + self.tail_log(name))
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        sys.exit(f"{name} did not listen on {port}:\n" + self.tail_log(name))

    def stop(self, proc, sig=signal.SIGTERM, wait=10):
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = [(n, p) for (n, p) in self.procs if p is not proc]

    # --- teardown ---------------------------------------------------------
    def cleanup(self):
        while self.procs:
            name, proc = self.procs[-1]
            # postgres: SIGQUIT = immediate shutdown (the data is thrown away anyway)
            sig = signal.SIGQUIT if name == "postgres" else signal.SIGTERM
            self.stop(proc, sig)
        if self.dir and os.path.isdir(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
