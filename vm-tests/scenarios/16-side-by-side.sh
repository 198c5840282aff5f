#!/bin/sh
# Scenario 16 (printed, not a gate on speed): the same I/O jobs in a guest
# against three disks on identical backing files, one backend at a time:
# blkbackd, QEMU's xen-block (backendtype=qdisk, its own Xenstore kind), and
# the kernel's xen-blkback (loaded for this scenario only, blkbackd stopped
# meanwhile: both serve backend/vbd), and blkbackd twice more, with [io]
# zero_copy = true (asserted to run on the guest's pages) and with adaptive
# polling ([io] poll_us = 100), in three rounds in one boot. One table:
# the median IOPS or MB/s per backend and blkbackd's ratio to each. Software
# emulation distorts absolute figures; only the ratios mean anything. Fails
# only if a backend cannot run the jobs.
. /vmlib.sh
N=side-by-side
# run_jobs NAME DISKSPEC: a guest runs the jobs; its IOBENCH lines to /tmp/NAME.bench
run_jobs() {
  guest_cfg $1 "$2" 1 "blkbackd_bench"
  rm -f /var/log/xen/console/guest-$1.log   # the last round's "done"
  xl create /root/$1.cfg 2>&1 || return 1
  i=0; until grep -q "DOMU-MARK done" /var/log/xen/console/guest-$1.log 2>/dev/null; do
    i=$((i+1)); [ $i -lt 1800 ] || return 1; sleep 0.1; done
  grep -a "DOMU-MARK IOBENCH " /var/log/xen/console/guest-$1.log | sed 's/.*IOBENCH //' > /tmp/$1.bench
  cat /tmp/$1.bench
  blkbackd status --json > /tmp/$1.status 2>/dev/null
  xl destroy $1
  [ "$(wc -l < /tmp/$1.bench)" -eq 5 ]
}
# dom0's /tmp is memory: 32 MiB each, checked, removed at the end.
df -m /tmp | tail -1
for b in blkbackd bbzc bbpoll qdisk blkback; do
  dd if=/dev/zero of=/tmp/sbs-$b.img bs=1M count=32 2>/dev/null || fail $N "no room for /tmp/sbs-$b.img"
done
# ROUNDS rounds in this one boot (the VM's noise is round to round); the
# table gives each figure's median.
ROUNDS=${SBS_ROUNDS:-3}
r=0
while [ $r -lt $ROUNDS ]; do
  r=$((r+1))
  # blkbackd with the defaults, again with zero copy on (persistent
  # grants as the I/O buffers, O_DIRECT on the loop device straight into
  # gntdev's mappings), and with adaptive polling: what each buys, or
  # costs, on this dom0. They rotate which goes first (the second of a
  # pair did better in both orders once: an order effect, not a backend's).
  mkdir -p /etc/blkbackd && printf '[io]\nzero_copy = true\n' > /etc/blkbackd/bbzc.toml
  printf '[io]\npoll_us = 100\n' > /etc/blkbackd/bbpoll.toml
  case $((r % 3)) in
    1) trio="blkbackd bbzc bbpoll" ;; 2) trio="bbzc bbpoll blkbackd" ;; *) trio="bbpoll blkbackd bbzc" ;;
  esac
  for b in $trio; do
    pid=$(pidof blkbackd) && { kill -TERM $pid; i=0; while kill -0 $pid 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; }
    if [ $b != blkbackd ]; then
      RUST_LOG=info blkbackd serve --config /etc/blkbackd/$b.toml >> /tmp/blkbackd.log 2>&1 &
    else
      start_blkbackd || fail $N "cannot start blkbackd"
    fi
    run_jobs sbs-$b "vdev=xvda,backendtype=phy,script=block-blkbackd,target=file:/tmp/sbs-$b.img" \
      || fail $N "the jobs did not run on $b"
    mv /tmp/sbs-$b.bench /tmp/sbs-$b.$r.bench
  done
  ZC=$(sed -n 's/.*"zero_copy": *\([0-9]*\).*/\1/p' /tmp/sbs-bbzc.status | awk '{s+=$1} END {print s+0}')
  echo "zero-copy requests: $ZC"
  [ "$ZC" -gt 0 ] || fail $N "no request ran on the guest's pages with zero_copy = true"
  grep -q "disk I/O on mapped guest pages refused" /tmp/blkbackd.log && fail $N "the kernel refused I/O on gntdev mappings"
  run_jobs sbs-qdisk "format=raw,vdev=xvda,access=rw,backendtype=qdisk,target=/tmp/sbs-qdisk.img" \
    || { tail -20 /var/log/xen/qemu-dm-sbs-qdisk.log; fail $N "the jobs did not run on QEMU qdisk"; }
  mv /tmp/sbs-qdisk.bench /tmp/sbs-qdisk.$r.bench
  pid=$(pidof blkbackd) && { kill -TERM $pid; i=0; while kill -0 $pid 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; }
  modprobe xen-blkback || fail $N "cannot load xen-blkback"
  L=$(losetup -f) && losetup $L /tmp/sbs-blkback.img || fail $N "losetup"
  run_jobs sbs-blkback "phy:$L,xvda,w" || { tail -20 /var/log/xen/xen-hotplug.log; fail $N "the jobs did not run on xen-blkback"; }
  mv /tmp/sbs-blkback.bench /tmp/sbs-blkback.$r.bench
  i=0; until rmmod xen-blkback 2>/dev/null; do i=$((i+1)); [ $i -lt 50 ] || fail $N "cannot unload xen-blkback"; sleep 0.1; done
  losetup -d $L
done
rm -f /tmp/sbs-*.img
start_blkbackd || fail $N "cannot restart blkbackd"
# figs BACKEND JOB BS DEPTH: the job's figure in each round, in round order
# (IOPS for 4 KiB, MB/s for 128 KiB).
figs() { r=0; while [ $r -lt $ROUNDS ]; do r=$((r+1)); awk -v j="$2" -v b="$3" -v d="$4" '
  $1 == j && $2 == "bs=" b && $3 == "depth=" d { for (i = 4; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
  f = (b == 4096 ? v["iops"] : v["mbps"]) } END { print f + 0 }' /tmp/sbs-$1.$r.bench; done; }
med() { sort -n | awk '{ a[NR] = $1 } END { if (NR) print a[int((NR + 1) / 2)]; else print 0 }'; }
# ratios A B: A/B round by round (the backends of a round ran minutes apart,
# the rounds further apart: the host's noise moves whole rounds).
ratios() { paste -d' ' "$1" "$2" | awk '{ print ($2 > 0 ? $1 / $2 : 0) }'; }
# Each line names the guest kernel (the scenario runs once per kernel).
G=$(printf '%-11s' "guest $GUEST_KERNEL")
echo "SIDE-BY-SIDE $G| $ROUNDS rounds ($(cat /root/guest/$GUEST_KERNEL/release)): figures are medians, ratios the median of each round's ratio"
echo "SIDE-BY-SIDE $G| job                | blkback   | qdisk     | blkbackd  | vs blkback | vs qdisk | per round vs blkback | zero copy vs blkback | polling vs blkback"
for job in "randread 4096 1" "randread 4096 32" "randwrite 4096 32" "read 131072 8" "write 131072 8"; do
  set -- $job
  for b in blkback qdisk blkbackd bbzc bbpoll; do figs $b $1 $2 $3 > /tmp/sbs-$b.col; done
  k=$(med < /tmp/sbs-blkback.col); q=$(med < /tmp/sbs-qdisk.col); m=$(med < /tmp/sbs-blkbackd.col)
  rk=$(ratios /tmp/sbs-blkbackd.col /tmp/sbs-blkback.col | med)
  rq=$(ratios /tmp/sbs-blkbackd.col /tmp/sbs-qdisk.col | med)
  each=$(ratios /tmp/sbs-blkbackd.col /tmp/sbs-blkback.col | awk '{ printf "%s%.2f", (NR > 1 ? " " : ""), $1 }')
  rc=$(ratios /tmp/sbs-bbzc.col /tmp/sbs-blkback.col | med)
  rp=$(ratios /tmp/sbs-bbpoll.col /tmp/sbs-blkback.col | med)
  unit=IOPS; [ $2 -eq 4096 ] || unit=MB/s
  awk -v g="$G" -v j="$1 $(($2 / 1024))k qd$3" -v u=$unit -v k=$k -v q=$q -v m=$m -v rk=$rk -v rq=$rq -v e="$each" -v rc=$rc -v rp=$rp 'BEGIN {
    printf "SIDE-BY-SIDE %s| %-19s| %9s | %9s | %9s | %10.2f | %8.2f | %-20s | %20.2f | %18.2f  (%s)\n", g, j, k, q, m, rk, rq, e, rc, rp, u }'
done
rm -f /tmp/sbs-*.bench /tmp/sbs-*.col /tmp/sbs-*.status
mark "$N PASS"
