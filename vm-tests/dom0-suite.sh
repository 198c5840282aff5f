#!/bin/sh
# dom0 side of one VM boot: runs the scenarios as /scenarios/plan lists them,
# one run a line "SCRIPT LABEL TAG" (vm-tests/run writes it): a scenario that
# boots a guest runs once per guest kernel LABEL, with GUEST_KERNEL=LABEL
# (guest_cfg boots /root/guest/LABEL/) and VMTEST_TAG=TAG ("@LABEL", so that
# mark reports NAME@LABEL; "-" for the default kernel, which reports NAME).
# Each reports "VMTEST-MARK <name> PASS|FAIL"; the suite fails if any failed.
[ -f /scenarios/plan ] || { echo "no /scenarios/plan: nothing to run"; exit 1; }
rc=0
# blkbackd arrives as its Debian package (scenario 00 checks what it put where).
mkdir -p /var/lib/dpkg/info /var/lib/dpkg/updates
touch /var/lib/dpkg/status
dpkg -i --force-depends /root/blkbackd.deb > /tmp/dpkg-install.log 2>&1 \
  || { echo "dpkg -i /root/blkbackd.deb failed:"; cat /tmp/dpkg-install.log; }
for l in $(cat /root/guest/kernels); do echo "guest kernel $l: $(cat /root/guest/$l/release)"; done
df -m / /tmp /var/tmp | sed 's/^/dom0 df: /'
mkdir -p /var/log/xen/console/earlier
while read -r script label tag; do
  [ "$label" = - ] && label=""
  [ "$tag" = - ] && tag=""
  echo "=== scenario $script${label:+ (guest kernel $label)} at $(cut -d' ' -f1 /proc/uptime) s"
  # Each run starts with its own logs, as the scenario is written for one run
  # per boot: the guests' consoles (the same domain names again) and the
  # daemon's log (it may be running: it appends) from before are set aside.
  for g in /var/log/xen/console/guest-*.log; do [ -e "$g" ] && mv "$g" /var/log/xen/console/earlier/; done
  [ -f /tmp/blkbackd.log ] && { cat /tmp/blkbackd.log >> /tmp/blkbackd-earlier.log; : > /tmp/blkbackd.log; }
  if [ -n "$label" ]; then
    GUEST_KERNEL=$label VMTEST_TAG=$tag sh "/scenarios/$script" || rc=1
  else
    sh "/scenarios/$script" || rc=1
  fi
  # A run that failed half-way may leave its domains: the next must not meet them.
  for d in $(xl list 2>/dev/null | awk 'NR > 2 {print $1}'); do
    echo "destroying $d, left by $script"; xl destroy "$d"
  done
done < /scenarios/plan
echo "=== scenarios done at $(cut -d' ' -f1 /proc/uptime) s"
exit $rc
