#!/bin/sh
# Scenario 6: blkbackd is killed with SIGKILL while a guest is connected and
# writing, and started again: it re-attaches the rings where they stand, the
# guest's writes carry on without an I/O error, and the device closes cleanly.
. /vmlib.sh
N=restart
export RUST_LOG=blkbackd=debug
start_blkbackd || fail $N "cannot start blkbackd"
make_disk /tmp/disk6.img 16 DISK-MAGIC-RESTART
guest_cfg domrst "vdev=xvda,backendtype=phy,script=block-blkbackd,target=file:/tmp/disk6.img" 1 "blkbackd_busy"
xl create /root/domrst.cfg || fail $N "xl create"
wait_guest domrst >/dev/null || fail $N "the guest never finished"
D=$(xl domid domrst); BE=/local/domain/0/backend/vbd/$D/51712; FE=/local/domain/$D/device/vbd/51712
sleep 1
kill -KILL $(pidof blkbackd); sleep 0.2
echo "killed; backend state $(xenstore-read $BE/state) frontend state $(xenstore-read $FE/state)"
start_blkbackd || fail $N "cannot restart blkbackd"
i=0; until grep -q "adopting a connected device" /tmp/blkbackd.log; do
  i=$((i+1)); [ $i -lt 100 ] || fail $N "the restarted daemon did not adopt the device"; sleep 0.1; done
i=0; until [ "$(grep -c 'vbd connected' /tmp/blkbackd.log)" -ge 2 ]; do
  i=$((i+1)); [ $i -lt 100 ] || fail $N "the rings were not re-attached"; sleep 0.1; done
[ "$(xenstore-read $BE/state)" = 4 ] && [ "$(xenstore-read $FE/state)" = 4 ] || fail $N "not Connected after the restart"
echo "re-attached"
# The guest keeps writing through the new daemon: the region it rewrites
# must change on dom0's side.
M1=$(dd if=/tmp/disk6.img bs=64k skip=32 count=64 2>/dev/null | md5sum)
sleep 2
M2=$(dd if=/tmp/disk6.img bs=64k skip=32 count=64 2>/dev/null | md5sum)
[ "$M1" != "$M2" ] || fail $N "the guest's writes stopped after the restart"
grep -i -E "I/O error|blk_update_request|Buffer I/O" /var/log/xen/console/guest-domrst.log && fail $N "the guest saw I/O errors"
grep -i "blkfront" /var/log/xen/console/guest-domrst.log | tail -3
xl destroy domrst || fail $N "xl destroy"
[ -z "$(losetup -a)" ] || fail $N "loop devices left: $(losetup -a)"
mark "$N PASS"
