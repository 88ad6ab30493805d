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
echo "installing$missing with apt-get" >&2
apt-get update -qq
# Do not let a package's post-install start a system Postgres on 5432: only the binary is
# wanted. policy-rc.d exit code 101 means "action forbidden".
created_policy=
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
fi
status=0
# $missing unquoted: one word per package.
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null || status=$?
if [ -n "$created_policy" ]; then
    rm -f /usr/sbin/policy-rc.d
fi
exit "$status"
