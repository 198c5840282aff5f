#!/bin/sh
# Scenario 14: a `thin:POOL/ID:SIZE` disk. The operator's thin pool (dm
# thin-pool over two loop devices); the block script creates volume 7 in it
# and activates it as blkbackd-<domid>-51712; the guest writes and reads
# back its data. `xl destroy` deactivates the volume (no dm device of ours
# left) and keeps its data in the pool: activated by hand, it holds exactly
# what the guest wrote. A second vbd on the same volume while it is in use is
# refused by the block script. Discard: the vbd publishes the volume's own
# discard granularity (the pool's 64 KiB block), blkfront takes it, and a
# guest's blkdiscard gives the pool its blocks back. Revoke of a volume of
# a pool out of data space returns at once, and the held writes fail;
# `blkbackd status` shows the pool's state, and a read-only pool is refused.
. /vmlib.sh
N=thin
start_blkbackd || fail $N "cannot start blkbackd"
# make_pool NAME META-MIB DATA-MIB: a thin pool of 64 KiB blocks over two
# loop devices on files in dom0's /tmp ($META and $DATA name them).
make_pool() {
  dd if=/dev/zero of=/tmp/$1-meta.img bs=1M count=$2 2>/dev/null
  dd if=/dev/zero of=/tmp/$1-data.img bs=1M count=$3 2>/dev/null
  META=$(losetup -f) && losetup $META /tmp/$1-meta.img || fail $N "losetup meta of $1"
  DATA=$(losetup -f) && losetup $DATA /tmp/$1-data.img || fail $N "losetup data of $1"
  dmsetup create --noudevsync $1 --table "0 $(($3 * 2048)) thin-pool $META $DATA 128 0" || fail $N "creating $1"
}
# drop_pool NAME: the pool, its loop devices and files (dom0's /tmp is memory).
drop_pool() {
  dmsetup remove --noudevsync $1 || fail $N "removing $1"
  losetup -d $META; losetup -d $DATA
  rm -f /tmp/$1-meta.img /tmp/$1-data.img
}
make_pool pool0 8 128
guest_cfg domu14 "vdev=xvda,backendtype=phy,script=block-blkbackd,target=thin:pool0/7:32M" 1 "blkbackd_discard"
xl create /root/domu14.cfg || fail $N "xl create"
wait_guest domu14 || fail $N "the guest never finished"
D=$(xl domid domu14)
dmsetup table blkbackd-$D-51712 || fail $N "no dm thin device of ours"
dmsetup table blkbackd-$D-51712 | grep -q " thin .* 7$" || fail $N "not volume 7 of the pool"
grep -q "DOMU-MARK xvda sectors=65536" /var/log/xen/console/guest-domu14.log || fail $N "the guest does not see 32 MiB"
MD5=$(guest_md5 domu14); [ -n "$MD5" ] || fail $N "the guest's own read-back differed"
# Discard: the volume's own granularity, published and taken by blkfront.
G=$(cat /sys/dev/block/$(dmsetup info -c --noheadings -o major,minor --separator : blkbackd-$D-51712)/queue/discard_granularity)
[ "$G" = 65536 ] || fail $N "the thin volume's discard granularity is $G, not the pool's 64 KiB block"
BE=/local/domain/0/backend/vbd/$D/51712
[ "$(xenstore-read $BE/feature-discard)" = 1 ] || fail $N "discard not offered"
[ "$(xenstore-read $BE/discard-granularity)" = "$G" ] || fail $N "discard-granularity published $(xenstore-read $BE/discard-granularity), the volume's is $G"
# used data blocks of the pool (64 KiB each)
used() { dmsetup status pool0 | awk '{ split($6, a, "/"); print a[1] }'; }
waitmark() { i=0; until grep -q "DOMU-MARK $1" /var/log/xen/console/guest-domu14.log; do i=$((i+1)); [ $i -lt 300 ] || return 1; sleep 0.1; done; }
waitmark discard_granularity= || fail $N "the guest never reported its discard limits"
grep -q "DOMU-MARK discard_granularity=$G " /var/log/xen/console/guest-domu14.log \
  || fail $N "blkfront did not take the granularity: $(grep -a 'DOMU-MARK discard_gran' /var/log/xen/console/guest-domu14.log)"
waitmark discard-written || fail $N "the guest never wrote the range to discard"
U1=$(used)
waitmark discarded || fail $N "the guest's discard never finished"
grep -q "DOMU-MARK discarded rc=0" /var/log/xen/console/guest-domu14.log || fail $N "the guest's blkdiscard failed"
U2=$(used)
echo "pool data blocks used: $U1 after the 8 MiB write, $U2 after the guest's discard"
[ $((U1 - U2)) -ge 128 ] || fail $N "the discard gave back $((U1 - U2)) of the 128 blocks written"
# The same volume for a second vbd while the first is connected: refused.
B=/local/domain/0/backend/vbd/98/51712
xenstore-write $B/params thin:pool0/7:32M $B/mode w
XENBUS_PATH=backend/vbd/98/51712 blkbackd hotplug add && fail $N "a volume in use was given to a second vbd"
echo "second vbd refused: $(xenstore-read $B/hotplug-error)"
# (The daemon, seeing a vbd without a frontend, marks it failed: let it
# finish before the nodes go, so that nothing writes them again.)
i=0; until xenstore-exists $B/error; do i=$((i+1)); [ $i -lt 50 ] || break; sleep 0.1; done
xenstore-rm /local/domain/0/backend/vbd/98
xl destroy domu14 || fail $N "xl destroy"
i=0; while dmsetup info blkbackd-$D-51712 >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 50 ] || fail $N "the thin device was not removed"; sleep 0.1; done
# The volume keeps the guest's data.
dmsetup create --noudevsync check7 --table "0 65536 thin $(dmsetup info -c --noheadings -o major,minor --separator : pool0) 7" || fail $N "activating the volume by hand"
mknod /tmp/check7 b $(dmsetup info -c --noheadings -o major,minor --separator ' ' check7)
[ "$(file_md5 /tmp/check7)" = "$MD5" ] || fail $N "the volume does not hold what the guest wrote"
rm -f /tmp/check7
dmsetup remove --noudevsync check7
dmsetup message pool0 0 "delete 7"
drop_pool pool0
# Revoke of a volume whose pool is out of data space: the pool holds the
# guest's writes (queue_if_no_space, up to its 60 s no-space timeout); a
# flushing suspend would wait for them. Revoke suspends with noflush: it
# returns at once, the held writes fail, the guest sees I/O errors.
# 2 MiB of data: 32 blocks of 64 KiB, less than the guest writes.
make_pool pool1 4 2
guest_cfg domu14b "vdev=xvda,backendtype=phy,script=block-blkbackd,target=thin:pool1/3:32M" 1 ""
xl create /root/domu14b.cfg || fail $N "xl create on the small pool"
i=0; until dmsetup status pool1 | grep -q out_of_data_space; do i=$((i+1)); [ $i -lt 600 ] || fail $N "the small pool never ran out of space: $(dmsetup status pool1)"; sleep 0.1; done
D=$(xl domid domu14b)
echo "pool1 out of data space: $(dmsetup status pool1)"
# The operator sees it: `blkbackd status` names the pool's state per vbd.
blkbackd status > /tmp/status14.txt 2>&1; blkbackd status --json > /tmp/status14.json 2>&1
grep "thin pool" /tmp/status14.txt
grep -q "thin pool pool1: OUT OF DATA SPACE, data 32/32 blocks of 64 KiB" /tmp/status14.txt || fail $N "status does not show the full pool: $(cat /tmp/status14.txt)"
grep -q '"mode": *"out_of_data_space"' /tmp/status14.json || fail $N "status --json does not show the full pool"
t0=$(cut -d' ' -f1 /proc/uptime)
timeout 30 blkbackd revoke --domid $D --devid 51712 || fail $N "revoke of a volume of a full pool failed or hung"
t1=$(cut -d' ' -f1 /proc/uptime)
RSECS=$(awk "BEGIN{print $t1-$t0}")
echo "revoke of a volume whose pool is out of space took $RSECS s"
awk "BEGIN{exit !($RSECS < 10)}" || fail $N "revoke waited $RSECS s for the held writes"
dmsetup table blkbackd-$D-51712 | grep -q error || fail $N "the volume was not revoked"
i=0; until grep -q -i -E "I/O error|op failed" /var/log/xen/console/guest-domu14b.log; do i=$((i+1)); [ $i -lt 300 ] || fail $N "the guest's held writes did not fail after revoke"; sleep 0.1; done
pidof blkbackd >/dev/null || fail $N "the daemon died"
xl destroy domu14b || fail $N "xl destroy domu14b"
i=0; while dmsetup info blkbackd-$D-51712 >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 50 ] || fail $N "the revoked thin device was not removed"; sleep 0.1; done
# A pool that cannot take writes (read-only) is refused by the block
# script with the reason, before any volume is created or activated.
dmsetup reload pool1 --table "0 4096 thin-pool $META $DATA 128 0 1 read_only" && dmsetup suspend pool1 && dmsetup resume pool1 \
  || fail $N "making the pool read-only"
dmsetup status pool1 | grep -q " ro " || fail $N "the pool is not read-only: $(dmsetup status pool1)"
B=/local/domain/0/backend/vbd/96/51712
xenstore-write $B/params thin:pool1/9:8M $B/mode w
XENBUS_PATH=backend/vbd/96/51712 blkbackd hotplug add 2>/dev/null && fail $N "a volume was activated in a read-only pool"
echo "read-only pool refused: $(xenstore-read $B/hotplug-error)"
xenstore-read $B/hotplug-error | grep -q "thin pool pool1: the pool is read-only" || fail $N "the refusal does not say why"
dmsetup ls | grep -q blkbackd-96 && fail $N "a dm device was made for the refused add"
i=0; until xenstore-exists $B/error; do i=$((i+1)); [ $i -lt 50 ] || break; sleep 0.1; done
xenstore-rm /local/domain/0/backend/vbd/96
drop_pool pool1
[ -z "$(losetup -a)" ] || fail $N "loop devices left: $(losetup -a)"
[ -z "$(xenstore-ls /local/domain/0/backend/vbd 2>/dev/null)" ] || fail $N "backend nodes left"
mark "$N PASS"
