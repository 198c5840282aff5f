#!/bin/sh
# Scenario 1 (dom0 side): blkbackd is dom0's only block backend (no xen-blkback);
# `xl create` with script=block-blkbackd and a file disk; the guest's Linux
# blkfront reads dom0's marker and writes data that dom0 checks byte for byte;
# `xl destroy` tears down within libxl's timeouts and leaves no loop device.
mark() { echo "VMTEST-MARK $*"; }
fail() { mark "xl-file-disk FAIL $*"; echo "--- blkbackd log"; cat /tmp/blkbackd.log; exit 1; }
lsmod | grep -q xen_blkback && fail "xen-blkback is loaded"
RUST_LOG=info blkbackd serve > /tmp/blkbackd.log 2>&1 &
BPID=$!
dd if=/dev/zero of=/tmp/disk.img bs=1M count=32 2>/dev/null
echo DISK-MAGIC-BLKBACKD | dd of=/tmp/disk.img conv=notrunc 2>/dev/null
cat > /root/domu.cfg <<EOC
name="domu"
type="pv"
kernel="/root/vmlinux"
ramdisk="/root/domu.cpio"
extra="console=hvc0 rdinit=/init"
memory=256
disk=["vdev=xvda,backendtype=phy,script=block-blkbackd,target=file:/tmp/disk.img"]
EOC
xl create /root/domu.cfg || fail "xl create"
mark "xl-create-ok"
i=0; until grep -q "DOMU-MARK done" /var/log/xen/console/guest-domu.log 2>/dev/null; do
  i=$((i+1)); [ $i -lt 600 ] || fail "the guest never finished"; sleep 0.1; done
grep DOMU-MARK /var/log/xen/console/guest-domu.log
xenstore-ls -f /local/domain/0/backend/vbd | grep -E 'state|opened|physical-device|diskseq|hotplug-status|feature-max|ring-page|queues|sectors' | head -20
grep -q "DOMU-MARK xvda sectors=65536 head=DISK-MAGIC-BLKBACKD" /var/log/xen/console/guest-domu.log || fail "guest did not read dom0's marker"
MD5=$(sed -n 's/.*DOMU-MARK rw-verify-ok md5=\([0-9a-f]*\).*/\1/p' /var/log/xen/console/guest-domu.log)
[ -n "$MD5" ] || fail "the guest's own read-back differed"
xl destroy domu || fail "xl destroy"
mark "xl-destroy-ok"
ON_DISK=$(dd if=/tmp/disk.img bs=1M skip=1 count=4 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$ON_DISK" = "$MD5" ] || fail "dom0 reads $ON_DISK where the guest wrote $MD5"
dd if=/tmp/disk.img bs=512 skip=8 count=1 2>/dev/null | grep -q domU-wrote-this || fail "marker write missing"
[ -z "$(losetup -a)" ] || fail "loop devices left: $(losetup -a)"
[ -z "$(xenstore-ls /local/domain/0/backend/vbd 2>/dev/null)" ] || fail "backend nodes left"
kill -TERM $BPID; wait $BPID
mark "xl-file-disk PASS"
echo "--- blkbackd log"; cat /tmp/blkbackd.log
