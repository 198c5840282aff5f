/* verifyloop: a guest that checks every byte it writes while the backend is
 * restarted, saved and restored under it.
 *
 *   verifyloop DEV SECONDS
 *
 * Writes 64 KiB blocks of a seeded pattern at random places of a 16 MiB
 * region (from 8 MiB on) with O_DIRECT, reads a random block back after each
 * write and compares it with what it last wrote there, and at the end reads
 * back the whole region. Prints progress lines every 2 s and, at the end,
 *
 *   VERIFY ok ios=N max_gap_ms=G      (or VERIFY FAIL <why>)
 *
 * where G is the longest time any single I/O took: what a backend restart or
 * a save/restore cost this guest. Exits non-zero on any I/O error or
 * mismatch.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BLOCK (64 * 1024)
#define BLOCKS 256
#define BASE (8ull << 20)

#include "clock-rand.h"

static void fill(unsigned char *buf, uint64_t seed)
{
	uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
	for (size_t i = 0; i < BLOCK; i += 8) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		memcpy(buf + i, &x, 8);
	}
}

static double max_gap;

/* One I/O, timed; 0 on success. */
static int io(int fd, int write, unsigned char *buf, unsigned block)
{
	double t = now();
	ssize_t n = write ? pwrite(fd, buf, BLOCK, BASE + (uint64_t)block * BLOCK)
			  : pread(fd, buf, BLOCK, BASE + (uint64_t)block * BLOCK);
	double d = now() - t;
	if (d > max_gap)
		max_gap = d;
	if (n != BLOCK) {
		printf("VERIFY FAIL %s of block %u returned %zd\n", write ? "write" : "read", block, n);
		return -1;
	}
	return 0;
}

/* Reads block b back and compares it with the pattern of `seed`; 0 if equal. */
static int check(int fd, unsigned char *buf, unsigned char *want, unsigned b, uint64_t seed,
		 const char *when)
{
	if (io(fd, 0, buf, b))
		return -1;
	fill(want, seed);
	if (memcmp(buf, want, BLOCK)) {
		printf("VERIFY FAIL block %u does not hold what was written%s\n", b, when);
		return -1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: verifyloop DEV SECONDS\n");
		return 2;
	}
	int fd = open(argv[1], O_RDWR | O_DIRECT);
	if (fd < 0) {
		perror("open");
		return 1;
	}
	double secs = atof(argv[2]);
	unsigned char *buf, *want;
	if (posix_memalign((void **)&buf, 4096, BLOCK) || posix_memalign((void **)&want, 4096, BLOCK))
		return 1;
	/* seeds[b]: the seed of what block b holds (0: not written yet). */
	static uint64_t seeds[BLOCKS];
	uint64_t ios = 0, seq = 0;
	double start = now(), report = start + 2;
	while (now() - start < secs) {
		unsigned b = next_rand() % BLOCKS;
		seeds[b] = ++seq;
		fill(buf, seeds[b]);
		if (io(fd, 1, buf, b))
			return 1;
		unsigned r = next_rand() % BLOCKS;
		if (seeds[r] && check(fd, buf, want, r, seeds[r], ""))
			return 1;
		ios += 2;
		if (now() > report) {
			printf("VERIFY progress ios=%llu max_gap_ms=%.1f\n", (unsigned long long)ios, max_gap * 1e3);
			fflush(stdout);
			report += 2;
		}
	}
	for (unsigned b = 0; b < BLOCKS; b++) {
		if (!seeds[b])
			continue;
		if (check(fd, buf, want, b, seeds[b], " (final pass)"))
			return 1;
		ios++;
	}
	printf("VERIFY ok ios=%llu max_gap_ms=%.1f\n", (unsigned long long)ios, max_gap * 1e3);
	return 0;
}
