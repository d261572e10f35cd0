#!/usr/bin/env bash
# System calls per transaction of shardgate (routing on) and PgBouncer under pgbench -S -c 16.
# Usage: bench/syscalls.sh [--secs N] [--mode simple|extended] [--out FILE]; SHARDGATE_BIN=path skips the build.
set -euo pipefail
exec python3 "$(dirname "$0")/syscalls.py" "$@"
