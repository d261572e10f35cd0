#!/usr/bin/env bash
# Installs what `cargo test` needs on a fresh machine, and nothing when it is
# already there (idempotent): PostgreSQL server binaries and client tools
# (psql, pgbench), openssl, python3-venv (the Python client tests build a venv
# from tests/python/requirements.txt), pgjdbc and a JDK (tests/jdbc_client.rs),
# pgbouncer (tests/compat/run.sh compares shardgate with it),
# and, as root, the `postgres` OS user the test clusters run as.
# Debian/Ubuntu (apt-get); runs apt-get as root, or through sudo.
# Used by the README's test command (`tests/setup.sh && cargo test`) and .ci/run.
set -euo pipefail

say() { echo "setup: $*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
have_initdb() {
    command -v initdb >/dev/null 2>&1 && return 0
    command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ] && return 0
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}
have_initdb || missing+=(postgresql)
{ command -v psql >/dev/null 2>&1 && command -v pgbench >/dev/null 2>&1; } || missing+=(postgresql-client)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3 python3-venv)
[ -f /usr/share/java/postgresql.jar ] || [ -n "${SHARDGATE_PGJDBC_JAR:-}" ] || missing+=(libpostgresql-jdbc-java)
{ command -v javac >/dev/null 2>&1 && command -v java >/dev/null 2>&1; } || missing+=(default-jdk-headless)
command -v pgbouncer >/dev/null 2>&1 || missing+=(pgbouncer)

if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    # The packages may start a system cluster or PgBouncer; the tests start
    # their own on free ports and use neither.
else
    say "PostgreSQL, psql/pgbench, openssl, python3-venv, pgjdbc, JDK, pgbouncer: all present"
fi

# As root, the test clusters run as `postgres` (initdb refuses root).
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    say "creating the postgres OS user"
    useradd --system --create-home --home-dir /var/lib/postgresql postgres
fi
