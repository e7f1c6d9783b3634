"""The echo device: the smallest useful VSP/VSC pair (demo and benchmarks).

Protocol (Viridian's own; class GUID ``ECHO_CLASS_ID``):

* OPENCHANNEL userdata: ``b"viridian-echo\\0"`` (14 bytes), then one mode byte
  (0 echo, 1 sink), then zeros.  Anything else: the VSP refuses the open
  (status 1).
* echo mode: an inband packet with completion requested is answered with a
  completion packet (type 0xB) carrying the same trans_id and payload.  One
  without completion requested is counted and dropped.
* sink mode: every packet is counted and dropped (no per-packet work in the
  root: the streaming benchmark's channel).

The VSC's workload ``stream`` (``viridian demo``; control op ``workload``)
keeps ``window`` requests of ``size`` bytes in flight for ``seconds`` (0:
until ``stop``), checking every echo against what was sent; in sink mode it
keeps the ring full instead.
"""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Sequence
from typing import Any

from partitions.devices.framework import DeviceClass, DeviceError, Vsc, Vsp, register
from vmbus.packet import Packet, PacketType

__all__ = ["ECHO", "ECHO_CLASS_ID", "MODE_ECHO", "MODE_SINK", "EchoVsc", "EchoVsp"]

ECHO_CLASS_ID = uuid.UUID("5f1c1a3e-7d0b-4c8e-9a49-76697269646e")  # ends in "viridn"
MAGIC = b"viridian-echo\0"
MODE_ECHO = 0
MODE_SINK = 1
_MODES = {"echo": MODE_ECHO, "sink": MODE_SINK}
_SEQ = struct.Struct("<Q")
_PATTERN = bytes(range(256)) * 256  # 64 KiB


def _payload(seq: int, size: int) -> bytes:
    if size < 8:
        return _SEQ.pack(seq)[:size]
    return _SEQ.pack(seq) + _PATTERN[: size - 8]


class EchoVsp(Vsp):
    """Root side: echo requests back as completions (or count, in sink mode)."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.mode = MODE_ECHO
        self.echoed = 0
        self.dropped = 0

    def accept(self) -> int:
        ud = self.userdata
        if ud[: len(MAGIC)] != MAGIC or ud[len(MAGIC)] not in (MODE_ECHO, MODE_SINK) or any(
            ud[len(MAGIC) + 1 :]
        ):
            self.log("echo: bad OPENCHANNEL userdata", level="warning", child=self.child)
            return 1
        self.mode = ud[len(MAGIC)]
        return 0

    def on_packets(self, pkts: Sequence[Packet]) -> None:
        if self.mode == MODE_SINK:
            self.dropped += len(pkts)
            return
        for p in pkts:
            if p.packet_type != PacketType.DATA_INBAND:
                raise DeviceError(f"echo takes inband packets, not type {p.packet_type:#x}")
            if p.completion_requested:
                if not self.complete(p.trans_id, p.payload):
                    raise DeviceError("the child does not read its completions (backlog full)")
                self.echoed += 1
            else:
                self.dropped += 1

    def stats(self) -> dict[str, Any]:
        return {"mode": "sink" if self.mode == MODE_SINK else "echo", "echoed": self.echoed,
                "dropped": self.dropped}


class EchoVsc(Vsc):
    """Child side: the ``stream`` workload and a blocking ``echo`` helper."""

    @classmethod
    def open_userdata(cls, config: dict[str, Any]) -> bytes:
        mode = _MODES.get(str(config.get("mode", "echo")))
        if mode is None:
            raise ValueError(f"echo mode must be echo or sink, not {config.get('mode')!r}")
        return (MAGIC + bytes([mode])).ljust(120, b"\0")

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.mode = _MODES.get(str(self.config.get("mode", "echo")), MODE_ECHO)
        self.streaming = False
        self.size = 1024
        self.window = 32
        self.until = 0.0
        self.sent = 0
        self.echoes = 0
        self.mismatches = 0
        self._expect: dict[int, int] = {}  # trans_id -> seq
        self._seq = 0

    # -- workload --------------------------------------------------------------
    def on_open(self) -> None:
        if self.config.get("stream"):
            self.workload("stream", dict(self.config))

    def workload(self, action: str, args: dict[str, Any]) -> str:
        if action == "stop":
            self.streaming = False
            return "stopped"
        if action != "stream":
            raise ValueError(f"echo has workloads stream and stop, not {action!r}")
        size = int(args.get("size", 1024))
        window = int(args.get("window", 32))
        seconds = float(args.get("seconds", 0))
        limit = self.channel.outgoing.max_payload_bytes
        if not 1 <= size <= limit or not 1 <= window <= 4096 or seconds < 0:
            raise ValueError(f"stream needs 1 <= size <= {limit}, 1 <= window <= 4096, "
                             "seconds >= 0")
        self.size, self.window = size, window
        self.until = time.monotonic() + seconds if seconds else float("inf")
        self.streaming = True
        self._fill()
        return f"streaming {size}-byte packets, window {window}"

    def _fill(self) -> None:
        if not self.streaming or self.closed:
            return
        if time.monotonic() >= self.until:
            self.streaming = False
            return
        if self.mode == MODE_SINK:
            payloads = [_payload(self._seq + i, self.size) for i in range(64)]
            while True:
                n = self.channel.outgoing.write_many(payloads)
                self.sent += n
                self._seq += n
                if n < len(payloads):
                    self._want_space(self.size)
                    return
                if time.monotonic() >= self.until:
                    self.streaming = False
                    return
        while len(self._expect) < self.window:
            seq = self._seq
            tid = self.request(_payload(seq, self.size), self._on_echo)
            if tid is None:
                return  # ring full: on_writable comes
            self._expect[tid] = seq
            self._seq += 1
            self.sent += 1

    def _on_echo(self, pkt: Packet) -> None:
        seq = self._expect.pop(pkt.trans_id, None)
        # payloads come back padded to 8 bytes (VMBus carries no exact length)
        if seq is None or pkt.payload[: self.size] != _payload(seq, self.size):
            self.mismatches += 1
        else:
            self.echoes += 1
        if self.streaming:
            self._fill()

    def on_writable(self) -> None:
        self._fill()

    def on_packet(self, pkt: Packet) -> None:
        raise DeviceError(f"echo VSC got an unexpected packet (type {pkt.packet_type:#x})")

    # -- a blocking helper (tests, benchmarks) ------------------------------------
    def echo(self, payload: bytes, timeout: float = 5.0) -> bytes:
        """Send one request and wait for its echo, serving nothing else."""
        tid = self.new_trans_id()
        if not self.channel.send(payload, timeout, trans_id=tid, completion_requested=True):
            raise TimeoutError("echo: no ring space")
        deadline = time.monotonic() + timeout
        while True:
            pkt = self.channel.recv(max(0.0, deadline - time.monotonic()))
            if pkt is None:
                raise TimeoutError("echo: no completion")
            if pkt.trans_id == tid and pkt.packet_type == PacketType.COMP:
                return pkt.payload

    def stats(self) -> dict[str, Any]:
        return {"mode": "sink" if self.mode == MODE_SINK else "echo",
                "streaming": self.streaming, "sent": self.sent, "echoes": self.echoes,
                "mismatches": self.mismatches, "in_flight": len(self._expect)}


ECHO = register(DeviceClass(
    "echo", ECHO_CLASS_ID, EchoVsp, EchoVsc, send_ring_pages=33, recv_ring_pages=33,
    description="echoes requests as completions (demo, benchmarks)",
))
