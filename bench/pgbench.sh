#!/usr/bin/env bash
# pgbench -S through shardgate and PgBouncer, side by side with direct Postgres.
# Usage: bench/pgbench.sh [--quick] [--secs N] [--rounds N] [--pool N] [--clients 1,16,64]
#                         [--modes simple,extended,prepared] [--scale N] [--no-pgbouncer]
# Environment: SHARDGATE_BIN=path skips `cargo build --release`; PG_BINDIR overrides the
# PostgreSQL binaries. Everything it starts is stopped and deleted on exit. See bench/README.md.
set -euo pipefail
exec python3 "$(dirname "$0")/pgbench.py" "$@"
