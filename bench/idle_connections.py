#!/usr/bin/env python3
"""RSS of shardgate (and PgBouncer) holding N idle, authenticated client connections.

Each client speaks the v3 startup packet over a raw socket (auth: trust) and
waits for ReadyForQuery, then stays idle. VmRSS of the proxy process is read
from /proc before, with all clients connected, and after they closed.
See bench/README.md. Usage: bench/idle_connections.sh [--clients 10000] [--pool 20]
[--no-pgbouncer] [--out FILE]
"""

import argparse
import asyncio
import datetime
import os
import struct
import subprocess
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import DB, PG_USER, log  # noqa: E402

TARGET_MB = 200  # from the issue: < 200 MB RSS for 10,000 idle clients


def startup_packet():
    params = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in
                      [("user", PG_USER), ("database", DB), ("application_name", "idle-bench")]) + b"\0"
    return struct.pack("!ii", 8 + len(params), 196608) + params


async def open_client(port, sem, packet):
    """An authenticated connection (writer) or an error string."""
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
        except (OSError, asyncio.TimeoutError) as e:
            return f"connect: {e!r}"
        try:
            writer.write(packet)
            while True:
                head = await asyncio.wait_for(reader.readexactly(5), 30)
                kind, length = head[:1], struct.unpack("!i", head[1:])[0]
                body = await reader.readexactly(length - 4)
                if kind == b"Z":
                    return writer
                if kind == b"E":
                    writer.close()
                    return "error: " + body.replace(b"\0", b" ").decode(errors="replace").strip()
                if kind == b"R" and struct.unpack("!i", body[:4])[0] != 0:
                    writer.close()
                    return "server asked for a password (expected trust)"
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
            writer.close()
            return f"startup: {e!r}"


async def hold_idle(port, n, pid, settle):
    sem = asyncio.Semaphore(200)
    packet = startup_packet()
    t0 = time.time()
    results = await asyncio.gather(*(open_client(port, sem, packet) for _ in range(n)))
    elapsed = time.time() - t0
    writers = [r for r in results if not isinstance(r, str)]
    errors = [r for r in results if isinstance(r, str)]
    await asyncio.sleep(settle)
    rss = harness.proc_rss_kb(pid)
    threads = proc_threads(pid)
    for w in writers:
        w.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
    return len(writers), errors, elapsed, rss, threads


def proc_threads(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def measure(name, proc, port, n, settle, cycles):
    time.sleep(0.5)
    before = harness.proc_rss_kb(proc.pid)
    ok, errors, elapsed, during, threads = asyncio.run(hold_idle(port, n, proc.pid, settle))
    time.sleep(2)
    after = harness.proc_rss_kb(proc.pid)
    fds_after = len(os.listdir(f"/proc/{proc.pid}/fd"))
    # Further cycles: does RSS keep growing (a leak) or is the memory reused (allocator)?
    again = []
    for _ in range(cycles - 1):
        _, _, _, peak, _ = asyncio.run(hold_idle(port, n, proc.pid, settle))
        time.sleep(2)
        again.append((peak, harness.proc_rss_kb(proc.pid)))
    for i, (peak, rest) in enumerate(again, 2):
        log(f"{name}: cycle {i}: RSS {peak / 1024:.1f} MB with clients, {rest / 1024:.1f} MB after close")
    if errors:
        log(f"{name}: {len(errors)} of {n} clients failed, first: {errors[0]}")
    per_conn = (during - before) / ok if ok else float("nan")
    log(f"{name}: {ok}/{n} idle clients in {elapsed:.1f}s; RSS {before / 1024:.1f} MB before, "
        f"{during / 1024:.1f} MB with them ({per_conn:.1f} KB/conn), {after / 1024:.1f} MB after close "
        f"({fds_after} open fds)")
    return dict(name=name, ok=ok, failed=len(errors), first_error=errors[0] if errors else "",
                elapsed=elapsed, before=before, during=during, after=after, per_conn=per_conn,
                threads=threads, again=again, fds_after=fds_after)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=10000)
    p.add_argument("--pool", type=int, default=20)
    p.add_argument("--settle", type=float, default=2.0, help="seconds to wait before reading RSS")
    p.add_argument("--cycles", type=int, default=2,
                   help="connect/close cycles; later ones show whether RSS keeps growing (default 2)")
    p.add_argument("--no-pgbouncer", action="store_true")
    p.add_argument("--out")
    a = p.parse_args()
    limit = harness.raise_nofile(max(65536, 2 * a.clients + 1000))
    if limit < a.clients + 100:
        sys.exit(f"RLIMIT_NOFILE is {limit}; need more than {a.clients} descriptors")
    started = datetime.datetime.now()
    binary = harness.build_shardgate()
    pb_path = None if a.no_pgbouncer else harness.ensure_pgbouncer()

    b = harness.Bench()
    b.start_postgres()
    results = []
    sg = b.start_shardgate(binary, a.pool)
    results.append(measure("shardgate", sg, b.sg_port, a.clients, a.settle, a.cycles))
    b.stop(sg)
    if pb_path:
        pb = b.start_pgbouncer(pb_path, a.pool)
        results.append(measure("pgbouncer", pb, b.pb_port, a.clients, a.settle, a.cycles))
        b.stop(pb)

    rows = ["| proxy | clients connected | failed | RSS before (MB) | RSS with clients (MB) | "
            "KB per connection | RSS after close (MB) | open fds after close | threads | connect time (s) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['name']} | {r['ok']:,} | {r['failed']:,} | {r['before'] / 1024:.1f} | "
                    f"{r['during'] / 1024:.1f} | {r['per_conn']:.1f} | {r['after'] / 1024:.1f} | {r['fds_after']} | "
                    f"{r['threads']} | {r['elapsed']:.1f} |")
    for r in results:
        for i, (peak, rest) in enumerate(r["again"], 2):
            rows.append(f"| {r['name']} (cycle {i}) | | | | {peak / 1024:.1f} | | {rest / 1024:.1f} | | | |")
    print("\n".join(rows))
    sgr = results[0]
    verdict = ("meets" if sgr["failed"] == 0 and sgr["during"] / 1024 < TARGET_MB else "MISSES")
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=harness.ROOT,
                            capture_output=True, text=True).stdout.strip()
    if os.environ.get("SHARDGATE_BIN"):
        commit += f" (prebuilt binary {os.environ['SHARDGATE_BIN']})"
    errors = "".join(f"- {r['name']}: first error: `{r['first_error']}`\n" for r in results if r["failed"])
    out = a.out or os.path.join(harness.RESULTS, f"idle-{started:%Y-%m-%d}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(f"""# {a.clients:,} idle authenticated clients: proxy RSS ({started:%Y-%m-%d %H:%M})

Command: `bench/idle_connections.sh {' '.join(sys.argv[1:])}`; shardgate `{commit}`.
Each client: TCP connect, v3 startup packet (`auth: trust`), wait for ReadyForQuery, stay idle.
VmRSS of the proxy process from /proc/<pid>/status, {a.settle:g} s after the last client
authenticated. Pool size {a.pool} (transaction mode) for both proxies; the backend pool is not
filled by idle clients.

{chr(10).join(rows)}

Target (issue): shardgate under {TARGET_MB} MB RSS with {a.clients:,} idle clients — **{verdict}**.
{errors}""")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
