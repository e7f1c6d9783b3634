"""The numbers partitions and the supervisor agree on: defined once, here.

Layer: hv (the lowest one: imports nothing from the project).  Codes and
layouts from the spec (``shared/spec/vmbus-protocol.md`` §4): hypercall call
codes, HV_STATUS values, the privilege bits the router checks, SynIC sizes,
the VMBus connection IDs; the page size; and the limits of Viridian's own
hypercalls (codes >= 0x8000), with the connection ID plan the supervisor
gives the root.  Every other module imports these names from here (the C
ring's ``VMBR_PAGE_BYTES`` is the C side's own; tests/test_build.py checks
that it agrees with ``PAGE_SIZE``).

Trust: constants only; nothing here reads input.
"""

from __future__ import annotations

import enum

__all__ = [
    "CONNECTION_ID_MASK",
    "FLAGS_PER_SINT",
    "HOST_RESERVE_BYTES",
    "HOT_ADD_ALIGN_BYTES",
    "HV_MESSAGE_SIZE",
    "HV_MESSAGE_TYPE_VMBUS",
    "MAX_MEMORY_RANGES",
    "MAX_PAYLOAD",
    "MAX_SHARE_PAGES",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PORT_BUFFER_COUNT",
    "POST_MESSAGE_INPUT_SIZE",
    "ROOT_EVENT_BASE",
    "ROOT_MESSAGE_BASE",
    "SIGNAL_EVENT_INPUT_SIZE",
    "SINT_COUNT",
    "VMBUS_EVENT_CONNECTION_ID",
    "VMBUS_MESSAGE_CONNECTION_ID",
    "VMBUS_MESSAGE_CONNECTION_ID_4",
    "VMBUS_SINT",
    "HvStatus",
    "HypercallCode",
    "Privilege",
]

# --- memory -----------------------------------------------------------------------

PAGE_SIZE = 4096  # one guest page (a PFN's worth); every GPA, grant and ring counts in these
PAGE_SHIFT = 12

# --- constants from the spec (§4) -------------------------------------------------

HV_MESSAGE_SIZE = 256  # one SynIC message slot
MAX_PAYLOAD = 240  # HV_MESSAGE_PAYLOAD_BYTE_COUNT
PORT_BUFFER_COUNT = 16  # HV_PORT_MESSAGE_BUFFER_COUNT
SINT_COUNT = 16
FLAGS_PER_SINT = 2048
VMBUS_SINT = 2
CONNECTION_ID_MASK = 0x00FFFFFF  # 24 valid bits
VMBUS_MESSAGE_CONNECTION_ID = 1  # well-known IDs (spec §4.3)
VMBUS_MESSAGE_CONNECTION_ID_4 = 4  # INITIATE_CONTACT for versions >= 5.0 (spec §3.1)
VMBUS_EVENT_CONNECTION_ID = 2
HV_MESSAGE_TYPE_VMBUS = 1
POST_MESSAGE_INPUT_SIZE = 256
SIGNAL_EVENT_INPUT_SIZE = 8

# --- Viridian's connection ID plan (the supervisor's router table, hv/services.py) ---

ROOT_MESSAGE_BASE = 0x10000  # + child id: root -> child messages
ROOT_EVENT_BASE = 0x20000  # + child id: root -> child events

# --- limits of Viridian's own hypercalls ------------------------------------------

MAX_SHARE_PAGES = 4096  # PFNs per VIRIDIAN_SHARE_PAGES call (32 KiB of input)
MAX_MEMORY_RANGES = 510  # ranges per balloon / unballoon call (a DM message's worth)
HOT_ADD_ALIGN_BYTES = 128 << 20  # new ranges start on a 128 MiB boundary (spec §7.3)
HOST_RESERVE_BYTES = 256 << 20  # a hot-add leaves at least this much host memory available


class HypercallCode(enum.IntEnum):
    """Hypercall call codes.  Codes >= 0x8000 are Viridian extensions (no
    Hyper-V call uses them): they carry what a real hypervisor does through
    its own memory management (sharing pages with the root for GPADLs)."""

    POST_MESSAGE = 0x005C
    SIGNAL_EVENT = 0x005D
    VIRIDIAN_SHARE_PAGES = 0x8001  # in: u32 count, u32 rsvdz, u64 pfn[count]; out: u64 grant id
    VIRIDIAN_REVOKE_GRANT = 0x8002  # in: u64 grant id; out: nothing
    # root only.  in: u32 child id, u32 relid; out: u64 doorbell-pair id, and
    # two eventfds on the reply (root's, child's); the child gets the same
    # two fds in a runtime frame {"op": "doorbells", "relid", "pair"}.
    VIRIDIAN_CHANNEL_DOORBELLS = 0x8003
    # Dynamic Memory, root only (the DM VSP asks; the supervisor owns memory):
    # in: u32 child, u32 rsvdz, u64 bytes; out: u64 start pfn, u64 page count
    VIRIDIAN_MEMORY_HOT_ADD = 0x8004
    # in: u32 child, u32 count, u64 range[count] (start pfn | pages << 40); out: u64 pages
    VIRIDIAN_MEMORY_BALLOON = 0x8005
    # in: u32 child, u32 rsvdz, u64 max pages; out: u32 count, u32 rsvdz, u64 range[count]
    VIRIDIAN_MEMORY_UNBALLOON = 0x8006


class HvStatus(enum.IntEnum):
    """HV_STATUS values (TLFS; the spec's §4.2 list plus their neighbours)."""

    SUCCESS = 0x0000
    INVALID_HYPERCALL_CODE = 0x0002
    INVALID_HYPERCALL_INPUT = 0x0003
    INVALID_ALIGNMENT = 0x0004
    INVALID_PARAMETER = 0x0005
    ACCESS_DENIED = 0x0006
    INVALID_PARTITION_STATE = 0x0007
    OPERATION_DENIED = 0x0008
    INSUFFICIENT_MEMORY = 0x000B
    INVALID_PARTITION_ID = 0x000D
    INVALID_VP_INDEX = 0x000E
    NOT_FOUND = 0x0010
    INVALID_PORT_ID = 0x0011
    INVALID_CONNECTION_ID = 0x0012
    INSUFFICIENT_BUFFERS = 0x0013
    INVALID_SYNIC_STATE = 0x0018
    OBJECT_IN_USE = 0x0019


class Privilege(enum.IntFlag):
    """The bits of HV_PARTITION_PRIVILEGE_MASK the router checks."""

    POST_MESSAGES = 1 << 36
    SIGNAL_EVENTS = 1 << 37

    @classmethod
    def default(cls) -> Privilege:
        return cls.POST_MESSAGES | cls.SIGNAL_EVENTS
