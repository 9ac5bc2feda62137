"""The `asset-tracker` console script."""

from __future__ import annotations

import secrets
from pathlib import Path

import click

from .config import PROJECT_ROOT


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
