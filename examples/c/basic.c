/*
 * basic.c - a libaio-style program on nvaio.
 *
 * What it shows: the only differences from a program written for libaio are the include
 * (<nvaio.h>), the link line (libnvaio.a) and nvaio_open() in place of open(). Everything else
 * is the libaio API as is: io_setup, io_prep_pwrite / io_prep_pread / io_prep_preadv /
 * io_prep_fsync, io_submit, io_getevents, io_destroy.
 *
 * It writes a pattern to the namespace, makes it durable, reads it back twice (one plain read,
 * one vectored read into two buffers) and compares. It prints "ok ..." for each thing checked
 * and exits 0, or prints "FAIL ..." and exits 1.
 *
 * Usage: basic [PCI-ADDRESS [NSID]]
 *   The address defaults to $NVAIO_DEV0_ADDR, then to the first word of $NVAIO_DEVICES (both set
 *   in the CI guest); NSID defaults to 1. The controller must be bound to vfio-pci. The program
 *   overwrites 64 KiB at 1 MiB into the namespace.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <nvaio.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "example.h"

#define LEN (64 * 1024)
#define OFFSET (1024 * 1024)

static void fail_errno(const char *what, int neg_errno)
{
	fail(what, strerror(-neg_errno));
}

/* Submit one iocb and wait for its event; checks that the event is this iocb's. */
static long run_one(io_context_t ctx, struct iocb *iocb, const char *what)
{
	struct iocb *list[1] = { iocb };
	struct io_event ev;
	int r;

	r = io_submit(ctx, 1, list);
	if (r != 1)
		fail_errno(what, r < 0 ? r : -EIO);
	r = io_getevents(ctx, 1, 1, &ev, NULL);
	if (r != 1)
		fail_errno(what, r < 0 ? r : -EIO);
	if (ev.obj != iocb || ev.data != iocb->data)
		fail(what, "the event names another iocb");
	return (long)ev.res;
}

int main(int argc, char **argv)
{
	const char *addr = device_address(argc, argv);
	unsigned nsid = argc > 2 ? (unsigned)strtoul(argv[2], NULL, 0) : 1;
	io_context_t ctx = 0; /* io_setup wants it zeroed */
	struct iocb iocb;
	struct iovec iov[2];
	unsigned char *wbuf, *rbuf;
	long res;
	int fd, r, i;

	setvbuf(stdout, NULL, _IOLBF, 0);
	fd = nvaio_open(addr, nsid, O_RDWR);
	if (fd < 0) {
		printf("FAIL nvaio_open(%s, %u): %s\n  %s\n", addr, nsid, strerror(-fd),
		       nvaio_last_error());
		return 1;
	}
	printf("ok nvaio_open(%s, nsid %u) = fd %d\n", addr, nsid, fd);

	r = io_setup(8, &ctx);
	if (r < 0)
		fail_errno("io_setup", r);
	printf("ok io_setup(8)\n");

	/* Page-aligned buffers: not needed by nvaio (it copies through DMA bounce pages), but what
	 * O_DIRECT on the kernel's block devices wants, so the program works on both. */
	if (posix_memalign((void **)&wbuf, 4096, LEN) || posix_memalign((void **)&rbuf, 4096, LEN))
		fail("setup", "out of memory");
	srand((unsigned)getpid());
	for (i = 0; i < LEN; i++)
		wbuf[i] = (unsigned char)(rand() >> 7);

	io_prep_pwrite(&iocb, fd, wbuf, LEN, OFFSET);
	iocb.data = (void *)0x1234;
	res = run_one(ctx, &iocb, "write");
	if (res != LEN) {
		printf("FAIL write: res %ld (%s), expected %d\n", res,
		       res < 0 ? strerror((int)-res) : "short", LEN);
		return 1;
	}
	printf("ok write of %d bytes at offset %d (event data and obj match)\n", LEN, OFFSET);

	io_prep_fsync(&iocb, fd);
	res = run_one(ctx, &iocb, "fsync");
	if (res != 0)
		fail_errno("fsync", (int)res);
	printf("ok fsync\n");

	memset(rbuf, 0, LEN);
	io_prep_pread(&iocb, fd, rbuf, LEN, OFFSET);
	res = run_one(ctx, &iocb, "read");
	if (res != LEN)
		fail("read", res < 0 ? strerror((int)-res) : "short read");
	if (memcmp(rbuf, wbuf, LEN) != 0)
		fail("read", "the data read back differs from the data written");
	printf("ok read back %d bytes, identical\n", LEN);

	/* The same range in one vectored request, into two pieces of different sizes, in the
	 * opposite order: the first quarter goes to the end of rbuf, the rest to its start. */
	memset(rbuf, 0, LEN);
	iov[0].iov_base = rbuf + LEN - LEN / 4;
	iov[0].iov_len = LEN / 4;
	iov[1].iov_base = rbuf;
	iov[1].iov_len = LEN - LEN / 4;
	io_prep_preadv(&iocb, fd, iov, 2, OFFSET);
	res = run_one(ctx, &iocb, "preadv");
	if (res != LEN)
		fail("preadv", res < 0 ? strerror((int)-res) : "short read");
	if (memcmp(rbuf + LEN - LEN / 4, wbuf, LEN / 4) != 0 ||
	    memcmp(rbuf, wbuf + LEN / 4, LEN - LEN / 4) != 0)
		fail("preadv", "the data read back differs from the data written");
	printf("ok preadv into 2 buffers, identical\n");

	r = io_destroy(ctx);
	if (r < 0)
		fail_errno("io_destroy", r);
	r = io_destroy(ctx);
	if (r != -EINVAL)
		fail("io_destroy", "a second io_destroy of the same context did not fail with EINVAL");
	printf("ok io_destroy (and a second one fails with EINVAL)\n");

	r = nvaio_close(fd);
	if (r < 0)
		fail_errno("nvaio_close", r);
	printf("ok basic\n");
	free(wbuf);
	free(rbuf);
	return 0;
}
