#!/usr/bin/env bash
# RSS of shardgate and PgBouncer holding 10,000 idle authenticated clients.
# Usage: bench/idle_connections.sh [--clients N] [--pool N] [--no-pgbouncer]
# Environment: SHARDGATE_BIN=path skips `cargo build --release`. See bench/README.md.
set -euo pipefail
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 "$(dirname "$0")/idle_connections.py" "$@"
