#!/usr/bin/env bash
# Profile shardgate under pgbench -S -M simple -c 16: perf (cpu-clock) and callgrind.
# Usage: bench/profile.sh [--secs N] [--no-perf] [--no-callgrind]; SHARDGATE_BIN=path skips the build.
set -euo pipefail
exec python3 "$(dirname "$0")/profile.py" "$@"
