#!/bin/sh
# Cost of a 2-shard write transaction with two-phase commit vs a single-shard
# one, as ratios (latency and throughput), through the library the proxy uses
# (raw backend connections + executor::twophase::commit) on three throwaway
# clusters (fsync=off, synchronous_commit=off: the ratio is round trips and
# server CPU, not disk flushes).
# Usage: bench/twophase.sh [--debug]
# Environment: TWOPHASE_BENCH_TXNS (per round, client and kind; 500),
# TWOPHASE_BENCH_ROUNDS (3), TWOPHASE_BENCH_CLIENTS (1; e.g. 8 for throughput).
set -e
cd "$(dirname "$0")/.."
export SHARDGATE_DEVCLUSTER_TMPDIR="${SHARDGATE_DEVCLUSTER_TMPDIR:-/dev/shm}"
profile=--release
[ "${1:-}" = "--debug" ] && profile=
exec cargo test $profile --test twophase_bench -- --ignored --nocapture
