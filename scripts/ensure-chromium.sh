#!/bin/sh
# Make sure Debian's `chromium` exists: tests/test_web.py drives it headless through
# Playwright (which is told its path and never downloads a browser of its own).
# As root on Debian, install it; otherwise say exactly what to run.
set -eu
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    sh "$(dirname "$0")/apt-install.sh" chromium fonts-dejavu-core
    test -x /usr/bin/chromium
else
    echo "the web client tests need chromium. Install it with: sudo apt-get install chromium" >&2
    exit 1
fi
