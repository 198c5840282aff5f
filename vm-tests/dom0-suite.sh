#!/bin/sh
# dom0 side of one VM boot: runs every scenario in /scenarios in order. Each
# reports "VMTEST-MARK <name> PASS|FAIL"; the suite fails if any failed.
rc=0
# blkbackd arrives as its Debian package (scenario 00 checks what it put where).
mkdir -p /var/lib/dpkg/info /var/lib/dpkg/updates
touch /var/lib/dpkg/status
dpkg -i --force-depends /root/blkbackd.deb > /tmp/dpkg-install.log 2>&1 \
  || { echo "dpkg -i /root/blkbackd.deb failed:"; cat /tmp/dpkg-install.log; }
for s in /scenarios/*.sh; do
  echo "=== scenario $(basename $s)"
  sh "$s" || rc=1
done
exit $rc
