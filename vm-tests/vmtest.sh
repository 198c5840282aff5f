#!/bin/bash
# Boots Xen 4.17 + a Debian PV dom0 + PV domUs under QEMU (software emulation, no KVM needed),
# built from Debian packages on this machine (hypervisor and kernel downloaded and unpacked,
# never installed). Adapted from the project notes' recipe.
# usage: vmtest.sh WORKDIR DOM0-TEST DOMU-INIT [extra src:dst files for the dom0 overlay...]
# The domU initramfs runs DOMU-INIT as /init (after mounting /proc, /sys, /dev and loading
# xen-blkfront); dom0 runs DOM0-TEST as /test.sh once xenstored is up. The result is
# judged by the serial log: TEST-RC=0.
set -euo pipefail
W=${1:?workdir}; TEST=${2:?dom0 test script}; DOMU_INIT=${3:?domU init script}; shift 3
mkdir -p $W/debs $W/out
export DEBIAN_FRONTEND=noninteractive
# 1. host packages (qemu + xen userspace to copy into dom0; kmod for depmod; busybox-static for the rootfs)
need=(qemu-system-x86 busybox-static cpio kmod xen-utils-4.17 xenstore-utils dmsetup util-linux e2fsprogs \
  qemu-system-xen qemu-system-data gcc libc6-dev)
missing=$(for p in "${need[@]}"; do dpkg -s $p >/dev/null 2>&1 || echo $p; done)
# apt_install PKG...: installs them; on failure prints apt's own error, then
# resolves what it can: a package installed from outside the archive (e.g.
# qemu-utils from backports) that Breaks what we need is taken back to the
# archive's version, and what still fails is tried one package at a time,
# so the error names the package.
apt_install() {
  local out fix=() p v
  out=$(apt-get install -y -q --no-install-recommends "$@" 2>&1) && return 0
  echo "vmtest: apt-get install $* failed:"; echo "$out" | grep -E '^(E:|W:| )' | sed 's/^/vmtest:   /'
  for p in $(echo "$out" | sed -n 's/^ *\([^ ]*\) : Breaks: .*/\1/p' | sort -u); do
    v=$(apt-cache madison "$p" | awk 'NR == 1 {print $3}')
    [ -n "$v" ] && fix+=("$p=$v")
  done
  if [ "${#fix[@]}" -gt 0 ]; then
    echo "vmtest: taking ${fix[*]} from the archive, as what we install needs"
    apt-get install -y -qq --no-install-recommends --allow-downgrades "$@" "${fix[@]}" >/dev/null 2>&1 && return 0
  fi
  local failed=0
  for p in "$@"; do
    out=$(apt-get install -y -qq --no-install-recommends --allow-downgrades "$p" 2>&1) || {
      echo "vmtest: cannot install $p:"; echo "$out" | grep -E '^(E:| )' | sed 's/^/vmtest:   /'; failed=1; }
  done
  return $failed
}
if [ -n "$missing" ]; then
  apt-get update -qq || echo "vmtest: apt-get update failed (rc $?)"
  apt_install $missing || { echo "VMTEST-HARNESS-FAIL: the host packages could not be installed (above)"; exit 100; }
fi
# 2. hypervisor + kernel: download and unpack only (never installed on the host)
KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
KV=${KPKG#linux-image-}
if [ ! -f $W/xen ] || [ ! -f $W/vmlinux ]; then
  (cd $W/debs && apt-get download -qq xen-hypervisor-4.17-amd64 $KPKG 2>/dev/null)
  rm -rf $W/kroot $W/xroot; mkdir -p $W/kroot $W/xroot
  dpkg-deb -x $W/debs/xen-hypervisor-4.17-amd64_*.deb $W/xroot
  dpkg-deb -x $W/debs/${KPKG}_*.deb $W/kroot
  depmod -b $W/kroot $KV
  zcat $W/xroot/boot/xen-4.17-amd64.gz > $W/xen             # ELF32 multiboot image, QEMU -kernel loads it
  python3 - $W/kroot/boot/vmlinuz-$KV $W/vmlinux <<'PY'     # uncompressed ELF: saves ~3 s (Xen) + ~4 s (xl)
import lzma, sys
d = open(sys.argv[1], 'rb').read(); i = d.find(b'\xfd7zXZ\x00')
open(sys.argv[2], 'wb').write(lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(d[i:]))
PY
fi
M=$W/kroot/lib/modules/$KV
copy_bin() { local r=$1; shift; for b in "$@"; do for f in $b $(ldd $b | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do [ -e $r$f ] || { mkdir -p $r$(dirname $f); cp -L $f $r$f; }; done; done; }
copy_mods() { local r=$1; shift; for m in "$@"; do for f in $(grep -E "/$m.ko:" $M/modules.dep | tr -d :); do mkdir -p $r/lib/modules/$KV/$(dirname $f); cp $M/$f $r/lib/modules/$KV/$f; done; done; cp $M/modules.order $M/modules.builtin* $r/lib/modules/$KV/; depmod -b $r $KV; }
base_root() { rm -rf $1; mkdir -p $1/{bin,sbin,etc,dev,proc,sys,tmp,run,var,root,usr/bin}; cp /bin/busybox $1/bin/; for a in $(busybox --list); do [ -e $1/bin/$a ] || ln -s busybox $1/bin/$a; done; }
# 3. domU initramfs (busybox + xen-blkfront, ext4 and mke2fs); its /init is the guest side of the test
DU=$W/rootfs-domu; base_root $DU; copy_mods $DU xen-blkfront ext4 crc32c_generic
copy_bin $DU /sbin/mke2fs; mkdir -p $DU/etc; cp /etc/mke2fs.conf $DU/etc/
# the side-by-side scenario's load generator (static: the domU has no libc)
gcc -static -O2 -o $DU/bin/iobench "$(dirname "$DOMU_INIT")/iobench.c"
# the restart and save/restore scenarios' verifying guest
gcc -static -O2 -o $DU/bin/verifyloop "$(dirname "$DOMU_INIT")/verifyloop.c"
cp "$DOMU_INIT" $DU/init
chmod +x $DU/init; (cd $DU && find . | cpio -R 0:0 -H newc -o --quiet) > $W/out/domu.cpio
# 4. dom0 initramfs
D0=$W/rootfs-dom0; base_root $D0
copy_mods $D0 xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs xen-blkback loop crc32c_generic dm-mod dm-zero dm-snapshot dm-thin-pool dm-crypt dm-flakey xts ecb
XB=/usr/lib/xen-4.17/bin
copy_bin $D0 $XB/xl $XB/libxl-save-helper $XB/xenstored $XB/xenconsoled $XB/xen-init-dom0 /usr/bin/xenstore /sbin/dmsetup \
  /sbin/losetup /sbin/blockdev /usr/bin/flock /bin/bash /lib/x86_64-linux-gnu/libgcc_s.so.1 \
  /sbin/e2fsck /sbin/debugfs /usr/libexec/xen-qemu-system-i386
for t in read write ls list rm exists watch chmod; do ln -sf xenstore $D0/usr/bin/xenstore-$t; done
mkdir -p $D0/etc/xen $D0/var/lib/xen $D0/var/log/xen; cp -a /etc/xen/xl.conf /etc/xen/scripts $D0/etc/xen/
mkdir -p $D0/usr/share/qemu; cp -a /usr/share/qemu/keymaps $D0/usr/share/qemu/   # QEMU's qdisk backend reads one
rmdir $D0/var/run 2>/dev/null || true; ln -s /run $D0/var/run
cp $W/vmlinux $D0/root/vmlinux; cp $W/out/domu.cpio $D0/root/domu.cpio
printf '#!/bin/sh\nexit 0\n' > $D0/etc/xen/noop-hotplug; chmod +x $D0/etc/xen/noop-hotplug
cat > $D0/init <<'EOI'
#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin:/usr/lib/xen-4.17/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts; mount -t devpts devpts /dev/pts; mount -t tmpfs tmp /run; mount -t tmpfs tmp /tmp
ln -sf /proc/self/fd /dev/fd; ln -sf /proc/self/fd/0 /dev/stdin; ln -sf /proc/self/fd/1 /dev/stdout; ln -sf /proc/self/fd/2 /dev/stderr
mkdir -p /run/xen /run/xenstored /var/log/xen/console
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs loop crc32c_generic dm-mod dm-zero dm-snapshot dm-thin-pool dm-crypt dm-flakey xts ecb; do modprobe $m; done
mount -t xenfs xenfs /proc/xen
xenstored --pid-file /run/xen/xenstored.pid && xen-init-dom0 >/dev/null && \
  xenconsoled --pid-file=/run/xen/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console
echo "DOM0-MARK ready $(cut -d' ' -f1 /proc/uptime)"
/test.sh; echo "TEST-RC=$?"; echo TEST-END
sync; reboot -f   # dom0 reboot => Xen restarts the machine => QEMU (-no-reboot) exits
EOI
chmod +x $D0/init
# 5. overlay with the test (and e.g. the daemon binary) appended as a 2nd cpio archive
OV=$W/overlay; rm -rf $OV; mkdir -p $OV; cp $TEST $OV/test.sh; chmod +x $OV/test.sh
for f in "$@"; do s=${f%%:*}; d=${f#*:}; mkdir -p $OV/$(dirname $d); cp -a $s $OV/$d; done
(cd $D0 && find . | cpio -R 0:0 -H newc -o --quiet) > $W/out/dom0.cpio
(cd $OV && find . | cpio -R 0:0 -H newc -o --quiet) | cat $W/out/dom0.cpio - > $W/out/initrd.cpio
# 6. boot: Xen (multiboot via -kernel), PV dom0, serial console to a log; QEMU exits when dom0 reboots
timeout --foreground -k 5 ${VMTEST_TIMEOUT:-300} qemu-system-x86_64 -machine pc -accel tcg \
  -cpu qemu64,+svm,+npt,+rdrand -smp 2 -m 2048 -nographic -monitor none -serial file:$W/serial.log -no-reboot \
  -kernel $W/xen -append "console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all dom0_mem=1024M,max:1024M dom0_max_vcpus=1" \
  -initrd "$W/vmlinux console=hvc0 earlyprintk=xen rdinit=/init,$W/out/initrd.cpio" </dev/null || echo "qemu exit/timeout rc=$?"
tr -d '\r' < $W/serial.log | grep -a -E 'MARK|TEST-|Panic|crashed' || true
grep -a -q '^TEST-RC=0' $W/serial.log
