#!/bin/sh
# Scenario 20: the backend side of a live migration on one host, its
# toolstack steps done by hand (xl migrate itself fails under software
# emulation before any disk is touched). The receiving domain, of the same
# VM (the same UUID), is created paused: its vbd of the same disk is created
# and its block script's sharing check must let it beside the sender's (the
# same VM is not a second writer) while the sender still writes. Then the
# sender is torn down, and only then does the receiver run and do its I/O:
# it reads what the sender wrote.
. /vmlib.sh
N=migration-sequence
start_blkbackd || fail $N "cannot start blkbackd"
make_disk /tmp/disk20.img 32 DISK-MAGIC-MIGRATE
UUID=5d0a1e2b-7c3f-4a51-9e0d-20b1c0ffee20
guest_cfg dommig "vdev=xvda,backendtype=phy,script=block-blkbackd,target=file:/tmp/disk20.img" 1 ""
echo "uuid=\"$UUID\"" >> /root/dommig.cfg
sed 's/^name="dommig"/name="dommig--incoming"/' /root/dommig.cfg > /root/dommig-in.cfg
xl create /root/dommig.cfg || fail $N "xl create (sender)"
wait_guest dommig >/dev/null || fail $N "the sender never finished"
SEND=$(xl domid dommig)
xl create -p /root/dommig-in.cfg > /tmp/xl20.log 2>&1 || { cat /tmp/xl20.log; fail $N "the receiving domain of the same VM was refused"; }
RECV=$(xl domid dommig--incoming)
echo "sender $SEND, receiver $RECV (paused), vm $(xenstore-read /local/domain/$RECV/vm)"
[ "$(xenstore-read /local/domain/0/backend/vbd/$RECV/51712/hotplug-status)" = connected ] \
  || fail $N "the receiver's disk was not built beside the sender's"
# A different VM is still refused the same disk.
guest_cfg domother "vdev=xvda,backendtype=phy,script=block-blkbackd,target=file:/tmp/disk20.img" 1 ""
xl create -p /root/domother.cfg > /tmp/xl20b.log 2>&1 && fail $N "another VM was given a disk a writer holds"
grep -i "in use" /tmp/xl20b.log | head -2
xl destroy dommig || fail $N "xl destroy (sender)"
xl unpause dommig--incoming || fail $N "xl unpause (receiver)"
wait_guest dommig--incoming >/dev/null || fail $N "the receiver never finished"
grep -q "DOMU-MARK xvda-rw-ok" /var/log/xen/console/guest-dommig--incoming.log || fail $N "the receiver's I/O failed"
dd if=/tmp/disk20.img bs=512 skip=8 count=1 2>/dev/null | grep -q domU-wrote-this || fail $N "the data is not on the disk"
xl destroy dommig--incoming || fail $N "xl destroy (receiver)"
[ -z "$(losetup -a)" ] || fail $N "loop devices left: $(losetup -a)"
rm -f /tmp/disk20.img
mark "$N PASS"
