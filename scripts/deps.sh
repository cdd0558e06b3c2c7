#!/bin/sh
# Installs what the build and the tests need beyond Rust on a Debian machine: make, a C
# compiler (ring), shellcheck (init scripts), busybox (the SysV script under a plain
# BusyBox shell). As root it installs them from Debian's packages; otherwise it says what
# is missing.
set -eu
missing=""
command -v make >/dev/null 2>&1 || missing="$missing make"
command -v cc >/dev/null 2>&1 || missing="$missing gcc"
command -v shellcheck >/dev/null 2>&1 || missing="$missing shellcheck"
command -v busybox >/dev/null 2>&1 || missing="$missing busybox"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    # shellcheck disable=SC2086 # the list is meant to split
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
else
    echo "missing:$missing; install them (Debian: apt-get install$missing)" >&2
    exit 1
fi
