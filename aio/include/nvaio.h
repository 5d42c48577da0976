/*
 * nvaio.h - the Linux AIO interface of libaio, served by nvaio's userspace NVMe driver.
 *
 * This header stands in for <libaio.h>: it declares the same types (io_context_t, struct iocb,
 * struct io_event, enum io_iocb_cmd), the same inline io_prep_* helpers and the same functions
 * (io_setup, io_submit, io_getevents, io_cancel, io_destroy, io_queue_init, io_queue_release),
 * with libaio's names, layouts and signatures. A program written for libaio moves to nvaio by
 * changing three things:
 *
 *   1. #include <nvaio.h> instead of <libaio.h> (never both in one file: the types collide);
 *   2. link libnvaio instead of -laio: statically (what examples/c/build.sh does and CI tests)
 *        gcc -static -I aio/include prog.c \
 *            target/x86_64-unknown-linux-gnu/release/libnvaio.a -lutil -lrt -lpthread -lm -ldl
 *      or, after aio/build-shared.sh, dynamically: gcc -I aio/include prog.c -L DIR -lnvaio.
 *      Never link -laio as well: both libraries define io_setup and friends;
 *   3. open the NVMe namespace with nvaio_open() instead of open(): the controller is bound to
 *      vfio-pci and has no block device. Descriptors nvaio does not own are handed to the kernel's
 *      AIO, so one context can serve namespaces and ordinary files together.
 *
 * Return values are libaio's: a count or 0 on success, a negative errno on failure (errno is not
 * set). The errnos each call returns are listed at its declaration.
 *
 * Threads: as with the kernel, any thread may use any context, but a context's calls run one at a
 * time (io_getevents does not block others while it waits). One context per thread is the fast
 * way, as with the kernel.
 *
 * Reaping in user space: an io_context_t is the address of the context's event ring, a
 * struct aio_ring exactly as the kernel lays it out, so code that reads events from the ring
 * between head and tail keeps working. nvaio polls its queues instead of taking interrupts, so
 * the ring fills while some call runs on the context: io_getevents(ctx, 0, 0, NULL, &zero) moves
 * every finished request into the ring without taking an event (with the kernel that call does
 * nothing, and interrupts fill the ring). examples/c/ring_reap.c shows the pattern.
 *
 * Buffers: the kernel returns an -EFAULT event for a buffer that is unmapped or read-only;
 * nvaio, a library, cannot check that without touching the memory, so it faults (SIGSEGV) as
 * a plain memcpy would. Buffers must stay valid until their event is reaped.
 *
 * fork(): a child does not inherit nvaio's contexts (as with the kernel's AIO: every call on a
 * context made before fork() fails with -EINVAL in the child) nor its controllers (opening one
 * of the parent's namespaces fails; a VFIO device is held by one process). The child's copies
 * are leaked, never torn down, so nothing it does reaches the parent's device. Descriptors from
 * nvaio_open must not be closed with close(): use nvaio_close.
 *
 * Layouts are those of 64-bit little-endian x86 Linux only.
 */
#ifndef NVAIO_H
#define NVAIO_H

#if !defined(__x86_64__) || defined(__ILP32__) || !defined(__BYTE_ORDER__) || \
	__BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "nvaio.h: only x86-64 Linux (LP64, little-endian) is supported"
#endif

#ifdef __LIBAIO_H
#error "nvaio.h replaces <libaio.h>: include one of them, not both"
#endif

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Declared here too, for strict ISO C modes in which the system headers hide them. */
struct iovec;
struct timespec;

/* An AIO context. Its value is the address of the event ring (struct aio_ring). */
typedef struct io_context *io_context_t;

/* Request types, the values of struct iocb's aio_lio_opcode. On its namespaces nvaio serves
 * reads, writes and both syncs, answers POLL as the kernel does for a block device (at once,
 * with the asked-for bits of POLLIN|POLLOUT|POLLRDNORM|POLLWRNORM), and refuses NOOP with
 * -EINVAL, as the kernel does. */
typedef enum io_iocb_cmd {
	IO_CMD_PREAD = 0,
	IO_CMD_PWRITE = 1,
	IO_CMD_FSYNC = 2,
	IO_CMD_FDSYNC = 3,
	/* 4 was IO_CMD_PREADX, never implemented by Linux. */
	IO_CMD_POLL = 5,
	IO_CMD_NOOP = 6,
	IO_CMD_PREADV = 7,
	IO_CMD_PWRITEV = 8
} io_iocb_cmd_t;

/* u.c: a read, write or sync. The kernel calls these aio_buf, aio_nbytes, aio_offset,
 * aio_reserved2, aio_flags and aio_resfd. */
struct io_iocb_common {
	void *buf;
	unsigned long nbytes;
	long long offset;
	long long __pad3; /* reserved: must be 0 */
	unsigned flags;	  /* IOCB_FLAG_* below */
	unsigned resfd;	  /* eventfd signalled on completion when IOCB_FLAG_RESFD is set */
};

/* u.v: a vectored read or write (IO_CMD_PREADV, IO_CMD_PWRITEV). */
struct io_iocb_vector {
	const struct iovec *vec;
	unsigned long nr; /* number of iovecs */
	long long offset;
};

/* u.poll: IO_CMD_POLL, for the kernel's descriptors. */
struct io_iocb_poll {
	int events; /* POLLIN etc. */
	unsigned __pad1; /* must be 0 */
};

/* One request: 64 bytes, the kernel's struct iocb. Fill it with the io_prep_* helpers, which
 * zero it first. The iocb must stay valid and unmodified, and its buffers too, until its event
 * has been reaped: the event's obj is its address. */
struct iocb {
	void *data;		 /* returned in io_event.data */
	unsigned key;		 /* set to 0 by io_submit (the kernel's KIOCB_KEY), see io_submit */
	unsigned aio_rw_flags;	 /* RWF_* flags of preadv2/pwritev2 */
	short aio_lio_opcode;	 /* enum io_iocb_cmd */
	short aio_reqprio;
	int aio_fildes;		 /* from nvaio_open(), or any descriptor the kernel's AIO takes */
	union {
		struct io_iocb_common c;
		struct io_iocb_vector v;
		struct io_iocb_poll poll;
	} u;
};

/* One completion: 32 bytes, the kernel's struct io_event. */
struct io_event {
	void *data;	   /* the iocb's data */
	struct iocb *obj;  /* the iocb */
	unsigned long res; /* bytes transferred, or a negative errno: read it as (long)res */
	unsigned long res2; /* 0 */
};

#ifdef __cplusplus
#define NVAIO_STATIC_ASSERT(cond, msg) static_assert(cond, msg)
#else
#define NVAIO_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#endif
NVAIO_STATIC_ASSERT(sizeof(struct iocb) == 64, "struct iocb must be the kernel's 64 bytes");
NVAIO_STATIC_ASSERT(sizeof(struct io_event) == 32, "struct io_event must be 32 bytes");
NVAIO_STATIC_ASSERT(offsetof(struct iocb, aio_fildes) == 20, "iocb.aio_fildes at 20");
NVAIO_STATIC_ASSERT(offsetof(struct iocb, u.c.buf) == 24, "iocb.u.c.buf at 24");
NVAIO_STATIC_ASSERT(offsetof(struct iocb, u.c.offset) == 40, "iocb.u.c.offset at 40");
NVAIO_STATIC_ASSERT(offsetof(struct iocb, u.v.offset) == 40, "iocb.u.v.offset at 40");
NVAIO_STATIC_ASSERT(offsetof(struct iocb, u.c.flags) == 56, "iocb.u.c.flags at 56");
#undef NVAIO_STATIC_ASSERT

/* u.c.flags bits. */
#define IOCB_FLAG_RESFD (1 << 0)  /* signal u.c.resfd (an eventfd) on completion */
#define IOCB_FLAG_IOPRIO (1 << 1) /* aio_reqprio holds an I/O priority */

/* ---- Preparing requests: each helper zeroes the iocb, then fills it in. ---- */

static inline void nvaio_prep_common_(struct iocb *iocb, int fd, short opcode, void *buf,
				      unsigned long nbytes, long long offset)
{
	memset(iocb, 0, sizeof(*iocb));
	iocb->aio_fildes = fd;
	iocb->aio_lio_opcode = opcode;
	iocb->u.c.buf = buf;
	iocb->u.c.nbytes = nbytes;
	iocb->u.c.offset = offset;
}

/* Read count bytes at offset into buf. */
static inline void io_prep_pread(struct iocb *iocb, int fd, void *buf, size_t count,
				 long long offset)
{
	nvaio_prep_common_(iocb, fd, IO_CMD_PREAD, buf, count, offset);
}

/* Write count bytes from buf at offset. */
static inline void io_prep_pwrite(struct iocb *iocb, int fd, void *buf, size_t count,
				  long long offset)
{
	nvaio_prep_common_(iocb, fd, IO_CMD_PWRITE, buf, count, offset);
}

/* Read into iovcnt buffers, starting at offset. The iovec array is read during io_submit and
 * need not outlive it; the buffers it names must live until the event. */
static inline void io_prep_preadv(struct iocb *iocb, int fd, const struct iovec *iov, int iovcnt,
				  long long offset)
{
	nvaio_prep_common_(iocb, fd, IO_CMD_PREADV, (void *)iov, (unsigned long)iovcnt, offset);
}

/* Write from iovcnt buffers, starting at offset. */
static inline void io_prep_pwritev(struct iocb *iocb, int fd, const struct iovec *iov, int iovcnt,
				   long long offset)
{
	nvaio_prep_common_(iocb, fd, IO_CMD_PWRITEV, (void *)iov, (unsigned long)iovcnt, offset);
}

/* io_prep_preadv with RWF_* flags (RWF_HIPRI, RWF_DSYNC, RWF_SYNC, RWF_NOWAIT, RWF_APPEND).
 * On an nvaio namespace, RWF_DSYNC and RWF_SYNC make the write Force Unit Access. */
static inline void io_prep_preadv2(struct iocb *iocb, int fd, const struct iovec *iov, int iovcnt,
				   long long offset, int flags)
{
	io_prep_preadv(iocb, fd, iov, iovcnt, offset);
	iocb->aio_rw_flags = (unsigned)flags;
}

/* io_prep_pwritev with RWF_* flags. */
static inline void io_prep_pwritev2(struct iocb *iocb, int fd, const struct iovec *iov,
				    int iovcnt, long long offset, int flags)
{
	io_prep_pwritev(iocb, fd, iov, iovcnt, offset);
	iocb->aio_rw_flags = (unsigned)flags;
}

/* Make everything written to fd before this request durable (an NVMe Flush on a namespace). */
static inline void io_prep_fsync(struct iocb *iocb, int fd)
{
	nvaio_prep_common_(iocb, fd, IO_CMD_FSYNC, NULL, 0, 0);
}

/* As io_prep_fsync; data only (the same Flush on a namespace). */
static inline void io_prep_fdsync(struct iocb *iocb, int fd)
{
	nvaio_prep_common_(iocb, fd, IO_CMD_FDSYNC, NULL, 0, 0);
}

/* Wait for poll events on fd. On an nvaio namespace it completes at once, as on a block device:
 * res is the asked-for subset of POLLIN|POLLOUT|POLLRDNORM|POLLWRNORM (-EINVAL if none). */
static inline void io_prep_poll(struct iocb *iocb, int fd, int events)
{
	memset(iocb, 0, sizeof(*iocb));
	iocb->aio_fildes = fd;
	iocb->aio_lio_opcode = IO_CMD_POLL;
	iocb->u.poll.events = events;
}

/* Signal the eventfd eventfd (write 1 to it) when the request completes. Call after io_prep_*. */
static inline void io_set_eventfd(struct iocb *iocb, int eventfd)
{
	iocb->u.c.flags |= IOCB_FLAG_RESFD;
	iocb->u.c.resfd = (unsigned)eventfd;
}

/* ---- The AIO calls ---- */

/* Create a context for up to maxevents requests in flight and store it in *ctxp, which must be 0
 * (NULL) on entry. As with the kernel, whose count is unsigned and to which libaio passes the int
 * as is, a negative maxevents is a very large count: -1 is -EINVAL (too large), INT_MIN -EAGAIN
 * (the kernel's doubling wraps it to 0). Returns 0, or -EFAULT (ctxp NULL; checked first),
 * -EINVAL (*ctxp not 0, maxevents 0 or too large), -EAGAIN (system-wide event limit,
 * /proc/sys/fs/aio-max-nr), -ENOMEM. */
int io_setup(int maxevents, io_context_t *ctxp);

/* Wait for the context's requests in flight, then release it; unreaped events are dropped and
 * later calls with ctx fail with -EINVAL. Returns 0, or -EINVAL (ctx not a live context), -EIO
 * (nvaio failed internally in this context, which is then released without waiting). */
int io_destroy(io_context_t ctx);

/* Queue nr requests (nr larger than the context's ring is cut to it, as the kernel does);
 * returns how many were queued, which may be fewer (the next one was refused, or was a NULL
 * pointer: the rest are not looked at). Fails only if none was queued: -EINVAL (nr < 0, ctx not
 * a live context, bad opcode, reserved field not 0, negative offset, too many iovecs), -EFAULT
 * (ios NULL, or ios[0] NULL or not 8-byte aligned), -EAGAIN (context full), -EBADF (descriptor
 * not open, or open without the access the request needs, or its controller was opened by the
 * parent of this forked process), -EBUSY (the controller has no I/O queue left for this context:
 * each context takes one queue pair per controller, and other contexts hold them all; waiting
 * will not help, destroying another context will), -EOPNOTSUPP (unknown aio_rw_flags),
 * or an errno of the kernel's io_submit for a descriptor nvaio hands to the kernel. nr == 0
 * returns 0 (ios is not read). Errors found after queueing come back as events with a negative
 * res.
 * The key field is set to 0 exactly as the kernel sets it: in every queued iocb, and in a
 * refused one that got past the checks the kernel makes before storing it (reserved field,
 * negative size, a free slot, an open descriptor, an eventfd for IOCB_FLAG_RESFD); an iocb
 * refused by one of those, or not looked at, keeps its key.
 * Unlike the kernel, nvaio refuses an iocb whose address is not 8-byte aligned (-EFAULT, or the
 * count so far): it identifies requests by their iocb's address and reads iocbs in place. */
int io_submit(io_context_t ctx, long nr, struct iocb *ios[]);

/* Start cancelling the request submitted with iocb; the outcome arrives as its event (res
 * -ECANCELED if it was stopped). evt is not written. As with the kernel, iocb's key is checked
 * before ctx: -EFAULT (iocb NULL), then -EINVAL (key not 0: never submitted). Returns
 * -EINPROGRESS when cancellation started (the usual outcome), or -EFAULT, -EINVAL (key not 0;
 * ctx not live; iocb not submitted to ctx or already completed; a kernel file's request the
 * kernel cannot cancel). */
int io_cancel(io_context_t ctx, struct iocb *iocb, struct io_event *evt);

/* Wait until at least min_nr events are available or timeout has passed, and move up to nr of
 * them into events. With nr == 0 it only lets nvaio move finished requests into the ring (see
 * above); with min_nr == 0 it returns after one look, whatever the timeout.
 * The timeout is relative and, as with the kernel, not validated: it is taken as
 * tv_sec * 1000000000 + tv_nsec nanoseconds. NULL waits without limit; a total of 0 does not
 * wait; a negative total also waits without limit (only a signal ends it); so {0, 1000000000}
 * waits one second and {1, -999000000} one millisecond.
 * A signal whose handler runs during the wait ends it, as with the kernel: the call returns the
 * events it has, or -EINTR if none, whether or not the handler has SA_RESTART. (While waiting,
 * nvaio holds back the thread's signals except SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP and SIGSYS
 * and lets them in while it sleeps, so none is missed; the mask is restored on return. A signal
 * in the first 200 microseconds of a wait with requests in flight, which nvaio spends spinning,
 * does not end it.) In interrupt and hybrid modes (NVAIO_MODE) the wait sleeps until a
 * completion interrupt.
 * Returns how many events were stored (fewer than min_nr if the timeout passed or a signal
 * came), or -EINVAL (ctx not live; min_nr or nr negative; min_nr > nr), -EINTR, -EFAULT (events
 * NULL with nr > 0, once there is an event to store: it stays in the ring; until then the call
 * waits or returns 0 as usual). */
int io_getevents(io_context_t ctx, long min_nr, long nr, struct io_event *events,
		 struct timespec *timeout);

/* libaio's other names for io_setup and io_destroy; same arguments and errors. */
int io_queue_init(int maxevents, io_context_t *ctxp);
int io_queue_release(io_context_t ctx);

/* ---- nvaio's own calls ---- */

/* Open namespace nsid of the NVMe controller at PCI address pci_addr ("0000:00:10.0" or
 * "00:10.0"), bound to vfio-pci, with O_RDONLY, O_WRONLY or O_RDWR. The first open of a
 * controller brings it up (this takes a moment); later opens share it. Returns a descriptor to
 * put in iocbs' aio_fildes (a real descriptor number, so it never collides with the program's
 * other files), or -EFAULT (pci_addr NULL), -EINVAL (bad flags or address), -ENODEV (cannot open
 * the controller through VFIO: not bound to vfio-pci, no permission on /dev/vfio, too low a
 * locked-memory limit...), -EIO (the controller failed to come up), -ENXIO (no such namespace),
 * -EMFILE (out of descriptors). On failure nvaio_last_error() tells the cause and the fix. */
int nvaio_open(const char *pci_addr, unsigned nsid, int flags);

/* Close a descriptor from nvaio_open; requests already submitted on it still complete. Returns
 * 0, or -EBADF (not a descriptor nvaio_open returned). Do not close() it yourself. */
int nvaio_close(int fd);

/* Register len bytes at buf with ctx for zero-copy I/O: reads and writes whose buffer lies
 * entirely inside it move data straight between the device and this memory (it is mapped for
 * DMA, and so pinned). The memory must stay allocated until nvaio_unregister_buffer or
 * io_destroy. Returns 0, -EINVAL (not a live context; empty, wrapping or overlapping range) or
 * -ENOMEM (the IOMMU mapping failed: locked-memory limit or IOVA space). */
int nvaio_register_buffer(io_context_t ctx, void *buf, size_t len);

/* Undo nvaio_register_buffer for the buffer registered at buf. Returns 0, -EINVAL (nothing
 * registered there) or -EBUSY (I/O in flight on the context). */
int nvaio_unregister_buffer(io_context_t ctx, void *buf);

/* What this thread's last failed nvaio_open ran into, as text naming the cause and the fix; ""
 * if nothing failed. Valid until this thread's next failing nvaio_open; never NULL. */
const char *nvaio_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* NVAIO_H */
