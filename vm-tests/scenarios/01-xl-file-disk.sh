#!/bin/sh
# Scenario 1: blkbackd is dom0's only block backend (no xen-blkback);
# `xl create` with script=block-blkbackd and a file disk; the guest's Linux
# blkfront (with persistent grants, which blkbackd offers) reads dom0's
# marker and writes data that dom0 checks byte for byte;
# `xl destroy` tears down within libxl's timeouts and leaves no loop device.
. /vmlib.sh
N=xl-file-disk
start_blkbackd || fail $N "cannot start blkbackd"
make_disk /tmp/disk1.img 32 DISK-MAGIC-BLKBACKD
guest_cfg domu "vdev=xvda,backendtype=phy,script=block-blkbackd,target=file:/tmp/disk1.img" 1 ""
xl create /root/domu.cfg || fail $N "xl create"
wait_guest domu || fail $N "the guest never finished"
xenstore-ls -f /local/domain/0/backend/vbd | grep -E '/(state|opened|physical-device|diskseq|hotplug-status|sectors) ='
grep -q "DOMU-MARK xvda sectors=65536 head=DISK-MAGIC-BLKBACKD" /var/log/xen/console/guest-domu.log \
  || fail $N "guest did not read dom0's marker"
grep -q "persistent grants: enabled" /var/log/xen/console/guest-domu.log || fail $N "persistent grants not negotiated"
blkbackd status
blkbackd status --json | grep -q '"state": "Connected"' || fail $N "status does not show the vbd Connected"
MD5=$(guest_md5 domu); [ -n "$MD5" ] || fail $N "the guest's own read-back differed"
xl destroy domu || fail $N "xl destroy"
[ "$(file_md5 /tmp/disk1.img)" = "$MD5" ] || fail $N "dom0 reads other data than the guest wrote"
dd if=/tmp/disk1.img bs=512 skip=8 count=1 2>/dev/null | grep -q domU-wrote-this || fail $N "marker write missing"
[ -z "$(losetup -a)" ] || fail $N "loop devices left: $(losetup -a)"
[ -z "$(xenstore-ls /local/domain/0/backend/vbd 2>/dev/null)" ] || fail $N "backend nodes left"
mark "$N PASS"
