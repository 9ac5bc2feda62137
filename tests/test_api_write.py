"""The calls to Shotstack that the API makes: DELETE, ?refresh=true, the render fallback (SPEC §4).

Shotstack is the stand-in, a real HTTP server; the database is the suite's Postgres.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Connection, Engine, select, text
from sqlalchemy.orm import sessionmaker

from service import create_app
from service.assets import AssetFacts, record_asset
from service.db import make_engine
from service.models import Asset, Render, Source
from service.shotstack import RateBudget

from .conftest import SHOTSTACK_KEY, app_settings, upgrade
from .helpers import post_callback, serve_callback
from .standin import ServeStandIn

KEY = SHOTSTACK_KEY
RENDER = "d2b46ed6-998a-4d6b-9d91-b8cf0193a655"
ASSET = "e4433cbf-e501-76a2-ac8b-715d26997540"
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def shotstack_settings(url: str, database_url: str, **extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "shotstack_api_url": url,
        "shotstack_api_key": KEY,
        "shotstack_timeout": "0.5,0.5",
    }
    return app_settings(database_url, **{**values, **extra})


@contextmanager
def make_app(
    standin: ServeStandIn, pg_url: str, connection: Connection, **extra: Any
) -> Iterator[Flask]:
    """An app calling the stand-in, its sessions joined to the test's transaction."""
    app = create_app(shotstack_settings(standin.url, pg_url, **extra))
    app.config["TESTING"] = True
    app.extensions["db"].sessionmaker = sessionmaker(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    )
    yield app
    app.extensions["shotstack"].close()
    app.extensions["db"].engine.dispose()


@pytest.fixture
def app(
    standin: ServeStandIn, pg_url: str, connection: Connection, budget: RateBudget
) -> Iterator[Flask]:
    with make_app(standin, pg_url, connection, shotstack_rate_limit=1000) as app:
        yield app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def store(connection: Connection, status: str, asset_id: str = ASSET) -> None:
    """Put an asset here as a lookup would have found it."""
    from sqlalchemy.orm import Session

    with Session(bind=connection, join_transaction_mode="create_savepoint") as session:
        facts = AssetFacts(
            id=asset_id, render_id=RENDER, status=status, filename=f"{RENDER}.mp4", updated=NOW
        )
        record_asset(session, facts, source=Source.LOOKUP, now=NOW, grace=60)
        session.commit()


def row(connection: Connection, asset_id: str = ASSET) -> Any:
    return connection.execute(select(Asset).where(Asset.id == asset_id)).one_or_none()


def errors(response: Any) -> dict[str, Any]:
    (error,) = response.json["errors"]
    return dict(error)


# --- DELETE /api/assets/{id}: every row of SPEC §4's table -------------------------------------


def test_delete_of_a_deleted_asset_calls_no_one(
    client: FlaskClient, auth: dict[str, str], connection: Connection, standin: ServeStandIn
) -> None:
    store(connection, "deleted")
    assert client.delete(f"/api/assets/{ASSET}", headers=auth).status_code == 204
    assert standin.calls == []


def test_delete_while_importing_is_a_conflict(
    client: FlaskClient, auth: dict[str, str], connection: Connection, standin: ServeStandIn
) -> None:
    store(connection, "importing")
    response = client.delete(f"/api/assets/{ASSET}", headers=auth)
    assert response.status_code == 409
    assert "retry when it is ready" in errors(response)["detail"]
    assert standin.calls == []
    assert row(connection).status == "importing"


@pytest.mark.parametrize(("status", "at_shotstack"), [("ready", True), ("failed", False)])
def test_delete_marks_deleted_by_the_caller(
    client: FlaskClient,
    auth: dict[str, str],
    connection: Connection,
    standin: ServeStandIn,
    status: str,
    at_shotstack: bool,
) -> None:
    store(connection, status)
    if at_shotstack:  # Shotstack answers 204; else it no longer knows the asset: 404
        standin.add_asset(ASSET, RENDER, status=status)
    response = client.delete(f"/api/assets/{ASSET}", headers=auth)
    assert response.status_code == 204 and response.data == b""
    assert response.mimetype == "application/vnd.api+json"  # never text/html
    assert standin.count("DELETE", f"/serve/stage/assets/{ASSET}") == 1
    asset = row(connection)
    assert (asset.status, asset.deleted_by) == ("deleted", "ci")
    assert asset.deleted_at is not None
    if at_shotstack:
        assert standin.asset(ASSET)["status"] == "deleted"  # type: ignore[index]
    shown = client.get(f"/api/assets/{ASSET}", headers=auth).json["data"]["attributes"]
    assert (shown["status"], shown["deletedBy"]) == ("deleted", "ci")


def test_delete_of_an_asset_known_only_to_shotstack(
    client: FlaskClient, auth: dict[str, str], connection: Connection, standin: ServeStandIn
) -> None:
    standin.add_asset(ASSET, RENDER, filename=f"{RENDER}-poster.jpg")
    response = client.delete(f"/api/assets/{ASSET}", headers=auth)
    assert response.status_code == 204
    assert [(m, p) for _, m, p in standin.calls] == [
        ("GET", f"/serve/stage/assets/{ASSET}"),
        ("DELETE", f"/serve/stage/assets/{ASSET}"),
    ]
    asset = row(connection)
    assert (asset.status, asset.deleted_by, asset.kind) == ("deleted", "ci", "poster")
    assert connection.execute(select(Render.id)).scalar() == RENDER  # tracked from now on


@pytest.mark.parametrize(("there", "expected"), [("importing", 409), ("deleted", 204)])
def test_delete_of_an_unknown_asset_follows_what_shotstack_says(
    client: FlaskClient,
    auth: dict[str, str],
    connection: Connection,
    standin: ServeStandIn,
    there: str,
    expected: int,
) -> None:
    standin.add_asset(ASSET, RENDER, status=there)
    assert client.delete(f"/api/assets/{ASSET}", headers=auth).status_code == expected
    assert standin.count("DELETE") == 0
    asset = row(connection)
    assert asset.status == there and asset.deleted_by is None


def test_delete_of_an_asset_no_one_knows_is_404(
    client: FlaskClient, auth: dict[str, str], connection: Connection, standin: ServeStandIn
) -> None:
    response = client.delete(f"/api/assets/{ASSET}", headers=auth)
    assert response.status_code == 404
    assert standin.count("GET") == 1 and standin.count("DELETE") == 0
    assert row(connection) is None


FAILURES = [
    pytest.param((2, 500), 502, "shotstack_unavailable", id="5xx"),
    pytest.param((2, "timeout"), 502, "shotstack_unavailable", id="timeout"),
    pytest.param((2, "reset"), 502, "shotstack_unavailable", id="connection-reset"),
    pytest.param((1, 403), 502, "shotstack_auth_error", id="403"),
    pytest.param((1, 401), 502, "shotstack_auth_error", id="401"),
    pytest.param((1, 429), 503, "shotstack_rate_limited", id="429"),
]


@pytest.mark.parametrize("here", ["ready", None])
@pytest.mark.parametrize(("fault", "status", "code"), FAILURES)
def test_delete_failing_at_shotstack_changes_nothing(
    client: FlaskClient,
    auth: dict[str, str],
    connection: Connection,
    standin: ServeStandIn,
    here: str | None,
    fault: tuple[int, Any],
    status: int,
    code: str,
) -> None:
    if here:
        store(connection, here)
    standin.add_asset(ASSET, RENDER)
    standin.fail_next(fault[0], fault[1], retry_after=None if fault[1] != 429 else 7)
    before = row(connection)
    response = client.delete(f"/api/assets/{ASSET}", headers=auth)
    assert response.status_code == status
    error = errors(response)
    assert error["code"] == code
    assert row(connection) == before
    assert standin.asset(ASSET)["status"] == "ready"  # type: ignore[index]
    assert len(standin.calls) == fault[0]  # one retry at most while serving a request
    if status == 503:
        assert response.headers["Retry-After"] == "7"
    if code == "shotstack_auth_error":
        assert "SHOTSTACK_API_KEY" in error["detail"] and "SHOTSTACK_ENV" in error["detail"]
        assert KEY not in response.get_data(as_text=True)


def test_nobody_listening_is_502(
    standin: ServeStandIn, pg_url: str, connection: Connection, auth: dict[str, str], budget: Any
) -> None:
    with make_app(standin, pg_url, connection, shotstack_api_url="http://127.0.0.1:9") as app:
        store(connection, "ready")
        response = app.test_client().delete(f"/api/assets/{ASSET}", headers=auth)
        assert response.status_code == 502
        assert row(connection).status == "ready"


def test_no_key_is_502_naming_the_setting(
    standin: ServeStandIn, pg_url: str, connection: Connection, auth: dict[str, str], budget: Any
) -> None:
    with make_app(standin, pg_url, connection, shotstack_api_key=None) as app:
        store(connection, "ready")
        response = app.test_client().delete(f"/api/assets/{ASSET}", headers=auth)
        assert response.status_code == 502
        assert "SHOTSTACK_API_KEY" in errors(response)["detail"]
        assert standin.calls == []


def test_a_paused_deployment_answers_503_without_calling(
    client: FlaskClient,
    auth: dict[str, str],
    connection: Connection,
    standin: ServeStandIn,
    engine: Engine,
) -> None:
    store(connection, "ready")
    RateBudget(engine, 5).pause(30)  # a 429 seen by another process
    response = client.delete(f"/api/assets/{ASSET}", headers=auth)
    assert response.status_code == 503
    assert 25 <= int(response.headers["Retry-After"]) <= 30
    assert standin.calls == [] and row(connection).status == "ready"


def test_auth_error_shows_in_readyz(
    client: FlaskClient, auth: dict[str, str], connection: Connection, standin: ServeStandIn
) -> None:
    store(connection, "ready")
    standin.fail_next(1, 403)
    assert client.delete(f"/api/assets/{ASSET}", headers=auth).status_code == 502
    assert "SHOTSTACK_API_KEY" in client.get("/readyz").json["shotstackAuthError"]
    standin.add_asset(ASSET, RENDER)
    assert client.delete(f"/api/assets/{ASSET}", headers=auth).status_code == 204
    assert client.get("/readyz").json["shotstackAuthError"] is None


def test_a_late_callback_leaves_a_deleted_asset_deleted(
    client: FlaskClient, auth: dict[str, str], connection: Connection, standin: ServeStandIn
) -> None:
    store(connection, "ready")
    standin.add_asset(ASSET, RENDER)
    assert client.delete(f"/api/assets/{ASSET}", headers=auth).status_code == 204
    later = "2030-01-01T00:00:00.000Z"  # even a callback stamped after the delete
    for status in ("ready", "failed", "importing"):
        callback = serve_callback(ASSET, RENDER, status=status, completed=later)
        assert post_callback(client, callback).status_code == 200
    assert row(connection).status == "deleted"


# --- GET /api/assets/{id}?refresh=true --------------------------------------------------------


def test_refresh_rereads_the_asset(
    client: FlaskClient, auth: dict[str, str], connection: Connection, standin: ServeStandIn
) -> None:
    store(connection, "ready")
    standin.add_asset(ASSET, RENDER, status="deleted", updated="2026-02-01T00:00:00.000Z")
    response = client.get(f"/api/assets/{ASSET}?refresh=true", headers=auth)
    assert response.status_code == 200
    shown = response.json["data"]["attributes"]
    assert shown["status"] == "deleted" and shown["lastSyncedAt"] is not None
    assert shown["deletedBy"] is None  # deleted at Shotstack, not through this service
    # `deleted` from a lookup is final: a late callback cannot undo it.
    callback = serve_callback(ASSET, RENDER, status="ready", completed="2030-01-01T00:00:00Z")
    post_callback(client, callback)
    assert row(connection).status == "deleted"


def test_refresh_stores_an_asset_known_only_to_shotstack(
    client: FlaskClient, auth: dict[str, str], connection: Connection, standin: ServeStandIn
) -> None:
    standin.add_asset(ASSET, RENDER)
    response = client.get(f"/api/assets/{ASSET}?refresh=true", headers=auth)
    assert response.status_code == 200
    assert response.json["data"]["attributes"]["renderId"] == RENDER
    assert row(connection).status == "ready"


def test_refresh_with_a_shotstack_404_leaves_the_record(
    client: FlaskClient, auth: dict[str, str], connection: Connection, standin: ServeStandIn
) -> None:
    store(connection, "ready")
    before = row(connection)
    response = client.get(f"/api/assets/{ASSET}?refresh=true", headers=auth)
    assert response.status_code == 200
    assert row(connection) == before
    assert client.get("/api/assets/other?refresh=true", headers=auth).status_code == 404
    assert standin.count("GET") == 2


@pytest.mark.parametrize(("fault", "status", "code"), FAILURES)
def test_refresh_failing_at_shotstack(
    client: FlaskClient,
    auth: dict[str, str],
    connection: Connection,
    standin: ServeStandIn,
    fault: tuple[int, Any],
    status: int,
    code: str,
) -> None:
    store(connection, "ready")
    standin.add_asset(ASSET, RENDER, status="deleted")
    standin.fail_next(fault[0], fault[1])
    before = row(connection)
    response = client.get(f"/api/assets/{ASSET}?refresh=true", headers=auth)
    assert (response.status_code, errors(response)["code"]) == (status, code)
    if status == 503:
        assert response.headers["Retry-After"] == "60"  # no Retry-After: the default pause
    assert row(connection) == before


def test_plain_read_calls_no_one(
    client: FlaskClient, auth: dict[str, str], connection: Connection, standin: ServeStandIn
) -> None:
    store(connection, "ready")
    assert client.get(f"/api/assets/{ASSET}", headers=auth).status_code == 200
    assert client.get(f"/api/assets/{ASSET}?refresh=false", headers=auth).status_code == 200
    assert standin.calls == []


# --- GET /api/renders/{id}/assets: the fallback ------------------------------------------------


def test_fallback_is_not_asked_when_assets_are_known(
    client: FlaskClient, auth: dict[str, str], connection: Connection, standin: ServeStandIn
) -> None:
    store(connection, "ready")
    response = client.get(f"/api/renders/{RENDER}/assets", headers=auth)
    assert [a["id"] for a in response.json["data"]] == [ASSET]
    assert standin.calls == []


def test_fallback_stores_what_shotstack_has(
    client: FlaskClient, auth: dict[str, str], connection: Connection, standin: ServeStandIn
) -> None:
    standin.add_asset("a-main", RENDER)
    standin.add_asset("a-thumb", RENDER, filename=f"{RENDER}-thumb.jpg", status="importing")
    response = client.get(f"/api/renders/{RENDER}/assets", headers=auth)
    assert response.status_code == 200
    shown = {a["id"]: a["attributes"] for a in response.json["data"]}
    assert {k: (v["status"], v["kind"]) for k, v in shown.items()} == {
        "a-main": ("ready", "video"),
        "a-thumb": ("importing", "thumbnail"),
    }
    render = connection.execute(select(Render).where(Render.id == RENDER)).one()
    assert render.tracking == "pending" and render.last_lookup_at is not None
    client.get(f"/api/renders/{RENDER}/assets", headers=auth)
    assert standin.count() == 1  # now known here


def test_fallback_settles_a_render_whose_assets_are_all_ready(
    client: FlaskClient, auth: dict[str, str], connection: Connection, standin: ServeStandIn
) -> None:
    """A lookup by render id settles it (SPEC §5), made by the API as by the worker."""
    standin.add_asset("a-main", RENDER)
    standin.add_asset("a-poster", RENDER, filename=f"{RENDER}-poster.jpg", status="failed")
    response = client.get(f"/api/renders/{RENDER}/assets", headers=auth)
    assert sorted(a["id"] for a in response.json["data"]) == ["a-main", "a-poster"]
    render = client.get(f"/api/renders/{RENDER}", headers=auth).json["data"]["attributes"]
    assert (render["tracking"], render["nextCheckAt"]) == ("settled", None)
    assert render["settledAt"] is not None


@pytest.mark.parametrize("empty", ["list", "404"])
def test_fallback_asks_at_most_once_in_5_seconds(
    pg_url: str,
    connection: Connection,
    auth: dict[str, str],
    budget: Any,
    empty: str,
) -> None:
    with (
        ServeStandIn(api_key=KEY, empty_render=empty) as standin,  # type: ignore[arg-type]
        make_app(standin, pg_url, connection) as app,
    ):
        client = app.test_client()
        response = client.get(f"/api/renders/{RENDER}/assets", headers=auth)
        assert (response.status_code, response.json["data"]) == (200, [])
        # Within the 5 s, with nothing known, an empty list would claim what nobody asked.
        for _ in range(2):
            response = client.get(f"/api/renders/{RENDER}/assets", headers=auth)
            assert response.status_code == 503
            assert errors(response)["code"] == "render_lookup_rate_limited"
            assert 1 <= int(response.headers["Retry-After"]) <= 5
        assert standin.count() == 1
        tracked = client.get(f"/api/renders/{RENDER}", headers=auth).json["data"]
        assert tracked["attributes"]["tracking"] == "pending"
        # Five seconds on (moved, not waited for), the next request asks again.
        connection.execute(
            text("UPDATE renders SET last_lookup_at = last_lookup_at - interval '5 s'")
        )
        standin.add_asset(ASSET, RENDER)
        response = client.get(f"/api/renders/{RENDER}/assets", headers=auth)
        assert [a["id"] for a in response.json["data"]] == [ASSET]
        assert standin.count() == 2


@pytest.mark.parametrize(("fault", "status", "code"), FAILURES)
def test_fallback_failing_at_shotstack(
    client: FlaskClient,
    auth: dict[str, str],
    connection: Connection,
    standin: ServeStandIn,
    fault: tuple[int, Any],
    status: int,
    code: str,
) -> None:
    standin.add_asset(ASSET, RENDER)
    standin.fail_next(fault[0], fault[1], retry_after=None if fault[1] != 429 else "2")
    response = client.get(f"/api/renders/{RENDER}/assets", headers=auth)
    assert (response.status_code, errors(response)["code"]) == (status, code)
    if status == 503:
        assert response.headers["Retry-After"] == "2"
    assert row(connection) is None


# --- No transaction is open while Shotstack is called (committed database) ---------------------


def test_no_transaction_is_open_during_a_call(
    live_url: str, live_engine: Engine, auth: dict[str, str]
) -> None:
    """Look at pg_stat_activity from inside the stand-in, while each call is in flight."""
    open_during_calls: list[int] = []

    def look(_method: str, _path: str) -> None:
        with live_engine.connect() as conn:
            open_during_calls.append(
                conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
                    )
                ).scalar_one()
            )

    budget = RateBudget(live_engine, 1000.0)
    budget.reset()
    with ServeStandIn(api_key=KEY) as standin:
        standin.on_call = look
        app = create_app(shotstack_settings(standin.url, live_url))
        try:
            with live_engine.begin() as conn:
                for name, render in (("a-here", "r-here"), ("a-other", "r-other")):
                    conn.execute(
                        text(
                            "INSERT INTO renders (id, status, tracking, attempts, first_seen_at)"
                            " VALUES (:r, 'unknown', 'pending', 0, now())"
                        ),
                        {"r": render},
                    )
                    conn.execute(
                        text(
                            "INSERT INTO assets (id, render_id, status, status_source, kind,"
                            " first_seen_at) VALUES (:a, :r, 'ready', 1, 'video', now())"
                        ),
                        {"a": name, "r": render},
                    )
            standin.add_asset("a-here", "r-here")
            standin.add_asset("a-there", "r-there")
            standin.add_asset("a-new", "r-new")
            client = app.test_client()
            assert client.delete("/api/assets/a-here", headers=auth).status_code == 204
            assert client.delete("/api/assets/a-there", headers=auth).status_code == 204
            assert client.get("/api/assets/a-other?refresh=true", headers=auth).status_code == 200
            assert client.get("/api/renders/r-new/assets", headers=auth).status_code == 200
        finally:
            app.extensions["db"].engine.dispose()
            budget.reset()
    assert open_during_calls == [0] * 5  # DELETE; GET, DELETE; GET; GET by render


def test_sqlite_quick_start_talks_to_shotstack(
    tmp_path: Path, standin: ServeStandIn, auth: dict[str, str]
) -> None:
    """The embedded default takes the same paths: budget, fallback, delete, refresh."""
    url = f"sqlite:///{tmp_path / 'quick.sqlite3'}"
    engine = make_engine(url)
    with engine.begin() as conn:
        upgrade(conn)
    engine.dispose()
    standin.add_asset(ASSET, RENDER)
    app = create_app(shotstack_settings(standin.url, url))
    try:
        client = app.test_client()
        listed = client.get(f"/api/renders/{RENDER}/assets", headers=auth)
        assert [a["id"] for a in listed.json["data"]] == [ASSET]
        assert client.get("/api/renders/other/assets", headers=auth).json["data"] == []
        again = client.get("/api/renders/other/assets", headers=auth)  # within the 5 s
        assert (again.status_code, errors(again)["code"]) == (503, "render_lookup_rate_limited")
        assert client.delete(f"/api/assets/{ASSET}", headers=auth).status_code == 204
        shown = client.get(f"/api/assets/{ASSET}?refresh=true", headers=auth).json["data"]
        assert (shown["attributes"]["status"], shown["attributes"]["deletedBy"]) == (
            "deleted",
            "ci",
        )
        standin.fail_next(1, 429, retry_after=9)
        response = client.get("/api/renders/third/assets", headers=auth)
        assert (response.status_code, response.headers["Retry-After"]) == (503, "9")
        assert client.delete("/api/assets/unknown", headers=auth).status_code == 503
        # By render twice, the delete, the refresh, then the 429; the paused delete calls no one.
        assert [m for _, m, _ in standin.calls] == ["GET", "GET", "DELETE", "GET", "GET"]
    finally:
        app.extensions["shotstack"].close()
        app.extensions["db"].engine.dispose()


def test_concurrent_requests_ask_shotstack_once(
    live_url: str, live_engine: Engine, auth: dict[str, str]
) -> None:
    """Eight requests at once for a render unknown here: one lookup, no empty answer."""
    budget = RateBudget(live_engine, 1000.0)
    budget.reset()
    with ServeStandIn(api_key=KEY, latency=0.2) as standin:
        standin.add_asset(ASSET, RENDER)
        app = create_app(shotstack_settings(standin.url, live_url))
        start = threading.Barrier(8)

        def ask(_: int) -> tuple[int, list[str]]:
            start.wait()
            response = app.test_client().get(f"/api/renders/{RENDER}/assets", headers=auth)
            ids = [a["id"] for a in response.json["data"]] if response.status_code == 200 else []
            return response.status_code, ids

        try:
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(ask, range(8)))
        finally:
            app.extensions["db"].engine.dispose()
            budget.reset()
    # The one that asked answers with the asset; the others say when to come back (while
    # the lookup is on its way) or, if they came after it, answer with the asset too.
    assert (200, [ASSET]) in answers
    assert all(answer in [(200, [ASSET]), (503, [])] for answer in answers), answers
    assert standin.count() == 1
