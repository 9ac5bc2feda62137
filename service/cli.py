"""The `asset-tracker` console script."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click
from sqlalchemy.orm import Session, sessionmaker

from .config import PROJECT_ROOT, ConfigError, Settings, load_settings
from .shotstack import ShotstackError

if TYPE_CHECKING:
    from .shotstack import ServeClient


@click.group()
def main() -> None:
    """Shotstack Asset Tracker: operate the service from the shell."""


@main.command("init-env")
@click.option(
    "--path", type=click.Path(path_type=Path), default=PROJECT_ROOT / ".env", show_default=True
)
def init_env(path: Path) -> None:
    """Write a .env with freshly generated secrets, unless one exists."""
    if path.exists():
        click.echo(f"{path} exists; left as it is")
        return
    webhook_token = secrets.token_urlsafe(32)
    api_token = secrets.token_urlsafe(32)
    path.write_text(
        "# Written by `asset-tracker init-env`; see .env.example for every variable.\n"
        f"WEBHOOK_TOKEN={webhook_token}\n"
        f"API_KEYS=local:{api_token}\n"
        "SHOTSTACK_ENV=stage\n"
        "# SHOTSTACK_API_KEY=your stage key\n"
    )
    path.chmod(0o600)
    click.echo(f"wrote {path} with a new WEBHOOK_TOKEN and an API key named 'local'")


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _start_logging(settings: Settings) -> None:
    from .logs import configure

    configure(settings)


@main.command()
@click.option("--once", is_flag=True, help="Look up only what is due now, then exit.")
def worker(once: bool) -> None:
    """Run the reconciler: confirm every tracked render with Shotstack (SPEC §5)."""
    from .reconciler import run_worker

    settings = _settings()
    _start_logging(settings)
    if not once:
        from .metrics import serve_worker_metrics

        serve_worker_metrics(settings.worker_metrics_port)
    run_worker(settings, once=once)


@contextmanager
def _shotstack(settings: Settings) -> Iterator[tuple[sessionmaker[Session], ServeClient]]:
    from .db import make_engine
    from .shotstack import RateBudget, ServeClient

    engine = make_engine(settings.database_url)
    client = ServeClient(settings, RateBudget(engine, settings.shotstack_rate_limit))
    try:
        yield sessionmaker(engine, expire_on_commit=False), client
    except ShotstackError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        client.close()
        engine.dispose()


@main.command("sync-render")
@click.argument("render_id")
def sync_render_command(render_id: str) -> None:
    """Look a render up at Shotstack now, write what it says and print the outcome."""
    from .reconciler import sync_render

    settings = _settings()
    _start_logging(settings)
    with _shotstack(settings) as (sessions, client):
        try:
            tracking, found = sync_render(sessions, client, settings, render_id)
        except LookupError as exc:
            raise click.ClickException(str(exc)) from None
    if tracking is None:
        raise click.ClickException(f"render {render_id}: the lease ran out; nothing written")
    click.echo(f"render {render_id}: {tracking}, {len(found)} asset(s) at Shotstack")
    for facts in found:
        click.echo(f"  {facts.id} {facts.status} {facts.filename or ''}".rstrip())


@main.command("sync-asset")
@click.argument("asset_id")
def sync_asset_command(asset_id: str) -> None:
    """Read an asset from Shotstack now, write it and print its status."""
    from .reconciler import sync_asset

    settings = _settings()
    _start_logging(settings)
    with _shotstack(settings) as (sessions, client):
        facts = sync_asset(sessions, client, settings, asset_id)
    if facts is None:
        raise click.ClickException(f"asset {asset_id}: Shotstack does not know it (404)")
    click.echo(f"asset {asset_id}: {facts.status} (render {facts.render_id})")
