/* iobench: the side-by-side scenario's I/O load generator inside the domU.
 *
 * The guest is a busybox initramfs; fio and its ~80 MB of shared libraries
 * do not fit in it, so this small static tool runs the same job shapes as
 * fio's libaio engine with direct=1: DEPTH requests of BS bytes kept in
 * flight with Linux AIO on an O_DIRECT block device, random (uniform, BS
 * aligned) or sequential offsets, for SECONDS.
 *
 *   iobench DEV randread|randwrite|read|write BS DEPTH SECONDS
 *
 * prints: IOBENCH <job> bs=<BS> depth=<DEPTH> ops=<N> secs=<S> iops=<I> mbps=<M>
 * and exits non-zero on any I/O error.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "clock-rand.h"

int main(int argc, char **argv)
{
	if (argc != 6) {
		fprintf(stderr, "usage: %s DEV randread|randwrite|read|write BS DEPTH SECONDS\n", argv[0]);
		return 2;
	}
	const char *job = argv[2];
	int write = strstr(job, "write") != NULL;
	int random = strncmp(job, "rand", 4) == 0;
	long bs = atol(argv[3]), depth = atol(argv[4]);
	double secs = atof(argv[5]);
	if (bs < 512 || bs % 512 || depth < 1 || depth > 256 || secs <= 0) {
		fprintf(stderr, "bad BS, DEPTH or SECONDS\n");
		return 2;
	}
	int fd = open(argv[1], (write ? O_RDWR : O_RDONLY) | O_DIRECT);
	if (fd < 0) {
		perror(argv[1]);
		return 1;
	}
	uint64_t size = 0;
	if (ioctl(fd, BLKGETSIZE64, &size) < 0 || size < (uint64_t)bs) {
		fprintf(stderr, "%s: no usable size\n", argv[1]);
		return 1;
	}
	uint64_t blocks = size / bs, seq = 0;
	aio_context_t ctx = 0;
	if (syscall(SYS_io_setup, depth, &ctx) < 0) {
		perror("io_setup");
		return 1;
	}
	struct iocb *cbs = calloc(depth, sizeof(*cbs));
	struct io_event *evs = calloc(depth, sizeof(*evs));
	for (long i = 0; i < depth; i++) {
		void *buf;
		if (posix_memalign(&buf, 4096, bs)) {
			perror("posix_memalign");
			return 1;
		}
		memset(buf, 0xA5, bs);
		cbs[i].aio_fildes = fd;
		cbs[i].aio_lio_opcode = write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
		cbs[i].aio_buf = (uint64_t)(uintptr_t)buf;
		cbs[i].aio_nbytes = bs;
		cbs[i].aio_data = i;
	}
	double start = now(), end = start + secs;
	uint64_t ops = 0;
	long inflight = 0;
	for (long i = 0; i < depth; i++) {
		struct iocb *p = &cbs[i];
		p->aio_offset = (random ? next_rand() % blocks : seq++ % blocks) * bs;
		if (syscall(SYS_io_submit, ctx, 1, &p) != 1) {
			perror("io_submit");
			return 1;
		}
		inflight++;
	}
	while (inflight > 0) {
		long n = syscall(SYS_io_getevents, ctx, 1, depth, evs, NULL);
		if (n < 0) {
			perror("io_getevents");
			return 1;
		}
		int more = now() < end;
		for (long k = 0; k < n; k++) {
			if ((long)evs[k].res != bs) {
				fprintf(stderr, "I/O failed: res=%lld\n", (long long)evs[k].res);
				return 1;
			}
			ops++;
			inflight--;
			if (more) {
				struct iocb *p = &cbs[evs[k].data];
				p->aio_offset = (random ? next_rand() % blocks : seq++ % blocks) * bs;
				if (syscall(SYS_io_submit, ctx, 1, &p) != 1) {
					perror("io_submit");
					return 1;
				}
				inflight++;
			}
		}
	}
	double took = now() - start;
	printf("IOBENCH %s bs=%ld depth=%ld ops=%llu secs=%.2f iops=%.0f mbps=%.1f\n", job, bs, depth,
	       (unsigned long long)ops, took, ops / took, ops * (double)bs / took / 1e6);
	return 0;
}
