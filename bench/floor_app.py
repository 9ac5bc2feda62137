"""The floor of bench_webhooks.py: the least a Flask web process can do to keep a callback.

One raw psycopg upsert and one commit per callback, on a connection per thread, no validation,
no ORM, no savepoint. The service does more (event, render, asset in one transaction); the
benchmark reports how close it comes to this.
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


def create_app() -> Flask:
    """Build the floor app: POST /webhooks/shotstack and GET /healthz."""
    app = Flask(__name__)

    @app.post("/webhooks/shotstack")
    def receive() -> Response:
        body = request.get_data()
        payload = json.loads(body)
        key = f"{payload['type']}:{payload['action']}:{payload['id']}:{payload['status']}"
        conn = _connection()
        conn.execute(UPSERT, (key, body.decode()))
        conn.commit()
        return Response('{"outcome":"processed"}', mimetype="application/json")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response('{"status":"ok"}', mimetype="application/json")

    return app
