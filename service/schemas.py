"""Pydantic models: the one schema layer for callbacks, query parameters and documents.

The same models validate what comes in, shape what goes out and generate the OpenAPI document.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)

AssetStatus = Literal["importing", "ready", "failed", "deleted"]
AssetKind = Literal["video", "image", "audio", "poster", "thumbnail", "other"]
# No control character: Postgres text cannot hold a NUL, a newline cannot go in a Location
# header (it was a 500), and no Shotstack id has one. No `/` either: the id is one segment
# of /api/renders/{id}, and a render "a/b" could never be read back.
ShotstackId = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=255, strip_whitespace=True, pattern=r"^[^\x00-\x1f\x7f/]*$"
    ),
]


def _as_utc(value: datetime) -> datetime:
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00 is a year 0 in UTC
        raise ValueError("the time is out of range in UTC") from None


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",")]
    return value


Timestamp = Annotated[datetime, AfterValidator(_as_utc)]

# An offset's `+` written plainly in a URL (`...T00:00:00+01:00`) reaches us as a space.
_SPACED_OFFSET = re.compile(r"(\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?) (\d{2}(?::?\d{2})?)$")


def _plus_back(value: Any) -> Any:
    return _SPACED_OFFSET.sub(r"\1+\2", value) if isinstance(value, str) else value


QueryTimestamp = Annotated[Timestamp, BeforeValidator(_plus_back)]


# --- Callbacks from Shotstack (SPEC §3) -----------------------------------------------------


def _absent_if_unreadable(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Read a field that a callback can do without as absent when it cannot be read.

    Its text stays in the stored event; the callback is not refused for it (SPEC §3 refuses
    only a known callback without a required field).
    """
    try:
        return handler(value)
    except ValidationError:
        return None


Lenient = WrapValidator(_absent_if_unreadable)


class Callback(BaseModel):
    """Fields common to both known callbacks; unknown extra fields are kept."""

    model_config = ConfigDict(extra="allow")

    id: ShotstackId
    status: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    owner: Annotated[str | None, Lenient] = None
    # Not lenient: the URL tells whose copy this is (ours on the CDN, or an S3 or Mux one).
    url: str | None = None
    error: Any = None
    completed: Annotated[Timestamp | None, Lenient] = None


class EditCallback(Callback):
    type: Literal["edit"]
    action: Literal["render"]


class ServeCallback(Callback):
    type: Literal["serve"]
    action: Literal["copy"]
    render: ShotstackId
    filename: Annotated[str | None, Lenient] = None
    updated: Annotated[Timestamp | None, Lenient] = None


class WebhookAnswer(BaseModel):
    """The body of a 200 to Shotstack."""

    outcome: Literal["processed", "ignored", "unconfirmed", "failed", "duplicate"]


# --- JSON:API documents (SPEC §4) ---------------------------------------------------------


class ErrorSource(BaseModel):
    parameter: str | None = None
    pointer: str | None = None
    header: str | None = None


class ErrorObject(BaseModel):
    status: str
    code: str
    title: str
    detail: str
    source: ErrorSource | None = None


class ErrorDocument(BaseModel):
    errors: list[ErrorObject]


class AssetAttributes(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    renderId: str
    owner: str | None
    region: str | None
    filename: str | None
    url: str | None
    status: AssetStatus
    kind: AssetKind
    created: datetime | None
    updated: datetime | None
    firstSeenAt: datetime
    lastSyncedAt: datetime | None
    deletedAt: datetime | None
    deletedBy: str | None


class SelfLink(BaseModel):
    self: str


class AssetResource(BaseModel):
    type: Literal["assets"] = "assets"
    id: str
    attributes: AssetAttributes
    links: SelfLink


class ResourceIdentifier(BaseModel):
    type: str
    id: str


class AssetsRelationship(BaseModel):
    data: list[ResourceIdentifier]


class RenderRelationships(BaseModel):
    assets: AssetsRelationship


class RenderAttributes(BaseModel):
    status: Literal["unknown", "done", "failed"]
    tracking: Literal["pending", "settled", "expired"]
    attempts: int
    lastError: str | None
    nextCheckAt: datetime | None
    settledAt: datetime | None
    firstSeenAt: datetime


class RenderResource(BaseModel):
    type: Literal["renders"] = "renders"
    id: str
    attributes: RenderAttributes
    relationships: RenderRelationships
    links: SelfLink


class PageLinks(BaseModel):
    self: str
    next: str | None


class AssetDocument(BaseModel):
    data: AssetResource


class AssetListDocument(BaseModel):
    data: list[AssetResource]
    links: PageLinks


class RenderDocument(BaseModel):
    data: RenderResource


class RenderAssetsDocument(BaseModel):
    data: list[AssetResource]
    links: SelfLink


class NewRender(BaseModel):
    type: Literal["renders"]
    id: ShotstackId


class NewRenderDocument(BaseModel):
    """`POST /api/renders`: JSON:API lets a document carry more; only `data` is read."""

    data: NewRender


# --- Query parameters ---------------------------------------------------------------------

MAX_PAGE_SIZE = 500


class ListAssetsQuery(BaseModel):
    """The query of `GET /api/assets`; an unknown parameter is an error."""

    model_config = ConfigDict(extra="forbid", populate_by_name=False)

    status: Annotated[
        list[AssetStatus] | None, BeforeValidator(_comma_list), Field(alias="filter[status]")
    ] = None
    kind: Annotated[
        list[AssetKind] | None, BeforeValidator(_comma_list), Field(alias="filter[kind]")
    ] = None
    render_id: Annotated[ShotstackId | None, Field(alias="filter[renderId]")] = None
    seen_after: Annotated[QueryTimestamp | None, Field(alias="filter[seenAfter]")] = None
    seen_before: Annotated[QueryTimestamp | None, Field(alias="filter[seenBefore]")] = None
    page_size: Annotated[int, Field(alias="page[size]", ge=1, le=MAX_PAGE_SIZE)] = 50
    page_after: Annotated[str | None, Field(alias="page[after]", min_length=1)] = None


class AssetQuery(BaseModel):
    """The query of `GET /api/assets/{id}`."""

    model_config = ConfigDict(extra="forbid")

    refresh: bool = False
