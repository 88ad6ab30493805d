#!/bin/sh
# Make sure an `nginx` binary exists: tests/test_nginx.py runs the shipped deploy/nginx.conf
# through a real nginx (its own instance, on free ports, under a temporary directory).
# As root on Debian, install what is missing; otherwise say exactly what to run.
set -eu
PATH="$PATH:/usr/sbin:/usr/local/sbin"
if command -v nginx >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    # nginx-light is enough (proxy, map, upstream); Debian 12 ships it. Older/newer releases
    # that lack it get the full package.
    if apt-cache show nginx-light >/dev/null 2>&1; then
        package=nginx-light
    else
        package=nginx
    fi
    sh "$(dirname "$0")/apt-install.sh" "$package"
    # In case it started anyway (a policy-rc.d that allowed it): stop it, do not keep port 80.
    if [ -s /run/nginx.pid ]; then
        service nginx stop >/dev/null 2>&1 || nginx -s quit 2>/dev/null || true
    fi
    command -v nginx >/dev/null 2>&1
else
    echo "the nginx tests need nginx. Install it with: sudo apt-get install nginx-light" >&2
    exit 1
fi
