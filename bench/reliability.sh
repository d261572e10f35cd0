#!/usr/bin/env bash
# The reliability suite of issue #15: soak, burst, shard kill -9 / SIGSTOP under
# load, shardgate kill -9 under 2PC TPC-B, large messages, half-open connections.
# Usage: bench/reliability.sh [--quick] [--soak-secs N] [--no-save] [SCENARIO ...]
#   scenarios: soak burst shard-kill shard-stop proxy-kill-2pc large-messages half-open
#   full run ~25 min (soak 10 min); --quick ~3 min (smoke run).
# Environment: SHARDGATE_BIN=path skips `cargo build --release`; PG_BINDIR overrides the
# PostgreSQL binaries. Everything it starts is stopped and deleted on exit. See bench/README.md.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

# The load client is asyncpg from the tests' venv (tests/python_clients.rs builds
# target/python-venv/<hash>/ from tests/python/requirements.txt); build one if none works.
python=""
for candidate in "$root"/target/python-venv/*/bin/python; do
    if [ -x "$candidate" ] && "$candidate" -c 'import asyncpg' >/dev/null 2>&1; then
        python="$candidate"
    fi
done
if [ -z "$python" ]; then
    venv="$root/target/python-venv/reliability"
    echo "[bench] no venv with asyncpg: building $venv from tests/python/requirements.txt" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -r "$root/tests/python/requirements.txt"
    python="$venv/bin/python"
fi
exec "$python" "$root/bench/reliability.py" "$@"
