"""The lock role of one BLE connection: bytes from the gateway in, bytes to notify out.

Sans-I/O like the protocol it drives: the radio layer (memory link or Bumble) calls
:meth:`LinkDriver.receive` with each GATT write and ``now``, and sends what
:meth:`LinkDriver.data_to_send` returns as notifications. Any protocol error closes the link
(``closed`` becomes true and the radio layer disconnects); the lock's state is unchanged.
"""

from __future__ import annotations

from firmware_sim.lock_model import LockModel
from protocols.errors import ProtocolError
from protocols.messages import ErrorCode, LinkRole, Response, Status, is_allowed
from protocols.session import (
    LockConnection,
    PairingAttempted,
    PairingCompleted,
    RequestReceived,
    Rng,
    State,
)

__all__ = ["LinkDriver"]


class LinkDriver:
    def __init__(self, model: LockModel, *, rng: Rng, now: float) -> None:
        self.model = model
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
        self.error: ProtocolError | None = None

    @property
    def closed(self) -> bool:
        return self._conn.state is State.CLOSED

    def data_to_send(self) -> bytes:
        return self._conn.data_to_send()

    def receive(self, data: bytes, now: float) -> None:
        if self.closed:
            return
        self.model.tick(now)
        try:
            events = self._conn.receive_data(data)
        except ProtocolError as exc:
            self.error = exc
            return
        for event in events:
            if isinstance(event, PairingAttempted):
                self.model.pairing_attempted(now)
            elif isinstance(event, PairingCompleted):
                self.model.paired(event.gw_id, event.ltk, now)
            elif isinstance(event, RequestReceived):
                request = event.request
                role = LinkRole.GATEWAY if self._conn.peer else LinkRole.UNAUTHENTICATED
                if not is_allowed(role, request.op):
                    response = Response(request.op, request.cmd_id, Status.DENIED, {})
                else:
                    response = self.model.execute(request, now)
                self._conn.send_response(response)
