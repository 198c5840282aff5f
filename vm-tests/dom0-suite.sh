#!/bin/sh
# dom0 side of one VM boot: runs every scenario in /scenarios in order. Each
# reports "VMTEST-MARK <name> PASS|FAIL"; the suite fails if any failed.
rc=0
for s in /scenarios/*.sh; do
  echo "=== scenario $(basename $s)"
  sh "$s" || rc=1
done
exit $rc
