/*
 * slow-fsync.c: an LD_PRELOAD shim for benchmarks that makes every fsync()
 * and fdatasync() of a process take at least SLOW_FSYNC_US microseconds.
 *
 * Why: fsync on these machines flips between ~0.2 ms and ~4 ms from one
 * hour to the next (DESIGN.md, measured facts), so a benchmark's durable
 * numbers depend on which mode the disk is in. With this shim a run can
 * choose the mode: `SLOW_FSYNC_US=4000 scripts/bench.sh` builds it and
 * preloads it into the chat-node processes only (never the load generator).
 *
 * What it is not: a slow disk. The real fsync runs first, then the call
 * sleeps for the rest of the time, so the device's bandwidth is untouched;
 * it models the latency of slow mode, not a saturated device.
 *
 * Owner: scripts/bench.sh. Never used by tests or by a deployed node.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <time.h>

typedef int (*sync_fn)(int);

static long min_us(void)
{
    static long v = -1;
    if (v < 0) {
        const char *s = getenv("SLOW_FSYNC_US");
        v = s ? atol(s) : 0;
        if (v < 0)
            v = 0;
    }
    return v;
}

/* Sleeps until at least min_us() have passed since *t0. */
static void pad(const struct timespec *t0)
{
    long us = min_us();
    struct timespec t1;
    if (us == 0 || clock_gettime(CLOCK_MONOTONIC, &t1) != 0)
        return;
    long elapsed = (t1.tv_sec - t0->tv_sec) * 1000000L + (t1.tv_nsec - t0->tv_nsec) / 1000;
    if (elapsed >= us)
        return;
    long rest = us - elapsed;
    struct timespec d = {rest / 1000000L, (rest % 1000000L) * 1000L};
    while (nanosleep(&d, &d) != 0 && errno == EINTR) {
    }
}

static int timed(sync_fn *real, const char *name, int fd)
{
    struct timespec t0;
    if (*real == NULL)
        *real = (sync_fn)dlsym(RTLD_NEXT, name);
    if (*real == NULL) {
        errno = ENOSYS; /* no real call to make: fail as an unsupported one */
        return -1;
    }
    int have_t0 = clock_gettime(CLOCK_MONOTONIC, &t0) == 0;
    int rc = (*real)(fd);
    int saved = errno; /* the caller reads the real call's errno */
    if (have_t0)
        pad(&t0);
    errno = saved;
    return rc;
}

int fsync(int fd)
{
    static sync_fn real;
    return timed(&real, "fsync", fd);
}

int fdatasync(int fd)
{
    static sync_fn real;
    return timed(&real, "fdatasync", fd);
}
