#!/bin/sh
# Scenario 12: a `snapshot:TEMPLATE` disk built by the block script (the
# template on a read-only loop device, a sparse store, a dm snapshot): the
# guest reads the template and writes its own data, which never reaches the
# template. Then the disk is revoked (`blkbackd revoke`: its table becomes
# `error`) while the guest writes: the guest gets I/O errors and nothing
# more reaches the storage. `xl destroy` leaves no dm device, loop device or
# store behind; revoke refuses a device re-created under a vbd's name (it
# is bound to the published dev_t and diskseq); a restarted daemon removes
# an unclaimed dm device and an
# unclaimed loop device of ours, and leaves everyone else's alone.
. /vmlib.sh
N=snapshot-revoke
start_blkbackd || fail $N "cannot start blkbackd"
mkdir -p /var/lib/blkbackd/templates
make_disk /var/lib/blkbackd/templates/base.img 16 DISK-MAGIC-TEMPLATE
T0=$(md5sum < /var/lib/blkbackd/templates/base.img)
guest_cfg domsnap "vdev=xvda,backendtype=phy,script=block-blkbackd,target=snapshot:base" 1 "blkbackd_busy"
xl create /root/domsnap.cfg || fail $N "xl create"
wait_guest domsnap >/dev/null || fail $N "the guest never finished"
grep -q "head=DISK-MAGIC-TEMPL" /var/log/xen/console/guest-domsnap.log || fail $N "the guest did not see the template"
D=$(xl domid domsnap); BE=/local/domain/0/backend/vbd/$D/51712
NAME=blkbackd-$D-51712
dmsetup table $NAME | grep -q snapshot || fail $N "no dm snapshot $NAME: $(dmsetup ls)"
[ "$(xenstore-read $BE/physical-device)" = "$(printf '%x:%x' $(dmsetup info -c --noheadings -o major,minor --separator ' ' $NAME))" ] \
  || fail $N "physical-device is not the dm device"
[ "$(md5sum < /var/lib/blkbackd/templates/base.img)" = "$T0" ] || fail $N "the template changed"
COWDEV=/dev/loop$(printf '%d' 0x$(xenstore-read $BE/blkbackd-cow | cut -d: -f2))
sleep 1
blkbackd revoke --domid $D --devid 51712 || fail $N "revoke failed"
dmsetup table $NAME | grep -q error || fail $N "the table is not error after revoke"
sleep 2  # writes in flight at the swap settle
C1=$(md5sum < $COWDEV)
sleep 3
C2=$(md5sum < $COWDEV)
[ "$C1" = "$C2" ] || fail $N "the store changed after revoke"
grep -q -i -E "I/O error|op failed" /var/log/xen/console/guest-domsnap.log || fail $N "the guest saw no I/O error after revoke"
pidof blkbackd >/dev/null || fail $N "the daemon died"
# Revoke is bound to the disk the vbd published (dev_t and diskseq): a dm
# device of ours that carries the vbd's name but is another disk (removed
# and re-created meanwhile: another diskseq) is refused, untouched.
FAKE=/local/domain/0/backend/vbd/97/51712
dmsetup create --noudevsync blkbackd-97-51712 --uuid BLKBACKD-blkbackd-97-51712-0000000000000001 --table "0 2048 zero" \
  || fail $N "dmsetup create blkbackd-97-51712"
MM=$(dmsetup info -c --noheadings -o major,minor --separator ' ' blkbackd-97-51712)
SEQ=$(cat /sys/dev/block/$(echo $MM | tr ' ' :)/diskseq)
xenstore-write $FAKE/physical-device $(printf '%x:%x' $MM) $FAKE/diskseq $(printf '%x' $((SEQ - 1)))
blkbackd revoke --domid 97 --devid 51712 > /tmp/revoke97.log 2>&1 && fail $N "revoke acted on a re-created device"
cat /tmp/revoke97.log
grep -q "it was replaced; refusing to act on it" /tmp/revoke97.log || fail $N "the refusal does not say why: $(cat /tmp/revoke97.log)"
dmsetup table blkbackd-97-51712 | grep -q zero || fail $N "the re-created device's table was changed"
# The disk it did publish is revoked.
xenstore-write $FAKE/diskseq $(printf '%x' $SEQ)
blkbackd revoke --domid 97 --devid 51712 || fail $N "revoke of the published disk failed"
dmsetup table blkbackd-97-51712 | grep -q error || fail $N "the published disk was not revoked"
dmsetup remove --noudevsync blkbackd-97-51712
xenstore-rm /local/domain/0/backend/vbd/97
xl destroy domsnap || fail $N "xl destroy"
i=0; while [ -n "$(dmsetup ls 2>/dev/null | grep blkbackd)" ]; do i=$((i+1)); [ $i -lt 50 ] || break; sleep 0.1; done
[ -z "$(dmsetup ls 2>/dev/null | grep blkbackd)" ] || fail $N "dm devices left: $(dmsetup ls)"
[ -z "$(losetup -a)" ] || fail $N "loop devices left: $(losetup -a)"
[ -z "$(ls /var/lib/blkbackd/cow 2>/dev/null)" ] || fail $N "stores left: $(ls /var/lib/blkbackd/cow)"
[ "$(md5sum < /var/lib/blkbackd/templates/base.img)" = "$T0" ] || fail $N "the template changed"
# Start-up reconciliation: a device of ours that no vbd claims (as a crash
# between add and remove leaves) is removed when the daemon starts; one
# that is not ours is left alone.
dmsetup create --noudevsync blkbackd-orphan --uuid BLKBACKD-orphan-1 --table "0 8 zero" || fail $N "dmsetup create"
dmsetup create --noudevsync someone-else --uuid LVM-xyz --table "0 8 zero" || fail $N "dmsetup create"
kill -TERM $(pidof blkbackd); i=0; while pidof blkbackd >/dev/null; do i=$((i+1)); [ $i -lt 100 ] || fail $N "daemon did not stop"; sleep 0.1; done
# Likewise a loop device of ours left by a block script whose vbd is gone
# (made by `add`, nodes removed without `remove`), and one made by losetup.
ORPHAN=/local/domain/0/backend/vbd/99/51712
dd if=/dev/zero of=/tmp/orphan.img bs=1M count=1 2>/dev/null
cp /tmp/orphan.img /tmp/foreign.img
xenstore-write $ORPHAN/params file:/tmp/orphan.img $ORPHAN/mode w
XENBUS_PATH=backend/vbd/99/51712 blkbackd hotplug add || fail $N "hotplug add for the orphan"
ORPHAN_LOOP=/dev/loop$(xenstore-read $ORPHAN/physical-device | cut -d: -f2)
xenstore-rm /local/domain/0/backend/vbd/99
FOREIGN_LOOP=$(losetup -f) && losetup $FOREIGN_LOOP /tmp/foreign.img || fail $N "losetup"
losetup -a
start_blkbackd || fail $N "cannot restart blkbackd"
i=0; until ! losetup $ORPHAN_LOOP >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 100 ] || fail $N "the orphan loop device was not reconciled: $(losetup -a)"; sleep 0.1; done
losetup $FOREIGN_LOOP >/dev/null 2>&1 || fail $N "a loop device that is not ours was released"
grep -q "released a loop device no vbd claims" /tmp/blkbackd.log || fail $N "no log line for the loop reconciliation"
losetup -d $FOREIGN_LOOP
i=0; until ! dmsetup info blkbackd-orphan >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 100 ] || fail $N "the orphan was not reconciled: $(dmsetup ls)"; sleep 0.1; done
dmsetup info someone-else >/dev/null 2>&1 || fail $N "a device that is not ours was removed"
grep -q "removed a dm device no vbd claims" /tmp/blkbackd.log || fail $N "no log line for the reconciliation"
dmsetup remove --noudevsync someone-else
mark "$N PASS"
