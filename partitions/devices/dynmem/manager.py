"""Dynamic Memory in the root: the children's DM VSPs, the balancer, the CLI's requests.

Layer: partitions (root).  The root's composition root builds
``MemoryManager`` over its ``VmbusHost`` (the children's DM VSPs are
channels there) and hands it the ``dm`` and ``dm.settings`` messages
(``on_frame``).  It

* keeps each child's memory settings (minimum, maximum, buffer, weight,
  dynamic) from the root's boot message and later ``dm.settings`` notices;
* runs the balancer (``balancer.plan``) when pressure reports arrive (at most
  every ``BALANCE_EVERY_S``) for children whose memory is dynamic, and
  carries out its actions through their DM VSPs;
* carries out ``dm`` requests relayed from the control socket
  (``viridian memory add``: hot-add / balloon of a given size) and answers
  them with ``dm.result``;
* reports each child's demand to the supervisor (``dm.status``), which shows
  it in ``viridian status`` and ``viridian memory``: the latest values, at
  most once per ``STATUS_EVERY_S`` (however many reports a child sends).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

from hv.abi import PAGE_SIZE
from hv.proc import host_available
from partitions.runtime import REPORT_EVERY_S

from .balancer import ChildMemory, plan

if TYPE_CHECKING:
    from hv.wire import Frame
    from partitions.devices.dynmem.device import DmVsp

__all__ = ["BALANCE_EVERY_S", "STATUS_EVERY_S", "ChildBuses", "MemoryManager"]

BALANCE_EVERY_S = 0.5
STATUS_EVERY_S = REPORT_EVERY_S  # dm.status frames to the supervisor, at most this often
_SETTINGS = ("startup", "minimum", "maximum", "buffer", "weight", "dynamic")


class ChildBuses(Protocol):
    """What the manager needs of the root's VMBus host (partitions.root's
    ``VmbusHost``, which the composition root hands it): each child's bus
    (``name``, ``channels``) and the partition runtime."""

    buses: dict[int, Any]
    rt: Any


class MemoryManager:
    def __init__(self, host: ChildBuses, children: list[dict[str, Any]]) -> None:
        self.host = host
        self.rt = host.rt
        self.settings: dict[int, dict[str, Any]] = {}
        for c in children:
            mem = c.get("memory")
            if isinstance(c.get("id"), int) and isinstance(mem, dict):
                self.settings[c["id"]] = {k: mem[k] for k in _SETTINGS if k in mem}
        self._last_balance = 0.0
        self._status_due: dict[int, DmVsp] = {}  # child -> its VSP, to report
        self.actions = 0
        self.host_available = host_available

    # -- finding a child's DM VSP ----------------------------------------------------------
    def vsp(self, child: int) -> DmVsp | None:
        bus = self.host.buses.get(child)
        if bus is None:
            return None
        for hc in bus.channels.values():
            if hc.device.name == "dynmem" and not hc.vsp.closed:
                return hc.vsp  # type: ignore[return-value]
        return None

    def _name(self, child: int) -> str:
        bus = self.host.buses.get(child)
        return bus.name if bus else str(child)

    # -- pressure reports and the balancer -----------------------------------------------------
    def on_status(self, vsp: DmVsp) -> None:
        # a child may send thousands of reports a second: one frame per
        # child per STATUS_EVERY_S, with its latest values
        if not self._status_due:
            self.rt.call_later(STATUS_EVERY_S, self._send_status)
        self._status_due[vsp.child] = vsp
        now = time.monotonic()
        if now - self._last_balance >= BALANCE_EVERY_S:
            self._last_balance = now
            self.balance()

    def _send_status(self) -> None:
        due, self._status_due = self._status_due, {}
        for vsp in due.values():
            self.rt.send({"op": "dm.status", "child": vsp.child,
                          "committed_bytes": vsp.committed_pages * PAGE_SIZE,
                          "available_bytes": vsp.avail_pages * PAGE_SIZE,
                          "ballooned_bytes": vsp.ballooned_pages * PAGE_SIZE})

    def balance(self) -> None:
        kids: list[ChildMemory] = []
        vsps: dict[str, DmVsp] = {}
        for cid, s in self.settings.items():
            v = self.vsp(cid)
            if v is None or not v.ready or not v.reports or not s.get("dynamic"):
                continue
            name = self._name(cid)
            vsps[name] = v
            # what the child has, from the root's own bookkeeping (each operation
            # the supervisor carried out), never from the child's word
            have = int(s.get("startup", 0)) + (v.hot_added_pages - v.ballooned_pages) * PAGE_SIZE
            kids.append(ChildMemory(
                name, visible=have,
                committed=v.committed_pages * PAGE_SIZE, minimum=int(s["minimum"]),
                maximum=int(s["maximum"]), buffer=int(s.get("buffer", 20)),
                weight=int(s.get("weight", 5000)), ballooned=v.ballooned_pages * PAGE_SIZE,
                busy=v.busy))
        if not kids:
            return
        for a in plan(kids, self.host_available()):
            self.actions += 1
            self._act(vsps[a.child], a.op, a.bytes, self._balancer_done(a.child, a.op, a.bytes))

    def _act(self, v: DmVsp, op: str, nbytes: int, done: Any) -> None:
        """Start ``op`` on child ``v``.  This may run inside another child's
        packet handling (its pressure report ran the balancer) or a request
        from the supervisor: whatever goes wrong is ``v``'s result, never an
        exception there."""
        answered = False

        def once(r: dict[str, Any]) -> None:
            nonlocal answered
            if not answered:
                answered = True
                done(r)

        try:
            if op == "hot-add":
                v.hot_add(nbytes, once)
            elif op == "balloon":
                v.balloon(nbytes, once)
            elif op == "unballoon":
                v.unballoon(nbytes, once)
            else:
                once({"ok": False, "error": f"unknown action {op!r}"})
        except (ConnectionError, TimeoutError):
            raise  # the supervisor link failed: the runtime's business
        except Exception as e:
            self.rt.log("dynamic memory operation failed", level="error",
                        child=self._name(v.child), action=op,
                        error=f"{type(e).__name__}: {e}"[:300])
            if v.op is not None and v.op["done"] is once:
                v.fail(f"{op} failed: {type(e).__name__}")
            once({"ok": False, "error": f"{op} failed: {type(e).__name__}"})

    def _balancer_done(self, name: str, op: str, nbytes: int) -> Any:
        def done(r: dict[str, Any]) -> None:
            self.rt.log("balancer " + op, child=name, bytes=nbytes, ok=r.get("ok"),
                        pages=r.get("pages"), ms=r.get("ms"),
                        **({"error": r["error"]} if "error" in r else {}))
            self.rt.report_soon()
        return done

    # -- requests relayed by the supervisor ----------------------------------------------------
    def on_frame(self, obj: dict[str, Any], fr: Frame | None) -> None:
        """The runtime's ``dm`` (a request) and ``dm.settings`` messages."""
        try:
            if obj.get("op") == "dm":
                self.on_request(obj)
            else:
                self.on_settings(obj)
        except (ConnectionError, TimeoutError):
            raise  # the supervisor link failed: main's business
        except Exception as e:  # a bug a child's state hit: never the root's exit
            self.rt.log("dynamic memory request failed", level="error",
                        op=obj.get("op"), error=f"{type(e).__name__}: {e}"[:300])

    def on_request(self, obj: dict[str, Any]) -> None:
        req, child, action, nbytes = obj.get("req"), obj.get("child"), obj.get("action"), \
            obj.get("bytes")

        def answer(r: dict[str, Any]) -> None:
            self.rt.send({**r, "op": "dm.result", "req": req})
            self.rt.report_soon()

        if not isinstance(child, int) or not isinstance(nbytes, int) or nbytes <= 0:
            answer({"ok": False, "error": "malformed request"})
            return
        v = self.vsp(child)
        if v is None:
            answer({"ok": False, "error": f"the dynamic memory channel of {self._name(child)} "
                    "is not open"})
            return
        if action not in ("hot-add", "balloon", "unballoon"):
            answer({"ok": False, "error": f"unknown action {action!r}"})
            return
        self._act(v, str(action), nbytes, answer)

    def on_settings(self, obj: dict[str, Any]) -> None:
        child = obj.get("child")
        mem = obj.get("memory")
        if isinstance(child, int) and isinstance(mem, dict):
            self.settings.setdefault(child, {}).update(
                {k: mem[k] for k in _SETTINGS if k in mem})
            self.balance()
