"""VMBus for Viridian: rings, packets, doorbells (and, above them, channels).

Public names are re-exported here; modules starting with ``_`` are private.
"""

from .doorbell import Doorbell as Doorbell
from .errors import RingCorruptError as RingCorruptError
from .errors import VmbusError as VmbusError
from .packet import GpaRange as GpaRange
from .packet import Packet as Packet
from .packet import PacketType as PacketType
from .packet import TransferPageRange as TransferPageRange
from .ring import IncomingRing as IncomingRing
from .ring import OutgoingRing as OutgoingRing
from .ring import PacketBatch as PacketBatch
from .ring import PacketView as PacketView
from .ring import ReadInfo as ReadInfo
from .ring import ReadInfoBatch as ReadInfoBatch
from .ring import init_ring as init_ring
from .ring import packet_bytes as packet_bytes

__all__ = [
    "Doorbell",
    "GpaRange",
    "IncomingRing",
    "OutgoingRing",
    "Packet",
    "PacketBatch",
    "PacketType",
    "PacketView",
    "ReadInfo",
    "ReadInfoBatch",
    "RingCorruptError",
    "TransferPageRange",
    "VmbusError",
    "init_ring",
    "packet_bytes",
]
