"""The thin JSON:API layer: error classes and handlers, the cursor codec, resource shapes."""

from __future__ import annotations

import base64
import binascii
import json
import logging
from datetime import datetime

from flask import Flask, Response
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from .models import Asset, Render
from .schemas import (
    AssetAttributes,
    AssetResource,
    AssetsRelationship,
    ErrorDocument,
    ErrorObject,
    ErrorSource,
    RenderAttributes,
    RenderRelationships,
    RenderResource,
    ResourceIdentifier,
    SelfLink,
)

MEDIA_TYPE = "application/vnd.api+json"
log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as a JSON:API error document."""

    status = 400
    code = "bad_request"
    title = "Bad request"

    def __init__(
        self,
        detail: str,
        *,
        parameter: str | None = None,
        pointer: str | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
        code: str | None = None,
        title: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.parameter, self.pointer = parameter, pointer
        self.headers = headers or {}
        self.status = status or self.status
        self.code = code or self.code
        self.title = title or self.title

    def to_object(self) -> ErrorObject:
        source = None
        if self.parameter or self.pointer:
            source = ErrorSource(parameter=self.parameter, pointer=self.pointer)
        return ErrorObject(
            status=str(self.status),
            code=self.code,
            title=self.title,
            detail=self.detail,
            source=source,
        )


class ApiErrors(Exception):
    """Several errors of one request (every invalid parameter), answered in one document."""

    def __init__(self, errors: list[ApiError]) -> None:
        super().__init__("; ".join(e.detail for e in errors))
        self.errors = errors


class Unauthorized(ApiError):
    status, code, title = 401, "unauthorized", "Unauthorized"


class NotFound(ApiError):
    status, code, title = 404, "not_found", "Not found"


class Conflict(ApiError):
    status, code, title = 409, "conflict", "Conflict"


class Unavailable(ApiError):
    status, code, title = 503, "unavailable", "Service unavailable"


def document(
    model: BaseModel, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """Answer a pydantic document as `application/vnd.api+json`."""
    body = model.model_dump_json(exclude_none=False)
    return Response(body, status=status, headers=headers, mimetype=MEDIA_TYPE)


def error_response(*errors: ApiError) -> Response:
    doc = ErrorDocument(errors=[e.to_object() for e in errors])
    headers: dict[str, str] = {}
    for e in errors:
        headers.update(e.headers)
    body = doc.model_dump_json(exclude_none=True)
    return Response(body, status=errors[0].status, headers=headers, mimetype=MEDIA_TYPE)


def validation_errors(exc: ValidationError, *, in_query: bool) -> list[ApiError]:
    """Turn pydantic's errors into JSON:API errors naming the parameter or JSON pointer."""
    found = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = [str(part) for part in error["loc"]]
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown parameter" if in_query else "unknown member"
        if in_query:
            name = loc[0] if loc else None
            found.append(ApiError(f"{name}: {message}", parameter=name, code="invalid_parameter"))
        else:
            pointer = "/" + "/".join(loc)
            found.append(
                ApiError(f"{pointer}: {message}", pointer=pointer, code="invalid_document")
            )
    return found


# --- The cursor of GET /api/assets --------------------------------------------------------


def encode_cursor(seen: datetime, asset_id: str) -> str:
    raw = json.dumps([seen.isoformat(), asset_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Read a cursor made by encode_cursor; raise ApiError naming `page[after]` otherwise."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        seen, asset_id = json.loads(raw)
        when = datetime.fromisoformat(seen)
        if when.tzinfo is None or not isinstance(asset_id, str) or "\x00" in asset_id:
            raise ValueError
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise ApiError(
            "page[after]: not a cursor this service gave",
            parameter="page[after]",
            code="invalid_parameter",
        ) from None
    return when, asset_id


# --- Resources ----------------------------------------------------------------------------


def asset_resource(asset: Asset) -> AssetResource:
    return AssetResource(
        id=asset.id,
        attributes=AssetAttributes(
            renderId=asset.render_id,
            owner=asset.owner,
            region=asset.region,
            filename=asset.filename,
            url=asset.url,
            status=asset.status,
            kind=asset.kind,
            created=asset.created,
            updated=asset.updated,
            firstSeenAt=asset.first_seen_at,
            lastSyncedAt=asset.last_synced_at,
            deletedAt=asset.deleted_at,
            deletedBy=asset.deleted_by,
        ),
        links=SelfLink(self=f"/api/assets/{asset.id}"),
    )


def render_resource(render: Render, asset_ids: list[str]) -> RenderResource:
    return RenderResource(
        id=render.id,
        attributes=RenderAttributes(
            status=render.status,
            tracking=render.tracking,
            attempts=render.attempts,
            lastError=render.last_error,
            nextCheckAt=render.next_check_at,
            settledAt=render.settled_at,
            firstSeenAt=render.first_seen_at,
        ),
        relationships=RenderRelationships(
            assets=AssetsRelationship(
                data=[ResourceIdentifier(type="assets", id=i) for i in asset_ids]
            )
        ),
        links=SelfLink(self=f"/api/renders/{render.id}"),
    )


# --- Handlers: every error of the app comes out as JSON -----------------------------------


def _database_unavailable(exc: Exception) -> bool:
    if isinstance(exc, PoolTimeout):
        return True
    return isinstance(exc, OperationalError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


def init_app(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc)

    @app.errorhandler(ApiErrors)
    def _api_errors(exc: ApiErrors) -> Response:
        return error_response(*exc.errors)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        error = ApiError(
            exc.description or exc.name,
            status=status,
            code=exc.name.lower().replace(" ", "_"),
            title=exc.name,
        )
        response = error_response(error)
        if status == 405 and exc.response is None:
            allowed = getattr(exc, "valid_methods", None)
            if allowed:
                response.headers["Allow"] = ", ".join(allowed)
        return response

    @app.errorhandler(Exception)
    def _crash(exc: Exception) -> Response:
        if _database_unavailable(exc):
            log.warning("database unavailable: %s", type(exc).__name__)
            return error_response(
                Unavailable("the database is unavailable; try again", headers={"Retry-After": "5"})
            )
        log.exception("unhandled error")
        return error_response(
            ApiError(
                "an unexpected error happened; it is logged",
                status=500,
                code="internal_error",
                title="Internal server error",
            )
        )
