"""The domain functions of service.assets: kind, filename, status order, renders, the list query."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import psycopg.sql
import pytest
from sqlalchemy import Connection, Engine, event, select
from sqlalchemy.orm import Session

from service.assets import (
    AssetFacts,
    AssetFilter,
    create_render,
    filename_from_url,
    kind_for,
    list_assets,
    mark_deleted,
    record_asset,
    render_assets,
    track_render,
)
from service.db import make_engine
from service.models import Asset, Render, Source

from .conftest import migrate

T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
GRACE = 60.0


@pytest.mark.parametrize(
    ("filename", "kind"),
    [
        ("r-1.mp4", "video"),
        ("r-1.MOV", "video"),
        ("clip.webm", "video"),
        ("r-1-poster.jpg", "poster"),
        ("r-1-POSTER.png", "poster"),
        ("r-1-thumb.jpg", "thumbnail"),
        ("r-1-thumb.png", "thumbnail"),
        ("poster.jpg", "image"),  # `-poster.` is the marker, not the word
        ("r-1-thumbnail.jpg", "image"),
        ("r-1.gif", "image"),
        ("r-1.jpeg", "image"),
        ("r-1.bmp", "image"),
        ("r-1.mp3", "audio"),
        ("r-1.wav", "audio"),
        ("r-1.m4a", "audio"),
        ("r-1.m3u8", "other"),
        ("r-1", "other"),
        ("r-1.", "other"),
        (".mp4", "video"),
        ("archive.tar.gz", "other"),
        ("", "other"),
        (None, "other"),
    ],
)
def test_kind_for(filename: str | None, kind: str) -> None:
    assert kind_for(filename) == kind


@pytest.mark.parametrize(
    ("url", "filename"),
    [
        ("https://cdn.shotstack.io/au/v1/owner/r-1.mp4", "r-1.mp4"),
        ("https://cdn.shotstack.io/au/v1/owner/r-1-poster.jpg?x=1#y", "r-1-poster.jpg"),
        ("https://cdn.shotstack.io/au/v1/owner/", None),
        ("https://cdn.shotstack.io", None),
        ("", None),
        (None, None),
    ],
)
def test_filename_from_url(url: str | None, filename: str | None) -> None:
    assert filename_from_url(url) == filename


# --- On Postgres, inside the test's transaction ----------------------------------------------


@pytest.fixture
def session(connection: Connection) -> Iterator[Session]:
    with Session(bind=connection, join_transaction_mode="create_savepoint") as session:
        yield session


def _record(
    session: Session,
    asset_id: str,
    status: str,
    *,
    updated: datetime | None = None,
    source: Source = Source.CALLBACK,
    now: datetime = T0,
    **facts: Any,
) -> Asset:
    record_asset(
        session,
        AssetFacts(
            id=asset_id,
            render_id=facts.pop("render_id", "r-1"),
            status=status,
            updated=updated,
            **facts,
        ),
        source=source,
        now=now,
        grace=GRACE,
    )
    asset = session.execute(
        select(Asset).where(Asset.id == asset_id).execution_options(populate_existing=True)
    ).scalar_one()
    return asset


def _render(session: Session, render_id: str = "r-1") -> Render:
    return session.execute(
        select(Render).where(Render.id == render_id).execution_options(populate_existing=True)
    ).scalar_one()


@pytest.mark.parametrize("first", [Source.CALLBACK, Source.LOOKUP])
def test_on_a_timestamp_tie_a_lookup_beats_a_callback(session: Session, first: Source) -> None:
    said = {Source.CALLBACK: "failed", Source.LOOKUP: "ready"}
    second = Source.LOOKUP if first is Source.CALLBACK else Source.CALLBACK
    _record(session, "a-1", said[first], updated=T0, source=first)
    asset = _record(session, "a-1", said[second], updated=T0, source=second)
    assert (asset.status, asset.status_source) == ("ready", Source.LOOKUP)


def test_a_newer_callback_beats_an_older_lookup(session: Session) -> None:
    _record(session, "a-1", "ready", updated=T0, source=Source.LOOKUP)
    asset = _record(session, "a-1", "failed", updated=T0 + timedelta(seconds=1))
    assert asset.status == "failed"


def test_a_lookup_without_a_timestamp_does_not_beat_a_timed_callback(session: Session) -> None:
    _record(session, "a-1", "failed", updated=T0)
    assert _record(session, "a-1", "ready", source=Source.LOOKUP).status == "failed"


@pytest.mark.parametrize("later", ["importing", "ready", "failed"])
def test_deleted_from_a_lookup_is_final(session: Session, later: str) -> None:
    _record(session, "a-1", "ready", updated=T0)
    deleted = _record(
        session, "a-1", "deleted", updated=T0, source=Source.LOOKUP, now=T0 + timedelta(1)
    )
    assert (deleted.status, deleted.deleted_at) == ("deleted", T0 + timedelta(1))
    for source in (Source.CALLBACK, Source.LOOKUP):
        asset = _record(
            session,
            "a-1",
            later,
            updated=T0 + timedelta(days=9),
            source=source,
            now=T0 + timedelta(2),
        )
        assert (asset.status, asset.deleted_at) == ("deleted", T0 + timedelta(1))


def test_a_callback_cannot_set_deleted(session: Session) -> None:
    with pytest.raises(ValueError, match="deleted"):
        _record(session, "a-1", "deleted")


def test_mark_deleted_is_final_and_names_the_caller(session: Session) -> None:
    _record(session, "a-1", "ready")
    mark_deleted(session, "a-1", by="ci", now=T0 + timedelta(1))
    mark_deleted(session, "a-1", by="other", now=T0 + timedelta(2))
    asset = _record(session, "a-1", "ready", updated=T0 + timedelta(3), source=Source.LOOKUP)
    assert (asset.status, asset.deleted_by, asset.deleted_at) == (
        "deleted",
        "ci",
        T0 + timedelta(1),
    )


def test_a_lookup_fills_over_a_callback_and_a_callback_only_fills_gaps(session: Session) -> None:
    _record(session, "a-1", "importing", url="https://cdn.shotstack.io/au/stage/o/r-1.mp4")
    asset = _record(
        session,
        "a-1",
        "ready",
        source=Source.LOOKUP,
        updated=T0,
        created=T0 - timedelta(minutes=1),
        owner="o",
        region="au",
        filename="r-1.mp4",
        url="https://cdn.shotstack.io/au/stage/o/r-1.mp4?fresh",
        now=T0 + timedelta(seconds=5),
    )
    assert (asset.region, asset.owner, asset.created) == ("au", "o", T0 - timedelta(minutes=1))
    assert asset.url.endswith("?fresh")
    assert asset.last_synced_at == T0 + timedelta(seconds=5)
    assert asset.first_seen_at == T0  # never changes
    asset = _record(session, "a-1", "ready", owner="someone-else", url="https://x/y.mov")
    assert (asset.owner, asset.url.endswith("?fresh"), asset.kind) == ("o", True, "video")


def test_the_kind_follows_the_filename_a_lookup_brings(session: Session) -> None:
    asset = _record(session, "a-1", "ready", filename="r-1-thumb.png", url="https://x/r-1.mp4")
    assert (asset.filename, asset.kind) == ("r-1-thumb.png", "thumbnail")
    asset = _record(session, "a-1", "ready", source=Source.LOOKUP, updated=T0, filename="r-1.mp4")
    assert (asset.filename, asset.kind) == ("r-1.mp4", "video")
    asset = _record(session, "a-1", "ready", source=Source.LOOKUP, updated=T0)  # no filename
    assert (asset.filename, asset.kind) == ("r-1.mp4", "video")


def test_a_callback_timestamp_is_created_until_a_lookup_says(session: Session) -> None:
    asset = _record(session, "a-1", "ready", updated=T0)
    assert (asset.created, asset.updated) == (T0, T0)


def test_a_new_render_is_due_after_the_grace(session: Session) -> None:
    track_render(session, "r-1", now=T0, grace=GRACE)
    render = _render(session)
    assert (render.status, render.tracking, render.attempts) == ("unknown", "pending", 0)
    assert render.next_check_at == T0 + timedelta(seconds=GRACE)


def test_a_callback_brings_a_later_check_forward_but_never_pushes_it_back(
    session: Session,
) -> None:
    track_render(session, "r-1", now=T0, grace=3600)
    track_render(session, "r-1", now=T0, grace=GRACE, edit_status="done")
    assert _render(session).next_check_at == T0 + timedelta(seconds=GRACE)
    track_render(session, "r-1", now=T0 + timedelta(hours=1), grace=GRACE)
    render = _render(session)
    assert (render.status, render.next_check_at) == ("done", T0 + timedelta(seconds=GRACE))


def test_edit_failed_settles_and_a_late_done_keeps_it_failed(session: Session) -> None:
    track_render(session, "r-1", now=T0, grace=GRACE)
    track_render(session, "r-1", now=T0, grace=GRACE, edit_status="failed")
    track_render(session, "r-1", now=T0 + timedelta(1), grace=GRACE, edit_status="done")
    render = _render(session)
    assert (render.status, render.tracking, render.settled_at) == ("failed", "settled", T0)
    assert render.next_check_at is None


@pytest.mark.parametrize("state", ["settled", "expired"])
def test_a_new_asset_reopens_a_render_and_a_known_one_does_not(
    session: Session, state: str
) -> None:
    _record(session, "a-1", "ready")
    session.execute(
        Render.__table__.update().values(
            tracking=state, settled_at=T0, attempts=4, next_check_at=None
        )
    )
    _record(session, "a-1", "ready", updated=T0, now=T0 + timedelta(1))
    assert _render(session).tracking == state
    _record(session, "a-2", "ready", now=T0 + timedelta(1))
    render = _render(session)
    assert (render.tracking, render.settled_at, render.attempts) == ("pending", None, 0)
    assert render.next_check_at == T0 + timedelta(days=1, seconds=GRACE)


def test_create_render_says_whether_it_was_new(session: Session) -> None:
    assert create_render(session, "r-1", now=T0, grace=GRACE) is True
    assert create_render(session, "r-1", now=T0 + timedelta(1), grace=GRACE) is False
    assert _render(session).first_seen_at == T0


def test_render_assets_are_oldest_first(session: Session) -> None:
    for i, name in enumerate(["r-1.mp4", "r-1-poster.jpg", "r-1-thumb.jpg"]):
        _record(session, f"a-{i}", "ready", filename=name, now=T0 - timedelta(seconds=i))
    _record(session, "b-1", "ready", render_id="r-2")
    assert [a.kind for a in render_assets(session, "r-1")] == ["thumbnail", "poster", "video"]
    assert render_assets(session, "r-3") == []


def test_list_assets_filters_and_pages(session: Session) -> None:
    statuses = ["importing", "ready", "failed"]
    names = ["r.mp4", "r-poster.jpg", "r-thumb.jpg", "r.mp3"]
    for i in range(24):
        _record(
            session,
            f"a-{i:02d}",
            statuses[i % 3],
            render_id=f"r-{i % 2}",
            filename=names[i % 4],
            now=T0 + timedelta(minutes=i // 2),  # pairs share a time: the id breaks the tie
        )

    def ids(filters: AssetFilter, **kw: Any) -> list[str]:
        return [a.id for a in list_assets(session, filters=filters, limit=100, **kw)]

    everything = ids(AssetFilter())
    assert everything == [f"a-{i:02d}" for i in reversed(range(24))]
    assert ids(AssetFilter(statuses=["ready"])) == [x for x in everything if int(x[2:]) % 3 == 1]
    assert ids(AssetFilter(statuses=["ready", "failed"])) == [
        x for x in everything if int(x[2:]) % 3
    ]
    assert ids(AssetFilter(kinds=["poster", "audio"])) == [
        x for x in everything if int(x[2:]) % 4 in (1, 3)
    ]
    assert ids(AssetFilter(render_id="r-1")) == [x for x in everything if int(x[2:]) % 2]
    assert ids(AssetFilter(seen_after=T0 + timedelta(minutes=10))) == ["a-23", "a-22"]
    assert ids(AssetFilter(seen_before=T0 + timedelta(minutes=1))) == ["a-01", "a-00"]
    pages, after = [], None
    while True:
        page = list_assets(session, filters=AssetFilter(), limit=5, after=after)
        if not page:
            break
        pages.append([a.id for a in page])
        after = (page[-1].first_seen_at, page[-1].id)
    assert [x for p in pages for x in p] == everything
    assert [len(p) for p in pages] == [5, 5, 5, 5, 4]


# --- The plans of the list query at 100,000 assets --------------------------------------------

N_ASSETS = 100_000


@pytest.fixture(scope="module")
def plans_engine(pg_url: str) -> Iterator[Engine]:
    """A database of its own holding 100,000 assets, analyzed: no test's rollback touches it."""
    base, _, name = pg_url.rpartition("/")
    plain = base.replace("postgresql+psycopg://", "postgresql://")
    plans_name = f"{name}_plans"
    with psycopg.connect(f"{plain}/postgres", autocommit=True) as conn:
        known = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (plans_name,))
        if known.fetchone() is None:
            conn.execute(f'CREATE DATABASE "{plans_name}"')
    engine = make_engine(f"{base}/{plans_name}")
    migrate(engine)
    # The app's engine bounds each statement to 3 s; the bulk load gets its own connection.
    with psycopg.connect(f"{plain}/{plans_name}", autocommit=True) as conn:
        conn.execute(
            "INSERT INTO renders (id, status, tracking, attempts, first_seen_at)"
            " SELECT 'r-' || g, 'done', 'settled', 1, now()"
            " FROM generate_series(0, %s) AS g",
            (N_ASSETS // 3,),
        )
        conn.execute(
            "INSERT INTO assets (id, render_id, status, status_source, kind, filename,"
            " first_seen_at)"
            " SELECT 'a-' || lpad(g::text, 6, '0'), 'r-' || (g / 3),"
            "  (ARRAY['ready', 'ready', 'ready', 'failed', 'importing', 'deleted'])[1 + g %% 6],"
            "  0, (ARRAY['video', 'poster', 'thumbnail'])[1 + g %% 3], 'x',"
            "  timestamptz '2024-01-01' + (g / 2) * interval '1 second'"
            " FROM generate_series(0, %s) AS g",
            (N_ASSETS - 1,),
        )
        conn.execute("ANALYZE")
    yield engine
    engine.dispose()


def _captured_sql(engine: Engine, filters: AssetFilter, after: Any) -> tuple[str, dict[str, Any]]:
    """Run list_assets as the app does and return the one statement it sent."""
    sent: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with Session(engine) as session:
            rows = list_assets(session, filters=filters, limit=51, after=after)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert len(rows) > 0
    (statement,) = [s for s in sent if "FROM assets" in s[0]]
    return statement


def _explain(conn: Connection, statement: str, params: dict[str, Any], generic: bool) -> str:
    """EXPLAIN a statement as sent with its values, or as the generic plan of it prepared."""
    if not generic:
        rows = conn.exec_driver_sql("EXPLAIN " + statement, params)
        return "\n".join(row[0] for row in rows)
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    conn.exec_driver_sql("PREPARE list_probe AS " + re.sub(r"%\((\w+)\)s", number, statement))
    try:
        # EXECUTE inside EXPLAIN takes no bind parameters: the values go in as literals.
        raw = conn.connection.dbapi_connection
        args = ", ".join(psycopg.sql.Literal(params[name]).as_string(raw) for name in names)
        rows = conn.exec_driver_sql(f"EXPLAIN EXECUTE list_probe({args})")
        return "\n".join(row[0] for row in rows)
    finally:
        conn.exec_driver_sql("DEALLOCATE list_probe")


SEEN_MID = datetime(2024, 1, 1, 6, tzinfo=UTC)  # the middle of the 100,000 first_seen_at
PLAN_FILTERS = {
    "none": AssetFilter(),
    "status": AssetFilter(statuses=["failed"]),
    "status-common": AssetFilter(statuses=["ready"]),
    "statuses": AssetFilter(statuses=["ready", "failed"]),
    "renderId": AssetFilter(render_id="r-4242"),
    "kind": AssetFilter(kinds=["poster"]),
    "kinds": AssetFilter(kinds=["poster", "thumbnail"]),
    "seenAfter": AssetFilter(seen_after=SEEN_MID),
    "seenBefore": AssetFilter(seen_before=SEEN_MID),
    "all": AssetFilter(
        statuses=["ready"], kinds=["video"], seen_after=datetime(2024, 1, 1, tzinfo=UTC)
    ),
}


@pytest.mark.parametrize("generic", [False, True], ids=["custom-plan", "generic-plan"])
def test_every_list_query_uses_an_index_at_100k_assets(plans_engine: Engine, generic: bool) -> None:
    """EXPLAIN the exact SQL list_assets sends, first page and a cursor step, for each filter.

    The generic plan is the one Postgres may switch to once psycopg prepares the statement.
    """
    cursor = (datetime(2024, 1, 1, 9, tzinfo=UTC), "a-064800")
    checked = 0
    with plans_engine.connect() as conn:
        if generic:
            conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        for name, filters in PLAN_FILTERS.items():
            for after in (None, cursor):
                statement, params = _captured_sql(plans_engine, filters, after)
                plan = _explain(conn, statement, params, generic)
                assert "Seq Scan" not in plan, f"{name}, after={after}:\n{plan}"
                assert "ix_assets_" in plan or "pk_assets" in plan, plan
                checked += 1
    assert checked == 2 * len(PLAN_FILTERS)
