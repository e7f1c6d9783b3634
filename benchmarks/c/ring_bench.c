/*
 * ring_bench.c - the ceiling for Viridian's benchmarks: the same C ring
 * (csrc/vmbus_ring.c) driven from C by two processes, and the eventfd
 * ping-pong floor for blocking latency.
 *
 * Built by benchmarks/conftest.py at benchmark time into a temp dir:
 *   gcc -O2 -std=gnu11 -Icsrc benchmarks/c/ring_bench.c csrc/vmbus_ring.c
 *
 * Shared memory is a memfd (+ ftruncate + mmap MAP_SHARED), then fork(); each
 * process pins itself with sched_setaffinity.  The waits mirror vmbus/ring.py
 * exactly (spin with interrupts masked, unmask, re-check, block on an eventfd
 * doorbell with a timeout), and the signals follow the ring's decisions, so
 * the only difference from the Python API is the Python.
 *
 * Usage (commands on stdin, one per line; replies on stdout, one line each):
 *
 *   ring_bench stream SIZE RING_DATA_BYTES CPU_P CPU_C WMODE RMODE SPIN_NS BATCH_K
 *       WMODE: write (vmbr_write per packet) | batch (vmbr_write_batch, K a call)
 *       RMODE: read (vmbr_read per packet)   | drain (vmbr_drain, 256 a call)
 *       main = producer, child = consumer.  Commands:
 *         r N ID   a timed round: N packets, the last one carries ID in its
 *                  first 8 payload bytes.  Replies "sent ..." (producer) and
 *                  "done N MARKER SLEEPS ..." (consumer).
 *         c N      a check round: packet i carries i; the consumer checks
 *                  every sequence number and length.  Replies "sent", "checked N BAD".
 *         q        quit (both processes exit).
 *   ring_bench pingpong MODE CPU_A CPU_B SPIN_NS RING_DATA_BYTES
 *       MODE: eventfd (two blocking eventfds: the floor) | ring (64 B packets
 *       over two vmbus rings, waits as in vmbus/ring.py with SPIN_NS).
 *       main = pinger, child = ponger.  Commands:
 *         p K W    W unrecorded round trips, then K timed ones; reply
 *                  "lat v1 ... vK" (nanoseconds).
 *         q        quit.
 *
 *   ring_bench cacheline CPU_A CPU_B N
 *       The vCPU placement probe: two processes flip one shared 64-bit word N
 *       times each way and the main one prints "cacheline NS", the mean
 *       round trip.  ~70-140 ns when the two vCPUs share an L3 on this VM,
 *       ~400 ns when the host runs them on different ones (then every
 *       cross-core hand-off costs that much more).  No "ready" lines.
 *
 * Every process starts with "ready ROLE cpu=N" (sched_getcpu()).  Children
 * die with their parent (PR_SET_PDEATHSIG), and no wait blocks longer than
 * WAIT_MS: a stuck peer ends the process with a message on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "vmbus_ring.h"

/* The soft cap on a drained batch: the same as vmbus/ring.py's read-ahead. */
#define BATCH_BYTES (64u * 1024u)

#define WAIT_MS 10000          /* longest single wait for the peer */
#define CMD_WAIT_MS 900000     /* longest wait for the next command */
#define QUIT_ID 0x5155495451554954ull
#define PP_BYTES 64

static const char *g_role = "main";

static void fail(const char *what)
{
    dprintf(2, "ring_bench[%s]: %s%s%s\n", g_role, what, errno ? ": " : "",
            errno ? strerror(errno) : "");
    _exit(3);
}

static void write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            fail("write");
        }
        p += w;
        n -= (size_t)w;
    }
}

/* One reply line, written with one write() when it fits PIPE_BUF (atomic). */
static void say(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof buf)
        fail("reply too long");
    write_all(1, buf, (size_t)n);
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void pin(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    if (sched_setaffinity(0, sizeof s, &s))
        fail("sched_setaffinity");
}

static void die_with_parent(pid_t parent)
{
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0))
        fail("prctl");
    if (getppid() != parent)
        _exit(4);
}

/* Read one line from fd (byte by byte: commands are rare), waiting at most
 * timeout_ms for it.  Returns the length, 0 on EOF; fails on timeout. */
static size_t read_line(int fd, char *buf, size_t cap)
{
    size_t n = 0;
    while (n + 1 < cap) {
        struct pollfd p = {fd, POLLIN, 0};
        int rc = poll(&p, 1, CMD_WAIT_MS);
        if (rc < 0 && errno == EINTR)
            continue;
        if (rc <= 0)
            fail("no command");
        ssize_t r = read(fd, buf + n, 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            fail("read command");
        if (r == 0)
            break;
        if (buf[n] == '\n')
            break;
        n++;
    }
    buf[n] = 0;
    return n;
}

static void *shared_ring(uint64_t bytes)
{
    int fd = memfd_create("ring_bench", MFD_CLOEXEC);
    if (fd < 0)
        fail("memfd_create");
    if (ftruncate(fd, (off_t)bytes))
        fail("ftruncate");
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        fail("mmap");
    close(fd);
    vmbr_init_control(p);
    return p;
}

/* ----------------------------------------------------------- doorbells */

static int new_bell(void)
{
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd < 0)
        fail("eventfd");
    return fd;
}

static void bell_ring(int fd) /* Doorbell.ring */
{
    uint64_t one = 1;
    if (write(fd, &one, 8) != 8 && errno != EAGAIN)
        fail("eventfd write");
}

static int bell_wait(int fd, int timeout_ms) /* Doorbell.wait: clear, poll, clear */
{
    uint64_t v;
    if (read(fd, &v, 8) == 8)
        return 1;
    if (errno != EAGAIN)
        fail("eventfd read");
    struct pollfd p = {fd, POLLIN, 0};
    int rc = poll(&p, 1, timeout_ms);
    if (rc < 0 && errno != EINTR)
        fail("poll");
    if (rc <= 0)
        return 0;
    return read(fd, &v, 8) == 8;
}

static uint64_t g_sleeps; /* times this process blocked on its doorbell */

/* IncomingRing.wait_readable */
static int wait_readable(struct vmbr_ring *r, int bell, uint64_t spin_ns)
{
    if (spin_ns) {
        vmbr_mask_interrupts(r);
        int64_t rc = vmbr_spin_readable(r, spin_ns);
        if (rc < 0)
            fail("ring corrupt (spin_readable)");
        if (rc)
            return 1;
    }
    uint64_t deadline = now_ns() + WAIT_MS * 1000000ull;
    for (;;) {
        int64_t rc = vmbr_unmask_interrupts(r);
        if (rc < 0)
            fail("ring corrupt (unmask)");
        if (rc)
            return 1;
        uint64_t t = now_ns();
        if (t >= deadline)
            return 0;
        g_sleeps++;
        bell_wait(bell, (int)((deadline - t) / 1000000u) + 1);
    }
}

/* OutgoingRing.wait_writable */
static int wait_writable(struct vmbr_ring *r, uint32_t need, int bell, uint64_t spin_ns)
{
    if (spin_ns) {
        int64_t rc = vmbr_spin_writable(r, need, spin_ns);
        if (rc < 0)
            fail("ring corrupt (spin_writable)");
        if (rc > need)
            return 1;
    }
    uint64_t deadline = now_ns() + WAIT_MS * 1000000ull;
    for (;;) {
        int64_t rc = vmbr_set_pending(r, need);
        if (rc < 0)
            fail("ring corrupt (set_pending)");
        if (rc > need)
            return 1;
        uint64_t t = now_ns();
        if (t >= deadline) {
            vmbr_set_pending(r, 0);
            return 0;
        }
        g_sleeps++;
        bell_wait(bell, (int)((deadline - t) / 1000000u) + 1);
    }
}

static uint32_t packet_bytes(uint32_t payload)
{
    return ((VMBR_DESC_BYTES + payload + 7u) & ~7u) + VMBR_TRAILER_BYTES;
}

static uint32_t max_packet(uint64_t data_bytes)
{
    uint64_t m = data_bytes - 8;
    return (uint32_t)(m < VMBR_MAX_PACKET_BYTES ? m : VMBR_MAX_PACKET_BYTES);
}

/* ----------------------------------------------------------- streaming */

struct stream {
    struct vmbr_ring r;
    uint32_t size, k, need;
    int batch, drain;
    uint64_t spin_ns;
    int data_bell;  /* the consumer waits on it */
    int space_bell; /* the producer waits on it */
};

static void put_u64(char *p, uint64_t v) { memcpy(p, &v, 8); }
static uint64_t get_u64(const char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static void write_one(struct stream *s, const char *src)
{
    for (;;) {
        int64_t rc = vmbr_write(&s->r, VMBR_PKT_DATA_INBAND, 0, src, s->size);
        if (rc > 0) {
            if (rc == VMBR_WRITE_SIGNAL)
                bell_ring(s->data_bell);
            return;
        }
        if (rc < 0)
            fail("vmbr_write");
        if (!wait_writable(&s->r, s->need, s->space_bell, s->spin_ns))
            fail("timeout waiting for space");
    }
}

static void write_chunk(struct stream *s, const char *blob, const uint32_t *lens, uint32_t cnt)
{
    uint32_t done = 0;
    while (done < cnt) {
        uint32_t w;
        int64_t rc = vmbr_write_batch(&s->r, VMBR_PKT_DATA_INBAND, 0, blob + (size_t)done * s->size,
                                      lens + done, cnt - done, &w);
        if (rc < 0)
            fail("vmbr_write_batch");
        if (rc == VMBR_WRITE_SIGNAL)
            bell_ring(s->data_bell);
        done += w;
        if (done < cnt && !wait_writable(&s->r, s->need, s->space_bell, s->spin_ns))
            fail("timeout waiting for space");
    }
}

/* Send n packets; check=0: the last carries id; check=1: packet i carries i. */
static void produce(struct stream *s, char *blob, const uint32_t *lens, uint64_t n, uint64_t id,
                    int check)
{
    uint64_t i = 0;
    if (!s->batch) {
        for (; i < n; i++) {
            if (check)
                put_u64(blob, i);
            else if (i == n - 1)
                put_u64(blob, id);
            write_one(s, blob);
        }
    } else {
        while (i < n) {
            uint32_t cnt = n - i < s->k ? (uint32_t)(n - i) : s->k;
            for (uint32_t j = 0; check && j < cnt; j++)
                put_u64(blob + (size_t)j * s->size, i + j);
            if (!check && i + cnt == n)
                put_u64(blob + (size_t)(cnt - 1) * s->size, id);
            write_chunk(s, blob, lens, cnt);
            i += cnt;
        }
    }
    for (uint32_t j = 0; j < (s->batch ? s->k : 1); j++)
        put_u64(blob + (size_t)j * s->size, 0xababababababababull);
}

/* Receive n packets into private memory; returns the first 8 payload bytes
 * of the last one.  check: verify every packet's length and sequence number. */
static uint64_t consume(struct stream *s, char *out, uint32_t cap, uint32_t *starts, uint64_t n,
                        int check, uint64_t *bad)
{
    uint64_t got = 0, last = 0;
    uint32_t want = packet_bytes(s->size) - VMBR_TRAILER_BYTES; /* descriptor + payload */
    while (got < n) {
        if (s->drain) {
            uint32_t cnt;
            int64_t rc = vmbr_drain(&s->r, out, cap, BATCH_BYTES, starts, 256, &cnt);
            if (rc < 0)
                fail("vmbr_drain");
            if (cnt) {
                if (rc & VMBR_READ_SIGNAL)
                    bell_ring(s->space_bell);
                for (uint32_t j = 0; check && j < cnt; j++)
                    if (starts[2 * j + 2] - starts[2 * j] != want ||
                        get_u64(out + starts[2 * j + 1]) != got + j)
                        (*bad)++;
                got += cnt;
                last = get_u64(out + starts[2 * cnt - 1]);
                continue;
            }
        } else {
            int64_t rc = vmbr_read(&s->r, out, cap);
            if (rc < 0)
                fail("vmbr_read");
            if (rc > 0) {
                if (rc & VMBR_READ_SIGNAL)
                    bell_ring(s->space_bell);
                last = get_u64(out + VMBR_DESC_BYTES);
                if (check && ((uint32_t)(rc & ~VMBR_READ_SIGNAL) != want || last != got))
                    (*bad)++;
                got++;
                continue;
            }
        }
        if (!wait_readable(&s->r, s->data_bell, s->spin_ns))
            fail("timeout waiting for data");
    }
    if (got != n)
        fail("consumer overshot the round");
    return last;
}

static int do_stream(int argc, char **argv)
{
    if (argc != 10)
        return 2;
    struct stream s;
    memset(&s, 0, sizeof s);
    s.size = (uint32_t)strtoul(argv[2], 0, 0);
    uint64_t data = strtoull(argv[3], 0, 0);
    int cpu_p = atoi(argv[4]), cpu_c = atoi(argv[5]);
    s.batch = !strcmp(argv[6], "batch");
    s.drain = !strcmp(argv[7], "drain");
    s.spin_ns = strtoull(argv[8], 0, 0);
    s.k = (uint32_t)strtoul(argv[9], 0, 0);
    if (s.size < 8 || s.k < 1 || data % 4096)
        return 2;
    s.need = packet_bytes(s.size);
    uint64_t ring_bytes = VMBR_CONTROL_BYTES + data;
    uint8_t *base = shared_ring(ring_bytes);
    s.data_bell = new_bell();
    s.space_bell = new_bell();
    int cmd[2];
    if (pipe(cmd))
        fail("pipe");
    pid_t parent = getpid();
    pid_t child = fork();
    if (child < 0)
        fail("fork");
    if (child == 0) { /* consumer */
        g_role = "consumer";
        die_with_parent(parent);
        close(cmd[1]);
        pin(cpu_c);
        if (vmbr_attach(&s.r, base, ring_bytes, 0))
            fail("attach");
        uint32_t cap = max_packet(data);
        char *out = malloc(cap);
        uint32_t *starts = malloc((2 * 256 + 1) * sizeof *starts);
        if (!out || !starts)
            fail("malloc");
        say("ready consumer cpu=%d\n", sched_getcpu());
        char line[128];
        while (read_line(cmd[0], line, sizeof line)) {
            unsigned long long n = 0, id = 0, bad = 0;
            uint64_t sleeps0 = g_sleeps, sig0 = s.r.signals;
            if (sscanf(line, "r %llu %llu", &n, &id) == 2) {
                uint64_t t0 = now_ns();
                uint64_t last = consume(&s, out, cap, starts, n, 0, NULL);
                uint64_t t1 = now_ns();
                say("done %llu %llu %llu %llu %llu %d\n", n, (unsigned long long)last,
                    (unsigned long long)(g_sleeps - sleeps0),
                    (unsigned long long)(s.r.signals - sig0), (unsigned long long)(t1 - t0),
                    sched_getcpu());
            } else if (sscanf(line, "c %llu", &n) == 1) {
                uint64_t b = 0;
                consume(&s, out, cap, starts, n, 1, &b);
                bad = b;
                say("checked %llu %llu\n", n, bad);
            } else {
                break;
            }
        }
        _exit(0);
    }
    /* producer */
    g_role = "producer";
    close(cmd[0]);
    pin(cpu_p);
    if (vmbr_attach(&s.r, base, ring_bytes, 1))
        fail("attach");
    char *blob = malloc((size_t)s.k * s.size);
    uint32_t *lens = malloc(s.k * sizeof *lens);
    if (!blob || !lens)
        fail("malloc");
    memset(blob, 0xab, (size_t)s.k * s.size);
    for (uint32_t i = 0; i < s.k; i++)
        lens[i] = s.size;
    say("ready producer cpu=%d\n", sched_getcpu());
    char line[128];
    int status = 0;
    while (read_line(0, line, sizeof line)) {
        unsigned long long n = 0, id = 0;
        char fwd[160];
        int len = snprintf(fwd, sizeof fwd, "%s\n", line);
        write_all(cmd[1], fwd, (size_t)len); /* the consumer first: it starts draining at once */
        uint64_t sleeps0 = g_sleeps, sig0 = s.r.signals;
        if (sscanf(line, "r %llu %llu", &n, &id) == 2)
            produce(&s, blob, lens, n, id, 0);
        else if (sscanf(line, "c %llu", &n) == 1)
            produce(&s, blob, lens, n, 0, 1);
        else
            break;
        say("sent %llu %llu %llu %d\n", n, (unsigned long long)(g_sleeps - sleeps0),
            (unsigned long long)(s.r.signals - sig0), sched_getcpu());
    }
    close(cmd[1]);
    if (waitpid(child, &status, 0) < 0)
        fail("waitpid");
    return WIFEXITED(status) ? WEXITSTATUS(status) : 5;
}

/* ----------------------------------------------------------- ping-pong */

static void rt_write(struct vmbr_ring *r, int bell, const char *p, uint64_t id)
{
    int64_t rc = vmbr_write(r, VMBR_PKT_DATA_INBAND, id, p, PP_BYTES);
    if (rc <= 0)
        fail("ping-pong write");
    if (rc == VMBR_WRITE_SIGNAL)
        bell_ring(bell);
}

/* Read one 64 B packet (into pkt); returns its trans_id, or 0 after an idle WAIT_MS. */
static uint64_t rt_read(struct vmbr_ring *r, int bell, uint64_t spin_ns, char *pkt, uint32_t cap,
                        int *peer_bell)
{
    for (;;) {
        int64_t rc = vmbr_read(r, pkt, cap);
        if (rc < 0)
            fail("ping-pong read");
        if (rc > 0) {
            if (rc & VMBR_READ_SIGNAL)
                bell_ring(*peer_bell);
            return get_u64(pkt + 8);
        }
        if (!wait_readable(r, bell, spin_ns))
            return 0;
    }
}

static void efd_write(int fd, uint64_t v)
{
    if (write(fd, &v, 8) != 8)
        fail("eventfd write");
}

static uint64_t efd_read(int fd)
{
    uint64_t v;
    if (read(fd, &v, 8) != 8)
        fail("eventfd read");
    return v;
}

static int do_pingpong(int argc, char **argv)
{
    if (argc != 7)
        return 2;
    int ring = !strcmp(argv[2], "ring");
    int cpu_a = atoi(argv[3]), cpu_b = atoi(argv[4]);
    uint64_t spin_ns = strtoull(argv[5], 0, 0);
    uint64_t data = strtoull(argv[6], 0, 0);
    uint64_t ring_bytes = VMBR_CONTROL_BYTES + data;
    uint8_t *ab = NULL, *ba = NULL;
    int e_ab, e_ba; /* eventfd mode: blocking eventfds; ring mode: the doorbells */
    if (ring) {
        ab = shared_ring(ring_bytes);
        ba = shared_ring(ring_bytes);
        e_ab = new_bell(); /* the ponger waits on it */
        e_ba = new_bell(); /* the pinger waits on it */
    } else {
        e_ab = eventfd(0, EFD_CLOEXEC);
        e_ba = eventfd(0, EFD_CLOEXEC);
        if (e_ab < 0 || e_ba < 0)
            fail("eventfd");
    }
    uint32_t cap = max_packet(data);
    char *pkt = malloc(cap);
    char msg[PP_BYTES];
    memset(msg, 1, sizeof msg);
    if (!pkt)
        fail("malloc");
    pid_t parent = getpid();
    pid_t child = fork();
    if (child < 0)
        fail("fork");
    if (child == 0) { /* ponger */
        g_role = "ponger";
        die_with_parent(parent);
        pin(cpu_b);
        struct vmbr_ring in, out;
        if (ring && (vmbr_attach(&in, ab, ring_bytes, 0) || vmbr_attach(&out, ba, ring_bytes, 1)))
            fail("attach");
        say("ready ponger cpu=%d\n", sched_getcpu());
        for (int idle = 0; idle < CMD_WAIT_MS / WAIT_MS;) {
            if (!ring) {
                uint64_t v = efd_read(e_ab);
                if (v >= 1000)
                    _exit(0);
                efd_write(e_ba, 1);
                continue;
            }
            uint64_t id = rt_read(&in, e_ab, spin_ns, pkt, cap, &e_ba);
            if (id == QUIT_ID)
                _exit(0);
            if (!id) {
                idle++;
                continue;
            }
            idle = 0;
            rt_write(&out, e_ba, pkt + VMBR_DESC_BYTES, id);
        }
        _exit(6);
    }
    g_role = "pinger";
    pin(cpu_a);
    struct vmbr_ring out, in;
    if (ring && (vmbr_attach(&out, ab, ring_bytes, 1) || vmbr_attach(&in, ba, ring_bytes, 0)))
        fail("attach");
    say("ready pinger cpu=%d\n", sched_getcpu());
    char line[128];
    uint64_t *lat = NULL;
    size_t lat_cap = 0;
    while (read_line(0, line, sizeof line)) {
        unsigned long k = 0, w = 0;
        if (sscanf(line, "p %lu %lu", &k, &w) != 2)
            break;
        if (k > lat_cap) {
            free(lat);
            lat = malloc(k * sizeof *lat);
            lat_cap = k;
            if (!lat)
                fail("malloc");
        }
        for (unsigned long i = 0; i < k + w; i++) {
            uint64_t t0 = now_ns();
            if (ring) {
                rt_write(&out, e_ab, msg, 1);
                if (rt_read(&in, e_ba, spin_ns, pkt, cap, &e_ab) != 1)
                    fail("no pong");
            } else {
                efd_write(e_ab, 1);
                efd_read(e_ba);
            }
            uint64_t t1 = now_ns();
            if (i >= w)
                lat[i - w] = t1 - t0;
        }
        /* a long line: only the pinger writes to stdout now */
        size_t bufcap = 8 + k * 21, n = 0;
        char *buf = malloc(bufcap);
        if (!buf)
            fail("malloc");
        n += (size_t)snprintf(buf, bufcap, "lat");
        for (unsigned long i = 0; i < k; i++)
            n += (size_t)snprintf(buf + n, bufcap - n, " %llu", (unsigned long long)lat[i]);
        buf[n++] = '\n';
        write_all(1, buf, n);
        free(buf);
    }
    if (ring)
        rt_write(&out, e_ab, msg, QUIT_ID);
    else
        efd_write(e_ab, 1000);
    int status = 0;
    if (waitpid(child, &status, 0) < 0)
        fail("waitpid");
    return WIFEXITED(status) ? WEXITSTATUS(status) : 5;
}

/* Spin until *w == want; fails after WAIT_MS (the peer died). */
static void await_word(_Atomic uint64_t *w, uint64_t want)
{
    uint64_t deadline = 0;
    for (uint32_t i = 1;; i++) {
        /* Acquire: pairs with the peer's release store (nothing else is
         * published with it; it keeps the probe a plain hand-off). */
        if (atomic_load_explicit(w, memory_order_acquire) == want)
            return;
        if ((i & 4095u) == 0) {
            uint64_t t = now_ns();
            if (!deadline)
                deadline = t + WAIT_MS * 1000000ull;
            else if (t > deadline)
                fail("cacheline: the peer stopped answering");
        }
    }
}

static int do_cacheline(int argc, char **argv)
{
    if (argc != 5)
        fail("usage: ring_bench cacheline CPU_A CPU_B N");
    int cpu_a = atoi(argv[2]), cpu_b = atoi(argv[3]);
    uint64_t n = strtoull(argv[4], NULL, 10);
    _Atomic uint64_t *w = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                               -1, 0);
    if (w == MAP_FAILED || n == 0)
        fail("cacheline: mmap");
    atomic_store_explicit(w, 0, memory_order_relaxed);
    pid_t parent = getpid();
    pid_t child = fork();
    if (child < 0)
        fail("fork");
    if (child == 0) {
        g_role = "cacheline-b";
        die_with_parent(parent);
        pin(cpu_b);
        for (uint64_t i = 1; i <= n; i++) {
            await_word(w, 2 * i - 1);
            /* Release: the hand-off back (see await_word). */
            atomic_store_explicit(w, 2 * i, memory_order_release);
        }
        _exit(0);
    }
    pin(cpu_a);
    await_word(w, 0);
    uint64_t t0 = now_ns();
    for (uint64_t i = 1; i <= n; i++) {
        /* Release: the hand-off (see await_word). */
        atomic_store_explicit(w, 2 * i - 1, memory_order_release);
        await_word(w, 2 * i);
    }
    uint64_t t1 = now_ns();
    int st;
    if (waitpid(child, &st, 0) != child || !WIFEXITED(st) || WEXITSTATUS(st))
        fail("cacheline: the peer failed");
    printf("cacheline %.1f\n", (double)(t1 - t0) / (double)n);
    return 0;
}

int main(int argc, char **argv)
{
    /* The main process dies with whoever started it, too. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0))
        fail("prctl");
    if (argc > 1 && !strcmp(argv[1], "stream"))
        return do_stream(argc, argv);
    if (argc > 1 && !strcmp(argv[1], "pingpong"))
        return do_pingpong(argc, argv);
    if (argc > 1 && !strcmp(argv[1], "cacheline"))
        return do_cacheline(argc, argv);
    fprintf(stderr, "usage: see the comment at the top of ring_bench.c\n");
    return 2;
}
