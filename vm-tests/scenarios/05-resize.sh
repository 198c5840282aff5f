#!/bin/sh
# Scenario 4 of the VM-tests issue, for a file disk: the image grows and its
# loop device is refreshed while the guest is connected; blkbackd publishes
# the new size as blkback does, and the guest's kernel sees the new capacity.
. /vmlib.sh
N=resize
start_blkbackd || fail $N "cannot start blkbackd"
make_disk /tmp/disk5.img 16 DISK-MAGIC-RESIZE
guest_cfg domrs "vdev=xvda,backendtype=phy,script=block-blkbackd,target=file:/tmp/disk5.img" 1 ""
xl create /root/domrs.cfg || fail $N "xl create"
wait_guest domrs >/dev/null || fail $N "the guest never finished"
D=$(xl domid domrs)
LOOP=$(xenstore-read /local/domain/0/backend/vbd/$D/51712/physical-device-path)
truncate -s 48M /tmp/disk5.img 2>/dev/null || dd if=/dev/zero of=/tmp/disk5.img bs=1M count=0 seek=48 2>/dev/null
losetup -c "$LOOP" || fail $N "losetup -c $LOOP"
i=0; until grep -q "capacity change from 32768 to 98304" /var/log/xen/console/guest-domrs.log; do
  i=$((i+1)); [ $i -lt 100 ] || fail $N "the guest never saw the new size ($(xenstore-read /local/domain/0/backend/vbd/$D/51712/sectors) sectors published)"; sleep 0.1; done
grep "capacity change" /var/log/xen/console/guest-domrs.log
xl destroy domrs || fail $N "xl destroy"
[ -z "$(losetup -a)" ] || fail $N "loop devices left: $(losetup -a)"
mark "$N PASS"
