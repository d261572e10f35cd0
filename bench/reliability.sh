#!/usr/bin/env bash
# The reliability suite of issue #15: soak, burst, shard kill -9 / SIGSTOP under
# load, shardgate kill -9 under 2PC TPC-B, large messages, half-open connections.
# Usage: bench/reliability.sh [--quick] [--soak-secs N] [--no-save] [--out FILE] [SCENARIO ...]
#   scenarios: soak burst shard-kill shard-stop proxy-kill-2pc large-messages half-open
#   full run ~25 min (soak 10 min); --quick ~3 min (smoke run).
# Environment: SHARDGATE_BIN=path skips `cargo build --release` (its commit in the report:
# SHARDGATE_REV, else from a name like shardgate-<commit>); PG_BINDIR overrides the
# PostgreSQL binaries. Everything it starts is stopped and deleted on exit, the logs are
# copied to target/reliability-logs/<date-time>/ first. See bench/README.md.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

# The load clients are asyncpg and psycopg from the tests' venv (tests/python_clients.rs
# builds target/python-venv/<hash>/ from tests/python/requirements.txt): use one with the
# pinned versions of both, or build one.
req="$root/tests/python/requirements.txt"
want_asyncpg="$(sed -n 's/^asyncpg==//p' "$req")"
want_psycopg="$(sed -n 's/^psycopg\(\[[a-z,]*\]\)\{0,1\}==//p' "$req")"
check="import sys, asyncpg, psycopg
sys.exit(asyncpg.__version__ != '$want_asyncpg' or psycopg.__version__ != '$want_psycopg')"
python=""
for candidate in "$root"/target/python-venv/*/bin/python; do
    if [ -x "$candidate" ] && "$candidate" -c "$check" >/dev/null 2>&1; then
        python="$candidate"
    fi
done
if [ -z "$python" ]; then
    venv="$root/target/python-venv/reliability"
    echo "[bench] no venv with asyncpg $want_asyncpg and psycopg $want_psycopg: building $venv from tests/python/requirements.txt" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -r "$req"
    python="$venv/bin/python"
fi
exec "$python" "$root/bench/reliability.py" "$@"
