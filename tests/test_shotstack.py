"""The Serve client, the shared rate budget and the stand-in they are tested against."""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from service.config import Settings
from service.db import Base, make_engine
from service.models import ShotstackBudget
from service.shotstack import (
    JITTER_MARGIN,
    RateBudget,
    ServeClient,
    ShotstackAuthError,
    ShotstackNotConfigured,
    ShotstackRateLimited,
    ShotstackUnavailable,
    retry_after_seconds,
)

from .conftest import SHOTSTACK_KEY
from .standin import ServeStandIn

KEY = SHOTSTACK_KEY
RENDER = "d2b46ed6-998a-4d6b-9d91-b8cf0193a655"
ASSET = "e4433cbf-e501-76a2-ac8b-715d26997540"


def fetch(url: str, method: str = "GET", key: str | None = KEY) -> tuple[int, Any]:
    """Call the stand-in the plain way, as another process would."""
    request = urllib.request.Request(url, method=method)
    if key is not None:
        request.add_header("x-api-key", key)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw else None


def settings_for(standin: ServeStandIn, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "_env_file": None,
        "shotstack_api_url": standin.url,
        "shotstack_api_key": KEY,
        "shotstack_timeout": "0.5,0.5",
    }
    values.update(extra)
    return Settings(**values)


def client_for(standin: ServeStandIn, budget: RateBudget, **kwargs: Any) -> ServeClient:
    kwargs.setdefault("backoff", 0.01)
    settings_extra = kwargs.pop("settings", {})
    return ServeClient(settings_for(standin, **settings_extra), budget, **kwargs)


# --- The stand-in speaks as shotstack-facts.md §2 says ------------------------------------------


def test_standin_by_render_envelope(standin: ServeStandIn) -> None:
    standin.add_asset(ASSET, RENDER)
    status, body = fetch(f"{standin.url}/serve/stage/assets/render/{RENDER}")
    assert status == 200
    (item,) = body["data"]
    assert item["type"] == "assets"
    attrs = item["attributes"]
    assert attrs["id"] == ASSET and attrs["renderId"] == RENDER and attrs["region"] == "au"
    assert attrs["url"] == f"https://cdn.shotstack.io/au/stage/{attrs['owner']}/{RENDER}.mp4"
    assert attrs["status"] == "ready" and attrs["created"].endswith("Z")


@pytest.mark.parametrize("shape", ["object", "list"])
def test_standin_by_id_shape(shape: str) -> None:
    with ServeStandIn(api_key=KEY, by_id_shape=shape) as standin:  # type: ignore[arg-type]
        standin.add_asset(ASSET, RENDER)
        status, body = fetch(f"{standin.url}/serve/stage/assets/{ASSET}")
    assert status == 200
    data = body["data"]
    assert isinstance(data, dict if shape == "object" else list)


@pytest.mark.parametrize(("empty", "expected"), [("list", 200), ("404", 404)])
def test_standin_unknown_render(empty: str, expected: int) -> None:
    with ServeStandIn(api_key=KEY, empty_render=empty) as standin:  # type: ignore[arg-type]
        status, body = fetch(f"{standin.url}/serve/stage/assets/render/{RENDER}")
    assert status == expected
    assert body == ({"data": []} if expected == 200 else {"message": "Not Found"})


@pytest.mark.parametrize("second", [204, 404])
def test_standin_delete_keeps_the_record(second: int) -> None:
    with ServeStandIn(api_key=KEY, second_delete=second) as standin:  # type: ignore[arg-type]
        standin.add_asset(ASSET, RENDER)
        url = f"{standin.url}/serve/stage/assets/{ASSET}"
        assert fetch(url, "DELETE") == (204, None)
        assert fetch(url)[1]["data"]["attributes"]["status"] == "deleted"
        assert fetch(url, "DELETE")[0] == second


def test_standin_checks_key_and_environment(standin: ServeStandIn) -> None:
    standin.add_asset(ASSET, RENDER)
    assert fetch(f"{standin.url}/serve/stage/assets/{ASSET}", key="wrong") == (
        403,
        {"message": "Forbidden"},
    )
    assert fetch(f"{standin.url}/serve/v1/assets/{ASSET}")[0] == 403
    assert fetch(f"{standin.url}/serve/stage/assets/nope") == (404, {"message": "Not Found"})


def test_standin_faults_and_counts(standin: ServeStandIn) -> None:
    standin.add_asset(ASSET, RENDER)
    url = f"{standin.url}/serve/stage/assets/{ASSET}"
    standin.fail_next(1, 429, retry_after=3)
    standin.fail_next(1, 503)
    assert fetch(url) == (429, {"message": "Too Many Requests"})
    assert fetch(url)[0] == 503
    assert fetch(url)[0] == 200
    assert standin.count("GET", f"/serve/stage/assets/{ASSET}") == 3
    assert 1 <= standin.max_in_window(1.0) <= 3


# --- Parsing and outcomes of the client --------------------------------------------------------


@pytest.mark.parametrize("shape", ["object", "list"])
@pytest.mark.parametrize("type_name", ["assets", "asset"])
def test_get_asset_reads_both_shapes(budget: RateBudget, shape: str, type_name: str) -> None:
    with ServeStandIn(api_key=KEY, by_id_shape=shape, type_name=type_name) as standin:  # type: ignore[arg-type]
        standin.add_asset(ASSET, RENDER, size=1234, created="2021-07-12T11:04:44.574Z")
        facts = client_for(standin, budget).get_asset(ASSET)
    assert facts is not None
    assert (facts.id, facts.render_id, facts.status, facts.region) == (ASSET, RENDER, "ready", "au")
    assert facts.filename == f"{RENDER}.mp4"
    assert (
        facts.created is not None
        and facts.created.isoformat() == "2021-07-12T11:04:44.574000+00:00"
    )


def test_get_unknown_asset_is_none(standin: ServeStandIn, budget: RateBudget) -> None:
    assert client_for(standin, budget).get_asset("nope") is None


@pytest.mark.parametrize("empty", ["list", "404"])
def test_render_without_assets_is_empty(budget: RateBudget, empty: str) -> None:
    with ServeStandIn(api_key=KEY, empty_render=empty) as standin:  # type: ignore[arg-type]
        assert client_for(standin, budget).assets_by_render(RENDER) == []


def test_render_lists_every_asset(standin: ServeStandIn, budget: RateBudget) -> None:
    standin.add_asset("a-main", RENDER)
    standin.add_asset("a-poster", RENDER, filename=f"{RENDER}-poster.jpg", status="importing")
    standin.add_asset("a-other", "another-render")
    found = client_for(standin, budget).assets_by_render(RENDER)
    assert {(f.id, f.status) for f in found} == {("a-main", "ready"), ("a-poster", "importing")}


def test_null_url_and_unknown_status_are_lenient(budget: RateBudget) -> None:
    with ServeStandIn(api_key=KEY, null_url_while_importing=True) as standin:
        standin.add_asset("a-1", RENDER, status="importing")
        standin.add_asset("a-2", RENDER, status="overwritten")
        found = {f.id: f for f in client_for(standin, budget).assets_by_render(RENDER)}
    assert found["a-1"].url is None and found["a-1"].filename is None
    # An unheard-of status is treated as not settled yet: never terminal, overruled later.
    assert found["a-2"].status == "importing"


@pytest.mark.parametrize("second", [204, 404])
def test_delete_twice_is_done_twice(budget: RateBudget, second: int) -> None:
    with ServeStandIn(api_key=KEY, second_delete=second) as standin:  # type: ignore[arg-type]
        standin.add_asset(ASSET, RENDER)
        client = client_for(standin, budget)
        client.delete_asset(ASSET)
        client.delete_asset(ASSET)
        assert standin.asset(ASSET)["status"] == "deleted"  # type: ignore[index]
        assert standin.count("DELETE") == 2


def test_ids_cannot_reach_another_path(standin: ServeStandIn, budget: RateBudget) -> None:
    standin.add_asset(ASSET, RENDER)
    assert client_for(standin, budget).get_asset(f"render/{RENDER}") is None
    assert standin.calls[-1][2] == f"/serve/stage/assets/render%2F{RENDER}"


def test_no_key_no_call(standin: ServeStandIn, budget: RateBudget) -> None:
    client = client_for(standin, budget, settings={"shotstack_api_key": None})
    with pytest.raises(ShotstackNotConfigured, match="SHOTSTACK_API_KEY"):
        client.get_asset(ASSET)
    assert standin.calls == []


# --- Retries ----------------------------------------------------------------------------------


def test_5xx_is_retried(standin: ServeStandIn, budget: RateBudget) -> None:
    standin.add_asset(ASSET, RENDER)
    standin.fail_next(2, 502)
    facts = client_for(standin, budget, max_retries=3).get_asset(ASSET)
    assert facts is not None and facts.id == ASSET
    assert standin.count("GET") == 3


def test_5xx_after_the_retries_is_unavailable(standin: ServeStandIn, budget: RateBudget) -> None:
    standin.fail_next(5, 500)
    with pytest.raises(ShotstackUnavailable, match="answered 500"):
        client_for(standin, budget, max_retries=2).delete_asset(ASSET)
    assert standin.count("DELETE") == 3


def test_read_timeout_is_retried(standin: ServeStandIn, budget: RateBudget) -> None:
    standin.add_asset(ASSET, RENDER)
    standin.fail_next(1, "timeout")
    facts = client_for(standin, budget, max_retries=1).get_asset(ASSET)
    assert facts is not None
    assert standin.count("GET") == 2


def test_reset_connection_is_retried(standin: ServeStandIn, budget: RateBudget) -> None:
    standin.add_asset(ASSET, RENDER)
    standin.fail_next(1, "reset")
    assert client_for(standin, budget, max_retries=1).get_asset(ASSET) is not None


def test_nobody_listening_is_unavailable(budget: RateBudget) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        shotstack_api_url="http://127.0.0.1:9",
        shotstack_api_key=KEY,  # type: ignore[arg-type]
        shotstack_timeout="0.5,0.5",  # type: ignore[arg-type]
    )
    client = ServeClient(settings, budget, max_retries=1, backoff=0.01)
    with pytest.raises(ShotstackUnavailable, match="connection failed"):
        client.get_asset(ASSET)


def test_a_client_with_a_deadline_retries_once(standin: ServeStandIn, budget: RateBudget) -> None:
    standin.fail_next(5, 503)
    client = client_for(standin, budget, deadline=8.0).bounded(8.0)
    with pytest.raises(ShotstackUnavailable):
        client.get_asset(ASSET)
    assert standin.count("GET") == 2


def test_bounded_keeps_the_retries_within_its_deadline(
    standin: ServeStandIn, budget: RateBudget
) -> None:
    standin.add_asset(ASSET, RENDER)
    standin.fail_next(3, 503)
    assert client_for(standin, budget, max_retries=3).bounded(8.0).get_asset(ASSET) is not None
    assert standin.count("GET") == 4


def test_deadline_cuts_a_slow_read_short(standin: ServeStandIn, budget: RateBudget) -> None:
    """A read timeout longer than the deadline is shortened to it, and no retry follows."""
    standin.fail_next(1, "timeout")
    client = client_for(standin, budget, settings={"shotstack_timeout": "0.5,30"})
    with pytest.raises(ShotstackUnavailable):
        client.bounded(0.4).get_asset(ASSET)
    assert standin.count() == 1


def test_a_booked_budget_refuses_a_bounded_call(
    standin: ServeStandIn, engine: Engine, budget: RateBudget
) -> None:
    slow = RateBudget(engine, 0.1)  # 11 s apart
    slow.reserve()  # the next slot is 11 s away, more than a request's 8 s
    client = client_for(standin, slow).bounded(8.0)
    with pytest.raises(ShotstackRateLimited) as raised:
        client.get_asset(ASSET)
    assert 8.0 < raised.value.retry_after <= 11.0
    assert standin.calls == []


# --- 429 and auth errors reach every process through the database -----------------------------


@pytest.mark.parametrize(("header", "expected"), [("7", 7.0), (None, 60.0)])
def test_429_pauses_the_deployment(
    standin: ServeStandIn, budget: RateBudget, engine: Engine, header: str | None, expected: float
) -> None:
    standin.fail_next(1, 429, retry_after=header)
    with pytest.raises(ShotstackRateLimited) as raised:
        client_for(standin, budget).get_asset(ASSET)
    assert raised.value.retry_after == expected
    assert standin.count() == 1  # a 429 is not retried: the pause is the retry
    other = RateBudget(engine, 1000.0)  # another process, as far as the database can tell
    assert expected - 5 < other.paused_for() <= expected
    with pytest.raises(ShotstackRateLimited) as again:
        other.acquire()
    assert expected - 5 < again.value.retry_after <= expected
    with pytest.raises(ShotstackRateLimited):
        client_for(standin, other).get_asset(ASSET)
    assert standin.count() == 1


def test_retry_after_as_a_date() -> None:
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("2.5") == 2.5


@pytest.mark.parametrize("status", [401, 403])
def test_auth_error_is_recorded_and_cleared(
    standin: ServeStandIn, budget: RateBudget, engine: Engine, status: int
) -> None:
    standin.add_asset(ASSET, RENDER)
    standin.fail_next(1, status)
    client = client_for(standin, budget)
    with pytest.raises(ShotstackAuthError, match="SHOTSTACK_API_KEY") as raised:
        client.get_asset(ASSET)
    assert "stage" in str(raised.value)
    recorded = RateBudget(engine, 1000.0).auth_error()
    assert recorded is not None and str(status) in recorded
    assert client.get_asset(ASSET) is not None
    assert RateBudget(engine, 1000.0).auth_error() is None


def test_wrong_key_never_shows_the_key(
    standin: ServeStandIn, budget: RateBudget, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "the-WRONG-key-987"
    standin.fail_next(2, 503, body={"message": f"echo {secret} and {KEY}"})
    standin.fail_next(1, 400, body={"message": f"bad request from {secret}"})
    client = client_for(standin, budget, settings={"shotstack_api_key": secret}, max_retries=1)
    failures: list[str] = []
    for call in (client.get_asset, client.delete_asset, client.get_asset):
        with pytest.raises(Exception) as raised:
            call(ASSET)
        failures.append(f"{raised.value!s} {raised.value!r}")
    assert all(secret not in text for text in failures)
    assert isinstance(raised.value, ShotstackAuthError)
    assert secret not in caplog.text
    assert secret not in (budget.auth_error() or "")


# --- The budget's arithmetic, on Postgres and on SQLite ----------------------------------------


def next_slot(budget: RateBudget) -> datetime:
    with budget.engine.connect() as conn:
        slot: datetime = conn.execute(select(ShotstackBudget.next_slot_at)).scalar_one()
    return slot


def sqlite_budget(tmp_path: Path, rate: float) -> RateBudget:
    """A budget on a fresh SQLite file, as the quick start has; its row is put back on use."""
    engine = make_engine(f"sqlite:///{tmp_path / 'budget.sqlite3'}")
    Base.metadata.create_all(engine)
    return RateBudget(engine, rate)


@pytest.mark.parametrize("database", ["postgres", "sqlite"])
def test_slots_are_spaced_by_the_interval(engine: Engine, tmp_path: Path, database: str) -> None:
    first = RateBudget(engine, 2.0) if database == "postgres" else sqlite_budget(tmp_path, 2.0)
    first.reset()
    second = RateBudget(first.engine, 2.0)  # another process on the same database
    try:
        assert first.reserve() == 0.0  # nothing booked: the first call goes at once
        start = next_slot(first)
        delays = [budget.reserve() for budget in (second, first, second)]
        assert next_slot(first) - start == timedelta(seconds=3 * first.interval)
        assert first.interval == pytest.approx((1 + JITTER_MARGIN) / 2.0)
        assert delays == sorted(delays) and delays[-1] <= 3 * first.interval
        # A caller that will not wait that long takes no slot.
        with pytest.raises(ShotstackRateLimited) as raised:
            first.reserve(max_wait=0.1)
        assert 0.1 < raised.value.retry_after <= 4 * first.interval
        assert next_slot(first) - start == timedelta(seconds=3 * first.interval)
        # A pause stops everyone, for the longest pause asked.
        second.pause(30)
        first.pause(5)
        with pytest.raises(ShotstackRateLimited) as paused:
            first.acquire()
        assert 25 < paused.value.retry_after <= 30
    finally:
        first.reset()
        if database == "sqlite":
            first.engine.dispose()


# --- The limit holds across processes ---------------------------------------------------------


def hammer(database_url: str, api_url: str, rate: float, seconds: float, ready: Any) -> None:
    """Call the stand-in as fast as this process's budget lets it, for `seconds`."""
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=database_url,
        shotstack_api_url=api_url,
        shotstack_api_key=KEY,  # type: ignore[arg-type]
    )
    engine = make_engine(settings.database_url)
    client = ServeClient(settings, RateBudget(engine, rate), backoff=0.01)
    ready.wait()  # every process starts together
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        client.get_asset(ASSET)
    client.close()
    engine.dispose()


def test_processes_share_one_limit(live_url: str, live_engine: Engine) -> None:
    """Four processes, each with its own budget object, never exceed the limit together."""
    rate, seconds, processes = 20.0, 2.0, 4
    RateBudget(live_engine, rate).reset()
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(processes + 1)
    with ServeStandIn(api_key=KEY) as standin:
        standin.add_asset(ASSET, RENDER)
        workers = [
            context.Process(target=hammer, args=(live_url, standin.url, rate, seconds, ready))
            for _ in range(processes)
        ]
        for worker in workers:
            worker.start()
        ready.wait()
        for worker in workers:
            worker.join(timeout=60)
        calls = standin.calls
        busiest = standin.max_in_window(1.0)
    RateBudget(live_engine, rate).reset()
    assert [w.exitcode for w in workers] == [0] * processes
    print(
        f"\n{len(calls)} calls from {processes} processes in {seconds} s at a limit of "
        f"{rate:.0f}/s; the busiest one-second window held {busiest}"
    )
    assert len(calls) >= rate  # they really competed: over a second's worth of calls
    assert busiest <= rate
