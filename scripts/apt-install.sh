#!/bin/sh
# Install Debian packages as root without letting their post-install start system services
# (a Postgres on 5432, a Redis on 6379, an nginx on 80): the ensure-*.sh scripts want only the
# binaries. Usage: apt-install.sh PACKAGE...   Exit status: apt-get's.
set -eu
echo "installing $* with apt-get" >&2
apt-get update -qq
# policy-rc.d exit code 101 means "action forbidden".
created_policy=
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
fi
status=0
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
    || status=$?
if [ -n "$created_policy" ]; then
    rm -f /usr/sbin/policy-rc.d
fi
exit "$status"
