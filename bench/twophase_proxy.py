"""Cost of a 2-shard write transaction (two-phase commit) vs a single-shard
one, through the shardgate proxy, with pgbench custom scripts.

Three throwaway clusters (fsync=off, synchronous_commit=off,
max_prepared_transactions=100) are the shards s0..s2; table `acc` is
sharded with `kind: modulo`, so `id % 3` names the shard and a script picks
its shards with arithmetic. Each transaction is BEGIN; two UPDATEs; END:

* single: both rows on s0: one shard, plain COMMIT;
* two:    one row on s0, one on s1: two-phase commit (decision row on s0,
          PREPARE on s1, COMMIT on s0, COMMIT PREPARED on s1);
* three:  the second row on s1 or s2 and a third UPDATE on s2 (for scale);
* direct: the single script straight to s0's Postgres (no proxy).

Each cell: `pgbench -n -M simple -c C -j min(C,2) -T secs -f script`,
rounds interleaved; the ratio is single/two (tps) and two/single (latency).
"""

import argparse
import datetime
import os
import platform
import re
import signal
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import DB, PG_USER, log  # noqa: E402

ROWS_PER_SHARD = 10000

SCRIPTS = {
    "autocommit": """\\set a 3 * random(0, {n})
UPDATE acc SET v = v + 0 WHERE id = :a;
""",
    "single": """\\set a 3 * random(0, {n})
\\set b 3 * random(0, {n})
BEGIN;
UPDATE acc SET v = v + 1 WHERE id = :a;
UPDATE acc SET v = v - 1 WHERE id = :b;
END;
""",
    "two": """\\set a 3 * random(0, {n})
\\set b 3 * random(0, {n}) + 1
BEGIN;
UPDATE acc SET v = v + 1 WHERE id = :a;
UPDATE acc SET v = v - 1 WHERE id = :b;
END;
""",
    "three": """\\set a 3 * random(0, {n})
\\set b 3 * random(0, {n}) + 1
\\set c 3 * random(0, {n}) + 2
BEGIN;
UPDATE acc SET v = v + 2 WHERE id = :a;
UPDATE acc SET v = v - 1 WHERE id = :b;
UPDATE acc SET v = v - 1 WHERE id = :c;
END;
""",
}


def pgbench(port, user, script, clients, secs):
    argv = ["pgbench", "-n", "-M", "simple", "-h", "127.0.0.1", "-p", str(port), "-U", user,
            "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(secs), "-f", script, DB]
    out = subprocess.run(argv, capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        sys.exit(f"pgbench failed ({out.returncode}): {' '.join(argv)}\n{text}")
    tps = float(re.search(r"tps = ([\d.]+) \(without", text).group(1))
    lat = float(re.search(r"latency average = ([\d.]+) ms", text).group(1))
    failed = int(re.search(r"number of failed transactions: (\d+)", text).group(1))
    done = int(re.search(r"actually processed: (\d+)", text).group(1))
    if failed:
        sys.exit(f"pgbench reported {failed} failed transactions:\n{text}")
    return tps, lat, done


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--pool", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="--secs 3 --rounds 1")
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    args = ap.parse_args()
    if args.quick:
        args.secs, args.rounds = 3, 1
    clients = [int(c) for c in args.clients.split(",")]

    binary = harness.build_shardgate()
    shards = [harness.Bench() for _ in range(3)]
    everything = shards[:]

    def on_signal(signum, _frame):
        for b in everything:
            b.cleanup()
        os._exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    load_before = os.getloadavg()
    for i, b in enumerate(shards):
        b.start_postgres(extra=("-c", "max_prepared_transactions=100"))
        n = ROWS_PER_SHARD
        b.psql(DB, "CREATE TABLE acc (id bigint PRIMARY KEY, v bigint NOT NULL DEFAULT 0);"
                   f"INSERT INTO acc (id) SELECT 3 * g + {i} FROM generate_series(0, {n}) g;"
                   "ANALYZE acc;")

    proxy = shards[0]
    port = harness.free_port()
    config = os.path.join(proxy.dir, "twophase.yaml")
    with open(config, "w") as f:
        f.write(f"listen: 127.0.0.1:{port}\nauth: trust\ndatabase: {DB}\n"
                f"users:\n  - {{ name: {PG_USER} }}\n"
                f"pool: {{ mode: transaction, size: {args.pool} }}\nshards:\n")
        for i, b in enumerate(shards):
            f.write(f"  - {{ name: s{i}, url: \"postgres://{PG_USER}@127.0.0.1:{b.pg_port}/{DB}\" }}\n")
        f.write("functions:\n  by_id: { kind: modulo }\n"
                "tables:\n  acc: { key: id, function: by_id }\n"
                "two_phase_commit: true\n")
    env = {**os.environ, "SHARDGATE_LOG": os.environ.get("SHARDGATE_LOG", "warn")}
    sg = proxy._spawn("shardgate-2pc", [binary, "serve", "--config", config], env=env)
    proxy._wait_port("shardgate-2pc", sg, port)
    log(f"shardgate pid {sg.pid} on 127.0.0.1:{port}, 3 shards, pool {args.pool}")

    scripts = {}
    for name, text in SCRIPTS.items():
        path = os.path.join(proxy.dir, f"{name}.sql")
        with open(path, "w") as f:
            f.write(text.format(n=ROWS_PER_SHARD))
        scripts[name] = path

    kinds = ["direct", "single", "two", "three", "direct-autocommit", "autocommit"]
    runs = []  # (round, clients, kind, tps, lat, done)
    for r in range(1, args.rounds + 1):
        for c in clients:
            for kind in kinds:
                if kind.startswith("direct"):
                    script = scripts["autocommit" if kind.endswith("autocommit") else "single"]
                    tps, lat, done = pgbench(shards[0].pg_port, PG_USER, script, c, args.secs)
                else:
                    tps, lat, done = pgbench(port, PG_USER, scripts[kind], c, args.secs)
                log(f"round {r} clients {c} {kind}: {tps:,.0f} tps, {lat:.3f} ms")
                runs.append((r, c, kind, tps, lat, done))

    # Every transaction balanced: the sum of v over all shards is 0.
    total = 0
    prepared = 0
    for b in shards:
        out = subprocess.run(["psql", "-XAtq", "-h", "127.0.0.1", "-p", str(b.pg_port), "-U", PG_USER,
                              "-d", DB, "-c", "SELECT sum(v), (SELECT count(*) FROM pg_prepared_xacts) FROM acc"],
                             capture_output=True, text=True, check=True).stdout.strip()
        s, p = out.split("|")
        total += int(s)
        prepared += int(p)
    if total != 0 or prepared != 0:
        sys.exit(f"inconsistent after the run: sum(v) = {total}, prepared = {prepared}")
    load_after = os.getloadavg()

    def mean(c, kind, i):
        return statistics.mean(x[i] for x in runs if x[1] == c and x[2] == kind)

    lines = []
    lines.append("| clients | direct s0 tps | single-shard tps | 2-shard tps | 3-shard tps | "
                 "single lat ms | 2-shard lat ms | 3-shard lat ms | tps single/2-shard | "
                 "latency 2-shard/single | 1 UPDATE autocommit: direct / proxy tps |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in clients:
        d, s1, s2, s3, da, a = (mean(c, k, 3) for k in kinds)
        l1, l2, l3 = (mean(c, k, 4) for k in kinds[1:4])
        lines.append(f"| {c} | {d:,.0f} | {s1:,.0f} | {s2:,.0f} | {s3:,.0f} | {l1:.3f} | {l2:.3f} | "
                     f"{l3:.3f} | {s1 / s2:.2f} | {l2 / l1:.2f} | {da:,.0f} / {a:,.0f} |")
    table = "\n".join(lines)
    print(table)

    if args.no_save:
        return
    now = datetime.datetime.now()
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=harness.ROOT,
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = "?"
    pg = subprocess.run(["pgbench", "--version"], capture_output=True, text=True).stdout.strip()
    body = [
        f"# Two-phase commit through the proxy: 2-shard vs single-shard write transactions "
        f"({now:%Y-%m-%d %H:%M})",
        "",
        f"Command: `bench/twophase_proxy.sh {' '.join(sys.argv[1:])}`  ",
        f"shardgate `{rev}` ({binary}), {pg}, {platform.node() or 'host'} "
        f"({os.cpu_count()} CPUs).  ",
        "Three Postgres clusters (fsync=off, synchronous_commit=off: the ratio is round trips and "
        "server CPU, not disk flushes), table `acc` sharded by `id % 3` (`kind: modulo`), "
        f"{ROWS_PER_SHARD + 1} rows per shard; pool size {args.pool}. Each transaction: BEGIN, two "
        "UPDATEs (three for 3-shard), END, simple protocol; "
        f"`pgbench -n -M simple -c C -j min(C,2) -T {args.secs}`, mean of {args.rounds} round(s). "
        "pgbench, the proxy and the three clusters share the cores.  ",
        f"Load average before/after: {' '.join(f'{x:.2f}' for x in load_before)} / "
        f"{' '.join(f'{x:.2f}' for x in load_after)}. After the run: sum of all balances 0, "
        "no prepared transaction.",
        "",
        table,
        "",
        "- *single-shard*: both rows on s0, one backend, plain COMMIT (the proxy holds BEGIN back "
        "until the first statement names its shard).",
        "- *2-shard*: a row on s0 and one on s1: INSERT of the decision row on s0, PREPARE "
        "TRANSACTION on s1, COMMIT on s0, COMMIT PREPARED on s1.",
        "- *direct s0*: the single-shard script straight to Postgres, for the proxy's own cost.",
        "- *1 UPDATE autocommit*: one statement, no transaction block, to s0 directly / through "
        "the proxy (the per-statement cost of the hop without transaction handling).",
        "",
        "## Every run",
        "",
        "| round | clients | kind | tps | latency ms | transactions |",
        "|---|---|---|---|---|---|",
    ]
    body += [f"| {r} | {c} | {k} | {t:,.0f} | {lat:.3f} | {d:,} |" for (r, c, k, t, lat, d) in runs]
    os.makedirs(harness.RESULTS, exist_ok=True)
    out = os.path.join(harness.RESULTS, f"twophase-proxy-{now:%Y-%m-%d}.md")
    with open(out, "w") as f:
        f.write("\n".join(body) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
