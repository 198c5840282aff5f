#!/bin/sh
# Scenario 15: a file system through blkbackd. The guest makes ext4 on its
# disk, writes eight files of random data and a nested directory, syncs and
# unmounts; the disk is detached (`xl block-detach`), and dom0's e2fsck
# finds the image clean and every file reads back (debugfs) with the md5
# the guest reported.
. /vmlib.sh
N=ext4-fsck
start_blkbackd || fail $N "cannot start blkbackd"
make_disk /tmp/disk15.img 64 DISK-MAGIC-BLKBACKD
guest_cfg domu15 "vdev=xvda,backendtype=phy,script=block-blkbackd,target=file:/tmp/disk15.img" 1 "blkbackd_ext4"
xl create /root/domu15.cfg || fail $N "xl create"
wait_guest domu15 || fail $N "the guest never finished"
LOG=/var/log/xen/console/guest-domu15.log
grep -q "DOMU-MARK ext4-ok" $LOG || fail $N "the guest could not make, fill and unmount ext4"
xl block-detach domu15 xvda || fail $N "xl block-detach"
i=0; while [ -n "$(losetup -a)" ]; do i=$((i+1)); [ $i -lt 100 ] || fail $N "the loop device was not released"; sleep 0.1; done
/sbin/e2fsck -fn /tmp/disk15.img || fail $N "e2fsck found the file system damaged"
n=0
for i in 1 2 3 4 5 6 7 8; do
  want=$(sed -n "s/.*DOMU-MARK ext4-file file$i md5=\([0-9a-f]*\).*/\1/p" $LOG)
  got=$(/sbin/debugfs -R "cat /file$i" /tmp/disk15.img 2>/dev/null | md5sum | cut -d' ' -f1)
  [ -n "$want" ] && [ "$want" = "$got" ] || fail $N "file$i: the guest wrote $want, dom0 reads $got"
  n=$((n+1))
done
[ "$(/sbin/debugfs -R "cat /dir/sub/leaf" /tmp/disk15.img 2>/dev/null)" = nested ] || fail $N "the nested file is missing"
echo "ext4: e2fsck clean, $n files and a nested one read back"
xl destroy domu15 || fail $N "xl destroy"
rm -f /tmp/disk15.img   # dom0's /tmp is memory
[ -z "$(xenstore-ls /local/domain/0/backend/vbd 2>/dev/null)" ] || fail $N "backend nodes left"
mark "$N PASS"
