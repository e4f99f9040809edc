"""The supervisor: every long-running task of the daemon owned by one TaskGroup, every crash
visible, every component's failure handled the way it declared.

A :class:`Component` names what happens when it fails:

* ``RESTART`` — logged with its traceback, restarted after a backoff (1 s doubling to 60 s; back
  to 1 s once it ran ``stable_s`` without failing). While it recovers it is in
  :meth:`Supervisor.restarting`: a heartbeat alarm (``<name>_restarting``) and a failing
  ``doctor`` check. Used for the MQTT bridge, advert watching, housekeeping and the other loops —
  doors keep opening without any of them.
* ``STOP`` — logged with its traceback, and :attr:`Supervisor.failure` resolves with the reason:
  the daemon stops with exit 1 so that systemd restarts it (the outbox's fail-stop).

The TaskGroup lives in the supervisor's runner task, entered with ``async with``; children are
never started outside it (:meth:`spawn` for short fire-and-forget work such as a retained
publish: its failure is logged, never propagated). Stopping cancels again every 0.5 s until the
children end (gateway/tasks.py: Python 3.11's ``wait_for`` can swallow a cancellation).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Final, Self

from gateway import log
from gateway.tasks import cancel_and_wait

__all__ = ["Component", "Failure", "OnFailure", "Supervisor"]

RESTART_BASE_S: Final = 1.0
RESTART_MAX_S: Final = 60.0
#: A restarted component that ran this long without failing counts as recovered.
STABLE_S: Final = 60.0

_log = log.get("supervisor")


class OnFailure(enum.Enum):
    RESTART = "restart"
    STOP = "stop"


@dataclass(frozen=True, slots=True)
class Component:
    name: str
    run: Callable[[], Coroutine[Any, Any, None]]
    on_failure: OnFailure = OnFailure.RESTART


@dataclass(frozen=True, slots=True)
class Failure:
    """Why the daemon stops: the component and its error."""

    component: str
    error: BaseException

    def __str__(self) -> str:
        return f"{self.component} failed: {type(self.error).__name__}: {self.error}"


class Supervisor:
    def __init__(
        self,
        components: Iterable[Component] = (),
        *,
        restart_base_s: float = RESTART_BASE_S,
        restart_max_s: float = RESTART_MAX_S,
        stable_s: float = STABLE_S,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self._components = list(components)
        self._base, self._max, self._stable = restart_base_s, restart_max_s, stable_s
        self._mono = mono
        self._group: asyncio.TaskGroup | None = None
        self._children: dict[str, asyncio.Task[None]] = {}
        self._spawned: set[asyncio.Task[None]] = set()
        self._recovering: dict[str, float] = {}  # name -> mono() until which it counts as restarting
        self._closing = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self.restarts: dict[str, int] = {}
        #: Resolves when a ``STOP`` component failed (the daemon then exits 1 with this reason).
        self.failure: asyncio.Future[Failure] = asyncio.get_running_loop().create_future()

    async def __aenter__(self) -> Self:
        if self._runner is not None:
            raise RuntimeError("Supervisor is not reentrant")
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self._main(started), name="supervisor")
        await started
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner  # it cancels its children and waits for them

    async def _main(self, started: asyncio.Future[None]) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            for component in self._components:
                self._start(component)
            started.set_result(None)
            await self._closing.wait()
            await cancel_and_wait([*self._children.values(), *self._spawned])
        self._group = None

    def _start(self, component: Component) -> None:
        assert self._group is not None
        self._children[component.name] = self._group.create_task(
            self._keep(component), name=f"gateway-{component.name}"
        )

    def add(self, component: Component) -> None:
        """Start one more component (while running)."""
        self._components.append(component)
        if self._group is not None and not self._closing.is_set():
            self._start(component)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        """Short work in the TaskGroup; a failure is logged with its traceback, never raised."""
        if self._group is None or self._closing.is_set():
            coro.close()
            return
        task = self._group.create_task(self._guarded(coro, name), name=name)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    async def stop(self, names: Iterable[str]) -> None:
        """Stop these components now (cancelled and awaited); the others run on."""
        await cancel_and_wait([self._children[n] for n in names if n in self._children])

    def names(self) -> list[str]:
        return [c.name for c in self._components]

    def restarting(self) -> list[str]:
        """Components that failed and have not yet run ``stable_s`` since their restart."""
        now = self._mono()
        return sorted(n for n, until in self._recovering.items() if now < until)

    async def _guarded(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        try:
            await coro
        except Exception as exc:  # noqa: BLE001 - logged here; short work never stops the daemon
            _log.error("task_failed", task=name, exc_info=exc)

    async def _keep(self, component: Component) -> None:
        attempt = 0
        while True:
            began = self._mono()
            try:
                await _run_reporting_stray_cancel(component)
            except Exception as exc:  # noqa: BLE001 - the component's declared policy decides
                if component.on_failure is OnFailure.STOP:
                    _log.critical("component_failed", task=component.name, policy="stop", exc_info=exc)
                    if not self.failure.done():
                        self.failure.set_result(Failure(component.name, exc))
                    return
                attempt = 1 if self._mono() - began >= self._stable else attempt + 1
                delay = min(self._max, self._base * 2 ** (attempt - 1))
                self.restarts[component.name] = self.restarts.get(component.name, 0) + 1
                self._recovering[component.name] = self._mono() + delay + self._stable
                _log.error(
                    "component_crashed",
                    task=component.name,
                    policy="restart",
                    restart_in_s=delay,
                    attempt=attempt,
                    exc_info=exc,
                )
                await asyncio.sleep(delay)
                _log.info("component_restarted", task=component.name, attempt=attempt)
            else:
                return


class StrayCancellation(Exception):
    """A component ended with CancelledError that nobody asked for (a library cancelled a
    future it awaited): a crash like any other, not a silent end."""


async def _run_reporting_stray_cancel(component: Component) -> None:
    try:
        await component.run()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # we are being stopped
        raise StrayCancellation(f"{component.name} ended with a CancelledError nobody requested") from None
