#!/bin/sh
# Scenario 9 of the VM-tests issue, on dom0's real kernel: a loop device is
# released and its minor reused for another file; a vbd that names the old
# (major:minor, diskseq) is refused with a clear error node and never opened.
. /vmlib.sh
N=diskseq-reuse
start_blkbackd || fail $N "cannot start blkbackd"
make_disk /tmp/d7a.img 8 DISK-A
make_disk /tmp/d7b.img 8 DISK-B
L=$(losetup -f) && losetup "$L" /tmp/d7a.img || fail $N "losetup a"
NAME=$(basename $L); MIN=${NAME#loop}; SEQ=$(cat /sys/block/$NAME/diskseq)
losetup -d $L
L2=$(losetup -f) && losetup "$L2" /tmp/d7b.img || fail $N "losetup b"
[ "$L2" = "$L" ] || fail $N "the minor was not reused ($L then $L2)"
SEQ2=$(cat /sys/block/$NAME/diskseq)
echo "$L: diskseq $SEQ for d7a.img, then $SEQ2 for d7b.img"
[ "$SEQ2" != "$SEQ" ] || fail $N "the kernel did not move the diskseq on"
BE=/local/domain/0/backend/vbd/99/51712
# The toolstack's nodes (one transaction), for a guest that never connects:
# the disk check comes first.
xenstore-write $BE/frontend /local/domain/99/device/vbd/51712 $BE/frontend-id 99 $BE/online 1 \
  $BE/state 1 $BE/mode w $BE/device-type disk $BE/params "phy:$L"
i=0; until [ "$(xenstore-read $BE/state)" = 2 ]; do i=$((i+1)); [ $i -lt 100 ] || fail $N "no InitWait"; sleep 0.1; done
# A script publishing the identity from before the reuse.
xenstore-write $BE/physical-device "7:$(printf %x $MIN)" $BE/diskseq "$(printf %x $SEQ)"
i=0; until [ "$(xenstore-read $BE/state)" = 5 ]; do i=$((i+1)); [ $i -lt 100 ] || fail $N "not refused"; sleep 0.1; done
ERR=$(xenstore-read $BE/error)
echo "error node: $ERR"
echo "$ERR" | grep -q "released and the number reused" || fail $N "unclear error: $ERR"
[ "$(xenstore-read $BE/opened)" = 0 ] || fail $N "opened is not 0"
xenstore-rm /local/domain/0/backend/vbd/99
losetup -d $L2
mark "$N PASS"
