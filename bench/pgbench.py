#!/usr/bin/env python3
"""pgbench -S through shardgate and PgBouncer, side by side with direct Postgres.

See bench/README.md. Usage: bench/pgbench.sh [--quick] [--secs N] [--rounds N]
[--pool N] [--clients 1,16,64] [--modes simple,extended,prepared] [--scale N]
[--no-pgbouncer] [--out FILE]
"""

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import DB, PG_USER, log  # noqa: E402

TARGETS = ["direct", "shardgate", "baseline", "pgbouncer", "floor"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 s x 1 round")
    p.add_argument("--secs", type=int, help="seconds per pgbench run (default 10)")
    p.add_argument("--rounds", type=int, help="A B C repetitions (default 2)")
    p.add_argument("--pool", type=int, default=20, help="backend pool size of both proxies (default 20)")
    p.add_argument("--clients", default="1,16,64")
    p.add_argument("--modes", default="simple,extended,prepared")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default 10)")
    p.add_argument("--no-pgbouncer", action="store_true")
    p.add_argument("--routed", action="store_true",
                   help="shardgate with SQL routing on (pgbench_accounts sharded by aid; one shard)")
    p.add_argument("--floor", action="store_true",
                   help="also run bench/tokio-floor, a bare tokio TCP forwarder (1:1, no pooling): "
                        "the CPU any tokio proxy pays before doing work of its own")
    p.add_argument("--baseline-bin", metavar="PATH",
                   help="also run this shardgate binary (an older build) with the same map, "
                        "interleaved: 'shardgate/baseline' shows a regression on this machine")
    p.add_argument("--out", help="markdown file (default bench/results/pgbench-<date>.md)")
    a = p.parse_args()
    a.secs = a.secs or (3 if a.quick else 10)
    a.rounds = a.rounds or (1 if a.quick else 2)
    a.clients = [int(c) for c in a.clients.split(",")]
    a.modes = a.modes.split(",")
    return a


def pgbench(port, mode, clients, secs):
    argv = ["pgbench", "-n", "-S", "-M", mode, "-c", str(clients), "-T", str(secs),
            "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, DB]
    if clients >= 2:
        argv[1:1] = ["-j", "2"]
    r = subprocess.run(argv, capture_output=True, text=True)
    out = r.stdout + r.stderr
    tps = re.search(r"^tps = ([\d.]+)", out, re.M)
    txns = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    ok = r.returncode == 0 and tps and txns and not (failed and int(failed.group(1)))
    if not ok:
        log(f"pgbench failed on port {port} ({mode}, -c {clients}), rc={r.returncode}:\n"
            + "\n".join(out.strip().splitlines()[-6:]))
        return None
    return float(tps.group(1)), int(txns.group(1))


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def main():
    a = parse_args()
    harness.raise_nofile()
    started = datetime.datetime.now()
    binary = harness.build_shardgate()
    pb_path = None if a.no_pgbouncer else harness.ensure_pgbouncer()
    pb_ver = harness.pgbouncer_version(pb_path) if pb_path else None
    pb_prepared_ok = bool(pb_ver and pb_ver >= (1, 21))
    notes = []
    if pb_path and not pb_prepared_ok:
        notes.append(f"PgBouncer {pb_ver[0]}.{pb_ver[1]} has no `max_prepared_statements` (1.21+): "
                     "`-M prepared` through it in transaction mode is not comparable (statements "
                     "prepared on one server connection are missing on the next), so that column is "
                     "skipped for prepared mode.")
    elif not pb_path and not a.no_pgbouncer:
        notes.append("PgBouncer could not be installed: its columns are empty.")

    b = harness.Bench()
    b.start_postgres()
    log(f"pgbench -i -s {a.scale}")
    subprocess.run(["pgbench", "-i", "-q", "-s", str(a.scale), "-h", "127.0.0.1", "-p", str(b.pg_port),
                    "-U", PG_USER, DB], check=True, capture_output=True)
    b.psql(DB, "VACUUM ANALYZE")
    sg = b.start_shardgate(binary, a.pool, routed=a.routed)
    pb = b.start_pgbouncer(pb_path, a.pool, 200 if pb_prepared_ok else None) if pb_path else None
    floor = b.start_tokio_floor(harness.build_tokio_floor()) if a.floor else None
    base = (b.start_shardgate(a.baseline_bin, a.pool, routed=a.routed, name="baseline")
            if a.baseline_bin else None)
    ports = {"direct": b.pg_port, "shardgate": b.sg_port, "pgbouncer": b.pb_port,
             "floor": b.floor_port if floor else None,
             "baseline": b.ports["baseline"] if base else None}
    pids = {"shardgate": sg.pid, "pgbouncer": pb.pid if pb else None,
            "floor": floor.pid if floor else None, "baseline": base.pid if base else None}

    load_before = open("/proc/loadavg").read().split()[:3]
    runs = []  # dicts: round, mode, clients, target, tps, txns, cpu_us_per_txn
    total = a.rounds * len(a.modes) * len(a.clients)
    n = 0
    for rnd in range(1, a.rounds + 1):
        for mode in a.modes:
            for clients in a.clients:
                n += 1
                line = []
                for target in TARGETS:
                    if ports.get(target) is None:
                        continue
                    if target == "pgbouncer" and mode == "prepared" and not pb_prepared_ok:
                        continue
                    pid = pids.get(target)
                    cpu0 = harness.proc_cpu_seconds(pid) if pid else None
                    res = pgbench(ports[target], mode, clients, a.secs)
                    cpu1 = harness.proc_cpu_seconds(pid) if pid else None
                    if pid and any(p_ and p_.poll() is not None for p_ in (sg, pb, floor, base)):
                        sys.exit(f"a proxy died:\n{b.tail_log('shardgate')}\n{b.tail_log('pgbouncer')}")
                    if res is None:
                        continue
                    tps, txns = res
                    cpu = (cpu1 - cpu0) * 1e6 / txns if pid and txns else None
                    runs.append(dict(round=rnd, mode=mode, clients=clients, target=target,
                                     tps=tps, txns=txns, cpu=cpu))
                    line.append(f"{target} {tps:,.0f} tps" + (f" {cpu:.1f} µs/txn" if cpu else ""))
                log(f"[{n}/{total}] round {rnd} {mode:8} -c {clients:<3} " + " | ".join(line))
    load_after = open("/proc/loadavg").read().split()[:3]

    # Aggregate: mean over rounds per target; spread = (max-min)/mean, worst of the targets.
    rows = []
    for mode in a.modes:
        for clients in a.clients:
            cell = {}
            spread = 0.0
            for target in TARGETS:
                rs = [r for r in runs if (r["mode"], r["clients"], r["target"]) == (mode, clients, target)]
                if not rs:
                    cell[target] = (None, None)
                    continue
                tps = [r["tps"] for r in rs]
                mean = statistics.mean(tps)
                if len(tps) > 1:
                    spread = max(spread, (max(tps) - min(tps)) / mean)
                cpus = [r["cpu"] for r in rs if r["cpu"] is not None]
                cell[target] = (mean, statistics.mean(cpus) if cpus else None)
            d, s, bl, p, fl = (cell[t][0] for t in TARGETS)
            rows.append([mode, clients, d, s, p,
                         s / d if s and d else None, s / p if s and p else None,
                         cell["shardgate"][1], cell["pgbouncer"][1],
                         spread if a.rounds > 1 else None, fl, cell["floor"][1],
                         bl, s / bl if s and bl else None, cell["baseline"][1]])

    header = ["mode", "clients", "direct tps", "shardgate tps", "pgbouncer tps", "shardgate/direct",
              "shardgate/pgbouncer", "shardgate µs CPU/txn", "pgbouncer µs CPU/txn", "spread"]
    if a.floor:
        header += ["floor tps", "floor µs CPU/txn"]
    if a.baseline_bin:
        header += ["baseline tps", "shardgate/baseline", "baseline µs CPU/txn"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m, c, d, s, p, sd, sp, sc, pc, spr, fl, fc, bl, sb, bc in rows:
        extra = f" {fmt(fl, ',.0f')} | {fmt(fc, '.1f')} |" if a.floor else ""
        if a.baseline_bin:
            extra += f" {fmt(bl, ',.0f')} | {fmt(sb, '.2f')} | {fmt(bc, '.1f')} |"
        table.append(f"| {m} | {c} | {fmt(d, ',.0f')} | {fmt(s, ',.0f')} | {fmt(p, ',.0f')} | "
                     f"{fmt(sd, '.2f')} | {fmt(sp, '.2f')} | {fmt(sc, '.1f')} | {fmt(pc, '.1f')} | "
                     f"{'—' if spr is None else f'{spr * 100:.0f}%'} |{extra}")
    print("\n".join(table))

    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=harness.ROOT,
                            capture_output=True, text=True).stdout.strip()
    if os.environ.get("SHARDGATE_BIN"):
        commit += f" (prebuilt binary {os.environ['SHARDGATE_BIN']})"
    cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    pgb_v = subprocess.run(["pgbench", "--version"], capture_output=True, text=True).stdout.strip()
    pb_v = f"PgBouncer {pb_ver[0]}.{pb_ver[1]}" if pb_ver else "PgBouncer: not run"
    raw = ["| round | mode | clients | target | tps | transactions | proxy µs CPU/txn |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        raw.append(f"| {r['round']} | {r['mode']} | {r['clients']} | {r['target']} | {r['tps']:,.0f} | "
                   f"{r['txns']:,} | {fmt(r['cpu'], '.1f')} |")
    suffix = "-routed" if a.routed else ""
    out = a.out or os.path.join(harness.RESULTS, f"pgbench{suffix}-{started:%Y-%m-%d}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(f"""# pgbench -S: direct vs shardgate vs PgBouncer ({started:%Y-%m-%d %H:%M})

Command: `bench/pgbench.sh {' '.join(sys.argv[1:])}`  
shardgate `{commit}`, {pgb_v}, {pb_v}, {platform.node()} ({os.cpu_count()} CPUs, {cpu_model}).  
`pgbench -i -s {a.scale}`; each cell: `pgbench -n -S -M <mode> -c <clients> [-j 2] -T {a.secs}`,
mean of {a.rounds} round(s), targets interleaved direct → shardgate{' → baseline' if a.baseline_bin else ''} → pgbouncer{' → floor' if a.floor else ''} within each round.
{f"*baseline*: a second shardgate, the binary `{a.baseline_bin}`, with the same map and pool (an older build, to show a regression on this machine)." + chr(10) if a.baseline_bin else ""}
shardgate SQL routing: {'on (pgbench_accounts sharded by aid, hash, one shard: every statement analysed)' if a.routed else 'off (no tables in the map: pooling only)'}.
Both proxies: transaction pooling, pool size {a.pool}, one Postgres (fsync=off, max_connections=300,
shared_buffers=128MB). pgbench, the proxy and Postgres share the same {os.cpu_count()} cores.
Load average before/after: {' '.join(load_before)} / {' '.join(load_after)} (machine shared with other work).

{chr(10).join(table)}

- *ratios* > 1 mean shardgate is faster; shardgate/direct is the price of the extra hop,
  shardgate/pgbouncer compares with the incumbent pooler.
- *µs CPU/txn*: the proxy process's utime+stime during the run divided by the transactions it
  served (includes kernel time for its socket I/O; not Postgres's or pgbench's CPU).
- *spread*: largest (max−min)/mean of the tps between rounds over the targets of the row;
  a ratio is not meaningful beyond that noise.
{"- *floor*: bench/tokio-floor, a bare tokio TCP forwarder (one backend connection per client, bytes copied unread, no pooling): what a proxy on shardgate's runtime pays per transaction before any work of its own." + chr(10) if a.floor else ""}
{''.join('- ' + n_ + chr(10) for n_ in notes)}
## Every run

{chr(10).join(raw)}
""")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
