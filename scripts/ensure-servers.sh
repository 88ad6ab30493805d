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
# $missing unquoted: one word per package.
exec sh "$(dirname "$0")/apt-install.sh" $missing
