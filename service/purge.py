"""`asset-tracker purge`: delete old `ready`/`failed` assets through the Serve API (SPEC §6).

Each asset is deleted at Shotstack with no transaction open, then marked `deleted` in its own
short transaction, committed at once. A run cut short (even by SIGKILL) and started again
therefore skips everything recorded as deleted; the one asset that was in flight is deleted at
Shotstack a second time, which is harmless (204, or a 404 the client takes as done).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select, tuple_
from sqlalchemy.orm import Session, sessionmaker

from .assets import mark_deleted
from .db import utcnow
from .logs import request_id
from .models import Asset
from .shotstack import (
    ServeClient,
    ShotstackAuthError,
    ShotstackError,
    ShotstackNotConfigured,
    ShotstackRateLimited,
    ShotstackUnavailable,
)

log = logging.getLogger(__name__)

PURGEABLE = ("ready", "failed")
BATCH = 200
DELETED_BY = "purge"
# A 429 (or a pause another process met) makes the purge wait, this many times per asset at
# most, before it counts the asset as failed and goes on.
RATE_LIMITED_TRIES = 5


def cutoff(days: float, *, now: datetime | None = None) -> datetime:
    """The first-seen time before which an asset is old enough to purge."""
    return (now or utcnow()) - timedelta(days=days)


def count_purgeable(session: Session, *, before: datetime) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(Asset)
            .where(Asset.status.in_(PURGEABLE), Asset.first_seen_at < before)
        )
        or 0
    )


def purgeable(
    session: Session, *, before: datetime, after: tuple[datetime, str] | None, limit: int
) -> list[tuple[datetime, str]]:
    """Return up to `limit` (first_seen_at, id) of purgeable assets, oldest first, after a key."""
    query = (
        select(Asset.first_seen_at, Asset.id)
        .where(Asset.status.in_(PURGEABLE), Asset.first_seen_at < before)
        .order_by(Asset.first_seen_at, Asset.id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(tuple_(Asset.first_seen_at, Asset.id) > tuple_(*after))
    return [(row[0], row[1]) for row in session.execute(query)]


def iter_purgeable(
    sessions: sessionmaker[Session], *, before: datetime, batch: int = BATCH
) -> Iterator[str]:
    """Yield the ids of purgeable assets, a batch read at a time in its own transaction.

    An asset deleted by someone else meanwhile is not yielded once its batch is read after.
    """
    after: tuple[datetime, str] | None = None
    while True:
        with sessions() as session, session.begin():
            rows = purgeable(session, before=before, after=after, limit=batch)
        for _, asset_id in rows:
            yield asset_id
        if len(rows) < batch:
            return
        after = rows[-1]


@dataclass
class PurgeReport:
    deleted: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def purge(
    sessions: sessionmaker[Session],
    client: ServeClient,
    *,
    before: datetime,
    by: str = DELETED_BY,
    on_asset: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> PurgeReport:
    """Delete every purgeable asset first seen before `before`; commit each as it is done.

    The client keeps to the deployment's rate budget. A Shotstack failure of one asset is
    reported and the purge goes on; a key or environment problem stops it (it would fail
    for every asset).
    """
    report = PurgeReport()
    for asset_id in iter_purgeable(sessions, before=before):
        with request_id(f"purge-{asset_id}"[:128]):
            try:
                _delete_one(client, asset_id, sleep)
            except (ShotstackAuthError, ShotstackNotConfigured):
                raise  # it would fail for every asset
            except ShotstackError as exc:  # 5xx, timeout, or an answer such as 400/409
                report.failed[asset_id] = str(exc)
                log.warning("asset %s not purged: %s", asset_id, exc)
            else:
                with sessions() as session, session.begin():
                    mark_deleted(session, asset_id, by=by, now=utcnow())
                report.deleted.append(asset_id)
                log.info("asset purged", extra={"asset_id": asset_id})
        if on_asset is not None:
            on_asset(asset_id)
    return report


def _delete_one(client: ServeClient, asset_id: str, sleep: Callable[[float], None]) -> None:
    for tries in range(1, RATE_LIMITED_TRIES + 1):
        try:
            client.delete_asset(asset_id)
            return
        except ShotstackRateLimited as exc:
            if tries == RATE_LIMITED_TRIES:
                raise ShotstackUnavailable(f"still rate-limited after {tries} tries") from exc
            log.warning("rate-limited; purge waits %.1f s", exc.retry_after)
            sleep(max(exc.retry_after, 0.1))
