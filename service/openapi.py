"""`GET /openapi.json` (OpenAPI 3.1 of SPEC §3 and §4) and `/docs`, a page that renders it.

The document is built from the pydantic models of service/schemas.py, the same ones that
validate requests and shape responses, so it cannot drift from what the service does. Only the
routing facts (paths, statuses, media types) are written here.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from flask import Flask, Response, current_app, json
from flask_swagger_ui import get_swaggerui_blueprint
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from .jsonapi import MEDIA_TYPE
from .schemas import (
    AssetDocument,
    AssetListDocument,
    AssetQuery,
    EditCallback,
    ErrorDocument,
    ListAssetsQuery,
    NewRenderDocument,
    RenderAssetsDocument,
    RenderDocument,
    ServeCallback,
    ShotstackId,
    WebhookAnswer,
)

REF_TEMPLATE = "#/components/schemas/{model}"
DOCS_PATH = "/docs"

# What each error status means, wherever it is answered.
ERRORS = {
    400: "The request is malformed; `source` names the parameter or JSON pointer.",
    401: "No valid credentials.",
    404: "Not known here.",
    406: "Accept names `application/vnd.api+json` only with parameters other than ext/profile.",
    409: "Not possible in the resource's current state.",
    413: "The body is larger than 64 KiB; nothing is stored.",
    415: "The body is not `application/vnd.api+json` (ext/profile only) or `application/json`.",
    422: "A known callback without a required field; it is stored as rejected.",
    502: "Shotstack failed (5xx, timeout, or a key or environment problem); nothing changed.",
    503: (
        "The database is unavailable, Shotstack is rate-limiting us, or (a render's assets)"
        " Shotstack was asked about the render less than 5 s ago and nothing is known yet;"
        " see `Retry-After`."
    ),
}
RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "string"},
    }
}
BEARER_CHALLENGE = {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}}
# Words for people reading /docs; the schemas of the parameters come from the query models.
PARAMETER_HELP = {
    "filter[status]": "Comma-separated statuses.",
    "filter[kind]": "Comma-separated kinds.",
    "filter[renderId]": "Only the assets of this render.",
    "filter[seenAfter]": "Only assets first seen after this time (ISO 8601).",
    "filter[seenBefore]": "Only assets first seen before this time (ISO 8601).",
    "page[size]": "Assets per page (at most 500).",
    "page[after]": "The cursor from `links.next`; opaque.",
    "refresh": "Re-read the asset from Shotstack first.",
}
REQUEST_ID = {
    "in": "header",
    "name": "X-Request-ID",
    "required": False,
    "description": "Tags every log line of this request; returned in the response.",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
}


class _Schemas:
    """The component schemas of the document, and references into them."""

    def __init__(self, models: list[tuple[type[BaseModel], JsonSchemaMode]]) -> None:
        self.refs, defs = models_json_schema(models, ref_template=REF_TEMPLATE)
        self.components: dict[str, Any] = defs.get("$defs", {})

    def ref(self, model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return dict(self.refs[(model, mode)])


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """Drop the `null` branch of an optional field: an absent parameter says that already."""
    schema = copy.deepcopy(schema)
    branches = schema.pop("anyOf", None)
    if branches is not None:
        kept = [b for b in branches if b.get("type") != "null"]
        if len(kept) == 1:
            schema.update(kept[0])
        else:
            schema["anyOf"] = kept
    if "default" in schema and schema["default"] is None:
        del schema["default"]
    return schema


def query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """The query parameters of a pydantic query model, named by their aliases."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    required = set(schema.get("required", ()))
    params = []
    for name, prop in schema.get("properties", {}).items():
        prop_schema = _without_null(prop)
        prop_schema.pop("title", None)  # pydantic's title is the alias again
        description = PARAMETER_HELP.get(name, prop_schema.pop("description", None))
        param: dict[str, Any] = {
            "in": "query",
            "name": name,
            "required": name in required,
            "schema": prop_schema,
        }
        if description:
            param["description"] = description
        if prop_schema.get("type") == "array":
            param["style"], param["explode"] = "form", False  # `filter[status]=ready,failed`
        params.append(param)
    return params


def _id_parameter(name: str, what: str) -> dict[str, Any]:
    return {
        "in": "path",
        "name": name,
        "required": True,
        "description": f"The Shotstack {what} id.",
        "schema": TypeAdapter(ShotstackId).json_schema(),
    }


class _Builder:
    def __init__(self) -> None:
        self.schemas = _Schemas(
            [
                (EditCallback, "validation"),
                (ServeCallback, "validation"),
                (WebhookAnswer, "serialization"),
                (ErrorDocument, "serialization"),
                (AssetDocument, "serialization"),
                (AssetListDocument, "serialization"),
                (RenderDocument, "serialization"),
                (RenderAssetsDocument, "serialization"),
                (NewRenderDocument, "validation"),
            ]
        )

    def errors(self, *statuses: int, api: bool = True) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for status in statuses:
            answer: dict[str, Any] = {
                "description": ERRORS[status],
                "content": {
                    MEDIA_TYPE: {"schema": self.schemas.ref(ErrorDocument, "serialization")}
                },
            }
            if status == 503:
                answer["headers"] = dict(RETRY_AFTER)
            if status == 401 and api:
                answer["headers"] = dict(BEARER_CHALLENGE)
            found[str(status)] = answer
        return found

    def ok(
        self, model: type[BaseModel], description: str, media: str = MEDIA_TYPE
    ) -> dict[str, Any]:
        return {
            "description": description,
            "content": {media: {"schema": self.schemas.ref(model, "serialization")}},
        }

    def operation(
        self,
        op_id: str,
        summary: str,
        responses: dict[str, Any],
        *,
        tag: Literal["assets", "renders", "webhooks", "health"],
        parameters: list[dict[str, Any]] | None = None,
        body: dict[str, Any] | None = None,
        security: list[dict[str, list[str]]] | None = None,
    ) -> dict[str, Any]:
        op: dict[str, Any] = {
            "operationId": op_id,
            "summary": summary,
            "tags": [tag],
            "parameters": [*(parameters or []), REQUEST_ID],
            "responses": responses,
        }
        if body is not None:
            op["requestBody"] = body
        if security is not None:
            op["security"] = security
        return op

    def document(self) -> dict[str, Any]:
        bearer: list[dict[str, list[str]]] = [{"bearerAuth": []}]
        asset_id = _id_parameter("id", "asset")
        render_id = _id_parameter("id", "render")
        callback_schema = {
            "anyOf": [
                self.schemas.ref(EditCallback, "validation"),
                self.schemas.ref(ServeCallback, "validation"),
            ]
        }
        new_render = {"schema": self.schemas.ref(NewRenderDocument, "validation")}
        paths: dict[str, Any] = {
            "/webhooks/shotstack": {
                "post": self.operation(
                    "receiveCallback",
                    "Store a Shotstack callback, then apply it",
                    {
                        "200": self.ok(
                            WebhookAnswer,
                            "Stored (and applied, ignored or a duplicate).",
                            "application/json",
                        ),
                        **self.errors(400, 401, 413, 422, 503, api=False),
                    },
                    tag="webhooks",
                    body={
                        "required": True,
                        "description": "An `edit/render` or `serve/copy` callback. Anything "
                        "else is stored too: other types are ignored (200), a body that is "
                        "not a JSON object is rejected (400).",
                        "content": {"application/json": {"schema": callback_schema}},
                    },
                    security=[{"webhookToken": []}, {"webhookTokenHeader": []}],
                )
            },
            "/api/assets": {
                "get": self.operation(
                    "listAssets",
                    "List assets, newest first, a page at a time",
                    {
                        "200": self.ok(AssetListDocument, "A page of assets."),
                        **self.errors(400, 401, 406, 503),
                    },
                    tag="assets",
                    parameters=query_parameters(ListAssetsQuery),
                )
            },
            "/api/assets/{id}": {
                "get": self.operation(
                    "getAsset",
                    "Read one asset (with `refresh=true`, from Shotstack first)",
                    {
                        "200": self.ok(AssetDocument, "The asset."),
                        **self.errors(400, 401, 404, 406, 502, 503),
                    },
                    tag="assets",
                    parameters=[asset_id, *query_parameters(AssetQuery)],
                ),
                "delete": self.operation(
                    "deleteAsset",
                    "Delete an asset at Shotstack; the record stays, `deleted`",
                    {
                        "204": {"description": "Deleted (now or before)."},
                        **self.errors(400, 401, 404, 406, 409, 502, 503),
                    },
                    tag="assets",
                    parameters=[asset_id],
                ),
            },
            "/api/renders": {
                "post": self.operation(
                    "trackRender",
                    "Track a render even if no callback ever comes",
                    {
                        "200": self.ok(RenderDocument, "Already known."),
                        "201": {
                            **self.ok(RenderDocument, "Now tracked."),
                            "headers": {
                                "Location": {
                                    "description": "The render's URL.",
                                    "schema": {"type": "string"},
                                }
                            },
                        },
                        **self.errors(400, 401, 406, 415, 503),
                    },
                    tag="renders",
                    body={
                        "required": True,
                        "content": {MEDIA_TYPE: new_render, "application/json": new_render},
                    },
                )
            },
            "/api/renders/{id}": {
                "get": self.operation(
                    "getRender",
                    "Read one render and the ids of its assets",
                    {
                        "200": self.ok(RenderDocument, "The render."),
                        **self.errors(400, 401, 404, 406, 503),
                    },
                    tag="renders",
                    parameters=[render_id],
                )
            },
            "/api/renders/{id}/assets": {
                "get": self.operation(
                    "getRenderAssets",
                    "List a render's assets; asks Shotstack when none are known here",
                    {
                        "200": self.ok(RenderAssetsDocument, "The render's assets."),
                        **self.errors(400, 401, 404, 406, 502, 503),
                    },
                    tag="renders",
                    parameters=[render_id],
                )
            },
            "/healthz": {"get": self._health("healthz", "The process answers", ready=False)},
            "/readyz": {
                "get": self._health("readyz", "The database is reachable and migrated", True)
            },
        }
        for name, item in paths.items():
            if name.startswith("/api/"):
                for op in item.values():
                    op["security"] = bearer
        return {
            "openapi": "3.1.0",
            "info": {
                "title": "Shotstack Asset Tracker",
                "version": "1",
                "description": "Shotstack callbacks in; hosted assets tracked; a JSON:API "
                "to list, read and delete them. Errors are JSON:API error documents.",
            },
            "tags": [
                {"name": "assets", "description": "Hosted assets of renders"},
                {"name": "renders", "description": "Renders being tracked"},
                {"name": "webhooks", "description": "Callbacks from Shotstack"},
                {"name": "health", "description": "Probes"},
            ],
            "paths": paths,
            "components": {
                "schemas": self.schemas.components,
                "securitySchemes": {
                    "bearerAuth": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "A token of API_KEYS; its name is recorded on changes.",
                    },
                    "webhookToken": {
                        "type": "apiKey",
                        "in": "query",
                        "name": "token",
                        "description": "A token of WEBHOOK_TOKEN, in the callback URL.",
                    },
                    "webhookTokenHeader": {
                        "type": "apiKey",
                        "in": "header",
                        "name": "X-Webhook-Token",
                    },
                },
            },
        }

    def _health(self, op_id: str, summary: str, ready: bool) -> dict[str, Any]:
        body = {"type": "object", "properties": {"status": {"type": "string"}}}
        responses: dict[str, Any] = {
            "200": {"description": summary, "content": {"application/json": {"schema": body}}}
        }
        if ready:
            responses["503"] = {
                "description": "Not ready: the database is unreachable or not migrated.",
                "content": {"application/json": {"schema": body}},
            }
        return self.operation(op_id, summary, responses, tag="health", security=[])


def build_document() -> dict[str, Any]:
    """Return the OpenAPI 3.1 document of the service."""
    return _Builder().document()


def _openapi_json() -> Response:
    document = current_app.extensions.get("openapi_document")
    if document is None:
        document = current_app.extensions["openapi_document"] = build_document()
    return Response(json.dumps(document), mimetype="application/json")


def init_app(app: Flask) -> None:
    app.add_url_rule("/openapi.json", "openapi", _openapi_json, methods=["GET"])
    # Swagger UI's files ship inside the flask-swagger-ui wheel: nothing comes from a CDN.
    app.register_blueprint(
        get_swaggerui_blueprint(
            DOCS_PATH,
            "/openapi.json",
            config={"app_name": "Shotstack Asset Tracker API", "deepLinking": True},
            blueprint_name="docs",
        )
    )
