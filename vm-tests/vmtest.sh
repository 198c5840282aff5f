#!/bin/bash
# Boots Xen 4.17 + a Debian PV dom0 + PV domUs under QEMU (software emulation, no KVM needed),
# built from Debian packages on this machine (hypervisor and kernel downloaded and unpacked,
# never installed). Adapted from the project notes' recipe.
# usage: vmtest.sh WORKDIR DOM0-TEST DOMU-INIT [extra src:dst files for the dom0 overlay...]
# The domU initramfs runs DOMU-INIT as /init (after mounting /proc, /sys, /dev and loading
# xen-blkfront); dom0 runs DOM0-TEST as /test.sh once xenstored is up. The result is
# judged by the serial log: TEST-RC=0.
# dom0 always runs Debian 12's kernel (this host's apt: linux-image-amd64). The domUs'
# kernels are VMTEST_GUEST_KERNELS, one a line "LABEL SOURCE PACKAGE" (default: dom0's own,
# as "6.1 host linux-image-amd64"): SOURCE "host" is this host's apt sources, any other a
# suite of the Debian archive (vm-tests/fetch-deb: its signed index names the file and its
# SHA256). Each is unpacked into WORKDIR/guest/LABEL (kept: delete it to take a newer one)
# and gets its own domU initramfs; dom0 has them as /root/guest/LABEL/{vmlinux,domu.cpio,
# release}, and /root/guest/kernels lists the labels in order.
set -euo pipefail
W=${1:?workdir}; TEST=${2:?dom0 test script}; DOMU_INIT=${3:?domU init script}; shift 3
mkdir -p $W/debs $W/out
export DEBIAN_FRONTEND=noninteractive
# 1. host packages (qemu + xen userspace to copy into dom0; kmod for depmod; busybox-static for the rootfs;
# xz-utils and zstd for the guest kernels' modules and images; gpgv and the archive keyring for fetch-deb)
need=(qemu-system-x86 busybox-static cpio kmod xen-utils-4.17 xenstore-utils dmsetup util-linux e2fsprogs \
  qemu-system-xen qemu-system-data gcc libc6-dev xz-utils zstd gpgv debian-archive-keyring)
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
# 2. hypervisor + dom0's kernel: download and unpack only (never installed on the host)
# unvmlinuz BZIMAGE ELF: the kernel inside a bzImage, uncompressed (an ELF, which Xen boots
# as a PV kernel directly: saves ~3 s (Xen) + ~4 s (xl) over the compressed one). The
# payload is found by the boot header (payload_offset/length) and taken apart by its own
# magic: xz (Debian 12), zstd (Debian 13) or gzip; the size the build appends is checked.
unvmlinuz() {
  python3 - "$1" "$2" <<'PY'
import lzma, struct, subprocess, sys, zlib
d = open(sys.argv[1], 'rb').read()
if d[0x202:0x206] != b'HdrS':
    sys.exit('%s: not a bzImage' % sys.argv[1])
off, size = struct.unpack_from('<II', d, 0x248)
p = d[((d[0x1f1] or 4) + 1) * 512 + off:][:size]
want = struct.unpack_from('<I', p, len(p) - 4)[0]
if p[:6] == b'\xfd7zXZ\x00':
    k = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(p)
elif p[:4] == b'\x28\xb5\x2f\xfd':
    k = subprocess.run(['zstd', '-dcq', '--memory=2048MB'], input=p[:-4], stdout=subprocess.PIPE, check=True).stdout
elif p[:2] == b'\x1f\x8b':
    k = zlib.decompressobj(31).decompress(p)
else:
    sys.exit('%s: payload compressed with an unknown method (%s)' % (sys.argv[1], p[:6].hex()))
if k[:4] != b'\x7fELF' or len(k) != want:
    sys.exit('%s: the payload is not an ELF of %d bytes' % (sys.argv[1], want))
open(sys.argv[2], 'wb').write(k)
PY
}
# unpack_kernel DIR DEB...: DIR/kroot with modules.dep, DIR/vmlinux, DIR/release (the kernel
# version), from the kernel's package (or its parts, as fetch-deb gives them)
unpack_kernel() {
  local d=$1 kv deb; shift
  rm -rf $d/kroot $d/vmlinux $d/release; mkdir -p $d/kroot
  for deb in "$@"; do dpkg-deb -x $deb $d/kroot; done
  # Debian 13 ships the modules under /usr/lib (merged /usr): depmod reads /lib.
  [ -e $d/kroot/lib ] || ln -s usr/lib $d/kroot/lib
  kv=$(ls $d/kroot/lib/modules)
  depmod -b $d/kroot $kv
  # /boot/vmlinuz-KV, or beside the modules (Debian 14)
  unvmlinuz $(ls $d/kroot/boot/vmlinuz-$kv $d/kroot/lib/modules/$kv/vmlinuz 2>/dev/null | head -1) $d/vmlinux
  echo $kv > $d/release
}
KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
KV=${KPKG#linux-image-}
if [ ! -f $W/xen ] || [ ! -f $W/vmlinux ] || [ "$(cat $W/release 2>/dev/null)" != $KV ]; then
  (cd $W/debs && apt-get download -qq xen-hypervisor-4.17-amd64 $KPKG 2>/dev/null)
  rm -rf $W/xroot; mkdir -p $W/xroot
  dpkg-deb -x $W/debs/xen-hypervisor-4.17-amd64_*.deb $W/xroot
  zcat $W/xroot/boot/xen-4.17-amd64.gz > $W/xen             # ELF32 multiboot image, QEMU -kernel loads it
  unpack_kernel $W $W/debs/${KPKG}_*.deb
fi
copy_bin() { local r=$1; shift; for b in "$@"; do for f in $b $(ldd $b | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do [ -e $r$f ] || { mkdir -p $r$(dirname $f); cp -L $f $r$f; }; done; done; }
# copy_mods ROOT KROOT KV MODULE...: the modules and what they depend on, uncompressed
# (Debian 13's are .ko.xz: carried plain, busybox's modprobe needs no decompressor), and
# modules.dep. ?MODULE: only if the kernel has it (crc32c_generic is gone after 6.12).
copy_mods() {
  local r=$1 kr=$2/lib/modules/$3 kv=$3 m f d; shift 3
  for m in "$@"; do
    d=$(grep -E "/${m#\?}\.ko(\.xz|\.zst|\.gz)?:" $kr/modules.dep | tr -d : || true)
    [ -n "$d" ] || grep -q -E "/${m#\?}\.ko$" $kr/modules.builtin || [ "${m#\?}" != "$m" ] \
      || { echo "VMTEST-HARNESS-FAIL: kernel $kv has no module $m"; exit 100; }
    for f in $d; do
      mkdir -p $r/lib/modules/$kv/$(dirname $f)
      case $f in
        *.xz) xz -dc $kr/$f > $r/lib/modules/$kv/${f%.xz} ;;
        *.zst) zstd -dcq $kr/$f > $r/lib/modules/$kv/${f%.zst} ;;
        *.gz) zcat $kr/$f > $r/lib/modules/$kv/${f%.gz} ;;
        *) cp $kr/$f $r/lib/modules/$kv/$f ;;
      esac
    done
  done
  cp $kr/modules.order $kr/modules.builtin* $r/lib/modules/$kv/; depmod -b $r $kv
}
base_root() { rm -rf $1; mkdir -p $1/{bin,sbin,etc,dev,proc,sys,tmp,run,var,root,usr/bin}; cp /bin/busybox $1/bin/; for a in $(busybox --list); do [ -e $1/bin/$a ] || ln -s busybox $1/bin/$a; done; }
# 3. the guest kernels and one domU initramfs each (busybox + xen-blkfront, ext4 and mke2fs);
# its /init is the guest side of the test
GUESTS=${VMTEST_GUEST_KERNELS:-"6.1 host linux-image-amd64"}
DU=$W/rootfs-domu; base_root $DU
copy_bin $DU /sbin/mke2fs; mkdir -p $DU/etc; cp /etc/mke2fs.conf $DU/etc/
# the side-by-side scenario's load generator (static: the domU has no libc)
gcc -static -O2 -o $DU/bin/iobench "$(dirname "$DOMU_INIT")/iobench.c"
# the restart and save/restore scenarios' verifying guest
gcc -static -O2 -o $DU/bin/verifyloop "$(dirname "$DOMU_INIT")/verifyloop.c"
cp "$DOMU_INIT" $DU/init; chmod +x $DU/init
labels=()
while read -r label source pkg; do
  [ -n "$label" ] || continue
  G=$W/guest/$label; labels+=("$label"); want=""
  if [ "$source" = host ]; then   # what the host's apt has now (an archive suite's is kept once fetched)
    gpkg=$pkg; dep=$(apt-cache depends $pkg | awk '/Depends: linux-image-/ {print $2; exit}'); [ -z "$dep" ] || gpkg=$dep
    want=${gpkg#linux-image-}
  fi
  if [ ! -f $G/vmlinux ] || [ "$(cat $G/source 2>/dev/null)" != "$source $pkg" ] \
     || { [ -n "$want" ] && [ "$(cat $G/release 2>/dev/null)" != "$want" ]; }; then
    rm -rf $G; mkdir -p $G
    if [ "$source" = host ]; then
      if [ "$gpkg" = "$KPKG" ]; then   # dom0's own kernel
        ln -s ../../kroot $G/kroot; cp $W/vmlinux $W/release $G/
      else
        (cd $W/debs && apt-get download -qq $gpkg) || { echo "VMTEST-HARNESS-FAIL: apt-get download $gpkg"; exit 100; }
        unpack_kernel $G $W/debs/${gpkg}_*.deb
      fi
    else
      debs=$(bash "$(dirname "$0")/fetch-deb" $source $pkg $G/deb) \
        || { echo "VMTEST-HARNESS-FAIL: guest kernel $label: $pkg of $source could not be fetched (above)"; exit 100; }
      unpack_kernel $G $debs; rm -rf $G/deb
    fi
    echo "$source $pkg" > $G/source
  fi
  echo "vmtest: guest kernel $label: $(cat $G/release) ($source $pkg)"
  rm -rf $G/rootfs; cp -a $DU $G/rootfs
  copy_mods $G/rootfs $G/kroot $(cat $G/release) xen-blkfront ext4 '?crc32c_generic'
  (cd $G/rootfs && find . | cpio -R 0:0 -H newc -o --quiet) > $G/domu.cpio
done <<< "$GUESTS"
[ ${#labels[@]} -gt 0 ] || { echo "VMTEST-HARNESS-FAIL: no guest kernel"; exit 100; }
# 4. dom0 initramfs
D0=$W/rootfs-dom0; base_root $D0
copy_mods $D0 $W/kroot $KV xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs xen-blkback loop crc32c_generic dm-mod dm-zero dm-snapshot dm-thin-pool dm-crypt dm-flakey xts ecb
XB=/usr/lib/xen-4.17/bin
copy_bin $D0 $XB/xl $XB/libxl-save-helper $XB/xenstored $XB/xenconsoled $XB/xen-init-dom0 /usr/bin/xenstore /sbin/dmsetup \
  /sbin/losetup /sbin/blockdev /usr/bin/flock /bin/bash /lib/x86_64-linux-gnu/libgcc_s.so.1 \
  /sbin/e2fsck /sbin/debugfs /usr/libexec/xen-qemu-system-i386
for t in read write ls list rm exists watch chmod; do ln -sf xenstore $D0/usr/bin/xenstore-$t; done
mkdir -p $D0/etc/xen $D0/var/lib/xen $D0/var/log/xen; cp -a /etc/xen/xl.conf /etc/xen/scripts $D0/etc/xen/
mkdir -p $D0/usr/share/qemu; cp -a /usr/share/qemu/keymaps $D0/usr/share/qemu/   # QEMU's qdisk backend reads one
rmdir $D0/var/run 2>/dev/null || true; ln -s /run $D0/var/run
for label in "${labels[@]}"; do
  mkdir -p $D0/root/guest/$label; cp $W/guest/$label/{vmlinux,domu.cpio,release} $D0/root/guest/$label/
done
printf '%s\n' "${labels[@]}" > $D0/root/guest/kernels
printf '#!/bin/sh\nexit 0\n' > $D0/etc/xen/noop-hotplug; chmod +x $D0/etc/xen/noop-hotplug
cat > $D0/init <<'EOI'
#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin:/usr/lib/xen-4.17/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts; mount -t devpts devpts /dev/pts; mount -t tmpfs tmp /run; mount -t tmpfs tmp /tmp
# The rootfs (tmpfs, half of dom0's memory) holds every guest kernel and initramfs: scratch
# space (blkbackd dm-check's /var/tmp) gets its own, as /tmp has.
mkdir -p /var/tmp; mount -t tmpfs tmp /var/tmp
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
