"""POST /webhooks/shotstack against real Postgres (SPEC §3)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Connection, Engine, func, select, text
from sqlalchemy.orm import sessionmaker
from werkzeug.test import TestResponse

from service import create_app, webhooks
from service import db as db_module
from service.db import make_engine
from service.models import Asset, Render, WebhookEvent

from .conftest import WEBHOOK_TOKEN, app_settings
from .helpers import edit_callback, post_callback, serve_callback
from .tcp_proxy import TcpProxy

_real_callback_writes = webhooks.callback_writes

URL = "/webhooks/shotstack"
# SPEC §3: a database that is down or hangs answers 503 within 5 s. This is the contract's
# deadline, not a speed measurement: the bound is what Shotstack's 10 s timeout leaves us.
OUTAGE_DEADLINE_S = 5.0


def _count(connection: Connection, model: type) -> int:
    return connection.execute(select(func.count()).select_from(model)).scalar_one()


def _events(connection: Connection) -> list[Any]:
    return list(connection.execute(select(WebhookEvent).order_by(WebhookEvent.id)))


def _asset(connection: Connection, asset_id: str) -> Any:
    return connection.execute(select(Asset).where(Asset.id == asset_id)).one_or_none()


def _render(connection: Connection, render_id: str) -> Any:
    return connection.execute(select(Render).where(Render.id == render_id)).one_or_none()


def _assert_error(response: TestResponse, status: int) -> dict[str, Any]:
    assert response.status_code == status
    assert response.mimetype == "application/vnd.api+json"
    (error,) = response.json["errors"]
    assert error["status"] == str(status)
    assert error["code"] and error["title"] and error["detail"]
    return dict(error)


# --- Stored and applied ----------------------------------------------------------------------


def test_serve_callback_is_stored_and_applied(client: FlaskClient, connection: Connection) -> None:
    response = post_callback(client, serve_callback("a-1", "r-1"))
    assert response.status_code == 200
    assert response.json == {"outcome": "processed"}
    asset = _asset(connection, "a-1")
    assert (asset.id, asset.render_id, asset.status) == ("a-1", "r-1", "ready")
    assert asset.filename == "r-1.mp4"
    assert asset.kind == "video"
    assert asset.owner == "5ca6hu7s9k"
    assert asset.region == "au"  # from the CDN URL, /{region}/{env}/{owner}/{file}
    assert asset.created == asset.updated == datetime.fromisoformat("2021-07-12T11:04:44.574Z")
    (event,) = _events(connection)
    assert (event.state, event.http_status, event.event_type, event.object_id) == (
        "processed",
        200,
        "serve",
        "a-1",
    )
    assert event.dedupe_key == "serve:copy:a-1:ready"
    assert event.render_id == "r-1"
    assert event.processed_at is not None
    render = _render(connection, "r-1")
    assert (render.status, render.tracking) == ("unknown", "pending")


def test_filename_is_the_last_segment_of_the_url(
    client: FlaskClient, connection: Connection
) -> None:
    body = serve_callback("a-1", "r-1", filename="r-1-poster.jpg")  # names the URL's file
    assert "filename" not in body
    body["url"] += "?v=2#frag"
    assert post_callback(client, body).status_code == 200
    asset = _asset(connection, "a-1")
    assert (asset.filename, asset.kind) == ("r-1-poster.jpg", "poster")


def test_a_filename_given_wins_over_the_url(client: FlaskClient, connection: Connection) -> None:
    body = serve_callback("a-1", "r-1")
    body["filename"] = "r-1-thumb.png"
    assert post_callback(client, body).status_code == 200
    assert _asset(connection, "a-1").kind == "thumbnail"


def test_unknown_extra_fields_are_kept(client: FlaskClient, connection: Connection) -> None:
    body = serve_callback("a-1", "r-1", size=1234, nested={"x": [1, 2]})
    assert post_callback(client, body).status_code == 200
    (event,) = _events(connection)
    assert event.payload == body


def test_the_same_callback_twice_is_one_event_and_one_asset(
    client: FlaskClient, connection: Connection
) -> None:
    first = post_callback(client, serve_callback("a-1", "r-1"))
    second = post_callback(client, serve_callback("a-1", "r-1"))
    assert first.json == {"outcome": "processed"}
    assert second.status_code == 200
    assert second.json == {"outcome": "duplicate"}
    assert _count(connection, WebhookEvent) == 1
    assert _count(connection, Asset) == 1


def test_a_redelivered_rejected_body_is_one_event(
    client: FlaskClient, connection: Connection
) -> None:
    for _ in range(3):
        response = client.post(f"{URL}?token={WEBHOOK_TOKEN}", data=b"not json")
        assert response.status_code == 400
    (event,) = _events(connection)
    assert event.dedupe_key.startswith("sha256:")


# --- Authentication ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("", {}),
        ("?token=", {}),
        ("?token=wrong", {}),
        (f"?token={WEBHOOK_TOKEN}x", {}),
        (f"?token={WEBHOOK_TOKEN[:-1]}", {}),
        ("", {"X-Webhook-Token": "wrong"}),
        ("", {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}),  # not a place a token is read
        (f"?tokens={WEBHOOK_TOKEN}", {}),
    ],
    ids=["none", "empty", "wrong", "longer", "prefix", "wrong-header", "bearer", "other-name"],
)
def test_a_missing_or_wrong_token_is_401_and_stores_nothing(
    client: FlaskClient, connection: Connection, query: str, headers: dict[str, str]
) -> None:
    response = client.post(URL + query, json=serve_callback(), headers=headers)
    error = _assert_error(response, 401)
    assert "token" in error["detail"]
    assert WEBHOOK_TOKEN not in response.get_data(as_text=True)
    assert _count(connection, WebhookEvent) == 0
    assert _count(connection, Asset) == 0


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        (f"?token={WEBHOOK_TOKEN}", {}),
        ("", {"X-Webhook-Token": WEBHOOK_TOKEN}),
        ("?token=rotated-token-xyz", {}),
        ("", {"X-Webhook-Token": "rotated-token-xyz"}),
        ("?token=revoked", {"X-Webhook-Token": WEBHOOK_TOKEN}),  # either place may carry it
        (f"?token={WEBHOOK_TOKEN}", {"X-Webhook-Token": "revoked"}),
    ],
    ids=["query", "header", "rotated-query", "rotated-header", "header-of-two", "query-of-two"],
)
def test_each_configured_token_is_accepted_in_query_or_header(
    client: FlaskClient, connection: Connection, query: str, headers: dict[str, str]
) -> None:
    response = client.post(URL + query, json=serve_callback(), headers=headers)
    assert response.status_code == 200
    assert _count(connection, Asset) == 1


def test_no_configured_token_refuses_every_callback(pg_url: str, connection: Connection) -> None:
    app = create_app(app_settings(pg_url, webhook_token=""))
    try:
        response = app.test_client().post(f"{URL}?token=", json=serve_callback())
        _assert_error(response, 401)
    finally:
        app.extensions["db"].engine.dispose()


# --- Bad bodies ----------------------------------------------------------------------------


def test_a_body_over_64_kib_is_413_and_not_stored(
    client: FlaskClient, connection: Connection
) -> None:
    body = b'{"pad": "' + b"x" * (64 * 1024) + b'"}'
    response = client.post(
        f"{URL}?token={WEBHOOK_TOKEN}", data=body, content_type="application/json"
    )
    error = _assert_error(response, 413)
    assert "65536" in error["detail"]
    assert _count(connection, WebhookEvent) == 0


def test_a_body_of_exactly_64_kib_is_read(client: FlaskClient, connection: Connection) -> None:
    body = serve_callback()
    body["pad"] = ""
    size = len(client.application.json.dumps(body).encode())
    body["pad"] = "x" * (64 * 1024 - size)
    raw = client.application.json.dumps(body).encode()
    assert len(raw) == 64 * 1024
    response = client.post(
        f"{URL}?token={WEBHOOK_TOKEN}", data=raw, content_type="application/json"
    )
    assert response.status_code == 200
    assert _count(connection, Asset) == 1


@pytest.mark.parametrize(
    "body",
    [
        *(b"not json", b"", b"[1, 2]", b'"a string"', b"42", b"null", b"\xff\xfe{}", b'{"a": '),
        *(b'{"type": "serve", "x": NaN}', b'{"x": [-Infinity]}', b'{"x": 1e400}'),
    ],
    ids=[
        *("text", "empty", "array", "string", "number", "null", "bad-utf8", "truncated"),
        *("nan", "infinity", "number-out-of-range"),
    ],
)
def test_not_a_json_object_is_400_and_stored_as_rejected(
    client: FlaskClient, connection: Connection, body: bytes
) -> None:
    response = client.post(
        f"{URL}?token={WEBHOOK_TOKEN}", data=body, content_type="application/json"
    )
    error = _assert_error(response, 400)
    assert "JSON object" in error["detail"]
    (event,) = _events(connection)
    assert (event.state, event.http_status) == ("rejected", 400)
    assert event.raw == body.decode("utf-8", "replace")
    assert event.payload is None
    assert _count(connection, Asset) == 0


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        ({k: v for k, v in edit_callback().items() if k != "id"}, "/id"),
        ({k: v for k, v in edit_callback().items() if k != "status"}, "/status"),
        ({k: v for k, v in serve_callback().items() if k != "id"}, "/id"),
        ({k: v for k, v in serve_callback().items() if k != "render"}, "/render"),
        ({k: v for k, v in serve_callback().items() if k != "status"}, "/status"),
        ({**serve_callback(), "id": ""}, "/id"),
        ({**serve_callback(), "id": 17}, "/id"),
        ({**serve_callback(), "render": None}, "/render"),
    ],
    ids=[
        "edit-no-id",
        "edit-no-status",
        "serve-no-id",
        "serve-no-render",
        "serve-no-status",
        "empty-id",
        "number-id",
        "null-render",
    ],
)
def test_a_known_type_without_a_required_field_is_422_and_stored_as_rejected(
    client: FlaskClient, connection: Connection, body: dict[str, Any], pointer: str
) -> None:
    response = post_callback(client, body)
    error = _assert_error(response, 422)
    assert error["source"] == {"pointer": pointer}
    assert error["detail"].startswith(pointer)
    (event,) = _events(connection)
    assert (event.state, event.http_status) == ("rejected", 422)
    assert event.payload == body
    assert _count(connection, Asset) == 0
    assert _count(connection, Render) == 0


@pytest.mark.parametrize(
    "body",
    [
        {"type": "ingest", "action": "source", "id": "zzytey4v-32km", "status": "ready"},
        {"type": "ingest", "action": "rendition", "id": "zzytey4v-32km", "status": "ready"},
        {"type": "serve", "action": "transfer", "id": "a-1", "render": "r-1", "status": "ready"},
        {"something": "else"},
        serve_callback(url="https://my-bucket.s3.eu-west-1.amazonaws.com/out/r-1.mp4"),
        serve_callback(url="https://stream.mux.com/abcdef.m3u8"),
        serve_callback(env="v1"),
        serve_callback(url="https://cdn.shotstack.io/r-1.mp4"),
        edit_callback(status="rendering"),
    ],
    ids=[
        "ingest",
        "ingest-rendition",
        "serve-other-action",
        "no-type",
        "s3",
        "mux",
        "other-env",
        "cdn-short-path",
        "edit-not-final",
    ],
)
def test_other_callbacks_are_stored_as_ignored(
    client: FlaskClient, connection: Connection, body: dict[str, Any]
) -> None:
    response = post_callback(client, body)
    assert response.status_code == 200
    assert response.json == {"outcome": "ignored"}
    (event,) = _events(connection)
    assert (event.state, event.http_status) == ("ignored", 200)
    assert event.payload == body
    assert _count(connection, Asset) == 0
    assert _count(connection, Render) == 0


@pytest.mark.parametrize(
    "unreadable",
    [
        {"completed": "yesterday"},
        {"completed": "0001-01-01T00:00:00+01:00"},  # year 0 in UTC: was a 500
        {"updated": "9999-12-31T23:59:59-01:00"},  # year 10000 in UTC
        {"owner": 12345, "filename": 7},
    ],
    ids=["words", "before-year-1", "after-year-9999", "numbers"],
)
def test_an_optional_field_that_cannot_be_read_is_read_as_absent(
    client: FlaskClient, connection: Connection, unreadable: dict[str, Any]
) -> None:
    """SPEC §3 refuses a known callback only for a missing required field."""
    body = {**serve_callback("a-1", "r-1"), **unreadable}
    assert post_callback(client, body).json == {"outcome": "processed"}
    (event,) = _events(connection)
    assert (event.state, event.payload) == ("processed", body)
    asset = _asset(connection, "a-1")
    assert asset.status == "ready" and asset.filename == "r-1.mp4"
    assert asset.updated is None or "completed" not in unreadable
    assert asset.owner is None or "owner" not in unreadable


def test_an_ignored_copy_does_not_take_the_key_of_the_cdn_copy(
    client: FlaskClient, connection: Connection
) -> None:
    """An S3 or another environment's copy may carry the id of ours; it must not hide it."""
    s3 = serve_callback("a-1", "r-1", url="https://bucket.s3.amazonaws.com/r-1.mp4")
    other_env = serve_callback("a-1", "r-1", env="v1")
    for body in (s3, other_env):
        assert post_callback(client, body).json == {"outcome": "ignored"}
        assert post_callback(client, body).json == {"outcome": "duplicate"}
    assert post_callback(client, serve_callback("a-1", "r-1")).json == {"outcome": "processed"}
    assert _asset(connection, "a-1").status == "ready"
    assert [e.state for e in _events(connection)] == ["ignored", "ignored", "processed"]


@pytest.mark.parametrize(
    ("status", "outcome"),
    [("ready", "ignored"), ("failed", "processed"), ("importing", "processed")],
)
def test_a_copy_without_a_url_is_ours_unless_it_claims_to_be_ready(
    client: FlaskClient, connection: Connection, status: str, outcome: str
) -> None:
    """A CDN copy that is ready has its URL; one without is another destination's (Mux)."""
    body = {**serve_callback("a-1", "r-1", status=status), "url": None}
    assert post_callback(client, body).json == {"outcome": outcome}
    assert (_asset(connection, "a-1") is None) == (outcome == "ignored")


@pytest.mark.parametrize("status", ["deleted", "overwritten"])
def test_a_callback_that_cannot_set_its_status_is_unconfirmed_and_changes_nothing(
    client: FlaskClient, connection: Connection, status: str
) -> None:
    assert post_callback(client, serve_callback("a-1", "r-1", status="ready")).status_code == 200
    before = _asset(connection, "a-1")
    response = post_callback(
        client, serve_callback("a-1", "r-1", status=status, completed="2030-01-01T00:00:00Z")
    )
    assert response.status_code == 200
    assert response.json == {"outcome": "unconfirmed"}
    assert _asset(connection, "a-1") == before
    event = _events(connection)[-1]
    assert event.state == "unconfirmed"
    assert event.next_attempt_at is not None  # the worker confirms it by a lookup


def test_an_unconfirmed_callback_about_an_unknown_asset_records_nothing(
    client: FlaskClient, connection: Connection
) -> None:
    response = post_callback(client, serve_callback("a-1", "r-1", status="deleted"))
    assert response.json == {"outcome": "unconfirmed"}
    assert _count(connection, Asset) == 0


# --- Status order (SPEC §3) ----------------------------------------------------------------

RANK = {"importing": 0, "ready": 1, "failed": 1}
STAMPS = [None, "2024-05-01T10:00:00.000Z", "2024-05-01T10:00:05.000Z"]


def _expected(sent: list[tuple[str, str | None]]) -> tuple[str, str | None]:
    """The status and timestamp SPEC §3 keeps, whatever the order they came in.

    Higher rank wins; within a rank the newer timestamp (a missing one is older than any);
    on a full tie `failed` wins, our rule so that arrival order never matters.
    """

    def key(item: tuple[str, str | None]) -> tuple[int, str, int]:
        status, stamp = item
        return (RANK[status], stamp or "", status == "failed")

    return max(sent, key=key)


ORDER_CASES = [
    stamps
    for stamps in itertools.product(STAMPS, repeat=3)  # importing, ready, failed
]


def test_every_order_of_callbacks_ends_in_the_same_status(
    client: FlaskClient, connection: Connection
) -> None:
    for case_no, stamps in enumerate(ORDER_CASES):
        sent = list(zip(("importing", "ready", "failed"), stamps, strict=True))
        want_status, want_stamp = _expected(sent)
        outcomes = set()
        for perm_no, order in enumerate(itertools.permutations(sent)):
            asset_id = f"a-{case_no}-{perm_no}"
            for status, stamp in order:
                body = serve_callback(asset_id, f"r-{case_no}", status=status, completed=stamp)
                assert post_callback(client, body).status_code == 200
            asset = _asset(connection, asset_id)
            got_stamp = asset.updated.isoformat() if asset.updated else None
            want = datetime.fromisoformat(want_stamp).isoformat() if want_stamp else None
            assert (asset.status, got_stamp) == (want_status, want), (order, stamps)
            outcomes.add(asset.status)
        assert len(outcomes) == 1


def test_a_newer_updated_beats_completed(client: FlaskClient, connection: Connection) -> None:
    """`updated` is the Shotstack timestamp when a callback carries it, else `completed`."""
    failed = serve_callback(
        "a-1", status="failed", completed="2024-01-01T00:00:09Z", updated="2024-01-01T00:00:01Z"
    )
    ready = serve_callback("a-1", status="ready", completed="2024-01-01T00:00:05Z")
    for body in (failed, ready):
        assert post_callback(client, body).status_code == 200
    assert _asset(connection, "a-1").status == "ready"


# --- Renders -------------------------------------------------------------------------------


def test_an_edit_callback_failed_settles_the_render(
    client: FlaskClient, connection: Connection
) -> None:
    assert post_callback(client, edit_callback("r-1", "failed")).status_code == 200
    render = _render(connection, "r-1")
    assert (render.status, render.tracking) == ("failed", "settled")
    assert render.settled_at is not None
    assert render.next_check_at is None
    # A late `done` does not undo it.
    assert post_callback(client, edit_callback("r-1", "done")).status_code == 200
    assert _render(connection, "r-1").status == "failed"


def test_an_edit_callback_done_brings_the_first_lookup_forward(
    client: FlaskClient, connection: Connection
) -> None:
    far = "2099-01-01T00:00:00+00:00"
    connection.exec_driver_sql(
        "INSERT INTO renders (id, status, tracking, attempts, next_check_at, first_seen_at)"
        f" VALUES ('r-1', 'unknown', 'pending', 0, '{far}', now())"
    )
    assert post_callback(client, edit_callback("r-1", "done")).status_code == 200
    render = _render(connection, "r-1")
    assert render.status == "done"
    assert render.tracking == "pending"
    (event,) = _events(connection)
    grace = client.application.config["SETTINGS"].reconcile_grace
    assert render.next_check_at.timestamp() == pytest.approx(
        event.received_at.timestamp() + grace, abs=1e-3
    )


def test_a_new_asset_reopens_a_settled_render(client: FlaskClient, connection: Connection) -> None:
    assert post_callback(client, serve_callback("a-1", "r-1")).status_code == 200
    connection.exec_driver_sql(
        "UPDATE renders SET tracking = 'settled', settled_at = now(), next_check_at = NULL,"
        " attempts = 3 WHERE id = 'r-1'"
    )
    # A callback about a known asset leaves it settled ...
    again = serve_callback("a-1", "r-1", status="failed", completed="2030-01-01T00:00:00Z")
    assert post_callback(client, again).status_code == 200
    assert _render(connection, "r-1").tracking == "settled"
    # ... one about an asset the settling lookup did not see re-opens it.
    assert post_callback(client, serve_callback("a-2", "r-1", filename="r-1-poster.jpg")).json == {
        "outcome": "processed"
    }
    render = _render(connection, "r-1")
    assert (render.tracking, render.settled_at, render.attempts) == ("pending", None, 0)
    assert render.next_check_at is not None


# --- The savepoint -------------------------------------------------------------------------


@pytest.fixture(params=["pipelined", "session"])
def write_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on both ways a callback reaches Postgres: psycopg's pipeline, and the
    session's statement-by-statement path (the one SQLite takes)."""
    if request.param == "session":
        monkeypatch.setattr(webhooks, "_store_pipelined", webhooks._store)
    return str(request.param)


def _writes_then(monkeypatch: pytest.MonkeyPatch, *extra: Any) -> None:
    """Make a callback's writes the real ones followed by `extra` statements."""
    real_writes = webhooks.callback_writes

    def writes(*args: Any, **kwargs: Any) -> list[Any]:
        return [*real_writes(*args, **kwargs), *((stmt, {}) for stmt in extra)]

    monkeypatch.setattr(webhooks, "callback_writes", writes)


def test_a_processing_failure_rolls_back_only_the_savepoint(
    client: FlaskClient, connection: Connection, monkeypatch: pytest.MonkeyPatch, write_path: str
) -> None:
    """The render and the asset are written, then a statement the database refuses (a check
    constraint): the savepoint goes, the event stays, marked `failed`."""
    _writes_then(monkeypatch, text("UPDATE assets SET status = 'bogus'"))
    response = post_callback(client, serve_callback("a-1", "r-1"))
    assert response.status_code == 200
    assert response.json == {"outcome": "failed"}
    (event,) = _events(connection)
    assert event.state == "failed"
    assert "IntegrityError" in event.error or "CheckViolation" in event.error
    assert event.processed_at is None
    assert event.next_attempt_at > event.received_at
    assert event.payload == serve_callback("a-1", "r-1")
    assert _count(connection, Asset) == 0
    assert _count(connection, Render) == 0

    # A redelivery is a duplicate: the worker, not Shotstack, retries a failed event.
    monkeypatch.setattr(webhooks, "callback_writes", _real_callback_writes)
    assert post_callback(client, serve_callback("a-1", "r-1")).json == {"outcome": "duplicate"}
    assert _asset(connection, "a-1") is None  # a duplicate's writes are not applied
    assert [e.state for e in _events(connection)] == ["failed"]
    # The transaction went on after the failure: the next callback lands in full.
    assert post_callback(client, serve_callback("a-2", "r-1")).json == {"outcome": "processed"}
    assert _asset(connection, "a-2").status == "ready"


def test_a_failure_before_any_write_marks_the_event_failed(
    client: FlaskClient, connection: Connection, monkeypatch: pytest.MonkeyPatch, write_path: str
) -> None:
    def boom(*_args: Any, **_kwargs: Any) -> list[Any]:
        raise RuntimeError("boom before writing")

    monkeypatch.setattr(webhooks, "callback_writes", boom)
    response = post_callback(client, edit_callback("r-1", status="failed"))
    assert response.json == {"outcome": "failed"}
    (event,) = _events(connection)
    assert (event.state, event.error) == ("failed", "RuntimeError: boom before writing")
    assert _count(connection, Render) == 0


# --- Real commits: concurrency -------------------------------------------------------------


def _wide_pool(app: Flask, url: str, size: int) -> None:
    """Give the app a pool of `size` connections, so that no request waits for another."""
    db = app.extensions["db"]
    db.engine.dispose()
    db.engine = make_engine(url, pool_size=size, max_overflow=0)
    db.sessionmaker = sessionmaker(db.engine, expire_on_commit=False)


def test_twenty_simultaneous_deliveries_leave_one_event_and_one_asset(
    live_app: Flask, live_url: str, live_engine: Engine
) -> None:
    _wide_pool(live_app, live_app.config["SETTINGS"].database_url, 20)
    barrier = threading.Barrier(20)
    body = serve_callback("a-1", "r-1")
    backends: list[int] = []

    def deliver(_: int) -> TestResponse:
        client = live_app.test_client()
        # Open all twenty pooled connections at once, so each delivery finds its own.
        session = live_app.extensions["db"].sessionmaker()
        backends.append(
            session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        )
        barrier.wait(timeout=30)
        session.close()
        barrier.wait(timeout=30)
        return post_callback(client, body)

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(deliver, range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    outcomes = sorted(r.json["outcome"] for r in responses)
    assert outcomes == ["duplicate"] * 19 + ["processed"]
    assert len(set(backends)) == 20
    with live_engine.connect() as conn:
        assert _count(conn, WebhookEvent) == 1
        assert _count(conn, Asset) == 1
        assert _count(conn, Render) == 1


def test_simultaneous_callbacks_of_one_render_all_apply(
    live_app: Flask, live_engine: Engine
) -> None:
    """Different callbacks of one render contend for its row; none deadlocks or is lost."""
    _wide_pool(live_app, live_app.config["SETTINGS"].database_url, 12)
    bodies = [
        serve_callback(f"a-{i}", "r-1", status=s)
        for i in range(4)
        for s in ("importing", "ready", "failed")
    ]
    bodies.append(edit_callback("r-1", "done"))
    barrier = threading.Barrier(len(bodies))

    def deliver(body: dict[str, Any]) -> int:
        client = live_app.test_client()
        barrier.wait(timeout=30)
        return post_callback(client, body).status_code

    with ThreadPoolExecutor(len(bodies)) as pool:
        assert list(pool.map(deliver, bodies)) == [200] * len(bodies)
    with live_engine.connect() as conn:
        assert _count(conn, WebhookEvent) == len(bodies)
        assert conn.execute(
            select(func.count()).where(WebhookEvent.state == "processed")
        ).scalar_one() == len(bodies)
        statuses = conn.execute(select(Asset.status)).scalars().all()
        assert statuses == ["failed"] * 4  # same timestamps: the full-tie rule
        assert _render(conn, "r-1").status == "done"


# --- Real commits: a database that goes away -----------------------------------------------


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    with TcpProxy() as proxy:
        yield proxy


@pytest.fixture
def outage_app(live_url: str, live_engine: Engine, proxy: TcpProxy) -> Iterator[Flask]:
    """The app on the live database, reached through a proxy the test can cut or hang."""
    base, _, name = live_url.rpartition("/")
    host_part = base.rsplit("@", 1)
    url = f"{host_part[0]}@127.0.0.1:{proxy.port}/{name}"
    app = create_app(app_settings(url))
    app.config["TESTING"] = True
    yield app
    proxy.restore()
    app.extensions["db"].engine.dispose()


def _timed_post(client: FlaskClient, body: bytes) -> tuple[TestResponse, float]:
    import time

    started = time.monotonic()
    response = client.post(
        f"{URL}?token={WEBHOOK_TOKEN}", data=body, content_type="application/json"
    )
    return response, time.monotonic() - started


def _json(body: dict[str, Any]) -> bytes:
    import json

    return json.dumps(body).encode()


def _assert_unavailable(response: TestResponse, elapsed: float) -> None:
    _assert_error(response, 503)
    assert response.headers["Retry-After"].isdigit()
    assert elapsed < OUTAGE_DEADLINE_S


def _during_apply(monkeypatch: pytest.MonkeyPatch, fault: Callable[[], None]) -> None:
    """Bring the fault on once the event is inserted (not committed), before its writes."""
    real_writes = webhooks.callback_writes

    def fail_midway(*args: Any, **kwargs: Any) -> list[Any]:
        writes = real_writes(*args, **kwargs)
        fault()
        return writes  # the next statements meet the fault

    monkeypatch.setattr(webhooks, "callback_writes", fail_midway)


@pytest.mark.parametrize("fault", ["cut", "hang"])
def test_a_database_lost_mid_request_is_503_and_leaves_nothing_half_written(
    outage_app: Flask,
    live_engine: Engine,
    proxy: TcpProxy,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
    write_path: str,
) -> None:
    client = outage_app.test_client()
    body = _json(serve_callback("a-1", "r-1"))
    assert _timed_post(client, _json(serve_callback("a-0", "r-0")))[0].status_code == 200

    _during_apply(monkeypatch, getattr(proxy, fault))
    response, elapsed = _timed_post(client, body)
    _assert_unavailable(response, elapsed)

    monkeypatch.undo()
    proxy.restore()  # closes the hung connection: the server rolls its transaction back
    with live_engine.connect() as conn:
        assert [e.object_id for e in _events(conn)] == ["a-0"]
        assert _asset(conn, "a-1") is None
        assert _render(conn, "r-1") is None
    # Shotstack's retry then lands in full.
    response, _ = _timed_post(client, body)
    assert response.json == {"outcome": "processed"}
    with live_engine.connect() as conn:
        assert _count(conn, WebhookEvent) == 2
        assert _asset(conn, "a-1").status == "ready"


@pytest.mark.parametrize("fault", ["cut", "hang"])
@pytest.mark.parametrize("kind", ["known", "rejected"])
def test_a_database_down_or_hung_before_the_request_is_503(
    outage_app: Flask, live_engine: Engine, proxy: TcpProxy, fault: str, kind: str
) -> None:
    client = outage_app.test_client()
    assert _timed_post(client, _json(serve_callback("a-0", "r-0")))[0].status_code == 200
    getattr(proxy, fault)()  # the pool holds a connection that now fails its ping
    body = _json(serve_callback("a-1", "r-1")) if kind == "known" else b"not json"
    response, elapsed = _timed_post(client, body)
    # A body that would be rejected cannot be stored either: 503, not 400, so it is retried.
    _assert_unavailable(response, elapsed)
    proxy.restore()
    with live_engine.connect() as conn:
        assert _count(conn, WebhookEvent) == 1
    response, _ = _timed_post(client, body)
    assert response.status_code == (200 if kind == "known" else 400)
    with live_engine.connect() as conn:
        assert _count(conn, WebhookEvent) == 2


def _count_pings(app: Flask, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    dialect = app.extensions["db"].engine.dialect
    pings: list[int] = []
    real_ping = dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        pings.append(1)
        return bool(real_ping(dbapi_connection))

    monkeypatch.setattr(dialect, "do_ping", counted)
    return pings


def test_a_connection_idle_past_the_threshold_is_pinged_and_replaced_when_dead(
    outage_app: Flask, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database restart (every connection closed) costs no request when the pool pings."""
    client = outage_app.test_client()
    assert _timed_post(client, _json(serve_callback("a-0", "r-0")))[0].status_code == 200
    pings = _count_pings(outage_app, monkeypatch)
    monkeypatch.setattr(db_module, "IDLE_BEFORE_PING_S", 0.0)  # every checkout counts as idle
    proxy.restore()  # closes the pooled connection, as a restart of Postgres would
    response, _ = _timed_post(client, _json(serve_callback("a-1", "r-1")))
    assert response.json == {"outcome": "processed"}
    assert pings == [1]


def test_a_connection_back_in_use_at_once_is_not_pinged(
    outage_app: Flask, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load no request pays a ping; a connection found dead then is a 503, retried."""
    client = outage_app.test_client()
    assert _timed_post(client, _json(serve_callback("a-0", "r-0")))[0].status_code == 200
    pings = _count_pings(outage_app, monkeypatch)
    monkeypatch.setattr(db_module, "IDLE_BEFORE_PING_S", 3600.0)
    assert _timed_post(client, _json(serve_callback("a-1", "r-1")))[0].status_code == 200
    proxy.restore()
    response, elapsed = _timed_post(client, _json(serve_callback("a-2", "r-2")))
    _assert_unavailable(response, elapsed)
    assert pings == []
    # The pool let the dead connection go: the retry gets a new one.
    assert _timed_post(client, _json(serve_callback("a-2", "r-2")))[0].json == {
        "outcome": "processed"
    }
