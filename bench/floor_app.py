"""The floors of bench_webhooks.py: the least a Flask web process can do to keep a callback.

`FLOOR_MODE=upsert` (the floor): one raw psycopg upsert and one commit per callback, on a
connection per thread; no validation, no ORM, no savepoint.

`FLOOR_MODE=service-sql`: the service's own statements, sent as the service sends them on
Postgres (BEGIN, the event, SAVEPOINT and the asset and render in one psycopg pipeline batch,
then COMMIT), with none of its Python around them. Between it and the floor lies what the
schema and SPEC §3 make Postgres do; between the service and it, what Flask-side code costs.

`FLOOR_MODE=service-function`: the same statements inside one PL/pgSQL function (made by
bench_webhooks.py from service_function(); its EXCEPTION block is the savepoint), called in
one round trip on an autocommit connection, again with no Python around it: what a write
path moved into Postgres could reach. The service has no such path (it would be a second
copy of the write that SQLite runs in Python); this measures what one would buy.
"""

from __future__ import annotations

import json
import os
import re
import threading
from datetime import UTC, datetime
from typing import Any

import psycopg
from flask import Flask, Response, request
from psycopg.types.json import Jsonb

UPSERT = (
    "INSERT INTO floor_callbacks (dedupe_key, payload) VALUES (%s, %s)"
    " ON CONFLICT (dedupe_key) DO UPDATE SET payload = EXCLUDED.payload, received_at = now()"
)
FUNCTION = "bench_service_callback"
_PARAMETER = re.compile(r"%\((\w+)\)s")
_local = threading.local()


def _connection(*, autocommit: bool) -> psycopg.Connection[tuple[Any, ...]]:
    conn: psycopg.Connection[tuple[Any, ...]] | None = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = psycopg.connect(os.environ["FLOOR_DATABASE_URL"], autocommit=autocommit)
        _local.conn = conn
    return conn


def _compiled(*, skip_duplicate: bool) -> tuple[str, str]:
    """The service's event INSERT and asset+render upsert, as psycopg receives them."""
    from service.assets import _asset_upsert
    from service.db import driver_sql
    from service.webhooks import _event_insert

    event = _event_insert("postgresql", skip_duplicate=skip_duplicate)
    upsert = _asset_upsert("postgresql", lookup=False, with_render=True)
    return driver_sql(event), driver_sql(upsert)


def _service_params(payload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parameters of the service's two statements for a serve callback (as it sets them)."""
    now = datetime.now(UTC)
    event = {
        "dedupe_key": f"{payload['type']}:{payload['action']}:{payload['id']}:{payload['status']}",
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
    upsert = {
        "render_id": payload["render"],
        "render_status": "unknown",
        "now": now,
        "due": now,
        "asset_id": payload["id"],
        "a_render_id": payload["render"],
        "a_owner": payload["owner"],
        "a_region": None,
        "a_filename": payload["url"].rsplit("/", 1)[-1],
        "a_url": payload["url"],
        "a_status": payload["status"],
        "a_status_source": 0,
        "a_kind": "video",
        "a_created": now,
        "a_updated": now,
        "a_last_synced_at": None,
        "a_deleted_at": None,
    }
    return event, upsert


def service_function() -> tuple[str, str]:
    """The DDL of the service-function mode's function, and the call that runs it.

    Its arguments are text, cast by the statements themselves as they are for psycopg; they
    are named `e_<parameter>` for the event, `u_<parameter>` for the upsert.
    """
    event, upsert = _compiled(skip_duplicate=True)
    names = {"e": _PARAMETER.findall(event), "u": _PARAMETER.findall(upsert)}
    event, upsert = _PARAMETER.sub(r"e_\1", event), _PARAMETER.sub(r"u_\1", upsert)
    arguments = [f"{k}_{n}" for k in ("e", "u") for n in dict.fromkeys(names[k])]
    ddl = f"""
CREATE OR REPLACE FUNCTION {FUNCTION}({", ".join(f"{a} text" for a in arguments)})
RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE event_id bigint;
BEGIN
  {event} INTO event_id;
  IF event_id IS NULL THEN RETURN 'duplicate'; END IF;
  BEGIN
    {upsert};
  EXCEPTION WHEN OTHERS THEN
    UPDATE webhook_events SET state = 'failed', error = SQLERRM, processed_at = NULL,
      next_attempt_at = now() + interval '30 seconds' WHERE id = event_id;
    RETURN 'failed';
  END;
  RETURN 'processed';
END $fn$"""
    call = f"SELECT {FUNCTION}({', '.join(f'%({a})s' for a in arguments)})"
    return ddl, call


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, Jsonb):
        return json.dumps(value.obj)
    return value.isoformat() if isinstance(value, datetime) else str(value)


def create_app() -> Flask:
    """Build the floor app: POST /webhooks/shotstack and GET /healthz."""
    app = Flask(__name__)
    mode = os.environ.get("FLOOR_MODE", "upsert")
    event_sql, upsert_sql = _compiled(skip_duplicate=False)
    _, call = service_function()

    def service_sql(payload: dict[str, Any]) -> None:
        conn = _connection(autocommit=False)
        event, upsert = _service_params(payload)
        try:
            with conn.pipeline():
                conn.execute(event_sql, event)
                conn.execute("SAVEPOINT apply")
                conn.execute(upsert_sql, upsert)
        except psycopg.errors.UniqueViolation:  # a stored dedupe key, as the service reads it
            conn.rollback()
            return
        conn.commit()

    def service_function_call(payload: dict[str, Any]) -> None:
        event, upsert = _service_params(payload)
        params = {f"e_{k}": _as_text(v) for k, v in event.items()}
        params.update({f"u_{k}": _as_text(v) for k, v in upsert.items()})
        _connection(autocommit=True).execute(call, params)

    def floor(payload: dict[str, Any], body: bytes) -> None:
        conn = _connection(autocommit=False)
        key = f"{payload['type']}:{payload['action']}:{payload['id']}:{payload['status']}"
        conn.execute(UPSERT, (key, body.decode()))
        conn.commit()

    @app.post("/webhooks/shotstack")
    def receive() -> Response:
        body = request.get_data()
        payload = json.loads(body)
        if mode == "service-sql":
            service_sql(payload)
        elif mode == "service-function":
            service_function_call(payload)
        else:
            floor(payload, body)
        return Response('{"outcome":"processed"}', mimetype="application/json")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response('{"status":"ok"}', mimetype="application/json")

    return app
