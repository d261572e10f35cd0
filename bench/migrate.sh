#!/bin/sh
# Migrator on 16 shards: apply 20 revisions, then `up` with nothing pending,
# `status`, `verify` (targets: no-op `up` and `status` well under a second).
# Options: --shards N --clusters N --revisions N --repeat N; SHARDGATE_BIN=path
# skips the release build. See bench/migrate.py.
set -e
cd "$(dirname "$0")/.."
exec python3 bench/migrate.py "$@"
