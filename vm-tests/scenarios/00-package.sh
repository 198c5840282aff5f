#!/bin/sh
# Scenario 00: blkbackd is in dom0 as its Debian package, installed with dpkg
# (busybox's) before any scenario: dpkg knows it, the daemon, the block
# script, the unit, the example configuration and the manual pages are where
# the package puts them, and the binary is this checkout's commit. Every
# later scenario runs what the package installed.
. /vmlib.sh
N=package
grep -q "Setting up blkbackd" /tmp/dpkg-install.log || fail $N "dpkg -i: $(cat /tmp/dpkg-install.log)"
dpkg -l | grep -q "^ii  *blkbackd" || fail $N "dpkg does not list blkbackd installed: $(dpkg -l)"
for f in /usr/sbin/blkbackd /etc/xen/scripts/block-blkbackd /lib/systemd/system/blkbackd.service \
  /etc/blkbackd/blkbackd.toml /usr/share/man/man8/blkbackd.8.gz /usr/share/doc/blkbackd/README.md; do
  [ -e "$f" ] || fail $N "$f is not installed"
done
[ "$(command -v blkbackd)" = /usr/sbin/blkbackd ] || fail $N "blkbackd on PATH is $(command -v blkbackd)"
v=$(blkbackd --version)
case "$v" in *"(commit $(cat /root/blkbackd.commit)"*) ;; *) fail $N "--version says '$v', built from $(cat /root/blkbackd.commit)" ;; esac
mark "$N PASS $v"
