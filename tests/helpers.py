"""Small builders shared by the tests."""

from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from .conftest import WEBHOOK_TOKEN


def serve_callback(
    asset_id: str = "a-1",
    render_id: str = "r-1",
    status: str = "ready",
    completed: str | None = "2021-07-12T11:04:44.574Z",
    env: str = "stage",
    filename: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A `serve/copy` callback shaped as shotstack-facts.md §1.3 quotes it."""
    name = filename or f"{render_id}.mp4"
    return {
        "type": "serve",
        "action": "copy",
        "id": asset_id,
        "render": render_id,
        "owner": "5ca6hu7s9k",
        "status": status,
        "url": f"https://cdn.shotstack.io/au/{env}/5ca6hu7s9k/{name}",
        "error": None,
        "completed": completed,
        **extra,
    }


def edit_callback(render_id: str = "r-1", status: str = "done", **extra: Any) -> dict[str, Any]:
    """An `edit/render` callback shaped as shotstack-facts.md §1.2 quotes it."""
    return {
        "type": "edit",
        "action": "render",
        "id": render_id,
        "owner": "5ca6hu7s9k",
        "status": status,
        "url": f"https://shotstack-api-v1-output.s3-ap-southeast-2.amazonaws.com/x/{render_id}.mp4",
        "error": None if status == "done" else "render failed",
        "completed": "2020-02-24T11:52:20.810Z",
        **extra,
    }


def post_callback(client: FlaskClient, body: Any, token: str = WEBHOOK_TOKEN) -> TestResponse:
    return client.post(f"/webhooks/shotstack?token={token}", json=body)
