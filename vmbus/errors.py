"""Errors of the vmbus package: one base class, specific subclasses.

Flow control (a full or empty ring, a wait that timed out) is never an
exception; these are for a peer that broke the protocol and for misuse.
"""

from __future__ import annotations


class VmbusError(Exception):
    """Base class of every error the vmbus package raises on purpose."""


class RingCorruptError(VmbusError):
    """The peer broke the ring: a bad index, length, type, flag or header.

    The ring stays unusable afterwards (every later call raises again); the
    layer above closes the channel.  ``reason`` is a short machine-readable
    word and ``value`` the offending value as read (once) from the ring.
    """

    def __init__(self, reason: str, value: int, detail: str = "") -> None:
        self.reason = reason
        self.value = value
        msg = f"ring corrupt: {reason} (value {value:#x})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)
