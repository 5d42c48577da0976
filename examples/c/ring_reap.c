/*
 * ring_reap.c - reaping completions from the event ring in user space.
 *
 * What it shows: an io_context_t is the address of a struct aio_ring laid out as the kernel lays
 * it out, so a program can take events straight out of it, between head and tail, without a
 * call into nvaio (fio's userspace_reap and libaio's own fast path do this with the kernel's
 * AIO). The ring is shared: the producer writes events and then publishes tail; the consumer
 * reads tail, copies the events and then publishes head. Each side's publishing store is a
 * release, each side's read of the other's index an acquire.
 *
 * nvaio polls its queues instead of taking interrupts, so something must drive it: when the ring
 * is empty, this program calls io_getevents(ctx, 0, 0, NULL, &zero), which makes nvaio move
 * every finished request into the ring and takes no event. With the kernel's AIO the same call
 * does nothing and interrupts fill the ring, so the loop is correct on both.
 *
 * It writes a pattern, then in rounds submits 64 reads of 4 KiB each at once and reaps all their
 * events from the ring, for enough rounds to go round the ring. Every event is
 * checked: that it belongs to one of this round's iocbs and no other event did, its data, its
 * result, and the data it read. Prints "ok ..." lines and exits 0, or "FAIL ..." and exits 1.
 *
 * Usage: ring_reap [PCI-ADDRESS [NSID]]  (defaults as for basic.c). Overwrites 256 KiB at 4 MiB.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <nvaio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "example.h"

#define NREQ 64
#define BLOCK 4096
#define OFFSET (4 * 1024 * 1024)
#define AIO_RING_MAGIC 0xa10a10a1u

/* The kernel's struct aio_ring (fs/aio.c). Neither libaio.h nor nvaio.h declares it. */
struct aio_ring {
	unsigned id;
	unsigned nr; /* number of io_event slots */
	unsigned head; /* next event to take; written by the consumer */
	unsigned tail; /* next slot to fill; written by the producer */
	unsigned magic;
	unsigned compat_features;
	unsigned incompat_features;
	unsigned header_length; /* the events start this far into the ring */
	struct io_event io_events[];
};

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* The byte at position pos of the pattern written to the namespace. */
static unsigned char pattern(long pos)
{
	return (unsigned char)((pos * 7 + pos / BLOCK) ^ 0x5a);
}

static struct iocb iocbs[NREQ];
static unsigned char *bufs; /* NREQ blocks */
static int seen[NREQ];

/* Checks one event of this round. */
static void check_event(const struct io_event *ev)
{
	uintptr_t obj = (uintptr_t)ev->obj, base = (uintptr_t)iocbs;
	long i, pos, k;
	char msg[160];

	if (obj < base || obj >= base + sizeof(iocbs) || (obj - base) % sizeof(struct iocb))
		fail("event", "obj is not one of this program's iocbs");
	i = (long)((obj - base) / sizeof(struct iocb));
	if (seen[i]++)
		fail("event", "two events for one iocb");
	if ((long)(intptr_t)ev->data != i) {
		snprintf(msg, sizeof(msg), "iocb %ld came back with data %p", i, ev->data);
		fail("event", msg);
	}
	if ((long)ev->res != BLOCK) {
		snprintf(msg, sizeof(msg), "read %ld: res %ld (%s)", i, (long)ev->res,
			 (long)ev->res < 0 ? strerror((int)-(long)ev->res) : "short");
		fail("event", msg);
	}
	pos = OFFSET + i * BLOCK;
	for (k = 0; k < BLOCK; k++) {
		if (bufs[i * BLOCK + k] != pattern(pos + k)) {
			snprintf(msg, sizeof(msg), "read %ld: wrong byte at namespace offset %ld", i,
				 pos + k);
			fail("data", msg);
		}
	}
}

/* Takes every event in the ring; returns how many. */
static int reap_ring(struct aio_ring *ring)
{
	/* Acquire on tail pairs with the producer's release: the events up to tail are written.
	 * Head is ours, but an io_getevents call that takes events moves it too. */
	unsigned head = __atomic_load_n(&ring->head, __ATOMIC_ACQUIRE);
	unsigned tail = __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);
	unsigned nr = ring->nr;
	int n = 0;

	/* A consumer must not trust indices it did not write alone: reduce them as the kernel does. */
	head %= nr;
	tail %= nr;
	while (head != tail) {
		struct io_event ev = ring->io_events[head];

		check_event(&ev);
		head = (head + 1) % nr;
		n++;
	}
	/* Release: the copies above are done before the slots are handed back to the producer. */
	if (n)
		__atomic_store_n(&ring->head, head, __ATOMIC_RELEASE);
	return n;
}

int main(int argc, char **argv)
{
	const char *addr = device_address(argc, argv);
	unsigned nsid = argc > 2 ? (unsigned)strtoul(argv[2], NULL, 0) : 1;
	io_context_t ctx = 0;
	struct aio_ring *ring;
	struct iocb *list[NREQ];
	struct io_event ev;
	struct timespec zero = { 0, 0 };
	unsigned char *wbuf;
	unsigned long pokes = 0, events = 0;
	int fd, r, round, rounds, i, done;
	double deadline;
	char msg[160];

	setvbuf(stdout, NULL, _IOLBF, 0);
	fd = nvaio_open(addr, nsid, O_RDWR);
	if (fd < 0) {
		printf("FAIL nvaio_open(%s, %u): %s\n  %s\n", addr, nsid, strerror(-fd),
		       nvaio_last_error());
		return 1;
	}
	r = io_setup(NREQ, &ctx);
	if (r < 0)
		fail("io_setup", strerror(-r));

	ring = (struct aio_ring *)ctx;
	if (ring->magic != AIO_RING_MAGIC || ring->incompat_features != 0 ||
	    ring->header_length != sizeof(*ring) || ring->nr <= NREQ)
		fail("ring", "the context is not a struct aio_ring this program can read");
	printf("ok ring header: magic %#x, %u slots, events at offset %u\n", ring->magic, ring->nr,
	       ring->header_length);

	/* The pattern, written with one ordinary request reaped by io_getevents. */
	if (posix_memalign((void **)&wbuf, 4096, NREQ * BLOCK) ||
	    posix_memalign((void **)&bufs, 4096, NREQ * BLOCK))
		fail("setup", "out of memory");
	for (i = 0; i < NREQ * BLOCK; i++)
		wbuf[i] = pattern(OFFSET + i);
	io_prep_pwrite(&iocbs[0], fd, wbuf, NREQ * BLOCK, OFFSET);
	list[0] = &iocbs[0];
	if ((r = io_submit(ctx, 1, list)) != 1)
		fail("write", strerror(r < 0 ? -r : EIO));
	if ((r = io_getevents(ctx, 1, 1, &ev, NULL)) != 1)
		fail("write", strerror(r < 0 ? -r : EIO));
	if ((long)ev.res != NREQ * BLOCK)
		fail("write", (long)ev.res < 0 ? strerror((int)-(long)ev.res) : "short write");
	printf("ok wrote the pattern (%d bytes)\n", NREQ * BLOCK);

	/* Enough rounds to go round the ring at least once, whatever its size. */
	rounds = (int)(ring->nr / NREQ) + 2;
	deadline = now() + 60;
	for (round = 0; round < rounds; round++) {
		memset(bufs, 0, NREQ * BLOCK);
		memset(seen, 0, sizeof(seen));
		for (i = 0; i < NREQ; i++) {
			io_prep_pread(&iocbs[i], fd, bufs + (long)i * BLOCK, BLOCK,
				      OFFSET + (long long)i * BLOCK);
			iocbs[i].data = (void *)(intptr_t)i;
			list[i] = &iocbs[i];
		}
		r = io_submit(ctx, NREQ, list);
		if (r != NREQ) {
			snprintf(msg, sizeof(msg), "round %d: io_submit returned %d (%s)", round, r,
				 r < 0 ? strerror(-r) : "partial");
			fail("submit", msg);
		}
		for (done = 0; done < NREQ;) {
			int n = reap_ring(ring);

			done += n;
			events += (unsigned long)n;
			if (n || done == NREQ)
				continue;
			/* Empty ring: let nvaio fill it, taking no event ourselves. */
			r = io_getevents(ctx, 0, 0, NULL, &zero);
			if (r != 0)
				fail("io_getevents(ctx, 0, 0)", r < 0 ? strerror(-r) : "took an event");
			pokes++;
			if (now() > deadline) {
				snprintf(msg, sizeof(msg), "round %d: %d of %d events after 60 s",
					 round, done, NREQ);
				fail("reap", msg);
			}
		}
	}
	printf("ok %lu events reaped from the ring in user space over %d rounds of %d reads"
	       " (%lu io_getevents calls, none taking an event)\n",
	       events, rounds, NREQ, pokes);
	printf("ok every event: its own iocb, its data, %d bytes, the right contents\n", BLOCK);
	printf("ok ring went round: head %u, tail %u of %u slots\n", ring->head, ring->tail,
	       ring->nr);

	r = io_destroy(ctx);
	if (r < 0)
		fail("io_destroy", strerror(-r));
	nvaio_close(fd);
	printf("ok ring_reap\n");
	return 0;
}
