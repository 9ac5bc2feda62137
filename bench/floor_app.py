"""The floors of bench_webhooks.py: the least a Flask web process can do to keep a callback.

`FLOOR_MODE=upsert` (the floor): one raw psycopg upsert and one commit per callback, on a
connection per thread; no validation, no ORM, no savepoint.

`FLOOR_MODE=service-sql`: the service's own statements, sent as the service sends them on
Postgres (BEGIN, the event, SAVEPOINT and the asset and render in one psycopg pipeline batch,
then COMMIT), with none of its Python around them. Between it and the floor lies what the
schema and SPEC §3 make Postgres do; between the service and it, what Flask-side code costs.
"""

from __future__ import annotations

import json
import os
import threading

import psycopg
from flask import Flask, Response, request

UPSERT = (
    "INSERT INTO floor_callbacks (dedupe_key, payload) VALUES (%s, %s)"
    " ON CONFLICT (dedupe_key) DO UPDATE SET payload = EXCLUDED.payload, received_at = now()"
)
_local = threading.local()


def _connection() -> psycopg.Connection[tuple[object, ...]]:
    conn: psycopg.Connection[tuple[object, ...]] | None = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = psycopg.connect(os.environ["FLOOR_DATABASE_URL"])
        _local.conn = conn
    return conn


def _service_sql() -> tuple[str, str]:
    """The service's event INSERT and asset+render upsert, as psycopg receives them."""
    from sqlalchemy.dialects.postgresql.psycopg import dialect

    from service.assets import _asset_upsert
    from service.webhooks import _event_insert

    compile_ = dialect()  # type: ignore[no-untyped-call]
    event = _event_insert("postgresql", skip_duplicate=False).compile(dialect=compile_)
    upsert = _asset_upsert("postgresql", lookup=False, with_render=True).compile(dialect=compile_)
    return str(event), str(upsert)


def _store_like_the_service(
    conn: psycopg.Connection[tuple[object, ...]], statements: tuple[str, str], body: bytes
) -> None:
    from datetime import UTC, datetime

    from psycopg.types.json import Jsonb

    payload = json.loads(body)
    now = datetime.now(UTC)
    key = f"{payload['type']}:{payload['action']}:{payload['id']}:{payload['status']}"
    event = {
        "dedupe_key": key,
        "received_at": now,
        "state": "processed",
        "http_status": 200,
        "payload": Jsonb(payload),
        "raw": None,
        "error": None,
        "next_attempt_at": None,
        "processed_at": now,
        "event_type": payload["type"],
        "event_action": payload["action"],
        "object_id": payload["id"],
        "object_status": payload["status"],
        "render_id": payload["render"],
    }
    filename = payload["url"].rsplit("/", 1)[-1]
    try:
        _send_like_the_service(conn, statements, event, payload, now, filename)
    except psycopg.errors.UniqueViolation:  # a stored dedupe key, as the service reads it
        conn.rollback()
        return
    conn.commit()


def _send_like_the_service(
    conn: psycopg.Connection[tuple[object, ...]],
    statements: tuple[str, str],
    event: dict[str, object],
    payload: dict[str, str],
    now: object,
    filename: str,
) -> None:
    event_sql, upsert_sql = statements
    with conn.pipeline(), conn.cursor() as cur:
        cur.execute(event_sql, event)
        cur.execute("SAVEPOINT apply")
        cur.execute(
            upsert_sql,
            {
                "render_id": payload["render"],
                "render_status": "unknown",
                "edit_status": None,
                "now": now,
                "due": now,
                "asset_id": payload["id"],
                "a_render_id": payload["render"],
                "a_owner": payload["owner"],
                "a_region": None,
                "a_filename": filename,
                "a_url": payload["url"],
                "a_status": payload["status"],
                "a_status_source": 0,
                "a_kind": "video",
                "a_created": now,
                "a_updated": now,
                "a_last_synced_at": None,
                "a_deleted_at": None,
            },
        )


def create_app() -> Flask:
    """Build the floor app: POST /webhooks/shotstack and GET /healthz."""
    app = Flask(__name__)
    statements = _service_sql() if os.environ.get("FLOOR_MODE") == "service-sql" else None

    @app.post("/webhooks/shotstack")
    def receive() -> Response:
        body = request.get_data()
        conn = _connection()
        if statements is not None:
            _store_like_the_service(conn, statements, body)
        else:
            payload = json.loads(body)
            key = f"{payload['type']}:{payload['action']}:{payload['id']}:{payload['status']}"
            conn.execute(UPSERT, (key, body.decode()))
            conn.commit()
        return Response('{"outcome":"processed"}', mimetype="application/json")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response('{"status":"ok"}', mimetype="application/json")

    return app
