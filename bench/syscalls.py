#!/usr/bin/env python3
"""System calls per transaction: shardgate (SQL routing on) and PgBouncer side by side
under `pgbench -S -c 16`, counted with `strace -c -f` attached to each proxy.

callgrind counts user-space instructions only; a proxy's per-transaction CPU is mostly its
socket system calls and the kernel work behind them, so this is the other half of the picture.
strace slows the traced proxy down: compare the counts, not the tps.

Usage: bench/syscalls.sh [--secs 8] [--mode simple|extended] [--out FILE];
SHARDGATE_BIN=path skips the build.
"""
import argparse
import datetime
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from harness import DB, PG_USER, log  # noqa: E402


def pgbench(port, secs, mode, clients=16):
    r = subprocess.run(["pgbench", "-n", "-S", "-M", mode, "-c", str(clients), "-j", "2",
                        "-T", str(secs), "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, DB],
                       capture_output=True, text=True)
    t = re.search(r"number of transactions actually processed: (\d+)", r.stdout)
    if r.returncode != 0 or not t:
        raise SystemExit("pgbench failed:\n" + r.stdout[-500:] + r.stderr[-500:])
    return int(t.group(1))


def traced(pid, port, secs, mode):
    """(transactions, {syscall: calls}) of one pgbench run with strace attached to `pid`."""
    out = f"/tmp/strace-{pid}.txt"
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(pid)],
                              stderr=subprocess.DEVNULL)
    time.sleep(1)
    txns = pgbench(port, secs, mode)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(timeout=30)
    calls = {}
    with open(out) as f:
        for line in f:
            parts = line.split()
            # % time, seconds, usecs/call, calls, [errors], syscall
            if len(parts) >= 5 and parts[3].isdigit() and parts[-1] != "total":
                calls[parts[-1]] = int(parts[3])
    os.unlink(out)
    return txns, calls


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--secs", type=int, default=8)
    p.add_argument("--mode", default="simple", choices=["simple", "extended"])
    p.add_argument("--out")
    a = p.parse_args()
    started = datetime.datetime.now()
    binary = harness.build_shardgate()
    pgbouncer = harness.ensure_pgbouncer()
    b = harness.Bench()
    try:
        b.start_postgres()
        subprocess.run(["pgbench", "-i", "-q", "-s", "10", "-h", "127.0.0.1", "-p", str(b.pg_port),
                        "-U", PG_USER, DB], check=True, capture_output=True)
        sg = b.start_shardgate(binary, 20, routed=True)
        pb = b.start_pgbouncer(pgbouncer, 20)
        results = {}
        for name, proc, port in (("shardgate", sg, b.sg_port), ("pgbouncer", pb, b.pb_port)):
            pgbench(port, 2, a.mode)  # warm the pool
            log(f"strace -c -f on {name} during pgbench -S -M {a.mode} -c 16 -T {a.secs}")
            results[name] = traced(proc.pid, port, a.secs, a.mode)
    finally:
        b.cleanup()
    names = sorted(set(results["shardgate"][1]) | set(results["pgbouncer"][1]),
                   key=lambda s: -results["shardgate"][1].get(s, 0))
    md = [f"# System calls per transaction: shardgate vs PgBouncer ({started:%Y-%m-%d %H:%M})", "",
          f"Command: `bench/syscalls.sh --secs {a.secs} --mode {a.mode}`; `pgbench -n -S -M {a.mode} "
          f"-c 16 -j 2`, shardgate with SQL routing on (transaction pooling, pool 20), PgBouncer "
          f"transaction pooling, pool 20; `strace -c -f` attached to each proxy (slows it: compare "
          f"counts, not speed).", "",
          "| system call | shardgate per txn | pgbouncer per txn |", "|---|---|---|"]
    per = {n: {s: c / t for s, c in calls.items()} for n, (t, calls) in results.items()}
    for s in names:
        a_ = per["shardgate"].get(s, 0)
        b_ = per["pgbouncer"].get(s, 0)
        if a_ >= 0.01 or b_ >= 0.01:
            md.append(f"| `{s}` | {a_:.2f} | {b_:.2f} |")
    md.append(f"| **all** | **{sum(per['shardgate'].values()):.2f}** | "
              f"**{sum(per['pgbouncer'].values()):.2f}** |")
    md.append("")
    md.append(f"Transactions under strace: shardgate {results['shardgate'][0]:,}, "
              f"PgBouncer {results['pgbouncer'][0]:,}.")
    text = "\n".join(md) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
        log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
