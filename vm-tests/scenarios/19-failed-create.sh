#!/bin/sh
# Scenario 19: xl create naming a missing image. The block script fails,
# libxl removes the device, and blkbackd closes it at once (it used to wait
# in InitWait for a script that had given up, and libxl gave up after 10 s,
# 12 s in all). The failed create is timed (three times, median) beside the
# same guest created paused without a disk and destroyed: the domain's build
# and teardown under software emulation, which every backend pays. Nothing
# may be left.
# vmtest: once (no guest kernel runs: the domains are built paused or fail)
. /vmlib.sh
N=failed-create
start_blkbackd || fail $N "cannot start blkbackd"
now() { cut -d' ' -f1 /proc/uptime; }
# (A 64 MiB guest is too small for the domU's kernel and ramdisk: the
# create then fails before the vbd, which proves nothing.)
guest_cfg dommiss "vdev=xvda,backendtype=phy,script=block-blkbackd,target=file:/tmp/no-such-image.img" 1 ""
sed 's/^disk=.*/disk=[]/; s/^name=.*/name="domnodisk"/' /root/dommiss.cfg > /root/domnodisk.cfg
# Xenstore's view, stamped: when the vbd appears, changes state, goes.
xenstore-watch /local/domain/0/backend/vbd 2>/dev/null | awk '{ getline u < "/proc/uptime"; close("/proc/uptime"); split(u, a, " "); print a[1], $0; fflush() }' > /tmp/watch19.log &
WATCH=$!
base="" ; secs=""
for i in 1 2 3; do
  t0=$(now)
  xl create -p /root/domnodisk.cfg > /tmp/xl19b.log 2>&1 || fail $N "disk-less create failed: $(tail -3 /tmp/xl19b.log)"
  xl destroy domnodisk || fail $N "disk-less destroy failed"
  t1=$(now)
  base="$base $(awk "BEGIN{print $t1-$t0}")"
  t0=$(now)
  xl -vvv -T create /root/dommiss.cfg > /tmp/xl19.log 2>&1 && fail $N "xl create of a missing image succeeded"
  t1=$(now)
  secs="$secs $(awk "BEGIN{print $t1-$t0}")"
  echo "FAILED-CREATE run $i: started $t0, ended $t1"
done
kill $WATCH 2>/dev/null
med() { echo $* | tr ' ' '\n' | sort -n | sed -n 2p; }
SECS=$(med $secs); BASE=$(med $base)
# The timeline of the last run: Xenstore (uptime stamps) and the daemon.
grep -E "/(state|online|hotplug-status|hotplug-error)$|51712$" /tmp/watch19.log | tail -14 | sed 's/^/xenstore: /'
# What the block script costs by itself here, run on a scratch directory.
xenstore-write /local/domain/0/test19/params file:/tmp/no-such-image.img
for c in "blkbackd --version" "env XENBUS_PATH=/local/domain/0/test19 blkbackd hotplug add" "env XENBUS_PATH=/local/domain/0/test19 blkbackd hotplug remove" "xenstore-read /local/domain/0/test19/params"; do
  t0=$(now); $c >/dev/null 2>&1; t1=$(now); echo "FAILED-CREATE cost of '$c': $(awk "BEGIN{print $t1-$t0}") s"
done
xenstore-rm /local/domain/0/test19
grep -a -E "InitWait|removed before" /tmp/blkbackd.log | tail -2 | sed 's/^/daemon: /'
grep -v '^Parsing' /tmp/xl19.log | grep -v 'libxl.*: debug' | tail -4 | sed 's/^/xl: /'
echo "FAILED-CREATE took $SECS s (runs:$secs); a disk-less create -p + destroy: $BASE s (runs:$base)"
# libxl may still report a second destroy of a domain its failure path
# already destroyed ("Non-existant domain"): what counts is the time, that
# the daemon closed the device, and that nothing is left.
grep -q "vbd removed before its disk was published: closed" /tmp/blkbackd.log \
  || fail $N "the daemon did not close the vbd the toolstack removed"
awk "BEGIN{exit !($SECS < 10)}" || fail $N "the failed create took $SECS s: the device was not closed when removed"
xl list | grep -q -E "dommiss|domnodisk" && fail $N "a domain is left"
[ -z "$(xenstore-ls /local/domain/0/backend/vbd 2>/dev/null)" ] || fail $N "vbd nodes left: $(xenstore-ls /local/domain/0/backend/vbd)"
[ -z "$(losetup -a)" ] || fail $N "loop devices left: $(losetup -a)"
mark "$N PASS secs=$SECS base=$BASE"
