"""Link scheduling across many locks on one adapter.

* ``max_connections`` slots; waiters are served by priority (access requests before
  housekeeping), first come first served within a priority — no starvation of unlocks.
* Connection attempts are serialised (one pending LE connection per controller; Bumble and
  many BlueZ controllers allow only one), by priority (an unlock's connect goes before the
  status polls' queued ahead of it), each time-boxed by the lock client.
* One command at a time per lock, through a per-lock gate with the same priority waiters (CONTRACT
  §8.14): an unlock queued behind thirty status commands on its lock runs next, after the one
  in progress. Links are opened on demand and closed after ``idle_s`` without use to spare
  batteries; a link gives its slot up after its current command when someone waits for one
  (so a lock kept busy by a status flood hands its slot to another lock's unlock).
* A failed attempt is retried on a new link with **the same command id** (the lock's
  idempotency cache answers without actuating again), after :func:`gateway.backoff.backoff_for`;
  the gate is let go during the backoff, so a retrying status never holds up an unlock.
* Every command has an overall deadline, ``COMMAND_DEADLINE_S`` from the call, whatever the HCI
  layer below does (a stalled controller answers nothing, and a wait for its one command slot or
  its pending connect is not bounded by the per-step timeouts): past it the caller gets
  :class:`~gateway.errors.LockUnreachable` (``lock_unreachable``) at once, and the attempt is
  cancelled and its link closed in the background — the lock's gate is held until that is done.

* **Connect on challenge** (:meth:`LinkManager.prepare`): a phone that asked for a challenge
  signs its proof next, and its unlock follows within a second or two. The link to that lock and
  its session handshake are started at once — its connect after any waiting unlock's, before
  status polls' (``Priority.PREPARE``) — and the ready link is *held*
  for ``hold_s``; the unlock then finds it open (the advert wait, connection set-up, discovery
  and handshake were spent while the phone signed). A held link is taken only from a free slot
  (never by waiting for one), is idle in every other respect (any unlock for another lock that
  needs a slot closes it), at most half the slots are held at once, and an unclaimed one is
  closed when its hold ends.
* **Warm sessions**: after an access command, its link stays open ``warm_s`` (instead of
  ``idle_s``) for the next command on the lock, under the same rules as a held link.
* **Battery budget**: holds and warm sessions are granted to a lock only while its connected
  time in the last hour is under ``budget_s_per_hour``; every lock's connected seconds in the
  last hour are reported (:meth:`LinkManager.report`, the control socket's ``ping``).

``LinkManager`` is an async context manager owning a TaskGroup with its reaper task.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import itertools
import os
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from bleak.backends.client import BaseBleakClient

from gateway import log
from gateway.backoff import backoff_for, should_retry
from gateway.ble.lock_client import LockClient
from gateway.ble.registry import LockRecord
from gateway.errors import BleError, LockUnreachable
from gateway.tasks import cancelling_until_done
from protocols.cbor import CborValue
from protocols.limits import COMMAND_ID_LEN
from protocols.messages import Op, Response
from protocols.session import PairingCompleted

__all__ = ["LinkManager", "Priority"]

#: Connect + discovery + subscribe for one attempt. A lock in range advertises several times a
#: second (the simulator every 20 ms, real units every 100-1000 ms) and a link is up in well
#: under a second; 5 s covers a few advertising intervals and a busy controller, and an
#: unreachable lock fails in seconds rather than holding the person at the door for 30.
CONNECT_TIMEOUT_S = 5.0
#: Attempts for a lock that could not be connected at all (LockUnreachable): one retry covers a
#: lock busy with another central for a moment; more only stretch the wait for a lock that is
#: gone (out of range, flat battery). Other link failures keep the backoff policy's attempts.
UNREACHABLE_ATTEMPTS = 2
#: The most a caller waits for one command, queueing, connects, retries and backoffs included.
#: An unreachable lock fails by itself in about 10.6 s (2 connects of 5 s and a 0.5 s backoff);
#: a live lock answers in under a second. 15 s is what a person at the door is asked to wait at
#: most, and what a frozen controller (THREATS A9) costs a request.
COMMAND_DEADLINE_S = 15.0
#: A held or warm link's default budget: connected seconds per lock per hour (5 %).
BUDGET_S_PER_HOUR = 180.0
_HOUR_S = 3600.0

_log = log.get("links")


class Priority(enum.IntEnum):
    ACCESS = 0  # unlock / lock requests from people at the door
    PREPARE = 1  # connect on challenge: after any waiting unlock's connect, before status polls
    INTERACTIVE = 2  # status, pairing, technician commands
    HOUSEKEEPING = 3  # log fetches, periodic status refreshes
    FIRMWARE = 4  # firmware upload chunks: only while nobody else waits (docs/firmware.md)


class _Slots:
    """Counting semaphore with priority waiters."""

    def __init__(self, n: int) -> None:
        self.free = n
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for *_, f in self._waiters if not f.done())

    def waiting_before(self, priority: Priority) -> int:
        """Waiters more urgent than ``priority``."""
        return sum(1 for p, _, f in self._waiters if p < priority and not f.done())

    def try_acquire(self) -> bool:
        """A slot if one is free and nobody waits; never waits."""
        if self.free > 0 and not self.waiting:
            self.free -= 1
            return True
        return False

    async def acquire(self, priority: Priority) -> None:
        if self.free > 0 and not self.waiting:
            self.free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (int(priority), next(self._order), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # we were handed a slot while being cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            *_, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                return
        self.free += 1


@dataclass
class _OpenLink:
    client: LockClient
    last_used: float
    opened: float = 0.0
    busy: bool = False
    #: Kept open until then (monotonic) although idle: a held (prepared) or warm link.
    hold_until: float = 0.0
    #: Opened by :meth:`LinkManager.prepare` and not used yet.
    prepared: bool = False
    smp: Any = None  # SmpLink: SMP on this link, once a firmware request used it


@dataclass
class LinkStats:
    connects: int = 0
    retries: int = 0
    commands: int = 0
    by_priority: dict[str, int] = field(default_factory=dict)
    #: Connect-on-challenge: links opened ahead, those an access command then used, those
    #: closed unclaimed at the end of their hold, and those closed early for another lock.
    prepared: int = 0
    prepared_used: int = 0
    prepared_expired: int = 0
    preempted: int = 0
    #: Holds or warm sessions refused because the lock's battery budget was spent.
    over_budget: int = 0


class LinkManager:
    def __init__(
        self,
        *,
        gw_id: str,
        backend: type[BaseBleakClient] | None,
        max_connections: int,
        idle_s: float = 1.0,
        on_contact: Callable[[str, bool, str], None] | None = None,
        rng: Callable[[], float] = random.random,
        deadline_s: float = COMMAND_DEADLINE_S,
        hold_s: float = 0.0,
        warm_s: float = 0.0,
        budget_s_per_hour: float = BUDGET_S_PER_HOUR,
    ) -> None:
        """``hold_s``: how long a link opened on a challenge waits for its command (0: no
        connect on challenge); ``warm_s``: how long a link stays open after an access command
        (at least ``idle_s``); ``budget_s_per_hour``: a lock's connected time per hour past
        which it gets neither."""
        self._gw_id = gw_id
        self._backend = backend
        self._slots = _Slots(max_connections)
        self._max_connections = max_connections
        self._max_held = max(1, max_connections // 2)
        self._hold_s = hold_s
        self._warm_s = warm_s
        self._budget_s = budget_s_per_hour
        #: Per lock: (opened, closed) of its links in the last hour (monotonic).
        self._usage: dict[str, deque[tuple[float, float]]] = {}
        self._preparing: set[str] = set()
        self._prepare_tasks: set[asyncio.Task[None]] = set()
        #: When a prepare last failed to reach each lock: the next command counts it as its
        #: first attempt (an unreachable lock costs the person at the door no extra connect).
        self._prepare_failed: dict[str, float] = {}
        #: One connection attempt at a time, the most urgent first (an unlock's before a
        #: status poll's), first come first served within a priority.
        self._connect_gate = _Slots(1)
        self._per_lock: dict[str, _Slots] = {}
        self._links: dict[str, _OpenLink] = {}
        self._idle_s = idle_s
        self._on_contact = on_contact
        self._rng = rng
        self._group: asyncio.TaskGroup | None = None
        self._slot_wanted = asyncio.Event()
        self._deadline_s = deadline_s
        #: Attempts past their deadline, still cleaning up (cancelled; closing their link).
        self._abandoned: set[asyncio.Task[Response]] = set()
        self.stats = LinkStats()
        #: When a list (benches), every command's exchange on its open link appends
        #: (op name, seconds): the radio's share of the command, without queueing or connects.
        self.exchanges: list[tuple[str, float]] | None = None

    async def __aenter__(self) -> Self:
        if self._group is not None:
            raise RuntimeError("LinkManager is not reentrant")
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._group.create_task(self._reaper(), name="links-reaper")
        return self

    async def __aexit__(self, *exc: object) -> None:
        group, self._group = self._group, None
        for task in list(self._prepare_tasks):  # before the links close: none opens after
            task.cancel()
        if self._prepare_tasks:
            await asyncio.wait(self._prepare_tasks)
        if self._abandoned:
            await asyncio.wait(self._abandoned)
        for lock in list(self._links):
            await self._close(lock)
        if group is not None:
            async with cancelling_until_done(list(getattr(group, "_tasks", ()))):
                with contextlib.suppress(asyncio.CancelledError):
                    await group.__aexit__(None, None, None)

    @property
    def healthy(self) -> bool:
        return self._group is not None

    def open_links(self) -> int:
        return len(self._links)

    def occupancy(self) -> tuple[int, int, int]:
        """(slots in use, slots, commands waiting for a slot or a lock's gate): for metrics."""
        waiting = self._slots.waiting + sum(gate.waiting for gate in self._per_lock.values())
        return self._max_connections - self._slots.free, self._max_connections, waiting

    # --- commands ---------------------------------------------------------------------------

    async def command(
        self,
        record: LockRecord,
        op: Op,
        args: Mapping[str, CborValue] | None = None,
        *,
        cmd_id: bytes | None = None,
        priority: Priority = Priority.ACCESS,
        attempts: int | None = None,
    ) -> Response:
        """Run one command on a lock, retrying link failures with the same command id (as the
        backoff policy says, or at most ``attempts`` times), within the deadline
        (``COMMAND_DEADLINE_S``; past it: LockUnreachable)."""
        cmd_id = cmd_id or os.urandom(COMMAND_ID_LEN)
        run = asyncio.ensure_future(
            self._command(record, op, args, cmd_id, priority=priority, attempts=attempts)
        )
        try:
            done, _ = await asyncio.wait({run}, timeout=self._deadline_s)
        except asyncio.CancelledError:
            # The caller is cancelled (shutdown): the command with it, its cleanup awaited.
            run.cancel()
            await asyncio.wait({run})
            raise
        if done:
            return run.result()
        # Past the deadline: answer now; the attempt ends (and closes its link) in the background.
        run.cancel()
        self._abandoned.add(run)
        run.add_done_callback(self._abandon_done)
        self._contact(record.lock, ok=False, reason="lock_unreachable")
        raise LockUnreachable(
            f"lock {record.lock} did not complete {op.name} within {self._deadline_s:g} s "
            "(the lock or the BLE controller does not answer)"
        )

    def _abandon_done(self, run: asyncio.Task[Response]) -> None:
        self._abandoned.discard(run)
        if not run.cancelled():
            run.exception()  # retrieved: its caller was answered at the deadline

    async def _command(
        self,
        record: LockRecord,
        op: Op,
        args: Mapping[str, CborValue] | None,
        cmd_id: bytes,
        *,
        priority: Priority,
        attempts: int | None,
    ) -> Response:
        gate = self._per_lock.setdefault(record.lock, _Slots(1))
        self.stats.commands += 1
        self.stats.by_priority[priority.name] = self.stats.by_priority.get(priority.name, 0) + 1
        started = time.monotonic()
        attempt = 0
        while True:
            await gate.acquire(priority)
            attempt = self._next_attempt(record.lock, attempt)
            try:
                response = await self._attempt(record, op, args, cmd_id, priority)
            except asyncio.CancelledError:
                # Mid-exchange: a late reply would meet the next request on this link. Close it.
                await self._close(record.lock)
                raise
            except BleError as exc:
                await self._close(record.lock)
                if isinstance(exc, LockUnreachable) and attempts is None:
                    attempts = UNREACHABLE_ATTEMPTS
                if not should_retry(exc, attempt) or (attempts is not None and attempt >= attempts):
                    self._contact(record.lock, ok=False, reason=exc.code)
                    if isinstance(exc, LockUnreachable):
                        raise _unreachable(record, attempt, time.monotonic() - started, exc) from exc
                    raise
                wait = backoff_for(exc, attempt, self._rng)
            else:
                self._contact(record.lock, ok=True)
                if priority is Priority.ACCESS:
                    self._keep_warm(record.lock, self._warm_s)
                if self._hand_over(priority):
                    # Someone waits for a connection slot: hand ours over now rather than
                    # holding an idle link for idle_s.
                    await self._close(record.lock)
                return response
            finally:
                gate.release()
            # Back off outside the gate: an unlock waiting for this lock runs meanwhile.
            self.stats.retries += 1
            await asyncio.sleep(wait)

    async def _attempt(
        self,
        record: LockRecord,
        op: Op,
        args: Mapping[str, CborValue] | None,
        cmd_id: bytes,
        priority: Priority,
    ) -> Response:
        link = await self._link(record, priority)
        if link.prepared:
            link.prepared, link.hold_until = False, 0.0
            self.stats.prepared_used += 1
        link.busy = True
        started = time.perf_counter()
        try:
            response = await link.client.request(op, args, cmd_id=cmd_id)
            if self.exchanges is not None:
                self.exchanges.append((op.name, time.perf_counter() - started))
            return response
        finally:
            link.busy = False
            link.last_used = time.monotonic()

    # --- connect on challenge, warm sessions, battery budget ---------------------------------

    def prepare(self, record: LockRecord) -> bool:
        """A command for ``record`` is likely soon (a challenge was issued): open its link and
        session now, in the background, and hold it ``hold_s``. Never waits and never raises;
        False when nothing was started (off, already open or opening, no free slot, too many
        held, or the lock's battery budget spent)."""
        if self._hold_s <= 0 or self._group is None or record.lock in self._preparing:
            return False
        link = self._links.get(record.lock)
        if link is not None and link.client.is_connected:
            self._keep_warm(record.lock, self._hold_s)
            return False
        if self._held() >= self._max_held or not self._within_budget(record.lock):
            return False
        if not self._slots.try_acquire():
            return False
        self._preparing.add(record.lock)
        task = self._group.create_task(self._prepare(record), name=f"links-prepare-{record.lock}")
        self._prepare_tasks.add(task)
        task.add_done_callback(self._prepare_tasks.discard)
        return True

    async def _prepare(self, record: LockRecord) -> None:
        gate = self._per_lock.setdefault(record.lock, _Slots(1))
        slot = True
        try:
            await gate.acquire(Priority.ACCESS)
            try:
                if record.lock in self._links:
                    return  # a command opened it meanwhile
                slot = False  # _open owns it: the link's on success, released on failure
                link = await self._open(record, Priority.PREPARE)
                link.prepared, link.hold_until = True, time.monotonic() + self._hold_s
                self.stats.prepared += 1
            finally:
                gate.release()
        except Exception as exc:  # noqa: BLE001 - a background task: log the reason, never crash the group
            if isinstance(exc, LockUnreachable):
                self._prepare_failed[record.lock] = time.monotonic()
            _log.info("prepare_failed", lock=record.lock, reason=getattr(exc, "code", type(exc).__name__))
        finally:
            self._preparing.discard(record.lock)
            if slot:
                self._slots.release()

    def _next_attempt(self, lock: str, attempt: int) -> int:
        """The attempt number a command starts, with the lock's gate held: a prepare (connect
        on challenge) that failed to reach the lock, maybe while this command waited for the
        gate, was the first attempt of the command that followed it."""
        if attempt == 0:
            failed_at = self._prepare_failed.pop(lock, None)
            if failed_at is not None and time.monotonic() - failed_at < self._hold_s:
                return 2
        return attempt + 1

    def _keep_warm(self, lock: str, hold_s: float) -> None:
        link = self._links.get(lock)
        if link is None or hold_s <= 0:
            return
        if link.hold_until <= time.monotonic() and self._held() >= self._max_held:
            return
        if not self._within_budget(lock):
            return
        link.hold_until = max(link.hold_until, time.monotonic() + hold_s)

    def _held(self) -> int:
        now = time.monotonic()
        return sum(1 for lnk in self._links.values() if lnk.hold_until > now) + len(self._preparing)

    def connected_s_last_hour(self, lock: str) -> float:
        """The lock's connected time over the last hour, its open link included."""
        now = time.monotonic()
        since = now - _HOUR_S
        usage = self._usage.get(lock, deque())
        while usage and usage[0][1] < since:
            usage.popleft()
        total = sum(end - max(start, since) for start, end in usage)
        link = self._links.get(lock)
        if link is not None:
            total += now - max(link.opened, since)
        return total

    def _within_budget(self, lock: str) -> bool:
        if self.connected_s_last_hour(lock) < self._budget_s:
            return True
        self.stats.over_budget += 1
        return False

    def report(self) -> dict[str, object]:
        """Counters and each lock's connected seconds in the last hour (for ``ping``)."""
        locks = set(self._usage) | set(self._links)
        return {
            "open": len(self._links),
            "held": self._held(),
            "connects": self.stats.connects,
            "prepared": self.stats.prepared,
            "prepared_used": self.stats.prepared_used,
            "prepared_expired": self.stats.prepared_expired,
            "preempted": self.stats.preempted,
            "over_budget": self.stats.over_budget,
            "budget_s_per_hour": self._budget_s,
            "connected_s_last_hour": {
                lock: round(self.connected_s_last_hour(lock), 3) for lock in sorted(locks)
            },
        }

    async def smp(self, record: LockRecord, request: Any, *, timeout_s: float = 10.0) -> Any:
        """One SMP request (an upload chunk, a state read, a reset) at the lowest priority.

        It takes the lock's gate and a connection slot only when no one of higher priority
        waits, one request at a time: an unlock queued meanwhile runs right after the request in
        flight (within one chunk), and a slot someone waits for is handed over after it. One
        attempt: the rollout resumes from the lock's offset (docs/firmware.md)."""
        gate = self._per_lock.setdefault(record.lock, _Slots(1))
        await gate.acquire(Priority.FIRMWARE)
        try:
            link = await self._link(record, Priority.FIRMWARE)
            link.busy = True
            try:
                if link.smp is None:
                    # Deferred: smp/smpclient load only when firmware is updated (CLI start-up).
                    from gateway.ble.smp_transport import SmpLink  # noqa: PLC0415

                    link.smp = SmpLink(link.client)
                answer = await link.smp.request(request, timeout_s=timeout_s)
            except (BleError, asyncio.CancelledError):
                await self._close(record.lock)
                raise
            finally:
                link.busy = False
                link.last_used = time.monotonic()
            if self._hand_over(Priority.FIRMWARE):
                await self._close(record.lock)
            return answer
        finally:
            gate.release()

    def _hand_over(self, priority: Priority) -> bool:
        """Whether a link that just served a command of ``priority`` gives its slot up: when
        anyone waits for one — except that firmware work yields only to more urgent waiters,
        not to other firmware work (each upload chunk would cost a new connection, session and
        SMP_OPEN while a ring's locks took turns; the others get the slot when this lock
        resets)."""
        if priority is Priority.FIRMWARE:
            return self._slots.waiting_before(priority) > 0
        return self._slots.waiting > 0

    def link_open(self, record: LockRecord) -> bool:
        link = self._links.get(record.lock)
        return link is not None and link.client.is_connected

    async def drop(self, record: LockRecord) -> None:
        """Close the lock's link (after a firmware reset: never reuse a link from before)."""
        gate = self._per_lock.setdefault(record.lock, _Slots(1))
        await gate.acquire(Priority.ACCESS)
        try:
            await self._close(record.lock)
        finally:
            gate.release()

    def smp_link(self, record: LockRecord) -> Any:
        """The SMP state of the lock's open link (its buffer size once known), if any."""
        link = self._links.get(record.lock)
        return link.smp if link is not None and link.client.is_connected else None

    async def pair(self, address: str, setup_code: str) -> PairingCompleted:
        """Pair with a lock in pairing mode (one attempt: a wrong code must not be retried)."""
        await self._acquire_slot(Priority.INTERACTIVE)
        try:
            async with self._connecting(Priority.INTERACTIVE):
                client = LockClient(
                    address, gw_id=self._gw_id, backend=self._backend, connect_timeout_s=CONNECT_TIMEOUT_S
                )
                await client.__aenter__()
            try:
                return await client.pair(setup_code)
            finally:
                await client.close()
        finally:
            self._slots.release()

    # --- links --------------------------------------------------------------------------------

    async def _acquire_slot(self, priority: Priority) -> None:
        if self._slots.free == 0:
            self._slot_wanted.set()
            # Only an access command takes a held or warm link's slot; others wait for one.
            await self._close_idle(force=True, preempt=priority is Priority.ACCESS)
        await self._slots.acquire(priority)

    async def _link(self, record: LockRecord, priority: Priority) -> _OpenLink:
        link = self._links.get(record.lock)
        if link is not None and link.client.is_connected:
            return link
        if link is not None:
            await self._close(record.lock)
        await self._acquire_slot(priority)
        return await self._open(record, priority)

    @contextlib.asynccontextmanager
    async def _connecting(self, priority: Priority) -> AsyncIterator[None]:
        await self._connect_gate.acquire(priority)
        try:
            yield
        finally:
            self._connect_gate.release()

    async def _open(self, record: LockRecord, priority: Priority) -> _OpenLink:
        """Connect and handshake, with a slot already taken (released here on failure)."""
        try:
            async with self._connecting(priority):
                client = LockClient(
                    record.address,
                    gw_id=self._gw_id,
                    backend=self._backend,
                    connect_timeout_s=CONNECT_TIMEOUT_S,
                )
                await client.__aenter__()
            self.stats.connects += 1
            try:
                await client.open_session(lock_id=record.lock, ltk=record.ltk)
            except BaseException:
                await client.close()
                raise
        except BaseException:
            self._slots.release()
            raise
        now = time.monotonic()
        link = _OpenLink(client, now, opened=now)
        self._links[record.lock] = link
        return link

    async def _close(self, lock: str) -> None:
        link = self._links.pop(lock, None)
        if link is not None:
            usage = self._usage.setdefault(lock, deque())
            usage.append((link.opened, time.monotonic()))
            with contextlib.suppress(BleError):
                await link.client.close()
            self._slots.release()

    async def _close_idle(self, *, force: bool, preempt: bool = False) -> None:
        """Close idle links: those past ``idle_s`` and their hold; or, ``force``, the one idle
        link longest unused — not held, or (``preempt``) held too."""
        now = time.monotonic()
        idle = sorted(
            (lnk.hold_until > now, lnk.last_used, lock)
            for lock, lnk in self._links.items()
            if not lnk.busy
            and (
                not lnk.client.is_connected
                or (force and (preempt or lnk.hold_until <= now))
                or (not force and now - lnk.last_used >= self._idle_s and lnk.hold_until <= now)
            )
        )
        for held, _, lock in idle[:1] if force else idle:
            link = self._links.get(lock)
            if link is not None and link.prepared:
                if held:
                    self.stats.preempted += 1
                else:
                    self.stats.prepared_expired += 1
            await self._close(lock)

    async def _reaper(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.5, self._idle_s)):
                    await self._slot_wanted.wait()
            self._slot_wanted.clear()
            await self._close_idle(force=False)
            self._forget_old_usage()

    def _forget_old_usage(self) -> None:
        since = time.monotonic() - _HOUR_S
        for lock in [k for k, v in self._usage.items() if not v or v[-1][1] < since]:
            del self._usage[lock]

    def _contact(self, lock: str, *, ok: bool, reason: str = "") -> None:
        if self._on_contact is not None:
            self._on_contact(lock, ok, reason)


def _unreachable(
    record: LockRecord, attempts: int, elapsed_s: float, last: LockUnreachable
) -> LockUnreachable:
    """The one message a caller shows for a lock that did not answer: what was tried, what to do."""
    tried = f"{attempts} connection attempt{'s' if attempts != 1 else ''} over {elapsed_s:.0f} s"
    return LockUnreachable(
        f"lock {record.lock} ({record.address}) did not answer: {tried}; last: {last}. "
        "Check that the lock has power and is within range of the gateway (a few metres, few walls), "
        "then try again; `lockgw status` shows its last contact"
    )
