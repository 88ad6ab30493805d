#!/bin/sh
# Make sure the load generators of bench/ exist: wrk (HTTP load, bench/wrk/crud.lua) and
# pgbench (the service's statements, bench/pgbench/*.sql). `make bench`, `make bench-quick`
# and `make pytest` (tests/test_bench.py runs the bench on tiny sizes) call this.
# As root on Debian, install what is missing; otherwise say exactly what to run.
set -eu
PATH="$PATH:/usr/sbin:/usr/local/sbin"
missing=
if ! command -v wrk >/dev/null 2>&1; then
    missing="wrk"
fi
# Debian ships pgbench with the server package, in /usr/lib/postgresql/<major>/bin.
if ! command -v pgbench >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1; then
    missing="$missing postgresql"
fi
[ -n "$missing" ] || exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "the benchmark needs:$missing. Install with: sudo apt-get install$missing" >&2
    exit 1
fi
# $missing unquoted: one word per package.
exec sh "$(dirname "$0")/apt-install.sh" $missing
