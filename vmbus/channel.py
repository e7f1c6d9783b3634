"""An open VMBus channel end: two rings in one GPADL buffer and two doorbells.

Layer: vmbus, over ``vmbus.ring`` and ``vmbus.doorbell``.  The partition
layer builds a ``Channel`` once the control plane has opened it (the child
after OPENCHANNEL_RESULT, the root after accepting OPENCHANNEL); from then on
packets and signals never involve the supervisor.

Placement (spec §1.1): the child allocates one buffer and describes it with
one GPADL.  Pages ``[0, downstream_page_offset)`` are the child->root
("outbound") ring, pages ``[downstream_page_offset, end)`` the root->child
("inbound") ring.  Each ring is a control page plus data pages.  So the child
writes the first ring and reads the second; the root does the opposite.

Signals: each end owns one doorbell (an eventfd the supervisor made for this
channel at open time) and holds the peer's.  The ring says when the peer
must be woken (empty -> non-empty with its mask clear, or pending_send_sz
crossed, spec §1.6); ``Channel`` rings the peer's doorbell exactly then.
One doorbell serves both "data arrived" and "space freed", as one channel
interrupt does in Hyper-V.

Trust: the peer may rewrite the shared pages at any time; the rings validate
every index and packet (``RingCorruptError``).  The buffer itself was mapped
by the layer above from pages the supervisor validated.
"""

from __future__ import annotations

from typing import Any

from .doorbell import Doorbell
from .packet import Packet, PacketType
from .ring import DEFAULT_SPIN_NS, PAGE_BYTES, IncomingRing, OutgoingRing, init_ring

__all__ = ["PAGE_BYTES", "Channel", "init_channel_buffer", "split_channel_buffer"]



def split_channel_buffer(buffer: Any, downstream_page_offset: int) -> tuple[memoryview, memoryview]:
    """(outbound ring, inbound ring) views of one channel buffer.

    Raises:
        ValueError: the layout breaks QEMU's rule (each ring at least two
            pages: ``offset > 1`` and ``pages > offset + 1``) or the buffer is
            not whole pages.
    """
    mv = memoryview(buffer).cast("B")
    if mv.nbytes % PAGE_BYTES:
        raise ValueError(f"a channel buffer is whole 4 KiB pages, not {mv.nbytes} bytes")
    pages = mv.nbytes // PAGE_BYTES
    off = downstream_page_offset
    if not (off > 1 and pages > off + 1):
        raise ValueError(f"ring layout: downstream offset {off} in {pages} pages")
    cut = off * PAGE_BYTES
    return mv[:cut], mv[cut:]


def init_channel_buffer(buffer: Any, downstream_page_offset: int) -> None:
    """Make both rings of a fresh channel buffer empty (the child does this
    before it describes the buffer in a GPADL)."""
    out, inb = split_channel_buffer(buffer, downstream_page_offset)
    try:
        init_ring(out)
        init_ring(inb)
    finally:
        out.release()
        inb.release()


class Channel:
    """One end of an open channel.

    Args:
        buffer: the whole ring buffer (both rings), writable.
        downstream_page_offset: where the root->child ring starts (pages).
        host: True for the root's end (it writes the second ring).
        own_doorbell: rung by the peer; this end waits on it.
        peer_doorbell: rung by this end to wake the peer.
        relid: the channel's relid (for logs and status).

    The channel owns both doorbells and closes them in ``close``.  ``buffer``
    stays the caller's (unmap it after ``close``).
    """

    def __init__(
        self,
        buffer: Any,
        downstream_page_offset: int,
        *,
        host: bool,
        own_doorbell: Doorbell,
        peer_doorbell: Doorbell,
        relid: int = 0,
    ) -> None:
        first, second = split_channel_buffer(buffer, downstream_page_offset)
        out_buf, in_buf = (second, first) if host else (first, second)
        self._views = [first, second]
        self.relid = relid
        self.host = host
        self.doorbell = own_doorbell
        self.peer_doorbell = peer_doorbell
        ring = peer_doorbell.ring
        try:
            self.outgoing = OutgoingRing(out_buf, on_signal=ring)
            self.incoming = IncomingRing(in_buf, on_signal=ring)
        except BaseException:
            for v in self._views:
                v.release()
            raise
        self.incoming.bind_reply_ring(self.outgoing)  # (for exchange)
        self._closed = False
        self.wakeups = 0  # doorbell rings consumed by service()

    # -- sending -------------------------------------------------------------
    def try_send(
        self,
        payload: bytes,
        *,
        trans_id: int = 0,
        completion_requested: bool = False,
        packet_type: PacketType = PacketType.DATA_INBAND,
    ) -> bool:
        """Write one packet; False (nothing written) when the ring is full.
        The peer's doorbell rings when the ring says it must."""
        return self.outgoing.try_write(
            payload,
            packet_type=packet_type,
            trans_id=trans_id,
            completion_requested=completion_requested,
        )

    def send(
        self,
        payload: bytes,
        timeout: float,
        *,
        trans_id: int = 0,
        completion_requested: bool = False,
        packet_type: PacketType = PacketType.DATA_INBAND,
    ) -> bool:
        """``try_send``, waiting (spin, then block on our doorbell with
        pending_send_sz published) up to ``timeout`` seconds for space.
        Returns False on timeout.  Use only where nothing else must be served
        meanwhile (a workload thread, a benchmark); event loops use
        ``try_send`` and ``request_space``."""
        return self.outgoing.write(payload, self.doorbell, timeout, trans_id=trans_id,
                                   completion_requested=completion_requested,
                                   packet_type=packet_type)

    def request_space(self, need_bytes: int) -> bool:
        """Ask to be woken when ``need_bytes`` of ring space are free (publish
        pending_send_sz); True if they already are (no wake-up will come)."""
        return self.outgoing.request_space(need_bytes)

    # -- receiving -----------------------------------------------------------
    def try_recv(self) -> Packet | None:
        return self.incoming.try_read()

    def recv(self, timeout: float, *, spin_ns: int = DEFAULT_SPIN_NS) -> Packet | None:
        """The next packet, waiting (spin, then block) up to ``timeout`` s."""
        return self.incoming.read(self.doorbell, timeout, spin_ns=spin_ns)

    def exchange(
        self, payload: bytes, timeout: float, *, spin_ns: int = DEFAULT_SPIN_NS
    ) -> bytes | None:
        """Send ``payload`` (inband, trans_id 0) and wait (spin, then block)
        up to ``timeout`` s for the next packet's payload: the round trip of
        a protocol with one request in flight, in one C call while the peer
        polls (``IncomingRing.exchange``).  None on timeout.  Like ``send``,
        only where nothing else must be served meanwhile."""
        return self.incoming.exchange(payload, self.doorbell, timeout, spin_ns=spin_ns)

    def fileno(self) -> int:
        """Our doorbell's fd (readable when the peer rang)."""
        return self.doorbell.fileno()

    def ack_doorbell(self) -> None:
        """Consume a ring of our doorbell (before draining, so a ring that
        comes during the drain is not lost)."""
        if self.doorbell.clear():
            self.wakeups += 1

    # -- state -----------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, Any]:
        """Counters and ring fill for status (one snapshot of each ring)."""
        o, i = self.outgoing.debug_info(), self.incoming.debug_info()

        def fill(info: dict[str, Any]) -> float | None:
            r = info["bytes_readable"]
            return None if r is None else round(r / info["data_bytes"], 4)

        return {
            "packets_out": o["packets"],
            "bytes_out": o["bytes"],
            "packets_in": i["packets"],
            "bytes_in": i["bytes"],
            "out_ring_fill": fill(o),
            "in_ring_fill": fill(i),
            "out_ring_bytes": o["data_bytes"],
            "in_ring_bytes": i["data_bytes"],
            "signals_sent": o["signals"] + i["signals"],
            "signals_suppressed": o["signals_suppressed"] + i["signals_suppressed"],
            "ring_full": o["full"],
            "wakeups": self.wakeups,
        }

    def close(self) -> None:
        """Detach both rings and close both doorbells (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.outgoing.close()
        self.incoming.close()
        for v in self._views:
            v.release()
        self.doorbell.close()
        self.peer_doorbell.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

