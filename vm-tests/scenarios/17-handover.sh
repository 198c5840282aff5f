#!/bin/sh
# Scenario 17: a restart and an upgrade as systemd does them (SIGTERM, then a
# new daemon), under a guest running a verified write/read loop: the stopping
# daemon answers what it took and leaves the device Connected, the next one
# adopts it; the second restart runs a different build of the binary
# (/usr/bin/blkbackd-alt, built with another BLKBACKD_BUILD_TAG), so nothing
# depends on the old process's memory. Zero guest I/O errors, every byte
# verified, and the stall printed (the guest's longest single I/O).
. /vmlib.sh
N=handover
start_blkbackd || fail $N "cannot start blkbackd"
make_disk /tmp/disk17.img 32 DISK-MAGIC-HANDOVER
guest_cfg domho "vdev=xvda,backendtype=phy,script=block-blkbackd,target=file:/tmp/disk17.img" 2 "blkbackd_verify=30"
xl create /root/domho.cfg || fail $N "xl create"
wait_guest domho >/dev/null || fail $N "the guest never finished"
GL=/var/log/xen/console/guest-domho.log
D=$(xl domid domho); BE=/local/domain/0/backend/vbd/$D/51712; FE=/local/domain/$D/device/vbd/51712
up() { cut -d' ' -f1 /proc/uptime; }
# handover BINARY: SIGTERM the running daemon, wait for it to exit, start BINARY.
handover() {
  pid=$(pidof blkbackd blkbackd-alt | cut -d' ' -f1)
  adopted=$(grep -c "adopting a connected device" /tmp/blkbackd.log)
  t0=$(up); kill -TERM $pid
  i=0; while kill -0 $pid 2>/dev/null; do i=$((i+1)); [ $i -lt 300 ] || fail $N "the daemon did not stop within 30 s"; sleep 0.1; done
  t1=$(up)
  [ "$(xenstore-read $BE/state)" = 4 ] && [ "$(xenstore-read $FE/state)" = 4 ] \
    || fail $N "the stopped daemon left backend $(xenstore-read $BE/state) frontend $(xenstore-read $FE/state)"
  RUST_LOG=info $1 serve >> /tmp/blkbackd.log 2>&1 &
  i=0; until [ "$(grep -c 'adopting a connected device' /tmp/blkbackd.log)" -gt "$adopted" ]; do
    i=$((i+1)); [ $i -lt 200 ] || fail $N "the next daemon did not adopt the device"; sleep 0.1; done
  t2=$(up)
  echo "HANDOVER $1: SIGTERM to exit $(awk "BEGIN{print ($t1-$t0)*1000}") ms, to adoption $(awk "BEGIN{print ($t2-$t0)*1000}") ms"
}
sleep 4
handover blkbackd
sleep 4
handover blkbackd-alt
grep -q "build=upgraded" /tmp/blkbackd.log || fail $N "the second daemon is not the other build"
# A second daemon beside the running one refuses to start.
blkbackd serve > /tmp/second17.log 2>&1 && fail $N "a second daemon started"
grep -q "another blkbackd serve is running" /tmp/second17.log || fail $N "the second daemon did not say why it stopped"
blkbackd status | tee /tmp/status17.txt | grep -q "adopted from the previous daemon" \
  || fail $N "status does not say the rings were adopted"
i=0; until grep -q -E "DOMU-MARK VERIFY (ok|FAIL)" $GL; do
  i=$((i+1)); [ $i -lt 900 ] || fail $N "the guest's verify loop never ended"; sleep 0.1; done
grep "DOMU-MARK VERIFY" $GL | tail -3
grep -q "DOMU-MARK VERIFY ok" $GL || fail $N "the guest's verify loop failed"
grep -i -E "I/O error|blk_update_request|Buffer I/O|op failed" $GL && fail $N "the guest saw I/O errors"
GAP=$(sed -n 's/.*DOMU-MARK VERIFY ok .*max_gap_ms=\([0-9.]*\).*/\1/p' $GL)
echo "HANDOVER the guest's longest I/O over both restarts: $GAP ms"
# Back to the usual binary for the scenarios after this one (a third handover).
handover blkbackd
xl destroy domho || fail $N "xl destroy"
[ -z "$(losetup -a)" ] || fail $N "loop devices left: $(losetup -a)"
rm -f /tmp/disk17.img
mark "$N PASS stall_ms=$GAP"
