/*
 * kernel_bench: the Linux kernel's side of nvaio's benchmark comparison.
 *
 * Keeps QD requests in flight on a block device through io_uring with O_DIRECT, either with
 * interrupt completions ("irq") or with the ring polling the device's poll queue ("poll",
 * IORING_SETUP_IOPOLL), and reports the same figures as `nvaio bench`, under the same JSON
 * names: IOPS, bandwidth, latency percentiles in microseconds, the process's CPU time
 * (getrusage) and IOPS per CPU-second. It adds the guest-wide busy CPU time over the measured
 * window (elapsed x CPUs - idle - iowait, from /proc/stat) and IOPS per busy CPU-second, since
 * interrupt and softirq work of the kernel path need not be charged to the process.
 *
 * Usage: kernel_bench DEVICE RW BS QD DURATION MODE [options]
 *        kernel_bench DEVICE --fill [--bs SIZE] [--qd N] [--size SIZE] [--json]
 *        kernel_bench --cpu-window DELAY LENGTH
 * (see usage() below). Built statically against liburing by bench/build.sh so that it runs in
 * the busybox guest of ci/qemu-run.
 *
 * Every buffer, the latency histogram and the ring are set up before the timed loop; per I/O
 * the loop writes one SQE and one timestamp and reads the clock once per batch of completions,
 * as nvaio's bench does, so the two measure the same thing.
 *
 * Exit status: 0 on success, 1 if any I/O failed (the report is printed first), 2 on a usage
 * or setup error, 3 if the watchdog fired.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/fs.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include <liburing.h>

#define PROG "kernel_bench"

/* A stuck device is reported after this long without any completion. */
#define STALL_NS (30ull * 1000000000ull)
/* Longest single wait for a completion in irq mode; the loop re-checks the clock after it. */
#define WAIT_SLICE_NS (100ull * 1000000ull)
/* Slot buffers start on page boundaries (O_DIRECT needs at least the logical block size). */
#define SLOT_ALIGN 4096ull
/* Most memory the slot buffers may take. */
#define MAX_BUFFERS (1ull << 30)

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void die(const char *fmt, ...)
{
	va_list ap;
	fputs(PROG ": ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(2);
}

static void warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void warn(const char *fmt, ...)
{
	va_list ap;
	fputs(PROG ": warning: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static uint64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double secs(uint64_t ns) { return (double)ns / 1e9; }

static double round3(double x)
{
	/* Same rounding as nvaio bench's JSON, so equal values print equally. */
	double r = x * 1000.0;
	r = r < 0 ? -(double)(int64_t)(-r + 0.5) : (double)(int64_t)(r + 0.5);
	return r / 1000.0;
}

/* ------------------------------------------------------------------------------------------ */
/* Latency histogram: log-linear buckets, allocated statically.
 *
 * Values below 2^(SUBB+1) get a bucket each; every higher power-of-two range [2^k, 2^(k+1)) is
 * cut into 2^SUBB equal parts. A bucket is then at most 1/128 of its values wide. Percentiles
 * are taken by nearest rank and reported as the middle of their bucket, clamped to the recorded
 * min and max: the definition nvaio bench uses, so the two report comparable numbers. */
#define SUBB 7u
#define NSUB (1ull << SUBB)
#define NBUCKETS ((64u - SUBB + 1u) * NSUB)

struct hist {
	uint64_t count[NBUCKETS];
	uint64_t n, min, max;
	long double sum;
};

static unsigned hist_bucket(uint64_t v)
{
	if (v < 2 * NSUB)
		return (unsigned)v;
	unsigned top = 63u - (unsigned)__builtin_clzll(v); /* index of the highest set bit */
	unsigned shift = top - SUBB;                        /* >= 1 here */
	/* (v >> shift) keeps SUBB+1 bits: in [NSUB, 2*NSUB). */
	return shift * (unsigned)NSUB + (unsigned)(v >> shift);
}

static void hist_range(unsigned b, uint64_t *lo, uint64_t *hi)
{
	if (b < 2 * NSUB) {
		*lo = *hi = b;
		return;
	}
	unsigned shift = b / (unsigned)NSUB - 1u;
	uint64_t mant = (uint64_t)(b % NSUB) + NSUB;
	*lo = mant << shift;
	*hi = *lo + ((1ull << shift) - 1u);
}

static void hist_add(struct hist *h, uint64_t v)
{
	h->count[hist_bucket(v)]++;
	if (h->n == 0 || v < h->min)
		h->min = v;
	if (v > h->max)
		h->max = v;
	h->n++;
	h->sum += (long double)v;
}

static uint64_t hist_pct(const struct hist *h, double p)
{
	if (h->n == 0)
		return 0;
	double want = p / 100.0 * (double)h->n - 1e-9;
	uint64_t rank = want <= 1.0 ? 1 : (uint64_t)want + ((double)(uint64_t)want < want ? 1 : 0);
	if (rank > h->n)
		rank = h->n;
	uint64_t seen = 0;
	for (unsigned b = 0; b < NBUCKETS; b++) {
		seen += h->count[b];
		if (seen >= rank) {
			uint64_t lo, hi;
			hist_range(b, &lo, &hi);
			uint64_t mid = lo + (hi - lo) / 2;
			if (mid < h->min)
				mid = h->min;
			if (mid > h->max)
				mid = h->max;
			return mid;
		}
	}
	return h->max;
}

static struct hist lat;

/* ------------------------------------------------------------------------------------------ */
/* Offsets: splitmix64 for random ones. */

static uint64_t rng_state;

static uint64_t rng_next(void)
{
	uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* Uniform in [0, n): the high half of a 64x64 product, no division. */
static uint64_t rng_below(uint64_t n)
{
	return (uint64_t)(((unsigned __int128)rng_next() * n) >> 64);
}

/* ------------------------------------------------------------------------------------------ */
/* CPU accounting. */

static uint64_t rusage_ns(int which_user)
{
	struct rusage ru;
	if (getrusage(RUSAGE_SELF, &ru) != 0)
		return 0;
	struct timeval t = which_user ? ru.ru_utime : ru.ru_stime;
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_usec * 1000ull;
}

/* One reading of the guest's CPU counters. In the TCG guest user and system ticks are sampled
 * and far too low, while idle and iowait are exact, so busy time is derived from those. */
struct cpustat {
	bool ok;
	uint64_t at_ns;       /* CLOCK_MONOTONIC when read */
	unsigned long long idle, iowait; /* USER_HZ ticks, all CPUs */
	unsigned ncpu;
};

static struct cpustat cpustat_read(void)
{
	struct cpustat s = {0};
	FILE *f = fopen("/proc/stat", "re");
	if (!f)
		return s;
	char line[512];
	bool total = false;
	while (fgets(line, sizeof line, f)) {
		if (strncmp(line, "cpu ", 4) == 0) {
			unsigned long long v[5];
			if (sscanf(line + 4, "%llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
				   &v[4]) == 5) {
				s.idle = v[3];
				s.iowait = v[4];
				total = true;
			}
		} else if (strncmp(line, "cpu", 3) == 0 && line[3] >= '0' && line[3] <= '9') {
			s.ncpu++;
		}
	}
	fclose(f);
	s.at_ns = mono_ns();
	s.ok = total && s.ncpu > 0;
	return s;
}

struct busy {
	bool ok;
	double window_s, busy_cpu_s, idle_s, iowait_s;
	unsigned ncpu;
};

static struct busy busy_between(struct cpustat a, struct cpustat b)
{
	struct busy r = {0};
	if (!a.ok || !b.ok || a.ncpu != b.ncpu || b.at_ns <= a.at_ns)
		return r;
	long hz = sysconf(_SC_CLK_TCK);
	if (hz <= 0)
		hz = 100;
	r.ok = true;
	r.ncpu = a.ncpu;
	r.window_s = secs(b.at_ns - a.at_ns);
	r.idle_s = (double)(b.idle - a.idle) / (double)hz;
	r.iowait_s = (double)(b.iowait - a.iowait) / (double)hz;
	r.busy_cpu_s = r.window_s * r.ncpu - r.idle_s - r.iowait_s;
	if (r.busy_cpu_s < 0)
		r.busy_cpu_s = 0;
	return r;
}

/* ------------------------------------------------------------------------------------------ */
/* Arguments. */

enum rw { RW_READ, RW_WRITE, RW_RANDREAD, RW_RANDWRITE };
static const char *const rw_names[] = {"read", "write", "randread", "randwrite"};

struct opts {
	const char *dev;
	enum rw rw;
	uint64_t bs;
	unsigned qd;
	double duration, warmup;
	bool poll;
	bool json;
	bool fill;
	bool tuned;
	uint64_t size; /* 0: whole device */
};

static void usage(FILE *out)
{
	fputs("usage: " PROG " DEVICE RW BS QD DURATION MODE [--size SIZE] [--warmup SECS] [--tuned] [--json]\n"
	      "       " PROG " DEVICE --fill [--bs SIZE] [--qd N] [--size SIZE] [--json]\n"
	      "       " PROG " --cpu-window DELAY LENGTH\n"
	      "\n"
	      "  DEVICE     block device (or file) opened with O_DIRECT\n"
	      "  RW         randread | randwrite | read | write\n"
	      "  BS         bytes per I/O, k/m/g suffixes are powers of 1024 (4k)\n"
	      "  QD         requests kept in flight\n"
	      "  DURATION   seconds to measure (fractions allowed)\n"
	      "  MODE       irq: plain io_uring, completions by interrupt;\n"
	      "             poll: IORING_SETUP_IOPOLL (needs the kernel's nvme.poll_queues=N>0;\n"
	      "             checked in /sys/block/DEV/queue/io_poll)\n"
	      "  --size     use only the first SIZE bytes of the device (default: all of it)\n"
	      "  --warmup   seconds run before measuring (0.5, like nvaio bench)\n"
	      "  --tuned    the kernel's faster options: registered file and buffers (READ_FIXED),\n"
	      "             IORING_SETUP_SINGLE_ISSUER, and DEFER_TASKRUN in irq mode\n"
	      "  --json     one JSON object on stdout (field names as nvaio bench --json)\n"
	      "  --fill     write the region once, sequentially (default 1m x QD 8), then fsync:\n"
	      "             so that later reads hit allocated blocks\n"
	      "  --cpu-window DELAY LENGTH\n"
	      "             sleep DELAY s, then print as JSON the guest-wide CPU time spent busy\n"
	      "             over the next LENGTH s (elapsed x CPUs - idle - iowait, /proc/stat)\n"
	      "\n"
	      "Exit status: 0 ok, 1 some I/O failed (after the report), 2 usage or setup error,\n"
	      "3 the watchdog fired.\n",
	      out);
}

static uint64_t parse_size(const char *s, const char *what)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || end == s || s[0] == '-')
		die("%s: '%s' is not a size (e.g. 4096, 4k, 1m)", what, s);
	unsigned shift = 0;
	switch (*end) {
	case '\0': break;
	case 'k': case 'K': shift = 10; end++; break;
	case 'm': case 'M': shift = 20; end++; break;
	case 'g': case 'G': shift = 30; end++; break;
	default: die("%s: '%s' is not a size (e.g. 4096, 4k, 1m)", what, s);
	}
	if (*end == 'i' || *end == 'b' || *end == 'B') /* tolerate 4KiB, 4kB, 4KB */
		end += (*end == 'i' && (end[1] == 'B' || end[1] == 'b')) ? 2 : 1;
	if (*end != '\0')
		die("%s: '%s' is not a size (e.g. 4096, 4k, 1m)", what, s);
	if (shift && v > (ULLONG_MAX >> shift))
		die("%s: '%s' is too large", what, s);
	if (v == 0)
		die("%s must not be zero", what);
	return (uint64_t)v << shift;
}

static double parse_secs(const char *s, const char *what, bool zero_ok)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (errno || end == s || *end != '\0' || !(v >= 0.0) || v > 86400.0 || (!zero_ok && v == 0.0))
		die("%s: '%s' is not a %s number of seconds", what, s, zero_ok ? "non-negative" : "positive");
	return v;
}

static unsigned parse_qd(const char *s)
{
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, 10);
	if (errno || end == s || *end != '\0' || s[0] == '-' || v < 1 || v > 4096)
		die("QD: '%s' is not a number in 1..4096", s);
	return (unsigned)v;
}

/* ------------------------------------------------------------------------------------------ */
/* The device. */

struct device {
	int fd;
	uint64_t bytes;
	unsigned lbs;
	bool is_block;
	char sysname[64]; /* e.g. nvme0n1; empty for a file */
};

static void device_open(struct device *d, const char *path, bool write)
{
	memset(d, 0, sizeof *d);
	d->fd = open(path, (write ? O_RDWR : O_RDONLY) | O_DIRECT | O_CLOEXEC);
	if (d->fd < 0)
		die("cannot open %s with O_DIRECT: %s", path, strerror(errno));
	struct stat st;
	if (fstat(d->fd, &st) != 0)
		die("cannot stat %s: %s", path, strerror(errno));
	if (S_ISBLK(st.st_mode)) {
		d->is_block = true;
		if (ioctl(d->fd, BLKGETSIZE64, &d->bytes) != 0)
			die("BLKGETSIZE64 on %s: %s", path, strerror(errno));
		int lbs = 0;
		if (ioctl(d->fd, BLKSSZGET, &lbs) != 0 || lbs <= 0)
			die("BLKSSZGET on %s: %s", path, strerror(errno));
		d->lbs = (unsigned)lbs;
		/* The sysfs name, found through the device number (works for any /dev path). */
		char link[PATH_MAX], target[PATH_MAX];
		snprintf(link, sizeof link, "/sys/dev/block/%u:%u", major(st.st_rdev), minor(st.st_rdev));
		ssize_t n = readlink(link, target, sizeof target - 1);
		if (n > 0) {
			target[n] = '\0';
			const char *base = strrchr(target, '/');
			snprintf(d->sysname, sizeof d->sysname, "%.63s", base ? base + 1 : target);
		}
	} else if (S_ISREG(st.st_mode)) {
		d->bytes = (uint64_t)st.st_size;
		d->lbs = 512;
	} else {
		die("%s is neither a block device nor a regular file", path);
	}
	if (d->bytes == 0)
		die("%s is empty", path);
}

/* "1", "0", or NULL when the file is missing. For a partition, the queue is its disk's. */
static const char *read_io_poll(const struct device *d, char *buf, size_t len)
{
	if (!d->sysname[0])
		return NULL;
	char path[256];
	snprintf(path, sizeof path, "/sys/class/block/%s/queue/io_poll", d->sysname);
	FILE *f = fopen(path, "re");
	if (!f) {
		snprintf(path, sizeof path, "/sys/class/block/%s/../queue/io_poll", d->sysname);
		f = fopen(path, "re");
	}
	if (!f)
		return NULL;
	if (!fgets(buf, (int)len, f)) {
		fclose(f);
		return NULL;
	}
	fclose(f);
	buf[strcspn(buf, "\n")] = '\0';
	return buf;
}

/* ------------------------------------------------------------------------------------------ */
/* Watchdog: whatever happens, the process ends. (A wait inside the kernel's IOPOLL loop is
 * bounded by the block layer's own I/O timeout; the signal acts when it returns.) */

static void on_alarm(int sig)
{
	(void)sig;
	static const char msg[] = PROG ": error: watchdog: the run took far longer than asked; giving up\n";
	ssize_t ignored = write(2, msg, sizeof msg - 1);
	(void)ignored;
	_exit(3);
}

static void arm_watchdog(double expected_s)
{
	signal(SIGALRM, on_alarm);
	double limit = expected_s * 2.0 + 60.0;
	alarm(limit > 86400.0 ? 86400u : (unsigned)limit);
}

/* ------------------------------------------------------------------------------------------ */
/* --cpu-window: a sampler that runs beside another benchmark (nvaio bench) and measures the
 * guest-wide busy time over a window inside that benchmark's measured period. */

static void sleep_s(double s)
{
	struct timespec ts = {.tv_sec = (time_t)s, .tv_nsec = (long)((s - (double)(time_t)s) * 1e9)};
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
	}
}

static int cpu_window(double delay, double length)
{
	arm_watchdog(delay + length);
	sleep_s(delay);
	struct cpustat a = cpustat_read();
	sleep_s(length);
	struct cpustat b = cpustat_read();
	struct busy w = busy_between(a, b);
	if (!w.ok)
		die("cannot read the CPU counters in /proc/stat");
	printf("{\"window_s\":%.3f,\"guest_cpus\":%u,\"guest_busy_cpu_s\":%.3f,\"guest_idle_s\":%.3f,"
	       "\"guest_iowait_s\":%.3f}\n",
	       round3(w.window_s), w.ncpu, round3(w.busy_cpu_s), round3(w.idle_s), round3(w.iowait_s));
	return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* The run. */

struct result {
	uint64_t ios, errors, elapsed_ns, cpu_user_ns, cpu_sys_ns;
	int first_error_res;
	uint64_t first_error_off;
	bool have_first_error;
	struct busy busy;
	uint64_t region;
	const char *io_poll;      /* sysfs value, NULL if unknown */
	int poll_effective;       /* -1: not asked for; 0/1 */
	unsigned ring_flags;
};

static void print_str(const char *s)
{
	putchar('"');
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			printf("\\%c", c);
		else if (c < 0x20)
			printf("\\u%04x", c);
		else
			putchar(c);
	}
	putchar('"');
}

static void report(const struct opts *o, const struct device *d, const struct result *r)
{
	double el = secs(r->elapsed_ns);
	double iops = el > 0 ? (double)r->ios / el : 0;
	double bytes = (double)r->ios * (double)o->bs;
	double mib = el > 0 ? bytes / (1024.0 * 1024.0) / el : 0;
	double mb = el > 0 ? bytes / 1e6 / el : 0;
	double cpu = secs(r->cpu_user_ns + r->cpu_sys_ns);
	double per_cpu = cpu > 0 ? (double)r->ios / cpu : 0;
	double per_busy = r->busy.ok && r->busy.busy_cpu_s > 0 ? (double)r->ios / r->busy.busy_cpu_s : 0;
	static const char *const names[] = {"min", "mean", "p50", "p90", "p99", "p99_9", "max"};
	double l[7] = {
		(double)(lat.n ? lat.min : 0) / 1000.0,
		lat.n ? (double)(lat.sum / (long double)lat.n) / 1000.0 : 0,
		(double)hist_pct(&lat, 50.0) / 1000.0,
		(double)hist_pct(&lat, 90.0) / 1000.0,
		(double)hist_pct(&lat, 99.0) / 1000.0,
		(double)hist_pct(&lat, 99.9) / 1000.0,
		(double)lat.max / 1000.0,
	};
	char err[160] = "";
	if (r->have_first_error) {
		if (r->first_error_res < 0)
			snprintf(err, sizeof err, "%s at byte offset %" PRIu64, strerror(-r->first_error_res),
				 r->first_error_off);
		else
			snprintf(err, sizeof err, "short transfer of %d bytes at byte offset %" PRIu64,
				 r->first_error_res, r->first_error_off);
	}
	const char *mode = o->fill ? "fill" : o->poll ? "poll" : "irq";

	if (o->json) {
		printf("{\"driver\":\"kernel\",\"engine\":\"io_uring\",\"device\":");
		print_str(o->dev);
		printf(",\"block_size\":%u,\"rw\":\"%s\",\"bs\":%" PRIu64 ",\"qd\":%u,\"size\":%" PRIu64,
		       d->lbs, rw_names[o->rw], o->bs, o->qd, r->region);
		printf(",\"mode\":\"%s\",\"tuned\":%s,\"ring_flags\":%u", mode, o->tuned ? "true" : "false",
		       r->ring_flags);
		printf(",\"io_poll\":");
		if (r->io_poll)
			print_str(r->io_poll);
		else
			printf("null");
		printf(",\"poll_effective\":%s",
		       r->poll_effective < 0 ? "null" : r->poll_effective ? "true" : "false");
		printf(",\"warmup_s\":%.3f,\"duration_s\":%.3f,\"ios\":%" PRIu64 ",\"bytes\":%.0f",
		       round3(o->fill ? 0 : o->warmup), round3(el), r->ios, bytes);
		printf(",\"iops\":%.3f,\"mib_per_s\":%.3f,\"mb_per_s\":%.3f", round3(iops), round3(mib),
		       round3(mb));
		printf(",\"latency_us\":{");
		for (int i = 0; i < 7; i++)
			printf("%s\"%s\":%.3f", i ? "," : "", names[i], round3(l[i]));
		printf("}");
		printf(",\"cpu_user_s\":%.3f,\"cpu_sys_s\":%.3f,\"cpu_s\":%.3f,\"iops_per_cpu_s\":%.3f",
		       round3(secs(r->cpu_user_ns)), round3(secs(r->cpu_sys_ns)), round3(cpu),
		       round3(per_cpu));
		if (r->busy.ok)
			printf(",\"guest_cpus\":%u,\"guest_busy_cpu_s\":%.3f,\"iops_per_busy_cpu_s\":%.3f",
			       r->busy.ncpu, round3(r->busy.busy_cpu_s), round3(per_busy));
		else
			printf(",\"guest_cpus\":null,\"guest_busy_cpu_s\":null,\"iops_per_busy_cpu_s\":null");
		printf(",\"errors\":%" PRIu64 ",\"first_error\":", r->errors);
		if (r->have_first_error)
			print_str(err);
		else
			printf("null");
		printf("}\n");
	} else {
		printf("kernel io_uring %s on %s: %s, bs %" PRIu64 ", qd %u, region %" PRIu64
		       " bytes (%u-byte blocks)%s\n",
		       mode, o->dev, rw_names[o->rw], o->bs, o->qd, r->region, d->lbs,
		       o->tuned ? ", tuned" : "");
		if (r->poll_effective == 0)
			printf("  POLLING NOT EFFECTIVE: io_poll is %s; completions came by interrupt\n",
			       r->io_poll ? r->io_poll : "unknown");
		printf("  ios:        %" PRIu64 " in %.2f s\n", r->ios, el);
		printf("  iops:       %.0f\n", iops);
		printf("  bandwidth:  %.2f MiB/s (%.2f MB/s)\n", mib, mb);
		printf("  latency us:");
		for (int i = 0; i < 7; i++)
			printf(" %s %.1f", i == 5 ? "p99.9" : names[i], l[i]);
		printf("\n");
		printf("  cpu:        %.2f s (user %.2f, sys %.2f), %.0f%% of one CPU, %.0f IOPS per CPU-second\n",
		       cpu, secs(r->cpu_user_ns), secs(r->cpu_sys_ns), el > 0 ? cpu / el * 100 : 0, per_cpu);
		if (r->busy.ok)
			printf("  guest busy: %.2f CPU-s of %u CPUs x %.2f s, %.0f IOPS per busy CPU-second\n",
			       r->busy.busy_cpu_s, r->busy.ncpu, r->busy.window_s, per_busy);
		printf("  errors:     %" PRIu64 "%s%s%s\n", r->errors, r->have_first_error ? " (first: " : "",
		       err, r->have_first_error ? ")" : "");
	}
	fflush(stdout);
}

static int run(const struct opts *o)
{
	bool write = o->rw == RW_WRITE || o->rw == RW_RANDWRITE;
	struct device d;
	device_open(&d, o->dev, write);

	if (o->bs % d.lbs != 0)
		die("BS %" PRIu64 " is not a multiple of %s's %u-byte logical block size", o->bs, o->dev, d.lbs);
	if (o->bs > (1ull << 30))
		die("BS %" PRIu64 " is larger than 1 GiB", o->bs);
	uint64_t size = o->size ? o->size : d.bytes;
	if (size > d.bytes)
		die("--size %" PRIu64 " is larger than %s (%" PRIu64 " bytes)", size, o->dev, d.bytes);
	uint64_t region = size / o->bs * o->bs;
	if (region == 0)
		die("the region (%" PRIu64 " bytes) is smaller than one I/O of %" PRIu64 " bytes", size, o->bs);
	uint64_t nslots_region = region / o->bs;
	uint64_t stride = (o->bs + SLOT_ALIGN - 1) / SLOT_ALIGN * SLOT_ALIGN;
	if (stride * o->qd > MAX_BUFFERS)
		die("QD %u x BS %" PRIu64 " needs more than 1 GiB of buffers", o->qd, o->bs);

	struct result r = {0};
	r.region = region;
	r.poll_effective = -1;
	char io_poll_buf[16];
	r.io_poll = read_io_poll(&d, io_poll_buf, sizeof io_poll_buf);
	if (o->poll) {
		r.poll_effective = r.io_poll && strcmp(r.io_poll, "1") == 0;
		if (!r.poll_effective)
			warn("polling is not effective on %s: queue/io_poll is %s (boot the kernel with "
			     "nvme.poll_queues=1); IOPOLL falls back to interrupt completions",
			     o->dev, r.io_poll ? r.io_poll : "missing");
	}

	/* Buffers, one per slot, and the per-slot bookkeeping: all before the ring and the clock. */
	unsigned char *buf;
	if (posix_memalign((void **)&buf, SLOT_ALIGN, stride * o->qd) != 0)
		die("cannot allocate %" PRIu64 " bytes of buffers", stride * o->qd);
	if (write && !o->fill) {
		uint64_t saved = rng_state;
		rng_state = 0x243f6a8885a308d3ull;
		for (uint64_t i = 0; i + 8 <= stride * o->qd; i += 8) {
			uint64_t v = rng_next();
			memcpy(buf + i, &v, 8);
		}
		rng_state = saved;
	} else {
		memset(buf, 0, stride * o->qd);
	}
	uint64_t *started = calloc(o->qd, sizeof *started);
	uint64_t *slot_off = calloc(o->qd, sizeof *slot_off);
	unsigned *free_slots = calloc(o->qd, sizeof *free_slots);
	if (!started || !slot_off || !free_slots)
		die("out of memory");
	unsigned nfree = o->qd;
	for (unsigned i = 0; i < o->qd; i++)
		free_slots[i] = o->qd - 1 - i;

	/* The ring. */
	unsigned entries = 1;
	while (entries < o->qd)
		entries <<= 1;
	unsigned flags = 0;
	if (o->poll)
		flags |= IORING_SETUP_IOPOLL;
	if (o->tuned) {
		flags |= IORING_SETUP_SINGLE_ISSUER;
		if (!o->poll)
			flags |= IORING_SETUP_DEFER_TASKRUN;
	}
	struct io_uring ring;
	int ret = io_uring_queue_init(entries, &ring, flags);
	if (ret < 0)
		die("io_uring_queue_init(%u entries, flags 0x%x): %s%s", entries, flags, strerror(-ret),
		    ret == -EINVAL && o->tuned ? " (--tuned needs Linux 6.1)" : "");
	r.ring_flags = flags;
	if (!o->poll && !(ring.features & IORING_FEAT_EXT_ARG))
		die("this kernel's io_uring cannot wait with a timeout (IORING_FEAT_EXT_ARG, Linux 5.11)");
	int sqe_fd = d.fd;
	if (o->tuned) {
		struct iovec iov = {.iov_base = buf, .iov_len = stride * o->qd};
		ret = io_uring_register_buffers(&ring, &iov, 1);
		if (ret < 0)
			die("io_uring_register_buffers: %s", strerror(-ret));
		ret = io_uring_register_files(&ring, &d.fd, 1);
		if (ret < 0)
			die("io_uring_register_files: %s", strerror(-ret));
		sqe_fd = 0;
	}

	double expected = o->fill ? (double)region / 1e6 : o->warmup + o->duration;
	arm_watchdog(expected);

	uint64_t seq_next = 0;
	uint64_t issued_fill = 0; /* --fill: I/Os handed out; stops at nslots_region */
	uint64_t t0 = mono_ns();
	uint64_t measure_from = o->fill ? t0 : t0 + (uint64_t)(o->warmup * 1e9);
	uint64_t stop_at = o->fill ? UINT64_MAX : measure_from + (uint64_t)(o->duration * 1e9);
	bool counting = false, finished = false;
	uint64_t win_start = 0, win_end = 0, u0 = 0, s0 = 0, u1 = 0, s1 = 0;
	struct cpustat c0 = {0}, c1 = {0};
	uint64_t last_progress = t0;
	struct __kernel_timespec slice = {.tv_sec = 0, .tv_nsec = (long long)WAIT_SLICE_NS};

	for (;;) {
		uint64_t now = mono_ns();
		if (!counting && !finished && now >= measure_from) {
			counting = true;
			c0 = cpustat_read();
			u0 = rusage_ns(1);
			s0 = rusage_ns(0);
			win_start = mono_ns();
			now = win_start;
		}
		if (o->fill && !finished && issued_fill == nslots_region)
			stop_at = now; /* every block handed out: finish when they are back */
		if (!finished && now >= stop_at) {
			finished = true;
			win_end = now;
			u1 = rusage_ns(1);
			s1 = rusage_ns(0);
			c1 = cpustat_read();
			counting = o->fill; /* --fill counts until the last write is back */
		}
		unsigned in_flight = o->qd - nfree;
		if (finished && in_flight == 0)
			break;

		/* Refill every free slot. */
		unsigned queued = 0;
		while (!finished && nfree > 0 && !(o->fill && issued_fill == nslots_region)) {
			struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
			if (!sqe)
				break;
			unsigned slot = free_slots[--nfree];
			uint64_t off;
			if (o->rw == RW_RANDREAD || o->rw == RW_RANDWRITE) {
				off = rng_below(nslots_region) * o->bs;
			} else {
				off = seq_next;
				seq_next += o->bs;
				if (seq_next >= region)
					seq_next = 0;
			}
			void *p = buf + (uint64_t)slot * stride;
			if (o->tuned) {
				if (write)
					io_uring_prep_write_fixed(sqe, sqe_fd, p, (unsigned)o->bs, off, 0);
				else
					io_uring_prep_read_fixed(sqe, sqe_fd, p, (unsigned)o->bs, off, 0);
				sqe->flags |= IOSQE_FIXED_FILE;
			} else if (write) {
				io_uring_prep_write(sqe, sqe_fd, p, (unsigned)o->bs, off);
			} else {
				io_uring_prep_read(sqe, sqe_fd, p, (unsigned)o->bs, off);
			}
			io_uring_sqe_set_data64(sqe, slot);
			started[slot] = now;
			slot_off[slot] = off;
			issued_fill++;
			queued++;
		}
		(void)queued;

		/* Submit and wait for at least one completion, in one system call. */
		if (o->poll) {
			/* IOPOLL: the kernel spins on the poll queue until a completion is there (or
			 * it must reschedule). No timeout is possible on this path; see the watchdog. */
			ret = io_uring_submit_and_wait(&ring, 1);
		} else {
			struct io_uring_cqe *cqe;
			ret = io_uring_submit_and_wait_timeout(&ring, &cqe, 1, &slice, NULL);
		}
		if (ret < 0 && ret != -ETIME && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)
			die("io_uring_enter: %s", strerror(-ret));
		uint64_t done = mono_ns();

		unsigned head, seen = 0;
		struct io_uring_cqe *cqe;
		io_uring_for_each_cqe(&ring, head, cqe)
		{
			uint64_t slot = io_uring_cqe_get_data64(cqe);
			if (slot >= o->qd)
				die("a completion came back with unknown user_data %" PRIu64, slot);
			if (cqe->res == (int)o->bs) {
				if (counting) {
					hist_add(&lat, done - started[slot]);
					r.ios++;
				}
			} else {
				r.errors++;
				if (!r.have_first_error) {
					r.have_first_error = true;
					r.first_error_res = cqe->res;
					r.first_error_off = slot_off[slot];
				}
			}
			free_slots[nfree++] = (unsigned)slot;
			seen++;
		}
		io_uring_cq_advance(&ring, seen);
		if (seen) {
			last_progress = done;
		} else if (o->qd - nfree > 0 && done - last_progress > STALL_NS) {
			fprintf(stderr,
				PROG ": error: no I/O completed for %llu s with %u in flight: the device "
				"stopped answering\n",
				STALL_NS / 1000000000ull, o->qd - nfree);
			exit(2);
		}
	}
	if (o->fill) {
		win_end = mono_ns();
		u1 = rusage_ns(1);
		s1 = rusage_ns(0);
		c1 = cpustat_read();
		if (fsync(d.fd) != 0)
			die("fsync %s: %s", o->dev, strerror(errno));
	}
	alarm(0);
	io_uring_queue_exit(&ring);

	r.elapsed_ns = win_end > win_start ? win_end - win_start : 0;
	r.cpu_user_ns = u1 - u0;
	r.cpu_sys_ns = s1 - s0;
	r.busy = busy_between(c0, c1);
	report(o, &d, &r);
	if (r.errors) {
		char e[128];
		if (r.first_error_res < 0)
			snprintf(e, sizeof e, "%s", strerror(-r.first_error_res));
		else
			snprintf(e, sizeof e, "short transfer of %d bytes", r.first_error_res);
		fprintf(stderr, PROG ": %" PRIu64 " I/O error%s during the run (first: %s at byte offset %" PRIu64 ")\n",
			r.errors, r.errors == 1 ? "" : "s", e, r.first_error_off);
		return 1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	struct opts o = {.warmup = 0.5, .bs = 0, .qd = 0};
	const char *pos[8];
	int npos = 0;
	bool have_bs = false, have_qd = false;

	if (argc >= 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
		usage(stdout);
		return 0;
	}
	if (argc >= 2 && !strcmp(argv[1], "--cpu-window")) {
		if (argc != 4)
			die("usage: " PROG " --cpu-window DELAY LENGTH");
		return cpu_window(parse_secs(argv[2], "DELAY", true), parse_secs(argv[3], "LENGTH", false));
	}
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "--json")) {
			o.json = true;
		} else if (!strcmp(a, "--fill")) {
			o.fill = true;
		} else if (!strcmp(a, "--tuned")) {
			o.tuned = true;
		} else if (!strcmp(a, "--size") || !strcmp(a, "--warmup") || !strcmp(a, "--bs") ||
			   !strcmp(a, "--qd")) {
			if (i + 1 >= argc)
				die("%s needs a value", a);
			const char *v = argv[++i];
			if (!strcmp(a, "--size"))
				o.size = parse_size(v, "--size");
			else if (!strcmp(a, "--warmup"))
				o.warmup = parse_secs(v, "--warmup", true);
			else if (!strcmp(a, "--bs"))
				o.bs = parse_size(v, "--bs"), have_bs = true;
			else
				o.qd = parse_qd(v), have_qd = true;
		} else if (a[0] == '-' && a[1] == '-') {
			die("unknown option '%s' (see " PROG " --help)", a);
		} else {
			if (npos == 8)
				die("too many arguments (see --help)");
			pos[npos++] = a;
		}
	}

	if (o.fill) {
		if (npos != 1)
			die("--fill takes only DEVICE: " PROG " DEVICE --fill [--bs SIZE] [--qd N] [--size SIZE]");
		o.dev = pos[0];
		o.rw = RW_WRITE;
		if (!have_bs)
			o.bs = 1 << 20;
		if (!have_qd)
			o.qd = 8;
		o.warmup = 0;
		return run(&o);
	}
	if (npos != 6)
		die("expected DEVICE RW BS QD DURATION MODE, got %d argument%s (see " PROG " --help)", npos,
		    npos == 1 ? "" : "s");
	if (have_bs || have_qd)
		die("--bs and --qd go with --fill; give BS and QD as arguments");
	o.dev = pos[0];
	int k;
	for (k = 0; k < 4; k++)
		if (!strcmp(pos[1], rw_names[k]))
			break;
	if (k == 4)
		die("RW: '%s' is not one of randread, randwrite, read, write", pos[1]);
	o.rw = (enum rw)k;
	o.bs = parse_size(pos[2], "BS");
	o.qd = parse_qd(pos[3]);
	o.duration = parse_secs(pos[4], "DURATION", false);
	if (!strcmp(pos[5], "irq"))
		o.poll = false;
	else if (!strcmp(pos[5], "poll"))
		o.poll = true;
	else
		die("MODE: '%s' is neither irq nor poll", pos[5]);

	/* Seed from the clock and pid: different offsets on each run. */
	rng_state = mono_ns() ^ ((uint64_t)getpid() << 32);
	return run(&o);
}
