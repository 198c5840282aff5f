#!/bin/sh
# domU /init: the guest side. Linux xen-blkfront against whatever backend dom0
# runs; reads the marker dom0 put on the disk, writes and re-reads 4 MiB of
# random data with O_DIRECT, and reports everything as DOMU-MARK lines.
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo "DOMU-MARK kernel=$(uname -r) (the guest kernel)"
# xen_blkfront.* options on the kernel command line become module options.
OPTS=""; for t in $(cat /proc/cmdline); do case $t in xen_blkfront.*) OPTS="$OPTS ${t#xen_blkfront.}";; esac; done
modprobe xen-blkfront $OPTS
for i in $(seq 1 300); do [ -b /dev/xvda ] && break; sleep 0.1; done
if [ -b /dev/xvda ]; then
  echo "DOMU-MARK xvda sectors=$(cat /sys/block/xvda/size) head=$(dd if=/dev/xvda bs=20 count=1 2>/dev/null)"
  dmesg | grep -i -E 'blkfront|xvda' | sed 's/^/DOMU-MARK dmesg /'
  echo "DOMU-MARK queues=$(ls /sys/block/xvda/mq | wc -l) max_segments=$(cat /sys/block/xvda/queue/max_segments) max_sectors_kb=$(cat /sys/block/xvda/queue/max_sectors_kb)"
  dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null
  dd if=/tmp/pat of=/dev/xvda bs=1M seek=1 conv=notrunc,fsync 2>/dev/null
  echo 3 > /proc/sys/vm/drop_caches
  dd if=/dev/xvda of=/tmp/back bs=1M skip=1 count=4 2>/dev/null
  A=$(md5sum < /tmp/pat | cut -d' ' -f1); B=$(md5sum < /tmp/back | cut -d' ' -f1)
  if [ "$A" = "$B" ]; then echo "DOMU-MARK rw-verify-ok md5=$A"; else echo "DOMU-MARK rw-verify-FAIL $A $B"; fi
  echo domU-wrote-this | dd of=/dev/xvda bs=512 seek=8 conv=sync,notrunc,fsync 2>/dev/null
  echo "DOMU-MARK xvda-rw-ok"
else
  echo "DOMU-MARK no-xvda"
fi
# blkbackd_ext4 on the command line: an ext4 file system on xvda (over
# what the raw test wrote), files of random data, their md5s reported, synced
# and unmounted, so dom0 can fsck the image and read the files back.
if grep -q blkbackd_ext4 /proc/cmdline && [ -b /dev/xvda ]; then
  modprobe crc32c_generic; modprobe ext4
  mkdir -p /mnt
  if /sbin/mke2fs -q -F -t ext4 /dev/xvda && mount -t ext4 /dev/xvda /mnt; then
    for i in 1 2 3 4 5 6 7 8; do
      dd if=/dev/urandom of=/mnt/file$i bs=4k count=$((i * 37)) 2>/dev/null
      echo "DOMU-MARK ext4-file file$i md5=$(md5sum < /mnt/file$i | cut -d' ' -f1)"
    done
    mkdir -p /mnt/dir/sub; echo nested > /mnt/dir/sub/leaf
    sync; umount /mnt && echo "DOMU-MARK ext4-ok"
  else
    echo "DOMU-MARK ext4-FAIL"
  fi
fi
# blkbackd_bench on the command line: the side-by-side jobs on xvda (4 KiB
# random read at depth 1 and 32, random write at 32, 128 KiB sequential read
# and write at 8), with O_DIRECT and Linux AIO, as fio's libaio engine runs them.
if grep -q blkbackd_bench /proc/cmdline && [ -b /dev/xvda ]; then
  for job in "randread 4096 1" "randread 4096 32" "randwrite 4096 32" "read 131072 8" "write 131072 8"; do
    set -- $job
    /bin/iobench /dev/xvda $1 $2 $3 3 | sed 's/^/DOMU-MARK /' || echo "DOMU-MARK IOBENCH-FAIL $job"
  done
fi
# blkbackd_verify=SECONDS on the command line: a verified write/read loop on
# xvda for that long (the daemon is restarted, or the guest saved and
# restored, under it); its report is a DOMU-MARK line.
for t in $(cat /proc/cmdline); do
  case $t in blkbackd_verify=*)
    if [ -b /dev/xvda ]; then
      echo "DOMU-MARK verify-start"
      /bin/verifyloop /dev/xvda ${t#blkbackd_verify=} | sed 's/^/DOMU-MARK /' &
    fi;;
  esac
done
# blkbackd_busy on the command line: keep writing to xvda until destroyed.
if grep -q blkbackd_busy /proc/cmdline && [ -b /dev/xvda ]; then
  ( while :; do dd if=/dev/urandom of=/dev/xvda bs=64k count=64 seek=32 conv=notrunc,fsync 2>/dev/null; done ) &
  echo "DOMU-MARK busy-writing"
fi
# blkbackd_discard on the command line: after "done", what blkfront made of
# the backend's discard limits, then 8 MiB written at 8 MiB, a pause (dom0
# reads the pool's usage), and the same range discarded.
if grep -q blkbackd_discard /proc/cmdline && [ -b /dev/xvda ]; then
  ( echo "DOMU-MARK discard_granularity=$(cat /sys/block/xvda/queue/discard_granularity) discard_max_bytes=$(cat /sys/block/xvda/queue/discard_max_bytes)"
    dd if=/dev/urandom of=/dev/xvda bs=1M count=8 seek=8 conv=notrunc,fsync 2>/dev/null
    echo "DOMU-MARK discard-written"; sleep 4
    blkdiscard -o $((8 << 20)) -l $((8 << 20)) /dev/xvda; echo "DOMU-MARK discarded rc=$?" ) &
fi
echo "DOMU-MARK done"
exec /bin/sh
