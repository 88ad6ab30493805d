#!/bin/sh
# Make sure "$1" (python3) can create a virtualenv: Debian ships venv separately.
# As root on Debian, install what is missing; otherwise say exactly what to run.
set -eu
python=${1:-python3}
if ! command -v "$python" >/dev/null 2>&1 || ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    missing="python3 (3.11 or newer)"
elif ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing="python3-venv"
else
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing $missing with apt-get" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv python3-dev
else
    echo "taskd needs $missing. Install it with: sudo apt-get install python3 python3-venv" >&2
    exit 1
fi
