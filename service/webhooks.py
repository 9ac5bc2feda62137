"""`POST /webhooks/shotstack`: store every callback before answering, then apply it (SPEC §3)."""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import psycopg
from flask import Blueprint, Flask, Response, current_app, request
from gunicorn.http.errors import ParseException  # type: ignore[import-untyped]
from psycopg.types.json import Jsonb
from pydantic import ValidationError
from sqlalchemy import bindparam, literal_column, null, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from .assets import (
    CALLBACK_STATUSES,
    AssetFacts,
    Write,
    asset_writes,
    dialect_of,
    execute_writes,
    render_write,
)
from .config import Settings
from .db import connection_lost, driver_errors, driver_sql, get_session, utcnow
from .jsonapi import ApiError, Unauthorized, error_response
from .metrics import count_callback
from .models import Source, WebhookEvent
from .schemas import EditCallback, ServeCallback, WebhookAnswer

MAX_BODY = 64 * 1024
CDN_HOST = "cdn.shotstack.io"
RETRY_FIRST_DELAY = timedelta(seconds=30)

bp = Blueprint("webhooks", __name__)
log = logging.getLogger(__name__)


@dataclass
class Classified:
    """What a callback body is, decided before anything is written."""

    state: str  # processed | rejected | ignored | unconfirmed
    http_status: int
    dedupe_key: str
    payload: dict[str, Any] | None = None
    raw: str | None = None
    callback: EditCallback | ServeCallback | None = None
    error: str | None = None
    pointer: str | None = None
    columns: dict[str, Any] = field(default_factory=dict)


def _body_key(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def _on_our_cdn(callback: ServeCallback, env: str) -> bool:
    """True for a copy on Shotstack's CDN in this environment (`/{region}/{env}/{owner}/{file}`).

    A copy that failed, or is still importing, may carry no URL: the lookup will tell. A
    `ready` copy on the CDN always has one; without one it is another destination's.
    """
    url = callback.url
    if url is None:
        return callback.status != "ready"
    parts = urlsplit(url)
    segments = parts.path.strip("/").split("/")
    return parts.hostname == CDN_HOST and len(segments) >= 4 and segments[1] == env


def _cdn_region(url: str | None) -> str | None:
    """The region a CDN URL names (`https://cdn.shotstack.io/au/...` is `au`), else None."""
    if url is None:
        return None
    parts = urlsplit(url)
    region = parts.path.strip("/").split("/")[0]
    return (region or None) if parts.hostname == CDN_HOST else None


# One regex search per string: a Python loop over each character is slow on a 64 KiB body.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _storable(value: Any) -> bool:
    """True unless the document holds what a JSON column cannot store: a NUL or a lone
    surrogate in a string, or a number too large for a float (`1e400` reads as infinity)."""
    if isinstance(value, str):
        return _UNSTORABLE.search(value) is None
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_storable(k) and _storable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_storable(v) for v in value)
    return True


def _not_json(constant: str) -> Any:
    """Refuse NaN and Infinity: Python's json reads them, but they are not JSON (RFC 8259)."""
    raise ValueError(f"{constant} is not JSON")


def classify(body: bytes, settings: Settings) -> Classified:
    """Decide how a body is stored and answered (SPEC §3), without touching the database."""
    try:
        payload = json.loads(body, parse_constant=_not_json)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        payload = None
    if not isinstance(payload, dict) or not _storable(payload):
        return Classified(
            "rejected",
            400,
            _body_key(body),
            # Postgres text holds no NUL character.
            raw=body.decode("utf-8", "replace").replace("\x00", "\ufffd"),
            error="the body is not a JSON object (or holds a NUL, a lone surrogate or a number"
            " out of range)",
        )
    kind = (payload.get("type"), payload.get("action"))
    model: type[EditCallback] | type[ServeCallback]
    if kind == ("edit", "render"):
        model = EditCallback
    elif kind == ("serve", "copy"):
        model = ServeCallback
    else:
        return Classified(
            "ignored", 200, _body_key(body), payload=payload, columns=_columns(payload)
        )
    try:
        callback = model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = "/".join(str(p) for p in first["loc"])
        return Classified(
            "rejected",
            422,
            _body_key(body),
            payload=payload,
            columns=_columns(payload),
            error=f"/{where}: {first['msg']}",
            pointer=f"/{where}",
        )
    columns = _columns(payload)
    if isinstance(callback, EditCallback):
        state = "processed" if callback.status in ("done", "failed") else "ignored"
    elif not _on_our_cdn(callback, settings.shotstack_env):
        state = "ignored"
    elif callback.status in CALLBACK_STATUSES:
        state = "processed"
    else:  # `deleted` or unheard of: only a lookup may apply it (SPEC §3)
        state = "unconfirmed"
    # A known payload's key names what it says; an ignored one (an S3 or Mux copy, another
    # environment's) keys on its body, so that it never takes the key of the CDN copy's.
    key = (
        _body_key(body)
        if state == "ignored"
        else f"{callback.type}:{callback.action}:{callback.id}:{callback.status}"
    )
    return Classified(state, 200, key, payload=payload, callback=callback, columns=columns)


def _columns(payload: dict[str, Any]) -> dict[str, Any]:
    def text(name: str) -> str | None:
        value = payload.get(name)
        return value if isinstance(value, str) else None

    return {
        "event_type": text("type"),
        "event_action": text("action"),
        "object_id": text("id"),
        "object_status": text("status"),
        "render_id": text("render") if payload.get("type") == "serve" else text("id"),
    }


def callback_writes(
    dialect: str, callback: EditCallback | ServeCallback, *, now: datetime, grace: float
) -> list[Write]:
    """The writes that apply a stored, known callback to renders and assets."""
    if isinstance(callback, EditCallback):
        return [
            render_write(dialect, callback.id, now=now, grace=grace, edit_status=callback.status)
        ]
    facts = AssetFacts(
        id=callback.id,
        render_id=callback.render,
        status=callback.status,
        owner=callback.owner,
        region=_cdn_region(callback.url),
        filename=callback.filename,
        url=callback.url,
        updated=callback.updated or callback.completed,
    )
    return asset_writes(dialect, facts, source=Source.CALLBACK, now=now, grace=grace)


def apply_callback(
    session: Session, callback: EditCallback | ServeCallback, *, now: datetime, grace: float
) -> None:
    """Apply a stored, known callback to renders and assets."""
    writes = callback_writes(dialect_of(session), callback, now=now, grace=grace)
    execute_writes(session, writes)


_EVENT_COLUMNS = (
    "dedupe_key",
    "received_at",
    "state",
    "http_status",
    "payload",
    "raw",
    "error",
    "next_attempt_at",
    "processed_at",
    "event_type",
    "event_action",
    "object_id",
    "object_status",
    "render_id",
)


@functools.cache
def _event_insert(dialect: str, *, skip_duplicate: bool = True) -> Any:
    """The event's INSERT, built once: building it costs more than executing it (bench/).

    With `skip_duplicate`, a stored dedupe key makes it insert and return nothing; without,
    it fails with a unique violation on `uq_webhook_events_dedupe_key`.
    """
    table: Any = WebhookEvent.__table__
    values: dict[str, Any] = {c: bindparam(c, type_=table.c[c].type) for c in _EVENT_COLUMNS}
    values["attempts"] = literal_column("0")
    insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
    if skip_duplicate:
        insert = insert.on_conflict_do_nothing(index_elements=["dedupe_key"])
    return insert.values(values).returning(table.c.id)


def _event_params(found: Classified, *, now: datetime) -> dict[str, Any]:
    params: dict[str, Any] = dict.fromkeys(_EVENT_COLUMNS[-5:])
    params.update(
        found.columns,
        dedupe_key=found.dedupe_key,
        received_at=now,
        state=found.state,
        http_status=found.http_status,
        payload=found.payload,
        raw=found.raw,
        error=found.error,
        next_attempt_at=now if found.state == "unconfirmed" else None,
        processed_at=now if found.state == "processed" else None,
    )
    return params


@functools.cache
def _mark_failed() -> Any:
    """The UPDATE that marks a stored event `failed`, due for its first retry."""
    return (
        update(WebhookEvent)
        .where(WebhookEvent.id == bindparam("event_id"))
        .values(
            # Constants in the SQL, not bound: every parameter here is named, also for psycopg.
            state=literal_column("'failed'"),
            error=bindparam("error"),
            processed_at=null(),
            next_attempt_at=bindparam("retry_at"),
        )
    )


def _failure(event_id: int, exc: Exception, *, now: datetime) -> dict[str, Any]:
    """Log a processing failure; return the parameters of _mark_failed."""
    log.error("callback %s could not be applied; it will be retried", event_id, exc_info=exc)
    return {
        "event_id": event_id,
        "error": f"{type(exc).__name__}: {exc}"[:2000],
        "retry_at": now + RETRY_FIRST_DELAY,
    }


def store_event(session: Session, found: Classified, *, now: datetime) -> int | None:
    """Insert the event unless its dedupe key is stored; return its id, or None if it was."""
    connection = session.connection()
    statement = _event_insert(connection.dialect.name)
    event_id: int | None = connection.execute(statement, _event_params(found, now=now)).scalar()
    return event_id


def process_stored(
    session: Session,
    event_id: int,
    callback: EditCallback | ServeCallback,
    *,
    now: datetime,
    grace: float,
) -> bool:
    """Apply a stored event inside a SAVEPOINT; on failure mark it `failed`. True if applied."""
    try:
        with session.begin_nested():
            apply_callback(session, callback, now=now, grace=grace)
    except Exception as exc:
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            raise  # the database went away: the event cannot be marked either; 503 (SPEC §3)
        session.execute(_mark_failed(), _failure(event_id, exc, now=now))
        return False
    return True


def _store(session: Session, found: Classified, *, now: datetime, grace: float) -> str:
    """Store and apply a callback through the session (SQLite); return the outcome."""
    event_id = store_event(session, found, now=now)
    if event_id is None:
        return "duplicate"
    if found.state != "processed" or found.callback is None:
        return found.state
    applied = process_stored(session, event_id, found.callback, now=now, grace=grace)
    return "processed" if applied else "failed"


class DuplicateEvent(Exception):
    """The callback's dedupe key is stored: its transaction is rolled back, nothing changes."""


def _store_pipelined(session: Session, found: Classified, *, now: datetime, grace: float) -> str:
    """Store and apply a callback as _store does, in one round trip to Postgres and COMMIT.

    psycopg's pipeline mode sends BEGIN, the event's INSERT, SAVEPOINT and the callback's
    writes together; the caller commits (COMMIT releases the savepoint). So that the writes
    need not wait for the INSERT's answer, a stored dedupe key makes the INSERT fail, and
    Postgres skips what follows: DuplicateEvent, and the caller rolls back.
    """
    params = _event_params(found, now=now)
    if found.payload is not None:
        params["payload"] = Jsonb(found.payload)
    writes: list[Write] = []
    failure: Exception | None = None
    if found.state == "processed" and found.callback is not None:
        try:
            writes = callback_writes("postgresql", found.callback, now=now, grace=grace)
        except Exception as exc:
            failure = exc
    with driver_errors(session.connection()) as driver:
        cursor = driver.cursor()
        try:
            with driver.pipeline():
                cursor.execute(
                    driver_sql(_event_insert("postgresql", skip_duplicate=False)), params
                )
                if writes:
                    driver.execute("SAVEPOINT apply")
                    for stmt, write_params in writes:
                        driver.execute(driver_sql(stmt), write_params)
        except psycopg.errors.UniqueViolation as exc:
            if exc.diag.constraint_name == "uq_webhook_events_dedupe_key":
                raise DuplicateEvent from None
            failure = exc
        except Exception as exc:
            if connection_lost(driver, exc):
                raise  # the event cannot be marked either: 503, and Shotstack retries (§3)
            failure = exc
        row = cursor.fetchone() if cursor.pgresult is not None else None
        if row is None:  # the event's own INSERT failed: no processing failure, nothing stored
            assert failure is not None
            raise failure
        if failure is None:
            return "processed" if writes else found.state
        with driver.pipeline():
            if writes:
                driver.execute("ROLLBACK TO SAVEPOINT apply")
            cursor.execute(driver_sql(_mark_failed()), _failure(row[0], failure, now=now))
        return "failed"


def _token_ok(settings: Settings) -> bool:
    """True if the query's `token` or the X-Webhook-Token header is a configured token."""
    given = [request.args.get("token", ""), request.headers.get("X-Webhook-Token", "")]
    ok = False
    for candidate in (value.encode() for value in given if value):
        for token in settings.webhook_token:  # compare with all, in constant time each
            ok |= hmac.compare_digest(candidate, token.get_secret_value().encode())
    return ok


def _read_body() -> bytes:
    """Read at most MAX_BODY bytes; 413 for more, declared or sent (chunked)."""
    declared = request.content_length or 0
    try:
        body = b"" if declared > MAX_BODY else request.stream.read(MAX_BODY + 1)
    except (ParseException, OSError) as exc:  # gunicorn's: broken chunked framing, cut body
        raise ApiError(
            f"the body could not be read: {type(exc).__name__}",
            status=400,
            code="unreadable_body",
            title="Bad request",
        ) from None
    if declared > MAX_BODY or len(body) > MAX_BODY:
        raise ApiError(
            f"the body is larger than {MAX_BODY} bytes",
            status=413,
            code="too_large",
            title="Payload too large",
        )
    return body


@bp.post("/webhooks/shotstack")
def receive() -> Response:
    settings: Settings = current_app.config["SETTINGS"]
    if not _token_ok(settings):
        raise Unauthorized("a valid webhook token is required (query `token` or X-Webhook-Token)")
    body = _read_body()
    found = classify(body, settings)
    now = utcnow()
    session = get_session()
    store = _store_pipelined if session.get_bind().dialect.driver == "psycopg" else _store
    try:
        with session.begin():
            outcome = store(session, found, now=now, grace=settings.reconcile_grace)
    except DuplicateEvent:
        outcome = "duplicate"
    # Every callback is in webhook_events (and in the access log): the line is for what is
    # out of the ordinary, and the common case costs no formatting unless LOG_LEVEL=DEBUG.
    log.log(
        logging.DEBUG if outcome == "processed" else logging.INFO,
        "callback stored",
        extra={
            "outcome": outcome,
            "event_type": found.columns.get("event_type"),
            "object_id": found.columns.get("object_id"),
            "attempt": request.headers.get("X-Shotstack-Attempt"),
        },
    )
    count_callback(found.columns.get("event_type"), outcome)
    if found.http_status != 200:
        return error_response(
            ApiError(
                found.error or "rejected",
                status=found.http_status,
                pointer=found.pointer,
                code="invalid_callback" if found.http_status == 422 else "not_json",
                title="Unprocessable callback" if found.http_status == 422 else "Bad request",
            )
        )
    return Response(WebhookAnswer(outcome=outcome).model_dump_json(), mimetype="application/json")


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
