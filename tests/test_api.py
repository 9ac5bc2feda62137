"""The read API, POST /api/renders and the JSON:API error shape, against real Postgres (SPEC §4)."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import flask
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Connection, Engine, select, text
from werkzeug.test import TestResponse

from service import api as api_module
from service import assets as domain
from service import create_app
from service.models import Asset, Render

from .conftest import API_TOKEN, app_settings
from .helpers import post_callback, serve_callback
from .tcp_proxy import TcpProxy

MEDIA_TYPE = "application/vnd.api+json"
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
ASSET_ATTRIBUTES = {
    "renderId",
    "owner",
    "region",
    "filename",
    "url",
    "status",
    "kind",
    "created",
    "updated",
    "firstSeenAt",
    "lastSyncedAt",
    "deletedAt",
    "deletedBy",
}


def _seed(connection: Connection, count: int, *, start: datetime = T0) -> None:
    """Insert `count` assets of three renders, one second apart, in one statement."""
    connection.execute(
        text(
            "INSERT INTO renders (id, status, tracking, attempts, first_seen_at)"
            " SELECT 'r-' || g, 'done', 'settled', 1, :start FROM generate_series(0, 2) AS g"
            " ON CONFLICT DO NOTHING"
        ),
        {"start": start},
    )
    connection.execute(
        text(
            "INSERT INTO assets (id, render_id, status, status_source, kind, filename, url,"
            " first_seen_at)"
            " SELECT 'a-' || lpad(g::text, 5, '0'), 'r-' || (g % 3),"
            "  (ARRAY['importing', 'ready', 'failed', 'deleted'])[1 + g % 4], 0,"
            "  (ARRAY['video', 'poster', 'thumbnail', 'audio', 'image'])[1 + g % 5],"
            "  'f-' || g, 'https://cdn.shotstack.io/au/stage/o/f-' || g,"
            "  :start + g * interval '1 second'"
            " FROM generate_series(0, :n - 1) AS g"
        ),
        {"start": start, "n": count},
    )


def _get(client: FlaskClient, url: str, auth: dict[str, str]) -> TestResponse:
    return client.get(url, headers=auth)


def _assert_error(
    response: TestResponse, status: int, *, parameter: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == MEDIA_TYPE
    body = response.json
    assert set(body) == {"errors"}
    (error,) = body["errors"]
    assert error["status"] == str(status)
    assert error["code"] and error["title"] and error["detail"]
    assert "Traceback" not in response.get_data(as_text=True)
    if parameter is not None:
        assert error["source"] == {"parameter": parameter}
        assert parameter in error["detail"]
    return dict(error)


def _ids(response: TestResponse) -> list[str]:
    return [item["id"] for item in response.json["data"]]


# --- Authentication --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {API_TOKEN}x"},
        {"Authorization": f"Basic {API_TOKEN}"},
        {"Authorization": API_TOKEN},
        {"X-Api-Key": API_TOKEN},
    ],
    ids=["none", "empty", "no-token", "blank", "wrong", "longer", "basic", "bare", "other-header"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/api/assets"), ("GET", "/api/assets/a-1"), ("POST", "/api/renders")],
)
def test_no_valid_bearer_key_is_401_with_www_authenticate(
    client: FlaskClient, headers: dict[str, str], method: str, path: str
) -> None:
    response = client.open(path, method=method, headers=headers, json={})
    error = _assert_error(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.headers["WWW-Authenticate"] == "Bearer"  # as SPEC §4 writes it
    assert "Bearer" in error["detail"]
    assert API_TOKEN not in response.get_data(as_text=True)


@pytest.mark.parametrize("token", [API_TOKEN, "other-token-123"])
def test_every_configured_key_is_let_in(client: FlaskClient, token: str) -> None:
    response = client.get("/api/assets", headers={"Authorization": f"bearer {token}"})
    assert response.status_code == 200


# --- GET /api/assets -------------------------------------------------------------------------


def test_an_asset_resource_has_the_shape_of_the_spec(
    client: FlaskClient, connection: Connection, auth: dict[str, str]
) -> None:
    assert post_callback(client, serve_callback("a-1", "r-1")).status_code == 200
    response = _get(client, "/api/assets", auth)
    assert response.status_code == 200
    assert response.mimetype == MEDIA_TYPE
    (item,) = response.json["data"]
    assert (item["type"], item["id"]) == ("assets", "a-1")
    assert set(item["attributes"]) == ASSET_ATTRIBUTES
    assert item["links"] == {"self": "/api/assets/a-1"}
    attrs = item["attributes"]
    assert (attrs["renderId"], attrs["status"], attrs["kind"], attrs["filename"]) == (
        "r-1",
        "ready",
        "video",
        "r-1.mp4",
    )
    assert attrs["created"] == "2021-07-12T11:04:44.574000Z"
    assert attrs["deletedAt"] is None and attrs["deletedBy"] is None
    assert response.json["links"] == {"self": "/api/assets", "next": None}
    one = _get(client, "/api/assets/a-1", auth)
    assert one.status_code == 200
    assert one.json["data"] == item


def test_an_unknown_asset_is_404(client: FlaskClient, auth: dict[str, str]) -> None:
    error = _assert_error(_get(client, "/api/assets/nope", auth), 404)
    assert "nope" in error["detail"]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


NAIVE_CURSOR = b'["2024-01-01T00:00:00", "a-1"]'
NUMBER_ID_CURSOR = b'["2024-01-01T00:00:00Z", 7]'


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("filter[colour]=red", "filter[colour]"),
        ("sort=-firstSeenAt", "sort"),
        ("filter[status]=gone", "filter[status]"),
        ("filter[status]=ready,bogus", "filter[status]"),
        ("filter[status]=", "filter[status]"),
        ("filter[kind]=movie", "filter[kind]"),
        ("filter[seenAfter]=yesterday", "filter[seenAfter]"),
        ("filter[seenBefore]=2024-13-01", "filter[seenBefore]"),
        ("filter[seenAfter]=0001-01-01T00:00:00%2B01:00", "filter[seenAfter]"),  # was a 500
        ("filter[seenBefore]=9999-12-31T23:59:59-01:00", "filter[seenBefore]"),
        ("filter[renderId]=", "filter[renderId]"),
        ("page[size]=0", "page[size]"),
        ("page[size]=501", "page[size]"),
        ("page[size]=-1", "page[size]"),
        ("page[size]=ten", "page[size]"),
        ("page[after]=", "page[after]"),
        ("page[after]=%21%21not-base64", "page[after]"),
        (f"page[after]={_b64(b'not json')}", "page[after]"),
        (f"page[after]={_b64(b'[1, 2, 3]')}", "page[after]"),
        (f"page[after]={_b64(NAIVE_CURSOR)}", "page[after]"),
        (f"page[after]={_b64(NUMBER_ID_CURSOR)}", "page[after]"),
        ("filter[status]=ready&filter[status]=failed", "filter[status]"),
    ],
    ids=[
        "unknown-filter",
        "unknown-parameter",
        "bad-status",
        "one-bad-status",
        "empty-status",
        "bad-kind",
        "bad-date",
        "impossible-date",
        "before-year-1-in-utc",
        "after-year-9999-in-utc",
        "empty-render",
        "size-0",
        "size-501",
        "size-negative",
        "size-text",
        "empty-cursor",
        "not-base64",
        "not-json",
        "wrong-shape",
        "naive-date",
        "id-not-text",
        "repeated",
    ],
)
def test_a_bad_query_is_400_naming_the_parameter(
    client: FlaskClient, auth: dict[str, str], query: str, parameter: str
) -> None:
    _assert_error(_get(client, f"/api/assets?{query}", auth), 400, parameter=parameter)


def test_every_bad_parameter_is_named_in_one_document(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    response = client.get(
        "/api/assets?filter[status]=gone&page[size]=0&filter[colour]=red", headers=auth
    )
    assert response.status_code == 400
    named = {e["source"]["parameter"] for e in response.json["errors"]}
    assert named == {"filter[status]", "page[size]", "filter[colour]"}
    assert {e["status"] for e in response.json["errors"]} == {"400"}


@pytest.mark.parametrize("query", ["refresh=maybe", "expand=all"])
def test_a_bad_query_of_one_asset_is_400(
    client: FlaskClient, auth: dict[str, str], query: str
) -> None:
    parameter = query.split("=")[0]
    _assert_error(_get(client, f"/api/assets/a-1?{query}", auth), 400, parameter=parameter)


def test_page_size_defaults_to_50_and_goes_to_500(
    client: FlaskClient, connection: Connection, auth: dict[str, str]
) -> None:
    _seed(connection, 520)
    assert len(_get(client, "/api/assets", auth).json["data"]) == 50
    assert len(_get(client, "/api/assets?page[size]=500", auth).json["data"]) == 500


def test_filters_over_http(
    client: FlaskClient, connection: Connection, auth: dict[str, str]
) -> None:
    _seed(connection, 60)
    every = _ids(_get(client, "/api/assets?page[size]=500", auth))
    assert every == [f"a-{i:05d}" for i in reversed(range(60))]

    def number(asset_id: str) -> int:
        return int(asset_id[2:])

    def listed(query: str) -> list[str]:
        response = _get(client, f"/api/assets?page[size]=500&{query}", auth)
        assert response.status_code == 200, response.json
        return _ids(response)

    assert listed("filter[status]=failed") == [a for a in every if number(a) % 4 == 2]
    assert listed("filter[status]=ready,deleted") == [a for a in every if number(a) % 4 in (1, 3)]
    assert listed("filter[kind]=poster") == [a for a in every if number(a) % 5 == 1]
    assert listed("filter[renderId]=r-2") == [a for a in every if number(a) % 3 == 2]
    assert listed("filter[renderId]=r-9") == []
    after = (T0 + timedelta(seconds=49)).isoformat()
    before = (T0 + timedelta(seconds=3)).isoformat().replace("+00:00", "Z")
    assert listed(f"filter[seenAfter]={after.replace('+', '%2B')}") == every[:10]
    assert listed(f"filter[seenBefore]={before}") == every[-3:]
    assert listed("filter[seenAfter]=2024-03-01T13:00:00%2B01:00&filter[kind]=video") == [
        a for a in every if number(a) % 5 == 0 and number(a) > 0
    ]
    # A `+` left unescaped in the URL arrives as a space: still the same offset.
    assert listed(f"filter[seenAfter]={after}") == every[:10]
    assert listed("filter[seenBefore]=2024-03-01T13:00:03.5+01:00") == every[-4:]


def test_links_next_walks_every_page_keeping_the_filters(
    client: FlaskClient, connection: Connection, auth: dict[str, str]
) -> None:
    _seed(connection, 95)
    url: str | None = "/api/assets?filter[status]=ready,failed&page[size]=10"
    seen: list[str] = []
    pages = 0
    while url is not None:
        response = _get(client, url, auth)
        assert response.status_code == 200
        seen += _ids(response)
        url = response.json["links"]["next"]
        pages += 1
        if url is not None:
            assert "filter%5Bstatus%5D=ready%2Cfailed" in url or "filter[status]" in url
    want = [f"a-{i:05d}" for i in reversed(range(95)) if i % 4 in (1, 2)]
    assert seen == want
    assert pages == -(-len(want) // 10)


# --- Renders ---------------------------------------------------------------------------------


def _new_render(client: FlaskClient, auth: dict[str, str], render_id: str, **kw: Any) -> Any:
    return client.post(
        "/api/renders",
        json={"data": {"type": "renders", "id": render_id}},
        headers=auth,
        **kw,
    )


def test_post_renders_is_201_then_200(
    client: FlaskClient, connection: Connection, auth: dict[str, str]
) -> None:
    first = _new_render(client, auth, "r-new")
    assert first.status_code == 201
    assert first.mimetype == MEDIA_TYPE
    assert first.headers["Location"] == "/api/renders/r-new"
    data = first.json["data"]
    assert (data["type"], data["id"]) == ("renders", "r-new")
    assert data["attributes"]["status"] == "unknown"
    assert data["attributes"]["tracking"] == "pending"
    assert data["relationships"] == {"assets": {"data": []}}
    again = _new_render(client, auth, "r-new")
    assert again.status_code == 200
    assert "Location" not in again.headers
    assert again.json["data"]["attributes"] == data["attributes"]
    assert connection.execute(select(Render.id)).scalars().all() == ["r-new"]


def test_post_renders_of_a_render_known_from_a_callback_is_200(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    assert post_callback(client, serve_callback("a-1", "r-1")).status_code == 200
    response = _new_render(client, auth, "r-1")
    assert response.status_code == 200
    assert response.json["data"]["relationships"]["assets"]["data"] == [
        {"type": "assets", "id": "a-1"}
    ]
    got = _get(client, "/api/renders/r-1", auth)
    assert got.status_code == 200
    assert got.json == response.json


def test_an_unknown_render_is_404(client: FlaskClient, auth: dict[str, str]) -> None:
    _assert_error(_get(client, "/api/renders/nope", auth), 404)


def test_a_query_on_a_render_is_400(client: FlaskClient, auth: dict[str, str]) -> None:
    _assert_error(_get(client, "/api/renders/r-1?x=1", auth), 400, parameter="x")


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        (b"not json", None),
        (b"[]", None),
        (b"{}", "/data"),
        (b'{"data": null}', "/data"),
        (b'{"data": {"type": "assets", "id": "r-1"}}', "/data/type"),
        (b'{"data": {"type": "renders"}}', "/data/id"),
        (b'{"data": {"type": "renders", "id": ""}}', "/data/id"),
        (b'{"data": {"type": "renders", "id": 5}}', "/data/id"),
        (b'{"data": {"type": "renders", "id": "r-1\\nSet-Cookie: x=1"}}', "/data/id"),
        (b'{"data": {"type": "renders", "id": "r-1\\u0000"}}', "/data/id"),
        (b'{"data": {"type": "renders", "id": "a/b"}}', "/data/id"),  # unreadable at its URL
    ],
    ids=[
        "not-json",
        "array",
        "no-data",
        "null-data",
        "wrong-type",
        "no-id",
        "empty-id",
        "int-id",
        "newline-id",
        "nul-id",
        "slash-id",
    ],
)
def test_a_bad_render_document_is_400_with_a_pointer(
    client: FlaskClient,
    connection: Connection,
    auth: dict[str, str],
    body: bytes,
    pointer: str | None,
) -> None:
    response = client.post("/api/renders", data=body, content_type=MEDIA_TYPE, headers=auth)
    error = _assert_error(response, 400)
    assert "pointer" in error["source"]
    if pointer is not None:
        assert error["source"]["pointer"] == pointer
    assert connection.execute(select(Render.id)).scalars().all() == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_render_document_of_another_media_type_is_415(
    client: FlaskClient, auth: dict[str, str], content_type: str | None
) -> None:
    body = b'{"data": {"type": "renders", "id": "r-1"}}'
    response = client.post("/api/renders", data=body, content_type=content_type, headers=auth)
    _assert_error(response, 415)


@pytest.mark.parametrize(
    "content_type", [f"{MEDIA_TYPE}; charset=utf-8", f"{MEDIA_TYPE}; version=1"]
)
def test_a_json_api_media_type_with_other_parameters_is_415(
    client: FlaskClient, auth: dict[str, str], content_type: str
) -> None:
    """JSON:API 1.1: only `ext` and `profile` may modify its media type in Content-Type."""
    body = b'{"data": {"type": "renders", "id": "r-1"}}'
    response = client.post("/api/renders", data=body, content_type=content_type, headers=auth)
    _assert_error(response, 415)
    ok = client.post(
        "/api/renders",
        data=body,
        content_type=f'{MEDIA_TYPE}; profile="https://x/p"',
        headers=auth,
    )
    assert ok.status_code == 201


@pytest.mark.parametrize(
    ("accept", "status"),
    [
        (f"{MEDIA_TYPE}; charset=utf-8", 406),
        (f"{MEDIA_TYPE}; version=1, {MEDIA_TYPE}; charset=x", 406),
        (f"{MEDIA_TYPE}; version=1, {MEDIA_TYPE}", 200),
        (f'{MEDIA_TYPE}; ext="https://x/e"', 200),
        (f"{MEDIA_TYPE}; q=0.9", 200),
        (f"application/json, {MEDIA_TYPE}; charset=utf-8", 406),
        ("application/json", 200),
        ("*/*", 200),
    ],
)
def test_accept_follows_json_api_content_negotiation(
    client: FlaskClient, auth: dict[str, str], accept: str, status: int
) -> None:
    response = client.get("/api/assets", headers={**auth, "Accept": accept})
    assert response.status_code == status
    assert response.mimetype == MEDIA_TYPE
    if status == 406:
        _assert_error(response, 406)


def test_application_json_is_accepted_too(client: FlaskClient, auth: dict[str, str]) -> None:
    body = b'{"data": {"type": "renders", "id": "r-1"}}'
    response = client.post(
        "/api/renders", data=body, content_type="application/json; charset=utf-8", headers=auth
    )
    assert response.status_code == 201


# --- Routing and crashes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("GET", "/api/nope", 404),
        ("GET", "/webhooks/shotstack", 405),
        ("PUT", "/webhooks/shotstack", 405),
        ("POST", "/api/assets", 405),
        ("PATCH", "/api/assets/a-1", 405),
        ("DELETE", "/api/renders/r-1", 405),
    ],
)
def test_routing_errors_are_json_api(
    client: FlaskClient, auth: dict[str, str], method: str, path: str, status: int
) -> None:
    response = client.open(path, method=method, headers=auth)
    _assert_error(response, status)
    assert "<html" not in response.get_data(as_text=True).lower()
    if status == 405:
        assert method not in response.headers["Allow"]
        assert response.headers["Allow"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/nope", 401),
        ("GET", "/api", 401),
        ("POST", "/api/assets", 401),
        ("GET", "/nope", 404),  # outside /api: no key needed to hear it does not exist
        ("GET", "/apinope", 404),
    ],
)
def test_a_route_under_api_that_matches_nothing_still_needs_a_key(
    client: FlaskClient, method: str, path: str, status: int
) -> None:
    response = client.open(path, method=method)
    _assert_error(response, status)
    if status == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_a_crash_is_a_json_500_without_traceback_or_detail(
    client: FlaskClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError(f"secret-internals {API_TOKEN}")

    monkeypatch.setattr(domain, "list_assets", explode)
    response = _get(client, "/api/assets", auth)
    error = _assert_error(response, 500)
    text_body = response.get_data(as_text=True)
    assert "secret-internals" not in text_body
    assert API_TOKEN not in text_body
    assert "RuntimeError" not in text_body
    assert error["code"] == "internal_error"


def test_the_api_answers_503_when_the_database_is_down(
    live_url: str, live_engine: Engine, auth: dict[str, str]
) -> None:
    with TcpProxy() as proxy:
        base, _, name = live_url.rpartition("/")
        user = base.rsplit("@", 1)[0]
        app = create_app(app_settings(f"{user}@127.0.0.1:{proxy.port}/{name}"))
        try:
            client = app.test_client()
            assert _get(client, "/api/assets", auth).status_code == 200
            proxy.cut()
            for path in ("/api/assets", "/api/assets/a-1", "/api/renders/r-1"):
                response = _get(client, path, auth)
                _assert_error(response, 503)
                assert response.headers["Retry-After"].isdigit()
            response = _new_render(client, auth, "r-1")
            _assert_error(response, 503)
            proxy.restore()
            assert _get(client, "/api/assets", auth).status_code == 200
        finally:
            app.extensions["db"].engine.dispose()


# --- Paging while callbacks arrive (real commits) --------------------------------------------


@pytest.fixture
def live_client(live_app: Flask) -> FlaskClient:
    return live_app.test_client()


@pytest.fixture
def arriving(live_app: Flask) -> Iterator[dict[str, Any]]:
    """Post new callbacks (each a new asset, committed) from another thread until stopped."""
    state: dict[str, Any] = {"posted": 0, "statuses": set(), "stop": threading.Event()}
    first = threading.Event()

    def run() -> None:
        client = live_app.test_client()
        i = 0
        while not state["stop"].is_set() and i < 5000:  # bounded even if the test hangs
            response = post_callback(client, serve_callback(f"new-{i:04d}", f"rn-{i % 7}"))
            state["statuses"].add(response.status_code)
            state["posted"] += 1
            i += 1
            if i >= 5:
                first.set()

    thread = threading.Thread(target=run, daemon=True)
    state["thread"] = thread
    thread.start()
    assert first.wait(timeout=30)
    state["posted_before"] = state["posted"]
    yield state
    state["stop"].set()
    thread.join(timeout=30)


def test_paging_1000_assets_returns_each_once_in_order_while_callbacks_arrive(
    live_engine: Engine,
    live_client: FlaskClient,
    auth: dict[str, str],
    request: pytest.FixtureRequest,
) -> None:
    with live_engine.begin() as conn:
        _seed(conn, 1000, start=datetime(2020, 1, 1, tzinfo=UTC))
        # Ties on firstSeenAt: the id must break them the same way on every page.
        conn.execute(
            text(
                "UPDATE assets SET first_seen_at = first_seen_at"
                " - (substr(id, 3)::int % 2) * interval '1 second'"
            )
        )
    arriving = request.getfixturevalue("arriving")
    url: str | None = "/api/assets?page[size]=100"
    seen: list[dict[str, Any]] = []
    while url is not None:
        response = _get(live_client, url, auth)
        assert response.status_code == 200
        seen += response.json["data"]
        url = response.json["links"]["next"]
    during = arriving["posted"] - arriving["posted_before"]
    arriving["stop"].set()
    arriving["thread"].join(timeout=30)  # its last callback is committed before the count

    keys = [(item["attributes"]["firstSeenAt"], item["id"]) for item in seen]
    assert keys == sorted(keys, reverse=True)
    assert len(set(keys)) == len(keys)
    seeded = [item["id"] for item in seen if item["id"].startswith("a-")]
    assert sorted(seeded) == [f"a-{i:05d}" for i in range(1000)]
    assert during > 0  # callbacks really were committed while the pages were read
    assert arriving["statuses"] == {200}
    with live_engine.connect() as conn:
        total = conn.execute(select(Asset.id)).scalars().all()
    assert len(total) == 1000 + arriving["posted"]


def test_a_page_far_down_the_cursor_is_served(
    client: FlaskClient, connection: Connection, auth: dict[str, str]
) -> None:
    """A cursor is a position, not an offset: any page is one index step (plans: test_assets)."""
    _seed(connection, 300)
    first = _get(client, "/api/assets?page[size]=1", auth)
    cursor = api_module.encode_cursor(T0 + timedelta(seconds=7), "a-00007")
    deep = _get(client, f"/api/assets?page[size]=3&page[after]={cursor}", auth)
    assert _ids(first) == ["a-00299"]
    assert _ids(deep) == ["a-00006", "a-00005", "a-00004"]


def test_a_name_with_two_tokens_lets_both_in_under_that_name(pg_url: str) -> None:
    """API_KEYS `app:old,app:new` rotates app's key: both are let in, both recorded as `app`."""
    app = create_app(app_settings(pg_url, api_keys="app:old-token-1,app:new-token-2,x:t-3"))
    try:
        for token in ("old-token-1", "new-token-2"):
            with app.test_request_context(headers={"Authorization": f"Bearer {token}"}):
                api_module.authenticate()
                assert flask.g.api_key_name == "app"
    finally:
        app.extensions["db"].engine.dispose()
