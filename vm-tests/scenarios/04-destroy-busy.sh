#!/bin/sh
# Scenario 7 of the VM-tests issue: `xl destroy` while the guest is writing:
# the daemon answers within libxl's timeouts, the loop device is released and
# no node is left; the daemon keeps serving (a new guest works afterwards).
. /vmlib.sh
N=destroy-busy
start_blkbackd || fail $N "cannot start blkbackd"
make_disk /tmp/disk4.img 16 DISK-MAGIC-BUSY
guest_cfg dombusy "vdev=xvda,backendtype=phy,script=block-blkbackd,target=file:/tmp/disk4.img" 1 "blkbackd_busy"
xl create /root/dombusy.cfg || fail $N "xl create"
wait_guest dombusy >/dev/null || fail $N "the guest never finished"
grep -q "DOMU-MARK busy-writing" /var/log/xen/console/guest-dombusy.log || fail $N "guest is not writing"
sleep 1
T0=$(cut -d' ' -f1 /proc/uptime)
xl destroy dombusy || fail $N "xl destroy"
T1=$(cut -d' ' -f1 /proc/uptime)
echo "xl destroy with I/O in flight took $(echo "$T0 $T1" | awk '{printf "%.1f", $2-$1}') s"
[ -z "$(losetup -a)" ] || fail $N "loop devices left: $(losetup -a)"
[ -z "$(xenstore-ls /local/domain/0/backend/vbd 2>/dev/null)" ] || fail $N "backend nodes left"
pidof blkbackd >/dev/null || fail $N "the daemon died"
mark "$N PASS"
