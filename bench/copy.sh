#!/bin/sh
# COPY FROM STDIN through shardgate into a 3-shard hash-sharded table:
# throughput (and the same stream straight into one shard, for reference)
# and the proxy's resident memory during the COPY (the proxy runs inside the
# test process). SHARDGATE_COPY_BENCH_MB sets the size (default 200).
set -e
cd "$(dirname "$0")/.."
export SHARDGATE_DEVCLUSTER_TMPDIR=${SHARDGATE_DEVCLUSTER_TMPDIR:-/dev/shm}
exec cargo test ${PROFILE:---release} --test copy_memory -- --ignored --nocapture
