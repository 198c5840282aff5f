#!/bin/sh
# Scenario 8 of the VM-tests issue: Linux blkfront negotiating everything
# blkbackd offers: a 16-page ring (order 4), two queues (two vcpus), 256
# indirect segments per request; the data is verified with all of them on.
# Persistent grants are off here: with them blkfront preallocates a ring's
# worth of pages per queue (2 x 512 x 257 pages, about 1 GiB), more than this
# 256 MB guest has; scenario 01 covers them.
. /vmlib.sh
N=negotiation
start_blkbackd || fail $N "cannot start blkbackd"
make_disk /tmp/disk2.img 64 DISK-MAGIC-NEGOTIATION
guest_cfg domneg "vdev=xvda,backendtype=phy,script=block-blkbackd,target=file:/tmp/disk2.img" 2 \
  "xen_blkfront.max_ring_page_order=4 xen_blkfront.max_queues=2 xen_blkfront.max_indirect_segments=256 xen_blkfront.feature_persistent=0"
xl create /root/domneg.cfg || fail $N "xl create"
wait_guest domneg || fail $N "the guest never finished"
D=$(xl domid domneg); FE=/local/domain/$D/device/vbd/51712
ORDER=$(xenstore-read $FE/ring-page-order 2>/dev/null)
QUEUES=$(xenstore-read $FE/multi-queue-num-queues 2>/dev/null)
echo "frontend wrote ring-page-order=$ORDER multi-queue-num-queues=$QUEUES"
[ "$ORDER" = 4 ] || fail $N "ring-page-order is $ORDER, not 4"
[ "$QUEUES" = 2 ] || fail $N "multi-queue-num-queues is $QUEUES, not 2"
xenstore-read $FE/queue-1/ring-ref15 >/dev/null || fail $N "no 16th ring page on queue 1"
grep -q "DOMU-MARK queues=2 max_segments=256" /var/log/xen/console/guest-domneg.log \
  || fail $N "blkfront did not take 2 queues and 256 indirect segments"
grep -q "indirect descriptors: enabled" /var/log/xen/console/guest-domneg.log || fail $N "indirect not enabled"
MD5=$(guest_md5 domneg); [ -n "$MD5" ] || fail $N "the guest's own read-back differed"
xl destroy domneg || fail $N "xl destroy"
[ "$(file_md5 /tmp/disk2.img)" = "$MD5" ] || fail $N "dom0 reads other data than the guest wrote"
mark "$N PASS"
