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
    echo "installing nginx with apt-get" >&2
    apt-get update -qq
    # nginx-light is enough (proxy, map, upstream); Debian 12 ships it. Older/newer releases
    # that lack it get the full package.
    if apt-cache show nginx-light >/dev/null 2>&1; then
        package=nginx-light
    else
        package=nginx
    fi
    # Do not let the package's post-install start a system nginx on port 80: the tests run
    # their own instances. policy-rc.d exit code 101 means "action forbidden".
    created_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    status=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null || status=$?
    if [ -n "$created_policy" ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    [ "$status" = 0 ] || exit "$status"
    # In case it started anyway (a policy-rc.d that allowed it): stop it, do not keep port 80.
    if [ -s /run/nginx.pid ]; then
        service nginx stop >/dev/null 2>&1 || nginx -s quit 2>/dev/null || true
    fi
    command -v nginx >/dev/null 2>&1
else
    echo "the nginx tests need nginx. Install it with: sudo apt-get install nginx-light" >&2
    exit 1
fi
