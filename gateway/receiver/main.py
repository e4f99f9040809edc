"""``lockgw-receiver``: run · status [--json] · migrate (docs/fleet.md, docs/cli.md).

Exit codes as CONTRACT §6: 0 done; 1 failed (``status``: an alert is raised); 2 usage or
configuration error (the message names the key); 3 PostgreSQL unreachable.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click

from gateway import log
from gateway.errors import ConfigError

try:
    from gateway.receiver.app import Receiver
    from gateway.receiver.config import ReceiverConfig, config_path, load_receiver_config
    from gateway.receiver.store import Store, StoreUnavailable
except ModuleNotFoundError as exc:  # pragma: no cover - an install without the extra
    if exc.name not in {"asyncpg", "aio_pika"}:
        raise
    sys.exit(
        f"lockgw-receiver: {exc.name} is missing: install the receiver's extra, pip install 'lockgw[receiver]'"
    )

__all__ = ["main"]

EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 1, 2, 3


def _load(ctx: click.Context) -> ReceiverConfig:
    path = config_path(ctx.obj["config"])
    try:
        return load_receiver_config(path if (ctx.obj["config"] or path.exists()) else None)
    except ConfigError as exc:
        click.echo(f"lockgw-receiver: {exc}", err=True)
        ctx.exit(EXIT_USAGE)
    raise AssertionError  # pragma: no cover - ctx.exit raises


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None, help="receiver TOML file")
@click.pass_context
def cli(ctx: click.Context, config: str | None) -> None:
    """The reference receiver: stores every event exactly once in PostgreSQL, then receipts it.

    Example: lockgw-receiver --config /etc/lockgw/receiver.toml run
    """
    ctx.obj = {"config": config}


@cli.command()
@click.pass_context
def run(ctx: click.Context) -> None:
    """Consume, store, receipt until SIGTERM (drains the batch in hand, exit 0).

    Example: lockgw-receiver --config receiver.toml run
    """
    config = _load(ctx)
    log.configure()

    async def main() -> bool:
        asyncio.get_running_loop().set_exception_handler(log.loop_exception_handler)
        async with Receiver(config) as receiver:
            receiver.install_signal_handlers()
            await receiver.wait_stopping()
        return receiver.failed is None

    try:
        if not asyncio.run(main()):
            ctx.exit(EXIT_FAILED)
    except StoreUnavailable as exc:
        click.echo(f"lockgw-receiver: {exc}", err=True)
        ctx.exit(EXIT_UNAVAILABLE)
    except ConfigError as exc:
        click.echo(f"lockgw-receiver: {exc}", err=True)
        ctx.exit(EXIT_USAGE)


@cli.command()
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Create or upgrade the schema (idempotent).

    Example: lockgw-receiver --config receiver.toml migrate
    """
    config = _load(ctx)

    async def main() -> int:
        async with Store.connect(config.postgres, migrate=False) as store:
            return await store.migrate()

    try:
        version = asyncio.run(main())
    except StoreUnavailable as exc:
        click.echo(f"lockgw-receiver: {exc}", err=True)
        ctx.exit(EXIT_UNAVAILABLE)
    click.echo(f"schema version {version}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Per-gateway liveness and alerts, from PostgreSQL; exit 1 if any alert is raised.

    Example: lockgw-receiver --config receiver.toml status --json
    """
    config = _load(ctx)

    async def main() -> dict[str, Any]:
        async with Store.connect(config.postgres, migrate=False) as store:
            return await store.status(config.receiver)

    try:
        report = asyncio.run(main())
    except StoreUnavailable as exc:
        click.echo(f"lockgw-receiver: {exc}", err=True)
        ctx.exit(EXIT_UNAVAILABLE)
    if as_json:
        click.echo(json.dumps(report, sort_keys=True))
    else:
        click.echo(
            f"events {report['events']}  conflicts {report['conflicts']}  quarantined {report['quarantined']}"
        )
        for g in report["gateways"]:
            streams = ", ".join(f"{s['epoch']}:{s['stored_seq']}/{s['max_seq']}" for s in g["streams"])
            click.echo(
                f"{g['gw']:<24} {g['availability'] or '-':<8} hb {g['heartbeat_age_s']}s "
                f"backlog {g['backlog']}  [{streams}]  {' '.join(g['alerts']) or 'ok'}"
            )
    ctx.exit(EXIT_FAILED if report["alerts"] else 0)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)
