"""The old import path of the hypercall layers: a thin re-export, nothing else.

Layer: hv.  Transitional only.  hv/hypercalls.py used to hold four layers; they
now live in hv/abi.py (codes, statuses, constants), hv/wire.py (values, inputs,
frames), hv/router.py (``HypercallRouter``) and hv/client.py
(``HypercallClient``).  Nothing in this repository imports this module: it is
kept so that code written against the old path on branches still in flight
(the fuzzers of tests/fuzz import codes, constants and ``FrameDecoder`` from
here) keeps working until it merges: every public name the old module had.
Import from the modules above instead; this file goes once those branches
have moved.

Trust: defines nothing.
"""

from __future__ import annotations

from .abi import (
    CONNECTION_ID_MASK,
    FLAGS_PER_SINT,
    HOST_RESERVE_BYTES,
    HOT_ADD_ALIGN_BYTES,
    HV_MESSAGE_SIZE,
    HV_MESSAGE_TYPE_VMBUS,
    MAX_MEMORY_RANGES,
    MAX_PAYLOAD,
    MAX_SHARE_PAGES,
    PORT_BUFFER_COUNT,
    POST_MESSAGE_INPUT_SIZE,
    SIGNAL_EVENT_INPUT_SIZE,
    SINT_COUNT,
    VMBUS_EVENT_CONNECTION_ID,
    VMBUS_MESSAGE_CONNECTION_ID,
    VMBUS_MESSAGE_CONNECTION_ID_4,
    VMBUS_SINT,
    HvStatus,
    HypercallCode,
    Privilege,
)
from .client import (
    HypercallClient,
)
from .router import (
    Connection,
    ConnectionKind,
    HypercallRouter,
    SynicTarget,
)
from .wire import (
    FLAG_NO_REPLY_ON_SUCCESS,
    FRAME_HEADER_SIZE,
    MAX_FDS,
    MAX_FRAME,
    Control,
    Frame,
    FrameDecoder,
    FrameKind,
    FrameWriter,
    PostMessageInput,
    SignalEventInput,
    WireError,
    decode_control,
    decode_frame,
    decode_post_message,
    decode_reply,
    decode_reply_output,
    decode_share_pages,
    decode_signal_event,
    encode_control,
    encode_post_message,
    encode_request,
    encode_result,
    encode_share_pages,
    encode_signal_event,
    recv_frames,
    request_post_message,
    request_signal_event,
    result_status,
    send_frame,
)

__all__ = [
    "CONNECTION_ID_MASK",
    "FLAGS_PER_SINT",
    "FLAG_NO_REPLY_ON_SUCCESS",
    "FRAME_HEADER_SIZE",
    "HOST_RESERVE_BYTES",
    "HOT_ADD_ALIGN_BYTES",
    "HV_MESSAGE_SIZE",
    "HV_MESSAGE_TYPE_VMBUS",
    "MAX_FDS",
    "MAX_FRAME",
    "MAX_MEMORY_RANGES",
    "MAX_PAYLOAD",
    "MAX_SHARE_PAGES",
    "PORT_BUFFER_COUNT",
    "POST_MESSAGE_INPUT_SIZE",
    "SIGNAL_EVENT_INPUT_SIZE",
    "SINT_COUNT",
    "VMBUS_EVENT_CONNECTION_ID",
    "VMBUS_MESSAGE_CONNECTION_ID",
    "VMBUS_MESSAGE_CONNECTION_ID_4",
    "VMBUS_SINT",
    "Connection",
    "ConnectionKind",
    "Control",
    "Frame",
    "FrameDecoder",
    "FrameKind",
    "FrameWriter",
    "HvStatus",
    "HypercallClient",
    "HypercallCode",
    "HypercallRouter",
    "PostMessageInput",
    "Privilege",
    "SignalEventInput",
    "SynicTarget",
    "WireError",
    "decode_control",
    "decode_frame",
    "decode_post_message",
    "decode_reply",
    "decode_reply_output",
    "decode_share_pages",
    "decode_signal_event",
    "encode_control",
    "encode_post_message",
    "encode_request",
    "encode_result",
    "encode_share_pages",
    "encode_signal_event",
    "recv_frames",
    "request_post_message",
    "request_signal_event",
    "result_status",
    "send_frame",
]
