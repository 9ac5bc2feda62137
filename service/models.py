"""The tables: renders, their hosted assets, stored callbacks and the shared Shotstack budget."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .db import Base, utcnow

ASSET_STATUSES = ("importing", "ready", "failed", "deleted")
ASSET_KINDS = ("video", "image", "audio", "poster", "thumbnail", "other")
RENDER_STATUSES = ("unknown", "done", "failed")
TRACKING_STATES = ("pending", "settled", "expired")
EVENT_STATES = ("processed", "rejected", "ignored", "failed", "unconfirmed")


class Source(enum.IntEnum):
    """Who last set an asset's status; on a timestamp tie a lookup beats a callback."""

    CALLBACK = 0
    LOOKUP = 1


def _one_of(column: str, values: tuple[str, ...]) -> CheckConstraint:
    listed = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({listed})", name=f"{column}_valid")


class Render(Base):
    __tablename__ = "renders"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="unknown")
    tracking: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_check_at: Mapped[datetime | None]
    settled_at: Mapped[datetime | None]
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_lookup_at: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(Text)
    lease_until: Mapped[datetime | None]

    assets: Mapped[list[Asset]] = relationship(
        back_populates="render", order_by="Asset.first_seen_at", lazy="raise_on_sql"
    )

    __table_args__ = (
        _one_of("status", RENDER_STATUSES),
        _one_of("tracking", TRACKING_STATES),
        # The worker's claim: due pending renders, soonest first.
        Index(
            "ix_renders_due",
            "next_check_at",
            postgresql_where=text("tracking = 'pending'"),
            sqlite_where=text("tracking = 'pending'"),
        ),
    )


class Asset(Base):
    __tablename__ = "assets"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    render_id: Mapped[str] = mapped_column(ForeignKey("renders.id"))
    owner: Mapped[str | None] = mapped_column(Text)
    region: Mapped[str | None] = mapped_column(Text)
    filename: Mapped[str | None] = mapped_column(Text)
    url: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    status_source: Mapped[int] = mapped_column(SmallInteger, default=Source.CALLBACK)
    kind: Mapped[str] = mapped_column(String(16))
    created: Mapped[datetime | None]
    updated: Mapped[datetime | None]
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_synced_at: Mapped[datetime | None]
    deleted_at: Mapped[datetime | None]
    deleted_by: Mapped[str | None] = mapped_column(Text)

    render: Mapped[Render] = relationship(back_populates="assets", lazy="raise_on_sql")

    __table_args__ = (
        _one_of("status", ASSET_STATUSES),
        _one_of("kind", ASSET_KINDS),
        # Keyset pagination, newest first, unfiltered and by each filter (SPEC §4).
        Index("ix_assets_seen", "first_seen_at", "id"),
        Index("ix_assets_status_seen", "status", "first_seen_at", "id"),
        Index("ix_assets_render_seen", "render_id", "first_seen_at", "id"),
        Index("ix_assets_kind_seen", "kind", "first_seen_at", "id"),
    )


class WebhookEvent(Base):
    """One stored callback, whatever it said; the dedupe key makes a redelivery a no-op."""

    __tablename__ = "webhook_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    dedupe_key: Mapped[str] = mapped_column(Text, unique=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    event_type: Mapped[str | None] = mapped_column(Text)
    event_action: Mapped[str | None] = mapped_column(Text)
    object_id: Mapped[str | None] = mapped_column(Text)
    object_status: Mapped[str | None] = mapped_column(Text)
    render_id: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    http_status: Mapped[int] = mapped_column(SmallInteger)
    payload: Mapped[dict[str, Any] | None]
    raw: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    processed_at: Mapped[datetime | None]

    __table_args__ = (
        _one_of("state", EVENT_STATES),
        Index("ix_webhook_events_received_at", "received_at"),
        # The worker's retry queue: failed events and callbacks awaiting confirmation.
        Index(
            "ix_webhook_events_retry",
            "next_attempt_at",
            postgresql_where=text("state IN ('failed', 'unconfirmed')"),
            sqlite_where=text("state IN ('failed', 'unconfirmed')"),
        ),
    )


class ShotstackBudget(Base):
    """The one row through which every process shares the rate limit and a 429 pause."""

    __tablename__ = "shotstack_budget"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    next_slot_at: Mapped[datetime | None]
    paused_until: Mapped[datetime | None]
    auth_error: Mapped[str | None] = mapped_column(Text)
    auth_error_at: Mapped[datetime | None]
