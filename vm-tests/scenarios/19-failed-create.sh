#!/bin/sh
# Scenario 19: xl create naming a missing image. The block script fails,
# libxl removes the device, and blkbackd closes it at once (it used to wait
# in InitWait for a script that had given up, and libxl gave up after 10 s,
# 12 s in all). The failed create is timed and nothing may be left.
. /vmlib.sh
N=failed-create
start_blkbackd || fail $N "cannot start blkbackd"
# (xl builds the domain, its memory populated under software emulation,
# before any device exists: the same for every backend. A 64 MiB guest is
# too small for the domU's kernel and ramdisk: the create then fails before
# the vbd, which proves nothing.)
guest_cfg dommiss "vdev=xvda,backendtype=phy,script=block-blkbackd,target=file:/tmp/no-such-image.img" 1 ""
t0=$(cut -d' ' -f1 /proc/uptime)
echo "FAILED-CREATE start $(date -u +%H:%M:%S)"
xl -vvv -T create /root/dommiss.cfg > /tmp/xl19.log 2>&1 && fail $N "xl create of a missing image succeeded"
t1=$(cut -d' ' -f1 /proc/uptime)
echo "FAILED-CREATE end $(date -u +%H:%M:%S)"
# The timeline: the daemon's lines (timestamped) and libxl's steps.
grep -a -E "InitWait|removed before" /tmp/blkbackd.log | tail -2 | sed 's/^/daemon: /'
grep -a -E "hotplug|script|Closed|state|destroy" /tmp/xl19.log | grep -v "^Parsing" | tail -6 | sed "s/^/xl-vvv: /"
SECS=$(awk "BEGIN{print $t1-$t0}")
grep -v '^Parsing' /tmp/xl19.log | grep -v 'libxl.*: debug' | tail -10 | sed 's/^/xl: /'
echo "FAILED-CREATE took $SECS s"
# Before, libxl waited its whole 10 s for a Closed the daemon never wrote
# (12 s in all). libxl may still report a second destroy of a domain its
# failure path already destroyed ("Non-existant domain"): what counts is
# the time, that the daemon closed the device, and that nothing is left.
grep -q "vbd removed before its disk was published: closed" /tmp/blkbackd.log \
  || fail $N "the daemon did not close the vbd the toolstack removed"
awk "BEGIN{exit !($SECS < 10)}" || fail $N "the failed create took $SECS s: the device was not closed when removed"
xl list | grep -q dommiss && fail $N "the domain is left"
[ -z "$(xenstore-ls /local/domain/0/backend/vbd 2>/dev/null)" ] || fail $N "vbd nodes left: $(xenstore-ls /local/domain/0/backend/vbd)"
[ -z "$(losetup -a)" ] || fail $N "loop devices left: $(losetup -a)"
mark "$N PASS secs=$SECS"
