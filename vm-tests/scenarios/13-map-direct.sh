#!/bin/sh
# Scenario 13: the other data paths on real Xen. blkbackd restarted with
# [io] grants = "map" (each request's grants mapped through gntdev, copied,
# unmapped; persistent grants off so that every segment takes that path),
# serving a plain file with target=direct: (no loop device: the block script
# publishes physical-file + file-id, the daemon checks the inode it opens).
# The guest's data is checked byte for byte and the ring counters must show
# mapped segments; then blkbackd is restarted with the defaults.
. /vmlib.sh
N=map-direct
pid=$(pidof blkbackd) && { kill -TERM $pid; i=0; while kill -0 $pid 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; }
mkdir -p /etc/blkbackd
printf '[offer]\npersistent_grants = false\n[io]\ngrants = "map"\n' > /etc/blkbackd/map.toml
RUST_LOG=info blkbackd serve --config /etc/blkbackd/map.toml >> /tmp/blkbackd.log 2>&1 &
make_disk /tmp/disk13.img 32 DISK-MAGIC-BLKBACKD
guest_cfg domu13 "vdev=xvda,backendtype=phy,script=block-blkbackd,target=direct:/tmp/disk13.img" 1 ""
xl create /root/domu13.cfg || fail $N "xl create"
wait_guest domu13 || fail $N "the guest never finished"
BE=/local/domain/0/backend/vbd/$(xl domid domu13)/51712
echo "physical-file=$(xenstore-read $BE/physical-file) file-id=$(xenstore-read $BE/file-id)"
xenstore-exists $BE/physical-device && fail $N "a direct file was published as a block device"
grep -q "DOMU-MARK xvda sectors=65536 head=DISK-MAGIC-BLKBACKD" /var/log/xen/console/guest-domu13.log \
  || fail $N "guest did not read dom0's marker"
blkbackd status --json > /tmp/status13.json
MAPPED=$(sed -n 's/.*"mapped_segments": *\([0-9]*\).*/\1/p' /tmp/status13.json | awk '{s+=$1} END {print s+0}')
echo "mapped segments: $MAPPED"
[ "$MAPPED" -gt 0 ] || fail $N "no segment went through a grant mapping"
MD5=$(guest_md5 domu13); [ -n "$MD5" ] || fail $N "the guest's own read-back differed"
xl destroy domu13 || fail $N "xl destroy"
[ "$(file_md5 /tmp/disk13.img)" = "$MD5" ] || fail $N "dom0 reads other data than the guest wrote"
[ -z "$(losetup -a)" ] || fail $N "loop devices left: $(losetup -a)"
[ -z "$(xenstore-ls /local/domain/0/backend/vbd 2>/dev/null)" ] || fail $N "backend nodes left"
rm -f /tmp/disk13.img   # dom0's /tmp is memory: the later scenarios need it
pid=$(pidof blkbackd) && kill -TERM $pid; sleep 1
start_blkbackd || fail $N "cannot restart blkbackd with the defaults"
mark "$N PASS"
