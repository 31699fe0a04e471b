#!/bin/bash
# Install bridged as a system service, or remove it again.
#
#   systemd/install.sh [--from PATH] [--root DIR] [--no-venv]
#   systemd/install.sh --uninstall [--purge] [--root DIR]
#
# Needs: root, bash, systemd (systemd-sysusers), procps (/bin/kill, for
# `systemctl reload`), python3 >= 3.11 with the venv module
# (Debian / Raspberry Pi OS: apt-get install python3 python3-venv)
# and, unless --from names a wheel with its dependencies at hand, access to PyPI.
#
# Installs (re-running upgrades and keeps the configuration):
#   /opt/bridged                          a virtualenv holding bridged and its
#                                         dependencies (the shipped profiles in
#                                         share/bridged/profiles); PEP 668 keeps
#                                         pip away from the system Python
#   /etc/systemd/system/bridged@.service  the unit (replaced on upgrade; local
#                                         changes belong in `systemctl edit`)
#   /etc/sysusers.d/bridged.conf          user bridged, in group dialout
#                                         (systemd-sysusers is run)
#   /etc/bridged/bridged.toml             0640 root:bridged, from config/gateway.toml
#                                         (links may not reach this host), only
#                                         when there is none: it holds the
#                                         Wi-Fi password and the OTA token
#   /etc/bridged/bridged.toml.example     every key, documented (replaced)
#   /etc/bridged/profiles/                for profiles of your own
# Running instances are restarted after an upgrade.
#
# --uninstall stops and disables every bridged@ instance and removes the
# above except /etc/bridged and /var/lib/bridged (the configuration and each
# instance's state), which --purge removes too. The user bridged is kept
# (its files may outlive it): `userdel bridged` removes it.
#
# --from PATH   what pip installs: a source tree (default: the one holding this
#               script) or a wheel
# --root DIR    install into DIR instead of / (an image being built, or tests):
#               systemd-sysusers --root DIR, no systemctl
# --no-venv     leave /opt/bridged alone: install the system files only
set -euo pipefail
# What is made here (the virtualenv above all: venv and pip follow the umask)
# must be readable by user bridged, whatever umask root has (027, 077 on
# hardened systems); the secrets get their modes explicitly.
umask 022

VENV=/opt/bridged
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source_tree=$(dirname "$here")
from=$source_tree
root=
venv=yes
action=install
purge=no

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case $1 in
        --from) [ $# -ge 2 ] || die "--from needs a path"; from=$2; shift 2 ;;
        --root) [ $# -ge 2 ] || die "--root needs a directory"; root=${2%/}; shift 2 ;;
        --no-venv) venv=no; shift ;;
        --uninstall) action=uninstall; shift ;;
        --purge) purge=yes; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[ "$purge" = no ] || [ "$action" = uninstall ] || die "--purge goes with --uninstall"
[ "$(id -u)" -eq 0 ] || die "run it as root (sudo $0)"
[ -z "$root" ] || [ -d "$root" ] || die "--root $root: no such directory"

live() { [ -z "$root" ] && [ -d /run/systemd/system ]; }  # systemd manages this machine now

check_needs() {
    local python=${PYTHON:-python3}
    command -v systemd-sysusers >/dev/null || die "needs systemd-sysusers (apt-get install systemd)"
    # The unit's ExecReload= (Debian's minbase lacks it; every usual install has it).
    [ -x "$root/bin/kill" ] || die "needs $root/bin/kill (apt-get install procps)"
    [ "$venv" = no ] && return 0
    command -v "$python" >/dev/null || die "needs $python >= 3.11 (apt-get install python3 python3-venv)"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "needs Python >= 3.11; $python is $("$python" -V 2>&1)"
    "$python" -c 'import ensurepip, venv' 2>/dev/null \
        || die "needs the venv module with ensurepip (apt-get install python3-venv)"
}

install_venv() {
    local python=${PYTHON:-python3} dir=$root$VENV
    # A venv whose interpreter is gone (the system Python was upgraded) is made anew.
    if [ -e "$dir" ] && ! "$dir/bin/python" -c '' 2>/dev/null; then
        say "$dir: its Python no longer runs; making the virtualenv anew"
        rm -rf "$dir"
    fi
    if [ ! -e "$dir" ]; then
        say "creating the virtualenv $dir"
        "$python" -m venv "$dir"
    fi
    say "installing bridged from $from into $dir"
    # --force-reinstall --no-deps for bridged itself: the same version number
    # from a changed source tree is still installed; then its dependencies.
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$from"
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$from"
    "$dir/bin/bridged" --version
}

group_id() {  # the numeric id of group $1 in $root/etc/group
    awk -F: -v name="$1" '$1 == name { print $3 }' "$root/etc/group"
}

warn_config_mode() {  # $1: a kept configuration file
    local uid mode
    uid=$(stat -L -c %u "$1")
    mode=$(stat -L -c %a "$1")
    if [ $((8#$mode & 8#007)) -ne 0 ]; then
        say "warning: others can read $1, which may hold secrets:" \
            "chown root:bridged and chmod 0640 it"
    elif [ $((8#$mode & 8#020)) -ne 0 ] || [ "$uid" = "$(awk -F: '$1 == "bridged" { print $3 }' "$root/etc/passwd")" ]; then
        # The service could rewrite its own fence ([links] deny) or OTA settings.
        say "warning: the service's user or group may change $1 (uid $uid, mode $mode):" \
            "chown root:bridged and chmod 0640 it"
    fi
}

install_files() {
    local etc=$root/etc gid
    install -D -m 0644 "$here/bridged@.service" "$etc/systemd/system/bridged@.service"
    install -D -m 0644 "$here/sysusers-bridged.conf" "$etc/sysusers.d/bridged.conf"
    if [ -n "$root" ]; then
        systemd-sysusers --root "$root"
    else
        systemd-sysusers /etc/sysusers.d/bridged.conf
    fi
    gid=$(group_id bridged)
    [ -n "$gid" ] || die "systemd-sysusers made no group bridged"
    install -d -m 0755 "$etc/bridged" "$etc/bridged/profiles"
    install -m 0644 "$source_tree/config/bridged.toml" "$etc/bridged/bridged.toml.example"
    if [ -e "$etc/bridged/bridged.toml" ] || [ -L "$etc/bridged/bridged.toml" ]; then
        say "keeping $etc/bridged/bridged.toml"
        warn_config_mode "$etc/bridged/bridged.toml"
    else
        # The gateway's fence ([links] deny "self" ...), not the bare defaults: see its comments.
        install -m 0640 -o 0 -g "$gid" "$source_tree/config/gateway.toml" "$etc/bridged/bridged.toml"
        say "installed $etc/bridged/bridged.toml (0640 root:bridged): edit it"
    fi
}

do_install() {
    check_needs
    [ "$venv" = no ] || install_venv
    install_files
    if live; then
        systemctl daemon-reload
        systemctl try-restart 'bridged@*.service'  # an upgrade: running instances use it now
    fi
    say "done. Next: systemctl enable --now bridged@ttyAMA0 (see README.md, 'On a Raspberry Pi')"
}

do_uninstall() {
    local etc=$root/etc link
    if live; then
        systemctl stop 'bridged@*.service' || true
    fi
    # Disabling an instance is removing its symlinks in *.wants/.
    for link in "$etc"/systemd/system/*.wants/bridged@*.service; do
        [ -L "$link" ] || continue
        rm -f "$link"
        say "disabled $(basename "$link")"
    done
    rm -f "$etc/systemd/system/bridged@.service" "$etc/sysusers.d/bridged.conf"
    rm -rf -- "$root${VENV:?}" "$root/etc/bridged/bridged.toml.example"
    if [ "$purge" = yes ]; then
        rm -rf "$root/etc/bridged" "$root/var/lib/bridged"
        say "removed /etc/bridged and /var/lib/bridged"
    else
        say "kept /etc/bridged (configuration) and /var/lib/bridged (state): --purge removes them"
    fi
    live && systemctl daemon-reload
    say "removed bridged; the user bridged is kept (userdel bridged removes it)"
}

if [ "$action" = install ]; then do_install; else do_uninstall; fi
