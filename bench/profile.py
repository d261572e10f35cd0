#!/usr/bin/env python3
"""Where shardgate's CPU goes under `pgbench -S -M {MODE} -c 16`.

Two views of the same workload (see bench/README.md):
1. perf (software event cpu-clock, sampling the running release binary, user +
   kernel): share of samples per function and per category (kernel/syscalls,
   shardgate code, tokio/mio, allocator and memcpy in libc, other crates, std).
   Hardware counters are not available in this VM (`perf stat -e instructions`
   says <not supported>), so cycles/instructions are not used.
2. callgrind (valgrind): user-space instructions by function, exact but ~50x
   slower, so that run is shorter and the proxy is the bottleneck.
Usage: bench/profile.sh [--secs 15] [--mode simple|extended|prepared] [--routed] [--no-perf] [--no-callgrind] [--out FILE]
"""

import argparse
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import DB, PG_USER, log  # noqa: E402

TOP = 15


MODE = "simple"
ROUTED = False


def pgbench(port, secs, clients=16):
    r = subprocess.run(["pgbench", "-n", "-S", "-M", MODE, "-c", str(clients), "-j", "2",
                        "-T", str(secs), "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, DB],
                       capture_output=True, text=True)
    m = re.search(r"^tps = ([\d.]+)", r.stdout, re.M)
    t = re.search(r"number of transactions actually processed: (\d+)", r.stdout)
    if r.returncode != 0 or not m:
        log("pgbench failed:\n" + r.stdout[-500:] + r.stderr[-500:])
        return None, None
    return float(m.group(1)), int(t.group(1))


def category(dso, sym):
    if "kernel" in dso or dso.startswith("[k"):
        return "kernel (syscalls, TCP loopback, scheduler)"
    if sym.startswith(("tokio::", "mio::", "<tokio::", "<mio::")) or "tokio::" in sym[:40]:
        return "tokio / mio"
    if "shardgate::" in sym[:60]:
        return "shardgate code"
    if dso.startswith("libc") or "malloc" in sym or "memcpy" in sym or "memmove" in sym or sym.startswith("__"):
        return "libc (malloc, memcpy, syscall wrappers)"
    if sym.startswith(("core::", "alloc::", "std::", "<core::", "<alloc::", "<std::")):
        return "Rust std/core/alloc"
    return "other crates (pgwire, bytes, futures, tracing, …)"


def perf_profile(b, sg, secs, workdir):
    data = os.path.join(workdir, "perf.data")
    rec = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "4000", "-p", str(sg.pid),
                            "-o", data], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    time.sleep(0.5)
    cpu0 = harness.proc_cpu_seconds(sg.pid)
    tps, txns = pgbench(b.sg_port, secs)
    cpu1 = harness.proc_cpu_seconds(sg.pid)
    rec.send_signal(signal.SIGINT)
    rec.wait(60)
    rep = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "dso,sym",
                          "--percent-limit", "0.01"], capture_output=True, text=True).stdout
    rows = []
    for line in rep.splitlines():
        m = re.match(r"\s+([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)$", line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(3), m.group(4).strip()))
    cats = {}
    for pct, dso, kind, sym in rows:
        c = category("[kernel" if kind == "k" else dso, sym)
        cats[c] = cats.get(c, 0) + pct
    return dict(tps=tps, txns=txns, cpu_us=(cpu1 - cpu0) * 1e6 / txns if txns else None,
                rows=rows, cats=sorted(cats.items(), key=lambda kv: -kv[1]))


def callgrind_profile(b, binary, pool, secs, workdir):
    out = os.path.join(workdir, "callgrind.out")
    sg = b.start_shardgate(binary, pool, wrapper=["valgrind", "--tool=callgrind",
                                                  f"--callgrind-out-file={out}"], routed=ROUTED)
    time.sleep(1)
    # Warm up (client and backend connections, caches), then count only the
    # measured run: Ir per transaction without start-up costs.
    pgbench(b.sg_port, 2)
    subprocess.run(["callgrind_control", "-z", str(sg.pid)], capture_output=True)
    tps, txns = pgbench(b.sg_port, secs)
    b.stop(sg, wait=120)
    keep = os.environ.get("SHARDGATE_PROFILE_KEEP")
    if keep:
        shutil.copy(out, keep)
    ann = subprocess.run(["callgrind_annotate", "--inclusive=no", "--auto=no", "--threshold=100", out],
                         capture_output=True, text=True).stdout
    total = re.search(r"^([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", ann, re.M)
    # Function summary only (after the `file:function` header); inlined code shows up as the
    # calling function under another source file, so sum per function name.
    summary = ann.split("file:function", 1)[1] if "file:function" in ann else ""
    per_fn = {}
    for line in summary.splitlines():
        m = re.match(r"^\s*([\d,]+) \(\s*([\d.]+)%\)\s+(\S*?):(.*?)(?: \[(.*)\])?$", line)
        if m:
            ir, pct, fn, obj = int(m.group(1).replace(",", "")), float(m.group(2)), m.group(4), m.group(5)
            prev = per_fn.get(fn, (0.0, 0, ""))
            per_fn[fn] = (prev[0] + pct, prev[1] + ir, prev[2] or os.path.basename(obj or ""))
    # After `callgrind_control -z` the functions that were on the stack at
    # that moment (main, the runtime's block_on, …) come out with their
    # whole inclusive cost (or more) as self cost; no real function has half.
    total_ir = int(total.group(1).replace(",", "")) if total else 0
    rows = sorted(((pct, ir, fn, obj) for fn, (pct, ir, obj) in per_fn.items()
                   if not total_ir or ir < total_ir / 2), reverse=True)
    cats = {}
    for pct, _, fn, obj in rows:
        c = category(obj if obj.startswith("libc") else "", fn)
        cats[c] = cats.get(c, 0) + pct
    per_txn = int(total.group(1).replace(",", "")) / txns if total and txns else None
    return dict(tps=tps, txns=txns, total=total.group(1) if total else "?", per_txn=per_txn, rows=rows,
                cats=sorted(cats.items(), key=lambda kv: -kv[1]))


def short(sym, n=110):
    sym = re.sub(r"::h[0-9a-f]{16}$", "", sym).replace("|", "\\|")
    return sym if len(sym) <= n else sym[: n - 1] + "…"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--secs", type=int, default=15)
    p.add_argument("--pool", type=int, default=20)
    p.add_argument("--no-perf", action="store_true")
    p.add_argument("--mode", default="simple", choices=["simple", "extended", "prepared"])
    p.add_argument("--routed", action="store_true", help="SQL routing on (see pgbench.sh --routed)")
    p.add_argument("--no-callgrind", action="store_true")
    p.add_argument("--out")
    a = p.parse_args()
    global MODE, ROUTED
    MODE, ROUTED = a.mode, a.routed
    harness.raise_nofile()
    started = datetime.datetime.now()
    binary = harness.build_shardgate()
    b = harness.Bench()
    b.start_postgres()
    subprocess.run(["pgbench", "-i", "-q", "-s", "10", "-h", "127.0.0.1", "-p", str(b.pg_port),
                    "-U", PG_USER, DB], check=True, capture_output=True)
    b.psql(DB, "VACUUM ANALYZE")
    perf = cg = None
    if not a.no_perf and shutil.which("perf"):
        sg = b.start_shardgate(binary, a.pool, routed=ROUTED)
        pgbench(b.sg_port, 2)  # warm the pool
        log(f"perf record -e cpu-clock on shardgate during pgbench -S -M {MODE} -c 16 -T {a.secs}")
        perf = perf_profile(b, sg, a.secs, b.dir)
        b.stop(sg)
    if not a.no_callgrind and shutil.which("valgrind"):
        log(f"shardgate under callgrind during pgbench -S -M {MODE} -c 16 -T {a.secs}")
        cg = callgrind_profile(b, binary, a.pool, a.secs, b.dir)

    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=harness.ROOT,
                            capture_output=True, text=True).stdout.strip()
    md = [f"# Profile: shardgate under `pgbench -S -M {MODE} -c 16 -j 2` ({started:%Y-%m-%d %H:%M})", "",
          f"Command: `bench/profile.sh {' '.join(sys.argv[1:])}`; shardgate `{commit}`, transaction "
          f"pooling, pool {a.pool}, one local Postgres; everything on the same {os.cpu_count()} cores.", ""]
    if perf:
        md += [f"## perf, cpu-clock samples (user + kernel), {a.secs} s at {perf['tps']:,.0f} tps, "
               f"shardgate {perf['cpu_us']:.1f} µs CPU/txn", "",
               "| category | share of shardgate's samples |", "|---|---|"]
        md += [f"| {c} | {v:.1f}% |" for c, v in perf["cats"]]
        md += ["", f"Top {TOP} functions by self samples:", "", "| # | self | where | function |", "|---|---|---|---|"]
        for i, (pct, dso, kind, sym) in enumerate(perf["rows"][:TOP], 1):
            md.append(f"| {i} | {pct:.2f}% | {'kernel' if kind == 'k' else dso} | `{short(sym)}` |")
        md.append("")
    if cg:
        md += [f"## callgrind, user-space instructions (Ir), {a.secs} s at {cg['tps']:,.0f} tps under valgrind "
               f"({cg['txns']:,} transactions, {cg['total']} Ir in total, "
               f"**{cg['per_txn'] or 0:,.0f} Ir per transaction**; counters zeroed after a 2 s warm-up)", "",
               "| category | share of Ir |", "|---|---|"]
        md += [f"| {c} | {v:.1f}% |" for c, v in cg["cats"]]
        md += ["", f"Top {TOP} functions by self cost:", "", "| # | self Ir | share | object | function |",
               "|---|---|---|---|---|"]
        for i, (pct, ir, fn, obj) in enumerate(cg["rows"][:TOP], 1):
            md.append(f"| {i} | {ir:,} | {pct:.2f}% | {obj} | `{short(fn)}` |")
        md.append("")
    md += ["## What dominates", "", "SUMMARY (edit after reading the numbers)", ""]
    out = a.out or os.path.join(harness.RESULTS, f"profile-{started:%Y-%m-%d}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
