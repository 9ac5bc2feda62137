"""Logs (JSON lines, request ids, redaction) and metrics (web, Shotstack, worker) in-process."""

from __future__ import annotations

import io
import json
import logging
import socket
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY
from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

from service import logs, metrics
from service.assets import AssetFacts, create_render, record_asset
from service.config import load_settings
from service.db import utcnow
from service.models import Source
from service.reconciler import claim_due
from service.shotstack import RateBudget, ServeClient, ShotstackAuthError

from .conftest import API_TOKEN, WEBHOOK_TOKEN, app_settings
from .helpers import post_callback, serve_callback
from .standin import ServeStandIn


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Root log lines as the service writes them (JSON, request id, redacted), in memory."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logs._prepare(handler, "json")
    root = logging.getLogger()
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


# --- Request ids --------------------------------------------------------------------------


def test_request_id_comes_from_the_header_and_goes_back(client: FlaskClient) -> None:
    response = client.get("/healthz", headers={"X-Request-ID": "abc-123.x"})
    assert response.headers["X-Request-ID"] == "abc-123.x"


@pytest.mark.parametrize("given", [None, "", "has space", "<b>;x", "x" * 200])
def test_a_missing_or_unfit_request_id_is_replaced(client: FlaskClient, given: str | None) -> None:
    headers = {} if given is None else {"X-Request-ID": given}
    response = client.get("/api/assets", headers=headers)  # a 401 gets one too
    rid = response.headers["X-Request-ID"]
    assert rid != given and len(rid) == 32 and int(rid, 16) >= 0


def test_every_log_line_of_a_request_carries_its_id(
    client: FlaskClient, captured: io.StringIO
) -> None:
    for _ in range(2):  # a processed callback is logged at DEBUG; its redelivery at INFO
        response = client.post(
            f"/webhooks/shotstack?token={WEBHOOK_TOKEN}",
            json=serve_callback(),
            headers={"X-Request-ID": "req-42"},
        )
        assert response.status_code == 200
    found = [line for line in lines(captured) if line["logger"] == "service.webhooks"]
    assert found and {line["request_id"] for line in found} == {"req-42"}
    assert [(line["outcome"], line["level"]) for line in found] == [("duplicate", "INFO")]


def test_the_worker_binds_its_own_request_id(captured: io.StringIO) -> None:
    with logs.request_id("pass-7") as rid:
        logging.getLogger("service.reconciler").warning("looked up")
    logging.getLogger("service.reconciler").warning("outside")
    first, second = lines(captured)[-2:]
    assert rid == "pass-7" and first["request_id"] == "pass-7"
    assert second["request_id"] is None
    # One render's lookup, in a pool thread: a fresh id, named after the render.
    logs.with_request_id("r-77", logging.getLogger("service.reconciler").warning, "found %s", 1)
    last = lines(captured)[-1]
    assert last["message"] == "found 1" and last["request_id"].startswith("r-77:")


# --- Redaction ------------------------------------------------------------------------------


SECRETS = {
    "shotstack_api_key": "ss-key-SECRET-111",
    "webhook_token": "hook-SECRET-222,hook-SECRET-333",
    "api_keys": "ops:bearer-SECRET-444",
}


def test_every_configured_secret_is_redacted_from_every_part_of_a_record(
    captured: io.StringIO,
) -> None:
    settings = load_settings(_env_file=None, **SECRETS)
    logs.redact.set_secrets(settings.secrets())
    log = logging.getLogger("service.test")
    log.warning("key %s in args", "ss-key-SECRET-111")
    log.warning("token hook-SECRET-333 in the message", extra={"url": "?x=hook-SECRET-222"})
    try:
        raise RuntimeError("Authorization: Bearer bearer-SECRET-444 refused")
    except RuntimeError:
        log.exception("failed with ss-key-SECRET-111")
    # Shapes of secrets that are not (or no longer) configured.
    log.warning("GET /webhooks/shotstack?token=old-token-555&x=1")
    log.warning("sent x-api-key: other-key-666 and Bearer stale-777")
    # In any case, and on lines that are not ASCII.
    log.warning("GET /x?TOKEN=upper-888 with BEARER caps-999")
    log.warning("Ünïcode ?Token=accented-101 and X-Api-Key=mixed-102")
    out = captured.getvalue()
    shaped = ("old-token-555", "other-key-666", "stale-777", "upper-888", "caps-999")
    for secret in (*settings.secrets(), *shaped, "accented-101", "mixed-102"):
        assert secret not in out
    assert out.count(logs.REDACTED) >= 11
    assert "RuntimeError" in out  # the traceback is kept, without the secret


def test_text_format_and_level_are_honoured(app: Flask) -> None:
    root = logging.getLogger()
    try:
        logs.configure(load_settings(_env_file=None, log_format="text", log_level="WARNING"))
        (handler,) = [h for h in root.handlers if getattr(h, "_asset_tracker", False)]
        assert isinstance(handler.formatter, logs.TextFormatter)
        assert root.level == logging.WARNING
        record = logging.LogRecord("x", logging.WARNING, __file__, 1, "hello", None, None)
        for f in handler.filters:
            f.filter(record)
        assert handler.format(record).endswith("WARNING x [None] hello")
    finally:
        logs.configure(app.config["SETTINGS"])


# --- Web metrics --------------------------------------------------------------------------


def test_callbacks_are_counted_by_type_and_outcome(client: FlaskClient) -> None:
    before = {
        key: sample("asset_tracker_callbacks_total", type=key[0], outcome=key[1])
        for key in [
            ("serve", "processed"),
            ("serve", "duplicate"),
            ("other", "rejected"),
            ("other", "http_401"),
            ("other", "ignored"),
        ]
    }
    post_callback(client, serve_callback("m-1"))
    post_callback(client, serve_callback("m-1"))
    client.post(f"/webhooks/shotstack?token={WEBHOOK_TOKEN}", data=b"nope")
    post_callback(client, serve_callback("m-2"), token="wrong")
    post_callback(client, {"type": "x" * 40, "action": "y"})  # no new series per forged type
    after = {
        key: sample("asset_tracker_callbacks_total", type=key[0], outcome=key[1]) for key in before
    }
    assert {key: after[key] - before[key] for key in before} == dict.fromkeys(before, 1.0)


def test_api_requests_are_labelled_by_their_route_not_their_path(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    route = "/api/assets/<asset_id>"
    before = sample("asset_tracker_http_requests_total", route=route, method="GET", status="404")
    count = sample("asset_tracker_http_request_duration_seconds_count", route=route, method="GET")
    for asset_id in ("one", "two", "three"):
        assert client.get(f"/api/assets/{asset_id}", headers=auth).status_code == 404
    client.get("/no/such/page")
    after = sample("asset_tracker_http_requests_total", route=route, method="GET", status="404")
    assert after - before == 3
    assert (
        sample("asset_tracker_http_request_duration_seconds_count", route=route, method="GET")
        - count
        == 3
    )
    assert sample(
        "asset_tracker_http_requests_total", route="unmatched", method="other", status="404"
    )
    body = client.get("/metrics").get_data(as_text=True)
    assert "/api/assets/one" not in body and 'route="/api/assets/<asset_id>"' in body


def _seed(engine: Engine, statuses: dict[str, int]) -> None:
    now = utcnow()
    with Session(engine) as session, session.begin():
        n = 0
        for status, count in statuses.items():
            for _ in range(count):
                facts = AssetFacts(id=f"g-{n}", render_id=f"gr-{n % 3}", status=status)
                record_asset(session, facts, source=Source.LOOKUP, now=now, grace=0)
                n += 1


def _gauges(client: FlaskClient) -> dict[str, float]:
    found = {}
    for line in client.get("/metrics").get_data(as_text=True).splitlines():
        if line.startswith(("asset_tracker_assets{", "asset_tracker_renders{")):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def test_table_gauges_are_cached_between_scrapes(live_app: Flask, live_engine: Engine) -> None:
    client = live_app.test_client()
    states = live_app.extensions["metrics_states"]
    _seed(live_engine, {"ready": 4, "failed": 1})
    first = _gauges(client)
    assert first['asset_tracker_assets{status="ready"}'] == 4
    assert first['asset_tracker_renders{tracking="pending"}'] == 3
    _seed_more = {"importing": 2}
    with Session(live_engine) as session, session.begin():
        for n in range(_seed_more["importing"]):
            facts = AssetFacts(id=f"h-{n}", render_id="gr-0", status="importing")
            record_asset(session, facts, source=Source.LOOKUP, now=utcnow(), grace=0)
    assert _gauges(client) == first and states.refreshes == 1  # within CACHE_SECONDS
    states.ttl = 0  # as when the period has run out
    assert _gauges(client)['asset_tracker_assets{status="importing"}'] == 2
    assert states.refreshes == 2


def test_big_tables_are_estimated_from_planner_statistics(
    live_app: Flask, live_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(live_engine, {"ready": 30, "deleted": 10})
    with live_engine.connect() as conn:
        conn.execute(text("ANALYZE assets"))
        conn.execute(text("ANALYZE renders"))
        conn.commit()
    monkeypatch.setattr(metrics, "EXACT_COUNT_LIMIT", 0)
    states = metrics.TableStates(live_engine)
    values = states.values()
    assert values["assets"] == {"ready": 30, "deleted": 10}


# --- Shotstack and worker metrics ---------------------------------------------------------


@pytest.fixture
def serve(live_engine: Engine) -> Iterator[tuple[ServeClient, ServeStandIn]]:
    with ServeStandIn() as standin:
        settings = load_settings(
            **app_settings(
                "postgresql://unused/x",
                shotstack_api_url=standin.url,
                shotstack_api_key=standin.api_key,
                shotstack_rate_limit=200,
            )
        )
        budget = RateBudget(live_engine, settings.shotstack_rate_limit)
        budget.reset()
        client = ServeClient(settings, budget, max_retries=0)
        yield client, standin
        client.close()


def test_shotstack_calls_are_counted_by_endpoint_and_outcome(
    serve: tuple[ServeClient, ServeStandIn],
) -> None:
    client, standin = serve
    standin.add_asset("s-1", "sr-1")
    name = "asset_tracker_shotstack_calls_total"
    before = {
        (e, o): sample(name, endpoint=e, outcome=o)
        for e, o in [
            ("get_asset", "200"),
            ("get_asset", "404"),
            ("assets_by_render", "200"),
            ("delete_asset", "server_error"),
            ("get_asset", "auth_error"),
        ]
    }
    auth_before = sample("asset_tracker_shotstack_auth_failures_total")
    waits_before = sample("asset_tracker_rate_budget_wait_seconds_count")
    latency_before = sample(
        "asset_tracker_shotstack_call_duration_seconds_count", endpoint="get_asset"
    )
    client.get_asset("s-1")
    client.get_asset("nope")
    client.assets_by_render("sr-1")
    standin.fail_next(1, 503)
    with pytest.raises(Exception, match="503"):
        client.delete_asset("s-1")
    standin.fail_next(1, 403)
    with pytest.raises(ShotstackAuthError):
        client.get_asset("s-1")
    assert {
        k: sample(name, endpoint=k[0], outcome=k[1]) - v for k, v in before.items()
    } == dict.fromkeys(before, 1.0)
    assert sample("asset_tracker_shotstack_auth_failures_total") - auth_before == 1
    assert sample("asset_tracker_rate_budget_wait_seconds_count") - waits_before == 5
    assert (
        sample("asset_tracker_shotstack_call_duration_seconds_count", endpoint="get_asset")
        - latency_before
        == 3
    )


def test_a_lease_that_ended_unfinished_is_counted_when_taken_over(connection: Connection) -> None:
    session = Session(bind=connection, join_transaction_mode="create_savepoint")
    now = utcnow()
    for n in range(3):
        create_render(session, f"lease-{n}", now=now - timedelta(minutes=5), grace=0)
    before = sample("asset_tracker_leases_taken_over_total")
    first = claim_due(session, owner="dead", now=now - timedelta(minutes=2), lease=60, limit=2)
    assert len(first) == 2
    # The dead worker's leases have ended; another worker takes them, and the free render.
    second = claim_due(session, owner="alive", now=now, lease=60, limit=10)
    assert len(second) == 3
    assert sample("asset_tracker_leases_taken_over_total") - before == 2


def test_worker_serves_its_metrics_and_runs_on_without_a_port(
    live_url: str, live_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    now = utcnow()
    with Session(live_engine) as session, session.begin():
        create_render(session, "late-1", now=now - timedelta(seconds=90), grace=0)
    port = metrics.serve_worker_metrics(0, database_url=live_url)
    assert port
    body = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert "asset_tracker_worker_lookups_total" in body
    assert "asset_tracker_worker_auth_failing" in body
    assert "asset_tracker_leases_taken_over_total" in body
    (lag,) = [
        float(line.split()[1])
        for line in body.splitlines()
        if line.startswith("asset_tracker_oldest_due_lag_seconds ")
    ]
    assert 90 <= lag < 3600

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="service.metrics"):
            assert metrics.serve_worker_metrics(busy) is None
    assert any("not served" in r.getMessage() for r in caplog.records)


def test_metrics_text_is_prometheus_exposition(client: FlaskClient) -> None:
    response = client.get("/metrics", headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=")
    assert "# TYPE asset_tracker_callbacks_total counter" in response.get_data(as_text=True)


@pytest.mark.parametrize(
    "url",
    ["postgresql://u:pw-SECRET-888@127.0.0.1:notaport/db", "nosuchdb://u:pw-SECRET-888@h/db"],
)
def test_a_database_url_that_cannot_work_is_one_line_without_its_password(url: str) -> None:
    from service.config import ConfigError

    with pytest.raises(ConfigError) as refused:
        load_settings(_env_file=None, database_url=url)
    message = str(refused.value)
    assert message.startswith("invalid configuration: DATABASE_URL")
    assert "\n" not in message and "pw-SECRET-888" not in message
