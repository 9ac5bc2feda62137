"""The internal REST API, `/api/...`: JSON:API documents behind named bearer keys (SPEC §4)."""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlencode

from flask import Blueprint, Flask, Response, current_app, g, request
from pydantic import BaseModel, ValidationError
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from . import assets as domain
from . import shotstack
from .config import Settings
from .db import get_session, insert_for, utcnow
from .jsonapi import (
    MEDIA_TYPE,
    ApiError,
    ApiErrors,
    Conflict,
    NotFound,
    Unauthorized,
    Unavailable,
    asset_resource,
    decode_cursor,
    document,
    encode_cursor,
    error_response,
    render_resource,
    validation_errors,
)
from .models import Asset, Render, Source
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
T = TypeVar("T")
log = logging.getLogger(__name__)
ACCEPTED_BODY_TYPES = ("application/vnd.api+json", "application/json")
RENDER_LOOKUP_EVERY = timedelta(seconds=5)  # SPEC §4: the fallback asks at most this often


@bp.before_request
def authenticate() -> None:
    """Let in a request that carries a configured bearer key; remember the key's name."""
    settings: Settings = current_app.config["SETTINGS"]
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    name = None
    if scheme.lower() == "bearer" and token:
        given = token.strip().encode()
        for key_name, secret in settings.api_keys:
            if hmac.compare_digest(given, secret.get_secret_value().encode()):
                name = key_name
    if name is None:
        raise Unauthorized(
            "send Authorization: Bearer <token> with a key of API_KEYS",
            headers={"WWW-Authenticate": "Bearer"},
        )
    g.api_key_name = name


JSONAPI_PARAMS = frozenset({"ext", "profile"})  # the only media type parameters JSON:API allows


def _media_params(media: str) -> tuple[str, set[str]]:
    """Split `type/sub; a=1; q=0.5` into the type and its parameter names (q aside)."""
    kind, *params = (part.strip() for part in media.split(";"))
    names = {p.partition("=")[0].strip().lower() for p in params if p}
    return kind.lower(), names - {"q"}


@bp.before_request
def negotiate() -> None:
    """JSON:API 1.1 content negotiation: 406 when every JSON:API type in Accept is modified."""
    accepted = [_media_params(m) for m in request.headers.get("Accept", "").split(",") if m]
    ours = [names for kind, names in accepted if kind == MEDIA_TYPE]
    if ours and all(names - JSONAPI_PARAMS for names in ours):
        raise ApiError(
            f"accept {MEDIA_TYPE} without media type parameters other than ext or profile",
            status=406,
            code="not_acceptable",
            title="Not acceptable",
        )


@bp.url_value_preprocessor
def refuse_impossible_ids(_endpoint: str | None, values: dict[str, Any] | None) -> None:
    """Answer 404 for an id with a NUL: none exists, and Postgres text cannot hold one."""
    for value in (values or {}).values():
        if isinstance(value, str) and "\x00" in value:
            raise NotFound("no such id is known here")


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
        raise ApiErrors(validation_errors(exc, in_query=True)) from None


def parse_body(model: type[Q]) -> Q:
    """Validate a JSON:API request document; 415 for another media type."""
    modified = request.mimetype == MEDIA_TYPE and set(request.mimetype_params) - JSONAPI_PARAMS
    if request.mimetype not in ACCEPTED_BODY_TYPES or modified:
        raise ApiError(
            f"send the document as {ACCEPTED_BODY_TYPES[0]}",
            status=415,
            code="unsupported_media_type",
            title="Unsupported media type",
        )
    try:
        return model.model_validate_json(request.get_data())
    except ValidationError as exc:
        raise ApiErrors(validation_errors(exc, in_query=False)) from None


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
        # Nothing is read before the call, so no transaction is open across it (SPEC §4).
        facts = _ask_shotstack(lambda client: client.get_asset(asset_id))
        if facts is not None:  # a Shotstack 404 leaves the record as it is
            _record(get_session(), [facts])
    return document(AssetDocument(data=asset_resource(_asset_or_404(asset_id))))


@bp.delete("/assets/<asset_id>")
def delete_asset(asset_id: str) -> Response:
    """Delete an asset at Shotstack, then mark it `deleted` here (SPEC §4's table)."""
    parse_query(_NoQuery)
    session = get_session()
    asset = session.get(Asset, asset_id)
    status = asset.status if asset is not None else None
    session.rollback()  # no transaction is held across a call to Shotstack (SPEC §4)
    if status is None:
        facts = _ask_shotstack(lambda client: client.get_asset(asset_id))
        if facts is None:
            raise NotFound(f"no asset {asset_id!r} is known here or at Shotstack")
        _record(session, [facts])
        status = facts.status
    if status == "importing":
        raise Conflict(
            f"asset {asset_id!r} is still being copied to hosting; retry when it is ready"
        )
    if status != "deleted":
        _ask_shotstack(lambda client: client.delete_asset(asset_id))
        with session.begin():
            domain.mark_deleted(session, asset_id, by=g.api_key_name, now=utcnow())
    return Response(status=204, mimetype=MEDIA_TYPE)


def _ask_shotstack(call: Callable[[shotstack.ServeClient], T]) -> T:
    """Make the calls of one request within its deadline; answer Shotstack's failures.

    The client is bounded once per request, so the calls of a request share the 8 s.
    """
    if "shotstack_client" not in g:
        g.shotstack_client = shotstack.get_client().bounded(shotstack.WEB_DEADLINE)
    try:
        return call(g.shotstack_client)
    except shotstack.ShotstackRateLimited as exc:
        wait = shotstack.ceil_seconds(exc.retry_after)
        raise Unavailable(
            f"Shotstack's rate limit is reached; retry in {wait} s",
            code="shotstack_rate_limited",
            headers={"Retry-After": str(wait)},
        ) from None
    except shotstack.ShotstackAuthError:
        raise _bad_gateway(
            "shotstack_auth_error",
            "Shotstack refused this service's API key: check SHOTSTACK_API_KEY and that it "
            "is a key of the environment SHOTSTACK_ENV names",
        ) from None
    except shotstack.ShotstackNotConfigured:
        raise _bad_gateway(
            "shotstack_not_configured",
            "SHOTSTACK_API_KEY is not set, so this service cannot call Shotstack",
        ) from None
    except shotstack.ShotstackError as exc:
        log.warning("Shotstack failed while serving %s %s: %s", request.method, request.path, exc)
        raise _bad_gateway(
            "shotstack_unavailable",
            "Shotstack failed or did not answer in time; nothing was changed, try again",
        ) from None


def _bad_gateway(code: str, detail: str) -> ApiError:
    return ApiError(detail, status=502, code=code, title="Bad gateway")


def _record(session: Session, found: list[domain.AssetFacts]) -> None:
    """Store what a lookup said, in one short transaction of its own."""
    settings: Settings = current_app.config["SETTINGS"]
    with session.begin():
        for facts in found:
            domain.record_asset(
                session, facts, source=Source.LOOKUP, now=utcnow(), grace=settings.reconcile_grace
            )


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
        found = _look_up_render(session, render_id)
    return document(
        RenderAssetsDocument(
            data=[asset_resource(a) for a in found],
            links=SelfLink(self=f"/api/renders/{render_id}/assets"),
        )
    )


def _look_up_render(session: Session, render_id: str) -> list[Asset]:
    """Ask Shotstack for a render's assets, unless it was asked in the last 5 s; store them.

    Taking the turn tracks the render from then on, even if Shotstack then fails.
    """
    now = utcnow()
    asks = _claim_lookup(session, render_id, now=now)
    session.commit()  # no transaction is held across a call to Shotstack (SPEC §4)
    if not asks:
        # Another request asked within 5 s, and its answer may still be on the way: an empty
        # list would say "no assets" for a render nobody may ask about yet (SPEC §4's limit).
        last = session.scalar(select(Render.last_lookup_at).where(Render.id == render_id))
        wait = RENDER_LOOKUP_EVERY - (now - last) if last else RENDER_LOOKUP_EVERY
        seconds = min(max(math.ceil(wait.total_seconds()), 1), 5)
        raise Unavailable(
            f"Shotstack was asked about this render less than 5 s ago and no asset is known"
            f" here yet; retry in {seconds} s",
            code="render_lookup_rate_limited",
            headers={"Retry-After": str(seconds)},
        )
    found = _ask_shotstack(lambda client: client.assets_by_render(render_id))
    _record(session, found)
    with session.begin():  # like any lookup by render id, it may settle the render
        domain.settle_render(session, render_id, found, now=utcnow())
    return domain.render_assets(session, render_id)


def _claim_lookup(session: Session, render_id: str, *, now: datetime) -> bool:
    """Track the render and take its lookup turn; False if another took one within 5 s."""
    settings: Settings = current_app.config["SETTINGS"]
    r = Render.__table__.c
    stmt = insert_for(session, Render).values(
        id=render_id,
        status="unknown",
        tracking="pending",
        attempts=0,
        next_check_at=now + timedelta(seconds=settings.reconcile_grace),
        first_seen_at=now,
        last_lookup_at=now,
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[r.id],
        set_={"last_lookup_at": now},
        where=or_(r.last_lookup_at.is_(None), r.last_lookup_at <= now - RENDER_LOOKUP_EVERY),
    ).returning(r.id)
    return session.execute(stmt).scalar() is not None


class _NoQuery(BaseModel):
    model_config = {"extra": "forbid"}


def init_app(app: Flask) -> None:
    # The API is the web app's one caller of Shotstack: its client is made with it, after fork.
    shotstack.init_app(app)
    app.register_blueprint(bp)

    @app.before_request
    def _unknown_api_routes_need_a_key_too() -> None:
        """SPEC §4: every /api request needs a key; a route that matched none is no exception
        (the blueprint's own hooks run only for its routes)."""
        if request.blueprint is None and f"{request.path}/".startswith(f"{bp.url_prefix}/"):
            authenticate()


__all__ = ["bp", "error_response", "init_app"]
