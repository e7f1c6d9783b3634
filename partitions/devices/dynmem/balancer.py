"""The memory balancer: Hyper-V's Dynamic Memory policy, sans-IO.

Layer: partitions (root).  Each child with ``dynamic`` memory reports its
committed pages every second (DM STATUS_REPORT).  The balancer wants each
child to have

    target = clamp(committed x (1 + buffer/100), minimum, maximum)

and moves memory toward it: more memory by unballooning first (cheap: the
pages exist) and hot-adding in 128 MiB blocks after that; less memory by
ballooning, at most ``MAX_BALLOON_STEP`` at a time, never below the minimum.
Small differences are left alone (``ADD_SLACK`` / ``REMOVE_SLACK``) so it
does not oscillate.  When the host cannot give every child what it wants,
children are served by memory weight, highest first, and a child is never
given more than the host can give.

``plan`` is pure: it takes the children's state and the host's available
bytes and returns the actions; ``manager.py`` carries them out
through the DM VSPs (one operation per child at a time) and the supervisor
enforces the limits again, whatever the balancer or a child says.
"""

from __future__ import annotations

from dataclasses import dataclass

from hv.abi import HOST_RESERVE_BYTES, HOT_ADD_ALIGN_BYTES

__all__ = ["ADD_SLACK", "BLOCK_BYTES", "Action", "ChildMemory", "plan"]

MiB = 1 << 20
BLOCK_BYTES = HOT_ADD_ALIGN_BYTES  # hot-add unit (spec §7.3: 128 MiB memory blocks)
ADD_SLACK = 16 * MiB  # below target by less than this: leave it
REMOVE_SLACK = 64 * MiB  # above target by less than this: leave it
MAX_BALLOON_STEP = 256 * MiB


@dataclass
class ChildMemory:
    """What the balancer knows about one child (bytes)."""

    name: str
    visible: int  # what the child uses now (committed + available pages)
    committed: int  # its demand (DM STATUS_REPORT num_committed)
    minimum: int
    maximum: int
    buffer: int = 20  # percent
    weight: int = 5000
    ballooned: int = 0  # bytes the balloon holds (unballoon before hot-add)
    busy: bool = False  # an operation is outstanding

    @property
    def target(self) -> int:
        want = self.committed * (100 + self.buffer) // 100
        want = -(-want // (2 * MiB)) * (2 * MiB)  # whole 2 MiB, as Linux balloons
        return max(self.minimum, min(self.maximum, want))


@dataclass(frozen=True)
class Action:
    child: str
    op: str  # "unballoon" | "hot-add" | "balloon"
    bytes: int


def plan(children: list[ChildMemory], host_available: int) -> list[Action]:
    """The next actions, at most one per child."""
    actions: list[Action] = []
    budget = max(0, host_available - HOST_RESERVE_BYTES)  # never the host's last bytes
    # first what comes back: ballooning frees host memory for the others
    for c in children:
        if c.busy:
            continue
        extra = c.visible - c.target
        if extra >= REMOVE_SLACK and c.visible > c.minimum:
            amount = min(extra, MAX_BALLOON_STEP, c.visible - c.minimum)
            amount -= amount % (2 * MiB)
            if amount > 0:
                actions.append(Action(c.name, "balloon", amount))
    # then who needs more, by weight (highest first), within what the host has
    needy = [c for c in children
             if not c.busy and c.target - c.visible >= ADD_SLACK and c.visible < c.maximum]
    for c in sorted(needy, key=lambda c: (-c.weight, c.name)):
        need = min(c.target, c.maximum) - c.visible
        if c.ballooned > 0:
            give = min(need, c.ballooned)
            actions.append(Action(c.name, "unballoon", give))  # pages exist: no host cost
            continue
        block = -(-need // BLOCK_BYTES) * BLOCK_BYTES
        block = min(block, c.maximum - c.visible)
        block -= block % (2 * MiB)
        if block <= 0:
            continue
        if block > budget:
            block = budget - budget % BLOCK_BYTES or budget - budget % (2 * MiB)
            if block < need or block <= 0:
                continue  # the host cannot give enough: lower weights wait
        budget -= block
        actions.append(Action(c.name, "hot-add", block))
    return actions
