"""Alembic environment: the models' metadata, the service's DATABASE_URL, or a test's connection."""

from __future__ import annotations

import sys

from alembic import context
from sqlalchemy.engine import Connection

from service import models  # noqa: F401  (registers the tables on Base.metadata)
from service.config import ConfigError, Settings, load_settings
from service.db import Base, make_engine

target_metadata = Base.metadata


def _settings() -> Settings:
    """The settings; bad configuration stops `release` with one line, as it stops `web`."""
    try:
        return load_settings()
    except ConfigError as exc:
        sys.stderr.write(f"asset-tracker: {exc}\n")
        raise SystemExit(2) from None


def run_with(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_with(connection)
        return
    engine = make_engine(_settings().database_url)
    with engine.connect() as connection:
        run_with(connection)
    engine.dispose()


if context.is_offline_mode():
    context.configure(url=_settings().database_url, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
