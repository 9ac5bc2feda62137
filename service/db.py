"""The declarative base, the engine and sessionmaker of an app, and the session of a request."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

import psycopg
from flask import Flask, current_app, g
from psycopg.abc import PQGen
from psycopg.errors import _WaitTimeout
from psycopg.rows import TupleRow
from sqlalchemy import JSON, DateTime, MetaData, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.sql import ClauseElement
from sqlalchemy.types import TypeDecorator

from .config import INSTANCE_DIR

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Postgres answers 503 within 5 s when it is down or hangs (SPEC §3): these bound each step.
CONNECT_TIMEOUT_S = 2
STATEMENT_TIMEOUT_MS = 3000
POOL_TIMEOUT_S = 2
# The server enforces statement_timeout, so it cannot end a wait on a server (or a path to it)
# that stopped answering; tcp_user_timeout only helps while sent bytes go unacknowledged. The
# client therefore stops waiting for any answer a little after the server would have cancelled.
ANSWER_TIMEOUT_S = STATEMENT_TIMEOUT_MS / 1000 + 0.5
# A pooled connection's ping is one empty round trip; a short bound leaves room to reconnect
# (connect_timeout) within the 5 s of SPEC §3.
PING_TIMEOUT_S = 1.0
IDLE_BEFORE_PING_S = 1.0

RV = TypeVar("RV")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp, stored as UTC; SQLite gets its zone back on the way out."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given for a timezone-aware column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONDocument = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime,
        dict[str, Any]: JSONDocument,
    }


def utcnow() -> datetime:
    return datetime.now(UTC)


def insert_for(session: Session, table: Any) -> Any:
    """An INSERT that knows ON CONFLICT on the session's dialect (Postgres or SQLite)."""
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


class BoundedConnection(psycopg.Connection[TupleRow]):
    """A psycopg connection that gives up on a server that does not answer in time.

    psycopg's `wait()` accepts a timeout, but none of its operations pass one: this class
    passes `answer_timeout` to every wait (execute, fetch, commit, rollback). An exchange cut
    short leaves the protocol state unknown, so the connection is closed and the pool drops it.
    """

    answer_timeout: float = ANSWER_TIMEOUT_S

    def wait(self, gen: PQGen[RV], interval: float = 0.1, timeout: float | None = None) -> RV:
        try:
            return super().wait(gen, interval, self.answer_timeout if timeout is None else timeout)
        except _WaitTimeout:
            self.pgconn.finish()
            raise psycopg.OperationalError(
                f"the database did not answer within {self.answer_timeout:g} s"
            ) from None


# --- Statements sent by psycopg itself, for the few paths that pipeline them -----------------

_PSYCOPG = PGDialect_psycopg()  # type: ignore[no-untyped-call]


@functools.cache
def driver_sql(stmt: ClauseElement) -> str:
    """A statement built once (and cached by its builder) as psycopg receives it."""
    return str(stmt.compile(dialect=_PSYCOPG))


def connection_lost(driver: psycopg.Connection[TupleRow], exc: BaseException) -> bool:
    """True if `exc` leaves `driver` unusable: broken, closed, or cut off (OperationalError)."""
    return driver.broken or driver.closed or isinstance(exc, psycopg.OperationalError)


@contextmanager
def driver_errors(connection: Connection) -> Iterator[psycopg.Connection[TupleRow]]:
    """Yield the psycopg connection under `connection`; raise its errors as SQLAlchemy would.

    A connection that broke is invalidated, so the pool drops it and the request answers 503.
    """
    driver = connection.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    try:
        yield driver
    except psycopg.Error as exc:
        broken = connection_lost(driver, exc)
        if broken:
            connection.invalidate(exc)
        raise DBAPIError.instance(
            None, None, exc, psycopg.Error, connection_invalidated=broken
        ) from exc


def _bound_postgres_waits(engine: Engine) -> None:
    """Connect with BoundedConnection and give the pool's ping a shorter bound."""

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> BoundedConnection:
        return BoundedConnection.connect(*cargs, **cparams)

    plain_ping = engine.dialect.do_ping

    def bounded_ping(dbapi_connection: Any) -> bool:
        dbapi_connection.answer_timeout = PING_TIMEOUT_S
        try:
            return plain_ping(dbapi_connection)
        finally:
            del dbapi_connection.answer_timeout

    # The pool calls the dialect's do_ping; no event lets one bound just the ping.
    setattr(engine.dialect, "do_ping", bounded_ping)  # noqa: B010

    # pool_pre_ping would cost every request a round trip; a connection back in use within
    # IDLE_BEFORE_PING_S is trusted, one idle longer (the server may have gone) is pinged.
    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since < IDLE_BEFORE_PING_S:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool then drops this connection and checks out (or opens) another.
            raise DisconnectionError(f"a pooled connection failed its ping: {exc}") from exc


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine whose every step is bounded in time (Postgres) or waits on locks."""
    if url.startswith("sqlite"):
        INSTANCE_DIR.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 5}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    connect_args = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"
        f" -c idle_in_transaction_session_timeout=60000",
        # A peer that vanishes without closing: give up on unacknowledged writes.
        "tcp_user_timeout": STATEMENT_TIMEOUT_MS,
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 1,
        "keepalives_count": 3,
        "application_name": "asset-tracker",
    }
    connect_args.update(kwargs.pop("connect_args", {}))
    kwargs.setdefault("pool_pre_ping", False)  # _bound_postgres_waits pings idle ones
    kwargs.setdefault("pool_timeout", POOL_TIMEOUT_S)
    engine = create_engine(url, connect_args=connect_args, **kwargs)
    _bound_postgres_waits(engine)
    return engine


class Database:
    """The engine and sessionmaker of one app; created in init_app, after any fork."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)


def init_app(app: Flask) -> None:
    app.extensions["db"] = Database(app.config["SETTINGS"].database_url)
    app.teardown_appcontext(_close_session)


def get_db(app: Flask | None = None) -> Database:
    db: Database = (app or current_app).extensions["db"]
    return db


def get_session() -> Session:
    """The session of this request; the request commits it once, at the edge."""
    if "db_session" not in g:
        g.db_session = get_db().sessionmaker()
    session: Session = g.db_session
    return session


def _close_session(_exc: BaseException | None) -> None:
    session = g.pop("db_session", None)
    if session is not None:
        session.close()
