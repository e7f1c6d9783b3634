"""Fuzz the supervisor's side of a child's I/O-port intercepts
(``hv.intercept.route.InterceptRoute``): the child writes any words into its slot
(sequence number, op, port, size, value) and rings, the worker answers or
goes away, in any order.

Allowed: nothing escapes ``on_exit`` / ``on_done`` / ``worker_gone``.  Also
checked: only a claimed port with a valid op and size reaches the worker, and
with its value cut to the access size; every answer the child gets is of its
access's width; the supervisor writes nothing in the child's slot but the
answer words.
"""

from __future__ import annotations

from collections.abc import Iterator

from _fuzzlib import Reader, Writer, instrumented, main

with instrumented():
    from hv import intercept as I
    from hv.intercept.route import InterceptRoute
    from partitions.devices.storage.ide.ata import IDE_PORTS

WORDS = [I.REQ, I.OP, I.PORT, I.SIZE, I.VALUE, I.DONE, I.RESULT, I.IRQS]
PORTS = [0x1F0, 0x1F7, 0x3F6, 0xC000, 0xC004, 0x1F8, 0x170, None]
CHILD_WRITE, TRAP, WORKER_ANSWER, ATTACH, GONE = range(5)
STEPS = [CHILD_WRITE, CHILD_WRITE, CHILD_WRITE, TRAP, TRAP, WORKER_ANSWER, ATTACH, GONE]


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    route = InterceptRoute(ports=list(IDE_PORTS))
    try:
        route.worker_attached = r.flag()
        cw, ww = route.child.w, route.worker.w
        seq = 0
        for _ in range(32):
            if not r.left():
                break
            step = r.pick(STEPS)
            if step == CHILD_WRITE:
                word = r.pick(WORDS)
                if word == I.REQ:  # a new access (or the same number again)
                    if r.flag():
                        seq = (seq + 1) & 0xFFFFFFFF
                    cw.store(I.REQ, seq)
                elif word == I.PORT:
                    port = r.pick(PORTS)
                    cw.store(word, r.u16() if port is None else port)
                else:
                    v = r.pick([0, 1, 2, 4, 3, None])
                    cw.store(word, r.u32() if v is None else v)
            elif step == TRAP:
                before = {w: cw.load(w) for w in (I.REQ, I.OP, I.PORT, I.SIZE, I.VALUE)}
                wreq, unclaimed = ww.load(I.REQ), route.unclaimed
                route.on_exit()
                after = {w: cw.load(w) for w in (I.REQ, I.OP, I.PORT, I.SIZE, I.VALUE)}
                assert after == before, "the supervisor wrote the child's request words"
                op, port, size = before[I.OP], before[I.PORT], before[I.SIZE]
                if ww.load(I.REQ) != wreq:  # forwarded: a claimed port, checked fields
                    assert op in (I.IN, I.OUT) and size in (1, 2, 4)
                    assert port in route._claimed and route.worker_attached
                    assert ww.load(I.VALUE) == before[I.VALUE] & I.MASK[size]
                elif route.unclaimed > unclaimed:  # answered at once: a floating bus
                    assert cw.load(I.STATUS) == I.STATUS_NO_DEVICE
                    assert cw.load(I.DONE) == before[I.REQ]
                    want = I.MASK.get(size, 0xFFFFFFFF) if op == I.IN else 0
                    assert cw.load(I.RESULT) == want
            elif step == WORKER_ANSWER:  # the worker writes its slot, then rings
                if r.flag():
                    ww.store(I.RESULT, r.u32())
                    ww.store(I.IRQS, r.u32())
                    ww.store(I.DONE, ww.load(I.REQ) if r.below(4) else r.u32())
                size = route._size
                pending = route._pending
                route.on_done()
                if pending is not None and route._pending is None:
                    assert cw.load(I.RESULT) <= I.MASK[size]
            elif step == ATTACH:
                route.worker_attached = True
            else:
                route.worker_gone()
                assert route._pending is None
    finally:
        route.close()


def seeds() -> Iterator[bytes]:
    def access(w: Writer, op: int, port: int, size: int, value: int) -> Writer:
        w.pick(STEPS, CHILD_WRITE).pick(WORDS, I.OP).below(6, [0, 1, 2, 4, 3].index(op))
        w.pick(STEPS, CHILD_WRITE).pick(WORDS, I.PORT).pick(PORTS, port)
        w.pick(STEPS, CHILD_WRITE).pick(WORDS, I.SIZE).below(6, [0, 1, 2, 4, 3].index(size))
        w.pick(STEPS, CHILD_WRITE).pick(WORDS, I.VALUE).below(6, 5).u32(value)
        return w.pick(STEPS, CHILD_WRITE).pick(WORDS, I.REQ).flag(True).pick(STEPS, TRAP)

    w = Writer().flag(True)
    access(w, I.IN, 0x1F7, 1, 0)
    w.pick(STEPS, WORKER_ANSWER).flag(True).u32(0x50).u32(1).below(4, 1)
    access(w, I.OUT, 0xC004, 4, 0x10000)
    w.pick(STEPS, WORKER_ANSWER).flag(True).u32(0).u32(1).below(4, 1)
    access(w, I.IN, 0x170, 1, 0)  # no device there
    access(w, I.OUT, 0x1F0, 2, 0x12345)
    w.pick(STEPS, GONE)
    yield w.done()


if __name__ == "__main__":
    main(TestOneInput)
