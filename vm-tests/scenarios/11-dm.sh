#!/bin/sh
# Scenario 11: the device-mapper layer against dom0's real kernel (the host
# kernel of CI has no dm): every table type we build, open by diskseq, table
# swaps with a forced failure rolled back, revoke, snapshot, thin, crypt,
# deferred removal, reconciliation, a recreated device refused under its old
# diskseq (`blkbackd dm-check`, one line per check).
. /vmlib.sh
N=dm
out=$(blkbackd dm-check 2>&1); rc=$?
echo "$out"
echo "$out" | grep -q "DM-CHECK diskseq-reuse: PASS" || fail $N "not every check ran"
[ $rc -eq 0 ] || fail $N "$(echo "$out" | grep FAIL | head -3 | tr '\n' ' ')"
[ -z "$(losetup -a)" ] || fail $N "loop devices left: $(losetup -a)"
ls /sys/block | grep -q '^dm-' && fail $N "dm devices left: $(ls /sys/block | grep '^dm-')"
mark "$N PASS"
