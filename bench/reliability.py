"""shardgate reliability suite (issue #15): soak, burst, shard kill -9 and
SIGSTOP under load, shardgate kill -9 under two-phase-commit TPC-B, large
messages and half-open connections, each measured against real Postgres.

Three throwaway PostgreSQL clusters (the shards s0..s2, fsync=off,
max_prepared_transactions=100, max_connections=300) and a release shardgate
(3 shards, transaction pooling, pool size 20, two_phase_commit: true, a fresh
process per scenario so RSS and state are per scenario). Tables: `acc (id, v,
pad)` and `hist (aid, delta, tx)`, both sharded by `kind: modulo`, so a key's
shard is `key % 3` and every error is attributed to the shard of the key the
statement was for. The load is a Python asyncio client with asyncpg, and in
shard-kill / shard-stop also psycopg 3 (AsyncConnection, autocommit; default
prepare_threshold and prepare_threshold=0), from the repository's test venv
(`bench/reliability.sh` finds or builds it).

Run through `bench/reliability.sh [--quick] [SCENARIO ...]`; writes
`bench/results/reliability-<date>.md` (`--quick`: `reliability-<date>-quick.md`;
`--out PATH` for another name). Everything it starts is stopped and deleted on
exit (see bench/harness.py); the logs of shardgate and the shards are copied to
`target/reliability-logs/<date-time>/` first.
"""

import argparse
import array
import asyncio
import datetime
import os
import platform
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import DB, PG_USER, log  # noqa: E402

try:
    import asyncpg  # noqa: E402
    import psycopg  # noqa: E402
except ImportError as e:
    sys.exit(f"{e.name} missing: run through bench/reliability.sh (it uses the tests' venv)")

SHARDS = 3
POOL = 20
ROWS = 30000  # keys 0..ROWS-1 in acc, ROWS/3 per shard
QUERY_TIMEOUT = 5.0  # the query_timeout: a hung shard's statements must fail within it
SELECT = "SELECT v FROM acc WHERE id = $1"
SELECT_PSYCOPG = "SELECT v FROM acc WHERE id = %s"  # the same statement in psycopg's placeholder style
# The load's client libraries: asyncpg (prepares every statement: Parse + Describe on a fresh
# connection), psycopg with its default prepare_threshold (5: unnamed statements, named from the
# 5th execution of a query on a connection) and psycopg with prepare_threshold=0 (named at once).
LIBS = ["asyncpg", "psycopg", "psycopg-pt0"]
SCENARIOS = ["soak", "burst", "shard-kill", "shard-stop", "proxy-kill-2pc", "large-messages", "half-open"]


def pct(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def ms(x):
    return "—" if x != x else f"{x * 1000:.1f}"


def short(e, limit=140):
    """Exception class, SQLSTATE (when the server sent one) and message on one line."""
    code = getattr(e, "sqlstate", None)
    text = f"{type(e).__name__}: {f'[{code}] ' if code else ''}{e}".replace("\n", " ").replace("|", "/")
    return text[:limit]


class Env:
    """The three shards and the shardgate of the current scenario."""

    def __init__(self, binary):
        self.binary = binary
        self.shards = [harness.Bench() for _ in range(SHARDS)]
        self.home = self.shards[0]
        self.sg = None
        self.sg_port = harness.free_port()
        self.metrics_port = harness.free_port()
        self.scenario = "setup"  # names shardgate's log: shardgate-<scenario>.log
        self.logs = os.path.join(harness.ROOT, "target", "reliability-logs",
                                 datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame):
        log(f"signal {signum}: cleaning up")
        self.cleanup()
        os._exit(128 + signum)

    def cleanup(self):
        self.keep_logs()
        for b in reversed(self.shards):
            b.cleanup()

    def keep_logs(self):
        """Copy every log (shardgate-<scenario>.log next to s0's postgres.log) out of the temp dirs."""
        for i, b in enumerate(self.shards):
            if not b.dir or not os.path.isdir(b.dir):
                continue
            dest = os.path.join(self.logs, f"s{i}")
            os.makedirs(dest, exist_ok=True)
            for name in os.listdir(b.dir):
                if name.endswith(".log"):
                    shutil.copy(os.path.join(b.dir, name), dest)

    # --- shards -------------------------------------------------------------
    def start_shards(self):
        for i, b in enumerate(self.shards):
            b.start_postgres(extra=("-c", "max_prepared_transactions=100"))
            b.psql(DB, f"""
                CREATE TABLE acc (id bigint PRIMARY KEY, v bigint NOT NULL DEFAULT 0, pad text);
                INSERT INTO acc (id, pad) SELECT g, repeat('x', 80) FROM generate_series(0, {ROWS - 1}) g
                    WHERE g % {SHARDS} = {i};
                CREATE TABLE hist (aid bigint NOT NULL, delta bigint NOT NULL, tx text NOT NULL);
                CREATE INDEX ON hist (aid);
                ANALYZE acc;""")
        log(f"3 shards up: ports {[b.pg_port for b in self.shards]}")

    def postmaster(self, i):
        for name, proc in self.shards[i].procs:
            if name == "postgres":
                return proc
        raise RuntimeError(f"shard s{i} has no postgres process")

    def shard_pids(self, i):
        """The postmaster and its children. Postgres children call setsid(),
        so a signal to the postmaster's process group reaches only it."""
        pm = self.postmaster(i).pid
        pids = [pm]
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if ppid == pm:
                    pids.append(int(d))
        return pids

    def signal_shard(self, i, sig):
        """Postmaster first (no new children), then every child."""
        for pid in self.shard_pids(i):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill_shard(self, i):
        """kill -9 of the postmaster and every backend (the machine dies)."""
        proc = self.postmaster(i)
        self.signal_shard(i, signal.SIGKILL)
        proc.wait()
        self.shards[i].procs = [(n, p) for (n, p) in self.shards[i].procs if p is not proc]

    def stop_shard(self, i, sig):
        """SIGSTOP / SIGCONT to the postmaster and every backend (a hung machine)."""
        self.signal_shard(i, sig)

    def restart_shard(self, i, argv):
        b = self.shards[i]
        proc = b._spawn("postgres", argv, **b._as_pg_user())
        deadline = time.time() + 60
        while time.time() < deadline:
            if proc.poll() is not None:
                sys.exit(f"postgres s{i} exited on restart:\n" + b.tail_log("postgres"))
            if subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(b.pg_port)]).returncode == 0:
                return
            time.sleep(0.05)
        sys.exit(f"postgres s{i} did not come back:\n" + b.tail_log("postgres"))

    def shard_sql(self, i, sql):
        out = subprocess.run(["psql", "-XAtq", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                              "-p", str(self.shards[i].pg_port), "-U", PG_USER, "-d", DB, "-c", sql],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"s{i}: {sql}: {out.stderr.strip()}")
        return out.stdout.strip()

    # --- shardgate ------------------------------------------------------------
    def start_shardgate(self, log_name=None):
        log_name = log_name or f"shardgate-{self.scenario}"
        config = os.path.join(self.home.dir, "reliability.yaml")
        with open(config, "w") as f:
            f.write(f"listen: 127.0.0.1:{self.sg_port}\nmetrics: 127.0.0.1:{self.metrics_port}\n"
                    f"auth: trust\ndatabase: {DB}\nusers:\n  - {{ name: {PG_USER} }}\n"
                    f"pool: {{ mode: transaction, size: {POOL}, query_timeout: {QUERY_TIMEOUT:.0f}s }}\nshards:\n")
            for i, b in enumerate(self.shards):
                f.write(f"  - {{ name: s{i}, url: \"postgres://{PG_USER}@127.0.0.1:{b.pg_port}/{DB}\" }}\n")
            f.write("functions:\n  by_id: { kind: modulo }\n"
                    "tables:\n  acc: { key: id, function: by_id }\n  hist: { key: aid, function: by_id }\n"
                    "default_table: replicated\ntwo_phase_commit: true\n")
        env = {**os.environ, "SHARDGATE_LOG": os.environ.get("SHARDGATE_LOG", "warn"), "NO_COLOR": "1"}
        self.sg = self.home._spawn(log_name, [self.binary, "serve", "--config", config], env=env)
        self.home._wait_port(log_name, self.sg, self.sg_port)
        log(f"shardgate pid {self.sg.pid} on 127.0.0.1:{self.sg_port}")
        return self.sg

    def stop_shardgate(self):
        if self.sg is not None:
            self.home.stop(self.sg)
            self.sg = None

    def kill_shardgate(self):
        self.sg.kill()
        self.sg.wait()
        self.home.procs = [(n, p) for (n, p) in self.home.procs if p is not self.sg]
        self.sg = None

    def rss_kb(self):
        try:
            return harness.proc_rss_kb(self.sg.pid)
        except OSError:
            return 0

    def metric(self, name):
        """Sum of a metric's samples from /metrics (name prefix match), or None."""
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        except OSError:
            return None
        total = None
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total = (total or 0) + float(line.rsplit(" ", 1)[1])
        return total

    async def connect(self, timeout=10, lib="asyncpg"):
        if lib == "asyncpg":
            return await asyncpg.connect(host="127.0.0.1", port=self.sg_port, user=PG_USER, database=DB,
                                         ssl=False, timeout=timeout)
        prepare = {"prepare_threshold": 0} if lib == "psycopg-pt0" else {}  # else psycopg's default
        return await asyncio.wait_for(psycopg.AsyncConnection.connect(
            host="127.0.0.1", port=self.sg_port, user=PG_USER, dbname=DB, sslmode="disable", autocommit=True,
            connect_timeout=max(2, int(timeout)), **prepare), timeout)


async def select_v(conn, lib, key, timeout):
    """The load's statement, `SELECT v FROM acc WHERE id = <key>`, through either library."""
    if lib == "asyncpg":
        return await conn.fetchval(SELECT, key, timeout=timeout)
    cur = await asyncio.wait_for(conn.execute(SELECT_PSYCOPG, (key,)), timeout)
    return (await cur.fetchone())[0]


async def close_conn(conn, lib):
    if lib == "asyncpg":
        conn.terminate()
    else:
        try:
            await asyncio.wait_for(conn.close(), 5)
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass


class RssSampler(threading.Thread):
    """Peak VmRSS of a pid, sampled every `every` seconds."""

    def __init__(self, pid, every=0.02):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.done = pid, every, 0, False

    def run(self):
        while not self.done:
            try:
                self.peak = max(self.peak, harness.proc_rss_kb(self.pid))
            except OSError:
                return
            time.sleep(self.every)

    def stop(self):
        self.done = True
        self.join()
        return self.peak


# --- the load: keyed single-shard statements, errors attributed by key -------

class Load:
    """Clients looping over random keys; every outcome is recorded with its time,
    the key's shard, the latency and the client library. `clients` is a number of
    asyncpg clients or a dict {library: number} (libraries: LIBS)."""

    def __init__(self, env, clients, think=0.0, timeout=30.0, ramp=0.0):
        mix = clients if isinstance(clients, dict) else {"asyncpg": clients}
        self.libs = [lib for lib in LIBS for _ in range(mix.get(lib, 0))]
        self.env, self.clients, self.think, self.timeout, self.ramp = env, len(self.libs), think, timeout, ramp
        # (t_start, t_end, shard, ok, error text, library, seconds of it spent connecting first,
        #  n-th statement on its connection (1: the first; 0: the connect failed)).
        # t_start is before the connect when the client had to (re)connect, as it waits for both.
        self.events = []
        self.stop_flag = False
        self.connected = 0

    async def worker(self, n):
        await asyncio.sleep(self.ramp * n / max(1, self.clients))
        lib = self.libs[n]
        conn = None
        nth = 0
        rnd = random.Random(n)
        while not self.stop_flag:
            key = rnd.randrange(ROWS)
            shard = key % SHARDS
            t0 = time.monotonic()
            connecting = 0.0
            try:
                if conn is None:
                    nth = 0
                    conn = await self.env.connect(timeout=self.timeout, lib=lib)
                    connecting = time.monotonic() - t0
                    self.connected += 1
                nth += 1
                await select_v(conn, lib, key, self.timeout)
                self.events.append((t0, time.monotonic(), shard, True, None, lib, connecting, nth))
            except Exception as e:  # noqa: BLE001 - every failure is a data point
                t1 = time.monotonic()
                if conn is None:
                    connecting = t1 - t0
                self.events.append((t0, t1, shard, False, short(e, 300), lib, connecting, nth))
                # asyncpg clients reconnect after any error; psycopg ones keep a connection that
                # is not broken after an error from the server, as an application would.
                if conn is not None and (lib == "asyncpg" or conn.broken or conn.closed
                                         or not getattr(e, "sqlstate", None)):
                    await close_conn(conn, lib)
                    conn = None
                    self.connected -= 1
                await asyncio.sleep(0.05)
            if self.think:
                await asyncio.sleep(rnd.uniform(0, 2 * self.think))
        if conn is not None:
            await close_conn(conn, lib)

    def start(self):
        self.tasks = [asyncio.ensure_future(self.worker(n)) for n in range(self.clients)]

    async def stop(self):
        self.stop_flag = True
        done, pending = await asyncio.wait(self.tasks, timeout=self.timeout + 5)
        for t in pending:
            t.cancel()


def phase_counts(events, t_from, t_to):
    """Per shard (ok, errors, max latency, first error text) of statements started in [t_from, t_to)."""
    out = {s: [0, 0, 0.0, None] for s in range(SHARDS)}
    for t0, t1, shard, ok, err, *_ in events:
        if t_from <= t0 < t_to:
            row = out[shard]
            if ok:
                row[0] += 1
            else:
                row[1] += 1
                row[3] = row[3] or err
            row[2] = max(row[2], t1 - t0)
    return out


# --- scenarios --------------------------------------------------------------

async def soak(env, args, report):
    clients, secs, window = (200, 20, 4) if args.quick else (1000, args.soak_secs, 10)
    think = 0.5
    env.start_shardgate()
    rss0 = env.rss_kb()
    log(f"soak: {clients} clients (ramp 10 s), think {think} s mean, {secs} s, windows of {window} s")
    load = Load(env, clients, think=think, timeout=30, ramp=min(10, secs / 4))
    t_start = time.monotonic()
    load.start()
    windows = []
    seen = 0
    while time.monotonic() - t_start < secs:
        await asyncio.sleep(window)
        now = time.monotonic()
        batch = load.events[seen:]
        seen += len(batch)
        lat = array.array("d", (t1 - t0 for t0, t1, _, ok, *_ in batch if ok))
        errs = [e for e in batch if not e[3]]
        w = (now - t_start, len(lat), len(errs), pct(lat, 50), pct(lat, 99), max(lat) if lat else float("nan"),
             env.rss_kb(), load.connected, errs[0][4] if errs else "")
        windows.append(w)
        log(f"soak t={w[0]:5.0f}s ok={w[1]} err={w[2]} p50={ms(w[3])}ms p99={ms(w[4])}ms max={ms(w[5])}ms "
            f"rss={w[6] / 1024:.1f}MB connected={w[7]}" + (f" first error: {w[8]}" if errs else ""))
    await load.stop()
    wait_count = env.metric("shardgate_pool_wait_seconds_count")
    wait_sum = env.metric("shardgate_pool_wait_seconds_sum")
    env.stop_shardgate()
    all_ok = array.array("d", (t1 - t0 for t0, t1, _, ok, *_ in load.events if ok))
    errors = sum(1 for e in load.events if not e[3])
    steady = [w[6] for w in windows[len(windows) // 4:]] or [w[6] for w in windows]
    growth = (windows[-1][6] - steady[0]) / 1024 if windows else 0
    lines = ["| t (s) | ok | errors | p50 ms | p99 ms | max ms | shardgate RSS MB | connected clients |",
             "|---|---|---|---|---|---|---|---|"]
    for w in windows:
        lines.append(f"| {w[0]:.0f} | {w[1]} | {w[2]} | {ms(w[3])} | {ms(w[4])} | {ms(w[5])} | {w[6] / 1024:.1f} | {w[7]} |")
    first_err = next((e[4] for e in load.events if not e[3]), None)
    report.detail("soak", f"{clients} clients, {secs} s, `{SELECT}` with a random key, think time uniform "
                  f"0-{2 * think} s; RSS before the clients: {rss0 / 1024:.1f} MB. Pool wait (from /metrics): "
                  f"{wait_count} checkouts, {wait_sum} s in total.\n\n" + "\n".join(lines)
                  + (f"\n\nFirst error: `{first_err}`" if first_err else ""))
    report.row("soak", f"{clients} clients x {secs} s: statements, errors",
               f"{len(all_ok)} ok, {errors} errors", errors == 0)
    report.row("soak", "latency over the whole run (p50 / p99 / max)",
               f"{ms(pct(all_ok, 50))} / {ms(pct(all_ok, 99))} / {ms(max(all_ok) if all_ok else float('nan'))} ms",
               None if not all_ok else max(all_ok) < 5.0, "max < checkout_timeout 5 s")
    report.row("soak", "shardgate RSS: before / after the first quarter / end (growth in the last 3/4)",
               f"{rss0 / 1024:.1f} / {steady[0] / 1024:.1f} / {windows[-1][6] / 1024:.1f} MB ({growth:+.1f} MB)",
               abs(growth) <= max(10, 0.2 * steady[0] / 1024), "growth <= max(10 MB, 20%)")


async def burst(env, args, report):
    clients = 200 if args.quick else 1000
    env.start_shardgate()
    rss0 = env.rss_kb()
    sampler = RssSampler(env.sg.pid)
    sampler.start()
    log(f"burst: {clients} clients connect at once, one statement each")
    results = []

    async def one(n):
        t0 = time.monotonic()
        try:
            conn = await env.connect(timeout=60)
            t1 = time.monotonic()
            await conn.fetchval(SELECT, n % ROWS, timeout=60)
            t2 = time.monotonic()
            results.append((True, t1 - t0, t2 - t0, None))
            return conn
        except Exception as e:  # noqa: BLE001
            results.append((False, time.monotonic() - t0, time.monotonic() - t0, short(e)))
            return None

    t0 = time.monotonic()
    conns = await asyncio.gather(*(one(n) for n in range(clients)))
    elapsed = time.monotonic() - t0
    rss_all = env.rss_kb()
    for c in conns:
        if c is not None:
            await c.close()
    await asyncio.sleep(1)
    peak = sampler.stop()
    env.stop_shardgate()
    ok = [r for r in results if r[0]]
    errs = [r for r in results if not r[0]]
    connect = [r[1] for r in ok]
    total = [r[2] for r in ok]
    report.detail("burst", f"{clients} asyncpg clients started at the same instant (no client-side limit), each "
                  f"connects, runs one `{SELECT}` and stays connected until all are done. All done after "
                  f"{elapsed:.2f} s. Connect latency p50/p99/max {ms(pct(connect, 50))}/{ms(pct(connect, 99))}/"
                  f"{ms(max(connect) if connect else float('nan'))} ms; connect + statement "
                  f"{ms(pct(total, 50))}/{ms(pct(total, 99))}/{ms(max(total) if total else float('nan'))} ms. "
                  f"shardgate RSS {rss0 / 1024:.1f} MB before, {rss_all / 1024:.1f} MB with all connected, peak "
                  f"{peak / 1024:.1f} MB." + (f" First error: `{errs[0][3]}`" if errs else ""))
    report.row("burst", f"{clients} clients connecting at once: failed connects/statements",
               f"{len(errs)} of {clients} failed; all done in {elapsed:.2f} s", not errs)
    report.row("burst", "connect + first statement p99 / max",
               f"{ms(pct(total, 99))} / {ms(max(total) if total else float('nan'))} ms", None)


def lib_phase(events, lib, victim, t_from, t_to):
    """One library's statements started in [t_from, t_to): (ok, errors, max latency) of the
    keys on the live shards, and of the victim's keys."""
    ph = phase_counts([e for e in events if e[5] == lib], t_from, t_to)
    live = [ph[s] for s in range(SHARDS) if s != victim]
    return ((sum(r[0] for r in live), sum(r[1] for r in live), max(r[2] for r in live)),
            tuple(ph[victim][:3]))


def describe_event(e, t_ref):
    t0, t1, shard, ok, err, lib, connecting, nth = e
    where = "the connect failed" if nth == 0 else f"statement {nth} on its connection"
    return (f"{lib}, key on s{shard}, started at {t0 - t_ref:+.2f} s: {(t1 - t0) * 1000:.0f} ms = connect "
            f"{connecting * 1000:.0f} ms + statement {(t1 - t0 - connecting) * 1000:.0f} ms ({where}); "
            + ("ok" if ok else f"`{err[:160]}`"))


async def shard_fault(env, args, report, mode):
    """mode 'kill': kill -9 of shard s1 then restart; 'stop': SIGSTOP then SIGCONT."""
    mix = ({"asyncpg": 30, "psycopg": 15, "psycopg-pt0": 15} if args.quick
           else {"asyncpg": 60, "psycopg": 30, "psycopg-pt0": 30})
    clients = sum(mix.values())
    before, down, after = (4, 8, 8) if args.quick else (10, 20, 20)
    victim = 1
    env.start_shardgate()
    load = Load(env, mix, think=0.01, timeout=30)
    log(f"shard-{mode}: {clients} clients ({', '.join(f'{n} {lib}' for lib, n in mix.items())}) over keys of "
        f"all shards; {before} s, then {'kill -9' if mode == 'kill' else 'SIGSTOP'} of s{victim} for {down} s, "
        f"then {after} s")
    t_load = time.monotonic()
    load.start()
    await asyncio.sleep(before)
    argv = env.postmaster(victim).args
    t_fault = time.monotonic()
    wall_fault = datetime.datetime.now(datetime.timezone.utc)
    if mode == "kill":
        env.kill_shard(victim)
    else:
        env.stop_shard(victim, signal.SIGSTOP)
    await asyncio.sleep(down)
    t_back = time.monotonic()
    if mode == "kill":
        await asyncio.get_running_loop().run_in_executor(None, env.restart_shard, victim, argv)
    else:
        env.stop_shard(victim, signal.SIGCONT)
    t_ready = time.monotonic()
    await asyncio.sleep(after)
    t_end = time.monotonic()
    await load.stop()
    env.stop_shardgate()

    ev = load.events
    pre = phase_counts(ev, 0, t_fault)
    dur = phase_counts(ev, t_fault, t_ready)
    post = phase_counts(ev, t_ready, t_end)
    # Recovery: first success on the victim's keys of a statement started after it was back,
    # and the last failure on its keys.
    first_ok = min((e[1] for e in ev if e[2] == victim and e[3] and e[0] >= t_ready), default=None)
    last_err = max((e[1] for e in ev if e[2] == victim and not e[3]), default=None)
    others_failed = sum(dur[s][1] + post[s][1] + pre[s][1] for s in range(SHARDS) if s != victim)
    victim_during = [e for e in ev if e[2] == victim and t_fault <= e[0] < t_back]
    hung_ended = [e[1] - e[0] for e in victim_during]
    errors_victim = [e[4] for e in victim_during if not e[3]]
    lines = ["| phase | " + " | ".join(f"s{s} ok / err / max ms" for s in range(SHARDS)) + " |",
             "|---|" + "---|" * SHARDS]
    for name, ph in (("before", pre), ("fault until back", dur), ("after", post)):
        lines.append(f"| {name} | " + " | ".join(f"{ph[s][0]} / {ph[s][1]} / {ph[s][2] * 1000:.0f}"
                                                for s in range(SHARDS)) + " |")
    live = " + ".join(f"s{s}" for s in range(SHARDS) if s != victim)
    live_names = live.replace(" + ", ", ")
    lib_lines = [f"| library | phase | {live} ok / err / max ms | s{victim} ok / err / max ms |", "|---|---|---|---|"]
    for lib in LIBS:
        for name, (a, b) in (("before", (0, t_fault)), ("fault until back", (t_fault, t_ready)),
                             ("after", (t_ready, t_end))):
            lv, vc = lib_phase(ev, lib, victim, a, b)
            lib_lines.append(f"| {lib} | {name} | {lv[0]} / {lv[1]} / {lv[2] * 1000:.0f} | "
                             f"{vc[0]} / {vc[1]} / {vc[2] * 1000:.0f} |")
    errs_text = sorted({f"{e[5]}: {e[4][:140]}" for e in ev if not e[3] and e[2] != victim})[:3]
    label = "kill -9" if mode == "kill" else "SIGSTOP"
    back = "restart (ready)" if mode == "kill" else "SIGCONT"
    state = "down" if mode == "kill" else "hung"
    limit = QUERY_TIMEOUT + 1
    names_victim = re.compile(rf"\bs{victim}\b")

    # Statements for keys on the live shards started during the fault: how long each one
    # took by itself (the reconnect before it apart), to tell a wait inside shardgate from
    # the clients' closed loop (a client waiting on a victim's statement starts no other).
    live_during = [e for e in ev if e[2] != victim and t_fault <= e[0] < t_ready]
    slow_live = sorted((e for e in live_during if e[1] - e[0] > 1.0), key=lambda e: e[0] - e[1])
    slow_stmt = [e for e in slow_live if e[1] - e[0] - e[6] > 1.0]
    slow_conn = [e for e in slow_live if e[6] > 1.0]
    per_lib_slowest = []
    for lib in LIBS:
        mine = [e for e in live_during if e[5] == lib]
        if mine:
            worst = max(mine, key=lambda e: e[1] - e[0])
            stmt_worst = max(e[1] - e[0] - e[6] for e in mine)
            per_lib_slowest.append(f"{lib} {(worst[1] - worst[0]) * 1000:.0f} ms (statement alone at most "
                                   f"{stmt_worst * 1000:.0f} ms)")
    victim_waits = sum(min(e[1], t_ready) - e[0] for e in victim_during)
    rate_before = sum(pre[s][0] for s in range(SHARDS) if s != victim) / (t_fault - t_load)
    rate_during = len(live_during) / (t_ready - t_fault)
    by_nth = {}
    for e in slow_stmt:
        k = f"{e[5]} statement {'1' if e[7] == 1 else '2+'}"
        by_nth[k] = by_nth.get(k, 0) + 1

    detail = (f"{clients} clients ({', '.join(f'{n} {lib}' for lib, n in mix.items())}), `{SELECT}` "
              f"(psycopg: `{SELECT_PSYCOPG}`) with random keys (think 0-20 ms), pool {POOL} per shard; "
              f"{label} of s{victim} (postmaster and backends) at t=0 ({wall_fault:%H:%M:%S.%f}"[:-3]
              + f" UTC in the logs), {back} after "
              f"{t_ready - t_fault:.1f} s. asyncpg clients reconnect after any error; psycopg clients keep "
              "their connection after an error from the server unless it is broken.\n\n"
              + "\n".join(lines) + "\n\nPer client library:\n\n" + "\n".join(lib_lines) + "\n\n"
              f"Victim's statements started while it was {state}: {len(victim_during)}, of which "
              f"{len(errors_victim)} failed; their durations p50/max {ms(pct(hung_ended, 50))}/"
              f"{ms(max(hung_ended) if hung_ended else float('nan'))} ms. "
              f"First error on s{victim}: `{(errors_victim[0] if errors_victim else (dur[victim][3] or '—'))[:140]}`."
              + (f" Errors on other shards: {errs_text}" if errs_text else ""))
    for lib in LIBS:
        mine = [e for e in victim_during if e[5] == lib]
        kinds = {}
        for e in mine:
            k = "ok" if e[3] else re.sub(r"\d+(\.\d+)?\s*ms|\d+\.\d+ s", "…", e[4][:110])
            kinds[k] = kinds.get(k, 0) + 1
        detail += (f"\n\n{lib}, s{victim}'s statements by outcome: "
                   + "; ".join(f"{n} × `{k}`" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])))
        late = sorted((e for e in mine if e[1] - e[0] > limit), key=lambda e: e[0] - e[1])
        unclear = [e for e in mine if not e[3] and not names_victim.search(e[4])]
        if late or unclear:
            detail += (f". Over {limit:.0f} s or not naming s{victim}: "
                       + "; ".join(describe_event(e, t_fault) for e in (late + unclear)[:6]))
    detail += (f"\n\nStatements for keys on {live} started during the fault: {len(live_during)}; slowest per library "
               f"(start to end, reconnect included): {'; '.join(per_lib_slowest)}. Over 1 s: {len(slow_live)}, "
               f"of which {len(slow_stmt)} spent over 1 s in the statement itself ({by_nth or 'none'}) and "
               f"{len(slow_conn)} over 1 s connecting. Meanwhile the clients spent {victim_waits:.0f} client-seconds "
               f"waiting on s{victim}'s statements (closed loop: a client waiting on one starts no other), so "
               f"{live}'s statements fell from {rate_before:.0f}/s before the fault to {rate_during:.0f}/s.")
    if slow_live:
        detail += " Slowest: " + "; ".join(describe_event(e, t_fault) for e in slow_live[:6]) + "."
    report.detail(f"shard-{mode}", detail)
    live_ok = sum(ph[s][0] for ph in (pre, dur, post) for s in range(SHARDS) if s != victim)
    report.row(f"shard-{mode}", f"{label} of s{victim} under load: failed statements for keys on {live_names}, "
               "all clients", f"{others_failed} ({live} ok: {live_ok})", others_failed == 0)
    for lib in LIBS:
        mine = [e for e in ev if e[5] == lib and e[2] != victim]
        failed = sum(1 for e in mine if not e[3])
        report.row(f"shard-{mode}", f"failed statements for keys on {live_names}, {lib} clients",
                   f"{failed} ({len(mine) - failed} ok)", failed == 0)
    for lib in LIBS:
        mine = [e for e in victim_during if e[5] == lib]
        d = [e[1] - e[0] for e in mine]
        nerr = sum(1 for e in mine if not e[3])
        late = [x for x in d if x > limit]
        unclear = [e for e in mine if not e[3] and not names_victim.search(e[4])]
        report.row(f"shard-{mode}", f"s{victim}'s statements while {state}, {lib} clients: max duration vs "
                   f"query_timeout {QUERY_TIMEOUT:.0f} s",
                   f"{len(mine)} started: {nerr} failed, {len(mine) - nerr} ok; p50 / max {ms(pct(d, 50))} / "
                   f"{ms(max(d) if d else float('nan'))} ms; {len(late)} over {limit:.0f} s, {len(unclear)} errors "
                   f"not naming s{victim}",
                   bool(mine) and not late and not unclear,
                   f"each ends within {limit:.0f} s with an error naming s{victim}, or succeeds")
    report.row(f"shard-{mode}", f"statements for keys on {live_names} started during the fault: "
               "slowest per library (start to end)", "; ".join(per_lib_slowest)
               + f"; {len(slow_stmt)} over 1 s in the statement itself", None)
    rec = f"{first_ok - t_ready:.2f} s to the first success" if first_ok else "no success after it was back"
    if last_err and last_err > t_ready:
        rec += f", last error {last_err - t_ready:.2f} s after"
    report.row(f"shard-{mode}", f"recovery after {back}", rec,
               first_ok is not None and (last_err is None or last_err - t_ready < 10), "first success, no error after 10 s")


async def proxy_kill_2pc(env, args, report):
    clients = 8 if args.quick else 16
    cycles, load_secs = (1, 5) if args.quick else (3, 10)
    acked = []
    prepared_at_kill = []
    recovery = []
    errors_total = 0
    for cycle in range(cycles):
        env.start_shardgate(log_name=f"shardgate-2pc-{cycle}")
        stop = False
        counts = {"ok": 0, "err": 0}

        async def worker(n):
            nonlocal errors_total
            rnd = random.Random(cycle * 1000 + n)
            conn = None
            while not stop:
                sa = rnd.randrange(SHARDS)
                sb = (sa + 1 + rnd.randrange(SHARDS - 1)) % SHARDS
                a = SHARDS * rnd.randrange(ROWS // SHARDS) + sa
                b = SHARDS * rnd.randrange(ROWS // SHARDS) + sb
                d = rnd.randrange(1, 100)
                tx = f"c{cycle}-{n}-{rnd.getrandbits(48):x}"
                try:
                    if conn is None:
                        conn = await env.connect(timeout=5)
                    async with conn.transaction():
                        await conn.execute("UPDATE acc SET v = v + $1 WHERE id = $2", d, a, timeout=10)
                        await conn.execute("UPDATE acc SET v = v - $1 WHERE id = $2", d, b, timeout=10)
                        await conn.execute("INSERT INTO hist (aid, delta, tx) VALUES ($1, $2, $3)", a, d, tx, timeout=10)
                        await conn.execute("INSERT INTO hist (aid, delta, tx) VALUES ($1, $2, $3)", b, -d, tx, timeout=10)
                    acked.append(tx)
                    counts["ok"] += 1
                except Exception:  # noqa: BLE001
                    counts["err"] += 1
                    if conn is not None:
                        conn.terminate()
                        conn = None
                    await asyncio.sleep(0.05)
            if conn is not None:
                conn.terminate()

        tasks = [asyncio.ensure_future(worker(n)) for n in range(clients)]
        await asyncio.sleep(load_secs)
        before = counts["ok"]
        env.kill_shardgate()
        t_kill = time.monotonic()
        await asyncio.sleep(0.5)
        stop = True
        await asyncio.wait(tasks, timeout=15)
        errors_total += counts["err"]
        in_doubt = sum(int(env.shard_sql(i, "SELECT count(*) FROM pg_prepared_xacts")) for i in range(SHARDS))
        prepared_at_kill.append(in_doubt)
        log(f"proxy-kill-2pc cycle {cycle + 1}/{cycles}: {before} transfers committed, kill -9; "
            f"{in_doubt} prepared transactions left on the shards")
        env.start_shardgate(log_name=f"shardgate-2pc-{cycle}-restart")
        t_restart = time.monotonic()
        left = in_doubt
        while time.monotonic() - t_restart < 60:
            left = sum(int(env.shard_sql(i, "SELECT count(*) FROM pg_prepared_xacts")) for i in range(SHARDS))
            if left == 0:
                break
            await asyncio.sleep(0.25)
        recovery.append((time.monotonic() - t_restart, left))
        log(f"  after restart: {left} prepared transactions left, {time.monotonic() - t_restart:.1f} s "
            f"({time.monotonic() - t_kill:.1f} s after the kill)")
        env.stop_shardgate()
    # Consistency: every transfer is on both shards or on neither, acknowledged ones are there,
    # and balances equal the history.
    rows = {}
    sum_v = sum_d = bad_accounts = 0
    for i in range(SHARDS):
        for line in env.shard_sql(i, "SELECT tx, count(*) FROM hist GROUP BY tx").splitlines():
            tx, c = line.split("|")
            rows[tx] = rows.get(tx, 0) + int(c)
        sum_v += int(env.shard_sql(i, "SELECT coalesce(sum(v), 0) FROM acc"))
        sum_d += int(env.shard_sql(i, "SELECT coalesce(sum(delta), 0) FROM hist"))
        bad_accounts += int(env.shard_sql(i, """SELECT count(*) FROM acc a LEFT JOIN
            (SELECT aid, sum(delta) s FROM hist GROUP BY aid) h ON h.aid = a.id WHERE a.v <> coalesce(h.s, 0)"""))
    torn = sum(1 for c in rows.values() if c != 2)
    lost = sum(1 for tx in acked if rows.get(tx) != 2)
    left_final = sum(int(env.shard_sql(i, "SELECT count(*) FROM pg_prepared_xacts")) for i in range(SHARDS))
    report.detail("proxy-kill-2pc", f"{cycles} cycle(s): {clients} clients run transfers between two shards "
                  "(BEGIN; UPDATE acc +d on shard A; UPDATE acc -d on shard B; INSERT hist on A and B; COMMIT: "
                  f"two-phase commit) for {load_secs} s, then kill -9 of shardgate, then a new shardgate on the "
                  "same port and the time until no prepared transaction is left on any shard "
                  f"(recovery runs every 10 s, leaves prepared transactions younger than 2 s).\n\n"
                  f"Prepared transactions left by each kill: {prepared_at_kill}; time after restart until none: "
                  f"{', '.join(f'{t:.1f} s ({n} left)' for t, n in recovery)}. Acknowledged transfers: "
                  f"{len(acked)}; transfers found: {len(rows)}; failed client transactions (around the kills): "
                  f"{errors_total}. Sum of balances {sum_v}, sum of history {sum_d}.")
    report.row("proxy-kill-2pc", "prepared transactions in doubt after recovery (pg_prepared_xacts, all shards)",
               f"{left_final} (left by the kills: {prepared_at_kill}; recovered in "
               f"{', '.join(f'{t:.1f} s' for t, _ in recovery)})", left_final == 0)
    report.row("proxy-kill-2pc", "atomicity: transfers on one shard only; acknowledged but missing",
               f"{torn} torn, {lost} lost of {len(acked)} acknowledged", torn == 0 and lost == 0)
    report.row("proxy-kill-2pc", "balances equal history (sum and per account)",
               f"sum(v) = {sum_v}, sum(delta) = {sum_d}, accounts differing: {bad_accounts}",
               sum_v == sum_d == 0 and bad_accounts == 0)


async def large_messages(env, args, report):
    size_mb, clients, per_client = (8, 4, 2) if args.quick else (32, 4, 3)
    size = size_mb << 20
    env.start_shardgate()
    rss0 = env.rss_kb()
    sampler = RssSampler(env.sg.pid)
    sampler.start()
    log(f"large-messages: {clients} clients x {per_client} queries with a {size_mb} MB parameter")
    payload = "x" * size
    failures = []
    t0 = time.monotonic()

    async def one(n):
        try:
            conn = await env.connect()
            for _ in range(per_client):
                got = await conn.fetchval("SELECT length($1::text)", payload, timeout=120)
                if got != size:
                    failures.append(f"length {got}")
            # and the same as a simple-protocol text literal, routed by its key
            await conn.execute(f"UPDATE acc SET pad = '{payload[:size // 2]}' WHERE id = {n}", timeout=120)
            await conn.execute(f"UPDATE acc SET pad = repeat('x', 80) WHERE id = {n}", timeout=120)
            await conn.close()
        except Exception as e:  # noqa: BLE001
            failures.append(short(e))

    await asyncio.gather(*(one(n) for n in range(clients)))
    elapsed = time.monotonic() - t0
    await asyncio.sleep(2)
    rss_after = env.rss_kb()
    peak = sampler.stop()
    env.stop_shardgate()
    in_flight = clients * size_mb
    report.detail("large-messages", f"{clients} concurrent clients each send {per_client} extended-protocol "
                  f"queries `SELECT length($1::text)` with a {size_mb} MB parameter, then one simple-protocol "
                  f"UPDATE with a {size_mb // 2} MB literal routed by its key ({elapsed:.1f} s). shardgate RSS: "
                  f"{rss0 / 1024:.1f} MB before, peak {peak / 1024:.1f} MB (sampled every 20 ms), "
                  f"{rss_after / 1024:.1f} MB 2 s after the clients closed. At most {in_flight} MB of client "
                  "messages in flight at once." + (f" Failures: {failures[:3]}" if failures else ""))
    report.row("large-messages", f"{clients} x {size_mb} MB messages: failures; peak RSS growth / bytes in flight",
               f"{len(failures)} failures; peak +{(peak - rss0) / 1024:.0f} MB for {in_flight} MB in flight "
               f"({(peak - rss0) / 1024 / in_flight:.1f}x)",
               not failures and (peak - rss0) / 1024 <= 3 * in_flight, "no failure, peak growth <= 3x in flight")
    report.row("large-messages", "RSS returned after the clients closed",
               f"{rss0 / 1024:.1f} -> {rss_after / 1024:.1f} MB", (rss_after - rss0) / 1024 <= 32,
               "within 32 MB of the start")


def startup_packet():
    body = struct.pack("!i", 196608) + b"user\0" + PG_USER.encode() + b"\0database\0" + DB.encode() + b"\0\0"
    return struct.pack("!i", len(body) + 4) + body


async def half_open(env, args, report):
    per_kind, hold = (100, 5) if args.quick else (1000, 20)
    env.start_shardgate()
    rss0 = env.rss_kb()
    log(f"half-open: {per_kind} each of: silent TCP, partial startup packet, authenticated client with a "
        f"partial 64 MB Query; held {hold} s")
    writers = []

    async def silent():
        _, w = await asyncio.open_connection("127.0.0.1", env.sg_port)
        writers.append(w)

    async def partial_startup():
        _, w = await asyncio.open_connection("127.0.0.1", env.sg_port)
        w.write(struct.pack("!i", 1000) + struct.pack("!i", 196608))
        await w.drain()
        writers.append(w)

    async def partial_query():
        r, w = await asyncio.open_connection("127.0.0.1", env.sg_port)
        w.write(startup_packet())
        await w.drain()
        buf = b""
        while b"Z\0\0\0\x05" not in buf:
            chunk = await r.read(4096)
            if not chunk:
                raise ConnectionError("closed during startup")
            buf += chunk
        w.write(b"Q" + struct.pack("!i", 64 << 20) + b"SELECT '" + b"y" * 65536)
        await w.drain()
        writers.append(w)

    sem = asyncio.Semaphore(200)

    async def limited(f):
        async with sem:
            try:
                await f()
                return None
            except Exception as e:  # noqa: BLE001
                return short(e)

    rss_steps = []
    setup_errors = []
    for name, f in (("silent", silent), ("partial startup", partial_startup), ("partial 64 MB Query", partial_query)):
        res = await asyncio.gather(*(limited(f) for _ in range(per_kind)))
        setup_errors += [r for r in res if r]
        await asyncio.sleep(1)
        rss_steps.append((name, env.rss_kb()))
        log(f"  {name}: {per_kind} open, RSS {rss_steps[-1][1] / 1024:.1f} MB")
    # A normal client is served meanwhile.
    lat = []
    normal_errors = []
    t_hold = time.monotonic()
    try:
        conn = await env.connect()
        while time.monotonic() - t_hold < hold:
            t0 = time.monotonic()
            await conn.fetchval(SELECT, random.randrange(ROWS), timeout=10)
            lat.append(time.monotonic() - t0)
            await asyncio.sleep(0.05)
        await conn.close()
    except Exception as e:  # noqa: BLE001
        normal_errors.append(short(e))
    rss_held = env.rss_kb()
    for w in writers:
        w.close()
    await asyncio.sleep(2)
    rss_after = env.rss_kb()
    env.stop_shardgate()
    prev = rss0
    parts = []
    for name, r in rss_steps:
        parts.append(f"{name}: +{(r - prev) / 1024:.1f} MB ({(r - prev) / per_kind:.1f} KB each)")
        prev = r
    report.detail("half-open", f"{per_kind} connections of each kind opened and left hanging: silent TCP "
                  "connections, startup packets cut after 8 of 1000 announced bytes, and authenticated clients "
                  f"that sent 64 KB of a Query announced as 64 MB. RSS {rss0 / 1024:.1f} MB before; "
                  + "; ".join(parts) + f"; {rss_held / 1024:.1f} MB after {hold} s held, {rss_after / 1024:.1f} MB "
                  f"2 s after closing them. A normal client meanwhile: {len(lat)} statements, p99/max "
                  f"{ms(pct(lat, 99))}/{ms(max(lat) if lat else float('nan'))} ms."
                  + (f" Setup errors: {setup_errors[:3]} ({len(setup_errors)})" if setup_errors else "")
                  + (f" Normal client errors: {normal_errors}" if normal_errors else ""))
    grow = (rss_held - rss0) / (3 * per_kind)
    report.row("half-open", f"{3 * per_kind} half-open connections: RSS per connection; normal client served",
               f"{grow:.1f} KB each ({(rss_held - rss0) / 1024:.1f} MB); normal client {len(lat)} ok, "
               f"{len(normal_errors)} errors, max {ms(max(lat) if lat else float('nan'))} ms",
               not normal_errors and not setup_errors and grow <= 100 and (max(lat) if lat else 9) < 1.0,
               "<= 100 KB each, normal client ok with max < 1 s")
    report.row("half-open", "RSS after the half-open connections closed",
               f"{rss0 / 1024:.1f} -> {rss_after / 1024:.1f} MB", (rss_after - rss0) / 1024 <= 32,
               "within 32 MB of the start")


# --- report -----------------------------------------------------------------

class Report:
    def __init__(self):
        self.rows = []
        self.details = []

    def row(self, scenario, measured, result, passed, criterion=None):
        verdict = "—" if passed is None else ("PASS" if passed else "FAIL")
        if criterion:
            measured = f"{measured} ({criterion})"
        self.rows.append((scenario, measured, result, verdict))
        print(f"RESULT {verdict:4} {scenario}: {measured}: {result}", flush=True)

    def detail(self, scenario, text):
        self.details.append((scenario, text))
        print(f"DETAIL {scenario}: {text}", flush=True)


async def run(env, args, report):
    funcs = {"soak": soak, "burst": burst, "shard-kill": lambda e, a, r: shard_fault(e, a, r, "kill"),
             "shard-stop": lambda e, a, r: shard_fault(e, a, r, "stop"), "proxy-kill-2pc": proxy_kill_2pc,
             "large-messages": large_messages, "half-open": half_open}
    for name in args.scenarios:
        t0 = time.monotonic()
        env.scenario = name
        log(f"=== {name}")
        await funcs[name](env, args, report)
        log(f"=== {name} done in {time.monotonic() - t0:.0f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenarios", nargs="*", help=f"any of {', '.join(SCENARIOS)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer clients, seconds instead of minutes")
    ap.add_argument("--soak-secs", type=int, default=600, help="soak duration in full mode (default 600)")
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    ap.add_argument("--out", help="results file (default bench/results/reliability-<date>[-quick].md)")
    args = ap.parse_args()
    args.scenarios = args.scenarios or SCENARIOS
    for s in args.scenarios:
        if s not in SCENARIOS:
            sys.exit(f"unknown scenario {s!r}; known: {', '.join(SCENARIOS)}")
    nofile = harness.raise_nofile(65536)
    if nofile < 4 * 1000 + 100:
        sys.exit(f"open-files limit is {nofile}; the suite needs ~4,100 (ulimit -n)")
    binary = harness.build_shardgate()
    t_start = time.monotonic()
    load_before = os.getloadavg()
    loads = []  # the 1-minute load average every 10 s: the machine is shared

    def sample_load():
        while True:
            loads.append(os.getloadavg()[0])
            time.sleep(10)

    threading.Thread(target=sample_load, daemon=True).start()
    env = Env(binary)
    report = Report()
    try:
        env.start_shards()
        asyncio.run(run(env, args, report))
    finally:
        env.cleanup()
        log(f"logs of shardgate and the shards: {env.logs}")
    load_after = os.getloadavg()

    table = ["| scenario | measured (pass criterion) | result | verdict |", "|---|---|---|---|"]
    table += [f"| {s} | {m} | {r} | {v} |" for s, m, r, v in report.rows]
    print("\n".join(table))
    if args.no_save:
        return
    now = datetime.datetime.now()
    if os.environ.get("SHARDGATE_BIN"):
        # A given binary: its commit from SHARDGATE_REV or a name like shardgate-<commit>.
        m = re.search(r"-([0-9a-f]{7,40})$", binary)
        rev = os.environ.get("SHARDGATE_REV") or (m.group(1) if m else None)
        built = f"shardgate {f'`{rev}`' if rev else 'of unknown commit'} (release build `{binary}`)"
    else:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=harness.ROOT,
                             capture_output=True, text=True).stdout.strip() or "?"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=harness.ROOT,
                               capture_output=True, text=True).stdout.strip()
        built = f"shardgate `{rev}`{' (with uncommitted changes)' if dirty else ''}, release build"
    libpq = psycopg.pq.version()
    pg = subprocess.run([os.path.join(harness.pg_bindir(), "postgres"), "--version"],
                        capture_output=True, text=True).stdout.strip()
    body = [f"# Reliability suite ({now:%Y-%m-%d %H:%M}{', quick' if args.quick else ''})", "",
            f"Command: `bench/reliability.sh {' '.join(sys.argv[1:])}`  ",
            f"{built}; {pg}; asyncpg {asyncpg.__version__}, psycopg {psycopg.__version__} (libpq "
            f"{libpq // 10000}.{libpq % 10000}, {psycopg.pq.__impl__}); {platform.node() or 'host'} "
            f"({os.cpu_count()} CPUs, shared with other work: load average {load_before[0]:.1f} before, "
            f"{load_after[0]:.1f} after, 1-minute average {sum(loads) / len(loads):.1f} mean / {max(loads):.1f} max "
            f"during the run). Total {time.monotonic() - t_start:.0f} s. Logs of shardgate and the shards "
            f"(not committed): `{os.path.relpath(env.logs, harness.ROOT)}/`.  ",
            "Three Postgres shards (fsync=off, max_prepared_transactions=100), shardgate with transaction "
            f"pooling, pool size {POOL} per shard, two_phase_commit on; `acc` and `hist` sharded by key % 3, "
            "so every statement's shard is known from its key. What the scenarios do: `bench/reliability.py`.",
            "", "| scenario | measured (pass criterion) | result | verdict |", "|---|---|---|---|"]
    body += table[2:]
    body.append("")
    for scenario, text in report.details:
        body += [f"## {scenario}", "", text, ""]
    os.makedirs(harness.RESULTS, exist_ok=True)
    path = args.out or os.path.join(harness.RESULTS, f"reliability-{now:%Y-%m-%d}{'-quick' if args.quick else ''}.md")
    with open(path, "w") as f:
        f.write("\n".join(body))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
