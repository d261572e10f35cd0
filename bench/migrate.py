"""Migrator benchmark: `shardgate migrate` on many shards (default 16
clusters, one shard database each; `--clusters 4` puts the 16 shard
databases on 4 clusters instead).

Measures, as wall time of the CLI process (what an operator or a deploy
script waits for, process start included):
  1. `up` applying 20 small revisions on every shard (20 two-phase-commit
     groups over all shards);
  2. `up` with nothing pending (20 revisions already applied);
  3. `status`;
  4. `verify` (catalog fingerprints of every shard).
Target (issue #7): 2 and 3 well under a second.

Python 3 standard library only; uses bench/harness.py for the temp dir,
process cleanup and running Postgres as the `postgres` user.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import PG_USER, log  # noqa: E402


def start_clusters(bench, count):
    """initdb once, copy the data dir per cluster, start them all; ports."""
    bindir = harness.pg_bindir()
    template = os.path.join(bench.dir, "template")
    os.mkdir(template)
    bench._chown(template)
    bench._chown(bench.dir)
    subprocess.run([os.path.join(bindir, "initdb"), "-D", template, "-U", PG_USER, "-A", "trust",
                    "--no-sync", "-E", "UTF8", "--locale=C"], check=True,
                   stdout=subprocess.DEVNULL, **bench._as_pg_user())
    ports, procs = [], []
    for i in range(count):
        data = os.path.join(bench.dir, f"pg{i}")
        subprocess.run(["cp", "-a", template, data], check=True)
        port = harness.free_port()
        settings = {"port": port, "listen_addresses": "127.0.0.1",
                    "unix_socket_directories": bench.dir, "fsync": "off",
                    "synchronous_commit": "off", "full_page_writes": "off",
                    "max_connections": 40, "shared_buffers": "16MB",
                    "max_prepared_transactions": 64}
        argv = [os.path.join(bindir, "postgres"), "-D", data]
        for k, v in settings.items():
            argv += ["-c", f"{k}={v}"]
        procs.append(bench._spawn(f"pg{i}", argv, **bench._as_pg_user()))
        ports.append(port)
    for i, (port, proc) in enumerate(zip(ports, procs)):
        for _ in range(300):
            if proc.poll() is not None:
                sys.exit(f"pg{i} exited:\n" + bench.tail_log(f"pg{i}"))
            if subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode == 0:
                break
            time.sleep(0.1)
        else:
            sys.exit(f"pg{i} did not become ready:\n" + bench.tail_log(f"pg{i}"))
    return ports


def psql(port, db, sql):
    subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(port),
                    "-U", PG_USER, "-d", db, "-c", sql], check=True, stdout=subprocess.DEVNULL)


def write_revisions(folder, count):
    parent = "none"
    for i in range(1, count + 1):
        rev = f"{i:012x}"
        path = os.path.join(folder, f"{rev}_table_{i}")
        os.makedirs(path)
        with open(os.path.join(path, "up.sql"), "w") as f:
            f.write(f"-- revision: {rev}\n-- down_revision: {parent}\n"
                    f"CREATE TABLE t{i} (id bigint PRIMARY KEY, v text);\n"
                    f"CREATE INDEX t{i}_v ON t{i} (v);\n")
        with open(os.path.join(path, "down.sql"), "w") as f:
            f.write(f"DROP TABLE t{i};\n")
        parent = rev


def run(binary, config, *args):
    start = time.perf_counter()
    out = subprocess.run([binary, "migrate", "--config", config, *args], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"migrate {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return elapsed, out.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--clusters", type=int, default=0, help="Postgres clusters (default: one per shard)")
    parser.add_argument("--revisions", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=7, help="runs of each no-op command")
    args = parser.parse_args()
    clusters = args.clusters or args.shards

    binary = harness.build_shardgate()
    bench = harness.Bench()
    log(f"starting {clusters} clusters for {args.shards} shards in {bench.dir}")
    t0 = time.perf_counter()
    ports = start_clusters(bench, clusters)
    shards = []
    for i in range(args.shards):
        port = ports[i % clusters]
        db = f"shard{i}"
        psql(port, "postgres", f"CREATE DATABASE {db}")
        shards.append((f"s{i}", port, db))
    log(f"{clusters} clusters up in {time.perf_counter() - t0:.1f} s")

    migrations = os.path.join(bench.dir, "migrations")
    os.mkdir(migrations)
    write_revisions(migrations, args.revisions)
    config = os.path.join(bench.dir, "map.yaml")
    with open(config, "w") as f:
        f.write("listen: 127.0.0.1:0\nauth: trust\nusers: [ { name: app } ]\nshards:\n")
        for name, port, db in shards:
            f.write(f"  - {{ name: {name}, url: \"postgres://{PG_USER}@127.0.0.1:{port}/{db}\" }}\n")
        f.write(f"migrations: {{ dir: \"{migrations}\" }}\n")

    results = []
    apply_s, out = run(binary, config, "up")
    applied = sum(1 for line in out.splitlines() if line.startswith("up "))
    if applied != args.revisions:
        sys.exit(f"expected {args.revisions} steps, got:\n{out}")
    results.append((f"up: apply {args.revisions} revisions", [apply_s]))
    for label, argv, check in [
        ("up: nothing pending", ["up"], "nothing to do"),
        ("status", ["status"], "pending: none"),
        ("verify", ["verify"], "no drift"),
        ("heads (no database)", ["heads"], f"{args.revisions:012x}"),
    ]:
        times = []
        for _ in range(args.repeat):
            elapsed, out = run(binary, config, *argv)
            if check not in out:
                sys.exit(f"{label}: expected {check!r} in:\n{out}")
            times.append(elapsed)
        results.append((label, times))

    build = "release" if "/release/" in binary else "debug"
    header = (f"shardgate migrate, {args.shards} shards on {clusters} clusters, {args.revisions} revisions, "
              f"{build} binary, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    lines = [header, f"{'command':32} {'runs':>4} {'min ms':>8} {'median ms':>9} {'max ms':>8}"]
    for label, times in results:
        lines.append(f"{label:32} {len(times):4} {min(times) * 1000:8.1f} "
                     f"{statistics.median(times) * 1000:9.1f} {max(times) * 1000:8.1f}")
    text = "\n".join(lines)
    print(text)
    os.makedirs(harness.RESULTS, exist_ok=True)
    path = os.path.join(harness.RESULTS, f"migrate-{time.strftime('%Y%m%d-%H%M%S')}.txt")
    with open(path, "w") as f:
        f.write(text + "\n")
    log(f"results in {path}")
    shutil.rmtree(migrations, ignore_errors=True)


if __name__ == "__main__":
    main()
