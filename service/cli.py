"""The `asset-tracker` console script."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
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
    """The settings of a command, refused in one line when bad; its logging set up from them."""
    from .logs import configure

    try:
        settings = load_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    configure(settings)
    return settings


@main.command()
@click.option("--once", is_flag=True, help="Look up only what is due now, then exit.")
def worker(once: bool) -> None:
    """Run the reconciler: confirm every tracked render with Shotstack (SPEC §5)."""
    from .reconciler import run_worker

    settings = _settings()
    if not once:
        from .metrics import serve_worker_metrics

        serve_worker_metrics(settings.worker_metrics_port, database_url=settings.database_url)
    try:
        stats = run_worker(settings, once=once)
    except SQLAlchemyError as exc:  # only --once gives up; the loop waits for the database
        reason = str(exc.orig if isinstance(exc, DBAPIError) else exc).splitlines()[0]
        raise click.ClickException(
            f"database: {reason} (is it reachable, and migrated with `alembic upgrade head`?)"
        ) from None
    if stats.auth_failing:  # only --once returns with it: the loop waits for a good key
        raise click.ClickException(
            "Shotstack refused the key (401/403): check SHOTSTACK_API_KEY and SHOTSTACK_ENV;"
            " the renders stay due"
        )


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


def _shotstack_id(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """An id as the API takes one: 1 to 255 characters, no control character, no blanks."""
    from pydantic import TypeAdapter, ValidationError

    from .schemas import ShotstackId

    try:
        checked: str = TypeAdapter(ShotstackId).validate_python(value)
    except ValidationError:
        raise click.BadParameter(
            "must be 1 to 255 characters, none of them a control character"
        ) from None
    return checked


@main.command("sync-render")
@click.argument("render_id", callback=_shotstack_id)
def sync_render_command(render_id: str) -> None:
    """Look a render up at Shotstack now, write what it says and print the outcome."""
    from .reconciler import sync_render

    settings = _settings()
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
@click.argument("asset_id", callback=_shotstack_id)
def sync_asset_command(asset_id: str) -> None:
    """Read an asset from Shotstack now, write it and print its status."""
    from .reconciler import sync_asset

    settings = _settings()
    with _shotstack(settings) as (sessions, client):
        facts = sync_asset(sessions, client, settings, asset_id)
    if facts is None:
        raise click.ClickException(f"asset {asset_id}: Shotstack does not know it (404)")
    click.echo(f"asset {asset_id}: {facts.status} (render {facts.render_id})")


@main.command()
def replay() -> None:
    """Re-process the stored callbacks that failed; a second run changes nothing more."""
    from .db import make_engine
    from .events import replay as replay_events

    settings = _settings()
    engine = make_engine(settings.database_url)
    try:
        report = replay_events(sessionmaker(engine, expire_on_commit=False), settings)
    finally:
        engine.dispose()
    click.echo(
        f"replayed {len(report.ids)} failed event(s): {report.processed} processed, "
        f"{report.failed} failed again"
    )
    if report.failed:
        raise click.ClickException("some events failed again; their error is stored with them")


@main.command()
@click.option(
    "--older-than",
    "days",
    type=click.IntRange(min=1),
    required=True,
    metavar="DAYS",
    help="Delete assets first seen more than DAYS (at least 1) ago.",
)
@click.option("--dry-run", is_flag=True, help="Only list what would be deleted.")
@click.option("--yes", is_flag=True, help="Do not ask before deleting.")
def purge(days: int, dry_run: bool, yes: bool) -> None:
    """Delete old `ready`/`failed` assets at Shotstack, within the rate limit (SPEC §6).

    Each asset is recorded as deleted as soon as Shotstack confirms, so a run cut short can
    simply be started again.
    """
    from .purge import count_purgeable, cutoff, iter_purgeable
    from .purge import purge as purge_assets

    settings = _settings()
    before = cutoff(days)
    with _shotstack(settings) as (sessions, client):
        with sessions() as session:
            total = count_purgeable(session, before=before)
        if dry_run:
            for asset_id in iter_purgeable(sessions, before=before):
                click.echo(asset_id)
            click.echo(f"{total} asset(s) first seen before {before:%Y-%m-%d %H:%M} UTC")
            return
        if total == 0:
            click.echo(f"no ready or failed asset was first seen before {before:%Y-%m-%d %H:%M}")
            return
        if not yes:
            click.confirm(
                f"Delete {total} asset(s) first seen before {before:%Y-%m-%d %H:%M} UTC "
                f"at Shotstack ({settings.shotstack_env})?",
                abort=True,
            )
        with click.progressbar(length=total, label="Deleting", file=sys.stderr) as bar:
            report = purge_assets(
                sessions, client, before=before, on_asset=_progress(bar, total, sys.stderr)
            )
    click.echo(f"deleted {len(report.deleted)} asset(s); {len(report.failed)} failed")
    if report.failed:
        for asset_id, reason in sorted(report.failed.items()):
            click.echo(f"  {asset_id}: {reason}", err=True)
        raise click.ClickException("some assets were not deleted; run the purge again later")


def _progress(bar: Any, total: int, stream: TextIO) -> Callable[[str], None]:
    """Advance the bar; off a terminal, where click draws no bar, print `n/total` each 10 %."""
    tty = stream.isatty()
    done, shown = 0, -1

    def step(_asset_id: str) -> None:
        nonlocal done, shown
        done += 1
        bar.update(1)
        tenth = done * 10 // max(total, 1)
        if not tty and tenth != shown:
            shown = tenth
            click.echo(f"Deleting: {done}/{total}", file=stream)

    return step
