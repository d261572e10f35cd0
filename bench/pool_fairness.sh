#!/usr/bin/env bash
# Pool fairness: 800 clients on a pool of 20 through shardgate and PgBouncer (issue #15-1).
# Usage: bench/pool_fairness.sh [--secs 60] [--clients 800] [--pool 20] [--scale 10]
#                               [--builtin simple-update] [--checkout-timeout 3s] [--out FILE]
# Environment: SHARDGATE_BIN=path skips `cargo build --release`; PG_BINDIR overrides the
# PostgreSQL binaries. Everything it starts is stopped and deleted on exit. See bench/README.md.
set -euo pipefail
exec python3 "$(dirname "$0")/pool_fairness.py" "$@"
