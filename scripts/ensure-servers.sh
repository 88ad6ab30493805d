#!/bin/sh
# Make sure the machine has the Postgres and Redis server binaries that devtools/ starts as
# private servers when the configured ones do not answer (`make run`, `make test`).
# As root on Debian, install what is missing; otherwise only say what to run, and succeed:
# the configured servers may well answer, and devtools names the command again if not.
set -eu
PATH="$PATH:/usr/sbin:/usr/local/sbin"
missing=
if ! command -v postgres >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    missing="postgresql"
fi
if ! command -v redis-server >/dev/null 2>&1; then
    missing="$missing redis-server"
fi
[ -n "$missing" ] || exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: private dev servers need:$missing. Install with: sudo apt-get install$missing" >&2
    exit 0
fi
echo "installing$missing with apt-get" >&2
apt-get update -qq
# Do not let the packages' post-install start system servers on 5432 and 6379: only the binaries
# are wanted. policy-rc.d exit code 101 means "action forbidden".
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
