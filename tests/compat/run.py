#!/usr/bin/env python3
"""Driver compatibility runner (issue #14): the drivers' own test suites,
run against Postgres directly, through PgBouncer and through shardgate.

Targets (each gets fresh clusters, started here and removed afterwards):
  direct     one Postgres 15 cluster
  pgbouncer  the same behind PgBouncer (Debian package), transaction mode
  sg-a       shardgate, one shard, no `tables`: a plain pooler
  sg-b       shardgate, one shard, `default_table: replicated`
  sg-c       shardgate, three shards, `default_table: replicated`
Every cluster has max_prepared_transactions = 64; clients connect as
`postgres` to database `postgres` (the suites' default).

Suites, at the versions pinned in tests/python/requirements.txt:
  asyncpg    tests/ of asyncpg's source package (the sdist carries them)
  psycopg    tests/ of a psycopg source checkout given with --psycopg-src
             (psycopg's sdist carries no tests); its commit is recorded
  node-postgres  packages/pg/test/integration of a node-postgres checkout
             given with --node-postgres-src (npm's `pg` carries no tests);
             one outcome per test file (each file is one node script)

Writes tests/compat/results/<UTC date>/<suite>.<target>.txt (one line per
test: outcome, test id, first line of the error) and .json (versions,
command, counts), then regenerates tests/compat/results/<date>.md from every
file of that date. `--subset` is the bounded CI check instead (see
tests/compat/subset.txt and tests/compat_subset.rs).
"""

import argparse
import datetime
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
REQUIREMENTS = os.path.join(ROOT, "tests", "python", "requirements.txt")
RESULTS = os.path.join(HERE, "results")
TARGET_DIR = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
WORK = os.path.join(TARGET_DIR, "compat")
TARGETS = ["direct", "pgbouncer", "sg-a", "sg-b", "sg-c"]
SUITES = ["asyncpg", "psycopg", "node-postgres"]
PG_USER = "postgres"
DB = "postgres"
POOL_SIZE = 20

# psycopg's tests that cannot say anything about a proxy or need what the
# venv does not have (type checkers, gevent, DNS, CockroachDB, Windows, the
# pool package's own suite). Markers `slow`, `timing` and `flakey` are
# deselected too: they measure the machine, not the protocol.
PSYCOPG_IGNORE = ["tests/pool", "tests/crdb", "tests/test_typing.py", "tests/test_gevent.py",
                  "tests/test_dns.py", "tests/test_dns_srv.py", "tests/test_windows.py",
                  "tests/test_free_threading.py", "tests/test_module.py"]
PSYCOPG_MARKERS = "not slow and not timing and not flakey and not mypy and not dns and not gevent"
# asyncpg's tests of its own source tree (flake8/mypy) say nothing about a server.
ASYNCPG_IGNORE = ["tests/test__sourcecode.py"]


def log(msg):
    print(f"[compat] {msg}", file=sys.stderr, flush=True)


def run(argv, **kwargs):
    log("$ " + " ".join(argv))
    return subprocess.run(argv, check=True, **kwargs)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bindir():
    if os.environ.get("PG_BINDIR"):
        return os.environ["PG_BINDIR"]
    import glob
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    try:
        return subprocess.check_output(["pg_config", "--bindir"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        sys.exit("PostgreSQL server binaries not found (tests/setup.sh installs them; or set PG_BINDIR)")


def pins():
    out = {}
    with open(REQUIREMENTS) as f:
        for line in f:
            m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==(\S+)", line.strip())
            if m:
                out[m.group(1).lower()] = m.group(3)
    return out


# --- the venv (shared with tests/python_clients.rs: same file, same key) ----

def fnv1a(data):
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def venv_python():
    with open(REQUIREMENTS, "rb") as f:
        key = f"{fnv1a(f.read()):016x}"
    venv = os.path.join(TARGET_DIR, "python-venv", key)
    python = os.path.join(venv, "bin", "python")
    probe = "import psycopg2, psycopg, asyncpg, sqlalchemy, pytest, pytest_timeout"
    if os.path.exists(python) and subprocess.run([python, "-c", probe]).returncode == 0:
        return python
    log(f"building the Python venv {venv} from tests/python/requirements.txt")
    shutil.rmtree(venv, ignore_errors=True)
    staging = f"{venv}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.dirname(venv), exist_ok=True)
    run([sys.executable, "-m", "venv", staging])
    run([os.path.join(staging, "bin", "pip"), "install", "-q", "--disable-pip-version-check",
         "-r", REQUIREMENTS])
    os.rename(staging, venv)
    return python


# --- suite sources -------------------------------------------------------------

def asyncpg_tests(version, python):
    """Copies tests/ of asyncpg's sdist to a directory without the package
    source next to it (so the installed, compiled asyncpg is imported)."""
    base = os.path.join(WORK, "src")
    os.makedirs(base, exist_ok=True)
    sdist = os.path.join(base, f"asyncpg-{version}.tar.gz")
    if not os.path.exists(sdist):
        run([python, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-binary",
             ":all:", "--no-deps", f"asyncpg=={version}", "-d", base])
    dest = os.path.join(base, f"asyncpg-{version}-tests")
    if not os.path.isdir(os.path.join(dest, "tests")):
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            shutil.rmtree(dest, ignore_errors=True)
            os.makedirs(dest)
            shutil.copytree(os.path.join(tmp, f"asyncpg-{version}", "tests"),
                            os.path.join(dest, "tests"))
    return dest, f"asyncpg {version} sdist tests/"


def psycopg_tests(src, rev):
    if not src:
        return None, "psycopg's sdist carries no tests: pass --psycopg-src DIR (a psycopg source checkout)"
    if not os.path.isdir(os.path.join(src, "tests")):
        sys.exit(f"--psycopg-src {src}: no tests/ directory")
    if not rev:
        try:
            rev = subprocess.check_output(["git", "-C", src, "rev-parse", "HEAD"], text=True,
                                          stderr=subprocess.DEVNULL).strip()
        except (OSError, subprocess.CalledProcessError):
            rev = "unknown commit"
    return src, f"psycopg source {rev[:12]} tests/"


def node_postgres_tests(src, rev):
    """packages/pg of a node-postgres checkout, copied to target/compat/src
    with its runtime dependencies and the integration tests' own (async,
    bluebird, co, pg-copy-streams) installed by npm; the tests load the
    checkout's lib/, so the driver is the checkout's version."""
    if not src:
        return None, "npm's pg carries no tests: pass --node-postgres-src DIR (a node-postgres checkout)"
    pkg = os.path.join(src, "packages", "pg")
    if not os.path.isdir(os.path.join(pkg, "test", "integration")):
        sys.exit(f"--node-postgres-src {src}: no packages/pg/test/integration")
    if not rev:
        try:
            rev = subprocess.check_output(["git", "-C", src, "rev-parse", "HEAD"], text=True,
                                          stderr=subprocess.DEVNULL).strip()
        except (OSError, subprocess.CalledProcessError):
            rev = "unknown commit"
    with open(os.path.join(pkg, "package.json")) as f:
        meta = json.load(f)
    dest = os.path.join(WORK, "src", f"node-postgres-{rev[:12]}")
    if not os.path.isdir(os.path.join(dest, "node_modules", "pg-protocol")):
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(pkg, dest, ignore=shutil.ignore_patterns("node_modules"))
        keep = ("async", "bluebird", "co", "pg-copy-streams")
        meta_copy = dict(meta)
        meta_copy["devDependencies"] = {k: v for k, v in meta.get("devDependencies", {}).items() if k in keep}
        for k in ("peerDependencies", "optionalDependencies", "peerDependenciesMeta"):
            meta_copy.pop(k, None)
        with open(os.path.join(dest, "package.json"), "w") as f:
            json.dump(meta_copy, f, indent=2)
        run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=dest)
    return dest, f"node-postgres source {rev[:12]} packages/pg/test/integration", meta["version"]


# --- clusters, PgBouncer, shardgate ----------------------------------------------

class Infra:
    """Owns one target's temp dir and every process started for it."""

    def __init__(self, name):
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.dir = tempfile.mkdtemp(prefix=f"shardgate-compat-{name}-", dir=base)
        os.chmod(self.dir, 0o755)
        self.procs = []
        self.root = os.geteuid() == 0
        # One directory per runner process: concurrent runs keep their own logs.
        self.logs = os.path.join(WORK, "logs", f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        os.makedirs(self.logs, exist_ok=True)
        self.name = name
        self.died = []

    def _as_pg(self):
        if not self.root:
            return {}
        pw = pwd.getpwnam(PG_USER)
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [],
                "env": {**os.environ, "HOME": self.dir, "USER": PG_USER}}

    def _chown(self, path):
        if self.root:
            pw = pwd.getpwnam(PG_USER)
            shutil.chown(path, pw.pw_uid, pw.pw_gid)

    def spawn(self, name, argv, **kwargs):
        path = os.path.join(self.logs, f"{self.name}.{name}.log")
        logf = open(path, "wb")
        log(f"start {name}: {' '.join(argv)}  (log: {os.path.relpath(path, ROOT)})")
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kwargs)
        self.procs.append((name, proc))
        return proc

    def wait_port(self, name, proc, port, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                sys.exit(f"{name} exited with {proc.returncode}; see {self.logs}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                # Someone else may have taken the free port first: then ours exits.
                time.sleep(0.3)
                if proc.poll() is not None:
                    sys.exit(f"{name} exited with {proc.returncode} (port {port} taken?); see {self.logs}")
                return
            except OSError:
                time.sleep(0.1)
        sys.exit(f"{name} did not listen on {port}")

    def postgres(self, name):
        bindir = pg_bindir()
        data = os.path.join(self.dir, name)
        os.mkdir(data)
        self._chown(data)
        self._chown(self.dir)
        subprocess.run([os.path.join(bindir, "initdb"), "-D", data, "-U", PG_USER, "-A", "trust",
                        "--no-sync", "-E", "UTF8", "--locale=C"], check=True,
                       stdout=subprocess.DEVNULL, **self._as_pg())
        port = free_port()
        settings = {"port": port, "listen_addresses": "127.0.0.1", "unix_socket_directories": self.dir,
                    "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                    "max_connections": 200, "max_prepared_transactions": 64, "jit": "off"}
        argv = [os.path.join(bindir, "postgres"), "-D", data]
        for k, v in settings.items():
            argv += ["-c", f"{k}={v}"]
        proc = self.spawn(name, argv, **self._as_pg())
        for _ in range(300):
            if proc.poll() is not None:
                sys.exit(f"postgres {name} exited; see {self.logs}")
            if subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode == 0:
                return port
            time.sleep(0.1)
        sys.exit(f"postgres {name} did not become ready")

    def pgbouncer(self, pg_port):
        path = shutil.which("pgbouncer")
        if not path:
            sys.exit("pgbouncer not installed (tests/setup.sh installs it)")
        port = free_port()
        userlist = os.path.join(self.dir, "userlist.txt")
        with open(userlist, "w") as f:
            f.write(f'"{PG_USER}" ""\n')
        ini = os.path.join(self.dir, "pgbouncer.ini")
        with open(ini, "w") as f:
            f.write(f"""[databases]
* = host=127.0.0.1 port={pg_port} user={PG_USER}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {userlist}
pool_mode = transaction
default_pool_size = {POOL_SIZE}
max_client_conn = 1000
ignore_startup_parameters = extra_float_digits,options
""")
        for p in (userlist, ini):
            self._chown(p)
        proc = self.spawn("pgbouncer", [path, ini], **self._as_pg())
        self.wait_port("pgbouncer", proc, port)
        return port

    def shardgate(self, binary, pg_ports, replicated):
        port = free_port()
        config = os.path.join(self.dir, "shardgate.yaml")
        shards = "".join(f'  - {{ name: s{i}, url: "postgres://{PG_USER}@127.0.0.1:{p}/{DB}" }}\n'
                         for i, p in enumerate(pg_ports))
        text = (f"# generated by tests/compat/run.py for target {self.name}\n"
                f"listen: 127.0.0.1:{port}\nauth: trust\ndatabase: {DB}\n"
                f"users:\n  - {{ name: {PG_USER} }}\n"
                f"pool: {{ mode: transaction, size: {POOL_SIZE} }}\n"
                # Other database names (asyncpg's tests create and connect
                # to some): the equivalent of the PgBouncer target's `*`.
                f"other_databases: {{ shard: s0 }}\n"
                f"shards:\n{shards}")
        if replicated:
            text += "default_table: replicated\n"
        with open(config, "w") as f:
            f.write(text)
        shutil.copy(config, os.path.join(self.logs, f"{self.name}.shardgate.yaml"))
        env = {**os.environ, "SHARDGATE_LOG": os.environ.get("SHARDGATE_LOG", "warn")}
        proc = self.spawn("shardgate", [binary, "serve", "--config", config], env=env)
        self.wait_port("shardgate", proc, port)
        return port

    def cleanup(self):
        while self.procs:
            name, proc = self.procs.pop()
            if proc.poll() is not None:
                # Died during the run: every test after that fails to connect.
                log(f"NOTE: {name} (pid {proc.pid}) had exited during the run with status "
                    f"{proc.returncode}; its log: {os.path.relpath(self.logs, ROOT)}/{self.name}.{name}.log")
                self.died.append(f"{name} exited with status {proc.returncode}")
            if proc.poll() is None:
                proc.send_signal(signal.SIGQUIT if name.startswith("pg") and name != "pgbouncer"
                                 else signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_target(infra, target, binary):
    """Returns the port clients connect to."""
    if target == "sg-c":
        ports = [infra.postgres(f"pg{i}") for i in range(3)]
    else:
        ports = [infra.postgres("pg0")]
    if target == "direct":
        return ports[0]
    if target == "pgbouncer":
        return infra.pgbouncer(ports[0])
    return infra.shardgate(binary, ports, replicated=target != "sg-a")


# --- running a suite -------------------------------------------------------------

def fold(report_path):
    """JSON lines per phase -> {id: (outcome, message)}, in first-seen order."""
    results = {}
    if not os.path.exists(report_path):
        return results
    with open(report_path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            tid, when, outcome = r["id"], r["when"], r["outcome"]
            prev = results.get(tid, ("passed", ""))
            if r.get("xfail"):
                new = ("xfailed", r.get("message", "")) if outcome == "skipped" else ("xpassed", "")
            elif outcome == "skipped":
                new = ("skipped", r.get("message", ""))
            elif outcome == "failed":
                new = ("failed" if when == "call" else "error", r.get("message", ""))
            else:
                new = ("passed", "")
            rank = {"passed": 0, "xpassed": 1, "skipped": 2, "xfailed": 2, "failed": 3, "error": 4}
            if tid not in results or rank[new[0]] > rank[prev[0]]:
                results[tid] = new
    return results


def pytest_argv(suite, python, src, test_timeout, select):
    argv = [python, "-m", "pytest", "-p", "report_plugin", "-o", f"cache_dir={os.path.join(WORK, 'pytest-cache')}",
            "-p", "no:randomly", "-q", "-rN", "--no-header", "--tb=no",
            f"--timeout={test_timeout}", "-o", "faulthandler_timeout=0"]
    if suite == "asyncpg":
        argv += [f"--ignore={p}" for p in ASYNCPG_IGNORE]
    else:
        argv += [f"--ignore={p}" for p in PSYCOPG_IGNORE] + ["-m", PSYCOPG_MARKERS]
    if select:
        argv += select
    else:
        argv += ["tests"]
    return argv


def suite_env(suite, port):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PYTHONPATH"] = HERE
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if suite in ("asyncpg", "node-postgres"):
        # asyncpg's _testbase uses a running server when PGHOST is set;
        # node-postgres' test helper reads the PG* variables.
        env.update(PGHOST="127.0.0.1", PGPORT=str(port), PGUSER=PG_USER, PGDATABASE=DB)
    else:
        env["PSYCOPG_TEST_DSN"] = f"host=127.0.0.1 port={port} user={PG_USER} dbname={DB}"
    return env


def run_suite(suite, target, python, src, binary, args, select=None, report_path=None):
    """Runs once more when a process of the target (Postgres, PgBouncer,
    shardgate) was gone at the end: on a shared development machine another
    session's `pkill -f "shardgate serve"` once stopped the runner's
    shardgate (exit status 0 = its orderly shutdown), and every test after
    that fails to connect."""
    for attempt in (1, 2):
        results, meta = run_suite_once(suite, target, python, src, binary, args, select, report_path)
        if not meta.get("died"):
            break
        log(f"{suite} on {target}: {'; '.join(meta['died'])} during attempt {attempt}"
            + (": running it again" if attempt == 1 else ": giving up, results kept as they are"))
    meta["attempts"] = attempt
    return results, meta


def run_suite_once(suite, target, python, src, binary, args, select=None, report_path=None):
    infra = Infra(target)
    meta = None
    try:
        port = start_target(infra, target, binary)
        report_path = report_path or os.path.join(WORK, f"{suite}.{target}.jsonl")
        if os.path.exists(report_path):
            os.remove(report_path)
        env = suite_env(suite, port)
        if suite == "node-postgres":
            results, meta = run_node_files(src, env, args, target)
            return results, meta
        env["COMPAT_REPORT"] = report_path
        argv = pytest_argv(suite, python, src, args.test_timeout, select)
        if args.pytest_args:
            argv += args.pytest_args
        log(f"{suite} on {target} (port {port}): cd {src} && timeout {args.run_timeout} "
            + " ".join([os.path.relpath(python, ROOT)] + argv[1:]))
        started = time.time()
        try:
            proc = subprocess.run(argv, cwd=src, env=env, timeout=args.run_timeout,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  start_new_session=True)
            rc, cut = proc.returncode, False
            tail = proc.stdout.decode(errors="replace").strip().splitlines()[-1:]
        except subprocess.TimeoutExpired:
            rc, cut, tail = None, True, ["(cut by --run-timeout)"]
        elapsed = time.time() - started
        log(f"{suite} on {target}: exit {rc}, {elapsed:.0f} s: {' '.join(tail)}")
        meta = {"exit": rc, "cut": cut, "seconds": round(elapsed), "summary": tail}
        return fold(report_path), meta
    finally:
        infra.cleanup()
        if infra.died and meta is not None:
            meta["died"] = infra.died


def node_error_line(text):
    """The first line naming an error (not a stack frame), else the last line."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for line in lines:
        if not line.startswith("at ") and ("Error" in line or "error:" in line or "timeout" in line):
            return line[:300]
    frames = [l for l in lines if not l.startswith("at ")]
    return (frames or lines or [""])[-1][:300]


def run_node_files(src, env, args, target):
    """One node process per integration test file, as the package's Makefile does."""
    files = []
    for dirpath, _, names in os.walk(os.path.join(src, "test", "integration")):
        files += [os.path.relpath(os.path.join(dirpath, n), src) for n in names if n.endswith("-tests.js")]
    results = {}
    started = time.time()
    cut = False
    per_file = max(args.test_timeout * 4, 60)
    log(f"node-postgres on {target}: {len(files)} files: cd {src} && timeout {per_file} node FILE")
    for rel in sorted(files):
        if time.time() - started > args.run_timeout:
            cut = True
            break
        try:
            proc = subprocess.run(["node", rel], cwd=src, env=env, timeout=per_file,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            out = proc.stdout.decode(errors="replace")
            results[rel] = ("passed", "") if proc.returncode == 0 else ("failed", node_error_line(out))
        except subprocess.TimeoutExpired:
            results[rel] = ("failed", f"timeout: still running after {per_file} s")
    elapsed = time.time() - started
    c = counts(results)
    log(f"node-postgres on {target}: {c['passed']} passed, {c['failed']} failed, {elapsed:.0f} s")
    return results, {"exit": 0 if c["failed"] == 0 else 1, "cut": cut, "seconds": round(elapsed),
                     "summary": [f"{c['passed']} passed, {c['failed']} failed"]}


# --- results -----------------------------------------------------------------

def repo_relative(msg):
    """Messages name files by their path in the repo (no machine's paths in results)."""
    return msg.replace(ROOT + "/", "").replace("\t", " ")


def write_outcomes(day_dir, suite, target, results, meta):
    os.makedirs(day_dir, exist_ok=True)
    with open(os.path.join(day_dir, f"{suite}.{target}.txt"), "w") as f:
        for tid, (outcome, msg) in sorted(results.items()):
            msg = repo_relative(msg)
            f.write(f"{outcome}\t{tid}\t{msg}\n" if msg else f"{outcome}\t{tid}\n")
    with open(os.path.join(day_dir, f"{suite}.{target}.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")


def read_outcomes(path):
    out = {}
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            out[parts[1]] = (parts[0], parts[2] if len(parts) > 2 else "")
    return out


def counts(results):
    c = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for outcome, _ in results.values():
        key = {"xfailed": "skipped", "xpassed": "passed"}.get(outcome, outcome)
        c[key] += 1
    return c


def summarize(day):
    day_dir = os.path.join(RESULTS, day)
    data, metas = {}, {}
    for name in sorted(os.listdir(day_dir)):
        m = re.match(r"(.+)\.([a-z\-]+)\.txt$", name)
        if m:
            data[(m.group(1), m.group(2))] = read_outcomes(os.path.join(day_dir, name))
            with open(os.path.join(day_dir, name[:-4] + ".json")) as f:
                metas[(m.group(1), m.group(2))] = json.load(f)
    suites = [s for s in SUITES if any(k[0] == s for k in data)]
    lines = [f"# Driver compatibility, {day}", "",
             "Written by `tests/compat/run.sh` (regenerated from the per-test files in "
             f"`{day}/`: `outcome<TAB>test id<TAB>first line of the error`).", "",
             "Counts are of tests (node-postgres: of test files). \"not reached\": tests run "
             "directly that a run cut by `--run-timeout` did not reach. Under each table, the "
             "tests that pass directly but not through a shardgate target, those that also pass "
             "through PgBouncer first. "
             "Targets: direct Postgres 15; PgBouncer (transaction mode); shardgate A (one shard, "
             "no `tables`); B (one shard, `default_table: replicated`); C (three shards, "
             "`default_table: replicated`).", ""]
    for suite in suites:
        some = next(metas[k] for k in metas if k[0] == suite)
        lines.append(f"## {suite}: {some['source']}, driver {some['driver']}, shardgate "
                     f"{some.get('shardgate_commit', '?')}")
        lines.append("")
        lines.append("| target | passed | failed+errors | skipped | not reached | seconds |")
        lines.append("|---|---|---|---|---|---|")
        direct = data.get((suite, "direct"), {})
        for target in TARGETS:
            if (suite, target) not in data:
                continue
            res, meta = data[(suite, target)], metas[(suite, target)]
            c = counts(res)
            missing = len([t for t in direct if t not in res]) if target != "direct" else 0
            cut = " (cut)" if meta.get("cut") else ""
            if meta.get("died"):
                cut += " (" + "; ".join(meta["died"]) + " during the run)"
            lines.append(f"| {target} | {c['passed']} | {c['failed'] + c['error']} | {c['skipped']} | "
                         f"{missing}{cut} | {meta['seconds']} |")
        lines.append("")
        if not direct:
            continue
        pgb = data.get((suite, "pgbouncer"))
        for target in ("sg-a", "sg-b", "sg-c"):
            if (suite, target) not in data:
                continue
            res = data[(suite, target)]
            bad = []
            for tid, (outcome, _) in direct.items():
                if outcome != "passed":
                    continue
                got = res.get(tid, ("not reached", ""))
                if got[0] in ("passed", "xpassed"):
                    continue
                via_pgb = pgb.get(tid, ("?", ""))[0] if pgb is not None else "?"
                bad.append((tid, got[0], got[1], via_pgb))
            both = [b for b in bad if b[3] == "passed"]
            lines.append(f"### {suite}: pass directly, not through {target}: {len(bad)} "
                         f"({len(both)} of them pass through PgBouncer)")
            lines.append("")
            if bad:
                lines.append("| test id | through " + target + " | PgBouncer | first line of the error |")
                lines.append("|---|---|---|---|")
                for tid, outcome, msg, via_pgb in sorted(bad, key=lambda b: (b[3] != "passed", b[0])):
                    msg = msg.replace("|", "\\|")
                    lines.append(f"| `{tid}` | {outcome} | {via_pgb} | {msg} |")
                lines.append("")
    with open(os.path.join(RESULTS, f"{day}.md"), "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    log(f"wrote {os.path.relpath(os.path.join(RESULTS, day + '.md'), ROOT)}")


def shardgate_binary(args):
    if args.shardgate_bin:
        return args.shardgate_bin
    if os.environ.get("SHARDGATE_BIN"):
        return os.environ["SHARDGATE_BIN"]
    run(["cargo", "build", "--release", "--quiet"], cwd=ROOT)
    return os.path.join(TARGET_DIR, "release", "shardgate")


def git_commit():
    try:
        # The last commit that changed the proxy (the runner's own commits do not).
        rev = subprocess.check_output(["git", "-C", ROOT, "log", "-1", "--format=%h", "--abbrev=12", "--",
                                       "src", "Cargo.toml", "Cargo.lock"], text=True).strip()
        dirty = subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--", "src"]).returncode
        return rev + ("+dirty src" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


# --- the CI subset -------------------------------------------------------------

def read_list(path):
    with open(path) as f:
        return [l.strip() for l in f if l.strip() and not l.strip().startswith("#")]


def subset(args, python, binary):
    """The selection of tests/compat/subset.txt on direct and on shardgate B:
    every test that passes directly must pass through shardgate, except those
    in subset-expected-failures.txt, which must still fail (so the file shrinks
    as fixes land)."""
    version = pins()["asyncpg"]
    src, _ = asyncpg_tests(version, python)
    select = read_list(os.path.join(HERE, "subset.txt"))
    expected = {}
    for line in read_list(os.path.join(HERE, "subset-expected-failures.txt")):
        tid, _, defect = line.partition(" ")
        expected[tid] = defect.strip()
    target = args.subset_target
    direct, direct_meta = run_suite("asyncpg", "direct", python, src, binary, args, select,
                          os.path.join(WORK, "subset.direct.jsonl"))
    through, through_meta = run_suite("asyncpg", target, python, src, binary, args, select,
                           os.path.join(WORK, f"subset.{target}.jsonl"))
    problems = []
    for name, meta in (("direct", direct_meta), (target, through_meta)):
        if meta.get("died"):
            problems.append(f"{name}: {'; '.join(meta['died'])} during the run (twice): "
                            "the results say nothing about compatibility")
    passed_direct = [t for t, (o, _) in direct.items() if o == "passed"]
    if len(passed_direct) < len(direct) * 0.8 or not passed_direct:
        problems.append(f"only {len(passed_direct)} of {len(direct)} selected tests pass directly")
    for tid in sorted(passed_direct):
        got = through.get(tid, ("not reached", ""))
        ok = got[0] == "passed"
        if tid in expected and "(intermittent)" in expected[tid]:
            continue  # fails through shardgate only now and then: run, never judged
        if tid in expected:
            if ok:
                problems.append(f"{tid}: passes through {target} now; remove it from "
                                f"tests/compat/subset-expected-failures.txt ({expected[tid]})")
        elif not ok:
            problems.append(f"{tid}: passes directly, {got[0]} through {target}: {got[1]}")
    for tid in expected:
        if tid not in direct:
            problems.append(f"{tid}: in subset-expected-failures.txt but not in the selection")
    log(f"subset: {len(direct)} tests, {len(passed_direct)} pass directly, "
        f"{sum(1 for t in passed_direct if through.get(t, ('',))[0] == 'passed')} of those through "
        f"{target}; {len(expected)} expected failures")
    for p in problems:
        print(f"FAIL {p}", flush=True)
    return 1 if problems else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", default="asyncpg,psycopg", help="comma-separated: asyncpg,psycopg")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: " + ",".join(TARGETS))
    ap.add_argument("--psycopg-src", help="a psycopg source checkout (its tests/ and pyproject.toml)")
    ap.add_argument("--psycopg-rev", help="the commit of --psycopg-src when it is not a git work tree")
    ap.add_argument("--node-postgres-src", help="a node-postgres source checkout (packages/pg)")
    ap.add_argument("--node-postgres-rev", help="the commit of --node-postgres-src when not a git work tree")
    ap.add_argument("--shardgate-bin", help="default: $SHARDGATE_BIN, else cargo build --release")
    ap.add_argument("--test-timeout", type=int, default=30, help="seconds per test (pytest-timeout)")
    ap.add_argument("--run-timeout", type=int, default=1800, help="seconds per suite and target")
    ap.add_argument("--date", default=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
    ap.add_argument("--subset", action="store_true", help="the bounded CI check (see subset())")
    ap.add_argument("--subset-target", default="sg-b")
    ap.add_argument("--summarize-only", action="store_true", help="regenerate results/<date>.md")
    ap.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = ap.parse_args()
    if args.summarize_only:
        summarize(args.date)
        return 0
    python = venv_python()
    binary = shardgate_binary(args)
    if args.subset:
        return subset(args, python, binary)
    p = pins()
    day_dir = os.path.join(RESULTS, args.date)
    for suite in args.suites.split(","):
        if suite == "asyncpg":
            src, source = asyncpg_tests(p["asyncpg"], python)
            driver = f"asyncpg {p['asyncpg']}"
        elif suite == "psycopg":
            src, source = psycopg_tests(args.psycopg_src, args.psycopg_rev)
            driver = f"psycopg {p['psycopg']} (psycopg-binary {p['psycopg-binary']})"
            if src is None:
                log(f"psycopg: skipped: {source}")
                continue
        elif suite == "node-postgres":
            got = node_postgres_tests(args.node_postgres_src, args.node_postgres_rev)
            if got[0] is None:
                log(f"node-postgres: skipped: {got[1]}")
                continue
            src, source, version = got
            driver = f"pg {version} (the checkout's lib/)"
        else:
            sys.exit(f"unknown suite {suite}")
        for target in args.targets.split(","):
            if target not in TARGETS:
                sys.exit(f"unknown target {target}")
            results, meta = run_suite(suite, target, python, src, binary, args)
            meta.update(source=source, driver=driver, target=target,
                        shardgate_commit=git_commit(), counts=counts(results),
                        test_timeout=args.test_timeout, run_timeout=args.run_timeout)
            write_outcomes(day_dir, suite, target, results, meta)
            summarize(args.date)
    return 0


if __name__ == "__main__":
    sys.exit(main())
