"""What the CLI prints: rich tables, colour and spinners on a terminal; plain, stable text when piped.

One rule decides: ``stdout`` is a terminal (``rich`` also honours ``NO_COLOR``, ``FORCE_COLOR`` and
``TERM=dumb``). Piped output is what scripts read, so it never carries escape codes, box drawing or
progress lines on stdout, and its format is kept stable (columns separated by two spaces, one
event per line, tags in brackets). ``--json`` bypasses all of this: one JSON document on stdout.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

__all__ = ["Ui", "event_flags"]

#: How event types are coloured on a terminal: refusals and faults stand out.
_TYPE_STYLE: Final = {
    "access.granted": "green",
    "access.denied": "bold red",
    "access.failed": "red",
    "lock.jammed": "bold red",
    "lock.unreachable": "yellow",
    "lock.battery_low": "yellow",
    "trust.rejected": "red",
    "trust.expiring": "yellow",
    "trust.expired": "bold yellow",
}
_STATUS_STYLE: Final = {"pass": ("✔", "green"), "warn": ("!", "yellow"), "fail": ("✘", "bold red")}


def event_flags(event: dict[str, Any]) -> list[str]:
    """What sets an event apart from a routine one: it was re-sent, or accepted with a caveat.

    ``replayed``: re-published on request (CONTRACT §4 replay). ``trust:stale``: decided on an
    expired keyring or revocation list (accept, flag, alarm). ``time:…``: decided without a
    synchronised clock. ``flag:…``: the decision's own flags (stale_keyring, …), ``alarm``: an
    emergency unlock raised an alarm.
    """
    flags = []
    if event.get("replayed"):
        flags.append("replayed")
    if event.get("trust_state") not in (None, "ok"):
        flags.append(f"trust:{event['trust_state']}")
    if event.get("time_state") not in (None, "synced"):
        flags.append(f"time:{event['time_state']}")
    data = event.get("data")
    if isinstance(data, dict):
        flags += [f"flag:{f}" for f in data.get("flags") or () if isinstance(f, str)]
        if data.get("alarm"):
            flags.append("alarm")
    return flags


class Ui:
    def __init__(self, *, json_mode: bool) -> None:
        self.json_mode = json_mode
        self.out = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    @property
    def terminal(self) -> bool:
        return self.out.is_terminal and not self.json_mode

    # --- plain building blocks ------------------------------------------------------------------

    def json(self, value: Any) -> None:
        sys.stdout.write(json.dumps(value, sort_keys=True) + "\n")
        sys.stdout.flush()

    def line(self, text: str = "") -> None:
        if self.terminal:
            self.out.print(Text(text))
        else:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def error(self, message: str) -> None:
        if self.err.is_terminal:
            self.err.print(Text("lockgw: ", style="bold red") + Text(message))
        else:
            sys.stderr.write(f"lockgw: {message}\n")
            sys.stderr.flush()

    def note(self, message: str) -> None:
        """A side remark for the person at the terminal (stderr, so pipes stay clean)."""
        if self.err.is_terminal:
            self.err.print(Text(message, style="dim"))
        else:
            sys.stderr.write(message + "\n")

    @contextlib.contextmanager
    def transfer(self, total: int, message: str) -> Iterator[Callable[[int], None]]:
        """A progress bar of ``total`` bytes on a terminal (stderr); otherwise one plain line on
        stderr per step (never on stdout). Yields ``advance(done)``: the bytes done so far."""
        if self.err.is_terminal and not self.json_mode:
            from rich.progress import (  # noqa: PLC0415 - only a terminal draws one
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TransferSpeedColumn,
            )

            columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
            with Progress(*columns, console=self.err, transient=False) as bar:
                task = bar.add_task(message, total=total)
                yield lambda done: bar.update(task, completed=done)
            return
        last = [-1]

        def advance(done: int) -> None:
            if done != last[0]:
                last[0] = done
                sys.stderr.write(f"{message}: {done}/{total} bytes\n")
                sys.stderr.flush()

        yield advance

    @contextlib.contextmanager
    def progress(self, message: str) -> Iterator[None]:
        """A spinner on a terminal; one line on stderr otherwise (never on stdout)."""
        if self.err.is_terminal and not self.json_mode:
            with self.err.status(message):
                yield
        else:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
            yield

    # --- composite views ------------------------------------------------------------------------

    def table(self, rows: Sequence[dict[str, Any]], cols: Sequence[str], *, title: str | None = None) -> None:
        if not rows:
            self.line(f"(no {title or 'rows'})")
            return
        if self.terminal:
            t = Table(title=title, header_style="bold", title_justify="left")
            for c in cols:
                t.add_column(c, overflow="fold")
            for r in rows:
                t.add_row(*(_cell(c, r.get(c)) for c in cols))
            self.out.print(t)
            return
        widths = {c: max(len(c), *(len(_plain(r.get(c), c)) for r in rows)) for c in cols}
        lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip()]
        lines += ["  ".join(_plain(r.get(c), c).ljust(widths[c]) for c in cols).rstrip() for r in rows]
        self.line("\n".join(lines))

    def _rich_table(self, rows: Sequence[dict[str, Any]], cols: Sequence[str], title: str | None) -> Table:
        t = Table(title=title, header_style="bold", title_justify="left")
        for c in cols:
            t.add_column(c, overflow="fold")
        for r in rows:
            t.add_row(*(_cell(c, r.get(c)) for c in cols))
        return t

    @contextlib.contextmanager
    def live_table(
        self, cols: Sequence[str], *, title: str, caption: str
    ) -> Iterator[Callable[[Sequence[dict[str, Any]]], None]]:
        """A table redrawn in place on the terminal as rows come (rich Live); yields the
        function that shows the rows so far. Only for :attr:`terminal`."""
        empty = self._rich_table([], cols, title)
        empty.caption = caption
        with Live(empty, console=self.out, refresh_per_second=8, transient=False) as live:

            def show(rows: Sequence[dict[str, Any]]) -> None:
                table = self._rich_table(rows, cols, title)
                table.caption = caption
                live.update(table)

            yield show

    def event_table(self, events: Sequence[dict[str, Any]], *, receipt_seq: int) -> None:
        """History: a table on a terminal (✓ = receipted by central), one line each when piped."""
        if not self.terminal:
            for e in events:
                self.event(e)
            return
        t = Table(header_style="bold", title_justify="left")
        for column in ("seq", "✓", "ts", "type", "lock", "sub", "reason", "flags"):
            t.add_column(column, overflow="fold", no_wrap=column in ("ts", "type"))
        for e in events:
            flags = event_flags(e)
            t.add_row(
                Text(str(e["seq"]), style="dim" if e.get("replayed") else ""),
                Text("✓", style="green") if e["seq"] <= receipt_seq else Text("·", style="dim"),
                Text(str(e["ts"]), style="dim"),
                Text(e["type"], style=_TYPE_STYLE.get(e["type"], "cyan")),
                Text(_plain(e.get("lock"))),
                Text(_plain(e.get("sub"))),
                Text(_plain(e.get("reason")), style="red" if e.get("reason") else "dim"),
                Text(" ".join(flags), style="bold yellow" if flags else ""),
            )
        self.out.print(t)

    def event(self, e: dict[str, Any], *, receipt_seq: int | None = None) -> None:
        flags = event_flags(e)
        parts = [
            ("lock", e.get("lock")),
            ("sub", e.get("sub")),
            ("reason", e.get("reason")),
            ("lock_seq", (e.get("data") or {}).get("lock_seq") if isinstance(e.get("data"), dict) else None),
        ]
        extra = " ".join(f"{k}={v}" for k, v in parts if v is not None)
        if not self.terminal:
            tags = "".join(f" [{f}]" for f in flags)
            self.line(f"{e['seq']:>6} {e['ts']} {e['type']:<18} {extra}{tags}".rstrip())
            return
        delivered = receipt_seq is not None and e["seq"] <= receipt_seq
        text = Text(f"{e['seq']:>6} ", style="dim" if e.get("replayed") else "")
        text += Text("✓ " if delivered else "· ", style="green" if delivered else "dim")
        text += Text(f"{e['ts']} ", style="dim")
        text += Text(f"{e['type']:<18}", style=_TYPE_STYLE.get(e["type"], "cyan"))
        text += Text(f" {extra}")
        for f in flags:
            text += Text(f" {f}", style="magenta" if f == "replayed" else "bold yellow")
        self.out.print(text)

    def checks(self, checks: Sequence[dict[str, Any]]) -> None:
        for ch in checks:
            fix = ch.get("fix") if ch["status"] != "pass" else None
            if self.terminal:
                mark, style = _STATUS_STYLE.get(ch["status"], ("?", ""))
                self.out.print(
                    Text(f"{mark} ", style=style) + Text(f"{ch['name']}: ", style="bold") + Text(ch["detail"])
                )
                if fix:
                    self.out.print(Text(f"    fix: {fix}", style="italic"))
            else:
                self.line(f"{ch['status'].upper():<4}  {ch['name']}: {ch['detail']}")
                if fix:
                    self.line(f"      fix: {fix}")


def _plain(value: Any, column: str = "") -> str:
    if value is None:
        return "-"
    if column == "last_contact" and isinstance(value, int):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _cell(column: str, value: Any) -> Text:
    text = _plain(value, column)
    if isinstance(value, bool):
        good = value if column != "paired" else None
        return Text(text, style="green" if good else ("red" if good is False else ""))
    if column == "state":
        return Text(text, style={"unlocked": "yellow", "locked": "green", "jammed": "bold red"}.get(text, ""))
    return Text(text)
