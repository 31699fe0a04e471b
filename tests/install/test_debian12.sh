#!/bin/bash
# The whole install, for real, on a clean Debian 12 (bookworm) root: slow
# (a few minutes; it downloads Debian packages and bridged's dependencies
# from PyPI), so `make test` does not run it. Run it by hand, as root:
#
#   tests/install/test_debian12.sh [WORKDIR]       (default /var/tmp/bridged-deb12)
#
# WORKDIR must be root's and not writable by others (its base is chrooted
# into as root); the script refuses any other, exit 2.
#
# Needs debootstrap (apt-get install debootstrap), the Debian mirror this
# machine's apt uses, and python3 3.11 with pip here (bookworm's Python is
# 3.11): bridged's dependencies and setuptools are fetched here into a
# wheelhouse, and pip in the chroot installs from it alone (PIP_NO_INDEX,
# PIP_FIND_LINKS), so the chroot needs no access to PyPI of its own.
# WORKDIR/base is the debootstrap --variant=minbase root, made once and
# reused; each run copies it to WORKDIR/root and works there in a chroot
# (with /proc mounted), on a copy of this source tree:
#   1. systemd/install.sh, with no Python (nor procps) yet, must refuse, naming
#      what it needs;
#   2. after apt-get install procps python3 python3-venv, it installs: bridged --version
#      from /opt/bridged, the unit in /etc/systemd/system passing
#      systemd-analyze verify, /etc/bridged/bridged.toml 0640 root:bridged,
#      user bridged in dialout, `bridged check --instance ttyAMA0` exiting 0
#      as root and as bridged, a shipped profile found;
#   3. run again, it upgrades and keeps an edited bridged.toml;
#   4. --uninstall removes /opt/bridged and the unit and keeps the config.
# Ends with "N passed, N failed"; exit status 0 only when nothing failed.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
work=${1:-/var/tmp/bridged-deb12}
base=$work/base
root=$work/root
passed=0
failed=0

[ "$(id -u)" -eq 0 ] || { echo "run it as root" >&2; exit 2; }
# WORKDIR/base is reused and chrooted into as root: WORKDIR must be root's
# alone (the default's /var/tmp is everyone's: a user could make it first).
[ -e "$work" ] || [ -L "$work" ] || mkdir -m 0700 "$work"
owner=$(stat -c %u "$work")
mode=$(stat -c %a "$work")
if [ ! -d "$work" ] || [ -L "$work" ] || [ "$owner" != 0 ] || [ $((8#$mode & 8#022)) -ne 0 ]; then
    echo "$work: not a directory of root's that other users may not write (uid $owner, mode $mode);" \
         "remove it or choose another WORKDIR" >&2
    exit 2
fi
command -v debootstrap >/dev/null || { echo "needs debootstrap (apt-get install debootstrap)" >&2; exit 2; }

# The mirror this machine's apt uses (deb822 URIs: or a one-line deb entry).
mirror=$(grep -hoE '^URIs: *https?://[^ ]*debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null \
           | head -n1 | sed 's/^URIs: *//') || true
if [ -z "$mirror" ]; then
    mirror=$(grep -hoE '^deb +https?://[^ ]+ +bookworm ' /etc/apt/sources.list 2>/dev/null \
               | head -n1 | awk '{print $2}') || true
fi
mirror=${mirror:-http://deb.debian.org/debian}

in_root() {
    chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        PIP_NO_INDEX=1 PIP_FIND_LINKS=/root/wheels "$@"
}

check() {  # check DESCRIPTION COMMAND...: one line per check
    local what=$1
    shift
    if "$@" >"$work/check.log" 2>&1; then
        echo "ok   $what"
        passed=$((passed + 1))
    else
        echo "FAIL $what"
        sed 's/^/     /' "$work/check.log"
        failed=$((failed + 1))
    fi
}

unmount() {
    if mountpoint -q "$root/proc"; then umount "$root/proc"; fi
}

mkdir -p "$work"
if [ ! -x "$base/usr/bin/apt-get" ]; then
    echo "== debootstrap --variant=minbase bookworm $base $mirror"
    rm -rf "$base"
    debootstrap --variant=minbase bookworm "$base" "$mirror"
fi
unmount
if findmnt -rno TARGET | grep -q "^$root/"; then
    echo "something is still mounted under $root; not removing it" >&2
    exit 2
fi
rm -rf "$root"
cp -a "$base" "$root"
trap unmount EXIT
mount -t proc proc "$root/proc"
cp /etc/resolv.conf "$root/etc/resolv.conf"
echo "deb $mirror bookworm main" >"$root/etc/apt/sources.list"

echo "== apt-get install systemd (no Python yet)"
in_root apt-get update -q >"$work/apt.log"
DEBIAN_FRONTEND=noninteractive in_root apt-get install -y -q --no-install-recommends systemd >>"$work/apt.log"
mkdir -p "$root/root/src"
tar -C "$repo" --exclude='./.venv*' --exclude=./.git --exclude='*/__pycache__' \
    --exclude=./build --exclude='./*.egg-info' -cf - . | tar -C "$root/root/src" -xf -

echo "== a wheelhouse for the chroot (python3 -m pip here)"
python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || { echo "needs python3 3.11 here (bookworm's), for wheels that fit the chroot" >&2; exit 2; }
mkdir -p "$root/root/wheels"
cp -r "$root/root/src" "$work/build-src"
python3 -m pip wheel -q -w "$root/root/wheels" "$work/build-src" >"$work/wheels.log" 2>&1 \
    || { cat "$work/wheels.log"; exit 2; }
python3 -m pip download -q -d "$root/root/wheels" "setuptools>=64" wheel >>"$work/wheels.log" 2>&1 \
    || { cat "$work/wheels.log"; exit 2; }
rm -rf "$work/build-src" "$root/root/wheels"/bridged-*.whl  # bridged itself: from the source tree
ls "$root/root/wheels"

refuses_without_python() {
    ! in_root /root/src/systemd/install.sh >"$work/out.log" 2>&1 || return 1
    cat "$work/out.log"
    grep -q 'needs /bin/kill (apt-get install procps)' "$work/out.log" || return 1
    DEBIAN_FRONTEND=noninteractive in_root apt-get install -y -q --no-install-recommends \
        procps >>"$work/apt.log" 2>&1
    ! in_root /root/src/systemd/install.sh >"$work/out.log" 2>&1 || return 1
    cat "$work/out.log"
    grep -q 'needs python3 >= 3.11 (apt-get install python3 python3-venv)' "$work/out.log"
}
check "install.sh without procps, then python3, refuses and names them" refuses_without_python

echo "== apt-get install procps python3 python3-venv"
DEBIAN_FRONTEND=noninteractive in_root apt-get install -y -q --no-install-recommends \
    procps python3 python3-venv >>"$work/apt.log"
in_root python3 -V

echo "== systemd/install.sh"
start=$(date +%s)
check "install.sh installs" in_root /root/src/systemd/install.sh
cat "$work/check.log"
echo "   (took $(( $(date +%s) - start )) s)"

check "bridged --version from /opt/bridged" in_root /opt/bridged/bin/bridged --version
check "the unit is /etc/systemd/system/bridged@.service" \
    cmp "$repo/systemd/bridged@.service" "$root/etc/systemd/system/bridged@.service"
verify_clean() {
    in_root systemd-analyze verify /etc/systemd/system/bridged@ttyAMA0.service >"$work/verify.log" 2>&1
    local status=$?
    cat "$work/verify.log"
    [ "$status" -eq 0 ] && [ ! -s "$work/verify.log" ]
}
check "systemd-analyze verify bridged@ttyAMA0.service is clean" verify_clean
config_mode() {
    local got
    got=$(in_root stat -c '%a %U:%G' /etc/bridged/bridged.toml)
    echo "$got"
    [ "$got" = "640 root:bridged" ]
}
check "/etc/bridged/bridged.toml is 0640 root:bridged" config_mode
in_dialout() { in_root id -nG bridged | tee /dev/stderr | grep -qw dialout; }
check "user bridged is in group dialout" in_dialout
check "bridged check --instance ttyAMA0 exits 0 (root)" \
    in_root /opt/bridged/bin/bridged check --instance ttyAMA0
check "bridged check --instance ttyAMA0 exits 0 (as bridged, reading the 0640 config)" \
    in_root setpriv --reuid=bridged --regid=bridged --init-groups \
    /opt/bridged/bin/bridged check --instance ttyAMA0
check "a shipped profile is found (bridged check --profile fast)" \
    in_root /opt/bridged/bin/bridged check --profile fast

echo "== again, with an edited bridged.toml"
printf '[wifi]\nssid = "edited"\n' >"$root/etc/bridged/bridged.toml"
check "install.sh runs again" in_root /root/src/systemd/install.sh
check "the edited bridged.toml is kept" grep -q 'ssid = "edited"' "$root/etc/bridged/bridged.toml"
edited_applies() { in_root /opt/bridged/bin/bridged check --instance ttyAMA0 | grep -q '^ssid = "edited"$'; }
check "bridged check reads it" edited_applies
check "bridged --version after the upgrade" in_root /opt/bridged/bin/bridged --version

echo "== --uninstall"
check "install.sh --uninstall" in_root /root/src/systemd/install.sh --uninstall
check "/opt/bridged and the unit are gone" \
    test ! -e "$root/opt/bridged" -a ! -e "$root/etc/systemd/system/bridged@.service"
check "/etc/bridged/bridged.toml is kept" test -f "$root/etc/bridged/bridged.toml"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
