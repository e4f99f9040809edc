"""The lock role of one BLE connection: bytes from the gateway in, bytes to notify out.

Sans-I/O like the protocol it drives: the radio layer (memory link or Bumble) calls
:meth:`LinkDriver.receive` with each GATT write and ``now``, and sends what
:meth:`LinkDriver.data_to_send` returns as notifications. Any protocol error closes the link
(``closed`` becomes true and the radio layer disconnects); the lock's state is unchanged.

With a :class:`~firmware_sim.persist.LockStore`, every change the lock made is written before
:meth:`LinkDriver.receive` returns, so before any answer can leave: a lock never tells of an
actuation, a pairing or a log entry it has not persisted. A write that fails closes the link
and discards what was queued, unanswered (``error`` holds the OSError); the model stays ahead of
its file and the next link writes it before answering anything, even a repeated ``cmd_id``.
"""

from __future__ import annotations

from firmware_sim.lock_model import LockModel
from firmware_sim.persist import LockStore
from protocols.errors import ProtocolError
from protocols.messages import ErrorCode, LinkRole, Op, Response, Status, is_allowed
from protocols.session import (
    Event,
    LockConnection,
    PairingAttempted,
    PairingCompleted,
    RequestReceived,
    Rng,
    State,
)

__all__ = ["LinkDriver"]


class LinkDriver:
    def __init__(self, model: LockModel, *, rng: Rng, now: float, store: LockStore | None = None) -> None:
        self.model = model
        self.store = store
        code = model.pairing_code(now)
        refusal = ErrorCode.NOT_IN_PAIRING_MODE
        if model.is_locked_out(now):
            refusal = ErrorCode.RATE_LIMITED
        self._conn = LockConnection(
            lock_id=model.lock_id,
            rng=rng,
            keys=model.keys(),
            setup_code=code,
            pairing_refusal=refusal,
            attempts_left=model.attempts_left() if code is not None else None,
        )
        self.error: ProtocolError | OSError | None = None
        #: Until when (``now`` seconds) this link may write to the SMP service (Op.SMP_OPEN).
        self.smp_until: float = 0.0

    def smp_open(self, now: float) -> bool:
        """True while an authenticated SMP_OPEN on this link has not expired."""
        return self._conn.peer is not None and now < self.smp_until

    @property
    def closed(self) -> bool:
        return self._conn.state is State.CLOSED

    def data_to_send(self) -> bytes:
        return self._conn.data_to_send()

    def receive(self, data: bytes, now: float) -> None:
        if self.closed:
            return
        self.model.tick(now)  # an auto-relock is written before anything else happens
        if not self._persist():
            return
        try:
            events = self._conn.receive_data(data)
        except ProtocolError as exc:
            self.error = exc
            return
        for event in events:
            response = self._handle(event, now)
            # On disk before anything is answered: the failure count before PAIR_RESPONSE
            # leaves, the key before PAIR_DONE, an actuation or log entry before its response.
            if not self._persist():
                return
            if response is not None:
                self._conn.send_response(response)

    def _handle(self, event: Event, now: float) -> Response | None:
        if isinstance(event, PairingAttempted):
            self.model.pairing_attempted(now)
        elif isinstance(event, PairingCompleted):
            self.model.paired(event.gw_id, event.ltk, now)
        elif isinstance(event, RequestReceived):
            request = event.request
            role = LinkRole.GATEWAY if self._conn.peer else LinkRole.UNAUTHENTICATED
            if not is_allowed(role, request.op):
                return Response(request.op, request.cmd_id, Status.DENIED, {})
            if request.op is Op.SMP_OPEN:
                secs = int(str(request.args["secs"]))
                self.smp_until = now + secs
                return Response(request.op, request.cmd_id, Status.OK, {"secs": secs})
            if self.model.unhealthy:
                return Response(request.op, request.cmd_id, Status.FAILED, {"error": "unhealthy image"})
            return self.model.execute(request, now)
        return None

    def _persist(self) -> bool:
        """Write the model if its file is behind; on failure close the link unanswered."""
        if self.store is None:
            return True
        try:
            self.store.sync(self.model)
        except OSError as exc:
            self.error = exc
            self._conn.data_to_send()  # discarded: nothing leaves that is not on disk
            self._conn.close()
            return False
        return True
