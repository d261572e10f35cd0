#!/usr/bin/env python3
"""Pool fairness: many clients on a small pool, shardgate vs PgBouncer (issue #15-1).

See bench/README.md. Usage: bench/pool_fairness.sh [--secs 60] [--clients 800] [--pool 20]
[--scale 10] [--builtin simple-update] [--checkout-timeout 3s] [--out FILE]

One Postgres; shardgate (release) and PgBouncer in front of it with the same
transaction-mode pool; `pgbench -c <clients> -T <secs> -l` through each in turn.
A transaction's latency is its wait for a pooled connection plus its own
work, so the worst latency per 10 s window is the worst wait of that window
(plus one transaction). Acceptance of #15-1: 0 errors and shardgate's max
latency within 2x PgBouncer's in the same run.
"""

import argparse
import datetime
import glob
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import DB, PG_USER, log  # noqa: E402

WINDOW = 10  # seconds


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--secs", type=int, default=60, help="seconds per pgbench run (default 60)")
    p.add_argument("--clients", type=int, default=800)
    p.add_argument("--pool", type=int, default=20, help="backend pool size of both proxies (default 20)")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default 10)")
    p.add_argument("--builtin", default="simple-update",
                   help="pgbench builtin script (default simple-update: BEGIN, UPDATE, SELECT, INSERT, END)")
    p.add_argument("--checkout-timeout", default="3s", help="shardgate pool.checkout_timeout (default 3s)")
    p.add_argument("--out", help="markdown file (default bench/results/pool-fairness-<date>.md)")
    return p.parse_args()


def pgbench(port, a, logdir):
    argv = ["pgbench", "-n", "-b", a.builtin, "-c", str(a.clients), "-j", "2", "-T", str(a.secs),
            "-l", "--log-prefix", os.path.join(logdir, "txn"),
            "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, DB]
    r = subprocess.run(argv, capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def analyse(logdir, output, returncode):
    """Latencies (ms) from pgbench's per-transaction logs, errors from its output."""
    lat = []
    windows = {}
    failed = 0
    first = None
    rows = []
    for path in glob.glob(os.path.join(logdir, "txn*")):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6:
                    continue
                # client_id transaction_no time script_no time_epoch time_us
                end = int(parts[4]) + int(parts[5]) / 1e6
                if not parts[2].isdigit():  # "failed" / "skipped"
                    failed += 1
                    continue
                rows.append((end, int(parts[2]) / 1000.0))
    if rows:
        first = min(end for end, _ in rows)
    for end, ms in rows:
        lat.append(ms)
        w = int((end - first) // WINDOW)
        windows[w] = max(windows.get(w, 0.0), ms)
    aborted = len(re.findall(r"client \d+ (?:script \d+ )?aborted", output))
    m = re.search(r"number of failed transactions: (\d+)", output)
    failed = max(failed, int(m.group(1)) if m else 0)
    sqlstates = sorted(set(re.findall(r"ERROR:\s+(.*)", output)))[:5]
    lat.sort()
    return dict(
        txns=len(lat),
        aborted=aborted,
        failed=failed,
        errors=aborted + failed,
        rc=returncode,
        mean=statistics.mean(lat) if lat else None,
        p99=percentile(lat, 0.99),
        max=lat[-1] if lat else None,
        windows=[windows[k] for k in sorted(windows)],
        messages=sqlstates,
        tps=(re.search(r"^tps = ([\d.]+)", output, re.M) or [None, None])[1],
    )


class MetricsSampler(threading.Thread):
    """Reads shardgate's `shardgate_pool_wait_max_seconds{shard="s0"}` every WINDOW s."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.samples = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(WINDOW):
            try:
                text = urllib.request.urlopen(self.url, timeout=5).read().decode()
            except OSError as e:
                log(f"metrics scrape failed: {e}")
                continue
            m = re.search(r'^shardgate_pool_wait_max_seconds\{shard="s0"\} (\S+)', text, re.M)
            if m:
                self.samples.append(float(m.group(1)) * 1000)


def fmt(x, spec=",.1f"):
    return "—" if x is None else format(x, spec)


def main():
    a = parse_args()
    harness.raise_nofile()
    started = datetime.datetime.now()
    binary = harness.build_shardgate()
    pb_path = harness.ensure_pgbouncer()
    pb_ver = harness.pgbouncer_version(pb_path) if pb_path else None

    b = harness.Bench()
    b.start_postgres()
    log(f"pgbench -i -s {a.scale}")
    subprocess.run(["pgbench", "-i", "-q", "-s", str(a.scale), "-h", "127.0.0.1", "-p", str(b.pg_port),
                    "-U", PG_USER, DB], check=True, capture_output=True)
    b.psql(DB, "VACUUM ANALYZE")
    metrics_port = harness.free_port()
    b.start_shardgate(binary, a.pool, pool_extra=f", checkout_timeout: {a.checkout_timeout}",
                      map_extra=f"metrics: 127.0.0.1:{metrics_port}\n")
    if pb_path:
        b.start_pgbouncer(pb_path, a.pool)
    targets = [("shardgate", b.sg_port)] + ([("pgbouncer", b.pb_port)] if pb_path else [])

    load_before = open("/proc/loadavg").read().split()[:3]
    results = {}
    samples = []
    for name, port in targets:
        logdir = tempfile.mkdtemp(prefix=f"log-{name}-", dir=b.dir)
        b._chown(logdir)
        sampler = MetricsSampler(metrics_port) if name == "shardgate" else None
        if sampler:
            sampler.start()
        log(f"pgbench -b {a.builtin} -c {a.clients} -j 2 -T {a.secs} -l through {name}")
        rc, output = pgbench(port, a, logdir)
        if sampler:
            sampler.stop.set()
            sampler.join()
            samples = sampler.samples
        if any(p.poll() is not None for p in (b.sg, b.pb) if p):
            sys.exit(f"a proxy died:\n{b.tail_log('shardgate')}\n{b.tail_log('pgbouncer')}")
        r = analyse(logdir, output, rc)
        results[name] = r
        log(f"{name}: {r['txns']:,} txns, errors {r['errors']} (aborted clients {r['aborted']}, "
            f"failed txns {r['failed']}), latency ms mean {fmt(r['mean'])} p99 {fmt(r['p99'])} "
            f"max {fmt(r['max'])}; worst per {WINDOW} s: {', '.join(f'{w:.0f}' for w in r['windows'])}")
        if r["messages"]:
            log(f"{name} errors: {r['messages']}")
    load_after = open("/proc/loadavg").read().split()[:3]

    header = ["proxy", "transactions", "tps", "errors (aborted clients + failed txns)",
              "mean ms", "p99 ms", "max ms", f"worst per {WINDOW} s window, ms"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        table.append(f"| {name} | {r['txns']:,} | {fmt(float(r['tps']), ',.0f') if r['tps'] else '—'} | {r['errors']} | {fmt(r['mean'])} | "
                     f"{fmt(r['p99'])} | {fmt(r['max'])} | {', '.join(f'{w:.0f}' for w in r['windows'])} |")
    sg, pb = results.get("shardgate"), results.get("pgbouncer")
    if sg and pb and sg["max"] and pb["max"]:
        ratio = sg["max"] / pb["max"]
        ok = sg["errors"] == 0 and ratio <= 2.0
        verdict = (f"shardgate max / PgBouncer max = {ratio:.2f}, shardgate errors {sg['errors']}: "
                   f"**{'PASS' if ok else 'FAIL'}** (acceptance: 0 errors and ≤ 2.00)")
    else:
        verdict = "no PgBouncer run: acceptance not judged"
    print("\n".join(table))
    print(verdict)

    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=harness.ROOT,
                            capture_output=True, text=True).stdout.strip()
    if os.environ.get("SHARDGATE_BIN"):
        commit += f" (prebuilt binary {os.environ['SHARDGATE_BIN']})"
    cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    pgb_v = subprocess.run(["pgbench", "--version"], capture_output=True, text=True).stdout.strip()
    pb_v = f"PgBouncer {pb_ver[0]}.{pb_ver[1]}" if pb_ver else "PgBouncer: not run"
    out = a.out or os.path.join(harness.RESULTS, f"pool-fairness-{started:%Y-%m-%d}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    gauge = ", ".join(f"{s:.0f}" for s in samples) or "—"
    with open(out, "w") as f:
        f.write(f"""# Pool fairness: {a.clients} clients on a pool of {a.pool}, shardgate vs PgBouncer ({started:%Y-%m-%d %H:%M})

Command: `bench/pool_fairness.sh {' '.join(sys.argv[1:])}`  
shardgate `{commit}`, {pgb_v}, {pb_v}, {platform.node()} ({os.cpu_count()} CPUs, {cpu_model}).  
`pgbench -i -s {a.scale}`; per proxy, one after the other against the same Postgres:
`pgbench -n -b {a.builtin} -c {a.clients} -j 2 -T {a.secs} -l`. Both proxies: transaction pooling,
pool size {a.pool}; shardgate `checkout_timeout: {a.checkout_timeout}`, PgBouncer defaults
(`query_wait_timeout` 120 s). pgbench, the proxies and Postgres share the same {os.cpu_count()} cores.
Load average before/after: {' '.join(load_before)} / {' '.join(load_after)} (machine shared with other work).

{chr(10).join(table)}

{verdict}

- Latencies come from pgbench's per-transaction log (`-l`): a transaction's latency is its wait for
  a pooled connection plus its own run time, so *max* bounds the longest pool wait.
- *errors*: clients pgbench reports as aborted (e.g. SQLSTATE 53300 after `checkout_timeout`) plus
  failed transactions.
- shardgate's own `shardgate_pool_wait_max_seconds{{shard="s0"}}` (longest checkout wait of the last
  10–20 s), scraped every {WINDOW} s during its run, ms: {gauge}.
""")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
