# Shared dom0 helpers for the scenarios (copied into dom0 as /vmlib.sh).
# The guest kernel this run boots (dom0-suite.sh sets it; by hand, the first).
GUEST_KERNEL=${GUEST_KERNEL:-$(head -n 1 /root/guest/kernels)}
# mark NAME PASS|FAIL ...: the verdict, as NAME$VMTEST_TAG (NAME@LABEL when a
# guest kernel other than the default runs); other marks as they are.
mark() {
  m="$*"; n=${m%% *}; rest=${m#"$n"}
  case "$rest" in " PASS"*|" FAIL"*) m="$n${VMTEST_TAG:-}$rest" ;; esac
  echo "VMTEST-MARK $m"
}
# fail NAME WHY: report, show the daemon's log, stop the scenario.
fail() {
  mark "$1 FAIL $2"
  for g in /var/log/xen/console/guest-*.log; do echo "--- $g"; tail -n 40 "$g"; done
  echo "--- blkbackd log"; tail -n 200 /tmp/blkbackd.log 2>/dev/null
  exit 1
}
# Starts the daemon once per boot.
start_blkbackd() {
  lsmod | grep -q xen_blkback && { echo "xen-blkback is loaded"; return 1; }
  pidof blkbackd blkbackd-alt >/dev/null && return 0
  # With the configuration the package installed.
  RUST_LOG=${RUST_LOG:-info} blkbackd serve --config /etc/blkbackd/blkbackd.toml >> /tmp/blkbackd.log 2>&1 &
}
# make_disk PATH MIB MARKER
make_disk() {
  dd if=/dev/zero of="$1" bs=1M count="$2" 2>/dev/null
  echo "$3" | dd of="$1" conv=notrunc 2>/dev/null
}
# guest_cfg NAME DISKSPEC VCPUS EXTRA-KERNEL-ARGS [MEMORY-MIB (256)]
guest_cfg() {
  cat > /root/$1.cfg <<EOC
name="$1"
type="pv"
kernel="/root/guest/$GUEST_KERNEL/vmlinux"
ramdisk="/root/guest/$GUEST_KERNEL/domu.cpio"
extra="console=hvc0 rdinit=/init $4"
memory=${5:-256}
vcpus=$3
disk=["$2"]
EOC
}
# wait_guest NAME: until the guest's init reports done (60 s); fails if
# blkfront reported an operation blkbackd answered with an error, or if the
# guest runs another kernel than GUEST_KERNEL's.
wait_guest() {
  i=0; until grep -q "DOMU-MARK done" /var/log/xen/console/guest-$1.log 2>/dev/null; do
    i=$((i+1)); [ $i -lt 600 ] || return 1; sleep 0.1; done
  grep DOMU-MARK /var/log/xen/console/guest-$1.log
  kv=$(cat /root/guest/$GUEST_KERNEL/release)
  grep -q -F "DOMU-MARK kernel=$kv " /var/log/xen/console/guest-$1.log \
    || { echo "guest $1 does not run $kv"; return 1; }
  ! grep -E "blkfront: .* op failed" /var/log/xen/console/guest-$1.log
}
# guest_md5 NAME: the md5 of what the guest wrote and read back itself.
guest_md5() { sed -n 's/.*DOMU-MARK rw-verify-ok md5=\([0-9a-f]*\).*/\1/p' /var/log/xen/console/guest-$1.log; }
# file_md5 PATH: the md5 of the 4 MiB the guest writes at 1 MiB.
file_md5() { dd if="$1" bs=1M skip=1 count=4 2>/dev/null | md5sum | cut -d' ' -f1; }
