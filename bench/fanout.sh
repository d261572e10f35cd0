#!/usr/bin/env bash
# Fan-out executor benchmark: memory (peak RSS growth while merging 3 x 1M
# rows), latency vs the slowest shard, aggregate throughput vs an unsharded
# oracle. Uses the test harness's throwaway clusters (tests/support).
# Usage: bench/fanout.sh [--release]
set -euo pipefail
cd "$(dirname "$0")/.."
profile=()
if [[ "${1:-}" == "--release" ]]; then profile=(--release); fi
export SHARDGATE_DEVCLUSTER_TMPDIR="${SHARDGATE_DEVCLUSTER_TMPDIR:-/dev/shm}"
out="bench/fanout-results.md"
{
  echo "# fan-out benchmark $(date -u +%FT%TZ) ${profile[*]:-(debug build)}"
  echo
  echo '```'
  cargo test "${profile[@]}" --test fanout_bench -- --ignored --nocapture 2>&1 \
    | grep -E '^(loaded|process|memory|portal|latency|throughput|test result)'
  echo '```'
} | tee "$out"
echo "written to $out"
