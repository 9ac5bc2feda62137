"""The reconciler (SPEC §5): claims and leases, lookups, backoff, expiry, errors, confirmations.

Everything here commits for real (the live database) and talks HTTP to the Serve stand-in;
the processes that run `asset-tracker worker` are in test_worker_processes.py.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from service import create_app
from service.assets import AssetFacts, create_render, record_asset
from service.cli import main as cli
from service.config import PROJECT_ROOT, Settings
from service.db import make_engine, utcnow
from service.models import Asset, Render, Source, WebhookEvent
from service.reconciler import (
    Policy,
    Reconciler,
    ReconcilerStats,
    claim_due,
    claim_one,
    release,
    sync_render,
    write_lookup,
)
from service.shotstack import RateBudget, ServeClient

from .conftest import app_settings
from .helpers import edit_callback, post_callback, serve_callback
from .standin import ServeStandIn

KEY = "reconcile-key-0123456789"
Sessions = sessionmaker[Session]


@pytest.fixture
def standin() -> Iterator[ServeStandIn]:
    with ServeStandIn(api_key=KEY, timeout_sleep=1.0) as s:
        yield s


@pytest.fixture
def sessions(live_engine: Engine) -> Sessions:
    return sessionmaker(live_engine, expire_on_commit=False)


@pytest.fixture
def budget(live_engine: Engine) -> Iterator[RateBudget]:
    budget = RateBudget(live_engine, 500.0)
    budget.reset()
    yield budget
    budget.reset()


def settings_for(live_url: str, standin: ServeStandIn, **extra: Any) -> Settings:
    values = app_settings(
        live_url,
        shotstack_api_url=standin.url,
        shotstack_api_key=KEY,
        shotstack_rate_limit=500,
        shotstack_timeout="0.5,0.5",
        reconcile_grace=0,
        reconcile_lease=5,
        reconcile_max_interval=0.4,
        reconcile_idle=0.05,
    )
    values.update(extra)
    return Settings(**values)


Make = Callable[..., Reconciler]


@pytest.fixture
def make(
    live_url: str, standin: ServeStandIn, sessions: Sessions, budget: RateBudget
) -> Iterator[Make]:
    """Build reconcilers on the live database and the stand-in; close their clients after."""
    clients: list[ServeClient] = []

    def build(**extra: Any) -> Reconciler:
        settings = settings_for(live_url, standin, **extra)
        client = ServeClient(settings, budget, backoff=0.01)
        clients.append(client)
        return Reconciler(sessions, client, settings, stats=ReconcilerStats(), rng=random.Random(7))

    yield build
    for client in clients:
        client.close()


def track(sessions: Sessions, *render_ids: str, age: float = 0.0) -> None:
    """Track renders, due now, first seen `age` seconds ago."""
    now = utcnow()
    with sessions.begin() as session:
        for render_id in render_ids:
            create_render(session, render_id, now=now - timedelta(seconds=age), grace=0)


def render(sessions: Sessions, render_id: str) -> Render:
    with sessions() as session:
        found = session.get(Render, render_id)
        assert found is not None
        return found


def assets_of(sessions: Sessions, render_id: str) -> dict[str, Asset]:
    with sessions() as session:
        rows = session.scalars(select(Asset).where(Asset.render_id == render_id))
        return {a.id: a for a in rows}


def by_render(render_id: str) -> str:
    return f"/serve/stage/assets/render/{render_id}"


def wait_until_due(sessions: Sessions, render_id: str) -> None:
    due = render(sessions, render_id).next_check_at
    assert due is not None
    time.sleep(max(0.0, (due - utcnow()).total_seconds()) + 0.01)


# --- Backoff ----------------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    policy = Policy(grace=1.0, max_interval=30.0, max_age=1e6, lease=60, batch=50, idle=1)
    rng = random.Random(3)
    delays = [policy.backoff(n, rng) for n in range(1, 12)]
    for n, delay in enumerate(delays, start=1):
        exact = min(30.0, 2.0 ** (n - 1))
        assert 0.75 * exact <= delay <= exact
    assert all(b > a for a, b in itertools.pairwise(delays[:6]))
    assert max(delays) <= 30.0
    assert Policy(0, 0.5, 1e6, 60, 50, 1).backoff(1, rng) <= 0.5  # no grace: 1 s, capped


def test_backoff_of_a_render_grows_then_holds_at_the_cap(sessions: Sessions) -> None:
    policy = Policy(grace=0.1, max_interval=1.0, max_age=1e6, lease=5, batch=50, idle=1)
    track(sessions, "r-slow")
    gaps = []
    for _ in range(8):
        with sessions.begin() as session:
            claim = claim_one(session, "r-slow", owner="w", now=utcnow(), lease=5)
            assert claim is not None
        with sessions.begin() as session:
            outcome = write_lookup(
                session, claim, [], owner="w", now=utcnow(), policy=policy, rng=random.Random(1)
            )
        assert outcome == "pending"
        row = render(sessions, "r-slow")
        assert row.next_check_at is not None and row.last_lookup_at is not None
        gaps.append((row.next_check_at - row.last_lookup_at).total_seconds())
    assert row.attempts == 8
    assert all(b > a for a, b in itertools.pairwise(gaps[:5]))  # 0.1 .. 1.0
    assert all(0.75 <= gap <= 1.0 for gap in gaps[4:])  # capped at RECONCILE_MAX_INTERVAL


# --- Lookups settle, or not yet ---------------------------------------------------------------


def test_a_render_without_callbacks_is_settled_by_lookups_alone(
    make: Make, sessions: Sessions, standin: ServeStandIn
) -> None:
    standin.add_asset("a-main", "r-1")
    standin.add_asset("a-poster", "r-1", filename="r-1-poster.jpg")
    track(sessions, "r-1")

    make().run(once=True)

    row = render(sessions, "r-1")
    assert (row.tracking, row.attempts, row.lease_owner) == ("settled", 1, None)
    assert row.settled_at is not None and row.next_check_at is None
    assets = assets_of(sessions, "r-1")
    assert {a: (x.status, x.kind, x.status_source) for a, x in assets.items()} == {
        "a-main": ("ready", "video", Source.LOOKUP),
        "a-poster": ("ready", "poster", Source.LOOKUP),
    }
    assert standin.count("GET", by_render("r-1")) == 1


def test_a_render_whose_callbacks_all_came_is_confirmed_by_one_lookup(
    make: Make, sessions: Sessions, standin: ServeStandIn, live_url: str
) -> None:
    app = create_app(app_settings(live_url, reconcile_grace=0))
    try:
        web = app.test_client()
        assert post_callback(web, edit_callback("r-2")).status_code == 200
        assert post_callback(web, serve_callback("a-1", "r-2")).status_code == 200
    finally:
        app.extensions["db"].engine.dispose()
    standin.add_asset("a-1", "r-2")
    assert render(sessions, "r-2").tracking == "pending"  # callbacks alone never settle

    reconciler = make()
    reconciler.run(once=True)
    reconciler.run(once=True)

    assert render(sessions, "r-2").tracking == "settled"
    assert standin.count("GET", by_render("r-2")) == 1


def test_an_importing_asset_keeps_the_render_pending_until_ready(
    make: Make, sessions: Sessions, standin: ServeStandIn
) -> None:
    standin.add_asset("a-1", "r-3", status="importing")
    track(sessions, "r-3")
    reconciler = make()

    reconciler.run(once=True)
    row = render(sessions, "r-3")
    assert (row.tracking, row.attempts, row.last_error) == ("pending", 1, None)
    assert assets_of(sessions, "r-3")["a-1"].status == "importing"

    standin.set_status("a-1", "ready")
    wait_until_due(sessions, "r-3")
    reconciler.run(once=True)
    assert render(sessions, "r-3").tracking == "settled"
    assert assets_of(sessions, "r-3")["a-1"].status == "ready"
    assert standin.count("GET", by_render("r-3")) == 2


@pytest.mark.parametrize("empty", ["list", "404"])
def test_no_assets_yet_is_not_yet(
    make: Make, sessions: Sessions, standin: ServeStandIn, empty: Any
) -> None:
    standin.empty_render = empty
    track(sessions, "r-4")
    make().run(once=True)
    row = render(sessions, "r-4")
    assert (row.tracking, row.attempts, row.last_error, row.lease_owner) == (
        "pending",
        1,
        None,
        None,
    )
    assert row.next_check_at is not None and row.next_check_at > utcnow() - timedelta(seconds=1)


def test_5xx_counts_an_attempt_and_backs_off(
    make: Make, sessions: Sessions, standin: ServeStandIn
) -> None:
    standin.add_asset("a-1", "r-5")
    standin.fail_next(5, 503)
    track(sessions, "r-5")
    make().run(once=True)
    row = render(sessions, "r-5")
    assert (row.tracking, row.attempts) == ("pending", 1)
    assert row.last_error is not None and "503" in row.last_error
    assert KEY not in row.last_error
    assert row.last_lookup_at is not None and row.next_check_at is not None
    assert row.next_check_at > row.last_lookup_at


def test_an_old_render_expires_and_a_new_asset_reopens_it(
    make: Make, sessions: Sessions, standin: ServeStandIn, live_url: str
) -> None:
    track(sessions, "r-old", "r-older", age=3600)
    make(reconcile_max_age=60).run(once=True)
    for render_id in ("r-old", "r-older"):
        row = render(sessions, render_id)
        assert (row.tracking, row.next_check_at, row.attempts) == ("expired", None, 1)

    # A callback brings a new asset: pending again, then settled by its lookup.
    standin.add_asset("a-new", "r-old")
    with sessions.begin() as session:
        facts = AssetFacts(id="a-new", render_id="r-old", status="ready", url=None)
        record_asset(session, facts, source=Source.CALLBACK, now=utcnow(), grace=0)
    assert render(sessions, "r-old").tracking == "pending"
    make(reconcile_max_age=60).run(once=True)
    assert (render(sessions, "r-old").tracking, render(sessions, "r-old").attempts) == (
        "settled",
        1,
    )

    # A lookup (here `sync-render`) that brings a new asset settles an expired render too.
    standin.add_asset("a-late", "r-older")
    settings = settings_for(live_url, standin, reconcile_max_age=60)
    client = ServeClient(settings, RateBudget(sessions.kw["bind"], 500))
    try:
        tracking, found = sync_render(sessions, client, settings, "r-older")
    finally:
        client.close()
    assert (tracking, [f.id for f in found]) == ("settled", ["a-late"])


def test_an_expired_render_is_looked_up_until_its_age_then_given_up(
    make: Make, sessions: Sessions, standin: ServeStandIn
) -> None:
    track(sessions, "r-6", age=0.2)
    reconciler = make(reconcile_max_age=0.6, reconcile_max_interval=5)
    reconciler.run(once=True)
    row = render(sessions, "r-6")
    assert row.tracking == "pending"
    assert row.next_check_at is not None
    # The next lookup is the last one: at the age limit, not after the backoff.
    assert row.next_check_at <= row.first_seen_at + timedelta(seconds=0.6)
    wait_until_due(sessions, "r-6")
    reconciler.run(once=True)
    assert render(sessions, "r-6").tracking == "expired"
    assert standin.count("GET", by_render("r-6")) == 2


# --- Errors that are not the render's fault --------------------------------------------------


def test_401_403_stops_attempts_and_is_reported(
    make: Make,
    sessions: Sessions,
    standin: ServeStandIn,
    budget: RateBudget,
    caplog: pytest.LogCaptureFixture,
) -> None:
    renders = [f"r-auth-{n}" for n in range(6)]
    for n, render_id in enumerate(renders):
        standin.add_asset(f"a-auth-{n}", render_id)
    track(sessions, *renders)
    before = {r: render(sessions, r).next_check_at for r in renders}

    wrong = make(shotstack_api_key="a-key-of-the-other-environment")
    with caplog.at_level(logging.ERROR, logger="service.reconciler"):
        wrong.run(once=True)

    for render_id in renders:
        row = render(sessions, render_id)
        assert (row.tracking, row.attempts, row.last_error, row.lease_owner) == (
            "pending",
            0,
            None,
            None,
        )
        assert row.next_check_at == before[render_id]  # no backoff towards expiry either
    assert wrong.stats.auth_failing and wrong.stats.auth_errors >= 1
    assert standin.count() <= wrong.threads  # it stopped calling, bar the calls under way
    refused = [r for r in caplog.records if "refused the key" in r.getMessage()]
    assert len(refused) == 1  # once a minute, not once per render
    assert budget.auth_error() is not None  # /readyz shows it

    right = make()
    right.run(once=True)
    assert {render(sessions, r).tracking for r in renders} == {"settled"}
    assert not right.stats.auth_failing
    assert budget.auth_error() is None


def test_429_pauses_and_hands_renders_back_without_an_attempt(
    make: Make, sessions: Sessions, standin: ServeStandIn, budget: RateBudget
) -> None:
    standin.add_asset("a-1", "r-7")
    standin.fail_next(1, 429, retry_after=30)
    track(sessions, "r-7")
    reconciler = make()
    reconciler.run(once=True)
    row = render(sessions, "r-7")
    assert (row.tracking, row.attempts, row.lease_owner) == ("pending", 0, None)
    assert row.next_check_at is not None
    assert row.next_check_at > utcnow() + timedelta(seconds=20)
    assert budget.paused_for() > 20  # every process: the pause is in the database
    assert reconciler.stats.rate_limited == 1
    assert standin.count() == 1


def test_no_api_key_warns_and_keeps_the_render_due(
    make: Make, sessions: Sessions, standin: ServeStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    track(sessions, "r-8")
    reconciler = make(shotstack_api_key=None)
    with caplog.at_level(logging.WARNING, logger="service.reconciler"):
        reconciler.run(once=True)
    row = render(sessions, "r-8")
    assert (row.tracking, row.attempts, row.lease_owner) == ("pending", 0, None)
    assert reconciler.stats.not_configured
    assert any("not configured" in r.getMessage() for r in caplog.records)
    assert standin.count() == 0


# --- Claims and leases ------------------------------------------------------------------------


def test_a_lease_keeps_others_off_until_it_ends(sessions: Sessions) -> None:
    track(sessions, "r-a", "r-b")
    with sessions.begin() as session:
        mine = claim_due(session, owner="A", now=utcnow(), lease=0.5, limit=10)
    assert sorted(c.render_id for c in mine) == ["r-a", "r-b"]
    with sessions.begin() as session:
        assert claim_due(session, owner="B", now=utcnow(), lease=5, limit=10) == []
        assert claim_one(session, "r-a", owner="B", now=utcnow(), lease=5) is None

    time.sleep(0.6)
    with sessions.begin() as session:
        theirs = claim_due(session, owner="B", now=utcnow(), lease=5, limit=10)
    assert sorted(c.render_id for c in theirs) == ["r-a", "r-b"]

    # A's answer comes too late: it is not written.
    policy = Policy(0, 1, 60, 0.5, 10, 1)
    facts = [AssetFacts(id="a-1", render_id="r-a", status="ready")]
    with sessions.begin() as session:
        lost = write_lookup(
            session, mine[0], facts, owner="A", now=utcnow(), policy=policy, rng=random.Random()
        )
    assert lost is None
    assert render(sessions, "r-a").lease_owner == "B"
    assert assets_of(sessions, "r-a") == {}

    with sessions.begin() as session:
        assert release(session, owner="B") == 2
    assert render(sessions, "r-b").lease_until is None


def test_concurrent_claims_never_overlap(sessions: Sessions) -> None:
    ids = [f"r-{n:03d}" for n in range(200)]
    track(sessions, *ids)
    claimed: dict[str, list[str]] = {}
    start = threading.Barrier(4)

    def claimer(owner: str) -> None:
        got = claimed.setdefault(owner, [])
        start.wait()
        while True:
            with sessions.begin() as session:
                batch = claim_due(session, owner=owner, now=utcnow(), lease=30, limit=7)
            if not batch:
                return
            got.extend(c.render_id for c in batch)

    threads = [threading.Thread(target=claimer, args=(f"w{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [r for got in claimed.values() for r in got]
    assert sorted(everything) == ids  # each claimed once, by one worker
    assert sum(1 for got in claimed.values() if got) >= 2


# --- Unconfirmed callbacks --------------------------------------------------------------------


def test_a_deleted_callback_is_confirmed_by_a_lookup_then_applied(
    make: Make, sessions: Sessions, standin: ServeStandIn, live_url: str
) -> None:
    app: Flask = create_app(app_settings(live_url, reconcile_grace=0))
    try:
        web = app.test_client()
        for asset_id in ("a-gone", "a-forged"):
            assert post_callback(web, serve_callback(asset_id, "r-9")).status_code == 200
            answer = post_callback(web, serve_callback(asset_id, "r-9", status="deleted"))
            assert answer.get_json()["outcome"] == "unconfirmed"
        post_callback(web, serve_callback("a-unknown", "r-9", status="archived"))
    finally:
        app.extensions["db"].engine.dispose()
    standin.add_asset("a-gone", "r-9", status="deleted")
    standin.add_asset("a-forged", "r-9", status="ready")
    with sessions.begin() as session:  # settled before: only the confirmations look anything up
        session.execute(
            update(Render).where(Render.id == "r-9").values(tracking="settled", next_check_at=None)
        )
    assert {a.status for a in assets_of(sessions, "r-9").values()} == {"ready"}

    make().run(once=True)

    assets = assets_of(sessions, "r-9")
    assert assets["a-gone"].status == "deleted" and assets["a-gone"].deleted_at is not None
    assert assets["a-forged"].status == "ready"  # a forged `deleted` changes nothing
    assert "a-unknown" not in assets
    with sessions() as session:
        events = session.scalars(
            select(WebhookEvent).where(WebhookEvent.object_status.in_(["deleted", "archived"]))
        ).all()
    assert {(e.object_id, e.state) for e in events} == {
        ("a-gone", "processed"),
        ("a-forged", "processed"),
        ("a-unknown", "processed"),
    }
    assert standin.count("GET", "/serve/stage/assets/a-gone") == 1


def test_a_failing_confirmation_is_retried_later(
    make: Make, sessions: Sessions, standin: ServeStandIn, live_url: str
) -> None:
    app = create_app(app_settings(live_url))
    try:
        post_callback(app.test_client(), serve_callback("a-x", "r-10", status="deleted"))
    finally:
        app.extensions["db"].engine.dispose()
    standin.fail_next(5, 500)
    make().run(once=True)
    with sessions() as session:
        event = session.scalars(select(WebhookEvent).where(WebhookEvent.object_id == "a-x")).one()
    assert (event.state, event.attempts) == ("unconfirmed", 1)
    assert event.error is not None and "500" in event.error
    assert event.next_attempt_at is not None and event.next_attempt_at > utcnow()


# --- The commands -----------------------------------------------------------------------------


def cli_env(settings_url: str, standin: ServeStandIn, **extra: str) -> dict[str, str]:
    env = {
        "DATABASE_URL": settings_url,
        "SHOTSTACK_API_URL": standin.url,
        "SHOTSTACK_API_KEY": KEY,
        "SHOTSTACK_RATE_LIMIT": "500",
        "SHOTSTACK_TIMEOUT": "0.5,0.5",
        "RECONCILE_GRACE": "0",
        "RECONCILE_IDLE": "0.05",
        "LOG_FORMAT": "text",
    }
    env.update(extra)
    return env


def test_sync_render_and_sync_asset_commands(
    sessions: Sessions,
    standin: ServeStandIn,
    live_url: str,
    budget: RateBudget,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    standin.add_asset("a-1", "r-cli")
    standin.add_asset("a-2", "r-cli", filename="r-cli-thumb.jpg")
    runner = CliRunner()
    env = cli_env(live_url, standin)

    result = runner.invoke(cli, ["sync-render", "r-cli"], env=env)
    assert result.exit_code == 0, result.output
    assert "render r-cli: settled, 2 asset(s)" in result.output
    assert render(sessions, "r-cli").tracking == "settled"

    standin.set_status("a-2", "deleted")
    result = runner.invoke(cli, ["sync-asset", "a-2"], env=env)
    assert result.exit_code == 0, result.output
    assert "asset a-2: deleted" in result.output
    assert assets_of(sessions, "r-cli")["a-2"].status == "deleted"

    result = runner.invoke(cli, ["sync-asset", "a-missing"], env=env)
    assert result.exit_code == 1 and "404" in result.output

    standin.fail_next(5, 500)
    result = runner.invoke(cli, ["sync-render", "r-cli"], env=env)
    assert result.exit_code == 1 and "500" in result.output and KEY not in result.output


def test_the_same_code_path_runs_on_sqlite(standin: ServeStandIn, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tracker.sqlite3'}"
    env = {**os.environ, **cli_env(url, standin)}
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        [str(bin_dir / "alembic"), "-c", str(PROJECT_ROOT / "pyproject.toml"), "upgrade", "head"],
        env=env,
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    engine = make_engine(url)
    sqlite_sessions = sessionmaker(engine, expire_on_commit=False)
    try:
        track(sqlite_sessions, "r-s1", "r-s2", "r-s3")
        standin.add_asset("a-s1", "r-s1")
        standin.add_asset("a-s2", "r-s2", status="importing")
        done = subprocess.run(
            [str(bin_dir / "asset-tracker"), "worker", "--once"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr + done.stdout
        tracking = {r: render(sqlite_sessions, r).tracking for r in ("r-s1", "r-s2", "r-s3")}
        assert tracking == {"r-s1": "settled", "r-s2": "pending", "r-s3": "pending"}
        with sqlite_sessions() as session:
            leased = session.scalars(select(Render.id).where(Render.lease_until.is_not(None)))
            assert list(leased) == []
        assert render(sqlite_sessions, "r-s2").attempts == 1
        assert standin.count("GET") == 3
    finally:
        engine.dispose()


def test_worker_once_fails_when_shotstack_refuses_the_key(
    standin: ServeStandIn, tmp_path: Path
) -> None:
    """A cron's `worker --once` with a wrong key must not look like a pass that went well."""
    url = f"sqlite:///{tmp_path / 'tracker.sqlite3'}"
    bin_dir = Path(sys.executable).parent

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bin_dir / args[0]), *args[1:]],
            env={**os.environ, **cli_env(url, standin, **extra)},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert (
        run("alembic", "-c", str(PROJECT_ROOT / "pyproject.toml"), "upgrade", "head").returncode
        == 0
    )
    engine = make_engine(url)
    sqlite_sessions = sessionmaker(engine, expire_on_commit=False)
    try:
        track(sqlite_sessions, "r-k1")
        standin.add_asset("a-k1", "r-k1")
        wrong = run("asset-tracker", "worker", "--once", SHOTSTACK_API_KEY="wrong-key-0123")
        assert wrong.returncode == 1, wrong.stderr + wrong.stdout
        assert "SHOTSTACK_API_KEY" in wrong.stderr and "wrong-key-0123" not in wrong.stderr
        assert render(sqlite_sessions, "r-k1").tracking == "pending"

        right = run("asset-tracker", "worker", "--once")
        assert right.returncode == 0, right.stderr + right.stdout
        assert render(sqlite_sessions, "r-k1").tracking == "settled"
    finally:
        engine.dispose()


def test_a_database_outage_is_logged_and_waited_out(
    standin: ServeStandIn, live_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    down = make_engine("postgresql+psycopg://postgres@127.0.0.1:9/nowhere")
    settings = settings_for(live_url, standin)
    client = ServeClient(settings, RateBudget(down, 500))
    reconciler = Reconciler(
        sessionmaker(down), client, settings, stats=ReconcilerStats(), rng=random.Random(1)
    )
    runner = threading.Thread(target=reconciler.run)
    try:
        with caplog.at_level(logging.ERROR, logger="service.reconciler"):
            runner.start()
            deadline = time.monotonic() + 30
            while "cannot claim renders" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
            assert runner.is_alive()  # still running, waiting for the database
            reconciler.stop()
            runner.join(timeout=30)
        assert not runner.is_alive()
        assert "cannot claim renders" in caplog.text
    finally:
        client.close()
        down.dispose()


def test_a_callback_during_a_lookup_makes_the_render_due_after_the_grace_not_the_backoff(
    sessions: Sessions,
) -> None:
    policy = Policy(grace=0.1, max_interval=100.0, max_age=1e6, lease=5, batch=50, idle=1)
    track(sessions, "r-busy")
    with sessions.begin() as session:  # many lookups already: its backoff has grown long
        session.execute(update(Render).where(Render.id == "r-busy").values(attempts=9))
    with sessions.begin() as session:
        claim = claim_one(session, "r-busy", owner="w", now=utcnow(), lease=5)
        assert claim is not None
    # While the lookup is under way, a serve callback brings an asset it will not list.
    with sessions.begin() as session:
        facts = AssetFacts(id="a-late", render_id="r-busy", status="ready")
        record_asset(session, facts, source=Source.CALLBACK, now=utcnow(), grace=policy.grace)
    with sessions.begin() as session:
        outcome = write_lookup(
            session, claim, [], owner="w", now=utcnow(), policy=policy, rng=random.Random(1)
        )
    assert outcome == "pending"
    row = render(sessions, "r-busy")
    assert row.next_check_at is not None and row.last_lookup_at is not None
    assert (row.next_check_at - row.last_lookup_at).total_seconds() <= policy.grace + 0.01


def test_a_done_callback_during_a_lookup_makes_the_render_due_after_the_grace(
    sessions: Sessions, live_app: Flask
) -> None:
    policy = Policy(grace=0.1, max_interval=100.0, max_age=1e6, lease=5, batch=50, idle=1)
    track(sessions, "r-done-late")
    with sessions.begin() as session:  # tracked long before it finished: a long backoff
        session.execute(update(Render).where(Render.id == "r-done-late").values(attempts=9))
    with sessions.begin() as session:
        claim = claim_one(session, "r-done-late", owner="w", now=utcnow(), lease=5)
        assert claim is not None
    # While the lookup is under way (its assets not hosted yet), the render ends.
    assert post_callback(live_app.test_client(), edit_callback("r-done-late")).status_code == 200
    with sessions.begin() as session:
        outcome = write_lookup(
            session, claim, [], owner="w", now=utcnow(), policy=policy, rng=random.Random(1)
        )
    assert outcome == "pending"
    row = render(sessions, "r-done-late")
    assert row.next_check_at is not None and row.last_lookup_at is not None
    assert (row.next_check_at - row.last_lookup_at).total_seconds() <= policy.grace + 0.01


@pytest.mark.parametrize("command", ["sync-render", "sync-asset"])
@pytest.mark.parametrize("ident", ["", "   ", "r-1\nx"])
def test_sync_commands_refuse_an_id_no_render_or_asset_can_have(command: str, ident: str) -> None:
    result = CliRunner().invoke(cli, [command, ident], env={"DATABASE_URL": "sqlite://"})
    assert result.exit_code == 2, result.output
    assert "Invalid value" in result.output


def test_a_stop_sends_no_call_whose_slot_comes_after_it(
    make: Make, sessions: Sessions, standin: ServeStandIn, budget: RateBudget
) -> None:
    renders = [f"r-stop-{n}" for n in range(4)]
    for n, render_id in enumerate(renders):
        standin.add_asset(f"a-stop-{n}", render_id)
    track(sessions, *renders)
    # Slots 0.5 s apart: when the first call arrives, the other threads still wait for theirs.
    budget.interval = 0.5
    reconciler = make()
    reconciler.threads = 4
    standin.on_call = lambda _method, _path: reconciler.stop()  # SIGTERM, as the call arrives
    reconciler.run()

    assert standin.count() == 1  # the render in hand; no call started after the stop
    rows = [render(sessions, r) for r in renders]
    assert sorted(r.tracking for r in rows) == ["pending"] * 3 + ["settled"]
    assert all(r.lease_owner is None for r in rows)  # the others handed back
    assert sum(r.attempts for r in rows) == 1
