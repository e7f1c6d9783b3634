/*
 * vmbus_ring.h - the per-packet hot path of a Hyper-V VMBus ring buffer.
 *
 * One ring = one 4096-byte control page followed by the data area, exactly as
 * Hyper-V lays it out (struct hv_ring_buffer in Linux, vmbus_bufring in DPDK,
 * Control in OpenVMM's vmbus_ring).  Every packet is a 16-byte descriptor, an
 * optional extended header, the payload padded with zeros to 8 bytes and an
 * 8-byte trailer whose upper 32 bits hold the packet's start offset.
 *
 * This file is the only place where Viridian touches a ring's shared memory.
 * It does no allocation, no system call (bar the vDSO clock in the bounded
 * spin), no signalling and no policy: it moves bytes, validates what the peer
 * wrote and *returns* whether the peer must be signalled.  The Python layer in
 * vmbus/ring.py owns everything else.
 *
 * Trust: everything in the shared mapping may be rewritten by the peer at any
 * moment.  Each shared field is loaded once into a local, validated, and only
 * the local is used; packets are copied out before any field is interpreted.
 * A violation makes the ring sticky-corrupt (r->corrupt != 0) and every later
 * call returns VMBR_E_CORRUPT.
 *
 * The part between "cdef begin" and "cdef end" is also fed to cffi's cdef().
 */
#ifndef VIRIDIAN_VMBUS_RING_H
#define VIRIDIAN_VMBUS_RING_H

#include <stddef.h>
#include <stdint.h>

/* cdef begin */
#define VMBR_ABI_VERSION 17

#define VMBR_PAGE_BYTES 4096
#define VMBR_CONTROL_BYTES 4096
#define VMBR_MIN_RING_BYTES 8192
#define VMBR_FEAT_PENDING_SEND_SZ 1
#define VMBR_DESC_BYTES 16
#define VMBR_TRAILER_BYTES 8
#define VMBR_MAX_PACKET_BYTES 524280 /* len8 is a u16: 65535 * 8 */
#define VMBR_FLAG_COMPLETION_REQUESTED 1

/* Control-page offsets (Hyper-V's struct hv_ring_buffer). */
#define VMBR_OFF_WRITE_INDEX 0
#define VMBR_OFF_READ_INDEX 4
#define VMBR_OFF_INTERRUPT_MASK 8
#define VMBR_OFF_PENDING_SEND_SZ 12
#define VMBR_OFF_FEATURE_BITS 64
/* Viridian's own word, in bytes Hyper-V reserves (reserved2; a real peer
 * leaves them 0), on a cache line of its own.  Owned by the reader. */
#define VMBR_OFF_VIRIDIAN 128
#define VMBR_READER_HEAVY_BARRIER 1 /* see vmbr_mask_interrupts below */

/* Packet types accepted by the reader (OpenVMM accepts exactly these). */
#define VMBR_PKT_DATA_INBAND 6
#define VMBR_PKT_DATA_USING_XFER_PAGES 7
#define VMBR_PKT_DATA_USING_GPA_DIRECT 9
#define VMBR_PKT_COMP 11

/*
 * Return codes.  Calls that move packets return a non-negative count or
 * length on success; errors are negative.  Flow control (empty, full) is not
 * an error.
 */
#define VMBR_E_CORRUPT -1  /* the peer broke the ring; see r->corrupt       */
#define VMBR_E_TOO_BIG -2  /* the packet can never fit in this ring         */
#define VMBR_E_INVAL -3    /* a caller error: bad extended-header length... */

/*
 * The result vocabulary.  Every call that moves packets answers with one
 * int64_t: negative is one of the errors above, anything else is made of the
 * fields and flags below, each named here once (cffi reads these names from
 * this block; vmbus/ring.py uses them by name).  The static assertions in
 * vmbus_ring.c, and tests/unit/test_ring_results.py from Python, prove that
 * no two fields of one encoding share a bit for any value the protocol
 * allows (offset8 and len8 up to 65535, lengths up to the ring size).
 * (cffi's cdef takes only plain literals: each value's shift is its comment.)
 */

/* type_flags, the writers' first argument: packet type | descriptor flags
 * << 16 (one argument instead of two: each costs ~8 ns in cffi). */
#define VMBR_TF_FLAGS_SHIFT 16
#define VMBR_TF_COMPLETION_REQUESTED 0x10000 /* FLAG_COMPLETION_REQUESTED << 16 */

/* The writers (vmbr_write, _write_ext, _write_batch, _write_gather): */
#define VMBR_WRITE_FULL 0   /* nothing written: no room now (not an error)    */
#define VMBR_WRITE_DONE 1   /* written (a batch: *written of them)            */
#define VMBR_WRITE_SIGNAL 2 /* written, and the reader must be signalled      */
/* vmbr_write4: how many it wrote << VMBR_W4_COUNT_SHIFT | a VMBR_WRITE_*. */
#define VMBR_W4_STATUS_MASK 0xFF
#define VMBR_W4_COUNT_SHIFT 8

/* The readers that copy whole packets (vmbr_read, vmbr_read_into) return
 * the packet's length (a multiple of 8) | VMBR_READ_SIGNAL; those that only
 * publish (vmbr_commit_read, vmbr_consume) 0 | VMBR_READ_SIGNAL. */
#define VMBR_READ_SIGNAL 1  /* the writer must be signalled                  */
/* vmbr_drain and vmbr_drain_into: 0, VMBR_DRAIN_SIGNAL, or (vmbr_drain_into
 * with *count 0 only) VMBR_DRAIN_EXT_NEXT. */
#define VMBR_DRAIN_SIGNAL 1   /* the writer must be signalled                 */
#define VMBR_DRAIN_EXT_NEXT 2 /* the next packet is a type 7/9: not taken     */

/*
 * The one-argument reader calls (vmbr_drain_io, vmbr_spin_read_io,
 * vmbr_spin_read_payload_io) pack their answer (cffi returns one integer
 * ~100 ns faster than the caller reads fields back): 0 = nothing came, or
 *   bits  0-31  END    bytes now in io_out (the packet, the payload, or the
 *                      batch's end): at most io_cap, a u32
 *   bits 32-51  AUX    drain_io: packets in the batch (at most io_max, which
 *                      is clamped to VMBR_IO_MAX_PACKETS); spin_read_io: the
 *                      payload's offset in the packet, offset8 * 8 <= 524280
 *                      < 2^20; spin_read_payload_io: 1 (one packet taken)
 *   bit  52     VMBR_IO_SIGNAL    the writer must be signalled
 *   bit  53     VMBR_IO_EXT_NEXT  alone: the next packet is a type 7/9, not
 *                                 taken (its header is checked on the batch
 *                                 path); nothing consumed
 *   bit  54     VMBR_IO_BROKEN    drain_io: the ring broke after the packets
 *                                 of this batch (deliver them, then fail);
 *                                 exchange_io (with VMBR_XCHG_READ): the read
 *                                 broke the ring, nothing taken
 * Every flag lies above every field: a result 0 < rc < VMBR_IO_SIGNAL is one
 * plain answer with nothing else to do, the callers' one-comparison path.
 */
#define VMBR_IO_END_MASK 0xFFFFFFFF
#define VMBR_IO_AUX_SHIFT 32
#define VMBR_IO_AUX_MASK 0xFFFFF            /* 20 bits                       */
#define VMBR_IO_MAX_PACKETS 0xFFFFF         /* = VMBR_IO_AUX_MASK            */
#define VMBR_IO_SIGNAL 0x10000000000000     /* 1 << 52                       */
#define VMBR_IO_EXT_NEXT 0x20000000000000   /* 1 << 53                       */
#define VMBR_IO_BROKEN 0x40000000000000     /* 1 << 54                       */

/*
 * vmbr_exchange_io: below VMBR_XCHG_ANSWER_LIMIT, the answer's payload length
 * alone (nothing else to do); otherwise exactly one of these, never negative:
 */
#define VMBR_XCHG_ANSWER_LIMIT 0x100000000  /* 1 << 32 = VMBR_IO_END_MASK + 1 */
#define VMBR_XCHG_UNSENT 0x80000000000000   /* 1 << 55: nothing written or read */
#define VMBR_XCHG_SIGNAL 0x100000000000000  /* 1 << 56: written, signal owed,
                                             * nothing read                   */
#define VMBR_XCHG_READ 0x200000000000000    /* 1 << 57: written; | the read's
                                             * VMBR_IO_* answer (0: nothing
                                             * came; VMBR_IO_BROKEN: the read
                                             * broke the ring)                */

/* Why a ring was declared corrupt (r->corrupt). */
#define VMBR_BAD_WRITE_INDEX 1    /* write_index not < data size or not 8-aligned   */
#define VMBR_BAD_READ_INDEX 2     /* read_index not < data size or not 8-aligned    */
#define VMBR_BAD_PARTIAL 3        /* fewer than 24 bytes readable but not zero       */
#define VMBR_BAD_LENGTHS 4        /* offset8 < 2, offset8 > len8 or len8*8+8 > avail */
#define VMBR_BAD_TYPE 5           /* packet type outside {6, 7, 9, 11}              */
#define VMBR_BAD_FLAGS 6          /* a flag bit other than COMPLETION_REQUESTED     */
#define VMBR_BAD_TOO_BIG 7        /* packet larger than the reader's copy buffer    */
#define VMBR_BAD_EXT_HEADER 8     /* unused since ABI 12 (now 10 and 11)            */
#define VMBR_CLOSED 9             /* not corruption: the endpoint was closed        */
#define VMBR_BAD_GPA_HEADER 10    /* type 9 header inconsistent (vmbr_drain)        */
#define VMBR_BAD_XFER_HEADER 11   /* type 7 header inconsistent (vmbr_drain)        */

/*
 * Private state of one ring endpoint.  It lives in the owner's private memory,
 * never in the shared mapping; Python allocates it with ffi.new().
 * All indices here are this endpoint's own, trusted values.
 */
struct vmbr_ring {
    uint8_t *base;          /* control page; the data area starts at +4096      */
    uint32_t data_bytes;    /* ring bytes - 4096; a multiple of 4096            */
    uint32_t index;         /* writer: next write offset; reader: next read     */
    uint32_t published;     /* the index value last stored to shared memory     */
    uint32_t pending_set;   /* writer: we left a non-zero pending_send_sz       */
    uint32_t corrupt;       /* 0, or a VMBR_BAD_* reason (sticky)               */
    uint32_t bad_value;     /* the offending value, for the error message       */
    uint32_t peeked;        /* reader: bytes of the packet vmbr_peek validated  */
    uint32_t peer_index;    /* writer: read_index as last seen (validated)      */
    uint32_t peeked_payload; /* reader: payload bytes of the peeked packet      */
    /* Reader I/O parameters for the one-argument calls (vmbr_drain_io,
     * vmbr_spin_read_io): cffi passes one argument through a fast path
     * (METH_O) but packs several into a tuple, ~100 ns more per call.
     * Set once by the owner; private memory like the rest of this struct. */
    char *io_out;           /* the read-ahead buffer                            */
    uint32_t *io_starts;    /* 2 * io_max + 1 entries, see vmbr_drain           */
    uint32_t io_cap;        /* bytes of io_out                                  */
    uint32_t io_batch;      /* stop adding packets past this many bytes         */
    uint32_t io_max;        /* most packets per batch                           */
    uint32_t heavy;         /* bit 0: membarrier(2) GLOBAL_EXPEDITED usable (a
                             * writer: registered as its target); bit 1: reader:
                             * the mask may be set under the heavy-barrier
                             * promise (see vmbr_mask_interrupts)               */
    uint64_t io_spin_ns;    /* how long vmbr_spin_read_io polls an empty ring   */
    struct vmbr_ring *io_reply_to; /* reader: the outgoing ring vmbr_exchange_io
                             * writes on (NULL: none); set by the owner, who
                             * keeps that ring's struct alive while it is set  */
    uint64_t packets;       /* packets moved through this endpoint              */
    uint64_t bytes;         /* payload bytes moved                              */
    uint64_t signals;       /* times we told the caller to signal the peer      */
    uint64_t signals_suppressed; /* publications that needed no signal         */
    uint64_t full;          /* writer: writes refused for lack of space         */
    uint64_t heavy_ns;      /* reader: when it last unmasked (CLOCK_MONOTONIC)  */
    uint64_t heavy_gap_ns;  /* reader: promise only this long after an unmask
                             * (vmbr_attach sets VMBR_HEAVY_GAP_NS)              */
};

/* A reader that unmasked (was about to sleep) less than this many ns ago
 * masks without the promise: it fences like a reader without membarrier(2). */
#define VMBR_HEAVY_GAP_NS 10000000

/* A snapshot of the shared control page, for debug_info(); raw, unvalidated. */
struct vmbr_snapshot {
    uint32_t write_index;
    uint32_t read_index;
    uint32_t interrupt_mask;
    uint32_t pending_send_sz;
    uint32_t feature_bits;
};

/* Where the next packet's payload lies in the data area (zero-copy reads). */
struct vmbr_view {
    uint16_t type;
    uint16_t flags;
    uint32_t offset_bytes;  /* offset8 * 8: payload offset inside the packet */
    uint32_t packet_bytes;  /* len8 * 8                                      */
    uint64_t trans_id;
    uint32_t first_off;     /* payload part 1: data-area offset and length   */
    uint32_t first_len;
    uint32_t second_len;    /* payload part 2 (after a wrap) starts at 0     */
};

/* What vmbr_drain_into reports per packet (its payload went to dst). */
struct vmbr_pinfo {
    uint16_t type;
    uint16_t flags;
    uint32_t payload_bytes;
    uint64_t trans_id;
};

void vmbr_init_control(uint8_t *base);
void vmbr_close(struct vmbr_ring *r);
int vmbr_attach(struct vmbr_ring *r, uint8_t *base, uint64_t ring_bytes, int outgoing);
void vmbr_snapshot(const struct vmbr_ring *r, struct vmbr_snapshot *s);

int64_t vmbr_write(struct vmbr_ring *r, uint32_t type_flags, uint64_t trans_id,
                   const char *payload, uint32_t payload_bytes);
int64_t vmbr_write_ext(struct vmbr_ring *r, uint32_t type_flags, uint64_t trans_id,
                       const char *ext, uint32_t ext_bytes,
                       const char *payload, uint32_t payload_bytes);
int64_t vmbr_write_batch(struct vmbr_ring *r, uint32_t type_flags, uint64_t trans_id,
                         const char *blob, const uint32_t *lens, uint32_t count,
                         uint32_t *written);
int64_t vmbr_write_gather(struct vmbr_ring *r, uint32_t type_flags, uint64_t trans_id,
                          char **payloads, const uint32_t *lens, uint32_t count,
                          uint32_t *written);
int64_t vmbr_write4(struct vmbr_ring *r, uint32_t type_flags, uint64_t trans_id, uint32_t count,
                    const char *p0, uint32_t n0, const char *p1, uint32_t n1,
                    const char *p2, uint32_t n2, const char *p3, uint32_t n3);
int64_t vmbr_bytes_writable(struct vmbr_ring *r);
int64_t vmbr_set_pending(struct vmbr_ring *r, uint32_t need_bytes);

int64_t vmbr_read(struct vmbr_ring *r, char *out, uint32_t out_cap);
int64_t vmbr_read_into(struct vmbr_ring *r, char *hdr, uint32_t hdr_cap,
                       char *dst, uint32_t dst_cap, uint32_t *payload_bytes);
int64_t vmbr_drain(struct vmbr_ring *r, char *out, uint32_t out_cap, uint32_t batch_bytes,
                   uint32_t *starts, uint32_t max_packets, uint32_t *count);
int64_t vmbr_drain_into(struct vmbr_ring *r, char *dst, uint32_t dst_cap,
                        struct vmbr_pinfo *infos, uint32_t max_packets, uint32_t *count);
int64_t vmbr_drain_io(struct vmbr_ring *r);
int64_t vmbr_spin_read_io(struct vmbr_ring *r);
int64_t vmbr_spin_read_payload_io(struct vmbr_ring *r);
int64_t vmbr_exchange_io(struct vmbr_ring *r, const char *payload, uint32_t payload_bytes);
int64_t vmbr_peek(struct vmbr_ring *r, struct vmbr_view *v);
int64_t vmbr_consume(struct vmbr_ring *r, uint32_t commit);
int64_t vmbr_commit_read(struct vmbr_ring *r);
int64_t vmbr_bytes_readable(struct vmbr_ring *r);
void vmbr_mask_interrupts(struct vmbr_ring *r);
int64_t vmbr_unmask_interrupts(struct vmbr_ring *r);

int64_t vmbr_spin_readable(struct vmbr_ring *r, uint64_t spin_ns);
int64_t vmbr_spin_writable(struct vmbr_ring *r, uint32_t need_bytes, uint64_t spin_ns);
/* cdef end */

/*
 * Return conventions, in detail:
 *
 * vmbr_init_control: zeroes the 4096-byte control page and sets
 *   FEAT_PENDING_SEND_SZ.  Preconditions: no peer is attached yet.
 *
 * vmbr_attach: fills *r.  Preconditions: base points at ring_bytes writable
 *   bytes.  Returns 0, VMBR_E_INVAL (size not a multiple of 4096, below 8192
 *   or above 2 GiB) or VMBR_E_CORRUPT (our starting index, read once from the
 *   shared page, is out of range or unaligned).
 *
 * vmbr_close: detaches r from its memory; every later call on r returns
 *   VMBR_E_CORRUPT with r->corrupt == VMBR_CLOSED and touches no memory.
 *
 * vmbr_write: one inband (6) or completion (11) packet (descriptor, payload,
 *   zero padding, trailer), published at once.  type_flags: see
 *   VMBR_TF_FLAGS_SHIFT.  Returns VMBR_WRITE_FULL (nothing written),
 *   VMBR_WRITE_DONE, VMBR_WRITE_SIGNAL, or a negative error (any other type
 *   gives VMBR_E_INVAL: 7 and 9 need vmbr_write_ext).
 *
 * vmbr_write_ext: a type 7 or 9 packet, with its extended header between
 *   descriptor and payload; ext_bytes must be a multiple of 8.
 *
 * vmbr_write_batch: the payloads laid end to end in blob, lens[i] bytes each;
 *   writes as many as fit, in order, publishes once.  *written = how many.
 *   Returns a VMBR_WRITE_* as vmbr_write for the whole batch (FULL: none
 *   written).
 *
 * vmbr_read: copies the next packet, descriptor included, into out and
 *   publishes read_index.  Returns 0 when empty; otherwise len8*8 |
 *   VMBR_READ_SIGNAL if the writer must be signalled (lengths are multiples
 *   of 8, so bit 0 is free); or a negative error.  out_cap must be >= the largest packet the
 *   ring can hold (Python uses min(data_bytes - 8, VMBR_MAX_PACKET_BYTES)).
 *
 * vmbr_read_into: copies the next packet's descriptor and extended header
 *   into hdr and its payload into dst (the zero-extra-copy path for large
 *   payloads) and publishes.  *payload_bytes = the payload length.  Returns
 *   as vmbr_read, or VMBR_E_INVAL (nothing consumed) when hdr or dst is too
 *   small for this packet.
 *
 * vmbr_drain: up to max_packets packets, each copied to out back to back
 *   (8-aligned), one publication.  starts[2i] is where packet i starts in
 *   out and starts[2i+1] where its payload starts; starts[2*count] is the end
 *   of the last packet (= where packet i's payload ends, for the last one),
 *   so starts must hold 2 * max_packets + 1 entries.  Stops before a packet
 *   that would not fit in out_cap, and after the packet that reaches
 *   batch_bytes (a soft cap: a big batch would keep the writer's space
 *   unpublished for the whole copy).  The extended header of a type 7 or 9
 *   packet is validated on the copy (range counts, offsets and PFN lists
 *   within offset8 * 8); a bad one ends the batch before that packet and
 *   makes the ring corrupt (VMBR_BAD_GPA_HEADER / VMBR_BAD_XFER_HEADER), as
 *   any other damage does.  Returns 0 or VMBR_DRAIN_SIGNAL with *count set;
 *   or a negative error.
 *
 * vmbr_write_gather: vmbr_write_batch with the payloads where they are
 *   (payloads[i], lens[i] bytes): the path for large payloads, which a
 *   batch blob would copy once more.
 *
 * vmbr_write4: vmbr_write_gather of up to four payloads passed as arguments
 *   (count of them; the rest NULL, 0).  cffi passes a bytes object to a
 *   const char * argument without a copy or a buffer export, which
 *   ffi.from_buffer per payload costs ~150 ns.  Returns written <<
 *   VMBR_W4_COUNT_SHIFT | the VMBR_WRITE_* of vmbr_write_gather, or a
 *   negative error.
 *
 * vmbr_drain_into: the bulk path for large payloads: up to max_packets
 *   packets' payloads copied back to back into dst (each at an 8-aligned
 *   offset: payload lengths are multiples of 8), their descriptors into
 *   infos, one publication.  Stops before a packet whose payload would not
 *   fit and before a type 7 or 9 packet (whose ranges need the copy path).
 *   Returns 0 or VMBR_DRAIN_SIGNAL with *count set; VMBR_DRAIN_EXT_NEXT
 *   with *count 0 when the next packet is a type 7 or 9; VMBR_E_INVAL with
 *   *count 0 when dst cannot hold the next payload; or a negative error.
 *
 * vmbr_drain_io: vmbr_drain with the io_* fields of r, as one argument
 *   (at most VMBR_IO_MAX_PACKETS packets, whatever io_max says).  Returns
 *   AUX = count, END = end of the batch, | VMBR_IO_SIGNAL and/or
 *   VMBR_IO_BROKEN (the ring broke after these packets); 0 when empty; or
 *   a negative error.  (VMBR_IO_EXT_NEXT is never set: vmbr_drain validates
 *   the extended headers of types 7 and 9 itself.)
 *
 * vmbr_spin_read_io: the latency path: poll an empty ring for up to
 *   io_spin_ns with interrupts masked (the mask stays set; the caller clears
 *   it with vmbr_unmask_interrupts before it sleeps), then copy exactly one
 *   packet (descriptor first) to io_out.  Returns AUX = offset8 * 8,
 *   END = len8 * 8, | VMBR_IO_SIGNAL; 0 when nothing came; or a negative
 *   error.  Types 7 and 9 are not taken here (their headers are validated
 *   on the batch path): it returns VMBR_IO_EXT_NEXT alone and consumes
 *   nothing.
 *
 * vmbr_spin_read_payload_io: vmbr_spin_read_io for a reader that wants only
 *   the payload: the packet's payload (offset8 * 8 to len8 * 8) is copied to
 *   io_out, its descriptor is validated and dropped.  Returns AUX = 1 (so
 *   an empty payload is not "nothing"), END = payload bytes, |
 *   VMBR_IO_SIGNAL; 0, VMBR_IO_EXT_NEXT alone or an error as
 *   vmbr_spin_read_io.
 *
 * vmbr_exchange_io: the request/answer path: one inband packet (type 6,
 *   trans_id 0, no flags) of payload written on r->io_reply_to, then
 *   vmbr_spin_read_payload_io on r.  The read is attempted only when the
 *   write went through and owes no signal: the signal is the caller's to
 *   send, and the answer cannot come before the peer hears of the request.
 *   Never negative.  Returns the answer's payload bytes (below
 *   VMBR_XCHG_ANSWER_LIMIT; the payload is in io_out) when it was taken and
 *   nothing else is owed: the one case the caller's fast path tests with a
 *   single comparison.  Otherwise VMBR_XCHG_UNSENT (nothing written: full,
 *   an error, or no io_reply_to; the caller writes again the slow way,
 *   which reports why), VMBR_XCHG_SIGNAL (written, the reader must be
 *   signalled, nothing read) or VMBR_XCHG_READ | what
 *   vmbr_spin_read_payload_io returned (written; its other answers), with
 *   an error of the read given as VMBR_IO_BROKEN (the ring is then corrupt:
 *   r->corrupt says why).
 *
 * vmbr_peek: validates the next packet's descriptor (copied out) and reports
 *   where its payload lies in the data area, without consuming it.  Returns 0
 *   when empty, the packet length when one is there, or a negative error.
 *   vmbr_consume then steps over it; with commit != 0 it publishes at once
 *   and returns as vmbr_commit_read.
 *
 * vmbr_commit_read: publishes the private read index; returns
 *   VMBR_READ_SIGNAL if the writer must be signalled (its pending_send_sz
 *   was crossed), else 0.
 *
 * vmbr_mask_interrupts / vmbr_unmask_interrupts: the reader's batched-drain
 *   protocol.  Unmask returns the bytes readable after the re-check: if it is
 *   not 0, data raced in while masked and the caller must drain again.
 *   Where membarrier(2) MEMBARRIER_CMD_GLOBAL_EXPEDITED is available, a
 *   reader masks under a promise (VMBR_READER_HEAVY_BARRIER in the word at
 *   VMBR_OFF_VIRIDIAN, stored before the mask): the unmask that follows runs
 *   that system-wide barrier in place of its fence.  A writer that sees the
 *   mask set under the promise then skips its own fence (see publish_write).
 *   The barrier costs the rare unmask ~0.4 us (~11 us in this VM when the
 *   writer is running on the other vCPU); the fence it saves cost every
 *   write up to ~150 ns when the reader polls the same cache line.  A reader
 *   that sleeps often (a device loop at queue depth 32 unmasks every few
 *   tens of us) would pay more than it saves (measured: storvsc at QD 32
 *   lost ~10 %, even with one barrier per ms), so it promises only when its
 *   last unmask is heavy_gap_ns (VMBR_HEAVY_GAP_NS, 10 ms) old: a stream or
 *   a ping-pong that keeps it busy, not a loop that keeps going to sleep.
 *
 * vmbr_attach of an outgoing ring registers the process as a target of
 *   MEMBARRIER_CMD_GLOBAL_EXPEDITED (once per attach; idempotent), and only
 *   a registered writer skips its fence.
 *
 * vmbr_set_pending: the writer is about to wait for need_bytes of space.
 *   Publishes pending_send_sz (rounded up to 8) and returns the bytes
 *   writable after a full fence; if that already exceeds need_bytes there is
 *   nothing to wait for.
 *
 * vmbr_spin_readable / vmbr_spin_writable: poll the ring for up to spin_ns
 *   nanoseconds.  Return bytes readable (or writable) once there are any
 *   (more than need_bytes), 0 on timeout, or a negative error.
 */

#endif
