#!/bin/sh
# Scenario 18: xl save + xl restore of a guest writing through blkbackd. The
# data written before is intact, the guest goes on writing with no I/O error
# (its verify loop runs across the save), and nothing of the old domain is
# left (loop devices, Xenstore nodes) while the image is saved.
. /vmlib.sh
N=save-restore
start_blkbackd || fail $N "cannot start blkbackd"
make_disk /tmp/disk18.img 32 DISK-MAGIC-SAVE
guest_cfg domsr "vdev=xvda,backendtype=phy,script=block-blkbackd,target=file:/tmp/disk18.img" 1 "blkbackd_verify=25"
sed -i 's/^memory=256/memory=128/' /root/domsr.cfg
xl create /root/domsr.cfg || fail $N "xl create"
wait_guest domsr >/dev/null || fail $N "the guest never finished"
OLD=$(xl domid domsr)
sleep 4
xl save domsr /tmp/domsr.save || fail $N "xl save"
echo "saved: $(ls -la /tmp/domsr.save | awk '{print $5}') bytes"
[ -z "$(losetup -a)" ] || fail $N "loop devices left after save: $(losetup -a)"
xenstore-exists /local/domain/0/backend/vbd/$OLD && fail $N "the saved domain's vbd nodes are left"
xl restore /tmp/domsr.save || fail $N "xl restore"
rm -f /tmp/domsr.save
NEW=$(xl domid domsr); echo "domain $OLD restored as $NEW"
GL=/var/log/xen/console/guest-domsr.log
i=0; until grep -q -E "DOMU-MARK VERIFY (ok|FAIL)" $GL; do
  i=$((i+1)); [ $i -lt 900 ] || fail $N "the guest's verify loop never ended"; sleep 0.1; done
grep "DOMU-MARK VERIFY" $GL | tail -2
grep -q "DOMU-MARK VERIFY ok" $GL || fail $N "the guest's verify loop failed across save/restore"
grep -i -E "I/O error|blk_update_request|Buffer I/O|op failed" $GL && fail $N "the guest saw I/O errors"
xl destroy domsr || fail $N "xl destroy"
[ -z "$(losetup -a)" ] || fail $N "loop devices left: $(losetup -a)"
xenstore-exists /local/domain/0/backend/vbd/$NEW && fail $N "vbd nodes left"
rm -f /tmp/disk18.img
mark "$N PASS"
