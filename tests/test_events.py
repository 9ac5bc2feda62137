"""Failed callbacks are retried with backoff and by `replay`; old events are deleted."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from service import events
from service.cli import main
from service.db import utcnow
from service.events import (
    MAX_AUTOMATIC_ATTEMPTS,
    Housekeeper,
    delete_old_events,
    replay,
    retry_delay,
    retry_failed_events,
)
from service.models import Asset, Render, WebhookEvent
from service.reconciler import Reconciler

from .helpers import edit_callback, post_callback, serve_callback


def _boom(*_args: Any, **_kwargs: Any) -> None:
    raise RuntimeError("the database said no")


@pytest.fixture
def sessions(app: Flask) -> sessionmaker[Session]:
    maker: sessionmaker[Session] = app.extensions["db"].sessionmaker
    return maker


def _fail_callbacks(client: FlaskClient, monkeypatch: pytest.MonkeyPatch, *bodies: Any) -> None:
    """Deliver callbacks whose processing fails, as a database hiccup would make it."""
    with monkeypatch.context() as patch:
        patch.setattr("service.webhooks.callback_writes", _boom)
        for body in bodies:
            response = post_callback(client, body)
            assert response.status_code == 200
            assert response.get_json() == {"outcome": "failed"}


def _events(session: Session) -> list[WebhookEvent]:
    return list(session.scalars(select(WebhookEvent).order_by(WebhookEvent.id)))


def test_failed_callback_is_retried_once_its_backoff_ends(
    client: FlaskClient, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_callbacks(client, monkeypatch, serve_callback("a-1", "r-1"))
    with sessions() as session:
        (event,) = _events(session)
        assert event.state == "failed" and event.next_attempt_at is not None
        assert session.get(Asset, "a-1") is None
        due = event.next_attempt_at

    early = Housekeeper(sessions, client.application.config["SETTINGS"], clock=lambda: utcnow())
    assert early.retry().ids == []  # not due yet

    keeper = Housekeeper(
        sessions, client.application.config["SETTINGS"], clock=lambda: due + timedelta(seconds=1)
    )
    report = keeper.retry()
    assert (report.processed, report.failed) == (1, 0)
    with sessions() as session:
        (event,) = _events(session)
        assert (event.state, event.attempts, event.error) == ("processed", 1, None)
        asset = session.get(Asset, "a-1")
        assert asset is not None and asset.status == "ready"
    assert keeper.retry().ids == []  # nothing left to do


def test_retry_that_fails_again_backs_off_and_stops_after_the_last_try(
    client: FlaskClient, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_callbacks(client, monkeypatch, edit_callback("r-9"))
    real_apply = events.apply_callback
    monkeypatch.setattr(events, "apply_callback", _boom)
    now = utcnow() + timedelta(days=1)
    delays = []
    for attempt in range(1, MAX_AUTOMATIC_ATTEMPTS + 1):
        with sessions() as session, session.begin():
            report = retry_failed_events(session, now=now, grace=0)
        assert report.failed == 1, attempt
        with sessions() as session:
            (event,) = _events(session)
        assert event.state == "failed" and event.attempts == attempt
        assert "the database said no" in (event.error or "")
        if event.next_attempt_at is None:
            break
        delays.append((event.next_attempt_at - now).total_seconds())
        now = event.next_attempt_at
    assert event.next_attempt_at is None and event.attempts == MAX_AUTOMATIC_ATTEMPTS
    assert delays[:4] == [30.0, 60.0, 120.0, 240.0]
    assert max(delays) == retry_delay(100) == events.RETRY_CAP
    # The worker leaves it alone now; replay still takes it, and succeeds once fixed.
    with sessions() as session, session.begin():
        assert retry_failed_events(session, now=now + timedelta(days=9), grace=0).ids == []
    monkeypatch.setattr(events, "apply_callback", real_apply)
    report = replay(sessions, client.application.config["SETTINGS"])
    assert report.processed == 1
    with sessions() as session:
        render = session.get(Render, "r-9")
        assert render is not None and render.status == "done"


def test_a_stored_event_that_cannot_be_read_is_not_retried(
    sessions: sessionmaker[Session],
) -> None:
    now = utcnow()
    with sessions() as session, session.begin():
        session.add(
            WebhookEvent(
                dedupe_key="odd",
                state="failed",
                http_status=200,
                payload={"type": "ingest", "action": "source", "id": "x"},
                attempts=0,
                next_attempt_at=now,
            )
        )
    with sessions() as session, session.begin():
        report = retry_failed_events(session, now=now, grace=0)
    assert (report.processed, report.failed) == (0, 1)
    with sessions() as session:
        (event,) = _events(session)
    assert event.next_attempt_at is None and (event.error or "").startswith("not retried")


def _snapshot(session: Session) -> list[Any]:
    rows: list[Any] = []
    for table in ("renders", "assets", "webhook_events"):
        rows += session.execute(text(f"SELECT * FROM {table} ORDER BY 1")).all()
    return rows


def test_replay_applies_every_failed_event_and_a_second_run_changes_nothing(
    client: FlaskClient, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_callbacks(
        client,
        monkeypatch,
        edit_callback("r-1"),
        serve_callback("a-1", "r-1"),
        serve_callback("a-2", "r-1", filename="r-1-poster.jpg"),
    )
    settings = client.application.config["SETTINGS"]
    report = replay(sessions, settings, batch=2)  # two batches: the keyset moves on
    assert (report.processed, report.failed, len(report.ids)) == (3, 0, 3)
    with sessions() as session:
        assert {e.state for e in _events(session)} == {"processed"}
        kinds = {a.id: a.kind for a in session.scalars(select(Asset))}
        assert kinds == {"a-1": "video", "a-2": "poster"}
        before = _snapshot(session)
    again = replay(sessions, settings)
    assert again.ids == []
    with sessions() as session:
        assert _snapshot(session) == before


def _old_event(session: Session, key: str, state: str, received_at: datetime) -> None:
    session.add(
        WebhookEvent(
            dedupe_key=key,
            state=state,
            http_status=200,
            payload={"k": key},
            attempts=0,
            received_at=received_at,
        )
    )


def test_retention_deletes_old_finished_events_in_bounded_batches(
    sessions: sessionmaker[Session], app: Flask
) -> None:
    settings = app.config["SETTINGS"]  # EVENT_RETENTION_DAYS = 30
    now = utcnow()
    old, recent = now - timedelta(days=31), now - timedelta(days=29)
    with sessions() as session, session.begin():
        for n in range(5):
            _old_event(session, f"old-{n}", "processed", old - timedelta(minutes=n))
        _old_event(session, "old-ignored", "ignored", old)
        _old_event(session, "old-rejected", "rejected", old)
        _old_event(session, "old-failed", "failed", old)
        _old_event(session, "old-unconfirmed", "unconfirmed", old)
        _old_event(session, "recent", "processed", recent)
    cutoff = now - timedelta(days=settings.event_retention_days)
    with sessions() as session, session.begin():
        assert delete_old_events(session, before=cutoff, limit=3) == 3
    with sessions() as session:
        keys = set(session.scalars(select(WebhookEvent.dedupe_key)))
    # The oldest went first.
    assert not keys & {"old-4", "old-3", "old-2"} and "old-1" in keys

    assert Housekeeper(sessions, settings, clock=lambda: now).delete_old() == 4
    with sessions() as session:
        keys = set(session.scalars(select(WebhookEvent.dedupe_key)))
    assert keys == {"old-failed", "old-unconfirmed", "recent"}


# --- With real commits: the command and the worker's pass ---------------------------------


def _live_failed_events(live_app: Flask, monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    client = live_app.test_client()
    bodies = [serve_callback(f"a-{i}", f"r-{i % 2}") for i in range(n)]
    _fail_callbacks(client, monkeypatch, *bodies)


def _count(engine: Engine, state: str) -> int:
    with engine.connect() as conn:
        found = conn.execute(
            select(func.count()).select_from(WebhookEvent).where(WebhookEvent.state == state)
        ).scalar_one()
    return int(found)


def test_replay_command_is_idempotent(
    live_app: Flask, live_url: str, live_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _live_failed_events(live_app, monkeypatch, 4)
    env = {"DATABASE_URL": live_url, "LOG_LEVEL": "WARNING"}
    runner = CliRunner()
    first = runner.invoke(main, ["replay"], env=env)
    assert first.exit_code == 0, first.output
    assert "replayed 4 failed event(s): 4 processed, 0 failed again" in first.output
    assert _count(live_engine, "processed") == 4
    with live_engine.connect() as conn:
        before = _snapshot(Session(conn))
    second = runner.invoke(main, ["replay"], env=env)
    assert second.exit_code == 0, second.output
    assert "replayed 0 failed event(s)" in second.output
    with live_engine.connect() as conn:
        assert _snapshot(Session(conn)) == before


def test_worker_pass_retries_due_failed_events(
    live_app: Flask, live_url: str, live_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _live_failed_events(live_app, monkeypatch, 3)
    with live_engine.begin() as conn:  # their backoff has ended
        conn.execute(text("UPDATE webhook_events SET next_attempt_at = now() - interval '1 s'"))
    settings = live_app.config["SETTINGS"]
    sessions = sessionmaker(live_engine, expire_on_commit=False)
    reconciler = Reconciler(sessions, client=None, settings=settings)  # type: ignore[arg-type]
    reconciler.housekeeping()
    assert _count(live_engine, "failed") == 0
    assert _count(live_engine, "processed") == 3
