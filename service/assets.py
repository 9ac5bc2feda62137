"""Domain functions over renders and assets: upserts, status order, queries. Never commit."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast
from urllib.parse import urlsplit

from sqlalchemy import (
    ColumnElement,
    Insert,
    Integer,
    String,
    Text,
    and_,
    bindparam,
    case,
    exists,
    func,
    literal_column,
    not_,
    null,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from .db import UTCDateTime, insert_for
from .models import Asset, Render, Source

STATUS_RANK = {"importing": 0, "ready": 1, "failed": 1, "deleted": 2}
CALLBACK_STATUSES = ("importing", "ready", "failed")

_KIND_BY_EXTENSION = {
    **dict.fromkeys(("mp4", "mov", "webm"), "video"),
    **dict.fromkeys(("gif", "jpg", "jpeg", "png", "bmp"), "image"),
    **dict.fromkeys(("mp3", "wav", "m4a"), "audio"),
}


def kind_for(filename: str | None) -> str:
    """Tell what an asset is from its filename, as SPEC §4 defines `kind`."""
    name = (filename or "").lower()
    if "-poster." in name:
        return "poster"
    if "-thumb." in name:
        return "thumbnail"
    _, dot, extension = name.rpartition(".")
    return _KIND_BY_EXTENSION.get(extension, "other") if dot else "other"


def filename_from_url(url: str | None) -> str | None:
    """Return the last path segment of a URL, or None when it has none."""
    if not url:
        return None
    segment = urlsplit(url).path.rsplit("/", 1)[-1]
    return segment or None


@dataclass(frozen=True, slots=True)
class AssetFacts:
    """What a callback or a lookup says about one asset."""

    id: str
    render_id: str
    status: str
    owner: str | None = None
    region: str | None = None
    filename: str | None = None
    url: str | None = None
    created: datetime | None = None
    updated: datetime | None = None


def _earlier(a: ColumnElement[Any], b: ColumnElement[Any]) -> ColumnElement[Any]:
    """The earlier of two timestamps, a NULL counting as never (portable LEAST)."""
    return case((a.is_(None), b), (a < b, a), else_=b)


def _const(value: str | int) -> ColumnElement[Any]:
    """A constant written into the SQL, not bound: shorter statements that psycopg can cache."""
    if isinstance(value, int):
        return literal_column(str(value), Integer())
    return literal_column(f"'{value}'", String())


def _precedence(status: Any, updated: Any, source: Any) -> ColumnElement[Any]:
    """The order of SPEC §3: rank, then the newer timestamp, then a lookup, then `failed`.

    The rank (importing < ready = failed < deleted) is the pair (not importing, deleted). The
    last member only breaks a full tie between `ready` and `failed` from the same kind of
    source with equal or missing timestamps, so that the outcome never depends on arrival order.
    """
    stamp = func.coalesce(updated, literal_column("'1970-01-01 00:00:00+00'"))
    return tuple_(
        status != _const("importing"),
        status == _const("deleted"),
        stamp,
        source,
        status == _const("failed"),
    )


def _insert(dialect: str, table: Any) -> Any:
    """An INSERT that knows ON CONFLICT on this dialect (Postgres or SQLite)."""
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def dialect_of(session: Session) -> str:
    return session.get_bind().dialect.name


# The upserts below are built once per variant, with bound parameters, and then only executed:
# building one costs more CPU than a callback's whole round trip to Postgres (bench/).
_NOW = bindparam("now", type_=UTCDateTime())
_DUE = bindparam("due", type_=UTCDateTime())
_ASSET_ID = bindparam("asset_id", type_=Text())
_ASSET_COLUMNS = (
    "render_id",
    "owner",
    "region",
    "filename",
    "url",
    "status",
    "status_source",
    "kind",
    "created",
    "updated",
    "last_synced_at",
    "deleted_at",
)


@functools.cache
def _render_upsert(dialect: str, *, settles: bool, edit: bool, reopens: bool) -> Insert:
    """The upsert of track_render; parameters `render_id`, `render_status`, `now`, `due`.

    `reopens` adds the re-opening test on parameter `asset_id`, `edit` the status update from
    parameter `edit_status`.
    """
    r = Render.__table__.c
    render_id = bindparam("render_id", type_=Text())
    stmt = _insert(dialect, Render.__table__).values(
        id=render_id,
        status=bindparam("render_status", type_=String()),
        tracking=_const("settled" if settles else "pending"),
        attempts=_const(0),
        next_check_at=null() if settles else _DUE,
        settled_at=_NOW if settles else null(),
        first_seen_at=_NOW,
    )
    if settles:
        changes: dict[str, Any] = {
            "status": _const("failed"),
            "tracking": _const("settled"),
            "settled_at": func.coalesce(r.settled_at, _NOW),
            "next_check_at": null(),
        }
        return cast(Insert, stmt.on_conflict_do_update(index_elements=[r.id], set_=changes))
    pending = _const("pending")
    earlier = _earlier(r.next_check_at, _DUE)
    # The row is rewritten only when something changes: the second and later assets of a
    # render (its poster, its thumbnail) usually leave it as it is, and cost no new version.
    brought_forward = and_(
        r.tracking == pending, or_(r.next_check_at.is_(None), r.next_check_at > _DUE)
    )
    changed: list[ColumnElement[bool]] = [brought_forward]
    if reopens:
        reopen = and_(r.tracking != pending, not_(exists().where(Asset.id == _ASSET_ID)))
        changed.append(reopen)
        changes = {
            "tracking": case((reopen, pending), else_=r.tracking),
            "settled_at": case((reopen, null()), else_=r.settled_at),
            "attempts": case((reopen, _const(0)), else_=r.attempts),
            "next_check_at": case(
                (reopen, _DUE), (r.tracking == pending, earlier), else_=r.next_check_at
            ),
        }
    else:
        changes = {"next_check_at": case((r.tracking == pending, earlier), else_=r.next_check_at)}
    if edit:
        edit_status = bindparam("edit_status", type_=String())
        failed = _const("failed")
        changes["status"] = case((r.status == failed, failed), else_=edit_status)
        changed.append(and_(r.status != failed, r.status != edit_status))
    upsert = stmt.on_conflict_do_update(index_elements=[r.id], set_=changes, where=or_(*changed))
    return cast(Insert, upsert)


def _render_params(
    render_id: str, *, now: datetime, grace: float, edit_status: str | None
) -> dict[str, Any]:
    return {
        "render_id": render_id,
        "render_status": edit_status or "unknown",
        "edit_status": edit_status,
        "now": now,
        "due": now + timedelta(seconds=grace),
    }


# A write of this module: a statement built once and the parameters of one execution. The
# session functions below execute them; the webhook sends a callback's writes pipelined.
Write = tuple[Insert, dict[str, Any]]


def render_write(
    dialect: str,
    render_id: str,
    *,
    now: datetime,
    grace: float,
    edit_status: str | None = None,
    new_asset_id: str | None = None,
) -> Write:
    """The write of track_render, for a session on `dialect`."""
    stmt = _render_upsert(
        dialect,
        settles=edit_status == "failed",
        edit=edit_status is not None,
        reopens=new_asset_id is not None,
    )
    params = _render_params(render_id, now=now, grace=grace, edit_status=edit_status)
    params["asset_id"] = new_asset_id
    return stmt, params


def execute_writes(session: Session, writes: Sequence[Write]) -> None:
    """Execute writes in order on the session's connection."""
    # Core, not the ORM's execute: these statements load no objects (and cost less so).
    connection = session.connection()
    for stmt, params in writes:
        connection.execute(stmt, params)


def track_render(
    session: Session,
    render_id: str,
    *,
    now: datetime,
    grace: float,
    edit_status: str | None = None,
    new_asset_id: str | None = None,
) -> None:
    """Start tracking a render, or bring its first lookup forward to `now + grace`.

    `edit_status` comes from an edit callback: `failed` settles the render, `done` only records.
    `new_asset_id` names an asset being recorded: if it is not known yet, a settled or expired
    render is re-opened, since a lookup has not seen that asset.
    """
    write = render_write(
        dialect_of(session),
        render_id,
        now=now,
        grace=grace,
        edit_status=edit_status,
        new_asset_id=new_asset_id,
    )
    execute_writes(session, [write])


@functools.cache
def _asset_upsert(dialect: str, *, lookup: bool, with_render: bool) -> Insert:
    """The upsert of record_asset; parameters `asset_id`, `a_<column>` and `now`.

    With `with_render` (Postgres), the render's upsert rides along as a data-modifying CTE:
    one statement, one round trip. Both parts read the same snapshot, so the render's re-open
    test still sees the asset as it was before this statement.
    """
    table = Asset.__table__
    values: dict[str, Any] = {"id": _ASSET_ID, "first_seen_at": _NOW}
    values.update({c: bindparam(f"a_{c}", type_=table.c[c].type) for c in _ASSET_COLUMNS})
    stmt = _insert(dialect, table).values(values)
    old, new = table.c, stmt.excluded
    wins = _precedence(new.status, new.updated, new.status_source) > _precedence(
        old.status, old.updated, old.status_source
    )

    def fill(name: str) -> ColumnElement[Any]:
        ours, theirs = old[name], new[name]
        return func.coalesce(theirs, ours) if lookup else func.coalesce(ours, theirs)

    changes: dict[str, Any] = {
        name: fill(name) for name in ("owner", "region", "filename", "url", "created")
    }
    # The kind follows the filename that is kept: a lookup's own, else a callback's first.
    keeps_new = new.filename.is_not(None) if lookup else old.filename.is_(None)
    changes["kind"] = case((keeps_new, new.kind), else_=old.kind)
    changes["status"] = case((wins, new.status), else_=old.status)
    changes["updated"] = case((wins, new.updated), else_=old.updated)
    changes["status_source"] = case((wins, new.status_source), else_=old.status_source)
    if lookup:
        changes["last_synced_at"] = new.last_synced_at
        changes["deleted_at"] = case(
            (and_(wins, new.status == _const("deleted")), func.coalesce(old.deleted_at, _NOW)),
            else_=old.deleted_at,
        )
    upsert: Insert = stmt.on_conflict_do_update(index_elements=[old.id], set_=changes)
    if with_render:
        render = _render_upsert(dialect, settles=False, edit=False, reopens=True)
        upsert = upsert.add_cte(render.returning(Render.__table__.c.id).cte("tracked"))
    return upsert


def asset_writes(
    dialect: str, facts: AssetFacts, *, source: Source, now: datetime, grace: float
) -> list[Write]:
    """The writes of record_asset, for a session on `dialect`."""
    if source is Source.CALLBACK and facts.status not in CALLBACK_STATUSES:
        raise ValueError(f"a callback cannot set status {facts.status!r}")
    # SQLite has no data-modifying CTE: there the render goes first, in its own statement.
    with_render = dialect == "postgresql"
    writes = (
        []
        if with_render
        else [render_write(dialect, facts.render_id, now=now, grace=grace, new_asset_id=facts.id)]
    )
    filename = facts.filename or filename_from_url(facts.url)
    lookup = source is Source.LOOKUP
    params = _render_params(facts.render_id, now=now, grace=grace, edit_status=None)
    params.update(
        asset_id=facts.id,
        a_render_id=facts.render_id,
        a_owner=facts.owner,
        a_region=facts.region,
        a_filename=filename,
        a_url=facts.url,
        a_status=facts.status,
        a_status_source=int(source),
        a_kind=kind_for(filename),
        a_created=facts.created or (None if lookup else facts.updated),
        a_updated=facts.updated,
        a_last_synced_at=now if lookup else None,
        a_deleted_at=now if facts.status == "deleted" else None,
    )
    writes.append((_asset_upsert(dialect, lookup=lookup, with_render=with_render), params))
    return writes


def record_asset(
    session: Session, facts: AssetFacts, *, source: Source, now: datetime, grace: float
) -> None:
    """Insert or update an asset so that its status only moves as SPEC §3 orders it.

    Also tracks its render, re-opening it when the asset is new. A lookup fills what it knows
    over what callbacks said; a callback only fills what is still empty.
    """
    writes = asset_writes(dialect_of(session), facts, source=source, now=now, grace=grace)
    execute_writes(session, writes)


def settles(found: Sequence[AssetFacts]) -> bool:
    """Tell whether a lookup by render id settles its render (SPEC §5).

    It must list at least one asset, and none of them still `importing`.
    """
    return bool(found) and all(facts.status != "importing" for facts in found)


def settle_render(
    session: Session, render_id: str, found: Sequence[AssetFacts], *, now: datetime
) -> bool:
    """Settle a pending render that nobody holds, after a lookup that settles it.

    For lookups made outside the worker (the API's fallback): a render leased by a worker
    is left to that worker. An asset recorded here that the lookup did not list arrived
    during the call, so the render stays pending for the worker's next lookup.
    """
    if not settles(found):
        return False
    listed = [facts.id for facts in found]
    stmt = (
        update(Render)
        .where(
            Render.id == render_id,
            Render.tracking == "pending",
            (Render.lease_until.is_(None)) | (Render.lease_until < now),
            not_(exists().where(Asset.render_id == render_id, Asset.id.not_in(listed))),
        )
        .values(tracking="settled", settled_at=now, next_check_at=None, last_error=None)
        .returning(Render.id)
        .execution_options(synchronize_session=False)
    )
    return session.execute(stmt).first() is not None


def mark_deleted(session: Session, asset_id: str, *, by: str, now: datetime) -> None:
    """Record our own successful delete at Shotstack; `deleted` is final."""
    session.execute(
        update(Asset)
        .where(Asset.id == asset_id, Asset.status != "deleted")
        .values(status="deleted", deleted_at=now, deleted_by=by, last_synced_at=now)
    )


def create_render(session: Session, render_id: str, *, now: datetime, grace: float) -> bool:
    """Track a render named by an app; return True if it was not known."""
    stmt = (
        insert_for(session, Render)
        .values(
            id=render_id,
            status="unknown",
            tracking="pending",
            attempts=0,
            next_check_at=now + timedelta(seconds=grace),
            first_seen_at=now,
        )
        .on_conflict_do_nothing(index_elements=["id"])
        # RETURNING, not rowcount: SQLAlchemy keeps rowcount only for UPDATE and DELETE.
        .returning(Render.__table__.c.id)
    )
    return session.execute(stmt).scalar() is not None


@dataclass(frozen=True, slots=True)
class AssetFilter:
    """The filters of `GET /api/assets`; None or empty means no filter."""

    statuses: Sequence[str] = ()
    kinds: Sequence[str] = ()
    render_id: str | None = None
    seen_after: datetime | None = None
    seen_before: datetime | None = None


def list_assets(
    session: Session,
    *,
    filters: AssetFilter,
    limit: int,
    after: tuple[datetime, str] | None = None,
) -> list[Asset]:
    """Return up to `limit` assets newest first by (first_seen_at, id), after a keyset cursor."""
    query = select(Asset)
    if filters.statuses:
        query = query.where(Asset.status.in_(filters.statuses))
    if filters.kinds:
        query = query.where(Asset.kind.in_(filters.kinds))
    if filters.render_id is not None:
        query = query.where(Asset.render_id == filters.render_id)
    if filters.seen_after is not None:
        query = query.where(Asset.first_seen_at > filters.seen_after)
    if filters.seen_before is not None:
        query = query.where(Asset.first_seen_at < filters.seen_before)
    if after is not None:
        query = query.where(tuple_(Asset.first_seen_at, Asset.id) < tuple_(*after))
    query = query.order_by(Asset.first_seen_at.desc(), Asset.id.desc()).limit(limit)
    return list(session.scalars(query))


def render_assets(session: Session, render_id: str) -> list[Asset]:
    """Return the assets known for a render, oldest first."""
    query = (
        select(Asset).where(Asset.render_id == render_id).order_by(Asset.first_seen_at, Asset.id)
    )
    return list(session.scalars(query))
