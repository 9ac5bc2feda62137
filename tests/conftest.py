"""Fixtures: a migrated Postgres once per session, one rolled-back transaction per test."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import sessionmaker

from service import create_app
from service.config import PROJECT_ROOT, Settings
from service.db import make_engine
from service.shotstack import RateBudget

from .pg import find_postgres
from .standin import ServeStandIn

WEBHOOK_TOKEN = "hook-secret-0123456789"
API_TOKEN = "api-secret-abcdefghij"
SHOTSTACK_KEY = "serve-key-SECRET-42"
LIVE_TABLES = "webhook_events, assets, renders"


def app_settings(database_url: str, **extra: Any) -> dict[str, Any]:
    """Settings for a test app: small delays, known secrets, no .env."""
    values: dict[str, Any] = {
        "_env_file": None,
        "database_url": database_url,
        "webhook_token": f"{WEBHOOK_TOKEN},rotated-token-xyz",
        "api_keys": f"ci:{API_TOKEN},other:other-token-123",
        "shotstack_api_url": "http://127.0.0.1:9",
        "reconcile_grace": 0.2,
    }
    values.update(extra)
    return values


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The URL of a reachable Postgres; fail under CI=true, else skip loudly, when there is none."""
    url = find_postgres()
    if url is None:
        message = (
            "NO POSTGRES: set TEST_DATABASE_URL or start the local server; "
            "the tests that need Postgres did NOT run"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.exit(message, returncode=3)
        sys.stderr.write(f"\n*** {message} ***\n")
        pytest.skip(message)
    return Settings(_env_file=None, database_url=url).database_url  # type: ignore[call-arg]


def upgrade(conn: Connection) -> None:
    """Run every migration on this connection (Postgres or SQLite)."""
    config = Config(toml_file=str(PROJECT_ROOT / "pyproject.toml"))
    config.attributes["connection"] = conn
    command.upgrade(config, "head")


def migrate(engine: Engine) -> None:
    """Drop everything, then run every migration, on one connection."""
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
        upgrade(conn)


@pytest.fixture(scope="session")
def engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url)
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def connection(engine: Engine) -> Iterator[Connection]:
    """One connection in one transaction, rolled back after the test."""
    with engine.connect() as conn:
        trans = conn.begin()
        yield conn
        trans.rollback()


def _app(settings: dict[str, Any]) -> Flask:
    app = create_app(settings)
    app.config["TESTING"] = True
    return app


@pytest.fixture
def app(pg_url: str, connection: Connection) -> Iterator[Flask]:
    """The app, its sessions joined to the test's transaction (commits become savepoints)."""
    app = _app(app_settings(pg_url))
    db = app.extensions["db"]
    db.sessionmaker = sessionmaker(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    )
    yield app
    db.engine.dispose()


@pytest.fixture
def standin() -> Iterator[ServeStandIn]:
    """The Serve API stand-in on loopback, checking SHOTSTACK_KEY; its timeouts sleep 1.5 s."""
    with ServeStandIn(api_key=SHOTSTACK_KEY, timeout_sleep=1.5) as serve:
        yield serve


@pytest.fixture
def budget(engine: Engine) -> Iterator[RateBudget]:
    """The committed budget row (outside the test's transaction), fast, cleared around a test."""
    budget = RateBudget(engine, 1000.0)
    budget.reset()
    yield budget
    budget.reset()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_TOKEN}"}


# --- Real commits, for tests where concurrency is the point ------------------------------


@pytest.fixture(scope="session")
def live_url(pg_url: str) -> str:
    """A database of its own, migrated once, for tests that need real commits."""
    base, _, name = pg_url.rpartition("/")
    live_name = f"{name}_live"  # beside the test database, so parallel suites keep apart
    admin = base.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (live_name,)
        ).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{live_name}"')
    url = f"{base}/{live_name}"
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    return url


@pytest.fixture
def live_engine(live_url: str) -> Iterator[Engine]:
    """An engine on the live database; its tables are emptied after the test."""
    engine = make_engine(live_url)
    yield engine
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {LIVE_TABLES} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture
def live_app(live_url: str, live_engine: Engine) -> Iterator[Flask]:
    app = _app(app_settings(live_url))
    yield app
    app.extensions["db"].engine.dispose()


# --- CI must not pass when the Postgres tests did not run --------------------------------

_postgres_outcomes = {"passed": 0, "skipped": 0}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs Postgres (it uses the pg_url fixture, even indirectly)."""
    for item in items:
        if "pg_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "postgres" not in report.keywords:
        return
    if report.skipped:
        _postgres_outcomes["skipped"] += 1
    elif report.when == "call" and report.passed:
        _postgres_outcomes["passed"] += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI", "").lower() != "true":
        return
    if _postgres_outcomes["skipped"] or not _postgres_outcomes["passed"]:
        sys.stderr.write(f"\nCI: Postgres tests did not all run: {_postgres_outcomes}\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
