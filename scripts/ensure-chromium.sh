#!/bin/sh
# Make sure Debian's `chromium` exists: tests/test_web.py drives it headless through
# Playwright (which is told its path and never downloads a browser of its own).
# As root on Debian, install it; otherwise say exactly what to run.
set -eu
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium with apt-get" >&2
    apt-get update -qq
    # Nothing in the package starts a service, but keep the same guard as the other installs:
    # policy-rc.d exit code 101 means "action forbidden".
    created_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    status=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium fonts-dejavu-core >/dev/null || status=$?
    if [ -n "$created_policy" ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    [ "$status" = 0 ] || exit "$status"
    test -x /usr/bin/chromium
else
    echo "the web client tests need chromium. Install it with: sudo apt-get install chromium" >&2
    exit 1
fi
