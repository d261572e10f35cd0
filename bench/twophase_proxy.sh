#!/usr/bin/env bash
# Cost of a 2-shard write transaction (two-phase commit) vs a single-shard one,
# through the shardgate proxy on three throwaway clusters, with pgbench custom scripts.
# Usage: bench/twophase_proxy.sh [--quick] [--secs N] [--rounds N] [--clients 1,8] [--pool N] [--no-save]
# Environment: SHARDGATE_BIN=path skips `cargo build --release`; PG_BINDIR overrides the
# PostgreSQL binaries. Everything it starts is stopped and deleted on exit.
# Writes bench/results/twophase-proxy-<date>.md.
set -euo pipefail
exec python3 "$(dirname "$0")/twophase_proxy.py" "$@"
