/*
 * vmbus_ring.c - the VMBus ring hot path: copy packets in and out, publish
 * indices, and decide when the peer must be signalled.
 *
 * The signalling contract (Hyper-V's, as Linux's ring_buffer.c and OpenVMM's
 * vmbus_ring implement it):
 *
 *   writer: copy the packet, publish write_index, then signal the reader only
 *           if the ring was empty before this write (read_index == old
 *           write_index) and the reader's interrupt_mask is 0.
 *   reader: copy packets out, publish read_index, then signal the writer only
 *           if it set pending_send_sz and the free space just crossed it
 *           (before <= pending < after).
 *   reader, batched: set interrupt_mask, drain, clear interrupt_mask, fence,
 *           re-check; data found by the re-check must be drained too.
 *
 * Both decisions are store-then-load across two processes (a Dekker pattern):
 * each side stores its own field and then loads the other side's.  Only a
 * sequentially consistent fence between the store and the load keeps both
 * sides from reading the other's stale value and going to sleep together.
 * Every fence below names the race it closes.
 *
 * Index picture (the data area, dsize bytes; r = read_index, w = write_index):
 *
 *      |....r########w.........|   w >= r: readable w - r
 *      |####w.........r########|   w <  r: readable dsize - r + w
 *
 * The ring is never completely full: a write needs strictly more free bytes
 * than it uses, so r == w always means empty.
 */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE /* syscall() */

#include "vmbus_ring.h"

#include <linux/membarrier.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

_Static_assert(ATOMIC_INT_LOCK_FREE == 2,
               "shared-memory atomics must be lock-free to work across processes");
_Static_assert(sizeof(_Atomic uint32_t) == sizeof(uint32_t), "atomic u32 has no hidden lock");
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "the descriptor is built in host order; Hyper-V's wire order is little endian");

/* The 16-byte packet descriptor (struct vmpacket_descriptor). */
struct vmbr_desc {
    uint16_t type;
    uint16_t offset8;
    uint16_t len8;
    uint16_t flags;
    uint64_t trans_id;
};
_Static_assert(sizeof(struct vmbr_desc) == VMBR_DESC_BYTES, "descriptor is 16 bytes");

/*
 * The result vocabulary (vmbus_ring.h) cannot collide: each field holds the
 * largest value the protocol allows, and no two fields or flags of one
 * encoding share a bit.  tests/unit/test_ring_results.py proves the same from
 * the constants cffi read, on the Python side.
 */
#define VMBR_BIT(n) ((uint64_t)1 << (n))
/* type_flags */
_Static_assert(VMBR_TF_COMPLETION_REQUESTED ==
               VMBR_FLAG_COMPLETION_REQUESTED << VMBR_TF_FLAGS_SHIFT, "named flag = flag << shift");
_Static_assert(VMBR_PKT_COMP < VMBR_BIT(VMBR_TF_FLAGS_SHIFT), "types fit below the flags");
/* writers */
_Static_assert(VMBR_WRITE_FULL == 0 && VMBR_WRITE_DONE != VMBR_WRITE_SIGNAL &&
               VMBR_WRITE_DONE > 0 && VMBR_WRITE_SIGNAL > 0, "0 = nothing written");
_Static_assert(VMBR_WRITE_SIGNAL <= VMBR_W4_STATUS_MASK &&
               VMBR_W4_STATUS_MASK < VMBR_BIT(VMBR_W4_COUNT_SHIFT), "write4: status below count");
/* whole-packet readers: lengths are multiples of 8, bit 0 is the signal */
_Static_assert(VMBR_READ_SIGNAL == 1 && VMBR_DESC_BYTES % 8 == 0 && VMBR_MAX_PACKET_BYTES % 8 == 0,
               "packet lengths leave bit 0 free");
_Static_assert(VMBR_DRAIN_SIGNAL == VMBR_READ_SIGNAL,
               "vmbr_drain and vmbr_drain_into pass vmbr_commit_read's answer on");
_Static_assert(VMBR_READ_SIGNAL < 8, "lengths are len8 * 8: bits 0-2 are free");
_Static_assert(VMBR_DRAIN_SIGNAL != VMBR_DRAIN_EXT_NEXT && VMBR_DRAIN_SIGNAL > 0 &&
               VMBR_DRAIN_EXT_NEXT > 0, "drain statuses distinct from 0 and each other");
/* the packed io results */
_Static_assert(VMBR_IO_END_MASK == 0xFFFFFFFFu, "END holds any u32: io_cap, a length");
_Static_assert((uint64_t)VMBR_IO_AUX_MASK + 1 == VMBR_BIT(20) && VMBR_IO_AUX_SHIFT == 32,
               "AUX: 20 bits just above END");
_Static_assert((uint64_t)UINT16_MAX * 8 <= VMBR_IO_AUX_MASK, "AUX holds any offset8 * 8");
_Static_assert(VMBR_IO_MAX_PACKETS <= VMBR_IO_AUX_MASK, "AUX holds drain_io's most packets");
_Static_assert(VMBR_MAX_PACKET_BYTES <= VMBR_IO_END_MASK, "END holds any packet");
_Static_assert(VMBR_IO_SIGNAL == VMBR_BIT(52) && VMBR_IO_EXT_NEXT == VMBR_BIT(53) &&
               VMBR_IO_BROKEN == VMBR_BIT(54), "one bit each, as the header's comments say");
_Static_assert(((uint64_t)VMBR_IO_AUX_MASK << VMBR_IO_AUX_SHIFT | VMBR_IO_END_MASK) <
               VMBR_IO_SIGNAL, "every flag lies above every field");
_Static_assert(VMBR_XCHG_ANSWER_LIMIT == (uint64_t)VMBR_IO_END_MASK + 1,
               "an exchange answer is an END");
_Static_assert(VMBR_XCHG_UNSENT == VMBR_BIT(55) && VMBR_XCHG_SIGNAL == VMBR_BIT(56) &&
               VMBR_XCHG_READ == VMBR_BIT(57), "one bit each, above the io flags");
_Static_assert((VMBR_XCHG_READ | VMBR_XCHG_SIGNAL | VMBR_XCHG_UNSENT | VMBR_IO_BROKEN |
                VMBR_IO_EXT_NEXT | VMBR_IO_SIGNAL | (uint64_t)VMBR_IO_AUX_MASK << VMBR_IO_AUX_SHIFT |
                VMBR_IO_END_MASK) < VMBR_BIT(63), "never the sign bit");

#define SHARED(r, off) ((_Atomic uint32_t *)((r)->base + (off)))
#define DATA(r) ((r)->base + VMBR_CONTROL_BYTES)

static const uint8_t zeros[8];

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* vDSO: no kernel entry */
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline int index_ok(uint32_t v, uint32_t dsize)
{
    return v < dsize && (v & 7u) == 0;
}

static inline uint32_t readable(uint32_t rd, uint32_t w, uint32_t dsize)
{
    return w >= rd ? w - rd : dsize - rd + w;
}

static inline uint32_t writable(uint32_t rd, uint32_t w, uint32_t dsize)
{
    return rd > w ? rd - w : dsize - (w - rd);
}

static inline uint32_t wrap(uint32_t off, uint32_t dsize)
{
    return off >= dsize ? off - dsize : off;
}

static int64_t mark_corrupt(struct vmbr_ring *r, uint32_t why, uint32_t value)
{
    if (!r->corrupt) {
        r->corrupt = why;
        r->bad_value = value;
    }
    return VMBR_E_CORRUPT;
}

/* Copy n bytes into the data area at off, wrapping once; returns the new offset. */
static inline uint32_t copy_in(struct vmbr_ring *r, uint32_t off, const void *src, uint32_t n)
{
    uint8_t *data = DATA(r);
    uint32_t room = r->data_bytes - off;
    if (n < room) {
        memcpy(data + off, src, n);
        return off + n;
    }
    memcpy(data + off, src, room);
    memcpy(data, (const uint8_t *)src + room, n - room);
    return n - room;
}

/* Copy n bytes out of the data area from off, wrapping once. */
static inline void copy_out(const struct vmbr_ring *r, uint32_t off, void *dst, uint32_t n)
{
    const uint8_t *data = DATA(r);
    uint32_t room = r->data_bytes - off;
    if (n <= room) {
        memcpy(dst, data + off, n);
        return;
    }
    memcpy(dst, data + off, room);
    memcpy((uint8_t *)dst + room, data, n - room);
}

void vmbr_init_control(uint8_t *base)
{
    memset(base, 0, VMBR_CONTROL_BYTES);
    /* Relaxed: initialisation happens before any peer attaches; the handle
     * transfer to the peer (a socket message, an exec) orders it. */
    atomic_store_explicit((_Atomic uint32_t *)(base + VMBR_OFF_FEATURE_BITS),
                          VMBR_FEAT_PENDING_SEND_SZ, memory_order_relaxed);
}

static long membarrier(int cmd)
{
    return syscall(__NR_membarrier, cmd, 0, 0);
}

/* Whether this process can issue (reader) or, registered, be reached by
 * (writer) MEMBARRIER_CMD_GLOBAL_EXPEDITED. */
static uint32_t heavy_barrier_usable(int outgoing)
{
    long q = membarrier(MEMBARRIER_CMD_QUERY);
    if (q < 0 || !(q & MEMBARRIER_CMD_GLOBAL_EXPEDITED) ||
        !(q & MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED))
        return 0;
    return !outgoing || membarrier(MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED) == 0;
}

int vmbr_attach(struct vmbr_ring *r, uint8_t *base, uint64_t ring_bytes, int outgoing)
{
    memset(r, 0, sizeof(*r));
    if (ring_bytes % VMBR_PAGE_BYTES || ring_bytes < VMBR_MIN_RING_BYTES ||
        ring_bytes - VMBR_CONTROL_BYTES > 0x80000000u)
        return VMBR_E_INVAL;
    r->base = base;
    r->data_bytes = (uint32_t)(ring_bytes - VMBR_CONTROL_BYTES);
    /* Acquire: pairs with the peer's release of this index, so that a ring
     * attached mid-stream sees the packets up to it. */
    uint32_t start = atomic_load_explicit(
        SHARED(r, outgoing ? VMBR_OFF_WRITE_INDEX : VMBR_OFF_READ_INDEX), memory_order_acquire);
    if (!index_ok(start, r->data_bytes))
        return (int)mark_corrupt(r, outgoing ? VMBR_BAD_WRITE_INDEX : VMBR_BAD_READ_INDEX, start);
    r->index = r->published = start;
    if (outgoing) {
        /* Acquire: as for every read_index load (see load_read_index). */
        uint32_t rd = atomic_load_explicit(SHARED(r, VMBR_OFF_READ_INDEX), memory_order_acquire);
        if (!index_ok(rd, r->data_bytes))
            return (int)mark_corrupt(r, VMBR_BAD_READ_INDEX, rd);
        r->peer_index = rd;
    }
    r->heavy = heavy_barrier_usable(outgoing);
    r->heavy_gap_ns = VMBR_HEAVY_GAP_NS;
    return 0;
}

void vmbr_close(struct vmbr_ring *r)
{
    r->corrupt = VMBR_CLOSED;
    r->base = NULL;
}

void vmbr_snapshot(const struct vmbr_ring *r, struct vmbr_snapshot *s)
{
    memset(s, 0, sizeof(*s));
    if (r->corrupt == VMBR_CLOSED)
        return;
    /* Relaxed: a diagnostic snapshot; no ordering is implied or needed. */
    s->write_index = atomic_load_explicit(SHARED(r, VMBR_OFF_WRITE_INDEX), memory_order_relaxed);
    s->read_index = atomic_load_explicit(SHARED(r, VMBR_OFF_READ_INDEX), memory_order_relaxed);
    s->interrupt_mask =
        atomic_load_explicit(SHARED(r, VMBR_OFF_INTERRUPT_MASK), memory_order_relaxed);
    s->pending_send_sz =
        atomic_load_explicit(SHARED(r, VMBR_OFF_PENDING_SEND_SZ), memory_order_relaxed);
    s->feature_bits = atomic_load_explicit(SHARED(r, VMBR_OFF_FEATURE_BITS), memory_order_relaxed);
}

/* ------------------------------------------------------------------ writer */

/* Load and validate the reader's index (the only shared index a writer reads). */
static inline int64_t load_read_index(struct vmbr_ring *r, uint32_t *rd)
{
    /* Acquire: pairs with the reader's release store of read_index, so our
     * copies into the space it freed cannot be ordered before its copies out
     * of that space (we would overwrite a packet it is still reading). */
    uint32_t v = atomic_load_explicit(SHARED(r, VMBR_OFF_READ_INDEX), memory_order_acquire);
    if (!index_ok(v, r->data_bytes))
        return mark_corrupt(r, VMBR_BAD_READ_INDEX, v);
    *rd = r->peer_index = v;
    return 0;
}

/*
 * Free bytes for the writer.  The read_index seen last is tried first: the
 * reader only ever moves it forward, so a stale value under-reports space and
 * is safe; only when it is not enough is the shared line touched again.  The
 * control page's one cache line holds both indices, and every load of it
 * after the reader published is a cross-core miss.
 */
static inline int64_t space_for(struct vmbr_ring *r, uint64_t total, uint32_t *space)
{
    uint32_t s = writable(r->peer_index, r->index, r->data_bytes);
    if (s <= total) {
        uint32_t rd;
        if (load_read_index(r, &rd))
            return VMBR_E_CORRUPT;
        s = writable(rd, r->index, r->data_bytes);
    }
    *space = s;
    return 0;
}

/* Publish r->index as write_index and decide whether the reader needs a signal. */
static int64_t publish_write(struct vmbr_ring *r)
{
    uint32_t old = r->published;
    /* Release: the packet bytes must be visible before the new index is; a
     * reader that sees the index would otherwise copy stale bytes. */
    atomic_store_explicit(SHARED(r, VMBR_OFF_WRITE_INDEX), r->index, memory_order_release);
    r->published = r->index;
    if (r->pending_set) {
        /* Relaxed: pending_send_sz is a hint we own; the reader reads it only
         * after its own fence, and a stale non-zero costs one extra signal. */
        atomic_store_explicit(SHARED(r, VMBR_OFF_PENDING_SEND_SZ), 0, memory_order_relaxed);
        r->pending_set = 0;
    }
    if (r->heavy) {
        /* The reader polls with interrupts masked, and promised to run a
         * membarrier(GLOBAL_EXPEDITED) before it re-checks after unmasking.
         * Then no fence is needed here: either our write_index store comes
         * before the barrier's point in our instruction stream, and its
         * re-check sees the packet; or our mask load comes after it, and sees
         * its mask = 0 (we then take the fenced path below).  The fence
         * would stall this write until the control page's cache line, which
         * a polling reader keeps taking, came back: ~150 ns across cores.
         * Acquire: pairs with the reader's release store of the mask, so the
         * promise stored before it is visible. */
        uint32_t m = atomic_load_explicit(SHARED(r, VMBR_OFF_INTERRUPT_MASK), memory_order_acquire);
        /* Relaxed: ordered after the mask load by its acquire. */
        if (m && atomic_load_explicit(SHARED(r, VMBR_OFF_VIRIDIAN), memory_order_relaxed) &
                     VMBR_READER_HEAVY_BARRIER) {
            r->signals_suppressed++;
            return VMBR_WRITE_DONE;
        }
    }
    /* Full fence: orders the write_index store before the interrupt_mask and
     * read_index loads below.  Without it the reader could clear its mask and
     * re-check a stale write_index while we read its stale mask = 1: both
     * would conclude "no signal needed" and the reader would sleep with a
     * packet in the ring. */
    atomic_thread_fence(memory_order_seq_cst);
    /* Relaxed: ordered by the fence above; the value is only a hint. */
    uint32_t mask = atomic_load_explicit(SHARED(r, VMBR_OFF_INTERRUPT_MASK), memory_order_relaxed);
    /* Acquire (ordered after our store by the fence above): it also refreshes
     * the cached read_index, so it must pair with the reader's release like
     * every read_index load.  The line is ours right after the store, so this
     * load is a hit.  Equal to our old index means the reader had drained
     * everything before this write: empty -> non-empty. */
    uint32_t rd = atomic_load_explicit(SHARED(r, VMBR_OFF_READ_INDEX), memory_order_acquire);
    if (index_ok(rd, r->data_bytes))
        r->peer_index = rd;
    if (mask) {
        r->signals_suppressed++;
        return VMBR_WRITE_DONE;
    }
    if (rd == old) {
        r->signals++;
        return VMBR_WRITE_SIGNAL;
    }
    r->signals_suppressed++;
    return VMBR_WRITE_DONE;
}

static inline uint32_t put_packet(struct vmbr_ring *r, uint32_t w, uint32_t type_flags,
                                  uint64_t trans_id, const char *ext, uint32_t ext_bytes,
                                  const char *payload, uint32_t payload_bytes, uint32_t padded)
{
    struct vmbr_desc d = {
        .type = (uint16_t)type_flags,
        .offset8 = (uint16_t)((VMBR_DESC_BYTES + ext_bytes) >> 3),
        .len8 = (uint16_t)(padded >> 3),
        .flags = (uint16_t)(type_flags >> VMBR_TF_FLAGS_SHIFT),
        .trans_id = trans_id,
    };
    uint64_t trailer = (uint64_t)w << 32; /* upper half: this packet's start */
    uint32_t off = copy_in(r, w, &d, VMBR_DESC_BYTES);
    if (ext_bytes)
        off = copy_in(r, off, ext, ext_bytes);
    if (payload_bytes)
        off = copy_in(r, off, payload, payload_bytes);
    uint32_t pad = padded - (VMBR_DESC_BYTES + ext_bytes + payload_bytes);
    if (pad)
        off = copy_in(r, off, zeros, pad);
    return copy_in(r, off, &trailer, VMBR_TRAILER_BYTES);
}

static inline int writable_type(uint32_t type_flags, int ext)
{
    uint16_t type = (uint16_t)type_flags;
    if (ext)
        return type == VMBR_PKT_DATA_USING_XFER_PAGES || type == VMBR_PKT_DATA_USING_GPA_DIRECT;
    return type == VMBR_PKT_DATA_INBAND || type == VMBR_PKT_COMP;
}

static int64_t write_one(struct vmbr_ring *r, uint32_t type_flags, uint64_t trans_id,
                         const char *ext, uint32_t ext_bytes, const char *payload,
                         uint32_t payload_bytes)
{
    /* Only types the peer's reader accepts: anything else would make the
     * peer declare the ring corrupt. */
    if (!writable_type(type_flags, ext_bytes != 0) ||
        (type_flags >> VMBR_TF_FLAGS_SHIFT) & ~(uint32_t)VMBR_FLAG_COMPLETION_REQUESTED)
        return VMBR_E_INVAL;
    uint64_t used = (uint64_t)VMBR_DESC_BYTES + ext_bytes + payload_bytes;
    uint64_t padded = (used + 7u) & ~(uint64_t)7u;
    uint64_t total = padded + VMBR_TRAILER_BYTES;
    if (padded > VMBR_MAX_PACKET_BYTES || total >= r->data_bytes)
        return VMBR_E_TOO_BIG;
    uint32_t space;
    if (space_for(r, total, &space))
        return VMBR_E_CORRUPT;
    if (space <= total) { /* strict: never completely full */
        r->full++;
        return VMBR_WRITE_FULL;
    }
    r->index = put_packet(r, r->index, type_flags, trans_id, ext, ext_bytes, payload,
                          payload_bytes, (uint32_t)padded);
    r->packets++;
    r->bytes += payload_bytes;
    return publish_write(r);
}

int64_t vmbr_write_ext(struct vmbr_ring *r, uint32_t type_flags, uint64_t trans_id,
                       const char *ext, uint32_t ext_bytes, const char *payload,
                       uint32_t payload_bytes)
{
    if (r->corrupt)
        return VMBR_E_CORRUPT;
    if (ext_bytes & 7u || ext_bytes > VMBR_MAX_PACKET_BYTES)
        return VMBR_E_INVAL;
    return write_one(r, type_flags, trans_id, ext, ext_bytes, payload, payload_bytes);
}

int64_t vmbr_write(struct vmbr_ring *r, uint32_t type_flags, uint64_t trans_id,
                   const char *payload, uint32_t payload_bytes)
{
    if (r->corrupt)
        return VMBR_E_CORRUPT;
    return write_one(r, type_flags, trans_id, NULL, 0, payload, payload_bytes);
}

/*
 * Write count packets in order, as many as fit, with one publication.  The
 * payloads are either back to back in blob (ptrs NULL) or at ptrs[i].
 */
static int64_t write_run(struct vmbr_ring *r, uint32_t type_flags, uint64_t trans_id,
                         const char *blob, char *const *ptrs, const uint32_t *lens,
                         uint32_t count, uint32_t *written)
{
    *written = 0;
    if (r->corrupt)
        return VMBR_E_CORRUPT;
    if (!writable_type(type_flags, 0) ||
        (type_flags >> VMBR_TF_FLAGS_SHIFT) & ~(uint32_t)VMBR_FLAG_COMPLETION_REQUESTED)
        return VMBR_E_INVAL;
    for (uint32_t i = 0; i < count; i++) { /* all or nothing on a size error */
        uint64_t padded = ((uint64_t)VMBR_DESC_BYTES + lens[i] + 7u) & ~(uint64_t)7u;
        if (padded > VMBR_MAX_PACKET_BYTES || padded + VMBR_TRAILER_BYTES >= r->data_bytes)
            return VMBR_E_TOO_BIG;
    }
    uint32_t rd;
    if (load_read_index(r, &rd))
        return VMBR_E_CORRUPT;
    uint32_t space = writable(rd, r->index, r->data_bytes);
    uint32_t w = r->index, i;
    uint64_t bytes = 0;
    for (i = 0; i < count; i++) {
        uint32_t padded = (VMBR_DESC_BYTES + lens[i] + 7u) & ~7u;
        uint32_t total = padded + VMBR_TRAILER_BYTES;
        if (space <= total)
            break;
        const char *payload = ptrs ? ptrs[i] : blob;
        w = put_packet(r, w, type_flags, trans_id, NULL, 0, payload, lens[i], padded);
        space -= total;
        if (!ptrs)
            blob += lens[i]; /* (no arithmetic on a NULL blob) */
        bytes += lens[i];
    }
    *written = i;
    if (i == 0) {
        r->full++;
        return VMBR_WRITE_FULL;
    }
    if (i < count)
        r->full++;
    r->index = w;
    r->packets += i;
    r->bytes += bytes;
    return publish_write(r);
}

int64_t vmbr_write_batch(struct vmbr_ring *r, uint32_t type_flags, uint64_t trans_id,
                         const char *blob, const uint32_t *lens, uint32_t count, uint32_t *written)
{
    return write_run(r, type_flags, trans_id, blob, NULL, lens, count, written);
}

int64_t vmbr_write_gather(struct vmbr_ring *r, uint32_t type_flags, uint64_t trans_id,
                          char **payloads, const uint32_t *lens, uint32_t count,
                          uint32_t *written)
{
    return write_run(r, type_flags, trans_id, NULL, payloads, lens, count, written);
}

int64_t vmbr_write4(struct vmbr_ring *r, uint32_t type_flags, uint64_t trans_id, uint32_t count,
                    const char *p0, uint32_t n0, const char *p1, uint32_t n1,
                    const char *p2, uint32_t n2, const char *p3, uint32_t n3)
{
    char *ptrs[4] = {(char *)p0, (char *)p1, (char *)p2, (char *)p3}; /* only read */
    uint32_t lens[4] = {n0, n1, n2, n3};
    uint32_t written;
    if (count > 4)
        return VMBR_E_INVAL;
    int64_t rc = vmbr_write_gather(r, type_flags, trans_id, ptrs, lens, count, &written);
    return rc < 0 ? rc : (int64_t)written << VMBR_W4_COUNT_SHIFT | rc;
}

int64_t vmbr_bytes_writable(struct vmbr_ring *r)
{
    uint32_t rd;
    if (r->corrupt || load_read_index(r, &rd))
        return VMBR_E_CORRUPT;
    return writable(rd, r->index, r->data_bytes);
}

int64_t vmbr_set_pending(struct vmbr_ring *r, uint32_t need_bytes)
{
    if (r->corrupt)
        return VMBR_E_CORRUPT;
    uint32_t pending = need_bytes ? ((need_bytes + 7u) & ~7u) : 0;
    /* Relaxed store, ordered by the fence below. */
    atomic_store_explicit(SHARED(r, VMBR_OFF_PENDING_SEND_SZ), pending, memory_order_relaxed);
    r->pending_set = pending != 0;
    /* Full fence: orders the pending_send_sz store before the read_index load.
     * Without it the reader could publish read_index and read pending = 0
     * while we read its old read_index: we would sleep on a full ring that
     * has room, and nobody would wake us. */
    atomic_thread_fence(memory_order_seq_cst);
    uint32_t rd;
    if (load_read_index(r, &rd))
        return VMBR_E_CORRUPT;
    return writable(rd, r->index, r->data_bytes);
}

int64_t vmbr_spin_writable(struct vmbr_ring *r, uint32_t need_bytes, uint64_t spin_ns)
{
    uint64_t deadline = 0;
    for (uint32_t i = 0;; i++) {
        int64_t space = vmbr_bytes_writable(r);
        if (space < 0 || space > (int64_t)need_bytes)
            return space;
        if (!spin_ns)
            return 0;
        if ((i & 63u) == 0) {
            uint64_t t = now_ns();
            if (!deadline)
                deadline = t + spin_ns;
            else if (t >= deadline)
                return 0;
        }
        cpu_relax();
    }
}

/* ------------------------------------------------------------------ reader */

/* Load and validate the writer's index. */
static inline int64_t load_write_index(struct vmbr_ring *r, uint32_t *w)
{
    /* Acquire: pairs with the writer's release of write_index, so the packet
     * bytes we copy next are the ones written before that index, not stale. */
    uint32_t v = atomic_load_explicit(SHARED(r, VMBR_OFF_WRITE_INDEX), memory_order_acquire);
    if (!index_ok(v, r->data_bytes))
        return mark_corrupt(r, VMBR_BAD_WRITE_INDEX, v);
    *w = v;
    return 0;
}

/*
 * Validate the packet at r->index given the writer's index w (already
 * validated).  The descriptor is copied out once into *d and only the copy is
 * used.  Returns 0 when empty, len8 * 8 for a good packet, or an error.
 */
static inline int64_t next_packet(struct vmbr_ring *r, uint32_t w, struct vmbr_desc *d)
{
    uint32_t avail = readable(r->index, w, r->data_bytes);
    if (avail == 0)
        return 0;
    if (avail < VMBR_DESC_BYTES + VMBR_TRAILER_BYTES)
        return mark_corrupt(r, VMBR_BAD_PARTIAL, avail);
    copy_out(r, r->index, d, VMBR_DESC_BYTES);
    uint32_t len = (uint32_t)d->len8 * 8u;
    if (d->offset8 < 2 || d->offset8 > d->len8 || (uint64_t)len + VMBR_TRAILER_BYTES > avail)
        return mark_corrupt(r, VMBR_BAD_LENGTHS, (uint32_t)d->offset8 << 16 | d->len8);
    if (d->type != VMBR_PKT_DATA_INBAND && d->type != VMBR_PKT_DATA_USING_XFER_PAGES &&
        d->type != VMBR_PKT_DATA_USING_GPA_DIRECT && d->type != VMBR_PKT_COMP)
        return mark_corrupt(r, VMBR_BAD_TYPE, d->type);
    if (d->flags & ~(uint16_t)VMBR_FLAG_COMPLETION_REQUESTED)
        return mark_corrupt(r, VMBR_BAD_FLAGS, d->flags);
    return len;
}

int64_t vmbr_commit_read(struct vmbr_ring *r)
{
    uint32_t old = r->published, now = r->index;
    if (old == now || r->corrupt)
        return 0;
    /* Release: our copies out of the freed space must complete before the
     * writer can see the space as free and overwrite it. */
    atomic_store_explicit(SHARED(r, VMBR_OFF_READ_INDEX), now, memory_order_release);
    r->published = now;
    /* Full fence: orders the read_index store before the pending_send_sz
     * load.  Without it the writer could set pending_send_sz and re-read our
     * old read_index while we read its old pending = 0: it would sleep on a
     * ring that now has room and we would never signal it. */
    atomic_thread_fence(memory_order_seq_cst);
    /* Relaxed loads, ordered by the fence; each is read once and validated. */
    uint32_t features =
        atomic_load_explicit(SHARED(r, VMBR_OFF_FEATURE_BITS), memory_order_relaxed);
    if (!(features & VMBR_FEAT_PENDING_SEND_SZ))
        return 0;
    /* Masked to 8: some peers set ring size - 1 (OpenVMM's note). */
    uint32_t pending =
        atomic_load_explicit(SHARED(r, VMBR_OFF_PENDING_SEND_SZ), memory_order_relaxed) & ~7u;
    if (!pending)
        return 0;
    uint32_t w = atomic_load_explicit(SHARED(r, VMBR_OFF_WRITE_INDEX), memory_order_relaxed);
    if (!index_ok(w, r->data_bytes))
        return mark_corrupt(r, VMBR_BAD_WRITE_INDEX, w);
    uint32_t before = writable(old, w, r->data_bytes);
    uint32_t after = writable(now, w, r->data_bytes);
    if (before <= pending && after > pending) {
        r->signals++;
        return VMBR_READ_SIGNAL;
    }
    r->signals_suppressed++;
    return 0;
}

/* Step the private read index over one packet of len bytes (payload_bytes of
 * payload) and count it; nothing is published yet. */
static inline void step_over(struct vmbr_ring *r, uint32_t len, uint32_t payload_bytes)
{
    r->index = wrap(r->index + len + VMBR_TRAILER_BYTES, r->data_bytes);
    r->packets++;
    r->bytes += payload_bytes;
}

/*
 * Copy the packet at r->index (validated into *d, len bytes) to out, step
 * over it and publish.  Returns 0 or VMBR_READ_SIGNAL, or an error.
 */
static int64_t take_one(struct vmbr_ring *r, const struct vmbr_desc *d, uint32_t len, char *out)
{
    memcpy(out, d, VMBR_DESC_BYTES); /* the validated copy, not a re-read */
    copy_out(r, wrap(r->index + VMBR_DESC_BYTES, r->data_bytes), out + VMBR_DESC_BYTES,
             len - VMBR_DESC_BYTES);
    step_over(r, len, len - (uint32_t)d->offset8 * 8u);
    return vmbr_commit_read(r);
}

/* The next packet's descriptor (into *d) and length; 0 when empty. */
static int64_t peek_next(struct vmbr_ring *r, struct vmbr_desc *d)
{
    r->peeked = 0; /* any other read invalidates a pending peek */
    if (r->corrupt)
        return VMBR_E_CORRUPT;
    uint32_t w;
    if (load_write_index(r, &w))
        return VMBR_E_CORRUPT;
    return next_packet(r, w, d);
}

int64_t vmbr_read(struct vmbr_ring *r, char *out, uint32_t out_cap)
{
    struct vmbr_desc d;
    int64_t len = peek_next(r, &d);
    if (len <= 0)
        return len;
    if (len > out_cap)
        return mark_corrupt(r, VMBR_BAD_TOO_BIG, (uint32_t)len);
    int64_t sig = take_one(r, &d, (uint32_t)len, out);
    return sig < 0 ? sig : len | sig;
}

/*
 * Validate the extended header of the packet copied to p (descriptor d):
 * for type 9, range_cnt >= 1 ranges, each with byte_offset < 4096, a non-zero
 * byte_count and exactly the PFNs it spans, all within offset8 * 8 bytes; for
 * type 7, range_cnt ranges within them.  Reads only the private copy (the
 * peer cannot change it under us).  Returns 0, or marks the ring corrupt with
 * the value Python's vmbus.packet parsers report and returns VMBR_E_CORRUPT.
 */
static int64_t check_ext(struct vmbr_ring *r, const char *p, const struct vmbr_desc *d)
{
    uint32_t pos = VMBR_DESC_BYTES, end = (uint32_t)d->offset8 * 8u, cnt, bc, bo;
    if (d->type == VMBR_PKT_DATA_USING_GPA_DIRECT) {
        if (end < pos + 8)
            return mark_corrupt(r, VMBR_BAD_GPA_HEADER, end - pos); /* (offset8 >= 2) */
        memcpy(&cnt, p + pos + 4, 4); /* reserved u32, range_cnt u32 */
        if (cnt == 0)
            return mark_corrupt(r, VMBR_BAD_GPA_HEADER, 0);
        pos += 8;
        for (uint32_t i = 0; i < cnt; i++) {
            if (end - pos < 8)
                return mark_corrupt(r, VMBR_BAD_GPA_HEADER, cnt);
            memcpy(&bc, p + pos, 4);
            memcpy(&bo, p + pos + 4, 4);
            if (bo >= VMBR_PAGE_BYTES || bc == 0)
                return mark_corrupt(r, VMBR_BAD_GPA_HEADER, bo);
            uint64_t pages = ((uint64_t)bo + bc + VMBR_PAGE_BYTES - 1) / VMBR_PAGE_BYTES;
            pos += 8;
            if ((uint64_t)(end - pos) < 8 * pages)
                return mark_corrupt(r, VMBR_BAD_GPA_HEADER, (uint32_t)pages);
            pos += (uint32_t)(8 * pages);
        }
    } else if (d->type == VMBR_PKT_DATA_USING_XFER_PAGES) {
        /* xfer_pageset_id u16, sender_owns_set u8, reserved u8, range_cnt u32 */
        if (end < pos + 8)
            return mark_corrupt(r, VMBR_BAD_XFER_HEADER, end - pos);
        memcpy(&cnt, p + pos + 4, 4);
        if ((uint64_t)cnt * 8 > end - pos - 8)
            return mark_corrupt(r, VMBR_BAD_XFER_HEADER, cnt);
    }
    return 0;
}

int64_t vmbr_drain(struct vmbr_ring *r, char *out, uint32_t out_cap, uint32_t batch_bytes,
                   uint32_t *starts, uint32_t max_packets, uint32_t *count)
{
    r->peeked = 0; /* any other read invalidates a pending peek */
    *count = 0;
    if (r->corrupt)
        return VMBR_E_CORRUPT;
    uint32_t w;
    if (load_write_index(r, &w))
        return VMBR_E_CORRUPT;
    uint32_t pos = 0, n = 0;
    while (n < max_packets && pos < batch_bytes) {
        struct vmbr_desc d;
        int64_t len = next_packet(r, w, &d);
        if (len <= 0)
            break; /* empty, or damaged: deliver what was good; the error is sticky */
        if ((uint64_t)pos + (uint64_t)len > out_cap) {
            if (n == 0)
                return mark_corrupt(r, VMBR_BAD_TOO_BIG, (uint32_t)len);
            break;
        }
        memcpy(out + pos, &d, VMBR_DESC_BYTES);
        copy_out(r, wrap(r->index + VMBR_DESC_BYTES, r->data_bytes), out + pos + VMBR_DESC_BYTES,
                 (uint32_t)len - VMBR_DESC_BYTES);
        if (check_ext(r, out + pos, &d)) /* (types 7 and 9; 0 for the others) */
            break; /* not handed out: deliver what was good; the error is sticky */
        starts[2 * n] = pos;
        starts[2 * n + 1] = pos + (uint32_t)d.offset8 * 8u;
        n++;
        pos += (uint32_t)len;
        r->index = wrap(r->index + (uint32_t)len + VMBR_TRAILER_BYTES, r->data_bytes);
        r->bytes += (uint64_t)len - (uint64_t)d.offset8 * 8u;
    }
    *count = n;
    starts[2 * n] = pos; /* the end of the last packet */
    r->packets += n;
    int64_t sig = vmbr_commit_read(r);
    if (r->corrupt)
        return VMBR_E_CORRUPT;
    return sig;
}

int64_t vmbr_drain_into(struct vmbr_ring *r, char *dst, uint32_t dst_cap,
                        struct vmbr_pinfo *infos, uint32_t max_packets, uint32_t *count)
{
    r->peeked = 0; /* any other read invalidates a pending peek */
    *count = 0;
    if (r->corrupt)
        return VMBR_E_CORRUPT;
    uint32_t w;
    if (load_write_index(r, &w))
        return VMBR_E_CORRUPT;
    uint32_t pos = 0, n = 0;
    int64_t stop = 0;
    while (n < max_packets) {
        struct vmbr_desc d;
        int64_t len = next_packet(r, w, &d);
        if (len <= 0)
            break; /* empty, or damaged: deliver what was good; the error is sticky */
        if (d.type == VMBR_PKT_DATA_USING_XFER_PAGES || d.type == VMBR_PKT_DATA_USING_GPA_DIRECT) {
            stop = VMBR_DRAIN_EXT_NEXT;
            break;
        }
        uint32_t off = (uint32_t)d.offset8 * 8u, plen = (uint32_t)len - off;
        if ((uint64_t)pos + plen > dst_cap) {
            stop = VMBR_E_INVAL;
            break;
        }
        copy_out(r, wrap(r->index + off, r->data_bytes), dst + pos, plen);
        infos[n].type = d.type;
        infos[n].flags = d.flags;
        infos[n].payload_bytes = plen;
        infos[n].trans_id = d.trans_id;
        n++;
        pos += plen;
        r->index = wrap(r->index + (uint32_t)len + VMBR_TRAILER_BYTES, r->data_bytes);
        r->bytes += plen;
    }
    *count = n;
    r->packets += n;
    int64_t sig = vmbr_commit_read(r);
    if (r->corrupt)
        return n ? 0 : VMBR_E_CORRUPT; /* the error comes with the next call */
    if (n == 0 && stop)
        return stop;
    return sig;
}

int64_t vmbr_drain_io(struct vmbr_ring *r)
{
    uint32_t n;
    /* (the count must fit AUX; the owner keeps io_max within it anyway) */
    uint32_t max = r->io_max < VMBR_IO_MAX_PACKETS ? r->io_max : VMBR_IO_MAX_PACKETS;
    int64_t rc = vmbr_drain(r, r->io_out, r->io_cap, r->io_batch, r->io_starts, max, &n);
    if (n == 0)
        return rc < 0 ? rc : 0;
    int64_t got = (int64_t)n << VMBR_IO_AUX_SHIFT | r->io_starts[2 * n];
    if (rc < 0)
        return got | (int64_t)VMBR_IO_BROKEN;
    return rc == VMBR_DRAIN_SIGNAL ? got | (int64_t)VMBR_IO_SIGNAL : got;
}

/* Poll an empty ring for up to io_spin_ns with interrupts masked (we are
 * polling: the writer need not signal); bytes readable, 0, or an error. */
static int64_t spin_masked(struct vmbr_ring *r)
{
    if (r->corrupt)
        return VMBR_E_CORRUPT;
    vmbr_mask_interrupts(r);
    return vmbr_spin_readable(r, r->io_spin_ns);
}

/* The latency paths' first half: poll, then validate the next packet into
 * *d.  Its length; or 0 (nothing came), an error, or VMBR_IO_EXT_NEXT alone
 * (a type 7 or 9 packet: not taken here, its header is validated on the
 * batch path). */
static int64_t spin_next_plain(struct vmbr_ring *r, struct vmbr_desc *d)
{
    int64_t avail = spin_masked(r);
    if (avail <= 0)
        return avail;
    int64_t len = peek_next(r, d);
    if (len <= 0)
        return len;
    if (d->type == VMBR_PKT_DATA_USING_XFER_PAGES || d->type == VMBR_PKT_DATA_USING_GPA_DIRECT)
        return (int64_t)VMBR_IO_EXT_NEXT;
    if (len > r->io_cap)
        return mark_corrupt(r, VMBR_BAD_TOO_BIG, (uint32_t)len);
    return len;
}

/* A taken packet's VMBR_IO_SIGNAL, from what vmbr_commit_read returned. */
static inline int64_t io_signal(int64_t sig)
{
    return sig == VMBR_READ_SIGNAL ? (int64_t)VMBR_IO_SIGNAL : 0;
}

int64_t vmbr_spin_read_io(struct vmbr_ring *r)
{
    struct vmbr_desc d;
    int64_t len = spin_next_plain(r, &d);
    if (len <= 0 || len == (int64_t)VMBR_IO_EXT_NEXT)
        return len;
    int64_t sig = take_one(r, &d, (uint32_t)len, r->io_out);
    if (sig < 0)
        return sig;
    return (int64_t)d.offset8 * 8 << VMBR_IO_AUX_SHIFT | len | io_signal(sig);
}

int64_t vmbr_spin_read_payload_io(struct vmbr_ring *r)
{
    struct vmbr_desc d;
    int64_t len = spin_next_plain(r, &d);
    if (len <= 0 || len == (int64_t)VMBR_IO_EXT_NEXT)
        return len;
    uint32_t off = (uint32_t)d.offset8 * 8u, plen = (uint32_t)len - off;
    copy_out(r, wrap(r->index + off, r->data_bytes), r->io_out, plen);
    step_over(r, (uint32_t)len, plen);
    int64_t sig = vmbr_commit_read(r);
    if (sig < 0)
        return sig;
    return (int64_t)1 << VMBR_IO_AUX_SHIFT | plen | io_signal(sig);
}

int64_t vmbr_exchange_io(struct vmbr_ring *r, const char *payload, uint32_t payload_bytes)
{
    /* Anything but the plain case goes back to the caller unsent, whose
     * slow path writes and reads with the usual calls (and errors). */
    struct vmbr_ring *w = r->io_reply_to;
    if (w == NULL || r->corrupt)
        return (int64_t)VMBR_XCHG_UNSENT;
    int64_t rc = vmbr_write(w, VMBR_PKT_DATA_INBAND, 0, payload, payload_bytes);
    if (rc != VMBR_WRITE_DONE)
        return rc == VMBR_WRITE_SIGNAL ? (int64_t)VMBR_XCHG_SIGNAL : (int64_t)VMBR_XCHG_UNSENT;
    rc = vmbr_spin_read_payload_io(r);
    if (rc > 0 && rc < (int64_t)VMBR_IO_SIGNAL)
        return rc & VMBR_IO_END_MASK; /* the answer, nothing owed: its length alone */
    if (rc < 0)
        return (int64_t)(VMBR_XCHG_READ | VMBR_IO_BROKEN); /* r->corrupt says why */
    return (int64_t)VMBR_XCHG_READ | rc;
}

int64_t vmbr_read_into(struct vmbr_ring *r, char *hdr, uint32_t hdr_cap, char *dst,
                       uint32_t dst_cap, uint32_t *payload_bytes)
{
    *payload_bytes = 0;
    struct vmbr_desc d;
    int64_t len = peek_next(r, &d);
    if (len <= 0)
        return len;
    uint32_t off = (uint32_t)d.offset8 * 8u, plen = (uint32_t)len - off;
    if (off > hdr_cap || plen > dst_cap)
        return VMBR_E_INVAL; /* nothing consumed: the caller may retry bigger */
    memcpy(hdr, &d, VMBR_DESC_BYTES);
    if (off > VMBR_DESC_BYTES)
        copy_out(r, wrap(r->index + VMBR_DESC_BYTES, r->data_bytes), hdr + VMBR_DESC_BYTES,
                 off - VMBR_DESC_BYTES);
    copy_out(r, wrap(r->index + off, r->data_bytes), dst, plen);
    *payload_bytes = plen;
    step_over(r, (uint32_t)len, plen);
    int64_t sig = vmbr_commit_read(r);
    if (sig < 0)
        return sig;
    return len | sig; /* (sig: 0 or VMBR_READ_SIGNAL, bit 0 of a multiple of 8) */
}

int64_t vmbr_peek(struct vmbr_ring *r, struct vmbr_view *v)
{
    struct vmbr_desc d;
    int64_t len = peek_next(r, &d);
    if (len <= 0)
        return len;
    uint32_t off = (uint32_t)d.offset8 * 8u, plen = (uint32_t)len - off;
    v->type = d.type;
    v->flags = d.flags;
    v->offset_bytes = off;
    v->packet_bytes = (uint32_t)len;
    v->trans_id = d.trans_id;
    v->first_off = wrap(r->index + off, r->data_bytes);
    uint32_t room = r->data_bytes - v->first_off;
    v->first_len = plen <= room ? plen : room;
    v->second_len = plen - v->first_len;
    r->peeked = (uint32_t)len;
    r->peeked_payload = plen;
    return len;
}

int64_t vmbr_consume(struct vmbr_ring *r, uint32_t commit)
{
    if (r->corrupt)
        return VMBR_E_CORRUPT;
    if (!r->peeked)
        return VMBR_E_INVAL;
    uint32_t len = r->peeked;
    r->peeked = 0;
    step_over(r, len, r->peeked_payload);
    return commit ? vmbr_commit_read(r) : 0;
}

int64_t vmbr_bytes_readable(struct vmbr_ring *r)
{
    uint32_t w;
    if (r->corrupt || load_write_index(r, &w))
        return VMBR_E_CORRUPT;
    return readable(r->index, w, r->data_bytes);
}

void vmbr_mask_interrupts(struct vmbr_ring *r)
{
    if (r->corrupt)
        return;
    /* The promise first (see publish_write): a writer that sees our mask must
     * see the promise it was set under.  Relaxed: the mask's release store
     * below orders it.  A reader that cannot keep the promise, or will not
     * this time (it unmasked less than heavy_gap_ns ago), withdraws it,
     * also one an earlier reader of this ring left.  A writer may still have
     * seen a promise we withdraw (with a mask left set), so a reader that can
     * run the barrier still owes it then.  Each is stored only when it
     * differs, as the mask is. */
    uint32_t want = 0;
    if (r->heavy & 2u) /* already masked under the promise */
        want = VMBR_READER_HEAVY_BARRIER;
    else if (r->heavy & 1u && now_ns() - r->heavy_ns >= r->heavy_gap_ns)
        want = VMBR_READER_HEAVY_BARRIER; /* (it has not slept for a while) */
    uint32_t cur = atomic_load_explicit(SHARED(r, VMBR_OFF_VIRIDIAN), memory_order_relaxed);
    if (cur != want)
        atomic_store_explicit(SHARED(r, VMBR_OFF_VIRIDIAN), want, memory_order_relaxed);
    if (want || (cur && r->heavy & 1u))
        r->heavy |= 2u; /* the next unmask owes the heavy barrier */
    /* Masking is only an optimisation: a writer that still sees the old 0
     * sends one spurious signal, which the eventfd absorbs.  Stored only when
     * it is not 1 already: a busy reader masks before every poll, and a
     * store would take the control page's cache line from the writer (which
     * reads the mask on every write) each time; a load leaves it shared.
     * (The peer may have changed it: then we store, as before.)  Release:
     * orders the promise above before the mask. */
    if (atomic_load_explicit(SHARED(r, VMBR_OFF_INTERRUPT_MASK), memory_order_relaxed) != 1)
        atomic_store_explicit(SHARED(r, VMBR_OFF_INTERRUPT_MASK), 1, memory_order_release);
}

int64_t vmbr_unmask_interrupts(struct vmbr_ring *r)
{
    if (r->corrupt)
        return VMBR_E_CORRUPT;
    if (r->heavy & 1u)
        r->heavy_ns = now_ns(); /* a reader that unmasks often will not promise */
    /* Relaxed store, ordered by the barrier below. */
    atomic_store_explicit(SHARED(r, VMBR_OFF_INTERRUPT_MASK), 0, memory_order_relaxed);
    if (r->heavy & 2u) {
        r->heavy &= ~2u;
        /* The promised barrier, in place of the fence: it makes every running
         * registered writer execute a full barrier, so a writer that read our
         * mask = 1 and skipped its fence has its write_index store visible to
         * the re-check below, or sees the mask = 0 on its next write. */
        if (membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED) == 0)
            return vmbr_bytes_readable(r);
        /* Cannot fail once the kernel said it is supported; if it does, stop
         * promising (fence below, every later writer fences too). */
        r->heavy = 0;
        atomic_store_explicit(SHARED(r, VMBR_OFF_VIRIDIAN), 0, memory_order_relaxed);
    }
    /* Full fence: orders the mask store before the write_index re-check.
     * Without it the writer could publish a packet and read our stale
     * mask = 1 (no signal) while we read its stale write_index (ring empty):
     * we would sleep with a packet in the ring. */
    atomic_thread_fence(memory_order_seq_cst);
    return vmbr_bytes_readable(r);
}

int64_t vmbr_spin_readable(struct vmbr_ring *r, uint64_t spin_ns)
{
    uint64_t deadline = 0;
    for (uint32_t i = 0;; i++) {
        int64_t avail = vmbr_bytes_readable(r);
        if (avail != 0)
            return avail;
        if (!spin_ns)
            return 0;
        if ((i & 63u) == 0) {
            uint64_t t = now_ns();
            if (!deadline)
                deadline = t + spin_ns;
            else if (t >= deadline)
                return 0;
        }
        cpu_relax();
    }
}
