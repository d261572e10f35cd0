#!/usr/bin/env bash
# Driver compatibility runner (issue #14): the drivers' own test suites against
# Postgres directly, PgBouncer and shardgate A/B/C. See tests/compat/README.md.
#   tests/compat/run.sh                                   # asyncpg, all targets
#   tests/compat/run.sh --psycopg-src ~/src/psycopg       # + psycopg's suite
#   tests/compat/run.sh --suites asyncpg --targets direct,sg-b
#   tests/compat/run.sh --subset                          # the bounded CI check
# Needs what tests/setup.sh installs; run as root or as a user that can
# run Postgres (as root the clusters run as the postgres OS user).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python3 tests/compat/run.py "$@"
