/*
 * mixed.c - one AIO context serving an nvaio namespace and an ordinary file together.
 *
 * What it shows: descriptors nvaio does not own (here a regular file) go to the kernel's AIO
 * from within the same context, and their events come back through the same ring, so a program
 * that mixes a namespace and files keeps one io_submit / io_getevents loop. One io_submit carries
 * a request on each, and one io_getevents call must return both events.
 *
 * The file is opened with O_DIRECT where the file system supports it; the CI guest's /tmp is a
 * tmpfs, which does not, so there it is opened without O_DIRECT (the kernel's AIO then does the
 * buffered I/O inside io_submit, and the event is ready at once).
 *
 * Prints "ok ..." lines and exits 0, or "FAIL ..." and exits 1.
 *
 * Usage: mixed [PCI-ADDRESS [NSID [FILE]]]  (address and nsid as for basic.c; FILE defaults to
 * $TMPDIR/nvaio-mixed.dat, else /tmp/nvaio-mixed.dat, and is removed at the end). Overwrites
 * 16 KiB at 8 MiB into the namespace.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <nvaio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "example.h"

#define LEN (16 * 1024)
#define NS_OFFSET (8 * 1024 * 1024)
#define FILE_OFFSET 4096

/* Submits both iocbs in one io_submit and waits for both events with one io_getevents call;
 * checks each event against its iocb. */
static void both(io_context_t ctx, struct iocb *ns, struct iocb *file, const char *what)
{
	struct iocb *list[2] = { ns, file };
	struct io_event ev[2];
	struct timespec limit = { 30, 0 };
	int r, i, got_ns = 0, got_file = 0;
	char msg[200];

	r = io_submit(ctx, 2, list);
	if (r != 2) {
		if (r == 1) {
			/* The namespace's request is queued; find out why the file's was refused. */
			r = io_submit(ctx, 1, &list[1]);
			snprintf(msg, sizeof(msg),
				 "io_submit queued the namespace's request but refused the file's: %s"
				 "%s",
				 r < 0 ? strerror(-r) : "(accepted when retried alone)",
				 r == -EBADF ? " (no kernel pass-through for ordinary descriptors yet?)"
					     : "");
		} else {
			snprintf(msg, sizeof(msg), "io_submit of both returned %d (%s)", r,
				 r < 0 ? strerror(-r) : "?");
		}
		fail(what, msg);
	}
	r = io_getevents(ctx, 2, 2, ev, &limit);
	if (r != 2) {
		snprintf(msg, sizeof(msg), "one io_getevents(min 2) call returned %d (%s)", r,
			 r < 0 ? strerror(-r) : "timed out");
		fail(what, msg);
	}
	for (i = 0; i < 2; i++) {
		struct iocb *io = ev[i].obj;
		long res = (long)ev[i].res;

		if (io != ns && io != file)
			fail(what, "an event names an iocb that was not submitted");
		if (ev[i].data != io->data)
			fail(what, "an event's data is not its iocb's");
		if (res != LEN) {
			snprintf(msg, sizeof(msg), "the %s request: res %ld (%s)",
				 io == ns ? "namespace" : "file", res,
				 res < 0 ? strerror((int)-res) : "short");
			fail(what, msg);
		}
		if (io == ns)
			got_ns++;
		else
			got_file++;
	}
	if (got_ns != 1 || got_file != 1)
		fail(what, "the two events are not one per request");
	printf("ok %s: one io_submit, one io_getevents returned both events (namespace and file)\n",
	       what);
}

int main(int argc, char **argv)
{
	const char *addr = device_address(argc, argv);
	unsigned nsid = argc > 2 ? (unsigned)strtoul(argv[2], NULL, 0) : 1;
	const char *tmp = getenv("TMPDIR");
	char path[512];
	io_context_t ctx = 0;
	struct iocb ns_io, file_io;
	unsigned char *ns_w, *file_w, *ns_r, *file_r;
	int nfd, ffd, r, i, direct = 1;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc > 3)
		snprintf(path, sizeof(path), "%s", argv[3]);
	else
		snprintf(path, sizeof(path), "%s/nvaio-mixed.dat", tmp && *tmp ? tmp : "/tmp");

	nfd = nvaio_open(addr, nsid, O_RDWR);
	if (nfd < 0) {
		printf("FAIL nvaio_open(%s, %u): %s\n  %s\n", addr, nsid, strerror(-nfd),
		       nvaio_last_error());
		return 1;
	}
	ffd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_DIRECT, 0600);
	if (ffd < 0 && errno == EINVAL) {
		direct = 0;
		ffd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	}
	if (ffd < 0)
		fail(path, strerror(errno));
	printf("ok nvaio_open(%s) = fd %d, open(%s%s) = fd %d\n", addr, nfd, path,
	       direct ? ", O_DIRECT" : " without O_DIRECT: the file system refuses it", ffd);

	r = io_setup(4, &ctx);
	if (r < 0)
		fail("io_setup", strerror(-r));

	if (posix_memalign((void **)&ns_w, 4096, LEN) ||
	    posix_memalign((void **)&file_w, 4096, LEN) ||
	    posix_memalign((void **)&ns_r, 4096, LEN) || posix_memalign((void **)&file_r, 4096, LEN))
		fail("setup", "out of memory");
	for (i = 0; i < LEN; i++) {
		ns_w[i] = (unsigned char)(i * 13 + 1);
		file_w[i] = (unsigned char)(i * 31 + 7);
	}

	/* Writes: one to each, in one batch. */
	io_prep_pwrite(&ns_io, nfd, ns_w, LEN, NS_OFFSET);
	ns_io.data = (void *)(intptr_t)1;
	io_prep_pwrite(&file_io, ffd, file_w, LEN, FILE_OFFSET);
	file_io.data = (void *)(intptr_t)2;
	both(ctx, &ns_io, &file_io, "writes");

	/* Reads back, again in one batch, then compare; the file is also read back directly. */
	memset(ns_r, 0, LEN);
	memset(file_r, 0, LEN);
	io_prep_pread(&ns_io, nfd, ns_r, LEN, NS_OFFSET);
	ns_io.data = (void *)(intptr_t)3;
	io_prep_pread(&file_io, ffd, file_r, LEN, FILE_OFFSET);
	file_io.data = (void *)(intptr_t)4;
	both(ctx, &ns_io, &file_io, "reads");
	if (memcmp(ns_r, ns_w, LEN) != 0)
		fail("data", "the namespace returned other data than was written");
	if (memcmp(file_r, file_w, LEN) != 0)
		fail("data", "the file returned other data than was written");
	memset(file_r, 0, LEN);
	if (pread(ffd, file_r, LEN, FILE_OFFSET) != LEN || memcmp(file_r, file_w, LEN) != 0)
		fail("data", "pread() of the file does not see what the AIO write wrote");
	printf("ok data: both read back as written (and the file through pread too)\n");

	r = io_destroy(ctx);
	if (r < 0)
		fail("io_destroy", strerror(-r));
	close(ffd);
	unlink(path);
	nvaio_close(nfd);
	printf("ok mixed\n");
	return 0;
}
