"""Domain functions over renders and assets: upserts, status order, queries. Never commit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import (
    ColumnElement,
    and_,
    case,
    exists,
    func,
    literal,
    not_,
    select,
    tuple_,
    update,
)
from sqlalchemy.orm import Session

from .db import UTCDateTime, insert_for
from .models import Asset, Render, Source

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
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


def _rank(status: ColumnElement[Any]) -> ColumnElement[Any]:
    return case({s: r for s, r in STATUS_RANK.items()}, value=status, else_=-1)


def _precedence(status: Any, updated: Any, source: Any) -> ColumnElement[Any]:
    """The order of SPEC §3: rank, then the newer timestamp, then a lookup, then `failed`.

    The last member only breaks a full tie between `ready` and `failed` from the same kind of
    source with equal or missing timestamps, so that the outcome never depends on arrival order.
    """
    stamp = func.coalesce(updated, literal(EPOCH, UTCDateTime))
    return tuple_(_rank(status), stamp, source, case((status == "failed", 1), else_=0))


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
    due = now + timedelta(seconds=grace)
    settles = edit_status == "failed"
    r = Render.__table__.c
    values: dict[str, Any] = {
        "id": render_id,
        "status": edit_status or "unknown",
        "tracking": "settled" if settles else "pending",
        "attempts": 0,
        "next_check_at": None if settles else due,
        "settled_at": now if settles else None,
        "first_seen_at": now,
    }
    stmt = insert_for(session, Render).values(**values)
    if settles:
        changes: dict[str, Any] = {
            "status": "failed",
            "tracking": "settled",
            "settled_at": func.coalesce(r.settled_at, now),
            "next_check_at": None,
        }
    else:
        reopen: ColumnElement[bool] = literal(False)
        if new_asset_id is not None:
            reopen = and_(r.tracking != "pending", not_(exists().where(Asset.id == new_asset_id)))
        changes = {
            "tracking": case((reopen, "pending"), else_=r.tracking),
            "settled_at": case((reopen, None), else_=r.settled_at),
            "attempts": case((reopen, 0), else_=r.attempts),
            "next_check_at": case(
                (reopen, due),
                (r.tracking == "pending", _earlier(r.next_check_at, literal(due, UTCDateTime))),
                else_=r.next_check_at,
            ),
        }
        if edit_status is not None:
            changes["status"] = case((r.status == "failed", "failed"), else_=edit_status)
    session.execute(stmt.on_conflict_do_update(index_elements=[r.id], set_=changes))


def record_asset(
    session: Session, facts: AssetFacts, *, source: Source, now: datetime, grace: float
) -> None:
    """Insert or update an asset so that its status only moves as SPEC §3 orders it.

    Also tracks its render, re-opening it when the asset is new. A lookup fills what it knows
    over what callbacks said; a callback only fills what is still empty.
    """
    if source is Source.CALLBACK and facts.status not in CALLBACK_STATUSES:
        raise ValueError(f"a callback cannot set status {facts.status!r}")
    track_render(session, facts.render_id, now=now, grace=grace, new_asset_id=facts.id)

    filename = facts.filename or filename_from_url(facts.url)
    lookup = source is Source.LOOKUP
    values = {
        "id": facts.id,
        "render_id": facts.render_id,
        "owner": facts.owner,
        "region": facts.region,
        "filename": filename,
        "url": facts.url,
        "status": facts.status,
        "status_source": int(source),
        "kind": kind_for(filename),
        "created": facts.created or (None if lookup else facts.updated),
        "updated": facts.updated,
        "first_seen_at": now,
        "last_synced_at": now if lookup else None,
        "deleted_at": now if facts.status == "deleted" else None,
    }
    stmt = insert_for(session, Asset).values(**values)
    old, new = Asset.__table__.c, stmt.excluded
    wins = _precedence(new.status, new.updated, new.status_source) > _precedence(
        old.status, old.updated, old.status_source
    )

    def fill(name: str) -> ColumnElement[Any]:
        ours, theirs = old[name], new[name]
        return func.coalesce(theirs, ours) if lookup else func.coalesce(ours, theirs)

    changes: dict[str, Any] = {
        name: fill(name) for name in ("owner", "region", "filename", "url", "created")
    }
    changes["kind"] = case((old.filename.is_(None), new.kind), else_=old.kind)
    changes["status"] = case((wins, new.status), else_=old.status)
    changes["updated"] = case((wins, new.updated), else_=old.updated)
    changes["status_source"] = case((wins, new.status_source), else_=old.status_source)
    if lookup:
        changes["last_synced_at"] = new.last_synced_at
        changes["deleted_at"] = case(
            (and_(wins, new.status == "deleted"), func.coalesce(old.deleted_at, now)),
            else_=old.deleted_at,
        )
    session.execute(stmt.on_conflict_do_update(index_elements=[old.id], set_=changes))


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
