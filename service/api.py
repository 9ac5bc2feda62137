"""The internal REST API, `/api/...`: JSON:API documents behind named bearer keys (SPEC §4)."""

from __future__ import annotations

import hmac
from typing import Any, TypeVar
from urllib.parse import urlencode

from flask import Blueprint, Flask, Response, current_app, g, request
from pydantic import BaseModel, ValidationError
from sqlalchemy import select

from . import assets as domain
from .config import Settings
from .db import get_session, utcnow
from .jsonapi import (
    ApiError,
    NotFound,
    Unauthorized,
    asset_resource,
    decode_cursor,
    document,
    encode_cursor,
    error_response,
    render_resource,
    validation_errors,
)
from .models import Asset, Render
from .schemas import (
    AssetDocument,
    AssetListDocument,
    AssetQuery,
    ListAssetsQuery,
    NewRenderDocument,
    PageLinks,
    RenderAssetsDocument,
    RenderDocument,
    SelfLink,
)

bp = Blueprint("api", __name__, url_prefix="/api")
Q = TypeVar("Q", bound=BaseModel)
ACCEPTED_BODY_TYPES = ("application/vnd.api+json", "application/json")


@bp.before_request
def authenticate() -> None:
    """Let in a request that carries a configured bearer key; remember the key's name."""
    settings: Settings = current_app.config["SETTINGS"]
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    name = None
    if scheme.lower() == "bearer" and token:
        given = token.strip().encode()
        for key_name, secret in settings.api_keys.items():
            if hmac.compare_digest(given, secret.get_secret_value().encode()):
                name = key_name
    if name is None:
        raise Unauthorized(
            "send Authorization: Bearer <token> with a key of API_KEYS",
            headers={"WWW-Authenticate": 'Bearer realm="asset-tracker"'},
        )
    g.api_key_name = name


def parse_query(model: type[Q]) -> Q:
    """Validate the query string with a pydantic model; a repeated parameter is an error."""
    args: dict[str, Any] = {}
    for name in request.args:
        values = request.args.getlist(name)
        if len(values) > 1:
            raise ApiError(
                f"{name}: given more than once", parameter=name, code="invalid_parameter"
            )
        args[name] = values[0]
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        errors = validation_errors(exc, in_query=True)
        raise errors[0] from None


def parse_body(model: type[Q]) -> Q:
    """Validate a JSON:API request document; 415 for another media type."""
    if request.mimetype not in ACCEPTED_BODY_TYPES:
        raise ApiError(
            f"send the document as {ACCEPTED_BODY_TYPES[0]}",
            status=415,
            code="unsupported_media_type",
            title="Unsupported media type",
        )
    try:
        return model.model_validate_json(request.get_data())
    except ValidationError as exc:
        errors = validation_errors(exc, in_query=False)
        raise errors[0] from None


def _asset_or_404(asset_id: str) -> Asset:
    asset = get_session().get(Asset, asset_id)
    if asset is None:
        raise NotFound(f"no asset {asset_id!r} is known here")
    return asset


@bp.get("/assets")
def list_assets() -> Response:
    query = parse_query(ListAssetsQuery)
    after = decode_cursor(query.page_after) if query.page_after else None
    filters = domain.AssetFilter(
        statuses=query.status or (),
        kinds=query.kind or (),
        render_id=query.render_id,
        seen_after=query.seen_after,
        seen_before=query.seen_before,
    )
    rows = domain.list_assets(
        get_session(), filters=filters, limit=query.page_size + 1, after=after
    )
    page, more = rows[: query.page_size], len(rows) > query.page_size
    next_link = None
    if more:
        last = page[-1]
        params = {k: v for k, v in request.args.items() if k != "page[after]"}
        params["page[after]"] = encode_cursor(last.first_seen_at, last.id)
        next_link = f"{request.path}?{urlencode(params)}"
    self_link = request.full_path.rstrip("?")
    return document(
        AssetListDocument(
            data=[asset_resource(a) for a in page],
            links=PageLinks(self=self_link, next=next_link),
        )
    )


@bp.get("/assets/<asset_id>")
def get_asset(asset_id: str) -> Response:
    query = parse_query(AssetQuery)
    if query.refresh:
        refresh = current_app.extensions.get("asset_refresh")
        if refresh is None:
            raise ApiError(
                "refresh from Shotstack is not available",
                status=501,
                code="not_implemented",
                title="Not implemented",
            )
        refresh(asset_id)
    return document(AssetDocument(data=asset_resource(_asset_or_404(asset_id))))


@bp.post("/renders")
def create_render() -> tuple[Response, int] | Response:
    doc = parse_body(NewRenderDocument)
    settings: Settings = current_app.config["SETTINGS"]
    session = get_session()
    with session.begin():
        created = domain.create_render(
            session, doc.data.id, now=utcnow(), grace=settings.reconcile_grace
        )
    response = _render_document(doc.data.id)
    if created:
        response.status_code = 201
        response.headers["Location"] = f"/api/renders/{doc.data.id}"
    return response


def _render_document(render_id: str) -> Response:
    session = get_session()
    render = session.get(Render, render_id)
    if render is None:
        raise NotFound(f"no render {render_id!r} is known here")
    asset_ids = list(
        session.scalars(
            select(Asset.id).where(Asset.render_id == render_id).order_by(Asset.first_seen_at)
        )
    )
    return document(RenderDocument(data=render_resource(render, asset_ids)))


@bp.get("/renders/<render_id>")
def get_render(render_id: str) -> Response:
    parse_query(_NoQuery)
    return _render_document(render_id)


@bp.get("/renders/<render_id>/assets")
def get_render_assets(render_id: str) -> Response:
    parse_query(_NoQuery)
    session = get_session()
    found = domain.render_assets(session, render_id)
    if not found:
        fallback = current_app.extensions.get("render_fallback")
        if fallback is not None:
            found = fallback(render_id)
        elif session.get(Render, render_id) is None:
            raise NotFound(f"no render {render_id!r} is known here")
    return document(
        RenderAssetsDocument(
            data=[asset_resource(a) for a in found],
            links=SelfLink(self=f"/api/renders/{render_id}/assets"),
        )
    )


class _NoQuery(BaseModel):
    model_config = {"extra": "forbid"}


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)


__all__ = ["bp", "error_response", "init_app"]
