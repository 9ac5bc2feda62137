"""`/openapi.json` is valid, covers every route, matches the live app; `/docs` renders it."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, Phase, given, settings
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import Engine
from werkzeug.serving import BaseWSGIServer, make_server

from service import create_app
from service.openapi import build_document

from .conftest import API_TOKEN, WEBHOOK_TOKEN, app_settings
from .helpers import serve_callback
from .standin import ServeStandIn

CHROMIUM = "/usr/bin/chromium"
# The routes of SPEC §3-4 and the probes: each must be in the document with these methods.
DOCUMENTED = {
    "/webhooks/shotstack": {"post"},
    "/api/assets": {"get"},
    "/api/assets/{id}": {"get", "delete"},
    "/api/renders": {"post"},
    "/api/renders/{id}": {"get"},
    "/api/renders/{id}/assets": {"get"},
    "/healthz": {"get"},
    "/readyz": {"get"},
}
UNDOCUMENTED_ROUTES = {"/metrics", "/openapi.json", "/docs/", "/docs/<path:path>", "/static/"}


def test_document_is_valid_openapi_3_1() -> None:
    document = build_document()
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_document_covers_every_route_of_the_app(app: Flask) -> None:
    document = build_document()
    documented = {path: set(item) for path, item in document["paths"].items()}
    assert documented == DOCUMENTED
    for rule in app.url_map.iter_rules():
        if rule.rule in UNDOCUMENTED_ROUTES or rule.rule.startswith("/static"):
            continue
        path = rule.rule.replace("<asset_id>", "{id}").replace("<render_id>", "{id}")
        methods = {m.lower() for m in rule.methods or ()} - {"head", "options"}
        assert path in documented, f"{rule.rule} is not in /openapi.json"
        assert methods <= documented[path], f"{rule.rule}: {methods - documented[path]}"


def test_query_parameters_come_from_the_query_model() -> None:
    document = build_document()
    params = {p["name"]: p for p in document["paths"]["/api/assets"]["get"]["parameters"]}
    assert set(params) >= {
        "filter[status]",
        "filter[kind]",
        "filter[renderId]",
        "filter[seenAfter]",
        "filter[seenBefore]",
        "page[size]",
        "page[after]",
    }
    assert params["page[size]"]["schema"]["maximum"] == 500
    assert params["filter[status]"]["schema"]["items"]["enum"] == [
        "importing",
        "ready",
        "failed",
        "deleted",
    ]
    assert params["filter[status]"]["explode"] is False


def test_errors_are_json_api_documents() -> None:
    document = build_document()
    for path, item in document["paths"].items():
        for method, op in item.items():
            for status, answer in op["responses"].items():
                if int(status) >= 400 and path.startswith(("/api", "/webhooks")):
                    content = answer["content"]
                    assert list(content) == ["application/vnd.api+json"], (path, method)
                    assert content["application/vnd.api+json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorDocument"
                    }


def test_openapi_json_is_served(client: Any) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json() == build_document()


# --- The live app, driven by schemathesis ------------------------------------------------


@pytest.fixture
def standin() -> Iterator[ServeStandIn]:
    with ServeStandIn() as standin:
        yield standin


@pytest.fixture
def live_server(
    live_url: str, live_engine: Engine, standin: ServeStandIn
) -> Iterator[tuple[str, Flask]]:
    """The app on a real HTTP server on 127.0.0.1, calling the Serve stand-in."""
    app = create_app(
        app_settings(
            live_url,
            shotstack_api_url=standin.url,
            shotstack_api_key=standin.api_key,
            shotstack_rate_limit=1000,
        )
    )
    server: BaseWSGIServer = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", app
    finally:
        server.shutdown()
        thread.join(timeout=5)
        server.server_close()
        app.extensions["db"].engine.dispose()


def not_a_crash(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 5xx is a server error, except a 503 that says when to come back (Retry-After): the
    document declares those, for Shotstack's rate limit and a render's 5 s lookup turn."""
    if response.status_code == 503 and "retry-after" in {k.lower() for k in response.headers}:
        return None
    return not_a_server_error(ctx, response, case)


CHECKS = [
    not_a_crash,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_live_app_answers_only_what_the_document_declares(
    live_server: tuple[str, Flask], standin: ServeStandIn
) -> None:
    base_url, _app = live_server
    # Some known data, so that reads and deletes also take their success paths.
    for n in range(3):
        standin.add_asset(f"asset-{n}", "render-1", filename=f"render-1-{n}.mp4")
        requests.post(
            f"{base_url}/webhooks/shotstack",
            params={"token": WEBHOOK_TOKEN},
            json=serve_callback(f"asset-{n}", "render-1", filename=f"render-1-{n}.mp4"),
            timeout=10,
        ).raise_for_status()
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    headers = {"Authorization": f"Bearer {API_TOKEN}", "X-Webhook-Token": WEBHOOK_TOKEN}
    session = requests.Session()
    seen: dict[str, set[int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "POST /webhooks/shotstack",
        "GET /api/assets",
        "GET /api/assets/{id}",
        "DELETE /api/assets/{id}",
        "POST /api/renders",
        "GET /api/renders/{id}",
        "GET /api/renders/{id}/assets",
    }
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            explore(operation, mode, base_url, session, headers, seen)
    # The run went past the front door: authenticated requests got real answers.
    assert 200 in seen["GET /api/assets"]
    assert 200 in seen["POST /webhooks/shotstack"]


def explore(
    operation: Any,
    mode: GenerationMode,
    base_url: str,
    session: requests.Session,
    headers: dict[str, str],
    seen: dict[str, set[int]],
) -> None:
    """Send generated requests to one operation; fail on any answer the document denies.

    Positive cases fit the document; negative ones break it (a wrong type, a missing field),
    and must be refused with a declared 4xx, never a 500.
    """

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=20,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, session=session, headers=headers)
        seen.setdefault(operation.label, set()).add(response.status_code)
        case.validate_response(response, checks=CHECKS, headers=headers)

    run()


# --- /docs in a real browser -------------------------------------------------------------


def test_docs_page_renders_the_routes_in_chromium(live_server: tuple[str, Flask]) -> None:
    base_url, _app = live_server
    assert shutil.which(CHROMIUM), "make test installs chromium (apt-get install chromium)"
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                # Virtual time runs the page's scripts and its fetch of /openapi.json to the
                # end before the DOM is dumped, however slow the machine.
                "--virtual-time-budget=20000",
                "--dump-dom",
                f"{base_url}/docs/",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    dom = result.stdout
    assert "swagger-ui" in dom, result.stderr[-2000:]
    # Swagger UI tags each operation it rendered with its path.
    for path in DOCUMENTED:
        assert f'data-path="{path}"' in dom, path
    assert "Shotstack Asset Tracker" in dom


# --- What schemathesis found: text Postgres cannot store must not crash a request ---------


@pytest.mark.parametrize(
    ("method", "url", "body", "status"),
    [
        ("get", "/api/assets/a%00b", None, 404),
        ("delete", "/api/assets/a%00b", None, 404),
        ("get", "/api/renders/a%00b", None, 404),
        ("get", "/api/renders/a%00b/assets", None, 404),
        ("get", "/api/assets?filter[renderId]=a%00b", None, 400),
        ("post", "/api/renders", {"data": {"type": "renders", "id": "a\x00b"}}, 400),
        ("post", f"/webhooks/shotstack?token={WEBHOOK_TOKEN}", {"type": "x", "a": "\x00"}, 400),
        ("post", f"/webhooks/shotstack?token={WEBHOOK_TOKEN}", {"type": "x", "\ud800": 1}, 400),
    ],
)
def test_text_postgres_cannot_store_is_refused(
    client: Any, auth: dict[str, str], method: str, url: str, body: Any, status: int
) -> None:
    kwargs: dict[str, Any] = {"headers": auth}
    if body is not None:
        kwargs["data"] = json.dumps(body)  # escapes the NUL and the lone surrogate, as JSON
        kwargs["content_type"] = "application/json"
    response = getattr(client, method)(url, **kwargs)
    assert response.status_code == status
    assert response.mimetype == "application/vnd.api+json"
