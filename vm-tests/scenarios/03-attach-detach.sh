#!/bin/sh
# Scenario 3: `xl block-attach` / `xl block-detach` ten times on a running
# guest; each time the guest's blkfront connects (backend Connected) and lets
# go; afterwards no loop device and no backend node is left.
. /vmlib.sh
N=attach-detach
start_blkbackd || fail $N "cannot start blkbackd"
make_disk /tmp/disk3a.img 16 DISK-MAGIC-ROOT
make_disk /tmp/disk3b.img 8 DISK-MAGIC-HOTPLUG
guest_cfg domad "vdev=xvda,backendtype=phy,script=block-blkbackd,target=file:/tmp/disk3a.img" 1 ""
xl create /root/domad.cfg || fail $N "xl create"
wait_guest domad >/dev/null || fail $N "the guest never finished"
D=$(xl domid domad)
for i in 1 2 3 4 5 6 7 8 9 10; do
  xl block-attach domad "vdev=xvdb,backendtype=phy,script=block-blkbackd,target=file:/tmp/disk3b.img" \
    || fail $N "block-attach $i"
  BE=/local/domain/0/backend/vbd/$D/51728
  j=0; until [ "$(xenstore-read $BE/state 2>/dev/null)" = 4 ]; do
    j=$((j+1)); [ $j -lt 200 ] || fail $N "attach $i: backend state $(xenstore-read $BE/state 2>/dev/null)"; sleep 0.05; done
  xl block-detach domad xvdb || fail $N "block-detach $i"
  xenstore-read $BE/state >/dev/null 2>&1 && fail $N "detach $i left $BE"
done
mark "attached and detached 10 times"
xl destroy domad || fail $N "xl destroy"
[ -z "$(losetup -a)" ] || fail $N "loop devices left: $(losetup -a)"
[ -z "$(xenstore-ls /local/domain/0/backend/vbd 2>/dev/null)" ] || fail $N "backend nodes left"
mark "$N PASS"
